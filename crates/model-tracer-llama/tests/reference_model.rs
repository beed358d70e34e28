//! The reference decoder: synthetic models (always) and the real SmolLM2
//! file (when present; CI fetches it).

mod common;

use model_tracer::{AnomalyKind, Disabled, Full, Lightweight, Origin, TraceConfig};
use model_tracer_llama::dtype::GgmlType;
use model_tracer_llama::model::{Config, Fault, FaultKind, KvCacheOptions, KvType, Llama};

fn tiny<C: TraceConfig>(trace: C) -> Llama<C> {
    match Llama::synthetic(Config::tiny(), GgmlType::Q8_0, 7, trace) {
        Ok(m) => m,
        Err(e) => panic!("synthetic model: {e}"),
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|f| f.to_bits()).collect()
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

const TOKENS: [u32; 12] = [1, 17, 300, 42, 42, 99, 511, 0, 256, 3, 3, 128];

fn min_cosine(ty: GgmlType, masters: bool) -> f64 {
    let c = Config::tiny();
    let build = |exact: bool| {
        let mut w = model_tracer_llama::model::synthetic_weights(&c, ty, 11).unwrap();
        if !masters {
            w.drop_masters();
        }
        let cache = KvCacheOptions {
            capacity: 64,
            sinks: 4,
            kv_type: KvType::F32,
        };
        let mut m = Llama::new(c.clone(), w, None, cache, Disabled).unwrap();
        m.set_exact(exact);
        m
    };
    let (mut q, mut r) = (build(false), build(true));
    TOKENS
        .iter()
        .map(|&t| cosine(q.forward(t), r.forward(t)))
        .fold(1.0, f64::min)
}

#[test]
fn quantized_path_agrees_with_the_f32_reference() {
    // Against dequantized weights: what 8-bit activations cost.
    for ty in [GgmlType::Q8_0, GgmlType::Q4_1, GgmlType::Q4_0] {
        let c = min_cosine(ty, false);
        assert!(c > 0.995, "{ty}: cosine {c}");
    }
    // Against the f32 masters: weights and activations quantized.
    let c = min_cosine(GgmlType::Q8_0, true);
    assert!(c > 0.99, "Q8_0 vs masters: cosine {c}");
    let c4 = min_cosine(GgmlType::Q4_0, true);
    assert!(
        c4 < c,
        "4-bit weights cost more than 8-bit ones: {c4} vs {c}"
    );
}

#[test]
fn same_tokens_give_the_same_logits_bit_for_bit() {
    let mut a = tiny(Disabled);
    let mut b = tiny(Disabled);
    let first: Vec<Vec<u32>> = TOKENS.iter().map(|&t| bits(a.forward(t))).collect();
    let second: Vec<Vec<u32>> = TOKENS.iter().map(|&t| bits(b.forward(t))).collect();
    assert_eq!(first, second);
    a.clear_kv_cache();
    let again: Vec<Vec<u32>> = TOKENS.iter().map(|&t| bits(a.forward(t))).collect();
    assert_eq!(first, again);
}

#[test]
fn tracing_never_changes_the_computation() {
    let mut off = tiny(Disabled);
    let mut full = tiny(Full);
    full.tracer_mut()
        .set_quant_sampling(model_tracer::QuantSampling::Every);
    for &t in &TOKENS {
        assert_eq!(bits(off.forward(t)), bits(full.forward(t)));
    }
    let a = off.generate(&[5, 6, 7], 6, |_| {});
    let b = full.generate(&[5, 6, 7], 6, |_| {});
    assert_eq!(a.tokens, b.tokens);
}

#[test]
fn kv_eviction_keeps_the_sinks_and_the_recent_window() {
    let weights =
        model_tracer_llama::model::synthetic_weights(&Config::tiny(), GgmlType::Q8_0, 3).unwrap();
    let cache = KvCacheOptions {
        capacity: 8,
        sinks: 2,
        kv_type: KvType::F32,
    };
    let mut m = Llama::new(Config::tiny(), weights, None, cache, Lightweight).unwrap();
    for t in 0..20u32 {
        m.forward(t);
    }
    let positions: Vec<usize> = m.cache().positions().collect();
    assert_eq!(positions, vec![0, 1, 14, 15, 16, 17, 18, 19]);
    let tokens: Vec<u32> = m.cache().tokens().collect();
    assert_eq!(tokens, vec![0, 1, 14, 15, 16, 17, 18, 19]);
    assert_eq!(m.cache().total_evictions(), 12);
    let kv = m.tracer().kv_session().unwrap();
    assert_eq!(kv.total_evictions, 12);
    assert_eq!(kv.total_steps, 20);
    let last = kv.last().unwrap();
    assert_eq!((last.valid_positions, last.max_positions), (8, 8));
    assert_eq!(last.evictions_this_step, 1);
    // 7 of the 20 positions of the context were served from the cache.
    assert!((last.cache_hit_rate - 7.0 / 20.0).abs() < 1e-6);
    assert!(kv.has_thrashing(10, 0.5));
}

#[test]
fn a_cached_prefix_is_reused_and_gives_the_same_logits() {
    let mut m = tiny(Disabled);
    let g1 = m.generate(&[4, 8, 15, 16], 5, |_| {});
    assert_eq!(g1.reused_prompt_positions, 0);
    assert_eq!(g1.computed_prompt_positions, 4);
    // Second turn: the whole first turn plus new tokens.
    let mut turn2: Vec<u32> = vec![4, 8, 15, 16];
    turn2.extend(&g1.tokens);
    turn2.extend([23, 42]);
    let g2 = m.generate(&turn2, 4, |_| {});
    // The last generated token was never run, so it is computed with the new ones.
    assert_eq!(g2.reused_prompt_positions, 4 + g1.tokens.len() - 1);
    assert_eq!(g2.computed_prompt_positions, 3);
    let mut fresh = tiny(Disabled);
    let g3 = fresh.generate(&turn2, 4, |_| {});
    assert_eq!(g2.tokens, g3.tokens);
    assert_eq!(bits(m.logits()), bits(fresh.logits()));
}

#[test]
fn scale_and_swap_faults_stay_below_every_anomaly_rule() {
    let layers = Config::tiny().n_layers;
    let mut clean = tiny(Lightweight);
    for &t in &TOKENS[..4] {
        clean.forward(t);
    }
    for text in ["scale@1", "scale@2:post_ffn", "swap@0", "swap@3:post_ffn"] {
        let fault = Fault::parse(text).unwrap_or_else(|e| panic!("{e}"));
        assert!(fault.layer < layers);
        let mut m = tiny(Lightweight);
        m.set_fault(Some(fault));
        for &t in &TOKENS[..4] {
            m.forward(t);
        }
        assert_eq!(m.tracer().summary().total_anomalies(), 0, "{text}");
        let (a, b) = (clean.tracer().last_forward(), m.tracer().last_forward());
        let stats = |f: Option<&model_tracer::ForwardTrace>| {
            f.and_then(|f| f.activations.stats(fault.layer, fault.stage()).copied())
        };
        let (sa, sb) = (stats(a), stats(b));
        assert!(sa.is_some() && sb.is_some(), "{text}");
        if let (Some(sa), Some(sb)) = (sa, sb) {
            match fault.kind {
                FaultKind::Scale(_) => {
                    let r = sb.l2_norm / sa.l2_norm;
                    assert!((r - 1.01).abs() < 1e-4, "{text}: ratio {r}");
                }
                // A permutation of the values: the same moments.
                _ => {
                    assert!(
                        (sb.l2_norm - sa.l2_norm).abs() <= 1e-5 * sa.l2_norm,
                        "{text}"
                    );
                    assert_eq!((sb.min, sb.max), (sa.min, sa.max), "{text}");
                }
            }
        }
    }
    for bad in ["scale@1:output", "nan@1:post_attn", "swap@x", "warp@1"] {
        assert!(Fault::parse(bad).is_err(), "{bad}");
    }
}

#[test]
fn injected_faults_are_found_at_their_origin_every_layer_every_kind() {
    let layers = Config::tiny().n_layers;
    for kind in [FaultKind::NaN, FaultKind::Inf, FaultKind::Explode] {
        for layer in 0..layers {
            let mut m = tiny(Lightweight);
            let fault = Fault {
                kind,
                layer,
                position: Some(2),
            };
            m.set_fault(Some(fault));
            for &t in &TOKENS[..4] {
                m.forward(t);
            }
            let at2 = m
                .tracer()
                .forwards()
                .find(|f| f.position == 2)
                .expect("position 2 is retained");
            let a = at2.primary_anomaly().expect("the fault is reported");
            let want = match kind {
                FaultKind::NaN => AnomalyKind::NaN,
                FaultKind::Inf => AnomalyKind::Inf,
                FaultKind::Explode => AnomalyKind::Explosion,
                FaultKind::Scale(_) | FaultKind::SwapHeads(_) => unreachable!("not in this loop"),
            };
            assert_eq!(a.kind, want, "{fault:?}: {a}");
            assert_eq!(a.layer, Some(layer), "{fault:?}: {a}");
            assert_eq!(a.stage, fault.stage(), "{fault:?}: {a}");
            assert_eq!(a.origin, Origin::Produced, "{fault:?}: {a}");
            assert_eq!(a.position, 2);
            let before = m.tracer().forwards().filter(|f| f.position < 2);
            assert!(before.into_iter().all(|f| f.anomalies.is_empty()));
            // The session remembers the same origin as its first anomaly,
            // with a site where it was produced.
            let s = m.tracer().summary();
            // (Field by field: the value of a NaN anomaly is NaN, and
            // NaN != NaN.)
            let key = |a: &model_tracer::Anomaly| {
                let place = (a.position, a.layer, a.stage, a.kind, a.origin);
                (place, a.count, a.total, a.value.to_bits())
            };
            assert_eq!(s.first_anomaly.as_ref().map(key), Some(key(a)), "{fault:?}");
            let site = s
                .anomaly_sites
                .iter()
                .find(|site| (site.layer, site.stage) == (Some(layer), fault.stage()))
                .unwrap_or_else(|| panic!("{fault:?}: no site in {:?}", s.anomaly_sites));
            assert!(
                site.counts[want as usize] >= 1 && site.produced >= 1,
                "{site:?}"
            );
            assert_eq!(site.first_position, 2, "{site:?}");
        }
    }
}

#[test]
fn a_clean_synthetic_run_reports_no_anomaly() {
    let mut m = tiny(Full);
    m.generate(&TOKENS, 8, |_| {});
    let s = m.tracer().summary();
    assert_eq!(s.total_anomalies(), 0, "{s}");
    assert_eq!(s.forwards, TOKENS.len() + 7);
}

#[test]
fn bad_configs_and_token_ids_have_defined_answers() {
    let mut c = Config::tiny();
    c.n_kv_heads = 3;
    assert!(Llama::synthetic(c, GgmlType::Q8_0, 1, Disabled).is_err());
    let mut m = tiny(Disabled);
    let a = bits(m.forward(u32::MAX));
    m.clear_kv_cache();
    assert_eq!(
        a,
        bits(m.forward(0)),
        "out-of-vocabulary ids read as token 0"
    );
    assert!(m.generate(&[], 5, |_| {}).tokens.is_empty());
    assert!(m.generate(&[1], 0, |_| {}).tokens.is_empty());
}

// ---- the real model ------------------------------------------------------

#[test]
fn smollm2_answers_paris_like_llama_cpp() {
    let Some(path) = common::real_model() else {
        return;
    };
    let mut m = Llama::from_gguf(&path, None, Disabled).unwrap();
    let c = &m.config;
    assert_eq!(
        (c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.vocab_size),
        (30, 576, 9, 3, 49152)
    );
    let tok = m.tokenizer.as_ref().unwrap();
    let ids = tok.encode("The capital of France is");
    assert_eq!(ids, vec![504, 3575, 282, 4649, 314]);
    let g = m.generate(&ids, 1, |_| {});
    assert_eq!(g.tokens, vec![7042], "greedy next token must be \" Paris\"");
}

/// Top-5 `(token, logit)` of an independent numpy forward pass on the weights
/// dequantized by the `gguf` Python package
/// (`tests/fixtures/smollm2_reference_forward.py`).
const NUMPY_PARIS_TOP5: [(u32, f32); 5] = [
    (7042, 17.371265),
    (260, 14.888596),
    (4528, 13.244975),
    (2250, 13.00947),
    (1315, 12.95152),
];
const NUMPY_CHAT_TOP5: [(u32, f32); 5] = [
    (504, 25.325386),
    (60, 25.243277),
    (15319, 24.942413),
    (2219, 24.401665),
    (7026, 24.314629),
];

fn top5(logits: &[f32]) -> Vec<(u32, f32)> {
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|a, b| logits[*b].total_cmp(&logits[*a]));
    idx[..5].iter().map(|&i| (i as u32, logits[i])).collect()
}

