//! Decode speed of the reference decoder, single-threaded: milliseconds per
//! token of the real SmolLM2-135M (Q4_1) when its file is present, and of the
//! synthetic model of the same shape, under each trace level.
//!
//! `cargo bench --bench decode` (the repository builds for the host CPU;
//! `RUSTFLAGS="" cargo bench --bench decode` measures the default target).

use std::hint::black_box;
use std::time::Instant;

use model_tracer::{Disabled, Full, Lightweight, TraceConfig};
use model_tracer_llama::dtype::GgmlType;
use model_tracer_llama::model::{synthetic_weights, Config, KvCacheOptions, KvType, Llama};

const PROMPT: [u32; 5] = [504, 3575, 282, 4649, 314];
const STEPS: usize = 48;
const ROUNDS: usize = 5;

/// Milliseconds per decode step over `ROUNDS` runs of `STEPS` steps, each
/// run after a fresh prefill: the median and the best run. On a shared
/// machine the best run is the one least disturbed by other work; the
/// median shows how much the others cost.
fn ms_per_token<C: TraceConfig>(model: &mut Llama<C>) -> (f64, f64) {
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
        samples.push(t0.elapsed().as_secs_f64() * 1e3 / STEPS as f64);
        model.tracer_mut().clear();
    }
    samples.sort_by(f64::total_cmp);
    (samples[ROUNDS / 2], samples[0])
}

fn report<C: TraceConfig>(what: &str, level: &str, mut model: Llama<C>) {
    let (median, best) = ms_per_token(&mut model);
    println!(
        "{what:<34} {level:<12} {median:>8.2} ms/token (best {best:>7.2})  {:>6.1} tokens/s",
        1e3 / median
    );
}

fn main() {
    println!(
        "decode, single thread, {STEPS} steps after a {}-token prompt, median and best of {ROUNDS} runs",
        PROMPT.len()
    );
    let path = model_tracer_test_support::model_path();
    let cache = Some(KvCacheOptions {
        capacity: 256,
        sinks: 4,
        kv_type: KvType::F32,
    });
    if path.exists() {
        let name = "SmolLM2-135M-Instruct Q4_1 (file)";
        match Llama::from_gguf(&path, cache, Disabled) {
            Ok(m) => report(name, "disabled", m),
            Err(e) => println!("{name}: {e}"),
        }
        if let Ok(m) = Llama::from_gguf(&path, cache, Lightweight) {
            report(name, "lightweight", m);
        }
        if let Ok(m) = Llama::from_gguf(&path, cache, Full) {
            report(name, "full", m);
        }
    } else {
        println!(
            "SKIPPED: real model not found at {} (bash .ci/fetch-model)",
            path.display()
        );
    }
    let config = Config::smollm2_135m();
    let build = |trace| {
        let weights = synthetic_weights(&config, GgmlType::Q4_1, 1).map_err(|e| e.to_string())?;
        let cache = KvCacheOptions {
            capacity: 256,
            sinks: 4,
            kv_type: KvType::F32,
        };
        Llama::new(config.clone(), weights, None, cache, trace).map_err(|e| e.to_string())
    };
    match build(Disabled) {
        Ok(m) => report("synthetic SmolLM2 shape, Q4_1", "disabled", m),
        Err(e) => println!("synthetic: {e}"),
    }
}
