//! Single-stream generation: the loop behind `salus generate`, and the
//! reference the server's batched scheduler is checked against.
//!
//! prompt ids → chunked prefill → one [`ChoiceDecoder`] step per forward pass.
//! Completion text is PHI: it goes to the caller's callback and into [`Phi`],
//! nowhere else.

use std::time::Instant;

use candle_core::IndexOp;

use crate::batch::{PackedBatch, SeqId};
use crate::decoder::{ChoiceDecoder, DecodeParams, FinishReason};
use crate::model::LoadedModel;
use crate::{ModelError, Phi, Result};

/// Default prefill chunk: long prompts are fed in pieces so one step's
/// activations stay bounded.
pub const DEFAULT_PREFILL_CHUNK: usize = 512;

/// What to generate.
#[derive(Debug, Clone)]
pub struct SingleStreamParams {
    /// How the choice is decoded; `max_tokens` is further bounded by the room
    /// the context window leaves after the prompt.
    pub decode: DecodeParams,
    /// Prompt tokens per prefill step.
    pub prefill_chunk: usize,
}

impl Default for SingleStreamParams {
    fn default() -> Self {
        SingleStreamParams { decode: DecodeParams::default(), prefill_chunk: DEFAULT_PREFILL_CHUNK }
    }
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

/// The result of [`run_single_stream`].
#[derive(Debug, Clone)]
pub struct SingleStreamOutput {
    /// Generated ids (a final end-of-sequence or stop token is not included).
    pub token_ids: Vec<u32>,
    /// The completion text as streamed (stop strings removed).
    pub text: Phi<String>,
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    pub timings: Timings,
}

/// Generates a completion for `prompt_ids`, calling `on_text` with each piece of
/// text as soon as it is final (complete UTF-8, not part of a stop string).
pub fn run_single_stream(
    lm: &LoadedModel,
    prompt_ids: &[u32],
    params: &SingleStreamParams,
    mut on_text: impl FnMut(&str),
) -> Result<SingleStreamOutput> {
    if prompt_ids.is_empty() {
        return Err(ModelError::InvalidPrompt("the prompt is empty".into()));
    }
    let model = &lm.model;
    let context = lm.info.context_length;
    if prompt_ids.len() >= context {
        return Err(ModelError::ContextOverflow { needed: prompt_ids.len() + 1, limit: context });
    }
    // The one clamp of this path (the server clamps at request validation).
    let mut decode = params.decode.clone();
    decode.max_tokens = decode.max_tokens.min(context - prompt_ids.len());
    let mut decoder = ChoiceDecoder::new(&decode, 0, &lm.info.eos_token_ids, model.config().vocab_size)?;

    let seq = SeqId(0);
    let mut cache = model.new_sequence_cache(prompt_ids.len() + decode.max_tokens)?;
    let chunk = params.prefill_chunk.max(1);
    let t0 = Instant::now();
    let mut logits = Vec::new();
    for (i, c) in prompt_ids.chunks(chunk).enumerate() {
        let mut b = PackedBatch::new();
        b.push(seq, c, i * chunk)?;
        logits = model.forward(&b, cache.as_mut())?.i(0)?.to_vec1::<f32>()?;
    }
    let prefill_secs = t0.elapsed().as_secs_f64();

    let t1 = Instant::now();
    let mut context_ids: Vec<u32> = prompt_ids.to_vec();
    let mut text = Phi::new(String::new());
    let mut decode_steps = 0;
    let mut step = match decoder.finish_if_empty() {
        Some(done) => done,
        None => decoder.step(&lm.tokenizer, &logits, &context_ids, prompt_ids.len())?,
    };
    let finish_reason = loop {
        if !step.text.expose().is_empty() {
            on_text(step.text.expose());
            text.expose_mut().push_str(step.text.expose());
        }
        context_ids.extend(step.token);
        let token = match (step.finished, step.token) {
            (Some(reason), _) => break reason,
            (None, Some(token)) => token,
            // The decoder gives every unfinished step a token.
            (None, None) => break FinishReason::Stop,
        };
        let mut b = PackedBatch::new();
        b.push(seq, &[token], context_ids.len() - 1)?;
        logits = model.forward(&b, cache.as_mut())?.i(0)?.to_vec1::<f32>()?;
        decode_steps += 1;
        step = decoder.step(&lm.tokenizer, &logits, &context_ids, prompt_ids.len())?;
    };
    let decode_secs = t1.elapsed().as_secs_f64();
    Ok(SingleStreamOutput {
        token_ids: context_ids.split_off(prompt_ids.len()),
        text,
        finish_reason,
        prompt_tokens: prompt_ids.len(),
        timings: Timings { prefill_secs, decode_secs, decode_steps },
    })
}
