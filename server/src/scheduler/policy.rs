//! The scheduling policy: queues, admission, preemption and the token budget.
//!
//! Pure and deterministic — no model, no threads, no clock — so it can be driven
//! for thousands of randomized steps in a test. The engine's worker asks it for a
//! [`StepPlan`] each step, runs the model over the plan, and reports back.
//!
//! Rules (vLLM-like, with chunked prefill):
//! 1. Every running sequence in decode (one pending token) gets its token first,
//!    oldest admission first. When its next token needs a block and none is free,
//!    the most recently admitted running sequence is preempted by recompute: its
//!    blocks are freed and it goes back to the front of the waiting queue keeping
//!    its generated tokens, which are recomputed as a prefill when readmitted.
//! 2. Running sequences still prefilling get a chunk of at most `prefill_chunk`
//!    tokens within what is left of `max_batch_tokens`. Their blocks were reserved
//!    at admission, so prefill never needs new blocks and never stalls decoding.
//! 3. Waiting sequences are admitted strictly in queue order (no overtaking, so
//!    no starvation) while there is budget, a running slot, free blocks for
//!    all their pending tokens, and fewer than `max_admissions_per_step`
//!    admitted in this step. Nothing is admitted in a step that preempted.
//!
//! All prompt tokens of a step (rules 2 and 3 together) also stay within
//! `max_prefill_tokens`. Where a step's cost grows with its tokens (a CPU is
//! compute-bound from a few dozen rows on), packing many prompts into one step
//! only makes every one of them wait for the last: with a small cap a burst of
//! arrivals is prefilled oldest first, a few prompts per step, so the first
//! answers start early and the streams stay staggered instead of moving in
//! lock-step waves (which would make every later arrival wait for a whole wave's
//! prefill). A GPU, where a step's cost hardly depends on its size, wants the
//! cap as large as the batch.
//!
//! Admissions per step: sequences that start in the same step and stop at the
//! same `max_tokens` finish in the same step, and clients that send their next
//! request on completion then arrive together again, so lock-step waves keep
//! themselves going, and every wave's later arrivals wait for the earlier
//! ones' prefill. Admitting one new sequence per step (the CPU default) staggers
//! finishes by at least a step, so arrivals spread out and usually find the
//! next step free for them.
//!
//! Any sequence whose tokens fit the whole cache alone eventually runs: the
//! oldest running sequence is never preempted while a younger one holds blocks.
//!
//! Prefix caching: at admission a sequence first attaches the whole blocks of
//! its tokens that its scope has cached (all but the last token, whose logits
//! must be computed), and starts its prefill after them; after each step the
//! sequences offer their newly completed blocks to the cache. Cached blocks no
//! sequence holds count as free, so admission and preemption are unchanged.

use std::collections::{HashMap, VecDeque};

use salus_models::paged_cache::{BlockManager, PrefixScope};
use salus_models::{PackedBatch, Phi, SeqId};

/// Limits of one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicyLimits {
    /// Most tokens (decode + prefill) in one forward step.
    pub max_batch_tokens: usize,
    /// Most sequences running (holding KV blocks) at once.
    pub max_running_seqs: usize,
    /// Most prompt tokens of one sequence per step.
    pub prefill_chunk: usize,
    /// Most prompt tokens of all sequences together per step.
    pub max_prefill_tokens: usize,
    /// Most waiting sequences admitted (starting their prefill) per step.
    pub max_admissions_per_step: usize,
}

#[derive(Debug)]
struct SeqState {
    /// Prompt followed by generated tokens. PHI.
    tokens: Phi<Vec<u32>>,
    prompt_len: usize,
    /// Whose cached prefixes this sequence may share.
    scope: PrefixScope,
    /// Tokens whose K/V are in the cache.
    computed: usize,
    running: bool,
    /// Never admitted yet (counts towards the bounded waiting queue).
    fresh: bool,
    /// Prompt tokens taken from the prefix cache at the first admission.
    cached_at_admission: usize,
}

/// One sequence's share of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScheduledSeq {
    pub seq: SeqId,
    pub start_pos: usize,
    pub len: usize,
    /// The chunk reaches the last known token: its logits give the next token.
    pub samples: bool,
}

/// What to run in one step.
#[derive(Debug, Clone, Default)]
pub struct StepPlan {
    pub seqs: Vec<ScheduledSeq>,
    /// Sequences preempted (blocks freed, requeued) while planning this step.
    pub preempted: Vec<SeqId>,
    /// Sequences admitted for the first time in this step.
    pub admitted: Vec<SeqId>,
}

