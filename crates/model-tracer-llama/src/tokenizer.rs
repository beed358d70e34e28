//! GPT-2 style byte-level BPE tokenizer built from a GGUF vocabulary.
//!
//! It reproduces llama.cpp's tokenizer for `tokenizer.ggml.model = "gpt2"`
//! vocabularies, step by step:
//!
//! 1. **Special tokens.** Tokens of type CONTROL, USER_DEFINED or UNKNOWN are
//!    cut out of the text first, as llama.cpp does with `parse_special = true`:
//!    longest token text first, each one splitting every remaining stretch of
//!    plain text at its non-overlapping occurrences, left to right.
//!    [`Tokenizer::encode_plain`] skips CONTROL and UNKNOWN tokens here (their
//!    text is then tokenized like any other text) but still cuts out
//!    USER_DEFINED ones, as llama.cpp does with `parse_special = false`.
//! 2. **Pre-tokenization** of each stretch of plain text into words, by the
//!    rules of `tokenizer.ggml.pre`:
//!    - `smollm` (and `starcoder`, `refact`, `command-r`, `codeshell`,
//!      `exaone`, `minerva`, which share its expressions) first isolates every
//!      `\p{N}` character, then applies the GPT-2 pattern
//!      `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`
//!      to each piece;
//!    - `gpt2` (and `mpt`, `olmo`, `jais`) applies the GPT-2 pattern alone.
//!
//!    The pattern is matched by hand (its `\s+(?!\S)` look-ahead is beyond
//!    the `regex` crate), with the same corner cases as llama.cpp's matcher.
//!    `\p{L}` is general category L (from the `unicode-general-category`
//!    crate), `\p{N}` is category N ([`char::is_numeric`]), and `\s` is the
//!    Unicode `White_Space` property ([`char::is_whitespace`]), the same sets
//!    as the tables llama.cpp generates. Unicode versions may differ for
//!    recently assigned characters.
//! 3. **Byte-level BPE** on each word: its UTF-8 bytes are mapped to GPT-2's
//!    printable byte alphabet and merged pairwise by merge rank (lowest rank
//!    first, leftmost first among equal ranks) until no merge applies; each
//!    resulting symbol is looked up in the vocabulary. A symbol that is not a
//!    token (possible only when merges name strings missing from the
//!    vocabulary) falls back to the one-byte tokens of its printable ASCII
//!    bytes, and a byte whose alphabet character is not a token at all is
//!    dropped: llama.cpp does the same, and SmolLM2's vocabulary lacks 21 of
//!    the 256 (a few C0 controls and bytes that never occur in UTF-8 text,
//!    or only in planes 4 to 11).
//!
//! Special tokens of equal length are tried in id order; llama.cpp leaves
//! that order unspecified, which only matters for overlapping texts.
//!
//! Nothing is cached between calls; every call allocates only in proportion
//! to its input.

#![warn(missing_docs)]

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::fmt;

use unicode_general_category::{get_general_category, GeneralCategory};

use super::gguf::{GgufError, GgufFile};

/// Metadata key of the tokenizer model name (`"gpt2"` for byte-level BPE).
pub const KEY_MODEL: &str = "tokenizer.ggml.model";
/// Metadata key of the pre-tokenizer name (`"smollm"`, `"gpt2"`, ...).
pub const KEY_PRE: &str = "tokenizer.ggml.pre";
/// Metadata key of the vocabulary (array of token texts).
pub const KEY_TOKENS: &str = "tokenizer.ggml.tokens";
/// Metadata key of the token types (array of integers, see [`TokenType`]).
pub const KEY_TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
/// Metadata key of the BPE merges (array of `"left right"` strings, by rank).
pub const KEY_MERGES: &str = "tokenizer.ggml.merges";
/// Metadata key of the beginning-of-sequence token id.
pub const KEY_BOS: &str = "tokenizer.ggml.bos_token_id";
/// Metadata key of the end-of-sequence token id.
pub const KEY_EOS: &str = "tokenizer.ggml.eos_token_id";
/// Metadata key of the unknown-token id.
pub const KEY_UNK: &str = "tokenizer.ggml.unknown_token_id";
/// Metadata key of the padding token id.
pub const KEY_PAD: &str = "tokenizer.ggml.padding_token_id";
/// Metadata key saying whether prompts should start with the BOS token.
pub const KEY_ADD_BOS: &str = "tokenizer.ggml.add_bos_token";
/// Metadata key of the Jinja chat template.
pub const KEY_CHAT_TEMPLATE: &str = "tokenizer.chat_template";

/// Texts that llama.cpp always treats as control tokens ending generation,
/// whatever type the vocabulary gives them.
const END_OF_GENERATION_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "<|end_of_text|>",
    "<end_of_utterance>",
];

/// Everything that can prevent building a tokenizer or rendering a chat.
#[derive(Debug)]
pub enum TokenizerError {
    /// A required metadata entry is missing or has the wrong type.
    Gguf(GgufError),
    /// `tokenizer.ggml.model` names a tokenizer other than `gpt2`.
    UnsupportedModel(String),
    /// `tokenizer.ggml.pre` names a pre-tokenizer this crate does not know.
    UnsupportedPreTokenizer(String),
    /// The vocabulary has no tokens.
    EmptyVocabulary,
    /// The vocabulary has more tokens than a `u32` id can address.
    VocabularyTooLarge(usize),
    /// `tokenizer.ggml.token_type` has fewer entries than the vocabulary.
    TokenTypeCount {
        /// Number of tokens.
        tokens: usize,
        /// Number of token types.
        types: usize,
    },
    /// The file has no `tokenizer.chat_template`.
    NoChatTemplate,
    /// The chat template is not one this crate can render (only ChatML
    /// templates, using `<|im_start|>` and `<|im_end|>`, are).
    UnsupportedChatTemplate,
}

