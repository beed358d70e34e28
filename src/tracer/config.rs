//! What to trace: compile-time marker configs and the runtime config of the seed API.
//!
//! Every hook of [`ModelTracer`](crate::ModelTracer) starts with a test of an
//! associated `const` of its [`TraceConfig`]. For the marker types
//! [`Disabled`], [`Lightweight`] and [`Full`] that test is a literal, so a
//! disabled hook is dead code the compiler removes together with the
//! arguments it would have consumed. [`ModelTracerConfig`] is the runtime
//! variant: its consts say "may trace" and its methods read its fields.

#[doc(no_inline)]
pub use crate::activation::DEFAULT_WARMUP_LAYERS;
use crate::attention::AttentionTraceConfig;
use crate::storage::{Recorder, Storage};
#[doc(no_inline)]
pub use crate::storage::{TraceOptions, DEFAULT_HISTORY, DEFAULT_LENS_TOP_K};

/// Chooses, at compile time, which of the five trace systems may run.
///
/// A decision is made in two steps: the associated `const` (known to the
/// compiler), then the method of the same name (read at run time). The marker
/// types return their const from the method, so both steps fold away; the
/// runtime [`ModelTracerConfig`] sets every const to `true` and answers from
/// its fields.
///
/// # Writing your own config
///
/// ```
/// use model_tracer::{ModelTracer, Recorder, TraceConfig};
///
/// /// Activations and attention only.
/// #[derive(Debug, Clone, Copy, Default)]
/// struct AttentionDebug;
///
/// impl TraceConfig for AttentionDebug {
///     const ACTIVATIONS: bool = true;
///     const ATTENTION: bool = true;
///     const LOGITS: bool = false;
///     const QUANT_ERROR: bool = false;
///     const KV_CACHE: bool = false;
///     type Storage = Recorder; // `()` only when every const is false
/// }
///
/// let tracer = ModelTracer::new(AttentionDebug);
/// assert!(tracer.is_enabled());
/// ```
///
/// A config that enables a system but stores nothing is a compile-time
/// error where its tracer is built, not a tracer that silently records
/// nothing:
///
/// ```compile_fail,E0080
/// use model_tracer::{ModelTracer, TraceConfig};
///
/// #[derive(Debug, Clone, Copy, Default)]
/// struct Forgetful;
///
/// impl TraceConfig for Forgetful {
///     const ACTIVATIONS: bool = true;
///     const ATTENTION: bool = false;
///     const LOGITS: bool = false;
///     const QUANT_ERROR: bool = false;
///     const KV_CACHE: bool = false;
///     type Storage = ();
/// }
///
/// let tracer = ModelTracer::new(Forgetful);
/// ```
pub trait TraceConfig: Clone + Send + Sync + 'static {
    /// Per-layer activation statistics and anomaly detection may run.
    const ACTIVATIONS: bool;
    /// Attention-weight summaries may run.
    const ATTENTION: bool;
    /// Logit lens and logit ranks may run.
    const LOGITS: bool;
    /// Quantization error against an f32 reference may run.
    const QUANT_ERROR: bool;
    /// KV cache state may be recorded.
    const KV_CACHE: bool;
    /// With [`Self::LOGITS`]: the logit lens may run on every layer (the
    /// final norm and LM head applied to each layer's hidden state, one
    /// vocabulary-sized matmul per layer). `false` keeps the ranks of the
    /// tracked tokens on the final logits only. Defaults to `Self::LOGITS`.
    const LOGIT_LENS: bool = Self::LOGITS;
    /// With [`Self::ACTIVATIONS`]: every activation whose statistics are
    /// taken is fingerprinted too ([`crate::fingerprint`]: 16 random ±1
    /// projections, which tell apart tensors whose moments agree). Costs
    /// about 2.6 instructions per value, about as much as the statistics.
    /// Defaults to `false`.
    const FINGERPRINTS: bool = false;
    /// Any system may run; `false` means the tracer is inert.
    const ANY: bool =
        Self::ACTIVATIONS || Self::ATTENTION || Self::LOGITS || Self::QUANT_ERROR || Self::KV_CACHE;

    /// Where the tracer keeps its records: [`Recorder`] for any config that
    /// traces something, `()` for one that never does (the tracer is then
    /// zero-sized).
    type Storage: Storage;

    /// Activation statistics are on (called only when [`Self::ACTIVATIONS`]).
    #[inline(always)]
    fn activations(&self) -> bool {
        Self::ACTIVATIONS
    }
    /// Activation fingerprints are on (called only when
    /// [`Self::FINGERPRINTS`], and heeded only when activations are on).
    #[inline(always)]
    fn fingerprints(&self) -> bool {
        Self::FINGERPRINTS
    }
    /// Attention summaries are on (called only when [`Self::ATTENTION`]).
    #[inline(always)]
    fn attention(&self) -> bool {
        Self::ATTENTION
    }
    /// Logit tracing is on (called only when [`Self::LOGITS`]).
    #[inline(always)]
    fn logits(&self) -> bool {
        Self::LOGITS
    }
    /// Quantization error is on (called only when [`Self::QUANT_ERROR`]).
    #[inline(always)]
    fn quant_error(&self) -> bool {
        Self::QUANT_ERROR
    }
    /// KV cache recording is on (called only when [`Self::KV_CACHE`]).
    #[inline(always)]
    fn kv_cache(&self) -> bool {
        Self::KV_CACHE
    }
    /// The knobs the systems run with (top-k, selected layers and heads,
    /// tracked tokens, retention). Read once, when the tracer is built.
    fn options(&self) -> TraceOptions {
        TraceOptions::default()
    }
}

