//! A LLaMA decoder on candle: GGUF weights read by candle's reader, the
//! projections on candle's quantized matmul (`QMatMul`), norms, RoPE,
//! attention and SwiGLU on candle's tensor ops. The tracer hooks are the
//! only additions.
// Without hooks (the benchmarks' baseline) the tracer's inputs go unused.
#![cfg_attr(
    model_tracer_no_hooks,
    allow(
        unused_imports,
        unused_variables,
        unused_mut,
        unused_assignments,
        dead_code
    )
)]

use std::fmt;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::{gguf_file, GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor, D};
use model_tracer::kv_cache::KvCacheStateTrace;
use model_tracer::quant::{BrickId, QuantType};
use model_tracer::storage::MAX_FORWARD_ROWS;
use model_tracer::{traced, DefaultTrace, ModelTracer, Stage, TraceConfig};
use model_tracer_llama::model::{Config, Fault, FaultKind, ModelError};
use model_tracer_llama::tokenizer::Tokenizer;

use crate::hooks;

/// Why the candle model could not be loaded or run.
#[derive(Debug)]
#[non_exhaustive]
pub enum CandleError {
    /// Candle failed: reading the file, or an operation.
    Candle(candle_core::Error),
    /// The file cannot be opened.
    Io(std::io::Error),
    /// The hyperparameters, the tokenizer or a tensor's shape are wrong.
    Model(ModelError),
    /// The KV cache is full: `capacity` positions are cached and the
    /// forward needs `needed`.
    ContextFull {
        /// Positions the cache holds.
        capacity: usize,
        /// Positions the forward needs.
        needed: usize,
    },
    /// A token id outside the vocabulary.
    Token {
        /// The id.
        id: u32,
        /// Vocabulary size.
        vocab: usize,
    },
}

impl fmt::Display for CandleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CandleError::Candle(e) => write!(f, "candle: {e}"),
            CandleError::Io(e) => write!(f, "{e}"),
            CandleError::Model(e) => write!(f, "{e}"),
            CandleError::ContextFull { capacity, needed } => write!(
                f,
                "the KV cache holds {capacity} positions, the forward needs {needed}"
            ),
            CandleError::Token { id, vocab } => {
                write!(f, "token {id} is outside the vocabulary of {vocab}")
            }
        }
    }
}

impl std::error::Error for CandleError {}

impl From<candle_core::Error> for CandleError {
    fn from(e: candle_core::Error) -> Self {
        CandleError::Candle(e)
    }
}

impl From<ModelError> for CandleError {
    fn from(e: ModelError) -> Self {
        CandleError::Model(e)
    }
}

/// The trace's name of a ggml type.
pub fn quant_type_of(ty: GgmlDType) -> QuantType {
    match ty {
        GgmlDType::F32 => QuantType::F32,
        GgmlDType::F16 => QuantType::F16,
        GgmlDType::BF16 => QuantType::BF16,
        GgmlDType::Q4_0 => QuantType::Q4_0,
        GgmlDType::Q4_1 => QuantType::Q4_1,
        GgmlDType::Q5_0 => QuantType::Q5_0,
        GgmlDType::Q5_1 => QuantType::Q5_1,
        GgmlDType::Q2K => QuantType::Q2_K,
        GgmlDType::Q3K => QuantType::Q3_K,
        GgmlDType::Q4K => QuantType::Q4_K,
        GgmlDType::Q5K => QuantType::Q5_K,
        GgmlDType::Q6K => QuantType::Q6_K,
        // Q8_0, Q8_1, Q8_K and the types a GGUF llama file does not use.
        _ => QuantType::Q8_0,
    }
}

/// A projection `y = x Wᵀ` with `W` `(out, in)`.
#[derive(Debug, Clone)]
pub struct Linear {
    /// The weights as stored in the file.
    weight: Arc<QTensor>,
    /// Candle's quantized product on `weight`: f32 activations are
    /// quantized to 8 bits per block (`Q8_1` for `Q4_1` weights, `Q8_0`
    /// for `Q8_0`) and multiplied with the blocks.
    matmul: QMatMul,
    /// The dequantized weights, `(out, in)`, once the exact path is on.
    dequantized: Option<Tensor>,
}

impl Linear {
    fn new(weight: Arc<QTensor>) -> Result<Self, CandleError> {
        weight.shape().dims2()?;
        Ok(Self {
            matmul: QMatMul::from_arc(weight.clone())?,
            weight,
            dequantized: None,
        })
    }

