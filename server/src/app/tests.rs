//! In-process tests of the router: `app(state).oneshot(request)` with a scripted
//! engine and a byte-level prompt codec (test-only; not a product path).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use salus_models::paged_cache::PrefixScope;
use salus_models::Phi;
use serde_json::{json, Value};
use time::OffsetDateTime;
use tower::ServiceExt;

use crate::app::app;
use crate::auth::access::AccessControl;
use crate::auth::denials::DenialRecorder;
use crate::auth::{KeyStore, KeyStoreHandle, Permission, PrincipalKind};
use crate::config::{AuthConfig, Config, LimitsConfig};
use crate::engine::{
    CancelToken, ChoiceTiming, Engine, EngineError, EngineStats, FinishReason, GenerationEvent, GenerationHandle,
    GenerationRequest, TokenLogprob,
};
use crate::metrics::Metrics;
use crate::state::{AppParts, AppState, EncodedChat, PromptCodec, PromptError, ServedModelInfo};
use crate::telemetry::Telemetry;
use salus_audit::{read_trail, AuditLog, AuditLogSettings, AuditRecord};
use salus_models::chat::{ChatMessage, RenderOptions};
use salus_sensitive::secret::{write_new_key_file, KeySource};

/// The scripted engine and the byte-level codec the router tests run on.
mod scripted;
use scripted::{ByteCodec, ScriptedEngine};

struct Fixture {
    state: AppState,
    audit: AuditLog,
    audit_key: KeySource,
    audit_dir: tempfile::TempDir,
    engine: Arc<ScriptedEngine>,
    inference: String,
    /// A second key of the same principal as `inference`.
    inference_rotated: String,
    /// Another principal with the inference role.
    other_inference: String,
    metrics_only: String,
    revoked: String,
    expired: String,
}

fn fixture() -> Fixture {
    let now = OffsetDateTime::now_utc();
    let mut store = KeyStore::default();
    let inference = store.create("alice", PrincipalKind::Human, &[Permission::Inference], None, now).unwrap();
    let inference_rotated = store.create("alice", PrincipalKind::Human, &[Permission::Inference], None, now).unwrap();
    let other_inference = store.create("dave", PrincipalKind::Service, &[Permission::Inference], None, now).unwrap();
    let metrics_only = store.create("prom", PrincipalKind::Service, &[Permission::Metrics], None, now).unwrap();
    let revoked = store.create("bob", PrincipalKind::Human, &[Permission::Inference], None, now).unwrap();
    store.revoke(&revoked.record.id, now).unwrap();
    let expired = store
        .create("carol", PrincipalKind::Human, &[Permission::Inference], Some(now + time::Duration::seconds(1)), now)
        .unwrap();
    // Make it expire: rewrite its expiry into the past.
    let idx = store.keys.iter().position(|k| k.id == expired.record.id).unwrap();
    store.keys[idx].expires = Some(now - time::Duration::seconds(5));
    let built = build_state(store, &AuthConfig::default());
    Fixture {
        state: built.state,
        audit: built.audit,
        audit_key: built.audit_key,
        audit_dir: built.audit_dir,
        engine: built.engine,
        inference: inference.secret.to_string(),
        inference_rotated: inference_rotated.secret.to_string(),
        other_inference: other_inference.secret.to_string(),
        metrics_only: metrics_only.secret.to_string(),
        revoked: revoked.secret.to_string(),
        expired: expired.secret.to_string(),
    }
}

/// An app state over `store` with `[auth]` settings `auth`.
struct BuiltState {
    state: AppState,
    audit: AuditLog,
    audit_key: KeySource,
    audit_dir: tempfile::TempDir,
    engine: Arc<ScriptedEngine>,
}

fn build_state(store: KeyStore, auth: &AuthConfig) -> BuiltState {
    build_state_traced(store, auth, Telemetry::disabled())
}

/// [`build_state`] whose requests are traced by `telemetry`.
fn build_state_traced(store: KeyStore, auth: &AuthConfig, telemetry: Telemetry) -> BuiltState {
    build_state_on(KeyStoreHandle::fixed(store), auth, telemetry)
}

