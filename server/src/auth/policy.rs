//! Per-principal policy: from where, how often, how much and how many at once
//! a principal may ask, and the break-glass override of those rules.
//!
//! Why one mutex over plain token buckets: the checks must be exact under
//! concurrency (60 requests a minute means 60, not 60 plus whatever raced
//! past a read-then-write), and a check is a few float operations, so a
//! short critical section costs less than any lock-free scheme would save.
//!
//! * Requests per minute: a bucket of `requests_per_minute` requests, full at
//!   first, refilled continuously at that rate; each request takes one.
//! * Tokens per minute: a bucket of `tokens_per_minute` tokens. A request is
//!   admitted while the bucket holds credit; its prompt is charged when it is
//!   planned and its completion token by token as generated, so the bucket may
//!   go into debt, and the principal waits until it is paid off.
//! * Concurrent requests: inference requests in flight, released when the
//!   response ends (an [`InferenceSlot`] frees itself on drop).
//! * Allowed source networks: the connection's peer address must be inside one.
//!
//! Break-glass: a principal holding `break_glass` that names a reason
//! (`Salus-Break-Glass` header) on a request a rule would refuse is served,
//! and opens a window (`auth.break_glass.window_secs`) in which its requests
//! are served past every rule. Opening a window is returned to the caller
//! ([`BreakGlassOpened`]), which must record it before serving.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Limits of one principal (a key store entry, an OIDC role, or the defaults).
/// `None`: no limit of that kind (or, when combined, the fallback's).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitSpec {
    #[serde(skip_serializing_if = "Option::is_none", alias = "rpm")]
    pub requests_per_minute: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none", alias = "tpm")]
    pub tokens_per_minute: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", alias = "max_concurrent_requests", alias = "concurrency")]
    pub concurrent_requests: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none", alias = "allowed_source_cidrs", alias = "source_cidrs")]
    pub allowed_cidrs: Option<Vec<IpNet>>,
}

impl LimitSpec {
    /// Every set limit is at least 1; a CIDR list is not empty.
    pub fn validate(&self) -> Result<(), String> {
        if self.requests_per_minute == Some(0)
            || self.tokens_per_minute == Some(0)
            || self.concurrent_requests == Some(0)
        {
            return Err("limits must be at least 1 (leave a limit out for none)".into());
        }
        if self.allowed_cidrs.as_ref().is_some_and(Vec::is_empty) {
            return Err("allowed_cidrs must name at least one network (leave it out for any)".into());
        }
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        *self == LimitSpec::default()
    }

    /// Each limit of `self`, or `fallback`'s where `self` sets none.
    pub fn or(&self, fallback: &LimitSpec) -> LimitSpec {
        LimitSpec {
            requests_per_minute: self.requests_per_minute.or(fallback.requests_per_minute),
            tokens_per_minute: self.tokens_per_minute.or(fallback.tokens_per_minute),
            concurrent_requests: self.concurrent_requests.or(fallback.concurrent_requests),
            allowed_cidrs: self.allowed_cidrs.clone().or_else(|| fallback.allowed_cidrs.clone()),
        }
    }

    /// The most generous combination (a user with several roles): the highest
    /// of each limit set by any of them, the union of their networks.
    pub fn most_generous<'a>(specs: impl IntoIterator<Item = &'a LimitSpec>) -> LimitSpec {
        let mut out = LimitSpec::default();
        for s in specs {
            out.requests_per_minute = out.requests_per_minute.max(s.requests_per_minute);
            out.tokens_per_minute = out.tokens_per_minute.max(s.tokens_per_minute);
            out.concurrent_requests = out.concurrent_requests.max(s.concurrent_requests);
            if let Some(nets) = &s.allowed_cidrs {
                out.allowed_cidrs.get_or_insert_with(Vec::new).extend(nets.iter().copied());
            }
        }
        out
    }
}

/// The rule a request was refused by (or that break-glass overrode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PolicyRule {
    RequestsPerMinute,
    TokensPerMinute,
    ConcurrentRequests,
    SourceNetwork,
    /// A human without the `inference` permission (on call, breaking glass).
    InferencePermission,
}

impl PolicyRule {
    pub const ALL: [PolicyRule; 5] = [
        PolicyRule::RequestsPerMinute,
        PolicyRule::TokensPerMinute,
        PolicyRule::ConcurrentRequests,
        PolicyRule::SourceNetwork,
        PolicyRule::InferencePermission,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PolicyRule::RequestsPerMinute => "requests_per_minute",
            PolicyRule::TokensPerMinute => "tokens_per_minute",
            PolicyRule::ConcurrentRequests => "concurrent_requests",
            PolicyRule::SourceNetwork => "source_network",
            PolicyRule::InferencePermission => "inference_permission",
        }
    }
}

