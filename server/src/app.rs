//! The router: `fn app(state) -> Router`, plus the one middleware that gives each
//! request an id, catches panics, records metrics and writes the access log.
//!
//! The access log records only: request id, principal id, route *template*
//! (never the URI or query string), method (standard ones only), status, error
//! code, token counts and duration. No headers, no body. The request's trace
//! (when traces are exported) begins here too, from a validated `traceparent`
//! and nothing else of the request (see [`crate::telemetry`]).

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, Method};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use futures::FutureExt;

use crate::api::{audit_events, completions, meta, reviews, tokenize, ApiError};
use crate::metrics::route_label;
use crate::state::{AppState, RequestContext};

tokio::task_local! {
    /// The id of the request being handled on this task (read by the panic hook).
    pub static REQUEST_ID: String;
}

/// The API router.
pub fn app(state: AppState) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(completions::chat_completions))
        .route("/v1/completions", post(completions::completions))
        .route("/v1/models", get(meta::list_models))
        .route("/v1/models/{*id}", get(meta::get_model))
        .route("/v1/reviews", post(reviews::create_review))
        .route("/v1/reviews/pending", get(reviews::pending_reviews))
        .route("/v1/audit/events", get(audit_events::list_events))
        .route("/tokenize", post(tokenize::tokenize))
        .route("/detokenize", post(tokenize::detokenize))
        .route("/tokenizer_info", get(tokenize::tokenizer_info))
        .route("/health", get(meta::health))
        .route(
            "/ready",
            get(meta::ready)
                .layer(middleware::map_response_with_state(state.clone(), crate::audit_forward::ready_warnings)),
        )
        .route("/metrics", get(meta::metrics))
        .fallback(|| async { ApiError::RouteNotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

/// The router of the separate loopback metrics listener (no authentication).
pub fn metrics_app(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(meta::metrics_open))
        .route("/ready", get(meta::ready_open))
        .fallback(|| async { ApiError::RouteNotFound })
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::HEAD => "HEAD",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        _ => "OTHER",
    }
}

/// A fresh request id (never taken from the client).
pub fn new_request_id() -> String {
    format!("req_{}", uuid::Uuid::new_v4().simple())
}

/// A request body that, when dropped before its end (a request refused
/// without reading it: 401, 403, 413), reads and discards what is left in the
/// background, bounded. Over HTTP/2 an unread body made the server reset the
/// stream, and clients then reported a reset instead of the error response.
struct DrainOnDrop {
    inner: Option<axum::body::Body>,
}

/// Most bytes of an unread request body discarded after the response.
const DRAIN_UNREAD_MAX_BYTES: usize = 8 << 20;
const DRAIN_UNREAD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

impl http_body::Body for DrainOnDrop {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        match self.inner.as_mut() {
            Some(b) => std::pin::Pin::new(b).poll_frame(cx),
            None => std::task::Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(http_body::Body::is_end_stream)
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.as_ref().map(http_body::Body::size_hint).unwrap_or_default()
    }
}

impl Drop for DrainOnDrop {
    fn drop(&mut self) {
        let Some(mut body) = self.inner.take() else { return };
        if http_body::Body::is_end_stream(&body) {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else { return };
        rt.spawn(async move {
            crate::api::json::drain_bounded(&mut body, DRAIN_UNREAD_MAX_BYTES, DRAIN_UNREAD_TIMEOUT).await
        });
    }
}

async fn observe(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    let mut req = Request::from_parts(parts, axum::body::Body::new(DrainOnDrop { inner: Some(body) }));
    let started = Instant::now();
    let route = route_label(req.extensions().get::<MatchedPath>().map(|m| m.as_str()));
    let method = method_label(req.method());
    let source = req.extensions().get::<axum::extract::ConnectInfo<std::net::SocketAddr>>().map(|c| c.0);
    let request_id = new_request_id();
    let trace = state.telemetry().begin(method, route, req.headers());
    let ctx = Arc::new(RequestContext::traced(request_id.clone(), trace));
    req.extensions_mut().insert(ctx.clone());
    state.metrics().request_started();
    let run = AssertUnwindSafe(next.run(req)).catch_unwind();
    let mut resp = match REQUEST_ID.scope(request_id.clone(), run).await {
        Ok(resp) => resp,
        Err(_panic) => {
            // The payload may quote request data: dropped unread. The hook logged the location.
            state.metrics().panic_caught();
            ApiError::Internal { request_id: request_id.clone() }.into_response()
        }
    };
    state.metrics().request_finished();
    let status = resp.status().as_u16();
    state.metrics().request_done(route, status);
    let error = resp.extensions().get::<ApiError>();
    let error_code = error.and_then(|e| e.code()).unwrap_or("");
    ctx.set_response(status, error_code);
    let (prompt_tokens, completion_tokens) = ctx.tokens();
    let principal = ctx.principal().unwrap_or_default();
    if error.is_some_and(ApiError::is_denial) {
        // Counted now, recorded coalesced (see `auth::denials`); a 403's caller is known.
        let who = (!ctx.auth_denied()).then_some(principal.as_str()).filter(|p| !p.is_empty());
        state.denials().note(source.map(|s| s.ip()), error_code, route, who);
    }
    tracing::info!(
        request_id = %request_id,
        principal = %principal,
        route,
        method,
        status,
        error = error_code,
        prompt_tokens,
        completion_tokens,
        duration_ms = started.elapsed().as_millis() as u64,
        "request"
    );
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

#[cfg(test)]
mod tests;
