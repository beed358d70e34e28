//! Dot products of one weight row with a quantized activation vector, in the
//! integer-then-scale form of llama.cpp's `ggml_vec_dot_*_q8_*`.
//!
//! `wide` offers no byte-by-byte multiply-add, so activations are widened to
//! i16 once per vector (see `QuantizedActivations`) rather than once per row:
//! a block product is then two `i16x16::dot` (pairwise multiply-add into i32)
//! per 32 weights. Integer sums are exact; each block adds one f32
//! multiply-add with the two scales (fused where the target has FMA).
//!
//! The generic kernels widen weight bytes with `u8x16`/`i8x16` to `i16x16`
//! conversions, which on x86 are lane-crossing shuffles costing more than the
//! multiply-adds themselves. The Q4_1 and Q8_0 kernels, which carry
//! SmolLM2's weights, avoid them (see [`dot_q4_1_fast`] and
//! [`dot_q8_0_fast`]): they reinterpret weight bytes as i16 lanes and isolate
//! the codes with masks and shifts, against activations laid out to match,
//! and they convert the eight block scales of a group from f16 with a few
//! vector operations instead of lane-by-lane inserts.

use wide::{bytemuck, f32x8, i16x16, i16x8, i32x8, i8x16, u16x16, u8x16};

pub(super) mod rows;

use super::blocks::{
    f16_at, k4_scale_min, u32_at, Q4_0_BLOCK_BYTES, Q4_1_BLOCK_BYTES, Q5_0_BLOCK_BYTES,
    Q5_1_BLOCK_BYTES, Q8_0_BLOCK_BYTES,
};
use super::float::F16_REBIAS;

#[inline(always)]
fn load_u8x16(bytes: &[u8]) -> u8x16 {
    let mut lanes = [0u8; 16];
    lanes.copy_from_slice(&bytes[..16]);
    u8x16::new(lanes)
}

#[inline(always)]
fn load_i8x16(bytes: &[u8]) -> i8x16 {
    let mut lanes = [0i8; 16];
    for (lane, byte) in lanes.iter_mut().zip(&bytes[..16]) {
        *lane = *byte as i8;
    }
    i8x16::new(lanes)
}

/// Lane j holds bit j of a 16-bit mask.
const BIT_OF_LANE: i16x16 = i16x16::new([
    1,
    2,
    4,
    8,
    16,
    32,
    64,
    128,
    256,
    512,
    1024,
    2048,
    4096,
    8192,
    16384,
    i16::MIN,
]);

/// 16 for each lane whose bit is set in `bits`, else 0.
#[inline(always)]
fn fifth_bits(bits: u16) -> i16x16 {
    let set = (i16x16::splat(bits as i16) & BIT_OF_LANE).simd_eq(BIT_OF_LANE);
    set & i16x16::splat(16)
}

/// Low and high nibbles of 16 bytes, as two vectors of 16 lanes.
#[inline(always)]
fn nibbles(bytes: &[u8]) -> (i16x16, i16x16) {
    let wide = i16x16::from(load_u8x16(bytes));
    (wide & i16x16::splat(0x0f), wide >> 4)
}

/// Σ q·a over a Q4_0 block (codes minus 8), as eight partial sums.
#[inline(always)]
pub(super) fn q4_0_block(qs: &[u8], a: &[i16x16]) -> i32x8 {
    let [lo, hi] = q4_0_codes(qs);
    lo.dot(a[0]) + hi.dot(a[1])
}

/// The codes of a Q4_0 block (nibbles minus 8): elements 0–15, then 16–31.
#[inline(always)]
pub(super) fn q4_0_codes(qs: &[u8]) -> [i16x16; 2] {
    let (lo, hi) = nibbles(qs);
    let eight = i16x16::splat(8);
    [lo - eight, hi - eight]
}

/// Σ q·a over a Q4_1 block (unsigned codes).
#[inline(always)]
pub(super) fn q4_1_block(qs: &[u8], a: &[i16x16]) -> i32x8 {
    let (lo, hi) = nibbles(qs);
    lo.dot(a[0]) + hi.dot(a[1])
}

/// Σ q·a over a Q5 block; `offset` is 16 for Q5_0 and 0 for Q5_1.
#[inline(always)]
pub(super) fn q5_block(qh: u32, qs: &[u8], a: &[i16x16], offset: i16) -> i32x8 {
    let (lo, hi) = nibbles(qs);
    let offset = i16x16::splat(offset);
    let lo = (lo | fifth_bits(qh as u16)) - offset;
    let hi = (hi | fifth_bits((qh >> 16) as u16)) - offset;
    lo.dot(a[0]) + hi.dot(a[1])
}

/// Σ q·a over a Q8_0 block.
#[inline(always)]
pub(super) fn q8_0_block(qs: &[u8], a: &[i16x16]) -> i32x8 {
    let lo = i16x16::from_i8x16(load_i8x16(&qs[..16]));
    let hi = i16x16::from_i8x16(load_i8x16(&qs[16..32]));
    lo.dot(a[0]) + hi.dot(a[1])
}

