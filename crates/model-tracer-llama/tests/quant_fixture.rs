//! ggml block codecs checked against values computed by the Python `gguf`
//! package (see tests/fixtures/README.md for the file and how it was made).

use model_tracer_llama::dtype::GgmlType;
use model_tracer_llama::quant::{dequantize, quantize, QMatrix, QuantizedActivations};

struct Entry {
    quantized_by_gguf: bool,
    name: String,
    ty: GgmlType,
    bytes: Vec<u8>,
    values: Vec<f32>,
}

/// A cursor over the fixture bytes; a truncated file fails the test with
/// the position where it ended.
struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> &'a [u8] {
        let end = self.pos + n;
        assert!(
            end <= self.data.len(),
            "fixture truncated at byte {}",
            self.pos
        );
        let out = &self.data[self.pos..end];
        self.pos = end;
        out
    }
    fn u8(&mut self) -> u8 {
        self.take(1)[0]
    }
    fn u32(&mut self) -> u32 {
        let b = self.take(4);
        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }
}

fn load_file(name: &str) -> Vec<Entry> {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    let data = std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"));
    let mut r = Reader {
        data: &data,
        pos: 0,
    };
    assert_eq!(r.take(4), b"MTQF");
    assert_eq!(r.u32(), 1, "fixture version");
    let count = r.u32();
    let mut entries = Vec::new();
    for _ in 0..count {
        let kind = r.u8();
        let name_len = usize::from(r.u8());
        let name = String::from_utf8(r.take(name_len).to_vec()).expect("fixture names are UTF-8");
        let id = r.u32();
        let ty = GgmlType::from_id(id).unwrap_or_else(|| panic!("{name}: unknown type id {id}"));
        let n = r.u32() as usize;
        let m = r.u32() as usize;
        let bytes = r.take(m).to_vec();
        let values = r
            .take(4 * n)
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        entries.push(Entry {
            quantized_by_gguf: kind == 1,
            name,
            ty,
            bytes,
            values,
        });
    }
    assert_eq!(r.pos, data.len(), "trailing bytes after the last entry");
    entries
}

fn load() -> Vec<Entry> {
    load_file("quant_fixture.bin")
}

/// Bit-for-bit equality, any NaN matching any NaN.
fn same_f32(a: f32, b: f32) -> bool {
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
}

#[test]
fn dequantization_matches_gguf_bit_for_bit() {
    let entries = load();
    let mut seen = Vec::new();
    for e in entries.iter().filter(|e| !e.quantized_by_gguf) {
        let mut out = vec![0f32; e.values.len()];
        dequantize(e.ty, &e.bytes, &mut out).unwrap_or_else(|err| panic!("{}: {err}", e.name));
        for (i, (got, want)) in out.iter().zip(&e.values).enumerate() {
            assert!(
                same_f32(*got, *want),
                "{} element {i}: {got:e} vs gguf {want:e}",
                e.name
            );
        }
        seen.push(e.ty);
    }
    for ty in [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q4_K,
        GgmlType::Q6_K,
    ] {
        assert!(seen.contains(&ty), "no dequantization fixture for {ty}");
    }
}

#[test]
fn quantization_matches_gguf_byte_for_byte() {
    let entries = load();
    let mut checked = 0;
    for e in entries.iter().filter(|e| e.quantized_by_gguf) {
        let mut out = Vec::new();
        // gguf rounds overflowing values to infinity; the block formats
        // refuse non-finite input, but F16 keeps it.
        quantize(e.ty, &e.values, &mut out).unwrap_or_else(|err| panic!("{}: {err}", e.name));
        if e.ty == GgmlType::BF16 || e.ty == GgmlType::F16 {
            for (i, (got, want)) in out.chunks_exact(2).zip(e.bytes.chunks_exact(2)).enumerate() {
                let (got, want) = (
                    u16::from_le_bytes([got[0], got[1]]),
                    u16::from_le_bytes([want[0], want[1]]),
                );
                assert_eq!(got, want, "{} element {i} ({:e})", e.name, e.values[i]);
            }
            assert_eq!(out.len(), e.bytes.len(), "{}", e.name);
        } else {
            for (b, (got, want)) in out
                .chunks_exact(e.ty.block_bytes())
                .zip(e.bytes.chunks_exact(e.ty.block_bytes()))
                .enumerate()
            {
                assert_eq!(got, want, "{} block {b}", e.name);
            }
            assert_eq!(out.len(), e.bytes.len(), "{}", e.name);
        }
        checked += 1;
    }
    assert!(checked >= 12, "only {checked} quantization fixtures");
}

