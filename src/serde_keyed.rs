//! Maps with composite keys, serialized as the sequence of their values.
//!
//! The session aggregates index records by tuples such as `(layer, head)`.
//! JSON object keys must be strings, so serializing such a map as a map
//! fails. Each record already carries its key, so the map is written as the
//! list of its values (in key order) and rebuilt from them when read; a key
//! that occurs twice keeps its last record.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A record that knows its own key in the map that holds it.
pub(crate) trait Keyed {
    /// The map key.
    type Key: Ord;
    /// The key of this record.
    fn key(&self) -> Self::Key;
}

/// Writes the values of `map` in key order.
pub(crate) fn serialize<K, V: Serialize, S: Serializer>(
    map: &BTreeMap<K, V>,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_seq(map.values())
}

/// Reads a sequence of records and indexes them by their keys.
pub(crate) fn deserialize<'de, V, D>(d: D) -> Result<BTreeMap<V::Key, V>, D::Error>
where
    V: Keyed + Deserialize<'de>,
    D: Deserializer<'de>,
{
    let records = Vec::<V>::deserialize(d)?;
    Ok(records.into_iter().map(|r| (r.key(), r)).collect())
}
