//! The main job as a user meets it: `model-tracer run`, as a process.
//! Every output it is asked for is written, or refused before the model
//! loads.

use std::path::Path;
use std::process::{Command, Output};

use model_tracer::{ActivationDump, Stage};
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
    for flag in ["--jsonl", "--html", "--dump"] {
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
fn an_f16_kv_cache_holds_the_positions_in_half_the_bytes() {
    let dir = scratch_dir("cli-kv-type");
    let mut bytes = Vec::new();
    for kv in ["f32", "f16"] {
        let json = dir.join(format!("{kv}.json"));
        let json = json.to_string_lossy();
        let args = [
            "--synthetic",
            "tiny",
            "--trace",
            "lightweight",
            "--max-tokens",
            "3",
        ];
        let out = run(
            &[&args[..], &["--kv-type", kv, "--json", &json]].concat(),
            &dir,
        );
        assert!(out.status.success(), "{kv}: {}", text(&out.stderr));
        let stdout = text(&out.stdout);
        assert!(stdout.contains(&format!("positions of {kv}")), "{stdout}");
        let doc: serde_json::Value = match std::fs::read(json.as_ref()) {
            Ok(b) => serde_json::from_slice(&b).unwrap_or_default(),
            Err(e) => panic!("{json}: {e}"),
        };
        let last = doc["forwards"].as_array().and_then(|f| f.last()).cloned();
        let last = last.unwrap_or_default();
        bytes.push(last["kv_cache"]["cache_size_bytes"].as_u64().unwrap_or(0));
    }
    assert!(bytes[1] > 0 && bytes[0] == 2 * bytes[1], "{bytes:?}");
    let out = run(&["--synthetic", "tiny", "--kv-type", "q8_0"], &dir);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("expected f32 or f16"),
        "{}",
        text(&out.stderr)
    );
    let out = run(&["--engine", "candle", "--kv-type", "f16"], &dir);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("candle's KV cache is f32"),
        "{}",
        text(&out.stderr)
    );
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

/// `model-tracer ARGS` in `cwd`.
fn program(args: &[&str], cwd: &Path) -> Output {
    let bin = env!("CARGO_BIN_EXE_model-tracer");
    match Command::new(bin).args(args).current_dir(cwd).output() {
        Ok(o) => o,
        Err(e) => panic!("running model-tracer {args:?}: {e}"),
    }
}

/// `run --jsonl --html` and then `report` of the JSON Lines trace: the two
/// HTML files must be the same, byte for byte.
fn report_matches_run(dir: &Path, model: &[&str]) -> String {
    let (jsonl, html, again) = (
        dir.join("trace.jsonl"),
        dir.join("run.html"),
        dir.join("report.html"),
    );
    let (jsonl_s, html_s, again_s) = (
        jsonl.to_string_lossy(),
        html.to_string_lossy(),
        again.to_string_lossy(),
    );
    let mut args = model.to_vec();
    args.extend(["--jsonl", &jsonl_s, "--html", &html_s]);
    let out = run(&args, dir);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = program(&["report", &jsonl_s, "-o", &again_s], dir);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let (a, b) = match (std::fs::read(&html), std::fs::read(&again)) {
        (Ok(a), Ok(b)) => (a, b),
        other => panic!("a report is missing: {other:?}"),
    };
    assert!(a.len() > 10_000, "a report of {} bytes", a.len());
    assert!(
        a == b,
        "report differs from run --html ({} vs {} bytes)",
        b.len(),
        a.len()
    );
    text(&out.stdout)
}

#[test]
fn report_renders_the_same_page_as_run_html_synthetic() {
    let dir = scratch_dir("cli-report-synthetic");
    // A cache smaller than the run: evictions, and attention slots that
    // map to positions through the cache's sinks.
    let stdout = report_matches_run(
        &dir,
        &[
            "--synthetic",
            "tiny",
            "--max-tokens",
            "12",
            "--ctx",
            "10",
            "--prompt",
            "hello",
        ],
    );
    assert!(
        stdout.contains("16 forwards (positions 0..=15), traced full"),
        "{stdout}"
    );
}