impl fmt::Display for TokenizerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Gguf(e) => write!(f, "tokenizer metadata: {e}"),
            Self::UnsupportedModel(m) => {
                write!(f, "tokenizer model `{m}` is not supported (only `gpt2` is)")
            }
            Self::UnsupportedPreTokenizer(p) => write!(f, "pre-tokenizer `{p}` is not supported"),
            Self::EmptyVocabulary => write!(f, "the vocabulary is empty"),
            Self::VocabularyTooLarge(n) => write!(f, "the vocabulary has {n} tokens, too many"),
            Self::TokenTypeCount { tokens, types } => write!(
                f,
                "{KEY_TOKEN_TYPE} has {types} entries for {tokens} tokens"
            ),
            Self::NoChatTemplate => write!(f, "the model file has no {KEY_CHAT_TEMPLATE}"),
            Self::UnsupportedChatTemplate => {
                write!(f, "the chat template is not a ChatML template")
            }
        }
    }
}

impl std::error::Error for TokenizerError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Gguf(e) => Some(e),
            _ => None,
        }
    }
}

impl From<GgufError> for TokenizerError {
    fn from(e: GgufError) -> Self {
        Self::Gguf(e)
    }
}

/// The type of a vocabulary entry (llama.cpp's `llama_token_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TokenType {
    /// Type 0, or any id outside 0..=6.
    Undefined,
    /// Type 1: an ordinary BPE token.
    Normal,
    /// Type 2: the unknown token.
    Unknown,
    /// Type 3: a control token such as `<|im_start|>`.
    Control,
    /// Type 4: a token added by the model's authors, matched verbatim.
    UserDefined,
    /// Type 5: a reserved, unused slot.
    Unused,
    /// Type 6: a raw byte written `<0xXX>`.
    Byte,
}

impl TokenType {
    /// Decodes the numeric type stored in `tokenizer.ggml.token_type`.
    pub fn from_id(id: i32) -> Self {
        match id {
            1 => Self::Normal,
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            5 => Self::Unused,
            6 => Self::Byte,
            _ => Self::Undefined,
        }
    }

    /// Whether text spelling this token is cut out as the token itself
    /// before BPE (CONTROL, USER_DEFINED and UNKNOWN tokens).
    pub fn is_special(self) -> bool {
        matches!(self, Self::Control | Self::UserDefined | Self::Unknown)
    }
}

/// One message of a chat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    /// Who speaks: `"system"`, `"user"` or `"assistant"`.
    pub role: String,
    /// What is said.
    pub content: String,
}

impl ChatMessage {
    /// A message from `role`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }

    /// A system message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }

    /// A user message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }

    /// An assistant message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

/// How text is split into words before BPE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PreTokenizer {
    /// The GPT-2 pattern.
    Gpt2,
    /// Every `\p{N}` character isolated, then the GPT-2 pattern.
    Gpt2IsolatedDigits,
}

impl PreTokenizer {
    fn from_name(name: &str) -> Option<Self> {
        match name {
            "gpt2" | "mpt" | "olmo" | "jais" => Some(Self::Gpt2),
            "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone"
            | "minerva" => Some(Self::Gpt2IsolatedDigits),
            _ => None,
        }
    }
}

/// A ChatML chat template, with the system message it inserts when a chat
/// does not start with one.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ChatMl {
    default_system: Option<String>,
}

impl ChatMl {
    const START: &'static str = "<|im_start|>";
    const END: &'static str = "<|im_end|>";

    /// Recognizes a ChatML template and extracts its default system message
    /// (the text of a literal `<|im_start|>system\n...<|im_end|>` emitted when
    /// the first message's role is not `system`).
    fn parse(template: &str) -> Option<Self> {
        if !template.contains(Self::START) || !template.contains(Self::END) {
            return None;
        }
        let conditional = template.contains("!= 'system'") || template.contains("!= \"system\"");
        let default_system = conditional
            .then(|| {
                let head = format!("{}system", Self::START);
                let at = template.find(&head)? + head.len();
                let rest = &template[at..];
                let rest = rest
                    .strip_prefix("\\n")
                    .or_else(|| rest.strip_prefix('\n'))?;
                let end = rest.find(Self::END)?;
                Some(rest[..end].to_owned())
            })
            .flatten();
        Some(Self { default_system })
    }

    fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> String {
        let mut out = String::new();
        let mut turn = |role: &str, content: &str| {
            out.push_str(Self::START);
            out.push_str(role);
            out.push('\n');
            out.push_str(content);
            out.push_str(Self::END);
            out.push('\n');
        };
        for (i, m) in messages.iter().enumerate() {
            if i == 0 && m.role != "system" {
                if let Some(system) = &self.default_system {
                    turn("system", system);
                }
            }
            turn(&m.role, &m.content);
        }
        if add_generation_prompt {
            out.push_str(Self::START);
            out.push_str("assistant\n");
        }
        out
    }
}

/// Marks a byte whose alphabet character is neither a token nor part of any
/// merge: it can never merge, and is emitted through the byte fallback.
const NO_SYMBOL: u32 = u32::MAX;

/// GPT-2's byte alphabet: printable Latin-1 bytes stand for themselves, the
/// other 68 bytes (controls, space, DEL, NBSP, soft hyphen) are moved to
/// U+0100 and up, in byte order.
fn byte_alphabet() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut moved = 0u32;
    for (b, slot) in (0u32..).zip(table.iter_mut()) {
        let printable =
            (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
        let cp = if printable {
            b
        } else {
            moved += 1;
            0xFF + moved
        };
        // Every value here is below U+0144, a valid scalar value.
        *slot = char::from_u32(cp).unwrap_or(char::REPLACEMENT_CHARACTER);
    }
    table
}

