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
//! The trace data is serialized with serde into a
//! `<script type="application/json">` element in which `<`, `>`, `&`,
//! U+2028 and U+2029 are escaped (`\u003c` ...), so no token text can close
//! the element; the script renders every token string with `textContent`,
//! never as markup. Static text written by Rust is HTML-escaped. When
//! rendering succeeds the script sets `data-status="ok"` on `<body>`
//! (`"error"` plus a visible message otherwise) and `data-rendered` to the
//! number of cells drawn per section.
//!
//! Non-finite numbers (a NaN cosine, an infinite SNR) are embedded as
//! `null` and shown as "n/a"; NaN and Inf counts are shown as data. Enum
//! values (stages, bricks, anomaly kinds, ...) are embedded by their
//! `name()`.
//!
//! Needs the `serde` feature.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::{self, Write};

use serde::{Serialize, Serializer};

use crate::activation::Stage;
use crate::anomaly::{AnomalyKind, Origin};
use crate::forward::ForwardTrace;
use crate::kv_cache::KvCacheStateTrace;
#[doc(no_inline)]
pub use crate::model_info::ModelInfo;
use crate::quant::{BrickId, QuantType};
use crate::summary::TraceSummary;

/// Positions of context shown before a query in the attention view.
pub const CONTEXT_WINDOW: usize = 48;

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
    /// Text of the token at each absolute position. Positions without
    /// text are shown as `#position`. A map rather than a vector indexed
    /// by position, so that a trace naming position 10^18 costs one entry.
    pub position_text: BTreeMap<usize, String>,
    /// Text of vocabulary ids (tracked and chosen tokens of the logit
    /// lens); see [`token_ids`](Self::token_ids). Missing ids are shown as
    /// `<id>`.
    pub token_text: BTreeMap<u32, String>,
}

impl<'a> ReportInput<'a> {
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

    /// Names the tokens: `tokens[p]` is the token at position `p` (a run
    /// whose cache started empty), and `text` gives a token's text, for
    /// the positions and for every id the report names
    /// ([`token_ids`](Self::token_ids)).
    pub fn name_tokens(mut self, tokens: &[u32], text: impl Fn(u32) -> String) -> Self {
        self.position_text = tokens
            .iter()
            .enumerate()
            .map(|(p, &t)| (p, text(t)))
            .collect();
        self.token_text = self
            .token_ids()
            .into_iter()
            .map(|id| (id, text(id)))
            .collect();
        self
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

/// A number of the page: itself when finite, `null` otherwise (shown as
/// "n/a"). Not [`serde_float::Float`](crate::serde_float::Float): the
/// script computes with the numbers it reads and has no use for `"NaN"`.
#[derive(Debug, Clone, Copy)]
struct Num(f32);

impl Serialize for Num {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.0.is_finite() {
            s.serialize_f32(self.0)
        } else {
            s.serialize_none()
        }
    }
}

// The embedded data, `D` in the page script. Records that come by the
// hundred are arrays, read by index; the comment on each says what the
// index holds.

/// Everything the page shows.
#[derive(Serialize)]
struct PageData<'a> {
    title: &'a str,
    config: &'a str,
    model: ModelData<'a>,
    summary: SummaryData<'a>,
    /// Layer stages in forward order: the stage selector.
    stages: [Stage; 6],
    /// The retained forwards, in order.
    fw: Vec<ForwardData<'a>>,
    heads: Vec<HeadRow>,
    /// Every brick in forward order: the rows of the quantization grid.
    brick_names: [BrickId; 7],
    bricks: Vec<BrickLayerRow>,
    brick_summary: Vec<BrickRow>,
    worst: Option<WorstBrick>,
    kv: Vec<KvRow>,
    kv_total: Option<KvTotal>,
    /// Text of the positions shown: the forwards, the context before each
    /// query, and every attended position.
    ptext: BTreeMap<usize, &'a str>,
    /// Text of the vocabulary ids the logit lens names.
    vocab: &'a BTreeMap<u32, String>,
}

#[derive(Serialize)]
struct ModelData<'a> {
    name: &'a str,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    dim: usize,
    vocab: usize,
    kv_capacity: usize,
    kv_sinks: usize,
    /// Layers seen in the records: the grid height when `layers` is 0.
    seen_layers: usize,
}

#[derive(Serialize)]
struct SummaryData<'a> {
    forwards: usize,
    positions: Option<(usize, usize)>,
    /// `[kind, forwards]` for every kind.
    anomaly_counts: Vec<(AnomalyKind, usize)>,
    first_anomaly: Option<String>,
    /// `[layer, count]`.
    decisive: &'a [(usize, usize)],
    /// `[layer, count]`.
    won: &'a [(usize, usize)],
    mean_kl: Option<Num>,
    top1_agreement: Option<Num>,
}

