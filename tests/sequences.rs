//! Forwards over the rows of several sequences: each sequence's records
//! are those of running it alone with the one-sequence API, whoever shares
//! its forwards.
#![cfg(feature = "serde")]

use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use model_tracer::diff::{diff, Side};
use model_tracer::kv_cache::KvCacheStateTrace;
use model_tracer::read::{JsonlReader, SequenceChoice};
use model_tracer::replay::ReplayedTrace;
use model_tracer::{
    AnomalyKind, BatchRow, BrickId, ForwardTrace, Full, JsonlSink, Lightweight, LogitRows,
    ModelTracer, QuantSampling, QuantType, SequenceId, SinkHandle, Stage, TraceConfig,
    TraceOptions,
};

#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Vec<u8>>>);

impl Write for Shared {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .lock()
            .map_err(|_| io::ErrorKind::Other)?
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

const DIM: usize = 16;
const LAYERS: usize = 3;
const HEADS: usize = 2;
const VOCAB: usize = 10;

/// The toy model's value of sequence `seq` at `(pos, layer, stage, i)`:
/// sequence 1 produces a NaN at position 4, layer 1, post_attn, carried on.
fn value(seq: u64, pos: usize, layer: usize, stage: Stage, i: usize) -> f32 {
    let s = stage as usize;
    let v = ((seq as usize * 101 + pos * 31 + layer * 7 + s * 3 + i) as f32 * 0.37).sin()
        * (1.0 + layer as f32);
    let past = layer > 1 || (layer == 1 && stage >= Stage::PostAttn);
    if seq == 1 && pos == 4 && past && i == 2 {
        return f32::NAN;
    }
    v
}

/// Causal softmax row of `(layer, head)` for the query at `pos` of `seq`.
fn softmax_row(seq: u64, pos: usize, layer: usize, head: usize) -> Vec<f32> {
    let raw: Vec<f32> = (0..=pos)
        .map(|t| ((t * 13 + layer * 5 + head * 11 + pos + seq as usize) as f32 * 0.9).cos() * 3.0)
        .collect();
    let m = raw.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = raw.iter().map(|v| (v - m).exp()).collect();
    let sum: f32 = e.iter().sum();
    e.iter().map(|v| v / sum).collect()
}

/// One segment of a forward: rows of `seq` at positions `start..start + rows`.
#[derive(Debug, Clone, Copy)]
struct Seg {
    seq: u64,
    start: usize,
    rows: usize,
}

/// A toy forward over `segs`, through the batch API (`batch`) or, for a
/// single segment, the one-sequence API; the hooks a decoder calls.
fn forward<C: TraceConfig>(t: &mut ModelTracer<C>, segs: &[Seg], batch: bool) {
    let rows: Vec<(u64, usize)> = segs
        .iter()
        .flat_map(|g| (0..g.rows).map(move |i| (g.seq, g.start + i)))
        .collect();
    if batch {
        let list: Vec<BatchRow> = rows
            .iter()
            .map(|&(s, p)| BatchRow::new(SequenceId(s), p))
            .collect();
        t.begin_forward_batch(&list);
    } else {
        t.begin_forward_rows(segs[0].start, segs[0].rows);
    }
    let tokens: Vec<u32> = rows
        .iter()
        .map(|&(s, p)| ((s as usize + p) % VOCAB) as u32)
        .collect();
    t.input_tokens(&tokens);
    let buf = |layer: usize, stage: Stage| -> Vec<f32> {
        rows.iter()
            .flat_map(|&(s, p)| (0..DIM).map(move |i| value(s, p, layer, stage, i)))
            .collect()
    };
    t.activation(0, Stage::Embedding, &buf(0, Stage::Embedding));
    for layer in 0..LAYERS {
        let input = buf(layer, Stage::Input);
        t.activation(layer, Stage::Input, &input);
        for head in 0..HEADS {
            let mut first = 0;
            for g in segs {
                let stride = g.start + g.rows;
                let mut w = vec![0.0f32; g.rows * stride];
                for i in 0..g.rows {
                    let r = softmax_row(g.seq, g.start + i, layer, head);
                    w[i * stride..i * stride + r.len()].copy_from_slice(&r);
                }
                if batch {
                    t.attention_segment(layer, head, first, g.rows, &w, g.start + 1);
                } else {
                    t.attention_rows(layer, head, &w, g.start + 1);
                }
                first += g.rows;
            }
        }
        let attn = buf(layer, Stage::PostAttn);
        t.activation(layer, Stage::PostAttn, &attn);
        t.residual(layer, &input, &attn);
        for (i, &(s, p)) in rows.iter().enumerate() {
            t.focus_row(i);
            let out: Vec<f32> = (0..DIM)
                .map(|k| value(s, p, layer, Stage::PostAttn, k))
                .collect();
            for brick in [BrickId::AttentionOutput, BrickId::FfnDown] {
                t.quant_error(brick, layer, QuantType::Q4_1, &out, |r| {
                    for (k, v) in r.iter_mut().enumerate() {
                        *v = out[k] * 1.001 + 1e-3;
                    }
                });
            }
        }
        t.activation(layer, Stage::Output, &buf(layer, Stage::Output));
    }
    for (i, &(s, p)) in rows.iter().enumerate() {
        t.focus_row(i);
        if t.wants_logits(i) {
            for layer in 0..LAYERS {
                t.logit_lens(layer, VOCAB, |out| {
                    for (k, v) in out.iter_mut().enumerate() {
                        *v = value(s, p, layer, Stage::Output, k);
                    }
                });
            }
            let logits: Vec<f32> = (0..VOCAB)
                .map(|k| value(s, p, 9, Stage::Logits, k))
                .collect();
            t.final_logits(&logits);
        }
        t.kv_state(|| KvCacheStateTrace {
            valid_positions: p + 1,
            computed_positions: 1,
            reused_positions: p,
            ..KvCacheStateTrace::new(p, 64)
        });
    }
    t.end_forward();
}

fn tracer<C: TraceConfig>(config: C, logit_rows: LogitRows) -> ModelTracer<C> {
    let options = TraceOptions {
        max_forwards: 1000,
        logit_rows,
        ..TraceOptions::default()
    };
    let mut t = ModelTracer::with_options(config, options);
    // The default strided sampling counts visits: per sequence, it must
    // pick the sites it picks for the sequence alone.
    t.set_quant_sampling(QuantSampling::Strided(3));
    t
}

/// Three sequences of different lengths: a prefill chunk of one beside the
/// decode rows of the others, joining and leaving at different forwards.
fn schedule() -> Vec<Vec<Seg>> {
    let s = |seq, start, rows| Seg { seq, start, rows };
    vec![
        vec![s(0, 0, 4)],
        vec![s(0, 4, 1), s(1, 0, 3)],
        vec![s(1, 3, 2), s(0, 5, 1), s(2, 0, 5)],
        vec![s(2, 5, 1), s(1, 5, 1), s(0, 6, 1)],
        vec![s(1, 6, 1), s(2, 6, 3)],
        vec![s(2, 9, 1)],
    ]
}

fn without_sequence(f: &ForwardTrace) -> ForwardTrace {
    let mut f = f.clone();
    f.sequence = None;
    f
}

fn check<C: TraceConfig>(config: C, logit_rows: LogitRows) {
    let mut batched = tracer(config.clone(), logit_rows);
    let probe = Shared::default();
    batched.set_sink(Some(SinkHandle::new(JsonlSink::new(probe.clone()))));
    for segs in schedule() {
        forward(&mut batched, &segs, true);
    }
    assert_eq!(
        batched.forwards().count(),
        0,
        "the one-sequence lane saw nothing"
    );
    let mut alone_rows = Vec::new();
    for seq in 0..3u64 {
        let id = SequenceId(seq);
        let mut alone = tracer(config.clone(), logit_rows);
        let alone_out = Shared::default();
        alone.set_sink(Some(SinkHandle::new(JsonlSink::new(alone_out.clone()))));
        alone_rows.push(alone_out);
        for segs in schedule() {
            for g in segs.iter().filter(|g| g.seq == seq) {
                forward(&mut alone, std::slice::from_ref(g), false);
            }
        }
        let got: Vec<ForwardTrace> = batched
            .sequence_forwards(id)
            .map(without_sequence)
            .collect();
        let want: Vec<ForwardTrace> = alone.forwards().cloned().collect();
        assert_eq!(got.len(), want.len(), "sequence {seq}");
        for (g, w) in got.iter().zip(&want) {
            // Debug text: the NaN of sequence 1 compares equal to itself.
            assert_eq!(format!("{g:?}"), format!("{w:?}"), "sequence {seq}");
        }
        if seq != 1 {
            assert_eq!(got, want, "sequence {seq}");
        }
        assert!(batched
            .sequence_forwards(id)
            .all(|f| f.sequence == Some(id)));
        let summary = batched.sequence_summary(id);
        assert_eq!(
            format!("{summary:?}"),
            format!("{:?}", Some(alone.summary())),
            "sequence {seq}"
        );
        assert_eq!(
            batched.sequence_kv_session(id).map(|k| k.steps.len()),
            alone.kv_session().map(|k| k.steps.len())
        );
    }
    // The NaN is sequence 1's, at its position and layer.
    for seq in [0u64, 2] {
        let s = batched.sequence_summary(SequenceId(seq));
        assert_eq!(s.map(|s| s.first_anomaly), Some(None), "sequence {seq}");
    }
    let ended = batched.end_sequence(SequenceId(1));
    let a = ended.as_ref().and_then(|e| e.summary.first_anomaly);
    let a = a.unwrap_or_else(|| panic!("no anomaly in sequence 1"));
    assert_eq!(
        (a.kind, a.position, a.layer, a.stage),
        (AnomalyKind::NaN, 4, Some(1), Stage::PostAttn)
    );
    assert_eq!(ended.as_ref().map(|e| e.forwards.len()), Some(7));
    assert!(batched.sequence_summary(SequenceId(1)).is_none());
    assert!(batched.end_sequence(SequenceId(1)).is_none());
    let mut live: Vec<SequenceId> = batched.sequences().collect();
    live.sort();
    assert_eq!(live, [SequenceId(0), SequenceId(2)]);

    // Every row went to the sink with its sequence, and reads back.
    let text = String::from_utf8(probe.0.lock().map(|b| b.clone()).unwrap_or_default());
    let text = text.unwrap_or_default();
    let rows: Vec<_> = JsonlReader::new(text.as_bytes())
        .map(|r| r.unwrap_or_else(|e| panic!("{e}")))
        .collect();
    let total: usize = schedule().iter().flatten().map(|g| g.rows).sum();
    assert_eq!(rows.len(), total);
    for (line, row) in text.lines().zip(&rows) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_default();
        let seq = v["sequence"].as_u64();
        assert_eq!(seq.map(SequenceId), row.forward.sequence);
        assert!(seq.is_some_and(|s| s < 3), "{line}");
    }
    let back: Vec<(Option<SequenceId>, usize)> = rows
        .iter()
        .map(|r| (r.forward.sequence, r.forward.position))
        .collect();
    let sent: Vec<(Option<SequenceId>, usize)> = schedule()
        .iter()
        .flatten()
        .flat_map(|g| (0..g.rows).map(move |i| (Some(SequenceId(g.seq)), g.start + i)))
        .collect();
    assert_eq!(back, sent);

