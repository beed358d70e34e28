//! Where a tracer keeps its records, and the options it keeps them with.
//!
//! Below the configs, which name a storage, and below the tracer, whose
//! methods fill it: the [`Recorder`] is defined here and its work is done in
//! [`tracer`](crate::tracer).

use std::collections::VecDeque;
use std::fmt;

use crate::activation::DEFAULT_WARMUP_LAYERS;
use crate::attention::{AttentionTraceConfig, AttentionWeightTrace};
use crate::fingerprint::Fingerprinter;
use crate::forward::ForwardTrace;
use crate::kv_cache::KvCacheSessionTrace;
use crate::logit::TokenLogitEvolution;
use crate::quant::BrickId;
use crate::sequence::SequenceId;
use crate::summary::SessionAggregates;

/// Forwards whose detailed records a tracer keeps by default (older ones are
/// folded into the session aggregates and dropped).
pub const DEFAULT_HISTORY: usize = 64;

#[doc(no_inline)]
pub use crate::activation::MAX_LAYERS;
#[doc(no_inline)]
pub use crate::attention::MAX_HEADS;

/// Longest vector a hook allocates a buffer for: a logit-lens row of
/// `vocab` values or a what-if output of `len` values (16 Mi values, 64 MiB
/// of `f32`, beyond any vocabulary or layer output). Longer ones are
/// ignored.
pub const MAX_BUFFER_LEN: usize = 1 << 24;

/// Most rows a forward over several positions records
/// ([`ModelTracer::begin_forward_rows`](crate::ModelTracer::begin_forward_rows)):
/// 65 536 positions, far beyond any prefill chunk, so that a wrong count
/// cannot make the tracer allocate a record per claimed row.
pub const MAX_FORWARD_ROWS: usize = 1 << 16;

/// Most sequences a tracer keeps records for at once
/// ([`ModelTracer::begin_forward_batch`](crate::ModelTracer::begin_forward_batch)):
/// 256, the default `max_num_seqs` of vLLM. A sequence first seen when
/// that many are live releases the lane of the one seen longest ago
/// (its records are dropped, as [`ModelTracer::end_sequence`](crate::ModelTracer::end_sequence)
/// would release them, unreturned).
pub const MAX_SEQUENCES: usize = 256;

/// Final top-k tokens whose logit-lens trajectory is recorded when no
/// tokens are tracked explicitly.
pub const DEFAULT_LENS_TOP_K: usize = 3;

/// Knobs of the trace systems, independent of which systems are on.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct TraceOptions {
    /// Which attention heads to summarize and how.
    pub attention_config: AttentionTraceConfig,
    /// Token ids whose logit-lens trajectory is recorded every forward. Empty:
    /// the final top-[`lens_top_k`](Self::lens_top_k) tokens of each forward.
    pub tracked_tokens: Vec<u32>,
    /// Final top-k tokens tracked when `tracked_tokens` is empty.
    pub lens_top_k: usize,
    /// Layers `0..warmup_layers` are exempt from the vanishing rule.
    pub warmup_layers: usize,
    /// Forwards whose detailed records are kept (at least 1). A forward
    /// over several positions ([`ModelTracer::begin_forward_rows`](crate::ModelTracer::begin_forward_rows))
    /// makes one record per position, and each counts.
    pub max_forwards: usize,
    /// Rows of a forward over several positions whose output logits (and
    /// logit lens) are recorded, which a model asks with
    /// [`ModelTracer::wants_logits`](crate::ModelTracer::wants_logits).
    #[cfg_attr(feature = "serde", serde(default))]
    pub logit_rows: LogitRows,
}

/// Rows of a forward over several positions that get output logits and
/// the logit lens. A forward of one position (decoding) is its own last row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum LogitRows {
    /// The last row of each forward: the last position of a prefill chunk,
    /// every generated position. The other rows of a prefill have no
    /// output logits, so no logit statistics and no lens.
    #[default]
    Last,
    /// Every row: a batched forward then records what one forward per
    /// position records, for an LM head (and a lens) per position.
    Every,
}

impl LogitRows {
    /// Whether row `row` of a forward of `rows` rows is selected.
    pub fn selects(self, row: usize, rows: usize) -> bool {
        match self {
            LogitRows::Last => row + 1 == rows,
            LogitRows::Every => row < rows,
        }
    }
}

