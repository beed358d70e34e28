//! The Grafana dashboard and the Prometheus alert rules of `dashboards/`
//! name only families the metrics export (or `model-tracer serve`'s
//! serving families, as features.md documents them), and cover the health
//! and serving panels.
#![cfg(all(feature = "metrics", feature = "serde"))]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use model_tracer::metrics::prometheus_client::{encoding::text::encode, registry::Registry};
use model_tracer::metrics::TraceMetrics;
use model_tracer::{Full, KvCacheStateTrace, ModelTracer, SinkHandle, Stage};
use serde_json::Value;

fn dashboards() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("dashboards")
}

/// The sample names a scrape can hold: each family's `# TYPE` line with
/// its type's suffixes, after a forward of every system with a NaN (a
/// family with labels shows no line before its first series).
fn exported_names() -> BTreeSet<String> {
    let mut registry = Registry::default();
    let metrics = TraceMetrics::register(&mut registry);
    let sink = metrics.sink();
    let mut t = ModelTracer::new(Full);
    t.set_sink(Some(SinkHandle::new(sink.clone())));
    t.begin_forward(1);
    for layer in 0..2 {
        t.activation(layer, Stage::Input, &[1.0, -2.0, 0.5]);
        t.activation(layer, Stage::PostAttn, &[0.5, f32::NAN, 0.25]);
        t.attention(layer, 0, 1, &[0.75, 0.25]);
        t.residual(layer, &[1.0, -2.0, 0.5], &[0.5, 0.5, 0.25]);
        t.logit_lens(layer, 4, |out| {
            out.copy_from_slice(&[0.0, 1.0, 2.0 - layer as f32 * 4.0, 3.0])
        });
    }
    t.final_logits(&[0.0, 1.0, 9.0, 3.0]);
    t.kv_state(|| KvCacheStateTrace::new(1, 8));
    t.end_forward();
    sink.finish_request();
    let mut text = String::new();
    encode(&mut text, &registry).expect("encodes");
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let (name, kind) = rest.split_once(' ').expect("a name and a type");
        let suffixes: &[&str] = match kind {
            "counter" => &["_total"],
            "gauge" => &[""],
            "histogram" => &["_bucket", "_sum", "_count"],
            other => panic!("unexpected type {other}"),
        };
        for s in suffixes {
            names.insert(format!("{name}{s}"));
        }
    }
    names
}

/// The sample names of `model-tracer serve`'s serving families: the table
/// of features.md's "Fleet metrics" subsection on the server (the serve
/// tests check that table against a scrape of the server).
fn served_names() -> BTreeSet<String> {
    let doc = include_str!("../features.md");
    let start = doc
        .find("### Served: `GET /metrics` of `model-tracer serve`")
        .expect("the subsection on the server");
    let section = &doc[start..];
    let end = section.find("\n## ").unwrap_or(section.len());
    let mut names = BTreeSet::new();
    for line in section[..end].lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let Some(name) = cells
            .get(1)
            .and_then(|c| c.strip_prefix('`'))
            .and_then(|c| c.strip_suffix('`'))
            .filter(|c| c.starts_with("model_tracer_"))
        else {
            continue;
        };
        let suffixes: &[&str] = match cells[2] {
            "counter" | "gauge" => &[""],
            "histogram" => &["_bucket", "_sum", "_count"],
            other => panic!("unexpected type {other} of {name}"),
        };
        for s in suffixes {
            names.insert(format!("{name}{s}"));
        }
    }
    assert!(names.len() >= 8, "{names:?}");
    names
}

/// Every `model_tracer_…` identifier in `text`.
fn names_in(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("model_tracer_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        if end > "model_tracer_".len() {
            out.insert(tail[..end].to_string());
        }
        rest = &tail[end..];
    }
    out
}

/// Every string under the key `key`, anywhere in `v`.
fn strings_at<'a>(v: &'a Value, key: &str, out: &mut Vec<&'a str>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                match x {
                    Value::String(s) if k == key => out.push(s),
                    _ => strings_at(x, key, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| strings_at(x, key, out)),
        _ => {}
    }
}

