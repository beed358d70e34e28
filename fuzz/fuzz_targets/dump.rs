//! An arbitrary byte string read as an activation dump (a safetensors
//! file). For a dump that reads: every accessor, every tensor's rows, and
//! the dump written again with `to_bytes` and read back, which must give
//! the same dump, bit for bit, and the same bytes once more.
#![no_main]

use libfuzzer_sys::fuzz_target;
use model_tracer::activation::MAX_LAYERS;
use model_tracer::dump::{FORMAT, MAX_WIDTH, VERSION};
use model_tracer::{ActivationDump, Stage};

fuzz_target!(|data: &[u8]| {
    let Ok(dump) = ActivationDump::from_bytes(data) else {
        return;
    };
    check(&dump);
    let bytes = dump.to_bytes();
    let again = match ActivationDump::from_bytes(&bytes) {
        Ok(d) => d,
        Err(e) => panic!("a dump written by to_bytes is refused: {e}"),
    };
    check(&again);
    same(&dump, &again);
    assert!(
        again.to_bytes() == bytes,
        "a second round trip changed the bytes"
    );
});

/// Every accessor, checked against the others.
fn check(d: &ActivationDump) {
    let t = d.len();
    assert_eq!(d.tokens().len(), t);
    assert_eq!(d.positions().len(), t);
    assert_eq!(d.is_empty(), t == 0);
    assert_eq!(d.metadata().get("format").map(String::as_str), Some(FORMAT));
    assert_eq!(
        d.metadata().get("version").map(String::as_str),
        Some(VERSION)
    );
    let layers = d.layers();
    assert!(
        layers.windows(2).all(|w| w[0] < w[1]),
        "layers not in order"
    );
    assert!(
        layers.iter().all(|&l| l < MAX_LAYERS),
        "a layer beyond the limit"
    );
    let mut listed = 0;
    for v in d.tensors() {
        listed += 1;
        assert_eq!(v.rows(), t, "{}", v.name());
        assert!(
            v.width() <= MAX_WIDTH,
            "{}: rows beyond the limit",
            v.name()
        );
        assert_eq!(Some(v.data().len()), t.checked_mul(v.width()));
        for r in 0..t {
            let row = v
                .row(r)
                .unwrap_or_else(|| panic!("{}: no row {r}", v.name()));
            assert_eq!(row.len(), v.width());
        }
        assert!(v.row(t).is_none());
        assert_eq!(v.iter_rows().count(), t);
        let width = if v.stage() == Stage::Logits {
            d.vocab()
        } else {
            d.dim()
        };
        assert_eq!(width, Some(v.width()), "{}", v.name());
        assert_eq!(v.layer().is_some(), v.stage().is_layer_stage());
        if let Some(l) = v.layer() {
            assert!(layers.binary_search(&l).is_ok());
        }
        let Some(found) = d.activation(v.layer(), v.stage()) else {
            panic!("{} is listed but not found", v.name());
        };
        assert_eq!(found.name(), v.name());
        assert!(std::ptr::eq(found.data(), v.data()));
    }
    // Every layer and stage asked for, present or not, and one layer beyond.
    let mut found = 0;
    let beyond = layers.last().map_or(0, |l| l.saturating_add(1));
    for layer in layers.iter().copied().chain([beyond]) {
        for stage in Stage::LAYER_STAGES {
            if let Some(v) = d.activation(Some(layer), stage) {
                assert_eq!((v.layer(), v.stage()), (Some(layer), stage));
                found += 1;
            }
        }
    }
    for stage in [Stage::Embedding, Stage::FinalNorm, Stage::Logits] {
        let v = d.activation(None, stage);
        assert_eq!(v.is_some(), d.activation(Some(beyond), stage).is_some());
        found += usize::from(v.is_some());
    }
    assert_eq!(found, listed, "tensors() and activation() disagree");
    assert_eq!(d.logits().is_some(), d.vocab().is_some());
    assert!(d.activation(None, Stage::Input).is_none());
    let _ = format!("{d:?}");
}

/// The same dump: tokens, positions, metadata, and every tensor's values
/// bit for bit (NaN payloads included).
fn same(a: &ActivationDump, b: &ActivationDump) {
    assert_eq!(a.tokens(), b.tokens());
    assert_eq!(a.positions(), b.positions());
    assert_eq!(a.metadata(), b.metadata());
    assert_eq!((a.dim(), a.vocab()), (b.dim(), b.vocab()));
    assert_eq!(a.layers(), b.layers());
    assert_eq!(a.tensors().count(), b.tensors().count());
    for (x, y) in a.tensors().zip(b.tensors()) {
        assert_eq!(x.name(), y.name());
        assert_eq!((x.rows(), x.width()), (y.rows(), y.width()), "{}", x.name());
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<u32>>();
        assert!(
            bits(x.data()) == bits(y.data()),
            "{}: values changed",
            x.name()
        );
    }
}
