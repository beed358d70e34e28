//! The logit lens as one multi-row product: the hidden state after every
//! layer but the last goes through the final norm and the LM head at once
//! (`QMatrix::lens_matmul`), and gives the logits (so the ranks) of the
//! one-row product of each layer alone; the last layer's are the model's
//! own logits.
#![cfg(feature = "dump")]

mod common;

use model_tracer::dump::{DumpFilter, DumpRecorder};
use model_tracer::{Full, LogitRows, ModelTracer, Stage, TraceOptions};
use model_tracer_llama::model::Llama;
use model_tracer_llama::quant::{LensScratch, QuantizedActivations};

/// The decoder's RMSNorm, written out: the same operations in the same order.
fn rmsnorm(x: &[f32], weight: &[f32], eps: f32) -> Vec<f32> {
    let ss = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let scale = 1.0 / (ss + eps).sqrt();
    x.iter()
        .zip(weight)
        .map(|(&v, &w)| w * (v * scale))
        .collect()
}

/// For every position of a run of `prompt` (chunks of `chunk`, every row
/// with logits), the lens of each tracked token at each layer against the
/// layer's hidden state (from the run's dump) through the final norm and
/// the one-row LM-head product (the lens product before the last layer,
/// the model's own at the last): equal logits, bit for bit, and ranks.
fn assert_lens_is_the_per_layer_product(mut m: Llama<Full>, prompt: &[u32], chunk: usize) -> usize {
    let options = TraceOptions {
        max_forwards: 4096,
        logit_rows: LogitRows::Every,
        ..TraceOptions::default()
    };
    *m.tracer_mut() = ModelTracer::with_options(Full, options);
    let filter = DumpFilter {
        stages: Some(vec![Stage::Output]),
        ..DumpFilter::default()
    };
    m.tracer_mut().set_dump(Some(DumpRecorder::new(filter)));
    m.set_prefill_chunk(chunk);
    m.generate(prompt, 2, |_| {});
    let dump = m.tracer_mut().take_dump().unwrap();
    let (c, w) = (&m.config, &m.weights);
    let mut q = QuantizedActivations::new();
    let mut scratch = LensScratch::new();
    let mut logits = vec![0.0f32; c.vocab_size];
    let mut checked = 0;
    for (row, f) in m.tracer().forwards().enumerate() {
        assert_eq!(dump.positions()[row], f.position);
        let lens = f.logits.as_ref().expect("every row has logits and a lens");
        for l in 0..c.n_layers {
            let hidden = dump.activation(Some(l), Stage::Output).unwrap();
            let normed = rmsnorm(hidden.row(row).unwrap(), &w.output_norm, c.rms_eps);
            if l + 1 < c.n_layers {
                w.output
                    .weight
                    .lens_matmul(&normed, &mut scratch, &mut logits);
            } else {
                q.quantize_from(&normed, w.output.weight.ty()).unwrap();
                w.output.weight.matvec(&q, &mut logits);
            }
            let ids: Vec<usize> = lens.tokens.iter().map(|t| t.token_id as usize).collect();
            let mut ranks = vec![0; ids.len()];
            model_tracer::stats::ranks_of(&logits, &ids, &mut ranks);
            for (t, &rank) in lens.tokens.iter().zip(&ranks) {
                assert_eq!(t.layers[l], l);
                assert_eq!(t.logits[l].to_bits(), logits[t.token_id as usize].to_bits());
                assert_eq!(t.ranks[l], rank, "position {}, layer {l}", f.position);
                checked += 1;
            }
        }
    }
    checked
}

fn tiny() -> Llama<Full> {
    common::tiny_model(Full, 1024)
}

#[test]
fn the_lens_of_every_layer_at_once_equals_the_product_of_each_layer() {
    let prompt: Vec<u32> = (0..11).map(|i| (i * 37 + 5) % 512).collect();
    for chunk in [1, 4] {
        let checked = assert_lens_is_the_per_layer_product(tiny(), &prompt, chunk);
        // 12 forwards (11 prompt positions, 1 generated), 4 layers, 3 tokens.
        assert_eq!(checked, 12 * 4 * 3);
    }
}

#[test]
fn smollm2_lens_of_every_layer_at_once_equals_the_product_of_each_layer() {
    let Some(path) = common::real_model() else {
        return;
    };
    let m = Llama::from_gguf(&path, None, Full).unwrap();
    let prompt = m
        .tokenizer
        .as_ref()
        .unwrap()
        .encode("The capital of France is");
    let checked = assert_lens_is_the_per_layer_product(m, &prompt, 64);
    assert_eq!(checked, (prompt.len() + 1) * 30 * 3);
}
