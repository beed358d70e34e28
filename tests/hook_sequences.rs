//! Random sequences of hook calls on `ModelTracer<Full>` and
//! `ModelTracer<Lightweight>`: forwards begun and ended in any order (or
//! not at all), layer and head indices out of range up to `usize::MAX`,
//! slices of any length holding NaN and Inf, logit-lens rows of
//! mismatched widths, and arbitrary forwards replayed. Nothing may panic,
//! no hook may grow a record to the length of a huge index, and the
//! summary must agree with what the tracer retained.

use model_tracer::tracer::{MAX_BUFFER_LEN, MAX_HEADS, MAX_LAYERS};
use model_tracer::{
    Anomaly, AnomalyKind, AttentionWeightTrace, BrickId, ForwardTrace, Full, KvCacheStateTrace,
    LayerActivationTrace, Lightweight, LogitEvolutionTrace, ModelTracer, Origin, QuantType,
    QuantizationErrorTrace, Stage, TensorStats, TokenLogitEvolution, TraceConfig, TraceOptions,
};
use proptest::prelude::*;

/// Forwards retained in detail: small, so that forwards whose records
/// reach the largest layer index (about 1.2 MiB each) stay cheap.
const RETAINED: usize = 6;

#[derive(Debug, Clone)]
enum Call {
    Begin(usize),
    End,
    Token(u32),
    Activation(usize, Stage, Vec<f32>),
    Residual(usize, Vec<f32>, Vec<f32>),
    Attention(usize, usize, usize, Vec<f32>),
    /// Layer, declared vocabulary, and the value written into the row.
    Lens(usize, usize, f32),
    FinalLogits(Vec<f32>),
    Selected(u32),
    /// Brick, layer, type, the quantized output, and the value the
    /// reference closure writes.
    Quant(BrickId, usize, QuantType, Vec<f32>, f32),
    /// Brick, layer, type, declared length.
    WhatIf(BrickId, usize, QuantType, usize),
    Kv(KvCacheStateTrace),
    Replay(Box<ForwardTrace>),
}

/// Layer or head indices: mostly small, sometimes at the bounds or huge.
fn index() -> impl Strategy<Value = usize> {
    prop_oneof![
        8 => 0usize..6,
        1 => Just(MAX_LAYERS - 1),
        1 => Just(MAX_LAYERS),
        1 => Just(1_000_000_000_000usize),
        1 => Just(usize::MAX),
    ]
}

/// Counts and positions: anything, the extremes often.
fn count() -> impl Strategy<Value = usize> {
    prop_oneof![4 => 0usize..40, 1 => Just(usize::MAX), 1 => any::<usize>()]
}

fn value() -> impl Strategy<Value = f32> {
    prop_oneof![
        6 => -100.0f32..100.0,
        1 => Just(f32::NAN),
        1 => Just(f32::INFINITY),
        1 => Just(f32::NEG_INFINITY),
        1 => Just(3e38f32),
        1 => Just(0.0f32),
        1 => Just(1e-40f32),
    ]
}

fn values() -> impl Strategy<Value = Vec<f32>> {
    prop::collection::vec(value(), 0..12)
}

fn stage() -> impl Strategy<Value = Stage> {
    prop::sample::select(Stage::ALL.to_vec())
}

fn brick() -> impl Strategy<Value = BrickId> {
    prop::sample::select(BrickId::ALL.to_vec())
}

fn quant_type() -> impl Strategy<Value = QuantType> {
    prop::sample::select(QuantType::ALL.to_vec())
}

/// A length a caller declares: small, or beyond what any hook allocates.
fn declared_len() -> impl Strategy<Value = usize> {
    prop_oneof![6 => 0usize..10, 1 => Just(MAX_BUFFER_LEN + 1), 1 => Just(usize::MAX)]
}

fn stats() -> impl Strategy<Value = TensorStats> {
    (
        count(),
        value(),
        value(),
        value(),
        value(),
        value(),
        count(),
        count(),
    )
        .prop_map(
            |(count, min, max, mean, std, l2_norm, nan_count, inf_count)| TensorStats {
                count,
                min,
                max,
                mean,
                std,
                l2_norm,
                nan_count,
                inf_count,
            },
        )
}

