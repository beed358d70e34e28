//! Session aggregates and the human- and machine-readable summary.
//!
//! Aggregates cost O(layers × stages + layers × heads + bricks), never
//! O(tokens): the summary stays true after old forwards are dropped.

use std::collections::BTreeMap;
use std::fmt;

use crate::activation::{Stage, MAX_LAYERS};
use crate::anomaly::{Anomaly, AnomalyKind};
use crate::forward::ForwardTrace;
use crate::kv_cache::KvCacheSessionTrace;
use crate::quant::{BrickId, QuantType, QuantizationErrorTrace};
use crate::stats::TensorStats;

/// Attention weight on the first token above which a head counts as a sink.
pub const SINK_THRESHOLD: f32 = 0.3;
/// Window (positions) of the recency rule.
pub const RECENCY_WINDOW: usize = 5;
/// Weight within the recency window above which a head counts as recency-biased.
pub const RECENCY_THRESHOLD: f32 = 0.7;

/// Per-layer activation aggregates.
#[derive(Debug, Clone, PartialEq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct LayerAggregate {
    /// Layer index.
    pub layer: usize,
    /// Merged statistics of each layer stage, in [`Stage::LAYER_STAGES`] order.
    pub stages: [TensorStats; 6],
    /// Forwards that measured a positive, finite residual ratio: the
    /// samples of the mean.
    pub residual_samples: usize,
    /// Mean residual ratio.
    #[cfg_attr(feature = "serde", serde(with = "crate::serde_float"))]
    pub residual_ratio_mean: f32,
    /// Largest residual ratio.
    #[cfg_attr(feature = "serde", serde(with = "crate::serde_float"))]
    pub residual_ratio_max: f32,
}

impl LayerAggregate {
    /// Merged statistics of `stage`.
    pub fn stage(&self, stage: Stage) -> Option<&TensorStats> {
        Stage::LAYER_STAGES
            .iter()
            .position(|&s| s == stage)
            .map(|i| &self.stages[i])
    }
}

/// Per-(layer, head) attention aggregates.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct HeadAggregate {
    /// Layer index.
    pub layer: usize,
    /// Head index.
    pub head: usize,
    /// Summaries folded in.
    pub records: usize,
    /// Summaries whose first-token weight exceeded [`SINK_THRESHOLD`].
    pub sink_records: usize,
    /// Summaries with recency bias ([`RECENCY_WINDOW`], [`RECENCY_THRESHOLD`]).
    pub recency_records: usize,
    /// Mean first-token weight (finite samples; NaN while none was finite).
    #[cfg_attr(feature = "serde", serde(with = "crate::serde_float"))]
    pub mean_sink_weight: f32,
    /// Mean entropy, nats (finite samples; NaN while none was finite).
    #[cfg_attr(feature = "serde", serde(with = "crate::serde_float"))]
    pub mean_entropy: f32,
    /// Mean normalized entropy in `[0, 1]` (finite samples; NaN while none was finite).
    #[cfg_attr(feature = "serde", serde(with = "crate::serde_float"))]
    pub mean_normalized_entropy: f32,
    /// Mean tail mass (finite samples; NaN while none was finite).
    #[cfg_attr(feature = "serde", serde(with = "crate::serde_float"))]
    pub mean_tail_mass: f32,
    /// Finite first-token weights folded into [`mean_sink_weight`](Self::mean_sink_weight).
    #[cfg_attr(feature = "serde", serde(default))]
    pub sink_weight_samples: usize,
    /// Finite entropies folded into [`mean_entropy`](Self::mean_entropy).
    #[cfg_attr(feature = "serde", serde(default))]
    pub entropy_samples: usize,
    /// Finite normalized entropies folded into
    /// [`mean_normalized_entropy`](Self::mean_normalized_entropy).
    #[cfg_attr(feature = "serde", serde(default))]
    pub normalized_entropy_samples: usize,
    /// Finite tail masses folded into [`mean_tail_mass`](Self::mean_tail_mass).
    #[cfg_attr(feature = "serde", serde(default))]
    pub tail_mass_samples: usize,
}

impl HeadAggregate {
    /// Share of summaries where the head was a sink.
    pub fn sink_share(&self) -> f32 {
        share(self.sink_records, self.records)
    }
    /// Share of summaries where the head was recency-biased.
    pub fn recency_share(&self) -> f32 {
        share(self.recency_records, self.records)
    }
}

fn share(a: usize, b: usize) -> f32 {
    if b == 0 {
        0.0
    } else {
        a as f32 / b as f32
    }
}

/// Folds `x` into `mean`, the mean of the `n` finite samples folded so far.
/// A non-finite sample (the infinite SNR of an exact match, a NaN cosine)
/// changes neither: counting it without adding it would pull the mean
/// towards zero. The first finite sample replaces whatever `mean` held, so
/// a mean can start as NaN, "no finite sample yet", rather than as a 0 that
/// reads like a measurement.
fn running_mean(mean: &mut f32, n: &mut usize, x: f32) {
    if x.is_finite() {
        *n += 1;
        if *n == 1 {
            *mean = x;
        } else {
            *mean += (x - *mean) / *n as f32;
        }
    }
}

/// Per-brick quantization aggregates.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct BrickAggregate {
    /// The brick.
    pub brick: BrickId,
    /// Measurements folded in.
    pub samples: usize,
    /// Mean cosine similarity (finite samples; NaN while none was finite).
    #[cfg_attr(feature = "serde", serde(with = "crate::serde_float"))]
    pub mean_cosine: f32,
    /// Mean MSE (finite samples; NaN while none was finite).
    #[cfg_attr(feature = "serde", serde(with = "crate::serde_float"))]
    pub mean_mse: f32,
    /// Mean SNR in dB (finite samples; NaN while none was finite).
    #[cfg_attr(feature = "serde", serde(with = "crate::serde_float"))]
    pub mean_snr_db: f32,
    /// Samples that were critical (cosine ≤ 0.99 or NaN).
    pub critical: usize,
    /// The worst measurement.
    pub worst: QuantizationErrorTrace,
    /// Finite cosines folded into [`mean_cosine`](Self::mean_cosine).
    #[cfg_attr(feature = "serde", serde(default))]
    pub cosine_samples: usize,
    /// Finite MSEs folded into [`mean_mse`](Self::mean_mse).
    #[cfg_attr(feature = "serde", serde(default))]
    pub mse_samples: usize,
    /// Finite SNRs folded into [`mean_snr_db`](Self::mean_snr_db); an exact
    /// match has an infinite SNR and is not among them.
    #[cfg_attr(feature = "serde", serde(default))]
    pub snr_samples: usize,
}

