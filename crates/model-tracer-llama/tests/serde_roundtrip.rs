//! Every trace type survives JSON: serialize → deserialize → serialize gives
//! the same text and the same value, NaN and infinities included.
#![cfg(feature = "serde")]

mod common;

use std::fmt::Debug;

use serde::de::DeserializeOwned;
use serde::Serialize;

use model_tracer::attention::AttentionTraceConfig;
use model_tracer::stats::ErrorMetrics;
use model_tracer::summary::{
    AnomalySite, BrickAggregate, BrickLayerAggregate, HeadAggregate, KvSummary, LayerAggregate,
    LayerSummary,
};
use model_tracer::*;
use model_tracer_llama::model::{Fault, FaultKind};

static_assertions::assert_impl_all!(ForwardTrace: Serialize, DeserializeOwned);
static_assertions::assert_impl_all!(SessionAggregates: Serialize, DeserializeOwned);
static_assertions::assert_impl_all!(TraceSummary: Serialize, DeserializeOwned);
static_assertions::assert_impl_all!(KvCacheSessionTrace: Serialize, DeserializeOwned);
static_assertions::assert_impl_all!(KvCacheStateTrace: Serialize, DeserializeOwned);
static_assertions::assert_impl_all!(ModelActivationTrace: Serialize, DeserializeOwned);
static_assertions::assert_impl_all!(LayerActivationTrace: Serialize, DeserializeOwned);
static_assertions::assert_impl_all!(AttentionWeightTrace: Serialize, DeserializeOwned);
static_assertions::assert_impl_all!(LogitEvolutionTrace: Serialize, DeserializeOwned);
static_assertions::assert_impl_all!(TokenLogitEvolution: Serialize, DeserializeOwned);
static_assertions::assert_impl_all!(ModelQuantizationError: Serialize, DeserializeOwned);
static_assertions::assert_impl_all!(QuantizationErrorTrace: Serialize, DeserializeOwned);
static_assertions::assert_impl_all!(Anomaly: Serialize, DeserializeOwned);
static_assertions::assert_impl_all!(TensorStats: Serialize, DeserializeOwned);
static_assertions::assert_impl_all!(ErrorMetrics: Serialize, DeserializeOwned);
static_assertions::assert_impl_all!(TraceOptions: Serialize, DeserializeOwned);
static_assertions::assert_impl_all!(ModelTracerConfig: Serialize, DeserializeOwned);
static_assertions::assert_impl_all!(AttentionTraceConfig: Serialize, DeserializeOwned);
static_assertions::assert_impl_all!(QuantSampling: Serialize, DeserializeOwned);
static_assertions::assert_impl_all!(LayerAggregate: Serialize, DeserializeOwned);
static_assertions::assert_impl_all!(HeadAggregate: Serialize, DeserializeOwned);
static_assertions::assert_impl_all!(BrickAggregate: Serialize, DeserializeOwned);
static_assertions::assert_impl_all!(BrickLayerAggregate: Serialize, DeserializeOwned);
static_assertions::assert_impl_all!(AnomalySite: Serialize, DeserializeOwned);
static_assertions::assert_impl_all!(LayerSummary: Serialize, DeserializeOwned);
static_assertions::assert_impl_all!(KvSummary: Serialize, DeserializeOwned);

/// Round-trips `v` through JSON and checks the result is the same value:
/// equal `Debug` text (which shows every float exactly, NaN as `NaN`) and an
/// equal second serialization. Returns the JSON.
fn round_trip<T: Serialize + DeserializeOwned + Debug>(v: &T) -> String {
    let json = serde_json::to_string(v).unwrap();
    let back: T = serde_json::from_str(&json)
        .unwrap_or_else(|e| panic!("{}: {e}\n{json}", std::any::type_name::<T>()));
    assert_eq!(format!("{v:?}"), format!("{back:?}"));
    assert_eq!(serde_json::to_string(&back).unwrap(), json);
    json
}

/// A run of the tiny model under `Full` with a NaN injected at position 5
/// and an Inf at position 9, a small cache that evicts, and what-if copies.
fn traced_run() -> model_tracer_llama::model::Llama<Full> {
    let mut model = common::tiny_model(Full, 12);
    model
        .set_what_if(&[model_tracer_llama::dtype::GgmlType::Q4_0])
        .unwrap();
    let tokens: Vec<u32> = (0..20).map(|i| (i * 37 + 11) % 512).collect();
    for (pos, &t) in tokens.iter().enumerate() {
        let fault = match pos {
            5 => Some(common::nan_at(1, 5)),
            9 => Some(Fault {
                kind: FaultKind::Inf,
                layer: 2,
                position: Some(9),
            }),
            _ => None,
        };
        model.set_fault(fault);
        model.forward(t);
    }
    model
}

