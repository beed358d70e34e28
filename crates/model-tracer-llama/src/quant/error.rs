//! The error type of the quantization routines.

use std::fmt;

use crate::dtype::GgmlType;

/// Why a quantization, dequantization or matrix construction was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum QuantError {
    /// The operation is not implemented for this element type.
    Unsupported(GgmlType),
    /// `elements` is not a whole number of blocks of `ty`.
    NotWholeBlocks {
        /// The element type.
        ty: GgmlType,
        /// The number of elements asked for.
        elements: usize,
    },
    /// `elements` elements of `ty` take `expected` bytes, but `actual` bytes were given.
    ByteLength {
        /// The element type.
        ty: GgmlType,
        /// The number of elements.
        elements: usize,
        /// The size in bytes those elements need.
        expected: usize,
        /// The size in bytes that was given.
        actual: usize,
    },
    /// A matrix of `rows` x `cols` needs `expected` values, but `actual` were given.
    ValueCount {
        /// Rows of the matrix.
        rows: usize,
        /// Columns of the matrix.
        cols: usize,
        /// `rows * cols`.
        expected: usize,
        /// The number of values given.
        actual: usize,
    },
    /// The size of a `rows` x `cols` matrix does not fit in `usize`.
    TooLarge {
        /// Rows of the matrix.
        rows: usize,
        /// Columns of the matrix.
        cols: usize,
    },
    /// `values` values are not a whole number of rows of `cols` (or `cols`
    /// is zero).
    NotWholeRows {
        /// The length of a row.
        cols: usize,
        /// The number of values given.
        values: usize,
    },
    /// The value at `index` is infinite or NaN, which a block format cannot encode.
    NonFinite {
        /// Position of the offending value in the input.
        index: usize,
    },
}

impl fmt::Display for QuantError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Unsupported(ty) => write!(f, "element type {ty} is not supported here"),
            Self::NotWholeBlocks { ty, elements } => write!(
                f,
                "{elements} elements are not a whole number of {ty} blocks of {}",
                ty.block_len()
            ),
            Self::ByteLength {
                ty,
                elements,
                expected,
                actual,
            } => write!(
                f,
                "{elements} elements of {ty} take {expected} bytes, got {actual}"
            ),
            Self::ValueCount {
                rows,
                cols,
                expected,
                actual,
            } => write!(
                f,
                "a {rows}x{cols} matrix needs {expected} values, got {actual}"
            ),
            Self::TooLarge { rows, cols } => {
                write!(f, "a {rows}x{cols} matrix is too large for this machine")
            }
            Self::NotWholeRows { cols, values } => {
                write!(
                    f,
                    "{values} values are not a whole number of rows of {cols}"
                )
            }
            Self::NonFinite { index } => {
                write!(f, "value {index} is not finite and cannot be quantized")
            }
        }
    }
}

impl std::error::Error for QuantError {}
