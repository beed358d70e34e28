//! The unified tracer: one generic type, two faces (record API and hooks).
//!
//! `ModelTracer<C>` keeps its records in `C::Storage`: a [`Recorder`] for a
//! config that may trace, `()` for [`Disabled`](crate::Disabled), which makes
//! `ModelTracer<Disabled>` zero-sized. Each hook is `#[inline(always)]` and
//! starts with `if C::SYSTEM && self.config.system()`: for the marker configs
//! both are constants, so a disabled hook, its closure and the buffers it
//! would read vanish from the caller's code; the work of an enabled hook
//! happens in an out-of-line method of the recorder.
//!
//! This is the model-facing part of the crate, with the
//! [configs](crate::config) and the [storage of records](crate::storage)
//! beneath it. It imports the records and the outputs it writes into (sinks,
//! summary, dump, events), never the analysis of traces written earlier.

use std::collections::VecDeque;

// Public at the crate root (`model_tracer::config`, `model_tracer::storage`).
#[doc(hidden)]
pub mod config;
#[doc(hidden)]
pub mod storage;

use crate::activation::{ratio_of_norms, LayerActivationTrace, Stage};
use crate::anomaly::Anomaly;
use crate::attention::AttentionWeightTrace;
use crate::config::TraceConfig;
use crate::fingerprint::Fingerprinter;
#[doc(no_inline)]
pub use crate::forward::ForwardTrace;
use crate::kv_cache::{KvCacheSessionTrace, KvCacheStateTrace};
use crate::logit::LogitEvolutionTrace;
use crate::quant::{BrickId, QuantType, QuantizationErrorTrace};
use crate::sequence::SequenceId;
use crate::stats::{self, TensorStats};
use crate::storage::{Lane, LaneSlot, ParkedRow};
#[doc(no_inline)]
pub use crate::storage::{
    LogitRows, QuantSampling, Recorder, Storage, TraceOptions, DEFAULT_QUANT_STRIDE,
    MAX_BUFFER_LEN, MAX_FORWARD_ROWS, MAX_HEADS, MAX_LAYERS, MAX_SEQUENCES,
};

mod batch;
use crate::summary::{SessionAggregates, TraceSummary};
pub use batch::SequenceTrace;

impl Recorder {
    pub(crate) fn new(mut options: TraceOptions) -> Self {
        options.max_forwards = options.max_forwards.max(1);
        Self {
            lane: Box::new(Lane {
                history: VecDeque::with_capacity(options.max_forwards),
                ..Lane::default()
            }),
            lane_in_focus: LaneSlot::Main,
            main_home: Box::default(),
            void_home: Box::default(),
            lanes: Vec::new(),
            batches: 0,
            batch: false,
            places: Vec::new(),
            options,
            quant_sampling: QuantSampling::default(),
            in_forward: false,
            current: Box::default(),
            residual_norms: Vec::new(),
            topk_scratch: Vec::new(),
            spare_attention: Vec::new(),
            spare_tokens: Vec::new(),
            most_quant: 0,
            most_layers: 0,
            most_what_if: 0,
            lens: Vec::new(),
            lens_layers: Vec::new(),
            lens_vocab: 0,
            tracked: Vec::new(),
            ranks: Vec::new(),
            reference: Vec::new(),
            candidate: Vec::new(),
            max_layer_seen: None,
            fingerprinter: Fingerprinter::new(),
            sink: None,
            #[cfg(feature = "dump")]
            dump: None,
            start: 0,
            rows: 1,
            focus: 0,
            parked: Vec::new(),
            lens_row: 0,
        }
    }

    /// Exchanges the state of the row in focus with parked slot `i`.
    fn swap_parked(&mut self, i: usize) {
        let p = &mut self.parked[i];
        std::mem::swap(&mut self.current, &mut p.trace);
        std::mem::swap(&mut self.residual_norms, &mut p.residual_norms);
        std::mem::swap(&mut self.max_layer_seen, &mut p.max_layer_seen);
    }

    /// Brings row `row` of the forward in flight into focus: the
    /// per-position records then go to it. A row beyond the forward's is
    /// ignored (the focus stays).
    #[inline]
    pub(crate) fn focus(&mut self, row: usize) {
        if row == self.focus || row >= self.rows {
            return;
        }
        let from = self.focus;
        self.swap_parked(from);
        self.swap_parked(row);
        self.focus = row;
        if self.batch {
            if let Some(p) = self.places.get(row) {
                self.bring_lane(p.lane);
            }
        }
    }

    /// Exchanges the lane in focus with the one at the home of `slot`.
    fn swap_home(&mut self, slot: LaneSlot) {
        let home = match slot {
            LaneSlot::Main => &mut self.main_home,
            LaneSlot::Void => &mut self.void_home,
            LaneSlot::Sequence(i) => match self.lanes.get_mut(i as usize) {
                Some(l) => &mut l.lane,
                None => return,
            },
        };
        std::mem::swap(&mut self.lane, home);
    }

    /// Brings the lane of `slot` into focus, the one in focus going home.
    #[inline]
    pub(crate) fn bring_lane(&mut self, slot: LaneSlot) {
        if slot == self.lane_in_focus {
            return;
        }
        let from = self.lane_in_focus;
        self.swap_home(from);
        self.swap_home(slot);
        self.lane_in_focus = slot;
    }

    /// The one-sequence API's lane, wherever it is.
    pub(crate) fn main_lane(&self) -> &Lane {
        if self.lane_in_focus == LaneSlot::Main {
            &self.lane
        } else {
            &self.main_home
        }
    }

    /// The lane of sequence `id`, if it is live.
    pub(crate) fn sequence_lane(&self, id: SequenceId) -> Option<&Lane> {
        let i = self.lanes.iter().position(|l| l.id == id)?;
        if self.lane_in_focus == LaneSlot::Sequence(i as u32) {
            Some(&self.lane)
        } else {
            Some(&self.lanes[i].lane)
        }
    }

    fn begin(&mut self, start: usize, rows: usize) {
        if self.in_forward {
            self.end();
        }
        self.in_forward = true;
        self.batch = false;
        // `start + rows` must be a position: the rows stop before usize::MAX.
        let rows = rows
            .clamp(1, MAX_FORWARD_ROWS)
            .min(usize::MAX - start)
            .max(1);
        self.start = start;
        self.rows = rows;
        self.focus = 0;
        if self.parked.len() < rows {
            self.parked.resize_with(rows, ParkedRow::default);
        }
        #[cfg(feature = "dump")]
        if let Some(d) = &mut self.dump {
            d.begin_rows(start, rows);
        }
        for row in 0..rows {
            self.focus(row);
            self.begin_row(start.saturating_add(row), None, rows);
        }
        self.focus(0);
    }

    /// Prepares the row in focus for `position`, recycling the oldest
    /// retained forward when the forward's rows would not fit beside the
    /// retained ones.
    fn begin_row(&mut self, position: usize, sequence: Option<SequenceId>, rows: usize) {
        if self.lane.history.len() + rows > self.options.max_forwards {
            if let Some(mut old) = self.lane.history.pop_front() {
                self.spare_attention.append(&mut old.attention);
                if let Some(l) = &mut old.logits {
                    self.spare_tokens.append(&mut l.tokens);
                }
                *self.current = old;
            }
        }
        self.current
            .reset(position, sequence, self.options.warmup_layers);
        self.current.quantization.traces.reserve(self.most_quant);
        let layers = &mut self.current.activations.layers;
        layers.reserve(self.most_layers.saturating_sub(layers.len()));
        self.current.what_if.reserve(self.most_what_if);
        self.residual_norms.iter_mut().for_each(|r| *r = None);
        self.lens_layers.clear();
        self.lens_row = 0;
        self.max_layer_seen = None;
    }

    /// Runs `f` on each row of the forward in flight with row `i` in focus
    /// and `x`'s row `i` (`x` holds the rows row-major, each a `rows`-th of
    /// it); the focus is restored after.
    #[inline]
    fn each_row(&mut self, x: &[f32], mut f: impl FnMut(&mut Self, usize, &[f32])) {
        if self.rows == 1 {
            return f(self, 0, x);
        }
        let width = x.len() / self.rows;
        let focus = self.focus;
        for i in 0..self.rows {
            self.focus(i);
            f(self, i, &x[i * width..(i + 1) * width]);
        }
        self.focus(focus);
    }

    fn input_tokens(&mut self, tokens: &[u32]) {
        for (row, &token) in tokens.iter().enumerate().take(self.rows) {
            if row == self.focus {
                self.current.token = Some(token);
            } else {
                self.parked[row].trace.token = Some(token);
            }
        }
    }

    fn see_layer(&mut self, layer: usize) {
        self.max_layer_seen = Some(self.max_layer_seen.map_or(layer, |m| m.max(layer)));
    }

    fn activation(&mut self, layer: usize, stage: Stage, x: &[f32], fingerprint: bool) {
        if stage.is_layer_stage() {
            if layer >= MAX_LAYERS {
                return;
            }
            self.see_layer(layer);
        }
        *self.current.activations.stats_mut(layer, stage) = TensorStats::from_slice(x);
        if fingerprint {
            self.fingerprint(layer, stage, x);
        }
        #[cfg(feature = "dump")]
        if let Some(d) = &mut self.dump {
            d.activation_row(self.focus, layer, stage, x);
        }
    }

    #[inline(never)]
    fn activation_rows(&mut self, layer: usize, stage: Stage, x: &[f32], fingerprint: bool) {
        self.each_row(x, |r, _, x| r.activation(layer, stage, x, fingerprint));
    }

