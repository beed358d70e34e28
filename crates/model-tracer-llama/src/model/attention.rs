//! The arithmetic of attention: scores of a query against cached keys and
//! the weighted sum of cached values, with SIMD lanes over positions (keys)
//! or over dimensions (values), each lane computing exactly the scalar
//! operations of the plain loops, in their order.
//!
//! Keys are stored in *panels*: for one layer and one KV head, the keys of
//! 8 consecutive cache slots form `head_dim` vectors of 8 lanes, vector
//! `d` holding dimension `d` of each slot's key (lane `slot % 8`). A score
//! is then one lane of a running sum over `d`, `acc += q[d] · panel[d]`,
//! from the neutral element of `f32` summation, one multiply and one add
//! per dimension: the bits of `Σ_d q[d]·k[d]` summed in order, as the
//! scalar [`dot`] gives them, with 8 positions a vector and up to 8 panels
//! (64 positions) in flight, where the scalar loop waits on every addition.
//! Reading a panel reads `head_dim × 32` contiguous bytes, whichever
//! position it holds.
//!
//! Values keep the layout of a key-value pair per slot (`[kv_dim]` a
//! slot): the weighted sum of a head runs over positions in chronological
//! order with the head's `head_dim` sums held in vectors, lane `d` adding
//! `a_t · v_t[d]` for one position after another from `0.0`, as the scalar
//! loop does.

use wide::f32x8;

use crate::quant::{f16_to_f32, f32_to_f16};

/// Positions a key panel holds.
pub(super) const PANEL: usize = 8;

/// How the cache stores a key or value element: [`f32`], or [`F16`]
/// (half the bytes, llama.cpp's default cache type), read as `f32` in
/// the kernels. Converting an `F16` to `f32` is exact, so a kernel over
/// `F16` elements computes bit for bit what it computes over the `f32`
/// values they hold.
pub(super) trait Element: Copy + Send + Sync + 'static {
    /// Eight elements: one key panel vector.
    type Lanes: Copy + Send + Sync;
    /// A panel vector of zeros.
    const ZERO: Self::Lanes;
    /// The element nearest `x` (ties to even).
    fn from_f32(x: f32) -> Self;
    /// The element's value.
    fn to_f32(self) -> f32;
    /// A panel vector's values.
    fn lanes(v: Self::Lanes) -> f32x8;
    /// The first eight values of `v`.
    fn load(v: &[Self]) -> f32x8;
    /// Sets lane `lane` of a panel vector to `x`.
    fn set(v: &mut Self::Lanes, lane: usize, x: Self);
    /// Lane `lane` of a panel vector.
    fn get(v: &Self::Lanes, lane: usize) -> Self;
    /// `values` as elements: themselves for `f32`, converted into
    /// `scratch` for `F16`.
    fn chunk<'a>(values: &'a [f32], scratch: &'a mut Vec<F16>) -> &'a [Self];
    /// `x` rounded to the element type, as `f32`.
    #[inline(always)]
    fn round(x: f32) -> f32 {
        Self::from_f32(x).to_f32()
    }
}

impl Element for f32 {
    type Lanes = f32x8;
    const ZERO: f32x8 = f32x8::ZERO;
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn lanes(v: f32x8) -> f32x8 {
        v
    }
    #[inline(always)]
    fn load(v: &[f32]) -> f32x8 {
        let mut lanes = [0.0; PANEL];
        lanes.copy_from_slice(&v[..PANEL]);
        f32x8::new(lanes)
    }
    #[inline(always)]
    fn set(v: &mut f32x8, lane: usize, x: f32) {
        wide::bytemuck::cast_mut::<f32x8, [f32; PANEL]>(v)[lane] = x;
    }
    #[inline(always)]
    fn get(v: &f32x8, lane: usize) -> f32 {
        wide::bytemuck::cast_ref::<f32x8, [f32; PANEL]>(v)[lane]
    }
    #[inline(always)]
    fn chunk<'a>(values: &'a [f32], _: &'a mut Vec<F16>) -> &'a [f32] {
        values
    }
}

