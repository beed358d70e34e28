//! One weight row times several activation rows at once: the kernels of
//! [`QMatrix::matmul`](crate::quant::QMatrix::matmul).
//!
//! Each kernel takes a row of weights and a tile of `N` activation rows and
//! returns the `N` dot products. The weight-side work (loading the blocks,
//! converting their f16 scales, isolating the codes) is done once per tile;
//! the activation-side work (the integer products, the scaling, the
//! accumulation) once per activation row, with exactly the operations, in
//! exactly the order, of the one-row kernel of the parent module, so that
//! every result is bit for bit that of the one-row product: integer block
//! sums are exact whatever their grouping, and every f32 operation on a
//! row's accumulators is the one the one-row kernel performs, on the same
//! values, in the same sequence.
//!
//! Pair and block indices are compile-time constants (const parameters)
//! wherever they select an accumulator or a lane: with a run-time index the
//! accumulators of the `N` rows would live in memory instead of registers.

use wide::{f32x8, i16x16, i32x8};

use super::super::activations::{QuantizedActivations, Q4_1_BYTE_PRODUCTS};
use super::super::blocks::{f16_at, Q4_0_BLOCK_BYTES, Q4_1_BLOCK_BYTES, Q8_0_BLOCK_BYTES};
use super::super::float::F16_REBIAS;
use super::{
    blend_heads, codes_dot_x_f32, f16_high_to_f32, f16x8_to_f32, f32x8_of, gather_head,
    group_heads, group_scales_f32, load_i32x8, load_two, q4_0_codes, q8_0_split_sum, widen_i8,
    widen_u8, widen_u8_whole, Q4_1Sums, F16_REBIAS_BY_256, Q4_1_GROUP_BYTES, Q8_0_GROUP_BYTES,
};

/// Each row's `LEN` activation vectors from vector `at` on, in the layout
/// that `layout` picks. Sliced to their length once, so that constant
/// indices into them need no further checks.
#[inline(always)]
fn vectors<'a, const LEN: usize, const N: usize>(
    acts: &'a [QuantizedActivations; N],
    at: usize,
    layout: impl Fn(&'a QuantizedActivations) -> &'a [i16x16],
) -> [&'a [i16x16; LEN]; N] {
    let mut a: [&[i16x16; LEN]; N] = [&[i16x16::ZERO; LEN]; N];
    for (a, x) in a.iter_mut().zip(acts) {
        *a = match layout(x)[at..at + LEN].try_into() {
            Ok(v) => v,
            Err(_) => unreachable!("a slice of LEN vectors is an array of LEN"),
        };
    }
    a
}

/// Eight f32 of `values` from `at`.
#[inline(always)]
fn eight(values: &[f32], at: usize) -> f32x8 {
    f32x8_of(&values[at..at + 8])
}

/// Lane `I` of `v` in the low four lanes and lane `I + 4` in the high four:
/// the scale of pair `I` (`pair_scales`), one in-lane shuffle on x86.
#[inline(always)]
fn pair_scale<const I: usize>(v: f32x8) -> f32x8 {
    let a = v.to_array();
    let (lo, hi) = (a[I], a[I + 4]);
    f32x8::new([lo, lo, lo, lo, hi, hi, hi, hi])
}

// Byte products of the Q4_1 kernel (`Q4_1_BYTE_PRODUCTS`): `pmaddubsw`
// multiplies 32 unsigned bytes with 32 signed ones and adds adjacent
// products into i16 lanes. The low nibbles of a pair's 32 code bytes are
// elements 0–15 of its two blocks and the high nibbles elements 16–31;
// against the activation bytes of the same elements, the two products
// added (at most 4 · 15 · 127 in a lane, no saturation) and then
// multiplied by 256 in pairs of lanes (`pmaddwd`) give i32 lane `k` of
// each block the sum over elements `4k..4k + 4` and `4k + 16..4k + 20`
// times 256: exactly the lanes of `q4_1_pair`. Two byte products and an
// i16 addition replace three of its four `pmaddwd` and two additions.

/// A pair's codes as its multi-row product takes them.
#[cfg(all(
    any(target_arch = "x86", target_arch = "x86_64"),
    target_feature = "avx2"
))]
type PairCodes = [safe_arch::m256i; 2];
#[cfg(not(all(
    any(target_arch = "x86", target_arch = "x86_64"),
    target_feature = "avx2"
)))]
type PairCodes = [i16x16; 4];

/// Activation vectors of a group per row: `pair_bytes` (8) or `pairs` (16).
const GROUP_VECTORS: usize = if Q4_1_BYTE_PRODUCTS { 8 } else { 16 };

/// The vectors of a row's activations that [`q4_1_product`] reads.
#[inline(always)]
fn pair_layout(x: &QuantizedActivations) -> &[i16x16] {
    if Q4_1_BYTE_PRODUCTS {
        &x.pair_bytes
    } else {
        &x.pairs
    }
}

