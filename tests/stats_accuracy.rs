//! Accuracy of `model_tracer::stats` against references computed here in
//! `f64` (two passes), on adversarial and random data.

use model_tracer::stats::{
    argmax, entropy, error_metrics, l2_norm, log_softmax_kl, rank_of, ranks_of, top_k,
    StatsAccumulator, TensorStats, BLOCK_LEN,
};
use model_tracer_test_support::SplitMix64;
use proptest::prelude::*;

/// Relative tolerance of mean (relative to |mean| + std), std and L2.
const TOL: f64 = 1e-5;

/// Two-pass `f64` statistics of the finite elements.
#[derive(Debug)]
struct Reference {
    count: usize,
    finite: usize,
    nan: usize,
    inf: usize,
    min: f32,
    max: f32,
    mean: f64,
    std: f64,
    l2: f64,
}

fn reference(data: &[f32]) -> Reference {
    let finite: Vec<f64> = data
        .iter()
        .filter(|x| x.is_finite())
        .map(|&x| x as f64)
        .collect();
    let n = finite.len();
    let nan = data.iter().filter(|x| x.is_nan()).count();
    let inf = data.iter().filter(|x| x.is_infinite()).count();
    if n == 0 {
        return Reference {
            count: data.len(),
            finite: 0,
            nan,
            inf,
            min: 0.0,
            max: 0.0,
            mean: 0.0,
            std: 0.0,
            l2: 0.0,
        };
    }
    let mean = finite.iter().sum::<f64>() / n as f64;
    let m2: f64 = finite.iter().map(|x| (x - mean) * (x - mean)).sum();
    let std = if n >= 2 {
        (m2 / (n - 1) as f64).sqrt()
    } else {
        0.0
    };
    let l2 = finite.iter().map(|x| x * x).sum::<f64>().sqrt();
    let min = data
        .iter()
        .filter(|x| x.is_finite())
        .fold(f32::INFINITY, |a, &b| a.min(b));
    let max = data
        .iter()
        .filter(|x| x.is_finite())
        .fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    Reference {
        count: data.len(),
        finite: n,
        nan,
        inf,
        min,
        max,
        mean,
        std,
        l2,
    }
}

/// `|got - want| ≤ TOL·scale`, where the result is compared as stored: an
/// `f32` that overflows must be infinite, and one in the subnormal range may
/// be off by the subnormal spacing.
fn agrees(got: f32, want: f64, scale: f64) -> bool {
    let want32 = want as f32;
    if want32.is_infinite() {
        return got == want32;
    }
    let subnormal_step = f32::from_bits(1) as f64;
    ((got as f64) - want).abs() <= TOL * scale + subnormal_step
}

fn check(data: &[f32], label: &str) -> TensorStats {
    let s = TensorStats::from_slice(data);
    let r = reference(data);
    let ctx = || format!("{label}: got {s:?}, want {r:?}");
    assert_eq!(s.count, r.count, "count {}", ctx());
    assert_eq!(s.nan_count, r.nan, "nan {}", ctx());
    assert_eq!(s.inf_count, r.inf, "inf {}", ctx());
    assert_eq!(s.finite_count(), r.finite, "finite {}", ctx());
    assert_eq!(s.min, r.min, "min {}", ctx());
    assert_eq!(s.max, r.max, "max {}", ctx());
    assert!(
        agrees(s.mean, r.mean, r.mean.abs() + r.std),
        "mean {}",
        ctx()
    );
    assert!(agrees(s.std, r.std, r.std), "std {}", ctx());
    assert!(agrees(s.l2_norm, r.l2, r.l2), "l2 {}", ctx());
    s
}

#[test]
fn every_length_up_to_70_normal_and_offset() {
    let mut rng = SplitMix64::new(1);
    for n in 0..=70 {
        check(&rng.normals(n, 0.0, 1.0), &format!("N(0,1) n={n}"));
        check(&rng.normals(n, 1e4, 1.0), &format!("1e4+N(0,1) n={n}"));
        check(&rng.normals(n, -3.0, 0.01), &format!("-3+N(0,0.01) n={n}"));
    }
}

