//! Row-major quantized matrices and their matrix-vector products.

use std::ops::Range;

use super::activations::{activation_type, QuantizedActivations};
use super::blocks::*;
use super::dot::*;
use super::{dequantize, quantize, QuantError};
use crate::dtype::GgmlType;

/// A row-major matrix of ggml blocks: `rows` rows of `cols` elements, each
/// row `ty.bytes_for(cols)` bytes. `cols` is a GGUF tensor's `dims[0]`, so the
/// product with an activation vector of length `cols` has length `rows`.
#[derive(Debug, Clone, PartialEq)]
pub struct QMatrix {
    ty: GgmlType,
    rows: usize,
    cols: usize,
    row_bytes: usize,
    data: Vec<u8>,
    /// Whether every block scale (and minimum) is a finite f16: the Q4_1
    /// and Q8_0 fast kernels convert scales without handling infinities and
    /// NaNs, so a matrix holding any goes through the generic kernel.
    finite_scales: bool,
}

/// Sets `out[i] = row(first + i)` for every `i`, visiting the rows as
/// [`STREAMS`] equal parts taken in turns (row `i` of each part, then row
/// `i + 1` of each part, ...).
///
/// The weights are then read as several sequential streams at once, which the
/// hardware prefetchers serve with more memory parallelism than a single one:
/// on a Zen 3 core, four streams read a 30 MB Q8_0 matrix about 1.5x as fast
/// as one. Each row's result is the same whatever the order.
#[inline(always)]
pub(super) fn interleaved_rows(first: usize, out: &mut [f32], mut row: impl FnMut(usize) -> f32) {
    let part = out.len().div_ceil(STREAMS);
    for i in 0..part {
        for k in 0..STREAMS {
            if let Some(o) = out.get_mut(k * part + i) {
                *o = row(first + k * part + i);
            }
        }
    }
}

/// Number of row streams of [`interleaved_rows`]: more than four stops
/// helping (eight are slower than one on Zen 3).
const STREAMS: usize = 4;

/// Whether the f16 scales (and Q4_1 minimums) of every block are finite, for
/// the types with a fast kernel; false for the others.
fn all_scales_finite(ty: GgmlType, data: &[u8]) -> bool {
    let finite = |bits: u16| bits & 0x7c00 != 0x7c00;
    let f16_at = |block: &[u8], at: usize| u16::from_le_bytes([block[at], block[at + 1]]);
    match ty {
        GgmlType::Q4_1 => data
            .chunks_exact(ty.block_bytes())
            .all(|b| finite(f16_at(b, 0)) && finite(f16_at(b, 2))),
        GgmlType::Q8_0 => data
            .chunks_exact(ty.block_bytes())
            .all(|b| finite(f16_at(b, 0))),
        _ => false,
    }
}

impl QMatrix {
    /// Wraps raw tensor bytes.
    ///
    /// # Errors
    /// [`QuantError::Unsupported`] for a type without a matrix-vector kernel
    /// (see [`activation_type`]), [`QuantError::NotWholeBlocks`] when `cols` is
    /// not a multiple of the block length, [`QuantError::TooLarge`] when the
    /// size overflows, and [`QuantError::ByteLength`] when `data` is not
    /// exactly `rows` rows long.
    pub fn from_bytes(
        ty: GgmlType,
        rows: usize,
        cols: usize,
        data: Vec<u8>,
    ) -> Result<Self, QuantError> {
        if activation_type(ty).is_none() {
            return Err(QuantError::Unsupported(ty));
        }
        let row_bytes = ty.bytes_for(cols).ok_or(if cols % ty.block_len() != 0 {
            QuantError::NotWholeBlocks { ty, elements: cols }
        } else {
            QuantError::TooLarge { rows, cols }
        })?;
        let total = row_bytes
            .checked_mul(rows)
            .filter(|_| rows.checked_mul(cols).is_some())
            .ok_or(QuantError::TooLarge { rows, cols })?;
        if data.len() != total {
            return Err(QuantError::ByteLength {
                ty,
                elements: rows.saturating_mul(cols),
                expected: total,
                actual: data.len(),
            });
        }
        Ok(Self {
            ty,
            rows,
            cols,
            row_bytes,
            finite_scales: all_scales_finite(ty, &data),
            data,
        })
    }

    /// Quantizes the row-major `rows` x `cols` values `w` to `ty` with ggml's
    /// reference rounding (an F32 matrix is a plain copy).
    ///
    /// # Errors
    /// As [`from_bytes`](Self::from_bytes) and [`quantize`], plus
    /// [`QuantError::ValueCount`] when `w.len() != rows * cols`.
    pub fn from_f32(ty: GgmlType, rows: usize, cols: usize, w: &[f32]) -> Result<Self, QuantError> {
        let expected = rows
            .checked_mul(cols)
            .ok_or(QuantError::TooLarge { rows, cols })?;
        if w.len() != expected {
            return Err(QuantError::ValueCount {
                rows,
                cols,
                expected,
                actual: w.len(),
            });
        }
        if activation_type(ty).is_none() {
            return Err(QuantError::Unsupported(ty));
        }
        if cols % ty.block_len() != 0 {
            return Err(QuantError::NotWholeBlocks { ty, elements: cols });
        }
        let mut data = Vec::new();
        quantize(ty, w, &mut data)?;
        Self::from_bytes(ty, rows, cols, data)
    }

