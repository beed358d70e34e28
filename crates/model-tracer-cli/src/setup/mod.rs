//! The set-up shared by the subcommands that run a model: the flags that
//! choose the engine, the model and what its tracer records, and from them
//! a loaded, configured model with its tracer (the output files are in
//! [`outputs`]).

mod candle;
mod engine;
#[cfg(feature = "llama-cpp")]
mod llama_cpp;
pub mod outputs;
mod reference;

use std::time::Instant;

use model_tracer::dump::{DumpFilter, DumpRecorder};
use model_tracer::{
    AttentionTraceConfig, Disabled, Full, Lightweight, LogitRows, ModelTracer, Stage, TraceOptions,
};
use model_tracer_candle::CandleLlama;
use model_tracer_llama::dtype::GgmlType;
use model_tracer_llama::model::{Fault, KvType, Llama, DEFAULT_PREFILL_CHUNK};

pub use engine::{Engine, Text};
use outputs::Outputs;

/// Where `bash .ci/fetch-model` puts SmolLM2-135M-Instruct.
pub const DEFAULT_GGUF: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

/// The heading of the output options, and the promise they share.
const OUTPUT: &str = "Output (each file is created before the model loads)";

/// The model to load and the engine that runs it.
#[derive(Debug, Clone, clap::Args)]
pub struct ModelArgs {
    /// Trace a GGUF file, with its tokenizer: the llama architecture, or
    /// any architecture llama.cpp runs under --engine llama.cpp [default:
    /// models/SmolLM2-135M-Instruct.Q4_1.gguf when it exists, from `bash
    /// .ci/fetch-model`; otherwise a synthetic model of the same shape]
    #[arg(long, value_name = "PATH", help_heading = "Model")]
    pub gguf: Option<String>,
    /// A synthetic model instead (Q4_1 weights, no tokenizer)
    #[arg(long, value_name = "SHAPE", value_parser = ["smollm2", "tiny"],
          conflicts_with = "gguf", help_heading = "Model")]
    pub synthetic: Option<String>,
    /// Seed of the synthetic weights
    #[arg(long, default_value_t = 1, value_name = "N", help_heading = "Model")]
    pub seed: u64,
    /// Run every matmul on the f32 reference path (dequantized weights,
    /// or a synthetic model's f32 masters, times unquantized activations)
    /// instead of the quantized kernels: slower, and what an f32
    /// implementation of the model computes
    #[arg(long, help_heading = "Model")]
    pub exact: bool,
    /// The model that runs: the reference decoder (`Llama`), or the LLaMA
    /// written on candle's ops and quantized matmuls (`CandleLlama`; a
    /// GGUF file, no --synthetic, no --what-if, a KV cache that does not
    /// evict), or llama.cpp itself (a GGUF file of any architecture it
    /// runs, tokenized and rendered as a chat by llama.cpp; built with the
    /// `llama-cpp` feature)
    #[arg(long, default_value = "reference", value_name = "ENGINE",
          value_parser = ["reference", "candle", "llama.cpp"], help_heading = "Model")]
    pub engine: String,
    /// Threads the model runs on: the reference decoder's matmuls split
    /// by output rows (the results are the same to the bit for any
    /// number), candle's thread pools (CANDLE_NUM_THREADS and
    /// RAYON_NUM_THREADS), llama.cpp's
    /// n_threads [default: every core the machine has]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=256),
          help_heading = "Model")]
    pub threads: Option<u16>,
}

impl ModelArgs {
    /// Threads the model runs on: `--threads`, or every core.
    pub fn threads(&self) -> usize {
        self.threads
            .map_or_else(model_tracer_llama::pool::available_threads, usize::from)
    }
}

