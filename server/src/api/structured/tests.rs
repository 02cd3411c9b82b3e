use super::*;
use serde_json::json;

fn parse(body: Value) -> Result<Option<RequestedConstraint>, ApiError> {
    let Value::Object(m) = body else { panic!() };
    let mut f = Fields::new(m);
    let r = parse_constraint(&mut f, &LimitsConfig::default());
    if r.is_ok() {
        f.finish(&[])?;
    }
    r
}

#[test]
fn spellings() {
    let c = parse(json!({"response_format": {"type": "text"}})).unwrap();
    assert!(c.is_none());
    let c = parse(json!({"response_format": {"type": "json_object"}})).unwrap().unwrap();
    assert!(matches!(c.spec, ConstraintSpec::JsonObject));
    let c = parse(json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "strict": true, "schema": {"type": "object", "b": 1, "a": 2}}}}))
        .unwrap()
        .unwrap();
    // Member order as sent.
    assert_eq!(c.spec.canonical_text().expose(), r#"{"type":"object","b":1,"a":2}"#);
    let c = parse(json!({"structured_outputs": {"json": "{\"type\": \"string\"}", "whitespace_pattern": " ?"}}))
        .unwrap()
        .unwrap();
    assert_eq!(
        (c.param, c.spec.canonical_text().expose().as_str()),
        ("structured_outputs", "{\"type\": \"string\"}\n ?")
    );
    let c = parse(json!({"structured_outputs": {"choice": ["a", "b"]}})).unwrap().unwrap();
    assert_eq!(c.spec.kind(), salus_models::ConstraintKind::Choice);
    let c = parse(json!({"guided_regex": "[0-9]+"})).unwrap().unwrap();
    assert_eq!(c.spec.kind(), salus_models::ConstraintKind::Regex);
}

#[test]
fn refusals_name_the_field() {
    let param = |body: Value| match parse(body) {
        Err(e) => e.body()["error"]["param"].as_str().map(String::from),
        Ok(_) => panic!("accepted"),
    };
    assert_eq!(param(json!({"response_format": {"type": "xml"}})).as_deref(), Some("response_format"));
    assert_eq!(
        param(json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}})).as_deref(),
        Some("response_format")
    );
    assert_eq!(
        param(json!({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}})).as_deref(),
        Some("structured_outputs")
    );
    assert_eq!(
        param(json!({"structured_outputs": {"regex": "a", "choice": ["a"]}})).as_deref(),
        Some("structured_outputs")
    );
    assert_eq!(param(json!({"structured_outputs": {}})).as_deref(), Some("structured_outputs"));
    assert_eq!(param(json!({"structured_outputs": {"choice": []}})).as_deref(), Some("structured_outputs"));
    assert_eq!(
        param(json!({"structured_outputs": {"regex": "a", "whitespace_pattern": " "}})).as_deref(),
        Some("structured_outputs")
    );
    assert_eq!(
        param(json!({"structured_outputs": {"regex": "a", "structural_tag": {}}})).as_deref(),
        Some("structural_tag")
    );
    let big = "x".repeat(70 * 1024);
    let e = parse(json!({"structured_outputs": {"regex": big}})).unwrap_err();
    assert_eq!(e.code(), Some("schema_too_large"));
    assert_eq!(e.body()["error"]["param"], "structured_outputs");
}

#[tokio::test]
async fn cache_is_per_scope_and_bounded() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let cache = GrammarCache::new(2, 1);
    let count = Arc::new(AtomicUsize::new(0));
    let compile = |count: Arc<AtomicUsize>| {
        move |spec: &ConstraintSpec| {
            count.fetch_add(1, Ordering::SeqCst);
            let c = salus_models::GrammarCompiler::from_token_bytes((0..128u8).map(|b| vec![b]).collect(), 128, &[0])?;
            c.compile(spec)
        }
    };
    let spec = |s: &str| ConstraintSpec::Regex(Phi::new(s.into()));
    let timeout = Duration::from_secs(10);
    let (_, o) = cache.get_or_compile("alice", spec("a+"), timeout, compile(count.clone())).await.unwrap();
    assert_eq!(o, CacheOutcome::Compiled);
    let (_, o) = cache.get_or_compile("alice", spec("a+"), timeout, compile(count.clone())).await.unwrap();
    assert_eq!(o, CacheOutcome::Hit);
    // Another principal with the same bytes compiles its own.
    let (_, o) = cache.get_or_compile("bob", spec("a+"), timeout, compile(count.clone())).await.unwrap();
    assert_eq!(o, CacheOutcome::Compiled);
    let (_, o) = cache.get_or_compile("alice", spec("b+"), timeout, compile(count.clone())).await.unwrap();
    assert_eq!(o, CacheOutcome::Compiled);
    assert_eq!(cache.len(), 2);
    assert_eq!(count.load(Ordering::SeqCst), 3);
    let r = cache.get_or_compile("alice", spec("(a"), timeout, compile(count.clone())).await;
    assert!(matches!(r, Err(CompileFailure::Refused(GrammarError::InvalidRegex { .. }))));
    let slow = |_: &ConstraintSpec| -> Result<CompiledGrammar, GrammarError> {
        std::thread::sleep(Duration::from_millis(300));
        Err(GrammarError::TooComplex)
    };
    let r = cache.get_or_compile("alice", spec("c+"), Duration::from_millis(50), slow).await;
    assert!(matches!(r, Err(CompileFailure::Timeout)));
}
