//! Where two runs part: the comparison of two traces, position by position
//! and stage by stage, in forward order.
//!
//! Each side is a [`Side`]: what one run recorded at each position — the
//! statistics (and, where recorded, the fingerprint or the whole vector) of
//! every (layer, stage), the attention summaries, the logit lens and the
//! final logits. [`Side::from_jsonl`] reads a JSON Lines trace; an
//! activation dump gives the same records computed from its vectors, as the
//! tracer would have computed them. [`diff`] compares the positions both
//! sides hold — up to the first whose tokens differ, since from there the
//! two runs attend to different contexts — and reports:
//!
//! - the **first divergence**: the first (position, layer, stage), in
//!   forward order, whose error exceeds the tolerance;
//! - the **largest jump**: the (layer, stage) whose error grows most over
//!   the largest error of every site before it — where a bug sits when both
//!   sides are noisy;
//! - a per-layer table, the attention and logit-lens agreement, and the
//!   agreement of the final distributions.
//!
//! # The error of a site
//!
//! The error of a (position, layer, stage) is the largest of the relative
//! differences that both sides allow to measure:
//!
//! | measure | definition | needs |
//! |---|---|---|
//! | `mean` | \|Δmean\| / rms | statistics |
//! | `std` | \|Δstd\| / max(std) | statistics |
//! | `l2` | \|Δ‖x‖\| / max(‖x‖) | statistics |
//! | `max_abs` | \|Δmax\|x\|\| / max(max\|x\|) | statistics |
//! | `fingerprint` | ‖Δy‖ / max(‖y‖) of the two sketches | fingerprints |
//! | `vector` | ‖a − b‖ / ‖a‖ | both vectors (dumps) |
//!
//! Each moment's error is at most the vector's relative error (up to
//! `max_abs`, which can exceed it when the largest element moves), so the
//! measures agree in scale: two correct f32 implementations stay near
//! 1e-6, a 4-bit quantized run against an f32 one near 1e-2. A permutation
//! (two heads' outputs swapped) leaves every moment unchanged: only the
//! fingerprint and the vector see it. A NaN or Inf count that differs is an
//! error of `inf`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use crate::forward::ForwardTrace;
use crate::model_info::ModelInfo;
use crate::read::{no_row, JsonlReader, ReadError, SequenceChoice};
use crate::serde_float::Float;
use crate::stage::Stage;
use crate::stats::TensorStats;

/// The tolerance of [`diff`] unless told otherwise: a relative error two
/// correct f32 implementations of SmolLM2-135M stay well under, and that a
/// quantized run against an f32 one exceeds from its first layer.
pub const DEFAULT_TOLERANCE: f32 = 1e-3;

/// Errors below this floor count as this floor when jumps are measured, so
/// that a jump from exact agreement (0) to rounding noise is not infinite.
pub const JUMP_FLOOR: f32 = 1e-7;

/// A point of the forward pass: a layer's stage, or a stage outside layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Site {
    /// Layer (`None` for the embedding, the final norm and the logits).
    pub layer: Option<usize>,
    /// Stage.
    pub stage: Stage,
}

impl Site {
    /// The order of the forward pass: embedding, each layer's stages in
    /// order, final norm, logits.
    fn order(&self) -> (u8, usize, usize) {
        let group = match self.stage {
            Stage::Embedding => 0,
            Stage::FinalNorm => 2,
            Stage::Logits => 3,
            _ => 1,
        };
        let within = Stage::LAYER_STAGES
            .iter()
            .position(|s| *s == self.stage)
            .unwrap_or(0);
        (group, self.layer.unwrap_or(0), within)
    }
}

impl Ord for Site {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.order().cmp(&other.order())
    }
}

impl PartialOrd for Site {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for Site {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.layer {
            Some(l) => write!(f, "layer {l} {}", self.stage),
            None => write!(f, "{}", self.stage),
        }
    }
}

/// What one side recorded of one tensor.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Tensor {
    /// Its statistics.
    pub stats: TensorStats,
    /// Its fingerprint, when recorded.
    pub fingerprint: Option<Vec<f32>>,
    /// The whole vector, when the side holds it (a dump).
    pub values: Option<Vec<f32>>,
}

impl Tensor {
    /// The record of a whole vector, as the tracer computes it.
    pub fn of_values(values: Vec<f32>) -> Self {
        Self {
            stats: TensorStats::from_slice(&values),
            fingerprint: None,
            values: Some(values),
        }
    }
}

/// One attention head's summary at one position.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct HeadRecord {
    /// Attended cache slots of the top-k weights, largest first.
    pub top: Vec<usize>,
    /// Entropy of the weights, nats.
    pub entropy: f32,
}

/// What one side recorded at one position.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PositionRecord {
    /// The token fed at the position, when known.
    pub token: Option<u32>,
    /// The tensors of each site.
    pub tensors: BTreeMap<Site, Tensor>,
    /// Attention summaries by (layer, head).
    pub attention: BTreeMap<(usize, usize), HeadRecord>,
    /// The token chosen at this position, when known.
    pub selected: Option<u32>,
    /// Logit-lens ranks by tracked token, then by layer.
    pub lens: BTreeMap<u32, BTreeMap<usize, usize>>,
    /// The final logits, when the side holds them (a dump).
    pub logits: Option<Vec<f32>>,
}

