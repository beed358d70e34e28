//! Fleet metrics: a tiny hand-made model traced with the metrics sink, the
//! families read back from the exported text.
#![cfg(feature = "metrics")]

use std::collections::{BTreeMap, BTreeSet};
use std::io;

use model_tracer::metrics::{
    first_corruption, MetricsOptions, MetricsSink, Tee, TraceMetrics, DEFAULT_WEIGHT, NO_LAYER,
};
use model_tracer::{
    Anomaly, AnomalyKind, BatchRow, ForwardSink, ForwardTrace, Full, KvCacheStateTrace,
    Lightweight, ModelTracer, Origin, SequenceId, SinkHandle, Stage, TraceConfig,
};
use prometheus_client::registry::Registry;

#[global_allocator]
static COUNTING: model_tracer_test_support::CountingAllocator =
    model_tracer_test_support::CountingAllocator;

const LAYERS: usize = 5;
const DIM: usize = 8;
const HEADS: usize = 2;
const VOCAB: usize = 16;
/// The token the final logits choose.
const CHOSEN: usize = 5;
/// Rank of `CHOSEN` in the lens at each layer: it drops most (log scale)
/// at layer 3, the decisive layer.
const LENS_RANKS: [usize; LAYERS] = [10, 10, 3, 0, 0];
/// Positions the KV cache holds; each later position evicts one.
const CTX: usize = 4;
/// Series of a (layer, stage) family when every stage is traced.
const SITES: usize = LAYERS * 6 + 3;

fn rms_norm(x: &[f32]) -> Vec<f32> {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let r = 1.0 / (ms + 1e-5).sqrt();
    x.iter().map(|v| v * r).collect()
}

/// Head `head`'s softmax row at `pos`: weight `0.5` (head 0) or `0.3`
/// (head 1) on position 0, the rest spread evenly.
fn softmax_row(pos: usize, head: usize) -> Vec<f32> {
    if pos == 0 {
        return vec![1.0];
    }
    let sink = if head == 0 { 0.5 } else { 0.3 };
    let mut row = vec![(1.0 - sink) / pos as f32; pos + 1];
    row[0] = sink;
    row
}

/// Logits ranking `CHOSEN` at `rank`: the other tokens hold their own ids.
fn lens_logits(rank: usize, out: &mut [f32]) {
    for (j, v) in out.iter_mut().enumerate() {
        *v = j as f32;
    }
    out[CHOSEN] = 15.5 - rank as f32;
}

/// One forward of a five-layer model of width 8, every hook of every
/// system; `nan_at` plants a NaN in that layer's attention output.
fn tiny_forward<C: TraceConfig>(t: &mut ModelTracer<C>, pos: usize, nan_at: Option<usize>) {
    t.begin_forward(pos);
    t.input_token(pos as u32 + 100);
    let mut x: Vec<f32> = (0..DIM)
        .map(|i| ((pos * 7 + i) % 5) as f32 * 0.3 - 0.5)
        .collect();
    t.activation(0, Stage::Embedding, &x);
    for (layer, &lens_rank) in LENS_RANKS.iter().enumerate() {
        t.activation(layer, Stage::Input, &x);
        let norm = rms_norm(&x);
        t.activation(layer, Stage::PostNorm, &norm);
        let mut attn: Vec<f32> = norm.iter().map(|v| 0.5 * v.tanh()).collect();
        if nan_at == Some(layer) {
            attn[2] = f32::NAN;
        }
        t.activation(layer, Stage::PostAttn, &attn);
        for head in 0..HEADS {
            t.attention(layer, head, pos, &softmax_row(pos, head));
        }
        t.residual(layer, &x, &attn);
        x.iter_mut().zip(&attn).for_each(|(a, b)| *a += b);
        let norm = rms_norm(&x);
        t.activation(layer, Stage::PostFfnNorm, &norm);
        let ffn: Vec<f32> = norm.iter().map(|v| 0.25 * v * v - 0.1).collect();
        t.activation(layer, Stage::PostFfn, &ffn);
        t.residual(layer, &x, &ffn);
        x.iter_mut().zip(&ffn).for_each(|(a, b)| *a += b);
        t.activation(layer, Stage::Output, &x);
        t.logit_lens(layer, VOCAB, |out| lens_logits(lens_rank, out));
    }
    t.activation(0, Stage::FinalNorm, &rms_norm(&x));
    let mut logits = vec![0.0; VOCAB];
    lens_logits(0, &mut logits);
    logits[CHOSEN] = 100.0;
    t.final_logits(&logits);
    t.kv_state(|| {
        let mut kv = KvCacheStateTrace::new(pos, CTX);
        kv.valid_positions = (pos + 1).min(CTX);
        kv.evictions_this_step = usize::from(pos >= CTX);
        kv
    });
    t.end_forward();
}

