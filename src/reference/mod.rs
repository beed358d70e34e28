//! A LLaMA-family reference decoder.

pub mod dtype;
#[cfg(feature = "serde")]
pub mod export;
pub mod gguf;
pub mod model;
pub mod quant;
pub mod report;
pub mod tokenizer;
