//! The logit lens's product: the LM head times the hidden states of many
//! layers at once, where only ranks and logits to rounding are wanted.
//!
//! [`QMatrix::matmul`] must give each row bit for bit what
//! [`QMatrix::matvec`] gives it, so it scales and accumulates every block
//! of every row in the one-row kernel's order. The lens has no such
//! constraint, only that a row's logits do not depend on the rows it is
//! computed with, so that the lens of a layer is the same whether it is
//! computed alone or with the others. [`QMatrix::lens_matmul`] turns the
//! work around: for each weight block it forms the integer block sums of
//! eight activation rows, gathers them into the lanes of one vector
//! (lane `k` is row `k`'s sum) and scales and accumulates all eight rows
//! with one conversion and one or two fused multiply-adds. Each lane sees
//! the same operations whatever the other lanes hold, so a row's result
//! is the same in any group and alone.

use super::QMatrix;
use crate::dtype::GgmlType;
use crate::quant::activations::QuantizedBatch;
use crate::quant::blocks::{q8_activation_block, Q4_1_BLOCK_BYTES, Q8_0_BLOCK_BYTES};
use wide::{f32x8, u32x8, u8x16};

/// Rows of a lane group: one activation row per f32 lane.
const LANES: usize = 8;

/// Buffers of [`QMatrix::lens_matmul`], reused across calls.
#[derive(Debug, Clone, Default)]
pub struct LensScratch {
    /// The activations, `[group · blocks + block]`.
    acts: Vec<LaneBlock>,
    /// One weight row, block by block.
    weights: Vec<WeightBlock>,
    /// One weight row's f16 scales (and minimums), then as f32.
    halves: Vec<u32>,
    floats: Vec<f32>,
    /// Each lane group's results, `[row][group]`, before they go to
    /// their places in the output.
    results: Vec<f32x8>,
    /// The generic path's activations.
    batch: QuantizedBatch,
}

/// One block of a lane group's activations: eight rows' codes (zero in
/// the lanes past the last row), scales `d` (rounded to f16) and, for
/// Q8_1, block sums `d·Σq` (rounded to f16 as ggml stores them).
#[derive(Debug, Clone, Copy)]
struct LaneBlock {
    codes: [[i8; 32]; LANES],
    scale: f32x8,
    sum: f32x8,
}

/// One block of a weight row: its codes as bytes in element order (Q4_1;
/// Q8_0 codes are read in place), its scale and its minimum in every lane.
#[derive(Debug, Clone, Copy)]
struct WeightBlock {
    codes: [i8; 32],
    d: f32x8,
    m: f32x8,
}

/// Whether [`QMatrix::lens_matmul`] has a lane kernel for these weights.
fn lane_kernel(m: &QMatrix) -> bool {
    m.finite_scales && matches!(m.ty, GgmlType::Q4_1 | GgmlType::Q8_0)
}