/// Running aggregates over every forward of a session.
#[derive(Debug, Clone, PartialEq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct SessionAggregates {
    /// Completed forwards.
    pub forwards: usize,
    /// Position of the first completed forward.
    pub first_position: Option<usize>,
    /// Position of the last completed forward.
    pub last_position: Option<usize>,
    /// Merged embedding statistics.
    pub embedding: TensorStats,
    /// Per-layer aggregates, by layer index.
    pub layers: Vec<LayerAggregate>,
    /// Merged final-norm statistics.
    pub final_norm: TensorStats,
    /// Merged logits statistics.
    pub logits: TensorStats,
    /// Forwards with an anomaly of each kind, by [`AnomalyKind`] index.
    pub anomaly_counts: [usize; AnomalyKind::COUNT],
    /// The first anomaly of the session.
    pub first_anomaly: Option<Anomaly>,
    /// The most recent anomaly of the session.
    pub last_anomaly: Option<Anomaly>,
    /// Attention aggregates by (layer, head).
    #[cfg_attr(feature = "serde", serde(with = "crate::output::serde_keyed"))]
    pub heads: BTreeMap<(usize, usize), HeadAggregate>,
    /// How often each layer was a tracked token's decisive layer, by the
    /// log-rank rule ([`decisive_layer_log_rank`]): with a vocabulary of tens
    /// of thousands of tokens, the absolute rule would mostly count moves
    /// between ranks that are never sampled.
    ///
    /// [`decisive_layer_log_rank`]: crate::logit::TokenLogitEvolution::decisive_layer_log_rank
    pub decisive_layers: BTreeMap<usize, usize>,
    /// How often the selected token won (stayed top-1 from) each layer.
    pub won_at_layers: BTreeMap<usize, usize>,
    /// Forwards with logit-lens records.
    pub lens_forwards: usize,
    /// Quantization aggregates by brick.
    pub bricks: BTreeMap<BrickId, BrickAggregate>,
    /// LM-head comparisons folded in.
    pub logit_comparisons: usize,
    /// Mean KL divergence of the output distributions (nats, finite
    /// samples; 0 while none was finite, see
    /// [`TraceSummary::mean_kl_divergence`]).
    #[cfg_attr(feature = "serde", serde(with = "crate::serde_float"))]
    pub mean_kl_divergence: f32,
    /// Finite KL divergences folded into
    /// [`mean_kl_divergence`](Self::mean_kl_divergence).
    #[cfg_attr(feature = "serde", serde(default))]
    pub kl_samples: usize,
    /// LM-head comparisons whose top-1 tokens agreed.
    pub top1_agreements: usize,
    /// What-if comparisons by (target type, brick, layer): the error of
    /// the weights re-quantized to the target type against the model's own.
    #[cfg_attr(feature = "serde", serde(with = "crate::output::serde_keyed"))]
    pub what_if: BTreeMap<(QuantType, BrickId, usize), BrickLayerAggregate>,
    /// Where anomalies first appeared, by (layer, stage).
    #[cfg_attr(feature = "serde", serde(default, with = "crate::output::serde_keyed"))]
    pub anomaly_sites: BTreeMap<(Option<usize>, Stage), AnomalySite>,
    /// Quantization error of the model's own weights by (brick, layer).
    #[cfg_attr(feature = "serde", serde(default, with = "crate::output::serde_keyed"))]
    pub brick_layers: BTreeMap<(BrickId, usize), BrickLayerAggregate>,
}

/// How often anomalies first appeared at one (layer, stage) of the forward
/// pass, over a session.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct AnomalySite {
    /// Layer index; `None` for the embedding, final norm and logits.
    pub layer: Option<usize>,
    /// Stage of the forward pass.
    pub stage: Stage,
    /// Forwards whose anomaly of each kind (by [`AnomalyKind`] index) was
    /// reported here: each forward reports a kind once, where it first
    /// appears, so a fault shows at its origin and not at every stage it
    /// propagates to.
    pub counts: [usize; AnomalyKind::COUNT],
    /// Of those, the anomalies that were produced here (the stage before was finite).
    pub produced: usize,
    /// Position of the first forward reporting an anomaly here.
    pub first_position: usize,
    /// Position of the last forward reporting an anomaly here.
    pub last_position: usize,
}

impl AnomalySite {
    /// Anomalies of every kind reported here.
    pub fn total(&self) -> usize {
        self.counts.iter().sum()
    }
}

/// Quantization error of one brick in one layer, over a session: of the
/// model's own weights ([`SessionAggregates::brick_layers`]), or of the
/// weights re-quantized to another type ([`SessionAggregates::what_if`]).
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct BrickLayerAggregate {
    /// The brick.
    pub brick: BrickId,
    /// Layer index (0 for bricks outside layers).
    pub layer: usize,
    /// Weight format: of the last measurement for the model's own weights,
    /// the target type for a what-if comparison.
    pub quant_type: QuantType,
    /// Measurements folded in.
    pub samples: usize,
    /// Mean cosine similarity (finite samples; NaN while none was finite).
    #[cfg_attr(feature = "serde", serde(with = "crate::serde_float"))]
    pub mean_cosine: f32,
    /// Lowest cosine similarity (NaN once any measurement was NaN).
    #[cfg_attr(feature = "serde", serde(with = "crate::serde_float"))]
    pub min_cosine: f32,
    /// Mean SNR in dB (finite samples; NaN while none was finite).
    #[cfg_attr(feature = "serde", serde(with = "crate::serde_float"))]
    pub mean_snr_db: f32,
    /// Mean MSE (finite samples; NaN while none was finite), in squared
    /// units of the brick's output. Read as NaN when absent.
    #[cfg_attr(feature = "serde", serde(default = "nan", with = "crate::serde_float"))]
    pub mean_mse: f32,
    /// Finite cosines folded into [`mean_cosine`](Self::mean_cosine).
    #[cfg_attr(feature = "serde", serde(default))]
    pub cosine_samples: usize,
    /// Finite SNRs folded into [`mean_snr_db`](Self::mean_snr_db).
    #[cfg_attr(feature = "serde", serde(default))]
    pub snr_samples: usize,
    /// Finite MSEs folded into [`mean_mse`](Self::mean_mse).
    #[cfg_attr(feature = "serde", serde(default))]
    pub mse_samples: usize,
}

#[cfg(feature = "serde")]
fn nan() -> f32 {
    f32::NAN
}