/// A sample of the exported text.
#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// The samples of OpenMetrics text (the label values this crate writes
/// hold no quote, comma or brace).
fn samples(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').expect("a sample has a value");
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => {
                    let inner = rest.strip_suffix('}').expect("labels end with a brace");
                    let labels = inner
                        .split(',')
                        .map(|kv| {
                            let (k, v) = kv.split_once('=').expect("key=value");
                            (k.to_string(), v.trim_matches('"').to_string())
                        })
                        .collect();
                    (name, labels)
                }
                None => (series, BTreeMap::new()),
            };
            Sample {
                name: name.to_string(),
                labels,
                value: value.parse().expect("a number"),
            }
        })
        .collect()
}

fn text(registry: &Registry) -> String {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry).expect("encodes");
    out
}

fn series<'a>(all: &'a [Sample], name: &str) -> Vec<&'a Sample> {
    all.iter().filter(|s| s.name == name).collect()
}

/// The value of the sample `name` whose labels are exactly `labels`.
fn value(all: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let want: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    all.iter()
        .find(|s| s.name == name && s.labels == want)
        .map(|s| s.value)
}

fn traced_with(sink: &MetricsSink) -> ModelTracer<Full> {
    let mut t = ModelTracer::new(Full);
    t.set_sink(Some(SinkHandle::new(sink.clone())));
    t
}

#[test]
fn a_nan_at_layer_3_is_counted_where_it_was_produced() {
    let mut registry = Registry::default();
    let metrics = TraceMetrics::register(&mut registry);
    let sink = metrics.sink();
    let mut t = traced_with(&sink);
    for pos in 0..6 {
        tiny_forward(&mut t, pos, (pos == 2 || pos == 4).then_some(3));
    }
    let s = samples(&text(&registry));
    assert_eq!(value(&s, "model_tracer_forwards_total", &[]), Some(6.0));
    // One NaN anomaly per poisoned forward, at its origin only: layer 4
    // and the final norm carry it too, but were not where it arose.
    let nan = [("kind", "nan"), ("layer", "3"), ("stage", "post_attn")];
    assert_eq!(value(&s, "model_tracer_anomalies_total", &nan), Some(2.0));
    let anomalies = series(&s, "model_tracer_anomalies_total");
    assert_eq!(anomalies.len(), 1, "{anomalies:?}");
    // The request has not ended: nothing is counted as corrupted yet.
    assert!(series(&s, "model_tracer_requests_corrupted_total").is_empty());
    assert_eq!(value(&s, "model_tracer_requests_total", &[]), Some(0.0));
    let kept = sink.corruption().expect("the sink saw the NaN");
    assert_eq!(
        (kept.layer, kept.stage, kept.position),
        (Some(3), Stage::PostAttn, 2)
    );

    sink.finish_request();
    let s = samples(&text(&registry));
    let origin = [("origin_layer", "3"), ("origin_stage", "post_attn")];
    assert_eq!(
        value(&s, "model_tracer_requests_corrupted_total", &origin),
        Some(1.0)
    );
    assert_eq!(series(&s, "model_tracer_requests_corrupted_total").len(), 1);
    assert_eq!(value(&s, "model_tracer_requests_total", &[]), Some(1.0));
    assert!(sink.corruption().is_none(), "finishing forgets the request");

    // The next request on the same tracer and sink is clean.
    t.clear();
    for pos in 0..3 {
        tiny_forward(&mut t, pos, None);
    }
    sink.finish_request();
    let s = samples(&text(&registry));
    assert_eq!(value(&s, "model_tracer_requests_total", &[]), Some(2.0));
    assert_eq!(
        value(&s, "model_tracer_requests_corrupted_total", &origin),
        Some(1.0)
    );
    assert_eq!(value(&s, "model_tracer_anomalies_total", &nan), Some(2.0));
}

#[test]
fn the_request_end_call_takes_the_produced_anomaly_of_a_summary_or_of_forwards() {
    let mut registry = Registry::default();
    let metrics = TraceMetrics::register(&mut registry);
    let mut t = ModelTracer::new(Full);
    for pos in 0..3 {
        tiny_forward(&mut t, pos, (pos == 1).then_some(3));
    }
    // A single-sequence program: the summary's first anomaly, or the
    // first corruption among the retained forwards.
    let summary = t.summary();
    let first = summary.first_anomaly.expect("the NaN");
    assert_eq!(first.origin, Origin::Produced);
    let place = |a: &Anomaly| (a.position, a.layer, a.stage, a.kind, a.origin);
    let from_forwards = first_corruption(t.forwards().flat_map(|f| &f.anomalies)).map(place);
    assert_eq!(from_forwards, Some(place(&first)));
    metrics.request_finished(Some(&first));
    // An anomaly that is not a NaN or Inf leaves the request clean, and
    // one beyond the layers a trace may have is counted without a label.
    let explosion = Anomaly {
        kind: AnomalyKind::Explosion,
        ..first
    };
    metrics.request_finished(Some(&explosion));
    metrics.request_finished(None);
    let far = Anomaly {
        layer: Some(usize::MAX),
        ..first
    };
    metrics.request_finished(Some(&far));
    let s = samples(&text(&registry));
    assert_eq!(value(&s, "model_tracer_requests_total", &[]), Some(4.0));
    let corrupted = series(&s, "model_tracer_requests_corrupted_total");
    assert_eq!(corrupted.len(), 1);
    assert_eq!(corrupted[0].labels["origin_layer"], "3");
    assert_eq!(corrupted[0].labels["origin_stage"], "post_attn");
    assert_eq!(corrupted[0].value, 1.0);
    // The metrics were not the tracer's sink: no forward was folded.
    assert_eq!(metrics.forwards(), 0);
}

