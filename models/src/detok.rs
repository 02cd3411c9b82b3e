//! Streaming detokenization: turn generated token ids into text one token at a
//! time, emitting only complete UTF-8 characters.
//!
//! Decoding each token on its own is wrong in two ways: a multi-byte character
//! may be split over several tokens (byte-level BPE pieces, SentencePiece
//! `<0xXX>` byte-fallback tokens), and SentencePiece decoders drop the leading
//! space of the *first* token of a text, so a token decoded alone loses the space
//! it carries. [`StreamDecoder`] uses the Hugging Face / TGI "prefix offset"
//! technique: it decodes a short window of recent tokens twice — without and with
//! the new tokens — and emits the difference, once that difference no longer
//! ends in an incomplete character (decoded as U+FFFD).
//!
//! The concatenation of everything [`StreamDecoder::push`] and
//! [`StreamDecoder::finish`] return equals `Tokenizer::decode` of all ids.
//! (A genuine U+FFFD at the very end of the text is held back until the next
//! token or `finish`.) The text is PHI: callers keep it in [`crate::Phi`].

use crate::tokenizer::Tokenizer;
use crate::Result;

/// Incremental decoder of one generated sequence.
#[derive(Clone)]
pub struct StreamDecoder {
    ids: Vec<u32>,
    /// Start of the window decoded as context.
    prefix_offset: usize,
    /// End of the text already emitted (in ids).
    read_offset: usize,
    skip_special: bool,
}

impl std::fmt::Debug for StreamDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamDecoder")
            .field("tokens", &self.ids.len())
            .field("skip_special", &self.skip_special)
            .finish()
    }
}

impl StreamDecoder {
    /// A decoder for a fresh sequence of generated tokens. With `skip_special`
    /// control tokens produce no text.
    pub fn new(skip_special: bool) -> Self {
        StreamDecoder { ids: Vec::new(), prefix_offset: 0, read_offset: 0, skip_special }
    }

    /// All ids pushed so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// Adds the next token; returns the text that became complete (often empty
    /// while a character is still incomplete).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let window = &self.ids[self.prefix_offset..];
        let prefix_text = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset], self.skip_special)?;
        let new_text = tokenizer.decode(window, self.skip_special)?;
        if new_text.len() > prefix_text.len() && !new_text.ends_with('\u{FFFD}') {
            if let Some(delta) = new_text.get(prefix_text.len()..).filter(|_| new_text.starts_with(&prefix_text)) {
                let delta = delta.to_owned();
                self.prefix_offset = self.read_offset;
                self.read_offset = self.ids.len();
                return Ok(delta);
            }
            // The window's text does not extend the prefix's (a decoder that
            // rewrites earlier text): emit from the first differing character.
            let common = common_prefix_len(&prefix_text, &new_text);
            if common == prefix_text.len() {
                let delta = new_text[common..].to_owned();
                self.prefix_offset = self.read_offset;
                self.read_offset = self.ids.len();
                return Ok(delta);
            }
        }
        Ok(String::new())
    }

    /// Generation ended: returns whatever is still held back (an incomplete
    /// character at the end is emitted as U+FFFD, as `decode` would).
    pub fn finish(&mut self, tokenizer: &Tokenizer) -> Result<String> {
        if self.read_offset >= self.ids.len() {
            return Ok(String::new());
        }
        let prefix_text = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset], self.skip_special)?;
        let new_text = tokenizer.decode(&self.ids[self.prefix_offset..], self.skip_special)?;
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        let common = common_prefix_len(&prefix_text, &new_text);
        Ok(new_text[common.min(prefix_text.len())..].to_owned())
    }
}

/// Length in bytes of the longest common prefix that ends on a char boundary.
fn common_prefix_len(a: &str, b: &str) -> usize {
    let mut n = 0;
    for (ca, cb) in a.chars().zip(b.chars()) {
        if ca != cb {
            break;
        }
        n += ca.len_utf8();
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::tests::tiny_spm_metadata;

    fn stream(t: &Tokenizer, ids: &[u32], skip_special: bool) -> Vec<String> {
        let mut d = StreamDecoder::new(skip_special);
        let mut pieces: Vec<String> = ids.iter().map(|&id| d.push(t, id).unwrap()).collect();
        pieces.push(d.finish(t).unwrap());
        pieces
    }

    #[test]
    fn byte_fallback_characters_are_emitted_whole() {
        let t = Tokenizer::from_gguf_metadata(&tiny_spm_metadata()).unwrap();
        let text = "hello 😀 world 患者 hé";
        let ids = t.encode(text, false).unwrap();
        let pieces = stream(&t, &ids, false);
        // No piece contains a replacement character or a partial character.
        assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')), "{pieces:?}");
        assert_eq!(pieces.concat(), t.decode(&ids, false).unwrap());
        assert_eq!(pieces.concat(), text);
        // The emoji (4 byte tokens) arrives in one piece.
        assert!(pieces.iter().any(|p| p == "😀"), "{pieces:?}");
    }

    #[test]
    fn sentencepiece_spaces_are_kept_between_tokens() {
        let t = Tokenizer::from_gguf_metadata(&tiny_spm_metadata()).unwrap();
        let ids = t.encode("hello world hello", false).unwrap();
        let pieces = stream(&t, &ids, false);
        assert_eq!(pieces[..3], ["hello".to_string(), " world".into(), " hello".into()]);
        assert_eq!(pieces.concat(), "hello world hello");
    }

    #[test]
    fn special_tokens_are_skipped_or_kept() {
        let t = Tokenizer::from_gguf_metadata(&tiny_spm_metadata()).unwrap();
        let mut ids = t.encode("hello", false).unwrap();
        ids.push(2); // </s>
        assert_eq!(stream(&t, &ids, true).concat(), "hello");
        assert_eq!(stream(&t, &ids, false).concat(), t.decode(&ids, false).unwrap());
    }

    #[test]
    fn incomplete_character_is_flushed_on_finish() {
        let t = Tokenizer::from_gguf_metadata(&tiny_spm_metadata()).unwrap();
        let mut ids = t.encode("hi", false).unwrap();
        ids.push(t.token_to_id("<0xF0>").unwrap());
        ids.push(t.token_to_id("<0x9F>").unwrap());
        let mut d = StreamDecoder::new(false);
        let mut out = String::new();
        for &id in &ids {
            out.push_str(&d.push(&t, id).unwrap());
        }
        assert_eq!(out, "hi");
        out.push_str(&d.finish(&t).unwrap());
        assert_eq!(out, t.decode(&ids, false).unwrap());
        assert!(out.ends_with('\u{FFFD}'));
        assert_eq!(d.finish(&t).unwrap(), "");
    }
}
