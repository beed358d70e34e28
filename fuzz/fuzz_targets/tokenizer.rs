//! The tokenizer built from arbitrary GGUF metadata, then run on arbitrary
//! text and ids.
//!
//! Input layout: a little-endian `u32` length `n`, then `n` bytes of GGUF
//! file, then the text to encode (up to the first zero byte, invalid UTF-8
//! replaced), then the ids to decode (little-endian `u32`s).
#![no_main]

use libfuzzer_sys::fuzz_target;
use model_tracer_llama::gguf::GgufFile;
use model_tracer_llama::tokenizer::{ChatMessage, Tokenizer};

fuzz_target!(|data: &[u8]| {
    let Some((len, rest)) = data.split_first_chunk::<4>() else {
        return;
    };
    let len = (u32::from_le_bytes(*len) as usize).min(rest.len());
    let (gguf, tail) = rest.split_at(len);
    let Ok(file) = GgufFile::from_bytes(gguf.to_vec()) else {
        return;
    };
    let Ok(tok) = Tokenizer::from_gguf(&file) else {
        return;
    };
    let (text, ids) = match tail.iter().position(|&b| b == 0) {
        Some(at) => (&tail[..at], &tail[at + 1..]),
        None => (tail, &[][..]),
    };
    let text = String::from_utf8_lossy(text);
    let vocab = tok.vocab_size();

    for encoded in [tok.encode(&text), tok.encode_plain(&text)] {
        for &id in &encoded {
            assert!(
                (id as usize) < vocab,
                "id {id} outside a {vocab}-token vocabulary"
            );
        }
        let _ = tok.decode(&encoded);
    }

    let ids: Vec<u32> = ids
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let _ = tok.decode(&ids);
    // The same ids folded into the vocabulary, so that most are tokens.
    let folded: Vec<u32> = ids.iter().map(|&id| id % (vocab as u32 + 2)).collect();
    let _ = tok.decode_bytes(&folded);
    for &id in folded.iter().take(64) {
        let _ = tok.token_str(id);
        let _ = tok.token_text(id);
        let _ = tok.is_eog(id);
        let _ = tok.is_special(id);
    }

    let chat = [ChatMessage::user(text.as_ref())];
    if let Ok(rendered) = tok.apply_chat_template(&chat, true) {
        let _ = tok.encode(&rendered);
    }
});
