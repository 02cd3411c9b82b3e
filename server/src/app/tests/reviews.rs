//! Review attestations and auditor access through the router.

use super::*;

struct Reviewing {
    built: BuiltState,
    /// Human, inference + review.
    clinician: String,
    /// Another human with inference + review.
    other: String,
    /// Inference only.
    no_review: String,
    /// audit.read only.
    auditor: String,
}

fn reviewing() -> Reviewing {
    let now = OffsetDateTime::now_utc();
    let mut store = KeyStore::default();
    let perms = [Permission::Inference, Permission::Review];
    let clinician = store.create("dr-ada", PrincipalKind::Human, &perms, None, now).unwrap();
    let other = store.create("dr-bo", PrincipalKind::Human, &perms, None, now).unwrap();
    let no_review = store.create("svc", PrincipalKind::Service, &[Permission::Inference], None, now).unwrap();
    let auditor = store.create("compliance", PrincipalKind::Human, &[Permission::Auditor], None, now).unwrap();
    Reviewing {
        built: build_state(store, &AuthConfig::default()),
        clinician: clinician.secret.to_string(),
        other: other.secret.to_string(),
        no_review: no_review.secret.to_string(),
        auditor: auditor.secret.to_string(),
    }
}

fn records(b: &BuiltState) -> Vec<AuditRecord> {
    let key = b.audit_key.load().unwrap();
    let mut out = Vec::new();
    read_trail(&b.audit_dir.path().join("trail"), &key, |r, _| out.push(r.clone())).unwrap();
    out
}

async fn review(state: &AppState, key: &str, body: Value) -> (StatusCode, Value) {
    let (s, v, _) = send(state, "POST", "/v1/reviews", Some(key), Some(&serde_json::to_vec(&body).unwrap())).await;
    (s, v)
}

