//! Element types of GGUF tensors and their block layouts.

use std::fmt;

/// The element type of a tensor stored in a GGUF file (ggml's `ggml_type`).
///
/// Quantized types store elements in fixed-size blocks; a row's length must be
/// a multiple of [`GgmlType::block_len`].
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    /// 32-bit IEEE float.
    F32,
    /// 16-bit IEEE float.
    F16,
    /// bfloat16.
    BF16,
    /// 32 weights: f16 scale `d`, 16 bytes of 4-bit values; `w = d * (q - 8)`.
    Q4_0,
    /// 32 weights: f16 scale `d`, f16 minimum `m`, 16 bytes of 4-bit values; `w = d * q + m`.
    Q4_1,
    /// 32 weights: f16 scale, 4 bytes of fifth bits, 16 bytes of low nibbles.
    Q5_0,
    /// 32 weights: f16 scale and minimum, 4 bytes of fifth bits, 16 bytes of low nibbles.
    Q5_1,
    /// 32 weights: f16 scale `d`, 32 signed bytes; `w = d * q`.
    Q8_0,
    /// 32 weights: f16 scale, f16 `d * sum(q)`, 32 signed bytes (activations only).
    Q8_1,
    /// 256-weight super-block, 2-bit values.
    Q2_K,
    /// 256-weight super-block, 3-bit values.
    Q3_K,
    /// 256-weight super-block, 4-bit values with 6-bit sub-block scales and minimums.
    Q4_K,
    /// 256-weight super-block, 5-bit values.
    Q5_K,
    /// 256-weight super-block, 6-bit values with 8-bit sub-block scales.
    Q6_K,
    /// 256-weight super-block of 8-bit values (activations only).
    Q8_K,
}

impl GgmlType {
    /// Decodes ggml's numeric type id, as stored in a GGUF tensor header.
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            7 => Self::Q5_1,
            8 => Self::Q8_0,
            9 => Self::Q8_1,
            10 => Self::Q2_K,
            11 => Self::Q3_K,
            12 => Self::Q4_K,
            13 => Self::Q5_K,
            14 => Self::Q6_K,
            15 => Self::Q8_K,
            30 => Self::BF16,
            _ => return None,
        })
    }

    /// ggml's numeric type id.
    pub fn id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q5_0 => 6,
            Self::Q5_1 => 7,
            Self::Q8_0 => 8,
            Self::Q8_1 => 9,
            Self::Q2_K => 10,
            Self::Q3_K => 11,
            Self::Q4_K => 12,
            Self::Q5_K => 13,
            Self::Q6_K => 14,
            Self::Q8_K => 15,
            Self::BF16 => 30,
        }
    }

    /// Elements per block (1 for plain float types).
    pub fn block_len(self) -> usize {
        match self {
            Self::F32 | Self::F16 | Self::BF16 => 1,
            Self::Q4_0 | Self::Q4_1 | Self::Q5_0 | Self::Q5_1 | Self::Q8_0 | Self::Q8_1 => 32,
            Self::Q2_K | Self::Q3_K | Self::Q4_K | Self::Q5_K | Self::Q6_K | Self::Q8_K => 256,
        }
    }

    /// Bytes per block.
    pub const fn block_bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q5_0 => 22,
            Self::Q5_1 => 24,
            Self::Q8_0 => 34,
            Self::Q8_1 => 36,
            Self::Q2_K => 84,
            Self::Q3_K => 110,
            Self::Q4_K => 144,
            Self::Q5_K => 176,
            Self::Q6_K => 210,
            Self::Q8_K => 292,
        }
    }

    /// Bytes taken by `n` elements, or `None` when `n` is not a whole number
    /// of blocks or the size overflows `usize`.
    pub fn bytes_for(self, n: usize) -> Option<usize> {
        if n % self.block_len() != 0 {
            return None;
        }
        (n / self.block_len()).checked_mul(self.block_bytes())
    }

    /// ggml's name of the type (`"Q4_1"`, `"F32"`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::BF16 => "BF16",
            Self::Q4_0 => "Q4_0",
            Self::Q4_1 => "Q4_1",
            Self::Q5_0 => "Q5_0",
            Self::Q5_1 => "Q5_1",
            Self::Q8_0 => "Q8_0",
            Self::Q8_1 => "Q8_1",
            Self::Q2_K => "Q2_K",
            Self::Q3_K => "Q3_K",
            Self::Q4_K => "Q4_K",
            Self::Q5_K => "Q5_K",
            Self::Q6_K => "Q6_K",
            Self::Q8_K => "Q8_K",
        }
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_unknown_ids_are_rejected() {
        for id in 0..64 {
            if let Some(t) = GgmlType::from_id(id) {
                assert_eq!(t.id(), id);
            }
        }
        assert_eq!(GgmlType::from_id(4), None, "Q4_2 was removed from ggml");
        assert_eq!(GgmlType::from_id(u32::MAX), None);
    }

    #[test]
    fn byte_sizes_match_ggml_block_layouts() {
        assert_eq!(GgmlType::Q4_1.bytes_for(576), Some(18 * 20));
        assert_eq!(GgmlType::Q8_0.bytes_for(64), Some(68));
        assert_eq!(GgmlType::Q4_K.bytes_for(512), Some(288));
        assert_eq!(GgmlType::Q4_0.bytes_for(33), None);
        assert_eq!(GgmlType::F32.bytes_for(usize::MAX), None);
    }
}
