//! Speed of the candle model beside the reference decoder, in one run on
//! the real SmolLM2-135M-Instruct file (Q4_1): prefill tokens/s of a
//! 32-token prompt (candle: one batched forward, traced or not; the
//! reference decoder: its chunked prefill) and decode ms/token.
//!
//! ```text
//! CANDLE_NUM_THREADS=1 cargo bench -p model-tracer-candle --bench decode   # candle on one thread, as the reference decoder
//! cargo bench -p model-tracer-candle --bench decode                        # candle on its pool (one thread per core)
//! ```

use std::hint::black_box;
use std::time::Instant;

use model_tracer::{Disabled, Lightweight, TraceConfig};
use model_tracer_candle::CandleLlama;
use model_tracer_llama::model::{KvCacheOptions, KvType, Llama};

const PROMPT_LEN: usize = 32;
const STEPS: usize = 48;
const ROUNDS: usize = 5;

/// Median and best of `ROUNDS` samples.
fn median_best(mut samples: Vec<f64>) -> (f64, f64) {
    samples.sort_by(f64::total_cmp);
    (samples[samples.len() / 2], samples[0])
}

/// A fixed prompt spread over the vocabulary.
fn prompt() -> Vec<u32> {
    (0..PROMPT_LEN)
        .map(|p| ((p * 7919 + 13) % 49152) as u32)
        .collect()
}

/// The two engines, behind one interface.
trait Engine {
    fn clear(&mut self);
    fn prefill(&mut self, prompt: &[u32]);
    fn step(&mut self, token: u32) -> u32;
}

impl<C: TraceConfig> Engine for Llama<C> {
    fn clear(&mut self) {
        self.clear_kv_cache();
        self.tracer_mut().clear();
    }
    fn prefill(&mut self, prompt: &[u32]) {
        Llama::prefill(self, prompt);
    }
    fn step(&mut self, token: u32) -> u32 {
        model_tracer::stats::argmax(self.forward(black_box(token))).unwrap_or(0) as u32
    }
}

impl<C: TraceConfig> Engine for CandleLlama<C> {
    fn clear(&mut self) {
        self.clear_kv_cache();
        self.tracer_mut().clear();
    }
    fn prefill(&mut self, prompt: &[u32]) {
        if let Err(e) = self.forward(prompt) {
            panic!("candle prefill: {e}");
        }
    }
    fn step(&mut self, token: u32) -> u32 {
        match self.forward(black_box(&[token])) {
            Ok(l) => model_tracer::stats::argmax(&l).unwrap_or(0) as u32,
            Err(e) => panic!("candle step: {e}"),
        }
    }
}

fn report(name: &str, engine: &mut dyn Engine) {
    let prompt = prompt();
    let (mut prefill, mut decode) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        engine.clear();
        let t0 = Instant::now();
        engine.prefill(&prompt);
        prefill.push(PROMPT_LEN as f64 / t0.elapsed().as_secs_f64());
        let mut token = 7042;
        let t0 = Instant::now();
        for _ in 0..STEPS {
            token = engine.step(token);
        }
        decode.push(t0.elapsed().as_secs_f64() * 1e3 / STEPS as f64);
    }
    // Prefill: the best is the largest rate.
    let (p_median, _) = median_best(prefill.clone());
    let p_best = prefill.iter().copied().fold(0.0, f64::max);
    let (d_median, d_best) = median_best(decode);
    println!(
        "{name:<40} prefill {p_median:>7.1} tokens/s (best {p_best:>7.1})   decode {d_median:>7.2} ms/token (best {d_best:>7.2})"
    );
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
    let threads = std::env::var("CANDLE_NUM_THREADS").unwrap_or_else(|_| "one per core".into());
    println!(
        "SmolLM2-135M-Instruct Q4_1, {PROMPT_LEN}-token prompt, then {STEPS} decode steps; median and best of {ROUNDS} runs; candle threads: {threads}"
    );
    let cache = Some(KvCacheOptions {
        capacity: 128,
        sinks: 4,
        kv_type: KvType::F32,
    });
    match Llama::from_gguf(&path, cache, Disabled) {
        Ok(mut m) => report("reference decoder, Disabled (1 thread)", &mut m),
        Err(e) => println!("reference decoder: {e}"),
    }
    match CandleLlama::from_gguf(&path, Some(128), Disabled) {
        Ok(mut m) => report("candle, Disabled", &mut m),
        Err(e) => println!("candle: {e}"),
    }
    match CandleLlama::from_gguf(&path, Some(128), Lightweight) {
        Ok(mut m) => report("candle, Lightweight", &mut m),
        Err(e) => println!("candle: {e}"),
    }
}
