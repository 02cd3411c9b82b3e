//! The JSON bodies of a generation: the OpenAI envelope, choices, logprobs and
//! usage, for `/v1/chat/completions` (`chat.completion`, `chat.completion.chunk`)
//! and `/v1/completions` (`text_completion`). [`ResponseBuilder::whole`] is the
//! non-streaming body; the chunk builders are what [`super::sse`] streams.

use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::error::ApiError;
use super::generation::{ChoiceOutput, Completed, EchoedPrompt, Generation, PromptScores, Usage};
use super::tools::ToolCallDelta;
use crate::engine::TokenLogprob;
use crate::state::{AppState, RequestContext};
use salus_models::Phi;

/// Which endpoint a response belongs to: decides `object` and the shape of a choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completion,
}

impl Endpoint {
    const ALL: [Endpoint; 2] = [Endpoint::Chat, Endpoint::Completion];

    /// The audit record's `operation`.
    pub fn operation(self) -> &'static str {
        match self {
            Endpoint::Chat => "chat.completions",
            Endpoint::Completion => "completions",
        }
    }

    pub fn from_operation(operation: &str) -> Option<Endpoint> {
        Endpoint::ALL.into_iter().find(|e| e.operation() == operation)
    }

    fn id_prefix(self) -> &'static str {
        match self {
            Endpoint::Chat => "chatcmpl-",
            Endpoint::Completion => "cmpl-",
        }
    }

    /// The response `id` of request `request_id`: `chatcmpl-<id>` or `cmpl-<id>`.
    pub fn response_id(self, request_id: &str) -> String {
        format!("{}{request_id}", self.id_prefix())
    }

    /// The endpoint and request id a response `id` was made from.
    pub fn parse_response_id(id: &str) -> Option<(Endpoint, &str)> {
        Endpoint::ALL.into_iter().find_map(|e| id.strip_prefix(e.id_prefix()).map(|rest| (e, rest)))
    }
}

