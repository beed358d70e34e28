//! The GGUF reader against well-formed files (round trips through the
//! writer, the real model file) and against a corpus of malformed ones: every
//! malformed file must give an error value, never a panic or a huge
//! allocation.

mod common;

use std::time::{Duration, Instant};

use model_tracer_llama::dtype::GgmlType;
use model_tracer_llama::gguf::{self, GgufError, GgufFile, DEFAULT_ALIGNMENT, MAX_ARRAY_NESTING};
use model_tracer_test_support::gguf::{GgufWriter, MetadataArray, MetadataValue};
use model_tracer_test_support::{largest_allocation, CountingAllocator, SplitMix64};

// Measures the largest allocation a parse asks for.
#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// Largest allocation a parse of a hostile file may ask for.
const ALLOCATION_BOUND: usize = 1 << 20;

/// Fixed header: magic, version, tensor count, metadata count.
const HEADER_LEN: usize = 4 + 4 + 8 + 8;

fn all_kinds_of_metadata() -> Vec<(&'static str, MetadataValue)> {
    vec![
        (
            "general.architecture",
            MetadataValue::String("llama".into()),
        ),
        ("u8", MetadataValue::U8(200)),
        ("i8", MetadataValue::I8(-100)),
        ("u16", MetadataValue::U16(60_000)),
        ("i16", MetadataValue::I16(-30_000)),
        ("u32", MetadataValue::U32(4_000_000_000)),
        ("i32", MetadataValue::I32(-2_000_000_000)),
        ("f32", MetadataValue::F32(1e-5)),
        ("bool", MetadataValue::Bool(true)),
        ("empty string", MetadataValue::String(String::new())),
        ("unicode", MetadataValue::String("héllo 世界 🦀".into())),
        ("u64", MetadataValue::U64(u64::MAX)),
        ("i64", MetadataValue::I64(i64::MIN)),
        ("f64", MetadataValue::F64(-0.125)),
        (
            "tokens",
            MetadataValue::Array(MetadataArray::String(vec![
                "<s>".into(),
                "Ġthe".into(),
                String::new(),
            ])),
        ),
        (
            "types",
            MetadataValue::Array(MetadataArray::I32(vec![3, 1, 1, -7])),
        ),
        (
            "empty array",
            MetadataValue::Array(MetadataArray::F64(vec![])),
        ),
        (
            "bools",
            MetadataValue::Array(MetadataArray::Bool(vec![true, false])),
        ),
        (
            "nested",
            MetadataValue::Array(MetadataArray::Array(vec![
                MetadataArray::U8(vec![1, 2, 3]),
                MetadataArray::String(vec!["x".into()]),
                MetadataArray::Array(vec![MetadataArray::I64(vec![-1])]),
            ])),
        ),
    ]
}

/// The reader's form of a value the writer was given.
fn as_read(v: &MetadataValue) -> gguf::MetadataValue {
    use gguf::MetadataValue as R;
    match v.clone() {
        MetadataValue::U8(x) => R::U8(x),
        MetadataValue::I8(x) => R::I8(x),
        MetadataValue::U16(x) => R::U16(x),
        MetadataValue::I16(x) => R::I16(x),
        MetadataValue::U32(x) => R::U32(x),
        MetadataValue::I32(x) => R::I32(x),
        MetadataValue::F32(x) => R::F32(x),
        MetadataValue::Bool(x) => R::Bool(x),
        MetadataValue::String(x) => R::String(x),
        MetadataValue::Array(a) => R::Array(array_as_read(a)),
        MetadataValue::U64(x) => R::U64(x),
        MetadataValue::I64(x) => R::I64(x),
        MetadataValue::F64(x) => R::F64(x),
    }
}

