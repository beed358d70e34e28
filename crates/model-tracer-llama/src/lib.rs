//! A LLaMA-family reference decoder, traced with `model-tracer`.
//!
//! It runs GGUF files (v2/v3) of the llama architecture on the CPU, one
//! thread, with quantized `wide` kernels that multiply the weights with
//! 8-bit activations as llama.cpp's CPU path does, and follows llama.cpp
//! token for token on SmolLM2-135M-Instruct. [`model::Llama<C>`] is generic
//! over the tracer's [`TraceConfig`](model_tracer::TraceConfig) and uses the
//! tracer only through its public API, as any user's model does:
//! `Llama<Disabled>` contains no tracing code at all.
//!
//! ```no_run
//! use model_tracer::Full;
//! use model_tracer_llama::model::Llama;
//!
//! let mut model = Llama::from_gguf("models/SmolLM2-135M-Instruct.Q4_1.gguf", None, Full)?;
//! let prompt = model.tokenizer.as_ref().map(|t| t.encode("The capital of France is"));
//! let generation = model.generate(&prompt.unwrap_or_default(), 4, |_| {});
//! println!("{:?}\n{}", generation.tokens, model.tracer().summary());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod dtype;
#[cfg(feature = "serde")]
pub mod export;
pub mod gguf;
pub mod model;
pub mod pool;
pub mod quant;
#[cfg(feature = "serde")]
pub mod report;
pub mod tokenizer;
