//! Scalar block codecs: ggml's block layouts decoded to `f32` and `f32`
//! encoded the way ggml's reference quantizers (`quantize_row_*_ref`) do.
//!
//! Every function here works on exactly one block: the byte slice is
//! `block_bytes()` long and the value slice `block_len()` long.

use super::float::{f16_to_f32, f32_to_f16};
use crate::dtype::GgmlType;

/// Bytes of a Q4_0 block: the f16 scale, then 16 bytes of nibbles.
pub(super) const Q4_0_BLOCK_BYTES: usize = GgmlType::Q4_0.block_bytes();
/// Bytes of a Q4_1 block: the f16 scale and minimum, then 16 bytes of
/// nibbles.
pub(super) const Q4_1_BLOCK_BYTES: usize = GgmlType::Q4_1.block_bytes();
/// Bytes of a Q5_0 block: the f16 scale, the 32 fifth bits, then 16 bytes
/// of nibbles.
pub(super) const Q5_0_BLOCK_BYTES: usize = GgmlType::Q5_0.block_bytes();
/// Bytes of a Q5_1 block: the f16 scale and minimum, the 32 fifth bits,
/// then 16 bytes of nibbles.
pub(super) const Q5_1_BLOCK_BYTES: usize = GgmlType::Q5_1.block_bytes();
/// Bytes of a Q8_0 block: the f16 scale, then 32 code bytes.
pub(super) const Q8_0_BLOCK_BYTES: usize = GgmlType::Q8_0.block_bytes();

/// Reads the little-endian f16 at `at` as f32.
#[inline(always)]
pub(super) fn f16_at(block: &[u8], at: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes([block[at], block[at + 1]]))
}

#[inline(always)]
fn put_f16(block: &mut [u8], at: usize, value: f32) {
    block[at..at + 2].copy_from_slice(&f32_to_f16(value).to_le_bytes());
}

/// The 32 high bits of a Q5 block, bit `j` belonging to element `j`.
#[inline(always)]
pub(super) fn u32_at(block: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([block[at], block[at + 1], block[at + 2], block[at + 3]])
}

// Q4_0 / Q4_1 / Q5_x: element j < 16 is the low nibble of byte j, element
// j >= 16 the high nibble of byte j - 16.

pub(super) fn dequantize_q4_0(block: &[u8], out: &mut [f32]) {
    let d = f16_at(block, 0);
    let (low, high) = out.split_at_mut(16);
    for ((byte, lo), hi) in block[2..18].iter().zip(low).zip(high) {
        *lo = d * (f32::from(byte & 0x0f) - 8.0);
        *hi = d * (f32::from(byte >> 4) - 8.0);
    }
}

pub(super) fn dequantize_q4_1(block: &[u8], out: &mut [f32]) {
    let d = f16_at(block, 0);
    let m = f16_at(block, 2);
    let (low, high) = out.split_at_mut(16);
    for ((byte, lo), hi) in block[4..20].iter().zip(low).zip(high) {
        *lo = d * f32::from(byte & 0x0f) + m;
        *hi = d * f32::from(byte >> 4) + m;
    }
}

/// The 5-bit codes of a Q5 block: nibbles as in Q4, bit `j` of `qh` on top
/// of element `j`.
#[inline(always)]
fn q5_codes(qs: &[u8], qh: u32) -> [u8; 32] {
    let mut codes = [0u8; 32];
    let (low, high) = codes.split_at_mut(16);
    for (j, ((byte, lo), hi)) in qs.iter().zip(low).zip(high).enumerate() {
        *lo = (byte & 0x0f) | ((((qh >> j) & 1) as u8) << 4);
        *hi = (byte >> 4) | ((((qh >> (j + 16)) & 1) as u8) << 4);
    }
    codes
}

