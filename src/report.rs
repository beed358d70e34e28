//! A self-contained HTML report of a traced run.
//!
//! [`write_html`] writes one HTML file with inline CSS, JavaScript and SVG:
//! nothing is fetched from the network, the file can be mailed or attached
//! to a bug report. It shows the five trace systems:
//!
//! - **activation health**: a layers × positions heatmap of a statistic
//!   chosen with a selector (std, L2 norm, max |x|, |mean|) at a chosen
//!   stage, with every anomaly marked where it first appeared;
//! - **attention**: layers × heads grids of sink share and entropy, and for a
//!   chosen query position the top-k attended tokens of a head, shown on the
//!   token strings;
//! - **logit lens**: tracked tokens × layers coloured by rank, with the
//!   decisive layer (largest log-rank gain) marked;
//! - **quantization error**: bricks × layers coloured by cosine similarity,
//!   with the worst brick named;
//! - **KV cache**: utilization, hit rate and evictions over the steps.
//!
//! The trace data is embedded as JSON in a `<script type="application/json">`
//! element in which `<`, `>` and `&` are escaped (`\u003c` ...), so no
//! token text can close the element; the script renders every token string
//! with `textContent`, never as markup. Static text written by Rust is
//! HTML-escaped. When rendering succeeds the script sets `data-status="ok"`
//! on `<body>` (`"error"` plus a visible message otherwise) and
//! `data-rendered` to the number of cells drawn per section.
//!
//! Non-finite numbers (a NaN mean, an infinite SNR) are embedded as `null`
//! and shown as "n/a"; NaN and Inf counts are shown as data.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::{self, Write};

use crate::activation::Stage;
use crate::anomaly::Origin;
use crate::config::TraceConfig;
use crate::kv_cache::KvCacheStateTrace;
use crate::quant::BrickId;
use crate::summary::TraceSummary;
use crate::tracer::{ForwardTrace, ModelTracer};

/// Positions of context shown before a query in the attention view.
pub const CONTEXT_WINDOW: usize = 48;

/// The model a report describes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ModelInfo {
    /// Display name (a file name, "synthetic tiny", ...).
    pub name: String,
    /// Transformer layers.
    pub layers: usize,
    /// Query heads per layer.
    pub heads: usize,
    /// Key/value heads per layer.
    pub kv_heads: usize,
    /// Hidden size.
    pub dim: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// KV cache capacity, in positions (0 when unknown).
    pub kv_capacity: usize,
    /// First cache positions never evicted (StreamingLLM's attention
    /// sinks). Attention summaries index the cache in chronological order;
    /// once the cache has evicted, slot `i` holds position `i` for
    /// `i < kv_sinks` and a recent position otherwise. 0 for a plain
    /// sliding window.
    pub kv_sinks: usize,
}

/// Everything [`write_html`] shows.
#[derive(Debug, Clone)]
pub struct ReportInput<'a> {
    /// Page title.
    pub title: String,
    /// The model.
    pub model: ModelInfo,
    /// The systems traced (`"full"`, `"lightweight"`, ...).
    pub config: String,
    /// The session summary (attention grid, quantization grid, totals).
    pub summary: TraceSummary,
    /// The retained forwards, in order (heatmaps, per-position views).
    pub forwards: Vec<&'a ForwardTrace>,
    /// KV cache steps, oldest first.
    pub kv_steps: Vec<KvCacheStateTrace>,
    /// Text of the token at each absolute position (index = position).
    /// Positions without text are shown as `#position`.
    pub position_text: Vec<String>,
    /// Text of vocabulary ids (tracked and chosen tokens of the logit
    /// lens); see [`token_ids`](Self::token_ids). Missing ids are shown as
    /// `<id>`.
    pub token_text: BTreeMap<u32, String>,
}

impl<'a> ReportInput<'a> {
    /// The input for `tracer`'s retained forwards, summary and KV steps;
    /// fill [`position_text`](Self::position_text) and
    /// [`token_text`](Self::token_text) to show token strings.
    pub fn from_tracer<C: TraceConfig>(tracer: &'a ModelTracer<C>, model: ModelInfo) -> Self {
        let summary = tracer.summary();
        Self {
            title: format!("model-tracer report: {}", model.name),
            config: summary.config.clone(),
            model,
            summary,
            forwards: tracer.forwards().collect(),
            kv_steps: tracer
                .kv_session()
                .map(|s| s.steps.iter().copied().collect())
                .unwrap_or_default(),
            position_text: Vec::new(),
            token_text: BTreeMap::new(),
        }
    }

    /// The vocabulary ids the report names: tracked and chosen tokens of
    /// the logit lens.
    pub fn token_ids(&self) -> BTreeSet<u32> {
        let mut ids = BTreeSet::new();
        for f in &self.forwards {
            if let Some(l) = &f.logits {
                ids.extend(l.tokens.iter().map(|t| t.token_id));
                ids.extend(l.selected_token);
            }
        }
        ids
    }
}

/// Absolute position held by cache slot `slot` when the query at
/// `query_pos` attended `context_len` slots, with `sinks` pinned slots
/// (`None` when the layout is not a StreamingLLM cache).
pub fn slot_position(
    query_pos: usize,
    context_len: usize,
    sinks: usize,
    slot: usize,
) -> Option<usize> {
    if slot >= context_len {
        return None;
    }
    let seen = query_pos.checked_add(1)?;
    if context_len == seen {
        return Some(slot);
    }
    if context_len > seen {
        return None;
    }
    let sinks = sinks.min(context_len);
    if slot < sinks {
        Some(slot)
    } else {
        Some(seen - (context_len - slot))
    }
}

/// Escapes `s` for HTML text and attribute values.
pub fn escape_html(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A JSON text that is safe inside a `<script>` element: no `<`, `>` or
/// `&` (escaped as `\u003c` ...), no U+2028/U+2029.
struct Json(String);

impl Json {
    fn raw(&mut self, s: &str) -> &mut Self {
        self.0.push_str(s);
        self
    }

    fn str(&mut self, s: &str) -> &mut Self {
        self.0.push('"');
        for c in s.chars() {
            match c {
                '"' => self.0.push_str("\\\""),
                '\\' => self.0.push_str("\\\\"),
                '\n' => self.0.push_str("\\n"),
                '\r' => self.0.push_str("\\r"),
                '\t' => self.0.push_str("\\t"),
                '<' | '>' | '&' | '\u{2028}' | '\u{2029}' => {
                    let _ = write!(self.0, "\\u{:04x}", c as u32);
                }
                c if (c as u32) < 0x20 || c == '\u{7f}' => {
                    let _ = write!(self.0, "\\u{:04x}", c as u32);
                }
                c => self.0.push(c),
            }
        }
        self.0.push('"');
        self
    }

    fn num(&mut self, v: f32) -> &mut Self {
        if !v.is_finite() {
            return self.raw("null");
        }
        let a = v.abs();
        if a != 0.0 && !(1e-4..1e6).contains(&a) {
            let _ = write!(self.0, "{v:e}");
        } else {
            let _ = write!(self.0, "{v}");
        }
        self
    }

    fn int(&mut self, v: usize) -> &mut Self {
        let _ = write!(self.0, "{v}");
        self
    }

    fn opt_int(&mut self, v: Option<usize>) -> &mut Self {
        match v {
            Some(v) => self.int(v),
            None => self.raw("null"),
        }
    }

    fn key(&mut self, k: &str) -> &mut Self {
        self.str(k).raw(":")
    }

    /// Writes `items` as an array, each through `f`.
    fn arr<T>(&mut self, items: impl IntoIterator<Item = T>, mut f: impl FnMut(&mut Self, T)) {
        self.0.push('[');
        for (i, item) in items.into_iter().enumerate() {
            if i > 0 {
                self.0.push(',');
            }
            f(self, item);
        }
        self.0.push(']');
    }
}

fn origin_name(o: Origin) -> &'static str {
    match o {
        Origin::Produced => "produced",
        Origin::Propagated => "propagated",
    }
}

