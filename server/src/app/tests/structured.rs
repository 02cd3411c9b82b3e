//! Structured outputs through the router: a constraint reaches the engine
//! compiled, is audited by kind and HMAC only, is cached per principal, and a
//! refused one never reaches the engine or the trail.

use super::*;

const SCHEMA_CANARY: &str = "CANARY-SCHEMA-Jane-Roe";

fn schema_body(extra: Value) -> Vec<u8> {
    let schema = json!({
        "type": "object",
        "properties": {"urgency": {"enum": [SCHEMA_CANARY, "routine"], "description": SCHEMA_CANARY}},
        "required": ["urgency"]
    });
    let format = json!({
        "response_format": {"type": "json_schema", "json_schema": {"name": "triage", "strict": true, "schema": schema}}
    });
    chat_body(with_fields(format, &extra))
}

#[tokio::test]
async fn a_constraint_reaches_the_engine_and_the_trail_by_kind_and_hmac() {
    let f = fixture();
    let (s, v, text) =
        send(&f.state, "POST", "/v1/chat/completions", Some(&f.inference), Some(&schema_body(json!({})))).await;
    assert_eq!(s, StatusCode::OK, "{text}");
    let d = f.engine.decodes.lock().unwrap()[0].clone();
    assert_eq!(d.constraint.as_ref().map(|g| g.kind()), Some(salus_models::ConstraintKind::JsonSchema));
    let id = v["id"].as_str().unwrap().strip_prefix("chatcmpl-").unwrap().to_string();
    let recs = trail(&f);
    let started = records_of(&recs, &id)[0];
    let params = started.params.as_ref().unwrap();
    assert_eq!(params.constraint.as_deref(), Some("json_schema"));
    // The HMAC of the schema's JSON text as sent (member order kept).
    let sent: Value = serde_json::from_slice(&schema_body(json!({}))).unwrap();
    let canonical = Phi::new(serde_json::to_string(&sent["response_format"]["json_schema"]["schema"]).unwrap());
    assert_eq!(params.constraint_hmac.as_deref(), Some(f.audit.hmac(&canonical).as_str()));
    let raw = raw_bytes(f.audit_dir.path());
    assert!(!contains(&raw, SCHEMA_CANARY.as_bytes()), "the schema reached the trail");
    // vLLM's spelling on completions, and an unconstrained request beside it.
    let body = json!({"model": "test-model", "prompt": "hi", "structured_outputs": {"choice": ["yes", "no"]}});
    let (s, _, text) =
        send(&f.state, "POST", "/v1/completions", Some(&f.inference), Some(&serde_json::to_vec(&body).unwrap())).await;
    assert_eq!(s, StatusCode::OK, "{text}");
    let (s, _, _) =
        send(&f.state, "POST", "/v1/chat/completions", Some(&f.inference), Some(&chat_body(json!({})))).await;
    assert_eq!(s, StatusCode::OK);
    let decodes = f.engine.decodes.lock().unwrap().clone();
    assert_eq!(decodes[1].constraint.as_ref().map(|g| g.kind()), Some(salus_models::ConstraintKind::Choice));
    assert!(decodes[2].constraint.is_none());
}

#[tokio::test]
async fn compiled_grammars_are_cached_per_principal() {
    let f = fixture();
    for key in [&f.inference, &f.inference, &f.other_inference] {
        let (s, _, _) = send(&f.state, "POST", "/v1/chat/completions", Some(key), Some(&schema_body(json!({})))).await;
        assert_eq!(s, StatusCode::OK);
    }
    let decodes = f.engine.decodes.lock().unwrap().clone();
    let g = |i: usize| decodes[i].constraint.clone().unwrap();
    assert!(Arc::ptr_eq(&g(0), &g(1)), "the same principal's schema was compiled twice");
    assert!(!Arc::ptr_eq(&g(0), &g(2)), "another principal got a cached grammar");
    assert_eq!(f.state.grammars().len(), 2);
    let (_, _, metrics) = send(&f.state, "GET", "/metrics", Some(&f.metrics_only), None).await;
    assert!(metrics.contains("salus_output_constraints_total{result=\"cache_hit\"} 1"), "{metrics}");
    assert!(metrics.contains("salus_output_constraints_total{result=\"compiled\"} 2"), "{metrics}");
}

