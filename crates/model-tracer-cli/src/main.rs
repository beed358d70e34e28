//! `model-tracer`: traces a LLaMA-family model end to end with the five
//! trace systems.
//!
//! `model-tracer run` with no options traces SmolLM2-135M-Instruct from
//! `models/SmolLM2-135M-Instruct.Q4_1.gguf` (`bash .ci/fetch-model` puts it
//! there), answering a chat question; without that file it says how to get
//! it and runs a synthetic model of the same shape. `--gguf PATH` traces
//! another GGUF file. See `model-tracer run --help`.

use std::io::Write as _;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use model_tracer::dump::{DumpFilter, DumpRecorder};
use model_tracer::{
    AttentionTraceConfig, Disabled, Full, Lightweight, LogitRows, ModelTracer, Stage, TraceConfig,
    TraceOptions,
};
use model_tracer_llama::dtype::GgmlType;
use model_tracer_llama::model::{Config, Fault, KvCacheOptions, Llama, DEFAULT_PREFILL_CHUNK};
use model_tracer_llama::tokenizer::{ChatMessage, Tokenizer};

mod candle;
mod diff;
mod print;
mod report;
mod timing;

use print::{ids_text, print_outcome, report_trace, report_what_if};
use timing::Timing;

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
    Run(Box<Args>),
    /// Render the HTML report of a JSON Lines trace written earlier (`run
    /// --jsonl`, or any `JsonlSink`): the same report `run --html` writes
    Report(report::ReportArgs),
    /// Where two runs part: compare two traces (JSON Lines) position by
    /// position and stage by stage; report the first divergence and the
    /// largest jump. Exit status 0: no divergence, 1: they diverge, 2: error
    Diff(diff::DiffArgs),
}

/// Where `bash .ci/fetch-model` puts SmolLM2-135M-Instruct.
const DEFAULT_GGUF: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
/// The chat question asked when no input is given.
const DEFAULT_CHAT: &str = "What is the capital of France?";
/// The system message of a chat unless `--system` says otherwise. With the
/// template's own ("You are a helpful AI assistant named SmolLM, trained by
/// Hugging Face"), SmolLM2-135M answers the default question with a list
/// of French words ("L'Étoile, la Marseillaise, ..."); with this one it
/// answers it.
const DEFAULT_SYSTEM: &str = "You are a helpful assistant.";

