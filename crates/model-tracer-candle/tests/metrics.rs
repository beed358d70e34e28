//! The candle model feeds the tracer's fleet metrics through its sink, as
//! the reference decoder does: the same families, a NaN injected at layer 7
//! counted where it was produced.

use model_tracer::metrics::prometheus_client::encoding::text::encode;
use model_tracer::metrics::prometheus_client::registry::Registry;
use model_tracer::metrics::TraceMetrics;
use model_tracer::{Full, SinkHandle};
use model_tracer_candle::CandleLlama;
use model_tracer_llama::model::Fault;
use model_tracer_test_support::real_model;

/// Sample lines of `family` (its name followed by labels or a space).
fn lines<'a>(text: &'a str, family: &str) -> Vec<&'a str> {
    text.lines()
        .filter(|l| {
            l.strip_prefix(family)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .collect()
}

fn value(line: &str) -> f64 {
    line.rsplit_once(' ')
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(f64::NAN)
}

#[test]
fn smollm2_on_candle_exports_the_families_with_a_nan_at_its_origin() {
    let Some(path) = real_model() else {
        return;
    };
    let mut m = CandleLlama::from_gguf(&path, Some(64), Full).expect("the model loads");
    let mut registry = Registry::default();
    let metrics = TraceMetrics::register(&mut registry);
    let sink = metrics.sink();
    m.tracer_mut().set_sink(Some(SinkHandle::new(sink.clone())));
    let prompt = m
        .tokenizer
        .as_ref()
        .expect("a tokenizer")
        .encode("The capital of France is");

    // A clean request first: every family but the corrupted one.
    m.generate(&prompt, 2, |_| {}).expect("generates");
    sink.finish_request();
    let clean = metrics.forwards();
    assert_eq!(clean as usize, m.tracer().summary().forwards);
    let mut text = String::new();
    encode(&mut text, &registry).expect("encodes");
    for (family, series) in [
        ("model_tracer_activation_rms", 30 * 6 + 3),
        ("model_tracer_activation_max_abs", 30 * 6 + 3),
        ("model_tracer_residual_ratio", 30),
        ("model_tracer_attention_sink_share", 30),
        ("model_tracer_forwards_total", 1),
        ("model_tracer_requests_total", 1),
        ("model_tracer_kv_evictions_total", 1),
    ] {
        let got = lines(&text, family);
        assert_eq!(got.len(), series, "{family}: {text}");
        assert!(got.iter().all(|l| value(l).is_finite()), "{family}");
    }
    assert!(lines(&text, "model_tracer_requests_corrupted_total").is_empty());
    let decided = lines(&text, "model_tracer_lens_decisive_layer_count");
    assert!(value(decided[0]) >= 1.0, "{text}");
    // The residual stream of SmolLM2 has its large outlier dimensions:
    // layer outputs reach far beyond their RMS.
    let rms = lines(
        &text,
        r#"model_tracer_activation_rms{layer="20",stage="output"}"#,
    );
    let max = lines(
        &text,
        r#"model_tracer_activation_max_abs{layer="20",stage="output"}"#,
    );
    assert!(value(max[0]) > 5.0 * value(rms[0]), "{} {}", rms[0], max[0]);

    // Then a request with a NaN at layer 7.
    m.clear_kv_cache();
    m.set_fault(Some(Fault::parse("nan@7").expect("a fault")));
    m.generate(&prompt, 2, |_| {}).expect("generates");
    sink.finish_request();
    let mut text = String::new();
    encode(&mut text, &registry).expect("encodes");
    assert_eq!(
        lines(&text, "model_tracer_requests_corrupted_total"),
        [r#"model_tracer_requests_corrupted_total{origin_layer="7",origin_stage="post_attn"} 1"#],
        "{text}"
    );
    let poisoned = metrics.forwards() - clean;
    let nan: Vec<&str> = lines(&text, "model_tracer_anomalies_total")
        .into_iter()
        .filter(|l| l.contains(r#"kind="nan""#))
        .collect();
    assert_eq!(
        nan,
        [format!(
            r#"model_tracer_anomalies_total{{kind="nan",layer="7",stage="post_attn"}} {poisoned}"#
        )],
        "{text}"
    );
}
