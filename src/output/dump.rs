//! Activation dumps: the full tensors of a run, one row per position, in one
//! safetensors file.
//!
//! Statistics tell that layer 17 went wrong; a dump holds the values, so that
//! two runs (quantized and f32, this decoder and another implementation) can
//! be compared tensor by tensor. The file is a plain safetensors file:
//!
//! | tensor | dtype | shape |
//! |---|---|---|
//! | `tokens` (required) | any integer type; written as `I64`, `-1` = not told | `[T]` |
//! | `positions` (optional; absent = `0..T`) | any integer type, `>= 0`; written as `I64` | `[T]` |
//! | `embedding` | `F32` | `[T, d]` |
//! | `layers.{L}.{stage}`, stage one of `input`, `post_norm`, `post_attn`, `post_ffn_norm`, `post_ffn`, `output` | `F32` | `[T, d]` |
//! | `final_norm` | `F32` | `[T, d]` |
//! | `logits` | `F32` | `[T, vocab]` |
//!
//! Row `t` of every tensor belongs to the forward of `tokens[t]` at
//! `positions[t]`. Any tensor but `tokens` may be absent; no other name is
//! allowed. Layers are numbered below [`MAX_LAYERS`] (4096, as in a trace)
//! and rows hold at most [`MAX_WIDTH`] values. The header's `__metadata__` holds `format = "model-tracer-dump"`
//! and `version = "1"` (a reader accepts a file without them, not one with
//! other values) and whatever else the writer adds (`model`, ...). See
//! "Activation dumps" in `features.md` for a numpy writer in ten lines.
//!
//! A tracer fills a dump when one is installed
//! ([`ModelTracer::set_dump`](crate::ModelTracer::set_dump)); activation
//! tracing must be on, since the rows are copied in the activation hooks:
//!
//! ```
//! use model_tracer::dump::{DumpFilter, DumpRecorder};
//! use model_tracer::{Lightweight, ModelTracer, Stage};
//!
//! let mut tracer = ModelTracer::new(Lightweight);
//! tracer.set_dump(Some(DumpRecorder::new(DumpFilter::default())));
//! for pos in 0..3 {
//!     tracer.begin_forward(pos);
//!     tracer.input_token(10 + pos as u32);
//!     tracer.activation(0, Stage::Embedding, &[pos as f32, 1.0]);
//!     tracer.activation(0, Stage::Input, &[pos as f32, 2.0]);
//!     tracer.final_logits(&[0.5, 0.25, 0.125]);
//!     tracer.end_forward();
//! }
//! let dump = tracer.take_dump().unwrap();
//! assert_eq!(dump.tokens(), &[10, 11, 12]);
//! assert_eq!(dump.dim(), Some(2));
//! let input = dump.activation(Some(0), Stage::Input).unwrap();
//! assert_eq!(input.row(2), Some(&[2.0, 2.0][..]));
//!
//! let again = model_tracer::ActivationDump::from_bytes(&dump.to_bytes()).unwrap();
//! assert_eq!(again.logits().unwrap().row(1), Some(&[0.5, 0.25, 0.125][..]));
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

use safetensors::tensor::TensorInfo;
use safetensors::{Dtype, SafeTensorError, SafeTensors};

use crate::activation::MAX_LAYERS;
use crate::sequence::{BatchRow, SequenceId};
use crate::stage::Stage;

/// `__metadata__["format"]` of a dump.
pub const FORMAT: &str = "model-tracer-dump";
/// `__metadata__["version"]` of the dumps this crate writes and reads.
pub const VERSION: &str = "1";
/// The largest header a reader accepts, in bytes (the limit of the
/// `safetensors` crate): a larger length is refused before anything is
/// allocated for it.
pub const MAX_HEADER_BYTES: u64 = 100_000_000;
/// The widest row a dump holds, in values (16 Mi, the tracer's
/// [`MAX_BUFFER_LEN`](crate::storage::MAX_BUFFER_LEN)): a tensor of zero
/// rows costs nothing whatever width its shape claims, and a reader of the
/// dump that sized a buffer by that width would ask for it all, so a wider
/// one is refused.
pub const MAX_WIDTH: usize = 1 << 24;

/// The name of the tensor holding `stage` (of `layer`, for a stage inside a
/// layer): `layers.3.post_attn`, `embedding`, `logits`. `None` for a layer
/// stage without a layer; the layer of the other stages is ignored.
pub fn tensor_name(layer: Option<usize>, stage: Stage) -> Option<String> {
    Slot::new(layer, stage).map(Slot::name)
}

/// Where a tensor sits in the forward pass: orders the tensors of a dump as
/// the model computes them (embedding, each layer's stages, final norm,
/// logits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Slot {
    /// 0 embedding, 1 a layer, 2 final norm, 3 logits.
    group: u8,
    layer: usize,
    stage: Stage,
}

impl Slot {
    fn new(layer: Option<usize>, stage: Stage) -> Option<Self> {
        let group = match stage {
            Stage::Embedding => 0,
            Stage::FinalNorm => 2,
            Stage::Logits => 3,
            _ => {
                return layer.map(|layer| Slot {
                    group: 1,
                    layer,
                    stage,
                })
            }
        };
        Some(Slot {
            group,
            layer: 0,
            stage,
        })
    }

    /// The slot a hook call `(layer, stage)` fills (the layer is ignored
    /// outside the layers, as the hooks ignore it).
    fn of(layer: usize, stage: Stage) -> Self {
        match Slot::new(Some(layer), stage) {
            Some(s) => s,
            None => unreachable!("a slot with a layer always exists"),
        }
    }

    fn layer(self) -> Option<usize> {
        (self.group == 1).then_some(self.layer)
    }

    fn is_logits(self) -> bool {
        self.stage == Stage::Logits
    }

    fn name(self) -> String {
        match self.layer() {
            Some(l) => format!("layers.{l}.{}", self.stage.name()),
            None => self.stage.name().to_string(),
        }
    }

    /// The slot a tensor name denotes; `None` for a name outside the format
    /// (layer indices are written without leading zeros).
    fn parse(name: &str) -> Option<Self> {
        if let Some(rest) = name.strip_prefix("layers.") {
            let (layer, stage) = rest.split_once('.')?;
            let l: usize = layer.parse().ok()?;
            if l.to_string() != layer {
                return None;
            }
            let stage = Stage::LAYER_STAGES
                .into_iter()
                .find(|s| s.name() == stage)?;
            return Slot::new(Some(l), stage);
        }
        [Stage::Embedding, Stage::FinalNorm, Stage::Logits]
            .into_iter()
            .find(|s| s.name() == name)
            .and_then(|s| Slot::new(None, s))
    }
}