fn kv_state() -> impl Strategy<Value = KvCacheStateTrace> {
    (
        count(),
        count(),
        count(),
        count(),
        value(),
        count(),
        count(),
        count(),
    )
        .prop_map(
            |(step, max, valid, bytes, hit, ev, reused, computed)| KvCacheStateTrace {
                step,
                max_positions: max,
                valid_positions: valid,
                cache_size_bytes: bytes,
                cache_hit_rate: hit,
                evictions_this_step: ev,
                reused_positions: reused,
                computed_positions: computed,
            },
        )
}

fn quant_trace() -> impl Strategy<Value = QuantizationErrorTrace> {
    (brick(), index(), quant_type(), values(), values()).prop_map(|(b, layer, qt, q, r)| {
        let n = q.len().min(r.len());
        QuantizationErrorTrace::compute(b, layer, &q[..n], &r[..n], qt)
    })
}

/// Any forward, as another process or a corrupted trace could hand one to
/// `replay_forward`: layer entries whose index disagrees with their
/// place, records of huge layers and heads, counts at `usize::MAX`.
fn forward() -> impl Strategy<Value = ForwardTrace> {
    let layers = prop::collection::vec((index(), prop::collection::vec(stats(), 6), value()), 0..4);
    let attention = prop::collection::vec(
        (index(), index(), count(), count(), values(), value()),
        0..3,
    );
    let lens = prop::option::of(prop::collection::vec(
        (
            any::<u32>(),
            prop::collection::vec((index(), count(), value()), 0..4),
        ),
        0..3,
    ));
    let anomalies = prop::collection::vec(
        (
            prop::option::of(index()),
            stage(),
            prop::sample::select(AnomalyKind::ALL.to_vec()),
            any::<bool>(),
            count(),
            value(),
        ),
        0..4,
    );
    (
        (count(), prop::option::of(any::<u32>()), stats(), layers),
        (attention, lens, anomalies),
        (
            prop::collection::vec(quant_trace(), 0..3),
            prop::collection::vec(quant_trace(), 0..2),
            prop::option::of(kv_state()),
        ),
    )
        .prop_map(
            |(
                (position, token, embedding, layers),
                (attention, lens, anomalies),
                (quant, what_if, kv),
            )| {
                let mut f = ForwardTrace {
                    position,
                    token,
                    ..ForwardTrace::default()
                };
                f.activations.embedding_stats = embedding;
                for (i, (layer_idx, s, ratio)) in layers.into_iter().enumerate() {
                    let mut l = LayerActivationTrace::new(if i == 1 { layer_idx } else { i });
                    for (stage, st) in Stage::LAYER_STAGES.into_iter().zip(s) {
                        if let Some(slot) = l.stats_mut(stage) {
                            *slot = st;
                        }
                    }
                    l.residual_ratio = ratio;
                    f.activations.layers.push(l);
                }
                f.attention = attention
                    .into_iter()
                    .map(|(layer_idx, head_idx, query_pos, context_len, w, e)| {
                        AttentionWeightTrace {
                            layer_idx,
                            head_idx,
                            query_pos,
                            context_len,
                            top_k_positions: (0..w.len()).collect(),
                            top_k_weights: w,
                            tail_mass: e,
                            entropy: e,
                            sink_weight: e,
                            nan_count: 0,
                        }
                    })
                    .collect();
                f.logits = lens.map(|tokens| {
                    let mut lt = LogitEvolutionTrace::new(position, 1.0, 1.0);
                    for (id, entries) in tokens {
                        let mut t = TokenLogitEvolution::new(id, String::new());
                        for (layer, rank, logit) in entries {
                            t.record_layer(logit, rank);
                            t.layers.push(layer);
                        }
                        lt.tokens.push(t);
                    }
                    lt.selected_token = token;
                    lt
                });
                f.anomalies = anomalies
                    .into_iter()
                    .map(|(layer, stage, kind, produced, count, value)| Anomaly {
                        position,
                        layer,
                        stage,
                        kind,
                        origin: if produced {
                            Origin::Produced
                        } else {
                            Origin::Propagated
                        },
                        count,
                        total: count,
                        value,
                    })
                    .collect();
                f.quantization.traces = quant;
                f.what_if = what_if;
                f.kv_cache = kv;
                f
            },
        )
}

