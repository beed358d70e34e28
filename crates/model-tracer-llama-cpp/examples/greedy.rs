//! Greedy tokens of a prompt through llama.cpp, untraced:
//! `cargo run --release -p model-tracer-llama-cpp --example greedy -- MODEL.gguf [on|off|auto] [N] [PROMPT]`.

use model_tracer::Disabled;
use model_tracer_llama_cpp::{LlamaCpp, LlamaCppOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let path = args
        .get(1)
        .ok_or("usage: greedy MODEL.gguf [on|off|auto] [N] [PROMPT]")?;
    let flash_attention = match args.get(2).map(String::as_str) {
        Some("on") => Some(true),
        Some("off") => Some(false),
        _ => None,
    };
    let n: usize = args.get(3).and_then(|n| n.parse().ok()).unwrap_or(16);
    let prompt = args
        .get(4)
        .map_or("The capital of France is", String::as_str);
    let options = LlamaCppOptions {
        flash_attention,
        ..LlamaCppOptions::default()
    };
    let mut m = LlamaCpp::load(path, options, Disabled)?;
    let ids = m.tokenize(prompt, true)?;
    let tokens = m.generate(&ids, n, |_| {})?;
    println!("prompt {ids:?}");
    println!("greedy {tokens:?}");
    println!("{:?}", m.detokenize(&tokens));
    Ok(())
}
