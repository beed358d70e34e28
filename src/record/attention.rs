//! Sparse summaries of attention weights: top-k, tail mass, entropy.

use crate::stats;

/// Which attention heads to summarize, and how much of each to keep.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct AttentionTraceConfig {
    /// Positions kept per summary (the largest weights).
    pub top_k: usize,
    /// Layers to trace; `None` traces every layer.
    pub layers: Option<Vec<usize>>,
    /// Heads to trace; `None` traces every head.
    pub heads: Option<Vec<usize>>,
    /// Top-k entries below this weight are not kept (they count in the tail mass).
    #[cfg_attr(feature = "serde", serde(with = "crate::serde_float"))]
    pub weight_threshold: f32,
}

impl Default for AttentionTraceConfig {
    /// Every layer and head, top 8, no threshold.
    fn default() -> Self {
        Self {
            top_k: 8,
            layers: None,
            heads: None,
            weight_threshold: 0.0,
        }
    }
}

impl AttentionTraceConfig {
    /// Whether heads of `layer` are summarized.
    #[inline]
    pub fn should_trace_layer(&self, layer: usize) -> bool {
        self.layers.as_ref().is_none_or(|l| l.contains(&layer))
    }

    /// Whether head `head` is summarized (in the selected layers).
    #[inline]
    pub fn should_trace_head(&self, head: usize) -> bool {
        self.heads.as_ref().is_none_or(|h| h.contains(&head))
    }
}

/// Attention heads a layer may have (as many as
/// [`MAX_LAYERS`](crate::activation::MAX_LAYERS)): the attention hook
/// ignores a head index at or beyond it, and the JSON Lines reader refuses
/// one.
pub const MAX_HEADS: usize = 1 << 12;

/// Summary of one head's attention distribution for one query position.
///
/// Positions index the attended sequence (the KV cache in chronological
/// order): 0 is the oldest cached token, `context_len - 1` the query itself.
#[derive(Debug, Clone, PartialEq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct AttentionWeightTrace {
    /// Layer index.
    pub layer_idx: usize,
    /// Query head index.
    pub head_idx: usize,
    /// Position of the query token.
    pub query_pos: usize,
    /// Number of attended positions (length of the weight vector).
    pub context_len: usize,
    /// Positions of the largest weights, largest first (ties: lower position first).
    pub top_k_positions: Vec<usize>,
    /// The weights at `top_k_positions`.
    #[cfg_attr(feature = "serde", serde(with = "crate::serde_float::vec"))]
    pub top_k_weights: Vec<f32>,
    /// Finite weight outside the kept top-k entries.
    #[cfg_attr(feature = "serde", serde(with = "crate::serde_float"))]
    pub tail_mass: f32,
    /// Shannon entropy of the weights, in nats (`ln(context_len)` when uniform).
    #[cfg_attr(feature = "serde", serde(with = "crate::serde_float"))]
    pub entropy: f32,
    /// Weight on position 0 (the first token, where sinks form).
    #[cfg_attr(feature = "serde", serde(with = "crate::serde_float"))]
    pub sink_weight: f32,
    /// Non-finite weights (ignored by every other field).
    pub nan_count: usize,
}

impl AttentionWeightTrace {
    /// Summarizes `weights` (one softmax row) keeping the `top_k` largest.
    ///
    /// NaN and infinite weights are counted in `nan_count` and otherwise
    /// ignored; `top_k = 0` keeps nothing (all mass is tail), `top_k` beyond
    /// the length keeps every finite weight.
    pub fn from_weights(
        layer_idx: usize,
        head_idx: usize,
        query_pos: usize,
        weights: &[f32],
        top_k: usize,
    ) -> Self {
        let mut t = Self::default();
        t.fill(
            layer_idx,
            head_idx,
            query_pos,
            weights,
            top_k,
            0.0,
            &mut Vec::new(),
        );
        t
    }

    /// Like [`from_weights`](Self::from_weights) with the top-k size and the
    /// weight threshold of `config`.
    pub fn from_weights_with(
        layer_idx: usize,
        head_idx: usize,
        query_pos: usize,
        weights: &[f32],
        config: &AttentionTraceConfig,
    ) -> Self {
        let mut t = Self::default();
        t.fill(
            layer_idx,
            head_idx,
            query_pos,
            weights,
            config.top_k,
            config.weight_threshold,
            &mut Vec::new(),
        );
        t
    }

