//! Products on several threads: logits, greedy tokens, the KV cache and
//! every JSON Lines record of the real SmolLM2 are, to the bit, those of
//! one thread, on 1, 2 and 3 threads (3 is more than a 2-core machine
//! has, on purpose), for a decode step (its products, and its attention
//! heads after a long prompt), a chunked prefill, a batch of sequences and
//! the exact f32 path.

mod common;

use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use model_tracer::{Full, JsonlSink, Lightweight, SinkHandle, TraceConfig};
use model_tracer_llama::dtype::GgmlType;
use model_tracer_llama::model::{
    synthetic_weights, Config, KvCacheOptions, KvType, Llama, SequenceStep,
};

#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Vec<u8>>>);

impl Write for Shared {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .lock()
            .map_err(|_| io::ErrorKind::Other)?
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|f| f.to_bits()).collect()
}

fn argmax(v: &[f32]) -> u32 {
    model_tracer::stats::argmax(v).unwrap_or(0) as u32
}

/// What a run shows: the logits after every step, the greedy tokens, the
/// JSON Lines rows of every forward, the cache's keys and values.
#[derive(Debug, PartialEq)]
struct Run {
    logits: Vec<Vec<u32>>,
    tokens: Vec<u32>,
    rows: String,
    keys: Vec<u32>,
}

/// The prompt (in chunks of `chunk` positions) and `steps` greedy steps
/// on `threads` threads (on the f32 path if `exact`), by a model anew
/// over `model`'s weights, traced
/// with a JSON Lines sink.
fn run<C: TraceConfig>(
    model: &Llama<C>,
    exact: bool,
    prompt: &[u32],
    chunk: usize,
    steps: usize,
    threads: usize,
) -> Run {
    run_of(model, exact, prompt, (chunk, steps, threads), KvType::F32)
}

/// [`run`] with a KV cache of `kv_type`.
fn run_of<C: TraceConfig>(
    model: &Llama<C>,
    exact: bool,
    prompt: &[u32],
    (chunk, steps, threads): (usize, usize, usize),
    kv_type: KvType,
) -> Run {
    let cache = KvCacheOptions {
        capacity: 128,
        sinks: 4,
        kv_type,
    };
    let mut fresh = Llama::from_shared(
        model.shared_weights(),
        model.config.clone(),
        model.tokenizer.shared(),
        cache,
        model.tracer().config().clone(),
    )
    .expect("a model over the same weights");
    fresh.set_exact(exact);
    let model = &mut fresh;
    model.set_threads(threads);
    assert_eq!(model.threads(), threads);
    let out = Shared::default();
    model
        .tracer_mut()
        .set_sink(Some(SinkHandle::new(JsonlSink::new(out.clone()))));
    model.set_prefill_chunk(chunk);
    let mut last = model.forward_chunks(prompt).to_vec();
    let mut logits = vec![bits(&last)];
    let mut tokens = Vec::new();
    for _ in 0..steps {
        let next = argmax(&last);
        tokens.push(next);
        last = model.forward(next).to_vec();
        logits.push(bits(&last));
    }
    model.tracer_mut().set_sink(None);
    let rows = out.0.lock().map(|b| b.clone()).unwrap_or_default();
    let cache = model.cache();
    let keys = (0..model.config.n_layers)
        .flat_map(|l| {
            (0..cache.len()).flat_map(move |t| {
                let key = cache.key(l, t).unwrap_or_default();
                let value = cache.value(l, t).unwrap_or_default();
                [key, value]
            })
        })
        .flat_map(|kv| bits(&kv))
        .collect();
    Run {
        logits,
        tokens,
        rows: String::from_utf8(rows).unwrap_or_default(),
        keys,
    }
}

const PROMPT: [u32; 5] = [504, 3575, 282, 4649, 314];

/// A prompt long enough (70 positions) for a decode step to run its
/// attention heads on the pool.
fn long_prompt() -> Vec<u32> {
    PROMPT.iter().copied().cycle().take(70).collect()
}

#[test]
fn smollm2_lightweight_is_the_same_on_one_two_and_three_threads() {
    let Some(path) = common::real_model() else {
        return;
    };
    let m = Llama::from_gguf(&path, None, Lightweight).expect("the model loads");
    let one = run(&m, false, &PROMPT, 2, 8, 1);
    assert_eq!(one.tokens[..6], [7042, 30, 198, 198, 504, 1797]);
    assert_eq!(one.rows.lines().count(), PROMPT.len() + 8);
    let long = run(&m, false, &long_prompt(), 16, 4, 1);
    for threads in [2, 3] {
        let many = run(&m, false, &long_prompt(), 16, 4, threads);
        assert!(
            many == long,
            "{threads} threads part from one after a long prompt"
        );
        let many = run(&m, false, &PROMPT, 2, 8, threads);
        assert_eq!(many.tokens, one.tokens, "{threads} threads");
        assert!(many.logits == one.logits, "{threads} threads: logits");
        assert!(many.keys == one.keys, "{threads} threads: KV cache");
        for (a, b) in many.rows.lines().zip(one.rows.lines()) {
            assert_eq!(a, b, "{threads} threads: JSON Lines");
        }
        assert!(many == one, "{threads} threads part from one");
    }
}

