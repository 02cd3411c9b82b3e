//! Single-stream generation: the loop behind `salus generate` and the reference
//! the tests (and the server's batched scheduler) are checked against.
//!
//! prompt ids → chunked prefill → decode loop (sample, stop tokens, streaming
//! detokenization, stop strings, max tokens). Completion text is PHI: it goes
//! to the caller's callback and into [`Phi`], nowhere else.

use std::time::Instant;

use candle_core::IndexOp;

use crate::batch::{PackedBatch, SeqId};
use crate::detok::StreamDecoder;
use crate::model::LoadedModel;
use crate::sampling::{Sampler, SamplingParams};
use crate::stop::StopMatcher;
use crate::{ModelError, Phi, Result};

/// Default prefill chunk: long prompts are fed in pieces so one step's
/// activations stay bounded.
pub const DEFAULT_PREFILL_CHUNK: usize = 512;

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerateParams {
    pub sampling: SamplingParams,
    /// Upper bound on generated tokens (also bounded by the context window).
    pub max_tokens: usize,
    /// Generation ends before the first occurrence of any of these (not emitted).
    pub stop_strings: Vec<Phi<String>>,
    /// Extra token ids that end generation (the model's EOS ids always do).
    pub stop_token_ids: Vec<u32>,
    /// Prompt tokens per prefill step.
    pub prefill_chunk: usize,
}

impl Default for GenerateParams {
    fn default() -> Self {
        GenerateParams {
            sampling: SamplingParams::default(),
            max_tokens: 256,
            stop_strings: Vec::new(),
            stop_token_ids: Vec::new(),
            prefill_chunk: DEFAULT_PREFILL_CHUNK,
        }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token or stop string.
    Stop,
    /// `max_tokens` (or the context window) reached.
    Length,
}

/// Wall-clock time of the two phases.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Timings {
    /// Prompt processing (all prefill chunks), producing the first token's logits.
    pub prefill_secs: f64,
    /// The decode forward passes (and sampling) after the first token.
    pub decode_secs: f64,
    /// Number of decode forward passes timed in `decode_secs`.
    pub decode_steps: usize,
}

impl Timings {
    pub fn prompt_tokens_per_sec(&self, prompt_tokens: usize) -> f64 {
        prompt_tokens as f64 / self.prefill_secs.max(1e-9)
    }
    pub fn decode_tokens_per_sec(&self) -> f64 {
        self.decode_steps as f64 / self.decode_secs.max(1e-9)
    }
}

/// The result of [`generate`].
#[derive(Debug, Clone)]
pub struct GenerationOutput {
    /// Generated ids (a final stop token is not included).
    pub token_ids: Vec<u32>,
    /// The completion text as streamed (stop strings removed).
    pub text: Phi<String>,
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    pub timings: Timings,
}

/// Generates a completion for `prompt_ids`, calling `on_text` with each piece of
/// text as soon as it is final (complete UTF-8, not part of a stop string).
pub fn generate(
    lm: &LoadedModel,
    prompt_ids: &[u32],
    params: &GenerateParams,
    mut on_text: impl FnMut(&str),
) -> Result<GenerationOutput> {
    if prompt_ids.is_empty() {
        return Err(ModelError::InvalidPrompt("the prompt is empty".into()));
    }
    let model = &lm.model;
    let context = model.config().max_context;
    if prompt_ids.len() >= context {
        return Err(ModelError::ContextOverflow {
            needed: prompt_ids.len() + 1,
            limit: context,
        });
    }
    let max_tokens = params.max_tokens.min(context - prompt_ids.len());
    let vocab = model.config().vocab_size;
    let mut sampler = Sampler::new(params.sampling.clone(), vocab)?;
    let is_stop = |t: u32| lm.info.eos_token_ids.contains(&t) || params.stop_token_ids.contains(&t);

    let seq = SeqId(0);
    let mut cache = model.new_sequence_cache(prompt_ids.len() + max_tokens)?;
    let chunk = params.prefill_chunk.max(1);

    let t0 = Instant::now();
    let mut logits = None;
    for (i, c) in prompt_ids.chunks(chunk).enumerate() {
        let mut b = PackedBatch::new();
        b.push(seq, c, i * chunk)?;
        logits = Some(model.forward(&b, cache.as_mut())?);
    }
    let mut logits = logits.expect("non-empty prompt").i(0)?.to_vec1::<f32>()?;
    let prefill_secs = t0.elapsed().as_secs_f64();

    let t1 = Instant::now();
    let mut all: Vec<u32> = prompt_ids.to_vec();
    let mut generated = Vec::new();
    let mut text = Phi::new(String::new());
    let mut detok = StreamDecoder::new(true);
    let mut stops = StopMatcher::new(params.stop_strings.clone());
    let mut decode_steps = 0;
    let mut emit = |s: &str, text: &mut Phi<String>| {
        if !s.is_empty() {
            on_text(s);
            text.expose_mut().push_str(s);
        }
    };
    let finish_reason = loop {
        if generated.len() >= max_tokens {
            break FinishReason::Length;
        }
        let token = sampler.sample(&logits, &all, prompt_ids.len())?.token;
        if is_stop(token) {
            break FinishReason::Stop;
        }
        generated.push(token);
        all.push(token);
        let piece = detok.push(&lm.tokenizer, token)?;
        let step = stops.push(&piece);
        emit(&step.emit, &mut text);
        if step.stopped {
            break FinishReason::Stop;
        }
        if generated.len() >= max_tokens {
            break FinishReason::Length;
        }
        let mut b = PackedBatch::new();
        b.push(seq, &[token], all.len() - 1)?;
        logits = model.forward(&b, cache.as_mut())?.i(0)?.to_vec1::<f32>()?;
        decode_steps += 1;
    };
    let decode_secs = t1.elapsed().as_secs_f64();
    if !stops.is_stopped() {
        let tail = detok.finish(&lm.tokenizer)?;
        let step = stops.push(&tail);
        emit(&step.emit, &mut text);
        if !step.stopped {
            let rest = stops.finish();
            emit(&rest, &mut text);
        }
    }
    Ok(GenerationOutput {
        token_ids: generated,
        text,
        finish_reason,
        prompt_tokens: prompt_ids.len(),
        timings: Timings {
            prefill_secs,
            decode_secs,
            decode_steps,
        },
    })
}
