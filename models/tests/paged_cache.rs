//! The paged KV cache gives the same logits as the contiguous cache for packed
//! batches of several sequences (prefill chunks at offsets, decode steps, GQA,
//! sliding window), for every KV storage type.

mod common;

use candle_core::{DType, Device, IndexOp};
use common::*;
use salus_models::paged_cache::{BlockManager, KvDtype, PagedCacheConfig, PagedKvCache, PrefixScope};
use salus_models::{ContiguousKvCache, KvCache, LoadOptions, Model, ModelSource, PackedBatch, SeqId, WeightBytes};

fn paged(model: &Model, block_size: usize, num_blocks: usize, dtype: KvDtype) -> PagedKvCache {
    let c = model.config();
    PagedKvCache::new(PagedCacheConfig {
        num_layers: c.num_layers,
        num_kv_heads: c.num_kv_heads,
        head_dim: c.head_dim,
        block_size,
        num_blocks,
        dtype,
    })
    .unwrap()
}

/// Runs the same three steps through both caches and compares the logits.
fn check(model: &Model, block_size: usize, dtype: KvDtype, tol: f32) {
    let (a, b, c) = (tokens(1, 9), tokens(2, 8), tokens(3, 12));
    // The contiguous cache stores K/V in the same type, so both round identically.
    let cfg = model.config();
    let cdt = match dtype {
        KvDtype::F32 => DType::F32,
        KvDtype::F16 => DType::F16,
        KvDtype::BF16 => DType::BF16,
    };
    let mut contiguous =
        ContiguousKvCache::new(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, cfg.max_context, cdt, &Device::Cpu);
    let mut pg = paged(model, block_size, 64, dtype);
    // Pre-reserve one sequence through the block manager (as the scheduler does);
    // the others get blocks allocated on demand.
    assert!(pg.reserve(SeqId(3), 12));
    type Step<'a> = Vec<(u64, std::ops::Range<usize>, &'a Vec<u32>)>;
    let steps: Vec<Step> = vec![
        vec![(2, 0..7, &b), (3, 0..3, &c)],
        vec![(1, 0..6, &a), (2, 7..8, &b), (3, 3..10, &c)],
        vec![(3, 10..11, &c), (1, 6..7, &a), (2, 0..1, &b)],
    ];
    let mut pos = std::collections::HashMap::<u64, usize>::new();
    for (i, step) in steps.iter().enumerate() {
        let mut batch = PackedBatch::new();
        for (seq, range, toks) in step {
            let p = pos.entry(*seq).or_default();
            batch.push(SeqId(*seq), &toks[range.clone()], *p).unwrap();
            *p += range.len();
        }
        let want = model.forward(&batch, &mut contiguous).unwrap();
        let got = model.forward(&batch, &mut pg).unwrap();
        assert_eq!(got.dims(), want.dims());
        for r in 0..step.len() {
            let w = want.i(r).unwrap();
            let scale = w.abs().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap().max(1.0);
            let d = max_abs_diff(&got.i(r).unwrap(), &w) / scale;
            assert!(d < tol, "{dtype:?} block {block_size} step {i} seq row {r}: max relative |diff| = {d}");
        }
        if i == 1 {
            // Not vacuous: sequences differ.
            assert!(max_abs_diff(&got.i(0).unwrap(), &got.i(1).unwrap()) > 1e-3);
        }
    }
    assert_eq!(pg.seq_len(SeqId(3)), 11);
    assert_eq!(pg.seq_len(SeqId(2)), 9);
    let used = pg.total_blocks() - pg.free_blocks();
    // Sequence 3 holds its 12 reserved tokens' blocks; the others what they used.
    assert_eq!(used, 7usize.div_ceil(block_size) + 9usize.div_ceil(block_size) + 12usize.div_ceil(block_size));
    for s in 1..=3 {
        pg.remove(SeqId(s));
    }
    assert_eq!(pg.free_blocks(), 64, "removing the sequences frees every block");
}

