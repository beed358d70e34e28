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

/// Gemma 3 270M, when present (`bash .ci/fetch-gemma`).
fn gemma3() -> Option<String> {
    let path = std::env::var_os("MODEL_TRACER_GEMMA")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            support::workspace_root()
                .join("models")
                .join("gemma-3-270m-q4_k_m.gguf")
        });
    let what = format!(
        "Gemma 3 270M at {} (`bash .ci/fetch-gemma`, or set MODEL_TRACER_GEMMA)",
        path.display()
    );
    support::require(path.exists(), &what).then(|| path.to_string_lossy().into_owned())
}

/// llama-cpp-python's ids for `input` (with the BOS the vocabulary asks
/// for; special-token text parsed when `special`) and its `n` greedy
/// tokens after them, on `model` (one thread, the prompt as one batch);
/// `None` without the package.
fn llama_cpp_python(
    model: &str,
    input: &str,
    special: bool,
    n: usize,
) -> Option<(Vec<u64>, Vec<u64>)> {
    support::python_with("llama_cpp")?;
    let script = format!(
        r#"
import sys, json
from llama_cpp import Llama
m = Llama(model_path=sys.argv[1], n_ctx=512, n_batch=512, n_threads=1, verbose=False)
ids = m.tokenize(sys.argv[2].encode(), add_bos=True, special={special})
m.eval(ids)
out = []
for _ in range({n}):
    t = m.sample(temp=0.0)
    out.append(t)
    m.eval([t])
print(json.dumps([ids, out]))
"#,
        special = if special { "True" } else { "False" },
    );
    let out = match Command::new("python3")
        .args(["-c", &script, model, input])
        .output()
    {
        Ok(o) => o,
        Err(e) => panic!("running python3: {e}"),
    };
    assert!(
        out.status.success(),
        "llama-cpp-python failed: {}",
        text(&out.stderr)
    );
    let stdout = text(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    match serde_json::from_str(line) {
        Ok(pair) => Some(pair),
        Err(e) => panic!("llama-cpp-python's answer {line:?}: {e}"),
    }
}

/// llama-cpp-python's answer, or (without the package) the ids it gave
/// (0.3.36), said loudly.
fn reference_ids(
    model: &str,
    input: &str,
    special: bool,
    n: usize,
    recorded: (&[u64], &[u64]),
) -> (Vec<u64>, Vec<u64>) {
    llama_cpp_python(model, input, special, n).unwrap_or_else(|| {
        eprintln!("llama-cpp-python is not installed: comparing with the ids it gave (0.3.36)");
        (recorded.0.to_vec(), recorded.1.to_vec())
    })
}

fn ids(value: &serde_json::Value) -> Vec<u64> {
    value
        .as_array()
        .map(|a| a.iter().filter_map(serde_json::Value::as_u64).collect())
        .unwrap_or_default()
}

/// Gemma's `<bos>` and `<start_of_turn>`.
const GEMMA_BOS: u64 = 2;
const GEMMA_START_OF_TURN: u64 = 105;

#[test]
fn gemma_3_runs_through_the_program_with_llama_cpps_tokenizer_and_tokens() {
    let Some(model) = gemma3() else {
        return;
    };
    let dir = support::scratch_dir(env!("CARGO_TARGET_TMPDIR"), "llama-cpp-gemma");
    let [doc_path, jsonl] = ["out.json", "trace.jsonl"].map(|n| path_in(&dir, n));
    let prompt = "The capital of France is";
    let args = [
        "run",
        "--engine",
        "llama.cpp",
        "--gguf",
        &model,
        "--prompt",
        prompt,
        "--max-tokens",
        "8",
        "--json",
        &doc_path,
        "--jsonl",
        &jsonl,
        "--trace",
        "lightweight",
    ];
    let out = program(&args, &dir);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let (want_prompt, want_tokens) = reference_ids(
        &model,
        prompt,
        false,
        8,
        (
            &[2, 818, 5279, 529, 7001, 563],
            &[506, 5279, 529, 506, 2891, 529, 7001, 236761],
        ),
    );
    let doc = json(&doc_path);
    assert_eq!(doc["engine"], "llama.cpp");
    assert_eq!(doc["model"]["layers"], 18);
    assert_eq!(ids(&doc["prompt_ids"]), want_prompt);
    assert_eq!(ids(&doc["generated_ids"]), want_tokens);
    assert_eq!(doc["prompt_text"], "<bos>The capital of France is");
    assert_eq!(
        doc["generated_text"],
        " the capital of the country of France."
    );

    let rows: Vec<serde_json::Value> = std::fs::read_to_string(&jsonl)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    // The last generated token is chosen, never run.
    let positions = want_prompt.len() + want_tokens.len() - 1;
    assert_eq!(rows.len(), positions, "one row per position");
    for (p, row) in rows.iter().enumerate() {
        assert_eq!(row["position"], p);
        let layers: std::collections::BTreeSet<u64> = ids(&row["act_layer"]).into_iter().collect();
        assert_eq!(layers, (0..18).collect(), "position {p}: every layer");
        assert_eq!(row["model"]["layers"], 18);
    }
    assert_eq!(rows[0]["token_text"], "<bos>");
}

#[test]
fn a_chat_on_gemma_3_is_rendered_with_gemmas_template() {
    let Some(model) = gemma3() else {
        return;
    };
    let dir = support::scratch_dir(env!("CARGO_TARGET_TMPDIR"), "llama-cpp-gemma-chat");
    let question = "What is the capital of France?";
    // Gemma's turns, the system message at the head of the first user
    // turn; the file has no template of its own, so llama.cpp's built-in
    // `gemma` one renders it.
    // The ids llama-cpp-python 0.3.36 gave for each text, and its greedy
    // tokens ("You are a helpful", "What is the capital": the base model
    // repeats the turn).
    let cases: [(&str, String, &[u64], &[u64]); 2] = [
        (
            "You are a helpful assistant.",
            format!(
                "<start_of_turn>user\nYou are a helpful assistant.\n\n{question}<end_of_turn>\n\
                 <start_of_turn>model\n"
            ),
            &[
                2, 105, 2364, 107, 3048, 659, 496, 11045, 16326, 236761, 108, 3689, 563, 506, 5279,
                529, 7001, 236881, 106, 107, 105, 4368, 107,
            ],
            &[3048, 659, 496, 11045],
        ),
        (
            "template",
            format!("<start_of_turn>user\n{question}<end_of_turn>\n<start_of_turn>model\n"),
            &[
                2, 105, 2364, 107, 3689, 563, 506, 5279, 529, 7001, 236881, 106, 107, 105, 4368,
                107,
            ],
            &[3689, 563, 506, 5279],
        ),
    ];
    for (i, (system, rendered, recorded_prompt, recorded_tokens)) in cases.iter().enumerate() {
        let doc_path = path_in(&dir, &format!("chat-{i}.json"));
        let args = [
            "run",
            "--engine",
            "llama.cpp",
            "--gguf",
            &model,
            "--chat",
            question,
            "--system",
            system,
            "--max-tokens",
            "4",
            "--trace",
            "off",
            "--json",
            &doc_path,
        ];
        let out = program(&args, &dir);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let stdout = text(&out.stdout);
        assert!(stdout.contains("built-in \"gemma\" template"), "{stdout}");
        let doc = json(&doc_path);
        let prompt = ids(&doc["prompt_ids"]);
        assert_eq!(prompt.first(), Some(&GEMMA_BOS), "--system {system}");
        assert_eq!(
            prompt.iter().filter(|&&t| t == GEMMA_START_OF_TURN).count(),
            2,
            "--system {system}: the user's turn and the model's"
        );
        assert_eq!(
            doc["prompt_text"].as_str(),
            Some(format!("<bos>{rendered}").as_str())
        );
        let (want_prompt, want_tokens) = reference_ids(
            &model,
            rendered,
            true,
            4,
            (recorded_prompt, recorded_tokens),
        );
        assert_eq!(prompt, want_prompt, "--system {system}");
        assert_eq!(ids(&doc["generated_ids"]), want_tokens, "--system {system}");
    }
}

/// llama-cpp-python 0.3.36's greedy tokens after SmolLM2's chat of the
/// default question and system message ("La femme de France, le Grand";
/// the reference decoder answers "The capital of France is Paris.").
const SMOLLM2_CHAT_GREEDY: [u64; 8] = [15319, 2849, 1558, 367, 4649, 28, 425, 8503];

#[test]
fn a_chat_on_smollm2_tokenizes_through_llama_cpp_to_the_reference_decoders_ids() {
    let Some(model) = support::real_model() else {
        return;
    };
    let model = model.to_string_lossy().into_owned();
    let dir = support::scratch_dir(env!("CARGO_TARGET_TMPDIR"), "llama-cpp-smollm2-chat");
    let mut docs = Vec::new();
    for engine in ["reference", "llama.cpp"] {
        let doc_path = path_in(&dir, &format!("{engine}.json"));
        let args = [
            "run",
            "--engine",
            engine,
            "--gguf",
            &model,
            "--max-tokens",
            "8",
            "--trace",
            "off",
            "--json",
            &doc_path,
        ];
        let out = program(&args, &dir);
        assert!(out.status.success(), "{engine}: {}", text(&out.stderr));
        docs.push(json(&doc_path));
    }
    let (reference, llama) = (&docs[0], &docs[1]);
    let prompt = ids(&llama["prompt_ids"]);
    assert_eq!(prompt.len(), 27);
    assert_eq!(prompt, ids(&reference["prompt_ids"]));
    assert_eq!(llama["prompt_text"], reference["prompt_text"]);
    let rendered = llama["prompt_text"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let (want_prompt, want_tokens) =
        reference_ids(&model, &rendered, true, 8, (&prompt, &SMOLLM2_CHAT_GREEDY));
    assert_eq!(prompt, want_prompt);
    assert_eq!(ids(&llama["generated_ids"]), want_tokens);
}