    /// `x Wᵀ` for `x` `(T, in)`: the quantized product, or the f32 product
    /// with the dequantized weights when they are loaded.
    #[inline]
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match &self.dequantized {
            Some(w) => x.matmul(&w.t()?),
            None => self.matmul.forward(x),
        }
    }

    /// `x Wᵀ` in f32 with the dequantized weights: the reference of the
    /// quantization error.
    fn reference(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match &self.dequantized {
            Some(w) => x.matmul(&w.t()?),
            None => x.matmul(&self.weight.dequantize(&Device::Cpu)?.t()?),
        }
    }

    /// Storage format of the weights, as the trace names it.
    pub fn quant_type(&self) -> QuantType {
        quant_type_of(self.weight.dtype())
    }

    fn set_exact(&mut self, exact: bool) -> candle_core::Result<()> {
        self.dequantized = if exact {
            Some(self.weight.dequantize(&Device::Cpu)?)
        } else {
            None
        };
        Ok(())
    }
}

/// Weights of one transformer layer.
#[derive(Debug, Clone)]
pub struct Layer {
    /// RMSNorm weight before attention, `(dim)`.
    attn_norm: Tensor,
    /// Query projection, `(dim, dim)`.
    attn_q: Linear,
    /// Key projection, `(kv_dim, dim)`.
    attn_k: Linear,
    /// Value projection, `(kv_dim, dim)`.
    attn_v: Linear,
    /// Attention output projection, `(dim, dim)`.
    attn_output: Linear,
    /// RMSNorm weight before the feed-forward block, `(dim)`.
    ffn_norm: Tensor,
    /// Gate projection, `(ffn_dim, dim)`.
    ffn_gate: Linear,
    /// Up projection, `(ffn_dim, dim)`.
    ffn_up: Linear,
    /// Down projection, `(dim, ffn_dim)`.
    ffn_down: Linear,
}

/// The KV cache: per layer, keys and values of every cached position,
/// preallocated as `(n_kv_heads, capacity, head_dim)` and written in place.
/// It does not evict: a forward past its capacity is an error.
#[derive(Debug, Clone)]
pub struct KvCache {
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
    capacity: usize,
    len: usize,
    kv_dim: usize,
}

impl KvCache {
    fn new(c: &Config, capacity: usize) -> Result<Self, CandleError> {
        let shape = (c.n_kv_heads, capacity, c.head_dim);
        let zeros = || Tensor::zeros(shape, DType::F32, &Device::Cpu);
        Ok(Self {
            keys: (0..c.n_layers).map(|_| zeros()).collect::<Result<_, _>>()?,
            values: (0..c.n_layers).map(|_| zeros()).collect::<Result<_, _>>()?,
            capacity,
            len: 0,
            kv_dim: c.kv_dim(),
        })
    }

    /// Positions holding keys and values.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Capacity in positions.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes held by the valid positions (keys and values, every layer).
    pub fn bytes_in_use(&self) -> usize {
        2 * self.keys.len() * self.len * self.kv_dim * std::mem::size_of::<f32>()
    }
}

/// A LLaMA decoder on candle, generic over its trace config:
/// `CandleLlama<Disabled>` runs with no tracing code at all.
///
/// The prompt runs as one batched forward over its positions, traced or
/// not: the tracer takes the forward's rows
/// ([`ModelTracer::begin_forward_rows`]) and records one `ForwardTrace`
/// per position.
#[derive(Debug)]
pub struct CandleLlama<C: TraceConfig = DefaultTrace> {
    /// Hyperparameters.
    pub config: Config,
    /// The tokenizer of the file (the project's own: candle's does not know
    /// SmolLM2's pre-tokenizer).
    pub tokenizer: Option<Tokenizer>,
    /// Token embeddings, `(vocab, dim)`, as stored.
    token_embd: Arc<QTensor>,
    layers: Vec<Layer>,
    /// Final RMSNorm weight, `(dim)`.
    output_norm: Tensor,
    /// LM head, `(vocab, dim)`: the embeddings when they are tied.
    output: Linear,
    /// RoPE `cos` and `sin` of each position and rotated pair,
    /// `(context, head_dim / 2)`.
    cos: Tensor,
    sin: Tensor,
    cache: KvCache,
    tracer: ModelTracer<C>,
    fault: Option<Fault>,
    exact: bool,
    steps: usize,
}

