//! Every snippet of the model-tracing contract, as written there (with
//! `trueno::brick` read as `model_tracer`), checking the values it prints.

use model_tracer::{
    AttentionTraceConfig, AttentionWeightTrace, BrickId, KvCacheSessionTrace, KvCacheStateTrace,
    LayerActivationTrace, LogitEvolutionTrace, ModelActivationTrace, ModelTracer,
    ModelTracerConfig, QuantType, QuantizationErrorTrace, TensorStats,
};

/// The contract leaves this helper to the user; this is one reasonable definition.
fn compute_residual_ratio(output: &[f32], after_attn: &[f32]) -> f32 {
    let update: Vec<f32> = output.iter().zip(after_attn).map(|(o, a)| o - a).collect();
    model_tracer::residual_ratio(after_attn, &update)
}

#[test]
fn quick_start() {
    let position = 0;
    let layer_idx = 0;
    let input_tensor = vec![0.5f32, -0.25, 1.0];
    let output_tensor = vec![0.75f32, -0.5, 1.5];

    let config = ModelTracerConfig::lightweight();
    let mut tracer = ModelTracer::new(config);
    tracer.begin_forward(position);
    let mut layer_trace = LayerActivationTrace::new(layer_idx);
    layer_trace.input_stats = TensorStats::from_slice(&input_tensor);
    layer_trace.output_stats = TensorStats::from_slice(&output_tensor);
    tracer.record_layer_activation(layer_trace);
    if let Some(anomaly) = tracer.end_forward() {
        log::warn!("Anomaly detected: {}", anomaly);
        panic!("clean activations reported as {anomaly}");
    }
    let summary = tracer.summary();
    println!("{}", summary);
    assert_eq!(summary.forwards, 1);
    assert_eq!(summary.layers[0].output.count, 3);
    assert!(summary.to_string().contains("anomalies: none"));
}

#[test]
fn tensor_stats() {
    let data = vec![1.0, 2.0, 3.0, 4.0, 5.0];
    let stats = TensorStats::from_slice(&data);
    println!("count: {}", stats.count); // 5
    println!("min: {}", stats.min); // 1.0
    println!("max: {}", stats.max); // 5.0
    println!("mean: {}", stats.mean); // 3.0
    println!("std: {}", stats.std); // 1.58
    println!("l2_norm: {}", stats.l2_norm); // 7.42
    println!("nan_count: {}", stats.nan_count); // 0
    println!("inf_count: {}", stats.inf_count); // 0
    assert_eq!(stats.count, 5);
    assert_eq!(stats.min, 1.0);
    assert_eq!(stats.max, 5.0);
    assert_eq!(stats.mean, 3.0);
    assert_eq!(format!("{:.2}", stats.std), "1.58");
    assert_eq!(format!("{:.2}", stats.l2_norm), "7.42");
    assert_eq!((stats.nan_count, stats.inf_count), (0, 0));
}

#[test]
fn anomaly_detection() {
    let nan_data = vec![1.0, f32::NAN, 3.0];
    let stats = TensorStats::from_slice(&nan_data);
    assert!(stats.has_anomaly());
    assert!(stats.anomaly_description().unwrap().contains("NaN"));
    let explode_data = vec![1.0, 1e7, 3.0];
    let stats = TensorStats::from_slice(&explode_data);
    assert!(stats.has_anomaly());
    let vanish_data = vec![1.0, 1.0, 1.0];
    let stats = TensorStats::from_slice(&vanish_data);
    assert!(stats.is_vanishing());
}

