//! One request's generation, from the limit checks to its audit outcome, shared
//! by `/v1/chat/completions` and `/v1/completions`:
//!
//! [`plan`] (limits; `max_tokens` bounded by the context window, the one place
//! it is clamped) → `inference.started` made durable ([`InferenceAudit::start`])
//! → [`Plan::submit`] to the engine → a [`Generation`], which the two consumers
//! drain: the whole JSON body ([`super::response`]) or the SSE stream
//! ([`super::sse`]). The generation does the accounting once for both —
//! per-choice text (for the completion HMAC), token counts, TTFT and
//! inter-token metrics, the access-log counts — and records the outcome in the
//! audit trail ([`Generation::finish`]).
//!
//! Cancellation: the engine's [`GenerationHandle`]s live inside the
//! generation's event stream. Dropping the generation (a non-streaming handler
//! future that axum drops when the client goes away; a streaming task that sees
//! the client disconnect) drops them, which cancels the engine's work, and its
//! [`InferenceAudit`] records `inference.cancelled`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{BoxStream, StreamExt};
use salus_models::paged_cache::PrefixScope;
use salus_models::tool_calls::{StreamPiece, ToolCallFormat, ToolCallStreamer};
use salus_models::{DecodeParams, Phi};

use super::error::ApiError;
use super::inference_audit::InferenceAudit;
use super::tools::{new_call_id, ToolCall, ToolCallDelta};
use super::types::GenerationParams;
use crate::auth::policy::InferenceSlot;
use crate::auth::AuthenticatedPrincipal;
use crate::engine::{
    ChoiceTiming, FinishReason, GenerationEvent, GenerationHandle, GenerationRequest, RequestId, TokenLogprob,
};
use crate::state::{AppState, RequestContext};
use crate::telemetry::TracePhase;

/// Requests that passed the limit checks, not yet submitted.
pub struct Plan {
    requests: Vec<GenerationRequest>,
    prompt_tokens: usize,
    started: Instant,
}

impl Plan {
    /// The prompt tokens of every planned request (what the principal's token budget is charged).
    pub fn prompt_tokens(&self) -> usize {
        self.prompt_tokens
    }
}

/// Checks the prompts against the limits and picks `max_tokens`: one engine
/// request per prompt (each with `n` choices), not submitted yet.
pub fn plan(
    state: &AppState,
    ctx: &RequestContext,
    principal: &AuthenticatedPrincipal,
    prompts: Vec<Phi<Vec<u32>>>,
    params: &GenerationParams,
) -> Result<Plan, ApiError> {
    let started = Instant::now();
    let limits = state.limits();
    let context = state.codec().context_length();
    let vocab = state.codec().vocab_size();
    if params.decode.sampling.logit_bias.iter().any(|(id, _)| *id as usize >= vocab) {
        return Err(ApiError::invalid("logit_bias", format!("logit_bias token ids must be below {vocab}")));
    }
    if params.decode.stop_token_ids.iter().any(|id| *id as usize >= vocab) {
        return Err(ApiError::invalid("stop_token_ids", format!("stop_token_ids must be below {vocab}")));
    }
    let prompt_limit = limits.max_prompt_tokens.min(context.saturating_sub(1));
    let deadline = Some(started + Duration::from_secs(limits.request_timeout_secs));
    let prefix_scope = PrefixScope::new(principal.id());
    let mut requests = Vec::with_capacity(prompts.len());
    let mut prompt_tokens = 0;
    for (i, mut prompt) in prompts.into_iter().enumerate() {
        if let Some(keep) = params.truncate_prompt_tokens {
            // vLLM's left truncation: the last `keep` tokens stay.
            let ids = prompt.expose_mut();
            let cut = ids.len().saturating_sub(keep);
            ids.drain(..cut);
        }
        let len = prompt.expose().len();
        if len == 0 {
            return Err(ApiError::invalid("prompt", "the prompt encodes to no tokens"));
        }
        if len > prompt_limit {
            return Err(ApiError::ContextOverflow {
                needed: len + 1,
                prompt: len,
                completion: 1,
                limit: prompt_limit + 1,
                param: "messages",
            });
        }
        let room = context - len;
        let max_tokens = match params.max_tokens {
            Some(m) if m > room => {
                return Err(ApiError::ContextOverflow {
                    needed: len + m,
                    prompt: len,
                    completion: m,
                    limit: context,
                    param: "messages",
                })
            }
            Some(m) => m,
            None => limits.default_max_tokens.min(room),
        };
        prompt_tokens += len;
        requests.push(GenerationRequest {
            request_id: RequestId(ctx.request_id().to_string()),
            prompt_tokens: prompt,
            n: params.n,
            first_choice: i * params.n,
            // `min_tokens` above the chosen `max_tokens` is bounded by the decoder.
            decode: DecodeParams { max_tokens, ..params.decode.clone() },
            deadline,
            prefix_scope: prefix_scope.clone(),
            prompt_logprobs: params.prompt_logprobs,
        });
    }
    Ok(Plan { requests, prompt_tokens, started })
}

