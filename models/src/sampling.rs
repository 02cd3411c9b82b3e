//! Token sampling: logit processing (bias, penalties, temperature), truncation
//! (top-k, top-p, min-p), the random draw, and logprobs.
//!
//! One [`Sampler`] per generated sequence: it owns the sequence's random number
//! generator (seeded → reproducible) and scratch buffers that are reused every
//! step, so sampling allocates nothing per token after the first.
//!
//! Order of operations on the raw logits of one step:
//! 1. `logit_bias` is added (OpenAI);
//! 2. repetition penalty (Hugging Face / CTRL style) over **prompt and generated**
//!    tokens: a positive logit is divided by the penalty, a negative one multiplied;
//! 3. presence / frequency penalties (OpenAI formula) over **generated tokens only**:
//!    `logit -= frequency_penalty * count + presence_penalty * (count > 0)`.
//!
//! The result are the *processed logits*. Reported logprobs (of the chosen token
//! and of the `top_logprobs` alternatives) are the log-softmax of the processed
//! logits — before temperature and before truncation — so that they describe the
//! model's (biased, penalized) distribution and do not depend on the sampling
//! knobs. Then:
//! 4. temperature 0 → greedy: the argmax of the processed logits (ties → lowest id);
//! 5. otherwise logits are divided by the temperature, truncated by top-k, then
//!    top-p (nucleus), then min-p (relative to the most likely token) — the order
//!    of Hugging Face's logits warpers — and a token is drawn from the
//!    renormalized remainder.
//!
//! Top-k / top-p work on a partial selection (`select_nth_unstable`): only the
//! best [`PARTIAL_SORT`] candidates are sorted, more only when top-p needs them.
//! Exponentials over the vocabulary use a branch-light polynomial
//! ([`exp_nonpositive`]) that the compiler vectorizes.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::{ModelError, Result};
use salus_kernels::math::exp_nonpositive;

/// How many of the best candidates are selected and sorted before falling back
/// to a full sort for top-p.
const PARTIAL_SORT: usize = 256;

/// Largest `top_logprobs` OpenAI allows.
pub const MAX_TOP_LOGPROBS: usize = 20;

/// Sampling parameters of one request. Defaults are OpenAI's (temperature 1,
/// everything else off).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy; 0..=2.
    pub temperature: f32,
    /// Keep only the `k` most likely tokens; 0 = off.
    pub top_k: usize,
    /// Nucleus sampling: keep the smallest set of tokens whose probability
    /// reaches `top_p`; in (0, 1], 1 = off.
    pub top_p: f32,
    /// Drop tokens whose probability is below `min_p` × the top token's; in [0, 1], 0 = off.
    pub min_p: f32,
    /// Seed of the random generator: same seed, same parameters, same logits → same tokens.
    /// `None` seeds from the operating system.
    pub seed: Option<u64>,
    /// Hugging Face repetition penalty over prompt and generated tokens; > 0, 1 = off.
    pub repetition_penalty: f32,
    /// OpenAI presence penalty over generated tokens; -2..=2, 0 = off.
    pub presence_penalty: f32,
    /// OpenAI frequency penalty over generated tokens; -2..=2, 0 = off.
    pub frequency_penalty: f32,
    /// Added to the logit of each listed token; -100..=100 (-100 effectively bans it).
    pub logit_bias: Vec<(u32, f32)>,
    /// Return this many most likely alternatives with each token; 0..=20, `None` = off.
    pub top_logprobs: Option<usize>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: None,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            top_logprobs: None,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding (temperature 0), everything else default.
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            ..Default::default()
        }
    }

    /// Checks every parameter against its allowed range; the error names the parameter.
    pub fn validate(&self, vocab_size: usize) -> Result<()> {
        fn bad(param: &'static str, reason: impl Into<String>) -> Result<()> {
            Err(ModelError::InvalidSampling {
                param,
                reason: reason.into(),
            })
        }
        let t = self.temperature;
        if !(t.is_finite() && (0.0..=2.0).contains(&t)) {
            return bad("temperature", "must be between 0 and 2");
        }
        if !(self.top_p.is_finite() && self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", "must be greater than 0 and at most 1");
        }
        if !(self.min_p.is_finite() && (0.0..=1.0).contains(&self.min_p)) {
            return bad("min_p", "must be between 0 and 1");
        }
        let rp = self.repetition_penalty;
        if !(rp.is_finite() && rp > 0.0 && rp <= 10.0) {
            return bad(
                "repetition_penalty",
                "must be greater than 0 and at most 10",
            );
        }
        if !(self.presence_penalty.is_finite() && (-2.0..=2.0).contains(&self.presence_penalty)) {
            return bad("presence_penalty", "must be between -2 and 2");
        }
        if !(self.frequency_penalty.is_finite() && (-2.0..=2.0).contains(&self.frequency_penalty)) {
            return bad("frequency_penalty", "must be between -2 and 2");
        }
        for &(id, bias) in &self.logit_bias {
            if id as usize >= vocab_size {
                return bad(
                    "logit_bias",
                    format!("token id {id} is outside the vocabulary (size {vocab_size})"),
                );
            }
            if !(bias.is_finite() && (-100.0..=100.0).contains(&bias)) {
                return bad("logit_bias", "bias values must be between -100 and 100");
            }
        }
        if let Some(n) = self.top_logprobs {
            if n > MAX_TOP_LOGPROBS {
                return bad(
                    "top_logprobs",
                    format!("must be between 0 and {MAX_TOP_LOGPROBS}"),
                );
            }
        }
        Ok(())
    }
}