impl Default for TraceOptions {
    fn default() -> Self {
        Self {
            attention_config: AttentionTraceConfig::default(),
            tracked_tokens: Vec::new(),
            lens_top_k: DEFAULT_LENS_TOP_K,
            warmup_layers: DEFAULT_WARMUP_LAYERS,
            max_forwards: DEFAULT_HISTORY,
            logit_rows: LogitRows::Last,
        }
    }
}

/// Where a tracer keeps its records. Implemented by [`Recorder`] and by `()`
/// (nothing is ever recorded); other implementations are not expected.
pub trait Storage: Clone + fmt::Debug + Send + Sync + 'static {
    /// Whether this storage keeps records. A config that enables a system
    /// must name a storage that does: [`ModelTracer::with_options`](crate::ModelTracer::with_options) checks
    /// it at compile time.
    const RECORDS: bool;
    /// Builds the storage for a tracer with `options`.
    fn create(options: TraceOptions) -> Self;
    /// The recorder, if this storage records.
    fn recorder(&self) -> Option<&Recorder>;
    /// The recorder, if this storage records.
    fn recorder_mut(&mut self) -> Option<&mut Recorder>;
}

impl Storage for () {
    const RECORDS: bool = false;
    #[inline(always)]
    fn create(_: TraceOptions) -> Self {}
    #[inline(always)]
    fn recorder(&self) -> Option<&Recorder> {
        None
    }
    #[inline(always)]
    fn recorder_mut(&mut self) -> Option<&mut Recorder> {
        None
    }
}

/// Brick visits between two measured ones in the default sampling: prime, so
/// that the measured sites drift through every (brick, layer) of any model
/// whose number of sites per forward is not a multiple of it.
pub const DEFAULT_QUANT_STRIDE: usize = 37;

/// How often the quantization-error hook runs its f32 reference.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum QuantSampling {
    /// Every brick of every layer of every forward (costs a second, f32
    /// matmul for each).
    Every,
    /// One brick kind per forward, rotating with the position through
    /// [`BrickId::ALL`]; every layer of that kind is measured. Amortized cost:
    /// about one f32 matmul per layer per forward.
    RotateBrick,
    /// Every brick, on one forward in `n` (by position).
    EveryNth(usize),
    /// One brick visit in `stride`, counted over the whole session: with
    /// SmolLM2's 151 bricks per forward and the default stride of 37, about
    /// four (brick, layer) sites per forward, drifting so that every site
    /// is measured once every 37 forwards. Its cost per forward is about
    /// `1/stride` of a second, f32 forward pass.
    Strided(usize),
}

impl Default for QuantSampling {
    /// [`QuantSampling::Strided`] with [`DEFAULT_QUANT_STRIDE`].
    fn default() -> Self {
        QuantSampling::Strided(DEFAULT_QUANT_STRIDE)
    }
}

impl QuantSampling {
    /// Whether `brick` is measured at token `position`, `visit` being the
    /// number of brick visits of the session before this one.
    pub fn selects(self, brick: BrickId, position: usize, visit: u64) -> bool {
        match self {
            QuantSampling::Every => true,
            QuantSampling::RotateBrick => {
                // The embedding lookup has no matmul to compare: skip it in the rotation.
                let kinds = &BrickId::ALL[1..];
                kinds[position % kinds.len()] == brick
            }
            QuantSampling::EveryNth(n) => position % n.max(1) == 0,
            QuantSampling::Strided(stride) => visit % stride.max(1) as u64 == 0,
        }
    }
}

