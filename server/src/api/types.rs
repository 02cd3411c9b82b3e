//! Request validation: OpenAI request JSON → `Validated*Request`.
//!
//! Every field OpenAI defines for the endpoint is either read and checked here or
//! rejected by name (see the `UNSUPPORTED_*` lists); anything else is rejected as
//! unrecognized. Text (messages, prompts, stop strings, `user`) is wrapped in
//! [`Phi`] as soon as it leaves the JSON value.

use salus_models::chat::{ChatMessage, HistoryToolCall, RenderOptions, Role};
use salus_models::sampling::{SamplingParams, MAX_TOP_LOGPROBS};
use salus_models::DecodeParams;
use salus_models::Phi;
use serde_json::Value;

use super::error::ApiError;
use super::json::Fields;
use super::structured::{parse_constraint, RequestedConstraint};
use super::tools::{parse_tools, ValidatedTools};
use crate::config::LimitsConfig;

/// Chat parameters OpenAI defines that Salus does not implement (400 naming them).
pub const UNSUPPORTED_CHAT: &[&str] = &[
    // The deprecated predecessors of `tools` / `tool_choice`.
    "functions",
    "function_call",
    "audio",
    // The served models have no reasoning mode: refused by name, not ignored.
    "reasoning_effort",
    "web_search_options",
    "verbosity",
    "prompt_cache_key",
    "safety_identifier",
];

/// Completion parameters OpenAI defines that Salus does not implement.
pub const UNSUPPORTED_COMPLETION: &[&str] = &["suffix", "best_of"];

/// Parameters shared by both generation endpoints, validated.
#[derive(Debug, Clone)]
pub struct GenerationParams {
    /// The client's `max_tokens` / `max_completion_tokens`, if any (bounded by the config).
    pub max_tokens: Option<usize>,
    pub n: usize,
    /// How each choice is decoded: sampling, stop strings and vLLM's
    /// extensions. Its `max_tokens` is set per prompt at planning, where the
    /// prompt's length is known.
    pub decode: DecodeParams,
    /// vLLM's `truncate_prompt_tokens`: keep only the last this many prompt tokens.
    pub truncate_prompt_tokens: Option<usize>,
    /// Return logprobs of the chosen tokens.
    pub logprobs: bool,
    /// `/v1/completions` `echo`: each choice's text (and, with `logprobs`,
    /// its logprobs) begins with the prompt.
    pub echo: bool,
    /// Score the prompt with this many alternatives per token (`echo` with
    /// `logprobs`, or `prompt_logprobs`).
    pub prompt_logprobs: Option<usize>,
    /// vLLM's `prompt_logprobs`: the response carries the prompt's scores
    /// (token, logprob, rank) with this many alternatives per token.
    pub prompt_logprobs_reply: Option<usize>,
    pub stream: bool,
    pub include_usage: bool,
    /// vLLM's `stream_options.continuous_usage_stats`: usage in every chunk.
    pub continuous_usage: bool,
    /// The client's end-user id (may identify a patient: treated as PHI).
    pub user: Option<Phi<String>>,
    /// The output constraint (structured outputs) as requested; compiled into
    /// `decode.constraint` before the request is audited and submitted.
    pub constraint: Option<RequestedConstraint>,
    /// The names of the tools offered (chat with `tools`; for the audit record).
    pub tools_offered: Vec<String>,
}

/// Most `stop_token_ids` in one request.
pub const MAX_STOP_TOKEN_IDS: usize = 64;

