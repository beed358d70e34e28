//! Which sequence a row of a forward belongs to, when one forward runs the
//! rows of several sequences (continuous batching).

use std::fmt;

/// A sequence (a request, a conversation) whose rows share forwards with
/// other sequences' rows. The tracer keeps each sequence's records apart:
/// its records are those of running it alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(transparent))]
pub struct SequenceId(pub u64);

impl fmt::Display for SequenceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sequence {}", self.0)
    }
}

impl From<u64> for SequenceId {
    fn from(id: u64) -> Self {
        Self(id)
    }
}

/// One row of a forward over several sequences: the token of `sequence`
/// at `position`.
///
/// The rows of one sequence are consecutive in a forward, in increasing
/// positions: a prefill chunk of one sequence sits beside the decode rows
/// of others
/// ([`ModelTracer::begin_forward_batch`](crate::ModelTracer::begin_forward_batch)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct BatchRow {
    /// The sequence of the row.
    pub sequence: SequenceId,
    /// Its token position in that sequence.
    pub position: usize,
}

impl BatchRow {
    /// The row of `sequence` at `position`.
    pub fn new(sequence: SequenceId, position: usize) -> Self {
        Self { sequence, position }
    }
}
