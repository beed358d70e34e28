//! The logit lens through llama.cpp: its graph applies the final norm and
//! the LM head to the last layer only, so the lens applies them to each
//! layer's output (`l_out-L`) with the tracer's own product on the GGUF's
//! weights (`output_norm.weight`, and `output.weight` or the tied
//! `token_embd.weight`, read by `model-tracer-llama`).

use model_tracer_llama::dtype::GgmlType;
use model_tracer_llama::gguf::GgufFile;
use model_tracer_llama::quant::{LensScratch, QMatrix};

use crate::LlamaCppError;

/// The final norm and the LM head of a GGUF file.
pub(crate) struct Lens {
    norm: Vec<f32>,
    eps: f32,
    softcap: Option<f32>,
    head: QMatrix,
    scratch: LensScratch,
    x: Vec<f32>,
}

impl Lens {
    /// Reads the final norm, the LM head and the norm's epsilon (and
    /// Gemma's final logit soft-capping, if the file has one) of the
    /// `arch` model in `path`.
    pub fn load(path: &str, arch: &str) -> Result<Self, LlamaCppError> {
        let err = |m: String| LlamaCppError::Lens(format!("{path}: {m}"));
        let gguf = GgufFile::open(path).map_err(|e| err(e.to_string()))?;
        let norm_info = gguf
            .tensor("output_norm.weight")
            .ok_or_else(|| err("no output_norm.weight".into()))?;
        let norm = match norm_info.ggml_type {
            GgmlType::F32 => gguf
                .tensor_bytes(norm_info)
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect::<Vec<f32>>(),
            other => return Err(err(format!("output_norm.weight is {other:?}, not F32"))),
        };
        let head_info = gguf
            .tensor("output.weight")
            .or_else(|| gguf.tensor("token_embd.weight"))
            .ok_or_else(|| err("no output.weight or token_embd.weight".into()))?;
        let (cols, rows) = (head_info.row_len(), head_info.rows());
        if cols != norm.len() {
            return Err(err(format!(
                "the LM head's rows hold {cols} values, the final norm {}",
                norm.len()
            )));
        }
        let head = QMatrix::from_bytes(
            head_info.ggml_type,
            rows,
            cols,
            gguf.tensor_bytes(head_info).to_vec(),
        )
        .map_err(|e| err(format!("{}: {e}", head_info.name)))?;
        let eps = gguf
            .metadata(&format!("{arch}.attention.layer_norm_rms_epsilon"))
            .and_then(|v| v.as_f32())
            .unwrap_or(1e-5);
        let softcap = gguf
            .metadata(&format!("{arch}.final_logit_softcapping"))
            .and_then(|v| v.as_f32())
            .filter(|&c| c > 0.0);
        Ok(Self {
            norm,
            eps,
            softcap,
            head,
            scratch: LensScratch::default(),
            x: Vec::new(),
        })
    }

    /// Vocabulary size: rows of the LM head.
    pub fn vocab(&self) -> usize {
        self.head.rows()
    }

    /// Writes into `out` (`states.len()` rows of [`vocab`](Self::vocab)
    /// values) the logits the final norm and the LM head give each hidden
    /// state of `states`. A state of another width than the norm's leaves
    /// `out` untouched.
    pub fn fill(&mut self, states: &[&[f32]], out: &mut [f32]) {
        let d = self.norm.len();
        if states.iter().any(|s| s.len() != d) || out.len() != states.len() * self.vocab() {
            return;
        }
        self.x.clear();
        for s in states {
            // llama.cpp's RMS norm: x / sqrt(mean(x^2) + eps), then the weight.
            let mean_sq = s.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>() / d as f64;
            let scale = (1.0 / (mean_sq + f64::from(self.eps)).sqrt()) as f32;
            self.x
                .extend(s.iter().zip(&self.norm).map(|(&v, &w)| v * scale * w));
        }
        self.head.lens_matmul(&self.x, &mut self.scratch, out);
        if let Some(cap) = self.softcap {
            out.iter_mut().for_each(|v| *v = cap * (*v / cap).tanh());
        }
    }
}
