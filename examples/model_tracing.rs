//! Traces a LLaMA-family model end to end with the five trace systems.
//!
//! With no arguments it runs offline on a synthetic model shaped like
//! SmolLM2-135M; `--gguf PATH` traces a real GGUF file. See `--help`.

use std::fmt::Write as _;
use std::io::Write as _;
use std::process::ExitCode;
use std::time::Instant;

use model_tracer::reference::dtype::GgmlType;
use model_tracer::reference::model::{Config, Fault, KvCacheOptions, Llama};
use model_tracer::reference::tokenizer::ChatMessage;
use model_tracer::{
    AttentionTraceConfig, Disabled, Full, Lightweight, ModelTracer, TraceConfig, TraceOptions,
};

const HELP: &str = "\
model_tracing: trace what a transformer computes, token by token

USAGE:
    cargo run --release --example model_tracing -- [OPTIONS]

MODEL (default: a synthetic model shaped like SmolLM2-135M, Q4_1 weights, seed 1):
    --gguf PATH          trace a GGUF file (llama architecture), with its tokenizer
    --synthetic SHAPE    synthetic model shape: smollm2 (default) or tiny
    --seed N             seed of the synthetic weights (default 1)

INPUT:
    --prompt TEXT        raw prompt; special-token text like <|im_start|> is parsed
    --chat TEXT          a user message, wrapped in the model's chat template
                         (synthetic models have no tokenizer: prompt bytes are token ids)
    --max-tokens N       tokens to generate, greedily (default 16)
    --ctx N              KV cache capacity in positions; smaller than the
                         sequence to see StreamingLLM evictions (default 4096)

TRACING:
    --trace LEVEL        off | lightweight | full (default full): three
                         monomorphized models, Llama<Disabled|Lightweight|Full>
    --inject FAULT       nan@LAYER | inf@LAYER | explode@LAYER: inject a fault
                         into every forward pass and watch it be found
    --what-if TYPES      also trace every brick with its weights re-quantized to
                         each of TYPES (comma-separated: q8_0,q5_1,q5_0,q4_1,q4_0,
                         q4_k,q6_k) against the model's own weights (needs full)
    --json PATH          write the whole trace as JSON (prompt and generated
                         ids, summary, every retained forward)
    --jsonl PATH         stream every forward as it completes, one JSON object
                         per line (pandas.read_json(PATH, lines=True))
    --html PATH          write the HTML report: one self-contained file
    -h, --help           this text
";

#[derive(Debug, Clone)]
struct Args {
    gguf: Option<String>,
    synthetic: String,
    seed: u64,
    prompt: Option<String>,
    chat: Option<String>,
    max_tokens: usize,
    ctx: usize,
    trace: String,
    inject: Option<Fault>,
    what_if: Vec<GgmlType>,
    json: Option<String>,
    jsonl: Option<String>,
    html: Option<String>,
}

