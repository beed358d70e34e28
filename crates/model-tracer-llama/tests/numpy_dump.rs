//! The decoder's f32 path, tensor by tensor, against an independent numpy
//! forward of SmolLM2 (`tests/fixtures/smollm2_reference_forward.py`), both
//! as activation dumps: every stage of every layer agrees to float
//! rounding, and the quantized path is visibly further away.
#![cfg(feature = "dump")]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use model_tracer::dump::{DumpFilter, DumpRecorder};
use model_tracer::{ActivationDump, Lightweight};
use model_tracer_llama::model::Llama;

/// "The capital of France is".
const PARIS: [u32; 5] = [504, 3575, 282, 4649, 314];

/// The numpy forward of the five tokens (about 5 s, most of it spent
/// dequantizing the weights) must stay quick enough to run in every CI run.
const NUMPY_BUDGET: Duration = Duration::from_secs(30);

/// The largest relative L2 error of a tensor of the f32 path: float
/// rounding in another order of summation. Measured: 5.7e-6, at
/// `layers.10.post_ffn`; the logits 1.3e-6.
const F32_TOLERANCE: f64 = 5e-5;

/// `‖a − b‖ / ‖b‖` over all values of two tensors of the same shape.
fn relative_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        diff += (f64::from(x) - f64::from(y)).powi(2);
        norm += f64::from(y).powi(2);
    }
    (diff / norm).sqrt()
}

/// The decoder's dump of `ids`, on the f32 path or the quantized one.
fn decoder_dump(path: &std::path::Path, ids: &[u32], exact: bool) -> ActivationDump {
    let mut m = Llama::from_gguf(path, None, Lightweight).unwrap();
    // The logits of every prompt position (a chunked prefill computes the
    // last one's only, unless the tracer asks).
    let options = model_tracer::TraceOptions {
        logit_rows: model_tracer::LogitRows::Every,
        ..model_tracer::TraceOptions::default()
    };
    *m.tracer_mut() = model_tracer::ModelTracer::with_options(Lightweight, options);
    m.set_exact(exact);
    let back = m
        .tracer_mut()
        .set_dump(Some(DumpRecorder::new(DumpFilter::default())));
    assert!(back.is_none(), "Lightweight traces activations");
    m.prefill(ids);
    m.tracer_mut().take_dump().unwrap()
}

/// Every tensor of `ours` against the same tensor of `reference`: the
/// name and relative L2 error of each, in forward order.
fn errors(ours: &ActivationDump, reference: &ActivationDump) -> Vec<(String, f64)> {
    assert_eq!(ours.tokens(), reference.tokens());
    assert_eq!(ours.positions(), reference.positions());
    ours.tensors()
        .map(|t| {
            let Some(r) = reference.activation(t.layer(), t.stage()) else {
                panic!("the numpy dump has no {}", t.name());
            };
            assert_eq!((t.rows(), t.width()), (r.rows(), r.width()), "{}", t.name());
            (t.name(), relative_l2(t.data(), r.data()))
        })
        .collect()
}

#[test]
fn the_f32_path_matches_the_numpy_forward_at_every_stage() {
    let Some(model) = common::real_model() else {
        return;
    };
    let available = common::python_with("gguf").is_some() && common::python_with("numpy").is_some();
    if !common::require(available, "python3 with numpy and gguf") {
        return;
    }
    let dir = common::scratch_dir("numpy-dump");
    let (ids_path, numpy_path) = (dir.join("ids.txt"), dir.join("numpy.safetensors"));
    std::fs::write(&ids_path, format!("{PARIS:?}")).unwrap();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/smollm2_reference_forward.py"
    );
    let started = Instant::now();
    let out = Command::new("python3")
        .arg(script)
        .arg(&ids_path)
        .arg(&model)
        .arg(&numpy_path)
        .output()
        .expect("python3 runs");
    let took = started.elapsed();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("numpy forward of {} tokens: {took:.1?}", PARIS.len());
    assert!(took < NUMPY_BUDGET, "the numpy forward took {took:?}");

    let numpy = ActivationDump::read(&numpy_path).unwrap();
    assert_eq!(numpy.metadata()["matmuls"], "f32");
    // Embedding, 30 layers of 6 stages, final norm, logits.
    assert_eq!(numpy.tensors().count(), 1 + 30 * 6 + 2);

    let exact = errors(&decoder_dump(&model, &PARIS, true), &numpy);
    assert_eq!(exact.len(), 1 + 30 * 6 + 2, "the decoder dumps every stage");
    let worst = |e: &[(String, f64)]| {
        e.iter()
            .cloned()
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .unwrap()
    };
    let (name, err) = worst(&exact);
    eprintln!("f32 path: worst relative L2 error {err:.2e} ({name})");
    assert!(err < F32_TOLERANCE, "{name}: {err:.3e}");
    let embedding = exact[0].1;
    assert_eq!(embedding, 0.0, "the same dequantized embedding row");

    let quantized = errors(&decoder_dump(&model, &PARIS, false), &numpy);
    let (qname, qerr) = worst(&quantized);
    eprintln!("quantized path: worst relative L2 error {qerr:.2e} ({qname})");
    let logits = |e: &[(String, f64)]| e.iter().find(|(n, _)| n == "logits").unwrap().1;
    eprintln!(
        "logits: f32 path {:.2e}, quantized path {:.2e}",
        logits(&exact),
        logits(&quantized)
    );
    // 8-bit activations cost far more than float rounding (measured: 8.5e-2
    // at layers.5.post_attn, 2.4e-2 on the logits), at every stage after
    // the first product.
    assert!(qerr > 100.0 * err, "{qerr:.3e} vs {err:.3e}");
    assert!(logits(&quantized) > 100.0 * logits(&exact));
    for ((n, e), (_, q)) in exact.iter().zip(&quantized) {
        if n.ends_with("post_attn") {
            assert!(q > e, "{n}: quantized {q:.3e}, f32 {e:.3e}");
        }
    }
}
