//! Continuous batching does not change results: greedy outputs of 16 concurrent
//! requests with different prompt lengths equal their outputs when each runs
//! alone (same kernels, same paged cache), on the default model. Neither does
//! the prefix cache: the alone runs compute every prompt token, the batched
//! runs share the prompts' common blocks (cold, then warm cache). Skips (with a
//! message) when the model file is absent.

use std::sync::Arc;

use salus_models::paged_cache::PrefixScope;
use salus_models::{DecodeParams, LoadOptions, LoadedModel, ModelSource, Phi, SamplingParams};
use salus_server::engine::{Engine, FinishReason, GenerationEvent, GenerationHandle, GenerationRequest, RequestId};
use salus_server::scheduler::{ContinuousBatchingEngine, SchedulerConfig};

const MAX_TOKENS: usize = 24;

/// The default model, or None (with a message) when its file is absent.
fn default_model() -> Option<Arc<LoadedModel>> {
    let path = salus_models::dev_model::default_model_if_present()?;
    let src = ModelSource::read_plaintext(&path).unwrap();
    Some(Arc::new(salus_models::load(&src, &LoadOptions::default()).unwrap()))
}

fn request(i: usize, prompt: Vec<u32>) -> GenerationRequest {
    GenerationRequest {
        request_id: RequestId(format!("req-{i}")),
        prompt_tokens: Phi::new(prompt),
        n: 1,
        first_choice: 0,
        decode: DecodeParams {
            max_tokens: MAX_TOKENS,
            // top_logprobs = 0 makes every delta carry its token ids.
            sampling: SamplingParams { temperature: 0.0, top_logprobs: Some(0), ..SamplingParams::default() },
            ..DecodeParams::default()
        },
        deadline: None,
        prefix_scope: PrefixScope::new("test"),
        prompt_logprobs: None,
    }
}

/// Generated token ids and the finish reason.
fn collect(mut h: GenerationHandle) -> (Vec<u32>, FinishReason) {
    let mut ids = Vec::new();
    loop {
        match h.events.blocking_recv().expect("engine closed the stream early") {
            GenerationEvent::Delta { logprobs, .. } => ids.extend(logprobs.iter().map(|l| l.token_id)),
            GenerationEvent::PromptLogprobs { .. } => {}
            GenerationEvent::Finished { reason, completion_tokens, .. } => {
                assert_eq!(completion_tokens, ids.len());
                return (ids, reason);
            }
            GenerationEvent::Failed { error } => panic!("generation failed: {error}"),
        }
    }
}

const NOTES: [&str; 4] = [
    "Patient is a 67-year-old male with a history of type 2 diabetes and hypertension presenting with chest pain.",
    "Discharge summary: the patient was admitted for community-acquired pneumonia, treated with ceftriaxone and azithromycin, improved, and is discharged home.",
    "Summarize: 45F, migraine with aura, on sumatriptan as needed.",
    "Medication list: metformin 1000 mg twice daily, lisinopril 20 mg daily, atorvastatin 40 mg nightly, aspirin 81 mg daily. Allergies: penicillin (rash).",
];

