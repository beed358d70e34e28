//! The seed corpora of the fuzz targets (`fuzz/seeds/`, see
//! `fuzz/README.md`): what each GGUF seed holds is checked here against
//! the readers, so that a seed which stopped reaching the code past the
//! parser is noticed; and the ignored test `write_gguf_seeds` is how they
//! are made (`bash fuzz/make-seeds` runs it).

use std::path::{Path, PathBuf};

use model_tracer::Full;
use model_tracer_llama::dtype::GgmlType;
use model_tracer_llama::gguf::{self, GgufError, GgufFile};
use model_tracer_llama::model::{
    synthetic_weights, Config, KvCacheOptions, KvType, Llama, Weights,
};
use model_tracer_llama::quant::QMatrix;
use model_tracer_llama::tokenizer::{self as tk, Tokenizer};
use model_tracer_test_support::gguf::{GgufWriter, MetadataArray, MetadataValue};

/// Largest total size of the committed seeds.
const SEEDS_BUDGET: u64 = 1 << 20;

/// Tokens of the real vocabulary kept in the reduced SmolLM2 header.
const KEPT_TOKENS: usize = 2048;

/// Text of the SmolLM2 tokenizer seed, from the cases of
/// `tests/fixtures/smollm2_tokens.txt`.
const TEXTS: [&str; 4] = [
    "The capital of France is",
    "In 2024, 12345 people\n\n  multiple   spaces\tI'm don't",
    "<|im_start|>user\nCafé déjà vu. 世界 🦀<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>punctuation!!! ... ??? ---<|im_end|>",
];

fn seeds_dir() -> PathBuf {
    model_tracer_test_support::workspace_root()
        .join("fuzz")
        .join("seeds")
}

/// The shape of the micro model seed: two layers, hidden 32, grouped-query
/// attention, every matrix one block wide.
fn micro_config() -> Config {
    Config {
        n_layers: 2,
        dim: 32,
        n_heads: 2,
        n_kv_heads: 1,
        head_dim: 16,
        ffn_dim: 64,
        vocab_size: 48,
        context_len: 64,
        rope_base: 10_000.0,
        rope_dim: 16,
        rms_eps: 1e-5,
    }
}

fn add_matrix(out: &mut GgufWriter, name: &str, m: &QMatrix) {
    let dims = [m.cols() as u64, m.rows() as u64];
    out.add_tensor(name, &dims, m.ty().id(), m.bytes().to_vec());
}

fn add_vector(out: &mut GgufWriter, name: &str, v: &[f32]) {
    let bytes = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    out.add_tensor(name, &[v.len() as u64], GgmlType::F32.id(), bytes);
}

/// A complete llama model file: `llama.*` hyperparameters and every tensor
/// the decoder loads.
fn micro_llama() -> Vec<u8> {
    let c = micro_config();
    let w = synthetic_weights(&c, GgmlType::Q4_1, 7).expect("synthetic weights");
    let mut out = GgufWriter::new();
    let u = |v: usize| MetadataValue::U32(v as u32);
    out.add_metadata(
        "general.architecture",
        MetadataValue::String("llama".into()),
    );
    out.add_metadata("llama.block_count", u(c.n_layers));
    out.add_metadata("llama.context_length", u(c.context_len));
    out.add_metadata("llama.embedding_length", u(c.dim));
    out.add_metadata("llama.feed_forward_length", u(c.ffn_dim));
    out.add_metadata("llama.attention.head_count", u(c.n_heads));
    out.add_metadata("llama.attention.head_count_kv", u(c.n_kv_heads));
    out.add_metadata("llama.rope.freq_base", MetadataValue::F32(c.rope_base));
    out.add_metadata(
        "llama.attention.layer_norm_rms_epsilon",
        MetadataValue::F32(c.rms_eps),
    );
    out.add_metadata("llama.vocab_size", u(c.vocab_size));
    out.add_metadata("llama.rope.dimension_count", u(c.rope_dim));
    add_matrix(&mut out, "token_embd.weight", &w.token_embd);
    for (i, l) in w.layers.iter().enumerate() {
        let n = |t: &str| format!("blk.{i}.{t}.weight");
        add_vector(&mut out, &n("attn_norm"), &l.attn_norm);
        add_matrix(&mut out, &n("attn_q"), &l.attn_q.weight);
        add_matrix(&mut out, &n("attn_k"), &l.attn_k.weight);
        add_matrix(&mut out, &n("attn_v"), &l.attn_v.weight);
        add_matrix(&mut out, &n("attn_output"), &l.attn_output.weight);
        add_vector(&mut out, &n("ffn_norm"), &l.ffn_norm);
        add_matrix(&mut out, &n("ffn_gate"), &l.ffn_gate.weight);
        add_matrix(&mut out, &n("ffn_up"), &l.ffn_up.weight);
        add_matrix(&mut out, &n("ffn_down"), &l.ffn_down.weight);
    }
    add_vector(&mut out, "output_norm.weight", &w.output_norm);
    // No `output.weight`: the LM head is tied to the embeddings.
    out.to_bytes()
}

