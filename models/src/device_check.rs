//! Device-parity checks, shared by the CPU unit tests and `salus-gpu-check`.
//!
//! Each check takes the device (or a model already on it) as a parameter, so
//! the same code runs in the normal test suite on CPU and, on a GPU machine,
//! against CUDA: paged attention against a naive reference attention, the
//! logits of a tiny random model against the CPU reference path, and greedy
//! outputs of concurrent (continuously batched) sequences against their solo
//! runs. Nothing here downloads anything: models are random and seeded.

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};

use crate::batch::{PackedBatch, SeqId, SeqSpan};
use crate::config::{Architecture, DecoderConfig, RopeScaling, RopeStyle};
use crate::kv_cache::KvCache;
use crate::paged_cache::{KvDtype, PagedCacheConfig, PagedKvCache};
use crate::weights::{SyntheticInit, Weights};
use crate::{Model, Result};

/// A tiny Llama-shaped configuration (GQA, 2 layers) for parity checks.
pub fn tiny_config() -> Result<DecoderConfig> {
    DecoderConfig {
        architecture: Architecture::Llama,
        vocab_size: 512,
        hidden_size: 128,
        intermediate_size: 256,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 32,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        rope_scaling: RopeScaling::None,
        rope_style: RopeStyle::HalfSplit,
        max_context: 1024,
        tie_embeddings: false,
        attention_bias: false,
        sliding_window: None,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
    }
    .validate()
}

/// A random model of `cfg` on `device` in `dtype`; the same `seed` gives the
/// same weights on every device.
pub fn seeded_model(cfg: &DecoderConfig, device: &Device, dtype: DType, seed: u64) -> Result<Model> {
    Model::from_weights(&Weights::synthetic(SyntheticInit::HostSeeded(seed), device, dtype), cfg)
}

/// `n` random prompts of lengths spread over `min_len..=max_len`.
pub fn random_prompts(n: usize, min_len: usize, max_len: usize, vocab: usize, seed: u64) -> Vec<Vec<u32>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let len = rng.random_range(min_len..=max_len);
            (0..len).map(|_| rng.random_range(3..vocab as u32)).collect()
        })
        .collect()
}

/// A paged cache for `model` on its device holding `tokens` tokens.
pub fn paged_cache_for(model: &Model, tokens: usize, kv: KvDtype) -> Result<PagedKvCache> {
    let c = model.config();
    let block_size = 16;
    let cfg = PagedCacheConfig {
        num_layers: c.num_layers,
        num_kv_heads: c.num_kv_heads,
        head_dim: c.head_dim,
        block_size,
        num_blocks: tokens.div_ceil(block_size) + 1,
        dtype: kv,
    };
    PagedKvCache::new_on(cfg, model.device())
}

fn argmax_rows(logits: &Tensor) -> Result<Vec<u32>> {
    Ok(logits.argmax(1)?.to_vec1::<u32>()?)
}

/// Prefills each prompt alone (chunks of `chunk` tokens) and decodes `steps`
/// greedy tokens; returns every step's logits, flattened, in order.
pub fn logits_trace(
    model: &Model,
    cache: &mut dyn KvCache,
    prompts: &[Vec<u32>],
    chunk: usize,
    steps: usize,
) -> Result<Vec<f32>> {
    let mut out = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        let seq = SeqId(i as u64);
        let mut pos = 0;
        let mut last = None;
        for c in p.chunks(chunk) {
            let mut b = PackedBatch::new();
            b.push(seq, c, pos)?;
            pos += c.len();
            last = Some(model.forward(&b, cache)?);
        }
        for _ in 0..steps {
            let l = last.take().expect("prompts are non-empty");
            out.extend(l.flatten_all()?.to_vec1::<f32>()?);
            let next = argmax_rows(&l)?[0];
            let mut b = PackedBatch::new();
            b.push(seq, &[next], pos)?;
            pos += 1;
            last = Some(model.forward(&b, cache)?);
        }
        out.extend(last.expect("one step").flatten_all()?.to_vec1::<f32>()?);
        cache.remove(seq);
    }
    Ok(out)
}

/// Largest absolute difference and largest reference magnitude.
pub fn max_abs_diff(reference: &[f32], other: &[f32]) -> (f32, f32) {
    let diff = reference.iter().zip(other).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    let scale = reference.iter().map(|a| a.abs()).fold(0f32, f32::max);
    if reference.len() != other.len() {
        return (f32::INFINITY, scale);
    }
    (diff, scale)
}

