//! With the `log` feature each anomaly is a WARN record with structured
//! key-values, emitted at `end_forward`.
#![cfg(feature = "log")]

use std::collections::BTreeMap;
use std::sync::Mutex;

use log::kv::{Key, Value, VisitSource};
use model_tracer::{Lightweight, ModelTracer, Stage};

#[derive(Debug, Clone)]
struct Captured {
    level: log::Level,
    target: String,
    message: String,
    fields: BTreeMap<String, String>,
}

struct Capture(Mutex<Vec<Captured>>);

struct Fields<'a>(&'a mut BTreeMap<String, String>);

impl<'kvs> VisitSource<'kvs> for Fields<'_> {
    fn visit_pair(&mut self, key: Key<'kvs>, value: Value<'kvs>) -> Result<(), log::kv::Error> {
        self.0.insert(key.to_string(), value.to_string());
        Ok(())
    }
}

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        let mut fields = BTreeMap::new();
        record.key_values().visit(&mut Fields(&mut fields)).unwrap();
        if fields.is_empty() {
            // With the `tracing` feature on as well, a build in which some
            // crate turns on tracing's own `log` feature (the server's HTTP
            // stack does) also gets each tracing event forwarded as a plain
            // log record, its fields folded into the message. Those are
            // tracing's; this test is about the structured `log` records.
            return;
        }
        self.0.lock().unwrap().push(Captured {
            level: record.level(),
            target: record.target().to_string(),
            message: record.args().to_string(),
            fields,
        });
    }
    fn flush(&self) {}
}

static CAPTURE: Capture = Capture(Mutex::new(Vec::new()));

fn forward(t: &mut ModelTracer<Lightweight>, pos: usize, bad_layer: Option<usize>) {
    t.begin_forward(pos);
    t.activation(0, Stage::Embedding, &[0.5, -0.5, 1.0]);
    for layer in 0..4 {
        for s in Stage::LAYER_STAGES {
            let past = bad_layer.is_some_and(|b| layer > b || (layer == b && s >= Stage::PostAttn));
            let x = if past {
                [1.0, f32::NAN, 2.0]
            } else {
                [1.0, -1.0, 0.25]
            };
            t.activation(layer, s, &x);
        }
    }
    t.end_forward();
}

#[test]
fn anomalies_become_structured_warnings_at_end_forward() {
    log::set_logger(&CAPTURE).unwrap();
    log::set_max_level(log::LevelFilter::Trace);
    let mut t = ModelTracer::new(Lightweight);
    forward(&mut t, 0, None);
    assert!(
        CAPTURE.0.lock().unwrap().is_empty(),
        "a clean forward is silent"
    );
    t.begin_forward(1);
    t.activation(2, Stage::PostAttn, &[f32::NAN]);
    assert!(
        CAPTURE.0.lock().unwrap().is_empty(),
        "nothing is emitted before end_forward"
    );
    t.end_forward();
    forward(&mut t, 2, Some(2));
    let got = CAPTURE.0.lock().unwrap().clone();
    assert_eq!(got.len(), 2, "{got:#?}");
    let at2 = &got[1];
    assert_eq!(at2.level, log::Level::Warn);
    assert_eq!(at2.target, "model_tracer::anomaly");
    let want: BTreeMap<String, String> = [
        ("position", "2"),
        ("layer", "2"),
        ("stage", "post_attn"),
        ("kind", "nan"),
        ("origin", "produced"),
        ("count", "1"),
        ("total", "3"),
        ("value", "NaN"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(at2.fields, want);
    assert_eq!(
        at2.message,
        "position 2, layer 2 post_attn: NaN produced here (1 of 3 values)"
    );
    assert_eq!(got[0].fields["position"], "1");
}
