//! Clinician review attestations (a Salus extension): `POST /v1/reviews` and
//! `GET /v1/reviews/pending`.
//!
//! Why in the trail: HIPAA audit logging for AI asks for a record of "every
//! time a human reviews AI-generated clinical content". A review is a
//! `review.recorded` record linked to the inference it reviews (that
//! inference's request id, the sequence number and event id of its
//! `inference.completed`), with the action, an optional reason code from
//! `reviews.reason_codes`, the review latency, and — when the reviewer edited
//! the output — an HMAC of the edited text (never the text), so an edited
//! note can later be matched with `salus audit hash`.
//!
//! The reviewer is the authenticated principal and must hold `review`. Only
//! the principal's own inferences can be reviewed; an unknown id, another
//! principal's, or one older than `reviews.lookup_window_secs` is the same 404.
//! A second review of a choice is a new record, never an overwrite.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Extension, Query, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use salus_audit::{AuditEvent, EventKind};
use salus_models::Phi;
use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::error::ApiError;
use super::inference_audit::SourceAddr;
use super::json::{Fields, JsonObject};
use super::response::Endpoint;
use crate::auth::{AuthenticatedPrincipal, Permission};
use crate::reviews::LookupMiss;
use crate::state::{AppState, RequestContext};

/// What a reviewer did with an output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReviewAction {
    Accepted,
    Edited,
    Rejected,
    Escalated,
}

impl ReviewAction {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "accepted" => ReviewAction::Accepted,
            "edited" => ReviewAction::Edited,
            "rejected" => ReviewAction::Rejected,
            "escalated" => ReviewAction::Escalated,
            _ => return None,
        })
    }
    fn as_str(self) -> &'static str {
        match self {
            ReviewAction::Accepted => "accepted",
            ReviewAction::Edited => "edited",
            ReviewAction::Rejected => "rejected",
            ReviewAction::Escalated => "escalated",
        }
    }
}

/// A review request that passed validation.
struct ValidatedReview {
    /// The reviewed request's id (from the response id).
    request_id: String,
    response_id: String,
    choice: u32,
    action: ReviewAction,
    edited_text: Option<Phi<String>>,
    reason_code: Option<String>,
}

/// How long a review of an id not (yet) in the index waits for the start-up rebuild.
const LOADING_WAIT: Duration = Duration::from_secs(10);

fn parse_review(body: serde_json::Map<String, Value>, reason_codes: &[String]) -> Result<ValidatedReview, ApiError> {
    let mut f = Fields::new(body);
    let Some(response_id) = f.string("response_id")? else {
        return Err(ApiError::invalid("response_id", "missing required parameter response_id"));
    };
    // `chatcmpl-<request id>` or `cmpl-<request id>`; anything else cannot exist.
    let request_id = Endpoint::parse_response_id(&response_id)
        .map(|(_, id)| id)
        .filter(|id| {
            id.starts_with("req_") && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        })
        .map(str::to_string)
        .ok_or(ApiError::ReviewTargetNotFound)?;
    let choice = f.u64_in("choice", 0, u32::MAX as u64)?.unwrap_or(0) as u32;
    let Some(action) = f.string("action")? else {
        return Err(ApiError::invalid("action", "missing required parameter action"));
    };
    let action = ReviewAction::parse(&action)
        .ok_or_else(|| ApiError::invalid("action", "action must be accepted, edited, rejected or escalated"))?;
    let edited_text = f.string("edited_text")?.map(Phi::new);
    if edited_text.is_some() && action != ReviewAction::Edited {
        return Err(ApiError::invalid("edited_text", "edited_text is allowed only with action edited"));
    }
    let reason_code = f.string("reason_code")?;
    if let Some(code) = &reason_code {
        if !reason_codes.iter().any(|c| c == code) {
            return Err(ApiError::invalid(
                "reason_code",
                "reason_code is not one of the configured reviews.reason_codes",
            ));
        }
    }
    f.finish(&[])?;
    Ok(ValidatedReview { request_id, response_id, choice, action, edited_text, reason_code })
}

