//! The seeded generator of every test and benchmark's random data.

/// SplitMix64: small, fast, deterministic, good enough for test data. The
/// same seed gives the same numbers on every platform.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// The next 32 random bits (the high half of [`next_u64`](Self::next_u64)).
    pub fn next_u32(&mut self) -> u32 {
        (self.next_u64() >> 32) as u32
    }

    /// A random byte.
    pub fn byte(&mut self) -> u8 {
        (self.next_u64() >> 56) as u8
    }

    /// Uniform in `0..n` (`n > 0`; the modulo bias is below 2^-40 for the
    /// sizes tests use).
    pub fn below(&mut self, n: usize) -> usize {
        assert!(n > 0, "below(0)");
        (self.next_u64() % n as u64) as usize
    }

    /// Uniform in the open interval `(0, 1)`, with 53 random bits.
    pub fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    /// Uniform in `[-1, 1)`, with 24 random bits.
    pub fn signed(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 23) as f32) - 1.0
    }

    /// Uniform in `[lo, hi)` (up to rounding at `hi`).
    pub fn range_f32(&mut self, lo: f32, hi: f32) -> f32 {
        let t = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        lo + (hi - lo) * t
    }

    /// A standard normal sample (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }

    /// A roughly normal sample without tails: the sum of four
    /// [`signed`](Self::signed) draws, scaled to a standard deviation of
    /// about 1, so always within ±3.48.
    pub fn bounded_normal(&mut self) -> f32 {
        (0..4).map(|_| self.signed()).sum::<f32>() * 0.87
    }

    /// `n` samples of `offset + scale * N(0, 1)`, computed in `f64`.
    pub fn normals(&mut self, n: usize, offset: f64, scale: f64) -> Vec<f32> {
        (0..n)
            .map(|_| (offset + scale * self.normal()) as f32)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_reference_sequence() {
        // SplitMix64 from seed 0 (Vigna's reference implementation).
        let mut r = SplitMix64::new(0);
        assert_eq!(r.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(r.next_u64(), 0x6E78_9E6A_A1B9_65F4);
    }

    #[test]
    fn draws_stay_in_their_ranges() {
        let mut r = SplitMix64::new(7);
        for _ in 0..10_000 {
            assert!(r.below(10) < 10);
            let u = r.uniform();
            assert!(u > 0.0 && u < 1.0);
            let s = r.signed();
            assert!((-1.0..1.0).contains(&s));
            let x = r.range_f32(-0.5, 0.25);
            assert!((-0.5..=0.25).contains(&x));
            assert!(r.normal().is_finite());
            assert!(r.bounded_normal().abs() <= 3.48);
        }
        let v = r.normals(100_000, 3.0, 2.0);
        let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / v.len() as f64;
        assert!((mean - 3.0).abs() < 0.05, "{mean}");
    }
}