#[test]
fn one_million_elements() {
    let mut rng = SplitMix64::new(2);
    check(&rng.normals(1_000_000, 1e4, 1.0), "1e4+N(0,1) n=1e6");
    check(&rng.normals(1_000_000, 0.0, 1.0), "N(0,1) n=1e6");
}

#[test]
fn lengths_around_block_and_vector_boundaries() {
    let mut rng = SplitMix64::new(3);
    for base in [BLOCK_LEN, 2 * BLOCK_LEN, 512, 1024] {
        for n in base.saturating_sub(9)..=base + 9 {
            check(&rng.normals(n, 2.0, 3.0), &format!("n={n}"));
        }
    }
}

#[test]
fn all_equal_values_have_zero_std() {
    for &c in &[0.0f32, 1.0, 0.1, -7.25, 1e4, 3.3e38, -3.4e38, 1e-42, 1e-30] {
        for n in [1usize, 2, 3, 7, 8, 33, 576, 4096, 5000] {
            let v = vec![c; n];
            let s = check(&v, &format!("const {c} n={n}"));
            assert_eq!(s.std, 0.0, "const {c} n={n}");
            assert_eq!(s.mean, c, "const {c} n={n}");
            assert_eq!(s.is_vanishing(), n >= 2, "const {c} n={n}");
        }
    }
}

#[test]
fn alternating_plus_minus_1e30() {
    for n in [2usize, 3, 9, 64, 577, 4097, 10_000] {
        let v: Vec<f32> = (0..n)
            .map(|i| if i % 2 == 0 { 1e30 } else { -1e30 })
            .collect();
        let s = check(&v, &format!("±1e30 n={n}"));
        assert!(s.is_exploding());
    }
}

#[test]
fn denormals() {
    let mut rng = SplitMix64::new(4);
    let tiny = f32::MIN_POSITIVE as f64;
    for n in [1usize, 5, 64, 1000, 5000] {
        let v: Vec<f32> = (0..n)
            .map(|_| (rng.uniform() * 2.0 - 1.0) * tiny) // all subnormal
            .map(|x| x as f32)
            .collect();
        assert!(v.iter().all(|x| !x.is_normal()));
        check(&v, &format!("denormal n={n}"));
        // Denormals mixed into ordinary values.
        let mut w = rng.normals(n, 0.0, 1e-3);
        for (i, x) in w.iter_mut().enumerate() {
            if i % 3 == 0 {
                *x = f32::from_bits(1 + i as u32);
            }
        }
        check(&w, &format!("mixed denormal n={n}"));
    }
}

#[test]
fn huge_values_mixed_with_small_ones() {
    let mut rng = SplitMix64::new(5);
    for n in [3usize, 40, 700, 5000] {
        let mut v = rng.normals(n, 0.0, 1.0);
        v[n / 3] = 1e38;
        v[n - 1] = -1e38;
        check(&v, &format!("1e38 mixed n={n}"));
        let mut w = rng.normals(n, 0.0, 1e-3);
        w[0] = f32::MAX;
        check(&w, &format!("f32::MAX mixed n={n}"));
        // Squares overflow f32 everywhere; results still fit.
        let big: Vec<f32> = (0..n).map(|i| 1e37 * (1.0 + (i % 5) as f32)).collect();
        check(&big, &format!("all ~1e37 n={n}"));
    }
    // An L2 norm that does not fit in f32 is +Inf, the rest stays exact.
    let s = check(&[f32::MAX, f32::MAX, f32::MAX], "three f32::MAX");
    assert_eq!(s.l2_norm, f32::INFINITY);
    assert_eq!(s.mean, f32::MAX);
    assert_eq!(s.std, 0.0);
}

