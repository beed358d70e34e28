//! `model-tracer run`: generates from a prompt on the model the flags
//! choose, traces it, prints what the tracer saw and writes the outputs.

use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

use model_tracer_llama::tokenizer::ChatMessage;

use crate::print;
use crate::setup::outputs::{Finished, Outputs};
use crate::setup::{
    CacheArgs, Engine, Loaded, ModelArgs, OutputArgs, Setup, Text, TraceArgs, WithModel,
};
use crate::timing::Timing;

/// The chat question asked when no input is given.
const DEFAULT_CHAT: &str = "What is the capital of France?";
/// The system message of a chat unless `--system` says otherwise. With the
/// template's own ("You are a helpful AI assistant named SmolLM, trained by
/// Hugging Face"), SmolLM2-135M answers the default question with a list
/// of French words ("L'Étoile, la Marseillaise, ..."); with this one it
/// answers it.
const DEFAULT_SYSTEM: &str = "You are a helpful assistant.";

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,

    /// Raw prompt, no chat template; special-token text like <|im_start|>
    /// is parsed (--engine llama.cpp adds the BOS the vocabulary asks for)
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
    /// inserts (llama.cpp's rendering of a template inserts none)
    #[arg(long, value_name = "TEXT", default_value = DEFAULT_SYSTEM, help_heading = "Input")]
    system: String,
    /// Tokens to generate, greedily
    #[arg(long, default_value_t = 16, value_name = "N", help_heading = "Input")]
    max_tokens: usize,

    #[command(flatten)]
    cache: CacheArgs,
    #[command(flatten)]
    trace: TraceArgs,
    #[command(flatten)]
    output: OutputArgs,
}

/// Why a run failed, which decides the exit status.
pub enum Error {
    /// Options that do not go together, or an output that cannot be
    /// created: nothing ran.
    Usage(String),
    /// The run itself failed.
    Run(String),
}

impl Args {
    fn setup(&self) -> Setup<'_> {
        Setup {
            model: &self.model,
            cache: &self.cache,
            trace: &self.trace,
            output: &self.output,
        }
    }
}

/// `model-tracer run`.
pub fn run(args: &Args) -> Result<(), Error> {
    let setup = args.setup();
    setup.validate().map_err(Error::Usage)?;
    let outputs = Outputs::create(&args.output).map_err(Error::Usage)?;
    setup
        .with_model(&mut |line| println!("{line}"), Generate { args, outputs })
        .and_then(|run| run)
        .map_err(Error::Run)
}

/// The run, once the model is loaded.
struct Generate<'a> {
    args: &'a Args,
    outputs: Outputs,
}

impl WithModel for Generate<'_> {
    type Output = Result<(), String>;

    fn call<M: Engine>(self, loaded: Loaded<M>) -> Result<(), String> {
        generate(self.args, self.outputs, loaded)
    }
}

fn generate<M: Engine>(args: &Args, outputs: Outputs, loaded: Loaded<M>) -> Result<(), String> {
    let Loaded {
        mut model,
        name,
        load_secs,
    } = loaded;
    let prompt_ids = prompt_ids(args, model.text())?;
    let total = prompt_ids.len() + args.max_tokens;
    if !model.evicts() && total > model.kv_capacity() {
        return Err(format!(
            "the prompt ({} tokens) and --max-tokens {} need {total} positions; the {} \
             model's KV cache does not evict and holds --ctx {}",
            prompt_ids.len(),
            args.max_tokens,
            M::ENGINE.unwrap_or("reference"),
            model.kv_capacity()
        ));
    }
    args.setup()
        .install_tracer(&mut model, &name, &outputs, total)?;
    println!(
        "trace: {}{} | prompt: {} tokens{} | generating up to {} tokens",
        args.trace.trace,
        M::ENGINE.map_or(String::new(), |e| format!(" | engine: {e}")),
        prompt_ids.len(),
        model
            .prefill_chunk()
            .map_or(String::new(), |n| format!(", in chunks of up to {n}")),
        args.max_tokens
    );

    let t0 = Instant::now();
    let mut first_token: Option<f64> = None;
    let bar = progress_bar(args.max_tokens);
    let generation = model.generate(&prompt_ids, args.max_tokens, |_| {
        first_token.get_or_insert(t0.elapsed().as_secs_f64());
        bar.set_message("generating");
        bar.inc(1);
    })?;
    bar.finish_and_clear();
    let timing = Timing::new(
        load_secs,
        &generation,
        first_token.unwrap_or(0.0),
        t0.elapsed().as_secs_f64(),
    );
    print::outcome(&timing, model.text(), &prompt_ids, &generation.tokens);
    match print::trace(&model, &prompt_ids, &generation.tokens, args.model.exact) {
        Some(summary) => print::what_if(&summary),
        None => println!(
            "tracing is off: {}<Disabled> contains no tracing code.",
            M::TYPE_NAME
        ),
    }

    let finished = Finished {
        prompt: &prompt_ids,
        generated: &generation.tokens,
        timing: &timing,
        exact: args.model.exact,
    };
    outputs.finish(&mut model, &name, &finished, &mut |line| println!("{line}"))
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

/// The prompt's token ids: the chat question (default) or the raw prompt,
/// through the model's text interface; a synthetic model has none and
/// takes the text's bytes as ids.
fn prompt_ids(args: &Args, text: Option<&dyn Text>) -> Result<Vec<u32>, String> {
    let ids = match text {
        Some(t) => match &args.prompt {
            Some(p) => t.encode(p)?,
            None => {
                let question = args.chat.as_deref().unwrap_or(DEFAULT_CHAT);
                let mut chat = Vec::new();
                if args.system != "template" {
                    chat.push(ChatMessage::system(args.system.as_str()));
                }
                chat.push(ChatMessage::user(question));
                t.encode_chat(&chat)?
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
