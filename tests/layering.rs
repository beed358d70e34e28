//! The modules of the workspace import each other downwards only. In the
//! tracer, the roles stack as record ← output ← tracer ← analysis: the
//! records a forward's hooks produce, the outputs they go to, the tracer
//! that fills them, and the analysis of traces written earlier; no module
//! of a role imports one of a role above it, and among the records the
//! kernels import no record. In every crate of the workspace, a circle of
//! imports fails. The graphs are read by
//! [`model_tracer_test_support::modules`].

use std::path::{Path, PathBuf};

use model_tracer_test_support::modules::{ModuleGraph, ROOT};

/// The tracer's roles, bottom to top.
const ROLES: [&str; 4] = ["record", "output", "tracer", "analysis"];

fn tracer_graph() -> ModuleGraph {
    ModuleGraph::read(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"))
}

/// The role of `module` (its first segment), as a height in [`ROLES`].
fn role(module: &str) -> Option<usize> {
    let first = module.split("::").next()?;
    ROLES.iter().position(|r| *r == first)
}

/// The violations of the rule that `from` imports none of `to`.
fn forbidden(g: &ModuleGraph, from: &[&str], to: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    for f in from {
        for t in g.imports(f) {
            if to.contains(&t.as_str()) {
                out.push(format!("{f} imports {t}"));
            }
        }
    }
    out
}

#[test]
fn the_tracer_modules_import_each_other_without_a_circle() {
    let g = tracer_graph();
    let n = g.modules().count();
    assert!(n > 20, "found only {:?}", g.modules().collect::<Vec<_>>());
    if let Some(c) = g.circle() {
        panic!("import circle: {}", c.join(" -> "));
    }
}

#[test]
fn every_tracer_module_has_a_role() {
    let g = tracer_graph();
    let loose: Vec<&str> = g
        .modules()
        .filter(|m| *m != ROOT && role(m).is_none())
        .collect();
    assert!(
        loose.is_empty(),
        "modules outside the roles {ROLES:?}: {loose:?}"
    );
    for r in ROLES {
        assert!(g.modules().any(|m| m == r), "no role module {r}");
    }
}

#[test]
fn the_roles_point_down() {
    let g = tracer_graph();
    let mut up = Vec::new();
    for m in g.modules() {
        let Some(below) = role(m) else { continue };
        for i in g.imports(m) {
            if role(i).is_some_and(|r| r > below) {
                up.push(format!("{m} imports {i}, which sits above it"));
            }
        }
    }
    assert!(up.is_empty(), "{}", up.join("\n"));
}

#[test]
fn the_records_point_down() {
    let g = tracer_graph();
    let kernels = ["record::stats", "record::fingerprint"];
    let records: Vec<&str> = g
        .modules()
        .filter(|m| m.starts_with("record::") && *m != "record::serde_float")
        .collect();
    // The kernels sit below everything that records (the serde helper for
    // non-finite numbers is no record).
    let mut bad = forbidden(&g, &kernels, &records);
    // The records of the five systems sit below the per-forward record.
    let systems = [
        "record::stage",
        "record::anomaly",
        "record::activation",
        "record::attention",
        "record::logit",
        "record::quant",
        "record::kv_cache",
    ];
    bad.extend(forbidden(&g, &systems, &["record::forward"]));
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

#[test]
fn the_outputs_point_down() {
    let g = tracer_graph();
    // The tracer's storage holds the dump recorder, and the summary and
    // the sinks know nothing of the report.
    let mut bad = forbidden(&g, &["output::dump"], &["output::summary", "output::sink"]);
    bad.extend(forbidden(
        &g,
        &[
            "output::summary",
            "output::sink",
            "output::dump",
            "output::events",
        ],
        &["output::report"],
    ));
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

#[test]
fn a_planted_circle_is_found() {
    let mut g = tracer_graph();
    assert!(g.circle().is_none());
    g.add_import("record::stage", "tracer");
    let c = g.circle().expect("the planted circle");
    assert!(c.contains(&"record::stage".to_string()), "{c:?}");
    assert!(c.contains(&"tracer".to_string()), "{c:?}");
}

#[test]
fn a_circle_through_a_parents_re_export_is_found() {
    let files = [
        ("lib.rs", "mod quant;\n"),
        (
            "quant.rs",
            "mod activations;\nmod dot;\n\
             pub use activations::QuantizedActivations;\npub use dot::rows::Q8_0_BYTES;\n",
        ),
        ("quant/dot.rs", "pub mod rows;\n"),
        (
            "quant/dot/rows.rs",
            "use super::super::QuantizedActivations;\npub const Q8_0_BYTES: bool = true;\n",
        ),
        (
            "quant/activations.rs",
            "pub struct QuantizedActivations;\n\
             fn fast() -> bool { crate::quant::Q8_0_BYTES }\n",
        ),
    ];
    let g = ModuleGraph::from_sources(files);
    let c = g.circle().map(|c| c.join(" -> "));
    assert_eq!(
        c.as_deref(),
        Some("quant::activations -> quant::dot::rows -> quant::activations")
    );
    // Without the names through the parent, no circle.
    let mut parted = files;
    parted[4].1 = "pub struct QuantizedActivations;\n";
    assert!(ModuleGraph::from_sources(parted).circle().is_none());
}

/// The source directories of the workspace's other crates.
fn other_crates() -> Vec<(String, PathBuf)> {
    let crates = Path::new(env!("CARGO_MANIFEST_DIR")).join("crates");
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(&crates) {
        Ok(e) => e,
        Err(e) => panic!("reading {}: {e}", crates.display()),
    };
    for entry in entries.flatten() {
        let src = entry.path().join("src");
        if src.is_dir() {
            out.push((entry.file_name().to_string_lossy().into_owned(), src));
        }
    }
    out.sort();
    out
}

#[test]
fn every_other_crate_imports_without_a_circle() {
    let crates = other_crates();
    assert!(crates.len() >= 4, "found only {crates:?}");
    let mut circles = Vec::new();
    for (name, src) in crates {
        if let Some(c) = ModuleGraph::read(&src).circle() {
            circles.push(format!("{name}: import circle: {}", c.join(" -> ")));
        }
    }
    assert!(circles.is_empty(), "{}", circles.join("\n"));
}