/// An engine event with its choice index across all prompts of the request.
type ChoiceEvent = (usize, GenerationEvent);

fn handle_stream(handle: GenerationHandle, offset: usize) -> BoxStream<'static, ChoiceEvent> {
    futures::stream::unfold(handle, move |mut h| async move {
        let ev = h.events.recv().await?;
        let index = match &ev {
            GenerationEvent::Delta { choice, .. }
            | GenerationEvent::Finished { choice, .. }
            | GenerationEvent::PromptLogprobs { choice, .. } => choice + offset,
            GenerationEvent::Failed { .. } => offset,
        };
        Some(((index, ev), h))
    })
    .boxed()
}

impl Plan {
    /// Submits the planned requests to the engine. Call only after
    /// `inference.started` is durable: `audit` is the proof and records the
    /// outcome (an engine refusal is recorded as `inference.failed`).
    pub async fn submit(
        self,
        state: &AppState,
        ctx: &Arc<RequestContext>,
        mut audit: InferenceAudit,
    ) -> Result<Generation, ApiError> {
        let choices: usize = self.requests.iter().map(|r| r.n).sum();
        let submitted = Instant::now();
        let mut streams = Vec::with_capacity(self.requests.len());
        for request in self.requests {
            let offset = request.first_choice;
            match state.engine().submit(request) {
                Ok(handle) => streams.push(handle_stream(handle, offset)),
                Err(e) => {
                    let err = ApiError::from_engine(&e, ctx.request_id());
                    audit.failed(ctx, err.code().unwrap_or("internal_error"), self.prompt_tokens, 0).await;
                    return Err(err);
                }
            }
        }
        ctx.set_tokens(self.prompt_tokens, 0);
        Ok(Generation {
            engine_times: EngineTimes::new(submitted),
            state: state.clone(),
            ctx: ctx.clone(),
            request_id: ctx.request_id().to_string(),
            events: futures::stream::select_all(streams).boxed(),
            choices: (0..choices).map(|_| ChoiceOutput::default()).collect(),
            remaining: choices,
            prompt_tokens: self.prompt_tokens,
            started: self.started,
            last_delta: None,
            streamed_tokens: 0,
            failure: None,
            audit,
            tool_calls: None,
            pending: None,
            slot: None,
        })
    }
}

/// How a generation's output is parsed for tool calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ToolCallMode {
    /// How the model writes calls.
    pub format: ToolCallFormat,
    /// More than one call per choice (`parallel_tool_calls`).
    pub parallel: bool,
    /// Decoding was constrained to calls only (`tool_choice` required or named).
    pub calls_only: bool,
    /// Decoding followed the tools' call grammar (otherwise an output
    /// constraint of the request's): calls stream as they are written.
    pub follows_grammar: bool,
}

/// One choice as it accumulates.
#[derive(Debug, Default)]
pub struct ChoiceOutput {
    /// The text so far, as generated (PHI): calls included. The completion
    /// HMAC covers it.
    pub text: Phi<String>,
    /// With tool calling: the text outside calls (PHI), and the calls.
    pub content: Option<Phi<String>>,
    pub tool_calls: Vec<ToolCall>,
    /// Splits the text into content and calls while it streams.
    streamer: Option<ToolCallStreamer>,
    /// The output's call now being written is one of `tool_calls` (not one
    /// beyond the first when calls are not parallel).
    current_call_kept: bool,
    /// Every token's logprobs so far, when requested.
    pub logprobs: Vec<TokenLogprob>,
    /// `echo`: the prompt (completions), or the last message (chat).
    pub echo: Option<EchoedPrompt>,
    /// The prompt's tokens after the first, scored (`echo` with `logprobs`,
    /// `prompt_logprobs`).
    pub prompt_scores: Option<PromptScores>,
    pub finish: Option<FinishReason>,
    pub completion_tokens: usize,
    /// Prompt tokens served from the prefix cache, counted on the first choice
    /// of each prompt only (the choices of one prompt share it).
    pub cached_prompt_tokens: usize,
}

impl ChoiceOutput {
    /// The message text: the content outside tool calls, or all of it.
    pub fn content(&self) -> &Phi<String> {
        self.content.as_ref().unwrap_or(&self.text)
    }

