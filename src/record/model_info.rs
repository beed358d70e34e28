//! The model a trace describes: its shape, as sinks and views name it.

/// The model a trace describes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct ModelInfo {
    /// Display name (a file name, "synthetic tiny", ...).
    pub name: String,
    /// Transformer layers.
    pub layers: usize,
    /// Query heads per layer.
    pub heads: usize,
    /// Key/value heads per layer.
    pub kv_heads: usize,
    /// Hidden size.
    pub dim: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// KV cache capacity, in positions (0 when unknown).
    pub kv_capacity: usize,
    /// First cache positions never evicted (StreamingLLM's attention
    /// sinks). Attention summaries index the cache in chronological order;
    /// once the cache has evicted, slot `i` holds position `i` for
    /// `i < kv_sinks` and a recent position otherwise. 0 for a plain
    /// sliding window.
    pub kv_sinks: usize,
}