/// The rows of one tensor: `rows × width` values, row-major.
#[derive(Clone, Default)]
struct Column {
    width: usize,
    rows: usize,
    data: Vec<f32>,
}

impl Column {
    fn new(width: usize) -> Self {
        Self {
            width,
            rows: 0,
            data: Vec::new(),
        }
    }

    /// Cuts or pads (with NaN rows) to `rows` rows.
    fn fit(&mut self, rows: usize) {
        self.data.resize(rows * self.width, f32::NAN);
        self.rows = rows;
    }
}

/// One tensor of a dump: `rows()` rows of `width()` values, row `t` for the
/// forward at `positions()[t]`.
#[derive(Debug, Clone, Copy)]
pub struct TensorView<'a> {
    layer: Option<usize>,
    stage: Stage,
    width: usize,
    rows: usize,
    data: &'a [f32],
}

impl<'a> TensorView<'a> {
    /// The layer, for a stage inside a layer.
    pub fn layer(&self) -> Option<usize> {
        self.layer
    }

    /// The stage.
    pub fn stage(&self) -> Stage {
        self.stage
    }

    /// The tensor's name in the file (`layers.3.post_attn`).
    pub fn name(&self) -> String {
        match self.layer {
            Some(l) => format!("layers.{l}.{}", self.stage.name()),
            None => self.stage.name().to_string(),
        }
    }

    /// Values per row: the hidden size, or the vocabulary for the logits.
    pub fn width(&self) -> usize {
        self.width
    }

    /// Rows: one per position of the dump.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// All values, row-major.
    pub fn data(&self) -> &'a [f32] {
        self.data
    }

    /// Row `t` (the forward at `positions()[t]`), if there is one.
    pub fn row(&self, t: usize) -> Option<&'a [f32]> {
        if t >= self.rows {
            return None;
        }
        self.data.get(t * self.width..(t + 1) * self.width)
    }

    /// The rows in order.
    pub fn iter_rows(&self) -> impl Iterator<Item = &'a [f32]> + 'a {
        let (data, width) = (self.data, self.width);
        (0..self.rows).map(move |t| &data[t * width..(t + 1) * width])
    }
}

/// What is wrong with one tensor of a dump.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TensorProblem {
    /// The name is none of the format's.
    UnknownName,
    /// A layer stage was named without a layer.
    NoLayer,
    /// Another element type than the format's.
    Dtype {
        /// The file's type, as safetensors names it (`"F16"`).
        found: String,
        /// What the format asks for.
        expected: &'static str,
    },
    /// Another number of dimensions than the format's.
    Rank {
        /// The tensor's shape.
        shape: Vec<usize>,
        /// Dimensions the format asks for.
        expected: usize,
    },
    /// Not one row per position.
    Rows {
        /// The tensor's rows.
        found: usize,
        /// Positions of the dump (the length of `tokens`).
        expected: usize,
    },
    /// Rows of another width than the tensors of the same kind (hidden
    /// states, or logits).
    Width {
        /// The tensor's width.
        found: usize,
        /// The width of the first tensor of its kind.
        expected: usize,
        /// The first tensor of its kind, which set the width.
        set_by: String,
    },
    /// A value the format does not allow (a negative position, a token id
    /// beyond `i64`).
    Value(String),
    /// A layer index of [`MAX_LAYERS`] or more (the traces' limit).
    Layer {
        /// The layer the name gives.
        found: usize,
    },
    /// Rows of more than [`MAX_WIDTH`] values.
    TooWide {
        /// The tensor's width.
        found: usize,
    },
    /// The header's entry for the tensor is unusable (shape, offsets or
    /// type do not describe its bytes).
    Layout(String),
}

impl fmt::Display for TensorProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TensorProblem::UnknownName => f.write_str(
                "not a name of the format (tokens, positions, embedding, \
                 layers.{L}.{stage}, final_norm, logits)",
            ),
            TensorProblem::NoLayer => f.write_str("a stage inside a layer needs a layer index"),
            TensorProblem::Dtype { found, expected } => {
                write!(f, "element type {found}, expected {expected}")
            }
            TensorProblem::Rank { shape, expected } => {
                let format = if *expected == 1 { "[T]" } else { "[T, width]" };
                write!(f, "shape {shape:?}, but the format's is {format}")
            }
            TensorProblem::Rows { found, expected } => write!(
                f,
                "{found} rows, but `tokens` has {expected} positions (one row each)"
            ),
            TensorProblem::Width {
                found,
                expected,
                set_by,
            } => write!(f, "rows of {found} values, but `{set_by}` has {expected}"),
            TensorProblem::Layer { found } => write!(
                f,
                "layer {found}, but a dump's layers are 0..{MAX_LAYERS} (the limit of a trace)"
            ),
            TensorProblem::TooWide { found } => write!(
                f,
                "rows of {found} values, more than the {MAX_WIDTH} a dump's rows may have"
            ),
            TensorProblem::Value(what) | TensorProblem::Layout(what) => f.write_str(what),
        }
    }
}

/// Why a dump could not be read, built or written.
#[derive(Debug)]
#[non_exhaustive]
pub enum DumpError {
    /// Reading or writing the file failed.
    Io {
        /// The file.
        path: PathBuf,
        /// What the system said.
        error: io::Error,
    },
    /// The bytes are not a safetensors file.
    NotSafetensors(String),
    /// The header length is above [`MAX_HEADER_BYTES`].
    HeaderTooLarge {
        /// The length the file gives.
        bytes: u64,
    },
    /// There is no `tokens` tensor.
    MissingTokens,
    /// One tensor breaks the format.
    Tensor {
        /// Its name.
        name: String,
        /// What is wrong with it.
        problem: TensorProblem,
    },
    /// `__metadata__` says the file is of another format or version.
    Metadata {
        /// The key (`format`, `version`).
        key: String,
        /// Its value in the file.
        value: String,
    },
}

impl DumpError {
    /// The tensor the error is about, if it is about one.
    pub fn tensor(&self) -> Option<&str> {
        match self {
            DumpError::Tensor { name, .. } => Some(name),
            DumpError::MissingTokens => Some("tokens"),
            _ => None,
        }
    }

    fn tensor_error(name: &str, problem: TensorProblem) -> Self {
        DumpError::Tensor {
            name: name.to_string(),
            problem,
        }
    }
}

