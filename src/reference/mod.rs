//! A LLaMA-family reference decoder.

pub mod dtype;
pub mod gguf;
pub mod model;
pub mod quant;
pub mod tokenizer;