#[test]
fn non_finite_at_first_last_and_tail_positions() {
    let mut rng = SplitMix64::new(6);
    let specials = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY];
    let lengths: Vec<usize> = (1..=70).chain([576, 4095, 4096, 4097, 9001]).collect();
    for n in lengths {
        let base = rng.normals(n, 5.0, 2.0);
        let tail_start = n - n % 8;
        let mut positions = vec![0, n - 1];
        positions.extend(tail_start..n);
        positions.extend(n.saturating_sub(9)..n);
        for &p in &positions {
            for &sp in &specials {
                let mut v = base.clone();
                v[p] = sp;
                let s = check(&v, &format!("{sp} at {p} of {n}"));
                assert!(s.has_anomaly(), "{sp} at {p} of {n}");
            }
        }
        // All three kinds at once, at the first, last and a tail position.
        let mut v = base.clone();
        v[0] = f32::NAN;
        v[n - 1] = f32::INFINITY;
        v[tail_start.min(n - 1)] = f32::NEG_INFINITY;
        check(&v, &format!("mixed specials n={n}"));
    }
    // Nothing finite at all.
    let s = check(&[f32::NAN, f32::INFINITY, f32::NEG_INFINITY], "no finite");
    assert_eq!(
        (s.mean, s.std, s.l2_norm, s.min, s.max),
        (0.0, 0.0, 0.0, 0.0, 0.0)
    );
}

#[test]
fn nan_everywhere_in_a_long_tensor_is_counted() {
    let mut rng = SplitMix64::new(7);
    let mut v = rng.normals(20_000, 0.0, 1.0);
    for i in (0..v.len()).step_by(7) {
        v[i] = f32::NAN;
    }
    let s = check(&v, "every 7th NaN");
    assert_eq!(s.nan_count, 20_000_usize.div_ceil(7));
}

#[test]
fn drifting_data_keeps_its_accuracy() {
    // The mean moves by far more than the spread from block to block.
    let mut rng = SplitMix64::new(8);
    let v: Vec<f32> = (0..50_000)
        .map(|i| (i as f64 * 0.5 + rng.normal()) as f32)
        .collect();
    check(&v, "linear drift");
    let w: Vec<f32> = (0..50_000)
        .map(|i| if i < 25_000 { 1e6 + rng.normal() } else { rng.normal() } as f32)
        .collect();
    check(&w, "step");
}

#[test]
fn merge_and_accumulator_match_one_pass() {
    let mut rng = SplitMix64::new(9);
    let data = rng.normals(10_000, 3.0, 2.0);
    let whole = TensorStats::from_slice(&data);
    for cut in [0usize, 1, 7, 576, 4096, 9999, 10_000] {
        let (a, b) = data.split_at(cut);
        let m = TensorStats::from_slice(a).merge(&TensorStats::from_slice(b));
        assert_stats_close(&m, &whole, &format!("merge at {cut}"));
    }
    let mut acc = StatsAccumulator::new();
    let mut start = 0;
    let mut step = 1;
    while start < data.len() {
        let end = (start + step).min(data.len());
        acc.push(&data[start..end]);
        start = end;
        step = step * 3 + 1;
    }
    assert_stats_close(&acc.finish(), &whole, "accumulator");
    let mut acc2 = StatsAccumulator::new();
    acc2.push(&data[..3000]);
    acc2.push_stats(&TensorStats::from_slice(&data[3000..]));
    assert_stats_close(&acc2.finish(), &whole, "push_stats");
    acc2.clear();
    assert_eq!(acc2.finish(), TensorStats::default());
}

fn assert_stats_close(a: &TensorStats, b: &TensorStats, label: &str) {
    assert_eq!(
        (a.count, a.nan_count, a.inf_count, a.min, a.max),
        (b.count, b.nan_count, b.inf_count, b.min, b.max),
        "{label}"
    );
    let close = |x: f32, y: f32, scale: f32| ((x - y).abs() as f64) <= TOL * scale as f64;
    assert!(
        close(a.mean, b.mean, b.mean.abs() + b.std),
        "{label}: {a:?} {b:?}"
    );
    assert!(close(a.std, b.std, b.std), "{label}: {a:?} {b:?}");
    assert!(
        close(a.l2_norm, b.l2_norm, b.l2_norm),
        "{label}: {a:?} {b:?}"
    );
}