    #[inline(never)]
    fn residual_rows(&mut self, layer: usize, residual: &[f32], update: &[f32]) {
        let width = update.len() / self.rows;
        self.each_row(residual, |r, i, x| {
            r.residual(layer, x, &update[i * width..(i + 1) * width]);
        });
    }

    #[inline(never)]
    fn attention_rows(&mut self, layer: usize, head: usize, weights: &[f32], first_len: usize) {
        if self.batch {
            // The rows' own positions, not `start + i`.
            return self.attention_segment(layer, head, 0, self.rows, weights, first_len);
        }
        let stride = weights.len() / self.rows;
        let start = self.start;
        self.each_row(weights, |r, i, row| {
            let n = first_len.saturating_add(i).min(stride);
            r.attention(layer, head, start.saturating_add(i), &row[..n]);
        });
    }

    /// The causal softmax rows of one head for rows `first..first + rows`
    /// of the forward (rows beyond the forward's are ignored), row `j`
    /// attending the first `min(first_len + j, stride)` entries of its
    /// stride, for the query at the row's own position.
    #[inline(never)]
    pub(crate) fn attention_segment(
        &mut self,
        layer: usize,
        head: usize,
        first: usize,
        rows: usize,
        weights: &[f32],
        first_len: usize,
    ) {
        if (layer | head) >= MAX_LAYERS || !self.wants_attention(layer, head) || rows == 0 {
            return;
        }
        let stride = weights.len() / rows;
        let focus = self.focus;
        let end = first.saturating_add(rows).min(self.rows);
        for (j, row) in (first..end).enumerate() {
            let n = first_len.saturating_add(j).min(stride);
            self.focus(row);
            let position = self.current.position;
            self.attention(layer, head, position, &weights[j * stride..j * stride + n]);
        }
        self.focus(focus);
    }

    /// The fingerprint of `x` at `(layer, stage)`; none for an empty `x`,
    /// whose stage counts as not recorded.
    fn fingerprint(&mut self, layer: usize, stage: Stage, x: &[f32]) {
        let f = (!x.is_empty()).then(|| self.fingerprinter.fingerprint(x));
        *self.current.activations.fingerprint_mut(layer, stage) = f;
    }

    fn residual(&mut self, layer: usize, residual: &[f32], update: &[f32]) {
        if layer >= MAX_LAYERS {
            return;
        }
        self.see_layer(layer);
        if self.residual_norms.len() <= layer {
            self.residual_norms.resize(layer + 1, None);
        }
        let u = stats::l2_norm(update);
        let (r, sum) = match self.residual_norms[layer] {
            Some((r, sum)) => (r, sum + u),
            None => (stats::l2_norm(residual), u),
        };
        self.residual_norms[layer] = Some((r, sum));
        self.current.activations.layer_mut(layer).residual_ratio = ratio_of_norms(r, sum);
    }

    /// The residual ratio of `layer` in each row, from the norms of the
    /// statistics recorded at its `Input`, `PostAttn` and `PostFfn` stages.
    #[inline(never)]
    fn residual_from_stages_rows(&mut self, layer: usize) {
        if layer >= MAX_LAYERS {
            return;
        }
        if self.rows == 1 {
            return self.residual_from_stages(layer);
        }
        let focus = self.focus;
        for i in 0..self.rows {
            self.focus(i);
            self.residual_from_stages(layer);
        }
        self.focus(focus);
    }

    fn residual_from_stages(&mut self, layer: usize) {
        self.see_layer(layer);
        let l = self.current.activations.layer_mut(layer);
        let r = norm_of(&l.input_stats);
        let u = norm_of(&l.post_attn_stats) + norm_of(&l.post_ffn_stats);
        l.residual_ratio = ratio_of_norms(r, u);
    }

    fn wants_attention(&self, layer: usize, head: usize) -> bool {
        let c = &self.options.attention_config;
        c.should_trace_layer(layer) && c.should_trace_head(head)
    }

    fn attention(&mut self, layer: usize, head: usize, query_pos: usize, weights: &[f32]) {
        // Both bounds are the same power of two: one compare tests both.
        const { assert!(MAX_HEADS == MAX_LAYERS && MAX_LAYERS.is_power_of_two()) };
        if (layer | head) >= MAX_LAYERS || !self.wants_attention(layer, head) {
            return;
        }
        self.see_layer(layer);
        let c = &self.options.attention_config;
        let mut t = self.spare_attention.pop().unwrap_or_default();
        t.fill(
            layer,
            head,
            query_pos,
            weights,
            c.top_k,
            c.weight_threshold,
            &mut self.topk_scratch,
        );
        self.current.attention.push(t);
    }

    #[inline(never)]
    fn logit_lens(&mut self, layer: usize, vocab: usize, fill: &mut dyn FnMut(&mut [f32])) {
        if layer >= MAX_LAYERS || vocab > MAX_BUFFER_LEN {
            return;
        }
        if self.lens_row != self.focus {
            // The lens rows of another row of the forward, never ranked.
            self.lens_layers.clear();
            self.lens_row = self.focus;
        }
        if self.lens_layers.is_empty() {
            self.lens_vocab = vocab;
        } else if vocab != self.lens_vocab {
            // A lens of another width cannot be ranked against the others.
            return;
        }
        self.see_layer(layer);
        let row = self.lens_layers.len();
        let end = (row + 1) * vocab;
        if self.lens.len() < end {
            self.lens.resize(end, 0.0);
        }
        fill(&mut self.lens[row * vocab..end]);
        self.lens_layers.push(layer);
    }

    #[inline(never)]
    fn logit_lens_layers(
        &mut self,
        layers: &[usize],
        vocab: usize,
        fill: &mut dyn FnMut(&mut [f32]),
    ) {
        if layers.is_empty()
            || layers.len() > MAX_LAYERS
            || layers.iter().any(|&l| l >= MAX_LAYERS)
            || vocab > MAX_BUFFER_LEN
        {
            return;
        }
        // This row's lens replaces whatever the buffer holds.
        self.lens_layers.clear();
        self.lens_row = self.focus;
        self.lens_vocab = vocab;
        let Some(end) = layers.len().checked_mul(vocab) else {
            return;
        };
        if self.lens.len() < end {
            self.lens.resize(end, 0.0);
        }
        fill(&mut self.lens[..end]);
        for &l in layers {
            self.see_layer(l);
        }
        self.lens_layers.extend_from_slice(layers);
    }

    #[inline(never)]
    fn final_logits(&mut self, logits: &[f32], activations: bool, fingerprint: bool, lens: bool) {
        if activations {
            self.current.activations.logits_stats = TensorStats::from_slice(logits);
            if fingerprint {
                self.fingerprint(0, Stage::Logits, logits);
            }
            #[cfg(feature = "dump")]
            if let Some(d) = &mut self.dump {
                d.activation_row(self.focus, 0, Stage::Logits, logits);
            }
        }
        if !lens {
            return;
        }
        self.tracked.clear();
        if self.options.tracked_tokens.is_empty() {
            stats::top_k(logits, self.options.lens_top_k, &mut self.topk_scratch);
            self.tracked
                .extend(self.topk_scratch.iter().map(|&(i, _)| i));
        } else {
            self.tracked
                .extend(self.options.tracked_tokens.iter().map(|&t| t as usize));
        }
        let position = self.current.position;
        let trace = self
            .current
            .logits
            .get_or_insert_with(|| LogitEvolutionTrace::new(position, 1.0, 1.0));
        trace.position = position;
        trace.selected_token = stats::argmax(logits).map(|i| i as u32);
        self.spare_tokens.append(&mut trace.tokens);
        for &t in &self.tracked {
            let mut tok = self.spare_tokens.pop().unwrap_or_default();
            tok.reuse_for(u32::try_from(t).unwrap_or(u32::MAX));
            trace.tokens.push(tok);
        }
        self.ranks.resize(self.tracked.len(), 0);
        if self.lens_row != self.focus {
            // Lens rows of another row of the forward.
            self.lens_layers.clear();
        }
        let rows = self.lens_layers.len().max(1);
        for row in 0..rows {
            let (layer, values) = match self.lens_layers.get(row) {
                Some(&l) => (
                    l,
                    &self.lens[row * self.lens_vocab..(row + 1) * self.lens_vocab],
                ),
                // No lens: the output logits are the only "layer", after the last one seen.
                None => (self.max_layer_seen.map_or(0, |m| m + 1), logits),
            };
            stats::ranks_of(values, &self.tracked, &mut self.ranks);
            for ((tok, &id), &rank) in trace.tokens.iter_mut().zip(&self.tracked).zip(&self.ranks) {
                tok.record_layer(values.get(id).copied().unwrap_or(f32::NAN), rank);
                tok.layers.push(layer);
            }
        }
    }

    fn wants_quant_error(&self, brick: BrickId) -> bool {
        self.quant_sampling
            .selects(brick, self.current.position, self.lane.quant_visits)
    }

    #[inline(never)]
    fn quant_error(
        &mut self,
        brick: BrickId,
        layer: usize,
        quant_type: QuantType,
        quantized: &[f32],
        reference: &mut dyn FnMut(&mut [f32]),
    ) {
        if layer >= MAX_LAYERS {
            return;
        }
        self.reference.clear();
        self.reference.resize(quantized.len(), 0.0);
        reference(&mut self.reference);
        let t =
            QuantizationErrorTrace::compute(brick, layer, quantized, &self.reference, quant_type);
        if brick == BrickId::LmHead {
            self.current
                .quantization
                .compare_logits(quantized, &self.reference);
        }
        self.current.quantization.add(t);
    }