/// An app state over the key store `keys` (a file-backed one reloads).
fn build_state_on(keys: KeyStoreHandle, auth: &AuthConfig, telemetry: Telemetry) -> BuiltState {
    let engine = Arc::new(ScriptedEngine::default());
    let audit_dir = tempfile::tempdir().unwrap();
    let key_path = audit_dir.path().join("audit.key");
    write_new_key_file(&key_path).unwrap();
    let audit_key: KeySource = format!("file:{}", key_path.display()).parse().unwrap();
    let audit = AuditLog::open(AuditLogSettings::new(audit_dir.path().join("trail"), audit_key.clone())).unwrap();
    let metrics = Arc::new(Metrics::new("test-model"));
    let denials = Arc::new(DenialRecorder::new(Config::default().denial_settings(), audit.clone(), metrics.clone()));
    let state = AppState::new(AppParts {
        engine: engine.clone(),
        codec: Arc::new(ByteCodec),
        keys: Arc::new(keys),
        metrics: metrics.clone(),
        model: ServedModelInfo { id: "test-model".into(), created: 1, fingerprint: "ab".repeat(32), sealed: true },
        limits: LimitsConfig { max_body_bytes: 4096, max_tokens: 100, default_max_tokens: 16, ..Default::default() },
        audit: audit.clone(),
        denials,
        access: Arc::new(AccessControl::from_config(auth, metrics).unwrap()),
        reviews: Arc::new(
            crate::reviews::ReviewIndex::new(Duration::from_secs(3600), 10_000, true)
                .with_reason_codes(crate::config::ReviewsConfig::default().reason_codes),
        ),
        telemetry: Arc::new(telemetry),
    });
    BuiltState { state, audit, audit_key, audit_dir, engine }
}

async fn send(
    state: &AppState,
    method: &str,
    uri: &str,
    key: Option<&str>,
    body: Option<&[u8]>,
) -> (StatusCode, Value, String) {
    let mut b = Request::builder().method(method).uri(uri);
    if let Some(k) = key {
        b = b.header(header::AUTHORIZATION, format!("Bearer {k}"));
    }
    let req = match body {
        Some(bytes) => b.header(header::CONTENT_TYPE, "application/json").body(Body::from(bytes.to_vec())).unwrap(),
        None => b.body(Body::empty()).unwrap(),
    };
    let resp = app(state.clone()).oneshot(req).await.unwrap();
    let status = resp.status();
    assert!(resp.headers().contains_key("x-request-id"));
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, json, text)
}

/// `base` with the top-level fields of `extra` set (replacing any of the same name).
fn with_fields(mut base: Value, extra: &Value) -> Value {
    for (k, x) in extra.as_object().unwrap() {
        base[k] = x.clone();
    }
    base
}

fn chat_body(extra: Value) -> Vec<u8> {
    let v = json!({"model": "test-model", "messages": [{"role": "user", "content": "hi"}]});
    serde_json::to_vec(&with_fields(v, &extra)).unwrap()
}

/// The JSON chunks of an SSE body (without the final `[DONE]`).
fn sse_chunks(text: &str) -> Vec<Value> {
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect()
}