/// An IEEE binary16 element of the cache (its bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(transparent)]
pub(super) struct F16(pub u16);

impl Element for F16 {
    type Lanes = [F16; PANEL];
    const ZERO: [F16; PANEL] = [F16(0); PANEL];
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        F16(f32_to_f16(x))
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16_to_f32(self.0)
    }
    #[inline(always)]
    fn lanes(v: [F16; PANEL]) -> f32x8 {
        widen(&v)
    }
    #[inline(always)]
    fn load(v: &[F16]) -> f32x8 {
        let mut lanes = [F16(0); PANEL];
        lanes.copy_from_slice(&v[..PANEL]);
        widen(&lanes)
    }
    #[inline(always)]
    fn set(v: &mut [F16; PANEL], lane: usize, x: F16) {
        v[lane] = x;
    }
    #[inline(always)]
    fn get(v: &[F16; PANEL], lane: usize) -> F16 {
        v[lane]
    }
    fn chunk<'a>(values: &'a [f32], scratch: &'a mut Vec<F16>) -> &'a [F16] {
        scratch.clear();
        scratch.extend(values.iter().map(|&v| F16::from_f32(v)));
        scratch
    }
}

/// Eight f16 values as `f32`: one instruction where the target has F16C
/// (every x86-64-v3 machine), else lane by lane; the same values either
/// way (the conversion is exact), NaN payloads aside.
#[inline(always)]
#[cfg(all(target_arch = "x86_64", target_feature = "f16c"))]
fn widen(v: &[F16; PANEL]) -> f32x8 {
    use std::arch::x86_64::{__m128i, _mm256_cvtph_ps, _mm_loadu_si128};
    // SAFETY: F16C is enabled at compile time; the unaligned load reads
    // the 16 bytes of `v`.
    let wide = unsafe { _mm256_cvtph_ps(_mm_loadu_si128(v.as_ptr().cast::<__m128i>())) };
    wide::bytemuck::cast(wide)
}

#[inline(always)]
#[cfg(not(all(target_arch = "x86_64", target_feature = "f16c")))]
fn widen(v: &[F16; PANEL]) -> f32x8 {
    f32x8::new(v.map(|h| f16_to_f32(h.0)))
}

/// Panels scored together in one sweep over the dimensions: 8 chains of
/// additions in flight, 8 accumulators and a broadcast query element in
/// AVX2's 16 registers.
const SWEEP: usize = 8;

/// The value `f32` summation starts from (`-0.0` in today's Rust), so that
/// a lane's sum is bit for bit that of `Iterator::sum`.
#[inline(always)]
fn sum_start() -> f32 {
    std::iter::empty::<f32>().sum()
}

/// `a · b`, summed in order: the scores' scalar definition, which
/// [`panel_scores`] equals bit for bit.
#[cfg(test)]
pub(super) fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(a, b)| a * b).sum::<f32>()
}

/// Panels of `capacity` slots (rounded up to whole panels).
#[inline]
pub(super) fn panels(capacity: usize) -> usize {
    capacity.div_ceil(PANEL)
}

/// Index, in the `f32` view of a panel array of one head
/// (`[panels × head_dim]` vectors), of dimension `d` of the key in `slot`.
#[inline(always)]
pub(super) fn panel_index(slot: usize, d: usize, head_dim: usize) -> usize {
    ((slot / PANEL) * head_dim + d) * PANEL + slot % PANEL
}

/// Sets dimension `d` of the key in `slot` of one head's panels to `k`.
#[inline(always)]
pub(super) fn set_key<E: Element>(
    panels: &mut [E::Lanes],
    slot: usize,
    d: usize,
    head_dim: usize,
    k: E,
) {
    let i = panel_index(slot, d, head_dim);
    E::set(&mut panels[i / PANEL], i % PANEL, k);
}

