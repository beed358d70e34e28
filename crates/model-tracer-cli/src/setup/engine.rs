//! What the program needs of a model, whichever engine runs it: the one
//! trait the reference decoder, the candle model and llama.cpp implement,
//! each in its own module, and the text interface through which the
//! program tokenizes and detokenizes for it.

use model_tracer::{ModelTracer, TraceConfig};
use model_tracer_llama::dtype::GgmlType;
use model_tracer_llama::model::{Config, Fault, Generation};
use model_tracer_llama::tokenizer::{ChatMessage, Tokenizer};

use super::{CacheArgs, ModelArgs};

/// A model the program can load, configure, run and read the trace of.
/// Everything else (the set-up from the flags, the tracer's options and
/// outputs, the printed report) is written once against this trait.
pub trait Engine: Sized {
    /// The trace level the model was compiled for.
    type Trace: TraceConfig;

    /// The model's type, as the line saying that tracing is off names it.
    const TYPE_NAME: &'static str;
    /// The name the outputs give the engine (the trace line, `engine` in
    /// the JSON document and the dump's metadata); the reference decoder,
    /// the default, goes unnamed.
    const ENGINE: Option<&'static str>;
    /// What the matmuls compute under `--exact`, for the set-up notes.
    const EXACT_PATH: &'static str;

    /// Loads the model `model` names, with a KV cache of `cache.ctx`
    /// positions, and returns it with the name the outputs give it.
    /// `notes` hears what the loading has to say before the model is there.
    fn load(
        model: &ModelArgs,
        cache: &CacheArgs,
        trace: Self::Trace,
        notes: &mut dyn FnMut(&str),
    ) -> Result<(Self, String), String>;

    /// Hyperparameters.
    fn config(&self) -> &Config;
    /// How the model's text becomes token ids and back, if it has a
    /// vocabulary (a synthetic model has none): the program's own
    /// tokenizer for the Rust engines, llama.cpp's for llama.cpp.
    fn text(&self) -> Option<&dyn Text>;
    /// Text of a token for display: the tokenizer's piece, or `<id>`.
    fn token_text(&self, id: u32) -> String;
    /// The tracer.
    fn tracer(&self) -> &ModelTracer<Self::Trace>;
    /// The tracer, to replace it or take what it recorded.
    fn tracer_mut(&mut self) -> &mut ModelTracer<Self::Trace>;

    /// Positions the KV cache holds.
    fn kv_capacity(&self) -> usize;
    /// Positions the KV cache keeps at the start when it evicts.
    fn kv_sinks(&self) -> usize;
    /// Whether the KV cache evicts when full; one that does not holds at
    /// most [`kv_capacity`](Self::kv_capacity) positions of a run.
    fn evicts(&self) -> bool;

    /// Injects `fault` into every following forward pass.
    fn set_fault(&mut self, fault: Option<Fault>);
    /// Traces every brick re-quantized to each of `types` as well.
    fn set_what_if(&mut self, types: &[GgmlType]) -> Result<(), String>;
    /// Runs the matmuls in f32 ([`EXACT_PATH`](Self::EXACT_PATH)).
    fn set_exact(&mut self, exact: bool) -> Result<(), String>;
    /// Positions a prefill runs through the model at once, where the
    /// engine takes that option.
    fn set_prefill_chunk(&mut self, positions: usize);
    /// Positions a prefill runs through the model at once; `None` when the
    /// engine runs the prompt as it chooses.
    fn prefill_chunk(&self) -> Option<usize>;

    /// Greedy generation of up to `max_tokens` tokens after `prompt`;
    /// `on_token` sees each new token.
    fn generate(
        &mut self,
        prompt: &[u32],
        max_tokens: usize,
        on_token: impl FnMut(u32),
    ) -> Result<Generation, String>;
}

/// A model's text: prompts and chats into token ids, ids into text.
pub trait Text {
    /// The ids of a raw prompt, special-token text (`<|im_start|>`) parsed.
    fn encode(&self, prompt: &str) -> Result<Vec<u32>, String>;
    /// The ids of `messages` rendered with the model's chat template and
    /// followed by the opening of the assistant's turn.
    fn encode_chat(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, String>;
    /// The text of `ids`.
    fn decode(&self, ids: &[u32]) -> String;
}

/// The program's own BPE tokenizer: no BOS is added (SmolLM2's vocabulary
/// asks for none), the ChatML template rendered by the tokenizer.
impl Text for Tokenizer {
    fn encode(&self, prompt: &str) -> Result<Vec<u32>, String> {
        Ok(Tokenizer::encode(self, prompt))
    }

    fn encode_chat(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, String> {
        let text = self
            .apply_chat_template(messages, true)
            .map_err(|e| e.to_string())?;
        Ok(Tokenizer::encode(self, &text))
    }

    fn decode(&self, ids: &[u32]) -> String {
        Tokenizer::decode(self, ids)
    }
}
