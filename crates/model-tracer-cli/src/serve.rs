//! `model-tracer serve`: the traced model behind an OpenAI-compatible HTTP
//! server. The model runs on its own OS thread ([`scheduler`]), fed by a
//! bounded queue; the async side ([`http`]) checks requests ([`openai`]),
//! queues them and streams their tokens back. Each request's trace is its
//! own and is kept for a while ([`traces`]).
//!
//! # `GET /metrics`
//!
//! OpenMetrics text ([`metrics`]) of one registry: the tracer's
//! model-health families (`model_tracer::metrics`, fed by the requests
//! traced at `lightweight` or `full`; a request at `off` records nothing
//! and is in none of them) and these serving families:
//!
//! | family | type | labels |
//! |---|---|---|
//! | `model_tracer_completion_requests_total` | counter | `status` (`200 400 404 405 413 415 422 499 500 503 other`), `finish_reason` (`stop length abort error`) |
//! | `model_tracer_prompt_tokens_total` | counter | — |
//! | `model_tracer_generation_tokens_total` | counter | — |
//! | `model_tracer_time_to_first_token_seconds` | histogram (1 ms … 10 s) | — |
//! | `model_tracer_inter_token_latency_seconds` | histogram (1 ms … 10 s) | — |
//! | `model_tracer_requests_running` | gauge | — |
//! | `model_tracer_requests_waiting` | gauge | — |
//! | `model_tracer_kv_cache_usage_ratio` | gauge | — |
//!
//! The HTTP side counts a completion request by the status its client got
//! and its finish reason (`abort`: the client left before the end, with
//! status `499` if it was waiting for a whole response) and times the text it receives from the model thread; the model thread
//! counts the tokens it runs and sets the gauges. The KV cache's usage is
//! the positions in the running sequences' caches over `--parallel` × the
//! context. A scrape encodes on an async worker and never waits for the
//! model thread, nor the model thread for it, but for a family's map the
//! first time the model thread sees a new series.
//!
//! The faults a request's trace recorded become `tracing` events when it
//! ends, exported with its span to an OpenTelemetry collector by
//! `--otlp-endpoint` ([`otlp`]).

mod batch;
mod engine;
mod http;
mod metrics;
mod openai;
mod otlp;
mod sampling;
mod scheduler;
mod text;
mod traces;

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use model_tracer::tracer::MAX_SEQUENCES;
use model_tracer::{Disabled, Full, Lightweight, ModelInfo, TraceConfig};
use model_tracer_llama::model::{Fault, KvCacheOptions, KvType, Llama};

use crate::setup::outputs::model_info;
use crate::setup::{CacheArgs, Engine as _, ModelArgs};
use engine::{Level, TraceContext};
use metrics::ServeMetrics;
use scheduler::{Scheduler, Stats};
use traces::TraceStore;

/// Bytes a request body may have.
const MAX_BODY: usize = 1 << 20;

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    cache: CacheArgs,

    /// Address to listen on
    #[arg(long, default_value = "127.0.0.1", help_heading = "Server")]
    host: String,
    /// Port to listen on; 0 picks a free one (the `listening on` line
    /// names it)
    #[arg(long, default_value_t = 8080, help_heading = "Server")]
    port: u16,
    /// Sequences the model runs at once
    #[arg(long, default_value_t = 4, value_name = "N", help_heading = "Server")]
    parallel: usize,
    /// Requests waiting for a free sequence at most; beyond it a request is
    /// answered 503 with Retry-After [default: 4 × --parallel]
    #[arg(long, value_name = "N", help_heading = "Server")]
    queue: Option<usize>,

    /// Trace level of a request that asks for none (`"model_trace":
    /// {"level": …}` in the body): Llama<Disabled|Lightweight|Full>
    #[arg(long, default_value = "lightweight", value_name = "LEVEL",
          value_parser = ["off", "lightweight", "full"], help_heading = "Tracing")]
    trace: String,
    /// Traces kept, of the most recent requests, for /v1/traces/{id}; each
    /// holds one JSON Lines row per position (its prompt and generated
    /// tokens)
    #[arg(long, default_value_t = 64, value_name = "N", help_heading = "Tracing")]
    keep_traces: usize,
    /// Trace one request in N at level full (0: none)
    #[arg(long, default_value_t = 0, value_name = "N", help_heading = "Tracing")]
    full_every: u64,
    /// nan@LAYER | inf@LAYER | explode@LAYER | scale@LAYER[:STAGE] |
    /// swap@LAYER[:STAGE]: inject a fault into every forward of every
    /// request, as `run --inject` does
    #[arg(long, value_name = "FAULT", value_parser = Fault::parse, help_heading = "Tracing")]
    inject: Option<Fault>,

    /// Export each request's anomalies (log records) and span to the
    /// OpenTelemetry collector at URL, over OTLP/HTTP with protobuf:
    /// URL/v1/logs and URL/v1/traces (e.g. http://127.0.0.1:4318)
    #[arg(long, value_name = "URL", value_parser = otlp::parse_endpoint,
          help_heading = "Tracing")]
    otlp_endpoint: Option<String>,
}

