//! The decoder: configuration, weights, KV cache, run state and the forward
//! pass, laid out so that it reads in one sitting. The tracer hooks are the
//! only additions to the arithmetic.
// Without hooks (the benchmarks' baseline) the tracer's inputs go unused.
#![cfg_attr(
    model_tracer_no_hooks,
    allow(unused_imports, unused_variables, unused_mut, dead_code)
)]

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use model_tracer::config::TraceConfig;
use model_tracer::kv_cache::KvCacheStateTrace;
use model_tracer::quant::{BrickId, QuantType};
use model_tracer::traced;
use model_tracer::tracer::ModelTracer;
use model_tracer::Stage;
use wide::f32x8;

use crate::pool::{Out, Pool};

use super::dtype::GgmlType;
use super::gguf::{GgufError, GgufFile};
use super::quant::{
    activation_type, LensScratch, QMatrix, QuantError, QuantizedActivations, QuantizedBatch,
};
use super::tokenizer::{Tokenizer, TokenizerError};

mod attention;
mod batch;
mod softmax;
use attention::{Element, F16};
pub use batch::{Sequence, SequenceStep};
use softmax::softmax;

/// Why a model could not be built or loaded.
#[derive(Debug)]
#[non_exhaustive]
pub enum ModelError {
    /// The GGUF container is malformed.
    Gguf(GgufError),
    /// A tensor cannot be decoded.
    Quant {
        /// Tensor name.
        tensor: String,
        /// What is wrong.
        error: QuantError,
    },
    /// The vocabulary cannot be turned into a tokenizer.
    Tokenizer(TokenizerError),
    /// The file is not of an architecture this decoder runs.
    UnsupportedArchitecture(String),
    /// A tensor the architecture needs is absent.
    MissingTensor(String),
    /// A tensor has other dimensions than the metadata implies.
    Shape {
        /// Tensor name.
        tensor: String,
        /// Dimensions implied by the metadata (ggml order).
        expected: Vec<u64>,
        /// Dimensions in the file.
        found: Vec<u64>,
    },
    /// The hyperparameters are inconsistent.
    Config(String),
}

impl fmt::Display for ModelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModelError::Gguf(e) => write!(f, "GGUF: {e}"),
            ModelError::Quant { tensor, error } => write!(f, "tensor {tensor}: {error}"),
            ModelError::Tokenizer(e) => write!(f, "tokenizer: {e}"),
            ModelError::UnsupportedArchitecture(a) => {
                write!(f, "architecture {a:?} is not supported (only llama)")
            }
            ModelError::MissingTensor(t) => write!(f, "tensor {t} is missing"),
            ModelError::Shape {
                tensor,
                expected,
                found,
            } => write!(
                f,
                "tensor {tensor} has dimensions {found:?}, the metadata implies {expected:?}"
            ),
            ModelError::Config(m) => write!(f, "bad model configuration: {m}"),
        }
    }
}

impl std::error::Error for ModelError {}

impl From<GgufError> for ModelError {
    fn from(e: GgufError) -> Self {
        ModelError::Gguf(e)
    }
}

impl From<TokenizerError> for ModelError {
    fn from(e: TokenizerError) -> Self {
        ModelError::Tokenizer(e)
    }
}

/// Hyperparameters of a LLaMA-family decoder.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Transformer layers.
    pub n_layers: usize,
    /// Hidden size (residual stream width).
    pub dim: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than `n_heads`).
    pub n_kv_heads: usize,
    /// Width of one head (`dim / n_heads`).
    pub head_dim: usize,
    /// Feed-forward hidden size.
    pub ffn_dim: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Longest context the model was trained for.
    pub context_len: usize,
    /// RoPE frequency base.
    pub rope_base: f32,
    /// Dimensions of each head that RoPE rotates (the rest pass through).
    pub rope_dim: usize,
    /// RMSNorm epsilon.
    pub rms_eps: f32,
}

impl Config {
    /// Width of the keys (and values) of one position: `n_kv_heads * head_dim`.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// SmolLM2-135M's shape.
    pub fn smollm2_135m() -> Self {
        Self {
            n_layers: 30,
            dim: 576,
            n_heads: 9,
            n_kv_heads: 3,
            head_dim: 64,
            ffn_dim: 1536,
            vocab_size: 49152,
            context_len: 8192,
            rope_base: 100_000.0,
            rope_dim: 64,
            rms_eps: 1e-5,
        }
    }

    /// A tiny shape for fast tests: 4 layers, hidden 256, 4 heads / 2 KV heads.
    pub fn tiny() -> Self {
        Self {
            n_layers: 4,
            dim: 256,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 64,
            ffn_dim: 512,
            vocab_size: 512,
            context_len: 1024,
            rope_base: 10_000.0,
            rope_dim: 64,
            rms_eps: 1e-5,
        }
    }

    /// Reads the `llama.*` hyperparameters of a GGUF file.
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self, ModelError> {
        let arch = gguf.get_str("general.architecture")?;
        if arch != "llama" {
            return Err(ModelError::UnsupportedArchitecture(arch.to_string()));
        }
        let u = |k: &str| -> Result<usize, ModelError> {
            let v = gguf.get_u32(&format!("llama.{k}"))?;
            usize::try_from(v).map_err(|_| ModelError::Config(format!("llama.{k} = {v}")))
        };
        let dim = u("embedding_length")?;
        let n_heads = u("attention.head_count")?;
        let n_kv_heads = match gguf.metadata("llama.attention.head_count_kv") {
            Some(_) => u("attention.head_count_kv")?,
            None => n_heads,
        };
        if n_heads == 0 || dim % n_heads != 0 {
            return Err(ModelError::Config(format!(
                "embedding_length {dim} is not a multiple of head_count {n_heads}"
            )));
        }
        let head_dim = dim / n_heads;
        let vocab_size = match gguf.metadata("llama.vocab_size") {
            Some(_) => u("vocab_size")?,
            None => gguf
                .tensor("token_embd.weight")
                .map(|t| t.rows())
                .ok_or_else(|| ModelError::MissingTensor("token_embd.weight".into()))?,
        };
        let rope_dim = match gguf.metadata("llama.rope.dimension_count") {
            Some(_) => u("rope.dimension_count")?,
            None => head_dim,
        };
        let rope_base = match gguf.metadata("llama.rope.freq_base") {
            Some(_) => gguf.get_f32("llama.rope.freq_base")?,
            None => 10_000.0,
        };
        let config = Self {
            n_layers: u("block_count")?,
            dim,
            n_heads,
            n_kv_heads,
            head_dim,
            ffn_dim: u("feed_forward_length")?,
            vocab_size,
            context_len: u("context_length")?,
            rope_base,
            rope_dim,
            rms_eps: gguf.get_f32("llama.attention.layer_norm_rms_epsilon")?,
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks the shape is one this decoder can run.
    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |m: String| Err(ModelError::Config(m));
        if self.n_layers == 0 || self.dim == 0 || self.vocab_size == 0 || self.ffn_dim == 0 {
            return bad(format!("empty dimension in {self:?}"));
        }
        if self.n_kv_heads == 0 || self.n_heads % self.n_kv_heads != 0 {
            return bad(format!(
                "{} heads cannot be grouped over {} KV heads",
                self.n_heads, self.n_kv_heads
            ));
        }
        if self.head_dim * self.n_heads != self.dim {
            return bad(format!(
                "head_dim {} x {} heads != dim {}",
                self.head_dim, self.n_heads, self.dim
            ));
        }
        if self.rope_dim > self.head_dim || self.rope_dim % 2 != 0 {
            return bad(format!(
                "rope dimension {} does not fit head dimension {}",
                self.rope_dim, self.head_dim
            ));
        }
        if !(self.rms_eps.is_finite() && self.rms_eps >= 0.0 && self.rope_base > 0.0) {
            return bad(format!(
                "rms epsilon {} / rope base {}",
                self.rms_eps, self.rope_base
            ));
        }
        // Four positions at the least, and nothing absurd: the cache is
        // allocated from this number.
        if self.context_len < 4 || self.context_len > 1 << 22 {
            return bad(format!("context length {}", self.context_len));
        }
        Ok(())
    }
}

/// A weight matrix of the decoder, with the f32 master weights it was
/// quantized from when they are known (synthetic models).
#[derive(Debug, Clone)]
pub struct Linear {
    /// The weights the quantized path multiplies, `(out, in)`.
    pub weight: QMatrix,
    /// f32 weights the f32 reference path multiplies instead of the
    /// dequantized `weight`, when known.
    pub master: Option<QMatrix>,
    /// What-if copies: the reference weights re-quantized to other types.
    pub what_if: Vec<QMatrix>,
}

impl Linear {
    fn new(weight: QMatrix, name: &str) -> Result<Self, ModelError> {
        let ty = weight.ty();
        let block = activation_type(ty).map(GgmlType::block_len);
        match block {
            Some(b) if weight.cols() % b == 0 => Ok(Self {
                weight,
                master: None,
                what_if: Vec::new(),
            }),
            _ => Err(ModelError::Quant {
                tensor: name.to_string(),
                error: QuantError::Unsupported(ty),
            }),
        }
    }

    /// Quantized path: `out = W x` with `x` quantized for this matrix.
    #[inline]
    pub fn forward(&self, x: &QuantizedActivations, out: &mut [f32]) {
        self.weight.matvec(x, out);
    }

    /// f32 reference path: master (or dequantized) weights times f32 `x`.
    pub fn reference(&self, x: &[f32], out: &mut [f32]) {
        match &self.master {
            Some(m) => m.matvec_f32(x, out),
            None => self.weight.matvec_f32(x, out),
        }
    }

    /// Quantized path over a batch: `out` (`T × rows`, row-major) holds
    /// `W x_t` for each row `x_t` of `x`, bit for bit [`forward`](Self::forward)
    /// of each row.
    #[inline]
    pub fn forward_rows(&self, x: &QuantizedBatch, out: &mut [f32]) {
        self.weight.matmul(x, out);
    }

    /// f32 reference path over `T` rows of `x` (row-major): bit for bit
    /// [`reference`](Self::reference) of each row.
    pub fn reference_rows(&self, x: &[f32], out: &mut [f32]) {
        match &self.master {
            Some(m) => m.matmul_f32(x, out),
            None => self.weight.matmul_f32(x, out),
        }
    }

    /// [`forward`](Self::forward) on the threads of `pool`, bit for bit.
    #[inline]
    pub fn forward_on(&self, pool: &Pool, x: &QuantizedActivations, out: &mut [f32]) {
        self.weight.matvec_on(pool, x, out);
    }

    /// [`reference`](Self::reference) on the threads of `pool`, bit for bit.
    pub fn reference_on(&self, pool: &Pool, x: &[f32], out: &mut [f32]) {
        match &self.master {
            Some(m) => m.matvec_f32_on(pool, x, out),
            None => self.weight.matvec_f32_on(pool, x, out),
        }
    }

    /// [`forward_rows`](Self::forward_rows) on the threads of `pool`, bit
    /// for bit.
    #[inline]
    pub fn forward_rows_on(&self, pool: &Pool, x: &QuantizedBatch, out: &mut [f32]) {
        self.weight.matmul_on(pool, x, out);
    }

    /// [`reference_rows`](Self::reference_rows) on the threads of `pool`,
    /// bit for bit.
    pub fn reference_rows_on(&self, pool: &Pool, x: &[f32], out: &mut [f32]) {
        match &self.master {
            Some(m) => m.matmul_f32_on(pool, x, out),
            None => self.weight.matmul_f32_on(pool, x, out),
        }
    }

    /// Storage format of the quantized weights, as the trace names it.
    pub fn quant_type(&self) -> QuantType {
        quant_type_of(self.weight.ty())
    }

    /// Output rows.
    pub fn rows(&self) -> usize {
        self.weight.rows()
    }

