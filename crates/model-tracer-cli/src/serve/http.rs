//! The HTTP side: axum routes, the body read under a size limit, the
//! request checked and queued for the model thread (or answered 503 when
//! the queue is full), and its events turned into one response or a
//! stream of server-sent events. Every error is OpenAI's error object.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt as _;
use serde_json::json;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use model_tracer_llama::tokenizer::Tokenizer;

use super::engine::Level;
use super::metrics::{self, Finish, RequestTimer, ServeMetrics};
use super::openai::{self, ApiError, Endpoint, Envelope, Limits};
use super::scheduler::{Event, Job, Stats};
use super::traces::{self, SharedStore};

/// What every handler shares.
pub struct Shared {
    /// Into the model thread.
    pub queue: SyncSender<Job>,
    /// The model thread's counts.
    pub stats: Arc<Stats>,
    /// The registry of `/metrics`.
    pub metrics: Arc<ServeMetrics>,
    /// The kept traces.
    pub store: SharedStore,
    /// The model's tokenizer, for the prompts.
    pub tokenizer: Option<Arc<Tokenizer>>,
    /// Positions one sequence holds.
    pub context: usize,
    /// Requests the queue holds.
    pub queue_capacity: usize,
    /// The model's name in the responses.
    pub model: String,
    /// The level of a request that asks for none.
    pub level: Level,
    /// Every N-th request is traced `Full` (0: none).
    pub full_every: u64,
    /// Bytes a request body may have.
    pub max_body: usize,
    /// Requests received, for their ids and default seeds.
    pub counter: AtomicU64,
    /// Distinguishes this server's request ids from another run's.
    pub nonce: u64,
}

type App = State<Arc<Shared>>;

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = (status, Json(self.body())).into_response();
        if self.status == 503 {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

/// The routes.
pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(scrape))
        .route("/v1/traces/{id}", get(trace_rows))
        .route("/v1/traces/{id}/report", get(trace_report))
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(not_found)
        .with_state(shared)
}

async fn not_found() -> ApiError {
    ApiError::new(
        404,
        "invalid_request_error",
        "unknown_url",
        "no such route: see /v1/chat/completions, /v1/completions, /v1/models, /v1/traces/{id}, /health, /metrics",
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        405,
        "invalid_request_error",
        "method_not_allowed",
        "this route does not take that method",
    )
}

async fn models(State(app): App) -> Json<serde_json::Value> {
    Json(json!({
        "object": "list",
        "data": [{"id": app.model, "object": "model", "created": 0, "owned_by": "model-tracer"}],
    }))
}

async fn health(State(app): App) -> Json<serde_json::Value> {
    let s = &app.stats;
    let busy = usize::try_from(s.running.get()).unwrap_or(0);
    let (kept, bytes) = {
        let store = traces::lock(&app.store);
        (store.len(), store.bytes())
    };
    Json(json!({
        "status": "ok",
        "model": app.model,
        "slots": {"total": s.slots, "busy": busy, "free": s.slots.saturating_sub(busy)},
        "queued": s.queued.get().max(0),
        "queue": {"capacity": app.queue_capacity},
        "context": app.context,
        "finished": s.finished.load(Ordering::Relaxed),
        "abandoned": s.abandoned.load(Ordering::Relaxed),
        "traces": {"kept": kept, "bytes": bytes},
    }))
}

/// The OpenMetrics text of the registry. Encoding reads atomics and takes
/// each family's read lock in turn, for some microseconds: it runs here, on
/// an async worker, and never stops the model thread (see the
/// [`metrics`] module).
async fn scrape(State(app): App) -> Response {
    match app.metrics.encode() {
        Ok(text) => ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], text).into_response(),
        Err(_) => ApiError::new(
            500,
            "server_error",
            "metrics_failed",
            "encoding the metrics failed",
        )
        .into_response(),
    }
}

fn unknown_trace(id: &str) -> ApiError {
    ApiError::new(
        404,
        "not_found_error",
        "trace_not_found",
        format!("no trace {id:?}: unknown, not traced, or no longer kept (--keep-traces)"),
    )
}

async fn trace_rows(State(app): App, Path(id): Path<String>) -> Response {
    match traces::lock(&app.store).get(&id) {
        Some(t) => (
            [(header::CONTENT_TYPE, "application/x-ndjson")],
            t.rows.clone(),
        )
            .into_response(),
        None => unknown_trace(&id).into_response(),
    }
}