#[tokio::test]
async fn auth_missing_bad_revoked_expired_and_wrong_role() {
    let f = fixture();
    let body = chat_body(json!({}));
    for key in [None, Some("sk-salus-nope"), Some(f.revoked.as_str()), Some(f.expired.as_str())] {
        let (s, v, _) = send(&f.state, "POST", "/v1/chat/completions", key, Some(&body)).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{key:?}");
        assert_eq!(v["error"]["type"], "authentication_error");
    }
    let (s, v, _) = send(&f.state, "POST", "/v1/chat/completions", Some(&f.metrics_only), Some(&body)).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert_eq!(v["error"]["type"], "permission_error");
    let (s, _, _) = send(&f.state, "GET", "/metrics", Some(&f.inference), None).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _, text) = send(&f.state, "GET", "/metrics", Some(&f.metrics_only), None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(text.contains("salus_queue_depth 2"), "{text}");
    // /health needs no key; /ready does.
    assert_eq!(send(&f.state, "GET", "/health", None, None).await.0, StatusCode::OK);
    assert_eq!(send(&f.state, "GET", "/ready", None, None).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(send(&f.state, "GET", "/ready", Some(&f.inference), None).await.0, StatusCode::OK);
    assert!(f.engine.seen.lock().unwrap().is_empty(), "no request may reach the engine");
}

/// The prefix cache is scoped by principal: two keys of one principal share a
/// scope, another principal never does (it could otherwise time the first
/// one's prompts through a faster first token).
#[tokio::test]
async fn prefix_cache_scope_is_the_principal_not_the_key() {
    let f = fixture();
    for key in [&f.inference, &f.inference_rotated, &f.other_inference] {
        let (status, _, _) =
            send(&f.state, "POST", "/v1/chat/completions", Some(key), Some(&chat_body(json!({})))).await;
        assert_eq!(status, StatusCode::OK);
    }
    let (status, _, _) = send(
        &f.state,
        "POST",
        "/v1/completions",
        Some(&f.other_inference),
        Some(br#"{"model":"test-model","prompt":["a","b"]}"#),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let scopes = f.engine.scopes.lock().unwrap().clone();
    assert_eq!(scopes.len(), 5);
    assert_eq!(scopes[0], scopes[1], "keys of one principal share its cache");
    assert_ne!(scopes[0], scopes[2], "principals never share a cache");
    assert_eq!(scopes[2..], [scopes[2].clone(), scopes[2].clone(), scopes[2].clone()]);
}

#[tokio::test]
async fn chat_completion_non_streaming_shape_and_usage() {
    let f = fixture();
    let body = chat_body(json!({"n": 2, "seed": 7, "max_tokens": 5, "temperature": 0.5, "stop": ["x"], "user": "u1"}));
    let (s, v, _) = send(&f.state, "POST", "/v1/chat/completions", Some(&f.inference), Some(&body)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "test-model");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["choices"].as_array().unwrap().len(), 2);
    assert_eq!(v["choices"][1]["index"], 1);
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["message"]["content"], "Hello world");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let prompt_len = "user".len() + "hi".len();
    assert_eq!(
        v["usage"],
        json!({
            "prompt_tokens": prompt_len,
            "completion_tokens": 4,
            "total_tokens": prompt_len + 4,
            "prompt_tokens_details": {"cached_tokens": 1},
        })
    );
    assert_eq!(f.engine.seen.lock().unwrap()[0], (prompt_len, 2, Some(7), 5));
    // max_tokens=1 → finish_reason length.
    let body = chat_body(json!({"max_completion_tokens": 1}));
    let (_, v, _) = send(&f.state, "POST", "/v1/chat/completions", Some(&f.inference), Some(&body)).await;
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["choices"][0]["message"]["content"], "Hello");
    let text = f.state.metrics().render(&EngineStats::default(), &f.audit.health());
    assert!(text.contains("salus_requests_total{route=\"/v1/chat/completions\",status=\"200\"} 2"), "{text}");
    assert!(text.contains("salus_completion_tokens_total{model=\"test-model\"} 5"));
}

#[tokio::test]
async fn chat_streaming_sse_matches_openai() {
    let f = fixture();
    let body = chat_body(json!({"stream": true, "stream_options": {"include_usage": true}}));
    let (s, _, text) = send(&f.state, "POST", "/v1/chat/completions", Some(&f.inference), Some(&body)).await;
    assert_eq!(s, StatusCode::OK);
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert!(events.iter().all(|e| e.starts_with("data: ")), "{text}");
    assert_eq!(*events.last().unwrap(), "data: [DONE]");
    let chunks: Vec<Value> =
        events[..events.len() - 1].iter().map(|e| serde_json::from_str(&e[6..]).unwrap()).collect();
    assert_eq!(chunks.len(), 5, "role, 2 content, finish, usage: {text}");
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk"));
    assert!(chunks.windows(2).all(|w| w[0]["id"] == w[1]["id"]));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(chunks[1]["choices"][0]["delta"]["content"], "Hello");
    assert_eq!(chunks[2]["choices"][0]["delta"]["content"], " world");
    assert!(chunks[1]["usage"].is_null() && chunks[1].as_object().unwrap().contains_key("usage"));
    assert_eq!(chunks[3]["choices"][0]["finish_reason"], "stop");
    assert_eq!(chunks[3]["choices"][0]["delta"], json!({}));
    assert_eq!(chunks[4]["choices"], json!([]));
    assert_eq!(chunks[4]["usage"]["completion_tokens"], 2);
    assert_eq!(chunks[4]["usage"]["prompt_tokens_details"]["cached_tokens"], 1);
    // Without include_usage: no usage key, no usage chunk.
    let body = chat_body(json!({"stream": true}));
    let (_, _, text) = send(&f.state, "POST", "/v1/chat/completions", Some(&f.inference), Some(&body)).await;
    assert!(!text.contains("usage"));
    assert!(text.ends_with("data: [DONE]\n\n"));
}

