//! Single-pass reductions over `&[f32]` (scalar placeholder implementation of the agreed API).

/// `|x|` above which a tensor is said to explode.
pub const EXPLOSION_ABS: f32 = 1e6;
/// Standard deviation above which a tensor is said to explode.
pub const EXPLOSION_STD: f32 = 1e4;
/// Standard deviation below which a tensor is said to vanish.
pub const VANISHING_STD: f32 = 1e-6;

/// Statistics of a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct TensorStats {
    /// Elements.
    pub count: usize,
    /// Minimum.
    pub min: f32,
    /// Maximum.
    pub max: f32,
    /// Mean.
    pub mean: f32,
    /// Sample std.
    pub std: f32,
    /// L2.
    pub l2_norm: f32,
    /// NaN.
    pub nan_count: usize,
    /// Inf.
    pub inf_count: usize,
}

impl TensorStats {
    /// Stats of a slice.
    pub fn from_slice(data: &[f32]) -> Self {
        let mut s = StatsAccumulator::new();
        s.push(data);
        s.finish()
    }
    /// Merge.
    pub fn merge(&self, other: &Self) -> Self {
        let mut s = StatsAccumulator::new();
        s.push_stats(self);
        s.push_stats(other);
        s.finish()
    }
    /// Finite elements.
    pub fn finite_count(&self) -> usize {
        self.count - self.nan_count - self.inf_count
    }
    /// NaN present.
    pub fn has_nan(&self) -> bool {
        self.nan_count > 0
    }
    /// Inf present.
    pub fn has_inf(&self) -> bool {
        self.inf_count > 0
    }
    /// Largest magnitude.
    pub fn max_abs(&self) -> f32 {
        self.min.abs().max(self.max.abs())
    }
    /// Explosion.
    pub fn is_exploding(&self) -> bool {
        self.max_abs() > EXPLOSION_ABS || self.std > EXPLOSION_STD
    }
    /// Vanishing.
    pub fn is_vanishing(&self) -> bool {
        self.finite_count() >= 2 && self.std < VANISHING_STD
    }
    /// Anomaly.
    pub fn has_anomaly(&self) -> bool {
        self.has_nan() || self.has_inf() || self.is_exploding()
    }
    /// Description.
    pub fn anomaly_description(&self) -> Option<String> {
        if self.has_nan() {
            Some(format!("NaN: {} of {} values", self.nan_count, self.count))
        } else if self.has_inf() {
            Some(format!("Inf: {} of {} values", self.inf_count, self.count))
        } else if self.max_abs() > EXPLOSION_ABS {
            Some(format!(
                "explosion: max |x| = {:.3e} (> 1e6)",
                self.max_abs()
            ))
        } else if self.std > EXPLOSION_STD {
            Some(format!("explosion: std = {:.3e} (> 1e4)", self.std))
        } else {
            None
        }
    }
}

/// Streaming accumulator.
#[derive(Debug, Clone, Default)]
pub struct StatsAccumulator {
    count: usize,
    nan: usize,
    inf: usize,
    n: f64,
    mean: f64,
    m2: f64,
    sq: f64,
    min: f32,
    max: f32,
}

impl StatsAccumulator {
    /// New.
    pub fn new() -> Self {
        Self::default()
    }
    /// Push.
    pub fn push(&mut self, data: &[f32]) {
        self.count += data.len();
        for &x in data {
            if x.is_nan() {
                self.nan += 1;
            } else if x.is_infinite() {
                self.inf += 1;
            } else {
                let v = x as f64;
                if self.n == 0.0 {
                    self.min = x;
                    self.max = x;
                } else {
                    self.min = self.min.min(x);
                    self.max = self.max.max(x);
                }
                self.n += 1.0;
                let d = v - self.mean;
                self.mean += d / self.n;
                self.m2 += d * (v - self.mean);
                self.sq += v * v;
            }
        }
    }
    /// Push stats.
    pub fn push_stats(&mut self, s: &TensorStats) {
        self.count += s.count;
        self.nan += s.nan_count;
        self.inf += s.inf_count;
        let nb = s.finite_count() as f64;
        if nb == 0.0 {
            return;
        }
        let m2b = (s.std as f64).powi(2) * (nb - 1.0).max(0.0);
        if self.n == 0.0 {
            self.min = s.min;
            self.max = s.max;
        } else {
            self.min = self.min.min(s.min);
            self.max = self.max.max(s.max);
        }
        let n = self.n + nb;
        let d = s.mean as f64 - self.mean;
        self.m2 += m2b + d * d * self.n * nb / n;
        self.mean += d * nb / n;
        self.n = n;
        self.sq += (s.l2_norm as f64).powi(2);
    }
    /// Finish.
    pub fn finish(&self) -> TensorStats {
        if self.n == 0.0 {
            return TensorStats {
                count: self.count,
                nan_count: self.nan,
                inf_count: self.inf,
                ..Default::default()
            };
        }
        TensorStats {
            count: self.count,
            min: self.min,
            max: self.max,
            mean: self.mean as f32,
            std: if self.n >= 2.0 {
                (self.m2 / (self.n - 1.0)).sqrt() as f32
            } else {
                0.0
            },
            l2_norm: self.sq.sqrt() as f32,
            nan_count: self.nan,
            inf_count: self.inf,
        }
    }
    /// Clear.
    pub fn clear(&mut self) {
        *self = Self::default();
    }
}

