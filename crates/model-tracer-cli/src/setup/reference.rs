//! The reference decoder (`model_tracer_llama::model::Llama`) as an
//! [`Engine`]: a GGUF file or a synthetic model, a KV cache that evicts.

use model_tracer::{ModelTracer, TraceConfig};
use model_tracer_llama::dtype::GgmlType;
use model_tracer_llama::model::{Config, Fault, Generation, KvCacheOptions, Llama};

use super::{CacheArgs, Engine, ModelArgs, Source, Text};

impl<C: TraceConfig> Engine for Llama<C> {
    type Trace = C;

    const TYPE_NAME: &'static str = "Llama";
    const ENGINE: Option<&'static str> = None;
    const EXACT_PATH: &'static str = "the f32 reference path";

    fn load(
        model: &ModelArgs,
        cache: &CacheArgs,
        trace: C,
        notes: &mut dyn FnMut(&str),
    ) -> Result<(Self, String), String> {
        let options = KvCacheOptions {
            capacity: cache.ctx,
            sinks: 4,
            kv_type: cache.kv_type.unwrap_or_default(),
        };
        let source = Source::of(model, notes);
        let llama = match &source {
            Source::File(path) => {
                Llama::from_gguf(path, Some(options), trace).map_err(|e| format!("{path}: {e}"))?
            }
            Source::Synthetic(shape) => {
                let config = if shape == "tiny" {
                    Config::tiny()
                } else {
                    Config::smollm2_135m()
                };
                let weights = model_tracer_llama::model::synthetic_weights(
                    &config,
                    GgmlType::Q4_1,
                    model.seed,
                )
                .map_err(|e| e.to_string())?;
                Llama::new(config, weights, None, options, trace).map_err(|e| e.to_string())?
            }
        };
        let mut llama = llama;
        llama.set_threads(model.threads());
        let name = match source {
            Source::File(path) => path,
            Source::Synthetic(shape) => {
                format!("synthetic {shape} (Q4_1 weights, seed {})", model.seed)
            }
        };
        Ok((llama, name))
    }

    fn config(&self) -> &Config {
        &self.config
    }

    fn text(&self) -> Option<&dyn Text> {
        self.tokenizer.as_ref().map(|t| t as &dyn Text)
    }

    fn token_text(&self, id: u32) -> String {
        Llama::token_text(self, id)
    }

    fn tracer(&self) -> &ModelTracer<C> {
        Llama::tracer(self)
    }

    fn tracer_mut(&mut self) -> &mut ModelTracer<C> {
        Llama::tracer_mut(self)
    }

    fn kv_capacity(&self) -> usize {
        self.cache().capacity()
    }

    fn kv_sinks(&self) -> usize {
        self.cache().sinks()
    }

    fn evicts(&self) -> bool {
        true
    }

    fn set_fault(&mut self, fault: Option<Fault>) {
        Llama::set_fault(self, fault);
    }

    fn set_what_if(&mut self, types: &[GgmlType]) -> Result<(), String> {
        Llama::set_what_if(self, types).map_err(|e| e.to_string())
    }

    fn set_exact(&mut self, exact: bool) -> Result<(), String> {
        Llama::set_exact(self, exact);
        Ok(())
    }

    fn set_prefill_chunk(&mut self, positions: usize) {
        Llama::set_prefill_chunk(self, positions);
    }

    fn prefill_chunk(&self) -> Option<usize> {
        Some(Llama::prefill_chunk(self))
    }

    fn generate(
        &mut self,
        prompt: &[u32],
        max_tokens: usize,
        on_token: impl FnMut(u32),
    ) -> Result<Generation, String> {
        Ok(Llama::generate(self, prompt, max_tokens, on_token))
    }
}
