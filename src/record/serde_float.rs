//! How trace floats are serialized: NaN and infinities survive a JSON round trip.
//!
//! A trace is full of values that are legitimately not finite: a NaN count is
//! data, the SNR of two identical vectors is `+inf`, a poisoned activation has
//! a NaN mean. JSON has no literal for any of them: `serde_json` writes them
//! as `null` and then refuses to read `null` back into an `f32`. Every `f32`
//! field of the trace types is therefore serialized through this module:
//!
//! | value | human-readable formats (JSON, ...) | binary formats |
//! |---|---|---|
//! | finite | the number | the `f32` |
//! | NaN | the string `"NaN"` | the `f32` |
//! | `+inf` / `-inf` | the strings `"inf"` / `"-inf"` | the `f32` |
//!
//! Reading accepts a number, one of those strings, and `null`, read as NaN
//! (what a plain serializer leaves for any non-finite value), so documents
//! written before this representation still load. In pandas the strings
//! become floats with `column.astype(float)` (`pd.to_numeric` rejects them).
//!
//! The module is a serde `with` module:
//!
//! ```
//! # #[cfg(feature = "serde")] {
//! #[derive(serde::Serialize, serde::Deserialize)]
//! struct Point {
//!     #[serde(with = "model_tracer::serde_float")]
//!     snr_db: f32,
//! }
//! let json = serde_json::to_string(&Point { snr_db: f32::INFINITY }).unwrap();
//! assert_eq!(json, r#"{"snr_db":"inf"}"#);
//! let back: Point = serde_json::from_str(&json).unwrap();
//! assert_eq!(back.snr_db, f32::INFINITY);
//! # }
//! ```

use std::fmt;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::ser::{SerializeSeq, Serializer};
use serde::{Deserialize, Serialize};

/// The string written for NaN.
pub const NAN: &str = "NaN";
/// The string written for `+inf`.
pub const INF: &str = "inf";
/// The string written for `-inf`.
pub const NEG_INF: &str = "-inf";

/// The text of a non-finite value (`None` for a finite one).
pub fn non_finite_name(v: f32) -> Option<&'static str> {
    if v.is_nan() {
        Some(NAN)
    } else if v == f32::INFINITY {
        Some(INF)
    } else if v == f32::NEG_INFINITY {
        Some(NEG_INF)
    } else {
        None
    }
}

/// Reads one of the names written for non-finite values. Case is ignored
/// and `"Infinity"` / `"-Infinity"` (what some JSON writers use) are
/// accepted too.
pub fn parse_non_finite(s: &str) -> Option<f32> {
    let t = s.trim();
    if t.eq_ignore_ascii_case(NAN) {
        Some(f32::NAN)
    } else if t.eq_ignore_ascii_case(INF)
        || t.eq_ignore_ascii_case("+inf")
        || t.eq_ignore_ascii_case("infinity")
    {
        Some(f32::INFINITY)
    } else if t.eq_ignore_ascii_case(NEG_INF) || t.eq_ignore_ascii_case("-infinity") {
        Some(f32::NEG_INFINITY)
    } else {
        None
    }
}

/// Serializes `v`: a number when finite, else its name (human-readable
/// formats only; binary formats get the raw `f32`).
pub fn serialize<S: Serializer>(v: &f32, s: S) -> Result<S::Ok, S::Error> {
    match non_finite_name(*v) {
        Some(name) if s.is_human_readable() => s.serialize_str(name),
        _ => s.serialize_f32(*v),
    }
}

/// Deserializes what [`serialize`] wrote (and `null`, as NaN).
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f32, D::Error> {
    if d.is_human_readable() {
        d.deserialize_any(FloatVisitor)
    } else {
        f32::deserialize(d)
    }
}

struct FloatVisitor;

impl<'de> Visitor<'de> for FloatVisitor {
    type Value = f32;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a number, \"NaN\", \"inf\", \"-inf\" or null")
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<f32, E> {
        Ok(v as f32)
    }
    fn visit_f32<E: de::Error>(self, v: f32) -> Result<f32, E> {
        Ok(v)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<f32, E> {
        Ok(v as f32)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<f32, E> {
        Ok(v as f32)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<f32, E> {
        parse_non_finite(v).ok_or_else(|| E::invalid_value(de::Unexpected::Str(v), &self))
    }
    fn visit_unit<E: de::Error>(self) -> Result<f32, E> {
        Ok(f32::NAN)
    }
    fn visit_none<E: de::Error>(self) -> Result<f32, E> {
        Ok(f32::NAN)
    }
}

/// An `f32` serialized through this module, for use inside containers.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Default)]
pub struct Float(pub f32);

impl Serialize for Float {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        serialize(&self.0, s)
    }
}

impl<'de> Deserialize<'de> for Float {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        deserialize(d).map(Float)
    }
}