/// The codes of a pair (its 32 code bytes read as `i16x16`) split for
/// [`q4_1_product`].
#[inline(always)]
fn q4_1_decode(codes: i16x16) -> PairCodes {
    #[cfg(all(
        any(target_arch = "x86", target_arch = "x86_64"),
        target_feature = "avx2"
    ))]
    {
        let nibbles = i16x16::splat(0x0f0f);
        let low = codes & nibbles;
        let high: i16x16 = (codes >> 4) & nibbles;
        [wide::bytemuck::cast(low), wide::bytemuck::cast(high)]
    }
    #[cfg(not(all(
        any(target_arch = "x86", target_arch = "x86_64"),
        target_feature = "avx2"
    )))]
    {
        super::q4_1_pair_codes(codes)
    }
}

/// 256 × the partial sums of a pair against one row's activation vectors
/// of the pair (two of `pair_bytes` or four of `pairs`): `q4_1_pair`'s
/// lanes.
#[inline(always)]
fn q4_1_product(c: &PairCodes, a: &[i16x16]) -> i32x8 {
    #[cfg(all(
        any(target_arch = "x86", target_arch = "x86_64"),
        target_feature = "avx2"
    ))]
    {
        use safe_arch::mul_u8i8_add_horizontal_saturating_m256i as maddubs;
        let low: i16x16 = wide::bytemuck::cast(maddubs(c[0], wide::bytemuck::cast(a[0])));
        let high: i16x16 = wide::bytemuck::cast(maddubs(c[1], wide::bytemuck::cast(a[1])));
        (low + high).dot(i16x16::splat(256))
    }
    #[cfg(not(all(
        any(target_arch = "x86", target_arch = "x86_64"),
        target_feature = "avx2"
    )))]
    {
        super::q4_1_pair_sum(c, a)
    }
}

/// Adds pair `I` of a Q4_1 group (the code bytes `lo` and `hi` of its two
/// blocks) to accumulator `I % 2` of each row, `a` being the rows'
/// activation vectors of the group and `d` their block scales in lane
/// order, as `Q4_1Sums::add_group` does for one row.
#[inline(always)]
fn q4_1_pair<const I: usize, const N: usize>(
    sums: &mut [Q4_1Sums; N],
    (lo, hi): (&[u8], &[u8]),
    a: &[&[i16x16; GROUP_VECTORS]; N],
    d: &[f32x8; N],
) {
    const PER_PAIR: usize = GROUP_VECTORS / 4;
    let c = q4_1_decode(load_two(lo, hi));
    for t in 0..N {
        let product = q4_1_product(&c, &a[t][PER_PAIR * I..PER_PAIR * (I + 1)]);
        let sum = f32x8::from_i32x8(product);
        sums[t].acc[I % 2] = sum.mul_add(pair_scale::<I>(d[t]), sums[t].acc[I % 2]);
    }
}

/// `Q4_1Sums::add_group` for `N` activation rows: the first `pairs` (1 to
/// 4) pairs of a group whose heads are `heads`, `codes(i)` giving the code
/// bytes of pair `i`, the group's first block being block `first` of the
/// row.
#[inline(always)]
fn q4_1_group<'a, const N: usize>(
    sums: &mut [Q4_1Sums; N],
    heads: i32x8,
    pairs: usize,
    codes: impl Fn(usize) -> (&'a [u8], &'a [u8]),
    acts: &[QuantizedActivations; N],
    first: usize,
) {
    let wd = f16_high_to_f32(heads << 16u32, F16_REBIAS_BY_256);
    let wm = f16_high_to_f32(heads, F16_REBIAS);
    let mut d = [f32x8::ZERO; N];
    for ((d, sums), x) in d.iter_mut().zip(sums.iter_mut()).zip(acts) {
        *d = wd * eight(&x.pair_scales, first);
        sums.mins = wm.mul_add(eight(&x.pair_sums, first), sums.mins);
    }
    let a = vectors::<GROUP_VECTORS, N>(acts, GROUP_VECTORS / 8 * first, pair_layout);
    q4_1_pair::<0, N>(sums, codes(0), &a, &d);
    if pairs > 1 {
        q4_1_pair::<1, N>(sums, codes(1), &a, &d);
    }
    if pairs > 2 {
        q4_1_pair::<2, N>(sums, codes(2), &a, &d);
    }
    if pairs > 3 {
        q4_1_pair::<3, N>(sums, codes(3), &a, &d);
    }
}