#[test]
fn paged_cache_matches_contiguous_gguf_llama() {
    let src = ModelSource::from_gguf_bytes("tiny.gguf", WeightBytes::from_vec(gguf_bytes("llama", 31)));
    let model = Model::load_weights(&src, &LoadOptions::default()).unwrap().0;
    for bs in [1, 4, 16] {
        check(&model, bs, KvDtype::F32, 1e-5);
    }
    check(&model, 4, KvDtype::F16, 1e-4);
    check(&model, 8, KvDtype::BF16, 1e-4);
}

#[test]
fn paged_cache_matches_contiguous_qwen2_sliding_window() {
    let json = format!(
        r#"{{"model_type":"qwen2","vocab_size":{VOCAB},"hidden_size":{HIDDEN},"intermediate_size":{INTER},
        "num_hidden_layers":{LAYERS},"num_attention_heads":{HEADS},"num_key_value_heads":{KV_HEADS},
        "max_position_embeddings":256,"sliding_window":4,"use_sliding_window":true,"rms_norm_eps":1e-6}}"#
    );
    let src = hf_source(&json, &hf_tensors(32, true, true), 1, DType::F32);
    let model = Model::load_weights(&src, &LoadOptions::default()).unwrap().0;
    check(&model, 2, KvDtype::F32, 1e-4);
    check(&model, 3, KvDtype::F32, 1e-4);
}

/// A sequence that attaches cached prefix blocks gets bitwise the logits it
/// would get computing its whole prompt, in prefill and in the decode after it;
/// another scope attaches nothing.
#[test]
fn paged_prefix_cache_reuse_is_bitwise_equal_to_recomputing() {
    let src = ModelSource::from_gguf_bytes("tiny.gguf", WeightBytes::from_vec(gguf_bytes("llama", 31)));
    let model = Model::load_weights(&src, &LoadOptions::default()).unwrap().0;
    let bs = 4;
    let a = tokens(1, 13);
    let mut b: Vec<u32> = a[..9].to_vec();
    b.extend(tokens(2, 5));
    let scope = PrefixScope::new("alice");

    let mut cached = paged(&model, bs, 64, KvDtype::BF16).with_prefix_cache(true);
    let mut batch = PackedBatch::new();
    batch.push(SeqId(1), &a, 0).unwrap();
    assert_eq!(cached.attach_cached_prefix(SeqId(1), &scope, &a[..a.len() - 1]), 0, "nothing cached yet");
    model.forward(&batch, &mut cached).unwrap();
    cached.register_computed(SeqId(1), &a);
    assert_eq!(cached.cached_blocks(), 3);
    cached.remove(SeqId(1));

    assert_eq!(cached.attach_cached_prefix(SeqId(9), &PrefixScope::new("bob"), &b[..b.len() - 1]), 0);
    cached.release(SeqId(9));
    // b shares a's first 9 tokens: two whole blocks.
    let hit = cached.attach_cached_prefix(SeqId(2), &scope, &b[..b.len() - 1]);
    assert_eq!(hit, 8);
    assert_eq!(cached.seq_len(SeqId(2)), 8);

    let mut fresh = paged(&model, bs, 64, KvDtype::BF16);
    let mut full = PackedBatch::new();
    full.push(SeqId(2), &b, 0).unwrap();
    let want = model.forward(&full, &mut fresh).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let mut rest = PackedBatch::new();
    rest.push(SeqId(2), &b[hit..], hit).unwrap();
    let got = model.forward(&rest, &mut cached).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(got, want, "prefill after a cached prefix");

    let mut decode = PackedBatch::new();
    decode.push(SeqId(2), &[7], b.len()).unwrap();
    let want = model.forward(&decode, &mut fresh).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let got = model.forward(&decode, &mut cached).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(got, want, "decode after a cached prefix");
}
