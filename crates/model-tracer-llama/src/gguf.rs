//! The GGUF container: a validating reader.
//!
//! A GGUF file (versions 2 and 3, little-endian) is laid out as
//!
//! ```text
//! "GGUF" | version: u32 | tensor_count: u64 | kv_count: u64
//! kv_count   x (key: string, value_type: u32, value)
//! tensor_count x (name: string, n_dims: u32, dims: [u64; n_dims], type: u32, offset: u64)
//! padding up to `general.alignment` (default 32)
//! tensor data; each tensor starts at data_start + offset, offset a multiple of the alignment
//! ```
//!
//! where a string is a `u64` byte length followed by UTF-8 bytes and an array
//! is an element type (`u32`), a `u64` count and the elements.
//!
//! The reader is written by hand rather than taken from crates.io: the GGUF
//! readers published there (`gguf`, `gguf-rs`, `ggus`) either unwrap while
//! decoding metadata or pull in parser, CLI and logging dependencies, and none
//! of them promises an error instead of a panic or a huge allocation on a
//! malformed file, which is what this module guarantees:
//!
//! - every read is bounds-checked, and a file that ends early is an error;
//! - every count read from the file (tensor and key counts, string and array
//!   lengths, dimension counts) is checked against what the remaining bytes
//!   could possibly hold *before* anything is allocated for it, and room for
//!   at most 1024 entries is allocated ahead of reading them;
//! - tensor shapes are checked for overflow, rows must be whole quantization
//!   blocks, and every tensor's data range must lie inside the file, so that
//!   [`GgufFile::tensor_bytes`] never goes out of bounds.

#![warn(missing_docs)]

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io;
use std::path::Path;

use super::dtype::GgmlType;

/// The four bytes every GGUF file starts with.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";

/// Alignment of the tensor data, in bytes, when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: usize = 32;

/// Most dimensions a tensor may have (ggml's `GGML_MAX_DIMS`).
pub const MAX_DIMS: usize = 4;

/// Deepest nesting of arrays inside a metadata value that the reader accepts.
///
/// The format allows arrays of arrays; bounding the depth keeps a hostile file
/// from exhausting the stack of the recursive reader.
pub const MAX_ARRAY_NESTING: usize = 8;

/// The metadata key holding the tensor data alignment.
pub const ALIGNMENT_KEY: &str = "general.alignment";

/// Most entries a vector sized by a count read from the file is allocated
/// for before they are read. A count is checked against what the rest of
/// the file could hold, but an entry takes more memory than its smallest
/// encoding (a 13-byte metadata entry becomes a key, a value and an index
/// slot of about 100 bytes): vectors beyond this grow as entries are
/// actually read, so memory follows what the file holds, not what it
/// claims.
const MAX_PREALLOCATED: usize = 1024;

/// Smallest encoding of one metadata entry: an empty key (8-byte length), the
/// value type (4 bytes) and a one-byte value.
const MIN_KV_BYTES: u64 = 8 + 4 + 1;
/// Smallest encoding of one tensor header: an empty name (8-byte length),
/// `n_dims` (4), the type (4) and the offset (8).
const MIN_TENSOR_INFO_BYTES: u64 = 8 + 4 + 4 + 8;

