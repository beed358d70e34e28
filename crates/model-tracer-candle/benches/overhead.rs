//! Instruction counts of one decode step of the candle model, per trace
//! config (callgrind, through iai-callgrind). `.ci/overhead-candle` runs both
//! builds and prints the table of `features.md` ("Inside candle").
//!
//! The step is the forward of one token at position [`PREFILL`] of the real
//! SmolLM2-135M-Instruct file (Q4_1), after a [`PREFILL`]-token prompt run
//! as one batched forward in the uncounted setup. Two builds report
//! different ids:
//!
//! ```text
//! # the candle model with its tracer hooks: candle_disabled, candle_lightweight
//! RUSTFLAGS="-C target-cpu=x86-64-v3" cargo bench -p model-tracer-candle --bench overhead
//! # the same model with every hook call removed: candle_compiled_out
//! RUSTFLAGS="-C target-cpu=x86-64-v3 --cfg model_tracer_no_hooks" \
//!     cargo bench -p model-tracer-candle --bench overhead --target-dir <another dir>
//! ```
//!
//! Candle runs its products on a pool of threads; the benchmarks run it on
//! one (`CANDLE_NUM_THREADS=1`): threads would make the counts depend on
//! scheduling. Without the model file the benchmarks say so and stop.

use std::hint::black_box;
use std::path::PathBuf;

use iai_callgrind::{
    library_benchmark, library_benchmark_group, main, Callgrind, EventKind, LibraryBenchmarkConfig,
};
use model_tracer::{Disabled, Full, Lightweight, TraceConfig};
use model_tracer_candle::CandleLlama;
use model_tracer_test_support::BumpAllocator;

/// The benchmark's allocator: [`BumpAllocator`], whose instruction count
/// per allocation does not depend on the heap the process had before.
/// candle allocates the output of every operation, and with glibc's
/// `malloc` the two builds' `Disabled` steps, the same model code to the
/// instruction, differed by 29,360 to 56,503 instructions, all of them in
/// `malloc` and `free`.
#[global_allocator]
static ALLOCATOR: BumpAllocator = BumpAllocator;

/// Tokens run before the measured step; the step runs at this position.
const PREFILL: usize = 16;
/// KV cache capacity: room for the prompt and the step.
const CACHE_CAPACITY: usize = 64;

/// The token fed at `position`: fixed, spread over the vocabulary.
fn token_at(position: usize, vocab: usize) -> u32 {
    ((position * 7919 + 13) % vocab) as u32
}

/// The type of `CandleLlama::<C>::forward`.
type Forward<C> = for<'a, 'b> fn(
    &'a mut CandleLlama<C>,
    &'b [u32],
) -> Result<Vec<f32>, model_tracer_candle::CandleError>;

/// The address of `CandleLlama::<C>::forward`.
fn forward_of<C: TraceConfig>() -> usize {
    let forward: Forward<C> = CandleLlama::<C>::forward;
    forward as usize
}

/// Makes both builds compile the model for every config, so that the
/// optimizer's inlining choices (which depend on how many instances call a
/// function) are the same in both.
fn instantiate_every_config() {
    black_box([
        forward_of::<Disabled>(),
        forward_of::<Lightweight>(),
        forward_of::<Full>(),
    ]);
}

fn model_path() -> PathBuf {
    model_tracer_test_support::model_path()
}

/// Main setup (native): the model file must be there.
fn check_model() {
    instantiate_every_config();
    if !model_path().exists() {
        eprintln!(
            "candle overhead benchmark: no model file at {} (bash .ci/fetch-model)",
            model_path().display()
        );
        std::process::exit(2);
    }
}

/// Benchmark setup (under valgrind, not counted): the model traced by
/// `trace`, after the prompt. Boxed, so that handing it to the benchmark
/// and back moves a pointer.
fn prefilled<C: TraceConfig>(trace: C) -> Box<CandleLlama<C>> {
    let mut model = match CandleLlama::from_gguf(model_path(), Some(CACHE_CAPACITY), trace) {
        Ok(m) => Box::new(m),
        Err(e) => {
            eprintln!("candle overhead benchmark: {e}");
            std::process::exit(2)
        }
    };
    let vocab = model.config.vocab_size;
    let prompt: Vec<u32> = (0..PREFILL).map(|p| token_at(p, vocab)).collect();
    if let Err(e) = model.forward(&prompt) {
        eprintln!("candle overhead benchmark: prompt: {e}");
        std::process::exit(2)
    }
    model
}

/// Callgrind counting instructions only, candle on one thread, on the
/// model file this process found.
///
/// The runner clears the environment of the measured process, so a
/// `MODEL_TRACER_GGUF` given to `cargo bench` would not reach it: the path
/// is resolved here, in the process that reads the configuration, and
/// handed on explicitly.
fn callgrind_config() -> LibraryBenchmarkConfig {
    let mut callgrind = Callgrind::with_args(["--cache-sim=no"]);
    callgrind.format([EventKind::Ir]);
    let mut config = LibraryBenchmarkConfig::default();
    config.tool(callgrind);
    config.env("CANDLE_NUM_THREADS", "1");
    config.env("MODEL_TRACER_GGUF", model_path());
    config
}

/// The measured work: one decode step, at position [`PREFILL`].
#[inline(always)]
fn run_step<C: TraceConfig>(model: &mut CandleLlama<C>) {
    let token = token_at(PREFILL, model.config.vocab_size);
    let _ = black_box(model.forward(black_box(&[token])));
}

// The `Disabled` id of the hooks build comes first, in the place of the
// `compiled_out` id of the baseline build: both processes then start with
// the same arguments (see `.ci/overhead`), and both builds register the
// same number of ids.

#[cfg(not(model_tracer_no_hooks))]
#[library_benchmark]
#[bench::candle_disabled(args = (Disabled), setup = prefilled)]
#[bench::candle_lightweight(args = (Lightweight), setup = prefilled)]
fn step<C: TraceConfig>(mut model: Box<CandleLlama<C>>) -> Box<CandleLlama<C>> {
    run_step(&mut model);
    model
}

#[cfg(model_tracer_no_hooks)]
#[library_benchmark]
#[bench::candle_compiled_out(args = (Disabled), setup = prefilled)]
#[bench::candle_compiled_out_2(args = (Lightweight), setup = prefilled)]
fn step<C: TraceConfig>(mut model: Box<CandleLlama<C>>) -> Box<CandleLlama<C>> {
    run_step(&mut model);
    model
}

library_benchmark_group!(name = overhead; benchmarks = step);

main!(
    config = callgrind_config();
    setup = check_model();
    library_benchmark_groups = overhead
);
