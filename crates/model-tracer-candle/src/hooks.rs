//! From candle tensors to the tracer's hooks.
//!
//! The hooks take `&[f32]`. A contiguous f32 tensor on the CPU is read in
//! place: the slice is the tensor's own storage, borrowed under candle's
//! read lock ([`with_f32`]). Any other tensor (another dtype, a strided
//! view, another device) is copied to an f32 vector first.
//!
//! Every function here is called inside `traced!(C, …)`: with `Disabled`
//! the call, the lock and the slice are dead code, the tensor is never
//! looked at. The functions test the tracer's switches before they touch
//! the tensor, so that a system that is off costs no copy either.
//!
//! The tracer records one position per forward today; the model runs one
//! position per forward while tracing, so each tensor given here holds one
//! row. A tracer that takes `[T × d]` rows will take the same slices: the
//! change stays in this module and in the model's position loop.

use candle_core::{DType, Result, Storage, Tensor};
use model_tracer::quant::{BrickId, QuantType};
use model_tracer::{ModelTracer, Stage, TraceConfig};

/// Calls `f` with the values of `t` in row-major order: the tensor's own
/// storage when it is a contiguous f32 tensor on the CPU (no copy), else a
/// copy converted to f32.
///
/// # Errors
///
/// Candle's error when the copy or the conversion fails.
pub fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    if t.dtype() == DType::F32 && t.is_contiguous() {
        let (storage, layout) = t.storage_and_layout();
        if let Storage::Cpu(cpu) = &*storage {
            let all = cpu.as_slice::<f32>()?;
            let start = layout.start_offset();
            if let Some(values) = all.get(start..start + t.elem_count()) {
                return Ok(f(values));
            }
        }
    }
    let copy = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(f(&copy))
}

/// Whether `tracer` reads the argument of [`ModelTracer::activation`].
#[inline(always)]
fn activations_on<C: TraceConfig>(tracer: &ModelTracer<C>) -> bool {
    C::ACTIVATIONS && tracer.config().activations()
}

/// [`ModelTracer::activation`] of the tensor `x`.
#[inline(always)]
pub fn activation<C: TraceConfig>(
    tracer: &mut ModelTracer<C>,
    layer: usize,
    stage: Stage,
    x: &Tensor,
) -> Result<()> {
    if activations_on(tracer) {
        with_f32(x, |v| tracer.activation(layer, stage, v))?;
    }
    Ok(())
}

/// [`ModelTracer::residual`] of the residual stream `x` and the update
/// about to be added to it.
#[inline(always)]
pub fn residual<C: TraceConfig>(
    tracer: &mut ModelTracer<C>,
    layer: usize,
    x: &Tensor,
    update: &Tensor,
) -> Result<()> {
    if activations_on(tracer) {
        with_f32(x, |r| with_f32(update, |u| tracer.residual(layer, r, u)))??;
    }
    Ok(())
}

/// [`ModelTracer::attention`] of every head: `probs` holds the softmax rows
/// `(n_heads, T, keys)` of the queries at `first..first + T`; the row of
/// the query at `p` is recorded over the `p + 1` keys it may attend to.
#[inline(always)]
pub fn attention<C: TraceConfig>(
    tracer: &mut ModelTracer<C>,
    layer: usize,
    first: usize,
    probs: &Tensor,
) -> Result<()> {
    let (n_heads, t, keys) = probs.dims3()?;
    if !(0..n_heads).any(|h| tracer.wants_attention(layer, h)) {
        return Ok(());
    }
    with_f32(probs, |p| {
        for (i, row) in p.chunks_exact(keys).enumerate() {
            let (h, query) = (i / t, first + i % t);
            tracer.attention(layer, h, query, &row[..(query + 1).min(keys)]);
        }
    })
}

/// [`ModelTracer::quant_error`] of a product: `quantized` gives the output
/// of the quantized weights, `reference` computes the output of the f32
/// weights; both run only when the tracer samples this call.
#[inline(always)]
pub fn quant_error<C: TraceConfig>(
    tracer: &mut ModelTracer<C>,
    brick: BrickId,
    layer: usize,
    quant_type: QuantType,
    quantized: impl FnOnce() -> Result<Tensor>,
    reference: impl FnOnce() -> Result<Tensor>,
) -> Result<()> {
    if !tracer.wants_quant_error(brick) {
        // Counts the visit, for the sampling policy.
        tracer.quant_error(brick, layer, quant_type, &[], |_| {});
        return Ok(());
    }
    let (quantized, reference) = (quantized()?, reference()?);
    with_f32(&quantized, |q| {
        with_f32(&reference, |r| {
            tracer.quant_error(brick, layer, quant_type, q, |out| {
                out.copy_from_slice(&r[..out.len()]);
            })
        })
    })?
}

