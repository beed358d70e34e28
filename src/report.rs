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
            j.str(a.kind.name()).raw(",").str(a.origin.name()).raw(",");
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

// The page's parts, each in a file of its own language.
const STYLE: &str = include_str!("report/report.css");
const BODY: &str = include_str!("report/body.html");
const SCRIPT: &str = include_str!("report/report.js");

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