/// The embedded data: see the script for how each array is read.
fn data_json(input: &ReportInput<'_>) -> String {
    let mut j = Json(String::with_capacity(64 * 1024));
    let m = &input.model;
    let s = &input.summary;
    j.raw("{");
    j.key("title").str(&input.title).raw(",");
    j.key("config").str(&input.config).raw(",");
    j.key("model").raw("{");
    j.key("name").str(&m.name).raw(",");
    for (k, v) in [
        ("layers", m.layers),
        ("heads", m.heads),
        ("kv_heads", m.kv_heads),
        ("dim", m.dim),
        ("vocab", m.vocab),
        ("kv_capacity", m.kv_capacity),
        ("kv_sinks", m.kv_sinks),
    ] {
        j.key(k).int(v).raw(",");
    }
    j.key("seen_layers")
        .int(
            input
                .forwards
                .iter()
                .map(|f| f.activations.layers.len())
                .chain(s.layers.iter().map(|l| l.layer + 1))
                .chain(s.heads.iter().map(|h| h.layer + 1))
                .max()
                .unwrap_or(0),
        )
        .raw("},");

    j.key("summary").raw("{");
    j.key("forwards").int(s.forwards).raw(",");
    j.key("positions");
    match s.positions {
        Some((a, b)) => j.raw("[").int(a).raw(",").int(b).raw("]"),
        None => j.raw("null"),
    };
    j.raw(",");
    j.key("anomaly_counts");
    j.arr(crate::AnomalyKind::ALL, |j, k| {
        j.raw("[").str(k.name()).raw(",");
        j.int(s.anomaly_counts[k as usize]).raw("]");
    });
    j.raw(",");
    j.key("first_anomaly");
    match &s.first_anomaly {
        Some(a) => j.str(&a.to_string()),
        None => j.raw("null"),
    };
    j.raw(",");
    j.key("decisive");
    j.arr(&s.decisive_layers, |j, &(l, c)| {
        j.raw("[").int(l).raw(",").int(c).raw("]");
    });
    j.raw(",");
    j.key("won");
    j.arr(&s.won_at_layers, |j, &(l, c)| {
        j.raw("[").int(l).raw(",").int(c).raw("]");
    });
    j.raw(",");
    j.key("mean_kl");
    match s.mean_kl_divergence {
        Some(v) => j.num(v),
        None => j.raw("null"),
    };
    j.raw(",");
    j.key("top1_agreement");
    match s.top1_agreement {
        Some(v) => j.num(v),
        None => j.raw("null"),
    };
    j.raw("},");

    j.key("stages");
    j.arr(Stage::LAYER_STAGES, |j, st| {
        j.str(st.name());
    });
    j.raw(",");

    // Positions whose text is shown: the forwards, the context before each
    // query, and every attended position.
    let mut wanted = BTreeSet::new();
    j.key("fw");
    j.arr(&input.forwards, |j, f| {
        wanted.extend(f.position.saturating_sub(CONTEXT_WINDOW)..=f.position);
        j.raw("{");
        j.key("p").int(f.position).raw(",");
        j.key("sel")
            .opt_int(
                f.logits
                    .as_ref()
                    .and_then(|l| l.selected_token)
                    .map(|t| t as usize),
            )
            .raw(",");
        // a: [layer|null, stage, count, mean, std, l2, max_abs, nan, inf]
        j.key("a");
        j.arr(f.activations.recorded(), |j, (layer, stage, st)| {
            j.raw("[")
                .opt_int(layer)
                .raw(",")
                .str(stage.name())
                .raw(",");
            j.int(st.count).raw(",").num(st.mean).raw(",").num(st.std);
            j.raw(",")
                .num(st.l2_norm)
                .raw(",")
                .num(st.max_abs())
                .raw(",");
            j.int(st.nan_count).raw(",").int(st.inf_count).raw("]");
        });
        j.raw(",");
        // an: [layer|null, stage, kind, origin, text]
        j.key("an");
        j.arr(&f.anomalies, |j, a| {
            j.raw("[")
                .opt_int(a.layer)
                .raw(",")
                .str(a.stage.name())
                .raw(",");
            j.str(a.kind.name())
                .raw(",")
                .str(origin_name(a.origin))
                .raw(",");
            j.str(&a.to_string()).raw("]");
        });
        j.raw(",");
        // at: [layer, head, context_len, sink_weight, entropy,
        //      normalized_entropy, tail_mass, [positions], [weights]]
        j.key("at");
        j.arr(&f.attention, |j, t| {
            j.raw("[")
                .int(t.layer_idx)
                .raw(",")
                .int(t.head_idx)
                .raw(",");
            j.int(t.context_len).raw(",").num(t.sink_weight).raw(",");
            j.num(t.entropy)
                .raw(",")
                .num(t.normalized_entropy())
                .raw(",");
            j.num(t.tail_mass).raw(",");
            j.arr(&t.top_k_positions, |j, &slot| {
                let p = slot_position(t.query_pos, t.context_len, m.kv_sinks, slot);
                if let Some(p) = p {
                    wanted.insert(p);
                }
                j.opt_int(p);
            });
            j.raw(",");
            j.arr(&t.top_k_weights, |j, &w| {
                j.num(w);
            });
            j.raw("]");
        });
        j.raw(",");
        // lens: [token, [layers], [ranks], decisive|null, won|null]
        j.key("lens");
        j.arr(f.logits.iter().flat_map(|l| &l.tokens), |j, t| {
            j.raw("[").int(t.token_id as usize).raw(",");
            j.arr(0..t.ranks.len(), |j, i| {
                j.int(t.layer_at(i));
            });
            j.raw(",");
            j.arr(&t.ranks, |j, &r| {
                j.int(r);
            });
            j.raw(",").opt_int(t.decisive_layer_log_rank()).raw(",");
            j.opt_int(t.won_at_layer()).raw("]");
        });
        j.raw("}");
    });
    j.raw(",");

    // heads: [layer, head, sink_share, mean_sink_weight,
    //         mean_normalized_entropy, mean_tail_mass, recency_share, records]
    j.key("heads");
    j.arr(&s.heads, |j, h| {
        j.raw("[").int(h.layer).raw(",").int(h.head).raw(",");
        j.num(h.sink_share())
            .raw(",")
            .num(h.mean_sink_weight)
            .raw(",");
        j.num(h.mean_normalized_entropy)
            .raw(",")
            .num(h.mean_tail_mass);
        j.raw(",")
            .num(h.recency_share())
            .raw(",")
            .int(h.records)
            .raw("]");
    });
    j.raw(",");

    j.key("brick_names");
    j.arr(BrickId::ALL, |j, b| {
        j.str(b.name());
    });
    j.raw(",");
    // bricks: [brick, layer, type, samples, mean_cosine, min_cosine, mean_snr_db]
    j.key("bricks");
    j.arr(&s.brick_layers, |j, b| {
        j.raw("[")
            .str(b.brick.name())
            .raw(",")
            .int(b.layer)
            .raw(",");
        j.str(b.quant_type.name()).raw(",").int(b.samples).raw(",");
        j.num(b.mean_cosine).raw(",").num(b.min_cosine).raw(",");
        j.num(b.mean_snr_db).raw("]");
    });
    j.raw(",");
    // brick_summary: [brick, samples, mean_cosine, critical]
    j.key("brick_summary");
    j.arr(&s.bricks, |j, b| {
        j.raw("[")
            .str(b.brick.name())
            .raw(",")
            .int(b.samples)
            .raw(",");
        j.num(b.mean_cosine).raw(",").int(b.critical).raw("]");
    });
    j.raw(",");
    j.key("worst");
    match &s.worst_brick {
        Some(w) => {
            j.raw("{");
            j.key("brick").str(w.brick.name()).raw(",");
            j.key("layer").int(w.layer_idx).raw(",");
            j.key("type").str(w.quant_type.name()).raw(",");
            j.key("cosine").num(w.cosine_similarity).raw(",");
            j.key("snr_db").num(w.snr_db).raw(",");
            j.key("max_abs_error").num(w.max_abs_error).raw("}");
        }
        None => {
            j.raw("null");
        }
    }
    j.raw(",");

    // kv: [step, utilization, hit_rate, evictions, valid, max, bytes]
    j.key("kv");
    j.arr(&input.kv_steps, |j, k| {
        j.raw("[")
            .int(k.step)
            .raw(",")
            .num(k.utilization())
            .raw(",");
        j.num(k.cache_hit_rate)
            .raw(",")
            .int(k.evictions_this_step)
            .raw(",");
        j.int(k.valid_positions)
            .raw(",")
            .int(k.max_positions)
            .raw(",");
        j.int(k.cache_size_bytes).raw("]");
    });
    j.raw(",");
    j.key("kv_total");
    match &s.kv_cache {
        Some(k) => {
            j.raw("{");
            j.key("steps").int(k.steps).raw(",");
            j.key("evictions").int(k.total_evictions).raw(",");
            j.key("peak_utilization").num(k.peak_utilization).raw(",");
            j.key("avg_hit_rate").num(k.avg_hit_rate).raw(",");
            j.key("peak_bytes").int(k.peak_memory_bytes).raw(",");
            j.key("reused").int(k.total_reused).raw(",");
            j.key("computed").int(k.total_computed).raw("}");
        }
        None => {
            j.raw("null");
        }
    }
    j.raw(",");

    j.key("ptext").raw("{");
    let mut first = true;
    for p in wanted {
        if let Some(t) = input.position_text.get(p) {
            if !first {
                j.raw(",");
            }
            first = false;
            j.str(&p.to_string()).raw(":").str(t);
        }
    }
    j.raw("},");
    j.key("vocab").raw("{");
    for (i, (id, t)) in input.token_text.iter().enumerate() {
        if i > 0 {
            j.raw(",");
        }
        j.str(&id.to_string()).raw(":").str(t);
    }
    j.raw("}}");
    j.0
}

