//! `model-tracer diff`: where two runs part, compared position by position
//! and stage by stage from their JSON Lines traces or activation dumps.

use std::io::Write as _;

use crate::report::sequence_choice;
use crate::setup::outputs::create_output;

#[derive(Debug, Clone, clap::Args)]
pub struct DiffArgs {
    /// The reference run: a JSON Lines trace
    #[arg(value_name = "A")]
    a: String,
    /// The run compared with it
    #[arg(value_name = "B")]
    b: String,
    /// Relative error above which a (position, layer, stage) diverges
    #[arg(long, value_name = "X", default_value_t = model_tracer::diff::DEFAULT_TOLERANCE)]
    tolerance: f32,
    /// Write the comparison as JSON
    #[arg(long, value_name = "PATH")]
    json: Option<String>,
    /// Write the comparison as an HTML page: a layers x positions heatmap
    /// of the error, the divergence marked
    #[arg(long, value_name = "PATH")]
    html: Option<String>,
    /// The sequence of A compared, when A's trace holds forwards over
    /// several (by the id in its rows' `sequence` column)
    #[arg(long, value_name = "ID")]
    sequence_a: Option<u64>,
    /// The sequence of B compared, as --sequence-a
    #[arg(long, value_name = "ID")]
    sequence_b: Option<u64>,
}

/// One side of a diff, read from `path`: a JSON Lines trace or an
/// activation dump.
fn load_side(path: &str, sequence: Option<u64>) -> Result<model_tracer::diff::Side, String> {
    let name = std::path::Path::new(path)
        .file_name()
        .map_or_else(|| path.to_string(), |n| n.to_string_lossy().into_owned());
    let bytes = std::fs::read(path).map_err(|e| format!("{path}: {e}"))?;
    model_tracer::diff::Side::from_bytes_of(&name, &bytes, sequence_choice(sequence)).map_err(|e| {
        let e = e.to_string();
        if sequence.is_none() && e.contains("several sequences") {
            format!("{e} (--sequence-a/--sequence-b ID)")
        } else {
            e
        }
    })
}

/// `model-tracer diff`: whether the two runs agree within the tolerance.
pub fn diff(args: &DiffArgs) -> Result<bool, String> {
    if args.tolerance.is_nan() || args.tolerance < 0.0 {
        return Err(format!(
            "--tolerance {} is not a relative error",
            args.tolerance
        ));
    }
    let (json, html) = (create_output(&args.json)?, create_output(&args.html)?);
    let (a, b) = (
        load_side(&args.a, args.sequence_a)?,
        load_side(&args.b, args.sequence_b)?,
    );
    let report = model_tracer::diff::diff(&a, &b, args.tolerance).map_err(|e| e.to_string())?;
    // A closed pipe (`| head`) is not an error of the comparison.
    let _ = write!(std::io::stdout(), "{report}");
    if let Some((path, file)) = json {
        let mut out = std::io::BufWriter::new(file);
        out.write_all(report.to_json().as_bytes())
            .and_then(|()| out.flush())
            .map_err(|e| format!("{path}: {e}"))?;
        println!("wrote the comparison to {path}");
    }
    if let Some((path, file)) = html {
        let mut out = std::io::BufWriter::new(file);
        report
            .write_html(&mut out)
            .and_then(|()| out.flush())
            .map_err(|e| format!("{path}: {e}"))?;
        println!("wrote the comparison page to {path}");
    }
    Ok(report.first_divergence.is_none())
}
