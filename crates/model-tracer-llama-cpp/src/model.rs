//! `LlamaCpp<C>`: a llama.cpp model and context, decoding through
//! `llama_decode`, its tracer fed by the eval callback.

use std::ffi::{c_char, c_void, CString};
use std::ptr::NonNull;
use std::sync::Once;

use llama_cpp_sys_2 as sys;
use model_tracer::{
    traced, DefaultTrace, KvCacheStateTrace, LogitRows, ModelTracer, Stage, TraceConfig,
};
use model_tracer_llama::model::Fault;

use crate::capture::{c_text, eval_callback, Capture, Plan};
use crate::lens::Lens;
use crate::names::ArchMap;
use crate::LlamaCppError;

/// How the context is made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LlamaCppOptions {
    /// KV cache capacity, in positions (`n_ctx`).
    pub context: usize,
    /// Positions one `llama_decode` takes (`n_batch` = `n_ubatch`): a
    /// prompt up to this long is one batch, a longer one runs in batches of
    /// this many.
    pub batch: usize,
    /// Threads of llama.cpp's CPU backend.
    pub threads: usize,
    /// Flash attention: `None` leaves it to llama.cpp (on, for the CPU
    /// backend). Tracing attention turns it off whatever this says: with
    /// it the probabilities are never a tensor of the graph.
    pub flash_attention: Option<bool>,
    /// A KV cache of f32 keys and values (`type_k` = `type_v` = F32)
    /// instead of llama.cpp's default f16: the reference decoder's
    /// default cache, for comparing the two without the cache's rounding.
    pub f32_cache: bool,
}

impl Default for LlamaCppOptions {
    fn default() -> Self {
        Self {
            context: 4096,
            batch: 512,
            threads: 1,
            flash_attention: None,
            f32_cache: false,
        }
    }
}

/// The model's shape, as llama.cpp and the GGUF metadata give it.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelShape {
    /// `general.architecture`.
    pub arch: String,
    /// Layers.
    pub layers: usize,
    /// Hidden size.
    pub dim: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Width of a key (`<arch>.attention.key_length`, else `dim / heads`).
    pub head_dim: usize,
    /// Width of a value (`<arch>.attention.value_length`, else `head_dim`).
    pub value_dim: usize,
    /// Feed-forward hidden size (`<arch>.feed_forward_length`).
    pub ffn_dim: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// Context the model was trained for.
    pub context_train: usize,
    /// Sliding-window width of its windowed layers (0: none).
    pub sliding_window: usize,
    /// RoPE frequency base (`<arch>.rope.freq_base`, else 10 000).
    pub rope_base: f32,
    /// RMS norm epsilon (`<arch>.attention.layer_norm_rms_epsilon`).
    pub rms_eps: f32,
}

static BACKEND: Once = Once::new();

/// The longest chat [`LlamaCpp::apply_chat_template`] renders, bytes.
const MAX_CHAT_BYTES: usize = 1 << 26;

/// llama.cpp's log, errors only, to stderr.
unsafe extern "C" fn quiet_log(level: sys::ggml_log_level, text: *const c_char, _: *mut c_void) {
    if level == sys::GGML_LOG_LEVEL_ERROR {
        eprint!("llama.cpp: {}", c_text(text));
    }
}

/// The callback state, owned through a raw pointer: llama.cpp holds it as
/// the callback's user data, so no Rust reference to it may live across a
/// decode.
struct CaptureBox<C: TraceConfig>(NonNull<Capture<C>>);

impl<C: TraceConfig> Drop for CaptureBox<C> {
    fn drop(&mut self) {
        // SAFETY: made by Box::into_raw in `LlamaCpp::load`, freed once here.
        drop(unsafe { Box::from_raw(self.0.as_ptr()) });
    }
}

/// A GGUF model run by llama.cpp (CPU backend), traced by a
/// `ModelTracer<C>` fed from llama.cpp's eval callback.
///
/// With `C = Disabled` no callback is registered: the context is made and
/// every batch decoded exactly as a plain use of the bindings would.
pub struct LlamaCpp<C: TraceConfig = DefaultTrace> {
    // Dropped in this order: the context, the model, then the callback's
    // state (no decode runs while they drop).
    ctx: NonNull<sys::llama_context>,
    model: NonNull<sys::llama_model>,
    batch: sys::llama_batch,
    batch_capacity: usize,
    shape: ModelShape,
    map: ArchMap,
    options: LlamaCppOptions,
    flash_attention_off: bool,
    lens: Option<Lens>,
    lens_out: Vec<f32>,
    position: usize,
    capture: CaptureBox<C>,
}

