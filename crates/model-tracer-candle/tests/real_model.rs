//! The candle model on the real SmolLM2-135M-Instruct file, against the
//! reference decoder.

use model_tracer::{
    BrickId, Disabled, Full, ModelTracer, QuantSampling, QuantType, Stage, TraceOptions,
};
use model_tracer_candle::CandleLlama;
use model_tracer_llama::model::Llama;
use model_tracer_test_support::real_model;

/// "The capital of France is", as the project's tokenizer encodes it.
const PARIS_PROMPT: [u32; 5] = [504, 3575, 282, 4649, 314];
/// llama.cpp's greedy continuation of the prompt on this file.
const LLAMA_CPP_CONTINUATION: [u32; 6] = [7042, 30, 198, 198, 504, 1797];

/// Top-2 margin of `logits`: the best logit minus the second best.
fn top2_margin(logits: &[f32]) -> f32 {
    let mut best = (f32::NEG_INFINITY, f32::NEG_INFINITY);
    for &v in logits {
        if v > best.0 {
            best = (v, best.0);
        } else if v > best.1 {
            best.1 = v;
        }
    }
    best.0 - best.1
}

#[test]
fn greedy_tokens_follow_llama_cpp_or_part_only_at_a_near_tie() {
    let Some(path) = real_model() else {
        return;
    };
    let mut candle = CandleLlama::from_gguf(&path, Some(64), Disabled).unwrap();
    let tok = candle.tokenizer.as_ref().unwrap();
    assert_eq!(tok.encode("The capital of France is"), PARIS_PROMPT);
    let got = candle
        .generate(&PARIS_PROMPT, LLAMA_CPP_CONTINUATION.len(), |_| {})
        .unwrap();
    assert_eq!(
        got[0], 7042,
        "greedy next token must be \" Paris\": {got:?}"
    );
    // Where the candle tokens leave llama.cpp's, the reference decoder,
    // fed the same context, must see a near-tie.
    let mut reference = Llama::from_gguf(&path, None, Disabled).unwrap();
    reference.prefill(&PARIS_PROMPT);
    for (i, (&g, &expected)) in got.iter().zip(&LLAMA_CPP_CONTINUATION).enumerate() {
        if g != expected {
            let margin = top2_margin(reference.logits());
            assert!(
                margin < 0.25,
                "token {i}: candle chose {g}, llama.cpp {expected}, reference margin {margin}"
            );
            eprintln!("token {i}: candle {g}, llama.cpp {expected}, near-tie of margin {margin}");
            break;
        }
        reference.forward(g);
    }
    eprintln!("candle greedy tokens: {got:?}");

    // Traced, the prompt is the same batched forward: the same tokens.
    let mut traced = CandleLlama::from_gguf(&path, Some(64), Full).unwrap();
    let tokens = traced
        .generate(&PARIS_PROMPT, LLAMA_CPP_CONTINUATION.len(), |_| {})
        .unwrap();
    assert_eq!(tokens, got);
    assert_eq!(
        traced.tracer().forwards().count(),
        PARIS_PROMPT.len() + tokens.len() - 1
    );
}

#[test]
fn full_tracing_of_the_batched_prompt_records_every_position_and_computes_what_an_untraced_run_does(
) {
    let Some(path) = real_model() else {
        return;
    };
    let mut plain = CandleLlama::from_gguf(&path, Some(64), Disabled).unwrap();
    let untraced = plain.forward(&PARIS_PROMPT).unwrap();
    assert_eq!(plain.cache().len(), PARIS_PROMPT.len());

    let mut m = CandleLlama::from_gguf(&path, Some(64), Full).unwrap();
    let options = TraceOptions {
        max_forwards: 64,
        ..TraceOptions::default()
    };
    *m.tracer_mut() = ModelTracer::with_options(Full, options);
    m.tracer_mut().set_quant_sampling(QuantSampling::Every);
    let traced = m.forward(&PARIS_PROMPT).unwrap();
    let c = m.config.clone();

    // One forward of five rows: a record per position, each with every
    // system's records; the logits, their statistics, the lens and the
    // LM head's quantization error only at the last row (`LogitRows::Last`).
    let forwards: Vec<_> = m.tracer().forwards().collect();
    assert_eq!(forwards.len(), PARIS_PROMPT.len());
    for (i, f) in forwards.iter().enumerate() {
        let last = i + 1 == PARIS_PROMPT.len();
        assert_eq!((f.position, f.token), (i, Some(PARIS_PROMPT[i])));
        let a = &f.activations;
        assert_eq!(
            a.recorded().count(),
            1 + 6 * c.n_layers + 1 + usize::from(last)
        );
        for layer in &a.layers {
            for s in [
                Stage::Input,
                Stage::PostNorm,
                Stage::PostAttn,
                Stage::PostFfnNorm,
                Stage::PostFfn,
                Stage::Output,
            ] {
                assert_eq!(layer.stats(s).unwrap().count, c.dim, "{s}");
            }
            assert!(layer.residual_ratio > 0.0 && layer.residual_ratio < 1.0);
        }
        assert_eq!(a.final_norm_stats.count, c.dim);
        assert_eq!(a.logits_stats.count, if last { c.vocab_size } else { 0 });
        assert_eq!(f.attention.len(), c.n_layers * c.n_heads);
        for t in &f.attention {
            assert_eq!((t.query_pos, t.context_len), (i, i + 1));
            let mass: f32 = t.top_k_weights.iter().sum::<f32>() + t.tail_mass;
            assert!((mass - 1.0).abs() < 1e-4, "{t:?}");
        }
        assert_eq!(f.logits.is_some(), last, "position {i}");
        if let Some(lens) = &f.logits {
            for tok in &lens.tokens {
                assert_eq!(tok.layers, (0..c.n_layers).collect::<Vec<_>>());
            }
        }
        let q = &f.quantization;
        assert_eq!(q.traces.len(), 5 * c.n_layers + usize::from(last));
        for b in [
            BrickId::QkvProjection,
            BrickId::AttentionOutput,
            BrickId::FfnGate,
            BrickId::FfnUp,
            BrickId::FfnDown,
        ] {
            let layers: Vec<usize> = q
                .traces
                .iter()
                .filter(|t| t.brick == b)
                .map(|t| t.layer_idx)
                .collect();
            assert_eq!(layers, (0..c.n_layers).collect::<Vec<_>>(), "{b}");
        }
        for t in &q.traces {
            let expected = if t.brick == BrickId::LmHead {
                QuantType::Q8_0
            } else {
                QuantType::Q4_1
            };
            assert_eq!(t.quant_type, expected);
            // 4-bit weights times 8-bit activations against f32: close, not equal.
            assert!(
                t.cosine_similarity > 0.99 && t.cosine_similarity < 1.0,
                "{t:?}"
            );
        }
        let kv = f.kv_cache.unwrap();
        assert_eq!(
            (
                kv.step,
                kv.valid_positions,
                kv.reused_positions,
                kv.computed_positions
            ),
            (i, i + 1, i, 1)
        );
    }
    // The last position's greedy choice, its lens ending at rank 0.
    let lens = forwards[4].logits.as_ref().unwrap();
    assert_eq!(lens.selected_token, Some(7042));
    assert_eq!(lens.token(7042).unwrap().final_rank(), Some(0));

    // Traced and untraced, the prompt is the same batched forward: the
    // same logits to the bit.
    assert_eq!(traced, untraced);
    assert_eq!(model_tracer::stats::argmax(&untraced), Some(7042));
}