/// Code points the byte alphabet uses: U+0021 to U+0143.
const ALPHABET_SPAN: usize = 0x144;

/// The inverse of [`byte_alphabet`], indexed by code point.
fn alphabet_inverse(alphabet: &[char; 256]) -> [Option<u8>; ALPHABET_SPAN] {
    let mut inverse = [None; ALPHABET_SPAN];
    for (b, &c) in (0u8..=255).zip(alphabet) {
        if let Some(slot) = inverse.get_mut(c as usize) {
            *slot = Some(b);
        }
    }
    inverse
}

/// The byte an alphabet character stands for.
fn alphabet_byte(c: char, inverse: &[Option<u8>; ALPHABET_SPAN]) -> Option<u8> {
    inverse.get(c as usize).copied().flatten()
}

/// Character classes of the GPT-2 pattern, as llama.cpp defines them.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Class {
    Letter,
    Number,
    Whitespace,
    Other,
    /// Past the end of the piece being split.
    End,
}

fn class_of(c: char) -> Class {
    if c.is_whitespace() {
        Class::Whitespace
    } else if c.is_numeric() {
        Class::Number
    } else if is_letter(c) {
        Class::Letter
    } else {
        Class::Other
    }
}

fn is_letter(c: char) -> bool {
    matches!(
        get_general_category(c),
        GeneralCategory::UppercaseLetter
            | GeneralCategory::LowercaseLetter
            | GeneralCategory::TitlecaseLetter
            | GeneralCategory::ModifierLetter
            | GeneralCategory::OtherLetter
    )
}

/// Splits `chars[lo..hi]` by the GPT-2 pattern, appending the end index of
/// each word to `ends`.
fn split_gpt2(chars: &[char], lo: usize, hi: usize, ends: &mut Vec<usize>) {
    let at = |i: usize| if i < hi { Some(chars[i]) } else { None };
    let class = |i: usize| at(i).map_or(Class::End, class_of);
    let mut pos = lo;
    while pos < hi {
        let c = chars[pos];

        // 's 't 'm 'd 're 've 'll (case-sensitive).
        if c == '\'' {
            match (at(pos + 1), at(pos + 2)) {
                (Some('s' | 't' | 'm' | 'd'), _) => {
                    pos += 2;
                    ends.push(pos);
                    continue;
                }
                (Some('r'), Some('e')) | (Some('v'), Some('e')) | (Some('l'), Some('l')) => {
                    pos += 3;
                    ends.push(pos);
                    continue;
                }
                _ => {}
            }
        }

        // An optional single space followed by a run of one class.
        let lead = if c == ' ' { class(pos + 1) } else { class(pos) };
        if matches!(lead, Class::Letter | Class::Number | Class::Other) {
            if c == ' ' {
                pos += 1;
            }
            while class(pos) == lead {
                pos += 1;
            }
            ends.push(pos);
            continue;
        }

        // Whitespace: a run followed by more text leaves its last character
        // to the next word (`\s+(?!\S)`); at the end of the piece it is taken
        // whole (`\s+`).
        let mut n = 0;
        while class(pos + n) == Class::Whitespace {
            n += 1;
        }
        if n > 1 && pos + n < hi {
            pos += n - 1;
        } else {
            pos += n.max(1);
        }
        ends.push(pos);
    }
}

/// Splits `text` into words, as byte ranges.
fn pre_tokenize(pre: PreTokenizer, text: &str) -> Vec<(usize, usize)> {
    let mut chars = Vec::with_capacity(text.len());
    let mut offsets = Vec::with_capacity(text.len() + 1);
    for (i, c) in text.char_indices() {
        chars.push(c);
        offsets.push(i);
    }
    offsets.push(text.len());

    let mut ends = Vec::new();
    match pre {
        PreTokenizer::Gpt2 => split_gpt2(&chars, 0, chars.len(), &mut ends),
        PreTokenizer::Gpt2IsolatedDigits => {
            let mut start = 0;
            for (i, c) in chars.iter().enumerate() {
                if c.is_numeric() {
                    split_gpt2(&chars, start, i, &mut ends);
                    ends.push(i + 1);
                    start = i + 1;
                }
            }
            split_gpt2(&chars, start, chars.len(), &mut ends);
        }
    }

    let mut words = Vec::with_capacity(ends.len());
    let mut prev = 0;
    for end in ends {
        if end > prev {
            words.push((offsets[prev], offsets[end]));
        }
        prev = end;
    }
    words
}

/// A stretch of the input during special-token partitioning.
#[derive(Clone, Copy)]
enum Fragment {
    Text(usize, usize),
    Token(u32),
}

/// One BPE symbol of a word: a range of the word's bytes.
#[derive(Clone, Copy)]
struct Symbol {
    id: u32,
    start: usize,
    end: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

/// A byte-level BPE tokenizer with its vocabulary, merges and chat template.
#[derive(Clone)]
pub struct Tokenizer {
    /// Vocabulary texts, by id (in GPT-2's byte alphabet for normal tokens).
    tokens: Vec<String>,
    types: Vec<TokenType>,
    token_to_id: HashMap<String, u32>,
    /// (left symbol, right symbol) -> (rank, merged symbol).
    merges: HashMap<(u32, u32), (u32, u32)>,
    /// Symbol of each byte's alphabet character, or [`NO_SYMBOL`].
    byte_symbols: [u32; 256],
    /// Special tokens, longest text first.
    specials: Vec<u32>,
    /// Decoded bytes of every token, concatenated; token `i` is
    /// `piece_bytes[piece_starts[i]..piece_starts[i + 1]]`.
    piece_bytes: Vec<u8>,
    piece_starts: Vec<usize>,
    pre: PreTokenizer,
    bos: Option<u32>,
    eos: Option<u32>,
    unk: Option<u32>,
    pad: Option<u32>,
    add_bos: bool,
    chat: Option<ChatMl>,
    chat_template: Option<String>,
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.tokens.len())
            .field("merges", &self.merges.len())
            .field("specials", &self.specials.len())
            .field("pre", &self.pre)
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .finish()
    }
}