    #[inline(never)]
    fn what_if(
        &mut self,
        brick: BrickId,
        layer: usize,
        quant_type: QuantType,
        len: usize,
        fill: &mut dyn FnMut(&mut [f32], &mut [f32]),
    ) {
        if layer >= MAX_LAYERS || len > MAX_BUFFER_LEN {
            return;
        }
        self.candidate.clear();
        self.candidate.resize(len, 0.0);
        self.reference.clear();
        self.reference.resize(len, 0.0);
        fill(&mut self.candidate, &mut self.reference);
        let t = QuantizationErrorTrace::compute(
            brick,
            layer,
            &self.candidate,
            &self.reference,
            quant_type,
        );
        self.current.what_if.push(t);
    }

    fn kv_state(&mut self, state: KvCacheStateTrace) {
        self.current.kv_cache = Some(state);
        // A forward of several rows folds each row's state when the row
        // ends, in position order, whatever the order of the calls.
        if self.rows == 1 {
            self.lane.kv_session.add_step(state);
        }
    }

    fn end(&mut self) -> Option<Anomaly> {
        if !self.in_forward {
            return None;
        }
        self.in_forward = false;
        #[cfg(feature = "dump")]
        if let Some(d) = &mut self.dump {
            for row in 0..self.rows {
                let token = if row == self.focus {
                    self.current.token
                } else {
                    self.parked[row].trace.token
                };
                if let Some(token) = token {
                    d.input_row_token(row, token);
                }
            }
            d.end_forward();
        }
        let mut primary = None;
        for row in 0..self.rows {
            self.focus(row);
            if self.lane_in_focus == LaneSlot::Void {
                continue;
            }
            let p = self.end_row();
            primary = primary.or(p);
        }
        // The fields hold spare buffers again; the next forward starts at
        // row 0, with the one-sequence API's lane.
        self.bring_lane(LaneSlot::Main);
        self.batch = false;
        self.focus = 0;
        self.rows = 1;
        primary
    }

    /// Ends the row in focus: anomaly rules, aggregates, history, sink.
    fn end_row(&mut self) -> Option<Anomaly> {
        let position = self.current.position;
        let mut anomalies = std::mem::take(&mut self.current.anomalies);
        self.current
            .activations
            .detect_anomalies(position, &mut anomalies);
        self.current.activations.has_anomaly = !anomalies.is_empty();
        self.current.anomalies = anomalies;
        self.lane.aggregates.absorb(&self.current);
        if let (true, Some(state)) = (self.rows > 1, self.current.kv_cache) {
            self.lane.kv_session.add_step(state);
        }
        self.most_quant = self.most_quant.max(self.current.quantization.traces.len());
        self.most_layers = self.most_layers.max(self.current.activations.layers.len());
        self.most_what_if = self.most_what_if.max(self.current.what_if.len());
        let primary = self.current.primary_anomaly().copied();
        let done = std::mem::take(&mut *self.current);
        #[cfg(any(feature = "log", feature = "tracing"))]
        crate::events::anomalies(&done.anomalies);
        self.lane.history.push_back(done);
        if let (Some(sink), Some(done)) = (&self.sink, self.lane.history.back()) {
            sink.write(done);
        }
        // A forward of more rows than `max_forwards` keeps its last ones.
        while self.lane.history.len() > self.options.max_forwards {
            if let Some(mut old) = self.lane.history.pop_front() {
                self.spare_attention.append(&mut old.attention);
                if let Some(l) = &mut old.logits {
                    self.spare_tokens.append(&mut l.tokens);
                }
            }
        }
        primary
    }

    fn clear(&mut self) {
        let options = self.options.clone();
        let sampling = self.quant_sampling;
        let sink = self.sink.take();
        let fingerprinter = std::mem::take(&mut self.fingerprinter);
        #[cfg(feature = "dump")]
        let dump = self.dump.take();
        *self = Recorder::new(options);
        self.quant_sampling = sampling;
        self.sink = sink;
        // The sign table depends on nothing recorded: keep it warm.
        self.fingerprinter = fingerprinter;
        #[cfg(feature = "dump")]
        {
            self.dump = dump.map(|d| Box::new(crate::dump::DumpRecorder::new(d.filter().clone())));
        }
    }
}

/// The L2 norm of a recorded tensor as [`stats::l2_norm`] gives it: NaN
/// when the tensor holds a NaN, `+Inf` when it holds an infinity.
fn norm_of(s: &TensorStats) -> f32 {
    if s.nan_count > 0 {
        f32::NAN
    } else if s.inf_count > 0 {
        f32::INFINITY
    } else {
        s.l2_norm
    }
}

/// The tracer a model owns: `ModelTracer<Disabled>` is zero-sized and inert,
/// `ModelTracer<Lightweight>` and `ModelTracer<Full>` record.
///
/// # A decoder layer with hooks
///
/// ```
/// use model_tracer::{BrickId, Full, ModelTracer, QuantType, Stage, TraceConfig};
///
/// fn layer<C: TraceConfig>(t: &mut ModelTracer<C>, l: usize, pos: usize, x: &mut [f32]) {
///     t.activation(l, Stage::Input, x);
///     let normed: Vec<f32> = x.iter().map(|v| v * 0.5).collect(); // rmsnorm
///     t.activation(l, Stage::PostNorm, &normed);
///     let weights = [0.7, 0.2, 0.1]; // softmax row of head 0
///     t.attention(l, 0, pos, &weights);
///     let attn_out: Vec<f32> = normed.iter().map(|v| v * 0.1).collect();
///     // Runs the f32 reference only when tracing quantization error.
///     t.quant_error(BrickId::AttentionOutput, l, QuantType::Q8_0, &attn_out, |reference| {
///         for (r, v) in reference.iter_mut().zip(&normed) {
///             *r = v * 0.1;
///         }
///     });
///     t.activation(l, Stage::PostAttn, &attn_out);
///     t.residual(l, x, &attn_out);
///     for (a, b) in x.iter_mut().zip(&attn_out) {
///         *a += b;
///     }
///     t.activation(l, Stage::Output, x);
/// }
///
/// let mut tracer = ModelTracer::new(Full);
/// let mut x = vec![1.0f32; 8];
/// tracer.begin_forward(2);
/// layer(&mut tracer, 0, 2, &mut x);
/// assert!(tracer.end_forward().is_none());
/// let last = tracer.last_forward().unwrap();
/// assert_eq!(last.activations.layers[0].input_stats.count, 8);
/// assert_eq!(last.attention[0].top_k_positions[0], 0);
/// ```
#[derive(Debug, Clone)]
pub struct ModelTracer<C: TraceConfig = crate::DefaultTrace> {
    config: C,
    storage: C::Storage,
}

impl<C: TraceConfig + Default> Default for ModelTracer<C> {
    fn default() -> Self {
        Self::new(C::default())
    }
}

impl<C: TraceConfig> ModelTracer<C> {
    /// A tracer for `config`, with the config's [`TraceOptions`].
    pub fn new(config: C) -> Self {
        let options = config.options();
        Self::with_options(config, options)
    }

    /// A tracer for `config` with explicit options (for the marker configs,
    /// whose options are otherwise the defaults).
    pub fn with_options(config: C, options: TraceOptions) -> Self {
        // Evaluated when `ModelTracer<C>` is instantiated: a config that
        // enables a system but stores nothing would record nothing, silently.
        const {
            assert!(
                !C::ANY || <C::Storage as Storage>::RECORDS,
                "a TraceConfig that enables a system must have `type Storage = Recorder`"
            )
        };
        Self {
            storage: C::Storage::create(options),
            config,
        }
    }

    /// Sets how often quantization-error references run (default:
    /// [`QuantSampling::Strided`] every [`DEFAULT_QUANT_STRIDE`] visits).
    pub fn set_quant_sampling(&mut self, sampling: QuantSampling) {
        if let Some(r) = self.storage.recorder_mut() {
            r.quant_sampling = sampling;
        }
    }

    /// Installs `sink` (or removes the sink, with `None`): every following
    /// [`end_forward`](Self::end_forward) hands the completed forward to it.
    /// Returns the sink it replaces. A tracer that never records (such as
    /// `ModelTracer<Disabled>`) keeps no sink and hands `sink` back.
    /// See [`crate::sink`] for why the sink is shared by the tracer's clones.
    pub fn set_sink(
        &mut self,
        sink: Option<crate::sink::SinkHandle>,
    ) -> Option<crate::sink::SinkHandle> {
        let description = crate::config::describe(&self.config);
        match self.storage.recorder_mut() {
            Some(r) => {
                if let Some(s) = &sink {
                    s.announce(&description);
                }
                std::mem::replace(&mut r.sink, sink)
            }
            None => sink,
        }
    }

    /// The installed sink.
    pub fn sink(&self) -> Option<&crate::sink::SinkHandle> {
        self.storage.recorder().and_then(|r| r.sink.as_ref())
    }

    /// The config.
    pub fn config(&self) -> &C {
        &self.config
    }

    /// The options in force (`None` for a tracer that never records).
    pub fn options(&self) -> Option<&TraceOptions> {
        self.storage.recorder().map(|r| &r.options)
    }

    /// Whether any system is on.
    #[inline(always)]
    pub fn is_enabled(&self) -> bool {
        self.activations_on()
            || self.attention_on()
            || self.logits_on()
            || self.quant_on()
            || self.kv_on()
    }

