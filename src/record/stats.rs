//! Single-pass reductions over `&[f32]`: tensor statistics, quantization
//! error metrics, entropy, ranking and KL divergence.
//!
//! # How [`TensorStats::from_slice`] stays fast and accurate
//!
//! The data is read once with `wide` vectors of the native width (`f32x4`
//! with SSE, `f32x8` with AVX), eight vectors per step. Per lane the kernel
//! keeps, in `f32`, the sum of `y = x - shift`, the sum of `y²`, and the
//! minimum and maximum of `x`. Elements after the last whole vector go
//! through a scalar tail with the same meaning.
//!
//! A step is read as four pairs of vectors `(a, b)`: each pair gives one
//! `a + b`, one `b·b + a·a` (a multiply and a fused multiply-add), one
//! `fast_min` and one `fast_max`, and the four partials of each are added
//! as a tree of depth two, so every loop-carried accumulator sees one
//! operation per step and the step needs no register beyond the sixteen of
//! x86-64 (no spill): with AVX2 and FMA the loop is 47 instructions per 64
//! elements.
//!
//! **Blocks in `f64`.** Every 32 steps the `f32` lane sums are widened into
//! `f64`, so no `f32` lane sum takes more than 32 additions. Every
//! [`BLOCK_LEN`] elements the `f64` sums become the block's count, mean and
//! centred second moment `M2 = Σy² - (Σy)²/n`, which are merged into the
//! running totals with Chan's pairwise update (`δ = mean_b - mean_a`,
//! `M2 = M2_a + M2_b + δ²·n_a·n_b/n`). The L2 norm is summed per block as
//! `M2 + n·mean²` (two non-negative terms, no cancellation).
//!
//! **Shift.** The first block's shift comes from its first eight elements:
//! zero when their mean is no farther from zero than their range, their mean
//! otherwise. Each later block takes the previous block's mean, or zero when
//! `n·mean² ≤ M2`; zero-shift blocks run a kernel without the subtraction.
//!
//! Everything the common path does not pay for is detected per block from
//! values it computes anyway:
//!
//! * **NaN / ±Inf / overflow.** `Σy²` is a sum of non-negative terms, so it is
//!   finite exactly when every element is finite and no square or partial sum
//!   overflowed. Only then is the block accepted; otherwise it is re-read with
//!   a masked kernel that counts NaN and Inf and excludes them. If that sum
//!   still overflows (squares beyond `f32::MAX`), the block is redone in
//!   `f64`, which holds the square of any `f32`.
//! * **Cancellation.** The block is accepted only if `4·M2 ≥ Σy²`, i.e. the
//!   shift is within about two standard deviations of the block mean, which
//!   bounds the relative error of `M2` by a small multiple of the `f32` lane
//!   error. Otherwise the block is re-read once with its own mean as shift
//!   (from L1 cache: a block is 16 KiB), and if that still fails, redone in
//!   `f64` with two passes.
//! * **Underflow.** If the largest `|x - shift|` of a block is below `2^-50`,
//!   squares would lose precision to `f32` underflow (denormal inputs), so the
//!   block is redone in `f64`.
//! * **Constant blocks** (`min == max`) have `M2 = 0` and `mean = min` exactly,
//!   so an all-equal tensor has a standard deviation of exactly zero.
//!
//! With at most 32 `f32` additions per lane sum plus a three-level tree and
//! the factor-4 cancellation bound, the typical relative error of mean, std
//! and L2 is around `1e-7` and stays below `1e-5` on the adversarial inputs of
//! the accuracy tests.

cfg_if::cfg_if! {
    // The native register width: one `V` is one hardware vector, so the
    // accumulators of the kernel fit the 16 registers of x86-64.
    if #[cfg(target_feature = "avx")] {
        type V = wide::f32x8;
        type U = wide::u32x8;
        const LANES: usize = 8;
    } else {
        type V = wide::f32x4;
        type U = wide::u32x4;
        const LANES: usize = 4;
    }
}

/// Largest finite `|x|` a healthy activation may have; a larger `max_abs()`
/// counts as an explosion (absolute value, same unit as the tensor).
pub const EXPLOSION_ABS: f32 = 1e6;
/// Largest sample standard deviation a healthy activation may have; larger
/// counts as an explosion (same unit as the tensor).
pub const EXPLOSION_STD: f32 = 1e4;
/// Sample standard deviation below which a tensor of at least two finite
/// values counts as vanishing (same unit as the tensor).
pub const VANISHING_STD: f32 = 1e-6;

/// Native vectors per step of the kernel.
const VECS: usize = 8;
/// Elements per step of the kernel.
const STEP: usize = VECS * LANES;

/// Elements after which the `f32` lane sums are widened into `f64`: no lane
/// sum takes more than 32 steps.
const FLUSH_LEN: usize = 32 * STEP;

/// Elements per `f32` accumulation of the single-accumulator reductions
/// (error metrics, L2 norm, entropy, KL): 32 additions per lane, then `f64`.
const CHAIN_LEN: usize = 32 * LANES;

/// Number of elements per block of [`TensorStats::from_slice`]: each block
/// gets its own shift, cancellation check and Chan merge, and is small enough
/// to be re-read from L1 cache when that check asks for a second attempt.
pub const BLOCK_LEN: usize = 4096;
/// `2^-50`: below this largest `|x - shift|`, `f32` squares underflow.
const TINY_SPREAD: f64 = 8.881_784_197_001_252e-16;
/// `2^-100`: a sum of squares below this may have lost terms to underflow.
const TINY_SUMSQ: f64 = 7.888_609_052_210_118e-31;

/// Summary statistics of one tensor, computed in a single pass.
///
/// All floating-point fields are in the unit of the tensor's values and cover
/// only the finite elements; NaN and ±Inf are counted, not averaged. When no
/// element is finite (including the empty slice) `min`, `max`, `mean`, `std`
/// and `l2_norm` are all `0.0`.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct TensorStats {
    /// Number of elements in the slice, including NaN and ±Inf.
    pub count: usize,
    /// Smallest finite element.
    #[cfg_attr(feature = "serde", serde(with = "crate::serde_float"))]
    pub min: f32,
    /// Largest finite element.
    #[cfg_attr(feature = "serde", serde(with = "crate::serde_float"))]
    pub max: f32,
    /// Arithmetic mean of the finite elements.
    #[cfg_attr(feature = "serde", serde(with = "crate::serde_float"))]
    pub mean: f32,
    /// Sample standard deviation (divisor `n - 1`) of the finite elements;
    /// `0.0` when fewer than two elements are finite.
    #[cfg_attr(feature = "serde", serde(with = "crate::serde_float"))]
    pub std: f32,
    /// Euclidean norm `sqrt(Σ x²)` of the finite elements.
    #[cfg_attr(feature = "serde", serde(with = "crate::serde_float"))]
    pub l2_norm: f32,
    /// Number of NaN elements.
    pub nan_count: usize,
    /// Number of infinite elements, `+Inf` and `-Inf` together.
    pub inf_count: usize,
}

impl TensorStats {
    /// Statistics of `data` in one pass; see the module documentation for
    /// the method and its accuracy. Never allocates.
    pub fn from_slice(data: &[f32]) -> Self {
        let mut acc = StatsAccumulator::new();
        acc.push(data);
        acc.finish()
    }