/// Everything that can be wrong with a GGUF file or a request made of it.
///
/// Messages name the offending key or tensor and, for structural problems,
/// the byte offset in the file.
#[derive(Debug)]
pub enum GgufError {
    /// The file could not be opened, mapped or read.
    Io(io::Error),
    /// The file does not start with `GGUF`; holds the four bytes found.
    BadMagic([u8; 4]),
    /// Only versions 2 and 3 are read; holds the version found.
    UnsupportedVersion(u32),
    /// The file ends before a fixed-size field is complete.
    Truncated {
        /// The field being read.
        what: String,
        /// Byte offset in the file where the field starts.
        offset: u64,
    },
    /// A key, string value or tensor name is not valid UTF-8.
    InvalidUtf8 {
        /// The string being read.
        what: String,
    },
    /// A metadata value type id that the format does not define.
    UnknownValueType {
        /// The key whose value (or array element) has the unknown type.
        key: String,
        /// The type id found.
        type_id: u32,
    },
    /// A tensor's ggml type id is unknown to this crate.
    UnsupportedTensorType {
        /// The tensor's name.
        tensor: String,
        /// The type id found.
        type_id: u32,
    },
    /// A count or length read from the file is larger than the rest of the
    /// file (or a format limit) allows.
    CountTooLarge {
        /// The count being read.
        what: String,
        /// The value found.
        count: u64,
        /// The largest value that could be valid at that point.
        limit: u64,
    },
    /// Arrays nested deeper than [`MAX_ARRAY_NESTING`].
    ArrayNestingTooDeep {
        /// The key whose value nests too deeply.
        key: String,
    },
    /// A tensor's data range does not lie inside the file.
    TensorOutOfBounds {
        /// The tensor's name.
        tensor: String,
        /// Absolute byte offset of the tensor's data (may have overflowed the
        /// file's addressable range, in which case it is `u64::MAX`).
        offset: u64,
        /// Size of the tensor's data, in bytes.
        size: u64,
        /// Length of the file, in bytes.
        file_len: u64,
    },
    /// A tensor's shape is unusable.
    BadShape {
        /// The tensor's name.
        tensor: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A tensor's data offset is not a multiple of the file's alignment.
    Misaligned {
        /// The tensor's name.
        tensor: String,
        /// The offset relative to the start of the data section, in bytes.
        offset: u64,
        /// The file's alignment, in bytes.
        alignment: usize,
    },
    /// `general.alignment` is zero or not a power of two.
    InvalidAlignment(u64),
    /// The same metadata key appears twice.
    DuplicateKey(String),
    /// Two tensors have the same name.
    DuplicateTensor(String),
    /// A requested metadata key is absent.
    MissingKey(String),
    /// A metadata value has a type other than the one requested (or an
    /// integer does not fit the requested type).
    WrongKeyType {
        /// The key.
        key: String,
        /// The type that was requested.
        expected: &'static str,
    },
}

impl fmt::Display for GgufError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io(e) => write!(f, "GGUF I/O error: {e}"),
            Self::BadMagic(m) => write!(f, "not a GGUF file: magic bytes are {m:02x?}"),
            Self::UnsupportedVersion(v) => {
                write!(
                    f,
                    "unsupported GGUF version {v} (versions 2 and 3 are read)"
                )
            }
            Self::Truncated { what, offset } => {
                write!(f, "GGUF file ends inside {what} (at byte {offset})")
            }
            Self::InvalidUtf8 { what } => write!(f, "{what} is not valid UTF-8"),
            Self::UnknownValueType { key, type_id } => {
                write!(f, "metadata key `{key}` has unknown value type {type_id}")
            }
            Self::UnsupportedTensorType { tensor, type_id } => {
                write!(
                    f,
                    "tensor `{tensor}` has unsupported ggml type id {type_id}"
                )
            }
            Self::CountTooLarge { what, count, limit } => {
                write!(
                    f,
                    "{what} is {count}, more than the file can hold (at most {limit})"
                )
            }
            Self::ArrayNestingTooDeep { key } => write!(
                f,
                "metadata key `{key}` nests arrays deeper than {MAX_ARRAY_NESTING} levels"
            ),
            Self::TensorOutOfBounds {
                tensor,
                offset,
                size,
                file_len,
            } => write!(
                f,
                "tensor `{tensor}` data ({size} bytes at byte {offset}) lies outside the \
                 {file_len}-byte file"
            ),
            Self::BadShape { tensor, reason } => write!(f, "tensor `{tensor}`: {reason}"),
            Self::Misaligned {
                tensor,
                offset,
                alignment,
            } => write!(
                f,
                "tensor `{tensor}` data offset {offset} is not a multiple of the \
                 {alignment}-byte alignment"
            ),
            Self::InvalidAlignment(a) => {
                write!(f, "`{ALIGNMENT_KEY}` is {a}, not a non-zero power of two")
            }
            Self::DuplicateKey(k) => write!(f, "metadata key `{k}` appears more than once"),
            Self::DuplicateTensor(t) => write!(f, "tensor `{t}` appears more than once"),
            Self::MissingKey(k) => write!(f, "metadata key `{k}` is missing"),
            Self::WrongKeyType { key, expected } => {
                write!(f, "metadata key `{key}` is not a {expected}")
            }
        }
    }
}

impl std::error::Error for GgufError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<io::Error> for GgufError {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

/// The type of a metadata value, with GGUF's numeric ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MetadataType {
    /// `u8`, id 0.
    U8,
    /// `i8`, id 1.
    I8,
    /// `u16`, id 2.
    U16,
    /// `i16`, id 3.
    I16,
    /// `u32`, id 4.
    U32,
    /// `i32`, id 5.
    I32,
    /// `f32`, id 6.
    F32,
    /// One byte, zero meaning false, id 7.
    Bool,
    /// Length-prefixed UTF-8 string, id 8.
    String,
    /// Typed array, id 9.
    Array,
    /// `u64`, id 10.
    U64,
    /// `i64`, id 11.
    I64,
    /// `f64`, id 12.
    F64,
}

