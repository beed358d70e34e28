//! A traced batched prefill records what the same prompt run one position
//! at a time records: every `ForwardTrace`, JSON Lines row and summary, and
//! an injected fault at its layer and position.
#![cfg(feature = "serde")]

use model_tracer::TraceConfig;
use model_tracer_llama::dtype::GgmlType;
use model_tracer_llama::model::{synthetic_weights, Config, KvCacheOptions, KvType, Llama};

fn tiny<C: TraceConfig>(trace: C, ty: GgmlType, capacity: usize, sinks: usize) -> Llama<C> {
    let c = Config::tiny();
    let w = match synthetic_weights(&c, ty, 9) {
        Ok(w) => w,
        Err(e) => panic!("synthetic weights: {e}"),
    };
    match Llama::new(
        c,
        w,
        None,
        KvCacheOptions {
            capacity,
            sinks,
            kv_type: KvType::F32,
        },
        trace,
    ) {
        Ok(m) => m,
        Err(e) => panic!("model: {e}"),
    }
}

/// A prompt of `n` tokens, one out-of-vocabulary id (read as token 0).
fn prompt(n: usize) -> Vec<u32> {
    (0..n as u32)
        .map(|i| {
            if i == 5 {
                9999
            } else {
                (i * 2_654_435_761u32) % 512
            }
        })
        .collect()
}

