//! The generation path shared by `/v1/chat/completions` and `/v1/completions`:
//! limit checks ([`plan`]) → `inference.started` made durable
//! ([`InferenceAudit::start`]) → [`Engine::submit`] ([`Plan::submit`]) → either
//! collect every choice (non-streaming) or stream OpenAI-style SSE chunks, and
//! record the outcome in the audit trail (see [`super::inference_audit`]).
//!
//! Cancellation: each submitted request's [`GenerationHandle`] lives inside the
//! event stream built here. A non-streaming handler future that axum drops (the
//! client went away) drops it; a streaming task watches its body channel and
//! returns the moment the client disconnects, dropping it. Dropping the handle
//! cancels the generation.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::stream::{BoxStream, StreamExt};
use salus_models::paged_cache::PrefixScope;
use salus_models::Phi;

use super::error::ApiError;
use super::inference_audit::InferenceAudit;
use super::types::GenerationParams;
use crate::auth::AuthenticatedPrincipal;
use crate::engine::{FinishReason, GenerationEvent, GenerationHandle, GenerationRequest, RequestId, TokenLogprob};
use crate::state::{AppState, RequestContext};

/// One choice, accumulated (non-streaming).
#[derive(Debug, Default)]
pub struct ChoiceOutput {
    pub text: Phi<String>,
    pub logprobs: Vec<TokenLogprob>,
    pub finish: Option<FinishReason>,
    pub completion_tokens: usize,
    /// Prompt tokens served from the prefix cache, counted on the first choice
    /// of each prompt only (the choices of one prompt share it).
    pub cached_prompt_tokens: usize,
}

/// An event of the merged stream: choice index across all prompts.
pub type ChoiceEvent = (usize, GenerationEvent);

/// Requests submitted to the engine, ready to be consumed, with their open
/// audit transaction (which records the outcome).
pub struct Submitted {
    pub events: BoxStream<'static, ChoiceEvent>,
    pub choices: usize,
    pub prompt_tokens: usize,
    pub started: Instant,
    pub audit: InferenceAudit,
}

/// Requests that passed the limit checks, not yet submitted.
pub struct Plan {
    requests: Vec<GenerationRequest>,
    choices: usize,
    prompt_tokens: usize,
    started: Instant,
}

fn handle_stream(handle: GenerationHandle, offset: usize) -> BoxStream<'static, ChoiceEvent> {
    futures::stream::unfold(handle, move |mut h| async move {
        let ev = match h.events.recv().await? {
            GenerationEvent::Delta { choice, text, logprobs } => {
                (choice + offset, GenerationEvent::Delta { choice: choice + offset, text, logprobs })
            }
            GenerationEvent::Finished { choice, reason, completion_tokens, cached_prompt_tokens } => {
                // A prompt's cached tokens count once: on its first choice.
                let cached_prompt_tokens = if choice == 0 { cached_prompt_tokens } else { 0 };
                let ev = GenerationEvent::Finished { choice: choice + offset, reason, completion_tokens, cached_prompt_tokens };
                (choice + offset, ev)
            }
            failed @ GenerationEvent::Failed { .. } => (offset, failed),
        };
        Some((ev, h))
    })
    .boxed()
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
    if params.sampling.logit_bias.iter().any(|(id, _)| *id as usize >= vocab) {
        return Err(ApiError::invalid("logit_bias", format!("logit_bias token ids must be below {vocab}")));
    }
    let mut plans = Vec::with_capacity(prompts.len());
    let mut prompt_total = 0;
    for p in prompts {
        let len = p.expose().len();
        if len == 0 {
            return Err(ApiError::invalid("prompt", "the prompt encodes to no tokens"));
        }
        let prompt_limit = limits.max_prompt_tokens.min(context.saturating_sub(1));
        if len > prompt_limit {
            return Err(ApiError::ContextOverflow {
                needed: len + 1,
                prompt: len,
                completion: 1,
                limit: prompt_limit + 1,
            });
        }
        let room = context - len;
        let max_tokens = match params.max_tokens {
            Some(m) if m > room => {
                return Err(ApiError::ContextOverflow { needed: len + m, prompt: len, completion: m, limit: context })
            }
            Some(m) => m,
            None => limits.default_max_tokens.min(room),
        };
        prompt_total += len;
        plans.push((p, max_tokens));
    }
    let deadline = Some(started + Duration::from_secs(limits.request_timeout_secs));
    let choices = plans.len() * params.n;
    let mut requests = Vec::with_capacity(plans.len());
    let prefix_scope = PrefixScope::new(principal.id());
    for (i, (prompt_tokens, max_tokens)) in plans.into_iter().enumerate() {
        let mut sampling = params.sampling.clone();
        // Distinct prompts of one request get distinct seeds (choices get seed + i in the engine).
        if let Some(seed) = sampling.seed {
            sampling.seed = Some(seed.wrapping_add((i * params.n) as u64));
        }
        requests.push(GenerationRequest {
            request_id: RequestId(ctx.request_id().to_string()),
            prompt_tokens,
            n: params.n,
            max_tokens,
            sampling,
            stop_strings: params.stop.clone(),
            deadline,
            prefix_scope: prefix_scope.clone(),
        });
    }
    Ok(Plan { requests, choices, prompt_tokens: prompt_total, started })
}