#[test]
fn layer_activation_trace() {
    let mut model_trace = ModelActivationTrace::with_capacity(32);
    for layer_idx in 0..32 {
        let f = layer_idx as f32;
        let input: Vec<f32> = (0..64).map(|i| (i as f32 + f).sin()).collect();
        let after_norm: Vec<f32> = input.iter().map(|v| v * 2.0).collect();
        let after_attn: Vec<f32> = input.iter().map(|v| v + 0.1).collect();
        let after_ffn: Vec<f32> = after_attn.iter().map(|v| v * 0.5).collect();
        let mut output: Vec<f32> = after_attn
            .iter()
            .zip(&after_ffn)
            .map(|(a, b)| a + b)
            .collect();
        if layer_idx == 20 {
            output[3] = f32::NAN;
        }
        let mut layer = LayerActivationTrace::new(layer_idx);
        layer.input_stats = TensorStats::from_slice(&input);
        layer.post_norm_stats = TensorStats::from_slice(&after_norm);
        layer.post_attn_stats = TensorStats::from_slice(&after_attn);
        layer.post_ffn_stats = TensorStats::from_slice(&after_ffn);
        layer.output_stats = TensorStats::from_slice(&output);
        layer.residual_ratio = compute_residual_ratio(&output, &after_attn);
        model_trace.add_layer(layer);
    }
    model_trace.finalize();
    if model_trace.has_anomaly {
        println!("Anomaly: {}", model_trace.anomaly_desc.clone().unwrap());
    }
    assert!(model_trace.has_anomaly);
    let desc = model_trace.anomaly_desc.unwrap();
    assert!(
        desc.contains("layer 20 output") && desc.contains("NaN"),
        "{desc}"
    );
}

#[test]
fn attention_weight_trace() {
    let weights = vec![0.4, 0.1, 0.05, 0.05, 0.2, 0.1, 0.1];
    let trace = AttentionWeightTrace::from_weights(
        0, // layer_idx
        0, // head_idx
        6, // query_pos (current token)
        &weights, 5, // top_k
    );
    println!("Top-5 positions: {:?}", trace.top_k_positions);
    println!("Top-5 weights: {:?}", trace.top_k_weights);
    println!("Tail mass: {}", trace.tail_mass);
    println!("Entropy: {}", trace.entropy);
    assert_eq!(trace.top_k_positions, vec![0, 4, 1, 5, 6]);
    assert_eq!(trace.top_k_weights, vec![0.4, 0.2, 0.1, 0.1, 0.1]);
    assert!((trace.tail_mass - 0.1).abs() < 1e-6);
    assert!((trace.entropy - 1.67875).abs() < 1e-4, "{}", trace.entropy);
    let mut warnings = Vec::new();
    if trace.is_attention_sink(0.3) {
        warnings.push("Warning: Attention sink on BOS token");
    }
    if trace.has_recency_bias(5, 0.7) {
        warnings.push("Warning: Strong recency bias (repetition risk)");
    }
    assert_eq!(warnings, vec!["Warning: Attention sink on BOS token"]);
}

#[test]
fn selective_attention_config() {
    let config = AttentionTraceConfig {
        top_k: 10,
        layers: Some(vec![0, 15, 31]), // Only trace specific layers
        heads: Some(vec![0, 1]),       // Only trace specific heads
        weight_threshold: 0.01,
    };
    let mut recorded = false;
    if config.should_trace_layer(15) && config.should_trace_head(0) {
        recorded = true;
    }
    assert!(recorded);
    assert!(!config.should_trace_layer(16));
}

#[test]
fn logit_evolution_trace() {
    let mut trace = LogitEvolutionTrace::new(100, 0.7, 0.9);
    let token = trace.track_token(42, "hello".to_string());
    token.record_layer(0.5, 500); // logit, rank at layer 0
    token.record_layer(1.0, 200); // layer 1
    token.record_layer(3.0, 10); // layer 2
    token.record_layer(5.0, 1); // layer 3
    let mut printed = None;
    if let Some(layer) = token.decisive_layer() {
        let line = format!("Token 'hello' rank changed most at layer {}", layer);
        println!("{line}");
        printed = Some(line);
    }
    // The largest drop in places: 500 -> 200, at layer 1.
    assert_eq!(
        printed.as_deref(),
        Some("Token 'hello' rank changed most at layer 1")
    );
    let logits = vec![1.0, 5.0, 3.0, 2.0, 4.0];
    let rank = LogitEvolutionTrace::compute_rank(&logits, 1); // token 1 has highest logit
    assert_eq!(rank, 0);
}

