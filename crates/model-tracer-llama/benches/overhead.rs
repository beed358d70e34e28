//! Instruction counts of one decode step of the reference decoder, per trace
//! config (callgrind, through iai-callgrind). `.ci/overhead` runs both builds
//! and prints the table of `features.md`.
//!
//! The step measured is the forward pass of one token at position
//! [`PREFILL`], after a [`PREFILL`]-token prefill done in the (uncounted)
//! setup. Each benchmark hands the model back, so that dropping it is not
//! counted either. Two builds report different ids:
//!
//! ```text
//! # the decoder with its tracer hooks
//! RUSTFLAGS="-C target-cpu=native" cargo bench --bench overhead
//! # the same decoder with every hook call removed from its source
//! RUSTFLAGS="-C target-cpu=native --cfg model_tracer_no_hooks" \
//!     cargo bench --bench overhead --target-dir <another dir>
//! ```
//!
//! The first reports `disabled`, `lightweight`, `full`, one id per trace
//! system alone (`activations`, `attention`, `logits` = ranks on the final
//! logits only, `quant_error`, `kv_cache`), `fingerprints` (activations
//! with their fingerprints: its count less that of `activations` is what
//! the fingerprints cost), `logit_lens` (the lens on every layer) and
//! `full_no_lens`; the second reports `compiled_out`. Ids start
//! with the model shape, `smollm2` or `tiny`. The `_x37` ids run
//! [`DEFAULT_QUANT_STRIDE`] (37) consecutive steps (positions 32 to 68): the
//! default quantization-error sampling measures one brick visit in 37, so
//! over 37 steps it measures every (brick, layer) site exactly once, and a
//! 37th of their count is its exact amortized cost per step.
//!
//! The `_prefill` ids run a batched prefill instead: the [`CHUNK`] (32)
//! positions after the prefill as one forward of 32 rows
//! (`Llama::forward_chunks`); their count divided by 32 is the cost per
//! position, against one decode step's.
//!
//! The SmolLM2 shape runs the configs that have a target and the lens; `full` and
//! `full_no_lens` (the lens cost is their difference) only with
//! `--cfg model_tracer_overhead_full` in both builds' `RUSTFLAGS`: their
//! setup runs the 32 prefill positions with those systems on (one chunk:
//! the lens on its last row only), some minutes under valgrind.
//! The single `quant_error` step runs on the tiny shape only.
//!
//! Setup cost under valgrind: a SmolLM2 step is ~1.4·10^8 instructions and
//! valgrind runs this AVX2 code around a hundred times slower than native,
//! counting or not. So the main setup (run natively, before any
//! valgrind run) draws the synthetic weights once and writes them as GGUF
//! files, and a benchmark's setup only copies them in. Like a real model
//! file, those files hold the quantized weights only: the quantization-error
//! references multiply the dequantized weights, as they do for a real model.
//! No cache simulation: only instruction counts are compared.

use std::fmt::Display;
use std::hint::black_box;
use std::path::PathBuf;

use iai_callgrind::{
    library_benchmark, library_benchmark_group, main, Callgrind, EventKind, LibraryBenchmarkConfig,
};
use model_tracer::metrics::prometheus_client::registry::Registry;
use model_tracer::metrics::TraceMetrics;
use model_tracer::tracer::DEFAULT_QUANT_STRIDE;
use model_tracer::{Disabled, Full, Lightweight, Recorder, SinkHandle, TraceConfig};
use model_tracer_llama::dtype::GgmlType;
use model_tracer_llama::gguf::GgufFile;
use model_tracer_llama::model::{
    synthetic_weights, Config, KvCacheOptions, KvType, Llama, Sequence, SequenceStep, Weights,
};
use model_tracer_llama::quant::QMatrix;
use model_tracer_test_support::gguf::GgufWriter;
use model_tracer_test_support::BumpAllocator;

