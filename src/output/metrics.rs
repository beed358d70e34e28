//! Fleet metrics: model health as Prometheus families, for an operator who
//! scrapes many replicas and alerts rather than reading reports.
//!
//! [`TraceMetrics`] registers its families into a caller's
//! [`prometheus_client::registry::Registry`] and folds every completed
//! forward into them. It is fed through the tracer's sink: a
//! [`MetricsSink`] (from [`TraceMetrics::sink`]) is a [`ForwardSink`], so
//! any engine that owns a [`ModelTracer`](crate::ModelTracer) (the
//! reference decoder, the candle model, a user's own) exports the same
//! metrics without a change to its code, and [`Tee`] sends each forward to
//! a second sink as well (a JSON Lines file, say). The fold runs once per
//! forward, in `end_forward`, never per hook.
//!
//! ```
//! use model_tracer::metrics::{TraceMetrics, MetricsSink};
//! use model_tracer::{Lightweight, ModelTracer, SinkHandle, Stage};
//! use prometheus_client::registry::Registry;
//!
//! let mut registry = Registry::default();
//! let metrics = TraceMetrics::register(&mut registry);
//!
//! // One request: a sequence with its own tracer and a sink into `metrics`.
//! let sink: MetricsSink = metrics.sink();
//! let mut tracer = ModelTracer::new(Lightweight);
//! tracer.set_sink(Some(SinkHandle::new(sink.clone())));
//! for pos in 0..2 {
//!     tracer.begin_forward(pos);
//!     tracer.activation(0, Stage::Input, &[1.0, -2.0, 3.0]);
//!     tracer.activation(0, Stage::PostAttn, &[0.5, f32::NAN, 1.0]);
//!     tracer.end_forward();
//! }
//! sink.finish_request(); // the request ended: it was corrupted at layer 0 post_attn
//!
//! let mut text = String::new();
//! prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
//! assert!(text.contains(
//!     r#"model_tracer_requests_corrupted_total{origin_layer="0",origin_stage="post_attn"} 1"#
//! ));
//! assert!(text.contains("model_tracer_forwards_total 2"));
//! ```
//!
//! # Families
//!
//! | family | type | labels |
//! |---|---|---|
//! | `model_tracer_forwards_total` | counter | — |
//! | `model_tracer_requests_total` | counter | — |
//! | `model_tracer_anomalies_total` | counter | `kind`, `layer`, `stage` |
//! | `model_tracer_requests_corrupted_total` | counter | `origin_layer`, `origin_stage` |
//! | `model_tracer_activation_rms` | gauge | `layer`, `stage` |
//! | `model_tracer_activation_max_abs` | gauge | `layer`, `stage` |
//! | `model_tracer_residual_ratio` | gauge | `layer` |
//! | `model_tracer_attention_sink_share` | gauge | `layer` |
//! | `model_tracer_kv_evictions_total` | counter | — |
//! | `model_tracer_lens_decisive_layer` | histogram | — |
//!
//! Label values: `layer` is the layer index in decimal (`"3"`), and
//! [`NO_LAYER`] (`"none"`) for the stages outside a layer (embedding,
//! final norm, logits); `stage` is the [`Stage`]'s name (`"post_attn"`);
//! `kind` the [`AnomalyKind`]'s name (`"nan"`). No label ever holds a
//! request id, a token or a position, so the series are bounded by the
//! model: a model of `L` layers traced by a [`ModelTracer`](crate::ModelTracer)
//! has at most `6·L + 3` series per (layer, stage) family (the six stages
//! of each layer, plus embedding, final norm and logits), five times that
//! for the anomalies and as many in the corrupted requests, `L` per
//! per-layer family. Records of a layer at or beyond [`MAX_LAYERS`] are
//! ignored. A family with labels appears in a scrape from its first
//! series on.
//!
//! # Gauges: a recent window
//!
//! Each gauge is an exponentially weighted moving average over the
//! forwards that recorded its series: the first sample sets it, each later
//! sample `x` moves it to `g + w·(x − g)`, with `w` the weight of the
//! newest forward ([`DEFAULT_WEIGHT`], 0.05: a forward's weight halves in
//! about 14 forwards; [`MetricsOptions::weight`] sets another). The
//! samples are
//! - activation RMS: `l2_norm / sqrt(finite values)` of the stage;
//! - activation max |x|: the stage's largest finite `|x|`;
//! - residual ratio: the layer's [`residual_ratio`](crate::LayerActivationTrace::residual_ratio), when measured;
//! - attention sink share: the weight on position 0 (the first slot,
//!   where sinks form) averaged over the layer's traced heads in the forward.
//!
//! NaN and Inf never poison a gauge: the statistics cover the finite
//! elements only (as [`TensorStats`](crate::TensorStats) does), and a
//! sample that is itself not finite (a stage with no finite element, an
//! unmeasured ratio) is skipped, leaving the gauge where it was.
//!
//! # Corrupted requests
//!
//! A request is a sequence: the forwards of one prompt and its generated
//! tokens. When it ends, the server calls
//! [`TraceMetrics::request_finished`] with the request's first non-finite
//! anomaly of origin [`Origin::Produced`] ([`first_corruption`] picks it
//! from any anomalies), or [`MetricsSink::finish_request`] (one sequence
//! per tracer) or [`MetricsSink::finish_sequence`] (forwards over several
//! sequences, by [`SequenceId`]), which pass the one the request's
//! forwards carried. `model_tracer_requests_total` counts every
//! finished request; a request that saw a NaN or Inf also counts in
//! `model_tracer_requests_corrupted_total`, labelled with the place the
//! value was produced, not the places it propagated to. A program tracing
//! one sequence calls it once per run.
//!
//! # Cost
//!
//! A fold locks the metrics once and walks the forward's records. A series
//! is created (its label strings built, its family's map entry made) the
//! first time it is seen; its handles are then cached in vectors indexed by
//! layer and stage, so a forward whose series all exist allocates nothing
//! and never touches a family's map (`benches/metrics_fold.rs` measures
//! it).