impl Tokenizer {
    /// Builds the tokenizer from a GGUF file's `tokenizer.*` metadata.
    ///
    /// Requires `tokenizer.ggml.model = "gpt2"`, a known
    /// `tokenizer.ggml.pre`, the token list and the merges. Token types
    /// default to normal when absent; special ids that are absent or out of
    /// range are `None`.
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self, TokenizerError> {
        let model = gguf.get_str(KEY_MODEL)?;
        if model != "gpt2" {
            return Err(TokenizerError::UnsupportedModel(model.to_owned()));
        }
        let pre_name = match gguf.metadata(KEY_PRE) {
            None => "default",
            Some(_) => gguf.get_str(KEY_PRE)?,
        };
        let pre = PreTokenizer::from_name(pre_name)
            .ok_or_else(|| TokenizerError::UnsupportedPreTokenizer(pre_name.to_owned()))?;

        let raw_tokens = gguf.get_str_array(KEY_TOKENS)?;
        if raw_tokens.is_empty() {
            return Err(TokenizerError::EmptyVocabulary);
        }
        let n_vocab = u32::try_from(raw_tokens.len())
            .ok()
            .filter(|&n| n < NO_SYMBOL)
            .ok_or(TokenizerError::VocabularyTooLarge(raw_tokens.len()))?;

        let mut types = match gguf.metadata(KEY_TOKEN_TYPE) {
            None => vec![TokenType::Normal; raw_tokens.len()],
            Some(_) => {
                let ids = gguf.get_i32_array(KEY_TOKEN_TYPE)?;
                if ids.len() < raw_tokens.len() {
                    return Err(TokenizerError::TokenTypeCount {
                        tokens: raw_tokens.len(),
                        types: ids.len(),
                    });
                }
                ids[..raw_tokens.len()]
                    .iter()
                    .map(|&t| TokenType::from_id(t))
                    .collect()
            }
        };

        // Empty texts would match everywhere; llama.cpp renames them.
        let tokens: Vec<String> = raw_tokens
            .iter()
            .enumerate()
            .map(|(i, t)| {
                if t.is_empty() {
                    format!("[EMPTY_{i}]")
                } else {
                    t.clone()
                }
            })
            .collect();
        let mut token_to_id = HashMap::with_capacity(tokens.len());
        for (id, t) in (0u32..).zip(&tokens) {
            // A repeated text maps to its last id, as in llama.cpp.
            token_to_id.insert(t.clone(), id);
        }
        for (t, ty) in tokens.iter().zip(types.iter_mut()) {
            if END_OF_GENERATION_TEXTS.contains(&t.as_str()) && *ty != TokenType::Control {
                *ty = TokenType::Control;
            }
        }

        // Merges may name strings that are not vocabulary texts; they get
        // symbol ids after the vocabulary so that BPE can still apply them.
        let mut extra_symbols: HashMap<String, u32> = HashMap::new();
        let intern = |s: &str, extra: &mut HashMap<String, u32>| -> Option<u32> {
            if let Some(&id) = token_to_id.get(s) {
                return Some(id);
            }
            if let Some(&id) = extra.get(s) {
                return Some(id);
            }
            let id = n_vocab.checked_add(u32::try_from(extra.len()).ok()?)?;
            (id < NO_SYMBOL).then(|| {
                extra.insert(s.to_owned(), id);
                id
            })
        };
        let merge_list = gguf.get_str_array(KEY_MERGES)?;
        let mut merges = HashMap::with_capacity(merge_list.len());
        for (rank, line) in (0u32..).zip(merge_list) {
            // The separator is the first space after the first byte, so that
            // a left part may itself start with a space.
            let Some(sep) = line
                .as_bytes()
                .get(1..)
                .and_then(|rest| rest.iter().position(|&b| b == b' '))
                .map(|p| p + 1)
            else {
                continue;
            };
            let (left, right) = (&line[..sep], &line[sep + 1..]);
            let merged = format!("{left}{right}");
            let (Some(l), Some(r), Some(m)) = (
                intern(left, &mut extra_symbols),
                intern(right, &mut extra_symbols),
                intern(&merged, &mut extra_symbols),
            ) else {
                continue;
            };
            // The first occurrence of a pair keeps its rank.
            merges.entry((l, r)).or_insert((rank, m));
        }

        let alphabet = byte_alphabet();
        let mut byte_symbols = [NO_SYMBOL; 256];
        for (slot, c) in byte_symbols.iter_mut().zip(alphabet) {
            let s = c.to_string();
            if let Some(&id) = token_to_id.get(&s).or_else(|| extra_symbols.get(&s)) {
                *slot = id;
            }
        }

        let inverse = alphabet_inverse(&alphabet);
        let mut specials: Vec<u32> = (0u32..)
            .zip(&types)
            .filter(|(_, t)| t.is_special())
            .map(|(id, _)| id)
            .collect();
        specials.sort_by_key(|&id| Reverse(tokens[id as usize].len()));

        let mut piece_bytes = Vec::new();
        let mut piece_starts = Vec::with_capacity(tokens.len() + 1);
        for (text, ty) in tokens.iter().zip(&types) {
            piece_starts.push(piece_bytes.len());
            decode_piece(text, *ty, &inverse, &mut piece_bytes);
        }
        piece_starts.push(piece_bytes.len());

        let special_id = |key: &str| -> Option<u32> {
            gguf.metadata(key)
                .and_then(|v| v.as_u32())
                .filter(|&id| id < n_vocab)
        };
        let add_bos = gguf
            .metadata(KEY_ADD_BOS)
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        let chat_template = gguf
            .metadata(KEY_CHAT_TEMPLATE)
            .and_then(|v| v.as_str())
            .map(str::to_owned);
        let chat = chat_template.as_deref().and_then(ChatMl::parse);

        Ok(Self {
            bos: special_id(KEY_BOS),
            eos: special_id(KEY_EOS),
            unk: special_id(KEY_UNK),
            pad: special_id(KEY_PAD),
            tokens,
            types,
            token_to_id,
            merges,
            byte_symbols,
            specials,
            piece_bytes,
            piece_starts,
            pre,
            add_bos,
            chat,
            chat_template,
        })
    }

