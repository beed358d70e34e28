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
use crate::quant::blocks::q8_codes;
use crate::quant::float::{f16_to_f32, f32_to_f16};
use wide::{f32x8, i32x8};

/// Rows of a lane group: one activation row per f32 lane.
const LANES: usize = 8;

/// Buffers of [`QMatrix::lens_matmul`], reused across calls.
#[derive(Debug, Clone, Default)]
pub struct LensScratch {
    /// Activation codes, `[group][block][lane]` blocks of 32 (zero in
    /// the lanes past the last row).
    codes: Vec<[i8; 32]>,
    /// Per group and block, the lanes' scales `d` (rounded to f16).
    scales: Vec<f32x8>,
    /// Per group and block, the lanes' block sums `d·Σq` (Q8_1, rounded
    /// to f16 as ggml stores them).
    sums: Vec<f32x8>,
    /// Lane accumulators of one weight row, per group.
    acc: Vec<f32x8>,
    /// The generic path's activations.
    batch: QuantizedBatch,
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
    /// [`activation_type`](crate::quant::activation_type), exact integer block sums, scaled by both
    /// blocks' scales) but scaled and summed in another order: equal to
    /// [`matvec`](Self::matvec) of the row to rounding, and bit for bit
    /// the same for a row whatever other rows are in `x`.
    ///
    /// Q4_1 and Q8_0 weights with finite scales get the lane kernel of the
    /// [module documentation](self); other weights go through
    /// [`matmul`](Self::matmul).
    ///
    /// # Panics
    /// If `x.len()` is not a multiple of `self.cols()`, or `out.len()` is
    /// not `x.len() / self.cols() * self.rows()`, or (for a matrix of no
    /// columns) `x` is not empty.
    pub fn lens_matmul(&self, x: &[f32], scratch: &mut LensScratch, out: &mut [f32]) {
        if self.cols == 0 {
            assert!(x.is_empty(), "a matrix of no columns takes no activations");
            out.fill(0.0);
            return;
        }
        assert_eq!(
            x.len() % self.cols,
            0,
            "activations must be whole rows of cols values"
        );
        let t = x.len() / self.cols;
        assert_eq!(
            Some(out.len()),
            t.checked_mul(self.rows),
            "output length must equal activation rows times matrix rows"
        );
        if !lane_kernel(self) {
            if let Err(e) = scratch.batch.quantize_from(x, self.cols, self.ty) {
                unreachable!("a QMatrix has an activation format for its type: {e}");
            }
            return self.matmul(&scratch.batch, out);
        }
        let blocks = self.cols / 32;
        let groups = t.div_ceil(LANES);
        scratch.quantize(x, self.cols, self.ty == GgmlType::Q4_1);
        scratch.acc.clear();
        scratch.acc.resize(groups, f32x8::ZERO);
        let LensScratch {
            codes,
            scales,
            sums,
            acc,
            ..
        } = scratch;
        for (r, row) in self.data.chunks_exact(self.row_bytes).enumerate() {
            acc.fill(f32x8::ZERO);
            match self.ty {
                GgmlType::Q4_1 => {
                    for (b, block) in row.chunks_exact(20).enumerate() {
                        let (d, m) = (f16_at(block, 0), f16_at(block, 2));
                        let w = q4_1_bytes(&block[4..20]);
                        for (g, acc) in acc.iter_mut().enumerate() {
                            let at = g * blocks + b;
                            let a = &codes[at * LANES..(at + 1) * LANES];
                            let s = f32x8::from_i32x8(lane_sums_unsigned(&w, a));
                            *acc = s.mul_add(f32x8::splat(d) * scales[at], *acc);
                            *acc = f32x8::splat(m).mul_add(sums[at], *acc);
                        }
                    }
                }
                _ => {
                    for (b, block) in row.chunks_exact(34).enumerate() {
                        let d = f16_at(block, 0);
                        let w: &[i8; 32] = bytemuck_i8(&block[2..34]);
                        for (g, acc) in acc.iter_mut().enumerate() {
                            let at = g * blocks + b;
                            let a = &codes[at * LANES..(at + 1) * LANES];
                            let s = f32x8::from_i32x8(lane_sums_signed(w, a));
                            *acc = s.mul_add(f32x8::splat(d) * scales[at], *acc);
                        }
                    }
                }
            }
            for (g, acc) in acc.iter().enumerate() {
                let rows_here = (t - g * LANES).min(LANES);
                for (k, &v) in acc.to_array().iter().enumerate().take(rows_here) {
                    out[(g * LANES + k) * self.rows + r] = v;
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

    /// Quantizes the `T` rows of `x` to 8-bit blocks in lane order: codes
    /// `round(x / d)` with `d = amax / 127` (as [`QuantizedBatch`] does),
    /// `d` rounded to f16, and for Q8_1 the block sums `f16(Σq · d)`.
    fn quantize(&mut self, x: &[f32], cols: usize, with_sums: bool) {
        let t = x.len() / cols;
        let blocks = cols / 32;
        let groups = t.div_ceil(LANES);
        self.codes.clear();
        self.codes.resize(groups * blocks * LANES, [0; 32]);
        self.scales.clear();
        self.scales.resize(groups * blocks, f32x8::ZERO);
        self.sums.clear();
        self.sums.resize(if with_sums { groups * blocks } else { 0 }, f32x8::ZERO);
        let mut d = vec![[0f32; LANES]; blocks];
        let mut s = vec![[0f32; LANES]; blocks];
        for g in 0..groups {
            d.iter_mut().for_each(|v| *v = [0.0; LANES]);
            s.iter_mut().for_each(|v| *v = [0.0; LANES]);
            for k in 0..LANES.min(t - g * LANES) {
                let row = &x[(g * LANES + k) * cols..(g * LANES + k + 1) * cols];
                for (b, values) in row.chunks_exact(32).enumerate() {
                    let codes = &mut self.codes[(g * blocks + b) * LANES + k];
                    let scale = q8_codes(values, codes);
                    d[b][k] = f16_to_f32(f32_to_f16(scale));
                    if with_sums {
                        let sum: i32 = codes.iter().map(|&c| i32::from(c)).sum();
                        s[b][k] = f16_to_f32(f32_to_f16(sum as f32 * scale));
                    }
                }
            }
            for b in 0..blocks {
                self.scales[g * blocks + b] = f32x8::new(d[b]);
                if with_sums {
                    self.sums[g * blocks + b] = f32x8::new(s[b]);
                }
            }
        }
    }
}

/// The little-endian f16 at `block[at..at + 2]`, as f32.
#[inline(always)]
fn f16_at(block: &[u8], at: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes([block[at], block[at + 1]]))
}

/// 32 bytes as the signed codes they hold.
#[inline(always)]
fn bytemuck_i8(bytes: &[u8]) -> &[i8; 32] {
    let bytes: &[u8; 32] = bytes.try_into().expect("a Q8_0 block holds 32 codes");
    wide::bytemuck::cast_ref(bytes)
}

/// A Q4_1 block's 32 weights as unsigned bytes 0–15, in element order:
/// the low nibbles of its 16 bytes are elements 0–15, the high ones 16–31.
#[inline(always)]
fn q4_1_bytes(qs: &[u8]) -> [i8; 32] {
    let mut w = [0i8; 32];
    for (j, &b) in qs.iter().enumerate() {
        w[j] = (b & 0x0f) as i8;
        w[j + 16] = (b >> 4) as i8;
    }
    w
}

#[cfg(all(
    any(target_arch = "x86", target_arch = "x86_64"),
    target_feature = "avx2"
))]
mod lanes {
    use safe_arch::{
        abs_i8_m256i, add_horizontal_i32_m256i as hadd, add_i32_m256i, load_unaligned_m256i,
        m256i, mul_i16_horizontal_add_m256i as madd,
        mul_u8i8_add_horizontal_saturating_m256i as maddubs, permute2z_m256i,
        set_splat_i16_m256i, sign_apply_i8_m256i,
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

    /// Lane `k`: `Σ w[i] · a[k][i]`, `w` unsigned bytes (0–127 or 0–15).
    #[inline(always)]
    pub(super) fn unsigned(w: &[i8; 32], a: &[[i8; 32]]) -> i32x8 {
        let w = load_unaligned_m256i(w);
        let ones = set_splat_i16_m256i(1);
        gather(std::array::from_fn(|k| {
            madd(maddubs(w, load_unaligned_m256i(&a[k])), ones)
        }))
    }

    /// Lane `k`: `Σ w[i] · a[k][i]`, `w` signed bytes: `|w|` times `a`
    /// with `w`'s sign.
    #[inline(always)]
    pub(super) fn signed(w: &[i8; 32], a: &[[i8; 32]]) -> i32x8 {
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
    fn sums(w: &[i8; 32], a: &[[i8; 32]], unsigned: bool) -> i32x8 {
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
    pub(super) fn unsigned(w: &[i8; 32], a: &[[i8; 32]]) -> i32x8 {
        sums(w, a, true)
    }

    #[inline(always)]
    pub(super) fn signed(w: &[i8; 32], a: &[[i8; 32]]) -> i32x8 {
        sums(w, a, false)
    }
}

/// Lane `k`: the integer sum of unsigned weight bytes `w` with row `k`'s
/// codes of the block.
#[inline(always)]
fn lane_sums_unsigned(w: &[i8; 32], a: &[[i8; 32]]) -> i32x8 {
    lanes::unsigned(w, a)
}

/// Lane `k`: the integer sum of signed weight codes `w` with row `k`'s
/// codes of the block.
#[inline(always)]
fn lane_sums_signed(w: &[i8; 32], a: &[[i8; 32]]) -> i32x8 {
    lanes::signed(w, a)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::QuantizedActivations;

    /// A deterministic pseudo-random sequence in `[-1, 1)`.
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
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

    #[test]
    fn lens_of_non_finite_rows_is_non_finite_and_others_untouched() {
        let (rows, cols) = (5, 64);
        let m = QMatrix::from_f32(GgmlType::Q8_0, rows, cols, &values(rows * cols, 3)).unwrap();
        let mut x = values(3 * cols, 5);
        x[cols + 4] = f32::NAN;
        let mut out = vec![0f32; 3 * rows];
        m.lens_matmul(&x, &mut LensScratch::new(), &mut out);
        assert!(out[rows..2 * rows].iter().all(|v| v.is_nan()));
        assert!(out[..rows].iter().chain(&out[2 * rows..]).all(|v| v.is_finite()));
    }
}