/// vLLM's decoding extensions (benchmark and evaluation harnesses send them),
/// read into `x`.
fn parse_extensions(f: &mut Fields, limits: &LimitsConfig, x: &mut DecodeParams) -> Result<(), ApiError> {
    x.ignore_eos = f.bool("ignore_eos")?.unwrap_or(false);
    x.min_tokens = f.u64_in("min_tokens", 0, limits.max_tokens as u64)?.unwrap_or(0) as usize;
    if let Some(v) = f.take("stop_token_ids") {
        let bad = || ApiError::invalid("stop_token_ids", "stop_token_ids must be an array of token ids");
        let Value::Array(items) = v else { return Err(bad()) };
        if items.len() > MAX_STOP_TOKEN_IDS {
            return Err(ApiError::invalid(
                "stop_token_ids",
                format!("at most {MAX_STOP_TOKEN_IDS} stop_token_ids are allowed"),
            ));
        }
        for item in items {
            let id = item.as_u64().and_then(|n| u32::try_from(n).ok()).ok_or_else(bad)?;
            x.stop_token_ids.push(id);
        }
    }
    x.include_stop_str_in_output = f.bool("include_stop_str_in_output")?.unwrap_or(false);
    // Requests are served in arrival order: only the default priority is honoured.
    if f.i64("priority")?.is_some_and(|p| p != 0) {
        return Err(ApiError::Unsupported("priority"));
    }
    x.skip_special_tokens = f.bool("skip_special_tokens")?.unwrap_or(true);
    // Our detokenizer always joins special tokens without spaces: only the
    // default can be honoured.
    if f.bool("spaces_between_special_tokens")? == Some(false) {
        return Err(ApiError::Unsupported("spaces_between_special_tokens"));
    }
    Ok(())
}

/// OpenAI fields that carry no behaviour on a self-hosted server, checked and
/// dropped: `store` (only `false`: storing completions would put PHI at rest),
/// `metadata` (client data: never logged, stored or labelled), `service_tier`
/// (`auto` / `default`), `modalities` (`["text"]`), `prediction` (there is no
/// speculative path; accepted and ignored).
fn drop_inert_fields(f: &mut Fields) -> Result<(), ApiError> {
    match f.take("store") {
        None | Some(Value::Bool(false)) => {}
        Some(Value::Bool(true)) => return Err(ApiError::Unsupported("store")),
        Some(_) => return Err(ApiError::invalid("store", "store must be a boolean")),
    }
    match f.take("metadata") {
        None | Some(Value::Object(_)) => {}
        Some(_) => return Err(ApiError::invalid("metadata", "metadata must be an object")),
    }
    match f.string("service_tier")?.as_deref() {
        None | Some("auto") | Some("default") => {}
        Some(_) => return Err(ApiError::Unsupported("service_tier")),
    }
    match f.take("modalities") {
        None => {}
        Some(Value::Array(m)) if m.iter().all(|v| v.as_str() == Some("text")) => {}
        Some(_) => return Err(ApiError::Unsupported("modalities")),
    }
    match f.take("prediction") {
        None | Some(Value::Object(_)) => {}
        Some(_) => return Err(ApiError::invalid("prediction", "prediction must be an object")),
    }
    Ok(())
}

/// A `/v1/chat/completions` request that passed validation.
#[derive(Debug)]
pub struct ValidatedChatRequest {
    pub model: String,
    pub messages: Vec<ChatMessage>,
    pub params: GenerationParams,
    /// How the chat template renders this request (with the tools it offers).
    pub template: RenderOptions,
    /// `tools`, `tool_choice`, `parallel_tool_calls`.
    pub tools: Option<ValidatedTools>,
}

/// One prompt of a `/v1/completions` request: text, or token ids (as OpenAI's
/// legacy API and vLLM take them; lm-evaluation-harness sends ids by default).
/// Both are PHI.
#[derive(Debug)]
pub enum CompletionPrompt {
    Text(Phi<String>),
    /// Ids not yet checked against the vocabulary (the handler does that).
    Tokens(Phi<Vec<u32>>),
}

/// A `/v1/completions` request that passed validation.
#[derive(Debug)]
pub struct ValidatedCompletionRequest {
    pub model: String,
    pub prompts: Vec<CompletionPrompt>,
    pub params: GenerationParams,
}

/// A JSON array of token ids (`None` if an item is not an integer id). An
/// item's value never reaches an error message.
fn token_ids(items: &[Value]) -> Option<Vec<u32>> {
    items.iter().map(|v| v.as_u64().and_then(|id| u32::try_from(id).ok())).collect()
}