    /// OpenAI's `finish_reason`: `tool_calls` when the choice called tools
    /// (`length` when the limit cut it off, in a call or after one).
    pub fn finish_reason(&self) -> &'static str {
        match self.finish {
            Some(FinishReason::Length) => FinishReason::Length.as_str(),
            _ if !self.tool_calls.is_empty() => "tool_calls",
            Some(r) => r.as_str(),
            None => FinishReason::Stop.as_str(),
        }
    }
}

/// The text a choice echoes (non-streaming): the prompt on
/// `/v1/completions`, the last (assistant) message on chat.
#[derive(Debug, Clone)]
pub struct EchoedPrompt {
    /// The prompt's text (PHI).
    pub text: Phi<String>,
    /// The prompt's token ids (PHI).
    pub tokens: Phi<Vec<u32>>,
}

/// How the model scored a prompt: each token after the first with its
/// logprob, alternatives and rank (1: the most likely).
#[derive(Debug, Clone, Default)]
pub struct PromptScores {
    pub logprobs: Vec<TokenLogprob>,
    pub ranks: Vec<u32>,
}

/// What a consumer forwards to the client.
#[derive(Debug)]
pub enum Update {
    /// New text (possibly empty when only logprobs or calls are new) of
    /// `choice`, and new pieces of its tool calls.
    Delta { choice: usize, text: Phi<String>, logprobs: Vec<TokenLogprob>, tool_calls: Vec<ToolCallDelta> },
    /// `choice` ended; `reason` is OpenAI's `finish_reason`.
    Finished { choice: usize, reason: &'static str },
}

/// Token counts of a finished generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens served from the prefix cache.
    pub cached_prompt_tokens: usize,
}

/// A generation whose outcome is recorded: every choice, and the usage.
#[derive(Debug)]
pub struct Completed {
    pub choices: Vec<ChoiceOutput>,
    pub usage: Usage,
}

/// When the engine worked on a request's choices, over all of them (its trace's phases).
#[derive(Debug, Clone, Copy)]
struct EngineTimes {
    submitted: Instant,
    /// The earliest choice's first scheduling and first token.
    admitted: Option<Instant>,
    first_token: Option<Instant>,
    /// When the last choice finished.
    finished: Option<Instant>,
}

impl EngineTimes {
    fn new(submitted: Instant) -> Self {
        EngineTimes { submitted, admitted: None, first_token: None, finished: None }
    }

    fn choice_finished(&mut self, timing: ChoiceTiming) {
        self.admitted = self.admitted.into_iter().chain(timing.admitted).min();
        self.first_token = self.first_token.into_iter().chain(timing.first_token).min();
        self.finished = Some(Instant::now());
    }

    /// Records queue, prefill and decode in the request's trace (those that happened).
    fn trace(&self, ctx: &RequestContext, usage: &Usage) {
        let Some(admitted) = self.admitted else { return };
        ctx.trace_phase(TracePhase::Queue, self.submitted, admitted);
        let Some(first) = self.first_token else { return };
        let cached_prompt_tokens = usage.cached_prompt_tokens;
        ctx.trace_phase(TracePhase::Prefill { cached_prompt_tokens }, admitted, first);
        if let Some(finished) = self.finished {
            let completion_tokens = usage.completion_tokens;
            ctx.trace_phase(TracePhase::Decode { completion_tokens }, first, finished);
        }
    }
}

/// A submitted request's generation: the one place its events are accounted
/// and its outcome is recorded.
pub struct Generation {
    /// When the engine worked on it (for its trace).
    engine_times: EngineTimes,
    state: AppState,
    ctx: Arc<RequestContext>,
    request_id: String,
    events: BoxStream<'static, ChoiceEvent>,
    choices: Vec<ChoiceOutput>,
    remaining: usize,
    prompt_tokens: usize,
    started: Instant,
    last_delta: Option<Instant>,
    /// Tokens generated so far, over all choices.
    streamed_tokens: usize,
    /// Set when the generation failed; [`Self::finish`] records it.
    failure: Option<ApiError>,
    audit: InferenceAudit,
    /// Tool calling: how calls are written, and how many may be made.
    tool_calls: Option<ToolCallMode>,
    /// An update held back by [`Self::next`] (a choice's end, after its flush).
    pending: Option<Update>,
    /// The principal's slot: generated tokens are charged to it; dropped
    /// (freeing the concurrency slot) with the generation.
    slot: Option<InferenceSlot>,
}

impl Generation {
    /// The request id (for logs; never request text).
    pub fn request_id(&self) -> &str {
        &self.request_id
    }

