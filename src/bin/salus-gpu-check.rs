//! `salus-gpu-check`: the CUDA checks and throughput benchmark of
//! `scripts/gpu-check.sh`, as one binary (the GPU machine has no cargo).
//!
//! 1. Correctness (tiny random models, no download):
//!    - paged attention on the device equals a naive reference attention
//!      (f32/f16/bf16 KV, with and without a sliding window);
//!    - device logits equal CPU logits (the same seeded model in the same dtype
//!      on the CPU, contiguous cache): within 1e-4 in f32, 1e-2 in bf16 (bf16
//!      KV), both scaled by max(1, largest |logit|);
//!    - continuous batching: greedy outputs of concurrent sequences equal
//!      their solo outputs (f32 model on the device);
//!    - released KV blocks are zeroed on the device, and only those.
//! 2. Throughput: a synthetic Llama-3-8B-shaped model (random bf16 weights
//!    drawn on the device), decode at batch 1, 8, 32, 128 and a 2,048-token
//!    prefill; tokens/s and, at batch 1, the fraction of the memory bandwidth
//!    (weights + KV bytes read per step / step time).
//!
//! Writes one JSON report. Exit status 0 when every check passed (benchmark
//! targets are reported, not enforced). `--device cpu --bench-shape tiny` runs
//! the same code on CPU in seconds.

use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{DType, Device};
use clap::Parser;
use salus_models::config::{Architecture, DecoderConfig, RopeScaling, RopeStyle};
use salus_models::device_check as dc;
use salus_models::kv_cache::ContiguousKvCache;
use salus_models::paged_cache::KvDtype;
use salus_models::weights::{SyntheticInit, Weights};
use salus_models::{Model, PackedBatch, SeqId};
use serde_json::{json, Value};

#[derive(Parser)]
#[command(name = "salus-gpu-check", about = "CUDA correctness checks and throughput benchmark (JSON report)")]
struct Args {
    /// Device to check: `cuda:N` (or `cpu` for a dry run).
    #[arg(long, default_value = "cuda:0")]
    device: String,
    /// Where to write the JSON report.
    #[arg(long, required_unless_present = "nvrtc_only")]
    out: Option<std::path::PathBuf>,
    /// Only compile Salus' CUDA kernels with NVRTC for this architecture
    /// (e.g. sm_90) and exit: needs libnvrtc, not a GPU (the CI compile check).
    #[arg(long)]
    nvrtc_only: Option<String>,
    /// Benchmark model shape: `llama3-8b` or `tiny` (for dry runs).
    #[arg(long, default_value = "llama3-8b", value_parser = ["llama3-8b", "tiny"])]
    bench_shape: String,
    /// Skip the throughput benchmark.
    #[arg(long)]
    skip_bench: bool,
    /// Decode steps timed per batch size.
    #[arg(long, default_value_t = 32)]
    decode_steps: usize,
    /// Prompt tokens per sequence before the decode measurements.
    #[arg(long, default_value_t = 128)]
    context: usize,
    /// Peak memory bandwidth of the device in TB/s (H200: 4.8).
    #[arg(long, default_value_t = 4.8)]
    peak_tbps: f64,
}

fn open_device(spec: &str) -> anyhow::Result<Device> {
    match spec {
        "cpu" => Ok(Device::Cpu),
        s => {
            let n: usize = s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .with_context(|| format!("--device {s}: use cpu or cuda:N"))?;
            Device::new_cuda(n).map_err(|e| {
                anyhow::anyhow!("--device {s}: {}", e.to_string().lines().next().unwrap_or("no CUDA device"))
            })
        }
    }
}

fn device_name(device: &Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => d.cuda_stream().context().name().unwrap_or_else(|_| "cuda".into()),
        #[allow(unreachable_patterns)]
        _ => "unknown".into(),
    }
}

fn check(name: &str, pass: bool, detail: Value, checks: &mut Vec<Value>) {
    println!("[{}] {name}: {detail}", if pass { "PASS" } else { "FAIL" });
    checks.push(json!({ "name": name, "pass": pass, "detail": detail }));
}