impl fmt::Display for DumpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DumpError::Io { path, error } => write!(f, "{}: {error}", path.display()),
            DumpError::NotSafetensors(why) => write!(f, "not a safetensors file: {why}"),
            DumpError::HeaderTooLarge { bytes } => write!(
                f,
                "the header length (the file's first 8 bytes) is {bytes}, more than the \
                 {MAX_HEADER_BYTES} bytes a dump's header may have"
            ),
            DumpError::MissingTokens => f.write_str("tensor `tokens`: missing (it is required)"),
            DumpError::Tensor { name, problem } => write!(f, "tensor `{name}`: {problem}"),
            DumpError::Metadata { key, value } => write!(
                f,
                "__metadata__ {key} = {value:?}: this reader reads format \
                 {FORMAT:?}, version {VERSION:?}"
            ),
        }
    }
}

impl std::error::Error for DumpError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            DumpError::Io { error, .. } => Some(error),
            _ => None,
        }
    }
}

/// The activations of a run, in memory: per position the token and, for
/// each tensor present, one row. Read from and written to a safetensors
/// file (see the [module docs](self) for the format); filled by a
/// [`DumpRecorder`] or built by hand with [`new`](Self::new) and
/// [`insert`](Self::insert).
#[derive(Clone)]
pub struct ActivationDump {
    tokens: Vec<i64>,
    positions: Vec<usize>,
    tensors: BTreeMap<Slot, Column>,
    metadata: BTreeMap<String, String>,
}

impl fmt::Debug for ActivationDump {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ActivationDump")
            .field("positions", &self.tokens.len())
            .field("tensors", &self.tensors.len())
            .field("dim", &self.dim())
            .field("vocab", &self.vocab())
            .field("metadata", &self.metadata)
            .finish()
    }
}

fn default_metadata() -> BTreeMap<String, String> {
    BTreeMap::from([
        ("format".to_string(), FORMAT.to_string()),
        ("version".to_string(), VERSION.to_string()),
    ])
}

impl ActivationDump {
    /// A dump of `tokens.len()` positions, `0..T`, with no tensor yet.
    pub fn new(tokens: Vec<i64>) -> Self {
        Self {
            positions: (0..tokens.len()).collect(),
            tokens,
            tensors: BTreeMap::new(),
            metadata: default_metadata(),
        }
    }

    /// Sets the positions of the rows (one per token).
    pub fn set_positions(&mut self, positions: Vec<usize>) -> Result<(), DumpError> {
        if positions.len() != self.tokens.len() {
            return Err(DumpError::tensor_error(
                "positions",
                TensorProblem::Rows {
                    found: positions.len(),
                    expected: self.tokens.len(),
                },
            ));
        }
        self.positions = positions;
        Ok(())
    }

    /// Adds (or replaces) the tensor of `stage` (of `layer`, inside a
    /// layer): `data` holds one row of `width` values per position. A layer
    /// of [`MAX_LAYERS`] or more and a width above [`MAX_WIDTH`] are
    /// refused, as the reader refuses them.
    pub fn insert(
        &mut self,
        layer: Option<usize>,
        stage: Stage,
        width: usize,
        data: Vec<f32>,
    ) -> Result<(), DumpError> {
        let Some(slot) = Slot::new(layer, stage) else {
            return Err(DumpError::tensor_error(
                &format!("layers.?.{}", stage.name()),
                TensorProblem::NoLayer,
            ));
        };
        let t = self.tokens.len();
        let rows = data.len().checked_div(width).unwrap_or(t);
        if rows != t || rows.checked_mul(width) != Some(data.len()) {
            return Err(DumpError::tensor_error(
                &slot.name(),
                TensorProblem::Rows {
                    found: rows,
                    expected: t,
                },
            ));
        }
        self.insert_column(slot, Column { width, rows, data })
    }

    fn insert_column(&mut self, slot: Slot, column: Column) -> Result<(), DumpError> {
        if let Some(layer) = slot.layer().filter(|&l| l >= MAX_LAYERS) {
            return Err(DumpError::tensor_error(
                &slot.name(),
                TensorProblem::Layer { found: layer },
            ));
        }
        if column.width > MAX_WIDTH {
            return Err(DumpError::tensor_error(
                &slot.name(),
                TensorProblem::TooWide {
                    found: column.width,
                },
            ));
        }
        if let Some((other, c)) = self
            .tensors
            .iter()
            .find(|(s, _)| s.is_logits() == slot.is_logits() && **s != slot)
        {
            if c.width != column.width {
                return Err(DumpError::tensor_error(
                    &slot.name(),
                    TensorProblem::Width {
                        found: column.width,
                        expected: c.width,
                        set_by: other.name(),
                    },
                ));
            }
        }
        self.tensors.insert(slot, column);
        Ok(())
    }

    /// Positions (rows) in the dump.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether the dump has no position.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The token id fed at each row; `-1` where the model did not name it.
    pub fn tokens(&self) -> &[i64] {
        &self.tokens
    }

    /// The position of each row.
    pub fn positions(&self) -> &[usize] {
        &self.positions
    }

