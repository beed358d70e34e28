//! `model-tracer run --engine llama.cpp` (with the `llama-cpp` feature), as
//! a process: llama.cpp traced with the program's options and outputs.

#![cfg(feature = "llama-cpp")]

use std::path::Path;
use std::process::{Command, Output};

use model_tracer_test_support as support;

fn program(args: &[&str], cwd: &Path) -> Output {
    let bin = env!("CARGO_BIN_EXE_model-tracer");
    match Command::new(bin).args(args).current_dir(cwd).output() {
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

fn json(path: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// llama-cpp-python 0.3.36's first greedy tokens after "The capital of
/// France is" on SmolLM2-135M-Instruct.
const GREEDY: [u64; 6] = [7042, 30, 198, 198, 504, 1797];

#[test]
fn llama_cpp_run_writes_every_output_and_generates_llama_cpp_pythons_tokens() {
    let Some(model) = support::real_model() else {
        return;
    };
    let model = model.to_string_lossy().into_owned();
    let dir = support::scratch_dir(env!("CARGO_TARGET_TMPDIR"), "llama-cpp-outputs");
    let [full, off, jsonl, html, dump] = [
        "full.json",
        "off.json",
        "run.jsonl",
        "run.html",
        "run.safetensors",
    ]
    .map(|n| path_in(&dir, n));
    let base = [
        "run",
        "--engine",
        "llama.cpp",
        "--gguf",
        &model,
        "--prompt",
        "The capital of France is",
        "--max-tokens",
        "6",
    ];
    let mut args = base.to_vec();
    args.extend([
        "--json", &full, "--jsonl", &jsonl, "--html", &html, "--dump", &dump,
    ]);
    let out = program(&args, &dir);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("engine: llama.cpp"), "{stdout}");
    let doc = json(&full);
    assert_eq!(doc["engine"], "llama.cpp");
    assert_eq!(
        doc["prompt_ids"],
        serde_json::json!([504, 3575, 282, 4649, 314])
    );
    assert_eq!(doc["generated_ids"], serde_json::json!(GREEDY));
    assert_eq!(doc["model"]["layers"], 30);
    let forwards = doc["forwards"].as_array().map_or(0, Vec::len);
    assert_eq!(forwards, 10, "5 prompt positions and 5 decode steps");
    let rows = std::fs::read_to_string(&jsonl).unwrap_or_default();
    assert_eq!(rows.lines().count(), 10);
    let page = std::fs::read_to_string(&html).unwrap_or_default();
    assert!(page.contains("<html") && page.len() > 10_000);
    assert!(std::fs::metadata(&dump).is_ok_and(|m| m.len() > 100_000));

    let mut args = base.to_vec();
    args.extend(["--trace", "off", "--json", &off]);
    let out = program(&args, &dir);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let doc = json(&off);
    assert_eq!(
        doc["generated_ids"],
        serde_json::json!(GREEDY),
        "--trace off"
    );
    assert!(doc.get("forwards").is_none());
}

#[test]
fn an_injected_fault_is_found_at_its_layer_and_the_reference_options_are_refused() {
    let Some(model) = support::real_model() else {
        return;
    };
    let model = model.to_string_lossy().into_owned();
    let dir = support::scratch_dir(env!("CARGO_TARGET_TMPDIR"), "llama-cpp-fault");
    let jsonl = path_in(&dir, "nan.jsonl");
    let args = [
        "run",
        "--engine",
        "llama.cpp",
        "--gguf",
        &model,
        "--prompt",
        "The capital of France is",
        "--max-tokens",
        "1",
        "--trace",
        "lightweight",
        "--inject",
        "nan@7",
        "--jsonl",
        &jsonl,
    ];
    let out = program(&args, &dir);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let first = std::fs::read_to_string(&jsonl).unwrap_or_default();
    let row: serde_json::Value = first
        .lines()
        .next()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_default();
    let kinds = row["anomaly_kind"].as_array().cloned().unwrap_or_default();
    let at = kinds.iter().position(|k| k == "nan");
    let at = at.unwrap_or_else(|| panic!("no NaN anomaly: {row}"));
    assert_eq!(row["anomaly_layer"][at], 7);
    assert_eq!(row["anomaly_stage"][at], "post_attn");
    assert_eq!(row["anomaly_origin"][at], "produced");

    for (extra, named) in [
        (&["--synthetic", "tiny"][..], "--synthetic"),
        (&["--what-if", "q8_0"][..], "--what-if"),
        (&["--exact"][..], "--exact"),
    ] {
        let mut args = vec!["run", "--engine", "llama.cpp"];
        args.extend(extra);
        let out = program(&args, &dir);
        assert_eq!(out.status.code(), Some(2), "{named}: {}", text(&out.stderr));
        assert!(text(&out.stderr).contains(named), "{}", text(&out.stderr));
    }
}