/// Scale-weighted Σ sc·q·a over a Q4_K super-block (without the minimums).
#[inline(always)]
pub(super) fn q4_k_block(scales: &[u8], qs: &[u8], a: &[i16x16]) -> i32x8 {
    let mut sum = i32x8::ZERO;
    for (pair, (qs, a)) in qs.chunks_exact(32).zip(a.chunks_exact(4)).enumerate() {
        let (sc_lo, _) = k4_scale_min(scales, 2 * pair);
        let (sc_hi, _) = k4_scale_min(scales, 2 * pair + 1);
        let (sc_lo, sc_hi) = (
            i16x16::splat(i16::from(sc_lo)),
            i16x16::splat(i16::from(sc_hi)),
        );
        let (lo0, hi0) = nibbles(&qs[..16]);
        let (lo1, hi1) = nibbles(&qs[16..32]);
        // Scales (< 64) times codes (< 16) stay well inside i16.
        sum += (lo0 * sc_lo).dot(a[0]) + (lo1 * sc_lo).dot(a[1]);
        sum += (hi0 * sc_hi).dot(a[2]) + (hi1 * sc_hi).dot(a[3]);
    }
    sum
}

/// Σ m_j · (sum of activation codes of sub-block j) for a Q4_K super-block.
#[inline(always)]
pub(super) fn q4_k_min_sum(scales: &[u8], bsums: &[i16]) -> i32 {
    let mut sum = 0i32;
    for (j, pair) in bsums.chunks_exact(2).enumerate() {
        let (_, m) = k4_scale_min(scales, j);
        sum += i32::from(m) * (i32::from(pair[0]) + i32::from(pair[1]));
    }
    sum
}

/// Scale-weighted Σ sc·q·a over a Q6_K super-block (codes minus 32).
#[inline(always)]
pub(super) fn q6_k_block(block: &[u8], a: &[i16x16]) -> i32x8 {
    let mut sum = i32x8::ZERO;
    let thirty_two = i16x16::splat(32);
    let three = i16x16::splat(3);
    for half in 0..2 {
        let ql = &block[64 * half..64 * half + 64];
        let qh = &block[128 + 32 * half..128 + 32 * half + 32];
        let scales = &block[192 + 8 * half..192 + 8 * half + 8];
        let a = &a[8 * half..8 * half + 8];
        for h in 0..2 {
            let high = i16x16::from(load_u8x16(&qh[16 * h..]));
            let (lo_a, hi_a) = nibbles(&ql[16 * h..]);
            let (lo_b, hi_b) = nibbles(&ql[32 + 16 * h..]);
            let parts = [lo_a, lo_b, hi_a, hi_b];
            for (quarter, low) in parts.into_iter().enumerate() {
                let group = 2 * quarter + h;
                let top: i16x16 = ((high >> (2 * quarter as u32)) & three) << 4u32;
                let q: i16x16 = (low | top) - thirty_two;
                // |q| <= 32 and |scale| <= 128: the product fits in i16.
                let scale = i16x16::splat(i16::from(scales[group] as i8));
                sum += (q * scale).dot(a[group]);
            }
        }
    }
    sum
}

/// Eight f16 bit patterns (in the low 16 bits of each lane) to f32, exactly,
/// by the same rebias trick as the scalar
/// [`f16_to_f32`](super::float::f16_to_f32).
#[inline(always)]
pub(super) fn f16x8_to_f32(bits: i32x8) -> f32x8 {
    let sign = (bits & i32x8::splat(0x8000)) << 16u32;
    let magnitude = bits & i32x8::splat(0x7fff);
    let finite = f32x8::from_bits((magnitude << 13u32).cast_unsigned()) * f32x8::splat(F16_REBIAS);
    let special = i32x8::splat(0x7f80_0000) | ((magnitude & i32x8::splat(0x03ff)) << 13u32);
    let is_special = magnitude.simd_gt(i32x8::splat(0x7bff));
    let magnitude = is_special.select(special, finite.to_bits().cast_signed());
    f32x8::from_bits((magnitude | sign).cast_unsigned())
}

/// The first four bytes (little-endian) of each block of `group` (at most
/// eight blocks of `BLOCK_BYTES`); lanes past the last block are zero.
#[inline(always)]
fn gather_head<const BLOCK_BYTES: usize>(group: &[u8]) -> i32x8 {
    let mut heads = [0i32; 8];
    if let Some(full) = group.get(..8 * BLOCK_BYTES) {
        // A whole group: fixed offsets, so no per-lane length checks.
        for (k, head) in heads.iter_mut().enumerate() {
            let at = k * BLOCK_BYTES;
            *head = i32::from_le_bytes([full[at], full[at + 1], full[at + 2], full[at + 3]]);
        }
    } else {
        for (head, block) in heads.iter_mut().zip(group.chunks_exact(BLOCK_BYTES)) {
            *head = i32::from_le_bytes([block[0], block[1], block[2], block[3]]);
        }
    }
    i32x8::new(heads)
}

#[inline(always)]
fn f32x8_of(values: &[f32]) -> f32x8 {
    let mut lanes = [0f32; 8];
    lanes.copy_from_slice(&values[..8]);
    f32x8::new(lanes)
}