fn parse_model(f: &mut Fields) -> Result<String, ApiError> {
    match f.required("model")? {
        Value::String(s) => Ok(s),
        _ => Err(ApiError::invalid("model", "model must be a string")),
    }
}

fn parse_stop(f: &mut Fields, limits: &LimitsConfig) -> Result<Vec<Phi<String>>, ApiError> {
    let list = match f.take("stop") {
        None => return Ok(Vec::new()),
        Some(Value::String(s)) => vec![s],
        Some(Value::Array(items)) => {
            let mut out = Vec::with_capacity(items.len());
            for item in items {
                match item {
                    Value::String(s) => out.push(s),
                    _ => return Err(ApiError::invalid("stop", "stop must be a string or an array of strings")),
                }
            }
            out
        }
        Some(_) => return Err(ApiError::invalid("stop", "stop must be a string or an array of strings")),
    };
    if list.len() > limits.max_stop {
        return Err(ApiError::invalid("stop", format!("at most {} stop sequences are allowed", limits.max_stop)));
    }
    let mut out = Vec::with_capacity(list.len());
    for s in list {
        if s.is_empty() || s.len() > 256 {
            return Err(ApiError::invalid("stop", "stop sequences must be 1 to 256 bytes long"));
        }
        out.push(Phi::new(s));
    }
    Ok(out)
}

fn parse_logit_bias(f: &mut Fields) -> Result<Vec<(u32, f32)>, ApiError> {
    let bad = || ApiError::invalid("logit_bias", "logit_bias must map token ids to numbers between -100 and 100");
    let map = match f.take("logit_bias") {
        None => return Ok(Vec::new()),
        Some(Value::Object(m)) => m,
        Some(_) => return Err(bad()),
    };
    if map.len() > 300 {
        return Err(ApiError::invalid("logit_bias", "logit_bias may list at most 300 tokens"));
    }
    let mut out = Vec::with_capacity(map.len());
    for (k, v) in map {
        let id: u32 = k.parse().map_err(|_| bad())?;
        let bias = v.as_f64().filter(|b| b.is_finite() && (-100.0..=100.0).contains(b)).ok_or_else(bad)?;
        out.push((id, bias as f32));
    }
    Ok(out)
}

