//! Activation fingerprints: sixteen random ±1 projections of a tensor.
//!
//! Mean, standard deviation and L2 norm do not see the order of the
//! values: a decoder that concatenates its attention heads in the wrong
//! order produces a tensor with exactly the moments of the right one. A
//! fingerprint does see it. It is the vector
//!
//! ```text
//! y_j = Σ_i s(j, i) · x_i        j = 0 .. FINGERPRINT_LEN (16)
//! ```
//!
//! over the finite `x_i` (NaN and ±Inf are skipped, as [`TensorStats`]
//! skips them), where `s(j, i) = ±1` is a fixed pseudo-random sign.
//! Fingerprints are linear, so the fingerprint of a difference is the
//! difference of the fingerprints, and with random signs
//! `E[y_j²] = ‖x‖²` (Johnson–Lindenstrauss): the distance of two
//! fingerprints, [`Fingerprint::relative_distance`], estimates the relative
//! L2 distance `‖x − x'‖ / ‖x‖` of the tensors they were taken of, from 64
//! bytes per tensor. With 16 projections the estimate is typically within
//! ±20% of the true value and within a factor of two nearly always.
//!
//! # The signs
//!
//! `s(j, i)` is `+1` where bit `j` of `splitmix64(i)` is 0 and `−1` where
//! it is 1, `i` being the element's index (from 0) and `splitmix64(i)` the
//! `(i + 1)`-th output of the SplitMix64 generator started from state 0,
//! in wrapping `u64` arithmetic:
//!
//! ```text
//! z = (i + 1) · 0x9E3779B97F4A7C15
//! z = (z ^ (z >> 30)) · 0xBF58476D1CE4E5B9
//! z = (z ^ (z >> 27)) · 0x94D049BB133111EB
//! splitmix64(i) = z ^ (z >> 31)
//! ```
//!
//! The signs of an element do not depend on the tensor's length: the
//! fingerprint of a prefix uses the first columns of the same matrix. This
//! numpy code computes the same fingerprint (in `f64`; the crate sums in
//! `f32`, so the two agree within the rounding of the sums, exactly when
//! every partial sum is representable):
//!
//! ```python
//! import numpy as np
//!
//! def signs(n):  # signs(n)[j, i] = s(j, i)
//!     z = (np.arange(n, dtype=np.uint64) + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
//!     z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
//!     z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
//!     z = z ^ (z >> np.uint64(31))
//!     bits = (z[None, :] >> np.arange(16, dtype=np.uint64)[:, None]) & np.uint64(1)
//!     return 1.0 - 2.0 * bits.astype(np.float64)
//!
//! def fingerprint(x):
//!     x = np.asarray(x, dtype=np.float64)
//!     return signs(len(x)) @ np.where(np.isfinite(x), x, 0.0)
//! ```
//!
//! # How it is computed
//!
//! Eight elements at a time, in `wide::f32x8` lanes on every target: lane
//! `k` of accumulator `j` sums `s(j, i) · x_i` over the elements
//! `i ≡ k (mod 8)` in index order, a partial last group of eight is padded
//! with zeros, and the eight lanes are added as `((l0 + l1) + (l2 + l3)) +
//! ((l4 + l5) + (l6 + l7))`. A product by ±1 is exact, so the result is the
//! same bit for bit with or without fused multiply-adds, on any target, and
//! through either entry point:
//!
//! - [`fingerprint`] hashes each element's index as it goes: no state, about
//!   23 instructions per element (x86-64-v3).
//! - [`Fingerprinter::fingerprint`] reads the signs from a table built once,
//!   64 bytes per element of the longest tensor seen, in two passes of eight
//!   accumulators (which, with the elements, fit the sixteen vector
//!   registers): 2.6 instructions per element on a long tensor, 3.2 on a
//!   hidden state of 576 values, the fixed cost of a call included. It sums
//!   without testing for NaN and Inf first (a non-finite element makes
//!   every sum non-finite), and only then again with them masked out.
//!
//! [`TensorStats`]: crate::stats::TensorStats

use wide::{f32x8, u32x8};

/// Number of projections in a [`Fingerprint`].
pub const FINGERPRINT_LEN: usize = 16;

/// Lanes of the accumulators, on every target (the summation order, and so
/// the result, does not depend on the target).
const LANES: usize = 8;

