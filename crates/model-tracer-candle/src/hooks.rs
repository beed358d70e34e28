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
//! A forward runs `T` positions at once (the prompt, in one forward per
//! at most [`MAX_FORWARD_ROWS`](model_tracer::storage::MAX_FORWARD_ROWS)
//! positions; a decode step is `T = 1`), opened by
//! [`ModelTracer::begin_forward_rows`]: [`activation`] and [`residual`]
//! hand the tracer the whole `[T × d]` tensor, [`attention`] every head's
//! `T` causal rows; [`quant_error`], [`logit_lens`] and [`final_logits`]
//! record into one position, the row in focus
//! ([`ModelTracer::focus_row`]).

use std::ops::Range;

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

/// [`ModelTracer::activation`] of the tensor that `x` computes; `x` runs
/// only when activations are traced.
#[inline(always)]
pub fn activation_with<C: TraceConfig>(
    tracer: &mut ModelTracer<C>,
    layer: usize,
    stage: Stage,
    x: impl FnOnce() -> Result<Tensor>,
) -> Result<()> {
    if activations_on(tracer) {
        let x = x()?;
        with_f32(&x, |v| tracer.activation(layer, stage, v))?;
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

/// [`ModelTracer::attention_rows`] of every head: `probs` holds the
/// softmax rows `(n_heads, T, keys)` of the queries at `first..first + T`
/// (`keys` is `first + T`, the cached positions and the forward's); the
/// row of the query at `p` is recorded over the `p + 1` keys it may
/// attend to.
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
    let per_head = t * keys;
    with_f32(probs, |p| {
        for (h, rows) in p.chunks_exact(per_head.max(1)).enumerate() {
            if tracer.wants_attention(layer, h) {
                tracer.attention_rows(layer, h, rows, first + 1);
            }
        }
    })
}

/// [`ModelTracer::quant_error`] of a product, for each row `i` of `rows`
/// in turn (brought into focus): `quantized` gives the output of the
/// quantized weights for these rows, `(rows.len(), out)`; `reference(i)`
/// computes row `i`'s output of the f32 weights, `(1, out)`. Both run only
/// for the rows the tracer samples; the other rows count as visits.
#[inline(always)]
pub fn quant_error<C: TraceConfig>(
    tracer: &mut ModelTracer<C>,
    brick: BrickId,
    layer: usize,
    quant_type: QuantType,
    rows: Range<usize>,
    quantized: impl FnOnce() -> Result<Tensor>,
    mut reference: impl FnMut(usize) -> Result<Tensor>,
) -> Result<()> {
    // Quantization-error tracing off (`wants_what_if` is its switch): no
    // visit to count, no row to focus.
    if !tracer.wants_what_if() {
        return Ok(());
    }
    // the quantized output of every row, computed at the first sampled row
    let mut quantized = Some(quantized);
    let mut all: Option<Tensor> = None;
    let first = rows.start;
    for i in rows {
        tracer.focus_row(i);
        if !tracer.wants_quant_error(brick) {
            // Counts the visit, for the sampling policy.
            tracer.quant_error(brick, layer, quant_type, &[], |_| {});
            continue;
        }
        if let Some(f) = quantized.take() {
            all = Some(f()?);
        }
        let Some(q) = &all else {
            continue;
        };
        let q = q.narrow(0, i - first, 1)?;
        let r = reference(i)?;
        with_f32(&q, |q| {
            with_f32(&r, |r| {
                tracer.quant_error(brick, layer, quant_type, q, |out| {
                    let n = out.len().min(r.len());
                    out[..n].copy_from_slice(&r[..n]);
                })
            })
        })??;
    }
    Ok(())
}

/// [`ModelTracer::logit_lens_layers`] of the row in focus at `layers`:
/// `lens` computes the logits `(layers.len(), vocab)` that the final norm
/// and the LM head give for the hidden state after each of these layers;
/// it runs only when the lens is on.
#[inline(always)]
pub fn logit_lens<C: TraceConfig>(
    tracer: &mut ModelTracer<C>,
    layers: &[usize],
    vocab: usize,
    lens: impl FnOnce() -> Result<Tensor>,
) -> Result<()> {
    if !tracer.wants_logit_lens() {
        return Ok(());
    }
    let logits = lens()?;
    with_f32(&logits, |l| {
        tracer.logit_lens_layers(layers, vocab, |out| {
            let n = out.len().min(l.len());
            out[..n].copy_from_slice(&l[..n]);
        })
    })
}

/// [`ModelTracer::final_logits`] and [`ModelTracer::selected_token`] (the
/// greedy choice) of the logits of one position, into the row in focus.
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
        full.begin_forward_rows(1, 2);
        attention(&mut full, 0, 1, &probs).unwrap();
        full.end_forward();
        let recorded: Vec<_> = full
            .forwards()
            .map(|f| {
                let heads: Vec<_> = f
                    .attention
                    .iter()
                    .map(|a| (a.head_idx, a.query_pos, a.context_len, a.top_k_positions[0]))
                    .collect();
                (f.position, heads)
            })
            .collect();
        assert_eq!(
            recorded,
            vec![
                (1, vec![(0, 1, 2, 0), (1, 1, 2, 0)]),
                (2, vec![(0, 2, 3, 2), (1, 2, 3, 2)])
            ]
        );
    }

    #[test]
    fn an_activation_of_t_rows_is_recorded_once_per_position() {
        use model_tracer::Lightweight;
        let x = Tensor::new(&[[1f32, -2.0, 3.0], [4.0, 5.0, -6.0]], &Device::Cpu).unwrap();
        let mut light = ModelTracer::new(Lightweight);
        light.begin_forward_rows(7, 2);
        activation(&mut light, 0, Stage::Input, &x).unwrap();
        light.end_forward();
        let rows: Vec<_> = light
            .forwards()
            .map(|f| {
                let s = &f.activations.layers[0].input_stats;
                (f.position, s.count, s.max, s.min)
            })
            .collect();
        assert_eq!(rows, vec![(7, 3, 3.0, -2.0), (8, 3, 5.0, -6.0)]);
    }

    #[test]
    fn quantization_error_is_measured_per_row_against_that_row_s_reference() {
        use model_tracer::{Full, QuantSampling};
        let quantized = Tensor::new(&[[1f32, 2.0, 3.0], [4.0, 5.0, 6.0]], &Device::Cpu).unwrap();
        let mut full = ModelTracer::new(Full);
        full.set_quant_sampling(QuantSampling::Every);
        full.begin_forward_rows(3, 2);
        let mut asked = Vec::new();
        quant_error(
            &mut full,
            BrickId::FfnUp,
            5,
            QuantType::Q4_1,
            0..2,
            || Ok(quantized.clone()),
            |i| {
                asked.push(i);
                // Row 0's reference equals its output; row 1's is off by 1.
                let row = quantized.narrow(0, i, 1)?;
                if i == 0 {
                    Ok(row)
                } else {
                    row + 1.0
                }
            },
        )
        .unwrap();
        full.end_forward();
        assert_eq!(asked, vec![0, 1]);
        let traces: Vec<_> = full
            .forwards()
            .map(|f| {
                assert_eq!(f.quantization.traces.len(), 1, "position {}", f.position);
                let t = &f.quantization.traces[0];
                (f.position, t.layer_idx, t.max_abs_error)
            })
            .collect();
        assert_eq!(traces, vec![(3, 5, 0.0), (4, 5, 1.0)]);
    }

    #[test]
    fn the_inputs_of_a_system_that_is_off_are_never_computed() {
        use model_tracer::Lightweight;
        // Lightweight records activations and the KV cache: no lens, no
        // quantization error.
        let mut light = ModelTracer::new(Lightweight);
        light.begin_forward(0);
        logit_lens(&mut light, &[0], 4, || panic!("the lens is off")).unwrap();
        quant_error(
            &mut light,
            BrickId::FfnUp,
            0,
            QuantType::Q4_1,
            0..1,
            || panic!("quantization error is off"),
            |_| panic!("quantization error is off"),
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
