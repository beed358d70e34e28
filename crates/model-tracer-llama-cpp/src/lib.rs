//! llama.cpp, traced from inside: [`LlamaCpp<C>`] drives llama.cpp through
//! the `llama-cpp-sys-2` bindings (0.1.161, which build llama.cpp from
//! source with cmake; CPU backend only) and feeds a
//! [`ModelTracer<C>`](model_tracer::ModelTracer) from llama.cpp's graph
//! evaluation callback (`llama_context_params.cb_eval`), for any
//! architecture llama.cpp runs.
//!
//! ```no_run
//! use model_tracer::Lightweight;
//! use model_tracer_llama_cpp::{LlamaCpp, LlamaCppOptions};
//!
//! let mut m = LlamaCpp::load("models/SmolLM2-135M-Instruct.Q4_1.gguf",
//!                            LlamaCppOptions::default(), Lightweight)?;
//! let prompt = m.tokenize("The capital of France is", true)?;
//! let answer = m.generate(&prompt, 8, |_| {})?;        // greedy, the prompt as one batch
//! println!("{} ({} forwards traced)", m.detokenize(&answer), m.tracer().summary().forwards);
//! # Ok::<(), model_tracer_llama_cpp::LlamaCppError>(())
//! ```
//!
//! # What is traced, and how
//!
//! With `C = Disabled` no callback is registered: the context is made and
//! every batch decoded as a plain use of the bindings does. With tracing on,
//! the callback answers llama.cpp's `ask` for each graph node with whether
//! an enabled system needs it (activations: the stages below; attention:
//! `kq_soft_max-L`; the logit lens: `l_out-L`), so `Lightweight` copies no
//! attention matrix. Each observed tensor is copied out to f32 rows (F32,
//! F16 or BF16, following its strides `nb`; a tensor outside host memory is
//! read with `ggml_backend_tensor_get`) and handed to the tracer's rows hooks
//! (`begin_forward_rows(start, t)`, `[t × d]` buffers, `attention_rows`).
//!
//! | tracer stage | llama (`src/models/llama.cpp`), and the default | Gemma 3 (`src/models/gemma3.cpp`) |
//! |---|---|---|
//! | `embedding`, and layer 0's `input` | `embd` | `inp_scaled` (embeddings × √n_embd) |
//! | `input` of layer L > 0 | `l_out-(L-1)` | `l_out-(L-1)` |
//! | `post_norm` | `attn_norm-L` | `attn_norm-L` |
//! | `post_attn` | `attn_out-L` (after `wo`) | `attn_post_norm-L` (the normed attention output the residual adds) |
//! | `post_ffn_norm` | `ffn_norm-L` | `ffn_norm-L` |
//! | `post_ffn` | `ffn_out-L` | `ffn_post_norm-L` (the normed FFN output the residual adds) |
//! | `output` | `l_out-L` | `l_out-L` |
//! | residual ratio | from `input`, `post_attn`, `post_ffn` (`residual_from_stages`) | the same |
//! | attention rows | `kq_soft_max-L`, `[n_kv, t, n_head]` | `kq_soft_max-L` |
//! | `final_norm` | `result_norm` | `result_norm` |
//! | `logits` | `result_output`, read from llama.cpp's output buffer (`llama_get_logits_ith`) | the same |
//! | not read | `kqv_out-L` (attention before `wo`), `ffn_inp-L` (= input + post_attn), `Qcur/Kcur/Vcur-L`, `ffn_gate/up/swiglu-L` | `kqv_out-L`, `sa_out-L` (= input + post_attn), `ffn_out-L` (before its norm), `Qcur_normed/Kcur_normed-L`, `ffn_geglu-L` |
//!
//! Gemma 3 has no `attn_out-L`: its graph norms the attention output before
//! the residual add, and names only the normed tensor. Any other
//! architecture gets the llama names (`ArchMap::for_arch`); a stage whose
//! name its graph does not use is not recorded, never recorded as zero
//! (the `tensor_names` example lists what a model's graph names).
//!
//! **The last layer.** Every llama.cpp graph computes the rest of its last
//! layer after the attention, the final norm and the LM head only for the
//! rows whose output the batch asks for (`ggml_get_rows` on `inp_out_ids`:
//! after `attn_out` in llama's graph, before `attn_post_norm` in Gemma 3's).
//! A traced prompt batch asks for its last row; the other `t - 1` rows are
//! one tracer forward, streamed from the callback, the last row (kept aside
//! by the callback, a few vectors per layer) a forward of its own after the
//! decode, so each position records what llama.cpp computed for it: the
//! other positions of a prompt have no final norm and no logits, and their
//! last layer ends at `post_attn` (llama) or `post_norm` (Gemma 3).
//! With `TraceOptions::logit_rows = LogitRows::Every` every row is an output
//! (llama.cpp then runs the LM head on every row) and every position has
//! every stage.
//!
//! **Systems.** Activations and residual ratios, as above. Attention
//! summaries with flash attention off: a model whose config traces
//! attention is made with `flash_attn_type = DISABLED` (flash attention
//! never materializes the probabilities); the top positions are llama.cpp's
//! KV cells, which are the positions until a sliding-window cache wraps.
//! Final logits, and the selected token (the greedy argmax). The KV state
//! of each position from llama.cpp's memory: positions held
//! (`llama_memory_seq_pos_min` to the position), capacity (`llama_n_ctx`),
//! bytes of F16 keys and values in every layer for those positions. The
//! logit lens (`Full`): llama.cpp applies the final norm and the LM head to
//! the last layer only, so the lens applies them to each `l_out-L` of the
//! rows that get logits with the tracer's own product
//! ([`QMatrix::lens_matmul`](model_tracer_llama::quant::QMatrix::lens_matmul))
//! on the GGUF's `output_norm.weight` and `output.weight` (or the tied
//! `token_embd.weight`), read by `model-tracer-llama`.
//!
//! **Not recorded.** Quantization error: it needs an f32 reference of each
//! product, which llama.cpp's graph does not compute, and this crate does
//! not recompute the products; `quant_error` is never called. Evictions:
//! llama.cpp's cache does not evict, a decode past `n_ctx` is an error
//! ([`LlamaCppError::ContextFull`]).
//!
//! **Faults.** [`LlamaCpp::set_fault`] takes the reference decoder's
//! `Fault`; the callback writes it into llama.cpp's tensor of that stage
//! (`post_attn` or `post_ffn`), so it flows on through the graph, and only
//! a traced model (which has the callback) injects it.
//!
//! # Building llama.cpp
//!
//! `llama-cpp-sys-2` runs cmake on the llama.cpp source it ships (cmake, a
//! C++ compiler and libclang for bindgen: Debian's `cmake`, `clang`,
//! `libclang-dev`; about 6 minutes on 2 cores). Its build script sets
//! `GGML_NATIVE=OFF` and passes rustc's `-C target-cpu` on as `-march`,
//! turning each target feature into its `GGML_*` option (`avx2` →
//! `GGML_AVX2`, `fma` → `GGML_FMA`, …); it forwards any `GGML_*` and
//! `CMAKE_*` environment variable to cmake. Inside this workspace,
//! `.cargo/config.toml` sets `-C target-cpu=x86-64-v3`, so llama.cpp is
//! built for AVX2, FMA, F16C and BMI2 and never for the host's AVX-512. A
//! crate outside the workspace gets the same with
//! `RUSTFLAGS="-C target-cpu=x86-64-v3"`; `-C target-cpu=native` turns
//! `GGML_NATIVE` on. The OpenMP feature of the bindings is off (one
//! thread pool, ggml's own).

