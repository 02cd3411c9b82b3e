//! A serialized [`Engine`]: one worker thread runs one request at a time (each
//! choice after the other) with a contiguous KV cache. It makes `salus serve`
//! usable before the continuous-batching scheduler lands and is replaced by it;
//! handlers do not change.
//!
//! The worker checks the request's [`CancelToken`] (set when the handler drops
//! its [`GenerationHandle`]) and deadline before every forward step, so a client
//! disconnect stops the work within one token.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::IndexOp;
use salus_models::{KvCache, LoadedModel, PackedBatch, Phi, Sampler, SeqId, StopMatcher, StreamDecoder};
use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};

use super::{
    CancelToken, Engine, EngineError, EngineStats, FinishReason, GenerationEvent, GenerationHandle, GenerationRequest,
    TokenLogprob,
};

/// Prompt tokens per prefill step.
const PREFILL_CHUNK: usize = 512;

struct Job {
    request: GenerationRequest,
    events: UnboundedSender<GenerationEvent>,
    cancel: CancelToken,
}

#[derive(Default)]
struct Counters {
    waiting: AtomicUsize,
    running: AtomicUsize,
    steps: AtomicU64,
    last_tokens: AtomicUsize,
    alive: AtomicBool,
}

/// One worker thread, a bounded queue.
pub struct SerialEngine {
    queue: SyncSender<Job>,
    counters: Arc<Counters>,
    context: usize,
    retry_after: Duration,
}

impl SerialEngine {
    /// Starts the worker. `queue_size` requests may wait; more get `QueueFull`.
    pub fn start(lm: Arc<LoadedModel>, queue_size: usize, retry_after: Duration) -> Self {
        let (tx, rx) = sync_channel::<Job>(queue_size.max(1));
        let counters = Arc::new(Counters::default());
        counters.alive.store(true, Ordering::Release);
        let context = lm.info.context_length;
        let c = counters.clone();
        std::thread::Builder::new()
            .name("salus-serial-engine".into())
            .spawn(move || worker(lm, rx, c))
            .expect("spawn engine worker");
        SerialEngine { queue: tx, counters, context, retry_after }
    }
}

impl Engine for SerialEngine {
    fn submit(&self, request: GenerationRequest) -> Result<GenerationHandle, EngineError> {
        let needed = request.prompt_tokens.expose().len() + request.max_tokens;
        if needed > self.context {
            return Err(EngineError::TooLarge { needed, capacity: self.context });
        }
        if !self.counters.alive.load(Ordering::Acquire) {
            return Err(EngineError::NotRunning);
        }
        let (tx, rx) = unbounded_channel();
        let cancel = CancelToken::new();
        self.counters.waiting.fetch_add(1, Ordering::AcqRel);
        match self.queue.try_send(Job { request, events: tx, cancel: cancel.clone() }) {
            Ok(()) => Ok(GenerationHandle::new(rx, cancel)),
            Err(TrySendError::Full(_)) => {
                self.counters.waiting.fetch_sub(1, Ordering::AcqRel);
                Err(EngineError::QueueFull { retry_after: self.retry_after })
            }
            Err(TrySendError::Disconnected(_)) => {
                self.counters.waiting.fetch_sub(1, Ordering::AcqRel);
                Err(EngineError::NotRunning)
            }
        }
    }

    fn stats(&self) -> EngineStats {
        let running = self.counters.running.load(Ordering::Acquire);
        EngineStats {
            running_seqs: running,
            waiting_seqs: self.counters.waiting.load(Ordering::Acquire),
            steps_total: self.counters.steps.load(Ordering::Relaxed),
            last_batch_seqs: running.min(1),
            last_batch_tokens: self.counters.last_tokens.load(Ordering::Relaxed),
            ..Default::default()
        }
    }

    fn is_ready(&self) -> bool {
        self.counters.alive.load(Ordering::Acquire)
    }
}