/// The signs of one group of [`LANES`] elements: vector `j` holds
/// `s(j, i)` for the group's elements `i`, as `±1.0`.
type Signs = [f32x8; FINGERPRINT_LEN];

/// Sixteen random ±1 projections of a tensor (see the [module
/// documentation](self)): `0[j] = Σ_i s(j, i)·x_i` over the finite `x_i`.
/// The empty tensor, or one without a finite element, has the zero
/// fingerprint.
///
/// With the `serde` feature it is written as a list of 16 numbers (with
/// `"inf"`, `"-inf"` or `"NaN"` for sums that overflowed `f32`).
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct Fingerprint(pub [f32; FINGERPRINT_LEN]);

impl Fingerprint {
    /// `‖a − b‖ / max(‖a‖, ‖b‖)`, in `[0, 2]`: an estimate of the relative
    /// L2 distance `‖x − x'‖ / max(‖x‖, ‖x'‖)` of the tensors the two
    /// fingerprints were taken of. It is 0 for equal fingerprints (also for
    /// two zero fingerprints), about `0.01` for a tensor perturbed by 1% of
    /// its norm, √2 on average for two unrelated tensors of equal norm, and 2
    /// for `x` against `−x`. The sums are taken in `f64`.
    ///
    /// NaN when a component of either fingerprint is not finite (possible
    /// only when a tensor's finite values overflow `f32` when summed).
    pub fn relative_distance(&self, other: &Fingerprint) -> f32 {
        let (mut diff, mut a, mut b) = (0.0f64, 0.0f64, 0.0f64);
        for (&x, &y) in self.0.iter().zip(&other.0) {
            if !x.is_finite() || !y.is_finite() {
                return f32::NAN;
            }
            let (x, y) = (f64::from(x), f64::from(y));
            diff += (x - y) * (x - y);
            a += x * x;
            b += y * y;
        }
        let norm = a.max(b);
        if norm == 0.0 {
            0.0
        } else {
            (diff / norm).sqrt() as f32
        }
    }
}

/// `splitmix64(i)`: the `(i + 1)`-th output of SplitMix64 from state 0.
#[inline(always)]
const fn splitmix64(i: u64) -> u64 {
    let mut z = i.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The signs of the group of elements `LANES·group .. LANES·(group + 1)`.
#[inline(always)]
fn group_signs(group: usize) -> Signs {
    let first = (group * LANES) as u64;
    let mut low = [0u32; LANES];
    for (k, h) in low.iter_mut().enumerate() {
        // Only bits 0..16 are used: the low half of the hash holds them.
        *h = splitmix64(first + k as u64) as u32;
    }
    let bits = u32x8::new(low);
    let one = u32x8::splat(1.0f32.to_bits());
    let sign = u32x8::splat(0x8000_0000);
    // Bit j moved to the sign bit of `1.0`: +1.0 for a 0 bit, -1.0 for a 1.
    std::array::from_fn(|j| f32x8::from_bits(((bits << (31 - j as u32)) & sign) | one))
}

/// Adds `s(j, ·) · x` to every accumulator.
#[inline(always)]
fn accumulate<const N: usize>(acc: &mut [f32x8; N], x: f32x8, signs: &[f32x8; N]) {
    for (a, &s) in acc.iter_mut().zip(signs) {
        *a = x.mul_add(s, *a);
    }
}

#[inline(always)]
fn load(chunk: &[f32]) -> f32x8 {
    let mut lanes = [0.0f32; LANES];
    lanes[..chunk.len()].copy_from_slice(chunk);
    f32x8::new(lanes)
}

/// A whole group of [`LANES`] elements.
#[inline(always)]
fn load_full(chunk: &[f32]) -> f32x8 {
    match <[f32; LANES]>::try_from(chunk) {
        Ok(lanes) => f32x8::new(lanes),
        Err(_) => load(chunk),
    }
}

/// `x` with its NaN and ±Inf lanes set to 0.
#[inline(always)]
fn finite(x: f32x8) -> f32x8 {
    x & x.is_finite()
}

/// The fixed-order sum `((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7))`
/// of the lanes `l` of each of eight accumulators, as one vector: lane `j`
/// is the sum of accumulator `j`.
#[inline(always)]
fn reduce_half(acc: HalfSigns) -> f32x8 {
    let l = f32x8::transpose(acc);
    ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]))
}

