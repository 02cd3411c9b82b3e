//! `POST /v1/chat/completions` and `POST /v1/completions`.

use std::sync::Arc;

use axum::extract::{Extension, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use salus_models::Phi;
use serde_json::{json, Value};

use super::error::ApiError;
use super::generate::{self, ChoiceOutput, ChunkFormat};
use super::inference_audit::{InferenceAudit, InferenceSubject, SourceAddr};
use super::json::JsonObject;
use super::types::{ValidatedChatRequest, ValidatedCompletionRequest};
use crate::auth::{AuthenticatedPrincipal, Role};
use crate::engine::{FinishReason, TokenLogprob};
use crate::state::{AppState, PromptError, RequestContext};

fn prompt_error(e: PromptError, param: &'static str, request_id: &str) -> ApiError {
    match e {
        PromptError::Template => ApiError::invalid(param, e.to_string()),
        PromptError::Empty => ApiError::invalid(param, e.to_string()),
        PromptError::Tokenizer => {
            tracing::error!(request_id, "tokenizer failed");
            ApiError::Internal { request_id: request_id.to_string() }
        }
    }
}

/// The request names the served model, and the server is ready to serve it.
fn check_servable(state: &AppState, model: &str) -> Result<(), ApiError> {
    if model != state.model().id {
        return Err(ApiError::ModelNotFound);
    }
    if !state.is_ready() {
        return Err(ApiError::NotReady);
    }
    Ok(())
}

/// `system_fingerprint`: identifies the exact weights served.
fn system_fingerprint(state: &AppState) -> String {
    format!("fp_{}", &state.model().fingerprint.chars().take(12).collect::<String>())
}

fn token_entry(state: &AppState, id: u32, logprob: f32) -> Value {
    let text = state.codec().token_text(id);
    json!({"token": text.expose(), "logprob": logprob, "bytes": text.expose().as_bytes()})
}

fn chat_logprobs(state: &AppState, lps: &[TokenLogprob]) -> Value {
    let content: Vec<Value> = lps
        .iter()
        .map(|lp| {
            let mut e = token_entry(state, lp.token_id, lp.logprob);
            e["top_logprobs"] = Value::Array(lp.top.iter().map(|(id, l)| token_entry(state, *id, *l)).collect());
            e
        })
        .collect();
    json!({ "content": content, "refusal": null })
}

fn completion_logprobs(state: &AppState, lps: &[TokenLogprob], start_offset: usize) -> Value {
    let mut tokens = Vec::with_capacity(lps.len());
    let mut token_logprobs = Vec::with_capacity(lps.len());
    let mut top = Vec::with_capacity(lps.len());
    let mut offsets = Vec::with_capacity(lps.len());
    let mut offset = start_offset;
    for lp in lps {
        let t = state.codec().token_text(lp.token_id);
        offsets.push(offset);
        offset += t.expose().len();
        tokens.push(Value::String(t.expose().clone()));
        token_logprobs.push(json!(lp.logprob));
        let mut m = serde_json::Map::new();
        for (id, l) in &lp.top {
            m.insert(state.codec().token_text(*id).expose().clone(), json!(l));
        }
        top.push(Value::Object(m));
    }
    json!({"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets})
}

/// OpenAI's usage object; `cached` of the prompt tokens came from the prefix cache.
fn usage(prompt: usize, completion: usize, cached: usize) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    })
}

/// Which endpoint a response belongs to: decides `object` and the shape of a choice.
#[derive(Clone, Copy)]
enum Endpoint {
    Chat,
    Completion,
}

/// One part of one choice, as a streamed chunk carries it or as the whole.
enum ChoicePart<'a> {
    /// The chat role delta sent before any token (streaming).
    Preamble,
    /// New text and its logprobs (streaming).
    Delta(&'a str, &'a [TokenLogprob]),
    /// The end of the choice (streaming).
    Finish(FinishReason),
    /// The complete choice (non-streaming).
    Whole(&'a ChoiceOutput),
}

