//! llama.cpp itself (`model_tracer_llama_cpp::LlamaCpp`) as an [`Engine`],
//! behind the `llama-cpp` feature: a GGUF file of any architecture
//! llama.cpp runs, tokenized, rendered as a chat and detokenized by
//! llama.cpp, llama.cpp's kernels (no --exact, no --what-if), a KV cache
//! that does not evict.

use model_tracer::{Disabled, Full, Lightweight, ModelTracer, TraceConfig};
use model_tracer_llama::dtype::GgmlType;
use model_tracer_llama::model::{Config, Fault, Generation, KvType};
use model_tracer_llama::tokenizer::ChatMessage;
use model_tracer_llama_cpp::{ChatTemplate, LlamaCpp, LlamaCppOptions};

use super::{CacheArgs, Engine, ModelArgs, Setup, Text, TraceArgs, WithModel, DEFAULT_GGUF};

/// The options llama.cpp does not take.
pub(super) fn validate(model: &ModelArgs, trace: &TraceArgs) -> Result<(), String> {
    if model.synthetic.is_some() {
        return Err(
            "--engine llama.cpp runs a GGUF file: --synthetic is the reference decoder's".into(),
        );
    }
    if model.exact {
        return Err(
            "--exact is the Rust engines': --engine llama.cpp runs llama.cpp's kernels".into(),
        );
    }
    if !trace.what_if.is_empty() {
        return Err(
            "--what-if is the reference decoder's: --engine llama.cpp does not re-quantize".into(),
        );
    }
    Ok(())
}

/// llama.cpp, and the shape the outputs report.
pub struct LlamaCppEngine<C: TraceConfig> {
    model: LlamaCpp<C>,
    config: Config,
}

/// llama.cpp's own tokenizer and chat templates: a prompt gets the BOS its
/// vocabulary asks for (Gemma's `<bos>`; none for SmolLM2), and a chat is
/// rendered by `llama_chat_apply_template` with the model's template.
impl<C: TraceConfig> Text for LlamaCpp<C> {
    fn encode(&self, prompt: &str) -> Result<Vec<u32>, String> {
        self.tokenize_special(prompt, true)
            .map_err(|e| e.to_string())
    }

    fn encode_chat(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, String> {
        let chat: Vec<(&str, &str)> = messages
            .iter()
            .map(|m| (m.role.as_str(), m.content.as_str()))
            .collect();
        let text = self
            .apply_chat_template(&chat, true)
            .map_err(|e| e.to_string())?;
        self.tokenize_special(&text, true)
            .map_err(|e| e.to_string())
    }

    fn decode(&self, ids: &[u32]) -> String {
        self.detokenize(ids)
    }
}

impl<C: TraceConfig> Engine for LlamaCppEngine<C> {
    type Trace = C;

    const TYPE_NAME: &'static str = "LlamaCpp";
    const ENGINE: Option<&'static str> = Some("llama.cpp");
    const EXACT_PATH: &'static str = "llama.cpp's own kernels (no f32 path)";

    fn load(
        model: &ModelArgs,
        cache: &CacheArgs,
        trace: C,
        notes: &mut dyn FnMut(&str),
    ) -> Result<(Self, String), String> {
        let path = model.gguf.clone().unwrap_or_else(|| DEFAULT_GGUF.into());
        if !std::path::Path::new(&path).is_file() {
            return Err(format!(
                "no model file at {path}: `bash .ci/fetch-model` fetches SmolLM2-135M-Instruct \
                 (98 MB)"
            ));
        }
        // Flash attention off at every trace level: a traced context
        // must have it off to see the attention, and `--trace off` then
        // runs the same attention (as llama-cpp-python does).
        let options = LlamaCppOptions {
            context: cache.ctx,
            flash_attention: Some(false),
            threads: model.threads(),
            f32_cache: cache.kv_type == Some(KvType::F32),
            ..LlamaCppOptions::default()
        };
        let llama = LlamaCpp::load(&path, options, trace).map_err(|e| format!("{path}: {e}"))?;
        if let Some(ChatTemplate::Builtin(name)) = llama.chat_template() {
            notes(&format!(
                "{path} has no chat template: a chat is rendered with llama.cpp's built-in \
                 {name:?} template, its architecture's"
            ));
        }
        let s = llama.shape();
        let config = Config {
            n_layers: s.layers,
            dim: s.dim,
            n_heads: s.heads,
            n_kv_heads: s.kv_heads,
            head_dim: s.head_dim,
            ffn_dim: s.ffn_dim,
            vocab_size: s.vocab,
            context_len: s.context_train,
            rope_base: s.rope_base,
            rope_dim: s.head_dim,
            rms_eps: s.rms_eps,
        };
        let engine = Self {
            model: llama,
            config,
        };
        Ok((engine, format!("{path} (llama.cpp)")))
    }

    fn config(&self) -> &Config {
        &self.config
    }

    fn text(&self) -> Option<&dyn Text> {
        Some(&self.model)
    }

    fn token_text(&self, id: u32) -> String {
        self.model.token_text(id)
    }

    fn tracer(&self) -> &ModelTracer<C> {
        self.model.tracer()
    }

    fn tracer_mut(&mut self) -> &mut ModelTracer<C> {
        self.model.tracer_mut()
    }

    fn kv_capacity(&self) -> usize {
        self.model.capacity()
    }

    fn kv_sinks(&self) -> usize {
        0
    }

    fn evicts(&self) -> bool {
        false
    }

    fn set_fault(&mut self, fault: Option<Fault>) {
        self.model.set_fault(fault);
    }

    fn set_what_if(&mut self, types: &[GgmlType]) -> Result<(), String> {
        if types.is_empty() {
            return Ok(());
        }
        Err("--what-if is the reference decoder's: --engine llama.cpp does not re-quantize".into())
    }

    fn set_exact(&mut self, exact: bool) -> Result<(), String> {
        if exact {
            return Err("--engine llama.cpp runs llama.cpp's kernels: no --exact".into());
        }
        Ok(())
    }

    fn set_prefill_chunk(&mut self, _positions: usize) {}

    fn prefill_chunk(&self) -> Option<usize> {
        Some(self.model.options().batch)
    }

    fn generate(
        &mut self,
        prompt: &[u32],
        max_tokens: usize,
        on_token: impl FnMut(u32),
    ) -> Result<Generation, String> {
        let tokens = self
            .model
            .generate(prompt, max_tokens, on_token)
            .map_err(|e| e.to_string())?;
        Ok(Generation {
            tokens,
            reused_prompt_positions: 0,
            computed_prompt_positions: prompt.len(),
        })
    }
}

/// Loads llama.cpp at the trace level `level` and hands it to `then`:
/// `Setup::with_model`'s branch for `--engine llama.cpp`.
pub(super) fn open<W: WithModel>(
    setup: &Setup<'_>,
    level: &str,
    notes: &mut dyn FnMut(&str),
    then: W,
) -> Result<W::Output, String> {
    match level {
        "off" => setup.open::<LlamaCppEngine<Disabled>, W>(Disabled, notes, then),
        "lightweight" => setup.open::<LlamaCppEngine<Lightweight>, W>(Lightweight, notes, then),
        _ => setup.open::<LlamaCppEngine<Full>, W>(Full, notes, then),
    }
}
