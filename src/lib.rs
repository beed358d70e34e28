//! Model-level tracing of transformer inference.
//!
//! `model-tracer` shows what a model computes, token by token: the health of
//! every layer's activations (and the first place a NaN appears), where
//! attention goes, at which layer the chosen token won, what quantization
//! costs each matmul, and how the KV cache behaves.
//!
//! Tracing is chosen at compile time. A model generic over
//! `C: TraceConfig` owns a [`ModelTracer<C>`] and calls its hooks; with
//! [`Disabled`] the tracer is zero-sized and every hook compiles to nothing,
//! with [`Lightweight`] it records activations and the KV cache, with
//! [`Full`] all five systems.
//!
//! ```
//! use model_tracer::{ModelTracer, Stage, TraceConfig, Lightweight};
//!
//! struct Model<C: TraceConfig> {
//!     tracer: ModelTracer<C>,
//! }
//!
//! impl<C: TraceConfig> Model<C> {
//!     fn forward(&mut self, pos: usize, x: &mut [f32]) {
//!         self.tracer.begin_forward(pos);
//!         for layer in 0..2 {
//!             self.tracer.activation(layer, Stage::Input, x);
//!             for v in x.iter_mut() {
//!                 *v = v.tanh(); // stands in for attention and FFN
//!             }
//!             self.tracer.activation(layer, Stage::Output, x);
//!         }
//!         if let Some(anomaly) = self.tracer.end_forward() {
//!             eprintln!("anomaly: {anomaly}");
//!         }
//!     }
//! }
//!
//! let mut model = Model { tracer: ModelTracer::new(Lightweight) };
//! model.forward(0, &mut [0.5, -1.0, 2.0]);
//! model.forward(1, &mut [0.5, f32::NAN, 2.0]);
//! let summary = model.tracer.summary();
//! assert_eq!(summary.forwards, 2);
//! assert_eq!(summary.first_anomaly.unwrap().position, 1);
//! ```
//!
//! See `features.md` for the cargo features (`trace-lightweight`,
//! `trace-full`, `serde`, `dump`, `log`, `tracing`) and measured overheads. The
//! reference decoder that uses it, `model-tracer-llama`, and the
//! `model-tracer` program are crates of their own.

// The crate is grouped by role, each role importing only the ones before
// it: the records a forward's hooks produce, the outputs they go to, the
// tracer that fills them, and the analysis of traces written earlier. The
// role modules are private; their modules are public here, at the crate
// root, and code inside the crate names them by these public paths
// (`crate::stats`, `crate::config`). A public re-export of an item defined
// under a role module is marked `#[doc(no_inline)]`, so that the docs show
// it once, in its public module.
#[cfg(feature = "serde")]
mod analysis;
mod output;
mod record;
pub mod tracer;

#[cfg(feature = "serde")]
pub use record::serde_float;
pub use record::{
    activation, anomaly, attention, fingerprint, forward, kv_cache, logit, model_info, quant,
    sequence, stage, stats,
};

#[cfg(feature = "dump")]
pub use output::dump;
#[cfg(any(feature = "log", feature = "tracing"))]
pub use output::events;
#[cfg(feature = "metrics")]
pub use output::metrics;
#[cfg(feature = "serde")]
pub use output::report;
pub use output::{sink, summary};

#[doc(inline)]
pub use tracer::{config, storage};

#[cfg(feature = "serde")]
pub use analysis::{diff, read, replay};

