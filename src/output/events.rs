//! Anomalies as warning events of the `log` and `tracing` ecosystems.
//!
//! Compiled only with the `log` or `tracing` feature. At `end_forward` each
//! anomaly of the forward becomes one event at level WARN with target
//! [`TARGET`] and the structured fields `position`, `layer` (absent for the
//! embedding, final norm and logits), `stage`, `kind` (`nan`, `inf`,
//! `explosion`, `vanishing`, `residual_dominance`), `origin` (`produced`,
//! `propagated`), `count`, `total` and `value`; stage, kind and origin are
//! the names of the JSON forms. The message is the anomaly's `Display`
//! text. A serving stack routes them like any other warning.

use crate::anomaly::Anomaly;

/// Target (log) and target name (tracing) of the anomaly events.
pub const TARGET: &str = "model_tracer::anomaly";

/// Emits one warning per anomaly. Out of line: only forwards with
/// anomalies reach it.
#[inline(never)]
fn emit(anomalies: &[Anomaly]) {
    for a in anomalies {
        #[cfg(feature = "log")]
        log::warn!(
            target: TARGET,
            position = a.position,
            layer = a.layer,
            stage = a.stage.name(),
            kind = a.kind.name(),
            origin = a.origin.name(),
            count = a.count,
            total = a.total,
            value = a.value;
            "{a}"
        );
        #[cfg(feature = "tracing")]
        tracing::warn!(
            target: TARGET,
            position = a.position as u64,
            layer = a.layer.map(|l| l as u64),
            stage = a.stage.name(),
            kind = a.kind.name(),
            origin = a.origin.name(),
            count = a.count as u64,
            total = a.total as u64,
            value = f64::from(a.value),
            "{a}"
        );
    }
}

/// Emits the anomalies of a completed forward, if it has any.
#[inline(always)]
pub(crate) fn anomalies(anomalies: &[Anomaly]) {
    if !anomalies.is_empty() {
        emit(anomalies);
    }
}