impl StepPlan {
    pub fn num_tokens(&self) -> usize {
        self.seqs.iter().map(|s| s.len).sum()
    }
    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }
}

/// Waiting/running queues over a [`BlockManager`].
#[derive(Debug)]
pub struct Policy<B: BlockManager> {
    limits: PolicyLimits,
    blocks: B,
    seqs: HashMap<SeqId, SeqState>,
    waiting: VecDeque<SeqId>,
    /// Admission order, oldest first.
    running: Vec<SeqId>,
    preemptions: u64,
    /// Tokens admitted sequences did not compute because their blocks were cached.
    prefix_hit_tokens: u64,
}

impl<B: BlockManager> Policy<B> {
    pub fn new(limits: PolicyLimits, blocks: B) -> Self {
        let limits = PolicyLimits {
            max_batch_tokens: limits.max_batch_tokens.max(1),
            max_running_seqs: limits.max_running_seqs.max(1),
            prefill_chunk: limits.prefill_chunk.max(1),
            max_prefill_tokens: limits.max_prefill_tokens.max(1),
            max_admissions_per_step: limits.max_admissions_per_step.max(1),
        };
        Policy {
            limits,
            blocks,
            seqs: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            preemptions: 0,
            prefix_hit_tokens: 0,
        }
    }

    pub fn blocks(&self) -> &B {
        &self.blocks
    }
    pub fn blocks_mut(&mut self) -> &mut B {
        &mut self.blocks
    }

    /// Tokens the whole cache can hold.
    pub fn capacity_tokens(&self) -> usize {
        self.blocks.total_blocks() * self.blocks.block_size()
    }

    /// Queues a new sequence at the back. `prompt` must be non-empty and, with
    /// everything it may generate, fit [`Self::capacity_tokens`] (checked by the caller).
    pub fn add(&mut self, seq: SeqId, scope: PrefixScope, prompt: Vec<u32>) {
        debug_assert!(!prompt.is_empty());
        let prompt_len = prompt.len();
        let state = SeqState {
            tokens: Phi::new(prompt),
            prompt_len,
            scope,
            computed: 0,
            running: false,
            fresh: true,
            cached_at_admission: 0,
        };
        self.seqs.insert(seq, state);
        self.waiting.push_back(seq);
    }

    /// Removes a sequence (finished or cancelled), freeing its blocks.
    pub fn remove(&mut self, seq: SeqId) {
        if let Some(s) = self.seqs.remove(&seq) {
            if s.running {
                self.running.retain(|&r| r != seq);
            } else {
                self.waiting.retain(|&w| w != seq);
            }
            self.blocks.release(seq);
        }
    }

    /// Appends a sampled token to a sequence.
    pub fn append_token(&mut self, seq: SeqId, token: u32) {
        if let Some(s) = self.seqs.get_mut(&seq) {
            s.tokens.expose_mut().push(token);
        }
    }

