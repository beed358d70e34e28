//! ggml's tensor element formats: block codecs, activation quantization and
//! the matrix-vector kernels of the reference decoder.
//!
//! Layouts and rounding follow ggml exactly: [`dequantize`] reproduces
//! `dequantize_row_*`, [`quantize`] reproduces `quantize_row_*_ref`, and
//! [`QMatrix::matvec`] computes what llama.cpp's CPU `ggml_vec_dot_*` kernels
//! compute (integer block sums, f32 scaling), with SIMD through `wide`.
//!
//! # Multi-row products
//!
//! [`QMatrix::matmul`] multiplies a matrix with a batch of `T` activation
//! rows at once, e.g. the `T` positions of a chunk of the prompt:
//!
//! ```
//! # use model_tracer_llama::dtype::GgmlType;
//! # use model_tracer_llama::quant::{QMatrix, QuantizedBatch};
//! # fn main() -> Result<(), model_tracer_llama::quant::QuantError> {
//! let (rows, cols, t) = (3, 64, 5);
//! let w = QMatrix::from_f32(GgmlType::Q4_1, rows, cols, &vec![0.25; rows * cols])?;
//! let x = vec![0.5f32; t * cols]; // T × cols, row-major
//! let mut batch = QuantizedBatch::new(); // keep it: its buffers are reused
//! batch.quantize_from(&x, cols, w.ty())?; // once per chunk and input
//! let mut out = vec![0.0; t * rows]; // T × rows, row-major
//! w.matmul(&batch, &mut out); // out[t * rows + r] = row r · x[t]
//! # assert!(out.iter().all(|&v| (v - 8.0).abs() < 0.1));
//! # Ok(()) }
//! ```
//!
//! - **Shapes.** `x` is `T × cols` row-major; [`QuantizedBatch::rows`] is
//!   `T`; `out` is `T × rows` row-major: `out[t * rows..(t + 1) * rows]`
//!   is what [`QMatrix::matvec`] gives for row `t` alone, **bit for bit**,
//!   for every type and on every target, so a batched pass computes what
//!   the one-position pass computes. [`QMatrix::matmul_f32`] is the same
//!   for the exact path (`x` plain f32), bit for bit
//!   [`QMatrix::matvec_f32`] of each row.
//! - **Buffers.** A [`QuantizedBatch`] keeps its buffers: re-quantizing
//!   with no more rows (each no longer) than before allocates nothing.
//!   One batch serves every matrix of the same input and weight type (q,
//!   k and v; gate and up). [`QuantizedBatch::row`] gives row `t` as a
//!   [`QuantizedActivations`] for [`QMatrix::matvec`].
//! - **Order of work.** Weight rows go in blocks of 16; each block meets
//!   every tile of 4 activation rows in turn, so every weight row is read
//!   from memory once per call (then from the cache), and a tile's
//!   activations stay in the cache for the whole block.
//! - **Which types are fast.** Q4_1, Q8_0 and Q4_0 have multi-row
//!   kernels: a weight row's blocks are loaded, their scales converted and
//!   their codes isolated once per tile and used for its 4 activation
//!   rows, whose accumulators stay in registers. On x86 with AVX2 the Q4_1
//!   and Q8_0 kernels multiply code bytes (`pmaddubsw`; for Q8_0 the
//!   absolute weight codes with the activation codes signed by the weights'
//!   signs), which gives the same integer sums in fewer instructions. The other types (Q5_0, Q5_1,
//!   Q4_K, Q6_K, F32, F16, BF16, and Q4_1/Q8_0 matrices with a non-finite
//!   scale) run the one-row kernel once per activation row, in the same
//!   cache-friendly order. `matmul_f32` has multi-row kernels for Q4_1,
//!   Q8_0 and Q4_0 (tiles of 8 rows, 4 beyond 768 columns; each block's
//!   weights formed once per tile) and runs the one-row kernel for the
//!   others.

mod activations;
mod blocks;
mod dot;
mod error;
mod float;
mod kquants;
mod matrix;

pub use activations::{activation_type, QuantizedActivations, QuantizedBatch};
pub use error::QuantError;
pub use float::{bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16};
pub use matrix::{LensScratch, QMatrix};

use crate::dtype::GgmlType;

/// Bytes taken by `elements` elements of `ty`, or the error naming why that
/// size does not exist.
fn checked_bytes(ty: GgmlType, elements: usize) -> Result<usize, QuantError> {
    if elements % ty.block_len() != 0 {
        return Err(QuantError::NotWholeBlocks { ty, elements });
    }
    ty.bytes_for(elements).ok_or(QuantError::TooLarge {
        rows: 1,
        cols: elements,
    })
}

/// Calls `f` on each block of `bytes` with the matching chunk of `out`.
#[inline(always)]
fn per_block(bytes: &[u8], out: &mut [f32], ty: GgmlType, f: impl Fn(&[u8], &mut [f32])) {
    for (block, values) in bytes
        .chunks_exact(ty.block_bytes())
        .zip(out.chunks_exact_mut(ty.block_len()))
    {
        f(block, values);
    }
}