#[test]
fn quantization_error_trace() {
    let reference = vec![1.0, 2.0, 3.0, 4.0];
    let quantized = vec![1.02, 1.98, 3.05, 3.95];
    let trace = QuantizationErrorTrace::compute(
        BrickId::QkvProjection,
        5,
        &quantized,
        &reference,
        QuantType::Q4_K,
    );
    println!("MSE: {:.6}", trace.mse);
    println!("Cosine similarity: {:.6}", trace.cosine_similarity);
    println!("SNR: {:.1} dB", trace.snr_db);
    assert_eq!(format!("{:.6}", trace.mse), "0.001450");
    assert_eq!(format!("{:.1}", trace.snr_db), "37.1");
    assert!(trace.cosine_similarity > 0.9995);
    let verdict = if trace.is_acceptable() {
        "Quantization acceptable (cosine > 0.995)"
    } else if trace.is_warning() {
        "Quantization warning (0.99 < cosine < 0.995)"
    } else {
        "Quantization CRITICAL (cosine < 0.99)"
    };
    assert_eq!(verdict, "Quantization acceptable (cosine > 0.995)");
}

#[test]
fn quantization_types() {
    assert_eq!(QuantType::F32.bits_per_element(), 32.0);
    assert_eq!(QuantType::Q4_K.bits_per_element(), 4.5);
    let line = format!(
        "Q4_K compression: {:.1}x",
        QuantType::Q4_K.compression_ratio()
    );
    println!("{line}");
    assert_eq!(line, "Q4_K compression: 7.1x");
}

#[test]
fn kv_cache_state_trace() {
    let mut session = KvCacheSessionTrace::default();
    for step in 0..100 {
        let mut trace = KvCacheStateTrace::new(step, 2048);
        trace.valid_positions = step + 1;
        trace.cache_size_bytes = (step + 1) * 4096;
        trace.cache_hit_rate = 0.95;
        trace.evictions_this_step = if step > 90 { 1 } else { 0 };
        session.add_step(trace);
    }
    println!("Total evictions: {}", session.total_evictions);
    println!("Peak memory: {} KB", session.peak_memory_bytes / 1024);
    println!("Avg hit rate: {:.1}%", session.avg_hit_rate * 100.0);
    assert_eq!(session.total_evictions, 9);
    assert_eq!(session.peak_memory_bytes / 1024, 400);
    assert_eq!(format!("{:.1}%", session.avg_hit_rate * 100.0), "95.0%");
    let thrashing = session.has_thrashing(50, 0.5);
    if thrashing {
        println!("WARNING: Context thrashing detected");
    }
    assert!(!thrashing);
}

#[test]
fn unified_model_tracer() {
    let config = ModelTracerConfig::full();
    assert!(config.is_enabled() && config.trace_quant_error);
    let config = ModelTracerConfig::lightweight();
    assert!(config.is_enabled() && !config.trace_attention);
    let config = ModelTracerConfig::default();
    assert!(!config.is_enabled());
    let config = ModelTracerConfig {
        trace_activations: true,
        trace_attention: false, // Skip attention tracing
        trace_logits: true,
        trace_quant_error: false, // Too expensive for production
        trace_kv_cache: true,
        ..Default::default()
    };
    let mut tracer = ModelTracer::new(config);
    let position = 3;
    tracer.begin_forward(position);
    tracer.activation(0, model_tracer::Stage::Input, &[1.0, 2.0]);
    tracer.attention(0, 0, position, &[1.0]);
    tracer.final_logits(&[0.1, 0.9, 0.3]);
    if let Some(anomaly) = tracer.end_forward() {
        log::warn!("Anomaly: {}", anomaly);
        panic!("unexpected {anomaly}");
    }
    let summary = tracer.summary();
    println!("{}", summary);
    let f = tracer.last_forward().unwrap();
    assert!(f.attention.is_empty(), "attention was switched off");
    assert_eq!(f.logits.as_ref().unwrap().selected_token, Some(1));
    assert_eq!(summary.config, "activations+logits+kv_cache");
}