#[test]
fn report_renders_the_same_page_as_run_html_on_the_real_model() {
    let Some(gguf) = support::real_model() else {
        return;
    };
    let gguf = gguf.to_string_lossy().into_owned();
    let dir = scratch_dir("cli-report-real");
    let stdout = report_matches_run(
        &dir,
        &[
            "--gguf",
            &gguf,
            "--max-tokens",
            "6",
            "--ctx",
            "24",
            "--trace",
            "full",
        ],
    );
    assert!(stdout.contains("30 layers, hidden 576"), "{stdout}");
}

#[test]
fn report_of_a_bad_trace_names_the_line_and_writes_nothing() {
    let dir = scratch_dir("cli-report-bad");
    let trace = dir.join("bad.jsonl");
    let row = r#"{"position":0,"act_layer":[0],"act_stage":["input"],"act_count":[2],"act_min":[1],"act_max":[2],"act_mean":[1.5],"act_std":[0.7],"act_l2_norm":[2.2],"act_nan_count":[0],"act_inf_count":[0]}"#;
    let truncated = &row[..row.len() / 2];
    std::fs::write(&trace, format!("{row}\n{row}\n{truncated}")).expect("write the trace");
    let out_path = dir.join("bad.html");
    let out = program(&["report", &trace.to_string_lossy()], &dir);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("line 3") && err.contains("ends early"),
        "{err}"
    );
    assert!(!out_path.exists(), "a report of a bad trace was written");

    let missing = dir.join("missing.jsonl");
    let out = program(&["report", &missing.to_string_lossy()], &dir);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("missing.jsonl"));

    // Whole rows render, with the report named after the trace.
    std::fs::write(&trace, format!("{row}\n{row}\n")).expect("write the trace");
    let out = program(&["report", &trace.to_string_lossy()], &dir);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(out_path.exists());
}

/// Traces the tiny synthetic model on a fixed prompt into `dir/name`,
/// with `extra` options; returns the trace's path.
fn tiny_trace(dir: &Path, name: &str, extra: &[&str]) -> String {
    let path = dir.join(name).to_string_lossy().into_owned();
    let mut args = vec![
        "--synthetic",
        "tiny",
        "--prompt",
        "where do they part",
        "--max-tokens",
        "4",
        "--jsonl",
        &path,
    ];
    args.extend(extra);
    let out = run(&args, dir);
    assert!(out.status.success(), "{}", text(&out.stderr));
    path
}

/// `model-tracer diff A B --json`: exit code and the JSON document.
fn diff_json(
    dir: &Path,
    a: &str,
    b: &str,
    extra: &[&str],
) -> (Option<i32>, serde_json::Value, String) {
    let json = dir
        .join(format!("diff-{}.json", extra.len()))
        .to_string_lossy()
        .into_owned();
    let mut args = vec!["diff", a, b, "--json", &json];
    args.extend(extra);
    let out = program(&args, dir);
    let doc = std::fs::read(&json)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(serde_json::Value::Null);
    (
        out.status.code(),
        doc,
        text(&out.stdout) + &text(&out.stderr),
    )
}

#[test]
fn diff_of_two_identical_runs_finds_nothing() {
    let dir = scratch_dir("cli-diff-same");
    let a = tiny_trace(&dir, "a.jsonl", &[]);
    let b = tiny_trace(&dir, "b.jsonl", &[]);
    let (code, doc, out) = diff_json(&dir, &a, &b, &[]);
    assert_eq!(code, Some(0), "{out}");
    assert!(doc["first_divergence"].is_null(), "{out}");
    assert!(doc["largest_jump"].is_null(), "{out}");
    let sites = doc["sites"].as_array().map_or(0, Vec::len);
    assert_eq!(
        sites,
        1 + 4 * 6 + 2,
        "embedding, 4 layers x 6 stages, final norm, logits"
    );
    assert!(doc["sites"]
        .as_array()
        .into_iter()
        .flatten()
        .all(|s| s["max_error"] == 0.0));
    assert_eq!(doc["positions"].as_array().map_or(0, Vec::len), 21);
    assert_eq!(doc["top1_agreement"], 1.0);
}

