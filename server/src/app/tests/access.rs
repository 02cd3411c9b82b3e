//! People and policy through the router: OIDC sign-in, session timeout,
//! per-principal limits and break-glass, with their audit records.

use std::sync::atomic::AtomicUsize;

use super::*;
use crate::auth::oidc::test_support::{claims, https_server, jwks, TestKey};
use crate::auth::policy::LimitSpec;

const ISS: &str = "https://idp.example.org/realms/hospital";

/// `[auth]` from TOML (so the tests also cover the config's shape).
fn auth_config(toml_text: &str) -> AuthConfig {
    let cfg: AuthConfig = toml::from_str(toml_text).unwrap();
    let all = Config { auth: cfg.clone(), ..Config::default() };
    all.validate().unwrap();
    cfg
}

/// An issuer `hosp` reading `jwks` from a file, mapping `clinician` and `oncall`.
fn oidc_toml(jwks_path: &std::path::Path, extra: &str) -> String {
    format!(
        r#"
[[oidc]]
alias = "hosp"
issuer = "{ISS}"
audience = "salus"
jwks_file = "{}"
leeway_secs = 0
[oidc.roles.clinician]
permissions = ["inference"]
[oidc.roles.oncall]
permissions = ["inference", "break_glass"]
[oidc.roles.records]
permissions = ["audit.read"]
{extra}
"#,
        jwks_path.display()
    )
}

struct Oidc {
    built: BuiltState,
    key: TestKey,
    _dir: tempfile::TempDir,
}

fn oidc_state(store: KeyStore, extra: &str) -> Oidc {
    let dir = tempfile::tempdir().unwrap();
    let key = TestKey::ec("ec-1");
    let path = dir.path().join("jwks.json");
    std::fs::write(&path, jwks(&[&key]).to_string()).unwrap();
    let built = build_state(store, &auth_config(&oidc_toml(&path, extra)));
    Oidc { built, key, _dir: dir }
}

async fn post(state: &AppState, bearer: &str, headers: &[(&str, &str)]) -> (StatusCode, Value, axum::http::HeaderMap) {
    let mut b = Request::builder()
        .method("POST")
        .uri("/v1/chat/completions")
        .header(header::AUTHORIZATION, format!("Bearer {bearer}"))
        .header(header::CONTENT_TYPE, "application/json");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let resp = app(state.clone()).oneshot(b.body(Body::from(chat_body(json!({})))).unwrap()).await.unwrap();
    let (status, headers) = (resp.status(), resp.headers().clone());
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null), headers)
}

fn records(b: &BuiltState) -> Vec<AuditRecord> {
    let key = b.audit_key.load().unwrap();
    let mut out = Vec::new();
    read_trail(&b.audit_dir.path().join("trail"), &key, |r, _| out.push(r.clone())).unwrap();
    out
}

fn kinds(recs: &[AuditRecord], kind: &str) -> Vec<AuditRecord> {
    recs.iter().filter(|r| r.kind == kind).cloned().collect()
}

#[tokio::test]
async fn a_signed_in_clinician_is_served_as_a_named_human() {
    let o = oidc_state(KeyStore::default(), "");
    let token = o.key.mint(&claims(ISS, "alice", &["clinician"]));
    let (s, v, _) = post(&o.built.state, &token, &[]).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let recs = records(&o.built);
    let started = kinds(&recs, "inference.started");
    let p = started[0].principal.as_ref().unwrap();
    assert_eq!((p.id.as_str(), p.kind.as_str()), ("hosp:alice", "human"));
    assert_eq!(p.display_name.as_deref(), Some("alice.name"));
    assert_eq!(kinds(&recs, "session.started").len(), 1);
    // No inference role: 403; the records role only.
    let (s, v, _) = post(&o.built.state, &o.key.mint(&claims(ISS, "rita", &["records"])), &[]).await;
    assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::FORBIDDEN, Some("insufficient_permissions")));
    // API keys keep working beside tokens.
    let mut store = KeyStore::default();
    let k =
        store.create("svc", PrincipalKind::Service, &[Permission::Inference], None, OffsetDateTime::now_utc()).unwrap();
    let o = oidc_state(store, "");
    assert_eq!(post(&o.built.state, &k.secret, &[]).await.0, StatusCode::OK);
}