    // Read back one sequence at a time, the trace of all three replays and
    // compares as each sequence traced alone; read whole, it is refused
    // at the first row of a second sequence.
    let err = ReplayedTrace::read_jsonl(text.as_bytes(), 1000).map(|_| ());
    let err = err.expect_err("a trace of three sequences is not one run");
    assert_eq!(err.line, 6, "{err}");
    assert!(
        err.message.contains("sequence 1") && err.message.contains("sequence 0"),
        "{err}"
    );
    let err = Side::from_jsonl("all", text.as_bytes()).map(|_| ());
    assert_eq!(err.map_err(|e| e.line), Err(6));
    for (seq, alone_out) in alone_rows.iter().enumerate() {
        let alone_text = alone_out.0.lock().map(|b| b.clone()).unwrap_or_default();
        let choice = SequenceChoice::Only(SequenceId(seq as u64));
        let one = ReplayedTrace::read_jsonl_of(text.as_bytes(), 1000, choice)
            .unwrap_or_else(|e| panic!("sequence {seq}: {e}"));
        let alone = ReplayedTrace::read_jsonl(&alone_text[..], 1000)
            .unwrap_or_else(|e| panic!("sequence {seq} alone: {e}"));
        assert_eq!(one.rows(), alone.rows(), "sequence {seq}");
        assert_eq!(
            format!("{:?}", one.tracer().summary()),
            format!("{:?}", alone.tracer().summary()),
            "sequence {seq}"
        );
        let got: Vec<String> = one
            .tracer()
            .forwards()
            .map(|f| format!("{:?}", without_sequence(f)))
            .collect();
        let want: Vec<String> = alone
            .tracer()
            .forwards()
            .map(|f| format!("{f:?}"))
            .collect();
        assert_eq!(got, want, "sequence {seq}");
        let a = Side::from_jsonl_of("one", text.as_bytes(), choice)
            .unwrap_or_else(|e| panic!("sequence {seq}: {e}"));
        let b = Side::from_jsonl("alone", &alone_text[..])
            .unwrap_or_else(|e| panic!("sequence {seq} alone: {e}"));
        let report = diff(&a, &b, 0.0).unwrap_or_else(|e| panic!("sequence {seq}: {e}"));
        assert!(
            report.first_divergence.is_none(),
            "sequence {seq}: {report}"
        );
        assert_eq!(a.positions.len(), b.positions.len());
    }
    let none =
        ReplayedTrace::read_jsonl_of(text.as_bytes(), 10, SequenceChoice::Only(SequenceId(9)));
    let none = none.map(|_| ()).expect_err("no row of sequence 9");
    assert_eq!(none.message, "the trace holds no row of sequence 9");
}