impl BrickLayerAggregate {
    /// No measurement yet, at the brick, layer and type of `t`.
    fn empty(t: &QuantizationErrorTrace) -> Self {
        Self {
            brick: t.brick,
            layer: t.layer_idx,
            quant_type: t.quant_type,
            samples: 0,
            mean_cosine: f32::NAN,
            min_cosine: f32::INFINITY,
            mean_snr_db: f32::NAN,
            mean_mse: f32::NAN,
            cosine_samples: 0,
            snr_samples: 0,
            mse_samples: 0,
        }
    }

    /// Folds the measurement `t` in.
    fn fold(&mut self, t: &QuantizationErrorTrace) {
        self.samples += 1;
        self.quant_type = t.quant_type;
        running_mean(
            &mut self.mean_cosine,
            &mut self.cosine_samples,
            t.cosine_similarity,
        );
        running_mean(&mut self.mean_snr_db, &mut self.snr_samples, t.snr_db);
        running_mean(&mut self.mean_mse, &mut self.mse_samples, t.mse);
        self.min_cosine = if t.cosine_similarity.is_nan() || self.min_cosine.is_nan() {
            f32::NAN
        } else {
            self.min_cosine.min(t.cosine_similarity)
        };
    }
}

#[cfg(feature = "serde")]
mod keyed {
    use super::*;
    use crate::output::serde_keyed::Keyed;

    impl Keyed<(usize, usize)> for HeadAggregate {
        fn key(&self) -> (usize, usize) {
            (self.layer, self.head)
        }
    }
    impl Keyed<(Option<usize>, Stage)> for AnomalySite {
        fn key(&self) -> (Option<usize>, Stage) {
            (self.layer, self.stage)
        }
    }
    impl Keyed<(BrickId, usize)> for BrickLayerAggregate {
        fn key(&self) -> (BrickId, usize) {
            (self.brick, self.layer)
        }
    }
    impl Keyed<(QuantType, BrickId, usize)> for BrickLayerAggregate {
        fn key(&self) -> (QuantType, BrickId, usize) {
            (self.quant_type, self.brick, self.layer)
        }
    }
}

impl SessionAggregates {
    pub(crate) fn absorb(&mut self, f: &ForwardTrace) {
        self.forwards += 1;
        self.first_position.get_or_insert(f.position);
        self.last_position = Some(f.position);
        let a = &f.activations;
        self.embedding = self.embedding.merge(&a.embedding_stats);
        self.final_norm = self.final_norm.merge(&a.final_norm_stats);
        self.logits = self.logits.merge(&a.logits_stats);
        for l in &a.layers {
            let touched = Stage::LAYER_STAGES
                .iter()
                .any(|&s| l.stats(s).is_some_and(|st| st.count > 0))
                || l.residual_ratio > 0.0;
            // Replayed and hand-made forwards may name any layer.
            if !touched || l.layer_idx >= MAX_LAYERS {
                continue;
            }
            if self.layers.len() <= l.layer_idx {
                let start = self.layers.len();
                self.layers
                    .extend((start..=l.layer_idx).map(|layer| LayerAggregate {
                        layer,
                        ..LayerAggregate::default()
                    }));
            }
            let agg = &mut self.layers[l.layer_idx];
            for (i, &s) in Stage::LAYER_STAGES.iter().enumerate() {
                if let Some(st) = l.stats(s).filter(|st| st.count > 0) {
                    agg.stages[i] = agg.stages[i].merge(st);
                }
            }
            if l.residual_ratio > 0.0 {
                running_mean(
                    &mut agg.residual_ratio_mean,
                    &mut agg.residual_samples,
                    l.residual_ratio,
                );
                agg.residual_ratio_max = agg.residual_ratio_max.max(l.residual_ratio);
            }
        }
        for an in &f.anomalies {
            self.anomaly_counts[an.kind as usize] += 1;
            let site = self
                .anomaly_sites
                .entry((an.layer, an.stage))
                .or_insert(AnomalySite {
                    layer: an.layer,
                    stage: an.stage,
                    counts: [0; AnomalyKind::COUNT],
                    produced: 0,
                    first_position: f.position,
                    last_position: f.position,
                });
            site.counts[an.kind as usize] += 1;
            site.produced += usize::from(an.origin == crate::anomaly::Origin::Produced);
            site.last_position = f.position;
        }
        if let Some(p) = f.primary_anomaly() {
            self.first_anomaly.get_or_insert(*p);
            self.last_anomaly = Some(*p);
        }
        for t in &f.attention {
            let h = self
                .heads
                .entry((t.layer_idx, t.head_idx))
                .or_insert(HeadAggregate {
                    layer: t.layer_idx,
                    head: t.head_idx,
                    mean_sink_weight: f32::NAN,
                    mean_entropy: f32::NAN,
                    mean_normalized_entropy: f32::NAN,
                    mean_tail_mass: f32::NAN,
                    ..HeadAggregate::default()
                });
            h.records += 1;
            h.sink_records += usize::from(t.is_attention_sink(SINK_THRESHOLD));
            h.recency_records += usize::from(t.has_recency_bias(RECENCY_WINDOW, RECENCY_THRESHOLD));
            running_mean(
                &mut h.mean_sink_weight,
                &mut h.sink_weight_samples,
                t.sink_weight,
            );
            running_mean(&mut h.mean_entropy, &mut h.entropy_samples, t.entropy);
            running_mean(
                &mut h.mean_normalized_entropy,
                &mut h.normalized_entropy_samples,
                t.normalized_entropy(),
            );
            running_mean(&mut h.mean_tail_mass, &mut h.tail_mass_samples, t.tail_mass);
        }
        if let Some(lt) = &f.logits {
            self.lens_forwards += 1;
            for tok in &lt.tokens {
                if let Some(l) = tok.decisive_layer_log_rank() {
                    *self.decisive_layers.entry(l).or_default() += 1;
                }
                if Some(tok.token_id) == lt.selected_token {
                    if let Some(l) = tok.won_at_layer() {
                        *self.won_at_layers.entry(l).or_default() += 1;
                    }
                }
            }
        }
        let q = &f.quantization;
        for t in &q.traces {
            let b = self.bricks.entry(t.brick).or_insert(BrickAggregate {
                brick: t.brick,
                samples: 0,
                mean_cosine: f32::NAN,
                mean_mse: f32::NAN,
                mean_snr_db: f32::NAN,
                critical: 0,
                worst: *t,
                cosine_samples: 0,
                mse_samples: 0,
                snr_samples: 0,
            });
            b.samples += 1;
            running_mean(
                &mut b.mean_cosine,
                &mut b.cosine_samples,
                t.cosine_similarity,
            );
            running_mean(&mut b.mean_mse, &mut b.mse_samples, t.mse);
            running_mean(&mut b.mean_snr_db, &mut b.snr_samples, t.snr_db);
            b.critical += usize::from(t.is_critical());
            if t.badness() > b.worst.badness() {
                b.worst = *t;
            }
            self.brick_layers
                .entry((t.brick, t.layer_idx))
                .or_insert_with(|| BrickLayerAggregate::empty(t))
                .fold(t);
        }
        for t in &f.what_if {
            self.what_if
                .entry((t.quant_type, t.brick, t.layer_idx))
                .or_insert_with(|| BrickLayerAggregate::empty(t))
                .fold(t);
        }
        if let (Some(kl), Some(agree)) = (q.kl_divergence, q.top1_agrees) {
            self.logit_comparisons += 1;
            running_mean(&mut self.mean_kl_divergence, &mut self.kl_samples, kl);
            self.top1_agreements += usize::from(agree);
        }
    }

