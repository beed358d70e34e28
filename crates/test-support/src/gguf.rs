//! A GGUF v3 writer, to build the files the tests read: well-formed ones,
//! and malformed ones, since it checks nothing it is given.
//!
//! It knows the format from the GGUF specification alone (magic, value type
//! ids, layout), not from the decoder's reader, so that it stays a second,
//! independent account of the format.

use std::io;
use std::path::Path;

/// The four bytes every GGUF file starts with.
pub const MAGIC: [u8; 4] = *b"GGUF";

/// Alignment of the tensor data when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: usize = 32;

/// The metadata key holding the tensor data alignment.
pub const ALIGNMENT_KEY: &str = "general.alignment";

/// GGUF's ids of the metadata value types (`gguf_type`).
pub mod value_type {
    /// `u8`.
    pub const U8: u32 = 0;
    /// `i8`.
    pub const I8: u32 = 1;
    /// `u16`.
    pub const U16: u32 = 2;
    /// `i16`.
    pub const I16: u32 = 3;
    /// `u32`.
    pub const U32: u32 = 4;
    /// `i32`.
    pub const I32: u32 = 5;
    /// `f32`.
    pub const F32: u32 = 6;
    /// One byte, zero meaning false.
    pub const BOOL: u32 = 7;
    /// Length-prefixed UTF-8 string.
    pub const STRING: u32 = 8;
    /// Typed array.
    pub const ARRAY: u32 = 9;
    /// `u64`.
    pub const U64: u32 = 10;
    /// `i64`.
    pub const I64: u32 = 11;
    /// `f64`.
    pub const F64: u32 = 12;
}

/// One metadata value to write.
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
    /// Boolean, written as one byte.
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

/// A typed metadata array to write.
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
    /// GGUF's id of the value's type.
    pub fn type_id(&self) -> u32 {
        match self {
            Self::U8(_) => value_type::U8,
            Self::I8(_) => value_type::I8,
            Self::U16(_) => value_type::U16,
            Self::I16(_) => value_type::I16,
            Self::U32(_) => value_type::U32,
            Self::I32(_) => value_type::I32,
            Self::F32(_) => value_type::F32,
            Self::Bool(_) => value_type::BOOL,
            Self::String(_) => value_type::STRING,
            Self::Array(_) => value_type::ARRAY,
            Self::U64(_) => value_type::U64,
            Self::I64(_) => value_type::I64,
            Self::F64(_) => value_type::F64,
        }
    }
}

impl MetadataArray {
    /// GGUF's id of the elements' type.
    pub fn element_type_id(&self) -> u32 {
        match self {
            Self::U8(_) => value_type::U8,
            Self::I8(_) => value_type::I8,
            Self::U16(_) => value_type::U16,
            Self::I16(_) => value_type::I16,
            Self::U32(_) => value_type::U32,
            Self::I32(_) => value_type::I32,
            Self::F32(_) => value_type::F32,
            Self::Bool(_) => value_type::BOOL,
            Self::String(_) => value_type::STRING,
            Self::Array(_) => value_type::ARRAY,
            Self::U64(_) => value_type::U64,
            Self::I64(_) => value_type::I64,
            Self::F64(_) => value_type::F64,
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
}

/// Builds a GGUF v3 file from metadata and already-encoded tensor data.
///
/// Tensors are laid out in insertion order, each padded to the alignment
/// (`general.alignment` when that metadata entry is a `u32` power of two,
/// otherwise [`DEFAULT_ALIGNMENT`]). Nothing is validated: a tensor whose
/// data does not match its shape and type, an unknown type id, duplicate
/// keys or tensors are all written as given.
#[derive(Debug, Clone, Default)]
pub struct GgufWriter {
    metadata: Vec<(String, MetadataValue)>,
    tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
}

impl GgufWriter {
    /// An empty file: no metadata, no tensors.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a metadata entry (duplicates are written as given).
    pub fn add_metadata(&mut self, key: &str, value: MetadataValue) {
        self.metadata.push((key.to_owned(), value));
    }

    /// Appends a tensor: its name, dimensions in ggml order (`dims[0]` is the
    /// row length), ggml type id (`ggml_type`) and encoded data.
    pub fn add_tensor(&mut self, name: &str, dims: &[u64], type_id: u32, bytes: Vec<u8>) {
        self.tensors
            .push((name.to_owned(), dims.to_vec(), type_id, bytes));
    }

    fn alignment(&self) -> usize {
        self.metadata
            .iter()
            .rev()
            .find(|(k, _)| k == ALIGNMENT_KEY)
            .and_then(|(_, v)| match v {
                MetadataValue::U32(a) if a.is_power_of_two() => Some(*a as usize),
                _ => None,
            })
            .unwrap_or(DEFAULT_ALIGNMENT)
    }

    /// The encoded file.
    pub fn to_bytes(&self) -> Vec<u8> {
        let align = self.alignment();
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            write_str(&mut out, key);
            out.extend_from_slice(&value.type_id().to_le_bytes());
            write_value(&mut out, value);
        }
        let mut offset = 0usize;
        for (name, dims, type_id, bytes) in &self.tensors {
            write_str(&mut out, name);
            out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&type_id.to_le_bytes());
            out.extend_from_slice(&(offset as u64).to_le_bytes());
            offset += bytes.len().next_multiple_of(align);
        }
        out.resize(out.len().next_multiple_of(align), 0);
        for (_, _, _, bytes) in &self.tensors {
            out.extend_from_slice(bytes);
            out.resize(out.len().next_multiple_of(align), 0);
        }
        out
    }

