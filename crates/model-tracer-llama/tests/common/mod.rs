//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

use model_tracer::{ModelTracer, QuantSampling, TraceConfig, TraceOptions};
use model_tracer_llama::dtype::GgmlType;
use model_tracer_llama::model::{
    synthetic_weights, Config, Fault, FaultKind, KvCacheOptions, KvType, Llama,
};

#[allow(unused_imports)]
pub use model_tracer_test_support::{in_ci, model_path, python_with, real_model, require};

/// A fresh directory under the target dir for one test's files.
pub fn scratch_dir(name: &str) -> PathBuf {
    model_tracer_test_support::scratch_dir(env!("CARGO_TARGET_TMPDIR"), name)
}

/// The tiny synthetic model with a KV cache of `capacity` positions (4
/// sinks), every forward retained, quantization measured for every brick.
pub fn tiny_model<C: TraceConfig>(trace: C, capacity: usize) -> Llama<C> {
    let config = Config::tiny();
    let weights = synthetic_weights(&config, GgmlType::Q8_0, 5).unwrap();
    let cache = KvCacheOptions {
        capacity,
        sinks: 4,
        kv_type: KvType::F32,
    };
    let mut model = Llama::new(config, weights, None, cache, trace.clone()).unwrap();
    let options = TraceOptions {
        max_forwards: 1024,
        ..TraceOptions::default()
    };
    *model.tracer_mut() = ModelTracer::with_options(trace, options);
    model.tracer_mut().set_quant_sampling(QuantSampling::Every);
    model
}

/// A NaN injected into layer `layer`'s attention output at `position` only.
pub fn nan_at(layer: usize, position: usize) -> Fault {
    Fault {
        kind: FaultKind::NaN,
        layer,
        position: Some(position),
    }
}

/// Runs `tokens` one forward each.
pub fn run_tokens<C: TraceConfig>(model: &mut Llama<C>, tokens: &[u32]) {
    for &t in tokens {
        model.forward(t);
    }
}