impl QMatrix {
    /// The logit lens's product: `x` holds `T` rows of `cols` f32 values,
    /// row-major, and `out[t * rows + r]` is row `r` of the weights times
    /// row `t` of `x`, computed as the model's quantized product computes
    /// it (each row quantized to 8-bit blocks in the format of
    /// [`activation_type`](crate::quant::activation_type), exact integer
    /// block sums, scaled by both blocks' scales) but scaled and summed in
    /// another order: equal to [`matvec`](Self::matvec) of the row to
    /// rounding, and bit for bit the same for a row whatever other rows
    /// are in `x`.
    ///
    /// Q4_1 and Q8_0 weights with finite scales get a lane kernel: for
    /// each weight block it forms the integer block sums of eight
    /// activation rows, gathers them into the lanes of one vector and
    /// scales and accumulates the eight rows with one conversion and one
    /// or two fused multiply-adds; every lane goes through the same
    /// operations whatever the others hold. Other weights go through
    /// [`matmul`](Self::matmul).
    ///
    /// # Panics
    /// As [`matmul_f32`](Self::matmul_f32): if `x.len()` is not a multiple
    /// of `self.cols()` (or, for a matrix of no columns, if `x` is not
    /// empty), or `out.len()` is not `x.len() / self.cols() * self.rows()`.
    pub fn lens_matmul(&self, x: &[f32], scratch: &mut LensScratch, out: &mut [f32]) {
        if !matches!(self.batch_rows(x, out), Some(t) if t > 0) {
            return;
        }
        if !lane_kernel(self) {
            if let Err(e) = scratch.batch.quantize_from(x, self.cols, self.ty) {
                unreachable!("a QMatrix has an activation format for its type: {e}");
            }
            return self.matmul(&scratch.batch, out);
        }
        let q4_1 = self.ty == GgmlType::Q4_1;
        scratch.quantize(x, self.cols, q4_1);
        let blocks = self.cols / 32;
        let LensScratch {
            acts,
            weights,
            halves,
            floats,
            results,
            ..
        } = scratch;
        weights.resize(
            blocks,
            WeightBlock {
                codes: [0; 32],
                d: f32x8::ZERO,
                m: f32x8::ZERO,
            },
        );
        let groups = acts.len() / blocks;
        results.clear();
        results.resize(self.rows * groups, f32x8::ZERO);
        let per_block = if q4_1 { 2 } else { 1 };
        halves.resize((blocks * per_block).div_ceil(LANES) * LANES, 0);
        for (row, results) in self
            .data
            .chunks_exact(self.row_bytes)
            .zip(results.chunks_exact_mut(groups))
        {
            if q4_1 {
                for (block, h) in row
                    .chunks_exact(Q4_1_BLOCK_BYTES)
                    .zip(halves.chunks_exact_mut(2))
                {
                    h[0] = u32::from(u16::from_le_bytes([block[0], block[1]]));
                    h[1] = u32::from(u16::from_le_bytes([block[2], block[3]]));
                }
                f16_finite_all(halves, floats);
                for ((block, w), dm) in row
                    .chunks_exact(Q4_1_BLOCK_BYTES)
                    .zip(&mut *weights)
                    .zip(floats.chunks_exact(2))
                {
                    w.d = f32x8::splat(dm[0]);
                    w.m = f32x8::splat(dm[1]);
                    w.codes = q4_1_bytes(&block[4..Q4_1_BLOCK_BYTES]);
                }
            } else {
                for (block, h) in row.chunks_exact(Q8_0_BLOCK_BYTES).zip(&mut *halves) {
                    *h = u32::from(u16::from_le_bytes([block[0], block[1]]));
                }
                f16_finite_all(halves, floats);
                for (w, &d) in weights.iter_mut().zip(&*floats) {
                    w.d = f32x8::splat(d);
                }
            }
            for (group, result) in acts.chunks_exact(blocks).zip(results) {
                let mut acc = f32x8::ZERO;
                if q4_1 {
                    for (a, w) in group.iter().zip(&*weights) {
                        let s = f32x8::from_i32x8(lanes::unsigned(&w.codes, &a.codes));
                        acc = s.mul_add(w.d * a.scale, acc);
                        acc = w.m.mul_add(a.sum, acc);
                    }
                } else {
                    let codes = row
                        .chunks_exact(Q8_0_BLOCK_BYTES)
                        .map(|b| bytes_i8(&b[2..Q8_0_BLOCK_BYTES]));
                    for ((a, w), codes) in group.iter().zip(&*weights).zip(codes) {
                        let s = f32x8::from_i32x8(lanes::signed(codes, &a.codes));
                        acc = s.mul_add(w.d * a.scale, acc);
                    }
                }
                *result = acc;
            }
        }
        // Lane k of group g, weight row r, to out[(8g + k) · rows + r].
        for (g, out) in out.chunks_mut(LANES * self.rows).enumerate() {
            for (k, out) in out.chunks_exact_mut(self.rows).enumerate() {
                for (o, result) in out.iter_mut().zip(results.iter().skip(g).step_by(groups)) {
                    *o = result.as_array()[k];
                }
            }
        }
    }
}

impl LensScratch {
    /// An empty scratch; buffers grow on first use.
    pub fn new() -> Self {
        Self::default()
    }