    /// Statistics of the concatenation of the two tensors these statistics
    /// describe, equal to [`TensorStats::from_slice`] of the concatenation up
    /// to rounding (Chan's parallel update of mean and second moment).
    pub fn merge(&self, other: &Self) -> Self {
        let m = Moments::from_stats(self).merge(Moments::from_stats(other));
        // Counts read back from a trace may be anything: they saturate.
        m.to_stats(
            self.count.saturating_add(other.count),
            self.nan_count.saturating_add(other.nan_count),
            self.inf_count.saturating_add(other.inf_count),
        )
    }

    /// Number of finite elements (those the moments are computed over).
    pub fn finite_count(&self) -> usize {
        self.count
            .saturating_sub(self.nan_count)
            .saturating_sub(self.inf_count)
    }

    /// Whether any element is NaN.
    pub fn has_nan(&self) -> bool {
        self.nan_count > 0
    }

    /// Whether any element is `+Inf` or `-Inf`.
    pub fn has_inf(&self) -> bool {
        self.inf_count > 0
    }

    /// Largest finite absolute value, `max(|min|, |max|)`.
    pub fn max_abs(&self) -> f32 {
        self.min.abs().max(self.max.abs())
    }

    /// Whether the finite values explode: `max_abs() >` [`EXPLOSION_ABS`] or
    /// `std >` [`EXPLOSION_STD`].
    pub fn is_exploding(&self) -> bool {
        self.max_abs() > EXPLOSION_ABS || self.std > EXPLOSION_STD
    }

    /// Whether at least two values are finite and their sample standard
    /// deviation is below [`VANISHING_STD`].
    pub fn is_vanishing(&self) -> bool {
        self.finite_count() >= 2 && self.std < VANISHING_STD
    }

    /// Whether the tensor holds NaN, Inf, or exploding values. Vanishing is
    /// not included: whether a flat tensor is a problem depends on the layer.
    pub fn has_anomaly(&self) -> bool {
        self.has_nan() || self.has_inf() || self.is_exploding()
    }

    /// A human-readable account of every anomaly found by
    /// [`TensorStats::has_anomaly`], joined by `"; "`, or `None` when there is
    /// none. NaN findings always contain the word `NaN`.
    pub fn anomaly_description(&self) -> Option<String> {
        let mut parts: Vec<String> = Vec::new();
        if self.has_nan() {
            parts.push(format!("NaN: {} of {} values", self.nan_count, self.count));
        }
        if self.has_inf() {
            parts.push(format!("Inf: {} of {} values", self.inf_count, self.count));
        }
        if self.max_abs() > EXPLOSION_ABS {
            parts.push(format!(
                "explosion: max |x| = {:.1e} (> {:.0e})",
                self.max_abs(),
                EXPLOSION_ABS
            ));
        }
        if self.std > EXPLOSION_STD {
            parts.push(format!(
                "explosion: std = {:.1e} (> {:.0e})",
                self.std, EXPLOSION_STD
            ));
        }
        if parts.is_empty() {
            None
        } else {
            Some(parts.join("; "))
        }
    }
}

/// Count, mean, centred second moment and sum of squares of finite values,
/// kept in `f64` so that merging many blocks adds no visible error.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Moments {
    n: u64,
    mean: f64,
    m2: f64,
    sumsq: f64,
    min: f32,
    max: f32,
}

impl Moments {
    fn merge(self, o: Self) -> Self {
        if o.n == 0 {
            return self;
        }
        if self.n == 0 {
            return o;
        }
        // Counts of statistics read back from a trace may be anything.
        let n = self.n.saturating_add(o.n);
        let (na, nb) = (self.n as f64, o.n as f64);
        let nf = na + nb;
        let d = o.mean - self.mean;
        Moments {
            n,
            mean: self.mean + d * (nb / nf),
            m2: self.m2 + o.m2 + d * d * (na * nb / nf),
            sumsq: self.sumsq + o.sumsq,
            min: self.min.min(o.min),
            max: self.max.max(o.max),
        }
    }

    fn from_stats(s: &TensorStats) -> Self {
        let n = s.finite_count() as u64;
        if n == 0 {
            return Moments::default();
        }
        let std = s.std as f64;
        let l2 = s.l2_norm as f64;
        Moments {
            n,
            mean: s.mean as f64,
            m2: std * std * (n - 1) as f64,
            sumsq: l2 * l2,
            min: s.min,
            max: s.max,
        }
    }

    fn to_stats(self, count: usize, nan_count: usize, inf_count: usize) -> TensorStats {
        if self.n == 0 {
            return TensorStats {
                count,
                nan_count,
                inf_count,
                ..TensorStats::default()
            };
        }
        let std = if self.n >= 2 {
            let inv_dof = 1.0 / (self.n - 1) as f64;
            sqrt_to_f32(self.m2 * inv_dof)
        } else {
            0.0
        };
        TensorStats {
            count,
            min: self.min,
            max: self.max,
            mean: clamp_mean(self.mean as f32, self.min, self.max),
            std,
            l2_norm: sqrt_to_f32(self.sumsq),
            nan_count,
            inf_count,
        }
    }
}

/// `mean` within `[min, max]` (rounding can take it just outside). Bounds
/// that are not an interval (NaN, or min above max: statistics read back
/// from a trace may be anything) leave it as it is, where `f32::clamp`
/// would panic.
fn clamp_mean(mean: f32, min: f32, max: f32) -> f32 {
    if min <= max {
        mean.clamp(min, max)
    } else {
        mean
    }
}

/// `sqrt(x)` rounded to `f32`, for `x ≥ 0` (negative rounding noise gives 0).
/// Uses the faster `f32` square root when `x` is a normal `f32` value; the
/// double rounding stays within one `f32` ulp.
#[inline(always)]
fn sqrt_to_f32(x: f64) -> f32 {
    let x = x.max(0.0);
    if (f32::MIN_POSITIVE as f64..=f32::MAX as f64).contains(&x) {
        (x as f32).sqrt()
    } else {
        x.sqrt() as f32
    }
}

/// Raw sums of one block read with `f32` lanes.
struct LaneSums {
    sum: f64,
    sq: f64,
    min: f32,
    max: f32,
    finite: usize,
    nan: usize,
}

/// What to do with a block after its lane sums are in.
enum Verdict {
    Accept(Moments),
    Retry(f32),
    Fallback,
}

#[inline(always)]
fn load(c: &[f32]) -> V {
    V::from(c)
}

#[inline(always)]
fn tree4(v: [V; 4], op: impl Fn(V, V) -> V) -> V {
    op(op(v[0], v[1]), op(v[2], v[3]))
}

/// Sum of the lanes in `f64`: the lanes are widened in groups of four and
/// added as vectors, then the four `f64` partial sums.
#[inline(always)]
fn widen_sum(v: V) -> f64 {
    let a = v.to_array();
    let mut acc = wide::f64x4::ZERO;
    for c in a.chunks_exact(4) {
        acc += wide::f64x4::from([c[0] as f64, c[1] as f64, c[2] as f64, c[3] as f64]);
    }
    let w = acc.to_array();
    (w[0] + w[2]) + (w[1] + w[3])
}

/// The two halves of the lanes as arrays of four (the upper half is empty
/// for four lanes).
#[inline(always)]
fn halves(v: V) -> ([f32; 4], Option<[f32; 4]>) {
    let a = v.to_array();
    let mut lo = [0.0; 4];
    lo.copy_from_slice(&a[..4]);
    let hi = (LANES == 8).then(|| {
        let mut hi = [0.0; 4];
        hi.copy_from_slice(&a[LANES - 4..]);
        hi
    });
    (lo, hi)
}