    /// Forwards with at least one anomaly of `kind`.
    pub fn anomalies_of(&self, kind: AnomalyKind) -> usize {
        self.anomaly_counts[kind as usize]
    }

    /// The worst quantization measurement of the session.
    pub fn worst_brick(&self) -> Option<&QuantizationErrorTrace> {
        self.bricks
            .values()
            .map(|b| &b.worst)
            .max_by(|a, b| a.badness().total_cmp(&b.badness()))
    }
}

/// A summary of a tracing session, built from its aggregates.
#[derive(Debug, Clone, PartialEq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct TraceSummary {
    /// The systems that were on (`"disabled"`, `"lightweight"`, `"full"`, ...).
    pub config: String,
    /// Completed forwards.
    pub forwards: usize,
    /// First and last position traced.
    pub positions: Option<(usize, usize)>,
    /// Forwards with an anomaly of each kind, by [`AnomalyKind`] index.
    pub anomaly_counts: [usize; AnomalyKind::COUNT],
    /// The first anomaly of the session.
    pub first_anomaly: Option<Anomaly>,
    /// Per-layer activation health.
    pub layers: Vec<LayerSummary>,
    /// Attention heads, by (layer, head).
    pub heads: Vec<HeadAggregate>,
    /// `(layer, count)`: how often each layer was decisive for a tracked
    /// token, by the log-rank rule ([`decisive_layer_log_rank`]).
    ///
    /// [`decisive_layer_log_rank`]: crate::logit::TokenLogitEvolution::decisive_layer_log_rank
    pub decisive_layers: Vec<(usize, usize)>,
    /// `(layer, count)`: from which layer the selected token stayed top-1.
    pub won_at_layers: Vec<(usize, usize)>,
    /// Quantization error per brick.
    pub bricks: Vec<BrickAggregate>,
    /// The worst quantization measurement.
    pub worst_brick: Option<QuantizationErrorTrace>,
    /// Mean KL divergence of quantized vs reference output distributions
    /// (nats), over the comparisons that gave a finite divergence; `None`
    /// when none did.
    #[cfg_attr(feature = "serde", serde(with = "crate::serde_float::option"))]
    pub mean_kl_divergence: Option<f32>,
    /// Share of LM-head comparisons whose top-1 tokens agreed.
    #[cfg_attr(feature = "serde", serde(with = "crate::serde_float::option"))]
    pub top1_agreement: Option<f32>,
    /// KV cache totals (recent steps omitted).
    pub kv_cache: Option<KvSummary>,
    /// What-if re-quantization, by (target type, brick, layer).
    pub what_if: Vec<BrickLayerAggregate>,
    /// Where anomalies first appeared, by (layer, stage).
    #[cfg_attr(feature = "serde", serde(default))]
    pub anomaly_sites: Vec<AnomalySite>,
    /// Quantization error by (brick, layer).
    #[cfg_attr(feature = "serde", serde(default))]
    pub brick_layers: Vec<BrickLayerAggregate>,
}

/// Activation health of one layer over the session.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct LayerSummary {
    /// Layer index.
    pub layer: usize,
    /// Merged statistics of the layer input.
    pub input: TensorStats,
    /// Merged statistics of the layer output.
    pub output: TensorStats,
    /// Largest |x| over every stage.
    #[cfg_attr(feature = "serde", serde(with = "crate::serde_float"))]
    pub max_abs: f32,
    /// NaN and Inf values over every stage.
    pub non_finite: usize,
    /// Mean residual ratio (0 when not measured).
    #[cfg_attr(feature = "serde", serde(with = "crate::serde_float"))]
    pub residual_ratio: f32,
}

/// KV cache totals of a session.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct KvSummary {
    /// Steps recorded.
    pub steps: usize,
    /// Capacity in positions (last step).
    pub max_positions: usize,
    /// Valid positions (last step).
    pub valid_positions: usize,
    /// Largest utilization.
    #[cfg_attr(feature = "serde", serde(with = "crate::serde_float"))]
    pub peak_utilization: f32,
    /// Largest size, bytes.
    pub peak_memory_bytes: usize,
    /// Evictions.
    pub total_evictions: usize,
    /// Mean hit rate.
    #[cfg_attr(feature = "serde", serde(with = "crate::serde_float"))]
    pub avg_hit_rate: f32,
    /// Positions reused.
    pub total_reused: usize,
    /// Positions computed.
    pub total_computed: usize,
}