/// The benchmark's allocator: [`BumpAllocator`]. A measured step that grows
/// a buffer on its first use (the one-position path's quantized
/// activations after a batched prefill, a chunk's attention rows) calls
/// the allocator, and glibc's `malloc` counts differently in the build with
/// hooks and the one without (its heap starts after binaries of different
/// sizes): with it, 37 `Disabled` steps ran 327 instructions more than
/// the hook-free build, all of them in `_int_malloc`.
#[global_allocator]
static ALLOCATOR: BumpAllocator = BumpAllocator;

/// Tokens run before the measured step; the step runs at this position.
const PREFILL: usize = 32;
/// Seed of the synthetic weights.
const SEED: u64 = 1;
/// Positions of the measured batched prefill (one chunk, positions 32 to 63).
const CHUNK: usize = 32;
/// KV cache capacity: room for every benchmarked position, no eviction.
const CACHE_CAPACITY: usize = 128;
/// Sequences of the measured batch decode step.
const BATCH: usize = 8;

/// The two model shapes benchmarked.
#[derive(Debug, Clone, Copy)]
enum Shape {
    /// SmolLM2-135M: 30 layers, hidden 576, vocabulary 49152.
    Smollm2,
    /// [`Config::tiny`]: 4 layers, hidden 256, vocabulary 512.
    Tiny,
}

impl Shape {
    const ALL: [Shape; 2] = [Shape::Smollm2, Shape::Tiny];

    fn config(self) -> Config {
        match self {
            Shape::Smollm2 => Config::smollm2_135m(),
            Shape::Tiny => Config::tiny(),
        }
    }

    /// Where the main setup leaves this shape's weights.
    fn weights_path(self) -> PathBuf {
        let name = match self {
            Shape::Smollm2 => "smollm2",
            Shape::Tiny => "tiny",
        };
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("overhead-{name}-q4_1.gguf"))
    }
}

/// A benchmark cannot go on without its model: say why and stop.
fn or_exit<T, E: Display>(result: Result<T, E>, what: &str) -> T {
    result.unwrap_or_else(|e| {
        eprintln!("overhead benchmark: {what}: {e}");
        std::process::exit(2)
    })
}

fn tensor_name(layer: usize, tensor: &str) -> String {
    format!("blk.{layer}.{tensor}.weight")
}

fn add_matrix(out: &mut GgufWriter, name: &str, m: &QMatrix) {
    let dims = [m.cols() as u64, m.rows() as u64];
    out.add_tensor(name, &dims, m.ty().id(), m.bytes().to_vec());
}

fn add_vector(out: &mut GgufWriter, name: &str, v: &[f32]) {
    let bytes = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    out.add_tensor(name, &[v.len() as u64], GgmlType::F32.id(), bytes);
}

/// The address of `Llama::<C>::forward`.
fn forward_of<C: TraceConfig>() -> usize {
    let forward: for<'a> fn(&'a mut Llama<C>, u32) -> &'a [f32] = Llama::<C>::forward;
    forward as usize
}

/// The address of `Llama::<C>::forward_chunks`.
fn forward_chunks_of<C: TraceConfig>() -> usize {
    let chunks: for<'a, 'b> fn(&'a mut Llama<C>, &'b [u32]) -> &'a [f32] =
        Llama::<C>::forward_chunks;
    chunks as usize
}

/// The address of `Llama::<C>::forward_batch`.
fn forward_batch_of<C: TraceConfig>() -> usize {
    let batch: for<'a, 'b, 'c> fn(&'a mut Llama<C>, &'b mut [SequenceStep<'c>]) =
        Llama::<C>::forward_batch;
    batch as usize
}

