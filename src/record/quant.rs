//! Quantization error of a matmul ("brick") against its f32 reference.

use std::fmt;
use std::ops::Deref;

use crate::stats::{self, ErrorMetrics};

/// Cosine similarity above which quantization is acceptable (llama.cpp's
/// Q4_K validation threshold).
pub const ACCEPTABLE_COSINE: f32 = 0.995;
/// Cosine similarity above which quantization is a warning, not critical.
pub const WARNING_COSINE: f32 = 0.99;

/// Storage format of a weight tensor.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum QuantType {
    /// 32-bit float.
    F32,
    /// 16-bit float.
    F16,
    /// bfloat16.
    BF16,
    /// 8-bit, blocks of 32 with an f16 scale.
    Q8_0,
    /// 6-bit k-quant.
    Q6_K,
    /// 5-bit k-quant.
    Q5_K,
    /// 5-bit, blocks of 32 with scale and minimum.
    Q5_1,
    /// 5-bit, blocks of 32 with a scale.
    Q5_0,
    /// 4-bit k-quant.
    Q4_K,
    /// 4-bit, blocks of 32 with scale and minimum.
    Q4_1,
    /// 4-bit, blocks of 32 with a scale.
    Q4_0,
    /// 3-bit k-quant.
    Q3_K,
    /// 2-bit k-quant.
    Q2_K,
}

impl QuantType {
    /// Every type, from most to fewest bits per weight.
    pub const ALL: [QuantType; 13] = [
        QuantType::F32,
        QuantType::F16,
        QuantType::BF16,
        QuantType::Q8_0,
        QuantType::Q6_K,
        QuantType::Q5_1,
        QuantType::Q5_K,
        QuantType::Q5_0,
        QuantType::Q4_1,
        QuantType::Q4_K,
        QuantType::Q4_0,
        QuantType::Q3_K,
        QuantType::Q2_K,
    ];

    /// Storage bits per weight, block scales and minimums included.
    pub fn bits_per_element(self) -> f32 {
        match self {
            QuantType::F32 => 32.0,
            QuantType::F16 | QuantType::BF16 => 16.0,
            QuantType::Q8_0 => 8.5,
            QuantType::Q6_K => 6.5625,
            QuantType::Q5_K => 5.5,
            QuantType::Q5_1 => 6.0,
            QuantType::Q5_0 => 5.5,
            QuantType::Q4_K => 4.5,
            QuantType::Q4_1 => 5.0,
            QuantType::Q4_0 => 4.5,
            QuantType::Q3_K => 3.4375,
            QuantType::Q2_K => 2.625,
        }
    }

    /// Size reduction against F32 (`32 / bits_per_element`).
    pub fn compression_ratio(self) -> f32 {
        32.0 / self.bits_per_element()
    }

    /// ggml's name (`"Q4_K"`), the one serde writes.
    pub fn name(self) -> &'static str {
        match self {
            QuantType::F32 => "F32",
            QuantType::F16 => "F16",
            QuantType::BF16 => "BF16",
            QuantType::Q8_0 => "Q8_0",
            QuantType::Q6_K => "Q6_K",
            QuantType::Q5_K => "Q5_K",
            QuantType::Q5_1 => "Q5_1",
            QuantType::Q5_0 => "Q5_0",
            QuantType::Q4_K => "Q4_K",
            QuantType::Q4_1 => "Q4_1",
            QuantType::Q4_0 => "Q4_0",
            QuantType::Q3_K => "Q3_K",
            QuantType::Q2_K => "Q2_K",
        }
    }
}

impl fmt::Display for QuantType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A matmul of the decoder whose quantization error is traced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum BrickId {
    /// Token embedding lookup.
    Embedding,
    /// Query, key and value projections (one result: `[q | k | v]`).
    QkvProjection,
    /// Attention output projection.
    AttentionOutput,
    /// Feed-forward gate projection.
    FfnGate,
    /// Feed-forward up projection.
    FfnUp,
    /// Feed-forward down projection.
    FfnDown,
    /// Output (unembedding) projection to logits.
    LmHead,
}

impl BrickId {
    /// Every brick, in forward order.
    pub const ALL: [BrickId; 7] = [
        BrickId::Embedding,
        BrickId::QkvProjection,
        BrickId::AttentionOutput,
        BrickId::FfnGate,
        BrickId::FfnUp,
        BrickId::FfnDown,
        BrickId::LmHead,
    ];

