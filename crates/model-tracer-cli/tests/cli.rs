//! The main job as a user meets it: `model-tracer run`, as a process.
//! Every output it is asked for is written, or refused before the model
//! loads.

use std::path::Path;
use std::process::{Command, Output};

use model_tracer_test_support as support;

fn scratch_dir(name: &str) -> std::path::PathBuf {
    support::scratch_dir(env!("CARGO_TARGET_TMPDIR"), name)
}

/// `model-tracer run ARGS` in `cwd`.
fn run(args: &[&str], cwd: &Path) -> Output {
    let bin = env!("CARGO_BIN_EXE_model-tracer");
    match Command::new(bin)
        .arg("run")
        .args(args)
        .current_dir(cwd)
        .output()
    {
        Ok(o) => o,
        Err(e) => panic!("running model-tracer run {args:?}: {e}"),
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn trace_outputs_with_tracing_off_are_refused_before_the_model_loads() {
    let dir = scratch_dir("cli-refused");
    for flag in ["--jsonl", "--html"] {
        let path = dir.join(format!("out{flag}"));
        let path = path.to_string_lossy();
        let out = run(
            &["--synthetic", "tiny", "--trace", "off", flag, &path],
            &dir,
        );
        assert_eq!(out.status.code(), Some(2), "{flag}: {}", text(&out.stderr));
        let err = text(&out.stderr);
        assert!(err.contains(flag) && err.contains("--trace off"), "{err}");
        assert!(
            !text(&out.stdout).contains("model:"),
            "the model was loaded"
        );
        assert!(!Path::new(path.as_ref()).exists(), "{flag} left a file");
    }
}

#[test]
fn an_output_in_a_missing_directory_is_an_error_before_the_run() {
    let dir = scratch_dir("cli-missing-dir");
    let target = dir.join("no-such-dir").join("x.json");
    let target = target.to_string_lossy();
    let out = run(&["--synthetic", "tiny", "--json", &target], &dir);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains(target.as_ref()));
    assert!(!text(&out.stdout).contains("generated:"), "it ran first");
}

#[test]
fn json_with_tracing_off_holds_the_ids_and_the_timing() {
    let dir = scratch_dir("cli-json-off");
    let path = dir.join("run.json");
    let path_s = path.to_string_lossy();
    let out = run(
        &[
            "--synthetic",
            "tiny",
            "--trace",
            "off",
            "--max-tokens",
            "3",
            "--prompt",
            "abc",
            "--json",
            &path_s,
        ],
        &dir,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let doc: serde_json::Value = match std::fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b).expect("valid JSON"),
        Err(e) => panic!("--json wrote nothing: {e}"),
    };
    // A synthetic model has no tokenizer: the prompt's bytes are its ids.
    assert_eq!(doc["prompt_ids"], serde_json::json!([97, 98, 99]));
    assert_eq!(doc["generated_ids"].as_array().map(Vec::len), Some(3));
    assert_eq!(doc["timing"]["prompt_positions"], 3);
    assert_eq!(doc["timing"]["generated_tokens"], 3);
    assert!(doc["timing"]["generation_s"]
        .as_f64()
        .is_some_and(|s| s >= 0.0));
    assert!(doc.get("forwards").is_none() && doc.get("summary").is_none());
}

#[test]
fn without_the_model_file_it_says_how_to_get_it_and_runs_a_synthetic_model() {
    // A directory with no models/ in it.
    let dir = scratch_dir("cli-no-model");
    let out = run(&["--trace", "off", "--max-tokens", "1"], &dir);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("bash .ci/fetch-model"), "{stdout}");
    assert!(stdout.contains("model: synthetic smollm2"), "{stdout}");
}

#[test]
fn the_default_run_answers_the_default_question_on_the_real_model() {
    let Some(gguf) = support::real_model() else {
        return;
    };
    // The working directory the README's command runs in: the model is
    // found at models/, with no option.
    let Some(root) = gguf.parent().and_then(Path::parent) else {
        panic!("{} is not under a models/ directory", gguf.display());
    };
    if !root
        .join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
        .is_file()
    {
        support::require(
            false,
            "the model file under models/ (MODEL_TRACER_GGUF points elsewhere)",
        );
        return;
    }
    let dir = scratch_dir("cli-default");
    let path = dir.join("run.json");
    let path_s = path.to_string_lossy();
    let out = run(&["--trace", "lightweight", "--json", &path_s], root);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("The capital of France is Paris."),
        "{stdout}"
    );
    assert!(stdout.contains("prompt eval:") && stdout.contains("generation:"));
    let doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("--json wrote the run")).unwrap();
    // "The capital of France is Paris." and the end of the turn.
    assert_eq!(
        doc["generated_ids"],
        serde_json::json!([504, 3575, 282, 4649, 314, 7042, 30, 2])
    );
    assert_eq!(
        doc["summary"]["forwards"],
        doc["prompt_ids"].as_array().unwrap().len() + 7
    );
}
