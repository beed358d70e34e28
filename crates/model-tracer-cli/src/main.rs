//! `model-tracer`: traces a LLaMA-family model end to end with the five
//! trace systems (`run`), renders (`report`) and compares (`diff`) the
//! traces it writes, and serves the traced model over HTTP (`serve`); this
//! file parses the command line and dispatches.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod diff;
mod print;
mod report;
mod run;
mod serve;
mod setup;
mod timing;

/// Trace what a transformer computes, token by token.
#[derive(Debug, Parser)]
#[command(name = "model-tracer", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a model on a prompt and trace it: activations, attention, logit
    /// lens, quantization error and KV cache.
    Run(Box<run::Args>),
    /// Render the HTML report of a JSON Lines trace written earlier (`run
    /// --jsonl`, or any `JsonlSink`): the same report `run --html` writes
    Report(report::ReportArgs),
    /// Where two runs part: compare two traces (JSON Lines) position by
    /// position and stage by stage; report the first divergence and the
    /// largest jump. Exit status 0: no divergence, 1: they diverge, 2: error
    Diff(diff::DiffArgs),
    /// Serve the traced model over an OpenAI-compatible HTTP API
    /// (/v1/chat/completions, /v1/completions, streaming or not), each
    /// request with its own trace (/v1/traces/{id})
    Serve(Box<serve::Args>),
}

fn main() -> ExitCode {
    let (status, error) = match Cli::parse().command {
        Command::Run(args) => match run::run(&args) {
            Ok(()) => (0, None),
            Err(run::Error::Usage(e)) => (2, Some(e)),
            Err(run::Error::Run(e)) => (1, Some(e)),
        },
        Command::Report(args) => match report::report(&args) {
            Ok(()) => (0, None),
            Err(e) => (1, Some(e)),
        },
        Command::Serve(args) => match serve::serve(&args) {
            Ok(()) => (0, None),
            Err(e) => (1, Some(e)),
        },
        Command::Diff(args) => match diff::diff(&args) {
            Ok(true) => (0, None),
            Ok(false) => (1, None),
            Err(e) => (2, Some(e)),
        },
    };
    if let Some(e) = error {
        eprintln!("error: {e}");
    }
    ExitCode::from(status)
}
