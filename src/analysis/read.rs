//! Reading traces back: the JSON Lines rows that [`JsonlSink`] writes.
//!
//! A trace streamed from a long or production run is looked at later,
//! elsewhere. [`JsonlReader`] turns each line back into the
//! [`ForwardTrace`] it was written from (within the rounding of the `f32`
//! values, which JSON keeps exactly), plus what the row says about the run:
//! the model, the tracer's config and the text of the tokens it names.
//! [`ModelTracer::replay_forward`](crate::ModelTracer::replay_forward)
//! folds the forwards into a tracer again, and the report renders from it.
//!
//! Bad input is an error that names the line and the column at fault, never
//! a panic: a truncated line (a run that crashed mid-write), columns of
//! different lengths, a stage or brick name this crate does not know, a
//! layer index beyond [`MAX_LAYERS`] or a head index beyond [`MAX_HEADS`].
//!
//! ```
//! use model_tracer::read::JsonlReader;
//! use model_tracer::{JsonlSink, Lightweight, ModelTracer, SinkHandle, Stage};
//! use std::sync::{Arc, Mutex};
//!
//! // A sink writing into shared memory instead of a file.
//! #[derive(Clone, Default)]
//! struct Shared(Arc<Mutex<Vec<u8>>>);
//! impl std::io::Write for Shared {
//!     fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
//!         self.0.lock().unwrap().extend_from_slice(b);
//!         Ok(b.len())
//!     }
//!     fn flush(&mut self) -> std::io::Result<()> { Ok(()) }
//! }
//! let out = Shared::default();
//! let mut tracer = ModelTracer::new(Lightweight);
//! tracer.set_sink(Some(SinkHandle::new(JsonlSink::new(out.clone()))));
//! tracer.begin_forward(7);
//! tracer.input_token(42);
//! tracer.activation(0, Stage::Input, &[1.0, f32::INFINITY, 3.0]);
//! tracer.end_forward();
//!
//! let text = out.0.lock().unwrap().clone();
//! let rows: Vec<_> = JsonlReader::new(&text[..]).collect::<Result<_, _>>()?;
//! assert_eq!(rows[0].forward, *tracer.last_forward().unwrap());
//! assert_eq!(rows[0].forward.token, Some(42));
//! assert_eq!(rows[0].config.as_deref(), Some("lightweight"));
//! # Ok::<(), model_tracer::read::ReadError>(())
//! ```
//!
//! [`JsonlSink`]: crate::JsonlSink

use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, BufRead};

use serde::Deserialize;

use crate::activation::{LayerActivationTrace, ModelActivationTrace};
use crate::anomaly::{Anomaly, AnomalyKind, Origin};
use crate::attention::AttentionWeightTrace;
use crate::fingerprint::Fingerprint;
use crate::forward::ForwardTrace;
use crate::kv_cache::KvCacheStateTrace;
use crate::logit::{LogitEvolutionTrace, TokenLogitEvolution};
use crate::model_info::ModelInfo;
use crate::quant::{BrickId, ModelQuantizationError, QuantType, QuantizationErrorTrace};
use crate::sequence::SequenceId;
use crate::serde_float::Float;
use crate::stage::Stage;
use crate::stats::{ErrorMetrics, TensorStats};

// The largest layer (and head) count a row may name: an index at or
// beyond it is an error rather than an allocation of that many layers (a
// lens entry may name `MAX_LAYERS` itself: the output logits, after the
// last layer). The tracer's hooks ignore such records, so every trace it
// writes reads back.
#[doc(no_inline)]
pub use crate::storage::{MAX_HEADS, MAX_LAYERS};

/// A trace line that could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadError {
    /// Line number, from 1 (0: no particular line).
    pub line: usize,
    /// What is wrong, naming the field.
    pub message: String,
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            f.write_str(&self.message)
        } else {
            write!(f, "line {}: {}", self.line, self.message)
        }
    }
}

impl std::error::Error for ReadError {}