#[test]
fn first_corruption_prefers_a_produced_value_and_ignores_other_kinds() {
    let base = Anomaly {
        position: 0,
        layer: Some(1),
        stage: Stage::PostFfn,
        kind: AnomalyKind::Explosion,
        origin: Origin::Produced,
        count: 8,
        total: 8,
        value: 1e9,
    };
    let propagated = Anomaly {
        kind: AnomalyKind::NaN,
        origin: Origin::Propagated,
        layer: Some(2),
        ..base
    };
    let produced = Anomaly {
        kind: AnomalyKind::Inf,
        layer: Some(4),
        ..base
    };
    assert_eq!(first_corruption([&base]), None);
    assert_eq!(first_corruption([&base, &propagated]), Some(&propagated));
    assert_eq!(
        first_corruption([&base, &propagated, &produced]),
        Some(&produced)
    );
    assert_eq!(first_corruption(std::iter::empty()), None);
}

#[test]
fn the_gauges_have_one_series_per_traced_layer_and_stage() {
    let mut registry = Registry::default();
    let metrics = TraceMetrics::register(&mut registry);
    let mut t = traced_with(&metrics.sink());
    for pos in 0..6 {
        tiny_forward(&mut t, pos, None);
    }
    let s = samples(&text(&registry));
    let mut want = BTreeSet::new();
    for stage in [Stage::Embedding, Stage::FinalNorm, Stage::Logits] {
        want.insert((NO_LAYER.to_string(), stage.name().to_string()));
    }
    for layer in 0..LAYERS {
        for stage in Stage::LAYER_STAGES {
            want.insert((layer.to_string(), stage.name().to_string()));
        }
    }
    assert_eq!(want.len(), SITES);
    for family in [
        "model_tracer_activation_rms",
        "model_tracer_activation_max_abs",
    ] {
        let got: BTreeSet<(String, String)> = series(&s, family)
            .iter()
            .map(|x| (x.labels["layer"].clone(), x.labels["stage"].clone()))
            .collect();
        assert_eq!(got, want, "{family}");
        assert_eq!(series(&s, family).len(), SITES);
        assert!(series(&s, family)
            .iter()
            .all(|x| x.value.is_finite() && x.value > 0.0));
    }
    for family in [
        "model_tracer_residual_ratio",
        "model_tracer_attention_sink_share",
    ] {
        let layers: BTreeSet<String> = series(&s, family)
            .iter()
            .map(|x| x.labels["layer"].clone())
            .collect();
        let want: BTreeSet<String> = (0..LAYERS).map(|l| l.to_string()).collect();
        assert_eq!(layers, want, "{family}");
    }
    // Logits max |x|: the chosen token's 100, every forward.
    let logits = [("layer", NO_LAYER), ("stage", "logits")];
    assert_eq!(
        value(&s, "model_tracer_activation_max_abs", &logits),
        Some(100.0)
    );

    // A tracer of two stages gives two series.
    let mut registry = Registry::default();
    let metrics = TraceMetrics::register(&mut registry);
    let mut t = ModelTracer::new(Lightweight);
    t.set_sink(Some(SinkHandle::new(metrics.sink())));
    for pos in 0..3 {
        t.begin_forward(pos);
        t.activation(7, Stage::Input, &[1.0, 2.0]);
        t.activation(7, Stage::Output, &[2.0, 3.0]);
        t.end_forward();
    }
    let s = samples(&text(&registry));
    let rms: Vec<_> = series(&s, "model_tracer_activation_rms");
    assert_eq!(rms.len(), 2, "{rms:?}");
    assert!(rms.iter().all(|x| x.labels["layer"] == "7"));
    // Lightweight records no attention and no lens.
    assert!(series(&s, "model_tracer_attention_sink_share").is_empty());
    assert_eq!(
        value(&s, "model_tracer_lens_decisive_layer_count", &[]),
        Some(0.0)
    );
}

/// Forwards of one stage (layer 0 input) holding `x`.
fn one_stage(t: &mut ModelTracer<Lightweight>, pos: usize, x: &[f32]) {
    t.begin_forward(pos);
    t.activation(0, Stage::Input, x);
    t.end_forward();
}