#[derive(Debug, Clone, clap::Args)]
struct Args {
    /// Trace a GGUF file (llama architecture), with its tokenizer [default:
    /// models/SmolLM2-135M-Instruct.Q4_1.gguf when it exists, from `bash
    /// .ci/fetch-model`; otherwise a synthetic model of the same shape]
    #[arg(long, value_name = "PATH", help_heading = "Model")]
    gguf: Option<String>,
    /// A synthetic model instead (Q4_1 weights, no tokenizer)
    #[arg(long, value_name = "SHAPE", value_parser = ["smollm2", "tiny"],
          conflicts_with = "gguf", help_heading = "Model")]
    synthetic: Option<String>,
    /// Seed of the synthetic weights
    #[arg(long, default_value_t = 1, value_name = "N", help_heading = "Model")]
    seed: u64,
    /// Run every matmul on the f32 reference path (dequantized weights,
    /// or a synthetic model's f32 masters, times unquantized activations)
    /// instead of the quantized kernels: slower, and what an f32
    /// implementation of the model computes
    #[arg(long, help_heading = "Model")]
    exact: bool,
    /// The model that runs: the reference decoder (`Llama`), or the LLaMA
    /// written on candle's ops and quantized matmuls (`CandleLlama`; a
    /// GGUF file, no --synthetic, no --what-if, a KV cache that does not
    /// evict)
    #[arg(long, default_value = "reference", value_name = "ENGINE",
          value_parser = ["reference", "candle"], help_heading = "Model")]
    engine: String,

    /// Raw prompt; special-token text like <|im_start|> is parsed
    #[arg(
        long,
        value_name = "TEXT",
        conflicts_with = "chat",
        help_heading = "Input"
    )]
    prompt: Option<String>,
    /// A user message, wrapped in the model's chat template [default: "What
    /// is the capital of France?"]. A synthetic model has no tokenizer: the
    /// text's bytes are its token ids
    #[arg(long, value_name = "TEXT", help_heading = "Input")]
    chat: Option<String>,
    /// The chat's system message; `template` keeps the one the chat template
    /// inserts
    #[arg(long, value_name = "TEXT", default_value = DEFAULT_SYSTEM, help_heading = "Input")]
    system: String,
    /// Tokens to generate, greedily
    #[arg(long, default_value_t = 16, value_name = "N", help_heading = "Input")]
    max_tokens: usize,
    /// KV cache capacity in positions; smaller than the sequence to see
    /// StreamingLLM evictions
    #[arg(long, default_value_t = 4096, value_name = "N", help_heading = "Input")]
    ctx: usize,
    /// Prompt positions run through the model at once (batched prefill);
    /// 1 runs the prompt one position at a time. The results are the same
    /// to the bit either way
    #[arg(long, default_value_t = DEFAULT_PREFILL_CHUNK, value_name = "N", help_heading = "Model")]
    prefill_chunk: usize,

    /// Three monomorphized models: Llama<Disabled|Lightweight|Full>
    #[arg(long, default_value = "full", value_name = "LEVEL",
          value_parser = ["off", "lightweight", "full"], help_heading = "Tracing")]
    trace: String,
    /// nan@LAYER | inf@LAYER | explode@LAYER: inject a fault into every
    /// forward pass and watch it be found. scale@LAYER[:STAGE] (x1.01) and
    /// swap@LAYER[:STAGE] (heads 0 and 1 swapped), STAGE post_attn (default)
    /// or post_ffn: errors no anomaly rule sees, for `model-tracer diff`
    #[arg(long, value_name = "FAULT", value_parser = Fault::parse, help_heading = "Tracing")]
    inject: Option<Fault>,
    /// Also trace every brick with its weights re-quantized to each of TYPES
    /// (q8_0, q5_1, q5_0, q4_1, q4_0, q4_k, q6_k) against the model's own
    /// weights; needs --trace full
    #[arg(long, value_name = "TYPES", value_delimiter = ',', value_parser = parse_type,
          help_heading = "Tracing")]
    what_if: Vec<GgmlType>,

    /// Write the run as JSON: prompt and generated ids, timing, and (when
    /// tracing) the summary and every retained forward
    #[arg(
        long,
        value_name = "PATH",
        help_heading = OUTPUT
    )]
    json: Option<String>,
    /// Stream every forward as it completes, one JSON object per line
    /// (pandas.read_json(PATH, lines=True)); needs tracing
    #[arg(
        long,
        value_name = "PATH",
        help_heading = OUTPUT
    )]
    jsonl: Option<String>,
    /// Write the HTML report, one self-contained file; needs tracing
    #[arg(
        long,
        value_name = "PATH",
        help_heading = OUTPUT
    )]
    html: Option<String>,
    /// Write the full activations of every forward as one safetensors file
    /// (features.md, "Activation dumps"): tokens, positions, embedding, the
    /// six stages of each layer, final_norm and logits, one row per
    /// position; needs tracing
    #[arg(
        long,
        value_name = "PATH",
        help_heading = OUTPUT
    )]
    dump: Option<String>,
    /// Dump only these layers' stages (e.g. 0,3,5). embedding, final_norm
    /// and logits belong to no layer: this list keeps them [default: every
    /// layer]
    #[arg(long, value_name = "LAYERS", value_delimiter = ',', requires = "dump",
          help_heading = OUTPUT)]
    dump_layers: Option<Vec<usize>>,
    /// Dump only these stages: input, post_norm, post_attn, post_ffn_norm,
    /// post_ffn, output (of each dumped layer) and embedding, final_norm,
    /// logits (outside the layers), which a list leaves out unless it names
    /// them: `--dump-stages input,post_attn` dumps those two, the tokens and
    /// the positions [default: every stage]
    #[arg(long, value_name = "STAGES", value_delimiter = ',', value_parser = parse_stage,
          requires = "dump", help_heading = OUTPUT)]
    dump_stages: Option<Vec<Stage>>,
}

