//! Whole buffers of ggml elements encoded and decoded block by block.

use super::float::{decode_bf16, decode_f16, decode_f32, f32_to_bf16, f32_to_f16};
use super::{blocks, kquants, QuantError};
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
                F32 => decode_f32,
                F16 => decode_f16,
                _ => decode_bf16,
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