#[test]
fn batched_greedy_outputs_equal_outputs_alone() {
    let Some(lm) = default_model() else { return };
    // 16 chat prompts of different lengths: a growing prefix of clinical notes.
    let words: Vec<&str> = NOTES.iter().flat_map(|n| n.split(' ')).collect();
    let prompts: Vec<Vec<u32>> = (0..16)
        .map(|i| {
            let note = words[..(3 + 4 * i).min(words.len())].join(" ");
            let text = format!("<|im_start|>user\nSummarize this note: {note}<|im_end|>\n<|im_start|>assistant\n");
            lm.tokenizer.encode(&text, false).unwrap()
        })
        .collect();
    let mut lens: Vec<usize> = prompts.iter().map(|p| p.len()).collect();
    lens.dedup();
    assert_eq!(lens.len(), 16, "prompt lengths must all differ");
    // Small prefill chunks and budget so that batches mix prefill chunks and decodes.
    let cfg = SchedulerConfig {
        kv_cache_bytes: Some(64 << 20),
        max_batch_tokens: 96,
        prefill_chunk: 32,
        ..Default::default()
    };
    let uncached =
        ContinuousBatchingEngine::start(lm.clone(), SchedulerConfig { prefix_cache: false, ..cfg.clone() }).unwrap();
    // The batched engine also commits its KV memory up front (`kv_prefault`),
    // which must not change a single output.
    let engine = ContinuousBatchingEngine::start(lm.clone(), SchedulerConfig { kv_prefault: true, ..cfg }).unwrap();

    let alone: Vec<(Vec<u32>, FinishReason)> =
        prompts.iter().enumerate().map(|(i, p)| collect(uncached.submit(request(i, p.clone())).unwrap())).collect();
    assert_eq!(uncached.stats().prefix_cache_hit_tokens_total, 0);
    assert!(alone.iter().filter(|(ids, _)| ids.len() >= 4).count() >= 12, "the model should answer most prompts");
    // Not vacuous: the requests produce different outputs.
    assert!(alone.iter().any(|a| a.0 != alone[0].0));

    let mut hits_before = 0;
    for (round, cache) in ["cold", "warm"].into_iter().enumerate() {
        let handles: Vec<GenerationHandle> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| engine.submit(request(100 * (round + 1) + i, p.clone())).unwrap())
            .collect();
        let batched: Vec<(Vec<u32>, FinishReason)> = handles.into_iter().map(collect).collect();
        // The worker publishes stats after the step that sent the last event.
        let t0 = std::time::Instant::now();
        let mut stats = engine.stats();
        while stats.kv_blocks_used != 0 && t0.elapsed() < std::time::Duration::from_secs(5) {
            std::thread::sleep(std::time::Duration::from_millis(10));
            stats = engine.stats();
        }
        for (i, (a, b)) in alone.iter().zip(&batched).enumerate() {
            assert_eq!(
                a,
                b,
                "request {i} (prompt of {} tokens) differs when batched, {cache} prefix cache",
                prompts[i].len()
            );
        }
        assert_eq!(stats.kv_blocks_used, 0, "all blocks are freed after the requests finish");
        assert!(stats.kv_blocks_cached > 0, "finished prompts stay cached");
        assert!(stats.steps_total > 0);
        let hits = stats.prefix_cache_hit_tokens_total - hits_before;
        hits_before = stats.prefix_cache_hit_tokens_total;
        if round == 1 {
            // The cold round cached every prompt block: now each prompt attaches
            // all its whole blocks before its last token.
            let bs = SchedulerConfig::default().block_size;
            let expected: usize = prompts.iter().map(|p| (p.len() - 1) / bs * bs).sum();
            assert_eq!(hits as usize, expected, "warm cache hit tokens");
        }
    }
}

