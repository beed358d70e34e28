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
mod codec;
mod dot;
mod error;
mod float;
mod kquants;
mod matrix;

pub use activations::{activation_type, QuantizedActivations, QuantizedBatch};
pub use codec::{dequantize, quantize};
pub use error::QuantError;
pub use float::{bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16};
pub use matrix::lens::LensScratch;
pub use matrix::QMatrix;

#[cfg(test)]
mod tests;