impl TraceSummary {
    pub(crate) fn build(
        config: String,
        recorder: Option<(&SessionAggregates, &KvCacheSessionTrace)>,
        kv_on: bool,
    ) -> Self {
        let Some((agg, kv)) = recorder else {
            return Self {
                config,
                ..Self::default()
            };
        };
        let layers = agg
            .layers
            .iter()
            .map(|l| LayerSummary {
                layer: l.layer,
                input: l.stages[0],
                output: l.stages[5],
                max_abs: l
                    .stages
                    .iter()
                    .filter(|s| s.finite_count() > 0)
                    .map(TensorStats::max_abs)
                    .fold(0.0, f32::max),
                non_finite: l.stages.iter().fold(0usize, |n, s| {
                    n.saturating_add(s.nan_count).saturating_add(s.inf_count)
                }),
                residual_ratio: l.residual_ratio_mean,
            })
            .collect();
        let kv_cache = (kv_on && kv.total_steps > 0).then(|| {
            let last = kv.last().copied().unwrap_or_default();
            KvSummary {
                steps: kv.total_steps,
                max_positions: last.max_positions,
                valid_positions: last.valid_positions,
                peak_utilization: kv.peak_utilization,
                peak_memory_bytes: kv.peak_memory_bytes,
                total_evictions: kv.total_evictions,
                avg_hit_rate: kv.avg_hit_rate,
                total_reused: kv.total_reused,
                total_computed: kv.total_computed,
            }
        });
        Self {
            config,
            forwards: agg.forwards,
            positions: agg.first_position.zip(agg.last_position),
            anomaly_counts: agg.anomaly_counts,
            first_anomaly: agg.first_anomaly,
            layers,
            heads: agg.heads.values().copied().collect(),
            decisive_layers: agg.decisive_layers.iter().map(|(&l, &c)| (l, c)).collect(),
            won_at_layers: agg.won_at_layers.iter().map(|(&l, &c)| (l, c)).collect(),
            bricks: agg.bricks.values().copied().collect(),
            worst_brick: agg.worst_brick().copied(),
            mean_kl_divergence: (agg.kl_samples > 0).then_some(agg.mean_kl_divergence),
            top1_agreement: (agg.logit_comparisons > 0)
                .then(|| share(agg.top1_agreements, agg.logit_comparisons)),
            kv_cache,
            what_if: agg.what_if.values().copied().collect(),
            anomaly_sites: agg.anomaly_sites.values().copied().collect(),
            brick_layers: agg.brick_layers.values().copied().collect(),
        }
    }

    /// Total anomalies of every kind.
    pub fn total_anomalies(&self) -> usize {
        self.anomaly_counts.iter().sum()
    }

    /// Anomalies that are faults: NaN, Inf, explosion.
    pub fn total_faults(&self) -> usize {
        AnomalyKind::ALL
            .iter()
            .filter(|k| k.is_fault())
            .map(|&k| self.anomaly_counts[k as usize])
            .sum()
    }