    /// Token counts so far (`stream_options.continuous_usage_stats`).
    pub fn usage_so_far(&self) -> Usage {
        Usage { prompt_tokens: self.prompt_tokens, completion_tokens: self.streamed_tokens, cached_prompt_tokens: 0 }
    }

    /// Number of choices (over all prompts).
    pub fn num_choices(&self) -> usize {
        self.choices.len()
    }

    /// Echoes the prompts (`echo`): `prompts[i]` to the choices of prompt `i`
    /// (`n` each), in order; their scores arrive from the engine.
    pub fn with_echo(mut self, prompts: Vec<EchoedPrompt>, n: usize) -> Self {
        for (i, prompt) in prompts.into_iter().enumerate() {
            for c in self.choices.iter_mut().skip(i * n).take(n) {
                c.echo = Some(prompt.clone());
            }
        }
        self
    }

    /// Parses every choice's output for tool calls (see [`ToolCallMode`]).
    pub fn with_tool_calls(mut self, mode: ToolCallMode) -> Self {
        self.tool_calls = Some(mode);
        for c in &mut self.choices {
            c.content = Some(Phi::new(String::new()));
            c.streamer = Some(match mode.follows_grammar {
                true => ToolCallStreamer::for_call_grammar(mode.format),
                false => ToolCallStreamer::new(mode.format),
            });
        }
        self
    }

    /// Charges generated tokens to `slot` and holds it until the generation is dropped.
    pub fn with_slot(mut self, slot: InferenceSlot) -> Self {
        self.slot = Some(slot);
        self
    }

    /// Takes a piece of the tool-call splitter into choice `index`: its content
    /// text, and its calls' pieces (ids assigned; calls beyond the first
    /// dropped unless parallel).
    fn split_piece(&mut self, index: usize, piece: StreamPiece) -> (Phi<String>, Vec<ToolCallDelta>) {
        let Some(mode) = self.tool_calls else { return (piece.content, Vec::new()) };
        let c = &mut self.choices[index];
        let mut deltas = Vec::new();
        for delta in piece.calls {
            let head = match delta.name {
                Some(name) => {
                    c.current_call_kept = mode.parallel || c.tool_calls.is_empty();
                    if !c.current_call_kept {
                        continue;
                    }
                    let call = ToolCall {
                        index: c.tool_calls.len(),
                        id: new_call_id(),
                        name: name.clone(),
                        arguments: Phi::default(),
                    };
                    let head = (call.id.clone(), name);
                    c.tool_calls.push(call);
                    Some(head)
                }
                None => None,
            };
            let Some(call) = c.tool_calls.last_mut().filter(|_| c.current_call_kept) else { continue };
            call.arguments.expose_mut().push_str(delta.arguments.expose());
            deltas.push(ToolCallDelta { index: call.index, head, arguments: delta.arguments });
        }
        if mode.calls_only {
            // Decoding allowed nothing but calls: what is left is a call that
            // `max_tokens` cut off, not content.
            return (Phi::new(String::new()), deltas);
        }
        if let Some(content) = &mut c.content {
            content.expose_mut().push_str(piece.content.expose());
        }
        (piece.content, deltas)
    }

