//! Row-major quantized matrices and their matrix-vector products.

use std::ops::Range;

use super::activations::{activation_type, QuantizedActivations, QuantizedBatch};
use super::blocks::*;
use super::codec::{dequantize, quantize};
use super::dot::rows::{
    dot_f32_q4_1_rows, dot_f32_q8_0_q4_0_rows, dot_q4_0_rows, dot_q4_1_fast_rows, Q8_0Tile,
};
use super::dot::*;
use super::float::{decode_bf16, decode_f16, decode_f32};
use super::QuantError;
use crate::dtype::GgmlType;
use crate::pool::{part, Out, Pool};

/// Output rows a thread takes at least in a product split over threads.
const MIN_PART_ROWS: usize = 64;

/// Activation rows a part of a batched product takes at least, beyond
/// one part per thread.
const MIN_BATCH_PART: usize = 16;

pub(super) mod lens;

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

    /// Matrix product with a batch of activation rows: `out[t * rows + r]`
    /// is row `r` of the weights times row `t` of `x`, i.e. `out` holds the
    /// `T × rows` products row-major, `T` being `x.rows()`. Each
    /// `out[t * rows..(t + 1) * rows]` is bit for bit what
    /// [`matvec`](Self::matvec) gives for `x.row(t)`.
    ///
    /// See the [module documentation](super#multi-row-products) for the
    /// order of work and which types have a multi-row kernel.
    ///
    /// # Panics
    /// If `x` was not quantized for this matrix's type (its format is not
    /// [`activation_type`]`(self.ty())`), `x.cols() != self.cols()`, or
    /// `out.len() != x.rows() * self.rows()`.
    pub fn matmul(&self, x: &QuantizedBatch, out: &mut [f32]) {
        assert_eq!(x.cols(), self.cols, "activation length must equal cols");
        assert_eq!(
            Some(x.format()),
            activation_type(self.ty),
            "activations quantized as {} cannot multiply {} weights",
            x.format(),
            self.ty
        );
        let acts = x.used();
        assert_eq!(
            Some(out.len()),
            acts.len().checked_mul(self.rows),
            "output length must equal activation rows times matrix rows"
        );
        self.matmul_acts(acts, out);
    }

    /// [`matmul`](Self::matmul) of the activation rows `acts`, checked.
    fn matmul_acts(&self, acts: &[QuantizedActivations], out: &mut [f32]) {
        if self.row_bytes == 0 {
            out.fill(0.0);
            return;
        }
        let (m, n) = (self, acts.len());
        match self.ty {
            GgmlType::Q4_1 if self.finite_scales => {
                self.tiled::<TILE>(out, n, &Q4_1Fast { m, acts })
            }
            GgmlType::Q8_0 if self.finite_scales => {
                self.tiled::<TILE>(out, n, &Q8_0Fast { m, acts })
            }
            GgmlType::Q4_0 => self.tiled::<TILE>(out, n, &Q4_0Rows { m, acts }),
            _ => self.tiled::<TILE>(out, n, &OneByOne { m, acts }),
        }
    }

    /// Reference product of a batch: `x` holds `T` rows of `cols` f32
    /// values, row-major, and `out[t * rows + r]` is row `r` of the weights
    /// times row `t` of `x`, bit for bit what
    /// [`matvec_f32`](Self::matvec_f32) gives for that row alone, non-finite
    /// values included. Q4_1, Q8_0 and Q4_0 rows are decoded once per tile
    /// of 8 activation rows (4 beyond 768 columns); other types run the
    /// one-row f32 kernel once per activation row. Both go in the cache-friendly order of
    /// [`matmul`](Self::matmul).
    ///
    /// # Panics
    /// If `x.len()` is not a multiple of `self.cols()` (or, for a matrix of
    /// no columns, if `x` is not empty), or `out.len()` is not
    /// `x.len() / self.cols() * self.rows()`.
    pub fn matmul_f32(&self, x: &[f32], out: &mut [f32]) {
        let Some(rows_x) = self.batch_rows(x, out) else {
            return;
        };
        if self.row_bytes == 0 {
            out.fill(0.0);
            return;
        }
        let (m, cols) = (self, self.cols);
        match self.ty {
            // A tile's activations should stay in a 32 KiB L1 cache with
            // room for the weights: 8 rows up to 768 columns, else 4.
            GgmlType::Q4_1 | GgmlType::Q8_0 | GgmlType::Q4_0 if cols <= 768 => {
                self.tiled::<F32_TILE>(out, rows_x, &F32Rows { m, x, cols })
            }
            GgmlType::Q4_1 | GgmlType::Q8_0 | GgmlType::Q4_0 => {
                self.tiled::<{ F32_TILE / 2 }>(out, rows_x, &F32Rows { m, x, cols })
            }
            _ => self.tiled::<TILE>(out, rows_x, &OneByOneF32 { m, x }),
        }
    }

    /// [`matvec`](Self::matvec) on the threads of `pool`: each thread
    /// computes a contiguous range of the output rows with the one-thread
    /// kernel, so `out` is bit for bit that of [`matvec`](Self::matvec).
    ///
    /// # Panics
    /// As [`matvec`](Self::matvec).
    pub fn matvec_on(&self, pool: &Pool, x: &QuantizedActivations, out: &mut [f32]) {
        let parts = pool.parts_for(self.rows, MIN_PART_ROWS);
        if parts <= 1 {
            return self.matvec(x, out);
        }
        assert_eq!(
            out.len(),
            self.rows,
            "output length must equal the number of rows"
        );
        let o = Out::new(out);
        pool.run(parts, &|k| {
            let rows = part(self.rows, parts, k);
            // SAFETY: the parts' row ranges are disjoint.
            let out = unsafe { o.range(rows.clone()) };
            self.matvec_rows(rows, x, out);
        });
    }

    /// [`matvec`](Self::matvec) of each matrix of `mats` by one input `x`,
    /// into the output of the same index, in one job on the threads of
    /// `pool`: the rows of all the matrices, one after another, are split
    /// into the parts, so that products of a few hundred rows each (q, k
    /// and v; gate and up) cost one handoff. Each output is bit for bit
    /// that matrix's [`matvec`](Self::matvec).
    ///
    /// # Panics
    /// As [`matvec`](Self::matvec) for each.
    pub fn matvec_many_on<const N: usize>(
        pool: &Pool,
        x: &QuantizedActivations,
        mats: [&Self; N],
        mut outs: [&mut [f32]; N],
    ) {
        let total: usize = mats.iter().map(|m| m.rows).sum();
        let parts = pool.parts_for(total, MIN_PART_ROWS);
        if parts <= 1 || N <= 1 {
            for (m, out) in mats.iter().zip(&mut outs) {
                m.matvec_on(pool, x, out);
            }
            return;
        }
        for (m, out) in mats.iter().zip(&outs) {
            assert_eq!(
                out.len(),
                m.rows,
                "output length must equal the number of rows"
            );
        }
        let outs = outs.map(Out::new);
        pool.run(parts, &|k| {
            let rows = part(total, parts, k);
            let mut first = 0;
            for (m, out) in mats.iter().zip(&outs) {
                let (from, to) = (rows.start.max(first), rows.end.min(first + m.rows));
                if from < to {
                    let local = from - first..to - first;
                    // SAFETY: the parts' row ranges are disjoint.
                    let out = unsafe { out.range(local.clone()) };
                    m.matvec_rows(local, x, out);
                }
                first += m.rows;
            }
        });
    }

    /// [`matvec_f32`](Self::matvec_f32) on the threads of `pool`, bit for
    /// bit its result (each thread computes a range of the rows).
    ///
    /// # Panics
    /// As [`matvec_f32`](Self::matvec_f32).
    pub fn matvec_f32_on(&self, pool: &Pool, x: &[f32], out: &mut [f32]) {
        let parts = pool.parts_for(self.rows, MIN_PART_ROWS);
        if parts <= 1 {
            return self.matvec_f32(x, out);
        }
        assert_eq!(
            out.len(),
            self.rows,
            "output length must equal the number of rows"
        );
        let o = Out::new(out);
        pool.run(parts, &|k| {
            let rows = part(self.rows, parts, k);
            // SAFETY: the parts' row ranges are disjoint.
            let out = unsafe { o.range(rows.clone()) };
            self.matvec_f32_rows(rows, x, out);
        });
    }

    /// [`matmul`](Self::matmul) on the threads of `pool`, bit for bit its
    /// result: each part multiplies a contiguous range of the activation
    /// rows (their outputs are contiguous in `out`) by the whole matrix,
    /// each row's product being that of [`matvec`](Self::matvec) whatever
    /// the rows beside it; a single row is split by output rows instead
    /// ([`matvec_on`](Self::matvec_on)).
    ///
    /// # Panics
    /// As [`matmul`](Self::matmul).
    pub fn matmul_on(&self, pool: &Pool, x: &QuantizedBatch, out: &mut [f32]) {
        let acts = x.used();
        if acts.len() == 1 && out.len() == self.rows {
            return self.matvec_on(pool, &acts[0], out);
        }
        // Parts of at least MIN_BATCH_PART rows, up to two per thread: a
        // thread that its core keeps waiting leaves the second half of its
        // rows to the others.
        let parts = match pool.threads() {
            1 => 1,
            t => (acts.len() / MIN_BATCH_PART)
                .clamp(t, 2 * t)
                .min(acts.len()),
        };
        if parts <= 1 || self.rows * self.cols < MIN_PART_ROWS * 64 {
            return self.matmul(x, out);
        }
        assert_eq!(x.cols(), self.cols, "activation length must equal cols");
        assert_eq!(
            Some(x.format()),
            activation_type(self.ty),
            "activations quantized as {} cannot multiply {} weights",
            x.format(),
            self.ty
        );
        assert_eq!(
            Some(out.len()),
            acts.len().checked_mul(self.rows),
            "output length must equal activation rows times matrix rows"
        );
        let o = Out::new(out);
        pool.run(parts, &|k| {
            let t = part(acts.len(), parts, k);
            // SAFETY: the parts' activation rows, and so their outputs,
            // are disjoint.
            let out = unsafe { o.range(t.start * self.rows..t.end * self.rows) };
            self.matmul_acts(&acts[t], out);
        });
    }

    /// [`matmul_f32`](Self::matmul_f32) on the threads of `pool`, bit for
    /// bit its result (each thread takes a range of the activation rows).
    ///
    /// # Panics
    /// As [`matmul_f32`](Self::matmul_f32).
    pub fn matmul_f32_on(&self, pool: &Pool, x: &[f32], out: &mut [f32]) {
        if self.cols == 0 || x.len() % self.cols != 0 {
            return self.matmul_f32(x, out);
        }
        let rows_x = x.len() / self.cols;
        if rows_x == 1 && out.len() == self.rows {
            return self.matvec_f32_on(pool, x, out);
        }
        let parts = rows_x.min(pool.threads());
        if parts <= 1 || Some(out.len()) != rows_x.checked_mul(self.rows) {
            return self.matmul_f32(x, out);
        }
        let o = Out::new(out);
        let cols = self.cols;
        pool.run(parts, &|k| {
            let t = part(rows_x, parts, k);
            // SAFETY: the parts' activation rows, and so their outputs,
            // are disjoint.
            let out = unsafe { o.range(t.start * self.rows..t.end * self.rows) };
            self.matmul_f32(&x[t.start * cols..t.end * cols], out);
        });
    }

    /// The number of rows of `x` (row-major, `cols` values each) for a
    /// product of the batch into `out`, after checking both lengths;
    /// `None` for a matrix of no columns, whose products are zero (`out`
    /// is then filled with zeros).
    ///
    /// # Panics
    /// If `x.len()` is not a multiple of `self.cols()` (or, for a matrix of
    /// no columns, if `x` is not empty or `out.len()` not a multiple of
    /// the rows), or `out.len()` is not `x.len() / self.cols() * self.rows()`.
    fn batch_rows(&self, x: &[f32], out: &mut [f32]) -> Option<usize> {
        if self.cols == 0 {
            assert!(x.is_empty(), "a matrix of no columns takes no activations");
            assert!(
                self.rows == 0 || out.len() % self.rows == 0,
                "output length must be a multiple of the matrix rows"
            );
            out.fill(0.0);
            return None;
        }
        assert_eq!(
            x.len() % self.cols,
            0,
            "activations must be whole rows of cols values"
        );
        let rows_x = x.len() / self.cols;
        assert_eq!(
            Some(out.len()),
            rows_x.checked_mul(self.rows),
            "output length must equal activation rows times matrix rows"
        );
        Some(rows_x)
    }

    /// Runs `kernel(r, t0)`, which returns the products of weight row `r`
    /// with activation rows `t0..t0 + n`, over every row and every
    /// activation row, storing the results at `out[t * rows + r]`.
    ///
    /// Weight rows go in blocks of [`ROW_BLOCK`]; each block meets every
    /// tile of activation rows in turn (`N` rows, at most 8, the last ones
    /// in tiles of 4, 2 and 1), so that its blocks are read from memory
    /// once per call and from the cache for every other tile, and a tile's
    /// activations stay in the cache for the whole block.
    #[inline(always)]
    fn tiled<const N: usize>(&self, out: &mut [f32], rows_x: usize, kernel: &impl TileKernel) {
        const {
            assert!(
                N >= 1 && N <= 8,
                "the remainder goes in tiles of 4, 2 and 1"
            )
        };
        let whole = rows_x / N * N;
        for first in (0..self.rows).step_by(ROW_BLOCK) {
            let block = first..(first + ROW_BLOCK).min(self.rows);
            for t0 in (0..whole).step_by(N) {
                self.tile_into::<N>(out, block.clone(), t0, kernel);
            }
            let mut t0 = whole;
            if (rows_x - t0) & 4 != 0 {
                self.tile_into::<4>(out, block.clone(), t0, kernel);
                t0 += 4;
            }
            if (rows_x - t0) & 2 != 0 {
                self.tile_into::<2>(out, block.clone(), t0, kernel);
                t0 += 2;
            }
            if (rows_x - t0) & 1 != 0 {
                self.tile_into::<1>(out, block, t0, kernel);
            }
        }
    }

    #[inline(always)]
    fn tile_into<const N: usize>(
        &self,
        out: &mut [f32],
        rows: Range<usize>,
        t0: usize,
        kernel: &impl TileKernel,
    ) {
        kernel.tile_into::<N>(out, rows, t0, self.rows);
    }

    /// Row `r` times `x`, as [`matvec`](Self::matvec) computes it.
    fn dot_row(&self, r: usize, x: &QuantizedActivations) -> f32 {
        let rest = &self.data[r * self.row_bytes..];
        let row = &rest[..self.row_bytes];
        let (q, d) = (&x.quants[..], &x.scales[..]);
        match self.ty {
            GgmlType::Q4_1 if self.finite_scales => {
                dot_q4_1_fast(rest, self.row_bytes, &x.pairs, &x.pair_scales, &x.pair_sums)
            }
            GgmlType::Q8_0 if self.finite_scales => {
                dot_q8_0_fast(rest, self.row_bytes, &x.split, d)
            }
            GgmlType::Q4_0 => dot_q4_0(row, q, d),
            GgmlType::Q4_1 => dot_q4_1(row, q, d, &x.sums),
            GgmlType::Q5_0 => dot_q5_0(row, q, d),
            GgmlType::Q5_1 => dot_q5_1(row, q, d, &x.sums),
            GgmlType::Q8_0 => dot_q8_0(row, q, d),
            GgmlType::Q4_K => dot_q4_k(row, q, d, &x.bsums),
            GgmlType::Q6_K => dot_q6_k(row, q, d),
            _ => self.dot_row_f32(r, &x.values[..x.len()]),
        }
    }

    /// Row `r` times `x`, as [`matvec_f32`](Self::matvec_f32) computes it.
    fn dot_row_f32(&self, r: usize, x: &[f32]) -> f32 {
        let row = &self.data[r * self.row_bytes..(r + 1) * self.row_bytes];
        let bb = self.ty.block_bytes();
        match self.ty {
            GgmlType::F32 => dot_f32_plain(row, 4, x, decode_f32),
            GgmlType::F16 => dot_f32_plain(row, 2, x, decode_f16),
            GgmlType::BF16 => dot_f32_plain(row, 2, x, decode_bf16),
            GgmlType::Q4_0 => dot_f32_q4_0(row, x),
            GgmlType::Q4_1 => dot_f32_q4_1(row, x),
            GgmlType::Q5_0 => dot_f32_blocks::<32>(row, bb, x, dequantize_q5_0),
            GgmlType::Q5_1 => dot_f32_blocks::<32>(row, bb, x, dequantize_q5_1),
            GgmlType::Q8_0 => dot_f32_q8_0(row, x),
            GgmlType::Q4_K => dot_f32_blocks::<256>(row, bb, x, dequantize_q4_k),
            GgmlType::Q6_K => dot_f32_blocks::<256>(row, bb, x, dequantize_q6_k),
            // Construction admits only the types above.
            other => panic!("no f32 kernel for {other} weights"),
        }
    }
}