/// One row of a JSON Lines trace, read back.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct JsonlRow {
    /// The forward the row was written from.
    pub forward: ForwardTrace,
    /// The model, when the sink was told it ([`JsonlSink::with_model`](crate::JsonlSink::with_model)).
    pub model: Option<ModelInfo>,
    /// The systems the tracer recorded (`"full"`, `"lightweight"`, ...),
    /// when the sink was installed in a tracer.
    pub config: Option<String>,
    /// Text of the token ids the row names (its input token, the chosen
    /// token, the logit-lens tokens), when the sink had a vocabulary
    /// ([`JsonlSink::with_vocabulary`](crate::JsonlSink::with_vocabulary)).
    pub texts: BTreeMap<u32, String>,
}

/// Reads a JSON Lines trace row by row. Blank lines are skipped; every other
/// line must be a row, and the first that is not ends the reading with an
/// error naming it.
#[derive(Debug)]
pub struct JsonlReader<R> {
    input: R,
    line: usize,
    buf: String,
    failed: bool,
}

impl<R: BufRead> JsonlReader<R> {
    /// A reader of `input`.
    pub fn new(input: R) -> Self {
        Self {
            input,
            line: 0,
            buf: String::new(),
            failed: false,
        }
    }
}

impl<R: BufRead> Iterator for JsonlReader<R> {
    type Item = Result<JsonlRow, ReadError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        loop {
            self.buf.clear();
            self.line += 1;
            let line = self.line;
            match self.input.read_line(&mut self.buf) {
                Ok(0) => return None,
                Ok(_) => {}
                Err(e) => {
                    self.failed = true;
                    let message = if e.kind() == io::ErrorKind::InvalidData {
                        "not UTF-8 text".to_string()
                    } else {
                        format!("cannot read: {e}")
                    };
                    return Some(Err(ReadError { line, message }));
                }
            }
            let text = self.buf.trim();
            if text.is_empty() {
                continue;
            }
            let row = parse_row(text).map_err(|message| ReadError { line, message });
            self.failed = row.is_err();
            return Some(row);
        }
    }
}

impl<R: BufRead> JsonlReader<R> {
    /// The line of the row (or error) returned last, from 1 (0 before
    /// the first).
    pub fn line(&self) -> usize {
        self.line
    }

    /// The rows of one sequence: see [`SequenceChoice`].
    pub fn of_sequence(self, choice: SequenceChoice) -> SequenceRows<R> {
        SequenceRows {
            rows: self,
            choice,
            first: None,
            failed: false,
        }
    }
}

/// Which rows of a trace to read. A trace written by forwards over several
/// sequences (a server's, with [`begin_forward_batch`](crate::ModelTracer::begin_forward_batch))
/// holds the rows of each, named by their `sequence` column, with their
/// positions counted per sequence: what is replayed or compared is one
/// sequence at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SequenceChoice {
    /// The trace holds one sequence, or rows that name none: a row of a
    /// second sequence is an error naming both and its line.
    #[default]
    Single,
    /// The rows of this sequence only; the others are skipped.
    Only(SequenceId),
}

/// The rows of a [`JsonlReader`] that a [`SequenceChoice`] keeps
/// ([`JsonlReader::of_sequence`]).
#[derive(Debug)]
pub struct SequenceRows<R> {
    rows: JsonlReader<R>,
    choice: SequenceChoice,
    first: Option<Option<SequenceId>>,
    failed: bool,
}

/// How an error message names the sequence of a row.
fn sequence_name(s: Option<SequenceId>) -> String {
    s.map_or_else(|| "no sequence".into(), |s| format!("sequence {}", s.0))
}

impl<R: BufRead> Iterator for SequenceRows<R> {
    type Item = Result<JsonlRow, ReadError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        loop {
            let row = match self.rows.next()? {
                Ok(row) => row,
                Err(e) => return Some(Err(e)),
            };
            let seq = row.forward.sequence;
            match self.choice {
                SequenceChoice::Only(id) if seq != Some(id) => continue,
                SequenceChoice::Only(_) => return Some(Ok(row)),
                SequenceChoice::Single => match self.first {
                    None => {
                        self.first = Some(seq);
                        return Some(Ok(row));
                    }
                    Some(first) if first == seq => return Some(Ok(row)),
                    Some(first) => {
                        self.failed = true;
                        return Some(Err(ReadError {
                            line: self.rows.line(),
                            message: format!(
                                "a row of {} after rows of {}: the trace holds several \
                                 sequences; read one of them by its id",
                                sequence_name(seq),
                                sequence_name(first)
                            ),
                        }));
                    }
                },
            }
        }
    }
}