    /// Number of tokens in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// Number of usable BPE merges.
    pub fn merge_count(&self) -> usize {
        self.merges.len()
    }

    /// The beginning-of-sequence token, if the file names a valid one.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    /// The end-of-sequence token, if the file names a valid one.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    /// The unknown token, if the file names a valid one.
    pub fn unknown_id(&self) -> Option<u32> {
        self.unk
    }

    /// The padding token, if the file names a valid one.
    pub fn padding_id(&self) -> Option<u32> {
        self.pad
    }

    /// Whether the model expects prompts to start with the BOS token
    /// (`tokenizer.ggml.add_bos_token`, false when absent). [`Tokenizer::encode`]
    /// never adds it.
    pub fn add_bos_token(&self) -> bool {
        self.add_bos
    }

    /// Whether `id` ends generation: the EOS token, or a control token whose
    /// text is a known end-of-turn marker (`<|im_end|>`, `<|endoftext|>`,
    /// `<|eot_id|>`, ...). llama.cpp additionally stops on the
    /// fill-in-the-middle repository, file-separator and padding tokens it
    /// detects by name; this method does not.
    pub fn is_eog(&self, id: u32) -> bool {
        Some(id) == self.eos
            || (self.token_type(id) == Some(TokenType::Control)
                && self
                    .tokens
                    .get(id as usize)
                    .is_some_and(|t| END_OF_GENERATION_TEXTS.contains(&t.as_str())))
    }

    /// The type of token `id` (`None` when out of range).
    pub fn token_type(&self, id: u32) -> Option<TokenType> {
        self.types.get(id as usize).copied()
    }

    /// Whether `id` is a special token: one that [`Tokenizer::encode`] cuts
    /// out of text verbatim and that decodes to its literal text
    /// (CONTROL, USER_DEFINED or UNKNOWN).
    pub fn is_special(&self, id: u32) -> bool {
        self.token_type(id).is_some_and(TokenType::is_special)
    }