/// Builds every JSON body of one request, streamed (as the [`ChunkFormat`]) or
/// not ([`Self::whole`]): the envelope, the choices and the usage.
struct ResponseBuilder {
    state: AppState,
    endpoint: Endpoint,
    id: String,
    created: u64,
    fingerprint: String,
    logprobs: bool,
}

impl ResponseBuilder {
    fn new(state: &AppState, ctx: &RequestContext, endpoint: Endpoint, logprobs: bool) -> Self {
        let prefix = match endpoint {
            Endpoint::Chat => "chatcmpl",
            Endpoint::Completion => "cmpl",
        };
        ResponseBuilder {
            state: state.clone(),
            endpoint,
            id: format!("{prefix}-{}", ctx.request_id()),
            created: generate::unix_now(),
            fingerprint: system_fingerprint(state),
            logprobs,
        }
    }

    fn envelope(&self, object: &str, choices: Value) -> Value {
        json!({
            "id": self.id, "object": object, "created": self.created,
            "model": self.state.model().id, "system_fingerprint": self.fingerprint, "choices": choices,
        })
    }

    /// A streamed chunk.
    fn chunk(&self, choices: Value) -> Value {
        let object = match self.endpoint {
            Endpoint::Chat => "chat.completion.chunk",
            Endpoint::Completion => "text_completion",
        };
        self.envelope(object, choices)
    }

