//! OpenTelemetry traces: the spans of a request, their parent, their timings,
//! and nothing of the request's text.

use opentelemetry::trace::{SpanId, SpanKind, TraceId};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{Sampler, SpanData, SpanExporter};

use super::*;
use crate::telemetry::SPAN_ATTRIBUTES;

/// Keeps every exported span.
#[derive(Debug, Clone, Default)]
struct Collected(Arc<Mutex<Vec<SpanData>>>);

impl SpanExporter for Collected {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        self.0.lock().unwrap().extend(batch);
        Ok(())
    }
}

impl Collected {
    fn spans(&self) -> Vec<SpanData> {
        self.0.lock().unwrap().clone()
    }
    fn clear(&self) {
        self.0.lock().unwrap().clear();
    }
}

const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

struct Traced {
    state: AppState,
    key: String,
    spans: Collected,
}

fn traced(sampler: Sampler) -> Traced {
    let mut store = KeyStore::default();
    let now = OffsetDateTime::now_utc();
    let key = store.create("svc-ehr", PrincipalKind::Service, &[Permission::Inference], None, now).unwrap();
    let spans = Collected::default();
    let telemetry = Telemetry::with_exporter(spans.clone(), "test-model", sampler);
    let built = build_state_traced(store, &AuthConfig::default(), telemetry);
    Traced { state: built.state, key: key.secret.to_string(), spans }
}

fn request(uri: &str, key: Option<&str>, headers: &[(&str, &str)], body: Option<Vec<u8>>) -> Request<Body> {
    let mut b = Request::builder().method(if body.is_some() { "POST" } else { "GET" }).uri(uri);
    if let Some(k) = key {
        b = b.header(header::AUTHORIZATION, format!("Bearer {k}"));
    }
    for (name, value) in headers {
        b = b.header(*name, *value);
    }
    match body {
        Some(bytes) => b.header(header::CONTENT_TYPE, "application/json").body(Body::from(bytes)).unwrap(),
        None => b.body(Body::empty()).unwrap(),
    }
}

fn attr(span: &SpanData, key: &str) -> Option<String> {
    span.attributes.iter().find(|kv| kv.key.as_str() == key).map(|kv| kv.value.to_string())
}

fn named<'a>(spans: &'a [SpanData], name: &str) -> Vec<&'a SpanData> {
    spans.iter().filter(|s| s.name == name).collect()
}

/// Every attribute of every span is one of the documented keys.
fn assert_only_documented_attributes(spans: &[SpanData]) {
    for s in spans {
        for kv in &s.attributes {
            assert!(SPAN_ATTRIBUTES.contains(&kv.key.as_str()), "span {} has attribute {}", s.name, kv.key);
        }
    }
}

#[tokio::test]
async fn a_streamed_chat_is_one_server_span_under_the_clients_parent_with_its_phases_inside() {
    let t = traced(Sampler::AlwaysOn);
    let traceparent = format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01");
    let body = chat_body(json!({"stream": true}));
    let req = request("/v1/chat/completions", Some(&t.key), &[("traceparent", &traceparent)], Some(body));
    let resp = app(t.state.clone()).oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    // The request span covers the whole stream: nothing is exported before its end.
    assert!(t.spans.spans().iter().all(|s| s.name != "POST /v1/chat/completions"));
    let text = String::from_utf8(axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap().to_vec()).unwrap();
    assert!(text.contains("[DONE]"));
    let spans = t.spans.spans();
    assert_only_documented_attributes(&spans);
    let roots = named(&spans, "POST /v1/chat/completions");
    assert_eq!(roots.len(), 1, "{spans:#?}");
    let root = roots[0];
    assert_eq!(root.span_kind, SpanKind::Server);
    assert_eq!(root.span_context.trace_id(), TraceId::from_hex(CLIENT_TRACE).unwrap());
    assert_eq!(root.parent_span_id, SpanId::from_hex(CLIENT_SPAN).unwrap());
    assert!(root.parent_span_is_remote);
    assert_eq!(attr(root, "http.route").as_deref(), Some("/v1/chat/completions"));
    assert_eq!(attr(root, "http.request.method").as_deref(), Some("POST"));
    assert_eq!(attr(root, "http.response.status_code").as_deref(), Some("200"));
    assert_eq!(attr(root, "salus.principal").as_deref(), Some("svc-ehr"));
    assert_eq!(attr(root, "gen_ai.request.model").as_deref(), Some("test-model"));
    assert_eq!(attr(root, "gen_ai.operation.name").as_deref(), Some("chat"));
    assert_eq!(attr(root, "gen_ai.usage.output_tokens").as_deref(), Some("2"));
    assert!(attr(root, "salus.request_id").is_some_and(|id| id.starts_with("req_")));
    // Children: queue → prefill → decode, and the two audit writes, all inside the request span.
    let one = |name: &str| {
        let found = named(&spans, name);
        assert_eq!(found.len(), 1, "{name}: {spans:#?}");
        found[0]
    };
    let (queue, prefill, decode) = (one("queue"), one("prefill"), one("decode"));
    let audits = named(&spans, "audit.write");
    let events: Vec<Option<String>> = audits.iter().map(|s| attr(s, "salus.audit.event")).collect();
    assert_eq!(events, [Some("inference.started".to_string()), Some("inference.completed".to_string())]);
    for child in [queue, prefill, decode].into_iter().chain(audits.iter().copied()) {
        assert_eq!(child.parent_span_id, root.span_context.span_id(), "{}", child.name);
        assert_eq!(child.span_context.trace_id(), root.span_context.trace_id());
        assert!(child.start_time >= root.start_time && child.end_time <= root.end_time, "{}", child.name);
        assert!(child.start_time <= child.end_time, "{}", child.name);
    }
    assert!(audits[0].end_time <= queue.start_time, "inference.started is durable before submission");
    assert!(queue.end_time <= prefill.start_time && prefill.end_time <= decode.start_time);
    assert!(decode.end_time <= audits[1].start_time, "inference.completed after the last token");
    assert_eq!(attr(decode, "gen_ai.usage.output_tokens").as_deref(), Some("2"));
    assert_eq!(attr(audits[1], "salus.audit.written").as_deref(), Some("true"));
}

