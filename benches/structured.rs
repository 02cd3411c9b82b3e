//! Structured outputs measured in process (no HTTP), on the default model:
//!
//! * grammar compile time of a typical extraction schema (an object of 6
//!   fields, one an array of objects): p50/p99 cold (compiled each time) and
//!   cached (the server's per-principal grammar cache);
//! * mask time per token (computing the allowed set, and accepting the token),
//!   replaying the constrained outputs;
//! * aggregate decode tok/s at 1 and 8 streams, constrained vs unconstrained
//!   (same prompts, greedy, `max_tokens` 128), with the masks computed after
//!   the forward pass and beside it (`scheduler.constraint_mask_overlap`).
//!
//! * tool calling with `tool_choice: "required"` and `"auto"` (three tools, the generic
//!   Hermes rendering of the default model): latency from submission to the
//!   complete call, p50/p95, at 1 and 8 streams, and the decode tok/s of the
//!   arguments against unconstrained generation from the same prompts; and the
//!   decode tok/s of whole `auto` answers (text, under the text-or-calls grammar).
//!
//! Decode tok/s = streams × Σ(tokens after the first) / Σ(time after the first
//! token), over the requests of a level: the rate while decoding. Constrained
//! outputs end when their JSON is complete, and tool-calling prompts are long,
//! so whole-request tok/s would mix prefill into the comparison.
//!
//! Run: `cargo bench --bench structured`. Environment: `SALUS_MODEL` (model
//! path), `SALUS_BENCH_LEVELS` (default `1,8`), `SALUS_BENCH_MAX_TOKENS` (128),
//! `SALUS_BENCH_REQUESTS` (per level; default 2 × concurrency, at least 4).

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use salus_models::grammar::{CompiledGrammar, ConstraintSpec, GrammarCompiler};
use salus_models::paged_cache::PrefixScope;
use salus_models::{DecodeParams, LoadOptions, LoadedModel, ModelSource, Phi, SamplingParams, WeightBytes};
use salus_server::api::structured::GrammarCache;
use salus_server::engine::{Engine, GenerationEvent, GenerationRequest, RequestId};
use salus_server::scheduler::{ContinuousBatchingEngine, SchedulerConfig};
use salus_tools::bench_report::percentile;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The typical extraction schema of the issue: 6 fields, one an array of objects.
fn extraction_schema() -> serde_json::Value {
    serde_json::json!({
        "type": "object",
        "properties": {
            "patient_age": {"type": "integer", "minimum": 0, "maximum": 120},
            "sex": {"enum": ["female", "male", "other", "unknown"]},
            "chief_complaint": {"type": "string", "maxLength": 80},
            "medications": {"type": "array", "maxItems": 6, "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 40},
                    "dose_mg": {"type": "number", "minimum": 0},
                    "frequency": {"enum": ["once daily", "twice daily", "three times daily", "as needed", "nightly"]}
                },
                "required": ["name", "dose_mg", "frequency"],
                "additionalProperties": false
            }},
            "allergies": {"type": "array", "items": {"type": "string", "maxLength": 40}, "maxItems": 4},
            "urgent": {"type": "boolean"}
        },
        "required": ["patient_age", "sex", "chief_complaint", "medications", "allergies", "urgent"],
        "additionalProperties": false
    })
}

const NOTES: [&str; 4] = [
    "67-year-old male with type 2 diabetes and hypertension, chest pain since this morning. Takes metformin 1000 mg twice daily and lisinopril 20 mg once daily. Allergic to penicillin.",
    "45-year-old female, migraine with aura, sumatriptan 50 mg as needed. No known allergies.",
    "82-year-old female admitted with pneumonia; on atorvastatin 40 mg nightly and aspirin 81 mg once daily. Allergies: sulfa drugs, latex.",
    "30-year-old male, sprained ankle after a fall, ibuprofen 400 mg three times daily. No allergies.",
];

