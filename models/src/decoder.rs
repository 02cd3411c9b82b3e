//! The per-choice decoder: the one place where a generated sequence's logits
//! become tokens and tokens become text.
//!
//! Every caller that generates text — `salus generate` through [`crate::generate`],
//! the server's continuous-batching worker, the tests — runs each choice through a
//! [`ChoiceDecoder`]. Each step it:
//!
//! 1. samples a token from the step's logits ([`Sampler`]);
//! 2. ends the choice on an end-of-sequence or stop token (not counted, not emitted);
//! 3. counts the token, detokenizes it incrementally ([`StreamDecoder`]) and
//!    passes the text through the stop-string matcher ([`StopMatcher`]), which
//!    holds back anything that may begin a stop string;
//! 4. ends the choice on a stop string or when `max_tokens` tokens were generated;
//! 5. on the end, flushes what the detokenizer and the matcher still hold.
//!
//! A grammar constraint (structured outputs, [`crate::grammar`]) shapes step 1: the
//! tokens the grammar does not allow next get −∞ logits before sampling (so the
//! reported logprobs are those of the constrained distribution), the end tokens
//! are allowed exactly when the grammar is complete, and the choice ends (`stop`)
//! when the grammar allows nothing more. Constrained and unconstrained choices
//! share a batch: the mask is per choice.
//!
//! Limits are checked before a decoder is built: `max_tokens` is already bounded
//! by the context window at validation (prompt + `max_tokens` ≤ context), so the
//! decoder only counts. The text it returns is PHI and stays in [`Phi`].

use std::sync::Arc;

use crate::grammar::{CompiledGrammar, ConstraintMatcher, GrammarError};
use crate::sampling::{Sampler, SamplingParams};
use crate::stop::{StopMatcher, StopStep};
use crate::tokenizer::Tokenizer;
use crate::{Phi, Result};

/// Why a choice ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token, a stop token or a stop string.
    Stop,
    /// `max_tokens` reached (bounded by the context window).
    Length,
}

impl FinishReason {
    /// The OpenAI `finish_reason` string.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// Log-probability information for one generated token.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token_id: u32,
    pub logprob: f32,
    /// The most likely alternatives (token id, logprob), best first.
    pub top: Vec<(u32, f32)>,
}

/// Everything that defines how one choice is decoded. Built from a request
/// that passed validation.
#[derive(Debug, Clone)]
pub struct DecodeParams {
    /// Sampling parameters; the seed is the request's base seed (see [`choice_seed`]).
    pub sampling: SamplingParams,
    /// Most tokens to generate; the caller has bounded it by the context window.
    pub max_tokens: usize,
    /// Generation ends before the first occurrence of any of these (not emitted). PHI.
    pub stop_strings: Vec<Phi<String>>,
    /// Token ids that end generation besides the model's end-of-sequence ids.
    pub stop_token_ids: Vec<u32>,
    /// The model's end-of-sequence ids do not end generation (`stop_token_ids`
    /// still do): benchmarks generate exactly `max_tokens`.
    pub ignore_eos: bool,
    /// Until this many tokens are generated, end tokens cannot be sampled
    /// (their logits are masked) and stop strings are not looked for.
    pub min_tokens: usize,
    /// Emit a matched stop string at the end of the output.
    pub include_stop_str_in_output: bool,
    /// Special (control) tokens produce no text (default true).
    pub skip_special_tokens: bool,
    /// The grammar the output must follow (structured outputs). With one,
    /// `ignore_eos` has no effect: a complete output ends.
    pub constraint: Option<Arc<CompiledGrammar>>,
}

impl Default for DecodeParams {
    fn default() -> Self {
        DecodeParams {
            sampling: SamplingParams::default(),
            max_tokens: 256,
            stop_strings: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            min_tokens: 0,
            include_stop_str_in_output: false,
            skip_special_tokens: true,
            constraint: None,
        }
    }
}

/// The seed of choice `index` of a request whose base seed is `seed`: choices
/// (and the prompts of a multi-prompt request, numbered across all their
/// choices) get consecutive seeds, so each is reproducible on its own.
pub fn choice_seed(seed: u64, index: usize) -> u64 {
    seed.wrapping_add(index as u64)
}

