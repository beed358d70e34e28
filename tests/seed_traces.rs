//! The seed traces of the `jsonl` and `diff_jsonl` fuzz targets
//! (`fuzz/seeds/`), put through what those targets run, in the normal test
//! suite: reading, replaying, the summary and the report of every trace,
//! the diff of every pair. The crafted seeds hold counts and positions at
//! `usize::MAX`, non-finite values, markup in texts and the largest layer
//! index; a panic on any of them is a regression. With the `dump` feature,
//! the seed dumps of the `dump` target too: each read, checked accessor by
//! accessor and written back, or refused with the field at fault named;
//! and the pairs of the `diff_dump` target, dumps and traces, diffed.
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

#[cfg(feature = "dump")]
mod dumps {
    use super::seeds;
    use model_tracer::activation::MAX_LAYERS;
    use model_tracer::diff::{diff, Side, DEFAULT_TOLERANCE};
    use model_tracer::dump::{FORMAT, MAX_WIDTH, VERSION};
    use model_tracer::{ActivationDump, DumpError, Stage};

    /// What each crafted seed that lies is refused for: the tensor named
    /// (`None`: the file as a whole) and words of the message.
    const REFUSED: [(&str, Option<&str>, &str); 14] = [
        (
            "crafted-dtype-f4-odd",
            Some("embedding"),
            "whole number of bytes",
        ),
        (
            "crafted-dtype-hidden-f16",
            Some("embedding"),
            "element type F16",
        ),
        (
            "crafted-dtype-tokens-f32",
            Some("tokens"),
            "element type F32",
        ),
        ("crafted-gap", Some("embedding"), "starts at byte 20"),
        (
            "crafted-header-2e40",
            None,
            "header length (the file's first 8 bytes) is 1099511627776",
        ),
        ("crafted-header-beyond-file", None, "a header of 4096 bytes"),
        ("crafted-header-cut-short", None, "not JSON"),
        ("crafted-other-version", None, "version = \"2\""),
        ("crafted-overlap", Some("embedding"), "starts at byte 8"),
        (
            "crafted-position-u64-max",
            Some("positions"),
            "beyond the range of i64",
        ),
        (
            "crafted-shape-2e60",
            Some("tokens"),
            "needs 1152921504606846976",
        ),
        ("crafted-shape-overflow", Some("embedding"), "overflows"),
        (
            "crafted-unknown-name",
            Some("layers.7.attention"),
            "not a name",
        ),
        (
            "crafted-width-mismatch",
            Some("layers.0.output"),
            "`embedding` has 1",
        ),
    ];

    /// What the `dump` target runs on every input: the dump read, every
    /// accessor checked against the others, written and read back the
    /// same.
    fn exercise(bytes: &[u8]) -> Result<ActivationDump, DumpError> {
        let dump = ActivationDump::from_bytes(bytes)?;
        check(&dump);
        let written = dump.to_bytes();
        let again = ActivationDump::from_bytes(&written)
            .unwrap_or_else(|e| panic!("a dump written by to_bytes is refused: {e}"));
        check(&again);
        same(&dump, &again);
        assert!(
            again.to_bytes() == written,
            "a second round trip changed the bytes"
        );
        Ok(dump)
    }

    fn check(d: &ActivationDump) {
        let t = d.len();
        assert_eq!((d.tokens().len(), d.positions().len()), (t, t));
        assert_eq!(d.metadata()["format"], FORMAT);
        assert_eq!(d.metadata()["version"], VERSION);
        let layers = d.layers();
        assert!(layers.windows(2).all(|w| w[0] < w[1]));
        assert!(layers.iter().all(|&l| l < MAX_LAYERS));
        let mut listed = 0;
        for v in d.tensors() {
            listed += 1;
            assert_eq!(v.rows(), t, "{}", v.name());
            assert!(v.width() <= MAX_WIDTH);
            assert_eq!(v.data().len(), t * v.width());
            assert!((0..t).all(|r| v.row(r).map(<[f32]>::len) == Some(v.width())));
            assert!(v.row(t).is_none());
            assert_eq!(v.iter_rows().count(), t);
            let width = if v.stage() == Stage::Logits {
                d.vocab()
            } else {
                d.dim()
            };
            assert_eq!(width, Some(v.width()), "{}", v.name());
            let found = d
                .activation(v.layer(), v.stage())
                .expect("a listed tensor is found");
            assert_eq!(found.name(), v.name());
        }
        let found = layers
            .iter()
            .flat_map(|&l| Stage::LAYER_STAGES.map(|s| d.activation(Some(l), s)))
            .chain(
                [Stage::Embedding, Stage::FinalNorm, Stage::Logits].map(|s| d.activation(None, s)),
            )
            .flatten()
            .count();
        assert_eq!(found, listed);
    }

    fn same(a: &ActivationDump, b: &ActivationDump) {
        assert_eq!((a.tokens(), a.positions()), (b.tokens(), b.positions()));
        assert_eq!(a.metadata(), b.metadata());
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<u32>>();
        let tensors = |d: &ActivationDump| {
            d.tensors()
                .map(|v| (v.name(), v.width(), bits(v.data())))
                .collect::<Vec<_>>()
        };
        assert!(tensors(a) == tensors(b), "the tensors changed");
    }

