//! Structured anomalies: what went wrong, where in the forward pass, and
//! whether it started there.

use std::fmt;

use crate::stage::Stage;

/// The rule an activation broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum AnomalyKind {
    /// At least one NaN.
    #[cfg_attr(feature = "serde", serde(rename = "nan"))]
    NaN = 0,
    /// At least one +Inf or -Inf.
    Inf = 1,
    /// `max |x| > 1e6` or `std > 1e4`.
    Explosion = 2,
    /// `std < 1e-6` in a layer past the warm-up layers.
    Vanishing = 3,
    /// Residual ratio above 0.99: the layer barely changes the stream.
    ResidualDominance = 4,
}

impl AnomalyKind {
    /// Number of kinds.
    pub const COUNT: usize = 5;
    /// Every kind, in severity order.
    pub const ALL: [AnomalyKind; 5] = [
        AnomalyKind::NaN,
        AnomalyKind::Inf,
        AnomalyKind::Explosion,
        AnomalyKind::Vanishing,
        AnomalyKind::ResidualDominance,
    ];

    /// Whether the kind is a non-finite value (NaN or Inf).
    pub fn is_non_finite(self) -> bool {
        matches!(self, AnomalyKind::NaN | AnomalyKind::Inf)
    }

    /// Whether the kind is a fault (NaN, Inf, explosion) rather than a
    /// diagnostic of how the model uses its layers (vanishing, residual
    /// dominance), which healthy models can show: SmolLM2's first token,
    /// for one, carries activations so large that some layers barely move it.
    pub fn is_fault(self) -> bool {
        matches!(
            self,
            AnomalyKind::NaN | AnomalyKind::Inf | AnomalyKind::Explosion
        )
    }

    /// Snake-case name (`"nan"`, `"residual_dominance"`, ...), the one
    /// serde writes.
    pub fn name(self) -> &'static str {
        match self {
            AnomalyKind::NaN => "nan",
            AnomalyKind::Inf => "inf",
            AnomalyKind::Explosion => "explosion",
            AnomalyKind::Vanishing => "vanishing",
            AnomalyKind::ResidualDominance => "residual_dominance",
        }
    }
}

impl fmt::Display for AnomalyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Whether an anomaly started at the stage it was seen at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum Origin {
    /// The stage recorded before it was finite: the fault arose here.
    Produced,
    /// The stage recorded before it already held non-finite values.
    Propagated,
}

impl Origin {
    /// Both origins.
    pub const ALL: [Origin; 2] = [Origin::Produced, Origin::Propagated];

    /// Snake-case name (`"produced"`), the one serde writes.
    pub fn name(self) -> &'static str {
        match self {
            Origin::Produced => "produced",
            Origin::Propagated => "propagated",
        }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One broken rule at one place of one forward pass.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Anomaly {
    /// Token position of the forward pass.
    pub position: usize,
    /// Layer index; `None` for the embedding, final norm and logits.
    pub layer: Option<usize>,
    /// Stage of the forward pass.
    pub stage: Stage,
    /// Rule broken.
    pub kind: AnomalyKind,
    /// Started here or carried in.
    pub origin: Origin,
    /// Values concerned (NaN or Inf count; tensor length for the others).
    pub count: usize,
    /// Length of the tensor.
    pub total: usize,
    /// The measured value that broke the rule: max |x| or std (explosion),
    /// std (vanishing), the ratio (residual dominance); NaN/Inf for those kinds.
    #[cfg_attr(feature = "serde", serde(with = "crate::serde_float"))]
    pub value: f32,
}

impl fmt::Display for Anomaly {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "position {}, ", self.position)?;
        match self.layer {
            Some(l) => write!(f, "layer {l} {}", self.stage)?,
            None => write!(f, "{}", self.stage)?,
        }
        let origin = match self.origin {
            Origin::Produced => "produced here",
            Origin::Propagated => "propagated",
        };
        let (count, total) = (self.count, self.total);
        // A sentence for people: NaN and Inf as they are usually written,
        // not the kinds' identifiers.
        match self.kind {
            AnomalyKind::NaN => write!(f, ": NaN {origin} ({count} of {total} values)"),
            AnomalyKind::Inf => write!(f, ": Inf {origin} ({count} of {total} values)"),
            AnomalyKind::Explosion => write!(f, ": explosion (magnitude {:.3e})", self.value),
            AnomalyKind::Vanishing => write!(f, ": vanishing (std {:.3e} < 1e-6)", self.value),
            AnomalyKind::ResidualDominance => {
                write!(f, ": residual dominance (ratio {:.4} > 0.99)", self.value)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_place_kind_and_origin() {
        let a = Anomaly {
            position: 12,
            layer: Some(3),
            stage: Stage::PostAttn,
            kind: AnomalyKind::NaN,
            origin: Origin::Produced,
            count: 2,
            total: 576,
            value: f32::NAN,
        };
        let s = a.to_string();
        assert_eq!(
            s,
            "position 12, layer 3 post_attn: NaN produced here (2 of 576 values)"
        );
        let b = Anomaly {
            layer: None,
            stage: Stage::Logits,
            kind: AnomalyKind::Inf,
            origin: Origin::Propagated,
            ..a
        };
        assert!(b.to_string().contains("logits: Inf propagated"));
    }
}