    /// Rewrites `self` in place, reusing its allocations and `scratch`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn fill(
        &mut self,
        layer_idx: usize,
        head_idx: usize,
        query_pos: usize,
        weights: &[f32],
        top_k: usize,
        threshold: f32,
        scratch: &mut Vec<(usize, f32)>,
    ) {
        self.layer_idx = layer_idx;
        self.head_idx = head_idx;
        self.query_pos = query_pos;
        self.context_len = weights.len();
        let mut total = 0.0f64;
        let mut bad = 0usize;
        for &w in weights {
            if w.is_finite() {
                total += w as f64;
            } else {
                bad += 1;
            }
        }
        self.nan_count = bad;
        stats::top_k(weights, top_k, scratch);
        self.top_k_positions.clear();
        self.top_k_weights.clear();
        let mut kept = 0.0f64;
        for &(i, w) in scratch.iter() {
            if w.is_finite() && w >= threshold {
                self.top_k_positions.push(i);
                self.top_k_weights.push(w);
                kept += w as f64;
            }
        }
        self.tail_mass = (total - kept).max(0.0) as f32;
        self.entropy = stats::entropy(weights);
        self.sink_weight = weights
            .first()
            .copied()
            .filter(|w| w.is_finite())
            .unwrap_or(0.0);
    }

    /// The first token holds more than `threshold` of the weight.
    pub fn is_attention_sink(&self, threshold: f32) -> bool {
        self.sink_weight > threshold
    }

    /// The kept top-k entries within the last `window` positions hold at
    /// least `threshold` of the weight (a lower bound of the true recent mass).
    pub fn has_recency_bias(&self, window: usize, threshold: f32) -> bool {
        self.recent_mass(window) >= threshold
    }

    /// Weight of the kept entries within the last `window` positions.
    pub fn recent_mass(&self, window: usize) -> f32 {
        let start = self.context_len.saturating_sub(window);
        self.top_k_positions
            .iter()
            .zip(&self.top_k_weights)
            .filter(|(p, _)| **p >= start)
            .map(|(_, w)| *w)
            .sum()
    }

    /// Entropy divided by its maximum `ln(context_len)`, in `[0, 1]`; 1 for a
    /// single position.
    pub fn normalized_entropy(&self) -> f32 {
        if self.context_len <= 1 {
            1.0
        } else {
            (self.entropy / (self.context_len as f32).ln()).clamp(0.0, 1.0)
        }
    }

    /// The distribution is within `tolerance` of uniform (normalized entropy
    /// at least `1 - tolerance`): the head attends to nothing in particular.
    pub fn is_uniform(&self, tolerance: f32) -> bool {
        self.normalized_entropy() >= 1.0 - tolerance
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: [f32; 7] = [0.4, 0.1, 0.05, 0.05, 0.2, 0.1, 0.1];

    #[test]
    fn test_f253_attention_top_k_sorted_descending() {
        let t = AttentionWeightTrace::from_weights(0, 0, 6, &SEED, 5);
        assert_eq!(t.top_k_positions, vec![0, 4, 1, 5, 6]);
        assert_eq!(t.top_k_weights, vec![0.4, 0.2, 0.1, 0.1, 0.1]);
        assert!(t.top_k_weights.windows(2).all(|w| w[0] >= w[1]));
        assert!((t.tail_mass - 0.1).abs() < 1e-6);
        let exact: f32 = -SEED.iter().map(|p| p * p.ln()).sum::<f32>();
        assert!((t.entropy - exact).abs() < 1e-5);
    }

    #[test]
    fn sink_recency_and_uniformity() {
        let t = AttentionWeightTrace::from_weights(0, 0, 6, &SEED, 5);
        assert!(t.is_attention_sink(0.3));
        assert!(!t.is_attention_sink(0.5));
        assert!(!t.has_recency_bias(5, 0.7));
        assert!(t.has_recency_bias(5, 0.4));
        let u = AttentionWeightTrace::from_weights(0, 0, 3, &[0.25; 4], 2);
        assert!(u.is_uniform(0.01));
        assert!(!t.is_uniform(0.01));
    }

    #[test]
    fn bad_input_has_defined_results() {
        let empty = AttentionWeightTrace::from_weights(1, 2, 0, &[], 5);
        assert!(empty.top_k_positions.is_empty());
        assert_eq!(
            (empty.tail_mass, empty.entropy, empty.context_len),
            (0.0, 0.0, 0)
        );
        let none = AttentionWeightTrace::from_weights(0, 0, 6, &SEED, 0);
        assert!(none.top_k_positions.is_empty());
        assert!((none.tail_mass - 1.0).abs() < 1e-6);
        let all = AttentionWeightTrace::from_weights(0, 0, 6, &SEED, 100);
        assert_eq!(all.top_k_positions.len(), 7);
        assert!(all.tail_mass.abs() < 1e-6);
        let nan = AttentionWeightTrace::from_weights(0, 0, 2, &[f32::NAN, 0.5, 0.5], 3);
        assert_eq!(nan.nan_count, 1);
        assert_eq!(nan.top_k_positions, vec![1, 2]);
        assert_eq!(nan.sink_weight, 0.0);
        assert!((nan.entropy - 2f32.ln()).abs() < 1e-6);
    }

    #[test]
    fn threshold_moves_small_weights_to_the_tail() {
        let c = AttentionTraceConfig {
            top_k: 5,
            weight_threshold: 0.15,
            ..Default::default()
        };
        let t = AttentionWeightTrace::from_weights_with(0, 0, 6, &SEED, &c);
        assert_eq!(t.top_k_positions, vec![0, 4]);
        assert!((t.tail_mass - 0.4).abs() < 1e-6);
    }

    #[test]
    fn selection_by_layer_and_head() {
        let c = AttentionTraceConfig {
            top_k: 10,
            layers: Some(vec![0, 15, 31]),
            heads: Some(vec![0, 1]),
            weight_threshold: 0.01,
        };
        assert!(c.should_trace_layer(15) && c.should_trace_head(0));
        assert!(!c.should_trace_layer(14) && !c.should_trace_head(2));
        let all = AttentionTraceConfig::default();
        assert!(all.should_trace_layer(123) && all.should_trace_head(456));
    }
}
