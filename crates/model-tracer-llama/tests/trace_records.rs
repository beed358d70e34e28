//! Each trace system records exactly what it promises, once per (layer,
//! stage / head / brick, position), on the tiny synthetic model.

use model_tracer::{
    BrickId, Full, Lightweight, LogitRows, QuantSampling, QuantType, Stage, TraceOptions,
};
use model_tracer_llama::dtype::GgmlType;
use model_tracer_llama::model::{Config, Llama};

const PROMPT: [u32; 6] = [3, 1, 4, 1, 5, 9];

fn tiny_full(sampling: QuantSampling) -> Llama<Full> {
    let mut m = Llama::synthetic(Config::tiny(), GgmlType::Q4_1, 5, Full).unwrap();
    // Every prompt position gets its logits (and lens, and LM-head
    // brick), as one position at a time gives them.
    let options = TraceOptions {
        max_forwards: 100,
        logit_rows: LogitRows::Every,
        ..TraceOptions::default()
    };
    *m.tracer_mut() = model_tracer::ModelTracer::with_options(Full, options);
    m.tracer_mut().set_quant_sampling(sampling);
    m
}

#[test]
fn every_system_records_once_per_site_and_position() {
    let c = Config::tiny();
    let mut m = tiny_full(QuantSampling::Every);
    let g = m.generate(&PROMPT, 4, |_| {});
    let n_forwards = PROMPT.len() + g.tokens.len() - 1;
    let forwards: Vec<_> = m.tracer().forwards().collect();
    assert_eq!(forwards.len(), n_forwards);
    for (i, f) in forwards.iter().enumerate() {
        assert_eq!(f.position, i);
        // activations: embedding, 6 stages per layer, final norm, logits
        let a = &f.activations;
        assert_eq!(a.recorded().count(), 1 + 6 * c.n_layers + 2);
        assert_eq!(a.layers.len(), c.n_layers);
        for (l, layer) in a.layers.iter().enumerate() {
            assert_eq!(layer.layer_idx, l);
            for s in Stage::LAYER_STAGES {
                // Every layer stage is a vector of the residual width.
                assert_eq!(layer.stats(s).unwrap().count, c.dim, "{s}");
            }
            assert!(layer.residual_ratio > 0.0 && layer.residual_ratio < 1.0);
        }
        assert_eq!(a.logits_stats.count, c.vocab_size);
        // attention: every head of every layer, over position + 1 keys
        assert_eq!(f.attention.len(), c.n_layers * c.n_heads);
        for (j, t) in f.attention.iter().enumerate() {
            assert_eq!((t.layer_idx, t.head_idx), (j / c.n_heads, j % c.n_heads));
            assert_eq!((t.query_pos, t.context_len), (i, i + 1));
        }
        // logit lens: the final top-3, ranked at every layer
        let lt = f.logits.as_ref().unwrap();
        assert_eq!(lt.tokens.len(), 3);
        for tok in &lt.tokens {
            assert_eq!(tok.layers, (0..c.n_layers).collect::<Vec<_>>());
            assert_eq!(tok.ranks.len(), c.n_layers);
        }
        // quantization error: 5 bricks per layer and the LM head
        let q = &f.quantization;
        assert_eq!(q.traces.len(), 5 * c.n_layers + 1);
        for b in [
            BrickId::QkvProjection,
            BrickId::AttentionOutput,
            BrickId::FfnGate,
            BrickId::FfnUp,
            BrickId::FfnDown,
        ] {
            let layers: Vec<usize> = q
                .traces
                .iter()
                .filter(|t| t.brick == b)
                .map(|t| t.layer_idx)
                .collect();
            assert_eq!(layers, (0..c.n_layers).collect::<Vec<_>>(), "{b}");
        }
        assert!(q.kl_divergence.is_some() && q.top1_agrees.is_some());
        assert!(q.traces.iter().all(|t| t.quant_type == QuantType::Q4_1));
        // KV cache: one state per step
        let kv = f.kv_cache.unwrap();
        assert_eq!((kv.step, kv.valid_positions), (i, i + 1));
        assert!(f.what_if.is_empty());
    }
    assert_eq!(m.tracer().kv_session().unwrap().total_steps, n_forwards);
}