/// Row times activations for the 32-element block types.
///
/// Blocks go in groups of eight: the weight scales of a group are converted
/// from f16 in one vector and multiplied with the activation scales (which
/// `QuantizedActivations` zero-pads to a multiple of eight), then each
/// block's exact integer sum is scaled into one of two f32 accumulators.
/// With `MIN`, the f16 at byte 2 is the block minimum `m` and `Σ m·s` is
/// added, `s` being the Q8_1 per-block sums.
#[inline(always)]
fn dot_32<const BLOCK_BYTES: usize, const MIN: bool>(
    row: &[u8],
    quants: &[i16x16],
    act_scales: &[f32],
    act_sums: &[f32],
    block_sum: impl Fn(&[u8], &[i16x16]) -> i32x8,
) -> f32 {
    let mut acc = [f32x8::ZERO; 2];
    let mut mins = f32x8::ZERO;
    let groups = row
        .chunks(8 * BLOCK_BYTES)
        .zip(quants.chunks(16))
        .zip(act_scales.chunks_exact(8));
    for (g, ((weights, acts), scales)) in groups.enumerate() {
        // Every block starts with its f16 scale; Q4_1/Q5_1 follow it with
        // the f16 minimum.
        let heads = gather_head::<BLOCK_BYTES>(weights);
        let low16 = i32x8::splat(0xffff);
        let d = (f16x8_to_f32(heads & low16) * f32x8_of(scales)).to_array();
        if MIN {
            let m = f16x8_to_f32((heads >> 16u32) & low16);
            mins = m.mul_add(f32x8_of(&act_sums[8 * g..]), mins);
        }
        if let (Some(full), Some(acts)) = (weights.get(..8 * BLOCK_BYTES), acts.get(..16)) {
            // A whole group: fixed trip count and sizes, no checks in the loop.
            for k in (0..8).step_by(2) {
                let (b0, b1) = (&full[k * BLOCK_BYTES..], &full[(k + 1) * BLOCK_BYTES..]);
                let s0 = f32x8::from_i32x8(block_sum(b0, &acts[2 * k..2 * k + 2]));
                let s1 = f32x8::from_i32x8(block_sum(b1, &acts[2 * k + 2..2 * k + 4]));
                acc[0] = s0.mul_add(f32x8::splat(d[k]), acc[0]);
                acc[1] = s1.mul_add(f32x8::splat(d[k + 1]), acc[1]);
            }
            continue;
        }
        let mut blocks = weights
            .chunks_exact(BLOCK_BYTES)
            .zip(acts.chunks_exact(2))
            .zip(d.iter());
        while let Some(((b0, a0), d0)) = blocks.next() {
            acc[0] = f32x8::from_i32x8(block_sum(b0, a0)).mul_add(f32x8::splat(*d0), acc[0]);
            if let Some(((b1, a1), d1)) = blocks.next() {
                acc[1] = f32x8::from_i32x8(block_sum(b1, a1)).mul_add(f32x8::splat(*d1), acc[1]);
            }
        }
    }
    (acc[0] + acc[1] + mins).reduce_add()
}

pub(super) fn dot_q4_0(row: &[u8], quants: &[i16x16], scales: &[f32]) -> f32 {
    dot_32::<Q4_0_BLOCK_BYTES, false>(row, quants, scales, &[], |b, a| {
        q4_0_block(&b[2..Q4_0_BLOCK_BYTES], a)
    })
}

pub(super) fn dot_q4_1(row: &[u8], quants: &[i16x16], scales: &[f32], sums: &[f32]) -> f32 {
    dot_32::<Q4_1_BLOCK_BYTES, true>(row, quants, scales, sums, |b, a| {
        q4_1_block(&b[4..Q4_1_BLOCK_BYTES], a)
    })
}

pub(super) fn dot_q5_0(row: &[u8], quants: &[i16x16], scales: &[f32]) -> f32 {
    dot_32::<Q5_0_BLOCK_BYTES, false>(row, quants, scales, &[], |b, a| {
        q5_block(u32_at(b, 2), &b[6..Q5_0_BLOCK_BYTES], a, 16)
    })
}

pub(super) fn dot_q5_1(row: &[u8], quants: &[i16x16], scales: &[f32], sums: &[f32]) -> f32 {
    dot_32::<Q5_1_BLOCK_BYTES, true>(row, quants, scales, sums, |b, a| {
        q5_block(u32_at(b, 4), &b[8..Q5_1_BLOCK_BYTES], a, 0)
    })
}

pub(super) fn dot_q8_0(row: &[u8], quants: &[i16x16], scales: &[f32]) -> f32 {
    dot_32::<Q8_0_BLOCK_BYTES, false>(row, quants, scales, &[], |b, a| {
        q8_0_block(&b[2..Q8_0_BLOCK_BYTES], a)
    })
}

pub(super) fn dot_q4_k(row: &[u8], quants: &[i16x16], scales: &[f32], bsums: &[i16]) -> f32 {
    let mut acc = f32x8::ZERO;
    let mut mins = 0.0f32;
    let blocks = row.chunks_exact(144).zip(quants.chunks_exact(16));
    for ((b, a), (d, bsums)) in blocks.zip(scales.iter().zip(bsums.chunks_exact(16))) {
        let sub_scales = &b[4..16];
        let sum = q4_k_block(sub_scales, &b[16..144], a);
        acc = f32x8::from_i32x8(sum).mul_add(f32x8::splat(f16_at(b, 0) * d), acc);
        mins += f16_at(b, 2) * d * q4_k_min_sum(sub_scales, bsums) as f32;
    }
    acc.reduce_add() - mins
}

pub(super) fn dot_q6_k(row: &[u8], quants: &[i16x16], scales: &[f32]) -> f32 {
    let mut acc = f32x8::ZERO;
    for ((b, a), d) in row
        .chunks_exact(210)
        .zip(quants.chunks_exact(16))
        .zip(scales)
    {
        let sum = q6_k_block(b, a);
        acc = f32x8::from_i32x8(sum).mul_add(f32x8::splat(f16_at(b, 208) * d), acc);
    }
    acc.reduce_add()
}

