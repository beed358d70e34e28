//! `GET /metrics`: one Prometheus registry holding the model-health
//! families of the tracer ([`TraceMetrics`], fed by a [`MetricsSink`] teed
//! with each traced model's row router) and the serving families below,
//! encoded as OpenMetrics text on the async side. The table of the
//! families is in the [`serve`](super) module docs.
//!
//! Who updates what: the HTTP side counts each completion request by the
//! status and finish reason its client got, and times the text it sends
//! (time to first token, inter-token latency); the model thread counts the
//! tokens it runs and sets the running, waiting and KV-cache gauges.
//! Everything the model thread touches is an atomic, but for the tracer's
//! fold, whose own lock it alone takes, and a family's map, write-locked
//! only when a new series (a new corrupted origin, say) is first seen: a
//! scrape holds that map's read lock while it encodes the family, so only
//! then can the model thread wait on a scrape, for the few microseconds
//! one family takes to encode.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Instant;

use model_tracer::metrics::prometheus_client::encoding::text;
use model_tracer::metrics::prometheus_client::metrics::counter::Counter;
use model_tracer::metrics::prometheus_client::metrics::family::Family;
use model_tracer::metrics::prometheus_client::metrics::gauge::Gauge;
use model_tracer::metrics::prometheus_client::metrics::histogram::Histogram;
use model_tracer::metrics::prometheus_client::registry::Registry;
use model_tracer::metrics::{MetricsSink, TraceMetrics};

use super::openai::FinishReason;

/// The content type of `GET /metrics`.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Upper bounds, in seconds, of the latency histograms' buckets: 1 ms to
/// 10 s, about three per decade (a CPU model's token takes milliseconds
/// to a second; a first token behind a long prompt or a queue, seconds).
pub const LATENCY_BUCKETS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The `status` label's values: the HTTP statuses a completion request can
/// get, `499` for a client that left before its answer, `other` for any
/// other.
pub const STATUSES: [&str; 11] = [
    "200", "400", "404", "405", "413", "415", "422", "499", "500", "503", "other",
];

/// How a completion request ended, for the `finish_reason` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// An end-of-generation token or a stop string.
    Stop,
    /// `max_tokens`.
    Length,
    /// The client went away before the end.
    Abort,
    /// No generation: the request was refused or the model failed.
    Error,
}

impl Finish {
    fn name(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::Abort => "abort",
            Self::Error => "error",
        }
    }
}

impl From<FinishReason> for Finish {
    fn from(r: FinishReason) -> Self {
        match r {
            FinishReason::Stop => Self::Stop,
            FinishReason::Length => Self::Length,
        }
    }
}

/// The `status` label of an HTTP status.
fn status_label(status: u16) -> &'static str {
    let code = status.to_string();
    STATUSES
        .iter()
        .find(|s| **s == code)
        .copied()
        .unwrap_or("other")
}

/// `[("status", …), ("finish_reason", …)]`.
type RequestLabels = [(&'static str, &'static str); 2];

type GaugeF64 = Gauge<f64, AtomicU64>;

/// The server's registry and its families.
pub struct ServeMetrics {
    registry: Registry,
    /// The sink of the traced models' tracers into the model-health
    /// families (one, shared: the sequences' ids are the engine's, unique
    /// across its models).
    pub sink: MetricsSink,
    requests: Family<RequestLabels, Counter>,
    /// Prompt positions the model ran.
    pub prompt_tokens: Counter,
    /// Tokens the model generated.
    pub generation_tokens: Counter,
    ttft: Histogram,
    itl: Histogram,
    /// Positions held by the running sequences over those the server
    /// allows.
    pub kv_usage: GaugeF64,
}