#[test]
fn the_moving_average_moves_by_the_weight_and_skips_non_finite_values() {
    let weight = 0.25;
    let mut registry = Registry::default();
    let metrics = TraceMetrics::with_options(
        &mut registry,
        MetricsOptions {
            weight,
            ..MetricsOptions::default()
        },
    );
    assert_eq!(metrics.options().weight, weight);
    let mut t = ModelTracer::new(Lightweight);
    t.set_sink(Some(SinkHandle::new(metrics.sink())));
    let site = [("layer", "0"), ("stage", "input")];
    let read = |name: &str| value(&samples(&text(&registry)), name, &site).expect("a series");
    let close = |got: f64, want: f64| (got - want).abs() <= 1e-6 * want.abs().max(1.0);

    // A constant vector of c has RMS and max |x| equal to |c|.
    let mut want = 0.0f64;
    for (i, c) in [2.0f32, -6.0, 4.0, 4.0, 10.0].into_iter().enumerate() {
        one_stage(&mut t, i, &[c; 16]);
        let c = f64::from(c.abs());
        want = if i == 0 {
            c
        } else {
            want + weight * (c - want)
        };
        let (rms, max_abs) = (
            read("model_tracer_activation_rms"),
            read("model_tracer_activation_max_abs"),
        );
        assert!(close(rms, want), "forward {i}: rms {rms}, want {want}");
        assert!(
            close(max_abs, want),
            "forward {i}: max_abs {max_abs}, want {want}"
        );
    }
    // 2, then 2 + (6 - 2)/4 = 3, 3.25, 3.4375, 5.078125.
    assert!(close(want, 5.078125));

    // An all-NaN or all-Inf stage is no sample: the gauges stay.
    one_stage(&mut t, 5, &[f32::NAN; 16]);
    one_stage(&mut t, 6, &[f32::INFINITY, f32::NEG_INFINITY]);
    assert!(close(read("model_tracer_activation_rms"), want));
    assert!(close(read("model_tracer_activation_max_abs"), want));

    // A stage with NaN and Inf among finite values folds the finite ones.
    one_stage(&mut t, 7, &[1.0, f32::NAN, f32::INFINITY, 1.0]);
    want += weight * (1.0 - want);
    assert!(close(read("model_tracer_activation_rms"), want));
    assert!(close(read("model_tracer_activation_max_abs"), want));

    let s = samples(&text(&registry));
    assert_eq!(value(&s, "model_tracer_forwards_total", &[]), Some(8.0));
    assert_eq!(
        value(
            &s,
            "model_tracer_anomalies_total",
            &[("kind", "nan"), ("layer", "0"), ("stage", "input")]
        ),
        Some(2.0)
    );
    assert_eq!(
        value(
            &s,
            "model_tracer_anomalies_total",
            &[("kind", "inf"), ("layer", "0"), ("stage", "input")]
        ),
        Some(2.0)
    );
}

#[test]
fn a_nan_does_not_poison_the_gauges_of_the_stages_it_reaches() {
    let mut registry = Registry::default();
    let metrics = TraceMetrics::register(&mut registry);
    let mut t = traced_with(&metrics.sink());
    for pos in 0..4 {
        tiny_forward(&mut t, pos, None);
    }
    let before = samples(&text(&registry));
    // Layer 4's attention input is all NaN in a poisoned forward (the norm
    // of a stream holding a NaN): no sample, the gauge stays.
    tiny_forward(&mut t, 4, Some(3));
    let after = samples(&text(&registry));
    let site = [("layer", "4"), ("stage", "post_norm")];
    for family in [
        "model_tracer_activation_rms",
        "model_tracer_activation_max_abs",
    ] {
        assert_eq!(value(&after, family, &site), value(&before, family, &site));
    }
    // Every gauge is still a number, layer 3's residual ratio (NaN this
    // forward) included.
    for family in [
        "model_tracer_activation_rms",
        "model_tracer_activation_max_abs",
        "model_tracer_residual_ratio",
        "model_tracer_attention_sink_share",
    ] {
        assert!(
            series(&after, family).iter().all(|x| x.value.is_finite()),
            "{family}"
        );
    }
    let r = [("layer", "3")];
    assert_eq!(
        value(&after, "model_tracer_residual_ratio", &r),
        value(&before, "model_tracer_residual_ratio", &r)
    );
    // Layer 3's attention output folds its seven finite values: it moved.
    let site = [("layer", "3"), ("stage", "post_attn")];
    assert_ne!(
        value(&after, "model_tracer_activation_rms", &site),
        value(&before, "model_tracer_activation_rms", &site)
    );
}

