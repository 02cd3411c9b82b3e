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
        SamplingParams { temperature: 0.0, ..Default::default() }
    }

    /// Checks every parameter against its allowed range; the error names the parameter.
    pub fn validate(&self, vocab_size: usize) -> Result<()> {
        fn bad(param: &'static str, reason: impl Into<String>) -> Result<()> {
            Err(ModelError::InvalidSampling { param, reason: reason.into() })
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
            return bad("repetition_penalty", "must be greater than 0 and at most 10");
        }
        if !(self.presence_penalty.is_finite() && (-2.0..=2.0).contains(&self.presence_penalty)) {
            return bad("presence_penalty", "must be between -2 and 2");
        }
        if !(self.frequency_penalty.is_finite() && (-2.0..=2.0).contains(&self.frequency_penalty)) {
            return bad("frequency_penalty", "must be between -2 and 2");
        }
        for &(id, bias) in &self.logit_bias {
            if id as usize >= vocab_size {
                return bad("logit_bias", format!("token id {id} is outside the vocabulary (size {vocab_size})"));
            }
            if !(bias.is_finite() && (-100.0..=100.0).contains(&bias)) {
                return bad("logit_bias", "bias values must be between -100 and 100");
            }
        }
        if let Some(n) = self.top_logprobs {
            if n > MAX_TOP_LOGPROBS {
                return bad("top_logprobs", format!("must be between 0 and {MAX_TOP_LOGPROBS}"));
            }
        }
        Ok(())
    }
}

/// The greedy choice: index of the largest logit (the first on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
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
        f.debug_struct("Sampler").field("params", &self.params).field("vocab_size", &self.vocab_size).finish()
    }
}

impl Sampler {
    /// Validates `params` and creates a sampler for logits of `vocab_size` entries.
    pub fn new(params: SamplingParams, vocab_size: usize) -> Result<Self> {
        if vocab_size == 0 {
            return Err(ModelError::InvalidSampling { param: "vocab_size", reason: "must be positive".into() });
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
    pub fn sample(&mut self, logits: &[f32], context: &[u32], prompt_len: usize) -> Result<Sampled> {
        if logits.len() != self.vocab_size {
            return Err(ModelError::InvalidSampling {
                param: "logits",
                reason: format!("expected {} logits, got {}", self.vocab_size, logits.len()),
            });
        }
        if prompt_len > context.len() {
            return Err(ModelError::InvalidSampling { param: "prompt_len", reason: "longer than the context".into() });
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
        let token = if self.params.temperature == 0.0 { first_index_of(v, max) } else { self.draw(max) };
        // Log-softmax normalizer of the processed logits, only when asked for.
        let (logprob, top_logprobs) = match self.params.top_logprobs {
            Some(n) => {
                let log_z = max + sum_exp(&self.logits, max).ln();
                let top = if n > 0 { self.top_n(n, log_z) } else { Vec::new() };
                (Some(self.logits[token as usize] - log_z), top)
            }
            None => (None, Vec::new()),
        };
        Ok(Sampled { token, logprob, top_logprobs })
    }

    /// Fills `self.logits` with the processed logits (bias, penalties).
    fn process(&mut self, logits: &[f32], context: &[u32], prompt_len: usize) {
        let p = &self.params;
        self.logits.clear();
        self.logits.extend(logits.iter().map(|&x| if x.is_nan() { f32::NEG_INFINITY } else { x }));
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
        top_logprobs(&self.logits, n, log_z, &mut self.cand)
    }
}

/// The `n` largest of `logits` (no NaN), best first, as logprobs under the
/// normalizer `log_z`; `cand` is scratch space.
fn top_logprobs(logits: &[f32], n: usize, log_z: f32, cand: &mut Vec<(u32, f32)>) -> Vec<(u32, f32)> {
    cand.clear();
    cand.extend(logits.iter().enumerate().map(|(i, &x)| (i as u32, x)));
    let n = n.min(cand.len());
    if n < cand.len() {
        select_best(cand, n);
        cand.truncate(n);
    }
    sort_best(cand);
    cand.iter().map(|&(t, x)| (t, x - log_z)).collect()
}

/// How likely the model found `token` at a position: its log-probability
/// under the raw `logits` (the model's own distribution; no sampling
/// parameter applies) and the `top` most likely tokens with theirs, best
/// first. This scores prompt tokens (`echo`), as OpenAI's legacy completions
/// and vLLM do.
pub fn score_token(logits: &[f32], token: u32, top: usize) -> (f32, Vec<(u32, f32)>) {
    // NaN as -inf, as the sampler reads logits.
    let clean: Vec<f32> = logits.iter().map(|&x| if x.is_nan() { f32::NEG_INFINITY } else { x }).collect();
    let max = max_of(&clean);
    let log_z = max + sum_exp(&clean, max).ln();
    let logprob = clean.get(token as usize).map_or(f32::NEG_INFINITY, |&x| x - log_z);
    let top = if top == 0 { Vec::new() } else { top_logprobs(&clean, top, log_z, &mut Vec::new()) };
    (logprob, top)
}

/// The rank of `token` under `logits`: 1 for the most likely, one more for
/// each token strictly more likely (ties share a rank; NaN counts as `-inf`).
/// vLLM reports it with each prompt logprob.
pub fn token_rank(logits: &[f32], token: u32) -> u32 {
    let clean = |x: f32| if x.is_nan() { f32::NEG_INFINITY } else { x };
    let Some(&own) = logits.get(token as usize) else { return logits.len() as u32 + 1 };
    let own = clean(own);
    1 + logits.iter().filter(|&&x| clean(x) > own).count() as u32
}

/// `Σ e^(x - max)` with eight independent accumulators (vectorizes; a single
/// running float sum would serialize on the adds).
fn sum_exp(v: &[f32], max: f32) -> f32 {
    let mut acc = [0.0f32; 8];
    let chunks = v.chunks_exact(8);
    let rest: f32 = chunks.remainder().iter().map(|&x| exp_nonpositive(x - max)).sum();
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
/// index, as a plain argmax loop); 0 if there is none.
fn first_index_of(v: &[f32], max: f32) -> u32 {
    v.iter().position(|&x| x == max).unwrap_or(0) as u32
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
mod tests;