/// `Q4_1Sums::add_tail` for `N` activation rows, each from zero.
#[inline(always)]
fn q4_1_tail<const N: usize>(
    src: &[u8],
    at: usize,
    n: usize,
    acts: &[QuantizedActivations; N],
    first: usize,
) -> [Q4_1Sums; N] {
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
    let mut sums = [Q4_1Sums::ZERO; N];
    q4_1_group(&mut sums, heads & present, h, codes, acts, first);
    sums
}

/// [`q4_1_tail`] from a zero-padded copy of the `n` blocks, for a row at
/// the end of its matrix.
#[cold]
#[inline(never)]
fn q4_1_padded_tail<const N: usize>(
    blocks: &[u8],
    n: usize,
    acts: &[QuantizedActivations; N],
    first: usize,
) -> [Q4_1Sums; N] {
    let mut padded = [0u8; Q4_1_GROUP_BYTES];
    padded[..blocks.len()].copy_from_slice(blocks);
    q4_1_tail(&padded, 0, n, acts, first)
}

/// `dot_q4_1_fast` of one row with `N` activation rows (Q8_1, pair layout);
/// `rest` and `row_bytes` as there. Every block scale and minimum must be
/// finite.
#[inline(always)]
pub(in crate::quant) fn dot_q4_1_fast_rows<const N: usize>(
    rest: &[u8],
    row_bytes: usize,
    acts: &[QuantizedActivations; N],
) -> [f32; N] {
    const BB: usize = Q4_1_BLOCK_BYTES;
    let mut sums = [Q4_1Sums::ZERO; N];
    let blocks = row_bytes / BB;
    let whole = blocks / 8 * 8;
    let body = &rest[..whole * BB];
    // The heads of the next group are loaded before the codes of this one,
    // as in `dot_q4_1_fast`.
    let mut groups = body.chunks_exact(Q4_1_GROUP_BYTES).enumerate();
    let mut next = body.get(..Q4_1_GROUP_BYTES).map(group_heads::<BB>);
    while let (Some(heads), Some((g, group))) = (next, groups.next()) {
        let start = (g + 1) * Q4_1_GROUP_BYTES;
        next = body
            .get(start..start + Q4_1_GROUP_BYTES)
            .map(group_heads::<BB>);
        let codes = |i: usize| (&group[BB * i + 4..], &group[BB * (i + 4) + 4..]);
        q4_1_group(&mut sums, heads, 4, codes, acts, 8 * g);
    }
    let n = blocks - whole;
    if n > 0 {
        let at = whole * BB;
        let tails = if rest.len() >= at + Q4_1_GROUP_BYTES {
            q4_1_tail(rest, at, n, acts, whole)
        } else {
            q4_1_padded_tail(&rest[at..at + n * BB], n, acts, whole)
        };
        for (sum, tail) in sums.iter_mut().zip(tails) {
            sum.acc[0] += tail.acc[0] + tail.acc[1];
            sum.mins += tail.mins;
        }
    }
    let mut totals = [0f32; N];
    for (total, sum) in totals.iter_mut().zip(sums) {
        *total = sum.total();
    }
    totals
}

/// Adds block `K` of a group of eight 32-element blocks, whose codes `c`
/// are laid out as the rows' activation vectors `a` of the group (two
/// vectors a block), to accumulator `K % 2` of each row, `d` being the
/// rows' block scales.
#[inline(always)]
fn add_block<const K: usize, const N: usize>(
    acc: &mut [[f32x8; 2]; N],
    c: [i16x16; 2],
    a: &[&[i16x16; 16]; N],
    d: &[[f32; 8]; N],
) {
    for t in 0..N {
        let sum = f32x8::from_i32x8(q8_0_split_sum(c, &a[t][2 * K..2 * K + 2]));
        acc[t][K % 2] = sum.mul_add(f32x8::splat(d[t][K]), acc[t][K % 2]);
    }
}

/// Calls `add_block::<K, N>(acc, codes(K), a, d)` for each `K < n` (at
/// most 8), in order.
#[inline(always)]
fn add_blocks<const N: usize>(
    acc: &mut [[f32x8; 2]; N],
    n: usize,
    codes: impl Fn(usize) -> [i16x16; 2],
    a: &[&[i16x16; 16]; N],
    d: &[[f32; 8]; N],
) {
    add_block::<0, N>(acc, codes(0), a, d);
    if n > 1 {
        add_block::<1, N>(acc, codes(1), a, d);
    }
    if n > 2 {
        add_block::<2, N>(acc, codes(2), a, d);
    }
    if n > 3 {
        add_block::<3, N>(acc, codes(3), a, d);
    }
    if n > 4 {
        add_block::<4, N>(acc, codes(4), a, d);
    }
    if n > 5 {
        add_block::<5, N>(acc, codes(5), a, d);
    }
    if n > 6 {
        add_block::<6, N>(acc, codes(6), a, d);
    }
    if n > 7 {
        add_block::<7, N>(acc, codes(7), a, d);
    }
}

