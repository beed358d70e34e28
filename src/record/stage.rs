//! The points of a forward pass where activations are measured.

use std::fmt;

/// A point of the forward pass where activations are measured, in the order
/// a LLaMA-family decoder reaches them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum Stage {
    /// The token embedding, before the first layer (no layer index).
    Embedding,
    /// The residual stream entering a layer.
    Input,
    /// The attention input after its normalization.
    PostNorm,
    /// The attention block's output (after the output projection, before the residual add).
    PostAttn,
    /// The feed-forward input after its normalization.
    PostFfnNorm,
    /// The feed-forward block's output (after the down projection, before the residual add).
    PostFfn,
    /// The residual stream leaving a layer.
    Output,
    /// The hidden state after the final normalization (no layer index).
    FinalNorm,
    /// The output logits (no layer index).
    Logits,
}

impl Stage {
    /// Every stage, in forward order.
    pub const ALL: [Stage; 9] = [
        Stage::Embedding,
        Stage::Input,
        Stage::PostNorm,
        Stage::PostAttn,
        Stage::PostFfnNorm,
        Stage::PostFfn,
        Stage::Output,
        Stage::FinalNorm,
        Stage::Logits,
    ];

    /// Stages that belong to a layer, in forward order.
    pub const LAYER_STAGES: [Stage; 6] = [
        Stage::Input,
        Stage::PostNorm,
        Stage::PostAttn,
        Stage::PostFfnNorm,
        Stage::PostFfn,
        Stage::Output,
    ];

    /// Whether the stage is inside a layer (has a layer index).
    pub fn is_layer_stage(self) -> bool {
        !matches!(self, Stage::Embedding | Stage::FinalNorm | Stage::Logits)
    }

    /// Snake-case name (`"post_attn"`), the one serde writes.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Embedding => "embedding",
            Stage::Input => "input",
            Stage::PostNorm => "post_norm",
            Stage::PostAttn => "post_attn",
            Stage::PostFfnNorm => "post_ffn_norm",
            Stage::PostFfn => "post_ffn",
            Stage::Output => "output",
            Stage::FinalNorm => "final_norm",
            Stage::Logits => "logits",
        }
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
