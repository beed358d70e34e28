//! Prompt evaluation speed of the reference decoder, single-threaded: a
//! 256-token prompt of the real SmolLM2-135M (Q4_1) run in chunks of 64
//! positions (batched prefill) and one position at a time, tracing off,
//! interleaved in one run; then the generation speed after it.
//!
//! `cargo bench -p model-tracer-llama --bench prefill`

use std::hint::black_box;
use std::time::Instant;

use model_tracer::Disabled;
use model_tracer_llama::model::{KvCacheOptions, KvType, Llama, DEFAULT_PREFILL_CHUNK};

const PROMPT_LEN: usize = 256;
const ROUNDS: usize = 5;
const GENERATE: usize = 32;

/// Text whose tokens make the prompt (the first `PROMPT_LEN` of them).
const TEXT: &str = "The history of Paris spans more than two thousand years. \
The Parisii, a Celtic people, settled on an island in the Seine around the \
third century before our era; the Romans conquered the basin in 52 BC and \
built Lutetia on the left bank, with its forum, baths and an amphitheatre. \
In the Middle Ages the city became the seat of the Capetian kings, the \
largest town of western Europe and a centre of learning, its university \
drawing scholars from every country. Notre-Dame rose on the island from \
1163, the Louvre began as a fortress under Philip Augustus, and the walls \
were rebuilt again and again as the city outgrew them. The Revolution of \
1789 began here with the storming of the Bastille; Napoleon crowned himself \
emperor in the cathedral; and in the nineteenth century Baron Haussmann cut \
the wide boulevards, parks and sewers that shape the city today. The \
Eiffel Tower, built for the Exposition of 1889, was meant to stand for \
twenty years and became the symbol of the city. Occupied from 1940 to 1944, \
Paris was liberated in August 1944, and in the decades after the war it \
grew into a metropolis of more than ten million people, with new towns, \
a ring road, high-speed trains and one of the busiest airports of the \
world, while its old centre kept the look the nineteenth century gave it. \
Today the city is a capital of fashion, art, science and diplomacy, the \
home of UNESCO and the OECD, and one of the most visited places on earth.";

fn main() {
    let path = model_tracer_test_support::model_path();
    if !path.exists() {
        println!(
            "SKIPPED: real model not found at {} (bash .ci/fetch-model)",
            path.display()
        );
        return;
    }
    let cache = Some(KvCacheOptions {
        capacity: 1024,
        sinks: 4,
        kv_type: KvType::F32,
    });
    let mut m = match Llama::from_gguf(&path, cache, Disabled) {
        Ok(m) => m,
        Err(e) => {
            println!("{}: {e}", path.display());
            return;
        }
    };
    let Some(tok) = m.tokenizer.as_ref() else {
        println!("the model file has no vocabulary");
        return;
    };
    let mut prompt = tok.encode(TEXT);
    if prompt.len() < PROMPT_LEN {
        println!(
            "the text is {} tokens, fewer than {PROMPT_LEN}",
            prompt.len()
        );
        return;
    }
    prompt.truncate(PROMPT_LEN);
    println!(
        "prefill of a {PROMPT_LEN}-token prompt, SmolLM2-135M-Instruct Q4_1, tracing off, \
         single thread, {ROUNDS} interleaved rounds"
    );
    let mut batched = Vec::with_capacity(ROUNDS);
    let mut single = Vec::with_capacity(ROUNDS);
    let mut generation = Vec::with_capacity(ROUNDS);
    let time = |m: &mut Llama<Disabled>, chunk: usize| {
        m.set_prefill_chunk(chunk);
        m.clear_kv_cache();
        let t0 = Instant::now();
        black_box(m.forward_chunks(black_box(&prompt)));
        t0.elapsed().as_secs_f64()
    };
    for _ in 0..ROUNDS {
        batched.push(time(&mut m, DEFAULT_PREFILL_CHUNK));
        single.push(time(&mut m, 1));
        // generation after the prompt
        let mut token = model_tracer::stats::argmax(m.logits()).unwrap_or(0) as u32;
        let t0 = Instant::now();
        for _ in 0..GENERATE {
            let logits = m.forward(black_box(token));
            token = model_tracer::stats::argmax(logits).unwrap_or(0) as u32;
        }
        generation.push(t0.elapsed().as_secs_f64());
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        (v[v.len() / 2], v[0])
    };
    let (b, bb) = median(&mut batched);
    let (s, sb) = median(&mut single);
    let (g, gb) = median(&mut generation);
    let n = PROMPT_LEN as f64;
    println!(
        "chunks of {DEFAULT_PREFILL_CHUNK:>3}: {:>7.1} ms, {:>6.1} tokens/s (best {:.1} ms)",
        b * 1e3,
        n / b,
        bb * 1e3
    );
    println!(
        "one at a time: {:>7.1} ms, {:>6.1} tokens/s (best {:.1} ms)",
        s * 1e3,
        n / s,
        sb * 1e3
    );
    println!(
        "ratio of the medians: {:.2}x (of the best runs: {:.2}x)",
        s / b,
        sb / bb
    );
    println!(
        "generation after the prompt: {GENERATE} tokens, {:.1} ms/token, {:.1} tokens/s (best {:.1} ms/token)",
        g * 1e3 / GENERATE as f64,
        GENERATE as f64 / g,
        gb * 1e3 / GENERATE as f64
    );
}
