//! Batched prefill: a prompt run in chunks of positions gives, bit for bit,
//! the logits, cache and tokens of the same prompt run one position at a time.

mod common;

use model_tracer::{Disabled, TraceConfig};
use model_tracer_llama::dtype::GgmlType;
use model_tracer_llama::model::{synthetic_weights, Config, KvCacheOptions, KvType, Llama};

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|f| f.to_bits()).collect()
}

fn tiny<C: TraceConfig>(trace: C, ty: GgmlType, capacity: usize, sinks: usize) -> Llama<C> {
    tiny_of(trace, ty, capacity, sinks, KvType::F32)
}

fn tiny_of<C: TraceConfig>(
    trace: C,
    ty: GgmlType,
    capacity: usize,
    sinks: usize,
    kv_type: KvType,
) -> Llama<C> {
    let c = Config::tiny();
    let w = match synthetic_weights(&c, ty, 9) {
        Ok(w) => w,
        Err(e) => panic!("synthetic weights: {e}"),
    };
    let cache = KvCacheOptions {
        capacity,
        sinks,
        kv_type,
    };
    match Llama::new(c, w, None, cache, trace) {
        Ok(m) => m,
        Err(e) => panic!("model: {e}"),
    }
}

/// A prompt of `n` tokens, every id of the tiny vocabulary likely, one
/// out-of-vocabulary id (read as token 0 by both paths).
fn prompt(n: usize) -> Vec<u32> {
    (0..n as u32)
        .map(|i| {
            if i == 5 {
                9999
            } else {
                (i * 2_654_435_761u32) % 512
            }
        })
        .collect()
}

/// Runs `tokens` by chunks of `chunk` and position by position, then
/// `decode` generated steps after each, and compares every logit bit.
fn assert_chunks_equal_positions(
    ty: GgmlType,
    capacity: usize,
    sinks: usize,
    exact: bool,
    chunk: usize,
    tokens: &[u32],
) {
    assert_chunks_equal_positions_of(ty, (capacity, sinks, KvType::F32), exact, chunk, tokens);
}

fn assert_chunks_equal_positions_of(
    ty: GgmlType,
    (capacity, sinks, kv_type): (usize, usize, KvType),
    exact: bool,
    chunk: usize,
    tokens: &[u32],
) {
    let mut one = tiny_of(Disabled, ty, capacity, sinks, kv_type);
    let mut many = tiny_of(Disabled, ty, capacity, sinks, kv_type);
    one.set_exact(exact);
    many.set_exact(exact);
    one.set_prefill_chunk(1);
    many.set_prefill_chunk(chunk);
    let what = format!(
        "{ty} cache {capacity}/{sinks} {kv_type:?} exact {exact} chunk {chunk}, {} tokens",
        tokens.len()
    );
    let a = one.generate(tokens, 4, |_| {});
    let b = many.generate(tokens, 4, |_| {});
    assert_eq!(a, b, "{what}: generations");
    assert_eq!(
        bits(one.logits()),
        bits(many.logits()),
        "{what}: last logits"
    );
    let (pa, pb): (Vec<usize>, Vec<usize>) = (
        one.cache().positions().collect(),
        many.cache().positions().collect(),
    );
    assert_eq!(pa, pb, "{what}: cached positions");
    assert_eq!(
        one.cache().total_evictions(),
        many.cache().total_evictions(),
        "{what}"
    );
}

#[test]
fn chunked_prefill_gives_the_logits_of_one_position_at_a_time() {
    for ty in [GgmlType::Q8_0, GgmlType::Q4_1, GgmlType::Q4_0] {
        for chunk in [2, 3, 8, 64] {
            for n in [1, 2, 7, 9, 40] {
                assert_chunks_equal_positions(ty, 1024, 4, false, chunk, &prompt(n));
            }
        }
    }
}

#[test]
fn chunked_prefill_is_exact_on_the_f32_path_too() {
    for chunk in [3, 16] {
        for n in [5, 33] {
            assert_chunks_equal_positions(GgmlType::Q4_1, 1024, 4, true, chunk, &prompt(n));
        }
    }
}

#[test]
fn chunked_prefill_evicts_like_one_position_at_a_time() {
    // Caches smaller than the prompt: rows of a chunk evict cached
    // positions, never one another; sinks stay.
    for (capacity, sinks) in [(16, 4), (8, 2), (12, 0), (5, 4)] {
        for chunk in [2, 5, 64] {
            for n in [10, 17, 40] {
                assert_chunks_equal_positions(
                    GgmlType::Q8_0,
                    capacity,
                    sinks,
                    false,
                    chunk,
                    &prompt(n),
                );
            }
        }
    }
}

#[test]
fn an_f16_cache_prefills_in_chunks_as_one_position_at_a_time() {
    for (capacity, sinks) in [(1024, 4), (16, 4), (5, 4), (12, 0)] {
        for chunk in [3, 64] {
            for n in [9, 40] {
                let cache = (capacity, sinks, KvType::F16);
                assert_chunks_equal_positions_of(GgmlType::Q8_0, cache, false, chunk, &prompt(n));
            }
        }
    }
    assert_chunks_equal_positions_of(GgmlType::Q4_1, (1024, 4, KvType::F16), true, 8, &prompt(20));
}

