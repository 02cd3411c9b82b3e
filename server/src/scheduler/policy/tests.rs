use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use salus_models::paged_cache::{BlockManager, PoolBlockManager, PrefixScope};
use salus_models::SeqId;

use super::*;

/// Limits with no separate cap on a step's prompt tokens (the batch budget is the cap).
fn limits(max_batch_tokens: usize, max_running_seqs: usize, prefill_chunk: usize) -> PolicyLimits {
    PolicyLimits {
        max_batch_tokens,
        max_running_seqs,
        prefill_chunk,
        max_prefill_tokens: max_batch_tokens,
        max_admissions_per_step: max_running_seqs,
    }
}

/// Prompt tokens of a plan: every chunk except the single-token decodes. (A
/// prompt's last chunk of exactly one token looks like a decode and is not
/// counted, so the check can be one token per sequence looser than the cap.)
fn prompt_tokens(plan: &StepPlan) -> usize {
    plan.seqs.iter().filter(|s| s.len > 1 || !s.samples || s.start_pos == 0).map(|s| s.len).sum()
}

fn scope() -> PrefixScope {
    PrefixScope::new("p")
}

/// What a slot of the simulated KV store holds: who wrote it (sequence,
/// incarnation) and what it stands for (scope, the tokens up to and including
/// its position: K/V depend on exactly those).
#[derive(Debug, Clone, PartialEq)]
struct Slot {
    writer: (SeqId, u32),
    scope: PrefixScope,
    prefix: Vec<u32>,
}

struct Sim {
    policy: Policy<PoolBlockManager>,
    /// Whether the block manager has a prefix cache (blocks may then be shared).
    prefix_cache: bool,
    store: Vec<Option<Slot>>,
    incarnation: HashMap<SeqId, u32>,
    max_new: HashMap<SeqId, usize>,
    generated: HashMap<SeqId, usize>,
}

impl Sim {
    /// Runs one step: "writes" each scheduled token into its slot through the
    /// block table and "reads" the whole visible history, checking every slot
    /// holds this sequence's scope and token prefix at that position and, with
    /// no prefix cache, was written by this sequence's current incarnation.
    fn step(&mut self, rng: &mut StdRng) -> (StepPlan, Vec<SeqId>) {
        let running_before: Vec<SeqId> = self.policy.running.clone();
        let plan = self.policy.schedule();
        let admitted_now = self.policy.running.iter().filter(|id| !running_before.contains(id)).count();
        assert!(admitted_now <= self.policy.limits.max_admissions_per_step, "too many admissions in one step");
        for p in &plan.preempted {
            *self.incarnation.get_mut(p).unwrap() += 1;
        }
        let bs = self.policy.blocks().block_size();
        let limits = self.policy.limits;
        assert!(plan.num_tokens() <= limits.max_batch_tokens, "budget exceeded");
        assert!(prompt_tokens(&plan) <= limits.max_prefill_tokens, "prefill budget exceeded");
        assert!(self.policy.num_running() <= limits.max_running_seqs);
        // Holders of each block among live sequences.
        let mut holders: HashMap<u32, Vec<SeqId>> = HashMap::new();
        for id in self.max_new.keys() {
            for b in self.policy.blocks().block_table(*id) {
                holders.entry(*b).or_default().push(*id);
            }
        }
        let mut seen = std::collections::HashSet::new();
        for s in &plan.seqs {
            assert!(seen.insert(s.seq), "sequence twice in a step");
            assert!(s.len >= 1 && (s.len == 1 || s.len <= limits.prefill_chunk));
            let table = self.policy.blocks().block_table(s.seq).to_vec();
            let tokens = self.policy.tokens(s.seq).to_vec();
            assert!(table.len() * bs >= s.start_pos + s.len, "blocks not reserved");
            let inc = self.incarnation[&s.seq];
            let sc = self.policy.seqs[&s.seq].scope.clone();
            for pos in s.start_pos..s.start_pos + s.len {
                let block = table[pos / bs];
                assert_eq!(holders[&block], vec![s.seq], "sequence {:?} writes a shared block", s.seq);
                let slot = block as usize * bs + pos % bs;
                self.store[slot] =
                    Some(Slot { writer: (s.seq, inc), scope: sc.clone(), prefix: tokens[..=pos].to_vec() });
            }
            for pos in 0..s.start_pos + s.len {
                let slot = table[pos / bs] as usize * bs + pos % bs;
                let held = self.store[slot].as_ref().unwrap_or_else(|| panic!("{:?} reads an unwritten slot", s.seq));
                assert!(
                    held.scope == sc && held.prefix == tokens[..=pos],
                    "sequence {:?} reads a foreign or stale slot at {pos}",
                    s.seq
                );
                if !self.prefix_cache {
                    assert_eq!(held.writer, (s.seq, inc), "{:?} reads a slot it did not write", s.seq);
                }
            }
        }
        // A block in two live tables is a whole, computed block at the same
        // place in both (only the prefix cache shares, and only those).
        for (b, ids) in holders.iter().filter(|(_, ids)| ids.len() > 1) {
            assert!(self.prefix_cache, "block {b} held by two sequences");
            let place = |id: &SeqId| self.policy.blocks().block_table(*id).iter().position(|x| x == b).unwrap();
            let i = place(&ids[0]);
            for id in ids {
                assert_eq!(place(id), i, "block {b} at different places");
                assert!(self.policy.seqs[id].computed >= (i + 1) * bs, "shared block {b} is not fully computed");
            }
        }
        self.policy.complete(&plan);
        let mut finished = Vec::new();
        for s in plan.seqs.iter().filter(|s| s.samples) {
            let g = self.generated.get_mut(&s.seq).unwrap();
            *g += 1;
            if *g >= self.max_new[&s.seq] {
                finished.push(s.seq);
            } else {
                self.policy.append_token(s.seq, rng.random_range(0..1000));
            }
        }
        for f in &finished {
            self.policy.remove(*f);
            self.max_new.remove(f);
        }
        (plan, finished)
    }
}