/// Dimension `d` of the key in `slot` of one head's panels.
#[inline(always)]
pub(super) fn get_key<E: Element>(
    panels: &[E::Lanes],
    slot: usize,
    d: usize,
    head_dim: usize,
) -> E {
    let i = panel_index(slot, d, head_dim);
    E::get(&panels[i / PANEL], i % PANEL)
}

/// Writes `keys: [n × stride]` (rows of `head_dim` floats from offset
/// `at` of each row), rounded to the element type `E` (the cache's), into
/// the first `n` slots of `panels`
/// (`[panels(n) × head_dim]` vectors, grown as needed).
pub(super) fn fill_panels<E: Element>(
    panels: &mut Vec<f32x8>,
    keys: &[f32],
    n: usize,
    stride: usize,
    at: usize,
    head_dim: usize,
) {
    let need = self::panels(n) * head_dim;
    if panels.len() < need {
        panels.resize(need, f32x8::splat(0.0));
    }
    for (slot, key) in keys.chunks_exact(stride).take(n).enumerate() {
        for (d, &k) in key[at..at + head_dim].iter().enumerate() {
            set_key::<f32>(panels, slot, d, head_dim, E::round(k));
        }
    }
}

/// Scores of the query `q: [head_dim]` against the keys of the first `n`
/// slots of `panels` (`[panels × head_dim]` vectors), times `scale`, into
/// `out[slot]`; `out` holds whole panels (`panels(n) · 8` values; the
/// lanes past `n` get the scores of whatever those slots hold).
///
/// `out[slot]` is bit for bit `dot(q, key(slot)) * scale`.
#[inline]
pub(super) fn panel_scores<E: Element>(
    q: &[f32],
    panels: &[E::Lanes],
    head_dim: usize,
    n: usize,
    scale: f32,
    out: &mut [f32],
) {
    let q = &q[..head_dim];
    let count = self::panels(n);
    let (panels, out) = (&panels[..count * head_dim], &mut out[..count * PANEL]);
    let mut p = 0;
    while p + SWEEP <= count {
        sweep::<E, SWEEP>(q, &panels[p * head_dim..], scale, &mut out[p * PANEL..]);
        p += SWEEP;
    }
    let (panels, out) = (&panels[p * head_dim..], &mut out[p * PANEL..]);
    match count - p {
        0 => {}
        1 => sweep::<E, 1>(q, panels, scale, out),
        2 => sweep::<E, 2>(q, panels, scale, out),
        3 => sweep::<E, 3>(q, panels, scale, out),
        4 => sweep::<E, 4>(q, panels, scale, out),
        5 => sweep::<E, 5>(q, panels, scale, out),
        6 => sweep::<E, 6>(q, panels, scale, out),
        _ => sweep::<E, 7>(q, panels, scale, out),
    }
}

/// [`panel_scores`] of the `g` query heads of one KV group,
/// `q: [g × head_dim]`, against the same keys, into
/// `out[h·out_stride..]` for head `h`: each key vector is read (and
/// widened) once for the heads of the group. Every score is bit for bit
/// what [`panel_scores`] gives its head alone.
pub(super) fn group_scores<E: Element>(
    q: &[f32],
    g: usize,
    (panels, head_dim, n): (&[E::Lanes], usize, usize),
    scale: f32,
    out: &mut [f32],
    out_stride: usize,
) {
    match g {
        2 => heads_scores::<E, 2>(q, panels, head_dim, n, scale, out, out_stride),
        3 => heads_scores::<E, 3>(q, panels, head_dim, n, scale, out, out_stride),
        4 => heads_scores::<E, 4>(q, panels, head_dim, n, scale, out, out_stride),
        _ => {
            for (q, out) in q
                .chunks_exact(head_dim)
                .zip(out.chunks_mut(out_stride))
                .take(g)
            {
                panel_scores::<E>(q, panels, head_dim, n, scale, out);
            }
        }
    }
}