/// The error of a choice that kept no row: an empty trace, or no row of
/// the sequence asked for.
pub fn no_row(choice: SequenceChoice) -> ReadError {
    let message = match choice {
        SequenceChoice::Single => "the trace holds no row".to_string(),
        SequenceChoice::Only(id) => format!("the trace holds no row of sequence {}", id.0),
    };
    ReadError { line: 0, message }
}

/// Reads one row (one line, without its newline).
pub fn parse_row(line: &str) -> Result<JsonlRow, String> {
    let raw: RawRow = serde_json::from_str(line).map_err(|e| {
        if e.is_eof() {
            format!("the row ends early (a truncated line?): {e}")
        } else {
            format!("not a trace row: {e}")
        }
    })?;
    raw.into_row()
}

/// The row as written, column by column (see `features.md`, "JSON Lines
/// schema"). Columns this crate writes later default to empty, so older
/// traces still read.
#[derive(Deserialize)]
struct RawRow {
    position: usize,
    #[serde(default)]
    sequence: Option<SequenceId>,
    #[serde(default)]
    token: Option<u32>,
    #[serde(default)]
    token_text: Option<String>,
    #[serde(default)]
    selected_token: Option<u32>,
    #[serde(default)]
    config: Option<String>,
    #[serde(default)]
    model: Option<ModelInfo>,
    #[serde(default)]
    vocab: Option<BTreeMap<u32, String>>,

    #[serde(default)]
    act_layer: Vec<Option<usize>>,
    #[serde(default)]
    act_stage: Vec<String>,
    #[serde(default)]
    act_count: Vec<usize>,
    #[serde(default)]
    act_min: Vec<Float>,
    #[serde(default)]
    act_max: Vec<Float>,
    #[serde(default)]
    act_mean: Vec<Float>,
    #[serde(default)]
    act_std: Vec<Float>,
    #[serde(default)]
    act_l2_norm: Vec<Float>,
    #[serde(default)]
    act_nan_count: Vec<usize>,
    #[serde(default)]
    act_inf_count: Vec<usize>,
    #[serde(default)]
    act_fingerprint: Option<Vec<Option<Fingerprint>>>,

    #[serde(default)]
    res_layer: Vec<usize>,
    #[serde(default)]
    res_ratio: Vec<Float>,

    #[serde(default)]
    anomaly_layer: Vec<Option<usize>>,
    #[serde(default)]
    anomaly_stage: Vec<String>,
    #[serde(default)]
    anomaly_kind: Vec<AnomalyKind>,
    #[serde(default)]
    anomaly_origin: Vec<Origin>,
    #[serde(default)]
    anomaly_count: Vec<usize>,
    #[serde(default)]
    anomaly_tensor_len: Vec<usize>,
    #[serde(default)]
    anomaly_value: Vec<Float>,

    #[serde(default)]
    attn_layer: Vec<usize>,
    #[serde(default)]
    attn_head: Vec<usize>,
    #[serde(default)]
    attn_query_pos: Option<Vec<usize>>,
    #[serde(default)]
    attn_context_len: Vec<usize>,
    #[serde(default)]
    attn_sink_weight: Vec<Float>,
    #[serde(default)]
    attn_entropy: Vec<Float>,
    #[serde(default)]
    attn_tail_mass: Vec<Float>,
    #[serde(default)]
    attn_nan_count: Vec<usize>,
    #[serde(default)]
    attn_top_positions: Vec<Vec<usize>>,
    #[serde(default)]
    attn_top_weights: Vec<Vec<Float>>,

    #[serde(default)]
    lens_token: Vec<u32>,
    #[serde(default)]
    lens_layer: Vec<usize>,
    #[serde(default)]
    lens_rank: Vec<usize>,
    #[serde(default)]
    lens_logit: Vec<Float>,