/// Dot product of a row of blocks with f32 activations: each block is
/// decoded into a stack buffer of `LEN` values and multiplied in f32 lanes.
#[inline(always)]
pub(super) fn dot_f32_blocks<const LEN: usize>(
    row: &[u8],
    block_bytes: usize,
    x: &[f32],
    decode: impl Fn(&[u8], &mut [f32]),
) -> f32 {
    let mut acc = [f32x8::ZERO; 2];
    let mut buf = [0f32; LEN];
    for (block, x) in row.chunks_exact(block_bytes).zip(x.chunks_exact(LEN)) {
        decode(block, &mut buf);
        for (w, x) in buf.chunks_exact(16).zip(x.chunks_exact(16)) {
            acc[0] = f32x8_of(&w[..8]).mul_add(f32x8_of(&x[..8]), acc[0]);
            acc[1] = f32x8_of(&w[8..]).mul_add(f32x8_of(&x[8..]), acc[1]);
        }
    }
    (acc[0] + acc[1]).reduce_add()
}

/// Dot product of a row of plain floats (`elem` bytes each, decoded by
/// `decode`) with f32 activations, eight lanes at a time; any length.
#[inline(always)]
pub(super) fn dot_f32_plain(
    row: &[u8],
    elem: usize,
    x: &[f32],
    decode: impl Fn(&[u8]) -> f32,
) -> f32 {
    let mut acc = f32x8::ZERO;
    let mut rows = row.chunks(8 * elem);
    for (bytes, x) in (&mut rows).zip(x.chunks(8)) {
        let mut w = [0f32; 8];
        let mut xs = [0f32; 8];
        for (w, b) in w.iter_mut().zip(bytes.chunks_exact(elem)) {
            *w = decode(b);
        }
        xs[..x.len()].copy_from_slice(x);
        acc = f32x8::new(w).mul_add(f32x8::new(xs), acc);
    }
    acc.reduce_add()
}

/// Lane `k` holds the first four bytes of block `k` of `group` (eight blocks
/// of `BLOCK_BYTES`): eight overlapping 32-byte loads, the one for block `k`
/// placed so that those bytes fall in lane `k`, blended together. This avoids
/// the two-instruction lane inserts of a scalar gather.
#[inline(always)]
fn group_heads<const BLOCK_BYTES: usize>(group: &[u8]) -> i32x8 {
    let load = |k: usize| load_i32x8(group, (BLOCK_BYTES - 4) * k);
    blend_heads([
        load(0),
        load(1),
        load(2),
        load(3),
        load(4),
        load(5),
        load(6),
        load(7),
    ])
}

/// 32 bytes of `bytes` from `at` as eight little-endian i32 lanes.
#[inline(always)]
fn load_i32x8(bytes: &[u8], at: usize) -> i32x8 {
    let mut lanes = [0u8; 32];
    lanes.copy_from_slice(&bytes[at..at + 32]);
    bytemuck::cast(lanes)
}

/// Lane `k` of `v[k]`, for each `k`.
#[inline(always)]
fn blend_heads(v: [i32x8; 8]) -> i32x8 {
    let odd = i32x8::new([0, -1, 0, -1, 0, -1, 0, -1]);
    let pairs = i32x8::new([-1, -1, 0, 0, -1, -1, 0, 0]);
    let low = i32x8::new([-1, -1, -1, -1, 0, 0, 0, 0]);
    let v03 = pairs.select(odd.select(v[1], v[0]), odd.select(v[3], v[2]));
    let v47 = pairs.select(odd.select(v[5], v[4]), odd.select(v[7], v[6]));
    low.select(v03, v47)
}

/// 2^104 = 2^112 / 256: [`f16_high_to_f32`] with it also divides by 256.
pub(super) const F16_REBIAS_BY_256: f32 = f32::from_bits(0x7380_0000);

/// The f16 in the high 16 bits of each lane as f32, times `rebias / 2^112`.
///
/// Exact for every finite f16 (zero and subnormals included, as in
/// [`f16_to_f32`](super::float::f16_to_f32)); infinities and NaNs come out
/// as finite values, so callers must know that none occur (`QMatrix` checks
/// its scales at construction).
#[inline(always)]
pub(super) fn f16_high_to_f32(bits: i32x8, rebias: f32) -> f32x8 {
    // The arithmetic shift puts exponent and mantissa where f32 keeps them
    // and copies the sign into the three top exponent bits, which the mask
    // clears again.
    let placed = (bits >> 3u32) & i32x8::splat(0x8fff_e000_u32 as i32);
    f32x8::from_bits(placed.cast_unsigned()) * f32x8::splat(rebias)
}

/// For pair `i`: lane `i` of `v` in the low four lanes and lane `i + 4` in
/// the high four, an in-lane shuffle on x86 (no lane crossing).
#[inline(always)]
fn pair_scales(v: f32x8) -> [f32x8; 4] {
    let a = v.to_array();
    std::array::from_fn(|i| {
        let (lo, hi) = (a[i], a[i + 4]);
        f32x8::new([lo, lo, lo, lo, hi, hi, hi, hi])
    })
}

/// The 16 code bytes of two Q4_1 blocks, `lo`'s in the low 128 bits.
#[inline(always)]
fn load_two(lo: &[u8], hi: &[u8]) -> i16x16 {
    let mut bytes = [0u8; 32];
    bytes[..16].copy_from_slice(&lo[..16]);
    bytes[16..].copy_from_slice(&hi[..16]);
    bytemuck::cast(bytes)
}

/// 256 × the partial sums Σ q·a of two Q4_1 blocks (lanes 0–3: the block in
/// the low half of `codes`, lanes 4–7: the other) against four activation
/// vectors in the pair layout of `QuantizedActivations`.
///
/// Each i16 lane of `codes` holds bytes 2j and 2j+1 of a block, i.e. the
/// elements 2j (bits 0–3), 2j+16 (bits 4–7), 2j+1 (bits 8–11) and 2j+17
/// (bits 12–15). Masks leave them multiplied by 1, 16 and 256, a logical
/// shift the last by 1; the activations carry the complementary factors 256,
/// 16, 1 and 256, so every product is 256·q·a. The i32 lanes stay below
/// 2^22, exact in f32.
#[inline(always)]
pub(super) fn q4_1_pair(codes: i16x16, a: &[i16x16]) -> i32x8 {
    q4_1_pair_sum(&q4_1_pair_codes(codes), a)
}

