//! A LLaMA decoder written on candle's public API, traced with
//! `model-tracer`.
//!
//! [`model::CandleLlama<C>`] reads a GGUF file with candle's reader
//! (`candle_core::quantized::gguf_file`), multiplies with candle's quantized
//! matmul (`QMatMul`) and computes norms, RoPE, grouped-query attention and
//! SwiGLU with candle's tensor ops. It is generic over the tracer's
//! [`TraceConfig`](model_tracer::TraceConfig) and calls every hook through
//! `model_tracer::traced!`, as the reference decoder does:
//! `CandleLlama<Disabled>` contains no tracing code at all. [`hooks`] hands
//! candle tensors to the hooks, in place when they are contiguous f32
//! tensors on the CPU.
//!
//! ```no_run
//! use model_tracer::Full;
//! use model_tracer_candle::model::CandleLlama;
//!
//! let mut model = CandleLlama::from_gguf("models/SmolLM2-135M-Instruct.Q4_1.gguf", None, Full)?;
//! let prompt = model.tokenizer.as_ref().map(|t| t.encode("The capital of France is"));
//! let tokens = model.generate(&prompt.unwrap_or_default(), 4, |_| {})?;
//! println!("{tokens:?}\n{}", model.tracer().summary());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod hooks;
pub mod model;

pub use model::{CandleError, CandleLlama};