/// What one decoding step produced.
#[derive(Debug, Default)]
pub struct DecodeStep {
    /// Text that became final this step (may be empty). PHI.
    pub text: Phi<String>,
    /// The token generated this step, when it counts (an end-of-sequence or
    /// stop token does not).
    pub token: Option<u32>,
    /// The counted token's log-probabilities, when requested.
    pub logprob: Option<TokenLogprob>,
    /// Set when the choice ended; `text` then includes the final flush.
    pub finished: Option<FinishReason>,
}

impl DecodeStep {
    /// The token to append to the sequence and feed to the model next step:
    /// the counted token, unless the choice ended with it.
    pub fn next_token(&self) -> Option<u32> {
        self.token.filter(|_| self.finished.is_none())
    }
}

/// Decodes one choice, token by token.
#[derive(Debug)]
pub struct ChoiceDecoder {
    sampler: Sampler,
    detok: crate::detok::StreamDecoder,
    stops: StopMatcher,
    end_ids: Vec<u32>,
    max_tokens: usize,
    min_tokens: usize,
    generated: usize,
    finished: Option<FinishReason>,
    /// The step's logits with the end tokens masked (while under `min_tokens`),
    /// or with the grammar's mask applied.
    masked: Vec<f32>,
    constraint: Option<ConstraintMatcher>,
    /// With a constraint: the tokens that end the output once the grammar is
    /// complete (the model's end ids and the stop token ids).
    grammar_end_ids: Vec<u32>,
}

impl ChoiceDecoder {
    /// A decoder for choice `choice_index` (its seed is derived with
    /// [`choice_seed`]). `eos_token_ids` are the model's end-of-generation ids;
    /// `vocab_size` the length of the logits it will be given.
    pub fn new(params: &DecodeParams, choice_index: usize, eos_token_ids: &[u32], vocab_size: usize) -> Result<Self> {
        let mut sampling = params.sampling.clone();
        sampling.seed = sampling.seed.map(|s| choice_seed(s, choice_index));
        let mut end_ids = if params.ignore_eos { Vec::new() } else { eos_token_ids.to_vec() };
        let mut grammar_end_ids = eos_token_ids.to_vec();
        for &t in &params.stop_token_ids {
            if !end_ids.contains(&t) {
                end_ids.push(t);
            }
            if !grammar_end_ids.contains(&t) {
                grammar_end_ids.push(t);
            }
        }
        Ok(ChoiceDecoder {
            sampler: Sampler::new(sampling, vocab_size)?,
            detok: crate::detok::StreamDecoder::new(params.skip_special_tokens),
            stops: StopMatcher::new(params.stop_strings.clone())
                .including_stop_string(params.include_stop_str_in_output),
            end_ids,
            max_tokens: params.max_tokens,
            min_tokens: params.min_tokens.min(params.max_tokens),
            generated: 0,
            finished: None,
            masked: Vec::new(),
            constraint: params.constraint.as_ref().map(|g| g.matcher()),
            grammar_end_ids,
        })
    }

    /// Whether a grammar constrains this choice.
    pub fn is_constrained(&self) -> bool {
        self.constraint.is_some()
    }

    /// Computes the grammar's mask for the next step ahead of it (a no-op
    /// without a constraint, or when already computed). The mask depends only on
    /// the tokens accepted so far, so this may run while the model computes the
    /// step's logits; [`ChoiceDecoder::step`] computes it itself otherwise.
    pub fn prepare(&mut self) -> Result<()> {
        match self.constraint.as_mut() {
            Some(c) if self.finished.is_none() => Ok(c.prepare()?),
            _ => Ok(()),
        }
    }

    /// Tokens generated (counted) so far.
    pub fn generated(&self) -> usize {
        self.generated
    }

    /// Why the choice ended, once it has.
    pub fn finished(&self) -> Option<FinishReason> {
        self.finished
    }

    /// Ends the choice before any step when it may generate nothing
    /// (`max_tokens` 0). Returns the finished step, or `None` if it may generate.
    pub fn finish_if_empty(&mut self) -> Option<DecodeStep> {
        (self.max_tokens == 0).then(|| self.finish(FinishReason::Length, String::new(), None, None))
    }