/// Any `f32` bit pattern, NaN and infinities included.
fn any_f32() -> impl Strategy<Value = f32> {
    prop_oneof![
        4 => -1e3f32..1e3f32,
        1 => any::<u32>().prop_map(f32::from_bits),
        1 => Just(f32::NAN),
        1 => Just(f32::INFINITY),
        1 => Just(f32::NEG_INFINITY),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn prop_finite_data_matches_reference(
        v in prop::collection::vec(prop::num::f32::NORMAL | prop::num::f32::SUBNORMAL | prop::num::f32::ZERO, 0..2000)
    ) {
        check(&v, "prop finite");
    }

    #[test]
    fn prop_offset_normal_data_matches_reference(
        seed in any::<u64>(), n in 0usize..6000, offset in -1e6f64..1e6, scale in 1e-3f64..1e3
    ) {
        let v = SplitMix64::new(seed).normals(n, offset, scale);
        check(&v, "prop offset normal");
    }

    #[test]
    fn prop_any_data_matches_reference(v in prop::collection::vec(any_f32(), 0..600)) {
        check(&v, "prop any");
    }

    #[test]
    fn prop_merge_matches_one_pass(
        v in prop::collection::vec(-1e4f32..1e4f32, 0..3000), cut in 0usize..3000
    ) {
        let cut = cut.min(v.len());
        let whole = TensorStats::from_slice(&v);
        let (a, b) = v.split_at(cut);
        let m = TensorStats::from_slice(a).merge(&TensorStats::from_slice(b));
        assert_stats_close(&m, &whole, "prop merge");
        let mut acc = StatsAccumulator::new();
        acc.push(a);
        acc.push(b);
        assert_stats_close(&acc.finish(), &whole, "prop accumulator");
    }

    #[test]
    fn prop_top_k_matches_sort(
        v in prop::collection::vec(prop_oneof![8 => (-20i32..20).prop_map(|x| x as f32), 1 => Just(f32::NAN)], 0..300),
        k in 0usize..320
    ) {
        let mut out = Vec::new();
        top_k(&v, k, &mut out);
        let mut want: Vec<(usize, f32)> = v.iter().copied().enumerate().filter(|(_, x)| !x.is_nan()).collect();
        want.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap_or(std::cmp::Ordering::Equal).then(a.0.cmp(&b.0)));
        want.truncate(k);
        prop_assert_eq!(out, want);
    }

    #[test]
    fn prop_ranks_match_naive(
        v in prop::collection::vec(prop_oneof![8 => (-50i32..50).prop_map(|x| x as f32 * 0.5), 1 => Just(f32::NAN)], 1..5000),
        idx in prop::collection::vec(0usize..5100, 0..6)
    ) {
        let naive = |i: usize| -> Option<usize> {
            let t = *v.get(i)?;
            Some(if t.is_nan() {
                v.iter().filter(|x| !x.is_nan()).count()
            } else {
                v.iter().filter(|&&x| x > t).count()
            })
        };
        let mut out = vec![0usize; idx.len()];
        ranks_of(&v, &idx, &mut out);
        for (j, &i) in idx.iter().enumerate() {
            prop_assert_eq!(rank_of(&v, i), naive(i));
            prop_assert_eq!(out[j], naive(i).unwrap_or(usize::MAX));
        }
    }

    #[test]
    fn prop_argmax_matches_naive(
        v in prop::collection::vec(prop_oneof![8 => (-30i32..30).prop_map(|x| x as f32), 1 => Just(f32::NAN), 1 => Just(f32::NEG_INFINITY)], 0..200)
    ) {
        let mut want: Option<usize> = None;
        for (i, &x) in v.iter().enumerate() {
            if x.is_nan() { continue; }
            match want {
                Some(j) if v[j] >= x => {}
                _ => want = Some(i),
            }
        }
        prop_assert_eq!(argmax(&v), want);
    }
}

#[test]
fn error_metrics_identical_and_negated() {
    let mut rng = SplitMix64::new(10);
    let r = rng.normals(3000, 0.5, 2.0);
    let m = error_metrics(&r, &r);
    assert_eq!(m.mse, 0.0);
    assert_eq!(m.max_abs_error, 0.0);
    assert_eq!(m.cosine_similarity, 1.0);
    assert_eq!(m.snr_db, f32::INFINITY);

    let neg: Vec<f32> = r.iter().map(|x| -x).collect();
    let m = error_metrics(&neg, &r);
    assert!((m.cosine_similarity + 1.0).abs() < 1e-6, "{m:?}");
    // Noise is 2r, so SNR = 10·log10(1/4).
    assert!(
        (m.snr_db as f64 - 10.0 * 0.25f64.log10()).abs() < 1e-4,
        "{m:?}"
    );
}

