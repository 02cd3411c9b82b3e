//! `POST /v1/chat/completions` and `POST /v1/completions`: validate, encode the
//! prompt, plan, make `inference.started` durable, submit, and hand the
//! [`Generation`](super::generation::Generation) to one of its two consumers
//! (the whole JSON body or the SSE stream).

use std::sync::Arc;

use axum::extract::{Extension, State};
use axum::response::Response;
use salus_models::chat::Role;
use salus_models::Phi;

use super::error::ApiError;
use super::generation::{self, EchoedPrompt, Generation, ToolCallMode};
use super::inference_audit::{InferenceAudit, InferenceSubject, SourceAddr};
use super::json::JsonObject;
use super::response::{respond_whole, Endpoint, ResponseBuilder};
use super::sse::{respond_stream, StreamUsage};
use super::structured::compile_requested;
use super::types::{CompletionPrompt, GenerationParams, ValidatedChatRequest, ValidatedCompletionRequest};
use crate::auth::policy::InferenceSlot;
use crate::auth::AuthenticatedPrincipal;
use crate::state::{AppState, PromptError, RequestContext};

fn prompt_error(e: PromptError, param: &'static str, request_id: &str) -> ApiError {
    match e {
        PromptError::Template | PromptError::Empty => ApiError::invalid(param, e.to_string()),
        PromptError::Tokenizer => {
            tracing::error!(request_id, "tokenizer failed");
            ApiError::Internal { request_id: request_id.to_string() }
        }
    }
}

/// Tool-call markers of the supported formats (special tokens in some vocabularies).
const MARKERS: [&str; 4] = ["[TOOL_CALLS]", "<tool_call>", "</tool_call>", "<|python_tag|>"];

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

/// Rejects a prompt of `bytes` bytes that cannot fit the prompt limit, from
/// its size alone (a token stands for at most `max_bytes_per_token` bytes),
/// so an oversized prompt costs no tokenization.
fn check_prompt_size(state: &AppState, params: &GenerationParams, bytes: usize) -> Result<(), ApiError> {
    if params.truncate_prompt_tokens.is_some() {
        // Left-truncated after tokenizing: its size says nothing yet.
        return Ok(());
    }
    let limit = state.limits().max_prompt_tokens.min(state.codec().context_length().saturating_sub(1));
    reject_by_size(state, bytes, limit, "messages")
}

/// Refuses a text of `bytes` bytes that is sure to be more than `limit`
/// tokens (a token stands for at most `max_bytes_per_token` bytes), before
/// any tokenizing.
pub(super) fn reject_by_size(
    state: &AppState,
    bytes: usize,
    limit: usize,
    param: &'static str,
) -> Result<(), ApiError> {
    let at_least = bytes.div_ceil(state.codec().max_bytes_per_token().max(1));
    if at_least > limit {
        return Err(ApiError::PromptTooLong { at_least, limit, param });
    }
    Ok(())
}

/// Who asks: what both endpoints share once their prompts are encoded.
struct Inference<'a> {
    state: &'a AppState,
    ctx: &'a Arc<RequestContext>,
    principal: &'a AuthenticatedPrincipal,
    source: SourceAddr,
    /// The principal's concurrency slot and token meter for this request.
    slot: InferenceSlot,
}