    /// Re-quantizes the reference weights (master if known, else the
    /// dequantized weights) to each of `targets`, for what-if tracing.
    pub fn build_what_if(&mut self, targets: &[GgmlType]) -> Result<(), QuantError> {
        let reference = match &self.master {
            Some(m) => m.to_f32(),
            None => self.weight.to_f32(),
        };
        self.what_if = targets
            .iter()
            .map(|&t| QMatrix::from_f32(t, self.weight.rows(), self.weight.cols(), &reference))
            .collect::<Result<_, _>>()?;
        Ok(())
    }
}

/// Compares, for each what-if type, the output of `linears` (stacked, as
/// `[q | k | v]` for the QKV brick) computed with re-quantized weights against
/// the reference weights, on the f32 input `x`.
#[cfg_attr(model_tracer_no_hooks, allow(dead_code))]
#[inline(always)]
fn trace_what_if<C: TraceConfig>(
    tracer: &mut ModelTracer<C>,
    brick: BrickId,
    layer: usize,
    linears: &[&Linear],
    x: &[f32],
) {
    if !tracer.wants_what_if() {
        return;
    }
    let Some(first) = linears.first() else { return };
    let len = linears.iter().map(|l| l.rows()).sum();
    for (i, target) in first.what_if.iter().enumerate() {
        tracer.what_if(
            brick,
            layer,
            quant_type_of(target.ty()),
            len,
            |cand, refr| {
                let mut at = 0;
                for l in linears {
                    let rows = at..at + l.rows();
                    if let Some(w) = l.what_if.get(i) {
                        w.matvec_f32(x, &mut cand[rows.clone()]);
                    }
                    l.reference(x, &mut refr[rows]);
                    at += l.rows();
                }
            },
        );
    }
}

/// The trace's name of a ggml element type (activation-only formats map to
/// their weight counterparts).
pub fn quant_type_of(ty: GgmlType) -> QuantType {
    match ty {
        GgmlType::F32 => QuantType::F32,
        GgmlType::F16 => QuantType::F16,
        GgmlType::BF16 => QuantType::BF16,
        GgmlType::Q4_0 => QuantType::Q4_0,
        GgmlType::Q4_1 => QuantType::Q4_1,
        GgmlType::Q5_0 => QuantType::Q5_0,
        GgmlType::Q5_1 => QuantType::Q5_1,
        GgmlType::Q8_0 | GgmlType::Q8_1 | GgmlType::Q8_K => QuantType::Q8_0,
        GgmlType::Q2_K => QuantType::Q2_K,
        GgmlType::Q3_K => QuantType::Q3_K,
        GgmlType::Q4_K => QuantType::Q4_K,
        GgmlType::Q5_K => QuantType::Q5_K,
        GgmlType::Q6_K => QuantType::Q6_K,
    }
}

/// Weights of one transformer layer.
#[derive(Debug, Clone)]
pub struct LayerWeights {
    /// RMSNorm weight before attention, `(dim)`.
    pub attn_norm: Vec<f32>,
    /// Query projection, `(dim, dim)`.
    pub attn_q: Linear,
    /// Key projection, `(kv_dim, dim)`.
    pub attn_k: Linear,
    /// Value projection, `(kv_dim, dim)`.
    pub attn_v: Linear,
    /// Attention output projection, `(dim, dim)`.
    pub attn_output: Linear,
    /// RMSNorm weight before the feed-forward block, `(dim)`.
    pub ffn_norm: Vec<f32>,
    /// Gate projection, `(ffn_dim, dim)`.
    pub ffn_gate: Linear,
    /// Up projection, `(ffn_dim, dim)`.
    pub ffn_up: Linear,
    /// Down projection, `(dim, ffn_dim)`.
    pub ffn_down: Linear,
}

/// All weights of the decoder.
#[derive(Debug, Clone)]
pub struct Weights {
    /// Token embeddings, `(vocab, dim)`.
    pub token_embd: QMatrix,
    /// The layers.
    pub layers: Vec<LayerWeights>,
    /// Final RMSNorm weight, `(dim)`.
    pub output_norm: Vec<f32>,
    /// LM head, `(vocab, dim)`; a copy of the embeddings when they are tied.
    pub output: Linear,
}

impl Weights {
    /// Every linear layer, LM head included.
    pub fn linears_mut(&mut self) -> impl Iterator<Item = &mut Linear> + '_ {
        self.layers
            .iter_mut()
            .flat_map(|l| {
                [
                    &mut l.attn_q,
                    &mut l.attn_k,
                    &mut l.attn_v,
                    &mut l.attn_output,
                    &mut l.ffn_gate,
                    &mut l.ffn_up,
                    &mut l.ffn_down,
                ]
            })
            .chain(std::iter::once(&mut self.output))
    }

    /// Forgets the f32 master weights: the reference path then multiplies
    /// the dequantized weights, and measures what activation quantization
    /// alone costs.
    pub fn drop_masters(&mut self) {
        self.linears_mut().for_each(|l| l.master = None);
    }
}

/// A fault to inject into the forward pass, to watch the anomaly detector
/// find it at its origin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// One NaN in the attention output of the layer (stage `post_attn`).
    NaN,
    /// One +Inf in the feed-forward output of the layer (stage `post_ffn`).
    Inf,
    /// The feed-forward output of the layer scaled by 1e8 (stage `post_ffn`).
    Explode,
    /// The output of the stage (`post_attn` or `post_ffn`) scaled by
    /// `1 + 1e-2`: an error below every anomaly rule, which only a
    /// comparison with another run finds.
    Scale(Stage),
    /// The values of heads 0 and 1 (the first two blocks of `head_dim`) of
    /// the stage's output swapped: every moment of the tensor (mean, std,
    /// L2 norm, max |x|) stays the same, as after a head-order bug.
    SwapHeads(Stage),
}

/// Where and when to inject a fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// What to inject.
    pub kind: FaultKind,
    /// Layer to inject it in.
    pub layer: usize,
    /// Only at this position (`None`: at every position).
    pub position: Option<usize>,
}

impl Fault {
    /// The stage where the fault first shows.
    pub fn stage(&self) -> Stage {
        match self.kind {
            FaultKind::NaN => Stage::PostAttn,
            FaultKind::Inf | FaultKind::Explode => Stage::PostFfn,
            FaultKind::Scale(stage) | FaultKind::SwapHeads(stage) => stage,
        }
    }

    /// Injects the fault into `v`, the tensor of `stage` in `layer`, if it
    /// belongs there: the decoder's one point of fault injection.
    fn apply(&self, layer: usize, stage: Stage, v: &mut [f32], head_dim: usize) {
        if self.layer != layer || self.stage() != stage || v.is_empty() {
            return;
        }
        match self.kind {
            FaultKind::NaN => v[layer % v.len()] = f32::NAN,
            FaultKind::Inf => v[layer % v.len()] = f32::INFINITY,
            FaultKind::Explode => v.iter_mut().for_each(|x| *x *= 1e8),
            FaultKind::Scale(_) => v.iter_mut().for_each(|x| *x *= 1.01),
            FaultKind::SwapHeads(_) => {
                if v.len() >= 2 * head_dim {
                    let (h0, rest) = v.split_at_mut(head_dim);
                    h0.swap_with_slice(&mut rest[..head_dim]);
                }
            }
        }
    }

    /// Parses `nan@LAYER`, `inf@LAYER`, `explode@LAYER`, `scale@LAYER` or
    /// `swap@LAYER`; the last two take the stage after a colon
    /// (`scale@3:post_ffn`; `post_attn` when none is given).
    pub fn parse(text: &str) -> Result<Self, String> {
        let (kind, at) = text
            .split_once('@')
            .ok_or_else(|| format!("fault {text:?}: expected KIND@LAYER"))?;
        let (layer, stage) = match at.split_once(':') {
            Some((layer, stage)) => (layer, Some(stage)),
            None => (at, None),
        };
        let stage = match stage {
            None | Some("post_attn") => Stage::PostAttn,
            Some("post_ffn") => Stage::PostFfn,
            Some(other) => {
                return Err(format!(
                    "fault stage {other:?}: faults go into post_attn or post_ffn"
                ))
            }
        };
        let kind = match kind {
            "nan" => FaultKind::NaN,
            "inf" => FaultKind::Inf,
            "explode" => FaultKind::Explode,
            "scale" => FaultKind::Scale(stage),
            "swap" => FaultKind::SwapHeads(stage),
            other => {
                return Err(format!(
                    "fault kind {other:?}: expected nan, inf, explode, scale or swap"
                ))
            }
        };
        if matches!(kind, FaultKind::NaN | FaultKind::Inf | FaultKind::Explode) && at.contains(':')
        {
            return Err(format!("fault {text:?}: only scale and swap take a stage"));
        }
        let layer = layer
            .parse()
            .map_err(|_| format!("fault layer {layer:?} is not a number"))?;
        Ok(Self {
            kind,
            layer,
            position: None,
        })
    }
}

/// How the KV cache is sized, stored and evicted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvCacheOptions {
    /// Positions the cache holds (at most the model's context length).
    pub capacity: usize,
    /// First positions that are never evicted (attention sinks).
    pub sinks: usize,
    /// How keys and values are stored.
    pub kv_type: KvType,
}

/// How the KV cache stores keys and values.
///
/// `F32` keeps them as the model computes them. `F16` (llama.cpp's
/// default cache type) rounds each to the nearest binary16 value (ties to
/// even; beyond ±65504, infinity) as it is cached: half the memory, and
/// half the bytes attention reads per position, which is what decoding at
/// long context waits on. The rounding changes the model's results (the
/// attention of every position reads rounded keys and values), the same
/// way in a one-position step, a chunk of a prefill and a batch of
/// sequences, on any number of threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvType {
    /// 32-bit floats, the values computed.
    #[default]
    F32,
    /// IEEE binary16, rounded to nearest.
    F16,
}

impl KvType {
    /// Bytes an element takes.
    pub fn bytes(self) -> usize {
        match self {
            KvType::F32 => 4,
            KvType::F16 => 2,
        }
    }

    /// `f32` or `f16`, as `--kv-type` takes it.
    pub fn name(self) -> &'static str {
        match self {
            KvType::F32 => "f32",
            KvType::F16 => "f16",
        }
    }

    /// Parses `f32` or `f16`.
    pub fn parse(text: &str) -> Result<Self, String> {
        match text {
            "f32" => Ok(KvType::F32),
            "f16" => Ok(KvType::F16),
            other => Err(format!("KV cache type {other:?}: expected f32 or f16")),
        }
    }
}

/// The keys (in panels) and values of every layer of a cache, in its
/// element type.
#[derive(Debug, Clone)]
enum KvData {
    F32 {
        key: Vec<f32x8>,
        value: Vec<f32>,
    },
    F16 {
        key: Vec<[F16; attention::PANEL]>,
        value: Vec<F16>,
    },
}

/// The KV cache: keys and values of every cached position, per layer,
/// preallocated, as `f32` or f16 ([`KvType`]): values as `(layers,
/// capacity, kv_dim)`, keys in panels of 8 slots per layer and KV head
/// (`(layers, kv_heads, capacity / 8, head_dim)` vectors of 8 lanes, the
/// layout of the attention kernels), so that the scores of a query read
/// its head's keys contiguously, 8 positions a vector.
///
/// When full, the oldest position after the sinks is evicted (StreamingLLM's
/// policy): slots `0..sinks` hold the first positions forever, the rest is a
/// ring over the most recent ones. Keys keep the rotation of their original
/// position.
#[derive(Debug, Clone)]
pub struct KvCache {
    // keys: (layer, kv_head, capacity / 8, head_dim) panels;
    // values: (layer, capacity, kv_dim)
    data: KvData,
    n_layers: usize,
    capacity: usize,
    kv_dim: usize,
    head_dim: usize,
    head_panels: usize, // vectors of one layer's and KV head's keys
    sinks: usize,
    len: usize,            // valid positions
    ring_start: usize,     // chronological start of the ring region, as an offset into it
    tokens: Vec<u32>,      // token of each slot
    positions: Vec<usize>, // absolute position of each slot
    next_position: usize,
    total_evictions: usize,
    step_evictions: usize,
}

impl KvCache {
    fn new(n_layers: usize, n_kv_heads: usize, head_dim: usize, options: KvCacheOptions) -> Self {
        let capacity = options.capacity.max(2);
        let sinks = options.sinks.min(capacity - 1);
        let kv_dim = n_kv_heads * head_dim;
        let head_panels = attention::panels(capacity) * head_dim;
        let (keys, values) = (
            n_layers * n_kv_heads * head_panels,
            n_layers * capacity * kv_dim,
        );
        let data = match options.kv_type {
            KvType::F32 => KvData::F32 {
                key: vec![f32x8::ZERO; keys],
                value: vec![0.0; values],
            },
            KvType::F16 => KvData::F16 {
                key: vec![F16::ZERO; keys],
                value: vec![F16::default(); values],
            },
        };
        Self {
            data,
            n_layers,
            capacity,
            kv_dim,
            head_dim,
            head_panels,
            sinks,
            len: 0,
            ring_start: 0,
            tokens: vec![0; capacity],
            positions: vec![0; capacity],
            next_position: 0,
            total_evictions: 0,
            step_evictions: 0,
        }
    }

    /// Slot of the `t`-th oldest cached position.
    #[inline]
    fn slot(&self, t: usize) -> usize {
        if t < self.sinks {
            t
        } else {
            let ring = self.capacity - self.sinks;
            self.sinks + (self.ring_start + t - self.sinks) % ring
        }
    }

    /// Makes room for one more position and returns its slot.
    fn push(&mut self, token: u32, position: usize) -> usize {
        if self.len == self.capacity {
            self.ring_start = (self.ring_start + 1) % (self.capacity - self.sinks);
            self.total_evictions += 1;
            self.step_evictions += 1;
        } else {
            self.len += 1;
        }
        let slot = self.slot(self.len - 1);
        self.tokens[slot] = token;
        self.positions[slot] = position;
        self.next_position = position + 1;
        slot
    }

    /// Positions a chunk of `rows` new positions may have: its rows must
    /// never evict one another (a row needs the keys of those before it).
    fn chunk_room(&self) -> usize {
        self.capacity - self.sinks
    }

    /// Writes the key `k` and the value `v` (`[kv_dim]` each) of a
    /// position in layer `layer` into `slot`, in the cache's element type.
    #[inline(always)]
    fn store(&mut self, layer: usize, slot: usize, k: &[f32], v: &[f32]) {
        let layout = self.layout();
        match &mut self.data {
            KvData::F32 { key, value } => Self::store_in(layout, key, value, layer, slot, k, v),
            KvData::F16 { key, value } => Self::store_in(layout, key, value, layer, slot, k, v),
        }
    }