impl PositionRecord {
    /// The record of a traced forward.
    pub fn from_forward(f: &ForwardTrace) -> Self {
        let mut r = PositionRecord {
            token: f.token,
            ..Self::default()
        };
        for (layer, stage, stats) in f.activations.recorded() {
            let fingerprint = f
                .activations
                .fingerprint(layer.unwrap_or(0), stage)
                .map(|fp| fp.0.to_vec());
            r.tensors.insert(
                Site { layer, stage },
                Tensor {
                    stats: *stats,
                    fingerprint,
                    values: None,
                },
            );
        }
        for a in &f.attention {
            r.attention.insert(
                (a.layer_idx, a.head_idx),
                HeadRecord {
                    top: a.top_k_positions.clone(),
                    entropy: a.entropy,
                },
            );
        }
        if let Some(l) = &f.logits {
            r.selected = l.selected_token;
            for t in &l.tokens {
                let ranks = r.lens.entry(t.token_id).or_default();
                for (i, &rank) in t.ranks.iter().enumerate() {
                    ranks.insert(t.layer_at(i), rank);
                }
            }
        }
        r
    }
}

/// One run, as [`diff`] compares it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Side {
    /// A name for messages (the file name).
    pub name: String,
    /// What the side is (`"jsonl"`, `"dump"`, `"trace"` for forwards in memory).
    pub kind: String,
    /// The model, when the side names it.
    pub model: Option<ModelInfo>,
    /// The records by position.
    pub positions: BTreeMap<usize, PositionRecord>,
}

impl Side {
    /// Reads a JSON Lines trace. A position written twice (a cache cleared
    /// and run again) keeps its last row.
    ///
    /// # Errors
    ///
    /// The first row that cannot be read, with its line; a trace with no
    /// row.
    pub fn from_jsonl(name: &str, input: impl std::io::BufRead) -> Result<Self, ReadError> {
        Self::from_jsonl_of(name, input, SequenceChoice::Single)
    }

    /// [`from_jsonl`](Self::from_jsonl) of the rows `choice` keeps: one
    /// sequence of a trace of forwards over several.
    ///
    /// # Errors
    ///
    /// As [`from_jsonl`](Self::from_jsonl); a row of a second sequence
    /// under [`SequenceChoice::Single`]; no row of the sequence asked for.
    pub fn from_jsonl_of(
        name: &str,
        input: impl std::io::BufRead,
        choice: SequenceChoice,
    ) -> Result<Self, ReadError> {
        let mut side = Side {
            name: name.to_string(),
            kind: "jsonl".into(),
            ..Side::default()
        };
        for row in JsonlReader::new(input).of_sequence(choice) {
            let row = row?;
            if row.model.is_some() {
                side.model = row.model;
            }
            side.insert_forward(&row.forward);
        }
        if side.positions.is_empty() {
            return Err(no_row(choice));
        }
        Ok(side)
    }

    /// The forwards a tracer holds (for instance
    /// [`ModelTracer::forwards`](crate::ModelTracer::forwards)), compared
    /// in the same process as the run. A position traced twice keeps its
    /// last forward.
    pub fn from_forwards<'a>(
        name: &str,
        forwards: impl IntoIterator<Item = &'a ForwardTrace>,
    ) -> Self {
        let mut side = Side {
            name: name.to_string(),
            kind: "trace".into(),
            ..Side::default()
        };
        for f in forwards {
            side.insert_forward(f);
        }
        side
    }

    fn insert_forward(&mut self, f: &ForwardTrace) {
        self.positions
            .insert(f.position, PositionRecord::from_forward(f));
    }

    /// Reads an activation dump: every row of every tensor becomes the
    /// record the tracer would have made of it — its statistics
    /// ([`TensorStats::from_slice`]) and its fingerprint
    /// ([`crate::fingerprint::fingerprint`]) — and keeps its values, so
    /// that two dumps are also compared element by element. The row of
    /// `logits` also gives the final distribution (KL, top-1). A token of
    /// `-1` is unknown.
    ///
    /// # Errors
    ///
    /// A dump with no row.
    #[cfg(feature = "dump")]
    pub fn from_dump(name: &str, dump: &crate::dump::ActivationDump) -> Result<Self, DiffError> {
        let mut side = Side {
            name: name.to_string(),
            kind: "dump".into(),
            ..Side::default()
        };
        if dump.tokens().is_empty() {
            return Err(DiffError(format!("{name}: the dump holds no position")));
        }
        let mut fingerprinter = crate::fingerprint::Fingerprinter::new();
        for (row, (&position, &token)) in dump.positions().iter().zip(dump.tokens()).enumerate() {
            let mut r = PositionRecord {
                token: u32::try_from(token).ok(),
                ..PositionRecord::default()
            };
            for view in dump.tensors() {
                // An empty row is a stage the tracer would not have recorded.
                let Some(x) = view.row(row).filter(|x| !x.is_empty()) else {
                    continue;
                };
                let mut t = Tensor::of_values(x.to_vec());
                t.fingerprint = Some(fingerprinter.fingerprint(x).0.to_vec());
                if view.stage() == Stage::Logits {
                    r.logits = Some(x.to_vec());
                }
                r.tensors.insert(
                    Site {
                        layer: view.layer(),
                        stage: view.stage(),
                    },
                    t,
                );
            }
            side.positions.insert(position, r);
        }
        Ok(side)
    }

    /// Reads one side from the bytes of a file: an activation dump (a
    /// safetensors file: eight bytes of header length, then its JSON
    /// header) or a JSON Lines trace (text whose first non-blank byte opens
    /// an object).
    ///
    /// # Errors
    ///
    /// Bytes that are neither, and the error of the reader of the kind
    /// they are, with its line or its tensor; a dump when the crate is
    /// built without the `dump` feature.
    pub fn from_bytes(name: &str, bytes: &[u8]) -> Result<Self, DiffError> {
        Self::from_bytes_of(name, bytes, SequenceChoice::Single)
    }

    /// [`from_bytes`](Self::from_bytes) of the rows `choice` keeps, when
    /// the bytes are a JSON Lines trace.
    ///
    /// # Errors
    ///
    /// As [`from_bytes`](Self::from_bytes); a sequence asked of a dump,
    /// which holds the forwards of one sequence.
    pub fn from_bytes_of(
        name: &str,
        bytes: &[u8],
        choice: SequenceChoice,
    ) -> Result<Self, DiffError> {
        let first = bytes.iter().find(|b| !b.is_ascii_whitespace()).copied();
        if first == Some(b'{') {
            return Self::from_jsonl_of(name, bytes, choice)
                .map_err(|e| DiffError(format!("{name}: {e}")));
        }
        if let SequenceChoice::Only(id) = choice {
            return Err(DiffError(format!(
                "{name}: not a JSON Lines trace, so it has no sequence {} to choose",
                id.0
            )));
        }
        if bytes.len() > 8 && bytes[8] == b'{' {
            #[cfg(feature = "dump")]
            {
                let dump = crate::dump::ActivationDump::from_bytes(bytes)
                    .map_err(|e| DiffError(format!("{name}: {e}")))?;
                return Self::from_dump(name, &dump);
            }
            #[cfg(not(feature = "dump"))]
            return Err(DiffError(format!(
                "{name}: an activation dump, which this build cannot read (feature `dump`)"
            )));
        }
        Err(DiffError(format!(
            "{name}: neither a JSON Lines trace (its first byte would be '{{') nor an activation dump (a safetensors file)"
        )))
    }

    /// The width of the layer stages' tensors (the hidden size), when the
    /// side recorded one.
    pub fn dim(&self) -> Option<usize> {
        self.positions.values().find_map(|p| {
            p.tensors
                .iter()
                .find(|(s, t)| s.layer.is_some() && t.stats.count > 0)
                .map(|(_, t)| t.stats.count)
        })
    }

    /// The number of layers the side recorded.
    pub fn layers(&self) -> usize {
        self.positions
            .values()
            .flat_map(|p| p.tensors.keys().filter_map(|s| s.layer))
            .max()
            .map_or(0, |l| l + 1)
    }
}

