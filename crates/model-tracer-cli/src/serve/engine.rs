//! What the scheduler needs of a model: sequences started at a trace
//! level, stepped together, read and finished. The HTTP side, the queue,
//! sampling, stop strings and the trace store are written against
//! [`Engine`] alone, whatever the model does to batch the rows of a step.
//!
//! Each sequence's trace is its own: its forwards stream, as the tracer's
//! JSON Lines rows, into a buffer of that sequence, and finishing the
//! sequence hands the rows back with its summary's anomaly count and
//! first anomaly.

use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use model_tracer::{
    AttentionTraceConfig, JsonlSink, ModelInfo, ModelTracer, SinkHandle, TraceConfig, TraceOptions,
    TraceSummary,
};

/// How much a sequence's tracer records: the three monomorphized models.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Level {
    /// `Disabled`: no tracing code at all.
    Off,
    /// `Lightweight`: activations and the KV cache.
    Lightweight,
    /// `Full`: the five systems.
    Full,
}

impl Level {
    /// The level `name` names (`off`, `lightweight`, `full`).
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "off" => Some(Self::Off),
            "lightweight" => Some(Self::Lightweight),
            "full" => Some(Self::Full),
            _ => None,
        }
    }

    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Lightweight => "lightweight",
            Self::Full => "full",
        }
    }
}

/// A sequence the engine runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId(pub u64);

/// One sequence's part of a step: tokens to run at its next positions (a
/// prompt chunk, or the one token it generated last).
#[derive(Debug, Clone)]
pub struct StepWork {
    /// The sequence.
    pub seq: SeqId,
    /// Its tokens in this step (at least one).
    pub tokens: Vec<u32>,
}

/// What a finished sequence's tracer recorded.
#[derive(Debug, Clone, Default)]
pub struct TraceOutcome {
    /// One JSON Lines row per position (the tracer's schema); empty when
    /// the level records nothing.
    pub rows: Vec<u8>,
    /// Forwards recorded, one per position.
    pub forwards: usize,
    /// Anomalies of every kind.
    pub anomalies: usize,
    /// The first one, in `run --json`'s shape.
    pub first_anomaly: Option<serde_json::Value>,
}

/// A model that runs several sequences, each with its own KV cache and its
/// own trace.
pub trait Engine {
    /// Sequences it holds at once.
    fn capacity(&self) -> usize;
    /// Whether it runs sequences at `level`.
    fn has_level(&self, level: Level) -> bool;
    /// Starts an empty sequence traced at `level`, with room for
    /// `positions` positions.
    fn start(&mut self, level: Level, positions: usize) -> Result<SeqId, String>;
    /// One step over the work of several sequences (each at most once):
    /// after it, [`logits`](Self::logits) of each is that of its last
    /// token.
    fn step(&mut self, work: &[StepWork]) -> Result<(), String>;
    /// The logits after the last token `seq` ran.
    fn logits(&self, seq: SeqId) -> Option<&[f32]>;
    /// Ends `seq`, frees its cache and hands back its trace.
    fn finish(&mut self, seq: SeqId) -> TraceOutcome;
}

/// A `Write` into a buffer shared with whoever takes the rows later: the
/// JSON Lines sink of one sequence's tracer.
#[derive(Clone, Default)]
pub struct SharedBuf(Arc<Mutex<Vec<u8>>>);

impl SharedBuf {
    /// The bytes written so far, leaving the buffer empty.
    pub fn take(&self) -> Vec<u8> {
        match self.0.lock() {
            Ok(mut b) => std::mem::take(&mut *b),
            Err(poisoned) => std::mem::take(&mut *poisoned.into_inner()),
        }
    }
}

impl Write for SharedBuf {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self.0.lock() {
            Ok(mut b) => {
                b.extend_from_slice(buf);
                Ok(buf.len())
            }
            Err(_) => Err(io::Error::other("trace buffer poisoned")),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What every sequence's JSON Lines rows say of the model: its shape and
/// the text of each token id.
#[derive(Clone)]
pub struct TraceContext {
    /// The model, in every row.
    pub model: ModelInfo,
    /// Token id → text.
    pub vocab: Arc<Vec<String>>,
}

impl TraceContext {
    /// A fresh tracer for one sequence, of `config`, keeping one forward in
    /// detail (the rows stream out as they end; the summary covers them
    /// all), with its sink: the rows go to the returned buffer.
    pub fn tracer<C: TraceConfig>(&self, config: C) -> (ModelTracer<C>, SharedBuf) {
        let options = TraceOptions {
            max_forwards: 1,
            attention_config: AttentionTraceConfig {
                top_k: 8,
                ..AttentionTraceConfig::default()
            },
            ..TraceOptions::default()
        };
        let mut tracer = ModelTracer::with_options(config, options);
        let buf = SharedBuf::default();
        if tracer.is_enabled() {
            let vocab = Arc::clone(&self.vocab);
            let sink = JsonlSink::new(buf.clone())
                .with_model(self.model.clone())
                .with_vocabulary(move |id| {
                    vocab
                        .get(id as usize)
                        .cloned()
                        .unwrap_or_else(|| format!("<{id}>"))
                });
            tracer.set_sink(Some(SinkHandle::new(sink)));
        }
        (tracer, buf)
    }
}

/// The outcome of a sequence whose tracer was `tracer`, its rows in `buf`.
pub fn outcome<C: TraceConfig>(tracer: &ModelTracer<C>, buf: &SharedBuf) -> TraceOutcome {
    if !tracer.is_enabled() {
        return TraceOutcome::default();
    }
    outcome_of(&tracer.summary(), buf.take())
}

/// The outcome of a sequence whose summary is `summary`, its rows `rows`.
pub fn outcome_of(summary: &TraceSummary, rows: Vec<u8>) -> TraceOutcome {
    TraceOutcome {
        rows,
        forwards: summary.forwards,
        anomalies: summary.total_anomalies(),
        first_anomaly: summary
            .first_anomaly
            .as_ref()
            .and_then(|a| serde_json::to_value(a).ok()),
    }
}