/// Smallest lane of a vector that holds no NaN, as a tree of lane pairs.
#[inline(always)]
fn lane_min_of_numbers(v: V) -> f32 {
    let pick = |a: f32, b: f32| if b < a { b } else { a };
    let (lo, hi) = halves(v);
    let q = match hi {
        Some(hi) => std::array::from_fn(|i| pick(lo[i], hi[i])),
        None => lo,
    };
    pick(pick(q[0], q[2]), pick(q[1], q[3]))
}

/// Largest lane of a vector that holds no NaN, as a tree of lane pairs.
#[inline(always)]
fn lane_max_of_numbers(v: V) -> f32 {
    let pick = |a: f32, b: f32| if b > a { b } else { a };
    let (lo, hi) = halves(v);
    let q = match hi {
        Some(hi) => std::array::from_fn(|i| pick(lo[i], hi[i])),
        None => lo,
    };
    pick(pick(q[0], q[2]), pick(q[1], q[3]))
}

#[inline(always)]
fn lane_max(v: V) -> f32 {
    v.to_array()
        .iter()
        .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a })
}

/// Reads one block with `V` lanes. `SHIFTED == false` means a shift of
/// zero without the subtraction. `MASKED == false` assumes nothing and lets
/// NaN/Inf poison `sq` (the caller checks); `MASKED == true` excludes and
/// counts non-finite elements. Only finite values or ±Inf fillers ever reach
/// `fast_min`/`fast_max`, whose NaN handling differs between targets.
#[inline(always)]
fn scan_block<const SHIFTED: bool, const MASKED: bool>(block: &[f32], shift: f32) -> LaneSums {
    let s = V::splat(shift);
    let pos_inf = V::splat(f32::INFINITY);
    let neg_inf = V::splat(f32::NEG_INFINITY);
    let mut acc_min = pos_inf;
    let mut acc_max = neg_inf;
    let mut finite = 0usize;
    let mut nan = 0usize;

    // Returns (value for the sums, value for min, value for max).
    let prep = |x: V, finite: &mut usize, nan: &mut usize| -> (V, V, V) {
        if MASKED {
            let ok = x.is_finite();
            *finite += ok.to_bitmask().count_ones() as usize;
            *nan += x.is_nan().to_bitmask().count_ones() as usize;
            let v = ok.select(x, s);
            let y = if SHIFTED { v - s } else { v };
            (y, ok.select(x, pos_inf), ok.select(x, neg_inf))
        } else {
            let y = if SHIFTED { x - s } else { x };
            (y, x, x)
        }
    };

    let mut sum = 0.0f64;
    let mut sq = 0.0f64;
    for sub in block.chunks(FLUSH_LEN) {
        let mut acc_sum = V::ZERO;
        let mut acc_sq = V::ZERO;
        let mut steps = sub.chunks_exact(STEP);
        for c in &mut steps {
            // Each pair of vectors gives one partial sum, sum of squares,
            // minimum and maximum; the four partials of each are added as
            // a tree, so each accumulator sees one operation per step.
            let mut sums = [V::ZERO; VECS / 2];
            let mut squares = [V::ZERO; VECS / 2];
            let mut mins = [V::ZERO; VECS / 2];
            let mut maxs = [V::ZERO; VECS / 2];
            for (i, pair) in c.chunks_exact(2 * LANES).enumerate() {
                let (a, a_lo, a_hi) = prep(load(&pair[..LANES]), &mut finite, &mut nan);
                let (b, b_lo, b_hi) = prep(load(&pair[LANES..]), &mut finite, &mut nan);
                sums[i] = a + b;
                squares[i] = b.mul_add(b, a * a);
                mins[i] = a_lo.fast_min(b_lo);
                maxs[i] = a_hi.fast_max(b_hi);
            }
            acc_sum += tree4(sums, |a, b| a + b);
            acc_sq += tree4(squares, |a, b| a + b);
            acc_min = acc_min.fast_min(tree4(mins, V::fast_min));
            acc_max = acc_max.fast_max(tree4(maxs, V::fast_max));
        }
        let mut vectors = steps.remainder().chunks_exact(LANES);
        for c in &mut vectors {
            let (y, lo, hi) = prep(load(c), &mut finite, &mut nan);
            acc_sum += y;
            acc_sq = y.mul_add(y, acc_sq);
            acc_min = acc_min.fast_min(lo);
            acc_max = acc_max.fast_max(hi);
        }
        sum += widen_sum(acc_sum);
        sq += widen_sum(acc_sq);
        if !vectors.remainder().is_empty() {
            let t = scalar_tail::<SHIFTED, MASKED>(vectors.remainder(), shift);
            sum += t.sum;
            sq += t.sq;
            finite += t.finite;
            nan += t.nan;
            acc_min = acc_min.fast_min(V::splat(t.min));
            acc_max = acc_max.fast_max(V::splat(t.max));
        }
    }

    LaneSums {
        sum,
        sq,
        min: lane_min_of_numbers(acc_min),
        max: lane_max_of_numbers(acc_max),
        finite: if MASKED { finite } else { block.len() },
        nan,
    }
}

/// The fewer than `LANES` elements after the last whole vector, in scalars,
/// with the same meaning of `SHIFTED` and `MASKED` as [`scan_block`].
#[inline(never)]
fn scalar_tail<const SHIFTED: bool, const MASKED: bool>(tail: &[f32], shift: f32) -> LaneSums {
    let mut t = LaneSums {
        sum: 0.0,
        sq: 0.0,
        min: f32::INFINITY,
        max: f32::NEG_INFINITY,
        finite: 0,
        nan: 0,
    };
    for &x in tail {
        if MASKED {
            if x.is_nan() {
                t.nan += 1;
                continue;
            }
            if x.is_infinite() {
                continue;
            }
            t.finite += 1;
        }
        let y = if SHIFTED { x - shift } else { x };
        t.sum += y as f64;
        t.sq += (y * y) as f64;
        t.min = t.min.min(x);
        t.max = t.max.max(x);
    }
    t
}

/// Turns one block's lane sums into moments, or says why it cannot.
fn judge(raw: &LaneSums, shift: f32) -> Verdict {
    let n = raw.finite;
    if n == 0 {
        return Verdict::Accept(Moments::default());
    }
    if !raw.sq.is_finite() {
        return Verdict::Fallback;
    }
    let nf = n as f64;
    // Independent of the sums, so it overlaps the end of the scan.
    let inv_n = 1.0 / nf;
    let (min, max) = (raw.min, raw.max);
    if min == max {
        let c = min as f64;
        return Verdict::Accept(Moments {
            n: n as u64,
            mean: c,
            m2: 0.0,
            sumsq: nf * c * c,
            min,
            max,
        });
    }
    let sh = shift as f64;
    let spread = (min as f64 - sh).abs().max((max as f64 - sh).abs());
    if spread < TINY_SPREAD {
        return Verdict::Fallback;
    }
    let mean_y = raw.sum * inv_n;
    let m2 = raw.sq - raw.sum * mean_y;
    let mean = (sh + mean_y).clamp(min as f64, max as f64);
    if 4.0 * m2 < raw.sq {
        return Verdict::Retry(mean as f32);
    }
    Verdict::Accept(Moments {
        n: n as u64,
        mean,
        m2,
        sumsq: m2 + nf * mean * mean,
        min,
        max,
    })
}