/// Reads the sampling and limit fields common to both endpoints. `top_logprobs`
/// is set by the caller (the endpoints spell logprobs differently).
fn parse_common(
    f: &mut Fields,
    limits: &LimitsConfig,
    max_tokens_names: &[&'static str],
) -> Result<GenerationParams, ApiError> {
    let mut max_tokens = None;
    for name in max_tokens_names {
        if let Some(v) = f.u64_in(name, 1, limits.max_tokens as u64)? {
            max_tokens = Some(v as usize);
        }
    }
    let n = f.u64_in("n", 1, limits.max_n as u64)?.unwrap_or(1) as usize;
    let stop = parse_stop(f, limits)?;
    let mut sampling = SamplingParams::default();
    if let Some(t) = f.f64_in("temperature", 0.0, 2.0)? {
        sampling.temperature = t as f32;
    }
    if let Some(p) = f.f64_in("top_p", 0.0, 1.0)? {
        if p <= 0.0 {
            return Err(ApiError::invalid("top_p", "top_p must be greater than 0 and at most 1"));
        }
        sampling.top_p = p as f32;
    }
    if let Some(k) = f.u64_in("top_k", 0, 1_000_000)? {
        sampling.top_k = k as usize;
    }
    if let Some(p) = f.f64_in("min_p", 0.0, 1.0)? {
        sampling.min_p = p as f32;
    }
    if let Some(p) = f.f64_in("repetition_penalty", 0.0, 10.0)? {
        if p <= 0.0 {
            return Err(ApiError::invalid("repetition_penalty", "repetition_penalty must be greater than 0"));
        }
        sampling.repetition_penalty = p as f32;
    }
    if let Some(p) = f.f64_in("presence_penalty", -2.0, 2.0)? {
        sampling.presence_penalty = p as f32;
    }
    if let Some(p) = f.f64_in("frequency_penalty", -2.0, 2.0)? {
        sampling.frequency_penalty = p as f32;
    }
    sampling.seed = f.i64("seed")?.map(|s| s as u64);
    sampling.logit_bias = parse_logit_bias(f)?;
    let stream = f.bool("stream")?.unwrap_or(false);
    let (mut include_usage, mut continuous_usage) = (false, false);
    if let Some(mut so) = f.object("stream_options")? {
        include_usage = so.bool("include_usage")?.unwrap_or(false);
        continuous_usage = so.bool("continuous_usage_stats")?.unwrap_or(false);
        so.finish(&[])?;
        if !stream {
            return Err(ApiError::invalid("stream_options", "stream_options is only allowed when stream is true"));
        }
    }
    let user = f.string("user")?.map(Phi::new);
    let mut decode = DecodeParams { sampling, stop_strings: stop, max_tokens: 0, ..DecodeParams::default() };
    parse_extensions(f, limits, &mut decode)?;
    if max_tokens.is_some_and(|max| decode.min_tokens > max) {
        return Err(ApiError::invalid("min_tokens", "min_tokens must not exceed max_tokens"));
    }
    let truncate_prompt_tokens = f.u64_in("truncate_prompt_tokens", 1, u32::MAX as u64)?.map(|n| n as usize);
    let prompt_logprobs_reply = f.u64_in("prompt_logprobs", 0, MAX_TOP_LOGPROBS as u64)?.map(|k| k as usize);
    if prompt_logprobs_reply.is_some() && stream {
        return Err(ApiError::invalid("prompt_logprobs", "prompt_logprobs cannot be combined with stream"));
    }
    drop_inert_fields(f)?;
    let constraint = parse_constraint(f, limits)?;
    Ok(GenerationParams {
        max_tokens,
        n,
        decode,
        truncate_prompt_tokens,
        logprobs: false,
        echo: false,
        prompt_logprobs: prompt_logprobs_reply,
        prompt_logprobs_reply,
        stream,
        include_usage,
        continuous_usage,
        user,
        constraint,
        tools_offered: Vec::new(),
    })
}

fn parse_content(v: Value, i: usize) -> Result<String, ApiError> {
    let param = || format!("messages[{i}].content");
    match v {
        Value::String(s) => Ok(s),
        Value::Array(parts) => {
            let mut text = String::new();
            for part in parts {
                let Value::Object(m) = part else {
                    return Err(ApiError::invalid(param(), format!("{} parts must be objects", param())));
                };
                let mut pf = Fields::nested(m, param());
                match pf.string("type")?.as_deref() {
                    Some("text") => {}
                    _ => {
                        return Err(ApiError::invalid(
                            param(),
                            format!("{}: only parts of type \"text\" are supported", param()),
                        ))
                    }
                }
                let t = pf
                    .string("text")?
                    .ok_or_else(|| ApiError::invalid(param(), format!("{} text part has no text", param())))?;
                pf.finish(&[])?;
                text.push_str(&t);
            }
            Ok(text)
        }
        _ => Err(ApiError::invalid(param(), format!("{} must be a string or an array of text parts", param()))),
    }
}

/// Most tool calls in one assistant message of the history.
const MAX_HISTORY_CALLS: usize = 128;

/// A tool-call id of the history: an identifier (they come back in tool
/// messages and are compared, never logged).
fn valid_call_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-.:".contains(&b))
}

