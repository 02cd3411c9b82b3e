//! Tokenizer: text ↔ token ids, wrapping Hugging Face `tokenizers`.
//!
//! Two ways in:
//! * a `tokenizer.json` (Hugging Face model directories, or placed beside a GGUF);
//! * the `tokenizer.ggml.*` metadata of a GGUF file, from which an equivalent
//!   `tokenizers` pipeline is built, for both families llama.cpp writes:
//!   - `gpt2`: byte-level BPE with explicit merges; the pre-tokenizer (how text is
//!     split before BPE) depends on `tokenizer.ggml.pre` and must match the one
//!     the merges were learned with — SmolLM (`smollm`) splits every digit on its
//!     own, Llama 3 (`llama-bpe`) groups up to three digits, Qwen2 splits digits…
//!   - `llama`: SentencePiece BPE. Merges are recovered from the token scores
//!     (as transformers' GGUF loader does), unknown characters fall back to
//!     `<0xXX>` byte tokens, spaces are written `▁` and a leading space is added.
//!
//! Control tokens (GGUF token type 3, or special added tokens of a
//! `tokenizer.json`) written literally in the text — chat templates produce
//! `<|im_start|>` and friends — are recognized as single special tokens.
//!
//! Text passed in and out is PHI: errors never quote it and nothing here logs it.

use std::collections::{HashMap, HashSet};

use candle_core::quantized::gguf_file::Value;
use serde_json::{json, Map as JsonMap, Value as Json};

use crate::{ModelError, ModelSource, Result};

mod gguf;
use gguf::*;

/// GGUF token types (llama.cpp `llama_token_type`).
const TOKEN_TYPE_UNKNOWN: i64 = 2;
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// Tokens that end a turn or a document in the chat models we serve. Any of them
/// that the vocabulary holds as a special token is a stop token, in addition to
/// the declared EOS: a chat model ends its answer with its end-of-turn token
/// (`<|im_end|>`, `<|eot_id|>`), which is not always the declared EOS.
const END_TOKENS: &[&str] =
    &["<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|endoftext|>", "<|end_of_text|>", "<|end|>", "</s>", "<end_of_turn>"];

/// Pre-tokenizer split patterns (as in the models' own `tokenizer.json`).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const TEKKEN_SPLIT: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A tokenizer with the special-token knowledge generation needs.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    vocab_size: usize,
    bos: Option<u32>,
    /// Prepend `bos` when encoding with special tokens (GGUF-built tokenizers;
    /// a `tokenizer.json` does this through its own post-processor).
    add_bos: bool,
    eos: Vec<u32>,
    special: HashSet<u32>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size)
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .finish()
    }
}

impl Tokenizer {
    /// Loads a `tokenizer.json`. BOS/EOS are guessed from the vocabulary; use
    /// [`Tokenizer::from_source`] to also read `tokenizer_config.json` and
    /// `generation_config.json`.
    pub fn from_json_bytes(bytes: &[u8]) -> Result<Self> {
        Self::from_hf_files(bytes, None, None)
    }