fn chat_prompt(m: &Llama<impl TraceConfig>) -> Vec<u32> {
    let tok = m.tokenizer.as_ref().unwrap();
    let messages = [model_tracer_llama::tokenizer::ChatMessage::user(
        "What is the capital of France?",
    )];
    tok.encode(&tok.apply_chat_template(&messages, true).unwrap())
}

#[test]
fn smollm2_exact_path_matches_an_independent_numpy_forward() {
    let Some(path) = common::real_model() else {
        return;
    };
    let mut m = Llama::from_gguf(&path, None, Disabled).unwrap();
    m.set_exact(true);
    let chat = chat_prompt(&m);
    assert_eq!(chat.len(), 37);
    for (prompt, expected) in [
        (vec![504, 3575, 282, 4649, 314], NUMPY_PARIS_TOP5),
        (chat, NUMPY_CHAT_TOP5),
    ] {
        m.clear_kv_cache();
        m.prefill(&prompt);
        let got = top5(m.logits());
        for ((gi, gl), (ei, el)) in got.iter().zip(expected) {
            assert_eq!(*gi, ei, "{got:?} vs {expected:?}");
            assert!((gl - el).abs() < 2e-3, "{got:?} vs {expected:?}");
        }
    }
}

#[test]
fn smollm2_quantized_path_tracks_the_exact_path() {
    let Some(path) = common::real_model() else {
        return;
    };
    let mut m = Llama::from_gguf(&path, None, Disabled).unwrap();
    let chat = chat_prompt(&m);
    m.prefill(&chat);
    let quantized = m.logits().to_vec();
    m.set_exact(true);
    m.prefill(&chat);
    let exact = m.logits().to_vec();
    let c = cosine(&quantized, &exact);
    assert!(c > 0.99, "cosine {c}");
    let q5: Vec<u32> = top5(&quantized).iter().map(|t| t.0).collect();
    let shared = top5(&exact).iter().filter(|t| q5.contains(&t.0)).count();
    assert!(shared >= 4, "{q5:?}");
}

