//! SmolLM2-135M-Instruct (llama architecture) through llama.cpp: the
//! greedy tokens of llama-cpp-python, every layer and stage the name
//! mapping promises, faults found where they were put.

mod common;

use model_tracer::{
    AnomalyKind, Disabled, ForwardTrace, Full, Lightweight, LogitRows, ModelTracer, Origin, Stage,
    TraceConfig, TraceOptions,
};
use model_tracer_llama::model::{Fault, FaultKind};
use model_tracer_llama_cpp::{ChatTemplate, LlamaCpp, LlamaCppOptions};

use common::PROMPT;

/// The prompt's ids, as llama-cpp-python 0.3.36 tokenizes them.
const PROMPT_IDS: [u32; 5] = [504, 3575, 282, 4649, 314];
/// llama-cpp-python 0.3.36's first 16 greedy tokens (" Paris.\n\nThe
/// United States has a population of approximately 311").
const GREEDY: [u32; 16] = [
    7042, 30, 198, 198, 504, 1797, 1918, 553, 253, 2155, 282, 4723, 216, 35, 33, 33,
];

/// llama-cpp-python makes its contexts with flash attention off, as a
/// model that traces attention must be: every config here runs the same
/// attention.
fn options() -> LlamaCppOptions {
    LlamaCppOptions {
        context: 512,
        flash_attention: Some(false),
        ..LlamaCppOptions::default()
    }
}

fn load<C: TraceConfig>(path: &str, config: C) -> LlamaCpp<C> {
    match LlamaCpp::load(path, options(), config) {
        Ok(m) => m,
        Err(e) => panic!("loading {path}: {e}"),
    }
}

/// llama-cpp-python's tokens where it is installed, else the ids it gave
/// on this file.
fn reference(path: &str) -> (Vec<u32>, Vec<u32>) {
    match common::llama_cpp_python(path, GREEDY.len()) {
        Some(r) => r,
        None => {
            eprintln!("llama-cpp-python is not installed: comparing with the ids it gave (0.3.36)");
            (PROMPT_IDS.to_vec(), GREEDY.to_vec())
        }
    }
}

#[test]
fn greedy_tokens_equal_llama_cpp_python_traced_or_not() {
    let Some(path) = common::smollm2() else {
        return;
    };
    let (ref_prompt, ref_tokens) = reference(&path);
    assert_eq!(&ref_tokens[..6], &[7042, 30, 198, 198, 504, 1797]);

    let mut off = load(&path, Disabled);
    let prompt = off.tokenize(PROMPT, true).unwrap_or_default();
    assert_eq!(
        prompt, ref_prompt,
        "llama.cpp's tokenizer, through the crate"
    );
    let tokens = off.generate(&prompt, ref_tokens.len(), |_| {});
    assert_eq!(tokens.as_deref(), Ok(&ref_tokens[..]), "Disabled");
    assert_eq!(off.observed_tensors(), 0, "Disabled registers no callback");
    assert_eq!(off.detokenize(&ref_tokens[..2]), " Paris.");

    let mut light = load(&path, Lightweight);
    let tokens = light.generate(&prompt, ref_tokens.len(), |_| {});
    assert_eq!(tokens.as_deref(), Ok(&ref_tokens[..]), "Lightweight");
    assert!(light.observed_tensors() > 0);
    let forwards: Vec<&ForwardTrace> = light.tracer().forwards().collect();
    assert_eq!(forwards.len(), prompt.len() + ref_tokens.len() - 1);
    assert!(forwards.iter().all(|f| f.attention.is_empty()));

    let mut full = load(&path, Full);
    let tokens = full.generate(&prompt, ref_tokens.len(), |_| {});
    assert_eq!(tokens.as_deref(), Ok(&ref_tokens[..]), "Full");
}

#[test]
fn an_f32_cache_holds_twice_the_bytes_and_tips_the_near_tie() {
    let Some(path) = common::smollm2() else {
        return;
    };
    let (mut bytes, mut sixth) = (Vec::new(), Vec::new());
    for f32_cache in [false, true] {
        let options = LlamaCppOptions {
            f32_cache,
            ..options()
        };
        let mut m = match LlamaCpp::load(&path, options, Lightweight) {
            Ok(m) => m,
            Err(e) => panic!("loading {path} (f32 cache {f32_cache}): {e}"),
        };
        let prompt = m.tokenize(PROMPT, true).unwrap_or_default();
        let tokens = m.generate(&prompt, 6, |_| {}).unwrap_or_default();
        assert_eq!(tokens[..5], GREEDY[..5], "f32 cache {f32_cache}");
        sixth.push(tokens[5]);
        let last = m.tracer().forwards().last().map(|f| f.kv_cache);
        bytes.push(last.flatten().map_or(0, |k| k.cache_size_bytes));
    }
    assert!(bytes[0] > 0 && bytes[1] == 2 * bytes[0], "{bytes:?}");
    // The sixth token is a near-tie (its two best within a few hundredths
    // of a logit): llama.cpp's f16 cache gives llama-cpp-python's 1797,
    // the f32 cache tips it to 2988; that the cache type reaches llama.cpp
    // shows in the tokens.
    assert_eq!(sixth, [GREEDY[5], 2988]);
}