    /// The widths of the cache: `(capacity, kv_dim, head_dim, head_panels)`.
    #[inline(always)]
    fn layout(&self) -> (usize, usize, usize, usize) {
        (self.capacity, self.kv_dim, self.head_dim, self.head_panels)
    }

    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn store_in<E: Element>(
        (capacity, kv_dim, hd, head_panels): (usize, usize, usize, usize),
        key: &mut [E::Lanes],
        value: &mut [E],
        layer: usize,
        slot: usize,
        k: &[f32],
        v: &[f32],
    ) {
        let at = layer * capacity * kv_dim + slot * kv_dim;
        for (to, &v) in value[at..at + kv_dim].iter_mut().zip(v) {
            *to = E::from_f32(v);
        }
        let heads = kv_dim / hd;
        let keys = &mut key[layer * heads * head_panels..][..heads * head_panels];
        for (panels, k) in keys.chunks_exact_mut(head_panels).zip(k.chunks_exact(hd)) {
            for (d, &k) in k.iter().enumerate() {
                attention::set_key(panels, slot, d, hd, E::from_f32(k));
            }
        }
    }

    /// The key panels of KV head `head` in layer `layer`, of a cache whose
    /// keys are `key`.
    #[inline(always)]
    fn key_panels<'a, E: Element>(
        &self,
        key: &'a [E::Lanes],
        layer: usize,
        head: usize,
    ) -> &'a [E::Lanes] {
        let heads = self.kv_dim / self.head_dim;
        &key[(layer * heads + head) * self.head_panels..][..self.head_panels]
    }

    /// How keys and values are stored.
    pub fn kv_type(&self) -> KvType {
        match self.data {
            KvData::F32 { .. } => KvType::F32,
            KvData::F16 { .. } => KvType::F16,
        }
    }

    /// The slots of the cached positions in chronological order, into
    /// `out`: the sinks, then the ring from its oldest entry.
    fn chronological_slots(&self, out: &mut Vec<usize>) {
        out.clear();
        if self.len < self.capacity {
            // nothing was evicted since the cache was cleared: slot = age
            out.extend(0..self.len);
        } else {
            let start = self.sinks + self.ring_start;
            out.extend(
                (0..self.sinks)
                    .chain(start..self.capacity)
                    .chain(self.sinks..start),
            );
        }
    }

    /// The trace of the cache after the one-position step `step` at
    /// position `pos`.
    #[cfg_attr(model_tracer_no_hooks, allow(dead_code))]
    fn step_state(&self, step: usize, n_layers: usize, pos: usize) -> KvCacheStateTrace {
        let reused = self.len - 1;
        let looked_up = pos + 1;
        KvCacheStateTrace {
            step,
            max_positions: self.capacity,
            valid_positions: self.len,
            cache_size_bytes: self.bytes_in_use(n_layers),
            cache_hit_rate: reused as f32 / looked_up as f32,
            evictions_this_step: self.step_evictions,
            reused_positions: reused,
            computed_positions: 1,
        }
    }

    /// The trace of the cache as row `i` of a chunk at position `pos`
    /// leaves it, `old_len` positions having been cached before the chunk:
    /// what the one-position step `step` of that row records.
    #[cfg_attr(model_tracer_no_hooks, allow(dead_code))]
    fn row_state(
        &self,
        step: usize,
        n_layers: usize,
        old_len: usize,
        i: usize,
        pos: usize,
    ) -> KvCacheStateTrace {
        let n_ctx = (old_len + i + 1).min(self.capacity);
        let reused = n_ctx - 1;
        let looked_up = pos + 1;
        KvCacheStateTrace {
            step,
            max_positions: self.capacity,
            valid_positions: n_ctx,
            cache_size_bytes: 2 * n_layers * n_ctx * self.kv_dim * self.kv_type().bytes(),
            cache_hit_rate: reused as f32 / looked_up as f32,
            evictions_this_step: usize::from(old_len + i + 1 > self.capacity),
            reused_positions: reused,
            computed_positions: 1,
        }
    }

    /// Positions holding keys and values.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// First positions never evicted (StreamingLLM's attention sinks).
    pub fn sinks(&self) -> usize {
        self.sinks
    }

    /// Capacity in positions.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Positions evicted since the cache was cleared.
    pub fn total_evictions(&self) -> usize {
        self.total_evictions
    }

    /// Absolute position the next token takes.
    pub fn next_position(&self) -> usize {
        self.next_position
    }

    /// Cached tokens in chronological order.
    pub fn tokens(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.len).map(|t| self.tokens[self.slot(t)])
    }

    /// Absolute positions of the cached tokens, in chronological order.
    pub fn positions(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.len).map(|t| self.positions[self.slot(t)])
    }

    /// The key (`[kv_dim]`, rotated) of the `t`-th oldest cached position
    /// in layer `layer`, if both exist, gathered from the panels the cache
    /// keeps keys in, as `f32`.
    pub fn key(&self, layer: usize, t: usize) -> Option<Vec<f32>> {
        match &self.data {
            KvData::F32 { key, .. } => self.key_of::<f32>(key, layer, t),
            KvData::F16 { key, .. } => self.key_of::<F16>(key, layer, t),
        }
    }

    fn key_of<E: Element>(&self, key: &[E::Lanes], layer: usize, t: usize) -> Option<Vec<f32>> {
        if t >= self.len || layer >= self.n_layers {
            return None;
        }
        let (slot, hd) = (self.slot(t), self.head_dim);
        let heads = self.kv_dim / hd;
        let key = (0..heads)
            .flat_map(|h| {
                let panels = self.key_panels::<E>(key, layer, h);
                (0..hd).map(move |d| attention::get_key::<E>(panels, slot, d, hd).to_f32())
            })
            .collect();
        Some(key)
    }

    /// The value (`[kv_dim]`) of the `t`-th oldest cached position in
    /// layer `layer`, if both exist, as `f32`.
    pub fn value(&self, layer: usize, t: usize) -> Option<Vec<f32>> {
        if t >= self.len || layer >= self.n_layers {
            return None;
        }
        let at = (layer * self.capacity + self.slot(t)) * self.kv_dim;
        let range = at..at + self.kv_dim;
        match &self.data {
            KvData::F32 { value, .. } => Some(value[range].to_vec()),
            KvData::F16 { value, .. } => Some(value[range].iter().map(|v| v.to_f32()).collect()),
        }
    }

    /// Bytes held by the valid positions (keys and values, every layer).
    pub fn bytes_in_use(&self, n_layers: usize) -> usize {
        2 * n_layers * self.len * self.kv_dim * self.kv_type().bytes()
    }

    /// Forgets every position: call between independent conversations.
    pub fn clear(&mut self) {
        self.len = 0;
        self.ring_start = 0;
        self.next_position = 0;
        self.total_evictions = 0;
        self.step_evictions = 0;
    }

    /// Keeps the first `n` positions, if the cache still holds the sequence
    /// from position 0 without gaps; returns whether it did.
    fn truncate(&mut self, n: usize) -> bool {
        if self.total_evictions > 0 || n > self.len {
            return false;
        }
        self.len = n;
        self.next_position = n;
        true
    }
}

/// Buffers of one forward pass, allocated once.
#[derive(Debug, Clone)]
struct RunState {
    x: Vec<f32>,       // (dim) residual stream
    xb: Vec<f32>,      // (dim) normed input of a block; attention output before projection
    xb2: Vec<f32>,     // (dim) output of a block's last projection
    qkv: Vec<f32>,     // (dim + 2 kv_dim) query, key, value of the current position
    att: Vec<f32>,     // (n_heads, capacity) attention weights, chronological
    scores: Vec<f32>,  // (n_heads, capacity in whole key panels) scores, in slot order
    slots: Vec<usize>, // (cached positions) their slots, chronological
    hb: Vec<f32>,      // (ffn_dim) gate, then the SwiGLU product
    hb2: Vec<f32>,     // (ffn_dim) up
    logits: Vec<f32>,  // (vocab)
    xq: QuantizedActivations,
    lens_hidden: Vec<f32>, // (n_layers, dim) hidden state after each layer, for the logit lens
    lens_x: Vec<f32>,      // (n_layers, dim) the same through the final norm
    lens_scratch: LensScratch,
    lens_layers: Vec<usize>, // 0..n_layers
    rope_freq: Vec<f32>,     // (rope_dim / 2) inverse frequencies
}

impl RunState {
    fn new(c: &Config, capacity: usize) -> Self {
        let rope_freq = (0..c.rope_dim / 2)
            .map(|i| c.rope_base.powf(-2.0 * i as f32 / c.rope_dim as f32))
            .collect();
        Self {
            x: vec![0.0; c.dim],
            xb: vec![0.0; c.dim],
            xb2: vec![0.0; c.dim],
            qkv: vec![0.0; c.dim + 2 * c.kv_dim()],
            att: vec![0.0; c.n_heads * capacity],
            scores: vec![0.0; c.n_heads * attention::panels(capacity) * attention::PANEL],
            slots: Vec::with_capacity(capacity),
            hb: vec![0.0; c.ffn_dim],
            hb2: vec![0.0; c.ffn_dim],
            logits: vec![0.0; c.vocab_size],
            xq: QuantizedActivations::new(),
            lens_hidden: vec![0.0; c.n_layers * c.dim],
            lens_x: vec![0.0; c.n_layers * c.dim],
            lens_scratch: LensScratch::new(),
            lens_layers: (0..c.n_layers).collect(),
            rope_freq,
        }
    }
}

/// Buffers of a forward over a chunk of `T` positions, grown to the
/// largest chunk run and then reused.
#[derive(Debug, Clone, Default)]
struct ChunkState {
    x: Vec<f32>,             // (T, dim) residual streams
    xb: Vec<f32>,            // (T, dim) normed inputs; attention outputs before projection
    xb2: Vec<f32>,           // (T, dim) outputs of a block's last projection
    q: Vec<f32>,             // (T, dim) queries
    k: Vec<f32>,             // (T, kv_dim) keys of the chunk, rotated
    v: Vec<f32>,             // (T, kv_dim) values of the chunk
    hb: Vec<f32>,            // (T, ffn_dim) gate, then the SwiGLU product
    hb2: Vec<f32>,           // (T, ffn_dim) up
    att: Vec<f32>,           // (n_heads, T, stride) attention rows
    panels: Vec<Vec<f32x8>>, // (n_kv_heads; T / 8, head_dim) the chunk's keys, in panels
    v16: Vec<F16>,           // (T, kv_dim) the chunk's values, for a cache of f16
    scores: Vec<f32>,        // (parts; cached positions + T, whole panels) a row's scores
    xq: QuantizedBatch,
    lens_hidden: Vec<f32>, // (T, n_layers, dim) hidden states for the logit lens
    logits: Vec<f32>,      // (vocab) logits of a row before the last
}

impl ChunkState {
    fn resize(&mut self, c: &Config, rows: usize, stride: usize) {
        let kv = c.kv_dim();
        for (buf, width) in [
            (&mut self.x, c.dim),
            (&mut self.xb, c.dim),
            (&mut self.xb2, c.dim),
            (&mut self.q, c.dim),
            (&mut self.k, kv),
            (&mut self.v, kv),
            (&mut self.hb, c.ffn_dim),
            (&mut self.hb2, c.ffn_dim),
            (&mut self.att, c.n_heads * stride),
        ] {
            buf.resize(rows * width, 0.0);
        }
    }
}

/// The input of one or more products over a chunk: `T` rows of `x` and
/// their 8-bit form, quantized for the weight type a product needs, once
/// per type.
struct RowsInput<'a> {
    x: &'a [f32],
    cols: usize,
    q: &'a mut QuantizedBatch,
    quantized_for: Option<GgmlType>,
    products: Products<'a>,
}

impl<'a> RowsInput<'a> {
    fn new(x: &'a [f32], cols: usize, q: &'a mut QuantizedBatch, products: Products<'a>) -> Self {
        Self {
            x,
            cols,
            q,
            quantized_for: None,
            products,
        }
    }

    /// `out[t] = W x[t]` for every row, bit for bit [`Input::multiply`] of
    /// each row.
    fn multiply(&mut self, w: &Linear, out: &mut [f32]) {
        if self.products.exact {
            return w.reference_rows_on(self.products.pool, self.x, out);
        }
        let ty = w.weight.ty();
        if self.quantized_for != Some(ty) {
            if let Err(e) = self
                .q
                .quantize_from_on(self.products.pool, self.x, self.cols, ty)
            {
                unreachable!("activation shapes are validated at load: {e}");
            }
            self.quantized_for = Some(ty);
        }
        w.forward_rows_on(self.products.pool, self.q, out);
    }
}

/// The result of [`Llama::generate`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Generation {
    /// Tokens generated (the end-of-generation token, if met, is included).
    pub tokens: Vec<u32>,
    /// Prompt positions served from the cache instead of recomputed.
    pub reused_prompt_positions: usize,
    /// Prompt positions computed.
    pub computed_prompt_positions: usize,
}

/// The tokenizer of a model, when its file carries a vocabulary, shared
/// by the models built over the same weights ([`Llama::from_shared`]).
#[derive(Debug, Clone, Default)]
pub struct SharedTokenizer(Option<Arc<Tokenizer>>);

impl SharedTokenizer {
    /// The tokenizer `tokenizer`, or none.
    pub fn new(tokenizer: Option<Arc<Tokenizer>>) -> Self {
        Self(tokenizer)
    }

    /// The tokenizer, if there is one.
    #[allow(clippy::should_implement_trait)]
    pub fn as_ref(&self) -> Option<&Tokenizer> {
        self.0.as_deref()
    }

    /// A new handle on the shared tokenizer, to build another model with.
    pub fn shared(&self) -> Option<Arc<Tokenizer>> {
        self.0.clone()
    }

