//! Prompt evaluation and generation, tokens/s, of llama.cpp on one
//! thread: the plain bindings (no tracer anywhere), and `LlamaCpp<C>` under
//! `Disabled`, `Lightweight` and `Full`, in interleaved rounds, every one
//! with flash attention off (which tracing attention needs):
//!
//! ```sh
//! cargo bench -p model-tracer-llama-cpp --bench throughput            # SmolLM2, 5 rounds
//! THROUGHPUT_GGUF=models/gemma-3-270m-q4_k_m.gguf THROUGHPUT_ROUNDS=3 cargo bench ...
//! ```
//!
//! A round runs each engine once: a 128-token prompt as one batch, then 32
//! greedy tokens. Medians (and best) of the rounds; the tokens of every run
//! are checked equal.

use std::ffi::CString;
use std::time::Instant;

use llama_cpp_sys_2 as sys;
use model_tracer::{Disabled, Full, Lightweight, TraceConfig};
use model_tracer_llama_cpp::{argmax, LlamaCpp, LlamaCppOptions};

const PROMPT_TOKENS: usize = 128;
const GENERATED: usize = 32;

const TEXT: &str = "The history of the city begins with a small settlement on an island in the river, \
where fishermen and traders built their houses of wood and clay. Over the centuries the settlement \
grew into a town with walls, markets and churches, and its bridges joined the island to both banks. \
Merchants came from far away to sell cloth, wine and spices, and the town's craftsmen became known \
for their work in iron, leather and glass. Kings and bishops built palaces and cathedrals, scholars \
founded schools, and printers spread books across the country. In the modern age the city built \
railways, boulevards and parks, and its museums, theatres and cafes drew artists and writers from \
every nation. Today it is a place of work and study, of old streets and new quarters, where millions \
of people live, travel and meet.";

struct Run {
    prompt_tps: f64,
    gen_tps: f64,
    tokens: Vec<u32>,
}

/// The plain bindings: a model, a context, `llama_batch_get_one`.
fn plain(path: &str, prompt: &[u32]) -> Run {
    // SAFETY: plain llama.cpp calls on objects made and freed here.
    unsafe {
        let c = CString::new(path).unwrap_or_default();
        let mut mp = sys::llama_model_default_params();
        mp.n_gpu_layers = 0;
        let model = sys::llama_model_load_from_file(c.as_ptr(), mp);
        assert!(!model.is_null(), "loading {path}");
        let mut cp = sys::llama_context_default_params();
        cp.n_ctx = 512;
        cp.n_batch = 512;
        cp.n_ubatch = 512;
        cp.n_threads = 1;
        cp.n_threads_batch = 1;
        cp.flash_attn_type = sys::LLAMA_FLASH_ATTN_TYPE_DISABLED;
        let ctx = sys::llama_init_from_model(model, cp);
        assert!(!ctx.is_null());
        let vocab = sys::llama_vocab_n_tokens(sys::llama_model_get_vocab(model)) as usize;
        let mut ids: Vec<i32> = prompt.iter().map(|&t| t as i32).collect();
        let t0 = Instant::now();
        assert_eq!(
            sys::llama_decode(
                ctx,
                sys::llama_batch_get_one(ids.as_mut_ptr(), ids.len() as i32)
            ),
            0
        );
        let logits = std::slice::from_raw_parts(sys::llama_get_logits_ith(ctx, -1), vocab);
        let mut next = argmax(logits) as i32;
        let prompt_secs = t0.elapsed().as_secs_f64();
        let mut tokens = vec![next as u32];
        let t1 = Instant::now();
        while tokens.len() < GENERATED {
            assert_eq!(
                sys::llama_decode(ctx, sys::llama_batch_get_one(&mut next, 1)),
                0
            );
            let logits = std::slice::from_raw_parts(sys::llama_get_logits_ith(ctx, -1), vocab);
            next = argmax(logits) as i32;
            tokens.push(next as u32);
        }
        let gen_secs = t1.elapsed().as_secs_f64();
        sys::llama_free(ctx);
        sys::llama_model_free(model);
        Run {
            prompt_tps: prompt.len() as f64 / prompt_secs,
            gen_tps: (GENERATED - 1) as f64 / gen_secs,
            tokens,
        }
    }
}