    /// Quantizes the `T` rows of `x` to 8-bit blocks in lane order, each
    /// block as the model's products quantize it (the one function both
    /// use): codes `round(x / d)` with `d = amax / 127`, `d` rounded to
    /// f16, and for Q8_1 the block sums `f16(Σq · d)`.
    fn quantize(&mut self, x: &[f32], cols: usize, with_sums: bool) {
        let t = x.len() / cols;
        let blocks = cols / 32;
        let groups = t.div_ceil(LANES);
        self.acts.clear();
        self.acts.resize(
            groups * blocks,
            LaneBlock {
                codes: [[0; 32]; LANES],
                scale: f32x8::ZERO,
                sum: f32x8::ZERO,
            },
        );
        let mut d = [0f32; LANES];
        let mut s = [0f32; LANES];
        for (g, group) in self.acts.chunks_exact_mut(blocks).enumerate() {
            let rows = LANES.min(t - g * LANES);
            for (b, block) in group.iter_mut().enumerate() {
                d.fill(0.0);
                s.fill(0.0);
                for k in 0..rows {
                    let at = (g * LANES + k) * cols + b * 32;
                    (d[k], s[k]) =
                        q8_activation_block(&x[at..at + 32], &mut block.codes[k], with_sums);
                }
                block.scale = f32x8::new(d);
                block.sum = f32x8::new(s);
            }
        }
    }
}

/// Each of `halves` (f16 bits, a multiple of eight of them) as f32 into
/// `floats`, eight at a time, for finite f16 values only (the lane kernel
/// runs only on matrices whose scales are all finite): the magnitude's
/// bits moved into an f32's place and scaled by 2^112, which is exact for
/// normal and subnormal values alike, then the sign.
fn f16_finite_all(halves: &[u32], floats: &mut Vec<f32>) {
    floats.clear();
    for h in halves.chunks_exact(LANES) {
        let h = u32x8::new(h.try_into().expect("chunks of eight"));
        let bits: f32x8 = wide::bytemuck::cast((h & u32x8::splat(0x7fff)) << 13);
        let magnitude = bits * f32x8::splat(f32::from_bits(0x7780_0000));
        let sign: f32x8 = wide::bytemuck::cast((h & u32x8::splat(0x8000)) << 16);
        floats.extend_from_slice(&(magnitude | sign).to_array());
    }
}

/// 32 bytes as the signed codes they hold.
#[inline(always)]
fn bytes_i8(bytes: &[u8]) -> &[i8; 32] {
    let bytes: &[u8; 32] = bytes.try_into().expect("a Q8_0 block holds 32 codes");
    wide::bytemuck::cast_ref(bytes)
}

/// A Q4_1 block's 32 weights as unsigned bytes 0–15, in element order:
/// the low nibbles of its 16 bytes are elements 0–15, the high ones 16–31.
#[inline(always)]
fn q4_1_bytes(qs: &[u8]) -> [i8; 32] {
    let qs: &[u8; 16] = qs.try_into().expect("a Q4_1 block holds 16 code bytes");
    let v = u8x16::new(*qs);
    let low = v & u8x16::splat(0x0f);
    let high: u8x16 = wide::bytemuck::cast(wide::bytemuck::cast::<_, wide::u16x8>(v) >> 4);
    let high = high & u8x16::splat(0x0f);
    wide::bytemuck::cast([low, high])
}

#[cfg(all(
    any(target_arch = "x86", target_arch = "x86_64"),
    target_feature = "avx2"
))]
mod lanes {
    use safe_arch::{
        abs_i8_m256i, add_horizontal_i16_m256i as hadd16, add_horizontal_i32_m256i as hadd,
        add_i32_m256i, cast_to_m128i_from_m256i, convert_to_i32_m256i_from_i16_m128i as widen,
        extract_m128i_m256i, load_unaligned_m256i, m256i, mul_i16_horizontal_add_m256i as madd,
        mul_u8i8_add_horizontal_saturating_m256i as maddubs, permute2z_m256i, set_splat_i16_m256i,
        sign_apply_i8_m256i,
    };
    use wide::i32x8;

    /// Lane `k`: the sum of the eight i32 lanes of `q[k]`.
    #[inline(always)]
    fn gather(q: [m256i; 8]) -> i32x8 {
        let t0 = hadd(q[0], q[1]);
        let t1 = hadd(q[2], q[3]);
        let t2 = hadd(q[4], q[5]);
        let t3 = hadd(q[6], q[7]);
        let u0 = hadd(t0, t1);
        let u1 = hadd(t2, t3);
        let low = permute2z_m256i::<0x20>(u0, u1);
        let high = permute2z_m256i::<0x31>(u0, u1);
        wide::bytemuck::cast(add_i32_m256i(low, high))
    }

