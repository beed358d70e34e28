//! Throughput of `TensorStats::from_slice` against two references on the same
//! data: a scalar `f64` Welford loop that skips NaN/Inf (the baseline the
//! kernel replaces) and a plain `f32x8` sum (the floor: one add per element).
//!
//! Run with `cargo bench --bench stats_throughput`. Each sample repeats the
//! call until about `WORK` elements are processed (short samples, so that on a
//! shared machine many of them run without being descheduled); rounds
//! interleave the three functions and the median round is reported.

use std::hint::black_box;
use std::time::Instant;

use model_tracer::stats::TensorStats;
use model_tracer_test_support::SplitMix64;
use wide::f32x8;

/// Elements processed per timed sample of the vectorised functions.
const WORK: usize = 1 << 21;
/// Timed samples per function and size; the median is reported.
const ROUNDS: usize = 41;
/// Timed samples for inputs larger than `WORK` (one call per sample).
const LARGE_ROUNDS: usize = 11;

/// Result of the scalar baseline, mirroring `TensorStats`.
#[derive(Debug, Clone, Copy)]
struct WelfordStats {
    count: usize,
    min: f32,
    max: f32,
    mean: f64,
    std: f64,
    l2_norm: f64,
    nan_count: usize,
    inf_count: usize,
}

/// Scalar `f64` Welford update per element, NaN and ±Inf counted and skipped.
fn welford(data: &[f32]) -> WelfordStats {
    let mut n = 0u64;
    let mut mean = 0.0f64;
    let mut m2 = 0.0f64;
    let mut sumsq = 0.0f64;
    let mut min = f32::INFINITY;
    let mut max = f32::NEG_INFINITY;
    let mut nan_count = 0;
    let mut inf_count = 0;
    for &x in data {
        if x.is_nan() {
            nan_count += 1;
            continue;
        }
        if x.is_infinite() {
            inf_count += 1;
            continue;
        }
        n += 1;
        let xf = x as f64;
        let d = xf - mean;
        mean += d / n as f64;
        m2 += d * (xf - mean);
        sumsq += xf * xf;
        min = min.min(x);
        max = max.max(x);
    }
    WelfordStats {
        count: data.len(),
        min,
        max,
        mean,
        std: if n >= 2 {
            (m2 / (n - 1) as f64).sqrt()
        } else {
            0.0
        },
        l2_norm: sumsq.sqrt(),
        nan_count,
        inf_count,
    }
}

/// Plain sum with four independent `f32x8` accumulators: no statistics, no
/// checks, the cheapest single pass over the data.
fn plain_sum(data: &[f32]) -> f32 {
    let mut acc = [f32x8::ZERO; 4];
    let mut steps = data.chunks_exact(32);
    for c in &mut steps {
        acc[0] += f32x8::from(&c[0..8]);
        acc[1] += f32x8::from(&c[8..16]);
        acc[2] += f32x8::from(&c[16..24]);
        acc[3] += f32x8::from(&c[24..32]);
    }
    let mut vectors = steps.remainder().chunks_exact(8);
    for c in &mut vectors {
        acc[0] += f32x8::from(c);
    }
    let total = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    total.reduce_add() + vectors.remainder().iter().sum::<f32>()
}

/// Elements per second of one sample of `reps` calls.
fn sample<R>(data: &[f32], reps: usize, f: &impl Fn(&[f32]) -> R) -> f64 {
    let start = Instant::now();
    for _ in 0..reps {
        black_box(f(black_box(data)));
    }
    let secs = start.elapsed().as_secs_f64();
    (data.len() * reps) as f64 / secs
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

struct Row {
    n: usize,
    stats: f64,
    welford: f64,
    sum: f64,
}

fn measure(data: &[f32]) -> Row {
    let n = data.len();
    let reps = (WORK / n).max(1);
    // The scalar baseline is ~10-50x slower; fewer repetitions keep the run short.
    let slow_reps = (reps / 16).max(1);
    let (mut a, mut b, mut c) = (Vec::new(), Vec::new(), Vec::new());
    // Warm caches and branch predictors.
    sample(data, reps.min(64), &TensorStats::from_slice);
    sample(data, slow_reps.min(4), &welford);
    sample(data, reps.min(64), &plain_sum);
    let rounds = if n > WORK { LARGE_ROUNDS } else { ROUNDS };
    for _ in 0..rounds {
        a.push(sample(data, reps, &TensorStats::from_slice));
        b.push(sample(data, slow_reps, &welford));
        c.push(sample(data, reps, &plain_sum));
    }
    Row {
        n,
        stats: median(a),
        welford: median(b),
        sum: median(c),
    }
}

fn check_agreement(data: &[f32]) {
    let s = TensorStats::from_slice(data);
    let w = welford(data);
    let rel = |a: f32, b: f64| ((a as f64 - b) / b).abs();
    assert_eq!(
        (s.count, s.min, s.max, s.nan_count, s.inf_count),
        (w.count, w.min, w.max, w.nan_count, w.inf_count)
    );
    assert!(
        (s.mean as f64 - w.mean).abs() <= 1e-5 * (w.mean.abs() + w.std),
        "mean"
    );
    assert!(rel(s.std, w.std) < 1e-5, "std");
    assert!(rel(s.l2_norm, w.l2_norm) < 1e-5, "l2");
}

fn main() {
    let sizes = [576usize, 4096, 65536, 16 * 1024 * 1024];
    println!(
        "target_feature avx2={} fma={}; {} rounds, median",
        cfg!(target_feature = "avx2"),
        cfg!(target_feature = "fma"),
        ROUNDS
    );
    println!("(inputs larger than {WORK} elements: {LARGE_ROUNDS} rounds)");
    println!(
        "{:>10} | {:>14} | {:>14} | {:>14} | {:>12} | {:>12}",
        "n", "from_slice", "welford", "plain sum", "vs welford", "vs sum"
    );
    println!(
        "{:>10} | {:>14} | {:>14} | {:>14} | {:>12} | {:>12}",
        "", "Melem/s", "Melem/s", "Melem/s", "x", "%"
    );
    let rows: Vec<(&str, Vec<f32>)> = sizes
        .iter()
        .map(|&n| ("N(0,1)", SplitMix64::new(n as u64).normals(n, 0.0, 1.0)))
        .chain(std::iter::once((
            "1e4+N(0,1)",
            SplitMix64::new(7).normals(4096, 1e4, 1.0),
        )))
        .collect();
    for (label, data) in &rows {
        check_agreement(data);
        let r = measure(data);
        println!(
            "{:>10} | {:>14.0} | {:>14.0} | {:>14.0} | {:>12.1} | {:>11.0}%   {}",
            r.n,
            r.stats / 1e6,
            r.welford / 1e6,
            r.sum / 1e6,
            r.stats / r.welford,
            100.0 * r.stats / r.sum,
            label
        );
    }
}