// SAFETY: the model, the context and the batch are owned by this value
// and used only through `&mut self` (llama.cpp's context is not shared).
unsafe impl<C: TraceConfig + Send> Send for LlamaCpp<C> {}

impl<C: TraceConfig> Drop for LlamaCpp<C> {
    fn drop(&mut self) {
        // SAFETY: each was made once in `load` and is freed once here.
        unsafe {
            sys::llama_batch_free(self.batch);
            sys::llama_free(self.ctx.as_ptr());
            sys::llama_model_free(self.model.as_ptr());
        }
    }
}

impl<C: TraceConfig> std::fmt::Debug for LlamaCpp<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlamaCpp")
            .field("shape", &self.shape)
            .field("options", &self.options)
            .field("position", &self.position)
            .finish_non_exhaustive()
    }
}

/// A metadata value of the model, as text.
fn meta(model: *const sys::llama_model, key: &str) -> Option<String> {
    let key = CString::new(key).ok()?;
    let mut buf = vec![0u8; 256];
    // SAFETY: the model is live; the buffer is as long as we say.
    let n = unsafe {
        sys::llama_model_meta_val_str(model, key.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
    };
    let n = usize::try_from(n).ok()?;
    buf.truncate(n.min(buf.len() - 1));
    String::from_utf8(buf).ok()
}

fn meta_num<T: std::str::FromStr>(model: *const sys::llama_model, key: &str) -> Option<T> {
    meta(model, key).and_then(|v| v.trim().parse().ok())
}

fn count(n: i32) -> usize {
    usize::try_from(n).unwrap_or(0)
}

impl<C: TraceConfig> LlamaCpp<C> {
    /// Loads the GGUF file `path` into llama.cpp (CPU only), makes its
    /// context with `options`, and a tracer for `config` with the default
    /// options. With the logit lens on (`C::LOGIT_LENS`), also reads the
    /// final norm and the LM head from the file for it.
    pub fn load(path: &str, options: LlamaCppOptions, config: C) -> Result<Self, LlamaCppError> {
        let c_path = CString::new(path).map_err(|_| LlamaCppError::Path(path.into()))?;
        if !std::path::Path::new(path).is_file() {
            return Err(LlamaCppError::Load(format!("{path}: no such file")));
        }
        if options.context == 0 || options.batch == 0 || options.threads == 0 {
            return Err(LlamaCppError::Options(
                "context, batch and threads must each be at least 1".into(),
            ));
        }
        let to_u32 = |n: usize, what: &str| {
            u32::try_from(n).map_err(|_| LlamaCppError::Options(format!("{what} {n} is too large")))
        };
        let context = to_u32(options.context, "context")?;
        let batch = to_u32(options.batch.min(options.context), "batch")?;
        let threads = i32::try_from(options.threads)
            .map_err(|_| LlamaCppError::Options("too many threads".into()))?;
        BACKEND.call_once(|| {
            // SAFETY: called once, before any other llama.cpp call here.
            unsafe {
                sys::llama_log_set(Some(quiet_log), std::ptr::null_mut());
                sys::llama_backend_init();
            }
        });
        // SAFETY: plain llama.cpp calls; every pointer is checked.
        unsafe {
            let mut mp = sys::llama_model_default_params();
            mp.n_gpu_layers = 0;
            let model = NonNull::new(sys::llama_model_load_from_file(c_path.as_ptr(), mp))
                .ok_or_else(|| LlamaCppError::Load(format!("llama.cpp could not load {path}")))?;
            let m = model.as_ptr();
            let arch = meta(m, "general.architecture").unwrap_or_default();
            let layers = count(sys::llama_model_n_layer(m));
            let dim = count(sys::llama_model_n_embd(m));
            let heads = count(sys::llama_model_n_head(m));
            let vocab_ptr = sys::llama_model_get_vocab(m);
            let head_dim = meta_num(m, &format!("{arch}.attention.key_length"))
                .unwrap_or(dim.checked_div(heads).unwrap_or(0));
            let shape = ModelShape {
                layers,
                dim,
                heads,
                kv_heads: count(sys::llama_model_n_head_kv(m)),
                head_dim,
                value_dim: meta_num(m, &format!("{arch}.attention.value_length"))
                    .unwrap_or(head_dim),
                ffn_dim: meta_num(m, &format!("{arch}.feed_forward_length")).unwrap_or(0),
                vocab: count(sys::llama_vocab_n_tokens(vocab_ptr)),
                context_train: count(sys::llama_model_n_ctx_train(m)),
                sliding_window: count(sys::llama_model_n_swa(m)),
                rope_base: meta_num(m, &format!("{arch}.rope.freq_base")).unwrap_or(10_000.0),
                rms_eps: meta_num(m, &format!("{arch}.attention.layer_norm_rms_epsilon"))
                    .unwrap_or(1e-5),
                arch,
            };
            let map = ArchMap::for_arch(&shape.arch);
            let tracer = ModelTracer::new(config);
            let attention_traced = C::ATTENTION && tracer.config().attention();
            let capture = Box::new(Capture::new(tracer, map, shape.layers, shape.head_dim));
            let capture = CaptureBox(NonNull::from(Box::leak(capture)));

            let mut cp = sys::llama_context_default_params();
            cp.n_ctx = context;
            cp.n_batch = batch;
            cp.n_ubatch = batch;
            cp.n_seq_max = 1;
            cp.n_threads = threads;
            cp.n_threads_batch = threads;
            if options.f32_cache {
                cp.type_k = sys::GGML_TYPE_F32;
                cp.type_v = sys::GGML_TYPE_F32;
            }
            let flash_attention_off = attention_traced || options.flash_attention == Some(false);
            cp.flash_attn_type = if flash_attention_off {
                sys::LLAMA_FLASH_ATTN_TYPE_DISABLED
            } else if options.flash_attention == Some(true) {
                sys::LLAMA_FLASH_ATTN_TYPE_ENABLED
            } else {
                cp.flash_attn_type
            };
            traced!(C, {
                cp.cb_eval = Some(eval_callback::<C>);
                cp.cb_eval_user_data = capture.0.as_ptr().cast();
            });
            let Some(ctx) = NonNull::new(sys::llama_init_from_model(m, cp)) else {
                sys::llama_model_free(m);
                return Err(LlamaCppError::Context(format!(
                    "llama.cpp could not make a context of {context} positions for {path}"
                )));
            };
            let batch_capacity = batch as usize;
            let raw_batch = sys::llama_batch_init(batch as i32, 0, 1);
            let mut lens = None;
            if C::LOGIT_LENS && C::LOGITS {
                match Lens::load(path, &shape.arch) {
                    Ok(l) => lens = Some(l),
                    Err(e) => {
                        sys::llama_batch_free(raw_batch);
                        sys::llama_free(ctx.as_ptr());
                        sys::llama_model_free(m);
                        return Err(e);
                    }
                }
            }
            Ok(Self {
                ctx,
                model,
                batch: raw_batch,
                batch_capacity,
                shape,
                map,
                options,
                flash_attention_off,
                lens,
                lens_out: Vec::new(),
                position: 0,
                capture,
            })
        }
    }

    fn capture(&self) -> &Capture<C> {
        // SAFETY: no decode runs during `&self` calls, so llama.cpp does
        // not hold the state now.
        unsafe { self.capture.0.as_ref() }
    }

    fn capture_mut(&mut self) -> &mut Capture<C> {
        // SAFETY: as `capture`, with `&mut self`.
        unsafe { &mut *self.capture.0.as_ptr() }
    }

    /// The model's shape.
    pub fn shape(&self) -> &ModelShape {
        &self.shape
    }

    /// The names of the graph tensors this model's tracer reads.
    pub fn arch_map(&self) -> &ArchMap {
        &self.map
    }

    /// The options the context was made with.
    pub fn options(&self) -> &LlamaCppOptions {
        &self.options
    }

    /// Whether the context was made with flash attention off (attention
    /// traced, or asked for).
    pub fn flash_attention_off(&self) -> bool {
        self.flash_attention_off
    }

    /// KV cache capacity, positions (`llama_n_ctx`).
    pub fn capacity(&self) -> usize {
        // SAFETY: live context.
        unsafe { sys::llama_n_ctx(self.ctx.as_ptr()) as usize }
    }

    /// The next position a decode writes.
    pub fn position(&self) -> usize {
        self.position
    }

    /// The tracer.
    pub fn tracer(&self) -> &ModelTracer<C> {
        &self.capture().tracer
    }

    /// The tracer, to replace it (options, sink, dump) or take what it
    /// recorded.
    pub fn tracer_mut(&mut self) -> &mut ModelTracer<C> {
        &mut self.capture_mut().tracer
    }

    /// Injects `fault` into llama.cpp's tensor of its stage and layer in
    /// every following decode (the callback writes it into the tensor, so
    /// it flows on through the graph). Only a traced model has the
    /// callback: `Disabled` ignores faults.
    pub fn set_fault(&mut self, fault: Option<Fault>) {
        self.capture_mut().fault = fault;
    }

    /// The fault being injected.
    pub fn fault(&self) -> Option<Fault> {
        self.capture().fault
    }

    /// Test support: applies `change` to the copy of the tensor named
    /// `name` (e.g. `l_out-7`) before its hook, in every following decode;
    /// llama.cpp's own tensor is not touched.
    #[doc(hidden)]
    pub fn set_perturbation(&mut self, perturbation: Option<crate::capture::Perturbation>) {
        self.capture_mut().perturb = perturbation;
    }

    /// Graph tensors the callback copied since the model was loaded.
    pub fn observed_tensors(&self) -> usize {
        self.capture().observed
    }

    /// Tokenizes `text` with llama.cpp's tokenizer; `add_special` adds the
    /// beginning-of-sequence token where the model's vocabulary asks for
    /// one. Special-token text is not parsed.
    pub fn tokenize(&self, text: &str, add_special: bool) -> Result<Vec<u32>, LlamaCppError> {
        self.tokenize_with(text, add_special, false)
    }

    /// Tokenizes `text` as [`tokenize`](Self::tokenize) does, except that
    /// the texts of special tokens (`<start_of_turn>`, `<|im_start|>`, …)
    /// become those tokens: the tokenization of a rendered chat.
    pub fn tokenize_special(
        &self,
        text: &str,
        add_special: bool,
    ) -> Result<Vec<u32>, LlamaCppError> {
        self.tokenize_with(text, add_special, true)
    }

    fn tokenize_with(
        &self,
        text: &str,
        add_special: bool,
        parse_special: bool,
    ) -> Result<Vec<u32>, LlamaCppError> {
        let too_long = || LlamaCppError::Tokenize("the text is too long".into());
        let len = i32::try_from(text.len()).map_err(|_| too_long())?;
        // At most one token per byte, and the BOS and EOS llama.cpp may
        // add; once more at the count it answers if that is short.
        let mut ids = vec![0i32; text.len() + 2];
        for _ in 0..2 {
            let capacity = i32::try_from(ids.len()).map_err(|_| too_long())?;
            // SAFETY: live model; the text is `len` bytes and the buffer
            // holds `capacity` ids.
            let n = unsafe {
                let vocab = sys::llama_model_get_vocab(self.model.as_ptr());
                sys::llama_tokenize(
                    vocab,
                    text.as_ptr().cast(),
                    len,
                    ids.as_mut_ptr(),
                    capacity,
                    add_special,
                    parse_special,
                )
            };
            match usize::try_from(n) {
                Ok(n) => {
                    ids.truncate(n);
                    return Ok(ids.into_iter().map(|i| i as u32).collect());
                }
                Err(_) if n != i32::MIN => ids.resize(n.unsigned_abs() as usize, 0),
                Err(_) => break,
            }
        }
        Err(LlamaCppError::Tokenize("llama_tokenize failed".into()))
    }

    /// The chat template [`apply_chat_template`](Self::apply_chat_template)
    /// renders with: the model's own (`tokenizer.chat_template` of the
    /// file, `llama_model_chat_template(model, NULL)`), else llama.cpp's
    /// built-in template named after the architecture (`gemma` for
    /// `gemma3`, whose base model's file has none), else none.
    pub fn chat_template(&self) -> Option<ChatTemplate> {
        // SAFETY: live model; llama.cpp returns a NUL-terminated string it
        // owns (as long as the model), or null.
        let own = unsafe {
            let p = sys::llama_model_chat_template(self.model.as_ptr(), std::ptr::null());
            (!p.is_null()).then(|| c_text(p))
        };
        if let Some(text) = own {
            return Some(ChatTemplate::Model(text));
        }
        let builtin = builtin_chat_templates();
        let arch = self.shape.arch.as_str();
        let family = arch.trim_end_matches(|c: char| c.is_ascii_digit());
        [arch, family]
            .into_iter()
            .find(|name| !name.is_empty() && builtin.iter().any(|b| b == name))
            .map(|name| ChatTemplate::Builtin(name.to_string()))
    }

    /// Renders `messages` (role, content) with the model's
    /// [`chat_template`](Self::chat_template) through
    /// `llama_chat_apply_template`, which recognizes the templates it
    /// knows (ChatML, Gemma, Llama 3, …) by their text or name and renders
    /// them with its own code, not a Jinja interpreter; `add_assistant`
    /// ends the text with the opening of the assistant's turn. The text
    /// holds special-token text, for
    /// [`tokenize_special`](Self::tokenize_special); no BOS.
    pub fn apply_chat_template(
        &self,
        messages: &[(&str, &str)],
        add_assistant: bool,
    ) -> Result<String, LlamaCppError> {
        let err = |m: String| LlamaCppError::ChatTemplate(m);
        let template = match self.chat_template() {
            Some(ChatTemplate::Model(text) | ChatTemplate::Builtin(text)) => text,
            None => {
                return Err(err(format!(
                    "the model has no chat template (tokenizer.chat_template), and llama.cpp \
                     has no built-in one named after its architecture {:?}",
                    self.shape.arch
                )))
            }
        };
        let c_template =
            CString::new(template).map_err(|_| err("the chat template holds a NUL byte".into()))?;
        let mut texts = Vec::with_capacity(messages.len());
        for (i, (role, content)) in messages.iter().enumerate() {
            let nul = || err(format!("message {i} holds a NUL byte"));
            texts.push((
                CString::new(*role).map_err(|_| nul())?,
                CString::new(*content).map_err(|_| nul())?,
            ));
        }
        let chat: Vec<sys::llama_chat_message> = texts
            .iter()
            .map(|(role, content)| sys::llama_chat_message {
                role: role.as_ptr(),
                content: content.as_ptr(),
            })
            .collect();
        let chars: usize = messages.iter().map(|(r, c)| r.len() + c.len()).sum();
        // llama.cpp's advice (twice the characters), and room for the
        // markers; once more at the length it answers if that is short.
        let mut length = chars.saturating_mul(2).saturating_add(256);
        for _ in 0..2 {
            if length > MAX_CHAT_BYTES {
                return Err(err(format!(
                    "the rendered chat would exceed {MAX_CHAT_BYTES} bytes"
                )));
            }
            let mut buf = vec![0u8; length];
            // SAFETY: the template and every message are NUL-terminated
            // strings that outlive the call; `chat` holds `chat.len()`
            // messages and the buffer `length` bytes (< i32::MAX, checked
            // above).
            let n = unsafe {
                sys::llama_chat_apply_template(
                    c_template.as_ptr(),
                    chat.as_ptr(),
                    chat.len(),
                    add_assistant,
                    buf.as_mut_ptr().cast(),
                    length as i32,
                )
            };
            let Ok(n) = usize::try_from(n) else {
                return Err(err(
                    "llama.cpp does not know the model's chat template                      (llama_chat_apply_template renders the templates it recognizes)"
                        .into(),
                ));
            };
            if n <= length {
                buf.truncate(n);
                return String::from_utf8(buf)
                    .map_err(|_| err("the rendered chat is not UTF-8".into()));
            }
            length = n;
        }
        Err(err("the rendered chat kept growing".into()))
    }

    /// The text of token `id` (its piece, special tokens as their text);
    /// `<id>` for an id outside the vocabulary.
    pub fn token_text(&self, id: u32) -> String {
        if id as usize >= self.shape.vocab {
            return format!("<{id}>");
        }
        let mut buf = Vec::new();
        self.push_piece(id, &mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    }

    /// Appends the bytes of token `id`'s piece (special tokens as their
    /// text) to `out`; nothing for an id outside the vocabulary.
    fn push_piece(&self, id: u32, out: &mut Vec<u8>) {
        if id as usize >= self.shape.vocab {
            return;
        }
        let start = out.len();
        out.resize(start + 64, 0);
        // SAFETY: live model, id in range, the buffer as long as we say.
        let piece = |out: &mut Vec<u8>| unsafe {
            let vocab = sys::llama_model_get_vocab(self.model.as_ptr());
            let room = i32::try_from(out.len() - start).unwrap_or(i32::MAX);
            sys::llama_token_to_piece(
                vocab,
                id as i32,
                out[start..].as_mut_ptr().cast(),
                room,
                0,
                true,
            )
        };
        let mut n = piece(out);
        if n < 0 {
            out.resize(start + n.unsigned_abs() as usize, 0);
            n = piece(out);
        }
        out.truncate(start + usize::try_from(n).unwrap_or(0));
    }

    /// The text of `ids`: their pieces' bytes joined, then read as UTF-8
    /// (a character split across tokens is whole again).
    pub fn detokenize(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::new();
        for &id in ids {
            self.push_piece(id, &mut bytes);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Whether `id` ends a generation (end of sequence, end of turn).
    pub fn is_eog(&self, id: u32) -> bool {
        if id as usize >= self.shape.vocab {
            return false;
        }
        // SAFETY: live model, id in range.
        unsafe {
            sys::llama_vocab_is_eog(sys::llama_model_get_vocab(self.model.as_ptr()), id as i32)
        }
    }

    /// Empties the KV cache: the next decode starts at position 0.
    pub fn clear(&mut self) {
        // SAFETY: live context.
        unsafe { sys::llama_memory_clear(sys::llama_get_memory(self.ctx.as_ptr()), true) };
        self.position = 0;
    }

    /// The positions llama.cpp's memory holds for the sequence
    /// (`llama_memory_seq_pos_min..=max`), or `None` when it is empty.
    pub fn kv_positions(&self) -> Option<(usize, usize)> {
        // SAFETY: live context.
        let (lo, hi) = unsafe {
            let mem = sys::llama_get_memory(self.ctx.as_ptr());
            (
                sys::llama_memory_seq_pos_min(mem, 0),
                sys::llama_memory_seq_pos_max(mem, 0),
            )
        };
        Some((usize::try_from(lo).ok()?, usize::try_from(hi).ok()?))
    }

    /// Runs `tokens` at the next positions, in batches of
    /// [`LlamaCppOptions::batch`], and returns the logits of the last one.
    pub fn forward(&mut self, tokens: &[u32]) -> Result<&[f32], LlamaCppError> {
        if tokens.is_empty() {
            return Err(LlamaCppError::Empty);
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= self.shape.vocab) {
            return Err(LlamaCppError::Token(bad));
        }
        let needed = self.position + tokens.len();
        if needed > self.capacity() {
            return Err(LlamaCppError::ContextFull {
                needed,
                capacity: self.capacity(),
            });
        }
        let chunks = tokens.len().div_ceil(self.batch_capacity);
        for (i, chunk) in tokens.chunks(self.batch_capacity).enumerate() {
            self.decode(chunk, i + 1 == chunks)?;
        }
        self.logits(-1)
    }

    /// The logits of output row `i` of the last decode (`-1`: its last).
    fn logits(&self, i: i32) -> Result<&[f32], LlamaCppError> {
        // SAFETY: live context; llama.cpp owns the buffer until the next
        // decode, which needs `&mut self`.
        unsafe {
            let p = sys::llama_get_logits_ith(self.ctx.as_ptr(), i);
            if p.is_null() {
                return Err(LlamaCppError::Decode(format!("no logits for output {i}")));
            }
            Ok(std::slice::from_raw_parts(p, self.shape.vocab))
        }
    }

    /// Greedy generation: empties the cache, runs `prompt` as one batch (up
    /// to [`LlamaCppOptions::batch`] positions), then up to `max_tokens`
    /// tokens, each the argmax of the logits before it; stops after an
    /// end-of-generation token, which it returns with the others.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        max_tokens: usize,
        mut on_token: impl FnMut(u32),
    ) -> Result<Vec<u32>, LlamaCppError> {
        self.clear();
        let needed = prompt.len() + max_tokens.saturating_sub(1);
        if needed > self.capacity() {
            return Err(LlamaCppError::ContextFull {
                needed,
                capacity: self.capacity(),
            });
        }
        let mut tokens = Vec::with_capacity(max_tokens);
        if max_tokens == 0 {
            self.forward(prompt)?;
            return Ok(tokens);
        }
        let mut next = argmax(self.forward(prompt)?);
        loop {
            tokens.push(next);
            on_token(next);
            if tokens.len() == max_tokens || self.is_eog(next) {
                return Ok(tokens);
            }
            next = argmax(self.forward(&[next])?);
        }
    }

    /// One `llama_decode` of `tokens` at the next positions; `last` says
    /// whether it ends the tokens of a [`forward`](Self::forward).
    fn decode(&mut self, tokens: &[u32], last: bool) -> Result<(), LlamaCppError> {
        let n = tokens.len();
        let start = self.position;
        // Which rows are outputs: untraced, llama.cpp's usual (the last
        // row of the last batch); traced, the last row of every batch, or
        // every row when the tracer wants every row's logits.
        let mut every = false;
        let mut output_last = last;
        traced!(C, {
            every = self
                .tracer()
                .options()
                .is_some_and(|o| o.logit_rows == LogitRows::Every);
            output_last = true;
        });
        // SAFETY: the batch holds `batch_capacity >= n` entries, each with
        // one sequence id (llama_batch_init(.., 0, 1)).
        unsafe {
            let b = &mut self.batch;
            b.n_tokens = n as i32;
            for (i, &t) in tokens.iter().enumerate() {
                *b.token.add(i) = t as i32;
                *b.pos.add(i) = (start + i) as i32;
                *b.n_seq_id.add(i) = 1;
                *(*b.seq_id.add(i)) = 0;
                *b.logits.add(i) = i8::from(every || (output_last && i + 1 == n));
            }
        }
        let plan = Plan {
            start,
            rows: n,
            split: n > 1 && !every,
        };
        traced!(C, self.begin_traced(plan, tokens, every));
        // SAFETY: live context and batch; the callback's state is not
        // borrowed during the call.
        let rc = unsafe { sys::llama_decode(self.ctx.as_ptr(), self.batch) };
        if let Some(failure) = self.capture_mut().failure.take() {
            traced!(C, self.tracer_mut().end_forward());
            return Err(LlamaCppError::Decode(failure));
        }
        if rc != 0 {
            traced!(C, self.tracer_mut().end_forward());
            return Err(LlamaCppError::Decode(format!(
                "llama_decode returned {rc} for {n} tokens at position {start}"
            )));
        }
        self.position += n;
        traced!(C, self.finish_traced(plan, tokens, every));
        Ok(())
    }

    /// Opens the forward the callback streams into.
    fn begin_traced(&mut self, plan: Plan, tokens: &[u32], every: bool) {
        let keep_outputs =
            (every || !plan.split) && self.lens.is_some() && self.tracer().wants_logit_lens();
        let capture = self.capture_mut();
        capture.start(plan, keep_outputs);
        let streamed = plan.streamed();
        if streamed > 0 {
            capture.tracer.begin_forward_rows(plan.start, streamed);
            capture.tracer.input_tokens(&tokens[..streamed]);
        }
    }

    /// After the decode: each row's logits, lens and KV state; the last row
    /// of a split decode as a forward of its own.
    fn finish_traced(&mut self, plan: Plan, tokens: &[u32], every: bool) {
        let pos_min = self.kv_positions().map_or(0, |(lo, _)| lo);
        let kv = KvFacts {
            capacity: self.capacity(),
            pos_min,
            bytes_per_position: self.shape.layers
                * self.shape.kv_heads
                * (self.shape.head_dim + self.shape.value_dim)
                * if self.options().f32_cache { 4 } else { 2 },
        };
        let streamed = plan.streamed();
        for row in 0..streamed {
            self.capture_mut().tracer.focus_row(row);
            if (every || row + 1 == plan.rows) && self.tracer().wants_logits(row) {
                self.record_logits(row, None, row + 1 == plan.rows);
            }
            let p = plan.start + row;
            self.capture_mut().tracer.kv_state(|| kv.state(p));
        }
        if streamed > 0 {
            self.capture_mut().tracer.end_forward();
        }
        if !plan.split {
            return;
        }
        // The last row, from what the callback kept aside.
        let row = plan.rows - 1;
        let p = plan.start + row;
        let layers = self.shape.layers;
        {
            let capture = self.capture_mut();
            let Capture { tracer, last, .. } = capture;
            tracer.begin_forward_rows(p, 1);
            tracer.input_tokens(&tokens[row..]);
            if last.embedding.present {
                tracer.activation(0, Stage::Embedding, &last.embedding.data);
                tracer.activation(0, Stage::Input, &last.embedding.data);
            }
            for l in 0..layers {
                let Some(stages) = last.stages.get(l) else {
                    break;
                };
                let order = [
                    Stage::PostNorm,
                    Stage::PostAttn,
                    Stage::PostFfnNorm,
                    Stage::PostFfn,
                    Stage::Output,
                ];
                if let Some((kept, n_kv)) = last.attention.get(l).filter(|(k, _)| k.present) {
                    let n_kv = *n_kv;
                    for (h, w) in kept.data.chunks_exact(n_kv.max(1)).enumerate() {
                        if tracer.wants_attention(l, h) {
                            tracer.attention(l, h, p, &w[..(p + 1).min(n_kv)]);
                        }
                    }
                }
                for (stage, kept) in order.into_iter().zip(stages) {
                    if !kept.present {
                        continue;
                    }
                    tracer.activation(l, stage, &kept.data);
                    if stage == Stage::Output {
                        if l + 1 < layers {
                            tracer.activation(l + 1, Stage::Input, &kept.data);
                        }
                        tracer.residual_from_stages(l);
                    }
                }
            }
            if last.final_norm.present {
                tracer.activation(0, Stage::FinalNorm, &last.final_norm.data);
            }
        }
        if self.tracer().wants_logits(0) {
            self.record_logits(0, Some(()), true);
        }
        self.capture_mut().tracer.kv_state(|| kv.state(p));
        self.capture_mut().tracer.end_forward();
    }

    /// The lens and the final logits of output row `row` of the decode, for
    /// the row in focus; the lens reads each layer's output of that row
    /// (kept aside for the last row of a split decode: `from_last`).
    /// `selects` marks the argmax as the token chosen there.
    fn record_logits(&mut self, row: usize, from_last: Option<()>, selects: bool) {
        let out_index = if from_last.is_some() { -1 } else { row as i32 };
        let Ok(logits) = self.logits(out_index).map(<[f32]>::to_vec) else {
            return;
        };
        let d = self.shape.dim;
        if let Some(mut lens) = self.lens.take() {
            if self.tracer().wants_logit_lens() {
                let mut out = std::mem::take(&mut self.lens_out);
                let capture = self.capture();
                let states: Option<Vec<&[f32]>> = if from_last.is_some() {
                    capture.last.outputs()
                } else {
                    capture
                        .outputs
                        .iter()
                        .map(|o| {
                            o.present
                                .then(|| o.data.get(row * d..(row + 1) * d))
                                .flatten()
                        })
                        .collect()
                };
                if let Some(states) = states {
                    let vocab = lens.vocab();
                    out.resize(states.len() * vocab, 0.0);
                    lens.fill(&states, &mut out);
                    let layers: Vec<usize> = (0..states.len()).collect();
                    self.capture_mut()
                        .tracer
                        .logit_lens_layers(&layers, vocab, |dst| dst.copy_from_slice(&out));
                }
                self.lens_out = out;
            }
            self.lens = Some(lens);
        }
        let tracer = &mut self.capture_mut().tracer;
        tracer.final_logits(&logits);
        if selects {
            tracer.selected_token(argmax(&logits));
        }
    }
}

/// What the KV state of a position is computed from.
struct KvFacts {
    capacity: usize,
    pos_min: usize,
    bytes_per_position: usize,
}

impl KvFacts {
    /// The state after position `p` was decoded: positions `pos_min..=p`
    /// held, one computed, the others read from the cache.
    fn state(&self, p: usize) -> KvCacheStateTrace {
        let valid = (p + 1).saturating_sub(self.pos_min).min(self.capacity);
        let reused = valid.saturating_sub(1);
        KvCacheStateTrace {
            step: p,
            max_positions: self.capacity,
            valid_positions: valid,
            cache_size_bytes: valid * self.bytes_per_position,
            cache_hit_rate: reused as f32 / (p + 1) as f32,
            evictions_this_step: 0,
            reused_positions: reused,
            computed_positions: 1,
        }
    }
}

/// A chat template llama.cpp renders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatTemplate {
    /// The model file's own (`tokenizer.chat_template`), its text.
    Model(String),
    /// None in the file: llama.cpp's built-in template of this name, the
    /// model's architecture's.
    Builtin(String),
}

/// The names of llama.cpp's built-in chat templates
/// (`llama_chat_builtin_templates`).
pub fn builtin_chat_templates() -> Vec<String> {
    // SAFETY: with no room llama.cpp writes nothing and returns the count;
    // then it writes at most `names.len()` pointers to static strings.
    unsafe {
        let n = sys::llama_chat_builtin_templates(std::ptr::null_mut(), 0);
        let mut names = vec![std::ptr::null::<c_char>(); usize::try_from(n).unwrap_or(0)];
        sys::llama_chat_builtin_templates(names.as_mut_ptr(), names.len());
        names.into_iter().map(|p| c_text(p)).collect()
    }
}

/// The first largest finite logit's id (0 when none is finite).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best: Option<(usize, f32)> = None;
    for (i, &v) in logits.iter().enumerate() {
        if v.is_nan() {
            continue;
        }
        if best.is_none_or(|(_, b)| v > b) {
            best = Some((i, v));
        }
    }
    best.map_or(0, |(i, _)| i as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_takes_the_first_largest_and_skips_nan() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax(&[f32::NAN, -1.0, f32::NAN, -0.5]), 3);
        assert_eq!(argmax(&[]), 0);
        assert_eq!(argmax(&[f32::NAN]), 0);
    }

    #[test]
    fn the_kv_state_counts_the_positions_held() {
        let kv = KvFacts {
            capacity: 8,
            pos_min: 0,
            bytes_per_position: 10,
        };
        let s = kv.state(4);
        assert_eq!(
            (
                s.step,
                s.valid_positions,
                s.reused_positions,
                s.cache_size_bytes
            ),
            (4, 5, 4, 50)
        );
        assert!((s.cache_hit_rate - 0.8).abs() < 1e-6);
        assert_eq!(kv.state(20).valid_positions, 8);
    }
}