#![warn(missing_docs)]

mod capture;
mod lens;
mod model;
pub mod names;

pub use model::{
    argmax, builtin_chat_templates, ChatTemplate, LlamaCpp, LlamaCppOptions, ModelShape,
};
pub use names::{ArchMap, Site};

/// Why loading or running a model failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LlamaCppError {
    /// The path holds a NUL byte.
    Path(String),
    /// llama.cpp could not load the file.
    Load(String),
    /// llama.cpp could not make the context.
    Context(String),
    /// Options that make no context.
    Options(String),
    /// The logit lens's weights could not be read from the file.
    Lens(String),
    /// Tokenization failed.
    Tokenize(String),
    /// The chat could not be rendered with the model's chat template.
    ChatTemplate(String),
    /// A token id outside the vocabulary.
    Token(u32),
    /// No tokens to run.
    Empty,
    /// The positions needed exceed the KV cache's.
    ContextFull {
        /// Positions the run needs.
        needed: usize,
        /// Positions the cache holds.
        capacity: usize,
    },
    /// `llama_decode` failed, or the trace callback stopped it.
    Decode(String),
}

impl std::fmt::Display for LlamaCppError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Path(p) => write!(f, "path {p:?} holds a NUL byte"),
            Self::Load(m) | Self::Context(m) | Self::Decode(m) => f.write_str(m),
            Self::Options(m) => write!(f, "options: {m}"),
            Self::Lens(m) => write!(f, "logit lens: {m}"),
            Self::Tokenize(m) => write!(f, "tokenize: {m}"),
            Self::ChatTemplate(m) => write!(f, "chat template: {m}"),
            Self::Token(t) => write!(f, "token id {t} is outside the vocabulary"),
            Self::Empty => f.write_str("no tokens to run"),
            Self::ContextFull { needed, capacity } => write!(
                f,
                "{needed} positions needed, the KV cache holds {capacity} (llama.cpp's cache does not evict)"
            ),
        }
    }
}

impl std::error::Error for LlamaCppError {}
