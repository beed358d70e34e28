//! Forwards over several positions: a forward of `T` rows records what `T`
//! forwards of one position record, in every system, sink and dump.
#![cfg(feature = "serde")]

use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use model_tracer::kv_cache::KvCacheStateTrace;
use model_tracer::{
    AnomalyKind, BrickId, Full, JsonlSink, LogitRows, ModelTracer, QuantSampling, QuantType,
    SinkHandle, Stage, TraceConfig, TraceOptions,
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
const LAYERS: usize = 4;
const HEADS: usize = 2;
const VOCAB: usize = 12;

/// A value of the toy model at `(pos, layer, stage, i)`, with a NaN
/// produced at position 5, layer 2, post_ffn and carried on, and an
/// explosion at position 3 from layer 3 on.
fn value(pos: usize, layer: usize, stage: Stage, i: usize) -> f32 {
    let s = stage as usize;
    let v = ((pos * 31 + layer * 7 + s * 3 + i) as f32 * 0.37).sin() * (1.0 + layer as f32);
    let past_nan = pos == 5 && (layer > 2 || (layer == 2 && stage >= Stage::PostFfn));
    if past_nan && i == 3 {
        return f32::NAN;
    }
    if pos == 3 && layer == 3 {
        return v * 1e9;
    }
    v
}

fn vector(pos: usize, layer: usize, stage: Stage) -> Vec<f32> {
    (0..DIM).map(|i| value(pos, layer, stage, i)).collect()
}

/// Causal softmax row of `(layer, head)` for the query at `pos` over
/// `pos + 1` positions.
fn softmax_row(pos: usize, layer: usize, head: usize) -> Vec<f32> {
    let raw: Vec<f32> = (0..=pos)
        .map(|t| ((t * 13 + layer * 5 + head * 11 + pos) as f32 * 0.9).cos() * 3.0)
        .collect();
    let max = raw.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = raw.iter().map(|v| (v - max).exp()).collect();
    let sum: f32 = e.iter().sum();
    e.iter().map(|v| v / sum).collect()
}

fn logits(pos: usize, layer: usize) -> Vec<f32> {
    (0..VOCAB)
        .map(|v| ((v * 17 + pos * 3) as f32 * 0.21 + layer as f32 * 0.1).sin() * (layer + 1) as f32)
        .collect()
}

fn kv(pos: usize) -> KvCacheStateTrace {
    KvCacheStateTrace {
        step: pos,
        max_positions: 64,
        valid_positions: pos + 1,
        cache_size_bytes: (pos + 1) * 128,
        cache_hit_rate: pos as f32 / (pos + 1) as f32,
        evictions_this_step: 0,
        reused_positions: pos,
        computed_positions: 1,
    }
}

fn tracer() -> (ModelTracer<Full>, Shared) {
    let options = TraceOptions {
        max_forwards: 5,
        logit_rows: LogitRows::Every,
        ..TraceOptions::default()
    };
    let mut t = ModelTracer::with_options(Full, options);
    t.set_quant_sampling(QuantSampling::Every);
    let out = Shared::default();
    t.set_sink(Some(SinkHandle::new(JsonlSink::new(out.clone()))));
    (t, out)
}

/// The per-position records of the row in focus at `pos`: quantization
/// error, lens, logits, KV state.
fn per_position<C: TraceConfig>(t: &mut ModelTracer<C>, pos: usize) {
    let q = vector(pos, 0, Stage::PostNorm);
    t.quant_error(BrickId::FfnUp, 1, QuantType::Q4_1, &q, |r| {
        r.iter_mut().zip(&q).for_each(|(r, q)| *r = q * 1.01);
    });
    for layer in 0..LAYERS {
        t.logit_lens(layer, VOCAB, |out| out.copy_from_slice(&logits(pos, layer)));
    }
    t.final_logits(&logits(pos, LAYERS));
    t.kv_state(|| kv(pos));
}

fn single(t: &mut ModelTracer<Full>, pos: usize) {
    t.begin_forward(pos);
    t.input_token(100 + pos as u32);
    t.activation(0, Stage::Embedding, &vector(pos, 0, Stage::Embedding));
    for layer in 0..LAYERS {
        for s in Stage::LAYER_STAGES {
            t.activation(layer, s, &vector(pos, layer, s));
        }
        t.residual(
            layer,
            &vector(pos, layer, Stage::Input),
            &vector(pos, layer, Stage::PostAttn),
        );
        for h in 0..HEADS {
            t.attention(layer, h, pos, &softmax_row(pos, layer, h));
        }
    }
    t.activation(0, Stage::FinalNorm, &vector(pos, 0, Stage::FinalNorm));
    per_position(t, pos);
    t.end_forward();
}

fn rows_of(start: usize, rows: usize, f: impl Fn(usize) -> Vec<f32>) -> Vec<f32> {
    (start..start + rows).flat_map(f).collect()
}

fn batched(t: &mut ModelTracer<Full>, start: usize, rows: usize) {
    t.begin_forward_rows(start, rows);
    let tokens: Vec<u32> = (start..start + rows).map(|p| 100 + p as u32).collect();
    t.input_tokens(&tokens);
    t.activation(
        0,
        Stage::Embedding,
        &rows_of(start, rows, |p| vector(p, 0, Stage::Embedding)),
    );
    for layer in 0..LAYERS {
        for s in Stage::LAYER_STAGES {
            t.activation(layer, s, &rows_of(start, rows, |p| vector(p, layer, s)));
        }
        t.residual(
            layer,
            &rows_of(start, rows, |p| vector(p, layer, Stage::Input)),
            &rows_of(start, rows, |p| vector(p, layer, Stage::PostAttn)),
        );
        // causal rows, stride start + rows, row i attends start + i + 1
        let stride = start + rows;
        for h in 0..HEADS {
            let mut w = vec![f32::NAN; rows * stride];
            for i in 0..rows {
                let row = softmax_row(start + i, layer, h);
                w[i * stride..i * stride + row.len()].copy_from_slice(&row);
            }
            t.attention_rows(layer, h, &w, start + 1);
        }
    }
    t.activation(
        0,
        Stage::FinalNorm,
        &rows_of(start, rows, |p| vector(p, 0, Stage::FinalNorm)),
    );
    // per-position records in an order other than the rows'
    for i in (0..rows).rev() {
        t.focus_row(i);
        per_position(t, start + i);
    }
    t.end_forward();
}

#[test]
fn a_forward_of_many_rows_records_what_forwards_of_one_position_record() {
    let (mut one, one_out) = tracer();
    let (mut many, many_out) = tracer();
    let mut first_anomalies = Vec::new();
    for pos in 0..9 {
        single(&mut one, pos);
        first_anomalies.push(
            one.last_forward()
                .and_then(|f| f.primary_anomaly().copied()),
        );
    }
    // 9 positions as 1 + 4 + 3 + 1 rows: max_forwards (5) is exceeded by
    // the retained ones plus a forward's rows.
    for (start, rows) in [(0, 1), (1, 4), (5, 3), (8, 1)] {
        batched(&mut many, start, rows);
    }
    let a: Vec<_> = one.forwards().cloned().collect();
    let b: Vec<_> = many.forwards().cloned().collect();
    assert_eq!(a.len(), 5, "max_forwards counts positions");
    // Debug text: equal bits, NaN included (a NaN fingerprint is not `==` itself).
    let debug = |f: &[model_tracer::ForwardTrace]| -> Vec<String> {
        f.iter().map(|f| format!("{f:?}")).collect()
    };
    assert_eq!(debug(&a), debug(&b));
    assert_eq!(
        format!("{:?}", one.aggregates()),
        format!("{:?}", many.aggregates())
    );
    assert_eq!(
        format!("{:?}", one.kv_session()),
        format!("{:?}", many.kv_session())
    );
    assert_eq!(format!("{}", one.summary()), format!("{}", many.summary()));
    let text = |s: &Shared| String::from_utf8(s.0.lock().unwrap().clone()).unwrap();
    assert_eq!(text(&one_out).lines().count(), 9);
    assert_eq!(
        text(&one_out),
        text(&many_out),
        "one JSONL row per position"
    );
    // The anomalies are those of their positions.
    let five = &b[1];
    assert_eq!(five.position, 5);
    let nan = five.primary_anomaly().unwrap();
    assert_eq!(
        (nan.kind, nan.layer, nan.stage),
        (AnomalyKind::NaN, Some(2), Stage::PostFfn)
    );
    assert!(
        first_anomalies[3].is_some_and(|a| a.kind == AnomalyKind::Explosion && a.layer == Some(3))
    );
}

#[test]
fn end_forward_returns_the_first_rows_anomaly() {
    let (mut many, _) = tracer();
    many.begin_forward_rows(2, 5);
    for layer in 0..LAYERS {
        for s in Stage::LAYER_STAGES {
            many.activation(layer, s, &rows_of(2, 5, |p| vector(p, layer, s)));
        }
    }
    let a = many
        .end_forward()
        .expect("positions 3 and 5 have anomalies");
    assert_eq!(a.position, 3);
    assert_eq!(a.kind, AnomalyKind::Explosion);
    let positions: Vec<usize> = many.forwards().map(|f| f.position).collect();
    assert_eq!(positions, [2, 3, 4, 5, 6]);
}

#[test]
fn only_the_selected_rows_want_logits() {
    let mut last = ModelTracer::new(Full);
    last.begin_forward_rows(0, 3);
    assert_eq!(
        (0..3).map(|r| last.wants_logits(r)).collect::<Vec<_>>(),
        [false, false, true]
    );
    last.end_forward();
    last.begin_forward(3);
    assert!(last.wants_logits(0));
    let (every, _) = tracer();
    let mut every = every;
    every.begin_forward_rows(0, 3);
    assert!((0..3).all(|r| every.wants_logits(r)));
    assert!(!every.wants_logits(3));
    let mut off = ModelTracer::new(model_tracer::Disabled);
    off.begin_forward_rows(0, 3);
    assert!(!off.wants_logits(2));
}

#[cfg(feature = "dump")]
#[test]
fn a_dump_of_a_forward_of_many_rows_has_one_row_per_position() {
    use model_tracer::{DumpFilter, DumpRecorder};
    let filter = DumpFilter {
        positions: Some(2..7),
        ..DumpFilter::default()
    };
    let (mut one, _) = tracer();
    let (mut many, _) = tracer();
    one.set_dump(Some(DumpRecorder::new(filter.clone())));
    many.set_dump(Some(DumpRecorder::new(filter)));
    for pos in 0..9 {
        single(&mut one, pos);
    }
    for (start, rows) in [(0, 3), (3, 5), (8, 1)] {
        batched(&mut many, start, rows);
    }
    let (a, b) = (one.take_dump().unwrap(), many.take_dump().unwrap());
    assert_eq!(b.positions(), &[2, 3, 4, 5, 6]);
    assert_eq!(a.tokens(), b.tokens());
    let names: Vec<String> = a.tensors().map(|v| v.name()).collect();
    assert_eq!(names, b.tensors().map(|v| v.name()).collect::<Vec<_>>());
    for (x, y) in a.tensors().zip(b.tensors()) {
        for r in 0..5 {
            let bits =
                |v: Option<&[f32]>| v.map(|v| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>());
            assert_eq!(bits(x.row(r)), bits(y.row(r)), "{} row {r}", x.name());
        }
    }
    assert_eq!(a.to_bytes(), b.to_bytes());
}

#[test]
fn hostile_row_counts_and_buffers_record_without_panicking() {
    let (mut t, _) = tracer();
    // More rows than MAX_FORWARD_ROWS, and rows past usize::MAX.
    t.begin_forward_rows(0, usize::MAX);
    t.activation(0, Stage::Input, &[1.0, 2.0, 3.0]);
    t.residual(0, &[1.0; 7], &[2.0; 5]);
    t.attention_rows(0, 0, &[0.5; 3], usize::MAX);
    t.focus_row(usize::MAX);
    t.logit_lens_layers(&[0; 5000], 4, |_| panic!("more layers than MAX_LAYERS"));
    t.end_forward();
    assert_eq!(t.forwards().count(), 5, "max_forwards keeps the last rows");
    t.begin_forward_rows(usize::MAX - 1, 10);
    t.input_tokens(&[1, 2, 3]);
    t.attention_rows(0, 0, &[1.0; 4], 1);
    t.end_forward();
    // The positions of a forward end before usize::MAX: one row here.
    let positions: Vec<usize> = t.forwards().map(|f| f.position).collect();
    assert_eq!(&positions[3..], [65_535, usize::MAX - 1]);
    assert_eq!(model_tracer::tracer::MAX_FORWARD_ROWS, 1 << 16);
}
