//! The HTML report of a reference-decoder run.

use super::model::Llama;
use model_tracer::config::TraceConfig;
use model_tracer::report::{ModelInfo, ReportInput};

/// What the report and the JSON Lines rows say of `model`, named `name`.
pub fn model_info<C: TraceConfig>(model: &Llama<C>, name: &str) -> ModelInfo {
    let c = &model.config;
    ModelInfo {
        name: name.to_string(),
        layers: c.n_layers,
        heads: c.n_heads,
        kv_heads: c.n_kv_heads,
        dim: c.dim,
        vocab: c.vocab_size,
        kv_capacity: model.cache().capacity(),
        kv_sinks: model.cache().sinks(),
    }
}

/// The report input for `model`'s tracer after it ran `tokens` (the prompt
/// followed by the generated tokens; position `p` holds `tokens[p]`, as
/// when the cache started empty), named `name`. Token strings come from the
/// model's tokenizer, or are `<id>` without one.
pub fn report_input<'a, C: TraceConfig>(
    model: &'a Llama<C>,
    tokens: &[u32],
    name: &str,
) -> ReportInput<'a> {
    ReportInput::from_tracer(model.tracer(), model_info(model, name))
        .name_tokens(tokens, |id| model.token_text(id))
}