fn meta<'a>(c: &'a gguf_file::Content, key: &str) -> Result<&'a gguf_file::Value, CandleError> {
    c.metadata
        .get(key)
        .ok_or_else(|| CandleError::Model(ModelError::Config(format!("{key} is missing"))))
}

fn meta_usize(c: &gguf_file::Content, key: &str) -> Result<usize, CandleError> {
    let v = meta(c, key)?.to_u32()?;
    usize::try_from(v).map_err(|_| CandleError::Model(ModelError::Config(format!("{key} = {v}"))))
}

/// Reads the `llama.*` hyperparameters from candle's view of a GGUF file.
fn config_of(c: &gguf_file::Content) -> Result<Config, CandleError> {
    let arch = meta(c, "general.architecture")?.to_string()?;
    if arch != "llama" {
        return Err(ModelError::UnsupportedArchitecture(arch.clone()).into());
    }
    let dim = meta_usize(c, "llama.embedding_length")?;
    let n_heads = meta_usize(c, "llama.attention.head_count")?;
    let n_kv_heads = match c.metadata.get("llama.attention.head_count_kv") {
        Some(_) => meta_usize(c, "llama.attention.head_count_kv")?,
        None => n_heads,
    };
    if n_heads == 0 || dim % n_heads != 0 {
        return Err(ModelError::Config(format!(
            "embedding_length {dim} is not a multiple of head_count {n_heads}"
        ))
        .into());
    }
    let head_dim = dim / n_heads;
    let vocab_size = match c.metadata.get("llama.vocab_size") {
        Some(_) => meta_usize(c, "llama.vocab_size")?,
        None => match c.tensor_infos.get("token_embd.weight") {
            Some(t) => t.shape.dims2()?.0,
            None => return Err(ModelError::MissingTensor("token_embd.weight".into()).into()),
        },
    };
    let rope_dim = match c.metadata.get("llama.rope.dimension_count") {
        Some(_) => meta_usize(c, "llama.rope.dimension_count")?,
        None => head_dim,
    };
    let rope_base = match c.metadata.get("llama.rope.freq_base") {
        Some(v) => v.to_f32()?,
        None => 10_000.0,
    };
    let config = Config {
        n_layers: meta_usize(c, "llama.block_count")?,
        dim,
        n_heads,
        n_kv_heads,
        head_dim,
        ffn_dim: meta_usize(c, "llama.feed_forward_length")?,
        vocab_size,
        context_len: meta_usize(c, "llama.context_length")?,
        rope_base,
        rope_dim,
        rms_eps: meta(c, "llama.attention.layer_norm_rms_epsilon")?.to_f32()?,
    };
    config.validate()?;
    if config.rope_dim != config.head_dim {
        return Err(ModelError::Config(format!(
            "RoPE rotates {} of {} dimensions per head; this model rotates all",
            config.rope_dim, config.head_dim
        ))
        .into());
    }
    Ok(config)
}

/// RMSNorm of each row of `x` `(T, dim)`, times `weight` `(dim)`.
fn rmsnorm(x: &Tensor, weight: &Tensor, eps: f32) -> candle_core::Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    let scale = (ms + f64::from(eps))?.sqrt()?.recip()?;
    x.broadcast_mul(&scale)?.broadcast_mul(weight)
}

/// Rotates consecutive pairs `(x[2i], x[2i+1])` of each head of `x`
/// `(heads, T, head_dim)` by the angles of `cos`/`sin` `(T, head_dim / 2)`:
/// llama.cpp's "normal" RoPE, which GGUF llama files are converted for
/// (their Q and K rows are permuted to match).
fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let (heads, t, hd) = x.dims3()?;
    let pairs = x.reshape((heads, t, hd / 2, 2))?;
    let a = pairs.narrow(3, 0, 1)?;
    let b = pairs.narrow(3, 1, 1)?;
    let cos = cos.reshape((1, t, hd / 2, 1))?;
    let sin = sin.reshape((1, t, hd / 2, 1))?;
    let ra = (a.broadcast_mul(&cos)? - b.broadcast_mul(&sin)?)?;
    let rb = (a.broadcast_mul(&sin)? + b.broadcast_mul(&cos)?)?;
    Tensor::cat(&[ra, rb], 3)?.reshape((heads, t, hd))
}

/// Softmax over the last dimension.
fn softmax(x: &Tensor) -> candle_core::Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?;
    let e = x.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&sum)
}