/// `LlamaCpp<C>`: its forward of the prompt, then one forward per token.
fn crate_run<C: TraceConfig>(path: &str, prompt: &[u32], config: C) -> Run {
    let options = LlamaCppOptions {
        context: 512,
        flash_attention: Some(false),
        ..LlamaCppOptions::default()
    };
    let mut m = LlamaCpp::load(path, options, config).unwrap_or_else(|e| panic!("{e}"));
    let t0 = Instant::now();
    let mut next = argmax(m.forward(prompt).unwrap_or_else(|e| panic!("{e}")));
    let prompt_secs = t0.elapsed().as_secs_f64();
    let mut tokens = vec![next];
    let t1 = Instant::now();
    while tokens.len() < GENERATED {
        next = argmax(m.forward(&[next]).unwrap_or_else(|e| panic!("{e}")));
        tokens.push(next);
    }
    let gen_secs = t1.elapsed().as_secs_f64();
    Run {
        prompt_tps: prompt.len() as f64 / prompt_secs,
        gen_tps: (GENERATED - 1) as f64 / gen_secs,
        tokens,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let path = std::env::var("THROUGHPUT_GGUF")
        .unwrap_or_else(|_| format!("{root}/models/SmolLM2-135M-Instruct.Q4_1.gguf"));
    let rounds: usize = std::env::var("THROUGHPUT_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(5);
    if !std::path::Path::new(&path).is_file() {
        eprintln!("SKIPPED: no model at {path} (`bash .ci/fetch-model`)");
        return;
    }
    let prompt = {
        let options = LlamaCppOptions {
            context: 512,
            ..LlamaCppOptions::default()
        };
        let m = LlamaCpp::load(&path, options, Disabled).unwrap_or_else(|e| panic!("{e}"));
        let mut ids = m.tokenize(TEXT, true).unwrap_or_default();
        assert!(
            ids.len() >= PROMPT_TOKENS,
            "the text has {} tokens",
            ids.len()
        );
        ids.truncate(PROMPT_TOKENS);
        ids
    };
    let names = ["plain bindings", "Disabled", "Lightweight", "Full"];
    let mut results: Vec<Vec<Run>> = names.iter().map(|_| Vec::new()).collect();
    for round in 0..rounds {
        for (i, slot) in results.iter_mut().enumerate() {
            let run = match i {
                0 => plain(&path, &prompt),
                1 => crate_run(&path, &prompt, Disabled),
                2 => crate_run(&path, &prompt, Lightweight),
                _ => crate_run(&path, &prompt, Full),
            };
            eprintln!(
                "round {round} {:<15} prompt {:7.1} tok/s  generation {:6.1} tok/s",
                names[i], run.prompt_tps, run.gen_tps
            );
            slot.push(run);
        }
    }
    let tokens = &results[0][0].tokens;
    for (name, runs) in names.iter().zip(&results) {
        assert!(
            runs.iter().all(|r| &r.tokens == tokens),
            "{name}: other tokens"
        );
    }
    let base = (
        median(results[0].iter().map(|r| r.prompt_tps).collect()),
        median(results[0].iter().map(|r| r.gen_tps).collect()),
    );
    println!(
        "{path}: {PROMPT_TOKENS}-token prompt, {GENERATED} generated, {rounds} rounds, one thread"
    );
    println!("| run | prompt eval, tokens/s (best) | vs plain | generation, tokens/s (best) | vs plain |");
    println!("|---|---:|---:|---:|---:|");
    for (name, runs) in names.iter().zip(&results) {
        let p: Vec<f64> = runs.iter().map(|r| r.prompt_tps).collect();
        let g: Vec<f64> = runs.iter().map(|r| r.gen_tps).collect();
        let (pm, gm) = (median(p.clone()), median(g.clone()));
        let best = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
        println!(
            "| {name} | {pm:.1} ({:.1}) | {:+.1}% | {gm:.1} ({:.1}) | {:+.1}% |",
            best(&p),
            (pm / base.0 - 1.0) * 100.0,
            best(&g),
            (gm / base.1 - 1.0) * 100.0
        );
    }
    println!("generated ids (all runs): {:?}", &tokens[..8]);
}