#[tokio::test]
async fn invalid_traceparents_start_a_new_trace_and_tracestate_is_never_copied() {
    let t = traced(Sampler::AlwaysOn);
    let canary = "zzcanary7f3a91";
    for bad in [
        format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}"),                      // no flags
        format!("00-00000000000000000000000000000000-{CLIENT_SPAN}-01"), // zero trace id
        format!("00-{CLIENT_TRACE}-0000000000000000-01"),                // zero parent id
        format!("ff-{CLIENT_TRACE}-{CLIENT_SPAN}-01"),                   // version ff
        format!("00-{canary}-{CLIENT_SPAN}-01"),
        canary.to_string(),
    ] {
        t.spans.clear();
        let headers = [("traceparent", bad.as_str()), ("tracestate", "vendor=zzcanary7f3a91")];
        let req = request("/v1/models", Some(&t.key), &headers, None);
        let resp = app(t.state.clone()).oneshot(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{bad}");
        drop(resp);
        let spans = t.spans.spans();
        assert_eq!(spans.len(), 1, "{bad}: {spans:#?}");
        let root = &spans[0];
        assert_ne!(root.span_context.trace_id(), TraceId::from_hex(CLIENT_TRACE).unwrap(), "{bad}");
        assert_eq!(root.parent_span_id, SpanId::INVALID, "{bad}");
        assert!(!format!("{spans:?}").contains(canary), "{bad}");
    }
    // A valid parent with a tracestate: the parent is taken, its state is not.
    t.spans.clear();
    let good = format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01");
    let req =
        request("/v1/models", Some(&t.key), &[("traceparent", &good), ("tracestate", "vendor=zzcanary7f3a91")], None);
    drop(app(t.state.clone()).oneshot(req).await.unwrap());
    let spans = t.spans.spans();
    assert_eq!(spans[0].span_context.trace_id(), TraceId::from_hex(CLIENT_TRACE).unwrap());
    assert!(!format!("{spans:?}").contains(canary));
}

#[tokio::test]
async fn no_request_text_reaches_a_span() {
    let t = traced(Sampler::AlwaysOn);
    let canary = "zzcanary5b0c22";
    let body = serde_json::to_vec(&json!({
        "model": "test-model",
        "user": canary,
        "metadata": {"note": canary},
        "messages": [{"role": "system", "content": canary}, {"role": "user", "content": canary}],
        "stop": [canary],
        "tools": [{"type": "function", "function": {"name": "lookup", "description": canary,
                   "parameters": {"type": "object", "properties": {canary: {"type": "string"}}}}}],
    }))
    .unwrap();
    let uri = format!("/v1/chat/completions?{canary}={canary}");
    let headers = [("x-note", canary), ("user-agent", canary)];
    let req = request(&uri, Some(&t.key), &headers, Some(body));
    let resp = app(t.state.clone()).oneshot(req).await.unwrap();
    let _ = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
    // Refused ones too: a bad key, malformed JSON, an unknown route.
    for req in [
        request("/v1/chat/completions", Some(canary), &[], Some(chat_body(json!({})))),
        request("/v1/chat/completions", Some(&t.key), &[], Some(format!("{{\"{canary}\": ").into_bytes())),
        request(&format!("/{canary}"), Some(&t.key), &[], None),
    ] {
        let _ = app(t.state.clone()).oneshot(req).await.unwrap();
    }
    let spans = t.spans.spans();
    assert!(spans.len() >= 4, "{spans:#?}");
    assert_only_documented_attributes(&spans);
    let all = format!("{spans:?}");
    assert!(!all.contains(canary), "a span carries request text");
    // The refusals are spans with their status and error code, and no principal.
    let unauthorized: Vec<_> =
        spans.iter().filter(|s| attr(s, "http.response.status_code").as_deref() == Some("401")).collect();
    assert_eq!(unauthorized.len(), 1);
    assert_eq!(attr(unauthorized[0], "salus.principal"), None);
    assert!(attr(unauthorized[0], "error.type").is_some());
    assert!(
        spans.iter().any(|s| s.name == "GET" && attr(s, "http.route").is_none()),
        "an unknown route is named by its method"
    );
}

#[tokio::test]
async fn probes_are_not_traced_and_the_clients_sampled_flag_decides() {
    // Sample nothing of our own: only what a client's sampled traceparent asks for.
    let t = traced(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(0.0))));
    for (headers, exported) in [
        (vec![], 0),
        (vec![("traceparent", format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-00"))], 0),
        (vec![("traceparent", format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"))], 1),
    ] {
        t.spans.clear();
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        drop(app(t.state.clone()).oneshot(request("/v1/models", Some(&t.key), &headers, None)).await.unwrap());
        assert_eq!(t.spans.spans().len(), exported, "{headers:?}");
    }
    t.spans.clear();
    let sampled = format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01");
    for uri in ["/health", "/ready", "/metrics"] {
        drop(
            app(t.state.clone()).oneshot(request(uri, Some(&t.key), &[("traceparent", &sampled)], None)).await.unwrap(),
        );
    }
    assert!(t.spans.spans().is_empty(), "probes are not traced by default");
}