/// Greedy generation of every prompt alone, then of all prompts at once (one
/// shared paged cache, chunked prefill mixed with decode steps, as the
/// scheduler does). Returns (sequences whose outputs match, total).
pub fn batching_equivalence(
    model: &Model,
    prompts: &[Vec<u32>],
    chunk: usize,
    max_new: usize,
    kv: KvDtype,
) -> Result<(usize, usize)> {
    // Every sequence rounds up to whole blocks.
    let total_tokens: usize = prompts.iter().map(|p| (p.len() + max_new).next_multiple_of(16)).sum();
    let mut solo = Vec::with_capacity(prompts.len());
    for (i, p) in prompts.iter().enumerate() {
        let mut cache = paged_cache_for(model, p.len() + max_new, kv)?;
        solo.push(run_together(model, &mut cache, std::slice::from_ref(p), chunk, max_new, i as u64)?.remove(0));
    }
    let mut cache = paged_cache_for(model, total_tokens, kv)?;
    let together = run_together(model, &mut cache, prompts, chunk, max_new, 0)?;
    let matched = solo.iter().zip(&together).filter(|(a, b)| a == b).count();
    Ok((matched, prompts.len()))
}

/// Runs all prompts concurrently: each step packs the next prefill chunk of
/// every prefilling sequence and one token of every decoding one.
fn run_together(
    model: &Model,
    cache: &mut PagedKvCache,
    prompts: &[Vec<u32>],
    chunk: usize,
    max_new: usize,
    first_id: u64,
) -> Result<Vec<Vec<u32>>> {
    let n = prompts.len();
    let mut pos = vec![0usize; n];
    let mut generated: Vec<Vec<u32>> = vec![Vec::new(); n];
    // Staggered start: sequence i joins at step i, so prefills overlap decodes.
    let mut step = 0usize;
    while generated.iter().any(|g| g.len() < max_new) {
        let mut b = PackedBatch::new();
        let mut members = Vec::new();
        for i in 0..n.min(step + 1) {
            if generated[i].len() >= max_new {
                continue;
            }
            let seq = SeqId(first_id + i as u64);
            let toks: Vec<u32> = if pos[i] < prompts[i].len() {
                let end = (pos[i] + chunk).min(prompts[i].len());
                prompts[i][pos[i]..end].to_vec()
            } else {
                vec![*generated[i].last().expect("decoding after a token")]
            };
            b.push(seq, &toks, pos[i])?;
            members.push((i, pos[i] + toks.len() >= prompts[i].len()));
            pos[i] += toks.len();
        }
        step += 1;
        if b.is_empty() {
            continue;
        }
        let next = argmax_rows(&model.forward(&b, cache)?)?;
        for ((i, done_prefill), t) in members.into_iter().zip(next) {
            if done_prefill {
                generated[i].push(t);
            }
        }
    }
    for i in 0..n {
        cache.remove(SeqId(first_id + i as u64));
    }
    Ok(generated)
}

/// Naive attention of one query row over `k`/`v` rows `[pos + 1, kv_heads, hd]`.
#[allow(clippy::too_many_arguments)] // the geometry, spelled out as in the kernel
fn reference_row(
    q: &[f32],
    ks: &[f32],
    vs: &[f32],
    pos: usize,
    h: usize,
    kvh: usize,
    hd: usize,
    window: Option<usize>,
) -> Vec<f32> {
    let group = h / kvh;
    let lo = window.map_or(0, |w| (pos + 1).saturating_sub(w));
    let scale = 1.0 / (hd as f32).sqrt();
    let mut out = vec![0f32; h * hd];
    for head in 0..h {
        let kh = head / group;
        let qh = &q[head * hd..(head + 1) * hd];
        let scores: Vec<f32> = (lo..=pos)
            .map(|j| {
                let k = &ks[(j * kvh + kh) * hd..(j * kvh + kh + 1) * hd];
                qh.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * scale
            })
            .collect();
        let m = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f32> = scores.iter().map(|s| (s - m).exp()).collect();
        let sum: f32 = e.iter().sum();
        for (j, w) in (lo..=pos).zip(&e) {
            let v = &vs[(j * kvh + kh) * hd..(j * kvh + kh + 1) * hd];
            for d in 0..hd {
                out[head * hd + d] += w / sum * v[d];
            }
        }
    }
    out
}