    fn choice(&self, index: usize, part: ChoicePart<'_>) -> Value {
        let (text, logprobs, finish) = match &part {
            ChoicePart::Preamble => ("", None, None),
            ChoicePart::Delta(text, lps) => (*text, Some(*lps), None),
            ChoicePart::Finish(reason) => ("", None, Some(*reason)),
            ChoicePart::Whole(c) => {
                (c.text.expose().as_str(), Some(c.logprobs.as_slice()), Some(c.finish.unwrap_or(FinishReason::Stop)))
            }
        };
        let logprobs = match logprobs {
            Some(lps) if self.logprobs => match self.endpoint {
                Endpoint::Chat => chat_logprobs(&self.state, lps),
                Endpoint::Completion => completion_logprobs(&self.state, lps, 0),
            },
            _ => Value::Null,
        };
        let finish_reason = finish.map_or(Value::Null, |r| Value::from(r.as_str()));
        if let Endpoint::Completion = self.endpoint {
            return json!({"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish_reason});
        }
        let (key, message) = match part {
            ChoicePart::Preamble => ("delta", json!({"role": "assistant", "content": "", "refusal": null})),
            ChoicePart::Delta(..) => ("delta", json!({"content": text})),
            ChoicePart::Finish(_) => ("delta", json!({})),
            ChoicePart::Whole(_) => ("message", json!({"role": "assistant", "content": text, "refusal": null})),
        };
        let mut choice = serde_json::Map::new();
        choice.insert("index".into(), index.into());
        choice.insert(key.into(), message);
        choice.insert("logprobs".into(), logprobs);
        choice.insert("finish_reason".into(), finish_reason);
        Value::Object(choice)
    }

    /// The non-streaming response: every choice complete, plus usage.
    fn whole(&self, outputs: &[ChoiceOutput], prompt_tokens: usize) -> Value {
        let completion: usize = outputs.iter().map(|c| c.completion_tokens).sum();
        let cached: usize = outputs.iter().map(|c| c.cached_prompt_tokens).sum();
        let choices: Vec<Value> =
            outputs.iter().enumerate().map(|(i, c)| self.choice(i, ChoicePart::Whole(c))).collect();
        let object = match self.endpoint {
            Endpoint::Chat => "chat.completion",
            Endpoint::Completion => "text_completion",
        };
        let mut v = self.envelope(object, Value::Array(choices));
        v["usage"] = usage(prompt_tokens, completion, cached);
        v
    }

    /// Streams the submitted generation, or waits for it and answers at once.
    async fn respond(
        self,
        state: AppState,
        ctx: Arc<RequestContext>,
        sub: generate::Submitted,
        stream: bool,
        include_usage: bool,
    ) -> Result<Response, ApiError> {
        if stream {
            return Ok(generate::stream_response(state, ctx, sub, self, include_usage));
        }
        let prompt_tokens = sub.prompt_tokens;
        let outputs = generate::collect(&state, &ctx, sub).await?;
        Ok(Json(self.whole(&outputs, prompt_tokens)).into_response())
    }
}

impl ChunkFormat for ResponseBuilder {
    fn preamble(&self, choice: usize) -> Option<Value> {
        match self.endpoint {
            Endpoint::Chat => Some(self.chunk(json!([self.choice(choice, ChoicePart::Preamble)]))),
            Endpoint::Completion => None,
        }
    }
    fn delta(&self, choice: usize, text: &Phi<String>, logprobs: &[TokenLogprob]) -> Value {
        self.chunk(json!([self.choice(choice, ChoicePart::Delta(text.expose(), logprobs))]))
    }
    fn finish(&self, choice: usize, reason: FinishReason) -> Value {
        self.chunk(json!([self.choice(choice, ChoicePart::Finish(reason))]))
    }
    fn usage(&self, prompt: usize, completion: usize, cached: usize) -> Value {
        let mut v = self.chunk(json!([]));
        v["usage"] = usage(prompt, completion, cached);
        v
    }
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(
    State(state): State<AppState>,
    Extension(ctx): Extension<Arc<RequestContext>>,
    source: SourceAddr,
    principal: AuthenticatedPrincipal,
    JsonObject(body): JsonObject,
) -> Result<Response, ApiError> {
    principal.require(Role::Inference)?;
    let req = ValidatedChatRequest::parse(body, state.limits())?;
    check_servable(&state, &req.model)?;
    let prompt = state.codec().encode_chat(&req.messages).map_err(|e| prompt_error(e, "messages", ctx.request_id()))?;
    drop(req.messages);
    let plan = generate::plan(&state, &ctx, &principal, vec![prompt.ids], &req.params)?;
    let subject = InferenceSubject {
        principal: &principal,
        source,
        operation: "chat.completions",
        params: &req.params,
        prompt: &prompt.text,
    };
    let audit = InferenceAudit::start(&state, &ctx, subject).await?;
    drop(prompt.text);
    let sub = plan.submit(&state, &ctx, audit).await?;
    let builder = ResponseBuilder::new(&state, &ctx, Endpoint::Chat, req.params.logprobs);
    builder.respond(state, ctx, sub, req.params.stream, req.params.include_usage).await
}

/// `POST /v1/completions`.
pub async fn completions(
    State(state): State<AppState>,
    Extension(ctx): Extension<Arc<RequestContext>>,
    source: SourceAddr,
    principal: AuthenticatedPrincipal,
    JsonObject(body): JsonObject,
) -> Result<Response, ApiError> {
    principal.require(Role::Inference)?;
    let req = ValidatedCompletionRequest::parse(body, state.limits())?;
    check_servable(&state, &req.model)?;
    let mut prompts = Vec::with_capacity(req.prompts.len());
    for p in &req.prompts {
        prompts.push(state.codec().encode_text(p).map_err(|e| prompt_error(e, "prompt", ctx.request_id()))?);
    }
    // The canonical prompt of the audit HMAC: the prompts concatenated in order.
    let mut canonical = Phi::new(String::new());
    for p in &req.prompts {
        canonical.expose_mut().push_str(p.expose());
    }
    drop(req.prompts);
    let plan = generate::plan(&state, &ctx, &principal, prompts, &req.params)?;
    let subject = InferenceSubject {
        principal: &principal,
        source,
        operation: "completions",
        params: &req.params,
        prompt: &canonical,
    };
    let audit = InferenceAudit::start(&state, &ctx, subject).await?;
    drop(canonical);
    let sub = plan.submit(&state, &ctx, audit).await?;
    let builder = ResponseBuilder::new(&state, &ctx, Endpoint::Completion, req.params.logprobs);
    builder.respond(state, ctx, sub, req.params.stream, req.params.include_usage).await
}