/// Calls tracer hooks in the measured zero-cost form: the call, its
/// arguments and its closures sit in a branch on `C::ANY`, which is a
/// literal `false` for [`Disabled`], so the whole call is dead from the
/// start instead of being left to the optimizer to prove unused after
/// inlining. With `RUSTFLAGS="--cfg model_tracer_no_hooks"` the calls are
/// removed from the source altogether: "the same model, never
/// instrumented", the baseline against which the instruction-count
/// benchmarks prove that a `Disabled` model runs exactly the instructions
/// of a model without hooks.
///
/// The first argument is the model's config type parameter; the rest is
/// one statement or expression that calls the tracer.
///
/// ```
/// use model_tracer::{traced, Lightweight, ModelTracer, Stage, TraceConfig};
///
/// struct Model<C: TraceConfig> {
///     tracer: ModelTracer<C>,
///     x: Vec<f32>,
/// }
///
/// impl<C: TraceConfig> Model<C> {
///     fn forward(&mut self, pos: usize) {
///         traced!(C, self.tracer.begin_forward(pos));
///         for layer in 0..2 {
///             traced!(C, self.tracer.activation(layer, Stage::Input, &self.x));
///             self.x.iter_mut().for_each(|v| *v = v.tanh());
///         }
///         traced!(C, self.tracer.end_forward());
///     }
/// }
///
/// let mut m = Model { tracer: ModelTracer::new(Lightweight), x: vec![0.5; 8] };
/// m.forward(0);
/// assert_eq!(m.tracer.summary().forwards, 1);
/// ```
#[cfg(not(model_tracer_no_hooks))]
#[macro_export]
macro_rules! traced {
    ($config:ty, $($call:tt)*) => {
        if <$config as $crate::TraceConfig>::ANY {
            $($call)*;
        }
    };
}

// The baseline build: the cfg is read here, when this crate compiles (a
// `RUSTFLAGS` cfg reaches every crate of a build), so that a user's crate
// never tests a cfg it has not declared.
#[cfg(model_tracer_no_hooks)]
#[doc(hidden)]
#[macro_export]
macro_rules! traced {
    ($config:ty, $($call:tt)*) => {};
}

// The items users reach for first. The re-exports name the public modules
// and are not inlined, so the docs show each item once, in its module.
#[doc(no_inline)]
pub use activation::{residual_ratio, LayerActivationTrace, ModelActivationTrace, Stage};
#[doc(no_inline)]
pub use anomaly::{Anomaly, AnomalyKind, Origin};
#[doc(no_inline)]
pub use attention::{AttentionTraceConfig, AttentionWeightTrace};
#[doc(no_inline)]
pub use config::{
    DefaultTrace, Disabled, Full, Lightweight, ModelTracerConfig, TraceConfig, TraceOptions,
};
#[cfg(feature = "dump")]
#[doc(no_inline)]
pub use dump::{ActivationDump, DumpError, DumpFilter, DumpRecorder};
#[doc(no_inline)]
pub use kv_cache::{KvCacheSessionTrace, KvCacheStateTrace};
#[doc(no_inline)]
pub use logit::{LogitEvolutionTrace, TokenLogitEvolution};
#[doc(no_inline)]
pub use model_info::ModelInfo;
#[doc(no_inline)]
pub use quant::{
    BrickId, ModelQuantizationError, QuantTraceError, QuantType, QuantizationErrorTrace, Severity,
};
#[cfg(feature = "serde")]
#[doc(no_inline)]
pub use report::{write_html, ReportInput};
#[doc(no_inline)]
pub use sequence::{BatchRow, SequenceId};
#[cfg(feature = "serde")]
#[doc(no_inline)]
pub use sink::JsonlSink;
#[doc(no_inline)]
pub use sink::{BackgroundSink, ForwardSink, SinkFailure, SinkHandle, SinkStatus};
#[doc(no_inline)]
pub use stats::{StatsAccumulator, TensorStats};
#[doc(no_inline)]
pub use summary::{SessionAggregates, TraceSummary};
#[doc(no_inline)]
pub use tracer::{
    ForwardTrace, LogitRows, ModelTracer, QuantSampling, Recorder, SequenceTrace, Storage,
};

// The tracer's unit tests count heap allocations (`test_f263`).
#[cfg(test)]
#[global_allocator]
static COUNTING: model_tracer_test_support::CountingAllocator =
    model_tracer_test_support::CountingAllocator;

static_assertions::assert_eq_size!(ModelTracer<Disabled>, ());
static_assertions::const_assert!(!<Disabled as TraceConfig>::ANY);