    /// The tensor of `stage` (of `layer`, for a stage inside a layer; the
    /// layer is ignored for `Embedding`, `FinalNorm` and `Logits`), if the
    /// dump has it.
    pub fn activation(&self, layer: Option<usize>, stage: Stage) -> Option<TensorView<'_>> {
        let slot = Slot::new(layer, stage)?;
        self.tensors.get(&slot).map(|c| view(slot, c))
    }

    /// The output logits, if the dump has them.
    pub fn logits(&self) -> Option<TensorView<'_>> {
        self.activation(None, Stage::Logits)
    }

    /// The hidden size: the width of every tensor but the logits (`None`
    /// when there is none).
    pub fn dim(&self) -> Option<usize> {
        self.tensors
            .iter()
            .find(|(s, _)| !s.is_logits())
            .map(|(_, c)| c.width)
    }

    /// The vocabulary size: the width of the logits, if present.
    pub fn vocab(&self) -> Option<usize> {
        self.logits().map(|l| l.width())
    }

    /// The layers that have at least one tensor, in order.
    pub fn layers(&self) -> Vec<usize> {
        let mut layers: Vec<usize> = self.tensors.keys().filter_map(|s| s.layer()).collect();
        layers.dedup();
        layers
    }

    /// Every tensor, in the order of the forward pass (embedding, layer 0's
    /// stages, layer 1's, ..., final norm, logits).
    pub fn tensors(&self) -> impl Iterator<Item = TensorView<'_>> + '_ {
        self.tensors.iter().map(|(&s, c)| view(s, c))
    }

    /// The header's `__metadata__`: `format`, `version`, and what the
    /// writer added (`model`, ...).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// Sets a metadata entry. `format` and `version` are always written
    /// with this crate's values.
    pub fn set_metadata(&mut self, key: impl Into<String>, value: impl Into<String>) {
        self.metadata.insert(key.into(), value.into());
    }

    /// Reads a dump file.
    pub fn read(path: impl AsRef<Path>) -> Result<Self, DumpError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|error| DumpError::Io {
            path: path.to_path_buf(),
            error,
        })?;
        Self::from_bytes(&bytes)
    }

    /// Parses the bytes of a dump file.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, DumpError> {
        let n = header_len(bytes)?;
        let (_, meta) = SafeTensors::read_metadata(bytes).map_err(|e| diagnose(bytes, n, e))?;
        let data = bytes.get(8 + n..).unwrap_or_default();

        let mut metadata = BTreeMap::new();
        for (k, v) in meta.metadata().iter().flat_map(|m| m.iter()) {
            metadata.insert(k.clone(), v.clone());
        }
        for (key, wanted) in [("format", FORMAT), ("version", VERSION)] {
            if let Some(value) = metadata.get(key).filter(|v| *v != wanted) {
                return Err(DumpError::Metadata {
                    key: key.to_string(),
                    value: value.clone(),
                });
            }
        }
        // A file without them is of this format and version: the dump says
        // so, as one made by `new` does and as `to_bytes` writes it.
        metadata.extend(default_metadata());

        let mut infos: Vec<(String, &TensorInfo)> = meta.tensors().into_iter().collect();
        infos.sort_by(|a, b| a.0.cmp(&b.0));
        let bytes_of = |name: &str, info: &TensorInfo| {
            let (s, e) = info.data_offsets;
            data.get(s..e).ok_or_else(|| {
                DumpError::tensor_error(
                    name,
                    TensorProblem::Layout(format!("bytes {s}..{e} are outside the data")),
                )
            })
        };
        let find = |wanted: &str| infos.iter().find(|(name, _)| name == wanted);

        let Some((_, info)) = find("tokens") else {
            return Err(DumpError::MissingTokens);
        };
        let tokens = integers("tokens", info, bytes_of("tokens", info)?)?;
        let t = tokens.len();
        let mut dump = ActivationDump {
            positions: (0..t).collect(),
            tokens,
            tensors: BTreeMap::new(),
            metadata,
        };
        if let Some((_, info)) = find("positions") {
            let values = integers("positions", info, bytes_of("positions", info)?)?;
            let positions = values
                .into_iter()
                .map(|p| usize::try_from(p).ok())
                .collect::<Option<Vec<usize>>>()
                .ok_or_else(|| {
                    DumpError::tensor_error(
                        "positions",
                        TensorProblem::Value("a negative position".into()),
                    )
                })?;
            dump.set_positions(positions)?;
        }

        let mut slots = Vec::with_capacity(infos.len());
        for (name, info) in &infos {
            if name == "tokens" || name == "positions" {
                continue;
            }
            let slot = Slot::parse(name)
                .ok_or_else(|| DumpError::tensor_error(name, TensorProblem::UnknownName))?;
            slots.push((slot, name, *info));
        }
        // Checked in forward order: the first tensor of a kind sets its width.
        slots.sort_by_key(|(slot, _, _)| *slot);
        for (slot, name, info) in slots {
            if info.dtype != Dtype::F32 {
                return Err(DumpError::tensor_error(
                    name,
                    TensorProblem::Dtype {
                        found: format!("{:?}", info.dtype),
                        expected: "F32",
                    },
                ));
            }
            let &[rows, width] = info.shape.as_slice() else {
                return Err(DumpError::tensor_error(
                    name,
                    TensorProblem::Rank {
                        shape: info.shape.clone(),
                        expected: 2,
                    },
                ));
            };
            if rows != t {
                return Err(DumpError::tensor_error(
                    name,
                    TensorProblem::Rows {
                        found: rows,
                        expected: t,
                    },
                ));
            }
            let data = bytes_of(name, info)?
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            dump.insert_column(slot, Column { width, rows, data })?;
        }
        Ok(dump)
    }

    /// The dump as the bytes of a safetensors file.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        if let Err(e) = self.write_to(&mut out) {
            unreachable!("writing into a Vec cannot fail: {e}");
        }
        out
    }

    /// Writes the dump to a file (created or truncated).
    pub fn write(&self, path: impl AsRef<Path>) -> Result<(), DumpError> {
        let path = path.as_ref();
        let io = |error| DumpError::Io {
            path: path.to_path_buf(),
            error,
        };
        let file = std::fs::File::create(path).map_err(io)?;
        let mut out = io::BufWriter::new(file);
        self.write_to(&mut out)
            .and_then(|()| out.flush())
            .map_err(io)
    }

    /// Writes the dump as a safetensors file to `out`: the header's length
    /// (8 bytes, little-endian), the JSON header padded with spaces to a
    /// multiple of 8 bytes, then the tensors' bytes in the order of the
    /// header: `tokens`, `positions`, and the activations in forward order.
    pub fn write_to(&self, mut out: impl Write) -> io::Result<()> {
        let t = self.tokens.len();
        let mut header = String::from("{\"__metadata__\":{");
        let mut metadata = self.metadata.clone();
        metadata.extend(default_metadata());
        for (i, (k, v)) in metadata.iter().enumerate() {
            if i > 0 {
                header.push(',');
            }
            header.push_str(&json_string(k));
            header.push(':');
            header.push_str(&json_string(v));
        }
        header.push('}');
        let mut offset = 0usize;
        let mut entry = |name: &str, dtype: &str, shape: &[usize], bytes: usize| {
            let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
            header.push_str(&format!(
                ",\"{name}\":{{\"dtype\":\"{dtype}\",\"shape\":[{}],\"data_offsets\":[{offset},{}]}}",
                dims.join(","),
                offset + bytes
            ));
            offset += bytes;
        };
        entry("tokens", "I64", &[t], 8 * t);
        entry("positions", "I64", &[t], 8 * t);
        for (slot, c) in &self.tensors {
            entry(&slot.name(), "F32", &[t, c.width], 4 * c.data.len());
        }
        header.push('}');
        while header.len() % 8 != 0 {
            header.push(' ');
        }
        out.write_all(&(header.len() as u64).to_le_bytes())?;
        out.write_all(header.as_bytes())?;
        // Values go out through a small buffer, not one call per value.
        const CHUNK: usize = 1 << 16;
        let mut buf = Vec::with_capacity(CHUNK + 8);
        let positions = self.positions.iter().map(|&p| p as i64);
        for v in self.tokens.iter().copied().chain(positions) {
            buf.extend_from_slice(&v.to_le_bytes());
            if buf.len() >= CHUNK {
                out.write_all(&buf)?;
                buf.clear();
            }
        }
        for v in self.tensors.values().flat_map(|c| &c.data) {
            buf.extend_from_slice(&v.to_le_bytes());
            if buf.len() >= CHUNK {
                out.write_all(&buf)?;
                buf.clear();
            }
        }
        out.write_all(&buf)
    }
}

