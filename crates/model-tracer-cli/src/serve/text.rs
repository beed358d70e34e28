//! The generated text as it grows: the bytes of each new token, the stop
//! strings found in them, and the part that may be sent already. A stream
//! holds back the end of the text while it may still become the start of
//! a stop string, and the bytes of a character not yet complete.

/// What a new token did to the text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// Text that may be sent now (possibly empty).
    Text(String),
    /// A stop string appeared: the text before it that was not sent yet;
    /// the generation is over.
    Stopped(String),
}

/// The text of one generation.
#[derive(Debug, Clone, Default)]
pub struct TextState {
    bytes: Vec<u8>,
    sent: usize,
    stops: Vec<Vec<u8>>,
    longest_stop: usize,
}

impl TextState {
    /// A text that ends at the first of `stops` (none empty).
    pub fn new(stops: &[String]) -> Self {
        let stops: Vec<Vec<u8>> = stops
            .iter()
            .filter(|s| !s.is_empty())
            .map(|s| s.as_bytes().to_vec())
            .collect();
        let longest_stop = stops.iter().map(Vec::len).max().unwrap_or(0);
        Self {
            bytes: Vec::new(),
            sent: 0,
            stops,
            longest_stop,
        }
    }

    /// Appends the bytes of a token.
    pub fn push(&mut self, piece: &[u8]) -> Progress {
        let searched_from = self.sent.saturating_sub(self.longest_stop);
        self.bytes.extend_from_slice(piece);
        if let Some(at) = self.first_stop(searched_from) {
            let text = String::from_utf8_lossy(&self.bytes[self.sent.min(at)..at]).into_owned();
            self.bytes.truncate(at);
            self.sent = at;
            return Progress::Stopped(text);
        }
        let held = self.partial_stop_len();
        let safe = self.bytes.len() - held;
        let ready = self.sent + complete_utf8_len(&self.bytes[self.sent.min(safe)..safe]);
        if ready <= self.sent {
            return Progress::Text(String::new());
        }
        let text = String::from_utf8_lossy(&self.bytes[self.sent..ready]).into_owned();
        self.sent = ready;
        Progress::Text(text)
    }

    /// The rest of the text, held back until now: the generation ended
    /// without a stop string.
    pub fn flush(&mut self) -> String {
        let text = String::from_utf8_lossy(&self.bytes[self.sent..]).into_owned();
        self.sent = self.bytes.len();
        text
    }

    /// The whole text so far (sent or not).
    #[cfg(test)]
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }

    /// Where the earliest stop string starts, searching from `from`.
    fn first_stop(&self, from: usize) -> Option<usize> {
        let hay = &self.bytes[from..];
        self.stops
            .iter()
            .filter_map(|s| hay.windows(s.len()).position(|w| w == s.as_slice()))
            .min()
            .map(|i| from + i)
    }

    /// The length of the longest end of the text that is the start of a
    /// stop string (and so may still become one).
    fn partial_stop_len(&self) -> usize {
        let unsent = self.bytes.len() - self.sent;
        let mut best = 0;
        for s in &self.stops {
            let most = (s.len() - 1).min(unsent);
            for k in (best + 1..=most).rev() {
                if self.bytes.ends_with(&s[..k]) {
                    best = k;
                    break;
                }
            }
        }
        best
    }
}

/// The length of `bytes` without an incomplete UTF-8 character at its end
/// (invalid bytes elsewhere count: they are sent as U+FFFD).
fn complete_utf8_len(bytes: &[u8]) -> usize {
    match std::str::from_utf8(bytes) {
        Ok(_) => bytes.len(),
        Err(e) if e.error_len().is_none() => e.valid_up_to(),
        Err(_) => {
            // An invalid sequence inside, and maybe an incomplete one at
            // the end: look at the last few bytes only.
            let tail = bytes.len().saturating_sub(3);
            (tail..bytes.len())
                .rev()
                .find(|&i| (0xC2..=0xF4).contains(&bytes[i]))
                .filter(|&i| {
                    let need = match bytes[i] {
                        0xF0.. => 4,
                        0xE0.. => 3,
                        _ => 2,
                    };
                    bytes.len() - i < need
                })
                .unwrap_or(bytes.len())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (Vec<String>, Option<String>, String) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut t = TextState::new(&stops);
        let mut sent = Vec::new();
        for p in pieces {
            match t.push(p.as_bytes()) {
                Progress::Text(s) => sent.push(s),
                Progress::Stopped(s) => return (sent, Some(s), t.text()),
            }
        }
        let rest = t.flush();
        sent.push(rest);
        (sent, None, t.text())
    }

    #[test]
    fn text_without_stops_goes_out_as_it_comes() {
        let (sent, stop, text) = run(&[], &["Hel", "lo", " world"]);
        assert_eq!(sent, ["Hel", "lo", " world", ""]);
        assert_eq!(stop, None);
        assert_eq!(text, "Hello world");
    }

    #[test]
    fn a_stop_string_across_tokens_is_held_back_and_cut() {
        let (sent, stop, text) = run(&["END"], &["ab", "cE", "N", "Dxyz"]);
        assert_eq!(sent, ["ab", "c", ""]);
        assert_eq!(stop.as_deref(), Some(""));
        assert_eq!(text, "abc");
    }

    #[test]
    fn a_false_start_is_released() {
        let (sent, stop, _) = run(&["END"], &["aE", "Nx", "y"]);
        assert_eq!(sent, ["a", "ENx", "y", ""]);
        assert_eq!(stop, None);
    }

    #[test]
    fn the_earliest_of_several_stops_wins() {
        let (sent, stop, text) = run(&["zz", "b"], &["a", "bzz"]);
        assert_eq!(sent, ["a"]);
        assert_eq!(stop.as_deref(), Some(""));
        assert_eq!(text, "a");
        let (_, stop, text) = run(&["\n\n"], &["one\n", "\ntwo"]);
        assert_eq!(stop.as_deref(), Some(""));
        assert_eq!(text, "one");
    }

    #[test]
    fn a_stop_inside_one_token_keeps_the_text_before_it() {
        let (sent, stop, text) = run(&["."], &["Paris. It"]);
        assert!(sent.is_empty());
        assert_eq!(stop.as_deref(), Some("Paris"));
        assert_eq!(text, "Paris");
    }

    #[test]
    fn an_incomplete_character_waits_for_its_last_bytes() {
        let e_acute = "é".as_bytes();
        let mut t = TextState::new(&[]);
        assert_eq!(t.push(&e_acute[..1]), Progress::Text(String::new()));
        assert_eq!(t.push(&e_acute[1..]), Progress::Text("é".into()));
        // invalid bytes are sent as replacement characters, not held
        assert_eq!(t.push(&[0xFF, b'a']), Progress::Text("\u{FFFD}a".into()));
        assert_eq!(
            t.push(&[0xFF, 0xE2, 0x82]),
            Progress::Text("\u{FFFD}".into())
        );
        assert_eq!(t.push(&[0xAC]), Progress::Text("€".into()));
        assert_eq!(t.flush(), "");
    }
}