impl MetadataType {
    /// Decodes GGUF's value type id.
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::U8,
            1 => Self::I8,
            2 => Self::U16,
            3 => Self::I16,
            4 => Self::U32,
            5 => Self::I32,
            6 => Self::F32,
            7 => Self::Bool,
            8 => Self::String,
            9 => Self::Array,
            10 => Self::U64,
            11 => Self::I64,
            12 => Self::F64,
            _ => return None,
        })
    }

    /// GGUF's value type id.
    pub fn id(self) -> u32 {
        match self {
            Self::U8 => 0,
            Self::I8 => 1,
            Self::U16 => 2,
            Self::I16 => 3,
            Self::U32 => 4,
            Self::I32 => 5,
            Self::F32 => 6,
            Self::Bool => 7,
            Self::String => 8,
            Self::Array => 9,
            Self::U64 => 10,
            Self::I64 => 11,
            Self::F64 => 12,
        }
    }

    /// Lower-case name of the type (`"u32"`, `"string"`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Self::U8 => "u8",
            Self::I8 => "i8",
            Self::U16 => "u16",
            Self::I16 => "i16",
            Self::U32 => "u32",
            Self::I32 => "i32",
            Self::F32 => "f32",
            Self::Bool => "bool",
            Self::String => "string",
            Self::Array => "array",
            Self::U64 => "u64",
            Self::I64 => "i64",
            Self::F64 => "f64",
        }
    }

    /// Fewest bytes one value of this type takes in a file: the fixed size of
    /// a scalar, the length prefix of a string, the type and count of an array.
    fn min_encoded_len(self) -> u64 {
        match self {
            Self::U8 | Self::I8 | Self::Bool => 1,
            Self::U16 | Self::I16 => 2,
            Self::U32 | Self::I32 | Self::F32 => 4,
            Self::U64 | Self::I64 | Self::F64 | Self::String => 8,
            Self::Array => 4 + 8,
        }
    }
}

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum MetadataValue {
    /// Unsigned 8-bit integer.
    U8(u8),
    /// Signed 8-bit integer.
    I8(i8),
    /// Unsigned 16-bit integer.
    U16(u16),
    /// Signed 16-bit integer.
    I16(i16),
    /// Unsigned 32-bit integer.
    U32(u32),
    /// Signed 32-bit integer.
    I32(i32),
    /// 32-bit float.
    F32(f32),
    /// Boolean (any non-zero byte reads as true, as in ggml).
    Bool(bool),
    /// UTF-8 string.
    String(String),
    /// Typed array.
    Array(MetadataArray),
    /// Unsigned 64-bit integer.
    U64(u64),
    /// Signed 64-bit integer.
    I64(i64),
    /// 64-bit float.
    F64(f64),
}

/// A typed metadata array.
///
/// Elements are stored unboxed by type, so an array takes about as much
/// memory as its encoding in the file.
#[derive(Debug, Clone, PartialEq)]
pub enum MetadataArray {
    /// Array of `u8`.
    U8(Vec<u8>),
    /// Array of `i8`.
    I8(Vec<i8>),
    /// Array of `u16`.
    U16(Vec<u16>),
    /// Array of `i16`.
    I16(Vec<i16>),
    /// Array of `u32`.
    U32(Vec<u32>),
    /// Array of `i32`.
    I32(Vec<i32>),
    /// Array of `f32`.
    F32(Vec<f32>),
    /// Array of booleans.
    Bool(Vec<bool>),
    /// Array of strings.
    String(Vec<String>),
    /// Array of arrays (each inner array has its own element type).
    Array(Vec<MetadataArray>),
    /// Array of `u64`.
    U64(Vec<u64>),
    /// Array of `i64`.
    I64(Vec<i64>),
    /// Array of `f64`.
    F64(Vec<f64>),
}

impl MetadataValue {
    /// The value's type.
    pub fn value_type(&self) -> MetadataType {
        match self {
            Self::U8(_) => MetadataType::U8,
            Self::I8(_) => MetadataType::I8,
            Self::U16(_) => MetadataType::U16,
            Self::I16(_) => MetadataType::I16,
            Self::U32(_) => MetadataType::U32,
            Self::I32(_) => MetadataType::I32,
            Self::F32(_) => MetadataType::F32,
            Self::Bool(_) => MetadataType::Bool,
            Self::String(_) => MetadataType::String,
            Self::Array(_) => MetadataType::Array,
            Self::U64(_) => MetadataType::U64,
            Self::I64(_) => MetadataType::I64,
            Self::F64(_) => MetadataType::F64,
        }
    }

    /// The value as a signed 128-bit integer, for any integer kind.
    fn as_wide_int(&self) -> Option<i128> {
        Some(match *self {
            Self::U8(v) => v.into(),
            Self::I8(v) => v.into(),
            Self::U16(v) => v.into(),
            Self::I16(v) => v.into(),
            Self::U32(v) => v.into(),
            Self::I32(v) => v.into(),
            Self::U64(v) => v.into(),
            Self::I64(v) => v.into(),
            _ => return None,
        })
    }

    /// The value as a `u32`, for any integer kind whose value fits.
    pub fn as_u32(&self) -> Option<u32> {
        self.as_wide_int().and_then(|v| u32::try_from(v).ok())
    }

    /// The value as an `i32`, for any integer kind whose value fits.
    pub fn as_i32(&self) -> Option<i32> {
        self.as_wide_int().and_then(|v| i32::try_from(v).ok())
    }

    /// The value as a `u64`, for any integer kind whose value fits.
    pub fn as_u64(&self) -> Option<u64> {
        self.as_wide_int().and_then(|v| u64::try_from(v).ok())
    }

    /// The value as an `i64`, for any integer kind whose value fits.
    pub fn as_i64(&self) -> Option<i64> {
        self.as_wide_int().and_then(|v| i64::try_from(v).ok())
    }

    /// The value as an `f32`: an `f32`, or an `f64` that converts exactly.
    pub fn as_f32(&self) -> Option<f32> {
        match *self {
            Self::F32(v) => Some(v),
            Self::F64(v) => {
                let n = v as f32;
                (f64::from(n) == v).then_some(n)
            }
            _ => None,
        }
    }