fn parse_args() -> Result<Option<Args>, String> {
    let mut a = Args {
        gguf: None,
        synthetic: "smollm2".into(),
        seed: 1,
        prompt: None,
        chat: None,
        max_tokens: 16,
        ctx: 4096,
        trace: "full".into(),
        inject: None,
        what_if: Vec::new(),
        json: None,
        jsonl: None,
        html: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            return Ok(None);
        }
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        let number = |v: String| -> Result<usize, String> {
            v.parse()
                .map_err(|_| format!("{flag}: {v:?} is not a number"))
        };
        match flag.as_str() {
            "--gguf" => a.gguf = Some(value()?),
            "--synthetic" => a.synthetic = value()?,
            "--seed" => a.seed = number(value()?)? as u64,
            "--prompt" => a.prompt = Some(value()?),
            "--chat" => a.chat = Some(value()?),
            "--max-tokens" => a.max_tokens = number(value()?)?,
            "--ctx" => a.ctx = number(value()?)?,
            "--trace" => a.trace = value()?,
            "--inject" => a.inject = Some(Fault::parse(&value()?)?),
            "--json" => a.json = Some(value()?),
            "--jsonl" => a.jsonl = Some(value()?),
            "--html" => a.html = Some(value()?),
            "--what-if" => {
                for name in value()?.split(',') {
                    let ty = match name.trim().to_ascii_lowercase().as_str() {
                        "q8_0" => GgmlType::Q8_0,
                        "q5_1" => GgmlType::Q5_1,
                        "q5_0" => GgmlType::Q5_0,
                        "q4_1" => GgmlType::Q4_1,
                        "q4_0" => GgmlType::Q4_0,
                        "q4_k" => GgmlType::Q4_K,
                        "q6_k" => GgmlType::Q6_K,
                        other => return Err(format!("--what-if: unknown type {other:?}")),
                    };
                    a.what_if.push(ty);
                }
            }
            other => return Err(format!("unknown option {other:?} (see --help)")),
        }
    }
    if !matches!(a.trace.as_str(), "off" | "lightweight" | "full") {
        return Err(format!(
            "--trace {:?}: expected off, lightweight or full",
            a.trace
        ));
    }
    if !matches!(a.synthetic.as_str(), "smollm2" | "tiny") {
        return Err(format!(
            "--synthetic {:?}: expected smollm2 or tiny",
            a.synthetic
        ));
    }
    Ok(Some(a))
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(Some(a)) => a,
        Ok(None) => {
            print!("{HELP}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    // One branch, three monomorphized models.
    let result = match args.trace.as_str() {
        "off" => run(&args, Disabled),
        "lightweight" => run(&args, Lightweight),
        _ => run(&args, Full),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Printable form of a token: control characters and quotes escaped.
fn shown(text: &str) -> String {
    let mut s = String::new();
    for c in text.chars() {
        match c {
            '\n' => s.push_str("\\n"),
            '\t' => s.push_str("\\t"),
            '"' => s.push_str("\\\""),
            c if c.is_control() => {
                let _ = write!(s, "\\u{{{:x}}}", c as u32);
            }
            c => s.push(c),
        }
    }
    format!("\"{s}\"")
}

fn run<C: TraceConfig>(args: &Args, trace: C) -> Result<(), String> {
    let started = Instant::now();
    let cache = KvCacheOptions {
        capacity: args.ctx,
        sinks: 4,
    };
    let mut model: Llama<C> = match &args.gguf {
        Some(path) => {
            Llama::from_gguf(path, Some(cache), trace).map_err(|e| format!("{path}: {e}"))?
        }
        None => {
            let config = if args.synthetic == "tiny" {
                Config::tiny()
            } else {
                Config::smollm2_135m()
            };
            let weights = model_tracer::reference::model::synthetic_weights(
                &config,
                GgmlType::Q4_1,
                args.seed,
            )
            .map_err(|e| e.to_string())?;
            Llama::new(config, weights, None, cache, trace).map_err(|e| e.to_string())?
        }
    };
    let c = model.config.clone();
    let source = match &args.gguf {
        Some(p) => p.clone(),
        None => format!(
            "synthetic {} (Q4_1 weights, seed {})",
            args.synthetic, args.seed
        ),
    };
    println!(
        "model: {source}\n  {} layers, hidden {}, {} heads / {} KV heads, vocab {}, KV capacity {} positions; loaded in {:.2} s",
        c.n_layers,
        c.dim,
        c.n_heads,
        c.n_kv_heads,
        c.vocab_size,
        model.cache().capacity(),
        started.elapsed().as_secs_f64()
    );
    if let Some(f) = args.inject {
        if f.layer >= c.n_layers {
            return Err(format!(
                "--inject layer {} but the model has {} layers",
                f.layer, c.n_layers
            ));
        }
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
        if !model.tracer().wants_what_if() {
            println!("  --what-if needs quantization-error tracing (--trace full): ignored");
        }
    }

    // The prompt.
    let default_prompt = "The capital of France is";
    let prompt_ids: Vec<u32> = match &model.tokenizer {
        Some(tok) => match (&args.chat, &args.prompt) {
            (Some(msg), _) => {
                let text = tok
                    .apply_chat_template(&[ChatMessage::user(msg.as_str())], true)
                    .map_err(|e| e.to_string())?;
                tok.encode(&text)
            }
            (None, Some(p)) => tok.encode(p),
            (None, None) => tok.encode(default_prompt),
        },
        None => {
            let text = args
                .chat
                .as_deref()
                .or(args.prompt.as_deref())
                .unwrap_or(default_prompt);
            text.bytes().map(u32::from).collect()
        }
    };
    if prompt_ids.is_empty() {
        return Err("the prompt encodes to no tokens".into());
    }
    let total = prompt_ids.len() + args.max_tokens;
    // Keep every forward of this run in detail: the report below reads them.
    let options = TraceOptions {
        max_forwards: total.max(1),
        attention_config: AttentionTraceConfig {
            top_k: 8,
            ..AttentionTraceConfig::default()
        },
        ..TraceOptions::default()
    };
    let config = model.tracer().config().clone();
    *model.tracer_mut() = ModelTracer::with_options(config, options);
    if let Some(path) = &args.jsonl {
        open_jsonl(&mut model, path)?;
    }
    println!(
        "trace: {} | prompt: {} tokens | generating up to {} tokens",
        args.trace,
        prompt_ids.len(),
        args.max_tokens
    );

    let t0 = Instant::now();
    let mut done = 0usize;
    let generation = model.generate(&prompt_ids, args.max_tokens, |_| {
        done += 1;
        eprint!(
            "\r  generated {done}/{} tokens ({:.1} s)",
            args.max_tokens,
            t0.elapsed().as_secs_f64()
        );
        let _ = std::io::stderr().flush();
    });
    eprintln!();
    let secs = t0.elapsed().as_secs_f64();
    let forwards = generation.computed_prompt_positions + generation.tokens.len().saturating_sub(1);
    println!(
        "ran {forwards} forward passes in {secs:.2} s ({:.1} ms per token)",
        1e3 * secs / forwards.max(1) as f64
    );
    let text = |ids: &[u32]| match &model.tokenizer {
        Some(t) => t.decode(ids),
        None => ids.iter().map(|i| format!("<{i}>")).collect(),
    };
    println!("prompt:    {}", shown(&text(&prompt_ids)));
    println!("generated: {}", shown(&text(&generation.tokens)));
    println!();

    let tracer = model.tracer();
    if !tracer.is_enabled() {
        println!("tracing is off: Llama<Disabled> contains no tracing code.");
        return Ok(());
    }
    let summary = tracer.summary();
    print!("{summary}");
    report_attention(&summary);
    report_lens(&model, &prompt_ids, &generation.tokens);
    report_quant(&summary);
    report_what_if(&summary);

    if let Some(path) = &args.json {
        write_json(path, &model, &prompt_ids, &generation.tokens)?;
        println!("\nwrote the whole trace to {path}");
    }
    if let (Some(path), Some(sink)) = (&args.jsonl, model.tracer().sink()) {
        let status = sink.status();
        match status.failure {
            Some(f) => return Err(format!("{path}: {f}")),
            None => println!("streamed {} forwards to {path}", status.forwards_written),
        }
    }
    if let Some(path) = &args.html {
        let mut tokens = prompt_ids.clone();
        tokens.extend(&generation.tokens);
        let input = model_tracer::reference::report::report_input(&model, &tokens, &source);
        let file = std::fs::File::create(path).map_err(|e| format!("{path}: {e}"))?;
        let mut out = std::io::BufWriter::new(file);
        model_tracer::write_html(&mut out, &input)
            .and_then(|()| out.flush())
            .map_err(|e| format!("{path}: {e}"))?;
        println!("wrote the HTML report to {path}");
    }
    Ok(())
}

#[cfg(feature = "serde")]
fn open_jsonl<C: TraceConfig>(model: &mut Llama<C>, path: &str) -> Result<(), String> {
    let file = std::fs::File::create(path).map_err(|e| format!("{path}: {e}"))?;
    let sink = model_tracer::JsonlSink::new(std::io::BufWriter::new(file));
    model
        .tracer_mut()
        .set_sink(Some(model_tracer::SinkHandle::new(sink)));
    Ok(())
}

#[cfg(not(feature = "serde"))]
fn open_jsonl<C: TraceConfig>(_: &mut Llama<C>, _: &str) -> Result<(), String> {
    Err("--jsonl needs the `serde` feature".into())
}

fn report_attention(summary: &model_tracer::TraceSummary) {
    if summary.heads.is_empty() {
        return;
    }
    let mut heads = summary.heads.clone();
    heads.sort_by(|a, b| b.mean_sink_weight.total_cmp(&a.mean_sink_weight));
    println!("\nattention sinks (heads with the most weight on the first token):");
    println!(
        "  {:>5} {:>4} {:>10} {:>10} {:>12} {:>9}",
        "layer", "head", "sink wt", "sink share", "entropy/max", "recency"
    );
    for h in heads.iter().take(6) {
        println!(
            "  {:>5} {:>4} {:>9.1}% {:>9.1}% {:>12.3} {:>8.1}%",
            h.layer,
            h.head,
            100.0 * h.mean_sink_weight,
            100.0 * h.sink_share(),
            h.mean_normalized_entropy,
            100.0 * h.recency_share()
        );
    }
    heads.sort_by(|a, b| b.recency_share().total_cmp(&a.recency_share()));
    let recent: Vec<String> = heads
        .iter()
        .filter(|h| h.recency_share() > 0.5)
        .take(8)
        .map(|h| {
            format!(
                "L{}H{} ({:.0}%)",
                h.layer,
                h.head,
                100.0 * h.recency_share()
            )
        })
        .collect();
    if recent.is_empty() {
        println!(
            "  recency: no head puts >70% of its weight on the last 5 positions in most steps"
        );
    } else {
        println!(
            "  recency-biased heads (>70% on the last 5 positions): {}",
            recent.join(", ")
        );
    }
}

fn report_lens<C: TraceConfig>(model: &Llama<C>, prompt: &[u32], generated: &[u32]) {
    let tracer = model.tracer();
    let start = prompt.len() - 1; // the forward whose logits chose generated[0]
    let rows: Vec<_> = tracer
        .forwards()
        .filter(|f| f.position >= start)
        .filter_map(|f| f.logits.as_ref().map(|l| (f.position, l)))
        .collect();
    if rows.is_empty() {
        return;
    }
    println!("\nlogit lens: each generated token's rank through the layers (0 = top)");
    let layers = model.config.n_layers;
    let step = layers.div_ceil(10).max(1);
    let mut head = format!(
        "  {:>5} {:<16} {:>5} {:>8} |",
        "pos", "token", "won@", "decisive"
    );
    for l in (0..layers).step_by(step) {
        let _ = write!(head, " L{l:<5}");
    }
    println!("{head}");
    for (pos, lt) in rows {
        let Some(chosen) = generated.get(pos - start) else {
            continue;
        };
        let Some(tok) = lt.token(*chosen) else {
            continue;
        };
        let mut line = format!(
            "  {:>5} {:<16} {:>5} {:>8} |",
            pos,
            shown(&model.token_text(*chosen)),
            tok.won_at_layer().map_or("-".into(), |l| l.to_string()),
            tok.decisive_layer().map_or("-".into(), |l| l.to_string())
        );
        for (i, rank) in tok.ranks.iter().enumerate() {
            if tok.layer_at(i) % step == 0 {
                let _ = write!(line, " {rank:<6}");
            }
        }
        println!("{line}");
    }
}

fn report_what_if(summary: &model_tracer::TraceSummary) {
    if summary.what_if.is_empty() {
        return;
    }
    println!(
        "\nwhat-if: the bricks that lose most when re-quantized (keep these at higher precision):"
    );
    let mut types: Vec<_> = summary.what_if.iter().map(|w| w.quant_type).collect();
    types.dedup();
    for qt in types {
        let mut rows: Vec<_> = summary
            .what_if
            .iter()
            .filter(|w| w.quant_type == qt)
            .collect();
        rows.sort_by(|a, b| a.min_cosine.total_cmp(&b.min_cosine));
        let worst: Vec<String> = rows
            .iter()
            .take(5)
            .map(|w| {
                format!(
                    "{} L{} cos {:.5} ({:.1} dB)",
                    w.brick, w.layer, w.min_cosine, w.mean_snr_db
                )
            })
            .collect();
        println!(
            "  {:>5} ({:.2} bits/weight): {}",
            qt.name(),
            qt.bits_per_element(),
            worst.join("; ")
        );
    }
}

fn report_quant(summary: &model_tracer::TraceSummary) {
    if let Some(w) = &summary.worst_brick {
        println!(
            "\nworst quantized brick: {} of layer {} ({} weights, 8-bit activations): cosine {:.6}, SNR {:.1} dB, max |err| {:.3e}",
            w.brick, w.layer_idx, w.quant_type, w.cosine_similarity, w.snr_db, w.max_abs_error
        );
    }
}

#[cfg(feature = "serde")]
fn write_json<C: TraceConfig>(
    path: &str,
    model: &Llama<C>,
    prompt: &[u32],
    generated: &[u32],
) -> Result<(), String> {
    let doc = model_tracer::reference::export::trace_json(model, prompt, generated);
    let file = std::fs::File::create(path).map_err(|e| format!("{path}: {e}"))?;
    serde_json::to_writer(std::io::BufWriter::new(file), &doc).map_err(|e| format!("{path}: {e}"))
}

#[cfg(not(feature = "serde"))]
fn write_json<C: TraceConfig>(_: &str, _: &Llama<C>, _: &[u32], _: &[u32]) -> Result<(), String> {
    Err("--json needs the `serde` feature".into())
}