/// Panels a sweep of [`heads_scores`] takes: `G × HEAD_SWEEP`
/// accumulators, the widened keys and a broadcast query element in
/// AVX2's 16 registers for `G` up to 3.
const HEAD_SWEEP: usize = 4;

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn heads_scores<E: Element, const G: usize>(
    q: &[f32],
    panels: &[E::Lanes],
    head_dim: usize,
    n: usize,
    scale: f32,
    out: &mut [f32],
    out_stride: usize,
) {
    let count = self::panels(n);
    let mut p = 0;
    while p + HEAD_SWEEP <= count {
        let at = p * PANEL;
        sweep_heads::<E, G, HEAD_SWEEP>(
            q,
            &panels[p * head_dim..],
            head_dim,
            scale,
            out,
            (out_stride, at),
        );
        p += HEAD_SWEEP;
    }
    if p < count {
        // the last panels head by head
        for (h, q) in q.chunks_exact(head_dim).take(G).enumerate() {
            let out = &mut out[h * out_stride + p * PANEL..];
            panel_scores::<E>(
                q,
                &panels[p * head_dim..],
                head_dim,
                n - p * PANEL,
                scale,
                out,
            );
        }
    }
}

/// Scores of `G` heads against `B` consecutive panels, one pass over the
/// dimensions, into `out[h·out_stride + at..]`.
#[inline(always)]
fn sweep_heads<E: Element, const G: usize, const B: usize>(
    q: &[f32],
    panels: &[E::Lanes],
    hd: usize,
    scale: f32,
    out: &mut [f32],
    (out_stride, at): (usize, usize),
) {
    let panels: [&[E::Lanes]; B] = std::array::from_fn(|b| &panels[b * hd..(b + 1) * hd]);
    let qs: [&[f32]; G] = std::array::from_fn(|h| &q[h * hd..(h + 1) * hd]);
    let mut acc = [[f32x8::splat(sum_start()); B]; G];
    for d in 0..hd {
        let k: [f32x8; B] = std::array::from_fn(|b| E::lanes(panels[b][d]));
        for (acc, q) in acc.iter_mut().zip(&qs) {
            let qd = f32x8::splat(q[d]);
            for (a, k) in acc.iter_mut().zip(&k) {
                *a += qd * *k;
            }
        }
    }
    let scale = f32x8::splat(scale);
    for (h, acc) in acc.iter().enumerate() {
        let out = &mut out[h * out_stride + at..][..B * PANEL];
        for (a, out) in acc.iter().zip(out.chunks_exact_mut(PANEL)) {
            out.copy_from_slice(&(*a * scale).to_array());
        }
    }
}

/// Scores of `q` against `B` consecutive panels, one pass over the
/// dimensions with `B` accumulators.
#[inline(always)]
fn sweep<E: Element, const B: usize>(q: &[f32], panels: &[E::Lanes], scale: f32, out: &mut [f32]) {
    let hd = q.len();
    let panels: [&[E::Lanes]; B] = std::array::from_fn(|b| &panels[b * hd..(b + 1) * hd]);
    let mut acc = [f32x8::splat(sum_start()); B];
    for (d, &qd) in q.iter().enumerate() {
        let qd = f32x8::splat(qd);
        for (a, panel) in acc.iter_mut().zip(&panels) {
            *a += qd * E::lanes(panel[d]);
        }
    }
    let scale = f32x8::splat(scale);
    for (a, out) in acc.iter().zip(out.chunks_exact_mut(PANEL)) {
        out.copy_from_slice(&(*a * scale).to_array());
    }
}

