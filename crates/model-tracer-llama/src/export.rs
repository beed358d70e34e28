//! The whole trace of a generation run as one JSON document.

use serde_json::{json, Value};

use super::model::Llama;
use model_tracer::config::TraceConfig;

/// The trace of a run as JSON: model shape, prompt and generated token ids
/// (and text, when the model has a tokenizer), the session summary, and
/// every retained forward pass. Other tools read this document.
pub fn trace_json<C: TraceConfig>(model: &Llama<C>, prompt: &[u32], generated: &[u32]) -> Value {
    let c = &model.config;
    let tracer = model.tracer();
    let forwards: Vec<_> = tracer.forwards().collect();
    let text = |ids: &[u32]| model.tokenizer.as_ref().map(|t| t.decode(ids));
    json!({
        "model": {
            "layers": c.n_layers,
            "dim": c.dim,
            "heads": c.n_heads,
            "kv_heads": c.n_kv_heads,
            "head_dim": c.head_dim,
            "ffn_dim": c.ffn_dim,
            "vocab": c.vocab_size,
            "kv_capacity": model.cache().capacity(),
        },
        "config": model_tracer::config::describe(tracer.config()),
        "prompt_ids": prompt,
        "prompt_text": text(prompt),
        "generated_ids": generated,
        "generated_text": text(generated),
        "summary": tracer.summary(),
        "forwards": forwards,
    })
}