/// The fingerprint whose first eight values are the lanes of `low`, and
/// the other eight those of `high`.
#[inline(always)]
fn join(low: f32x8, high: f32x8) -> Fingerprint {
    let (low, high) = (low.to_array(), high.to_array());
    Fingerprint(std::array::from_fn(|j| {
        if j < HALF {
            low[j]
        } else {
            high[j - HALF]
        }
    }))
}

/// The fingerprint of `x` (see the [module documentation](self)), hashing
/// each element's index as it goes: no table, no allocation.
/// [`Fingerprinter::fingerprint`] gives the same result, bit for bit, about
/// seven times faster.
pub fn fingerprint(x: &[f32]) -> Fingerprint {
    let mut acc = [f32x8::ZERO; FINGERPRINT_LEN];
    for (group, chunk) in x.chunks(LANES).enumerate() {
        accumulate(&mut acc, finite(load(chunk)), &group_signs(group));
    }
    let low = std::array::from_fn(|j| acc[j]);
    let high = std::array::from_fn(|j| acc[HALF + j]);
    join(reduce_half(low), reduce_half(high))
}

/// Computes fingerprints from a table of signs, built for the longest
/// tensor seen so far: 64 bytes per element (36 KiB for a hidden state of
/// 576 values, 3 MiB for 49 152 logits). The table is allocated when a
/// longer tensor than any before comes, never otherwise, so a warm
/// fingerprinter does not allocate.
///
/// ```
/// use model_tracer::fingerprint::{fingerprint, Fingerprinter};
///
/// let x: Vec<f32> = (0..576).map(|i| ((i * 37 % 101) as f32 - 50.0) / 29.0).collect();
/// let mut swapped = x.clone();
/// // Two 64-wide heads concatenated in the wrong order: same moments.
/// swapped[..128].rotate_left(64);
/// let mut f = Fingerprinter::new();
/// let (a, b) = (f.fingerprint(&x), f.fingerprint(&swapped));
/// assert_eq!(a, fingerprint(&x));
/// assert!(a.relative_distance(&b) > 0.1);
/// ```
#[derive(Debug, Clone, Default)]
pub struct Fingerprinter {
    /// The signs of projections `0..8` of element group `g` (elements
    /// `8g .. 8g + 8`).
    low: Vec<HalfSigns>,
    /// The signs of projections `8..16` of element group `g`.
    high: Vec<HalfSigns>,
}

/// Projections summed in one pass over a tensor: eight accumulators and the
/// loaded elements fit the sixteen vector registers of x86-64, sixteen
/// accumulators would not.
const HALF: usize = FINGERPRINT_LEN / 2;

/// The signs of half the projections for one group of elements.
type HalfSigns = [f32x8; HALF];

impl Fingerprinter {
    /// A fingerprinter with an empty table (allocates nothing).
    pub fn new() -> Self {
        Self::default()
    }

    /// Elements the table covers: longer tensors grow it.
    pub fn capacity(&self) -> usize {
        self.low.len() * LANES
    }

    /// Extends the table to cover `len` elements.
    pub fn reserve(&mut self, len: usize) {
        let groups = len.div_ceil(LANES);
        let start = self.low.len();
        if groups > start {
            self.low.reserve_exact(groups - start);
            self.high.reserve_exact(groups - start);
            for g in start..groups {
                let s = group_signs(g);
                self.low.push(std::array::from_fn(|j| s[j]));
                self.high.push(std::array::from_fn(|j| s[HALF + j]));
            }
        }
    }

    /// The fingerprint of `x`, equal bit for bit to [`fingerprint`]`(x)`.
    /// Allocates only when `x` is longer than every tensor before it.
    pub fn fingerprint(&mut self, x: &[f32]) -> Fingerprint {
        self.reserve(x.len());
        let groups = x.len().div_ceil(LANES);
        let (low, high) = (&self.low[..groups], &self.high[..groups]);
        // A non-finite element makes every sum non-finite: only then are
        // the elements masked (the same sums, had they all been finite).
        let (a, b) = (
            reduce_half(half::<false>(x, low)),
            reduce_half(half::<false>(x, high)),
        );
        if (a.is_finite() & b.is_finite()).all() {
            join(a, b)
        } else {
            join(
                reduce_half(half::<true>(x, low)),
                reduce_half(half::<true>(x, high)),
            )
        }
    }
}