/// Exact-as-`f64` two-pass moments of one block, skipping non-finite values.
#[cold]
fn f64_block(block: &[f32]) -> Moments {
    let mut n = 0u64;
    let mut sum = 0.0f64;
    let mut min = f32::INFINITY;
    let mut max = f32::NEG_INFINITY;
    for &x in block.iter().filter(|x| x.is_finite()) {
        n += 1;
        sum += x as f64;
        min = min.min(x);
        max = max.max(x);
    }
    if n == 0 {
        return Moments::default();
    }
    let mean = (sum / n as f64).clamp(min as f64, max as f64);
    let mut m2 = 0.0f64;
    let mut sumsq = 0.0f64;
    for &x in block.iter().filter(|x| x.is_finite()) {
        let x = x as f64;
        let d = x - mean;
        m2 += d * d;
        sumsq += x * x;
    }
    Moments {
        n,
        mean,
        m2,
        sumsq,
        min,
        max,
    }
}

/// Second attempt at a block with a better shift, or the `f64` fallback.
#[cold]
fn retry_block(block: &[f32], shift: f32, masked: bool) -> Moments {
    let raw = if masked {
        scan_block::<true, true>(block, shift)
    } else {
        scan_block::<true, false>(block, shift)
    };
    match judge(&raw, shift) {
        Verdict::Accept(m) => m,
        Verdict::Retry(_) | Verdict::Fallback => f64_block(block),
    }
}

/// Re-reads a block that holds a non-finite value or overflowed.
#[cold]
fn masked_block(block: &[f32], shift: f32) -> (Moments, usize, usize) {
    let raw = if shift == 0.0 {
        scan_block::<false, true>(block, 0.0)
    } else {
        scan_block::<true, true>(block, shift)
    };
    let inf = block.len() - raw.finite - raw.nan;
    let m = match judge(&raw, shift) {
        Verdict::Accept(m) => m,
        Verdict::Retry(s) => retry_block(block, s, true),
        Verdict::Fallback => f64_block(block),
    };
    (m, raw.nan, inf)
}

/// Number of leading elements that choose the shift of the first block.
const PILOT_LEN: usize = 8;

/// The shift for the first block, from its first few elements: zero when
/// their mean is no farther from zero than their range (no subtraction
/// needed), their mean otherwise, so that data far from zero does not need a
/// second attempt at its first block. Any non-finite element among them
/// gives zero.
fn pilot_shift(data: &[f32]) -> f32 {
    const { assert!(PILOT_LEN % LANES == 0) };
    let head = &data[..data.len().min(PILOT_LEN)];
    let (sum, lo, hi) = if head.len() == PILOT_LEN {
        // Whole vectors. A NaN or infinity makes the sum non-finite, which
        // gives zero below whatever the minimum and maximum are.
        let mut vectors = head.chunks_exact(LANES).map(load);
        let first = vectors.next().unwrap_or(V::ZERO);
        let (s, lo, hi) = vectors.fold((first, first, first), |(s, lo, hi), v| {
            (s + v, lo.fast_min(v), hi.fast_max(v))
        });
        (
            s.reduce_add(),
            lane_min_of_numbers(lo),
            lane_max_of_numbers(hi),
        )
    } else {
        let (mut sum, mut lo, mut hi) = (0.0f32, f32::INFINITY, f32::NEG_INFINITY);
        for &x in head {
            sum += x;
            lo = if x < lo { x } else { lo };
            hi = if x > hi { x } else { hi };
        }
        (sum, lo, hi)
    };
    let mean = sum / head.len().max(1) as f32;
    if !(hi - lo).is_finite() || !mean.is_finite() || mean.abs() <= hi - lo {
        0.0
    } else {
        mean.clamp(lo, hi)
    }
}

/// Streaming accumulator for a tensor that arrives in pieces; the result of
/// [`StatsAccumulator::finish`] equals [`TensorStats::from_slice`] of the
/// concatenation up to rounding. State is kept in `f64`, so many small pieces
/// lose no more accuracy than one large one. Never allocates.
#[derive(Debug, Clone, Default)]
pub struct StatsAccumulator {
    moments: Moments,
    count: usize,
    nan: usize,
    inf: usize,
    shift: f32,
}

impl StatsAccumulator {
    /// An accumulator that has seen no element.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the elements of `data`.
    pub fn push(&mut self, data: &[f32]) {
        self.count += data.len();
        if self.moments.n == 0 {
            self.shift = pilot_shift(data);
        }
        for block in data.chunks(BLOCK_LEN) {
            let raw = if self.shift == 0.0 {
                scan_block::<false, false>(block, 0.0)
            } else {
                scan_block::<true, false>(block, self.shift)
            };
            if raw.sq.is_finite() {
                if let Verdict::Accept(m) = judge(&raw, self.shift) {
                    self.absorb(m);
                    continue;
                }
            }
            self.absorb_hard_block(block, &raw);
        }
    }

    /// Blocks that need a second look: non-finite values, overflow,
    /// underflow or cancellation. Kept out of line so that the common path
    /// holds its block moments in registers.
    #[cold]
    #[inline(never)]
    fn absorb_hard_block(&mut self, block: &[f32], raw: &LaneSums) {
        let m = if raw.sq.is_finite() {
            match judge(raw, self.shift) {
                Verdict::Accept(m) => m,
                Verdict::Retry(s) => retry_block(block, s, false),
                Verdict::Fallback => f64_block(block),
            }
        } else {
            let (m, nan, inf) = masked_block(block, self.shift);
            self.nan += nan;
            self.inf += inf;
            m
        };
        self.absorb(m);
    }

    /// Merges one block's moments and picks the shift of the next block.
    #[inline(always)]
    fn absorb(&mut self, m: Moments) {
        if m.n > 0 {
            self.shift = if m.n as f64 * m.mean * m.mean <= m.m2 {
                0.0
            } else {
                m.mean as f32
            };
        }
        self.moments = self.moments.merge(m);
    }

    /// Adds a tensor that is already summarised.
    pub fn push_stats(&mut self, s: &TensorStats) {
        self.moments = self.moments.merge(Moments::from_stats(s));
        self.count = self.count.saturating_add(s.count);
        self.nan = self.nan.saturating_add(s.nan_count);
        self.inf = self.inf.saturating_add(s.inf_count);
    }

    /// Statistics of everything added so far; the accumulator is unchanged.
    pub fn finish(&self) -> TensorStats {
        self.moments.to_stats(self.count, self.nan, self.inf)
    }

    /// Forgets everything added so far.
    pub fn clear(&mut self) {
        *self = Self::default();
    }
}

/// Error of a quantized result against its reference.
///
/// Any NaN or infinite element in either input makes every field NaN, so a
/// broken result never looks acceptable.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct ErrorMetrics {
    /// Mean squared error `Σ(q - r)² / n` (unit of the values, squared);
    /// `0.0` for empty inputs.
    #[cfg_attr(feature = "serde", serde(with = "crate::serde_float"))]
    pub mse: f32,
    /// Largest `|q - r|` (unit of the values); `0.0` for empty inputs.
    #[cfg_attr(feature = "serde", serde(with = "crate::serde_float"))]
    pub max_abs_error: f32,
    /// Cosine similarity of the two vectors in `[-1, 1]`; `1.0` when both are
    /// all-zero (or empty), `0.0` when exactly one is.
    #[cfg_attr(feature = "serde", serde(with = "crate::serde_float"))]
    pub cosine_similarity: f32,
    /// Signal-to-noise ratio `10·log10(Σr² / Σ(q - r)²)` in decibels;
    /// `+Inf` when the noise is exactly zero, `-Inf` when the reference is
    /// all-zero and the noise is not.
    #[cfg_attr(feature = "serde", serde(with = "crate::serde_float"))]
    pub snr_db: f32,
}

