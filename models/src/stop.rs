//! Stop strings: end generation when the completion text contains one of the
//! caller's stop sequences, without ever letting a stop string leak — not even
//! partially — into the text that is sent to the client.
//!
//! Streamed text arrives in arbitrary pieces (one detokenized step at a time), so
//! a stop string can straddle several pieces. [`StopMatcher`] therefore holds back
//! the longest tail of the text seen so far that could still be the beginning of
//! a stop string, and releases it as soon as it can no longer start one. When
//! generation ends for another reason (EOS token, max tokens) the caller flushes
//! the held-back text with [`StopMatcher::finish`].
//!
//! OpenAI semantics: the stop string itself is not part of the output, and the
//! output ends right before the earliest occurrence of any stop string.
//!
//! All text handled here is completion text, i.e. PHI: callers keep what they get
//! back inside [`crate::Phi`] and never log it.

use crate::Phi;

/// The result of feeding one piece of text to a [`StopMatcher`].
#[derive(Default, PartialEq, Eq)]
pub struct StopStep {
    /// Text that is now safe to emit (may be empty). PHI.
    pub emit: String,
    /// A stop string was found: generation must end; `emit` holds the text
    /// before it and nothing further will be emitted.
    pub stopped: bool,
}

impl std::fmt::Debug for StopStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StopStep")
            .field("emit", &format_args!("[PHI; {} bytes]", self.emit.len()))
            .field("stopped", &self.stopped)
            .finish()
    }
}

/// Detects stop strings in streamed text, holding back possible prefixes.
pub struct StopMatcher {
    stops: Vec<Phi<String>>,
    /// Text received but not yet emitted (a possible start of a stop string). PHI.
    pending: String,
    stopped: bool,
    /// Emit the stop string itself at the end (vLLM's `include_stop_str_in_output`).
    include_stop: bool,
}

impl std::fmt::Debug for StopMatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StopMatcher")
            .field("stops", &self.stops.len())
            .field("pending_bytes", &self.pending.len())
            .field("stopped", &self.stopped)
            .finish()
    }
}

impl StopMatcher {
    /// Creates a matcher. Empty stop strings are ignored (they would match
    /// immediately and are rejected by request validation anyway).
    pub fn new(stop_strings: Vec<Phi<String>>) -> Self {
        let stops = stop_strings.into_iter().filter(|s| !s.expose().is_empty()).collect();
        StopMatcher { stops, pending: String::new(), stopped: false, include_stop: false }
    }

    /// Ends the output *after* the stop string instead of before it.
    pub fn including_stop_string(mut self, include: bool) -> Self {
        self.include_stop = include;
        self
    }