#[tokio::test]
async fn completions_string_and_array_prompts() {
    let f = fixture();
    let body = serde_json::to_vec(&json!({"model": "test-model", "prompt": ["ab", "cde"], "n": 2, "seed": 1})).unwrap();
    let (s, v, _) = send(&f.state, "POST", "/v1/completions", Some(&f.inference), Some(&body)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"].as_array().unwrap().len(), 4);
    assert_eq!(v["choices"][3]["index"], 3);
    assert_eq!(v["choices"][2]["text"], "Hello world");
    assert_eq!(v["usage"]["prompt_tokens"], 5);
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 2, "once per prompt, not per choice");
    let seen = f.engine.seen.lock().unwrap().clone();
    assert_eq!(seen.iter().map(|s| s.2).collect::<Vec<_>>(), vec![Some(1), Some(3)], "distinct seeds per prompt");
    let body = serde_json::to_vec(&json!({"model": "test-model", "prompt": "ab", "stream": true})).unwrap();
    let (_, _, text) = send(&f.state, "POST", "/v1/completions", Some(&f.inference), Some(&body)).await;
    assert!(text.contains("\"object\":\"text_completion\"") && text.ends_with("data: [DONE]\n\n"), "{text}");
}

#[tokio::test]
async fn errors_never_echo_the_body() {
    let f = fixture();
    let k = Some(f.inference.as_str());
    let cases: Vec<(Vec<u8>, StatusCode, Value)> = vec![
        (b"{\"model\": \"CANARY-1".to_vec(), StatusCode::BAD_REQUEST, Value::Null),
        (b"{\"model\": \"x\xff\xfeCANARY-2\"}".to_vec(), StatusCode::BAD_REQUEST, Value::Null),
        (chat_body(json!({"temperature": "CANARY-3"})), StatusCode::BAD_REQUEST, json!("temperature")),
        (chat_body(json!({"max_tokens": "CANARY-4"})), StatusCode::BAD_REQUEST, json!("max_tokens")),
        (chat_body(json!({"CANARY-5": 1})), StatusCode::BAD_REQUEST, Value::Null),
        (chat_body(json!({"tools": [{"CANARY-6": 1}]})), StatusCode::BAD_REQUEST, json!("tools[0].type")),
        (
            chat_body(json!({"tools": [{"type": "function", "function": {"name": "f", "description": "CANARY-17",
                "parameters": {"type": "object", "properties": {"x": {"not": {"const": "CANARY-18"}}}}}}]})),
            StatusCode::BAD_REQUEST,
            json!("tools[0].function.parameters"),
        ),
        (
            chat_body(json!({"messages": [{"role": "tool", "tool_call_id": "call_CANARY19", "content": "CANARY-20"}]})),
            StatusCode::BAD_REQUEST,
            json!("messages[0].tool_call_id"),
        ),
        (
            chat_body(json!({"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {
                "type": "object", "description": "CANARY-12", "properties": {"CANARY-13 x": {"enum": ["CANARY-14"], "not": {}}}
            }}}})),
            StatusCode::BAD_REQUEST,
            json!("response_format"),
        ),
        (
            chat_body(json!({"structured_outputs": {"regex": "(CANARY-15"}})),
            StatusCode::BAD_REQUEST,
            json!("structured_outputs"),
        ),
        (
            chat_body(json!({"structured_outputs": {"grammar": "start: CANARY-16 ::= ("}})),
            StatusCode::BAD_REQUEST,
            json!("structured_outputs"),
        ),
        (chat_body(json!({"logit_bias": {"CANARY-7": 1}})), StatusCode::BAD_REQUEST, json!("logit_bias")),
        (
            chat_body(json!({"messages": [{"role": "CANARY-8", "content": "x"}]})),
            StatusCode::BAD_REQUEST,
            json!("messages[0].role"),
        ),
        (chat_body(json!({"model": "CANARY-9"})), StatusCode::NOT_FOUND, json!("model")),
        (chat_body(json!({"max_tokens": 60})), StatusCode::BAD_REQUEST, json!("messages")),
        (
            chat_body(json!({"messages": [{"role": "user", "content": "CANARY-10".repeat(10)}]})),
            StatusCode::BAD_REQUEST,
            json!("messages"),
        ),
        (
            format!("{{\"model\":\"{}\"}}", "CANARY-11".repeat(1000)).into_bytes(),
            StatusCode::PAYLOAD_TOO_LARGE,
            Value::Null,
        ),
    ];
    for (i, (body, status, param)) in cases.into_iter().enumerate() {
        let (s, v, text) = send(&f.state, "POST", "/v1/chat/completions", k, Some(&body)).await;
        assert_eq!(s, status, "case {i}: {text}");
        assert_eq!(v["error"]["param"], param, "case {i}: {text}");
        assert!(!text.contains("CANARY"), "case {i} echoed input: {text}");
        assert!(v["error"]["message"].is_string() && v["error"]["type"].is_string(), "case {i}: {text}");
    }
    let (s, v, _) =
        send(&f.state, "POST", "/v1/chat/completions", k, Some(&chat_body(json!({"max_tokens": 60})))).await;
    assert_eq!((s, v["error"]["code"].clone()), (StatusCode::BAD_REQUEST, json!("context_length_exceeded")));
    assert!(f.engine.seen.lock().unwrap().is_empty());
}

