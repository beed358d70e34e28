//! Wall-clock cost of folding one forward into the fleet metrics, on a
//! forward of the SmolLM2-135M shape traced under `Full`: 30 layers of six
//! stages and a residual ratio, embedding, final norm and logits, nine
//! attention heads per layer, the logit lens at every layer and a KV state.
//!
//! Run with `cargo bench --features metrics --bench metrics_fold`. The
//! series exist after the first fold; each timed sample folds the same
//! forward `FOLDS` times, rounds interleave the direct call and the sink,
//! and the median round is reported, in ns per forward.

use std::hint::black_box;
use std::time::Instant;

use model_tracer::metrics::TraceMetrics;
use model_tracer::{
    ForwardSink, ForwardTrace, Full, KvCacheStateTrace, LogitRows, ModelTracer, Stage, TraceOptions,
};
use model_tracer_test_support::SplitMix64;
use prometheus_client::registry::Registry;

const LAYERS: usize = 30;
const HEADS: usize = 9;
const DIM: usize = 576;
const VOCAB: usize = 512;
const POSITION: usize = 40;
const FOLDS: usize = 2_000;
const ROUNDS: usize = 31;

fn smollm2_shaped_forward() -> ForwardTrace {
    let mut rng = SplitMix64::new(7);
    let mut vector = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| (rng.next_u32() as f32 / u32::MAX as f32) * 2.0 - 1.0)
            .collect()
    };
    let options = TraceOptions {
        logit_rows: LogitRows::Every,
        ..TraceOptions::default()
    };
    let mut t = ModelTracer::with_options(Full, options);
    t.begin_forward(POSITION);
    t.activation(0, Stage::Embedding, &vector(DIM));
    let softmax = {
        let w = vector(POSITION + 1);
        let s: f32 = w.iter().map(|v| v.abs()).sum();
        w.iter().map(|v| v.abs() / s).collect::<Vec<f32>>()
    };
    for layer in 0..LAYERS {
        for stage in Stage::LAYER_STAGES {
            t.activation(layer, stage, &vector(DIM));
        }
        t.residual(layer, &vector(DIM), &vector(DIM));
        for head in 0..HEADS {
            t.attention(layer, head, POSITION, &softmax);
        }
        let lens = vector(VOCAB);
        t.logit_lens(layer, VOCAB, |out| out.copy_from_slice(&lens));
    }
    t.activation(0, Stage::FinalNorm, &vector(DIM));
    t.final_logits(&vector(VOCAB));
    t.kv_state(|| {
        let mut kv = KvCacheStateTrace::new(POSITION, 2048);
        kv.valid_positions = POSITION + 1;
        kv
    });
    t.end_forward();
    match t.last_forward() {
        Some(f) => f.clone(),
        None => panic!("the tracer kept no forward"),
    }
}

/// The median and the fastest of `v`.
fn median_min(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0])
}

fn main() {
    let forward = smollm2_shaped_forward();
    let mut registry = Registry::default();
    let metrics = TraceMetrics::register(&mut registry);
    let mut sink = metrics.sink();
    metrics.observe(&forward); // the series are created here
    let (mut direct, mut through_sink) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let start = Instant::now();
        for _ in 0..FOLDS {
            metrics.observe(black_box(&forward));
        }
        direct.push(start.elapsed().as_nanos() as f64 / FOLDS as f64);
        let start = Instant::now();
        for _ in 0..FOLDS {
            let _ = sink.write_forward(black_box(&forward));
        }
        through_sink.push(start.elapsed().as_nanos() as f64 / FOLDS as f64);
    }
    let mut text = String::new();
    let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
    let series = text.lines().filter(|l| !l.starts_with('#')).count();
    println!(
        "forward: {} recorded stages, {} attention records, {} lens tokens; {} samples exported",
        forward.activations.recorded().count(),
        forward.attention.len(),
        forward.logits.as_ref().map_or(0, |l| l.tokens.len()),
        series
    );
    let (direct, direct_min) = median_min(direct);
    let (sink, sink_min) = median_min(through_sink);
    println!(
        "fold per forward (median, fastest of {ROUNDS} rounds of {FOLDS}): \
         TraceMetrics::observe {direct:.0} ns, {direct_min:.0} ns; \
         MetricsSink::write_forward {sink:.0} ns, {sink_min:.0} ns"
    );
    let mut scrape = Vec::new();
    for _ in 0..ROUNDS {
        let start = Instant::now();
        text.clear();
        let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
        scrape.push(start.elapsed().as_nanos() as f64);
    }
    println!(
        "one scrape (OpenMetrics text, {} bytes): {:.0} µs",
        text.len(),
        median_min(scrape).0 / 1000.0
    );
}