#[test]
fn a_faulty_full_run_round_trips_with_its_nans_and_infs() {
    let model = traced_run();
    let t = model.tracer();
    let forwards: Vec<&ForwardTrace> = t.forwards().collect();
    assert_eq!(forwards.len(), 20);
    let mut non_finite_texts = 0;
    for f in &forwards {
        let json = round_trip(*f);
        non_finite_texts += json.matches("\"NaN\"").count() + json.matches("\"inf\"").count();
    }
    assert!(non_finite_texts > 100, "{non_finite_texts}");
    // The faults made it into the records: NaN at 5, Inf at 9.
    assert_eq!(
        forwards[5].primary_anomaly().unwrap().kind,
        AnomalyKind::NaN
    );
    assert!(forwards[9]
        .anomalies
        .iter()
        .any(|a| a.kind == AnomalyKind::Inf && a.layer == Some(2)));
    let agg = t.aggregates().unwrap();
    let json = round_trip(agg);
    assert!(!agg.heads.is_empty() && !agg.what_if.is_empty() && !agg.anomaly_sites.is_empty());
    assert!(json.contains("\"NaN\""), "aggregates hold NaN minima");
    round_trip(&t.summary());
    round_trip(t.kv_session().unwrap());
    round_trip(t.options().unwrap());
}

#[test]
fn hand_built_records_with_every_special_value_round_trip() {
    let specials = [
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        -0.0,
        1e-40,
        f32::MAX,
    ];
    let mut f = ForwardTrace {
        position: 7,
        ..ForwardTrace::default()
    };
    for (i, &v) in specials.iter().enumerate() {
        let mut stats = TensorStats::from_slice(&[1.0, 2.0]);
        stats.mean = v;
        stats.std = v;
        stats.l2_norm = v;
        *f.activations.stats_mut(i, Stage::PostAttn) = stats;
        f.activations.layer_mut(i).residual_ratio = v;
        f.attention.push(AttentionWeightTrace {
            layer_idx: i,
            head_idx: 1,
            query_pos: 7,
            context_len: 8,
            top_k_positions: vec![0, 3],
            top_k_weights: vec![v, 0.25],
            tail_mass: v,
            entropy: v,
            sink_weight: v,
            nan_count: 1,
        });
        let mut q = QuantizationErrorTrace::compute(
            BrickId::FfnUp,
            i,
            &[1.0, 2.0],
            &[1.0, 2.0],
            QuantType::Q4_1,
        );
        assert_eq!(q.snr_db, f32::INFINITY, "identical vectors");
        q.metrics.cosine_similarity = v;
        f.quantization.add(q);
        f.anomalies.push(Anomaly {
            position: 7,
            layer: Some(i),
            stage: Stage::PostAttn,
            kind: AnomalyKind::ALL[i % AnomalyKind::COUNT],
            origin: Origin::Propagated,
            count: 1,
            total: 2,
            value: v,
        });
    }
    f.quantization.kl_divergence = Some(f32::NAN);
    f.quantization.top1_agrees = Some(false);
    let mut lens = LogitEvolutionTrace::new(7, f32::INFINITY, f32::NAN);
    let tok = lens.track_token(3, "<tok>\"&".into());
    for &v in &specials {
        tok.record_layer(v, 4);
    }
    f.logits = Some(lens);
    f.kv_cache = Some(KvCacheStateTrace {
        cache_hit_rate: f32::NAN,
        ..KvCacheStateTrace::new(7, 16)
    });
    let json = round_trip(&f);
    for needle in ["\"NaN\"", "\"inf\"", "\"-inf\""] {
        assert!(json.contains(needle), "{needle} missing");
    }
    for field in ["mean", "std", "tail_mass", "cosine_similarity", "value"] {
        assert!(
            !json.contains(&format!("\"{field}\":null")),
            "{field} written as null"
        );
    }
    let mut s = KvCacheSessionTrace::with_retention(4);
    s.add_step(f.kv_cache.unwrap());
    round_trip(&s);
    round_trip(&QuantSampling::EveryNth(3));
    round_trip(&ModelTracerConfig::full());
    round_trip(&ErrorMetrics {
        mse: 0.0,
        max_abs_error: 0.0,
        cosine_similarity: 1.0,
        snr_db: f32::INFINITY,
    });
}

#[test]
fn documents_written_with_nulls_still_load() {
    // What a plain serializer leaves for non-finite floats.
    let json = r#"{"count":3,"min":null,"max":null,"mean":null,"std":null,"l2_norm":null,"nan_count":3,"inf_count":0}"#;
    let s: TensorStats = serde_json::from_str(json).unwrap();
    assert_eq!(s.nan_count, 3);
    assert!(s.mean.is_nan() && s.l2_norm.is_nan());
}
