//! The off-host shipper (`[audit.ship]`, `salus_backup::Shipper`) as the
//! server shows it: metrics, and a `/ready` warning while it lags.
//!
//! As for the SIEM forwarder, the lag is a warning, never a failure: the
//! local trail is the record and stays fail-closed on its own; a destination
//! that is down must not stop inference. `/ready` keeps its status and its
//! body gains `"audit_ship_lagging"` in `warnings` (beside the forwarder's,
//! when both lag; see `crate::audit_forward::ready_warnings`) and the figures
//! under `audit_ship`.

use std::sync::OnceLock;

use salus_backup::{ShipMonitor, ShipStatus};
use serde_json::json;

use crate::audit_forward::ReadyWarning;
use crate::metrics::{counter, gauge};

/// The warning code `/ready` gives while the shipper lags.
pub const LAGGING: &str = "audit_ship_lagging";

/// The shipper's part of the metrics; empty until one is attached.
#[derive(Default)]
pub struct ShipMetrics {
    monitor: OnceLock<ShipMonitor>,
}

impl ShipMetrics {
    /// Attaches the running shipper (once; later calls are ignored).
    pub fn attach(&self, monitor: ShipMonitor) {
        let _ = self.monitor.set(monitor);
    }

    /// The shipper's progress, when one runs.
    pub fn status(&self) -> Option<ShipStatus> {
        self.monitor.get().map(|m| m.status())
    }

    /// The warning while the lag is past `lag_warning_secs`.
    pub fn ready_warning(&self) -> Option<ReadyWarning> {
        let s = self.status().filter(|s| s.lagging)?;
        Some(ReadyWarning {
            code: LAGGING,
            key: "audit_ship",
            detail: json!({
                "lag_segments": s.lag_segments,
                "lag_seconds": s.lag_seconds,
                "lag_warning_secs": s.lag_warning_secs,
                "failing": s.failing,
            }),
        })
    }

    /// Prometheus text of the shipper's gauges and counters (nothing without
    /// a shipper). No labels: nothing varies but the numbers.
    pub fn render(&self, out: &mut String) {
        let Some(s) = self.status() else { return };
        gauge(
            out,
            "salus_audit_ship_lag_segments",
            "Sealed audit segments the off-host destination does not hold yet.",
            s.lag_segments,
        );
        gauge(
            out,
            "salus_audit_ship_lag_seconds",
            "Seconds since the oldest audit change the off-host destination lacks (a sealed segment, a checkpoint); 0 when it holds everything.",
            s.lag_seconds,
        );
        gauge(
            out,
            "salus_audit_ship_shipped_segment",
            "Every audit segment up to this index is in the off-host destination.",
            s.shipped_segment,
        );
        gauge(
            out,
            "salus_audit_ship_last_seq",
            "Seq of the last audit record the newest shipment covers.",
            s.shipped_seq,
        );
        counter(
            out,
            "salus_audit_ship_shipments_total",
            "Shipments (incremental backups) written to the off-host destination.",
            "",
            s.shipments,
        );
        counter(
            out,
            "salus_audit_ship_failures_total",
            "Shipment attempts (or reads of the destination) that failed; each is retried with backoff.",
            "",
            s.failures,
        );
        counter(
            out,
            "salus_audit_ship_uploaded_bytes_total",
            "Encrypted bytes uploaded to the off-host destination.",
            "",
            s.uploaded_bytes,
        );
        gauge(
            out,
            "salus_audit_ship_failing",
            "1 while the last attempt to reach the off-host destination failed.",
            u64::from(s.failing),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use salus_audit::{AuditEvent, AuditLog, AuditLogSettings, EventKind, PurgeHold};
    use salus_backup::{ShipSettings, Shipper};
    use salus_sensitive::secret::{write_new_key_file, KeySource, SecretKey};
    use serde_json::Value;
    use std::time::{Duration, Instant};

    #[test]
    fn metrics_and_both_ready_warnings_follow_the_lag() {
        let m = ShipMetrics::default();
        let mut out = String::new();
        m.render(&mut out);
        assert!(out.is_empty() && m.ready_warning().is_none(), "no shipper, no metrics");

        let tmp = tempfile::tempdir().unwrap();
        let key = write_new_key_file(&tmp.path().join("audit.key")).unwrap();
        let mut cfg = AuditLogSettings::new(tmp.path().join("audit"), KeySource::File(tmp.path().join("audit.key")));
        cfg.segment_max_bytes = 4096;
        let log = AuditLog::open(cfg.clone()).unwrap();
        // A destination that cannot work: a file where its directory should be.
        let dest = tmp.path().join("dest");
        std::fs::write(&dest, b"x").unwrap();
        let mut s = ShipSettings::new(dest.to_str().unwrap(), &cfg.dir, key, SecretKey::generate());
        s.lag_warning = Duration::ZERO;
        s.retry_max_backoff = Duration::from_millis(100);
        s.shutdown_flush = Duration::ZERO;
        let shipper = Shipper::start(&log, s, Some(PurgeHold::new())).unwrap();
        for _ in 0..40 {
            log.record_blocking(AuditEvent::new(EventKind::InferenceStarted)).unwrap();
        }
        m.attach(shipper.monitor());
        let t0 = Instant::now();
        while !m.status().is_some_and(|s| s.lagging && s.failures > 0 && s.lag_segments > 0) {
            assert!(t0.elapsed() < Duration::from_secs(30), "{:?}", m.status());
            std::thread::sleep(Duration::from_millis(50));
        }
        m.render(&mut out);
        assert!(out.contains("# TYPE salus_audit_ship_lag_segments gauge"), "{out}");
        assert!(out.contains("# TYPE salus_audit_ship_failures_total counter"), "{out}");
        assert!(out.contains("\nsalus_audit_ship_failing 1\n"), "{out}");
        assert!(!out.contains("\nsalus_audit_ship_lag_segments 0\n"), "{out}");

        // With the forwarder's warning beside it, both appear.
        let forward = ReadyWarning { code: crate::audit_forward::LAGGING, key: "audit_forward", detail: json!({}) };
        let ours = m.ready_warning().unwrap();
        let body = crate::audit_forward::with_warnings(br#"{"status":"ready"}"#, &[forward, ours]).unwrap();
        let body: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["warnings"], json!([crate::audit_forward::LAGGING, LAGGING]));
        assert!(body["audit_ship"]["lag_segments"].as_u64().unwrap() > 0, "{body}");
        assert_eq!(body["audit_ship"]["failing"], true);
        log.close().unwrap();
        shipper.stop();
    }
}