/// Makes both builds compile the decoder for every config.
///
/// Which helper functions the optimizer inlines into `Llama::<Disabled>::forward`
/// depends on how many instances of `forward` call them (a function with a
/// single caller is inlined for free). The hooks build instantiates
/// `forward` (and `forward_chunks`, the batched prefill) once per
/// benchmarked config; without this, the baseline build
/// would instantiate it for `Disabled` alone, and the two `Disabled`
/// decoders would differ by a few hundredths of a percent for reasons that
/// have nothing to do with the hooks.
fn instantiate_every_config() {
    black_box([
        forward_of::<Disabled>(),
        forward_of::<Lightweight>(),
        forward_of::<Full>(),
        forward_of::<FullNoLens>(),
        forward_of::<Activations>(),
        forward_of::<KvCache>(),
        forward_of::<Attention>(),
        forward_of::<Logits>(),
        forward_of::<LogitLens>(),
        forward_of::<QuantError>(),
        forward_of::<Fingerprints>(),
    ]);
    black_box([
        forward_chunks_of::<Disabled>(),
        forward_chunks_of::<Lightweight>(),
        forward_chunks_of::<Full>(),
        forward_chunks_of::<FullNoLens>(),
        forward_chunks_of::<Activations>(),
        forward_chunks_of::<KvCache>(),
        forward_chunks_of::<Attention>(),
        forward_chunks_of::<Logits>(),
        forward_chunks_of::<LogitLens>(),
        forward_chunks_of::<QuantError>(),
        forward_chunks_of::<Fingerprints>(),
    ]);
    black_box([
        forward_batch_of::<Disabled>(),
        forward_batch_of::<Lightweight>(),
    ]);
}

/// Main setup (native): the synthetic weights of every shape, as GGUF files.
fn write_weight_files() {
    instantiate_every_config();
    for shape in Shape::ALL {
        let config = shape.config();
        let w = or_exit(
            synthetic_weights(&config, GgmlType::Q4_1, SEED),
            "synthetic weights",
        );
        let mut out = GgufWriter::new();
        add_matrix(&mut out, "token_embd.weight", &w.token_embd);
        for (i, l) in w.layers.iter().enumerate() {
            add_vector(&mut out, &tensor_name(i, "attn_norm"), &l.attn_norm);
            add_matrix(&mut out, &tensor_name(i, "attn_q"), &l.attn_q.weight);
            add_matrix(&mut out, &tensor_name(i, "attn_k"), &l.attn_k.weight);
            add_matrix(&mut out, &tensor_name(i, "attn_v"), &l.attn_v.weight);
            add_matrix(
                &mut out,
                &tensor_name(i, "attn_output"),
                &l.attn_output.weight,
            );
            add_vector(&mut out, &tensor_name(i, "ffn_norm"), &l.ffn_norm);
            add_matrix(&mut out, &tensor_name(i, "ffn_gate"), &l.ffn_gate.weight);
            add_matrix(&mut out, &tensor_name(i, "ffn_up"), &l.ffn_up.weight);
            add_matrix(&mut out, &tensor_name(i, "ffn_down"), &l.ffn_down.weight);
        }
        add_vector(&mut out, "output_norm.weight", &w.output_norm);
        add_matrix(&mut out, "output.weight", &w.output.weight);
        let path = shape.weights_path();
        or_exit(out.write(&path), &format!("writing {}", path.display()));
    }
}

/// The weights the main setup wrote for `shape`.
fn read_weights(shape: Shape) -> Weights {
    let path = shape.weights_path();
    let file = or_exit(GgufFile::open(&path), &path.display().to_string());
    or_exit(
        Weights::from_gguf(&file, &shape.config()),
        "reading the weights",
    )
}

/// The token fed at `position`: fixed, spread over the vocabulary.
fn token_at(position: usize, vocab: usize) -> u32 {
    ((position * 7919 + 13) % vocab) as u32
}

/// Benchmark setup (under valgrind, not counted): the model of `shape`
/// traced by `trace`, after the prefill. Boxed, so that handing it to the
/// benchmark and back moves a pointer, not the struct.
fn prefilled<C: TraceConfig>(shape: Shape, trace: C) -> Box<Llama<C>> {
    let config = shape.config();
    let vocab = config.vocab_size;
    let cache = KvCacheOptions {
        capacity: CACHE_CAPACITY,
        sinks: 4,
        kv_type: KvType::F32,
    };
    let mut model = Box::new(or_exit(
        Llama::new(config, read_weights(shape), None, cache, trace),
        "building the model",
    ));
    // One chunk: the cache and logits are those of one position at a time.
    let tokens: Vec<u32> = (0..PREFILL).map(|p| token_at(p, vocab)).collect();
    model.forward_chunks(&tokens);
    model
}