fn view(slot: Slot, c: &Column) -> TensorView<'_> {
    TensorView {
        layer: slot.layer(),
        stage: slot.stage,
        width: c.width,
        rows: c.rows,
        data: &c.data,
    }
}

/// A JSON string literal (quotes and escapes) for a metadata key or value.
fn json_string(s: &str) -> String {
    match serde_json::to_string(s) {
        Ok(j) => j,
        Err(e) => unreachable!("a str always serializes: {e}"),
    }
}

/// The header's length, checked against the limit and the file before the
/// header is parsed.
fn header_len(bytes: &[u8]) -> Result<usize, DumpError> {
    let Some(len) = bytes.first_chunk::<8>() else {
        return Err(DumpError::NotSafetensors(format!(
            "{} bytes, fewer than the 8 of the header length",
            bytes.len()
        )));
    };
    let n = u64::from_le_bytes(*len);
    if n > MAX_HEADER_BYTES {
        return Err(DumpError::HeaderTooLarge { bytes: n });
    }
    let rest = bytes.len() - 8;
    match usize::try_from(n) {
        Ok(n) if n <= rest => Ok(n),
        _ => Err(DumpError::NotSafetensors(format!(
            "a header of {n} bytes, but only {rest} bytes follow the length"
        ))),
    }
}

/// The integers of a `[T]` tensor, as `i64`.
fn integers(name: &str, info: &TensorInfo, bytes: &[u8]) -> Result<Vec<i64>, DumpError> {
    if info.shape.len() != 1 {
        return Err(DumpError::tensor_error(
            name,
            TensorProblem::Rank {
                shape: info.shape.clone(),
                expected: 1,
            },
        ));
    }
    fn each<const N: usize, T>(bytes: &[u8], f: impl Fn([u8; N]) -> T) -> Vec<T> {
        bytes
            .chunks_exact(N)
            .map(|c| {
                let mut a = [0u8; N];
                a.copy_from_slice(c);
                f(a)
            })
            .collect()
    }
    let wide = |v: u64| i64::try_from(v).ok();
    Ok(match info.dtype {
        Dtype::I8 => each(bytes, |b: [u8; 1]| i8::from_le_bytes(b).into()),
        Dtype::U8 => each(bytes, |b: [u8; 1]| b[0].into()),
        Dtype::I16 => each(bytes, |b| i16::from_le_bytes(b).into()),
        Dtype::U16 => each(bytes, |b| u16::from_le_bytes(b).into()),
        Dtype::I32 => each(bytes, |b| i32::from_le_bytes(b).into()),
        Dtype::U32 => each(bytes, |b| u32::from_le_bytes(b).into()),
        Dtype::I64 => each(bytes, i64::from_le_bytes),
        Dtype::U64 => each(bytes, |b| wide(u64::from_le_bytes(b)))
            .into_iter()
            .collect::<Option<Vec<i64>>>()
            .ok_or_else(|| {
                DumpError::tensor_error(
                    name,
                    TensorProblem::Value("a value beyond the range of i64".into()),
                )
            })?,
        other => {
            return Err(DumpError::tensor_error(
                name,
                TensorProblem::Dtype {
                    found: format!("{other:?}"),
                    expected: "an integer type (I8..I64, U8..U64)",
                },
            ))
        }
    })
}

/// Turns an error of the safetensors parser into one that names the tensor
/// at fault, by reading the header again entry by entry.
fn diagnose(bytes: &[u8], n: usize, error: SafeTensorError) -> DumpError {
    let generic = || DumpError::NotSafetensors(error.to_string());
    let Some(header) = bytes.get(8..8 + n) else {
        return generic();
    };
    let Ok(text) = std::str::from_utf8(header) else {
        return DumpError::NotSafetensors("the header is not UTF-8".into());
    };
    let value: serde_json::Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => return DumpError::NotSafetensors(format!("the header is not JSON: {e}")),
    };
    let Some(map) = value.as_object() else {
        return DumpError::NotSafetensors("the header is not a JSON object".into());
    };
    let data_len = bytes.len() - 8 - n;
    let layout =
        |name: &str, what: String| DumpError::tensor_error(name, TensorProblem::Layout(what));
    let mut spans = Vec::new();
    for (name, entry) in map {
        if name == "__metadata__" {
            if !entry
                .as_object()
                .is_some_and(|m| m.values().all(|v| v.is_string()))
            {
                return DumpError::NotSafetensors(
                    "__metadata__ is not a map of strings to strings".into(),
                );
            }
            continue;
        }
        let dtype = entry
            .get("dtype")
            .and_then(|d| serde_json::from_value::<Dtype>(d.clone()).ok());
        let shape = entry.get("shape").and_then(|s| {
            s.as_array()?
                .iter()
                .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
                .collect::<Option<Vec<usize>>>()
        });
        let offsets = entry
            .get("data_offsets")
            .and_then(|o| match o.as_array()?.as_slice() {
                [s, e] => Some((
                    usize::try_from(s.as_u64()?).ok()?,
                    usize::try_from(e.as_u64()?).ok()?,
                )),
                _ => None,
            });
        let (Some(dtype), Some(shape), Some(offsets)) = (dtype, &shape, offsets) else {
            let what = match (dtype, &shape) {
                (None, _) => match entry.get("dtype") {
                    Some(d) => format!("dtype {d} is not an element type of safetensors"),
                    None => "no dtype".into(),
                },
                (_, None) => "no shape of non-negative integers".into(),
                _ => "no data_offsets [start, end]".into(),
            };
            return layout(name, format!("the header entry has {what}"));
        };
        let bits = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .and_then(|n| n.checked_mul(dtype.bitsize()));
        let (s, e) = offsets;
        match bits.map(|bits| (bits / 8, bits % 8)) {
            None => return layout(name, format!("shape {shape:?} overflows")),
            Some((_, odd)) if odd != 0 => {
                return layout(
                    name,
                    format!("{dtype:?} {shape:?} is not a whole number of bytes"),
                )
            }
            Some((size, _)) if e < s || e - s != size => {
                return layout(
                    name,
                    format!(
                    "data_offsets [{s}, {e}] hold {} bytes, but {dtype:?} {shape:?} needs {size}",
                    e.saturating_sub(s)
                ),
                )
            }
            Some(_) if e > data_len => {
                return layout(
                    name,
                    format!("its data ends at byte {e}, but the file has {data_len} bytes of data"),
                )
            }
            Some(_) => spans.push((s, e, name.clone())),
        }
    }
    spans.sort();
    let mut at = 0;
    for (s, e, name) in &spans {
        if *s != at {
            return layout(
                name,
                format!("its data starts at byte {s}, but the previous tensor ends at {at}"),
            );
        }
        at = *e;
    }
    if at != data_len {
        return DumpError::NotSafetensors(format!(
            "the tensors cover {at} bytes of data, but the file has {data_len}"
        ));
    }
    generic()
}

