//! What one continuous-batching step costs on the default model, without the
//! scheduler or HTTP: a batched decode step (B sequences, one token each, each
//! with `ctx` cached tokens) per KV-cache dtype, and a prefill of one prompt.
//! These are the two numbers the scheduler's throughput and time to first
//! token are made of: aggregate decode tok/s at concurrency B is at most
//! B / step time, and a request's first token waits for the prefills ahead of it.
//!
//! Run: `cargo bench --bench step`. Environment: `SALUS_MODEL` (model path; see
//! `salus_models::dev_model` for where else it looks),
//! `SALUS_BENCH_BATCHES` (default `1,4,8,16`), `SALUS_BENCH_CTX` (cached tokens
//! per sequence, default 200), `SALUS_BENCH_STEPS` (decode steps timed, 32),
//! `SALUS_BENCH_KV` (dtypes, default `f32,f16,bf16`), `SALUS_BENCH_CPU_PATH`
//! (kernel path, default the fastest), `SALUS_BENCH_PROMPT`
//! (prefill length, default 256).

use std::time::Instant;

use salus_models::paged_cache::{BlockManager, KvDtype, PagedCacheConfig, PagedKvCache};
use salus_models::{load, LoadOptions, ModelSource, PackedBatch, SeqId};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn env_list(name: &str, default: &str) -> Vec<String> {
    std::env::var(name)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let Some(path) = salus_models::dev_model::default_model_if_present() else {
        return;
    };
    let batches: Vec<usize> =
        env_list("SALUS_BENCH_BATCHES", "1,4,8,16").iter().filter_map(|s| s.parse().ok()).collect();
    let ctx = env_usize("SALUS_BENCH_CTX", 200).max(1);
    let steps = env_usize("SALUS_BENCH_STEPS", 32).max(1);
    let prompt_len = env_usize("SALUS_BENCH_PROMPT", 256).max(1);
    let dtypes: Vec<KvDtype> = env_list("SALUS_BENCH_KV", "f32,f16,bf16")
        .iter()
        .filter_map(|s| match s.as_str() {
            "f32" => Some(KvDtype::F32),
            "f16" => Some(KvDtype::F16),
            "bf16" => Some(KvDtype::BF16),
            _ => None,
        })
        .collect();
    let source = ModelSource::read_plaintext(&path).expect("read model");
    // `SALUS_BENCH_CPU_PATH=avx2` (or scalar, avx512vnni) measures another kernel path.
    let kernels = std::env::var("SALUS_BENCH_CPU_PATH")
        .ok()
        .map(|cpu_path| salus_models::KernelConfig { cpu_path, ..Default::default() });
    let lm = load(&source, &LoadOptions { kernels, ..LoadOptions::default() }).expect("load model");
    let cfg = lm.model.config().clone();
    let vocab = cfg.vocab_size as u32;
    // Deterministic pseudo-random tokens (the speed does not depend on them).
    let token = |seq: usize, pos: usize| ((seq * 7919 + pos * 104_729) as u32 % (vocab - 3)) + 3;
    let max_batch = batches.iter().copied().max().unwrap_or(1);
    println!("model: {}", path.display());
    println!("decode step: B sequences × 1 token, {ctx} cached tokens each, median of {steps} steps");
    for &dtype in &dtypes {
        let block_size = salus_models::paged_cache::DEFAULT_BLOCK_SIZE;
        let per_seq = (ctx + steps + 1).max(prompt_len).div_ceil(block_size) + 1;
        let cache_cfg = PagedCacheConfig {
            num_layers: cfg.num_layers,
            num_kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
            block_size,
            num_blocks: per_seq * (max_batch + 1),
            dtype,
        };
        let mut cache = PagedKvCache::new(cache_cfg).expect("paged cache");
        // Prefill: one prompt in one step.
        let prompt: Vec<u32> = (0..prompt_len).map(|p| token(999, p)).collect();
        let pseq = SeqId(999_999);
        let mut prefill = Vec::new();
        for _ in 0..3 {
            cache.reserve(pseq, prompt_len);
            let mut b = PackedBatch::new();
            b.push(pseq, &prompt, 0).expect("batch");
            let t = Instant::now();
            lm.model.forward(&b, &mut cache).expect("prefill");
            prefill.push(t.elapsed().as_secs_f64());
            cache.release(pseq);
        }
        let pf = median(prefill);
        println!(
            "kv {:>4}: prefill {prompt_len} tokens {:7.1} ms ({:6.1} tok/s)",
            dtype.as_str(),
            pf * 1e3,
            prompt_len as f64 / pf
        );
        let mut single: Option<f64> = None;
        for &b in &batches {
            // Fill b sequences to `ctx` tokens (chunks of 256, like the scheduler).
            let seqs: Vec<SeqId> = (0..b).map(|i| SeqId(i as u64)).collect();
            for (i, &s) in seqs.iter().enumerate() {
                cache.reserve(s, ctx + steps + 1);
                let toks: Vec<u32> = (0..ctx).map(|p| token(i, p)).collect();
                let mut pos = 0;
                while pos < ctx {
                    let end = (pos + 256).min(ctx);
                    let mut pb = PackedBatch::new();
                    pb.push(s, &toks[pos..end], pos).expect("batch");
                    lm.model.forward(&pb, &mut cache).expect("fill");
                    pos = end;
                }
            }
            let mut times = Vec::with_capacity(steps);
            for step in 0..steps {
                let mut pb = PackedBatch::new();
                for (i, &s) in seqs.iter().enumerate() {
                    pb.push(s, &[token(i, ctx + step)], ctx + step).expect("batch");
                }
                let t = Instant::now();
                let logits = lm.model.forward(&pb, &mut cache).expect("decode");
                let v = logits.flatten_all().and_then(|l| l.to_vec1::<f32>()).expect("logits");
                times.push(t.elapsed().as_secs_f64());
                assert_eq!(v.len(), b * cfg.vocab_size);
            }
            for s in seqs {
                cache.release(s);
            }
            let t = median(times);
            if b == 1 {
                single = Some(t);
            }
            let scaling = single.map(|t1| format!("  {:.2}× the batch-1 rate", b as f64 * t1 / t)).unwrap_or_default();
            println!(
                "kv {:>4}: batch {b:>3}: step {:7.2} ms  {:7.1} tok/s{scaling}",
                dtype.as_str(),
                t * 1e3,
                b as f64 / t
            );
        }
    }
}
