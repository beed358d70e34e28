//! The model thread: takes requests from the bounded queue while it has a
//! free sequence slot, and runs every running sequence a step at a time.
//! Each step is one call of [`Engine::step`] holding the decode row of
//! every sequence that has its prompt behind it plus one prompt chunk of
//! the oldest sequence still reading its prompt. After the step each
//! sequence with fresh logits samples its next token, grows its text,
//! checks its stop strings and sends what it may to its client, never
//! waiting: the token channels are unbounded and a send only fails when the
//! client is gone, which frees the sequence at once.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;
use std::time::SystemTime;

use model_tracer::metrics::prometheus_client::metrics::gauge::Gauge;
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedSender;

use model_tracer_llama::tokenizer::Tokenizer;

use super::engine::{Engine, Level, SeqId, StepWork, TraceOutcome};
use super::metrics::ServeMetrics;
use super::openai::{ApiError, FinishReason, Usage};
use super::otlp::{self, Otlp, RequestEnd};
use super::sampling::{Sampler, Sampling};
use super::text::{Progress, TextState};
use super::traces::{self, SharedStore, StoredTrace};

/// A request on its way to the model thread.
#[derive(Debug)]
pub struct Job {
    /// The request id, also its trace's.
    pub id: String,
    /// The prompt's token ids.
    pub prompt: Vec<u32>,
    /// Tokens to generate at most.
    pub max_tokens: usize,
    /// How to choose them.
    pub sampling: Sampling,
    /// Where the text ends.
    pub stop: Vec<String>,
    /// The level its trace is recorded at.
    pub level: Level,
    /// Where its text and its end go.
    pub events: UnboundedSender<Event>,
}

/// What the model thread tells a request's handler.
#[derive(Debug)]
pub enum Event {
    /// More text.
    Text(String),
    /// The end: why, the counts and the trace.
    Done(Box<Done>),
    /// The request could not be run.
    Failed(ApiError),
}

/// How a request ended.
#[derive(Debug, Clone)]
pub struct Done {
    /// Why it ended.
    pub finish: FinishReason,
    /// Its token counts.
    pub usage: Usage,
    /// The `model_trace` extension of the response.
    pub model_trace: Value,
}

/// What `/health` reports: the slots, the queue, the requests served.
#[derive(Debug, Default)]
pub struct Stats {
    /// Sequences the model thread runs at once.
    pub slots: usize,
    /// Sequences running now (`model_tracer_requests_running`).
    pub running: Gauge,
    /// Requests waiting in the queue (`model_tracer_requests_waiting`).
    pub queued: Gauge,
    /// Requests finished (to their end, or given up by their client).
    pub finished: AtomicU64,
    /// Requests whose client went away before their end.
    pub abandoned: AtomicU64,
}

/// The model thread's state.
pub struct Scheduler<E: Engine> {
    /// The model.
    pub engine: E,
    /// The bounded queue the HTTP side fills.
    pub queue: Receiver<Job>,
    /// Sequences run at once (at most the engine's capacity).
    pub parallel: usize,
    /// Prompt positions one step takes of a sequence.
    pub chunk: usize,
    /// The tokenizer: the bytes of each token, the end-of-generation ones.
    pub tokenizer: Option<Arc<Tokenizer>>,
    /// Where finished traces go.
    pub store: SharedStore,
    /// Shared with `/health`.
    pub stats: Arc<Stats>,
    /// Shared with `/metrics`.
    pub metrics: Arc<ServeMetrics>,
    /// Positions the server allows: slots × the context of a sequence
    /// (the denominator of `model_tracer_kv_cache_usage_ratio`).
    pub kv_positions: usize,
    /// Where each request's span and anomaly events are exported, if
    /// anywhere (`--otlp-endpoint`).
    pub otlp: Option<Otlp>,
}

/// A sequence being run.
struct Running {
    job: Job,
    seq: SeqId,
    /// Prompt positions run so far.
    read: usize,
    /// The token to run next (the last one generated).
    next: Option<u32>,
    generated: Vec<u32>,
    text: TextState,
    sampler: Sampler,
    /// When it was taken from the queue, and when its prompt was read.
    started: SystemTime,
    prefilled: Option<SystemTime>,
}