use std::fmt;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// The Prometheus client these metrics register into, re-exported so that
/// a caller names the same version (`model_tracer::metrics::prometheus_client`).
pub use prometheus_client;

use crate::activation::MAX_LAYERS;
use crate::anomaly::{Anomaly, AnomalyKind, Origin};
use crate::forward::ForwardTrace;
use crate::sequence::SequenceId;
use crate::sink::{ForwardSink, SinkFailure};
use crate::stage::Stage;

/// The `layer` label of the stages outside a layer (embedding, final norm,
/// logits).
pub const NO_LAYER: &str = "none";

/// Weight of the newest forward in every gauge's moving average.
pub const DEFAULT_WEIGHT: f64 = 0.05;

/// Buckets of `model_tracer_lens_decisive_layer` by default: layers 0 to 63.
pub const DEFAULT_LENS_LAYERS: usize = 64;

/// Most buckets `model_tracer_lens_decisive_layer` may have.
pub const MAX_LENS_BUCKETS: usize = 1024;

const STAGES: usize = Stage::ALL.len();
const KINDS: usize = AnomalyKind::COUNT;

/// How [`TraceMetrics`] folds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MetricsOptions {
    /// Weight of the newest forward in the gauges' moving averages, in
    /// `(0, 1]`; 1 makes each gauge the last forward's value. A weight out
    /// of range or not a number is replaced by [`DEFAULT_WEIGHT`].
    pub weight: f64,
    /// Layers the lens histogram has a bucket for: upper bounds `0, 1, …,
    /// lens_layers - 1` (and `+Inf`). At least 1, at most
    /// [`MAX_LENS_BUCKETS`].
    pub lens_layers: usize,
}

impl Default for MetricsOptions {
    fn default() -> Self {
        Self {
            weight: DEFAULT_WEIGHT,
            lens_layers: DEFAULT_LENS_LAYERS,
        }
    }
}

impl MetricsOptions {
    fn checked(self) -> Self {
        let weight = if self.weight > 0.0 && self.weight <= 1.0 {
            self.weight
        } else {
            DEFAULT_WEIGHT
        };
        Self {
            weight,
            lens_layers: self.lens_layers.clamp(1, MAX_LENS_BUCKETS),
        }
    }
}