fn correctness(device: &Device, checks: &mut Vec<Value>) -> anyhow::Result<()> {
    for kv in [KvDtype::F32, KvDtype::F16, KvDtype::BF16] {
        for window in [None, Some(50)] {
            let diff = dc::paged_attention_vs_reference(device, kv, window, 7)?;
            let tol = 1e-4;
            check(
                &format!("paged_attention_vs_reference kv={} window={window:?}", kv.as_str()),
                diff < tol,
                json!({ "max_abs_diff": diff, "tolerance": tol }),
                checks,
            );
        }
    }
    let cfg = dc::tiny_config()?;
    let prompts = dc::random_prompts(4, 5, 60, cfg.vocab_size, 3);
    // Reference: the same seeded model in the same dtype on the CPU, with the
    // contiguous cache (candle attention). Candidate: the device model with the
    // paged cache and Salus' kernels.
    for (dtype, kv, tol) in [(DType::F32, KvDtype::F32, 1e-4f32), (DType::BF16, KvDtype::BF16, 1e-2)] {
        let cpu = dc::seeded_model(&cfg, &Device::Cpu, dtype, 11)?;
        let c = cpu.config();
        let mut reference =
            ContiguousKvCache::new(c.num_layers, c.num_kv_heads, c.head_dim, c.max_context, dtype, &Device::Cpu);
        let want = dc::logits_trace(&cpu, &mut reference, &prompts, 16, 6)?;
        let model = dc::seeded_model(&cfg, device, dtype, 11)?;
        let mut cache = dc::paged_cache_for(&model, 256, kv)?;
        let got = dc::logits_trace(&model, &mut cache, &prompts, 16, 6)?;
        let (diff, scale) = dc::max_abs_diff(&want, &got);
        let bound = tol * scale.max(1.0);
        check(
            &format!("logits_vs_cpu dtype={dtype:?} kv={}", kv.as_str()),
            diff <= bound,
            json!({ "max_abs_diff": diff, "max_abs_logit": scale, "bound": bound }),
            checks,
        );
    }
    for kv in [KvDtype::F32, KvDtype::BF16] {
        let (held, zeroed, written, kept) = dc::released_blocks_are_zeroed(device, kv)?;
        check(
            &format!("released_kv_blocks_are_zeroed kv={}", kv.as_str()),
            held == written && zeroed == written && kept,
            json!({ "blocks_written": written, "nonzero_while_held": held, "zero_after_release": zeroed, "other_sequence_kept": kept }),
            checks,
        );
    }
    let model = dc::seeded_model(&cfg, device, DType::F32, 5)?;
    let prompts = dc::random_prompts(8, 3, 70, cfg.vocab_size, 9);
    let (matched, total) = dc::batching_equivalence(&model, &prompts, 16, 16, KvDtype::F32)?;
    check(
        "continuous_batching_equals_solo (8 concurrent greedy sequences, f32)",
        matched == total,
        json!({ "matched": matched, "total": total }),
        checks,
    );
    Ok(())
}

fn bench_config(shape: &str) -> anyhow::Result<DecoderConfig> {
    let (vocab, hidden, inter, layers, heads, kv) = match shape {
        "tiny" => (512, 256, 512, 2, 8, 2),
        _ => (128_256, 4096, 14_336, 32, 32, 8),
    };
    Ok(DecoderConfig {
        architecture: Architecture::Llama,
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: inter,
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: kv,
        head_dim: hidden / heads,
        rms_norm_eps: 1e-5,
        rope_theta: 500_000.0,
        rope_scaling: RopeScaling::None,
        rope_style: RopeStyle::HalfSplit,
        max_context: 8192,
        tie_embeddings: false,
        attention_bias: false,
        sliding_window: None,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
    }
    .validate()?)
}

fn sync(device: &Device) -> anyhow::Result<()> {
    device.synchronize()?;
    Ok(())
}