/// `out[d] = Σ_j weights[j] · value(j)[d]` over `j` in order, for the
/// `out.len()` dimensions of a head (`value(j)` has at least as many):
/// bit for bit `out.fill(0.0)` and then `out[d] += weights[j] * v[d]`
/// for one `j` after another.
#[inline]
pub(super) fn weighted_values<'v, E: Element>(
    out: &mut [f32],
    weights: &[f32],
    value: impl Fn(usize) -> &'v [E] + Copy,
) {
    let hd = out.len();
    let mut d0 = 0;
    while d0 + 8 * PANEL <= hd {
        value_block::<E, 8>(&mut out[d0..d0 + 8 * PANEL], weights, value, d0);
        d0 += 8 * PANEL;
    }
    while d0 + PANEL <= hd {
        value_block::<E, 1>(&mut out[d0..d0 + PANEL], weights, value, d0);
        d0 += PANEL;
    }
    if d0 < hd {
        let out = &mut out[d0..];
        out.fill(0.0);
        for (j, &a) in weights.iter().enumerate() {
            for (o, &v) in out.iter_mut().zip(&value(j)[d0..]) {
                *o += a * v.to_f32();
            }
        }
    }
}

/// [`weighted_values`] of `V` vectors of dimensions from `d0`.
#[inline(always)]
fn value_block<'v, E: Element, const V: usize>(
    out: &mut [f32],
    weights: &[f32],
    value: impl Fn(usize) -> &'v [E],
    d0: usize,
) {
    let mut acc = [f32x8::splat(0.0); V];
    for (j, &a) in weights.iter().enumerate() {
        let a = f32x8::splat(a);
        let v = &value(j)[d0..d0 + V * PANEL];
        for (acc, v) in acc.iter_mut().zip(v.chunks_exact(PANEL)) {
            *acc += a * E::load(v);
        }
    }
    for (acc, out) in acc.iter().zip(out.chunks_exact_mut(PANEL)) {
        out.copy_from_slice(&acc.to_array());
    }
}

/// Query heads that [`group_values`] takes in one pass.
const GROUP: usize = 4;

/// [`weighted_values`] of `g` heads that share their values (one KV
/// group), each value vector fetched once for all of them: head `i`'s
/// weights are `att[i·att_stride..][..n]` and its sums go to
/// `out[i·head_dim..][..head_dim]`. Each head's sums are bit for bit
/// those [`weighted_values`] gives it alone.
pub(super) fn group_values<'v, E: Element>(
    out: &mut [f32],
    g: usize,
    head_dim: usize,
    att: &[f32],
    att_stride: usize,
    n: usize,
    value: impl Fn(usize) -> &'v [E] + Copy,
) {
    group_values_by(out, g, head_dim, |i| &att[i * att_stride..][..n], value);
}

/// [`group_values`] with head `i`'s weights `weights(i)` (all of one
/// length), wherever they are.
pub(super) fn group_values_by<'w, 'v, E: Element>(
    out: &mut [f32],
    g: usize,
    head_dim: usize,
    weights: impl Fn(usize) -> &'w [f32],
    value: impl Fn(usize) -> &'v [E] + Copy,
) {
    let mut h = 0;
    while h < g {
        let take = (g - h).min(GROUP);
        let out = &mut out[h * head_dim..(h + take) * head_dim];
        let w = |i: usize| weights(h + i);
        match take {
            1 => weighted_values(out, w(0), value),
            2 => heads_values::<E, 2>(out, head_dim, std::array::from_fn(w), value),
            3 => heads_values::<E, 3>(out, head_dim, std::array::from_fn(w), value),
            _ => heads_values::<E, 4>(out, head_dim, std::array::from_fn(w), value),
        }
        h += take;
    }
}

/// [`group_values`] of `G` heads: passes of 4 vectors of dimensions (two
/// 64-byte lines of each value) for all the heads at once, the rest of
/// each head's dimensions by [`weighted_values`].
#[inline(always)]
fn heads_values<'v, E: Element, const G: usize>(
    out: &mut [f32],
    head_dim: usize,
    weights: [&[f32]; G],
    value: impl Fn(usize) -> &'v [E] + Copy,
) {
    let mut d0 = 0;
    while d0 + 4 * PANEL <= head_dim {
        heads_value_block::<E, G, 4>(out, head_dim, &weights, value, d0);
        d0 += 4 * PANEL;
    }
    if d0 < head_dim {
        for (out, weights) in out.chunks_exact_mut(head_dim).zip(weights) {
            weighted_values(&mut out[d0..], weights, |j| &value(j)[d0..]);
        }
    }
}