#[test]
fn attention_kv_and_lens_families_follow_their_records() {
    let mut registry = Registry::default();
    let metrics = TraceMetrics::register(&mut registry);
    let mut t = traced_with(&metrics.sink());
    for pos in 0..7 {
        tiny_forward(&mut t, pos, None);
    }
    let s = samples(&text(&registry));
    // Position 0 has one slot (share 1); later positions 0.5 and 0.3 on
    // the two heads: 0.4. The average starts at 1 and moves to 0.4 by
    // the default weight, six times.
    let mut want = 1.0f64;
    for _ in 1..7 {
        want += DEFAULT_WEIGHT * (0.4 - want);
    }
    for layer in 0..LAYERS {
        let l = layer.to_string();
        let got =
            value(&s, "model_tracer_attention_sink_share", &[("layer", &l)]).expect("a series");
        assert!((got - want).abs() < 1e-6, "layer {layer}: {got} vs {want}");
    }
    // Positions 4, 5, 6 each evicted one.
    assert_eq!(value(&s, "model_tracer_kv_evictions_total", &[]), Some(3.0));
    // The lens: layer 3 decided the chosen token, every forward.
    assert_eq!(
        value(&s, "model_tracer_lens_decisive_layer_count", &[]),
        Some(7.0)
    );
    assert_eq!(
        value(&s, "model_tracer_lens_decisive_layer_sum", &[]),
        Some(21.0)
    );
    let bucket = |le: &str| value(&s, "model_tracer_lens_decisive_layer_bucket", &[("le", le)]);
    assert_eq!(bucket("2.0"), Some(0.0));
    assert_eq!(bucket("3.0"), Some(7.0));
    assert_eq!(bucket("+Inf"), Some(7.0));
    // A residual ratio is a share, in (0, 1).
    for x in series(&s, "model_tracer_residual_ratio") {
        assert!(x.value > 0.0 && x.value < 1.0, "{x:?}");
    }
}

#[test]
fn label_cardinality_stays_bounded_over_10_000_forwards() {
    let mut registry = Registry::default();
    let metrics = TraceMetrics::register(&mut registry);
    let mut count_after = Vec::new();
    let mut forwards = 0;
    let mut request = 0;
    while forwards < 10_000 {
        // Each request: a sink of its own, positions from 0, sometimes a
        // NaN at layer 1 or 3.
        let sink = metrics.sink();
        let mut t = traced_with(&sink);
        let nan = match request % 7 {
            0 => Some(3),
            3 => Some(1),
            _ => None,
        };
        for pos in 0..50 {
            tiny_forward(&mut t, pos, nan.filter(|_| pos % 10 == 9));
            forwards += 1;
        }
        sink.finish_request();
        request += 1;
        if request == 8 || forwards == 10_000 {
            count_after.push(text(&registry).lines().count());
        }
    }
    let s = samples(&text(&registry));
    assert_eq!(
        value(&s, "model_tracer_forwards_total", &[]),
        Some(10_000.0)
    );
    assert_eq!(value(&s, "model_tracer_requests_total", &[]), Some(200.0));
    // Every series existed after eight requests; none came later.
    assert_eq!(count_after[0], count_after[1], "{count_after:?}");
    let n = |family: &str| series(&s, family).len();
    assert_eq!(n("model_tracer_activation_rms"), SITES);
    assert_eq!(n("model_tracer_activation_max_abs"), SITES);
    assert_eq!(n("model_tracer_residual_ratio"), LAYERS);
    assert_eq!(n("model_tracer_attention_sink_share"), LAYERS);
    assert_eq!(n("model_tracer_anomalies_total"), 2);
    assert_eq!(n("model_tracer_requests_corrupted_total"), 2);
    let corrupted: f64 = series(&s, "model_tracer_requests_corrupted_total")
        .iter()
        .map(|x| x.value)
        .sum();
    // Requests 0, 3, 7, 10, ...: those with request % 7 in {0, 3}.
    let want = (0..200).filter(|r| r % 7 == 0 || r % 7 == 3).count();
    assert_eq!(corrupted, want as f64);
    // No label carries a request, a token or a position.
    let keys: BTreeSet<&str> = s
        .iter()
        .flat_map(|x| x.labels.keys().map(String::as_str))
        .collect();
    let allowed: BTreeSet<&str> = [
        "kind",
        "layer",
        "stage",
        "origin_layer",
        "origin_stage",
        "le",
    ]
    .into_iter()
    .collect();
    assert!(keys.is_subset(&allowed), "{keys:?}");
}

#[test]
fn a_fold_allocates_nothing_once_its_series_exist() {
    let mut registry = Registry::default();
    let metrics = TraceMetrics::register(&mut registry);
    let mut t = ModelTracer::new(Full);
    tiny_forward(&mut t, 3, Some(3));
    let forward: ForwardTrace = t.last_forward().expect("kept").clone();
    let mut sink = metrics.sink();
    let ((), first) = model_tracer_test_support::count_allocations(|| metrics.observe(&forward));
    assert!(first > 0, "the first fold creates the series");
    // The sink's first corrupted forward makes room for its request.
    let ((), first) = model_tracer_test_support::count_allocations(|| {
        let _ = sink.write_forward(&forward);
    });
    assert_eq!(first, 1);
    let ((), again) = model_tracer_test_support::count_allocations(|| {
        for _ in 0..100 {
            metrics.observe(&forward);
            let _ = sink.write_forward(&forward);
        }
    });
    assert_eq!(again, 0);
    assert_eq!(metrics.forwards(), 202);
}

