//! The forward sink: one flushed JSON line per completed forward.
#![cfg(feature = "serde")]

use std::collections::BTreeSet;
use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use model_tracer::{
    Disabled, Full, JsonlSink, Lightweight, ModelTracer, SinkHandle, Stage, TraceConfig,
};
use serde_json::Value;

/// A writer that shares what it got, counts flushes, and can be told to fail.
#[derive(Clone, Default)]
struct Probe {
    bytes: Arc<Mutex<Vec<u8>>>,
    flushes: Arc<Mutex<usize>>,
    writes: Arc<Mutex<usize>>,
    fail_on_write: Option<usize>,
}

impl Write for Probe {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut n = self.writes.lock().unwrap();
        *n += 1;
        if Some(*n) == self.fail_on_write {
            return Err(io::Error::new(io::ErrorKind::StorageFull, "disk full"));
        }
        self.bytes.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        *self.flushes.lock().unwrap() += 1;
        Ok(())
    }
}

impl Probe {
    fn text(&self) -> String {
        String::from_utf8(self.bytes.lock().unwrap().clone()).unwrap()
    }
    fn flushes(&self) -> usize {
        *self.flushes.lock().unwrap()
    }
}

fn forward<C: TraceConfig>(t: &mut ModelTracer<C>, pos: usize, x: &[f32]) {
    t.begin_forward(pos);
    t.activation(0, Stage::Embedding, x);
    for layer in 0..3 {
        for s in Stage::LAYER_STAGES {
            t.activation(layer, s, x);
        }
        t.attention(layer, 0, pos, &[0.5, 0.25, 0.25]);
    }
    t.end_forward();
}

#[test]
fn each_forward_is_one_line_flushed_at_end_forward() {
    let probe = Probe::default();
    let mut t = ModelTracer::new(Full);
    assert!(t
        .set_sink(Some(SinkHandle::new(JsonlSink::new(probe.clone()))))
        .is_none());
    for pos in 0..5 {
        t.begin_forward(pos);
        t.activation(0, Stage::Input, &[1.0, 2.0]);
        // Nothing of the forward in flight is written before it ends.
        assert_eq!(probe.text().lines().count(), pos);
        t.end_forward();
        let text = probe.text();
        assert!(text.ends_with('\n'));
        assert_eq!(text.lines().count(), pos + 1);
        assert_eq!(probe.flushes(), pos + 1, "flushed at every end_forward");
        let last: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
        assert_eq!(last["position"], pos);
    }
    assert_eq!(t.sink().unwrap().status().forwards_written, 5);
    assert!(t.sink().unwrap().status().failure.is_none());
}

#[test]
fn a_file_holds_every_completed_forward_while_the_tracer_runs() {
    let dir = std::env::temp_dir().join(format!("sink-file-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("trace.jsonl");
    let file = std::fs::File::create(&path).unwrap();
    let mut t = ModelTracer::new(Lightweight);
    t.set_sink(Some(SinkHandle::new(JsonlSink::new(io::BufWriter::new(
        file,
    )))));
    for pos in 0..4 {
        forward(&mut t, pos, &[1.0, -1.0, 0.5]);
        // Read back while the sink (and its BufWriter) is alive: a crash
        // here would lose nothing already ended.
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), pos + 1);
    }
    t.begin_forward(4);
    t.activation(0, Stage::Input, &[1.0]);
    // The forward in flight is the only thing not on disk.
    assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 4);
    drop(t);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_write_error_stops_the_sink_and_is_reported() {
    let probe = Probe {
        fail_on_write: Some(3),
        ..Probe::default()
    };
    let mut t = ModelTracer::new(Lightweight);
    t.set_sink(Some(SinkHandle::new(JsonlSink::new(probe.clone()))));
    for pos in 10..16 {
        forward(&mut t, pos, &[1.0, 2.0]);
    }
    let status = t.sink().unwrap().status();
    assert_eq!(status.forwards_written, 2);
    let failure = status.failure.unwrap();
    assert_eq!(failure.position, 12);
    assert_eq!(failure.kind, io::ErrorKind::StorageFull);
    assert!(failure.to_string().contains("position 12"), "{failure}");
    // Nothing after the failure reached the writer: no torn lines.
    assert_eq!(*probe.writes.lock().unwrap(), 3);
    assert_eq!(probe.text().lines().count(), 2);
}

#[test]
fn clones_share_the_sink_and_clear_keeps_it() {
    let probe = Probe::default();
    let mut a = ModelTracer::new(Full);
    a.set_sink(Some(SinkHandle::new(JsonlSink::new(probe.clone()))));
    let mut b = a.clone();
    forward(&mut a, 0, &[1.0]);
    forward(&mut b, 100, &[2.0]);
    b.clear();
    forward(&mut b, 101, &[2.0]);
    let positions: Vec<u64> = probe
        .text()
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["position"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(positions, vec![0, 100, 101]);
    assert_eq!(a.sink().unwrap().status().forwards_written, 3);
    // Removing the sink hands it back and stops writing.
    let old = a.set_sink(None).unwrap();
    forward(&mut a, 1, &[1.0]);
    assert_eq!(old.status().forwards_written, 3);
}

#[test]
fn a_tracer_that_never_records_never_writes() {
    let probe = Probe::default();
    let mut t = ModelTracer::new(Disabled);
    let back = t.set_sink(Some(SinkHandle::new(JsonlSink::new(probe.clone()))));
    assert!(back.is_some(), "the sink is handed back");
    assert!(t.sink().is_none());
    forward(&mut t, 0, &[1.0]);
    assert!(probe.text().is_empty());
}

/// The column names of the JSON Lines schema table in `features.md`.
fn documented_columns() -> Vec<(String, String)> {
    let doc = include_str!("../features.md");
    let start = doc
        .find("<!-- jsonl-schema -->")
        .expect("features.md has a JSON Lines schema table");
    let end = doc[start..].find("<!-- /jsonl-schema -->").unwrap() + start;
    doc[start..end]
        .lines()
        .filter_map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            // | `name` | group | type | meaning |
            let name = cells.get(1)?.strip_prefix('`')?.strip_suffix('`')?;
            Some((name.to_string(), cells.get(2)?.to_string()))
        })
        .collect()
}

