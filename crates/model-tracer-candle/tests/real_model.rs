//! The candle model on the real SmolLM2-135M-Instruct file, against the
//! reference decoder.

use model_tracer::Disabled;
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
}