#[test]
fn an_f16_cache_holds_rounded_keys_and_values_in_half_the_bytes() {
    let mut f32s = tiny_of(Disabled, GgmlType::Q8_0, 64, 4, KvType::F32);
    let mut f16s = tiny_of(Disabled, GgmlType::Q8_0, 64, 4, KvType::F16);
    assert_eq!(f16s.cache().kv_type(), KvType::F16);
    let tokens = prompt(12);
    f32s.forward_chunks(&tokens);
    f16s.forward_chunks(&tokens);
    let n_layers = Config::tiny().n_layers;
    assert_eq!(
        2 * f16s.cache().bytes_in_use(n_layers),
        f32s.cache().bytes_in_use(n_layers)
    );
    // position 0 sees only itself: its key and value are the f32 cache's,
    // rounded; later positions attend rounded keys, so they part
    let round = |v: Vec<f32>| -> Vec<u32> {
        v.iter()
            .map(|&x| {
                model_tracer_llama::quant::f16_to_f32(model_tracer_llama::quant::f32_to_f16(x))
                    .to_bits()
            })
            .collect()
    };
    for l in 0..n_layers {
        let (k32, k16) = (
            f32s.cache().key(l, 0).unwrap(),
            f16s.cache().key(l, 0).unwrap(),
        );
        let (v32, v16) = (
            f32s.cache().value(l, 0).unwrap(),
            f16s.cache().value(l, 0).unwrap(),
        );
        if l == 0 {
            assert_eq!(bits(&k16), round(k32.clone()), "layer 0 key");
            assert_eq!(bits(&v16), round(v32.clone()), "layer 0 value");
            assert_ne!(bits(&k16), bits(&k32), "rounding changed nothing");
        }
        assert_eq!(
            bits(&k16),
            round(k16.clone()),
            "layer {l}: keys are f16 values"
        );
        assert_eq!(
            bits(&v16),
            round(v16.clone()),
            "layer {l}: values are f16 values"
        );
    }
    assert_ne!(bits(f32s.logits()), bits(f16s.logits()));
    assert!(f16s.cache().value(n_layers, 0).is_none() && f16s.cache().key(0, 12).is_none());
}

#[test]
fn a_cached_prefix_is_reused_by_a_chunked_prefill() {
    let mut one = tiny(Disabled, GgmlType::Q8_0, 1024, 4);
    let mut many = tiny(Disabled, GgmlType::Q8_0, 1024, 4);
    one.set_prefill_chunk(1);
    many.set_prefill_chunk(6);
    // In-vocabulary ids only: the cache holds what was run (an unknown id
    // is cached as token 0, and would end the common prefix there).
    let first: Vec<u32> = prompt(11).iter().map(|&t| t % 512).collect();
    let ga = one.generate(&first, 3, |_| {});
    let gb = many.generate(&first, 3, |_| {});
    assert_eq!(ga, gb);
    let mut second = first.clone();
    second.extend(&gb.tokens);
    second.extend(prompt(20).iter().rev().map(|&t| t % 512));
    let ga = one.generate(&second, 3, |_| {});
    let gb = many.generate(&second, 3, |_| {});
    assert_eq!(gb.reused_prompt_positions, first.len() + 2);
    assert_eq!(gb.computed_prompt_positions, 21);
    assert_eq!(ga, gb);
    assert_eq!(bits(one.logits()), bits(many.logits()));
}

#[test]
fn smollm2_chunked_prefill_keeps_the_logits_and_the_tokens() {
    let Some(path) = common::real_model() else {
        return;
    };
    let mut one = Llama::from_gguf(&path, None, Disabled).unwrap();
    one.set_prefill_chunk(1);
    let tok = one.tokenizer.as_ref().unwrap();
    let paris = tok.encode("The capital of France is");
    let messages = [model_tracer_llama::tokenizer::ChatMessage::user(
        "What is the capital of France?",
    )];
    let chat = tok.encode(&tok.apply_chat_template(&messages, true).unwrap());
    let a: Vec<Vec<u32>> = [&paris, &chat]
        .iter()
        .map(|p| {
            one.clear_kv_cache();
            bits(one.forward_chunks(p))
        })
        .collect();
    let g1 = {
        one.clear_kv_cache();
        one.generate(&paris, 6, |_| {})
    };
    let mut many = one;
    for chunk in [5, 64] {
        many.set_prefill_chunk(chunk);
        for (p, want) in [&paris, &chat].iter().zip(&a) {
            many.clear_kv_cache();
            assert_eq!(&bits(many.forward_chunks(p)), want, "chunk {chunk}");
        }
        many.clear_kv_cache();
        let g = many.generate(&paris, 6, |_| {});
        assert_eq!(
            g.tokens,
            vec![7042, 30, 198, 198, 504, 1797],
            "chunk {chunk}"
        );
        assert_eq!(g, g1);
    }
}
