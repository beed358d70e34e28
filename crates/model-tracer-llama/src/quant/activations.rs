//! Activation vectors quantized for the integer dot products.

use wide::i16x16;

use super::blocks::{q8_activation_block, q8_k_codes};
use super::float::f32_to_f16;
use super::QuantError;
use crate::dtype::GgmlType;
use crate::pool::{part, Out, Pool};

/// The activation format llama.cpp's CPU path pairs with weights of type
/// `weights`: `Q8_0` for Q4_0/Q5_0/Q8_0, `Q8_1` (which carries per-block sums
/// for the minimum term) for Q4_1/Q5_1, `Q8_K` for K-quants, and `F32`
/// (unquantized) for float weights. `None` for weight types without a kernel.
pub fn activation_type(weights: GgmlType) -> Option<GgmlType> {
    use GgmlType::*;
    match weights {
        F32 | F16 | BF16 => Some(F32),
        Q4_0 | Q5_0 | Q8_0 => Some(Q8_0),
        Q4_1 | Q5_1 => Some(Q8_1),
        Q4_K | Q6_K => Some(Q8_K),
        _ => None,
    }
}

/// Whether the multi-row Q4_1 kernel (`dot::rows`) multiplies code bytes
/// with `pmaddubsw` (x86 with AVX2), reading the `pair_bytes` of Q8_1 rows;
/// otherwise it uses the `i16x16` products of the one-row kernel and
/// `pairs`. Rows of a [`QuantizedBatch`] carry `pair_bytes` exactly when
/// their kernel reads them.
pub(super) const Q4_1_BYTE_PRODUCTS: bool = cfg!(all(
    any(target_arch = "x86", target_arch = "x86_64"),
    target_feature = "avx2"
));

/// Whether the multi-row Q8_0 kernel (`dot::rows`) multiplies code bytes
/// with `pmaddubsw` (x86 with AVX2), reading the `pair_bytes` of Q8_0 rows
/// (the codes in element order); otherwise it uses the `i16x16` products of
/// the one-row kernel and `split`.
pub(super) const Q8_0_BYTE_PRODUCTS: bool = Q4_1_BYTE_PRODUCTS;

/// An activation vector prepared for [`QMatrix::matvec`](super::QMatrix::matvec):
/// 8-bit codes with one scale per block, laid out for the SIMD kernels.
///
/// The codes and scales are exactly those of ggml's `quantize_row_q8_0_ref`,
/// `quantize_row_q8_1_ref` and `quantize_row_q8_K_ref` (the Q8_0/Q8_1 scale
/// rounded to f16, as stored). For float weights it holds a plain f32 copy.
///
/// The buffers are reused: quantizing a vector no longer than any before
/// does not allocate.
#[derive(Debug, Clone)]
pub struct QuantizedActivations {
    format: GgmlType,
    len: usize,
    /// The unquantized copy (format F32).
    pub(super) values: Vec<f32>,
    /// Codes widened to i16, 16 per vector, in element order. For Q8_0 and
    /// Q8_1, zero-padded to whole groups of eight blocks (16 vectors), so
    /// that the multi-row kernels can take a group's vectors at once.
    pub(super) quants: Vec<i16x16>,
    /// Per-block scale: the f16 value as f32 for Q8_0/Q8_1, the f32 for Q8_K.
    pub(super) scales: Vec<f32>,
    /// Q8_1 only: per-block `d * Σ codes`, rounded to f16 as ggml stores it.
    pub(super) sums: Vec<f32>,
    /// Q8_K only: the sum of the codes of each group of 16.
    pub(super) bsums: Vec<i16>,
    /// Q8_1 only: the codes again, in the pair layout of the Q4_1 kernel.
    ///
    /// Blocks go in groups of eight, the last group holding the `n <= 8`
    /// blocks left. With `h = ⌈n/2⌉`, lane `i < h` of a group stands for its
    /// block `i` and lane `4 + i` for its block `h + i` (so a whole group is
    /// in order), and pair `i` is the blocks of lanes `i` and `4 + i`. Each
    /// pair has four vectors whose low halves belong to the first block and
    /// high halves to the second (zero if there is none); for `j < 8` they
    /// hold `256·a[2j]`, `16·a[2j+16]`, `a[2j+1]` and `256·a[2j+17]`, the
    /// factors complementing the ones the kernel's masks leave on the weight
    /// nibbles (see `dot::q4_1_pair`). Codes are within ±127, so the products
    /// fit in i16. Zero-padded to whole groups (16 vectors).
    pub(super) pairs: Vec<i16x16>,
    /// Rows of a [`QuantizedBatch`] only, and only where the multi-row
    /// kernels multiply bytes (see `dot::rows`); empty otherwise. Q8_1 rows
    /// (Q4_1 kernel): the codes of each pair of `pairs` as bytes, two
    /// vectors a pair, the first holding elements 0–15 of the pair's first
    /// block then of its second, the other elements 16–31 (zero where there
    /// is no second block). Q8_0 rows (Q8_0 kernel): the 32 codes of each
    /// block as bytes in element order, one vector a block. Zero-padded to
    /// whole groups (8 vectors).
    pub(super) pair_bytes: Vec<i16x16>,
    /// Q8_1 only: `scales` in the lane order of `pairs`, zero in lanes
    /// without a block.
    pub(super) pair_scales: Vec<f32>,
    /// Q8_1 only: `sums` in the lane order of `pairs`, zero in lanes without
    /// a block.
    pub(super) pair_sums: Vec<f32>,
    /// Q8_0 only: per block, the codes of the even elements then those of the
    /// odd ones, matching the i16 lanes that the Q8_0 kernel reads its weight
    /// bytes in (see `dot::q8_0_split`). Zero-padded to whole groups (16
    /// vectors).
    pub(super) split: Vec<i16x16>,
}