/// The KV cache and the prefill: how many positions the model holds and
/// takes at once.
#[derive(Debug, Clone, clap::Args)]
pub struct CacheArgs {
    /// KV cache capacity in positions; smaller than the sequence to see
    /// StreamingLLM evictions
    #[arg(long, default_value_t = 4096, value_name = "N", help_heading = "Input")]
    pub ctx: usize,
    /// Prompt positions run through the model at once (batched prefill);
    /// 1 runs the prompt one position at a time. The results are the same
    /// to the bit either way
    #[arg(long, default_value_t = DEFAULT_PREFILL_CHUNK, value_name = "N", help_heading = "Model")]
    pub prefill_chunk: usize,
    /// How the KV cache stores keys and values: f32 (the values computed;
    /// the reference decoder's default) or f16 (llama.cpp's default: half
    /// the memory and half the bytes attention reads per position, results
    /// rounded accordingly). llama.cpp takes both (`type_k`, `type_v`);
    /// candle's cache is f32, which is all it takes
    #[arg(long, value_name = "TYPE", value_parser = KvType::parse, help_heading = "Model")]
    pub kv_type: Option<KvType>,
}

impl CacheArgs {
    /// Refuses a `--kv-type` other than `own`, the one cache type of an
    /// engine named `engine`.
    pub fn only_kv_type(&self, engine: &str, own: KvType) -> Result<(), String> {
        match self.kv_type {
            Some(t) if t != own => Err(format!(
                "--kv-type {}: {engine}'s KV cache is {}",
                t.name(),
                own.name()
            )),
            _ => Ok(()),
        }
    }
}

/// What the tracer records, and the faults it is shown.
#[derive(Debug, Clone, clap::Args)]
pub struct TraceArgs {
    /// Three monomorphized models: Llama<Disabled|Lightweight|Full>
    #[arg(long, default_value = "full", value_name = "LEVEL",
          value_parser = ["off", "lightweight", "full"], help_heading = "Tracing")]
    pub trace: String,
    /// nan@LAYER | inf@LAYER | explode@LAYER: inject a fault into every
    /// forward pass and watch it be found. scale@LAYER[:STAGE] (x1.01) and
    /// swap@LAYER[:STAGE] (heads 0 and 1 swapped), STAGE post_attn (default)
    /// or post_ffn: errors no anomaly rule sees, for `model-tracer diff`
    #[arg(long, value_name = "FAULT", value_parser = Fault::parse, help_heading = "Tracing")]
    pub inject: Option<Fault>,
    /// Also trace every brick with its weights re-quantized to each of TYPES
    /// (q8_0, q5_1, q5_0, q4_1, q4_0, q4_k, q6_k) against the model's own
    /// weights; needs --trace full
    #[arg(long, value_name = "TYPES", value_delimiter = ',', value_parser = parse_type,
          help_heading = "Tracing")]
    pub what_if: Vec<GgmlType>,
}

/// The files a run writes.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct OutputArgs {
    /// Write the run as JSON: prompt and generated ids, timing, and (when
    /// tracing) the summary and every retained forward
    #[arg(
        long,
        value_name = "PATH",
        help_heading = OUTPUT
    )]
    pub json: Option<String>,
    /// Stream every forward as it completes, one JSON object per line
    /// (pandas.read_json(PATH, lines=True)); needs tracing
    #[arg(
        long,
        value_name = "PATH",
        help_heading = OUTPUT
    )]
    pub jsonl: Option<String>,
    /// Write the HTML report, one self-contained file; needs tracing
    #[arg(
        long,
        value_name = "PATH",
        help_heading = OUTPUT
    )]
    pub html: Option<String>,
    /// Write the full activations of every forward as one safetensors file
    /// (features.md, "Activation dumps"): tokens, positions, embedding, the
    /// six stages of each layer, final_norm and logits, one row per
    /// position; needs tracing
    #[arg(
        long,
        value_name = "PATH",
        help_heading = OUTPUT
    )]
    pub dump: Option<String>,
    /// Dump only these layers' stages (e.g. 0,3,5). embedding, final_norm
    /// and logits belong to no layer: this list keeps them [default: every
    /// layer]
    #[arg(long, value_name = "LAYERS", value_delimiter = ',', requires = "dump",
          help_heading = OUTPUT)]
    pub dump_layers: Option<Vec<usize>>,
    /// Dump only these stages: input, post_norm, post_attn, post_ffn_norm,
    /// post_ffn, output (of each dumped layer) and embedding, final_norm,
    /// logits (outside the layers), which a list leaves out unless it names
    /// them: `--dump-stages input,post_attn` dumps those two, the tokens and
    /// the positions [default: every stage]
    #[arg(long, value_name = "STAGES", value_delimiter = ',', value_parser = parse_stage,
          requires = "dump", help_heading = OUTPUT)]
    pub dump_stages: Option<Vec<Stage>>,
}

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