/// `(T, heads * head_dim)` to `(heads, T, head_dim)`.
fn split_heads(x: &Tensor, heads: usize, head_dim: usize) -> candle_core::Result<Tensor> {
    let t = x.dim(0)?;
    x.reshape((t, heads, head_dim))?
        .transpose(0, 1)?
        .contiguous()
}

/// Injects `fault` into `v` `(T, dim)`, the tensor of `stage` in `layer`
/// for the positions `first..first + T`, where it belongs, with the
/// reference decoder's arithmetic (`Fault` of `model-tracer-llama`).
fn inject(
    fault: &Fault,
    layer: usize,
    stage: Stage,
    first: usize,
    v: Tensor,
    head_dim: usize,
) -> candle_core::Result<Tensor> {
    if fault.layer != layer || fault.stage() != stage {
        return Ok(v);
    }
    let (t, dim) = v.dims2()?;
    let mut values = v.flatten_all()?.to_vec1::<f32>()?;
    for (i, row) in values.chunks_exact_mut(dim).enumerate() {
        if fault.position.is_some_and(|p| p != first + i) || row.is_empty() {
            continue;
        }
        match fault.kind {
            FaultKind::NaN => row[layer % dim] = f32::NAN,
            FaultKind::Inf => row[layer % dim] = f32::INFINITY,
            FaultKind::Explode => row.iter_mut().for_each(|x| *x *= 1e8),
            FaultKind::Scale(_) => row.iter_mut().for_each(|x| *x *= 1.01),
            FaultKind::SwapHeads(_) => {
                if dim >= 2 * head_dim {
                    let (h0, rest) = row.split_at_mut(head_dim);
                    h0.swap_with_slice(&mut rest[..head_dim]);
                }
            }
        }
    }
    Tensor::from_vec(values, (t, dim), &Device::Cpu)
}