#[test]
fn bad_token_ids_and_a_full_cache_are_errors() {
    let Some(path) = real_model() else {
        return;
    };
    let mut m = CandleLlama::from_gguf(&path, Some(4), Disabled).unwrap();
    assert!(matches!(
        m.forward(&[49152]),
        Err(model_tracer_candle::CandleError::Token { id: 49152, .. })
    ));
    assert!(matches!(
        m.forward(&PARIS_PROMPT),
        Err(model_tracer_candle::CandleError::ContextFull {
            capacity: 4,
            needed: 5
        })
    ));
    assert!(m.cache().is_empty());
    assert_eq!(m.forward(&PARIS_PROMPT[..4]).unwrap().len(), 49152);
    assert_eq!(m.cache().len(), 4);
}

/// Batched and position by position, the f32 products give the same logits
/// up to the order of the sums. The quantized products quantize each
/// product's input to 8 bits, where a last-bit difference can flip a
/// rounding, which moves a product by a whole quantization step: on this
/// 27-token chat prompt the two orders' quantized logits differ by up to
/// 1.15 and choose different first tokens.
#[test]
fn the_batched_prompt_and_one_position_per_forward_agree_on_the_f32_path() {
    let Some(path) = real_model() else {
        return;
    };
    let mut m = CandleLlama::from_gguf(&path, Some(64), Disabled).unwrap();
    m.set_exact(true).unwrap();
    let tok = m.tokenizer.as_ref().unwrap();
    let chat = tok.encode(
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n\
         <|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    );
    assert_eq!(chat.len(), 27);
    let batched = m.forward(&chat).unwrap();
    m.clear_kv_cache();
    let mut single = Vec::new();
    for &t in &chat {
        single = m.forward(&[t]).unwrap();
    }
    let max_diff = batched
        .iter()
        .zip(&single)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    eprintln!("f32 path, 27 positions: largest logit difference {max_diff:e}");
    assert!(max_diff < 1e-3, "{max_diff}");
    assert_eq!(
        model_tracer::stats::argmax(&batched),
        model_tracer::stats::argmax(&single)
    );

    // The quantized path, measured (which token each order chooses on the
    // chat prompt hangs on roundings, which the CPU's kernels may move: it
    // is printed, not asserted).
    m.set_exact(false).unwrap();
    let batched = m.forward(&chat).unwrap();
    m.clear_kv_cache();
    for &t in &chat {
        single = m.forward(&[t]).unwrap();
    }
    let max_diff = batched
        .iter()
        .zip(&single)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    eprintln!(
        "quantized path, 27 positions: largest logit difference {max_diff:e}, \
         first answer token {:?} batched, {:?} one position per forward",
        model_tracer::stats::argmax(&batched),
        model_tracer::stats::argmax(&single)
    );
    assert!(max_diff.is_finite(), "{max_diff}");

    // And on the 5-token prompt.
    m.clear_kv_cache();
    let batched = m.forward(&PARIS_PROMPT).unwrap();
    m.clear_kv_cache();
    for &t in &PARIS_PROMPT {
        single = m.forward(&[t]).unwrap();
    }
    let max_diff = batched
        .iter()
        .zip(&single)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    eprintln!("quantized path, 5 positions: largest logit difference {max_diff:e}");
    assert_eq!(model_tracer::stats::argmax(&batched), Some(7042));
    assert_eq!(model_tracer::stats::argmax(&single), Some(7042));
}