/// Writes the report of `input` as one self-contained HTML file.
pub fn write_html(out: &mut impl Write, input: &ReportInput<'_>) -> io::Result<()> {
    let title = escape_html(&input.title);
    let data = data_json(input);
    let mut page = String::with_capacity(data.len() + STYLE.len() + SCRIPT.len() + 4096);
    page.push_str("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n");
    let _ = writeln!(page, "<title>{title}</title>");
    page.push_str("<style>");
    page.push_str(STYLE);
    page.push_str("</style>\n</head>\n<body data-status=\"loading\">\n");
    let _ = writeln!(page, "<header><h1>{title}</h1><p id=\"meta\"></p></header>");
    page.push_str(BODY);
    page.push_str("<script type=\"application/json\" id=\"trace-data\">");
    page.push_str(&data);
    page.push_str("</script>\n<script>");
    page.push_str(SCRIPT);
    page.push_str("</script>\n</body>\n</html>\n");
    out.write_all(page.as_bytes())
}

const STYLE: &str = r#"
:root{--fg:#1d232b;--mut:#5d6876;--bg:#f6f7f9;--card:#fff;--line:#dde1e6}
*{box-sizing:border-box}
body{margin:0;padding:14px 18px;font:13px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--fg);background:var(--bg)}
header h1{font-size:19px;margin:0 0 2px}
#meta{margin:0 0 10px;color:var(--mut)}
#status.error{display:block;background:#fde2e1;color:#8a1c13;padding:8px;border-radius:6px;white-space:pre-wrap}
#status{display:none}
main{display:grid;grid-template-columns:repeat(2,minmax(0,1fr));gap:12px}
section{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:10px 12px;min-width:0}
section.wide{grid-column:1/-1}
h2{font-size:15px;margin:0 0 6px}
.controls{display:flex;flex-wrap:wrap;gap:10px;align-items:center;margin:0 0 6px;color:var(--mut)}
select{font:inherit;padding:1px 4px}
.note{color:var(--mut);margin:4px 0}
.empty{color:var(--mut);font-style:italic}
svg{display:block;max-width:100%;height:auto}
svg text{font:10px system-ui,sans-serif;fill:#333}
svg .cell{stroke:#fff;stroke-width:.5}
svg .sel{fill:none;stroke:#e4572e;stroke-width:2}
.row{display:flex;gap:14px;flex-wrap:wrap;align-items:flex-start}
.tokens{font:12px ui-monospace,SFMono-Regular,Menlo,monospace;line-height:2.1;margin:6px 0}
.tok{white-space:pre-wrap;word-break:break-all;padding:1px 2px;margin:0 1px;border-radius:3px;border:1px solid #e8ebef}
td.l{max-width:260px;white-space:pre-wrap;word-break:break-all}
.tok.q{outline:2px solid #e4572e}
table{border-collapse:collapse;font-size:12px}
td,th{padding:1px 6px;text-align:right;border-bottom:1px solid #eef0f3}
th{color:var(--mut);font-weight:600}
td.l,th.l{text-align:left}
.bar{display:inline-block;height:9px;background:#3b528b;vertical-align:middle}
.legend{display:flex;gap:10px;flex-wrap:wrap;color:var(--mut);font-size:11px;margin-top:4px}
.sw{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:3px;vertical-align:-1px}
.stat{display:inline-block;margin-right:14px}
.stat b{font-size:14px}
.warn{color:#b3261e}
"#;

const BODY: &str = r#"<div id="status"></div>
<main>
<section class="wide" id="activations"><h2>Activation health</h2>
<div class="controls"><label>statistic <select id="act-stat"><option value="std">std</option><option value="l2">L2 norm</option><option value="maxabs">max |x|</option><option value="mean">|mean|</option></select></label>
<label>stage <select id="act-stage"></select></label><span id="act-range"></span></div>
<div id="act-plot"></div><div class="legend" id="act-legend"></div></section>
<section id="attention"><h2>Attention</h2>
<div class="controls"><label>query position <select id="att-pos"></select></label><label>layer <select id="att-layer"></select></label><label>head <select id="att-head"></select></label></div>
<div class="row"><div id="att-grid"></div><div id="att-top"></div></div>
<div class="tokens" id="att-tokens"></div></section>
<section id="lens"><h2>Logit lens</h2>
<div class="controls"><label>position <select id="lens-pos"></select></label></div>
<div id="lens-plot"></div><div id="lens-hist"></div></section>
<section id="quant"><h2>Quantization error</h2>
<div class="controls"><label>cosine <select id="q-agg"><option value="mean">mean</option><option value="min">min</option></select></label></div>
<p class="note" id="q-worst"></p><div id="q-plot"></div><div id="q-table"></div></section>
<section id="kv"><h2>KV cache</h2><div id="kv-stats"></div><div id="kv-plot"></div></section>
</main>
"#;

const SCRIPT: &str = r##"
(function () {
"use strict";
var body = document.body;
function fail(msg) {
  body.setAttribute("data-status", "error");
  var st = document.getElementById("status");
  if (st) { st.className = "error"; st.textContent = "The report script failed: " + msg; }
}
window.addEventListener("error", function (ev) { fail(String(ev.message)); });
var SVGNS = "http://www.w3.org/2000/svg";
function h(tag, attrs, text) {
  var e = document.createElement(tag);
  if (attrs) for (var k in attrs) e.setAttribute(k, attrs[k]);
  if (text !== undefined && text !== null) e.textContent = text;
  return e;
}
function s(tag, attrs, text) {
  var e = document.createElementNS(SVGNS, tag);
  if (attrs) for (var k in attrs) e.setAttribute(k, attrs[k]);
  if (text !== undefined && text !== null) e.textContent = text;
  return e;
}
function tip(el, text) { el.appendChild(s("title", null, text)); return el; }
function clear(el) { while (el.firstChild) el.removeChild(el.firstChild); return el; }
function byId(id) { return document.getElementById(id); }
function fmt(v) {
  if (v === null || v === undefined || !isFinite(v)) return "n/a";
  var a = Math.abs(v);
  if (a !== 0 && (a >= 1e5 || a < 1e-3)) return v.toExponential(2);
  return String(+v.toPrecision(4));
}
function vis(t) { return String(t).replace(/\n/g, "\u23ce").replace(/\t/g, "\u21e5"); }
var VIRIDIS = [[68,1,84],[59,82,139],[33,145,140],[94,201,98],[253,231,37]];
var RDYLGN = [[215,48,39],[252,141,89],[254,224,139],[145,207,96],[26,152,80]];
var BLUES = [[247,251,255],[198,219,239],[107,174,214],[33,113,181],[8,48,107]];
function ramp(stops, t) {
  if (!(t >= 0)) t = 0;
  if (t > 1) t = 1;
  var x = t * (stops.length - 1), i = Math.min(stops.length - 2, Math.floor(x)), f = x - i;
  var a = stops[i], b = stops[i + 1], c = [];
  for (var k = 0; k < 3; k++) c.push(Math.round(a[k] + (b[k] - a[k]) * f));
  return "rgb(" + c.join(",") + ")";
}
function option(sel, value, text) { sel.appendChild(h("option", { value: String(value) }, text)); }
function legendItem(parent, color, text, ring) {
  var sp = h("span");
  var sw = h("span", { "class": "sw" });
  sw.style.background = ring ? "transparent" : color;
  if (ring) sw.style.border = "2px solid " + color;
  sp.appendChild(sw);
  sp.appendChild(document.createTextNode(text));
  parent.appendChild(sp);
}

var D = JSON.parse(byId("trace-data").textContent);
var L = D.model.layers || D.model.seen_layers;
function posText(p) {
  var t = D.ptext[String(p)];
  return t === undefined ? "#" + p : t;
}
function vocabText(id) {
  var t = D.vocab[String(id)];
  return t === undefined ? "<" + id + ">" : t;
}
var rendered = {};

function renderMeta() {
  var m = D.model, sm = D.summary, parts = [];
  parts.push(m.name + ": " + m.layers + " layers, hidden " + m.dim + ", " + m.heads + " heads / " + m.kv_heads + " KV heads, vocab " + m.vocab);
  parts.push("trace " + D.config + ", " + sm.forwards + " forwards" + (sm.positions ? " (positions " + sm.positions[0] + "\u2013" + sm.positions[1] + ")" : "") + ", " + D.fw.length + " retained in detail");
  var an = sm.anomaly_counts.filter(function (k) { return k[1] > 0; }).map(function (k) { return k[0] + " in " + k[1]; });
  parts.push(an.length ? "anomalies: " + an.join(", ") : "no anomalies");
  var meta = byId("meta");
  meta.textContent = parts.join(" \u00b7 ");
  if (sm.first_anomaly) {
    meta.appendChild(h("br"));
    meta.appendChild(h("span", { "class": "warn" }, "first anomaly: " + sm.first_anomaly));
  }
}

// ---- activation health -------------------------------------------------
var KIND_COLOR = { "NaN": "#d62728", "Inf": "#ff7f0e", "explosion": "#e377c2", "vanishing": "#1f77b4", "residual dominance": "#7f7f7f" };
function actRows() {
  var rows = [{ label: "embedding", layer: null, stage: "embedding" }];
  for (var l = 0; l < L; l++) rows.push({ label: "L" + l, layer: l, stage: null });
  rows.push({ label: "final norm", layer: null, stage: "final_norm" });
  rows.push({ label: "logits", layer: null, stage: "logits" });
  return rows;
}
function statValue(a, which) {
  // a: [layer, stage, count, mean, std, l2, max_abs, nan, inf]
  if (which === "std") return a[4];
  if (which === "l2") return a[5];
  if (which === "maxabs") return a[6];
  return a[3] === null ? null : Math.abs(a[3]);
}
function renderActivations() {
  var plot = clear(byId("act-plot"));
  var which = byId("act-stat").value, stage = byId("act-stage").value;
  var fw = D.fw, rows = actRows();
  if (!fw.length || !fw.some(function (f) { return f.a.length; })) {
    plot.appendChild(h("p", { "class": "empty" }, "No activation statistics were recorded."));
    return 0;
  }
  var lookup = fw.map(function (f) {
    var m = {};
    f.a.forEach(function (a) { m[(a[0] === null ? "" : a[0]) + "|" + a[1]] = a; });
    return m;
  });
  function cellStats(col, row) {
    var r = rows[row];
    var key = r.layer === null ? "|" + r.stage : r.layer + "|" + stage;
    return lookup[col][key];
  }
  var lo = Infinity, hi = -Infinity;
  for (var c = 0; c < fw.length; c++) for (var r = 0; r < rows.length; r++) {
    var a = cellStats(c, r);
    if (!a) continue;
    var v = statValue(a, which);
    if (v !== null && v > 0) { var lv = Math.log10(v); lo = Math.min(lo, lv); hi = Math.max(hi, lv); }
  }
  if (!(hi >= lo)) { lo = 0; hi = 1; }
  if (hi - lo < 1e-6) hi = lo + 1;
  byId("act-range").textContent = "colour: log10 " + which + " from " + fmt(Math.pow(10, lo)) + " (dark) to " + fmt(Math.pow(10, hi)) + " (bright)";
  var labelW = 74, top = fw.length <= 96 ? 62 : 14;
  var cw = Math.max(3, Math.min(26, Math.floor(1100 / fw.length))), ch = 12;
  var W = labelW + cw * fw.length + 4, H = top + ch * rows.length + 4;
  var svg = s("svg", { width: W, height: H, viewBox: "0 0 " + W + " " + H });
  var drawn = 0;
  rows.forEach(function (row, r) {
    svg.appendChild(s("text", { x: labelW - 4, y: top + r * ch + ch - 2, "text-anchor": "end" }, row.label));
  });
  fw.forEach(function (f, c) {
    if (top > 20) {
      var x = labelW + c * cw + cw / 2 + 3;
      svg.appendChild(tip(s("text", { transform: "translate(" + x + "," + (top - 4) + ") rotate(-60)" }, vis(posText(f.p)).slice(0, 12)), "position " + f.p));
    }
    rows.forEach(function (row, r) {
      var a = cellStats(c, r), fill = "#eceff2", label;
      var where = (row.layer === null ? row.stage : "layer " + row.layer + " " + stage) + ", position " + f.p + " " + JSON.stringify(posText(f.p));
      if (a) {
        var v = statValue(a, which);
        if (a[7] + a[8] > 0) fill = "#111";
        else if (v !== null && v > 0) fill = ramp(VIRIDIS, (Math.log10(v) - lo) / (hi - lo));
        else fill = "#cfd4da";
        label = where + "\nstd " + fmt(a[4]) + ", L2 " + fmt(a[5]) + ", max |x| " + fmt(a[6]) + ", mean " + fmt(a[3]) + "\nNaN " + a[7] + ", Inf " + a[8] + " of " + a[2];
      } else label = where + ": not recorded";
      svg.appendChild(tip(s("rect", { "class": "cell", x: labelW + c * cw, y: top + r * ch, width: cw, height: ch, fill: fill }), label));
      drawn++;
    });
    f.an.forEach(function (an) {
      // an: [layer, stage, kind, origin, text]
      var r = an[0] !== null ? an[0] + 1 : an[1] === "embedding" ? 0 : an[1] === "final_norm" ? L + 1 : L + 2;
      var here = an[0] === null || an[1] === stage;
      var col = KIND_COLOR[an[2]] || "#d62728";
      var mark = s("circle", { cx: labelW + c * cw + cw / 2, cy: top + r * ch + ch / 2, r: Math.max(2, Math.min(cw, ch) / 2 - 1),
        fill: here ? col : "none", stroke: here ? "#fff" : col, "stroke-width": here ? 1 : 2, "class": "anomaly" });
      svg.appendChild(tip(mark, an[4] + (here ? "" : " (at stage " + an[1] + ")")));
    });
  });
  plot.appendChild(svg);
  var lg = clear(byId("act-legend"));
  Object.keys(KIND_COLOR).forEach(function (k) { legendItem(lg, KIND_COLOR[k], k); });
  legendItem(lg, "#333", "ring: anomaly at another stage of that layer", true);
  legendItem(lg, "#111", "black cell: NaN/Inf values");
  legendItem(lg, "#eceff2", "not recorded");
  return drawn;
}

// ---- attention ---------------------------------------------------------
var att = { layer: 0, head: 0 };
function headGrid(parent, title, idx, stops, lo, hi) {
  var wrap = h("div");
  wrap.appendChild(h("div", { "class": "note" }, title));
  var heads = D.model.heads || 1;
  D.heads.forEach(function (x) { heads = Math.max(heads, x[1] + 1); });
  var cw = 16, ch = 10, left = 28, top = 14;
  var W = left + cw * heads + 2, H = top + ch * L + 2;
  var svg = s("svg", { width: W, height: H, viewBox: "0 0 " + W + " " + H });
  for (var hd = 0; hd < heads; hd++) svg.appendChild(s("text", { x: left + hd * cw + cw / 2, y: top - 3, "text-anchor": "middle" }, "h" + hd));
  for (var l = 0; l < L; l += Math.max(1, Math.ceil(L / 15))) svg.appendChild(s("text", { x: left - 3, y: top + l * ch + ch - 1, "text-anchor": "end" }, "L" + l));
  var n = 0;
  D.heads.forEach(function (x) {
    var v = x[idx];
    var rect = s("rect", { "class": "cell", x: left + x[1] * cw, y: top + x[0] * ch, width: cw, height: ch,
      fill: v === null ? "#ccc" : ramp(stops, (v - lo) / (hi - lo)) });
    rect.style.cursor = "pointer";
    tip(rect, "layer " + x[0] + " head " + x[1] + "\nsink share " + fmt(x[2]) + " (mean weight on the first token " + fmt(x[3]) + ")\nmean normalized entropy " + fmt(x[4]) + ", tail mass " + fmt(x[5]) + "\nrecency share " + fmt(x[6]) + ", " + x[7] + " summaries");
    rect.addEventListener("click", function () { att.layer = x[0]; att.head = x[1]; syncAttSelects(); renderAttention(); });
    svg.appendChild(rect);
    n++;
  });
  svg.appendChild(s("rect", { "class": "sel", x: left + att.head * cw, y: top + att.layer * ch, width: cw, height: ch }));
  wrap.appendChild(svg);
  parent.appendChild(wrap);
  return n;
}
function syncAttSelects() { byId("att-layer").value = String(att.layer); byId("att-head").value = String(att.head); }
function renderAttention() {
  var grid = clear(byId("att-grid")), topEl = clear(byId("att-top")), toks = clear(byId("att-tokens"));
  if (!D.heads.length) {
    grid.appendChild(h("p", { "class": "empty" }, "Attention was not traced (it needs the Full config)."));
    return 0;
  }
  att.layer = +byId("att-layer").value; att.head = +byId("att-head").value;
  var row = h("div", { "class": "row" });
  var n = headGrid(row, "sink share (click a head)", 2, BLUES, 0, 1);
  n += headGrid(row, "mean normalized entropy", 4, VIRIDIS, 0, 1);
  grid.appendChild(row);
  var pos = +byId("att-pos").value;
  var f = D.fw.filter(function (x) { return x.p === pos; })[0];
  var t = f && f.at.filter(function (x) { return x[0] === att.layer && x[1] === att.head; })[0];
  if (!t) { topEl.appendChild(h("p", { "class": "empty" }, "No summary of layer " + att.layer + " head " + att.head + " at position " + pos + ".")); return n; }
  // t: [layer, head, context_len, sink, entropy, norm_entropy, tail, [positions], [weights]]
  topEl.appendChild(h("div", { "class": "note" }, "top-" + t[7].length + " of " + t[2] + " attended positions; entropy " + fmt(t[4]) + " nats, tail mass " + fmt(t[6])));
  var tbl = h("table"), hr = h("tr");
  ["#", "position", "token", "weight"].forEach(function (c, i) { hr.appendChild(h("th", { "class": i === 2 ? "l" : "" }, c)); });
  tbl.appendChild(hr);
  var weight = {};
  t[7].forEach(function (p, i) {
    var w = t[8][i];
    if (p !== null) weight[p] = w;
    var tr = h("tr");
    tr.appendChild(h("td", null, String(i + 1)));
    tr.appendChild(h("td", null, p === null ? "?" : String(p)));
    tr.appendChild(h("td", { "class": "l" }, p === null ? "(slot unknown)" : vis(posText(p))));
    var td = h("td"), bar = h("span", { "class": "bar" });
    bar.style.width = Math.round(60 * (w || 0)) + "px";
    td.appendChild(bar); td.appendChild(document.createTextNode(" " + fmt(w)));
    tr.appendChild(td);
    tbl.appendChild(tr);
  });
  topEl.appendChild(tbl);
  // The query's context: attended positions before the window, then the window.
  var start = Math.max(0, pos - 47);
  var early = Object.keys(weight).map(Number).filter(function (p) { return p < start; }).sort(function (a, b) { return a - b; });
  function chip(p) {
    var w = weight[p] || 0;
    var sp = h("span", { "class": "tok" + (p === pos ? " q" : ""), title: "position " + p + ", weight " + fmt(w) }, vis(posText(p)));
    sp.style.background = "rgba(228,87,46," + Math.min(1, Math.sqrt(w)).toFixed(3) + ")";
    toks.appendChild(sp);
  }
  early.forEach(chip);
  if (early.length) toks.appendChild(document.createTextNode(" \u2026 "));
  for (var p = start; p <= pos; p++) chip(p);
  return n + t[7].length;
}

// ---- logit lens --------------------------------------------------------
function renderLens() {
  var plot = clear(byId("lens-plot")), hist = clear(byId("lens-hist"));
  var pos = +byId("lens-pos").value;
  var f = D.fw.filter(function (x) { return x.p === pos && x.lens.length; })[0];
  if (!f) { plot.appendChild(h("p", { "class": "empty" }, "The logit lens was not traced (it needs the Full config).")); return 0; }
  var layers = [];
  f.lens.forEach(function (t) { t[1].forEach(function (l) { if (layers.indexOf(l) < 0) layers.push(l); }); });
  layers.sort(function (a, b) { return a - b; });
  var left = 120, top = 16, cw = Math.max(12, Math.min(30, Math.floor(560 / Math.max(1, layers.length)))), ch = 20;
  var W = left + cw * layers.length + 4, H = top + ch * f.lens.length + 4;
  var svg = s("svg", { width: W, height: H, viewBox: "0 0 " + W + " " + H });
  var step = Math.max(1, Math.ceil(layers.length / 16));
  layers.forEach(function (l, i) { if (i % step === 0) svg.appendChild(s("text", { x: left + i * cw + cw / 2, y: top - 4, "text-anchor": "middle" }, "L" + l)); });
  var vocab = Math.max(2, D.model.vocab);
  var n = 0;
  f.lens.forEach(function (t, r) {
    // t: [token, [layers], [ranks], decisive, won]
    var chosen = t[0] === f.sel;
    svg.appendChild(tip(s("text", { x: left - 4, y: top + r * ch + ch / 2 + 3, "text-anchor": "end", "font-weight": chosen ? "bold" : "normal" },
      (chosen ? "\u2605 " : "") + vis(vocabText(t[0])).slice(0, 16)), "token id " + t[0] + (chosen ? " (chosen)" : "")));
    t[1].forEach(function (l, i) {
      var c = layers.indexOf(l), rank = t[2][i];
      var x = left + c * cw, y = top + r * ch;
      var tt = Math.log(1 + rank) / Math.log(1 + vocab);
      var rect = s("rect", { "class": "cell", x: x, y: y, width: cw, height: ch, fill: ramp(RDYLGN, 1 - tt) });
      tip(rect, JSON.stringify(vocabText(t[0])) + " at layer " + l + ": rank " + rank + (l === t[3] ? " (decisive layer: largest log-rank gain)" : "") + (l === t[4] ? " (won here)" : ""));
      svg.appendChild(rect);
      if (String(rank).length * 6 + 2 <= cw) svg.appendChild(s("text", { x: x + cw / 2, y: y + ch / 2 + 3, "text-anchor": "middle", "pointer-events": "none" }, String(rank)));
      if (l === t[3]) svg.appendChild(s("rect", { "class": "decisive", x: x + 1, y: y + 1, width: cw - 2, height: ch - 2, fill: "none", stroke: "#111", "stroke-width": 2.5 }));
      n++;
    });
  });
  plot.appendChild(svg);
  var lg = h("div", { "class": "legend" });
  legendItem(lg, ramp(RDYLGN, 1), "rank 0");
  legendItem(lg, ramp(RDYLGN, 0.5), "rank \u2248 " + Math.round(Math.sqrt(vocab)));
  legendItem(lg, ramp(RDYLGN, 0), "rank " + vocab);
  legendItem(lg, "#111", "decisive layer (largest log-rank gain)", true);
  legendItem(lg, "#fff", "\u2605 the chosen token");
  plot.appendChild(lg);
  if (D.summary.decisive.length) {
    var txt = D.summary.decisive.map(function (d) { return "L" + d[0] + "\u00d7" + d[1]; }).join("  ");
    hist.appendChild(h("p", { "class": "note" }, "decisive layers (largest log-rank gain) over the session: " + txt));
  }
  return n;
}

// ---- quantization ------------------------------------------------------
function renderQuant() {
  var plot = clear(byId("q-plot")), table = clear(byId("q-table")), worstEl = byId("q-worst");
  if (!D.bricks.length) { worstEl.textContent = ""; plot.appendChild(h("p", { "class": "empty" }, "Quantization error was not traced (it needs the Full config).")); return 0; }
  var agg = byId("q-agg").value;
  var w = D.worst;
  worstEl.textContent = w ? "worst brick: " + w.brick + " of layer " + w.layer + " (" + w.type + " weights): cosine " + fmt(w.cosine) + ", SNR " + fmt(w.snr_db) + " dB, max |err| " + fmt(w.max_abs_error) : "";
  var names = D.brick_names.filter(function (b) { return D.bricks.some(function (x) { return x[0] === b; }); });
  var left = 110, top = 14, cw = Math.max(8, Math.min(22, Math.floor(520 / Math.max(1, L)))), ch = 16;
  var W = left + cw * Math.max(1, L) + 4, H = top + ch * names.length + 4;
  var svg = s("svg", { width: W, height: H, viewBox: "0 0 " + W + " " + H });
  for (var l = 0; l < L; l += Math.max(1, Math.ceil(L / 15))) svg.appendChild(s("text", { x: left + l * cw + cw / 2, y: top - 3, "text-anchor": "middle" }, "L" + l));
  names.forEach(function (b, r) { svg.appendChild(s("text", { x: left - 4, y: top + r * ch + ch - 4, "text-anchor": "end" }, b === "lm_head" ? "lm_head (output)" : b)); });
  var n = 0;
  D.bricks.forEach(function (x) {
    // x: [brick, layer, type, samples, mean_cos, min_cos, mean_snr]
    var r = names.indexOf(x[0]), cos = agg === "min" ? x[5] : x[4];
    var fill = cos === null ? "#111" : ramp(RDYLGN, 1 - (Math.log10(Math.max(1e-7, 1 - cos)) + 6) / 5);
    var rect = s("rect", { "class": "cell", x: left + x[1] * cw, y: top + r * ch, width: cw, height: ch, fill: fill });
    tip(rect, x[0] + " layer " + x[1] + " (" + x[2] + "): " + agg + " cosine " + fmt(cos) + " over " + x[3] + " samples, mean SNR " + fmt(x[6]) + " dB");
    svg.appendChild(rect);
    if (w && w.brick === x[0] && w.layer === x[1]) svg.appendChild(s("rect", { "class": "sel worst", x: left + x[1] * cw, y: top + r * ch, width: cw, height: ch }));
    n++;
  });
  plot.appendChild(svg);
  var lg = h("div", { "class": "legend" });
  legendItem(lg, ramp(RDYLGN, 1), "1 \u2212 cos \u2264 1e-6");
  legendItem(lg, ramp(RDYLGN, 0.6), "1e-4");
  legendItem(lg, ramp(RDYLGN, 0.2), "1e-2 (critical)");
  legendItem(lg, "#111", "NaN");
  legendItem(lg, "#e4572e", "worst brick", true);
  plot.appendChild(lg);
  var tbl = h("table"), hr = h("tr");
  ["brick", "samples", "mean cosine", "critical"].forEach(function (c, i) { hr.appendChild(h("th", { "class": i ? "" : "l" }, c)); });
  tbl.appendChild(hr);
  D.brick_summary.forEach(function (b) {
    var tr = h("tr");
    tr.appendChild(h("td", { "class": "l" }, b[0]));
    tr.appendChild(h("td", null, String(b[1])));
    tr.appendChild(h("td", null, b[2] === null ? "n/a" : b[2].toFixed(6)));
    tr.appendChild(h("td", null, String(b[3])));
    tbl.appendChild(tr);
  });
  table.appendChild(tbl);
  return n;
}

// ---- KV cache ----------------------------------------------------------
function renderKv() {
  var stats = clear(byId("kv-stats")), plot = clear(byId("kv-plot"));
  var k = D.kv, tot = D.kv_total;
  if (!k.length) { plot.appendChild(h("p", { "class": "empty" }, "The KV cache was not traced.")); return 0; }
  function stat(label, value) { var sp = h("span", { "class": "stat" }); sp.appendChild(h("b", null, value)); sp.appendChild(document.createTextNode(" " + label)); stats.appendChild(sp); }
  if (tot) {
    stat("steps", String(tot.steps));
    stat("evictions", String(tot.evictions));
    stat("peak utilization", (100 * tot.peak_utilization).toFixed(1) + "%");
    stat("mean hit rate", (100 * tot.avg_hit_rate).toFixed(1) + "%");
    stat("peak KiB", (tot.peak_bytes / 1024).toFixed(1));
  }
  var W = 560, H = 170, left = 34, right = 34, top = 10, bottom = 22;
  var pw = W - left - right, ph = H - top - bottom;
  var svg = s("svg", { width: W, height: H, viewBox: "0 0 " + W + " " + H });
  var n = k.length, maxEv = 1;
  k.forEach(function (x) { maxEv = Math.max(maxEv, x[3]); });
  function X(i) { return left + (n === 1 ? pw / 2 : i * pw / (n - 1)); }
  function Y(v) { return top + ph * (1 - Math.max(0, Math.min(1, v))); }
  svg.appendChild(s("rect", { x: left, y: top, width: pw, height: ph, fill: "#fafbfc", stroke: "#dde1e6" }));
  [0, 0.5, 1].forEach(function (v) { svg.appendChild(s("text", { x: left - 4, y: Y(v) + 3, "text-anchor": "end" }, (100 * v) + "%")); });
  svg.appendChild(s("text", { x: W - right + 4, y: top + 8 }, String(maxEv)));
  svg.appendChild(s("text", { x: W - right + 4, y: top + ph }, "0"));
  var bw = Math.max(1, pw / Math.max(1, n));
  var bars = 0;
  k.forEach(function (x, i) {
    if (x[3] > 0) {
      var hgt = ph * x[3] / maxEv;
      svg.appendChild(tip(s("rect", { x: X(i) - bw / 2, y: top + ph - hgt, width: bw, height: hgt, fill: "#d62728", opacity: 0.45 }), "step " + x[0] + ": " + x[3] + " evictions"));
      bars++;
    }
  });
  function line(idx, color, name) {
    var pts = k.map(function (x, i) { return X(i).toFixed(1) + "," + Y(x[idx] === null ? 0 : x[idx]).toFixed(1); }).join(" ");
    svg.appendChild(tip(s("polyline", { points: pts, fill: "none", stroke: color, "stroke-width": 1.6 }), name));
  }
  line(1, "#3b528b", "utilization");
  line(2, "#1a9850", "hit rate");
  svg.appendChild(s("text", { x: left, y: H - 6 }, "step " + k[0][0]));
  svg.appendChild(s("text", { x: W - right, y: H - 6, "text-anchor": "end" }, "step " + k[n - 1][0]));
  plot.appendChild(svg);
  var lg = h("div", { "class": "legend" });
  legendItem(lg, "#3b528b", "utilization (left axis)");
  legendItem(lg, "#1a9850", "hit rate (left axis)");
  legendItem(lg, "#d62728", "evictions per step (right axis)");
  plot.appendChild(lg);
  return n + bars;
}

function setup() {
  var st = byId("act-stage");
  D.stages.forEach(function (x) { option(st, x, x); });
  st.value = "output";
  var ap = byId("att-pos"), lp = byId("lens-pos");
  D.fw.forEach(function (f) {
    var label = f.p + ": " + vis(posText(f.p)).slice(0, 14);
    if (f.at.length) option(ap, f.p, label);
    if (f.lens.length) option(lp, f.p, label);
  });
  if (ap.options.length) ap.selectedIndex = ap.options.length - 1;
  if (lp.options.length) lp.selectedIndex = lp.options.length - 1;
  var al = byId("att-layer"), ah = byId("att-head"), heads = 0;
  for (var l = 0; l < L; l++) option(al, l, String(l));
  D.heads.forEach(function (x) { heads = Math.max(heads, x[1] + 1); });
  for (var hd = 0; hd < heads; hd++) option(ah, hd, String(hd));
  // Start on the head with the largest sink share: the most telling one.
  var best = null;
  D.heads.forEach(function (x) { if (x[2] !== null && (!best || x[2] > best[2])) best = x; });
  if (best) { att.layer = best[0]; att.head = best[1]; }
  syncAttSelects();
  function on(id, fn) { byId(id).addEventListener("change", function () { try { fn(); } catch (e) { fail(String(e)); } }); }
  on("act-stat", renderActivations); on("act-stage", renderActivations);
  on("att-pos", renderAttention); on("att-layer", renderAttention); on("att-head", renderAttention);
  on("lens-pos", renderLens); on("q-agg", renderQuant);
}

try {
  renderMeta();
  setup();
  rendered.activations = renderActivations();
  rendered.attention = renderAttention();
  rendered.lens = renderLens();
  rendered.quant = renderQuant();
  rendered.kv = renderKv();
  body.setAttribute("data-rendered", Object.keys(rendered).map(function (k) { return k + ":" + rendered[k]; }).join(","));
  if (body.getAttribute("data-status") === "loading") body.setAttribute("data-status", "ok");
} catch (e) {
  fail(e && e.stack ? String(e.stack) : String(e));
}
})();
"##;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_positions_follow_the_streaming_cache_layout() {
        // No eviction: slots are positions.
        assert_eq!(slot_position(9, 10, 4, 3), Some(3));
        assert_eq!(slot_position(9, 10, 4, 10), None);
        // Capacity 8 with 4 sinks at query 99: slots 4..8 hold 96..=99.
        assert_eq!(slot_position(99, 8, 4, 0), Some(0));
        assert_eq!(slot_position(99, 8, 4, 3), Some(3));
        assert_eq!(slot_position(99, 8, 4, 4), Some(96));
        assert_eq!(slot_position(99, 8, 4, 7), Some(99));
        // A plain window.
        assert_eq!(slot_position(99, 8, 0, 0), Some(92));
        // More slots than positions seen: not a cache layout we know.
        assert_eq!(slot_position(3, 10, 4, 0), None);
        assert_eq!(slot_position(usize::MAX, 10, 4, 0), None);
    }

    #[test]
    fn json_strings_cannot_close_the_script_element() {
        let mut j = Json(String::new());
        j.str("</script><b>&\"\\\n\u{2028}\u{1}");
        assert_eq!(
            j.0,
            r#""\u003c/script\u003e\u003cb\u003e\u0026\"\\\n\u2028\u0001""#
        );
        let mut n = Json(String::new());
        n.num(f32::NAN)
            .raw(",")
            .num(1.5)
            .raw(",")
            .num(2e-7)
            .raw(",")
            .num(f32::INFINITY);
        assert_eq!(n.0, "null,1.5,2e-7,null");
    }

    #[test]
    fn a_tracer_that_recorded_nothing_still_gives_a_page() {
        let off = ModelTracer::new(crate::Disabled);
        let input = ReportInput::from_tracer(&off, ModelInfo::default());
        assert!(input.forwards.is_empty() && input.token_ids().is_empty());
        let mut out = Vec::new();
        write_html(&mut out, &input).unwrap();
        let html = String::from_utf8(out).unwrap();
        assert!(html.contains("\"fw\":[]"));
        assert!(html.contains("\"config\":\"disabled\""));
        assert!(html.ends_with("</html>\n"));
    }

    #[test]
    fn the_lens_marks_the_largest_log_rank_gain() {
        let mut t = ModelTracer::new(crate::Full);
        t.begin_forward(0);
        // Id 0 drops 900 places at layer 1 but reaches the top from rank
        // 100 at layer 3: the log-rank rule picks layer 3.
        let rows: Vec<Vec<f32>> = [1000usize, 100, 100, 0]
            .iter()
            .map(|&r| {
                (0..1001)
                    .map(|i| match i {
                        0 => 0.0,
                        i if i <= r => 1.0,
                        _ => -1.0,
                    })
                    .collect()
            })
            .collect();
        for (layer, row) in rows.iter().enumerate() {
            t.logit_lens(layer, row.len(), |out| out.copy_from_slice(row));
        }
        t.final_logits(&rows[3]);
        t.end_forward();
        let input = ReportInput::from_tracer(&t, ModelInfo::default());
        let mut out = Vec::new();
        write_html(&mut out, &input).unwrap();
        let html = String::from_utf8(out).unwrap();
        // [token, [layers], [ranks], decisive, won]
        let lens = html.split("\"lens\":").nth(1).unwrap_or("");
        assert!(
            lens.starts_with("[[0,[0,1,2,3],[1000,100,100,0],3,3]"),
            "{}",
            lens.chars().take(200).collect::<String>()
        );
        // Ids 1 and 2, tracked as the final top-3, never improve.
        assert_eq!(input.summary.decisive_layers, vec![(3, 1)]);
    }

    #[test]
    fn html_escape_covers_the_five_characters() {
        assert_eq!(
            escape_html(r#"<a href="x">'&'</a>"#),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
    }
}