/// Activation rows per tile of [`QMatrix::matmul`]: the rows whose
/// accumulators a multi-row kernel keeps at once.
pub(super) const TILE: usize = 4;

/// Activation rows per tile of the multi-row f32 kernels.
pub(super) const F32_TILE: usize = 8;

/// Weight rows per block of [`QMatrix::matmul`].
pub(super) const ROW_BLOCK: usize = 16;

/// The products of one weight row with a tile of `N` activation rows.
trait TileKernel {
    /// Row `r` of the weights times activation rows `t0..t0 + N`.
    fn products<const N: usize>(&self, r: usize, t0: usize) -> [f32; N];

    /// Stores the products of weight rows `rows` (of `m_rows`) with
    /// activation rows `t0..t0 + N` at `out[t * m_rows + r]`.
    #[inline(always)]
    fn tile_into<const N: usize>(
        &self,
        out: &mut [f32],
        rows: Range<usize>,
        t0: usize,
        m_rows: usize,
    ) {
        for r in rows {
            let products: [f32; N] = self.products(r, t0);
            for (t, p) in products.into_iter().enumerate() {
                out[(t0 + t) * m_rows + r] = p;
            }
        }
    }
}

/// Activation rows `t0..t0 + N` of `acts`.
#[inline(always)]
fn tile<const N: usize>(acts: &[QuantizedActivations], t0: usize) -> &[QuantizedActivations; N] {
    match acts[t0..t0 + N].try_into() {
        Ok(tile) => tile,
        Err(_) => unreachable!("a slice of N rows is an array of N rows"),
    }
}