#[test]
fn diff_finds_a_planted_error_at_its_layer_and_stage() {
    let dir = scratch_dir("cli-diff-scale");
    let a = tiny_trace(&dir, "a.jsonl", &[]);
    for (fault, layer, stage) in [
        ("scale@0", 0, "post_attn"),
        ("scale@2:post_ffn", 2, "post_ffn"),
        ("scale@3", 3, "post_attn"),
    ] {
        let b = tiny_trace(&dir, &format!("{fault}.jsonl"), &["--inject", fault]);
        let (code, doc, out) = diff_json(&dir, &a, &b, &[]);
        assert_eq!(code, Some(1), "{fault}: {out}");
        let first = &doc["first_divergence"];
        assert_eq!(first["position"], 0, "{fault}: {out}");
        assert_eq!(first["layer"], layer, "{fault}: {out}");
        assert_eq!(first["stage"], stage, "{fault}: {out}");
        let jump = &doc["largest_jump"];
        assert_eq!(
            (&jump["layer"], &jump["stage"]),
            (&first["layer"], &first["stage"]),
            "{out}"
        );
        // 1 + 1e-2 is below every anomaly rule: the runs differ by 1%.
        let e = first["error"].as_f64().unwrap_or(0.0);
        assert!((0.005..0.02).contains(&e), "{fault}: error {e}");
        assert!(out.contains(&format!("layer {layer} {stage}")), "{out}");
    }
}

/// The site of a report's `first_divergence` or `largest_jump`.
fn site_of(place: &serde_json::Value) -> (serde_json::Value, serde_json::Value) {
    (place["layer"].clone(), place["stage"].clone())
}

/// The largest error the report gives the site `(layer, stage)`.
fn site_error(doc: &serde_json::Value, layer: u64, stage: &str) -> f64 {
    doc["sites"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["layer"] == layer && s["stage"] == stage)
        .and_then(|s| s["max_error"].as_f64())
        .unwrap_or(f64::NAN)
}

#[test]
fn diff_finds_a_head_swap_through_the_fingerprints_alone() {
    let dir = scratch_dir("cli-diff-swap");
    let full = ["--trace", "full"];
    let light = ["--trace", "lightweight"];
    let a_full = tiny_trace(&dir, "a-full.jsonl", &full);
    let a_light = tiny_trace(&dir, "a-light.jsonl", &light);
    for layer in [1u64, 3] {
        let fault = format!("swap@{layer}");
        let b_full = tiny_trace(
            &dir,
            &format!("{fault}-full.jsonl"),
            &["--trace", "full", "--inject", &fault],
        );
        let b_light = tiny_trace(
            &dir,
            &format!("{fault}-light.jsonl"),
            &["--trace", "lightweight", "--inject", &fault],
        );
        // Statistics alone: the swapped stage has the moments of the right
        // one, the divergence shows only where the residual mixes it in.
        let (code, doc, out) = diff_json(&dir, &a_light, &b_light, &[]);
        assert_eq!(code, Some(1), "{fault}: {out}");
        assert!(
            site_error(&doc, layer, "post_attn") < 1e-5,
            "{fault}: the moments saw the swap: {out}"
        );
        let first = &doc["first_divergence"];
        assert_eq!(first["layer"], layer, "{fault}: {out}");
        assert_ne!(first["stage"], "post_attn", "{fault}: {out}");
        // With fingerprints: the swapped stage itself, by its fingerprint.
        let (code, doc, out) = diff_json(&dir, &a_full, &b_full, &[]);
        assert_eq!(code, Some(1), "{fault}: {out}");
        let first = &doc["first_divergence"];
        assert_eq!(
            (first["position"].as_u64(), site_of(first)),
            (Some(0), (layer.into(), "post_attn".into())),
            "{fault}: {out}"
        );
        assert_eq!(first["measure"], "fingerprint", "{fault}: {out}");
        assert_eq!(site_of(&doc["largest_jump"]), site_of(first), "{out}");
    }
}