#[test]
fn each_sequence_records_what_it_records_alone_full() {
    check(Full, LogitRows::Last);
    check(Full, LogitRows::Every);
}

#[test]
fn each_sequence_records_what_it_records_alone_lightweight() {
    check(Lightweight, LogitRows::Last);
}

#[test]
fn the_one_sequence_api_beside_batches_keeps_its_own_records() {
    let mut t = tracer(Full, LogitRows::Last);
    let mut alone = tracer(Full, LogitRows::Last);
    for (i, segs) in schedule().iter().enumerate() {
        forward(&mut t, segs, true);
        let own = Seg {
            seq: 9,
            start: i,
            rows: 1,
        };
        forward(&mut t, &[own], false);
        forward(&mut alone, &[own], false);
    }
    let got: Vec<&ForwardTrace> = t.forwards().collect();
    let want: Vec<&ForwardTrace> = alone.forwards().collect();
    assert_eq!(got, want);
    assert!(got.iter().all(|f| f.sequence.is_none()));
    assert_eq!(
        format!("{:?}", t.summary()),
        format!("{:?}", alone.summary())
    );
}

#[test]
fn a_malformed_row_list_records_what_it_can_and_never_panics() {
    let id = SequenceId;
    let lists: Vec<Vec<BatchRow>> = vec![
        // Sequence 0 split by sequence 1: its second segment is dropped.
        vec![
            BatchRow::new(id(0), 0),
            BatchRow::new(id(1), 0),
            BatchRow::new(id(0), 1),
        ],
        // Positions that do not increase end a segment: the second is dropped.
        vec![BatchRow::new(id(2), 5), BatchRow::new(id(2), 3)],
        vec![BatchRow::new(id(3), 4), BatchRow::new(id(3), 4)],
        vec![],
        vec![BatchRow::new(id(4), usize::MAX)],
    ];
    for list in &lists {
        let mut t = ModelTracer::new(Full);
        t.begin_forward_batch(list);
        let n = list.len().max(1);
        let x: Vec<f32> = (0..n * DIM).map(|i| i as f32 * 0.1).collect();
        t.activation(0, Stage::Input, &x);
        t.activation(0, Stage::Output, &x[..x.len() - 1]);
        t.attention_segment(0, 0, 0, n + 5, &x, 3);
        t.attention_segment(0, 0, n + 10, 2, &x, usize::MAX);
        t.attention_segment(5000, 0, 0, 1, &x, 1);
        t.attention_rows(0, 1, &x, 2);
        for row in 0..n + 2 {
            t.focus_row(row);
            t.wants_logits(row);
            t.final_logits(&x[..VOCAB]);
            t.kv_state(|| KvCacheStateTrace::new(row, 8));
        }
        t.end_forward();
        let recorded: usize = t.sequences().map(|s| t.sequence_forwards(s).count()).sum();
        let expect = match list.len() {
            3 => 2,
            2 => 1,
            1 => 1,
            _ => 0,
        };
        assert_eq!(recorded, expect, "{list:?}");
    }
    let mut t = ModelTracer::new(Full);
    t.begin_forward_batch(&lists[0]);
    t.end_forward();
    assert_eq!(t.sequence_forwards(id(0)).count(), 1);
    assert_eq!(t.sequence_forwards(id(1)).count(), 1);
}

