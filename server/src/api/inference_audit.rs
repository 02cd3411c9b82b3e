//! The audit trail of one inference: `inference.started` before the engine sees
//! the prompt, then exactly one of `inference.completed` / `failed` /
//! `cancelled`.
//!
//! # Fail closed
//!
//! [`InferenceAudit::start`] returns only once `inference.started` is durable; if
//! it cannot be written the request gets 503 ([`ApiError::AuditUnavailable`])
//! and is never submitted to the engine. A non-streaming response is returned
//! only after `inference.completed` is durable; if that record fails the output
//! is withheld (500). A streaming response has already sent its tokens when it
//! ends: a failed completion record is logged with the request id, the stream
//! ends with an error event instead of `[DONE]`, and `/ready` turns unhealthy
//! (the audit log marks itself so).
//!
//! If the handler is dropped before an outcome was recorded (the client went
//! away mid-generation: axum drops a non-streaming handler, a streaming task
//! returns), [`Drop`] records `inference.cancelled` in the background.
//!
//! # Canonical texts of the HMACs
//!
//! The trail never holds prompt or completion text, only
//! `HMAC-SHA256(audit HMAC key, bytes)` of these canonical byte strings, so that
//! an auditor holding the key can test a given text with `salus audit hash --text -`
//! (stdin is hashed byte for byte):
//!
//! * `prompt_hmac`, chat: the UTF-8 prompt text *after the model's chat template*
//!   (with the generation prompt appended), exactly what is tokenized for the
//!   model. `salus audit hash --chat-model PATH` renders stdin as one user message
//!   with that model's template before hashing.
//! * `prompt_hmac`, completions: the UTF-8 prompt as sent; a request with several
//!   prompts hashes their concatenation in request order (no separator).
//! * `completion_hmac`: the concatenation of every choice's full text in choice
//!   index order (no separator), UTF-8 — for `n = 1` simply the completion text.
//!   For a failed or cancelled generation no completion HMAC is recorded.
//! * `params.constraint_hmac`: the output constraint's canonical text
//!   (`salus_models::ConstraintSpec::canonical_text`): a JSON schema's JSON
//!   text as received (member order kept; a `whitespace_pattern` follows after
//!   a newline), a regex's or grammar's text, the JSON array of the choices.
//!   `params.constraint` names its kind.

use std::net::SocketAddr;
use std::time::Instant;

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use salus_models::Phi;

use super::error::ApiError;
use super::types::GenerationParams;
use crate::auth::AuthenticatedPrincipal;
use crate::state::{AppState, RequestContext};
use crate::telemetry::TracePhase;
use salus_audit::{AuditEvent, AuditLog, EventKind, InferenceParams, TextHmac};

/// The peer address of the connection (absent for in-process requests).
#[derive(Debug, Clone, Copy)]
pub struct SourceAddr(pub Option<SocketAddr>);

impl<S: Send + Sync> FromRequestParts<S> for SourceAddr {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(SourceAddr(parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0)))
    }
}

/// The non-PHI parameters of a request (stop strings only counted).
pub fn audit_params(p: &GenerationParams) -> InferenceParams {
    let s = &p.decode.sampling;
    InferenceParams {
        temperature: Some(s.temperature),
        top_p: Some(s.top_p),
        top_k: (s.top_k > 0).then_some(s.top_k as u32),
        max_tokens: p.max_tokens.map(|m| m.min(u32::MAX as usize) as u32),
        n: Some(p.n as u32),
        stream: Some(p.stream),
        seed: s.seed,
        presence_penalty: (s.presence_penalty != 0.0).then_some(s.presence_penalty),
        frequency_penalty: (s.frequency_penalty != 0.0).then_some(s.frequency_penalty),
        repetition_penalty: (s.repetition_penalty != 1.0).then_some(s.repetition_penalty),
        stop_sequences: (!p.decode.stop_strings.is_empty()).then_some(p.decode.stop_strings.len() as u32),
        ..InferenceParams::default()
    }
}

/// [`audit_params`] plus the output constraint: its kind and the HMAC of its
/// canonical text (see `ConstraintSpec::canonical_text`).
fn audit_params_with_constraint(log: &AuditLog, p: &GenerationParams) -> InferenceParams {
    let mut params = audit_params(p);
    if !p.tools_offered.is_empty() {
        params.tools_offered = Some(p.tools_offered.clone());
    }
    if let Some(c) = &p.constraint {
        params.constraint = Some(c.spec.kind().as_str().to_string());
        params.constraint_hmac = Some(log.hmac(&c.spec.canonical_text()).as_str().to_string());
    }
    params
}

/// What an inference request is, for its audit records.
pub struct InferenceSubject<'a> {
    pub principal: &'a AuthenticatedPrincipal,
    pub source: SourceAddr,
    /// `"chat.completions"` or `"completions"`.
    pub operation: &'static str,
    pub params: &'a GenerationParams,
    /// The canonical prompt bytes (see the module doc).
    pub prompt: &'a Phi<String>,
}

/// The open audit transaction of one inference. Records exactly one outcome.
pub struct InferenceAudit {
    log: AuditLog,
    base: AuditEvent,
    started: Instant,
    done: bool,
    /// Where a completion is entered for review.
    reviews: std::sync::Arc<crate::reviews::ReviewIndex>,
}

/// Writes `ev` and waits until it is durable, timing the write in the request's trace.
async fn record_traced(
    log: &AuditLog,
    ctx: &RequestContext,
    ev: AuditEvent,
) -> Result<salus_audit::RecordReceipt, salus_audit::AuditError> {
    let event = ev.kind.as_str();
    let start = Instant::now();
    let result = log.record(ev).await;
    ctx.trace_phase(TracePhase::AuditWrite { event, written: result.is_ok() }, start, Instant::now());
    result
}

