//! `GET /v1/models`, `/v1/models/{id}`, `/health`, `/ready`, `/metrics`.

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::error::ApiError;
use crate::auth::{AuthenticatedPrincipal, Permission};
use crate::state::AppState;

fn model_object(state: &AppState) -> Value {
    let m = state.model();
    json!({
        "id": m.id,
        "object": "model",
        "created": m.created,
        "owned_by": "salus",
        // vLLM's field: harnesses read the context window from it.
        "max_model_len": state.codec().context_length(),
        "metadata": {
            "weights_fingerprint": m.fingerprint,
            "weights_sealed": m.sealed,
            "context_length": state.codec().context_length(),
        },
    })
}

/// `GET /v1/models`.
pub async fn list_models(
    State(state): State<AppState>,
    principal: AuthenticatedPrincipal,
) -> Result<Response, ApiError> {
    principal.require(Permission::Inference)?;
    Ok(Json(json!({"object": "list", "data": [model_object(&state)]})).into_response())
}

/// `GET /v1/models/{id}` (ids may contain `/`, hence the wildcard route).
pub async fn get_model(
    State(state): State<AppState>,
    principal: AuthenticatedPrincipal,
    id: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    principal.require(Permission::Inference)?;
    // A path that does not decode is simply not a model we serve (never echoed).
    let Ok(Path(id)) = id else { return Err(ApiError::ModelNotFound) };
    if id != state.model().id {
        return Err(ApiError::ModelNotFound);
    }
    Ok(Json(model_object(&state)).into_response())
}

/// `GET /health`: the process is alive (no authentication).
pub async fn health() -> Response {
    Json(json!({"status": "ok"})).into_response()
}

/// `GET /ready`: model loaded, engine running, not shutting down.
pub async fn ready(State(state): State<AppState>, principal: AuthenticatedPrincipal) -> Response {
    let _ = principal;
    let reasons = state.not_ready_reasons();
    if reasons.is_empty() {
        Json(json!({"status": "ready"})).into_response()
    } else {
        // The standard error body, plus which checks failed (fixed codes, no PHI).
        let mut resp = ApiError::NotReady.into_response();
        let mut body = ApiError::NotReady.body();
        body["reasons"] = json!(reasons);
        *resp.body_mut() = axum::body::Body::from(body.to_string());
        resp
    }
}

/// Prometheus text for the metrics listener or an authorized principal.
pub fn metrics_text(state: &AppState) -> Response {
    let text = state.metrics().render(&state.engine().stats(), &state.audit().health());
    (StatusCode::OK, [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
}

/// `GET /metrics` on the main listener: needs the `metrics` role.
pub async fn metrics(State(state): State<AppState>, principal: AuthenticatedPrincipal) -> Result<Response, ApiError> {
    principal.require(Permission::Metrics)?;
    Ok(metrics_text(&state))
}

/// `GET /metrics` on the separate loopback listener: no authentication.
pub async fn metrics_open(State(state): State<AppState>) -> Response {
    metrics_text(&state)
}

/// `GET /ready` on the separate loopback listener, for probes that hold no
/// API key (a Kubernetes exec probe running `salus health`): 200 `ready` or
/// 503 `not_ready`, nothing else (the reasons need a key, on the API listener).
pub async fn ready_open(State(state): State<AppState>) -> Response {
    if state.is_ready() {
        Json(json!({"status": "ready"})).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "not_ready"}))).into_response()
    }
}