async fn trace_report(State(app): App, Path(id): Path<String>) -> Response {
    let Some(trace) = traces::lock(&app.store).get(&id) else {
        return unknown_trace(&id).into_response();
    };
    let name = app.model.clone();
    match tokio::task::spawn_blocking(move || trace.report(&name)).await {
        Ok(Ok(html)) => {
            ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], html).into_response()
        }
        Ok(Err(e)) => ApiError::new(500, "server_error", "report_failed", e).into_response(),
        Err(_) => ApiError::new(
            500,
            "server_error",
            "report_failed",
            "rendering the report failed",
        )
        .into_response(),
    }
}

async fn chat(State(app): App, headers: HeaderMap, body: Body) -> Response {
    complete(app, Endpoint::Chat, headers, body).await
}

async fn completions(State(app): App, headers: HeaderMap, body: Body) -> Response {
    complete(app, Endpoint::Completions, headers, body).await
}

/// Reads the body, at most `limit` bytes. A larger one is answered 413,
/// after reading (and dropping) it up to `DRAIN` times `limit`, so that a
/// client still sending it reads the answer instead of a reset connection.
async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Vec<u8>, ApiError> {
    const DRAIN: u64 = 8;
    let too_large = || {
        ApiError::new(
            413,
            "invalid_request_error",
            "request_too_large",
            format!("the body is over {limit} bytes"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let drain_cap = (limit as u64).saturating_mul(DRAIN);
    if declared.is_some_and(|n| n > drain_cap) {
        return Err(too_large());
    }
    let mut out = Vec::new();
    let mut seen: u64 = 0;
    let mut stream = body.into_data_stream();
    while let Some(part) = stream.next().await {
        let part = part.map_err(|e| {
            ApiError::new(
                400,
                "invalid_request_error",
                "body_unreadable",
                format!("reading the body failed: {e}"),
            )
        })?;
        seen += part.len() as u64;
        if seen > drain_cap {
            return Err(too_large());
        }
        if seen <= limit as u64 {
            out.extend_from_slice(&part);
        }
    }
    if seen > limit as u64 {
        return Err(too_large());
    }
    Ok(out)
}

async fn complete(
    app: Arc<Shared>,
    endpoint: Endpoint,
    headers: HeaderMap,
    body: Body,
) -> Response {
    // Counts the request when dropped: at its end, or when its client
    // leaves and axum drops this future or the stream.
    let mut timer = RequestTimer::new(Arc::clone(&app.metrics));
    match start(&app, endpoint, &headers, body).await {
        Ok((envelope, request, events)) => {
            if request.stream {
                timer.answered(200);
                stream_response(envelope, request.include_usage, events, timer).into_response()
            } else {
                whole_response(envelope, events, timer).await
            }
        }
        Err(e) => {
            timer.finished(e.status, Finish::Error);
            e.into_response()
        }
    }
}

/// Checks the request and queues it.
async fn start(
    app: &Arc<Shared>,
    endpoint: Endpoint,
    headers: &HeaderMap,
    body: Body,
) -> Result<(Envelope, openai::Request, UnboundedReceiver<Event>), ApiError> {
    let bytes = read_body(headers, body, app.max_body).await?;
    let n = app.counter.fetch_add(1, Ordering::Relaxed);
    let tokenizer = app.tokenizer.clone();
    let (context, nonce) = (app.context, app.nonce);
    // Tokenizing a long prompt takes a while: off the async workers.
    let parsed = tokio::task::spawn_blocking(move || {
        let limits = Limits {
            tokenizer: tokenizer.as_deref(),
            context,
            default_seed: nonce ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15),
        };
        openai::parse_request(endpoint, &bytes, &limits)
    })
    .await
    .map_err(|_| {
        ApiError::new(
            500,
            "server_error",
            "internal",
            "reading the request failed",
        )
    })??;
    let level = parsed.level.unwrap_or(
        if app.full_every > 0 && n % app.full_every == app.full_every - 1 {
            Level::Full
        } else {
            app.level
        },
    );
    let prefix = match endpoint {
        Endpoint::Chat => "chatcmpl",
        Endpoint::Completions => "cmpl",
    };
    let id = format!("{prefix}-{:x}{n:06}", app.nonce & 0xffff_ffff);
    let (tx, rx) = unbounded_channel();
    let job = Job {
        id: id.clone(),
        prompt: parsed.prompt.clone(),
        max_tokens: parsed.max_tokens,
        sampling: parsed.sampling,
        stop: parsed.stop.clone(),
        level,
        events: tx,
    };
    app.stats.queued.inc();
    if let Err(e) = app.queue.try_send(job) {
        app.stats.queued.dec();
        return Err(match e {
            TrySendError::Full(_) => ApiError::new(
                503,
                "server_error",
                "queue_full",
                "every sequence slot is busy and the queue is full: retry later",
            ),
            TrySendError::Disconnected(_) => ApiError::new(
                503,
                "server_error",
                "model_stopped",
                "the model thread stopped",
            ),
        });
    }
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let envelope = Envelope {
        id,
        endpoint,
        created,
        model: app.model.clone(),
    };
    Ok((envelope, parsed, rx))
}

async fn whole_response(
    envelope: Envelope,
    mut events: UnboundedReceiver<Event>,
    mut timer: RequestTimer,
) -> Response {
    let mut text = String::new();
    loop {
        match events.recv().await {
            Some(Event::Text(t)) => {
                timer.text();
                text.push_str(&t)
            }
            Some(Event::Done(done)) => {
                timer.finished(200, done.finish.into());
                return Json(envelope.response(&text, done.finish, done.usage, done.model_trace))
                    .into_response();
            }
            Some(Event::Failed(e)) => {
                timer.finished(e.status, Finish::Error);
                return e.into_response();
            }
            None => {
                timer.finished(500, Finish::Error);
                return ApiError::new(
                    500,
                    "server_error",
                    "model_stopped",
                    "the model thread stopped",
                )
                .into_response();
            }
        }
    }
}

/// Where a stream is.
enum Phase {
    /// Before the first chunk.
    Start,
    /// Sending text.
    Text,
    /// The end sent but for `[DONE]`.
    Closing,
    /// Everything sent.
    Over,
}

fn stream_response(
    envelope: Envelope,
    include_usage: bool,
    events: UnboundedReceiver<Event>,
    timer: RequestTimer,
) -> Sse<impl futures_util::Stream<Item = Result<SseEvent, Infallible>>> {
    let data = |v: serde_json::Value| SseEvent::default().data(v.to_string());
    let state = (
        events,
        Phase::Start,
        std::collections::VecDeque::<SseEvent>::new(),
        timer,
    );
    let stream = futures_util::stream::unfold(
        state,
        move |(mut events, mut phase, mut pending, mut timer)| {
            let envelope = envelope.clone();
            async move {
                loop {
                    if let Some(e) = pending.pop_front() {
                        return Some((Ok(e), (events, phase, pending, timer)));
                    }
                    match phase {
                        Phase::Over => return None,
                        Phase::Closing => {
                            phase = Phase::Over;
                            pending.push_back(SseEvent::default().data("[DONE]"));
                            continue;
                        }
                        Phase::Start if envelope.endpoint == Endpoint::Chat => {
                            phase = Phase::Text;
                            pending.push_back(data(envelope.text_chunk("", true)));
                            continue;
                        }
                        Phase::Start | Phase::Text => phase = Phase::Text,
                    }
                    match events.recv().await {
                        Some(Event::Text(t)) => {
                            timer.text();
                            pending.push_back(data(envelope.text_chunk(&t, false)))
                        }
                        Some(Event::Done(done)) => {
                            timer.finished(200, done.finish.into());
                            if include_usage {
                                pending.push_back(data(envelope.finish_chunk(done.finish, None)));
                                pending.push_back(data(
                                    envelope.usage_chunk(done.usage, done.model_trace),
                                ));
                            } else {
                                pending.push_back(data(
                                    envelope.finish_chunk(done.finish, Some(done.model_trace)),
                                ));
                            }
                            phase = Phase::Closing;
                        }
                        Some(Event::Failed(e)) => {
                            // The stream's status was 200; its end is an
                            // error.
                            timer.finished(200, Finish::Error);
                            pending.push_back(data(e.body()));
                            phase = Phase::Closing;
                        }
                        None => {
                            timer.finished(200, Finish::Error);
                            let e = ApiError::new(
                                500,
                                "server_error",
                                "model_stopped",
                                "the model thread stopped",
                            );
                            pending.push_back(data(e.body()));
                            phase = Phase::Closing;
                        }
                    }
                }
            }
        },
    );
    Sse::new(stream).keep_alive(KeepAlive::default())
}
