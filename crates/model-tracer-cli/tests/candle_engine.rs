//! `model-tracer run --engine candle`, as a process: the LLaMA written on
//! candle traced with the same options and outputs as the reference
//! decoder, and compared with it by `model-tracer diff`.

use std::path::Path;
use std::process::{Command, Output};

use model_tracer_test_support as support;

fn scratch_dir(name: &str) -> std::path::PathBuf {
    support::scratch_dir(env!("CARGO_TARGET_TMPDIR"), name)
}

/// `model-tracer ARGS` in `cwd`, the candle pool on one thread (the
/// machines that run the tests are shared).
fn program(args: &[&str], cwd: &Path) -> Output {
    let bin = env!("CARGO_BIN_EXE_model-tracer");
    match Command::new(bin)
        .args(args)
        .env("CANDLE_NUM_THREADS", "1")
        .current_dir(cwd)
        .output()
    {
        Ok(o) => o,
        Err(e) => panic!("running model-tracer {args:?}: {e}"),
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn path_in(dir: &Path, name: &str) -> String {
    dir.join(name).to_string_lossy().into_owned()
}

#[test]
fn options_of_the_reference_decoder_alone_are_refused_before_the_model_loads() {
    let dir = scratch_dir("candle-refused");
    let json = path_in(&dir, "run.json");
    for (extra, named) in [
        (&["--synthetic", "tiny"][..], "--synthetic"),
        (&["--what-if", "q8_0"][..], "--what-if"),
    ] {
        let mut args = vec!["run", "--engine", "candle", "--json", &json];
        args.extend(extra);
        let out = program(&args, &dir);
        assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
        assert!(text(&out.stderr).contains(named), "{}", text(&out.stderr));
        assert!(!Path::new(&json).exists(), "{named} left a file");
    }
}

#[test]
fn candle_run_writes_every_output_of_the_real_model() {
    let Some(model) = support::real_model() else {
        return;
    };
    let model = model.to_string_lossy().into_owned();
    let dir = scratch_dir("candle-outputs");
    let [json, jsonl, html, dump] =
        ["run.json", "run.jsonl", "run.html", "run.safetensors"].map(|n| path_in(&dir, n));
    let out = program(
        &[
            "run",
            "--engine",
            "candle",
            "--gguf",
            &model,
            "--max-tokens",
            "8",
            "--json",
            &json,
            "--jsonl",
            &jsonl,
            "--html",
            &html,
            "--dump",
            &dump,
        ],
        &dir,
    );
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(stdout.contains("engine: candle"), "{stdout}");
    let read_json = |path: &str| -> serde_json::Value {
        std::fs::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    };
    let doc = read_json(&json);
    assert_eq!(doc["engine"], "candle");
    // Traced or not, the prompt is one batched forward computed in the
    // same order: the untraced run answers the same tokens.
    let off_json = path_in(&dir, "off.json");
    let out = program(
        &[
            "run",
            "--engine",
            "candle",
            "--gguf",
            &model,
            "--max-tokens",
            "8",
            "--trace",
            "off",
            "--json",
            &off_json,
        ],
        &dir,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let off = read_json(&off_json);
    assert!(off["forwards"].is_null(), "an untraced run has no records");
    assert_eq!(off["prompt_ids"], doc["prompt_ids"]);
    assert!(doc["generated_ids"].is_array());
    assert_eq!(off["generated_ids"], doc["generated_ids"]);
    let prompt = doc["prompt_ids"].as_array().map_or(0, Vec::len);
    let generated = doc["generated_ids"].as_array().map_or(0, Vec::len);
    assert_eq!(generated, 8);
    // The last generated token is not fed back.
    let forwards = prompt + generated - 1;
    assert_eq!(doc["forwards"].as_array().map_or(0, Vec::len), forwards);
    let lines = std::fs::read_to_string(&jsonl).unwrap_or_default();
    assert_eq!(
        lines.lines().filter(|l| l.contains("\"position\"")).count(),
        forwards
    );
    let page = std::fs::read_to_string(&html).unwrap_or_default();
    assert!(
        page.starts_with("<!DOCTYPE html>"),
        "{html} is no HTML page"
    );
    let dumped = match model_tracer::ActivationDump::read(&dump) {
        Ok(d) => d,
        Err(e) => panic!("{dump}: {e}"),
    };
    assert_eq!(dumped.len(), forwards);
    // Every position's logits, the prompt's included, as the reference
    // decoder's dump holds them (a position without logits would be a NaN
    // row).
    let logits = dumped.logits();
    assert_eq!(logits.as_ref().map(|l| l.rows()), Some(forwards));
    for t in 0..forwards {
        let row = logits.as_ref().and_then(|l| l.row(t)).unwrap_or(&[]);
        assert!(
            !row.is_empty() && row.iter().all(|x| x.is_finite()),
            "position {t} has no logits in the candle dump"
        );
    }
}

/// Runs `engine` on the real model with f32 products, streaming its
/// trace to `name` in `dir`.
fn exact_trace(dir: &Path, model: &str, engine: &str, name: &str, extra: &[&str]) -> String {
    let path = path_in(dir, name);
    let mut args = vec![
        "run",
        "--engine",
        engine,
        "--gguf",
        model,
        "--exact",
        "--prompt",
        "The capital of France is",
        "--max-tokens",
        "6",
        "--jsonl",
        &path,
    ];
    args.extend(extra);
    let out = program(&args, dir);
    assert!(out.status.success(), "{}", text(&out.stderr));
    path
}

#[test]
fn diff_of_candle_against_the_reference_is_clean_and_finds_a_planted_fault() {
    let Some(model) = support::real_model() else {
        return;
    };
    let model = model.to_string_lossy().into_owned();
    let dir = scratch_dir("candle-diff");
    let reference = exact_trace(&dir, &model, "reference", "reference.jsonl", &[]);
    let candle = exact_trace(&dir, &model, "candle", "candle.jsonl", &[]);
    let out = program(&["diff", &reference, &candle], &dir);
    let report = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{report}{}", text(&out.stderr));
    assert!(report.contains("no divergence"), "{report}");

    let faulty = exact_trace(
        &dir,
        &model,
        "candle",
        "faulty.jsonl",
        &["--inject", "scale@11:post_ffn"],
    );
    let out = program(&["diff", &reference, &faulty], &dir);
    let report = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{report}{}", text(&out.stderr));
    assert!(
        report.contains("first divergence: position 0, layer 11 post_ffn"),
        "{report}"
    );
}
