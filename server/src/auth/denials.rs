//! Denied requests: counted exactly, recorded in the audit trail coalesced,
//! and failed authentication rate-limited per source.
//!
//! Why: every 401/403 used to write its own durable `auth.denied` record.
//! Anyone on the network could then fill the audit volume with key-less
//! requests — and a full trail refuses every inference (fail closed), while
//! six-year retention means the flood could never be purged. Now:
//!
//! * **Coalescing.** Denials are tallied in memory per (source address,
//!   reason, principal) and written as one `auth.denied` record per tally per
//!   interval (`auth.denial_record_interval_secs`), carrying the exact count,
//!   the first and last time and the route templates. The table holds at most
//!   `auth.denial_max_sources` tallies; denials from further sources are
//!   folded into one tally per reason marked `other_sources`, so a flood from
//!   many addresses is still bounded in records per interval. Nothing denied
//!   goes uncounted.
//! * **Rate limiting.** Each source has a token bucket of failed
//!   authentications (`auth.failed_auth_burst`, refilled at
//!   `auth.failed_auth_per_second`). Past it, a failed request is answered
//!   429 with `Retry-After`; it cost a hash lookup and nothing else. A valid
//!   key from the same source is never refused by this limit.
//! * **Space.** Before each write the audit volume's free space is checked:
//!   below `audit.low_space_warning_bytes` a warning is logged (once per
//!   interval) and the `salus_audit_volume_free_bytes` gauge says so; below
//!   `audit.denial_reserve_bytes` denial records are held back (still
//!   counted, written once space returns or at shutdown) so that the space
//!   left is kept for inference records.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use salus_audit::{AuditError, AuditEvent, AuditLog, AuditPrincipal, EventKind};
use serde_json::json;
use time::OffsetDateTime;

use crate::metrics::Metrics;

/// How denials are coalesced and failed authentication limited.
#[derive(Debug, Clone, PartialEq)]
pub struct DenialSettings {
    /// One record per tally per this interval.
    pub interval: Duration,
    /// Most tallies (sources × reasons) held; more fold into `other_sources`.
    pub max_sources: usize,
    /// Failed authentications a source may make at once…
    pub failed_auth_burst: u32,
    /// …and per second after that.
    pub failed_auth_per_second: f64,
    /// Below this much free space on the audit volume: a warning.
    pub low_space_warning_bytes: u64,
    /// Below this much free space denial records wait (inference records go on).
    pub denial_reserve_bytes: u64,
}

/// Most per-source rate-limit buckets kept (a bucket is dropped once full again).
const MAX_BUCKETS: usize = 16_384;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct TallyKey {
    /// `None`: folded sources (or in-process requests without an address).
    source: Option<IpAddr>,
    reason: &'static str,
    principal: Option<String>,
    /// Denials folded in because the table was full.
    other_sources: bool,
}

#[derive(Debug, Clone)]
struct Tally {
    count: u64,
    first: OffsetDateTime,
    last: OffsetDateTime,
    routes: BTreeSet<&'static str>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

#[derive(Default)]
struct State {
    tallies: HashMap<TallyKey, Tally>,
    buckets: HashMap<Option<IpAddr>, Bucket>,
    last_space_warning: Option<Instant>,
}

/// Counts, coalesces and records denied requests (one per server).
pub struct DenialRecorder {
    settings: DenialSettings,
    audit: AuditLog,
    metrics: Arc<Metrics>,
    state: Mutex<State>,
}

impl DenialRecorder {
    pub fn new(settings: DenialSettings, audit: AuditLog, metrics: Arc<Metrics>) -> Self {
        DenialRecorder { settings, audit, metrics, state: Mutex::default() }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts one denied request: `reason` is its error code, `route` its
    /// route template, `principal` the authenticated caller (for 403).
    pub fn note(&self, source: Option<IpAddr>, reason: &'static str, route: &'static str, principal: Option<&str>) {
        let now = OffsetDateTime::now_utc();
        let mut st = self.state();
        let mut key = TallyKey { source, reason, principal: principal.map(str::to_string), other_sources: false };
        if !st.tallies.contains_key(&key) && st.tallies.len() >= self.settings.max_sources.max(1) {
            key = TallyKey { source: None, reason, principal: None, other_sources: true };
        }
        let tally =
            st.tallies.entry(key).or_insert_with(|| Tally { count: 0, first: now, last: now, routes: BTreeSet::new() });
        tally.count += 1;
        tally.last = now;
        tally.routes.insert(route);
        drop(st);
        self.metrics.auth_denied();
    }

    /// Takes one failed authentication from `source`'s bucket; `Err` with the
    /// time until the next one is allowed when it is empty.
    pub fn failed_authentication(&self, source: Option<IpAddr>) -> Result<(), Duration> {
        let burst = f64::from(self.settings.failed_auth_burst.max(1));
        let rate = self.settings.failed_auth_per_second.max(1e-3);
        let now = Instant::now();
        let mut st = self.state();
        if st.buckets.len() >= MAX_BUCKETS && !st.buckets.contains_key(&source) {
            // Keep only sources that are still being limited.
            st.buckets.retain(|_, b| b.tokens + now.duration_since(b.at).as_secs_f64() * rate < burst);
            if st.buckets.len() >= MAX_BUCKETS {
                st.buckets.clear();
            }
        }
        let b = st.buckets.entry(source).or_insert(Bucket { tokens: burst, at: now });
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * rate).min(burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            self.metrics.auth_rate_limited();
            Err(Duration::from_secs_f64(((1.0 - b.tokens) / rate).max(0.001)))
        }
    }

