//! What the scheduler needs of a model: sequences started at a trace
//! level, stepped together, read and finished. The HTTP side, the queue,
//! sampling, stop strings and the trace store are written against
//! [`Engine`] alone, whatever the model does to batch the rows of a step.
//!
//! Each sequence's trace is its own: its forwards stream, as the tracer's
//! JSON Lines rows, into a buffer of that sequence, and finishing the
//! sequence hands the rows back with its summary's anomaly count and
//! first anomaly.

use std::collections::HashMap;
use std::io::{self, Write};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use model_tracer::metrics::{MetricsSink, Tee};
use model_tracer::sink::{BackgroundFlush, BackgroundSink};
use model_tracer::summary::AnomalySite;
use model_tracer::tracer::MAX_SEQUENCES;
use model_tracer::{
    Anomaly, AttentionTraceConfig, ForwardSink, ForwardTrace, JsonlSink, ModelInfo, ModelTracer,
    SequenceId, SinkHandle, TraceConfig, TraceOptions, TraceSummary,
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

/// A sequence the engine runs: the tracer's id of its rows.
pub type SeqId = SequenceId;

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
    /// The first one.
    pub first: Option<Anomaly>,
    /// Where each kind first appeared in a forward, by (layer, stage).
    pub sites: Vec<AnomalySite>,
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

/// A `Write` into a buffer shared with whoever takes the bytes later.
#[derive(Clone, Default)]
pub struct SharedBuf(Arc<Mutex<Vec<u8>>>);

impl SharedBuf {
    /// Moves the bytes written so far to the end of `out`.
    pub fn drain_into(&self, out: &mut Vec<u8>) {
        let mut b = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        out.extend_from_slice(&b);
        b.clear();
    }
}

impl Write for SharedBuf {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut b = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        b.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The JSON Lines rows of the live traced sequences, by sequence.
pub type Rows = Arc<Mutex<HashMap<SequenceId, Vec<u8>>>>;

/// Locks `rows`, even when their holder panicked.
pub fn lock_rows(rows: &Rows) -> MutexGuard<'_, HashMap<SequenceId, Vec<u8>>> {
    rows.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The sink of a model's tracer that gives every sequence its own trace:
/// each forward becomes its JSON Lines row (the tracer's schema, naming
/// the model and the tokens' text) appended to the rows of its sequence,
/// if that sequence is one the engine traces.
struct RowRouter {
    sink: JsonlSink<SharedBuf>,
    line: SharedBuf,
    rows: Rows,
}

impl ForwardSink for RowRouter {
    fn write_forward(&mut self, forward: &ForwardTrace) -> io::Result<()> {
        let Some(id) = forward.sequence else {
            return Ok(());
        };
        let mut rows = lock_rows(&self.rows);
        let Some(out) = rows.get_mut(&id) else {
            return Ok(());
        };
        // A row that cannot be written is left out of its sequence's
        // trace; an error here would stop the sink for every sequence.
        if self.sink.write(forward).is_ok() {
            self.line.drain_into(out);
        } else {
            self.line.drain_into(&mut Vec::new());
        }
        Ok(())
    }

    fn tracer_config(&mut self, description: &str) {
        ForwardSink::tracer_config(&mut self.sink, description);
    }
}

/// Forwards queued for the thread that writes the rows: a step of
/// `MAX_SEQUENCES` rows fits, and the model waits for the writer beyond.
const ROWS_IN_FLIGHT: usize = 2 * MAX_SEQUENCES;

/// What every sequence's JSON Lines rows say of the model (its shape and
/// the text of each token id), and where they go.
#[derive(Clone)]
pub struct TraceContext {
    /// The model, in every row.
    pub model: ModelInfo,
    /// Token id → text.
    pub vocab: Arc<Vec<String>>,
    /// The rows of the live traced sequences.
    pub rows: Rows,
    /// The model-health metrics every traced forward is folded into (one
    /// sink for every model: the sequence ids are the engine's, unique
    /// across its models); a sequence's end is told to it with
    /// [`MetricsSink::finish_sequence`].
    pub metrics: MetricsSink,
}

impl TraceContext {
    /// Makes `tracer` anew for serving: one forward kept in detail per
    /// sequence (the rows stream out as they end; each sequence's summary
    /// covers them all), and the sink that routes every row to its
    /// sequence's trace and folds it into the metrics. The rows are
    /// written as JSON on a thread of their own, so the model's step only
    /// copies each forward; the handle returned waits for that thread
    /// (call it before taking a finished sequence's rows). A tracer that
    /// records nothing is left as it is: its requests are in no health
    /// family.
    pub fn install<C: TraceConfig>(&self, tracer: &mut ModelTracer<C>) -> Option<BackgroundFlush> {
        if !tracer.is_enabled() {
            return None;
        }
        let options = TraceOptions {
            max_forwards: 1,
            attention_config: AttentionTraceConfig {
                top_k: 8,
                ..AttentionTraceConfig::default()
            },
            ..TraceOptions::default()
        };
        *tracer = ModelTracer::with_options(tracer.config().clone(), options);
        let router = || {
            let vocab = Arc::clone(&self.vocab);
            let line = SharedBuf::default();
            let sink = JsonlSink::new(line.clone())
                .with_model(self.model.clone())
                .with_vocabulary(move |id| {
                    vocab
                        .get(id as usize)
                        .cloned()
                        .unwrap_or_else(|| format!("<{id}>"))
                });
            RowRouter {
                sink,
                line,
                rows: Arc::clone(&self.rows),
            }
        };
        // The metrics fold stays on the model's thread: a sequence's end
        // is told to them there, after its last forward.
        match BackgroundSink::new(router(), ROWS_IN_FLIGHT) {
            Ok(rows) => {
                let flush = rows.flusher();
                tracer.set_sink(Some(SinkHandle::new(Tee::new(rows, self.metrics.clone()))));
                Some(flush)
            }
            Err(_) => {
                // No thread to be had: the rows are written in the step.
                tracer.set_sink(Some(SinkHandle::new(Tee::new(
                    router(),
                    self.metrics.clone(),
                ))));
                None
            }
        }
    }
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
        first: summary.first_anomaly,
        sites: summary.anomaly_sites.clone(),
    }
}