#[test]
fn live_sequences_are_bounded() {
    use model_tracer::tracer::MAX_SEQUENCES;
    let mut t = ModelTracer::new(Lightweight);
    for s in 0..(MAX_SEQUENCES as u64 + 10) {
        t.begin_forward_batch(&[BatchRow::new(SequenceId(s), 0)]);
        t.activation(0, Stage::Input, &[1.0, 2.0]);
        t.end_forward();
    }
    assert_eq!(t.sequences().count(), MAX_SEQUENCES);
    // The sequences seen longest ago were released.
    assert!(t.sequence_summary(SequenceId(0)).is_none());
    assert!(t
        .sequence_summary(SequenceId(MAX_SEQUENCES as u64 + 9))
        .is_some());
    // A forward of more sequences than lanes records the first ones.
    let rows: Vec<BatchRow> = (0..MAX_SEQUENCES as u64 + 3)
        .map(|s| BatchRow::new(SequenceId(1000 + s), 0))
        .collect();
    t.begin_forward_batch(&rows);
    t.end_forward();
    assert_eq!(t.sequences().count(), MAX_SEQUENCES);
    assert!(t.sequence_summary(SequenceId(1000)).is_some());
    assert!(t
        .sequence_summary(SequenceId(1000 + MAX_SEQUENCES as u64))
        .is_none());
}