#[test]
fn error_metrics_match_f64_reference() {
    let mut rng = SplitMix64::new(11);
    for n in [1usize, 7, 8, 9, 1000, 4099] {
        let r = rng.normals(n, 0.0, 1.0);
        let q: Vec<f32> = r.iter().map(|x| x + (rng.normal() * 0.01) as f32).collect();
        let m = error_metrics(&q, &r);
        let (mut dd, mut qr, mut qq, mut rr, mut md) = (0.0f64, 0.0, 0.0, 0.0, 0.0f64);
        for (&a, &b) in q.iter().zip(&r) {
            let (a, b) = (a as f64, b as f64);
            dd += (a - b) * (a - b);
            qr += a * b;
            qq += a * a;
            rr += b * b;
            md = md.max((a - b).abs());
        }
        let rel = |got: f32, want: f64| ((got as f64 - want) / want).abs();
        assert!(rel(m.mse, dd / n as f64) < 1e-5, "n={n} {m:?}");
        assert!(rel(m.max_abs_error, md) < 1e-6, "n={n} {m:?}");
        assert!(
            rel(m.cosine_similarity, qr / (qq * rr).sqrt()) < 1e-6,
            "n={n} {m:?}"
        );
        assert!(
            (m.snr_db as f64 - 10.0 * (rr / dd).log10()).abs() < 1e-4,
            "n={n} {m:?}"
        );
    }
}

#[test]
fn error_metrics_defined_edge_cases() {
    let e = error_metrics(&[], &[]);
    assert_eq!(
        (e.mse, e.max_abs_error, e.cosine_similarity),
        (0.0, 0.0, 1.0)
    );
    assert_eq!(e.snr_db, f32::INFINITY);

    let zeros = vec![0.0f32; 100];
    let ones = vec![1.0f32; 100];
    let both = error_metrics(&zeros, &zeros);
    assert_eq!(
        (both.cosine_similarity, both.mse, both.snr_db),
        (1.0, 0.0, f32::INFINITY)
    );
    assert_eq!(error_metrics(&zeros, &ones).cosine_similarity, 0.0);
    assert_eq!(error_metrics(&ones, &zeros).cosine_similarity, 0.0);
    assert_eq!(error_metrics(&ones, &zeros).snr_db, f32::NEG_INFINITY);

    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        for pos in [0usize, 50, 99] {
            let mut q = ones.clone();
            q[pos] = bad;
            for m in [error_metrics(&q, &ones), error_metrics(&ones, &q)] {
                assert!(
                    m.mse.is_nan() && m.max_abs_error.is_nan(),
                    "{bad} at {pos}: {m:?}"
                );
                assert!(
                    m.cosine_similarity.is_nan() && m.snr_db.is_nan(),
                    "{bad} at {pos}: {m:?}"
                );
            }
        }
    }

    // Unequal lengths compare the common prefix.
    let m = error_metrics(&[1.0, 2.0, 3.0], &[1.0, 2.0]);
    assert_eq!((m.mse, m.cosine_similarity), (0.0, 1.0));

    // Tiny and huge values neither underflow nor overflow.
    let tiny = vec![1e-30f32; 64];
    let tiny2 = vec![2e-30f32; 64];
    let m = error_metrics(&tiny, &tiny2);
    assert!((m.cosine_similarity - 1.0).abs() < 1e-6, "{m:?}");
    // Noise 1e-30 against a reference of 2e-30: SNR = 10·log10(4).
    assert!(
        (m.snr_db as f64 - 10.0 * 4f64.log10()).abs() < 1e-4,
        "{m:?}"
    );
    assert!((m.max_abs_error - 1e-30).abs() < 1e-36, "{m:?}");
    let huge = vec![1e30f32; 64];
    let m = error_metrics(&huge, &huge);
    assert_eq!((m.mse, m.cosine_similarity), (0.0, 1.0));
}