impl Inference<'_> {
    /// Plans the prompts, records `inference.started` with the HMAC of the
    /// canonical prompt (then dropped), submits, and answers.
    async fn run(
        self,
        endpoint: Endpoint,
        params: &GenerationParams,
        prompts: Vec<Phi<Vec<u32>>>,
        canonical_prompt: Phi<String>,
        tool_calls: Option<ToolCallMode>,
        echo_texts: Option<Vec<Phi<String>>>,
    ) -> Result<Response, ApiError> {
        // `echo`: each prompt's text and token ids.
        let echoed: Option<Vec<EchoedPrompt>> = echo_texts.map(|texts| {
            texts.into_iter().zip(prompts.iter().cloned()).map(|(text, tokens)| EchoedPrompt { text, tokens }).collect()
        });
        let plan = generation::plan(self.state, self.ctx, self.principal, prompts, params)?;
        self.slot.charge(plan.prompt_tokens());
        let subject = InferenceSubject {
            principal: self.principal,
            source: self.source,
            operation: endpoint.operation(),
            params,
            prompt: &canonical_prompt,
        };
        let audit = InferenceAudit::start(self.state, self.ctx, subject).await?;
        drop(canonical_prompt);
        let mut generation: Generation = plan.submit(self.state, self.ctx, audit).await?.with_slot(self.slot);
        if let Some(mode) = tool_calls {
            generation = generation.with_tool_calls(mode);
        }
        if let Some(prompts) = echoed {
            generation = generation.with_echo(prompts, params.n);
        }
        let top = params.decode.sampling.top_logprobs.unwrap_or(0);
        let builder = ResponseBuilder::new(self.state, self.ctx, endpoint, params.logprobs.then_some(top))
            .with_prompt_logprobs(params.prompt_logprobs_reply);
        if params.stream {
            let usage = StreamUsage { include: params.include_usage, continuous: params.continuous_usage };
            Ok(respond_stream(generation, builder, usage))
        } else {
            respond_whole(generation, builder).await
        }
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
    let slot = state.access().admit_inference(&principal, state.audit(), state.metrics(), ctx.request_id()).await?;
    let ValidatedChatRequest { model, messages, mut params, template, tools } =
        ValidatedChatRequest::parse(body, state.limits())?;
    check_servable(&state, &model)?;
    let tool_calls = match tools.as_ref().filter(|t| t.may_call()) {
        Some(t) => {
            let format = state.codec().tool_format().ok_or_else(|| {
                ApiError::invalid(
                    "tools",
                    "this model's chat template writes tool calls in a format Salus does not parse (set model.tool_parser)",
                )
            })?;
            // Markers that are special tokens must be allowed by id, and kept in
            // the decoded text for the parser to see.
            let specials: Vec<(&str, u32)> =
                MARKERS.iter().filter_map(|m| state.codec().special_token_id(m).map(|id| (*m, id))).collect();
            if !specials.is_empty() {
                params.decode.skip_special_tokens = false;
            }
            let calls_only = t.calls_only();
            if calls_only && params.constraint.is_some() {
                return Err(ApiError::invalid(
                    "tool_choice",
                    "tool_choice required or a named function cannot be combined with an output constraint",
                ));
            }
            // `auto` with an output constraint: that one applies, and calls are
            // parsed from its output.
            let follows_grammar = params.constraint.is_none();
            if follows_grammar {
                params.constraint = t.constraint(format, &specials);
            }
            Some(ToolCallMode { format, parallel: t.parallel, calls_only, follows_grammar })
        }
        None => None,
    };
    compile_requested(&state, &principal, &mut params).await?;
    check_prompt_size(&state, &params, messages.iter().map(|m| m.content.expose().len()).sum())?;
    // `echo`: the last message, when it is the assistant's (the reply continues it).
    let echoed = messages.last().filter(|m| m.role == Role::Assistant).map(|m| m.content.clone());
    let prompt = state
        .with_codec_off_runtime(move |codec| codec.encode_chat(&messages, &template))
        .await
        .map_err(|e| prompt_error(e, "messages", ctx.request_id()))?;
    // The canonical prompt of the audit HMAC: the text after the chat template.
    let inference = Inference { state: &state, ctx: &ctx, principal: &principal, source, slot };
    let echo = echoed.filter(|_| params.echo).map(|text| vec![text]);
    inference.run(Endpoint::Chat, &params, vec![prompt.ids], prompt.text, tool_calls, echo).await
}

/// `POST /v1/completions`.
pub async fn completions(
    State(state): State<AppState>,
    Extension(ctx): Extension<Arc<RequestContext>>,
    source: SourceAddr,
    principal: AuthenticatedPrincipal,
    JsonObject(body): JsonObject,
) -> Result<Response, ApiError> {
    let slot = state.access().admit_inference(&principal, state.audit(), state.metrics(), ctx.request_id()).await?;
    let ValidatedCompletionRequest { model, prompts, mut params } =
        ValidatedCompletionRequest::parse(body, state.limits())?;
    check_servable(&state, &model)?;
    compile_requested(&state, &principal, &mut params).await?;
    let vocab = state.codec().vocab_size();
    for p in &prompts {
        match p {
            CompletionPrompt::Text(text) => {
                check_prompt_size(&state, &params, text.expose().len()).map_err(|e| e.for_prompt_field("prompt"))?
            }
            CompletionPrompt::Tokens(ids) => {
                if ids.expose().iter().any(|&id| id as usize >= vocab) {
                    return Err(ApiError::invalid(
                        "prompt",
                        format!("token ids must be below the vocabulary size {vocab}"),
                    ));
                }
            }
        }
    }
    // Each prompt's text and ids, off the async workers: text prompts are
    // tokenized, token prompts decoded (for the audit HMAC and `echo`).
    let encoded: Vec<(Phi<String>, Phi<Vec<u32>>)> = state
        .with_codec_off_runtime(move |codec| {
            prompts
                .into_iter()
                .map(|p| match p {
                    CompletionPrompt::Text(text) => codec.tokenize(&text, true).map(|ids| (text, ids)),
                    CompletionPrompt::Tokens(ids) => codec.detokenize(ids.expose()).map(|text| (text, ids)),
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .await
        .map_err(|e| prompt_error(e, "prompt", ctx.request_id()))?;
    // The canonical prompt of the audit HMAC: the prompts' texts concatenated in order.
    let mut canonical = Phi::new(String::new());
    for (text, _) in &encoded {
        canonical.expose_mut().push_str(text.expose());
    }
    let (texts, prompts): (Vec<_>, Vec<_>) = encoded.into_iter().unzip();
    let echo_texts = params.echo.then_some(texts);
    let inference = Inference { state: &state, ctx: &ctx, principal: &principal, source, slot };
    // Length errors name this endpoint's prompt field.
    inference
        .run(Endpoint::Completion, &params, prompts, canonical, None, echo_texts)
        .await
        .map_err(|e| e.for_prompt_field("prompt"))
}
