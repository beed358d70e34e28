//! Activation dumps: files written by hand or by numpy read back, every
//! malformed file is refused with the tensor at fault named, and a tracer
//! fills a dump from its hooks.
#![cfg(feature = "dump")]

use model_tracer::activation::MAX_LAYERS;
use model_tracer::dump::{DumpFilter, DumpRecorder, TensorProblem, MAX_HEADER_BYTES, MAX_WIDTH};
use model_tracer::{
    ActivationDump, Disabled, DumpError, Lightweight, ModelTracer, ModelTracerConfig, Stage,
};
use model_tracer_test_support::{largest_allocation, CountingAllocator};

/// Remembers the largest allocation each thread asks for: a reader that
/// trusted the sizes in a header would ask for them.
#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// The largest allocation a refused file may cause.
const SMALL: usize = 1 << 20;

/// What `tests/fixtures/numpy_dump.py` writes: tokens as I32, no
/// positions, an embedding with a NaN, `layers.0.post_attn` = its negation,
/// logits all +inf.
const NUMPY_DUMP: &[u8] = b"\
    p\x01\x00\x00\x00\x00\x00\x00{\"__metadata__\": {\"format\": \"model-tracer-dump\", \
    \"version\": \"1\"}, \"tokens\": {\"dtype\": \"I32\", \"shape\": [3], \"data_offsets\
    \": [0, 12]}, \"embedding\": {\"dtype\": \"F32\", \"shape\": [3, 4], \"data_offsets\"\
    : [12, 60]}, \"layers.0.post_attn\": {\"dtype\": \"F32\", \"shape\": [3, 4], \"data_\
    offsets\": [60, 108]}, \"logits\": {\"dtype\": \"F32\", \"shape\": [3, 5], \"data_of\
    fsets\": [108, 168]}}     \xf8\x01\x00\x00\xf7\x0d\x00\x00\x1a\x01\x00\x00\x00\x00\x00\
    \x00\x00\x00\x80>\x00\x00\x00?\x00\x00@?\x00\x00\x80?\x00\x00\xa0?\x00\x00\xc0\x7f\x00\
    \x00\xe0?\x00\x00\x00@\x00\x00\x10@\x00\x00 @\x00\x000@\x00\x00\x00\x80\x00\x00\x80\xbe\
    \x00\x00\x00\xbf\x00\x00@\xbf\x00\x00\x80\xbf\x00\x00\xa0\xbf\x00\x00\xc0\xff\x00\x00\
    \xe0\xbf\x00\x00\x00\xc0\x00\x00\x10\xc0\x00\x00 \xc0\x00\x000\xc0\x00\x00\x80\x7f\x00\
    \x00\x80\x7f\x00\x00\x80\x7f\x00\x00\x80\x7f\x00\x00\x80\x7f\x00\x00\x80\x7f\x00\x00\
    \x80\x7f\x00\x00\x80\x7f\x00\x00\x80\x7f\x00\x00\x80\x7f\x00\x00\x80\x7f\x00\x00\x80\
    \x7f\x00\x00\x80\x7f\x00\x00\x80\x7f\x00\x00\x80\x7f";

/// A safetensors file: each entry's bytes at the next offset, the header
/// padded with spaces.
fn file(metadata: Option<&str>, entries: &[(&str, &str, &[usize], Vec<u8>)]) -> Vec<u8> {
    let mut header = String::from("{");
    if let Some(m) = metadata {
        header.push_str(&format!("\"__metadata__\":{m},"));
    }
    let mut offset = 0;
    let mut data = Vec::new();
    for (name, dtype, shape, bytes) in entries {
        header.push_str(&format!(
            "\"{name}\":{{\"dtype\":\"{dtype}\",\"shape\":{shape:?},\"data_offsets\":[{offset},{}]}},",
            offset + bytes.len()
        ));
        offset += bytes.len();
        data.extend_from_slice(bytes);
    }
    header.pop();
    header.push('}');
    raw(&header, &data)
}

