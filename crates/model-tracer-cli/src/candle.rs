//! `model-tracer run --engine candle`: the same run on the LLaMA written on
//! candle (`model-tracer-candle`), with the same outputs.

use std::io::Write as _;
use std::time::Instant;

use model_tracer::report::ReportInput;
use model_tracer::{ModelInfo, TraceConfig};
use model_tracer_candle::CandleLlama;
use model_tracer_llama::model::Generation;

use super::{
    check_layers, check_sink, ids_text, install_tracer, print_outcome, progress_bar, prompt_ids,
    report_trace, write_dump, Args, Outputs, Timing, DEFAULT_GGUF,
};

/// The options the candle model does not take.
pub(crate) fn validate(a: &Args) -> Result<(), String> {
    if a.synthetic.is_some() {
        return Err(
            "--engine candle runs a GGUF file: --synthetic is the reference decoder's".into(),
        );
    }
    if !a.what_if.is_empty() {
        return Err(
            "--what-if is the reference decoder's: --engine candle does not re-quantize".into(),
        );
    }
    Ok(())
}

/// What the report and the JSON Lines rows say of `model`, named `name`.
fn model_info<C: TraceConfig>(model: &CandleLlama<C>, name: &str) -> ModelInfo {
    let c = &model.config;
    ModelInfo {
        name: name.to_string(),
        layers: c.n_layers,
        heads: c.n_heads,
        kv_heads: c.n_kv_heads,
        dim: c.dim,
        vocab: c.vocab_size,
        kv_capacity: model.cache().capacity(),
        kv_sinks: 0,
    }
}

pub(crate) fn run<C: TraceConfig>(args: &Args, outputs: Outputs, trace: C) -> Result<(), String> {
    let started = Instant::now();
    let path = args.gguf.clone().unwrap_or_else(|| DEFAULT_GGUF.into());
    if !std::path::Path::new(&path).is_file() {
        return Err(format!(
            "no model file at {path}: `bash .ci/fetch-model` fetches SmolLM2-135M-Instruct (98 MB)"
        ));
    }
    let mut model =
        CandleLlama::from_gguf(&path, Some(args.ctx), trace).map_err(|e| format!("{path}: {e}"))?;
    let load_secs = started.elapsed().as_secs_f64();
    let c = model.config.clone();
    let source = format!("{path} (candle)");
    println!(
        "model: {source}\n  {} layers, hidden {}, {} heads / {} KV heads, vocab {}, KV capacity {} positions (no eviction); loaded in {load_secs:.2} s",
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
    if args.exact {
        model.set_exact(true).map_err(|e| e.to_string())?;
        println!("  matmuls: f32 products with the dequantized weights (--exact)");
    }

    let prompt_ids = prompt_ids(args, model.tokenizer.as_ref())?;
    let total = prompt_ids.len() + args.max_tokens;
    if total > model.cache().capacity() {
        return Err(format!(
            "the prompt ({} tokens) and --max-tokens {} need {total} positions; the candle \
             model's KV cache does not evict and holds --ctx {}",
            prompt_ids.len(),
            args.max_tokens,
            model.cache().capacity()
        ));
    }
    let info = model_info(&model, &source);
    let vocab = if outputs.jsonl.is_some() {
        (0..c.vocab_size as u32)
            .map(|id| model.token_text(id))
            .collect()
    } else {
        Vec::new()
    };
    install_tracer(model.tracer_mut(), args, &outputs, total, info, vocab)?;
    println!(
        "trace: {} | engine: candle | prompt: {} tokens | generating up to {} tokens",
        args.trace,
        prompt_ids.len(),
        args.max_tokens
    );

    let t0 = Instant::now();
    let mut first_token: Option<f64> = None;
    let bar = progress_bar(args.max_tokens);
    let tokens = model
        .generate(&prompt_ids, args.max_tokens, |_| {
            first_token.get_or_insert(t0.elapsed().as_secs_f64());
            bar.set_message("generating");
            bar.inc(1);
        })
        .map_err(|e| e.to_string())?;
    bar.finish_and_clear();
    let generation = Generation {
        tokens,
        reused_prompt_positions: 0,
        computed_prompt_positions: prompt_ids.len(),
    };
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
    if report_trace(
        model.tracer(),
        c.n_layers,
        |id| model.token_text(id),
        &prompt_ids,
        &generation.tokens,
        args.exact,
    )
    .is_none()
    {
        println!("tracing is off: CandleLlama<Disabled> contains no tracing code.");
    }

    let mut tokens = prompt_ids.clone();
    tokens.extend(&generation.tokens);
    if let Some((path, file)) = outputs.json {
        let mut doc = serde_json::json!({
            "engine": "candle",
            "model": {
                "layers": c.n_layers,
                "dim": c.dim,
                "heads": c.n_heads,
                "kv_heads": c.n_kv_heads,
                "head_dim": c.head_dim,
                "ffn_dim": c.ffn_dim,
                "vocab": c.vocab_size,
                "kv_capacity": model.cache().capacity(),
            },
            "config": model_tracer::config::describe(model.tracer().config()),
            "prompt_ids": prompt_ids,
            "prompt_text": ids_text(model.tokenizer.as_ref(), &prompt_ids),
            "generated_ids": generation.tokens,
            "generated_text": ids_text(model.tokenizer.as_ref(), &generation.tokens),
            "timing": timing.to_json(),
        });
        if let (true, Some(map)) = (model.tracer().is_enabled(), doc.as_object_mut()) {
            let forwards: Vec<_> = model.tracer().forwards().collect();
            map.insert(
                "summary".into(),
                serde_json::json!(model.tracer().summary()),
            );
            map.insert("forwards".into(), serde_json::json!(forwards));
        }
        let mut out = std::io::BufWriter::new(file);
        serde_json::to_writer(&mut out, &doc)
            .map_err(|e| e.to_string())
            .and_then(|()| out.flush().map_err(|e| e.to_string()))
            .map_err(|e| format!("{path}: {e}"))?;
        println!("\nwrote the run to {path}");
    }
    check_sink(&outputs.jsonl, model.tracer())?;
    if let Some((path, file)) = outputs.html {
        let mut input = ReportInput::from_tracer(model.tracer(), model_info(&model, &source));
        input.position_text = tokens
            .iter()
            .enumerate()
            .map(|(p, &t)| (p, model.token_text(t)))
            .collect();
        input.token_text = input
            .token_ids()
            .into_iter()
            .map(|id| (id, model.token_text(id)))
            .collect();
        let mut out = std::io::BufWriter::new(file);
        model_tracer::write_html(&mut out, &input)
            .and_then(|()| out.flush())
            .map_err(|e| format!("{path}: {e}"))?;
        println!("wrote the HTML report to {path}");
    }
    if let Some((path, file)) = outputs.dump {
        write_dump(
            file,
            model.tracer_mut(),
            &source,
            Some("candle"),
            args.exact,
        )
        .map_err(|e| format!("{path}: {e}"))?;
        println!("wrote the activations to {path}");
    }
    Ok(())
}
