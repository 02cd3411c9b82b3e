//! The model-running side of continuous batching: one dedicated thread owns the
//! model and the paged KV cache (model calls are blocking CPU work), asks the
//! [`Policy`] for a plan each step, runs one packed forward pass, and turns the
//! sampled tokens into [`GenerationEvent`]s.
//!
//! Per step, before planning, every request's cancel token, event channel and
//! deadline are checked, so a cancelled sequence leaves within one step and its
//! KV blocks return to the pool. A failing or panicking step fails only the
//! requests that had a sequence in that step.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use salus_models::paged_cache::{BlockManager, PagedKvCache, PrefixScope};
use salus_models::{ChoiceDecoder, DecodeStep, LoadedModel, SeqId, TokenLogprob};
use tokio::sync::mpsc::UnboundedSender;

use super::policy::{Policy, PolicyLimits, StepPlan};
use super::{Shared, Submission};
use crate::engine::{CancelToken, ChoiceTiming, EngineError, FinishReason, GenerationEvent, RequestId};

struct RequestState {
    id: RequestId,
    events: UnboundedSender<GenerationEvent>,
    cancel: CancelToken,
    deadline: Option<Instant>,
    seqs: Vec<SeqId>,
}

impl RequestState {
    fn is_cancelled(&self, now: Instant) -> bool {
        self.cancel.is_cancelled() || self.events.is_closed() || self.is_past_deadline(now)
    }

    fn is_past_deadline(&self, now: Instant) -> bool {
        self.deadline.is_some_and(|d| now >= d)
    }
}

struct SeqCtx {
    request: u64,
    choice: usize,
    decoder: ChoiceDecoder,
    /// The prompt's scores while they are computed (`prompt_logprobs`).
    prompt_scores: Option<PromptScores>,
    /// When it was first scheduled and first sampled.
    timing: ChoiceTiming,
}

/// The logprobs of a sequence's prompt tokens, filled in as its prefill chunks
/// run: entry `p` scores prompt token `p + 1` from the logits at position `p`.
struct PromptScores {
    top: usize,
    /// Each scored token with its rank.
    scores: Vec<Option<(TokenLogprob, u32)>>,
}

impl PromptScores {
    fn new(prompt_len: usize, top: usize) -> Self {
        PromptScores { top, scores: vec![None; prompt_len.saturating_sub(1)] }
    }

    /// Scores the prompt tokens that the logits `rows` (of positions
    /// `start_pos..`, `vocab` wide) predict.
    fn record(&mut self, prompt: &[u32], start_pos: usize, rows: &[f32], vocab: usize) {
        for (k, row) in rows.chunks_exact(vocab).enumerate() {
            let p = start_pos + k;
            if let (Some(slot), Some(&next)) = (self.scores.get_mut(p), prompt.get(p + 1)) {
                let (logprob, top) = salus_models::sampling::score_token(row, next, self.top);
                let rank = salus_models::sampling::token_rank(row, next);
                *slot = Some((TokenLogprob { token_id: next, logprob, top }, rank));
            }
        }
    }

    /// Every score and its token's rank, once the whole prompt has run.
    fn take(self) -> Option<(Vec<TokenLogprob>, Vec<u32>)> {
        let scores: Vec<(TokenLogprob, u32)> = self.scores.into_iter().collect::<Option<_>>()?;
        Some(scores.into_iter().unzip())
    }
}

struct Worker {
    lm: Arc<LoadedModel>,
    policy: Policy<PagedKvCache>,
    shared: Arc<Shared>,
    requests: HashMap<u64, RequestState>,
    seqs: HashMap<SeqId, SeqCtx>,
    next_request: u64,
    next_seq: u64,
    steps: u64,
    /// Cached prefix blocks idle for longer are dropped.
    cache_idle: Duration,
    last_expiry: Instant,
    mask_overlap_min: Option<usize>,
}

/// How the worker runs (from the scheduler config).
#[derive(Debug, Clone, Copy)]
pub(crate) struct WorkerSettings {
    /// Cached prefix blocks idle for longer are dropped.
    pub cache_idle: Duration,
    /// Grammar masks are computed on a helper thread during the forward pass
    /// when a step has at least this many constrained sequences (`None`: never).
    pub mask_overlap_min: Option<usize>,
}