    #[test]
    fn every_seed_dump_reads_back_the_same_or_is_refused_with_the_field_named() {
        let mut read = 0;
        let mut refused = 0;
        for (path, bytes) in seeds("dump") {
            let stem = path
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or_default()
                .to_string();
            let expected = REFUSED.iter().find(|(name, _, _)| *name == stem);
            match (exercise(&bytes), expected) {
                (Ok(_), None) => read += 1,
                (Err(e), Some((_, tensor, words))) => {
                    assert_eq!(e.tensor(), *tensor, "{stem}: {e}");
                    assert!(e.to_string().contains(words), "{stem}: {e}");
                    refused += 1;
                }
                (Ok(d), Some(_)) => panic!("{stem} was read: {d:?}"),
                (Err(e), None) => panic!("{stem} was refused: {e}"),
            }
        }
        assert_eq!(refused, REFUSED.len());
        assert!(read >= 7, "{read} seed dumps read");
    }

    #[test]
    fn the_crafted_dump_of_every_kind_reads_its_values() {
        let bytes = seeds("dump")
            .into_iter()
            .find(|(p, _)| p.ends_with("crafted-every-kind.safetensors"))
            .map(|(_, b)| b)
            .expect("the seed exists");
        let d = exercise(&bytes).expect("it reads");
        assert_eq!(d.tokens(), &[-1, 5], "I8 tokens");
        assert_eq!(d.positions(), &[7, 65535], "U16 positions");
        assert_eq!(d.metadata()["model"], "crafted \"dump\"");
        assert_eq!(d.metadata()["version"], VERSION, "filled in");
        assert_eq!(d.layers(), vec![MAX_LAYERS - 1]);
        assert_eq!((d.dim(), d.vocab()), (Some(3), Some(1)));
        let emb = d.activation(None, Stage::Embedding).expect("embedding");
        let bits: Vec<u32> = emb.data().iter().map(|f| f.to_bits()).collect();
        assert_eq!(
            bits,
            [
                0x7fc0_0001,
                0xff80_0000,
                0x8000_0000,
                1,
                0x7f80_0000,
                0xffff_ffff
            ]
        );
        let logits = d.logits().expect("logits");
        assert_eq!(logits.row(0), Some(&[1.0][..]));
        assert_eq!(logits.data()[1].to_bits(), 0xffc0_0000);
    }

    /// A run of a `diff_dump` input read as its target reads it.
    fn side(name: &str, bytes: &[u8]) -> Result<Side, String> {
        if bytes.get(8) == Some(&b'{') {
            let dump = ActivationDump::from_bytes(bytes).map_err(|e| e.to_string())?;
            Side::from_dump(name, &dump).map_err(|e| e.to_string())
        } else {
            Side::from_jsonl(name, bytes).map_err(|e| e.to_string())
        }
    }

    /// What each pair of the `diff_dump` seeds gives: the kinds of its two
    /// sides, and the words of the diff's refusal (`None`: a report).
    const PAIRS: [(&str, [&str; 2], Option<&str>); 6] = [
        (
            "crafted-every-kind--crafted-edges",
            ["dump", "jsonl"],
            Some("hidden size 3"),
        ),
        (
            "crafted-every-kind--crafted-every-kind",
            ["dump", "dump"],
            None,
        ),
        ("dump--jsonl", ["dump", "jsonl"], None),
        ("jsonl--dump", ["jsonl", "dump"], None),
        ("quantized--exact", ["dump", "dump"], None),
        ("quantized--nan", ["dump", "dump"], None),
    ];

    #[test]
    fn every_seed_pair_of_dumps_and_traces_diffs_into_text_json_and_a_page() {
        let all = seeds("diff_dump");
        assert_eq!(all.len(), PAIRS.len());
        for ((path, bytes), (name, kinds, refusal)) in all.iter().zip(PAIRS) {
            assert!(path.ends_with(name), "{}", path.display());
            let (len, rest) = bytes.split_first_chunk::<4>().expect("a length");
            let n = u32::from_le_bytes(*len) as usize;
            assert!(n <= rest.len(), "{name}: the first run is cut");
            let (a, b) = rest.split_at(n);
            let a = side("a", a).unwrap_or_else(|e| panic!("{name}: {e}"));
            let b = side("b", b).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!([a.kind.as_str(), b.kind.as_str()], kinds, "{name}");
            for tolerance in [DEFAULT_TOLERANCE, 0.0, f32::NAN] {
                match (diff(&a, &b, tolerance), refusal) {
                    (Ok(report), None) => {
                        let json: serde_json::Value = serde_json::from_str(&report.to_json())
                            .unwrap_or_else(|e| panic!("{name}: {e}"));
                        assert!(json.is_object(), "{name}");
                        assert!(!report.to_string().is_empty());
                        let mut page = Vec::new();
                        report.write_html(&mut page).expect("a page in memory");
                        assert!(page.starts_with(b"<!DOCTYPE html>"), "{name}");
                    }
                    (Err(e), Some(words)) => assert!(e.to_string().contains(words), "{name}: {e}"),
                    (Ok(_), Some(_)) => panic!("{name}: diffed"),
                    (Err(e), None) => panic!("{name}: {e}"),
                }
            }
        }
    }
}