impl ServeMetrics {
    /// A registry with every family registered, and no series yet; the
    /// gauges of the running and the waiting requests are `running` and
    /// `waiting`, which `/health` reads too.
    pub fn new(running: &Gauge, waiting: &Gauge) -> Self {
        let mut registry = Registry::default();
        let sink = TraceMetrics::register(&mut registry).sink();
        let m = Self {
            registry: Registry::default(),
            sink,
            requests: Family::default(),
            prompt_tokens: Counter::default(),
            generation_tokens: Counter::default(),
            ttft: Histogram::new(LATENCY_BUCKETS),
            itl: Histogram::new(LATENCY_BUCKETS),
            kv_usage: GaugeF64::default(),
        };
        registry.register(
            "model_tracer_completion_requests",
            "Completion requests answered, by HTTP status and finish reason",
            m.requests.clone(),
        );
        registry.register(
            "model_tracer_prompt_tokens",
            "Prompt tokens the model ran",
            m.prompt_tokens.clone(),
        );
        registry.register(
            "model_tracer_generation_tokens",
            "Tokens the model generated",
            m.generation_tokens.clone(),
        );
        registry.register(
            "model_tracer_time_to_first_token_seconds",
            "From a completion request's arrival to its first text (or its end, if it has none)",
            m.ttft.clone(),
        );
        registry.register(
            "model_tracer_inter_token_latency_seconds",
            "Between two successive pieces of a completion's text",
            m.itl.clone(),
        );
        registry.register(
            "model_tracer_requests_running",
            "Sequences the model runs now",
            running.clone(),
        );
        registry.register(
            "model_tracer_requests_waiting",
            "Requests waiting in the queue for a sequence slot",
            waiting.clone(),
        );
        registry.register(
            "model_tracer_kv_cache_usage_ratio",
            "Positions in the KV caches of the running sequences over --parallel times the context",
            m.kv_usage.clone(),
        );
        Self { registry, ..m }
    }

    /// The OpenMetrics text of every family.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::with_capacity(64 * 1024);
        text::encode(&mut out, &self.registry)?;
        Ok(out)
    }

    /// Counts a finished completion request.
    pub fn request_finished(&self, status: u16, finish: Finish) {
        self.requests
            .get_or_create(&[
                ("status", status_label(status)),
                ("finish_reason", finish.name()),
            ])
            .inc();
    }
}

/// One completion request as its client sees it: its latencies as its
/// text arrives, and its count by status and finish reason, made at its
/// end (before the client reads the end), or when it is dropped before
/// its end, its client gone (an abort).
pub struct RequestTimer {
    metrics: Arc<ServeMetrics>,
    arrived: Instant,
    last_text: Option<Instant>,
    status: u16,
    counted: bool,
}

impl RequestTimer {
    /// A request that arrived now; until told otherwise, its client left
    /// before any answer (`499`, `abort`).
    pub fn new(metrics: Arc<ServeMetrics>) -> Self {
        Self {
            metrics,
            arrived: Instant::now(),
            last_text: None,
            status: 499,
            counted: false,
        }
    }

    /// Its answer's status is `status` (a stream's 200, once sent).
    pub fn answered(&mut self, status: u16) {
        self.status = status;
    }

    /// A piece of text arrived from the model thread.
    pub fn text(&mut self) {
        let now = Instant::now();
        match self.last_text {
            None => self
                .metrics
                .ttft
                .observe(now.duration_since(self.arrived).as_secs_f64()),
            Some(last) => self
                .metrics
                .itl
                .observe(now.duration_since(last).as_secs_f64()),
        }
        self.last_text = Some(now);
    }

    /// The request ended with `status` and `finish`: counts it.
    pub fn finished(&mut self, status: u16, finish: Finish) {
        if self.counted {
            return;
        }
        if finish != Finish::Error && self.last_text.is_none() {
            // No text at all (the first token ended the generation): its
            // first token came with the end.
            self.text();
        }
        self.metrics.request_finished(status, finish);
        self.counted = true;
    }
}

impl Drop for RequestTimer {
    fn drop(&mut self) {
        if !self.counted {
            self.metrics.request_finished(self.status, Finish::Abort);
        }
    }
}