#[test]
fn records_beyond_the_layer_limit_are_ignored() {
    let mut registry = Registry::default();
    let metrics = TraceMetrics::register(&mut registry);
    let mut f = ForwardTrace::default();
    f.activations
        .layers
        .push(model_tracer::LayerActivationTrace {
            layer_idx: usize::MAX,
            input_stats: model_tracer::TensorStats::from_slice(&[1.0, 2.0]),
            residual_ratio: 0.5,
            ..Default::default()
        });
    f.attention.push(model_tracer::AttentionWeightTrace {
        layer_idx: 1 << 20,
        sink_weight: 0.5,
        ..Default::default()
    });
    f.anomalies.push(Anomaly {
        position: 0,
        layer: Some(1 << 20),
        stage: Stage::Input,
        kind: AnomalyKind::NaN,
        origin: Origin::Produced,
        count: 1,
        total: 1,
        value: f32::NAN,
    });
    metrics.observe(&f);
    let s = samples(&text(&registry));
    assert_eq!(value(&s, "model_tracer_forwards_total", &[]), Some(1.0));
    for family in [
        "model_tracer_activation_rms",
        "model_tracer_residual_ratio",
        "model_tracer_attention_sink_share",
        "model_tracer_anomalies_total",
    ] {
        assert!(series(&s, family).is_empty(), "{family}");
    }
}

#[test]
fn out_of_range_options_are_replaced() {
    for weight in [0.0, -1.0, 1.5, f64::NAN, f64::INFINITY] {
        let mut registry = Registry::default();
        let m = TraceMetrics::with_options(
            &mut registry,
            MetricsOptions {
                weight,
                lens_layers: 0,
            },
        );
        assert_eq!(m.options().weight, DEFAULT_WEIGHT);
        assert_eq!(m.options().lens_layers, 1);
    }
    let mut registry = Registry::default();
    let m = TraceMetrics::with_options(
        &mut registry,
        MetricsOptions {
            weight: 1.0,
            lens_layers: usize::MAX,
        },
    );
    assert_eq!(m.options().weight, 1.0);
    assert_eq!(
        m.options().lens_layers,
        model_tracer::metrics::MAX_LENS_BUCKETS
    );
}

/// A sink that fails from its `fail_at`-th forward on.
struct Failing {
    written: usize,
    fail_at: usize,
}

impl ForwardSink for Failing {
    fn write_forward(&mut self, _: &ForwardTrace) -> io::Result<()> {
        self.written += 1;
        if self.written >= self.fail_at {
            return Err(io::Error::new(io::ErrorKind::StorageFull, "disk full"));
        }
        Ok(())
    }
}

#[test]
fn a_tee_feeds_both_sinks_and_outlives_one_failing() {
    let mut registry = Registry::default();
    let metrics = TraceMetrics::register(&mut registry);
    let tee = Tee::new(
        Failing {
            written: 0,
            fail_at: 3,
        },
        metrics.sink(),
    );
    let status = tee.status();
    let mut t = ModelTracer::new(Full);
    t.set_sink(Some(SinkHandle::new(tee)));
    for pos in 0..5 {
        tiny_forward(&mut t, pos, None);
    }
    let failure = status.first().expect("the first sink failed");
    assert_eq!(failure.position, 2);
    assert_eq!(failure.kind, io::ErrorKind::StorageFull);
    assert!(status.second().is_none());
    // The tracer's sink goes on (the metrics took every forward).
    let handle = t.sink().expect("installed");
    assert_eq!(handle.status().forwards_written, 5);
    assert!(handle.status().failure.is_none());
    assert_eq!(metrics.forwards(), 5);

    // Both failing: the tee reports it, and the handle stops.
    let tee = Tee::new(
        Failing {
            written: 0,
            fail_at: 2,
        },
        Failing {
            written: 0,
            fail_at: 3,
        },
    );
    let status = tee.status();
    let mut t = ModelTracer::new(Lightweight);
    t.set_sink(Some(SinkHandle::new(tee)));
    for pos in 0..5 {
        one_stage(&mut t, pos, &[1.0]);
    }
    assert_eq!(status.first().map(|f| f.position), Some(1));
    assert_eq!(status.second().map(|f| f.position), Some(2));
    let handle = t.sink().expect("installed");
    assert_eq!(handle.status().forwards_written, 2);
    assert_eq!(handle.status().failure.map(|f| f.position), Some(2));
}

#[cfg(feature = "serde")]
#[test]
fn a_tee_of_json_lines_and_metrics_writes_every_forward_to_both() {
    let mut registry = Registry::default();
    let metrics = TraceMetrics::register(&mut registry);
    let jsonl = model_tracer::JsonlSink::new(Vec::new());
    let mut tee = Tee::new(jsonl, metrics.sink());
    tee.tracer_config("full");
    let mut t = ModelTracer::new(Full);
    for pos in 0..4 {
        tiny_forward(&mut t, pos, None);
        tee.write_forward(t.last_forward().expect("kept"))
            .expect("both write");
    }
    assert_eq!(metrics.forwards(), 4);
    let s = samples(&text(&registry));
    assert_eq!(value(&s, "model_tracer_forwards_total", &[]), Some(4.0));
    let dbg = format!("{tee:?}");
    assert!(dbg.contains("Tee"));
}

/// What the Python script printed of one family: its type, the label keys
/// of its samples (`le` aside), and the samples (name, labels, value).
type Parsed = (String, BTreeSet<String>, Vec<(String, String, f64)>);