    /// Denials counted but not yet in the trail.
    pub fn pending(&self) -> u64 {
        self.state().tallies.values().map(|t| t.count).sum()
    }

    /// Free bytes on the audit volume (updates the gauge; warns when low).
    fn free_space(&self) -> Option<u64> {
        let free = match rustix::fs::statvfs(self.audit.dir()) {
            Ok(s) => s.f_bavail.saturating_mul(s.f_frsize),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the audit volume's free space");
                return None;
            }
        };
        self.metrics.set_audit_volume_free_bytes(free);
        if free < self.settings.low_space_warning_bytes {
            let mut st = self.state();
            if st.last_space_warning.is_none_or(|t| t.elapsed() >= self.settings.interval) {
                st.last_space_warning = Some(Instant::now());
                tracing::warn!(
                    free_bytes = free,
                    warning_bytes = self.settings.low_space_warning_bytes,
                    "audit volume is low on space"
                );
            }
        }
        Some(free)
    }

    /// Writes one `auth.denied` record per tally and clears them; `force`
    /// writes even below the space reserve (shutdown). Returns the records
    /// written. Tallies whose record fails stay for the next flush.
    pub fn flush_blocking(&self, force: bool) -> Result<usize, AuditError> {
        let free = self.free_space();
        if !force && free.is_some_and(|f| f < self.settings.denial_reserve_bytes) {
            self.metrics.set_auth_denials_pending(self.pending());
            return Ok(0);
        }
        let tallies: Vec<(TallyKey, Tally)> = self.state().tallies.drain().collect();
        let mut written = 0;
        let mut result = Ok(());
        for (key, tally) in tallies {
            if result.is_ok() {
                match self.audit.record_blocking(self.event(&key, &tally)) {
                    Ok(_) => {
                        written += 1;
                        continue;
                    }
                    Err(e) => result = Err(e),
                }
            }
            // Not written: merged back, so the count stays exact.
            let mut st = self.state();
            let t = st.tallies.entry(key).or_insert_with(|| Tally { count: 0, ..tally.clone() });
            t.count += tally.count;
            t.first = t.first.min(tally.first);
            t.routes.extend(tally.routes.iter());
        }
        self.metrics.set_auth_denials_pending(self.pending());
        result.map(|()| written)
    }

    fn event(&self, key: &TallyKey, t: &Tally) -> AuditEvent {
        let fmt = |at: OffsetDateTime| crate::auth::store::format_time(at);
        let mut ev =
            AuditEvent::new(EventKind::AuthDenied).operation("auth").outcome_reason(key.reason).detail(json!({
                "count": t.count,
                "first": fmt(t.first),
                "last": fmt(t.last),
                "routes": t.routes.iter().collect::<Vec<_>>(),
                "interval_secs": self.settings.interval.as_secs(),
                "other_sources": key.other_sources,
            }));
        if let Some(ip) = key.source {
            // Port 0: the record covers every connection from the address.
            ev = ev.source_addr(SocketAddr::new(ip, 0));
        }
        if let Some(p) = &key.principal {
            ev = ev.principal(AuditPrincipal::new(p.clone(), "api_key", Vec::<String>::new()));
        }
        ev
    }