#[test]
fn flash_attention_is_turned_off_only_to_trace_attention() {
    let Some(path) = common::smollm2() else {
        return;
    };
    let own = LlamaCppOptions {
        context: 512,
        ..LlamaCppOptions::default()
    };
    let light = LlamaCpp::load(&path, own.clone(), Lightweight);
    assert!(
        light.is_ok_and(|m| !m.flash_attention_off()),
        "llama.cpp's own choice"
    );
    let full = LlamaCpp::load(&path, own, Full);
    assert!(
        full.is_ok_and(|m| m.flash_attention_off()),
        "attention traced"
    );
}

/// The stages a position of a prompt's batch records in layer `l`: every
/// stage, except in the last layer of a row that is not an output, whose
/// FFN llama.cpp does not compute.
fn expected_stages(l: usize, output_row: bool) -> Vec<Stage> {
    if l == 29 && !output_row {
        vec![Stage::Input, Stage::PostNorm, Stage::PostAttn]
    } else {
        Stage::LAYER_STAGES.to_vec()
    }
}

fn recorded_stages(f: &ForwardTrace, l: usize) -> Vec<Stage> {
    Stage::LAYER_STAGES
        .into_iter()
        .filter(|&s| f.activations.stats(l, s).is_some_and(|st| st.count > 0))
        .collect()
}

#[test]
fn full_trace_has_every_layer_and_stage_the_mapping_promises() {
    let Some(path) = common::smollm2() else {
        return;
    };
    let mut m = load(&path, Full);
    *m.tracer_mut() = ModelTracer::with_options(
        Full,
        TraceOptions {
            max_forwards: 64,
            ..TraceOptions::default()
        },
    );
    let tokens = m.generate(&PROMPT_IDS, 3, |_| {}).unwrap_or_default();
    assert_eq!(tokens, &GREEDY[..3]);
    let forwards: Vec<&ForwardTrace> = m.tracer().forwards().collect();
    assert_eq!(forwards.len(), 7, "5 prompt positions and 2 decode steps");
    for (p, f) in forwards.iter().enumerate() {
        assert_eq!(f.position, p);
        let all_ids = [&PROMPT_IDS[..], &tokens[..]].concat();
        assert_eq!(f.token, Some(all_ids[p]));
        let output_row = p >= 4;
        assert_eq!(f.activations.layers.len(), 30, "position {p}");
        for l in 0..30 {
            assert_eq!(
                recorded_stages(f, l),
                expected_stages(l, output_row),
                "position {p}, layer {l}"
            );
            assert_eq!(
                f.activations.stats(l, Stage::Input).map(|s| s.count),
                Some(576)
            );
        }
        assert_eq!(f.activations.embedding_stats.count, 576);
        // The residual ratio is measured where the layer is complete.
        let ratio = f.activations.layers[10].residual_ratio;
        assert!(ratio > 0.0 && ratio < 1.0, "position {p}: ratio {ratio}");
        // 9 heads × 30 layers, each query over its p + 1 positions.
        assert_eq!(f.attention.len(), 270, "position {p}");
        for a in &f.attention {
            assert_eq!(a.query_pos, p);
            assert_eq!(a.context_len, p + 1);
            assert!(a.top_k_weights.iter().all(|w| w.is_finite() && *w >= 0.0));
        }
        let kv = f.kv_cache.as_ref();
        assert_eq!(kv.map(|k| (k.step, k.valid_positions)), Some((p, p + 1)));
        assert_eq!(kv.map(|k| k.max_positions), Some(512));
        // 30 layers × 3 KV heads × (64 + 64) × 2 bytes per position.
        assert_eq!(
            kv.map(|k| k.cache_size_bytes),
            Some((p + 1) * 30 * 3 * 128 * 2)
        );
        if output_row {
            assert_eq!(f.activations.final_norm_stats.count, 576);
            assert_eq!(f.activations.logits_stats.count, 49152);
            let logits = f.logits.as_ref().expect("an output row has logits");
            assert_eq!(logits.selected_token, Some(tokens[p - 4]));
            let chosen = logits
                .tokens
                .iter()
                .find(|t| t.token_id == tokens[p - 4])
                .expect("the chosen token is tracked");
            assert_eq!(chosen.layers, (0..30).collect::<Vec<_>>());
            // The lens of the last layer is the final norm and the LM head
            // on llama.cpp's l_out-29, in the crate's own product: it
            // agrees with llama.cpp's logits on the winner.
            assert_eq!(chosen.ranks[29], 0, "position {p}: lens at layer 29");
        } else {
            assert_eq!(f.activations.final_norm_stats.count, 0);
            assert_eq!(f.activations.logits_stats.count, 0);
            assert!(f.logits.is_none());
        }
        assert!(f.anomalies.iter().all(|a| !matches!(
            a.kind,
            AnomalyKind::NaN | AnomalyKind::Inf | AnomalyKind::Explosion
        )));
    }
    // " Paris" wins from some layer on at the last prompt position.
    let lens = forwards[4].logits.as_ref().map(|l| &l.tokens);
    let paris = lens.and_then(|t| t.iter().find(|t| t.token_id == 7042));
    assert!(
        paris.is_some_and(|t| t.ranks[0] > 0),
        "not the winner before layer 0"
    );
}