/// The accumulators of half the projections, `signs` covering every group
/// of elements of `x`. `MASKED` sets NaN and ±Inf to 0 first.
fn half<const MASKED: bool>(x: &[f32], signs: &[HalfSigns]) -> HalfSigns {
    let mut acc = [f32x8::ZERO; HALF];
    let mask = |v: f32x8| if MASKED { finite(v) } else { v };
    // Two groups per iteration: one loop test per 16 multiply-adds. The
    // groups are still added in order, as `fingerprint` adds them.
    let pairs = (x.len() / (2 * LANES)).min(signs.len() / 2);
    let (head, rest) = x.split_at(pairs * 2 * LANES);
    let (head_signs, rest_signs) = signs.split_at(2 * pairs);
    for (pair, s) in head.chunks_exact(2 * LANES).zip(head_signs.chunks_exact(2)) {
        let (a, b) = pair.split_at(LANES);
        accumulate(&mut acc, mask(load_full(a)), &s[0]);
        accumulate(&mut acc, mask(load_full(b)), &s[1]);
    }
    for (chunk, s) in rest.chunks(LANES).zip(rest_signs) {
        accumulate(&mut acc, mask(load(chunk)), s);
    }
    acc
}

#[cfg(feature = "serde")]
mod serde_impl {
    use serde::de::Error;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::{Fingerprint, FINGERPRINT_LEN};