impl ErrorMetrics {
    fn nan() -> Self {
        ErrorMetrics {
            mse: f32::NAN,
            max_abs_error: f32::NAN,
            cosine_similarity: f32::NAN,
            snr_db: f32::NAN,
        }
    }
}

/// Sums behind [`ErrorMetrics`], in `f64`.
#[derive(Default)]
struct ErrorSums {
    dd: f64,
    qr: f64,
    qq: f64,
    rr: f64,
    max_d: f32,
}

/// Exact-as-`f64` sums of one block; `None` if any element is not finite.
#[cold]
fn error_sums_f64(q: &[f32], r: &[f32]) -> Option<ErrorSums> {
    let mut s = ErrorSums::default();
    for (&a, &b) in q.iter().zip(r) {
        if !a.is_finite() || !b.is_finite() {
            return None;
        }
        let (a, b) = (a as f64, b as f64);
        let d = a - b;
        s.dd += d * d;
        s.qr += a * b;
        s.qq += a * a;
        s.rr += b * b;
        s.max_d = s.max_d.max(d.abs() as f32);
    }
    Some(s)
}

fn max_abs_of(x: &[f32]) -> f32 {
    x.iter().fold(0.0f32, |m, v| m.max(v.abs()))
}

/// Error metrics of `quantized` against `reference` in one pass.
///
/// The inputs should have equal lengths; otherwise only the common prefix is
/// compared (callers check lengths). Empty inputs give `mse = 0`,
/// `max_abs_error = 0`, `cosine_similarity = 1` and `snr_db = +Inf`. Any NaN
/// or infinite element makes every metric NaN. Sums are formed in `f32` lanes
/// per block and merged in `f64`; blocks whose sums overflow or may have lost
/// terms to underflow are redone in `f64`.
pub fn error_metrics(quantized: &[f32], reference: &[f32]) -> ErrorMetrics {
    let n = quantized.len().min(reference.len());
    let (q, r) = (&quantized[..n], &reference[..n]);
    let mut tot = ErrorSums::default();
    for (qb, rb) in q.chunks(CHAIN_LEN).zip(r.chunks(CHAIN_LEN)) {
        let mut dd = V::ZERO;
        let mut qr = V::ZERO;
        let mut qq = V::ZERO;
        let mut rr = V::ZERO;
        let mut md = V::ZERO;
        let mut qc = qb.chunks_exact(LANES);
        let mut rc = rb.chunks_exact(LANES);
        for (a, b) in (&mut qc).zip(&mut rc) {
            let (a, b) = (load(a), load(b));
            let d = a - b;
            dd = d.mul_add(d, dd);
            qr = a.mul_add(b, qr);
            qq = a.mul_add(a, qq);
            rr = b.mul_add(b, rr);
            md = md.max(d.abs());
        }
        let mut s = ErrorSums {
            dd: widen_sum(dd),
            qr: widen_sum(qr),
            qq: widen_sum(qq),
            rr: widen_sum(rr),
            max_d: lane_max(md),
        };
        for (&a, &b) in qc.remainder().iter().zip(rc.remainder()) {
            let d = a - b;
            s.dd += (d * d) as f64;
            s.qr += (a * b) as f64;
            s.qq += (a * a) as f64;
            s.rr += (b * b) as f64;
            s.max_d = s.max_d.max(d.abs());
        }
        let all_finite = s.dd.is_finite()
            && s.qr.is_finite()
            && s.qq.is_finite()
            && s.rr.is_finite()
            && s.max_d.is_finite();
        let underflow = (s.dd < TINY_SUMSQ && s.max_d > 0.0)
            || (s.qq < TINY_SUMSQ && max_abs_of(qb) > 0.0)
            || (s.rr < TINY_SUMSQ && max_abs_of(rb) > 0.0);
        if !all_finite || underflow {
            match error_sums_f64(qb, rb) {
                Some(exact) => s = exact,
                None => return ErrorMetrics::nan(),
            }
        }
        tot.dd += s.dd;
        tot.qr += s.qr;
        tot.qq += s.qq;
        tot.rr += s.rr;
        tot.max_d = tot.max_d.max(s.max_d);
    }
    if n == 0 {
        return ErrorMetrics {
            mse: 0.0,
            max_abs_error: 0.0,
            cosine_similarity: 1.0,
            snr_db: f32::INFINITY,
        };
    }
    let cosine = match (tot.qq > 0.0, tot.rr > 0.0) {
        (false, false) => 1.0,
        (true, true) => (tot.qr / (tot.qq.sqrt() * tot.rr.sqrt())).clamp(-1.0, 1.0),
        _ => 0.0,
    };
    let snr_db = if tot.dd == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (tot.rr / tot.dd).log10()
    };
    ErrorMetrics {
        mse: (tot.dd / n as f64) as f32,
        max_abs_error: tot.max_d,
        cosine_similarity: cosine as f32,
        snr_db: snr_db as f32,
    }
}

/// Euclidean norm `sqrt(Σ x²)` of `x`. A NaN element gives NaN and an
/// infinite one `+Inf`; finite inputs never overflow or underflow in the
/// intermediate sums.
pub fn l2_norm(x: &[f32]) -> f32 {
    let mut total = 0.0f64;
    for block in x.chunks(CHAIN_LEN) {
        let mut acc = V::ZERO;
        let mut vectors = block.chunks_exact(LANES);
        for c in &mut vectors {
            let v = load(c);
            acc = v.mul_add(v, acc);
        }
        let mut s = widen_sum(acc);
        for &v in vectors.remainder() {
            s += (v * v) as f64;
        }
        if !s.is_finite() || (s < TINY_SUMSQ && max_abs_of(block) > 0.0) {
            s = block.iter().map(|&v| (v as f64) * (v as f64)).sum();
        }
        total += s;
    }
    total.sqrt() as f32
}

/// Shannon entropy `-Σ p·ln p` in nats of the probability vector `p`,
/// summed over the finite entries with `p > 0` (others contribute nothing).
/// The input is not renormalised.
pub fn entropy(p: &[f32]) -> f32 {
    let one = V::ONE;
    let smallest = V::splat(f32::MIN_POSITIVE);
    let largest = V::splat(f32::MAX);
    let mut total = 0.0f64;
    for block in p.chunks(CHAIN_LEN) {
        let mut acc = V::ZERO;
        let mut vectors = block.chunks_exact(LANES);
        for c in &mut vectors {
            let v = load(c);
            let normal = v.simd_ge(smallest) & v.simd_le(largest);
            let w = normal.select(v, one);
            acc += normal.select(w * w.ln(), V::ZERO);
            let subnormal = v.simd_gt(V::ZERO) & v.simd_lt(smallest);
            if subnormal.any() {
                total += scalar_plnp(c.iter().filter(|&&x| x > 0.0 && x < f32::MIN_POSITIVE));
            }
        }
        total += widen_sum(acc);
        total += scalar_plnp(
            vectors
                .remainder()
                .iter()
                .filter(|x| x.is_finite() && **x > 0.0),
        );
    }
    (-total) as f32
}

