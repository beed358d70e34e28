//! The tracer's modules import each other downwards only: kernels, then
//! records, then the per-forward record, the aggregates and sinks, the
//! storage, the configs, the tracer, and the views on top. A circle of
//! imports among them fails this test.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The modules `src/<name>.rs` names in code (not in comments, and not in
/// its unit tests).
fn imports(source: &str, modules: &BTreeSet<String>, own: &str) -> BTreeSet<String> {
    let code = source
        .split("#[cfg(test)]\nmod tests")
        .next()
        .unwrap_or(source);
    let mut out = BTreeSet::new();
    for line in code.lines() {
        let line = line.trim_start();
        if line.starts_with("//") {
            continue;
        }
        for (i, _) in line.match_indices("crate::") {
            let rest = &line[i + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            if name != own && modules.contains(&name) {
                out.insert(name);
            }
        }
    }
    out
}

/// A circle in `graph`, if there is one.
fn circle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        m: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == m) {
            let mut c = path[i..].to_vec();
            c.push(m.to_string());
            return Some(c);
        }
        if done.contains(m) {
            return None;
        }
        path.push(m.to_string());
        for d in graph.get(m).into_iter().flatten() {
            if let Some(c) = visit(d, graph, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(m.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for m in graph.keys() {
        if let Some(c) = visit(m, graph, &mut Vec::new(), &mut done) {
            return Some(c);
        }
    }
    None
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(&src).expect("src/ is readable") {
        let path = entry.expect("a directory entry").path();
        let Some(name) = path.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        if path.extension().is_some_and(|e| e == "rs") && name != "lib" {
            let text = std::fs::read_to_string(&path).expect("a source file");
            files.insert(name.to_string(), text);
        }
    }
    let modules: BTreeSet<String> = files.keys().cloned().collect();
    files
        .iter()
        .map(|(m, text)| (m.clone(), imports(text, &modules, m)))
        .collect()
}

#[test]
fn the_modules_import_each_other_without_a_circle() {
    let g = graph();
    assert!(g.len() > 10, "found only {:?}", g.keys());
    if let Some(c) = circle(&g) {
        panic!("import circle: {}", c.join(" -> "));
    }
}

#[test]
fn the_layers_point_down() {
    let g = graph();
    let below = |m: &str, other: &str| {
        assert!(
            !g[m].contains(other),
            "{m} imports {other}, which sits above it"
        );
    };
    // The kernels sit below everything that records.
    for kernel in ["stats", "fingerprint"] {
        for upper in [
            "stage",
            "anomaly",
            "activation",
            "attention",
            "logit",
            "quant",
            "kv_cache",
            "forward",
            "summary",
            "sink",
            "storage",
            "config",
            "tracer",
            "report",
        ] {
            below(kernel, upper);
        }
    }
    for record in [
        "stage",
        "anomaly",
        "activation",
        "attention",
        "logit",
        "quant",
        "kv_cache",
    ] {
        for upper in [
            "forward", "summary", "sink", "storage", "config", "tracer", "report",
        ] {
            below(record, upper);
        }
    }
    for upper in ["config", "tracer", "report"] {
        below("storage", upper);
        below("summary", upper);
        below("sink", upper);
        below("dump", upper);
    }
    // The storage holds the dump recorder: the dump sits below it.
    for upper in ["storage", "summary", "sink", "forward"] {
        below("dump", upper);
    }
    below("config", "tracer");
}

#[test]
fn a_planted_circle_is_found() {
    let mut g = graph();
    if let Some(s) = g.get_mut("stage") {
        s.insert("tracer".into());
    }
    assert!(circle(&g).is_some());
}
