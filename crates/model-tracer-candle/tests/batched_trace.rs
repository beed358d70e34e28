//! The traced prompt as one batched forward, on the real
//! SmolLM2-135M-Instruct file: its per-position records against those of
//! the same prompt run one position per forward, and traced against
//! untraced generation.

use model_tracer::diff::{diff, Side, DEFAULT_TOLERANCE};
use model_tracer::{
    Disabled, ForwardTrace, Full, LogitRows, ModelTracer, QuantSampling, TraceOptions,
};
use model_tracer_candle::CandleLlama;
use model_tracer_test_support::real_model;

/// The chat prompt of `model-tracer run`: its default system prompt and
/// question in SmolLM2's template.
const CHAT: &str = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n\
                    <|im_start|>user\nWhat is the capital of France?<|im_end|>\n\
                    <|im_start|>assistant\n";

/// Every stage of every layer, and the embedding, final norm and logits.
const SITES: usize = 30 * 6 + 3;

fn options(logit_rows: LogitRows) -> TraceOptions {
    TraceOptions {
        max_forwards: 64,
        logit_rows,
        ..TraceOptions::default()
    }
}

/// A `Full` candle model on the f32 path, every quantization error measured.
fn traced_model(path: &std::path::Path, logit_rows: LogitRows) -> CandleLlama<Full> {
    let mut m = CandleLlama::from_gguf(path, Some(64), Full).unwrap();
    *m.tracer_mut() = ModelTracer::with_options(Full, options(logit_rows));
    m.tracer_mut().set_quant_sampling(QuantSampling::Every);
    m.set_exact(true).unwrap();
    m
}

fn chat_ids(m: &CandleLlama<impl model_tracer::TraceConfig>) -> Vec<u32> {
    let ids = m.tokenizer.as_ref().unwrap().encode(CHAT);
    assert_eq!(ids.len(), 27);
    ids
}

fn owned(m: &CandleLlama<Full>) -> Vec<ForwardTrace> {
    m.tracer().forwards().cloned().collect()
}

#[test]
fn the_batched_traced_prompt_records_what_one_position_per_forward_records() {
    let Some(path) = real_model() else {
        return;
    };
    // One forward of 27 rows, every row with its logits and lens.
    let mut batched = traced_model(&path, LogitRows::Every);
    let ids = chat_ids(&batched);
    let t = ids.len();
    let batched_logits = batched.forward(&ids).unwrap();
    assert_eq!(batched.cache().len(), t);
    let b = owned(&batched);

    // 27 forwards of one position.
    let mut single = traced_model(&path, LogitRows::Every);
    let mut single_logits = Vec::new();
    for &id in &ids {
        single_logits = single.forward(&[id]).unwrap();
    }
    let s = owned(&single);

    let c = batched.config.clone();
    assert_eq!((b.len(), s.len()), (t, t));
    for (i, (fb, fs)) in b.iter().zip(&s).enumerate() {
        // positions numbered right, each with its own token
        assert_eq!((fb.position, fb.token), (i, Some(ids[i])));
        assert_eq!((fs.position, fs.token), (i, Some(ids[i])));
        // every activation site, every head, the lens on every layer
        assert_eq!(fb.activations.recorded().count(), SITES, "position {i}");
        assert_eq!(fb.attention.len(), c.n_layers * c.n_heads);
        assert_eq!(fb.attention.len(), fs.attention.len());
        for (ab, a1) in fb.attention.iter().zip(&fs.attention) {
            assert_eq!(
                (ab.layer_idx, ab.head_idx, ab.query_pos, ab.context_len),
                (a1.layer_idx, a1.head_idx, i, i + 1)
            );
            assert!((ab.entropy - a1.entropy).abs() < 1e-4, "{ab:?} {a1:?}");
            assert!((ab.sink_weight - a1.sink_weight).abs() < 1e-4);
        }
        let (lb, l1) = (fb.logits.as_ref().unwrap(), fs.logits.as_ref().unwrap());
        assert_eq!(lb.selected_token, l1.selected_token, "position {i}");
        assert!(!lb.tokens.is_empty());
        for tok in &lb.tokens {
            assert_eq!(tok.layers, (0..c.n_layers).collect::<Vec<_>>());
            let other = l1.token(tok.token_id).unwrap();
            for (x, y) in tok.logits.iter().zip(&other.logits) {
                assert!((x - y).abs() < 1e-3, "lens of {} at {i}", tok.token_id);
            }
        }
        // every product's quantization error and the LM head's
        assert_eq!(fb.quantization.traces.len(), 5 * c.n_layers + 1);
        assert_eq!(fb.quantization.traces.len(), fs.quantization.traces.len());
        // one KV state per position, as its own forward records it
        assert_eq!(fb.kv_cache, fs.kv_cache, "position {i}");
        let kv = fb.kv_cache.unwrap();
        assert_eq!((kv.step, kv.valid_positions), (i, i + 1));
    }

    let report = diff(
        &Side::from_forwards("one position per forward", s.iter()),
        &Side::from_forwards("batched", b.iter()),
        DEFAULT_TOLERANCE,
    )
    .unwrap();
    let worst = report
        .sites
        .iter()
        .map(|s| s.max_error.0)
        .fold(0f32, f32::max);
    eprintln!(
        "batched traced prompt against one position per forward, f32 path: {} positions, \
         {} sites, largest error of a site {worst:e}",
        report.positions.len(),
        report.sites_compared
    );
    assert_eq!(report.positions, (0..t).collect::<Vec<_>>());
    assert!(report.only_a.is_empty() && report.only_b.is_empty());
    assert!(report.token_mismatches.is_empty());
    assert_eq!(report.sites_compared, SITES);
    assert_eq!(report.first_divergence, None);
    assert_eq!(report.top1_agreement.map(|f| f.0), Some(1.0));

    let max_diff = batched_logits
        .iter()
        .zip(&single_logits)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(max_diff < 1e-3, "{max_diff}");
}