fn main() {
    let path = std::env::var("SALUS_MODEL").map(PathBuf::from).unwrap_or_else(|_| {
        PathBuf::from(std::env::var("HOME").unwrap_or_default())
            .join(".cache/salus/models/SmolLM2-135M-Instruct.Q4_1.gguf")
    });
    let levels: Vec<usize> = std::env::var("SALUS_BENCH_LEVELS")
        .unwrap_or_else(|_| "1,8".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let max_tokens = env_usize("SALUS_BENCH_MAX_TOKENS", 128);
    let bytes = std::fs::read(&path).expect("read the model file (set SALUS_MODEL)");
    let src = ModelSource::from_gguf_bytes("model.gguf", WeightBytes::from_vec(bytes));
    let lm = Arc::new(salus_models::load(&src, &LoadOptions::default()).expect("load model"));

    let t = Instant::now();
    let compiler =
        Arc::new(GrammarCompiler::new(&lm.tokenizer, lm.info.vocab_size, &lm.info.eos_token_ids).expect("token trie"));
    println!("token trie of {} tokens built in {:.1} ms (once, at model load)", lm.info.vocab_size, ms(t.elapsed()));

    let spec =
        ConstraintSpec::JsonSchema { schema: Phi::new(extraction_schema().to_string()), whitespace_pattern: None };
    // Compile: cold (every time) and through the server's cache.
    let mut cold: Vec<f64> = (0..50)
        .map(|_| {
            let t = Instant::now();
            let g = compiler.compile(&spec).expect("compile");
            let e = ms(t.elapsed());
            drop(g);
            e
        })
        .collect();
    cold.sort_by(f64::total_cmp);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let cache = GrammarCache::new(64, 2);
    let mut cached: Vec<f64> = rt.block_on(async {
        let mut out = Vec::new();
        for _ in 0..201 {
            let c = compiler.clone();
            let t = Instant::now();
            cache
                .get_or_compile("bench", spec.clone(), Duration::from_secs(10), move |s| c.compile(s))
                .await
                .expect("compile");
            out.push(ms(t.elapsed()));
        }
        out.remove(0);
        out
    });
    cached.sort_by(f64::total_cmp);
    println!(
        "compile, extraction schema: cold p50 {:.2} ms p99 {:.2} ms; cached p50 {:.4} ms p99 {:.4} ms",
        percentile(&cold, 50.0),
        percentile(&cold, 99.0),
        percentile(&cached, 50.0),
        percentile(&cached, 99.0)
    );
    let grammar = Arc::new(compiler.compile(&spec).expect("compile"));

    let prompts: Vec<Vec<u32>> = NOTES
        .iter()
        .map(|n| {
            let text = format!(
                "<|im_start|>user\nExtract the patient's data from this note as JSON: {n}<|im_end|>\n<|im_start|>assistant\n"
            );
            lm.tokenizer.encode(&text, false).expect("tokenize")
        })
        .collect();
    let prompts = Arc::new(prompts);

    // Mask time per token, replaying constrained outputs.
    let serial = engine(&lm, Some(false));
    let mut outputs = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        outputs.push(run_one(&serial, p, i, max_tokens, Some(grammar.clone())).1);
    }
    let (mut mask_us, mut apply_us, mut commit_us) = (Vec::new(), Vec::new(), Vec::new());
    let logits = vec![0.0f32; lm.info.vocab_size];
    let mut masked = Vec::new();
    for ids in &outputs {
        let mut m = grammar.matcher();
        for &id in ids {
            let t = Instant::now();
            m.prepare().expect("mask");
            mask_us.push(t.elapsed().as_secs_f64() * 1e6);
            let t = Instant::now();
            m.mask_logits(&logits, &mut masked).expect("apply");
            m.is_accepting().expect("accepting");
            apply_us.push(t.elapsed().as_secs_f64() * 1e6);
            let t = Instant::now();
            m.commit(id).expect("token");
            commit_us.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    apply_us.sort_by(f64::total_cmp);
    mask_us.sort_by(f64::total_cmp);
    commit_us.sort_by(f64::total_cmp);
    println!(
        "mask per token over {} tokens: p50 {:.0} µs p99 {:.0} µs mean {:.0} µs; applying it to the logits p50 {:.0} µs; accepting the token p50 {:.0} µs",
        mask_us.len(),
        percentile(&mask_us, 50.0),
        percentile(&mask_us, 99.0),
        mask_us.iter().sum::<f64>() / mask_us.len().max(1) as f64,
        percentile(&apply_us, 50.0),
        percentile(&commit_us, 50.0)
    );
    drop(serial);

    println!("\ndecode tok/s (aggregate), default model, greedy, max_tokens {max_tokens}");
    println!(
        "{:>7} {:>14} {:>14} {:>14} {:>14} {:>8} {:>8} {:>8}",
        "streams", "unconstrained", "json, serial", "json, overlap", "json, default", "serial", "overlap", "default"
    );
    for &c in &levels {
        let n = env_usize("SALUS_BENCH_REQUESTS", (2 * c).max(4));
        let e = engine(&lm, Some(false));
        let free = level(&e, &prompts, c, n, max_tokens, None);
        let serial = level(&e, &prompts, c, n, max_tokens, Some(grammar.clone()));
        drop(e);
        let e = engine(&lm, Some(true));
        let overlap = level(&e, &prompts, c, n, max_tokens, Some(grammar.clone()));
        drop(e);
        let e = engine(&lm, None);
        let default = level(&e, &prompts, c, n, max_tokens, Some(grammar.clone()));
        println!(
            "{c:>7} {free:>14.1} {serial:>14.1} {overlap:>14.1} {default:>14.1} {:>8.2} {:>8.2} {:>8.2}",
            serial / free,
            overlap / free,
            default / free
        );
    }
    tool_calls(&lm, &compiler, &levels, max_tokens);
}

/// The tool-calling part: `required` over three tools, Hermes format.
fn tool_calls(lm: &Arc<LoadedModel>, compiler: &GrammarCompiler, levels: &[usize], max_tokens: usize) {
    use salus_models::chat::{ChatMessage, RenderOptions, Role, ToolDefinitions};
    use salus_models::tool_calls::ToolCallFormat;
    let tools = serde_json::json!([
        {"type": "function", "function": {"name": "get_lab_results", "description": "Latest lab results of a patient",
            "parameters": {"type": "object", "properties": {"mrn": {"type": "string", "maxLength": 12},
                "test": {"enum": ["potassium", "sodium", "creatinine"]}}, "required": ["mrn", "test"], "additionalProperties": false}}},
        {"type": "function", "function": {"name": "schedule_appointment", "description": "Book a clinic visit",
            "parameters": {"type": "object", "properties": {"mrn": {"type": "string", "maxLength": 12},
                "date": {"type": "string", "format": "date"}}, "required": ["mrn", "date"], "additionalProperties": false}}},
        {"type": "function", "function": {"name": "check_formulary", "description": "Whether a drug is on the formulary",
            "parameters": {"type": "object", "properties": {"drug": {"type": "string", "maxLength": 30}},
                "required": ["drug"], "additionalProperties": false}}}
    ]);
    let defs: Vec<serde_json::Value> = tools.as_array().unwrap().clone();
    let named: Vec<(String, serde_json::Value)> = defs
        .iter()
        .map(|t| (t["function"]["name"].as_str().unwrap().to_string(), t["function"]["parameters"].clone()))
        .collect();
    let allowed: Vec<(&str, &serde_json::Value)> = named.iter().map(|(n, p)| (n.as_str(), p)).collect();
    let lark = ToolCallFormat::Hermes.call_grammar(&allowed, false);
    let t = Instant::now();
    let grammar = Arc::new(compiler.compile(&ConstraintSpec::Grammar(Phi::new(lark))).expect("call grammar"));
    println!("\ntool calling (required, 3 tools): call grammar compiled in {:.2} ms", ms(t.elapsed()));
    let lark = ToolCallFormat::Hermes.text_or_calls_grammar(&allowed, true, &[]);
    let t = Instant::now();
    let auto = Arc::new(compiler.compile(&ConstraintSpec::Grammar(Phi::new(lark))).expect("auto grammar"));
    println!("tool calling (auto, 3 strict tools): text-or-calls grammar compiled in {:.2} ms", ms(t.elapsed()));
    let template = lm.chat_template.as_ref().expect("chat template");
    let asks = [
        "What is the latest potassium of patient MRN 4471?",
        "Book patient MRN 2210 into the diabetes clinic next Monday.",
        "Is apixaban 5 mg on the formulary?",
        "Check the creatinine of MRN 9034 before the contrast scan.",
    ];
    let prompts: Vec<Vec<u32>> = asks
        .iter()
        .map(|a| {
            let opts = RenderOptions { tools: ToolDefinitions(defs.clone()), ..RenderOptions::default() };
            let text = template.render_with(&[ChatMessage::new(Role::User, *a)], &opts).expect("render");
            lm.tokenizer.encode(text.expose(), false).expect("tokenize")
        })
        .collect();
    let prompts = Arc::new(prompts);
    println!(
        "{:>7} {:>12} {:>12} {:>14} {:>14} {:>7} {:>14} {:>7}",
        "streams", "call p50 ms", "call p95 ms", "args tok/s", "free tok/s", "ratio", "auto tok/s", "ratio"
    );
    for &c in levels {
        let n = (2 * c).max(4);
        let e = engine(lm, None);
        let free = level(&e, &prompts, c, n, max_tokens, None);
        let results = requests(&e, &prompts, c, n, max_tokens, Some(grammar.clone()));
        let args = decode_rate(c, &results);
        // `auto`: the whole answer (mostly text) decoded under the text-or-calls grammar.
        let auto = level(&e, &prompts, c, n, max_tokens, Some(auto.clone()));
        let mut lat: Vec<f64> = results.iter().map(|r| ms(r.e2e)).collect();
        lat.sort_by(f64::total_cmp);
        println!(
            "{c:>7} {:>12.0} {:>12.0} {args:>14.1} {free:>14.1} {:>7.2} {auto:>14.1} {:>7.2}",
            percentile(&lat, 50.0),
            percentile(&lat, 95.0),
            args / free,
            auto / free
        );
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn engine(lm: &Arc<LoadedModel>, overlap: Option<bool>) -> Arc<ContinuousBatchingEngine> {
    // No prefix cache: every compared run computes its whole prompt.
    let cfg = SchedulerConfig { constraint_mask_overlap: overlap, prefix_cache: false, ..SchedulerConfig::default() };
    Arc::new(ContinuousBatchingEngine::start(lm.clone(), cfg).expect("start engine"))
}

/// One request of a level, as measured.
struct Measured {
    e2e: Duration,
    ttft: Duration,
    tokens: usize,
}

/// `n` requests from `c` threads; the aggregate decode rate.
fn level(
    engine: &Arc<ContinuousBatchingEngine>,
    prompts: &Arc<Vec<Vec<u32>>>,
    c: usize,
    n: usize,
    max_tokens: usize,
    grammar: Option<Arc<CompiledGrammar>>,
) -> f64 {
    decode_rate(c, &requests(engine, prompts, c, n, max_tokens, grammar))
}

/// Runs `n` requests from `c` threads (the prompts in turn).
fn requests(
    engine: &Arc<ContinuousBatchingEngine>,
    prompts: &Arc<Vec<Vec<u32>>>,
    c: usize,
    n: usize,
    max_tokens: usize,
    grammar: Option<Arc<CompiledGrammar>>,
) -> Vec<Measured> {
    let counter = Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = (0..c)
        .map(|_| {
            let (engine, prompts, counter, grammar) =
                (engine.clone(), prompts.clone(), counter.clone(), grammar.clone());
            std::thread::spawn(move || {
                let mut out = Vec::new();
                loop {
                    let i = counter.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        break out;
                    }
                    let start = Instant::now();
                    let (ttft, ids) = run_one(&engine, &prompts[i % prompts.len()], i, max_tokens, grammar.clone());
                    out.push(Measured { e2e: start.elapsed(), ttft, tokens: ids.len() });
                }
            })
        })
        .collect();
    threads.into_iter().flat_map(|t| t.join().expect("bench thread")).collect()
}

/// `streams` × tokens after the first / time after the first token, summed
/// over the requests.
fn decode_rate(streams: usize, requests: &[Measured]) -> f64 {
    let time: f64 = requests.iter().map(|r| r.e2e.saturating_sub(r.ttft).as_secs_f64()).sum();
    let tokens: usize = requests.iter().map(|r| r.tokens.saturating_sub(1)).sum();
    streams as f64 * tokens as f64 / time.max(1e-9)
}

/// One greedy request: its time to first token and its token ids.
fn run_one(
    engine: &ContinuousBatchingEngine,
    prompt: &[u32],
    i: usize,
    max_tokens: usize,
    constraint: Option<Arc<CompiledGrammar>>,
) -> (Duration, Vec<u32>) {
    let req = GenerationRequest {
        request_id: RequestId(format!("bench-{i}")),
        prompt_tokens: Phi::new(prompt.to_vec()),
        n: 1,
        first_choice: 0,
        decode: DecodeParams {
            max_tokens,
            // top_logprobs = 0 makes every delta carry its token id.
            sampling: SamplingParams { temperature: 0.0, top_logprobs: Some(0), ..SamplingParams::default() },
            constraint,
            ..DecodeParams::default()
        },
        deadline: None,
        prefix_scope: PrefixScope::new("bench"),
        prompt_logprobs: None,
    };
    let t0 = Instant::now();
    let mut h = engine.submit(req).expect("submit");
    let (mut ttft, mut ids) = (None, Vec::new());
    while let Some(ev) = h.events.blocking_recv() {
        match ev {
            GenerationEvent::Delta { logprobs, .. } => {
                ttft.get_or_insert_with(|| t0.elapsed());
                ids.extend(logprobs.iter().map(|l| l.token_id));
            }
            GenerationEvent::Finished { .. } => break,
            GenerationEvent::PromptLogprobs { .. } => {}
            GenerationEvent::Failed { error } => panic!("generation failed: {error}"),
        }
    }
    (ttft.unwrap_or_default(), ids)
}