/// Which tensors a [`DumpRecorder`] keeps. `None` keeps everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DumpFilter {
    /// Layers whose stages are kept. Applies to the stages inside a layer
    /// only: `embedding`, `final_norm` and `logits` have no layer.
    pub layers: Option<Vec<usize>>,
    /// Stages kept, [`Stage::Embedding`], [`Stage::FinalNorm`] and
    /// [`Stage::Logits`] included: a list that does not name them drops
    /// them.
    pub stages: Option<Vec<Stage>>,
    /// Positions whose forwards are kept (by the position given to
    /// `begin_forward`); the others record nothing, not even their token.
    pub positions: Option<Range<usize>>,
    /// The sequence whose rows are kept in forwards over several
    /// sequences ([`ModelTracer::begin_forward_batch`](crate::ModelTracer::begin_forward_batch)):
    /// a dump holds the forwards of one sequence. `None` keeps the
    /// forwards of the one-sequence API and no row of a batch forward;
    /// `Some(id)` keeps the rows of `id` in batch forwards, as if the
    /// sequence had run alone, and no forward of the one-sequence API.
    pub sequence: Option<SequenceId>,
}

impl DumpFilter {
    /// Whether the tensor of `(layer, stage)` is kept.
    pub fn wants(&self, layer: usize, stage: Stage) -> bool {
        let stage_ok = self.stages.as_ref().is_none_or(|s| s.contains(&stage));
        let layer_ok =
            !stage.is_layer_stage() || self.layers.as_ref().is_none_or(|l| l.contains(&layer));
        stage_ok && layer_ok
    }

    /// Whether the forward at `position` is kept.
    pub fn wants_position(&self, position: usize) -> bool {
        self.positions
            .as_ref()
            .is_none_or(|r| r.contains(&position))
    }
}

/// Collects the full tensors of the forwards a [`DumpFilter`] selects,
/// to make an [`ActivationDump`] of them at the end
/// ([`finish`](Self::finish)): safetensors needs every size before the
/// first byte, so nothing is written while the model runs.
///
/// A tracer feeds it from its hooks once installed with
/// [`ModelTracer::set_dump`](crate::ModelTracer::set_dump); its methods
/// can also be called directly, in the order of a forward pass:
/// [`begin_forward`](Self::begin_forward), [`input_token`](Self::input_token),
/// [`activation`](Self::activation)..., [`end_forward`](Self::end_forward).
///
/// A row is kept when its forward ends; a stage not reached in a kept
/// forward is a row of NaN. The first row of the hidden states (and of the
/// logits) sets their width; a row of another width is kept as NaN too and
/// counted in [`mismatched_rows`](Self::mismatched_rows).
#[derive(Clone)]
pub struct DumpRecorder {
    filter: DumpFilter,
    tokens: Vec<i64>,
    positions: Vec<usize>,
    columns: BTreeMap<Slot, Column>,
    dim: Option<usize>,
    vocab: Option<usize>,
    /// The rows of the forward being recorded that the filter keeps: their
    /// positions and tokens.
    open: Vec<(usize, Option<u32>)>,
    /// For each row of the forward being recorded, its index in `open`.
    open_rows: Vec<Option<usize>>,
    mismatched: usize,
}

impl fmt::Debug for DumpRecorder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DumpRecorder")
            .field("filter", &self.filter)
            .field("rows", &self.tokens.len())
            .field("tensors", &self.columns.len())
            .field("recording", &!self.open.is_empty())
            .finish()
    }
}

impl DumpRecorder {
    /// An empty recorder keeping what `filter` selects.
    pub fn new(filter: DumpFilter) -> Self {
        Self {
            filter,
            tokens: Vec::new(),
            positions: Vec::new(),
            columns: BTreeMap::new(),
            dim: None,
            vocab: None,
            open: Vec::new(),
            open_rows: Vec::new(),
            mismatched: 0,
        }
    }

    /// The filter.
    pub fn filter(&self) -> &DumpFilter {
        &self.filter
    }

    /// Forwards kept so far.
    pub fn rows(&self) -> usize {
        self.tokens.len()
    }

    /// Rows whose width differed from the first row of their kind (kept as
    /// NaN).
    pub fn mismatched_rows(&self) -> usize {
        self.mismatched
    }

    /// Starts the forward at `position`. A forward begun and not ended is
    /// dropped.
    pub fn begin_forward(&mut self, position: usize) {
        self.begin_rows(position, 1);
    }

    /// Starts a forward over the positions `start..start + rows`, one row
    /// of the dump per position the filter keeps. A forward begun and not
    /// ended is dropped.
    pub fn begin_rows(&mut self, start: usize, rows: usize) {
        self.drop_open();
        for position in start..start.saturating_add(rows.max(1)) {
            if self.filter.sequence.is_none() && self.filter.wants_position(position) {
                self.open_rows.push(Some(self.open.len()));
                self.open.push((position, None));
            } else {
                self.open_rows.push(None);
            }
        }
    }

    /// Starts a forward over the rows of several sequences (`rows`, in
    /// the order of the forward's buffers): one row of the dump per row of
    /// the filter's [`sequence`](DumpFilter::sequence) at a position it
    /// keeps. A forward begun and not ended is dropped.
    pub fn begin_batch(&mut self, rows: &[BatchRow]) {
        self.drop_open();
        for r in rows {
            if Some(r.sequence) == self.filter.sequence && self.filter.wants_position(r.position) {
                self.open_rows.push(Some(self.open.len()));
                self.open.push((r.position, None));
            } else {
                self.open_rows.push(None);
            }
        }
    }

