//! The output files of a run, written the same for every engine: created
//! before the model loads, then the JSON document, the JSON Lines sink's
//! status, the HTML report and the activation dump.

use std::fs::File;
use std::io::Write as _;

use model_tracer::report::{ModelInfo, ReportInput};

use super::{Engine, OutputArgs};
use crate::timing::Timing;

/// The output files, created before the model loads so that a bad path is
/// an error before the run, not after it.
#[derive(Debug, Default)]
pub struct Outputs {
    /// `--json`: the run as one document.
    pub json: Option<(String, File)>,
    /// `--jsonl`: the forwards, streamed.
    pub jsonl: Option<(String, File)>,
    /// `--html`: the report.
    pub html: Option<(String, File)>,
    /// `--dump`: the activations.
    pub dump: Option<(String, File)>,
}

/// Creates the output file `path` names, if it names one.
pub fn create_output(path: &Option<String>) -> Result<Option<(String, File)>, String> {
    path.as_ref()
        .map(|p| {
            File::create(p)
                .map(|f| (p.clone(), f))
                .map_err(|e| format!("cannot create {p}: {e}"))
        })
        .transpose()
}

/// A finished generation, as the outputs record it.
#[derive(Debug, Clone, Copy)]
pub struct Finished<'a> {
    /// The prompt's token ids.
    pub prompt: &'a [u32],
    /// The generated token ids.
    pub generated: &'a [u32],
    /// How long it took.
    pub timing: &'a Timing,
    /// Whether the matmuls ran in f32 (`--exact`).
    pub exact: bool,
}

impl Outputs {
    /// Creates the files `args` name.
    pub fn create(args: &OutputArgs) -> Result<Self, String> {
        let create = create_output;
        Ok(Self {
            json: create(&args.json)?,
            jsonl: create(&args.jsonl)?,
            html: create(&args.html)?,
            dump: create(&args.dump)?,
        })
    }

    /// Writes what `model` (named `name`) computed in `run` to the files,
    /// in turn, and fails with the JSON Lines sink's error if it had one;
    /// `notes` hears what was written where.
    pub fn finish<M: Engine>(
        self,
        model: &mut M,
        name: &str,
        run: &Finished<'_>,
        notes: &mut dyn FnMut(&str),
    ) -> Result<(), String> {
        if let Some((path, file)) = self.json {
            write_json(file, &run_json(model, run)).map_err(|e| format!("{path}: {e}"))?;
            notes(&format!("\nwrote the run to {path}"));
        }
        check_sink(&self.jsonl, model, notes)?;
        if let Some((path, file)) = self.html {
            let mut tokens = run.prompt.to_vec();
            tokens.extend(run.generated);
            let input = report_input(model, &tokens, name);
            let mut out = std::io::BufWriter::new(file);
            model_tracer::write_html(&mut out, &input)
                .and_then(|()| out.flush())
                .map_err(|e| format!("{path}: {e}"))?;
            notes(&format!("wrote the HTML report to {path}"));
        }
        if let Some((path, file)) = self.dump {
            write_dump(file, model, name, run.exact, notes).map_err(|e| format!("{path}: {e}"))?;
            notes(&format!("wrote the activations to {path}"));
        }
        Ok(())
    }
}

/// What the report and the JSON Lines rows say of `model`, named `name`.
pub fn model_info<M: Engine>(model: &M, name: &str) -> ModelInfo {
    let c = model.config();
    ModelInfo {
        name: name.to_string(),
        layers: c.n_layers,
        heads: c.n_heads,
        kv_heads: c.n_kv_heads,
        dim: c.dim,
        vocab: c.vocab_size,
        kv_capacity: model.kv_capacity(),
        kv_sinks: model.kv_sinks(),
    }
}

/// The report input for `model`'s tracer after it ran `tokens` (the prompt
/// followed by the generated tokens; position `p` holds `tokens[p]`),
/// named `name`.
pub fn report_input<'a, M: Engine>(model: &'a M, tokens: &[u32], name: &str) -> ReportInput<'a> {
    ReportInput::from_tracer(model.tracer(), model_info(model, name))
        .name_tokens(tokens, |id| model.token_text(id))
}

