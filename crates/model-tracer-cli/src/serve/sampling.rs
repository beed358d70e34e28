//! Choosing the next token from the logits: greedy at temperature 0 (the
//! argmax `run` takes), otherwise a draw from the softmax at that
//! temperature, cut to the nucleus of `top_p`, with a seeded generator so
//! that a request with a `seed` gets the same tokens every time.

/// How a request samples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// 0: greedy. Otherwise the logits are divided by it.
    pub temperature: f32,
    /// The smallest set of most likely tokens whose probability reaches
    /// it is drawn from (1: every token).
    pub top_p: f32,
    /// The generator's seed.
    pub seed: u64,
}

/// A small, fast generator (SplitMix64): the same seed, the same draws.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator started from `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A uniform draw in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A request's sampler: its parameters, its generator and the scratch
/// space of the draws.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: Sampling,
    rng: Rng,
    probs: Vec<(f64, u32)>,
}

impl Sampler {
    /// A sampler for `params`.
    pub fn new(params: Sampling) -> Self {
        Self {
            params,
            rng: Rng::new(params.seed),
            probs: Vec::new(),
        }
    }

    /// The next token after `logits`. Greedy is the tracer's argmax, which
    /// skips NaN; a draw ignores non-finite logits, and logits with no
    /// finite value at all give token 0.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let greedy = || model_tracer::stats::argmax(logits).unwrap_or(0) as u32;
        let t = self.params.temperature;
        if t <= 0.0 || !t.is_finite() {
            return greedy();
        }
        let max = logits
            .iter()
            .copied()
            .filter(|v| v.is_finite())
            .fold(f32::NEG_INFINITY, f32::max);
        if !max.is_finite() {
            return 0;
        }
        self.probs.clear();
        let inv_t = 1.0 / f64::from(t);
        let mut total = 0.0;
        for (id, &v) in logits.iter().enumerate() {
            if v.is_finite() {
                let p = ((f64::from(v) - f64::from(max)) * inv_t).exp();
                if p > 0.0 {
                    total += p;
                    self.probs.push((p, id as u32));
                }
            }
        }
        if self.probs.is_empty() || total <= 0.0 {
            return greedy();
        }
        // The nucleus: most likely first, until the mass reaches top_p.
        let top_p = f64::from(self.params.top_p.clamp(0.0, 1.0));
        let mut kept = self.probs.len();
        if top_p < 1.0 {
            self.probs
                .sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            let mut mass = 0.0;
            for (i, &(p, _)) in self.probs.iter().enumerate() {
                mass += p / total;
                if mass >= top_p {
                    kept = i + 1;
                    break;
                }
            }
        }
        let nucleus = &self.probs[..kept];
        let kept_mass: f64 = nucleus.iter().map(|&(p, _)| p).sum();
        let mut target = self.rng.next_f64() * kept_mass;
        for &(p, id) in nucleus {
            if target < p {
                return id;
            }
            target -= p;
        }
        nucleus.last().map_or(0, |&(_, id)| id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_p: f32, seed: u64) -> Sampling {
        Sampling {
            temperature,
            top_p,
            seed,
        }
    }

    #[test]
    fn greedy_takes_the_argmax_and_skips_nan() {
        let mut s = Sampler::new(params(0.0, 1.0, 1));
        assert_eq!(s.sample(&[0.1, 3.0, f32::NAN, 2.0]), 1);
        assert_eq!(s.sample(&[f32::NAN, f32::NAN]), 0);
    }

    #[test]
    fn the_same_seed_draws_the_same_tokens() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 7) % 13) as f32 * 0.3).collect();
        let draw = |seed| {
            let mut s = Sampler::new(params(1.0, 1.0, seed));
            (0..40).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }

    #[test]
    fn a_small_top_p_keeps_only_the_most_likely_token() {
        let logits = [0.0, 5.0, 4.9, 1.0];
        let mut s = Sampler::new(params(1.0, 0.01, 3));
        for _ in 0..50 {
            assert_eq!(s.sample(&logits), 1);
        }
    }

    #[test]
    fn draws_follow_the_softmax() {
        // p(1) = e / (1 + e) ~ 0.731 at temperature 1
        let logits = [0.0, 1.0];
        let mut s = Sampler::new(params(1.0, 1.0, 11));
        let n = 20_000;
        let ones = (0..n).filter(|_| s.sample(&logits) == 1).count();
        let share = ones as f64 / n as f64;
        assert!((share - 0.731).abs() < 0.02, "share {share}");
    }

    #[test]
    fn non_finite_logits_are_never_drawn() {
        let logits = [f32::NAN, 0.0, f32::INFINITY, f32::NEG_INFINITY, 0.0];
        let mut s = Sampler::new(params(0.8, 1.0, 5));
        for _ in 0..200 {
            let t = s.sample(&logits);
            assert!(t == 1 || t == 4, "drew {t}");
        }
        assert_eq!(s.sample(&[f32::NAN; 4]), 0);
    }
}