#[test]
fn l2_norm_plain() {
    let mut rng = SplitMix64::new(12);
    let v = rng.normals(5000, 1.0, 1.0);
    let want = v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    assert!(((l2_norm(&v) as f64 - want) / want).abs() < 1e-6);
    assert_eq!(l2_norm(&[]), 0.0);
    assert_eq!(l2_norm(&[3.0, 4.0]), 5.0);
    assert!(l2_norm(&[1.0, f32::NAN, 2.0]).is_nan());
    assert_eq!(l2_norm(&[1.0, f32::NEG_INFINITY]), f32::INFINITY);
    assert_eq!(l2_norm(&[3e30, 4e30]), 5e30);
    assert!((l2_norm(&[3e-30, 4e-30]) - 5e-30).abs() < 1e-36);
}

#[test]
fn entropy_known_values() {
    for n in [1usize, 2, 3, 7, 8, 100, 49152] {
        let p = vec![1.0 / n as f32; n];
        let h = entropy(&p) as f64;
        assert!(
            (h - (n as f64).ln()).abs() < 1e-5 * (n as f64).ln().max(1.0),
            "n={n}: {h}"
        );
    }
    let mut onehot = vec![0.0f32; 49152];
    onehot[1234] = 1.0;
    assert_eq!(entropy(&onehot), 0.0);
    // Non-finite and non-positive entries contribute nothing.
    let h = entropy(&[0.5, 0.5, 0.0, -0.1, f32::NAN, f32::INFINITY, 0.0, 0.0, 0.0]);
    assert!((h as f64 - 2f64.ln()).abs() < 1e-6, "{h}");
    assert_eq!(entropy(&[]), 0.0);
    // Subnormal probabilities are handled in f64 rather than dropped as -Inf.
    let h = entropy(&[1e-40; 16]);
    assert!(h > 0.0 && h.is_finite(), "{h}");
}

#[test]
fn top_k_edges_and_buffer_reuse() {
    let v = [3.0f32, f32::NAN, 7.0, 7.0, -1.0, 7.0, 0.0];
    let mut out = Vec::new();
    top_k(&v, 0, &mut out);
    assert!(out.is_empty());
    top_k(&v, 2, &mut out);
    assert_eq!(out, vec![(2, 7.0), (3, 7.0)]);
    top_k(&v, 100, &mut out);
    assert_eq!(
        out,
        vec![(2, 7.0), (3, 7.0), (5, 7.0), (0, 3.0), (6, 0.0), (4, -1.0)]
    );
    top_k(&[f32::NAN; 5], 3, &mut out);
    assert!(out.is_empty());

    let mut rng = SplitMix64::new(13);
    let logits = rng.normals(49152, 0.0, 3.0);
    let mut buf = Vec::new();
    top_k(&logits, 10, &mut buf);
    let (ptr, cap) = (buf.as_ptr(), buf.capacity());
    for _ in 0..5 {
        top_k(&logits, 10, &mut buf);
        assert_eq!((buf.as_ptr(), buf.capacity()), (ptr, cap), "reallocated");
    }
    let best = argmax(&logits).unwrap_or(usize::MAX);
    assert_eq!(buf[0].0, best);
    assert!(buf.windows(2).all(|w| w[0].1 >= w[1].1));
}

#[test]
fn ranks_over_a_vocabulary() {
    let mut rng = SplitMix64::new(14);
    let mut logits = rng.normals(49152, 0.0, 2.0);
    logits[77] = f32::NAN;
    let targets = [0usize, 77, 49151, 1234, 49152, 40000];
    let mut out = vec![0usize; targets.len()];
    ranks_of(&logits, &targets, &mut out);
    for (j, &t) in targets.iter().enumerate() {
        let want = match logits.get(t) {
            None => usize::MAX,
            Some(x) if x.is_nan() => 49151,
            Some(&x) => logits.iter().filter(|&&y| y > x).count(),
        };
        assert_eq!(out[j], want, "target {t}");
        assert_eq!(rank_of(&logits, t), logits.get(t).map(|_| want));
    }
    let best = argmax(&logits).unwrap_or(usize::MAX);
    assert_eq!(rank_of(&logits, best), Some(0));
    // Extra output slots get the out-of-range marker.
    let mut wide_out = vec![5usize; 3];
    ranks_of(&logits, &[best], &mut wide_out);
    assert_eq!(wide_out, vec![0, usize::MAX, usize::MAX]);
}