#[test]
fn every_row_an_output_records_every_stage_of_every_position() {
    let Some(path) = common::smollm2() else {
        return;
    };
    let mut m = load(&path, Lightweight);
    *m.tracer_mut() = ModelTracer::with_options(
        Lightweight,
        TraceOptions {
            logit_rows: LogitRows::Every,
            ..TraceOptions::default()
        },
    );
    let tokens = m.generate(&PROMPT_IDS, 2, |_| {}).unwrap_or_default();
    assert_eq!(tokens, &GREEDY[..2]);
    let forwards: Vec<&ForwardTrace> = m.tracer().forwards().collect();
    assert_eq!(forwards.len(), 6);
    for f in &forwards {
        for l in 0..30 {
            assert_eq!(recorded_stages(f, l), Stage::LAYER_STAGES.to_vec());
        }
        assert_eq!(f.activations.logits_stats.count, 49152);
        assert_eq!(f.activations.final_norm_stats.count, 576);
    }
}

#[test]
fn the_last_row_records_what_every_row_records_at_the_same_position() {
    // The last prompt position, recorded apart from the others (the split
    // decode), against the same position with every row an output.
    let Some(path) = common::smollm2() else {
        return;
    };
    let last_row = |rows: LogitRows| {
        let mut m = load(&path, Lightweight);
        *m.tracer_mut() = ModelTracer::with_options(
            Lightweight,
            TraceOptions {
                logit_rows: rows,
                ..TraceOptions::default()
            },
        );
        let _ = m.forward(&PROMPT_IDS);
        m.tracer().last_forward().cloned()
    };
    let (split, every) = (last_row(LogitRows::Last), last_row(LogitRows::Every));
    let (Some(split), Some(every)) = (split, every) else {
        panic!("no forward recorded");
    };
    assert_eq!(split.position, 4);
    assert_eq!(every.position, 4);
    for l in 0..30 {
        for s in Stage::LAYER_STAGES {
            let (a, b) = (split.activations.stats(l, s), every.activations.stats(l, s));
            let (Some(a), Some(b)) = (a, b) else {
                panic!("layer {l} {s:?} missing");
            };
            // The same rows of the same graph, up to the LM head's work on
            // the other rows: the matmuls of the last layer run on 1 row or
            // on 5, which may change their summation order.
            let close = |x: f32, y: f32| (x - y).abs() <= 1e-3 * (1.0 + x.abs().max(y.abs()));
            assert!(
                close(a.l2_norm, b.l2_norm),
                "layer {l} {s:?}: {a:?} / {b:?}"
            );
            assert!(close(a.mean, b.mean), "layer {l} {s:?}");
        }
    }
}