/// `q8_0_group` for `N` activation rows, the group's first block being
/// block `first` of the row.
#[cfg(not(all(
    any(target_arch = "x86", target_arch = "x86_64"),
    target_feature = "avx2"
)))]
#[inline(always)]
fn q8_0_group_rows<const N: usize>(
    group: &[u8],
    heads: i32x8,
    n: usize,
    acts: &[QuantizedActivations; N],
    first: usize,
    acc: &mut [[f32x8; 2]; N],
) {
    const BB: usize = Q8_0_BLOCK_BYTES;
    let wd = f16_high_to_f32(heads << 16u32, F16_REBIAS_BY_256);
    let mut d = [[0f32; 8]; N];
    for (d, x) in d.iter_mut().zip(acts) {
        *d = (wd * eight(&x.scales, first)).to_array();
    }
    let a = vectors::<16, N>(acts, 2 * first, |x| &x.split);
    let codes = |k: usize| super::q8_0_split_codes(&group[BB * k + 2..]);
    add_blocks(acc, n, codes, &a, &d);
}

/// `q8_0_tail` for `N` activation rows.
#[cfg(not(all(
    any(target_arch = "x86", target_arch = "x86_64"),
    target_feature = "avx2"
)))]
#[inline(always)]
fn q8_0_tail_rows<const N: usize>(
    group: &[u8],
    n: usize,
    acts: &[QuantizedActivations; N],
    first: usize,
) -> [f32x8; N] {
    let present = i32x8::splat(n as i32).simd_gt(i32x8::new([0, 1, 2, 3, 4, 5, 6, 7]));
    let mut acc = [[f32x8::ZERO; 2]; N];
    let heads = group_heads::<Q8_0_BLOCK_BYTES>(group) & present;
    q8_0_group_rows(group, heads, n, acts, first, &mut acc);
    let mut sums = [f32x8::ZERO; N];
    for (sum, [a, b]) in sums.iter_mut().zip(acc) {
        *sum = a + b;
    }
    sums
}

/// [`q8_0_tail_rows`] on a zero-padded copy, for the end of the matrix.
#[cfg(not(all(
    any(target_arch = "x86", target_arch = "x86_64"),
    target_feature = "avx2"
)))]
#[cold]
#[inline(never)]
fn q8_0_padded_tail_rows<const N: usize>(
    blocks: &[u8],
    n: usize,
    acts: &[QuantizedActivations; N],
    first: usize,
) -> [f32x8; N] {
    let mut padded = [0u8; Q8_0_GROUP_BYTES];
    padded[..blocks.len()].copy_from_slice(blocks);
    q8_0_tail_rows(&padded, n, acts, first)
}

// Byte products of the Q8_0 kernel (`Q8_0_BYTE_PRODUCTS`): `pmaddubsw`
// multiplies unsigned bytes with signed ones, so the kernel takes `|w|`
// (`pabsb`) as the unsigned operand, once per tile, and the activation
// codes with the sign of `w` applied (`psignb`: `x`, `-x`, or 0 where `w`
// is 0) as the signed one: `|w| · (sign(w) · x) = w · x`. Weight codes are
// any byte a file holds, −128 included: its `pabsb` is the byte 0x80, which
// `pmaddubsw` reads as the unsigned 128, right. Activation codes are within
// ±127 (`q8_codes` maps a block's largest magnitude to 127; a NaN product
// becomes 0 and, where the inverse scale overflows, an infinite one 0 or
// −1), so `-x` never wraps and a pair of products is at most 2 · 128 · 127
// = 32 512, below the i16 saturation at 32 767. The pairs of i16 lanes
// multiplied by 256 and added (`pmaddwd`) give i32 lane `k` of a block 256
// × the sum over elements `4k..4k + 4`: exactly the lanes of `q8_0_split`.
// Per block and activation row, a load, a sign, a byte product and one
// `pmaddwd` replace two `pmaddwd` reading memory and an addition (one
// instruction more, half the activation bytes read); the weight codes are
// loaded and made absolute once per tile instead of shifted and masked.

/// Adds block `K` of a group of eight Q8_0 blocks, whose code bytes are
/// `w`, to accumulator `K % 2` of each row, `a` being the rows' code bytes
/// of the group (a vector a block) and `d` their block scales, as
/// `q8_0_group` does for one row.
#[cfg(all(
    any(target_arch = "x86", target_arch = "x86_64"),
    target_feature = "avx2"
))]
#[inline(always)]
fn q8_0_byte_block<const K: usize, const N: usize>(
    acc: &mut [[f32x8; 2]; N],
    w: safe_arch::m256i,
    a: &[&[i16x16; 8]; N],
    d: &[[f32; 8]; N],
) {
    use safe_arch::{
        abs_i8_m256i, mul_u8i8_add_horizontal_saturating_m256i as maddubs, sign_apply_i8_m256i,
    };
    let magnitude = abs_i8_m256i(w);
    for t in 0..N {
        let x = sign_apply_i8_m256i(wide::bytemuck::cast(a[t][K]), w);
        let pairs: i16x16 = wide::bytemuck::cast(maddubs(magnitude, x));
        let sum = f32x8::from_i32x8(pairs.dot(i16x16::splat(256)));
        acc[t][K % 2] = sum.mul_add(f32x8::splat(d[t][K]), acc[t][K % 2]);
    }
}