    /// Whether there is a tokenizer.
    pub fn is_some(&self) -> bool {
        self.0.is_some()
    }
}

impl From<Option<Tokenizer>> for SharedTokenizer {
    fn from(t: Option<Tokenizer>) -> Self {
        Self(t.map(Arc::new))
    }
}

/// A LLaMA-family decoder generic over its trace config: `Llama<Disabled>`
/// runs with no tracing code at all.
///
/// The weights and the tokenizer are shared (`Arc`): any number of models,
/// of any trace config, run over one copy ([`Llama::from_shared`]). A model
/// runs one conversation of its own ([`forward`](Self::forward),
/// [`prefill`](Self::prefill), [`generate`](Self::generate)) and any number
/// of [`Sequence`]s, whose rows share forwards
/// ([`forward_batch`](Self::forward_batch)).
#[derive(Debug)]
pub struct Llama<C: TraceConfig = model_tracer::DefaultTrace> {
    /// Hyperparameters.
    pub config: Config,
    /// Weights, shared by the models built over them; what changes them
    /// ([`set_what_if`](Self::set_what_if)) gives this model its own copy
    /// first when they are shared (`Arc::make_mut`).
    pub weights: Arc<Weights>,
    /// The tokenizer, when the model file carries a vocabulary.
    pub tokenizer: SharedTokenizer,
    cache: KvCache,
    state: RunState,
    tracer: ModelTracer<C>,
    fault: Option<Fault>,
    exact: bool,
    pool: Pool,
    steps: usize,
    chunk: ChunkState,
    rows: ChunkRows,
    prefill_chunk: usize,
    batch: batch::BatchRows,
    next_sequence: u64,
}

/// Prompt positions a prefill runs through the model at once, unless
/// [`Llama::set_prefill_chunk`] says otherwise.
pub const DEFAULT_PREFILL_CHUNK: usize = 64;

/// How a forward multiplies: on the quantized or the exact f32 path, on
/// the threads of which pool.
#[derive(Clone, Copy)]
struct Products<'a> {
    exact: bool,
    pool: &'a Pool,
}

/// The input of one or more products: `x` and its 8-bit form, quantized
/// for the weight type a product needs, once per type.
struct Input<'a> {
    x: &'a [f32],
    q: &'a mut QuantizedActivations,
    /// The weight type `q` was quantized for.
    quantized_for: Option<GgmlType>,
    /// The exact f32 path multiplies `x` itself.
    products: Products<'a>,
}

impl<'a> Input<'a> {
    fn new(x: &'a [f32], q: &'a mut QuantizedActivations, products: Products<'a>) -> Self {
        Self {
            x,
            q,
            quantized_for: None,
            products,
        }
    }

    /// `out = W x`, on the quantized path (weights times 8-bit activations)
    /// or the exact f32 path.
    fn multiply(&mut self, w: &Linear, out: &mut [f32]) {
        if self.products.exact {
            return w.reference_on(self.products.pool, self.x, out);
        }
        self.quantize_for(w.weight.ty());
        w.forward_on(self.products.pool, self.q, out);
    }

    /// `outs[i] = ws[i] x` for each `i`, in one job of the pool when the
    /// weights have one type (the products' rows split together), each
    /// product bit for bit that of [`multiply`](Self::multiply).
    fn multiply_many<const N: usize>(&mut self, ws: [&Linear; N], mut outs: [&mut [f32]; N]) {
        let ty = ws.first().map(|w| w.weight.ty());
        if self.products.exact || ws.iter().any(|w| Some(w.weight.ty()) != ty) {
            for (w, out) in ws.iter().zip(&mut outs) {
                self.multiply(w, out);
            }
            return;
        }
        if let Some(ty) = ty {
            self.quantize_for(ty);
        }
        QMatrix::matvec_many_on(self.products.pool, self.q, ws.map(|w| &w.weight), outs);
    }

    /// `q` holds `x` quantized for weights of type `ty`.
    fn quantize_for(&mut self, ty: GgmlType) {
        if self.quantized_for != Some(ty) {
            // The types and lengths were checked when the weights were
            // built, so this cannot fail.
            if let Err(e) = self.q.quantize_from(self.x, ty) {
                unreachable!("activation shapes are validated at load: {e}");
            }
            self.quantized_for = Some(ty);
        }
    }
}

/// A traced product: `out = [W_0; W_1; ...] x`, the rows of each weight in
/// turn (q, k and v into one buffer), and, where the tracer asks for them,
/// the quantization error of `brick` in `layer` against the f32 reference
/// and the what-if copies of its weights.
fn project<C: TraceConfig, const N: usize>(
    tracer: &mut ModelTracer<C>,
    brick: BrickId,
    layer: usize,
    weights: [&Linear; N],
    input: &mut Input<'_>,
    out: &mut [f32],
) {
    let mut rest = &mut *out;
    let outs = weights.map(|w| {
        let (this, next) = std::mem::take(&mut rest).split_at_mut(w.rows());
        rest = next;
        this
    });
    input.multiply_many(weights, outs);
    trace_product(tracer, brick, layer, &weights, input.x, out);
}

/// The quantization error of the product `out` of `weights` (stacked) by
/// `x` of `brick` in `layer`, and its what-if comparisons, where the
/// tracer asks for them.
#[inline(always)]
#[cfg_attr(model_tracer_no_hooks, allow(unused_variables))]
fn trace_product<C: TraceConfig>(
    tracer: &mut ModelTracer<C>,
    brick: BrickId,
    layer: usize,
    weights: &[&Linear],
    x: &[f32],
    out: &[f32],
) {
    traced!(
        C,
        tracer.quant_error(brick, layer, weights[0].quant_type(), out, |r| {
            let mut at = 0;
            for w in weights {
                w.reference(x, &mut r[at..at + w.rows()]);
                at += w.rows();
            }
        })
    );
    traced!(C, trace_what_if(tracer, brick, layer, weights, x));
}

/// The quantization error (and what-if comparisons) of `brick` in
/// `layer` for each row of a chunk, as [`project`] records them for one
/// position: `x` holds the rows of the input (`T × cols`), `outs` the
/// products of each weight (`T × rows` each), stacked per row into
/// `scratch` when there are several (`[q | k | v]`).
#[cfg_attr(model_tracer_no_hooks, allow(dead_code))]
fn trace_rows<C: TraceConfig>(
    tracer: &mut ModelTracer<C>,
    brick: BrickId,
    layer: usize,
    weights: &[&Linear],
    x: &[f32],
    outs: &[&Vec<f32>],
    scratch: &mut [f32],
) {
    if !tracer.wants_what_if() {
        return;
    }
    let widths: usize = weights.iter().map(|w| w.rows()).sum();
    let rows = outs
        .first()
        .map_or(0, |o| o.len() / weights[0].rows().max(1));
    let cols = x.len() / rows.max(1);
    for i in 0..rows {
        tracer.focus_row(i);
        let xi = &x[i * cols..(i + 1) * cols];
        let quantized: &[f32] = if let ([w], [o]) = (weights, outs) {
            &o[i * w.rows()..(i + 1) * w.rows()]
        } else {
            if tracer.wants_quant_error(brick) {
                let mut at = 0;
                for (w, o) in weights.iter().zip(outs) {
                    scratch[at..at + w.rows()]
                        .copy_from_slice(&o[i * w.rows()..(i + 1) * w.rows()]);
                    at += w.rows();
                }
            }
            &scratch[..widths]
        };
        tracer.quant_error(brick, layer, weights[0].quant_type(), quantized, |r| {
            let mut at = 0;
            for w in weights {
                w.reference(xi, &mut r[at..at + w.rows()]);
                at += w.rows();
            }
        });
        trace_what_if(tracer, brick, layer, weights, xi);
    }
}

/// The logit lens of one position: `hidden`, the hidden state after each
/// layer of `layers` (`(layers.len(), dim)`), through the final norm into
/// `normed`, then through the LM head as one multi-row product that reads
/// its weights once for all those layers, straight into the tracer's lens
/// rows.
///
/// The product is [`QMatrix::lens_matmul`]: the model's quantized product
/// to rounding, each row the same whether computed with the others or
/// alone; on the exact path ([`Llama::set_exact`]) the f32 reference
/// product ([`Linear::reference_rows`]). The last layer's row is the
/// model's own output, `logits`, copied: its ranks are those the model
/// chooses by.
#[cfg_attr(model_tracer_no_hooks, allow(dead_code))]
#[allow(clippy::too_many_arguments)]
fn logit_lens<C: TraceConfig>(
    tracer: &mut ModelTracer<C>,
    c: &Config,
    w: &Weights,
    hidden: &[f32],
    normed: &mut [f32],
    scratch: &mut LensScratch,
    layers: &[usize],
    logits: &[f32],
    exact: bool,
) {
    let own = usize::from(layers.last().is_some_and(|&l| l + 1 == c.n_layers));
    let projected = layers.len() - own;
    for (o, x) in normed
        .chunks_exact_mut(c.dim)
        .zip(hidden.chunks_exact(c.dim))
        .take(projected)
    {
        rmsnorm(o, x, &w.output_norm, c.rms_eps);
    }
    tracer.logit_lens_layers(layers, c.vocab_size, |out| {
        let (rest, last) = out.split_at_mut(projected * c.vocab_size);
        let x = &normed[..projected * c.dim];
        if exact {
            w.output.reference_rows(x, rest);
        } else {
            w.output.weight.lens_matmul(x, scratch, rest);
        }
        last.copy_from_slice(&logits[..last.len()]);
    });
}

fn rmsnorm(out: &mut [f32], x: &[f32], weight: &[f32], eps: f32) {
    let ss = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let scale = 1.0 / (ss + eps).sqrt();
    for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
        *o = w * (v * scale);
    }
}

/// Rotates consecutive pairs `(x[2i], x[2i+1])` of each head by
/// `pos * freq[i]`: llama.cpp's "normal" RoPE, which GGUF llama files are
/// converted for (their Q and K rows are permuted to match).
fn rope(x: &mut [f32], head_dim: usize, freq: &[f32], pos: usize) {
    for head in x.chunks_exact_mut(head_dim) {
        for (pair, &f) in head.chunks_exact_mut(2).zip(freq) {
            let (sin, cos) = (pos as f32 * f).sin_cos();
            let (a, b) = (pair[0], pair[1]);
            pair[0] = a * cos - b * sin;
            pair[1] = a * sin + b * cos;
        }
    }
}

/// Where the one position of [`Llama::forward`] sits: its absolute
/// position and the cache slot its key and value go to.
#[derive(Debug, Clone, Copy)]
struct Row {
    pos: usize,
    slot: usize,
}

/// Where the rows of a chunk sit: row `i` is token `tokens[i]` at position
/// `positions[i]`, its keys and values go to cache slot `slots[i]`, and it
/// attends the positions cached before the chunk (`old_slots`) that it
/// does not evict, then rows `0..=i` of the chunk.
#[derive(Debug, Clone, Default)]
struct ChunkRows {
    tokens: Vec<u32>,      // (T) tokens, out-of-vocabulary ids read as 0
    positions: Vec<usize>, // (T) absolute position of each row
    slots: Vec<usize>,     // (T) cache slot of each row
    old_slots: Vec<usize>, // cache slots before the chunk, chronological
}

impl ChunkRows {
    /// Places `tokens` at the next positions of `cache`, pushing them into
    /// it, after noting the slots of the positions it held before.
    fn place(&mut self, cache: &mut KvCache, tokens: &[u32], vocab_size: usize) {
        let start = cache.next_position();
        self.old_slots.clear();
        self.old_slots.extend((0..cache.len).map(|t| cache.slot(t)));
        self.tokens.clear();
        self.tokens.extend(
            tokens
                .iter()
                .map(|&t| if (t as usize) < vocab_size { t } else { 0 }),
        );
        cache.step_evictions = 0;
        self.positions.clear();
        self.slots.clear();
        for (i, &t) in self.tokens.iter().enumerate() {
            self.positions.push(start + i);
            self.slots.push(cache.push(t, start + i));
        }
    }
}

/// [`rmsnorm`] of each row of `x: [t × dim]` into `out: [t × dim]`.
#[inline(always)]
fn rmsnorm_rows(out: &mut [f32], x: &[f32], weight: &[f32], dim: usize, eps: f32) {
    for (o, x) in out.chunks_exact_mut(dim).zip(x.chunks_exact(dim)) {
        rmsnorm(o, x, weight, eps);
    }
}

/// The residual connection: `x += update`, both `[t × dim]`.
#[inline(always)]
fn residual_add(x: &mut [f32], update: &[f32]) {
    x.iter_mut().zip(update).for_each(|(x, d)| *x += d);
}