/// Families, types and label keys as the module documents them.
const FAMILIES: [(&str, &str, &[&str]); 10] = [
    ("model_tracer_forwards", "counter", &[]),
    ("model_tracer_requests", "counter", &[]),
    (
        "model_tracer_anomalies",
        "counter",
        &["kind", "layer", "stage"],
    ),
    (
        "model_tracer_requests_corrupted",
        "counter",
        &["origin_layer", "origin_stage"],
    ),
    ("model_tracer_activation_rms", "gauge", &["layer", "stage"]),
    (
        "model_tracer_activation_max_abs",
        "gauge",
        &["layer", "stage"],
    ),
    ("model_tracer_residual_ratio", "gauge", &["layer"]),
    ("model_tracer_attention_sink_share", "gauge", &["layer"]),
    ("model_tracer_kv_evictions", "counter", &[]),
    ("model_tracer_lens_decisive_layer", "histogram", &[]),
];

#[test]
fn the_python_client_parses_the_text_with_the_documented_families() {
    let Some(python) = model_tracer_test_support::python_with("prometheus_client") else {
        model_tracer_test_support::require(false, "python3 with prometheus_client");
        return;
    };
    let mut registry = Registry::default();
    let metrics = TraceMetrics::register(&mut registry);
    let sink = metrics.sink();
    let mut t = traced_with(&sink);
    for pos in 0..6 {
        tiny_forward(&mut t, pos, (pos == 5).then_some(3));
    }
    sink.finish_request();
    let dir = model_tracer_test_support::scratch_dir(env!("CARGO_TARGET_TMPDIR"), "metrics");
    let openmetrics = dir.join("metrics.openmetrics.txt");
    let prometheus = dir.join("metrics.prom.txt");
    std::fs::write(&openmetrics, text(&registry)).expect("writes");
    let mut prom = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut prom, &registry).expect("encodes");
    std::fs::write(&prometheus, prom).expect("writes");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/metrics_parse.py");

    for (format, file) in [("openmetrics", &openmetrics), ("prometheus", &prometheus)] {
        let out = std::process::Command::new(python)
            .arg(script)
            .arg(format)
            .arg(file)
            .output()
            .expect("python3 runs");
        assert!(
            out.status.success(),
            "{format}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8(out.stdout).expect("utf-8");
        let mut seen: BTreeMap<String, Parsed> = BTreeMap::new();
        for line in stdout.lines() {
            let cols: Vec<&str> = line.split('\t').collect();
            assert_eq!(cols.len(), 5, "{line}");
            let entry = seen
                .entry(cols[0].to_string())
                .or_insert_with(|| (cols[1].to_string(), BTreeSet::new(), Vec::new()));
            assert_eq!(entry.0, cols[1]);
            for kv in cols[3].split(',').filter(|kv| !kv.is_empty()) {
                let (k, _) = kv.split_once('=').expect("key=value");
                if k != "le" {
                    entry.1.insert(k.to_string());
                }
            }
            entry.2.push((
                cols[2].to_string(),
                cols[3].to_string(),
                cols[4].parse().expect("a number"),
            ));
        }
        for (name, kind, labels) in FAMILIES {
            let (got_kind, got_labels, samples) = seen
                .get(name)
                .unwrap_or_else(|| panic!("{format}: no family {name} in {stdout}"));
            assert_eq!(got_kind, kind, "{format}: {name}");
            let want: BTreeSet<String> = labels.iter().map(|l| l.to_string()).collect();
            assert_eq!(got_labels, &want, "{format}: {name}");
            assert!(!samples.is_empty(), "{format}: {name}");
        }
        assert_eq!(seen.len(), FAMILIES.len(), "{format}: {:?}", seen.keys());
        let (_, _, anomalies) = &seen["model_tracer_anomalies"];
        assert_eq!(
            anomalies,
            &[(
                "model_tracer_anomalies_total".to_string(),
                "kind=nan,layer=3,stage=post_attn".to_string(),
                1.0
            )],
            "{format}"
        );
        let (_, _, corrupted) = &seen["model_tracer_requests_corrupted"];
        assert_eq!(
            corrupted[0].1, "origin_layer=3,origin_stage=post_attn",
            "{format}"
        );
        let (_, _, rms) = &seen["model_tracer_activation_rms"];
        assert_eq!(rms.len(), SITES, "{format}");
    }
}

#[test]
fn the_families_table_of_features_md_is_the_exported_one() {
    let doc = include_str!("../features.md");
    let start = doc.find("## Fleet metrics").expect("the section");
    let section = &doc[start..];
    // The tracer's table; the server's families follow in a subsection.
    let end = section[3..].find("\n## ").map_or(section.len(), |e| e + 3);
    let end = section[..end].find("\n### ").unwrap_or(end);
    let mut documented = Vec::new();
    for line in section[..end].lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let Some(name) = cells
            .get(1)
            .and_then(|c| c.strip_prefix("`model_tracer_"))
            .and_then(|c| c.strip_suffix('`'))
        else {
            continue;
        };
        let labels: Vec<String> = cells[3]
            .split(',')
            .map(|l| l.trim().trim_matches('`').to_string())
            .filter(|l| !l.is_empty() && l != "—")
            .collect();
        documented.push((format!("model_tracer_{name}"), cells[2].to_string(), labels));
    }
    let exported: Vec<(String, String, Vec<String>)> = FAMILIES
        .iter()
        .map(|(name, kind, labels)| {
            let name = if *kind == "counter" {
                format!("{name}_total")
            } else {
                name.to_string()
            };
            (
                name,
                kind.to_string(),
                labels.iter().map(|l| l.to_string()).collect(),
            )
        })
        .collect();
    assert_eq!(documented, exported);
}