#[test]
fn a_disabled_tracer_has_no_lanes() {
    let mut t = ModelTracer::new(model_tracer::Disabled);
    t.begin_forward_batch(&[BatchRow::new(SequenceId(1), 0)]);
    t.attention_segment(0, 0, 0, 1, &[1.0], 1);
    t.end_forward();
    assert!(t.end_sequence(SequenceId(1)).is_none());
    assert_eq!(t.sequences().count(), 0);
}

/// A dump of one sequence's rows of forwards over several sequences is the
/// dump of that sequence run alone; a dump that names no sequence keeps no
/// row of a batch forward.
#[cfg(feature = "dump")]
#[test]
fn a_dump_of_one_sequence_of_batch_forwards_is_its_dump_alone() {
    use model_tracer::{DumpFilter, DumpRecorder};
    for seq in 0..3u64 {
        let filter = DumpFilter {
            sequence: Some(SequenceId(seq)),
            ..DumpFilter::default()
        };
        let mut batched = tracer(Full, LogitRows::Last);
        batched.set_dump(Some(DumpRecorder::new(filter)));
        for segs in schedule() {
            forward(&mut batched, &segs, true);
        }
        let mut alone = tracer(Full, LogitRows::Last);
        alone.set_dump(Some(DumpRecorder::new(DumpFilter::default())));
        for segs in schedule() {
            for g in segs.iter().filter(|g| g.seq == seq) {
                forward(&mut alone, std::slice::from_ref(g), false);
            }
        }
        let (Some(got), Some(want)) = (batched.take_dump(), alone.take_dump()) else {
            panic!("a dump was installed");
        };
        let rows: usize = schedule()
            .iter()
            .flatten()
            .filter(|g| g.seq == seq)
            .map(|g| g.rows)
            .sum();
        assert_eq!(got.len(), rows, "sequence {seq}");
        assert_eq!(got.positions(), want.positions(), "sequence {seq}");
        assert_eq!(got.tokens(), want.tokens(), "sequence {seq}");
        assert!(got.to_bytes() == want.to_bytes(), "sequence {seq}");
    }
    let mut batched = tracer(Lightweight, LogitRows::Last);
    batched.set_dump(Some(DumpRecorder::new(DumpFilter::default())));
    for segs in schedule() {
        forward(&mut batched, &segs, true);
    }
    assert_eq!(batched.take_dump().map(|d| d.len()), Some(0));
}
