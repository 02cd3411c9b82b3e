//! Corrupt, truncated or unsupported model files give a clear error, never a panic.

mod common;

use candle_core::DType;
use common::*;
use salus_models::{LoadOptions, Model, ModelError, ModelSource, WeightBytes};

fn load_err(src: &ModelSource) -> ModelError {
    match Model::load_weights(src, &LoadOptions::default()) {
        Ok(_) => panic!("loading should fail"),
        Err(e) => e,
    }
}

fn gguf(bytes: Vec<u8>) -> ModelSource {
    ModelSource::from_gguf_bytes("bad.gguf", WeightBytes::from_vec(bytes))
}

#[test]
fn truncated_gguf() {
    let bytes = gguf_bytes("llama", 1);
    for cut in [3, 10, 40, 300, bytes.len() / 2, bytes.len() - 1] {
        let e = load_err(&gguf(bytes[..cut].to_vec()));
        let msg = e.to_string();
        assert!(matches!(e, ModelError::InvalidWeights { .. }), "cut at {cut}: {msg}");
        assert!(msg.contains("bad.gguf"), "{msg}");
    }
    let msg = load_err(&gguf(bytes[..bytes.len() - 1].to_vec())).to_string();
    assert!(msg.contains("truncated"), "{msg}");
}

#[test]
fn corrupt_gguf_bytes() {
    let good = gguf_bytes("llama", 2);
    // Garbage after a valid magic.
    let mut garbage = b"GGUF".to_vec();
    garbage.extend((0..4096u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8));
    assert!(matches!(load_err(&gguf(garbage)), ModelError::InvalidWeights { .. }));
    // Not GGUF at all.
    assert!(load_err(&gguf(vec![0u8; 100])).to_string().contains("magic"));
    // Flip every byte of the header region, one at a time: never a panic.
    for i in 4..200.min(good.len()) {
        let mut b = good.clone();
        b[i] ^= 0xFF;
        let _ = Model::load_weights(&gguf(b), &LoadOptions::default());
    }
    // A huge tensor count.
    let mut b = good.clone();
    b[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(load_err(&gguf(b)), ModelError::InvalidWeights { .. }));
}

#[test]
fn unknown_architecture() {
    let e = load_err(&gguf(gguf_bytes("gpt2", 3)));
    assert!(matches!(&e, ModelError::UnsupportedArchitecture(a) if a == "gpt2"), "{e}");
    let json = llama_config_json("").replace(r#""model_type":"llama""#, r#""model_type":"bert""#);
    let e = load_err(&hf_source(&json, &hf_tensors(1, false, false), 1, DType::F32));
    assert!(e.to_string().contains("bert"), "{e}");
}

#[test]
fn missing_or_bad_config_json() {
    let tensors = hf_tensors(4, false, false);
    let mut src = hf_source(&llama_config_json(""), &tensors, 1, DType::F32);
    let mut no_cfg = ModelSource::new("tiny");
    for (n, b) in src.files().filter(|(n, _)| *n != "config.json") {
        no_cfg.insert(n, b.clone());
    }
    assert!(load_err(&no_cfg).to_string().contains("config.json"));
    src.insert("config.json", WeightBytes::from_vec(b"{not json".to_vec()));
    assert!(load_err(&src).to_string().contains("config.json"));
    // Inconsistent head counts.
    let json = llama_config_json("").replace(r#""num_key_value_heads":2"#, r#""num_key_value_heads":3"#);
    let e = load_err(&hf_source(&json, &tensors, 1, DType::F32));
    assert!(matches!(e, ModelError::InvalidConfig(_)) && e.to_string().contains("num_key_value_heads"), "{e}");
}

#[test]
fn truncated_or_incomplete_safetensors() {
    let tensors = hf_tensors(5, false, false);
    let src = hf_source(&llama_config_json(""), &tensors, 1, DType::F32);
    let (name, bytes) = src.safetensors()[0];
    let (name, bytes) = (name.to_string(), bytes.as_slice().to_vec());
    for cut in [4, 100, bytes.len() / 2, bytes.len() - 4] {
        let mut s = ModelSource::new("tiny");
        s.insert("config.json", src.get("config.json").unwrap().clone());
        s.insert(name.clone(), WeightBytes::from_vec(bytes[..cut].to_vec()));
        let e = load_err(&s);
        assert!(matches!(e, ModelError::InvalidWeights { .. }) && e.to_string().contains(&name), "cut {cut}: {e}");
    }
    // A missing tensor is named.
    let mut partial = tensors.clone();
    partial.remove("model.layers.1.mlp.up_proj.weight");
    let e = load_err(&hf_source(&llama_config_json(""), &partial, 1, DType::F32));
    assert!(e.to_string().contains("model.layers.1.mlp.up_proj.weight"), "{e}");
    // A tensor of the wrong shape is named.
    let json = llama_config_json("").replace(r#""intermediate_size":128"#, r#""intermediate_size":96"#);
    let e = load_err(&hf_source(&json, &tensors, 1, DType::F32));
    assert!(matches!(e, ModelError::Tensor { .. }) && e.to_string().contains("shape"), "{e}");
    // No weights at all.
    let mut only_cfg = ModelSource::new("tiny");
    only_cfg.insert("config.json", WeightBytes::from_vec(llama_config_json("").into_bytes()));
    assert!(matches!(load_err(&only_cfg), ModelError::InvalidWeights { .. }));
}