pub(super) fn dequantize_q5_0(block: &[u8], out: &mut [f32]) {
    let d = f16_at(block, 0);
    let codes = q5_codes(&block[6..22], u32_at(block, 2));
    for (o, q) in out.iter_mut().zip(codes) {
        *o = d * (f32::from(q) - 16.0);
    }
}

pub(super) fn dequantize_q5_1(block: &[u8], out: &mut [f32]) {
    let d = f16_at(block, 0);
    let m = f16_at(block, 2);
    let codes = q5_codes(&block[8..24], u32_at(block, 4));
    for (o, q) in out.iter_mut().zip(codes) {
        *o = d * f32::from(q) + m;
    }
}

pub(super) fn dequantize_q8_0(block: &[u8], out: &mut [f32]) {
    let d = f16_at(block, 0);
    for (q, o) in block[2..34].iter().zip(out) {
        *o = f32::from(*q as i8) * d;
    }
}

pub(super) fn dequantize_q8_1(block: &[u8], out: &mut [f32]) {
    let d = f16_at(block, 0);
    for (q, o) in block[4..36].iter().zip(out) {
        *o = f32::from(*q as i8) * d;
    }
}

pub(super) fn dequantize_q8_k(block: &[u8], out: &mut [f32]) {
    let d = f32::from_le_bytes([block[0], block[1], block[2], block[3]]);
    for (q, o) in block[4..260].iter().zip(out) {
        *o = f32::from(*q as i8) * d;
    }
}

/// Scale and minimum of sub-block `j` (0..8) of a Q4_K/Q5_K super-block: six
/// bits each, packed into 12 bytes (ggml's `get_scale_min_k4`).
#[inline(always)]
pub(super) fn k4_scale_min(scales: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (scales[j] & 63, scales[j + 4] & 63)
    } else {
        (
            (scales[j + 4] & 0x0f) | ((scales[j - 4] >> 6) << 4),
            (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4),
        )
    }
}

/// Q4_K: f16 `d`, f16 `dmin`, 12 bytes of scales/minimums, 128 bytes of
/// nibbles. Each 64 elements use 32 bytes: low nibbles first, then high.
pub(super) fn dequantize_q4_k(block: &[u8], out: &mut [f32]) {
    let d = f16_at(block, 0);
    let dmin = f16_at(block, 2);
    let scales = &block[4..16];
    for (pair, (qs, out)) in block[16..144]
        .chunks_exact(32)
        .zip(out.chunks_exact_mut(64))
        .enumerate()
    {
        let (sc_lo, m_lo) = k4_scale_min(scales, 2 * pair);
        let (sc_hi, m_hi) = k4_scale_min(scales, 2 * pair + 1);
        let (d_lo, m_lo) = (d * f32::from(sc_lo), dmin * f32::from(m_lo));
        let (d_hi, m_hi) = (d * f32::from(sc_hi), dmin * f32::from(m_hi));
        let (low, high) = out.split_at_mut(32);
        for ((q, lo), hi) in qs.iter().zip(low).zip(high) {
            *lo = d_lo * f32::from(q & 0x0f) - m_lo;
            *hi = d_hi * f32::from(q >> 4) - m_hi;
        }
    }
}

/// Q6_K: 128 bytes of low nibbles, 64 bytes of 2-bit high parts, 16 signed
/// scales (one per 16 elements), f16 `d`. Values are stored minus 32.
pub(super) fn dequantize_q6_k(block: &[u8], out: &mut [f32]) {
    let d = f16_at(block, 208);
    for half in 0..2 {
        let ql = &block[64 * half..64 * half + 64];
        let qh = &block[128 + 32 * half..128 + 32 * half + 32];
        let scales = &block[192 + 8 * half..192 + 8 * half + 8];
        let out = &mut out[128 * half..128 * half + 128];
        for l in 0..32 {
            let group = l / 16;
            let h = qh[l];
            let q = [
                (ql[l] & 0x0f) | ((h & 3) << 4),
                (ql[l + 32] & 0x0f) | (((h >> 2) & 3) << 4),
                (ql[l] >> 4) | (((h >> 4) & 3) << 4),
                (ql[l + 32] >> 4) | (((h >> 6) & 3) << 4),
            ];
            for (quarter, q) in q.into_iter().enumerate() {
                let scale = f32::from(scales[group + 2 * quarter] as i8);
                out[l + 32 * quarter] = d * scale * f32::from(i16::from(q) - 32);
            }
        }
    }
}

