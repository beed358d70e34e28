//! Model-level tracing of transformer inference.

pub mod stats;

#[cfg(feature = "reference-model")]
pub mod reference;