fn call() -> impl Strategy<Value = Call> {
    prop_oneof![
        3 => count().prop_map(Call::Begin),
        3 => Just(Call::End),
        1 => any::<u32>().prop_map(Call::Token),
        6 => (index(), stage(), values()).prop_map(|(l, s, x)| Call::Activation(l, s, x)),
        2 => (index(), values(), values()).prop_map(|(l, r, u)| Call::Residual(l, r, u)),
        2 => (index(), index(), count(), values()).prop_map(|(l, h, q, w)| Call::Attention(l, h, q, w)),
        2 => (index(), declared_len(), value()).prop_map(|(l, v, x)| Call::Lens(l, v, x)),
        2 => values().prop_map(Call::FinalLogits),
        1 => any::<u32>().prop_map(Call::Selected),
        2 => (brick(), index(), quant_type(), values(), value())
            .prop_map(|(b, l, t, q, r)| Call::Quant(b, l, t, q, r)),
        1 => (brick(), index(), quant_type(), declared_len())
            .prop_map(|(b, l, t, n)| Call::WhatIf(b, l, t, n)),
        1 => kv_state().prop_map(Call::Kv),
        1 => forward().prop_map(|f| Call::Replay(Box::new(f))),
    ]
}

/// What the calls should leave in the session, counted independently of
/// the tracer.
#[derive(Debug, Default)]
struct Expected {
    in_forward: bool,
    completed: usize,
    positions: Vec<usize>,
    kv_steps: usize,
}

impl Expected {
    fn end(&mut self, position: usize) {
        self.completed += 1;
        self.positions.push(position);
        self.in_forward = false;
    }
}

fn apply<C: TraceConfig>(t: &mut ModelTracer<C>, calls: &[Call]) -> Expected {
    let mut e = Expected::default();
    let mut current = 0;
    for c in calls {
        match c.clone() {
            Call::Begin(p) => {
                if e.in_forward {
                    e.end(current);
                }
                t.begin_forward(p);
                current = p;
                e.in_forward = true;
            }
            Call::End => {
                t.end_forward();
                if e.in_forward {
                    e.end(current);
                }
            }
            Call::Token(id) => t.input_token(id),
            Call::Activation(l, s, x) => t.activation(l, s, &x),
            Call::Residual(l, r, u) => t.residual(l, &r, &u),
            Call::Attention(l, h, q, w) => t.attention(l, h, q, &w),
            Call::Lens(l, vocab, x) => t.logit_lens(l, vocab, |row| {
                assert_eq!(row.len(), vocab, "the lens row has the declared width");
                row.fill(x);
            }),
            Call::FinalLogits(x) => t.final_logits(&x),
            Call::Selected(id) => t.selected_token(id),
            Call::Quant(b, l, qt, q, r) => t.quant_error(b, l, qt, &q, |out| {
                assert_eq!(out.len(), q.len());
                out.fill(r);
            }),
            Call::WhatIf(b, l, qt, n) => t.what_if(b, l, qt, n, |cand, reference| {
                assert_eq!((cand.len(), reference.len()), (n, n));
                cand.fill(1.0);
            }),
            Call::Kv(state) => {
                t.kv_state(|| state);
                e.kv_steps += 1;
            }
            Call::Replay(f) => {
                if e.in_forward {
                    e.end(current);
                }
                e.kv_steps += usize::from(f.kv_cache.is_some());
                let p = f.position;
                t.replay_forward(*f);
                e.end(p);
            }
        }
    }
    e
}

/// Every record a retained forward holds is of a layer (and head) in range.
fn assert_in_range(f: &ForwardTrace) {
    assert!(f.activations.layers.len() <= MAX_LAYERS);
    for (layer, _, _) in f.activations.recorded() {
        assert!(layer.is_none_or(|l| l < MAX_LAYERS), "{layer:?}");
    }
    for a in &f.attention {
        assert!(a.layer_idx < MAX_LAYERS && a.head_idx < MAX_HEADS, "{a:?}");
    }
    for q in f.quantization.traces.iter().chain(&f.what_if) {
        assert!(q.layer_idx < MAX_LAYERS, "{q:?}");
    }
    for a in &f.anomalies {
        assert!(a.layer.is_none_or(|l| l < MAX_LAYERS), "{a:?}");
    }
    for t in f.logits.iter().flat_map(|l| &l.tokens) {
        for i in 0..t.ranks.len() {
            assert!(t.layer_at(i) <= MAX_LAYERS, "{t:?}");
        }
    }
}

