//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use model_tracer::reference::dtype::GgmlType;
use model_tracer::reference::model::{
    synthetic_weights, Config, Fault, FaultKind, KvCacheOptions, Llama,
};
use model_tracer::{ModelTracer, QuantSampling, TraceConfig, TraceOptions};

/// The real model file: `MODEL_TRACER_GGUF`, else `<manifest>/models/...`.
pub fn model_path() -> PathBuf {
    std::env::var_os("MODEL_TRACER_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("models")
                .join("SmolLM2-135M-Instruct.Q4_1.gguf")
        })
}

/// The real model file when it is present; otherwise a loud skip, or a
/// failure in CI (`.ci/run` fetches the file).
pub fn real_model() -> Option<PathBuf> {
    let path = model_path();
    let what = format!(
        "the real model file at {} (`bash .ci/fetch-model`, or set MODEL_TRACER_GGUF)",
        path.display()
    );
    require(path.exists(), &what).then_some(path)
}

/// Whether the tests run in CI (`.ci/run` sets `CI=true`): a missing tool
/// is then a failure, not a skip.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

/// Skips (returns `false`) with a loud message, or fails in CI.
pub fn require(available: bool, what: &str) -> bool {
    if !available {
        assert!(
            !in_ci(),
            "{what} is required in CI (.ci/run installs it) but is missing"
        );
        eprintln!("SKIPPED: {what} is not available");
    }
    available
}

/// A fresh directory under the target dir for one test's files.
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "{name}-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The tiny synthetic model with a KV cache of `capacity` positions (4
/// sinks), every forward retained, quantization measured for every brick.
pub fn tiny_model<C: TraceConfig>(trace: C, capacity: usize) -> Llama<C> {
    let config = Config::tiny();
    let weights = synthetic_weights(&config, GgmlType::Q8_0, 5).unwrap();
    let cache = KvCacheOptions { capacity, sinks: 4 };
    let mut model = Llama::new(config, weights, None, cache, trace.clone()).unwrap();
    let options = TraceOptions {
        max_forwards: 1024,
        ..TraceOptions::default()
    };
    *model.tracer_mut() = ModelTracer::with_options(trace, options);
    model.tracer_mut().set_quant_sampling(QuantSampling::Every);
    model
}

/// A NaN injected into layer `layer`'s attention output at `position` only.
pub fn nan_at(layer: usize, position: usize) -> Fault {
    Fault {
        kind: FaultKind::NaN,
        layer,
        position: Some(position),
    }
}

/// Runs `tokens` one forward each.
pub fn run_tokens<C: TraceConfig>(model: &mut Llama<C>, tokens: &[u32]) {
    for &t in tokens {
        model.forward(t);
    }
}

/// The python interpreter, if `python3` runs and can import `module`.
pub fn python_with(module: &str) -> Option<&'static str> {
    let ok = Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .output()
        .is_ok_and(|o| o.status.success());
    ok.then_some("python3")
}