/// [`ModelTracer::logit_lens`] at `layer`: `lens` computes the logits the
/// final norm and the LM head give for this layer's hidden state; it runs
/// only when the lens is on.
#[inline(always)]
pub fn logit_lens<C: TraceConfig>(
    tracer: &mut ModelTracer<C>,
    layer: usize,
    vocab: usize,
    lens: impl FnOnce() -> Result<Tensor>,
) -> Result<()> {
    if !tracer.wants_logit_lens() {
        return Ok(());
    }
    let logits = lens()?;
    with_f32(&logits, |l| {
        tracer.logit_lens(layer, vocab, |out| {
            let n = out.len().min(l.len());
            out[..n].copy_from_slice(&l[..n]);
        })
    })
}

/// [`ModelTracer::final_logits`] and [`ModelTracer::selected_token`] (the
/// greedy choice) of the logits of one position.
#[inline(always)]
pub fn final_logits<C: TraceConfig>(tracer: &mut ModelTracer<C>, logits: &Tensor) -> Result<()> {
    if C::ACTIVATIONS || C::LOGITS {
        with_f32(logits, |l| {
            tracer.final_logits(l);
            if let Some(best) = model_tracer::stats::argmax(l) {
                tracer.selected_token(best as u32);
            }
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn storage_ptr(t: &Tensor) -> *const f32 {
        let (storage, layout) = t.storage_and_layout();
        match &*storage {
            Storage::Cpu(cpu) => match cpu.as_slice::<f32>() {
                Ok(s) => s[layout.start_offset()..].as_ptr(),
                Err(e) => panic!("{e}"),
            },
            _ => panic!("not on the CPU"),
        }
    }

    #[test]
    fn a_contiguous_f32_tensor_is_read_in_place() {
        let t = Tensor::arange(0f32, 24.0, &Device::Cpu)
            .and_then(|t| t.reshape((4, 6)))
            .unwrap();
        let row = t.narrow(0, 2, 1).unwrap();
        assert!(row.is_contiguous());
        let (ptr, values) = with_f32(&row, |v| (v.as_ptr(), v.to_vec())).unwrap();
        assert_eq!(ptr, storage_ptr(&row));
        assert_eq!(values, vec![12.0, 13.0, 14.0, 15.0, 16.0, 17.0]);
    }

    #[test]
    fn other_tensors_are_copied_in_row_major_order() {
        let t = Tensor::arange(0f32, 6.0, &Device::Cpu)
            .and_then(|t| t.reshape((2, 3)))
            .unwrap();
        let transposed = t.t().unwrap();
        assert!(!transposed.is_contiguous());
        let values = with_f32(&transposed, |v| v.to_vec()).unwrap();
        assert_eq!(values, vec![0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
        let half = t.to_dtype(DType::F16).unwrap();
        let (ptr, values) = with_f32(&half, |v| (v.as_ptr(), v.to_vec())).unwrap();
        assert_ne!(ptr, storage_ptr(&t));
        assert_eq!(values, vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
    }

    #[test]
    fn attention_rows_are_recorded_per_head_and_query_over_their_causal_keys() {
        use model_tracer::Full;
        // 2 heads, queries at positions 1 and 2, 3 keys.
        let probs = Tensor::new(
            &[
                [[0.5f32, 0.5, 0.0], [0.2, 0.3, 0.5]],
                [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]],
            ],
            &Device::Cpu,
        )
        .unwrap();
        let mut full = ModelTracer::new(Full);
        full.begin_forward(2);
        attention(&mut full, 0, 1, &probs).unwrap();
        full.end_forward();
        let recorded: Vec<_> = full
            .last_forward()
            .unwrap()
            .attention
            .iter()
            .map(|a| (a.head_idx, a.query_pos, a.context_len, a.top_k_positions[0]))
            .collect();
        assert_eq!(
            recorded,
            vec![(0, 1, 2, 0), (0, 2, 3, 2), (1, 1, 2, 0), (1, 2, 3, 2)]
        );
    }

    #[test]
    fn the_inputs_of_a_system_that_is_off_are_never_computed() {
        use model_tracer::Lightweight;
        // Lightweight records activations and the KV cache: no lens, no
        // quantization error.
        let mut light = ModelTracer::new(Lightweight);
        light.begin_forward(0);
        logit_lens(&mut light, 0, 4, || panic!("the lens is off")).unwrap();
        quant_error(
            &mut light,
            BrickId::FfnUp,
            0,
            QuantType::Q4_1,
            || panic!("quantization error is off"),
            || panic!("quantization error is off"),
        )
        .unwrap();
        let x = Tensor::new(&[[1f32, -2.0, 3.0]], &Device::Cpu).unwrap();
        activation(&mut light, 0, Stage::Input, &x).unwrap();
        light.end_forward();
        let f = light.last_forward().unwrap();
        let recorded = &f.activations.layers[0].input_stats;
        assert_eq!(recorded.count, 3);
        assert_eq!(recorded.max, 3.0);
        assert!(f.quantization.traces.is_empty() && f.logits.is_none());
    }
}