#[test]
fn diff_reads_dumps_and_traces_alike() {
    let dir = scratch_dir("cli-diff-dumps");
    let path = |name: &str| dir.join(name).to_string_lossy().into_owned();
    let (a_dump, b_dump) = (path("a.safetensors"), path("b.safetensors"));
    let a = tiny_trace(&dir, "a.jsonl", &["--trace", "full", "--dump", &a_dump]);
    let b = tiny_trace(
        &dir,
        "b.jsonl",
        &["--trace", "full", "--dump", &b_dump, "--inject", "scale@2"],
    );
    // A dump's statistics and fingerprints are the tracer's, to the bit.
    let (code, doc, out) = diff_json(&dir, &a, &a_dump, &[]);
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(doc["b"]["kind"], "dump");
    assert_eq!(doc["sites_compared"], 1 + 4 * 6 + 2, "{out}");
    assert!(doc["sites"]
        .as_array()
        .into_iter()
        .flatten()
        .all(|s| s["max_error"] == 0.0));
    // Two dumps: the vectors themselves, and the final distributions.
    let (code, doc, out) = diff_json(&dir, &a_dump, &b_dump, &[]);
    assert_eq!(code, Some(1), "{out}");
    let first = &doc["first_divergence"];
    assert_eq!(site_of(first), (2.into(), "post_attn".into()), "{out}");
    assert_eq!(first["measure"], "vector", "{out}");
    assert!(doc["max_kl"].as_f64().is_some_and(|k| k > 0.0), "{out}");
    // A trace against a dump finds the same place.
    let (code, doc, out) = diff_json(&dir, &a_dump, &b, &[]);
    assert_eq!(code, Some(1), "{out}");
    assert_eq!(site_of(&doc["first_divergence"]), site_of(first), "{out}");
    // A file of neither kind, and a broken dump, are named.
    let junk = path("junk.bin");
    std::fs::write(&junk, b"\x00\x01 not a trace").expect("write");
    let (code, _, out) = diff_json(&dir, &a, &junk, &[]);
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("junk.bin") && out.contains("neither"), "{out}");
    let bytes = std::fs::read(&a_dump).expect("the dump");
    let cut = path("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() - 10]).expect("write");
    let (code, _, out) = diff_json(&dir, &a_dump, &cut, &[]);
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("cut.safetensors"), "{out}");
}

#[test]
fn diff_of_traces_that_cannot_be_compared_is_an_error() {
    let dir = scratch_dir("cli-diff-bad");
    let a = tiny_trace(&dir, "a.jsonl", &[]);
    // Another shape: the SmolLM2-shaped synthetic model.
    let other = dir.join("other.jsonl").to_string_lossy().into_owned();
    let out = run(
        &[
            "--synthetic",
            "smollm2",
            "--prompt",
            "x",
            "--max-tokens",
            "1",
            "--trace",
            "lightweight",
            "--jsonl",
            &other,
        ],
        &dir,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let (code, _, out) = diff_json(&dir, &a, &other, &[]);
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains("hidden size 256") && out.contains("hidden size 576"),
        "{out}"
    );

    // No position in common: the same rows moved 1000 positions on.
    let text_a = std::fs::read_to_string(&a).unwrap_or_default();
    let moved: String = text_a
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap_or_default();
            let p = v["position"].as_u64().unwrap_or(0);
            v["position"] = serde_json::json!(p + 1000);
            v.to_string() + "\n"
        })
        .collect();
    let far = dir.join("far.jsonl");
    std::fs::write(&far, moved).expect("write");
    let (code, _, out) = diff_json(&dir, &a, &far.to_string_lossy(), &[]);
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains("no position in common") && out.contains("1000..=1020"),
        "{out}"
    );

    // A truncated line is named.
    let cut = dir.join("cut.jsonl");
    let keep = text_a.len() - 100;
    std::fs::write(&cut, &text_a[..keep]).expect("write");
    let (code, _, out) = diff_json(&dir, &a, &cut.to_string_lossy(), &[]);
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains("line 21") && out.contains("ends early"),
        "{out}"
    );

    // A tolerance that is not one.
    let (code, _, out) = diff_json(&dir, &a, &a, &["--tolerance", "NaN"]);
    assert_eq!(code, Some(2), "{out}");
}