/// The heading of the output options, and the promise they share.
const OUTPUT: &str = "Output (each file is created before the model loads)";

fn parse_type(name: &str) -> Result<GgmlType, String> {
    Ok(match name.trim().to_ascii_lowercase().as_str() {
        "q8_0" => GgmlType::Q8_0,
        "q5_1" => GgmlType::Q5_1,
        "q5_0" => GgmlType::Q5_0,
        "q4_1" => GgmlType::Q4_1,
        "q4_0" => GgmlType::Q4_0,
        "q4_k" => GgmlType::Q4_K,
        "q6_k" => GgmlType::Q6_K,
        other => return Err(format!("unknown type {other:?}")),
    })
}

fn parse_stage(name: &str) -> Result<Stage, String> {
    let name = name.trim();
    Stage::ALL
        .into_iter()
        .find(|s| s.name() == name)
        .ok_or_else(|| {
            let names: Vec<&str> = Stage::ALL.iter().map(|s| s.name()).collect();
            format!("unknown stage {name:?} (one of {})", names.join(", "))
        })
}

/// The checks clap cannot express: outputs that need a trace.
fn validate(a: &Args) -> Result<(), String> {
    if a.trace == "off" {
        for (flag, path) in [
            ("--jsonl", &a.jsonl),
            ("--html", &a.html),
            ("--dump", &a.dump),
        ] {
            if path.is_some() {
                return Err(format!(
                    "{flag} writes the trace, and --trace off records none: \
                     use --trace lightweight or full"
                ));
            }
        }
    }
    if a.engine == "candle" {
        candle::validate(a)?;
    }
    if !a.what_if.is_empty() && a.trace != "full" {
        return Err(format!(
            "--what-if needs quantization-error tracing, which --trace {} does not record: \
             use --trace full",
            a.trace
        ));
    }
    Ok(())
}

/// The output files, created before the model loads so that a bad path is
/// an error before the run, not after it.
struct Outputs {
    json: Option<(String, std::fs::File)>,
    jsonl: Option<(String, std::fs::File)>,
    html: Option<(String, std::fs::File)>,
    dump: Option<(String, std::fs::File)>,
}

/// Creates the output file `path` names, if it names one.
fn create_output(path: &Option<String>) -> Result<Option<(String, std::fs::File)>, String> {
    path.as_ref()
        .map(|p| {
            std::fs::File::create(p)
                .map(|f| (p.clone(), f))
                .map_err(|e| format!("cannot create {p}: {e}"))
        })
        .transpose()
}

impl Outputs {
    fn create(args: &Args) -> Result<Self, String> {
        let create = create_output;
        Ok(Self {
            json: create(&args.json)?,
            jsonl: create(&args.jsonl)?,
            html: create(&args.html)?,
            dump: create(&args.dump)?,
        })
    }
}

/// The model to run: the file given, else the default file when it exists,
/// else a synthetic model.
enum Source {
    File(String),
    Synthetic(String),
}

fn source(args: &Args) -> Source {
    if let Some(path) = &args.gguf {
        return Source::File(path.clone());
    }
    if let Some(shape) = &args.synthetic {
        return Source::Synthetic(shape.clone());
    }
    if std::path::Path::new(DEFAULT_GGUF).is_file() {
        return Source::File(DEFAULT_GGUF.into());
    }
    println!(
        "no model file at {DEFAULT_GGUF}: `bash .ci/fetch-model` fetches SmolLM2-135M-Instruct \
         (98 MB); running a synthetic model of its shape instead"
    );
    Source::Synthetic("smollm2".into())
}