/// The Q4_1 multi-row kernel (finite scales only).
struct Q4_1Fast<'a> {
    m: &'a QMatrix,
    acts: &'a [QuantizedActivations],
}

impl TileKernel for Q4_1Fast<'_> {
    #[inline(always)]
    fn products<const N: usize>(&self, r: usize, t0: usize) -> [f32; N] {
        let rb = self.m.row_bytes;
        dot_q4_1_fast_rows(&self.m.data[r * rb..], rb, tile(self.acts, t0))
    }
}

/// The Q8_0 multi-row kernel (finite scales only).
struct Q8_0Fast<'a> {
    m: &'a QMatrix,
    acts: &'a [QuantizedActivations],
}

impl TileKernel for Q8_0Fast<'_> {
    #[inline(always)]
    fn products<const N: usize>(&self, r: usize, t0: usize) -> [f32; N] {
        let rb = self.m.row_bytes;
        Q8_0Tile::new(tile(self.acts, t0), self.m.cols).dot(&self.m.data[r * rb..], rb)
    }

    #[inline(always)]
    fn tile_into<const N: usize>(
        &self,
        out: &mut [f32],
        rows: Range<usize>,
        t0: usize,
        m_rows: usize,
    ) {
        // The tile's activation rows are sliced once, not once per weight
        // row.
        let rb = self.m.row_bytes;
        let tile = Q8_0Tile::<N>::new(tile(self.acts, t0), self.m.cols);
        for r in rows {
            let products = tile.dot(&self.m.data[r * rb..], rb);
            for (t, p) in products.into_iter().enumerate() {
                out[(t0 + t) * m_rows + r] = p;
            }
        }
    }
}