#[test]
fn smollm2_with_an_f16_cache_answers_like_llama_cpp_on_any_number_of_threads() {
    let Some(path) = common::real_model() else {
        return;
    };
    let m = Llama::from_gguf(&path, None, Lightweight).expect("the model loads");
    // llama.cpp's cache type, llama.cpp's greedy continuation
    let one = run_of(&m, false, &PROMPT, (2, 8, 1), KvType::F16);
    assert_eq!(one.tokens[..6], [7042, 30, 198, 198, 504, 1797]);
    let f32s = run(&m, false, &PROMPT, 2, 8, 1);
    assert!(one.keys != f32s.keys, "the f16 cache holds the f32 keys");
    assert!(
        one.logits != f32s.logits,
        "rounding the cache changed nothing"
    );
    let long = run_of(&m, false, &long_prompt(), (16, 4, 1), KvType::F16);
    for threads in [2, 3] {
        let many = run_of(&m, false, &PROMPT, (2, 8, threads), KvType::F16);
        assert!(many == one, "f16 cache: {threads} threads part from one");
        let many = run_of(&m, false, &long_prompt(), (16, 4, threads), KvType::F16);
        assert!(
            many == long,
            "f16 cache: {threads} threads part from one after a long prompt"
        );
    }
    // chunked or one position at a time, the same logits, tokens and cache
    let single = run_of(&m, false, &long_prompt(), (1, 4, 2), KvType::F16);
    assert!(
        single.logits == long.logits,
        "f16 cache, single positions: logits"
    );
    assert!(
        single.keys == long.keys,
        "f16 cache, single positions: cache"
    );
    assert_eq!(single.tokens, long.tokens);
}

#[test]
fn smollm2_full_and_exact_are_the_same_on_one_and_three_threads() {
    let Some(path) = common::real_model() else {
        return;
    };
    let m = Llama::from_gguf(&path, None, Full).expect("the model loads");
    let one = run(&m, false, &long_prompt(), 32, 2, 1);
    let three = run(&m, false, &long_prompt(), 32, 2, 3);
    assert!(
        one.rows.contains("attn_top_positions") || one.rows.contains("attn_"),
        "Full rows hold attention"
    );
    assert!(three == one, "Full: 3 threads part from one");
    let one = run(&m, true, &PROMPT, 3, 2, 1);
    let three = run(&m, true, &PROMPT, 3, 2, 3);
    assert!(three == one, "exact: 3 threads part from one");
}

#[test]
fn a_batch_of_sequences_is_the_same_on_one_and_three_threads() {
    let Some(path) = common::real_model() else {
        return;
    };
    let mut m = Llama::from_gguf(&path, None, Lightweight).expect("the model loads");
    let cache = KvCacheOptions {
        capacity: 64,
        sinks: 4,
        kv_type: KvType::F32,
    };
    let mut results = Vec::new();
    for threads in [1, 3] {
        m.set_threads(threads);
        let mut seqs: Vec<_> = (0..3).map(|_| m.new_sequence(cache)).collect();
        let prompts: Vec<Vec<u32>> = (0..3u32)
            .map(|i| PROMPT.iter().map(|&t| t + i).collect())
            .collect();
        let mut steps: Vec<SequenceStep<'_>> = seqs
            .iter_mut()
            .zip(&prompts)
            .map(|(s, p)| SequenceStep::new(s, p))
            .collect();
        m.forward_batch(&mut steps);
        drop(steps);
        let mut logits = Vec::new();
        for _ in 0..4 {
            let next: Vec<[u32; 1]> = seqs.iter().map(|s| [argmax(s.logits())]).collect();
            let mut steps: Vec<SequenceStep<'_>> = seqs
                .iter_mut()
                .zip(&next)
                .map(|(s, t)| SequenceStep::new(s, t))
                .collect();
            m.forward_batch(&mut steps);
            drop(steps);
            logits.extend(seqs.iter().map(|s| bits(s.logits())));
        }
        for s in seqs {
            m.end_sequence(s);
        }
        results.push(logits);
    }
    assert!(
        results[0] == results[1],
        "3 threads part from one in a batch"
    );
}

#[test]
fn a_model_dropped_mid_run_and_threads_changed_between_steps() {
    let c = Config::tiny();
    let weights = synthetic_weights(&c, GgmlType::Q4_1, 3).expect("synthetic weights");
    let cache = KvCacheOptions {
        capacity: 32,
        sinks: 4,
        kv_type: KvType::F32,
    };
    let mut want = Vec::new();
    let mut m = Llama::new(c.clone(), weights.clone(), None, cache, Lightweight).expect("model");
    for t in 0..10u32 {
        want.push(bits(m.forward(t)));
    }
    // Threads changed at every step: the same logits.
    let mut m = Llama::new(c.clone(), weights.clone(), None, cache, Lightweight).expect("model");
    for t in 0..10u32 {
        m.set_threads(1 + (t as usize % 3));
        assert!(bits(m.forward(t)) == want[t as usize], "step {t}");
    }
    // Models with workers dropped in the middle of their runs.
    for _ in 0..10 {
        let mut m =
            Llama::new(c.clone(), weights.clone(), None, cache, Lightweight).expect("model");
        m.set_threads(3);
        m.forward(1);
        drop(m);
    }
}