/// The run as one JSON document: the model's shape, the trace
/// configuration, the prompt and generated ids (and text, when the model
/// has a vocabulary), the timing, the engine unless it is the reference
/// decoder, and (when tracing) the summary and every retained forward.
pub fn run_json<M: Engine>(model: &M, run: &Finished<'_>) -> serde_json::Value {
    let c = model.config();
    let tracer = model.tracer();
    let text = |ids: &[u32]| model.text().map(|t| t.decode(ids));
    let mut doc = serde_json::json!({
        "model": {
            "layers": c.n_layers,
            "dim": c.dim,
            "heads": c.n_heads,
            "kv_heads": c.n_kv_heads,
            "head_dim": c.head_dim,
            "ffn_dim": c.ffn_dim,
            "vocab": c.vocab_size,
            "kv_capacity": model.kv_capacity(),
        },
        "config": model_tracer::config::describe(tracer.config()),
        "prompt_ids": run.prompt,
        "prompt_text": text(run.prompt),
        "generated_ids": run.generated,
        "generated_text": text(run.generated),
        "timing": run.timing.to_json(),
    });
    if let Some(map) = doc.as_object_mut() {
        if let Some(engine) = M::ENGINE {
            map.insert("engine".into(), engine.into());
        }
        // Without tracing: no summary and no forwards, rather than empty
        // ones that look like a trace of nothing.
        if tracer.is_enabled() {
            let forwards: Vec<_> = tracer.forwards().collect();
            map.insert("summary".into(), serde_json::json!(tracer.summary()));
            map.insert("forwards".into(), serde_json::json!(forwards));
        }
    }
    doc
}

/// Writes `doc` to `file`.
pub fn write_json(file: File, doc: &serde_json::Value) -> Result<(), String> {
    let mut out = std::io::BufWriter::new(file);
    serde_json::to_writer(&mut out, doc).map_err(|e| e.to_string())?;
    out.flush().map_err(|e| e.to_string())
}

/// Fails with the JSON Lines sink's error, if writing failed; otherwise
/// tells `notes` how many forwards it wrote.
pub fn check_sink<M: Engine>(
    jsonl: &Option<(String, File)>,
    model: &M,
    notes: &mut dyn FnMut(&str),
) -> Result<(), String> {
    if let (Some((path, _)), Some(sink)) = (jsonl, model.tracer().sink()) {
        let status = sink.status();
        match status.failure {
            Some(f) => return Err(format!("{path}: {f}")),
            None => notes(&format!(
                "streamed {} forwards to {path}",
                status.forwards_written
            )),
        }
    }
    Ok(())
}

/// Writes the dump `model`'s tracer filled during the run, named `name`,
/// the engine in its metadata unless it is the reference decoder; `notes`
/// hears what it holds.
pub fn write_dump<M: Engine>(
    file: File,
    model: &mut M,
    name: &str,
    exact: bool,
    notes: &mut dyn FnMut(&str),
) -> Result<(), String> {
    let Some(mut dump) = model.tracer_mut().take_dump() else {
        return Err("the tracer kept no dump (activation tracing is off)".into());
    };
    dump.set_metadata("model", name);
    if let Some(engine) = M::ENGINE {
        dump.set_metadata("engine", engine);
    }
    dump.set_metadata("matmuls", if exact { "f32" } else { "quantized" });
    let mut out = std::io::BufWriter::new(file);
    dump.write_to(&mut out)
        .and_then(|()| out.flush())
        .map_err(|e| e.to_string())?;
    notes(&format!(
        "\ndump: {} positions, {} tensors (hidden {}, vocabulary {})",
        dump.len(),
        dump.tensors().count(),
        dump.dim().map_or("-".into(), |d| d.to_string()),
        dump.vocab().map_or("-".into(), |v| v.to_string()),
    ));
    Ok(())
}