/// The Q4_0 multi-row kernel.
struct Q4_0Rows<'a> {
    m: &'a QMatrix,
    acts: &'a [QuantizedActivations],
}

impl TileKernel for Q4_0Rows<'_> {
    #[inline(always)]
    fn products<const N: usize>(&self, r: usize, t0: usize) -> [f32; N] {
        let rb = self.m.row_bytes;
        dot_q4_0_rows(&self.m.data[r * rb..(r + 1) * rb], tile(self.acts, t0))
    }
}

/// The one-row kernel of [`QMatrix::matvec`] once per activation row.
struct OneByOne<'a> {
    m: &'a QMatrix,
    acts: &'a [QuantizedActivations],
}

impl TileKernel for OneByOne<'_> {
    #[inline(always)]
    fn products<const N: usize>(&self, r: usize, t0: usize) -> [f32; N] {
        std::array::from_fn(|t| self.m.dot_row(r, &self.acts[t0 + t]))
    }
}

/// The multi-row f32 kernels of Q4_1, Q8_0 and Q4_0 matrices, on the rows
/// of `x` (row-major, `cols` values a row).
struct F32Rows<'a> {
    m: &'a QMatrix,
    x: &'a [f32],
    cols: usize,
}

impl TileKernel for F32Rows<'_> {
    #[inline(always)]
    fn products<const N: usize>(&self, r: usize, t0: usize) -> [f32; N] {
        let rb = self.m.row_bytes;
        let row = &self.m.data[r * rb..(r + 1) * rb];
        let mut x: [&[f32]; N] = [&[]; N];
        for (t, x) in x.iter_mut().enumerate() {
            *x = &self.x[(t0 + t) * self.cols..(t0 + t + 1) * self.cols];
        }
        match self.m.ty {
            GgmlType::Q4_1 => dot_f32_q4_1_rows(row, &x),
            GgmlType::Q8_0 => dot_f32_q8_0_q4_0_rows::<false, N>(row, &x),
            _ => dot_f32_q8_0_q4_0_rows::<true, N>(row, &x),
        }
    }
}

/// The one-row kernel of [`QMatrix::matvec_f32`] once per activation row
/// of `x` (row-major, `m.cols()` values a row).
struct OneByOneF32<'a> {
    m: &'a QMatrix,
    x: &'a [f32],
}

impl TileKernel for OneByOneF32<'_> {
    #[inline(always)]
    fn products<const N: usize>(&self, r: usize, t0: usize) -> [f32; N] {
        let cols = self.m.cols;
        std::array::from_fn(|t| {
            self.m
                .dot_row_f32(r, &self.x[(t0 + t) * cols..(t0 + t + 1) * cols])
        })
    }
}