/// A refusal: the rule and, for rate rules, when a retry can succeed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PolicyRefusal {
    pub rule: PolicyRule,
    pub retry_after: Duration,
}

/// A break-glass window was opened by this request: record it before serving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakGlassOpened {
    pub rule: PolicyRule,
    pub window: Duration,
}

/// What the caller brings to a check.
#[derive(Debug, Clone, Copy)]
pub struct Caller<'a> {
    pub principal: &'a str,
    pub limits: &'a LimitSpec,
    /// Holds `break_glass` and sent a valid reason with this request.
    pub breaking_glass: bool,
}

/// A continuously refilled bucket (capacity and rate from the current limit,
/// which a key store reload may change).
#[derive(Debug, Clone, Copy)]
struct Bucket {
    level: f64,
    at: Instant,
}

impl Bucket {
    fn full(capacity: f64, now: Instant) -> Self {
        Bucket { level: capacity, at: now }
    }

    fn refill(&mut self, capacity: f64, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.level = (self.level + elapsed * capacity / 60.0).min(capacity);
        self.at = now;
    }

    /// How long until the bucket holds `need`.
    fn wait_for(&self, need: f64, capacity: f64) -> Duration {
        let missing = (need - self.level).max(0.0);
        Duration::from_secs_f64((missing * 60.0 / capacity).max(0.001))
    }
}

#[derive(Debug)]
struct PrincipalUse {
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
    in_flight: u32,
    break_glass_until: Option<Instant>,
    touched: Instant,
}

impl PrincipalUse {
    fn new(now: Instant) -> Self {
        PrincipalUse { requests: None, tokens: None, in_flight: 0, break_glass_until: None, touched: now }
    }

    fn in_window(&self, now: Instant) -> bool {
        self.break_glass_until.is_some_and(|t| now < t)
    }
}

/// The bucket in `slot` refilled to `now`, with its capacity, for a limit of
/// `per_minute` (`None`: no such limit). A first use starts full.
fn refilled(slot: &mut Option<Bucket>, per_minute: Option<f64>, now: Instant) -> Option<(&mut Bucket, f64)> {
    let cap = per_minute?;
    let b = slot.get_or_insert_with(|| Bucket::full(cap, now));
    b.refill(cap, now);
    Some((b, cap))
}

/// Most principals tracked; idle, full, window-less entries are dropped first.
const MAX_TRACKED: usize = 65_536;

/// The policy state of every principal.
pub struct Policy {
    principals: Mutex<HashMap<String, PrincipalUse>>,
    window: Duration,
}

impl Policy {
    pub fn new(break_glass_window: Duration) -> Arc<Self> {
        Arc::new(Policy { principals: Mutex::new(HashMap::new()), window: break_glass_window })
    }

    fn with_use<R>(&self, principal: &str, now: Instant, f: impl FnOnce(&mut PrincipalUse) -> R) -> R {
        let mut map = self.principals.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= MAX_TRACKED && !map.contains_key(principal) {
            let stale = Duration::from_secs(120);
            map.retain(|_, u| u.in_flight > 0 || u.in_window(now) || now.saturating_duration_since(u.touched) < stale);
        }
        let u = map.entry(principal.to_string()).or_insert_with(|| PrincipalUse::new(now));
        u.touched = now;
        f(u)
    }

    /// Inside a break-glass window, or refused by `refusal` unless the caller
    /// breaks glass now (which opens a window).
    fn refuse_or_override(
        &self,
        u: &mut PrincipalUse,
        caller: &Caller<'_>,
        refusal: PolicyRefusal,
        now: Instant,
    ) -> Result<Option<BreakGlassOpened>, PolicyRefusal> {
        if u.in_window(now) {
            return Ok(None);
        }
        if caller.breaking_glass {
            u.break_glass_until = Some(now + self.window);
            return Ok(Some(BreakGlassOpened { rule: refusal.rule, window: self.window }));
        }
        Err(refusal)
    }

