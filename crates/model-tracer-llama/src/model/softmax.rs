//! The softmax of attention scores, eight lanes at a time.
//!
//! `exp` is computed here rather than by the C library: the library's
//! `expf` is one call per score (a decode step at 4 000 positions makes
//! about a million of them), and its results are those of whichever
//! library the machine has. [`exp`] is plain `f32` arithmetic (no fused
//! multiply-add, no table), written per lane so that the compiler puts
//! eight lanes in a vector: the same bits on every machine and at every
//! vector width, within 2 ulp of the exact value (tested).
//!
//! The maximum and the sum run in eight lanes too, the sum's lanes added
//! pairwise at the end. The result of a row depends only on the row: a
//! one-position step and a chunk's row get the same weights, on any
//! number of threads.

/// Lanes of the maximum, the exponentials and the sum.
const LANES: usize = 8;

/// `ln 2` in two parts: `LN2_HI` has few enough significant bits that
/// `n · LN2_HI` is exact for the `|n| ≤ 150` of [`exp`]'s range.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;

/// Added to and then subtracted from `x · log2(e)`, it rounds to the
/// nearest integer (`1.5 · 2^23`: the sum lies in `[2^23, 2^24)`, where
/// the spacing of `f32` is 1), and the sum's bits hold that integer.
const ROUND: f32 = 12_582_912.0;

/// `e^x`, within 2 ulp over the whole range: `+∞` above `ln(f32::MAX)`,
/// subnormal results rounded once, `0` below `-104`, NaN for NaN.
///
/// `x = n·ln 2 + r` with `|r| ≤ ln 2 / 2`, `e^r` by its Taylor polynomial of
/// degree 7 (truncation below `6·10⁻⁹` relative), times `2^n` as two
/// powers of two, each a normal number, so that a subnormal result is
/// rounded only by the last product.
#[inline(always)]
pub(super) fn exp(x: f32) -> f32 {
    // NaN passes through the clamp and the arithmetic below.
    let x = x.clamp(-104.0, 88.75);
    let t = x * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let mut p = 1.0 / 5040.0;
    for c in [
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        p = p * r + c;
    }
    // n ∈ [-150, 128]: both halves' biased exponents are in [52, 191].
    let n = (t.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let (n1, n2) = (n >> 1, n.wrapping_sub(n >> 1));
    let pow2 = |k: i32| f32::from_bits((k.wrapping_add(127) as u32 & 0xff) << 23);
    p * pow2(n1) * pow2(n2)
}

/// `x[i] = e^(x[i] − max x) / Σ_j e^(x[j] − max x)` in place; the
/// maximum ignores NaN, a NaN score (or no finite maximum) makes every
/// weight NaN. An empty row stays empty.
pub(super) fn softmax(x: &mut [f32]) {
    let split = x.len() / LANES * LANES;
    let mut m = [f32::NEG_INFINITY; LANES];
    for c in x[..split].chunks_exact(LANES) {
        for (m, &v) in m.iter_mut().zip(c) {
            *m = m.max(v);
        }
    }
    for &v in &x[split..] {
        m[0] = m[0].max(v);
    }
    let max = m.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let mut s = [0.0f32; LANES];
    for c in x[..split].chunks_exact_mut(LANES) {
        for (s, v) in s.iter_mut().zip(c) {
            *v = exp(*v - max);
            *s += *v;
        }
    }
    for v in &mut x[split..] {
        *v = exp(*v - max);
        s[0] += *v;
    }
    let sum = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
    let inv = 1.0 / sum;
    x.iter_mut().for_each(|v| *v *= inv);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distance in representable `f32` values between `a` and the
    /// correctly rounded value of `want`.
    fn ulps(a: f32, want: f64) -> u32 {
        let w = want as f32;
        if a == w {
            return 0;
        }
        let key = |v: f32| {
            let b = v.to_bits() as i32;
            if b < 0 {
                i32::MIN - b
            } else {
                b
            }
        };
        key(a).abs_diff(key(w))
    }

    #[test]
    fn exp_is_within_two_ulp_across_its_range() {
        let mut worst = (0, 0.0f32);
        // every 61st f32 from -104 to 89 (both signs, subnormal results,
        // the overflow edge)
        let (lo, hi) = ((-104.0f32).to_bits(), 89.0f32.to_bits());
        let negative = (0x8000_0000u32..=lo).step_by(61);
        let positive = (0u32..=hi).step_by(61);
        for bits in negative.chain(positive) {
            let x = f32::from_bits(bits);
            let got = exp(x);
            let want = f64::from(x).exp();
            let d = ulps(got, want);
            if d > worst.0 {
                worst = (d, x);
            }
        }
        assert!(worst.0 <= 2, "{} ulp at {}", worst.0, worst.1);
    }

    #[test]
    fn exp_edges() {
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-0.0), 1.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-200.0), 0.0);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp(89.0), f32::INFINITY);
        assert!(exp(88.7).is_finite());
        assert!(exp(f32::NAN).is_nan());
        // the smallest results are subnormal, not flushed
        let tiny = exp(-100.0);
        assert!(tiny > 0.0 && !tiny.is_normal(), "{tiny}");
        assert!(ulps(tiny, (-100.0f64).exp()) <= 1);
    }

    #[test]
    fn softmax_sums_to_one_and_orders_as_its_scores() {
        for n in [1, 2, 7, 8, 9, 63, 64, 65, 1000] {
            let mut x: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
                .collect();
            let scores = x.clone();
            softmax(&mut x);
            let sum: f64 = x.iter().map(|&v| f64::from(v)).sum();
            assert!((sum - 1.0).abs() < 1e-5, "n = {n}: sum {sum}");
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let z: f64 = scores.iter().map(|&s| f64::from(s - max).exp()).sum();
            for (&w, &s) in x.iter().zip(&scores) {
                let want = f64::from(s - max).exp() / z;
                assert!(
                    (f64::from(w) - want).abs() <= 4e-7 * want.max(1e-30) + 1e-12,
                    "n = {n}"
                );
            }
        }
    }

    #[test]
    fn softmax_of_special_rows() {
        let mut empty: [f32; 0] = [];
        softmax(&mut empty);
        // -inf scores get no weight
        let mut x = [0.0, f32::NEG_INFINITY, 0.0];
        softmax(&mut x);
        assert_eq!(x, [0.5, 0.0, 0.5]);
        // a NaN score makes the row NaN, wherever it is
        for at in [0, 5, 8, 10] {
            let mut x = [1.0f32; 11];
            x[at] = f32::NAN;
            softmax(&mut x);
            assert!(x.iter().all(|v| v.is_nan()), "NaN at {at}: {x:?}");
        }
        // huge scores do not overflow
        let mut x = [1e30, 1e30, -1e30];
        softmax(&mut x);
        assert_eq!(x, [0.5, 0.5, 0.0]);
        // every score -inf: no maximum, NaN weights
        let mut x = [f32::NEG_INFINITY; 3];
        softmax(&mut x);
        assert!(x.iter().all(|v| v.is_nan()));
    }
}
