//! Checks of the SIMD kernels against plain scalar transcriptions of ggml's
//! reference `ggml_vec_dot_*` loops, and of the matrix and activation types.

use model_tracer_test_support::SplitMix64;
use wide::i16x16;

use super::blocks::{f16_at, k4_scale_min, u32_at};
use super::dot::{
    f16_high_to_f32, q4_0_block, q4_1_block, q4_1_pair, q4_k_block, q4_k_min_sum, q5_block,
    q6_k_block, q8_0_block, q8_0_split, F16_REBIAS_BY_256,
};
use super::float::F16_REBIAS;
use super::*;
use crate::dtype::GgmlType;

/// An f16 uniform in `[lo, hi)`, as its little-endian bytes.
fn f16_in(rng: &mut SplitMix64, lo: f32, hi: f32) -> [u8; 2] {
    f32_to_f16(rng.range_f32(lo, hi)).to_le_bytes()
}

/// Random blocks of `ty` with every code pattern possible but scales in a
/// sane range (the way real weights look).
fn random_blocks(rng: &mut SplitMix64, ty: GgmlType, blocks: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..blocks {
        let mut b: Vec<u8> = (0..ty.block_bytes()).map(|_| rng.byte()).collect();
        match ty {
            GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => {
                b[0..2].copy_from_slice(&f16_in(rng, 1e-3, 2e-2));
            }
            GgmlType::Q4_1 | GgmlType::Q5_1 => {
                b[0..2].copy_from_slice(&f16_in(rng, 1e-3, 2e-2));
                b[2..4].copy_from_slice(&f16_in(rng, -0.2, 0.0));
            }
            GgmlType::Q4_K => {
                b[0..2].copy_from_slice(&f16_in(rng, 1e-4, 1e-3));
                b[2..4].copy_from_slice(&f16_in(rng, 1e-4, 1e-3));
            }
            GgmlType::Q6_K => b[208..210].copy_from_slice(&f16_in(rng, 1e-4, 1e-3)),
            _ => {}
        }
        out.extend(b);
    }
    out
}

/// `n` roughly normal values without tail outliers: the tolerances below
/// are set for such data (a test adds its outliers on purpose).
fn random_vec(rng: &mut SplitMix64, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.bounded_normal()).collect()
}

/// Codes of one weight block as ggml's scalar loops see them (signed, with
/// offsets applied; minimum-type codes unsigned).
fn weight_codes(ty: GgmlType, b: &[u8]) -> Vec<i32> {
    let nib = |qs: &[u8], j: usize| -> i32 {
        if j < 16 {
            i32::from(qs[j] & 15)
        } else {
            i32::from(qs[j - 16] >> 4)
        }
    };
    match ty {
        GgmlType::Q4_0 => (0..32).map(|j| nib(&b[2..18], j) - 8).collect(),
        GgmlType::Q4_1 => (0..32).map(|j| nib(&b[4..20], j)).collect(),
        GgmlType::Q5_0 => {
            let qh = u32_at(b, 2);
            (0..32)
                .map(|j| nib(&b[6..22], j) + (((qh >> j) & 1) as i32) * 16 - 16)
                .collect()
        }
        GgmlType::Q5_1 => {
            let qh = u32_at(b, 4);
            (0..32)
                .map(|j| nib(&b[8..24], j) + (((qh >> j) & 1) as i32) * 16)
                .collect()
        }
        GgmlType::Q8_0 => b[2..34].iter().map(|&q| i32::from(q as i8)).collect(),
        _ => unreachable!(),
    }
}

/// Scalar `ggml_vec_dot_<ty>_q8_<0|1>` for one row, on ggml byte layouts.
/// Returns (dot, Σ|terms|) with the sum in f64 so the SIMD result can be
/// compared to a tight tolerance.
fn reference_dot_32(ty: GgmlType, row: &[u8], act: &[u8]) -> (f64, f64) {
    let act_type = activation_type(ty).unwrap_or(GgmlType::F32);
    let (mut sum, mut mag) = (0.0f64, 0.0f64);
    for (w, a) in row
        .chunks_exact(ty.block_bytes())
        .zip(act.chunks_exact(act_type.block_bytes()))
    {
        let a_off = if act_type == GgmlType::Q8_1 { 4 } else { 2 };
        let codes = weight_codes(ty, w);
        let sumi: i32 = codes
            .iter()
            .zip(&a[a_off..a_off + 32])
            .map(|(w, &a)| w * i32::from(a as i8))
            .sum();
        let term = f64::from(f16_at(w, 0)) * f64::from(f16_at(a, 0)) * f64::from(sumi);
        sum += term;
        mag += term.abs();
        if matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1) {
            let min_term = f64::from(f16_at(w, 2)) * f64::from(f16_at(a, 2));
            sum += min_term;
            mag += min_term.abs();
        }
    }
    (sum, mag)
}