    /// The value as an `f64`, for either float kind.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Self::F32(v) => Some(v.into()),
            Self::F64(v) => Some(v),
            _ => None,
        }
    }

    /// The value as a boolean.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Self::Bool(v) => Some(v),
            _ => None,
        }
    }

    /// The value as a string slice.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value as an array.
    pub fn as_array(&self) -> Option<&MetadataArray> {
        match self {
            Self::Array(a) => Some(a),
            _ => None,
        }
    }
}

impl MetadataArray {
    /// The type of the elements.
    pub fn element_type(&self) -> MetadataType {
        match self {
            Self::U8(_) => MetadataType::U8,
            Self::I8(_) => MetadataType::I8,
            Self::U16(_) => MetadataType::U16,
            Self::I16(_) => MetadataType::I16,
            Self::U32(_) => MetadataType::U32,
            Self::I32(_) => MetadataType::I32,
            Self::F32(_) => MetadataType::F32,
            Self::Bool(_) => MetadataType::Bool,
            Self::String(_) => MetadataType::String,
            Self::Array(_) => MetadataType::Array,
            Self::U64(_) => MetadataType::U64,
            Self::I64(_) => MetadataType::I64,
            Self::F64(_) => MetadataType::F64,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Self::U8(v) => v.len(),
            Self::I8(v) => v.len(),
            Self::U16(v) => v.len(),
            Self::I16(v) => v.len(),
            Self::U32(v) => v.len(),
            Self::I32(v) => v.len(),
            Self::F32(v) => v.len(),
            Self::Bool(v) => v.len(),
            Self::String(v) => v.len(),
            Self::Array(v) => v.len(),
            Self::U64(v) => v.len(),
            Self::I64(v) => v.len(),
            Self::F64(v) => v.len(),
        }
    }

    /// Whether the array has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The strings, when this is an array of strings.
    pub fn as_strings(&self) -> Option<&[String]> {
        match self {
            Self::String(v) => Some(v),
            _ => None,
        }
    }

    /// The elements as `i64`, when this is an array of an integer kind whose
    /// values all fit (`u64` values above `i64::MAX` do not).
    pub fn to_i64_vec(&self) -> Option<Vec<i64>> {
        fn conv<T: Copy>(v: &[T], f: impl Fn(T) -> Option<i64>) -> Option<Vec<i64>> {
            v.iter().map(|&x| f(x)).collect()
        }
        match self {
            Self::U8(v) => conv(v, |x| Some(x.into())),
            Self::I8(v) => conv(v, |x| Some(x.into())),
            Self::U16(v) => conv(v, |x| Some(x.into())),
            Self::I16(v) => conv(v, |x| Some(x.into())),
            Self::U32(v) => conv(v, |x| Some(x.into())),
            Self::I32(v) => conv(v, |x| Some(x.into())),
            Self::U64(v) => conv(v, |x| i64::try_from(x).ok()),
            Self::I64(v) => Some(v.clone()),
            _ => None,
        }
    }
}

/// Where a tensor is and what it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// The tensor's name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Dimensions in ggml order: `dims[0]` (ggml's `ne0`) is the length of a
    /// row, the fastest-varying index.
    pub dims: Vec<u64>,
    /// Element type of the data.
    pub ggml_type: GgmlType,
    /// Absolute byte offset of the data in the file.
    pub offset: u64,
    /// Size of the data, in bytes.
    pub size_bytes: usize,
}

impl TensorInfo {
    /// Number of elements (the product of the dimensions; 1 for a tensor
    /// without dimensions). Checked against overflow when the file was read.
    pub fn n_elements(&self) -> usize {
        self.dims
            .iter()
            .try_fold(1usize, |acc, &d| {
                usize::try_from(d).ok().and_then(|d| acc.checked_mul(d))
            })
            .unwrap_or(usize::MAX)
    }

    /// Length of one row in elements (`dims[0]`, or 1 without dimensions).
    pub fn row_len(&self) -> usize {
        self.dims
            .first()
            .map_or(1, |&d| usize::try_from(d).unwrap_or(usize::MAX))
    }

    /// Number of rows: the product of all dimensions but the first.
    pub fn rows(&self) -> usize {
        self.dims
            .iter()
            .skip(1)
            .try_fold(1usize, |acc, &d| {
                usize::try_from(d).ok().and_then(|d| acc.checked_mul(d))
            })
            .unwrap_or(usize::MAX)
    }

    /// Bytes taken by one row.
    pub fn row_bytes(&self) -> usize {
        self.ggml_type.bytes_for(self.row_len()).unwrap_or(0)
    }
}

/// The bytes a [`GgufFile`] reads from.
enum Storage {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Self::Mapped(m) => m,
            Self::Owned(v) => v,
        }
    }
}