fn array_as_read(a: MetadataArray) -> gguf::MetadataArray {
    use gguf::MetadataArray as R;
    match a {
        MetadataArray::U8(v) => R::U8(v),
        MetadataArray::I8(v) => R::I8(v),
        MetadataArray::U16(v) => R::U16(v),
        MetadataArray::I16(v) => R::I16(v),
        MetadataArray::U32(v) => R::U32(v),
        MetadataArray::I32(v) => R::I32(v),
        MetadataArray::F32(v) => R::F32(v),
        MetadataArray::Bool(v) => R::Bool(v),
        MetadataArray::String(v) => R::String(v),
        MetadataArray::Array(v) => R::Array(v.into_iter().map(array_as_read).collect()),
        MetadataArray::U64(v) => R::U64(v),
        MetadataArray::I64(v) => R::I64(v),
        MetadataArray::F64(v) => R::F64(v),
    }
}

/// Deterministic filler so that tensor data differ from each other.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn sample_writer() -> GgufWriter {
    let mut w = GgufWriter::new();
    for (k, v) in all_kinds_of_metadata() {
        w.add_metadata(k, v);
    }
    w.add_tensor(
        "token_embd.weight",
        &[64, 3],
        GgmlType::Q8_0.id(),
        pattern(3 * 68, 1),
    );
    w.add_tensor(
        "blk.0.attn_norm.weight",
        &[64],
        GgmlType::F32.id(),
        pattern(256, 2),
    );
    w.add_tensor(
        "blk.0.attn_q.weight",
        &[64, 2],
        GgmlType::Q4_1.id(),
        pattern(2 * 40, 3),
    );
    w.add_tensor("odd.f16", &[3], GgmlType::F16.id(), pattern(6, 4));
    w
}

fn sample_bytes() -> Vec<u8> {
    sample_writer().to_bytes()
}

fn parse(bytes: Vec<u8>) -> Result<GgufFile, GgufError> {
    GgufFile::from_bytes(bytes)
}