impl<E: Engine> Scheduler<E> {
    /// Runs until the HTTP side is gone.
    pub fn run(mut self) {
        let slots = self.parallel.min(self.engine.capacity()).max(1);
        let mut running: Vec<Running> = Vec::new();
        loop {
            if !self.admit(&mut running, slots) {
                return;
            }
            // Clients that went away free their sequence now.
            running.retain(|r| {
                let gone = r.job.events.is_closed();
                if gone {
                    self.engine.finish(r.seq);
                    self.stats.abandoned.fetch_add(1, Ordering::Relaxed);
                    self.stats.finished.fetch_add(1, Ordering::Relaxed);
                }
                !gone
            });
            self.set_running(&running);
            if running.is_empty() {
                continue;
            }
            let work = self.work(&running);
            let stepped = catch_unwind(AssertUnwindSafe(|| self.engine.step(&work)));
            let failure = match stepped {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e),
                Err(_) => Some("the model failed during a step".to_string()),
            };
            if let Some(e) = failure {
                let failed = std::mem::take(&mut running);
                self.set_running(&running);
                for r in failed {
                    self.engine.finish(r.seq);
                    self.fail(&r.job, &e);
                }
                continue;
            }
            self.advance(&mut running, &work);
            self.set_running(&running);
        }
    }

    /// The running gauge and the KV cache's usage: the positions in the
    /// running sequences' caches (their prompt positions run and their
    /// generated tokens but the last, which runs at the next step) over
    /// [`kv_positions`](Self::kv_positions).
    fn set_running(&self, running: &[Running]) {
        self.stats.running.set(running.len() as i64);
        let held: usize = running
            .iter()
            .map(|r| r.read + r.generated.len().saturating_sub(1))
            .sum();
        let ratio = held as f64 / self.kv_positions.max(1) as f64;
        self.metrics.kv_usage.set(ratio);
    }

    /// Takes queued requests into free slots; waits for one when nothing
    /// runs. `false` when the queue is closed and nothing runs.
    fn admit(&mut self, running: &mut Vec<Running>, slots: usize) -> bool {
        while running.len() < slots {
            let job = if running.is_empty() {
                match self.queue.recv() {
                    Ok(job) => job,
                    Err(_) => return false,
                }
            } else {
                match self.queue.try_recv() {
                    Ok(job) => job,
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => break,
                }
            };
            self.stats.queued.dec();
            if job.events.is_closed() {
                self.stats.abandoned.fetch_add(1, Ordering::Relaxed);
                self.stats.finished.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let level = if self.engine.has_level(job.level) {
                job.level
            } else {
                Level::Full
            };
            match self.engine.start(level, job.prompt.len() + job.max_tokens) {
                Ok(seq) => running.push(Running {
                    sampler: Sampler::new(job.sampling),
                    text: TextState::new(&job.stop),
                    job: Job { level, ..job },
                    seq,
                    read: 0,
                    next: None,
                    generated: Vec::new(),
                    started: SystemTime::now(),
                    prefilled: None,
                }),
                Err(e) => self.fail(&job, &e),
            }
        }
        true
    }

    /// The step's work: a decode row of every sequence past its prompt,
    /// and a prompt chunk of the oldest one still reading its prompt.
    fn work(&self, running: &[Running]) -> Vec<StepWork> {
        let mut work: Vec<StepWork> = running
            .iter()
            .filter_map(|r| {
                r.next.map(|t| StepWork {
                    seq: r.seq,
                    tokens: vec![t],
                })
            })
            .collect();
        if let Some(r) = running.iter().find(|r| r.read < r.job.prompt.len()) {
            let end = (r.read + self.chunk.max(1)).min(r.job.prompt.len());
            work.push(StepWork {
                seq: r.seq,
                tokens: r.job.prompt[r.read..end].to_vec(),
            });
        }
        work
    }

    /// After a step: every sequence whose logits are fresh takes its next
    /// token; those that end leave `running`.
    /// The gauges are set before the ended sequences' clients are told,
    /// so that a client that scrapes `/metrics` after its answer finds its
    /// sequence gone.
    fn advance(&mut self, running: &mut Vec<Running>, work: &[StepWork]) {
        let mut ended = Vec::new();
        let mut i = 0;
        while i < running.len() {
            let r = &mut running[i];
            let Some(w) = work.iter().find(|w| w.seq == r.seq) else {
                i += 1;
                continue;
            };
            if r.next.is_none() {
                r.read += w.tokens.len();
                self.metrics.prompt_tokens.inc_by(w.tokens.len() as u64);
                if r.read < r.job.prompt.len() {
                    i += 1;
                    continue;
                }
                r.prefilled = Some(SystemTime::now());
            }
            let token = match self.engine.logits(r.seq) {
                Some(logits) => r.sampler.sample(logits),
                None => 0,
            };
            match self.take_token(r, token) {
                None => {
                    r.next = Some(token);
                    i += 1;
                }
                Some(finish) => ended.push((running.remove(i), finish)),
            }
        }
        if !ended.is_empty() {
            self.set_running(running);
        }
        for (r, finish) in ended {
            self.end(r, finish);
        }
    }

    /// Appends `token` to `r`: its text to the client, and the end of the
    /// generation if it is one.
    fn take_token(&self, r: &mut Running, token: u32) -> Option<FinishReason> {
        r.generated.push(token);
        self.metrics.generation_tokens.inc();
        let eog = self.tokenizer.as_ref().is_some_and(|t| t.is_eog(token));
        if eog {
            let rest = r.text.flush();
            send_text(&r.job, rest);
            return Some(FinishReason::Stop);
        }
        let own;
        let piece: &[u8] = match &self.tokenizer {
            Some(t) => t.token_bytes(token).unwrap_or_default(),
            None => {
                own = format!("<{token}>");
                own.as_bytes()
            }
        };
        match r.text.push(piece) {
            Progress::Text(t) => send_text(&r.job, t),
            Progress::Stopped(t) => {
                send_text(&r.job, t);
                return Some(FinishReason::Stop);
            }
        }
        if r.generated.len() >= r.job.max_tokens {
            let rest = r.text.flush();
            send_text(&r.job, rest);
            return Some(FinishReason::Length);
        }
        None
    }

    /// Ends `r`: frees its sequence, keeps its trace, tells its client.
    fn end(&mut self, r: Running, finish: FinishReason) {
        let outcome =
            catch_unwind(AssertUnwindSafe(|| self.engine.finish(r.seq))).unwrap_or_default();
        let model_trace = model_trace(&r.job, &r.generated, &outcome);
        match &self.otlp {
            Some(o) => o.request(&RequestEnd {
                id: &r.job.id,
                seq: r.seq,
                level: r.job.level.name(),
                started: r.started,
                prefilled: r.prefilled,
                prompt_tokens: r.job.prompt.len(),
                completion_tokens: r.generated.len(),
                finish_reason: finish.name(),
                outcome: &outcome,
            }),
            None => otlp::anomaly_events(&r.job.id, r.seq, &outcome),
        }
        if r.job.level != Level::Off && !outcome.rows.is_empty() {
            traces::lock(&self.store).insert(r.job.id.clone(), StoredTrace { rows: outcome.rows });
        }
        let done = Done {
            finish,
            usage: Usage {
                prompt: r.job.prompt.len(),
                completion: r.generated.len(),
            },
            model_trace,
        };
        // A client gone by now misses nothing it could use.
        let _ = r.job.events.send(Event::Done(Box::new(done)));
        self.stats.finished.fetch_add(1, Ordering::Relaxed);
    }

    fn fail(&self, job: &Job, message: &str) {
        let error = ApiError::new(500, "server_error", "model_failed", message);
        let _ = job.events.send(Event::Failed(error));
        self.stats.finished.fetch_add(1, Ordering::Relaxed);
    }
}

fn send_text(job: &Job, text: String) {
    if !text.is_empty() {
        // A failed send means the client is gone: the next step frees the
        // sequence.
        let _ = job.events.send(Event::Text(text));
    }
}

/// The `model_trace` extension: the request's trace level, forwards,
/// anomalies and first anomaly, its generated token ids, and where its
/// trace is kept.
fn model_trace(job: &Job, generated: &[u32], outcome: &TraceOutcome) -> Value {
    let traced = job.level != Level::Off && !outcome.rows.is_empty();
    json!({
        "id": job.id,
        "level": job.level.name(),
        "forwards": outcome.forwards,
        "anomalies": outcome.anomalies,
        "first_anomaly": outcome.first_anomaly,
        "generated_ids": generated,
        "trace": traced.then(|| format!("/v1/traces/{}", job.id)),
        "report": traced.then(|| format!("/v1/traces/{}/report", job.id)),
    })
}
