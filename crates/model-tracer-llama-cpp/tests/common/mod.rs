//! What the real-model tests share: the files, llama-cpp-python's greedy
//! tokens on them.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

use model_tracer_test_support as support;

/// The prompt of every test here.
pub const PROMPT: &str = "The capital of France is";

/// SmolLM2-135M-Instruct, when present (`bash .ci/fetch-model`).
pub fn smollm2() -> Option<String> {
    support::real_model().map(|p| p.display().to_string())
}

/// Gemma 3 270M, when present (`bash .ci/fetch-gemma`).
pub fn gemma3() -> Option<String> {
    let path = std::env::var_os("MODEL_TRACER_GEMMA")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            support::workspace_root()
                .join("models")
                .join("gemma-3-270m-q4_k_m.gguf")
        });
    let what = format!(
        "Gemma 3 270M at {} (`bash .ci/fetch-gemma`, or set MODEL_TRACER_GEMMA)",
        path.display()
    );
    support::require(path.exists(), &what).then(|| path.display().to_string())
}

/// llama-cpp-python's prompt ids and `n` greedy tokens for [`PROMPT`] on
/// `path` (one thread, the prompt as one batch), or `None` without the
/// package.
pub fn llama_cpp_python(path: &str, n: usize) -> Option<(Vec<u32>, Vec<u32>)> {
    support::python_with("llama_cpp")?;
    let script = format!(
        r#"
import sys, json
from llama_cpp import Llama
m = Llama(model_path=sys.argv[1], n_ctx=512, n_batch=512, n_threads=1, verbose=False)
ids = m.tokenize({PROMPT:?}.encode(), add_bos=True, special=False)
m.eval(ids)
out = []
for _ in range({n}):
    t = m.sample(temp=0.0)
    out.append(t)
    m.eval([t])
print(json.dumps([ids, out]))
"#
    );
    let out = Command::new("python3")
        .args(["-c", &script, path])
        .output()
        .ok()?;
    assert!(
        out.status.success(),
        "llama-cpp-python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last()?;
    let (ids, tokens): (Vec<u32>, Vec<u32>) = serde_json::from_str(line).ok()?;
    Some((ids, tokens))
}