/// Seeded random arrivals and cancellations over a tiny cache: every request
/// completes or is cancelled, blocks return to zero, no sequence ever reads
/// a block it does not own, admission respects arrival order.
#[test]
fn scheduler_randomized_policy_never_leaks_or_shares_blocks() {
    let scopes = [PrefixScope::new("a"), PrefixScope::new("b")];
    for seed in 0..8u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let (blocks, bs) = (24, 4); // 96 tokens in all
                                    // Half the seeds with a prefix cache: blocks are then shared, and the
                                    // same checks hold (no write to a shared block, every read sees the K/V
                                    // of exactly this scope's token prefix, blocks return to the pool).
        let prefix_cache = seed >= 4;
        let manager = if prefix_cache {
            PoolBlockManager::with_prefix_cache(blocks, bs)
        } else {
            PoolBlockManager::new(blocks, bs)
        };
        let mut sim = Sim {
            // Prompt tokens capped below the batch budget (seeds alternate), so
            // the cap's bookkeeping runs through preemption and cancellation too.
            policy: Policy::new(
                PolicyLimits {
                    max_prefill_tokens: if seed % 2 == 0 { 12 } else { 40 },
                    max_admissions_per_step: if (seed / 2) % 2 == 0 { 1 } else { 6 },
                    ..limits(40, 6, 16)
                },
                manager,
            ),
            prefix_cache,
            store: vec![None; blocks * bs],
            incarnation: HashMap::new(),
            max_new: HashMap::new(),
            generated: HashMap::new(),
        };
        let mut next = 0u64;
        let (mut completed, mut cancelled, mut arrived) = (0usize, 0usize, 0usize);
        let mut admitted_order = Vec::new();
        let mut steps = 0;
        while steps < 3000 || !sim.policy.is_idle() {
            steps += 1;
            assert!(steps < 20_000, "seed {seed}: no progress (livelock)");
            if steps < 3000 && rng.random_bool(0.3) {
                let prompt_len = rng.random_range(1..60);
                let max_new = rng.random_range(1..=(96 - prompt_len).min(40));
                let id = SeqId(next);
                next += 1;
                // A common opening of random length, then tokens of its own.
                let common = rng.random_range(0..=prompt_len);
                let prompt: Vec<u32> =
                    (0..prompt_len).map(|i| if i < common { i as u32 } else { rng.random_range(0..4) }).collect();
                let sc = scopes[rng.random_range(0..scopes.len())].clone();
                sim.policy.add(id, sc, prompt);
                sim.incarnation.insert(id, 0);
                sim.max_new.insert(id, max_new);
                sim.generated.insert(id, 0);
                arrived += 1;
            }
            if rng.random_bool(0.03) && !sim.max_new.is_empty() {
                let ids: Vec<SeqId> = sim.max_new.keys().copied().collect();
                let victim = ids[rng.random_range(0..ids.len())];
                sim.policy.remove(victim);
                sim.max_new.remove(&victim);
                cancelled += 1;
            }
            let (plan, finished) = sim.step(&mut rng);
            admitted_order.extend(plan.admitted.iter().map(|s| s.0));
            completed += finished.len();
            let used = blocks - sim.policy.blocks().free_blocks();
            let held: std::collections::HashSet<u32> =
                sim.max_new.keys().flat_map(|id| sim.policy.blocks().block_table(*id).to_vec()).collect();
            assert_eq!(used, held.len(), "seed {seed}: blocks leaked");
        }
        assert_eq!(completed + cancelled, arrived, "seed {seed}");
        assert!(completed > arrived / 2, "seed {seed}: most requests should complete");
        assert_eq!(sim.policy.blocks().free_blocks(), blocks, "seed {seed}: blocks used must return to 0");
        assert!(sim.policy.preemptions() > 0, "seed {seed}: the tiny cache must force preemption");
        if prefix_cache {
            assert!(sim.policy.prefix_hit_tokens() > 0, "seed {seed}: common prompt openings must hit the cache");
        } else {
            assert_eq!(sim.policy.prefix_hit_tokens(), 0);
        }
        let mut sorted = admitted_order.clone();
        sorted.sort();
        assert_eq!(admitted_order, sorted, "seed {seed}: admission out of arrival order");
    }
}

