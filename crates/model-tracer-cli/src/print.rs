//! The report `run` prints on the terminal after the generation, the same
//! for every engine: the outcome, the trace summary (per-layer health and
//! KV cache), attention sinks, the logit lens, the worst brick and what-if.

use std::fmt::Write as _;

use crate::setup::{Engine, Text};
use crate::timing::Timing;
use model_tracer::TraceSummary;

/// Printable form of a token: control characters and quotes escaped.
pub fn shown(text: &str) -> String {
    let mut s = String::new();
    for c in text.chars() {
        match c {
            '\n' => s.push_str("\\n"),
            '\t' => s.push_str("\\t"),
            '"' => s.push_str("\\\""),
            c if c.is_control() => {
                let _ = write!(s, "\\u{{{:x}}}", c as u32);
            }
            c => s.push(c),
        }
    }
    format!("\"{s}\"")
}

/// The text of `ids`: the model's, or each id in angle brackets.
fn ids_text(text: Option<&dyn Text>, ids: &[u32]) -> String {
    match text {
        Some(t) => t.decode(ids),
        None => ids.iter().map(|i| format!("<{i}>")).collect(),
    }
}

/// Prints the timing, the prompt and the answer.
pub fn outcome(timing: &Timing, text: Option<&dyn Text>, prompt: &[u32], generated: &[u32]) {
    println!("{timing}");
    println!("prompt:    {}", shown(&ids_text(text, prompt)));
    println!("generated: {}", shown(&ids_text(text, generated)));
    println!();
}

/// Prints what `model`'s tracer saw (summary, attention, logit lens,
/// quantization error) and returns its summary; `None` when tracing is
/// off. Under `exact` the products are their own reference: no
/// quantization error is shown.
pub fn trace<M: Engine>(
    model: &M,
    prompt: &[u32],
    generated: &[u32],
    exact: bool,
) -> Option<TraceSummary> {
    let tracer = model.tracer();
    if !tracer.is_enabled() {
        return None;
    }
    let summary = tracer.summary();
    print!("{summary}");
    attention(&summary);
    lens(model, prompt, generated);
    if !exact {
        quant(&summary);
    }
    Some(summary)
}

/// The heads with the most weight on the first token, and the
/// recency-biased ones.
fn attention(summary: &TraceSummary) {
    if summary.heads.is_empty() {
        return;
    }
    let mut heads = summary.heads.clone();
    heads.sort_by(|a, b| b.mean_sink_weight.total_cmp(&a.mean_sink_weight));
    println!("\nattention sinks (heads with the most weight on the first token):");
    println!(
        "  {:>5} {:>4} {:>10} {:>10} {:>12} {:>9}",
        "layer", "head", "sink wt", "sink share", "entropy/max", "recency"
    );
    for h in heads.iter().take(6) {
        println!(
            "  {:>5} {:>4} {:>9.1}% {:>9.1}% {:>12.3} {:>8.1}%",
            h.layer,
            h.head,
            100.0 * h.mean_sink_weight,
            100.0 * h.sink_share(),
            h.mean_normalized_entropy,
            100.0 * h.recency_share()
        );
    }
    heads.sort_by(|a, b| b.recency_share().total_cmp(&a.recency_share()));
    let recent: Vec<String> = heads
        .iter()
        .filter(|h| h.recency_share() > 0.5)
        .take(8)
        .map(|h| {
            format!(
                "L{}H{} ({:.0}%)",
                h.layer,
                h.head,
                100.0 * h.recency_share()
            )
        })
        .collect();
    if recent.is_empty() {
        println!(
            "  recency: no head puts >70% of its weight on the last 5 positions in most steps"
        );
    } else {
        println!(
            "  recency-biased heads (>70% on the last 5 positions): {}",
            recent.join(", ")
        );
    }
}

/// The logit lens's story of each generated token: its rank through the
/// layers.
fn lens<M: Engine>(model: &M, prompt: &[u32], generated: &[u32]) {
    let layers = model.config().n_layers;
    let start = prompt.len() - 1; // the forward whose logits chose generated[0]
    let rows: Vec<_> = model
        .tracer()
        .forwards()
        .filter(|f| f.position >= start)
        .filter_map(|f| f.logits.as_ref().map(|l| (f.position, l)))
        .collect();
    if rows.is_empty() {
        return;
    }
    println!("\nlogit lens: each generated token's rank through the layers (0 = top)");
    println!("  decisive = the layer with the largest log-rank gain, ln(1 + rank)");
    let step = layers.div_ceil(10).max(1);
    let mut head = format!(
        "  {:>5} {:<16} {:>5} {:>8} |",
        "pos", "token", "won@", "decisive"
    );
    for l in (0..layers).step_by(step) {
        let _ = write!(head, " L{l:<5}");
    }
    println!("{head}");
    for (pos, lt) in rows {
        let Some(chosen) = generated.get(pos - start) else {
            continue;
        };
        let Some(tok) = lt.token(*chosen) else {
            continue;
        };
        let mut line = format!(
            "  {:>5} {:<16} {:>5} {:>8} |",
            pos,
            shown(&model.token_text(*chosen)),
            tok.won_at_layer().map_or("-".into(), |l| l.to_string()),
            tok.decisive_layer_log_rank()
                .map_or("-".into(), |l| l.to_string())
        );
        for (i, rank) in tok.ranks.iter().enumerate() {
            if tok.layer_at(i) % step == 0 {
                let _ = write!(line, " {rank:<6}");
            }
        }
        println!("{line}");
    }
}

/// The bricks that lose most under each what-if type.
pub fn what_if(summary: &TraceSummary) {
    if summary.what_if.is_empty() {
        return;
    }
    println!(
        "\nwhat-if: the bricks that lose most when re-quantized (keep these at higher precision):"
    );
    let mut types: Vec<_> = summary.what_if.iter().map(|w| w.quant_type).collect();
    types.dedup();
    for qt in types {
        let mut rows: Vec<_> = summary
            .what_if
            .iter()
            .filter(|w| w.quant_type == qt)
            .collect();
        rows.sort_by(|a, b| a.min_cosine.total_cmp(&b.min_cosine));
        let worst: Vec<String> = rows
            .iter()
            .take(5)
            .map(|w| {
                format!(
                    "{} L{} cos {:.5} ({:.1} dB)",
                    w.brick, w.layer, w.min_cosine, w.mean_snr_db
                )
            })
            .collect();
        println!(
            "  {:>5} ({:.2} bits/weight): {}",
            qt.name(),
            qt.bits_per_element(),
            worst.join("; ")
        );
    }
}

/// The quantized brick furthest from its f32 product.
fn quant(summary: &TraceSummary) {
    if let Some(w) = &summary.worst_brick {
        println!(
            "\nworst quantized brick: {} of layer {} ({} weights, 8-bit activations): cosine {:.6}, SNR {:.1} dB, max |err| {:.3e}",
            w.brick, w.layer_idx, w.quant_type, w.cosine_similarity, w.snr_db, w.max_abs_error
        );
    }
}