fn bench(device: &Device, args: &Args) -> anyhow::Result<Value> {
    let cfg = bench_config(&args.bench_shape)?;
    let dtype = if device.is_cpu() { DType::F32 } else { DType::BF16 };
    let t0 = Instant::now();
    let model = Model::from_weights(&Weights::synthetic(SyntheticInit::OnDevice, device, dtype), &cfg)?;
    sync(device)?;
    let load_s = t0.elapsed().as_secs_f64();
    let (h, inter, v, l) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_layers);
    let (q_out, kv_out) = (cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim);
    let elem = dtype.size_in_bytes() as f64;
    // Weights read per decode step: every projection, the MLP, the norms and
    // the output head (the embedding table only contributes one row per token).
    let per_layer = h * (q_out + 2 * kv_out) + q_out * h + 3 * h * inter + 2 * h;
    let weight_bytes = ((l * per_layer + h + v * h) as f64) * elem;
    let kv_bytes_per_token = (2 * l * kv_out) as f64 * 2.0; // bf16 KV
    println!("synthetic model: {:.2} GB of weights read per step, built in {load_s:.1} s", weight_bytes / 1e9);

    let batches = [1usize, 8, 32, 128];
    let max_b = *batches.iter().max().unwrap_or(&1);
    let ctx = args.context;
    let steps = args.decode_steps.max(1);
    let tokens = (max_b * (ctx + steps + 4 + 16)).max(2 * 2048 + 64);
    let mut cache = dc::paged_cache_for(&model, tokens, KvDtype::BF16)?;
    let mut rng_tok = 7u32;
    let mut next_tok = || {
        rng_tok = rng_tok.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        3 + (rng_tok >> 8) % (v as u32 - 3)
    };
    let mut decode = Vec::new();
    let mut batch1_step_s = 0.0;
    for &b in &batches {
        // Prefill b sequences of `ctx` tokens, at most 4096 tokens per step.
        let mut pending: Vec<u64> = (0..b as u64).collect();
        while !pending.is_empty() {
            let mut pb = PackedBatch::new();
            while let Some(&s) = pending.first() {
                if pb.num_tokens() + ctx > 4096 && !pb.is_empty() {
                    break;
                }
                let toks: Vec<u32> = (0..ctx).map(|_| next_tok()).collect();
                pb.push(SeqId(s), &toks, 0)?;
                pending.remove(0);
            }
            model.forward(&pb, &mut cache)?;
        }
        let mut pos = ctx;
        let mut last: Vec<u32> = vec![5; b];
        let mut step = |pos: usize, last: &mut Vec<u32>| -> anyhow::Result<()> {
            let mut pb = PackedBatch::new();
            for (s, t) in last.iter().enumerate() {
                pb.push(SeqId(s as u64), &[*t], pos)?;
            }
            let logits = model.forward(&pb, &mut cache)?;
            *last = logits.argmax(1)?.to_vec1::<u32>()?;
            Ok(())
        };
        for _ in 0..3 {
            step(pos, &mut last)?;
            pos += 1;
        }
        sync(device)?;
        let t = Instant::now();
        for _ in 0..steps {
            step(pos, &mut last)?;
            pos += 1;
        }
        sync(device)?;
        let secs = t.elapsed().as_secs_f64();
        let step_s = secs / steps as f64;
        let tps = (b * steps) as f64 / secs;
        let mut row = json!({ "batch": b, "step_ms": step_s * 1e3, "tokens_per_s": tps, "context": ctx });
        if b == 1 {
            batch1_step_s = step_s;
            let avg_ctx = (ctx + 3 + steps / 2) as f64;
            let bytes = weight_bytes + avg_ctx * kv_bytes_per_token;
            let bw = bytes / step_s;
            row["bytes_per_step"] = json!(bytes);
            row["achieved_tbps"] = json!(bw / 1e12);
            row["fraction_of_peak_bandwidth"] = json!(bw / (args.peak_tbps * 1e12));
        }
        println!("decode batch {b:>3}: {:>9.1} tok/s ({:.2} ms/step)", tps, step_s * 1e3);
        decode.push(row);
        for s in 0..b as u64 {
            salus_models::KvCache::remove(&mut cache, SeqId(s));
        }
    }
    // Prefill of 2,048 tokens in one step (after one warm-up prefill).
    let prompt: Vec<u32> = (0..2048).map(|_| next_tok()).collect();
    let mut prefill_s = 0.0;
    for (i, seq) in [1000u64, 1001].into_iter().enumerate() {
        let mut pb = PackedBatch::new();
        pb.push(SeqId(seq), &prompt, 0)?;
        sync(device)?;
        let t = Instant::now();
        model.forward(&pb, &mut cache)?;
        sync(device)?;
        if i == 1 {
            prefill_s = t.elapsed().as_secs_f64();
        }
    }
    println!("prefill 2048 tokens: {:.1} ms ({:.0} tok/s)", prefill_s * 1e3, 2048.0 / prefill_s);
    let tps_1 = decode.first().and_then(|r| r["tokens_per_s"].as_f64()).unwrap_or(0.0);
    let tps_128 = decode.last().and_then(|r| r["tokens_per_s"].as_f64()).unwrap_or(0.0);
    let frac = decode.first().and_then(|r| r["fraction_of_peak_bandwidth"].as_f64()).unwrap_or(0.0);
    Ok(json!({
        "model": { "shape": args.bench_shape, "hidden": h, "layers": l, "heads": cfg.num_heads, "kv_heads": cfg.num_kv_heads,
                   "intermediate": inter, "vocab": v, "dtype": format!("{dtype:?}"), "kv_dtype": "bf16",
                   "weight_bytes_per_step": weight_bytes, "build_s": load_s },
        "decode": decode,
        "prefill": { "tokens": 2048, "seconds": prefill_s, "tokens_per_s": 2048.0 / prefill_s },
        "batch1_step_ms": batch1_step_s * 1e3,
        "peak_tbps": args.peak_tbps,
        "targets": {
            "batch1_fraction_of_bandwidth": { "value": frac, "target": 0.70, "met": frac >= 0.70 },
            "batch128_over_batch1": { "value": tps_128 / tps_1.max(1e-9), "target": 10.0, "met": tps_128 >= 10.0 * tps_1 },
        },
    }))
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

