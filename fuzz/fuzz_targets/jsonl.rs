//! The JSON Lines trace reader on arbitrary bytes: every row read, the
//! rows replayed into a tracer, and the HTML report of the replay written.
#![no_main]

use libfuzzer_sys::fuzz_target;
use model_tracer::read::JsonlReader;
use model_tracer::replay::{ReplayedTrace, DEFAULT_REPLAY_FORWARDS};

fuzz_target!(|data: &[u8]| {
    for row in JsonlReader::new(data) {
        if row.is_err() {
            break;
        }
    }
    let Ok(replay) = ReplayedTrace::read_jsonl(data, DEFAULT_REPLAY_FORWARDS) else {
        return;
    };
    let summary = replay.tracer().summary();
    assert_eq!(summary.forwards, replay.rows());
    let _ = summary.to_string();
    let _ = summary.to_json();
    let input = replay.report_input("fuzz.jsonl");
    let mut page = Vec::new();
    if let Err(e) = model_tracer::write_html(&mut page, &input) {
        panic!("writing the report into memory failed: {e}");
    }
});