/// The SwiGLU non-linearity, `gate = silu(gate) · up`, both `[t × ffn_dim]`.
#[inline(always)]
fn swiglu(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

/// Injects `fault` into each row of `out: [t × dim]` whose position
/// (`positions[i]`) it is for.
#[inline(always)]
fn fault_rows(
    fault: Option<Fault>,
    l: usize,
    stage: Stage,
    out: &mut [f32],
    positions: &[usize],
    c: &Config,
) {
    for (out, &pos) in out.chunks_exact_mut(c.dim).zip(positions) {
        if let Some(f) = fault.filter(|f| f.position.is_none_or(|p| p == pos)) {
            f.apply(l, stage, out, c.head_dim);
        }
    }
}

/// The attention block of the one position of [`Llama::forward`] in layer
/// `l`: `x += W_o · attention(rope(W_q · norm(x)))` over the cached
/// positions, the position's own rotated key and value written to the
/// cache first.
///
/// Shapes (`kv_dim = n_kv_heads · head_dim`):
/// - `s.x: [dim]`, the residual stream, read and updated;
/// - `s.xb: [dim]`, the normed input, then the heads' outputs
///   `[n_heads × head_dim]`;
/// - `s.qkv: [dim + 2·kv_dim]`, `[q | k | v]`: q `[n_heads × head_dim]`,
///   k and v `[n_kv_heads × head_dim]`;
/// - `s.att: [n_heads × capacity]`, see [`attention_heads`];
/// - `s.xb2: [dim]`, the output projection;
/// - k cache, v cache: `[capacity × kv_dim]` per layer; the position
///   writes slot `row.slot`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn attention_block<C: TraceConfig>(
    tracer: &mut ModelTracer<C>,
    c: &Config,
    lw: &LayerWeights,
    l: usize,
    s: &mut RunState,
    cache: &mut KvCache,
    row: Row,
    fault: Option<Fault>,
    products: Products<'_>,
) {
    let (dim, kv_dim, hd) = (c.dim, c.kv_dim(), c.head_dim);
    // attention rmsnorm
    rmsnorm(&mut s.xb, &s.x, &lw.attn_norm, c.rms_eps);
    traced!(C, tracer.activation(l, Stage::PostNorm, &s.xb));

    // q, k, v projections into one buffer [q | k | v]
    let qkv = [&lw.attn_q, &lw.attn_k, &lw.attn_v];
    let mut xb = Input::new(&s.xb, &mut s.xq, products);
    project(tracer, BrickId::QkvProjection, l, qkv, &mut xb, &mut s.qkv);

    // RoPE relative positional encoding on q and k
    let (q, kv) = s.qkv.split_at_mut(dim);
    rope(q, hd, &s.rope_freq, row.pos);
    rope(&mut kv[..kv_dim], hd, &s.rope_freq, row.pos);

    // write k, v of this position into the cache
    let (k, v) = kv.split_at(kv_dim);
    cache.store(l, row.slot, k, v);

    // grouped-query attention over the cached positions, into xb
    attention_heads(
        tracer,
        c,
        l,
        row.pos,
        q,
        cache,
        &s.slots,
        &mut s.scores,
        &mut s.att,
        &mut s.xb,
        products.pool,
    );

    // output projection
    let mut xb = Input::new(&s.xb, &mut s.xq, products);
    let wo = [&lw.attn_output];
    project(tracer, BrickId::AttentionOutput, l, wo, &mut xb, &mut s.xb2);
    if let Some(f) = fault {
        f.apply(l, Stage::PostAttn, &mut s.xb2, hd);
    }
    traced!(C, tracer.activation(l, Stage::PostAttn, &s.xb2));

    // residual connection (its ratio is recorded after the second)
    residual_add(&mut s.x, &s.xb2);
}

/// Grouped-query attention of one position at `pos` in layer `l`, one KV
/// group at a time: head `h` of `q: [n_heads × head_dim]` against the keys of
/// kv head `h / (n_heads / n_kv_heads)` of the `n = cache.len()` cached
/// positions, scored in slot order into `scores[h·stride..]`
/// (`scores: [n_heads × stride]`, `stride` whole key panels of the
/// capacity), scaled by `1/√head_dim`, then taken in chronological order
/// (`slots`: the slot of each cached position, oldest first) and
/// softmaxed into `att[h·capacity..][..n]` (`att: [n_heads × capacity]`),
/// then the values summed with those weights, in the same order, into
/// head `h` of `out: [n_heads × head_dim]` (the heads of a group in one
/// pass over its values).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
#[cfg_attr(model_tracer_no_hooks, allow(unused_variables))]
fn attention_heads<C: TraceConfig>(
    tracer: &mut ModelTracer<C>,
    c: &Config,
    l: usize,
    pos: usize,
    q: &[f32],
    cache: &KvCache,
    slots: &[usize],
    scores: &mut [f32],
    att: &mut [f32],
    out: &mut [f32],
    pool: &Pool,
) {
    let args = (c, l, q, cache, slots);
    match &cache.data {
        KvData::F32 { key, value } => attend_groups(args, key, value, scores, att, out, pool),
        KvData::F16 { key, value } => attend_groups(args, key, value, scores, att, out, pool),
    }
    let (cap, n_ctx) = (cache.capacity, cache.len);
    for h in 0..c.n_heads {
        traced!(
            C,
            tracer.attention(l, h, pos, &att[h * cap..h * cap + n_ctx])
        );
    }
}

/// The arithmetic of [`attention_heads`] over a cache whose keys and
/// values are `key` and `value`.
#[inline(always)]
fn attend_groups<E: Element>(
    (c, l, q, cache, slots): (&Config, usize, &[f32], &KvCache, &[usize]),
    key: &[E::Lanes],
    value: &[E],
    scores: &mut [f32],
    att: &mut [f32],
    out: &mut [f32],
    pool: &Pool,
) {
    let (kv_dim, hd) = (c.kv_dim(), c.head_dim);
    let kv_mul = c.n_heads / c.n_kv_heads;
    let (cap, n_ctx) = (cache.capacity, cache.len);
    let stride = attention::panels(cap) * attention::PANEL;
    let layer_off = l * cap * kv_dim;
    let scale = 1.0 / (hd as f32).sqrt();
    // slot t holds the t-th oldest position (nothing evicted yet)
    let in_order = is_identity(&slots[..n_ctx]);
    // One KV group: the scores of each of its query heads over the cached
    // positions, their softmax, and the weighted sums of the values of
    // all its heads in one pass over them (each value fetched once), into
    // the group's rows of `scores`, `att` and `out`.
    let group = |kv: usize, scores: &mut [f32], att: &mut [f32], out: &mut [f32]| {
        let q = &q[kv * kv_mul * hd..(kv + 1) * kv_mul * hd];
        let panels = cache.key_panels::<E>(key, l, kv);
        attention::group_scores::<E>(q, kv_mul, (panels, hd, n_ctx), scale, scores, stride);
        for (scores, att) in scores.chunks_exact(stride).zip(att.chunks_exact_mut(cap)) {
            let att = &mut att[..n_ctx];
            if in_order {
                att.copy_from_slice(&scores[..n_ctx]);
            } else {
                for (a, &slot) in att.iter_mut().zip(slots) {
                    *a = scores[slot];
                }
            }
            softmax(att);
        }
        let values = &value[layer_off + kv * hd..];
        let value = |t: usize| &values[slots[t] * kv_dim..];
        attention::group_values(out, kv_mul, hd, att, cap, n_ctx, value);
    };
    let (gs, ga, go) = (kv_mul * stride, kv_mul * cap, kv_mul * hd);
    if pool.threads() > 1 && n_ctx * hd >= MIN_POOLED_ATTENTION {
        // The groups on the pool's threads, each computed as on one.
        let (sc, a, o) = (Out::new(scores), Out::new(att), Out::new(out));
        pool.run(c.n_kv_heads, &|kv| {
            // SAFETY: each group has its own rows of `scores`, `att` and
            // `out`.
            let (scores, att, out) = unsafe {
                (
                    sc.range(kv * gs..(kv + 1) * gs),
                    a.range(kv * ga..(kv + 1) * ga),
                    o.range(kv * go..(kv + 1) * go),
                )
            };
            group(kv, scores, att, out);
        });
    } else {
        for kv in 0..c.n_kv_heads {
            group(
                kv,
                &mut scores[kv * gs..(kv + 1) * gs],
                &mut att[kv * ga..(kv + 1) * ga],
                &mut out[kv * go..(kv + 1) * go],
            );
        }
    }
}

/// Whether `slots[t] == t` for every `t`: the cache's slots in
/// chronological order, so that scores in slot order are in that order.
fn is_identity(slots: &[usize]) -> bool {
    slots.iter().enumerate().all(|(t, &s)| s == t)
}

/// Cached positions times head width from which a decode step's attention
/// runs its heads on the pool's threads: below it, handing them over costs
/// more than it saves.
const MIN_POOLED_ATTENTION: usize = 64 * 64;

/// The feed-forward block of the one position of [`Llama::forward`] in
/// layer `l`: `x += W_down · (silu(W_gate · norm(x)) · W_up · norm(x))`.
///
/// Shapes: `s.x: [dim]`, read and updated; `s.xb: [dim]`, the normed
/// input; `s.hb: [ffn_dim]`, the gate, then the SwiGLU product;
/// `s.hb2: [ffn_dim]`, the up projection; `s.xb2: [dim]`, the down
/// projection.
#[inline(always)]
fn ffn_block<C: TraceConfig>(
    tracer: &mut ModelTracer<C>,
    c: &Config,
    lw: &LayerWeights,
    l: usize,
    s: &mut RunState,
    fault: Option<Fault>,
    products: Products<'_>,
) {
    // ffn rmsnorm
    rmsnorm(&mut s.xb, &s.x, &lw.ffn_norm, c.rms_eps);
    traced!(C, tracer.activation(l, Stage::PostFfnNorm, &s.xb));

    // gate and up projections, from one quantized input, in one job
    let mut xb = Input::new(&s.xb, &mut s.xq, products);
    let (gate, up) = (&lw.ffn_gate, &lw.ffn_up);
    xb.multiply_many([gate, up], [&mut s.hb, &mut s.hb2]);
    trace_product(tracer, BrickId::FfnGate, l, &[gate], xb.x, &s.hb);
    trace_product(tracer, BrickId::FfnUp, l, &[up], xb.x, &s.hb2);

    // SwiGLU non-linearity
    swiglu(&mut s.hb, &s.hb2);

    // down projection
    let mut hb = Input::new(&s.hb, &mut s.xq, products);
    project(
        tracer,
        BrickId::FfnDown,
        l,
        [&lw.ffn_down],
        &mut hb,
        &mut s.xb2,
    );
    if let Some(f) = fault {
        f.apply(l, Stage::PostFfn, &mut s.xb2, c.head_dim);
    }
    traced!(C, tracer.activation(l, Stage::PostFfn, &s.xb2));

    // residual connection
    residual_add(&mut s.x, &s.xb2);
}

/// The attention block of the `t` rows of a chunk in layer `l`: for each
/// row `i`, `x[i] += W_o · attention(rope(W_q · norm(x[i])))` over the
/// positions cached before the chunk that row `i` does not evict and rows
/// `0..=i` of the chunk (see [`attention_heads_rows`]). The chunk's keys
/// and values go to the cache after every row has read those it attends,
/// since a row's slot may hold a position an earlier row still reads.
///
/// Shapes (`kv_dim = n_kv_heads · head_dim`):
/// - `b.x: [t × dim]`, the residual streams, read and updated;
/// - `b.xb: [t × dim]`, the normed inputs, then the heads' outputs
///   `[t × n_heads·head_dim]`;
/// - `b.q: [t × n_heads·head_dim]`, `b.k, b.v: [t × kv_dim]`: the rotated
///   queries and keys, the values;
/// - `b.xb2: [t × dim]`, the output projection;
/// - `s.qkv: [dim + 2·kv_dim]`, a row's `[q | k | v]` for the tracer;
/// - k cache, v cache: `[capacity × kv_dim]` per layer; row `i` writes
///   slot `r.slots[i]`.
///
/// `attend` runs the attention of the rows (at `positions`) against the
/// cache and writes their keys and values to it: [`attend_chunk`] for the
/// one cache of a chunk, each sequence's segment against its own cache
/// in a forward over several sequences.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn attention_block_rows<C: TraceConfig>(
    tracer: &mut ModelTracer<C>,
    c: &Config,
    lw: &LayerWeights,
    l: usize,
    b: &mut ChunkState,
    s: &mut RunState,
    positions: &[usize],
    fault: Option<Fault>,
    products: Products<'_>,
    attend: impl FnOnce(&mut ModelTracer<C>, &mut ChunkState),
) {
    let (dim, kv_dim, hd) = (c.dim, c.kv_dim(), c.head_dim);
    // attention rmsnorm
    rmsnorm_rows(&mut b.xb, &b.x, &lw.attn_norm, dim, c.rms_eps);
    traced!(C, tracer.activation(l, Stage::PostNorm, &b.xb));

    // q, k, v projections, from one quantized chunk
    let mut xb = RowsInput::new(&b.xb, dim, &mut b.xq, products);
    xb.multiply(&lw.attn_q, &mut b.q);
    xb.multiply(&lw.attn_k, &mut b.k);
    xb.multiply(&lw.attn_v, &mut b.v);
    traced!(
        C,
        trace_rows(
            tracer,
            BrickId::QkvProjection,
            l,
            &[&lw.attn_q, &lw.attn_k, &lw.attn_v],
            &b.xb,
            &[&b.q, &b.k, &b.v],
            &mut s.qkv,
        )
    );

    // RoPE relative positional encoding on q and k, per row
    for ((q, k), &pos) in
        b.q.chunks_exact_mut(dim)
            .zip(b.k.chunks_exact_mut(kv_dim))
            .zip(positions)
    {
        rope(q, hd, &s.rope_freq, pos);
        rope(k, hd, &s.rope_freq, pos);
    }

    // causal grouped-query attention, into xb; then k, v of the rows
    // into the cache
    attend(tracer, b);

    // output projection
    let mut xb = RowsInput::new(&b.xb, dim, &mut b.xq, products);
    xb.multiply(&lw.attn_output, &mut b.xb2);
    traced!(
        C,
        trace_rows(
            tracer,
            BrickId::AttentionOutput,
            l,
            &[&lw.attn_output],
            &b.xb,
            &[&b.xb2],
            &mut s.qkv,
        )
    );
    fault_rows(fault, l, Stage::PostAttn, &mut b.xb2, positions, c);
    traced!(C, tracer.activation(l, Stage::PostAttn, &b.xb2));

    // residual connection (its ratio is recorded after the second)
    residual_add(&mut b.x, &b.xb2);
}

