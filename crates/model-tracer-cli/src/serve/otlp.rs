//! Anomalies as `tracing` events, and `serve --otlp-endpoint URL`: those
//! events exported as OpenTelemetry log records, and each request as a
//! span, over OTLP/HTTP with protobuf bodies.
//!
//! # The events
//!
//! When a request ends, the model thread emits, with target [`TARGET`] and
//! level WARN, one event named `model_tracer.anomaly` for each (layer,
//! stage, kind) at which a fault kind (`nan`, `inf`, `explosion`) first
//! appeared in some forward of the request: the tracer reports a kind once
//! per forward, where it first appears, so a fault shows at its origin and
//! not at every stage it propagates to, and a fault injected at one layer
//! gives one event per request however many positions it spoils. The
//! fields, which become the log record's attributes:
//!
//! | field | what |
//! | --- | --- |
//! | `request_id` | the id the client sees (`chatcmpl-…`, `cmpl-…`), also its trace's |
//! | `sequence` | the sequence id of the request in the batched forwards |
//! | `layer` | layer index; absent for the embedding, final norm and logits |
//! | `stage` | stage name (`post_attn`, …), as in `run --json` |
//! | `kind` | `nan`, `inf` or `explosion` |
//! | `position` | the first position at which an anomaly was reported at this (layer, stage) |
//! | `last_position` | the last one |
//! | `forwards` | forwards of the request that reported this kind here |
//! | `first` | whether this is the request's first anomaly (`model_trace.first_anomaly`) |
//! | `anomalies` | the request's anomalies of every kind (`model_trace.anomalies`) |
//!
//! The request's first anomaly comes first. A request gives at most
//! [`MAX_EVENTS`] such events; past them one `model_tracer.anomaly.left_out`
//! event counts the rest. The diagnostic kinds (`vanishing`,
//! `residual_dominance`), which healthy models show (SmolLM2's first token
//! does on every request), are no events: they stay in the response's
//! `model_trace` and in the request's trace. A request traced `off`
//! records nothing, so it gives no event.
//!
//! Without `--otlp-endpoint` no subscriber is installed and the events go
//! nowhere (a `tracing` call without a subscriber costs a load and a
//! branch).
//!
//! # The export
//!
//! `--otlp-endpoint` names the collector's base URL (`http://HOST:PORT`,
//! 4318 for a collector's OTLP/HTTP receiver); the log records go to
//! `URL/v1/logs` and the spans to `URL/v1/traces`, under the resource
//! `service.name = model-tracer`. Each request also gives a span
//! `completion` (from its admission to its end; attributes `request_id`,
//! `level`, token counts, `finish_reason`, `anomalies`) with two children,
//! `prefill` and `decode`; its anomaly records carry its trace and span
//! ids.
//!
//! The SDK's batch processors export from threads of their own: the model
//! thread only hands a record to a bounded queue (2048 records; when it is
//! full, records are dropped and the SDK says so), never waiting on the
//! network. A batch leaves every second ([`EXPORT_DELAY`]): the server
//! runs until it is killed, so what is still queued then is lost, at most
//! the last second's. An export that fails (no collector there) is
//! reported on stderr and the server goes on.

use std::time::{Duration, SystemTime};

use opentelemetry::trace::{Span as _, SpanKind, TraceContextExt as _, Tracer as _};
use opentelemetry::trace::{Status, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{LogExporter, Protocol, SpanExporter, WithExportConfig as _};
use opentelemetry_sdk::logs::{BatchLogProcessor, SdkLoggerProvider};
use opentelemetry_sdk::trace::{BatchSpanProcessor, SdkTracer, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::Layer as _;

use model_tracer::AnomalyKind;

use super::engine::{SeqId, TraceOutcome};

/// Target of the anomaly events (the log records' scope).
pub const TARGET: &str = "model_tracer::serve";

/// Anomaly events of one request at most.
pub const MAX_EVENTS: usize = 16;

/// How long a record waits, at most, before its batch is exported.
pub const EXPORT_DELAY: Duration = Duration::from_secs(1);

/// How long one export may take before it counts as failed.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// The service name of the resource.
const SERVICE_NAME: &str = "model-tracer";

/// `--otlp-endpoint`: a collector's base URL, `http://HOST[:PORT][/PATH]`
/// (no TLS: a collector on the host, or a sidecar). Returns it without a
/// trailing slash.
pub fn parse_endpoint(url: &str) -> Result<String, String> {
    let bad = |why: &str| format!("{url:?} is not a collector URL (http://HOST:PORT): {why}");
    let Some(rest) = url.strip_prefix("http://") else {
        return Err(if url.starts_with("https://") {
            bad("https is not supported; use http:// to a collector on the host or a sidecar")
        } else {
            bad("it must start with http://")
        });
    };
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.is_empty() {
        return Err(bad("it names no host"));
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad("it holds whitespace"));
    }
    if rest.contains(['?', '#']) || authority.contains('@') {
        return Err(bad("a base URL has no query, fragment or user"));
    }
    // `HOST`, `HOST:PORT`, `[V6]` or `[V6]:PORT`.
    let (host, port) = match authority.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((host, "")) => (host, None),
            Some((host, port)) => match port.strip_prefix(':') {
                Some(port) => (host, Some(port)),
                None => return Err(bad("it has characters after its IPv6 address")),
            },
            None => return Err(bad("its IPv6 address has no closing bracket")),
        },
        None => match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        },
    };
    if host.is_empty() {
        return Err(bad("it names no host"));
    }
    if port.is_some_and(|p| p.parse::<u16>().map_or(true, |p| p == 0)) {
        return Err(bad("its port is not a number from 1 to 65535"));
    }
    let url = url.trim_end_matches('/').to_string();
    // What the exporter will parse.
    if format!("{url}/v1/logs").parse::<http::Uri>().is_err() {
        return Err(bad("it does not parse as a URI"));
    }
    Ok(url)
}