fn main() -> ExitCode {
    let args = match Cli::parse().command {
        Command::Run(args) => *args,
        Command::Diff(args) => {
            return match diff::diff(&args) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::from(1),
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Report(args) => {
            return match report::report(&args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    };
    if let Err(e) = validate(&args) {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    let outputs = match Outputs::create(&args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    // One branch, three monomorphized models.
    let result = match (args.engine.as_str(), args.trace.as_str()) {
        ("candle", "off") => candle::run(&args, outputs, Disabled),
        ("candle", "lightweight") => candle::run(&args, outputs, Lightweight),
        ("candle", _) => candle::run(&args, outputs, Full),
        (_, "off") => run(&args, outputs, Disabled),
        (_, "lightweight") => run(&args, outputs, Lightweight),
        _ => run(&args, outputs, Full),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run<C: TraceConfig>(args: &Args, outputs: Outputs, trace: C) -> Result<(), String> {
    let started = Instant::now();
    let cache = KvCacheOptions {
        capacity: args.ctx,
        sinks: 4,
    };
    let source = source(args);
    let mut model: Llama<C> = match &source {
        Source::File(path) => {
            Llama::from_gguf(path, Some(cache), trace).map_err(|e| format!("{path}: {e}"))?
        }
        Source::Synthetic(shape) => {
            let config = if shape == "tiny" {
                Config::tiny()
            } else {
                Config::smollm2_135m()
            };
            let weights =
                model_tracer_llama::model::synthetic_weights(&config, GgmlType::Q4_1, args.seed)
                    .map_err(|e| e.to_string())?;
            Llama::new(config, weights, None, cache, trace).map_err(|e| e.to_string())?
        }
    };
    let load_secs = started.elapsed().as_secs_f64();
    let c = model.config.clone();
    let source = match &source {
        Source::File(p) => p.clone(),
        Source::Synthetic(shape) => {
            format!("synthetic {shape} (Q4_1 weights, seed {})", args.seed)
        }
    };
    println!(
        "model: {source}\n  {} layers, hidden {}, {} heads / {} KV heads, vocab {}, KV capacity {} positions; loaded in {load_secs:.2} s",
        c.n_layers,
        c.dim,
        c.n_heads,
        c.n_kv_heads,
        c.vocab_size,
        model.cache().capacity(),
    );
    check_layers(args, c.n_layers)?;
    if let Some(f) = args.inject {
        model.set_fault(Some(f));
        println!(
            "  injecting {:?} at layer {} (shows at stage {})",
            f.kind,
            f.layer,
            f.stage()
        );
    }
    if !args.what_if.is_empty() {
        model
            .set_what_if(&args.what_if)
            .map_err(|e| e.to_string())?;
    }
    if args.exact {
        model.set_exact(true);
        println!("  matmuls: the f32 reference path (--exact)");
    }
    model.set_prefill_chunk(args.prefill_chunk);

    let prompt_ids = prompt_ids(args, model.tokenizer.as_ref())?;
    let total = prompt_ids.len() + args.max_tokens;
    let info = model_tracer_llama::report::model_info(&model, &source);
    let vocab = (0..c.vocab_size as u32).map(|id| model.token_text(id));
    let vocab = if outputs.jsonl.is_some() {
        vocab.collect()
    } else {
        Vec::new()
    };
    install_tracer(model.tracer_mut(), args, &outputs, total, info, vocab)?;
    println!(
        "trace: {} | prompt: {} tokens, in chunks of up to {} | generating up to {} tokens",
        args.trace,
        prompt_ids.len(),
        model.prefill_chunk(),
        args.max_tokens
    );

    let t0 = Instant::now();
    let mut first_token: Option<f64> = None;
    let bar = progress_bar(args.max_tokens);
    let generation = model.generate(&prompt_ids, args.max_tokens, |_| {
        first_token.get_or_insert(t0.elapsed().as_secs_f64());
        bar.set_message("generating");
        bar.inc(1);
    });
    bar.finish_and_clear();
    let timing = Timing::new(
        load_secs,
        &generation,
        first_token.unwrap_or(0.0),
        t0.elapsed().as_secs_f64(),
    );
    print_outcome(
        &timing,
        model.tokenizer.as_ref(),
        &prompt_ids,
        &generation.tokens,
    );
    match report_trace(
        model.tracer(),
        model.config.n_layers,
        |id| model.token_text(id),
        &prompt_ids,
        &generation.tokens,
        args.exact,
    ) {
        Some(summary) => report_what_if(&summary),
        None => println!("tracing is off: Llama<Disabled> contains no tracing code."),
    }

    if let Some((path, file)) = outputs.json {
        write_json(file, &model, &prompt_ids, &generation.tokens, &timing)
            .map_err(|e| format!("{path}: {e}"))?;
        println!("\nwrote the run to {path}");
    }
    check_sink(&outputs.jsonl, model.tracer())?;
    if let Some((path, file)) = outputs.html {
        let mut tokens = prompt_ids.clone();
        tokens.extend(&generation.tokens);
        let input = model_tracer_llama::report::report_input(&model, &tokens, &source);
        let mut out = std::io::BufWriter::new(file);
        model_tracer::write_html(&mut out, &input)
            .and_then(|()| out.flush())
            .map_err(|e| format!("{path}: {e}"))?;
        println!("wrote the HTML report to {path}");
    }
    if let Some((path, file)) = outputs.dump {
        write_dump(file, model.tracer_mut(), &source, None, args.exact)
            .map_err(|e| format!("{path}: {e}"))?;
        println!("wrote the activations to {path}");
    }
    Ok(())
}

/// The layers named by `--inject` and `--dump-layers` exist in a model
/// of `layers` layers.
fn check_layers(args: &Args, layers: usize) -> Result<(), String> {
    if let Some(f) = args.inject.filter(|f| f.layer >= layers) {
        return Err(format!(
            "--inject layer {} but the model has {layers} layers",
            f.layer
        ));
    }
    if let Some(&l) = args.dump_layers.iter().flatten().find(|&&l| l >= layers) {
        return Err(format!(
            "--dump-layers {l} but the model has {layers} layers"
        ));
    }
    Ok(())
}

/// The tracer of a run, made anew with the run's options, and the outputs
/// that stream from it installed: the JSON Lines sink (`vocab` is the
/// text of each token id, for its rows) and the activation dump.
fn install_tracer<C: TraceConfig>(
    tracer: &mut ModelTracer<C>,
    args: &Args,
    outputs: &Outputs,
    total: usize,
    info: model_tracer::ModelInfo,
    vocab: Vec<String>,
) -> Result<(), String> {
    // Keep every forward of this run in detail: the report below reads them.
    let options = TraceOptions {
        max_forwards: total.max(1),
        attention_config: AttentionTraceConfig {
            top_k: 8,
            ..AttentionTraceConfig::default()
        },
        // A dump holds the logits of every position, as one position at
        // a time computes them; otherwise a prompt chunk's LM head runs
        // for its last position only.
        logit_rows: if outputs.dump.is_some() {
            LogitRows::Every
        } else {
            LogitRows::Last
        },
        ..TraceOptions::default()
    };
    let config = tracer.config().clone();
    *tracer = ModelTracer::with_options(config, options);
    if let Some((_, file)) = &outputs.jsonl {
        let file = file.try_clone().map_err(|e| e.to_string())?;
        let sink = model_tracer::JsonlSink::new(std::io::BufWriter::new(file))
            .with_model(info)
            .with_vocabulary(move |id| {
                vocab
                    .get(id as usize)
                    .cloned()
                    .unwrap_or_else(|| format!("<{id}>"))
            });
        tracer.set_sink(Some(model_tracer::SinkHandle::new(sink)));
    }
    if outputs.dump.is_some() {
        let filter = DumpFilter {
            layers: args.dump_layers.clone(),
            stages: args.dump_stages.clone(),
            positions: None,
        };
        tracer.set_dump(Some(DumpRecorder::new(filter)));
    }
    Ok(())
}

/// The generation's progress, drawn on stderr only where a terminal is
/// attached (indicatif hides itself otherwise), so piped output stays clean.
fn progress_bar(max_tokens: usize) -> ProgressBar {
    let bar = ProgressBar::new(max_tokens as u64).with_style(
        ProgressStyle::with_template("  {msg} [{bar:30}] {pos}/{len} tokens, {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message("prompt");
    bar
}

/// Fails with the JSON Lines sink's error, if writing failed; otherwise
/// says how many forwards it wrote.
fn check_sink<C: TraceConfig>(
    jsonl: &Option<(String, std::fs::File)>,
    tracer: &ModelTracer<C>,
) -> Result<(), String> {
    if let (Some((path, _)), Some(sink)) = (jsonl, tracer.sink()) {
        let status = sink.status();
        match status.failure {
            Some(f) => return Err(format!("{path}: {f}")),
            None => println!("streamed {} forwards to {path}", status.forwards_written),
        }
    }
    Ok(())
}

/// Writes the dump the tracer filled during the run; `engine` names the
/// engine when it is not the reference decoder.
fn write_dump<C: TraceConfig>(
    file: std::fs::File,
    tracer: &mut ModelTracer<C>,
    name: &str,
    engine: Option<&str>,
    exact: bool,
) -> Result<(), String> {
    let Some(mut dump) = tracer.take_dump() else {
        return Err("the tracer kept no dump (activation tracing is off)".into());
    };
    dump.set_metadata("model", name);
    if let Some(engine) = engine {
        dump.set_metadata("engine", engine);
    }
    dump.set_metadata("matmuls", if exact { "f32" } else { "quantized" });
    let mut out = std::io::BufWriter::new(file);
    dump.write_to(&mut out)
        .and_then(|()| out.flush())
        .map_err(|e| e.to_string())?;
    println!(
        "\ndump: {} positions, {} tensors (hidden {}, vocabulary {})",
        dump.len(),
        dump.tensors().count(),
        dump.dim().map_or("-".into(), |d| d.to_string()),
        dump.vocab().map_or("-".into(), |v| v.to_string()),
    );
    Ok(())
}

/// The prompt's token ids: the chat question (default) or the raw prompt,
/// through the model's tokenizer; a synthetic model has none and takes the
/// text's bytes as ids.
fn prompt_ids(args: &Args, tokenizer: Option<&Tokenizer>) -> Result<Vec<u32>, String> {
    let ids = match tokenizer {
        Some(tok) => match &args.prompt {
            Some(p) => tok.encode(p),
            None => {
                let question = args.chat.as_deref().unwrap_or(DEFAULT_CHAT);
                let mut chat = Vec::new();
                if args.system != "template" {
                    chat.push(ChatMessage::system(args.system.as_str()));
                }
                chat.push(ChatMessage::user(question));
                let text = tok
                    .apply_chat_template(&chat, true)
                    .map_err(|e| e.to_string())?;
                tok.encode(&text)
            }
        },
        None => {
            let text = args
                .chat
                .as_deref()
                .or(args.prompt.as_deref())
                .unwrap_or(DEFAULT_CHAT);
            text.bytes().map(u32::from).collect()
        }
    };
    if ids.is_empty() {
        return Err("the prompt encodes to no tokens".into());
    }
    Ok(ids)
}

fn write_json<C: TraceConfig>(
    file: std::fs::File,
    model: &Llama<C>,
    prompt: &[u32],
    generated: &[u32],
    timing: &Timing,
) -> Result<(), String> {
    let mut doc = model_tracer_llama::export::trace_json(model, prompt, generated);
    if let Some(map) = doc.as_object_mut() {
        if !model.tracer().is_enabled() {
            // Nothing was traced: no summary and no forwards, rather than
            // empty ones that look like a trace of nothing.
            map.remove("summary");
            map.remove("forwards");
        }
        map.insert("timing".into(), timing.to_json());
    }
    let mut out = std::io::BufWriter::new(file);
    serde_json::to_writer(&mut out, &doc).map_err(|e| e.to_string())?;
    out.flush().map_err(|e| e.to_string())
}