/// The attention of the rows of a chunk in layer `l` against `cache`
/// ([`attention_heads_rows`]), then their keys and values written to it,
/// in one step (a row's slot may hold a position an earlier row reads).
#[inline(always)]
fn attend_chunk<C: TraceConfig>(
    tracer: &mut ModelTracer<C>,
    c: &Config,
    l: usize,
    b: &mut ChunkState,
    cache: &mut KvCache,
    r: &ChunkRows,
    pool: &Pool,
) {
    let kv_dim = c.kv_dim();
    let rows = r.slots.len();
    attention_heads_rows(tracer, c, l, b, cache, 0, rows, &r.old_slots, false, pool);
    for (i, &slot) in r.slots.iter().enumerate() {
        let (k, v) = (&b.k[i * kv_dim..][..kv_dim], &b.v[i * kv_dim..][..kv_dim]);
        cache.store(l, slot, k, v);
    }
}

/// Causal grouped-query attention of the `t` rows of a chunk in layer
/// `l`, one KV group at a time. Row `i` attends, in chronological order,
/// the `old - evicted` positions cached before the chunk that it does not
/// evict (`old = r.old_slots.len()`, `evicted = (old + i + 1) −
/// capacity` when positive; the sinks stay), then rows `0..=i` of the
/// chunk: keys from the cache's panels (slots `0..old`, which are the
/// slots `r.old_slots` lists in chronological order) and from
/// `b.k: [t × kv_dim]` (put in panels of their own, `b.panels`, one set
/// per KV head), values likewise from the cache and `b.v: [t × kv_dim]`.
/// A row's scores against the cached keys go into a scratch row of
/// `b.scores` (slot order), against the chunk's keys after them, then in
/// chronological order into row `i` of head `h` of
/// `b.att: [n_heads × t × stride]` (`stride = cache.len()`), softmaxed;
/// the weighted sums of the values of a group's heads (one pass over the
/// values) go into those heads of each row of
/// `b.xb: [t × n_heads·head_dim]`. Every score and sum is that of the
/// one-position path ([`attention_heads`]), bit for bit.
///
/// On a pool of more than one thread the work is split into parts of a
/// KV group and a range of rows, each computed as on one thread into rows
/// of `b.att` and `b.xb` of its own: the results do not depend on the
/// threads. The tracer's hooks run afterwards on the calling thread, head
/// by head.
///
/// The rows are rows `first..first + rows` of the chunk's buffers (`b.q`,
/// `b.k`, `b.v`, `b.xb`): one sequence's segment of a forward over several
/// sequences ([`Llama::forward_batch`]), whose hook is then
/// `attention_segment` (`segment`), or the whole chunk.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
#[cfg_attr(model_tracer_no_hooks, allow(unused_variables))]
fn attention_heads_rows<C: TraceConfig>(
    tracer: &mut ModelTracer<C>,
    c: &Config,
    l: usize,
    b: &mut ChunkState,
    cache: &KvCache,
    first: usize,
    rows: usize,
    old_slots: &[usize],
    segment: bool,
    pool: &Pool,
) {
    let args = (c, l, cache, first, rows, old_slots);
    match &cache.data {
        KvData::F32 { key, value } => attend_rows(args, b, key, value, pool),
        KvData::F16 { key, value } => attend_rows(args, b, key, value, pool),
    }
    // row i of a head holds min(old_len + 1 + i, stride) weights
    let (head_att, old_len) = (rows * cache.len, old_slots.len());
    for h in 0..c.n_heads {
        traced!(C, {
            let att = &b.att[h * head_att..(h + 1) * head_att];
            if segment {
                tracer.attention_segment(l, h, first, rows, att, old_len + 1);
            } else {
                tracer.attention_rows(l, h, att, old_len + 1);
            }
        });
    }
}

/// The arithmetic of [`attention_heads_rows`] over a cache whose keys and
/// values are `key` and `value`: the chunk's own keys and values are
/// rounded to the cache's element type first, as caching them would.
#[inline(always)]
fn attend_rows<E: Element>(
    (c, l, cache, first, rows, old_slots): (&Config, usize, &KvCache, usize, usize, &[usize]),
    b: &mut ChunkState,
    key: &[E::Lanes],
    value: &[E],
    pool: &Pool,
) {
    let (dim, kv_dim, hd) = (c.dim, c.kv_dim(), c.head_dim);
    let kv_mul = c.n_heads / c.n_kv_heads;
    let (cap, sinks, stride) = (cache.capacity, cache.sinks, cache.len);
    let old_len = old_slots.len();
    let layer_off = l * cap * kv_dim;
    let span = first * kv_dim..(first + rows) * kv_dim;
    let q_rows = &b.q[first * dim..];
    let (k_rows, v_rows) = (&b.k[span.clone()], E::chunk(&b.v[span], &mut b.v16));
    let scale = 1.0 / (hd as f32).sqrt();
    let whole = |n: usize| attention::panels(n) * attention::PANEL;
    // The chunk's keys of each KV head in panels.
    b.panels.resize_with(c.n_kv_heads, Vec::new);
    for (kv, panels) in b.panels.iter_mut().enumerate() {
        attention::fill_panels::<E>(panels, k_rows, rows, kv_dim, kv * hd, hd);
    }
    // Parts: a KV group and a range of its rows each, a few per thread
    // (rows attend more positions the later they are, so parts that are
    // taken, not assigned, even the threads out).
    let threads = pool.threads();
    let row_parts = if threads > 1 && rows * (old_len + rows) * hd >= MIN_POOLED_ATTENTION {
        (4 * threads).div_ceil(c.n_kv_heads).clamp(1, rows)
    } else {
        1
    };
    let parts = c.n_kv_heads * row_parts;
    let scratch = whole(old_len) + whole(rows);
    b.scores.resize(parts * scratch, 0.0);
    let head_att = rows * stride;
    b.att.resize(c.n_heads * head_att, 0.0);
    let (att_out, xb_out, scores_out) = (
        Out::new(&mut b.att),
        Out::new(&mut b.xb),
        Out::new(&mut b.scores),
    );
    let chunk_panels = &b.panels;
    // slot t holds the t-th oldest position cached before the chunk
    let in_order = is_identity(old_slots);
    // positions of the cache before the chunk that row i evicts, and keeps
    let evicted = |i: usize| (old_len + i + 1).saturating_sub(cap);
    let part = |k: usize| {
        let kv = k / row_parts;
        let range = crate::pool::part(rows, row_parts, k % row_parts);
        // SAFETY: each part has its own scratch row of `b.scores`, the rows
        // `range` of the heads of group `kv` in `b.att` and those heads'
        // dimensions of the rows `range` in `b.xb`; `chunk_panels`, the
        // queries, keys, values and the cache are only read.
        let scores = unsafe { scores_out.range(k * scratch..(k + 1) * scratch) };
        let (old_scores, new_scores) = scores.split_at_mut(whole(old_len));
        let (old_panels, new_panels) = (cache.key_panels::<E>(key, l, kv), &chunk_panels[kv]);
        let att_row = |h: usize, i: usize, n: usize| {
            let at = h * head_att + i * stride;
            // SAFETY: as above (row `i` of `range`, head `h` of group `kv`).
            unsafe { att_out.range(at..at + n) }
        };
        for h in kv * kv_mul..(kv + 1) * kv_mul {
            for i in range.clone() {
                let q = &q_rows[i * dim + h * hd..][..hd];
                let (evicted, kept) = (evicted(i), old_len - evicted(i));
                attention::panel_scores::<E>(q, old_panels, hd, old_len, scale, old_scores);
                attention::panel_scores::<f32>(q, new_panels, hd, i + 1, scale, new_scores);
                let att = att_row(h, i, kept + i + 1);
                let (old, new) = att.split_at_mut(kept);
                if in_order && evicted == 0 {
                    old.copy_from_slice(&old_scores[..kept]);
                } else {
                    for (j, a) in old.iter_mut().enumerate() {
                        let t = if j < sinks { j } else { j + evicted };
                        *a = old_scores[old_slots[t]];
                    }
                }
                new.copy_from_slice(&new_scores[..i + 1]);
                softmax(att);
            }
        }
        let values = &value[layer_off + kv * hd..];
        let new_values = &v_rows[kv * hd..];
        for i in range {
            let (evicted, kept) = (evicted(i), old_len - evicted(i));
            let n = kept + i + 1;
            let at = (first + i) * dim + kv * kv_mul * hd;
            // SAFETY: as above.
            let out = unsafe { xb_out.range(at..at + kv_mul * hd) };
            let weights = |g: usize| -> &[f32] { att_row(kv * kv_mul + g, i, n) };
            attention::group_values_by(out, kv_mul, hd, weights, |j| {
                if j < kept {
                    let t = if j < sinks { j } else { j + evicted };
                    &values[old_slots[t] * kv_dim..]
                } else {
                    &new_values[(j - kept) * kv_dim..]
                }
            });
        }
    };
    pool.run(parts, &part);
}

/// The feed-forward block of the `t` rows of a chunk in layer `l`: for
/// each row `i`, `x[i] += W_down · (silu(W_gate · norm(x[i])) · W_up ·
/// norm(x[i]))`.
///
/// Shapes: `b.x: [t × dim]`, read and updated; `b.xb: [t × dim]`, the
/// normed inputs; `b.hb: [t × ffn_dim]`, the gates, then the SwiGLU
/// products; `b.hb2: [t × ffn_dim]`, the up projections;
/// `b.xb2: [t × dim]`, the down projections; `s.qkv`, scratch for the
/// tracer.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn ffn_block_rows<C: TraceConfig>(
    tracer: &mut ModelTracer<C>,
    c: &Config,
    lw: &LayerWeights,
    l: usize,
    b: &mut ChunkState,
    s: &mut RunState,
    positions: &[usize],
    fault: Option<Fault>,
    products: Products<'_>,
) {
    let dim = c.dim;
    // ffn rmsnorm
    rmsnorm_rows(&mut b.xb, &b.x, &lw.ffn_norm, dim, c.rms_eps);
    traced!(C, tracer.activation(l, Stage::PostFfnNorm, &b.xb));

    // gate and up projections, from one quantized chunk
    let mut xb = RowsInput::new(&b.xb, dim, &mut b.xq, products);
    xb.multiply(&lw.ffn_gate, &mut b.hb);
    xb.multiply(&lw.ffn_up, &mut b.hb2);
    traced!(C, {
        let gate = [&lw.ffn_gate];
        trace_rows(
            tracer,
            BrickId::FfnGate,
            l,
            &gate,
            &b.xb,
            &[&b.hb],
            &mut s.qkv,
        );
        let up = [&lw.ffn_up];
        trace_rows(tracer, BrickId::FfnUp, l, &up, &b.xb, &[&b.hb2], &mut s.qkv);
    });

    // SwiGLU non-linearity
    swiglu(&mut b.hb, &b.hb2);

    // down projection
    let mut hb = RowsInput::new(&b.hb, c.ffn_dim, &mut b.xq, products);
    hb.multiply(&lw.ffn_down, &mut b.xb2);
    traced!(
        C,
        trace_rows(
            tracer,
            BrickId::FfnDown,
            l,
            &[&lw.ffn_down],
            &b.hb,
            &[&b.xb2],
            &mut s.qkv,
        )
    );
    fault_rows(fault, l, Stage::PostFfn, &mut b.xb2, positions, c);
    traced!(C, tracer.activation(l, Stage::PostFfn, &b.xb2));

    // residual connection
    residual_add(&mut b.x, &b.xb2);
}

/// The LM head of a chunk after the final norm (`b.xb: [t × dim]`): the
/// last row's logits into `s.logits: [vocab]`, and in turn those of each
/// row the tracer asks for into `b.logits: [vocab]`, each with its logit
/// lens (`lens`: the rows' hidden states are in `b.lens_hidden`); then the
/// KV cache state of each row, as its one-position forward records it.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
#[cfg_attr(model_tracer_no_hooks, allow(unused_variables))]
fn lm_head_rows<C: TraceConfig>(
    tracer: &mut ModelTracer<C>,
    c: &Config,
    w: &Weights,
    b: &mut ChunkState,
    s: &mut RunState,
    cache: &KvCache,
    r: &ChunkRows,
    steps: &mut usize,
    lens: bool,
    products: Products<'_>,
) {
    let (dim, n_layers) = (c.dim, c.n_layers);
    let rows = r.slots.len();
    for i in 0..rows {
        let last = i + 1 == rows;
        let mut traced_logits = false;
        traced!(C, traced_logits = tracer.wants_logits(i));
        traced!(C, tracer.focus_row(i));
        if last || traced_logits {
            let out = if last { &mut s.logits } else { &mut b.logits };
            out.resize(c.vocab_size, 0.0);
            let mut xb = Input::new(&b.xb[i * dim..(i + 1) * dim], &mut s.xq, products);
            project(tracer, BrickId::LmHead, 0, [&w.output], &mut xb, out);
            if lens {
                let hidden = &b.lens_hidden[i * n_layers * dim..(i + 1) * n_layers * dim];
                traced!(
                    C,
                    logit_lens(
                        tracer,
                        c,
                        w,
                        hidden,
                        &mut s.lens_x,
                        &mut s.lens_scratch,
                        &s.lens_layers,
                        out,
                        products.exact
                    )
                );
            }
            traced!(C, tracer.final_logits(out));
        }
        traced!(
            C,
            tracer.kv_state(|| cache.row_state(
                *steps + i,
                n_layers,
                r.old_slots.len(),
                i,
                r.positions[i]
            ))
        );
    }
    *steps += rows;
}