/// `messages[i].tool_calls` of an assistant message.
fn parse_history_calls(v: Value, i: usize) -> Result<Vec<HistoryToolCall>, ApiError> {
    let param = format!("messages[{i}].tool_calls");
    let bad = |what: &str| ApiError::invalid(param.clone(), format!("{param}: {what}"));
    let Value::Array(items) = v else { return Err(bad("must be an array")) };
    if items.len() > MAX_HISTORY_CALLS {
        return Err(bad("too many calls"));
    }
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let Value::Object(m) = item else { return Err(bad("each call must be an object")) };
        let mut cf = Fields::nested(m, param.clone());
        let id = cf.string("id")?.unwrap_or_default();
        if !valid_call_id(&id) {
            return Err(bad("each call needs an id of at most 128 letters, digits, _ - . :"));
        }
        if cf.string("type")?.as_deref().unwrap_or("function") != "function" {
            return Err(bad("the type of a call must be function"));
        }
        let Some(mut func) = cf.object("function")? else { return Err(bad("each call needs a function")) };
        let name = func.string("name")?.unwrap_or_default();
        if name.is_empty()
            || name.len() > 64
            || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(bad("a function name must be 1 to 64 characters of a-z, A-Z, 0-9, _ and -"));
        }
        let arguments = func.string("arguments")?.unwrap_or_else(|| "{}".into());
        func.finish(&[])?;
        // A streamed call's position, as some clients keep it when they send
        // the message back: meaningless here.
        cf.take("index");
        cf.finish(&[])?;
        out.push(HistoryToolCall { id, name, arguments: Phi::new(arguments) });
    }
    Ok(out)
}

fn parse_messages(v: Value, limits: &LimitsConfig) -> Result<Vec<ChatMessage>, ApiError> {
    let Value::Array(items) = v else {
        return Err(ApiError::invalid("messages", "messages must be an array"));
    };
    if items.is_empty() {
        return Err(ApiError::invalid("messages", "messages must contain at least one message"));
    }
    if items.len() > limits.max_messages {
        return Err(ApiError::invalid("messages", format!("at most {} messages are allowed", limits.max_messages)));
    }
    let mut out: Vec<ChatMessage> = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let Value::Object(m) = item else {
            return Err(ApiError::invalid(format!("messages[{i}]"), format!("messages[{i}] must be an object")));
        };
        let mut mf = Fields::nested(m, format!("messages[{i}]"));
        let role = match mf.string("role")?.as_deref() {
            Some("system") | Some("developer") => Role::System,
            Some("user") => Role::User,
            Some("assistant") => Role::Assistant,
            Some("tool") => Role::Tool,
            Some("function") => return Err(ApiError::Unsupported("functions")),
            _ => {
                return Err(ApiError::invalid(
                    format!("messages[{i}].role"),
                    format!("messages[{i}].role must be system, developer, user, assistant or tool"),
                ))
            }
        };
        let tool_calls = match mf.take("tool_calls") {
            Some(v) if role == Role::Assistant => parse_history_calls(v, i)?,
            Some(_) => {
                return Err(ApiError::invalid(
                    format!("messages[{i}].tool_calls"),
                    format!("messages[{i}].tool_calls is only allowed in assistant messages"),
                ))
            }
            None => Vec::new(),
        };
        let tool_call_id = match (role, mf.string("tool_call_id")?) {
            (Role::Tool, Some(id)) => {
                // It must answer a call made earlier in the conversation.
                let known = out.iter().flat_map(|m| m.tool_calls.iter()).any(|c| c.id == id);
                if !known {
                    return Err(ApiError::invalid(
                        format!("messages[{i}].tool_call_id"),
                        format!("messages[{i}].tool_call_id matches no tool call of an earlier assistant message"),
                    ));
                }
                Some(id)
            }
            (Role::Tool, None) => {
                return Err(ApiError::invalid(
                    format!("messages[{i}].tool_call_id"),
                    format!("messages[{i}].tool_call_id is required in tool messages"),
                ))
            }
            (_, Some(_)) => {
                return Err(ApiError::invalid(
                    format!("messages[{i}].tool_call_id"),
                    format!("messages[{i}].tool_call_id is only allowed in tool messages"),
                ))
            }
            (_, None) => None,
        };
        let content = match mf.take("content") {
            Some(v) => parse_content(v, i)?,
            // An assistant message that only calls tools has no content.
            None if !tool_calls.is_empty() => String::new(),
            None => {
                return Err(ApiError::invalid(
                    format!("messages[{i}].content"),
                    format!("messages[{i}].content is required"),
                ))
            }
        };
        mf.finish(&["name", "function_call", "refusal", "audio"]).map_err(|e| match e {
            ApiError::Unsupported("function_call") => ApiError::Unsupported("functions"),
            ApiError::Unsupported(_) | ApiError::Unrecognized(_) => ApiError::invalid(
                format!("messages[{i}]"),
                format!("messages[{i}] may only contain role, content, tool_calls and tool_call_id"),
            ),
            other => other,
        })?;
        out.push(ChatMessage { role, content: Phi::new(content), tool_calls, tool_call_id });
    }
    Ok(out)
}

