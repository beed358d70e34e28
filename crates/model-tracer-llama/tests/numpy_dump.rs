//! The decoder's f32 path, tensor by tensor, against an independent numpy
//! forward of SmolLM2 (`tests/fixtures/smollm2_reference_forward.py`), both
//! as activation dumps: every stage of every layer agrees to float
//! rounding, and the quantized path is visibly further away.
#![cfg(feature = "dump")]

mod common;

use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use model_tracer::diff::{diff, Place, Side, DEFAULT_TOLERANCE};
use model_tracer::dump::{DumpFilter, DumpRecorder};
use model_tracer::{ActivationDump, Full, Lightweight};
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

/// The numpy forward's dump of [`PARIS`], written once per test binary
/// (`None`, after saying why, without the model or numpy and gguf).
fn numpy_dump() -> Option<&'static (std::path::PathBuf, ActivationDump)> {
    static DUMP: OnceLock<Option<(std::path::PathBuf, ActivationDump)>> = OnceLock::new();
    DUMP.get_or_init(|| {
        let model = common::real_model()?;
        let available =
            common::python_with("gguf").is_some() && common::python_with("numpy").is_some();
        if !common::require(available, "python3 with numpy and gguf") {
            return None;
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
        Some((model, ActivationDump::read(&numpy_path).unwrap()))
    })
    .as_ref()
}

#[test]
fn the_f32_path_matches_the_numpy_forward_at_every_stage() {
    let Some((model, numpy)) = numpy_dump() else {
        return;
    };
    assert_eq!(numpy.metadata()["matmuls"], "f32");
    // Embedding, 30 layers of 6 stages, final norm, logits.
    assert_eq!(numpy.tensors().count(), 1 + 30 * 6 + 2);

    let exact = errors(&decoder_dump(model, &PARIS, true), numpy);
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

    let quantized = errors(&decoder_dump(model, &PARIS, false), numpy);
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

/// The decoder's run of `ids` under `Full`: its dump, and its trace as a
/// diff side (statistics and fingerprints, no values).
fn decoder_sides(path: &std::path::Path, ids: &[u32], exact: bool) -> (Side, Side) {
    let mut m = Llama::from_gguf(path, None, Full).unwrap();
    // The logits of every prompt position, as the numpy forward has them.
    let options = model_tracer::TraceOptions {
        logit_rows: model_tracer::LogitRows::Every,
        ..model_tracer::TraceOptions::default()
    };
    *m.tracer_mut() = model_tracer::ModelTracer::with_options(Full, options);
    m.set_exact(exact);
    m.tracer_mut()
        .set_dump(Some(DumpRecorder::new(DumpFilter::default())));
    m.prefill(ids);
    let name = if exact { "f32" } else { "quantized" };
    let trace = Side::from_forwards(&format!("{name} trace"), m.tracer().forwards());
    let dump = m.tracer_mut().take_dump().unwrap();
    (
        Side::from_dump(&format!("{name} dump"), &dump).unwrap(),
        trace,
    )
}

/// The place a report points at, as `(position, layer, stage)`.
fn place(p: Option<&Place>) -> Option<(usize, Option<usize>, &'static str)> {
    p.map(|p| (p.position, p.layer, p.stage))
}

#[test]
fn diff_against_the_numpy_forward_finds_the_f32_path_clean_and_the_quantized_path_apart() {
    let Some((model, numpy)) = numpy_dump() else {
        return;
    };
    let reference = Side::from_dump("numpy", numpy).unwrap();
    // Embedding, 30 layers of 6 stages, final norm, logits.
    let sites = 1 + 30 * 6 + 2;

    // The f32 path: float rounding only, at every site, whether the diff
    // sees the vectors (dump) or only statistics and fingerprints (trace).
    let (dump, trace) = decoder_sides(model, &PARIS, true);
    for side in [&dump, &trace] {
        let r = diff(&reference, side, DEFAULT_TOLERANCE).unwrap();
        assert_eq!(r.positions, vec![0, 1, 2, 3, 4]);
        assert_eq!(r.sites_compared, sites, "{}", side.name);
        assert!(r.first_divergence.is_none(), "{}: {r}", side.name);
        let worst = r.sites.iter().map(|s| s.max_error.0).fold(0.0, f32::max);
        eprintln!("{}: largest error {worst:.2e}", side.name);
        assert!(worst < DEFAULT_TOLERANCE / 10.0, "{}: {r}", side.name);
        assert_eq!(r.top1_agreement.map(|f| f.0), Some(1.0));
    }

    // The quantized path: the same embedding and first norm, then the first
    // product (8-bit activations, 4-bit weights) parts from the reference.
    let (qdump, qtrace) = decoder_sides(model, &PARIS, false);
    let reference_errors = errors(&decoder_dump(model, &PARIS, false), numpy);
    let error_of = |name: &str| reference_errors.iter().find(|(n, _)| n == name).unwrap().1;
    assert!(error_of("layers.0.post_norm") < 1e-6);
    assert!(error_of("layers.0.post_attn") > 1e-3);
    for side in [&qdump, &qtrace] {
        let r = diff(&reference, side, DEFAULT_TOLERANCE).unwrap();
        let first = place(r.first_divergence.as_ref());
        assert_eq!(first, Some((0, Some(0), "post_attn")), "{}: {r}", side.name);
        // The jump is where the quantization error appears, from rounding
        // noise before it.
        let jump = r.largest_jump.as_ref().unwrap();
        assert_eq!((jump.layer, jump.stage), (Some(0), "post_attn"), "{r}");
        assert!(jump.before.0 < 1e-5 && jump.error.0 > 1e-3, "{r}");
        // Every layer after it stays apart.
        assert!(r.layers.iter().all(|l| l.max_error.0 > DEFAULT_TOLERANCE));
    }
}