    /// Snake-case name (`"qkv_projection"`), the one serde writes.
    pub fn name(self) -> &'static str {
        match self {
            BrickId::Embedding => "embedding",
            BrickId::QkvProjection => "qkv_projection",
            BrickId::AttentionOutput => "attention_output",
            BrickId::FfnGate => "ffn_gate",
            BrickId::FfnUp => "ffn_up",
            BrickId::FfnDown => "ffn_down",
            BrickId::LmHead => "lm_head",
        }
    }
}

impl fmt::Display for BrickId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why an error trace could not be computed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QuantTraceError {
    /// The quantized result and the reference differ in length.
    LengthMismatch {
        /// Length of the quantized result.
        quantized: usize,
        /// Length of the reference.
        reference: usize,
    },
}

impl fmt::Display for QuantTraceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QuantTraceError::LengthMismatch {
                quantized,
                reference,
            } => write!(
                f,
                "quantized result has {quantized} values but the reference has {reference}"
            ),
        }
    }
}

impl std::error::Error for QuantTraceError {}

/// How bad a quantization error is, by cosine similarity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum Severity {
    /// Cosine > 0.995.
    Acceptable,
    /// 0.99 < cosine <= 0.995.
    Warning,
    /// Cosine <= 0.99, or not a number.
    Critical,
}

impl Severity {
    /// Every class, from best to worst.
    pub const ALL: [Severity; 3] = [Severity::Acceptable, Severity::Warning, Severity::Critical];

    /// Snake-case name (`"critical"`), the one serde writes.
    pub fn name(self) -> &'static str {
        match self {
            Severity::Acceptable => "acceptable",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Error of one brick's quantized output against its f32 reference.
///
/// The metrics are read through the trace (`trace.cosine_similarity`): it
/// dereferences to its [`ErrorMetrics`]. Serialized, they are fields of the
/// trace itself, as flat as a row of the JSON Lines schema.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct QuantizationErrorTrace {
    /// The matmul.
    pub brick: BrickId,
    /// Layer index (0 for bricks outside layers).
    pub layer_idx: usize,
    /// Weight format of the quantized path.
    pub quant_type: QuantType,
    /// MSE, largest absolute error, cosine similarity (1 when both are
    /// zero; NaN, like every metric, when either holds a non-finite value)
    /// and SNR in dB (+inf when identical).
    #[cfg_attr(feature = "serde", serde(flatten))]
    pub metrics: ErrorMetrics,
    /// Compared elements.
    pub element_count: usize,
}

impl QuantizationErrorTrace {
    /// Compares `quantized` with `reference` in one pass.
    ///
    /// # Panics
    ///
    /// Panics if the two slices differ in length; see
    /// [`try_compute`](Self::try_compute) for a fallible version.
    pub fn compute(
        brick: BrickId,
        layer_idx: usize,
        quantized: &[f32],
        reference: &[f32],
        quant_type: QuantType,
    ) -> Self {
        match Self::try_compute(brick, layer_idx, quantized, reference, quant_type) {
            Ok(t) => t,
            Err(e) => panic!("QuantizationErrorTrace::compute({brick}, layer {layer_idx}): {e}"),
        }
    }

    /// Like [`compute`](Self::compute), returning an error on mismatched lengths.
    pub fn try_compute(
        brick: BrickId,
        layer_idx: usize,
        quantized: &[f32],
        reference: &[f32],
        quant_type: QuantType,
    ) -> Result<Self, QuantTraceError> {
        if quantized.len() != reference.len() {
            return Err(QuantTraceError::LengthMismatch {
                quantized: quantized.len(),
                reference: reference.len(),
            });
        }
        Ok(Self {
            brick,
            layer_idx,
            quant_type,
            metrics: stats::error_metrics(quantized, reference),
            element_count: quantized.len(),
        })
    }

    /// Cosine above 0.995.
    pub fn is_acceptable(&self) -> bool {
        self.severity() == Severity::Acceptable
    }

    /// Cosine in (0.99, 0.995].
    pub fn is_warning(&self) -> bool {
        self.severity() == Severity::Warning
    }

    /// Cosine at most 0.99, or NaN.
    pub fn is_critical(&self) -> bool {
        self.severity() == Severity::Critical
    }

    /// The severity class of the cosine similarity.
    pub fn severity(&self) -> Severity {
        let c = self.cosine_similarity;
        if c > ACCEPTABLE_COSINE {
            Severity::Acceptable
        } else if c > WARNING_COSINE {
            Severity::Warning
        } else {
            Severity::Critical
        }
    }