/// A schema is request data: a principal that loses its last active key
/// (revoked in the key-store file, noticed on reload) loses its compiled
/// constraints at once; other principals keep theirs.
#[tokio::test]
async fn a_principal_that_loses_its_last_key_loses_its_cached_grammars() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api-keys.json");
    let now = OffsetDateTime::now_utc();
    let mut store = KeyStore::default();
    let alice = store.create("alice", PrincipalKind::Service, &[Permission::Inference], None, now).unwrap();
    let bob = store.create("bob", PrincipalKind::Service, &[Permission::Inference], None, now).unwrap();
    store.save(&path).unwrap();
    let built =
        build_state_on(KeyStoreHandle::open(path.clone()).unwrap(), &AuthConfig::default(), Telemetry::disabled());
    for key in [alice.secret.to_string(), bob.secret.to_string()] {
        let (s, _, text) =
            send(&built.state, "POST", "/v1/chat/completions", Some(&key), Some(&schema_body(json!({})))).await;
        assert_eq!(s, StatusCode::OK, "{text}");
    }
    assert_eq!(built.state.grammars().len(), 2);
    store.revoke(&alice.record.id, now).unwrap();
    store.save(&path).unwrap();
    built.state.keys().refresh();
    assert_eq!(built.state.grammars().len(), 1, "alice's grammar outlived her key");
    let (s, _, _) =
        send(&built.state, "POST", "/v1/chat/completions", Some(bob.secret.as_ref()), Some(&schema_body(json!({}))))
            .await;
    assert_eq!(s, StatusCode::OK);
    let decodes = built.engine.decodes.lock().unwrap().clone();
    let g = |i: usize| decodes[i].constraint.clone().unwrap();
    assert!(Arc::ptr_eq(&g(1), &g(2)), "bob's grammar is still cached (a hit, not compiled again)");
    assert_eq!(built.state.grammars().len(), 1);
}

#[tokio::test]
async fn refused_constraints_never_reach_the_engine_or_the_trail() {
    let f = fixture();
    let big_enum: Vec<String> = (0..20_000).map(|i| format!("v{i}")).collect();
    let cases: Vec<(Value, &str, &str)> = vec![
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema":
                {"type": "array", "items": {"enum": [SCHEMA_CANARY]}, "uniqueItems": true}}}}),
            "response_format",
            "unsupported_schema_keyword",
        ),
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": 5}}}}),
            "response_format",
            "invalid_schema",
        ),
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema":
                {"type": "string", "format": "password", "description": SCHEMA_CANARY}}}}),
            "response_format",
            "unsupported_schema_format",
        ),
        (
            json!({"response_format": {"type": "json_object"}, "structured_outputs": {"choice": [SCHEMA_CANARY]}}),
            "structured_outputs",
            "invalid_value",
        ),
        (json!({"structured_outputs": {"regex": format!("({SCHEMA_CANARY}")}}), "structured_outputs", "invalid_regex"),
        (json!({"guided_choice": big_enum}), "guided_choice", "schema_too_large"),
    ];
    for (i, (extra, param, code)) in cases.into_iter().enumerate() {
        let body = chat_body(extra);
        let limits_ok = body.len() <= f.state.limits().max_body_bytes;
        let (s, v, text) = send(&f.state, "POST", "/v1/chat/completions", Some(&f.inference), Some(&body)).await;
        if !limits_ok {
            // The fixture's body limit is small: the size case is checked with the default limits below.
            assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
            continue;
        }
        assert_eq!(s, StatusCode::BAD_REQUEST, "case {i}: {text}");
        assert_eq!(
            (v["error"]["param"].as_str(), v["error"]["code"].as_str()),
            (Some(param), Some(code)),
            "case {i}: {text}"
        );
        assert!(!text.contains("CANARY"), "case {i} echoed the constraint: {text}");
    }
    assert!(f.engine.decodes.lock().unwrap().is_empty(), "a refused constraint reached the engine");
    assert!(
        trail(&f).iter().all(|r| !r.kind.starts_with("inference.")),
        "a refused constraint was audited as an inference"
    );
    let (_, _, metrics) = send(&f.state, "GET", "/metrics", Some(&f.metrics_only), None).await;
    assert!(metrics.contains("salus_output_constraints_total{result=\"refused\"} 4"), "{metrics}");
}
