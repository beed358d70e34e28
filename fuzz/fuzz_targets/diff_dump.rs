//! Two arbitrary runs compared, each an activation dump or a JSON Lines
//! trace: both read as diff sides, the diff computed, and its JSON and
//! HTML page written.
//!
//! Input layout: a `u32` (little-endian) length `n`, then `n` bytes of the
//! first run (fewer when the input ends before), then the second run. A
//! run whose ninth byte opens the JSON header of a safetensors file (`{`
//! after the 8 bytes of its length) is read as a dump
//! (`ActivationDump::from_bytes`, then `Side::from_dump`); any other as a
//! trace (`Side::from_jsonl`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use model_tracer::diff::{diff, Side, DEFAULT_TOLERANCE};
use model_tracer::ActivationDump;

fuzz_target!(|data: &[u8]| {
    let Some((len, rest)) = data.split_first_chunk::<4>() else {
        return;
    };
    let n = usize::try_from(u32::from_le_bytes(*len)).map_or(rest.len(), |n| n.min(rest.len()));
    let (a, b) = rest.split_at(n);
    let (Some(a), Some(b)) = (side("a", a), side("b", b)) else {
        return;
    };
    for tolerance in [DEFAULT_TOLERANCE, 0.0, f32::NAN] {
        let Ok(report) = diff(&a, &b, tolerance) else {
            return;
        };
        let _ = report.to_json();
        let _ = report.to_string();
        let mut page = Vec::new();
        if let Err(e) = report.write_html(&mut page) {
            panic!("writing the diff page into memory failed: {e}");
        }
    }
});

/// The side of one run, if it reads.
fn side(name: &str, bytes: &[u8]) -> Option<Side> {
    if bytes.get(8) == Some(&b'{') {
        let dump = ActivationDump::from_bytes(bytes).ok()?;
        Side::from_dump(name, &dump).ok()
    } else {
        Side::from_jsonl(name, bytes).ok()
    }
}
