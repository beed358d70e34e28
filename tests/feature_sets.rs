//! What `DefaultTrace` becomes under each cargo feature set, seen from a
//! dependent crate.

use model_tracer::{DefaultTrace, ModelTracer, TraceConfig};

#[test]
fn default_trace_is_the_richest_enabled_feature() {
    let expected = if cfg!(feature = "trace-full") {
        (true, true, true, true, true)
    } else if cfg!(feature = "trace-lightweight") {
        (true, false, false, false, true)
    } else {
        (false, false, false, false, false)
    };
    let got = (
        DefaultTrace::ACTIVATIONS,
        DefaultTrace::ATTENTION,
        DefaultTrace::LOGITS,
        DefaultTrace::QUANT_ERROR,
        DefaultTrace::KV_CACHE,
    );
    assert_eq!(got, expected);
}

#[test]
fn the_default_tracer_is_zero_sized_exactly_when_tracing_is_off() {
    let tracer: ModelTracer = ModelTracer::default();
    let traced = cfg!(any(feature = "trace-full", feature = "trace-lightweight"));
    assert_eq!(std::mem::size_of_val(&tracer) == 0, !traced);
    assert_eq!(tracer.is_enabled(), traced);
}