impl Plan {
    /// Submits the planned requests to the engine. Call only after
    /// `inference.started` is durable: `audit` is the proof and records the
    /// outcome (an engine refusal is recorded as `inference.failed`).
    pub async fn submit(
        self,
        state: &AppState,
        ctx: &RequestContext,
        mut audit: InferenceAudit,
    ) -> Result<Submitted, ApiError> {
        let mut streams = Vec::with_capacity(self.requests.len());
        for (i, request) in self.requests.into_iter().enumerate() {
            let n = request.n;
            match state.engine().submit(request) {
                Ok(handle) => streams.push(handle_stream(handle, i * n)),
                Err(e) => {
                    let err = ApiError::from_engine(&e, ctx.request_id());
                    audit.failed(err.code().unwrap_or("internal_error"), self.prompt_tokens, 0).await;
                    return Err(err);
                }
            }
        }
        ctx.set_tokens(self.prompt_tokens, 0);
        Ok(Submitted {
            events: futures::stream::select_all(streams).boxed(),
            choices: self.choices,
            prompt_tokens: self.prompt_tokens,
            started: self.started,
            audit,
        })
    }
}

/// Timing bookkeeping for TTFT and inter-token latency.
pub struct Timing {
    started: Instant,
    last: Option<Instant>,
}

impl Timing {
    pub fn new(started: Instant) -> Self {
        Timing { started, last: None }
    }
    pub fn on_delta(&mut self, state: &AppState) {
        let now = Instant::now();
        match self.last {
            None => state.metrics().ttft.observe((now - self.started).as_secs_f64()),
            Some(prev) => state.metrics().inter_token.observe((now - prev).as_secs_f64()),
        }
        self.last = Some(now);
    }
    pub fn finish(&self, state: &AppState) {
        state.metrics().e2e.observe(self.started.elapsed().as_secs_f64());
    }
}

/// Collects every choice (non-streaming), then makes `inference.completed`
/// durable before returning the output: if that record fails, the output is
/// withheld (500).
pub async fn collect(
    state: &AppState,
    ctx: &RequestContext,
    mut sub: Submitted,
) -> Result<Vec<ChoiceOutput>, ApiError> {
    let mut out: Vec<ChoiceOutput> = (0..sub.choices).map(|_| ChoiceOutput::default()).collect();
    let mut timing = Timing::new(sub.started);
    let mut remaining = sub.choices;
    let internal = || ApiError::Internal { request_id: ctx.request_id().to_string() };
    while remaining > 0 {
        let Some((idx, ev)) = sub.events.next().await else {
            tracing::error!(request_id = ctx.request_id(), "engine closed the event stream early");
            sub.audit.failed("engine_stream_closed", sub.prompt_tokens, completed_tokens(&out)).await;
            return Err(internal());
        };
        match ev {
            GenerationEvent::Delta { text, logprobs, .. } => {
                timing.on_delta(state);
                let Some(c) = out.get_mut(idx) else {
                    sub.audit.failed("internal_error", sub.prompt_tokens, completed_tokens(&out)).await;
                    return Err(internal());
                };
                c.text.expose_mut().push_str(text.expose());
                c.logprobs.extend(logprobs);
            }
            GenerationEvent::Finished { reason, completion_tokens, cached_prompt_tokens, .. } => {
                let Some(c) = out.get_mut(idx) else {
                    sub.audit.failed("internal_error", sub.prompt_tokens, completed_tokens(&out)).await;
                    return Err(internal());
                };
                if c.finish.is_none() {
                    c.finish = Some(reason);
                    c.completion_tokens = completion_tokens;
                    c.cached_prompt_tokens = cached_prompt_tokens;
                    remaining -= 1;
                }
            }
            GenerationEvent::Failed { error } => {
                let err = ApiError::from_engine(&error, ctx.request_id());
                sub.audit.failed(err.code().unwrap_or("model_error"), sub.prompt_tokens, completed_tokens(&out)).await;
                return Err(err);
            }
        }
    }
    timing.finish(state);
    let completion = completed_tokens(&out);
    ctx.set_tokens(sub.prompt_tokens, completion);
    state.metrics().add_tokens(sub.prompt_tokens, completion);
    let texts: Vec<&Phi<String>> = out.iter().map(|c| &c.text).collect();
    let hmac = sub.audit.completion_hmac(&texts);
    if let Err(e) = sub.audit.completed(sub.prompt_tokens, completion, hmac).await {
        // Fail closed: no durable record of this inference, no output.
        tracing::error!(request_id = ctx.request_id(), error = %e, "audit: inference.completed not recorded; output withheld");
        return Err(internal());
    }
    Ok(out)
}

fn completed_tokens(out: &[ChoiceOutput]) -> usize {
    out.iter().map(|c| c.completion_tokens).sum()
}

