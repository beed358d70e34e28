//! Forwards over the rows of several sequences (continuous batching): each
//! row recorded into its sequence's lane, so that a sequence's records are
//! those of running it alone, whoever shares its forwards.
//!
//! A lane ([`Lane`]) holds what a tracer keeps across forwards: the
//! quantization sampling's visit count, the retained forwards, the session
//! aggregates and the KV session. The one-sequence API
//! ([`begin_forward`](ModelTracer::begin_forward),
//! [`begin_forward_rows`](ModelTracer::begin_forward_rows)) records into a
//! lane of its own; each sequence of a
//! [`begin_forward_batch`](ModelTracer::begin_forward_batch) gets one on
//! first sight, until [`end_sequence`](ModelTracer::end_sequence) releases
//! it. What a forward holds only while in flight (the rows' records, the
//! residual norms, the lens rows) is per row already.

use crate::config::TraceConfig;
use crate::forward::ForwardTrace;
use crate::kv_cache::KvCacheSessionTrace;
use crate::sequence::{BatchRow, SequenceId};
use crate::storage::{
    Lane, LaneSlot, ParkedRow, Recorder, RowPlace, SequenceLane, Storage, MAX_FORWARD_ROWS,
    MAX_SEQUENCES,
};
use crate::summary::{SessionAggregates, TraceSummary};
use crate::tracer::ModelTracer;

/// What a tracer recorded of one sequence, returned when its lane is
/// released ([`ModelTracer::end_sequence`]).
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct SequenceTrace {
    /// The sequence.
    pub sequence: SequenceId,
    /// Its summary: forwards, positions, anomaly counts and the first
    /// anomaly (position, layer, stage, kind), per-layer health, heads,
    /// bricks, the KV session's totals.
    pub summary: TraceSummary,
    /// Its last `max_forwards` forwards in detail, oldest first.
    pub forwards: Vec<ForwardTrace>,
    /// Its KV session (`None` when KV tracing is off).
    pub kv_session: Option<KvCacheSessionTrace>,
}

impl Recorder {
    /// Begins a forward whose row `i` is `rows[i]`, placing each row in
    /// its sequence's lane; see [`ModelTracer::begin_forward_batch`] for
    /// the rows that are not recorded.
    pub(crate) fn begin_batch(&mut self, rows: &[BatchRow]) {
        if self.in_forward {
            self.end();
        }
        self.in_forward = true;
        self.batch = true;
        self.batches += 1;
        #[cfg(feature = "dump")]
        if let Some(d) = &mut self.dump {
            d.begin_batch(rows);
        }
        let n = rows.len().clamp(1, MAX_FORWARD_ROWS);
        self.start = rows.first().map_or(0, |r| r.position);
        self.rows = n;
        self.focus = 0;
        if self.parked.len() < n {
            self.parked.resize_with(n, ParkedRow::default);
        }
        self.places.clear();
        let rows = &rows[..rows.len().min(n)];
        let mut i = 0;
        while i < rows.len() {
            let sequence = rows[i].sequence;
            let mut j = i + 1;
            while j < rows.len()
                && rows[j].sequence == sequence
                && rows[j].position > rows[j - 1].position
            {
                j += 1;
            }
            let lane = self.lane_for(sequence);
            for _ in i..j {
                self.places.push(RowPlace {
                    lane,
                    first: i,
                    rows: j - i,
                });
            }
            i = j;
        }
        if rows.is_empty() {
            // One row, recorded nowhere: the hooks have a row to fill.
            self.places.push(RowPlace {
                lane: LaneSlot::Void,
                first: 0,
                rows: 1,
            });
        }
        // The row in focus is row 0 with the one-sequence API's lane:
        // bring row 0's lane, then each row's in turn.
        self.focus = 0;
        self.bring_lane(self.places[0].lane);
        for row in 0..n {
            self.focus(row);
            let p = self.places[row];
            let (position, sequence) = match rows.get(row) {
                Some(r) => (r.position, Some(r.sequence)),
                None => (0, None),
            };
            self.begin_row(position, sequence, p.rows);
        }
        self.focus(0);
    }

