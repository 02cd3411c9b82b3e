//! Auditor access over the API: `GET /v1/audit/events` (permission `audit.read`).
//!
//! Why over the API: compliance officers and review tools should not need a
//! shell on the inference host. The records are returned exactly as `salus
//! audit query` prints them (the stored JSON), or as a FHIR R4 `Bundle` of
//! `AuditEvent` (`format=fhir`), filtered by principal, event kind or family,
//! request id and time, and paged by sequence number (`after` = the last seq
//! of the previous page, `next_after` in the answer).
//!
//! Every read is itself recorded (`audit.accessed`: who, the filter, how many
//! records it returned), durably before the records are returned: access to
//! the trail is audited like access to the model.
//!
//! Each page walks and verifies the trail from its start (the walk that
//! `salus audit verify` does), on a blocking thread: a page costs time
//! proportional to the trail's size.

use std::sync::Arc;

use axum::extract::{Extension, Query, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use salus_audit::{AuditEvent, EventKind, RecordFilter};
use serde_json::{json, Value};

use super::error::ApiError;
use super::inference_audit::SourceAddr;
use super::reviews::parse_since;
use crate::auth::{AuthenticatedPrincipal, Permission};
use crate::state::{AppState, RequestContext};

/// The query string.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    principal: Option<String>,
    kind: Option<String>,
    request_id: Option<String>,
    since: Option<String>,
    until: Option<String>,
    /// Records with a sequence number above this one.
    after: Option<u64>,
    limit: Option<usize>,
    /// `json` (default) or `fhir`.
    format: Option<String>,
}

/// Records per page by default, and at most.
const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;

/// `GET /v1/audit/events`.
pub async fn list_events(
    State(state): State<AppState>,
    Extension(ctx): Extension<Arc<RequestContext>>,
    source: SourceAddr,
    principal: AuthenticatedPrincipal,
    query: Result<Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    principal.require(Permission::Auditor)?;
    let Query(q) = query.map_err(|_| {
        ApiError::invalid(
            "query",
            "the query string accepts principal, kind, request_id, since, until, after, limit and format",
        )
    })?;
    let fhir = match q.format.as_deref() {
        None | Some("json") => false,
        Some("fhir") => true,
        Some(_) => return Err(ApiError::invalid("format", "format must be json or fhir")),
    };
    if let Some(k) = &q.kind {
        RecordFilter::check_event(k).map_err(|_| ApiError::invalid("kind", "kind is not an event kind or family"))?;
    }
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT);
    if limit == 0 || limit > MAX_LIMIT {
        return Err(ApiError::invalid("limit", format!("limit must be 1 to {MAX_LIMIT}")));
    }
    for (name, v) in [("principal", &q.principal), ("request_id", &q.request_id)] {
        if v.as_ref().is_some_and(|v| v.is_empty() || v.len() > 256) {
            return Err(ApiError::invalid(name, format!("{name} must be 1 to 256 characters")));
        }
    }
    let filter = RecordFilter {
        principal: q.principal.clone(),
        event: q.kind.clone(),
        since: q.since.as_deref().map(parse_since).transpose().map_err(|_| bad_time("since"))?,
        until: q.until.as_deref().map(parse_since).transpose().map_err(|_| bad_time("until"))?,
    };
    let after = q.after.unwrap_or(0);
    let request_id = q.request_id.clone();
    let log = state.audit().clone();
    let read = tokio::task::spawn_blocking(move || {
        let mut page: Vec<(salus_audit::AuditRecord, Value)> = Vec::new();
        let mut more = false;
        // Up to the durable seq: a record being written is not read half.
        let walked = salus_audit::read_durable(&log, |rec, raw| {
            if rec.seq <= after || more || !filter.matches(rec) {
                return;
            }
            if request_id.as_ref().is_some_and(|id| rec.request_id.as_ref() != Some(id)) {
                return;
            }
            if page.len() == limit {
                more = true;
                return;
            }
            if let Ok(v) = serde_json::from_slice::<Value>(raw) {
                page.push((rec.clone(), v));
            }
        });
        walked.map(|_| (page, more))
    })
    .await;
    let (page, has_more) = match read {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => {
            tracing::error!(request_id = ctx.request_id(), error = %e, "audit trail read failed");
            return Err(ApiError::Internal { request_id: ctx.request_id().to_string() });
        }
        Err(_) => return Err(ApiError::Internal { request_id: ctx.request_id().to_string() }),
    };
    // The read is recorded before anything is returned (fail closed).
    let mut ev = AuditEvent::new(EventKind::AuditAccessed)
        .request_id(ctx.request_id())
        .principal(principal.audit_principal())
        .operation("audit.events")
        .detail(json!({
            "filter": {
                "principal": q.principal, "kind": q.kind, "request_id": q.request_id,
                "since": q.since, "until": q.until, "after": q.after, "limit": limit,
            },
            "format": if fhir { "fhir" } else { "json" },
            "returned": page.len(),
            "has_more": has_more,
        }));
    if let Some(addr) = source.0 {
        ev = ev.source_addr(addr);
    }
    if let Err(e) = state.audit().record(ev).await {
        tracing::error!(request_id = ctx.request_id(), error = %e, "audit: audit.accessed not recorded; read refused");
        return Err(ApiError::AuditUnavailable);
    }
    let next_after = if has_more { page.last().map(|(r, _)| r.seq) } else { None };
    if fhir {
        let records: Vec<_> = page.into_iter().map(|(r, _)| r).collect();
        let mut bundle = salus_audit::fhir::export_bundle(&records);
        if let Some(n) = next_after {
            bundle["link"] = json!([{ "relation": "next", "url": format!("/v1/audit/events?format=fhir&after={n}") }]);
        }
        return Ok(Json(bundle).into_response());
    }
    let data: Vec<Value> = page.into_iter().map(|(_, v)| v).collect();
    Ok(Json(json!({"object": "list", "data": data, "has_more": has_more, "next_after": next_after})).into_response())
}

fn bad_time(name: &'static str) -> ApiError {
    ApiError::invalid(name, format!("{name} must be an RFC 3339 time or Unix seconds"))
}
