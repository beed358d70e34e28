//! Timing of the matrix-vector kernels on SmolLM2-135M's shapes.
//!
//! Plain `std::time` timing (no harness): each case is repeated until it has
//! run for a fixed wall time, and the best of several rounds is reported.
//! Run with `cargo bench --bench matvec`; add
//! `RUSTFLAGS="-C target-cpu=native"` for the AVX2 build.

use std::hint::black_box;
use std::time::{Duration, Instant};

use model_tracer_llama::dtype::GgmlType;
use model_tracer_llama::quant::{QMatrix, QuantizedActivations};
use model_tracer_test_support::SplitMix64;

/// Deterministic pseudo-random values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = SplitMix64::new(seed);
    (0..n).map(|_| rng.signed()).collect()
}

/// Minimum and median time of single calls over about `budget` of calls.
///
/// The machine may be shared: the minimum is the best estimate of the
/// uncontended speed, the median shows what contention costs.
fn time_per_call(mut f: impl FnMut(), budget: Duration) -> (Duration, Duration) {
    f();
    let mut samples = Vec::new();
    let start = Instant::now();
    while start.elapsed() < budget || samples.len() < 5 {
        let t = Instant::now();
        f();
        samples.push(t.elapsed());
    }
    samples.sort();
    (samples[0], samples[samples.len() / 2])
}

struct Case {
    rows: usize,
    cols: usize,
    ty: GgmlType,
}

fn main() {
    let budget = Duration::from_millis(1500);
    let cases = [
        Case {
            rows: 576,
            cols: 576,
            ty: GgmlType::Q4_1,
        },
        Case {
            rows: 192,
            cols: 576,
            ty: GgmlType::Q4_1,
        },
        Case {
            rows: 1536,
            cols: 576,
            ty: GgmlType::Q4_1,
        },
        Case {
            rows: 576,
            cols: 1536,
            ty: GgmlType::Q4_1,
        },
        Case {
            rows: 49152,
            cols: 576,
            ty: GgmlType::Q8_0,
        },
        Case {
            rows: 576,
            cols: 576,
            ty: GgmlType::Q4_0,
        },
        Case {
            rows: 576,
            cols: 576,
            ty: GgmlType::Q8_0,
        },
        Case {
            rows: 576,
            cols: 576,
            ty: GgmlType::Q5_1,
        },
        // K-quants need rows of whole 256-blocks: of this model's shapes only
        // ffn_down (1536 columns) qualifies.
        Case {
            rows: 576,
            cols: 1536,
            ty: GgmlType::Q4_K,
        },
        Case {
            rows: 576,
            cols: 1536,
            ty: GgmlType::Q6_K,
        },
    ];
    println!("best (median) time per call; GB/s and GMAC/s from the best time");
    println!(
        "{:<6} {:>6} x {:<5} {:>18} {:>7} {:>7} {:>18}",
        "type", "rows", "cols", "quantized (us)", "GB/s", "GMAC/s", "matvec_f32 (us)"
    );
    let mut per_shape = Vec::new();
    for case in &cases {
        let w = values(
            case.rows * case.cols,
            case.rows as u64 * 31 + case.cols as u64,
        );
        let m = match QMatrix::from_f32(case.ty, case.rows, case.cols, &w) {
            Ok(m) => m,
            Err(e) => panic!("cannot build the {} matrix: {e}", case.ty),
        };
        drop(w);
        let x = values(case.cols, 7);
        let mut acts = QuantizedActivations::new();
        let mut out = vec![0.0f32; case.rows];
        let quantized = time_per_call(
            || {
                acts.quantize_from(black_box(&x), case.ty)
                    .unwrap_or_else(|e| panic!("{e}"));
                m.matvec(&acts, &mut out);
                black_box(&out);
            },
            budget,
        );
        let reference = time_per_call(
            || {
                m.matvec_f32(black_box(&x), &mut out);
                black_box(&out);
            },
            budget,
        );
        let secs = quantized.0.as_secs_f64();
        let macs = (case.rows * case.cols) as f64;
        println!(
            "{:<6} {:>6} x {:<5} {:>8.1} ({:>7.1}) {:>7.2} {:>7.2} {:>8.1} ({:>7.1})",
            case.ty.name(),
            case.rows,
            case.cols,
            secs * 1e6,
            quantized.1.as_secs_f64() * 1e6,
            m.bytes().len() as f64 / secs / 1e9,
            macs / secs / 1e9,
            reference.0.as_secs_f64() * 1e6,
            reference.1.as_secs_f64() * 1e6,
        );
        per_shape.push((
            case.rows,
            case.cols,
            case.ty,
            secs,
            reference.0.as_secs_f64(),
        ));
    }
    for (n, ty) in [
        (576, GgmlType::Q4_1),
        (1536, GgmlType::Q4_1),
        (576, GgmlType::Q8_0),
    ] {
        let x = values(n, 11);
        let mut acts = QuantizedActivations::new();
        let (best, median) = time_per_call(
            || {
                acts.quantize_from(black_box(&x), ty)
                    .unwrap_or_else(|e| panic!("{e}"));
                black_box(&acts);
            },
            budget / 4,
        );
        println!(
            "quantize {n} activations for {ty}: {:.2} us ({:.2} us)",
            best.as_secs_f64() * 1e6,
            median.as_secs_f64() * 1e6
        );
    }
    let time_of = |rows, cols, ty, reference: bool| {
        per_shape
            .iter()
            .find(|s| s.0 == rows && s.1 == cols && s.2 == ty)
            .map(|s| if reference { s.4 } else { s.3 })
            .unwrap_or(f64::NAN)
    };
    for reference in [false, true] {
        // Per layer: q and o (576x576), k and v (192x576), gate and up
        // (1536x576), down (576x1536); then the tied Q8_0 LM head.
        let layer = 2.0 * time_of(576, 576, GgmlType::Q4_1, reference)
            + 2.0 * time_of(192, 576, GgmlType::Q4_1, reference)
            + 2.0 * time_of(1536, 576, GgmlType::Q4_1, reference)
            + time_of(576, 1536, GgmlType::Q4_1, reference);
        let head = time_of(49152, 576, GgmlType::Q8_0, reference);
        println!(
            "one SmolLM2-135M token ({}, best times): 30 layers {:.2} ms + LM head {:.2} ms = {:.2} ms",
            if reference {
                "matvec_f32"
            } else {
                "quantized matvec"
            },
            30.0 * layer * 1e3,
            head * 1e3,
            (30.0 * layer + head) * 1e3
        );
    }
    full_token_pass(budget);
}