    /// Loads a `tokenizer.json` with the optional `tokenizer_config.json`
    /// (bos_token / eos_token) and `generation_config.json` (eos_token_id).
    pub fn from_hf_files(
        tokenizer_json: &[u8],
        tokenizer_config: Option<&[u8]>,
        generation_config: Option<&[u8]>,
    ) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_bytes(tokenizer_json)
            .map_err(|e| ModelError::Tokenizer(format!("invalid tokenizer.json: {e}")))?;
        let config: Option<Json> = match tokenizer_config {
            Some(b) => Some(
                serde_json::from_slice(b)
                    .map_err(|e| ModelError::Tokenizer(format!("invalid tokenizer_config.json: {e}")))?,
            ),
            None => None,
        };
        let generation: Option<Json> = match generation_config {
            Some(b) => Some(
                serde_json::from_slice(b)
                    .map_err(|e| ModelError::Tokenizer(format!("invalid generation_config.json: {e}")))?,
            ),
            None => None,
        };
        let special: HashSet<u32> =
            inner.get_added_tokens_decoder().into_iter().filter(|(_, t)| t.special).map(|(id, _)| id).collect();
        let config_token = |key: &str| -> Option<String> {
            match config.as_ref()?.get(key)? {
                Json::String(s) => Some(s.clone()),
                Json::Object(o) => o.get("content")?.as_str().map(str::to_owned),
                _ => None,
            }
        };
        let bos_token = config_token("bos_token").or_else(|| {
            ["<|begin_of_text|>", "<s>", "<bos>"]
                .iter()
                .find(|t| inner.token_to_id(t).is_some_and(|id| special.contains(&id)))
                .map(|t| t.to_string())
        });
        let bos = bos_token.as_deref().and_then(|t| inner.token_to_id(t));
        let mut eos = Vec::new();
        let eos_token = config_token("eos_token");
        if let Some(id) = eos_token.as_deref().and_then(|t| inner.token_to_id(t)) {
            eos.push(id);
        }
        if let Some(g) = generation.as_ref().and_then(|g| g.get("eos_token_id")) {
            let ids: Vec<u64> = match g {
                Json::Number(n) => n.as_u64().into_iter().collect(),
                Json::Array(a) => a.iter().filter_map(Json::as_u64).collect(),
                _ => Vec::new(),
            };
            eos.extend(ids.into_iter().filter_map(|i| u32::try_from(i).ok()));
        }
        for t in END_TOKENS {
            if let Some(id) = inner.token_to_id(t).filter(|id| special.contains(id)) {
                eos.push(id);
            }
        }
        dedup_keep_order(&mut eos);
        let eos_token = eos_token.or_else(|| eos.first().and_then(|&id| inner.id_to_token(id)));
        let vocab_size = inner.get_vocab_size(true);
        Ok(Tokenizer { inner, vocab_size, bos, add_bos: false, eos, special, bos_token, eos_token })
    }

    /// Builds the tokenizer described by a GGUF file's `tokenizer.ggml.*` metadata.
    pub fn from_gguf_metadata(md: &HashMap<String, Value>) -> Result<Self> {
        let model = md_str(md, "tokenizer.ggml.model")
            .ok_or_else(|| ModelError::Tokenizer("GGUF metadata has no tokenizer.ggml.model".into()))?;
        let tokens = md_str_array(md, "tokenizer.ggml.tokens")?;
        if tokens.is_empty() {
            return Err(ModelError::Tokenizer("GGUF tokenizer.ggml.tokens is empty".into()));
        }
        let types = match md.get("tokenizer.ggml.token_type") {
            Some(_) => md_int_array(md, "tokenizer.ggml.token_type")?,
            None => vec![1; tokens.len()],
        };
        if types.len() != tokens.len() {
            return Err(ModelError::Tokenizer(
                "GGUF tokenizer.ggml.token_type and tokenizer.ggml.tokens differ in length".into(),
            ));
        }
        let n = tokens.len();
        let id_key = |key: &str| -> Result<Option<u32>> {
            match md_u32(md, key) {
                Some(id) if (id as usize) < n => Ok(Some(id)),
                Some(_) => Err(ModelError::Tokenizer(format!("GGUF {key} is outside the vocabulary"))),
                None => Ok(None),
            }
        };
        let bos = id_key("tokenizer.ggml.bos_token_id")?;
        let eos_id = id_key("tokenizer.ggml.eos_token_id")?;
        let unk = id_key("tokenizer.ggml.unknown_token_id")?;
        let pre = md_str(md, "tokenizer.ggml.pre").unwrap_or("default");

        let (json, add_bos_default) = match model {
            "gpt2" => (
                byte_level_json(md, &tokens, &types, pre)?,
                matches!(pre_family(pre), Some(PreFamily::Llama3 | PreFamily::Tekken)),
            ),
            "llama" => {
                let add_space_prefix = md_bool(md, "tokenizer.ggml.add_space_prefix").unwrap_or(true);
                (sentencepiece_json(md, &tokens, &types, unk, add_space_prefix)?, true)
            }
            other => {
                return Err(ModelError::Tokenizer(format!(
                    "unsupported GGUF tokenizer model '{other}' (supported: gpt2, llama)"
                )))
            }
        };
        let bytes = serde_json::to_vec(&json).map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        let inner = tokenizers::Tokenizer::from_bytes(bytes)
            .map_err(|e| ModelError::Tokenizer(format!("cannot build a tokenizer from the GGUF metadata: {e}")))?;
        let add_bos = bos.is_some() && md_bool(md, "tokenizer.ggml.add_bos_token").unwrap_or(add_bos_default);

        let special: HashSet<u32> = (0..n as u32).filter(|&i| types[i as usize] == TOKEN_TYPE_CONTROL).collect();
        let mut eos: Vec<u32> = Vec::new();
        eos.extend(eos_id);
        eos.extend(id_key("tokenizer.ggml.eot_token_id")?);
        eos.extend(id_key("tokenizer.ggml.eom_token_id")?);
        for t in END_TOKENS {
            if let Some(id) = tokens.iter().position(|x| x == t) {
                if special.contains(&(id as u32)) {
                    eos.push(id as u32);
                }
            }
        }
        dedup_keep_order(&mut eos);
        Ok(Tokenizer {
            inner,
            vocab_size: n,
            bos,
            add_bos,
            bos_token: bos.map(|i| tokens[i as usize].to_string()),
            eos_token: eos_id.map(|i| tokens[i as usize].to_string()),
            eos,
            special,
        })
    }

    /// The tokenizer of a model: its `tokenizer.json` if the source has one,
    /// else the GGUF metadata, else an error.
    pub fn from_source(source: &ModelSource, gguf_metadata: Option<&HashMap<String, Value>>) -> Result<Self> {
        if let Some(json) = source.get("tokenizer.json") {
            return Self::from_hf_files(
                json.as_slice(),
                source.get("tokenizer_config.json").map(|b| b.as_slice()),
                source.get("generation_config.json").map(|b| b.as_slice()),
            );
        }
        match gguf_metadata {
            Some(md) if md.contains_key("tokenizer.ggml.tokens") => Self::from_gguf_metadata(md),
            _ => Err(ModelError::Tokenizer("no tokenizer.json and no tokenizer metadata in the GGUF".into())),
        }
    }

    /// Text → ids. Special tokens written in the text are recognized.
    /// `add_special_tokens` adds what the model adds to every input (e.g. BOS).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, add_special_tokens)
            .map_err(|_| ModelError::Tokenizer("the text could not be encoded".into()))?;
        let ids = enc.get_ids();
        let mut out = Vec::with_capacity(ids.len() + 1);
        if add_special_tokens && self.add_bos {
            out.extend(self.bos);
        }
        out.extend_from_slice(ids);
        Ok(out)
    }

    /// Ids → text. Ids outside the vocabulary are skipped (as Hugging Face does);
    /// with `skip_special` control tokens are left out.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|_| ModelError::Tokenizer("the token ids could not be decoded".into()))
    }

    /// Number of token ids (including added tokens).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The vocabulary entry of `id` (byte-level spelling for byte-level BPE, `▁` for SentencePiece).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos
    }

    /// Text of the BOS token (for chat templates' `bos_token`).
    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    /// Text of the declared EOS token (for chat templates' `eos_token`).
    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// Every token that ends generation: the declared EOS first, then
    /// end-of-turn tokens (`<|im_end|>`, `<|eot_id|>`, `<|endoftext|>`…) the
    /// vocabulary has as special tokens.
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos
    }

    /// Whether `id` is a special (control) token.
    pub fn is_special(&self, id: u32) -> bool {
        self.special.contains(&id)
    }

    /// The wrapped `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