/// Benchmark setup of a batched prefill: the model after the prefill, and
/// the tokens of the next [`CHUNK`] positions.
fn prefilled_with_chunk<C: TraceConfig>(shape: Shape, trace: C) -> (Box<Llama<C>>, Vec<u32>) {
    let model = prefilled(shape, trace);
    let vocab = model.config.vocab_size;
    let tokens = (PREFILL..PREFILL + CHUNK)
        .map(|p| token_at(p, vocab))
        .collect();
    (model, tokens)
}

/// Benchmark setup of the fleet metrics' cost: the model of `shape` after
/// the prefill, its tracer's sink a [`MetricsSink`](model_tracer::metrics::MetricsSink)
/// that folds every forward into the model-health families (the prefill
/// made every series, as the first forwards of a server do).
#[cfg_attr(model_tracer_no_hooks, allow(dead_code))]
fn prefilled_with_metrics<C: TraceConfig>(shape: Shape, trace: C) -> Box<Llama<C>> {
    let config = shape.config();
    let vocab = config.vocab_size;
    let cache = KvCacheOptions {
        capacity: CACHE_CAPACITY,
        sinks: 4,
        kv_type: KvType::F32,
    };
    let mut model = Box::new(or_exit(
        Llama::new(config, read_weights(shape), None, cache, trace),
        "building the model",
    ));
    // The families live as long as the sink, which holds them; the
    // registry that would encode them is not needed to fold.
    let metrics = TraceMetrics::register(&mut Registry::default());
    model
        .tracer_mut()
        .set_sink(Some(SinkHandle::new(metrics.sink())));
    let tokens: Vec<u32> = (0..PREFILL).map(|p| token_at(p, vocab)).collect();
    model.forward_chunks(&tokens);
    model
}

/// Benchmark setup of a decode step of several sequences: the model of
/// `shape` and [`BATCH`] sequences of their own KV caches, sequence `i`
/// after a prompt of `2 + i` tokens (all of them prefilled in one batch
/// forward), and the token each runs next.
fn batched<C: TraceConfig>(
    shape: Shape,
    trace: C,
) -> (Box<Llama<C>>, Vec<Sequence>, Vec<[u32; 1]>) {
    let config = shape.config();
    let vocab = config.vocab_size;
    let cache = KvCacheOptions {
        capacity: CACHE_CAPACITY,
        sinks: 4,
        kv_type: KvType::F32,
    };
    let mut model = Box::new(or_exit(
        Llama::new(config, read_weights(shape), None, cache, trace),
        "building the model",
    ));
    let mut sequences: Vec<Sequence> = (0..BATCH).map(|_| model.new_sequence(cache)).collect();
    let prompts: Vec<Vec<u32>> = (0..BATCH)
        .map(|i| (0..2 + i).map(|p| token_at(p + 100 * i, vocab)).collect())
        .collect();
    let mut steps: Vec<SequenceStep<'_>> = sequences
        .iter_mut()
        .zip(&prompts)
        .map(|(s, p)| SequenceStep::new(s, p))
        .collect();
    model.forward_batch(&mut steps);
    drop(steps);
    let next = (0..BATCH)
        .map(|i| [token_at(2 + i + 100 * i, vocab)])
        .collect();
    (model, sequences, next)
}

/// Callgrind counting instructions only.
fn callgrind_config() -> LibraryBenchmarkConfig {
    let mut callgrind = Callgrind::with_args(["--cache-sim=no"]);
    callgrind.format([EventKind::Ir]);
    let mut config = LibraryBenchmarkConfig::default();
    config.tool(callgrind);
    config
}

/// The measured work: one decode step, at position [`PREFILL`].
#[inline(always)]
fn run_step<C: TraceConfig>(model: &mut Llama<C>) {
    let token = token_at(PREFILL, model.config.vocab_size);
    black_box(model.forward(black_box(token)));
}

/// A batched prefill: the [`CHUNK`] positions after [`PREFILL`] as one
/// forward of [`CHUNK`] rows.
#[inline(always)]
fn run_chunk<C: TraceConfig>(model: &mut Llama<C>, tokens: &[u32]) {
    black_box(model.forward_chunks(black_box(tokens)));
}