type GaugeF64 = Gauge<f64, AtomicU64>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SiteLabels {
    layer: String,
    stage: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AnomalyLabels {
    kind: &'static str,
    layer: String,
    stage: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OriginLabels {
    origin_layer: String,
    origin_stage: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LayerLabels {
    layer: String,
}

/// The registered families.
struct Families {
    forwards: Counter,
    requests: Counter,
    anomalies: Family<AnomalyLabels, Counter>,
    corrupted: Family<OriginLabels, Counter>,
    rms: Family<SiteLabels, GaugeF64>,
    max_abs: Family<SiteLabels, GaugeF64>,
    residual: Family<LayerLabels, GaugeF64>,
    sink_share: Family<LayerLabels, GaugeF64>,
    kv_evictions: Counter,
    decisive: Histogram,
}

/// A gauge and the moving average it shows.
struct Ewma {
    gauge: GaugeF64,
    value: f64,
    seen: bool,
}

impl Ewma {
    fn new(gauge: GaugeF64) -> Self {
        Self {
            gauge,
            value: 0.0,
            seen: false,
        }
    }

    fn fold(&mut self, x: f64, weight: f64) {
        if !x.is_finite() {
            return;
        }
        self.value = if self.seen {
            self.value + weight * (x - self.value)
        } else {
            x
        };
        self.seen = true;
        // A plain store: the fold holds the lock, so no other writer races
        // it, and a scrape reads either value (`set` would swap, a locked
        // instruction per sample).
        self.gauge
            .inner()
            .store(self.value.to_bits(), Ordering::Relaxed);
    }
}

/// The cached series of one (layer, stage).
struct SiteSeries {
    rms: Ewma,
    max_abs: Ewma,
}

/// The cached series of one layer.
#[derive(Default)]
struct LayerSeries {
    residual: Option<Ewma>,
    sink_share: Option<Ewma>,
}

/// What the fold keeps between forwards: the series' handles by index,
/// the moving averages, and a scratch buffer.
#[derive(Default)]
struct State {
    /// By [`site_index`].
    sites: Vec<Option<SiteSeries>>,
    /// By `site_index * KINDS + kind`.
    anomalies: Vec<Option<Counter>>,
    /// By layer.
    layers: Vec<LayerSeries>,
    /// Per layer: the sum of the sink weights of this forward and the heads.
    sink_sums: Vec<(f64, u32)>,
}

struct Inner {
    families: Families,
    options: MetricsOptions,
    state: Mutex<State>,
}

/// The tracer's metrics: families registered in a Prometheus registry and
/// the fold of every forward into them (see the [module docs](self)).
///
/// Cheap to clone: clones share the families and the moving averages, so
/// a server holds one and gives each sequence's tracer a [`sink`](Self::sink).
#[derive(Clone)]
pub struct TraceMetrics {
    inner: Arc<Inner>,
}

impl fmt::Debug for TraceMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TraceMetrics")
            .field("options", &self.inner.options)
            .field("forwards", &self.inner.families.forwards.get())
            .finish_non_exhaustive()
    }
}

/// The `layer` label of a layer index.
fn layer_label(layer: Option<usize>) -> String {
    match layer {
        Some(l) => l.to_string(),
        None => NO_LAYER.to_string(),
    }
}

/// The cache slot of `(layer, stage)`: layers `0..MAX_LAYERS` and "no
/// layer"; `None` beyond.
fn site_index(layer: Option<usize>, stage: Stage) -> Option<usize> {
    let key = match layer {
        None => 0,
        Some(l) if l < MAX_LAYERS => l + 1,
        Some(_) => return None,
    };
    Some(key * STAGES + stage as usize)
}

/// The slot of `index` in `v`, growing `v` with `None` to reach it.
fn slot<T>(v: &mut Vec<Option<T>>, index: usize) -> &mut Option<T> {
    if v.len() <= index {
        v.resize_with(index + 1, || None);
    }
    &mut v[index]
}

impl TraceMetrics {
    /// Registers the families into `registry` with the default options.
    /// Names are registered as written in the [module docs](self); a
    /// registry made with a prefix (or a prefixed sub-registry) prefixes
    /// them once more, so pass `Registry::default()` or a prefix-free
    /// sub-registry to get them as documented.
    pub fn register(registry: &mut Registry) -> Self {
        Self::with_options(registry, MetricsOptions::default())
    }

    /// Registers the families into `registry`, folding with `options`.
    pub fn with_options(registry: &mut Registry, options: MetricsOptions) -> Self {
        let options = options.checked();
        let buckets = (0..options.lens_layers).map(|l| l as f64);
        let families = Families {
            forwards: Counter::default(),
            requests: Counter::default(),
            anomalies: Family::default(),
            corrupted: Family::default(),
            rms: Family::default(),
            max_abs: Family::default(),
            residual: Family::default(),
            sink_share: Family::default(),
            kv_evictions: Counter::default(),
            decisive: Histogram::new(buckets),
        };
        let f = &families;
        registry.register(
            "model_tracer_forwards",
            "Forwards folded into the metrics, one per position",
            f.forwards.clone(),
        );
        registry.register(
            "model_tracer_requests",
            "Requests (sequences) finished",
            f.requests.clone(),
        );
        registry.register(
            "model_tracer_anomalies",
            "Anomalies by kind and by the (layer, stage) where each forward first showed them",
            f.anomalies.clone(),
        );
        registry.register(
            "model_tracer_requests_corrupted",
            "Finished requests that saw a NaN or Inf, by the (layer, stage) where it was produced",
            f.corrupted.clone(),
        );
        let weight = options.weight;
        registry.register(
            "model_tracer_activation_rms",
            format!(
                "RMS of the finite activations of a (layer, stage), moving average over forwards (weight {weight})"
            ),
            f.rms.clone(),
        );
        registry.register(
            "model_tracer_activation_max_abs",
            format!(
                "Largest finite |x| of a (layer, stage), moving average over forwards (weight {weight})"
            ),
            f.max_abs.clone(),
        );
        registry.register(
            "model_tracer_residual_ratio",
            format!(
                "Share of a layer's output carried by its skip connection, moving average over forwards (weight {weight})"
            ),
            f.residual.clone(),
        );
        registry.register(
            "model_tracer_attention_sink_share",
            format!(
                "Attention weight on position 0 averaged over a layer's heads, moving average over forwards (weight {weight})"
            ),
            f.sink_share.clone(),
        );
        registry.register(
            "model_tracer_kv_evictions",
            "Positions evicted from the KV cache",
            f.kv_evictions.clone(),
        );
        registry.register(
            "model_tracer_lens_decisive_layer",
            "Logit lens: the layer that decided the selected token (log-rank rule), per forward",
            f.decisive.clone(),
        );
        Self {
            inner: Arc::new(Inner {
                families,
                options,
                state: Mutex::new(State::default()),
            }),
        }
    }

    /// The options in use (out-of-range values replaced).
    pub fn options(&self) -> MetricsOptions {
        self.inner.options
    }

    /// A sink into these metrics for one sequence's tracer (see
    /// [`MetricsSink`]).
    pub fn sink(&self) -> MetricsSink {
        MetricsSink {
            metrics: self.clone(),
            corruption: Arc::new(Mutex::new(Vec::new())),
        }
    }

    /// Forwards folded so far.
    pub fn forwards(&self) -> u64 {
        self.inner.families.forwards.get()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // The fold does not panic; if it ever did, what it left is still
        // a set of valid handles and finite averages.
        match self.inner.state.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Folds one completed forward into the families. A sink does this at
    /// every `end_forward`; call it directly with forwards read back from
    /// a trace.
    pub fn observe(&self, forward: &ForwardTrace) {
        let fam = &self.inner.families;
        let weight = self.inner.options.weight;
        fam.forwards.inc();
        let mut guard = self.state();
        let state = &mut *guard;

        for (layer, stage, stats) in forward.activations.recorded() {
            let Some(i) = site_index(layer, stage) else {
                continue;
            };
            let series = slot(&mut state.sites, i).get_or_insert_with(|| {
                let labels = SiteLabels {
                    layer: layer_label(layer),
                    stage: stage.name(),
                };
                SiteSeries {
                    rms: Ewma::new(fam.rms.get_or_create_owned(&labels)),
                    max_abs: Ewma::new(fam.max_abs.get_or_create_owned(&labels)),
                }
            });
            let finite = stats.finite_count();
            if finite > 0 {
                let rms = f64::from(stats.l2_norm) / (finite as f64).sqrt();
                series.rms.fold(rms, weight);
                series.max_abs.fold(f64::from(stats.max_abs()), weight);
            }
        }

        for l in &forward.activations.layers {
            let r = l.residual_ratio;
            if l.layer_idx >= MAX_LAYERS || r == 0.0 || !r.is_finite() {
                continue;
            }
            let series = layer_series(&mut state.layers, l.layer_idx);
            series
                .residual
                .get_or_insert_with(|| {
                    let labels = LayerLabels {
                        layer: l.layer_idx.to_string(),
                    };
                    Ewma::new(fam.residual.get_or_create_owned(&labels))
                })
                .fold(f64::from(r), weight);
        }

        if !forward.attention.is_empty() {
            for a in &forward.attention {
                if a.layer_idx >= MAX_LAYERS || !a.sink_weight.is_finite() {
                    continue;
                }
                if state.sink_sums.len() <= a.layer_idx {
                    state.sink_sums.resize(a.layer_idx + 1, (0.0, 0));
                }
                let s = &mut state.sink_sums[a.layer_idx];
                s.0 += f64::from(a.sink_weight);
                s.1 += 1;
            }
            for a in &forward.attention {
                let Some(&(sum, heads)) = state.sink_sums.get(a.layer_idx) else {
                    continue;
                };
                if heads == 0 {
                    continue; // folded already, or no finite weight
                }
                state.sink_sums[a.layer_idx] = (0.0, 0);
                let layer = a.layer_idx;
                layer_series(&mut state.layers, layer)
                    .sink_share
                    .get_or_insert_with(|| {
                        let labels = LayerLabels {
                            layer: layer.to_string(),
                        };
                        Ewma::new(fam.sink_share.get_or_create_owned(&labels))
                    })
                    .fold(sum / f64::from(heads), weight);
            }
        }

        for an in &forward.anomalies {
            let Some(site) = site_index(an.layer, an.stage) else {
                continue;
            };
            let i = site * KINDS + an.kind as usize;
            slot(&mut state.anomalies, i)
                .get_or_insert_with(|| {
                    fam.anomalies.get_or_create_owned(&AnomalyLabels {
                        kind: an.kind.name(),
                        layer: layer_label(an.layer),
                        stage: an.stage.name(),
                    })
                })
                .inc();
        }
        drop(guard);

        if let Some(kv) = &forward.kv_cache {
            if kv.evictions_this_step > 0 {
                fam.kv_evictions.inc_by(kv.evictions_this_step as u64);
            }
        }

        if let Some(lens) = &forward.logits {
            let decisive = lens
                .selected_token
                .and_then(|id| lens.token(id))
                .and_then(|t| t.decisive_layer_log_rank());
            if let Some(layer) = decisive {
                fam.decisive.observe(layer as f64);
            }
        }
    }

    /// Counts a finished request, given its first non-finite anomaly of
    /// origin [`Origin::Produced`] (`None` for a clean request;
    /// [`first_corruption`] picks it). `model_tracer_requests_total` counts
    /// every call; a NaN or Inf anomaly also counts in
    /// `model_tracer_requests_corrupted_total{origin_layer, origin_stage}`
    /// at its layer and stage. An anomaly of another kind counts the
    /// request as clean, and one of a layer at or beyond [`MAX_LAYERS`] is
    /// not labelled (the request still counts).
    pub fn request_finished(&self, corruption: Option<&Anomaly>) {
        let fam = &self.inner.families;
        fam.requests.inc();
        let Some(a) = corruption.filter(|a| a.kind.is_non_finite()) else {
            return;
        };
        if a.layer.is_some_and(|l| l >= MAX_LAYERS) {
            return;
        }
        fam.corrupted
            .get_or_create(&OriginLabels {
                origin_layer: layer_label(a.layer),
                origin_stage: a.stage.name(),
            })
            .inc();
    }
}

fn layer_series(layers: &mut Vec<LayerSeries>, layer: usize) -> &mut LayerSeries {
    if layers.len() <= layer {
        layers.resize_with(layer + 1, LayerSeries::default);
    }
    &mut layers[layer]
}

/// The anomaly that marks a request as corrupted: the first non-finite
/// (NaN or Inf) anomaly of origin [`Origin::Produced`] among `anomalies`
/// (in the order given: forward after forward, each forward's in forward
/// order), else the first non-finite one; `None` when none is non-finite.
pub fn first_corruption<'a>(
    anomalies: impl IntoIterator<Item = &'a Anomaly>,
) -> Option<&'a Anomaly> {
    let mut fallback = None;
    for a in anomalies {
        if !a.kind.is_non_finite() {
            continue;
        }
        if a.origin == Origin::Produced {
            return Some(a);
        }
        fallback = fallback.or(Some(a));
    }
    fallback
}