/// Why two sides cannot be compared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiffError(pub String);

impl fmt::Display for DiffError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for DiffError {}

/// The errors of one site at one position.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize)]
pub struct SiteError {
    /// Largest of the measures below that both sides allow.
    pub error: Float,
    /// The measure that gave it (`"mean"`, `"fingerprint"`, ...).
    pub measure: &'static str,
    /// \|Δmean\| / rms.
    pub mean: Float,
    /// \|Δstd\| / max(std).
    pub std: Float,
    /// \|Δ‖x‖\| / max(‖x‖).
    pub l2: Float,
    /// \|Δmax\|x\|\| / max(max\|x\|).
    pub max_abs: Float,
    /// Relative distance of the fingerprints (`null` without them).
    pub fingerprint: Option<Float>,
    /// ‖a − b‖ / ‖a‖ of the vectors (`null` without them).
    pub vector: Option<Float>,
    /// Cosine similarity of the vectors (`null` without them).
    pub cosine: Option<Float>,
}

/// Relative difference of two magnitudes against `scale`; 0 when both are
/// equal (zero included), `inf` when one is not finite and the other is.
fn rel(a: f32, b: f32, scale: f32) -> f32 {
    if a == b || (a.is_nan() && b.is_nan()) {
        return 0.0;
    }
    let d = (a - b).abs();
    if !d.is_finite() {
        return f32::INFINITY;
    }
    if scale > 0.0 {
        d / scale
    } else {
        f32::INFINITY
    }
}

fn fingerprint_distance(a: &[f32], b: &[f32]) -> f32 {
    if a.len() != b.len() {
        return f32::INFINITY;
    }
    let (mut d2, mut na, mut nb) = (0.0f64, 0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        d2 += f64::from(x - y) * f64::from(x - y);
        na += f64::from(x) * f64::from(x);
        nb += f64::from(y) * f64::from(y);
    }
    let scale = na.max(nb).sqrt();
    if d2 == 0.0 {
        0.0
    } else if scale > 0.0 {
        (d2.sqrt() / scale) as f32
    } else {
        f32::INFINITY
    }
}

/// ‖a − b‖ / ‖a‖ and the cosine of two vectors, over the elements finite
/// on both sides; `inf` and NaN when their lengths differ.
fn vector_error(a: &[f32], b: &[f32]) -> (f32, f32) {
    if a.len() != b.len() {
        return (f32::INFINITY, f32::NAN);
    }
    let (mut d2, mut aa, mut bb, mut ab) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        if !(x.is_finite() && y.is_finite()) {
            continue;
        }
        let (x, y) = (f64::from(x), f64::from(y));
        d2 += (x - y) * (x - y);
        aa += x * x;
        bb += y * y;
        ab += x * y;
    }
    let err = if d2 == 0.0 {
        0.0
    } else if aa > 0.0 {
        (d2 / aa).sqrt() as f32
    } else {
        f32::INFINITY
    };
    let cos = if aa > 0.0 && bb > 0.0 {
        (ab / (aa.sqrt() * bb.sqrt())) as f32
    } else if aa == 0.0 && bb == 0.0 {
        1.0
    } else {
        0.0
    };
    (err, cos)
}

