//! The seed traces of the `jsonl` and `diff_jsonl` fuzz targets
//! (`fuzz/seeds/`), put through what those targets run, in the normal test
//! suite: reading, replaying, the summary and the report of every trace,
//! the diff of every pair. The crafted seeds hold counts and positions at
//! `usize::MAX`, non-finite values, markup in texts and the largest layer
//! index; a panic on any of them is a regression.
#![cfg(feature = "serde")]

use std::path::{Path, PathBuf};

use model_tracer::diff::{diff, Side, DEFAULT_TOLERANCE};
use model_tracer::read::JsonlReader;
use model_tracer::replay::{ReplayedTrace, DEFAULT_REPLAY_FORWARDS};

fn seeds(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/seeds")
        .join(target);
    let mut out: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let path = e.expect("directory entry").path();
            let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            (path, bytes)
        })
        .collect();
    out.sort();
    assert!(out.len() >= 3, "{}: {} seeds", dir.display(), out.len());
    out
}

#[test]
fn every_seed_trace_replays_into_a_summary_and_a_report() {
    let mut replayed = 0;
    for (path, bytes) in seeds("jsonl") {
        let name = path.display();
        let rows: Vec<_> = JsonlReader::new(&bytes[..]).collect();
        let good = rows.iter().take_while(|r| r.is_ok()).count();
        let replay = ReplayedTrace::read_jsonl(&bytes[..], DEFAULT_REPLAY_FORWARDS);
        let Ok(replay) = replay else {
            // Only a trace with a bad row may fail, at that row.
            let bad = rows.iter().find_map(|r| r.as_ref().err());
            assert!(bad.is_some(), "{name}: {replay:?}");
            continue;
        };
        assert_eq!(replay.rows(), good, "{name}");
        let summary = replay.tracer().summary();
        assert_eq!(summary.forwards, good, "{name}");
        assert!(!summary.to_string().is_empty());
        assert!(summary.to_json().starts_with('{'), "{name}");
        let mut page = Vec::new();
        let written = model_tracer::write_html(&mut page, &replay.report_input("seed"));
        assert!(written.is_ok(), "{name}: {written:?}");
        let page = String::from_utf8_lossy(&page);
        // Two script elements, whatever the token texts hold.
        assert_eq!(page.matches("</script>").count(), 2, "{name}");
        replayed += 1;
    }
    assert!(replayed >= 8, "{replayed} seed traces replayed");
}

/// The crafted seed holds the values at the edges: every one is read, and
/// its counts saturate rather than wrap.
#[test]
fn the_crafted_edges_seed_saturates_its_counts() {
    let bytes = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/jsonl/crafted-edges.jsonl"),
    )
    .expect("the crafted seed");
    let replay = ReplayedTrace::read_jsonl(&bytes[..], 8);
    let Ok(replay) = replay else {
        panic!("{replay:?}");
    };
    assert_eq!(replay.rows(), 4);
    let kv = replay.tracer().summary().kv_cache.unwrap_or_default();
    assert_eq!(kv.steps, 2);
    assert_eq!(kv.total_evictions, usize::MAX);
    assert_eq!(replay.model().layers, 2, "the model the rows name");
}

#[test]
fn every_seed_pair_diffs_into_text_json_and_a_page() {
    let mut compared = 0;
    for (path, bytes) in seeds("diff_jsonl") {
        let name = path.display();
        let at = bytes.iter().position(|&b| b == 0x0c).expect("a form feed");
        let (a, b) = (&bytes[..at], &bytes[at + 1..]);
        let sides = (Side::from_jsonl("a", a), Side::from_jsonl("b", b));
        let (Ok(a), Ok(b)) = sides else {
            panic!("{name}: {sides:?}");
        };
        for tolerance in [DEFAULT_TOLERANCE, 0.0, f32::NAN] {
            let Ok(report) = diff(&a, &b, tolerance) else {
                continue;
            };
            assert!(report.to_json().starts_with('{'), "{name}");
            assert!(!report.to_string().is_empty());
            let mut page = Vec::new();
            assert!(report.write_html(&mut page).is_ok(), "{name}");
            compared += 1;
        }
    }
    assert!(compared >= 9, "{compared} comparisons");
}