    /// Lane `k`: `Σ w[i] · a[k][i]`, `w` unsigned bytes 0–15 (Q4_1).
    ///
    /// The byte products go into i16 lanes (two products each, at most
    /// 2 · 15 · 127 in magnitude) and are added in i16 by three rounds of
    /// pairwise additions, which leave in each 128-bit half lane `k` the
    /// sum of row `k`'s 16 products of that half: at most 16 · 15 · 127 =
    /// 30,480 in magnitude, no overflow. The halves are then widened to
    /// i32 and added.
    #[inline(always)]
    pub(super) fn unsigned(w: &[i8; 32], a: &[[i8; 32]; 8]) -> i32x8 {
        let w = load_unaligned_m256i(w);
        let p: [m256i; 8] = std::array::from_fn(|k| maddubs(w, load_unaligned_m256i(&a[k])));
        let t0 = hadd16(p[0], p[1]);
        let t1 = hadd16(p[2], p[3]);
        let t2 = hadd16(p[4], p[5]);
        let t3 = hadd16(p[6], p[7]);
        let v = hadd16(hadd16(t0, t1), hadd16(t2, t3));
        let low = widen(cast_to_m128i_from_m256i(v));
        let high = widen(extract_m128i_m256i::<1>(v));
        wide::bytemuck::cast(add_i32_m256i(low, high))
    }

    /// Lane `k`: `Σ w[i] · a[k][i]`, `w` signed bytes: `|w|` times `a`
    /// with `w`'s sign.
    #[inline(always)]
    pub(super) fn signed(w: &[i8; 32], a: &[[i8; 32]; 8]) -> i32x8 {
        let w = load_unaligned_m256i(w);
        let abs = abs_i8_m256i(w);
        let ones = set_splat_i16_m256i(1);
        gather(std::array::from_fn(|k| {
            let a = sign_apply_i8_m256i(load_unaligned_m256i(&a[k]), w);
            madd(maddubs(abs, a), ones)
        }))
    }
}

#[cfg(not(all(
    any(target_arch = "x86", target_arch = "x86_64"),
    target_feature = "avx2"
)))]
mod lanes {
    use wide::i32x8;

    /// Lane `k`: `Σ w[i] · a[k][i]`.
    #[inline(always)]
    fn sums(w: &[i8; 32], a: &[[i8; 32]; 8], unsigned: bool) -> i32x8 {
        let weight = |i: usize| {
            if unsigned {
                i32::from(w[i] as u8)
            } else {
                i32::from(w[i])
            }
        };
        i32x8::new(std::array::from_fn(|k| {
            (0..32).map(|i| weight(i) * i32::from(a[k][i])).sum()
        }))
    }

    #[inline(always)]
    pub(super) fn unsigned(w: &[i8; 32], a: &[[i8; 32]; 8]) -> i32x8 {
        sums(w, a, true)
    }