/// Traces nothing. `ModelTracer<Disabled>` is zero-sized and every hook on it
/// compiles to nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Disabled;

/// Production tracing: activation statistics (with anomaly detection) and KV
/// cache state. Costs a few statistics passes per layer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Lightweight;

/// Debug tracing: all five systems, including the logit lens on every layer,
/// sampled quantization-error references and activation fingerprints.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Full;

impl TraceConfig for Disabled {
    const ACTIVATIONS: bool = false;
    const ATTENTION: bool = false;
    const LOGITS: bool = false;
    const QUANT_ERROR: bool = false;
    const KV_CACHE: bool = false;
    type Storage = ();
}

impl TraceConfig for Lightweight {
    const ACTIVATIONS: bool = true;
    const ATTENTION: bool = false;
    const LOGITS: bool = false;
    const QUANT_ERROR: bool = false;
    const KV_CACHE: bool = true;
    type Storage = Recorder;
}

impl TraceConfig for Full {
    const ACTIVATIONS: bool = true;
    const ATTENTION: bool = true;
    const LOGITS: bool = true;
    const QUANT_ERROR: bool = true;
    const KV_CACHE: bool = true;
    const FINGERPRINTS: bool = true;
    type Storage = Recorder;
}

cfg_if::cfg_if! {
    if #[cfg(feature = "trace-full")] {
        /// The config chosen by cargo features: `Full` (feature `trace-full`).
        pub type DefaultTrace = Full;
    } else if #[cfg(feature = "trace-lightweight")] {
        /// The config chosen by cargo features: `Lightweight` (feature `trace-lightweight`).
        pub type DefaultTrace = Lightweight;
    } else {
        /// The config chosen by cargo features: `Disabled` (no `trace-*` feature).
        pub type DefaultTrace = Disabled;
    }
}