impl Default for QuantizedActivations {
    fn default() -> Self {
        Self::new()
    }
}

impl QuantizedActivations {
    /// An empty F32 vector of length 0; nothing is allocated until the first
    /// [`quantize_from`](Self::quantize_from).
    pub fn new() -> Self {
        Self {
            format: GgmlType::F32,
            len: 0,
            values: Vec::new(),
            quants: Vec::new(),
            scales: Vec::new(),
            sums: Vec::new(),
            bsums: Vec::new(),
            pairs: Vec::new(),
            pair_bytes: Vec::new(),
            pair_scales: Vec::new(),
            pair_sums: Vec::new(),
            split: Vec::new(),
        }
    }

    /// Quantizes `x` for a matrix whose weights have type `for_weights`, in the
    /// format given by [`activation_type`], replacing the previous contents.
    ///
    /// A block holding an infinite or NaN activation gets a non-finite scale,
    /// so every dot product with it is non-finite too.
    ///
    /// # Errors
    /// [`QuantError::Unsupported`] when there is no kernel for `for_weights`,
    /// [`QuantError::NotWholeBlocks`] when `x.len()` is not a whole number of
    /// activation blocks (32 or 256 elements). The previous contents are kept.
    pub fn quantize_from(&mut self, x: &[f32], for_weights: GgmlType) -> Result<(), QuantError> {
        let format = activation_type(for_weights).ok_or(QuantError::Unsupported(for_weights))?;
        if x.len() % format.block_len() != 0 {
            return Err(QuantError::NotWholeBlocks {
                ty: format,
                elements: x.len(),
            });
        }
        self.format = format;
        self.len = x.len();
        self.pair_bytes.clear();
        match format {
            GgmlType::F32 => {
                self.values.clear();
                self.values.extend_from_slice(x);
            }
            GgmlType::Q8_0 | GgmlType::Q8_1 => self.quantize_q8_x(x, format == GgmlType::Q8_1),
            _ => self.quantize_q8_k(x),
        }
        Ok(())
    }

    fn quantize_q8_x(&mut self, x: &[f32], with_sums: bool) {
        let blocks = x.len() / 32;
        // The kernels read scales eight blocks at a time; the padding must be
        // zero so that it contributes nothing.
        let padded = blocks.div_ceil(8) * 8;
        self.quants.truncate(2 * blocks);
        self.quants.resize(2 * padded, i16x16::ZERO);
        self.scales.resize(padded, 0.0);
        self.scales[blocks..].fill(0.0);
        self.sums.resize(if with_sums { padded } else { 0 }, 0.0);
        if with_sums {
            self.sums[blocks..].fill(0.0);
        }
        self.split.truncate(if with_sums { 0 } else { 2 * blocks });
        self.split
            .resize(if with_sums { 0 } else { 2 * padded }, i16x16::ZERO);
        let mut codes = [0i8; 32];
        for (b, (values, lanes)) in x
            .chunks_exact(32)
            .zip(self.quants.chunks_exact_mut(2))
            .enumerate()
        {
            let (d, sum) = q8_activation_block(values, &mut codes, with_sums);
            self.scales[b] = d;
            if with_sums {
                self.sums[b] = sum;
            } else {
                self.split[2 * b] = i16x16::new(std::array::from_fn(|j| i16::from(codes[2 * j])));
                self.split[2 * b + 1] =
                    i16x16::new(std::array::from_fn(|j| i16::from(codes[2 * j + 1])));
            }
            lanes[0] = widen(&codes[..16]);
            lanes[1] = widen(&codes[16..]);
        }
        if with_sums {
            self.fill_pairs(blocks);
        } else {
            self.pairs.clear();
            self.pair_scales.clear();
            self.pair_sums.clear();
        }
    }