/// Error metrics.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct ErrorMetrics {
    /// MSE.
    pub mse: f32,
    /// Max abs error.
    pub max_abs_error: f32,
    /// Cosine.
    pub cosine_similarity: f32,
    /// SNR dB.
    pub snr_db: f32,
}

/// Error metrics.
pub fn error_metrics(quantized: &[f32], reference: &[f32]) -> ErrorMetrics {
    let n = quantized.len().min(reference.len());
    if n == 0 {
        return ErrorMetrics {
            mse: 0.0,
            max_abs_error: 0.0,
            cosine_similarity: 1.0,
            snr_db: f32::INFINITY,
        };
    }
    let (mut se, mut mx, mut dot, mut qq, mut rr) = (0f64, 0f32, 0f64, 0f64, 0f64);
    for (&q, &r) in quantized.iter().zip(reference) {
        if !q.is_finite() || !r.is_finite() {
            return ErrorMetrics {
                mse: f32::NAN,
                max_abs_error: f32::NAN,
                cosine_similarity: f32::NAN,
                snr_db: f32::NAN,
            };
        }
        let e = (q - r) as f64;
        se += e * e;
        mx = mx.max((q - r).abs());
        dot += q as f64 * r as f64;
        qq += q as f64 * q as f64;
        rr += r as f64 * r as f64;
    }
    let cos = if qq == 0.0 && rr == 0.0 {
        1.0
    } else if qq == 0.0 || rr == 0.0 {
        0.0
    } else {
        (dot / (qq.sqrt() * rr.sqrt())).clamp(-1.0, 1.0)
    };
    let snr = if se == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (rr / se).log10()
    };
    ErrorMetrics {
        mse: (se / n as f64) as f32,
        max_abs_error: mx,
        cosine_similarity: cos as f32,
        snr_db: snr as f32,
    }
}

/// L2 norm.
pub fn l2_norm(x: &[f32]) -> f32 {
    x.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt() as f32
}

/// Entropy in nats.
pub fn entropy(p: &[f32]) -> f32 {
    -p.iter()
        .filter(|v| v.is_finite() && **v > 0.0)
        .map(|&v| v as f64 * (v as f64).ln())
        .sum::<f64>() as f32
}

/// Top-k.
pub fn top_k(values: &[f32], k: usize, out: &mut Vec<(usize, f32)>) {
    out.clear();
    if k == 0 {
        return;
    }
    for (i, &v) in values.iter().enumerate() {
        if v.is_nan() {
            continue;
        }
        if out.len() == k {
            if let Some(last) = out.last() {
                if v <= last.1 {
                    continue;
                }
            }
            out.pop();
        }
        let pos = out.partition_point(|&(_, w)| w >= v);
        out.insert(pos, (i, v));
    }
}

/// Rank.
pub fn rank_of(values: &[f32], index: usize) -> Option<usize> {
    let t = *values.get(index)?;
    if t.is_nan() {
        return Some(values.iter().filter(|v| !v.is_nan()).count());
    }
    Some(values.iter().filter(|&&v| v > t).count())
}

/// Ranks.
pub fn ranks_of(values: &[f32], indices: &[usize], out: &mut [usize]) {
    for (o, &i) in out.iter_mut().zip(indices) {
        *o = rank_of(values, i).unwrap_or(usize::MAX);
    }
}

/// Argmax.
pub fn argmax(values: &[f32]) -> Option<usize> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &v) in values.iter().enumerate() {
        if v.is_nan() {
            continue;
        }
        if best.is_none_or(|(_, b)| v > b) {
            best = Some((i, v));
        }
    }
    best.map(|b| b.0)
}

/// KL.
pub fn log_softmax_kl(p_logits: &[f32], q_logits: &[f32]) -> f32 {
    let lse = |x: &[f32]| {
        let m = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        m + x.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln()
    };
    let (lp, lq) = (lse(p_logits), lse(q_logits));
    p_logits
        .iter()
        .zip(q_logits)
        .map(|(&p, &q)| {
            let a = p as f64 - lp;
            a.exp() * (a - (q as f64 - lq))
        })
        .sum::<f64>() as f32
}
