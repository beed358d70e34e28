//! Where records go inside a running process: the session summary, the
//! sinks that stream forwards out, the activation dump, anomaly events and
//! the HTML report.
//!
//! An output imports records and other outputs, never the tracer (which
//! writes into the outputs) nor the analysis of traces written earlier.

#[cfg(feature = "dump")]
pub mod dump;
#[cfg(any(feature = "log", feature = "tracing"))]
pub mod events;
#[cfg(feature = "metrics")]
pub mod metrics;
#[cfg(feature = "serde")]
pub mod report;
#[cfg(feature = "serde")]
mod serde_keyed;
pub mod sink;
pub mod summary;