#[tokio::test]
async fn refused_tokens_answer_401_with_their_code_and_never_reach_the_trail() {
    let o = oidc_state(KeyStore::default(), "");
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let mut expired = claims(ISS, "alice", &["clinician"]);
    expired["exp"] = json!(now - 10);
    let mut wrong_aud = claims(ISS, "alice", &["clinician"]);
    wrong_aud["aud"] = json!("another-app");
    let cases = [
        (o.key.mint(&expired), "token_expired"),
        (o.key.mint(&wrong_aud), "token_invalid_audience"),
        (TestKey::ed("stranger").mint(&claims(ISS, "alice", &["clinician"])), "token_unknown_key"),
        ("eyJhbGciOiJub25lIn0.eyJpc3MiOiJ4In0.".to_string(), "token_algorithm_not_allowed"),
    ];
    for (token, code) in &cases {
        let (s, v, h) = post(&o.built.state, token, &[]).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{code}");
        assert_eq!(v["error"]["code"], *code);
        assert_eq!(v["error"]["type"], "authentication_error");
        assert_eq!(h[header::WWW_AUTHENTICATE], "Bearer error=\"invalid_token\"");
        assert!(!v.to_string().contains(token.as_str()));
    }
    o.built.state.denials().flush_blocking(true).unwrap();
    let recs = records(&o.built);
    let reasons: Vec<_> = kinds(&recs, "auth.denied").iter().filter_map(|r| r.outcome_reason.clone()).collect();
    for (_, code) in &cases {
        assert!(reasons.iter().any(|r| r == code), "{code} recorded: {reasons:?}");
    }
    let raw = super::raw_bytes(o.built.audit_dir.path());
    for (token, _) in &cases {
        assert!(!super::contains(&raw, token.as_bytes()));
    }
}

#[tokio::test]
async fn an_idle_session_expires_and_a_fresh_sign_in_starts_a_new_one() {
    let o = oidc_state(KeyStore::default(), "[sessions]\nidle_timeout_secs = 1\nmax_session_secs = 60\n");
    let token = o.key.mint(&claims(ISS, "alice", &["clinician"]));
    assert_eq!(post(&o.built.state, &token, &[]).await.0, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (s, v, _) = post(&o.built.state, &token, &[]).await;
    assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("session_expired")));
    // Still refused: the token predates the expiry (its exp is 10 minutes away).
    assert_eq!(post(&o.built.state, &token, &[]).await.0, StatusCode::UNAUTHORIZED);
    // A token issued now opens a new session.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let fresh = o.key.mint(&claims(ISS, "alice", &["clinician"]));
    assert_eq!(post(&o.built.state, &fresh, &[]).await.0, StatusCode::OK);
    let recs = records(&o.built);
    assert_eq!(kinds(&recs, "session.started").len(), 2);
    let expired = kinds(&recs, "session.expired");
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0].detail.as_ref().unwrap()["reason"], "idle_timeout");
    assert_eq!(expired[0].principal.as_ref().unwrap().id, "hosp:alice");
    // Shutdown ends the open session.
    o.built.state.access().end_sessions_blocking(&o.built.audit);
    let ended = kinds(&records(&o.built), "session.ended");
    assert_eq!(ended[0].detail.as_ref().unwrap()["reason"], "server_stopped");
}

#[tokio::test]
async fn a_human_api_key_times_out_but_a_service_key_does_not() {
    let now = OffsetDateTime::now_utc();
    let mut store = KeyStore::default();
    let human = store.create("hal", PrincipalKind::Human, &[Permission::Inference], None, now).unwrap();
    let service = store.create("svc", PrincipalKind::Service, &[Permission::Inference], None, now).unwrap();
    let built = build_state(store, &auth_config("[sessions]\nidle_timeout_secs = 1\n"));
    for k in [&human, &service] {
        assert_eq!(post(&built.state, &k.secret, &[]).await.0, StatusCode::OK);
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(post(&built.state, &human.secret, &[]).await.1["error"]["code"], "session_expired");
    assert_eq!(post(&built.state, &service.secret, &[]).await.0, StatusCode::OK);
}

#[tokio::test]
async fn per_minute_concurrency_and_network_limits_answer_429_and_403() {
    let now = OffsetDateTime::now_utc();
    let mut store = KeyStore::default();
    let limited = store.create("lim", PrincipalKind::Service, &[Permission::Inference], None, now).unwrap();
    store.set_limits(&limited.record.id, LimitSpec { requests_per_minute: Some(3), ..LimitSpec::default() }).unwrap();
    let fenced = store.create("fenced", PrincipalKind::Service, &[Permission::Inference], None, now).unwrap();
    let nets = LimitSpec { allowed_cidrs: Some(vec!["10.0.0.0/8".parse().unwrap()]), ..LimitSpec::default() };
    store.set_limits(&fenced.record.id, nets).unwrap();
    let free = store.create("free", PrincipalKind::Service, &[Permission::Inference], None, now).unwrap();
    let built = build_state(store, &auth_config("[limits]\nconcurrent_requests = 8\nmetric_principals = [\"free\"]\n"));
    for i in 0..3 {
        assert_eq!(post(&built.state, &limited.secret, &[]).await.0, StatusCode::OK, "request {i}");
    }
    let (s, v, h) = post(&built.state, &limited.secret, &[]).await;
    assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::TOO_MANY_REQUESTS, Some("rate_limit_exceeded")));
    assert_eq!(v["error"]["type"], "rate_limit_error");
    assert!(h[header::RETRY_AFTER].to_str().unwrap().parse::<u64>().unwrap() >= 1);
    // In-process requests have no peer address: outside every network.
    let (s, v, _) = post(&built.state, &fenced.secret, &[]).await;
    assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::FORBIDDEN, Some("source_not_allowed")));
    assert_eq!(post(&built.state, &free.secret, &[]).await.0, StatusCode::OK);
    let text = built.state.metrics().render(&built.state.engine().stats(), &built.audit.health());
    assert!(text.contains("salus_policy_rejections_total{limit=\"requests_per_minute\"} 1"), "{text}");
    assert!(text.contains("salus_policy_rejections_total{limit=\"source_network\"} 1"));
    assert!(!text.contains("principal=\"lim\""), "principals are not labels unless allowlisted");
}