#[test]
fn diff_html_renders_in_chromium_with_the_divergence_marked() {
    let Some(bin) = support::chromium() else {
        support::require(false, "chromium (apt-get install chromium)");
        return;
    };
    let dir = scratch_dir("cli-diff-html");
    let a = tiny_trace(&dir, "a.jsonl", &[]);
    let b = tiny_trace(&dir, "b.jsonl", &["--inject", "scale@1:post_ffn"]);
    let page = dir.join("diff.html");
    let (code, doc, out) = diff_json(&dir, &a, &b, &["--html", &page.to_string_lossy()]);
    assert_eq!(code, Some(1), "{out}");
    let dom = support::run_chromium(&bin, &dir, &page, &["--dump-dom".to_string()]);
    assert!(
        dom.contains("data-status=\"ok\""),
        "the page did not render: {}",
        &dom[..dom.len().min(2000)]
    );
    let positions = doc["positions"].as_array().map_or(0, Vec::len);
    let want = format!(
        "data-rendered=\"heatmap:{},sites:{},layers:4\"",
        4 * positions,
        27
    );
    assert!(dom.contains(&want), "{want} not in the page");
    assert_eq!(dom.matches("id=\"divergence-mark\"").count(), 1);
    assert!(
        dom.contains("First divergence: position 0, layer 1 post_ffn"),
        "verdict missing"
    );
}

/// The dump at `path`, which the run must have written.
fn dump_at(path: &Path) -> ActivationDump {
    match ActivationDump::read(path) {
        Ok(d) => d,
        Err(e) => panic!("--dump wrote no readable dump: {e}"),
    }
}

fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, v) in row.iter().enumerate() {
        if *v > row[best] {
            best = i;
        }
    }
    best
}

#[test]
fn dump_holds_every_forward_of_the_run() {
    let dir = scratch_dir("cli-dump");
    let (dump, json) = (dir.join("run.safetensors"), dir.join("run.json"));
    let (dump_s, json_s) = (dump.to_string_lossy(), json.to_string_lossy());
    let out = run(
        &[
            "--synthetic",
            "tiny",
            "--trace",
            "lightweight",
            "--prompt",
            "hello",
            "--max-tokens",
            "4",
            "--dump",
            &dump_s,
            "--json",
            &json_s,
        ],
        &dir,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("dump: 8 positions, 27 tensors"));
    let d = dump_at(&dump);
    let doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).expect("--json wrote the run")).unwrap();
    let ids = |key: &str| -> Vec<i64> {
        doc[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect()
    };
    let (prompt, generated) = (ids("prompt_ids"), ids("generated_ids"));
    // Every token fed: the prompt, and each generated token but the last.
    let mut fed = prompt.clone();
    fed.extend(&generated[..generated.len() - 1]);
    assert_eq!(d.tokens(), fed.as_slice());
    assert_eq!(d.positions(), (0..fed.len()).collect::<Vec<_>>().as_slice());
    // Tiny: 4 layers of 6 stages, hidden 256, vocabulary 512.
    assert_eq!(d.layers(), vec![0, 1, 2, 3]);
    assert_eq!((d.dim(), d.vocab()), (Some(256), Some(512)));
    assert_eq!(d.metadata()["matmuls"], "quantized");
    assert!(d.metadata()["model"].contains("synthetic tiny"));
    // The logits of a row chose the next token.
    let logits = d.logits().unwrap();
    for (t, next) in generated.iter().enumerate() {
        let row = logits.row(prompt.len() - 1 + t).unwrap();
        assert_eq!(
            argmax(row) as i64,
            *next,
            "position {}",
            prompt.len() - 1 + t
        );
    }
    // A layer's output is the next layer's input.
    let out1 = d.activation(Some(1), Stage::Output).unwrap();
    let in2 = d.activation(Some(2), Stage::Input).unwrap();
    assert_eq!(out1.data(), in2.data());
}