/// Paged attention on `device` (a mix of prefill chunks, single decode tokens
/// and a context long enough for several decode partitions) against a naive
/// f32 reference over K/V rounded to the cache dtype. Returns the largest
/// absolute difference of the outputs.
pub fn paged_attention_vs_reference(device: &Device, kv: KvDtype, window: Option<usize>, seed: u64) -> Result<f32> {
    let (h, kvh, hd) = (8usize, 2usize, 64usize);
    let cfg =
        PagedCacheConfig { num_layers: 1, num_kv_heads: kvh, head_dim: hd, block_size: 16, num_blocks: 160, dtype: kv };
    let mut cache = PagedKvCache::new_on(cfg, device)?;
    let kv_dt = match kv {
        KvDtype::F32 => DType::F32,
        KvDtype::F16 => DType::F16,
        KvDtype::BF16 => DType::BF16,
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // Per sequence: host copies of all K and V rows written so far.
    let mut hist: Vec<(Vec<f32>, Vec<f32>)> = vec![(Vec::new(), Vec::new()); 3];
    // Steps of (sequence, tokens): prefill chunks, decodes, a 700-token context.
    let steps: Vec<Vec<(usize, usize)>> = vec![
        vec![(0, 37), (1, 1), (2, 600)],
        vec![(0, 1), (1, 20), (2, 100)],
        vec![(0, 1), (1, 1), (2, 1)],
        vec![(0, 5), (2, 1)],
    ];
    let mut worst = 0f32;
    for step in steps {
        let total: usize = step.iter().map(|s| s.1).sum();
        let rand_vec = |rng: &mut rand::rngs::StdRng, n: usize| -> Vec<f32> {
            (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
        };
        let q = rand_vec(&mut rng, total * h * hd);
        let k = rand_vec(&mut rng, total * kvh * hd);
        let v = rand_vec(&mut rng, total * kvh * hd);
        // K/V as the cache stores them.
        let round = |x: &[f32]| -> Result<Vec<f32>> {
            Ok(Tensor::from_slice(x, x.len(), &Device::Cpu)?.to_dtype(kv_dt)?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
        };
        let (kr, vr) = (round(&k)?, round(&v)?);
        let mut spans = Vec::new();
        let mut off = 0;
        for &(s, len) in &step {
            let start_pos = hist[s].0.len() / (kvh * hd);
            spans.push(SeqSpan { seq: SeqId(s as u64), offset: off, len, start_pos });
            off += len;
        }
        let qt = Tensor::from_slice(&q, (total, h, hd), device)?;
        let kt = Tensor::from_slice(&k, (total, kvh, hd), device)?;
        let vt = Tensor::from_slice(&v, (total, kvh, hd), device)?;
        let out = cache.attend(0, &spans, &qt, &kt, &vt, window)?.flatten_all()?.to_vec1::<f32>()?;
        for sp in &spans {
            let s = sp.seq.0 as usize;
            let row = kvh * hd;
            for t in 0..sp.len {
                let r = sp.offset + t;
                hist[s].0.extend_from_slice(&kr[r * row..(r + 1) * row]);
                hist[s].1.extend_from_slice(&vr[r * row..(r + 1) * row]);
                let want = reference_row(
                    &q[r * h * hd..(r + 1) * h * hd],
                    &hist[s].0,
                    &hist[s].1,
                    sp.start_pos + t,
                    h,
                    kvh,
                    hd,
                    window,
                );
                let got = &out[r * h * hd..(r + 1) * h * hd];
                worst = worst.max(want.iter().zip(got).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max));
            }
        }
    }
    Ok(worst)
}

/// Zeroing of released KV blocks on `device` (see `crate::paged_cache`): two
/// sequences write K/V into a two-layer paged cache, one is released, then the
/// other is removed. Returns how many of the written blocks were non-zero
/// while held, how many were zero after their release (both should equal the
/// third number, the blocks written), and whether the sequence still held kept
/// its K/V while the other's blocks were zeroed.
pub fn released_blocks_are_zeroed(device: &Device, kv: KvDtype) -> Result<(usize, usize, usize, bool)> {
    use crate::paged_cache::BlockManager;
    let (h, kvh, hd) = (4usize, 2usize, 64usize);
    let cfg =
        PagedCacheConfig { num_layers: 2, num_kv_heads: kvh, head_dim: hd, block_size: 16, num_blocks: 16, dtype: kv };
    let mut cache = PagedKvCache::new_on(cfg, device)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let mut tensor = |rows: usize, heads: usize| -> Result<Tensor> {
        let x: Vec<f32> = (0..rows * heads * hd).map(|_| rng.random_range(0.5f32..1.0)).collect();
        Ok(Tensor::from_vec(x, (rows, heads, hd), device)?)
    };
    for (seq, len) in [(1u64, 40usize), (2, 20)] {
        let (q, k, v) = (tensor(len, h)?, tensor(len, kvh)?, tensor(len, kvh)?);
        let span = [SeqSpan { seq: SeqId(seq), offset: 0, len, start_pos: 0 }];
        for layer in 0..2 {
            cache.attend(layer, &span, &q, &k, &v, None)?;
        }
    }
    let (first, second) = (cache.block_table(SeqId(1)).to_vec(), cache.block_table(SeqId(2)).to_vec());
    let written = first.len() + second.len();
    let mut nonzero_held = 0;
    for &b in first.iter().chain(&second) {
        nonzero_held += usize::from(!cache.block_is_zeroed(b)?);
    }
    cache.release(SeqId(1));
    let mut zero_after = 0;
    for &b in &first {
        zero_after += usize::from(cache.block_is_zeroed(b)?);
    }
    let mut other_kept = true;
    for &b in &second {
        other_kept &= !cache.block_is_zeroed(b)?;
    }
    cache.remove(SeqId(2));
    for &b in &second {
        zero_after += usize::from(cache.block_is_zeroed(b)?);
    }
    Ok((nonzero_held, zero_after, written, other_kept))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv_cache::ContiguousKvCache;

    #[test]
    fn device_check_released_blocks_are_zeroed_on_cpu() {
        for kv in [KvDtype::F32, KvDtype::F16, KvDtype::BF16] {
            let (held, zeroed, written, kept) = released_blocks_are_zeroed(&Device::Cpu, kv).unwrap();
            assert_eq!(written, 5, "{kv:?}: 3 + 2 blocks of 16");
            assert_eq!((held, zeroed, kept), (written, written, true), "{kv:?}");
        }
    }

    #[test]
    fn device_check_paged_attention_matches_reference_on_cpu() {
        for kv in [KvDtype::F32, KvDtype::BF16] {
            for window in [None, Some(50)] {
                let d = paged_attention_vs_reference(&Device::Cpu, kv, window, 7).unwrap();
                assert!(d < 1e-4, "{kv:?} window {window:?}: max diff {d}");
            }
        }
    }

    #[test]
    fn device_check_paged_logits_match_contiguous_reference_on_cpu() {
        let cfg = tiny_config().unwrap();
        let model = seeded_model(&cfg, &Device::Cpu, DType::F32, 11).unwrap();
        let prompts = random_prompts(3, 5, 40, cfg.vocab_size, 3);
        let c = model.config();
        let mut reference =
            ContiguousKvCache::new(c.num_layers, c.num_kv_heads, c.head_dim, c.max_context, DType::F32, &Device::Cpu);
        let want = logits_trace(&model, &mut reference, &prompts, 16, 4).unwrap();
        let mut paged = paged_cache_for(&model, 64, KvDtype::F32).unwrap();
        let got = logits_trace(&model, &mut paged, &prompts, 16, 4).unwrap();
        let (diff, scale) = max_abs_diff(&want, &got);
        assert!(scale > 0.1, "logits are not degenerate");
        assert!(diff < 1e-4, "max diff {diff}");
        // The seed decides the weights: another seed gives other logits.
        let other = seeded_model(&cfg, &Device::Cpu, DType::F32, 12).unwrap();
        let mut paged = paged_cache_for(&other, 64, KvDtype::F32).unwrap();
        let got = logits_trace(&other, &mut paged, &prompts, 16, 4).unwrap();
        assert!(max_abs_diff(&want, &got).0 > 1e-2);
    }

    #[test]
    fn device_check_batching_equivalence_on_cpu() {
        let cfg = tiny_config().unwrap();
        let model = seeded_model(&cfg, &Device::Cpu, DType::F32, 5).unwrap();
        let prompts = random_prompts(5, 3, 45, cfg.vocab_size, 9);
        let (matched, total) = batching_equivalence(&model, &prompts, 16, 8, KvDtype::F32).unwrap();
        assert_eq!((matched, total), (5, 5));
    }
}