#[test]
fn argmax_edges() {
    assert_eq!(argmax(&[]), None);
    assert_eq!(argmax(&[f32::NAN; 20]), None);
    assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NAN]), Some(0));
    let mut v = vec![1.0f32; 37];
    v[20] = 2.0;
    v[30] = 2.0;
    assert_eq!(argmax(&v), Some(20));
    v[36] = f32::INFINITY;
    assert_eq!(argmax(&v), Some(36));
}

/// `KL(softmax(p) ‖ softmax(q))` in `f64`.
fn kl_reference(p: &[f32], q: &[f32]) -> f64 {
    let lse = |x: &[f32]| {
        let m = x.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b as f64));
        m + x.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln()
    };
    let (lp, lq) = (lse(p), lse(q));
    p.iter()
        .zip(q)
        .map(|(&a, &b)| {
            let la = a as f64 - lp;
            let pa = la.exp();
            if pa == 0.0 {
                0.0
            } else {
                pa * (la - (b as f64 - lq))
            }
        })
        .sum()
}

#[test]
fn kl_known_values() {
    let mut rng = SplitMix64::new(15);
    let p = rng.normals(49152, 0.0, 3.0);
    assert_eq!(log_softmax_kl(&p, &p), 0.0);
    // softmax([0,0]) = [1/2, 1/2], softmax([0, ln 3]) = [1/4, 3/4]:
    // KL = ½ln 2 + ½ln(2/3) = ½ln(4/3).
    let kl = log_softmax_kl(&[0.0, 0.0], &[0.0, 3f32.ln()]) as f64;
    assert!((kl - 0.5 * (4.0f64 / 3.0).ln()).abs() < 1e-6, "{kl}");
    // Shift invariance and large logits.
    let kl2 = log_softmax_kl(&[1000.0, 1000.0], &[-500.0, -500.0 + 3f32.ln()]) as f64;
    assert!((kl2 - 0.5 * (4.0f64 / 3.0).ln()).abs() < 1e-4, "{kl2}");

    for n in [3usize, 8, 11, 1000, 49152] {
        let a = rng.normals(n, 0.0, 2.0);
        let b: Vec<f32> = a.iter().map(|x| x + (rng.normal() * 0.3) as f32).collect();
        let got = log_softmax_kl(&a, &b) as f64;
        let want = kl_reference(&a, &b);
        assert!(
            (got - want).abs() < 1e-5 + 1e-4 * want,
            "n={n}: {got} vs {want}"
        );
    }
}

#[test]
fn kl_edge_cases() {
    assert_eq!(log_softmax_kl(&[], &[]), 0.0);
    assert!(log_softmax_kl(&[1.0, f32::NAN], &[1.0, 2.0]).is_nan());
    assert!(log_softmax_kl(&[1.0, 2.0], &[f32::INFINITY, 2.0]).is_nan());
    assert!(log_softmax_kl(&[f32::NEG_INFINITY; 9], &[0.0; 9]).is_nan());
    // Masked logits (zero probability) are allowed.
    let p = [0.0f32, f32::NEG_INFINITY, 1.0, 2.0, 0.5, 0.5, 0.1, 0.2, 0.3];
    let q = [0.1f32, 3.0, 1.0, 2.5, 0.5, 0.4, 0.1, 0.0, 0.3];
    let got = log_softmax_kl(&p, &q) as f64;
    let want = kl_reference(&p, &q);
    assert!((got - want).abs() < 1e-6, "{got} vs {want}");
    // q masks an outcome that p gives weight to: infinite divergence.
    let q2 = [0.1f32, 3.0, f32::NEG_INFINITY, 2.5, 0.5, 0.4, 0.1, 0.0, 0.3];
    assert_eq!(log_softmax_kl(&p, &q2), f32::INFINITY);
}