fn worker(lm: Arc<LoadedModel>, rx: Receiver<Job>, counters: Arc<Counters>) {
    let mut next_seq = 0u64;
    while let Ok(job) = rx.recv() {
        counters.waiting.fetch_sub(1, Ordering::AcqRel);
        counters.running.fetch_add(1, Ordering::AcqRel);
        let request_id = job.request.request_id.0.clone();
        let result =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_job(&lm, &job, &mut next_seq, &counters)));
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::error!(request_id = %request_id, error = %e, "generation failed");
                let _ = job.events.send(GenerationEvent::Failed { error: EngineError::Internal });
            }
            Err(_) => {
                let _ = job.events.send(GenerationEvent::Failed { error: EngineError::Internal });
            }
        }
        counters.running.fetch_sub(1, Ordering::AcqRel);
    }
    counters.alive.store(false, Ordering::Release);
}

fn stopped(job: &Job) -> bool {
    job.cancel.is_cancelled() || job.events.is_closed() || job.request.deadline.is_some_and(|d| Instant::now() >= d)
}

fn run_job(lm: &LoadedModel, job: &Job, next_seq: &mut u64, counters: &Counters) -> salus_models::Result<()> {
    let req = &job.request;
    let prompt = req.prompt_tokens.expose();
    let model = &lm.model;
    let vocab = model.config().vocab_size;
    let context = model.config().max_context;
    let mut cache = model.new_cache();
    for choice in 0..req.n {
        if stopped(job) {
            return Ok(());
        }
        let seq = SeqId(*next_seq);
        *next_seq += 1;
        let mut params = req.sampling.clone();
        params.seed = params.seed.map(|s| s.wrapping_add(choice as u64));
        let mut sampler = Sampler::new(params, vocab)?;
        let mut logits = None;
        for (i, c) in prompt.chunks(PREFILL_CHUNK).enumerate() {
            if stopped(job) {
                cache.remove(seq);
                return Ok(());
            }
            let mut b = PackedBatch::new();
            b.push(seq, c, i * PREFILL_CHUNK)?;
            counters.last_tokens.store(c.len(), Ordering::Relaxed);
            logits = Some(model.forward(&b, &mut cache)?);
            counters.steps.fetch_add(1, Ordering::Relaxed);
        }
        let mut logits = logits.expect("validated non-empty prompt").i(0)?.to_vec1::<f32>()?;
        let max_tokens = req.max_tokens.min(context - prompt.len());
        let mut all: Vec<u32> = prompt.clone();
        let mut generated = 0usize;
        let mut detok = StreamDecoder::new(true);
        let mut stops = StopMatcher::new(req.stop_strings.clone());
        let send = |text: String, logprobs: Vec<TokenLogprob>| {
            if !text.is_empty() || !logprobs.is_empty() {
                let _ = job.events.send(GenerationEvent::Delta { choice, text: Phi::new(text), logprobs });
            }
        };
        let reason = loop {
            if generated >= max_tokens {
                break FinishReason::Length;
            }
            if stopped(job) {
                cache.remove(seq);
                return Ok(());
            }
            let s = sampler.sample(&logits, &all, prompt.len())?;
            if lm.info.eos_token_ids.contains(&s.token) {
                break FinishReason::Stop;
            }
            generated += 1;
            all.push(s.token);
            let lp = match s.logprob {
                Some(logprob) => vec![TokenLogprob { token_id: s.token, logprob, top: s.top_logprobs }],
                None => Vec::new(),
            };
            let piece = detok.push(&lm.tokenizer, s.token)?;
            let step = stops.push(&piece);
            let done = step.stopped;
            send(step.emit, lp);
            if done {
                break FinishReason::Stop;
            }
            if generated >= max_tokens {
                break FinishReason::Length;
            }
            let mut b = PackedBatch::new();
            b.push(seq, &[s.token], all.len() - 1)?;
            counters.last_tokens.store(1, Ordering::Relaxed);
            logits = model.forward(&b, &mut cache)?.i(0)?.to_vec1::<f32>()?;
            counters.steps.fetch_add(1, Ordering::Relaxed);
        };
        if !stops.is_stopped() {
            let tail = detok.finish(&lm.tokenizer)?;
            let step = stops.push(&tail);
            let was_stopped = step.stopped;
            send(step.emit, Vec::new());
            if !was_stopped {
                send(stops.finish(), Vec::new());
            }
        }
        cache.remove(seq);
        let _ = job.events.send(GenerationEvent::Finished {
            choice,
            reason,
            completion_tokens: generated,
            cached_prompt_tokens: 0,
        });
    }
    Ok(())
}