#[test]
fn every_line_has_exactly_the_documented_columns_and_groups_align() {
    let probe = Probe::default();
    let mut t = ModelTracer::new(Full);
    t.set_sink(Some(SinkHandle::new(JsonlSink::new(probe.clone()))));
    forward(&mut t, 0, &[1.0, 2.0, 3.0]);
    forward(&mut t, 1, &[1.0, f32::NAN, f32::INFINITY]);
    let documented = documented_columns();
    let names: BTreeSet<&str> = documented.iter().map(|(n, _)| n.as_str()).collect();
    assert!(names.len() > 40, "{names:?}");
    for line in probe.text().lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        let obj = v.as_object().unwrap();
        let keys: BTreeSet<&str> = obj.keys().map(String::as_str).collect();
        assert_eq!(keys, names, "columns differ from features.md");
        // Every array column of a group has the group's length.
        let mut lens = std::collections::BTreeMap::new();
        for (name, group) in &documented {
            if let Some(a) = obj[name].as_array() {
                let n = lens.entry(group.clone()).or_insert(a.len());
                assert_eq!(*n, a.len(), "column {name} of group {group}");
            }
        }
    }
    let second: Value = serde_json::from_str(probe.text().lines().nth(1).unwrap()).unwrap();
    // NaN and Inf are written as names, never as null.
    assert_eq!(second["act_nan_count"][0], 1);
    assert_eq!(second["act_inf_count"][0], 1);
    assert_eq!(second["anomaly_kind"][0], "nan");
    assert_eq!(second["anomaly_value"][0], "NaN");
    assert_eq!(second["anomaly_stage"][0], "embedding");
    assert_eq!(second["anomaly_layer"][0], Value::Null);
}

/// Logits over `vocab` ids in which id 0 has rank `rank`.
fn ranking_id_0_at(vocab: usize, rank: usize) -> Vec<f32> {
    (0..vocab)
        .map(|i| match i {
            0 => 0.0,
            i if i <= rank => 1.0,
            _ => -1.0,
        })
        .collect()
}

#[test]
fn lens_decisive_marks_the_largest_log_rank_gain() {
    let probe = Probe::default();
    let mut t = ModelTracer::new(Full);
    t.set_sink(Some(SinkHandle::new(JsonlSink::new(probe.clone()))));
    t.begin_forward(0);
    // Id 0 drops 900 places at layer 1 but goes from rank 100 to the top
    // at layer 3: the log-rank rule picks layer 3, the absolute one layer 1.
    let rows: Vec<Vec<f32>> = [1000, 100, 100, 0]
        .iter()
        .map(|&r| ranking_id_0_at(1001, r))
        .collect();
    for (layer, row) in rows.iter().enumerate() {
        t.logit_lens(layer, row.len(), |out| out.copy_from_slice(row));
    }
    t.final_logits(&rows[3]);
    t.end_forward();
    let tok = t
        .last_forward()
        .unwrap()
        .logits
        .as_ref()
        .unwrap()
        .token(0)
        .unwrap();
    assert_eq!(tok.ranks, vec![1000, 100, 100, 0]);
    assert_eq!(tok.decisive_layer(), Some(1));

    let line: Value = serde_json::from_str(probe.text().lines().next().unwrap()).unwrap();
    let col = |name: &str| line[name].as_array().unwrap().clone();
    let (ids, layers, decisive) = (col("lens_token"), col("lens_layer"), col("lens_decisive"));
    let marked: Vec<u64> = (0..ids.len())
        .filter(|&i| ids[i] == 0 && decisive[i] == true)
        .map(|i| layers[i].as_u64().unwrap())
        .collect();
    assert_eq!(marked, vec![3]);
}

#[test]
fn act_fingerprint_holds_sixteen_floats_per_stage_or_null() {
    let x = [1.0, -2.0, 0.5, 4.0, f32::NAN];
    let line = |full: bool| {
        let probe = Probe::default();
        if full {
            let mut t = ModelTracer::new(Full);
            t.set_sink(Some(SinkHandle::new(JsonlSink::new(probe.clone()))));
            forward(&mut t, 0, &x);
        } else {
            let mut t = ModelTracer::new(Lightweight);
            t.set_sink(Some(SinkHandle::new(JsonlSink::new(probe.clone()))));
            forward(&mut t, 0, &x);
        }
        serde_json::from_str::<Value>(probe.text().lines().next().unwrap()).unwrap()
    };
    let full = line(true);
    let stages = full["act_stage"].as_array().unwrap().len();
    let prints = full["act_fingerprint"].as_array().unwrap();
    assert_eq!(prints.len(), stages);
    let want = model_tracer::fingerprint::fingerprint(&x);
    for p in prints {
        let values: Vec<f32> = p
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(values, want.0.to_vec());
    }
    let light = line(false);
    let nulls = light["act_fingerprint"].as_array().unwrap();
    assert_eq!(nulls.len(), stages);
    assert!(nulls.iter().all(Value::is_null), "{nulls:?}");
}