    #[inline(always)]
    fn activations_on(&self) -> bool {
        C::ACTIVATIONS && self.config.activations()
    }
    /// Fingerprints are taken where activation statistics are taken.
    #[inline(always)]
    fn fingerprints_on(&self) -> bool {
        self.activations_on() && C::FINGERPRINTS && self.config.fingerprints()
    }
    #[inline(always)]
    fn attention_on(&self) -> bool {
        C::ATTENTION && self.config.attention()
    }
    #[inline(always)]
    fn logits_on(&self) -> bool {
        C::LOGITS && self.config.logits()
    }
    #[inline(always)]
    fn lens_on(&self) -> bool {
        C::LOGIT_LENS && self.logits_on()
    }
    #[inline(always)]
    fn quant_on(&self) -> bool {
        C::QUANT_ERROR && self.config.quant_error()
    }
    #[inline(always)]
    fn kv_on(&self) -> bool {
        C::KV_CACHE && self.config.kv_cache()
    }

    // ---- hooks -------------------------------------------------------------

    /// Starts the forward pass of the token at `position`: a forward of
    /// one row ([`begin_forward_rows`](Self::begin_forward_rows)`(position, 1)`).
    /// A forward still open is ended first.
    #[inline(always)]
    pub fn begin_forward(&mut self, position: usize) {
        if C::ANY {
            if let Some(r) = self.storage.recorder_mut() {
                r.begin(position, 1);
            }
        }
    }

    /// Starts a forward over the `rows` positions `start..start + rows`
    /// (a prefill chunk; `rows` 0 counts as 1, and at most
    /// [`MAX_FORWARD_ROWS`] rows are recorded, and no more than end
    /// before position `usize::MAX`). A forward still open is ended first.
    ///
    /// It records what `rows` forwards of one position would: one
    /// [`ForwardTrace`] per position, each folded into the session
    /// aggregates, written to the sink and counted by `max_forwards` on its
    /// own. The hooks that take a buffer ([`activation`](Self::activation),
    /// [`residual`](Self::residual)) take the rows of all positions,
    /// row-major; [`attention_rows`](Self::attention_rows) takes a head's
    /// causal softmax rows; the other hooks record into the row brought
    /// into focus by [`focus_row`](Self::focus_row) (row 0 at the start).
    #[inline(always)]
    pub fn begin_forward_rows(&mut self, start: usize, rows: usize) {
        if C::ANY {
            if let Some(r) = self.storage.recorder_mut() {
                r.begin(start, rows);
            }
        }
    }

    /// Sends the records of the per-position hooks (logits, lens,
    /// quantization error, what-if, KV state, token, attention,
    /// `record_*`) to row `row` (position `start + row`) of the forward in
    /// flight. A row beyond the forward's is ignored.
    #[inline(always)]
    pub fn focus_row(&mut self, row: usize) {
        if C::ANY {
            if let Some(r) = self.storage.recorder_mut() {
                r.focus(row);
            }
        }
    }

    /// Names the token fed at the position of the row in focus, so that
    /// sinks and views can show it ([`ForwardTrace::token`]).
    #[inline(always)]
    pub fn input_token(&mut self, token: u32) {
        if C::ANY {
            if let Some(r) = self.storage.recorder_mut() {
                if r.in_forward {
                    r.current.token = Some(token);
                }
            }
        }
    }

    /// Names the tokens fed at the positions of the forward in flight, one
    /// per row (extra ones are ignored).
    #[inline(always)]
    pub fn input_tokens(&mut self, tokens: &[u32]) {
        if C::ANY {
            if let Some(r) = self.storage.recorder_mut() {
                if r.in_forward {
                    r.input_tokens(tokens);
                }
            }
        }
    }

    /// Records the statistics of activation `x` at `(layer, stage)`, and
    /// its fingerprint when fingerprints are traced
    /// ([`TraceConfig::FINGERPRINTS`]), for each row of the forward: `x`
    /// holds the rows row-major, each `x.len() / rows` values (a remainder
    /// is ignored). For [`Stage::Embedding`],
    /// [`Stage::FinalNorm`] and [`Stage::Logits`] the layer is ignored. A
    /// layer stage of a layer at or beyond [`MAX_LAYERS`] is not recorded
    /// (as every hook's record of such a layer).
    #[inline(always)]
    pub fn activation(&mut self, layer: usize, stage: Stage, x: &[f32]) {
        if self.activations_on() {
            let fingerprint = self.fingerprints_on();
            if let Some(r) = self.storage.recorder_mut() {
                r.activation_rows(layer, stage, x, fingerprint);
            }
        }
    }

    /// Records one residual add `residual + update` of `layer`, for each
    /// row of the forward (both row-major, as in
    /// [`activation`](Self::activation)): the layer's
    /// residual ratio is `‖residual‖ / (‖residual‖ + Σ‖update‖)`, with the
    /// residual taken at the layer's first add. Call before adding.
    #[inline(always)]
    pub fn residual(&mut self, layer: usize, residual: &[f32], update: &[f32]) {
        if self.activations_on() {
            if let Some(r) = self.storage.recorder_mut() {
                r.residual_rows(layer, residual, update);
            }
        }
    }

    /// Records the residual ratio of `layer` from the statistics already
    /// recorded at its [`Stage::Input`], [`Stage::PostAttn`] and
    /// [`Stage::PostFfn`] stages, for each row of the forward, without
    /// reading a tensor again: `‖input‖ / (‖input‖ + ‖post_attn‖ +
    /// ‖post_ffn‖)`. In a pre-norm decoder, whose residual adds are
    /// `input + post_attn` and then `+ post_ffn`, this is what
    /// [`residual`](Self::residual) at both adds records, up to the rounding
    /// of the norms (tested within a relative `1e-6`). A norm follows
    /// [`stats::l2_norm`]: NaN when the stage holds a NaN, `+Inf` when it
    /// holds an infinity; a stage not recorded counts as zero. Call after
    /// the `PostFfn` activation, in place of `residual`.
    #[inline(always)]
    pub fn residual_from_stages(&mut self, layer: usize) {
        if self.activations_on() {
            if let Some(r) = self.storage.recorder_mut() {
                r.residual_from_stages_rows(layer);
            }
        }
    }

    /// Whether `(layer, head)` is summarized: lets model code skip
    /// preparing weights that would not be recorded.
    #[inline(always)]
    pub fn wants_attention(&self, layer: usize, head: usize) -> bool {
        self.attention_on()
            && self
                .storage
                .recorder()
                .is_some_and(|r| r.wants_attention(layer, head))
    }

    /// Records one head's softmax row for the query at `query_pos` into
    /// the row in focus, if the attention config selects `(layer, head)`
    /// and the head is below [`MAX_HEADS`].
    #[inline(always)]
    pub fn attention(&mut self, layer: usize, head: usize, query_pos: usize, weights: &[f32]) {
        if self.attention_on() {
            if let Some(r) = self.storage.recorder_mut() {
                r.attention(layer, head, query_pos, weights);
            }
        }
    }

    /// Records one head's causal softmax rows, one per row of the forward,
    /// as [`attention`](Self::attention) of each: `weights` holds the rows
    /// with a stride of `weights.len() / rows` values, and row `i` (the
    /// query at position `start + i`) attends its first
    /// `min(first_len + i, stride)` entries (`first_len` is what the first
    /// row attends: the cached positions and itself). With a cache that
    /// never evicts, row `i` attends `start + i + 1` positions, the
    /// stride is `start + rows` and `first_len` is `start + 1`; with one
    /// that evicts, the stride is the capacity once reached.
    #[inline(always)]
    pub fn attention_rows(&mut self, layer: usize, head: usize, weights: &[f32], first_len: usize) {
        if self.attention_on() {
            if let Some(r) = self.storage.recorder_mut() {
                r.attention_rows(layer, head, weights, first_len);
            }
        }
    }

    /// Whether the model should compute the output logits of row `row` of
    /// the forward in flight for the tracer (the activation statistics of
    /// the logits, the ranks of the lens): the rows that
    /// [`TraceOptions::logit_rows`] selects, when activations or logits are
    /// traced. Every forward of one row wants its logits.
    #[inline(always)]
    pub fn wants_logits(&self, row: usize) -> bool {
        (self.activations_on() || self.logits_on())
            && self.storage.recorder().is_some_and(|r| r.wants_logits(row))
    }

    /// Whether the logit lens runs: when false, model code should not even
    /// prepare the lens input.
    #[inline(always)]
    pub fn wants_logit_lens(&self) -> bool {
        self.lens_on()
    }

    /// Records the logit lens at `layer` for the row in focus: `fill` writes
    /// the `vocab` logits that the final norm and LM head give for this
    /// layer's hidden state. In a forward of several rows, record a row's
    /// lens, then its [`final_logits`](Self::final_logits), before another
    /// row's lens (the rows share one lens buffer).
    /// `fill` runs only when the lens is on ([`TraceConfig::LOGIT_LENS`]),
    /// and not for a `vocab` above [`MAX_BUFFER_LEN`] (nothing is recorded)
    /// or other than the first lens row's of this forward (the row could
    /// not be ranked against the others).
    #[inline(always)]
    pub fn logit_lens(&mut self, layer: usize, vocab: usize, mut fill: impl FnMut(&mut [f32])) {
        if self.lens_on() {
            if let Some(r) = self.storage.recorder_mut() {
                r.logit_lens(layer, vocab, &mut fill);
            }
        }
    }