/// Builds the JSON of one SSE chunk for a streaming endpoint.
pub trait ChunkFormat: Send + 'static {
    /// Chunks sent before any token (the chat role delta), one per choice.
    fn preamble(&self, choice: usize) -> Option<serde_json::Value>;
    /// A content delta (`text` may be empty when only logprobs are new).
    fn delta(&self, choice: usize, text: &Phi<String>, logprobs: &[TokenLogprob]) -> serde_json::Value;
    /// The chunk carrying `finish_reason`.
    fn finish(&self, choice: usize, reason: FinishReason) -> serde_json::Value;
    /// The usage chunk (`choices: []`); `cached` of the `prompt` tokens came
    /// from the prefix cache.
    fn usage(&self, prompt: usize, completion: usize, cached: usize) -> serde_json::Value;
}

fn sse_data(v: &serde_json::Value) -> Bytes {
    let mut s = String::with_capacity(256);
    s.push_str("data: ");
    s.push_str(&v.to_string());
    s.push_str("\n\n");
    Bytes::from(s)
}

/// Streams chunks as Server-Sent Events, OpenAI style. `include_usage` adds
/// `"usage": null` to every chunk and a final usage chunk before `[DONE]`.
pub fn stream_response(
    state: AppState,
    ctx: Arc<RequestContext>,
    mut sub: Submitted,
    format: impl ChunkFormat,
    include_usage: bool,
) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, Infallible>>(32);
    tokio::spawn(async move {
        let with_usage = |mut v: serde_json::Value| {
            if include_usage {
                v["usage"] = serde_json::Value::Null;
            }
            v
        };
        for choice in 0..sub.choices {
            if let Some(v) = format.preamble(choice) {
                if tx.send(Ok(sse_data(&with_usage(v)))).await.is_err() {
                    return;
                }
            }
        }
        let mut timing = Timing::new(sub.started);
        let mut remaining = sub.choices;
        let mut completion = 0usize;
        let mut cached = 0usize;
        let mut failed: Option<&'static str> = None;
        // Every choice's text, for the completion HMAC (PHI, in memory only).
        let mut texts: Vec<Phi<String>> = (0..sub.choices).map(|_| Phi::new(String::new())).collect();
        while remaining > 0 {
            let next = tokio::select! {
                ev = sub.events.next() => ev,
                _ = tx.closed() => {
                    tracing::info!(request_id = ctx.request_id(), "client disconnected; generation cancelled");
                    return;
                }
            };
            let Some((idx, ev)) = next else {
                tracing::error!(request_id = ctx.request_id(), "engine closed the event stream early");
                failed = Some("engine_stream_closed");
                break;
            };
            let chunk = match ev {
                GenerationEvent::Delta { choice, text, logprobs } => {
                    timing.on_delta(&state);
                    if text.expose().is_empty() && logprobs.is_empty() {
                        continue;
                    }
                    if let Some(t) = texts.get_mut(idx) {
                        t.expose_mut().push_str(text.expose());
                    }
                    format.delta(choice, &text, &logprobs)
                }
                GenerationEvent::Finished { reason, completion_tokens, cached_prompt_tokens, .. } => {
                    remaining -= 1;
                    completion += completion_tokens;
                    cached += cached_prompt_tokens;
                    format.finish(idx, reason)
                }
                GenerationEvent::Failed { error } => {
                    let e = ApiError::from_engine(&error, ctx.request_id());
                    let _ = tx.send(Ok(sse_data(&e.body()))).await;
                    failed = Some(e.code().unwrap_or("model_error"));
                    break;
                }
            };
            if tx.send(Ok(sse_data(&with_usage(chunk)))).await.is_err() {
                return;
            }
        }
        timing.finish(&state);
        ctx.set_tokens(sub.prompt_tokens, completion);
        state.metrics().add_tokens(sub.prompt_tokens, completion);
        tracing::info!(
            request_id = ctx.request_id(),
            prompt_tokens = sub.prompt_tokens,
            completion_tokens = completion,
            duration_ms = sub.started.elapsed().as_millis() as u64,
            failed = failed.is_some(),
            "stream finished"
        );
        if let Some(reason) = failed {
            sub.audit.failed(reason, sub.prompt_tokens, completion).await;
            return;
        }
        // The tokens are already sent; the record still comes before `[DONE]`, so
        // a client that saw `[DONE]` knows its inference is in the trail.
        let refs: Vec<&Phi<String>> = texts.iter().collect();
        let hmac = sub.audit.completion_hmac(&refs);
        if let Err(e) = sub.audit.completed(sub.prompt_tokens, completion, hmac).await {
            tracing::error!(request_id = ctx.request_id(), error = %e, "audit: inference.completed not recorded after a streamed response");
            let err = ApiError::Internal { request_id: ctx.request_id().to_string() };
            let _ = tx.send(Ok(sse_data(&err.body()))).await;
            return;
        }
        if include_usage && tx.send(Ok(sse_data(&format.usage(sub.prompt_tokens, completion, cached)))).await.is_err() {
            return;
        }
        let _ = tx.send(Ok(Bytes::from_static(b"data: [DONE]\n\n"))).await;
    });
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    let mut resp = (StatusCode::OK, body).into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream; charset=utf-8"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    resp
}

/// Unix time now.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}
