//! Timing of the matrix-vector kernels on SmolLM2-135M's shapes.
//!
//! Plain `std::time` timing (no harness): each case is repeated until it has
//! run for a fixed wall time, and the best of several rounds is reported.
//! Run with `cargo bench --bench matvec` (`-- rows`, `-- exact` or
//! `-- prefill` for the multi-row sections alone); add
//! `RUSTFLAGS="-C target-cpu=native"` for the AVX2 build.

use std::hint::black_box;
use std::time::{Duration, Instant};

use model_tracer_llama::dtype::GgmlType;
use model_tracer_llama::quant::{QMatrix, QuantizedActivations, QuantizedBatch};
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
    // `cargo bench --bench matvec -- rows prefill` runs only the sections
    // named (`matvec`, `rows`, `exact`, `prefill`); cargo adds `--bench`.
    let sections: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let run = |name: &str| sections.is_empty() || sections.iter().any(|s| s == name);
    if run("matvec") {
        single_row(budget);
    }
    if run("rows") {
        multi_row(budget);
    }
    if run("exact") {
        multi_row_f32(budget);
    }
    if run("prefill") {
        prefill_pass(budget);
    }
}

/// One `matvec` (and one `matvec_f32`) per call on each shape, the token
/// estimates built from them, and a whole token with distinct weights.
fn single_row(budget: Duration) {
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

/// `QMatrix::matmul` on SmolLM2-135M's shapes for several batch sizes,
/// against one `matvec` per row, kernels only (activations quantized
/// beforehand; quantization is timed above, once per row either way).
fn multi_row(budget: Duration) {
    let shapes = [
        (576, 576, GgmlType::Q4_1, "q, o"),
        (192, 576, GgmlType::Q4_1, "k, v"),
        (1536, 576, GgmlType::Q4_1, "gate, up"),
        (576, 1536, GgmlType::Q4_1, "down"),
        (49152, 576, GgmlType::Q8_0, "LM head"),
        (576, 576, GgmlType::Q8_0, ""),
        (576, 576, GgmlType::Q4_0, ""),
    ];
    let batch_sizes = [1usize, 8, 32, 64];
    println!();
    println!("multi-row products: median time per activation row (us), and matvec's median / it");
    print!(
        "{:<6} {:>6} x {:<5} {:<9} {:>9}",
        "type", "rows", "cols", "", "matvec"
    );
    for t in batch_sizes {
        print!(" {:>14}", format!("T = {t}"));
    }
    println!();
    for (rows, cols, ty, what) in shapes {
        let m = QMatrix::from_f32(ty, rows, cols, &values(rows * cols, rows as u64 * 7 + 1))
            .unwrap_or_else(|e| panic!("cannot build the {ty} matrix: {e}"));
        let max_t = batch_sizes[batch_sizes.len() - 1];
        let x = values(max_t * cols, 5);
        let mut acts = QuantizedActivations::new();
        acts.quantize_from(&x[..cols], ty)
            .unwrap_or_else(|e| panic!("{e}"));
        let mut out = vec![0.0f32; max_t * rows];
        let (_, single) = time_per_call(
            || {
                m.matvec(black_box(&acts), &mut out[..rows]);
                black_box(&out);
            },
            budget,
        );
        let single = single.as_secs_f64();
        print!(
            "{:<6} {:>6} x {:<5} {:<9} {:>9.2}",
            ty.name(),
            rows,
            cols,
            what,
            single * 1e6
        );
        let mut batch = QuantizedBatch::new();
        for t in batch_sizes {
            batch
                .quantize_from(&x[..t * cols], cols, ty)
                .unwrap_or_else(|e| panic!("{e}"));
            let (_, median) = time_per_call(
                || {
                    m.matmul(black_box(&batch), &mut out[..t * rows]);
                    black_box(&out);
                },
                budget,
            );
            let per_row = median.as_secs_f64() / t as f64;
            print!(" {:>7.2} {:>5.2}x", per_row * 1e6, single / per_row);
        }
        println!();
    }
}

/// `QMatrix::matmul_f32` (the exact path) against one `matvec_f32` per
/// row, as [`multi_row`] does for the quantized products.
fn multi_row_f32(budget: Duration) {
    let shapes = [
        (576, 576, GgmlType::Q4_1),
        (1536, 576, GgmlType::Q4_1),
        (576, 1536, GgmlType::Q4_1),
        (576, 576, GgmlType::Q8_0),
        (576, 576, GgmlType::Q4_0),
        (576, 576, GgmlType::Q5_1),
    ];
    let batch_sizes = [8usize, 32];
    println!();
    println!("exact path: median time per activation row (us), and matvec_f32's median / it");
    print!(
        "{:<6} {:>6} x {:<5} {:>11}",
        "type", "rows", "cols", "matvec_f32"
    );
    for t in batch_sizes {
        print!(" {:>14}", format!("T = {t}"));
    }
    println!();
    for (rows, cols, ty) in shapes {
        let m = QMatrix::from_f32(ty, rows, cols, &values(rows * cols, rows as u64 * 7 + 1))
            .unwrap_or_else(|e| panic!("cannot build the {ty} matrix: {e}"));
        let max_t = batch_sizes[batch_sizes.len() - 1];
        let x = values(max_t * cols, 5);
        let mut out = vec![0.0f32; max_t * rows];
        let (_, single) = time_per_call(
            || {
                m.matvec_f32(black_box(&x[..cols]), &mut out[..rows]);
                black_box(&out);
            },
            budget,
        );
        let single = single.as_secs_f64();
        print!(
            "{:<6} {:>6} x {:<5} {:>11.2}",
            ty.name(),
            rows,
            cols,
            single * 1e6
        );
        for t in batch_sizes {
            let (_, median) = time_per_call(
                || {
                    m.matmul_f32(black_box(&x[..t * cols]), &mut out[..t * rows]);
                    black_box(&out);
                },
                budget,
            );
            let per_row = median.as_secs_f64() / t as f64;
            print!(" {:>7.2} {:>5.2}x", per_row * 1e6, single / per_row);
        }
        println!();
    }
}

/// The 30 layers' products for a chunk of `T` prompt positions, every
/// matrix distinct (weights streamed from memory as in a real forward
/// pass), per position: one `matvec` per position against one `matmul` per
/// chunk. Activations are quantized once per chunk in both, once per input
/// vector of a layer (q/k/v/gate/up share theirs).
fn prefill_pass(budget: Duration) {
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
                .map(|(i, &(r, c))| {
                    QMatrix::from_f32(GgmlType::Q4_1, r, c, &values(r * c, l * 16 + i as u64))
                        .unwrap_or_else(|e| panic!("cannot build a {r}x{c} matrix: {e}"))
                })
                .collect()
        })
        .collect();
    println!();
    println!("30 layers of products (Q4_1, weights distinct), median ms per position:");
    for t in [1usize, 8, 32, 64] {
        let x = values(t * 576, 3);
        let x_ffn = values(t * 1536, 4);
        let mut batch = QuantizedBatch::new();
        let mut batch_ffn = QuantizedBatch::new();
        let mut out = vec![0.0f32; t * 1536];
        let (_, chunk) = time_per_call(
            || {
                for layer in &layers {
                    batch
                        .quantize_from(black_box(&x), 576, GgmlType::Q4_1)
                        .unwrap_or_else(|e| panic!("{e}"));
                    for m in &layer[..6] {
                        m.matmul(&batch, &mut out[..t * m.rows()]);
                    }
                    batch_ffn
                        .quantize_from(black_box(&x_ffn), 1536, GgmlType::Q4_1)
                        .unwrap_or_else(|e| panic!("{e}"));
                    layer[6].matmul(&batch_ffn, &mut out[..t * 576]);
                    black_box(&out);
                }
            },
            budget * 2,
        );
        let mut acts = QuantizedActivations::new();
        let mut acts_ffn = QuantizedActivations::new();
        let (_, one_by_one) = time_per_call(
            || {
                for p in 0..t {
                    for layer in &layers {
                        acts.quantize_from(black_box(&x[p * 576..(p + 1) * 576]), GgmlType::Q4_1)
                            .unwrap_or_else(|e| panic!("{e}"));
                        for m in &layer[..6] {
                            m.matvec(&acts, &mut out[..m.rows()]);
                        }
                        acts_ffn
                            .quantize_from(
                                black_box(&x_ffn[p * 1536..(p + 1) * 1536]),
                                GgmlType::Q4_1,
                            )
                            .unwrap_or_else(|e| panic!("{e}"));
                        layer[6].matvec(&acts_ffn, &mut out[..576]);
                        black_box(&out);
                    }
                }
            },
            budget * 2,
        );
        let (per_chunk, per_one) = (
            chunk.as_secs_f64() / t as f64,
            one_by_one.as_secs_f64() / t as f64,
        );
        println!(
            "T = {t:>2}: matmul {:.3} ms, matvec {:.3} ms, {:.2}x",
            per_chunk * 1e3,
            per_one * 1e3,
            per_one / per_chunk
        );
    }
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