    /// Whether a stop string has been found.
    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    /// Feeds the next piece of completion text.
    ///
    /// Returns the text that can be emitted now. After a step with
    /// `stopped == true` every further call returns an empty, stopped step.
    pub fn push(&mut self, text: &str) -> StopStep {
        if self.stopped {
            return StopStep { emit: String::new(), stopped: true };
        }
        if self.stops.is_empty() {
            return StopStep { emit: text.to_owned(), stopped: false };
        }
        // Only the pending tail plus the new text can contain a new match: every
        // earlier position was already ruled out (it is not a prefix of a stop).
        self.pending.push_str(text);

        // Earliest full occurrence of any stop string (the longest on a tie).
        let earliest = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.expose().as_str()).map(|at| (at, std::cmp::Reverse(s.expose().len()))))
            .min();
        if let Some((at, std::cmp::Reverse(len))) = earliest {
            self.stopped = true;
            let mut emit = std::mem::take(&mut self.pending);
            emit.truncate(if self.include_stop { at + len } else { at });
            return StopStep { emit, stopped: true };
        }

        // No match: hold back the longest suffix that is a proper prefix of a stop string.
        let hold = self.longest_partial_suffix();
        let split = self.pending.len() - hold;
        let rest = self.pending.split_off(split);
        let emit = std::mem::replace(&mut self.pending, rest);
        StopStep { emit, stopped: false }
    }

    /// Generation ended for another reason: returns the held-back text (it was
    /// not the start of a stop string after all). Empty after a stop.
    pub fn finish(&mut self) -> String {
        if self.stopped {
            self.pending.clear();
            return String::new();
        }
        std::mem::take(&mut self.pending)
    }

    /// Length in bytes of the longest suffix of `pending` that is a proper prefix
    /// of some stop string (0 if none). Always a char boundary: a stop string
    /// starts with a UTF-8 lead byte, so a matching suffix starts at one too.
    fn longest_partial_suffix(&self) -> usize {
        let p = self.pending.as_bytes();
        let mut best = 0;
        for stop in &self.stops {
            let s = stop.expose().as_bytes();
            let max = (s.len() - 1).min(p.len());
            for len in (best + 1..=max).rev() {
                if p[p.len() - len..] == s[..len] && self.pending.is_char_boundary(p.len() - len) {
                    best = len;
                    break;
                }
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matcher(stops: &[&str]) -> StopMatcher {
        StopMatcher::new(stops.iter().map(|s| Phi::new(s.to_string())).collect())
    }

    /// Feeds all pieces, returns (emitted text, stopped).
    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut m = matcher(stops);
        let mut out = String::new();
        for p in pieces {
            let step = m.push(p);
            out.push_str(&step.emit);
            if step.stopped {
                return (out, true);
            }
        }
        out.push_str(&m.finish());
        (out, false)
    }

    #[test]
    fn no_stop_strings_passes_everything_through() {
        let mut m = matcher(&[]);
        assert_eq!(m.push("abc").emit, "abc");
        assert_eq!(m.finish(), "");
        let mut m = matcher(&[""]);
        assert_eq!(m.push("abc").emit, "abc");
    }

    #[test]
    fn stop_in_one_piece_cuts_before_it() {
        assert_eq!(run(&["END"], &["hello END world"]), ("hello ".into(), true));
    }

    #[test]
    fn stop_split_across_many_pieces_never_leaks() {
        let mut m = matcher(&["###"]);
        let s = m.push("abc#");
        assert_eq!(s.emit, "abc");
        assert!(!s.stopped);
        let s = m.push("#");
        assert_eq!(s.emit, "");
        let s = m.push("#tail");
        assert_eq!(s.emit, "");
        assert!(s.stopped);
        assert_eq!(m.push("more"), StopStep { emit: String::new(), stopped: true });
        assert_eq!(m.finish(), "");
    }

    #[test]
    fn every_split_of_the_text_gives_the_same_result() {
        let text = "Patient stable. <|user|> ignored";
        for stops in [&["<|user|>"][..], &["<|us", "stable!"][..], &["le. <"][..]] {
            let whole = run(stops, &[text]);
            // Character by character.
            let chars: Vec<String> = text.chars().map(|c| c.to_string()).collect();
            let refs: Vec<&str> = chars.iter().map(|s| s.as_str()).collect();
            assert_eq!(run(stops, &refs), whole);
            // Every two-piece split.
            for i in 0..=text.len() {
                assert_eq!(run(stops, &[&text[..i], &text[i..]]), whole, "split at {i}");
            }
        }
        assert_eq!(run(&["<|user|>"], &[text]), ("Patient stable. ".into(), true));
    }

    #[test]
    fn partial_prefix_is_released_when_it_does_not_continue() {
        let mut m = matcher(&["STOP"]);
        assert_eq!(m.push("a ST").emit, "a ");
        assert_eq!(m.push("ART").emit, "START");
        assert_eq!(m.push(" ST").emit, " ");
        assert_eq!(m.finish(), "ST");
    }

    #[test]
    fn overlapping_prefixes_find_the_earliest_stop() {
        // "aab" contains "ab" after the held-back "aa".
        assert_eq!(run(&["aab"], &["xa", "a", "ab"]), ("xa".into(), true));
        // Two stop strings; the earlier occurrence wins even if it is listed second.
        assert_eq!(run(&["world", "lo w"], &["hel", "lo", " wor", "ld"]), ("hel".into(), true));
        // A stop string that is a prefix of another.
        assert_eq!(run(&["abcd", "ab"], &["xa", "bcd"]), ("x".into(), true));
        // Self-overlapping stop string.
        assert_eq!(run(&["abab"], &["aba", "bab"]), ("".into(), true));
    }

    #[test]
    fn multi_byte_characters_are_never_split() {
        // Stop string and text share a leading multi-byte char.
        let (out, stopped) = run(&["😀!"], &["café 😀", "😀", "?", "😀", "!"]);
        assert_eq!(out, "café 😀😀?");
        assert!(stopped);
        let mut m = matcher(&["é😀"]);
        let s = m.push("naïvé");
        assert_eq!(s.emit, "naïv");
        assert_eq!(m.finish(), "é");
        // Stop strings beginning with CJK.
        assert_eq!(run(&["患者"], &["血压", "正常患", "者"]), ("血压正常".into(), true));
    }

    #[test]
    fn debug_does_not_print_text() {
        let mut m = matcher(&["secret stop"]);
        let step = m.push("patient name");
        assert!(!format!("{step:?}").contains("patient"));
        assert!(!format!("{m:?}").contains("secret"));
    }
}