    /// Flushes every interval until the process ends (off the async workers:
    /// each record waits for its fsync).
    pub fn spawn_flusher(self: &Arc<Self>) {
        let me = Arc::downgrade(self);
        let interval = self.settings.interval;
        let spawned = std::thread::Builder::new().name("salus-denials".into()).spawn(move || loop {
            std::thread::sleep(interval);
            let Some(me) = me.upgrade() else { return };
            if let Err(e) = me.flush_blocking(false) {
                tracing::error!(error = %e, "audit: auth.denied records not written; kept for the next attempt");
            }
        });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the denial recorder; denials are recorded at shutdown only");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recorder(dir: &std::path::Path, max_sources: usize) -> (DenialRecorder, AuditLog, salus_sensitive::SecretKey) {
        let key_path = dir.join("audit.key");
        let key = salus_sensitive::secret::write_new_key_file(&key_path).unwrap();
        let log = AuditLog::open(salus_audit::AuditLogSettings::new(
            dir.join("trail"),
            salus_sensitive::KeySource::File(key_path),
        ))
        .unwrap();
        let settings = DenialSettings {
            interval: Duration::from_secs(10),
            max_sources,
            failed_auth_burst: 3,
            failed_auth_per_second: 1.0,
            low_space_warning_bytes: 0,
            denial_reserve_bytes: 0,
        };
        (DenialRecorder::new(settings, log.clone(), Arc::new(Metrics::new("m"))), log, key)
    }

    fn denied_records(dir: &std::path::Path, key: &salus_sensitive::SecretKey) -> Vec<salus_audit::AuditRecord> {
        let mut out = Vec::new();
        salus_audit::read_trail(&dir.join("trail"), key, |r, _| {
            if r.kind == "auth.denied" {
                out.push(r.clone())
            }
        })
        .unwrap();
        out
    }

    #[test]
    fn denials_are_coalesced_per_source_and_reason_with_exact_counts() {
        let dir = tempfile::tempdir().unwrap();
        let (rec, log, key) = recorder(dir.path(), 3);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        for i in 0..1000 {
            rec.note(Some(a), "invalid_api_key", if i % 2 == 0 { "/v1/models" } else { "/v1/chat/completions" }, None);
        }
        rec.note(Some(a), "insufficient_permissions", "/metrics", Some("alice"));
        // More sources than the table holds: folded, still counted.
        for i in 0..50u8 {
            rec.note(Some(IpAddr::from([10, 0, 1, i])), "invalid_api_key", "/v1/models", None);
        }
        assert_eq!(rec.pending(), 1051);
        assert!(rec.flush_blocking(false).unwrap() <= 4);
        assert_eq!(rec.pending(), 0);
        log.close().unwrap();
        let recs = denied_records(dir.path(), &key);
        let total: u64 = recs.iter().map(|r| r.detail.as_ref().unwrap()["count"].as_u64().unwrap()).sum();
        assert_eq!(total, 1051, "every denial counted once");
        let from_a = recs
            .iter()
            .find(|r| {
                r.outcome_reason.as_deref() == Some("invalid_api_key") && r.source_addr.as_deref() == Some("10.0.0.1:0")
            })
            .unwrap();
        let d = from_a.detail.as_ref().unwrap();
        assert_eq!(d["count"], 1000);
        assert_eq!(d["routes"], json!(["/v1/chat/completions", "/v1/models"]));
        let folded = recs.iter().filter(|r| r.detail.as_ref().unwrap()["other_sources"] == true).count();
        assert_eq!(folded, 1, "one folded tally per reason");
        let forbidden = recs.iter().find(|r| r.outcome_reason.as_deref() == Some("insufficient_permissions")).unwrap();
        assert_eq!(forbidden.principal.as_ref().unwrap().id, "alice");
    }

    #[test]
    fn failed_authentication_is_limited_per_source() {
        let dir = tempfile::tempdir().unwrap();
        let (rec, log, _) = recorder(dir.path(), 16);
        let a = Some("10.0.0.1".parse().unwrap());
        let b = Some("10.0.0.2".parse().unwrap());
        for _ in 0..3 {
            rec.failed_authentication(a).unwrap();
        }
        let wait = rec.failed_authentication(a).unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_secs(1), "{wait:?}");
        assert!(rec.failed_authentication(b).is_ok(), "another source has its own bucket");
        log.close().unwrap();
    }

    #[test]
    fn denial_records_wait_below_the_space_reserve() {
        let dir = tempfile::tempdir().unwrap();
        let (mut rec, log, key) = recorder(dir.path(), 16);
        rec.settings.denial_reserve_bytes = u64::MAX;
        rec.note(None, "invalid_api_key", "/v1/models", None);
        assert_eq!(rec.flush_blocking(false).unwrap(), 0);
        assert_eq!(rec.pending(), 1, "held back, still counted");
        assert_eq!(rec.flush_blocking(true).unwrap(), 1, "written at shutdown");
        log.close().unwrap();
        assert_eq!(denied_records(dir.path(), &key).len(), 1);
    }
}