#[test]
fn by_default_only_the_last_prompt_row_gets_logits_and_the_lens() {
    let Some(path) = real_model() else {
        return;
    };
    let mut m = traced_model(&path, LogitRows::Last);
    let ids = chat_ids(&m);
    let t = ids.len();
    m.forward(&ids).unwrap();
    m.forward(&[504]).unwrap();
    let c = m.config.clone();
    let forwards = owned(&m);
    assert_eq!(forwards.len(), t + 1);
    for (i, f) in forwards.iter().enumerate() {
        // the last prompt row and the decode step
        let logits = i + 1 >= t;
        assert_eq!(f.position, i);
        assert_eq!(
            f.activations.recorded().count(),
            SITES - usize::from(!logits),
            "position {i}"
        );
        assert_eq!(f.attention.len(), c.n_layers * c.n_heads);
        assert_eq!(f.logits.is_some(), logits, "position {i}");
        if let Some(lens) = &f.logits {
            assert!(!lens.tokens.is_empty());
            for tok in &lens.tokens {
                assert_eq!(tok.layers.len(), c.n_layers);
            }
        }
        assert_eq!(
            f.quantization.traces.len(),
            5 * c.n_layers + usize::from(logits)
        );
        let kv = f.kv_cache.unwrap();
        assert_eq!(
            (kv.step, kv.valid_positions, kv.computed_positions),
            (i, i + 1, 1)
        );
    }
    // One KV state per position in the session, in position order.
    let kv = m.tracer().kv_session().unwrap();
    assert_eq!(kv.total_steps, t + 1);
    assert_eq!(kv.total_computed, t + 1);
}

/// Traced and untraced, the prompt is one batched forward computed in the
/// same order: the quantized path answers the same tokens either way.
#[test]
fn traced_and_untraced_generation_answer_the_same_tokens_on_the_quantized_path() {
    let Some(path) = real_model() else {
        return;
    };
    let mut plain = CandleLlama::from_gguf(&path, Some(64), Disabled).unwrap();
    let ids = chat_ids(&plain);
    let untraced = plain.generate(&ids, 16, |_| {}).unwrap();

    let mut traced = CandleLlama::from_gguf(&path, Some(64), Full).unwrap();
    *traced.tracer_mut() = ModelTracer::with_options(Full, options(LogitRows::Last));
    let tokens = traced.generate(&ids, 16, |_| {}).unwrap();
    eprintln!("chat prompt, quantized path: {untraced:?}");
    assert!(!untraced.is_empty());
    assert_eq!(tokens, untraced);
    assert_eq!(
        traced.tracer().forwards().count(),
        ids.len() + tokens.len() - 1
    );
}
