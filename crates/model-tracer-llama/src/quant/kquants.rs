//! ggml's reference quantizers for the K-quant super-blocks Q4_K and Q6_K
//! (`quantize_row_q4_K_ref`, `quantize_row_q6_K_ref`).
//!
//! Both search for good sub-block scales by trying a few candidate scales and
//! keeping the one with the smallest weighted error, then quantize the
//! sub-block scales themselves (6 bits for Q4_K, 8 bits for Q6_K) and
//! requantize the values against the rounded scales. Every f32 operation is
//! evaluated separately in the order ggml's C source writes it (no fused
//! multiply-add), which is what makes the bytes reproducible.

use super::blocks::{k4_scale_min, nearest_int};
use super::float::{f16_to_f32, f32_to_f16};

/// Below this magnitude ggml treats a group as all zeros.
const GROUP_MAX_EPS: f32 = 1e-15;

/// ggml's `make_qkx2_quants` with squared error: asymmetric codes `0..=nmax`
/// for `x` with per-element `weights`. Returns `(scale, minimum)` where the
/// value of code `l` is `scale * l - minimum`, and leaves the codes in `codes`.
fn fit_scale_and_min(
    nmax: i32,
    x: &[f32],
    weights: &[f32],
    codes: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
) -> (f32, f32) {
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for (&v, &w) in x.iter().zip(weights).skip(1) {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
        sum_w += w;
        sum_x += w * v;
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        codes.fill(0);
        return (0.0, -min);
    }
    let nmax_f = nmax as f32;
    let mut iscale = nmax_f / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0.0f32;
    for ((c, &v), &w) in codes.iter_mut().zip(x).zip(weights) {
        let l = nearest_int(iscale * (v - min)).clamp(0, nmax);
        *c = l as u8;
        let diff = scale * f32::from(*c) + min - v;
        best_error += w * (diff * diff);
    }
    let mut trial = [0u8; 32];
    let trial = &mut trial[..x.len()];
    for step in 0..=nstep {
        iscale = (rmin + rdelta * step as f32 + nmax_f) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0.0f32, 0.0f32, 0.0f32);
        for ((t, &v), &w) in trial.iter_mut().zip(x).zip(weights) {
            let l = nearest_int(iscale * (v - min)).clamp(0, nmax);
            *t = l as u8;
            let lf = l as f32;
            sum_l += w * lf;
            sum_l2 += w * lf * lf;
            sum_xl += w * lf * v;
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut error = 0.0f32;
            for ((&t, &v), &w) in trial.iter().zip(x).zip(weights) {
                let diff = this_scale * f32::from(t) + this_min - v;
                error += w * (diff * diff);
            }
            if error < best_error {
                codes.copy_from_slice(trial);
                best_error = error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// One Q4_K super-block (256 values, 144 bytes).
pub(super) fn quantize_q4_k(values: &[f32], block: &mut [u8]) {
    let mut codes = [0u8; 256];
    let mut scales = [0f32; 8];
    let mut mins = [0f32; 8];
    let mut weights = [0f32; 32];
    let mut max_scale = 0.0f32;
    let mut max_min = 0.0f32;
    for (j, (x, codes)) in values
        .chunks_exact(32)
        .zip(codes.chunks_exact_mut(32))
        .enumerate()
    {
        let sum_x2: f32 = x.iter().fold(0.0, |acc, v| acc + v * v);
        let av_x = (sum_x2 / 32.0).sqrt();
        for (w, v) in weights.iter_mut().zip(x) {
            *w = av_x + v.abs();
        }
        let (scale, min) = fit_scale_and_min(15, x, &weights, codes, -1.0, 0.1, 20);
        scales[j] = scale;
        mins[j] = min;
        if scale > max_scale {
            max_scale = scale;
        }
        if min > max_min {
            max_min = min;
        }
    }
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let packed = &mut block[4..16];
    packed.fill(0);
    for j in 0..8 {
        // C stores the rounded value in a uint8_t before capping it at 63.
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            packed[j] = ls;
            packed[j + 4] = lm;
        } else {
            packed[j + 4] = (ls & 0x0f) | ((lm & 0x0f) << 4);
            packed[j - 4] |= (ls >> 4) << 6;
            packed[j] |= (lm >> 4) << 6;
        }
    }
    let d_bits = f32_to_f16(max_scale / 63.0);
    let dmin_bits = f32_to_f16(max_min / 63.0);
    block[0..2].copy_from_slice(&d_bits.to_le_bytes());
    block[2..4].copy_from_slice(&dmin_bits.to_le_bytes());
    let (d_all, dmin_all) = (f16_to_f32(d_bits), f16_to_f32(dmin_bits));
    for (j, (x, codes)) in values
        .chunks_exact(32)
        .zip(codes.chunks_exact_mut(32))
        .enumerate()
    {
        let (sc, m) = k4_scale_min(&block[4..16], j);
        let d = d_all * f32::from(sc);
        if d == 0.0 {
            // ggml keeps the codes of the scale search for such sub-blocks.
            continue;
        }
        let dm = dmin_all * f32::from(m);
        for (c, &v) in codes.iter_mut().zip(x) {
            *c = nearest_int((v + dm) / d).clamp(0, 15) as u8;
        }
    }
    for (qs, codes) in block[16..144]
        .chunks_exact_mut(32)
        .zip(codes.chunks_exact(64))
    {
        for (l, q) in qs.iter_mut().enumerate() {
            *q = codes[l] | (codes[l + 32] << 4);
        }
    }
}

/// ggml's `make_qx_quants` with `rmse_type` 1 (weights x²) and no
/// importance weights: symmetric codes `-nmax..nmax-1`, stored offset by
/// `nmax`. Returns the scale.
fn fit_symmetric_scale(nmax: i32, x: &[f32], codes: &mut [i8]) -> f32 {
    let mut max = 0.0f32;
    let mut amax = 0.0f32;
    for &v in x {
        let a = v.abs();
        if a > amax {
            amax = a;
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        codes.fill(0);
        return 0.0;
    }
    let nmax_f = nmax as f32;
    let mut iscale = -nmax_f / max;
    let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
    for (c, &v) in codes.iter_mut().zip(x) {
        let l = nearest_int(iscale * v).clamp(-nmax, nmax - 1);
        *c = (l + nmax) as i8;
        let w = v * v;
        let lf = l as f32;
        sumlx += w * v * lf;
        suml2 += w * lf * lf;
    }
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for step in -9..=9 {
        if step == 0 {
            continue;
        }
        iscale = -(nmax_f + 0.1 * step as f32) / max;
        sumlx = 0.0;
        suml2 = 0.0;
        for &v in x {
            let l = nearest_int(iscale * v).clamp(-nmax, nmax - 1) as f32;
            let w = v * v;
            sumlx += w * v * l;
            suml2 += w * l * l;
        }
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for (c, &v) in codes.iter_mut().zip(x) {
                *c = (nmax + nearest_int(iscale * v).clamp(-nmax, nmax - 1)) as i8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// One Q6_K super-block (256 values, 210 bytes).
pub(super) fn quantize_q6_k(values: &[f32], block: &mut [u8]) {
    let mut codes = [0i8; 256];
    let mut scales = [0f32; 16];
    let mut max_scale = 0.0f32;
    let mut max_abs_scale = 0.0f32;
    for (ib, (x, codes)) in values
        .chunks_exact(16)
        .zip(codes.chunks_exact_mut(16))
        .enumerate()
    {
        let scale = fit_symmetric_scale(32, x, codes);
        scales[ib] = scale;
        if scale.abs() > max_abs_scale {
            max_abs_scale = scale.abs();
            max_scale = scale;
        }
    }
    if max_abs_scale < GROUP_MAX_EPS {
        block.fill(0);
        return;
    }
    let iscale = -128.0 / max_scale;
    let d_bits = f32_to_f16(1.0 / iscale);
    block[208..210].copy_from_slice(&d_bits.to_le_bytes());
    let d_all = f16_to_f32(d_bits);
    for (ib, &scale) in scales.iter().enumerate() {
        block[192 + ib] = nearest_int(iscale * scale).min(127) as i8 as u8;
    }
    for (j, (x, codes)) in values
        .chunks_exact(16)
        .zip(codes.chunks_exact_mut(16))
        .enumerate()
    {
        let d = d_all * f32::from(block[192 + j] as i8);
        if d == 0.0 {
            continue;
        }
        for (c, &v) in codes.iter_mut().zip(x) {
            *c = (nearest_int(v / d).clamp(-32, 31) + 32) as i8;
        }
    }
    let (low, rest) = block.split_at_mut(128);
    let high = &mut rest[..64];
    for half in 0..2 {
        let codes = &codes[128 * half..128 * half + 128];
        let ql = &mut low[64 * half..64 * half + 64];
        let qh = &mut high[32 * half..32 * half + 32];
        for l in 0..32 {
            let q = [codes[l], codes[l + 32], codes[l + 64], codes[l + 96]].map(|c| c as u8);
            ql[l] = (q[0] & 0x0f) | ((q[2] & 0x0f) << 4);
            ql[l + 32] = (q[1] & 0x0f) | ((q[3] & 0x0f) << 4);
            qh[l] = (q[0] >> 4) | ((q[1] >> 4) << 2) | ((q[2] >> 4) << 4) | ((q[3] >> 4) << 6);
        }
    }
}