    /// The id of the token whose vocabulary text is `text`, as stored in the
    /// file: `"<|im_start|>"`, or `"Ġthe"` for " the" (normal tokens are
    /// spelt in GPT-2's byte alphabet).
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.token_to_id.get(text).copied()
    }

    /// The vocabulary text of token `id`, as stored in the file.
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    /// The bytes token `id` stands for: the decoded bytes of a normal token,
    /// the literal text of a special one, nothing for unused or undefined
    /// tokens. A single token may hold part of a UTF-8 character.
    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        let i = id as usize;
        let start = *self.piece_starts.get(i)?;
        let end = *self.piece_starts.get(i + 1)?;
        self.piece_bytes.get(start..end)
    }

    /// The text token `id` stands for, for display (partial UTF-8 characters
    /// become U+FFFD).
    pub fn token_str(&self, id: u32) -> Option<String> {
        self.token_bytes(id)
            .map(|b| String::from_utf8_lossy(b).into_owned())
    }

    /// The bytes of a token sequence. Ids outside the vocabulary are skipped.
    pub fn decode_bytes(&self, ids: &[u32]) -> Vec<u8> {
        let mut out = Vec::new();
        for &id in ids {
            if let Some(b) = self.token_bytes(id) {
                out.extend_from_slice(b);
            }
        }
        out
    }

    /// The text of a token sequence: the concatenated bytes of its tokens
    /// (special tokens as their literal text), with invalid UTF-8 replaced by
    /// U+FFFD. Ids outside the vocabulary are skipped.
    pub fn decode(&self, ids: &[u32]) -> String {
        String::from_utf8_lossy(&self.decode_bytes(ids)).into_owned()
    }

    /// Tokenizes `text`, turning the texts of special tokens (such as
    /// `<|im_start|>`) into those tokens. No BOS token is added.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        self.encode_with(text, true)
    }

    /// Tokenizes `text` as plain text: the texts of control tokens are
    /// tokenized like any other text (user-defined tokens are still
    /// recognized, as in llama.cpp). No BOS token is added.
    pub fn encode_plain(&self, text: &str) -> Vec<u32> {
        self.encode_with(text, false)
    }

    fn encode_with(&self, text: &str, parse_special: bool) -> Vec<u32> {
        let mut out = Vec::new();
        let mut heap = BinaryHeap::new();
        let mut symbols = Vec::new();
        for fragment in self.partition(text, parse_special) {
            match fragment {
                Fragment::Token(id) => out.push(id),
                Fragment::Text(start, end) => {
                    let piece = &text[start..end];
                    for (s, e) in pre_tokenize(self.pre, piece) {
                        self.bpe_word(&piece.as_bytes()[s..e], &mut symbols, &mut heap, &mut out);
                    }
                }
            }
        }
        out
    }

    /// Cuts special tokens out of `text`, longest first.
    fn partition(&self, text: &str, parse_special: bool) -> Vec<Fragment> {
        let mut fragments = Vec::new();
        if !text.is_empty() {
            fragments.push(Fragment::Text(0, text.len()));
        }
        for &id in &self.specials {
            let ty = self.types[id as usize];
            if !parse_special && matches!(ty, TokenType::Control | TokenType::Unknown) {
                continue;
            }
            let needle = self.tokens[id as usize].as_str();
            let mut next = Vec::with_capacity(fragments.len());
            for fragment in fragments {
                let Fragment::Text(mut start, end) = fragment else {
                    next.push(fragment);
                    continue;
                };
                while let Some(found) = text[start..end].find(needle) {
                    let at = start + found;
                    if at > start {
                        next.push(Fragment::Text(start, at));
                    }
                    next.push(Fragment::Token(id));
                    start = at + needle.len();
                }
                if start < end {
                    next.push(Fragment::Text(start, end));
                }
            }
            fragments = next;
        }
        fragments
    }

    /// Byte-level BPE of one word, appending its tokens to `out`.
    fn bpe_word(
        &self,
        word: &[u8],
        symbols: &mut Vec<Symbol>,
        heap: &mut BinaryHeap<Reverse<(u32, usize, usize)>>,
        out: &mut Vec<u32>,
    ) {
        symbols.clear();
        heap.clear();
        let n = word.len();
        for (i, &b) in word.iter().enumerate() {
            symbols.push(Symbol {
                id: self.byte_symbols[b as usize],
                start: i,
                end: i + 1,
                prev: i.checked_sub(1),
                next: (i + 1 < n).then_some(i + 1),
            });
        }
        let push_pair = |symbols: &[Symbol],
                         heap: &mut BinaryHeap<Reverse<(u32, usize, usize)>>,
                         left: usize| {
            let l = symbols[left];
            if let Some(right) = l.next {
                if let Some(&(rank, _)) = self.merges.get(&(l.id, symbols[right].id)) {
                    heap.push(Reverse((rank, left, right)));
                }
            }
        };
        for i in 0..n {
            push_pair(symbols, heap, i);
        }

        while let Some(Reverse((rank, left, right))) = heap.pop() {
            let (l, r) = (symbols[left], symbols[right]);
            // Skip pairs made stale by an earlier merge: one side was
            // absorbed, or grew into a different symbol.
            if l.end == l.start || r.end == r.start || l.next != Some(right) {
                continue;
            }
            let Some(&(current_rank, merged)) = self.merges.get(&(l.id, r.id)) else {
                continue;
            };
            if current_rank != rank {
                continue;
            }
            symbols[left].id = merged;
            symbols[left].end = r.end;
            symbols[left].next = r.next;
            symbols[right].end = symbols[right].start;
            if let Some(after) = r.next {
                symbols[after].prev = Some(left);
            }
            if let Some(before) = l.prev {
                push_pair(symbols, heap, before);
            }
            push_pair(symbols, heap, left);
        }

        let n_vocab = self.tokens.len() as u32;
        let mut cur = (n > 0).then_some(0);
        while let Some(i) = cur {
            let s = symbols[i];
            if s.id < n_vocab {
                out.push(s.id);
            } else {
                // A symbol that is not a token falls back to the tokens of its
                // single bytes; only printable ASCII bytes spell a one-byte
                // vocabulary text, the others are dropped (as in llama.cpp).
                for &b in &word[s.start..s.end] {
                    if (0x21..=0x7E).contains(&b) {
                        if let Some(&id) = self.token_to_id.get(&char::from(b).to_string()) {
                            out.push(id);
                        }
                    }
                }
            }
            cur = s.next;
        }
    }

    /// The raw `tokenizer.chat_template` of the file, if any.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// The system message the chat template inserts when a chat does not
    /// start with one, if it has one.
    pub fn default_system_message(&self) -> Option<&str> {
        self.chat.as_ref()?.default_system.as_deref()
    }

    /// Renders a chat with the model's ChatML template:
    /// `<|im_start|>{role}\n{content}<|im_end|>\n` per message, preceded by
    /// the template's default system message when the first message is not a
    /// system one, and followed by `<|im_start|>assistant\n` when
    /// `add_generation_prompt` is set. The result is meant for
    /// [`Tokenizer::encode`], which turns the markers into single tokens.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, TokenizerError> {
        match (&self.chat, &self.chat_template) {
            (Some(chat), _) => Ok(chat.render(messages, add_generation_prompt)),
            (None, Some(_)) => Err(TokenizerError::UnsupportedChatTemplate),
            (None, None) => Err(TokenizerError::NoChatTemplate),
        }
    }
}

