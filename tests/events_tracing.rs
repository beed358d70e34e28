//! With the `tracing` feature each anomaly is a WARN event with structured
//! fields, emitted at `end_forward`.
#![cfg(feature = "tracing")]

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex};

use model_tracer::{Full, ModelTracer, Stage};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Metadata, Subscriber};

/// Level, target and fields of one event.
type Captured = (Level, String, BTreeMap<String, String>);

/// A subscriber that records every event.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<Captured>>>);

struct Fields<'a>(&'a mut BTreeMap<String, String>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn Debug) {
        self.0
            .insert(field.name().to_string(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_string(), value.to_string());
    }
}

impl Subscriber for Capture {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }
    fn record(&self, _: &Id, _: &Record<'_>) {}
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, event: &Event<'_>) {
        let mut fields = BTreeMap::new();
        event.record(&mut Fields(&mut fields));
        let m = event.metadata();
        self.0
            .lock()
            .unwrap()
            .push((*m.level(), m.target().to_string(), fields));
    }
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}

#[test]
fn anomalies_become_structured_warn_events() {
    let capture = Capture::default();
    let mut t = ModelTracer::new(Full);
    tracing::subscriber::with_default(capture.clone(), || {
        t.begin_forward(4);
        t.activation(0, Stage::Embedding, &[1.0, 2.0]);
        t.activation(0, Stage::Input, &[1.0, 2.0]);
        t.end_forward();
        t.begin_forward(5);
        t.activation(0, Stage::Embedding, &[1.0, f32::INFINITY]);
        t.activation(0, Stage::Input, &[f32::NAN, 2.0]);
        t.end_forward();
    });
    let got = capture.0.lock().unwrap().clone();
    assert_eq!(got.len(), 2, "{got:#?}");
    let (level, target, inf) = &got[0];
    assert_eq!(*level, Level::WARN);
    assert_eq!(target, "model_tracer::anomaly");
    assert_eq!(inf["position"], "5");
    assert!(
        !inf.contains_key("layer"),
        "the embedding has no layer: {inf:?}"
    );
    assert_eq!(inf["stage"], "embedding");
    assert_eq!(inf["kind"], "inf");
    assert_eq!(inf["origin"], "produced");
    assert_eq!(inf["value"], "inf");
    assert!(
        inf["message"].contains("embedding: Inf produced here"),
        "{inf:?}"
    );
    let nan = &got[1].2;
    assert_eq!((nan["layer"].as_str(), nan["kind"].as_str()), ("0", "nan"));
    assert_eq!(nan["origin"], "propagated");
    assert_eq!((nan["count"].as_str(), nan["total"].as_str()), ("1", "2"));
}