    /// Records the logit lens of every layer of `layers` at once, for the
    /// row in focus: `fill` writes `layers.len()` rows of `vocab` logits,
    /// row-major, row `j` being what the final norm and LM head give for
    /// the hidden state after layer `layers[j]`; a model computes them as
    /// one multi-row product that reads the LM head once. The records are
    /// those of [`logit_lens`](Self::logit_lens) called for each layer in
    /// turn with the same rows (and replace any lens rows recorded before
    /// for this row). Nothing is recorded, and `fill` does not run, when
    /// the lens is off, `layers` is empty, longer than [`MAX_LAYERS`] or
    /// names a layer at or beyond [`MAX_LAYERS`], or `vocab` is above
    /// [`MAX_BUFFER_LEN`].
    #[inline(always)]
    pub fn logit_lens_layers(
        &mut self,
        layers: &[usize],
        vocab: usize,
        mut fill: impl FnMut(&mut [f32]),
    ) {
        if self.lens_on() {
            if let Some(r) = self.storage.recorder_mut() {
                r.logit_lens_layers(layers, vocab, &mut fill);
            }
        }
    }

    /// Records the output logits: their statistics and fingerprint
    /// (activations) and the ranks of the tracked tokens at every lens
    /// layer (logits). The tracked tokens are the configured ones, or else
    /// the top-k of these logits.
    #[inline(always)]
    pub fn final_logits(&mut self, logits: &[f32]) {
        let (a, l) = (self.activations_on(), self.logits_on());
        if a || l {
            let f = self.fingerprints_on();
            if let Some(r) = self.storage.recorder_mut() {
                r.final_logits(logits, a, f, l);
            }
        }
    }

    /// Sets the token chosen at this position (defaults to the argmax of the
    /// final logits).
    #[inline(always)]
    pub fn selected_token(&mut self, token: u32) {
        if self.logits_on() {
            if let Some(l) = self
                .storage
                .recorder_mut()
                .and_then(|r| r.current.logits.as_mut())
            {
                l.selected_token = Some(token);
            }
        }
    }

    /// Whether the next [`quant_error`](Self::quant_error) call for `brick`
    /// will measure (tracing on and selected by the sampling policy).
    #[inline(always)]
    pub fn wants_quant_error(&self, brick: BrickId) -> bool {
        self.quant_on()
            && self
                .storage
                .recorder()
                .is_some_and(|r| r.wants_quant_error(brick))
    }

    /// Compares a brick's quantized output with its f32 reference, which
    /// `reference` writes into the buffer it is given (same length as
    /// `quantized`). `reference` runs only when [`wants_quant_error`](Self::wants_quant_error).
    /// For [`BrickId::LmHead`] the output distributions are compared too
    /// (KL divergence, top-1 agreement).
    #[inline(always)]
    pub fn quant_error(
        &mut self,
        brick: BrickId,
        layer: usize,
        quant_type: QuantType,
        quantized: &[f32],
        mut reference: impl FnMut(&mut [f32]),
    ) {
        if self.quant_on() {
            if let Some(r) = self.storage.recorder_mut() {
                let measure = r.wants_quant_error(brick);
                r.lane.quant_visits += 1;
                if measure {
                    r.quant_error(brick, layer, quant_type, quantized, &mut reference);
                }
            }
        }
    }

    /// Whether what-if comparisons are recorded (quantization-error tracing on).
    #[inline(always)]
    pub fn wants_what_if(&self) -> bool {
        self.quant_on()
    }

    /// Records a what-if comparison: `fill(candidate, reference)` writes
    /// `len` outputs of `brick` computed with its weights re-quantized to
    /// `quant_type` (candidate) and with the model's own weights
    /// (reference). Runs only when quantization-error tracing is on; unlike
    /// [`quant_error`](Self::quant_error) it is not sampled: what-if mode is
    /// an analysis the caller switches on. A `len` above [`MAX_BUFFER_LEN`]
    /// records nothing.
    #[inline(always)]
    pub fn what_if(
        &mut self,
        brick: BrickId,
        layer: usize,
        quant_type: QuantType,
        len: usize,
        mut fill: impl FnMut(&mut [f32], &mut [f32]),
    ) {
        if self.quant_on() {
            if let Some(r) = self.storage.recorder_mut() {
                r.what_if(brick, layer, quant_type, len, &mut fill);
            }
        }
    }

    /// Records the KV cache state that `state` builds; `state` runs only
    /// when KV tracing is on.
    #[inline(always)]
    pub fn kv_state(&mut self, state: impl FnOnce() -> KvCacheStateTrace) {
        if self.kv_on() {
            if let Some(r) = self.storage.recorder_mut() {
                r.kv_state(state());
            }
        }
    }

    /// Ends the forward pass: applies the anomaly rules, folds the forward
    /// into the session aggregates, and returns the anomaly that matters
    /// most (the first non-finite value, else the first broken rule).
    /// The completed forward then goes to the sink, if one is installed
    /// ([`set_sink`](Self::set_sink)), and with the `log` or `tracing`
    /// feature each anomaly is emitted as a warning event.
    #[inline(always)]
    pub fn end_forward(&mut self) -> Option<Anomaly> {
        if C::ANY {
            if let Some(r) = self.storage.recorder_mut() {
                return r.end();
            }
        }
        None
    }

    // ---- record API --------------------------------------------------------

    /// Records a layer's activation trace built by hand (replaces the
    /// layer's entry in the forward in flight).
    pub fn record_layer_activation(&mut self, trace: LayerActivationTrace) {
        if self.activations_on() && trace.layer_idx < MAX_LAYERS {
            if let Some(r) = self.storage.recorder_mut() {
                let layer = trace.layer_idx;
                r.see_layer(layer);
                *r.current.activations.layer_mut(layer) = trace;
            }
        }
    }

    /// Records an attention summary built by hand.
    pub fn record_attention(&mut self, trace: AttentionWeightTrace) {
        if self.attention_on() && trace.layer_idx < MAX_LAYERS && trace.head_idx < MAX_HEADS {
            if let Some(r) = self.storage.recorder_mut() {
                r.current.attention.push(trace);
            }
        }
    }

    /// Records the logit trajectories of the forward in flight (without
    /// the tokens whose entries name a layer beyond [`MAX_LAYERS`]).
    pub fn record_logits(&mut self, mut trace: LogitEvolutionTrace) {
        if self.logits_on() {
            if let Some(r) = self.storage.recorder_mut() {
                trace.tokens.retain(crate::forward::lens_in_range);
                r.current.logits = Some(trace);
            }
        }
    }

    /// Records a quantization-error trace built by hand.
    pub fn record_quant_error(&mut self, trace: QuantizationErrorTrace) {
        if self.quant_on() && trace.layer_idx < MAX_LAYERS {
            if let Some(r) = self.storage.recorder_mut() {
                r.current.quantization.add(trace);
            }
        }
    }

    /// Records a KV cache state built by hand.
    pub fn record_kv_state(&mut self, trace: KvCacheStateTrace) {
        if self.kv_on() {
            if let Some(r) = self.storage.recorder_mut() {
                r.kv_state(trace);
            }
        }
    }

    /// Takes a forward completed elsewhere (read back from a JSON Lines
    /// trace, received from another process) as if this tracer had just
    /// ended it: retained, folded into the session aggregates, its KV state
    /// added to the KV session, and handed to the sink. Its anomalies are
    /// kept as recorded (the rules ran when it was traced). A forward in
    /// flight is ended first. Systems this tracer's config does not trace
    /// are dropped from the forward, as they would not have been recorded,
    /// and so are the fingerprints when it does not trace them, and the
    /// records the hooks would not have recorded: of a layer at or beyond
    /// [`MAX_LAYERS`], of a head at or beyond [`MAX_HEADS`].
    pub fn replay_forward(&mut self, mut forward: ForwardTrace) {
        if !C::ANY {
            return;
        }
        let fingerprints = self.fingerprints_on();
        let (activations, attention, logits, quant, kv) = (
            self.activations_on(),
            self.attention_on(),
            self.logits_on(),
            self.quant_on(),
            self.kv_on(),
        );
        let Some(r) = self.storage.recorder_mut() else {
            return;
        };
        if r.in_forward {
            r.end();
        }
        if !activations {
            forward.activations = Default::default();
            forward.anomalies.clear();
        }
        if !fingerprints {
            forward.activations.clear_fingerprints();
        }
        if !attention {
            forward.attention.clear();
        }
        if !logits {
            forward.logits = None;
        }
        if !quant {
            forward.quantization = Default::default();
            forward.what_if.clear();
        }
        if !kv {
            forward.kv_cache = None;
        }
        forward.drop_out_of_range();
        if let Some(state) = forward.kv_cache {
            r.lane.kv_session.add_step(state);
        }
        r.lane.aggregates.absorb(&forward);
        if r.lane.history.len() >= r.options.max_forwards {
            r.lane.history.pop_front();
        }
        r.lane.history.push_back(forward);
        if let (Some(sink), Some(done)) = (&r.sink, r.lane.history.back()) {
            sink.write(done);
        }
    }

    // ---- results -----------------------------------------------------------

    /// The most recent completed forward.
    pub fn last_forward(&self) -> Option<&ForwardTrace> {
        self.storage
            .recorder()
            .and_then(|r| r.main_lane().history.back())
    }