/// The four masked forms of a pair's code vector that [`q4_1_pair`]
/// multiplies with the four activation vectors: elements 2j, 16·(2j+16),
/// 256·(2j+1) and 2j+17 in i16 lane j of each block's half.
#[inline(always)]
pub(super) fn q4_1_pair_codes(codes: i16x16) -> [i16x16; 4] {
    let e_lo = codes & i16x16::splat(0x000f);
    let e_hi = codes & i16x16::splat(0x00f0);
    let o_lo = codes & i16x16::splat(0x0f00);
    let o_hi: i16x16 = bytemuck::cast(bytemuck::cast::<i16x16, u16x16>(codes) >> 12);
    [e_lo, e_hi, o_lo, o_hi]
}

/// [`q4_1_pair`] from codes already split by [`q4_1_pair_codes`].
#[inline(always)]
pub(super) fn q4_1_pair_sum(c: &[i16x16; 4], a: &[i16x16]) -> i32x8 {
    (c[0].dot(a[0]) + c[1].dot(a[1])) + (c[2].dot(a[2]) + c[3].dot(a[3]))
}

/// Bytes of eight Q4_1 blocks: how far a group's loads may reach.
const Q4_1_GROUP_BYTES: usize = 8 * Q4_1_BLOCK_BYTES;

/// Partial sums of a Q4_1 row: two accumulators of scaled block sums and the
/// minimum terms.
#[derive(Clone, Copy)]
struct Q4_1Sums {
    acc: [f32x8; 2],
    mins: f32x8,
}

impl Q4_1Sums {
    const ZERO: Self = Self {
        acc: [f32x8::ZERO; 2],
        mins: f32x8::ZERO,
    };

    /// The dot product these partial sums add up to.
    #[inline(always)]
    fn total(self) -> f32 {
        (self.acc[0] + self.acc[1] + self.mins).reduce_add()
    }

    /// Adds the first `pairs` pairs of a group whose block heads (f16 d and
    /// m) are `heads` in lane order; `codes(i)` gives the code bytes of the
    /// blocks in lanes `i` and `i + 4`, `a` the group's activation vectors
    /// and `s`/`m` its activation scales and sums in lane order.
    #[inline(always)]
    fn add_group<'a>(
        &mut self,
        heads: i32x8,
        pairs: usize,
        codes: impl Fn(usize) -> (&'a [u8], &'a [u8]),
        a: &[i16x16],
        (s, m): (&[f32], &[f32]),
    ) {
        let d = f16_high_to_f32(heads << 16u32, F16_REBIAS_BY_256) * f32x8_of(s);
        self.mins = f16_high_to_f32(heads, F16_REBIAS).mul_add(f32x8_of(m), self.mins);
        for (i, (a, d)) in a
            .chunks_exact(4)
            .zip(pair_scales(d))
            .enumerate()
            .take(pairs)
        {
            let (lo, hi) = codes(i);
            let sum = f32x8::from_i32x8(q4_1_pair(load_two(lo, hi), a));
            self.acc[i & 1] = sum.mul_add(d, self.acc[i & 1]);
        }
    }

    /// Adds the last, partial group of a row: `n` (1 to 7) blocks from byte
    /// `at` of `src`, which holds at least [`Q4_1_GROUP_BYTES`] bytes from
    /// there. Lane `j < 4` holds block `j` and lane `4 + j` block `h + j`,
    /// `h` being `n` halved rounding up. Bytes past the row are read, but
    /// their heads are zeroed and their activations are zero.
    #[inline(always)]
    fn add_tail(&mut self, src: &[u8], at: usize, n: usize, a: &[i16x16], sm: (&[f32], &[f32])) {
        const BB: usize = Q4_1_BLOCK_BYTES;
        let h = n.div_ceil(2);
        let block = |lane: usize| if lane < 4 { lane } else { h + lane - 4 };
        let heads = blend_heads(std::array::from_fn(|lane| {
            load_i32x8(src, at + BB * block(lane) - 4 * lane)
        }));
        let (low, high) = (h as i32, (n - h) as i32);
        let blocks_per_half = i32x8::new([low, low, low, low, high, high, high, high]);
        let present = blocks_per_half.simd_gt(i32x8::new([0, 1, 2, 3, 0, 1, 2, 3]));
        let codes = |i: usize| (&src[at + BB * i + 4..], &src[at + BB * (i + h) + 4..]);
        self.add_group(heads & present, h, codes, a, sm);
    }

    /// The sums [`add_tail`](Self::add_tail) adds, from a zero-padded copy
    /// of the `n` blocks, for a row too close to the end of its matrix.
    /// Returned rather than added so that the caller's sums can stay in
    /// registers.
    #[cold]
    #[inline(never)]
    fn padded_tail(blocks: &[u8], n: usize, a: &[i16x16], sm: (&[f32], &[f32])) -> Self {
        let mut padded = [0u8; Q4_1_GROUP_BYTES];
        padded[..blocks.len()].copy_from_slice(blocks);
        let mut sums = Self::ZERO;
        sums.add_tail(&padded, 0, n, a, sm);
        sums
    }
}

