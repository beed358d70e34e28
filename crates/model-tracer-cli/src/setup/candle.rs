//! The LLaMA written on candle (`model_tracer_candle::CandleLlama`) as an
//! [`Engine`]: a GGUF file only, no what-if, a KV cache that does not evict.

use model_tracer::{ModelTracer, TraceConfig};
use model_tracer_candle::CandleLlama;
use model_tracer_llama::dtype::GgmlType;
use model_tracer_llama::model::{Config, Fault, Generation, KvType};

use super::{CacheArgs, Engine, ModelArgs, Text, TraceArgs, DEFAULT_GGUF};

/// The options the candle model does not take.
pub(super) fn validate(model: &ModelArgs, trace: &TraceArgs) -> Result<(), String> {
    if model.synthetic.is_some() {
        return Err(
            "--engine candle runs a GGUF file: --synthetic is the reference decoder's".into(),
        );
    }
    if !trace.what_if.is_empty() {
        return Err(
            "--what-if is the reference decoder's: --engine candle does not re-quantize".into(),
        );
    }
    Ok(())
}

impl<C: TraceConfig> Engine for CandleLlama<C> {
    type Trace = C;

    const TYPE_NAME: &'static str = "CandleLlama";
    const ENGINE: Option<&'static str> = Some("candle");
    const EXACT_PATH: &'static str = "f32 products with the dequantized weights";

    fn load(
        model: &ModelArgs,
        cache: &CacheArgs,
        trace: C,
        _notes: &mut dyn FnMut(&str),
    ) -> Result<(Self, String), String> {
        cache.only_kv_type("candle", KvType::F32)?;
        let path = model.gguf.clone().unwrap_or_else(|| DEFAULT_GGUF.into());
        if !std::path::Path::new(&path).is_file() {
            return Err(format!(
                "no model file at {path}: `bash .ci/fetch-model` fetches SmolLM2-135M-Instruct \
                 (98 MB)"
            ));
        }
        // candle's CPU kernels run on its own spinning pool
        // (CANDLE_NUM_THREADS, else RAYON_NUM_THREADS) and on a rayon pool
        // (RAYON_NUM_THREADS), each sized when first used: set before the
        // model loads (the program has no other thread yet that reads the
        // environment). --threads sets both; without it, what the
        // environment says stands, and if it says nothing, every core.
        const VARS: [&str; 2] = ["CANDLE_NUM_THREADS", "RAYON_NUM_THREADS"];
        if model.threads.is_some() || VARS.iter().all(|v| std::env::var_os(v).is_none()) {
            for v in VARS {
                std::env::set_var(v, model.threads().to_string());
            }
        }
        let candle = CandleLlama::from_gguf(&path, Some(cache.ctx), trace)
            .map_err(|e| format!("{path}: {e}"))?;
        Ok((candle, format!("{path} (candle)")))
    }

    fn config(&self) -> &Config {
        &self.config
    }

    fn text(&self) -> Option<&dyn Text> {
        self.tokenizer.as_ref().map(|t| t as &dyn Text)
    }

    fn token_text(&self, id: u32) -> String {
        CandleLlama::token_text(self, id)
    }

    fn tracer(&self) -> &ModelTracer<C> {
        CandleLlama::tracer(self)
    }

    fn tracer_mut(&mut self) -> &mut ModelTracer<C> {
        CandleLlama::tracer_mut(self)
    }

    fn kv_capacity(&self) -> usize {
        self.cache().capacity()
    }

    fn kv_sinks(&self) -> usize {
        0
    }

    fn evicts(&self) -> bool {
        false
    }

    fn set_fault(&mut self, fault: Option<Fault>) {
        CandleLlama::set_fault(self, fault);
    }

    fn set_what_if(&mut self, types: &[GgmlType]) -> Result<(), String> {
        if types.is_empty() {
            return Ok(());
        }
        Err("--what-if is the reference decoder's: --engine candle does not re-quantize".into())
    }

    fn set_exact(&mut self, exact: bool) -> Result<(), String> {
        CandleLlama::set_exact(self, exact).map_err(|e| e.to_string())
    }

    fn set_prefill_chunk(&mut self, _positions: usize) {}

    fn prefill_chunk(&self) -> Option<usize> {
        None
    }

    fn generate(
        &mut self,
        prompt: &[u32],
        max_tokens: usize,
        on_token: impl FnMut(u32),
    ) -> Result<Generation, String> {
        let tokens =
            CandleLlama::generate(self, prompt, max_tokens, on_token).map_err(|e| e.to_string())?;
        Ok(Generation {
            tokens,
            reused_prompt_positions: 0,
            computed_prompt_positions: prompt.len(),
        })
    }
}