#[test]
fn scheduler_decodes_are_not_stalled_by_a_long_prefill() {
    let mut p = Policy::new(limits(8, 4, 8), PoolBlockManager::new(100, 4));
    p.add(SeqId(1), scope(), vec![1, 2, 3]);
    let plan = p.schedule();
    assert_eq!(plan.seqs, vec![ScheduledSeq { seq: SeqId(1), start_pos: 0, len: 3, samples: true }]);
    p.complete(&plan);
    p.append_token(SeqId(1), 9);
    p.add(SeqId(2), scope(), (0..30).collect());
    // Every step: seq 1 decodes, seq 2 prefills in chunks within the budget.
    let mut prefilled = 0;
    for _ in 0..5 {
        let plan = p.schedule();
        assert_eq!(plan.seqs[0].seq, SeqId(1));
        assert_eq!(plan.seqs[0].len, 1);
        assert!(plan.num_tokens() <= 8);
        let s2 = plan.seqs.iter().find(|s| s.seq == SeqId(2));
        if let Some(s2) = s2 {
            assert_eq!(s2.start_pos, prefilled);
            prefilled += s2.len;
            assert_eq!(s2.samples, prefilled == 30);
        }
        p.complete(&plan);
        p.append_token(SeqId(1), 9);
        if prefilled == 30 {
            p.append_token(SeqId(2), 9);
        }
    }
    assert_eq!(prefilled, 30);
}

#[test]
fn scheduler_preempts_the_youngest_and_recomputes_it_later() {
    // 4 blocks of 2 tokens: two sequences of 3 tokens fit, growth forces preemption.
    let mut p = Policy::new(limits(64, 8, 64), PoolBlockManager::new(4, 2));
    p.add(SeqId(1), scope(), vec![1, 2, 3]);
    p.add(SeqId(2), scope(), vec![4, 5, 6]);
    let plan = p.schedule();
    assert_eq!(plan.seqs.len(), 2);
    p.complete(&plan);
    p.append_token(SeqId(1), 7);
    p.append_token(SeqId(2), 8);
    // 4 tokens each fit exactly; a fifth token of seq 1 needs a block.
    let plan = p.schedule();
    assert_eq!(plan.seqs.len(), 2);
    p.complete(&plan);
    p.append_token(SeqId(1), 7);
    p.append_token(SeqId(2), 8);
    let plan = p.schedule();
    assert_eq!(plan.preempted, vec![SeqId(2)]);
    assert_eq!(plan.seqs, vec![ScheduledSeq { seq: SeqId(1), start_pos: 4, len: 1, samples: true }]);
    assert_eq!(p.num_waiting(), 1);
    assert_eq!(p.tokens(SeqId(2)), &[4, 5, 6, 8, 8], "generated tokens are kept for recompute");
    p.complete(&plan);
    p.remove(SeqId(1));
    let plan = p.schedule();
    assert_eq!(plan.seqs, vec![ScheduledSeq { seq: SeqId(2), start_pos: 0, len: 5, samples: true }]);
    assert!(plan.admitted.is_empty(), "a readmitted sequence is not fresh");
    assert_eq!(p.preemptions(), 1);
    p.remove(SeqId(2));
    assert_eq!(p.blocks().free_blocks(), 4);
}