    /// The summary as pretty-printed JSON.
    #[cfg(feature = "serde")]
    pub fn to_json(&self) -> String {
        // Serializing plain data with string keys cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }
}

impl fmt::Display for TraceSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "model trace summary ({})", self.config)?;
        match self.positions {
            Some((a, b)) => writeln!(f, "  forwards: {} (positions {a}..={b})", self.forwards)?,
            None => writeln!(f, "  forwards: {}", self.forwards)?,
        }
        if self.forwards == 0 {
            return Ok(());
        }
        if self.total_anomalies() == 0 {
            writeln!(f, "  anomalies: none")?;
        } else {
            write!(f, "  anomalies:")?;
            for k in AnomalyKind::ALL {
                let n = self.anomaly_counts[k as usize];
                if n > 0 {
                    write!(f, " {k} in {n} forwards;")?;
                }
            }
            writeln!(f)?;
            if let Some(a) = &self.first_anomaly {
                writeln!(f, "  first anomaly: {a}")?;
            }
        }
        if !self.layers.is_empty() {
            writeln!(
                f,
                "  {:>5} {:>10} {:>10} {:>10} {:>10} {:>10} {:>8}",
                "layer", "in mean", "in std", "out std", "max |x|", "non-fin", "resid"
            )?;
            for l in &self.layers {
                writeln!(
                    f,
                    "  {:>5} {:>10.4} {:>10.4} {:>10.4} {:>10.3e} {:>10} {:>8.4}",
                    l.layer,
                    l.input.mean,
                    l.input.std,
                    l.output.std,
                    l.max_abs,
                    l.non_finite,
                    l.residual_ratio
                )?;
            }
        }
        if !self.heads.is_empty() {
            let sinks = self.heads.iter().filter(|h| h.sink_share() > 0.5).count();
            let recency = self
                .heads
                .iter()
                .filter(|h| h.recency_share() > 0.5)
                .count();
            writeln!(
                f,
                "  attention: {} heads traced; {sinks} are sinks (>{:.0}% on the first token in most steps), {recency} recency-biased",
                self.heads.len(),
                SINK_THRESHOLD * 100.0
            )?;
        }
        if !self.won_at_layers.is_empty() || !self.decisive_layers.is_empty() {
            let fmt_hist = |h: &[(usize, usize)]| {
                h.iter()
                    .map(|(l, c)| format!("L{l}×{c}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            writeln!(
                f,
                "  logit lens: chosen token won at {}",
                fmt_hist(&self.won_at_layers)
            )?;
            writeln!(
                f,
                "              decisive layers (largest log-rank gain) {}",
                fmt_hist(&self.decisive_layers)
            )?;
        }
        if !self.bricks.is_empty() {
            writeln!(
                f,
                "  {:>16} {:>7} {:>10} {:>12} {:>9} {:>8}",
                "brick", "samples", "mean cos", "mean mse", "snr dB", "critical"
            )?;
            for b in &self.bricks {
                writeln!(
                    f,
                    "  {:>16} {:>7} {:>10.6} {:>12.4e} {:>9.1} {:>8}",
                    b.brick.name(),
                    b.samples,
                    b.mean_cosine,
                    b.mean_mse,
                    b.mean_snr_db,
                    b.critical
                )?;
            }
            if let Some(w) = &self.worst_brick {
                writeln!(
                    f,
                    "  worst brick: {} layer {} ({}), cosine {:.6}, SNR {:.1} dB",
                    w.brick, w.layer_idx, w.quant_type, w.cosine_similarity, w.snr_db
                )?;
            }
            if let (Some(kl), Some(top1)) = (self.mean_kl_divergence, self.top1_agreement) {
                writeln!(
                    f,
                    "  output distribution: mean KL {kl:.3e} nats, top-1 agreement {:.1}%",
                    top1 * 100.0
                )?;
            }
        }
        if !self.what_if.is_empty() {
            writeln!(f, "  what-if re-quantization (cosine vs the model's own weights, mean over layers; worst layer):")?;
            let mut types: Vec<_> = self.what_if.iter().map(|w| w.quant_type).collect();
            types.dedup();
            for qt in types {
                write!(f, "  {:>6}", qt.name())?;
                for b in BrickId::ALL {
                    let rows: Vec<_> = self
                        .what_if
                        .iter()
                        .filter(|w| w.quant_type == qt && w.brick == b)
                        .collect();
                    if rows.is_empty() {
                        continue;
                    }
                    let mean =
                        rows.iter().map(|w| w.mean_cosine as f64).sum::<f64>() / rows.len() as f64;
                    let worst = rows
                        .iter()
                        .min_by(|a, b| a.min_cosine.total_cmp(&b.min_cosine))
                        .map_or(0, |w| w.layer);
                    write!(f, " {}={mean:.5} (L{worst})", b.name())?;
                }
                writeln!(f)?;
            }
        }
        if let Some(kv) = &self.kv_cache {
            writeln!(
                f,
                "  kv cache: {}/{} positions, peak {:.1}% ({:.1} KiB), {} evictions, hit rate {:.1}% ({} reused, {} computed)",
                kv.valid_positions,
                kv.max_positions,
                kv.peak_utilization * 100.0,
                kv.peak_memory_bytes as f64 / 1024.0,
                kv.total_evictions,
                kv.avg_hit_rate * 100.0,
                kv.total_reused,
                kv.total_computed
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::AttentionWeightTrace;
    use crate::config::Full;
    use crate::logit::LogitEvolutionTrace;
    use crate::stats::ErrorMetrics;
    use crate::tracer::ModelTracer;

    fn quant(
        brick: BrickId,
        layer: usize,
        cosine: f32,
        mse: f32,
        snr: f32,
    ) -> QuantizationErrorTrace {
        QuantizationErrorTrace {
            brick,
            layer_idx: layer,
            quant_type: QuantType::Q4_1,
            metrics: ErrorMetrics {
                mse,
                max_abs_error: mse.sqrt(),
                cosine_similarity: cosine,
                snr_db: snr,
            },
            element_count: 64,
        }
    }

    fn close(a: f32, b: f32) -> bool {
        (a - b).abs() <= 1e-6 * a.abs().max(b.abs()).max(1.0)
    }

    #[test]
    fn merged_stage_stats_equal_one_pass_over_every_forward() {
        let mut t = ModelTracer::new(Full);
        let (mut inputs, mut outputs, mut embeddings) = (Vec::new(), Vec::new(), Vec::new());
        for pos in 0..6 {
            // Means that move by 100 per forward and lengths that differ:
            // merging stds or means without weighting by count and spread
            // would not give the one-pass figures.
            let n = 17 + 5 * pos;
            let x: Vec<f32> = (0..n)
                .map(|i| ((i * 7 + pos * 13) % 23) as f32 * 0.37 - 4.0 + 100.0 * pos as f32)
                .collect();
            let mut y: Vec<f32> = x.iter().map(|v| -0.5 * v + 3.0).collect();
            if pos == 2 {
                y[1] = f32::NAN;
                y[4] = f32::INFINITY;
            }
            t.begin_forward(pos);
            t.activation(0, Stage::Embedding, &y[..3]);
            t.activation(0, Stage::Input, &x);
            t.activation(0, Stage::Output, &y);
            t.end_forward();
            inputs.extend_from_slice(&x);
            outputs.extend_from_slice(&y);
            embeddings.extend_from_slice(&y[..3]);
        }
        let agg = t.aggregates().unwrap();
        let cases = [
            (agg.layers[0].stage(Stage::Input).copied(), &inputs),
            (agg.layers[0].stage(Stage::Output).copied(), &outputs),
            (Some(agg.embedding), &embeddings),
        ];
        for (merged, all) in cases {
            let merged = merged.unwrap();
            let one = TensorStats::from_slice(all);
            assert_eq!(
                (merged.count, merged.nan_count, merged.inf_count),
                (one.count, one.nan_count, one.inf_count)
            );
            assert_eq!(merged.min.to_bits(), one.min.to_bits());
            assert_eq!(merged.max.to_bits(), one.max.to_bits());
            for (m, o) in [
                (merged.mean, one.mean),
                (merged.std, one.std),
                (merged.l2_norm, one.l2_norm),
            ] {
                assert!(close(m, o), "merged {merged:?}\none pass {one:?}");
            }
        }
        // The summary shows the same merged statistics.
        let s = t.summary();
        assert_eq!(s.layers[0].input, agg.layers[0].stages[0]);
        assert_eq!(s.layers[0].output, agg.layers[0].stages[5]);
        assert_eq!(s.layers[0].non_finite, 2);
        assert!(s.layers[0].max_abs >= TensorStats::from_slice(&inputs).max_abs());
    }

    #[test]
    fn brick_means_leave_out_non_finite_samples() {
        let mut t = ModelTracer::new(Full);
        t.begin_forward(0);
        // An exact match (infinite SNR) among two 10 dB measurements.
        t.record_quant_error(quant(BrickId::FfnUp, 2, 1.0, 0.0, f32::INFINITY));
        t.record_quant_error(quant(BrickId::FfnUp, 2, 0.98, 0.25, 10.0));
        t.end_forward();
        t.begin_forward(1);
        t.record_quant_error(quant(BrickId::FfnUp, 2, 0.96, 0.5, 10.0));
        // A non-finite output: nothing is finite but it is still critical.
        t.record_quant_error(quant(BrickId::FfnDown, 0, f32::NAN, f32::NAN, f32::NAN));
        t.end_forward();

        let s = t.summary();
        let up = s.bricks.iter().find(|b| b.brick == BrickId::FfnUp).unwrap();
        assert_eq!(up.samples, 3);
        assert_eq!(up.snr_samples, 2);
        assert_eq!(up.mean_snr_db, 10.0);
        assert_eq!((up.cosine_samples, up.mse_samples), (3, 3));
        assert!(close(up.mean_cosine, (1.0 + 0.98 + 0.96) / 3.0));
        assert!(close(up.mean_mse, 0.25));
        assert_eq!(up.critical, 2, "0.98 and 0.96 are critical: {up:?}");
        let bl = s
            .brick_layers
            .iter()
            .find(|b| (b.brick, b.layer) == (BrickId::FfnUp, 2))
            .unwrap();
        assert_eq!((bl.samples, bl.snr_samples), (3, 2));
        assert_eq!(bl.mean_snr_db, 10.0);
        assert!(close(bl.min_cosine, 0.96));

        let down = s
            .bricks
            .iter()
            .find(|b| b.brick == BrickId::FfnDown)
            .unwrap();
        assert_eq!((down.samples, down.critical), (1, 1));
        assert_eq!(
            (down.cosine_samples, down.mse_samples, down.snr_samples),
            (0, 0, 0)
        );
        // No finite sample: no mean, not a 0 that reads like a measurement.
        assert!(down.mean_cosine.is_nan() && down.mean_snr_db.is_nan());
        assert!(down.mean_mse.is_nan());
        let text = s.to_string();
        assert!(text.contains("ffn_up"), "{text}");
    }

    #[test]
    fn what_if_means_leave_out_an_exact_match() {
        let mut t = ModelTracer::new(Full);
        let reference = [1.0f32, -2.0, 3.0, 0.5];
        let off = [1.1f32, -2.0, 2.9, 0.5];
        let want =
            QuantizationErrorTrace::compute(BrickId::FfnGate, 1, &off, &reference, QuantType::Q8_0);
        for (pos, candidate) in [reference, off, off].iter().enumerate() {
            t.begin_forward(pos);
            t.what_if(BrickId::FfnGate, 1, QuantType::Q8_0, 4, |c, r| {
                c.copy_from_slice(candidate);
                r.copy_from_slice(&reference);
            });
            t.end_forward();
        }
        let s = t.summary();
        let [w] = s.what_if.as_slice() else {
            panic!("{:?}", s.what_if);
        };
        assert_eq!((w.samples, w.snr_samples, w.cosine_samples), (3, 2, 3));
        assert!(want.snr_db.is_finite());
        assert!(close(w.mean_snr_db, want.snr_db), "{w:?} vs {want:?}");
        assert!(close(w.min_cosine, want.cosine_similarity));
        // The exact match has an MSE of 0, which is finite: it counts.
        assert_eq!(w.mse_samples, 3);
        assert!(close(w.mean_mse, want.mse * 2.0 / 3.0), "{w:?}");
    }

    /// Forwards that measured `traces` on the model's own weights and the
    /// same `traces` as what-if comparisons, plus a Q8_0 what-if of every
    /// measured brick.
    fn own_and_what_if(traces: &[QuantizationErrorTrace]) -> SessionAggregates {
        let mut agg = SessionAggregates::default();
        for &t in traces {
            let mut q8 = t;
            q8.quant_type = QuantType::Q8_0;
            q8.metrics.cosine_similarity = 0.999_9;
            let mut f = ForwardTrace {
                what_if: vec![t, q8],
                ..ForwardTrace::default()
            };
            f.quantization.add(t);
            agg.absorb(&f);
        }
        agg
    }

    #[test]
    fn what_if_and_own_weights_fold_into_one_aggregate() {
        let agg = own_and_what_if(&[
            quant(BrickId::FfnDown, 4, 0.98, 0.25, 10.0),
            quant(BrickId::FfnDown, 4, 1.0, 0.0, f32::INFINITY),
            quant(BrickId::FfnDown, 4, 0.96, 0.5, 20.0),
            quant(BrickId::LmHead, 0, f32::NAN, f32::NAN, f32::NAN),
        ]);
        assert_eq!(agg.brick_layers.len(), 2);
        // Keyed by type too: the Q4_1 and the Q8_0 comparisons stay apart.
        assert_eq!(agg.what_if.len(), 4);
        for ((brick, layer), own) in &agg.brick_layers {
            let what_if = agg.what_if[&(QuantType::Q4_1, *brick, *layer)];
            // Debug text: equal floats, NaN included.
            assert_eq!(format!("{own:?}"), format!("{what_if:?}"));
            let q8 = agg.what_if[&(QuantType::Q8_0, *brick, *layer)];
            assert_eq!((q8.quant_type, q8.samples), (QuantType::Q8_0, own.samples));
            assert_eq!(q8.min_cosine, 0.999_9);
        }
        let down = agg.brick_layers[&(BrickId::FfnDown, 4)];
        assert_eq!((down.samples, down.cosine_samples), (3, 3));
        assert_eq!((down.snr_samples, down.mse_samples), (2, 3));
        assert!(close(down.mean_snr_db, 15.0));
        assert!(close(down.mean_mse, 0.25));
        assert!(close(down.mean_cosine, (0.98 + 1.0 + 0.96) / 3.0));
        assert!(close(down.min_cosine, 0.96));
        let head = agg.brick_layers[&(BrickId::LmHead, 0)];
        assert_eq!((head.samples, head.cosine_samples), (1, 0));
        assert!(head.min_cosine.is_nan() && head.mean_cosine.is_nan());
        assert!(head.mean_mse.is_nan());
    }

    #[cfg(feature = "serde")]
    #[test]
    fn both_maps_of_brick_layer_aggregates_read_back_by_their_own_keys() {
        let agg = own_and_what_if(&[
            quant(BrickId::FfnUp, 1, 0.97, 0.5, 12.0),
            quant(BrickId::FfnUp, 2, 0.99, 0.1, 14.0),
        ]);
        let json = serde_json::to_string(&agg).unwrap();
        let back: SessionAggregates = serde_json::from_str(&json).unwrap();
        let keys = |a: &SessionAggregates| {
            (
                a.what_if.keys().copied().collect::<Vec<_>>(),
                a.brick_layers.keys().copied().collect::<Vec<_>>(),
            )
        };
        assert_eq!(keys(&back), keys(&agg));
        assert_eq!(back.what_if.len(), 4);
        assert_eq!(back, agg);
        // A record without an MSE mean reads as "no finite sample".
        let mut w = serde_json::to_value(agg.what_if.values().next()).unwrap();
        assert!(w["mean_mse"].is_number(), "{w}");
        w.as_object_mut().and_then(|o| o.remove("mean_mse"));
        let w: BrickLayerAggregate = serde_json::from_value(w).unwrap();
        assert!(w.mean_mse.is_nan());
        assert_eq!(w.samples, 1);
    }

    #[test]
    fn head_residual_and_kl_means_leave_out_non_finite_samples() {
        let mut agg = SessionAggregates::default();
        let head = |sink: f32, entropy: f32| AttentionWeightTrace {
            layer_idx: 3,
            head_idx: 1,
            context_len: 8,
            sink_weight: sink,
            entropy,
            tail_mass: 0.25,
            ..AttentionWeightTrace::default()
        };
        let mut f = ForwardTrace {
            attention: vec![head(f32::NAN, 1.0), head(0.5, f32::INFINITY)],
            ..ForwardTrace::default()
        };
        f.quantization.kl_divergence = Some(f32::NAN);
        f.quantization.top1_agrees = Some(true);
        f.activations.layer_mut(0).residual_ratio = f32::NAN;
        agg.absorb(&f);
        let mut g = ForwardTrace {
            attention: vec![head(0.7, 2.0)],
            ..ForwardTrace::default()
        };
        g.quantization.kl_divergence = Some(0.5);
        g.quantization.top1_agrees = Some(false);
        g.activations.layer_mut(0).residual_ratio = 0.25;
        agg.absorb(&g);
        let mut h = ForwardTrace::default();
        h.activations.layer_mut(0).residual_ratio = 0.75;
        agg.absorb(&h);

        let a = agg.heads[&(3, 1)];
        assert_eq!(a.records, 3);
        assert_eq!((a.sink_weight_samples, a.entropy_samples), (2, 2));
        assert!(close(a.mean_sink_weight, 0.6), "{a:?}");
        assert!(close(a.mean_entropy, 1.5), "{a:?}");
        assert_eq!(a.tail_mass_samples, 3);
        assert!(close(a.mean_tail_mass, 0.25));
        assert_eq!(agg.layers[0].residual_samples, 2);
        assert!(close(agg.layers[0].residual_ratio_mean, 0.5));

        let s = TraceSummary::build(
            "full".into(),
            Some((&agg, &KvCacheSessionTrace::default())),
            false,
        );
        assert_eq!(s.mean_kl_divergence, Some(0.5));
        assert_eq!(
            s.top1_agreement,
            Some(0.5),
            "the NaN comparison still agreed"
        );
        assert!(close(s.layers[0].residual_ratio, 0.5));

        // Comparisons without a single finite divergence have no mean.
        let mut only_nan = SessionAggregates::default();
        only_nan.absorb(&f);
        let s = TraceSummary::build(
            "full".into(),
            Some((&only_nan, &KvCacheSessionTrace::default())),
            false,
        );
        assert_eq!(s.mean_kl_divergence, None);
        assert_eq!(s.top1_agreement, Some(1.0));
    }

    #[test]
    fn lens_histograms_count_decisive_and_won_layers() {
        let mut t = ModelTracer::new(Full);
        let traj = |trace: &mut LogitEvolutionTrace, id: u32, ranks: &[usize]| {
            let tok = trace.track_token(id, String::new());
            for &r in ranks {
                tok.record_layer(0.0, r);
            }
        };
        // Forward 0: the chosen token goes 500, 200, 10, 1, 0 (log-rank
        // decisive at layer 2, won at 4); another never improves.
        let mut a = LogitEvolutionTrace::new(0, 1.0, 1.0);
        traj(&mut a, 7, &[500, 200, 10, 1, 0]);
        traj(&mut a, 8, &[3, 3, 4, 4, 5]);
        a.selected_token = Some(7);
        // Forward 1: the chosen token 1000, 100, 100, 1, 0 is decisive at
        // layer 3 by log rank (layer 1 by the absolute drop) and won at 4;
        // a token that is not chosen wins too but is not counted as won.
        let mut b = LogitEvolutionTrace::new(1, 1.0, 1.0);
        traj(&mut b, 9, &[1000, 100, 100, 1, 0]);
        traj(&mut b, 10, &[9, 0, 0, 0, 0]);
        b.selected_token = Some(9);
        for (pos, trace) in [a, b].into_iter().enumerate() {
            t.begin_forward(pos);
            t.record_logits(trace);
            t.end_forward();
        }
        t.begin_forward(2);
        t.end_forward();

        let agg = t.aggregates().unwrap();
        assert_eq!(agg.lens_forwards, 2);
        let decisive: Vec<_> = agg.decisive_layers.iter().map(|(&l, &c)| (l, c)).collect();
        assert_eq!(decisive, vec![(1, 1), (2, 1), (3, 1)]);
        let won: Vec<_> = agg.won_at_layers.iter().map(|(&l, &c)| (l, c)).collect();
        assert_eq!(won, vec![(4, 2)]);
        let s = t.summary();
        assert_eq!(s.decisive_layers, decisive);
        assert_eq!(s.won_at_layers, won);
        let text = s.to_string();
        assert!(text.contains("chosen token won at L4×2"), "{text}");
        assert!(
            text.contains("decisive layers (largest log-rank gain) L1×1 L2×1 L3×1"),
            "{text}"
        );
    }

    #[test]
    fn anomaly_histograms_count_forwards_and_sites() {
        let mut t = ModelTracer::new(Full);
        let nan_after_attention = |t: &mut ModelTracer<Full>, pos: usize| {
            t.begin_forward(pos);
            t.activation(0, Stage::Input, &[1.0, 2.0]);
            t.activation(0, Stage::PostAttn, &[f32::NAN, 1.0]);
            // Propagated further: the forward still reports the NaN once,
            // where it arose.
            t.activation(0, Stage::Output, &[f32::NAN, f32::NAN]);
            t.end_forward();
        };
        nan_after_attention(&mut t, 0);
        t.begin_forward(1);
        t.activation(1, Stage::Input, &[1.0, 2.0]);
        t.activation(1, Stage::PostFfn, &[f32::INFINITY, 1.0]);
        t.end_forward();
        t.begin_forward(2);
        t.activation(0, Stage::Input, &[1.0, 2.0]);
        t.end_forward();
        nan_after_attention(&mut t, 3);

        // The aggregates agree with what each forward reported ...
        let mut counts = [0usize; AnomalyKind::COUNT];
        for f in t.forwards() {
            for a in &f.anomalies {
                counts[a.kind as usize] += 1;
            }
        }
        let agg = t.aggregates().unwrap();
        assert_eq!(agg.anomaly_counts, counts);
        // ... and with what was injected.
        assert_eq!(agg.anomalies_of(AnomalyKind::NaN), 2);
        assert_eq!(agg.anomalies_of(AnomalyKind::Inf), 1);
        let nan_site = agg.anomaly_sites[&(Some(0), Stage::PostAttn)];
        assert_eq!(nan_site.counts[AnomalyKind::NaN as usize], 2);
        assert_eq!(nan_site.total(), 2);
        assert_eq!(nan_site.produced, 2);
        assert_eq!((nan_site.first_position, nan_site.last_position), (0, 3));
        assert!(!agg.anomaly_sites.contains_key(&(Some(0), Stage::Output)));
        let inf_site = agg.anomaly_sites[&(Some(1), Stage::PostFfn)];
        assert_eq!(inf_site.counts[AnomalyKind::Inf as usize], 1);
        assert_eq!((inf_site.first_position, inf_site.last_position), (1, 1));
        assert_eq!(agg.first_anomaly.map(|a| a.position), Some(0));
        assert_eq!(agg.last_anomaly.map(|a| a.position), Some(3));

        let s = t.summary();
        assert_eq!(s.anomaly_counts, counts);
        assert_eq!(s.total_faults(), 3);
        assert_eq!(s.anomaly_sites.len(), agg.anomaly_sites.len());
    }
}