#[test]
fn an_injected_nan_is_found_at_its_layer_and_stage_and_flows_on() {
    let Some(path) = common::smollm2() else {
        return;
    };
    let mut m = load(&path, Lightweight);
    m.set_fault(Some(Fault {
        kind: FaultKind::NaN,
        layer: 7,
        position: None,
    }));
    assert!(m
        .forward(&PROMPT_IDS)
        .is_ok_and(|logits| logits.iter().all(|v| v.is_nan())));
    let forwards: Vec<&ForwardTrace> = m.tracer().forwards().collect();
    assert_eq!(forwards.len(), 5);
    for f in forwards {
        let nan = f.anomalies.iter().find(|a| a.kind == AnomalyKind::NaN);
        let nan = nan.unwrap_or_else(|| panic!("position {}: no NaN found", f.position));
        assert_eq!((nan.layer, nan.stage), (Some(7), Stage::PostAttn));
        assert_eq!(nan.origin, Origin::Produced);
        // Written into llama.cpp's tensor, the NaN reaches the layer's
        // output and the layers after it.
        let out = f.activations.stats(7, Stage::Output);
        assert!(out.is_some_and(|s| s.nan_count > 0));
        assert!(f
            .activations
            .stats(6, Stage::Output)
            .is_some_and(|s| s.nan_count == 0));
    }
}

#[test]
fn a_perturbed_copy_is_found_at_its_layer_and_stage_alone() {
    let Some(path) = common::smollm2() else {
        return;
    };
    let mut m = load(&path, Lightweight);
    m.set_perturbation(Some(("l_out-7".into(), |x: &mut [f32]| x[3] = f32::NAN)));
    let tokens = m.generate(&PROMPT_IDS, 2, |_| {}).unwrap_or_default();
    assert_eq!(tokens, &GREEDY[..2], "llama.cpp's own tensor is untouched");
    let forwards: Vec<&ForwardTrace> = m.tracer().forwards().collect();
    // The copy of l_out-7 holds all the batch's rows: the NaN lands in
    // row 0 of the prompt's batch, then in each decode step's only row.
    let with_nan: Vec<usize> = forwards
        .iter()
        .filter(|f| f.anomalies.iter().any(|a| a.kind == AnomalyKind::NaN))
        .map(|f| f.position)
        .collect();
    assert_eq!(with_nan, vec![0, 5]);
    for p in [0, 5] {
        let f = forwards[p];
        let nan = f.anomalies.iter().find(|a| a.kind == AnomalyKind::NaN);
        let nan = nan.map(|a| (a.layer, a.stage, a.origin));
        assert_eq!(
            nan,
            Some((Some(7), Stage::Output, Origin::Produced)),
            "position {p}"
        );
    }
}

#[test]
fn bad_input_gets_an_error() {
    let Some(path) = common::smollm2() else {
        return;
    };
    assert!(LlamaCpp::load("/no/such/file.gguf", options(), Disabled).is_err());
    assert!(LlamaCpp::load("bad\0path", options(), Disabled).is_err());
    let zero = LlamaCppOptions {
        batch: 0,
        ..options()
    };
    assert!(LlamaCpp::load(&path, zero, Disabled).is_err());
    let mut m = load(&path, Lightweight);
    assert!(m.forward(&[]).is_err());
    assert!(m.forward(&[49152]).is_err());
    assert!(
        m.generate(&PROMPT_IDS, 600, |_| {}).is_err(),
        "past the context"
    );
    assert_eq!(m.token_text(u32::MAX), format!("<{}>", u32::MAX));
    // The model still runs after the refusals.
    assert_eq!(m.generate(&PROMPT_IDS, 1, |_| {}), Ok(vec![GREEDY[0]]));
}

#[test]
fn a_chat_is_rendered_with_the_files_own_chatml_template() {
    let Some(path) = common::smollm2() else {
        return;
    };
    let m = load(&path, Disabled);
    assert!(matches!(
        m.chat_template(),
        Some(ChatTemplate::Model(t)) if t.contains("<|im_start|>")
    ));
    let chat = [("system", "Be brief."), ("user", "Hi")];
    let text = m.apply_chat_template(&chat, true).unwrap_or_default();
    assert_eq!(
        text,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
         <|im_start|>assistant\n"
    );
    let ids = m.tokenize_special(&text, true).unwrap_or_default();
    // No BOS for SmolLM2; <|im_start|> (1) and <|im_end|> (2) as tokens.
    assert_eq!(ids.first(), Some(&1));
    assert_eq!(ids.iter().filter(|&&t| t == 1).count(), 3);
    assert_eq!(ids.iter().filter(|&&t| t == 2).count(), 2);
    assert_eq!(m.detokenize(&ids), text);
    assert_eq!(m.tokenize_special(PROMPT, true), Ok(PROMPT_IDS.to_vec()));
}