impl<C: TraceConfig> CandleLlama<C> {
    /// Loads a GGUF file (llama architecture) with candle's reader, and its
    /// tokenizer with the project's; the KV cache holds `cache_capacity`
    /// positions (the model's context length when `None`; at most that).
    pub fn from_gguf(
        path: impl AsRef<Path>,
        cache_capacity: Option<usize>,
        trace: C,
    ) -> Result<Self, CandleError> {
        let path = path.as_ref();
        let mut file = File::open(path).map_err(CandleError::Io)?;
        let content = gguf_file::Content::read(&mut file)?;
        let config = config_of(&content)?;
        let dev = Device::Cpu;
        let mut tensor = |name: &str, dims: &[usize]| -> Result<Arc<QTensor>, CandleError> {
            if !content.tensor_infos.contains_key(name) {
                return Err(ModelError::MissingTensor(name.to_string()).into());
            }
            let t = content.tensor(&mut file, name, &dev)?;
            if t.shape().dims() != dims {
                return Err(ModelError::Shape {
                    tensor: name.to_string(),
                    expected: dims.iter().rev().map(|&d| d as u64).collect(),
                    found: t.shape().dims().iter().rev().map(|&d| d as u64).collect(),
                }
                .into());
            }
            Ok(Arc::new(t))
        };
        let c = &config;
        let (dim, kv) = (c.dim, c.kv_dim());
        let vector = |t: Arc<QTensor>| t.dequantize(&Device::Cpu);
        let token_embd = tensor("token_embd.weight", &[c.vocab_size, dim])?;
        let output = if content.tensor_infos.contains_key("output.weight") {
            tensor("output.weight", &[c.vocab_size, dim])?
        } else {
            token_embd.clone()
        };
        let mut layers = Vec::with_capacity(c.n_layers);
        for i in 0..c.n_layers {
            let mut t =
                |name: &str, dims: &[usize]| tensor(&format!("blk.{i}.{name}.weight"), dims);
            layers.push(Layer {
                attn_norm: vector(t("attn_norm", &[dim])?)?,
                attn_q: Linear::new(t("attn_q", &[dim, dim])?)?,
                attn_k: Linear::new(t("attn_k", &[kv, dim])?)?,
                attn_v: Linear::new(t("attn_v", &[kv, dim])?)?,
                attn_output: Linear::new(t("attn_output", &[dim, dim])?)?,
                ffn_norm: vector(t("ffn_norm", &[dim])?)?,
                ffn_gate: Linear::new(t("ffn_gate", &[c.ffn_dim, dim])?)?,
                ffn_up: Linear::new(t("ffn_up", &[c.ffn_dim, dim])?)?,
                ffn_down: Linear::new(t("ffn_down", &[dim, c.ffn_dim])?)?,
            });
        }
        let output_norm = vector(tensor("output_norm.weight", &[dim])?)?;
        let gguf = model_tracer_llama::gguf::GgufFile::open(path).map_err(ModelError::Gguf)?;
        let tokenizer = Tokenizer::from_gguf(&gguf).map_err(ModelError::Tokenizer)?;

        // RoPE angles computed as the reference decoder computes them, in
        // f32: `pos * base^(-2i/d)`.
        let half = c.head_dim / 2;
        let freq: Vec<f32> = (0..half)
            .map(|i| c.rope_base.powf(-2.0 * i as f32 / c.head_dim as f32))
            .collect();
        let capacity = cache_capacity
            .unwrap_or(c.context_len)
            .clamp(1, c.context_len);
        let (mut cos, mut sin) = (Vec::with_capacity(capacity * half), Vec::new());
        sin.reserve(capacity * half);
        for pos in 0..capacity {
            for &f in &freq {
                let (s, co) = (pos as f32 * f).sin_cos();
                cos.push(co);
                sin.push(s);
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(cos, (capacity, half), &dev)?,
            sin: Tensor::from_vec(sin, (capacity, half), &dev)?,
            cache: KvCache::new(c, capacity)?,
            output: Linear::new(output)?,
            token_embd,
            layers,
            output_norm,
            tokenizer: Some(tokenizer),
            config,
            tracer: ModelTracer::new(trace),
            fault: None,
            exact: false,
            steps: 0,
        })
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

    /// Forgets the conversation: call between independent conversations.
    pub fn clear_kv_cache(&mut self) {
        self.cache.len = 0;
    }

    /// Injects `fault` into every following forward pass (`None` removes
    /// it), as the reference decoder does: a test of the tracer, not of
    /// the model.
    pub fn set_fault(&mut self, fault: Option<Fault>) {
        self.fault = fault;
    }

    /// Runs every projection as an f32 product with the dequantized
    /// weights (candle's `matmul`, about 4 bytes per weight more memory)
    /// instead of the quantized one. The cache is cleared: positions
    /// computed one way must not be mixed with the other.
    pub fn set_exact(&mut self, exact: bool) -> Result<(), CandleError> {
        for l in &mut self.layers {
            for lin in [
                &mut l.attn_q,
                &mut l.attn_k,
                &mut l.attn_v,
                &mut l.attn_output,
                &mut l.ffn_gate,
                &mut l.ffn_up,
                &mut l.ffn_down,
            ] {
                lin.set_exact(exact)?;
            }
        }
        self.output.set_exact(exact)?;
        self.exact = exact;
        self.clear_kv_cache();
        Ok(())
    }

    /// Whether the projections run in f32 ([`set_exact`](Self::set_exact)).
    pub fn is_exact(&self) -> bool {
        self.exact
    }

    /// Text of a token for display: the tokenizer's piece, or `<id>`.
    pub fn token_text(&self, id: u32) -> String {
        self.tokenizer
            .as_ref()
            .and_then(|t| t.token_str(id))
            .unwrap_or_else(|| format!("<{id}>"))
    }

    /// Runs `tokens` at the next positions of the cache and returns the
    /// logits of the last one. The tokens run as one batched forward (one
    /// per [`MAX_FORWARD_ROWS`] positions), traced or not: a traced run
    /// computes what an untraced one does, in the same order.
    pub fn forward(&mut self, tokens: &[u32]) -> Result<Vec<f32>, CandleError> {
        if let Some(&id) = tokens
            .iter()
            .find(|&&t| t as usize >= self.config.vocab_size)
        {
            return Err(CandleError::Token {
                id,
                vocab: self.config.vocab_size,
            });
        }
        let needed = self.cache.len + tokens.len();
        if needed > self.cache.capacity {
            return Err(CandleError::ContextFull {
                capacity: self.cache.capacity,
                needed,
            });
        }
        let mut logits = Vec::new();
        for chunk in tokens.chunks(MAX_FORWARD_ROWS) {
            logits = self.forward_positions(chunk)?;
        }
        Ok(logits)
    }

    /// Greedy generation: runs the prompt as one forward, then appends the
    /// argmax token until `max_new_tokens` or an end-of-generation token.
    /// `on_token` sees each new token.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        max_new_tokens: usize,
        mut on_token: impl FnMut(u32),
    ) -> Result<Vec<u32>, CandleError> {
        let mut out = Vec::new();
        if prompt.is_empty() || max_new_tokens == 0 {
            return Ok(out);
        }
        let mut logits = self.forward(prompt)?;
        loop {
            let next = model_tracer::stats::argmax(&logits).unwrap_or(0) as u32;
            out.push(next);
            on_token(next);
            let end = self.tokenizer.as_ref().is_some_and(|t| t.is_eog(next));
            if end || out.len() >= max_new_tokens {
                return Ok(out);
            }
            logits = self.forward(&[next])?;
        }
    }