/// `Option<f32>`: `None` is `null`; `Some` is written as above (so
/// `Some(NaN)` and `None` stay distinct).
pub mod option {
    use super::*;

    /// Serializes `None` as null and `Some(v)` like [`super::serialize`].
    pub fn serialize<S: Serializer>(v: &Option<f32>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(x) => s.serialize_some(&Float(*x)),
            None => s.serialize_none(),
        }
    }

    /// Reads null as `None`, anything else like [`super::deserialize`].
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f32>, D::Error> {
        Ok(Option::<Float>::deserialize(d)?.map(|f| f.0))
    }
}

/// `Vec<f32>`: a sequence whose elements are written as above.
pub mod vec {
    use super::*;

    /// Serializes every element like [`super::serialize`].
    pub fn serialize<S: Serializer>(v: &[f32], s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(v.len()))?;
        for x in v {
            seq.serialize_element(&Float(*x))?;
        }
        seq.end()
    }

    /// Reads a sequence of numbers, names and nulls.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f32>, D::Error> {
        struct SeqVisitor;
        impl<'de> Visitor<'de> for SeqVisitor {
            type Value = Vec<f32>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a sequence of floats")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<f32>, A::Error> {
                // The hint comes from the input: cap it so a lying length
                // cannot reserve unbounded memory.
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
                while let Some(Float(x)) = seq.next_element()? {
                    out.push(x);
                }
                Ok(out)
            }
        }
        d.deserialize_seq(SeqVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Serialize, Deserialize)]
    struct Row {
        #[serde(with = "super")]
        a: f32,
        #[serde(with = "super::option")]
        b: Option<f32>,
        #[serde(with = "super::vec")]
        c: Vec<f32>,
    }

    fn bits(v: f32) -> u32 {
        if v.is_nan() {
            f32::NAN.to_bits()
        } else {
            v.to_bits()
        }
    }

    #[test]
    fn non_finite_values_round_trip_through_json() {
        let specials = [
            f32::NAN,
            -f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            0.0,
            -0.0,
            f32::MIN_POSITIVE,
            f32::MAX,
            f32::MIN,
            1e-45,
            0.1,
            -3.25e7,
        ];
        for &a in &specials {
            for b in [None, Some(a)] {
                let row = Row {
                    a,
                    b,
                    c: specials.to_vec(),
                };
                let json = serde_json::to_string(&row).unwrap();
                let back: Row = serde_json::from_str(&json).unwrap();
                assert_eq!(bits(back.a), bits(a), "{json}");
                assert_eq!(back.b.map(bits), b.map(bits), "{json}");
                let c: Vec<u32> = back.c.iter().map(|&v| bits(v)).collect();
                let want: Vec<u32> = specials.iter().map(|&v| bits(v)).collect();
                assert_eq!(c, want, "{json}");
            }
        }
    }

    #[test]
    fn many_finite_values_round_trip_bit_exactly() {
        let mut x = 0x1234_5678u32;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let v = f32::from_bits(x);
            if !v.is_finite() {
                continue;
            }
            let json = serde_json::to_string(&Float(v)).unwrap();
            let back: Float = serde_json::from_str(&json).unwrap();
            assert_eq!(back.0.to_bits(), v.to_bits(), "{json}");
        }
    }

    #[test]
    fn the_written_form_is_documented_and_null_reads_as_nan() {
        let row = Row {
            a: f32::NAN,
            b: Some(f32::NEG_INFINITY),
            c: vec![f32::INFINITY, 1.5],
        };
        assert_eq!(
            serde_json::to_string(&row).unwrap(),
            r#"{"a":"NaN","b":"-inf","c":["inf",1.5]}"#
        );
        let old: Row = serde_json::from_str(r#"{"a":null,"b":null,"c":[null,2]}"#).unwrap();
        assert!(old.a.is_nan() && old.b.is_none() && old.c[0].is_nan() && old.c[1] == 2.0);
        let err = serde_json::from_str::<Row>(r#"{"a":"lots","b":null,"c":[]}"#).unwrap_err();
        assert!(err.to_string().contains("\"lots\""), "{err}");
        for (s, v) in [("Infinity", f32::INFINITY), ("-INF", f32::NEG_INFINITY)] {
            assert_eq!(parse_non_finite(s), Some(v));
        }
        assert!(parse_non_finite("nan").is_some_and(f32::is_nan));
        assert_eq!(parse_non_finite("1.0"), None);
    }
}
