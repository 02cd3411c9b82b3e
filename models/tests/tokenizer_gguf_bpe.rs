//! Byte-level BPE (gpt2-family) tokenizers built from GGUF metadata constructed
//! in the test, and tokenizer.json loading. (The SentencePiece family is tested
//! in `tokenizer.rs`; the default model in `tokenizer_smollm2.rs`.)

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;
use salus_models::{ModelSource, Tokenizer, WeightBytes};

fn s(x: &str) -> Value {
    Value::String(x.to_string())
}

/// GPT-2's byte → printable character table (written independently of the crate's).
fn bytes_to_unicode() -> Vec<char> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut next = 256;
    (0..256u32)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap()
            } else {
                next += 1;
                char::from_u32(next - 1).unwrap()
            }
        })
        .collect()
}

/// A tiny byte-level BPE (gpt2-family) vocabulary: the 256 byte symbols,
/// two control tokens and a few merges.
fn tiny_bpe_metadata(pre: &str) -> HashMap<String, Value> {
    let mut tokens: Vec<String> = vec!["<|endoftext|>".into(), "<|im_end|>".into()];
    tokens.extend(bytes_to_unicode().iter().map(|c| c.to_string()));
    let merges = ["1 2", "12 3", "4 5", "Ġ p", "Ġp t", "Ġ 1"];
    for m in merges {
        tokens.push(m.replace(' ', ""));
    }
    let mut types = vec![3 /* control */; 2];
    types.resize(tokens.len(), 1);
    let mut md = HashMap::new();
    md.insert("tokenizer.ggml.model".into(), s("gpt2"));
    md.insert("tokenizer.ggml.pre".into(), s(pre));
    md.insert("tokenizer.ggml.tokens".into(), Value::Array(tokens.iter().map(|t| s(t)).collect()));
    md.insert("tokenizer.ggml.token_type".into(), Value::Array(types.into_iter().map(Value::I32).collect()));
    md.insert("tokenizer.ggml.merges".into(), Value::Array(merges.iter().map(|m| s(m)).collect()));
    md.insert("tokenizer.ggml.eos_token_id".into(), Value::U32(0));
    md
}

#[test]
fn byte_level_pre_tokenizers_follow_tokenizer_ggml_pre() {
    let pieces = |pre: &str, text: &str| -> Vec<String> {
        let t = Tokenizer::from_gguf_metadata(&tiny_bpe_metadata(pre)).unwrap();
        let ids = t.encode(text, false).unwrap();
        assert_eq!(t.decode(&ids, false).unwrap(), text, "round trip ({pre})");
        ids.iter().map(|&i| t.id_to_token(i).unwrap()).collect()
    };
    // SmolLM / StarCoder: every digit alone.
    assert_eq!(pieces("smollm", "12345"), ["1", "2", "3", "4", "5"]);
    // Llama 3: groups of up to three digits, then BPE inside each group.
    assert_eq!(pieces("llama-bpe", "12345"), ["123", "45"]);
    // GPT-2: one group of digits; Qwen2: single digits.
    assert_eq!(pieces("gpt-2", "12345"), ["123", "45"]);
    assert_eq!(pieces("qwen2", "12345"), ["1", "2", "3", "4", "5"]);
    // " pt 1": the space joins the following word / number.
    assert_eq!(pieces("gpt-2", " pt 1"), ["Ġpt", "Ġ1"]);
    assert_eq!(pieces("smollm", " pt 1"), ["Ġpt", "Ġ", "1"]);
    // Multi-byte characters become byte symbols and decode back.
    assert_eq!(pieces("smollm", "é😀").len(), 6);
    // Control tokens in the text are single special tokens; EOS list.
    let t = Tokenizer::from_gguf_metadata(&tiny_bpe_metadata("smollm")).unwrap();
    let ids = t.encode("1<|im_end|>2", false).unwrap();
    assert_eq!(ids[1], 1);
    assert_eq!(ids.len(), 3);
    assert_eq!(t.decode(&ids, true).unwrap(), "12");
    assert_eq!(t.eos_token_ids(), &[0, 1]);
    assert_eq!(t.bos_token_id(), None);
}

#[test]
fn tokenizer_json_with_configs() {
    let built = Tokenizer::from_gguf_metadata(&tiny_bpe_metadata("smollm")).unwrap();
    let json = built.inner().to_string(false).unwrap();
    let cfg = br#"{"bos_token": null, "eos_token": {"content": "<|im_end|>"}}"#;
    let gen = br#"{"eos_token_id": [1, 0]}"#;
    let t = Tokenizer::from_hf_files(json.as_bytes(), Some(cfg), Some(gen)).unwrap();
    assert_eq!(t.eos_token_ids(), &[1, 0]);
    assert_eq!(t.eos_token(), Some("<|im_end|>"));
    assert!(t.is_special(0) && t.is_special(1) && !t.is_special(5));
    assert_eq!(t.encode("12345", false).unwrap(), built.encode("12345", false).unwrap());
    // A source with tokenizer.json uses it even when GGUF metadata is present.
    let mut src = ModelSource::new("m");
    src.insert("tokenizer.json", WeightBytes::from_vec(json.into_bytes()));
    // (the GGUF metadata passed here describes a different, larger vocabulary).
    let mut other_metadata = tiny_bpe_metadata("llama-bpe");
    if let Some(Value::Array(tokens)) = other_metadata.get_mut("tokenizer.ggml.tokens") {
        tokens.push(s("extra"));
    }
    if let Some(Value::Array(types)) = other_metadata.get_mut("tokenizer.ggml.token_type") {
        types.push(Value::I32(1));
    }
    assert_eq!(Tokenizer::from_gguf_metadata(&other_metadata).unwrap().vocab_size(), built.vocab_size() + 1);
    let from_src = Tokenizer::from_source(&src, Some(&other_metadata)).unwrap();
    assert_eq!(from_src.vocab_size(), built.vocab_size());
    let e = Tokenizer::from_hf_files(b"{}", None, None).unwrap_err().to_string();
    assert!(e.contains("invalid tokenizer.json"), "{e}");
}