fn entry<'a>(entries: &'a [Entry], name: &str) -> &'a Entry {
    entries
        .iter()
        .find(|e| e.name == name)
        .unwrap_or_else(|| panic!("fixture has no entry {name:?}"))
}

#[test]
fn real_rows_multiply_like_their_gguf_dequantization() {
    let entries = load();
    for name in [
        "blk.0.attn_q.weight rows 0..2",
        "token_embd.weight rows 0..2",
    ] {
        let e = entry(&entries, name);
        let cols = 576;
        let m = QMatrix::from_bytes(e.ty, 2, cols, e.bytes.clone())
            .unwrap_or_else(|err| panic!("{name}: {err}"));
        assert_eq!(m.to_f32(), e.values, "{name}");
        let x: Vec<f32> = (0..cols)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
            .collect();
        let mut acts = QuantizedActivations::new();
        acts.quantize_from(&x, e.ty)
            .unwrap_or_else(|err| panic!("{name}: {err}"));
        let (mut quantized, mut reference) = ([0f32; 2], [0f32; 2]);
        m.matvec(&acts, &mut quantized);
        m.matvec_f32(&x, &mut reference);
        for r in 0..2 {
            let row = &e.values[r * cols..(r + 1) * cols];
            let exact: f64 = row
                .iter()
                .zip(&x)
                .map(|(w, x)| f64::from(*w) * f64::from(*x))
                .sum();
            let scale: f64 = row
                .iter()
                .zip(&x)
                .map(|(w, x)| (f64::from(*w) * f64::from(*x)).abs())
                .sum();
            assert!(
                (f64::from(reference[r]) - exact).abs() <= 1e-5 * scale,
                "{name} row {r} f32 path"
            );
            // The quantized path only adds the activation rounding error.
            assert!(
                (f64::from(quantized[r]) - exact).abs() <= 0.02 * scale,
                "{name} row {r} quantized path"
            );
        }
    }
}

#[test]
fn k_quant_and_activation_quantizers_match_ggml_byte_for_byte() {
    let entries = load_file("kquant_fixture.bin");
    let mut seen = Vec::new();
    for e in &entries {
        assert!(e.quantized_by_gguf, "{}", e.name);
        let mut out = Vec::new();
        quantize(e.ty, &e.values, &mut out).unwrap_or_else(|err| panic!("{}: {err}", e.name));
        assert_eq!(out.len(), e.bytes.len(), "{}", e.name);
        for (b, (got, want)) in out
            .chunks_exact(e.ty.block_bytes())
            .zip(e.bytes.chunks_exact(e.ty.block_bytes()))
            .enumerate()
        {
            assert_eq!(got, want, "{} block {b}", e.name);
        }
        seen.push(e.ty);
    }
    for ty in [
        GgmlType::Q4_K,
        GgmlType::Q6_K,
        GgmlType::Q8_1,
        GgmlType::Q8_K,
    ] {
        assert!(seen.contains(&ty), "no ggml fixture for {ty}");
    }
    // The activation buffers hold exactly ggml's Q8_1 / Q8_K blocks.
    for (weights, format) in [
        (GgmlType::Q4_1, GgmlType::Q8_1),
        (GgmlType::Q6_K, GgmlType::Q8_K),
    ] {
        let e = entries
            .iter()
            .find(|e| e.ty == format)
            .expect("checked above");
        let mut acts = QuantizedActivations::new();
        acts.quantize_from(&e.values, weights)
            .unwrap_or_else(|err| panic!("{}: {err}", e.name));
        assert!(
            acts.to_ggml_bytes() == e.bytes,
            "{format} activations differ from ggml"
        );
    }
}