/// `POST /v1/reviews`.
pub async fn create_review(
    State(state): State<AppState>,
    Extension(ctx): Extension<Arc<RequestContext>>,
    source: SourceAddr,
    principal: AuthenticatedPrincipal,
    JsonObject(body): JsonObject,
) -> Result<Response, ApiError> {
    principal.require(Permission::Review)?;
    let review = parse_review(body, state.reviews().reason_codes())?;
    let target = match state.reviews().lookup_waiting(&review.request_id, principal.id(), LOADING_WAIT).await {
        Ok(t) if review.choice < t.choices() => t,
        Ok(_) | Err(LookupMiss::NotFound) => return Err(ApiError::ReviewTargetNotFound),
        Err(LookupMiss::Loading) => return Err(ApiError::NotReady),
    };
    let now = OffsetDateTime::now_utc();
    let latency_ms = (now - target.completed).whole_milliseconds().max(0) as u64;
    let log = state.audit();
    let mut detail = json!({
        "reviewed_request_id": review.request_id,
        "reviewed_seq": target.seq,
        "reviewed_event_id": target.event_id,
        "response_id": review.response_id,
        "choice": review.choice,
        "action": review.action.as_str(),
        "review_latency_ms": latency_ms,
    });
    if let Some(code) = &review.reason_code {
        detail["reason_code"] = json!(code);
    }
    if let Some(text) = &review.edited_text {
        detail["edited_text_hmac"] = json!(log.hmac(text).as_str());
    }
    let mut ev = AuditEvent::new(EventKind::ReviewRecorded)
        .request_id(ctx.request_id())
        .principal(principal.audit_principal())
        .operation("reviews")
        .target(review.response_id.clone())
        .detail(detail);
    if let Some(addr) = source.0 {
        ev = ev.source_addr(addr);
    }
    let receipt = match log.record(ev).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(request_id = ctx.request_id(), error = %e, "audit: review.recorded not recorded; review refused");
            return Err(ApiError::AuditUnavailable);
        }
    };
    state.reviews().reviewed(&review.request_id, review.choice);
    let body = json!({
        "object": "review",
        "id": format!("rev_{}", receipt.event_id.replace('-', "")),
        "response_id": review.response_id,
        "choice": review.choice,
        "action": review.action.as_str(),
        "reason_code": review.reason_code,
        "created": now.unix_timestamp(),
        "review_latency_ms": latency_ms,
        "audit_seq": receipt.seq,
        "reviewed_audit_seq": target.seq,
    });
    Ok(Json(body).into_response())
}

/// `GET /v1/reviews/pending?since=…&limit=…`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PendingQuery {
    since: Option<String>,
    limit: Option<usize>,
}

/// Most pending entries one call returns.
const MAX_PENDING_PAGE: usize = 1000;

/// The caller's own completions in the window with a choice not yet reviewed
/// (ids, times, choice numbers; no text), oldest first.
pub async fn pending_reviews(
    State(state): State<AppState>,
    principal: AuthenticatedPrincipal,
    query: Result<Query<PendingQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    principal.require(Permission::Review)?;
    let Query(q) = query.map_err(|_| ApiError::invalid("query", "the query string accepts since and limit"))?;
    let since = q.since.as_deref().map(parse_since).transpose()?;
    let limit = q.limit.unwrap_or(100);
    if limit == 0 || limit > MAX_PENDING_PAGE {
        return Err(ApiError::invalid("limit", format!("limit must be 1 to {MAX_PENDING_PAGE}")));
    }
    let items = state.reviews().pending(principal.id(), since, limit);
    let data: Vec<Value> = items
        .iter()
        .map(|(request_id, e)| {
            let endpoint = Endpoint::from_operation(&e.operation).unwrap_or(Endpoint::Chat);
            json!({
                "response_id": endpoint.response_id(request_id),
                "request_id": request_id,
                "completed_at": e.completed.format(&Rfc3339).unwrap_or_default(),
                "operation": e.operation,
                "choices": e.choices(),
                "unreviewed_choices": e.unreviewed(),
                "audit_seq": e.seq,
            })
        })
        .collect();
    Ok(Json(json!({"object": "list", "data": data})).into_response())
}

/// An RFC 3339 time or Unix seconds.
pub(super) fn parse_since(s: &str) -> Result<OffsetDateTime, ApiError> {
    if let Ok(secs) = s.parse::<i64>() {
        return OffsetDateTime::from_unix_timestamp(secs)
            .map_err(|_| ApiError::invalid("since", "since is out of range"));
    }
    OffsetDateTime::parse(s, &Rfc3339)
        .map_err(|_| ApiError::invalid("since", "since must be an RFC 3339 time or Unix seconds"))
}