    /// Drops the forward being recorded, if any: its rows never ended.
    fn drop_open(&mut self) {
        if !self.open.is_empty() {
            let rows = self.tokens.len();
            self.columns.values_mut().for_each(|c| c.fit(rows));
        }
        self.open.clear();
        self.open_rows.clear();
    }

    /// Names the token of the forward being recorded (of its first row).
    pub fn input_token(&mut self, token: u32) {
        self.input_row_token(0, token);
    }

    /// Names the token of row `row` of the forward being recorded.
    pub fn input_row_token(&mut self, row: usize, token: u32) {
        if let Some(&Some(k)) = self.open_rows.get(row) {
            self.open[k].1 = Some(token);
        }
    }

    /// Copies `x` as the row of `(layer, stage)` of the forward being
    /// recorded, if the filter keeps it (the layer is ignored outside the
    /// layers). A second call for the same tensor in one forward replaces
    /// the first. A layer of [`MAX_LAYERS`] or more and a row of more than
    /// [`MAX_WIDTH`] values are ignored, as a tracer's hooks ignore them:
    /// a dump cannot hold them.
    pub fn activation(&mut self, layer: usize, stage: Stage, x: &[f32]) {
        self.activation_row(0, layer, stage, x);
    }

    /// Copies `x` as the tensor `(layer, stage)` of row `row` of the
    /// forward being recorded, as [`activation`](Self::activation) does for
    /// a forward of one row.
    pub fn activation_row(&mut self, row: usize, layer: usize, stage: Stage, x: &[f32]) {
        let Some(&Some(k)) = self.open_rows.get(row) else {
            return;
        };
        if !self.filter.wants(layer, stage) {
            return;
        }
        if x.len() > MAX_WIDTH || (stage.is_layer_stage() && layer >= MAX_LAYERS) {
            return;
        }
        let row = self.tokens.len() + k;
        let width = if stage == Stage::Logits {
            *self.vocab.get_or_insert(x.len())
        } else {
            *self.dim.get_or_insert(x.len())
        };
        let column = self
            .columns
            .entry(Slot::of(layer, stage))
            .or_insert_with(|| Column::new(width));
        // Rows of a forward may come in any order: a row is written in
        // place, the rows before it that have not come yet are NaN.
        if column.rows <= row {
            column.fit(row + 1);
        }
        let at = &mut column.data[row * width..(row + 1) * width];
        if x.len() == width {
            at.copy_from_slice(x);
        } else {
            at.fill(f32::NAN);
            self.mismatched += 1;
        }
    }

    /// Ends the forward: its rows are kept.
    pub fn end_forward(&mut self) {
        for (position, token) in self.open.drain(..) {
            self.positions.push(position);
            self.tokens.push(token.map_or(-1, i64::from));
        }
        self.open_rows.clear();
    }