#[tokio::test]
async fn routing_models_404_405_and_queue_full() {
    let f = fixture();
    let k = Some(f.inference.as_str());
    let (s, v, _) = send(&f.state, "GET", "/v1/models", k, None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["data"][0]["id"], "test-model");
    assert_eq!(v["data"][0]["metadata"]["weights_fingerprint"], "ab".repeat(32));
    assert_eq!(send(&f.state, "GET", "/v1/models/test-model", k, None).await.0, StatusCode::OK);
    let (s, v, text) = send(&f.state, "GET", "/v1/models/CANARY-x%FF", k, None).await;
    assert_eq!((s, v["error"]["code"].clone()), (StatusCode::NOT_FOUND, json!("model_not_found")));
    assert!(!text.contains("CANARY"));
    let (s, _, text) = send(&f.state, "GET", "/v2/CANARY?q=CANARY", k, None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert!(!text.contains("CANARY"));
    assert_eq!(send(&f.state, "GET", "/v1/chat/completions", k, None).await.0, StatusCode::METHOD_NOT_ALLOWED);
    f.engine.queue_full.store(true, Ordering::Relaxed);
    let req = Request::post("/v1/chat/completions")
        .header(header::AUTHORIZATION, format!("Bearer {}", f.inference))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(chat_body(json!({}))))
        .unwrap();
    let resp = app(f.state.clone()).oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(resp.headers()[header::RETRY_AFTER], "3");
    // Wrong content type.
    let req = Request::post("/v1/chat/completions")
        .header(header::AUTHORIZATION, format!("Bearer {}", f.inference))
        .header(header::CONTENT_TYPE, "text/plain")
        .body(Body::from(chat_body(json!({}))))
        .unwrap();
    assert_eq!(app(f.state.clone()).oneshot(req).await.unwrap().status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn panic_in_handler_is_a_500_and_the_server_keeps_serving() {
    let f = fixture();
    let body = chat_body(json!({"messages": [{"role": "user", "content": "PANIC"}]}));
    let (s, v, text) = send(&f.state, "POST", "/v1/chat/completions", Some(&f.inference), Some(&body)).await;
    assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(v["error"]["message"].as_str().unwrap().contains("request id req_"));
    assert!(!text.contains("PANIC"));
    let (s, _, _) =
        send(&f.state, "POST", "/v1/chat/completions", Some(&f.inference), Some(&chat_body(json!({})))).await;
    assert_eq!(s, StatusCode::OK);
}

#[tokio::test]
async fn dropping_a_stream_cancels_the_generation() {
    let f = fixture();
    f.engine.hang.store(true, Ordering::Relaxed);
    let req = Request::post("/v1/chat/completions")
        .header(header::AUTHORIZATION, format!("Bearer {}", f.inference))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(chat_body(json!({"stream": true}))))
        .unwrap();
    let resp = app(f.state.clone()).oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let cancel = f.engine.cancels.lock().unwrap()[0].clone();
    assert!(!cancel.is_cancelled());
    drop(resp); // the client goes away
    for _ in 0..100 {
        if cancel.is_cancelled() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("generation was not cancelled after the client disconnected");
}

#[tokio::test]
async fn logprobs_in_chat_and_completions_format() {
    let f = fixture();
    let body = chat_body(json!({"logprobs": true, "top_logprobs": 2}));
    let (s, v, _) = send(&f.state, "POST", "/v1/chat/completions", Some(&f.inference), Some(&body)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let content = &v["choices"][0]["logprobs"]["content"];
    assert_eq!(content.as_array().unwrap().len(), 2);
    assert_eq!(content[0]["token"], "H");
    assert_eq!(content[0]["logprob"], -0.5);
    assert_eq!(content[0]["bytes"], json!([72]));
    assert_eq!(content[0]["top_logprobs"][1]["token"], "J");
    let body = chat_body(json!({"top_logprobs": 2}));
    let (s, v, _) = send(&f.state, "POST", "/v1/chat/completions", Some(&f.inference), Some(&body)).await;
    assert_eq!((s, v["error"]["param"].clone()), (StatusCode::BAD_REQUEST, json!("top_logprobs")));
    let body = serde_json::to_vec(&json!({"model": "test-model", "prompt": "ab", "logprobs": 1})).unwrap();
    let (_, v, _) = send(&f.state, "POST", "/v1/completions", Some(&f.inference), Some(&body)).await;
    let lp = &v["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"], json!(["H", " "]));
    assert_eq!(lp["text_offset"], json!([0, 1]));
    assert_eq!(lp["top_logprobs"][0], json!({"H": -0.5}));
}

// ---- audit trail -------------------------------------------------------------

/// Every record of the fixture's trail (verified while read).
fn trail(f: &Fixture) -> Vec<AuditRecord> {
    let key = f.audit_key.load().unwrap();
    let mut out = Vec::new();
    read_trail(&f.audit_dir.path().join("trail"), &key, |r, _| out.push(r.clone())).unwrap();
    out
}

fn records_of<'a>(recs: &'a [AuditRecord], request_id: &str) -> Vec<&'a AuditRecord> {
    recs.iter().filter(|r| r.request_id.as_deref() == Some(request_id)).collect()
}

