//! The token trie llguidance computes masks over, built from our tokenizer.
//!
//! The bytes of every token come from llguidance's own reader of Hugging Face
//! `tokenizer.json` files (byte-level BPE and SentencePiece byte fallback),
//! applied to the serialization of our `tokenizers` pipeline — which for GGUF
//! models is the pipeline built from the GGUF metadata. Control tokens are
//! marked special (never allowed by a grammar); ids past the tokenizer's
//! vocabulary, up to the logits' length, get placeholder special names.

use llguidance::toktrie::{TokRxInfo, TokTrie, TokenId, TokenizerEnv};

use super::GrammarError;
use crate::tokenizer::Tokenizer;

/// A [`TokenizerEnv`] over a fixed token trie. Tokenizing (which llguidance
/// needs only for forced tokens) is the trie's greedy tokenization.
pub(super) struct TrieEnv {
    trie: TokTrie,
}

impl TrieEnv {
    /// The trie of `tokenizer`'s vocabulary.
    pub(super) fn new(tokenizer: &Tokenizer, vocab_size: usize, end_ids: &[u32]) -> Result<Self, GrammarError> {
        let json = tokenizer
            .inner()
            .to_string(false)
            .map_err(|_| GrammarError::Tokenizer("the tokenizer could not be serialized"))?;
        let json: serde_json::Value = serde_json::from_str(&json)
            .map_err(|_| GrammarError::Tokenizer("the tokenizer could not be serialized"))?;
        // llguidance's reader panics on some malformed vocabularies: a model file
        // must not take the server down that way.
        let bytes = std::panic::catch_unwind(|| llguidance::token_bytes_from_tokenizer_json(&json))
            .map_err(|_| GrammarError::Tokenizer("its vocabulary could not be read"))?
            .map_err(|_| {
                GrammarError::Tokenizer("it is neither byte-level BPE nor SentencePiece with byte fallback")
            })?;
        let end_ids: Vec<u32> = if end_ids.is_empty() { tokenizer.eos_token_ids().to_vec() } else { end_ids.to_vec() };
        Self::from_token_bytes(bytes, vocab_size, &end_ids, tokenizer.bos_token_id())
    }

    /// The trie of tokens whose bytes are `words` (index = token id); empty
    /// entries are tokens without text.
    pub(super) fn from_token_bytes(
        words: Vec<Vec<u8>>,
        vocab_size: usize,
        end_ids: &[u32],
        bos: Option<u32>,
    ) -> Result<Self, GrammarError> {
        if words.len() > vocab_size {
            return Err(GrammarError::Tokenizer("the tokenizer has more tokens than the model's logits"));
        }
        let mut words = words;
        for (id, w) in words.iter_mut().enumerate() {
            if w.is_empty() {
                *w = placeholder(id);
            }
        }
        while words.len() < vocab_size {
            words.push(placeholder(words.len()));
        }
        let eos = end_ids.first().copied().unwrap_or(0);
        let mut info = TokRxInfo::new(vocab_size as u32, eos);
        info.tok_bos = bos;
        let mut trie = TokTrie::from(&info, &words);
        let ends: Vec<TokenId> = end_ids.iter().copied().filter(|&t| (t as usize) < vocab_size).collect();
        if ends.len() > 1 {
            trie = trie.with_eos_tokens(&ends);
        }
        Ok(TrieEnv { trie })
    }
}

/// The name of a token that has no text: special, so no grammar allows it.
fn placeholder(id: usize) -> Vec<u8> {
    let mut name = format!(".<[{id}]>").into_bytes();
    name[0] = TokTrie::SPECIAL_TOKEN_MARKER;
    name
}

impl TokenizerEnv for TrieEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.greedy_tokenize(s)
    }

    fn tokenize_is_canonical(&self) -> bool {
        false
    }
}