/// The first value of largest magnitude (ggml keeps the sign of the extreme).
fn signed_absmax(values: &[f32]) -> f32 {
    let mut amax = 0.0f32;
    let mut max = 0.0f32;
    for &v in values {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    max
}

fn min_max(values: &[f32]) -> (f32, f32) {
    let mut min = f32::MAX;
    let mut max = -f32::MAX;
    for &v in values {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    (min, max)
}

#[inline(always)]
fn inverse(d: f32) -> f32 {
    if d != 0.0 {
        1.0 / d
    } else {
        0.0
    }
}

/// Packs 32 codes of up to 4 bits: code j < 16 to the low nibble of byte j.
fn pack_nibbles(codes: &[u8; 32], qs: &mut [u8]) {
    for (j, byte) in qs.iter_mut().enumerate() {
        *byte = (codes[j] & 0x0f) | ((codes[j + 16] & 0x0f) << 4);
    }
}

fn pack_fifth_bits(codes: &[u8; 32]) -> [u8; 4] {
    let mut qh = 0u32;
    for (j, &c) in codes.iter().enumerate() {
        qh |= u32::from((c >> 4) & 1) << j;
    }
    qh.to_le_bytes()
}

// The float-to-integer conversions below truncate toward zero as ggml's C
// casts do; the `+ 0.5` / `+ 8.5` offsets turn that into rounding.

pub(super) fn quantize_q4_0(values: &[f32], block: &mut [u8]) {
    let d = signed_absmax(values) / -8.0;
    let id = inverse(d);
    let codes: [u8; 32] = std::array::from_fn(|j| ((values[j] * id + 8.5) as i8).min(15) as u8);
    put_f16(block, 0, d);
    pack_nibbles(&codes, &mut block[2..18]);
}

pub(super) fn quantize_q4_1(values: &[f32], block: &mut [u8]) {
    let (min, max) = min_max(values);
    let d = (max - min) / 15.0;
    let id = inverse(d);
    let codes: [u8; 32] =
        std::array::from_fn(|j| (((values[j] - min) * id + 0.5) as i8).min(15) as u8);
    put_f16(block, 0, d);
    put_f16(block, 2, min);
    pack_nibbles(&codes, &mut block[4..20]);
}

pub(super) fn quantize_q5_0(values: &[f32], block: &mut [u8]) {
    let d = signed_absmax(values) / -16.0;
    let id = inverse(d);
    let codes: [u8; 32] = std::array::from_fn(|j| ((values[j] * id + 16.5) as i8).min(31) as u8);
    put_f16(block, 0, d);
    block[2..6].copy_from_slice(&pack_fifth_bits(&codes));
    pack_nibbles(&codes, &mut block[6..22]);
}

pub(super) fn quantize_q5_1(values: &[f32], block: &mut [u8]) {
    let (min, max) = min_max(values);
    let d = (max - min) / 31.0;
    let id = inverse(d);
    let codes: [u8; 32] = std::array::from_fn(|j| (((values[j] - min) * id + 0.5) as u8).min(31));
    put_f16(block, 0, d);
    put_f16(block, 2, min);
    block[4..8].copy_from_slice(&pack_fifth_bits(&codes));
    pack_nibbles(&codes, &mut block[8..24]);
}

/// Largest magnitude of `values`; a NaN anywhere makes the result NaN so that
/// a block with a NaN cannot pass for a finite one.
#[inline(always)]
fn absmax_nan_sticky(values: &[f32]) -> f32 {
    let mut amax = 0.0f32;
    for &v in values {
        let a = v.abs();
        if a > amax || a.is_nan() {
            amax = a;
        }
        if amax.is_nan() {
            return amax;
        }
    }
    amax
}

/// Q8_0/Q8_1 codes: `d = amax / 127`, codes `round(x / d)` (ties away from
/// zero). Returns `d` before its rounding to f16.
#[inline(always)]
pub(super) fn q8_codes(values: &[f32], codes: &mut [i8]) -> f32 {
    let d = absmax_nan_sticky(values) / 127.0;
    let id = inverse(d);
    for (c, &v) in codes.iter_mut().zip(values) {
        *c = round_half_away(v * id) as i8;
    }
    d
}

/// An 8-bit activation block as the products read it: [`q8_codes`] into
/// `codes`, then the scale `d` rounded to f16 and, for Q8_1, the block sum
/// `d · Σq` rounded to f16 as ggml stores it (from the unrounded `d`);
/// returns both as f32 (the sum is 0 when `with_sum` is false).
#[inline(always)]
pub(super) fn q8_activation_block(values: &[f32], codes: &mut [i8], with_sum: bool) -> (f32, f32) {
    let d = q8_codes(values, codes);
    let sum = if with_sum {
        let sum: i32 = codes.iter().map(|&c| i32::from(c)).sum();
        f16_to_f32(f32_to_f16(sum as f32 * d))
    } else {
        0.0
    };
    (f16_to_f32(f32_to_f16(d)), sum)
}

/// C's `roundf` (ties away from zero) for |y| < 2^23, without a libm call;
/// NaN gives 0.
#[inline(always)]
fn round_half_away(y: f32) -> i32 {
    let truncated = y as i32;
    // Exact: both are integers or y's fraction below 2^23.
    let fraction = y - truncated as f32;
    truncated
        .saturating_add(i32::from(fraction >= 0.5))
        .saturating_sub(i32::from(fraction <= -0.5))
}

/// ggml's `nearest_int`: round to nearest, ties to even, for |y| < 2^22, by
/// adding 1.5 * 2^23 and reading the mantissa bits; NaN gives 0.
#[inline(always)]
pub(super) fn nearest_int(y: f32) -> i32 {
    let shifted = y + 12_582_912.0;
    (shifted.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

pub(super) fn quantize_q8_0(values: &[f32], block: &mut [u8]) {
    let mut codes = [0i8; 32];
    let d = q8_codes(values, &mut codes);
    put_f16(block, 0, d);
    for (b, c) in block[2..34].iter_mut().zip(codes) {
        *b = c as u8;
    }
}

pub(super) fn quantize_q8_1(values: &[f32], block: &mut [u8]) {
    let mut codes = [0i8; 32];
    let d = q8_codes(values, &mut codes);
    let sum: i32 = codes.iter().map(|&c| i32::from(c)).sum();
    put_f16(block, 0, d);
    put_f16(block, 2, sum as f32 * d);
    for (b, c) in block[4..36].iter_mut().zip(codes) {
        *b = c as u8;
    }
}

/// Q8_K codes: scale chosen from the signed extreme so that it maps to -127,
/// codes rounded to nearest with ties to even and capped at 127. Returns the
/// f32 scale `d` (Q8_K keeps it unrounded).
#[inline(always)]
pub(super) fn q8_k_codes(values: &[f32], codes: &mut [i8]) -> f32 {
    let mut amax = 0.0f32;
    let mut max = 0.0f32;
    for &v in values {
        let a = v.abs();
        if a > amax || a.is_nan() {
            amax = a;
            max = v;
        }
        if amax.is_nan() {
            break;
        }
    }
    if amax == 0.0 {
        codes.fill(0);
        return 0.0;
    }
    let iscale = -127.0 / max;
    for (c, &v) in codes.iter_mut().zip(values) {
        *c = nearest_int(iscale * v).min(127) as i8;
    }
    1.0 / iscale
}

pub(super) fn quantize_q8_k(values: &[f32], block: &mut [u8]) {
    let mut codes = [0i8; 256];
    let d = q8_k_codes(values, &mut codes);
    block[0..4].copy_from_slice(&d.to_le_bytes());
    for (b, c) in block[4..260].iter_mut().zip(codes) {
        *b = c as u8;
    }
    for (group, sum) in codes
        .chunks_exact(16)
        .zip(block[260..292].chunks_exact_mut(2))
    {
        let s: i16 = group.iter().map(|&c| i16::from(c)).sum();
        sum.copy_from_slice(&s.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_0_element_order_is_low_nibbles_then_high_nibbles() {
        let mut block = [0u8; 18];
        block[0..2].copy_from_slice(&f32_to_f16(1.0).to_le_bytes());
        for (j, b) in block[2..].iter_mut().enumerate() {
            *b = (j as u8 & 0x0f) | (((15 - j as u8) & 0x0f) << 4);
        }
        let mut out = [0f32; 32];
        dequantize_q4_0(&block, &mut out);
        for j in 0..16 {
            assert_eq!(out[j], j as f32 - 8.0);
            assert_eq!(out[16 + j], (15 - j) as f32 - 8.0);
        }
    }

    #[test]
    fn q5_fifth_bit_of_element_j_is_bit_j_of_qh() {
        let mut block = [0u8; 22];
        block[0..2].copy_from_slice(&f32_to_f16(1.0).to_le_bytes());
        block[2..6].copy_from_slice(&(1u32 << 3 | 1 << 20).to_le_bytes());
        let mut out = [0f32; 32];
        dequantize_q5_0(&block, &mut out);
        for (j, v) in out.iter().enumerate() {
            let want = if j == 3 || j == 20 { 0.0 } else { -16.0 };
            assert_eq!(*v, want, "element {j}");
        }
    }

    #[test]
    fn k4_scales_unpack_six_bit_fields() {
        // Sub-block 5: scale low bits from byte 9's low nibble, high bits from
        // byte 1's top two bits; minimum from byte 9's high nibble and byte 5.
        let mut scales = [0u8; 12];
        scales[9] = 0xa7;
        scales[1] = 0b1100_0000;
        scales[5] = 0b0100_0000;
        assert_eq!(k4_scale_min(&scales, 5), (0x37, 0x1a));
        scales[2] = 45;
        scales[6] = 0b1000_0000 | 12;
        assert_eq!(k4_scale_min(&scales, 2), (45, 12));
    }

    #[test]
    fn q8_codes_round_half_away_from_zero_and_scale_by_absmax() {
        let mut values = [0f32; 32];
        values[0] = -127.0;
        values[1] = 2.5;
        values[2] = -2.5;
        values[3] = 0.49;
        let mut codes = [0i8; 32];
        let d = q8_codes(&values, &mut codes);
        assert_eq!(d, 1.0);
        assert_eq!(&codes[..4], &[-127, 3, -3, 0]);
    }

    #[test]
    fn q8_k_maps_the_signed_extreme_to_minus_127_with_ties_to_even() {
        let mut values = [0f32; 256];
        values[10] = 127.0;
        values[11] = 2.5;
        values[12] = -3.5;
        let mut codes = [0i8; 256];
        let d = q8_k_codes(&values, &mut codes);
        assert_eq!(d, -1.0);
        assert_eq!(&codes[10..13], &[-127, -2, 4]);
    }

    #[test]
    fn nan_makes_the_q8_scale_nan() {
        let mut values = [1.0f32; 32];
        values[5] = f32::NAN;
        let mut codes = [0i8; 32];
        assert!(q8_codes(&values, &mut codes).is_nan());
        let mut values = [1.0f32; 256];
        values[200] = f32::NAN;
        let mut codes = [0i8; 256];
        assert!(q8_k_codes(&values, &mut codes).is_nan());
    }
}