pub(crate) fn run(
    lm: Arc<LoadedModel>,
    cache: PagedKvCache,
    limits: PolicyLimits,
    settings: WorkerSettings,
    rx: Receiver<Submission>,
    shared: Arc<Shared>,
) {
    let mut w = Worker {
        lm,
        policy: Policy::new(limits, cache),
        shared,
        requests: HashMap::new(),
        seqs: HashMap::new(),
        next_request: 0,
        next_seq: 0,
        steps: 0,
        cache_idle: settings.cache_idle,
        last_expiry: Instant::now(),
        mask_overlap_min: settings.mask_overlap_min,
    };
    loop {
        w.expire_cached();
        if w.policy.is_idle() {
            // Wake up now and then while idle, so cached prefixes still expire.
            match rx.recv_timeout(EXPIRY_INTERVAL) {
                Ok(sub) => w.accept(sub),
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        loop {
            match rx.try_recv() {
                Ok(sub) => w.accept(sub),
                Err(TryRecvError::Empty) => break,
                // Finish what is queued; exit once idle.
                Err(TryRecvError::Disconnected) => break,
            }
        }
        w.drop_cancelled();
        w.step();
    }
    w.shared.alive.store(false, Ordering::Release);
}

/// How often cached prefix blocks are checked for expiry.
const EXPIRY_INTERVAL: Duration = Duration::from_secs(1);

impl Worker {
    /// Drops cached prefix blocks idle for longer than `cache_idle` (checked at
    /// most once per [`EXPIRY_INTERVAL`]).
    fn expire_cached(&mut self) {
        let now = Instant::now();
        if now.duration_since(self.last_expiry) < EXPIRY_INTERVAL {
            return;
        }
        self.last_expiry = now;
        if let Some(cutoff) = now.checked_sub(self.cache_idle) {
            let dropped = self.policy.blocks_mut().expire_cached(cutoff);
            if dropped > 0 {
                tracing::debug!(blocks = dropped, "expired idle prefix-cache blocks");
                self.publish_stats(None);
            }
        }
    }

    fn accept(&mut self, sub: Submission) {
        let Submission { request, events, cancel } = sub;
        let n = request.n.max(1);
        self.shared.in_channel.fetch_sub(n, Ordering::AcqRel);
        let vocab = self.lm.model.config().vocab_size;
        let prompt = request.prompt_tokens.expose();
        let rid = self.next_request;
        self.next_request += 1;
        let mut state = RequestState {
            id: request.request_id.clone(),
            events,
            cancel,
            deadline: request.deadline,
            seqs: Vec::new(),
        };
        let mut ctxs = Vec::with_capacity(n);
        for choice in 0..n {
            let index = request.first_choice + choice;
            match ChoiceDecoder::new(&request.decode, index, &self.lm.info.eos_token_ids, vocab) {
                Ok(decoder) => ctxs.push(SeqCtx {
                    request: rid,
                    choice,
                    decoder,
                    prompt_scores: request.prompt_logprobs.map(|top| PromptScores::new(prompt.len(), top)),
                    timing: ChoiceTiming::default(),
                }),
                Err(e) => {
                    tracing::error!(request_id = %state.id.0, error = %e, "invalid decoding parameters reached the engine");
                    let _ = state.events.send(GenerationEvent::Failed { error: EngineError::Internal });
                    return;
                }
            }
        }
        // Nothing to generate (validation rejects both; kept so a malformed
        // request still gets its `Finished` events): every choice ends at once.
        if prompt.is_empty() || (request.decode.max_tokens == 0 && request.prompt_logprobs.is_none()) {
            for c in ctxs {
                let done = DecodeStep { finished: Some(FinishReason::Length), ..Default::default() };
                send_step(&state.events, c.choice, done, (0, 0), c.timing);
            }
            return;
        }
        for c in ctxs {
            let seq = SeqId(self.next_seq);
            self.next_seq += 1;
            // A scored prompt runs whole: positions served from the prefix
            // cache would have no logits. Its own scope shares with nothing
            // (a NUL never starts a principal id).
            let scope = match c.prompt_scores {
                Some(_) => PrefixScope::new(&format!("\0prompt-scoring/{}", seq.0)),
                None => request.prefix_scope.clone(),
            };
            self.policy.add(seq, scope, prompt.clone());
            self.seqs.insert(seq, c);
            state.seqs.push(seq);
        }
        self.requests.insert(rid, state);
    }

    /// Removes every sequence of cancelled or expired requests.
    fn drop_cancelled(&mut self) {
        let now = Instant::now();
        let gone: Vec<u64> = self.requests.iter().filter(|(_, r)| r.is_cancelled(now)).map(|(k, _)| *k).collect();
        for rid in gone {
            if let Some(r) = self.requests.remove(&rid) {
                if r.is_past_deadline(now) && !r.cancel.is_cancelled() {
                    // The client is still there: tell it why the request ended.
                    tracing::info!(request_id = %r.id.0, "request timed out");
                    let _ = r.events.send(GenerationEvent::Failed { error: EngineError::DeadlineExceeded });
                } else {
                    tracing::debug!(request_id = %r.id.0, "request cancelled");
                }
                for s in r.seqs {
                    self.policy.remove(s);
                    self.seqs.remove(&s);
                }
            }
        }
    }

    /// Fails a request: one `Failed` event, all its sequences removed.
    fn fail_request(&mut self, rid: u64) {
        self.fail_request_with(rid, EngineError::Internal);
    }

    fn fail_request_with(&mut self, rid: u64, error: EngineError) {
        if let Some(r) = self.requests.remove(&rid) {
            let _ = r.events.send(GenerationEvent::Failed { error });
            for s in r.seqs {
                self.policy.remove(s);
                self.seqs.remove(&s);
            }
        }
    }

    /// Publishes the engine's load; `plan` is the step just run (None between
    /// steps, which leaves the last-batch figures as they are).
    fn publish_stats(&self, plan: Option<&StepPlan>) {
        let fresh = self.policy.num_fresh_waiting();
        self.shared.waiting.store(fresh, Ordering::Release);
        if let Ok(mut s) = self.shared.stats.lock() {
            let cache = self.policy.blocks();
            s.running_seqs = self.policy.num_running();
            s.waiting_seqs = self.policy.num_waiting();
            s.kv_blocks_total = cache.total_blocks();
            s.kv_blocks_used = cache.total_blocks() - cache.free_blocks();
            s.preemptions_total = self.policy.preemptions();
            s.kv_blocks_cached = cache.cached_blocks();
            s.prefix_cache_hit_tokens_total = self.policy.prefix_hit_tokens();
            s.steps_total = self.steps;
            if let Some(plan) = plan {
                s.last_batch_seqs = plan.seqs.len();
                s.last_batch_tokens = plan.num_tokens();
            }
        }
    }

    fn step(&mut self) {
        let plan = self.policy.schedule();
        if plan.is_empty() {
            self.publish_stats(Some(&plan));
            if !self.policy.is_idle() {
                // Nothing runnable (cannot happen for requests that fit alone);
                // avoid a hot loop while waiting for cancellations.
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            return;
        }
        let step_started = Instant::now();
        for s in &plan.seqs {
            if let Some(c) = self.seqs.get_mut(&s.seq) {
                c.timing.admitted.get_or_insert(step_started);
            }
        }
        let lm = self.lm.clone();
        // Sequences whose prompt is being scored: every position's logits.
        let scored: Vec<SeqId> = plan
            .seqs
            .iter()
            .filter(|s| self.seqs.get(&s.seq).is_some_and(|c| c.prompt_scores.is_some()))
            .map(|s| s.seq)
            .collect();
        let policy = &mut self.policy;
        // The logits, and how many rows of them each planned sequence has.
        let forward = std::panic::AssertUnwindSafe(|| -> salus_models::Result<(Vec<f32>, Vec<usize>)> {
            let mut batch = policy.build_batch(&plan)?;
            for &seq in &scored {
                batch.want_every_position(seq);
            }
            let rows = batch.spans().iter().map(|s| batch.logit_rows_of(s)).collect();
            let logits = lm.model.forward(&batch, policy.blocks_mut())?;
            Ok((logits.flatten_all()?.to_vec1::<f32>()?, rows))
        });
        // The grammar masks of this step's constrained sequences depend only on
        // the tokens they accepted: computed beside the forward pass when
        // overlapping is on, else by each decoder's step after it.
        let mut constrained: Vec<&mut ChoiceDecoder> = Vec::new();
        if let Some(min) = self.mask_overlap_min {
            let sampling: std::collections::HashSet<SeqId> =
                plan.seqs.iter().filter(|s| s.samples).map(|s| s.seq).collect();
            constrained = self
                .seqs
                .iter_mut()
                .filter(|(id, c)| sampling.contains(id) && c.decoder.is_constrained())
                .map(|(_, c)| &mut c.decoder)
                .collect();
            if constrained.len() < min {
                constrained.clear();
            }
        }
        let result = if constrained.is_empty() {
            std::panic::catch_unwind(forward)
        } else {
            std::thread::scope(|scope| {
                let masks = scope.spawn(move || {
                    for d in constrained {
                        // A failure is reported by the decoder's step.
                        let _ = d.prepare();
                    }
                });
                let r = std::panic::catch_unwind(forward);
                let _ = masks.join();
                r
            })
        };
        self.steps += 1;
        let (logits, rows) = match result {
            Ok(Ok(l)) => l,
            Ok(Err(e)) => {
                tracing::error!(error = %e, seqs = plan.seqs.len(), "forward step failed");
                self.fail_step(&plan);
                self.publish_stats(Some(&plan));
                return;
            }
            Err(_) => {
                tracing::error!(seqs = plan.seqs.len(), "forward step panicked");
                self.fail_step(&plan);
                self.publish_stats(Some(&plan));
                return;
            }
        };
        self.policy.complete(&plan);
        let vocab = logits.len() / rows.iter().sum::<usize>().max(1);
        let mut row = 0;
        // The batch holds the plan's sequences in order.
        for (s, &n) in plan.seqs.iter().zip(&rows) {
            let seq_rows = &logits[row * vocab..(row + n) * vocab];
            row += n;
            if scored.contains(&s.seq) {
                self.on_prompt_logits(s.seq, s.start_pos, seq_rows, vocab);
            }
            if s.samples {
                if !self.send_prompt_scores(s.seq) {
                    continue;
                }
                self.on_logits(s.seq, &seq_rows[(n - 1) * vocab..]);
            }
        }
        self.publish_stats(Some(&plan));
    }

    /// Scores the prompt tokens the logits of `seq`'s positions from
    /// `start_pos` predict.
    fn on_prompt_logits(&mut self, seq: SeqId, start_pos: usize, rows: &[f32], vocab: usize) {
        let prompt_len = self.policy.prompt_len(seq);
        let Some(scores) = self.seqs.get_mut(&seq).and_then(|c| c.prompt_scores.as_mut()) else { return };
        scores.record(&self.policy.tokens(seq)[..prompt_len], start_pos, rows, vocab);
    }

    /// Once `seq`'s prompt has run: sends its scores, if it was scored.
    /// `false` if the request failed (a position went unscored).
    fn send_prompt_scores(&mut self, seq: SeqId) -> bool {
        let Some(ctx) = self.seqs.get_mut(&seq) else { return false };
        let Some(scores) = ctx.prompt_scores.take() else { return true };
        let (rid, choice) = (ctx.request, ctx.choice);
        match scores.take() {
            Some((logprobs, ranks)) => {
                if let Some(req) = self.requests.get(&rid) {
                    let _ = req.events.send(GenerationEvent::PromptLogprobs { choice, logprobs, ranks });
                }
                true
            }
            None => {
                tracing::error!(seq = seq.0, "prompt scoring missed a position");
                self.fail_request(rid);
                false
            }
        }
    }

    fn fail_step(&mut self, plan: &StepPlan) {
        let rids: Vec<u64> = plan.seqs.iter().filter_map(|s| self.seqs.get(&s.seq).map(|c| c.request)).collect();
        for rid in rids {
            self.fail_request(rid);
        }
    }

    /// Runs one decoding step of `seq` on its logits: streams the text, and
    /// either appends the token or ends the sequence.
    fn on_logits(&mut self, seq: SeqId, logits: &[f32]) {
        let Some(ctx) = self.seqs.get_mut(&seq) else { return };
        let rid = ctx.request;
        let Some(req) = self.requests.get(&rid) else { return };
        ctx.timing.first_token.get_or_insert_with(Instant::now);
        let tokens = self.policy.tokens(seq);
        let step = match ctx.decoder.step(&self.lm.tokenizer, logits, tokens, self.policy.prompt_len(seq)) {
            Ok(s) => s,
            Err(salus_models::ModelError::Grammar(e)) => {
                tracing::warn!(request_id = %req.id.0, error = %e, "output constraint failed");
                self.fail_request_with(rid, EngineError::ConstraintFailed);
                return;
            }
            Err(e) => {
                tracing::error!(request_id = %req.id.0, error = %e, "decoding step failed");
                self.fail_request(rid);
                return;
            }
        };
        if let Some(token) = step.next_token() {
            send_step(&req.events, ctx.choice, step, (0, 0), ctx.timing);
            self.policy.append_token(seq, token);
            return;
        }
        let (generated, cached) = (ctx.decoder.generated(), self.policy.cached_prompt_tokens(seq));
        send_step(&req.events, ctx.choice, step, (generated, cached), ctx.timing);
        self.policy.remove(seq);
        self.seqs.remove(&seq);
        if let Some(r) = self.requests.get_mut(&rid) {
            r.seqs.retain(|&s| s != seq);
            if r.seqs.is_empty() {
                self.requests.remove(&rid);
            }
        }
    }
}

/// Streams one decoding step of `choice`: its text and logprobs as a delta
/// (when there are any), then `Finished` when the step ended the choice
/// (`counts`, its completion tokens and cached prompt tokens, and `timing`
/// describe the finished choice).
fn send_step(
    events: &UnboundedSender<GenerationEvent>,
    choice: usize,
    step: DecodeStep,
    counts: (usize, usize),
    timing: ChoiceTiming,
) {
    let (completion_tokens, cached_prompt_tokens) = counts;
    let DecodeStep { text, token, logprob, finished } = step;
    let tokens = usize::from(token.is_some());
    if !text.expose().is_empty() || logprob.is_some() || tokens > 0 {
        let _ = events.send(GenerationEvent::Delta { choice, text, logprobs: logprob.into_iter().collect(), tokens });
    }
    if let Some(reason) = finished {
        let _ =
            events.send(GenerationEvent::Finished { choice, reason, completion_tokens, cached_prompt_tokens, timing });
    }
}