fn dedup_keep_order(v: &mut Vec<u32>) {
    let mut seen = HashSet::new();
    v.retain(|x| seen.insert(*x));
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn s(x: &str) -> Value {
        Value::String(x.to_string())
    }

    /// A tiny SentencePiece (llama-family) vocabulary as GGUF metadata.
    pub(crate) fn tiny_spm_metadata() -> HashMap<String, Value> {
        let mut tokens: Vec<(String, f32, i32)> =
            vec![("<unk>".into(), 0.0, 2), ("<s>".into(), 0.0, 3), ("</s>".into(), 0.0, 3)];
        for b in 0..=255u8 {
            tokens.push((format!("<0x{b:02X}>"), 0.0, 6));
        }
        // Pieces with scores: higher merges first.
        let pieces = [
            ("▁", -1.0),
            ("h", -2.0),
            ("e", -2.0),
            ("l", -2.0),
            ("o", -2.0),
            ("w", -2.0),
            ("r", -2.0),
            ("d", -2.0),
            ("a", -2.0),
            ("t", -2.0),
            ("i", -2.0),
            ("n", -2.0),
            ("p", -2.0),
            ("ll", -3.0),
            ("he", -3.5),
            ("hell", -4.0),
            ("hello", -4.5),
            ("▁hello", -5.0),
            ("or", -6.0),
            ("▁w", -6.5),
            ("▁wor", -7.0),
            ("ld", -7.5),
            ("▁world", -8.0),
            ("at", -9.0),
            ("in", -9.5),
            ("pat", -10.0),
        ];
        for (p, sc) in pieces {
            tokens.push((p.to_string(), sc, 1));
        }
        let mut md = HashMap::new();
        md.insert("tokenizer.ggml.model".into(), s("llama"));
        md.insert("tokenizer.ggml.tokens".into(), Value::Array(tokens.iter().map(|t| s(&t.0)).collect()));
        md.insert("tokenizer.ggml.scores".into(), Value::Array(tokens.iter().map(|t| Value::F32(t.1)).collect()));
        md.insert("tokenizer.ggml.token_type".into(), Value::Array(tokens.iter().map(|t| Value::I32(t.2)).collect()));
        md.insert("tokenizer.ggml.bos_token_id".into(), Value::U32(1));
        md.insert("tokenizer.ggml.eos_token_id".into(), Value::U32(2));
        md.insert("tokenizer.ggml.unknown_token_id".into(), Value::U32(0));
        md
    }

    fn ids_of(t: &Tokenizer, pieces: &[&str]) -> Vec<u32> {
        pieces.iter().map(|p| t.token_to_id(p).unwrap_or_else(|| panic!("no token {p}"))).collect()
    }

    #[test]
    fn sentencepiece_segmentation_bos_and_round_trip() {
        let t = Tokenizer::from_gguf_metadata(&tiny_spm_metadata()).unwrap();
        assert_eq!(t.vocab_size(), 3 + 256 + 26);
        assert_eq!(t.bos_token_id(), Some(1));
        assert_eq!(t.eos_token_ids(), &[2]);
        assert!(t.is_special(1) && t.is_special(2) && !t.is_special(t.token_to_id("ll").unwrap()));
        let ids = t.encode("hello world", false).unwrap();
        assert_eq!(ids, ids_of(&t, &["▁hello", "▁world"]));
        // BOS is added with special tokens.
        let with_bos = t.encode("hello world", true).unwrap();
        assert_eq!(with_bos[0], 1);
        assert_eq!(&with_bos[1..], &ids[..]);
        // "patient": "pat" + "i" + "e" + "n" + "t", after the leading "▁".
        assert_eq!(t.encode("patient", false).unwrap(), ids_of(&t, &["▁", "pat", "i", "e", "n", "t"]));
        assert_eq!(t.decode(&ids, false).unwrap(), "hello world");
        assert_eq!(t.decode(&with_bos, true).unwrap(), "hello world");
        // The decoder strips one leading space of the whole text only, as Hugging Face does.
        assert_eq!(t.decode(&with_bos, false).unwrap(), "<s> hello world");
    }

    #[test]
    fn sentencepiece_byte_fallback_for_unknown_characters() {
        let t = Tokenizer::from_gguf_metadata(&tiny_spm_metadata()).unwrap();
        // 'é' (C3 A9) and '😀' (F0 9F 98 80) are not in the vocabulary.
        let ids = t.encode("hé😀", false).unwrap();
        assert_eq!(ids, ids_of(&t, &["▁", "h", "<0xC3>", "<0xA9>", "<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]));
        assert_eq!(t.decode(&ids, false).unwrap(), "hé😀");
        for text in ["hello  world", " hello", "  two", "a\nb\tc", "naïve café 患者", "trailing ", ""] {
            let ids = t.encode(text, false).unwrap();
            assert!(!ids.contains(&0), "unknown token for {text:?}");
            let decoded = t.decode(&ids, false).unwrap();
            assert_eq!(decoded, text, "round trip");
        }
        // A literal "<s>" in the text is the BOS control token, and the text after
        // a special token gets its own leading "▁" (as in llama.cpp).
        let ids = t.encode("<s>hello", false).unwrap();
        assert_eq!(ids, ids_of(&t, &["<s>", "▁hello"]));
        // A leading space is kept as a second "▁".
        assert_eq!(t.encode(" hello", false).unwrap(), ids_of(&t, &["▁", "▁hello"]));
    }

    #[test]
    fn sentencepiece_merges_follow_scores() {
        let tokens = ["a", "b", "c", "ab", "bc", "abc"];
        let scores = [0.0, 0.0, 0.0, -2.0, -1.0, -3.0];
        let merges = sentencepiece_merges(&tokens, &scores);
        assert_eq!(merges, vec![json!(["b", "c"]), json!(["a", "b"]), json!(["ab", "c"]), json!(["a", "bc"])]);
    }

    #[test]
    fn missing_or_bad_metadata_is_a_clear_error() {
        let mut md = tiny_spm_metadata();
        md.insert("tokenizer.ggml.model".into(), s("bert"));
        let e = Tokenizer::from_gguf_metadata(&md).unwrap_err().to_string();
        assert!(e.contains("unsupported GGUF tokenizer model"), "{e}");
        let mut md = tiny_spm_metadata();
        md.remove("tokenizer.ggml.tokens");
        assert!(Tokenizer::from_gguf_metadata(&md).is_err());
        let mut md = tiny_spm_metadata();
        md.insert("tokenizer.ggml.bos_token_id".into(), Value::U32(100_000));
        assert!(Tokenizer::from_gguf_metadata(&md).is_err());
        let mut md = tiny_spm_metadata();
        md.insert("tokenizer.ggml.model".into(), s("gpt2"));
        md.insert("tokenizer.ggml.pre".into(), s("made-up"));
        let e = Tokenizer::from_gguf_metadata(&md).unwrap_err().to_string();
        assert!(e.contains("pre-tokenizer"), "{e}");
        let src = ModelSource::new("empty");
        let e = Tokenizer::from_source(&src, None).unwrap_err().to_string();
        assert!(e.contains("no tokenizer.json and no tokenizer metadata in the GGUF"), "{e}");
        assert!(Tokenizer::from_json_bytes(b"{not json").is_err());
    }

    #[test]
    fn byte_level_table_is_a_bijection() {
        let t = bytes_to_unicode();
        let set: HashSet<char> = t.iter().copied().collect();
        assert_eq!(set.len(), 256);
        assert_eq!(t[b'a' as usize], 'a');
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[b'\n' as usize], 'Ċ');
    }
}