/// Every file under `dir`, concatenated (to scan the trail's raw bytes).
fn raw_bytes(dir: &std::path::Path) -> Vec<u8> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(raw_bytes(&p));
        } else {
            out.extend(std::fs::read(&p).unwrap());
        }
    }
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

async fn post_chat(f: &Fixture, body: &[u8]) -> (StatusCode, String, String) {
    let mut req = Request::post("/v1/chat/completions")
        .header(header::AUTHORIZATION, format!("Bearer {}", f.inference))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_vec()))
        .unwrap();
    let peer: std::net::SocketAddr = "127.0.0.9:40000".parse().unwrap();
    req.extensions_mut().insert(axum::extract::ConnectInfo(peer));
    let resp = app(f.state.clone()).oneshot(req).await.unwrap();
    let status = resp.status();
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
    (status, id, String::from_utf8_lossy(&bytes).into_owned())
}

const SECRET_PROMPT: &str = "Patient Zebulon Quartermaine, MRN 88-1234-canary";

#[tokio::test]
async fn audit_success_writes_started_and_completed_without_text() {
    let f = fixture();
    let body = serde_json::to_vec(&json!({
        "model": "test-model", "messages": [{"role": "user", "content": SECRET_PROMPT}],
        "max_tokens": 5, "temperature": 0.5, "seed": 11,
    }))
    .unwrap();
    let (s, id, text) = post_chat(&f, &body).await;
    assert_eq!(s, StatusCode::OK, "{text}");
    assert!(text.contains("Hello world"));
    // Streaming and completions are audited too.
    let body_stream = chat_body(json!({"stream": true}));
    let (s, sid, text) = post_chat(&f, &body_stream).await;
    assert_eq!(s, StatusCode::OK);
    assert!(text.ends_with("data: [DONE]\n\n"));
    let (s, v, _) = send(
        &f.state,
        "POST",
        "/v1/completions",
        Some(&f.inference),
        Some(br#"{"model":"test-model","prompt":["ab","cd"],"max_tokens":1}"#),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let cid = v["id"].as_str().unwrap().strip_prefix("cmpl-").unwrap().to_string();

    let recs = trail(&f);
    let mine = records_of(&recs, &id);
    assert_eq!(mine.iter().map(|r| r.kind.as_str()).collect::<Vec<_>>(), ["inference.started", "inference.completed"]);
    let (st, done) = (mine[0], mine[1]);
    // The canonical prompt: the rendered template text ("user" + content for ByteCodec).
    let canonical = Phi::new(format!("user{SECRET_PROMPT}"));
    assert_eq!(st.prompt_hmac.as_deref(), Some(f.audit.hmac(&canonical).as_str()));
    assert_eq!(done.prompt_hmac, st.prompt_hmac);
    assert_eq!(done.completion_hmac.as_deref(), Some(f.audit.hmac(&Phi::new("Hello world".to_string())).as_str()));
    let p = st.principal.as_ref().unwrap();
    assert_eq!((p.id.as_str(), p.kind.as_str(), p.roles.clone()), ("alice", "human", vec!["inference".to_string()]));
    assert_eq!(st.source_addr.as_deref(), Some("127.0.0.9:40000"));
    assert_eq!(st.operation.as_deref(), Some("chat.completions"));
    let m = st.model.as_ref().unwrap();
    assert_eq!((m.id.as_str(), m.weights_fingerprint.clone()), ("test-model", "ab".repeat(32)));
    let params = st.params.as_ref().unwrap();
    assert_eq!(
        (params.max_tokens, params.temperature, params.seed, params.stream),
        (Some(5), Some(0.5), Some(11), Some(false))
    );
    assert_eq!(done.tokens.map(|t| (t.prompt, t.completion)), Some((SECRET_PROMPT.len() as u32 + 4, 2)));
    assert!(done.latency_us.is_some());
    assert!(st.seq < done.seq);
    // Streaming: both records, completion HMAC over the streamed text.
    let ms = records_of(&recs, &sid);
    assert_eq!(ms.iter().map(|r| r.kind.as_str()).collect::<Vec<_>>(), ["inference.started", "inference.completed"]);
    assert_eq!(ms[1].completion_hmac.as_deref(), Some(f.audit.hmac(&Phi::new("Hello world".to_string())).as_str()));
    // Completions: prompt HMAC over the prompts concatenated; completion over the choices in order.
    let mc = records_of(&recs, &cid);
    assert_eq!(mc.len(), 2);
    assert_eq!(mc[0].prompt_hmac.as_deref(), Some(f.audit.hmac(&Phi::new("abcd".to_string())).as_str()));
    assert_eq!(mc[1].completion_hmac.as_deref(), Some(f.audit.hmac(&Phi::new("HelloHello".to_string())).as_str()));
    // No text, anywhere in the trail's files.
    let raw = raw_bytes(f.audit_dir.path());
    assert!(!contains(&raw, SECRET_PROMPT.as_bytes()) && !contains(&raw, b"Zebulon"));
    assert!(!contains(&raw, b"Hello world"));
}

#[tokio::test]
async fn audit_started_failure_is_503_and_the_engine_never_runs() {
    let f = fixture();
    f.audit.inject_write_failures(1_000_000);
    let (s, _id, text) = post_chat(&f, &chat_body(json!({}))).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["error"]["type"], "service_unavailable");
    assert!(f.engine.seen.lock().unwrap().is_empty(), "the model must not run without a durable record");
    let (s, ready, _) = send(&f.state, "GET", "/ready", Some(&f.inference), None).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(ready["reasons"], json!(["audit_trail_unavailable"]), "/ready says why");
    assert_eq!(ready["error"]["code"], "not_ready");
    let (_, _, metrics) = send(&f.state, "GET", "/metrics", Some(&f.metrics_only), None).await;
    assert!(metrics.contains("salus_audit_healthy 0"), "the fail-closed state is a metric");
    assert!(!metrics.contains("salus_audit_write_failures_total 0"), "failures are counted");
    // Still refused while unhealthy (streaming too).
    let (s, _, _) = post_chat(&f, &chat_body(json!({"stream": true}))).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert!(f.engine.seen.lock().unwrap().is_empty());
    // The disk recovers: the writer's probe heals the log, /ready and requests come back.
    f.audit.inject_write_failures(0);
    let mut ready = false;
    for _ in 0..100 {
        if send(&f.state, "GET", "/ready", Some(&f.inference), None).await.0 == StatusCode::OK {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ready, "/ready did not recover after the audit trail became writable");
    assert_eq!(post_chat(&f, &chat_body(json!({}))).await.0, StatusCode::OK);
}

#[tokio::test]
async fn audit_completion_failure_withholds_the_output() {
    let f = fixture();
    *f.engine.break_audit_on_submit.lock().unwrap() = Some(f.audit.clone());
    let (s, id, text) = post_chat(&f, &chat_body(json!({}))).await;
    assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR, "{text}");
    assert_eq!(f.engine.seen.lock().unwrap().len(), 1, "the model ran");
    assert!(!text.contains("Hello") && !text.contains("world"), "output must be withheld: {text}");
    assert!(text.contains(&id), "the 500 names the request id");
    f.audit.inject_write_failures(0);
    *f.engine.break_audit_on_submit.lock().unwrap() = None;
    // The failed write left a partial batch; once healthy again the writer has cut it.
    for _ in 0..200 {
        if f.audit.is_healthy() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(f.audit.is_healthy());
    let recs = trail(&f);
    let mine = records_of(&recs, &id);
    assert_eq!(mine.iter().map(|r| r.kind.as_str()).collect::<Vec<_>>(), ["inference.started"]);
}

#[tokio::test]
async fn audit_auth_denied_and_cancelled_are_recorded() {
    let f = fixture();
    let (s, _, _) =
        send(&f.state, "POST", "/v1/chat/completions", Some("sk-salus-wrong"), Some(&chat_body(json!({})))).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _, _) = send(&f.state, "GET", "/metrics", Some(&f.inference), None).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    // A streaming client that goes away mid-generation.
    f.engine.hang.store(true, Ordering::Relaxed);
    let req = Request::post("/v1/chat/completions")
        .header(header::AUTHORIZATION, format!("Bearer {}", f.inference))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(chat_body(json!({"stream": true}))))
        .unwrap();
    let resp = app(f.state.clone()).oneshot(req).await.unwrap();
    let sid = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    drop(resp);
    let mut recs = Vec::new();
    for _ in 0..200 {
        recs = trail(&f);
        if records_of(&recs, &sid).len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let ms = records_of(&recs, &sid);
    assert_eq!(ms.iter().map(|r| r.kind.as_str()).collect::<Vec<_>>(), ["inference.started", "inference.cancelled"]);
    assert!(ms[1].completion_hmac.is_none());
    // Denials are recorded coalesced, at the next interval (here: flushed now).
    f.state.denials().flush_blocking(false).unwrap();
    let recs = trail(&f);
    let denied: Vec<&AuditRecord> = recs.iter().filter(|r| r.kind == "auth.denied").collect();
    assert_eq!(denied.len(), 2);
    let reason = |r: &str| *denied.iter().find(|d| d.outcome_reason.as_deref() == Some(r)).unwrap();
    let unauthorized = reason("invalid_api_key");
    assert!(unauthorized.principal.is_none());
    assert_eq!(unauthorized.detail.as_ref().unwrap()["count"], 1);
    assert_eq!(unauthorized.detail.as_ref().unwrap()["routes"], json!(["/v1/chat/completions"]));
    let forbidden = reason("insufficient_permissions");
    assert_eq!(forbidden.principal.as_ref().map(|p| p.id.as_str()), Some("alice"));
    let raw = raw_bytes(f.audit_dir.path());
    assert!(!contains(&raw, b"sk-salus-wrong") && !contains(&raw, f.inference.as_bytes()));
}

/// OIDC sign-in, session timeout, per-principal limits, break-glass.
mod access;
/// What benchmark and evaluation clients send (vLLM extensions, inert OpenAI fields).
mod compatibility;
/// Denial-of-service regressions (audit flood, blocking tokenization, oversized prompts).
mod hardening;
/// Probes that need no API key.
mod probes;
/// Review attestations and auditor access over the API.
mod reviews;
/// Structured outputs: constraints compiled, cached, audited, refused.
mod structured;
/// Tool calling: requests, history, parsed calls, streamed deltas, audit.
mod tools;
/// OpenTelemetry traces: spans, parents, timings, no request text.
mod traces;