/// `V` vectors of dimensions from `d0` of `G` heads' weighted sums.
#[inline(always)]
fn heads_value_block<'v, E: Element, const G: usize, const V: usize>(
    out: &mut [f32],
    head_dim: usize,
    weights: &[&[f32]; G],
    value: impl Fn(usize) -> &'v [E],
    d0: usize,
) {
    let n = weights[0].len();
    let weights: [&[f32]; G] = std::array::from_fn(|i| &weights[i][..n]);
    let mut acc = [[f32x8::splat(0.0); V]; G];
    for j in 0..n {
        let v = &value(j)[d0..d0 + V * PANEL];
        for (acc, w) in acc.iter_mut().zip(&weights) {
            let a = f32x8::splat(w[j]);
            for (acc, v) in acc.iter_mut().zip(v.chunks_exact(PANEL)) {
                *acc += a * E::load(v);
            }
        }
    }
    for (i, acc) in acc.iter().enumerate() {
        let out = &mut out[i * head_dim + d0..i * head_dim + d0 + V * PANEL];
        for (acc, out) in acc.iter().zip(out.chunks_exact_mut(PANEL)) {
            out.copy_from_slice(&acc.to_array());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic spread of values with mixed signs and magnitudes,
    /// and with sums whose order matters in the last bits.
    fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                let unit = (x >> 8) as f32 / (1u32 << 24) as f32 - 0.5;
                unit * (1 << (x % 7)) as f32
            })
            .collect()
    }

    #[test]
    fn panel_scores_equal_the_ordered_scalar_dot_for_every_length() {
        for head_dim in [1, 7, 8, 64, 65] {
            for n in [0, 1, 7, 8, 9, 63, 64, 65, 130, 517] {
                let keys = values(n * head_dim, n as u32 + 3);
                let q = values(head_dim, 11);
                let mut panels = Vec::new();
                fill_panels::<f32>(&mut panels, &keys, n, head_dim, 0, head_dim);
                let mut out = vec![f32::NAN; self::panels(n) * PANEL];
                let scale = 0.125;
                panel_scores::<f32>(&q, &panels, head_dim, n, scale, &mut out);
                for (t, key) in keys.chunks_exact(head_dim).enumerate() {
                    let want = dot(&q, key) * scale;
                    assert_eq!(
                        out[t].to_bits(),
                        want.to_bits(),
                        "head_dim {head_dim}, {n} keys, key {t}"
                    );
                }
            }
        }
    }

    #[test]
    fn panel_scores_keep_non_finite_keys_in_their_own_lanes() {
        let head_dim = 16;
        let n = 20;
        let mut keys = values(n * head_dim, 5);
        keys[3 * head_dim + 2] = f32::NAN;
        keys[17 * head_dim] = f32::INFINITY;
        let q = values(head_dim, 9);
        let mut panels = Vec::new();
        fill_panels::<f32>(&mut panels, &keys, n, head_dim, 0, head_dim);
        let mut out = vec![0.0; self::panels(n) * PANEL];
        panel_scores::<f32>(&q, &panels, head_dim, n, 1.0, &mut out);
        for (t, key) in keys.chunks_exact(head_dim).enumerate() {
            let want = dot(&q, key);
            assert!(
                out[t].to_bits() == want.to_bits() || (out[t].is_nan() && want.is_nan()),
                "key {t}: {} against {want}",
                out[t]
            );
        }
        assert!(out[3].is_nan());
        assert!(out[17].is_infinite() || out[17].is_nan());
        assert!(out[4].is_finite() && out[16].is_finite());
    }

    #[test]
    fn keys_taken_from_wider_rows_land_in_their_slots() {
        // rows of 3 heads of 4 dimensions; the panels of the middle head
        let (head_dim, stride, n) = (4, 12, 10);
        let rows = values(n * stride, 2);
        let mut panels = Vec::new();
        fill_panels::<f32>(&mut panels, &rows, n, stride, head_dim, head_dim);
        let lanes: &[f32] = wide::bytemuck::cast_slice(&panels);
        for slot in 0..n {
            for d in 0..head_dim {
                assert_eq!(
                    lanes[panel_index(slot, d, head_dim)],
                    rows[slot * stride + head_dim + d]
                );
            }
        }
    }

    #[test]
    fn weighted_values_equal_the_scalar_loop_for_every_width() {
        for head_dim in [3, 8, 20, 64, 72, 128] {
            for n in [0, 1, 5, 33] {
                let stride = head_dim + 5;
                let vals = values(n * stride, head_dim as u32);
                let weights = values(n, 77);
                let mut got = vec![f32::NAN; head_dim];
                weighted_values(&mut got, &weights, |j| &vals[j * stride + 2..]);
                let mut want = vec![0.0f32; head_dim];
                for (j, &a) in weights.iter().enumerate() {
                    for (o, &v) in want.iter_mut().zip(&vals[j * stride + 2..]) {
                        *o += a * v;
                    }
                }
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "head_dim {head_dim}, {n} values");
            }
        }
    }

    #[test]
    fn group_values_equal_each_heads_own_for_every_group_size() {
        for head_dim in [3, 8, 20, 64, 72, 128] {
            for n in [0, 1, 5, 33] {
                let vstride = head_dim + 5;
                let vals = values(n * vstride, head_dim as u32);
                let value = |j: usize| &vals[j * vstride + 2..];
                for g in 1..=9 {
                    let att_stride = n + 3;
                    let att = values(g * att_stride, g as u32 + 7);
                    let mut got = vec![f32::NAN; g * head_dim];
                    group_values(&mut got, g, head_dim, &att, att_stride, n, value);
                    for h in 0..g {
                        let mut alone = vec![f32::NAN; head_dim];
                        weighted_values(&mut alone, &att[h * att_stride..][..n], value);
                        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                        assert_eq!(
                            bits(&got[h * head_dim..(h + 1) * head_dim]),
                            bits(&alone),
                            "head_dim {head_dim}, {n} values, {g} heads, head {h}"
                        );
                    }
                }
            }
        }
    }

    /// `x` as f16 elements, and as the f32 values they hold.
    fn halves(x: &[f32]) -> (Vec<F16>, Vec<f32>) {
        let h: Vec<F16> = x.iter().map(|&v| F16::from_f32(v)).collect();
        let f = h.iter().map(|v| v.to_f32()).collect();
        (h, f)
    }

    #[test]
    fn f16_keys_score_as_the_f32_values_they_hold() {
        let head_dim = 64;
        for n in [1, 9, 64, 130] {
            let (keys16, keys) = halves(&values(n * head_dim, n as u32));
            let q = values(head_dim, 4);
            // f16 panels, written lane by lane as the cache writes them
            let mut panels16 = vec![F16::ZERO; self::panels(n) * head_dim];
            for (slot, key) in keys16.chunks_exact(head_dim).enumerate() {
                for (d, &k) in key.iter().enumerate() {
                    set_key::<F16>(&mut panels16, slot, d, head_dim, k);
                    assert_eq!(get_key::<F16>(&panels16, slot, d, head_dim), k);
                }
            }
            // f32 panels of the original keys, rounded on the way in
            let mut rounded = Vec::new();
            let unrounded: Vec<f32> = values(n * head_dim, n as u32);
            fill_panels::<F16>(&mut rounded, &unrounded, n, head_dim, 0, head_dim);
            let mut a = vec![f32::NAN; self::panels(n) * PANEL];
            let mut b = a.clone();
            panel_scores::<F16>(&q, &panels16, head_dim, n, 0.125, &mut a);
            panel_scores::<f32>(&q, &rounded, head_dim, n, 0.125, &mut b);
            for (t, key) in keys.chunks_exact(head_dim).enumerate() {
                let want = (dot(&q, key) * 0.125).to_bits();
                assert_eq!(a[t].to_bits(), want, "{n} keys, key {t}");
                assert_eq!(b[t].to_bits(), want, "{n} keys, key {t} (rounded f32)");
            }
        }
    }

    #[test]
    fn f16_values_sum_as_the_f32_values_they_hold() {
        for head_dim in [20, 64] {
            let (n, g) = (37, 3);
            let (vals16, vals) = halves(&values(n * head_dim, 8));
            let att = values(g * n, 5);
            let mut a = vec![f32::NAN; g * head_dim];
            let mut b = a.clone();
            group_values(&mut a, g, head_dim, &att, n, n, |j| &vals16[j * head_dim..]);
            group_values(&mut b, g, head_dim, &att, n, n, |j| &vals[j * head_dim..]);
            assert_eq!(bits(&a), bits(&b), "head_dim {head_dim}");
        }
        // every finite f16 widens to its value, eight at a time
        for first in (0..=0xffffu32).step_by(8) {
            let lanes: [F16; PANEL] = std::array::from_fn(|i| F16((first as usize + i) as u16));
            let got = F16::lanes(lanes).to_array();
            for (i, h) in lanes.iter().enumerate() {
                let want = h.to_f32();
                assert!(got[i].to_bits() == want.to_bits() || (got[i].is_nan() && want.is_nan()));
            }
        }
    }

    #[test]
    fn group_scores_equal_each_heads_own_for_every_group_and_length() {
        for head_dim in [8, 64] {
            for n in [1, 8, 31, 32, 33, 64, 100, 517] {
                let (keys16, _) = halves(&values(n * head_dim, n as u32 + 1));
                let keys = values(n * head_dim, n as u32 + 1);
                let mut p32 = Vec::new();
                fill_panels::<f32>(&mut p32, &keys, n, head_dim, 0, head_dim);
                let mut p16 = vec![F16::ZERO; self::panels(n) * head_dim];
                for (slot, key) in keys16.chunks_exact(head_dim).enumerate() {
                    for (d, &k) in key.iter().enumerate() {
                        set_key::<F16>(&mut p16, slot, d, head_dim, k);
                    }
                }
                let stride = self::panels(n) * PANEL + 8;
                for g in 1..=5 {
                    let q = values(g * head_dim, g as u32 + 40);
                    let (mut a, mut b) = (vec![f32::NAN; g * stride], vec![f32::NAN; g * stride]);
                    group_scores::<f32>(&q, g, (&p32, head_dim, n), 0.125, &mut a, stride);
                    for (h, q) in q.chunks_exact(head_dim).enumerate() {
                        panel_scores::<f32>(q, &p32, head_dim, n, 0.125, &mut b[h * stride..]);
                    }
                    let what = format!("f32, head_dim {head_dim}, {n} keys, {g} heads");
                    for h in 0..g {
                        let (a, b) = (&a[h * stride..][..n], &b[h * stride..][..n]);
                        assert_eq!(bits(a), bits(b), "{what}, head {h}");
                    }
                    group_scores::<F16>(&q, g, (&p16, head_dim, n), 0.125, &mut a, stride);
                    for (h, q) in q.chunks_exact(head_dim).enumerate() {
                        panel_scores::<F16>(q, &p16, head_dim, n, 0.125, &mut b[h * stride..]);
                    }
                    for h in 0..g {
                        let (a, b) = (&a[h * stride..][..n], &b[h * stride..][..n]);
                        assert_eq!(
                            bits(a),
                            bits(b),
                            "f16, head_dim {head_dim}, {n} keys, {g} heads"
                        );
                    }
                }
            }
        }
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }
}
