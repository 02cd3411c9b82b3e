//! Continuous batching measured in process (no HTTP): the default model behind
//! `ContinuousBatchingEngine`, a concurrency sweep of greedy requests over the
//! built-in synthetic clinical notes, reporting aggregate output tok/s, TTFT,
//! inter-token latency and end-to-end latency per level (same summary code as
//! `salus-bench`, which measures the same through the HTTP server).
//!
//! Run: `cargo bench --bench batching`. Environment: `SALUS_MODEL` (model path),
//! `SALUS_BENCH_LEVELS` (default `1,4,8,16`), `SALUS_BENCH_MAX_TOKENS` (128),
//! `SALUS_BENCH_REQUESTS` (requests per level; default 2 × concurrency, at least 4),
//! `SALUS_BENCH_OUT` (JSON path; an SVG is written next to it).

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use salus_models::paged_cache::PrefixScope;
use salus_models::{DecodeParams, LoadOptions, ModelSource, Phi, SamplingParams, WeightBytes};
use salus_server::engine::{Engine, GenerationEvent, GenerationRequest, RequestId};
use salus_server::scheduler::{ContinuousBatchingEngine, SchedulerConfig};
use salus_tools::bench_report::{summarize, synthetic_prompts, Sample};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    let path = std::env::var("SALUS_MODEL").map(PathBuf::from).unwrap_or_else(|_| {
        PathBuf::from(std::env::var("HOME").unwrap_or_default())
            .join(".cache/salus/models/SmolLM2-135M-Instruct.Q4_1.gguf")
    });
    let levels: Vec<usize> = std::env::var("SALUS_BENCH_LEVELS")
        .unwrap_or_else(|_| "1,4,8,16".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let max_tokens = env_usize("SALUS_BENCH_MAX_TOKENS", 128);
    let bytes = std::fs::read(&path).expect("read the model file (set SALUS_MODEL)");
    let src = ModelSource::from_gguf_bytes("model.gguf", WeightBytes::from_vec(bytes));
    let lm = Arc::new(salus_models::load(&src, &LoadOptions::default()).expect("load model"));
    let prompts: Vec<Vec<u32>> = synthetic_prompts()
        .iter()
        .map(|p| {
            let text = format!("<|im_start|>user\n{p}<|im_end|>\n<|im_start|>assistant\n");
            lm.tokenizer.encode(&text, false).expect("tokenize")
        })
        .collect();
    let lens: Vec<usize> = prompts.iter().map(|p| p.len()).collect();
    eprintln!("prompt lengths (tokens): {lens:?}");
    let engine = Arc::new(ContinuousBatchingEngine::start(lm, SchedulerConfig::default()).expect("start engine"));
    let prompts = Arc::new(prompts);
    let mut summaries = Vec::new();
    let mut next_id = 0usize;
    for &c in &levels {
        let n = env_usize("SALUS_BENCH_REQUESTS", (2 * c).max(4));
        let counter = Arc::new(AtomicUsize::new(0));
        let start = Instant::now();
        let base = next_id;
        next_id += n;
        let threads: Vec<_> = (0..c)
            .map(|_| {
                let (engine, prompts, counter) = (engine.clone(), prompts.clone(), counter.clone());
                std::thread::spawn(move || {
                    let mut out = Vec::new();
                    loop {
                        let i = counter.fetch_add(1, Ordering::Relaxed);
                        if i >= n {
                            break out;
                        }
                        out.push(one(&engine, &prompts[(base + i) % prompts.len()], base + i, max_tokens));
                    }
                })
            })
            .collect();
        let samples: Vec<Sample> = threads.into_iter().flat_map(|t| t.join().expect("bench thread")).collect();
        let s = summarize(c, &samples, 0, start.elapsed());
        let st = engine.stats();
        eprintln!("level {c}: done ({} preemptions so far, {} steps)", st.preemptions_total, st.steps_total);
        summaries.push(s);
    }
    println!("in-process continuous batching, default model, max_tokens {max_tokens}, greedy");
    print!("{}", salus_tools::bench_report::table(&summaries));
    if let Some(c1) = summaries.iter().find(|l| l.concurrency == 1) {
        for l in summaries.iter().filter(|l| l.concurrency > 1) {
            println!("c{} / c1 throughput: {:.2}x", l.concurrency, l.output_tok_per_s / c1.output_tok_per_s);
        }
    }
    if let Ok(out) = std::env::var("SALUS_BENCH_OUT") {
        let json = salus_tools::bench_report::to_json("in-process", max_tokens, true, &summaries);
        std::fs::write(&out, serde_json::to_string_pretty(&json).unwrap()).expect("write JSON");
        let svg = PathBuf::from(&out).with_extension("svg");
        std::fs::write(&svg, salus_tools::bench_report::to_svg("Salus in-process continuous batching", &summaries))
            .expect("write SVG");
    }
}

fn one(engine: &ContinuousBatchingEngine, prompt: &[u32], i: usize, max_tokens: usize) -> Sample {
    let req = GenerationRequest {
        request_id: RequestId(format!("bench-{i}")),
        prompt_tokens: Phi::new(prompt.to_vec()),
        n: 1,
        first_choice: 0,
        decode: DecodeParams {
            max_tokens,
            sampling: SamplingParams { temperature: 0.0, ..SamplingParams::default() },
            ..DecodeParams::default()
        },
        deadline: None,
        prefix_scope: PrefixScope::new("bench"),
        prompt_logprobs: None,
    };
    let t0 = Instant::now();
    let mut h = match engine.submit(req) {
        Ok(h) => h,
        Err(_) => return Sample { ok: false, e2e: t0.elapsed(), ..Default::default() },
    };
    let mut s = Sample::default();
    let mut last: Option<Instant> = None;
    while let Some(ev) = h.events.blocking_recv() {
        match ev {
            GenerationEvent::Delta { .. } => {
                let now = Instant::now();
                match last {
                    None => s.ttft = Some(now - t0),
                    Some(l) => s.itl.push(now - l),
                }
                last = Some(now);
            }
            GenerationEvent::Finished { completion_tokens, .. } => {
                s.ok = true;
                s.output_tokens = completion_tokens;
                break;
            }
            GenerationEvent::PromptLogprobs { .. } => {}
            GenerationEvent::Failed { .. } => break,
        }
    }
    s.e2e = t0.elapsed();
    let _ = Duration::ZERO;
    s
}