/// The entries of a quantization fixture (`tests/fixtures/README.md`):
/// name, ggml type, element count and the blocks.
fn fixture_entries(name: &str) -> Vec<(String, u32, u64, Vec<u8>)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut pos = 0;
    let mut take = |n: usize| {
        let out = &data[pos..pos + n];
        pos += n;
        out
    };
    let u32_at = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    assert_eq!(take(4), b"MTQF");
    assert_eq!(u32_at(take(4)), 1);
    let count = u32_at(take(4));
    (0..count)
        .map(|_| {
            take(1);
            let name_len = usize::from(take(1)[0]);
            let name = String::from_utf8(take(name_len).to_vec()).expect("UTF-8 name");
            let ty = u32_at(take(4));
            let n = u32_at(take(4));
            let m = u32_at(take(4)) as usize;
            let bytes = take(m).to_vec();
            take(4 * n as usize);
            (name, ty, u64::from(n), bytes)
        })
        .collect()
}

/// Every block of the quantization fixtures as a tensor of its own: real
/// SmolLM2 rows and gguf-py's and ggml's encodings of every type.
fn fixture_blocks() -> Vec<u8> {
    let mut out = GgufWriter::new();
    for file in ["quant_fixture.bin", "kquant_fixture.bin"] {
        for (name, ty, n, bytes) in fixture_entries(file) {
            out.add_tensor(&format!("{file}:{name}"), &[n], ty, bytes);
        }
    }
    out.to_bytes()
}

/// The writer's form of a value the reader read.
fn as_written(v: &gguf::MetadataValue) -> MetadataValue {
    use gguf::MetadataValue as R;
    match v.clone() {
        R::U8(x) => MetadataValue::U8(x),
        R::I8(x) => MetadataValue::I8(x),
        R::U16(x) => MetadataValue::U16(x),
        R::I16(x) => MetadataValue::I16(x),
        R::U32(x) => MetadataValue::U32(x),
        R::I32(x) => MetadataValue::I32(x),
        R::F32(x) => MetadataValue::F32(x),
        R::Bool(x) => MetadataValue::Bool(x),
        R::String(x) => MetadataValue::String(x),
        R::Array(a) => MetadataValue::Array(array_as_written(a)),
        R::U64(x) => MetadataValue::U64(x),
        R::I64(x) => MetadataValue::I64(x),
        R::F64(x) => MetadataValue::F64(x),
    }
}

fn array_as_written(a: gguf::MetadataArray) -> MetadataArray {
    use gguf::MetadataArray as R;
    match a {
        R::U8(v) => MetadataArray::U8(v),
        R::I8(v) => MetadataArray::I8(v),
        R::U16(v) => MetadataArray::U16(v),
        R::I16(v) => MetadataArray::I16(v),
        R::U32(v) => MetadataArray::U32(v),
        R::I32(v) => MetadataArray::I32(v),
        R::F32(v) => MetadataArray::F32(v),
        R::Bool(v) => MetadataArray::Bool(v),
        R::String(v) => MetadataArray::String(v),
        R::Array(v) => MetadataArray::Array(v.into_iter().map(array_as_written).collect()),
        R::U64(v) => MetadataArray::U64(v),
        R::I64(v) => MetadataArray::I64(v),
        R::F64(v) => MetadataArray::F64(v),
    }
}