    /// One step: samples from `logits` (the model's last-position logits of this
    /// sequence) given `context` (prompt followed by the tokens generated so
    /// far) and `prompt_len`, and applies the end conditions.
    pub fn step(
        &mut self,
        tokenizer: &Tokenizer,
        logits: &[f32],
        context: &[u32],
        prompt_len: usize,
    ) -> Result<DecodeStep> {
        if self.finished.is_some() {
            return Ok(DecodeStep { finished: self.finished, ..Default::default() });
        }
        if self.generated >= self.max_tokens {
            return Ok(self.finish(FinishReason::Length, String::new(), None, None));
        }
        let below_min = self.generated < self.min_tokens;
        let sampled = if let Some(c) = self.constraint.as_mut() {
            let allowed = c.mask_logits(logits, &mut self.masked)?;
            // The end tokens: allowed once the grammar is complete (and, while
            // under `min_tokens`, only if the grammar allows nothing else).
            let mut ends_in_mask = 0;
            for &t in &self.grammar_end_ids {
                if let Some(l) = self.masked.get_mut(t as usize) {
                    if l.is_finite() {
                        ends_in_mask += 1;
                    }
                    *l = f32::NEG_INFINITY;
                }
            }
            let others = allowed.saturating_sub(ends_in_mask);
            let mut ends = 0;
            if c.is_accepting()? && (!below_min || others == 0) {
                for &t in &self.grammar_end_ids {
                    if let (Some(l), Some(&orig)) = (self.masked.get_mut(t as usize), logits.get(t as usize)) {
                        *l = orig;
                        ends += 1;
                    }
                }
            }
            if others + ends == 0 {
                return Err(GrammarError::Runtime.into());
            }
            self.sampler.sample(&self.masked, context, prompt_len)?
        } else if below_min && !self.end_ids.is_empty() {
            // End tokens cannot be chosen yet: masked before sampling (and so
            // before the reported logprobs, as a logits processor would).
            self.masked.clear();
            self.masked.extend_from_slice(logits);
            for &t in &self.end_ids {
                if let Some(l) = self.masked.get_mut(t as usize) {
                    *l = f32::NEG_INFINITY;
                }
            }
            self.sampler.sample(&self.masked, context, prompt_len)?
        } else {
            self.sampler.sample(logits, context, prompt_len)?
        };
        let ends_choice = match self.constraint {
            Some(_) => self.grammar_end_ids.contains(&sampled.token),
            None => self.end_ids.contains(&sampled.token),
        };
        if ends_choice {
            return Ok(self.finish_flushing(tokenizer, FinishReason::Stop, String::new(), None, None));
        }
        let complete = match self.constraint.as_mut() {
            Some(c) => c.commit(sampled.token)?,
            None => false,
        };
        self.generated += 1;
        let logprob =
            sampled.logprob.map(|logprob| TokenLogprob { token_id: sampled.token, logprob, top: sampled.top_logprobs });
        let piece = self.detok.push(tokenizer, sampled.token)?;
        // Stop strings are looked for once `min_tokens` are out.
        let stop = if below_min { StopStep { emit: piece, stopped: false } } else { self.stops.push(&piece) };
        let token = Some(sampled.token);
        if stop.stopped {
            return Ok(self.finish(FinishReason::Stop, stop.emit, token, logprob));
        }
        if complete {
            return Ok(self.finish_flushing(tokenizer, FinishReason::Stop, stop.emit, token, logprob));
        }
        if self.generated >= self.max_tokens {
            return Ok(self.finish_flushing(tokenizer, FinishReason::Length, stop.emit, token, logprob));
        }
        Ok(DecodeStep { text: Phi::new(stop.emit), token, logprob, finished: None })
    }

    /// Ends the choice after flushing the detokenizer and the stop matcher
    /// (the held-back text was not the start of a stop string after all).
    fn finish_flushing(
        &mut self,
        tokenizer: &Tokenizer,
        reason: FinishReason,
        mut text: String,
        token: Option<u32>,
        logprob: Option<TokenLogprob>,
    ) -> DecodeStep {
        // A detokenizer failure at the very end loses at most a partial character.
        let tail = self.detok.finish(tokenizer).unwrap_or_default();
        let stop = self.stops.push(&tail);
        text.push_str(&stop.emit);
        let reason = if stop.stopped {
            FinishReason::Stop
        } else {
            text.push_str(&self.stops.finish());
            reason
        };
        self.finish(reason, text, token, logprob)
    }