fn check<C: TraceConfig>(config: C, calls: &[Call]) -> ModelTracer<C> {
    let options = TraceOptions {
        max_forwards: RETAINED,
        ..TraceOptions::default()
    };
    let mut t = ModelTracer::with_options(config, options);
    let e = apply(&mut t, calls);
    let s = t.summary();
    let retained: Vec<&ForwardTrace> = t.forwards().collect();

    assert_eq!(s.forwards, e.completed, "completed forwards");
    // A forward in flight takes the place of the oldest retained one (its
    // buffers are reused).
    let places = RETAINED - usize::from(e.in_forward);
    assert_eq!(retained.len(), e.completed.min(places));
    assert_eq!(
        s.positions,
        e.positions
            .first()
            .copied()
            .zip(e.positions.last().copied())
    );
    let tail = &e.positions[e.positions.len() - retained.len()..];
    let kept: Vec<usize> = retained.iter().map(|f| f.position).collect();
    assert_eq!(kept, tail, "the last forwards are retained, in order");
    assert_eq!(s.kv_cache.map_or(0, |k| k.steps), e.kv_steps);
    retained.iter().for_each(|f| assert_in_range(f));
    assert!(s.layers.len() <= MAX_LAYERS);
    assert!(s
        .heads
        .iter()
        .all(|h| h.layer < MAX_LAYERS && h.head < MAX_HEADS));

    if retained.len() == e.completed {
        // Nothing evicted: the session counts are those of the forwards.
        for k in AnomalyKind::ALL {
            let held: usize = retained
                .iter()
                .map(|f| f.anomalies.iter().filter(|a| a.kind == k).count())
                .sum();
            assert_eq!(s.anomaly_counts[k as usize], held, "{k}");
        }
        let first = retained.iter().find_map(|f| f.primary_anomaly().copied());
        assert_eq!(
            s.first_anomaly
                .map(|a| (a.position, a.layer, a.stage, a.kind)),
            first.map(|a| (a.position, a.layer, a.stage, a.kind))
        );
        let attention: usize = retained.iter().map(|f| f.attention.len()).sum();
        let folded: usize = s.heads.iter().map(|h| h.records).sum();
        assert_eq!(folded, attention, "attention records folded");
        let quant: usize = retained.iter().map(|f| f.quantization.traces.len()).sum();
        let folded: usize = s.bricks.iter().map(|b| b.samples).sum();
        assert_eq!(folded, quant, "quantization records folded");
    }
    let _ = s.to_string();
    t
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn full_survives_any_hook_sequence(calls in prop::collection::vec(call(), 0..40)) {
        check(Full, &calls);
    }

    #[test]
    fn lightweight_survives_any_hook_sequence(calls in prop::collection::vec(call(), 0..40)) {
        let t = check(Lightweight, &calls);
        for f in t.forwards() {
            prop_assert!(f.attention.is_empty() && f.logits.is_none());
            prop_assert!(f.quantization.traces.is_empty() && f.what_if.is_empty());
        }
    }
}

#[cfg(feature = "serde")]
mod written_traces_read_back {
    use super::*;
    use model_tracer::read::JsonlReader;
    use model_tracer::{JsonlSink, SinkHandle};
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            if let Ok(mut v) = self.0.lock() {
                v.extend_from_slice(b);
            }
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// Whatever the hooks were given, the trace the sink writes reads
        /// back, a row per completed forward, and renders as a report.
        #[test]
        fn every_written_row_reads_back(calls in prop::collection::vec(call(), 0..30)) {
            let out = Shared::default();
            let mut t = ModelTracer::with_options(Full, TraceOptions {
                max_forwards: RETAINED,
                ..TraceOptions::default()
            });
            t.set_sink(Some(SinkHandle::new(JsonlSink::new(out.clone()))));
            let e = apply(&mut t, &calls);
            let bytes = out.0.lock().map(|v| v.clone()).unwrap_or_default();
            let rows: Result<Vec<_>, _> = JsonlReader::new(&bytes[..]).collect();
            let rows = match rows {
                Ok(rows) => rows,
                Err(err) => return Err(TestCaseError::fail(format!("{err}"))),
            };
            prop_assert_eq!(rows.len(), e.completed);
            let positions: Vec<usize> = rows.iter().map(|r| r.forward.position).collect();
            prop_assert_eq!(positions, e.positions);
            let input = model_tracer::ReportInput::from_tracer(&t, Default::default());
            let mut page = Vec::new();
            prop_assert!(model_tracer::write_html(&mut page, &input).is_ok());
        }
    }
}