/// A forward over one row of each of `sequences` at `pos`, layers 0..5 of
/// width 8; the row of `poisoned` gets a NaN in layer 3's attention output.
fn batch_forward(
    t: &mut ModelTracer<Lightweight>,
    sequences: &[u64],
    pos: usize,
    poisoned: Option<u64>,
) {
    let rows: Vec<BatchRow> = sequences
        .iter()
        .map(|&s| BatchRow::new(SequenceId(s), pos))
        .collect();
    t.begin_forward_batch(&rows);
    let mut x: Vec<f32> = (0..sequences.len() * DIM)
        .map(|i| ((i * 3 + pos) % 7) as f32 * 0.25 - 0.7)
        .collect();
    for layer in 0..LAYERS {
        t.activation(layer, Stage::Input, &x);
        let mut attn: Vec<f32> = x.iter().map(|v| 0.5 * v.tanh()).collect();
        for (row, &s) in sequences.iter().enumerate() {
            if layer == 3 && Some(s) == poisoned {
                attn[row * DIM + 1] = f32::NAN;
            }
        }
        t.activation(layer, Stage::PostAttn, &attn);
        x.iter_mut().zip(&attn).for_each(|(a, b)| *a += b);
        t.activation(layer, Stage::Output, &x);
    }
    t.end_forward();
}

#[test]
fn a_sink_of_a_tracer_running_several_sequences_keeps_each_request_apart() {
    let mut registry = Registry::default();
    let metrics = TraceMetrics::register(&mut registry);
    let sink = metrics.sink();
    let mut t = ModelTracer::new(Lightweight);
    t.set_sink(Some(SinkHandle::new(sink.clone())));
    for pos in 0..4 {
        batch_forward(&mut t, &[1, 2], pos, (pos == 2).then_some(2));
    }
    // Sequence 3 joins; its rows are poisoned from the start.
    for pos in 0..2 {
        batch_forward(&mut t, &[1, 3], 4 + pos, Some(3));
    }
    assert_eq!(metrics.forwards(), 12, "one fold per row");
    assert!(sink.sequence_corruption(SequenceId(1)).is_none());
    let two = sink
        .sequence_corruption(SequenceId(2))
        .expect("sequence 2 saw the NaN");
    assert_eq!(
        (two.layer, two.stage, two.position),
        (Some(3), Stage::PostAttn, 2)
    );
    assert!(sink.corruption().is_none(), "no one-sequence request ran");

    for id in [1, 2, 3] {
        t.end_sequence(SequenceId(id));
        sink.finish_sequence(SequenceId(id));
    }
    let s = samples(&text(&registry));
    assert_eq!(value(&s, "model_tracer_requests_total", &[]), Some(3.0));
    let origin = [("origin_layer", "3"), ("origin_stage", "post_attn")];
    assert_eq!(
        value(&s, "model_tracer_requests_corrupted_total", &origin),
        Some(2.0)
    );
    let nan = [("kind", "nan"), ("layer", "3"), ("stage", "post_attn")];
    assert_eq!(value(&s, "model_tracer_anomalies_total", &nan), Some(3.0));
    // Finishing a request forgets it: a second call counts a clean one.
    sink.finish_sequence(SequenceId(2));
    let s = samples(&text(&registry));
    assert_eq!(value(&s, "model_tracer_requests_total", &[]), Some(4.0));
    assert_eq!(
        value(&s, "model_tracer_requests_corrupted_total", &origin),
        Some(2.0)
    );
}

#[test]
fn the_sink_remembers_a_bounded_number_of_corrupted_sequences() {
    let mut registry = Registry::default();
    let metrics = TraceMetrics::register(&mut registry);
    let mut sink = metrics.sink();
    let mut t = ModelTracer::new(Lightweight);
    t.begin_forward(0);
    t.activation(0, Stage::Input, &[1.0, f32::NAN]);
    t.end_forward();
    let mut f = t.last_forward().expect("kept").clone();
    let pending = model_tracer::metrics::MAX_PENDING_SEQUENCES as u64;
    for id in 0..pending + 10 {
        f.sequence = Some(SequenceId(id));
        sink.write_forward(&f).expect("never fails");
    }
    // The ten oldest were forgotten, the newest are kept.
    assert!(sink.sequence_corruption(SequenceId(9)).is_none());
    assert!(sink.sequence_corruption(SequenceId(10)).is_some());
    assert!(sink.sequence_corruption(SequenceId(pending + 9)).is_some());
}
