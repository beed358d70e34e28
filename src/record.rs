//! The records: what a forward's hooks produce. The numeric kernels
//! ([`stats`](crate::stats), [`fingerprint`](crate::fingerprint)), the plain
//! data of the five systems, the per-forward record that holds them and the
//! model's description.
//!
//! A record imports only other records (besides `std` and its dependencies):
//! it knows nothing of configs, tracers or where records go. The kernels
//! import no record but the serde helper.

pub mod activation;
pub mod anomaly;
pub mod attention;
pub mod fingerprint;
pub mod forward;
pub mod kv_cache;
pub mod logit;
pub mod model_info;
pub mod quant;
pub mod sequence;
#[cfg(feature = "serde")]
pub mod serde_float;
pub mod stage;
pub mod stats;
