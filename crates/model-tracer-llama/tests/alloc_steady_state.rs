//! Heap allocations of a traced decode step once the tracer is warm.
//!
//! A counting global allocator counts per thread (the test harness runs
//! tests on parallel threads); each decode step below runs on the test's own
//! thread, so its count is exact.

use model_tracer::config::DEFAULT_HISTORY;
use model_tracer::{Disabled, Full, Lightweight, Recorder, TraceConfig};
use model_tracer_llama::dtype::GgmlType;
use model_tracer_llama::model::{synthetic_weights, Config, KvCacheOptions, KvType, Llama};
use model_tracer_test_support::{allocations, CountingAllocator};

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

/// The tiny synthetic model traced by `trace`.
fn tiny<C: TraceConfig>(trace: C) -> Llama<C> {
    let config = Config::tiny();
    let weights = synthetic_weights(&config, GgmlType::Q4_1, 7).expect("tiny synthetic weights");
    let cache = KvCacheOptions {
        capacity: 256,
        sinks: 4,
        kv_type: KvType::F32,
    };
    Llama::new(config, weights, None, cache, trace).expect("tiny model")
}

fn token(position: usize) -> u32 {
    ((position * 31 + 5) % 512) as u32
}

/// Steps that fill the tracer's history, then recycle each of its records
/// once (a recycled record grows its buffers to the largest forward seen),
/// and then some.
const WARM_UP: usize = 2 * DEFAULT_HISTORY + 8;
/// Steps counted after the warm-up.
const MEASURED: usize = 24;

/// Allocations of each of `MEASURED` decode steps after `WARM_UP` steps.
fn allocations_per_step<C: TraceConfig>(trace: C) -> Vec<usize> {
    let mut model = tiny(trace);
    for position in 0..WARM_UP {
        model.forward(token(position));
    }
    (WARM_UP..WARM_UP + MEASURED)
        .map(|position| {
            let before = allocations();
            model.forward(token(position));
            allocations() - before
        })
        .collect()
}

#[test]
fn counter_sees_allocations() {
    let before = allocations();
    let v: Vec<u64> = std::hint::black_box((0..100).collect());
    assert!(
        allocations() > before,
        "the counting allocator is not in use"
    );
    drop(v);
}

#[test]
fn untraced_step_allocates_nothing() {
    let per_step = allocations_per_step(Disabled);
    assert!(per_step.iter().all(|&n| n == 0), "{per_step:?}");
}

#[test]
fn lightweight_step_allocates_nothing_after_warm_up() {
    let per_step = allocations_per_step(Lightweight);
    println!("Lightweight: allocations per decode step after warm-up: {per_step:?}");
    assert!(per_step.iter().all(|&n| n == 0), "{per_step:?}");
}

/// A config that traces one system (or the logit ranks without the lens).
macro_rules! one_system {
    ($name:ident, $act:expr, $att:expr, $log:expr, $lens:expr, $quant:expr, $kv:expr) => {
        #[derive(Debug, Clone, Copy, Default)]
        struct $name;

        impl TraceConfig for $name {
            const ACTIVATIONS: bool = $act;
            const ATTENTION: bool = $att;
            const LOGITS: bool = $log;
            const LOGIT_LENS: bool = $lens;
            const QUANT_ERROR: bool = $quant;
            const KV_CACHE: bool = $kv;
            type Storage = Recorder;
        }
    };
}

one_system!(Activations, true, false, false, false, false, false);
one_system!(KvCache, false, false, false, false, false, true);
one_system!(Attention, false, true, false, false, false, false);
one_system!(FinalRanks, false, false, true, false, false, false);
one_system!(LogitLens, false, false, true, true, false, false);
one_system!(QuantError, false, false, false, false, true, false);

fn assert_none(name: &str, per_step: &[usize]) {
    println!("{name}: allocations per decode step after warm-up: {per_step:?}");
    assert!(
        per_step.iter().all(|&n| n == 0),
        "{name} allocates after warm-up: {per_step:?}"
    );
}

#[test]
fn each_system_alone_allocates_nothing_after_warm_up() {
    assert_none("activations", &allocations_per_step(Activations));
    assert_none("KV cache", &allocations_per_step(KvCache));
    assert_none("attention", &allocations_per_step(Attention));
    assert_none("final logit ranks", &allocations_per_step(FinalRanks));
    assert_none("logit lens", &allocations_per_step(LogitLens));
    assert_none("quantization error", &allocations_per_step(QuantError));
}

/// Activation statistics and their fingerprints.
#[derive(Debug, Clone, Copy, Default)]
struct Fingerprints;

impl TraceConfig for Fingerprints {
    const ACTIVATIONS: bool = true;
    const ATTENTION: bool = false;
    const LOGITS: bool = false;
    const QUANT_ERROR: bool = false;
    const KV_CACHE: bool = false;
    const FINGERPRINTS: bool = true;
    type Storage = Recorder;
}

