//! A packed batch of several sequences at different positions gives the same
//! logits as running each sequence alone.

mod common;

use candle_core::{DType, IndexOp, Tensor};
use common::*;
use salus_models::{KvCache, LoadOptions, Model, ModelError, ModelSource, PackedBatch, SeqId, WeightBytes};

/// Logits of `seq` after feeding `chunks` one call each, alone in its own cache.
fn alone(model: &Model, chunks: &[&[u32]]) -> Tensor {
    let mut cache = model.new_cache();
    let mut pos = 0;
    let mut last = None;
    for c in chunks {
        let mut b = PackedBatch::new();
        b.push(SeqId(0), c, pos).unwrap();
        last = Some(model.forward(&b, &mut cache).unwrap().i(0).unwrap());
        pos += c.len();
    }
    last.unwrap()
}

fn check_model(model: &Model) {
    let a = tokens(1, 9);
    let b = tokens(2, 8);
    let c = tokens(3, 10);
    let mut cache = model.new_cache();
    // Earlier steps: B has 7 tokens cached, C has 3.
    let mut pre = PackedBatch::new();
    pre.push(SeqId(2), &b[..7], 0).unwrap();
    pre.push(SeqId(3), &c[..3], 0).unwrap();
    model.forward(&pre, &mut cache).unwrap();

    // Mixed step: A prefills 6 tokens, B decodes 1, C prefills a chunk of 4.
    let mut step = PackedBatch::new();
    step.push(SeqId(1), &a[..6], 0).unwrap();
    step.push(SeqId(2), &b[7..8], 7).unwrap();
    step.push(SeqId(3), &c[3..7], 3).unwrap();
    let logits = model.forward(&step, &mut cache).unwrap();
    assert_eq!(logits.dims(), &[3, VOCAB]);
    assert_eq!(logits.dtype(), DType::F32);
    let want = [alone(model, &[&a[..6]]), alone(model, &[&b[..7], &b[7..8]]), alone(model, &[&c[..3], &c[3..7]])];
    for (i, w) in want.iter().enumerate() {
        let d = max_abs_diff(&logits.i(i).unwrap(), w);
        assert!(d < 1e-4, "sequence {i} in the mixed batch: max |diff| = {d}");
    }

    // Pure decode step for all three, in a different order.
    let mut step = PackedBatch::new();
    step.push(SeqId(3), &c[7..8], 7).unwrap();
    step.push(SeqId(1), &a[6..7], 6).unwrap();
    step.push(SeqId(2), &b[..1], 8).unwrap();
    let logits = model.forward(&step, &mut cache).unwrap();
    let want = [
        alone(model, &[&c[..3], &c[3..7], &c[7..8]]),
        alone(model, &[&a[..6], &a[6..7]]),
        alone(model, &[&b[..7], &b[7..8], &b[..1]]),
    ];
    for (i, w) in want.iter().enumerate() {
        let d = max_abs_diff(&logits.i(i).unwrap(), w);
        assert!(d < 1e-4, "sequence {i} in the decode batch: max |diff| = {d}");
    }
    // Different sequences give different logits (the comparison is not vacuous).
    assert!(max_abs_diff(&logits.i(0).unwrap(), &logits.i(1).unwrap()) > 1e-3);

    assert_eq!(cache.seq_len(SeqId(1)), 7);
    assert_eq!(cache.seq_len(SeqId(2)), 9);
    assert_eq!(cache.seq_len(SeqId(3)), 8);
    cache.remove(SeqId(2));
    assert_eq!(cache.seq_len(SeqId(2)), 0);
}

#[test]
fn packed_batch_equals_sequences_alone_gguf() {
    let src = ModelSource::from_gguf_bytes("tiny.gguf", WeightBytes::from_vec(gguf_bytes("llama", 21)));
    check_model(&Model::load_weights(&src, &LoadOptions::default()).unwrap().0);
}

#[test]
fn packed_batch_equals_sequences_alone_safetensors_qwen2_window() {
    let json = format!(
        r#"{{"model_type":"qwen2","vocab_size":{VOCAB},"hidden_size":{HIDDEN},"intermediate_size":{INTER},
        "num_hidden_layers":{LAYERS},"num_attention_heads":{HEADS},"num_key_value_heads":{KV_HEADS},
        "max_position_embeddings":256,"sliding_window":4,"use_sliding_window":true,"rms_norm_eps":1e-6}}"#
    );
    let src = hf_source(&json, &hf_tensors(22, true, true), 1, DType::F32);
    check_model(&Model::load_weights(&src, &LoadOptions::default()).unwrap().0);
}

#[test]
fn inconsistent_batches_are_rejected() {
    let src = ModelSource::from_gguf_bytes("tiny.gguf", WeightBytes::from_vec(gguf_bytes("llama", 23)));
    let model = Model::load_weights(&src, &LoadOptions::default()).unwrap().0;
    let mut cache = model.new_cache();
    let mut b = PackedBatch::new();
    b.push(SeqId(1), &[1, 2, 3], 0).unwrap();
    model.forward(&b, &mut cache).unwrap();
    // Wrong start position (a gap), then a repeated position.
    for start in [5, 2] {
        let mut b = PackedBatch::new();
        b.push(SeqId(1), &[4], start).unwrap();
        assert!(matches!(model.forward(&b, &mut cache), Err(ModelError::InvalidBatch(_))));
    }
    assert_eq!(cache.seq_len(SeqId(1)), 3);
    // Token outside the vocabulary.
    let mut b = PackedBatch::new();
    b.push(SeqId(1), &[VOCAB as u32], 3).unwrap();
    assert!(matches!(model.forward(&b, &mut cache), Err(ModelError::InvalidBatch(_))));
    // Past the context window (256).
    let mut b = PackedBatch::new();
    b.push(SeqId(9), &vec![1u32; 257], 0).unwrap();
    assert!(matches!(model.forward(&b, &mut cache), Err(ModelError::ContextOverflow { .. })));
    // Empty batch.
    assert!(model.forward(&PackedBatch::new(), &mut cache).is_err());
}
