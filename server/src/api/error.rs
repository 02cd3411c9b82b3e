//! API errors as OpenAI error objects: `{"error":{"message","type","param","code"}}`.
//!
//! Every message is built from fixed text, numbers and parameter names taken from
//! Salus' own lists — never from the request body, headers or query string — so
//! an error can never echo PHI back or into a log.

use std::borrow::Cow;
use std::time::Duration;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use salus_models::GrammarError;

use crate::engine::EngineError;

/// Everything a request can fail with.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    /// 400: a parameter is missing, has the wrong type or is out of range.
    #[error("{message}")]
    InvalidParam { param: Cow<'static, str>, message: Cow<'static, str> },
    /// 400: the body is not valid JSON (or not UTF-8). Fixed message.
    #[error("malformed JSON body")]
    MalformedJson,
    /// 400: a JSON object in the body has the same key twice (the key is not
    /// echoed).
    #[error("a JSON object in the request body has a duplicate key")]
    DuplicateKey,
    /// 400: the body is not a JSON object.
    #[error("request body must be a JSON object")]
    NotAnObject,
    /// 400: the Content-Type is not application/json.
    #[error("Content-Type must be application/json")]
    ContentType,
    /// 400: a parameter OpenAI defines but Salus does not support.
    #[error("parameter {0} is not supported by this server")]
    Unsupported(&'static str),
    /// 400: a parameter neither OpenAI nor Salus knows. The name is client
    /// data: it is echoed (in the message and `param`) only when it is a
    /// short path of `[A-Za-z0-9_.]` ([`ApiError::unrecognized`]).
    #[error("unrecognized request parameter{}", .0.as_deref().map(|n| format!(" '{n}'")).unwrap_or_default())]
    Unrecognized(Option<String>),
    /// 400: prompt + max_tokens exceed the context window or the prompt limit.
    #[error("this request needs {needed} tokens ({prompt} in the prompt, {completion} for the completion) but the limit is {limit}")]
    /// `param` is the prompt's field: `messages` or `prompt`.
    ContextOverflow { needed: usize, prompt: usize, completion: usize, limit: usize, param: &'static str },
    /// 400: the prompt is longer than the limit, known from its size alone
    /// (it was not tokenized).
    #[error("the prompt is at least {at_least} tokens long but the limit is {limit}")]
    PromptTooLong { at_least: usize, limit: usize, param: &'static str },
    /// 400: the output constraint (`param`: `response_format`,
    /// `structured_outputs` or `guided_json`) is refused: a keyword that cannot
    /// be enforced, an invalid schema, regex or grammar. The message names a
    /// keyword and a JSON pointer, never a value from the constraint.
    #[error("{param}: {error}")]
    Constraint { param: &'static str, error: salus_models::GrammarError },
    /// 400: the constraint is larger than `limits.max_schema_bytes`.
    #[error("{param} is larger than the limit of {limit} bytes")]
    ConstraintTooLarge { param: &'static str, limit: usize },
    /// 400: the constraint did not compile within `limits.grammar_compile_timeout_ms`.
    #[error("{param} did not compile within {ms} ms")]
    ConstraintTimeout { param: &'static str, ms: u64 },
    /// 500: the output constraint failed while generating (its per-token work
    /// budget ran out); the request's choices end with this error.
    #[error("the output constraint could not be continued while generating (request id {request_id})")]
    ConstraintFailed { request_id: String },
    /// 401: missing, unknown, revoked or expired API key (indistinguishable on purpose).
    #[error("invalid or missing API key")]
    Unauthorized,
    /// 401: a bearer JWT was refused; each reason has its own `code`.
    #[error("{0}")]
    Token(crate::auth::oidc::TokenRejection),
    /// 401: the interactive session timed out (idle or absolute), or the
    /// server restarted since the token was issued: sign in again.
    #[error("the session has expired; sign in again")]
    SessionExpired,
    /// 403: the principal lacks a role.
    #[error("this API key lacks the '{role}' role")]
    Forbidden { role: &'static str },
    /// 403: the connection's source address is outside the principal's networks.
    #[error("requests from this network are not allowed for this principal")]
    SourceNotAllowed,
    /// 403: `Salus-Break-Glass` sent by a principal without `break_glass`.
    #[error("this principal may not use break-glass access")]
    BreakGlassNotPermitted,
    /// 429: a per-principal limit (`rule`) is used up.
    #[error("rate limit exceeded ({rule}); retry later")]
    RateLimited { rule: &'static str, retry_after: Duration },
    /// 503: the identity provider's keys cannot be fetched.
    #[error("the identity provider cannot be reached to verify the token; retry later")]
    IdentityProviderUnavailable,
    /// 404: no such model.
    #[error("the requested model does not exist or you do not have access to it")]
    ModelNotFound,
    /// 404: no completed response with this id that the caller may review
    /// (unknown, another principal's, or older than the lookup window: alike).
    #[error("no response with this id can be reviewed by this principal")]
    ReviewTargetNotFound,
    /// 404: no such route.
    #[error("unknown URL")]
    RouteNotFound,
    /// 405: wrong method for the route.
    #[error("method not allowed for this URL")]
    MethodNotAllowed,
    /// 413: body over the configured limit.
    #[error("request body exceeds {limit} bytes")]
    PayloadTooLarge { limit: usize },
    /// 429: the queue is full.
    #[error("the server is at capacity; retry later")]
    QueueFull { retry_after: Duration },
    /// 429: too many failed authentications from this source address.
    #[error("too many failed authentication attempts from this address; retry later")]
    AuthRateLimited { retry_after: Duration },
    /// 503: the model or request path is not ready (or shutting down).
    #[error("the server is not ready to serve requests")]
    NotReady,
    /// 503: the audit trail could not record this request, so it was refused
    /// (fail closed; the model never ran). Generic on purpose.
    #[error("the server cannot serve requests right now; retry later")]
    AuditUnavailable,
    /// 504: the generation ran past `limits.request_timeout_secs` and was stopped.
    #[error("the request ran past the server's time limit and was stopped")]
    Timeout,
    /// 500: anything else; the message carries only the request id.
    #[error("internal server error (request id {request_id})")]
    Internal { request_id: String },
}

impl ApiError {
    /// 400 for an unknown parameter at JSON path `path`, naming it only when
    /// it is at most 64 characters of `[A-Za-z0-9_.]`.
    pub fn unrecognized(path: &str) -> Self {
        let safe = path.len() <= 64
            && !path.is_empty()
            && path.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.');
        ApiError::Unrecognized(safe.then(|| path.to_string()))
    }

    /// 400 naming `param`.
    pub fn invalid(param: impl Into<Cow<'static, str>>, message: impl Into<Cow<'static, str>>) -> Self {
        ApiError::InvalidParam { param: param.into(), message: message.into() }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidParam { .. }
            | ApiError::MalformedJson
            | ApiError::NotAnObject
            | ApiError::DuplicateKey
            | ApiError::ContentType
            | ApiError::Unsupported(_)
            | ApiError::Unrecognized(_)
            | ApiError::ContextOverflow { .. }
            | ApiError::PromptTooLong { .. }
            | ApiError::Constraint { .. }
            | ApiError::ConstraintTooLarge { .. }
            | ApiError::ConstraintTimeout { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized | ApiError::Token(_) | ApiError::SessionExpired => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden { .. } | ApiError::SourceNotAllowed | ApiError::BreakGlassNotPermitted => {
                StatusCode::FORBIDDEN
            }
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::IdentityProviderUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::ModelNotFound | ApiError::RouteNotFound | ApiError::ReviewTargetNotFound => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::QueueFull { .. } | ApiError::AuthRateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::NotReady | ApiError::AuditUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Timeout => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Internal { .. } | ApiError::ConstraintFailed { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn kind(&self) -> &'static str {
        match self.status() {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::FORBIDDEN => "permission_error",
            StatusCode::NOT_FOUND | StatusCode::BAD_REQUEST | StatusCode::PAYLOAD_TOO_LARGE => "invalid_request_error",
            StatusCode::METHOD_NOT_ALLOWED => "invalid_request_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            StatusCode::SERVICE_UNAVAILABLE => "service_unavailable",
            _ => "server_error",
        }
    }

    fn param(&self) -> Option<Cow<'static, str>> {
        match self {
            ApiError::InvalidParam { param, .. } => Some(param.clone()),
            ApiError::Unsupported(p) => Some(Cow::Borrowed(p)),
            ApiError::Unrecognized(Some(name)) => Some(Cow::Owned(name.clone())),
            ApiError::ContextOverflow { param, .. } | ApiError::PromptTooLong { param, .. } => {
                Some(Cow::Borrowed(param))
            }
            ApiError::ModelNotFound => Some(Cow::Borrowed("model")),
            ApiError::ReviewTargetNotFound => Some(Cow::Borrowed("response_id")),
            ApiError::Constraint { param, .. }
            | ApiError::ConstraintTooLarge { param, .. }
            | ApiError::ConstraintTimeout { param, .. } => Some(Cow::Borrowed(param)),
            _ => None,
        }
    }

    pub fn code(&self) -> Option<&'static str> {
        match self {
            ApiError::InvalidParam { .. } => Some("invalid_value"),
            ApiError::MalformedJson | ApiError::NotAnObject | ApiError::ContentType | ApiError::DuplicateKey => {
                Some("invalid_json")
            }
            ApiError::Unsupported(_) => Some("unsupported_parameter"),
            ApiError::Unrecognized(_) => Some("unknown_parameter"),
            ApiError::ContextOverflow { .. } | ApiError::PromptTooLong { .. } => Some("context_length_exceeded"),
            ApiError::Unauthorized => Some("invalid_api_key"),
            ApiError::Token(r) => Some(r.code()),
            ApiError::SessionExpired => Some("session_expired"),
            ApiError::Forbidden { .. } => Some("insufficient_permissions"),
            ApiError::SourceNotAllowed => Some("source_not_allowed"),
            ApiError::BreakGlassNotPermitted => Some("break_glass_not_permitted"),
            ApiError::RateLimited { .. } => Some("rate_limit_exceeded"),
            ApiError::IdentityProviderUnavailable => Some("identity_provider_unavailable"),
            ApiError::ModelNotFound => Some("model_not_found"),
            ApiError::RouteNotFound => Some("unknown_url"),
            ApiError::ReviewTargetNotFound => Some("response_not_found"),
            ApiError::MethodNotAllowed => Some("method_not_allowed"),
            ApiError::PayloadTooLarge { .. } => Some("request_too_large"),
            ApiError::QueueFull { .. } => Some("queue_full"),
            ApiError::AuthRateLimited { .. } => Some("too_many_auth_failures"),
            ApiError::NotReady => Some("not_ready"),
            ApiError::AuditUnavailable => Some("service_unavailable"),
            ApiError::Timeout => Some("request_timeout"),
            ApiError::Constraint { error, .. } => Some(match error {
                GrammarError::UnsupportedKeyword { .. } => "unsupported_schema_keyword",
                GrammarError::UnsupportedFormat { .. } => "unsupported_schema_format",
                GrammarError::InvalidSchema { .. } => "invalid_schema",
                GrammarError::Unsatisfiable => "unsatisfiable_schema",
                GrammarError::InvalidRegex { .. } => "invalid_regex",
                GrammarError::InvalidGrammar => "invalid_grammar",
                GrammarError::InvalidChoice(_) => "invalid_choice",
                GrammarError::TooComplex => "constraint_too_complex",
                GrammarError::Runtime | GrammarError::Tokenizer(_) => "constraint_unavailable",
            }),
            ApiError::ConstraintTooLarge { .. } => Some("schema_too_large"),
            ApiError::ConstraintTimeout { .. } => Some("grammar_compile_timeout"),
            ApiError::ConstraintFailed { .. } => Some("constraint_failed"),
            ApiError::Internal { .. } => None,
        }
    }

    /// The JSON error object.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {
                "message": self.to_string(),
                "type": self.kind(),
                "param": self.param(),
                "code": self.code(),
            }
        })
    }

    /// Maps an engine error; `request_id` goes into internal errors.
    pub fn from_engine(e: &EngineError, request_id: &str) -> Self {
        match e {
            EngineError::QueueFull { retry_after } => ApiError::QueueFull { retry_after: *retry_after },
            EngineError::TooLarge { needed, capacity } => ApiError::ContextOverflow {
                needed: *needed,
                prompt: 0,
                completion: 0,
                limit: *capacity,
                param: "messages",
            },
            EngineError::NotRunning => ApiError::NotReady,
            EngineError::DeadlineExceeded => ApiError::Timeout,
            EngineError::Internal => ApiError::Internal { request_id: request_id.to_string() },
            EngineError::ConstraintFailed => ApiError::ConstraintFailed { request_id: request_id.to_string() },
        }
    }
}

impl ApiError {
    /// The same error naming `param` as the prompt's field (`prompt` on
    /// `/v1/completions`).
    pub fn for_prompt_field(self, field: &'static str) -> Self {
        match self {
            ApiError::ContextOverflow { needed, prompt, completion, limit, .. } => {
                ApiError::ContextOverflow { needed, prompt, completion, limit, param: field }
            }
            ApiError::PromptTooLong { at_least, limit, .. } => {
                ApiError::PromptTooLong { at_least, limit, param: field }
            }
            other => other,
        }
    }

    /// Whether this refuses the caller (not the request): a missing or bad
    /// key, a missing permission, or too many failed attempts. These are
    /// counted and recorded as `auth.denied`.
    pub fn is_denial(&self) -> bool {
        matches!(
            self,
            ApiError::Unauthorized
                | ApiError::Token(_)
                | ApiError::SessionExpired
                | ApiError::Forbidden { .. }
                | ApiError::SourceNotAllowed
                | ApiError::BreakGlassNotPermitted
                | ApiError::RateLimited { .. }
                | ApiError::AuthRateLimited { .. }
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status(), axum::Json(self.body())).into_response();
        if let ApiError::QueueFull { retry_after }
        | ApiError::AuthRateLimited { retry_after }
        | ApiError::RateLimited { retry_after, .. } = &self
        {
            let secs = retry_after.as_secs_f64().ceil().max(1.0) as u64;
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        match &self {
            ApiError::Unauthorized => {
                resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            ApiError::Token(_) | ApiError::SessionExpired => {
                resp.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer error=\"invalid_token\""));
            }
            _ => {}
        }
        resp.extensions_mut().insert(self);
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_types_and_headers() {
        let r = ApiError::QueueFull { retry_after: Duration::from_millis(1500) }.into_response();
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()[header::RETRY_AFTER], "2");
        let b = ApiError::Unsupported("tools").body();
        assert_eq!(b["error"]["param"], "tools");
        assert_eq!(b["error"]["type"], "invalid_request_error");
        let b = ApiError::ModelNotFound.body();
        assert_eq!(b["error"]["code"], "model_not_found");
        let b = ApiError::Internal { request_id: "req-1".into() }.body();
        assert_eq!(b["error"]["message"], "internal server error (request id req-1)");
        assert_eq!(ApiError::Unauthorized.status(), StatusCode::UNAUTHORIZED);
    }
}