/// Q4_1 row times Q8_1 activations in the pair layout of
/// `QuantizedActivations` (`pairs`, and `scales` and `sums` in lane order).
///
/// `rest` starts at the row and may run on to the end of the matrix: the
/// last, partial group of eight blocks reads up to [`Q4_1_GROUP_BYTES`] past
/// its start, taking bytes of the next row when there is one. `row_bytes` is
/// the row's length. Every block scale and minimum must be finite.
///
/// A group of eight blocks is four pairs (block `i` with block `i + 4`),
/// each one 256-bit vector of codes. The heads of the next group are loaded
/// before the codes of the current one: when a group's heads and codes are
/// loaded together, the compiler rebuilds code vectors out of the head loads
/// with slow shuffles.
#[inline(always)]
pub(super) fn dot_q4_1_fast(
    rest: &[u8],
    row_bytes: usize,
    pairs: &[i16x16],
    scales: &[f32],
    sums: &[f32],
) -> f32 {
    const BB: usize = Q4_1_BLOCK_BYTES;
    let mut sum = Q4_1Sums::ZERO;
    let blocks = row_bytes / BB;
    let whole = blocks / 8 * 8;
    let body = &rest[..whole * BB];
    let mut groups = body
        .chunks_exact(Q4_1_GROUP_BYTES)
        .zip(pairs.chunks_exact(16))
        .zip(scales.chunks_exact(8).zip(sums.chunks_exact(8)));
    let mut next = body.get(..Q4_1_GROUP_BYTES).map(group_heads::<BB>);
    let mut start = 0;
    while let (Some(heads), Some(((group, a), sm))) = (next, groups.next()) {
        start += Q4_1_GROUP_BYTES;
        next = body
            .get(start..start + Q4_1_GROUP_BYTES)
            .map(group_heads::<BB>);
        let codes = |i: usize| (&group[BB * i + 4..], &group[BB * (i + 4) + 4..]);
        sum.add_group(heads, 4, codes, a, sm);
    }
    let n = blocks - whole;
    if n > 0 {
        let (a, sm) = (&pairs[2 * whole..], (&scales[whole..], &sums[whole..]));
        let at = whole * BB;
        // Both ways sum the tail on its own, so that a row gives the same
        // result wherever it lies in its matrix.
        let tail = if rest.len() >= at + Q4_1_GROUP_BYTES {
            let mut tail = Q4_1Sums::ZERO;
            tail.add_tail(rest, at, n, a, sm);
            tail
        } else {
            Q4_1Sums::padded_tail(&rest[at..at + n * BB], n, a, sm)
        };
        sum.acc[0] += tail.acc[0] + tail.acc[1];
        sum.mins += tail.mins;
    }
    sum.total()
}

/// 256 × the partial sums Σ q·a of one Q8_0 block against its activations
/// split into even and odd elements: each i16 lane of the 32 code bytes holds
/// elements 2j and 2j+1, which a left shift and a mask leave as 256·q. The
/// i32 lanes stay within 2^24, exact in f32.
#[inline(always)]
pub(super) fn q8_0_split(codes: &[u8], a: &[i16x16]) -> i32x8 {
    q8_0_split_sum(q8_0_split_codes(codes), a)
}

/// The even and odd codes of a Q8_0 block's 32 code bytes, each times 256,
/// as [`q8_0_split`] multiplies them.
#[inline(always)]
pub(super) fn q8_0_split_codes(codes: &[u8]) -> [i16x16; 2] {
    let mut bytes = [0u8; 32];
    bytes.copy_from_slice(&codes[..32]);
    let lanes: i16x16 = bytemuck::cast(bytes);
    let even: i16x16 = lanes << 8;
    let odd = lanes & i16x16::splat(0xff00_u16 as i16);
    [even, odd]
}

/// [`q8_0_split`] from codes already split by [`q8_0_split_codes`].
#[inline(always)]
pub(super) fn q8_0_split_sum(c: [i16x16; 2], a: &[i16x16]) -> i32x8 {
    c[0].dot(a[0]) + c[1].dot(a[1])
}

/// Bytes of eight Q8_0 blocks: how far a group's loads may reach.
const Q8_0_GROUP_BYTES: usize = 8 * Q8_0_BLOCK_BYTES;

/// Adds the first `n` blocks of a Q8_0 group (`group` holds at least
/// [`Q8_0_GROUP_BYTES`] bytes; lanes of `heads` from `n` on must be zero).
#[inline(always)]
fn q8_0_group(
    group: &[u8],
    heads: i32x8,
    n: usize,
    (a, s): (&[i16x16], &[f32]),
    acc: &mut [f32x8; 2],
) {
    const BB: usize = Q8_0_BLOCK_BYTES;
    let d = (f16_high_to_f32(heads << 16u32, F16_REBIAS_BY_256) * f32x8_of(s)).to_array();
    let blocks = group.chunks_exact(BB).zip(a.chunks_exact(2)).zip(d);
    for (k, ((block, a), d)) in blocks.enumerate().take(n) {
        let sum = f32x8::from_i32x8(q8_0_split(&block[2..], a));
        acc[k & 1] = sum.mul_add(f32x8::splat(d), acc[k & 1]);
    }
}

/// The sum of the last, partial group of a Q8_0 row: `n` (1 to 7) blocks at
/// the start of `group`, which holds at least [`Q8_0_GROUP_BYTES`] bytes.
/// Summed on its own, so that a row gives the same result whether the tail
/// was read in place or from a padded copy.
#[inline(always)]
fn q8_0_tail(group: &[u8], n: usize, a: (&[i16x16], &[f32])) -> f32x8 {
    let present = i32x8::splat(n as i32).simd_gt(i32x8::new([0, 1, 2, 3, 4, 5, 6, 7]));
    let mut acc = [f32x8::ZERO; 2];
    q8_0_group(
        group,
        group_heads::<Q8_0_BLOCK_BYTES>(group) & present,
        n,
        a,
        &mut acc,
    );
    acc[0] + acc[1]
}