    /// The retained completed forwards, oldest first.
    pub fn forwards(&self) -> impl Iterator<Item = &ForwardTrace> + '_ {
        self.storage
            .recorder()
            .into_iter()
            .flat_map(|r| r.main_lane().history.iter())
    }

    /// The KV cache session (`None` when KV tracing is off).
    pub fn kv_session(&self) -> Option<&KvCacheSessionTrace> {
        if self.kv_on() {
            self.storage.recorder().map(|r| &r.main_lane().kv_session)
        } else {
            None
        }
    }

    /// Session aggregates over every completed forward, including those no
    /// longer retained.
    pub fn aggregates(&self) -> Option<&SessionAggregates> {
        self.storage.recorder().map(|r| &r.main_lane().aggregates)
    }

    /// A summary of the whole session, from the aggregates.
    pub fn summary(&self) -> TraceSummary {
        TraceSummary::build(
            crate::config::describe(&self.config),
            self.storage
                .recorder()
                .map(|r| (&r.main_lane().aggregates, &r.main_lane().kv_session)),
            self.kv_on(),
        )
    }

    /// Forgets every record and aggregate; the config, options and sink
    /// stay, and so does an installed dump, emptied.
    pub fn clear(&mut self) {
        if let Some(r) = self.storage.recorder_mut() {
            r.clear();
        }
    }
}

/// Activation dumps: full tensors, copied in the activation hooks.
#[cfg(feature = "dump")]
impl<C: TraceConfig> ModelTracer<C> {
    /// Installs `dump` (or removes the dump, with `None`): every following
    /// forward whose position its filter selects copies the tensors the
    /// filter selects, in the hooks [`activation`](Self::activation) (every
    /// stage) and [`final_logits`](Self::final_logits) (`logits`), with
    /// the token named by [`input_token`](Self::input_token).
    ///
    /// The copies are made where the activation statistics are computed, so
    /// a dump needs activation tracing: a tracer that does not trace
    /// activations (such as `ModelTracer<Disabled>`) installs nothing and
    /// hands `dump` back. Otherwise returns the dump it replaces. Without a
    /// dump the hooks pay one predictable branch each, in their
    /// out-of-line part; a `Disabled` tracer has no hooks to pay in.
    pub fn set_dump(
        &mut self,
        dump: Option<crate::dump::DumpRecorder>,
    ) -> Option<crate::dump::DumpRecorder> {
        if !self.activations_on() {
            return dump;
        }
        match self.storage.recorder_mut() {
            Some(r) => std::mem::replace(&mut r.dump, dump.map(Box::new)).map(|d| *d),
            None => dump,
        }
    }

    /// The installed dump recorder.
    pub fn dump(&self) -> Option<&crate::dump::DumpRecorder> {
        self.storage.recorder().and_then(|r| r.dump.as_deref())
    }

    /// Removes the installed dump and returns what it holds: the forwards
    /// that ended since it was installed (a forward in flight is left out).
    pub fn take_dump(&mut self) -> Option<crate::dump::ActivationDump> {
        let r = self.storage.recorder_mut()?;
        r.dump.take().map(|d| d.finish())
    }
}