/// The block scales of a group for each of `N` activation rows: the weight
/// scales in `heads` (lanes from the group's block count on zero) times the
/// rows' scales `s`, as `q8_0_group` forms them for one row.
#[cfg(all(
    any(target_arch = "x86", target_arch = "x86_64"),
    target_feature = "avx2"
))]
#[inline(always)]
fn q8_0_byte_scales<const N: usize>(heads: i32x8, s: &[&[f32; 8]; N]) -> [[f32; 8]; N] {
    let wd = f16_high_to_f32(heads << 16u32, F16_REBIAS_BY_256);
    let mut d = [[0f32; 8]; N];
    for (d, s) in d.iter_mut().zip(s) {
        *d = (wd * f32x8::new(**s)).to_array();
    }
    d
}

/// `q8_0_group` for `N` activation rows with byte products: the first `n`
/// blocks of `group`, `a` being the rows' code bytes of the group and `d`
/// the block scales of [`q8_0_byte_scales`].
#[cfg(all(
    any(target_arch = "x86", target_arch = "x86_64"),
    target_feature = "avx2"
))]
#[inline(always)]
fn q8_0_byte_group<const N: usize>(
    group: &[u8],
    n: usize,
    a: &[&[i16x16; 8]; N],
    d: &[[f32; 8]; N],
    acc: &mut [[f32x8; 2]; N],
) {
    const BB: usize = Q8_0_BLOCK_BYTES;
    let codes = |k: usize| -> safe_arch::m256i {
        let mut bytes = [0u8; 32];
        bytes.copy_from_slice(&group[BB * k + 2..BB * (k + 1)]);
        wide::bytemuck::cast(bytes)
    };
    q8_0_byte_block::<0, N>(acc, codes(0), a, d);
    if n > 1 {
        q8_0_byte_block::<1, N>(acc, codes(1), a, d);
    }
    if n > 2 {
        q8_0_byte_block::<2, N>(acc, codes(2), a, d);
    }
    if n > 3 {
        q8_0_byte_block::<3, N>(acc, codes(3), a, d);
    }
    if n > 4 {
        q8_0_byte_block::<4, N>(acc, codes(4), a, d);
    }
    if n > 5 {
        q8_0_byte_block::<5, N>(acc, codes(5), a, d);
    }
    if n > 6 {
        q8_0_byte_block::<6, N>(acc, codes(6), a, d);
    }
    if n > 7 {
        q8_0_byte_block::<7, N>(acc, codes(7), a, d);
    }
}

/// Group `g` of each row's code bytes and `scales`.
#[cfg(all(
    any(target_arch = "x86", target_arch = "x86_64"),
    target_feature = "avx2"
))]
#[inline(always)]
#[allow(clippy::type_complexity)]
fn byte_group_acts<'a, const N: usize>(
    bytes: &[&'a [i16x16]; N],
    scales: &[&'a [f32]; N],
    g: usize,
) -> ([&'a [i16x16; 8]; N], [&'a [f32; 8]; N]) {
    let mut a: [&[i16x16; 8]; N] = [&[i16x16::ZERO; 8]; N];
    let mut s: [&[f32; 8]; N] = [&[0.0; 8]; N];
    for t in 0..N {
        a[t] = match bytes[t][8 * g..8 * g + 8].try_into() {
            Ok(v) => v,
            Err(_) => unreachable!("a slice of 8 vectors is an array of 8"),
        };
        s[t] = match scales[t][8 * g..8 * g + 8].try_into() {
            Ok(v) => v,
            Err(_) => unreachable!("a slice of 8 scales is an array of 8"),
        };
    }
    (a, s)
}

/// The sums of the last, partial group of a row (`n`, 1 to 7, blocks at
/// the start of `group`, which holds at least [`Q8_0_GROUP_BYTES`] bytes),
/// from zero, as `q8_0_tail` forms them.
#[cfg(all(
    any(target_arch = "x86", target_arch = "x86_64"),
    target_feature = "avx2"
))]
#[inline(always)]
fn q8_0_byte_tail<const N: usize>(
    group: &[u8],
    n: usize,
    a: &[&[i16x16; 8]; N],
    s: &[&[f32; 8]; N],
) -> [f32x8; N] {
    let present = i32x8::splat(n as i32).simd_gt(i32x8::new([0, 1, 2, 3, 4, 5, 6, 7]));
    let d = q8_0_byte_scales(group_heads::<Q8_0_BLOCK_BYTES>(group) & present, s);
    let mut acc = [[f32x8::ZERO; 2]; N];
    q8_0_byte_group(group, n, a, &d, &mut acc);
    let mut sums = [f32x8::ZERO; N];
    for (sum, [a, b]) in sums.iter_mut().zip(acc) {
        *sum = a + b;
    }
    sums
}