/// A parsed, validated GGUF file: its metadata, its tensor headers and access
/// to the tensor data (memory-mapped or in memory).
pub struct GgufFile {
    version: u32,
    alignment: usize,
    data_offset: u64,
    metadata: Vec<(String, MetadataValue)>,
    metadata_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    data: Storage,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("version", &self.version)
            .field("alignment", &self.alignment)
            .field("data_offset", &self.data_offset)
            .field("file_len", &self.data.bytes().len())
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Opens and memory-maps a GGUF file, then validates it as
    /// [`GgufFile::from_bytes`] does.
    ///
    /// The mapping stays valid while the returned value lives; the file must
    /// not be truncated or rewritten in the meantime (on most systems reading
    /// a truncated mapping kills the process), which is the usual contract
    /// for memory-mapped model files.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, GgufError> {
        let file = File::open(path.as_ref())?;
        let len = file.metadata()?.len();
        if len == 0 {
            // Mapping an empty file fails on some systems; an empty buffer
            // gives the same error a truncated file does.
            return Self::from_storage(Storage::Owned(Vec::new()));
        }
        // SAFETY: the map is read-only and private to this value; the
        // documented contract above covers concurrent modification of the
        // file, which no safe API can rule out.
        let map = unsafe { memmap2::Mmap::map(&file)? };
        Self::from_storage(Storage::Mapped(map))
    }

    /// Parses and validates a GGUF file held in memory.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, GgufError> {
        Self::from_storage(Storage::Owned(bytes))
    }

    fn from_storage(data: Storage) -> Result<Self, GgufError> {
        let header = parse(data.bytes())?;
        Ok(Self {
            version: header.version,
            alignment: header.alignment,
            data_offset: header.data_offset,
            metadata: header.metadata,
            metadata_index: header.metadata_index,
            tensors: header.tensors,
            tensor_index: header.tensor_index,
            data,
        })
    }

    /// The format version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Alignment of the tensor data, in bytes.
    pub fn alignment(&self) -> usize {
        self.alignment
    }

    /// Absolute byte offset where the tensor data section starts.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// Length of the whole file, in bytes.
    pub fn file_len(&self) -> usize {
        self.data.bytes().len()
    }

    /// The value stored under `key`.
    pub fn metadata(&self, key: &str) -> Option<&MetadataValue> {
        self.metadata_index.get(key).map(|&i| &self.metadata[i].1)
    }

    /// Number of metadata entries.
    pub fn metadata_len(&self) -> usize {
        self.metadata.len()
    }

    /// Metadata keys in file order.
    pub fn metadata_keys(&self) -> impl Iterator<Item = &str> {
        self.metadata.iter().map(|(k, _)| k.as_str())
    }

    /// Metadata entries in file order.
    pub fn metadata_entries(&self) -> impl Iterator<Item = (&str, &MetadataValue)> {
        self.metadata.iter().map(|(k, v)| (k.as_str(), v))
    }

    fn require(&self, key: &str) -> Result<&MetadataValue, GgufError> {
        self.metadata(key)
            .ok_or_else(|| GgufError::MissingKey(key.to_owned()))
    }

    fn wrong(key: &str, expected: &'static str) -> GgufError {
        GgufError::WrongKeyType {
            key: key.to_owned(),
            expected,
        }
    }

    /// The value under `key` as a `u32` (any integer kind whose value fits).
    pub fn get_u32(&self, key: &str) -> Result<u32, GgufError> {
        self.require(key)?
            .as_u32()
            .ok_or_else(|| Self::wrong(key, "u32"))
    }

    /// The value under `key` as a `u64` (any integer kind whose value fits).
    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        self.require(key)?
            .as_u64()
            .ok_or_else(|| Self::wrong(key, "u64"))
    }

    /// The value under `key` as an `f32` (an `f32`, or an exactly
    /// representable `f64`).
    pub fn get_f32(&self, key: &str) -> Result<f32, GgufError> {
        self.require(key)?
            .as_f32()
            .ok_or_else(|| Self::wrong(key, "f32"))
    }

    /// The value under `key` as a boolean.
    pub fn get_bool(&self, key: &str) -> Result<bool, GgufError> {
        self.require(key)?
            .as_bool()
            .ok_or_else(|| Self::wrong(key, "bool"))
    }

    /// The value under `key` as a string.
    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        self.require(key)?
            .as_str()
            .ok_or_else(|| Self::wrong(key, "string"))
    }

    /// The value under `key` as an array of strings.
    pub fn get_str_array(&self, key: &str) -> Result<&[String], GgufError> {
        self.require(key)?
            .as_array()
            .and_then(MetadataArray::as_strings)
            .ok_or_else(|| Self::wrong(key, "string array"))
    }

    /// The value under `key` as an array of `i32`, converted from any integer
    /// array whose values all fit.
    pub fn get_i32_array(&self, key: &str) -> Result<Vec<i32>, GgufError> {
        let wrong = || Self::wrong(key, "i32 array");
        if let Some(MetadataArray::I32(v)) = self.require(key)?.as_array() {
            return Ok(v.clone());
        }
        self.require(key)?
            .as_array()
            .and_then(MetadataArray::to_i64_vec)
            .ok_or_else(wrong)?
            .into_iter()
            .map(|x| i32::try_from(x).map_err(|_| wrong()))
            .collect()
    }

    /// All tensor headers, in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The header of the tensor called `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// The raw (encoded) data of a tensor of this file.
    ///
    /// Every tensor's range was checked when the file was read, so for headers
    /// obtained from this file the slice is always `info.size_bytes` long. A
    /// header that does not belong to this file and points outside it yields
    /// an empty slice.
    pub fn tensor_bytes(&self, info: &TensorInfo) -> &[u8] {
        let bytes = self.data.bytes();
        usize::try_from(info.offset)
            .ok()
            .and_then(|start| Some(start..start.checked_add(info.size_bytes)?))
            .and_then(|range| bytes.get(range))
            .unwrap_or(&[])
    }

    /// The header and raw data of the tensor called `name`.
    pub fn tensor_data(&self, name: &str) -> Option<(&TensorInfo, &[u8])> {
        let info = self.tensor(name)?;
        Some((info, self.tensor_bytes(info)))
    }
}

