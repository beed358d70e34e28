//! Streaming out: every completed forward pass, written as it completes.
//!
//! A tracer keeps only the last `max_forwards` forwards in detail. To keep
//! all of them, give it a sink:
//! [`ModelTracer::set_sink`](crate::ModelTracer::set_sink) installs a
//! [`SinkHandle`], and every [`end_forward`](crate::ModelTracer::end_forward)
//! hands the completed [`ForwardTrace`] to it. `JsonlSink` (feature `serde`)
//! writes one JSON object per forward to any [`io::Write`] (JSON Lines) and
//! flushes it, so a crash loses at most the forward in flight.
//!
//! ```
//! # #[cfg(feature = "serde")] {
//! use model_tracer::{JsonlSink, Lightweight, ModelTracer, SinkHandle, Stage};
//!
//! let path = std::env::temp_dir().join(format!("doc-sink-{}.jsonl", std::process::id()));
//! let file = std::fs::File::create(&path).unwrap();
//! let mut tracer = ModelTracer::new(Lightweight);
//! tracer.set_sink(Some(SinkHandle::new(JsonlSink::new(file))));
//! for pos in 0..3 {
//!     tracer.begin_forward(pos);
//!     tracer.activation(0, Stage::Input, &[1.0, 2.0, 3.0]);
//!     tracer.end_forward();
//! }
//! assert_eq!(tracer.sink().unwrap().status().forwards_written, 3);
//! let text = std::fs::read_to_string(&path).unwrap();
//! assert_eq!(text.lines().count(), 3);
//! # std::fs::remove_file(&path).ok();
//! # }
//! ```
//!
//! # Why a shared handle in the tracer
//!
//! The model calls `end_forward` itself (the reference decoder does, deep
//! inside `generate`), so the caller has no place to pass a writer in; the
//! sink must live in the tracer. `ModelTracer` must stay `Send + Sync +
//! Clone` (a model is cloned and moved across threads), so the sink sits
//! behind `Arc<Mutex<..>>`: a clone of the tracer writes into the same sink,
//! one whole line at a time. Without a sink the tracer holds `None` (one
//! pointer) and `end_forward` tests it once; a [`Disabled`](crate::Disabled)
//! tracer has no recorder at all and never writes.

use std::fmt;
use std::io;
use std::sync::{Arc, Mutex};

use crate::forward::ForwardTrace;

mod background;
pub use background::{BackgroundFlush, BackgroundSink};

/// Receives every completed forward pass of a tracer.
pub trait ForwardSink: Send {
    /// Takes `forward` (anomaly rules already applied). Called from
    /// `end_forward`, so it should be quick; an error stops the sink (see
    /// [`SinkHandle`]).
    fn write_forward(&mut self, forward: &ForwardTrace) -> io::Result<()>;

    /// Told, when the sink is installed in a tracer, which systems that
    /// tracer records (`"full"`, `"lightweight"`, `"activations+logits"`:
    /// [`describe`](crate::config::describe)'s text). Does nothing unless
    /// the sink writes it down.
    fn tracer_config(&mut self, _description: &str) {}
}

/// Why a sink stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkFailure {
    /// Position of the forward that could not be written.
    pub position: usize,
    /// The I/O error's kind.
    pub kind: io::ErrorKind,
    /// The I/O error's message.
    pub message: String,
}

impl fmt::Display for SinkFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "writing the forward at position {} failed: {}",
            self.position, self.message
        )
    }
}

/// What a sink has done so far.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SinkStatus {
    /// Forwards written successfully.
    pub forwards_written: usize,
    /// The first failure. After it the sink receives nothing more: a
    /// half-written record followed by whole ones would corrupt the stream.
    pub failure: Option<SinkFailure>,
}

struct Slot {
    sink: Box<dyn ForwardSink>,
    status: SinkStatus,
}

/// A shared, clonable handle to a [`ForwardSink`], as a tracer holds it.
///
/// Clones share the sink: every tracer holding a clone writes into it, one
/// forward at a time under a lock.
#[derive(Clone)]
pub struct SinkHandle {
    slot: Arc<Mutex<Slot>>,
}

impl fmt::Debug for SinkHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SinkHandle")
            .field("status", &self.status())
            .finish()
    }
}

impl SinkHandle {
    /// Wraps `sink` for a tracer.
    pub fn new(sink: impl ForwardSink + 'static) -> Self {
        Self {
            slot: Arc::new(Mutex::new(Slot {
                sink: Box::new(sink),
                status: SinkStatus::default(),
            })),
        }
    }

    /// Forwards written and the failure, if any.
    pub fn status(&self) -> SinkStatus {
        match self.slot.lock() {
            Ok(slot) => slot.status.clone(),
            Err(poisoned) => poisoned.into_inner().status.clone(),
        }
    }