#[derive(Serialize)]
struct ForwardData<'a> {
    /// Position.
    p: usize,
    /// The token chosen at this position.
    sel: Option<u32>,
    a: Vec<ActivationRow>,
    an: Vec<AnomalyRow>,
    at: Vec<AttentionRow>,
    lens: Vec<LensRow<'a>>,
}

/// `[layer | null, stage, count, mean, std, l2, max_abs, nan, inf]`.
#[derive(Serialize)]
struct ActivationRow(
    Option<usize>,
    Stage,
    usize,
    Num,
    Num,
    Num,
    Num,
    usize,
    usize,
);

/// `[layer | null, stage, kind, origin, text]`.
#[derive(Serialize)]
struct AnomalyRow(Option<usize>, Stage, AnomalyKind, Origin, String);

/// `[layer, head, context_len, sink_weight, entropy, normalized_entropy,
/// tail_mass, [position | null], [weight]]`: the top-k attended positions
/// (`null` where the cache slot's position is unknown) and their weights.
#[derive(Serialize)]
struct AttentionRow(
    usize,
    usize,
    usize,
    Num,
    Num,
    Num,
    Num,
    Vec<Option<usize>>,
    Vec<Num>,
);

/// `[token, [layer], [rank], decisive layer | null, won layer | null]`.
#[derive(Serialize)]
struct LensRow<'a>(u32, Vec<usize>, &'a [usize], Option<usize>, Option<usize>);

/// `[layer, head, sink_share, mean_sink_weight, mean_normalized_entropy,
/// mean_tail_mass, recency_share, records]`.
#[derive(Serialize)]
struct HeadRow(usize, usize, Num, Num, Num, Num, Num, usize);

/// `[brick, layer, type, samples, mean_cosine, min_cosine, mean_snr_db]`.
#[derive(Serialize)]
struct BrickLayerRow(BrickId, usize, QuantType, usize, Num, Num, Num);

/// `[brick, samples, mean_cosine, critical]`.
#[derive(Serialize)]
struct BrickRow(BrickId, usize, Num, usize);

#[derive(Serialize)]
struct WorstBrick {
    brick: BrickId,
    layer: usize,
    #[serde(rename = "type")]
    quant_type: QuantType,
    cosine: Num,
    snr_db: Num,
    max_abs_error: Num,
}

/// `[step, utilization, hit_rate, evictions, valid, max, bytes]`.
#[derive(Serialize)]
struct KvRow(usize, Num, Num, usize, usize, usize, usize);

#[derive(Serialize)]
struct KvTotal {
    steps: usize,
    evictions: usize,
    peak_utilization: Num,
    avg_hit_rate: Num,
    peak_bytes: usize,
    reused: usize,
    computed: usize,
}

