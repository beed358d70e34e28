//! The analysis of traces written earlier: reading JSON Lines traces back
//! ([`read`](crate::read)), replaying them into a tracer
//! ([`replay`](crate::replay)) and comparing two runs ([`diff`](crate::diff)).
//!
//! It sits on top: it may import records, outputs and the tracer, and
//! nothing else in the crate imports it. Needs the `serde` feature.

pub mod diff;
pub mod read;
pub mod replay;