/// [`q8_0_byte_tail`] on a zero-padded copy, for the end of the matrix.
#[cfg(all(
    any(target_arch = "x86", target_arch = "x86_64"),
    target_feature = "avx2"
))]
#[cold]
#[inline(never)]
fn q8_0_padded_byte_tail<const N: usize>(
    blocks: &[u8],
    n: usize,
    a: &[&[i16x16; 8]; N],
    s: &[&[f32; 8]; N],
) -> [f32x8; N] {
    let mut padded = [0u8; Q8_0_GROUP_BYTES];
    padded[..blocks.len()].copy_from_slice(blocks);
    q8_0_byte_tail(&padded, n, a, s)
}

/// A tile of `N` Q8_0 activation rows as the multi-row Q8_0 kernel reads
/// them: each row's vectors and scales sliced to whole groups once per
/// tile, not once per weight row.
pub(in crate::quant) struct Q8_0Tile<'a, const N: usize> {
    /// The rows, for the `i16x16` products.
    #[cfg(not(all(
        any(target_arch = "x86", target_arch = "x86_64"),
        target_feature = "avx2"
    )))]
    acts: &'a [QuantizedActivations; N],
    /// Each row's `pair_bytes` (the codes in element order), whole groups.
    #[cfg(all(
        any(target_arch = "x86", target_arch = "x86_64"),
        target_feature = "avx2"
    ))]
    bytes: [&'a [i16x16]; N],
    /// Each row's `scales`, whole groups.
    #[cfg(all(
        any(target_arch = "x86", target_arch = "x86_64"),
        target_feature = "avx2"
    ))]
    scales: [&'a [f32]; N],
}

impl<'a, const N: usize> Q8_0Tile<'a, N> {
    /// The tile of `acts`, rows of `cols` activations.
    #[inline(always)]
    pub(in crate::quant) fn new(acts: &'a [QuantizedActivations; N], cols: usize) -> Self {
        #[cfg(all(
            any(target_arch = "x86", target_arch = "x86_64"),
            target_feature = "avx2"
        ))]
        {
            let groups = (cols / 32).div_ceil(8);
            let mut bytes: [&[i16x16]; N] = [&[]; N];
            let mut scales: [&[f32]; N] = [&[]; N];
            for ((bytes, scales), x) in bytes.iter_mut().zip(&mut scales).zip(acts) {
                *bytes = &x.pair_bytes[..8 * groups];
                *scales = &x.scales[..8 * groups];
            }
            Self { bytes, scales }
        }
        #[cfg(not(all(
            any(target_arch = "x86", target_arch = "x86_64"),
            target_feature = "avx2"
        )))]
        {
            let _ = cols;
            Self { acts }
        }
    }

    /// `dot_q8_0_fast` of one row with the tile's rows; `rest` and
    /// `row_bytes` as there, `row_bytes` being that of the tile's `cols`.
    /// Every block scale must be finite.
    #[inline(always)]
    pub(in crate::quant) fn dot(&self, rest: &[u8], row_bytes: usize) -> [f32; N] {
        #[cfg(all(
            any(target_arch = "x86", target_arch = "x86_64"),
            target_feature = "avx2"
        ))]
        {
            self.dot_bytes(rest, row_bytes)
        }
        #[cfg(not(all(
            any(target_arch = "x86", target_arch = "x86_64"),
            target_feature = "avx2"
        )))]
        {
            dot_q8_0_split_rows(rest, row_bytes, self.acts)
        }
    }

    /// [`dot`](Self::dot) with byte products (see
    /// [`Q8_0_BYTE_PRODUCTS`](super::super::activations::Q8_0_BYTE_PRODUCTS)).
    #[cfg(all(
        any(target_arch = "x86", target_arch = "x86_64"),
        target_feature = "avx2"
    ))]
    #[inline(always)]
    fn dot_bytes(&self, rest: &[u8], row_bytes: usize) -> [f32; N] {
        const BB: usize = Q8_0_BLOCK_BYTES;
        let blocks = row_bytes / BB;
        let whole = blocks / 8;
        let mut acc = [[f32x8::ZERO; 2]; N];
        let body = &rest[..whole * Q8_0_GROUP_BYTES];
        for (g, group) in body.chunks_exact(Q8_0_GROUP_BYTES).enumerate() {
            let (a, s) = byte_group_acts(&self.bytes, &self.scales, g);
            let d = q8_0_byte_scales(group_heads::<BB>(group), &s);
            q8_0_byte_group(group, 8, &a, &d, &mut acc);
        }
        let n = blocks - 8 * whole;
        if n > 0 {
            let (a, s) = byte_group_acts(&self.bytes, &self.scales, whole);
            let at = whole * Q8_0_GROUP_BYTES;
            let tails = match rest.get(at..at + Q8_0_GROUP_BYTES) {
                Some(group) => q8_0_byte_tail(group, n, &a, &s),
                None => q8_0_padded_byte_tail(&rest[at..at + n * BB], n, &a, &s),
            };
            for (acc, tail) in acc.iter_mut().zip(tails) {
                acc[0] += tail;
            }
        }
        let mut totals = [0f32; N];
        for (total, [a, b]) in totals.iter_mut().zip(acc) {
            *total = (a + b).reduce_add();
        }
        totals
    }
}