/// Appends the bytes token text `text` of type `ty` stands for.
fn decode_piece(
    text: &str,
    ty: TokenType,
    inverse: &[Option<u8>; ALPHABET_SPAN],
    out: &mut Vec<u8>,
) {
    match ty {
        TokenType::Control | TokenType::UserDefined | TokenType::Unknown => {
            out.extend_from_slice(text.as_bytes())
        }
        TokenType::Normal => {
            for c in text.chars() {
                match alphabet_byte(c, inverse) {
                    Some(b) => out.push(b),
                    // Outside the byte alphabet: kept as written (llama.cpp
                    // prints an "[UNK_BYTE_..]" marker instead).
                    None => {
                        let mut buf = [0u8; 4];
                        out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                    }
                }
            }
        }
        TokenType::Byte => {
            let byte = text
                .strip_prefix("<0x")
                .and_then(|h| h.strip_suffix('>'))
                .and_then(|h| u8::from_str_radix(h, 16).ok());
            match byte {
                Some(b) => out.push(b),
                None => out.extend_from_slice(text.as_bytes()),
            }
        }
        // llama.cpp renders these as nothing.
        TokenType::Unused | TokenType::Undefined => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use model_tracer_test_support::gguf::{GgufWriter, MetadataArray, MetadataValue};

    fn strings(v: &[&str]) -> MetadataValue {
        MetadataValue::Array(MetadataArray::String(
            v.iter().map(|s| s.to_string()).collect(),
        ))
    }

    /// Metadata of a byte-level vocabulary: the 256 alphabet characters
    /// (token `b` stands for byte `b`), then `extra` tokens with their types,
    /// and `merges`.
    fn metadata(extra: &[(&str, i32)], merges: &[&str]) -> Vec<(&'static str, MetadataValue)> {
        let mut tokens: Vec<String> = byte_alphabet().iter().map(|c| c.to_string()).collect();
        let mut types = vec![1; 256];
        for (t, ty) in extra {
            tokens.push(t.to_string());
            types.push(*ty);
        }
        vec![
            (KEY_MODEL, MetadataValue::String("gpt2".into())),
            (KEY_PRE, MetadataValue::String("smollm".into())),
            (
                KEY_TOKENS,
                MetadataValue::Array(MetadataArray::String(tokens)),
            ),
            (
                KEY_TOKEN_TYPE,
                MetadataValue::Array(MetadataArray::I32(types)),
            ),
            (KEY_MERGES, strings(merges)),
        ]
    }

    fn build(meta: Vec<(&str, MetadataValue)>) -> Result<Tokenizer, TokenizerError> {
        let mut w = GgufWriter::new();
        for (k, v) in meta {
            w.add_metadata(k, v);
        }
        let file = GgufFile::from_bytes(w.to_bytes()).expect("synthetic file parses");
        Tokenizer::from_gguf(&file)
    }

    fn synthetic(
        extra: &[(&str, i32)],
        merges: &[&str],
        edit: impl FnOnce(&mut Vec<(&'static str, MetadataValue)>),
    ) -> Result<Tokenizer, TokenizerError> {
        let mut meta = metadata(extra, merges);
        edit(&mut meta);
        build(meta)
    }

    fn set(meta: &mut Vec<(&'static str, MetadataValue)>, key: &'static str, v: MetadataValue) {
        meta.retain(|(k, _)| *k != key);
        meta.push((key, v));
    }

    fn id(tok: &Tokenizer, text: &str) -> u32 {
        tok.token_id(text).unwrap()
    }

    #[test]
    fn merges_apply_by_rank_not_by_position() {
        let extra = [("ab", 1), ("bc", 1)];
        let tok = synthetic(&extra, &["b c", "a b"], |_| {}).unwrap();
        assert_eq!(tok.encode("abc"), [id(&tok, "a"), id(&tok, "bc")]);
        let tok = synthetic(&extra, &["a b", "b c"], |_| {}).unwrap();
        assert_eq!(tok.encode("abc"), [id(&tok, "ab"), id(&tok, "c")]);
        // Overlapping candidates of equal rank: the leftmost pair wins.
        let tok = synthetic(&[("aa", 1)], &["a a"], |_| {}).unwrap();
        assert_eq!(tok.encode("aaa"), [id(&tok, "aa"), id(&tok, "a")]);
        assert_eq!(tok.encode("aaaa"), [id(&tok, "aa"), id(&tok, "aa")]);
    }

    #[test]
    fn merges_through_strings_missing_from_the_vocabulary() {
        // "ab" is only an intermediate: it is not a token.
        let tok = synthetic(&[("abc", 1)], &["a b", "ab c"], |_| {}).unwrap();
        assert_eq!(tok.encode("abc"), [id(&tok, "abc")]);
        // Left as "ab", it falls back to its bytes' tokens.
        assert_eq!(tok.encode("ab"), [id(&tok, "a"), id(&tok, "b")]);
    }

    #[test]
    fn specials_are_cut_longest_first_and_user_defined_survive_plain_mode() {
        let extra = [("<a>", 3), ("<a><b>", 3), ("[U]", 4)];
        let tok = synthetic(&extra, &[], |_| {}).unwrap();
        let (a, ab, u) = (id(&tok, "<a>"), id(&tok, "<a><b>"), id(&tok, "[U]"));
        assert_eq!(tok.encode("<a><b><a>"), [ab, a]);
        assert_eq!(tok.encode("x[U]<a>"), [id(&tok, "x"), u, a]);
        let plain = tok.encode_plain("x[U]<a>");
        assert_eq!(plain[..2], [id(&tok, "x"), u]);
        assert!(!plain.contains(&a));
        assert_eq!(tok.decode(&plain), "x[U]<a>");
        assert!(tok.is_special(u) && tok.is_special(a));
        assert!(tok.encode("").is_empty());
    }

    #[test]
    fn token_types_shape_decoding() {
        let extra = [
            ("<0x41>", 6),
            ("<unused0>", 5),
            ("<|im_end|>", 1),
            ("<ctl>", 3),
        ];
        let tok = synthetic(&extra, &[], |m| {
            set(m, KEY_EOS, MetadataValue::U32(1_000_000));
            set(m, KEY_BOS, MetadataValue::U32(33));
        })
        .unwrap();
        assert_eq!(tok.token_bytes(id(&tok, "<0x41>")), Some(&b"A"[..]));
        assert_eq!(tok.token_bytes(id(&tok, "<unused0>")), Some(&b""[..]));
        assert_eq!(tok.token_bytes(id(&tok, "<ctl>")), Some(&b"<ctl>"[..]));
        assert_eq!(tok.token_bytes(id(&tok, "Ġ")), Some(&b" "[..]));
        // End-of-turn texts are control tokens whatever the file says.
        let im_end = id(&tok, "<|im_end|>");
        assert_eq!(tok.token_type(im_end), Some(TokenType::Control));
        assert!(tok.is_eog(im_end));
        assert_eq!(tok.encode("<|im_end|>"), [im_end]);
        assert_eq!(tok.eos_id(), None, "out-of-range id is dropped");
        assert_eq!(tok.bos_id(), Some(id(&tok, "!")));
    }

    #[test]
    fn unusable_metadata_is_reported() {
        let s = |v: &str| MetadataValue::String(v.into());
        let e = synthetic(&[], &[], |m| set(m, KEY_MODEL, s("llama"))).unwrap_err();
        assert!(
            matches!(e, TokenizerError::UnsupportedModel(ref m) if m == "llama"),
            "{e}"
        );
        let e = synthetic(&[], &[], |m| set(m, KEY_PRE, s("qwen2"))).unwrap_err();
        assert!(matches!(e, TokenizerError::UnsupportedPreTokenizer(ref p) if p == "qwen2"));
        let e = synthetic(&[], &[], |m| m.retain(|(k, _)| *k != KEY_MERGES)).unwrap_err();
        assert!(matches!(e, TokenizerError::Gguf(GgufError::MissingKey(ref k)) if k == KEY_MERGES));
        let e = synthetic(&[], &[], |m| set(m, KEY_TOKENS, strings(&[]))).unwrap_err();
        assert!(matches!(e, TokenizerError::EmptyVocabulary));
        let e = synthetic(&[], &[], |m| {
            set(
                m,
                KEY_TOKEN_TYPE,
                MetadataValue::Array(MetadataArray::I32(vec![1; 10])),
            )
        })
        .unwrap_err();
        assert!(matches!(
            e,
            TokenizerError::TokenTypeCount {
                tokens: 256,
                types: 10
            }
        ));
        let e = synthetic(&[], &[], |m| set(m, KEY_TOKENS, MetadataValue::U32(3))).unwrap_err();
        assert!(e.to_string().contains(KEY_TOKENS), "{e}");

        // Without token types every token is normal.
        let tok = synthetic(&[("<x>", 3)], &[], |m| {
            m.retain(|(k, _)| *k != KEY_TOKEN_TYPE)
        })
        .unwrap();
        assert!(!tok.is_special(id(&tok, "<x>")));

        let tok = synthetic(&[], &[], |_| {}).unwrap();
        assert!(matches!(
            tok.apply_chat_template(&[], true),
            Err(TokenizerError::NoChatTemplate)
        ));
        let tok = synthetic(&[], &[], |m| set(m, KEY_CHAT_TEMPLATE, s("{{ x }}"))).unwrap();
        assert!(matches!(
            tok.apply_chat_template(&[], true),
            Err(TokenizerError::UnsupportedChatTemplate)
        ));
    }

    fn words(pre: PreTokenizer, text: &str) -> Vec<&str> {
        pre_tokenize(pre, text)
            .into_iter()
            .map(|(s, e)| &text[s..e])
            .collect()
    }

    #[test]
    fn gpt2_pattern_splits_like_the_reference_matcher() {
        let g = PreTokenizer::Gpt2;
        assert_eq!(words(g, "Hello world"), ["Hello", " world"]);
        assert_eq!(
            words(g, "I'm don't we'll"),
            ["I", "'m", " don", "'t", " we", "'ll"]
        );
        assert_eq!(
            words(g, "a  b\n\n c   "),
            ["a", " ", " b", "\n\n", " c", "   "]
        );
        assert_eq!(words(g, "x\n\ny"), ["x", "\n", "\n", "y"]);
        assert_eq!(
            words(g, "  multiple   spaces"),
            [" ", " multiple", "  ", " spaces"]
        );
        assert_eq!(words(g, "ab!!?  ¿ok"), ["ab", "!!?", " ", " ¿", "ok"]);
        assert_eq!(words(g, "in 2024,"), ["in", " 2024", ","]);
        assert_eq!(words(g, "'S 'x '"), ["'", "S", " '", "x", " '"]);
        assert_eq!(words(g, "\tword"), ["\t", "word"]);
        assert_eq!(words(g, "naïve café 世界"), ["naïve", " café", " 世界"]);
        assert_eq!(words(g, "a\u{3000}b"), ["a", "\u{3000}", "b"]);
        assert!(words(g, "").is_empty());
    }

    #[test]
    fn smollm_isolates_every_digit_before_the_pattern() {
        let s = PreTokenizer::Gpt2IsolatedDigits;
        assert_eq!(
            words(s, "In 2024, 12 people"),
            ["In", " ", "2", "0", "2", "4", ",", " ", "1", "2", " people"]
        );
        assert_eq!(words(s, "x²³ ½"), ["x", "²", "³", " ", "½"]);
        assert_eq!(words(s, "٣ a"), ["٣", " a"]);
    }

    #[test]
    fn byte_alphabet_is_a_bijection_matching_gpt2() {
        let a = byte_alphabet();
        assert_eq!(a[b' ' as usize], 'Ġ');
        assert_eq!(a[b'\n' as usize], 'Ċ');
        assert_eq!(a[b'!' as usize], '!');
        assert_eq!(a[0xAD], 'Ń');
        assert_eq!(a[0xA0], 'ł');
        assert_eq!(a[0], 'Ā');
        let mut seen: Vec<char> = a.to_vec();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), 256);
        let inv = alphabet_inverse(&a);
        for b in 0..=255u8 {
            assert_eq!(alphabet_byte(a[b as usize], &inv), Some(b));
        }
        assert_eq!(alphabet_byte('€', &inv), None);
        assert_eq!(alphabet_byte(' ', &inv), None);
    }

    #[test]
    fn chatml_template_default_system_is_extracted() {
        let t = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nBe brief<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}";
        let chat = ChatMl::parse(t).unwrap();
        assert_eq!(chat.default_system.as_deref(), Some("Be brief"));
        let out = chat.render(&[ChatMessage::user("hi")], true);
        assert_eq!(
            out,
            "<|im_start|>system\nBe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
        let out = chat.render(&[ChatMessage::system("S"), ChatMessage::user("u")], false);
        assert_eq!(
            out,
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nu<|im_end|>\n"
        );
        assert!(ChatMl::parse("{{ messages }}").is_none());
    }
}