/// The running export: the log and trace pipelines, and the subscriber
/// that feeds them. Dropping it flushes what is queued and stops them.
pub struct Otlp {
    logs: SdkLoggerProvider,
    traces: SdkTracerProvider,
    tracer: SdkTracer,
}

impl Otlp {
    /// Starts exporting to the collector at `endpoint` (a base URL that
    /// [`parse_endpoint`] accepted): builds both exporters and installs
    /// the process's `tracing` subscriber, in which the anomaly events go
    /// to the log pipeline and the SDK's own warnings and errors (failed
    /// exports) to stderr.
    pub fn start(endpoint: &str) -> Result<Self, String> {
        let resource = Resource::builder().with_service_name(SERVICE_NAME).build();
        let log_exporter = LogExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(format!("{endpoint}/v1/logs"))
            .with_timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(|e| format!("--otlp-endpoint {endpoint}: {e}"))?;
        let span_exporter = SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(format!("{endpoint}/v1/traces"))
            .with_timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(|e| format!("--otlp-endpoint {endpoint}: {e}"))?;
        let log_batch = opentelemetry_sdk::logs::BatchConfigBuilder::default()
            .with_scheduled_delay(EXPORT_DELAY)
            .build();
        let span_batch = opentelemetry_sdk::trace::BatchConfigBuilder::default()
            .with_scheduled_delay(EXPORT_DELAY)
            .build();
        let logs = SdkLoggerProvider::builder()
            .with_resource(resource.clone())
            .with_log_processor(
                BatchLogProcessor::builder(log_exporter)
                    .with_batch_config(log_batch)
                    .build(),
            )
            .build();
        let traces = SdkTracerProvider::builder()
            .with_resource(resource)
            .with_span_processor(
                BatchSpanProcessor::builder(span_exporter)
                    .with_batch_config(span_batch)
                    .build(),
            )
            .build();
        let tracer = traces.tracer(SERVICE_NAME);

        // Only the anomaly events become log records: the SDK's and the
        // HTTP client's own events would otherwise be exported too, each
        // export making more.
        let bridge = opentelemetry_appender_tracing::layer::OpenTelemetryTracingBridge::new(&logs)
            .with_filter(Targets::new().with_target(TARGET, LevelFilter::INFO));
        let diagnostics = tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .with_filter(Targets::new().with_target("opentelemetry", LevelFilter::WARN));
        let subscriber = tracing_subscriber::registry()
            .with(bridge)
            .with(diagnostics);
        tracing::subscriber::set_global_default(subscriber)
            .map_err(|e| format!("cannot install the event subscriber: {e}"))?;
        Ok(Self {
            logs,
            traces,
            tracer,
        })
    }

