//! The SIEM forwarder (`[audit.forward]`, `salus_audit::forward`) as the
//! server shows it: metrics, and a `/ready` warning when it lags.
//!
//! The lag is a warning, never a failure: the trail is the record, the SIEM
//! a copy, so `/ready`'s status stays what its readiness checks say and only
//! the body gains `"warnings": ["audit_forward_lagging"]` and the figures.
//! [`ready_warnings`] adds the off-host shipper's warning the same way
//! (`crate::audit_ship`), so that both can appear together.

use std::fmt::Write as _;
use std::sync::OnceLock;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use salus_audit::forward::{ForwardMonitor, ForwardStatus};
use serde_json::{json, Value};

use crate::state::AppState;

/// The warning code `/ready` gives while the forwarder lags.
pub const LAGGING: &str = "audit_forward_lagging";

/// The forwarder's part of the metrics; empty until one is attached.
#[derive(Default)]
pub struct ForwardMetrics {
    monitor: OnceLock<ForwardMonitor>,
}

impl ForwardMetrics {
    /// Attaches the running forwarder (once; later calls are ignored).
    pub fn attach(&self, monitor: ForwardMonitor) {
        let _ = self.monitor.set(monitor);
    }

    /// The forwarder's progress, when one runs.
    pub fn status(&self) -> Option<ForwardStatus> {
        self.monitor.get().map(|m| m.status())
    }

    /// Prometheus text of the forwarder's gauges and counters (nothing
    /// without a forwarder). No labels: nothing varies but the numbers.
    pub fn render(&self, out: &mut String) {
        let Some(s) = self.status() else { return };
        let mut metric = |name: &str, kind: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        };
        metric(
            "salus_audit_forward_lag_records",
            "gauge",
            "Audit records durable but not yet accepted by the SIEM collector.",
            s.lag_records,
        );
        metric(
            "salus_audit_forward_last_seq",
            "gauge",
            "Seq of the last audit record the SIEM collector accepted (the cursor).",
            s.forwarded_seq,
        );
        metric(
            "salus_audit_forward_records_total",
            "counter",
            "Audit records sent to the SIEM collector (re-sends after a broken connection included).",
            s.sent_records,
        );
        metric(
            "salus_audit_forward_connection_failures_total",
            "counter",
            "Connections to the SIEM collector that could not be made or broke.",
            s.connection_failures,
        );
        metric(
            "salus_audit_forward_connected",
            "gauge",
            "1 while a TLS connection to the SIEM collector is up.",
            u64::from(s.connected),
        );
        metric(
            "salus_audit_forward_skipped_records_total",
            "counter",
            "Audit records purged by retention before they could be forwarded.",
            s.skipped_records,
        );
    }
}

/// A warning `/ready` adds to its body: the code in `warnings`, and the
/// figures under `key`.
#[derive(Clone, Debug, PartialEq)]
pub struct ReadyWarning {
    pub code: &'static str,
    pub key: &'static str,
    pub detail: Value,
}

impl ForwardMetrics {
    /// The warning while the forwarder lags past `lag_warning_records`.
    pub fn ready_warning(&self) -> Option<ReadyWarning> {
        let s = self.status().filter(|s| s.lagging)?;
        Some(ReadyWarning {
            code: LAGGING,
            key: "audit_forward",
            detail: json!({
                "lag_records": s.lag_records,
                "lag_warning_records": s.lag_warning_records,
                "connected": s.connected,
            }),
        })
    }
}

/// Adds the warnings of the trail's copies — the SIEM forwarder's and the
/// off-host shipper's (`crate::audit_ship`), either or both — to a `/ready`
/// response (200 or 503) while they lag; the status is left as it is.
pub async fn ready_warnings(State(state): State<AppState>, response: Response) -> Response {
    let m = state.metrics();
    let warnings: Vec<ReadyWarning> =
        [m.forward().ready_warning(), m.ship().ready_warning()].into_iter().flatten().collect();
    if warnings.is_empty() || !matches!(response.status(), StatusCode::OK | StatusCode::SERVICE_UNAVAILABLE) {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, 64 << 10).await else {
        return parts.status.into_response();
    };
    match with_warnings(&bytes, &warnings) {
        Some(body) => {
            parts.headers.remove(header::CONTENT_LENGTH);
            Response::from_parts(parts, axum::body::Body::from(body))
        }
        None => Response::from_parts(parts, axum::body::Body::from(bytes)),
    }
}

/// A `/ready` JSON body with the warnings added (`None`: not a JSON object).
pub(crate) fn with_warnings(body: &[u8], warnings: &[ReadyWarning]) -> Option<String> {
    let Ok(Value::Object(mut obj)) = serde_json::from_slice::<Value>(body) else { return None };
    obj.insert("warnings".into(), warnings.iter().map(|w| w.code).collect::<Vec<_>>().into());
    for w in warnings {
        obj.insert(w.key.into(), w.detail.clone());
    }
    Some(Value::Object(obj).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use salus_audit::forward::{ForwardSettings, Forwarder};
    use salus_audit::{AuditEvent, AuditLog, AuditLogSettings, EventKind};

    #[test]
    fn metrics_and_the_ready_warning_follow_the_lag() {
        let m = ForwardMetrics::default();
        let mut out = String::new();
        m.render(&mut out);
        assert!(out.is_empty() && m.status().is_none(), "no forwarder, no metrics");

        let tmp = tempfile::tempdir().unwrap();
        salus_sensitive::secret::write_new_key_file(&tmp.path().join("audit.key")).unwrap();
        let key = salus_sensitive::secret::KeySource::File(tmp.path().join("audit.key"));
        let log = AuditLog::open(AuditLogSettings::new(tmp.path().join("audit"), key)).unwrap();
        let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
        std::fs::write(tmp.path().join("ca.pem"), ck.cert.pem()).unwrap();
        // A port nobody listens on: nothing is accepted, the lag grows.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut s = ForwardSettings::new(&format!("127.0.0.1:{port}"), tmp.path().join("forward.cursor")).unwrap();
        s.ca_file = Some(tmp.path().join("ca.pem"));
        s.lag_warning_records = 2;
        s.shutdown_flush = std::time::Duration::ZERO;
        let f = Forwarder::start(&log, s).unwrap();
        for _ in 0..3 {
            log.record_blocking(AuditEvent::new(EventKind::InferenceStarted)).unwrap();
        }
        m.attach(f.monitor());
        let st = m.status().unwrap();
        assert_eq!((st.lag_records, st.forwarded_seq, st.lagging), (4, 0, true), "server.started + 3");
        m.render(&mut out);
        assert!(out.contains("\nsalus_audit_forward_lag_records 4\n"), "{out}");
        assert!(out.contains("# TYPE salus_audit_forward_connection_failures_total counter"), "{out}");
        assert!(out.contains("\nsalus_audit_forward_connected 0\n"), "{out}");
        let w = m.ready_warning().unwrap();
        let body: Value =
            serde_json::from_str(&with_warnings(br#"{"status":"ready"}"#, std::slice::from_ref(&w)).unwrap()).unwrap();
        assert_eq!(body["status"], "ready");
        assert_eq!(body["warnings"], json!([LAGGING]));
        assert_eq!(body["audit_forward"]["lag_records"], 4);
        assert!(with_warnings(b"not json", &[w]).is_none());
        log.close().unwrap();
        f.stop();
    }
}