fn scalar_plnp<'a>(values: impl Iterator<Item = &'a f32>) -> f64 {
    values
        .map(|&x| {
            let x = x as f64;
            x * x.ln()
        })
        .sum()
}

/// Whether `a` ranks before `b`: larger value first, then lower index.
#[inline]
fn ranks_before(a: (usize, f32), b: (usize, f32)) -> bool {
    a.1 > b.1 || (a.1 == b.1 && a.0 < b.0)
}

/// Restores the heap order (worst entry at the root) after a push.
fn sift_up(h: &mut [(usize, f32)], mut i: usize) {
    while i > 0 {
        let parent = (i - 1) / 2;
        if ranks_before(h[parent], h[i]) {
            h.swap(parent, i);
            i = parent;
        } else {
            break;
        }
    }
}

/// Restores the heap order (worst entry at the root) after replacing the root.
fn sift_down(h: &mut [(usize, f32)]) {
    let mut i = 0;
    loop {
        let (l, r) = (2 * i + 1, 2 * i + 2);
        let mut worst = i;
        if l < h.len() && ranks_before(h[worst], h[l]) {
            worst = l;
        }
        if r < h.len() && ranks_before(h[worst], h[r]) {
            worst = r;
        }
        if worst == i {
            break;
        }
        h.swap(i, worst);
        i = worst;
    }
}

/// Offers `(i, v)` to a full heap of the best entries seen so far.
#[inline]
fn offer(out: &mut [(usize, f32)], i: usize, v: f32) {
    if let Some(root) = out.first_mut() {
        if v > root.1 {
            *root = (i, v);
            sift_down(out);
        }
    }
}

/// Writes the `k` largest entries of `values` into `out` as `(index, value)`,
/// largest first, ties broken by lower index. `out` is cleared first. NaN is
/// never selected; `k = 0` gives nothing and `k > values.len()` gives every
/// non-NaN entry. Once `out` has capacity for `k.min(values.len())` entries
/// nothing is allocated, so reuse `out` across calls.
pub fn top_k(values: &[f32], k: usize, out: &mut Vec<(usize, f32)>) {
    out.clear();
    let k = k.min(values.len());
    if k == 0 {
        return;
    }
    out.reserve(k);
    let mut start = values.len();
    for (i, &v) in values.iter().enumerate() {
        if out.len() == k {
            start = i;
            break;
        }
        if !v.is_nan() {
            out.push((i, v));
            let last = out.len() - 1;
            sift_up(out, last);
        }
    }
    if out.len() == k {
        let rest = &values[start..];
        let mut vectors = rest.chunks_exact(LANES);
        let mut base = start;
        for c in &mut vectors {
            let threshold = out.first().map_or(f32::NEG_INFINITY, |e| e.1);
            if load(c).simd_gt(V::splat(threshold)).any() {
                for (j, &v) in c.iter().enumerate() {
                    offer(out, base + j, v);
                }
            }
            base += LANES;
        }
        for (j, &v) in vectors.remainder().iter().enumerate() {
            offer(out, base + j, v);
        }
    }
    out.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
}

/// Number of entries of `x` for which `hit` holds, counted in `V` lanes.
#[inline(always)]
fn count_lanes(x: &[f32], hit: impl Fn(V) -> V, scalar: impl Fn(f32) -> bool) -> usize {
    let mut acc = U::ZERO;
    let mut total = 0usize;
    for block in x.chunks(1 << 20) {
        let mut vectors = block.chunks_exact(LANES);
        for c in &mut vectors {
            // A true lane is all ones, i.e. -1 as a wrapping integer.
            acc -= hit(load(c)).to_bits();
        }
        total += vectors.remainder().iter().filter(|&&v| scalar(v)).count();
        total += acc.to_array().iter().map(|&c| c as usize).sum::<usize>();
        acc = U::ZERO;
    }
    total
}

fn count_greater(x: &[f32], t: f32) -> usize {
    if t.is_nan() {
        let n = count_lanes(x, |v| v.is_nan(), |v| v.is_nan());
        x.len() - n
    } else {
        let tv = V::splat(t);
        count_lanes(x, |v| v.simd_gt(tv), |v| v > t)
    }
}

/// Rank of `values[index]`: the number of entries strictly greater than it
/// (0 for the largest). NaN entries are never greater; a NaN target ranks
/// below every number, so its rank is the number of non-NaN entries. `None`
/// if `index` is out of range.
pub fn rank_of(values: &[f32], index: usize) -> Option<usize> {
    values.get(index).map(|&t| count_greater(values, t))
}

/// [`rank_of`] for several indices in one pass over `values` (read in
/// cache-sized tiles, every target counted per tile). `out[j]` receives the
/// rank of `values[indices[j]]`, or `usize::MAX` if that index is out of
/// range; entries of `out` beyond `indices.len()` are set to `usize::MAX`.
/// Indices beyond `out.len()` are ignored.
pub fn ranks_of(values: &[f32], indices: &[usize], out: &mut [usize]) {
    const TILE: usize = 4096;
    for (j, o) in out.iter_mut().enumerate() {
        *o = match indices.get(j) {
            Some(&i) if i < values.len() => 0,
            _ => usize::MAX,
        };
    }
    for tile in values.chunks(TILE) {
        for (o, &i) in out.iter_mut().zip(indices) {
            if let Some(&t) = values.get(i) {
                *o += count_greater(tile, t);
            }
        }
    }
}

/// Index of the first occurrence of the largest non-NaN value, or `None` if
/// `values` is empty or all NaN.
pub fn argmax(values: &[f32]) -> Option<usize> {
    let neg_inf = V::splat(f32::NEG_INFINITY);
    let mut acc = neg_inf;
    let mut vectors = values.chunks_exact(LANES);
    for c in &mut vectors {
        let v = load(c);
        acc = acc.fast_max(v.is_nan().select(neg_inf, v));
    }
    let mut best = lane_max(acc);
    for &v in vectors.remainder() {
        best = best.max(v);
    }
    let target = V::splat(best);
    let mut vectors = values.chunks_exact(LANES);
    let mut base = 0;
    for c in &mut vectors {
        if load(c).simd_eq(target).any() {
            return c.iter().position(|&v| v == best).map(|j| base + j);
        }
        base += LANES;
    }
    vectors
        .remainder()
        .iter()
        .position(|&v| v == best)
        .map(|j| base + j)
}

/// Largest value and whether any entry is NaN or `+Inf` (either makes a
/// softmax undefined).
fn max_checked(x: &[f32]) -> (f32, bool) {
    let mut acc = V::splat(f32::NEG_INFINITY);
    let mut bad = false;
    let pos_inf = V::splat(f32::INFINITY);
    let mut vectors = x.chunks_exact(LANES);
    for c in &mut vectors {
        let v = load(c);
        bad |= (v.is_nan() | v.simd_eq(pos_inf)).any();
        acc = acc.fast_max(v);
    }
    let mut m = lane_max(acc);
    for &v in vectors.remainder() {
        bad |= v.is_nan() || v == f32::INFINITY;
        m = m.max(v);
    }
    (m, bad)
}