    #[serde(default)]
    quant_brick: Vec<String>,
    #[serde(default)]
    quant_layer: Vec<usize>,
    #[serde(default)]
    quant_type: Vec<String>,
    #[serde(default)]
    quant_cosine: Vec<Float>,
    #[serde(default)]
    quant_mse: Vec<Float>,
    #[serde(default)]
    quant_snr_db: Vec<Float>,
    #[serde(default)]
    quant_max_abs_error: Vec<Float>,
    #[serde(default)]
    quant_elements: Vec<usize>,
    #[serde(default)]
    kl_divergence: Option<Float>,
    #[serde(default)]
    top1_agrees: Option<bool>,

    #[serde(default)]
    whatif_brick: Vec<String>,
    #[serde(default)]
    whatif_layer: Vec<usize>,
    #[serde(default)]
    whatif_type: Vec<String>,
    #[serde(default)]
    whatif_cosine: Vec<Float>,
    #[serde(default)]
    whatif_mse: Vec<Float>,
    #[serde(default)]
    whatif_snr_db: Vec<Float>,
    #[serde(default)]
    whatif_max_abs_error: Option<Vec<Float>>,
    #[serde(default)]
    whatif_elements: Option<Vec<usize>>,

    #[serde(default)]
    kv_step: Option<usize>,
    #[serde(default)]
    kv_max_positions: Option<usize>,
    #[serde(default)]
    kv_valid_positions: Option<usize>,
    #[serde(default)]
    kv_bytes: Option<usize>,
    #[serde(default)]
    kv_hit_rate: Option<Float>,
    #[serde(default)]
    kv_evictions: Option<usize>,
    #[serde(default)]
    kv_reused: Option<usize>,
    #[serde(default)]
    kv_computed: Option<usize>,
}

/// Checks that the columns of one group have the length of the first.
fn same_length(group: &[(&str, usize)]) -> Result<usize, String> {
    let Some(&(first, n)) = group.first() else {
        return Ok(0);
    };
    for &(name, len) in &group[1..] {
        if len != n {
            return Err(format!(
                "column {name} has {len} entries but {first} has {n}"
            ));
        }
    }
    Ok(n)
}

fn layer(value: usize, column: &str, entry: usize) -> Result<usize, String> {
    if value >= MAX_LAYERS {
        Err(format!(
            "{column}[{entry}] = {value} is beyond the {MAX_LAYERS} layers a trace may have"
        ))
    } else {
        Ok(value)
    }
}

fn head(value: usize, column: &str, entry: usize) -> Result<usize, String> {
    if value >= MAX_HEADS {
        Err(format!(
            "{column}[{entry}] = {value} is beyond the {MAX_HEADS} heads a layer may have"
        ))
    } else {
        Ok(value)
    }
}

/// A logit-lens layer: a layer, or `MAX_LAYERS` itself for the output
/// logits after the last layer.
fn lens_layer(value: usize, column: &str, entry: usize) -> Result<usize, String> {
    if value == MAX_LAYERS {
        Ok(value)
    } else {
        layer(value, column, entry)
    }
}

fn stage(name: &str, column: &str, entry: usize) -> Result<Stage, String> {
    Stage::ALL
        .into_iter()
        .find(|s| s.name() == name)
        .ok_or_else(|| format!("{column}[{entry}]: unknown stage {name:?}"))
}

fn brick(name: &str, column: &str, entry: usize) -> Result<BrickId, String> {
    BrickId::ALL
        .into_iter()
        .find(|b| b.name() == name)
        .ok_or_else(|| format!("{column}[{entry}]: unknown brick {name:?}"))
}

fn quant_type(name: &str, column: &str, entry: usize) -> Result<QuantType, String> {
    QuantType::ALL
        .into_iter()
        .find(|t| t.name() == name)
        .ok_or_else(|| format!("{column}[{entry}]: unknown quantization type {name:?}"))
}