/// The bytes of a file with this header text and data.
fn raw(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

fn f32s(n: usize) -> Vec<u8> {
    (0..n).flat_map(|i| (i as f32).to_le_bytes()).collect()
}

fn i64s(v: &[i64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Three positions, hidden size 4.
fn tokens() -> (&'static str, &'static str, &'static [usize], Vec<u8>) {
    ("tokens", "I64", &[3], i64s(&[1, 2, 3]))
}

fn refused(bytes: &[u8]) -> DumpError {
    match ActivationDump::from_bytes(bytes) {
        Ok(d) => panic!("a malformed file was read: {d:?}"),
        Err(e) => e,
    }
}

/// The error names `tensor` and says what is wrong with it.
fn names(e: &DumpError, tensor: &str, words: &str) {
    assert_eq!(e.tensor(), Some(tensor), "{e}");
    let text = e.to_string();
    assert!(
        text.contains(&format!("`{tensor}`")) && text.contains(words),
        "{text}"
    );
}

#[test]
fn a_file_written_by_numpy_reads_back() {
    let d = ActivationDump::from_bytes(NUMPY_DUMP).unwrap();
    assert_eq!(d.tokens(), &[504, 3575, 282]);
    assert_eq!(d.positions(), &[0, 1, 2], "no positions tensor: 0..T");
    assert_eq!((d.len(), d.dim(), d.vocab()), (3, Some(4), Some(5)));
    assert_eq!(d.metadata()["format"], "model-tracer-dump");
    let emb = d.activation(None, Stage::Embedding).unwrap();
    assert_eq!(emb.row(0), Some(&[0.0, 0.25, 0.5, 0.75][..]));
    assert_eq!(emb.row(2), Some(&[2.0, 2.25, 2.5, 2.75][..]));
    let row1 = emb.row(1).unwrap();
    assert!(row1[2].is_nan() && row1[3] == 1.75);
    let attn = d.activation(Some(0), Stage::PostAttn).unwrap();
    assert_eq!(attn.row(2), Some(&[-2.0, -2.25, -2.5, -2.75][..]));
    assert!(attn.row(1).unwrap()[2].is_nan());
    // Any layer stands for the embedding, none for a layer's stage.
    assert!(d.activation(Some(7), Stage::Embedding).is_some());
    assert!(d.activation(None, Stage::PostAttn).is_none());
    assert!(d.activation(Some(1), Stage::PostAttn).is_none());
    let logits = d.logits().unwrap();
    assert_eq!(logits.rows(), 3);
    assert!(logits.data().iter().all(|&v| v == f32::INFINITY));
    // Written again by this crate and read back: the same values, bit for bit.
    let again = ActivationDump::from_bytes(&d.to_bytes()).unwrap();
    for (a, b) in d.tensors().zip(again.tensors()) {
        assert_eq!(a.name(), b.name());
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(a.data()), bits(b.data()));
    }
    assert_eq!(again.tokens(), d.tokens());
}

#[test]
fn the_numpy_script_writes_the_fixture_bytes() {
    let Some(python) = model_tracer_test_support::python_with("numpy") else {
        model_tracer_test_support::require(false, "python3 with numpy");
        return;
    };
    let dir = model_tracer_test_support::scratch_dir(env!("CARGO_TARGET_TMPDIR"), "numpy-dump");
    let out = dir.join("numpy.safetensors");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/numpy_dump.py");
    let status = std::process::Command::new(python)
        .arg(script)
        .arg(&out)
        .status()
        .expect("python3 runs");
    assert!(status.success());
    let written = std::fs::read(&out).expect("the script wrote its file");
    assert!(
        written == NUMPY_DUMP,
        "the script no longer writes the fixture"
    );
}

/// What `safetensors.numpy.save_file` writes (its own order of tensors,
/// positions before tokens) reads back.
#[test]
fn a_file_written_by_the_safetensors_package_reads_back() {
    let Some(python) = model_tracer_test_support::python_with("safetensors.numpy") else {
        model_tracer_test_support::require(false, "python3 with safetensors and numpy");
        return;
    };
    let dir = model_tracer_test_support::scratch_dir(env!("CARGO_TARGET_TMPDIR"), "st-dump");
    let out = dir.join("st.safetensors");
    let script = r#"
import sys
import numpy as np
from safetensors.numpy import save_file
x = np.arange(6, dtype=np.float32).reshape(2, 3)
save_file({"tokens": np.array([9, 8]), "positions": np.array([3, 4]),
           "layers.2.post_ffn": x, "embedding": -x, "logits": np.ones((2, 7), np.float32)},
          sys.argv[1], metadata={"format": "model-tracer-dump", "version": "1"})
"#;
    let status = std::process::Command::new(python)
        .args(["-c", script])
        .arg(&out)
        .status()
        .expect("python3 runs");
    assert!(status.success());
    let d = ActivationDump::read(&out).unwrap();
    assert_eq!((d.tokens(), d.positions()), (&[9, 8][..], &[3, 4][..]));
    assert_eq!((d.dim(), d.vocab()), (Some(3), Some(7)));
    let ffn = d.activation(Some(2), Stage::PostFfn).unwrap();
    assert_eq!(ffn.row(1), Some(&[3.0, 4.0, 5.0][..]));
    assert_eq!(
        d.activation(None, Stage::Embedding).unwrap().data()[5],
        -5.0
    );
}

#[test]
fn tokens_and_positions_of_any_integer_type_read_back() {
    let values: [i64; 3] = [0, 7, 100];
    for (dtype, size) in [
        ("I8", 1),
        ("U8", 1),
        ("I16", 2),
        ("U16", 2),
        ("I32", 4),
        ("U32", 4),
        ("I64", 8),
        ("U64", 8),
    ] {
        let bytes: Vec<u8> = values
            .iter()
            .flat_map(|v| v.to_le_bytes()[..size].to_vec())
            .collect();
        let f = file(
            None,
            &[
                ("tokens", dtype, &[3], bytes.clone()),
                ("positions", dtype, &[3], bytes),
                ("final_norm", "F32", &[3, 2], f32s(6)),
            ],
        );
        let d = ActivationDump::from_bytes(&f).unwrap_or_else(|e| panic!("{dtype}: {e}"));
        assert_eq!(d.tokens(), &values, "{dtype}");
        assert_eq!(d.positions(), &[0, 7, 100], "{dtype}");
    }
    // Negative token ids (-1: not told) are kept; negative positions are not.
    let f = file(None, &[("tokens", "I8", &[1], vec![0xff])]);
    assert_eq!(ActivationDump::from_bytes(&f).unwrap().tokens(), &[-1]);
    let f = file(
        None,
        &[
            ("tokens", "I8", &[1], vec![0]),
            ("positions", "I8", &[1], vec![0xff]),
        ],
    );
    names(&refused(&f), "positions", "negative");
    let f = file(
        None,
        &[("tokens", "U64", &[1], u64::MAX.to_le_bytes().to_vec())],
    );
    names(&refused(&f), "tokens", "i64");
}

#[test]
fn an_empty_dump_and_a_dump_of_tokens_alone_read_back() {
    let d = ActivationDump::from_bytes(&file(None, &[("tokens", "I64", &[0], vec![])])).unwrap();
    assert!(d.is_empty() && d.dim().is_none() && d.tensors().count() == 0);
    let d = ActivationDump::new(vec![5, 6]);
    let again = ActivationDump::from_bytes(&d.to_bytes()).unwrap();
    assert_eq!(
        (again.tokens(), again.positions()),
        (&[5, 6][..], &[0, 1][..])
    );
    assert!(again.logits().is_none());
}

#[test]
fn tensors_breaking_the_format_are_named() {
    let t = tokens();
    let hidden = |name: &'static str, width: usize| (name, "F32", vec![3, width], f32s(3 * width));
    let case = |entries: Vec<(&'static str, &'static str, Vec<usize>, Vec<u8>)>| {
        let entries: Vec<(&str, &str, &[usize], Vec<u8>)> = entries
            .iter()
            .map(|(n, d, s, b)| (*n, *d, s.as_slice(), b.clone()))
            .collect();
        refused(&file(None, &entries))
    };
    let tok = (t.0, t.1, t.2.to_vec(), t.3.clone());

    let e = case(vec![hidden("embedding", 4)]);
    assert!(matches!(e, DumpError::MissingTokens), "{e}");
    names(&e, "tokens", "missing");

    let e = case(vec![("tokens", "F32", vec![3], f32s(3))]);
    names(&e, "tokens", "F32");
    let e = case(vec![("tokens", "I64", vec![3, 1], i64s(&[1, 2, 3]))]);
    names(&e, "tokens", "[T]");

    let e = case(vec![
        tok.clone(),
        ("layers.0.input", "I32", vec![3, 4], f32s(12)),
    ]);
    names(&e, "layers.0.input", "I32");
    assert!(matches!(
        e,
        DumpError::Tensor {
            problem: TensorProblem::Dtype { .. },
            ..
        }
    ));
    let e = case(vec![
        tok.clone(),
        ("layers.0.input", "F16", vec![3, 4], vec![0; 24]),
    ]);
    names(&e, "layers.0.input", "F16");

    let e = case(vec![tok.clone(), ("final_norm", "F32", vec![12], f32s(12))]);
    names(&e, "final_norm", "[T, width]");
    let e = case(vec![
        tok.clone(),
        ("final_norm", "F32", vec![3, 2, 2], f32s(12)),
    ]);
    names(&e, "final_norm", "[T, width]");

    let e = case(vec![
        tok.clone(),
        ("layers.2.output", "F32", vec![4, 3], f32s(12)),
    ]);
    names(&e, "layers.2.output", "4 rows");
    assert!(matches!(
        e,
        DumpError::Tensor {
            problem: TensorProblem::Rows {
                found: 4,
                expected: 3
            },
            ..
        }
    ));

    // The first tensor of a kind in forward order sets the width.
    let e = case(vec![
        tok.clone(),
        hidden("layers.10.input", 5),
        hidden("layers.2.input", 4),
        hidden("embedding", 4),
    ]);
    names(&e, "layers.10.input", "`embedding` has 4");
    // The logits are a kind of their own.
    let ok = case(vec![
        tok.clone(),
        hidden("embedding", 4),
        hidden("logits", 9),
        hidden("oops", 4),
    ]);
    names(&ok, "oops", "not a name of the format");

    let e = case(vec![tok.clone(), hidden("layers.1.logits", 4)]);
    names(&e, "layers.1.logits", "not a name");
    let e = case(vec![tok.clone(), hidden("layers.01.input", 4)]);
    names(&e, "layers.01.input", "not a name");

    let e = case(vec![
        tok.clone(),
        ("positions", "I64", vec![2], i64s(&[0, 1])),
    ]);
    names(&e, "positions", "2 rows");
}

#[test]
fn a_header_that_does_not_describe_its_bytes_names_the_tensor() {
    let tok = i64s(&[1, 2, 3]);
    let mut data = tok.clone();
    data.extend(f32s(12));
    // Offsets that hold fewer bytes than the shape needs.
    let header = r#"{"tokens":{"dtype":"I64","shape":[3],"data_offsets":[0,24]},"embedding":{"dtype":"F32","shape":[3,4],"data_offsets":[24,64]}}"#;
    let e = refused(&raw(header, &data[..64]));
    names(&e, "embedding", "needs 48");
    // A file cut short.
    let header = r#"{"tokens":{"dtype":"I64","shape":[3],"data_offsets":[0,24]},"embedding":{"dtype":"F32","shape":[3,4],"data_offsets":[24,72]}}"#;
    let e = refused(&raw(header, &data[..70]));
    names(&e, "embedding", "ends at byte 72");
    // A gap between two tensors.
    let header = r#"{"tokens":{"dtype":"I64","shape":[3],"data_offsets":[0,24]},"embedding":{"dtype":"F32","shape":[3,4],"data_offsets":[28,76]}}"#;
    let mut gapped = tok.clone();
    gapped.extend([0; 4]);
    gapped.extend(f32s(12));
    let e = refused(&raw(header, &gapped));
    names(&e, "embedding", "starts at byte 28");
    // An element type safetensors does not know.
    let header = r#"{"tokens":{"dtype":"I64","shape":[3],"data_offsets":[0,24]},"embedding":{"dtype":"F42","shape":[3,4],"data_offsets":[24,72]}}"#;
    let e = refused(&raw(header, &data));
    names(&e, "embedding", "dtype");
    // Bytes after the last tensor.
    let header = r#"{"tokens":{"dtype":"I64","shape":[3],"data_offsets":[0,24]}}"#;
    let e = refused(&raw(header, &data[..30]));
    assert!(matches!(e, DumpError::NotSafetensors(_)), "{e}");
    assert!(e.to_string().contains("24 bytes"), "{e}");
}

/// Reads `bytes`, which must be refused, and returns the error with the
/// largest allocation made on the way.
fn refused_small(bytes: &[u8]) -> DumpError {
    let (e, largest) = largest_allocation(|| refused(bytes));
    assert!(largest < SMALL, "an allocation of {largest} bytes: {e}");
    e
}

#[test]
fn huge_sizes_in_a_header_allocate_nothing_of_their_size() {
    // The allocator sees what is asked of it on this thread.
    let (v, big) = largest_allocation(|| std::hint::black_box(vec![1u8; SMALL]));
    assert!(big >= SMALL && v.len() == SMALL, "{big}");
    // A header length beyond the limit, and one within it but beyond the file.
    for n in [u64::MAX, MAX_HEADER_BYTES + 1, 1 << 40] {
        let mut f = n.to_le_bytes().to_vec();
        f.extend_from_slice(b"{}");
        let e = refused_small(&f);
        assert!(
            matches!(e, DumpError::HeaderTooLarge { bytes } if bytes == n),
            "{e}"
        );
        assert!(e.to_string().contains("header length"), "{e}");
    }
    let mut f = (MAX_HEADER_BYTES - 1).to_le_bytes().to_vec();
    f.extend_from_slice(b"{}");
    let e = refused_small(&f);
    assert!(matches!(e, DumpError::NotSafetensors(_)), "{e}");
    assert!(e.to_string().contains("a header of 99999999 bytes"), "{e}");
    // Shapes whose sizes are absurd, or overflow.
    let data = i64s(&[1]);
    for shape in ["[1048576,1048576]", "[18446744073709551615,2]"] {
        let header = format!(
            r#"{{"tokens":{{"dtype":"I64","shape":[1],"data_offsets":[0,8]}},"embedding":{{"dtype":"F32","shape":{shape},"data_offsets":[8,8]}}}}"#
        );
        let e = refused_small(&raw(&header, &data));
        names(&e, "embedding", "");
    }
}

/// A file of about 1 KB claiming a 2^40-byte header, or a tensor of 2^60
/// elements, is refused with the field named, and nothing near those sizes
/// is asked of the allocator.
#[test]
fn a_small_file_claiming_2e40_header_bytes_or_2e60_elements_names_the_field() {
    let mut f = (1u64 << 40).to_le_bytes().to_vec();
    let header = r#"{"tokens":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}}"#;
    f.extend_from_slice(header.as_bytes());
    f.resize(1024, b' ');
    let e = refused_small(&f);
    assert!(
        matches!(e, DumpError::HeaderTooLarge { bytes } if bytes == 1 << 40),
        "{e}"
    );
    assert!(e.to_string().contains("header length"), "{e}");

    let e60 = 1usize << 60;
    let padded = |header: String, data: &[u8]| {
        let f = raw(&format!("{header:<1000}"), data);
        assert!(f.len() < 1100);
        f
    };
    // Bytes, whose size fits in a usize but not in the file.
    let e = refused_small(&padded(
        format!(r#"{{"tokens":{{"dtype":"U8","shape":[{e60}],"data_offsets":[0,8]}}}}"#),
        &[0; 8],
    ));
    names(&e, "tokens", &format!("needs {e60}"));
    // Bytes whose offsets say so, beyond the file.
    let e = refused_small(&padded(
        format!(r#"{{"tokens":{{"dtype":"U8","shape":[{e60}],"data_offsets":[0,{e60}]}}}}"#),
        &[0; 8],
    ));
    names(&e, "tokens", &format!("ends at byte {e60}"));
    // 2^60 values of 4 bytes: the size overflows.
    for (name, shape) in [
        ("positions", format!("[{e60}]")),
        ("logits", format!("[1, {e60}]")),
    ] {
        let header = format!(
            r#"{{"tokens":{{"dtype":"I64","shape":[1],"data_offsets":[0,8]}},"{name}":{{"dtype":"I32","shape":{shape},"data_offsets":[8,8]}}}}"#
        );
        let e = refused_small(&padded(header, &[0; 8]));
        names(&e, name, &format!("{shape} overflows"));
    }
    // 2^60 rows, or a row of 2^60 values, in no bytes at all: a tensor with
    // a zero dimension is empty, and its other dimension is still checked
    // against the tokens before anything is kept.
    let header = format!(
        r#"{{"tokens":{{"dtype":"I64","shape":[0],"data_offsets":[0,0]}},"embedding":{{"dtype":"F32","shape":[{e60},0],"data_offsets":[0,0]}}}}"#
    );
    let e = refused_small(&padded(header, &[]));
    names(&e, "embedding", &format!("{e60} rows"));
    let header = format!(
        r#"{{"tokens":{{"dtype":"I64","shape":[0],"data_offsets":[0,0]}},"embedding":{{"dtype":"F32","shape":[0,{e60}],"data_offsets":[0,0]}}}}"#
    );
    let e = refused_small(&padded(header, &[]));
    names(&e, "embedding", &format!("rows of {e60} values"));
    assert!(matches!(
        e,
        DumpError::Tensor {
            problem: TensorProblem::TooWide { found },
            ..
        } if found == e60
    ));
}

/// The widest rows and the last layer a dump may have are read; one more
/// value, or the next layer, is refused, by the reader and by `insert`.
#[test]
fn widths_and_layers_beyond_the_limits_are_refused() {
    // The tracer's own limit on a vector it keeps.
    assert_eq!(MAX_WIDTH, model_tracer::storage::MAX_BUFFER_LEN);
    let empty = |name: &str, width: usize| {
        file(
            None,
            &[
                ("tokens", "I64", &[0], vec![]),
                (name, "F32", &[0, width], vec![]),
            ],
        )
    };
    let d = ActivationDump::from_bytes(&empty("logits", MAX_WIDTH)).unwrap();
    assert_eq!(d.vocab(), Some(MAX_WIDTH));
    let e = refused_small(&empty("logits", MAX_WIDTH + 1));
    names(&e, "logits", &format!("more than the {MAX_WIDTH}"));
    let last = format!("layers.{}.post_ffn", MAX_LAYERS - 1);
    let d = ActivationDump::from_bytes(&empty(&last, 4)).unwrap();
    assert_eq!(d.layers(), vec![MAX_LAYERS - 1]);
    let beyond = format!("layers.{MAX_LAYERS}.post_ffn");
    let e = refused_small(&empty(&beyond, 4));
    names(&e, &beyond, &format!("layer {MAX_LAYERS}"));
    let huge = format!("layers.{}.input", usize::MAX);
    names(&refused_small(&empty(&huge, 4)), &huge, "layer");

    let mut d = ActivationDump::new(vec![]);
    let e = d
        .insert(Some(MAX_LAYERS), Stage::Output, 2, vec![])
        .unwrap_err();
    names(&e, &format!("layers.{MAX_LAYERS}.output"), "layer");
    let e = d
        .insert(None, Stage::Embedding, MAX_WIDTH + 1, vec![])
        .unwrap_err();
    names(&e, "embedding", "values");
    d.insert(Some(MAX_LAYERS - 1), Stage::Output, 2, vec![])
        .unwrap();

    // A recorder ignores what a dump could not hold, as a tracer does.
    let mut r = DumpRecorder::new(DumpFilter::default());
    r.begin_forward(0);
    r.activation(MAX_LAYERS, Stage::Input, &[1.0]);
    r.activation(usize::MAX, Stage::Output, &[1.0]);
    r.activation(MAX_LAYERS - 1, Stage::Input, &[2.0]);
    // The layer of a stage outside the layers does not count.
    r.activation(usize::MAX, Stage::Embedding, &[3.0]);
    r.end_forward();
    let d = r.finish();
    assert_eq!(d.layers(), vec![MAX_LAYERS - 1]);
    let names: Vec<String> = d.tensors().map(|t| t.name()).collect();
    assert_eq!(names, ["embedding", "layers.4095.input"]);
    assert!(ActivationDump::from_bytes(&d.to_bytes()).is_ok());
}

/// A file without `format` and `version` is read as of this format and
/// version, so that writing it again and reading it back gives the same
/// dump, metadata included.
#[test]
fn a_file_without_format_and_version_reads_as_this_format() {
    let t = tokens();
    let f = file(Some(r#"{"model":"x"}"#), &[(t.0, t.1, t.2, t.3.clone())]);
    let d = ActivationDump::from_bytes(&f).unwrap();
    let keys: Vec<&str> = d.metadata().keys().map(String::as_str).collect();
    assert_eq!(keys, ["format", "model", "version"]);
    assert_eq!(d.metadata()["version"], "1");
    let again = ActivationDump::from_bytes(&d.to_bytes()).unwrap();
    assert_eq!(again.metadata(), d.metadata());
    let bare = ActivationDump::from_bytes(&file(None, &[(t.0, t.1, t.2, t.3.clone())])).unwrap();
    assert_eq!(bare.metadata()["format"], "model-tracer-dump");
}

#[test]
fn bytes_that_are_not_safetensors_are_refused() {
    for bytes in [
        &b""[..],
        b"short",
        b"\x04\0\0\0\0\0\0\0[1]]",
        b"\x02\0\0\0\0\0\0\0{x",
    ] {
        let e = refused(bytes);
        assert!(matches!(e, DumpError::NotSafetensors(_)), "{e}");
        assert!(e.tensor().is_none());
    }
    let e = refused(&raw("{\"__metadata__\":{\"format\":7}}", &[]));
    assert!(e.to_string().contains("__metadata__"), "{e}");
}

#[test]
fn another_format_or_version_is_refused() {
    let t = tokens();
    for (meta, key) in [
        (r#"{"format":"other","version":"1"}"#, "format"),
        (r#"{"format":"model-tracer-dump","version":"2"}"#, "version"),
    ] {
        let e = refused(&file(Some(meta), &[(t.0, t.1, t.2, t.3.clone())]));
        assert!(
            matches!(&e, DumpError::Metadata { key: k, .. } if k == key),
            "{e}"
        );
    }
    let ok = file(Some(r#"{"model":"x"}"#), &[(t.0, t.1, t.2, t.3.clone())]);
    assert_eq!(
        ActivationDump::from_bytes(&ok).unwrap().metadata()["model"],
        "x"
    );
}

#[test]
fn read_and_write_name_the_file() {
    let dir = model_tracer_test_support::scratch_dir(env!("CARGO_TARGET_TMPDIR"), "dump-files");
    let missing = dir.join("missing.safetensors");
    let e = ActivationDump::read(&missing).unwrap_err();
    assert!(e.to_string().contains("missing.safetensors"), "{e}");
    let mut d = ActivationDump::new(vec![1]);
    d.insert(None, Stage::Embedding, 2, vec![f32::NAN, -0.0])
        .unwrap();
    let path = dir.join("d.safetensors");
    d.write(&path).unwrap();
    let back = ActivationDump::read(&path).unwrap();
    let emb = back.activation(None, Stage::Embedding).unwrap();
    assert!(emb.data()[0].is_nan() && emb.data()[1].to_bits() == (-0.0f32).to_bits());
    let e = d
        .write(dir.join("no-such-dir").join("d.safetensors"))
        .unwrap_err();
    assert!(e.to_string().contains("no-such-dir"), "{e}");
}

/// A forward of a two-layer model of hidden size 3 and vocabulary 4.
fn forward<C: model_tracer::TraceConfig>(t: &mut ModelTracer<C>, pos: usize) {
    t.begin_forward(pos);
    t.input_token(40 + pos as u32);
    let p = pos as f32;
    t.activation(0, Stage::Embedding, &[p, 0.0, 0.0]);
    for layer in 0..2 {
        for (i, stage) in Stage::LAYER_STAGES.into_iter().enumerate() {
            t.activation(layer, stage, &[p, layer as f32, i as f32]);
        }
    }
    t.activation(0, Stage::FinalNorm, &[p, -1.0, -1.0]);
    t.final_logits(&[p, 1.0, 2.0, 3.0]);
    t.end_forward();
}

#[test]
fn a_tracer_fills_the_dump_from_its_hooks() {
    let mut t = ModelTracer::new(Lightweight);
    forward(&mut t, 0);
    assert!(t
        .set_dump(Some(DumpRecorder::new(DumpFilter::default())))
        .is_none());
    for pos in 1..4 {
        forward(&mut t, pos);
    }
    // A forward in flight is not in the dump.
    t.begin_forward(4);
    t.activation(0, Stage::Embedding, &[9.0, 9.0, 9.0]);
    assert_eq!(t.dump().map(DumpRecorder::rows), Some(3));
    let d = t.take_dump().unwrap();
    assert!(t.dump().is_none() && t.take_dump().is_none());
    assert_eq!(d.tokens(), &[41, 42, 43]);
    assert_eq!(d.positions(), &[1, 2, 3]);
    assert_eq!(d.tensors().count(), 1 + 2 * 6 + 2);
    assert_eq!((d.dim(), d.vocab()), (Some(3), Some(4)));
    let post_ffn = d.activation(Some(1), Stage::PostFfn).unwrap();
    assert_eq!(post_ffn.row(2), Some(&[3.0, 1.0, 4.0][..]));
    assert_eq!(d.logits().unwrap().row(0), Some(&[1.0, 1.0, 2.0, 3.0][..]));
    // The statistics are recorded as without a dump.
    t.end_forward();
    let mut plain = ModelTracer::new(Lightweight);
    for pos in 0..4 {
        forward(&mut plain, pos);
    }
    assert_eq!(t.forwards().nth(2), plain.forwards().nth(2));
}

#[test]
fn the_tracer_applies_the_filter() {
    let mut t = ModelTracer::new(ModelTracerConfig::full());
    let filter = DumpFilter {
        layers: Some(vec![1]),
        stages: Some(vec![Stage::PostAttn, Stage::Logits]),
        positions: Some(5..7),
        sequence: None,
    };
    t.set_dump(Some(DumpRecorder::new(filter.clone())));
    for pos in 0..10 {
        forward(&mut t, pos);
    }
    // clear() keeps the dump installed, empty.
    let kept = t.dump().unwrap().rows();
    t.clear();
    assert_eq!(
        t.dump().map(|d| (d.rows(), d.filter().clone())),
        Some((0, filter))
    );
    forward(&mut t, 6);
    let d = t.take_dump().unwrap();
    assert_eq!(kept, 2);
    assert_eq!(d.positions(), &[6]);
    let names: Vec<String> = d.tensors().map(|v| v.name()).collect();
    assert_eq!(names, ["layers.1.post_attn", "logits"]);
}

#[test]
fn a_tracer_without_activations_takes_no_dump() {
    let mut off = ModelTracer::new(Disabled);
    let back = off.set_dump(Some(DumpRecorder::new(DumpFilter::default())));
    assert!(back.is_some(), "Disabled handed the dump back");
    forward(&mut off, 0);
    assert!(off.dump().is_none() && off.take_dump().is_none());
    let mut no_activations = ModelTracer::new(ModelTracerConfig {
        trace_activations: false,
        ..ModelTracerConfig::full()
    });
    assert!(no_activations
        .set_dump(Some(DumpRecorder::new(DumpFilter::default())))
        .is_some());
    // Replacing a dump hands the old one back.
    let mut t = ModelTracer::new(Lightweight);
    t.set_dump(Some(DumpRecorder::new(DumpFilter::default())));
    forward(&mut t, 0);
    let old = t.set_dump(Some(DumpRecorder::new(DumpFilter::default())));
    assert_eq!(old.map(|d| d.rows()), Some(1));
    assert_eq!(t.set_dump(None).map(|d| d.rows()), Some(0));
}