/// Runtime choice of trace systems (the seed API).
///
/// `ModelTracer::new(ModelTracerConfig::lightweight())` traces what the
/// fields say; the choice costs one predictable branch per hook. For tracing
/// that vanishes from the binary use the marker types instead.
///
/// ```
/// use model_tracer::ModelTracerConfig;
///
/// assert!(!ModelTracerConfig::default().is_enabled());
/// let config = ModelTracerConfig {
///     trace_activations: true,
///     trace_kv_cache: true,
///     ..Default::default()
/// };
/// assert!(config.is_enabled());
/// ```
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct ModelTracerConfig {
    /// Per-layer activation statistics and anomaly detection.
    pub trace_activations: bool,
    /// Attention-weight summaries.
    pub trace_attention: bool,
    /// Logit lens and logit ranks.
    pub trace_logits: bool,
    /// Quantization error against an f32 reference.
    pub trace_quant_error: bool,
    /// KV cache state.
    pub trace_kv_cache: bool,
    /// Activation fingerprints, taken where activation statistics are
    /// taken: needs `trace_activations` (see [`TraceConfig::FINGERPRINTS`]).
    #[cfg_attr(feature = "serde", serde(default))]
    pub trace_fingerprints: bool,
    /// Which attention heads to summarize and how.
    pub attention_config: AttentionTraceConfig,
    /// Token ids whose logit-lens trajectory is recorded (see [`TraceOptions::tracked_tokens`]).
    pub tracked_tokens: Vec<u32>,
    /// Final top-k tokens tracked when `tracked_tokens` is empty.
    pub lens_top_k: usize,
    /// Layers exempt from the vanishing rule.
    pub warmup_layers: usize,
    /// Forwards whose detailed records are kept (one per position).
    pub max_forwards: usize,
    /// Rows of a forward over several positions that get output logits
    /// and the logit lens (see [`TraceOptions::logit_rows`]).
    #[cfg_attr(feature = "serde", serde(default))]
    pub logit_rows: crate::storage::LogitRows,
}

impl Default for ModelTracerConfig {
    /// Everything off.
    fn default() -> Self {
        let o = TraceOptions::default();
        Self {
            trace_activations: false,
            trace_attention: false,
            trace_logits: false,
            trace_quant_error: false,
            trace_kv_cache: false,
            trace_fingerprints: false,
            attention_config: o.attention_config,
            tracked_tokens: o.tracked_tokens,
            lens_top_k: o.lens_top_k,
            warmup_layers: o.warmup_layers,
            max_forwards: o.max_forwards,
            logit_rows: o.logit_rows,
        }
    }
}

impl ModelTracerConfig {
    /// Activations and KV cache: what [`Lightweight`] traces.
    pub fn lightweight() -> Self {
        Self {
            trace_activations: true,
            trace_kv_cache: true,
            ..Self::default()
        }
    }

    /// All five systems and activation fingerprints: what [`Full`] traces.
    pub fn full() -> Self {
        Self {
            trace_activations: true,
            trace_attention: true,
            trace_logits: true,
            trace_quant_error: true,
            trace_kv_cache: true,
            trace_fingerprints: true,
            ..Self::default()
        }
    }

    /// The config whose systems [`describe`] names `description` (`"full"`,
    /// `"lightweight"`, `"disabled"`, or a `+`-joined list such as
    /// `"activations+logits"` or `"activations+fingerprints"`); `None` for a
    /// name it does not know.
    pub fn from_description(description: &str) -> Option<Self> {
        match description {
            "full" => return Some(Self::full()),
            "lightweight" => return Some(Self::lightweight()),
            "disabled" => return Some(Self::default()),
            _ => {}
        }
        let mut c = Self::default();
        for name in description.split('+') {
            let flag = match name {
                "activations" => &mut c.trace_activations,
                "attention" => &mut c.trace_attention,
                "logits" => &mut c.trace_logits,
                "quant_error" => &mut c.trace_quant_error,
                "kv_cache" => &mut c.trace_kv_cache,
                "fingerprints" => &mut c.trace_fingerprints,
                _ => return None,
            };
            *flag = true;
        }
        Some(c)
    }

