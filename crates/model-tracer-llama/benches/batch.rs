//! Aggregate decode speed of k sequences stepping together through
//! `Llama::forward_batch` (continuous batching), single-threaded, on the
//! real SmolLM2-135M (Q4_1): tokens per second summed over the sequences,
//! for k = 1, 2, 4, 8, with tracing off (`Disabled`) and `Lightweight`,
//! beside the one-sequence `forward` for reference.
//!
//! `cargo bench --bench batch`

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use model_tracer::{Disabled, Lightweight, TraceConfig};
use model_tracer_llama::model::Config;
use model_tracer_llama::model::{KvCacheOptions, KvType, Llama, SequenceStep, Weights};

const PROMPT: [u32; 5] = [504, 3575, 282, 4649, 314];
const STEPS: usize = 32;
const ROUNDS: usize = 3;
const CACHE: KvCacheOptions = KvCacheOptions {
    capacity: 256,
    sinks: 4,
    kv_type: KvType::F32,
};

/// Seconds per batch step of `k` sequences over `ROUNDS` runs of `STEPS`
/// steps after each sequence's prefill: the median and the best run.
fn seconds_per_step<C: TraceConfig>(model: &mut Llama<C>, k: usize) -> (f64, f64) {
    let mut samples = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        let mut seqs: Vec<_> = (0..k).map(|_| model.new_sequence(CACHE)).collect();
        // Different prompts: each sequence's prompt shifted by its index.
        let prompts: Vec<Vec<u32>> = (0..k)
            .map(|i| PROMPT.iter().map(|&t| t + i as u32).collect())
            .collect();
        let mut steps: Vec<SequenceStep<'_>> = seqs
            .iter_mut()
            .zip(&prompts)
            .map(|(s, p)| SequenceStep::new(s, p))
            .collect();
        model.forward_batch(&mut steps);
        drop(steps);
        let t0 = Instant::now();
        for _ in 0..STEPS {
            let next: Vec<[u32; 1]> = seqs
                .iter()
                .map(|s| [model_tracer::stats::argmax(s.logits()).unwrap_or(0) as u32])
                .collect();
            let mut steps: Vec<SequenceStep<'_>> = seqs
                .iter_mut()
                .zip(&next)
                .map(|(s, t)| SequenceStep::new(s, black_box(t)))
                .collect();
            model.forward_batch(&mut steps);
        }
        samples.push(t0.elapsed().as_secs_f64() / STEPS as f64);
        for s in seqs {
            model.end_sequence(s);
        }
        model.tracer_mut().clear();
    }
    samples.sort_by(f64::total_cmp);
    (samples[ROUNDS / 2], samples[0])
}

/// Seconds per one-sequence `forward` step, for reference.
fn seconds_per_forward<C: TraceConfig>(model: &mut Llama<C>) -> f64 {
    let mut samples = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        model.clear_kv_cache();
        model.prefill(&PROMPT);
        let mut token = 7042;
        let t0 = Instant::now();
        for _ in 0..STEPS {
            let logits = model.forward(black_box(token));
            token = model_tracer::stats::argmax(logits).unwrap_or(0) as u32;
        }
        samples.push(t0.elapsed().as_secs_f64() / STEPS as f64);
        model.tracer_mut().clear();
    }
    samples.sort_by(f64::total_cmp);
    samples[ROUNDS / 2]
}

fn table<C: TraceConfig>(level: &str, mut model: Llama<C>) {
    let one = seconds_per_forward(&mut model);
    println!(
        "{level:<12} forward (1 sequence)   {:>8.2} ms/step  {:>7.1} tokens/s",
        one * 1e3,
        1.0 / one
    );
    for k in [1, 2, 4, 8] {
        let (median, best) = seconds_per_step(&mut model, k);
        println!(
            "{level:<12} forward_batch k = {k}     {:>8.2} ms/step  {:>7.1} tokens/s (best {:>7.1})",
            median * 1e3,
            k as f64 / median,
            k as f64 / best
        );
    }
}

fn main() {
    let path = model_tracer_test_support::model_path();
    if !path.exists() {
        println!(
            "SKIPPED: real model not found at {} (bash .ci/fetch-model)",
            path.display()
        );
        return;
    }
    println!(
        "aggregate decode, single thread, SmolLM2-135M-Instruct Q4_1, {STEPS} steps after a {}-token prompt per sequence, median of {ROUNDS} runs",
        PROMPT.len()
    );
    let off = match Llama::from_gguf(&path, Some(CACHE), Disabled) {
        Ok(m) => m,
        Err(e) => {
            println!("{}: {e}", path.display());
            return;
        }
    };
    let (weights, config): (Arc<Weights>, Config) = (off.shared_weights(), off.config.clone());
    table("disabled", off);
    match Llama::from_shared(weights, config, None, CACHE, Lightweight) {
        Ok(m) => table("lightweight", m),
        Err(e) => println!("lightweight: {e}"),
    }
}