    /// The lane of a new segment of `sequence` in the forward being
    /// begun: its live lane, a new one, or none when the sequence already
    /// had a segment in this forward or no lane can be had.
    fn lane_for(&mut self, sequence: SequenceId) -> LaneSlot {
        let now = self.batches;
        if let Some(i) = self.lanes.iter().position(|l| l.id == sequence) {
            let l = &mut self.lanes[i];
            if l.last_seen == now {
                return LaneSlot::Void;
            }
            l.last_seen = now;
            return LaneSlot::Sequence(i as u32);
        }
        if self.lanes.len() >= MAX_SEQUENCES {
            // Release the lane seen longest ago, unless every live one is
            // in this forward.
            let oldest = self
                .lanes
                .iter()
                .enumerate()
                .filter(|(_, l)| l.last_seen != now)
                .min_by_key(|(_, l)| l.last_seen)
                .map(|(i, _)| i);
            let Some(i) = oldest else {
                return LaneSlot::Void;
            };
            self.release(i);
        }
        self.lanes.push(SequenceLane {
            id: sequence,
            lane: Box::new(Lane {
                history: std::collections::VecDeque::with_capacity(self.options.max_forwards),
                ..Lane::default()
            }),
            last_seen: now,
        });
        LaneSlot::Sequence((self.lanes.len() - 1) as u32)
    }

    /// Removes the lane `lanes[i]` (not in focus: called between forwards
    /// or while placing rows, when row 0's lane is not yet brought).
    fn release(&mut self, i: usize) -> SequenceLane {
        let last = self.lanes.len() - 1;
        let out = self.lanes.swap_remove(i);
        // The lane that was last now sits at `i`: rows placed already
        // name it by its old index.
        if i != last {
            for p in &mut self.places {
                if p.lane == LaneSlot::Sequence(last as u32) {
                    p.lane = LaneSlot::Sequence(i as u32);
                }
            }
        }
        out
    }

    /// Whether row `row` of the forward in flight gets its output logits
    /// ([`crate::TraceOptions::logit_rows`]): counted in the row's
    /// segment in a forward over several sequences.
    #[inline]
    pub(crate) fn wants_logits(&self, row: usize) -> bool {
        if !self.batch {
            return self.options.logit_rows.selects(row, self.rows);
        }
        self.places.get(row).is_some_and(|p| {
            p.lane != LaneSlot::Void && self.options.logit_rows.selects(row - p.first, p.rows)
        })
    }
}

impl<C: TraceConfig> ModelTracer<C> {
    /// Starts a forward over the rows of several sequences: row `i` is
    /// `rows[i]`, the token of `rows[i].sequence` at `rows[i].position`.
    /// A forward still open is ended first.
    ///
    /// The rows of one sequence are consecutive, in increasing positions
    /// (a segment: a prefill chunk, or one decode row). The hooks then
    /// work as in a forward of [`begin_forward_rows`](Self::begin_forward_rows):
    /// the buffer hooks take the rows of every sequence row-major,
    /// [`attention_segment`](Self::attention_segment) takes one segment's
    /// softmax rows, [`focus_row`](Self::focus_row) brings a row into
    /// focus for the per-position hooks, and
    /// [`wants_logits`](Self::wants_logits) counts rows within each
    /// segment (by default the last row of each sequence gets logits).
    ///
    /// Each row's [`ForwardTrace`] names its sequence and is folded into
    /// that sequence's lane: its quantization sampling, retained forwards,
    /// aggregates and KV session, created on the sequence's first sight,
    /// so that its records are those of running it alone with the
    /// one-sequence API in forwards of the same rows. Every row goes to
    /// the sink; an activation dump records no forward over several
    /// sequences (its rows are keyed by position alone). The tracer's own
    /// results ([`forwards`](Self::forwards), [`summary`](Self::summary),
    /// [`kv_session`](Self::kv_session)) stay the one-sequence API's; a
    /// sequence's are read with [`sequence_summary`](Self::sequence_summary)
    /// and [`sequence_forwards`](Self::sequence_forwards) and returned by
    /// [`end_sequence`](Self::end_sequence).
    ///
    /// A malformed list gets rows that are not recorded, never a panic: a
    /// segment ends where the sequence changes or the position does not
    /// increase, and a segment of a sequence that already had one in this
    /// forward is not recorded (its hooks' records are dropped, nothing is
    /// folded or sent). At most [`MAX_FORWARD_ROWS`] rows are recorded; an
    /// empty list begins a forward of one row recorded nowhere. At most
    /// [`MAX_SEQUENCES`] sequences have lanes at once: a new one releases
    /// the lane seen longest ago, or, when all of them are in this
    /// forward, is not recorded.
    #[inline(always)]
    pub fn begin_forward_batch(&mut self, rows: &[BatchRow]) {
        if C::ANY {
            if let Some(r) = self.storage.recorder_mut() {
                r.begin_batch(rows);
            }
        }
    }

