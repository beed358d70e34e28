//! The tokenizer on the real SmolLM2-135M-Instruct vocabulary.
//!
//! Expected ids come from `tests/fixtures/smollm2_tokens.txt`, produced once by
//! Hugging Face's `tokenizers` library configured from the same GGUF
//! vocabulary with llama.cpp's `smollm` pre-tokenizer rules (see
//! `tests/fixtures/gen_tokenizer_fixture.py`); chat-template lines were
//! rendered by `jinja2` from the file's own template.

mod common;

use std::sync::OnceLock;
use std::time::Instant;

use model_tracer_llama::gguf::GgufFile;
use model_tracer_llama::tokenizer::{ChatMessage, TokenType, Tokenizer};
use model_tracer_test_support::SplitMix64;

/// The tokenizer, built once for all tests (or `None` without the file).
fn tokenizer() -> Option<&'static Tokenizer> {
    static TOK: OnceLock<Option<Tokenizer>> = OnceLock::new();
    TOK.get_or_init(|| {
        let path = common::real_model()?;
        let gguf = GgufFile::open(path).expect("model file opens");
        Some(Tokenizer::from_gguf(&gguf).expect("tokenizer builds"))
    })
    .as_ref()
}

struct Case {
    kind: String,
    ids: Vec<u32>,
    text: String,
    line: usize,
}

fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            Some('t') => out.push('\t'),
            Some('\\') => out.push('\\'),
            other => panic!("bad escape \\{other:?} in fixture"),
        }
    }
    out
}

fn fixture() -> Vec<Case> {
    let text = include_str!("fixtures/smollm2_tokens.txt");
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.starts_with('#'))
        .map(|(i, l)| {
            let mut parts = l.splitn(3, '\t');
            let kind = parts.next().unwrap().to_owned();
            let ids = parts
                .next()
                .unwrap()
                .split_whitespace()
                .map(|x| x.parse().unwrap())
                .collect();
            let text = unescape(parts.next().unwrap());
            Case {
                kind,
                ids,
                text,
                line: i + 1,
            }
        })
        .collect()
}

#[test]
fn capital_of_france() {
    let Some(tok) = tokenizer() else { return };
    assert_eq!(
        tok.encode("The capital of France is"),
        [504, 3575, 282, 4649, 314]
    );
}

#[test]
fn vocabulary_and_special_ids() {
    let Some(tok) = tokenizer() else { return };
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!(tok.merge_count(), 48900);
    assert_eq!(tok.token_id("<|endoftext|>"), Some(0));
    assert_eq!(tok.token_id("<|im_start|>"), Some(1));
    assert_eq!(tok.token_id("<|im_end|>"), Some(2));
    assert_eq!(tok.token_id("Ġcapital"), Some(3575));
    assert_eq!(tok.token_text(3575), Some("Ġcapital"));
    assert_eq!(tok.token_str(3575).as_deref(), Some(" capital"));
    assert_eq!(tok.bos_id(), Some(1));
    assert_eq!(tok.eos_id(), Some(2));
    assert_eq!(tok.unknown_id(), Some(0));
    assert_eq!(tok.padding_id(), Some(2));
    assert!(!tok.add_bos_token());
    for id in 0..17 {
        assert!(tok.is_special(id), "{id}");
        assert_eq!(tok.token_type(id), Some(TokenType::Control));
    }
    assert!(!tok.is_special(17));
    assert_eq!(tok.token_type(17), Some(TokenType::Normal));
    assert_eq!(tok.token_type(49152), None);
    assert!(tok.is_eog(2) && tok.is_eog(0));
    assert!(!tok.is_eog(1) && !tok.is_eog(504));
    assert_eq!(tok.encode("<|im_start|><|im_end|>"), [1, 2]);
}