    /// Every authenticated request: its source network, then one request of
    /// the per-minute budget.
    pub fn admit_request(
        &self,
        caller: &Caller<'_>,
        source: Option<IpAddr>,
        now: Instant,
    ) -> Result<Option<BreakGlassOpened>, PolicyRefusal> {
        self.with_use(caller.principal, now, |u| {
            let mut opened = None;
            if let Some(nets) = &caller.limits.allowed_cidrs {
                let inside = source.is_some_and(|ip| nets.iter().any(|n| n.contains(&canonical(ip))));
                if !inside {
                    let refusal = PolicyRefusal { rule: PolicyRule::SourceNetwork, retry_after: Duration::ZERO };
                    opened = opened.or(self.refuse_or_override(u, caller, refusal, now)?);
                }
            }
            let rpm = caller.limits.requests_per_minute.map(f64::from);
            if let Some((b, cap)) = refilled(&mut u.requests, rpm, now) {
                if b.level >= 1.0 {
                    b.level -= 1.0;
                } else {
                    let refusal =
                        PolicyRefusal { rule: PolicyRule::RequestsPerMinute, retry_after: b.wait_for(1.0, cap) };
                    opened = opened.or(self.refuse_or_override(u, caller, refusal, now)?);
                }
            }
            Ok(opened)
        })
    }

    /// An inference request: the `inference` permission (`has_inference`;
    /// only humans may break glass past it), a concurrency slot and token credit.
    pub fn admit_inference(
        self: &Arc<Self>,
        caller: &Caller<'_>,
        has_inference: bool,
        human: bool,
        now: Instant,
    ) -> Result<(InferenceSlot, Option<BreakGlassOpened>), InferenceRefusal> {
        self.with_use(caller.principal, now, |u| {
            let mut opened = None;
            if !has_inference {
                let refusal = PolicyRefusal { rule: PolicyRule::InferencePermission, retry_after: Duration::ZERO };
                if !human {
                    return Err(InferenceRefusal::NoPermission);
                }
                opened =
                    self.refuse_or_override(u, caller, refusal, now).map_err(|_| InferenceRefusal::NoPermission)?;
            }
            if let Some(max) = caller.limits.concurrent_requests {
                if u.in_flight >= max {
                    let refusal =
                        PolicyRefusal { rule: PolicyRule::ConcurrentRequests, retry_after: Duration::from_secs(1) };
                    opened =
                        opened.or(self.refuse_or_override(u, caller, refusal, now).map_err(InferenceRefusal::Limit)?);
                }
            }
            let tpm = caller.limits.tokens_per_minute.map(|t| t as f64);
            if let Some((b, cap)) = refilled(&mut u.tokens, tpm, now) {
                if b.level <= 0.0 {
                    let refusal =
                        PolicyRefusal { rule: PolicyRule::TokensPerMinute, retry_after: b.wait_for(1.0, cap) };
                    opened =
                        opened.or(self.refuse_or_override(u, caller, refusal, now).map_err(InferenceRefusal::Limit)?);
                }
            }
            u.in_flight += 1;
            let slot = InferenceSlot {
                policy: self.clone(),
                principal: caller.principal.to_string(),
                token_limit: caller.limits.tokens_per_minute,
            };
            Ok((slot, opened))
        })
    }

    /// Whether `principal` is inside a break-glass window now.
    pub fn in_break_glass_window(&self, principal: &str, now: Instant) -> bool {
        let map = self.principals.lock().unwrap_or_else(|e| e.into_inner());
        map.get(principal).is_some_and(|u| u.in_window(now))
    }

    fn charge(&self, principal: &str, limit: Option<u64>, tokens: usize, now: Instant) {
        if limit.is_none() || tokens == 0 {
            return;
        }
        self.with_use(principal, now, |u| {
            if let Some((b, _)) = refilled(&mut u.tokens, limit.map(|t| t as f64), now) {
                b.level -= tokens as f64;
            }
        })
    }

    fn release(&self, principal: &str) {
        let mut map = self.principals.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(u) = map.get_mut(principal) {
            u.in_flight = u.in_flight.saturating_sub(1);
        }
    }
}

/// IPv4-mapped IPv6 peers (a dual-stack listener) match IPv4 networks.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// Why an inference request was refused.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum InferenceRefusal {
    /// No `inference` permission (and no break-glass past it).
    NoPermission,
    Limit(PolicyRefusal),
}

/// One inference request in flight: charges its tokens, and frees its
/// concurrency slot when dropped (the response ended, however it ended).
pub struct InferenceSlot {
    policy: Arc<Policy>,
    principal: String,
    token_limit: Option<u64>,
}

impl InferenceSlot {
    /// Charges `tokens` (prompt or generated) to the principal's token budget.
    pub fn charge(&self, tokens: usize) {
        self.policy.charge(&self.principal, self.token_limit, tokens, Instant::now());
    }
}

impl Drop for InferenceSlot {
    fn drop(&mut self) {
        self.policy.release(&self.principal);
    }
}

impl std::fmt::Debug for InferenceSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InferenceSlot").field("principal", &self.principal).finish()
    }
}

#[cfg(test)]
mod tests;