    /// Element type of the weights.
    pub fn ty(&self) -> GgmlType {
        self.ty
    }

    /// Number of rows (length of a matrix-vector product).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of columns (length of the activation vector).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The raw blocks, row after row.
    pub fn bytes(&self) -> &[u8] {
        &self.data
    }

    /// The raw blocks of row `r`.
    ///
    /// # Panics
    /// If `r >= self.rows()`.
    pub fn row_bytes(&self, r: usize) -> &[u8] {
        assert!(r < self.rows, "row {r} out of range for {} rows", self.rows);
        &self.data[r * self.row_bytes..(r + 1) * self.row_bytes]
    }

    /// Decodes row `r` into `out`.
    ///
    /// # Panics
    /// If `r >= self.rows()` or `out.len() != self.cols()`.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        assert_eq!(out.len(), self.cols, "output length must equal cols");
        let row = self.row_bytes(r);
        // Sizes were validated at construction; a failure here is a bug.
        if let Err(e) = dequantize(self.ty, row, out) {
            panic!(
                "row of a validated {} matrix failed to decode: {e}",
                self.ty
            );
        }
    }

    /// The whole matrix decoded to f32, row-major.
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.rows * self.cols];
        for (r, row) in out
            .chunks_exact_mut(self.cols.max(1))
            .enumerate()
            .take(self.rows)
        {
            self.dequantize_row(r, row);
        }
        out
    }

    /// Quantized product: `out[r] = dot(row r, x)` with integer block dot
    /// products scaled in f32, as llama.cpp's `ggml_vec_dot_*_q8_*` compute it
    /// (the summation order of the f32 partial sums differs from llama.cpp's).
    /// For float matrices `x` holds plain f32 values.
    ///
    /// # Panics
    /// If `x` was not quantized for this matrix's type (its format is not
    /// [`activation_type`]`(self.ty())`), `x.len() != self.cols()`, or
    /// `out.len() != self.rows()`.
    pub fn matvec(&self, x: &QuantizedActivations, out: &mut [f32]) {
        self.matvec_rows(0..self.rows, x, out);
    }

    /// [`matvec`](Self::matvec) restricted to the rows in `rows`:
    /// `out[i] = dot(row rows.start + i, x)`.
    ///
    /// # Panics
    /// As [`matvec`](Self::matvec), and if `rows` is not inside `0..self.rows()`
    /// or `out.len() != rows.len()`.
    pub fn matvec_rows(&self, rows: Range<usize>, x: &QuantizedActivations, out: &mut [f32]) {
        assert!(
            rows.start <= rows.end && rows.end <= self.rows,
            "row range {rows:?} outside a matrix of {} rows",
            self.rows
        );
        assert_eq!(
            out.len(),
            rows.len(),
            "output length must equal the number of rows"
        );
        assert_eq!(x.len(), self.cols, "activation length must equal cols");
        assert_eq!(
            Some(x.format()),
            activation_type(self.ty),
            "activations quantized as {} cannot multiply {} weights",
            x.format(),
            self.ty
        );
        if self.row_bytes == 0 {
            out.fill(0.0);
            return;
        }
        let data = &self.data[rows.start * self.row_bytes..rows.end * self.row_bytes];
        let q = &x.quants[..];
        let d = &x.scales[..];
        let rows_iter = data.chunks_exact(self.row_bytes).zip(out.iter_mut());
        // The fast kernels get the matrix from the row on: the last partial
        // group of a row may read into the next one.
        let from_row = |r: usize| &self.data[r * self.row_bytes..];
        match self.ty {
            GgmlType::Q4_1 if self.finite_scales => {
                interleaved_rows(rows.start, out, |r| {
                    dot_q4_1_fast(
                        from_row(r),
                        self.row_bytes,
                        &x.pairs,
                        &x.pair_scales,
                        &x.pair_sums,
                    )
                });
            }
            GgmlType::Q8_0 if self.finite_scales => {
                interleaved_rows(rows.start, out, |r| {
                    dot_q8_0_fast(from_row(r), self.row_bytes, &x.split, d)
                });
            }
            GgmlType::Q4_0 => rows_iter.for_each(|(row, o)| *o = dot_q4_0(row, q, d)),
            GgmlType::Q4_1 => rows_iter.for_each(|(row, o)| *o = dot_q4_1(row, q, d, &x.sums)),
            GgmlType::Q5_0 => rows_iter.for_each(|(row, o)| *o = dot_q5_0(row, q, d)),
            GgmlType::Q5_1 => rows_iter.for_each(|(row, o)| *o = dot_q5_1(row, q, d, &x.sums)),
            GgmlType::Q8_0 => rows_iter.for_each(|(row, o)| *o = dot_q8_0(row, q, d)),
            GgmlType::Q4_K => rows_iter.for_each(|(row, o)| *o = dot_q4_k(row, q, d, &x.bsums)),
            GgmlType::Q6_K => rows_iter.for_each(|(row, o)| *o = dot_q6_k(row, q, d)),
            _ => self.matvec_f32_rows(rows, &x.values[..x.len()], out),
        }
    }

    /// Reference product in f32: `out[r]` is the dot product of row `r`, as
    /// [`dequantize_row`](Self::dequantize_row) decodes it, with the
    /// unquantized `x`, up to f32 rounding (terms are summed in another
    /// order, in eight-lane partial sums). Allocates nothing.
    ///
    /// Q4_0, Q4_1 and Q8_0 rows are decoded straight into f32 lanes: the
    /// codes of a block are widened to i32 lanes, converted and multiplied
    /// with `x`, the scales of eight blocks being converted from f16 at
    /// once. Q8_0 and Q4_0 apply each block's scale once to its eight
    /// partial sums of `q·x`; Q4_1 forms each weight `q·d + m` with one fused
    /// multiply-add, which equals the decoded weight bit for bit. Rows are
    /// visited as four interleaved streams, as in [`matvec`](Self::matvec).
    /// Other block types decode each block into a stack buffer first.
    ///
    /// A NaN in `x` makes every output NaN. An infinity gives what the plain
    /// dot product of the decoded weights gives: NaN where it meets a zero
    /// weight or an infinity of the other sign, else that infinity (barring
    /// an intermediate sum overflowing where the plain one does not). A
    /// non-finite block scale makes its row's output non-finite.
    ///
    /// # Panics
    /// If `x.len() != self.cols()` or `out.len() != self.rows()`.
    pub fn matvec_f32(&self, x: &[f32], out: &mut [f32]) {
        self.matvec_f32_rows(0..self.rows, x, out);
    }

    /// [`matvec_f32`](Self::matvec_f32) restricted to the rows in `rows`.
    ///
    /// # Panics
    /// If `rows` is not inside `0..self.rows()`, `out.len() != rows.len()` or
    /// `x.len() != self.cols()`.
    pub fn matvec_f32_rows(&self, rows: Range<usize>, x: &[f32], out: &mut [f32]) {
        assert!(
            rows.start <= rows.end && rows.end <= self.rows,
            "row range {rows:?} outside a matrix of {} rows",
            self.rows
        );
        assert_eq!(
            out.len(),
            rows.len(),
            "output length must equal the number of rows"
        );
        assert_eq!(x.len(), self.cols, "activation length must equal cols");
        if self.row_bytes == 0 {
            out.fill(0.0);
            return;
        }
        let data = &self.data[rows.start * self.row_bytes..rows.end * self.row_bytes];
        let rows_iter = data.chunks_exact(self.row_bytes).zip(out.iter_mut());
        let bb = self.ty.block_bytes();
        let row = |r: usize| &self.data[r * self.row_bytes..(r + 1) * self.row_bytes];
        match self.ty {
            GgmlType::F32 => {
                rows_iter.for_each(|(row, o)| *o = dot_f32_plain(row, 4, x, decode_f32))
            }
            GgmlType::F16 => {
                rows_iter.for_each(|(row, o)| *o = dot_f32_plain(row, 2, x, decode_f16))
            }
            GgmlType::BF16 => {
                rows_iter.for_each(|(row, o)| *o = dot_f32_plain(row, 2, x, decode_bf16))
            }
            GgmlType::Q4_0 => interleaved_rows(rows.start, out, |r| dot_f32_q4_0(row(r), x)),
            GgmlType::Q4_1 => interleaved_rows(rows.start, out, |r| dot_f32_q4_1(row(r), x)),
            GgmlType::Q5_0 => rows_iter
                .for_each(|(row, o)| *o = dot_f32_blocks::<32>(row, bb, x, dequantize_q5_0)),
            GgmlType::Q5_1 => rows_iter
                .for_each(|(row, o)| *o = dot_f32_blocks::<32>(row, bb, x, dequantize_q5_1)),
            GgmlType::Q8_0 => interleaved_rows(rows.start, out, |r| dot_f32_q8_0(row(r), x)),
            GgmlType::Q4_K => rows_iter
                .for_each(|(row, o)| *o = dot_f32_blocks::<256>(row, bb, x, dequantize_q4_k)),
            GgmlType::Q6_K => rows_iter
                .for_each(|(row, o)| *o = dot_f32_blocks::<256>(row, bb, x, dequantize_q6_k)),
            // Construction admits only the types above.
            other => panic!("no f32 kernel for {other} weights"),
        }
    }
}