    /// The next update to forward, after accounting for it; `None` once every
    /// choice has finished or the generation failed (then call [`Self::finish`]).
    /// Cancel-safe: it awaits only the engine's event stream.
    pub async fn next(&mut self) -> Option<Update> {
        if let Some(u) = self.pending.take() {
            return Some(u);
        }
        while self.remaining > 0 && self.failure.is_none() {
            let Some((index, event)) = self.events.next().await else {
                tracing::error!(request_id = %self.request_id, "engine closed the event stream early");
                self.failure = Some(self.internal_error());
                return None;
            };
            if index >= self.choices.len() {
                self.failure = Some(self.internal_error());
                return None;
            }
            match event {
                GenerationEvent::Delta { text, logprobs, tokens, .. } => {
                    self.streamed_tokens += tokens;
                    if let Some(slot) = &self.slot {
                        slot.charge(tokens);
                    }
                    self.observe_delta();
                    if text.expose().is_empty() && logprobs.is_empty() {
                        continue;
                    }
                    let c = &mut self.choices[index];
                    c.text.expose_mut().push_str(text.expose());
                    c.logprobs.extend(logprobs.iter().cloned());
                    let (text, tool_calls) = match c.streamer.as_mut().map(|st| st.push(text.expose())) {
                        Some(piece) => self.split_piece(index, piece),
                        None => (text, Vec::new()),
                    };
                    if text.expose().is_empty() && logprobs.is_empty() && tool_calls.is_empty() {
                        continue;
                    }
                    return Some(Update::Delta { choice: index, text, logprobs, tool_calls });
                }
                GenerationEvent::Finished { choice, reason, completion_tokens, cached_prompt_tokens, timing } => {
                    let c = &mut self.choices[index];
                    if c.finish.is_some() {
                        continue;
                    }
                    self.engine_times.choice_finished(timing);
                    c.finish = Some(reason);
                    c.completion_tokens = completion_tokens;
                    // A prompt's cached tokens count once: on its first choice.
                    c.cached_prompt_tokens = if choice == 0 { cached_prompt_tokens } else { 0 };
                    self.remaining -= 1;
                    let flushed = c.streamer.take().map(|mut st| st.finish());
                    let Some(piece) = flushed else {
                        return Some(Update::Finished { choice: index, reason: self.choices[index].finish_reason() });
                    };
                    let (text, tool_calls) = self.split_piece(index, piece);
                    let finished = Update::Finished { choice: index, reason: self.choices[index].finish_reason() };
                    if text.expose().is_empty() && tool_calls.is_empty() {
                        return Some(finished);
                    }
                    self.pending = Some(finished);
                    return Some(Update::Delta { choice: index, text, logprobs: Vec::new(), tool_calls });
                }
                GenerationEvent::PromptLogprobs { logprobs, ranks, .. } => {
                    self.choices[index].prompt_scores = Some(PromptScores { logprobs, ranks });
                }
                GenerationEvent::Failed { error } => {
                    self.failure = Some(ApiError::from_engine(&error, &self.request_id));
                    return None;
                }
            }
        }
        None
    }

    /// Drains the generation to its end (the non-streaming consumer).
    pub async fn run_to_end(&mut self) {
        while self.next().await.is_some() {}
    }

    /// The names of the tools the choices called, in order (for the audit record).
    fn tools_called(&self) -> Vec<String> {
        self.choices.iter().flat_map(|c| c.tool_calls.iter().map(|t| t.name.clone())).collect()
    }

    /// Records the outcome and returns it: `inference.completed` (durable
    /// before this returns: if it cannot be written the output must be
    /// withheld, and the error says so) when every choice finished, otherwise
    /// `inference.failed` and the error to send.
    pub async fn finish(mut self) -> Result<Completed, ApiError> {
        if self.failure.is_none() && self.remaining > 0 {
            // Finish called before the end: drain first.
            self.run_to_end().await;
        }
        let usage = Usage {
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.choices.iter().map(|c| c.completion_tokens).sum(),
            cached_prompt_tokens: self.choices.iter().map(|c| c.cached_prompt_tokens).sum(),
        };
        let metrics = self.state.metrics();
        metrics.e2e.observe(self.started.elapsed().as_secs_f64());
        metrics.add_tokens(usage.prompt_tokens, usage.completion_tokens);
        self.ctx.set_tokens(usage.prompt_tokens, usage.completion_tokens);
        self.engine_times.trace(&self.ctx, &usage);
        tracing::info!(
            request_id = %self.request_id,
            prompt_tokens = usage.prompt_tokens,
            completion_tokens = usage.completion_tokens,
            duration_ms = self.started.elapsed().as_millis() as u64,
            failed = self.failure.is_some(),
            "generation finished"
        );
        if let Some(err) = self.failure.take() {
            let reason = err.code().unwrap_or("model_error");
            self.audit.failed(&self.ctx, reason, usage.prompt_tokens, usage.completion_tokens).await;
            return Err(err);
        }
        let texts: Vec<&Phi<String>> = self.choices.iter().map(|c| &c.text).collect();
        let hmac = self.audit.completion_hmac(&texts);
        let called = self.tools_called();
        let choices = self.choices.len();
        let recorded =
            self.audit.completed(&self.ctx, usage.prompt_tokens, usage.completion_tokens, hmac, called, choices).await;
        if let Err(e) = recorded {
            // Fail closed: no durable record of this inference, no (further) output.
            tracing::error!(request_id = %self.request_id, error = %e, "audit: inference.completed not recorded; output withheld");
            return Err(self.internal_error());
        }
        Ok(Completed { choices: std::mem::take(&mut self.choices), usage })
    }

    fn observe_delta(&mut self) {
        let now = Instant::now();
        let metrics = self.state.metrics();
        match self.last_delta {
            None => metrics.ttft.observe((now - self.started).as_secs_f64()),
            Some(prev) => metrics.inter_token.observe((now - prev).as_secs_f64()),
        }
        self.last_delta = Some(now);
    }

    fn internal_error(&self) -> ApiError {
        ApiError::Internal { request_id: self.request_id.clone() }
    }
}