/// A whole token's worth of distinct matrices (30 layers plus the LM head,
/// about 96 MB, more than the last-level cache), so the weights stream from
/// memory as they do in real decoding.
fn full_token_pass(budget: Duration) {
    let build = |rows: usize, cols: usize, ty: GgmlType, seed: u64| {
        QMatrix::from_f32(ty, rows, cols, &values(rows * cols, seed))
            .unwrap_or_else(|e| panic!("cannot build a {rows}x{cols} {ty} matrix: {e}"))
    };
    let shapes = [
        (576, 576),
        (192, 576),
        (192, 576),
        (576, 576),
        (1536, 576),
        (1536, 576),
        (576, 1536),
    ];
    let layers: Vec<Vec<QMatrix>> = (0..30u64)
        .map(|l| {
            shapes
                .iter()
                .enumerate()
                .map(|(i, &(r, c))| build(r, c, GgmlType::Q4_1, l * 16 + i as u64))
                .collect()
        })
        .collect();
    let head = build(49152, 576, GgmlType::Q8_0, 999);
    let x = values(576, 3);
    let x_ffn = values(1536, 4);
    let mut acts = QuantizedActivations::new();
    let mut acts_ffn = QuantizedActivations::new();
    let mut out = vec![0.0f32; 1536];
    let mut logits = vec![0.0f32; 49152];
    let (best, median) = time_per_call(
        || {
            for layer in &layers {
                acts.quantize_from(black_box(&x), GgmlType::Q4_1)
                    .unwrap_or_else(|e| panic!("{e}"));
                for m in &layer[..6] {
                    m.matvec(&acts, &mut out[..m.rows()]);
                }
                acts_ffn
                    .quantize_from(black_box(&x_ffn), GgmlType::Q4_1)
                    .unwrap_or_else(|e| panic!("{e}"));
                layer[6].matvec(&acts_ffn, &mut out[..576]);
                black_box(&out);
            }
            acts.quantize_from(black_box(&x), GgmlType::Q8_0)
                .unwrap_or_else(|e| panic!("{e}"));
            head.matvec(&acts, &mut logits);
            black_box(&logits);
        },
        budget * 2,
    );
    println!(
        "one SmolLM2-135M token, all weights distinct (streamed from memory): {:.2} ms ({:.2} ms median)",
        best.as_secs_f64() * 1e3,
        median.as_secs_f64() * 1e3
    );
}