    /// Builds `pairs`, `pair_scales` and `pair_sums` from `quants`, `scales`
    /// and `sums` (see the fields for the layout).
    fn fill_pairs(&mut self, blocks: usize) {
        let padded = blocks.div_ceil(8) * 8;
        self.pairs.clear();
        self.pair_scales.clear();
        self.pair_scales.resize(padded, 0.0);
        self.pair_sums.clear();
        self.pair_sums.resize(padded, 0.0);
        let codes = |b: usize| -> [i16; 32] {
            let mut c = [0i16; 32];
            c[..16].copy_from_slice(&self.quants[2 * b].to_array());
            c[16..].copy_from_slice(&self.quants[2 * b + 1].to_array());
            c
        };
        for first in (0..blocks).step_by(8) {
            let n = (blocks - first).min(8);
            let h = n.div_ceil(2);
            for i in 0..h {
                let low = codes(first + i);
                let high = if i + h < n {
                    self.pair_scales[first + 4 + i] = self.scales[first + h + i];
                    self.pair_sums[first + 4 + i] = self.sums[first + h + i];
                    codes(first + h + i)
                } else {
                    [0; 32]
                };
                self.pair_scales[first + i] = self.scales[first + i];
                self.pair_sums[first + i] = self.sums[first + i];
                let halves = |at: usize, step: usize, factor: i16| {
                    i16x16::new(std::array::from_fn(|j| {
                        let code = if j < 8 {
                            low[at + step * j]
                        } else {
                            high[at + step * (j - 8)]
                        };
                        factor * code
                    }))
                };
                self.pairs.extend([
                    halves(0, 2, 256),
                    halves(16, 2, 16),
                    halves(1, 2, 1),
                    halves(17, 2, 256),
                ]);
            }
        }
        self.pairs.resize(2 * padded, i16x16::ZERO);
    }

    /// Builds `pair_bytes` from `quants`, for a Q8_1 vector.
    pub(super) fn fill_pair_bytes(&mut self) {
        let blocks = self.len / 32;
        self.pair_bytes.clear();
        let code = |b: usize, e: usize| -> u8 {
            self.quants[2 * b + e / 16].to_array()[e % 16] as i8 as u8
        };
        for first in (0..blocks).step_by(8) {
            let n = (blocks - first).min(8);
            let h = n.div_ceil(2);
            for i in 0..h {
                let (low, high) = (first + i, (i + h < n).then_some(first + h + i));
                for half in [0, 16] {
                    let bytes: [u8; 32] = std::array::from_fn(|j| match (j < 16, high) {
                        (true, _) => code(low, half + j),
                        (false, Some(high)) => code(high, half + j - 16),
                        (false, None) => 0,
                    });
                    self.pair_bytes.push(wide::bytemuck::cast(bytes));
                }
            }
        }
        self.pair_bytes.resize(blocks.div_ceil(8) * 8, i16x16::ZERO);
    }

    /// Builds `pair_bytes` from `quants` in the element order of a Q8_0
    /// vector.
    pub(super) fn fill_code_bytes(&mut self) {
        let blocks = self.len / 32;
        self.pair_bytes.clear();
        for lanes in self.quants[..2 * blocks].chunks_exact(2) {
            let (low, high) = (lanes[0].to_array(), lanes[1].to_array());
            let bytes: [u8; 32] = std::array::from_fn(|e| {
                let code = if e < 16 { low[e] } else { high[e - 16] };
                code as i8 as u8
            });
            self.pair_bytes.push(wide::bytemuck::cast(bytes));
        }
        self.pair_bytes.resize(blocks.div_ceil(8) * 8, i16x16::ZERO);
    }

    fn quantize_q8_k(&mut self, x: &[f32]) {
        let blocks = x.len() / 256;
        self.quants.resize(16 * blocks, i16x16::ZERO);
        self.scales.resize(blocks, 0.0);
        self.bsums.resize(16 * blocks, 0);
        let mut codes = [0i8; 256];
        let per_block = x
            .chunks_exact(256)
            .zip(self.quants.chunks_exact_mut(16))
            .zip(self.bsums.chunks_exact_mut(16));
        for (b, ((values, lanes), bsums)) in per_block.enumerate() {
            self.scales[b] = q8_k_codes(values, &mut codes);
            for ((group, lane), sum) in codes.chunks_exact(16).zip(lanes).zip(bsums) {
                *lane = widen(group);
                *sum = group.iter().map(|&c| i16::from(c)).sum();
            }
        }
    }

