//! Our decoder on the real default model equals candle-transformers'
//! quantized_llama when both use candle's quantized matmul (the decoder, rope,
//! attention and cache are then the only differences). Own test binary because
//! it switches the process-wide matmul selection.

mod common;

use common::{chat_ids, load_default_model};
use salus_models::dev_model::default_model_path;

/// Our logits on the real model equal candle-transformers' quantized_llama
/// (prefill of a chat prompt + greedy decode steps).
#[test]
fn default_model_logits_match_candle_quantized_llama() {
    use candle_core::{Device, IndexOp, Tensor};
    use salus_models::{PackedBatch, SeqId};
    // Candle's quantized matmul, as in the reference (this binary has one test).
    salus_models::qlinear::set_salus_kernels_enabled(false);
    let Some(lm) = load_default_model() else {
        return;
    };
    let bytes = std::fs::read(default_model_path()).unwrap();
    let mut cur = std::io::Cursor::new(bytes.as_slice());
    let content = candle_core::quantized::gguf_file::Content::read(&mut cur).unwrap();
    let mut r =
        candle_transformers::models::quantized_llama::ModelWeights::from_gguf(content, &mut cur, &Device::Cpu).unwrap();
    let ids = chat_ids(&lm, "What is the capital of France?");
    let mut cache = lm.model.new_cache();
    let mut b = PackedBatch::new();
    b.push(SeqId(0), &ids, 0).unwrap();
    let mut ours = lm.model.forward(&b, &mut cache).unwrap().i(0).unwrap();
    let mut theirs =
        r.forward(&Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap(), 0).unwrap().i(0).unwrap();
    for step in 0..8 {
        let d = (&ours - &theirs).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d < 1e-3, "step {step}: max |diff| = {d}");
        let tok = theirs.argmax(0).unwrap().to_scalar::<u32>().unwrap();
        let mut b = PackedBatch::new();
        b.push(SeqId(0), &[tok], ids.len() + step).unwrap();
        ours = lm.model.forward(&b, &mut cache).unwrap().i(0).unwrap();
        theirs = r.forward(&Tensor::new(&[[tok]], &Device::Cpu).unwrap(), ids.len() + step).unwrap().i(0).unwrap();
    }
}
