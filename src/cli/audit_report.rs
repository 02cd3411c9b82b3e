//! `salus audit report break-glass`: every break-glass window and the requests
//! made in it, for the review HIPAA expects after emergency access.
//!
//! A window opens with an `access.break_glass` record (who, the rule
//! overridden, the reason, `window_secs`); the requests in it are the
//! inference records of that principal flagged `break_glass: true` between
//! the opening and its end. Each request is shown with its outcome
//! (`inference.completed` / `failed` / `cancelled` / `interrupted`).

use std::collections::HashMap;

use salus_audit::{AuditRecord, RecordFilter};
use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// One window and what happened in it.
struct Window {
    opened: AuditRecord,
    at: OffsetDateTime,
    end: OffsetDateTime,
    requests: Vec<String>,
}

fn flagged(r: &AuditRecord) -> bool {
    r.detail.as_ref().is_some_and(|d| d.get("break_glass") == Some(&Value::Bool(true)))
}

fn principal(r: &AuditRecord) -> &str {
    r.principal.as_ref().map(|p| p.id.as_str()).unwrap_or("")
}

/// Builds the report from every record of the trail (in order): windows
/// opened within `[since, until]`.
pub fn break_glass_report(
    records: &[AuditRecord],
    since: Option<OffsetDateTime>,
    until: Option<OffsetDateTime>,
) -> Value {
    let mut windows: Vec<Window> = Vec::new();
    let mut outcomes: HashMap<&str, &AuditRecord> = HashMap::new();
    let mut started: HashMap<&str, &AuditRecord> = HashMap::new();
    for r in records {
        let Ok(at) = RecordFilter::parse_time(&r.time) else { continue };
        match r.kind.as_str() {
            "access.break_glass" => {
                let secs = r.detail.as_ref().and_then(|d| d.get("window_secs")).and_then(Value::as_u64).unwrap_or(0);
                let in_range = since.is_none_or(|s| at >= s) && until.is_none_or(|u| at <= u);
                if in_range {
                    let end = at + time::Duration::seconds(secs.min(i64::MAX as u64) as i64);
                    windows.push(Window { opened: r.clone(), at, end, requests: Vec::new() });
                }
            }
            "inference.started" if flagged(r) => {
                let Some(id) = r.request_id.as_deref() else { continue };
                started.insert(id, r);
                // The newest window of this principal that covers the request.
                if let Some(w) =
                    windows.iter_mut().rev().find(|w| principal(&w.opened) == principal(r) && at >= w.at && at <= w.end)
                {
                    w.requests.push(id.to_string());
                }
            }
            "inference.completed" | "inference.failed" | "inference.cancelled" | "inference.interrupted" => {
                if let Some(id) = r.request_id.as_deref() {
                    outcomes.insert(id, r);
                }
            }
            _ => {}
        }
    }
    let windows: Vec<Value> = windows
        .iter()
        .map(|w| {
            let d = w.opened.detail.clone().unwrap_or_default();
            let requests: Vec<Value> = w
                .requests
                .iter()
                .map(|id| {
                    let s = started[id.as_str()];
                    let o = outcomes.get(id.as_str());
                    json!({
                        "request_id": id,
                        "time": s.time,
                        "operation": s.operation,
                        "outcome": o.map(|o| o.kind.trim_start_matches("inference.").to_string()),
                        "prompt_tokens": o.and_then(|o| o.tokens).map(|t| t.prompt),
                        "completion_tokens": o.and_then(|o| o.tokens).map(|t| t.completion),
                        "prompt_hmac": s.prompt_hmac,
                    })
                })
                .collect();
            json!({
                "principal": principal(&w.opened),
                "principal_kind": w.opened.principal.as_ref().map(|p| p.kind.clone()),
                "display_name": w.opened.principal.as_ref().and_then(|p| p.display_name.clone()),
                "opened": w.opened.time,
                "ends": w.end.format(&Rfc3339).unwrap_or_default(),
                "request_id": w.opened.request_id,
                "rule": d.get("rule"),
                "reason": d.get("reason"),
                "requests": requests,
            })
        })
        .collect();
    json!({ "report": "break_glass", "since": since.map(fmt), "until": until.map(fmt), "windows": windows })
}

fn fmt(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_default()
}

/// The report as text for a reviewer.
pub fn render_text(report: &Value) -> String {
    let mut out = String::new();
    let windows = report["windows"].as_array().cloned().unwrap_or_default();
    let range = |k: &str| report[k].as_str().unwrap_or("(any)").to_string();
    out.push_str(&format!("Break-glass windows opened {} .. {}: {}\n", range("since"), range("until"), windows.len()));
    for (i, w) in windows.iter().enumerate() {
        let name = w["display_name"].as_str().map(|n| format!(" ({n})")).unwrap_or_default();
        out.push_str(&format!(
            "\n{}. {}{} overrode {} at {} (window until {}, request {})\n   reason: {}\n   requests in the window: {}\n",
            i + 1,
            w["principal"].as_str().unwrap_or(""),
            name,
            w["rule"].as_str().unwrap_or("?"),
            w["opened"].as_str().unwrap_or(""),
            w["ends"].as_str().unwrap_or(""),
            w["request_id"].as_str().unwrap_or("-"),
            w["reason"].as_str().unwrap_or(""),
            w["requests"].as_array().map_or(0, Vec::len),
        ));
        for r in w["requests"].as_array().into_iter().flatten() {
            out.push_str(&format!(
                "     {}  {}  {}  {}  tokens {}/{}\n",
                r["time"].as_str().unwrap_or(""),
                r["request_id"].as_str().unwrap_or(""),
                r["operation"].as_str().unwrap_or(""),
                r["outcome"].as_str().unwrap_or("no outcome recorded"),
                r["prompt_tokens"].as_u64().map_or("-".into(), |n| n.to_string()),
                r["completion_tokens"].as_u64().map_or("-".into(), |n| n.to_string()),
            ));
        }
    }
    out
}
