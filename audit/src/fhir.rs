//! Export of audit records as FHIR R4 `AuditEvent` resources in a `Bundle`
//! (type `collection`), for hospital SIEM / compliance tooling.
//!
//! Mapping: `type` = `rest` (inference) or a DICOM audit code; `subtype` = the
//! Salus event kind; `action` = the record's action (inference = `E`);
//! `outcome` = 0/4/8; `agent` = the principal (id, kind, roles, network
//! address); `source` = the server instance; `entity` = the model (with its
//! weights fingerprint) and the HMAC'd prompt and completion.

use serde_json::{json, Value};

use super::event::AuditRecord;

const SALUS: &str = "urn:salus";

fn event_type(kind: &str) -> Value {
    let dcm = |code: &str, display: &str| json!({ "system": "http://dicom.nema.org/resources/ontology/DCM", "code": code, "display": display });
    if kind.starts_with("inference.") {
        json!({ "system": "http://terminology.hl7.org/CodeSystem/audit-event-type", "code": "rest", "display": "RESTful Operation" })
    } else if kind == "auth.denied" {
        dcm("110114", "User Authentication")
    } else if kind == "session.started" {
        dcm("110122", "Login")
    } else if kind == "session.expired" || kind == "session.ended" {
        dcm("110123", "Logout")
    } else if kind == "audit.accessed" {
        dcm("110101", "Audit Log Used")
    } else if kind.starts_with("audit.") || kind == "access.break_glass" {
        dcm("110113", "Security Alert")
    } else {
        dcm("110100", "Application Activity")
    }
}

fn identifier(system: &str, value: &str) -> Value {
    json!({ "identifier": { "system": format!("{SALUS}:{system}"), "value": value } })
}

/// One record as a FHIR R4 `AuditEvent`.
pub fn audit_event(r: &AuditRecord) -> Value {
    let mut subtypes = vec![json!({ "system": format!("{SALUS}:audit-event"), "code": r.kind })];
    match r.kind.as_str() {
        "server.started" => subtypes.push(
            json!({ "system": "http://dicom.nema.org/resources/ontology/DCM", "code": "110120", "display": "Application Start" }),
        ),
        "server.stopped" => subtypes.push(
            json!({ "system": "http://dicom.nema.org/resources/ontology/DCM", "code": "110121", "display": "Application Stop" }),
        ),
        _ => {}
    }
    let mut ev = json!({
        "resourceType": "AuditEvent",
        "id": r.event_id,
        "type": event_type(&r.kind),
        "subtype": subtypes,
        "action": r.action.code(),
        "recorded": r.time,
        "outcome": r.outcome.fhir_code(),
        "source": {
            "site": r.instance,
            "observer": { "display": format!("salus {}", r.instance) },
            "type": [{ "system": "http://terminology.hl7.org/CodeSystem/security-source-type", "code": "4", "display": "Application Server" }]
        },
        "extension": [{ "url": format!("{SALUS}:audit-seq"), "valueUnsignedInt": r.seq }],
    });
    if let Some(reason) = &r.outcome_reason {
        ev["outcomeDesc"] = json!(reason);
    }
    let mut agents = Vec::new();
    if let Some(p) = &r.principal {
        let mut a = json!({
            "who": identifier("principal", &p.id),
            "type": { "coding": [{ "system": format!("{SALUS}:principal-kind"), "code": p.kind }] },
            "role": p.roles.iter().map(|role| json!({ "text": role })).collect::<Vec<_>>(),
            "requestor": true,
        });
        if let Some(name) = &p.display_name {
            a["who"]["display"] = json!(name);
        }
        if let Some(addr) = &r.source_addr {
            a["network"] = json!({ "address": addr, "type": "2" });
        }
        agents.push(a);
    } else if let Some(addr) = &r.source_addr {
        agents.push(json!({ "who": { "display": "unauthenticated client" }, "requestor": true, "network": { "address": addr, "type": "2" } }));
    }
    agents.push(json!({ "who": identifier("instance", &r.instance), "requestor": false }));
    ev["agent"] = json!(agents);

    let object_type = |code: &str, display: &str| json!({ "system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": code, "display": display });
    let mut entities = Vec::new();
    if let Some(m) = &r.model {
        entities.push(json!({
            "what": identifier("model", &m.id),
            "type": object_type("2", "System Object"),
            "name": m.id,
            "detail": [{ "type": "weights_fingerprint", "valueString": m.weights_fingerprint }],
        }));
    }
    for (name, hmac) in [("prompt", &r.prompt_hmac), ("completion", &r.completion_hmac)] {
        if let Some(h) = hmac {
            entities.push(json!({
                "what": identifier(&format!("{name}-hmac-sha256"), h),
                "type": object_type("4", "Other"),
                "name": name,
                "description": format!("HMAC-SHA256 of the {name} under the audit key; the text is not stored"),
            }));
        }
    }
    if let Some(rid) = &r.request_id {
        entities
            .push(json!({ "what": identifier("request", rid), "type": object_type("4", "Other"), "name": "request" }));
    }
    if let Some(t) = &r.target {
        entities.push(
            json!({ "what": identifier("target", t), "type": object_type("2", "System Object"), "name": "target" }),
        );
    }
    if let Some(tok) = &r.tokens {
        let mut detail = vec![
            json!({ "type": "prompt_tokens", "valueString": tok.prompt.to_string() }),
            json!({ "type": "completion_tokens", "valueString": tok.completion.to_string() }),
        ];
        if let Some(l) = r.latency_us {
            detail.push(json!({ "type": "latency_us", "valueString": l.to_string() }));
        }
        entities.push(json!({ "type": object_type("4", "Other"), "name": "usage", "detail": detail }));
    }
    if r.kind == "review.recorded" {
        entities.extend(review_entity(r));
    }
    if !entities.is_empty() {
        ev["entity"] = json!(entities);
    }
    ev
}

/// A review's link to the inference it reviews: a reference to that
/// inference's `AuditEvent` (`urn:uuid:<event id>`, its `fullUrl` in an
/// export), with the action, choice, reason code, latency and edit HMAC.
fn review_entity(r: &AuditRecord) -> Option<Value> {
    let d = r.detail.as_ref()?;
    let reviewed = d.get("reviewed_event_id").and_then(Value::as_str)?;
    let mut detail = Vec::new();
    for key in ["action", "reason_code", "response_id", "edited_text_hmac"] {
        if let Some(v) = d.get(key).and_then(Value::as_str) {
            detail.push(json!({ "type": key, "valueString": v }));
        }
    }
    for key in ["choice", "reviewed_seq", "review_latency_ms"] {
        if let Some(v) = d.get(key).and_then(Value::as_u64) {
            detail.push(json!({ "type": key, "valueString": v.to_string() }));
        }
    }
    Some(json!({
        "what": { "reference": format!("urn:uuid:{reviewed}"), "display": "the reviewed inference" },
        "type": { "system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "4", "display": "Other" },
        "name": "reviewed inference",
        "detail": detail,
    }))
}

/// A `Bundle` of type `collection` holding one `AuditEvent` per record.
pub fn export_bundle(records: &[AuditRecord]) -> Value {
    json!({
        "resourceType": "Bundle",
        "type": "collection",
        "timestamp": super::format::now_rfc3339(),
        "entry": records
            .iter()
            .map(|r| json!({ "fullUrl": format!("urn:uuid:{}", r.event_id), "resource": audit_event(r) }))
            .collect::<Vec<_>>(),
    })
}