impl<C: TraceConfig> Llama<C> {
    /// Builds a decoder from weights, with a KV cache of `cache` positions.
    pub fn new(
        config: Config,
        weights: Weights,
        tokenizer: Option<Tokenizer>,
        cache: KvCacheOptions,
        trace: C,
    ) -> Result<Self, ModelError> {
        Self::from_shared(
            Arc::new(weights),
            config,
            tokenizer.map(Arc::new),
            cache,
            trace,
        )
    }

    /// Builds a decoder over weights (and a tokenizer) shared with other
    /// models, of this trace config or another: nothing is copied. `cache`
    /// sizes the cache of the model's own conversation (the one-sequence
    /// API); each [`Sequence`] has its own.
    pub fn from_shared(
        weights: Arc<Weights>,
        config: Config,
        tokenizer: Option<Arc<Tokenizer>>,
        cache: KvCacheOptions,
        trace: C,
    ) -> Result<Self, ModelError> {
        config.validate()?;
        check_shapes(&config, &weights)?;
        let capacity = cache.capacity.clamp(2, config.context_len);
        let cache = KvCache::new(
            config.n_layers,
            config.n_kv_heads,
            config.head_dim,
            KvCacheOptions { capacity, ..cache },
        );
        let state = RunState::new(&config, cache.capacity());
        Ok(Self {
            tracer: ModelTracer::new(trace),
            config,
            weights,
            tokenizer: SharedTokenizer::new(tokenizer),
            cache,
            state,
            fault: None,
            exact: false,
            pool: Pool::default(),
            steps: 0,
            chunk: ChunkState::default(),
            rows: ChunkRows::default(),
            prefill_chunk: DEFAULT_PREFILL_CHUNK,
            batch: batch::BatchRows::default(),
            next_sequence: 0,
        })
    }

    /// A new handle on the weights, to build another model over them
    /// ([`from_shared`](Self::from_shared)).
    pub fn shared_weights(&self) -> Arc<Weights> {
        Arc::clone(&self.weights)
    }

    /// The tokenizer, when the model file carries a vocabulary.
    pub fn tokenizer(&self) -> Option<&Tokenizer> {
        self.tokenizer.as_ref()
    }

    /// Loads a GGUF file (llama architecture) with its tokenizer.
    pub fn from_gguf(
        path: impl AsRef<Path>,
        cache: Option<KvCacheOptions>,
        trace: C,
    ) -> Result<Self, ModelError> {
        let gguf = GgufFile::open(path)?;
        let config = Config::from_gguf(&gguf)?;
        let weights = Weights::from_gguf(&gguf, &config)?;
        let tokenizer = Tokenizer::from_gguf(&gguf)?;
        let cache = cache.unwrap_or(KvCacheOptions {
            capacity: config.context_len.min(4096),
            sinks: 4,
            kv_type: KvType::F32,
        });
        Self::new(config, weights, Some(tokenizer), cache, trace)
    }

    /// The tracer.
    pub fn tracer(&self) -> &ModelTracer<C> {
        &self.tracer
    }

    /// The tracer, to change its options or clear it.
    pub fn tracer_mut(&mut self) -> &mut ModelTracer<C> {
        &mut self.tracer
    }

    /// The KV cache.
    pub fn cache(&self) -> &KvCache {
        &self.cache
    }

    /// Injects `fault` into every following forward pass (`None` removes it).
    pub fn set_fault(&mut self, fault: Option<Fault>) {
        self.fault = fault;
    }

    /// Turns on what-if tracing: every linear layer (LM head included) gets
    /// copies of its reference weights re-quantized to each of `targets`,
    /// and every forward pass records, per brick and layer, how far the
    /// re-quantized output is from the reference one (quantization-error
    /// tracing must be on). An empty list turns it off and frees the copies.
    ///
    /// With a GGUF file the reference is the file's own weights, so the
    /// table shows what moving each brick to another type would cost; with
    /// a synthetic model it is the f32 master weights. Weights shared with
    /// other models ([`from_shared`](Self::from_shared)) are copied for
    /// this model first (`Arc::make_mut`): the others keep theirs.
    pub fn set_what_if(&mut self, targets: &[GgmlType]) -> Result<(), ModelError> {
        if targets.is_empty() && self.weights.output.what_if.is_empty() {
            let none = |l: &LayerWeights| l.attn_q.what_if.is_empty();
            if self.weights.layers.iter().all(none) {
                return Ok(());
            }
        }
        for &t in targets {
            if let Some(l) = self
                .weights
                .layers
                .iter()
                .flat_map(|l| {
                    [
                        &l.attn_q,
                        &l.attn_k,
                        &l.attn_v,
                        &l.attn_output,
                        &l.ffn_gate,
                        &l.ffn_up,
                        &l.ffn_down,
                    ]
                })
                .chain(std::iter::once(&self.weights.output))
                .find(|l| l.weight.cols() % t.block_len() != 0)
            {
                return Err(ModelError::Config(format!(
                    "{t} stores rows in blocks of {} weights; this model has rows of {}",
                    t.block_len(),
                    l.weight.cols()
                )));
            }
        }
        // Weights shared with other models are copied for this one first.
        for (i, l) in Arc::make_mut(&mut self.weights).linears_mut().enumerate() {
            l.build_what_if(targets)
                .map_err(|error| ModelError::Quant {
                    tensor: format!("what-if copy {i}"),
                    error,
                })?;
        }
        Ok(())
    }

    /// Runs every matmul on the f32 reference path (master or dequantized
    /// weights times unquantized activations) instead of the quantized one.
    /// The cache is cleared: positions computed one way must not be mixed
    /// with the other.
    pub fn set_exact(&mut self, exact: bool) {
        self.exact = exact;
        self.cache.clear();
    }

    /// Runs the products of every following forward on `threads` threads
    /// (this one and `threads - 1` workers that live as long as the model;
    /// 1, the default, runs everything on the calling thread): the
    /// matmuls split by output rows, or by the rows of a chunk, each row
    /// computed as on one thread, so logits, tokens, the KV cache and every
    /// trace record are the same to the bit for any number. The tracer's
    /// hooks, the norms and the attention run on the calling thread.
    pub fn set_threads(&mut self, threads: usize) {
        if threads.clamp(1, crate::pool::MAX_THREADS) != self.pool.threads() {
            self.pool = Pool::new(threads);
        }
    }

    /// Threads the products run on ([`set_threads`](Self::set_threads)).
    pub fn threads(&self) -> usize {
        self.pool.threads()
    }

    /// Forgets the conversation: call between independent conversations.
    pub fn clear_kv_cache(&mut self) {
        self.cache.clear();
    }

    /// Text of a token for display: the tokenizer's piece, or `<id>`.
    pub fn token_text(&self, id: u32) -> String {
        self.tokenizer
            .as_ref()
            .and_then(|t| t.token_str(id))
            .unwrap_or_else(|| format!("<{id}>"))
    }

    /// Runs one token at the next position of the cache and returns the
    /// logits of the next token. A token id outside the vocabulary is read
    /// as token 0.
    pub fn forward(&mut self, token: u32) -> &[f32] {
        let Llama {
            config: c,
            weights: w,
            cache,
            state: s,
            tracer,
            fault,
            exact,
            pool,
            steps,
            ..
        } = self;
        let products = Products {
            exact: *exact,
            pool,
        };
        let token = if (token as usize) < c.vocab_size {
            token
        } else {
            0
        };
        // the position's place: the next position, in a slot of the cache
        let pos = cache.next_position();
        cache.step_evictions = 0;
        let row = Row {
            pos,
            slot: cache.push(token, pos),
        };
        cache.chronological_slots(&mut s.slots);
        let fault = fault.filter(|f| f.position.is_none_or(|p| p == pos));
        traced!(C, tracer.begin_forward(pos));
        traced!(C, tracer.input_token(token));

        // token embedding
        w.token_embd.dequantize_row(token as usize, &mut s.x);
        traced!(C, tracer.activation(0, Stage::Embedding, &s.x));

        for (l, lw) in w.layers.iter().enumerate() {
            traced!(C, tracer.activation(l, Stage::Input, &s.x));
            // x += attention(norm(x)), this position's key and value cached
            attention_block(tracer, c, lw, l, s, cache, row, fault, products);
            // x += ffn(norm(x))
            ffn_block(tracer, c, lw, l, s, fault, products);
            // The layer's residual ratio from the norms of its input and of
            // both updates, already summarised by the activation hooks.
            traced!(C, tracer.residual_from_stages(l));
            traced!(C, tracer.activation(l, Stage::Output, &s.x));
            // hidden state for the logit lens
            traced!(
                C,
                if tracer.wants_logit_lens() {
                    s.lens_hidden[l * c.dim..(l + 1) * c.dim].copy_from_slice(&s.x);
                }
            );
        }

        // final rmsnorm
        rmsnorm(&mut s.xb, &s.x, &w.output_norm, c.rms_eps);
        traced!(C, tracer.activation(0, Stage::FinalNorm, &s.xb));

        // classifier into logits
        let mut xb = Input::new(&s.xb, &mut s.xq, products);
        project(
            tracer,
            BrickId::LmHead,
            0,
            [&w.output],
            &mut xb,
            &mut s.logits,
        );

        // logit lens: what the model would predict if it stopped after
        // each layer, all layers in one product
        traced!(
            C,
            if tracer.wants_logit_lens() {
                logit_lens(
                    tracer,
                    c,
                    w,
                    &s.lens_hidden,
                    &mut s.lens_x,
                    &mut s.lens_scratch,
                    &s.lens_layers,
                    &s.logits,
                    products.exact,
                );
            }
        );
        traced!(C, tracer.final_logits(&s.logits));

        // KV cache bookkeeping
        let step = *steps;
        *steps += 1;
        traced!(
            C,
            tracer.kv_state(|| cache.step_state(step, c.n_layers, pos))
        );
        traced!(C, tracer.end_forward());
        &s.logits
    }

    /// Runs `prompt` through the model, reusing the longest cached prefix
    /// of the conversation (when the cache still holds it from position 0),
    /// and returns how many positions were reused and computed.
    pub fn prefill(&mut self, prompt: &[u32]) -> (usize, usize) {
        let common = self
            .cache
            .tokens()
            .zip(prompt)
            .take_while(|(a, b)| a == *b)
            .count();
        // The last prompt token is always run: its logits are needed.
        let keep = common.min(prompt.len().saturating_sub(1));
        if !self.cache.truncate(keep) {
            self.cache.clear();
        }
        let reused = self.cache.len();
        self.forward_chunks(&prompt[reused..]);
        (reused, prompt.len() - reused)
    }

    /// Positions [`prefill`](Self::prefill) runs through the model at once
    /// (at least 1, which runs the prompt one [`forward`](Self::forward)
    /// at a time; default [`DEFAULT_PREFILL_CHUNK`]).
    pub fn set_prefill_chunk(&mut self, positions: usize) {
        self.prefill_chunk = positions.max(1);
    }

    /// Positions a prefill runs through the model at once.
    pub fn prefill_chunk(&self) -> usize {
        self.prefill_chunk
    }

    /// Runs `tokens` at the next positions of the cache, in chunks of up to
    /// [`prefill_chunk`](Self::prefill_chunk) positions, and returns the
    /// logits of the last one (the last forward's when `tokens` is empty).
    ///
    /// The cache, the logits and every hidden state are bit for bit those
    /// of [`forward`](Self::forward) of each token in turn: every row of a
    /// chunk goes through the same f32 operations in the same order
    /// (products of a chunk by `QMatrix::matmul`, equal to `matvec` of each
    /// row), and attends the positions its one-position forward would (a
    /// chunk is at most `capacity - sinks` positions long, so that no row
    /// evicts the keys of a row before it). Only the last position goes
    /// through the final norm and the LM head.
    pub fn forward_chunks(&mut self, tokens: &[u32]) -> &[f32] {
        let n = self.prefill_chunk.min(self.cache.chunk_room());
        if n <= 1 {
            for &t in tokens {
                self.forward(t);
            }
        } else {
            for part in tokens.chunks(n) {
                self.forward_rows(part);
            }
        }
        &self.state.logits
    }