    /// One forward over `tokens` (`T` positions from the cache's length, at
    /// least one): the logits of the last position. The tracer takes the
    /// forward's `T` rows; only the last position, and the rows the tracer
    /// asks logits of ([`ModelTracer::wants_logits`]), go through the LM
    /// head.
    fn forward_positions(&mut self, tokens: &[u32]) -> Result<Vec<f32>, CandleError> {
        let CandleLlama {
            config: c,
            token_embd,
            layers,
            output_norm,
            output,
            cos,
            sin,
            cache,
            tracer,
            fault,
            steps,
            ..
        } = self;
        let dev = Device::Cpu;
        let t = tokens.len();
        if t == 0 {
            return Ok(Vec::new());
        }
        let first = cache.len;
        let n_ctx = first + t;
        let (hd, n_heads, n_kv) = (c.head_dim, c.n_heads, c.n_kv_heads);
        let kv_mul = n_heads / n_kv;
        let scale = 1.0 / (hd as f64).sqrt();
        traced!(C, tracer.begin_forward_rows(first, t));
        traced!(C, tracer.input_tokens(tokens));
        // the rows that get logits (the last, and those the tracer wants),
        // and, for the logit lens, their hidden state after each layer
        let mut logit_rows: Vec<u32> = Vec::new();
        let mut lens_ids: Option<Tensor> = None;
        traced!(C, {
            logit_rows = (0..t)
                .filter(|&i| i + 1 == t || tracer.wants_logits(i))
                .map(|i| i as u32)
                .collect();
            if tracer.wants_logit_lens() {
                lens_ids = Some(Tensor::from_slice(&logit_rows, logit_rows.len(), &dev)?);
            }
        });
        let mut hidden: Vec<Tensor> = Vec::new();

        // token embedding
        let ids = Tensor::from_slice(tokens, t, &dev)?;
        let mut x = token_embd.embedding(&ids)?;
        traced!(C, hooks::activation(tracer, 0, Stage::Embedding, &x)?);

        // RoPE angles of these positions, and the causal mask of a batch
        let cos = cos.narrow(0, first, t)?;
        let sin = sin.narrow(0, first, t)?;
        let mask = if t > 1 {
            let m: Vec<f32> = (0..t)
                .flat_map(|i| {
                    (0..n_ctx).map(move |j| {
                        if j > first + i {
                            f32::NEG_INFINITY
                        } else {
                            0.0
                        }
                    })
                })
                .collect();
            Some(Tensor::from_vec(m, (t, n_ctx), &dev)?)
        } else {
            None
        };

        for (l, lw) in layers.iter().enumerate() {
            traced!(C, hooks::activation(tracer, l, Stage::Input, &x)?);
            // attention rmsnorm
            let xn = rmsnorm(&x, &lw.attn_norm, c.rms_eps)?;
            traced!(C, hooks::activation(tracer, l, Stage::PostNorm, &xn)?);

            // q, k, v projections
            let q = lw.attn_q.forward(&xn)?;
            let k = lw.attn_k.forward(&xn)?;
            let v = lw.attn_v.forward(&xn)?;
            traced!(
                C,
                hooks::quant_error(
                    tracer,
                    BrickId::QkvProjection,
                    l,
                    lw.attn_q.quant_type(),
                    0..t,
                    || Tensor::cat(&[&q, &k, &v], 1),
                    |i| {
                        let xi = xn.narrow(0, i, 1)?;
                        Tensor::cat(
                            &[
                                lw.attn_q.reference(&xi)?,
                                lw.attn_k.reference(&xi)?,
                                lw.attn_v.reference(&xi)?,
                            ],
                            1,
                        )
                    }
                )?
            );

            // RoPE relative positional encoding on q and k, heads first
            let q = rope(&split_heads(&q, n_heads, hd)?, &cos, &sin)?;
            let k = rope(&split_heads(&k, n_kv, hd)?, &cos, &sin)?;
            let v = split_heads(&v, n_kv, hd)?;

            // write k, v of these positions into the cache
            cache.keys[l].slice_set(&k, 1, first)?;
            cache.values[l].slice_set(&v, 1, first)?;
            let keys = cache.keys[l].narrow(1, 0, n_ctx)?.contiguous()?;
            let values = cache.values[l].narrow(1, 0, n_ctx)?.contiguous()?;

            // grouped-query attention: the query heads that share a KV
            // head form one batch `(n_kv, kv_mul * T, head_dim)`
            let qg = q.reshape((n_kv, kv_mul * t, hd))?;
            let scores = (qg.matmul(&keys.t()?)? * scale)?.reshape((n_heads, t, n_ctx))?;
            let scores = match &mask {
                Some(m) => scores.broadcast_add(m)?,
                None => scores,
            };
            let probs = softmax(&scores)?;
            traced!(C, hooks::attention(tracer, l, first, &probs)?);
            let att = probs
                .reshape((n_kv, kv_mul * t, n_ctx))?
                .matmul(&values)?
                .reshape((n_heads, t, hd))?
                .transpose(0, 1)?
                .reshape((t, n_heads * hd))?;

            // output projection
            let mut out = lw.attn_output.forward(&att)?;
            traced!(
                C,
                hooks::quant_error(
                    tracer,
                    BrickId::AttentionOutput,
                    l,
                    lw.attn_output.quant_type(),
                    0..t,
                    || Ok(out.clone()),
                    |i| lw.attn_output.reference(&att.narrow(0, i, 1)?)
                )?
            );
            if let Some(f) = fault {
                out = inject(f, l, Stage::PostAttn, first, out, hd)?;
            }
            traced!(C, hooks::activation(tracer, l, Stage::PostAttn, &out)?);

            // residual connection
            traced!(C, hooks::residual(tracer, l, &x, &out)?);
            x = (x + out)?;

            // ffn rmsnorm
            let xn = rmsnorm(&x, &lw.ffn_norm, c.rms_eps)?;
            traced!(C, hooks::activation(tracer, l, Stage::PostFfnNorm, &xn)?);

            // gate and up projections
            let gate = lw.ffn_gate.forward(&xn)?;
            traced!(
                C,
                hooks::quant_error(
                    tracer,
                    BrickId::FfnGate,
                    l,
                    lw.ffn_gate.quant_type(),
                    0..t,
                    || Ok(gate.clone()),
                    |i| lw.ffn_gate.reference(&xn.narrow(0, i, 1)?)
                )?
            );
            let up = lw.ffn_up.forward(&xn)?;
            traced!(
                C,
                hooks::quant_error(
                    tracer,
                    BrickId::FfnUp,
                    l,
                    lw.ffn_up.quant_type(),
                    0..t,
                    || Ok(up.clone()),
                    |i| lw.ffn_up.reference(&xn.narrow(0, i, 1)?)
                )?
            );

            // SwiGLU non-linearity
            let h = (gate.silu()? * up)?;

            // down projection
            let mut out = lw.ffn_down.forward(&h)?;
            traced!(
                C,
                hooks::quant_error(
                    tracer,
                    BrickId::FfnDown,
                    l,
                    lw.ffn_down.quant_type(),
                    0..t,
                    || Ok(out.clone()),
                    |i| lw.ffn_down.reference(&h.narrow(0, i, 1)?)
                )?
            );
            if let Some(f) = fault {
                out = inject(f, l, Stage::PostFfn, first, out, hd)?;
            }
            traced!(C, hooks::activation(tracer, l, Stage::PostFfn, &out)?);

            // residual connection
            traced!(C, hooks::residual(tracer, l, &x, &out)?);
            x = (x + out)?;
            traced!(C, hooks::activation(tracer, l, Stage::Output, &x)?);

            // the hidden state of the logit lens, of the rows that get logits
            if let Some(ids) = &lens_ids {
                hidden.push(x.index_select(ids, 0)?);
            }
        }

        // final rmsnorm of the last position
        let last = rmsnorm(&x.narrow(0, t - 1, 1)?, output_norm, c.rms_eps)?;
        // and of every position, for the tracer
        traced!(
            C,
            hooks::activation_with(tracer, 0, Stage::FinalNorm, || if t == 1 {
                Ok(last.clone())
            } else {
                rmsnorm(&x, output_norm, c.rms_eps)
            })?
        );

        // classifier into logits, of the last position
        let logits = output.forward(&last)?;

        // per position: the lens and the logits of the rows the tracer
        // wants (the last row's are the ones above), then the KV state
        traced!(
            C,
            trace_rows(
                tracer,
                c,
                output,
                output_norm,
                &x,
                &logit_rows,
                &hidden,
                (&last, &logits),
                first,
                *steps,
                cache.capacity,
            )?
        );

        // KV cache bookkeeping
        cache.len = n_ctx;
        *steps += t;
        traced!(C, tracer.end_forward());
        Ok(logits.flatten_all()?.to_vec1::<f32>()?)
    }
}

