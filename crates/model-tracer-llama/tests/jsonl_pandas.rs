//! The JSON Lines trace loads in pandas with `read_json(path, lines=True)`,
//! and the documented recipe turns it into tables with the right values.
#![cfg(feature = "serde")]

mod common;

use std::path::Path;
use std::process::Command;

use model_tracer::{Full, JsonlSink, SinkHandle, Stage, TraceConfig};
use model_tracer_llama::model::Llama;
use serde_json::Value;

/// The recipe of features.md, then facts about the frames as one JSON line.
const SCRIPT: &str = r#"
import json, sys
import pandas as pd

df = pd.read_json(sys.argv[1], lines=True)           # one row per forward

def table(df, prefix):                                 # one row per entry of a group
    cols = [c for c in df.columns if c.startswith(prefix)]
    rows = df[df[cols[0]].map(len) > 0]
    return rows[["position"] + cols].explode(cols, ignore_index=True)

acts = table(df, "act_")
acts["act_std"] = acts["act_std"].astype(float)      # "NaN"/"inf" strings become floats
grid = acts[acts.act_stage == "output"].pivot(index="act_layer", columns="position", values="act_std")
anoms = table(df, "anomaly_")
lens = table(df, "lens_")
attn = table(df, "attn_")
quant = table(df, "quant_")
probe_layer, probe_pos = int(sys.argv[2]), int(sys.argv[3])
probe = acts[(acts.act_layer == probe_layer) & (acts.position == probe_pos) & (acts.act_stage == "post_ffn")]
nan = anoms[anoms.anomaly_kind == "nan"]
print(json.dumps({
    "rows": int(len(df)),
    "positions": [int(p) for p in df["position"]],
    "grid_shape": list(grid.shape),
    "nan_rows": [[int(r.position), int(r.anomaly_layer), r.anomaly_stage, r.anomaly_origin] for r in nan.itertuples()],
    "nan_values": int(acts["act_nan_count"].astype(int).sum()),
    "probe_std": repr(float(probe["act_std"].iloc[0])),
    "lens_rows": int(len(lens)),
    "decisive": [[int(r.position), int(r.lens_token), int(r.lens_layer)]
                 for r in lens[lens["lens_decisive"].astype(bool)].itertuples()],
    "attn_rows": int(len(attn)),
    "quant_rows": int(len(quant)),
    "kv_evictions": int(df["kv_evictions"].sum()),
}))
"#;