/// `dot_q8_0_fast` of one row with `N` activation rows with the `i16x16`
/// products of the one-row kernel (even/odd layout); `rest` and `row_bytes`
/// as there. Every block scale must be finite.
#[cfg(not(all(
    any(target_arch = "x86", target_arch = "x86_64"),
    target_feature = "avx2"
)))]
#[inline(always)]
fn dot_q8_0_split_rows<const N: usize>(
    rest: &[u8],
    row_bytes: usize,
    acts: &[QuantizedActivations; N],
) -> [f32; N] {
    const BB: usize = Q8_0_BLOCK_BYTES;
    let mut acc = [[f32x8::ZERO; 2]; N];
    let blocks = row_bytes / BB;
    let whole = blocks / 8 * 8;
    let body = &rest[..whole * BB];
    for (g, group) in body.chunks_exact(Q8_0_GROUP_BYTES).enumerate() {
        q8_0_group_rows(group, group_heads::<BB>(group), 8, acts, 8 * g, &mut acc);
    }
    let n = blocks - whole;
    if n > 0 {
        let at = whole * BB;
        let tails = match rest.get(at..at + Q8_0_GROUP_BYTES) {
            Some(group) => q8_0_tail_rows(group, n, acts, whole),
            None => q8_0_padded_tail_rows(&rest[at..at + n * BB], n, acts, whole),
        };
        for (acc, tail) in acc.iter_mut().zip(tails) {
            acc[0] += tail;
        }
    }
    let mut totals = [0f32; N];
    for (total, [a, b]) in totals.iter_mut().zip(acc) {
        *total = (a + b).reduce_add();
    }
    totals
}

/// `dot_q4_0` (the generic 32-element kernel with Q4_0 blocks) of one row
/// with `N` activation rows (Q8_0, plain layout).
#[inline(always)]
pub(in crate::quant) fn dot_q4_0_rows<const N: usize>(
    row: &[u8],
    acts: &[QuantizedActivations; N],
) -> [f32; N] {
    const BB: usize = Q4_0_BLOCK_BYTES;
    let mut acc = [[f32x8::ZERO; 2]; N];
    for (g, weights) in row.chunks(8 * BB).enumerate() {
        let heads = gather_head::<BB>(weights);
        let wd = f16x8_to_f32(heads & i32x8::splat(0xffff));
        let mut d = [[0f32; 8]; N];
        for (d, x) in d.iter_mut().zip(acts) {
            *d = (wd * eight(&x.scales, 8 * g)).to_array();
        }
        let a = vectors::<16, N>(acts, 16 * g, |x| &x.quants);
        // The one-row kernel adds block k of a group to accumulator k % 2,
        // whether the group is whole or not.
        let codes = |k: usize| q4_0_codes(&weights[BB * k + 2..BB * (k + 1)]);
        add_blocks(&mut acc, weights.len() / BB, codes, &a, &d);
    }
    let mut totals = [0f32; N];
    for (total, [a, b]) in totals.iter_mut().zip(acc) {
        *total = (a + b + f32x8::ZERO).reduce_add();
    }
    totals
}