/// The model file the flags name, else the default file when it exists,
/// else a synthetic model.
pub enum Source {
    /// A GGUF file.
    File(String),
    /// A synthetic model of this shape (`smollm2` or `tiny`).
    Synthetic(String),
}

impl Source {
    /// The model `args` choose; `notes` hears it when the default file is
    /// missing and a synthetic model stands in.
    pub fn of(args: &ModelArgs, notes: &mut dyn FnMut(&str)) -> Self {
        if let Some(path) = &args.gguf {
            return Self::File(path.clone());
        }
        if let Some(shape) = &args.synthetic {
            return Self::Synthetic(shape.clone());
        }
        if std::path::Path::new(DEFAULT_GGUF).is_file() {
            return Self::File(DEFAULT_GGUF.into());
        }
        notes(&format!(
            "no model file at {DEFAULT_GGUF}: `bash .ci/fetch-model` fetches \
             SmolLM2-135M-Instruct (98 MB); running a synthetic model of its shape instead"
        ));
        Self::Synthetic("smollm2".into())
    }
}

/// A model [`Setup::with_model`] loaded and configured.
pub struct Loaded<M> {
    /// The model.
    pub model: M,
    /// Its name in the outputs: the file, or the synthetic model's shape.
    pub name: String,
    /// Seconds the loading took.
    pub load_secs: f64,
}

/// What to do with a model once [`Setup::with_model`] has it: generic over
/// the engine and the trace level, which the flags choose at run time.
pub trait WithModel {
    /// What it returns.
    type Output;
    /// Does it with `loaded`.
    fn call<M: Engine>(self, loaded: Loaded<M>) -> Self::Output;
}

/// The flags a model is set up from.
#[derive(Debug, Clone, Copy)]
pub struct Setup<'a> {
    /// The model and its engine.
    pub model: &'a ModelArgs,
    /// Its KV cache and prefill.
    pub cache: &'a CacheArgs,
    /// What its tracer records.
    pub trace: &'a TraceArgs,
    /// The files the run writes (none, by default).
    pub output: &'a OutputArgs,
}