/// One part of one choice, as a streamed chunk carries it or as the whole.
enum ChoicePart<'a> {
    /// The chat role delta sent before any token (streaming).
    Preamble,
    /// New text, its logprobs and the tool calls that became complete (streaming).
    Delta(&'a str, &'a [TokenLogprob], &'a [ToolCallDelta]),
    /// The end of the choice (streaming): OpenAI's `finish_reason`.
    Finish(&'static str),
    /// The complete choice (non-streaming).
    Whole(&'a ChoiceOutput),
}

/// Builds every JSON body of one request: the envelope, the choices and the usage.
pub struct ResponseBuilder {
    state: AppState,
    endpoint: Endpoint,
    id: String,
    created: u64,
    fingerprint: String,
    /// `logprobs`: with this many alternatives per token.
    logprobs: Option<usize>,
    /// vLLM's `prompt_logprobs`: alternatives per prompt token in the reply.
    prompt_logprobs: Option<usize>,
}

impl ResponseBuilder {
    pub fn new(state: &AppState, ctx: &RequestContext, endpoint: Endpoint, logprobs: Option<usize>) -> Self {
        ResponseBuilder {
            state: state.clone(),
            endpoint,
            id: endpoint.response_id(ctx.request_id()),
            created: unix_now(),
            // `system_fingerprint` identifies the exact weights served.
            fingerprint: format!("fp_{}", state.model().fingerprint.chars().take(12).collect::<String>()),
            logprobs,
            prompt_logprobs: None,
        }
    }

    /// Replies carry the prompt's scores with `top` alternatives per token (vLLM's `prompt_logprobs`).
    pub fn with_prompt_logprobs(mut self, top: Option<usize>) -> Self {
        self.prompt_logprobs = top;
        self
    }

    pub fn endpoint(&self) -> Endpoint {
        self.endpoint
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
            ChoicePart::Delta(text, lps, _) => (*text, Some(*lps), None),
            ChoicePart::Finish(reason) => ("", None, Some(*reason)),
            ChoicePart::Whole(c) => {
                (c.content().expose().as_str(), Some(c.logprobs.as_slice()), Some(c.finish_reason()))
            }
        };
        let echo = match &part {
            ChoicePart::Whole(c) => c.echo.as_ref(),
            _ => None,
        };
        let logprobs = match logprobs {
            Some(lps) if self.logprobs.is_some() => match (self.endpoint, &part) {
                (Endpoint::Chat, _) => self.chat_logprobs(lps),
                (Endpoint::Completion, ChoicePart::Whole(c)) => {
                    self.completion_logprobs(echo.zip(c.prompt_scores.as_ref()), lps)
                }
                (Endpoint::Completion, _) => self.completion_logprobs(None, lps),
            },
            _ => Value::Null,
        };
        let finish_reason = finish.map_or(Value::Null, Value::from);
        // `echo`: the text begins with the prompt (completions) or the continued message (chat).
        let echoed;
        let text = match echo {
            Some(e) => {
                echoed = Phi::new(format!("{}{text}", e.text.expose()));
                echoed.expose().as_str()
            }
            None => text,
        };
        if self.endpoint == Endpoint::Completion {
            let mut choice =
                json!({"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish_reason});
            if let (Some(top), ChoicePart::Whole(c)) = (self.prompt_logprobs, &part) {
                choice["prompt_logprobs"] = self.vllm_prompt_logprobs(c, top);
            }
            return choice;
        }
        let (key, message) = match part {
            ChoicePart::Preamble => ("delta", json!({"role": "assistant", "content": "", "refusal": null})),
            ChoicePart::Delta(_, _, calls) if !calls.is_empty() => {
                let mut delta = json!({"tool_calls": calls.iter().map(call_delta_json).collect::<Vec<_>>()});
                if !text.is_empty() {
                    delta["content"] = text.into();
                }
                ("delta", delta)
            }
            ChoicePart::Delta(..) => ("delta", json!({"content": text})),
            ChoicePart::Finish(_) => ("delta", json!({})),
            ChoicePart::Whole(c) if !c.tool_calls.is_empty() => {
                // OpenAI: content is null when the message only calls tools.
                let content = if text.trim().is_empty() { Value::Null } else { text.into() };
                let calls: Vec<Value> = c
                    .tool_calls
                    .iter()
                    .map(|t| {
                        json!({
                            "id": t.id, "type": "function",
                            "function": {"name": t.name, "arguments": t.arguments.expose()},
                        })
                    })
                    .collect();
                ("message", json!({"role": "assistant", "content": content, "refusal": null, "tool_calls": calls}))
            }
            ChoicePart::Whole(_) => ("message", json!({"role": "assistant", "content": text, "refusal": null})),
        };
        let mut choice = serde_json::Map::new();
        choice.insert("index".into(), index.into());
        choice.insert(key.into(), message);
        choice.insert("logprobs".into(), logprobs);
        choice.insert("finish_reason".into(), finish_reason);
        Value::Object(choice)
    }

    fn token_entry(&self, id: u32, logprob: f32) -> Value {
        let text = self.state.codec().token_text(id);
        json!({"token": text.expose(), "logprob": logprob, "bytes": text.expose().as_bytes()})
    }

    fn chat_logprobs(&self, lps: &[TokenLogprob]) -> Value {
        let content: Vec<Value> = lps
            .iter()
            .map(|lp| {
                let mut e = self.token_entry(lp.token_id, lp.logprob);
                e["top_logprobs"] = lp.top.iter().map(|(id, l)| self.token_entry(*id, *l)).collect();
                e
            })
            .collect();
        json!({ "content": content, "refusal": null })
    }

    /// The legacy completions shape; `text_offset` counts bytes from the start
    /// of the part of the choice this object covers. With `echo`, the prompt's
    /// tokens and their scores come first, the first token with `null`
    /// (nothing precedes it).
    fn completion_logprobs(&self, echo: Option<(&EchoedPrompt, &PromptScores)>, lps: &[TokenLogprob]) -> Value {
        let codec = self.state.codec();
        let (mut tokens, mut token_logprobs, mut top, mut offsets) = (vec![], vec![], vec![], vec![]);
        let mut offset = 0;
        let first = echo.and_then(|(e, _)| e.tokens.expose().first().copied());
        if let Some(id) = first {
            let t = codec.token_text(id);
            offsets.push(offset);
            offset += t.expose().len();
            tokens.push(Value::String(t.expose().clone()));
            token_logprobs.push(Value::Null);
            top.push(Value::Null);
        }
        let prompt_scores = echo.map(|(_, s)| s.logprobs.as_slice()).unwrap_or_default();
        // The prompt may have been scored with more alternatives (for `prompt_logprobs`).
        let k = self.logprobs.unwrap_or(0);
        for lp in prompt_scores.iter().chain(lps) {
            let t = codec.token_text(lp.token_id);
            offsets.push(offset);
            offset += t.expose().len();
            tokens.push(Value::String(t.expose().clone()));
            token_logprobs.push(json!(lp.logprob));
            let alternatives: serde_json::Map<String, Value> =
                lp.top.iter().take(k).map(|(id, l)| (codec.token_text(*id).expose().clone(), json!(l))).collect();
            top.push(Value::Object(alternatives));
        }
        json!({"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets})
    }

    /// vLLM's `prompt_logprobs`: one entry per prompt token, `null` for the
    /// first, then `{token id: {logprob, rank, decoded_token}}` for the token
    /// and its `top` most likely alternatives.
    fn vllm_prompt_logprobs(&self, c: &ChoiceOutput, top: usize) -> Value {
        let Some(scores) = &c.prompt_scores else { return Value::Null };
        let codec = self.state.codec();
        let entry = |id: u32, logprob: f32, rank: u32| json!({"logprob": logprob, "rank": rank, "decoded_token": codec.token_text(id).expose()});
        let mut out = Vec::with_capacity(scores.logprobs.len() + 1);
        out.push(Value::Null);
        for (lp, &rank) in scores.logprobs.iter().zip(&scores.ranks) {
            let mut position = serde_json::Map::new();
            position.insert(lp.token_id.to_string(), entry(lp.token_id, lp.logprob, rank));
            for (i, &(id, logprob)) in lp.top.iter().take(top).enumerate() {
                position.entry(id.to_string()).or_insert_with(|| entry(id, logprob, i as u32 + 1));
            }
            out.push(Value::Object(position));
        }
        Value::Array(out)
    }

    /// The non-streaming response: every choice complete, plus usage.
    pub fn whole(&self, done: &Completed) -> Value {
        let choices: Vec<Value> =
            done.choices.iter().enumerate().map(|(i, c)| self.choice(i, ChoicePart::Whole(c))).collect();
        let object = match self.endpoint {
            Endpoint::Chat => "chat.completion",
            Endpoint::Completion => "text_completion",
        };
        let mut v = self.envelope(object, Value::Array(choices));
        if let (Endpoint::Chat, Some(top), Some(first)) = (self.endpoint, self.prompt_logprobs, done.choices.first()) {
            // Chat: one prompt, its scores beside the choices (as vLLM).
            v["prompt_logprobs"] = self.vllm_prompt_logprobs(first, top);
        }
        v["usage"] = usage_json(&done.usage);
        v
    }

    /// The chunk sent before any token of `choice` (chat only: the role delta).
    pub fn preamble_chunk(&self, choice: usize) -> Option<Value> {
        match self.endpoint {
            Endpoint::Chat => Some(self.chunk(json!([self.choice(choice, ChoicePart::Preamble)]))),
            Endpoint::Completion => None,
        }
    }

    /// A content delta (`text` may be empty when only logprobs or calls are new).
    pub fn delta_chunk(&self, choice: usize, text: &str, logprobs: &[TokenLogprob], calls: &[ToolCallDelta]) -> Value {
        self.chunk(json!([self.choice(choice, ChoicePart::Delta(text, logprobs, calls))]))
    }

    /// The chunk carrying `finish_reason`.
    pub fn finish_chunk(&self, choice: usize, reason: &'static str) -> Value {
        self.chunk(json!([self.choice(choice, ChoicePart::Finish(reason))]))
    }

    /// The usage chunk (`choices: []`).
    pub fn usage_chunk(&self, usage: &Usage) -> Value {
        let mut v = self.chunk(json!([]));
        v["usage"] = usage_json(usage);
        v
    }
}

/// A piece of a tool call as OpenAI streams it: `index`, then `id`, `type` and
/// `function.name` in the call's first delta, and `function.arguments`
/// fragments (their concatenation is the message's `arguments`).
fn call_delta_json(c: &ToolCallDelta) -> Value {
    match &c.head {
        Some((id, name)) => json!({
            "index": c.index, "id": id, "type": "function",
            "function": {"name": name, "arguments": c.arguments.expose()},
        }),
        None => json!({"index": c.index, "function": {"arguments": c.arguments.expose()}}),
    }
}

/// OpenAI's usage object.
pub(super) fn usage_json(u: &Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_prompt_tokens},
    })
}

/// The non-streaming consumer: waits for every choice, records the outcome
/// (the output is returned only once `inference.completed` is durable) and
/// answers with the whole body.
pub async fn respond_whole(mut generation: Generation, builder: ResponseBuilder) -> Result<Response, ApiError> {
    generation.run_to_end().await;
    let done = generation.finish().await?;
    Ok(Json(builder.whole(&done)).into_response())
}

/// Unix time now.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}