    /// Tells the sink which systems its tracer records.
    pub(crate) fn announce(&self, description: &str) {
        if let Ok(mut slot) = self.slot.lock() {
            slot.sink.tracer_config(description);
        }
    }

    /// Hands `forward` to the sink, unless it failed before. A sink that
    /// panicked (its lock is poisoned) is treated as failed.
    pub(crate) fn write(&self, forward: &ForwardTrace) {
        let Ok(mut slot) = self.slot.lock() else {
            return;
        };
        if slot.status.failure.is_some() {
            return;
        }
        match slot.sink.write_forward(forward) {
            Ok(()) => slot.status.forwards_written += 1,
            Err(e) => {
                slot.status.failure = Some(SinkFailure {
                    position: forward.position,
                    kind: e.kind(),
                    message: e.to_string(),
                })
            }
        }
    }
}

#[cfg(feature = "serde")]
pub use jsonl::{forward_json_line, JsonlSink};

#[cfg(feature = "serde")]
mod jsonl {
    use std::io::{self, Write};

    use serde::ser::{Serialize, SerializeMap, Serializer};

    use super::ForwardSink;
    use crate::forward::ForwardTrace;
    use crate::model_info::ModelInfo;
    use crate::serde_float::Float;

    /// Writes one JSON object per forward pass, one per line (JSON Lines),
    /// and flushes after each. The fields are documented in `features.md`
    /// ("JSON Lines schema"); the file loads with
    /// `pandas.read_json(path, lines=True)`, one row per forward.
    pub struct JsonlSink<W: Write> {
        out: W,
        line: Vec<u8>,
        context: Context,
    }

    /// What the sink knows about the run besides the forwards.
    #[derive(Default)]
    struct Context {
        model: Option<ModelInfo>,
        config: Option<String>,
        vocabulary: Option<Box<dyn Fn(u32) -> String + Send>>,
    }

