//! The default model's tokenizer, built from its GGUF metadata, against reference
//! ids produced by an independent implementation (scripts/gen-tokenizer-fixtures.py).
//! Skipped, with a message, when the model file is not present.

mod common;

use std::collections::HashMap;

use candle_core::quantized::gguf_file::{Content, Value};
use salus_models::dev_model::default_model_if_present;
use salus_models::{ChatMessage, ChatTemplate, ModelSource, Role, StreamDecoder, Tokenizer};

const FIXTURE: &str = include_str!("fixtures/smollm2_tokenizer_ids.json");

fn metadata() -> Option<HashMap<String, Value>> {
    let path = default_model_if_present()?;
    let mut f = std::fs::File::open(path).expect("open model");
    Some(Content::read(&mut f).expect("read GGUF header").metadata)
}

struct Case {
    text: String,
    ids: Vec<u32>,
}

fn cases() -> Vec<Case> {
    let v: serde_json::Value = serde_json::from_str(FIXTURE).unwrap();
    v["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Case {
            text: c["text"].as_str().unwrap().to_string(),
            ids: c["ids"].as_array().unwrap().iter().map(|i| i.as_u64().unwrap() as u32).collect(),
        })
        .collect()
}

#[test]
fn ids_match_the_reference_tokenizer() {
    let Some(md) = metadata() else { return };
    let tok = Tokenizer::from_gguf_metadata(&md).unwrap();
    let cases = cases();
    assert!(cases.len() >= 40, "fixture has {} cases", cases.len());
    let mut failures = Vec::new();
    for c in &cases {
        let ids = tok.encode(&c.text, false).unwrap();
        if ids != c.ids {
            failures.push(format!("{:?}: got {:?}, want {:?}", c.text, ids, c.ids));
        }
        assert_eq!(tok.decode(&ids, false).unwrap(), c.text, "round trip");
    }
    assert!(failures.is_empty(), "{} of {} differ:\n{}", failures.len(), cases.len(), failures.join("\n"));
}

#[test]
fn special_tokens_of_the_default_model() {
    let Some(md) = metadata() else { return };
    let tok = Tokenizer::from_gguf_metadata(&md).unwrap();
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!(tok.bos_token_id(), Some(1));
    // Declared EOS (<|im_end|>) first, then <|endoftext|>.
    assert_eq!(tok.eos_token_ids(), &[2, 0]);
    assert_eq!(tok.token_to_id("<|im_start|>"), Some(1));
    assert!(tok.is_special(1) && !tok.is_special(17));
    // The GGUF says no BOS is added.
    assert_eq!(tok.encode("hi", true).unwrap(), tok.encode("hi", false).unwrap());
    // Special tokens can be skipped when decoding.
    let ids = tok.encode("<|im_start|>assistant\nOK<|im_end|>", false).unwrap();
    assert_eq!(tok.decode(&ids, true).unwrap(), "assistant\nOK");
    // The source-level constructor falls back to GGUF metadata.
    let src = ModelSource::new("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert_eq!(Tokenizer::from_source(&src, Some(&md)).unwrap().vocab_size(), 49152);
}

#[test]
fn streaming_decode_equals_full_decode() {
    let Some(md) = metadata() else { return };
    let tok = Tokenizer::from_gguf_metadata(&md).unwrap();
    for c in cases() {
        let mut d = StreamDecoder::new(false);
        let mut out = String::new();
        for &id in &c.ids {
            let piece = d.push(&tok, id).unwrap();
            assert!(!piece.contains('\u{FFFD}'), "partial character emitted for {:?}", c.text);
            out.push_str(&piece);
        }
        out.push_str(&d.finish(&tok).unwrap());
        assert_eq!(out, c.text);
    }
}

#[test]
fn chat_template_from_the_gguf() {
    let Some(md) = metadata() else { return };
    let tok = Tokenizer::from_gguf_metadata(&md).unwrap();
    let src = ModelSource::new("SmolLM2-135M-Instruct.Q4_1.gguf");
    let tmpl = ChatTemplate::from_source_required(&src, Some(&md), None).unwrap();
    let prompt = tmpl
        .render(&[ChatMessage::new(Role::System, "Be brief."), ChatMessage::new(Role::User, "What is HTN?")], true)
        .unwrap();
    assert_eq!(
        prompt.expose(),
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is HTN?<|im_end|>\n<|im_start|>assistant\n"
    );
    let ids = tok.encode(prompt.expose(), true).unwrap();
    assert_eq!(ids[0], 1);
    assert_eq!(ids.iter().filter(|&&i| i == 1).count(), 3, "three <|im_start|> tokens");
    assert_eq!(ids.iter().filter(|&&i| i == 2).count(), 2, "two <|im_end|> tokens");
}