/// Cached prefix blocks nobody uses are dropped after `prefix_cache_idle_secs`,
/// also while the engine has nothing else to do.
#[test]
fn idle_prefix_cache_blocks_expire() {
    let Some(lm) = default_model() else { return };
    let cfg = SchedulerConfig { kv_cache_bytes: Some(16 << 20), prefix_cache_idle_secs: 1, ..Default::default() };
    let engine = ContinuousBatchingEngine::start(lm.clone(), cfg).unwrap();
    let text = format!("<|im_start|>user\nSummarize this note: {}<|im_end|>\n<|im_start|>assistant\n", NOTES[1]);
    let prompt = lm.tokenizer.encode(&text, false).unwrap();
    collect(engine.submit(request(0, prompt)).unwrap());
    let cached = engine.stats().kv_blocks_cached;
    assert!(cached > 0, "the finished prompt's blocks are cached");
    let t0 = std::time::Instant::now();
    while engine.stats().kv_blocks_cached != 0 {
        assert!(t0.elapsed() < std::time::Duration::from_secs(10), "cached blocks never expired");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(t0.elapsed() >= std::time::Duration::from_millis(500), "expired long before the idle limit");
    assert_eq!(engine.stats().kv_blocks_used, 0);
}

/// Regression (a request past its deadline ended with a bare 500 and, when
/// streamed, no error event): the engine tells the waiting client why.
#[test]
fn a_request_past_its_deadline_fails_with_deadline_exceeded() {
    let Some(lm) = default_model() else { return };
    let engine = ContinuousBatchingEngine::start(lm.clone(), SchedulerConfig::default()).unwrap();
    let prompt = lm.tokenizer.encode("Count from one to one thousand.", true).unwrap();
    let mut req = request(0, prompt);
    req.decode.max_tokens = 4000;
    // Never stop on an end token: only the deadline can end it.
    req.decode.sampling.logit_bias = lm.info.eos_token_ids.iter().map(|&t| (t, -100.0)).collect();
    req.deadline = Some(std::time::Instant::now() + std::time::Duration::from_millis(300));
    let mut h = engine.submit(req).unwrap();
    loop {
        match h.events.blocking_recv().expect("the engine closed the stream without saying why") {
            GenerationEvent::Delta { .. } | GenerationEvent::PromptLogprobs { .. } => continue,
            GenerationEvent::Finished { .. } => panic!("finished instead of timing out"),
            GenerationEvent::Failed { error } => {
                assert!(matches!(error, salus_server::engine::EngineError::DeadlineExceeded), "{error}");
                break;
            }
        }
    }
}

/// Structured outputs share the batch: 8 requests, every other one constrained
/// by a JSON schema (one by a choice list), give the same greedy tokens batched
/// (masks computed beside the forward pass) as alone (masks after it), and
/// every constrained output is valid.
#[test]
fn constrained_and_unconstrained_requests_batched_equal_alone() {
    use salus_models::{ConstraintSpec, GrammarCompiler};
    let Some(lm) = default_model() else { return };
    let compiler = GrammarCompiler::new(&lm.tokenizer, lm.info.vocab_size, &lm.info.eos_token_ids).unwrap();
    let schema = serde_json::json!({
        "type": "object",
        "properties": {
            "medications": {"type": "array", "maxItems": 4, "items": {"type": "object", "properties": {
                "name": {"type": "string", "maxLength": 24}, "dose_mg": {"type": "integer", "minimum": 0, "maximum": 5000}
            }, "required": ["name", "dose_mg"], "additionalProperties": false}},
            "urgent": {"type": "boolean"}
        },
        "required": ["medications", "urgent"], "additionalProperties": false
    });
    let json = Arc::new(
        compiler
            .compile(&ConstraintSpec::JsonSchema { schema: Phi::new(schema.to_string()), whitespace_pattern: None })
            .unwrap(),
    );
    let choice = Arc::new(
        compiler.compile(&ConstraintSpec::Choice(vec![Phi::new("urgent".into()), Phi::new("routine".into())])).unwrap(),
    );
    let make = |i: usize| {
        let note = NOTES[i % 100 % NOTES.len()];
        let ask = if i % 2 == 0 { "List the medications as JSON" } else { "Summarize" };
        let text = format!("<|im_start|>user\n{ask}: {note}<|im_end|>\n<|im_start|>assistant\n");
        let mut r = request(i, lm.tokenizer.encode(&text, false).unwrap());
        r.decode.max_tokens = 120;
        r.decode.constraint = match i % 100 {
            0 | 2 | 4 => Some(json.clone()),
            6 => Some(choice.clone()),
            _ => None,
        };
        r
    };
    let cfg = SchedulerConfig {
        kv_cache_bytes: Some(64 << 20),
        max_batch_tokens: 96,
        prefill_chunk: 32,
        ..Default::default()
    };
    // Alone: masks computed after each forward pass; batched: beside it.
    let serial = SchedulerConfig { constraint_mask_overlap: Some(false), ..cfg.clone() };
    let serial = ContinuousBatchingEngine::start(lm.clone(), serial).unwrap();
    let engine =
        ContinuousBatchingEngine::start(lm.clone(), SchedulerConfig { constraint_mask_overlap: Some(true), ..cfg })
            .unwrap();
    let alone: Vec<(Vec<u32>, FinishReason)> = (0..8).map(|i| collect(serial.submit(make(i)).unwrap())).collect();
    let handles: Vec<GenerationHandle> = (0..8).map(|i| engine.submit(make(100 + i)).unwrap()).collect();
    let batched: Vec<(Vec<u32>, FinishReason)> = handles.into_iter().map(collect).collect();
    for (i, (a, b)) in alone.iter().zip(&batched).enumerate() {
        assert_eq!(a, b, "request {i} differs when batched");
    }
    for i in [0, 2, 4] {
        let (ids, reason) = &alone[i];
        let text = lm.tokenizer.decode(ids, true).unwrap();
        assert_eq!(*reason, FinishReason::Stop, "request {i}: {text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("request {i}: {e}: {text}"));
        assert!(v["medications"].is_array() && v["urgent"].is_boolean(), "{text}");
    }
    let text = lm.tokenizer.decode(&alone[6].0, true).unwrap();
    assert!(text == "urgent" || text == "routine", "{text}");
    // Not vacuous: unconstrained requests write prose, not JSON.
    assert!(alone.iter().skip(1).step_by(2).filter(|(ids, _)| ids.len() > 8).count() >= 3);
}

/// The prompt's scores and the finish of a request with `prompt_logprobs`.
fn collect_scores(mut h: GenerationHandle) -> (Vec<salus_models::TokenLogprob>, usize) {
    let mut scores = None;
    loop {
        match h.events.blocking_recv().expect("engine closed the stream early") {
            GenerationEvent::PromptLogprobs { logprobs, .. } => {
                assert!(scores.is_none(), "one PromptLogprobs event per choice");
                scores = Some(logprobs);
            }
            GenerationEvent::Delta { .. } => assert!(scores.is_some(), "the scores come before any token"),
            GenerationEvent::Finished { completion_tokens, .. } => {
                return (scores.expect("a PromptLogprobs event"), completion_tokens)
            }
            GenerationEvent::Failed { error } => panic!("generation failed: {error}"),
        }
    }
}

/// Prompt scoring (`echo` with logprobs): the engine's scores of every prompt
/// token are the same whatever the prefill chunking, the batch around the
/// request and the prefix cache (a scored prompt never takes cached blocks,
/// though the same prompt was just cached unscored), and they agree with a
/// reference forward pass over the whole prompt (contiguous f32 cache,
/// reference attention).
#[test]
fn prompt_scores_match_a_whole_prompt_forward_pass() {
    let Some(lm) = default_model() else { return };
    let words: Vec<&str> = NOTES.iter().flat_map(|n| n.split(' ')).collect();
    let prompt = lm.tokenizer.encode(&format!("Question: {}\nAnswer: yes", words[..40].join(" ")), false).unwrap();
    assert!(prompt.len() > 64, "long enough for several prefill chunks: {}", prompt.len());
    // The reference: one forward pass with every position's logits.
    let mut cache = lm.model.new_cache();
    let mut batch = salus_models::PackedBatch::new();
    batch.push(salus_models::SeqId(0), &prompt, 0).unwrap();
    batch.want_every_position(salus_models::SeqId(0));
    let logits = lm.model.forward(&batch, &mut cache).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let vocab = logits.len() / prompt.len();
    let reference: Vec<f32> = (0..prompt.len() - 1)
        .map(|p| salus_models::sampling::score_token(&logits[p * vocab..(p + 1) * vocab], prompt[p + 1], 0).0)
        .collect();
    let scored = |i: usize, max_tokens: usize| {
        let mut req = request(i, prompt.clone());
        req.decode.max_tokens = max_tokens;
        req.prompt_logprobs = Some(2);
        req
    };
    // Alone, in one prefill chunk, no prefix cache.
    let alone_engine =
        ContinuousBatchingEngine::start(lm.clone(), SchedulerConfig { prefix_cache: false, ..Default::default() })
            .unwrap();
    let (alone, _) = collect_scores(alone_engine.submit(scored(0, 1)).unwrap());
    assert_eq!(alone.len(), prompt.len() - 1);
    // The kernels differ (int8 activations, bf16 KV): ≈0.06 nats apart on
    // average, at most ≈0.5; scores of the neighbouring position are ≈3.6 apart.
    let diffs: Vec<f32> = alone.iter().zip(&reference).map(|(s, lp)| (s.logprob - lp).abs()).collect();
    let mean = diffs.iter().sum::<f32>() / diffs.len() as f32;
    assert!(mean < 0.2, "mean distance to the reference: {mean}");
    for (p, (s, d)) in alone.iter().zip(&diffs).enumerate() {
        assert_eq!(s.token_id, prompt[p + 1], "position {p}");
        assert!(*d < 1.5, "position {p}: {} from the reference", d);
        assert_eq!(s.top.len(), 2);
        assert!(s.top[0].1 >= s.top[1].1 && s.top[0].1 >= s.logprob, "position {p}: alternatives best first");
    }
    let cfg = SchedulerConfig {
        kv_cache_bytes: Some(64 << 20),
        max_batch_tokens: 96,
        prefill_chunk: 32,
        ..Default::default()
    };
    let engine = ContinuousBatchingEngine::start(lm.clone(), cfg).unwrap();
    // The same prompt first runs unscored, so its blocks are in the prefix cache.
    collect(engine.submit(request(1, prompt.clone())).unwrap());
    for max_tokens in [0, 1, 5] {
        // Scored in 32-token chunks beside other requests that decode and prefill.
        let others: Vec<GenerationHandle> =
            (1..4).map(|i| engine.submit(request(i, prompt[..10 * i].to_vec())).unwrap()).collect();
        let (scores, generated) = collect_scores(engine.submit(scored(10 + max_tokens, max_tokens)).unwrap());
        others.into_iter().for_each(|h| drop(collect(h)));
        assert!(generated <= max_tokens, "max_tokens {max_tokens}: {generated} generated");
        assert_eq!(scores.len(), alone.len());
        for (p, (s, a)) in scores.iter().zip(&alone).enumerate() {
            assert_eq!((s.token_id, s.top[0].0), (a.token_id, a.top[0].0), "position {p}");
            assert!((s.logprob - a.logprob).abs() < 1e-3, "position {p}: {} batched, {} alone", s.logprob, a.logprob);
        }
    }
}
