//! A long decode run under `Full` tracing holds memory flat: the tracer
//! keeps the last `max_forwards` forwards and aggregates whose size depends
//! on the model (layers, heads, bricks), never on the number of tokens.

use std::time::Instant;

use model_tracer::{Full, ModelTracer, TraceOptions};
use model_tracer_llama::dtype::GgmlType;
use model_tracer_llama::model::{synthetic_weights, Config, KvCacheOptions, KvType, Llama};
use model_tracer_test_support::{live_bytes, CountingAllocator};

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

/// Runs `total` decode steps of the tiny synthetic model under `Full`
/// with `max_forwards = 64` and a 256-position StreamingLLM cache, and
/// checks that the live heap after step 1 000 and after step `total`
/// differ by less than 1%.
fn run_flat(total: usize) {
    // The counter is process-wide: one run at a time.
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let config = Config::tiny();
    let weights = synthetic_weights(&config, GgmlType::Q4_1, 3).unwrap();
    let cache = KvCacheOptions {
        capacity: 256,
        sinks: 4,
        kv_type: KvType::F32,
    };
    let mut model: Llama<Full> = Llama::new(config, weights, None, cache, Full).unwrap();
    let options = TraceOptions {
        max_forwards: 64,
        ..TraceOptions::default()
    };
    *model.tracer_mut() = ModelTracer::with_options(Full, options);

    let checkpoint = 1_000;
    let mut token = 1u32;
    let mut at_checkpoint = 0isize;
    let started = Instant::now();
    let mut checkpoint_time = 0.0;
    for step in 1..=total {
        let logits = model.forward(token);
        // Greedy, with a nudge so the sequence does not settle into a loop
        // of one token (which would exercise fewer code paths).
        let best = logits
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map_or(0, |(i, _)| i as u32);
        token = (best + (step as u32 % 7)) % 512;
        if step == checkpoint {
            at_checkpoint = live_bytes();
            checkpoint_time = started.elapsed().as_secs_f64();
        }
    }
    let at_end = live_bytes();
    let secs = started.elapsed().as_secs_f64();
    let summary = model.tracer().summary();
    let kv = summary.kv_cache.unwrap();
    let growth = (at_end - at_checkpoint) as f64 / at_checkpoint as f64;
    eprintln!(
        "live heap after step {checkpoint}: {at_checkpoint} B; after step {total}: {at_end} B \
         (change {:+} B, {:+.4}%); {total} steps in {secs:.1} s ({:.1} us/step; first {checkpoint} in {checkpoint_time:.2} s)",
        at_end - at_checkpoint,
        100.0 * growth,
        1e6 * secs / total as f64
    );

    // The run did what it claims: every step traced, the cache evicted.
    assert_eq!(summary.forwards, total);
    assert_eq!(kv.steps, total);
    assert_eq!(kv.total_evictions, total - 256);
    assert_eq!(model.tracer().forwards().count(), 64);
    assert_eq!(model.tracer().last_forward().unwrap().position, total - 1);
    assert!(!summary.heads.is_empty() && !summary.brick_layers.is_empty());
    // The default sampling measures one brick visit in 37; the tiny model
    // visits 5 bricks per layer and the LM head: 21 a step.
    let visits = total * 21;
    let stride = model_tracer::tracer::DEFAULT_QUANT_STRIDE;
    let samples: usize = summary.bricks.iter().map(|b| b.samples).sum();
    assert_eq!(samples, visits.div_ceil(stride));
    // And its memory did not grow with it.
    assert!(at_checkpoint > 0);
    assert!(
        growth.abs() < 0.01,
        "live heap went from {at_checkpoint} B to {at_end} B ({:+.3}%)",
        100.0 * growth
    );
}

#[test]
fn memory_stays_flat_over_10k_steps() {
    // Debug builds are an order of magnitude slower: fewer steps there.
    run_flat(if cfg!(debug_assertions) {
        2_000
    } else {
        10_000
    });
}

/// The full-length run, about 4 minutes in release on 2 cores (the tiny
/// model's own forward is most of it): `.ci/run` runs it once.
#[test]
#[ignore = "about 4 minutes: run with `cargo test --release --test long_run -- --ignored`"]
fn memory_stays_flat_over_100k_steps() {
    run_flat(100_000);
}