#[test]
fn dump_filters_keep_the_layers_and_stages_named() {
    let dir = scratch_dir("cli-dump-filter");
    let dump = dir.join("f.safetensors");
    let dump_s = dump.to_string_lossy();
    let out = run(
        &[
            "--synthetic",
            "tiny",
            "--prompt",
            "hi",
            "--max-tokens",
            "2",
            "--dump",
            &dump_s,
            "--dump-layers",
            "1,3",
            "--dump-stages",
            "post_attn,logits",
        ],
        &dir,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let d = dump_at(&dump);
    let names: Vec<String> = d.tensors().map(|t| t.name()).collect();
    assert_eq!(
        names,
        ["layers.1.post_attn", "layers.3.post_attn", "logits"]
    );
    assert_eq!(d.len(), 3);
    // Layers alone keep embedding, final_norm and logits.
    let out = run(
        &[
            "--synthetic",
            "tiny",
            "--prompt",
            "hi",
            "--max-tokens",
            "1",
            "--dump",
            &dump_s,
            "--dump-layers",
            "0",
        ],
        &dir,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let d = dump_at(&dump);
    assert_eq!(d.tensors().count(), 1 + 6 + 2);
    assert!(d.activation(None, Stage::Embedding).is_some());
    assert!(d.activation(Some(1), Stage::Input).is_none());
}

#[test]
fn bad_dump_filters_are_refused() {
    let dir = scratch_dir("cli-dump-bad");
    let dump = dir.join("b.safetensors");
    let dump_s = dump.to_string_lossy();
    let out = run(
        &[
            "--synthetic",
            "tiny",
            "--dump",
            &dump_s,
            "--dump-stages",
            "post_atn",
        ],
        &dir,
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("post_atn"),
        "{}",
        text(&out.stderr)
    );
    let out = run(&["--synthetic", "tiny", "--dump-layers", "1"], &dir);
    assert_eq!(out.status.code(), Some(2), "--dump-layers without --dump");
    let out = run(
        &[
            "--synthetic",
            "tiny",
            "--dump",
            &dump_s,
            "--dump-layers",
            "4",
        ],
        &dir,
    );
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("--dump-layers 4") && err.contains("4 layers"),
        "{err}"
    );
    assert!(!text(&out.stdout).contains("generated:"), "it ran");
}

#[test]
fn exact_runs_the_f32_path() {
    let dir = scratch_dir("cli-exact");
    let dumps = [dir.join("q.safetensors"), dir.join("x.safetensors")];
    for (path, exact) in dumps.iter().zip([false, true]) {
        let p = path.to_string_lossy();
        let mut args = vec![
            "--synthetic",
            "tiny",
            "--prompt",
            "abc",
            "--max-tokens",
            "1",
            "--dump",
            &p,
        ];
        if exact {
            args.push("--exact");
        }
        let out = run(&args, &dir);
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert_eq!(text(&out.stdout).contains("f32 reference path"), exact);
    }
    let (q, x) = (dump_at(&dumps[0]), dump_at(&dumps[1]));
    assert_eq!(
        (
            q.metadata()["matmuls"].as_str(),
            x.metadata()["matmuls"].as_str()
        ),
        ("quantized", "f32")
    );
    // The same embedding and first norm; the first product already differs.
    let same = |stage| {
        q.activation(Some(0), stage).unwrap().data() == x.activation(Some(0), stage).unwrap().data()
    };
    assert!(same(Stage::Input) && same(Stage::PostNorm));
    assert!(!same(Stage::PostAttn));
}

/// The numpy forward's top logit for "The capital of France is"
/// (crates/model-tracer-llama/tests/reference_model.rs).
const NUMPY_PARIS: (usize, f32) = (7042, 17.371265);

#[test]
fn exact_dump_of_the_real_model_has_the_numpy_logits() {
    let Some(gguf) = support::real_model() else {
        return;
    };
    let gguf = gguf.to_string_lossy().into_owned();
    let dir = scratch_dir("cli-exact-real");
    let dump = dir.join("paris.safetensors");
    let dump_s = dump.to_string_lossy();
    let out = run(
        &[
            "--gguf",
            &gguf,
            "--exact",
            "--trace",
            "lightweight",
            "--prompt",
            "The capital of France is",
            "--max-tokens",
            "1",
            "--dump",
            &dump_s,
            "--dump-stages",
            "logits",
        ],
        &dir,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let d = dump_at(&dump);
    assert_eq!(d.tokens(), &[504, 3575, 282, 4649, 314]);
    let last = d.logits().unwrap().row(4).unwrap();
    let best = argmax(last);
    assert_eq!(best, NUMPY_PARIS.0);
    assert!((last[best] - NUMPY_PARIS.1).abs() < 2e-3, "{}", last[best]);
}

/// The rows of the traces at `paths` interleaved into one trace, each row
/// given the `sequence` of its file's index: the trace of a program whose
/// forwards held several sequences.
fn interleave(paths: &[&str], out: &Path) {
    let files: Vec<Vec<String>> = paths
        .iter()
        .map(|p| match std::fs::read_to_string(p) {
            Ok(t) => t.lines().map(str::to_string).collect(),
            Err(e) => panic!("{p}: {e}"),
        })
        .collect();
    let longest = files.iter().map(Vec::len).max().unwrap_or(0);
    let mut text = String::new();
    for i in 0..longest {
        for (seq, rows) in files.iter().enumerate() {
            let Some(line) = rows.get(i) else { continue };
            let mut row: serde_json::Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("{line}: {e}"));
            row["sequence"] = serde_json::json!(seq);
            text.push_str(&row.to_string());
            text.push('\n');
        }
    }
    if let Err(e) = std::fs::write(out, text) {
        panic!("{}: {e}", out.display());
    }
}

#[test]
fn report_and_diff_take_one_sequence_of_a_trace_that_holds_several() {
    let dir = scratch_dir("cli-sequences");
    let a = tiny_trace(&dir, "a.jsonl", &[]);
    let b = tiny_trace(&dir, "b.jsonl", &["--inject", "scale@1"]);
    let multi = dir.join("multi.jsonl");
    interleave(&[&a, &b], &multi);
    let multi = multi.to_string_lossy().into_owned();

    // Whole, it is refused, naming the option and the row of the second
    // sequence; nothing is written.
    let out = program(&["report", &multi, "-o", "mixed.html"], &dir);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    let err = text(&out.stderr);
    assert!(
        err.contains("line 2") && err.contains("sequence 1") && err.contains("--sequence"),
        "{err}"
    );
    assert!(!dir.join("mixed.html").exists());

    // One sequence of it renders the page of that sequence's own trace.
    for (seq, alone) in [("0", &a), ("1", &b)] {
        let (one, own) = (format!("seq{seq}.html"), format!("own{seq}.html"));
        let out = program(&["report", &multi, "--sequence", seq, "-o", &one], &dir);
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert!(text(&out.stdout).contains(&format!("sequence {seq}")));
        let out = program(&["report", alone, "-o", &own], &dir);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let (x, y) = match (std::fs::read(dir.join(&one)), std::fs::read(dir.join(&own))) {
            (Ok(x), Ok(y)) => (x, y),
            other => panic!("a report is missing: {other:?}"),
        };
        assert!(
            x.len() > 10_000 && x == y,
            "sequence {seq}: {} vs {} bytes",
            x.len(),
            y.len()
        );
    }
    let out = program(
        &["report", &multi, "--sequence", "7", "-o", "none.html"],
        &dir,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("no row of sequence 7"),
        "{}",
        text(&out.stderr)
    );

    // The diff compares a sequence with its own trace (no divergence) and
    // with the other prompt's (a divergence), and refuses the whole trace.
    let out = program(&["diff", &multi, &b, "--sequence-a", "1"], &dir);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let out = program(&["diff", &multi, &a, "--sequence-a", "1"], &dir);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let out = program(
        &[
            "diff",
            &multi,
            &multi,
            "--sequence-a",
            "0",
            "--sequence-b",
            "0",
        ],
        &dir,
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let out = program(&["diff", &multi, &a], &dir);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("--sequence-a"),
        "{}",
        text(&out.stderr)
    );
}