    /// At least one system is on (fingerprints are not a system of their
    /// own: without activations they record nothing).
    pub fn is_enabled(&self) -> bool {
        self.trace_activations
            || self.trace_attention
            || self.trace_logits
            || self.trace_quant_error
            || self.trace_kv_cache
    }
}

impl TraceConfig for ModelTracerConfig {
    const ACTIVATIONS: bool = true;
    const ATTENTION: bool = true;
    const LOGITS: bool = true;
    const QUANT_ERROR: bool = true;
    const KV_CACHE: bool = true;
    const FINGERPRINTS: bool = true;
    type Storage = Recorder;

    #[inline(always)]
    fn activations(&self) -> bool {
        self.trace_activations
    }
    #[inline(always)]
    fn attention(&self) -> bool {
        self.trace_attention
    }
    #[inline(always)]
    fn logits(&self) -> bool {
        self.trace_logits
    }
    #[inline(always)]
    fn quant_error(&self) -> bool {
        self.trace_quant_error
    }
    #[inline(always)]
    fn kv_cache(&self) -> bool {
        self.trace_kv_cache
    }
    #[inline(always)]
    fn fingerprints(&self) -> bool {
        self.trace_fingerprints
    }
    fn options(&self) -> TraceOptions {
        TraceOptions {
            attention_config: self.attention_config.clone(),
            tracked_tokens: self.tracked_tokens.clone(),
            lens_top_k: self.lens_top_k,
            warmup_layers: self.warmup_layers,
            max_forwards: self.max_forwards,
            logit_rows: self.logit_rows,
        }
    }
}

