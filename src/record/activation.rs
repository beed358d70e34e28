//! Activation statistics per layer and per stage of a forward pass.

use crate::anomaly::{Anomaly, AnomalyKind, Origin};
use crate::fingerprint::Fingerprint;
#[doc(no_inline)]
pub use crate::stage::Stage;
use crate::stats::TensorStats;

/// Statistics of one transformer layer in one forward pass.
///
/// A stage that was not recorded keeps `TensorStats::default()` (count 0)
/// and is ignored by the anomaly rules. Each stage's fingerprint
/// ([`crate::fingerprint`]) is `None` unless fingerprints were traced
/// ([`TraceConfig::FINGERPRINTS`](crate::TraceConfig::FINGERPRINTS)) and
/// the stage recorded a non-empty tensor; with serde, a `None` fingerprint
/// is left out.
#[derive(Debug, Clone, PartialEq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct LayerActivationTrace {
    /// Layer index, from 0.
    pub layer_idx: usize,
    /// Residual stream entering the layer.
    pub input_stats: TensorStats,
    /// Attention input after normalization.
    pub post_norm_stats: TensorStats,
    /// Attention block output.
    pub post_attn_stats: TensorStats,
    /// Feed-forward input after normalization.
    pub post_ffn_norm_stats: TensorStats,
    /// Feed-forward block output.
    pub post_ffn_stats: TensorStats,
    /// Residual stream leaving the layer.
    pub output_stats: TensorStats,
    /// Share of the layer's output carried by the skip connection, in
    /// `[0, 1]`: `‖x_in‖ / (‖x_in‖ + Σ‖update‖)` over the layer's residual
    /// adds (see [`residual_ratio`]). Above 0.99 the layer barely changes
    /// the stream. 0 when not measured.
    #[cfg_attr(feature = "serde", serde(with = "crate::serde_float"))]
    pub residual_ratio: f32,
    /// Fingerprint of the residual stream entering the layer.
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub input_fingerprint: Option<Fingerprint>,
    /// Fingerprint of the attention input after normalization.
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub post_norm_fingerprint: Option<Fingerprint>,
    /// Fingerprint of the attention block output.
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub post_attn_fingerprint: Option<Fingerprint>,
    /// Fingerprint of the feed-forward input after normalization.
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub post_ffn_norm_fingerprint: Option<Fingerprint>,
    /// Fingerprint of the feed-forward block output.
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub post_ffn_fingerprint: Option<Fingerprint>,
    /// Fingerprint of the residual stream leaving the layer.
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub output_fingerprint: Option<Fingerprint>,
}

/// Share of the residual stream in `residual + update`, in `[0, 1]`:
/// `‖residual‖ / (‖residual‖ + ‖update‖)`.
///
/// Both empty or both zero give 0. Non-finite inputs give NaN.
pub fn residual_ratio(residual: &[f32], update: &[f32]) -> f32 {
    ratio_of_norms(
        crate::stats::l2_norm(residual),
        crate::stats::l2_norm(update),
    )
}

pub(crate) fn ratio_of_norms(residual_norm: f32, update_norm: f32) -> f32 {
    let total = residual_norm + update_norm;
    if total == 0.0 {
        0.0
    } else {
        residual_norm / total
    }
}

/// Layers exempt from the vanishing-activation rule by default: the first
/// layers of a model legitimately carry small, low-variance activations.
pub const DEFAULT_WARMUP_LAYERS: usize = 2;

/// Layers a trace may have: the hooks ignore a record of layer
/// `MAX_LAYERS` or beyond, rather than growing a forward's per-layer
/// records to that length, and the JSON Lines reader refuses one. Each
/// layer of a forward takes about 300 bytes, so a forward's activation
/// records stay under 1.2 MiB whatever indices a caller passes; the
/// deepest published transformers have a few hundred layers.
pub const MAX_LAYERS: usize = 1 << 12;

/// Residual ratio above which a layer is reported as bypassed.
pub const RESIDUAL_DOMINANCE: f32 = 0.99;

impl LayerActivationTrace {
    /// An empty trace for layer `layer_idx`.
    pub fn new(layer_idx: usize) -> Self {
        Self {
            layer_idx,
            ..Self::default()
        }
    }

    /// The statistics recorded for `stage` (`None` for stages outside a layer).
    pub fn stats(&self, stage: Stage) -> Option<&TensorStats> {
        Some(match stage {
            Stage::Input => &self.input_stats,
            Stage::PostNorm => &self.post_norm_stats,
            Stage::PostAttn => &self.post_attn_stats,
            Stage::PostFfnNorm => &self.post_ffn_norm_stats,
            Stage::PostFfn => &self.post_ffn_stats,
            Stage::Output => &self.output_stats,
            Stage::Embedding | Stage::FinalNorm | Stage::Logits => return None,
        })
    }