    /// Orders traces from best to worst: by cosine similarity, NaN worst.
    pub(crate) fn badness(&self) -> f32 {
        if self.cosine_similarity.is_nan() {
            f32::INFINITY
        } else {
            -self.cosine_similarity
        }
    }
}

impl Deref for QuantizationErrorTrace {
    type Target = ErrorMetrics;

    fn deref(&self) -> &ErrorMetrics {
        &self.metrics
    }
}

/// The quantization errors measured in one forward pass (or one what-if
/// comparison), with the effect on the output distribution when known.
#[derive(Debug, Clone, PartialEq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct ModelQuantizationError {
    /// One entry per measured brick and layer.
    pub traces: Vec<QuantizationErrorTrace>,
    /// `KL(reference || quantized)` of the output token distributions, in
    /// nats, when both logit vectors were compared.
    #[cfg_attr(feature = "serde", serde(with = "crate::serde_float::option"))]
    pub kl_divergence: Option<f32>,
    /// Whether the quantized and reference logits pick the same top token.
    pub top1_agrees: Option<bool>,
}

impl ModelQuantizationError {
    /// Adds a brick's trace.
    pub fn add(&mut self, trace: QuantizationErrorTrace) {
        self.traces.push(trace);
    }

    /// Compares the output logits of the quantized and reference paths:
    /// sets the KL divergence and whether their top-1 tokens agree.
    pub fn compare_logits(&mut self, quantized: &[f32], reference: &[f32]) {
        self.kl_divergence = Some(stats::log_softmax_kl(reference, quantized));
        self.top1_agrees = Some(stats::argmax(quantized) == stats::argmax(reference));
    }

    /// The trace with the lowest cosine similarity (NaN counts as lowest).
    pub fn worst_brick(&self) -> Option<&QuantizationErrorTrace> {
        self.traces
            .iter()
            .max_by(|a, b| a.badness().total_cmp(&b.badness()))
    }

    /// Mean cosine similarity over the traces (`None` when empty).
    pub fn mean_cosine(&self) -> Option<f32> {
        if self.traces.is_empty() {
            return None;
        }
        let sum: f64 = self.traces.iter().map(|t| t.cosine_similarity as f64).sum();
        Some((sum / self.traces.len() as f64) as f32)
    }

    /// Whether any brick is critical.
    pub fn has_critical(&self) -> bool {
        self.traces.iter().any(QuantizationErrorTrace::is_critical)
    }

