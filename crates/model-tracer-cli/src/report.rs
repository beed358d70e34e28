//! `model-tracer report`: renders the HTML report of a JSON Lines trace
//! written earlier, the same page `run --html` writes.

use std::io::Write as _;

#[derive(Debug, Clone, clap::Args)]
pub struct ReportArgs {
    /// The JSON Lines trace
    #[arg(value_name = "TRACE")]
    trace: String,
    /// Where to write the report [default: TRACE with the extension .html]
    #[arg(short, long, value_name = "PATH")]
    output: Option<String>,
    /// Forwards shown in detail: the last N of the trace (the summary
    /// covers all of them)
    #[arg(long, value_name = "N", default_value_t = model_tracer::replay::DEFAULT_REPLAY_FORWARDS)]
    last: usize,
    /// The sequence to report, by the id in its rows' `sequence` column,
    /// when the trace holds forwards over several (a trace with more than
    /// one is refused without it)
    #[arg(long, value_name = "ID")]
    sequence: Option<u64>,
}

/// The rows a `--sequence` option keeps.
pub fn sequence_choice(id: Option<u64>) -> model_tracer::read::SequenceChoice {
    id.map_or(model_tracer::read::SequenceChoice::Single, |id| {
        model_tracer::read::SequenceChoice::Only(model_tracer::SequenceId(id))
    })
}

/// `model-tracer report`: the HTML report of a JSON Lines trace.
pub fn report(args: &ReportArgs) -> Result<(), String> {
    let output = args.output.clone().unwrap_or_else(|| {
        std::path::Path::new(&args.trace)
            .with_extension("html")
            .to_string_lossy()
            .into_owned()
    });
    if output == args.trace {
        return Err(format!(
            "the report would overwrite the trace {output}: name it with -o"
        ));
    }
    let file = std::fs::File::open(&args.trace).map_err(|e| format!("{}: {e}", args.trace))?;
    let replay = model_tracer::replay::ReplayedTrace::read_jsonl_of(
        std::io::BufReader::new(file),
        args.last,
        sequence_choice(args.sequence),
    )
    .map_err(|e| match args.sequence {
        None if e.message.contains("several sequences") => {
            format!("{}: {e} (--sequence ID)", args.trace)
        }
        _ => format!("{}: {e}", args.trace),
    })?;
    let name = std::path::Path::new(&args.trace)
        .file_name()
        .map_or_else(|| args.trace.clone(), |n| n.to_string_lossy().into_owned());
    let input = replay.report_input(&name);
    let summary = &input.summary;
    println!(
        "{}{}: {} forwards{}, traced {}; model {} ({} layers, hidden {})",
        args.trace,
        args.sequence
            .map_or(String::new(), |id| format!(", sequence {id}")),
        replay.rows(),
        summary
            .positions
            .map_or(String::new(), |(a, b)| format!(" (positions {a}..={b})")),
        summary.config,
        input.model.name,
        input.model.layers,
        input.model.dim,
    );
    let file =
        std::fs::File::create(&output).map_err(|e| format!("cannot create {output}: {e}"))?;
    let mut out = std::io::BufWriter::new(file);
    model_tracer::write_html(&mut out, &input)
        .and_then(|()| out.flush())
        .map_err(|e| format!("{output}: {e}"))?;
    println!("wrote the HTML report to {output}");
    Ok(())
}
