//! Single-pass reductions over `&[f32]`.