    fn finish(
        &mut self,
        reason: FinishReason,
        text: String,
        token: Option<u32>,
        logprob: Option<TokenLogprob>,
    ) -> DecodeStep {
        self.finished = Some(reason);
        DecodeStep { text: Phi::new(text), token, logprob, finished: Some(reason) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::tests::tiny_spm_metadata;

    fn tokenizer() -> Tokenizer {
        Tokenizer::from_gguf_metadata(&tiny_spm_metadata()).unwrap()
    }

    /// Logits that make greedy sampling pick `token`.
    fn pick(token: u32, vocab: usize) -> Vec<f32> {
        let mut l = vec![0.0; vocab];
        l[token as usize] = 10.0;
        l
    }

    fn params(max_tokens: usize, stops: &[&str]) -> DecodeParams {
        DecodeParams {
            sampling: SamplingParams::greedy(),
            max_tokens,
            stop_strings: stops.iter().map(|s| Phi::new(s.to_string())).collect(),
            ..DecodeParams::default()
        }
    }

    /// Runs `tokens` through a decoder; returns the text, the reason and the count.
    fn run(p: &DecodeParams, eos: &[u32], tokens: &[u32]) -> (String, Option<FinishReason>, usize, Vec<u32>) {
        let t = tokenizer();
        let vocab = t.vocab_size();
        let mut d = ChoiceDecoder::new(p, 0, eos, vocab).unwrap();
        let mut text = String::new();
        let mut context = vec![1u32];
        let mut fed = Vec::new();
        for &tok in tokens {
            let s = d.step(&t, &pick(tok, vocab), &context, 1).unwrap();
            text.push_str(s.text.expose());
            if let Some(n) = s.next_token() {
                context.push(n);
                fed.push(n);
            }
            if s.finished.is_some() {
                break;
            }
        }
        (text, d.finished(), d.generated(), fed)
    }

    #[test]
    fn text_is_the_decode_of_the_counted_tokens() {
        let t = tokenizer();
        let ids = t.encode("hello world hello", false).unwrap();
        let (text, reason, n, fed) = run(&params(ids.len(), &[]), &[2], &ids);
        assert_eq!(text, "hello world hello");
        assert_eq!((reason, n), (Some(FinishReason::Length), ids.len()));
        // The last token ends the choice: it is counted but not fed back.
        assert_eq!(fed, ids[..ids.len() - 1]);
    }

    #[test]
    fn eos_and_stop_token_ids_end_without_being_counted() {
        let t = tokenizer();
        let mut ids = t.encode("hello world", false).unwrap();
        let words = ids.len();
        ids.push(2);
        let (text, reason, n, _) = run(&params(100, &[]), &[2], &ids);
        assert_eq!((text.as_str(), reason, n), ("hello world", Some(FinishReason::Stop), words));
        let hello = ids[0];
        let mut p = params(100, &[]);
        p.stop_token_ids = vec![hello];
        let (text, reason, n, _) = run(&p, &[2], &[hello]);
        assert_eq!((text.as_str(), reason, n), ("", Some(FinishReason::Stop), 0));
    }

    #[test]
    fn stop_strings_cut_the_text_and_count_the_token() {
        let t = tokenizer();
        let ids = t.encode("hello world hello", false).unwrap();
        let (text, reason, n, _) = run(&params(100, &[" wor"]), &[2], &ids);
        assert_eq!(text, "hello");
        assert_eq!(reason, Some(FinishReason::Stop));
        assert_eq!(n, 2);
        // A held-back partial stop string is released when the choice ends another way.
        let ids = t.encode("hello wo", false).unwrap();
        let (text, reason, _, _) = run(&params(ids.len(), &[" world!"]), &[2], &ids);
        assert_eq!((text.as_str(), reason), ("hello wo", Some(FinishReason::Length)));
    }

    #[test]
    fn max_tokens_zero_finishes_before_sampling() {
        let t = tokenizer();
        let mut d = ChoiceDecoder::new(&params(0, &[]), 0, &[2], t.vocab_size()).unwrap();
        let s = d.finish_if_empty().unwrap();
        assert_eq!(s.finished, Some(FinishReason::Length));
        assert_eq!(d.generated(), 0);
        let mut d = ChoiceDecoder::new(&params(3, &[]), 0, &[2], t.vocab_size()).unwrap();
        assert!(d.finish_if_empty().is_none());
    }

    #[test]
    fn choice_seeds_are_consecutive_and_reproducible() {
        let t = tokenizer();
        let vocab = t.vocab_size();
        let logits: Vec<f32> = (0..vocab).map(|i| ((i * 7919) % 13) as f32 * 0.1).collect();
        let mut p = params(8, &[]);
        p.sampling = SamplingParams { seed: Some(41), ..SamplingParams::default() };
        let draws = |index: usize, p: &DecodeParams| -> Vec<u32> {
            let mut d = ChoiceDecoder::new(p, index, &[], vocab).unwrap();
            let mut ctx = vec![1];
            (0..8)
                .filter_map(|_| {
                    let s = d.step(&t, &logits, &ctx, 1).unwrap();
                    s.next_token().inspect(|&n| ctx.push(n))
                })
                .collect()
        };
        let mut q = p.clone();
        q.sampling.seed = Some(42);
        assert_eq!(draws(1, &p), draws(0, &q));
        assert_eq!(draws(1, &p), draws(1, &p));
        assert_ne!(draws(0, &p), draws(1, &p));
    }

    #[test]
    fn ignore_eos_keeps_going_and_stop_token_ids_still_end() {
        let t = tokenizer();
        let mut ids = t.encode("hello world", false).unwrap();
        ids.extend([2, ids[0]]);
        let mut p = params(ids.len(), &[]);
        p.ignore_eos = true;
        let (_, reason, n, _) = run(&p, &[2], &ids);
        assert_eq!((reason, n), (Some(FinishReason::Length), ids.len()), "EOS did not end the choice");
        p.stop_token_ids = vec![2];
        let (_, reason, _, _) = run(&p, &[2], &ids);
        assert_eq!(reason, Some(FinishReason::Stop), "a stop token id still ends it");
    }

    #[test]
    fn min_tokens_masks_end_tokens_and_defers_stop_strings() {
        let t = tokenizer();
        let vocab = t.vocab_size();
        let mut p = params(10, &["hello"]);
        p.min_tokens = 3;
        let mut d = ChoiceDecoder::new(&p, 0, &[2], vocab).unwrap();
        let hello = t.encode("hello", false).unwrap()[0];
        let mut ctx = vec![1u32];
        // The model wants EOS every step; under min_tokens it cannot have it.
        let mut eos_first = vec![0.0; vocab];
        eos_first[2] = 10.0;
        eos_first[hello as usize] = 5.0;
        for i in 0..3 {
            let s = d.step(&t, &eos_first, &ctx, 1).unwrap();
            assert_eq!(s.token, Some(hello), "step {i}: EOS must be masked");
            assert!(s.finished.is_none(), "step {i}: the stop string is not looked for yet");
            ctx.push(hello);
        }
        let s = d.step(&t, &eos_first, &ctx, 1).unwrap();
        assert_eq!(s.finished, Some(FinishReason::Stop), "from min_tokens on, EOS ends it");
        assert_eq!(d.generated(), 3);
    }

    #[test]
    fn the_stop_string_can_be_kept_in_the_output() {
        let t = tokenizer();
        let ids = t.encode("hello world hello", false).unwrap();
        let mut p = params(100, &[" wor"]);
        p.include_stop_str_in_output = true;
        let (text, reason, _, _) = run(&p, &[2], &ids);
        assert_eq!((text.as_str(), reason), ("hello wor", Some(FinishReason::Stop)));
    }

    #[test]
    fn special_tokens_can_be_kept_in_the_text() {
        let t = tokenizer();
        let mut ids = t.encode("hello", false).unwrap();
        ids.push(2); // </s>, a special token, not an end token here
        let mut p = params(ids.len(), &[]);
        let (kept_out, ..) = run(&p, &[], &ids);
        p.skip_special_tokens = false;
        let (kept_in, ..) = run(&p, &[], &ids);
        assert_eq!(kept_out, "hello");
        assert_eq!(kept_in, t.decode(&ids, false).unwrap());
    }
}