    /// Mutable access to the statistics of `stage`.
    pub fn stats_mut(&mut self, stage: Stage) -> Option<&mut TensorStats> {
        Some(match stage {
            Stage::Input => &mut self.input_stats,
            Stage::PostNorm => &mut self.post_norm_stats,
            Stage::PostAttn => &mut self.post_attn_stats,
            Stage::PostFfnNorm => &mut self.post_ffn_norm_stats,
            Stage::PostFfn => &mut self.post_ffn_stats,
            Stage::Output => &mut self.output_stats,
            Stage::Embedding | Stage::FinalNorm | Stage::Logits => return None,
        })
    }

    /// The fingerprint recorded for `stage` (`None` when none was, and for
    /// stages outside a layer).
    pub fn fingerprint(&self, stage: Stage) -> Option<&Fingerprint> {
        match stage {
            Stage::Input => &self.input_fingerprint,
            Stage::PostNorm => &self.post_norm_fingerprint,
            Stage::PostAttn => &self.post_attn_fingerprint,
            Stage::PostFfnNorm => &self.post_ffn_norm_fingerprint,
            Stage::PostFfn => &self.post_ffn_fingerprint,
            Stage::Output => &self.output_fingerprint,
            Stage::Embedding | Stage::FinalNorm | Stage::Logits => return None,
        }
        .as_ref()
    }

    /// Mutable access to the fingerprint slot of `stage` (`None` for stages
    /// outside a layer).
    pub fn fingerprint_mut(&mut self, stage: Stage) -> Option<&mut Option<Fingerprint>> {
        Some(match stage {
            Stage::Input => &mut self.input_fingerprint,
            Stage::PostNorm => &mut self.post_norm_fingerprint,
            Stage::PostAttn => &mut self.post_attn_fingerprint,
            Stage::PostFfnNorm => &mut self.post_ffn_norm_fingerprint,
            Stage::PostFfn => &mut self.post_ffn_fingerprint,
            Stage::Output => &mut self.output_fingerprint,
            Stage::Embedding | Stage::FinalNorm | Stage::Logits => return None,
        })
    }

    /// Whether any recorded stage breaks an anomaly rule that needs no
    /// context (NaN, Inf, explosion) or the residual ratio exceeds 0.99.
    pub fn has_anomaly(&self) -> bool {
        Stage::LAYER_STAGES
            .iter()
            .filter_map(|&s| self.stats(s))
            .any(TensorStats::has_anomaly)
            || self.residual_ratio > RESIDUAL_DOMINANCE
    }

    fn reset(&mut self, layer_idx: usize) {
        *self = Self::new(layer_idx);
    }
}

/// Activation statistics of a whole forward pass, and the fingerprints of
/// the stages when they were traced.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct ModelActivationTrace {
    /// Token embedding (count 0 when not recorded).
    pub embedding_stats: TensorStats,
    /// One entry per layer, by layer index.
    pub layers: Vec<LayerActivationTrace>,
    /// Hidden state after the final norm (count 0 when not recorded).
    pub final_norm_stats: TensorStats,
    /// Output logits (count 0 when not recorded).
    pub logits_stats: TensorStats,
    /// Layers `0..warmup_layers` are exempt from the vanishing rule.
    pub warmup_layers: usize,
    /// Set by [`finalize`](Self::finalize): some rule was broken.
    pub has_anomaly: bool,
    /// Set by [`finalize`](Self::finalize): description of the first anomaly.
    pub anomaly_desc: Option<String>,
    /// Fingerprint of the token embedding.
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub embedding_fingerprint: Option<Fingerprint>,
    /// Fingerprint of the hidden state after the final norm.
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub final_norm_fingerprint: Option<Fingerprint>,
    /// Fingerprint of the output logits.
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub logits_fingerprint: Option<Fingerprint>,
}

impl Default for ModelActivationTrace {
    fn default() -> Self {
        Self::with_capacity(0)
    }
}

impl ModelActivationTrace {
    /// An empty trace with room for `layers` layers.
    pub fn with_capacity(layers: usize) -> Self {
        Self {
            embedding_stats: TensorStats::default(),
            layers: Vec::with_capacity(layers),
            final_norm_stats: TensorStats::default(),
            logits_stats: TensorStats::default(),
            warmup_layers: DEFAULT_WARMUP_LAYERS,
            has_anomaly: false,
            anomaly_desc: None,
            embedding_fingerprint: None,
            final_norm_fingerprint: None,
            logits_fingerprint: None,
        }
    }