/// `model-tracer serve`.
pub fn serve(args: &Args) -> Result<(), String> {
    if args.model.engine != "reference" {
        return Err("serve runs the reference decoder: drop --engine".into());
    }
    if !(1..=MAX_SEQUENCES).contains(&args.parallel) {
        return Err(format!("--parallel must be between 1 and {MAX_SEQUENCES}"));
    }
    let queue = args.queue.unwrap_or(4 * args.parallel);
    if queue == 0 {
        return Err("--queue must be at least 1".into());
    }
    let level = Level::parse(&args.trace).unwrap_or(Level::Lightweight);
    let otlp = args
        .otlp_endpoint
        .as_deref()
        .map(otlp::Otlp::start)
        .transpose()?;
    let notes = &mut |line: &str| eprintln!("{line}");

    // One copy of the weights, three monomorphized models over it; each
    // model's own one-sequence cache is unused and kept small.
    let small = KvCacheOptions {
        capacity: 2,
        sinks: 0,
        kv_type: KvType::F32,
    };
    let base = CacheArgs {
        ctx: 2,
        ..args.cache.clone()
    };
    let (light, name) = Llama::<Lightweight>::load(&args.model, &base, Lightweight, notes)?;
    let weights = light.shared_weights();
    let tok = light.tokenizer.shared();
    let off = Llama::from_shared(
        Arc::clone(&weights),
        light.config.clone(),
        tok.clone(),
        small,
        Disabled,
    )
    .map_err(|e| e.to_string())?;
    let full = Llama::from_shared(weights, light.config.clone(), tok.clone(), small, Full)
        .map_err(|e| e.to_string())?;
    let (off, light, full) = (
        configure(args, off)?,
        configure(args, light)?,
        configure(args, full)?,
    );
    let name = model_name(&name);
    let c = light.config.clone();
    let ctx = args.cache.ctx.clamp(2, c.context_len);
    let stats = Arc::new(Stats {
        // --parallel is at most MAX_SEQUENCES, the engine's capacity.
        slots: args.parallel,
        ..Stats::default()
    });
    let metrics = Arc::new(ServeMetrics::new(&stats.running, &stats.queued));
    let context = TraceContext {
        model: ModelInfo {
            kv_capacity: ctx,
            kv_sinks: batch::SINKS,
            ..model_info(&light, &name)
        },
        vocab: Arc::new(
            (0..c.vocab_size as u32)
                .map(|id| light.token_text(id))
                .collect(),
        ),
        rows: Arc::default(),
        metrics: metrics.sink.clone(),
    };
    let chunk = light.prefill_chunk();
    notes(&format!(
        "model: {name}: {} layers, hidden {}, vocab {}; {} sequences of up to {ctx} \
         positions, queue {queue}, trace {}{}",
        c.n_layers,
        c.dim,
        c.vocab_size,
        args.parallel,
        level.name(),
        args.inject.map_or(String::new(), |f| format!(
            ", injecting {:?} at layer {}",
            f.kind, f.layer
        )),
    ));
    let engine = batch::BatchEngine::new(off, light, full, context);
    let store = Arc::new(Mutex::new(TraceStore::new(args.keep_traces)));
    let (queue_tx, queue_rx) = std::sync::mpsc::sync_channel(queue);
    let scheduler = Scheduler {
        engine,
        queue: queue_rx,
        parallel: args.parallel,
        chunk,
        tokenizer: tok.clone(),
        store: Arc::clone(&store),
        stats: Arc::clone(&stats),
        metrics: Arc::clone(&metrics),
        kv_positions: stats.slots * ctx,
        otlp,
    };
    let model_thread = std::thread::Builder::new()
        .name("model".into())
        .spawn(move || scheduler.run())
        .map_err(|e| format!("cannot start the model thread: {e}"))?;

    let shared = Arc::new(http::Shared {
        queue: queue_tx,
        stats,
        metrics,
        store,
        tokenizer: tok,
        context: ctx,
        queue_capacity: queue,
        model: name,
        level,
        full_every: args.full_every,
        max_body: MAX_BODY,
        counter: AtomicU64::new(0),
        nonce: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    let served = runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
            .await
            .map_err(|e| format!("cannot listen on {}:{}: {e}", args.host, args.port))?;
        let addr: SocketAddr = listener.local_addr().map_err(|e| e.to_string())?;
        println!("listening on http://{addr}");
        let _ = std::io::stdout().flush();
        axum::serve(listener, http::router(shared))
            .await
            .map_err(|e| format!("the server stopped: {e}"))
    });
    drop(model_thread);
    served
}

/// `model` with the fault, the matmuls and the prefill chunk the flags
/// ask for.
fn configure<C: TraceConfig>(args: &Args, mut model: Llama<C>) -> Result<Llama<C>, String> {
    if let Some(f) = args.inject {
        let layers = model.config.n_layers;
        if f.layer >= layers {
            return Err(format!(
                "--inject layer {} but the model has {layers} layers",
                f.layer
            ));
        }
        model.set_fault(Some(f));
    }
    if args.model.exact {
        model.set_exact(true);
    }
    model.set_threads(args.model.threads());
    model.set_prefill_chunk(args.cache.prefill_chunk);
    Ok(model)
}

/// The model's name in the responses: a file's stem, or the synthetic
/// model's description.
fn model_name(name: &str) -> String {
    let path = std::path::Path::new(name);
    match path.extension() {
        Some(ext) if ext == "gguf" => path
            .file_stem()
            .map_or_else(|| name.to_string(), |s| s.to_string_lossy().into_owned()),
        _ => name.to_string(),
    }
}