// The report reads the records and the summary only; the tracer gathers
// them for it.
#[cfg(feature = "serde")]
impl<'a> crate::report::ReportInput<'a> {
    /// The input for `tracer`'s retained forwards, summary and KV steps;
    /// fill [`position_text`](Self::position_text) and
    /// [`token_text`](Self::token_text) to show token strings.
    pub fn from_tracer<C: TraceConfig>(
        tracer: &'a ModelTracer<C>,
        model: crate::model_info::ModelInfo,
    ) -> Self {
        let summary = tracer.summary();
        Self {
            title: format!("model-tracer report: {}", model.name),
            config: summary.config.clone(),
            model,
            summary,
            forwards: tracer.forwards().collect(),
            kv_steps: tracer
                .kv_session()
                .map(|s| s.steps.iter().copied().collect())
                .unwrap_or_default(),
            position_text: std::collections::BTreeMap::new(),
            token_text: std::collections::BTreeMap::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Disabled, Full, Lightweight, ModelTracerConfig};
    use crate::fingerprint::fingerprint;
    use crate::AnomalyKind;

    static_assertions::assert_eq_size!(ModelTracer<Disabled>, ());
    static_assertions::assert_impl_all!(ModelTracer<Disabled>: Send, Sync, Clone);
    static_assertions::assert_impl_all!(ModelTracer<Lightweight>: Send, Sync, Clone);
    static_assertions::assert_impl_all!(ModelTracer<Full>: Send, Sync, Clone);
    static_assertions::assert_impl_all!(ModelTracer<ModelTracerConfig>: Send, Sync, Clone);

    fn run_layer<C: TraceConfig>(t: &mut ModelTracer<C>, layer: usize, x: &[f32]) {
        for s in Stage::LAYER_STAGES {
            t.activation(layer, s, x);
        }
    }

    #[test]
    fn test_f251_nan_detection_through_the_tracer() {
        let mut t = ModelTracer::new(Lightweight);
        let clean: Vec<f32> = (0..64).map(|i| (i as f32 * 0.3).cos()).collect();
        for bad_layer in 0..8 {
            for (stage_idx, bad_stage) in Stage::LAYER_STAGES.iter().enumerate() {
                t.begin_forward(bad_layer * 10 + stage_idx);
                t.activation(0, Stage::Embedding, &clean);
                for layer in 0..8 {
                    for s in Stage::LAYER_STAGES {
                        let past = layer > bad_layer || (layer == bad_layer && s >= *bad_stage);
                        let mut x = clean.clone();
                        if past {
                            x[layer] = f32::NAN;
                        }
                        t.activation(layer, s, &x);
                    }
                }
                let a = t.end_forward().expect("a NaN must be reported");
                assert_eq!(a.kind, AnomalyKind::NaN);
                assert_eq!(a.layer, Some(bad_layer));
                assert_eq!(a.stage, *bad_stage);
                assert_eq!(a.origin, crate::Origin::Produced);
            }
        }
        let s = t.summary();
        assert_eq!(s.anomaly_counts[AnomalyKind::NaN as usize], 48);
    }

    #[test]
    fn test_f252_explosion_detection_through_the_tracer() {
        let mut t = ModelTracer::new(ModelTracerConfig::lightweight());
        t.begin_forward(0);
        run_layer(&mut t, 0, &[1.0, 2.0, 3.0]);
        run_layer(&mut t, 1, &[1.0, 2e7, 3.0]);
        let a = t.end_forward().unwrap();
        assert_eq!(
            (a.kind, a.layer, a.stage),
            (AnomalyKind::Explosion, Some(1), Stage::Input)
        );
    }

    #[test]
    fn disabled_tracer_never_runs_closures() {
        let mut t = ModelTracer::new(Disabled);
        let mut ran = false;
        t.begin_forward(0);
        t.logit_lens(0, 4, |_| ran = true);
        t.quant_error(BrickId::FfnUp, 0, QuantType::Q4_0, &[1.0], |_| ran = true);
        t.kv_state(|| {
            ran = true;
            KvCacheStateTrace::new(0, 1)
        });
        assert!(t.end_forward().is_none());
        assert!(!ran);
        assert!(!t.is_enabled());
        assert!(t.last_forward().is_none());
        let mut rt = ModelTracer::new(ModelTracerConfig::default());
        rt.begin_forward(0);
        rt.logit_lens(0, 4, |_| ran = true);
        rt.kv_state(|| {
            ran = true;
            KvCacheStateTrace::new(0, 1)
        });
        rt.end_forward();
        assert!(
            !ran,
            "a runtime config with everything off runs nothing either"
        );
    }

    #[test]
    fn lightweight_skips_the_expensive_systems() {
        let mut t = ModelTracer::new(Lightweight);
        let mut lens_ran = false;
        t.begin_forward(3);
        t.attention(0, 0, 3, &[0.5, 0.5]);
        t.logit_lens(0, 2, |_| lens_ran = true);
        t.final_logits(&[1.0, 2.0]);
        t.kv_state(|| KvCacheStateTrace::new(3, 8));
        t.end_forward();
        let f = t.last_forward().unwrap();
        assert!(!lens_ran && f.attention.is_empty() && f.logits.is_none());
        assert_eq!(f.activations.logits_stats.count, 2);
        assert_eq!(f.kv_cache.unwrap().step, 3);
    }

    #[test]
    fn logit_lens_ranks_tracked_tokens_at_every_layer() {
        let mut t = ModelTracer::new(Full);
        t.begin_forward(0);
        let rows = [[3.0, 1.0, 2.0], [1.0, 3.0, 2.0], [0.0, 5.0, 1.0]];
        for (l, row) in rows.iter().enumerate() {
            t.logit_lens(l, 3, |out| out.copy_from_slice(row));
        }
        t.final_logits(&rows[2]);
        t.end_forward();
        let lt = t.last_forward().unwrap().logits.as_ref().unwrap();
        assert_eq!(lt.selected_token, Some(1));
        let top = lt.token(1).unwrap();
        assert_eq!(top.ranks, vec![2, 0, 0]);
        assert_eq!(top.layers, vec![0, 1, 2]);
        assert_eq!(top.won_at_layer(), Some(1));
        assert_eq!(top.decisive_layer(), Some(1));
        assert_eq!(top.decisive_layer_log_rank(), Some(1));
        assert_eq!(lt.tokens.len(), 3, "default tracks the final top-3");
    }

    /// Logit ranks on the final logits, without the per-layer lens.
    #[derive(Debug, Clone, Copy, Default)]
    struct FinalRanks;

    impl TraceConfig for FinalRanks {
        const ACTIVATIONS: bool = true;
        const ATTENTION: bool = false;
        const LOGITS: bool = true;
        const QUANT_ERROR: bool = false;
        const KV_CACHE: bool = false;
        const LOGIT_LENS: bool = false;
        type Storage = Recorder;
    }

    #[test]
    fn final_ranks_without_the_lens() {
        const { assert!(Full::LOGIT_LENS && !Lightweight::LOGIT_LENS && !FinalRanks::LOGIT_LENS) };
        let mut t = ModelTracer::new(FinalRanks);
        assert!(!t.wants_logit_lens());
        let mut lens_ran = false;
        t.begin_forward(4);
        t.activation(0, Stage::Input, &[1.0, 2.0]);
        t.activation(1, Stage::Output, &[1.0, 2.0]);
        t.logit_lens(0, 3, |_| lens_ran = true);
        t.final_logits(&[0.5, 3.0, 2.0]);
        t.end_forward();
        assert!(!lens_ran, "the lens closure ran with LOGIT_LENS off");
        let lt = t.last_forward().unwrap().logits.as_ref().unwrap();
        assert_eq!(lt.selected_token, Some(1));
        // The final logits are the only row, placed after the last layer seen.
        let second = lt.token(2).unwrap();
        assert_eq!(second.ranks, vec![1]);
        assert_eq!(second.layers, vec![2]);
        assert_eq!(lt.tokens.len(), 3);
        // Logit tracing with the lens on is unchanged for the runtime config.
        let rt = ModelTracer::new(ModelTracerConfig::full());
        assert!(rt.wants_logit_lens());
        let off = ModelTracer::new(ModelTracerConfig {
            trace_logits: false,
            ..ModelTracerConfig::full()
        });
        assert!(!off.wants_logit_lens());
    }

    #[test]
    fn quant_sampling_rotates_bricks() {
        let mut t = ModelTracer::new(Full);
        t.set_quant_sampling(QuantSampling::RotateBrick);
        let mut measured = Vec::new();
        for pos in 0..6 {
            t.begin_forward(pos);
            for b in BrickId::ALL {
                if t.wants_quant_error(b) {
                    measured.push((pos, b));
                }
                t.quant_error(b, 0, QuantType::Q8_0, &[1.0, 2.0], |r| {
                    r.copy_from_slice(&[1.0, 2.0])
                });
            }
            t.end_forward();
            assert_eq!(t.last_forward().unwrap().quantization.traces.len(), 1);
        }
        assert_eq!(measured.len(), 6);
        assert!(measured.iter().all(|(_, b)| *b != BrickId::Embedding));
        t.set_quant_sampling(QuantSampling::Every);
        t.begin_forward(9);
        t.quant_error(BrickId::LmHead, 0, QuantType::Q8_0, &[1.0, 3.0], |r| {
            r.copy_from_slice(&[1.0, 2.0])
        });
        t.end_forward();
        let q = &t.last_forward().unwrap().quantization;
        assert_eq!(q.top1_agrees, Some(true));
        assert!(q.kl_divergence.unwrap() > 0.0);
    }

    #[test]
    fn default_strided_sampling_covers_every_site_once_per_stride_forwards() {
        let mut t = ModelTracer::new(Full);
        let layer_bricks = &BrickId::ALL[1..6];
        let recorded = |t: &ModelTracer<Full>| {
            t.storage
                .recorder()
                .map_or(0, |r| r.current.quantization.traces.len())
        };
        let mut seen = std::collections::BTreeMap::new();
        let stride = DEFAULT_QUANT_STRIDE;
        for pos in 0..stride {
            t.begin_forward(pos);
            for layer in 0..30 {
                for &b in layer_bricks {
                    let wanted = t.wants_quant_error(b);
                    let before = recorded(&t);
                    t.quant_error(b, layer, QuantType::Q4_1, &[1.0, 2.0], |r| {
                        r.copy_from_slice(&[1.0, 2.0])
                    });
                    let after = recorded(&t);
                    assert_eq!(
                        wanted,
                        after > before,
                        "wants_quant_error predicts the hook"
                    );
                }
            }
            t.quant_error(BrickId::LmHead, 0, QuantType::Q8_0, &[1.0], |r| r[0] = 1.0);
            t.end_forward();
            let f = t.last_forward().unwrap();
            assert!(
                (4..=5).contains(&f.quantization.traces.len()),
                "{}",
                f.quantization.traces.len()
            );
            for q in &f.quantization.traces {
                *seen.entry((q.brick, q.layer_idx)).or_insert(0) += 1;
            }
        }
        assert_eq!(
            seen.len(),
            151,
            "every (brick, layer) site of a 30-layer model"
        );
        assert!(seen.values().all(|&n| n == 1));
    }

    #[test]
    fn history_is_bounded_and_summary_survives_it() {
        let options = TraceOptions {
            max_forwards: 4,
            ..TraceOptions::default()
        };
        let mut t = ModelTracer::with_options(Lightweight, options);
        for pos in 0..100 {
            t.begin_forward(pos);
            run_layer(&mut t, 0, &[pos as f32, 1.0]);
            t.end_forward();
        }
        assert_eq!(t.forwards().count(), 4);
        assert_eq!(t.forwards().next().unwrap().position, 96);
        let s = t.summary();
        assert_eq!(s.forwards, 100);
        assert_eq!(s.layers[0].input.count, 200);
        t.clear();
        assert_eq!(t.summary().forwards, 0);
        assert_eq!(t.forwards().count(), 0);
    }

    /// A toy forward pass: the hooks sit where a decoder would call them.
    fn toy_forward<C: TraceConfig>(t: &mut ModelTracer<C>, pos: usize, x: &mut [f32]) -> Vec<f32> {
        t.begin_forward(pos);
        t.activation(0, Stage::Embedding, x);
        for layer in 0..3 {
            t.activation(layer, Stage::Input, x);
            let update: Vec<f32> = x.iter().map(|v| (v * 0.7 + layer as f32).tanh()).collect();
            let weights = [0.6, 0.3, 0.1];
            t.attention(layer, 0, pos, &weights);
            t.quant_error(BrickId::FfnDown, layer, QuantType::Q4_0, &update, |r| {
                r.copy_from_slice(&update)
            });
            t.residual(layer, x, &update);
            for (a, b) in x.iter_mut().zip(&update) {
                *a += b;
            }
            t.activation(layer, Stage::Output, x);
            t.logit_lens(layer, x.len(), |out| out.copy_from_slice(x));
        }
        t.final_logits(x);
        t.kv_state(|| KvCacheStateTrace::new(pos, 16));
        t.end_forward();
        x.to_vec()
    }

    #[test]
    fn test_f263_overhead_bounds() {
        // Disabled: no storage, no work, no allocation.
        assert_eq!(std::mem::size_of::<ModelTracer<Disabled>>(), 0);
        let mut off = ModelTracer::new(Disabled);
        let mut x = vec![0.25f32; 32];
        let (_, allocs) = model_tracer_test_support::count_allocations(|| {
            off.begin_forward(0);
            off.activation(0, Stage::Input, &x);
            off.attention(0, 0, 0, &x);
            off.end_forward();
        });
        assert_eq!(allocs, 0);
        // Lightweight: after warm-up a traced forward allocates nothing.
        let options = TraceOptions {
            max_forwards: 4,
            ..TraceOptions::default()
        };
        let mut light = ModelTracer::with_options(Lightweight, options);
        for pos in 0..8 {
            toy_forward(&mut light, pos, &mut x);
        }
        let (_, allocs) = model_tracer_test_support::count_allocations(|| {
            for pos in 8..40 {
                x.iter_mut().for_each(|v| *v = (*v * 0.5).sin());
                // The toy forward itself allocates its update vectors: count them apart.
                toy_forward(&mut light, pos, &mut x);
            }
        });
        let toy_own = 32 * (3 + 1);
        assert_eq!(allocs, toy_own, "the tracer allocated in steady state");
    }

    #[test]
    fn test_f272_bit_exactness_tracing_never_changes_results() {
        let input: Vec<f32> = (0..48)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.3)
            .collect();
        let mut off = ModelTracer::new(Disabled);
        let mut full = ModelTracer::new(Full);
        full.set_quant_sampling(QuantSampling::Every);
        let (mut a, mut b) = (input.clone(), input.clone());
        for pos in 0..5 {
            let ya = toy_forward(&mut off, pos, &mut a);
            let yb = toy_forward(&mut full, pos, &mut b);
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&ya), bits(&yb));
        }
        assert_eq!(full.summary().forwards, 5);
        let bits = |s: &TensorStats| {
            (
                [s.min, s.max, s.mean, s.std, s.l2_norm].map(f32::to_bits),
                [s.count, s.nan_count, s.inf_count],
            )
        };
        // What the tracer recorded is what an independent pass over the
        // same buffer gives, to the bit: the embedding of the first forward
        // saw `input`, the last layer's output of the last forward `b`.
        let first = full.forwards().next().unwrap();
        assert_eq!(
            bits(&first.activations.embedding_stats),
            bits(&TensorStats::from_slice(&input))
        );
        let last = full.last_forward().unwrap();
        assert_eq!(
            bits(last.activations.stats(2, Stage::Output).unwrap()),
            bits(&TensorStats::from_slice(&b))
        );
        // The same values at another alignment give the same statistics:
        // a SIMD pass that peeled a prologue up to an aligned address would
        // sum in another order here.
        let mut padded = vec![0.0f32; input.len() + 8];
        for offset in 1..8 {
            for len in [1, 7, 9, 31, input.len()] {
                padded[offset..offset + len].copy_from_slice(&input[..len]);
                let moved = &padded[offset..offset + len];
                assert_ne!(moved.as_ptr(), input.as_ptr());
                assert_eq!(
                    bits(&TensorStats::from_slice(moved)),
                    bits(&TensorStats::from_slice(&input[..len])),
                    "offset {offset}, {len} values"
                );
            }
        }
    }

    /// Activations and their fingerprints, nothing else.
    #[derive(Debug, Clone, Copy, Default)]
    struct Fingerprints;

    impl TraceConfig for Fingerprints {
        const ACTIVATIONS: bool = true;
        const ATTENTION: bool = false;
        const LOGITS: bool = false;
        const QUANT_ERROR: bool = false;
        const KV_CACHE: bool = false;
        const FINGERPRINTS: bool = true;
        type Storage = Recorder;
    }

    /// Stages recorded with a fingerprint, in forward order.
    fn fingerprinted(f: &ForwardTrace) -> Vec<(Option<usize>, Stage)> {
        f.activations
            .recorded()
            .filter(|&(l, s, _)| f.activations.fingerprint(l.unwrap_or(0), s).is_some())
            .map(|(l, s, _)| (l, s))
            .collect()
    }

    #[test]
    fn fingerprints_are_taken_where_statistics_are_when_the_config_says_so() {
        let x: Vec<f32> = (0..40).map(|i| (i as f32 * 0.7).sin()).collect();
        let run = |t: &mut dyn FnMut(usize, Stage, &[f32])| {
            t(0, Stage::Embedding, &x);
            t(1, Stage::PostAttn, &x[..17]);
            t(1, Stage::Output, &[]);
            t(0, Stage::Logits, &x[3..]);
        };
        let mut full = ModelTracer::new(Full);
        full.begin_forward(0);
        run(&mut |l, s, v| {
            if s == Stage::Logits {
                full.final_logits(v)
            } else {
                full.activation(l, s, v)
            }
        });
        full.end_forward();
        let f = full.last_forward().unwrap();
        assert_eq!(
            fingerprinted(f),
            vec![
                (None, Stage::Embedding),
                (Some(1), Stage::PostAttn),
                (None, Stage::Logits)
            ]
        );
        let a = &f.activations;
        assert_eq!(a.fingerprint(0, Stage::Embedding), Some(&fingerprint(&x)));
        assert_eq!(
            a.fingerprint(1, Stage::PostAttn),
            Some(&fingerprint(&x[..17]))
        );
        assert_eq!(a.fingerprint(0, Stage::Logits), Some(&fingerprint(&x[3..])));
        assert_eq!(
            a.fingerprint(1, Stage::Output),
            None,
            "an empty tensor is not recorded"
        );

        for (name, mut t) in [
            (
                "lightweight",
                ModelTracer::new(ModelTracerConfig::lightweight()),
            ),
            (
                "fingerprints without activations",
                ModelTracer::new(ModelTracerConfig {
                    trace_fingerprints: true,
                    trace_kv_cache: true,
                    ..ModelTracerConfig::default()
                }),
            ),
        ] {
            t.begin_forward(0);
            t.activation(0, Stage::Input, &x);
            t.final_logits(&x);
            t.end_forward();
            let f = t.last_forward().unwrap();
            assert!(!f.activations.has_fingerprints(), "{name}");
        }
        let mut rt = ModelTracer::new(ModelTracerConfig {
            trace_fingerprints: true,
            ..ModelTracerConfig::lightweight()
        });
        rt.begin_forward(0);
        rt.activation(2, Stage::Input, &x);
        rt.end_forward();
        let f = rt.last_forward().unwrap();
        assert_eq!(
            f.activations.fingerprint(2, Stage::Input),
            Some(&fingerprint(&x))
        );
        let mut light = ModelTracer::new(Lightweight);
        light.begin_forward(0);
        light.activation(2, Stage::Input, &x);
        light.end_forward();
        assert!(!light.last_forward().unwrap().activations.has_fingerprints());
    }

    #[test]
    fn a_warm_tracer_takes_fingerprints_without_allocating() {
        let options = TraceOptions {
            max_forwards: 4,
            ..TraceOptions::default()
        };
        let mut t = ModelTracer::with_options(Fingerprints, options);
        let mut x = vec![0.25f32; 32];
        for pos in 0..8 {
            toy_forward(&mut t, pos, &mut x);
        }
        let (_, allocs) = model_tracer_test_support::count_allocations(|| {
            for pos in 8..40 {
                x.iter_mut().for_each(|v| *v = (*v * 0.5).sin());
                toy_forward(&mut t, pos, &mut x);
            }
        });
        assert_eq!(allocs, 32 * (3 + 1), "the tracer allocated in steady state");
        let f = t.last_forward().unwrap();
        // The embedding, each layer's input and output, the logits.
        assert_eq!(fingerprinted(f).len(), 1 + 3 * 2 + 1);
        assert_eq!(
            f.activations.fingerprint(2, Stage::Output),
            Some(&fingerprint(&x))
        );
    }

    #[test]
    fn a_replay_keeps_fingerprints_only_for_a_config_that_traces_them() {
        let mut t = ModelTracer::new(Full);
        let mut x = vec![0.5f32; 24];
        toy_forward(&mut t, 0, &mut x);
        let forward = t.last_forward().unwrap().clone();
        assert!(forward.activations.has_fingerprints());
        let mut keeps = ModelTracer::new(Fingerprints);
        keeps.replay_forward(forward.clone());
        assert_eq!(
            keeps.last_forward().map(|f| &f.activations),
            Some(&forward.activations)
        );
        let mut drops = ModelTracer::new(Lightweight);
        drops.replay_forward(forward.clone());
        let kept = &drops.last_forward().unwrap().activations;
        assert!(!kept.has_fingerprints());
        assert_eq!(
            kept.layers[1].output_stats,
            forward.activations.layers[1].output_stats
        );
    }

    /// One pre-norm layer over `rows` rows of `width`: the two residual
    /// adds recorded either with `residual` or from the stages' statistics.
    fn layer_ratios(rows: usize, width: usize, from_stages: bool, poison: Option<f32>) -> Vec<f32> {
        let n = rows * width;
        let mut x: Vec<f32> = (0..n)
            .map(|i| (i as f32 * 0.37).sin() * 3.0 + 0.5)
            .collect();
        let attn: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos() * 0.8).collect();
        let mut ffn: Vec<f32> = (0..n)
            .map(|i| (i as f32 * 0.23).sin() * 1.7 - 0.2)
            .collect();
        if let Some(v) = poison {
            ffn[width + 3] = v;
        }
        let mut t = ModelTracer::new(Lightweight);
        t.begin_forward_rows(5, rows);
        for layer in 0..2 {
            t.activation(layer, Stage::Input, &x);
            t.activation(layer, Stage::PostAttn, &attn);
            if !from_stages {
                t.residual(layer, &x, &attn);
            }
            x.iter_mut().zip(&attn).for_each(|(a, b)| *a += b);
            t.activation(layer, Stage::PostFfn, &ffn);
            if from_stages {
                t.residual_from_stages(layer);
            } else {
                t.residual(layer, &x, &ffn);
            }
            x.iter_mut().zip(&ffn).for_each(|(a, b)| *a += b);
        }
        t.end_forward();
        t.forwards()
            .flat_map(|f| f.activations.layers.iter().map(|l| l.residual_ratio))
            .collect()
    }

    #[test]
    fn residual_from_stages_matches_residual_at_both_adds() {
        for rows in [1, 3] {
            for width in [7, 576, 1000] {
                let want = layer_ratios(rows, width, false, None);
                let got = layer_ratios(rows, width, true, None);
                assert_eq!(want.len(), rows * 2);
                for (g, w) in got.iter().zip(&want) {
                    assert!(*w > 0.0 && *w < 1.0, "{w}");
                    assert!(
                        (g - w).abs() <= 1e-6 * w,
                        "rows {rows} width {width}: {g} vs {w}"
                    );
                }
            }
        }
        // A NaN in an update makes the row's ratios NaN, an infinity makes
        // that layer's 0 (and the next layer's NaN, its input being
        // infinite), as with `residual`; the other rows keep theirs.
        for poison in [f32::NAN, f32::INFINITY] {
            let want = layer_ratios(3, 64, false, Some(poison));
            let got = layer_ratios(3, 64, true, Some(poison));
            assert_eq!(got.len(), 6);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                if i / 2 == 1 {
                    let first = if poison.is_nan() { f32::NAN } else { 0.0 };
                    let expect = [first, f32::NAN][i % 2];
                    for r in [g, w] {
                        let same = (r.is_nan() && expect.is_nan()) || *r == expect;
                        assert!(same, "{poison} layer {}: {r}", i % 2);
                    }
                } else {
                    assert!(*w > 0.0 && (g - w).abs() <= 1e-6 * w, "{g} vs {w}");
                }
            }
        }
    }

    #[test]
    fn residual_ratio_accumulates_over_both_adds() {
        let mut t = ModelTracer::new(Lightweight);
        t.begin_forward(0);
        t.residual(0, &[3.0, 4.0], &[0.0, 1.0]);
        t.residual(0, &[3.0, 5.0], &[0.0, 4.0]);
        t.end_forward();
        let r = t.last_forward().unwrap().activations.layers[0].residual_ratio;
        assert!((r - 0.5).abs() < 1e-6, "{r}");
    }
}