impl ValidatedChatRequest {
    pub fn parse(body: serde_json::Map<String, Value>, limits: &LimitsConfig) -> Result<Self, ApiError> {
        let mut f = Fields::new(body);
        let model = parse_model(&mut f)?;
        let messages = parse_messages(f.required("messages")?, limits)?;
        let mut params = parse_common(&mut f, limits, &["max_tokens", "max_completion_tokens"])?;
        let logprobs = f.bool("logprobs")?.unwrap_or(false);
        let top = f.u64_in("top_logprobs", 0, MAX_TOP_LOGPROBS as u64)?;
        if top.is_some() && !logprobs {
            return Err(ApiError::invalid("top_logprobs", "top_logprobs requires logprobs to be true"));
        }
        params.logprobs = logprobs;
        if logprobs {
            params.decode.sampling.top_logprobs = Some(top.unwrap_or(0) as usize);
        }
        // vLLM's chat `echo`: the reply begins with the last message when it
        // is the assistant's (a continued message).
        if f.bool("echo")?.unwrap_or(false) {
            if params.stream {
                return Err(ApiError::invalid("echo", "echo cannot be combined with stream"));
            }
            params.echo = true;
        }
        let mut template = parse_template_options(&mut f)?;
        let tools = parse_tools(&mut f)?;
        if let Some(t) = &tools {
            template.tools = t.for_template();
            params.tools_offered = t.names();
        }
        f.finish(UNSUPPORTED_CHAT)?;
        Ok(ValidatedChatRequest { model, messages, params, template, tools })
    }
}

/// Most `chat_template_kwargs` entries.
pub const MAX_TEMPLATE_KWARGS: usize = 32;

/// vLLM's chat-template options: `add_generation_prompt`,
/// `continue_final_message`, `chat_template_kwargs` (names are identifiers
/// and cannot be the variables Salus itself sets).
fn parse_template_options(f: &mut Fields) -> Result<RenderOptions, ApiError> {
    let mut opts = RenderOptions {
        add_generation_prompt: f.bool("add_generation_prompt")?.unwrap_or(true),
        continue_final_message: f.bool("continue_final_message")?.unwrap_or(false),
        ..RenderOptions::default()
    };
    if opts.continue_final_message && opts.add_generation_prompt {
        // vLLM's rule: an open final message and a new assistant turn exclude each other.
        let given = f.param("add_generation_prompt");
        return Err(ApiError::invalid(given, "set add_generation_prompt to false with continue_final_message"));
    }
    if let Some(v) = f.take("chat_template_kwargs") {
        let Value::Object(map) = v else {
            return Err(ApiError::invalid("chat_template_kwargs", "chat_template_kwargs must be an object"));
        };
        if map.len() > MAX_TEMPLATE_KWARGS {
            return Err(ApiError::invalid(
                "chat_template_kwargs",
                format!("chat_template_kwargs may hold at most {MAX_TEMPLATE_KWARGS} entries"),
            ));
        }
        const RESERVED: [&str; 5] = ["messages", "add_generation_prompt", "bos_token", "eos_token", "tools"];
        for (k, v) in map {
            let identifier = !k.is_empty()
                && k.len() <= 64
                && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                && !RESERVED.contains(&k.as_str());
            if !identifier {
                return Err(ApiError::invalid(
                    "chat_template_kwargs",
                    "chat_template_kwargs names must be identifiers other than messages, add_generation_prompt, bos_token, eos_token and tools",
                ));
            }
            opts.kwargs.0.insert(k, v);
        }
    }
    Ok(opts)
}