impl Setup<'_> {
    /// The checks clap cannot express: outputs that need a trace, options
    /// the engine does not take.
    pub fn validate(&self) -> Result<(), String> {
        let (trace, output) = (self.trace, self.output);
        if trace.trace == "off" {
            for (flag, path) in [
                ("--jsonl", &output.jsonl),
                ("--html", &output.html),
                ("--dump", &output.dump),
            ] {
                if path.is_some() {
                    return Err(format!(
                        "{flag} writes the trace, and --trace off records none: \
                         use --trace lightweight or full"
                    ));
                }
            }
        }
        if self.model.engine == "candle" {
            candle::validate(self.model, trace)?;
        }
        if self.model.engine == "llama.cpp" {
            #[cfg(not(feature = "llama-cpp"))]
            return Err(
                "--engine llama.cpp: this program was built without the `llama-cpp` feature".into(),
            );
            #[cfg(feature = "llama-cpp")]
            llama_cpp::validate(self.model, trace)?;
        }
        if !trace.what_if.is_empty() && trace.trace != "full" {
            return Err(format!(
                "--what-if needs quantization-error tracing, which --trace {} does not \
                 record: use --trace full",
                trace.trace
            ));
        }
        Ok(())
    }

    /// Loads the model the flags choose, compiled for the trace level they
    /// choose, configures it (fault, what-if, exact matmuls, prefill) and
    /// hands it to `then`. `notes` hears what the set-up has to say: the
    /// model's shape, the fault injected, the matmuls under `--exact`.
    pub fn with_model<W: WithModel>(
        &self,
        notes: &mut dyn FnMut(&str),
        then: W,
    ) -> Result<W::Output, String> {
        // One branch, three monomorphized models per engine.
        match (self.model.engine.as_str(), self.trace.trace.as_str()) {
            ("candle", "off") => self.open::<CandleLlama<Disabled>, W>(Disabled, notes, then),
            ("candle", "lightweight") => {
                self.open::<CandleLlama<Lightweight>, W>(Lightweight, notes, then)
            }
            ("candle", _) => self.open::<CandleLlama<Full>, W>(Full, notes, then),
            #[cfg(feature = "llama-cpp")]
            ("llama.cpp", level) => llama_cpp::open(self, level, notes, then),
            (_, "off") => self.open::<Llama<Disabled>, W>(Disabled, notes, then),
            (_, "lightweight") => self.open::<Llama<Lightweight>, W>(Lightweight, notes, then),
            _ => self.open::<Llama<Full>, W>(Full, notes, then),
        }
    }

    fn open<M: Engine, W: WithModel>(
        &self,
        trace: M::Trace,
        notes: &mut dyn FnMut(&str),
        then: W,
    ) -> Result<W::Output, String> {
        let started = Instant::now();
        let (mut model, name) = M::load(self.model, self.cache, trace, notes)?;
        let load_secs = started.elapsed().as_secs_f64();
        let c = model.config();
        notes(&format!(
            "model: {name}\n  {} layers, hidden {}, {} heads / {} KV heads, vocab {}, KV capacity \
             {} positions{}{}; loaded in {load_secs:.2} s; {} thread{}",
            c.n_layers,
            c.dim,
            c.n_heads,
            c.n_kv_heads,
            c.vocab_size,
            model.kv_capacity(),
            self.cache
                .kv_type
                .map_or(String::new(), |t| format!(" of {}", t.name())),
            if model.evicts() { "" } else { " (no eviction)" },
            self.model.threads(),
            if self.model.threads() == 1 { "" } else { "s" },
        ));
        self.configure(&mut model, notes)?;
        Ok(then.call(Loaded {
            model,
            name,
            load_secs,
        }))
    }

    /// Applies the flags to a loaded model: the layers they name exist, the
    /// fault, the what-if types, the exact matmuls, the prefill chunk.
    fn configure<M: Engine>(
        &self,
        model: &mut M,
        notes: &mut dyn FnMut(&str),
    ) -> Result<(), String> {
        self.check_layers(model.config().n_layers)?;
        if let Some(f) = self.trace.inject {
            model.set_fault(Some(f));
            notes(&format!(
                "  injecting {:?} at layer {} (shows at stage {})",
                f.kind,
                f.layer,
                f.stage()
            ));
        }
        if !self.trace.what_if.is_empty() {
            model.set_what_if(&self.trace.what_if)?;
        }
        if self.model.exact {
            model.set_exact(true)?;
            notes(&format!("  matmuls: {} (--exact)", M::EXACT_PATH));
        }
        model.set_prefill_chunk(self.cache.prefill_chunk);
        Ok(())
    }

    /// The layers named by `--inject` and `--dump-layers` exist in a model
    /// of `layers` layers.
    fn check_layers(&self, layers: usize) -> Result<(), String> {
        if let Some(f) = self.trace.inject.filter(|f| f.layer >= layers) {
            return Err(format!(
                "--inject layer {} but the model has {layers} layers",
                f.layer
            ));
        }
        if let Some(&l) = self
            .output
            .dump_layers
            .iter()
            .flatten()
            .find(|&&l| l >= layers)
        {
            return Err(format!(
                "--dump-layers {l} but the model has {layers} layers"
            ));
        }
        Ok(())
    }

    /// Makes `model`'s tracer anew with the options of a run of
    /// `max_forwards` forwards, every one kept in detail, and installs the
    /// outputs that stream from it: the JSON Lines sink (its rows name the
    /// model `name` and the text of each token) and the activation dump.
    pub fn install_tracer<M: Engine>(
        &self,
        model: &mut M,
        name: &str,
        outputs: &Outputs,
        max_forwards: usize,
    ) -> Result<(), String> {
        let options = TraceOptions {
            max_forwards: max_forwards.max(1),
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
        let info = outputs::model_info(model, name);
        let vocab: Vec<String> = if outputs.jsonl.is_some() {
            (0..model.config().vocab_size as u32)
                .map(|id| model.token_text(id))
                .collect()
        } else {
            Vec::new()
        };
        let tracer = model.tracer_mut();
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
                layers: self.output.dump_layers.clone(),
                stages: self.output.dump_stages.clone(),
                ..DumpFilter::default()
            };
            tracer.set_dump(Some(DumpRecorder::new(filter)));
        }
        Ok(())
    }
}
