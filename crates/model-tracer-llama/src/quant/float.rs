//! Conversions between `f32` and the 16-bit float formats stored in GGUF files.
//!
//! Written by hand rather than taken from a crate so that the rounding rules are
//! visibly the ones ggml and numpy use: round to nearest, ties to even.

/// 2^112: rescales an f16 exponent/mantissa pair placed in the f32 bit layout.
pub(super) const F16_REBIAS: f32 = f32::from_bits(0x7780_0000);

/// Converts IEEE binary16 bits to the `f32` of the same value.
///
/// Exact for every input: subnormals, infinities and signed zeros map to the
/// same value, and a NaN keeps its sign and payload bits.
#[inline]
pub fn f16_to_f32(bits: u16) -> f32 {
    let sign = u32::from(bits & 0x8000) << 16;
    let magnitude = u32::from(bits & 0x7fff);
    if magnitude >= 0x7c00 {
        return f32::from_bits(sign | 0x7f80_0000 | ((magnitude & 0x03ff) << 13));
    }
    // Placing the 15 magnitude bits where f32 keeps its exponent and mantissa
    // gives the right significand with an exponent 112 too small; one exact
    // multiplication fixes that for normal and subnormal inputs alike.
    let value = f32::from_bits(magnitude << 13) * F16_REBIAS;
    f32::from_bits(sign | value.to_bits())
}

/// Converts an `f32` to IEEE binary16 bits, rounding to nearest with ties to even.
///
/// Values of magnitude 65520 and above become infinity, values too small for
/// the smallest f16 subnormal become a signed zero, and a NaN stays a NaN with
/// the top bits of its payload (numpy's rule).
#[inline]
pub fn f32_to_f16(value: f32) -> u16 {
    let bits = value.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    let magnitude = bits & 0x7fff_ffff;
    if magnitude > 0x7f80_0000 {
        let payload = ((magnitude >> 13) & 0x03ff) as u16;
        return sign | 0x7c00 | payload.max(1);
    }
    if magnitude >= 0x477f_f000 {
        return sign | 0x7c00;
    }
    if magnitude < 0x3880_0000 {
        // Below the smallest normal f16 the result is a multiple of 2^-24;
        // scaling by 2^24 is exact, so rounding the scaled value is the answer.
        // A result of 1024 is the smallest normal number, encoded the same way.
        let scaled = f32::from_bits(magnitude) * 16_777_216.0;
        return sign | scaled.round_ties_even() as u16;
    }
    let rebased = magnitude - (112 << 23);
    let rounded = rebased + 0x0fff + ((rebased >> 13) & 1);
    sign | (rounded >> 13) as u16
}

/// Converts bfloat16 bits to the `f32` of the same value (exact).
#[inline]
pub fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

/// Converts an `f32` to bfloat16 bits as ggml does: round to nearest with ties
/// to even, and a NaN becomes a quiet NaN that keeps its sign and top payload bits.
#[inline]
pub fn f32_to_bf16(value: f32) -> u16 {
    let bits = value.to_bits();
    if bits & 0x7fff_ffff > 0x7f80_0000 {
        return ((bits >> 16) | 0x0040) as u16;
    }
    ((u64::from(bits) + 0x7fff + u64::from((bits >> 16) & 1)) >> 16) as u16
}