    /// Empties the record, keeping its allocation.
    pub fn clear(&mut self) {
        self.traces.clear();
        self.kl_divergence = None;
        self.top1_agrees = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trace(q: &[f32], r: &[f32]) -> QuantizationErrorTrace {
        QuantizationErrorTrace::compute(BrickId::QkvProjection, 5, q, r, QuantType::Q4_K)
    }

    #[test]
    fn test_f258_cosine_similarity_range() {
        let r = [1.0, 2.0, 3.0, 4.0];
        for q in [
            [1.02, 1.98, 3.05, 3.95],
            [-1.0, -2.0, -3.0, -4.0],
            [4.0, -3.0, 2.0, -1.0],
            [0.0, 0.0, 0.0, 1e-30],
            [1e30, 1e30, -1e30, 1e30],
        ] {
            let c = trace(&q, &r).cosine_similarity;
            assert!((-1.0..=1.0).contains(&c), "{q:?}: {c}");
        }
        assert_eq!(trace(&r, &r).cosine_similarity, 1.0);
        assert_eq!(trace(&[-1.0, -2.0, -3.0, -4.0], &r).cosine_similarity, -1.0);
    }

    #[test]
    fn seed_example_is_acceptable_with_positive_snr() {
        let t = trace(&[1.02, 1.98, 3.05, 3.95], &[1.0, 2.0, 3.0, 4.0]);
        assert!((t.mse - 0.001_45).abs() < 1e-6, "{}", t.mse);
        assert!((t.max_abs_error - 0.05).abs() < 1e-5);
        assert!(t.is_acceptable());
        assert!((t.snr_db - 37.137).abs() < 0.01, "{}", t.snr_db);
    }

    #[test]
    fn severity_thresholds() {
        let mut t = trace(&[1.0], &[1.0]);
        for (c, s) in [
            (0.996, Severity::Acceptable),
            (0.995, Severity::Warning),
            (0.991, Severity::Warning),
            (0.99, Severity::Critical),
            (f32::NAN, Severity::Critical),
        ] {
            t.metrics.cosine_similarity = c;
            assert_eq!(t.severity(), s, "{c}");
        }
    }

    #[test]
    fn zero_vectors_and_mismatch_have_defined_results() {
        assert_eq!(trace(&[0.0; 3], &[0.0; 3]).cosine_similarity, 1.0);
        assert_eq!(trace(&[0.0; 3], &[1.0; 3]).cosine_similarity, 0.0);
        let e = QuantizationErrorTrace::try_compute(
            BrickId::LmHead,
            0,
            &[1.0],
            &[1.0, 2.0],
            QuantType::Q8_0,
        );
        assert_eq!(
            e,
            Err(QuantTraceError::LengthMismatch {
                quantized: 1,
                reference: 2
            })
        );
        assert!(e.unwrap_err().to_string().contains("1 values"));
        assert!(trace(&[f32::NAN, 1.0], &[1.0, 1.0]).is_critical());
    }

    #[test]
    #[should_panic(expected = "reference has 2")]
    fn compute_panics_on_mismatch_with_a_clear_message() {
        trace(&[1.0], &[1.0, 2.0]);
    }

    #[cfg(feature = "serde")]
    #[test]
    fn metrics_serialize_flat_and_non_finite_values_round_trip() {
        let mut t = trace(&[1.0, 2.0], &[1.0, 2.0]);
        t.metrics.mse = f32::NEG_INFINITY;
        t.metrics.cosine_similarity = f32::NAN;
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(
            json,
            r#"{"brick":"qkv_projection","layer_idx":5,"quant_type":"Q4_K","mse":"-inf","max_abs_error":0.0,"cosine_similarity":"NaN","snr_db":"inf","element_count":2}"#
        );
        let back: QuantizationErrorTrace = serde_json::from_str(&json).unwrap();
        assert!(back.cosine_similarity.is_nan());
        assert_eq!(back.mse, f32::NEG_INFINITY);
        assert_eq!(back.snr_db, f32::INFINITY);
        assert_eq!(
            (back.brick, back.layer_idx, back.element_count),
            (t.brick, 5, 2)
        );
        assert_eq!(serde_json::to_string(&back).unwrap(), json);
        // What a plain serializer leaves for non-finite values reads as NaN.
        let nulls = json.replace("\"-inf\"", "null").replace("\"inf\"", "null");
        let old: QuantizationErrorTrace = serde_json::from_str(&nulls).unwrap();
        assert!(old.mse.is_nan() && old.snr_db.is_nan());
        assert_eq!(old.max_abs_error, 0.0);
    }

    #[test]
    fn quant_type_bits_and_compression() {
        assert_eq!(QuantType::F32.bits_per_element(), 32.0);
        assert_eq!(QuantType::Q4_K.bits_per_element(), 4.5);
        assert_eq!(format!("{:.1}", QuantType::Q4_K.compression_ratio()), "7.1");
        assert_eq!(QuantType::F32.compression_ratio(), 1.0);
        for w in QuantType::ALL.windows(2) {
            assert!(w[0].bits_per_element() >= w[1].bits_per_element(), "{w:?}");
        }
    }

    #[test]
    fn worst_brick_is_lowest_cosine_and_nan_is_worst() {
        let r = [1.0, 2.0, 3.0, 4.0];
        let mut m = ModelQuantizationError::default();
        assert!(m.worst_brick().is_none());
        m.add(trace(&[1.0, 2.0, 3.0, 4.1], &r));
        let mut bad = trace(&[2.0, 1.0, 3.0, 4.0], &r);
        bad.brick = BrickId::FfnDown;
        m.add(bad);
        assert_eq!(m.worst_brick().unwrap().brick, BrickId::FfnDown);
        let mut nan = trace(&[f32::NAN, 2.0, 3.0, 4.0], &r);
        nan.brick = BrickId::LmHead;
        m.add(nan);
        assert_eq!(m.worst_brick().unwrap().brick, BrickId::LmHead);
        m.compare_logits(&[1.0, 3.0, 2.0], &[1.0, 3.0, 2.0]);
        assert_eq!(m.top1_agrees, Some(true));
        assert!(m.kl_divergence.unwrap().abs() < 1e-6);
        m.compare_logits(&[3.0, 1.0, 2.0], &[1.0, 3.0, 2.0]);
        assert_eq!(m.top1_agrees, Some(false));
        assert!(m.kl_divergence.unwrap() > 0.1);
    }
}
