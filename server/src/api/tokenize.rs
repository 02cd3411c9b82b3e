//! vLLM's tokenizer endpoints: `POST /tokenize`, `POST /detokenize`,
//! `GET /tokenizer_info`.
//!
//! Evaluation harnesses count and split tokens the way the served model does:
//! lm-evaluation-harness' `local-completions` finds where a loglikelihood
//! request's continuation starts by tokenizing, and with these endpoints it
//! tokenizes through the server (its "remote" tokenizer) instead of
//! downloading the model's tokenizer from a hub a hospital network cannot
//! reach.
//!
//! They need the `inference` permission. The text and the ids are PHI: they go
//! back to the caller who sent them and nowhere else (no log line, no metric
//! label). No model runs and nothing is retained, so no audit record is
//! written; the requests are counted and access-logged like every other.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use salus_models::Phi;
use serde_json::{json, Map, Value};

use super::completions::reject_by_size;
use super::error::ApiError;
use super::json::{Fields, JsonObject};
use crate::auth::{AuthenticatedPrincipal, Permission};
use crate::state::{AppState, PromptError};

/// The body's fields, once the caller may use the model and the body's
/// optional `model` is the served one.
fn read_body(
    state: &AppState,
    principal: &AuthenticatedPrincipal,
    body: Map<String, Value>,
) -> Result<Fields, ApiError> {
    principal.require(Permission::Inference)?;
    let mut f = Fields::new(body);
    match f.string("model")? {
        Some(m) if m != state.model().id => Err(ApiError::ModelNotFound),
        _ => Ok(f),
    }
}

/// `POST /tokenize`: `{"prompt": "…", "add_special_tokens": true}` →
/// `{"count", "max_model_len", "tokens"}`. (vLLM's `messages` form is refused
/// by name: chat prompts are tokenized by the chat endpoint only.)
pub async fn tokenize(
    State(state): State<AppState>,
    principal: AuthenticatedPrincipal,
    JsonObject(body): JsonObject,
) -> Result<Response, ApiError> {
    let mut f = read_body(&state, &principal, body)?;
    let Some(prompt) = f.string("prompt")? else {
        return Err(ApiError::invalid("prompt", "missing required parameter prompt"));
    };
    let add_special_tokens = f.bool("add_special_tokens")?.unwrap_or(true);
    f.finish(&["messages", "add_generation_prompt", "return_token_strs", "chat_template"])?;
    reject_by_size(&state, prompt.len(), state.limits().max_prompt_tokens, "prompt")?;
    let prompt = Phi::new(prompt);
    let ids = state.with_codec_off_runtime(move |codec| codec.tokenize(&prompt, add_special_tokens)).await;
    let ids = match ids {
        Ok(ids) => ids,
        Err(PromptError::Empty) => Phi::new(Vec::new()),
        Err(_) => return Err(ApiError::invalid("prompt", "the prompt could not be tokenized")),
    };
    let tokens = ids.expose();
    let body = json!({"count": tokens.len(), "max_model_len": state.codec().context_length(), "tokens": tokens});
    Ok(Json(body).into_response())
}

/// `POST /detokenize`: `{"tokens": [ids]}` → `{"prompt": "…"}`.
pub async fn detokenize(
    State(state): State<AppState>,
    principal: AuthenticatedPrincipal,
    JsonObject(body): JsonObject,
) -> Result<Response, ApiError> {
    let mut f = read_body(&state, &principal, body)?;
    let bad = || ApiError::invalid("tokens", "tokens must be an array of token ids");
    let Some(Value::Array(items)) = f.take("tokens") else { return Err(bad()) };
    f.finish(&[])?;
    let vocab = state.codec().vocab_size();
    let limit = state.codec().context_length();
    if items.len() > limit {
        return Err(ApiError::invalid("tokens", format!("at most {limit} tokens (the context window)")));
    }
    let mut ids = Vec::with_capacity(items.len());
    for item in &items {
        match item.as_u64() {
            Some(id) if (id as usize) < vocab => ids.push(id as u32),
            Some(_) => return Err(ApiError::invalid("tokens", format!("token ids must be below {vocab}"))),
            None => return Err(bad()),
        }
    }
    let ids = Phi::new(ids);
    let text = state
        .with_codec_off_runtime(move |codec| codec.detokenize(ids.expose()))
        .await
        .map_err(|_| ApiError::invalid("tokens", "the tokens could not be decoded"))?;
    Ok(Json(json!({"prompt": text.expose()})).into_response())
}

/// `GET /tokenizer_info`: the BOS/EOS tokens, the chat template and the
/// context window (model facts, no PHI).
pub async fn tokenizer_info(
    State(state): State<AppState>,
    principal: AuthenticatedPrincipal,
) -> Result<Response, ApiError> {
    principal.require(Permission::Inference)?;
    let info = state.codec().tokenizer_info();
    Ok(Json(json!({
        "bos_token": info.bos_token,
        "eos_token": info.eos_token,
        "pad_token": null,
        "chat_template": info.chat_template,
        "model_max_length": state.codec().context_length(),
    }))
    .into_response())
}