#[test]
fn the_dashboard_parses_and_names_only_exported_families() {
    let path = dashboards().join("model-tracer.json");
    let text = std::fs::read_to_string(&path).expect("the dashboard is there");
    let d: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    assert!(d["schemaVersion"].as_u64().is_some_and(|v| v >= 39));
    assert!(d["uid"].is_string() && d["title"].is_string());

    // A Prometheus data source variable, used by every panel and query.
    let vars = d["templating"]["list"].as_array().expect("variables");
    let ds = vars
        .iter()
        .find(|v| v["type"] == "datasource")
        .expect("a data source variable");
    assert_eq!(ds["query"], "prometheus");
    let uid = format!("${{{}}}", ds["name"].as_str().expect("a name"));
    let panels = d["panels"].as_array().expect("panels");
    let mut health = 0;
    for p in panels.iter().filter(|p| p["type"] != "row") {
        assert_eq!(p["datasource"]["type"], "prometheus", "{}", p["title"]);
        assert_eq!(p["datasource"]["uid"], uid.as_str(), "{}", p["title"]);
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{}", p["title"]);
        for t in targets {
            assert_eq!(t["datasource"]["uid"], uid.as_str());
            assert!(t["expr"]
                .as_str()
                .is_some_and(|e| e.contains("model_tracer_")));
        }
        health += 1;
    }
    assert!(health >= 15);
    // Panel ids are unique; panels do not overlap in the grid.
    let ids: BTreeSet<u64> = panels.iter().filter_map(|p| p["id"].as_u64()).collect();
    assert_eq!(ids.len(), panels.len());
    let mut cells = BTreeSet::new();
    for p in panels {
        let g = &p["gridPos"];
        let (x, y, w, h) = (
            g["x"].as_u64().expect("x"),
            g["y"].as_u64().expect("y"),
            g["w"].as_u64().expect("w"),
            g["h"].as_u64().expect("h"),
        );
        assert!(x + w <= 24, "{}", p["title"]);
        for cx in x..x + w {
            for cy in y..y + h {
                assert!(
                    cells.insert((cx, cy)),
                    "{} overlaps at {cx},{cy}",
                    p["title"]
                );
            }
        }
    }

    let mut exprs = Vec::new();
    strings_at(&d, "expr", &mut exprs);
    strings_at(&d, "definition", &mut exprs);
    let used: BTreeSet<String> = exprs.iter().flat_map(|e| names_in(e)).collect();
    let mut exported = exported_names();
    exported.extend(served_names());
    let unknown: Vec<_> = used.difference(&exported).collect();
    assert!(unknown.is_empty(), "not exported: {unknown:?}");
    // The serving panels: latencies, statuses, the queue, the KV cache.
    for family in [
        "model_tracer_time_to_first_token_seconds_bucket",
        "model_tracer_inter_token_latency_seconds_bucket",
        "model_tracer_completion_requests_total",
        "model_tracer_requests_running",
        "model_tracer_requests_waiting",
        "model_tracer_kv_cache_usage_ratio",
    ] {
        assert!(used.contains(family), "no panel shows {family}");
    }
    // The health panels: every family but the plain request count is on it.
    for family in [
        "model_tracer_requests_corrupted_total",
        "model_tracer_anomalies_total",
        "model_tracer_activation_rms",
        "model_tracer_activation_max_abs",
        "model_tracer_residual_ratio",
        "model_tracer_attention_sink_share",
        "model_tracer_kv_evictions_total",
        "model_tracer_lens_decisive_layer_bucket",
        "model_tracer_forwards_total",
    ] {
        assert!(used.contains(family), "no panel shows {family}");
    }
}

#[test]
fn the_alert_rules_name_only_exported_families() {
    let rules = std::fs::read_to_string(dashboards().join("alerts.yml")).expect("the rules");
    let used = names_in(&rules);
    let exported = exported_names();
    let unknown: Vec<_> = used.difference(&exported).collect();
    assert!(unknown.is_empty(), "not exported: {unknown:?}");
    assert!(used.contains("model_tracer_requests_corrupted_total"));
    assert!(used.contains("model_tracer_activation_max_abs"));
    assert!(rules.contains("avg_over_time(model_tracer_activation_max_abs[1h])"));
    let tests = std::fs::read_to_string(dashboards().join("alerts_test.yml")).expect("tests");
    let unknown: Vec<_> = names_in(&tests)
        .into_iter()
        .filter(|n| !exported.contains(n))
        .collect();
    assert!(unknown.is_empty(), "not exported: {unknown:?}");
}

/// `promtool check rules` and `promtool test rules`, where promtool is
/// installed (the Debian package `prometheus` ships it).
#[test]
fn promtool_accepts_the_rules_and_their_tests() {
    let Ok(version) = Command::new("promtool").arg("--version").output() else {
        eprintln!("SKIPPED: promtool is not installed (apt-get install prometheus)");
        return;
    };
    assert!(version.status.success());
    for (command, file) in [("check", "alerts.yml"), ("test", "alerts_test.yml")] {
        let out = Command::new("promtool")
            .args([command, "rules", file])
            .current_dir(dashboards())
            .output()
            .expect("promtool runs");
        assert!(
            out.status.success(),
            "promtool {command} rules {file}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