/// The records of an enabled tracer: the forward in flight, the last few
/// forwards in detail, and running aggregates over the whole session.
#[derive(Debug, Clone)]
pub struct Recorder {
    pub(crate) options: TraceOptions,
    pub(crate) quant_sampling: QuantSampling,
    pub(crate) in_forward: bool,
    // Boxed, so that bringing another row of a forward into focus moves a
    // pointer, not the record.
    pub(crate) current: Box<ForwardTrace>,
    // The session state of the row in focus: the one-sequence API's
    // outside forwards over several sequences (`lane_in_focus` says whose),
    // boxed so that bringing a row of another sequence into focus moves a
    // pointer. Every lane not in focus is at home: the one-sequence API's
    // in `main_home`, a sequence's in `lanes`, the lane of rows that are
    // not recorded in `void_home`; the home of the lane in focus holds a
    // spare lane.
    pub(crate) lane: Box<Lane>,
    pub(crate) lane_in_focus: LaneSlot,
    pub(crate) main_home: Box<Lane>,
    pub(crate) void_home: Box<Lane>,
    pub(crate) lanes: Vec<SequenceLane>,
    // Forwards over several sequences begun, to find the lane seen
    // longest ago.
    pub(crate) batches: u64,
    // The forward in flight runs the rows of several sequences, placed by
    // `places` (one per row).
    pub(crate) batch: bool,
    pub(crate) places: Vec<RowPlace>,
    // Per-layer `(‖residual‖, Σ‖update‖)` of the forward in flight.
    pub(crate) residual_norms: Vec<Option<(f32, f32)>>,
    pub(crate) topk_scratch: Vec<(usize, f32)>,
    // Records of recycled forwards, kept with their buffers so that a warm
    // tracer fills them again instead of allocating new ones.
    pub(crate) spare_attention: Vec<AttentionWeightTrace>,
    pub(crate) spare_tokens: Vec<TokenLogitEvolution>,
    // The most quantization-error and what-if records one forward has held:
    // a recycled forward reserves room for them up front.
    pub(crate) most_quant: usize,
    pub(crate) most_what_if: usize,
    // The most layers one forward's activation record has held: a new
    // forward's record reserves them at once rather than growing layer by
    // layer.
    pub(crate) most_layers: usize,
    // Logit-lens rows of the forward in flight: `lens_layers.len()` rows of
    // `lens_vocab`, of one row of the forward (`lens_row`): the rows of a
    // forward share them, each row's lens being ranked by its final logits
    // before the next row's is recorded.
    pub(crate) lens: Vec<f32>,
    pub(crate) lens_layers: Vec<usize>,
    pub(crate) lens_vocab: usize,
    pub(crate) tracked: Vec<usize>,
    pub(crate) ranks: Vec<usize>,
    pub(crate) reference: Vec<f32>,
    pub(crate) candidate: Vec<f32>,
    pub(crate) max_layer_seen: Option<usize>,
    // Sign table of the activation fingerprints, grown to the longest
    // tensor fingerprinted.
    pub(crate) fingerprinter: Fingerprinter,
    pub(crate) sink: Option<crate::sink::SinkHandle>,
    // Full tensors of the forwards, when a dump is installed.
    #[cfg(feature = "dump")]
    pub(crate) dump: Option<Box<crate::dump::DumpRecorder>>,
    // A forward over several positions: its first position and rows, the
    // row whose records the fields above hold (`current`, the residual
    // norms, the lens, the last layer seen), and the others, parked (the
    // slot of the row in focus holds spare buffers).
    pub(crate) start: usize,
    pub(crate) rows: usize,
    pub(crate) focus: usize,
    pub(crate) parked: Vec<ParkedRow>,
    pub(crate) lens_row: usize,
}

/// What a tracer keeps across the forwards of one sequence: the
/// quantization sampling's visit count, the retained forwards, the
/// session aggregates and the KV session.
#[derive(Debug, Clone, Default)]
pub(crate) struct Lane {
    pub(crate) quant_visits: u64,
    pub(crate) history: VecDeque<ForwardTrace>,
    pub(crate) aggregates: SessionAggregates,
    pub(crate) kv_session: KvCacheSessionTrace,
}

/// A live sequence's lane, and when it was last seen.
#[derive(Debug, Clone)]
pub(crate) struct SequenceLane {
    pub(crate) id: SequenceId,
    pub(crate) lane: Box<Lane>,
    pub(crate) last_seen: u64,
}

/// Whose lane a row records into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LaneSlot {
    /// The one-sequence API's.
    Main,
    /// The sequence whose lane is `lanes[i]`.
    Sequence(u32),
    /// None: the row is not recorded.
    Void,
}

/// Where a row of a forward over several sequences belongs: its lane,
/// and the rows of its sequence's segment (`first..first + rows`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct RowPlace {
    pub(crate) lane: LaneSlot,
    pub(crate) first: usize,
    pub(crate) rows: usize,
}

/// The per-position state of a row of a forward that is not in focus.
#[derive(Debug, Clone, Default)]
pub(crate) struct ParkedRow {
    pub(crate) trace: Box<ForwardTrace>,
    pub(crate) residual_norms: Vec<Option<(f32, f32)>>,
    pub(crate) max_layer_seen: Option<usize>,
}

impl Storage for Recorder {
    const RECORDS: bool = true;
    fn create(options: TraceOptions) -> Self {
        Recorder::new(options)
    }
    #[inline(always)]
    fn recorder(&self) -> Option<&Recorder> {
        Some(self)
    }
    #[inline(always)]
    fn recorder_mut(&mut self) -> Option<&mut Recorder> {
        Some(self)
    }
}