/// A shared buffer for a JSON Lines sink.
#[derive(Clone, Default)]
struct Shared(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Shared {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self.0.lock() {
            Ok(mut v) => v.extend_from_slice(buf),
            Err(_) => return Err(std::io::ErrorKind::Other.into()),
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct Run {
    forwards: Vec<String>,
    jsonl: String,
    summary: String,
    tokens: Vec<u32>,
    first_anomaly: Option<model_tracer::Anomaly>,
}

/// The tiny model traced under `trace` (every forward kept, every brick
/// measured, logits of `logit_rows`), a prompt of `n` tokens run by chunks
/// of `chunk`, then 3 generated tokens.
fn traced_run<C: TraceConfig>(
    trace: C,
    logit_rows: model_tracer::LogitRows,
    chunk: usize,
    n: usize,
    fault: Option<model_tracer_llama::model::Fault>,
    capacity: usize,
) -> Run {
    use model_tracer::{JsonlSink, ModelTracer, QuantSampling, SinkHandle, TraceOptions};
    let mut m = tiny(trace.clone(), GgmlType::Q4_1, capacity, 4);
    // Shared with no other model: changed in place.
    std::sync::Arc::make_mut(&mut m.weights).output.weight =
        match model_tracer_llama::quant::QMatrix::from_f32(
            GgmlType::Q8_0,
            m.config.vocab_size,
            m.config.dim,
            &m.weights.output.weight.to_f32(),
        ) {
            Ok(w) => w,
            Err(e) => panic!("{e}"),
        };
    let options = TraceOptions {
        max_forwards: 1024,
        logit_rows,
        ..TraceOptions::default()
    };
    *m.tracer_mut() = ModelTracer::with_options(trace, options);
    m.tracer_mut().set_quant_sampling(QuantSampling::Every);
    let out = Shared::default();
    m.tracer_mut()
        .set_sink(Some(SinkHandle::new(JsonlSink::new(out.clone()))));
    m.set_what_if(&[GgmlType::Q8_0]).unwrap();
    m.set_fault(fault);
    m.set_prefill_chunk(chunk);
    let g = m.generate(&prompt(n), 3, |_| {});
    let forwards: Vec<String> = m.tracer().forwards().map(|f| format!("{f:?}")).collect();
    let first_anomaly = m
        .tracer()
        .forwards()
        .find_map(|f| f.primary_anomaly().copied());
    let jsonl = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
    Run {
        forwards,
        jsonl,
        summary: format!("{}", m.tracer().summary()),
        tokens: g.tokens,
        first_anomaly,
    }
}

#[test]
fn a_traced_chunked_prefill_records_what_one_position_at_a_time_records() {
    use model_tracer::{Full, Lightweight, LogitRows};
    // Every record of every position, JSON Lines rows, summary: equal
    // (Debug text: equal bits, NaN included). Every product and every
    // attention row is bit for bit the one-position path's, so no
    // rounding is allowed for.
    for (chunk, n, capacity) in [(5, 13, 1024), (64, 20, 1024), (4, 19, 12)] {
        let one = traced_run(Full, LogitRows::Every, 1, n, None, capacity);
        let many = traced_run(Full, LogitRows::Every, chunk, n, None, capacity);
        assert_eq!(one.forwards.len(), n + 2);
        assert_eq!(one.tokens, many.tokens);
        assert_eq!(
            one.forwards, many.forwards,
            "chunk {chunk}, {n} tokens, cache {capacity}"
        );
        assert_eq!(one.jsonl, many.jsonl);
        assert_eq!(one.summary, many.summary);
        let one = traced_run(Lightweight, LogitRows::Every, 1, n, None, capacity);
        let many = traced_run(Lightweight, LogitRows::Every, chunk, n, None, capacity);
        assert_eq!(one.forwards, many.forwards);
        assert_eq!(one.jsonl, many.jsonl);
    }
}

#[test]
fn by_default_only_the_last_row_of_a_chunk_has_logits() {
    use model_tracer::{Full, LogitRows};
    let one = traced_run(Full, LogitRows::Every, 1, 12, None, 1024);
    let many = traced_run(Full, LogitRows::Last, 5, 12, None, 1024);
    assert_eq!(one.tokens, many.tokens);
    // Chunks 0..5, 5..10, 10..12: rows 4, 9 and 11 end a chunk; the
    // generated positions 12 and 13 are forwards of one row.
    for (pos, (a, b)) in one.forwards.iter().zip(&many.forwards).enumerate() {
        let has_logits = [4, 9, 11, 12, 13].contains(&pos);
        assert_eq!(a == b, has_logits, "position {pos}");
        assert_eq!(b.contains("logits: Some("), has_logits, "position {pos}");
    }
}

#[test]
fn a_fault_in_a_chunked_prefill_is_found_at_its_layer_and_position() {
    use model_tracer::{AnomalyKind, Lightweight, LogitRows, Origin, Stage};
    use model_tracer_llama::model::{Fault, FaultKind};
    for (kind, stage) in [
        (FaultKind::NaN, Stage::PostAttn),
        (FaultKind::Inf, Stage::PostFfn),
        (FaultKind::Explode, Stage::PostFfn),
    ] {
        for (layer, position) in [(0, 0), (2, 7), (3, 11)] {
            let fault = Fault {
                kind,
                layer,
                position: Some(position),
            };
            let one = traced_run(Lightweight, LogitRows::Last, 1, 12, Some(fault), 1024);
            let many = traced_run(Lightweight, LogitRows::Last, 8, 12, Some(fault), 1024);
            let a = many.first_anomaly.expect("the fault is found");
            assert_eq!(a.position, position, "{kind:?}@{layer}");
            assert_eq!((a.layer, a.stage), (Some(layer), stage), "{kind:?}@{layer}");
            assert_eq!(a.origin, Origin::Produced);
            if kind == FaultKind::NaN {
                assert_eq!(a.kind, AnomalyKind::NaN);
            }
            // Debug text: the anomaly's value is NaN, which is not `==` itself.
            assert_eq!(format!("{:?}", Some(a)), format!("{:?}", one.first_anomaly));
        }
    }
}

#[test]
fn smollm2_traced_chunked_prefill_records_what_one_position_at_a_time_records() {
    use model_tracer::{Full, LogitRows, ModelTracer, QuantSampling, TraceOptions};
    let Some(path) = model_tracer_test_support::real_model() else {
        return;
    };
    let run = |chunk: usize| {
        let mut m = match Llama::from_gguf(&path, None, Full) {
            Ok(m) => m,
            Err(e) => panic!("{e}"),
        };
        let options = TraceOptions {
            logit_rows: LogitRows::Every,
            ..TraceOptions::default()
        };
        *m.tracer_mut() = ModelTracer::with_options(Full, options);
        m.tracer_mut().set_quant_sampling(QuantSampling::Every);
        m.set_prefill_chunk(chunk);
        let ids = m
            .tokenizer
            .as_ref()
            .unwrap()
            .encode("The capital of France is");
        let g = m.generate(&ids, 3, |_| {});
        let forwards: Vec<String> = m.tracer().forwards().map(|f| format!("{f:?}")).collect();
        (g.tokens, forwards, format!("{}", m.tracer().summary()))
    };
    let (one, many) = (run(1), run(64));
    assert_eq!(one.0, [7042, 30, 198]);
    assert_eq!(one.1.len(), 5 + 2);
    assert_eq!(one, many);
}