impl<'a> PageData<'a> {
    fn new(input: &'a ReportInput<'_>) -> Self {
        let m = &input.model;
        let s = &input.summary;
        let seen_layers = input
            .forwards
            .iter()
            .map(|f| f.activations.layers.len())
            .chain(s.layers.iter().map(|l| l.layer.saturating_add(1)))
            .chain(s.heads.iter().map(|h| h.layer.saturating_add(1)))
            .max()
            .unwrap_or(0);
        let mut wanted = BTreeSet::new();
        let fw = input
            .forwards
            .iter()
            .map(|f| {
                wanted.extend(f.position.saturating_sub(CONTEXT_WINDOW)..=f.position);
                ForwardData::new(f, m.kv_sinks, &mut wanted)
            })
            .collect();
        PageData {
            title: &input.title,
            config: &input.config,
            model: ModelData {
                name: &m.name,
                layers: m.layers,
                heads: m.heads,
                kv_heads: m.kv_heads,
                dim: m.dim,
                vocab: m.vocab,
                kv_capacity: m.kv_capacity,
                kv_sinks: m.kv_sinks,
                seen_layers,
            },
            summary: SummaryData {
                forwards: s.forwards,
                positions: s.positions,
                anomaly_counts: AnomalyKind::ALL
                    .iter()
                    .map(|&k| (k, s.anomaly_counts[k as usize]))
                    .collect(),
                first_anomaly: s.first_anomaly.as_ref().map(|a| a.to_string()),
                decisive: &s.decisive_layers,
                won: &s.won_at_layers,
                mean_kl: s.mean_kl_divergence.map(Num),
                top1_agreement: s.top1_agreement.map(Num),
            },
            stages: Stage::LAYER_STAGES,
            fw,
            heads: s
                .heads
                .iter()
                .map(|h| {
                    HeadRow(
                        h.layer,
                        h.head,
                        Num(h.sink_share()),
                        Num(h.mean_sink_weight),
                        Num(h.mean_normalized_entropy),
                        Num(h.mean_tail_mass),
                        Num(h.recency_share()),
                        h.records,
                    )
                })
                .collect(),
            brick_names: BrickId::ALL,
            bricks: s
                .brick_layers
                .iter()
                .map(|b| {
                    BrickLayerRow(
                        b.brick,
                        b.layer,
                        b.quant_type,
                        b.samples,
                        Num(b.mean_cosine),
                        Num(b.min_cosine),
                        Num(b.mean_snr_db),
                    )
                })
                .collect(),
            brick_summary: s
                .bricks
                .iter()
                .map(|b| BrickRow(b.brick, b.samples, Num(b.mean_cosine), b.critical))
                .collect(),
            worst: s.worst_brick.as_ref().map(|w| WorstBrick {
                brick: w.brick,
                layer: w.layer_idx,
                quant_type: w.quant_type,
                cosine: Num(w.cosine_similarity),
                snr_db: Num(w.snr_db),
                max_abs_error: Num(w.max_abs_error),
            }),
            kv: input
                .kv_steps
                .iter()
                .map(|k| {
                    KvRow(
                        k.step,
                        Num(k.utilization()),
                        Num(k.cache_hit_rate),
                        k.evictions_this_step,
                        k.valid_positions,
                        k.max_positions,
                        k.cache_size_bytes,
                    )
                })
                .collect(),
            kv_total: s.kv_cache.as_ref().map(|k| KvTotal {
                steps: k.steps,
                evictions: k.total_evictions,
                peak_utilization: Num(k.peak_utilization),
                avg_hit_rate: Num(k.avg_hit_rate),
                peak_bytes: k.peak_memory_bytes,
                reused: k.total_reused,
                computed: k.total_computed,
            }),
            ptext: wanted
                .into_iter()
                .filter_map(|p| Some((p, input.position_text.get(&p)?.as_str())))
                .collect(),
            vocab: &input.token_text,
        }
    }
}

impl<'a> ForwardData<'a> {
    /// The data of `f`; adds the attended positions to `wanted`.
    fn new(f: &'a ForwardTrace, kv_sinks: usize, wanted: &mut BTreeSet<usize>) -> Self {
        ForwardData {
            p: f.position,
            sel: f.logits.as_ref().and_then(|l| l.selected_token),
            a: f.activations
                .recorded()
                .map(|(layer, stage, st)| {
                    ActivationRow(
                        layer,
                        stage,
                        st.count,
                        Num(st.mean),
                        Num(st.std),
                        Num(st.l2_norm),
                        Num(st.max_abs()),
                        st.nan_count,
                        st.inf_count,
                    )
                })
                .collect(),
            an: f
                .anomalies
                .iter()
                .map(|a| AnomalyRow(a.layer, a.stage, a.kind, a.origin, a.to_string()))
                .collect(),
            at: f
                .attention
                .iter()
                .map(|t| {
                    let positions = t
                        .top_k_positions
                        .iter()
                        .map(|&slot| {
                            let p = slot_position(t.query_pos, t.context_len, kv_sinks, slot);
                            wanted.extend(p);
                            p
                        })
                        .collect();
                    AttentionRow(
                        t.layer_idx,
                        t.head_idx,
                        t.context_len,
                        Num(t.sink_weight),
                        Num(t.entropy),
                        Num(t.normalized_entropy()),
                        Num(t.tail_mass),
                        positions,
                        t.top_k_weights.iter().map(|&w| Num(w)).collect(),
                    )
                })
                .collect(),
            lens: f
                .logits
                .iter()
                .flat_map(|l| &l.tokens)
                .map(|t| {
                    LensRow(
                        t.token_id,
                        (0..t.ranks.len()).map(|i| t.layer_at(i)).collect(),
                        &t.ranks,
                        t.decisive_layer_log_rank(),
                        t.won_at_layer(),
                    )
                })
                .collect(),
        }
    }
}