    impl Serialize for Fingerprint {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            crate::serde_float::vec::serialize(&self.0, s)
        }
    }

    impl<'de> Deserialize<'de> for Fingerprint {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            let v = crate::serde_float::vec::deserialize(d)?;
            let n = v.len();
            v.try_into().map(Fingerprint).map_err(|_| {
                D::Error::custom(format!(
                    "a fingerprint has {FINGERPRINT_LEN} values, not {n}"
                ))
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::TensorStats;

    /// `s(j, i)` as the module documentation defines it.
    fn sign(j: usize, i: usize) -> f32 {
        if (splitmix64(i as u64) >> j) & 1 == 0 {
            1.0
        } else {
            -1.0
        }
    }

    /// Values whose every partial sum is exact in `f32` (multiples of 1/8).
    fn eighths(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 37) % 101) as f32 / 8.0 - 6.0)
            .collect()
    }

    /// A small deterministic generator of normal-ish values.
    fn noise(seed: u64, n: usize) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x2545_F491_4F6C_DD1D) | 1;
        let mut uniform = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 11) as f64 / (1u64 << 53) as f64
        };
        (0..n)
            .map(|_| {
                // Box–Muller.
                let (u, v) = (uniform().max(1e-300), uniform());
                ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
            })
            .collect()
    }

    fn both(x: &[f32]) -> Fingerprint {
        let a = fingerprint(x);
        let b = Fingerprinter::new().fingerprint(x);
        let bits = |f: Fingerprint| f.0.map(f32::to_bits);
        assert_eq!(bits(a), bits(b), "the two entry points differ");
        a
    }

    #[test]
    fn the_hash_is_splitmix64_from_state_zero() {
        // The first three outputs of SplitMix64 seeded with 0 (numpy, and
        // the published reference outputs).
        assert_eq!(splitmix64(0), 0xE220_A839_7B1D_CDAF);
        assert_eq!(splitmix64(1), 0x6E78_9E6A_A1B9_65F4);
        assert_eq!(splitmix64(2), 0x06C4_5D18_8009_454F);
        // signs(3) in numpy, rows j = 0..3.
        let rows: Vec<[f32; 3]> = (0..3).map(|j| [0, 1, 2].map(|i| sign(j, i))).collect();
        assert_eq!(
            rows,
            vec![[-1.0, 1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, -1.0]]
        );
        let unit: Vec<f32> = both(&[0.0, 0.0, 1.0]).0[..3].to_vec();
        assert_eq!(unit, vec![-1.0, -1.0, -1.0]);
    }

    #[test]
    fn matches_the_documented_numpy_formula() {
        // `fingerprint(((i * 37) % 101) / 8 - 6)` from the numpy code of the
        // module documentation: every partial sum is exact, so are these.
        let want_37 = [
            -8.25, 16.5, 5.75, -2.0, 15.25, 33.5, -11.75, 21.75, 22.25, 20.25, 28.75, 20.0, -9.75,
            2.25, 26.75, 0.5,
        ];
        let want_600 = [
            -61.5, 127.25, 70.5, -28.25, 145.0, 58.25, 168.5, -39.5, -102.0, 78.0, 289.0, 38.75,
            34.5, 183.5, -14.25, 22.75,
        ];
        assert_eq!(both(&eighths(37)).0, want_37);
        assert_eq!(both(&eighths(600)).0, want_600);
        // And a direct sum with the signs, for lengths around the lane width.
        for n in [1, 7, 8, 9, 15, 16, 17, 63, 577] {
            let x = eighths(n);
            let direct: [f32; 16] =
                std::array::from_fn(|j| (0..n).map(|i| sign(j, i) * x[i]).sum::<f32>());
            assert_eq!(both(&x).0, direct, "{n} elements");
        }
    }

    #[test]
    fn rounded_sums_stay_within_f32_rounding_of_numpy() {
        // numpy: x = np.float32(np.cos(0.011 * i * i) * 3 - 0.5), i < 600.
        let want: [f64; FINGERPRINT_LEN] = [
            85.54484558105469,
            -7.972811222076416,
            68.28079223632812,
            -102.34822082519531,
            17.85693359375,
            -19.45766258239746,
            -51.51907730102539,
            14.754679679870605,
            -11.718745231628418,
            13.905911445617676,
            40.92612075805664,
            6.299200057983398,
            -7.926087379455566,
            71.89395141601562,
            -41.69749450683594,
            -43.135292053222656,
        ];
        let x: Vec<f32> = (0..600)
            .map(|i| ((0.011 * (i * i) as f64).cos() * 3.0 - 0.5) as f32)
            .collect();
        let l1: f32 = x.iter().map(|v| v.abs()).sum();
        let got = both(&x);
        for (j, (&g, &w)) in got.0.iter().zip(&want).enumerate() {
            assert!(
                (f64::from(g) - w).abs() <= 1e-6 * f64::from(l1),
                "y_{j}: {g} against {w}"
            );
        }
    }

    #[test]
    fn nan_and_inf_are_skipped() {
        let mut x = eighths(45);
        x[3] = f32::NAN;
        x[10] = f32::INFINITY;
        x[44] = f32::NEG_INFINITY;
        // numpy, with the non-finite values replaced by 0.
        let want = [
            -13.5, 10.75, -5.0, 1.5, 2.5, 23.0, -15.5, 18.25, 19.0, 24.0, 55.25, 25.5, 3.25, 8.0,
            37.0, -15.0,
        ];
        assert_eq!(both(&x).0, want);
        let mut zeroed = x.clone();
        for i in [3, 10, 44] {
            zeroed[i] = 0.0;
        }
        assert_eq!(both(&zeroed), both(&x));
        assert_eq!(both(&[f32::NAN; 11]), Fingerprint::default());
    }

    #[test]
    fn the_empty_tensor_has_the_zero_fingerprint() {
        assert_eq!(both(&[]), Fingerprint([0.0; FINGERPRINT_LEN]));
        assert_eq!(both(&[0.0; 9]), Fingerprint::default());
        let z = Fingerprint::default();
        assert_eq!(z.relative_distance(&z), 0.0);
        assert_eq!(both(&[2.0]).relative_distance(&z), 1.0);
    }

    #[test]
    fn a_head_swap_keeps_the_moments_and_changes_the_fingerprint() {
        let x = noise(7, 576);
        let mut swapped = x.clone();
        // Heads 2 and 5 of 9 (64 wide) concatenated in each other's place.
        let (head2, head5) = (2 * 64..3 * 64, 5 * 64..6 * 64);
        let tmp: Vec<f32> = swapped[head2.clone()].to_vec();
        swapped.copy_within(head5.clone(), head2.start);
        swapped[head5].copy_from_slice(&tmp);
        assert_ne!(x, swapped);
        let (a, b) = (
            TensorStats::from_slice(&x),
            TensorStats::from_slice(&swapped),
        );
        let rel = |u: f32, v: f32| (u - v).abs() / u.abs().max(1e-30);
        assert!(
            rel(a.mean, b.mean) < 1e-5 && rel(a.std, b.std) < 1e-6,
            "{a:?} {b:?}"
        );
        assert!(rel(a.l2_norm, b.l2_norm) < 1e-6);
        let d = both(&x).relative_distance(&both(&swapped));
        assert!(d > 0.1, "head swap distance {d}");
        // The true relative distance is 0.74: the estimate (0.59) is close.
        let diff: Vec<f32> = x.iter().zip(&swapped).map(|(a, b)| a - b).collect();
        let truth = TensorStats::from_slice(&diff).l2_norm / a.l2_norm;
        assert!((0.5..2.0).contains(&(d / truth)), "{d} against {truth}");
    }

    #[test]
    fn the_distance_estimates_the_relative_l2_difference() {
        let mut ratios = Vec::new();
        for seed in 0..24u64 {
            let n = 500 + 37 * seed as usize;
            let x = noise(seed, n);
            let delta = noise(seed + 1000, n);
            let (nx, nd) = (
                TensorStats::from_slice(&x).l2_norm,
                TensorStats::from_slice(&delta).l2_norm,
            );
            // A perturbation of 1% of the tensor's norm.
            let scale = 1e-2 * nx / nd;
            let y: Vec<f32> = x.iter().zip(&delta).map(|(a, d)| a + scale * d).collect();
            let diff: Vec<f32> = x.iter().zip(&y).map(|(a, b)| b - a).collect();
            let truth = TensorStats::from_slice(&diff).l2_norm
                / nx.max(TensorStats::from_slice(&y).l2_norm);
            let est = both(&x).relative_distance(&both(&y));
            let r = est / truth;
            assert!(
                (0.5..2.0).contains(&r),
                "seed {seed}: {est} against {truth}"
            );
            ratios.push(r);
        }
        let mean = ratios.iter().sum::<f32>() / ratios.len() as f32;
        assert!((0.8..1.25).contains(&mean), "mean ratio {mean}: {ratios:?}");
        // Unrelated tensors of equal norm: about √2.
        let (a, b) = (both(&noise(1, 576)), both(&noise(2, 576)));
        let d = a.relative_distance(&b);
        assert!((0.7..2.0).contains(&d), "{d}");
    }

    #[test]
    fn distance_edges_are_defined() {
        let x = both(&eighths(40));
        let minus = Fingerprint(x.0.map(|v| -v));
        assert_eq!(x.relative_distance(&x), 0.0);
        assert!((x.relative_distance(&minus) - 2.0).abs() < 1e-6);
        let mut inf = x;
        inf.0[5] = f32::INFINITY;
        assert!(x.relative_distance(&inf).is_nan());
        assert!(inf.relative_distance(&x).is_nan());
        let mut nan = x;
        nan.0[0] = f32::NAN;
        assert!(nan.relative_distance(&nan).is_nan());
    }

    #[test]
    fn a_warm_table_is_reused_and_shorter_tensors_share_it() {
        let mut f = Fingerprinter::new();
        assert_eq!(f.capacity(), 0);
        let long = noise(3, 1001);
        let a = f.fingerprint(&long);
        assert_eq!(f.capacity(), 1008);
        let short = &long[..123];
        assert_eq!(f.fingerprint(short), fingerprint(short));
        assert_eq!(
            f.capacity(),
            1008,
            "a shorter tensor does not grow the table"
        );
        let (_, allocations) = model_tracer_test_support::count_allocations(|| {
            for n in [1, 8, 576, 1001] {
                std::hint::black_box(f.fingerprint(&long[..n]));
            }
        });
        assert_eq!(allocations, 0);
        assert_eq!(f.fingerprint(&long), a);
        // Sums that overflow are not finite (here Inf and NaN), through
        // both entry points alike.
        let y = both(&[f32::MAX; 20]);
        assert!(y.0.iter().all(|v| !v.is_finite()), "{y:?}");
    }

    #[cfg(feature = "serde")]
    #[test]
    fn serializes_as_a_list_of_sixteen_floats() {
        let mut f = both(&eighths(37));
        f.0[15] = f32::NEG_INFINITY;
        let json = serde_json::to_string(&f).unwrap_or_default();
        assert!(
            json.starts_with("[-8.25,16.5,") && json.ends_with(",\"-inf\"]"),
            "{json}"
        );
        let back: Result<Fingerprint, _> = serde_json::from_str(&json);
        assert_eq!(back.ok(), Some(f));
        let short = serde_json::from_str::<Fingerprint>("[1,2,3]");
        let e = short.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("16 values, not 3"), "{e}");
    }
}