/// [`q8_0_tail`] on a zero-padded copy, for the end of the matrix.
#[cold]
#[inline(never)]
fn q8_0_padded_tail(blocks: &[u8], n: usize, a: (&[i16x16], &[f32])) -> f32x8 {
    let mut padded = [0u8; Q8_0_GROUP_BYTES];
    padded[..blocks.len()].copy_from_slice(blocks);
    q8_0_tail(&padded, n, a)
}

/// Q8_0 row times Q8_0 activations in the even/odd layout of
/// `QuantizedActivations`; `rest` and `row_bytes` as for [`dot_q4_1_fast`]
/// (the partial last group reads up to [`Q8_0_GROUP_BYTES`] past its start).
/// Every block scale must be finite.
#[inline(always)]
pub(super) fn dot_q8_0_fast(
    rest: &[u8],
    row_bytes: usize,
    split: &[i16x16],
    scales: &[f32],
) -> f32 {
    const BB: usize = Q8_0_BLOCK_BYTES;
    let mut acc = [f32x8::ZERO; 2];
    let blocks = row_bytes / BB;
    let whole = blocks / 8 * 8;
    let body = &rest[..whole * BB];
    let groups = body
        .chunks_exact(Q8_0_GROUP_BYTES)
        .zip(split.chunks_exact(16).zip(scales.chunks_exact(8)));
    for (group, a) in groups {
        q8_0_group(group, group_heads::<BB>(group), 8, a, &mut acc);
    }
    let n = blocks - whole;
    if n > 0 {
        let a = (&split[2 * whole..], &scales[whole..]);
        let at = whole * BB;
        match rest.get(at..at + Q8_0_GROUP_BYTES) {
            Some(group) => acc[0] += q8_0_tail(group, n, a),
            None => acc[0] += q8_0_padded_tail(&rest[at..at + n * BB], n, a),
        }
    }
    (acc[0] + acc[1]).reduce_add()
}

/// The f32 scales of a group of eight 32-element blocks: the f16 at byte 0
/// of each block and the one at byte 2 (the Q4_1 minimum), exactly,
/// infinities and NaNs included.
#[inline(always)]
fn group_scales_f32<const BLOCK_BYTES: usize>(group: &[u8]) -> ([f32; 8], [f32; 8]) {
    let heads = group_heads::<BLOCK_BYTES>(group);
    let low16 = i32x8::splat(0xffff);
    (
        f16x8_to_f32(heads & low16).to_array(),
        f16x8_to_f32((heads >> 16u32) & low16).to_array(),
    )
}

/// Calls `block(k, codes, x, d, m)` for every 32-element block of `row`
/// (`BLOCK_BYTES` bytes each, `HEAD` of them scales before the codes), with
/// the block's 32 activations and its scales from byte 0 and byte 2 (the
/// latter meaningful for Q4_1 only), `k` being the block's index modulo 8.
///
/// Scales of whole groups of eight blocks are converted together with
/// vector operations: a scalar f16 conversion takes about eight
/// instructions, against about twenty for a block's codes. The blocks of a last, partial group (at
/// most seven) are converted one by one, which is cheaper than gathering a
/// partial group.
#[inline(always)]
fn for_each_f32_block<const BLOCK_BYTES: usize, const HEAD: usize>(
    row: &[u8],
    x: &[f32],
    mut block: impl FnMut(usize, &[u8], &[f32], f32, f32),
) {
    let groups = row.chunks_exact(8 * BLOCK_BYTES);
    let tail = groups.remainder();
    let mut x_groups = x.chunks_exact(8 * 32);
    for (group, x) in groups.zip(&mut x_groups) {
        let (d, m) = group_scales_f32::<BLOCK_BYTES>(group);
        for k in 0..8 {
            let codes = &group[k * BLOCK_BYTES + HEAD..(k + 1) * BLOCK_BYTES];
            block(k, codes, &x[32 * k..32 * k + 32], d[k], m[k]);
        }
    }
    let blocks = tail.chunks_exact(BLOCK_BYTES);
    for (k, (b, x)) in blocks
        .zip(x_groups.remainder().chunks_exact(32))
        .enumerate()
    {
        let m = if HEAD == 4 { f16_at(b, 2) } else { 0.0 };
        block(k, &b[HEAD..], x, f16_at(b, 0), m);
    }
}

/// Bytes 0–7 and 8–15 of `bytes`, zero-extended to i32 lanes.
///
/// Each half goes through a vector whose upper half is zero, so that the
/// two widenings fold into one byte-to-i32 extension from memory per half
/// (`vpmovzxbd` on x86) instead of a wider extension, a lane extraction and
/// a second extension.
#[inline(always)]
fn widen_u8(bytes: &[u8]) -> [i32x8; 2] {
    let half = |at: usize| {
        let mut lanes = [0u8; 16];
        lanes[..8].copy_from_slice(&bytes[at..at + 8]);
        let [low, _]: [i16x8; 2] = bytemuck::cast(i16x16::from(u8x16::new(lanes)));
        i32x8::from_i16x8(low)
    };
    [half(0), half(8)]
}