/// Short name of a config's set of systems, for reports (`"disabled"`,
/// `"lightweight"`, `"full"` or a `+`-joined list).
///
/// Activation fingerprints count as a name of their own, `"fingerprints"`,
/// after `"activations"` and only with it (without activations they record
/// nothing): `"full"` is all five systems with fingerprints, as [`Full`]
/// traces; the five without them are listed, `"activations+attention+
/// logits+quant_error+kv_cache"`, and [`Lightweight`] with fingerprints is
/// `"activations+fingerprints+kv_cache"`.
/// [`ModelTracerConfig::from_description`] reads every such name back.
pub fn describe<C: TraceConfig>(config: &C) -> String {
    let activations = C::ACTIVATIONS && config.activations();
    let on = [
        (activations, "activations"),
        (
            activations && C::FINGERPRINTS && config.fingerprints(),
            "fingerprints",
        ),
        (C::ATTENTION && config.attention(), "attention"),
        (C::LOGITS && config.logits(), "logits"),
        (C::QUANT_ERROR && config.quant_error(), "quant_error"),
        (C::KV_CACHE && config.kv_cache(), "kv_cache"),
    ];
    let names: Vec<&str> = on.iter().filter(|(b, _)| *b).map(|(_, n)| *n).collect();
    match names.as_slice() {
        [] => "disabled".to_string(),
        ["activations", "kv_cache"] => "lightweight".to_string(),
        [_, _, _, _, _, _] => "full".to_string(),
        _ => names.join("+"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_turn_on_what_they_promise() {
        let l = ModelTracerConfig::lightweight();
        assert!(l.trace_activations && l.trace_kv_cache);
        assert!(!l.trace_attention && !l.trace_logits && !l.trace_quant_error);
        let f = ModelTracerConfig::full();
        assert!(f.trace_attention && f.trace_logits && f.trace_quant_error);
        assert!(!ModelTracerConfig::default().is_enabled());
        assert_eq!(describe(&l), "lightweight");
        assert_eq!(describe(&f), "full");
        assert_eq!(describe(&ModelTracerConfig::default()), "disabled");
        assert_eq!(describe(&Lightweight), "lightweight");
        assert_eq!(describe(&Full), "full");
        assert_eq!(describe(&Disabled), "disabled");
        for c in [l.clone(), f.clone(), ModelTracerConfig::default()] {
            assert_eq!(ModelTracerConfig::from_description(&describe(&c)), Some(c));
        }
        let some = ModelTracerConfig {
            trace_logits: true,
            trace_attention: true,
            ..ModelTracerConfig::default()
        };
        assert_eq!(describe(&some), "attention+logits");
        assert_eq!(
            ModelTracerConfig::from_description("attention+logits"),
            Some(some)
        );
        assert_eq!(ModelTracerConfig::from_description("attention+warp"), None);
    }

    #[test]
    fn fingerprints_are_on_in_full_only_and_need_activations() {
        const { assert!(Full::FINGERPRINTS && !Lightweight::FINGERPRINTS && !Disabled::FINGERPRINTS) };
        assert!(ModelTracerConfig::full().trace_fingerprints);
        assert!(!ModelTracerConfig::lightweight().trace_fingerprints);
        assert!(!ModelTracerConfig::default().trace_fingerprints);
        let alone = ModelTracerConfig {
            trace_fingerprints: true,
            ..ModelTracerConfig::default()
        };
        assert!(
            !alone.is_enabled(),
            "fingerprints without activations trace nothing"
        );
        assert_eq!(describe(&alone), "disabled");
        let five = ModelTracerConfig {
            trace_fingerprints: false,
            ..ModelTracerConfig::full()
        };
        assert_eq!(
            describe(&five),
            "activations+attention+logits+quant_error+kv_cache"
        );
        let light = ModelTracerConfig {
            trace_fingerprints: true,
            ..ModelTracerConfig::lightweight()
        };
        assert_eq!(describe(&light), "activations+fingerprints+kv_cache");
    }

    #[test]
    fn every_description_reads_back_as_its_config() {
        let mut names = std::collections::BTreeSet::new();
        for bits in 0u32..64 {
            let on = |b: u32| bits & (1 << b) != 0;
            let c = ModelTracerConfig {
                trace_activations: on(0),
                trace_attention: on(1),
                trace_logits: on(2),
                trace_quant_error: on(3),
                trace_kv_cache: on(4),
                // Fingerprints are described only with the activations.
                trace_fingerprints: on(5) && on(0),
                ..ModelTracerConfig::default()
            };
            let name = describe(&c);
            assert_eq!(
                ModelTracerConfig::from_description(&name).as_ref(),
                Some(&c),
                "{name}"
            );
            names.insert(name);
        }
        // 32 sets of systems, and fingerprints or not for the 16 with activations.
        assert_eq!(names.len(), 48);
    }

    #[cfg(feature = "serde")]
    #[test]
    fn a_config_serialized_before_fingerprints_still_reads() {
        let mut json = serde_json::to_value(ModelTracerConfig::lightweight()).ok();
        let removed = json
            .as_mut()
            .and_then(|v| v.as_object_mut())
            .and_then(|m| m.remove("trace_fingerprints"));
        assert_eq!(removed, Some(serde_json::Value::Bool(false)));
        let c = json.and_then(|v| serde_json::from_value::<ModelTracerConfig>(v).ok());
        assert_eq!(c, Some(ModelTracerConfig::lightweight()));
    }

    #[test]
    fn marker_consts_match_runtime_presets() {
        const { assert!(!Disabled::ANY) };
        const { assert!(Lightweight::ACTIVATIONS && Lightweight::KV_CACHE && !Lightweight::LOGITS) };
        const { assert!(Full::ACTIVATIONS && Full::ATTENTION && Full::LOGITS && Full::QUANT_ERROR) };
    }

    #[test]
    fn default_trace_follows_features() {
        let name = std::any::type_name::<DefaultTrace>();
        if cfg!(feature = "trace-full") {
            assert!(name.ends_with("::Full"), "{name}");
        } else if cfg!(feature = "trace-lightweight") {
            assert!(name.ends_with("::Lightweight"), "{name}");
        } else {
            assert!(name.ends_with("::Disabled"), "{name}");
        }
    }
}