/// One decode step of [`BATCH`] sequences: one forward of a row each.
#[inline(always)]
fn run_batch_step<C: TraceConfig>(
    model: &mut Llama<C>,
    sequences: &mut [Sequence],
    next: &[[u32; 1]],
) {
    let mut steps: Vec<SequenceStep<'_>> = sequences
        .iter_mut()
        .zip(next)
        .map(|(s, t)| SequenceStep::new(s, black_box(t)))
        .collect();
    model.forward_batch(black_box(&mut steps));
}

/// [`DEFAULT_QUANT_STRIDE`] consecutive decode steps from position
/// [`PREFILL`]: one period of the default quantization-error sampling.
#[inline(always)]
fn run_stride_steps<C: TraceConfig>(model: &mut Llama<C>) {
    let vocab = model.config.vocab_size;
    for position in PREFILL..PREFILL + DEFAULT_QUANT_STRIDE {
        black_box(model.forward(black_box(token_at(position, vocab))));
    }
}

/// Declares a marker config that turns on the listed systems only.
macro_rules! marker {
    (
        $(#[$doc:meta])* $name:ident { $($system:ident),* }
        $(, lens = $lens:expr)? $(, fingerprints = $fingerprints:expr)?
    ) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, Default)]
        pub struct $name;

        impl TraceConfig for $name {
            const ACTIVATIONS: bool = marker!(@on ACTIVATIONS $($system)*);
            const ATTENTION: bool = marker!(@on ATTENTION $($system)*);
            const LOGITS: bool = marker!(@on LOGITS $($system)*);
            const QUANT_ERROR: bool = marker!(@on QUANT_ERROR $($system)*);
            const KV_CACHE: bool = marker!(@on KV_CACHE $($system)*);
            $(const LOGIT_LENS: bool = $lens;)?
            $(const FINGERPRINTS: bool = $fingerprints;)?
            type Storage = Recorder;
        }
    };
    (@on $want:ident $($system:ident)*) => {
        false $(|| marker!(@eq $want $system))*
    };
    (@eq ACTIVATIONS ACTIVATIONS) => { true };
    (@eq ATTENTION ATTENTION) => { true };
    (@eq LOGITS LOGITS) => { true };
    (@eq QUANT_ERROR QUANT_ERROR) => { true };
    (@eq KV_CACHE KV_CACHE) => { true };
    (@eq $a:ident $b:ident) => { false };
}

mod markers {
    use super::*;

    marker!(
        /// Activation statistics alone.
        Activations { ACTIVATIONS }
    );
    marker!(
        /// Activation statistics and their fingerprints.
        Fingerprints { ACTIVATIONS },
        fingerprints = true
    );
    marker!(
        /// Attention summaries of every head alone.
        Attention { ATTENTION }
    );
    marker!(
        /// Ranks on the final logits alone, no per-layer lens.
        Logits { LOGITS },
        lens = false
    );
    marker!(
        /// The logit lens on every layer, with the final ranks.
        LogitLens { LOGITS }
    );
    marker!(
        /// Quantization error alone (default sampling: one brick visit in 37).
        QuantError { QUANT_ERROR }
    );
    marker!(
        /// KV cache state alone.
        KvCache { KV_CACHE }
    );
    marker!(
        /// Everything `Full` traces except the per-layer logit lens.
        FullNoLens { ACTIVATIONS, ATTENTION, LOGITS, QUANT_ERROR, KV_CACHE },
        lens = false
    );
}

use markers::*;

// Each measured function exists in two builds: the `Disabled` ids of the
// hooks build and the `compiled_out` ids of the baseline build have
// functions of the same shape (the same number of ids, the same
// arguments), listed first in the group in the same order; the traced
// configs' ids live in functions of their own after them. iai-callgrind
// runs each id as `<binary> --iai-run <group> <function> <index> ...`, so
// with equal arguments (and binary paths of equal length, see
// `.ci/overhead`) both processes start with the same stack and heap
// layout, and the wrappers it generates around the two functions are the
// same code. Otherwise `memcpy`, whose instruction count depends on the
// alignment of its operands, or a wrapper's dispatch over more ids, can
// differ by a few instructions between the two builds.

