//! Two arbitrary JSON Lines traces compared: both read as diff sides, the
//! diff computed, and its JSON and HTML page written.
//!
//! Input layout: the two traces separated by the first form feed byte
//! (`0x0c`, which no trace row contains outside a string); without one, the
//! input is compared with itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use model_tracer::diff::{diff, Side, DEFAULT_TOLERANCE};

fuzz_target!(|data: &[u8]| {
    let (a, b) = match data.iter().position(|&c| c == 0x0c) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, data),
    };
    let (Ok(a), Ok(b)) = (Side::from_jsonl("a", a), Side::from_jsonl("b", b)) else {
        return;
    };
    for tolerance in [DEFAULT_TOLERANCE, 0.0, f32::NAN] {
        let Ok(report) = diff(&a, &b, tolerance) else {
            return;
        };
        let _ = report.to_json();
        let _ = report.to_string();
        let mut page = Vec::new();
        if let Err(e) = report.write_html(&mut page) {
            panic!("writing the diff page into memory failed: {e}");
        }
    }
});
