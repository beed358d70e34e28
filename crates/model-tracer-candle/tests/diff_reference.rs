//! The candle model's trace against the reference decoder's, on the real
//! SmolLM2-135M-Instruct file: the same token ids through both, every
//! (position, layer, stage) compared by `model_tracer::diff`. The candle
//! model runs the prompt as one traced forward of five rows, the
//! reference decoder one position per forward.

use model_tracer::diff::{diff, DiffReport, Side, DEFAULT_TOLERANCE};
use model_tracer::{Disabled, Full, LogitRows, ModelTracer, Stage, TraceOptions};
use model_tracer_candle::CandleLlama;
use model_tracer_llama::model::{Fault, FaultKind, Llama};
use model_tracer_test_support::real_model;

/// "The capital of France is".
const PROMPT: [u32; 5] = [504, 3575, 282, 4649, 314];
/// Generated tokens forced through both models after the prompt.
const FORCED: usize = 16;

fn options() -> TraceOptions {
    TraceOptions {
        max_forwards: 64,
        ..TraceOptions::default()
    }
}

/// The prompt and the reference decoder's 16 greedy tokens after it.
fn ids(path: &std::path::Path) -> Vec<u32> {
    let mut m = Llama::from_gguf(path, None, Disabled).unwrap();
    let g = m.generate(&PROMPT, FORCED, |_| {});
    assert_eq!(g.tokens.len(), FORCED, "no end of generation in 16 tokens");
    PROMPT.iter().copied().chain(g.tokens).collect()
}

/// The reference decoder's trace of `ids` (the f32 path when `exact`).
fn reference_side(path: &std::path::Path, ids: &[u32], exact: bool) -> Side {
    let mut m = Llama::from_gguf(path, None, Full).unwrap();
    *m.tracer_mut() = ModelTracer::with_options(Full, options());
    m.set_exact(exact);
    for &t in ids {
        m.forward(t);
    }
    Side::from_forwards("reference", m.tracer().forwards())
}

/// The candle model's trace of `ids`, the prompt as one forward; every
/// prompt row gets its logits and lens when `every_row`, else the last.
fn candle_side(
    path: &std::path::Path,
    ids: &[u32],
    exact: bool,
    fault: Option<Fault>,
    every_row: bool,
) -> Side {
    let mut m = CandleLlama::from_gguf(path, Some(64), Full).unwrap();
    let options = TraceOptions {
        logit_rows: if every_row {
            LogitRows::Every
        } else {
            LogitRows::Last
        },
        ..options()
    };
    *m.tracer_mut() = ModelTracer::with_options(Full, options);
    m.set_exact(exact).unwrap();
    m.set_fault(fault);
    m.forward(&ids[..PROMPT.len()]).unwrap();
    for &t in &ids[PROMPT.len()..] {
        m.forward(&[t]).unwrap();
    }
    assert_eq!(m.tracer().forwards().count(), ids.len());
    let with_logits = m.tracer().forwards().filter(|f| f.logits.is_some()).count();
    let expected = if every_row {
        ids.len()
    } else {
        ids.len() - PROMPT.len() + 1
    };
    assert_eq!(with_logits, expected);
    Side::from_forwards("candle", m.tracer().forwards())
}

fn worst(report: &DiffReport) -> (f32, String) {
    report
        .sites
        .iter()
        .map(|s| {
            (
                s.max_error.0,
                format!(
                    "{:?} {} at {} ({})",
                    s.layer, s.stage, s.position, s.measure
                ),
            )
        })
        .fold((0.0, String::new()), |a, b| if b.0 > a.0 { b } else { a })
}

/// Every stage of every layer, and the embedding, final norm and logits.
const SITES: usize = 30 * 6 + 3;

/// The f32 paths: the reference decoder's (`set_exact`: dequantized
/// weights times f32 activations) and candle's (`set_exact`: candle's f32
/// `matmul` with the weights candle dequantized). Both quantized paths
/// quantize the activations to 8 bits before each product, and a rounding
/// that flips on a last-bit difference of the input moves a product by a
/// whole quantization step: see `quantized_paths_choose_the_same_tokens`.
#[test]
fn candle_trace_matches_the_reference_f32_path_and_a_planted_fault_is_found_at_its_layer() {
    let Some(path) = real_model() else {
        return;
    };
    let ids = ids(&path);
    let reference = reference_side(&path, &ids, true);

    for every_row in [false, true] {
        let clean = diff(
            &reference,
            &candle_side(&path, &ids, true, None, every_row),
            DEFAULT_TOLERANCE,
        )
        .unwrap();
        let (error, site) = worst(&clean);
        eprintln!(
            "f32 paths, logits of every prompt row {every_row}: {} sites, largest error {error:e} at {site}",
            clean.sites_compared
        );
        assert_eq!(clean.positions.len(), ids.len());
        assert!(clean.token_mismatches.is_empty());
        assert_eq!(clean.sites_compared, SITES);
        assert_eq!(
            clean.first_divergence, None,
            "largest error {error:e} at {site}"
        );
        assert!(error < DEFAULT_TOLERANCE);
        assert_eq!(clean.top1_agreement.map(|f| f.0), Some(1.0));
    }

    // A fault at every position shows first at position 0; one planted
    // at a single position inside the batched prompt, at that position.
    for (layer, stage, position) in [
        (7, Stage::PostAttn, None),
        (19, Stage::PostFfn, None),
        (13, Stage::PostFfn, Some(3)),
        (22, Stage::PostAttn, Some(2)),
    ] {
        let fault = Fault {
            kind: FaultKind::Scale(stage),
            layer,
            position,
        };
        let faulty = candle_side(&path, &ids, true, Some(fault), false);
        let report = diff(&reference, &faulty, DEFAULT_TOLERANCE).unwrap();
        let first = report.first_divergence.expect("the fault is seen");
        eprintln!(
            "scale fault at layer {layer} {}, position {position:?}: {first:?}",
            stage.name()
        );
        assert_eq!(
            (first.position, first.layer, first.stage),
            (position.unwrap_or(0), Some(layer), stage.name())
        );
    }
}

/// The quantized paths (candle's `QMatMul` and the reference decoder's
/// kernels, both with 8-bit activations) part by more than the tolerance
/// from the first layer on: candle rounds each `Q8_1` block sum twice where
/// ggml rounds it once, which moves every product by about 1e-3 of its size
/// (`tests/q8_1_sums.rs` rebuilds one product both ways). They still choose
/// the same token at every position.
#[test]
fn quantized_paths_choose_the_same_tokens() {
    let Some(path) = real_model() else {
        return;
    };
    let ids = ids(&path);
    let reference = reference_side(&path, &ids, false);
    let report = diff(
        &reference,
        &candle_side(&path, &ids, false, None, false),
        DEFAULT_TOLERANCE,
    )
    .unwrap();
    let (error, site) = worst(&report);
    eprintln!(
        "quantized paths: first divergence {:?}, largest error {error:e} at {site}",
        report.first_divergence
    );
    assert_eq!(report.sites_compared, SITES);
    let first = report.first_divergence.expect("the quantized paths part");
    assert_eq!((first.position, first.layer), (0, Some(0)));
    assert_eq!(report.top1_agreement.map(|f| f.0), Some(1.0));
}