/// Sequences whose corruption a [`MetricsSink`] remembers at once: a
/// sequence corrupted beyond them forgets the oldest one (whose request
/// then finishes clean). A server that finishes its requests holds at
/// most its live sequences.
pub const MAX_PENDING_SEQUENCES: usize = 4096;

/// A [`ForwardSink`] into [`TraceMetrics`] for the requests of one tracer.
///
/// Every forward it receives is folded into the shared metrics; it also
/// remembers each request's corruption (the first non-finite anomaly of
/// origin `Produced`, else the first non-finite one, as
/// [`first_corruption`] picks), which the call at the request's end
/// reports. A request is the one-sequence API's forwards
/// ([`ForwardTrace::sequence`] `None`; ended by
/// [`finish_request`](Self::finish_request)) or the rows of one
/// [`SequenceId`] in forwards over several sequences (ended by
/// [`finish_sequence`](Self::finish_sequence), beside the tracer's
/// `end_sequence`). Clones share that memory: keep one clone, install the
/// other in the tracer (`SinkHandle::new(sink.clone())`). Writing never
/// fails.
#[derive(Clone)]
pub struct MetricsSink {
    metrics: TraceMetrics,
    corruption: Arc<Mutex<Pending>>,
}

/// The corruption of each unfinished request, by sequence (`None`: the
/// one-sequence API), oldest first.
type Pending = Vec<(Option<SequenceId>, Anomaly)>;

