//! The reference decoder feeds the tracer's fleet metrics through its sink,
//! with no code of its own: a NaN injected at a layer is counted where it
//! was produced.

mod common;

use model_tracer::metrics::prometheus_client::encoding::text::encode;
use model_tracer::metrics::prometheus_client::registry::Registry;
use model_tracer::metrics::{MetricsSink, TraceMetrics};
use model_tracer::{Full, SinkHandle, TraceConfig};
use model_tracer_llama::model::{Fault, Llama};

fn scrape(registry: &Registry) -> String {
    let mut text = String::new();
    encode(&mut text, registry).expect("the registry encodes");
    text
}

/// The value of the sample line that starts with `series` (the name and
/// labels as the text writes them).
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Sample lines of `family` (its name followed by labels or a space).
fn lines<'a>(text: &'a str, family: &str) -> Vec<&'a str> {
    text.lines()
        .filter(|l| {
            l.strip_prefix(family)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .collect()
}

fn with_metrics<C: TraceConfig>(model: &mut Llama<C>) -> (Registry, TraceMetrics, MetricsSink) {
    let mut registry = Registry::default();
    let metrics = TraceMetrics::register(&mut registry);
    let sink = metrics.sink();
    model
        .tracer_mut()
        .set_sink(Some(SinkHandle::new(sink.clone())));
    (registry, metrics, sink)
}

#[test]
fn smollm2_with_a_nan_at_layer_7_counts_a_request_corrupted_at_layer_7() {
    let Some(path) = common::real_model() else {
        return;
    };
    let mut m = Llama::from_gguf(&path, None, Full).expect("the model loads");
    let (registry, metrics, sink) = with_metrics(&mut m);
    m.set_fault(Some(Fault::parse("nan@7").expect("a fault")));
    let prompt = m
        .tokenizer
        .as_ref()
        .expect("a tokenizer")
        .encode("The capital of France is");
    m.generate(&prompt, 3, |_| {});
    sink.finish_request();
    let forwards = m.tracer().summary().forwards;
    assert!(forwards >= prompt.len());
    assert_eq!(metrics.forwards(), forwards as u64);

    let text = scrape(&registry);
    let corrupted = lines(&text, "model_tracer_requests_corrupted_total");
    assert_eq!(
        corrupted,
        [r#"model_tracer_requests_corrupted_total{origin_layer="7",origin_stage="post_attn"} 1"#],
        "{text}"
    );
    // Every forward produced its NaN at layer 7, and no other layer is
    // named: the layers after it only carried it.
    let nan = lines(&text, "model_tracer_anomalies_total")
        .into_iter()
        .filter(|l| l.contains(r#"kind="nan""#))
        .collect::<Vec<_>>();
    assert_eq!(
        nan,
        [format!(
            r#"model_tracer_anomalies_total{{kind="nan",layer="7",stage="post_attn"}} {forwards}"#
        )],
        "{text}"
    );
    // The activation gauges: every stage of the 30 layers and the three
    // outside them, each a number despite the NaN.
    let rms = lines(&text, "model_tracer_activation_rms");
    assert_eq!(rms.len(), 30 * 6 + 3);
    for l in rms
        .iter()
        .chain(&lines(&text, "model_tracer_activation_max_abs"))
    {
        let v: f64 = l
            .rsplit_once(' ')
            .and_then(|(_, v)| v.parse().ok())
            .expect("a value");
        assert!(v.is_finite(), "{l}");
    }
    // The attention sink share of every layer (the softmax rows stay
    // finite: the NaN is added after them); the residual ratio of the
    // layers before 7 only, since from layer 7 on it is NaN, no sample.
    assert_eq!(lines(&text, "model_tracer_attention_sink_share").len(), 30);
    let residual = lines(&text, "model_tracer_residual_ratio");
    assert_eq!(residual.len(), 7, "{residual:?}");
    assert!((0..7).all(|l| residual
        .iter()
        .any(|r| r.contains(&format!("layer=\"{l}\"")))));

    // A clean request after it: counted, not corrupted.
    m.set_fault(None);
    m.clear_kv_cache();
    m.generate(&prompt, 2, |_| {});
    sink.finish_request();
    let text = scrape(&registry);
    assert_eq!(value(&text, "model_tracer_requests_total"), Some(2.0));
    assert_eq!(
        lines(&text, "model_tracer_requests_corrupted_total").len(),
        1
    );
    // Every layer's residual ratio now.
    assert_eq!(lines(&text, "model_tracer_residual_ratio").len(), 30);
    // The lens ran on the generated positions of the clean request.
    let decided = value(&text, "model_tracer_lens_decisive_layer_count").expect("a histogram");
    assert!(decided >= 1.0, "{text}");
}

#[test]
fn the_synthetic_decoder_feeds_the_same_families() {
    let mut m = common::tiny_model(Full, 8);
    let (registry, metrics, sink) = with_metrics(&mut m);
    m.set_fault(Some(common::nan_at(2, 5)));
    let tokens: Vec<u32> = (0..12).map(|i| (i * 53 + 7) % 512).collect();
    common::run_tokens(&mut m, &tokens);
    sink.finish_request();
    assert_eq!(metrics.forwards(), 12);
    let text = scrape(&registry);
    assert_eq!(
        lines(&text, "model_tracer_requests_corrupted_total"),
        [r#"model_tracer_requests_corrupted_total{origin_layer="2",origin_stage="post_attn"} 1"#],
        "{text}"
    );
    // The injected position at layer 2; then the forwards that read the
    // cache entry of layer 3 it poisoned, produced there (layer 3's
    // input is clean in them): the request's origin stays layer 2.
    assert_eq!(
        value(
            &text,
            r#"model_tracer_anomalies_total{kind="nan",layer="2",stage="post_attn"}"#
        ),
        Some(1.0),
        "{text}"
    );
    let later = m
        .tracer()
        .forwards()
        .filter(|f| f.position > 5)
        .filter(|f| {
            f.anomalies
                .iter()
                .any(|a| a.kind.is_non_finite() && a.layer == Some(3))
        })
        .count();
    assert!(later >= 1);
    assert_eq!(
        value(
            &text,
            r#"model_tracer_anomalies_total{kind="nan",layer="3",stage="post_attn"}"#
        ),
        Some(later as f64),
        "{text}"
    );
    assert_eq!(
        lines(&text, "model_tracer_anomalies_total").len(),
        2,
        "{text}"
    );
    // A cache of 8 positions over 12 tokens evicts.
    let evictions = value(&text, "model_tracer_kv_evictions_total").expect("a counter");
    let want: usize = m
        .tracer()
        .forwards()
        .filter_map(|f| f.kv_cache.as_ref())
        .map(|k| k.evictions_this_step)
        .sum();
    assert!(want > 0);
    assert_eq!(evictions, want as f64);
}