    #[inline(always)]
    pub(super) fn signed(w: &[i8; 32], a: &[[i8; 32]; 8]) -> i32x8 {
        sums(w, a, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::float::f16_to_f32;
    use crate::quant::QuantizedActivations;

    /// A deterministic pseudo-random sequence in `[-1, 1)`.
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn lens_rows_equal_alone_and_together_and_the_model_product_to_rounding() {
        for ty in [GgmlType::Q4_1, GgmlType::Q8_0, GgmlType::Q4_0] {
            for (rows, cols) in [(37, 576), (9, 64), (3, 32)] {
                let mut w = values(rows * cols, 7);
                // an outlier column, as hidden states have
                w.iter_mut().step_by(cols).for_each(|v| *v *= 30.0);
                let m = QMatrix::from_f32(ty, rows, cols, &w).unwrap();
                for t in [1usize, 7, 8, 9, 29, 30] {
                    let mut x = values(t * cols, 11 + t as u64);
                    x.iter_mut().step_by(cols).for_each(|v| *v *= 100.0);
                    let mut scratch = LensScratch::new();
                    let mut all = vec![0f32; t * rows];
                    m.lens_matmul(&x, &mut scratch, &mut all);
                    let mut one = vec![0f32; rows];
                    let mut q = QuantizedActivations::new();
                    let mut exact = vec![0f32; rows];
                    for row in 0..t {
                        let xr = &x[row * cols..(row + 1) * cols];
                        m.lens_matmul(xr, &mut scratch, &mut one);
                        let got = &all[row * rows..(row + 1) * rows];
                        for (a, b) in got.iter().zip(&one) {
                            assert_eq!(a.to_bits(), b.to_bits(), "{ty} t={t} row {row}");
                        }
                        q.quantize_from(xr, ty).unwrap();
                        m.matvec(&q, &mut exact);
                        let scale = exact.iter().fold(0f32, |a, v| a.max(v.abs()));
                        for (a, b) in got.iter().zip(&exact) {
                            assert!(
                                (a - b).abs() <= 1e-5 * scale,
                                "{ty} t={t} row {row}: {a} against {b}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// The largest block sums the lane kernels meet: every Q4_1 nibble 15
    /// (and Q8_0 code -128 or 127) against activation codes all ±127, in
    /// every lane. The sums are exact, so the products equal the model's
    /// to rounding.
    #[test]
    fn extreme_codes_do_not_overflow() {
        let (rows, cols) = (3, 96);
        for ty in [GgmlType::Q4_1, GgmlType::Q8_0] {
            let bb = ty.bytes_for(32).unwrap();
            let mut data = vec![0u8; rows * cols / 32 * bb];
            for (i, block) in data.chunks_exact_mut(bb).enumerate() {
                block[..2].copy_from_slice(&0x3c00u16.to_le_bytes()); // d = 1
                if ty == GgmlType::Q4_1 {
                    block[2..4].copy_from_slice(&0xbc00u16.to_le_bytes()); // m = -1
                    block[4..].fill(0xff);
                } else {
                    block[2..].fill(if i % 2 == 0 { 0x80 } else { 0x7f });
                }
            }
            let m = QMatrix::from_bytes(ty, rows, cols, data).unwrap();
            for sign in [1.0f32, -1.0] {
                let x = vec![sign; 9 * cols];
                let mut out = vec![0f32; 9 * rows];
                m.lens_matmul(&x, &mut LensScratch::new(), &mut out);
                let mut q = QuantizedActivations::new();
                let mut exact = vec![0f32; rows];
                for (t, got) in out.chunks_exact(rows).enumerate() {
                    q.quantize_from(&x[t * cols..(t + 1) * cols], ty).unwrap();
                    m.matvec(&q, &mut exact);
                    for (a, b) in got.iter().zip(&exact) {
                        assert!(
                            (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                            "{ty} {sign}: {a} {b}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn finite_f16_decoding_is_exact() {
        let finite: Vec<u32> = (0..=u16::MAX)
            .filter(|&h| f16_to_f32(h).is_finite())
            .map(u32::from)
            .collect();
        let whole = finite.len() / LANES * LANES;
        let mut floats = Vec::new();
        f16_finite_all(&finite[..whole], &mut floats);
        assert_eq!(floats.len(), whole);
        for (&h, v) in finite.iter().zip(&floats) {
            assert_eq!(v.to_bits(), f16_to_f32(h as u16).to_bits(), "{h:#06x}");
        }
    }

    #[test]
    fn q4_1_bytes_are_the_nibbles_in_element_order() {
        let qs: Vec<u8> = (0..16u8).map(|j| j * 17 + 3).collect();
        let w = q4_1_bytes(&qs);
        for j in 0..16 {
            assert_eq!(w[j] as u8, qs[j] & 15);
            assert_eq!(w[j + 16] as u8, qs[j] >> 4);
        }
    }

    #[test]
    fn no_rows_and_no_columns_give_empty_and_zero_products() {
        let m = QMatrix::from_f32(GgmlType::Q4_1, 4, 64, &values(4 * 64, 1)).unwrap();
        let mut out: Vec<f32> = Vec::new();
        m.lens_matmul(&[], &mut LensScratch::new(), &mut out);
        let empty = QMatrix::from_f32(GgmlType::Q8_0, 3, 0, &[]).unwrap();
        let mut out = vec![1f32; 6];
        empty.lens_matmul(&[], &mut LensScratch::new(), &mut out);
        assert_eq!(out, vec![0.0; 6]);
    }

    #[test]
    fn lens_of_non_finite_rows_is_non_finite_and_others_untouched() {
        let (rows, cols) = (5, 64);
        let m = QMatrix::from_f32(GgmlType::Q8_0, rows, cols, &values(rows * cols, 3)).unwrap();
        let mut x = values(3 * cols, 5);
        x[cols + 4] = f32::NAN;
        let mut out = vec![0f32; 3 * rows];
        m.lens_matmul(&x, &mut LensScratch::new(), &mut out);
        assert!(out[rows..2 * rows].iter().all(|v| v.is_nan()));
        assert!(out[..rows]
            .iter()
            .chain(&out[2 * rows..])
            .all(|v| v.is_finite()));
    }
}
