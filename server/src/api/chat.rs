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

fn check_model(state: &AppState, model: &str) -> Result<(), ApiError> {
    if model == state.model().id {
        Ok(())
    } else {
        Err(ApiError::ModelNotFound)
    }
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

fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

struct ChatChunks {
    state: AppState,
    id: String,
    created: u64,
    fingerprint: String,
    logprobs: bool,
}

impl ChatChunks {
    fn chunk(&self, choices: Value) -> Value {
        json!({
            "id": self.id, "object": "chat.completion.chunk", "created": self.created,
            "model": self.state.model().id, "system_fingerprint": self.fingerprint, "choices": choices,
        })
    }
}

impl ChunkFormat for ChatChunks {
    fn preamble(&self, choice: usize) -> Option<Value> {
        Some(self.chunk(json!([{
            "index": choice, "delta": {"role": "assistant", "content": "", "refusal": null},
            "logprobs": null, "finish_reason": null,
        }])))
    }
    fn delta(&self, choice: usize, text: &Phi<String>, logprobs: &[TokenLogprob]) -> Value {
        let lp = if self.logprobs { chat_logprobs(&self.state, logprobs) } else { Value::Null };
        self.chunk(
            json!([{"index": choice, "delta": {"content": text.expose()}, "logprobs": lp, "finish_reason": null}]),
        )
    }
    fn finish(&self, choice: usize, reason: FinishReason) -> Value {
        self.chunk(json!([{"index": choice, "delta": {}, "logprobs": null, "finish_reason": reason.as_str()}]))
    }
    fn usage(&self, prompt: usize, completion: usize) -> Value {
        let mut v = self.chunk(json!([]));
        v["usage"] = usage(prompt, completion);
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
    check_model(&state, &req.model)?;
    if !state.is_ready() {
        return Err(ApiError::NotReady);
    }
    let prompt = state.codec().encode_chat(&req.messages).map_err(|e| prompt_error(e, "messages", ctx.request_id()))?;
    drop(req.messages);
    let plan = generate::plan(&state, &ctx, vec![prompt.ids], &req.params)?;
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
    let id = format!("chatcmpl-{}", ctx.request_id());
    let created = generate::unix_now();
    let fingerprint = system_fingerprint(&state);
    if req.params.stream {
        let format = ChatChunks { state: state.clone(), id, created, fingerprint, logprobs: req.params.logprobs };
        return Ok(generate::stream_response(state, ctx, sub, format, req.params.include_usage));
    }
    let prompt_tokens = sub.prompt_tokens;
    let outputs = generate::collect(&state, &ctx, sub).await?;
    let completion: usize = outputs.iter().map(|c| c.completion_tokens).sum();
    let choices: Vec<Value> = outputs
        .iter()
        .enumerate()
        .map(|(i, c): (usize, &ChoiceOutput)| {
            json!({
                "index": i,
                "message": {"role": "assistant", "content": c.text.expose(), "refusal": null},
                "logprobs": if req.params.logprobs { chat_logprobs(&state, &c.logprobs) } else { Value::Null },
                "finish_reason": c.finish.unwrap_or(FinishReason::Stop).as_str(),
            })
        })
        .collect();
    Ok(Json(json!({
        "id": id, "object": "chat.completion", "created": created, "model": state.model().id,
        "system_fingerprint": fingerprint, "choices": choices, "usage": usage(prompt_tokens, completion),
    }))
    .into_response())
}

struct CompletionChunks {
    state: AppState,
    id: String,
    created: u64,
    fingerprint: String,
    logprobs: bool,
}

impl CompletionChunks {
    fn chunk(&self, choices: Value) -> Value {
        json!({
            "id": self.id, "object": "text_completion", "created": self.created,
            "model": self.state.model().id, "system_fingerprint": self.fingerprint, "choices": choices,
        })
    }
}

impl ChunkFormat for CompletionChunks {
    fn preamble(&self, _choice: usize) -> Option<Value> {
        None
    }
    fn delta(&self, choice: usize, text: &Phi<String>, logprobs: &[TokenLogprob]) -> Value {
        let lp = if self.logprobs { completion_logprobs(&self.state, logprobs, 0) } else { Value::Null };
        self.chunk(json!([{"text": text.expose(), "index": choice, "logprobs": lp, "finish_reason": null}]))
    }
    fn finish(&self, choice: usize, reason: FinishReason) -> Value {
        self.chunk(json!([{"text": "", "index": choice, "logprobs": null, "finish_reason": reason.as_str()}]))
    }
    fn usage(&self, prompt: usize, completion: usize) -> Value {
        let mut v = self.chunk(json!([]));
        v["usage"] = usage(prompt, completion);
        v
    }
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
    check_model(&state, &req.model)?;
    if !state.is_ready() {
        return Err(ApiError::NotReady);
    }
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
    let plan = generate::plan(&state, &ctx, prompts, &req.params)?;
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
    let id = format!("cmpl-{}", ctx.request_id());
    let created = generate::unix_now();
    let fingerprint = system_fingerprint(&state);
    if req.params.stream {
        let format = CompletionChunks { state: state.clone(), id, created, fingerprint, logprobs: req.params.logprobs };
        return Ok(generate::stream_response(state, ctx, sub, format, req.params.include_usage));
    }
    let prompt_tokens = sub.prompt_tokens;
    let outputs = generate::collect(&state, &ctx, sub).await?;
    let completion: usize = outputs.iter().map(|c| c.completion_tokens).sum();
    let choices: Vec<Value> = outputs
        .iter()
        .enumerate()
        .map(|(i, c)| {
            json!({
                "text": c.text.expose(), "index": i,
                "logprobs": if req.params.logprobs { completion_logprobs(&state, &c.logprobs, 0) } else { Value::Null },
                "finish_reason": c.finish.unwrap_or(FinishReason::Stop).as_str(),
            })
        })
        .collect();
    Ok(Json(json!({
        "id": id, "object": "text_completion", "created": created, "model": state.model().id,
        "system_fingerprint": fingerprint, "choices": choices, "usage": usage(prompt_tokens, completion),
    }))
    .into_response())
}