/// Bytes 0–7 and 8–15 of `bytes`, zero-extended to i32 lanes through one
/// 16-lane extension and a lane extraction.
///
/// Slower than [`widen_u8`] on its own, but the Q4_1 kernel needs it: with
/// the narrower loads, the compiler builds the first block's codes out of
/// the loads of the group's scales with slow shuffles and runs out of
/// registers.
#[inline(always)]
fn widen_u8_whole(bytes: &[u8]) -> [i32x8; 2] {
    let wide = i16x16::from(load_u8x16(bytes));
    let [lo, hi]: [i16x8; 2] = bytemuck::cast(wide);
    [i32x8::from_i16x8(lo), i32x8::from_i16x8(hi)]
}

/// Bytes 0–7 and 8–15 of `bytes`, sign-extended to i32 lanes (as
/// [`widen_u8`]).
#[inline(always)]
fn widen_i8(bytes: &[u8]) -> [i32x8; 2] {
    let half = |at: usize| {
        let mut lanes = [0i8; 16];
        for (lane, byte) in lanes.iter_mut().zip(&bytes[at..at + 8]) {
            *lane = *byte as i8;
        }
        let [low, _]: [i16x8; 2] = bytemuck::cast(i16x16::from_i8x16(i8x16::new(lanes)));
        i32x8::from_i16x8(low)
    };
    [half(0), half(8)]
}

/// Σ c_j·x_j for four vectors of eight codes (elements 0–7, 8–15, 16–23 and
/// 24–31 of a block) as eight partial sums.
#[inline(always)]
fn codes_dot_x(codes: [i32x8; 4], x: &[f32]) -> f32x8 {
    codes_dot_x_f32(&codes.map(f32x8::from_i32x8), x)
}

/// [`codes_dot_x`] from codes already converted to f32.
#[inline(always)]
fn codes_dot_x_f32(c: &[f32x8; 4], x: &[f32]) -> f32x8 {
    // Two chains of two, so the block's sum waits on two roundings only.
    let low = c[0] * f32x8_of(&x[..8]);
    let high = c[1] * f32x8_of(&x[8..16]);
    let low = c[2].mul_add(f32x8_of(&x[16..24]), low);
    let high = c[3].mul_add(f32x8_of(&x[24..32]), high);
    low + high
}

/// Row of Q8_0 blocks times f32 activations.
///
/// Each block's 32 signed codes are widened to i32 lanes, converted to f32
/// and multiplied with the activations; the block's eight partial sums are
/// then scaled by its `d` once. `q·d` is exact in f32, so every term is the
/// plain dot's `(q·d)·x` up to where the one rounding happens.
#[inline(always)]
pub(super) fn dot_f32_q8_0(row: &[u8], x: &[f32]) -> f32 {
    let mut acc = [f32x8::ZERO; 2];
    for_each_f32_block::<Q8_0_BLOCK_BYTES, 2>(row, x, |k, codes, x, d, _| {
        let [c0, c1] = widen_i8(&codes[..16]);
        let [c2, c3] = widen_i8(&codes[16..32]);
        let sum = codes_dot_x([c0, c1, c2, c3], x);
        acc[k & 1] = sum.mul_add(f32x8::splat(d), acc[k & 1]);
    });
    (acc[0] + acc[1]).reduce_add()
}

/// Row of Q4_0 blocks times f32 activations: as [`dot_f32_q8_0`], with the
/// codes being the nibbles minus 8 (element `j < 16` the low nibble of byte
/// `j`, element `j + 16` its high nibble).
#[inline(always)]
pub(super) fn dot_f32_q4_0(row: &[u8], x: &[f32]) -> f32 {
    let mut acc = [f32x8::ZERO; 2];
    for_each_f32_block::<Q4_0_BLOCK_BYTES, 2>(row, x, |k, codes, x, d, _| {
        let [b0, b1] = widen_u8(codes);
        let (fifteen, eight) = (i32x8::splat(15), i32x8::splat(8));
        let nibbles = [b0 & fifteen, b1 & fifteen, b0 >> 4u32, b1 >> 4u32];
        let sum = codes_dot_x(nibbles.map(|q| q - eight), x);
        acc[k & 1] = sum.mul_add(f32x8::splat(d), acc[k & 1]);
    });
    (acc[0] + acc[1]).reduce_add()
}

/// Row of Q4_1 blocks times f32 activations.
///
/// The nibbles of a block are widened to f32 lanes and turned into weights
/// with one fused `q·d + m`, which equals the `d·q + m` of the scalar
/// decoder bit for bit (`d·q` is exact in f32): every product is the plain
/// dot's `w·x`, only summed in another order. Factoring out the scales
/// instead (`d·Σq·x + m·Σx`) would save one multiply-add per eight weights
/// but turn `0·∞` into a NaN where the plain dot has `m·∞`.
#[inline(always)]
pub(super) fn dot_f32_q4_1(row: &[u8], x: &[f32]) -> f32 {
    let mut acc = [f32x8::ZERO; 4];
    for_each_f32_block::<Q4_1_BLOCK_BYTES, 4>(row, x, |_, codes, x, d, m| {
        let [b0, b1] = widen_u8_whole(codes);
        let fifteen = i32x8::splat(15);
        let nibbles = [b0 & fifteen, b1 & fifteen, b0 >> 4u32, b1 >> 4u32];
        let (d, m) = (f32x8::splat(d), f32x8::splat(m));
        for ((q, x), acc) in nibbles.into_iter().zip(x.chunks_exact(8)).zip(&mut acc) {
            let w = f32x8::from_i32x8(q).mul_add(d, m);
            *acc = w.mul_add(f32x8_of(x), *acc);
        }
    });
    ((acc[0] + acc[1]) + (acc[2] + acc[3])).reduce_add()
}