    /// Appends a layer's trace (layers are expected in order).
    pub fn add_layer(&mut self, layer: LayerActivationTrace) {
        self.layers.push(layer);
    }

    /// The trace of `layer`, growing the list with empty traces as needed.
    pub fn layer_mut(&mut self, layer: usize) -> &mut LayerActivationTrace {
        if self.layers.len() <= layer {
            let start = self.layers.len();
            self.layers
                .extend((start..=layer).map(LayerActivationTrace::new));
        }
        &mut self.layers[layer]
    }

    /// Statistics recorded at `(layer, stage)`; `layer` is ignored for
    /// stages outside a layer.
    pub fn stats(&self, layer: usize, stage: Stage) -> Option<&TensorStats> {
        match stage {
            Stage::Embedding => Some(&self.embedding_stats),
            Stage::FinalNorm => Some(&self.final_norm_stats),
            Stage::Logits => Some(&self.logits_stats),
            s => self.layers.get(layer).and_then(|l| l.stats(s)),
        }
    }

    /// Mutable statistics slot of `(layer, stage)`, creating the layer.
    pub fn stats_mut(&mut self, layer: usize, stage: Stage) -> &mut TensorStats {
        match stage {
            Stage::Embedding => &mut self.embedding_stats,
            Stage::FinalNorm => &mut self.final_norm_stats,
            Stage::Logits => &mut self.logits_stats,
            s => match self.layer_mut(layer).stats_mut(s) {
                Some(slot) => slot,
                None => unreachable!("layer stages always have a slot"),
            },
        }
    }

    /// The fingerprint recorded at `(layer, stage)`, if any; `layer` is
    /// ignored for stages outside a layer.
    pub fn fingerprint(&self, layer: usize, stage: Stage) -> Option<&Fingerprint> {
        match stage {
            Stage::Embedding => self.embedding_fingerprint.as_ref(),
            Stage::FinalNorm => self.final_norm_fingerprint.as_ref(),
            Stage::Logits => self.logits_fingerprint.as_ref(),
            s => self.layers.get(layer).and_then(|l| l.fingerprint(s)),
        }
    }

    /// Mutable fingerprint slot of `(layer, stage)`, creating the layer.
    pub fn fingerprint_mut(&mut self, layer: usize, stage: Stage) -> &mut Option<Fingerprint> {
        match stage {
            Stage::Embedding => &mut self.embedding_fingerprint,
            Stage::FinalNorm => &mut self.final_norm_fingerprint,
            Stage::Logits => &mut self.logits_fingerprint,
            s => match self.layer_mut(layer).fingerprint_mut(s) {
                Some(slot) => slot,
                None => unreachable!("layer stages always have a slot"),
            },
        }
    }

    /// Whether any stage holds a fingerprint.
    pub fn has_fingerprints(&self) -> bool {
        self.embedding_fingerprint.is_some()
            || self.final_norm_fingerprint.is_some()
            || self.logits_fingerprint.is_some()
            || self.layers.iter().any(|l| {
                Stage::LAYER_STAGES
                    .iter()
                    .any(|&s| l.fingerprint(s).is_some())
            })
    }

    /// Drops every fingerprint, keeping the statistics.
    pub fn clear_fingerprints(&mut self) {
        self.embedding_fingerprint = None;
        self.final_norm_fingerprint = None;
        self.logits_fingerprint = None;
        for l in &mut self.layers {
            for s in Stage::LAYER_STAGES {
                if let Some(slot) = l.fingerprint_mut(s) {
                    *slot = None;
                }
            }
        }
    }

    /// Applies the anomaly rules and sets `has_anomaly` / `anomaly_desc`.
    pub fn finalize(&mut self) {
        let mut found = Vec::new();
        self.detect_anomalies(0, &mut found);
        self.has_anomaly = !found.is_empty();
        self.anomaly_desc = found.first().map(|a| a.to_string());
    }