/// Kullback–Leibler divergence `KL(softmax(p) ‖ softmax(q))` in nats, from
/// logits, using log-sum-exp shifts so that no exponential overflows. Does
/// not allocate.
///
/// The inputs should have equal lengths; otherwise the common prefix is
/// used. Empty inputs give `0.0`. `-Inf` logits are allowed (zero
/// probability); a NaN or `+Inf` logit, or a vector that is all `-Inf`, gives
/// NaN. If `q` gives zero probability where `p` does not, the result is
/// `+Inf`. Exponentials are evaluated in `f32` lanes, sums merged in `f64`:
/// the absolute error is about `1e-6` times the largest logit difference.
/// Identical inputs give exactly `0.0`.
pub fn log_softmax_kl(p_logits: &[f32], q_logits: &[f32]) -> f32 {
    let n = p_logits.len().min(q_logits.len());
    let (p, q) = (&p_logits[..n], &q_logits[..n]);
    if n == 0 {
        return 0.0;
    }
    let (mp, bad_p) = max_checked(p);
    let (mq, bad_q) = max_checked(q);
    if bad_p || bad_q || mp == f32::NEG_INFINITY || mq == f32::NEG_INFINITY {
        return f32::NAN;
    }
    let (vp, vq) = (V::splat(mp), V::splat(mq));
    let (mut sp, mut sq, mut st) = (0.0f64, 0.0f64, 0.0f64);
    for (pb, qb) in p.chunks(CHAIN_LEN).zip(q.chunks(CHAIN_LEN)) {
        let (mut ap, mut aq, mut at) = (V::ZERO, V::ZERO, V::ZERO);
        let mut pc = pb.chunks_exact(LANES);
        let mut qc = qb.chunks_exact(LANES);
        for (a, b) in (&mut pc).zip(&mut qc) {
            let a = load(a) - vp;
            let b = load(b) - vq;
            let ea = a.exp();
            ap += ea;
            aq += b.exp();
            at += ea.simd_gt(V::ZERO).select(ea * (a - b), V::ZERO);
        }
        sp += widen_sum(ap);
        sq += widen_sum(aq);
        st += widen_sum(at);
        for (&a, &b) in pc.remainder().iter().zip(qc.remainder()) {
            let a = (a - mp) as f64;
            let b = (b - mq) as f64;
            let ea = a.exp();
            sp += ea;
            sq += b.exp();
            if ea > 0.0 {
                st += ea * (a - b);
            }
        }
    }
    let kl = st / sp - sp.ln() + sq.ln();
    kl.max(0.0) as f32
}

#[cfg(test)]
mod tests {
    use super::*;
    use wide::f32x8;

    fn close(a: f32, b: f64, rel: f64) -> bool {
        ((a as f64) - b).abs() <= rel * b.abs().max(1e-30)
    }

    #[test]
    fn test_f250_tensor_stats_correctness() {
        let s = TensorStats::from_slice(&[1.0, 2.0, 3.0, 4.0, 5.0]);
        assert_eq!(s.count, 5);
        assert_eq!(s.min, 1.0);
        assert_eq!(s.max, 5.0);
        assert_eq!(s.mean, 3.0);
        assert!(close(s.std, 2.5f64.sqrt(), 1e-6), "std {}", s.std);
        assert!(close(s.l2_norm, 55f64.sqrt(), 1e-6), "l2 {}", s.l2_norm);
        assert!((s.std - 1.5811).abs() < 1e-4);
        assert!((s.l2_norm - 7.4162).abs() < 1e-4);
        assert_eq!(s.nan_count, 0);
        assert_eq!(s.inf_count, 0);
        assert!(!s.has_anomaly());
        assert_eq!(s.anomaly_description(), None);
    }

    #[test]
    fn test_f251_nan_detection_full_recall() {
        let lengths: Vec<usize> = (1..=70).chain([576, 1025, 4100]).collect();
        for n in lengths {
            let base: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            for pos in 0..n {
                let mut v = base.clone();
                v[pos] = f32::NAN;
                let s = TensorStats::from_slice(&v);
                let mut rest = base.clone();
                rest.remove(pos);
                let r = TensorStats::from_slice(&rest);
                assert_eq!((s.min, s.max), (r.min, r.max), "n={n} pos={pos}");
                assert!(
                    (s.mean - r.mean).abs() <= 1e-6 * (r.mean.abs() + r.std),
                    "n={n} pos={pos}"
                );
                assert!((s.std - r.std).abs() <= 1e-6 * r.std, "n={n} pos={pos}");
                assert_eq!(s.nan_count, 1, "n={n} pos={pos}");
                assert_eq!(s.inf_count, 0, "n={n} pos={pos}");
                assert_eq!(s.finite_count(), n - 1);
                assert!(s.has_nan() && s.has_anomaly(), "n={n} pos={pos}");
                let d = s.anomaly_description().unwrap_or_default();
                assert!(d.contains("NaN"), "n={n} pos={pos}: {d}");
                assert!(s.mean.is_finite() && s.std.is_finite() && s.l2_norm.is_finite());
            }
        }
    }

    #[test]
    fn test_f252_explosion_detection() {
        let mut v = vec![0.5f32; 576];
        v[100] = 1e7;
        let s = TensorStats::from_slice(&v);
        assert!(s.is_exploding() && s.has_anomaly());
        let d = s.anomaly_description().unwrap_or_default();
        assert!(d.contains("explosion: max |x| = 1.0e7"), "{d}");

        // A tensor at exactly the threshold (small spread, so std stays low).
        let mut edge: Vec<f32> = (0..576)
            .map(|i| if i % 2 == 0 { 1e6 } else { 999_990.0 })
            .collect();
        let s = TensorStats::from_slice(&edge);
        assert_eq!(s.max, 1e6);
        assert!(s.std < EXPLOSION_STD);
        assert!(!s.is_exploding(), "exactly 1e6 is not an explosion");
        assert!(!s.has_anomaly());
        edge[0] = f32::from_bits(1e6f32.to_bits() + 1);
        assert!(
            TensorStats::from_slice(&edge).is_exploding(),
            "one ulp above 1e6"
        );

        v[100] = -1.5e6;
        assert!(TensorStats::from_slice(&v).is_exploding());

        // Spread of ±5e5 keeps |x| below the absolute threshold but std above 1e4.
        let w: Vec<f32> = (0..576)
            .map(|i| if i % 2 == 0 { 5e5 } else { -5e5 })
            .collect();
        let s = TensorStats::from_slice(&w);
        assert!(s.max_abs() <= EXPLOSION_ABS && s.std > EXPLOSION_STD);
        assert!(s.is_exploding());
        let d = s.anomaly_description().unwrap_or_default();
        assert!(d.contains("explosion: std"), "{d}");

        let calm: Vec<f32> = (0..576).map(|i| (i % 7) as f32 * 1e3).collect();
        assert!(!TensorStats::from_slice(&calm).is_exploding());
    }

    #[test]
    fn inf_is_counted_and_described() {
        let mut v = vec![1.0f32; 40];
        v[0] = f32::INFINITY;
        v[39] = f32::NEG_INFINITY;
        let s = TensorStats::from_slice(&v);
        assert_eq!((s.inf_count, s.nan_count, s.finite_count()), (2, 0, 38));
        assert_eq!((s.min, s.max, s.mean, s.std), (1.0, 1.0, 1.0, 0.0));
        let d = s.anomaly_description().unwrap_or_default();
        assert!(d.starts_with("Inf: 2 of 40 values"), "{d}");
    }

