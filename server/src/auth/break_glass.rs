//! Break-glass: the `Salus-Break-Glass` header and the security team's webhook.
//!
//! Why a webhook and not only the audit trail: the trail is reviewed after the
//! fact; an emergency override should reach a person now. The notice carries
//! who, which rule, when and the request id — never the reason (free text a
//! clinician typed, possibly about a patient), which only the encrypted audit
//! record holds. Delivery is retried with exponential backoff off the request
//! path (`auth.break_glass.notify_attempts` tries, waiting 1 s, 2 s, 4 s, …); a notice that cannot be delivered is counted and logged, and the
//! request it announces is not held up (it is already in the trail).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::http::HeaderMap;
use salus_sensitive::Phi;
use serde_json::json;

use crate::api::error::ApiError;
use crate::metrics::Metrics;

/// The request header naming the reason for emergency access.
pub const HEADER: &str = "salus-break-glass";

/// Reason length bounds, in characters.
pub const REASON_CHARS: std::ops::RangeInclusive<usize> = 12..=500;

/// The reason sent with this request, if any. A reason outside 12–500
/// characters, not UTF-8, or sent twice is a 400 (not echoed).
pub fn reason_from(headers: &HeaderMap) -> Result<Option<Phi<String>>, ApiError> {
    let mut values = headers.get_all(HEADER).iter();
    let Some(value) = values.next() else { return Ok(None) };
    let invalid = || {
        ApiError::invalid(
            "Salus-Break-Glass",
            "the Salus-Break-Glass header must be sent once, as a reason of 12 to 500 characters",
        )
    };
    if values.next().is_some() {
        return Err(invalid());
    }
    let text = std::str::from_utf8(value.as_bytes()).map_err(|_| invalid())?.trim();
    if !REASON_CHARS.contains(&text.chars().count()) || text.chars().any(char::is_control) {
        return Err(invalid());
    }
    Ok(Some(Phi::new(text.to_string())))
}

/// One use of break-glass, as the webhook is told (no PHI).
#[derive(Debug, Clone)]
pub struct BreakGlassNotice {
    pub principal: String,
    pub rule: &'static str,
    pub request_id: String,
    pub time: time::OffsetDateTime,
    pub window_secs: u64,
}

impl BreakGlassNotice {
    fn body(&self) -> serde_json::Value {
        json!({
            "event": "access.break_glass",
            "principal": self.principal,
            "rule": self.rule,
            "request_id": self.request_id,
            "time": self.time.format(&time::format_description::well_known::Rfc3339).unwrap_or_default(),
            "window_secs": self.window_secs,
        })
    }
}

/// Most notices being delivered at once; more are counted as failed.
const MAX_IN_FLIGHT: usize = 64;

/// Delivers notices to `auth.break_glass.notify_url` in the background, each
/// on its own thread (uses are rare; a slow receiver delays no other notice,
/// and no async runtime is needed).
pub struct BreakGlassNotifier {
    url: String,
    agent: ureq::Agent,
    attempts: u32,
    first_backoff: Duration,
    metrics: Arc<Metrics>,
    in_flight: Arc<AtomicUsize>,
}

impl BreakGlassNotifier {
    /// `first_backoff` is the wait after the first failed attempt, doubled after each.
    pub fn new(url: String, agent: ureq::Agent, attempts: u32, first_backoff: Duration, metrics: Arc<Metrics>) -> Self {
        BreakGlassNotifier { url, agent, attempts, first_backoff, metrics, in_flight: Arc::new(AtomicUsize::new(0)) }
    }

    /// A notice that could not be started: counted and logged, its slot returned.
    fn dropped(&self, request_id: &str, why: &'static str) {
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.metrics.break_glass_notify_failed();
        tracing::error!(request_id = %request_id, why, "break-glass notice dropped");
    }

    /// Starts delivering a notice (never blocks the request).
    pub fn notify(&self, notice: BreakGlassNotice) {
        if self.in_flight.fetch_add(1, Ordering::AcqRel) >= MAX_IN_FLIGHT {
            return self.dropped(&notice.request_id, "too many deliveries in progress");
        }
        let job = Delivery {
            url: self.url.clone(),
            agent: self.agent.clone(),
            attempts: self.attempts,
            first_backoff: self.first_backoff,
            metrics: self.metrics.clone(),
            in_flight: self.in_flight.clone(),
        };
        let request_id = notice.request_id.clone();
        let spawned = std::thread::Builder::new().name("break-glass-notify".into()).spawn(move || job.run(notice));
        if spawned.is_err() {
            self.dropped(&request_id, "no thread for its delivery");
        }
    }
}

struct Delivery {
    url: String,
    agent: ureq::Agent,
    attempts: u32,
    first_backoff: Duration,
    metrics: Arc<Metrics>,
    in_flight: Arc<AtomicUsize>,
}

impl Delivery {
    fn run(self, notice: BreakGlassNotice) {
        let body = notice.body().to_string();
        let mut wait = self.first_backoff;
        let mut delivered = false;
        for attempt in 1..=self.attempts {
            let sent = self.agent.post(&self.url).set("Content-Type", "application/json").send_string(&body);
            match sent {
                Ok(_) => {
                    self.metrics.break_glass_notified();
                    delivered = true;
                    break;
                }
                Err(e) => {
                    self.metrics.break_glass_notify_failed();
                    let error = super::oidc::short_http_error(&e);
                    tracing::warn!(request_id = %notice.request_id, attempt, attempts = self.attempts, error = %error, "break-glass notice not delivered");
                }
            }
            if attempt < self.attempts {
                std::thread::sleep(wait);
                wait = (wait * 2).min(Duration::from_secs(300));
            }
        }
        if !delivered {
            tracing::error!(request_id = %notice.request_id, attempts = self.attempts, "break-glass notice given up: security was not told by webhook");
        }
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn reasons_are_bounded_and_never_echoed() {
        let mut h = HeaderMap::new();
        assert!(reason_from(&h).unwrap().is_none());
        h.insert(HEADER, HeaderValue::from_static("code blue, bed 12"));
        assert_eq!(reason_from(&h).unwrap().unwrap().expose(), "code blue, bed 12");
        h.insert(HEADER, HeaderValue::from_static("too short"));
        let e = reason_from(&h).unwrap_err();
        assert!(!e.to_string().contains("too short"));
        h.insert(HEADER, HeaderValue::from_str(&"x".repeat(501)).unwrap());
        assert!(reason_from(&h).is_err());
        h.insert(HEADER, HeaderValue::from_bytes("Notfall: Patientin Zimmer 4 ü".as_bytes()).unwrap());
        assert!(reason_from(&h).unwrap().is_some(), "UTF-8 reasons are fine");
        h.append(HEADER, HeaderValue::from_static("a second reason header"));
        assert!(reason_from(&h).is_err());
    }
}
