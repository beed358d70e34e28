//! Gemma 3 270M (Q4_K_M) through llama.cpp: llama-cpp-python's greedy
//! tokens, and a JSON Lines trace with one row per position holding every
//! one of its 18 layers.

mod common;

use std::collections::BTreeSet;

use model_tracer::{Disabled, Full, JsonlSink, ModelTracer, SinkHandle, Stage, TraceOptions};
use model_tracer_llama_cpp::{ChatTemplate, LlamaCpp, LlamaCppError, LlamaCppOptions};
use model_tracer_test_support as support;

use common::PROMPT;

/// The prompt's ids (with Gemma's `<bos>`, 2), as llama-cpp-python 0.3.36
/// tokenizes them.
const PROMPT_IDS: [u32; 6] = [2, 818, 5279, 529, 7001, 563];
/// llama-cpp-python 0.3.36's first 16 greedy tokens (" the capital of the
/// country of France. It is the largest city in France.").
const GREEDY: [u32; 16] = [
    506, 5279, 529, 506, 2891, 529, 7001, 236761, 1030, 563, 506, 7488, 3207, 528, 7001, 236761,
];

fn options() -> LlamaCppOptions {
    LlamaCppOptions {
        context: 512,
        flash_attention: Some(false),
        ..LlamaCppOptions::default()
    }
}

#[test]
fn greedy_tokens_equal_llama_cpp_python() {
    let Some(path) = common::gemma3() else {
        return;
    };
    let (ref_prompt, ref_tokens) =
        common::llama_cpp_python(&path, GREEDY.len()).unwrap_or_else(|| {
            eprintln!("llama-cpp-python is not installed: comparing with the ids it gave (0.3.36)");
            (PROMPT_IDS.to_vec(), GREEDY.to_vec())
        });
    let Ok(mut m) = LlamaCpp::load(&path, options(), Disabled) else {
        panic!("loading {path}");
    };
    assert_eq!(m.shape().arch, "gemma3");
    assert_eq!(m.shape().layers, 18);
    assert_eq!(m.shape().sliding_window, 512);
    let prompt = m.tokenize(PROMPT, true).unwrap_or_default();
    assert_eq!(prompt, ref_prompt);
    assert_eq!(
        m.generate(&prompt, ref_tokens.len(), |_| {}),
        Ok(ref_tokens)
    );
}

#[test]
fn full_jsonl_trace_has_a_row_per_position_with_all_18_layers() {
    let Some(path) = common::gemma3() else {
        return;
    };
    let Ok(mut m) = LlamaCpp::load(&path, options(), Full) else {
        panic!("loading {path}");
    };
    assert_eq!(m.arch_map().post_attn, "attn_post_norm");
    let dir = support::scratch_dir(env!("CARGO_TARGET_TMPDIR"), "gemma3-jsonl");
    let file_path = dir.join("trace.jsonl");
    let file = std::fs::File::create(&file_path).unwrap_or_else(|e| panic!("{e}"));
    *m.tracer_mut() = ModelTracer::with_options(
        Full,
        TraceOptions {
            max_forwards: 32,
            ..TraceOptions::default()
        },
    );
    m.tracer_mut().set_sink(Some(SinkHandle::new(JsonlSink::new(
        std::io::BufWriter::new(file),
    ))));
    let tokens = m.generate(&PROMPT_IDS, 4, |_| {}).unwrap_or_default();
    assert_eq!(tokens, &GREEDY[..4]);
    drop(m); // flushes nothing more: the sink flushed at every forward
    let text = std::fs::read_to_string(&file_path).unwrap_or_default();
    let rows: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(rows.len(), PROMPT_IDS.len() + 3, "one row per position");
    for (p, row) in rows.iter().enumerate() {
        assert_eq!(row["position"], p);
        let layers: Vec<Option<u64>> = row["act_layer"]
            .as_array()
            .map(|a| a.iter().map(serde_json::Value::as_u64).collect())
            .unwrap_or_default();
        let stages: Vec<&str> = row["act_stage"]
            .as_array()
            .map(|a| a.iter().filter_map(serde_json::Value::as_str).collect())
            .unwrap_or_default();
        let seen: BTreeSet<u64> = layers.iter().flatten().copied().collect();
        assert_eq!(seen, (0..18).collect(), "position {p}: every layer");
        let output_row = p >= PROMPT_IDS.len() - 1;
        for l in 0..18u64 {
            let n = layers.iter().filter(|&&x| x == Some(l)).count();
            // Gemma's graph takes the output rows before the attention's
            // post-norm: the other rows' last layer ends at post_norm.
            let expected = if l == 17 && !output_row { 2 } else { 6 };
            assert_eq!(n, expected, "position {p}, layer {l}: stages");
        }
        assert!(stages.contains(&Stage::Embedding.name()));
        assert_eq!(stages.contains(&Stage::Logits.name()), output_row);
        // 4 heads × 18 layers, every query over its p + 1 positions.
        let heads = row["attn_head"].as_array().map_or(0, Vec::len);
        assert_eq!(heads, 72, "position {p}");
        assert_eq!(row["kv_valid_positions"], p + 1);
        if output_row {
            let lens = row["lens_layer"].as_array().map_or(0, Vec::len);
            assert_eq!(lens % 18, 0);
            assert!(lens >= 18, "the lens on every layer");
            assert_eq!(row["selected_token"], GREEDY[p + 1 - PROMPT_IDS.len()]);
        }
    }
}

#[test]
fn a_chat_is_rendered_with_llama_cpps_gemma_template_and_tokenized_with_its_markers() {
    let Some(path) = common::gemma3() else {
        return;
    };
    let Ok(m) = LlamaCpp::load(&path, options(), Disabled) else {
        panic!("loading {path}");
    };
    // The base model's file has no template: the architecture's built-in.
    assert_eq!(
        m.chat_template(),
        Some(ChatTemplate::Builtin("gemma".into()))
    );
    let chat = [
        ("system", "Be brief."),
        ("user", "Hi"),
        ("assistant", "Hello"),
    ];
    let text = m.apply_chat_template(&chat, true).unwrap_or_default();
    assert_eq!(
        text,
        "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n\
         <start_of_turn>model\n"
    );
    let ids = m.tokenize_special(&text, true).unwrap_or_default();
    assert_eq!(ids[..2], [2, 105], "<bos> <start_of_turn>");
    assert_eq!(ids.iter().filter(|&&t| t == 105).count(), 3);
    assert_eq!(
        ids.iter().filter(|&&t| t == 106).count(),
        2,
        "<end_of_turn>"
    );
    assert_eq!(m.detokenize(&ids), format!("<bos>{text}"));
    // Unparsed, the markers are text.
    let plain = m.tokenize(&text, true).unwrap_or_default();
    assert!(plain.len() > ids.len() && !plain.contains(&105));
    assert!(matches!(
        m.apply_chat_template(&[("user", "a\0b")], true),
        Err(LlamaCppError::ChatTemplate(_))
    ));
}