    /// Writes the encoded file to `path`.
    pub fn write(&self, path: impl AsRef<Path>) -> io::Result<()> {
        std::fs::write(path, self.to_bytes())
    }
}

fn write_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn write_value(out: &mut Vec<u8>, value: &MetadataValue) {
    match value {
        MetadataValue::U8(v) => out.push(*v),
        MetadataValue::I8(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetadataValue::U16(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetadataValue::I16(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetadataValue::U32(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetadataValue::I32(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetadataValue::F32(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetadataValue::Bool(v) => out.push(u8::from(*v)),
        MetadataValue::String(s) => write_str(out, s),
        MetadataValue::Array(a) => write_array(out, a),
        MetadataValue::U64(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetadataValue::I64(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetadataValue::F64(v) => out.extend_from_slice(&v.to_le_bytes()),
    }
}

fn write_array(out: &mut Vec<u8>, a: &MetadataArray) {
    out.extend_from_slice(&a.element_type_id().to_le_bytes());
    out.extend_from_slice(&(a.len() as u64).to_le_bytes());
    fn each<T>(out: &mut Vec<u8>, v: &[T], f: impl Fn(&T) -> Vec<u8>) {
        for x in v {
            out.extend_from_slice(&f(x));
        }
    }
    match a {
        MetadataArray::U8(v) => out.extend_from_slice(v),
        MetadataArray::I8(v) => each(out, v, |x| x.to_le_bytes().to_vec()),
        MetadataArray::U16(v) => each(out, v, |x| x.to_le_bytes().to_vec()),
        MetadataArray::I16(v) => each(out, v, |x| x.to_le_bytes().to_vec()),
        MetadataArray::U32(v) => each(out, v, |x| x.to_le_bytes().to_vec()),
        MetadataArray::I32(v) => each(out, v, |x| x.to_le_bytes().to_vec()),
        MetadataArray::F32(v) => each(out, v, |x| x.to_le_bytes().to_vec()),
        MetadataArray::Bool(v) => each(out, v, |x| vec![u8::from(*x)]),
        MetadataArray::String(v) => v.iter().for_each(|s| write_str(out, s)),
        MetadataArray::Array(v) => v.iter().for_each(|inner| write_array(out, inner)),
        MetadataArray::U64(v) => each(out, v, |x| x.to_le_bytes().to_vec()),
        MetadataArray::I64(v) => each(out, v, |x| x.to_le_bytes().to_vec()),
        MetadataArray::F64(v) => each(out, v, |x| x.to_le_bytes().to_vec()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_follows_the_specification() {
        let mut w = GgufWriter::new();
        w.add_metadata("k", MetadataValue::U16(0x0102));
        w.add_tensor("t", &[2], 0, vec![9; 8]);
        let b = w.to_bytes();
        assert_eq!(&b[..4], b"GGUF");
        assert_eq!(b[4..8], 3u32.to_le_bytes());
        assert_eq!(b[8..16], 1u64.to_le_bytes());
        assert_eq!(b[16..24], 1u64.to_le_bytes());
        // Key "k", type u16, value.
        assert_eq!(b[24..32], 1u64.to_le_bytes());
        assert_eq!(b[32], b'k');
        assert_eq!(b[33..37], value_type::U16.to_le_bytes());
        assert_eq!(b[37..39], [0x02, 0x01]);
        // Tensor "t": 1 dim of 2, type 0, offset 0; then the aligned data.
        let t = 39 + 8 + 1;
        assert_eq!(b[t..t + 4], 1u32.to_le_bytes());
        assert_eq!(b[t + 4..t + 12], 2u64.to_le_bytes());
        assert_eq!(b[t + 12..t + 16], 0u32.to_le_bytes());
        assert_eq!(b[t + 16..t + 24], 0u64.to_le_bytes());
        // The header ends at 72: the data starts at 96 and is padded to 128.
        assert_eq!(b.len(), 4 * DEFAULT_ALIGNMENT);
        assert_eq!(b[3 * DEFAULT_ALIGNMENT..3 * DEFAULT_ALIGNMENT + 8], [9; 8]);
        assert!(b[3 * DEFAULT_ALIGNMENT + 8..].iter().all(|&x| x == 0));
    }
}