impl ValidatedCompletionRequest {
    pub fn parse(body: serde_json::Map<String, Value>, limits: &LimitsConfig) -> Result<Self, ApiError> {
        let mut f = Fields::new(body);
        let model = parse_model(&mut f)?;
        let bad_prompt = || {
            ApiError::invalid(
                "prompt",
                "prompt must be a string, an array of strings, an array of token ids or an array of such arrays",
            )
        };
        let too_many =
            || ApiError::invalid("prompt", format!("prompt arrays must hold 1 to {} prompts", limits.max_prompts));
        let tokens = |items: &[Value]| match token_ids(items) {
            Some(ids) if !ids.is_empty() => Ok(CompletionPrompt::Tokens(Phi::new(ids))),
            Some(_) => Err(ApiError::invalid("prompt", "a prompt of token ids must hold at least one id")),
            None => Err(bad_prompt()),
        };
        let prompts = match f.required("prompt")? {
            Value::String(s) => vec![CompletionPrompt::Text(Phi::new(s))],
            // One prompt of token ids.
            Value::Array(items) if items.first().is_some_and(Value::is_number) => vec![tokens(&items)?],
            Value::Array(items) => {
                if items.is_empty() || items.len() > limits.max_prompts {
                    return Err(too_many());
                }
                let mut out = Vec::with_capacity(items.len());
                for item in items {
                    match item {
                        Value::String(s) => out.push(CompletionPrompt::Text(Phi::new(s))),
                        Value::Array(ids) => out.push(tokens(&ids)?),
                        _ => return Err(bad_prompt()),
                    }
                }
                out
            }
            _ => return Err(bad_prompt()),
        };
        let echo = f.bool("echo")?.unwrap_or(false);
        // `echo` with `max_tokens: 0` scores the prompt and generates nothing
        // (lm-evaluation-harness' loglikelihood requests, vLLM); without echo a
        // request must generate at least one token.
        let zero_max_tokens = echo && f.peek_u64("max_tokens") == Some(0);
        if zero_max_tokens {
            f.take("max_tokens");
        }
        let mut params = parse_common(&mut f, limits, &["max_tokens"])?;
        if zero_max_tokens {
            params.max_tokens = Some(0);
        }
        if let Some(k) = f.u64_in("logprobs", 0, 5)? {
            params.logprobs = true;
            params.decode.sampling.top_logprobs = Some(k as usize);
        }
        if echo {
            if params.stream {
                return Err(ApiError::invalid("echo", "echo cannot be combined with stream"));
            }
            if params.decode.constraint.is_some() || params.constraint.is_some() {
                return Err(ApiError::invalid("echo", "echo cannot be combined with an output constraint"));
            }
            if params.truncate_prompt_tokens.is_some() {
                return Err(ApiError::invalid("echo", "echo cannot be combined with truncate_prompt_tokens"));
            }
            params.echo = true;
            let echoed = params.decode.sampling.top_logprobs.filter(|_| params.logprobs);
            params.prompt_logprobs = params.prompt_logprobs.max(echoed);
        }
        match f.take("suffix") {
            None => {}
            Some(Value::String(s)) if s.is_empty() => {}
            Some(_) => return Err(ApiError::Unsupported("suffix")),
        }
        if let Some(b) = f.take("best_of") {
            if b.as_u64() != Some(1) {
                return Err(ApiError::Unsupported("best_of"));
            }
        }
        f.finish(UNSUPPORTED_COMPLETION)?;
        Ok(ValidatedCompletionRequest { model, prompts, params })
    }
}