impl fmt::Debug for MetricsSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MetricsSink")
            .field("pending", &self.pending().len())
            .finish_non_exhaustive()
    }
}

impl MetricsSink {
    /// The metrics this sink folds into.
    pub fn metrics(&self) -> &TraceMetrics {
        &self.metrics
    }

    fn pending(&self) -> MutexGuard<'_, Pending> {
        match self.corruption.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    fn corruption_at(&self, sequence: Option<SequenceId>) -> Option<Anomaly> {
        self.pending()
            .iter()
            .find(|(s, _)| *s == sequence)
            .map(|&(_, a)| a)
    }

    /// The corruption of the current one-sequence request so far.
    pub fn corruption(&self) -> Option<Anomaly> {
        self.corruption_at(None)
    }

    /// The corruption of sequence `id`'s request so far.
    pub fn sequence_corruption(&self, id: SequenceId) -> Option<Anomaly> {
        self.corruption_at(Some(id))
    }

    fn finish(&self, sequence: Option<SequenceId>) {
        let corruption = {
            let mut pending = self.pending();
            let i = pending.iter().position(|(s, _)| *s == sequence);
            i.map(|i| pending.remove(i).1)
        };
        self.metrics.request_finished(corruption.as_ref());
    }

    /// Ends the current one-sequence request: counts it (and its
    /// corruption) with [`TraceMetrics::request_finished`], and forgets the
    /// corruption, so that the sink serves the next request of the same
    /// tracer.
    pub fn finish_request(&self) {
        self.finish(None);
    }