#[cfg(feature = "cuda")]
fn nvrtc_only(arch: &str) -> anyhow::Result<bool> {
    for hd in [64, 80, 96, 128, 256] {
        let t = Instant::now();
        let cubin = salus_kernels::cuda::compile_cubin(arch, hd)?;
        println!(
            "NVRTC: paged-attention kernels for {arch}, head_dim {hd}: {} bytes in {:.1} s",
            cubin.len(),
            t.elapsed().as_secs_f64()
        );
    }
    Ok(true)
}

#[cfg(not(feature = "cuda"))]
fn nvrtc_only(_arch: &str) -> anyhow::Result<bool> {
    bail!("this build has no CUDA support (build with --features cuda)")
}

fn run() -> anyhow::Result<bool> {
    let args = Args::parse();
    if let Some(arch) = &args.nvrtc_only {
        return nvrtc_only(arch);
    }
    let out_path = args.out.clone().context("--out is required")?;
    let device = open_device(&args.device)?;
    if !device.is_cpu() && !cfg!(feature = "cuda") {
        bail!("this build has no CUDA support (build with --features cuda)");
    }
    let name = device_name(&device);
    println!("salus-gpu-check on {} ({name})", args.device);
    let mut checks = Vec::new();
    let t = Instant::now();
    let correctness_err = correctness(&device, &mut checks).err().map(|e| format!("{e:#}"));
    if let Some(e) = &correctness_err {
        println!("[FAIL] correctness checks stopped: {e}");
    }
    let checks_s = t.elapsed().as_secs_f64();
    let bench = if args.skip_bench {
        Value::Null
    } else {
        match bench(&device, &args) {
            Ok(v) => v,
            Err(e) => json!({ "error": format!("{e:#}") }),
        }
    };
    let all_pass = correctness_err.is_none() && checks.iter().all(|c| c["pass"] == json!(true));
    let report = json!({
        "device": args.device,
        "device_name": name,
        "salus_version": env!("CARGO_PKG_VERSION"),
        "checks": checks,
        "checks_error": correctness_err,
        "checks_seconds": checks_s,
        "all_checks_passed": all_pass,
        "benchmark": bench,
    });
    std::fs::write(&out_path, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("writing {}", out_path.display()))?;
    println!("report written to {}", out_path.display());
    Ok(all_pass)
}