/// The little-endian f32 at the start of `b`.
#[inline(always)]
pub(super) fn decode_f32(b: &[u8]) -> f32 {
    f32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// The little-endian f16 at the start of `b`, as f32.
#[inline(always)]
pub(super) fn decode_f16(b: &[u8]) -> f32 {
    f16_to_f32(u16::from_le_bytes([b[0], b[1]]))
}

/// The little-endian bf16 at the start of `b`, as f32.
#[inline(always)]
pub(super) fn decode_bf16(b: &[u8]) -> f32 {
    bf16_to_f32(u16::from_le_bytes([b[0], b[1]]))
}

#[cfg(test)]
mod tests {
    use model_tracer_test_support::SplitMix64;

    use super::*;

    /// The value an f16 bit pattern denotes, computed from the definition.
    fn f16_by_definition(bits: u16) -> f64 {
        let sign = if bits & 0x8000 != 0 { -1.0 } else { 1.0 };
        let exponent = i32::from((bits >> 10) & 0x1f);
        let mantissa = f64::from(bits & 0x3ff);
        match exponent {
            0 => sign * mantissa * 2f64.powi(-24),
            31 if mantissa == 0.0 => sign * f64::INFINITY,
            31 => f64::NAN,
            e => sign * (1.0 + mantissa / 1024.0) * 2f64.powi(e - 15),
        }
    }

    #[test]
    fn every_f16_converts_to_its_value() {
        for bits in 0..=u16::MAX {
            let got = f16_to_f32(bits);
            let want = f16_by_definition(bits);
            if want.is_nan() {
                assert!(got.is_nan(), "{bits:#06x}");
                assert_eq!(
                    got.to_bits() >> 31,
                    u32::from(bits >> 15),
                    "{bits:#06x} sign"
                );
                assert_eq!(
                    (got.to_bits() >> 13) & 0x3ff,
                    u32::from(bits & 0x3ff),
                    "{bits:#06x} payload"
                );
            } else {
                assert_eq!(f64::from(got), want, "{bits:#06x}");
                assert_eq!(
                    got.is_sign_negative(),
                    bits & 0x8000 != 0,
                    "{bits:#06x} sign"
                );
            }
        }
    }

    #[test]
    fn f16_round_trips_through_f32() {
        for bits in 0..=u16::MAX {
            let back = f32_to_f16(f16_to_f32(bits));
            if f16_by_definition(bits).is_nan() {
                assert_eq!(back & 0x7c00, 0x7c00, "{bits:#06x}");
                assert_ne!(back & 0x03ff, 0, "{bits:#06x}");
            } else {
                assert_eq!(back, bits, "{bits:#06x}");
            }
        }
    }

    /// Nearest f16 by brute force over all finite f16 values of the same sign,
    /// ties to the even bit pattern, overflow past 65520 to infinity.
    fn nearest_f16(value: f32) -> u16 {
        let v = f64::from(value);
        if v.abs() >= 65520.0 {
            return if v < 0.0 { 0xfc00 } else { 0x7c00 };
        }
        let sign: u16 = if value.is_sign_negative() { 0x8000 } else { 0 };
        let mut best = sign;
        let mut best_err = f64::INFINITY;
        for magnitude in 0..0x7c00u16 {
            let candidate = sign | magnitude;
            let err = (f16_by_definition(candidate) - v).abs();
            if err < best_err || (err == best_err && candidate & 1 == 0) {
                best = candidate;
                best_err = err;
            }
        }
        best
    }

    #[test]
    fn f32_to_f16_rounds_to_nearest_even() {
        let mut rng = SplitMix64::new(0x1234_5678_9abc_def0);
        let mut samples = vec![
            0.0f32,
            -0.0,
            1.0,
            65504.0,
            65519.99,
            65520.0,
            -70000.0,
            6e-8,
            2.9802322e-8,
            2.98e-8,
            1.0 + 1.0 / 2048.0,
            1.0 + 3.0 / 2048.0,
            6.1035156e-5,
            6.1e-5,
            1e-10,
        ];
        for _ in 0..300 {
            let bits = rng.next_u64();
            let exponent = ((bits >> 33) % 40) as i32 - 28;
            let mantissa = ((bits >> 11) & 0xffff) as f32 / 65536.0 + 1.0;
            let sign = if bits & 1 == 0 { 1.0 } else { -1.0 };
            samples.push(sign * mantissa * 2f32.powi(exponent));
        }
        for value in samples {
            assert_eq!(f32_to_f16(value), nearest_f16(value), "{value:e}");
        }
        assert_eq!(f32_to_f16(f32::INFINITY), 0x7c00);
        assert_eq!(f32_to_f16(f32::NEG_INFINITY), 0xfc00);
        assert!(f16_to_f32(f32_to_f16(f32::NAN)).is_nan());
    }

    #[test]
    fn bf16_rounds_to_nearest_even_and_keeps_nan_quiet() {
        assert_eq!(f32_to_bf16(1.0), 0x3f80);
        assert_eq!(
            f32_to_bf16(f32::from_bits(0x3f80_8000)),
            0x3f80,
            "tie to even (down)"
        );
        assert_eq!(
            f32_to_bf16(f32::from_bits(0x3f81_8000)),
            0x3f82,
            "tie to even (up)"
        );
        assert_eq!(f32_to_bf16(f32::from_bits(0x3f80_8001)), 0x3f81);
        assert_eq!(
            f32_to_bf16(f32::from_bits(0x7f7f_ffff)),
            0x7f80,
            "overflow to infinity"
        );
        assert_eq!(
            f32_to_bf16(f32::from_bits(0x7f80_0001)),
            0x7fc0,
            "signalling NaN made quiet"
        );
        assert_eq!(f32_to_bf16(f32::from_bits(0xff80_0001)), 0xffc0);
        for bits in 0..=u16::MAX {
            let value = bf16_to_f32(bits);
            if !value.is_nan() {
                assert_eq!(f32_to_bf16(value), bits);
            }
        }
    }
}