#[tokio::test]
async fn concurrent_clients_against_a_per_minute_limit_get_exactly_the_limit() {
    let now = OffsetDateTime::now_utc();
    let mut store = KeyStore::default();
    let k = store.create("burst", PrincipalKind::Service, &[Permission::Inference], None, now).unwrap();
    store.set_limits(&k.record.id, LimitSpec { requests_per_minute: Some(10), ..LimitSpec::default() }).unwrap();
    let built = build_state(store, &AuthConfig::default());
    let ok = Arc::new(AtomicUsize::new(0));
    let limited = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..30 {
        let (state, secret, ok, limited) = (built.state.clone(), k.secret.to_string(), ok.clone(), limited.clone());
        tasks.push(tokio::spawn(async move {
            match post(&state, &secret, &[]).await.0 {
                StatusCode::OK => ok.fetch_add(1, Ordering::SeqCst),
                StatusCode::TOO_MANY_REQUESTS => limited.fetch_add(1, Ordering::SeqCst),
                s => panic!("unexpected {s}"),
            };
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // A few requests may refill in the time the burst takes (10/min: one per 6 s).
    assert_eq!(ok.load(Ordering::SeqCst), 10);
    assert_eq!(limited.load(Ordering::SeqCst), 20);
}

#[tokio::test]
async fn tokens_per_minute_are_charged_as_generated() {
    let now = OffsetDateTime::now_utc();
    let mut store = KeyStore::default();
    let k = store.create("tok", PrincipalKind::Service, &[Permission::Inference], None, now).unwrap();
    // "hi" through the byte codec plus "Hello world" (2 tokens): a few tokens per request.
    store.set_limits(&k.record.id, LimitSpec { tokens_per_minute: Some(6), ..LimitSpec::default() }).unwrap();
    let built = build_state(store, &AuthConfig::default());
    assert_eq!(post(&built.state, &k.secret, &[]).await.0, StatusCode::OK);
    let (s, v, _) = post(&built.state, &k.secret, &[]).await;
    assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::TOO_MANY_REQUESTS, Some("rate_limit_exceeded")));
    assert!(v["error"]["message"].as_str().unwrap().contains("tokens_per_minute"));
}

#[tokio::test]
async fn concurrency_slots_are_held_until_the_response_ends() {
    let now = OffsetDateTime::now_utc();
    let mut store = KeyStore::default();
    let k = store.create("one", PrincipalKind::Service, &[Permission::Inference], None, now).unwrap();
    store.set_limits(&k.record.id, LimitSpec { concurrent_requests: Some(1), ..LimitSpec::default() }).unwrap();
    let built = build_state(store, &AuthConfig::default());
    built.engine.hang.store(true, Ordering::Relaxed);
    let (state, secret) = (built.state.clone(), k.secret.to_string());
    let first = tokio::spawn(async move { post(&state, &secret, &[]).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (s, v, _) = post(&built.state, &k.secret, &[]).await;
    assert_eq!(
        (s, v["error"]["message"].as_str().map(|m| m.contains("concurrent_requests"))),
        (StatusCode::TOO_MANY_REQUESTS, Some(true))
    );
    first.abort();
    let _ = first.await;
    built.engine.hang.store(false, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        post(&built.state, &k.secret, &[]).await.0,
        StatusCode::OK,
        "the slot was freed with the dropped response"
    );
}

#[tokio::test]
async fn break_glass_is_refused_without_permission_and_loud_with_it() {
    // The security team's receiver: fails the first delivery, accepts the next.
    let received = Arc::new(Mutex::new(Vec::<Value>::new()));
    let calls = Arc::new(AtomicUsize::new(0));
    let router = {
        let (received, calls) = (received.clone(), calls.clone());
        axum::Router::new().route(
            "/hook",
            axum::routing::post(move |axum::Json(body): axum::Json<Value>| {
                let (received, calls) = (received.clone(), calls.clone());
                async move {
                    if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                        return StatusCode::SERVICE_UNAVAILABLE;
                    }
                    received.lock().unwrap().push(body);
                    StatusCode::NO_CONTENT
                }
            }),
        )
    };
    let (base, ca, _hook_dir) = https_server(router).await;
    let now = OffsetDateTime::now_utc();
    let mut store = KeyStore::default();
    let plain = store.create("nurse", PrincipalKind::Human, &[Permission::Inference], None, now).unwrap();
    let doc = store.create("dr-oncall", PrincipalKind::Human, &[Permission::BreakGlass], None, now).unwrap();
    store.set_limits(&doc.record.id, LimitSpec { requests_per_minute: Some(2), ..LimitSpec::default() }).unwrap();
    let cfg = auth_config(&format!(
        "[break_glass]\nwindow_secs = 2\nnotify_url = \"{base}/hook\"\nnotify_ca_file = \"{}\"\nnotify_attempts = 3\n",
        ca.display()
    ));
    let built = build_state(store, &cfg);
    let reason = "code blue bed 12 CANARY-BG-7731";
    // Without the permission: 403, whatever the request.
    let (s, v, _) = post(&built.state, &plain.secret, &[("Salus-Break-Glass", reason)]).await;
    assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::FORBIDDEN, Some("break_glass_not_permitted")));
    // A reason too short: 400, not echoed (refused before the rate limit is charged).
    let (s, v, _) = post(&built.state, &doc.secret, &[("Salus-Break-Glass", "urgent")]).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(!v.to_string().contains("urgent"));
    // No inference permission: a human on call breaks glass past it.
    let (s, v, _) = post(&built.state, &doc.secret, &[]).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    let (s, v, _) = post(&built.state, &doc.secret, &[("Salus-Break-Glass", reason)]).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // Inside the window: served without the header, past the per-minute limit too.
    for _ in 0..3 {
        assert_eq!(post(&built.state, &doc.secret, &[]).await.0, StatusCode::OK);
    }
    // After the window the rules apply again (the per-minute budget is spent).
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(post(&built.state, &doc.secret, &[]).await.0, StatusCode::TOO_MANY_REQUESTS);
    // The trail: one access.break_glass with rule and reason; the window's inferences flagged.
    let recs = records(&built);
    let uses = kinds(&recs, "access.break_glass");
    assert_eq!(uses.len(), 1);
    let d = uses[0].detail.as_ref().unwrap();
    assert_eq!((d["rule"].as_str(), d["reason"].as_str()), (Some("inference_permission"), Some(reason)));
    assert_eq!(uses[0].principal.as_ref().unwrap().id, "dr-oncall");
    let flagged = kinds(&recs, "inference.started")
        .iter()
        .filter(|r| r.principal.as_ref().unwrap().id == "dr-oncall")
        .map(|r| r.detail.as_ref().is_some_and(|d| d["break_glass"] == true))
        .collect::<Vec<_>>();
    assert_eq!(flagged, vec![true; 4]);
    // The reason is in no response and no trail byte in the clear.
    assert!(!super::contains(&super::raw_bytes(built.audit_dir.path()), reason.as_bytes()));
    // The webhook: retried after the first failure, told who/rule/request, not why.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while received.lock().unwrap().is_empty() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let got = received.lock().unwrap().clone();
    assert_eq!(got.len(), 1, "delivered once, after one failure");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(
        (got[0]["principal"].as_str(), got[0]["rule"].as_str()),
        (Some("dr-oncall"), Some("inference_permission"))
    );
    assert_eq!(got[0]["request_id"], uses[0].request_id.clone().unwrap());
    assert!(!got[0].to_string().contains("CANARY-BG"));
    let text = built.state.metrics().render(&built.state.engine().stats(), &built.audit.health());
    assert!(text.contains("salus_break_glass_total{rule=\"inference_permission\"} 1"));
    assert!(text.contains("salus_break_glass_notification_failures_total 1"));
}