/// What [`parse`] extracts from a file; the data stays where it is.
struct Header {
    version: u32,
    alignment: usize,
    data_offset: u64,
    metadata: Vec<(String, MetadataValue)>,
    metadata_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
}

/// A bounds-checked little-endian cursor over the file.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }

    fn take(&mut self, n: usize, what: &dyn Fn() -> String) -> Result<&'a [u8], GgufError> {
        let out = self
            .pos
            .checked_add(n)
            .and_then(|end| self.buf.get(self.pos..end))
            .ok_or_else(|| GgufError::Truncated {
                what: what(),
                offset: self.pos as u64,
            })?;
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N], GgufError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32, GgufError> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64, GgufError> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// Checks that `count` items of at least `min_each` bytes can fit in what
    /// is left, and returns the count as a `usize` for allocation.
    fn bounded_count(
        &self,
        count: u64,
        min_each: u64,
        what: &dyn Fn() -> String,
    ) -> Result<usize, GgufError> {
        let limit = self.remaining() / min_each.max(1);
        if count > limit {
            return Err(GgufError::CountTooLarge {
                what: what(),
                count,
                limit,
            });
        }
        // `count <= remaining <= usize::MAX`, so this conversion cannot fail.
        usize::try_from(count).map_err(|_| GgufError::CountTooLarge {
            what: what(),
            count,
            limit,
        })
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String, GgufError> {
        let len = self.u64(&|| format!("length of {}", what()))?;
        let len = self.bounded_count(len, 1, &|| format!("length of {}", what()))?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| GgufError::InvalidUtf8 { what: what() })
    }
}