    /// Ends the request of sequence `id` (whose rows ran in forwards over
    /// several sequences), as [`finish_request`](Self::finish_request)
    /// ends the one-sequence request.
    pub fn finish_sequence(&self, id: SequenceId) {
        self.finish(Some(id));
    }

    fn remember(&self, forward: &ForwardTrace) {
        let Some(found) = first_corruption(&forward.anomalies) else {
            return;
        };
        let mut pending = self.pending();
        match pending.iter_mut().find(|(s, _)| *s == forward.sequence) {
            Some((_, kept)) => {
                if kept.origin != Origin::Produced && found.origin == Origin::Produced {
                    *kept = *found;
                }
            }
            None => {
                if pending.len() >= MAX_PENDING_SEQUENCES {
                    pending.remove(0);
                }
                pending.push((forward.sequence, *found));
            }
        }
    }
}

impl ForwardSink for MetricsSink {
    fn write_forward(&mut self, forward: &ForwardTrace) -> io::Result<()> {
        self.metrics.observe(forward);
        self.remember(forward);
        Ok(())
    }
}

/// Sends each forward to two sinks: a JSON Lines file and the metrics,
/// say.
///
/// Both sinks receive every forward, the first one first. A sink that
/// fails stops receiving forwards (as a [`SinkHandle`](crate::SinkHandle)
/// would stop it) and the other goes on; its failure is kept in the
/// [`TeeStatus`]. The tee itself reports an error, which stops it, only
/// once both have failed.
pub struct Tee<A, B> {
    first: A,
    second: B,
    status: TeeStatus,
}