    /// Records one head's causal softmax rows for rows
    /// `first_row..first_row + rows` of the forward in flight (one
    /// sequence's segment of a [`begin_forward_batch`](Self::begin_forward_batch)
    /// forward, or any run of rows of a forward of one sequence), as
    /// [`attention`](Self::attention) of each at the row's position:
    /// `weights` holds the rows with a stride of `weights.len() / rows`,
    /// and the `j`-th attends its first `min(first_len + j, stride)`
    /// entries (`first_len`: what the segment's first row attends, the
    /// sequence's cached positions and itself). Rows beyond the forward's
    /// are ignored.
    #[inline(always)]
    pub fn attention_segment(
        &mut self,
        layer: usize,
        head: usize,
        first_row: usize,
        rows: usize,
        weights: &[f32],
        first_len: usize,
    ) {
        if self.attention_on() {
            if let Some(r) = self.storage.recorder_mut() {
                r.attention_segment(layer, head, first_row, rows, weights, first_len);
            }
        }
    }

    /// The sequences whose lanes are live, in no particular order.
    pub fn sequences(&self) -> impl Iterator<Item = SequenceId> + '_ {
        self.storage
            .recorder()
            .into_iter()
            .flat_map(|r| r.lanes.iter().map(|l| l.id))
    }

    /// The summary of sequence `id` so far (`None` when it has no live
    /// lane).
    pub fn sequence_summary(&self, id: SequenceId) -> Option<TraceSummary> {
        let lane = self.storage.recorder()?.sequence_lane(id)?;
        Some(self.lane_summary(lane))
    }

    /// The retained forwards of sequence `id`, oldest first (none when it
    /// has no live lane).
    pub fn sequence_forwards(&self, id: SequenceId) -> impl Iterator<Item = &ForwardTrace> + '_ {
        self.storage
            .recorder()
            .and_then(|r| r.sequence_lane(id))
            .into_iter()
            .flat_map(|l| l.history.iter())
    }

    /// The session aggregates of sequence `id`.
    pub fn sequence_aggregates(&self, id: SequenceId) -> Option<&SessionAggregates> {
        Some(&self.storage.recorder()?.sequence_lane(id)?.aggregates)
    }

    /// The KV session of sequence `id` (`None` when KV tracing is off or
    /// the sequence has no live lane).
    pub fn sequence_kv_session(&self, id: SequenceId) -> Option<&KvCacheSessionTrace> {
        if !self.kv_on() {
            return None;
        }
        Some(&self.storage.recorder()?.sequence_lane(id)?.kv_session)
    }

    /// Releases the lane of sequence `id` and returns what it recorded
    /// (`None` when it has no live lane: never seen, released already, or
    /// by a tracer that does not record). A forward in flight is ended
    /// first. The memory a tracer holds for sequences is that of its live
    /// lanes, at most [`MAX_SEQUENCES`]: each keeps at most `max_forwards`
    /// forwards, aggregates whose size depends on the model, and a KV
    /// session of 1024 steps.
    pub fn end_sequence(&mut self, id: SequenceId) -> Option<SequenceTrace> {
        let r = self.storage.recorder_mut()?;
        if r.in_forward {
            r.end();
        }
        let i = r.lanes.iter().position(|l| l.id == id)?;
        let released = r.release(i);
        let summary = self.lane_summary(&released.lane);
        let lane = *released.lane;
        Some(SequenceTrace {
            sequence: id,
            summary,
            forwards: lane.history.into(),
            kv_session: self.kv_on().then_some(lane.kv_session),
        })
    }

    fn lane_summary(&self, lane: &Lane) -> TraceSummary {
        TraceSummary::build(
            crate::config::describe(&self.config),
            Some((&lane.aggregates, &lane.kv_session)),
            self.kv_on(),
        )
    }
}