fn pandas_facts(python: &str, path: &Path, layer: usize, pos: usize) -> Value {
    let out = Command::new(python)
        .arg("-c")
        .arg(SCRIPT)
        .arg(path)
        .arg(layer.to_string())
        .arg(pos.to_string())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pandas failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn stream_to(model: &mut Llama<impl TraceConfig>, path: &Path) {
    let file = std::fs::File::create(path).unwrap();
    let sink = SinkHandle::new(JsonlSink::new(std::io::BufWriter::new(file)));
    model.tracer_mut().set_sink(Some(sink));
}

#[test]
fn a_synthetic_trace_with_a_fault_loads_in_pandas() {
    let Some(python) = common::python_with("pandas") else {
        common::require(false, "python3 with pandas");
        return;
    };
    let dir = common::scratch_dir("jsonl-synthetic");
    let path = dir.join("trace.jsonl");
    let mut model = common::tiny_model(Full, 16);
    stream_to(&mut model, &path);
    model.set_fault(Some(common::nan_at(2, 6)));
    let tokens: Vec<u32> = (0..30).map(|i| (i * 53 + 7) % 512).collect();
    common::run_tokens(&mut model, &tokens);
    let status = model.tracer().sink().unwrap().status();
    assert_eq!(status.forwards_written, 30);

    let facts = pandas_facts(python, &path, 1, 3);
    assert_eq!(facts["rows"], 30);
    let positions: Vec<u64> = (0..30).collect();
    assert_eq!(facts["positions"], serde_json::json!(positions));
    // 4 layers × 30 positions of layer outputs.
    assert_eq!(facts["grid_shape"], serde_json::json!([4, 30]));
    // The NaN was found where it was injected, produced there, once per
    // forward that carried it: position 6 itself, then the forwards that
    // attend to its poisoned cache entry until it is evicted.
    let nan_rows = facts["nan_rows"].as_array().unwrap();
    assert_eq!(
        nan_rows[0],
        serde_json::json!([6, 2, "post_attn", "produced"])
    );
    let tracer = model.tracer();
    let nan_forwards = tracer
        .forwards()
        .filter(|f| {
            f.anomalies
                .iter()
                .any(|a| a.kind == model_tracer::AnomalyKind::NaN)
        })
        .count();
    assert_eq!(nan_rows.len(), nan_forwards);
    let nan_values: usize = tracer
        .forwards()
        .flat_map(|f| f.activations.recorded().map(|(_, _, s)| s.nan_count))
        .sum();
    assert_eq!(facts["nan_values"], nan_values);
    // A value read through pandas is the f32 the tracer recorded, exactly.
    let probe: f64 = facts["probe_std"].as_str().unwrap().parse().unwrap();
    let want = tracer
        .forwards()
        .find(|f| f.position == 3)
        .and_then(|f| f.activations.stats(1, Stage::PostFfn))
        .unwrap()
        .std;
    assert_eq!(
        (probe as f32).to_bits(),
        want.to_bits(),
        "{probe} vs {want}"
    );
    let lens_rows: usize = tracer
        .forwards()
        .flat_map(|f| f.logits.iter().flat_map(|l| &l.tokens))
        .map(|t| t.ranks.len())
        .sum();
    assert_eq!(facts["lens_rows"], lens_rows);
    // The decisive rows are the log-rank rule's layers, one per tracked
    // token that ever improved.
    let decisive: Vec<[usize; 3]> = tracer
        .forwards()
        .flat_map(|f| {
            f.logits.iter().flat_map(|l| &l.tokens).filter_map(|t| {
                t.decisive_layer_log_rank()
                    .map(|l| [f.position, t.token_id as usize, l])
            })
        })
        .collect();
    assert!(!decisive.is_empty());
    assert_eq!(facts["decisive"], serde_json::json!(decisive));
    assert_eq!(facts["attn_rows"], 30 * 4 * 4);
    assert!(facts["quant_rows"].as_u64().unwrap() >= 30 * 4 * 5);
    assert_eq!(facts["kv_evictions"], 30 - 16);
}

#[test]
fn a_real_model_trace_loads_in_pandas() {
    let Some(gguf) = common::real_model() else {
        return;
    };
    let Some(python) = common::python_with("pandas") else {
        common::require(false, "python3 with pandas");
        return;
    };
    let dir = common::scratch_dir("jsonl-real");
    let path = dir.join("trace.jsonl");
    let mut model = Llama::from_gguf(&gguf, None, Full).unwrap();
    stream_to(&mut model, &path);
    let prompt = model
        .tokenizer
        .as_ref()
        .unwrap()
        .encode("The capital of France is");
    let generation = model.generate(&prompt, 4, |_| {});
    let forwards = prompt.len() + generation.tokens.len() - 1;
    assert_eq!(
        model.tracer().sink().unwrap().status().forwards_written,
        forwards
    );
    let facts = pandas_facts(python, &path, 10, 2);
    assert_eq!(facts["rows"], forwards);
    assert_eq!(facts["grid_shape"], serde_json::json!([30, forwards]));
    assert_eq!(facts["attn_rows"], forwards * 30 * 9);
    assert_eq!(facts["nan_values"], 0);
    let probe: f64 = facts["probe_std"].as_str().unwrap().parse().unwrap();
    let want = model
        .tracer()
        .forwards()
        .find(|f| f.position == 2)
        .and_then(|f| f.activations.stats(10, Stage::PostFfn))
        .unwrap()
        .std;
    assert_eq!((probe as f32).to_bits(), want.to_bits());
}