impl<A, B> fmt::Debug for Tee<A, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tee")
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

/// The failures of a [`Tee`]'s two sinks, shared with the tee: take it
/// with [`Tee::status`] before installing the tee.
#[derive(Clone, Default)]
pub struct TeeStatus {
    failures: Arc<Mutex<[Option<SinkFailure>; 2]>>,
}

impl fmt::Debug for TeeStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TeeStatus")
            .field("first", &self.first())
            .field("second", &self.second())
            .finish()
    }
}

impl TeeStatus {
    fn get(&self) -> MutexGuard<'_, [Option<SinkFailure>; 2]> {
        match self.failures.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Why the first sink stopped, if it did.
    pub fn first(&self) -> Option<SinkFailure> {
        self.get()[0].clone()
    }

    /// Why the second sink stopped, if it did.
    pub fn second(&self) -> Option<SinkFailure> {
        self.get()[1].clone()
    }
}

impl<A: ForwardSink, B: ForwardSink> Tee<A, B> {
    /// A sink writing to `first`, then to `second`.
    pub fn new(first: A, second: B) -> Self {
        Self {
            first,
            second,
            status: TeeStatus::default(),
        }
    }

    /// The shared record of the two sinks' failures.
    pub fn status(&self) -> TeeStatus {
        self.status.clone()
    }
}

fn failure(forward: &ForwardTrace, e: &io::Error) -> SinkFailure {
    SinkFailure {
        position: forward.position,
        kind: e.kind(),
        message: e.to_string(),
    }
}

impl<A: ForwardSink, B: ForwardSink> ForwardSink for Tee<A, B> {
    fn write_forward(&mut self, forward: &ForwardTrace) -> io::Result<()> {
        let mut failures = self.status.get();
        if failures[0].is_none() {
            if let Err(e) = self.first.write_forward(forward) {
                failures[0] = Some(failure(forward, &e));
            }
        }
        if failures[1].is_none() {
            if let Err(e) = self.second.write_forward(forward) {
                failures[1] = Some(failure(forward, &e));
            }
        }
        match &*failures {
            [Some(_), Some(b)] => Err(io::Error::new(
                b.kind,
                format!("both sinks failed; the second: {}", b.message),
            )),
            _ => Ok(()),
        }
    }

    fn tracer_config(&mut self, description: &str) {
        self.first.tracer_config(description);
        self.second.tracer_config(description);
    }
}