impl RawRow {
    fn into_row(self) -> Result<JsonlRow, String> {
        let position = self.position;
        let mut f = ForwardTrace {
            position,
            sequence: self.sequence,
            token: self.token,
            activations: ModelActivationTrace::default(),
            ..ForwardTrace::default()
        };

        // Activations.
        let fingerprints = self.act_fingerprint;
        let n = same_length(&[
            ("act_layer", self.act_layer.len()),
            ("act_stage", self.act_stage.len()),
            ("act_count", self.act_count.len()),
            ("act_min", self.act_min.len()),
            ("act_max", self.act_max.len()),
            ("act_mean", self.act_mean.len()),
            ("act_std", self.act_std.len()),
            ("act_l2_norm", self.act_l2_norm.len()),
            ("act_nan_count", self.act_nan_count.len()),
            ("act_inf_count", self.act_inf_count.len()),
            (
                "act_fingerprint",
                fingerprints.as_ref().map_or(self.act_layer.len(), Vec::len),
            ),
        ])?;
        for i in 0..n {
            let st = stage(&self.act_stage[i], "act_stage", i)?;
            let l = match (st.is_layer_stage(), self.act_layer[i]) {
                (true, Some(l)) => layer(l, "act_layer", i)?,
                (true, None) => return Err(format!("act_layer[{i}]: stage {st} needs a layer")),
                (false, _) => 0,
            };
            *f.activations.stats_mut(l, st) = TensorStats {
                count: self.act_count[i],
                min: self.act_min[i].0,
                max: self.act_max[i].0,
                mean: self.act_mean[i].0,
                std: self.act_std[i].0,
                l2_norm: self.act_l2_norm[i].0,
                nan_count: self.act_nan_count[i],
                inf_count: self.act_inf_count[i],
            };
            if let Some(fp) = &fingerprints {
                *f.activations.fingerprint_mut(l, st) = fp[i];
            }
        }
        let n = same_length(&[
            ("res_layer", self.res_layer.len()),
            ("res_ratio", self.res_ratio.len()),
        ])?;
        for i in 0..n {
            let l = layer(self.res_layer[i], "res_layer", i)?;
            f.activations.layer_mut(l).residual_ratio = self.res_ratio[i].0;
        }
        // Layers are created in index order by `layer_mut`; each knows it.
        debug_assert!(f
            .activations
            .layers
            .iter()
            .enumerate()
            .all(|(i, l): (usize, &LayerActivationTrace)| l.layer_idx == i));

        // Anomalies.
        let n = same_length(&[
            ("anomaly_layer", self.anomaly_layer.len()),
            ("anomaly_stage", self.anomaly_stage.len()),
            ("anomaly_kind", self.anomaly_kind.len()),
            ("anomaly_origin", self.anomaly_origin.len()),
            ("anomaly_count", self.anomaly_count.len()),
            ("anomaly_tensor_len", self.anomaly_tensor_len.len()),
            ("anomaly_value", self.anomaly_value.len()),
        ])?;
        for i in 0..n {
            f.anomalies.push(Anomaly {
                position,
                layer: match self.anomaly_layer[i] {
                    Some(l) => Some(layer(l, "anomaly_layer", i)?),
                    None => None,
                },
                stage: stage(&self.anomaly_stage[i], "anomaly_stage", i)?,
                kind: self.anomaly_kind[i],
                origin: self.anomaly_origin[i],
                count: self.anomaly_count[i],
                total: self.anomaly_tensor_len[i],
                value: self.anomaly_value[i].0,
            });
        }
        f.activations.has_anomaly = !f.anomalies.is_empty();

        // Attention.
        let query_pos = self.attn_query_pos;
        let n = same_length(&[
            ("attn_layer", self.attn_layer.len()),
            ("attn_head", self.attn_head.len()),
            (
                "attn_query_pos",
                query_pos.as_ref().map_or(self.attn_layer.len(), Vec::len),
            ),
            ("attn_context_len", self.attn_context_len.len()),
            ("attn_sink_weight", self.attn_sink_weight.len()),
            ("attn_entropy", self.attn_entropy.len()),
            ("attn_tail_mass", self.attn_tail_mass.len()),
            ("attn_nan_count", self.attn_nan_count.len()),
            ("attn_top_positions", self.attn_top_positions.len()),
            ("attn_top_weights", self.attn_top_weights.len()),
        ])?;
        for i in 0..n {
            let positions = &self.attn_top_positions[i];
            let weights = &self.attn_top_weights[i];
            if positions.len() != weights.len() {
                return Err(format!(
                    "attn_top_positions[{i}] has {} entries but attn_top_weights[{i}] has {}",
                    positions.len(),
                    weights.len()
                ));
            }
            f.attention.push(AttentionWeightTrace {
                layer_idx: layer(self.attn_layer[i], "attn_layer", i)?,
                head_idx: head(self.attn_head[i], "attn_head", i)?,
                query_pos: query_pos.as_ref().map_or(position, |q| q[i]),
                context_len: self.attn_context_len[i],
                top_k_positions: positions.clone(),
                top_k_weights: weights.iter().map(|w| w.0).collect(),
                tail_mass: self.attn_tail_mass[i].0,
                entropy: self.attn_entropy[i].0,
                sink_weight: self.attn_sink_weight[i].0,
                nan_count: self.attn_nan_count[i],
            });
        }

        let vocab = self.vocab.unwrap_or_default();
        // Logit lens: entries grouped by token, in recording order.
        let n = same_length(&[
            ("lens_token", self.lens_token.len()),
            ("lens_layer", self.lens_layer.len()),
            ("lens_rank", self.lens_rank.len()),
            ("lens_logit", self.lens_logit.len()),
        ])?;
        if n > 0 || self.selected_token.is_some() {
            let mut lt = LogitEvolutionTrace::new(position, 1.0, 1.0);
            lt.selected_token = self.selected_token;
            for i in 0..n {
                let id = self.lens_token[i];
                let l = lens_layer(self.lens_layer[i], "lens_layer", i)?;
                if lt.tokens.last().is_none_or(|t| t.token_id != id) {
                    let text = vocab.get(&id).cloned().unwrap_or_default();
                    lt.tokens.push(TokenLogitEvolution::new(id, text));
                }
                if let Some(t) = lt.tokens.last_mut() {
                    t.layers.push(l);
                    t.ranks.push(self.lens_rank[i]);
                    t.logits.push(self.lens_logit[i].0);
                }
            }
            f.logits = Some(lt);
        }

        // Quantization error.
        let n = same_length(&[
            ("quant_brick", self.quant_brick.len()),
            ("quant_layer", self.quant_layer.len()),
            ("quant_type", self.quant_type.len()),
            ("quant_cosine", self.quant_cosine.len()),
            ("quant_mse", self.quant_mse.len()),
            ("quant_snr_db", self.quant_snr_db.len()),
            ("quant_max_abs_error", self.quant_max_abs_error.len()),
            ("quant_elements", self.quant_elements.len()),
        ])?;
        let mut traces = Vec::with_capacity(n);
        for i in 0..n {
            traces.push(QuantizationErrorTrace {
                brick: brick(&self.quant_brick[i], "quant_brick", i)?,
                layer_idx: layer(self.quant_layer[i], "quant_layer", i)?,
                quant_type: quant_type(&self.quant_type[i], "quant_type", i)?,
                metrics: ErrorMetrics {
                    mse: self.quant_mse[i].0,
                    max_abs_error: self.quant_max_abs_error[i].0,
                    cosine_similarity: self.quant_cosine[i].0,
                    snr_db: self.quant_snr_db[i].0,
                },
                element_count: self.quant_elements[i],
            });
        }
        f.quantization = ModelQuantizationError {
            traces,
            kl_divergence: self.kl_divergence.map(|k| k.0),
            top1_agrees: self.top1_agrees,
        };

        let n = self.whatif_brick.len();
        let max_abs = self.whatif_max_abs_error;
        let elements = self.whatif_elements;
        same_length(&[
            ("whatif_brick", n),
            ("whatif_layer", self.whatif_layer.len()),
            ("whatif_type", self.whatif_type.len()),
            ("whatif_cosine", self.whatif_cosine.len()),
            ("whatif_mse", self.whatif_mse.len()),
            ("whatif_snr_db", self.whatif_snr_db.len()),
            ("whatif_max_abs_error", max_abs.as_ref().map_or(n, Vec::len)),
            ("whatif_elements", elements.as_ref().map_or(n, Vec::len)),
        ])?;
        for i in 0..n {
            f.what_if.push(QuantizationErrorTrace {
                brick: brick(&self.whatif_brick[i], "whatif_brick", i)?,
                layer_idx: layer(self.whatif_layer[i], "whatif_layer", i)?,
                quant_type: quant_type(&self.whatif_type[i], "whatif_type", i)?,
                metrics: ErrorMetrics {
                    mse: self.whatif_mse[i].0,
                    max_abs_error: max_abs.as_ref().map_or(f32::NAN, |m| m[i].0),
                    cosine_similarity: self.whatif_cosine[i].0,
                    snr_db: self.whatif_snr_db[i].0,
                },
                element_count: elements.as_ref().map_or(0, |e| e[i]),
            });
        }

        // KV cache: all of it or none of it.
        let kv = [
            self.kv_step,
            self.kv_max_positions,
            self.kv_valid_positions,
            self.kv_bytes,
            self.kv_evictions,
            self.kv_reused,
            self.kv_computed,
        ];
        let some =
            kv.iter().filter(|v| v.is_some()).count() + usize::from(self.kv_hit_rate.is_some());
        f.kv_cache = match (some, kv, self.kv_hit_rate) {
            (0, ..) => None,
            (
                _,
                [Some(step), Some(max_positions), Some(valid_positions), Some(cache_size_bytes), Some(evictions_this_step), Some(reused_positions), Some(computed_positions)],
                Some(hit),
            ) => Some(KvCacheStateTrace {
                step,
                max_positions,
                valid_positions,
                cache_size_bytes,
                cache_hit_rate: hit.0,
                evictions_this_step,
                reused_positions,
                computed_positions,
            }),
            _ => return Err("the kv_ columns are partly null: a KV state has all of them".into()),
        };

        let mut texts = vocab;
        if let (Some(id), Some(text)) = (self.token, self.token_text) {
            texts.insert(id, text);
        }
        Ok(JsonlRow {
            forward: f,
            model: self.model,
            config: self.config,
            texts,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_line_and_the_column() {
        let text = "{\"position\":0}\n\n{\"position\":1,\"act_layer\":[0],\"act_stage\":[]}\n";
        let rows: Vec<_> = JsonlReader::new(text.as_bytes()).collect();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].as_ref().map(|r| r.forward.position), Ok(0));
        let e = rows[1].as_ref().err().cloned().unwrap_or(ReadError {
            line: 0,
            message: String::new(),
        });
        assert_eq!(e.line, 3);
        assert!(
            e.message.contains("act_stage") && e.message.contains("act_layer"),
            "{e}"
        );
    }

    #[test]
    fn a_truncated_line_says_so() {
        let text = "{\"position\":0}\n{\"position\":1,\"act_la";
        let e = JsonlReader::new(text.as_bytes())
            .find_map(Result::err)
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.starts_with("line 2: the row ends early"), "{e}");
    }