#[tokio::test]
async fn a_review_is_linked_to_the_completion_it_reviews() {
    let r = reviewing();
    let st = &r.built.state;
    let (s, chat, _) =
        send(st, "POST", "/v1/chat/completions", Some(&r.clinician), Some(&chat_body(json!({"n": 2})))).await;
    assert_eq!(s, StatusCode::OK);
    let response_id = chat["id"].as_str().unwrap().to_string();
    // Pending: the completion, both choices unreviewed.
    let (s, pending, _) = send(st, "GET", "/v1/reviews/pending", Some(&r.clinician), None).await;
    assert_eq!(s, StatusCode::OK, "{pending}");
    assert_eq!(pending["data"][0]["response_id"], response_id);
    assert_eq!(pending["data"][0]["unreviewed_choices"], json!([0, 1]));
    // Accept choice 0, edit choice 1.
    let (s, v) = review(st, &r.clinician, json!({"response_id": response_id, "action": "accepted"})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!((v["object"].as_str(), v["choice"].as_u64()), (Some("review"), Some(0)));
    let edited = "Patient stable; continue current plan. CANARY-EDIT-42";
    let body = json!({"response_id": response_id, "choice": 1, "action": "edited", "edited_text": edited, "reason_code": "incomplete"});
    let (s, v) = review(st, &r.clinician, body).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (_, pending, _) = send(st, "GET", "/v1/reviews/pending", Some(&r.clinician), None).await;
    assert_eq!(pending["data"], json!([]));
    // A second review of choice 0 is a new record.
    let (s, _) = review(st, &r.clinician, json!({"response_id": response_id, "action": "escalated"})).await;
    assert_eq!(s, StatusCode::OK);
    let recs = records(&r.built);
    let completed = recs.iter().find(|x| x.kind == "inference.completed").unwrap();
    assert_eq!(completed.detail.as_ref().unwrap()["choices"], 2);
    let reviews: Vec<_> = recs.iter().filter(|x| x.kind == "review.recorded").collect();
    assert_eq!(reviews.len(), 3);
    for rv in &reviews {
        let d = rv.detail.as_ref().unwrap();
        assert_eq!(d["reviewed_seq"], completed.seq);
        assert_eq!(d["reviewed_event_id"], completed.event_id);
        assert_eq!(d["reviewed_request_id"], completed.request_id.clone().unwrap());
        assert!(d["review_latency_ms"].is_u64());
        assert_eq!(rv.principal.as_ref().unwrap().id, "dr-ada");
    }
    let d = reviews[1].detail.as_ref().unwrap();
    assert_eq!((d["action"].as_str(), d["reason_code"].as_str()), (Some("edited"), Some("incomplete")));
    let expected = r.built.audit.hmac(&Phi::new(edited.to_string()));
    assert_eq!(d["edited_text_hmac"], expected.as_str());
    assert!(!super::contains(&super::raw_bytes(r.built.audit_dir.path()), edited.as_bytes()));
    // The FHIR export links each review to the inference's AuditEvent.
    let fhir = salus_audit::fhir::audit_event(reviews[0]);
    let linked = fhir["entity"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["what"]["reference"] == format!("urn:uuid:{}", completed.event_id));
    assert!(linked, "{fhir}");
}

#[tokio::test]
async fn foreign_unknown_and_malformed_targets_are_the_same_404() {
    let r = reviewing();
    let st = &r.built.state;
    let (_, chat, _) = send(st, "POST", "/v1/chat/completions", Some(&r.clinician), Some(&chat_body(json!({})))).await;
    let id = chat["id"].as_str().unwrap().to_string();
    let cases = [
        (r.other.as_str(), json!({"response_id": id, "action": "accepted"})),
        (
            r.clinician.as_str(),
            json!({"response_id": "chatcmpl-req_00000000000000000000000000000000", "action": "accepted"}),
        ),
        (r.clinician.as_str(), json!({"response_id": "not-an-id", "action": "accepted"})),
        (r.clinician.as_str(), json!({"response_id": id, "choice": 1, "action": "accepted"})),
    ];
    let mut bodies = Vec::new();
    for (key, body) in cases {
        let (s, v) = review(st, key, body).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
        assert_eq!(v["error"]["code"], "response_not_found");
        bodies.push(v["error"]["message"].clone());
    }
    assert!(bodies.windows(2).all(|w| w[0] == w[1]), "indistinguishable: {bodies:?}");
    // Validation: 400 naming the field, never echoing the value.
    for (body, param) in [
        (json!({"response_id": id, "action": "approve-ish"}), "action"),
        (json!({"response_id": id, "action": "accepted", "edited_text": "x"}), "edited_text"),
        (json!({"response_id": id, "action": "rejected", "reason_code": "CANARY-RC"}), "reason_code"),
        (json!({"action": "accepted"}), "response_id"),
        (json!({"response_id": id, "action": "accepted", "extra": 1}), "extra"),
    ] {
        let (s, v) = review(st, &r.clinician, body).await;
        assert_eq!((s, v["error"]["param"].as_str()), (StatusCode::BAD_REQUEST, Some(param)), "{v}");
        assert!(!v.to_string().contains("CANARY-RC") && !v.to_string().contains("approve-ish"));
    }
    // No review permission: 403, for reviews and the pending list.
    let (s, _) = review(st, &r.no_review, json!({"response_id": id, "action": "accepted"})).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert_eq!(send(st, "GET", "/v1/reviews/pending", Some(&r.no_review), None).await.0, StatusCode::FORBIDDEN);
    assert!(records(&r.built).iter().all(|x| x.kind != "review.recorded"));
}

#[tokio::test]
async fn a_review_after_a_restart_finds_the_inference_in_the_rebuilt_index() {
    let r = reviewing();
    let st = &r.built.state;
    let (_, chat, _) = send(st, "POST", "/v1/chat/completions", Some(&r.clinician), Some(&chat_body(json!({})))).await;
    let request_id = chat["id"].as_str().unwrap().trim_start_matches("chatcmpl-").to_string();
    // A fresh index, as at start-up, rebuilt from the trail.
    let index = crate::reviews::ReviewIndex::new(Duration::from_secs(3600), 100, false);
    assert_eq!(index.lookup(&request_id, "dr-ada"), Err(crate::reviews::LookupMiss::Loading));
    let recs = records(&r.built);
    index.load_from(&recs);
    let found = index.lookup(&request_id, "dr-ada").unwrap();
    assert_eq!(found.seq, recs.iter().find(|x| x.kind == "inference.completed").unwrap().seq);
    assert_eq!(found.choices(), 1);
}

#[tokio::test]
async fn auditors_page_through_the_trail_and_every_read_is_recorded() {
    let r = reviewing();
    let st = &r.built.state;
    // 5,000 records (recorded concurrently: one group commit for many).
    let mut writes = Vec::new();
    for i in 0..5000 {
        let ev = salus_audit::AuditEvent::new(salus_audit::EventKind::AdminConfigReloaded)
            .operation("test.bulk")
            .principal(salus_audit::AuditPrincipal::new(if i % 2 == 0 { "even" } else { "odd" }, "service", ["x"]));
        writes.push(r.built.audit.record(ev));
    }
    for w in futures::future::join_all(writes).await {
        w.unwrap();
    }
    let mut expected = Vec::new();
    let key = r.built.audit_key.load().unwrap();
    read_trail(&r.built.audit_dir.path().join("trail"), &key, |_, raw| {
        expected.push(serde_json::from_slice::<Value>(raw).unwrap())
    })
    .unwrap();
    assert!(expected.len() >= 5000);
    // Page through everything with the cursor: exactly what the trail holds, in order.
    let mut got = Vec::new();
    let mut after = 0u64;
    let mut pages = 0;
    loop {
        let uri = format!("/v1/audit/events?limit=1000&after={after}");
        let (s, v, _) = send(st, "GET", &uri, Some(&r.auditor), None).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        pages += 1;
        got.extend(v["data"].as_array().unwrap().iter().cloned());
        match v["next_after"].as_u64() {
            Some(n) => after = n,
            None => break,
        }
    }
    assert!(pages >= 5);
    // Each page's own audit.accessed record is written after its walk: compare the prefix.
    assert_eq!(got[..expected.len()], expected[..]);
    // Filters: principal and kind family; a FHIR bundle.
    let (_, v, _) = send(st, "GET", "/v1/audit/events?principal=odd&limit=1000", Some(&r.auditor), None).await;
    let odd = v["data"].as_array().unwrap();
    assert_eq!(odd.len(), 1000);
    assert!(odd.iter().all(|x| x["principal"]["id"] == "odd"));
    let (s, b, _) = send(st, "GET", "/v1/audit/events?kind=audit&format=fhir&limit=5", Some(&r.auditor), None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(b["resourceType"], "Bundle");
    assert!(b["entry"].as_array().unwrap().iter().all(|e| e["resource"]["resourceType"] == "AuditEvent"));
    // Every read was recorded, with its filter and count.
    let accessed: Vec<_> = records(&r.built).into_iter().filter(|x| x.kind == "audit.accessed").collect();
    assert_eq!(accessed.len(), pages + 2);
    let d = accessed[pages].detail.as_ref().unwrap();
    assert_eq!((d["filter"]["principal"].as_str(), d["returned"].as_u64()), (Some("odd"), Some(1000)));
    assert_eq!(accessed[0].principal.as_ref().unwrap().id, "compliance");
    // No audit.read: 403; bad filters: 400.
    assert_eq!(send(st, "GET", "/v1/audit/events", Some(&r.clinician), None).await.0, StatusCode::FORBIDDEN);
    for q in ["kind=nonsense", "limit=0", "limit=5000", "since=yesterday", "format=xml", "colour=red"] {
        let (s, v, _) = send(st, "GET", &format!("/v1/audit/events?{q}"), Some(&r.auditor), None).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{q}: {v}");
    }
}
