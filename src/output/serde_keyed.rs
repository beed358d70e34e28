//! Maps with composite keys, serialized as the sequence of their values.
//!
//! The session aggregates index records by tuples such as `(layer, head)`.
//! JSON object keys must be strings, so serializing such a map as a map
//! fails. Each record already carries its key, so the map is written as the
//! list of its values (in key order) and rebuilt from them when read; a key
//! that occurs twice keeps its last record.
//!
//! One record type may sit in maps keyed differently (a brick-and-layer
//! aggregate by `(brick, layer)`, or by `(type, brick, layer)` for a what-if
//! comparison): the key type of the map being read picks the [`Keyed`]
//! implementation.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A record that knows its own key `K` in a map that holds it.
pub(crate) trait Keyed<K> {
    /// The key of this record.
    fn key(&self) -> K;
}

/// Writes the values of `map` in key order.
pub(crate) fn serialize<K, V: Serialize, S: Serializer>(
    map: &BTreeMap<K, V>,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_seq(map.values())
}

/// Reads a sequence of records and indexes them by their keys.
pub(crate) fn deserialize<'de, K, V, D>(d: D) -> Result<BTreeMap<K, V>, D::Error>
where
    K: Ord,
    V: Keyed<K> + Deserialize<'de>,
    D: Deserializer<'de>,
{
    let records = Vec::<V>::deserialize(d)?;
    Ok(records.into_iter().map(|r| (r.key(), r)).collect())
}