/// The real model's metadata, in file order, with the vocabulary cut to
/// its first [`KEPT_TOKENS`] tokens and the merges to those that join kept
/// tokens into a kept token (in rank order).
fn reduced_metadata(real: &GgufFile) -> Vec<(String, MetadataValue)> {
    let tokens = real.get_str_array(tk::KEY_TOKENS).expect("real vocabulary");
    let kept: std::collections::HashSet<&str> =
        tokens[..KEPT_TOKENS].iter().map(String::as_str).collect();
    real.metadata_entries()
        .map(|(key, value)| {
            let value = match (key, value) {
                (tk::KEY_TOKENS, _) => {
                    MetadataValue::Array(MetadataArray::String(tokens[..KEPT_TOKENS].to_vec()))
                }
                (tk::KEY_TOKEN_TYPE, gguf::MetadataValue::Array(gguf::MetadataArray::I32(t))) => {
                    MetadataValue::Array(MetadataArray::I32(t[..KEPT_TOKENS].to_vec()))
                }
                (tk::KEY_MERGES, gguf::MetadataValue::Array(gguf::MetadataArray::String(m))) => {
                    let joins_kept = |line: &&String| {
                        line.split_once(' ').is_some_and(|(l, r)| {
                            kept.contains(l)
                                && kept.contains(r)
                                && kept.contains(&*(l.to_owned() + r))
                        })
                    };
                    MetadataValue::Array(MetadataArray::String(
                        m.iter().filter(joins_kept).cloned().collect(),
                    ))
                }
                _ => as_written(value),
            };
            (key.to_owned(), value)
        })
        .collect()
}

/// The real model's header, reduced: its metadata (vocabulary cut) and all
/// its tensor headers, but none of the tensor data, which the headers point
/// past the end of.
fn reduced_header(real: &GgufFile) -> Vec<u8> {
    let mut out = GgufWriter::new();
    let metadata = reduced_metadata(real);
    let end = 24
        + metadata
            .iter()
            .map(|(k, v)| 8 + k.len() + 4 + encoded_len(v))
            .sum::<usize>();
    for (k, v) in metadata {
        out.add_metadata(&k, v);
    }
    let mut bytes = out.to_bytes();
    // The tensor headers follow the metadata, where the writer put its
    // padding: patch the tensor count and append them with the real offsets.
    bytes.truncate(end);
    let infos = real.tensors();
    bytes[8..16].copy_from_slice(&(infos.len() as u64).to_le_bytes());
    for t in infos {
        bytes.extend_from_slice(&(t.name.len() as u64).to_le_bytes());
        bytes.extend_from_slice(t.name.as_bytes());
        bytes.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            bytes.extend_from_slice(&d.to_le_bytes());
        }
        bytes.extend_from_slice(&t.ggml_type.id().to_le_bytes());
        bytes.extend_from_slice(&(t.offset - real.data_offset()).to_le_bytes());
    }
    bytes
}

/// Bytes of a value's encoding.
fn encoded_len(v: &MetadataValue) -> usize {
    match v {
        MetadataValue::U8(_) | MetadataValue::I8(_) | MetadataValue::Bool(_) => 1,
        MetadataValue::U16(_) | MetadataValue::I16(_) => 2,
        MetadataValue::U32(_) | MetadataValue::I32(_) | MetadataValue::F32(_) => 4,
        MetadataValue::U64(_) | MetadataValue::I64(_) | MetadataValue::F64(_) => 8,
        MetadataValue::String(s) => 8 + s.len(),
        MetadataValue::Array(a) => 4 + 8 + array_elements_len(a),
    }
}

fn array_elements_len(a: &MetadataArray) -> usize {
    match a {
        MetadataArray::U8(v) => v.len(),
        MetadataArray::I8(v) => v.len(),
        MetadataArray::Bool(v) => v.len(),
        MetadataArray::U16(v) => 2 * v.len(),
        MetadataArray::I16(v) => 2 * v.len(),
        MetadataArray::U32(v) => 4 * v.len(),
        MetadataArray::I32(v) => 4 * v.len(),
        MetadataArray::F32(v) => 4 * v.len(),
        MetadataArray::U64(v) => 8 * v.len(),
        MetadataArray::I64(v) => 8 * v.len(),
        MetadataArray::F64(v) => 8 * v.len(),
        MetadataArray::String(v) => v.iter().map(|s| 8 + s.len()).sum(),
        MetadataArray::Array(v) => v.iter().map(|a| 4 + 8 + array_elements_len(a)).sum(),
    }
}

/// A tokenizer seed: the GGUF file's length, the file, a text and ids.
fn tokenizer_seed(gguf: &[u8], text: &str, ids: &[u32]) -> Vec<u8> {
    let mut out = (gguf.len() as u32).to_le_bytes().to_vec();
    out.extend_from_slice(gguf);
    out.extend_from_slice(text.as_bytes());
    out.push(0);
    out.extend(ids.iter().flat_map(|i| i.to_le_bytes()));
    out
}