/// Calls `block(b, codes, d, m, b % 2)` for every 32-element block `b` of
/// `row` as `for_each_f32_block` does (the same scales, converted the same
/// way), with the block's index in the row instead of its index in its
/// group, and its parity as a literal (so that an accumulator it selects
/// can stay in a register).
#[inline(always)]
fn for_each_f32_block_at<const BLOCK_BYTES: usize, const HEAD: usize>(
    row: &[u8],
    mut block: impl FnMut(usize, &[u8], f32, f32, usize),
) {
    let groups = row.chunks_exact(8 * BLOCK_BYTES);
    let tail = groups.remainder();
    let mut b = 0;
    for group in groups {
        let (d, m) = group_scales_f32::<BLOCK_BYTES>(group);
        for k in (0..8).step_by(2) {
            let codes = |k: usize| &group[k * BLOCK_BYTES + HEAD..(k + 1) * BLOCK_BYTES];
            block(b + k, codes(k), d[k], m[k], 0);
            block(b + k + 1, codes(k + 1), d[k + 1], m[k + 1], 1);
        }
        b += 8;
    }
    // Whole groups hold an even number of blocks: the tail starts even.
    let mut blocks = tail.chunks_exact(BLOCK_BYTES);
    let head = |blk: &[u8]| (f16_at(blk, 0), if HEAD == 4 { f16_at(blk, 2) } else { 0.0 });
    while let Some(blk) = blocks.next() {
        let (d, m) = head(blk);
        block(b, &blk[HEAD..], d, m, 0);
        if let Some(blk) = blocks.next() {
            let (d, m) = head(blk);
            block(b + 1, &blk[HEAD..], d, m, 1);
        }
        b += 2;
    }
}

/// The 32 activations of block `b` of each row.
#[inline(always)]
fn block_x<'a, const N: usize>(x: &[&'a [f32]; N], b: usize) -> [&'a [f32]; N] {
    let mut out: [&[f32]; N] = [&[]; N];
    for (out, x) in out.iter_mut().zip(x) {
        *out = &x[32 * b..32 * b + 32];
    }
    out
}

/// `dot_f32_q4_1` of one row with `N` rows of f32 activations: each
/// block's weights are formed once and multiplied with every row.
#[inline(always)]
pub(in crate::quant) fn dot_f32_q4_1_rows<const N: usize>(row: &[u8], x: &[&[f32]; N]) -> [f32; N] {
    let mut acc = [[f32x8::ZERO; 4]; N];
    for_each_f32_block_at::<Q4_1_BLOCK_BYTES, 4>(row, |b, codes, d, m, _| {
        let [b0, b1] = widen_u8_whole(codes);
        let fifteen = i32x8::splat(15);
        let nibbles = [b0 & fifteen, b1 & fifteen, b0 >> 4u32, b1 >> 4u32];
        let (d, m) = (f32x8::splat(d), f32x8::splat(m));
        let w = nibbles.map(|q| f32x8::from_i32x8(q).mul_add(d, m));
        for (acc, x) in acc.iter_mut().zip(block_x(x, b)) {
            for ((w, x), acc) in w.iter().zip(x.chunks_exact(8)).zip(acc) {
                *acc = w.mul_add(f32x8_of(x), *acc);
            }
        }
    });
    let mut totals = [0f32; N];
    for (total, acc) in totals.iter_mut().zip(acc) {
        *total = ((acc[0] + acc[1]) + (acc[2] + acc[3])).reduce_add();
    }
    totals
}

/// `dot_f32_q8_0` (`Q4_0` false) or `dot_f32_q4_0` (`Q4_0` true) of one
/// row with `N` rows of f32 activations: each block's codes are converted
/// once and multiplied with every row.
#[inline(always)]
pub(in crate::quant) fn dot_f32_q8_0_q4_0_rows<const Q4_0: bool, const N: usize>(
    row: &[u8],
    x: &[&[f32]; N],
) -> [f32; N] {
    let mut acc = [[f32x8::ZERO; 2]; N];
    // Block b goes to accumulator b % 2, as in the one-row kernels.
    let mut add = |b: usize, codes: [i32x8; 4], d: f32, parity: usize| {
        let c = codes.map(f32x8::from_i32x8);
        for (acc, x) in acc.iter_mut().zip(block_x(x, b)) {
            let sum = codes_dot_x_f32(&c, x);
            acc[parity] = sum.mul_add(f32x8::splat(d), acc[parity]);
        }
    };
    if Q4_0 {
        for_each_f32_block_at::<Q4_0_BLOCK_BYTES, 2>(row, |b, codes, d, _, parity| {
            let [b0, b1] = widen_u8(codes);
            let (fifteen, eight) = (i32x8::splat(15), i32x8::splat(8));
            let nibbles = [b0 & fifteen, b1 & fifteen, b0 >> 4u32, b1 >> 4u32];
            add(b, nibbles.map(|q| q - eight), d, parity);
        });
    } else {
        for_each_f32_block_at::<Q8_0_BLOCK_BYTES, 2>(row, |b, codes, d, _, parity| {
            let [c0, c1] = widen_i8(&codes[..16]);
            let [c2, c3] = widen_i8(&codes[16..32]);
            add(b, [c0, c1, c2, c3], d, parity);
        });
    }
    let mut totals = [0f32; N];
    for (total, [a, b]) in totals.iter_mut().zip(acc) {
        *total = (a + b).reduce_add();
    }
    totals
}