fn parse(buf: &[u8]) -> Result<Header, GgufError> {
    let mut r = Reader { buf, pos: 0 };
    let magic: [u8; 4] = r.array(&|| "the magic bytes".into())?;
    if magic != GGUF_MAGIC {
        return Err(GgufError::BadMagic(magic));
    }
    let version = r.u32(&|| "the version".into())?;
    if !(2..=3).contains(&version) {
        return Err(GgufError::UnsupportedVersion(version));
    }
    let n_tensors = r.u64(&|| "the tensor count".into())?;
    let n_kv = r.u64(&|| "the metadata count".into())?;

    // Both tables follow; bound each count by the space the other leaves.
    let n_kv = r.bounded_count(n_kv, MIN_KV_BYTES, &|| "the metadata count".into())?;
    let kv_floor = n_kv as u64 * MIN_KV_BYTES;
    let tensor_limit = (r.remaining() - kv_floor) / MIN_TENSOR_INFO_BYTES;
    if n_tensors > tensor_limit {
        return Err(GgufError::CountTooLarge {
            what: "the tensor count".into(),
            count: n_tensors,
            limit: tensor_limit,
        });
    }
    let n_tensors = n_tensors as usize;

    let mut metadata = Vec::with_capacity(n_kv.min(MAX_PREALLOCATED));
    let mut metadata_index = HashMap::with_capacity(n_kv.min(MAX_PREALLOCATED));
    for i in 0..n_kv {
        let key = r.string(&|| format!("the key of metadata entry {i}"))?;
        if metadata_index.contains_key(&key) {
            return Err(GgufError::DuplicateKey(key));
        }
        let type_id = r.u32(&|| format!("the value type of `{key}`"))?;
        let value = read_value(&mut r, type_id, &key, 0)?;
        metadata_index.insert(key.clone(), metadata.len());
        metadata.push((key, value));
    }

    let alignment = match metadata_index.get(ALIGNMENT_KEY) {
        None => DEFAULT_ALIGNMENT,
        Some(&i) => match metadata[i].1 {
            MetadataValue::U32(a) if a.is_power_of_two() => a as usize,
            MetadataValue::U32(a) => return Err(GgufError::InvalidAlignment(a.into())),
            _ => {
                return Err(GgufError::WrongKeyType {
                    key: ALIGNMENT_KEY.into(),
                    expected: "u32",
                })
            }
        },
    };

    struct Pending {
        name: String,
        dims: Vec<u64>,
        ggml_type: GgmlType,
        rel_offset: u64,
        size: usize,
    }
    let mut pending = Vec::with_capacity(n_tensors.min(MAX_PREALLOCATED));
    let mut tensor_index = HashMap::with_capacity(n_tensors.min(MAX_PREALLOCATED));
    for i in 0..n_tensors {
        let name = r.string(&|| format!("the name of tensor {i}"))?;
        if tensor_index.contains_key(&name) {
            return Err(GgufError::DuplicateTensor(name));
        }
        let n_dims = r.u32(&|| format!("the dimension count of `{name}`"))?;
        if n_dims as usize > MAX_DIMS {
            return Err(GgufError::CountTooLarge {
                what: format!("the dimension count of `{name}`"),
                count: n_dims.into(),
                limit: MAX_DIMS as u64,
            });
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for d in 0..n_dims {
            dims.push(r.u64(&|| format!("dimension {d} of `{name}`"))?);
        }
        let type_id = r.u32(&|| format!("the type of `{name}`"))?;
        let ggml_type =
            GgmlType::from_id(type_id).ok_or_else(|| GgufError::UnsupportedTensorType {
                tensor: name.clone(),
                type_id,
            })?;
        let rel_offset = r.u64(&|| format!("the data offset of `{name}`"))?;
        let size = tensor_size(&name, &dims, ggml_type)?;
        if rel_offset % alignment as u64 != 0 {
            return Err(GgufError::Misaligned {
                tensor: name,
                offset: rel_offset,
                alignment,
            });
        }
        tensor_index.insert(name.clone(), pending.len());
        pending.push(Pending {
            name,
            dims,
            ggml_type,
            rel_offset,
            size,
        });
    }

    let file_len = buf.len() as u64;
    // The header ends inside the file, so rounding it up cannot overflow.
    let data_offset = (r.pos as u64).next_multiple_of(alignment as u64);
    let tensors = pending
        .into_iter()
        .map(|p| {
            let out_of_bounds = |offset| GgufError::TensorOutOfBounds {
                tensor: p.name.clone(),
                offset,
                size: p.size as u64,
                file_len,
            };
            let offset = data_offset
                .checked_add(p.rel_offset)
                .ok_or_else(|| out_of_bounds(u64::MAX))?;
            match offset.checked_add(p.size as u64) {
                Some(end) if end <= file_len => Ok(TensorInfo {
                    name: p.name,
                    dims: p.dims,
                    ggml_type: p.ggml_type,
                    offset,
                    size_bytes: p.size,
                }),
                _ => Err(out_of_bounds(offset)),
            }
        })
        .collect::<Result<Vec<_>, _>>()?;

    Ok(Header {
        version,
        alignment,
        data_offset,
        metadata,
        metadata_index,
        tensors,
        tensor_index,
    })
}

/// Size in bytes of a tensor's data, after checking that its shape is usable:
/// the element count fits in memory and rows are whole blocks.
fn tensor_size(name: &str, dims: &[u64], ty: GgmlType) -> Result<usize, GgufError> {
    let bad = |reason: String| GgufError::BadShape {
        tensor: name.to_owned(),
        reason,
    };
    let mut n: usize = 1;
    for (i, &d) in dims.iter().enumerate() {
        // ggml stores dimensions as i64.
        if d > i64::MAX as u64 {
            return Err(bad(format!("dimension {i} is {d}, above i64::MAX")));
        }
        n = usize::try_from(d)
            .ok()
            .and_then(|d| n.checked_mul(d))
            .ok_or_else(|| bad(format!("element count {dims:?} overflows")))?;
    }
    let row_len = dims.first().copied().unwrap_or(1);
    if row_len % ty.block_len() as u64 != 0 {
        return Err(bad(format!(
            "row length {row_len} is not a multiple of the {}-element {} block",
            ty.block_len(),
            ty.name()
        )));
    }
    ty.bytes_for(n)
        .ok_or_else(|| bad(format!("data size of {dims:?} {} overflows", ty.name())))
}

fn read_value(
    r: &mut Reader<'_>,
    type_id: u32,
    key: &str,
    depth: usize,
) -> Result<MetadataValue, GgufError> {
    let ty = MetadataType::from_id(type_id).ok_or_else(|| GgufError::UnknownValueType {
        key: key.to_owned(),
        type_id,
    })?;
    let what = || format!("the value of `{key}`");
    Ok(match ty {
        MetadataType::U8 => MetadataValue::U8(r.array::<1>(&what)?[0]),
        MetadataType::I8 => MetadataValue::I8(i8::from_le_bytes(r.array(&what)?)),
        MetadataType::U16 => MetadataValue::U16(u16::from_le_bytes(r.array(&what)?)),
        MetadataType::I16 => MetadataValue::I16(i16::from_le_bytes(r.array(&what)?)),
        MetadataType::U32 => MetadataValue::U32(u32::from_le_bytes(r.array(&what)?)),
        MetadataType::I32 => MetadataValue::I32(i32::from_le_bytes(r.array(&what)?)),
        MetadataType::F32 => MetadataValue::F32(f32::from_le_bytes(r.array(&what)?)),
        MetadataType::Bool => MetadataValue::Bool(r.array::<1>(&what)?[0] != 0),
        MetadataType::String => MetadataValue::String(r.string(&what)?),
        MetadataType::Array => MetadataValue::Array(read_array(r, key, depth)?),
        MetadataType::U64 => MetadataValue::U64(u64::from_le_bytes(r.array(&what)?)),
        MetadataType::I64 => MetadataValue::I64(i64::from_le_bytes(r.array(&what)?)),
        MetadataType::F64 => MetadataValue::F64(f64::from_le_bytes(r.array(&what)?)),
    })
}

fn read_array(r: &mut Reader<'_>, key: &str, depth: usize) -> Result<MetadataArray, GgufError> {
    if depth >= MAX_ARRAY_NESTING {
        return Err(GgufError::ArrayNestingTooDeep {
            key: key.to_owned(),
        });
    }
    let type_id = r.u32(&|| format!("the element type of `{key}`"))?;
    let ty = MetadataType::from_id(type_id).ok_or_else(|| GgufError::UnknownValueType {
        key: key.to_owned(),
        type_id,
    })?;
    let count = r.u64(&|| format!("the length of array `{key}`"))?;
    let n = r.bounded_count(count, ty.min_encoded_len(), &|| {
        format!("the length of array `{key}`")
    })?;
    let what = || format!("the elements of `{key}`");

    fn fixed<const N: usize, T>(
        r: &mut Reader<'_>,
        n: usize,
        what: &dyn Fn() -> String,
        conv: fn([u8; N]) -> T,
    ) -> Result<Vec<T>, GgufError> {
        // `n * N` was bounded by the remaining length before this call.
        let bytes = r.take(n * N, what)?;
        Ok(bytes
            .chunks_exact(N)
            .map(|c| {
                let mut a = [0u8; N];
                a.copy_from_slice(c);
                conv(a)
            })
            .collect())
    }

    Ok(match ty {
        MetadataType::U8 => MetadataArray::U8(r.take(n, &what)?.to_vec()),
        MetadataType::I8 => MetadataArray::I8(fixed(r, n, &what, i8::from_le_bytes)?),
        MetadataType::U16 => MetadataArray::U16(fixed(r, n, &what, u16::from_le_bytes)?),
        MetadataType::I16 => MetadataArray::I16(fixed(r, n, &what, i16::from_le_bytes)?),
        MetadataType::U32 => MetadataArray::U32(fixed(r, n, &what, u32::from_le_bytes)?),
        MetadataType::I32 => MetadataArray::I32(fixed(r, n, &what, i32::from_le_bytes)?),
        MetadataType::F32 => MetadataArray::F32(fixed(r, n, &what, f32::from_le_bytes)?),
        MetadataType::U64 => MetadataArray::U64(fixed(r, n, &what, u64::from_le_bytes)?),
        MetadataType::I64 => MetadataArray::I64(fixed(r, n, &what, i64::from_le_bytes)?),
        MetadataType::F64 => MetadataArray::F64(fixed(r, n, &what, f64::from_le_bytes)?),
        MetadataType::Bool => MetadataArray::Bool(fixed(r, n, &what, |[b]: [u8; 1]| b != 0)?),
        MetadataType::String => {
            let mut v = Vec::with_capacity(n.min(MAX_PREALLOCATED));
            for i in 0..n {
                v.push(r.string(&|| format!("element {i} of `{key}`"))?);
            }
            MetadataArray::String(v)
        }
        MetadataType::Array => {
            let mut v = Vec::with_capacity(n.min(MAX_PREALLOCATED));
            for _ in 0..n {
                v.push(read_array(r, key, depth + 1)?);
            }
            MetadataArray::Array(v)
        }
    })
}

#[cfg(test)]
mod tests {
    use model_tracer_test_support::gguf::{self as write, GgufWriter};

    use super::*;

    fn sample() -> GgufWriter {
        let mut w = GgufWriter::new();
        w.add_metadata(
            "general.architecture",
            write::MetadataValue::String("llama".into()),
        );
        w.add_metadata("n", write::MetadataValue::U32(7));
        w.add_tensor("a", &[4, 2], GgmlType::F32.id(), vec![1u8; 32]);
        w.add_tensor("b", &[32], GgmlType::Q8_0.id(), vec![2u8; 34]);
        w
    }

    #[test]
    fn writer_output_parses_with_aligned_tensors() {
        let f = GgufFile::from_bytes(sample().to_bytes()).unwrap();
        assert_eq!(f.version(), 3);
        assert_eq!(f.data_offset() % 32, 0);
        let b = f.tensor("b").unwrap();
        assert_eq!(b.offset, f.data_offset() + 32);
        assert_eq!(f.tensor_bytes(b), &[2u8; 34][..]);
        assert_eq!(f.tensor("a").unwrap().rows(), 2);
        assert_eq!(f.get_u32("n").unwrap(), 7);
    }

    #[test]
    fn integer_accessors_convert_only_when_lossless() {
        assert_eq!(MetadataValue::U64(5).as_u32(), Some(5));
        assert_eq!(MetadataValue::U64(1 << 40).as_u32(), None);
        assert_eq!(MetadataValue::I32(-1).as_u32(), None);
        assert_eq!(MetadataValue::I8(-3).as_i32(), Some(-3));
        assert_eq!(MetadataValue::F32(1.5).as_u32(), None);
        assert_eq!(MetadataValue::F64(0.1).as_f32(), None);
        assert_eq!(MetadataValue::F64(0.5).as_f32(), Some(0.5));
    }

    #[test]
    fn foreign_tensor_info_out_of_range_gives_empty_slice() {
        let f = GgufFile::from_bytes(sample().to_bytes()).unwrap();
        let mut info = f.tensor("a").unwrap().clone();
        info.offset = u64::MAX - 3;
        assert!(f.tensor_bytes(&info).is_empty());
    }
}