fn with_kind(base: &AuditEvent, kind: EventKind) -> AuditEvent {
    // The builder's defaults (action, outcome) follow the kind: rebuild from the base's fields.
    let mut ev = base.clone();
    ev.kind = kind;
    ev.action = kind.default_action();
    ev.outcome = match kind {
        EventKind::InferenceFailed => salus_audit::Outcome::Failure,
        EventKind::InferenceCancelled => salus_audit::Outcome::Cancelled,
        _ => salus_audit::Outcome::Success,
    };
    ev
}

impl InferenceAudit {
    /// Records `inference.started` and waits until it is durable. On failure the
    /// request must be refused: returns [`ApiError::AuditUnavailable`] (503).
    pub async fn start(
        state: &AppState,
        ctx: &RequestContext,
        subject: InferenceSubject<'_>,
    ) -> Result<Self, ApiError> {
        let log = state.audit().clone();
        let model = state.model();
        let mut base = AuditEvent::new(EventKind::InferenceStarted)
            .request_id(ctx.request_id())
            .principal(subject.principal.audit_principal())
            .operation(subject.operation)
            .model(model.id.clone(), model.fingerprint.clone())
            .params(audit_params_with_constraint(&log, subject.params))
            .prompt_hmac(log.hmac(subject.prompt));
        if let Some(addr) = subject.source.0 {
            base = base.source_addr(addr);
        }
        // Inside a break-glass window every inference record says so.
        if state.access().in_break_glass_window(subject.principal.id()) {
            base = base.detail(serde_json::json!({ "break_glass": true }));
        }
        match record_traced(&log, ctx, base.clone()).await {
            Ok(_) => {
                Ok(InferenceAudit { log, base, started: Instant::now(), done: false, reviews: state.reviews_arc() })
            }
            Err(e) => {
                tracing::error!(request_id = ctx.request_id(), error = %e, "audit: inference.started not recorded; request refused");
                Err(ApiError::AuditUnavailable)
            }
        }
    }

    /// The HMAC of a completion (see the module doc for the canonical bytes).
    pub fn completion_hmac(&self, texts: &[&Phi<String>]) -> TextHmac {
        let mut all = Phi::new(String::with_capacity(texts.iter().map(|t| t.expose().len()).sum()));
        for t in texts {
            all.expose_mut().push_str(t.expose());
        }
        self.log.hmac(&all)
    }

    /// Records `inference.completed` (with `detail.choices`, the number of
    /// choices) and enters it in the review index; an error means it is NOT
    /// recorded. `tools_called` are the names of the tools the choices called
    /// (app-defined identifiers; the arguments are covered by the completion
    /// HMAC only).
    pub async fn completed(
        &mut self,
        ctx: &RequestContext,
        prompt_tokens: usize,
        completion_tokens: usize,
        completion_hmac: TextHmac,
        tools_called: Vec<String>,
        choices: usize,
    ) -> Result<(), salus_audit::AuditError> {
        self.done = true;
        let mut ev = with_kind(&self.base, EventKind::InferenceCompleted)
            .tokens(clamp(prompt_tokens), clamp(completion_tokens))
            .latency(self.started.elapsed())
            .completion_hmac(completion_hmac);
        ev.detail.get_or_insert_with(Default::default).insert("choices".into(), choices.into());
        if !tools_called.is_empty() {
            if let Some(p) = ev.params.as_mut() {
                p.tools_called = Some(tools_called);
            }
        }
        let receipt = record_traced(&self.log, ctx, ev).await?;
        if let (Some(request_id), Some(principal)) = (&self.base.request_id, &self.base.principal) {
            let completed = salus_audit::RecordFilter::parse_time(&receipt.time)
                .unwrap_or_else(|_| time::OffsetDateTime::now_utc());
            let operation = self.base.operation.unwrap_or_default().to_string();
            let choices = choices.min(u32::MAX as usize) as u32;
            let entry = crate::reviews::Reviewable::new(
                principal.id.clone(),
                receipt.seq,
                receipt.event_id,
                completed,
                operation,
                choices,
            );
            self.reviews.completed(request_id, entry);
        }
        Ok(())
    }

    /// Records `inference.failed` with a fixed reason code; a failure to record
    /// is logged (the request already failed).
    pub async fn failed(
        &mut self,
        ctx: &RequestContext,
        reason: &'static str,
        prompt_tokens: usize,
        completion_tokens: usize,
    ) {
        self.done = true;
        let ev = with_kind(&self.base, EventKind::InferenceFailed)
            .outcome_reason(reason)
            .tokens(clamp(prompt_tokens), clamp(completion_tokens))
            .latency(self.started.elapsed());
        if let Err(e) = record_traced(&self.log, ctx, ev).await {
            let request_id = self.base.request_id.clone().unwrap_or_default();
            tracing::error!(request_id = %request_id, error = %e, "audit: inference.failed not recorded");
        }
    }
}

fn clamp(n: usize) -> u32 {
    n.min(u32::MAX as usize) as u32
}

impl Drop for InferenceAudit {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let ev = with_kind(&self.base, EventKind::InferenceCancelled)
            .outcome_reason("client_disconnected")
            .latency(self.started.elapsed());
        let log = self.log.clone();
        let request_id = self.base.request_id.clone().unwrap_or_default();
        let report = move |r: Result<salus_audit::RecordReceipt, salus_audit::AuditError>| {
            if let Err(e) = r {
                tracing::error!(request_id = %request_id, error = %e, "audit: inference.cancelled not recorded");
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move { report(log.record(ev).await) });
            }
            Err(_) => report(log.record_blocking(ev)),
        }
    }
}