    impl<W: Write> std::fmt::Debug for JsonlSink<W> {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("JsonlSink")
                .field("model", &self.context.model)
                .field("config", &self.context.config)
                .field("vocabulary", &self.context.vocabulary.is_some())
                .finish_non_exhaustive()
        }
    }

    impl<W: Write> JsonlSink<W> {
        /// A sink writing to `out`. Wrap files in a `BufWriter` or not: each
        /// line is written with one `write_all` and then flushed.
        pub fn new(out: W) -> Self {
            Self {
                out,
                line: Vec::new(),
                context: Context::default(),
            }
        }

        /// Writes `model` into every row (`model`), so that any part of the
        /// stream (a tail, a grep, the lines before a crash) describes the
        /// model it traced.
        pub fn with_model(mut self, model: ModelInfo) -> Self {
            self.context.model = Some(model);
            self
        }

        /// Writes the text of the token ids each row names: `token_text`
        /// for the input token, `vocab` (id → text) for the chosen and the
        /// logit-lens tokens.
        pub fn with_vocabulary(mut self, text: impl Fn(u32) -> String + Send + 'static) -> Self {
            self.context.vocabulary = Some(Box::new(text));
            self
        }

        /// The writer.
        pub fn get_ref(&self) -> &W {
            &self.out
        }

        /// The writer, giving up the sink.
        pub fn into_inner(self) -> W {
            self.out
        }

        /// Writes the line of `forward` and flushes.
        pub fn write(&mut self, forward: &ForwardTrace) -> io::Result<()> {
            self.line.clear();
            serde_json::to_writer(&mut self.line, &Row(forward, &self.context))
                .map_err(io::Error::other)?;
            self.line.push(b'\n');
            self.out.write_all(&self.line)?;
            self.out.flush()
        }
    }

    impl<W: Write + Send> ForwardSink for JsonlSink<W> {
        fn write_forward(&mut self, forward: &ForwardTrace) -> io::Result<()> {
            self.write(forward)
        }

        fn tracer_config(&mut self, description: &str) {
            self.context.config = Some(description.to_string());
        }
    }

    /// The JSON Lines record of `forward`, without the newline.
    pub fn forward_json_line(forward: &ForwardTrace) -> String {
        // Plain data with string keys: serializing cannot fail.
        serde_json::to_string(&Row(forward, &Context::default())).unwrap_or_default()
    }

    /// A column: the sequence an iterator yields, serialized lazily.
    struct Col<F>(F);

    impl<F, I> Serialize for Col<F>
    where
        F: Fn() -> I,
        I: Iterator,
        I::Item: Serialize,
    {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.collect_seq((self.0)())
        }
    }

    struct Row<'a>(&'a ForwardTrace, &'a Context);

    impl Serialize for Row<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let (f, context) = (self.0, self.1);
            let text = |id: u32| context.vocabulary.as_ref().map(|v| v(id));
            let mut m = s.serialize_map(None)?;
            m.serialize_entry("position", &f.position)?;
            m.serialize_entry("sequence", &f.sequence)?;
            m.serialize_entry("token", &f.token)?;
            m.serialize_entry("token_text", &f.token.and_then(text))?;
            m.serialize_entry(
                "selected_token",
                &f.logits.as_ref().and_then(|l| l.selected_token),
            )?;
            m.serialize_entry("anomalies", &f.anomalies.len())?;

            // Activations: one entry per recorded stage, in forward order.
            let a = || f.activations.recorded();
            m.serialize_entry("act_layer", &Col(|| a().map(|r| r.0)))?;
            m.serialize_entry("act_stage", &Col(|| a().map(|r| r.1.name())))?;
            m.serialize_entry("act_count", &Col(|| a().map(|r| r.2.count)))?;
            m.serialize_entry("act_min", &Col(|| a().map(|r| Float(r.2.min))))?;
            m.serialize_entry("act_max", &Col(|| a().map(|r| Float(r.2.max))))?;
            m.serialize_entry("act_mean", &Col(|| a().map(|r| Float(r.2.mean))))?;
            m.serialize_entry("act_std", &Col(|| a().map(|r| Float(r.2.std))))?;
            m.serialize_entry("act_l2_norm", &Col(|| a().map(|r| Float(r.2.l2_norm))))?;
            m.serialize_entry("act_max_abs", &Col(|| a().map(|r| Float(r.2.max_abs()))))?;
            m.serialize_entry("act_nan_count", &Col(|| a().map(|r| r.2.nan_count)))?;
            m.serialize_entry("act_inf_count", &Col(|| a().map(|r| r.2.inf_count)))?;
            let fingerprint =
                |r: (Option<usize>, _, _)| f.activations.fingerprint(r.0.unwrap_or(0), r.1);
            m.serialize_entry("act_fingerprint", &Col(|| a().map(fingerprint)))?;

            // Residual ratio, per layer that measured it.
            let res = || {
                f.activations
                    .layers
                    .iter()
                    .filter(|l| l.residual_ratio != 0.0)
            };
            m.serialize_entry("res_layer", &Col(|| res().map(|l| l.layer_idx)))?;
            m.serialize_entry("res_ratio", &Col(|| res().map(|l| Float(l.residual_ratio))))?;

            let an = &f.anomalies;
            m.serialize_entry("anomaly_layer", &Col(|| an.iter().map(|a| a.layer)))?;
            m.serialize_entry("anomaly_stage", &Col(|| an.iter().map(|a| a.stage.name())))?;
            m.serialize_entry("anomaly_kind", &Col(|| an.iter().map(|a| a.kind)))?;
            m.serialize_entry("anomaly_origin", &Col(|| an.iter().map(|a| a.origin)))?;
            m.serialize_entry("anomaly_count", &Col(|| an.iter().map(|a| a.count)))?;
            m.serialize_entry("anomaly_tensor_len", &Col(|| an.iter().map(|a| a.total)))?;
            m.serialize_entry("anomaly_value", &Col(|| an.iter().map(|a| Float(a.value))))?;

            let at = &f.attention;
            m.serialize_entry("attn_layer", &Col(|| at.iter().map(|t| t.layer_idx)))?;
            m.serialize_entry("attn_head", &Col(|| at.iter().map(|t| t.head_idx)))?;
            m.serialize_entry("attn_query_pos", &Col(|| at.iter().map(|t| t.query_pos)))?;
            m.serialize_entry(
                "attn_context_len",
                &Col(|| at.iter().map(|t| t.context_len)),
            )?;
            m.serialize_entry(
                "attn_sink_weight",
                &Col(|| at.iter().map(|t| Float(t.sink_weight))),
            )?;
            m.serialize_entry("attn_entropy", &Col(|| at.iter().map(|t| Float(t.entropy))))?;
            m.serialize_entry(
                "attn_normalized_entropy",
                &Col(|| at.iter().map(|t| Float(t.normalized_entropy()))),
            )?;
            m.serialize_entry(
                "attn_tail_mass",
                &Col(|| at.iter().map(|t| Float(t.tail_mass))),
            )?;
            m.serialize_entry("attn_nan_count", &Col(|| at.iter().map(|t| t.nan_count)))?;
            m.serialize_entry(
                "attn_top_positions",
                &Col(|| at.iter().map(|t| &t.top_k_positions)),
            )?;
            m.serialize_entry(
                "attn_top_weights",
                &Col(|| {
                    at.iter()
                        .map(|t| Col(|| t.top_k_weights.iter().map(|&w| Float(w))))
                }),
            )?;

            // Logit lens: one entry per (tracked token, recorded layer).
            let lens = || {
                f.logits.iter().flat_map(|lt| {
                    lt.tokens.iter().flat_map(move |tok| {
                        let decisive = tok.decisive_layer_log_rank();
                        let selected = Some(tok.token_id) == lt.selected_token;
                        (0..tok.ranks.len()).map(move |i| {
                            let layer = tok.layer_at(i);
                            (
                                tok.token_id,
                                layer,
                                tok.ranks[i],
                                tok.logits.get(i).copied().unwrap_or(f32::NAN),
                                decisive == Some(layer),
                                selected,
                            )
                        })
                    })
                })
            };
            m.serialize_entry("lens_token", &Col(|| lens().map(|r| r.0)))?;
            m.serialize_entry("lens_layer", &Col(|| lens().map(|r| r.1)))?;
            m.serialize_entry("lens_rank", &Col(|| lens().map(|r| r.2)))?;
            m.serialize_entry("lens_logit", &Col(|| lens().map(|r| Float(r.3))))?;
            m.serialize_entry("lens_decisive", &Col(|| lens().map(|r| r.4)))?;
            m.serialize_entry("lens_selected", &Col(|| lens().map(|r| r.5)))?;

            let q = &f.quantization.traces;
            m.serialize_entry("quant_brick", &Col(|| q.iter().map(|t| t.brick.name())))?;
            m.serialize_entry("quant_layer", &Col(|| q.iter().map(|t| t.layer_idx)))?;
            m.serialize_entry("quant_type", &Col(|| q.iter().map(|t| t.quant_type.name())))?;
            m.serialize_entry(
                "quant_cosine",
                &Col(|| q.iter().map(|t| Float(t.cosine_similarity))),
            )?;
            m.serialize_entry("quant_mse", &Col(|| q.iter().map(|t| Float(t.mse))))?;
            m.serialize_entry("quant_snr_db", &Col(|| q.iter().map(|t| Float(t.snr_db))))?;
            m.serialize_entry(
                "quant_max_abs_error",
                &Col(|| q.iter().map(|t| Float(t.max_abs_error))),
            )?;
            m.serialize_entry("quant_elements", &Col(|| q.iter().map(|t| t.element_count)))?;
            m.serialize_entry("kl_divergence", &f.quantization.kl_divergence.map(Float))?;
            m.serialize_entry("top1_agrees", &f.quantization.top1_agrees)?;

            let w = &f.what_if;
            m.serialize_entry("whatif_brick", &Col(|| w.iter().map(|t| t.brick.name())))?;
            m.serialize_entry("whatif_layer", &Col(|| w.iter().map(|t| t.layer_idx)))?;
            m.serialize_entry(
                "whatif_type",
                &Col(|| w.iter().map(|t| t.quant_type.name())),
            )?;
            m.serialize_entry(
                "whatif_cosine",
                &Col(|| w.iter().map(|t| Float(t.cosine_similarity))),
            )?;
            m.serialize_entry("whatif_mse", &Col(|| w.iter().map(|t| Float(t.mse))))?;
            m.serialize_entry("whatif_snr_db", &Col(|| w.iter().map(|t| Float(t.snr_db))))?;
            m.serialize_entry(
                "whatif_max_abs_error",
                &Col(|| w.iter().map(|t| Float(t.max_abs_error))),
            )?;
            m.serialize_entry(
                "whatif_elements",
                &Col(|| w.iter().map(|t| t.element_count)),
            )?;

            let kv = f.kv_cache.as_ref();
            m.serialize_entry("kv_step", &kv.map(|k| k.step))?;
            m.serialize_entry("kv_max_positions", &kv.map(|k| k.max_positions))?;
            m.serialize_entry("kv_valid_positions", &kv.map(|k| k.valid_positions))?;
            m.serialize_entry("kv_utilization", &kv.map(|k| Float(k.utilization())))?;
            m.serialize_entry("kv_bytes", &kv.map(|k| k.cache_size_bytes))?;
            m.serialize_entry("kv_hit_rate", &kv.map(|k| Float(k.cache_hit_rate)))?;
            m.serialize_entry("kv_evictions", &kv.map(|k| k.evictions_this_step))?;
            m.serialize_entry("kv_reused", &kv.map(|k| k.reused_positions))?;
            m.serialize_entry("kv_computed", &kv.map(|k| k.computed_positions))?;

            // The run: the tracer's systems, the model, the token texts.
            m.serialize_entry("config", &context.config)?;
            m.serialize_entry("model", &context.model)?;
            if context.vocabulary.is_some() {
                let ids = f.logits.iter().flat_map(|l| {
                    l.selected_token
                        .into_iter()
                        .chain(l.tokens.iter().map(|t| t.token_id))
                });
                let vocab: std::collections::BTreeMap<u32, String> =
                    ids.filter_map(|id| Some((id, text(id)?))).collect();
                m.serialize_entry("vocab", &vocab)?;
            } else {
                m.serialize_entry("vocab", &None::<()>)?;
            }
            m.end()
        }
    }
}