#[test]
fn smollm2_chat_run_completes_clean() {
    let Some(path) = common::real_model() else {
        return;
    };
    let mut m = Llama::from_gguf(&path, None, Lightweight).unwrap();
    let ids = chat_prompt(&m);
    let g = m.generate(&ids, 12, |_| {});
    assert_eq!(g.tokens.len(), 12);
    let text = m.tokenizer.as_ref().unwrap().decode(&g.tokens);
    assert!(
        text.chars().filter(|c| c.is_alphabetic()).count() > 10,
        "{text:?}"
    );
    let s = m.tracer().summary();
    assert_eq!(s.total_faults(), 0, "{s}");
    assert_eq!(s.forwards, ids.len() + 11);
    // The first token carries SmolLM2's massive activations (|x| ~ 2.5e4
    // from layer 11 on): the tracer sees them without calling them faults.
    let first = &s.layers[12];
    assert!(first.max_abs > 1e4 && first.max_abs < 1e6, "{s}");
}

#[cfg(feature = "serde")]
#[test]
fn smollm2_full_trace_lens_ends_at_the_chosen_token_and_exports() {
    let Some(path) = common::real_model() else {
        return;
    };
    let mut m = Llama::from_gguf(&path, None, Full).unwrap();
    let ids = [504, 3575, 282, 4649, 314];
    let g = m.generate(&ids, 4, |_| {});
    assert_eq!(g.tokens[0], 7042);
    let n_layers = m.config.n_layers;
    let chosen_forwards = m
        .tracer()
        .forwards()
        .filter(|f| f.position + 1 >= ids.len());
    for (f, &tok) in chosen_forwards.zip(&g.tokens) {
        let lt = f.logits.as_ref().unwrap();
        let t = lt.token(tok).expect("the chosen token is tracked");
        assert_eq!(t.layers.last(), Some(&(n_layers - 1)));
        assert_eq!(t.final_rank(), Some(0), "position {}", f.position);
        assert_eq!(f.attention.len(), n_layers * m.config.n_heads);
    }
    let s = m.tracer().summary();
    assert_eq!(s.total_faults(), 0, "{s}");
    let text = serde_json::to_string(&model_tracer_llama::export::trace_json(&m, &ids, &g.tokens))
        .unwrap();
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    let generated: Vec<u32> = doc["generated_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(generated, g.tokens);
    assert_eq!(doc["prompt_ids"].as_array().unwrap().len(), ids.len());
}

/// The batched products of the real weights (every matrix of the first and
/// last layers, and the LM head) equal the one-row products bit for bit,
/// on activation rows made of the prompt's token embeddings.
#[test]
fn smollm2_batched_products_equal_one_row_products() {
    use model_tracer_llama::quant::{QMatrix, QuantizedActivations, QuantizedBatch};
    let Some(path) = common::real_model() else {
        return;
    };
    let m = Llama::from_gguf(&path, None, Disabled).unwrap();
    let tok = m.tokenizer.as_ref().unwrap();
    let ids = tok.encode("The capital of France is Paris, and the capital of Italy is Rome.");
    let dim = m.config.dim;
    let mut rows = vec![0f32; 0];
    let mut row = vec![0f32; dim];
    for &id in ids.iter().cycle().take(19) {
        m.weights.token_embd.dequantize_row(id as usize, &mut row);
        rows.extend(row.iter().map(|v| v * 40.0));
    }
    let ffn: Vec<f32> = rows
        .iter()
        .cycle()
        .take(19 * m.config.ffn_dim)
        .enumerate()
        .map(|(i, v)| v * if i % 3 == 0 { -1.5 } else { 0.5 })
        .collect();
    let w = &m.weights;
    let mut matrices: Vec<(&str, &QMatrix)> = vec![("output", &w.output.weight)];
    for layer in [&w.layers[0], &w.layers[29]] {
        matrices.extend([
            ("q", &layer.attn_q.weight),
            ("k", &layer.attn_k.weight),
            ("v", &layer.attn_v.weight),
            ("o", &layer.attn_output.weight),
            ("gate", &layer.ffn_gate.weight),
            ("up", &layer.ffn_up.weight),
            ("down", &layer.ffn_down.weight),
        ]);
    }
    let mut batch = QuantizedBatch::new();
    let mut acts = QuantizedActivations::new();
    for (name, w) in matrices {
        let x = if w.cols() == dim { &rows } else { &ffn };
        let t_rows = x.len() / w.cols();
        batch.quantize_from(x, w.cols(), w.ty()).unwrap();
        let mut out = vec![0f32; t_rows * w.rows()];
        let mut exact = vec![0f32; t_rows * w.rows()];
        w.matmul(&batch, &mut out);
        w.matmul_f32(x, &mut exact);
        let mut one = vec![0f32; w.rows()];
        for t in 0..t_rows {
            let xt = &x[t * w.cols()..(t + 1) * w.cols()];
            acts.quantize_from(xt, w.ty()).unwrap();
            w.matvec(&acts, &mut one);
            let got = &out[t * w.rows()..(t + 1) * w.rows()];
            assert!(
                got.iter()
                    .zip(&one)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{name} ({}): row {t} differs from matvec",
                w.ty()
            );
            w.matvec_f32(xt, &mut one);
            let got = &exact[t * w.rows()..(t + 1) * w.rows()];
            assert!(
                got.iter()
                    .zip(&one)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{name} ({}): row {t} differs from matvec_f32",
                w.ty()
            );
        }
    }
}