    /// Prompt followed by generated tokens.
    pub fn tokens(&self, seq: SeqId) -> &[u32] {
        self.seqs.get(&seq).map_or(&[], |s| s.tokens.expose())
    }
    pub fn prompt_len(&self, seq: SeqId) -> usize {
        self.seqs.get(&seq).map_or(0, |s| s.prompt_len)
    }
    pub fn contains(&self, seq: SeqId) -> bool {
        self.seqs.contains_key(&seq)
    }
    pub fn num_running(&self) -> usize {
        self.running.len()
    }
    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }
    /// Waiting sequences never admitted yet (excludes preempted ones).
    pub fn num_fresh_waiting(&self) -> usize {
        self.waiting.iter().filter(|w| self.seqs[w].fresh).count()
    }
    pub fn preemptions(&self) -> u64 {
        self.preemptions
    }
    /// Prompt tokens `seq` took from the prefix cache at its first admission.
    pub fn cached_prompt_tokens(&self, seq: SeqId) -> usize {
        self.seqs.get(&seq).map_or(0, |s| s.cached_at_admission)
    }
    /// Tokens taken from the prefix cache instead of being computed, in all.
    pub fn prefix_hit_tokens(&self) -> u64 {
        self.prefix_hit_tokens
    }
    pub fn is_idle(&self) -> bool {
        self.seqs.is_empty()
    }

    fn preempt(&mut self, victim: SeqId, plan: &mut StepPlan) {
        self.running.retain(|&r| r != victim);
        self.blocks.release(victim);
        let s = self.seqs.get_mut(&victim).expect("running sequence is known");
        s.running = false;
        s.computed = 0;
        self.waiting.push_front(victim);
        self.preemptions += 1;
        plan.preempted.push(victim);
    }

    /// Plans the next step.
    pub fn schedule(&mut self) -> StepPlan {
        let mut plan = StepPlan::default();
        let mut budget = self.limits.max_batch_tokens;

        // 1. Decodes, oldest first; preempt the youngest when blocks run out.
        let mut i = 0;
        while i < self.running.len() {
            let id = self.running[i];
            let s = &self.seqs[&id];
            let pending = s.tokens.expose().len() - s.computed;
            if pending != 1 {
                i += 1;
                continue;
            }
            if budget == 0 {
                break;
            }
            let need = s.computed + 1;
            let mut self_preempted = false;
            while !self.blocks.reserve(id, need) {
                let victim = *self.running.last().expect("the current sequence is running");
                self.preempt(victim, &mut plan);
                if victim == id {
                    self_preempted = true;
                    break;
                }
            }
            if self_preempted {
                break; // it was the youngest: everything after it is gone too
            }
            let start_pos = self.seqs[&id].computed;
            plan.seqs.push(ScheduledSeq { seq: id, start_pos, len: 1, samples: true });
            budget -= 1;
            i += 1;
        }

        // 2. Prefill chunks of running sequences (blocks reserved at admission).
        // From here on every token is a prompt token: one budget covers both limits.
        let mut prefill_budget = self.limits.max_prefill_tokens.min(budget);
        for &id in &self.running {
            if prefill_budget == 0 {
                break;
            }
            let s = &self.seqs[&id];
            let total = s.tokens.expose().len();
            let pending = total - s.computed;
            if pending <= 1 {
                continue;
            }
            let len = pending.min(self.limits.prefill_chunk).min(prefill_budget);
            plan.seqs.push(ScheduledSeq { seq: id, start_pos: s.computed, len, samples: s.computed + len == total });
            prefill_budget -= len;
        }

        // 3. Admission in queue order.
        if plan.preempted.is_empty() {
            let mut admissions = 0;
            while prefill_budget > 0
                && self.running.len() < self.limits.max_running_seqs
                && admissions < self.limits.max_admissions_per_step
            {
                let Some(&id) = self.waiting.front() else { break };
                let s = &self.seqs[&id];
                let tokens = s.tokens.expose();
                let total = tokens.len();
                let cached = self.blocks.attach_cached_prefix(id, &s.scope, &tokens[..total - 1]);
                if !self.blocks.reserve(id, total) {
                    self.blocks.release(id);
                    break;
                }
                self.waiting.pop_front();
                self.running.push(id);
                admissions += 1;
                self.prefix_hit_tokens += cached as u64;
                let s = self.seqs.get_mut(&id).expect("waiting sequence is known");
                s.running = true;
                s.computed = cached;
                if s.fresh {
                    s.fresh = false;
                    s.cached_at_admission = cached;
                    plan.admitted.push(id);
                }
                let len = (total - cached).min(self.limits.prefill_chunk).min(prefill_budget);
                plan.seqs.push(ScheduledSeq { seq: id, start_pos: cached, len, samples: cached + len == total });
                prefill_budget -= len;
            }
        }
        plan
    }

    /// Builds the packed batch of a plan.
    pub fn build_batch(&self, plan: &StepPlan) -> salus_models::Result<PackedBatch> {
        let mut b = PackedBatch::new();
        for s in &plan.seqs {
            let t = self.tokens(s.seq);
            b.push(s.seq, &t[s.start_pos..s.start_pos + s.len], s.start_pos)?;
        }
        Ok(b)
    }

    /// Records that the plan's tokens are now cached (and offers newly
    /// completed blocks to the prefix cache). Call after a successful forward
    /// step, before [`Self::append_token`] / [`Self::remove`].
    pub fn complete(&mut self, plan: &StepPlan) {
        for p in &plan.seqs {
            if let Some(s) = self.seqs.get_mut(&p.seq) {
                if s.running && s.computed == p.start_pos {
                    s.computed += p.len;
                    self.blocks.register_computed(p.seq, &s.tokens.expose()[..s.computed]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