/// The errors of `b` against `a` at one site.
pub fn site_error(a: &Tensor, b: &Tensor) -> SiteError {
    let (sa, sb) = (&a.stats, &b.stats);
    let rms = |s: &TensorStats| {
        let n = s.finite_count();
        if n == 0 {
            0.0
        } else {
            s.l2_norm / (n as f32).sqrt()
        }
    };
    let mut e = SiteError {
        mean: Float(rel(sa.mean, sb.mean, rms(sa).max(rms(sb)))),
        std: Float(rel(sa.std, sb.std, sa.std.max(sb.std))),
        l2: Float(rel(sa.l2_norm, sb.l2_norm, sa.l2_norm.max(sb.l2_norm))),
        max_abs: Float(rel(
            sa.max_abs(),
            sb.max_abs(),
            sa.max_abs().max(sb.max_abs()),
        )),
        ..SiteError::default()
    };
    let mut best = (e.mean.0, "mean");
    for (v, name) in [(e.std.0, "std"), (e.l2.0, "l2"), (e.max_abs.0, "max_abs")] {
        if v > best.0 || v.is_nan() {
            best = (v, name);
        }
    }
    if sa.count != sb.count || sa.nan_count != sb.nan_count || sa.inf_count != sb.inf_count {
        best = (f32::INFINITY, "count");
    }
    if let (Some(fa), Some(fb)) = (&a.fingerprint, &b.fingerprint) {
        let d = fingerprint_distance(fa, fb);
        e.fingerprint = Some(Float(d));
        if d > best.0 {
            best = (d, "fingerprint");
        }
    }
    if let (Some(va), Some(vb)) = (&a.values, &b.values) {
        let (d, cos) = vector_error(va, vb);
        e.vector = Some(Float(d));
        e.cosine = Some(Float(cos));
        if d > best.0 {
            best = (d, "vector");
        }
    }
    e.error = Float(best.0);
    e.measure = best.1;
    e
}

/// A (position, layer, stage) the diff points at.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Place {
    /// Position.
    pub position: usize,
    /// Layer (`null` outside layers).
    pub layer: Option<usize>,
    /// Stage name.
    pub stage: &'static str,
    /// The error there.
    pub error: Float,
    /// The measure that gave it.
    pub measure: &'static str,
    /// The largest error of every site before it (for a jump).
    pub before: Float,
}

/// One site's errors over the shared positions.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SiteRow {
    /// Layer (`null` outside layers).
    pub layer: Option<usize>,
    /// Stage name.
    pub stage: &'static str,
    /// Largest error over the positions.
    pub max_error: Float,
    /// The position of that error.
    pub position: usize,
    /// The measure that gave it.
    pub measure: &'static str,
    /// Mean error over the positions (finite ones).
    pub mean_error: Float,
}

/// One layer's agreement over the shared positions.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LayerRow {
    /// Layer.
    pub layer: usize,
    /// Largest error of its stages.
    pub max_error: Float,
    /// The stage of that error.
    pub worst_stage: &'static str,
    /// Mean share of the top-k attended slots both sides agree on, over
    /// the heads and positions both summarized (`null` without attention).
    pub attention_overlap: Option<Float>,
    /// Largest entropy difference of a head, nats.
    pub attention_entropy_diff: Option<Float>,
    /// Largest change of a tracked token's logit-lens rank at this layer.
    pub lens_rank_change: Option<usize>,
}

/// A shared position whose tokens differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct TokenMismatch {
    /// Position.
    pub position: usize,
    /// Token of side A.
    pub a: Option<u32>,
    /// Token of side B.
    pub b: Option<u32>,
}

/// What a side is, in the report.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SideSummary {
    /// Its name.
    pub name: String,
    /// `"jsonl"`, `"dump"` or `"trace"`.
    pub kind: String,
    /// Positions it holds.
    pub positions: usize,
    /// Layers it recorded.
    pub layers: usize,
    /// Hidden size (`null` when unknown).
    pub dim: Option<usize>,
}

/// The comparison of two runs.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DiffReport {
    /// Side A (the reference).
    pub a: SideSummary,
    /// Side B.
    pub b: SideSummary,
    /// The tolerance of the first divergence.
    pub tolerance: Float,
    /// Positions both sides hold, compared.
    pub positions: Vec<usize>,
    /// Positions only A holds (skipped).
    pub only_a: Vec<usize>,
    /// Positions only B holds (skipped).
    pub only_b: Vec<usize>,
    /// Shared positions whose tokens differ.
    pub token_mismatches: Vec<TokenMismatch>,
    /// The first shared position whose tokens differ: from there on the
    /// two runs see different contexts, and their activations are not
    /// compared (the final distributions still are).
    pub contexts_differ_from: Option<usize>,
    /// Sites both sides recorded at some shared position, in forward order.
    pub sites_compared: usize,
    /// The first (position, layer, stage) in forward order whose error
    /// exceeds the tolerance.
    pub first_divergence: Option<Place>,
    /// The site whose largest error grows most over the largest error of
    /// every site before it (errors below [`JUMP_FLOOR`] count as it).
    pub largest_jump: Option<Place>,
    /// Every site, in forward order.
    pub sites: Vec<SiteRow>,
    /// Every layer.
    pub layers: Vec<LayerRow>,
    /// Error by layer (rows) and shared position (columns): the largest of
    /// the layer's stages.
    pub heatmap: Vec<Vec<Option<Float>>>,
    /// Share of shared positions whose chosen tokens agree (`null` when a
    /// side did not record them).
    pub top1_agreement: Option<Float>,
    /// Mean KL(A ‖ B) of the final distributions, nats (`null` unless both
    /// sides hold the logits).
    pub mean_kl: Option<Float>,
    /// Largest KL(A ‖ B) of a position.
    pub max_kl: Option<Float>,
}

fn log_softmax(x: &[f32]) -> Vec<f64> {
    let max = x
        .iter()
        .copied()
        .filter(|v| v.is_finite())
        .fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = x
        .iter()
        .filter(|v| v.is_finite())
        .map(|&v| f64::from(v - max).exp())
        .sum();
    let log_sum = sum.ln();
    x.iter()
        .map(|&v| {
            if v.is_finite() {
                f64::from(v - max) - log_sum
            } else {
                f64::NEG_INFINITY
            }
        })
        .collect()
}