/// The reduced vocabulary alone, as a GGUF file without tensors.
fn reduced_vocabulary(real: &GgufFile) -> Vec<u8> {
    let mut out = GgufWriter::new();
    for (k, v) in reduced_metadata(real) {
        if k.starts_with("tokenizer.") {
            out.add_metadata(&k, v);
        }
    }
    out.to_bytes()
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn write(path: &Path, bytes: &[u8]) {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    }
    std::fs::write(path, bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

/// Writes the GGUF and tokenizer seeds (the JSON Lines seeds come from the
/// program, see `fuzz/make-seeds`). Needs the real model.
#[test]
#[ignore = "writes fuzz/seeds; run by fuzz/make-seeds"]
fn write_gguf_seeds() {
    let Some(path) = model_tracer_test_support::real_model() else {
        return;
    };
    let real = GgufFile::open(&path).expect("the real model opens");
    let dir = seeds_dir();
    let micro = micro_llama();
    write(&dir.join("gguf/micro-llama.gguf"), &micro);
    write(&dir.join("gguf/fixture-blocks.gguf"), &fixture_blocks());
    write(
        &dir.join("gguf/smollm2-header.gguf"),
        &reduced_header(&real),
    );

    let vocab = reduced_vocabulary(&real);
    let tok = Tokenizer::from_gguf(&GgufFile::from_bytes(vocab.clone()).expect("vocabulary"))
        .expect("tokenizer");
    let text = TEXTS.join("\n");
    write(
        &dir.join("tokenizer/smollm2-vocabulary"),
        &tokenizer_seed(&vocab, &text, &tok.encode(&text)),
    );
    // Ids outside the vocabulary, and a text with no ids.
    write(
        &dir.join("tokenizer/smollm2-vocabulary-ids"),
        &tokenizer_seed(&vocab, "", &[0, 1, 2, 2047, 2048, 49151, u32::MAX]),
    );
    let small = byte_vocabulary();
    let tok = Tokenizer::from_gguf(&GgufFile::from_bytes(small.clone()).expect("vocabulary"))
        .expect("tokenizer");
    let text = "<|im_start|>abc [U] abcabc A 12 <ctl>é<|im_end|>";
    write(
        &dir.join("tokenizer/byte-vocabulary"),
        &tokenizer_seed(&small, text, &tok.encode(text)),
    );
}

/// GPT-2's byte alphabet: printable Latin-1 bytes stand for themselves,
/// the others are moved to U+0100 and up, in byte order.
fn byte_alphabet() -> Vec<String> {
    let mut moved = 0;
    (0u32..256)
        .map(|b| {
            let printable = (0x21..=0x7E).contains(&b)
                || (0xA1..=0xAC).contains(&b)
                || (0xAE..=0xFF).contains(&b);
            let cp = if printable {
                b
            } else {
                moved += 1;
                0xFF + moved
            };
            char::from_u32(cp).map(String::from).unwrap_or_default()
        })
        .collect()
}

/// A small vocabulary with a token of every type: the 256 byte tokens, a
/// few merges, control, user-defined, byte and unused tokens, and a ChatML
/// template.
fn byte_vocabulary() -> Vec<u8> {
    let mut tokens = byte_alphabet();
    let mut types = vec![1i32; tokens.len()];
    for (t, ty) in [
        ("ab", 1),
        ("abc", 1),
        ("Ġabc", 1),
        ("<|im_start|>", 3),
        ("<|im_end|>", 3),
        ("<ctl>", 3),
        ("[U]", 4),
        ("<0x41>", 6),
        ("<unused0>", 5),
        ("", 1),
    ] {
        tokens.push(t.to_owned());
        types.push(ty);
    }
    let merges = ["a b", "ab c", "Ġ abc", "1 2"].map(String::from).to_vec();
    let template = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nBe brief<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}";
    let mut out = GgufWriter::new();
    let s = |v: &str| MetadataValue::String(v.into());
    out.add_metadata(tk::KEY_MODEL, s("gpt2"));
    out.add_metadata(tk::KEY_PRE, s("smollm"));
    out.add_metadata(
        tk::KEY_TOKENS,
        MetadataValue::Array(MetadataArray::String(tokens)),
    );
    out.add_metadata(
        tk::KEY_TOKEN_TYPE,
        MetadataValue::Array(MetadataArray::I32(types)),
    );
    out.add_metadata(
        tk::KEY_MERGES,
        MetadataValue::Array(MetadataArray::String(merges)),
    );
    out.add_metadata(tk::KEY_BOS, MetadataValue::U32(256 + 3));
    out.add_metadata(tk::KEY_EOS, MetadataValue::U32(256 + 4));
    out.add_metadata(tk::KEY_ADD_BOS, MetadataValue::Bool(true));
    out.add_metadata(tk::KEY_CHAT_TEMPLATE, s(template));
    out.to_bytes()
}

#[test]
fn committed_seeds_stay_small() {
    let mut total = 0;
    let mut files = 0;
    for target in [
        "gguf",
        "tokenizer",
        "jsonl",
        "diff_jsonl",
        "dump",
        "diff_dump",
    ] {
        let dir = seeds_dir().join(target);
        let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let mut here = 0;
        for e in entries {
            let e = e.expect("directory entry");
            total += e.metadata().expect("metadata").len();
            here += 1;
        }
        assert!(here >= 2, "{target}: {here} seeds");
        files += here;
    }
    assert!(
        total < SEEDS_BUDGET,
        "{files} seeds take {total} bytes, more than {SEEDS_BUDGET}"
    );
}

#[test]
fn the_micro_llama_seed_loads_and_runs() {
    let file = GgufFile::from_bytes(read(&seeds_dir().join("gguf/micro-llama.gguf")))
        .expect("the seed parses");
    let config = Config::from_gguf(&file).expect("its hyperparameters");
    assert_eq!(config, micro_config());
    let weights = Weights::from_gguf(&file, &config).expect("its weights");
    let cache = KvCacheOptions {
        capacity: 4,
        sinks: 1,
        kv_type: KvType::F32,
    };
    let mut model = Llama::new(config, weights, None, cache, Full).expect("the model");
    let logits = model.forward(3).to_vec();
    assert_eq!(logits.len(), 48);
    assert!(logits.iter().all(|v| v.is_finite()));
    assert_eq!(model.tracer().summary().forwards, 1);
}

#[test]
fn the_fixture_blocks_seed_holds_every_block_type() {
    let file = GgufFile::from_bytes(read(&seeds_dir().join("gguf/fixture-blocks.gguf")))
        .expect("the seed parses");
    let types: std::collections::BTreeSet<u32> =
        file.tensors().iter().map(|t| t.ggml_type.id()).collect();
    for ty in [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q8_1,
        GgmlType::Q4_K,
        GgmlType::Q6_K,
        GgmlType::Q8_K,
    ] {
        assert!(types.contains(&ty.id()), "no {ty} tensor");
    }
}

#[test]
fn the_smollm2_header_seed_reads_up_to_the_missing_data() {
    let bytes = read(&seeds_dir().join("gguf/smollm2-header.gguf"));
    match GgufFile::from_bytes(bytes) {
        // The first tensor's data would start past the end of the file.
        Err(GgufError::TensorOutOfBounds { tensor, .. }) => {
            assert_eq!(tensor, "token_embd.weight")
        }
        other => panic!("{other:?}"),
    }
}

/// The three parts of a tokenizer seed.
fn split_seed(seed: &[u8]) -> (GgufFile, &[u8], Vec<u32>) {
    let len = u32::from_le_bytes([seed[0], seed[1], seed[2], seed[3]]) as usize;
    let file = GgufFile::from_bytes(seed[4..4 + len].to_vec()).expect("the file parses");
    let rest = &seed[4 + len..];
    let at = rest.iter().position(|&b| b == 0).expect("the text ends");
    let ids = rest[at + 1..]
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    (file, &rest[..at], ids)
}

#[test]
fn the_tokenizer_seeds_build_a_tokenizer_that_round_trips_their_text() {
    let dir = seeds_dir().join("tokenizer");
    let seed = read(&dir.join("smollm2-vocabulary"));
    let (file, text, ids) = split_seed(&seed);
    let tok = Tokenizer::from_gguf(&file).expect("the tokenizer builds");
    assert_eq!(tok.vocab_size(), KEPT_TOKENS);
    assert!(tok.merge_count() > 1000, "{} merges", tok.merge_count());
    assert_eq!(text, TEXTS.join("\n").as_bytes());
    let text = std::str::from_utf8(text).expect("UTF-8 text");
    assert_eq!(ids, tok.encode(text));
    assert_eq!(tok.decode(&ids), text);
    // Two control tokens and the end-of-text marker, cut out whole.
    assert!(ids.iter().filter(|&&id| tok.is_special(id)).count() >= 5);

    let seed = read(&dir.join("byte-vocabulary"));
    let (file, text, ids) = split_seed(&seed);
    let tok = Tokenizer::from_gguf(&file).expect("the tokenizer builds");
    let text = std::str::from_utf8(text).expect("UTF-8 text");
    assert_eq!(ids, tok.encode(text));
    assert_eq!(tok.decode(&ids), text);
    assert!(ids.contains(&tok.token_id("Ġabc").expect("a merged token")));
    assert!(tok.apply_chat_template(&[], true).is_ok());
}