#[test]
fn scheduler_admits_in_arrival_order_without_overtaking() {
    let mut p = Policy::new(limits(64, 8, 64), PoolBlockManager::new(4, 4));
    p.add(SeqId(1), scope(), (0..10).collect()); // 3 blocks
    p.add(SeqId(2), scope(), (0..8).collect()); // 2 blocks: does not fit now
    p.add(SeqId(3), scope(), (0..2).collect()); // 1 block: would fit, but must not overtake 2
    let plan = p.schedule();
    assert_eq!(plan.admitted, vec![SeqId(1)]);
    assert_eq!(p.num_fresh_waiting(), 2);
    p.remove(SeqId(1));
    let plan = p.schedule();
    assert_eq!(plan.admitted, vec![SeqId(2), SeqId(3)]);
}

/// Regression test for TTFT waves: eight prompts arriving together used to be
/// prefilled in one step, so all eight waited for the slowest, then decoded and
/// finished in lock-step, and the next eight arrived together again. With a cap
/// on a step's prompt tokens they are prefilled oldest first, a cap's worth per
/// step, and their first tokens come in arrival order on successive steps.
#[test]
fn scheduler_prefills_a_burst_oldest_first_within_the_step_prompt_cap() {
    let mut p =
        Policy::new(PolicyLimits { max_prefill_tokens: 20, ..limits(512, 16, 256) }, PoolBlockManager::new(200, 4));
    for i in 0..8u64 {
        p.add(SeqId(i), scope(), (0..10).collect());
    }
    let mut first_token_step = vec![None; 8];
    for step in 0..8 {
        let plan = p.schedule();
        assert!(prompt_tokens(&plan) <= 20, "step {step}: prompt tokens over the cap");
        // Every sequence already prefilled decodes in this step too.
        let decodes = plan.seqs.iter().filter(|s| s.len == 1 && s.start_pos >= 10).count();
        assert_eq!(decodes, first_token_step.iter().filter(|f| f.is_some()).count(), "step {step}");
        p.complete(&plan);
        for s in plan.seqs.iter().filter(|s| s.samples) {
            p.append_token(s.seq, 1);
            let f = &mut first_token_step[s.seq.0 as usize];
            if f.is_none() {
                *f = Some(step);
            }
        }
    }
    // Two 10-token prompts per step, in arrival order.
    assert_eq!(first_token_step, vec![Some(0), Some(0), Some(1), Some(1), Some(2), Some(2), Some(3), Some(3)]);
}

/// Regression test for lock-step waves of short prompts: two prompts admitted in
/// one step finish in one step (same max_tokens), and closed-loop clients send
/// their next prompts together, so each wave's later arrivals wait. With one
/// admission per step, two prompts arriving together start (and so finish) a
/// step apart, even when the step's prompt budget would hold both.
#[test]
fn scheduler_admits_one_sequence_per_step_so_finishes_stay_staggered() {
    let run = |max_admissions_per_step: usize| {
        let mut p = Policy::new(
            PolicyLimits { max_prefill_tokens: 64, max_admissions_per_step, ..limits(512, 16, 256) },
            PoolBlockManager::new(200, 4),
        );
        p.add(SeqId(1), scope(), (0..10).collect());
        p.add(SeqId(2), scope(), (0..10).collect());
        let (max_new, mut generated, mut finished_at) = (5, [0usize; 3], [None; 3]);
        for step in 0..12 {
            let plan = p.schedule();
            p.complete(&plan);
            for s in plan.seqs.iter().filter(|s| s.samples) {
                let i = s.seq.0 as usize;
                generated[i] += 1;
                if generated[i] == max_new {
                    finished_at[i] = Some(step);
                    p.remove(s.seq);
                } else {
                    p.append_token(s.seq, 1);
                }
            }
        }
        (finished_at[1].unwrap(), finished_at[2].unwrap())
    };
    let (a, b) = run(16);
    assert_eq!(a, b, "admitted together, both finish in the same step");
    let (a, b) = run(1);
    assert_eq!(b, a + 1, "one admission per step: finishes a step apart");
}

#[test]
fn scheduler_splits_a_prompt_longer_than_the_step_prompt_cap() {
    let mut p =
        Policy::new(PolicyLimits { max_prefill_tokens: 16, ..limits(512, 16, 256) }, PoolBlockManager::new(50, 4));
    p.add(SeqId(1), scope(), (0..40).collect());
    let mut chunks = Vec::new();
    loop {
        let plan = p.schedule();
        assert_eq!(plan.seqs.len(), 1);
        chunks.push((plan.seqs[0].start_pos, plan.seqs[0].len, plan.seqs[0].samples));
        p.complete(&plan);
        if plan.seqs[0].samples {
            break;
        }
    }
    assert_eq!(chunks, vec![(0, 16, false), (16, 16, false), (32, 8, true)]);
}