fn put_u32(bytes: &mut [u8], at: usize, v: u32) {
    bytes[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(bytes: &mut [u8], at: usize, v: u64) {
    bytes[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// A file without metadata holding one tensor, and the byte offsets of the
/// fields of its tensor header.
struct OneTensor {
    bytes: Vec<u8>,
    n_dims_at: usize,
    dims_at: usize,
    type_at: usize,
    offset_at: usize,
}

fn one_tensor(name: &str, dims: &[u64], ty: GgmlType, data: Vec<u8>) -> OneTensor {
    let mut w = GgufWriter::new();
    w.add_tensor(name, dims, ty.id(), data);
    let n_dims_at = HEADER_LEN + 8 + name.len();
    let dims_at = n_dims_at + 4;
    let type_at = dims_at + 8 * dims.len();
    OneTensor {
        bytes: w.to_bytes(),
        n_dims_at,
        dims_at,
        type_at,
        offset_at: type_at + 4,
    }
}

/// A file whose only content is one metadata entry, and the offset where the
/// entry's value type starts.
fn one_kv(key: &str, value: MetadataValue) -> (Vec<u8>, usize) {
    let mut w = GgufWriter::new();
    w.add_metadata(key, value);
    (w.to_bytes(), HEADER_LEN + 8 + key.len())
}

#[test]
fn round_trip_keeps_metadata_order_values_and_tensor_bytes() {
    let writer = sample_writer();
    let f = parse(writer.to_bytes()).expect("writer output must parse");
    assert_eq!(f.version(), 3);
    assert_eq!(f.alignment(), DEFAULT_ALIGNMENT);

    let expected = all_kinds_of_metadata();
    let keys: Vec<&str> = f.metadata_keys().collect();
    let expected_keys: Vec<&str> = expected.iter().map(|(k, _)| *k).collect();
    assert_eq!(keys, expected_keys);
    for (k, v) in &expected {
        assert_eq!(f.metadata(k), Some(&as_read(v)), "value of {k}");
    }

    let names: Vec<&str> = f.tensors().iter().map(|t| t.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "token_embd.weight",
            "blk.0.attn_norm.weight",
            "blk.0.attn_q.weight",
            "odd.f16"
        ]
    );
    let embd = f.tensor("token_embd.weight").unwrap();
    assert_eq!(embd.dims, [64, 3]);
    assert_eq!(embd.ggml_type, GgmlType::Q8_0);
    assert_eq!(
        (embd.row_len(), embd.rows(), embd.n_elements()),
        (64, 3, 192)
    );
    assert_eq!(embd.size_bytes, 3 * 68);
    assert_eq!(embd.row_bytes(), 68);
    assert_eq!(f.tensor_bytes(embd), pattern(3 * 68, 1));
    assert_eq!(
        f.tensor_data("blk.0.attn_q.weight").unwrap().1,
        pattern(80, 3)
    );
    assert_eq!(f.tensor_data("odd.f16").unwrap().1, pattern(6, 4));
    for t in f.tensors() {
        assert_eq!((t.offset - f.data_offset()) % 32, 0, "{} aligned", t.name);
    }
    assert!(f.tensor("missing").is_none());
}

#[test]
fn typed_getters_check_presence_and_type() {
    let f = parse(sample_bytes()).unwrap();
    assert_eq!(f.get_u32("u32").unwrap(), 4_000_000_000);
    assert_eq!(f.get_u32("u16").unwrap(), 60_000);
    assert_eq!(f.get_str("general.architecture").unwrap(), "llama");
    assert_eq!(f.get_f32("f32").unwrap(), 1e-5);
    assert!(f.get_bool("bool").unwrap());
    assert_eq!(f.get_str_array("tokens").unwrap(), ["<s>", "Ġthe", ""]);
    assert_eq!(f.get_i32_array("types").unwrap(), [3, 1, 1, -7]);
    assert_eq!(f.get_u64("u64").unwrap(), u64::MAX);

    assert!(matches!(f.get_u32("nope"), Err(GgufError::MissingKey(k)) if k == "nope"));
    assert!(matches!(
        f.get_u32("i32"),
        Err(GgufError::WrongKeyType { key, expected: "u32" }) if key == "i32"
    ));
    assert!(matches!(
        f.get_u32("u64"),
        Err(GgufError::WrongKeyType { .. })
    ));
    assert!(matches!(
        f.get_str("u8"),
        Err(GgufError::WrongKeyType { .. })
    ));
    assert!(matches!(
        f.get_str_array("types"),
        Err(GgufError::WrongKeyType { .. })
    ));
    assert!(matches!(
        f.get_i32_array("tokens"),
        Err(GgufError::WrongKeyType { .. })
    ));
}

#[test]
fn custom_alignment_is_honoured() {
    let mut w = sample_writer();
    w.add_metadata("general.alignment", MetadataValue::U32(256));
    let f = parse(w.to_bytes()).unwrap();
    assert_eq!(f.alignment(), 256);
    assert_eq!(f.data_offset() % 256, 0);
    for t in f.tensors() {
        assert_eq!(t.offset % 256, 0, "{}", t.name);
    }
    assert_eq!(
        f.tensor_data("odd.f16").unwrap().1,
        pattern(6, 4),
        "data found at the 256-aligned offset"
    );
}

#[test]
fn invalid_alignment_values_are_rejected() {
    for a in [0u32, 3, 48] {
        let mut w = sample_writer();
        w.add_metadata("general.alignment", MetadataValue::U32(a));
        match parse(w.to_bytes()) {
            Err(GgufError::InvalidAlignment(v)) => assert_eq!(v, u64::from(a)),
            other => panic!("alignment {a}: {other:?}"),
        }
    }
    let mut w = sample_writer();
    w.add_metadata("general.alignment", MetadataValue::String("32".into()));
    assert!(matches!(
        parse(w.to_bytes()),
        Err(GgufError::WrongKeyType { key, .. }) if key == "general.alignment"
    ));
}

#[test]
fn every_truncation_of_the_header_is_an_error() {
    let bytes = sample_bytes();
    let f = parse(bytes.clone()).unwrap();
    let data_start = f.data_offset() as usize;
    let last_tensor_end = f
        .tensors()
        .iter()
        .map(|t| t.offset as usize + t.size_bytes)
        .max()
        .unwrap();
    for cut in 0..data_start {
        let r = parse(bytes[..cut].to_vec());
        assert!(
            r.is_err(),
            "cut at {cut} of {data_start} header bytes parsed"
        );
    }
    // Cuts inside the data: every cut that removes part of some tensor fails.
    for cut in [data_start + 1, data_start + 100, last_tensor_end - 1] {
        match parse(bytes[..cut].to_vec()) {
            Err(GgufError::TensorOutOfBounds { file_len, .. }) => {
                assert_eq!(file_len, cut as u64)
            }
            other => panic!("cut at {cut}: {other:?}"),
        }
    }
    // Only padding lies beyond the last tensor; dropping it is harmless.
    assert!(parse(bytes[..last_tensor_end].to_vec()).is_ok());
}

#[test]
fn truncation_reports_the_field_and_offset() {
    let (bytes, type_at) = one_kv("name", MetadataValue::String("abc".into()));
    match parse(bytes[..type_at + 2].to_vec()) {
        Err(GgufError::Truncated { what, offset }) => {
            assert!(what.contains("value type of `name`"), "{what}");
            assert_eq!(offset, type_at as u64);
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        parse(vec![]),
        Err(GgufError::Truncated { offset: 0, .. })
    ));
}

#[test]
fn bad_magic_is_rejected() {
    let mut bytes = sample_bytes();
    bytes[..4].copy_from_slice(b"GGML");
    assert!(matches!(parse(bytes), Err(GgufError::BadMagic(m)) if &m == b"GGML"));
}

#[test]
fn versions_other_than_2_and_3_are_rejected() {
    for v in [0u32, 1, 4, 0x0300_0000] {
        let mut bytes = sample_bytes();
        put_u32(&mut bytes, 4, v);
        match parse(bytes) {
            Err(GgufError::UnsupportedVersion(found)) => assert_eq!(found, v),
            other => panic!("version {v}: {other:?}"),
        }
    }
    let mut bytes = sample_bytes();
    put_u32(&mut bytes, 4, 2);
    assert_eq!(parse(bytes).unwrap().version(), 2);
}

/// Runs `f` and checks that it returned quickly: no allocation or loop was
/// sized by the absurd count.
fn quickly<T>(what: &str, f: impl FnOnce() -> T) -> T {
    let start = Instant::now();
    let out = f();
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{what} took {:?}",
        start.elapsed()
    );
    out
}

#[test]
fn absurd_counts_fail_fast_without_allocating() {
    for huge in [u64::MAX, u64::MAX / 2, 1 << 40, 1_000_000] {
        let mut bytes = sample_bytes();
        put_u64(&mut bytes, 8, huge);
        let r = quickly("tensor count", || parse(bytes));
        assert!(
            matches!(&r, Err(GgufError::CountTooLarge { what, count, .. }) if what.contains("tensor count") && *count == huge),
            "{r:?}"
        );

        let mut bytes = sample_bytes();
        put_u64(&mut bytes, 16, huge);
        let r = quickly("kv count", || parse(bytes));
        assert!(
            matches!(&r, Err(GgufError::CountTooLarge { what, .. }) if what.contains("metadata count")),
            "{r:?}"
        );

        // Length of the first key.
        let mut bytes = sample_bytes();
        put_u64(&mut bytes, HEADER_LEN, huge);
        let r = quickly("key length", || parse(bytes));
        assert!(matches!(r, Err(GgufError::CountTooLarge { .. })), "{r:?}");

        // Length of a string value.
        let (mut bytes, type_at) = one_kv("name", MetadataValue::String("abc".into()));
        put_u64(&mut bytes, type_at + 4, huge);
        let r = quickly("string length", || parse(bytes));
        assert!(matches!(r, Err(GgufError::CountTooLarge { .. })), "{r:?}");

        // Length of arrays of every element width, including strings and
        // nested arrays.
        for arr in [
            MetadataArray::U8(vec![1]),
            MetadataArray::F64(vec![1.0]),
            MetadataArray::String(vec!["a".into()]),
            MetadataArray::Array(vec![MetadataArray::U8(vec![])]),
        ] {
            let (mut bytes, type_at) = one_kv("arr", MetadataValue::Array(arr));
            put_u64(&mut bytes, type_at + 8, huge);
            let r = quickly("array length", || parse(bytes));
            assert!(
                matches!(&r, Err(GgufError::CountTooLarge { what, .. }) if what.contains("`arr`")),
                "{r:?}"
            );
        }
    }

    // Dimension count.
    for n in [5u32, 64, u32::MAX] {
        let mut t = one_tensor("w", &[32, 2], GgmlType::F32, vec![0; 256]);
        put_u32(&mut t.bytes, t.n_dims_at, n);
        let r = quickly("n_dims", || parse(t.bytes));
        assert!(
            matches!(&r, Err(GgufError::CountTooLarge { what, count, limit: 4 }) if what.contains("`w`") && *count == u64::from(n)),
            "{r:?}"
        );
    }
}

/// Parses `bytes`, which must fail, and checks that no allocation of
/// [`ALLOCATION_BOUND`] bytes or more was asked for on the way.
fn fails_small(what: &str, bytes: Vec<u8>) -> GgufError {
    let len = bytes.len();
    let (r, largest) = largest_allocation(|| parse(bytes));
    assert!(
        largest < ALLOCATION_BOUND,
        "{what}: a {len}-byte file made the parser ask for {largest} bytes"
    );
    match r {
        Ok(f) => panic!("{what}: parsed as {f:?}"),
        Err(e) => e,
    }
}

#[test]
fn a_1kb_file_claiming_2_pow_60_tensors_gets_an_error_not_an_allocation() {
    let mut bytes = sample_bytes();
    assert!((512..2048).contains(&bytes.len()), "{}", bytes.len());
    put_u64(&mut bytes, 8, 1 << 60);
    let e = fails_small("2^60 tensors", bytes);
    assert!(
        matches!(&e, GgufError::CountTooLarge { what, count, .. } if what == "the tensor count" && *count == 1 << 60),
        "{e:?}"
    );
    assert!(e.to_string().contains("the tensor count"), "{e}");
}

#[test]
fn a_2_pow_40_byte_string_gets_an_error_naming_its_key() {
    let (mut bytes, type_at) = one_kv("general.name", MetadataValue::String("x".repeat(1000)));
    put_u64(&mut bytes, type_at + 4, 1 << 40);
    let e = fails_small("2^40-byte string", bytes);
    assert!(
        matches!(&e, GgufError::CountTooLarge { what, count, .. } if what.contains("`general.name`") && *count == 1 << 40),
        "{e:?}"
    );
    assert!(e.to_string().contains("general.name"), "{e}");
}

#[test]
fn a_2_pow_40_element_array_gets_an_error_naming_its_key() {
    for arr in [
        MetadataArray::U8(vec![1; 1000]),
        MetadataArray::Bool(vec![true; 1000]),
        MetadataArray::F32(vec![1.0; 250]),
        MetadataArray::U64(vec![1; 125]),
        MetadataArray::String(vec!["ab".into(); 100]),
        MetadataArray::Array(vec![MetadataArray::U8(vec![1, 2]); 70]),
    ] {
        let kind = arr.element_type_id();
        let (mut bytes, type_at) = one_kv("tokenizer.ggml.tokens", MetadataValue::Array(arr));
        put_u64(&mut bytes, type_at + 8, 1 << 40);
        let e = fails_small(&format!("2^40 elements of type {kind}"), bytes);
        assert!(
            matches!(&e, GgufError::CountTooLarge { what, count, .. } if what.contains("`tokenizer.ggml.tokens`") && *count == 1 << 40),
            "type {kind}: {e:?}"
        );
        assert!(e.to_string().contains("tokenizer.ggml.tokens"), "{e}");
    }
}

/// Counts that the rest of the file could just hold pass the first check;
/// what is allocated for them up front must still follow what the file
/// holds, not what it claims.
#[test]
fn plausible_counts_do_not_allocate_ahead_of_the_entries() {
    const LEN: usize = 1 << 20;
    let header = |n_tensors: u64, n_kv: u64| {
        let mut bytes = vec![0u8; LEN];
        bytes[..4].copy_from_slice(b"GGUF");
        put_u32(&mut bytes, 4, 3);
        put_u64(&mut bytes, 8, n_tensors);
        put_u64(&mut bytes, 16, n_kv);
        bytes
    };
    let rest = (LEN - HEADER_LEN) as u64;
    // As many metadata entries as 13-byte entries could fill: the second
    // one (an empty key again) is a duplicate.
    let e = fails_small("plausible metadata count", header(0, rest / 13));
    assert!(
        matches!(&e, GgufError::DuplicateKey(k) if k.is_empty()),
        "{e:?}"
    );
    // As many tensors as 24-byte headers could fill.
    let e = fails_small("plausible tensor count", header(rest / 24, 0));
    assert!(
        matches!(&e, GgufError::DuplicateTensor(t) if t.is_empty()),
        "{e:?}"
    );
}

#[test]
fn dimension_products_that_overflow_are_rejected() {
    let cases: [(u64, u64); 3] = [(u64::MAX, 1), (1 << 40, 1 << 40), (32, u64::MAX / 16)];
    for (d0, d1) in cases {
        let mut t = one_tensor("w", &[32, 2], GgmlType::F32, vec![0; 256]);
        put_u64(&mut t.bytes, t.dims_at, d0);
        put_u64(&mut t.bytes, t.dims_at + 8, d1);
        let r = quickly("dims", || parse(t.bytes));
        assert!(
            matches!(&r, Err(GgufError::BadShape { tensor, .. } | GgufError::TensorOutOfBounds { tensor, .. }) if tensor == "w"),
            "dims [{d0}, {d1}]: {r:?}"
        );
    }
    // Large but representable shapes are caught by the bounds check instead.
    let mut t = one_tensor("w", &[32, 2], GgmlType::F32, vec![0; 256]);
    put_u64(&mut t.bytes, t.dims_at + 8, 1 << 20);
    assert!(matches!(
        parse(t.bytes),
        Err(GgufError::TensorOutOfBounds { size, .. }) if size == (32 * 4) << 20
    ));
}

#[test]
fn tensor_offset_past_the_end_is_rejected() {
    for off in [4096u64, 1 << 40, u64::MAX - 31] {
        let mut t = one_tensor("w", &[32], GgmlType::F32, vec![0; 128]);
        put_u64(&mut t.bytes, t.offset_at, off);
        match parse(t.bytes) {
            Err(GgufError::TensorOutOfBounds { tensor, .. }) => assert_eq!(tensor, "w"),
            other => panic!("offset {off}: {other:?}"),
        }
    }
}

#[test]
fn misaligned_tensor_offset_is_rejected() {
    let mut t = one_tensor("w", &[32], GgmlType::F32, vec![0; 128]);
    put_u64(&mut t.bytes, t.offset_at, 4);
    match parse(t.bytes) {
        Err(e @ GgufError::Misaligned { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("`w`") && msg.contains('4'), "{msg}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn unknown_tensor_type_names_the_tensor() {
    for id in [4u32, 5, 16, 29, 1000, u32::MAX] {
        let mut t = one_tensor("blk.3.ffn_up.weight", &[32], GgmlType::F32, vec![0; 128]);
        put_u32(&mut t.bytes, t.type_at, id);
        match parse(t.bytes) {
            Err(e @ GgufError::UnsupportedTensorType { .. }) => {
                assert!(e.to_string().contains("blk.3.ffn_up.weight"), "{e}");
                assert!(
                    matches!(e, GgufError::UnsupportedTensorType { type_id, .. } if type_id == id)
                );
            }
            other => panic!("type {id}: {other:?}"),
        }
    }
}

#[test]
fn rows_must_be_whole_blocks() {
    // 64 elements in total, but rows of 16 cannot hold whole 32-element blocks.
    let t = one_tensor("q", &[16, 4], GgmlType::Q4_1, vec![0; 40]);
    match parse(t.bytes) {
        Err(GgufError::BadShape { tensor, reason }) => {
            assert_eq!(tensor, "q");
            assert!(reason.contains("row length 16"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    let t = one_tensor("k", &[300], GgmlType::Q4_K, vec![0; 1024]);
    assert!(matches!(parse(t.bytes), Err(GgufError::BadShape { .. })));
}

#[test]
fn tensor_data_shorter_than_its_shape_is_rejected() {
    // 64 Q8_0 elements need 68 bytes; 34 are given and padded to 64.
    let t = one_tensor("short", &[64], GgmlType::Q8_0, vec![0; 34]);
    match parse(t.bytes) {
        Err(GgufError::TensorOutOfBounds { tensor, size, .. }) => {
            assert_eq!(tensor, "short");
            assert_eq!(size, 68);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn duplicates_are_rejected() {
    let mut w = sample_writer();
    w.add_tensor("odd.f16", &[3], GgmlType::F16.id(), vec![0; 6]);
    assert!(matches!(parse(w.to_bytes()), Err(GgufError::DuplicateTensor(n)) if n == "odd.f16"));

    let mut w = sample_writer();
    w.add_metadata("u8", MetadataValue::U8(1));
    assert!(matches!(parse(w.to_bytes()), Err(GgufError::DuplicateKey(k)) if k == "u8"));
}

#[test]
fn unknown_value_types_name_the_key() {
    let (mut bytes, type_at) = one_kv("general.name", MetadataValue::U32(1));
    put_u32(&mut bytes, type_at, 13);
    assert!(matches!(
        parse(bytes),
        Err(GgufError::UnknownValueType { key, type_id: 13 }) if key == "general.name"
    ));

    let (mut bytes, type_at) = one_kv("arr", MetadataValue::Array(MetadataArray::U8(vec![1])));
    put_u32(&mut bytes, type_at + 4, 99);
    assert!(matches!(
        parse(bytes),
        Err(GgufError::UnknownValueType { key, type_id: 99 }) if key == "arr"
    ));
}

#[test]
fn invalid_utf8_is_rejected() {
    let (mut bytes, type_at) = one_kv("k", MetadataValue::String("abc".into()));
    bytes[type_at + 4 + 8] = 0xff;
    assert!(matches!(parse(bytes), Err(GgufError::InvalidUtf8 { what }) if what.contains("`k`")));

    let mut bytes = one_kv("key", MetadataValue::U8(0)).0;
    bytes[HEADER_LEN + 8] = 0xc3;
    assert!(matches!(parse(bytes), Err(GgufError::InvalidUtf8 { .. })));
}

#[test]
fn array_nesting_is_bounded() {
    let nest = |depth: usize| {
        let mut a = MetadataArray::U8(vec![7]);
        for _ in 1..depth {
            a = MetadataArray::Array(vec![a]);
        }
        a
    };
    let (bytes, _) = one_kv("deep", MetadataValue::Array(nest(MAX_ARRAY_NESTING)));
    assert!(parse(bytes).is_ok());
    let (bytes, _) = one_kv("deep", MetadataValue::Array(nest(MAX_ARRAY_NESTING + 1)));
    assert!(matches!(
        parse(bytes),
        Err(GgufError::ArrayNestingTooDeep { key }) if key == "deep"
    ));

    // A file made of nothing but array headers nested far deeper.
    let mut bytes = one_kv("deep", MetadataValue::Array(MetadataArray::U8(vec![]))).0;
    let start = HEADER_LEN + 8 + 4 + 4;
    bytes.truncate(start);
    for _ in 0..100_000 {
        bytes.extend_from_slice(&9u32.to_le_bytes());
        bytes.extend_from_slice(&1u64.to_le_bytes());
    }
    assert!(matches!(
        quickly("deep nesting", || parse(bytes)),
        Err(GgufError::ArrayNestingTooDeep { .. })
    ));
}

#[test]
fn errors_display_what_and_where() {
    let t = one_tensor("blk.7.attn_k.weight", &[32], GgmlType::F32, vec![0; 128]);
    let cut = t.bytes[..t.type_at + 2].to_vec();
    let msg = parse(cut).unwrap_err().to_string();
    assert!(msg.contains("blk.7.attn_k.weight"), "{msg}");
    assert!(msg.contains(&t.type_at.to_string()), "{msg}");

    let err = GgufError::CountTooLarge {
        what: "the tensor count".into(),
        count: 9,
        limit: 3,
    };
    assert!(err.to_string().contains("tensor count is 9"));
}

#[test]
fn open_reports_io_errors_and_reads_written_files() {
    assert!(matches!(
        GgufFile::open("/nonexistent/dir/model.gguf"),
        Err(GgufError::Io(_))
    ));

    let dir = common::scratch_dir("gguf-open");
    let path = dir.join("sample.gguf");
    sample_writer().write(&path).unwrap();
    let mapped = GgufFile::open(&path).unwrap();
    let in_memory = parse(sample_bytes()).unwrap();
    assert_eq!(mapped.file_len(), in_memory.file_len());
    assert_eq!(mapped.tensors(), in_memory.tensors());
    for t in mapped.tensors() {
        assert_eq!(mapped.tensor_bytes(t), in_memory.tensor_bytes(t));
    }

    let empty = dir.join("empty.gguf");
    std::fs::write(&empty, []).unwrap();
    assert!(matches!(
        GgufFile::open(&empty),
        Err(GgufError::Truncated { .. })
    ));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn random_mutations_never_panic() {
    let original = sample_bytes();
    let header_len = parse(original.clone()).unwrap().data_offset() as usize;
    let mut rng = SplitMix64::new(0x9e37_79b9_7f4a_7c15);
    let mut rejected = 0;
    let start = Instant::now();
    for _ in 0..4000 {
        let mut bytes = original.clone();
        for _ in 0..=rng.below(4) {
            // Mostly hit the header, where the structure lives.
            let at = if rng.below(8) == 0 {
                rng.below(bytes.len())
            } else {
                rng.below(header_len.min(bytes.len()))
            };
            match rng.below(4) {
                0 => bytes[at] ^= 1 << rng.below(8),
                1 => bytes[at] = rng.byte(),
                2 => {
                    let extreme = [0u8, 0xff][rng.below(2)];
                    let end = (at + 8).min(bytes.len());
                    bytes[at..end].fill(extreme);
                }
                _ => {
                    let len = rng.below(bytes.len());
                    bytes.truncate(len);
                }
            }
            if bytes.is_empty() {
                break;
            }
        }
        if parse(bytes).is_err() {
            rejected += 1;
        }
    }
    // The mutations must actually exercise the error paths.
    assert!(rejected > 2000, "only {rejected} of 4000 mutants rejected");
    assert!(start.elapsed() < Duration::from_secs(60));
}

#[test]
fn real_model_file_opens_with_expected_layout() {
    let Some(path) = common::real_model() else {
        return;
    };
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.version(), 3);
    assert_eq!(f.tensors().len(), 272);
    assert_eq!(f.metadata_len(), 33);
    assert_eq!(f.get_u32("llama.block_count").unwrap(), 30);
    assert_eq!(f.get_u32("llama.embedding_length").unwrap(), 576);
    assert_eq!(f.get_str("general.architecture").unwrap(), "llama");
    assert_eq!(f.get_f32("llama.rope.freq_base").unwrap(), 100_000.0);
    assert_eq!(
        f.get_str_array("tokenizer.ggml.tokens").unwrap().len(),
        49152
    );
    assert_eq!(
        f.get_str_array("tokenizer.ggml.merges").unwrap().len(),
        48900
    );

    let embd = f.tensor("token_embd.weight").unwrap();
    assert_eq!(embd.ggml_type, GgmlType::Q8_0);
    assert_eq!(embd.dims, [576, 49152]);
    assert_eq!(embd.size_bytes, 49152 * 18 * 34);
    assert!(f.tensor("output.weight").is_none(), "LM head is tied");

    let mut last_end = f.data_offset();
    for t in f.tensors() {
        let expected = if t.name == "token_embd.weight" {
            GgmlType::Q8_0
        } else if t.name.ends_with("norm.weight") {
            GgmlType::F32
        } else {
            GgmlType::Q4_1
        };
        assert_eq!(t.ggml_type, expected, "{}", t.name);
        assert_eq!(f.tensor_bytes(t).len(), t.size_bytes, "{}", t.name);
        assert!(t.offset >= last_end, "{} overlaps its predecessor", t.name);
        last_end = t.offset + t.size_bytes as u64;
    }
    assert!(last_end <= f.file_len() as u64);
}