type Prefilled<C> = (Box<Llama<C>>, Vec<u32>);
type Batched<C> = (Box<Llama<C>>, Vec<Sequence>, Vec<[u32; 1]>);

#[library_benchmark]
#[cfg_attr(
    not(model_tracer_no_hooks),
    bench::smollm2_disabled(args = (Shape::Smollm2, Disabled), setup = prefilled)
)]
#[cfg_attr(
    not(model_tracer_no_hooks),
    bench::tiny_disabled(args = (Shape::Tiny, Disabled), setup = prefilled)
)]
#[cfg_attr(
    model_tracer_no_hooks,
    bench::smollm2_compiled_out(args = (Shape::Smollm2, Disabled), setup = prefilled)
)]
#[cfg_attr(
    model_tracer_no_hooks,
    bench::tiny_compiled_out(args = (Shape::Tiny, Disabled), setup = prefilled)
)]
fn step<C: TraceConfig>(mut model: Box<Llama<C>>) -> Box<Llama<C>> {
    run_step(&mut model);
    model
}

#[library_benchmark]
#[cfg_attr(
    not(model_tracer_no_hooks),
    bench::smollm2_disabled_x37(args = (Shape::Smollm2, Disabled), setup = prefilled)
)]
#[cfg_attr(
    not(model_tracer_no_hooks),
    bench::tiny_disabled_x37(args = (Shape::Tiny, Disabled), setup = prefilled)
)]
#[cfg_attr(
    model_tracer_no_hooks,
    bench::smollm2_compiled_out_x37(args = (Shape::Smollm2, Disabled), setup = prefilled)
)]
#[cfg_attr(
    model_tracer_no_hooks,
    bench::tiny_compiled_out_x37(args = (Shape::Tiny, Disabled), setup = prefilled)
)]
fn steps<C: TraceConfig>(mut model: Box<Llama<C>>) -> Box<Llama<C>> {
    run_stride_steps(&mut model);
    model
}

#[library_benchmark]
#[cfg_attr(
    not(model_tracer_no_hooks),
    bench::smollm2_disabled_prefill(args = (Shape::Smollm2, Disabled), setup = prefilled_with_chunk)
)]
#[cfg_attr(
    not(model_tracer_no_hooks),
    bench::tiny_disabled_prefill(args = (Shape::Tiny, Disabled), setup = prefilled_with_chunk)
)]
#[cfg_attr(
    model_tracer_no_hooks,
    bench::smollm2_compiled_out_prefill(args = (Shape::Smollm2, Disabled), setup = prefilled_with_chunk)
)]
#[cfg_attr(
    model_tracer_no_hooks,
    bench::tiny_compiled_out_prefill(args = (Shape::Tiny, Disabled), setup = prefilled_with_chunk)
)]
fn prefill<C: TraceConfig>((mut model, tokens): Prefilled<C>) -> Prefilled<C> {
    run_chunk(&mut model, &tokens);
    (model, tokens)
}

#[library_benchmark]
#[cfg_attr(
    not(model_tracer_no_hooks),
    bench::smollm2_disabled_batch8(args = (Shape::Smollm2, Disabled), setup = batched)
)]
#[cfg_attr(
    model_tracer_no_hooks,
    bench::smollm2_compiled_out_batch8(args = (Shape::Smollm2, Disabled), setup = batched)
)]
fn batch<C: TraceConfig>((mut model, mut sequences, next): Batched<C>) -> Batched<C> {
    run_batch_step(&mut model, &mut sequences, &next);
    (model, sequences, next)
}