#[test]
fn matches_reference_ids_for_every_fixture_case() {
    let Some(tok) = tokenizer() else { return };
    let cases = fixture();
    assert!(cases.len() > 450, "fixture has {} cases", cases.len());
    let mut failures = Vec::new();
    for c in &cases {
        let got = match c.kind.as_str() {
            "plain" => tok.encode_plain(&c.text),
            _ => tok.encode(&c.text),
        };
        if got != c.ids {
            failures.push(format!(
                "line {} {:?}: got {:?}, expected {:?}",
                c.line, c.text, got, c.ids
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ:\n{}",
        failures.len(),
        cases.len(),
        failures[..failures.len().min(10)].join("\n")
    );
}

#[test]
fn plain_encoding_spells_control_tokens_out() {
    let Some(tok) = tokenizer() else { return };
    let plain = tok.encode_plain("<|im_start|>user");
    assert!(!plain.contains(&1), "{plain:?}");
    assert!(plain.len() > 2);
    assert_eq!(tok.decode(&plain), "<|im_start|>user");
    assert_eq!(tok.encode("<|im_start|>user"), [1, 4093]);
}

#[test]
fn chat_template_matches_jinja_rendering() {
    let Some(tok) = tokenizer() else { return };
    assert_eq!(
        tok.default_system_message(),
        Some("You are a helpful AI assistant named SmolLM, trained by Hugging Face")
    );
    let chats: [(&str, Vec<ChatMessage>, bool); 3] = [
        (
            "chat-user",
            vec![ChatMessage::user("What is the capital of France?")],
            false,
        ),
        (
            "chat-user-gen",
            vec![ChatMessage::user("Hi!\nHow are you?")],
            true,
        ),
        (
            "chat-system",
            vec![
                ChatMessage::system("Answer in French."),
                ChatMessage::user("Say hello"),
                ChatMessage::assistant("Bonjour"),
                ChatMessage::user("Again"),
            ],
            true,
        ),
    ];
    let cases = fixture();
    for (kind, messages, gen) in chats {
        let case = cases.iter().find(|c| c.kind == kind).unwrap();
        let rendered = tok.apply_chat_template(&messages, gen).unwrap();
        assert_eq!(rendered, case.text, "{kind}");
        let ids = tok.encode(&rendered);
        assert_eq!(ids, case.ids, "{kind}");
        assert_eq!(
            ids.iter().filter(|&&i| i == 1).count(),
            messages.len() + usize::from(gen) + usize::from(kind != "chat-system")
        );
        assert_eq!(ids[0], 1, "starts with <|im_start|>");
    }

    let user = tok
        .apply_chat_template(&[ChatMessage::user("Hello")], true)
        .unwrap();
    let ids = tok.encode(&user);
    assert_eq!(ids.iter().filter(|&&i| i == 1).count(), 3);
    assert_eq!(ids.iter().filter(|&&i| i == 2).count(), 2);
    assert_eq!(tok.decode(&ids), user);
}

/// A deterministic pseudo-random string: pieces of `POOL` and random
/// characters.
fn random_string(rng: &mut SplitMix64) -> String {
    const POOL: &[&str] = &[
        "a",
        "Z",
        "q",
        " ",
        " ",
        "  ",
        "\n",
        "\t",
        "\r\n",
        "7",
        "42",
        ".",
        "'",
        "'s",
        "!?",
        "é",
        "ß",
        "世",
        "界",
        "😀",
        "👍🏽",
        "\u{a0}",
        "\u{3000}",
        "<|im_end|>",
        "<|endoftext|>",
        "<|im",
        "²",
        "٣",
        "Ж",
        "\\",
        "\u{0301}",
    ];
    let len = rng.below(30);
    let mut s = String::new();
    for _ in 0..len {
        if rng.below(5) == 0 {
            // Mostly the first three planes, sometimes any scalar value
            // (including unassigned and private-use ones).
            let limit = if rng.below(10) == 0 {
                0x11_0000
            } else {
                0x3_0000
            };
            let c = loop {
                if let Some(c) = char::from_u32(rng.below(limit) as u32) {
                    break c;
                }
            };
            s.push(c);
        } else {
            s.push_str(POOL[rng.below(POOL.len())]);
        }
    }
    s
}

/// GPT-2's byte alphabet, rebuilt independently of the crate: printable
/// Latin-1 bytes stand for themselves, the others for U+0100 onwards.
fn alphabet_char(byte: u8) -> char {
    let printable = |b: u8| matches!(b, 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF);
    if printable(byte) {
        return char::from(byte);
    }
    let moved = (0..byte).filter(|&b| !printable(b)).count() as u32;
    char::from_u32(0x100 + moved).unwrap()
}

#[test]
fn decode_inverts_encode() {
    let Some(tok) = tokenizer() else { return };
    // Bytes without a token of their own cannot be encoded; llama.cpp drops
    // them, and so does this tokenizer.
    let missing: Vec<u8> = (0..=255u8)
        .filter(|&b| tok.token_id(&alphabet_char(b).to_string()).is_none())
        .collect();
    assert_eq!(
        missing,
        [
            0x04, 0x06, 0x13, 0x14, 0x16, 0x1d, 0xc0, 0xc1, 0xf1, 0xf2, 0xf5, 0xf6, 0xf7, 0xf8,
            0xf9, 0xfa, 0xfb, 0xfc, 0xfd, 0xfe, 0xff
        ]
    );
    assert_eq!(tok.decode(&tok.encode("a\u{4}b\u{1d}")), "ab");

    let mut rng = SplitMix64::new(0x1234_5678_9abc_def1);
    let fixture_texts = fixture().into_iter().map(|c| c.text);
    let random = (0..3000).map(|_| random_string(&mut rng));
    let mut lossy = 0;
    for text in fixture_texts.chain(random) {
        let kept: Vec<u8> = text.bytes().filter(|b| !missing.contains(b)).collect();
        if kept.len() == text.len() {
            assert_eq!(tok.decode(&tok.encode(&text)), text, "special parsing");
            assert_eq!(tok.decode(&tok.encode_plain(&text)), text, "plain");
        } else {
            lossy += 1;
            assert_eq!(tok.decode_bytes(&tok.encode(&text)), kept, "{text:?}");
            assert_eq!(tok.decode_bytes(&tok.encode_plain(&text)), kept, "{text:?}");
        }
    }
    assert!(
        (1..1500).contains(&lossy),
        "{lossy} strings hit missing bytes"
    );
}

#[test]
fn decode_skips_unknown_ids_and_keeps_partial_characters_lossy() {
    let Some(tok) = tokenizer() else { return };
    let ids = tok.encode("héllo 😀");
    let mut with_junk = vec![u32::MAX, 49152];
    with_junk.extend(&ids);
    with_junk.push(1 << 20);
    assert_eq!(tok.decode(&with_junk), "héllo 😀");
    assert_eq!(tok.token_str(49152), None);
    assert_eq!(tok.token_bytes(u32::MAX), None);

    // The emoji is spelt by byte tokens; one alone is an incomplete character.
    let emoji = tok.encode("😀");
    assert!(emoji.len() > 1, "{emoji:?}");
    assert_eq!(tok.decode(&emoji[..1]), "\u{fffd}");
    assert_eq!(tok.decode_bytes(&emoji), "😀".as_bytes());
    assert_eq!(tok.token_str(1).as_deref(), Some("<|im_start|>"));
}

#[test]
fn every_normal_token_decodes_from_the_byte_alphabet() {
    let Some(tok) = tokenizer() else { return };
    for id in 0..tok.vocab_size() as u32 {
        if tok.token_type(id) != Some(TokenType::Normal) {
            continue;
        }
        let text = tok.token_text(id).unwrap();
        let bytes = tok.token_bytes(id).unwrap();
        // One byte per alphabet character.
        assert_eq!(bytes.len(), text.chars().count(), "token {id} {text:?}");
    }
}

#[test]
fn encoding_a_kilobyte_prompt_is_fast() {
    let Some(tok) = tokenizer() else { return };
    let paragraph = "The quick brown fox jumps over the lazy dog; in 2024, 12,345 people \
                     asked why. Café, naïve, 東京 — it's what we'll see!\n";
    let prompt = paragraph.repeat(1024 / paragraph.len() + 1);
    assert!(prompt.len() >= 1024);
    let mut times = Vec::new();
    for _ in 0..21 {
        let start = Instant::now();
        let ids = tok.encode(&prompt);
        times.push(start.elapsed());
        assert!(ids.len() > 200);
    }
    times.sort();
    let median = times[times.len() / 2];
    eprintln!("encode of {} bytes: median {median:?}", prompt.len());
    // The bound only means something for optimized code.
    if !cfg!(debug_assertions) {
        assert!(median.as_secs_f64() < 0.010, "median {median:?}");
    }
}