/// Decodes `bytes` holding `out.len()` elements of type `ty` into `out` with
/// ggml's formulas (`dequantize_row_*`), each product and sum rounded to f32
/// separately: bit-for-bit what gguf-py's `dequantize` gives.
///
/// Supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q4_K, Q6_K, Q8_K.
///
/// # Errors
/// [`QuantError::Unsupported`] for other types, [`QuantError::NotWholeBlocks`]
/// when `out.len()` is not a whole number of blocks, and
/// [`QuantError::ByteLength`] when `bytes.len()` is not the size of
/// `out.len()` elements. `out` is untouched on error.
pub fn dequantize(ty: GgmlType, bytes: &[u8], out: &mut [f32]) -> Result<(), QuantError> {
    use GgmlType::*;
    if matches!(ty, Q2_K | Q3_K | Q5_K) {
        return Err(QuantError::Unsupported(ty));
    }
    let expected = checked_bytes(ty, out.len())?;
    if bytes.len() != expected {
        return Err(QuantError::ByteLength {
            ty,
            elements: out.len(),
            expected,
            actual: bytes.len(),
        });
    }
    let elem = ty.block_bytes();
    match ty {
        F32 | F16 | BF16 => {
            let decode = match ty {
                F32 => float::decode_f32,
                F16 => float::decode_f16,
                _ => float::decode_bf16,
            };
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(elem)) {
                *o = decode(b);
            }
        }
        Q4_0 => per_block(bytes, out, ty, blocks::dequantize_q4_0),
        Q4_1 => per_block(bytes, out, ty, blocks::dequantize_q4_1),
        Q5_0 => per_block(bytes, out, ty, blocks::dequantize_q5_0),
        Q5_1 => per_block(bytes, out, ty, blocks::dequantize_q5_1),
        Q8_0 => per_block(bytes, out, ty, blocks::dequantize_q8_0),
        Q8_1 => per_block(bytes, out, ty, blocks::dequantize_q8_1),
        Q4_K => per_block(bytes, out, ty, blocks::dequantize_q4_k),
        Q6_K => per_block(bytes, out, ty, blocks::dequantize_q6_k),
        Q8_K => per_block(bytes, out, ty, blocks::dequantize_q8_k),
        Q2_K | Q3_K | Q5_K => return Err(QuantError::Unsupported(ty)),
    }
    Ok(())
}

/// Encodes `src` as type `ty`, replacing the contents of `out` (its capacity
/// is reused), with the rounding of ggml's `quantize_row_*_ref`; for these
/// types the bytes equal gguf-py's `quantize` output.
///
/// Supported: F32 (little-endian copy), F16 and BF16 (round to nearest even),
/// Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q6_K, and the activation formats Q8_1
/// and Q8_K.
///
/// # Errors
/// [`QuantError::Unsupported`] for other types (Q2_K, Q3_K, Q5_K),
/// [`QuantError::NotWholeBlocks`] when `src.len()` is not a whole number of
/// blocks, and [`QuantError::NonFinite`] when a block format would have to
/// encode an infinity or NaN. `out` is left empty on error.
pub fn quantize(ty: GgmlType, src: &[f32], out: &mut Vec<u8>) -> Result<(), QuantError> {
    use GgmlType::*;
    out.clear();
    let quantizer: fn(&[f32], &mut [u8]) = match ty {
        F32 => {
            out.extend(src.iter().flat_map(|v| v.to_le_bytes()));
            return Ok(());
        }
        F16 => {
            out.extend(src.iter().flat_map(|&v| f32_to_f16(v).to_le_bytes()));
            return Ok(());
        }
        BF16 => {
            out.extend(src.iter().flat_map(|&v| f32_to_bf16(v).to_le_bytes()));
            return Ok(());
        }
        Q4_0 => blocks::quantize_q4_0,
        Q4_1 => blocks::quantize_q4_1,
        Q5_0 => blocks::quantize_q5_0,
        Q5_1 => blocks::quantize_q5_1,
        Q8_0 => blocks::quantize_q8_0,
        Q8_1 => blocks::quantize_q8_1,
        Q8_K => blocks::quantize_q8_k,
        Q4_K => kquants::quantize_q4_k,
        Q6_K => kquants::quantize_q6_k,
        Q2_K | Q3_K | Q5_K => return Err(QuantError::Unsupported(ty)),
    };
    let size = checked_bytes(ty, src.len())?;
    if let Some(index) = src.iter().position(|v| !v.is_finite()) {
        return Err(QuantError::NonFinite { index });
    }
    out.resize(size, 0);
    for (values, block) in src
        .chunks_exact(ty.block_len())
        .zip(out.chunks_exact_mut(ty.block_bytes()))
    {
        quantizer(values, block);
    }
    Ok(())
}

#[cfg(test)]
mod tests;