/// One sampled token.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub token: u32,
    /// Log-probability of `token` under the processed logits (see the module
    /// docs); computed only when log-probabilities were requested
    /// ([`SamplingParams::top_logprobs`] is `Some`), as it costs a pass of
    /// exponentials over the whole vocabulary.
    pub logprob: Option<f32>,
    /// The `top_logprobs` most likely tokens with their log-probabilities, most
    /// likely first (ties → lower id first); empty when not requested.
    pub top_logprobs: Vec<(u32, f32)>,
}

/// Per-sequence sampler.
pub struct Sampler {
    params: SamplingParams,
    vocab_size: usize,
    rng: StdRng,
    /// Processed logits of the current step.
    logits: Vec<f32>,
    /// Candidate (token, value) scratch space.
    cand: Vec<(u32, f32)>,
    /// Per-token scratch marks for penalties (`stamp` tells which step set them).
    marks: Vec<u32>,
    counts: Vec<u32>,
    stamp: u32,
}

impl std::fmt::Debug for Sampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sampler")
            .field("params", &self.params)
            .field("vocab_size", &self.vocab_size)
            .finish()
    }
}

impl Sampler {
    /// Validates `params` and creates a sampler for logits of `vocab_size` entries.
    pub fn new(params: SamplingParams, vocab_size: usize) -> Result<Self> {
        if vocab_size == 0 {
            return Err(ModelError::InvalidSampling {
                param: "vocab_size",
                reason: "must be positive".into(),
            });
        }
        params.validate(vocab_size)?;
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Ok(Sampler {
            params,
            vocab_size,
            rng,
            logits: Vec::with_capacity(vocab_size),
            cand: Vec::with_capacity(vocab_size),
            marks: Vec::new(),
            counts: Vec::new(),
            stamp: 0,
        })
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Samples the next token.
    ///
    /// `logits` are the model's last-position logits (length `vocab_size`);
    /// `context` is the sequence so far — prompt followed by generated tokens —
    /// and `prompt_len` says where the generated part starts. The repetition
    /// penalty looks at all of `context`, presence/frequency penalties only at
    /// `context[prompt_len..]`.
    pub fn sample(
        &mut self,
        logits: &[f32],
        context: &[u32],
        prompt_len: usize,
    ) -> Result<Sampled> {
        if logits.len() != self.vocab_size {
            return Err(ModelError::InvalidSampling {
                param: "logits",
                reason: format!("expected {} logits, got {}", self.vocab_size, logits.len()),
            });
        }
        if prompt_len > context.len() {
            return Err(ModelError::InvalidSampling {
                param: "prompt_len",
                reason: "longer than the context".into(),
            });
        }
        self.process(logits, context, prompt_len);
        let v = &self.logits;

        let max = max_of(v);
        if !max.is_finite() {
            return Err(ModelError::InvalidSampling {
                param: "logits",
                reason: "no finite logit (all tokens banned or the model produced NaN/inf)".into(),
            });
        }
        let token = if self.params.temperature == 0.0 {
            first_index_of(v, max)
        } else {
            self.draw(max)
        };
        // Log-softmax normalizer of the processed logits, only when asked for.
        let (logprob, top_logprobs) = match self.params.top_logprobs {
            Some(n) => {
                let log_z = max + sum_exp(&self.logits, max).ln();
                let top = if n > 0 { self.top_n(n, log_z) } else { Vec::new() };
                (Some(self.logits[token as usize] - log_z), top)
            }
            None => (None, Vec::new()),
        };
        Ok(Sampled {
            token,
            logprob,
            top_logprobs,
        })
    }

    /// Fills `self.logits` with the processed logits (bias, penalties).
    fn process(&mut self, logits: &[f32], context: &[u32], prompt_len: usize) {
        let p = &self.params;
        self.logits.clear();
        self.logits.extend(
            logits
                .iter()
                .map(|&x| if x.is_nan() { f32::NEG_INFINITY } else { x }),
        );
        for &(id, bias) in &p.logit_bias {
            if let Some(x) = self.logits.get_mut(id as usize) {
                *x += bias;
            }
        }
        let rep = p.repetition_penalty != 1.0;
        let pres_freq = p.presence_penalty != 0.0 || p.frequency_penalty != 0.0;
        if !rep && !pres_freq {
            return;
        }
        if self.marks.len() != self.vocab_size {
            self.marks = vec![0; self.vocab_size];
            self.counts = vec![0; self.vocab_size];
            self.stamp = 0;
        }
        // A new stamp value invalidates all earlier marks without clearing the
        // array; each step uses two stamps (repetition, then counts).
        if self.stamp >= u32::MAX - 2 {
            self.marks.iter_mut().for_each(|m| *m = 0);
            self.stamp = 0;
        }
        self.stamp += 1;
        let stamp = self.stamp;
        if rep {
            let penalty = p.repetition_penalty;
            for &t in context {
                let i = t as usize;
                if i < self.vocab_size && self.marks[i] != stamp {
                    self.marks[i] = stamp;
                    let x = &mut self.logits[i];
                    *x = if *x > 0.0 { *x / penalty } else { *x * penalty };
                }
            }
        }
        if pres_freq {
            // Second stamp for the generated-token counts.
            self.stamp += 1;
            let stamp = self.stamp;
            let generated = &context[prompt_len..];
            for &t in generated {
                let i = t as usize;
                if i < self.vocab_size {
                    if self.marks[i] != stamp {
                        self.marks[i] = stamp;
                        self.counts[i] = 0;
                    }
                    self.counts[i] += 1;
                }
            }
            for &t in generated {
                let i = t as usize;
                if i < self.vocab_size && self.marks[i] == stamp && self.counts[i] > 0 {
                    let c = self.counts[i] as f32;
                    self.logits[i] -= p.frequency_penalty * c + p.presence_penalty;
                    self.counts[i] = 0; // apply once per distinct token
                }
            }
        }
    }

    /// Temperature, truncation and the random draw. `max` is the largest processed logit.
    fn draw(&mut self, max: f32) -> u32 {
        let p = &self.params;
        let inv_t = 1.0 / p.temperature;
        // Candidates as (token, probability weight relative to the best token).
        self.cand.clear();
        self.cand.extend(
            self.logits
                .iter()
                .enumerate()
                .map(|(i, &x)| (i as u32, exp_nonpositive((x - max) * inv_t)))
                .filter(|&(_, w)| w > 0.0),
        );
        // The best token has weight exactly 1, so the list is never empty.
        if p.top_k > 0 && p.top_k < self.cand.len() {
            select_best(&mut self.cand, p.top_k);
            self.cand.truncate(p.top_k);
        }
        if p.top_p < 1.0 {
            let total: f32 = self.cand.iter().map(|c| c.1).sum();
            let target = p.top_p * total;
            // Select the best k candidates and sort only those; grow k (×4) until
            // they hold the nucleus. Peaked distributions stop at the first step.
            let len = self.cand.len();
            let mut k = PARTIAL_SORT.min(len);
            let keep = loop {
                select_best(&mut self.cand, k);
                sort_best(&mut self.cand[..k]);
                if let Some(n) = nucleus_len(&self.cand[..k], target) {
                    break n;
                }
                if k == len {
                    break len;
                }
                k = (k * 4).min(len);
            };
            self.cand.truncate(keep.max(1));
        }
        if p.min_p > 0.0 {
            // Weights are relative to the best token, whose weight is 1.
            let min_p = p.min_p;
            self.cand.retain(|&(_, w)| w >= min_p);
        }
        let total: f32 = self.cand.iter().map(|c| c.1).sum();
        let mut r = self.rng.random::<f32>() * total;
        for &(t, w) in &self.cand {
            if r < w {
                return t;
            }
            r -= w;
        }
        // Rounding left r just above the last weight: take the last candidate.
        self.cand.last().map(|c| c.0).unwrap_or(0)
    }

    /// The `n` most likely tokens of the processed logits, as logprobs.
    fn top_n(&mut self, n: usize, log_z: f32) -> Vec<(u32, f32)> {
        self.cand.clear();
        self.cand
            .extend(self.logits.iter().enumerate().map(|(i, &x)| (i as u32, x)));
        let n = n.min(self.cand.len());
        if n < self.cand.len() {
            select_best(&mut self.cand, n);
            self.cand.truncate(n);
        }
        sort_best(&mut self.cand);
        self.cand.iter().map(|&(t, x)| (t, x - log_z)).collect()
    }
}

/// `Σ e^(x - max)` with eight independent accumulators (vectorizes; a single
/// running float sum would serialize on the adds).
fn sum_exp(v: &[f32], max: f32) -> f32 {
    let mut acc = [0.0f32; 8];
    let chunks = v.chunks_exact(8);
    let rest: f32 = chunks
        .remainder()
        .iter()
        .map(|&x| exp_nonpositive(x - max))
        .sum();
    for ch in chunks {
        for j in 0..8 {
            acc[j] += exp_nonpositive(ch[j] - max);
        }
    }
    acc.iter().sum::<f32>() + rest
}

/// The largest value (`-inf` for an empty slice). The inputs hold no NaN
/// ([`Sampler::process`] maps NaN to `-inf`); sixteen running maxima with
/// `a > b ? a : b` let the loop run in vector registers.
fn max_of(v: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let chunks = v.chunks_exact(16);
    let rest = chunks.remainder();
    for ch in chunks {
        for (l, &x) in lanes.iter_mut().zip(ch) {
            *l = if x > *l { x } else { *l };
        }
    }
    let m = rest.iter().fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
    lanes.iter().fold(m, |m, &x| if x > m { x } else { m })
}

/// Index of the first element equal to `max` (the greedy token: ties → lowest
/// index, as [`argmax`]); 0 if there is none.
fn first_index_of(v: &[f32], max: f32) -> u32 {
    v.iter().position(|&x| x == max).unwrap_or(0) as u32
}

/// Index of the largest value; ties → lowest index; NaN never wins.
#[cfg(test)]
fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &x) in v.iter().enumerate() {
        if x > best_v {
            best_v = x;
            best = i;
        }
    }
    best as u32
}