#[test]
fn fingerprints_allocate_nothing_after_warm_up() {
    let mut model = tiny(Fingerprints);
    for position in 0..WARM_UP {
        model.forward(token(position));
    }
    let traced = model.tracer().last_forward().map(|f| {
        f.activations
            .recorded()
            .filter(|&(l, s, _)| f.activations.fingerprint(l.unwrap_or(0), s).is_some())
            .count()
    });
    assert!(
        traced.is_some_and(|n| n > 20),
        "{traced:?} stages fingerprinted"
    );
    let per_step: Vec<usize> = (WARM_UP..WARM_UP + MEASURED)
        .map(|position| {
            let before = allocations();
            model.forward(token(position));
            allocations() - before
        })
        .collect();
    assert_none("activations with fingerprints", &per_step);
}

#[test]
fn full_step_allocates_nothing_after_warm_up() {
    assert_none("Full", &allocations_per_step(Full));
}

/// Measuring every brick of every layer (the most records a forward can
/// hold) must not make a warm tracer allocate either.
#[test]
fn every_brick_measured_allocates_nothing_after_warm_up() {
    let mut model = tiny(Full);
    model
        .tracer_mut()
        .set_quant_sampling(model_tracer::QuantSampling::Every);
    for position in 0..WARM_UP {
        model.forward(token(position));
    }
    let per_step: Vec<usize> = (WARM_UP..WARM_UP + MEASURED)
        .map(|position| {
            let before = allocations();
            model.forward(token(position));
            allocations() - before
        })
        .collect();
    assert_none("Full, every brick", &per_step);
}

/// Quantizing a chunk of activation rows and multiplying it with matrices
/// allocates nothing once the batch has held its largest chunk.
#[test]
fn batched_products_allocate_nothing_after_the_first_chunk() {
    use model_tracer_llama::quant::{QMatrix, QuantizedBatch};
    let value = |i: usize| ((i * 37 % 101) as f32 - 50.0) / 25.0;
    let (cols, max_rows) = (128, 9);
    let x: Vec<f32> = (0..max_rows * cols).map(value).collect();
    let matrices: Vec<QMatrix> = [GgmlType::Q4_1, GgmlType::Q8_0, GgmlType::Q5_1]
        .into_iter()
        .map(|ty| {
            let w: Vec<f32> = (0..7 * cols).map(|i| value(i + 5)).collect();
            QMatrix::from_f32(ty, 7, cols, &w).expect("a small matrix")
        })
        .collect();
    let mut batches: Vec<QuantizedBatch> = matrices.iter().map(|_| QuantizedBatch::new()).collect();
    let mut out = vec![0f32; max_rows * 7];
    let mut run = |t_rows: usize| {
        for (m, batch) in matrices.iter().zip(&mut batches) {
            batch
                .quantize_from(&x[..t_rows * cols], cols, m.ty())
                .expect("whole rows of whole blocks");
            m.matmul(batch, &mut out[..t_rows * 7]);
            m.matmul_f32(&x[..t_rows * cols], &mut out[..t_rows * 7]);
        }
    };
    run(max_rows);
    let before = allocations();
    for t_rows in [1, 4, max_rows, 2, max_rows] {
        run(t_rows);
    }
    assert_eq!(allocations() - before, 0);
}

/// Allocations of each of `MEASURED` batch decode steps of four sequences
/// (one of them in a cache that evicts) after `WARM_UP` steps.
fn batch_allocations_per_step<C: TraceConfig>(trace: C) -> Vec<usize> {
    use model_tracer_llama::model::SequenceStep;
    let mut model = tiny(trace);
    let mut seqs: Vec<_> = [256, 256, 32, 256]
        .into_iter()
        .map(|capacity| {
            model.new_sequence(KvCacheOptions {
                capacity,
                sinks: 4,
                kv_type: KvType::F32,
            })
        })
        .collect();
    let mut step = |model: &mut Llama<C>, position: usize| {
        let tokens: Vec<[u32; 1]> = (0..seqs.len()).map(|i| [token(position + 7 * i)]).collect();
        let mut steps: Vec<SequenceStep<'_>> = seqs
            .iter_mut()
            .zip(&tokens)
            .map(|(s, t)| SequenceStep::new(s, t))
            .collect();
        let before = allocations();
        model.forward_batch(&mut steps);
        allocations() - before
    };
    for position in 0..WARM_UP {
        step(&mut model, position);
    }
    (WARM_UP..WARM_UP + MEASURED)
        .map(|position| step(&mut model, position))
        .collect()
}

#[test]
fn a_batch_decode_step_of_several_sequences_allocates_nothing_after_warm_up() {
    assert_none("batch, Disabled", &batch_allocations_per_step(Disabled));
    assert_none(
        "batch, Lightweight",
        &batch_allocations_per_step(Lightweight),
    );
    assert_none("batch, Full", &batch_allocations_per_step(Full));
}