/// KL(p ‖ q) of the softmax distributions of two logit vectors, nats.
fn kl(a: &[f32], b: &[f32]) -> f32 {
    if a.len() != b.len() || a.is_empty() {
        return f32::NAN;
    }
    let (la, lb) = (log_softmax(a), log_softmax(b));
    let mut kl = 0.0;
    for (&pa, &pb) in la.iter().zip(&lb) {
        if pa.is_finite() {
            kl += pa.exp() * (pa - pb);
        }
    }
    kl.max(0.0) as f32
}

fn argmax(x: &[f32]) -> Option<u32> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &v) in x.iter().enumerate() {
        if v.is_finite() && best.is_none_or(|(_, b)| v > b) {
            best = Some((i, v));
        }
    }
    best.map(|(i, _)| i as u32)
}

/// Compares `b` against `a`.
///
/// # Errors
///
/// Sides that cannot be compared: of different hidden sizes or layer
/// counts (different models), or with no position in common.
pub fn diff(a: &Side, b: &Side, tolerance: f32) -> Result<DiffReport, DiffError> {
    if let (Some(da), Some(db)) = (a.dim(), b.dim()) {
        if da != db {
            return Err(DiffError(format!(
                "{} has hidden size {da} and {} hidden size {db}: traces of different models",
                a.name, b.name
            )));
        }
    }
    let (la, lb) = (a.layers(), b.layers());
    if la > 0 && lb > 0 && la != lb {
        return Err(DiffError(format!(
            "{} recorded {la} layers and {} {lb}: traces of different models (or of different --dump-layers)",
            a.name, b.name
        )));
    }
    let pa: BTreeSet<usize> = a.positions.keys().copied().collect();
    let pb: BTreeSet<usize> = b.positions.keys().copied().collect();
    let shared: Vec<usize> = pa.intersection(&pb).copied().collect();
    if shared.is_empty() {
        let span = |s: &BTreeSet<usize>| match (s.first(), s.last()) {
            (Some(x), Some(y)) => format!("{x}..={y}"),
            _ => "none".into(),
        };
        return Err(DiffError(format!(
            "no position in common: {} holds {}, {} holds {}",
            a.name,
            span(&pa),
            b.name,
            span(&pb)
        )));
    }
    let summary = |s: &Side| SideSummary {
        name: s.name.clone(),
        kind: s.kind.clone(),
        positions: s.positions.len(),
        layers: s.layers(),
        dim: s.dim(),
    };

    let mut token_mismatches = Vec::new();
    let mut first_divergence: Option<Place> = None;
    // Per site: (max error, its position, its measure, sum, finite count).
    let mut per_site: BTreeMap<Site, (f32, usize, &'static str, f64, usize)> = BTreeMap::new();
    let layer_count = la.max(lb);
    let mut heatmap = vec![vec![None; shared.len()]; layer_count];
    let mut attention: BTreeMap<usize, (f64, usize, f32)> = BTreeMap::new();
    let mut lens: BTreeMap<usize, usize> = BTreeMap::new();
    let (mut agree, mut chosen) = (0usize, 0usize);
    let mut kls = Vec::new();

    let mut contexts_differ_from = None;
    for (column, &p) in shared.iter().enumerate() {
        let (ra, rb) = (&a.positions[&p], &b.positions[&p]);
        if let (Some(ta), Some(tb)) = (ra.token, rb.token) {
            if ta != tb {
                token_mismatches.push(TokenMismatch {
                    position: p,
                    a: Some(ta),
                    b: Some(tb),
                });
                contexts_differ_from.get_or_insert(p);
            }
        }
        let top = |r: &PositionRecord| r.selected.or_else(|| r.logits.as_deref().and_then(argmax));
        if let (Some(x), Some(y)) = (top(ra), top(rb)) {
            chosen += 1;
            agree += usize::from(x == y);
        }
        if let (Some(x), Some(y)) = (&ra.logits, &rb.logits) {
            kls.push(kl(x, y));
        }
        if contexts_differ_from.is_some() {
            continue;
        }
        for (site, ta) in &ra.tensors {
            let Some(tb) = rb.tensors.get(site) else {
                continue;
            };
            let e = site_error(ta, tb);
            let err = e.error.0;
            if first_divergence.is_none() && (err > tolerance || err.is_nan()) {
                first_divergence = Some(Place {
                    position: p,
                    layer: site.layer,
                    stage: site.stage.name(),
                    error: e.error,
                    measure: e.measure,
                    before: Float(0.0),
                });
            }
            let s = per_site.entry(*site).or_insert((0.0, p, e.measure, 0.0, 0));
            if err > s.0 || (err.is_nan() && !s.0.is_nan()) {
                (s.0, s.1, s.2) = (err, p, e.measure);
            }
            if err.is_finite() {
                s.3 += f64::from(err);
                s.4 += 1;
            }
            if let Some(l) = site.layer {
                if let Some(cell) = heatmap.get_mut(l).and_then(|row| row.get_mut(column)) {
                    let old = cell.map_or(0.0, |c: Float| c.0);
                    if cell.is_none() || err > old || err.is_nan() {
                        *cell = Some(Float(err));
                    }
                }
            }
        }
        for ((layer, head), ha) in &ra.attention {
            let Some(hb) = rb.attention.get(&(*layer, *head)) else {
                continue;
            };
            let k = ha.top.len().max(hb.top.len());
            let common = ha.top.iter().filter(|s| hb.top.contains(s)).count();
            let overlap = if k == 0 {
                1.0
            } else {
                common as f64 / k as f64
            };
            let entry = attention.entry(*layer).or_insert((0.0, 0, 0.0));
            entry.0 += overlap;
            entry.1 += 1;
            let d = (ha.entropy - hb.entropy).abs();
            if d > entry.2 || d.is_nan() {
                entry.2 = d;
            }
        }
        for (token, ranks_a) in &ra.lens {
            let Some(ranks_b) = rb.lens.get(token) else {
                continue;
            };
            for (layer, &r) in ranks_a {
                if let Some(&rb) = ranks_b.get(layer) {
                    let change = r.abs_diff(rb);
                    let e = lens.entry(*layer).or_insert(0);
                    *e = (*e).max(change);
                }
            }
        }
    }

    // The largest jump: over the sites in forward order, the growth of a
    // site's error over the largest before it, on a log scale.
    let mut largest_jump: Option<(f32, Place)> = None;
    let mut before = 0.0f32;
    for (site, &(err, p, measure, _, _)) in &per_site {
        let growth = (err.max(JUMP_FLOOR) / before.max(JUMP_FLOOR)).ln();
        let growth = if growth.is_nan() {
            f32::INFINITY
        } else {
            growth
        };
        if growth > 0.0 && largest_jump.as_ref().is_none_or(|(g, _)| growth > *g) {
            largest_jump = Some((
                growth,
                Place {
                    position: p,
                    layer: site.layer,
                    stage: site.stage.name(),
                    error: Float(err),
                    measure,
                    before: Float(before),
                },
            ));
        }
        if err > before || err.is_nan() {
            before = if err.is_nan() { f32::INFINITY } else { err };
        }
    }

    let sites: Vec<SiteRow> = per_site
        .iter()
        .map(|(site, &(err, p, measure, sum, n))| SiteRow {
            layer: site.layer,
            stage: site.stage.name(),
            max_error: Float(err),
            position: p,
            measure,
            mean_error: Float(if n > 0 {
                (sum / n as f64) as f32
            } else {
                f32::NAN
            }),
        })
        .collect();
    let layers = (0..layer_count)
        .map(|l| {
            let worst = sites.iter().filter(|s| s.layer == Some(l)).fold(
                None::<&SiteRow>,
                |w, s| match w {
                    Some(w) if s.max_error.0 <= w.max_error.0 || w.max_error.0.is_nan() => Some(w),
                    _ => Some(s),
                },
            );
            LayerRow {
                layer: l,
                max_error: Float(worst.map_or(f32::NAN, |w| w.max_error.0)),
                worst_stage: worst.map_or("", |w| w.stage),
                attention_overlap: attention
                    .get(&l)
                    .map(|&(sum, n, _)| Float((sum / n.max(1) as f64) as f32)),
                attention_entropy_diff: attention.get(&l).map(|&(_, _, d)| Float(d)),
                lens_rank_change: lens.get(&l).copied(),
            }
        })
        .collect();
    let finite_kls: Vec<f32> = kls.iter().copied().filter(|k| k.is_finite()).collect();
    Ok(DiffReport {
        a: summary(a),
        b: summary(b),
        tolerance: Float(tolerance),
        only_a: pa.difference(&pb).copied().collect(),
        only_b: pb.difference(&pa).copied().collect(),
        positions: shared,
        token_mismatches,
        contexts_differ_from,
        sites_compared: per_site.len(),
        first_divergence,
        largest_jump: largest_jump.map(|(_, p)| p),
        sites,
        layers,
        heatmap,
        top1_agreement: (chosen > 0).then(|| Float(agree as f32 / chosen as f32)),
        mean_kl: (!kls.is_empty())
            .then(|| Float(finite_kls.iter().sum::<f32>() / finite_kls.len().max(1) as f32)),
        max_kl: (!kls.is_empty()).then(|| Float(kls.iter().copied().fold(0.0, f32::max))),
    })
}

impl DiffReport {
    /// The report as JSON (non-finite numbers as `"NaN"`, `"inf"`).
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Writes the comparison as one self-contained HTML page: the verdict,
    /// a layers × positions heatmap of the error with the first divergence
    /// outlined, and the site and layer tables. Like the report, the data
    /// is embedded as JSON that no string in it can close, and rendered
    /// with `textContent`; `<body data-status="ok">` once it rendered.
    pub fn write_html(&self, out: &mut impl std::io::Write) -> std::io::Result<()> {
        let title = crate::report::escape_html(&format!(
            "model-tracer diff: {} vs {}",
            self.a.name, self.b.name
        ));
        let data = crate::report::script_json(self).map_err(std::io::Error::other)?;
        let mut page = String::with_capacity(data.len() + 16 * 1024);
        page.push_str("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n");
        page.push_str(&format!("<title>{title}</title>\n<style>"));
        page.push_str(crate::report::STYLE);
        page.push_str("</style>\n</head>\n<body data-status=\"loading\">\n");
        page.push_str(&format!("<header><h1>{title}</h1></header>\n"));
        page.push_str(DIFF_BODY);
        page.push_str("<script type=\"application/json\" id=\"diff-data\">");
        page.push_str(&data);
        // One script element: the shared DOM helpers, then the page's script.
        page.push_str("</script>\n<script>");
        page.push_str(crate::report::DOM);
        page.push_str(DIFF_SCRIPT);
        page.push_str("</script>\n</body>\n</html>\n");
        out.write_all(page.as_bytes())
    }
}

// The page's parts, each in a file of its own language.
const DIFF_BODY: &str = include_str!("../output/report/diff_body.html");
const DIFF_SCRIPT: &str = include_str!("../output/report/diff.js");

impl fmt::Display for DiffReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let side = |s: &SideSummary| {
            format!(
                "{} ({}, {} positions, {} layers{})",
                s.name,
                s.kind,
                s.positions,
                s.layers,
                s.dim.map_or(String::new(), |d| format!(", hidden {d}"))
            )
        };
        writeln!(f, "A: {}", side(&self.a))?;
        writeln!(f, "B: {}", side(&self.b))?;
        let span = |v: &[usize]| match (v.first(), v.last()) {
            (Some(x), Some(y)) if x == y => format!("{x}"),
            (Some(x), Some(y)) => format!("{x}..={y}"),
            _ => "none".into(),
        };
        write!(
            f,
            "compared {} positions ({}), {} sites",
            self.positions.len(),
            span(&self.positions),
            self.sites_compared
        )?;
        if !self.only_a.is_empty() || !self.only_b.is_empty() {
            write!(
                f,
                "; skipped {} only in A ({}), {} only in B ({})",
                self.only_a.len(),
                span(&self.only_a),
                self.only_b.len(),
                span(&self.only_b)
            )?;
        }
        writeln!(f)?;
        for m in self.token_mismatches.iter().take(8) {
            writeln!(
                f,
                "tokens differ at position {}: A {}, B {}",
                m.position,
                m.a.map_or("-".into(), |t| t.to_string()),
                m.b.map_or("-".into(), |t| t.to_string())
            )?;
        }
        if self.token_mismatches.len() > 8 {
            writeln!(
                f,
                "tokens differ at {} more positions",
                self.token_mismatches.len() - 8
            )?;
        }
        if let Some(p) = self.contexts_differ_from {
            writeln!(
                f,
                "activations compared before position {p} only: from there the runs read different tokens"
            )?;
        }
        let place = |p: &Place| {
            format!(
                "position {}, {}{} (error {:.3e} by {})",
                p.position,
                p.layer.map_or(String::new(), |l| format!("layer {l} ")),
                p.stage,
                p.error.0,
                p.measure
            )
        };
        match &self.first_divergence {
            Some(p) => writeln!(
                f,
                "first divergence: {} > tolerance {:.1e}",
                place(p),
                self.tolerance.0
            )?,
            None => writeln!(
                f,
                "no divergence: every error is within the tolerance {:.1e}",
                self.tolerance.0
            )?,
        }
        if let Some(p) = &self.largest_jump {
            let within = if p.error.0 <= self.tolerance.0 {
                ", within the tolerance"
            } else {
                ""
            };
            writeln!(
                f,
                "largest jump: {} from {:.3e} before it{within}",
                place(p),
                p.before.0
            )?;
        }
        if let Some(t) = self.top1_agreement {
            write!(f, "top-1 agreement {:.1}%", 100.0 * t.0)?;
            if let (Some(m), Some(x)) = (self.mean_kl, self.max_kl) {
                write!(f, ", KL(A||B) mean {:.3e} max {:.3e} nats", m.0, x.0)?;
            }
            writeln!(f)?;
        }
        writeln!(
            f,
            "{:>5}  {:>10}  {:<13}  {:>9}  {:>9}  {:>6}",
            "layer", "max error", "at stage", "attn top", "entropy", "lens"
        )?;
        for l in &self.layers {
            let opt = |v: Option<Float>, pct: bool| match v {
                Some(v) if pct => format!("{:.0}%", 100.0 * v.0),
                Some(v) => format!("{:.2e}", v.0),
                None => "-".into(),
            };
            writeln!(
                f,
                "{:>5}  {:>10.3e}  {:<13}  {:>9}  {:>9}  {:>6}",
                l.layer,
                l.max_error.0,
                l.worst_stage,
                opt(l.attention_overlap, true),
                opt(l.attention_entropy_diff, false),
                l.lens_rank_change.map_or("-".into(), |r| r.to_string())
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn side(name: &str, vectors: &[(usize, Site, Vec<f32>)]) -> Side {
        let mut s = Side {
            name: name.into(),
            kind: "test".into(),
            ..Side::default()
        };
        for (p, site, v) in vectors {
            s.positions
                .entry(*p)
                .or_default()
                .tensors
                .insert(*site, Tensor::of_values(v.clone()));
        }
        s
    }

    fn site(layer: usize, stage: Stage) -> Site {
        Site {
            layer: Some(layer),
            stage,
        }
    }

    fn vector(seed: usize) -> Vec<f32> {
        (0..64)
            .map(|i| ((i * 37 + seed * 11) % 17) as f32 - 8.0)
            .collect()
    }

    fn run(perturb: Option<(usize, Stage, f32)>) -> Side {
        let mut v = Vec::new();
        for p in 0..3 {
            v.push((
                p,
                Site {
                    layer: None,
                    stage: Stage::Embedding,
                },
                vector(p),
            ));
            let mut growth = 1.0;
            for l in 0..4 {
                for (k, &st) in Stage::LAYER_STAGES.iter().enumerate() {
                    if let Some((pl, ps, f)) = perturb {
                        if pl == l && ps == st {
                            growth *= f;
                        }
                    }
                    let x: Vec<f32> = vector(p + l * 7 + k).iter().map(|x| x * growth).collect();
                    v.push((p, site(l, st), x));
                }
            }
        }
        side("run", &v)
    }

    #[test]
    fn sites_order_as_the_forward_pass() {
        let mut sites = [
            Site {
                layer: None,
                stage: Stage::Logits,
            },
            site(1, Stage::Input),
            site(0, Stage::Output),
            Site {
                layer: None,
                stage: Stage::Embedding,
            },
            site(0, Stage::PostAttn),
            Site {
                layer: None,
                stage: Stage::FinalNorm,
            },
        ];
        sites.sort();
        let names: Vec<String> = sites.iter().map(|s| s.to_string()).collect();
        assert_eq!(
            names,
            [
                "embedding",
                "layer 0 post_attn",
                "layer 0 output",
                "layer 1 input",
                "final_norm",
                "logits"
            ]
        );
    }

    #[test]
    fn a_run_against_itself_has_no_divergence() {
        let a = run(None);
        let d = diff(&a, &a, DEFAULT_TOLERANCE).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(d.first_divergence, None);
        assert_eq!(d.largest_jump, None);
        assert!(d.sites.iter().all(|s| s.max_error.0 == 0.0));
        assert_eq!(d.sites_compared, 1 + 4 * 6);
    }

    #[test]
    fn a_scaled_stage_is_the_first_divergence_and_the_largest_jump() {
        for (layer, stage) in [
            (0, Stage::PostNorm),
            (2, Stage::PostAttn),
            (3, Stage::Output),
        ] {
            let d = diff(
                &run(None),
                &run(Some((layer, stage, 1.01))),
                DEFAULT_TOLERANCE,
            )
            .unwrap_or_else(|e| panic!("{e}"));
            let first = d
                .first_divergence
                .unwrap_or_else(|| panic!("none at {layer}"));
            assert_eq!(
                (first.position, first.layer, first.stage),
                (0, Some(layer), stage.name())
            );
            assert!((first.error.0 - 0.01).abs() < 1e-3, "{first:?}");
            let jump = d.largest_jump.unwrap_or_else(|| panic!("no jump"));
            assert_eq!((jump.layer, jump.stage), (Some(layer), stage.name()));
        }
    }

    #[test]
    fn a_permutation_is_seen_by_the_vectors_not_the_moments() {
        let a = run(None);
        let mut b = a.clone();
        let s = site(1, Stage::PostAttn);
        for rec in b.positions.values_mut() {
            if let Some(t) = rec.tensors.get_mut(&s) {
                let mut v = t.values.clone().unwrap_or_default();
                v.swap(0, 9);
                v.swap(3, 20);
                *t = Tensor::of_values(v);
            }
        }
        let d = diff(&a, &b, DEFAULT_TOLERANCE).unwrap_or_else(|e| panic!("{e}"));
        let first = d.first_divergence.unwrap_or_else(|| panic!("not found"));
        assert_eq!(
            (first.layer, first.stage, first.measure),
            (Some(1), "post_attn", "vector")
        );
        // Without the vectors the moments cannot see it.
        for side in [&mut b] {
            for rec in side.positions.values_mut() {
                rec.tensors.values_mut().for_each(|t| t.values = None);
            }
        }
        let d = diff(&a, &b, DEFAULT_TOLERANCE).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            d.first_divergence, None,
            "moments alone found a permutation"
        );
    }

    #[test]
    fn sides_that_cannot_be_compared_are_errors() {
        let a = run(None);
        let mut far = run(None);
        far.positions = far
            .positions
            .into_iter()
            .map(|(p, r)| (p + 100, r))
            .collect();
        let e = diff(&a, &far, DEFAULT_TOLERANCE)
            .err()
            .map(|e| e.0)
            .unwrap_or_default();
        assert!(
            e.contains("no position in common") && e.contains("100..=102"),
            "{e}"
        );
        let narrow = side("narrow", &[(0, site(0, Stage::Input), vec![1.0; 8])]);
        let e = diff(&a, &narrow, DEFAULT_TOLERANCE)
            .err()
            .map(|e| e.0)
            .unwrap_or_default();
        assert!(
            e.contains("hidden size 64") && e.contains("hidden size 8"),
            "{e}"
        );
    }

    #[test]
    fn positions_only_one_side_holds_are_skipped_and_named() {
        let a = run(None);
        let mut b = run(None);
        b.positions.remove(&0);
        let d = diff(&a, &b, DEFAULT_TOLERANCE).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (d.positions.clone(), d.only_a.clone()),
            (vec![1, 2], vec![0])
        );
        assert!(d.to_string().contains("skipped 1 only in A (0)"), "{d}");
    }

    #[test]
    fn activations_are_compared_before_the_first_token_that_differs() {
        let a = run(None);
        let mut b = run(Some((0, Stage::Input, 2.0)));
        for (p, r) in b.positions.iter_mut() {
            r.token = Some(7);
            if *p == 0 {
                // The same activations at position 0.
                r.tensors = a.positions[&0].tensors.clone();
            }
        }
        let mut a = a;
        for (p, r) in a.positions.iter_mut() {
            r.token = Some(if *p < 1 { 7 } else { 8 });
        }
        let d = diff(&a, &b, DEFAULT_TOLERANCE).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(d.contexts_differ_from, Some(1));
        assert_eq!(d.token_mismatches.len(), 2);
        assert_eq!(d.first_divergence, None, "positions 1 and 2 were compared");
        assert!(d.to_string().contains("before position 1 only"), "{d}");
    }

    #[test]
    fn the_final_distributions_compare_by_kl_and_top1() {
        let mut a = run(None);
        let mut b = run(None);
        a.positions.entry(0).or_default().logits = Some(vec![0.0, 1.0, 2.0]);
        b.positions.entry(0).or_default().logits = Some(vec![0.0, 1.0, 2.0]);
        a.positions.entry(1).or_default().logits = Some(vec![2.0, 1.0, 0.0]);
        b.positions.entry(1).or_default().logits = Some(vec![0.0, 1.0, 2.0]);
        let d = diff(&a, &b, DEFAULT_TOLERANCE).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(d.top1_agreement.map(|f| f.0), Some(0.5));
        let max = d.max_kl.map_or(0.0, |k| k.0);
        assert!(max > 1.0, "{max}");
        let json: serde_json::Value =
            serde_json::from_str(&d.to_json()).unwrap_or(serde_json::Value::Null);
        assert!(json["first_divergence"].is_null());
        assert!(json["mean_kl"].as_f64().is_some_and(|k| k > 0.5));
    }
}