    /// Records the span of a request that ran from `started` to now, its
    /// prompt read by `prefilled`, and emits its anomaly events in it.
    pub fn request(&self, request: &RequestEnd<'_>) {
        let end = SystemTime::now();
        let prefilled = request.prefilled.unwrap_or(end);
        let mut attributes = vec![
            KeyValue::new("request_id", request.id.to_string()),
            KeyValue::new("sequence", request.seq.0 as i64),
            KeyValue::new("level", request.level),
            KeyValue::new("prompt_tokens", request.prompt_tokens as i64),
            KeyValue::new("completion_tokens", request.completion_tokens as i64),
            KeyValue::new("finish_reason", request.finish_reason),
            KeyValue::new("anomalies", request.outcome.anomalies as i64),
        ];
        if let Some(a) = &request.outcome.first {
            attributes.push(KeyValue::new("first_anomaly.kind", a.kind.name()));
        }
        let span = self
            .tracer
            .span_builder("completion")
            .with_kind(SpanKind::Server)
            .with_start_time(request.started)
            .with_attributes(attributes)
            .start(&self.tracer);
        let cx = Context::current_with_span(span);
        for (name, from, to) in [
            ("prefill", request.started, prefilled),
            ("decode", prefilled, end),
        ] {
            let mut child = self
                .tracer
                .span_builder(name)
                .with_kind(SpanKind::Internal)
                .with_start_time(from)
                .start_with_context(&self.tracer, &cx);
            child.end_with_timestamp(to);
        }
        {
            let _in_span = cx.clone().attach();
            anomaly_events(request.id, request.seq, request.outcome);
        }
        if request.outcome.first.is_some_and(|a| a.kind.is_fault()) {
            cx.span()
                .set_status(Status::error("the trace recorded a fault"));
        }
        cx.span().end_with_timestamp(end);
    }
}

impl Drop for Otlp {
    fn drop(&mut self) {
        // What is queued is sent now; a collector that is gone was
        // reported by the exports already.
        let _ = self.traces.shutdown();
        let _ = self.logs.shutdown();
    }
}

/// A request that ended, as its span tells it.
pub struct RequestEnd<'a> {
    /// Its id.
    pub id: &'a str,
    /// Its sequence.
    pub seq: SeqId,
    /// Its trace level's name.
    pub level: &'static str,
    /// When the model thread took it.
    pub started: SystemTime,
    /// When its prompt was read, if it was.
    pub prefilled: Option<SystemTime>,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub completion_tokens: usize,
    /// Why it ended (`stop`, `length`).
    pub finish_reason: &'static str,
    /// What its tracer recorded.
    pub outcome: &'a TraceOutcome,
}

/// Emits the anomaly events of the request `id` (sequence `seq`) whose
/// trace is `outcome` (see the module's docs).
pub fn anomaly_events(id: &str, seq: SeqId, outcome: &TraceOutcome) {
    if outcome.sites.is_empty() {
        return;
    }
    let first = outcome.first.filter(|a| a.kind.is_fault());
    let mut events: Vec<_> = outcome
        .sites
        .iter()
        .flat_map(|site| {
            AnomalyKind::ALL
                .into_iter()
                .filter(|k| k.is_fault() && site.counts[*k as usize] > 0)
                .map(move |kind| (site, kind))
        })
        .map(|(site, kind)| {
            let is_first = first
                .is_some_and(|a| a.layer == site.layer && a.stage == site.stage && a.kind == kind);
            (site, kind, is_first)
        })
        .collect();
    // The first anomaly, then by position.
    events.sort_by_key(|(site, _, is_first)| (!is_first, site.first_position));
    let left_out = events.len().saturating_sub(MAX_EVENTS);
    for (site, kind, is_first) in events.into_iter().take(MAX_EVENTS) {
        let forwards = site.counts[kind as usize];
        let place = match site.layer {
            Some(l) => format!("layer {l} {}", site.stage.name()),
            None => site.stage.name().to_string(),
        };
        tracing::warn!(
            name: "model_tracer.anomaly",
            target: TARGET,
            request_id = id,
            sequence = seq.0,
            layer = site.layer.map(|l| l as u64),
            stage = site.stage.name(),
            kind = kind.name(),
            position = site.first_position as u64,
            last_position = site.last_position as u64,
            forwards = forwards as u64,
            first = is_first,
            anomalies = outcome.anomalies as u64,
            "{kind} at {place}, positions {} to {} ({forwards} forwards), request {id}",
            site.first_position,
            site.last_position,
        );
    }
    if left_out > 0 {
        tracing::warn!(
            name: "model_tracer.anomaly.left_out",
            target: TARGET,
            request_id = id,
            sequence = seq.0,
            left_out = left_out as u64,
            anomalies = outcome.anomalies as u64,
            "{left_out} more anomaly sites of request {id} were left out"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::parse_endpoint;

    #[test]
    fn a_collector_url_is_an_http_base_url() {
        assert_eq!(
            parse_endpoint("http://127.0.0.1:4318/").as_deref(),
            Ok("http://127.0.0.1:4318")
        );
        assert_eq!(
            parse_endpoint("http://collector/otlp").as_deref(),
            Ok("http://collector/otlp")
        );
        assert!(parse_endpoint("http://[::1]:4318").is_ok());
        for bad in [
            "",
            "127.0.0.1:4318",
            "not a url",
            "https://127.0.0.1:4318",
            "http://",
            "http://:4318",
            "http://host:port",
            "http://host:0",
            "http://host:70000",
            "http://ho st:4318",
            "http://host:4318/?q=1",
            "ftp://host",
        ] {
            assert!(parse_endpoint(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