    #[test]
    fn no_finite_value_gives_zero_moments() {
        for v in [vec![], vec![f32::NAN; 9], vec![f32::INFINITY, f32::NAN]] {
            let s = TensorStats::from_slice(&v);
            assert_eq!(s.count, v.len());
            assert_eq!(
                (s.min, s.max, s.mean, s.std, s.l2_norm),
                (0.0, 0.0, 0.0, 0.0, 0.0)
            );
            assert!(!s.is_vanishing());
        }
    }

    #[test]
    fn vanishing_needs_two_finite_values() {
        assert!(!TensorStats::from_slice(&[3.0]).is_vanishing());
        assert!(TensorStats::from_slice(&[3.0, 3.0]).is_vanishing());
        assert!(!TensorStats::from_slice(&[3.0, 3.1]).is_vanishing());
        assert!(!TensorStats::from_slice(&[3.0, 3.0]).has_anomaly());
    }

    #[test]
    fn merge_handles_empty_sides() {
        let a = TensorStats::from_slice(&[f32::NAN, f32::NAN]);
        let b = TensorStats::from_slice(&[-2.0, 4.0]);
        let m = a.merge(&b);
        assert_eq!(
            (m.count, m.nan_count, m.min, m.max, m.mean),
            (4, 2, -2.0, 4.0, 1.0)
        );
        assert_eq!(b.merge(&a), m);
    }

    /// wide's `fast_min`/`fast_max` follow the target's instruction: on x86
    /// `minps`/`maxps` return the second operand when either is NaN, so the
    /// result depends on operand order. The kernel therefore never feeds NaN
    /// to them; this records the behaviour that makes that necessary.
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    #[test]
    fn wide_fast_min_max_are_not_nan_symmetric() {
        let nan = f32x8::splat(f32::NAN);
        let one = f32x8::ONE;
        assert!(one.fast_max(nan).to_array()[0].is_nan());
        assert_eq!(nan.fast_max(one).to_array()[0], 1.0);
        assert!(one.fast_min(nan).to_array()[0].is_nan());
        assert_eq!(nan.fast_min(one).to_array()[0], 1.0);
        // The NaN-aware variants ignore a NaN on either side on x86.
        assert_eq!(one.max(nan).to_array()[0], 1.0);
        assert_eq!(nan.max(one).to_array()[0], 1.0);
    }

    #[test]
    fn shift_policy_handles_offset_and_drift() {
        // Offset data forces a retry in the first block and a shifted kernel
        // afterwards; drifting data forces retries when the shift goes stale.
        let v: Vec<f32> = (0..5000)
            .map(|i| 1e4 + (i as f32 * 0.7).sin() + (i / 1024) as f32 * 50.0)
            .collect();
        let s = TensorStats::from_slice(&v);
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / (n - 1.0);
        assert!(close(s.mean, mean, 1e-6), "{} vs {mean}", s.mean);
        assert!(
            close(s.std, var.sqrt(), 1e-5),
            "{} vs {}",
            s.std,
            var.sqrt()
        );
    }

    fn f64_mean_std(v: &[f32]) -> (f64, f64) {
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        let m2: f64 = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum();
        (mean, (m2 / (n - 1.0)).sqrt())
    }

    #[test]
    fn cancelling_block_is_retried_with_its_mean() {
        // The first elements are near zero, so the pilot picks no shift, but
        // the block as a whole sits far from zero relative to its spread.
        let mut v: Vec<f32> = (0..BLOCK_LEN)
            .map(|i| 1e4 + (i as f32 * 0.3).sin())
            .collect();
        for (i, x) in v.iter_mut().take(PILOT_LEN).enumerate() {
            *x = if i % 2 == 0 { 0.25 } else { -0.25 };
        }
        assert_eq!(pilot_shift(&v), 0.0);
        let raw = scan_block::<false, false>(&v, 0.0);
        assert!(matches!(judge(&raw, 0.0), Verdict::Retry(_)));
        let s = TensorStats::from_slice(&v);
        let (mean, std) = f64_mean_std(&v);
        assert!(close(s.mean, mean, 1e-6), "{} vs {mean}", s.mean);
        assert!(close(s.std, std, 1e-5), "{} vs {std}", s.std);
    }

    #[test]
    fn pilot_shift_follows_the_first_elements() {
        assert_eq!(pilot_shift(&[]), 0.0);
        assert_eq!(pilot_shift(&[0.5, -0.5, 1.0, -2.0]), 0.0);
        assert_eq!(pilot_shift(&[100.0, 101.0, 99.0]), 100.0);
        assert_eq!(pilot_shift(&[7.0; 20]), 7.0);
        assert_eq!(pilot_shift(&[100.0, f32::NAN, 99.0]), 0.0);
        assert_eq!(pilot_shift(&[f32::MAX, -f32::MAX]), 0.0);
    }

    #[test]
    fn tiny_and_huge_blocks_fall_back_to_f64() {
        let tiny: Vec<f32> = (1..100).map(|i| f32::from_bits(i * 3)).collect();
        let raw = scan_block::<false, false>(&tiny, 0.0);
        assert!(matches!(judge(&raw, 0.0), Verdict::Fallback));
        let huge: Vec<f32> = (0..100).map(|i| 1e30 * (1 + i % 3) as f32).collect();
        assert!(!scan_block::<false, false>(&huge, 0.0).sq.is_finite());
        assert!(!scan_block::<false, true>(&huge, 0.0).sq.is_finite());
        for v in [&tiny, &huge] {
            let s = TensorStats::from_slice(v);
            let (mean, std) = f64_mean_std(v);
            assert!(
                close(s.mean, mean, 1e-6) && close(s.std, std, 1e-6),
                "{s:?}"
            );
        }
    }

    #[test]
    fn masked_scan_counts_and_excludes() {
        let mut v: Vec<f32> = (0..100).map(|i| i as f32).collect();
        v[3] = f32::NAN;
        v[50] = f32::INFINITY;
        v[99] = f32::NEG_INFINITY;
        let raw = scan_block::<false, true>(&v, 0.0);
        assert_eq!((raw.finite, raw.nan), (97, 1));
        assert_eq!((raw.min, raw.max), (0.0, 98.0));
        let want: f64 = (0..99)
            .filter(|&i| i != 3 && i != 50)
            .map(|i| i as f64)
            .sum();
        assert_eq!(raw.sum, want);
    }

    #[test]
    fn error_metrics_basics() {
        let r = [1.0f32, -2.0, 3.0];
        let q = [1.5f32, -2.0, 2.0];
        let m = error_metrics(&q, &r);
        assert!((m.mse - (0.25 + 1.0) / 3.0).abs() < 1e-7);
        assert_eq!(m.max_abs_error, 1.0);
        let snr = 10.0 * (14.0f64 / 1.25).log10();
        assert!(close(m.snr_db, snr, 1e-6));
    }

    #[test]
    fn top_k_small() {
        let mut out = Vec::new();
        top_k(&[1.0, 5.0, f32::NAN, 5.0, 3.0], 2, &mut out);
        assert_eq!(out, vec![(1, 5.0), (3, 5.0)]);
    }

    #[test]
    fn rank_and_argmax_small() {
        let v = [0.5f32, f32::NAN, 2.0, 0.5];
        assert_eq!(rank_of(&v, 0), Some(1));
        assert_eq!(rank_of(&v, 1), Some(3));
        assert_eq!(rank_of(&v, 2), Some(0));
        assert_eq!(rank_of(&v, 4), None);
        assert_eq!(argmax(&v), Some(2));
        assert_eq!(argmax(&[f32::NAN]), None);
    }
}