/// Ordering "better first": higher value, then lower token id.
fn better(a: &(u32, f32), b: &(u32, f32)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// Moves the `k` best candidates (unordered) to the front. `k < v.len()`.
fn select_best(v: &mut [(u32, f32)], k: usize) {
    if k > 0 && k < v.len() {
        v.select_nth_unstable_by(k - 1, better);
    }
}

fn sort_best(v: &mut [(u32, f32)]) {
    v.sort_unstable_by(better);
}

/// Smallest prefix length of `sorted` whose weights reach `target`, if any.
fn nucleus_len(sorted: &[(u32, f32)], target: f32) -> Option<usize> {
    let mut acc = 0.0;
    for (i, c) in sorted.iter().enumerate() {
        acc += c.1;
        if acc >= target {
            return Some(i + 1);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
        let mut p = SamplingParams::default();
        f(&mut p);
        p
    }

    fn logits() -> Vec<f32> {
        // Token 3 best, then 1, then 7; many low-probability tokens.
        let mut l = vec![-2.0f32; 1000];
        l[3] = 5.0;
        l[1] = 4.5;
        l[7] = 4.0;
        l
    }

    #[test]
    fn fast_exp_is_accurate() {
        let mut x = 0.0f32;
        while x > -87.0 {
            let want = (x as f64).exp();
            let got = exp_nonpositive(x) as f64;
            assert!(((got - want) / want).abs() < 3e-7, "x={x}: {got} vs {want}");
            x -= 0.0137;
        }
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert_eq!(exp_nonpositive(-100.0), 0.0);
        assert_eq!(exp_nonpositive(f32::NEG_INFINITY), 0.0);
    }

    #[test]
    fn greedy_picks_argmax_and_lowest_id_on_ties() {
        let mut s = Sampler::new(SamplingParams::greedy(), 1000).unwrap();
        assert_eq!(s.sample(&logits(), &[], 0).unwrap().token, 3);
        let mut tie = vec![0.0f32; 10];
        tie[4] = 2.0;
        tie[8] = 2.0;
        let mut s = Sampler::new(SamplingParams::greedy(), 10).unwrap();
        assert_eq!(s.sample(&tie, &[], 0).unwrap().token, 4);
    }

    #[test]
    fn same_seed_same_sequence_different_seed_differs() {
        let l: Vec<f32> = (0..500).map(|i| ((i * 37) % 101) as f32 / 30.0).collect();
        let run = |seed| {
            let mut s = Sampler::new(params(|p| p.seed = Some(seed)), 500).unwrap();
            (0..64)
                .map(|_| s.sample(&l, &[], 0).unwrap().token)
                .collect::<Vec<_>>()
        };
        assert_eq!(run(42), run(42));
        assert_ne!(run(42), run(43));
    }

    /// The greedy path (vector max, then the first index holding it) picks what
    /// the plain argmax picks: ties → lowest id, NaN never, `-inf` only if all
    /// are; and no log-probability is computed unless asked for.
    #[test]
    fn greedy_token_equals_the_plain_argmax() {
        let mut seed = 0x2545_F491u32;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed
        };
        for case in 0..300 {
            let n = 1 + (next() as usize % 1000);
            // Few distinct values, so ties are common.
            let mut l: Vec<f32> = (0..n).map(|_| (next() % 7) as f32 - 3.0).collect();
            match case % 4 {
                0 => l[next() as usize % n] = f32::NAN,
                1 => l.iter_mut().take(n / 2).for_each(|x| *x = f32::NEG_INFINITY),
                2 => l[n - 1] = 3.0,
                _ => {}
            }
            let mut s = Sampler::new(params(|p| p.temperature = 0.0), n).unwrap();
            let out = s.sample(&l, &[], 0).unwrap();
            let clean: Vec<f32> = l.iter().map(|&x| if x.is_nan() { f32::NEG_INFINITY } else { x }).collect();
            assert_eq!(out.token, argmax(&clean), "case {case}");
            assert_eq!(out.logprob, None);
        }
    }

    #[test]
    fn top_k_one_equals_greedy() {
        let l: Vec<f32> = (0..300)
            .map(|i| ((i * 13) % 17) as f32 + i as f32 * 1e-3)
            .collect();
        let expected = argmax(&l);
        let mut s = Sampler::new(
            params(|p| {
                p.top_k = 1;
                p.seed = Some(1);
                p.temperature = 2.0;
            }),
            300,
        )
        .unwrap();
        for _ in 0..50 {
            assert_eq!(s.sample(&l, &[], 0).unwrap().token, expected);
        }
    }

    #[test]
    fn top_k_restricts_to_the_k_best() {
        let mut s = Sampler::new(
            params(|p| {
                p.top_k = 3;
                p.seed = Some(5);
                p.temperature = 2.0;
            }),
            1000,
        )
        .unwrap();
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..300 {
            seen.insert(s.sample(&logits(), &[], 0).unwrap().token);
        }
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), vec![1, 3, 7]);
    }

    #[test]
    fn small_top_p_keeps_only_the_top_token() {
        // Also exercises the partial-sort path (1000 > PARTIAL_SORT candidates).
        let mut s = Sampler::new(
            params(|p| {
                p.top_p = 0.05;
                p.seed = Some(9);
            }),
            1000,
        )
        .unwrap();
        for _ in 0..100 {
            assert_eq!(s.sample(&logits(), &[], 0).unwrap().token, 3);
        }
        // top_p = 0.9 over nearly uniform logits needs the full-sort fallback and
        // must still draw many different tokens.
        let flat: Vec<f32> = (0..1000).map(|i| (i % 3) as f32 * 1e-3).collect();
        let mut s = Sampler::new(
            params(|p| {
                p.top_p = 0.9;
                p.seed = Some(9);
            }),
            1000,
        )
        .unwrap();
        let distinct: std::collections::BTreeSet<u32> = (0..200)
            .map(|_| s.sample(&flat, &[], 0).unwrap().token)
            .collect();
        assert!(distinct.len() > 100, "{}", distinct.len());
    }

    #[test]
    fn min_p_drops_unlikely_tokens() {
        // Probabilities relative to the best: token 1 ≈ e^-0.5 ≈ 0.61, token 7 ≈ e^-1 ≈ 0.37, others ≈ e^-7.
        let mut s = Sampler::new(
            params(|p| {
                p.min_p = 0.5;
                p.seed = Some(3);
            }),
            1000,
        )
        .unwrap();
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..300 {
            seen.insert(s.sample(&logits(), &[], 0).unwrap().token);
        }
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), vec![1, 3]);
    }

    #[test]
    fn logit_bias_minus_100_bans_a_token_and_plus_boosts() {
        let mut s = Sampler::new(
            params(|p| {
                p.temperature = 0.0;
                p.logit_bias = vec![(3, -100.0)];
            }),
            1000,
        )
        .unwrap();
        assert_eq!(s.sample(&logits(), &[], 0).unwrap().token, 1);
        let mut s = Sampler::new(
            params(|p| {
                p.seed = Some(2);
                p.logit_bias = vec![(3, -100.0)];
            }),
            1000,
        )
        .unwrap();
        for _ in 0..200 {
            assert_ne!(s.sample(&logits(), &[], 0).unwrap().token, 3);
        }
        let mut s = Sampler::new(
            params(|p| {
                p.temperature = 0.0;
                p.logit_bias = vec![(500, 10.0)];
            }),
            1000,
        )
        .unwrap();
        assert_eq!(s.sample(&logits(), &[], 0).unwrap().token, 500);
    }

    #[test]
    fn repetition_penalty_uses_prompt_and_generated_tokens() {
        // 5.0 / 1.2 = 4.17 < 4.5: token 3 seen in the prompt loses to token 1.
        let mut s = Sampler::new(
            params(|p| {
                p.temperature = 0.0;
                p.repetition_penalty = 1.2;
            }),
            1000,
        )
        .unwrap();
        assert_eq!(s.sample(&logits(), &[3, 3, 9], 3).unwrap().token, 1);
        // Negative logits are multiplied (made more negative).
        let mut l = vec![-1.0f32; 4];
        l[0] = -0.5;
        let mut s = Sampler::new(
            params(|p| {
                p.temperature = 0.0;
                p.repetition_penalty = 3.0;
            }),
            4,
        )
        .unwrap();
        assert_eq!(s.sample(&l, &[0], 1).unwrap().token, 1);
    }

    #[test]
    fn presence_and_frequency_penalties_use_generated_tokens_only() {
        let greedy = |f: &dyn Fn(&mut SamplingParams), ctx: &[u32], prompt_len: usize| {
            let mut p = SamplingParams::greedy();
            f(&mut p);
            Sampler::new(p, 1000)
                .unwrap()
                .sample(&logits(), ctx, prompt_len)
                .unwrap()
                .token
        };
        // Token 3 only in the prompt: no presence penalty.
        assert_eq!(greedy(&|p| p.presence_penalty = 1.0, &[3], 1), 3);
        // Token 3 generated once: 5.0 - 1.0 = 4.0 < 4.5 → token 1.
        assert_eq!(greedy(&|p| p.presence_penalty = 1.0, &[3], 0), 1);
        // Frequency: once generated 5.0 - 0.4 = 4.6 still wins; twice 4.2 loses.
        assert_eq!(greedy(&|p| p.frequency_penalty = 0.4, &[9, 3], 1), 3);
        assert_eq!(greedy(&|p| p.frequency_penalty = 0.4, &[9, 3, 3], 1), 1);
        // Negative presence penalty encourages repetition.
        assert_eq!(greedy(&|p| p.presence_penalty = -2.0, &[7], 0), 7);
    }

    #[test]
    fn logprobs_are_a_normalized_log_softmax() {
        let l = logits();
        let mut s = Sampler::new(
            params(|p| {
                p.temperature = 0.0;
                p.top_logprobs = Some(5);
            }),
            1000,
        )
        .unwrap();
        let out = s.sample(&l, &[], 0).unwrap();
        let logprob = out.logprob.expect("requested");
        let max = 5.0f32;
        // Reference normalizer in f64 (a running f32 sum of 1000 terms drifts by ~1e-5).
        let z = (l
            .iter()
            .map(|&x| ((x - max) as f64).exp())
            .sum::<f64>()
            .ln()
            + max as f64) as f32;
        assert!(
            (logprob - (5.0 - z)).abs() < 5e-6,
            "{} vs {}",
            logprob,
            5.0 - z
        );
        assert_eq!(out.top_logprobs.len(), 5);
        assert_eq!(out.top_logprobs[0], (3, logprob));
        assert_eq!(out.top_logprobs[1].0, 1);
        assert_eq!(out.top_logprobs[2].0, 7);
        // Ties among the -2.0 tokens resolve to the lowest ids.
        assert_eq!(out.top_logprobs[3].0, 0);
        assert_eq!(out.top_logprobs[4].0, 2);
        // The full distribution sums to one.
        let mut s = Sampler::new(params(|p| p.top_logprobs = Some(20)), 20).unwrap();
        let small: Vec<f32> = (0..20).map(|i| i as f32 * 0.3).collect();
        let out = s.sample(&small, &[], 0).unwrap();
        let total: f32 = out.top_logprobs.iter().map(|&(_, lp)| lp.exp()).sum();
        assert!((total - 1.0).abs() < 1e-5, "{total}");
        // Logprobs do not depend on temperature or truncation.
        let mut s = Sampler::new(
            params(|p| {
                p.temperature = 0.3;
                p.top_k = 1;
                p.top_logprobs = Some(1);
            }),
            20,
        )
        .unwrap();
        let hot = s.sample(&small, &[], 0).unwrap();
        assert_eq!(hot.token, 19);
        assert!((hot.logprob.unwrap() - out.top_logprobs[0].1).abs() < 1e-6);
    }

    #[test]
    fn validation_names_the_parameter() {
        let check = |f: &dyn Fn(&mut SamplingParams)| {
            let mut p = SamplingParams::default();
            f(&mut p);
            match p.validate(100) {
                Err(ModelError::InvalidSampling { param, .. }) => param,
                other => panic!("expected an error, got {other:?}"),
            }
        };
        assert_eq!(check(&|p| p.temperature = 2.5), "temperature");
        assert_eq!(check(&|p| p.temperature = f32::NAN), "temperature");
        assert_eq!(check(&|p| p.top_p = 0.0), "top_p");
        assert_eq!(check(&|p| p.min_p = 1.5), "min_p");
        assert_eq!(check(&|p| p.presence_penalty = 2.5), "presence_penalty");
        assert_eq!(check(&|p| p.frequency_penalty = -3.0), "frequency_penalty");
        assert_eq!(check(&|p| p.repetition_penalty = 0.0), "repetition_penalty");
        assert_eq!(check(&|p| p.logit_bias = vec![(1, 101.0)]), "logit_bias");
        assert_eq!(check(&|p| p.logit_bias = vec![(100, 1.0)]), "logit_bias");
        assert_eq!(check(&|p| p.top_logprobs = Some(21)), "top_logprobs");
        assert!(SamplingParams::default().validate(100).is_ok());
        assert!(Sampler::new(SamplingParams::default(), 0).is_err());
    }

    #[test]
    fn bad_logits_are_errors_not_panics() {
        let mut s = Sampler::new(SamplingParams::default(), 10).unwrap();
        assert!(s.sample(&[0.0; 9], &[], 0).is_err());
        assert!(s.sample(&[f32::NAN; 10], &[], 0).is_err());
        assert!(s.sample(&[0.0; 10], &[1], 2).is_err());
        // Out-of-vocabulary context ids are ignored by the penalties.
        let mut s = Sampler::new(params(|p| p.repetition_penalty = 1.5), 10).unwrap();
        assert!(s.sample(&[0.0; 10], &[99], 0).is_ok());
    }
}