    /// The dump of the forwards kept (a forward not ended is left out).
    pub fn finish(mut self) -> ActivationDump {
        let rows = self.tokens.len();
        self.columns.values_mut().for_each(|c| c.fit(rows));
        ActivationDump {
            tokens: self.tokens,
            positions: self.positions,
            tensors: self.columns,
            metadata: default_metadata(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|f| f.to_bits()).collect()
    }

    /// A dump of 3 positions, hidden size 4, vocabulary 5, with every kind
    /// of non-finite value and a NaN with a payload.
    fn sample() -> ActivationDump {
        let mut d = ActivationDump::new(vec![7, 8, -1]);
        d.set_positions(vec![4, 5, 6]).unwrap();
        let hidden = |k: f32| (0..12).map(|i| i as f32 * k - 3.0).collect::<Vec<_>>();
        let mut odd = hidden(0.5);
        odd[1] = f32::NAN;
        odd[2] = f32::INFINITY;
        odd[3] = f32::NEG_INFINITY;
        odd[4] = f32::from_bits(0x7fc0_1234);
        odd[5] = -0.0;
        odd[6] = f32::MIN_POSITIVE / 4.0;
        d.insert(None, Stage::Embedding, 4, hidden(1.0)).unwrap();
        d.insert(Some(0), Stage::Input, 4, odd).unwrap();
        d.insert(Some(1), Stage::PostAttn, 4, hidden(2.0)).unwrap();
        d.insert(Some(10), Stage::Output, 4, hidden(3.0)).unwrap();
        d.insert(None, Stage::FinalNorm, 4, hidden(4.0)).unwrap();
        d.insert(None, Stage::Logits, 5, (0..15).map(|i| i as f32).collect())
            .unwrap();
        d.set_metadata("model", "tiny \"quoted\" model");
        d
    }

    #[test]
    fn a_dump_reads_back_bit_for_bit() {
        let d = sample();
        let again = ActivationDump::from_bytes(&d.to_bytes()).unwrap();
        assert_eq!(again.tokens(), &[7, 8, -1]);
        assert_eq!(again.positions(), &[4, 5, 6]);
        assert_eq!((again.dim(), again.vocab()), (Some(4), Some(5)));
        assert_eq!(again.layers(), vec![0, 1, 10]);
        assert_eq!(again.metadata()["model"], "tiny \"quoted\" model");
        assert_eq!(again.metadata()["format"], FORMAT);
        let names: Vec<String> = again.tensors().map(|t| t.name()).collect();
        assert_eq!(
            names,
            [
                "embedding",
                "layers.0.input",
                "layers.1.post_attn",
                "layers.10.output",
                "final_norm",
                "logits"
            ]
        );
        for (a, b) in d.tensors().zip(again.tensors()) {
            assert_eq!((a.rows(), a.width()), (b.rows(), b.width()));
            assert_eq!(bits(a.data()), bits(b.data()), "{}", a.name());
        }
        let input = again.activation(Some(0), Stage::Input).unwrap();
        assert_eq!(input.row(1).unwrap()[0].to_bits(), 0x7fc0_1234);
        assert_eq!(input.row(2), Some(&[1.0, 1.5, 2.0, 2.5][..]));
        assert!(input.row(3).is_none());
        assert_eq!(input.iter_rows().count(), 3);
        // Writing what was read gives the same bytes.
        assert_eq!(again.to_bytes(), d.to_bytes());
    }

    #[test]
    fn the_header_is_padded_json_and_lists_tensors_in_forward_order() {
        let bytes = sample().to_bytes();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        assert_eq!(n % 8, 0);
        let header = std::str::from_utf8(&bytes[8..8 + n]).unwrap();
        let at = |name: &str| header.find(&format!("\"{name}\"")).unwrap();
        assert!(at("tokens") < at("positions"));
        assert!(at("embedding") < at("layers.0.input"));
        assert!(at("layers.1.post_attn") < at("layers.10.output"));
        assert!(at("final_norm") < at("logits"));
        let json: serde_json::Value = serde_json::from_str(header.trim_end()).unwrap();
        assert_eq!(json["tokens"]["dtype"], "I64");
        assert_eq!(json["logits"]["shape"], serde_json::json!([3, 5]));
        assert_eq!(json["__metadata__"]["version"], VERSION);
    }

    #[test]
    fn tensor_names_follow_the_stage_names() {
        assert_eq!(
            tensor_name(Some(3), Stage::PostFfnNorm).as_deref(),
            Some("layers.3.post_ffn_norm")
        );
        assert_eq!(
            tensor_name(Some(3), Stage::Logits).as_deref(),
            Some("logits")
        );
        assert_eq!(tensor_name(None, Stage::Input), None);
        for stage in Stage::LAYER_STAGES {
            let name = tensor_name(Some(12), stage).unwrap();
            assert_eq!(Slot::parse(&name), Slot::new(Some(12), stage));
        }
        for bad in [
            "layers.01.input",
            "layers.1.logits",
            "layers..input",
            "input",
            "Logits",
        ] {
            assert_eq!(Slot::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn insert_checks_rows_and_widths() {
        let mut d = ActivationDump::new(vec![1, 2]);
        let e = d
            .insert(Some(0), Stage::Input, 3, vec![0.0; 5])
            .unwrap_err();
        assert_eq!(e.tensor(), Some("layers.0.input"));
        d.insert(Some(0), Stage::Input, 3, vec![0.0; 6]).unwrap();
        let e = d
            .insert(Some(1), Stage::Input, 2, vec![0.0; 4])
            .unwrap_err();
        assert!(
            matches!(&e, DumpError::Tensor { problem: TensorProblem::Width { set_by, .. }, .. } if set_by == "layers.0.input"),
            "{e}"
        );
        // The logits have a width of their own.
        d.insert(None, Stage::Logits, 7, vec![0.0; 14]).unwrap();
        // Replacing the only tensor of a kind may change its width.
        d.insert(None, Stage::Logits, 2, vec![0.0; 4]).unwrap();
        assert_eq!(d.vocab(), Some(2));
        let e = d
            .insert(None, Stage::PostNorm, 3, vec![0.0; 6])
            .unwrap_err();
        assert!(matches!(
            e,
            DumpError::Tensor {
                problem: TensorProblem::NoLayer,
                ..
            }
        ));
        let e = d.set_positions(vec![0]).unwrap_err();
        assert_eq!(e.tensor(), Some("positions"));
    }

    #[test]
    fn the_recorder_keeps_what_the_filter_selects() {
        let filter = DumpFilter {
            layers: Some(vec![1]),
            stages: Some(vec![Stage::Input, Stage::Output, Stage::Logits]),
            positions: Some(2..4),
            sequence: None,
        };
        let mut r = DumpRecorder::new(filter);
        for pos in 0..6 {
            r.begin_forward(pos);
            r.input_token(100 + pos as u32);
            r.activation(0, Stage::Embedding, &[pos as f32; 3]);
            for layer in 0..3 {
                for stage in Stage::LAYER_STAGES {
                    r.activation(layer, stage, &[(10 * layer + pos) as f32; 3]);
                }
            }
            r.activation(0, Stage::FinalNorm, &[0.0; 3]);
            r.activation(0, Stage::Logits, &[pos as f32; 2]);
            r.end_forward();
        }
        let d = r.finish();
        assert_eq!(d.tokens(), &[102, 103]);
        assert_eq!(d.positions(), &[2, 3]);
        let names: Vec<String> = d.tensors().map(|t| t.name()).collect();
        assert_eq!(names, ["layers.1.input", "layers.1.output", "logits"]);
        let out = d.activation(Some(1), Stage::Output).unwrap();
        assert_eq!(out.data(), &[12.0, 12.0, 12.0, 13.0, 13.0, 13.0]);
        assert_eq!(d.logits().unwrap().row(1), Some(&[3.0, 3.0][..]));
    }

    #[test]
    fn missing_stages_are_nan_rows_and_an_unfinished_forward_is_dropped() {
        let mut r = DumpRecorder::new(DumpFilter::default());
        r.begin_forward(0);
        r.activation(0, Stage::Input, &[1.0, 2.0]);
        r.end_forward();
        r.begin_forward(1);
        r.activation(0, Stage::Output, &[3.0, 4.0]);
        // The same tensor twice in a forward: the second row wins.
        r.activation(0, Stage::Output, &[5.0, 6.0]);
        // A row of another width is NaN.
        r.activation(0, Stage::PostNorm, &[1.0, 2.0, 3.0]);
        r.end_forward();
        r.begin_forward(2);
        r.activation(0, Stage::Input, &[9.0, 9.0]);
        // Begun again without an end: position 2 is dropped.
        r.begin_forward(3);
        r.activation(0, Stage::Input, &[7.0, 8.0]);
        r.end_forward();
        r.begin_forward(4);
        r.activation(0, Stage::Input, &[0.0, 0.0]);
        assert_eq!(r.rows(), 3);
        assert_eq!(r.mismatched_rows(), 1);
        let d = r.finish();
        assert_eq!(d.positions(), &[0, 1, 3]);
        assert_eq!(d.tokens(), &[-1, -1, -1]);
        let input = d.activation(Some(0), Stage::Input).unwrap().data();
        assert_eq!(input.len(), 6);
        assert_eq!(bits(&input[..2]), bits(&[1.0, 2.0]));
        assert!(input[2].is_nan() && input[3].is_nan());
        assert_eq!(&input[4..], &[7.0, 8.0]);
        let output = d.activation(Some(0), Stage::Output).unwrap().data();
        assert!(output[0].is_nan());
        assert_eq!(&output[2..4], &[5.0, 6.0]);
        assert!(output[4].is_nan());
        let post_norm = d.activation(Some(0), Stage::PostNorm).unwrap();
        assert!(post_norm.data().iter().all(|v| v.is_nan()));
        assert_eq!(post_norm.width(), 2);
        // What the recorder makes, the reader takes.
        assert!(ActivationDump::from_bytes(&d.to_bytes()).is_ok());
    }
}