/// A layer index of 10^12 would grow a forward's per-layer records to
/// 10^12 entries: the hooks ignore it, whatever the stage or system.
#[test]
fn huge_layer_indices_allocate_nothing_per_layer() {
    for huge in [MAX_LAYERS, 1_000_000_000_000, usize::MAX] {
        let mut t = ModelTracer::new(Full);
        t.begin_forward(0);
        t.activation(huge, Stage::Output, &[1.0, 2.0]);
        t.residual(huge, &[1.0], &[1.0]);
        t.attention(huge, 0, 0, &[1.0]);
        t.attention(0, huge, 0, &[1.0]);
        t.logit_lens(huge, 2, |row| row.fill(1.0));
        t.quant_error(BrickId::FfnUp, huge, QuantType::Q4_0, &[1.0], |r| {
            r[0] = 1.0
        });
        t.what_if(BrickId::FfnUp, huge, QuantType::Q8_0, 2, |c, r| {
            c.fill(1.0);
            r.fill(1.0);
        });
        t.record_layer_activation(LayerActivationTrace::new(huge));
        t.activation(1, Stage::Input, &[3.0]);
        t.final_logits(&[0.0, 1.0]);
        t.end_forward();
        let f = t.last_forward().expect("a forward");
        assert_eq!(f.activations.layers.len(), 2, "layers 0 and 1 only");
        assert!(f.attention.is_empty() && f.what_if.is_empty());
        assert!(f.quantization.traces.is_empty());
        // The final logits are placed after the last layer seen (1), not
        // after the huge one.
        let lens = f.logits.as_ref().expect("logit ranks");
        assert_eq!(lens.tokens[0].layers, [2]);
        assert_eq!(t.summary().layers.len(), 2);
    }
    // The last layer in range is recorded.
    let mut t = ModelTracer::new(Lightweight);
    t.begin_forward(0);
    t.activation(MAX_LAYERS - 1, Stage::Output, &[1.0]);
    t.end_forward();
    let f = t.last_forward().expect("a forward");
    assert_eq!(f.activations.layers.len(), MAX_LAYERS);
    assert_eq!(f.activations.layers[MAX_LAYERS - 1].output_stats.count, 1);
}

/// A replayed forward naming huge layers and heads is folded without its
/// out-of-range records, and the summary does not grow to their length.
#[test]
fn replayed_huge_indices_are_dropped() {
    let mut f = ForwardTrace::default();
    let mut l = LayerActivationTrace::new(usize::MAX);
    l.output_stats = TensorStats::from_slice(&[1.0]);
    f.activations.layers.push(l);
    f.attention.push(AttentionWeightTrace {
        head_idx: usize::MAX,
        ..AttentionWeightTrace::default()
    });
    f.quantization.traces.push(QuantizationErrorTrace::compute(
        BrickId::FfnUp,
        usize::MAX,
        &[1.0],
        &[1.0],
        QuantType::Q4_0,
    ));
    let mut t = ModelTracer::new(Full);
    t.replay_forward(f);
    let kept = t.last_forward().expect("the replayed forward");
    assert_eq!(kept.activations.layers.len(), 1);
    assert_eq!(kept.activations.layers[0].layer_idx, 0);
    assert_eq!(kept.activations.layers[0].output_stats.count, 0);
    assert!(kept.attention.is_empty() && kept.quantization.traces.is_empty());
    let s = t.summary();
    assert_eq!(s.forwards, 1);
    assert!(s.layers.is_empty() && s.heads.is_empty() && s.bricks.is_empty());
}

/// Lens rows of another width than the first one of a forward are not
/// ranked against it; rows wider than `MAX_BUFFER_LEN` are never filled.
#[test]
fn mismatched_and_huge_lens_widths_are_ignored() {
    let mut t = ModelTracer::new(Full);
    t.begin_forward(0);
    let mut filled = 0;
    t.logit_lens(0, 3, |row| {
        filled += 1;
        row.copy_from_slice(&[1.0, 3.0, 2.0]);
    });
    t.logit_lens(1, 5, |_| filled += 1);
    t.logit_lens(2, MAX_BUFFER_LEN + 1, |_| filled += 1);
    t.logit_lens(3, usize::MAX, |_| filled += 1);
    t.final_logits(&[1.0, 3.0, 2.0]);
    t.end_forward();
    assert_eq!(filled, 1);
    let lens = t.last_forward().and_then(|f| f.logits.as_ref());
    let top = lens.and_then(|l| l.token(1)).expect("token 1 tracked");
    assert_eq!(top.layers, [0]);
    assert_eq!(top.ranks, [0]);
}