#[test]
fn the_final_lens_rank_of_each_greedy_token_is_zero() {
    let mut m = tiny_full(QuantSampling::RotateBrick);
    let g = m.generate(&PROMPT, 5, |_| {});
    for (k, f) in m.tracer().forwards().skip(PROMPT.len() - 1).enumerate() {
        let lt = f.logits.as_ref().unwrap();
        let chosen = g.tokens[k];
        assert_eq!(lt.selected_token, Some(chosen));
        assert_eq!(lt.token(chosen).unwrap().final_rank(), Some(0));
    }
}

#[test]
fn rotating_quant_sampling_measures_one_brick_kind_per_forward() {
    let c = Config::tiny();
    let mut m = tiny_full(QuantSampling::RotateBrick);
    m.generate(&PROMPT, 7, |_| {});
    let mut kinds = std::collections::BTreeSet::new();
    for f in m.tracer().forwards() {
        let q = &f.quantization;
        let brick = q.traces[0].brick;
        assert!(q.traces.iter().all(|t| t.brick == brick));
        let expected = if brick == BrickId::LmHead {
            1
        } else {
            c.n_layers
        };
        assert_eq!(q.traces.len(), expected, "position {}", f.position);
        kinds.insert(brick);
    }
    assert_eq!(kinds.len(), 6, "all six brick kinds come round");
}

#[test]
fn lightweight_records_activations_and_kv_only() {
    let mut m = Llama::synthetic(Config::tiny(), GgmlType::Q4_1, 5, Lightweight).unwrap();
    m.generate(&PROMPT, 3, |_| {});
    for f in m.tracer().forwards() {
        assert!(f.attention.is_empty() && f.logits.is_none() && f.quantization.traces.is_empty());
        assert!(f.kv_cache.is_some());
        // The prompt is one chunk: only its last position has logits (and
        // so logit statistics), as every generated position has.
        let logits = usize::from(f.position + 1 >= PROMPT.len());
        assert_eq!(f.activations.recorded().count(), 1 + 6 * 4 + 1 + logits);
    }
}

#[test]
fn what_if_requantization_is_traced_per_brick_layer_and_type() {
    let c = Config::tiny();
    let mut m = tiny_full(QuantSampling::RotateBrick);
    m.set_what_if(&[GgmlType::Q8_0, GgmlType::Q4_0]).unwrap();
    m.generate(&PROMPT, 2, |_| {});
    for f in m.tracer().forwards() {
        assert_eq!(f.what_if.len(), 2 * (5 * c.n_layers + 1));
    }
    let s = m.tracer().summary();
    let mean = |qt: QuantType| {
        let rows: Vec<_> = s.what_if.iter().filter(|w| w.quant_type == qt).collect();
        assert_eq!(rows.len(), 5 * c.n_layers + 1);
        rows.iter().map(|w| w.mean_cosine as f64).sum::<f64>() / rows.len() as f64
    };
    let (q8, q4) = (mean(QuantType::Q8_0), mean(QuantType::Q4_0));
    assert!(q8 > 0.9999, "Q8_0 re-quantization of f32 masters: {q8}");
    assert!(q4 < q8 && q4 > 0.98, "Q4_0: {q4}");
    assert!(s.to_string().contains("what-if re-quantization"));
    m.set_what_if(&[]).unwrap();
    m.generate(&PROMPT, 1, |_| {});
    assert!(m.tracer().last_forward().unwrap().what_if.is_empty());
}

#[cfg(feature = "serde")]
#[test]
fn the_json_export_parses_and_holds_the_ids() {
    let mut m = tiny_full(QuantSampling::RotateBrick);
    let g = m.generate(&PROMPT, 3, |_| {});
    let doc = model_tracer_llama::export::trace_json(&m, &PROMPT, &g.tokens);
    let text = serde_json::to_string(&doc).unwrap();
    let back: serde_json::Value = serde_json::from_str(&text).unwrap();
    let ids = |k: &str| -> Vec<u64> {
        back[k]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect()
    };
    assert_eq!(
        ids("prompt_ids"),
        PROMPT.iter().map(|&t| t as u64).collect::<Vec<_>>()
    );
    assert_eq!(
        ids("generated_ids"),
        g.tokens.iter().map(|&t| t as u64).collect::<Vec<_>>()
    );
    assert_eq!(back["forwards"].as_array().unwrap().len(), PROMPT.len() + 2);
    assert_eq!(back["summary"]["forwards"], PROMPT.len() + 2);
}
