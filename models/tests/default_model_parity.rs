//! Our decoder on the real default model equals candle-transformers'
//! quantized_llama when both use candle's quantized matmul (the decoder, rope,
//! attention and cache are then the only differences). Own test binary because
//! it switches the process-wide matmul selection.

use std::path::PathBuf;

use salus_models::chat::{ChatMessage, Role};
use salus_models::{load, LoadOptions, LoadedModel, ModelSource};

fn model_path() -> PathBuf {
    if let Ok(p) = std::env::var("SALUS_MODEL") {
        return PathBuf::from(p);
    }
    let dir = std::env::var("SALUS_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/salus/models")
        });
    dir.join("SmolLM2-135M-Instruct.Q4_1.gguf")
}

fn default_model() -> Option<LoadedModel> {
    let path = model_path();
    if !path.exists() {
        eprintln!(
            "SKIPPED: default model not found at {} (run scripts/fetch-model.sh)",
            path.display()
        );
        return None;
    }
    // Candle's quantized matmul, as in the reference (this binary has one test).
    salus_models::qlinear::set_salus_kernels_enabled(false);
    let source = ModelSource::read_plaintext(&path).expect("read model");
    Some(load(&source, &LoadOptions::default()).expect("load default model"))
}

fn chat_ids(lm: &LoadedModel, question: &str) -> Vec<u32> {
    let template = lm
        .chat_template
        .as_ref()
        .expect("SmolLM2 ships a chat template");
    let text = template
        .render(&[ChatMessage::new(Role::User, question)], true)
        .unwrap();
    lm.tokenizer.encode(text.expose(), false).unwrap()
}

/// Our logits on the real model equal candle-transformers' quantized_llama
/// (prefill of a chat prompt + greedy decode steps).
#[test]
fn default_model_logits_match_candle_quantized_llama() {
    use candle_core::{Device, IndexOp, Tensor};
    use salus_models::{PackedBatch, SeqId};
    let path = model_path();
    let Some(lm) = default_model() else { return };
    let bytes = std::fs::read(&path).unwrap();
    let mut cur = std::io::Cursor::new(bytes.as_slice());
    let content = candle_core::quantized::gguf_file::Content::read(&mut cur).unwrap();
    let mut r = candle_transformers::models::quantized_llama::ModelWeights::from_gguf(
        content,
        &mut cur,
        &Device::Cpu,
    )
    .unwrap();
    let ids = chat_ids(&lm, "What is the capital of France?");
    let mut cache = lm.model.new_cache();
    let mut b = PackedBatch::new();
    b.push(SeqId(0), &ids, 0).unwrap();
    let mut ours = lm.model.forward(&b, &mut cache).unwrap().i(0).unwrap();
    let mut theirs = r
        .forward(
            &Tensor::new(ids.as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap(),
            0,
        )
        .unwrap()
        .i(0)
        .unwrap();
    for step in 0..8 {
        let d = (&ours - &theirs)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 1e-3, "step {step}: max |diff| = {d}");
        let tok = theirs.argmax(0).unwrap().to_scalar::<u32>().unwrap();
        let mut b = PackedBatch::new();
        b.push(SeqId(0), &[tok], ids.len() + step).unwrap();
        ours = lm.model.forward(&b, &mut cache).unwrap().i(0).unwrap();
        theirs = r
            .forward(
                &Tensor::new(&[[tok]], &Device::Cpu).unwrap(),
                ids.len() + step,
            )
            .unwrap()
            .i(0)
            .unwrap();
    }
}