/// The per-position records of a forward over the rows of `x` `(T, dim)`
/// at positions `first..first + T`, each row in turn in focus: for the
/// rows of `logit_rows` (ascending, the last row last), the logit lens of
/// `hidden` (their hidden states after each layer, `(logit_rows.len(),
/// dim)` each, empty when the lens is off), the LM head's quantization
/// error and the final logits (`last`: the last row's normed state and
/// logits, already computed; the other rows' as one product); then every
/// row's KV cache state, as a forward of that position alone would record
/// it (`steps`: the step of row 0).
#[cfg_attr(model_tracer_no_hooks, allow(dead_code))]
#[allow(clippy::too_many_arguments)]
fn trace_rows<C: TraceConfig>(
    tracer: &mut ModelTracer<C>,
    c: &Config,
    output: &Linear,
    output_norm: &Tensor,
    x: &Tensor,
    logit_rows: &[u32],
    hidden: &[Tensor],
    last: (&Tensor, &Tensor),
    first: usize,
    steps: usize,
    capacity: usize,
) -> candle_core::Result<()> {
    let t = x.dim(0)?;
    // the rows other than the last that get logits, as one product
    let others = &logit_rows[..logit_rows.len().saturating_sub(1)];
    let others = if others.is_empty() {
        None
    } else {
        let ids = Tensor::from_slice(others, others.len(), &Device::Cpu)?;
        let xn = rmsnorm(&x.index_select(&ids, 0)?, output_norm, c.rms_eps)?;
        let logits = output.forward(&xn)?;
        Some((xn, logits))
    };
    let lens_layers: Vec<usize> = (0..hidden.len()).collect();
    // the index in `logit_rows` of the next row with logits
    let mut j = 0;
    for i in 0..t {
        tracer.focus_row(i);
        let row = if logit_rows.get(j) != Some(&(i as u32)) {
            None
        } else if i + 1 == t {
            Some((last.0.clone(), last.1.clone()))
        } else {
            match &others {
                Some((xn, logits)) => Some((xn.narrow(0, j, 1)?, logits.narrow(0, j, 1)?)),
                None => None,
            }
        };
        if let Some((xn, logits)) = row {
            if !hidden.is_empty() {
                hooks::logit_lens(tracer, &lens_layers, c.vocab_size, || {
                    let rows = hidden
                        .iter()
                        .map(|h| h.narrow(0, j, 1))
                        .collect::<candle_core::Result<Vec<_>>>()?;
                    output.forward(&rmsnorm(&Tensor::cat(&rows, 0)?, output_norm, c.rms_eps)?)
                })?;
            }
            hooks::quant_error(
                tracer,
                BrickId::LmHead,
                0,
                output.quant_type(),
                i..i + 1,
                || Ok(logits.clone()),
                |_| output.reference(&xn),
            )?;
            hooks::final_logits(tracer, &logits)?;
            j += 1;
        }
        let n_ctx = first + i + 1;
        tracer.kv_state(|| KvCacheStateTrace {
            step: steps + i,
            max_positions: capacity,
            valid_positions: n_ctx,
            cache_size_bytes: 2 * c.n_layers * n_ctx * c.kv_dim() * std::mem::size_of::<f32>(),
            cache_hit_rate: (n_ctx - 1) as f32 / n_ctx as f32,
            evictions_this_step: 0,
            reused_positions: n_ctx - 1,
            computed_positions: 1,
        });
    }
    Ok(())
}
