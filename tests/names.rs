//! One name per enum variant: `name()`, `Display` and serde agree, and the
//! names are the ones the JSON Lines schema documents.
#![cfg(feature = "serde")]

use std::collections::HashSet;

use model_tracer::{AnomalyKind, BrickId, Origin, QuantType, Severity, Stage};
use serde_json::Value;

/// Checks every variant of `$ty`, listed here in declaration order: the
/// `match` without a wildcard stops compiling when a variant is added, and
/// `$ty::ALL` must hold exactly the listed ones. Returns the names in the
/// order listed.
macro_rules! check_names {
    ($ty:ident: $($v:ident),+ $(,)?) => {{
        fn listed(v: $ty) -> $ty {
            match v {
                $($ty::$v)|+ => v,
            }
        }
        let variants = [$(listed($ty::$v)),+];
        assert_eq!($ty::ALL.len(), variants.len(), "{}::ALL", stringify!($ty));
        for v in variants {
            assert!($ty::ALL.contains(&v), "{}::ALL lacks {v:?}", stringify!($ty));
        }
        let mut names = Vec::new();
        for v in variants {
            let name = v.name();
            assert_eq!(serde_json::to_value(v).unwrap(), Value::from(name), "{v:?}");
            let back: $ty = serde_json::from_value(Value::from(name)).unwrap();
            assert_eq!(back, v, "{name}");
            assert_eq!(v.to_string(), name, "Display of {v:?}");
            names.push(name);
        }
        let distinct: HashSet<_> = names.iter().collect();
        assert_eq!(distinct.len(), names.len(), "{names:?}");
        names
    }};
}

#[test]
fn stage_names() {
    let names = check_names!(Stage:
        Embedding, Input, PostNorm, PostAttn, PostFfnNorm, PostFfn, Output, FinalNorm, Logits
    );
    // `act_stage` and `anomaly_stage` of the JSON Lines schema.
    assert_eq!(
        names,
        [
            "embedding",
            "input",
            "post_norm",
            "post_attn",
            "post_ffn_norm",
            "post_ffn",
            "output",
            "final_norm",
            "logits"
        ]
    );
}

#[test]
fn anomaly_kind_and_origin_names() {
    let kinds = check_names!(AnomalyKind: NaN, Inf, Explosion, Vanishing, ResidualDominance);
    // `anomaly_kind` of the JSON Lines schema and the `kind` field of the
    // log and tracing events.
    assert_eq!(
        kinds,
        ["nan", "inf", "explosion", "vanishing", "residual_dominance"]
    );
    let origins = check_names!(Origin: Produced, Propagated);
    assert_eq!(origins, ["produced", "propagated"]);
}

#[test]
fn brick_and_quant_type_names() {
    let bricks = check_names!(BrickId:
        Embedding, QkvProjection, AttentionOutput, FfnGate, FfnUp, FfnDown, LmHead
    );
    // `quant_brick` and `whatif_brick` of the JSON Lines schema.
    assert_eq!(
        bricks,
        [
            "embedding",
            "qkv_projection",
            "attention_output",
            "ffn_gate",
            "ffn_up",
            "ffn_down",
            "lm_head"
        ]
    );
    let types = check_names!(QuantType:
        F32, F16, BF16, Q8_0, Q6_K, Q5_K, Q5_1, Q5_0, Q4_K, Q4_1, Q4_0, Q3_K, Q2_K
    );
    // ggml's spelling, as GGUF tools print it.
    assert_eq!(types[9], "Q4_1");
    assert!(types.iter().all(|t| t.to_uppercase() == *t), "{types:?}");
}

#[test]
fn severity_names() {
    let names = check_names!(Severity: Acceptable, Warning, Critical);
    assert_eq!(names, ["acceptable", "warning", "critical"]);
}

#[test]
fn a_misspelled_name_is_rejected() {
    // Names are matched exactly: no case folding, no Rust variant names.
    for bad in [
        "NaN",
        "residual dominance",
        "QkvProjection",
        "q4_1",
        "PostAttn",
    ] {
        let v = Value::from(bad);
        assert!(
            serde_json::from_value::<AnomalyKind>(v.clone()).is_err(),
            "{bad}"
        );
        assert!(
            serde_json::from_value::<BrickId>(v.clone()).is_err(),
            "{bad}"
        );
        assert!(
            serde_json::from_value::<QuantType>(v.clone()).is_err(),
            "{bad}"
        );
        assert!(serde_json::from_value::<Stage>(v).is_err(), "{bad}");
    }
}