/// `data` as JSON text that stays data inside a `<script>` element.
pub(crate) fn script_json(data: &impl Serialize) -> serde_json::Result<String> {
    let json = serde_json::to_string(data)?;
    // Outside its strings, JSON text is ASCII punctuation, digits, `true`,
    // `false`, `null` and whitespace, so these characters can only be
    // inside strings, where `\uXXXX` means the same character. Escaping
    // them leaves the value as it was, and leaves the text nothing that
    // could close the element (`</script>`), open a comment (`<!--`) or,
    // for older JavaScript parsers, end a line (U+2028, U+2029).
    let mut out = String::with_capacity(json.len() + json.len() / 16);
    for c in json.chars() {
        match c {
            '<' | '>' | '&' | '\u{2028}' | '\u{2029}' => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    Ok(out)
}

/// Writes the report of `input` as one self-contained HTML file.
pub fn write_html(out: &mut impl Write, input: &ReportInput<'_>) -> io::Result<()> {
    let title = escape_html(&input.title);
    let data = script_json(&PageData::new(input)).map_err(io::Error::other)?;
    let mut page =
        String::with_capacity(data.len() + STYLE.len() + DOM.len() + SCRIPT.len() + 4096);
    page.push_str("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n");
    let _ = writeln!(page, "<title>{title}</title>");
    page.push_str("<style>");
    page.push_str(STYLE);
    page.push_str("</style>\n</head>\n<body data-status=\"loading\">\n");
    let _ = writeln!(page, "<header><h1>{title}</h1><p id=\"meta\"></p></header>");
    page.push_str(BODY);
    page.push_str("<script type=\"application/json\" id=\"trace-data\">");
    page.push_str(&data);
    // One script element: the shared DOM helpers, then the page's script.
    page.push_str("</script>\n<script>");
    page.push_str(DOM);
    page.push_str(SCRIPT);
    page.push_str("</script>\n</body>\n</html>\n");
    out.write_all(page.as_bytes())
}

// The page's parts, each in a file of its own language. The diff page
// shares the style and the DOM helpers.
pub(crate) const STYLE: &str = include_str!("report/report.css");
pub(crate) const DOM: &str = include_str!("report/dom.js");
const BODY: &str = include_str!("report/body.html");
const SCRIPT: &str = include_str!("report/report.js");

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::QuantizationErrorTrace;
    use crate::tracer::ModelTracer;

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

    /// The page of `input` and the data embedded in it, parsed.
    fn page(input: &ReportInput<'_>) -> (String, serde_json::Value) {
        let mut out = Vec::new();
        write_html(&mut out, input).unwrap();
        let html = String::from_utf8(out).unwrap();
        let open = "<script type=\"application/json\" id=\"trace-data\">";
        let data = html
            .split(open)
            .nth(1)
            .and_then(|rest| rest.split("</script>").next())
            .unwrap_or_default();
        let value = serde_json::from_str(data).unwrap_or_else(|e| panic!("{e}: {data}"));
        (html, value)
    }

    #[test]
    fn json_strings_cannot_close_the_script_element() {
        let text = "</script><b>&\"\\\n\u{2028}\u{2029}\u{1}";
        let json = script_json(&text).unwrap();
        assert_eq!(
            json,
            r#""\u003c/script\u003e\u003cb\u003e\u0026\"\\\n\u2028\u2029\u0001""#
        );
        // The same string, only spelled differently.
        assert_eq!(serde_json::from_str::<String>(&json).unwrap(), text);
        // Keys are strings too.
        let map = BTreeMap::from([("<!--", 1)]);
        assert_eq!(script_json(&map).unwrap(), r#"{"\u003c!--":1}"#);
    }

    #[test]
    fn non_finite_numbers_are_embedded_as_null() {
        let nums = [f32::NAN, 1.5, 2e-7, f32::INFINITY, f32::NEG_INFINITY, -0.25];
        let json = script_json(&nums.map(Num)).unwrap();
        assert_eq!(json, "[null,1.5,2e-7,null,null,-0.25]");

        // Through a page: the SNR of an exact match is infinite, the
        // metrics of a result holding a NaN are NaN; NaN and Inf counts of
        // activations are data.
        let mut t = ModelTracer::new(crate::Full);
        t.begin_forward(0);
        t.activation(0, Stage::Input, &[1.0, f32::NAN, f32::INFINITY, 2.0]);
        let (q, r) = ([1.0, 2.0], [1.0, 2.0]);
        let exact = QuantizationErrorTrace::compute(BrickId::FfnUp, 0, &q, &r, QuantType::Q8_0);
        t.record_quant_error(exact);
        let q = [f32::NAN, 2.0];
        let broken = QuantizationErrorTrace::compute(BrickId::FfnDown, 0, &q, &r, QuantType::Q8_0);
        t.record_quant_error(broken);
        t.end_forward();
        let (_, data) = page(&ReportInput::from_tracer(&t, ModelInfo::default()));
        let row = &data["fw"][0]["a"][0];
        assert_eq!((row[0].as_u64(), row[1].as_str()), (Some(0), Some("input")));
        assert_eq!(
            (row[7].as_u64(), row[8].as_u64()),
            (Some(1), Some(1)),
            "{row}"
        );
        assert_eq!(row[3], 1.5, "the mean of the finite values: {row}");
        // bricks: [brick, layer, type, samples, mean_cosine, min_cosine, mean_snr_db]
        let bricks = &data["bricks"];
        assert_eq!(bricks[0][0], "ffn_up", "{bricks}");
        assert_eq!(
            (&bricks[0][4], &bricks[0][6]),
            (&serde_json::json!(1.0), &serde_json::Value::Null)
        );
        assert_eq!(bricks[1][0], "ffn_down", "{bricks}");
        assert!(bricks[1][4].is_null() && bricks[1][5].is_null() && bricks[1][6].is_null());
        let worst = &data["worst"];
        assert_eq!(worst["brick"], "ffn_down", "{worst}");
        assert!(
            worst["cosine"].is_null() && worst["snr_db"].is_null(),
            "{worst}"
        );
        let an = &data["fw"][0]["an"][0];
        assert_eq!(
            (an[2].as_str(), an[3].as_str()),
            (Some("nan"), Some("produced"))
        );
        let counts = &data["summary"]["anomaly_counts"];
        assert_eq!(counts[0], serde_json::json!(["nan", 1]), "{counts}");
        assert!(data["summary"]["mean_kl"].is_null());
    }

    #[test]
    fn a_tracer_that_recorded_nothing_still_gives_a_page() {
        let off = ModelTracer::new(crate::Disabled);
        let input = ReportInput::from_tracer(&off, ModelInfo::default());
        assert!(input.forwards.is_empty() && input.token_ids().is_empty());
        let (html, data) = page(&input);
        assert!(html.contains("\"fw\":[]"));
        assert!(html.contains("\"config\":\"disabled\""));
        assert!(html.ends_with("</html>\n"));
        assert_eq!(data["model"]["seen_layers"], 0);
        for empty in ["bricks", "heads", "kv", "brick_summary"] {
            assert_eq!(data[empty], serde_json::json!([]), "{empty}");
        }
        for none in ["worst", "kv_total"] {
            assert!(data[none].is_null(), "{none}");
        }
        assert!(data["summary"]["positions"].is_null());
        assert_eq!(data["stages"][2], "post_attn");
        assert_eq!(data["brick_names"][1], "qkv_projection");
    }

    #[test]
    fn the_data_has_every_field_the_script_reads() {
        let mut t = ModelTracer::new(crate::Full);
        t.begin_forward(0);
        t.activation(0, Stage::Input, &[1.0, -2.0]);
        t.end_forward();
        let (_, data) = page(&ReportInput::from_tracer(&t, ModelInfo::default()));
        // `D.name`, `D.model.name`, `D.summary.name` in the script.
        for prefix in ["D.", "D.model.", "D.summary."] {
            let object = match prefix {
                "D." => &data,
                p => &data[p.trim_start_matches("D.").trim_end_matches('.')],
            };
            let mut read = 0;
            for (i, _) in SCRIPT.match_indices(prefix) {
                let name: String = SCRIPT[i + prefix.len()..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if name.is_empty() || (prefix == "D." && (name == "model" || name == "summary")) {
                    continue;
                }
                read += 1;
                assert!(
                    object.get(&name).is_some(),
                    "{prefix}{name} is not in the data"
                );
            }
            assert!(read > 0, "the script reads nothing through {prefix}");
        }
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
        let (html, data) = page(&input);
        // [token, [layers], [ranks], decisive, won]
        let lens = html.split("\"lens\":").nth(1).unwrap_or("");
        assert!(
            lens.starts_with("[[0,[0,1,2,3],[1000,100,100,0],3,3]"),
            "{}",
            lens.chars().take(200).collect::<String>()
        );
        assert_eq!(data["fw"][0]["sel"], 0);
        // Ids 1 and 2, tracked as the final top-3, never improve.
        assert_eq!(input.summary.decisive_layers, vec![(3, 1)]);
        assert_eq!(data["summary"]["decisive"], serde_json::json!([[3, 1]]));
    }

    #[test]
    fn html_escape_covers_the_five_characters() {
        assert_eq!(
            escape_html(r#"<a href="x">'&'</a>"#),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
    }
}
