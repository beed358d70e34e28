//! The record of one forward pass: what every system traced in it.

use crate::activation::{LayerActivationTrace, ModelActivationTrace, MAX_LAYERS};
use crate::anomaly::Anomaly;
use crate::attention::{AttentionWeightTrace, MAX_HEADS};
use crate::kv_cache::KvCacheStateTrace;
use crate::logit::{LogitEvolutionTrace, TokenLogitEvolution};
use crate::quant::{ModelQuantizationError, QuantizationErrorTrace};
use crate::sequence::SequenceId;

/// Everything traced in one forward pass.
#[derive(Debug, Clone, PartialEq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct ForwardTrace {
    /// Token position.
    pub position: usize,
    /// The sequence of the row, in a forward over the rows of several
    /// sequences ([`ModelTracer::begin_forward_batch`](crate::ModelTracer::begin_forward_batch));
    /// `None` for the one-sequence API.
    #[cfg_attr(feature = "serde", serde(default))]
    pub sequence: Option<SequenceId>,
    /// The token id fed at this position, when the model told the tracer
    /// ([`ModelTracer::input_token`](crate::ModelTracer::input_token)).
    #[cfg_attr(feature = "serde", serde(default))]
    pub token: Option<u32>,
    /// Activation statistics.
    pub activations: ModelActivationTrace,
    /// Attention summaries, in recording order.
    pub attention: Vec<AttentionWeightTrace>,
    /// Logit-lens trajectories of the tracked tokens.
    pub logits: Option<LogitEvolutionTrace>,
    /// Quantization errors measured in this forward.
    pub quantization: ModelQuantizationError,
    /// What-if comparisons: each brick's output with its weights
    /// re-quantized to another type, against the model's own weights.
    pub what_if: Vec<QuantizationErrorTrace>,
    /// KV cache state after this forward.
    pub kv_cache: Option<KvCacheStateTrace>,
    /// Broken rules, at most one per kind, in forward order.
    pub anomalies: Vec<Anomaly>,
}

impl ForwardTrace {
    pub(crate) fn reset(
        &mut self,
        position: usize,
        sequence: Option<SequenceId>,
        warmup_layers: usize,
    ) {
        self.position = position;
        self.sequence = sequence;
        self.token = None;
        self.activations.reset(warmup_layers);
        self.attention.clear();
        if let Some(l) = &mut self.logits {
            l.tokens.clear();
            l.position = position;
            l.selected_token = None;
        }
        self.quantization.clear();
        self.what_if.clear();
        self.kv_cache = None;
        self.anomalies.clear();
    }

    /// Drops the records the hooks would not have recorded: those of a
    /// layer at or beyond [`MAX_LAYERS`] or of a head at or beyond
    /// [`MAX_HEADS`] (a lens entry may name `MAX_LAYERS` itself, the output
    /// logits after the last layer).
    pub(crate) fn drop_out_of_range(&mut self) {
        self.activations.layers.truncate(MAX_LAYERS);
        for (i, l) in self.activations.layers.iter_mut().enumerate() {
            if l.layer_idx >= MAX_LAYERS {
                *l = LayerActivationTrace::new(i);
            }
        }
        self.attention
            .retain(|a| a.layer_idx < MAX_LAYERS && a.head_idx < MAX_HEADS);
        if let Some(l) = &mut self.logits {
            l.tokens.retain(lens_in_range);
        }
        self.quantization
            .traces
            .retain(|t| t.layer_idx < MAX_LAYERS);
        self.what_if.retain(|t| t.layer_idx < MAX_LAYERS);
        self.anomalies
            .retain(|a| a.layer.is_none_or(|l| l < MAX_LAYERS));
    }

    /// The anomaly that matters most: the first non-finite one, else the first.
    pub fn primary_anomaly(&self) -> Option<&Anomaly> {
        self.anomalies
            .iter()
            .find(|a| a.kind.is_non_finite())
            .or(self.anomalies.first())
    }
}

/// Whether every entry of `t` names a layer up to [`MAX_LAYERS`].
pub(crate) fn lens_in_range(t: &TokenLogitEvolution) -> bool {
    (0..t.ranks.len()).all(|i| t.layer_at(i) <= MAX_LAYERS)
}