#[cfg(not(model_tracer_no_hooks))]
#[library_benchmark]
#[bench::smollm2_lightweight(args = (Shape::Smollm2, Lightweight), setup = prefilled)]
#[bench::smollm2_lightweight_metrics(args = (Shape::Smollm2, Lightweight), setup = prefilled_with_metrics)]
#[bench::smollm2_activations(args = (Shape::Smollm2, Activations), setup = prefilled)]
#[bench::smollm2_fingerprints(args = (Shape::Smollm2, Fingerprints), setup = prefilled)]
#[bench::smollm2_kv_cache(args = (Shape::Smollm2, KvCache), setup = prefilled)]
#[bench::smollm2_attention(args = (Shape::Smollm2, Attention), setup = prefilled)]
#[bench::smollm2_logits(args = (Shape::Smollm2, Logits), setup = prefilled)]
#[bench::smollm2_logit_lens(args = (Shape::Smollm2, LogitLens), setup = prefilled)]
#[cfg_attr(
    model_tracer_overhead_full,
    bench::smollm2_full_no_lens(args = (Shape::Smollm2, FullNoLens), setup = prefilled)
)]
#[cfg_attr(
    model_tracer_overhead_full,
    bench::smollm2_full(args = (Shape::Smollm2, Full), setup = prefilled)
)]
#[bench::tiny_lightweight(args = (Shape::Tiny, Lightweight), setup = prefilled)]
#[bench::tiny_activations(args = (Shape::Tiny, Activations), setup = prefilled)]
#[bench::tiny_fingerprints(args = (Shape::Tiny, Fingerprints), setup = prefilled)]
#[bench::tiny_kv_cache(args = (Shape::Tiny, KvCache), setup = prefilled)]
#[bench::tiny_attention(args = (Shape::Tiny, Attention), setup = prefilled)]
#[bench::tiny_logits(args = (Shape::Tiny, Logits), setup = prefilled)]
#[bench::tiny_logit_lens(args = (Shape::Tiny, LogitLens), setup = prefilled)]
#[bench::tiny_quant_error(args = (Shape::Tiny, QuantError), setup = prefilled)]
#[bench::tiny_full_no_lens(args = (Shape::Tiny, FullNoLens), setup = prefilled)]
#[bench::tiny_full(args = (Shape::Tiny, Full), setup = prefilled)]
fn traced_step<C: TraceConfig>(mut model: Box<Llama<C>>) -> Box<Llama<C>> {
    run_step(&mut model);
    model
}

#[cfg(not(model_tracer_no_hooks))]
#[library_benchmark]
#[bench::smollm2_quant_error_x37(args = (Shape::Smollm2, QuantError), setup = prefilled)]
#[bench::tiny_quant_error_x37(args = (Shape::Tiny, QuantError), setup = prefilled)]
fn traced_steps<C: TraceConfig>(mut model: Box<Llama<C>>) -> Box<Llama<C>> {
    run_stride_steps(&mut model);
    model
}

#[cfg(not(model_tracer_no_hooks))]
#[library_benchmark]
#[bench::smollm2_lightweight_prefill(args = (Shape::Smollm2, Lightweight), setup = prefilled_with_chunk)]
#[bench::tiny_lightweight_prefill(args = (Shape::Tiny, Lightweight), setup = prefilled_with_chunk)]
fn traced_prefill<C: TraceConfig>((mut model, tokens): Prefilled<C>) -> Prefilled<C> {
    run_chunk(&mut model, &tokens);
    (model, tokens)
}

#[cfg(not(model_tracer_no_hooks))]
#[library_benchmark]
#[bench::smollm2_lightweight_batch8(args = (Shape::Smollm2, Lightweight), setup = batched)]
fn traced_batch<C: TraceConfig>((mut model, mut sequences, next): Batched<C>) -> Batched<C> {
    run_batch_step(&mut model, &mut sequences, &next);
    (model, sequences, next)
}

#[cfg(not(model_tracer_no_hooks))]
library_benchmark_group!(
    name = overhead;
    benchmarks = step, steps, prefill, batch, traced_step, traced_steps, traced_prefill, traced_batch
);

#[cfg(model_tracer_no_hooks)]
library_benchmark_group!(name = overhead; benchmarks = step, steps, prefill, batch);

main!(
    config = callgrind_config();
    setup = write_weight_files();
    library_benchmark_groups = overhead
);