/// Scalar `ggml_vec_dot_q4_K_q8_K` / `ggml_vec_dot_q6_K_q8_K` for one row.
fn reference_dot_k(ty: GgmlType, row: &[u8], act: &[u8]) -> (f64, f64) {
    let (mut sum, mut mag) = (0.0f64, 0.0f64);
    for (w, a) in row
        .chunks_exact(ty.block_bytes())
        .zip(act.chunks_exact(292))
    {
        let d_a = f64::from(f32::from_le_bytes([a[0], a[1], a[2], a[3]]));
        let q8: Vec<i32> = a[4..260].iter().map(|&q| i32::from(q as i8)).collect();
        let bsum = |g: usize| i32::from(i16::from_le_bytes([a[260 + 2 * g], a[261 + 2 * g]]));
        if ty == GgmlType::Q4_K {
            let mut sumi = 0i32;
            let mut mins = 0i32;
            for j in 0..8 {
                let (sc, m) = k4_scale_min(&w[4..16], j);
                let qs = &w[16 + 32 * (j / 2)..16 + 32 * (j / 2) + 32];
                for l in 0..32 {
                    let q = if j % 2 == 0 { qs[l] & 15 } else { qs[l] >> 4 };
                    sumi += i32::from(sc) * i32::from(q) * q8[32 * j + l];
                }
                mins += i32::from(m) * (bsum(2 * j) + bsum(2 * j + 1));
            }
            let main = f64::from(f16_at(w, 0)) * d_a * f64::from(sumi);
            let min = f64::from(f16_at(w, 2)) * d_a * f64::from(mins);
            sum += main - min;
            mag += main.abs() + min.abs();
        } else {
            let mut sumi = 0i32;
            for half in 0..2 {
                let (ql, qh, sc) = (&w[64 * half..], &w[128 + 32 * half..], &w[192 + 8 * half..]);
                for l in 0..32 {
                    let q = [
                        i32::from((ql[l] & 15) | ((qh[l] & 3) << 4)) - 32,
                        i32::from((ql[l + 32] & 15) | (((qh[l] >> 2) & 3) << 4)) - 32,
                        i32::from((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32,
                        i32::from((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32,
                    ];
                    for (t, q) in q.iter().enumerate() {
                        let scale = i32::from(sc[l / 16 + 2 * t] as i8);
                        sumi += scale * q * q8[128 * half + 32 * t + l];
                    }
                }
            }
            let main = f64::from(f16_at(w, 208)) * d_a * f64::from(sumi);
            sum += main;
            mag += main.abs();
        }
    }
    (sum, mag)
}

const ALL_KERNEL_TYPES: [GgmlType; 7] = [
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q4_K,
    GgmlType::Q6_K,
];

#[test]
fn integer_block_sums_equal_the_scalar_sums_exactly() {
    let mut rng = SplitMix64::new(1);
    for ty in [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
    ] {
        for _ in 0..200 {
            let w = random_blocks(&mut rng, ty, 1);
            let codes: [i16; 32] = std::array::from_fn(|_| i16::from(rng.byte() as i8));
            let a = [
                i16x16::new(codes[..16].try_into().unwrap()),
                i16x16::new(codes[16..].try_into().unwrap()),
            ];
            let want: i32 = weight_codes(ty, &w)
                .iter()
                .zip(codes)
                .map(|(w, a)| w * i32::from(a))
                .sum();
            let got = match ty {
                GgmlType::Q4_0 => q4_0_block(&w[2..18], &a),
                GgmlType::Q4_1 => q4_1_block(&w[4..20], &a),
                GgmlType::Q5_0 => q5_block(u32_at(&w, 2), &w[6..22], &a, 16),
                GgmlType::Q5_1 => q5_block(u32_at(&w, 4), &w[8..24], &a, 0),
                _ => q8_0_block(&w[2..34], &a),
            };
            assert_eq!(got.reduce_add(), want, "{ty}");
        }
    }
}

#[test]
fn k_quant_integer_sums_equal_the_scalar_sums_exactly() {
    let mut rng = SplitMix64::new(2);
    for _ in 0..50 {
        let x = random_vec(&mut rng, 256);
        let mut acts = QuantizedActivations::new();
        acts.quantize_from(&x, GgmlType::Q4_K).unwrap();
        let bytes = acts.to_ggml_bytes();
        let q8: Vec<i32> = bytes[4..260].iter().map(|&q| i32::from(q as i8)).collect();

        let w = random_blocks(&mut rng, GgmlType::Q4_K, 1);
        let mut want = 0i32;
        let mut want_min = 0i32;
        for j in 0..8 {
            let (sc, m) = k4_scale_min(&w[4..16], j);
            for l in 0..32 {
                let byte = w[16 + 32 * (j / 2) + l];
                let q = if j % 2 == 0 { byte & 15 } else { byte >> 4 };
                want += i32::from(sc) * i32::from(q) * q8[32 * j + l];
                want_min += i32::from(m) * q8[32 * j + l];
            }
        }
        assert_eq!(
            q4_k_block(&w[4..16], &w[16..144], &acts.quants).reduce_add(),
            want
        );
        assert_eq!(q4_k_min_sum(&w[4..16], &acts.bsums), want_min);

        let w = random_blocks(&mut rng, GgmlType::Q6_K, 1);
        let mut decoded = [0f32; 256];
        dequantize(GgmlType::Q6_K, &w, &mut decoded).unwrap();
        let d = f16_at(&w, 208);
        // Each decoded weight is d * scale * q exactly; recover scale * q.
        let want: i64 = decoded
            .iter()
            .zip(&q8)
            .map(|(v, &a)| (v / d).round() as i64 * i64::from(a))
            .sum();
        assert_eq!(i64::from(q6_k_block(&w, &acts.quants).reduce_add()), want);
    }
}

#[test]
fn matvec_equals_the_scalar_reference_kernels() {
    let mut rng = SplitMix64::new(3);
    for ty in ALL_KERNEL_TYPES {
        let per_block = ty.block_len();
        // Every length up to a full group of eight blocks, then lengths that
        // mix full groups with a partial one (18 blocks: a 576-wide row).
        let lengths: Vec<usize> = if per_block == 256 {
            (1..=3).collect()
        } else {
            (1..=8).chain([9, 16, 18]).collect()
        };
        for blocks in lengths {
            let cols = blocks * per_block;
            let rows = 5;
            let m = QMatrix::from_bytes(ty, rows, cols, random_blocks(&mut rng, ty, rows * blocks))
                .unwrap();
            let x = random_vec(&mut rng, cols);
            let mut acts = QuantizedActivations::new();
            acts.quantize_from(&x, ty).unwrap();
            let act_bytes = acts.to_ggml_bytes();
            let mut out = vec![0f32; rows];
            m.matvec(&acts, &mut out);
            for (r, got) in out.iter().enumerate() {
                let (want, mag) = if per_block == 256 {
                    reference_dot_k(ty, m.row_bytes(r), &act_bytes)
                } else {
                    reference_dot_32(ty, m.row_bytes(r), &act_bytes)
                };
                let err = (f64::from(*got) - want).abs();
                assert!(
                    err <= 1e-5 * mag + 1e-30,
                    "{ty} cols {cols} row {r}: {got} vs {want} (mag {mag})"
                );
            }
        }
    }
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let na: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

#[test]
fn matvec_f32_equals_a_plain_loop_over_dequantized_weights() {
    let mut rng = SplitMix64::new(4);
    for ty in ALL_KERNEL_TYPES
        .into_iter()
        .chain([GgmlType::F32, GgmlType::F16, GgmlType::BF16])
    {
        let cols = if ty.block_len() == 256 { 512 } else { 96 };
        let rows = 7;
        let w = random_vec(&mut rng, rows * cols);
        let m = match ty {
            GgmlType::Q4_K | GgmlType::Q6_K => QMatrix::from_bytes(
                ty,
                rows,
                cols,
                random_blocks(&mut rng, ty, rows * cols / 256),
            )
            .unwrap(),
            _ => QMatrix::from_f32(ty, rows, cols, &w).unwrap(),
        };
        let x = random_vec(&mut rng, cols);
        let mut out = vec![0f32; rows];
        m.matvec_f32(&x, &mut out);
        let dense = m.to_f32();
        for r in 0..rows {
            let row = &dense[r * cols..(r + 1) * cols];
            let want: f64 = row
                .iter()
                .zip(&x)
                .map(|(w, x)| f64::from(*w) * f64::from(*x))
                .sum();
            let mag: f64 = row
                .iter()
                .zip(&x)
                .map(|(w, x)| (f64::from(*w) * f64::from(*x)).abs())
                .sum();
            assert!(
                (f64::from(out[r]) - want).abs() <= 1e-5 * mag,
                "{ty} row {r}"
            );
        }
    }
}

#[test]
fn plain_float_matrices_accept_any_length_and_use_f32_activations() {
    let mut rng = SplitMix64::new(5);
    for cols in [1usize, 7, 8, 13, 33] {
        let w = random_vec(&mut rng, 3 * cols);
        let m = QMatrix::from_f32(GgmlType::F32, 3, cols, &w).unwrap();
        let x = random_vec(&mut rng, cols);
        let mut acts = QuantizedActivations::new();
        acts.quantize_from(&x, GgmlType::F32).unwrap();
        assert_eq!(acts.format(), GgmlType::F32);
        let mut out = [0f32; 3];
        m.matvec(&acts, &mut out);
        for r in 0..3 {
            let want: f32 = w[r * cols..(r + 1) * cols]
                .iter()
                .zip(&x)
                .map(|(a, b)| a * b)
                .sum();
            assert!(
                (out[r] - want).abs() <= 1e-5 * (1.0 + want.abs()),
                "cols {cols}"
            );
        }
    }
}

#[test]
fn quantized_and_f32_products_agree_on_random_matrices() {
    let mut rng = SplitMix64::new(6);
    for ty in [
        GgmlType::Q4_1,
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
    ] {
        let (rows, cols) = (64, 576);
        let w = random_vec(&mut rng, rows * cols);
        let m = QMatrix::from_f32(ty, rows, cols, &w).unwrap();
        let x = random_vec(&mut rng, cols);
        let mut acts = QuantizedActivations::new();
        acts.quantize_from(&x, ty).unwrap();
        let mut quantized = vec![0f32; rows];
        let mut reference = vec![0f32; rows];
        m.matvec(&acts, &mut quantized);
        m.matvec_f32(&x, &mut reference);
        let cos = cosine(&quantized, &reference);
        assert!(cos > 0.999, "{ty}: cosine {cos}");
        let err: f64 = quantized
            .iter()
            .zip(&reference)
            .map(|(a, b)| f64::from(a - b).powi(2))
            .sum();
        let norm: f64 = reference.iter().map(|v| f64::from(*v).powi(2)).sum();
        let rel = (err / norm).sqrt();
        assert!(rel < 0.02, "{ty}: relative error {rel}");

        let mut again = vec![0f32; rows];
        m.matvec(&acts, &mut again);
        assert_eq!(
            quantized.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            again.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            "{ty}: not deterministic"
        );
    }
}

#[test]
fn row_ranges_match_the_full_product() {
    let mut rng = SplitMix64::new(7);
    let (rows, cols) = (10, 64);
    let m = QMatrix::from_f32(
        GgmlType::Q8_0,
        rows,
        cols,
        &random_vec(&mut rng, rows * cols),
    )
    .unwrap();
    let x = random_vec(&mut rng, cols);
    let mut acts = QuantizedActivations::new();
    acts.quantize_from(&x, GgmlType::Q8_0).unwrap();
    let mut full = vec![0f32; rows];
    m.matvec(&acts, &mut full);
    let mut part = vec![0f32; 4];
    m.matvec_rows(3..7, &acts, &mut part);
    assert_eq!(part, full[3..7]);
    let mut full_f32 = vec![0f32; rows];
    m.matvec_f32(&x, &mut full_f32);
    let mut part_f32 = vec![0f32; 3];
    m.matvec_f32_rows(7..10, &x, &mut part_f32);
    assert_eq!(part_f32, full_f32[7..10]);
}

#[test]
fn activations_match_the_reference_quantizers_byte_for_byte() {
    let mut rng = SplitMix64::new(8);
    for (weights, format) in [
        (GgmlType::Q8_0, GgmlType::Q8_0),
        (GgmlType::Q4_1, GgmlType::Q8_1),
        (GgmlType::Q6_K, GgmlType::Q8_K),
    ] {
        let mut x = random_vec(&mut rng, 512);
        x[40..72].fill(0.0);
        let mut acts = QuantizedActivations::new();
        acts.quantize_from(&x, weights).unwrap();
        assert_eq!(acts.format(), format);
        assert_eq!(acts.len(), 512);
        let mut bytes = Vec::new();
        quantize(format, &x, &mut bytes).unwrap();
        assert_eq!(acts.to_ggml_bytes(), bytes, "{format}");
        let mut decoded = vec![0f32; 512];
        dequantize(format, &bytes, &mut decoded).unwrap();
        assert_eq!(acts.to_f32(), decoded, "{format}");
        let worst = x
            .iter()
            .zip(&decoded)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 0.03, "{format}: error {worst}");
    }
}

#[test]
fn q8_1_sums_are_scale_times_code_sum() {
    let x: Vec<f32> = (0..64).map(|i| (i as f32 - 20.0) / 10.0).collect();
    let mut acts = QuantizedActivations::new();
    acts.quantize_from(&x, GgmlType::Q5_1).unwrap();
    let bytes = acts.to_ggml_bytes();
    for block in bytes.chunks_exact(36) {
        let codes: i32 = block[4..].iter().map(|&q| i32::from(q as i8)).sum();
        let d = f16_at(block, 0);
        let s = f16_at(block, 2);
        assert!(
            (s - d * codes as f32).abs() <= 1e-3 * s.abs().max(1e-3),
            "{s} vs {}",
            d * codes as f32
        );
    }
}

#[test]
fn activation_buffers_are_reused_when_not_growing() {
    let mut acts = QuantizedActivations::new();
    acts.quantize_from(&[0.5; 1024], GgmlType::Q4_1).unwrap();
    let (q, s) = (acts.quants.as_ptr(), acts.scales.as_ptr());
    acts.quantize_from(&[0.25; 512], GgmlType::Q8_0).unwrap();
    // 127 is exactly representable: scale 1, every code 127.
    acts.quantize_from(&[127.0; 1024], GgmlType::Q4_1).unwrap();
    assert_eq!((acts.quants.as_ptr(), acts.scales.as_ptr()), (q, s));
    assert!(acts.to_f32().iter().all(|&v| v == 127.0));
    assert_eq!(acts.len(), 1024);
}

#[test]
fn non_finite_activations_make_their_outputs_non_finite() {
    let mut rng = SplitMix64::new(9);
    let m = QMatrix::from_f32(GgmlType::Q4_1, 2, 64, &random_vec(&mut rng, 128)).unwrap();
    let mut x = random_vec(&mut rng, 64);
    x[3] = f32::INFINITY;
    let mut acts = QuantizedActivations::new();
    acts.quantize_from(&x, GgmlType::Q4_1).unwrap();
    let mut out = [0f32; 2];
    m.matvec(&acts, &mut out);
    assert!(out.iter().all(|v| !v.is_finite()), "{out:?}");
    x[3] = f32::NAN;
    acts.quantize_from(&x, GgmlType::Q4_1).unwrap();
    m.matvec(&acts, &mut out);
    assert!(out.iter().all(|v| v.is_nan()), "{out:?}");
}

#[test]
fn bad_shapes_and_types_are_errors() {
    let mut acts = QuantizedActivations::new();
    assert_eq!(
        acts.quantize_from(&[0.0; 48], GgmlType::Q4_0),
        Err(QuantError::NotWholeBlocks {
            ty: GgmlType::Q8_0,
            elements: 48
        })
    );
    assert_eq!(
        acts.quantize_from(&[0.0; 256], GgmlType::Q2_K),
        Err(QuantError::Unsupported(GgmlType::Q2_K))
    );
    assert_eq!(
        QMatrix::from_bytes(GgmlType::Q4_1, 2, 64, vec![0; 79]),
        Err(QuantError::ByteLength {
            ty: GgmlType::Q4_1,
            elements: 128,
            expected: 80,
            actual: 79
        })
    );
    assert_eq!(
        QMatrix::from_bytes(GgmlType::Q4_1, 2, 48, vec![0; 60]),
        Err(QuantError::NotWholeBlocks {
            ty: GgmlType::Q4_1,
            elements: 48
        })
    );
    assert_eq!(
        QMatrix::from_bytes(GgmlType::Q4_1, usize::MAX, 64, vec![]),
        Err(QuantError::TooLarge {
            rows: usize::MAX,
            cols: 64
        })
    );
    assert_eq!(
        QMatrix::from_bytes(GgmlType::Q3_K, 1, 256, vec![0; 110]),
        Err(QuantError::Unsupported(GgmlType::Q3_K))
    );
    assert_eq!(
        QMatrix::from_f32(GgmlType::Q8_0, 2, 32, &[0.0; 63]),
        Err(QuantError::ValueCount {
            rows: 2,
            cols: 32,
            expected: 64,
            actual: 63
        })
    );
    assert_eq!(
        QMatrix::from_f32(GgmlType::Q5_K, 1, 256, &[0.0; 256]),
        Err(QuantError::Unsupported(GgmlType::Q5_K))
    );
    let mut out = [0f32; 32];
    assert_eq!(
        dequantize(GgmlType::Q8_0, &[0; 33], &mut out),
        Err(QuantError::ByteLength {
            ty: GgmlType::Q8_0,
            elements: 32,
            expected: 34,
            actual: 33
        })
    );
    assert_eq!(
        dequantize(GgmlType::Q4_0, &[0; 18], &mut out[..20]),
        Err(QuantError::NotWholeBlocks {
            ty: GgmlType::Q4_0,
            elements: 20
        })
    );
    assert_eq!(
        dequantize(GgmlType::Q5_K, &[0; 176], &mut [0f32; 256]),
        Err(QuantError::Unsupported(GgmlType::Q5_K))
    );
    let mut bytes = vec![1, 2, 3];
    let mut src = [0.5f32; 32];
    src[9] = f32::NAN;
    assert_eq!(
        quantize(GgmlType::Q4_1, &src, &mut bytes),
        Err(QuantError::NonFinite { index: 9 })
    );
    assert!(bytes.is_empty());
    assert_eq!(
        quantize(GgmlType::Q3_K, &[0.0; 256], &mut bytes),
        Err(QuantError::Unsupported(GgmlType::Q3_K))
    );
    assert!(!QuantError::Unsupported(GgmlType::Q2_K)
        .to_string()
        .is_empty());
}

#[test]
#[should_panic(expected = "cannot multiply")]
fn matvec_rejects_activations_quantized_for_another_type() {
    let m = QMatrix::from_f32(GgmlType::Q4_1, 1, 32, &[0.5; 32]).unwrap();
    let mut acts = QuantizedActivations::new();
    acts.quantize_from(&[0.5; 32], GgmlType::Q8_0).unwrap();
    m.matvec(&acts, &mut [0.0]);
}

#[test]
#[should_panic(expected = "activation length")]
fn matvec_rejects_a_wrong_activation_length() {
    let m = QMatrix::from_f32(GgmlType::Q8_0, 1, 64, &[0.5; 64]).unwrap();
    let mut acts = QuantizedActivations::new();
    acts.quantize_from(&[0.5; 32], GgmlType::Q8_0).unwrap();
    m.matvec(&acts, &mut [0.0]);
}

#[test]
fn quantize_round_trip_error_is_within_half_a_step() {
    let mut rng = SplitMix64::new(10);
    let x = random_vec(&mut rng, 256);
    for ty in [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
    ] {
        let mut bytes = Vec::new();
        quantize(ty, &x, &mut bytes).unwrap();
        let mut back = vec![0f32; 256];
        dequantize(ty, &bytes, &mut back).unwrap();
        for (b, (block, orig)) in bytes
            .chunks_exact(ty.block_bytes())
            .zip(x.chunks_exact(32))
            .enumerate()
        {
            let d = f16_at(block, 0).abs();
            for (j, v) in orig.iter().enumerate() {
                let err = (back[32 * b + j] - v).abs();
                // Half a step, plus slack for the f16 rounding of d and m;
                // the symmetric types clamp the far side's top code, which
                // costs up to a whole step.
                let steps = if matches!(ty, GgmlType::Q4_0 | GgmlType::Q5_0) {
                    1.0
                } else {
                    0.5
                };
                assert!(
                    err <= steps * d + 0.02 * v.abs() + 2e-3,
                    "{ty} block {b} elem {j}: {err} (d {d})"
                );
            }
        }
    }
}

#[test]
fn vector_f16_conversion_equals_the_scalar_one_for_every_pattern() {
    for start in (0..=u16::MAX as usize).step_by(8) {
        let bits: [i32; 8] = std::array::from_fn(|k| (start + k) as i32);
        let got = super::dot::f16x8_to_f32(wide::i32x8::new(bits)).to_array();
        for (k, v) in got.iter().enumerate() {
            assert_eq!(
                v.to_bits(),
                f16_to_f32((start + k) as u16).to_bits(),
                "{:#06x}",
                start + k
            );
        }
    }
}

#[test]
fn padding_of_a_longer_earlier_vector_does_not_leak_into_a_shorter_one() {
    let mut rng = SplitMix64::new(11);
    let m = QMatrix::from_f32(GgmlType::Q4_1, 3, 64, &random_vec(&mut rng, 192)).unwrap();
    let x = random_vec(&mut rng, 64);
    let mut fresh = QuantizedActivations::new();
    fresh.quantize_from(&x, GgmlType::Q4_1).unwrap();
    let mut reused = QuantizedActivations::new();
    reused
        .quantize_from(&[f32::NAN; 512], GgmlType::Q4_1)
        .unwrap();
    reused.quantize_from(&x, GgmlType::Q4_1).unwrap();
    let (mut a, mut b) = ([0f32; 3], [0f32; 3]);
    m.matvec(&fresh, &mut a);
    m.matvec(&reused, &mut b);
    assert_eq!(a, b);
    assert!(a.iter().all(|v| v.is_finite()));
}

#[test]
fn k_quant_quantizers_round_trip_closely() {
    let mut rng = SplitMix64::new(12);
    let mut x = random_vec(&mut rng, 1024);
    // An all-zero super-block and one with a single outlier.
    x[256..512].fill(0.0);
    x[600] = 25.0;
    for (ty, tolerance) in [(GgmlType::Q4_K, 0.12), (GgmlType::Q6_K, 0.03)] {
        let mut bytes = Vec::new();
        quantize(ty, &x, &mut bytes).unwrap();
        assert_eq!(bytes.len(), 4 * ty.block_bytes());
        let mut back = vec![0f32; x.len()];
        dequantize(ty, &bytes, &mut back).unwrap();
        assert!(back[256..512].iter().all(|&v| v == 0.0), "{ty}: zero block");
        assert!(
            (back[600] - 25.0).abs() < 0.1,
            "{ty}: outlier {}",
            back[600]
        );
        let err: f64 = x
            .iter()
            .zip(&back)
            .map(|(a, b)| f64::from(a - b).powi(2))
            .sum();
        let norm: f64 = x.iter().map(|v| f64::from(*v).powi(2)).sum();
        let rel = (err / norm).sqrt();
        assert!(rel < tolerance, "{ty}: relative error {rel}");
    }
}

/// The codes of block `b` of a Q8_0/Q8_1 activation vector, in element order.
fn activation_codes(acts: &QuantizedActivations, b: usize) -> [i32; 32] {
    let mut codes = [0i32; 32];
    for (half, lane) in acts.quants[2 * b..2 * b + 2].iter().enumerate() {
        for (j, &q) in lane.to_array().iter().enumerate() {
            codes[16 * half + j] = i32::from(q);
        }
    }
    codes
}

#[test]
fn q4_1_pair_sums_are_256_times_the_scalar_sums_exactly() {
    let mut rng = SplitMix64::new(12);
    for blocks in 1..=19 {
        let w = random_blocks(&mut rng, GgmlType::Q4_1, blocks);
        let mut acts = QuantizedActivations::new();
        let mut x = random_vec(&mut rng, 32 * blocks);
        // Some blocks at full scale, so that codes of ±127 occur.
        x[0] = 40.0;
        x[32 * blocks - 1] = -40.0;
        acts.quantize_from(&x, GgmlType::Q4_1).unwrap();
        let block = |b: usize| &w[20 * b..20 * b + 20];
        let scalar = |b: usize| -> i32 {
            weight_codes(GgmlType::Q4_1, block(b))
                .iter()
                .zip(activation_codes(&acts, b))
                .map(|(q, a)| q * a)
                .sum()
        };
        let mut vectors = acts.pairs.chunks_exact(4);
        for first in (0..blocks).step_by(8) {
            let n = (blocks - first).min(8);
            let h = n.div_ceil(2);
            for i in 0..h {
                let (lo, hi) = (first + i, first + h + i);
                let present = h + i < n;
                let mut bytes = [0u8; 32];
                bytes[..16].copy_from_slice(&block(lo)[4..]);
                if present {
                    bytes[16..].copy_from_slice(&block(hi)[4..]);
                } else {
                    // Whatever the kernel reads there meets zero activations.
                    bytes[16..].iter_mut().for_each(|b| *b = rng.byte());
                }
                let a = vectors.next().expect("a pair of vectors per pair");
                let sums = q4_1_pair(wide::bytemuck::cast(bytes), a).to_array();
                let (low, high): (i32, i32) = (sums[..4].iter().sum(), sums[4..].iter().sum());
                assert_eq!(
                    low,
                    256 * scalar(lo),
                    "{blocks} blocks, pair {i} of {first}"
                );
                assert_eq!(high, if present { 256 * scalar(hi) } else { 0 });
                assert_eq!(acts.pair_scales[first + i], acts.scales[lo]);
                assert_eq!(acts.pair_sums[first + i], acts.sums[lo]);
                let (s, m) = if present {
                    (acts.scales[hi], acts.sums[hi])
                } else {
                    (0.0, 0.0)
                };
                assert_eq!(acts.pair_scales[first + 4 + i], s);
                assert_eq!(acts.pair_sums[first + 4 + i], m);
            }
        }
        // The rest pads the last group to 16 vectors, with zeros.
        assert_eq!(acts.pairs.len(), 16 * blocks.div_ceil(8), "{blocks} blocks");
        assert!(
            vectors.all(|v| v.iter().all(|l| *l == i16x16::ZERO)),
            "{blocks} blocks: padding not zero"
        );
    }
}

#[test]
fn q8_0_even_odd_sums_are_256_times_the_scalar_sums_exactly() {
    let mut rng = SplitMix64::new(13);
    for blocks in [1, 7, 18] {
        // Random code bytes, so -128 occurs among the weights.
        let w = random_blocks(&mut rng, GgmlType::Q8_0, blocks);
        let mut x = random_vec(&mut rng, 32 * blocks);
        x[5] = 50.0;
        let mut acts = QuantizedActivations::new();
        acts.quantize_from(&x, GgmlType::Q8_0).unwrap();
        for b in 0..blocks {
            let block = &w[34 * b..34 * b + 34];
            let want: i32 = weight_codes(GgmlType::Q8_0, block)
                .iter()
                .zip(activation_codes(&acts, b))
                .map(|(q, a)| q * a)
                .sum();
            let got = q8_0_split(&block[2..], &acts.split[2 * b..2 * b + 2]).reduce_add();
            assert_eq!(got, 256 * want, "block {b} of {blocks}");
        }
    }
}

#[test]
fn fast_f16_conversion_is_exact_for_every_finite_pattern() {
    let finite: Vec<u16> = (0..=u16::MAX).filter(|b| b & 0x7c00 != 0x7c00).collect();
    for chunk in finite.chunks(8) {
        // The low half of each lane holds unrelated bits, as in a block head.
        let lanes: [i32; 8] =
            std::array::from_fn(|k| (i32::from(chunk[k % chunk.len()]) << 16) | 0x5a5a);
        let plain = f16_high_to_f32(wide::i32x8::new(lanes), F16_REBIAS).to_array();
        let by_256 = f16_high_to_f32(wide::i32x8::new(lanes), F16_REBIAS_BY_256).to_array();
        for k in 0..8 {
            let want = f16_to_f32(chunk[k % chunk.len()]);
            assert_eq!(
                plain[k].to_bits(),
                want.to_bits(),
                "{:#06x}",
                chunk[k % chunk.len()]
            );
            assert_eq!(by_256[k].to_bits(), (want / 256.0).to_bits());
        }
    }
}

#[test]
fn non_finite_weight_scales_make_their_rows_non_finite_and_only_those() {
    let mut rng = SplitMix64::new(14);
    let (rows, blocks) = (4, 18);
    for ty in [GgmlType::Q4_1, GgmlType::Q8_0] {
        let bb = ty.block_bytes();
        let mut w = random_blocks(&mut rng, ty, rows * blocks);
        // Row 1: an infinite scale in the last block; row 2: a NaN scale
        // (Q8_0) or minimum (Q4_1) in block 3.
        w[(2 * blocks - 1) * bb..][..2].copy_from_slice(&0x7c00u16.to_le_bytes());
        let nan_at = (2 * blocks + 3) * bb + if ty == GgmlType::Q4_1 { 2 } else { 0 };
        w[nan_at..nan_at + 2].copy_from_slice(&0x7e00u16.to_le_bytes());
        let m = QMatrix::from_bytes(ty, rows, 32 * blocks, w).unwrap();
        let mut acts = QuantizedActivations::new();
        acts.quantize_from(&random_vec(&mut rng, 32 * blocks), ty)
            .unwrap();
        let act_bytes = acts.to_ggml_bytes();
        let mut out = vec![0f32; rows];
        m.matvec(&acts, &mut out);
        assert!(!out[1].is_finite(), "{ty}: {out:?}");
        assert!(out[2].is_nan(), "{ty}: {out:?}");
        for r in [0, 3] {
            let (want, mag) = reference_dot_32(ty, m.row_bytes(r), &act_bytes);
            let err = (f64::from(out[r]) - want).abs();
            assert!(err <= 1e-5 * mag, "{ty} row {r}: {} vs {want}", out[r]);
        }
    }
}

#[test]
fn a_row_gives_the_same_product_alone_as_inside_a_matrix() {
    // The last, partial group of a row reads on into the next row; a row at
    // the end of its matrix goes through a zero-padded copy instead.
    let mut rng = SplitMix64::new(15);
    for ty in [GgmlType::Q4_1, GgmlType::Q8_0] {
        for blocks in [1, 3, 8, 9, 18] {
            let (rows, cols) = (3, 32 * blocks);
            let w = random_blocks(&mut rng, ty, rows * blocks);
            let m = QMatrix::from_bytes(ty, rows, cols, w).unwrap();
            let mut acts = QuantizedActivations::new();
            acts.quantize_from(&random_vec(&mut rng, cols), ty).unwrap();
            let mut all = vec![0f32; rows];
            m.matvec(&acts, &mut all);
            for (r, inside) in all.iter().enumerate() {
                let alone = QMatrix::from_bytes(ty, 1, cols, m.row_bytes(r).to_vec()).unwrap();
                let mut one = [0f32];
                alone.matvec(&acts, &mut one);
                assert_eq!(
                    one[0].to_bits(),
                    inside.to_bits(),
                    "{ty}, {blocks} blocks, row {r}"
                );
            }
        }
    }
}

#[test]
fn interleaved_rows_visit_every_row_once_and_store_it_in_place() {
    for rows in 0..40 {
        let first = 7;
        let mut out = vec![f32::NAN; rows];
        let mut visits = vec![0; rows];
        super::matrix::interleaved_rows(first, &mut out, |r| {
            visits[r - first] += 1;
            r as f32
        });
        assert!(visits.iter().all(|&v| v == 1), "{rows} rows: {visits:?}");
        let want: Vec<f32> = (first..first + rows).map(|r| r as f32).collect();
        assert_eq!(out, want);
    }
}

/// Random blocks of `ty` whose scales (and Q4_1 minimums) are any finite
/// f16, of either sign, subnormals included.
fn blocks_with_any_finite_scales(rng: &mut SplitMix64, ty: GgmlType, blocks: usize) -> Vec<u8> {
    let heads = if ty == GgmlType::Q4_1 { 2 } else { 1 };
    let mut out = random_blocks(rng, ty, blocks);
    for block in out.chunks_exact_mut(ty.block_bytes()) {
        for h in 0..heads {
            let bits = loop {
                let bits = rng.next_u32() as u16;
                if bits & 0x7c00 != 0x7c00 {
                    break bits;
                }
            };
            block[2 * h..2 * h + 2].copy_from_slice(&bits.to_le_bytes());
        }
    }
    out
}

/// Row `r` of `m` decoded, dotted with `x` in f64: (dot, Σ|w·x|).
fn decoded_dot(m: &QMatrix, r: usize, x: &[f32]) -> (f64, f64) {
    let mut w = vec![0f32; m.cols()];
    m.dequantize_row(r, &mut w);
    w.iter()
        .zip(x)
        .map(|(w, x)| f64::from(*w) * f64::from(*x))
        .fold((0.0, 0.0), |(sum, mag), t| (sum + t, mag + t.abs()))
}

/// The types whose f32 kernels decode codes straight into vector lanes.
const LANE_DECODED_TYPES: [GgmlType; 3] = [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0];

#[test]
fn f32_kernels_equal_an_f64_dot_of_the_decoded_rows() {
    let mut rng = SplitMix64::new(16);
    for ty in LANE_DECODED_TYPES {
        // 1 to 48 blocks: partial groups alone, whole groups alone, and both.
        for cols in [32, 96, 224, 256, 288, 576, 1536] {
            for wild in [false, true] {
                let rows = 6;
                let blocks = rows * cols / 32;
                let w = if wild {
                    blocks_with_any_finite_scales(&mut rng, ty, blocks)
                } else {
                    random_blocks(&mut rng, ty, blocks)
                };
                let m = QMatrix::from_bytes(ty, rows, cols, w).unwrap();
                let x = random_vec(&mut rng, cols);
                let mut out = vec![0f32; rows];
                m.matvec_f32(&x, &mut out);
                for (r, got) in out.iter().enumerate() {
                    let (want, mag) = decoded_dot(&m, r, &x);
                    assert!(
                        (f64::from(*got) - want).abs() <= 1e-5 * mag,
                        "{ty} cols {cols} wild {wild} row {r}: {got} vs {want} (mag {mag})"
                    );
                }
                let mut part = vec![0f32; rows - 1];
                m.matvec_f32_rows(1..rows, &x, &mut part);
                assert_eq!(part, out[1..], "{ty} cols {cols}: rows 1.. alone");
            }
        }
    }
}

/// Makes element `e` of a block decode to exactly zero.
fn zero_weight(ty: GgmlType, block: &mut [u8], e: usize) {
    let nibble = |byte: &mut u8, e: usize, value: u8| {
        *byte = if e < 16 {
            (*byte & 0xf0) | value
        } else {
            (*byte & 0x0f) | (value << 4)
        };
    };
    match ty {
        GgmlType::Q8_0 => block[2 + e] = 0,
        GgmlType::Q4_0 => nibble(&mut block[2 + e % 16], e, 8),
        GgmlType::Q4_1 => {
            block[2..4].fill(0);
            nibble(&mut block[4 + e % 16], e, 0);
        }
        _ => unreachable!("{ty}"),
    }
}

/// NaN or infinite activations: the f32 kernels give what a plain f32 dot
/// of the decoded weights gives, NaN where it is NaN (a NaN activation, an
/// infinity times a zero weight, infinities of both signs) and the same
/// infinity where it is infinite.
#[test]
fn f32_kernels_propagate_non_finite_activations_as_the_plain_dot() {
    let mut rng = SplitMix64::new(17);
    for ty in LANE_DECODED_TYPES {
        for cols in [32, 288, 576] {
            let rows = 8;
            let bb = ty.block_bytes();
            let row_bytes = cols / 32 * bb;
            let (j, k) = (cols - 3, 5);
            let mut w = random_blocks(&mut rng, ty, rows * cols / 32);
            // Rows 0 and 1: a zero weight at j; row 1 also at k.
            for r in 0..2 {
                let at = r * row_bytes + j / 32 * bb;
                zero_weight(ty, &mut w[at..at + bb], j % 32);
            }
            let at = row_bytes + k / 32 * bb;
            zero_weight(ty, &mut w[at..at + bb], k % 32);
            let m = QMatrix::from_bytes(ty, rows, cols, w).unwrap();
            let cases: [&[(usize, f32)]; 4] = [
                &[(j, f32::INFINITY)],
                &[(j, f32::NEG_INFINITY)],
                &[(j, f32::INFINITY), (k, f32::NEG_INFINITY)],
                &[(k, f32::NAN)],
            ];
            for case in cases {
                let mut x = random_vec(&mut rng, cols);
                for &(at, v) in case {
                    x[at] = v;
                }
                let mut out = vec![0f32; rows];
                m.matvec_f32(&x, &mut out);
                let mut w = vec![0f32; cols];
                for (r, got) in out.iter().enumerate() {
                    m.dequantize_row(r, &mut w);
                    let want: f32 = w.iter().zip(&x).map(|(w, x)| w * x).sum();
                    assert!(!want.is_finite(), "{ty} {case:?} row {r}: {want}");
                    let same = if want.is_nan() {
                        got.is_nan()
                    } else {
                        *got == want
                    };
                    assert!(same, "{ty} cols {cols} {case:?} row {r}: {got} vs {want}");
                }
            }
        }
    }
}

#[test]
fn f32_kernels_make_rows_with_non_finite_scales_non_finite() {
    let mut rng = SplitMix64::new(18);
    for ty in LANE_DECODED_TYPES {
        // Whole groups and a partial one: both scale conversions.
        let (rows, blocks) = (4, 11);
        let bb = ty.block_bytes();
        let mut w = random_blocks(&mut rng, ty, rows * blocks);
        // Row 1: an infinite scale in a whole group; row 2: a NaN in the
        // partial one (the minimum for Q4_1).
        w[(blocks + 2) * bb..][..2].copy_from_slice(&0xfc00u16.to_le_bytes());
        let nan_at = (2 * blocks + 9) * bb + if ty == GgmlType::Q4_1 { 2 } else { 0 };
        w[nan_at..nan_at + 2].copy_from_slice(&0x7e00u16.to_le_bytes());
        let m = QMatrix::from_bytes(ty, rows, 32 * blocks, w).unwrap();
        let x = random_vec(&mut rng, 32 * blocks);
        let mut out = vec![0f32; rows];
        m.matvec_f32(&x, &mut out);
        assert!(!out[1].is_finite(), "{ty}: {out:?}");
        assert!(out[2].is_nan(), "{ty}: {out:?}");
        for r in [0, 3] {
            let (want, mag) = decoded_dot(&m, r, &x);
            assert!(
                (f64::from(out[r]) - want).abs() <= 1e-5 * mag,
                "{ty} row {r}"
            );
        }
    }
}

/// Activation rows for a batch test: roughly normal values, with an
/// all-zero block in one row and a large outlier in another.
fn batch_values(rng: &mut SplitMix64, rows: usize, cols: usize) -> Vec<f32> {
    let mut x = random_vec(rng, rows * cols);
    if rows > 1 && cols >= 32 {
        x[cols..cols + 32].fill(0.0);
    }
    if rows > 2 {
        x[2 * cols + cols / 2] = 40.0;
    }
    x
}

/// A `rows x cols` matrix of `ty` with random codes; for the block types
/// with a one-row fast kernel, scales of every finite f16 pattern
/// (subnormals and both signs included) when `any_scales`.
fn batch_matrix(
    rng: &mut SplitMix64,
    ty: GgmlType,
    rows: usize,
    cols: usize,
    any_scales: bool,
) -> QMatrix {
    match ty {
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => {
            QMatrix::from_f32(ty, rows, cols, &random_vec(rng, rows * cols)).unwrap()
        }
        _ => {
            let blocks = rows * cols / ty.block_len();
            let bytes =
                if any_scales && matches!(ty, GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0) {
                    blocks_with_any_finite_scales(rng, ty, blocks)
                } else {
                    random_blocks(rng, ty, blocks)
                };
            QMatrix::from_bytes(ty, rows, cols, bytes).unwrap()
        }
    }
}

/// Column counts for the batch tests: small ones, partial groups of eight
/// blocks, and SmolLM2's 576 and 1536.
fn batch_cols(ty: GgmlType) -> Vec<usize> {
    match ty.block_len() {
        256 => vec![256, 512, 1536],
        32 => vec![32, 96, 256, 288, 576, 1536],
        _ => vec![1, 13, 96, 576],
    }
}

/// Asserts that `got` is bit for bit `want`, naming the first difference.
fn assert_same_bits(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    if let Some(i) = (0..got.len()).find(|&i| got[i].to_bits() != want[i].to_bits()) {
        panic!("{what}: element {i} is {} instead of {}", got[i], want[i]);
    }
}

const BATCH_ROWS: [usize; 7] = [1, 2, 3, 7, 8, 9, 64];

const BATCH_TYPES: [GgmlType; 10] = [
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q4_K,
    GgmlType::Q6_K,
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
];

#[test]
fn matmul_rows_equal_matvec_bit_for_bit() {
    let mut rng = SplitMix64::new(19);
    let mut batch = QuantizedBatch::new();
    let mut acts = QuantizedActivations::new();
    for ty in BATCH_TYPES {
        for cols in batch_cols(ty) {
            // Not a multiple of the tile or of the row block; the second
            // matrix has scales of every finite pattern.
            for (rows, any_scales) in [(37, false), (6, true)] {
                let m = batch_matrix(&mut rng, ty, rows, cols, any_scales);
                for t_rows in BATCH_ROWS {
                    if t_rows == 64 && cols > 576 && rows < 37 {
                        continue;
                    }
                    let x = batch_values(&mut rng, t_rows, cols);
                    batch.quantize_from(&x, cols, ty).unwrap();
                    assert_eq!(batch.rows(), t_rows);
                    let mut out = vec![f32::NAN; t_rows * rows];
                    m.matmul(&batch, &mut out);
                    let mut want = vec![0f32; rows];
                    for (t, got) in out.chunks_exact(rows).enumerate() {
                        acts.quantize_from(&x[t * cols..(t + 1) * cols], ty)
                            .unwrap();
                        m.matvec(&acts, &mut want);
                        let what = format!("{ty} {rows}x{cols}, T = {t_rows}, row {t}");
                        assert_same_bits(got, &want, &what);
                    }
                }
            }
        }
    }
}

#[test]
fn products_in_one_job_equal_each_matvec() {
    let mut rng = SplitMix64::new(29);
    let mut acts = QuantizedActivations::new();
    for ty in [GgmlType::Q4_1, GgmlType::Q8_0, GgmlType::Q4_K] {
        let cols = batch_cols(ty)[0];
        // rows that put part boundaries inside and between the matrices
        let mats: Vec<QMatrix> = [576, 67, 192]
            .iter()
            .map(|&rows| batch_matrix(&mut rng, ty, rows, cols, false))
            .collect();
        let x = batch_values(&mut rng, 1, cols);
        acts.quantize_from(&x, ty).unwrap();
        for threads in [1, 2, 3] {
            let pool = crate::pool::Pool::new(threads);
            let (mut a, mut b, mut c) = (vec![0f32; 576], vec![0f32; 67], vec![0f32; 192]);
            QMatrix::matvec_many_on(
                &pool,
                &acts,
                [&mats[0], &mats[1], &mats[2]],
                [&mut a, &mut b, &mut c],
            );
            for (m, got) in mats.iter().zip([&a, &b, &c]) {
                let mut want = vec![f32::NAN; m.rows()];
                m.matvec(&acts, &mut want);
                assert_same_bits(got, &want, &format!("{ty}, {threads} threads"));
            }
        }
    }
}

#[test]
fn batches_quantized_on_threads_multiply_as_on_one() {
    let mut rng = SplitMix64::new(23);
    let pool = crate::pool::Pool::new(3);
    let (mut one, mut many) = (QuantizedBatch::new(), QuantizedBatch::new());
    for ty in BATCH_TYPES {
        for cols in batch_cols(ty) {
            let m = batch_matrix(&mut rng, ty, 19, cols, false);
            // more rows than before, then fewer (buffers kept), then many
            for t_rows in [5, 64, 3, 40] {
                let mut x = batch_values(&mut rng, t_rows, cols);
                x[cols / 2] = f32::NAN;
                one.quantize_from(&x, cols, ty).unwrap();
                many.quantize_from_on(&pool, &x, cols, ty).unwrap();
                assert_eq!(many.rows(), t_rows);
                let mut want = vec![0f32; t_rows * 19];
                let mut got = vec![1f32; t_rows * 19];
                m.matmul(&one, &mut want);
                m.matmul(&many, &mut got);
                assert_same_bits(&got, &want, &format!("{ty} x{cols}, T = {t_rows}"));
            }
        }
    }
    let bad = many.quantize_from_on(&pool, &[0.0; 48], 32, GgmlType::Q8_0);
    assert!(
        matches!(bad, Err(QuantError::NotWholeRows { .. })),
        "{bad:?}"
    );
}

#[test]
fn matmul_f32_rows_equal_matvec_f32_bit_for_bit() {
    let mut rng = SplitMix64::new(20);
    for ty in BATCH_TYPES {
        for cols in batch_cols(ty) {
            let rows = 21;
            let m = batch_matrix(&mut rng, ty, rows, cols, true);
            for t_rows in [1, 3, 8, 9, 64] {
                let x = batch_values(&mut rng, t_rows, cols);
                let mut out = vec![f32::NAN; t_rows * rows];
                m.matmul_f32(&x, &mut out);
                let mut want = vec![0f32; rows];
                for (t, got) in out.chunks_exact(rows).enumerate() {
                    m.matvec_f32(&x[t * cols..(t + 1) * cols], &mut want);
                    let what = format!("{ty} {rows}x{cols}, T = {t_rows}, row {t}");
                    assert_same_bits(got, &want, &what);
                }
            }
        }
    }
}

#[test]
fn matmul_agrees_with_the_f32_reference() {
    let mut rng = SplitMix64::new(21);
    let mut batch = QuantizedBatch::new();
    for ty in BATCH_TYPES {
        for cols in batch_cols(ty) {
            let (rows, t_rows) = (29, 9);
            let m = batch_matrix(&mut rng, ty, rows, cols, false);
            let x = random_vec(&mut rng, t_rows * cols);
            batch.quantize_from(&x, cols, ty).unwrap();
            let mut quantized = vec![0f32; t_rows * rows];
            let mut reference = vec![0f32; t_rows * rows];
            m.matmul(&batch, &mut quantized);
            m.matmul_f32(&x, &mut reference);
            if batch.format() == GgmlType::F32 {
                assert_same_bits(&quantized, &reference, &format!("{ty} x {cols}"));
                continue;
            }
            // Each product within the activation quantization error: at
            // most half a step (1/254 of the block maximum) per element, plus
            // the f16 rounding of the step (at most 127 · 2^-11 of it), plus
            // f32 rounding.
            let dense = m.to_f32();
            for (i, (q, f)) in quantized.iter().zip(&reference).enumerate() {
                let (t, r) = (i / rows, i % rows);
                let w = &dense[r * cols..(r + 1) * cols];
                let xt = &x[t * cols..(t + 1) * cols];
                let amax = f64::from(xt.iter().fold(0f32, |a, v| a.max(v.abs())));
                let sum_w: f64 = w.iter().map(|w| f64::from(w.abs())).sum();
                let mag: f64 = w.iter().zip(xt).map(|(w, x)| f64::from(w * x).abs()).sum();
                let bound = sum_w * amax * (1.0 / 254.0 + 1.0 / 2048.0) + 1e-5 * mag;
                let err = f64::from(q - f).abs();
                assert!(
                    err <= bound,
                    "{ty} {rows}x{cols} product ({t}, {r}): {q} vs {f}, bound {bound}"
                );
            }
            let cos = cosine(&quantized, &reference);
            assert!(cos > 0.999, "{ty} x {cols}: cosine {cos}");
        }
    }
}

#[test]
fn matmul_of_matrices_with_non_finite_scales_equals_matvec() {
    // Such matrices skip the fast kernels, in matvec and in matmul alike.
    let mut rng = SplitMix64::new(22);
    let mut batch = QuantizedBatch::new();
    let mut acts = QuantizedActivations::new();
    for ty in [GgmlType::Q4_1, GgmlType::Q8_0, GgmlType::Q4_0] {
        let (rows, blocks, t_rows) = (5, 18, 6);
        let bb = ty.block_bytes();
        let mut w = random_blocks(&mut rng, ty, rows * blocks);
        w[(blocks + 4) * bb..][..2].copy_from_slice(&0x7c00u16.to_le_bytes());
        w[(3 * blocks + 17) * bb..][..2].copy_from_slice(&0x7e00u16.to_le_bytes());
        let cols = 32 * blocks;
        let m = QMatrix::from_bytes(ty, rows, cols, w).unwrap();
        let x = batch_values(&mut rng, t_rows, cols);
        batch.quantize_from(&x, cols, ty).unwrap();
        let mut out = vec![0f32; t_rows * rows];
        m.matmul(&batch, &mut out);
        let mut want = vec![0f32; rows];
        for (t, got) in out.chunks_exact(rows).enumerate() {
            acts.quantize_from(&x[t * cols..(t + 1) * cols], ty)
                .unwrap();
            m.matvec(&acts, &mut want);
            assert_same_bits(got, &want, &format!("{ty} row {t}"));
            assert!(!got[1].is_finite() && got[3].is_nan(), "{ty}: {got:?}");
            assert!(got[0].is_finite() && got[4].is_finite(), "{ty}: {got:?}");
        }
    }
}

/// A Q8_0 block: scale `d` (f16 bits) and codes `code(e)`.
fn q8_0_block_bytes(d: u16, code: impl Fn(usize) -> i8) -> Vec<u8> {
    let mut b = d.to_le_bytes().to_vec();
    b.extend((0..32).map(|e| code(e) as u8));
    b
}

#[test]
fn q8_0_matmul_at_the_code_and_scale_extremes_equals_matvec() {
    // Codes of -128 (which a file may hold though ggml never writes it)
    // against activation codes of ±127: every pair of byte products at its
    // largest magnitude, 2 · 128 · 127. Scales from the largest f16 to the
    // smallest subnormal, activations from 3e38 down to subnormals, and
    // blocks of infinite and NaN activations.
    let (rows, blocks) = (9, 18);
    let cols = 32 * blocks;
    let scales: [u16; 6] = [0x3c00, 0x7bff, 0xfbff, 0x0001, 0x8001, 0x0400];
    let mut w = Vec::new();
    for r in 0..rows {
        for b in 0..blocks {
            let d = if r == 0 {
                0x3c00
            } else {
                scales[(r + b) % scales.len()]
            };
            w.extend(q8_0_block_bytes(d, |e| match (r, (e + b) % 4) {
                (0 | 1, _) => -128,
                (2, _) => 127,
                (_, 0) => -128,
                (_, 1) => 127,
                (_, 2) => -127,
                _ => (e as i8).wrapping_mul(37),
            }));
        }
    }
    let m = QMatrix::from_bytes(GgmlType::Q8_0, rows, cols, w).unwrap();
    let mut x = Vec::new();
    // -127 everywhere: codes -127, scale 1.
    x.extend(std::iter::repeat_n(-127.0f32, cols));
    // Signs opposite to row 2's and alternating: codes ±127.
    x.extend((0..cols).map(|e| if e % 2 == 0 { -3e38 } else { 3e38 }));
    x.extend((0..cols).map(|e| if e % 3 == 0 { 1e-40 } else { -2e-41 }));
    let mut odd = vec![0.5f32; cols];
    odd[40] = f32::INFINITY;
    odd[100] = f32::NAN;
    odd[200] = f32::NEG_INFINITY;
    x.extend(odd);
    x.extend((0..cols).map(|e| (e as f32 * 0.37).sin() * 60_000.0));
    let t_rows = x.len() / cols;
    let mut batch = QuantizedBatch::new();
    batch.quantize_from(&x, cols, GgmlType::Q8_0).unwrap();
    let mut out = vec![f32::NAN; t_rows * rows];
    m.matmul(&batch, &mut out);
    let mut acts = QuantizedActivations::new();
    let mut want = vec![0f32; rows];
    for (t, got) in out.chunks_exact(rows).enumerate() {
        acts.quantize_from(&x[t * cols..(t + 1) * cols], GgmlType::Q8_0)
            .unwrap();
        m.matvec(&acts, &mut want);
        // Equal bits, or NaN both (the sign and payload of a NaN are not
        // compared, as in the f32 test above).
        for (r, (g, w)) in got.iter().zip(&want).enumerate() {
            let same = if w.is_nan() {
                g.is_nan()
            } else {
                g.to_bits() == w.to_bits()
            };
            assert!(same, "activation row {t}, weight row {r}: {g} vs {w}");
        }
    }
    // Codes -128 times -127 with both scales 1: every block sum and every
    // partial sum is an integer below 2^24, so the product is exact.
    assert_eq!(out[0], (cols * 128 * 127) as f32);
    // A block of infinite activations makes the product non-finite; the
    // NaN block makes it NaN.
    assert!(out[3 * rows..4 * rows].iter().all(|v| v.is_nan()));
}

#[test]
fn batch_rows_are_the_rows_quantized_alone() {
    let mut rng = SplitMix64::new(23);
    let mut batch = QuantizedBatch::new();
    for ty in [
        GgmlType::Q4_1,
        GgmlType::Q8_0,
        GgmlType::Q4_K,
        GgmlType::F16,
    ] {
        let cols = 512;
        let x = batch_values(&mut rng, 5, cols);
        batch.quantize_from(&x, cols, ty).unwrap();
        assert_eq!(
            (batch.rows(), batch.cols(), Some(batch.format())),
            (5, cols, activation_type(ty))
        );
        assert!(!batch.is_empty());
        for t in 0..5 {
            let mut alone = QuantizedActivations::new();
            alone
                .quantize_from(&x[t * cols..(t + 1) * cols], ty)
                .unwrap();
            assert_eq!(batch.row(t).to_ggml_bytes(), alone.to_ggml_bytes(), "{ty}");
            assert_eq!(batch.row(t).to_f32(), alone.to_f32(), "{ty}");
        }
    }
}

#[test]
fn batch_buffers_are_reused_and_errors_keep_the_contents() {
    let mut batch = QuantizedBatch::new();
    batch
        .quantize_from(&[0.5; 8 * 576], 576, GgmlType::Q4_1)
        .unwrap();
    let buffers = |b: &QuantizedBatch| -> Vec<*const i16x16> {
        b.rows.iter().map(|r| r.pairs.as_ptr()).collect()
    };
    let before = buffers(&batch);
    // Fewer rows, then as many again: the same buffers.
    batch
        .quantize_from(&[0.25; 3 * 576], 576, GgmlType::Q4_1)
        .unwrap();
    assert_eq!(batch.rows(), 3);
    batch
        .quantize_from(&[127.0; 8 * 576], 576, GgmlType::Q4_1)
        .unwrap();
    assert_eq!(buffers(&batch), before);
    assert!((0..8).all(|t| batch.row(t).to_f32().iter().all(|&v| v == 127.0)));

    let errors = [
        (
            batch.quantize_from(&[0.0; 100], 0, GgmlType::F32),
            QuantError::NotWholeRows {
                cols: 0,
                values: 100,
            },
        ),
        (
            batch.quantize_from(&[0.0; 100], 64, GgmlType::Q8_0),
            QuantError::NotWholeRows {
                cols: 64,
                values: 100,
            },
        ),
        (
            batch.quantize_from(&[0.0; 96], 48, GgmlType::Q8_0),
            QuantError::NotWholeBlocks {
                ty: GgmlType::Q8_0,
                elements: 48,
            },
        ),
        (
            batch.quantize_from(&[0.0; 256], 256, GgmlType::Q2_K),
            QuantError::Unsupported(GgmlType::Q2_K),
        ),
    ];
    for (got, want) in errors {
        assert_eq!(got, Err(want));
        assert!(!want.to_string().is_empty());
    }
    assert_eq!(
        (batch.rows(), batch.cols(), batch.format()),
        (8, 576, GgmlType::Q8_1)
    );
    assert_eq!(batch.row(7).to_f32(), vec![127.0; 576]);

    batch.quantize_from(&[], 576, GgmlType::Q4_1).unwrap();
    assert!(batch.is_empty());
    let m = QMatrix::from_f32(GgmlType::Q4_1, 3, 576, &[0.5; 3 * 576]).unwrap();
    let mut out: [f32; 0] = [];
    m.matmul(&batch, &mut out);
}

#[test]
#[should_panic(expected = "cannot multiply")]
fn matmul_rejects_activations_quantized_for_another_type() {
    let m = QMatrix::from_f32(GgmlType::Q4_1, 1, 32, &[0.5; 32]).unwrap();
    let mut batch = QuantizedBatch::new();
    batch.quantize_from(&[0.5; 64], 32, GgmlType::Q8_0).unwrap();
    m.matmul(&batch, &mut [0.0; 2]);
}

#[test]
#[should_panic(expected = "output length")]
fn matmul_rejects_a_wrong_output_length() {
    let m = QMatrix::from_f32(GgmlType::Q8_0, 3, 32, &[0.5; 96]).unwrap();
    let mut batch = QuantizedBatch::new();
    batch.quantize_from(&[0.5; 64], 32, GgmlType::Q8_0).unwrap();
    m.matmul(&batch, &mut [0.0; 3]);
}

#[test]
#[should_panic(expected = "whole rows")]
fn matmul_f32_rejects_a_partial_activation_row() {
    let m = QMatrix::from_f32(GgmlType::Q8_0, 3, 32, &[0.5; 96]).unwrap();
    m.matmul_f32(&[0.5; 40], &mut [0.0; 3]);
}

#[test]
fn matmul_f32_propagates_non_finite_values_as_matvec_f32() {
    let mut rng = SplitMix64::new(24);
    for ty in [
        GgmlType::Q4_1,
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q5_1,
    ] {
        let (rows, blocks, t_rows) = (5, 11, 9);
        let bb = ty.block_bytes();
        let mut w = random_blocks(&mut rng, ty, rows * blocks);
        // An infinite scale in a whole group, a NaN in the partial one.
        w[(blocks + 2) * bb..][..2].copy_from_slice(&0xfc00u16.to_le_bytes());
        w[(3 * blocks + 9) * bb..][..2].copy_from_slice(&0x7e00u16.to_le_bytes());
        let cols = 32 * blocks;
        let m = QMatrix::from_bytes(ty, rows, cols, w).unwrap();
        let mut x = random_vec(&mut rng, t_rows * cols);
        x[2 * cols + 40] = f32::INFINITY;
        x[5 * cols + 300] = f32::NEG_INFINITY;
        x[7 * cols + 3] = f32::NAN;
        let mut out = vec![0f32; t_rows * rows];
        m.matmul_f32(&x, &mut out);
        let mut want = vec![0f32; rows];
        for (t, got) in out.chunks_exact(rows).enumerate() {
            m.matvec_f32(&x[t * cols..(t + 1) * cols], &mut want);
            for (r, (g, w)) in got.iter().zip(&want).enumerate() {
                let same = if w.is_nan() {
                    g.is_nan()
                } else {
                    g.to_bits() == w.to_bits()
                };
                assert!(same, "{ty} row {t}, weight row {r}: {g} vs {w}");
            }
            assert!(got[3].is_nan(), "{ty} row {t}: {got:?}");
        }
        assert!(out[7 * rows..8 * rows].iter().all(|v| v.is_nan()));
        assert!(out[2 * rows..3 * rows].iter().any(|v| v.is_infinite()));
    }
}