    /// One forward over the positions of `tokens` (at most the cache's
    /// chunk room): the prefill counterpart of [`forward`](Self::forward),
    /// in the same order of operations for each row, with the tracer's
    /// hooks taking the rows of the chunk at once.
    fn forward_rows(&mut self, tokens: &[u32]) {
        let Llama {
            config: c,
            weights: w,
            cache,
            state: s,
            chunk: b,
            rows: r,
            tracer,
            fault,
            exact,
            pool,
            steps,
            ..
        } = self;
        let (products, fault) = (
            Products {
                exact: *exact,
                pool,
            },
            *fault,
        );
        let rows = tokens.len();
        if rows == 0 {
            return;
        }
        let (dim, n_layers) = (c.dim, c.n_layers);
        // the rows' places: the next positions, in slots of the cache
        r.place(cache, tokens, c.vocab_size);
        // attention row i spans min(old_len + i + 1, cap) positions
        b.resize(c, rows, cache.len);
        traced!(C, tracer.begin_forward_rows(r.positions[0], rows));
        traced!(C, tracer.input_tokens(&r.tokens));
        // rows whose hidden states go through the logit lens
        let mut lens = false;
        traced!(C, lens = tracer.wants_logit_lens());
        if lens {
            b.lens_hidden.resize(rows * n_layers * dim, 0.0);
        }

        // token embeddings
        for (x, &t) in b.x.chunks_exact_mut(dim).zip(&r.tokens) {
            w.token_embd.dequantize_row(t as usize, x);
        }
        traced!(C, tracer.activation(0, Stage::Embedding, &b.x));

        for (l, lw) in w.layers.iter().enumerate() {
            traced!(C, tracer.activation(l, Stage::Input, &b.x));
            // x[i] += attention(norm(x[i])), the chunk's keys and values cached
            let attend = |t: &mut ModelTracer<C>, b: &mut ChunkState| {
                attend_chunk(t, c, l, b, cache, r, pool);
            };
            attention_block_rows(
                tracer,
                c,
                lw,
                l,
                b,
                s,
                &r.positions,
                fault,
                products,
                attend,
            );
            // x[i] += ffn(norm(x[i]))
            ffn_block_rows(tracer, c, lw, l, b, s, &r.positions, fault, products);
            // The layer's residual ratio from the norms of its input and of
            // both updates, already summarised by the activation hooks.
            traced!(C, tracer.residual_from_stages(l));
            traced!(C, tracer.activation(l, Stage::Output, &b.x));
            // hidden states for the logit lens, (row, layer, dim)
            if lens {
                for (i, x) in b.x.chunks_exact(dim).enumerate() {
                    let at = (i * n_layers + l) * dim;
                    b.lens_hidden[at..at + dim].copy_from_slice(x);
                }
            }
        }

        // final rmsnorm
        rmsnorm_rows(&mut b.xb, &b.x, &w.output_norm, dim, c.rms_eps);
        traced!(C, tracer.activation(0, Stage::FinalNorm, &b.xb));

        // classifier into logits: the last row, and the rows the tracer
        // asks for; then the KV cache state of each row
        lm_head_rows(tracer, c, w, b, s, cache, r, steps, lens, products);
        traced!(C, tracer.end_forward());
    }

    /// Greedy generation: runs the prompt (see [`prefill`](Self::prefill)),
    /// then appends the argmax token until `max_new_tokens` or an
    /// end-of-generation token. `on_token` sees each new token.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        max_new_tokens: usize,
        mut on_token: impl FnMut(u32),
    ) -> Generation {
        let mut out = Generation::default();
        if prompt.is_empty() || max_new_tokens == 0 {
            return out;
        }
        let (reused, computed) = self.prefill(prompt);
        out.reused_prompt_positions = reused;
        out.computed_prompt_positions = computed;
        let mut next = model_tracer::stats::argmax(&self.state.logits).unwrap_or(0) as u32;
        loop {
            out.tokens.push(next);
            on_token(next);
            let end = self.tokenizer.as_ref().is_some_and(|t| t.is_eog(next));
            if end || out.tokens.len() >= max_new_tokens {
                break;
            }
            let logits = self.forward(next);
            next = model_tracer::stats::argmax(logits).unwrap_or(0) as u32;
        }
        out
    }

    /// The logits of the last forward pass.
    pub fn logits(&self) -> &[f32] {
        &self.state.logits
    }
}

fn check_shapes(c: &Config, w: &Weights) -> Result<(), ModelError> {
    let check = |name: &str, m: &QMatrix, rows: usize, cols: usize| {
        if m.rows() == rows && m.cols() == cols {
            Ok(())
        } else {
            Err(ModelError::Shape {
                tensor: name.to_string(),
                expected: vec![cols as u64, rows as u64],
                found: vec![m.cols() as u64, m.rows() as u64],
            })
        }
    };
    let vec_len = |name: &str, v: &[f32]| {
        if v.len() == c.dim {
            Ok(())
        } else {
            Err(ModelError::Shape {
                tensor: name.to_string(),
                expected: vec![c.dim as u64],
                found: vec![v.len() as u64],
            })
        }
    };
    if w.layers.len() != c.n_layers {
        return Err(ModelError::Config(format!(
            "{} layers of weights for {} layers",
            w.layers.len(),
            c.n_layers
        )));
    }
    check("token_embd.weight", &w.token_embd, c.vocab_size, c.dim)?;
    check("output.weight", &w.output.weight, c.vocab_size, c.dim)?;
    vec_len("output_norm.weight", &w.output_norm)?;
    let kv = c.kv_dim();
    for (i, l) in w.layers.iter().enumerate() {
        let n = |t: &str| format!("blk.{i}.{t}.weight");
        vec_len(&n("attn_norm"), &l.attn_norm)?;
        vec_len(&n("ffn_norm"), &l.ffn_norm)?;
        check(&n("attn_q"), &l.attn_q.weight, c.dim, c.dim)?;
        check(&n("attn_k"), &l.attn_k.weight, kv, c.dim)?;
        check(&n("attn_v"), &l.attn_v.weight, kv, c.dim)?;
        check(&n("attn_output"), &l.attn_output.weight, c.dim, c.dim)?;
        check(&n("ffn_gate"), &l.ffn_gate.weight, c.ffn_dim, c.dim)?;
        check(&n("ffn_up"), &l.ffn_up.weight, c.ffn_dim, c.dim)?;
        check(&n("ffn_down"), &l.ffn_down.weight, c.dim, c.ffn_dim)?;
    }
    Ok(())
}

fn load_matrix(
    gguf: &GgufFile,
    name: &str,
    rows: usize,
    cols: usize,
) -> Result<QMatrix, ModelError> {
    let (info, bytes) = gguf
        .tensor_data(name)
        .ok_or_else(|| ModelError::MissingTensor(name.to_string()))?;
    if info.dims.len() != 2 || info.row_len() != cols || info.rows() != rows {
        return Err(ModelError::Shape {
            tensor: name.to_string(),
            expected: vec![cols as u64, rows as u64],
            found: info.dims.clone(),
        });
    }
    QMatrix::from_bytes(info.ggml_type, rows, cols, bytes.to_vec()).map_err(|error| {
        ModelError::Quant {
            tensor: name.to_string(),
            error,
        }
    })
}

fn load_vector(gguf: &GgufFile, name: &str, len: usize) -> Result<Vec<f32>, ModelError> {
    let m = load_matrix_1d(gguf, name, len)?;
    let mut out = vec![0.0; len];
    m.dequantize_row(0, &mut out);
    Ok(out)
}

fn load_matrix_1d(gguf: &GgufFile, name: &str, len: usize) -> Result<QMatrix, ModelError> {
    let (info, bytes) = gguf
        .tensor_data(name)
        .ok_or_else(|| ModelError::MissingTensor(name.to_string()))?;
    if info.n_elements() != len {
        return Err(ModelError::Shape {
            tensor: name.to_string(),
            expected: vec![len as u64],
            found: info.dims.clone(),
        });
    }
    QMatrix::from_bytes(info.ggml_type, 1, len, bytes.to_vec()).map_err(|error| ModelError::Quant {
        tensor: name.to_string(),
        error,
    })
}

impl Weights {
    /// Reads the weights of a model of shape `c` from a GGUF file: the
    /// `token_embd`, `blk.N.*`, `output_norm` and (when present, else tied
    /// to the embedding) `output` tensors, checked against the shape.
    pub fn from_gguf(gguf: &GgufFile, c: &Config) -> Result<Self, ModelError> {
        load_weights(gguf, c)
    }
}

fn load_weights(gguf: &GgufFile, c: &Config) -> Result<Weights, ModelError> {
    let linear = |name: &str, rows: usize, cols: usize| {
        Linear::new(load_matrix(gguf, name, rows, cols)?, name)
    };
    let token_embd = load_matrix(gguf, "token_embd.weight", c.vocab_size, c.dim)?;
    let output = if gguf.tensor("output.weight").is_some() {
        linear("output.weight", c.vocab_size, c.dim)?
    } else {
        Linear::new(token_embd.clone(), "token_embd.weight")?
    };
    let kv = c.kv_dim();
    let layers = (0..c.n_layers)
        .map(|i| {
            let n = |t: &str| format!("blk.{i}.{t}.weight");
            Ok(LayerWeights {
                attn_norm: load_vector(gguf, &n("attn_norm"), c.dim)?,
                attn_q: linear(&n("attn_q"), c.dim, c.dim)?,
                attn_k: linear(&n("attn_k"), kv, c.dim)?,
                attn_v: linear(&n("attn_v"), kv, c.dim)?,
                attn_output: linear(&n("attn_output"), c.dim, c.dim)?,
                ffn_norm: load_vector(gguf, &n("ffn_norm"), c.dim)?,
                ffn_gate: linear(&n("ffn_gate"), c.ffn_dim, c.dim)?,
                ffn_up: linear(&n("ffn_up"), c.ffn_dim, c.dim)?,
                ffn_down: linear(&n("ffn_down"), c.dim, c.ffn_dim)?,
            })
        })
        .collect::<Result<Vec<_>, ModelError>>()?;
    Ok(Weights {
        token_embd,
        layers,
        output_norm: load_vector(gguf, "output_norm.weight", c.dim)?,
        output,
    })
}

/// Deterministic pseudo-random numbers (SplitMix64) for synthetic weights.
/// A seed must always give the same weights: keep the sequence unchanged.
#[derive(Debug, Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator from `seed`.
    fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[-1, 1)`.
    fn next_signed(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 23) as f32) - 1.0
    }
}

/// Weights drawn from a seed: the same code path as a real model, offline.
///
/// Each matrix is drawn in f32 (uniform, scaled by `1/sqrt(fan_in)` so that
/// activations keep their size through the layers), kept as the master
/// weights of the f32 reference path, and quantized to `weight_type`.
pub fn synthetic_weights(
    c: &Config,
    weight_type: GgmlType,
    seed: u64,
) -> Result<Weights, ModelError> {
    let mut rng = SplitMix64::new(seed);
    let mut draw = |rows: usize, cols: usize, scale: f32| -> Vec<f32> {
        (0..rows * cols)
            .map(|_| rng.next_signed() * scale)
            .collect()
    };
    let linear = |name: &str,
                  rows: usize,
                  cols: usize,
                  draw: &mut dyn FnMut(usize, usize, f32) -> Vec<f32>| {
        let scale = (3.0 / cols as f32).sqrt();
        let master = draw(rows, cols, scale);
        let q = QMatrix::from_f32(weight_type, rows, cols, &master).map_err(|error| {
            ModelError::Quant {
                tensor: name.to_string(),
                error,
            }
        })?;
        let m = QMatrix::from_f32(GgmlType::F32, rows, cols, &master).map_err(|error| {
            ModelError::Quant {
                tensor: name.to_string(),
                error,
            }
        })?;
        let mut l = Linear::new(q, name)?;
        l.master = Some(m);
        Ok::<Linear, ModelError>(l)
    };
    let embd = draw(c.vocab_size, c.dim, 1.0);
    let token_embd =
        QMatrix::from_f32(GgmlType::Q8_0, c.vocab_size, c.dim, &embd).map_err(|error| {
            ModelError::Quant {
                tensor: "token_embd.weight".into(),
                error,
            }
        })?;
    let kv = c.kv_dim();
    let mut layers = Vec::with_capacity(c.n_layers);
    for i in 0..c.n_layers {
        let n = |t: &str| format!("blk.{i}.{t}.weight");
        layers.push(LayerWeights {
            attn_norm: vec![1.0; c.dim],
            attn_q: linear(&n("attn_q"), c.dim, c.dim, &mut draw)?,
            attn_k: linear(&n("attn_k"), kv, c.dim, &mut draw)?,
            attn_v: linear(&n("attn_v"), kv, c.dim, &mut draw)?,
            attn_output: linear(&n("attn_output"), c.dim, c.dim, &mut draw)?,
            ffn_norm: vec![1.0; c.dim],
            ffn_gate: linear(&n("ffn_gate"), c.ffn_dim, c.dim, &mut draw)?,
            ffn_up: linear(&n("ffn_up"), c.ffn_dim, c.dim, &mut draw)?,
            ffn_down: linear(&n("ffn_down"), c.dim, c.ffn_dim, &mut draw)?,
        });
    }
    let output = linear("output.weight", c.vocab_size, c.dim, &mut draw)?;
    Ok(Weights {
        token_embd,
        layers,
        output_norm: vec![1.0; c.dim],
        output,
    })
}

impl<C: TraceConfig> Llama<C> {
    /// A synthetic model of shape `config` with weights of `weight_type`
    /// drawn from `seed`, and a KV cache of the full context.
    pub fn synthetic(
        config: Config,
        weight_type: GgmlType,
        seed: u64,
        trace: C,
    ) -> Result<Self, ModelError> {
        config.validate()?;
        let weights = synthetic_weights(&config, weight_type, seed)?;
        let cache = KvCacheOptions {
            capacity: config.context_len,
            sinks: 4,
            kv_type: KvType::F32,
        };
        Self::new(config, weights, None, cache, trace)
    }
}