    /// Every recorded stage in forward order, with its layer index (`None`
    /// outside layers). Stages never recorded (count 0) are skipped.
    pub fn recorded(&self) -> impl Iterator<Item = (Option<usize>, Stage, &TensorStats)> + '_ {
        let head = std::iter::once((None, Stage::Embedding, &self.embedding_stats));
        let layers = self.layers.iter().flat_map(|l| {
            Stage::LAYER_STAGES
                .iter()
                .filter_map(move |&s| l.stats(s).map(|st| (Some(l.layer_idx), s, st)))
        });
        let tail = [
            (None, Stage::FinalNorm, &self.final_norm_stats),
            (None, Stage::Logits, &self.logits_stats),
        ];
        head.chain(layers)
            .chain(tail)
            .filter(|(_, _, s)| s.count > 0)
    }

    /// Appends the anomalies of this forward (at `position`) to `out`, at
    /// most one per kind: the first stage where each kind appears.
    ///
    /// A non-finite kind is [`Origin::Produced`] where the stage before it
    /// was entirely finite, and [`Origin::Propagated`] where the stage before
    /// it already held non-finite values (an Inf that turned into NaN, or a
    /// stage whose predecessor was not recorded clean).
    pub fn detect_anomalies(&self, position: usize, out: &mut Vec<Anomaly>) {
        let mut seen = [false; AnomalyKind::COUNT];
        let mut prev_nonfinite = false;
        // The stages of `recorded()`, in the same order, without the
        // iterator adapters: this runs once per forward.
        let mut visit = |layer: Option<usize>, stage: Stage, s: &TensorStats| {
            if s.count == 0 {
                return;
            }
            let nonfinite = s.nan_count > 0 || s.inf_count > 0;
            let origin = if prev_nonfinite {
                Origin::Propagated
            } else {
                Origin::Produced
            };
            let mut push = |kind: AnomalyKind, count: usize, value: f32| {
                if !seen[kind as usize] {
                    seen[kind as usize] = true;
                    out.push(Anomaly {
                        position,
                        layer,
                        stage,
                        kind,
                        origin,
                        count,
                        total: s.count,
                        value,
                    });
                }
            };
            if s.nan_count > 0 {
                push(AnomalyKind::NaN, s.nan_count, f32::NAN);
            }
            if s.inf_count > 0 {
                push(AnomalyKind::Inf, s.inf_count, f32::INFINITY);
            }
            if s.is_exploding() {
                let v = if s.max_abs() > crate::stats::EXPLOSION_ABS {
                    s.max_abs()
                } else {
                    s.std
                };
                push(AnomalyKind::Explosion, s.count, v);
            }
            let warm = layer.is_some_and(|l| l >= self.warmup_layers);
            if warm && s.is_vanishing() {
                push(AnomalyKind::Vanishing, s.count, s.std);
            }
            prev_nonfinite = nonfinite;
        };
        visit(None, Stage::Embedding, &self.embedding_stats);
        for l in &self.layers {
            for &stage in &Stage::LAYER_STAGES {
                if let Some(s) = l.stats(stage) {
                    visit(Some(l.layer_idx), stage, s);
                }
            }
        }
        visit(None, Stage::FinalNorm, &self.final_norm_stats);
        visit(None, Stage::Logits, &self.logits_stats);
        for l in &self.layers {
            if l.residual_ratio > RESIDUAL_DOMINANCE
                && !seen[AnomalyKind::ResidualDominance as usize]
            {
                seen[AnomalyKind::ResidualDominance as usize] = true;
                out.push(Anomaly {
                    position,
                    layer: Some(l.layer_idx),
                    stage: Stage::Output,
                    kind: AnomalyKind::ResidualDominance,
                    origin: Origin::Produced,
                    count: 0,
                    total: l.output_stats.count,
                    value: l.residual_ratio,
                });
            }
        }
    }

    /// Empties the trace for reuse, keeping its allocations.
    pub(crate) fn reset(&mut self, warmup_layers: usize) {
        self.embedding_stats = TensorStats::default();
        for (i, l) in self.layers.iter_mut().enumerate() {
            l.reset(i);
        }
        self.final_norm_stats = TensorStats::default();
        self.logits_stats = TensorStats::default();
        self.embedding_fingerprint = None;
        self.final_norm_fingerprint = None;
        self.logits_fingerprint = None;
        self.warmup_layers = warmup_layers;
        self.has_anomaly = false;
        self.anomaly_desc = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clean(n: usize) -> TensorStats {
        TensorStats::from_slice(&(0..n).map(|i| (i as f32).sin()).collect::<Vec<_>>())
    }

    #[test]
    fn first_nan_is_produced_and_later_ones_are_not_repeated() {
        let mut t = ModelActivationTrace::with_capacity(4);
        for i in 0..4 {
            let mut l = LayerActivationTrace::new(i);
            for s in Stage::LAYER_STAGES {
                *l.stats_mut(s).unwrap() = clean(16);
            }
            t.add_layer(l);
        }
        let bad = TensorStats::from_slice(&[1.0, f32::NAN, 2.0]);
        t.layers[2].post_attn_stats = bad;
        t.layers[2].post_ffn_norm_stats = bad;
        t.layers[3].output_stats = bad;
        let mut out = Vec::new();
        t.detect_anomalies(7, &mut out);
        assert_eq!(out.len(), 1, "{out:?}");
        let a = &out[0];
        assert_eq!(
            (a.position, a.layer, a.stage),
            (7, Some(2), Stage::PostAttn)
        );
        assert_eq!((a.kind, a.origin), (AnomalyKind::NaN, Origin::Produced));
        t.finalize();
        assert!(t.has_anomaly);
        assert!(t.anomaly_desc.unwrap().contains("NaN"));
    }

    #[test]
    fn inf_turning_into_nan_is_two_kinds_the_second_propagated() {
        let mut t = ModelActivationTrace::with_capacity(1);
        let l = t.layer_mut(0);
        l.input_stats = clean(8);
        l.post_norm_stats = TensorStats::from_slice(&[1.0, f32::INFINITY]);
        l.post_attn_stats = TensorStats::from_slice(&[f32::NAN, 1.0]);
        let mut out = Vec::new();
        t.detect_anomalies(0, &mut out);
        assert_eq!(out[0].kind, AnomalyKind::Inf);
        assert_eq!(out[0].origin, Origin::Produced);
        assert_eq!(out[1].kind, AnomalyKind::NaN);
        assert_eq!(out[1].origin, Origin::Propagated);
    }

    #[test]
    fn vanishing_respects_warmup_and_unrecorded_stages_are_ignored() {
        let mut t = ModelActivationTrace::with_capacity(3);
        t.warmup_layers = 2;
        t.layer_mut(0).output_stats = TensorStats::from_slice(&[1.0, 1.0, 1.0]);
        let mut out = Vec::new();
        t.detect_anomalies(0, &mut out);
        assert!(out.is_empty(), "layer 0 is warm-up: {out:?}");
        t.layer_mut(2).output_stats = TensorStats::from_slice(&[1.0, 1.0, 1.0]);
        t.detect_anomalies(0, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].kind, AnomalyKind::Vanishing);
        assert_eq!(out[0].layer, Some(2));
    }

    #[test]
    fn fingerprint_slots_sit_beside_the_stats_slots() {
        let mut t = ModelActivationTrace::with_capacity(2);
        assert!(!t.has_fingerprints());
        let all = [
            (0, Stage::Embedding),
            (1, Stage::Input),
            (1, Stage::PostNorm),
            (1, Stage::PostAttn),
            (1, Stage::PostFfnNorm),
            (1, Stage::PostFfn),
            (1, Stage::Output),
            (0, Stage::FinalNorm),
            (0, Stage::Logits),
        ];
        for (k, &(layer, stage)) in all.iter().enumerate() {
            let mut f = crate::fingerprint::Fingerprint::default();
            f.0[0] = k as f32 + 1.0;
            *t.fingerprint_mut(layer, stage) = Some(f);
        }
        assert!(t.has_fingerprints());
        // Every slot holds its own value, and layer 0 none.
        for (k, &(layer, stage)) in all.iter().enumerate() {
            assert_eq!(
                t.fingerprint(layer, stage).map(|f| f.0[0]),
                Some(k as f32 + 1.0)
            );
        }
        assert!(Stage::LAYER_STAGES
            .iter()
            .all(|&s| t.fingerprint(0, s).is_none()));
        assert!(t.fingerprint(5, Stage::Input).is_none());
        let mut cleared = t.clone();
        cleared.clear_fingerprints();
        assert!(!cleared.has_fingerprints());
        t.reset(2);
        assert!(
            !t.has_fingerprints(),
            "a recycled trace starts without fingerprints"
        );
        assert_eq!(t.layers.len(), 2);
    }

    #[test]
    fn residual_ratio_is_a_share_with_defined_edges() {
        assert_eq!(residual_ratio(&[], &[]), 0.0);
        assert_eq!(residual_ratio(&[3.0, 4.0], &[0.0, 0.0]), 1.0);
        assert!((residual_ratio(&[3.0, 4.0], &[0.0, 5.0]) - 0.5).abs() < 1e-6);
        assert!(residual_ratio(&[f32::NAN], &[1.0]).is_nan());
        let mut t = ModelActivationTrace::with_capacity(1);
        t.layer_mut(0).residual_ratio = 0.995;
        let mut out = Vec::new();
        t.detect_anomalies(3, &mut out);
        assert_eq!(out[0].kind, AnomalyKind::ResidualDominance);
    }
}
