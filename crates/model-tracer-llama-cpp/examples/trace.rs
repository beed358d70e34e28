//! Traces a prompt and its greedy continuation through llama.cpp under
//! `Full` and writes the trace as JSON Lines:
//! `cargo run --release -p model-tracer-llama-cpp --example trace -- MODEL.gguf OUT.jsonl [N] [PROMPT]`
//! (a prompt of `@FILE` is read from the file).

use model_tracer::{Full, JsonlSink, ModelInfo, ModelTracer, SinkHandle, TraceOptions};
use model_tracer_llama_cpp::{LlamaCpp, LlamaCppOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let (Some(path), Some(out)) = (args.get(1), args.get(2)) else {
        return Err("usage: trace MODEL.gguf OUT.jsonl [N] [PROMPT]".into());
    };
    let n: usize = args.get(3).and_then(|n| n.parse().ok()).unwrap_or(8);
    let prompt = match args.get(4).map(String::as_str) {
        Some(p) if p.starts_with('@') => std::fs::read_to_string(&p[1..])?,
        Some(p) => p.to_string(),
        None => "The capital of France is".to_string(),
    };
    let options = LlamaCppOptions {
        flash_attention: Some(false),
        ..LlamaCppOptions::default()
    };
    let mut m = LlamaCpp::load(path, options, Full)?;
    let ids = m.tokenize(&prompt, true)?;
    let s = m.shape().clone();
    let info = ModelInfo {
        name: format!("{path} (llama.cpp)"),
        layers: s.layers,
        heads: s.heads,
        kv_heads: s.kv_heads,
        dim: s.dim,
        vocab: s.vocab,
        kv_capacity: m.capacity(),
        kv_sinks: 0,
    };
    let vocab: Vec<String> = (0..s.vocab as u32).map(|id| m.token_text(id)).collect();
    let file = std::io::BufWriter::new(std::fs::File::create(out)?);
    let sink = JsonlSink::new(file)
        .with_model(info)
        .with_vocabulary(move |id| vocab.get(id as usize).cloned().unwrap_or_default());
    let options = TraceOptions {
        max_forwards: ids.len() + n,
        ..TraceOptions::default()
    };
    *m.tracer_mut() = ModelTracer::with_options(Full, options);
    m.tracer_mut().set_sink(Some(SinkHandle::new(sink)));
    let tokens = m.generate(&ids, n, |_| {})?;
    println!(
        "prompt: {} tokens; generated {:?}",
        ids.len(),
        m.detokenize(&tokens)
    );
    println!("{} forwards traced to {out}", m.tracer().summary().forwards);
    Ok(())
}