    #[test]
    fn huge_layer_indices_are_refused_not_allocated() {
        let row = r#"{"position":0,"res_layer":[1000000000000],"res_ratio":[0.5]}"#;
        let e = parse_row(row).err().unwrap_or_default();
        assert!(e.contains("res_layer[0]") && e.contains("beyond"), "{e}");
        // The last layer a trace may have is read, the next one is not.
        let row = |l: usize| format!(r#"{{"position":0,"res_layer":[{l}],"res_ratio":[0.5]}}"#);
        let last = parse_row(&row(MAX_LAYERS - 1)).map(|r| r.forward.activations.layers.len());
        assert_eq!(last, Ok(MAX_LAYERS));
        let e = parse_row(&row(MAX_LAYERS)).err().unwrap_or_default();
        assert!(e.contains(&format!("= {MAX_LAYERS} is beyond")), "{e}");
    }

    #[test]
    fn huge_head_and_anomaly_layer_indices_are_refused() {
        let row = format!(
            r#"{{"position":0,"attn_layer":[0],"attn_head":[{MAX_HEADS}],"attn_context_len":[1],
            "attn_sink_weight":[1],"attn_entropy":[0],"attn_tail_mass":[0],"attn_nan_count":[0],
            "attn_top_positions":[[0]],"attn_top_weights":[[1]]}}"#
        );
        let e = parse_row(&row.replace('\n', "")).err().unwrap_or_default();
        assert!(e.contains("attn_head[0]") && e.contains("heads"), "{e}");
        let row = r#"{"position":0,"anomaly_layer":[18446744073709551615],"anomaly_stage":["output"],
            "anomaly_kind":["nan"],"anomaly_origin":["produced"],"anomaly_count":[1],
            "anomaly_tensor_len":[1],"anomaly_value":["NaN"]}"#;
        let e = parse_row(&row.replace('\n', "")).err().unwrap_or_default();
        assert!(
            e.contains("anomaly_layer[0]") && e.contains("beyond"),
            "{e}"
        );
    }

    /// The output logits sit after the last layer: a lens entry may name
    /// `MAX_LAYERS` itself, as the tracer writes for a model of
    /// `MAX_LAYERS` layers, but nothing beyond.
    #[test]
    fn a_lens_entry_may_name_the_layer_after_the_last() {
        let lens = |l: usize| {
            format!(
                r#"{{"position":0,"lens_token":[3],"lens_layer":[{l}],"lens_rank":[0],"lens_logit":[1]}}"#
            )
        };
        let row = parse_row(&lens(MAX_LAYERS));
        let layers = row.map(|r| r.forward.logits.map(|l| l.tokens[0].layers.clone()));
        assert_eq!(layers, Ok(Some(vec![MAX_LAYERS])));
        let e = parse_row(&lens(MAX_LAYERS + 1)).err().unwrap_or_default();
        assert!(e.contains("lens_layer[0]"), "{e}");
    }

    #[test]
    fn unknown_names_are_errors() {
        let row = r#"{"position":0,"quant_brick":["Warp"],"quant_layer":[0],"quant_type":["Q4_1"],
            "quant_cosine":[1],"quant_mse":[0],"quant_snr_db":["inf"],"quant_max_abs_error":[0],
            "quant_elements":[4]}"#;
        let e = parse_row(&row.replace('\n', "")).err().unwrap_or_default();
        assert!(e.contains("quant_brick[0]") && e.contains("Warp"), "{e}");
        let e = parse_row(r#"{"position":0,"anomaly_stage":["nowhere"]}"#)
            .err()
            .unwrap_or_default();
        assert!(e.contains("anomaly_stage"), "{e}");
    }

    #[test]
    fn fingerprints_read_back_and_bad_ones_are_errors() {
        let stats = r#""act_count":[3,3],"act_min":[0,0],"act_max":[1,1],"act_mean":[0.5,0.5],
            "act_std":[0.5,0.5],"act_l2_norm":[1,1],"act_nan_count":[0,0],"act_inf_count":[0,0]"#;
        let sixteen: Vec<String> = (0..16).map(|i| i.to_string()).collect();
        let row = |fingerprints: &str| {
            format!(
                r#"{{"position":0,"act_layer":[null,4],"act_stage":["embedding","output"],{stats},"act_fingerprint":{fingerprints}}}"#
            )
            .replace('\n', "")
        };
        let good = row(&format!(r#"[null,[{},"inf"]]"#, sixteen[..15].join(",")));
        let read = parse_row(&good);
        let Ok(read) = read else {
            panic!("{read:?}");
        };
        let a = &read.forward.activations;
        assert_eq!(a.fingerprint(0, Stage::Embedding), None);
        let out = a.fingerprint(4, Stage::Output).map(|f| f.0);
        let mut want = [0.0f32; 16];
        for (i, w) in want.iter_mut().enumerate() {
            *w = i as f32;
        }
        want[15] = f32::INFINITY;
        assert_eq!(out, Some(want));
        let e = parse_row(&row("[null]")).err().unwrap_or_default();
        assert!(
            e.contains("act_fingerprint") && e.contains("act_layer"),
            "{e}"
        );
        let e = parse_row(&row("[null,[1,2,3]]")).err().unwrap_or_default();
        assert!(e.contains("16 values, not 3"), "{e}");
        // Rows written before fingerprints existed have no such column.
        let old = row("[]").replace(r#","act_fingerprint":[]"#, "");
        let read = parse_row(&old).map(|r| r.forward.activations.has_fingerprints());
        assert_eq!(read, Ok(false));
    }

    #[test]
    fn a_partial_kv_state_is_an_error() {
        let e = parse_row(r#"{"position":0,"kv_step":3}"#)
            .err()
            .unwrap_or_default();
        assert!(e.contains("kv_"), "{e}");
    }
}