    /// The format the vector is held in: `F32`, `Q8_0`, `Q8_1` or `Q8_K`.
    pub fn format(&self) -> GgmlType {
        self.format
    }

    /// Number of activations.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the vector holds no activations.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The values the kernels actually multiply with: code times block scale
    /// (or the f32 copy). Comparing this with the input shows the activation
    /// quantization error.
    pub fn to_f32(&self) -> Vec<f32> {
        if self.format == GgmlType::F32 {
            return self.values[..self.len].to_vec();
        }
        let block_len = self.format.block_len();
        let mut out = Vec::with_capacity(self.len);
        for (i, lane) in self.quants.iter().take(self.len / 16).enumerate() {
            let d = self.scales[i * 16 / block_len];
            out.extend(lane.to_array().iter().map(|&q| f32::from(q) * d));
        }
        out
    }

    /// The vector in ggml's byte layout for its format (`block_q8_0`,
    /// `block_q8_1`, `block_q8_K`, or little-endian f32), as
    /// [`quantize`](super::quantize) to that format would produce it.
    pub fn to_ggml_bytes(&self) -> Vec<u8> {
        let blocks = self.len / self.format.block_len();
        let mut out = Vec::with_capacity(blocks * self.format.block_bytes());
        match self.format {
            GgmlType::Q8_0 | GgmlType::Q8_1 => {
                for b in 0..blocks {
                    out.extend_from_slice(&f32_to_f16(self.scales[b]).to_le_bytes());
                    if self.format == GgmlType::Q8_1 {
                        out.extend_from_slice(&f32_to_f16(self.sums[b]).to_le_bytes());
                    }
                    push_codes(&mut out, &self.quants[2 * b..2 * b + 2]);
                }
            }
            GgmlType::Q8_K => {
                for b in 0..blocks {
                    out.extend_from_slice(&self.scales[b].to_le_bytes());
                    push_codes(&mut out, &self.quants[16 * b..16 * b + 16]);
                    for s in &self.bsums[16 * b..16 * b + 16] {
                        out.extend_from_slice(&s.to_le_bytes());
                    }
                }
            }
            _ => {
                for v in &self.values[..self.len] {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
        }
        out
    }
}

fn widen(codes: &[i8]) -> i16x16 {
    let mut lanes = [0i16; 16];
    for (lane, &c) in lanes.iter_mut().zip(codes) {
        *lane = i16::from(c);
    }
    i16x16::new(lanes)
}

fn push_codes(out: &mut Vec<u8>, lanes: &[i16x16]) {
    for lane in lanes {
        out.extend(lane.to_array().iter().map(|&q| q as i8 as u8));
    }
}

/// Rows a thread quantizes at least in a batch split over threads.
const MIN_PART_ROWS: usize = 4;

/// Row `values` of a batch quantized into `row` for weights of type
/// `for_weights`, whose activation format `format` is, with the byte
/// forms the fast kernels read.
fn quantize_row(
    row: &mut QuantizedActivations,
    values: &[f32],
    for_weights: GgmlType,
    format: GgmlType,
) {
    // The batch's checks are those of a row: this cannot fail.
    if let Err(e) = row.quantize_from(values, for_weights) {
        unreachable!("a checked batch row is quantized: {e}");
    }
    if format == GgmlType::Q8_1 && Q4_1_BYTE_PRODUCTS {
        row.fill_pair_bytes();
    }
    if format == GgmlType::Q8_0 && Q8_0_BYTE_PRODUCTS {
        row.fill_code_bytes();
    }
}

/// `T` activation rows of one length, each quantized as
/// [`QuantizedActivations`] quantizes it, for
/// [`QMatrix::matmul`](super::QMatrix::matmul): the rows of a chunk of
/// prompt positions, quantized once and multiplied with every weight matrix
/// that takes them.
///
/// Row `t` is exactly what [`QuantizedActivations::quantize_from`] makes of
/// row `t` of the input (see [`row`](Self::row)).
///
/// The buffers are reused: quantizing a batch with no more rows than any
/// before, each no longer than any before, does not allocate.
#[derive(Debug, Clone)]
pub struct QuantizedBatch {
    format: GgmlType,
    cols: usize,
    /// Number of rows in use; `rows` may hold more, kept for their buffers.
    len: usize,
    pub(super) rows: Vec<QuantizedActivations>,
}

impl Default for QuantizedBatch {
    fn default() -> Self {
        Self::new()
    }
}

impl QuantizedBatch {
    /// An empty F32 batch of no rows; nothing is allocated until the first
    /// [`quantize_from`](Self::quantize_from).
    pub fn new() -> Self {
        Self {
            format: GgmlType::F32,
            cols: 0,
            len: 0,
            rows: Vec::new(),
        }
    }

    /// Quantizes the row-major `T × cols` values `x` (`T = x.len() / cols`)
    /// for a matrix whose weights have type `for_weights`, row by row in
    /// the format given by [`activation_type`], replacing the previous
    /// contents. An empty `x` makes a batch of no rows.
    ///
    /// # Errors
    /// [`QuantError::Unsupported`] when there is no kernel for
    /// `for_weights`, [`QuantError::NotWholeBlocks`] when `cols` is not a
    /// whole number of activation blocks (32 or 256 elements), and
    /// [`QuantError::NotWholeRows`] when `cols` is zero or `x.len()` is not a
    /// multiple of it. The previous contents are kept.
    pub fn quantize_from(
        &mut self,
        x: &[f32],
        cols: usize,
        for_weights: GgmlType,
    ) -> Result<(), QuantError> {
        let (format, len) = Self::check(x, cols, for_weights)?;
        if self.rows.len() < len {
            self.rows.resize_with(len, QuantizedActivations::new);
        }
        for (row, values) in self.rows.iter_mut().zip(x.chunks_exact(cols)) {
            quantize_row(row, values, for_weights, format);
        }
        self.format = format;
        self.cols = cols;
        self.len = len;
        Ok(())
    }

    /// [`quantize_from`](Self::quantize_from) on the threads of `pool`,
    /// parts of the rows each: every row is quantized as on one thread.
    ///
    /// # Errors
    /// As [`quantize_from`](Self::quantize_from).
    pub fn quantize_from_on(
        &mut self,
        pool: &Pool,
        x: &[f32],
        cols: usize,
        for_weights: GgmlType,
    ) -> Result<(), QuantError> {
        let (format, len) = Self::check(x, cols, for_weights)?;
        let parts = pool.parts_for(len, MIN_PART_ROWS);
        if parts <= 1 {
            return self.quantize_from(x, cols, for_weights);
        }
        if self.rows.len() < len {
            self.rows.resize_with(len, QuantizedActivations::new);
        }
        let rows = Out::new(&mut self.rows[..len]);
        pool.run(parts, &|k| {
            let r = part(len, parts, k);
            // SAFETY: the parts' rows are disjoint.
            let rows = unsafe { rows.range(r.clone()) };
            let values = x[r.start * cols..r.end * cols].chunks_exact(cols);
            for (row, values) in rows.iter_mut().zip(values) {
                quantize_row(row, values, for_weights, format);
            }
        });
        self.format = format;
        self.cols = cols;
        self.len = len;
        Ok(())
    }

    /// The activation format for `for_weights` and the number of rows of
    /// `cols` values in `x`, if they make a batch.
    fn check(
        x: &[f32],
        cols: usize,
        for_weights: GgmlType,
    ) -> Result<(GgmlType, usize), QuantError> {
        let format = activation_type(for_weights).ok_or(QuantError::Unsupported(for_weights))?;
        if cols % format.block_len() != 0 {
            return Err(QuantError::NotWholeBlocks {
                ty: format,
                elements: cols,
            });
        }
        if cols == 0 || x.len() % cols != 0 {
            return Err(QuantError::NotWholeRows {
                cols,
                values: x.len(),
            });
        }
        Ok((format, x.len() / cols))
    }

    /// The format the rows are held in: `F32`, `Q8_0`, `Q8_1` or `Q8_K`.
    pub fn format(&self) -> GgmlType {
        self.format
    }

    /// Number of rows `T`.
    pub fn rows(&self) -> usize {
        self.len
    }

    /// Length of each row.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Whether the batch holds no rows.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Row `t`, as [`QMatrix::matvec`](super::QMatrix::matvec) takes it.
    ///
    /// # Panics
    /// If `t >= self.rows()`.
    pub fn row(&self, t: usize) -> &QuantizedActivations {
        assert!(t < self.len, "row {t} out of range for {} rows", self.len);
        &self.rows[t]
    }

    /// The rows in use.
    pub(super) fn used(&self) -> &[QuantizedActivations] {
        &self.rows[..self.len]
    }
}
