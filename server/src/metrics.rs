//! Prometheus metrics, rendered in the text exposition format.
//!
//! Hand-rolled (counters, gauges, fixed-bucket histograms) to keep the label
//! sets under our control: labels come only from fixed sets — route templates of
//! the router, HTTP status codes, the configured model id — never from request
//! data, so a metric can never carry PHI.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::engine::EngineStats;

const LATENCY_BUCKETS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];
const TOKEN_LATENCY_BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56];

const COMPILE_BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

/// What became of a request's output constraint (a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConstraintResult {
    CacheHit,
    Compiled,
    Refused,
    TimedOut,
}

impl ConstraintResult {
    const ALL: [ConstraintResult; 4] =
        [ConstraintResult::CacheHit, ConstraintResult::Compiled, ConstraintResult::Refused, ConstraintResult::TimedOut];

    fn label(self) -> &'static str {
        match self {
            ConstraintResult::CacheHit => "cache_hit",
            ConstraintResult::Compiled => "compiled",
            ConstraintResult::Refused => "refused",
            ConstraintResult::TimedOut => "timed_out",
        }
    }
}

/// A cumulative histogram with fixed buckets.
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    /// Records one observation in seconds.
    pub fn observe(&self, secs: f64) {
        if !secs.is_finite() || secs < 0.0 {
            return;
        }
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            if secs <= *b {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.sum_micros.fetch_add((secs * 1e6) as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    fn render(&self, out: &mut String, name: &str, help: &str, labels: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let sep = if labels.is_empty() { "" } else { "," };
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {}", c.load(Ordering::Relaxed));
        }
        let n = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {n}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let braces = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
        let _ = writeln!(out, "{name}_sum{braces} {sum}");
        let _ = writeln!(out, "{name}_count{braces} {n}");
    }
}

pub(crate) fn gauge(out: &mut String, name: &str, help: &str, v: u64) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
}

pub(crate) fn counter(out: &mut String, name: &str, help: &str, labels: &str, v: u64) {
    let braces = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name}{braces} {v}");
}

/// Counters of per-principal policy, break-glass and sessions.
#[derive(Default)]
struct AccessCounts {
    rejections: BTreeMap<&'static str, u64>,
    rejections_by_principal: BTreeMap<(String, &'static str), u64>,
    break_glass: BTreeMap<&'static str, u64>,
    notified: u64,
    notify_failed: u64,
    sessions_active: u64,
    tls_not_after: u64,
}

impl AccessCounts {
    fn render(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "# HELP salus_policy_rejections_total Requests refused by a per-principal limit, by limit.\n# TYPE salus_policy_rejections_total counter"
        );
        for rule in crate::auth::policy::PolicyRule::ALL {
            let n = self.rejections.get(rule.as_str()).copied().unwrap_or(0);
            let _ = writeln!(out, "salus_policy_rejections_total{{limit=\"{}\"}} {n}", rule.as_str());
        }
        if !self.rejections_by_principal.is_empty() {
            let _ = writeln!(
                out,
                "# HELP salus_policy_rejections_by_principal_total Limit refusals of the principals in auth.limits.metric_principals.\n# TYPE salus_policy_rejections_by_principal_total counter"
            );
            for ((p, rule), n) in &self.rejections_by_principal {
                let p = p.replace('\\', "\\\\").replace('"', "\\\"");
                let _ = writeln!(
                    out,
                    "salus_policy_rejections_by_principal_total{{principal=\"{p}\",limit=\"{rule}\"}} {n}"
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP salus_break_glass_total Break-glass windows opened, by the rule overridden.\n# TYPE salus_break_glass_total counter"
        );
        for rule in crate::auth::policy::PolicyRule::ALL {
            let n = self.break_glass.get(rule.as_str()).copied().unwrap_or(0);
            let _ = writeln!(out, "salus_break_glass_total{{rule=\"{}\"}} {n}", rule.as_str());
        }
        counter(
            out,
            "salus_break_glass_notifications_total",
            "Break-glass webhook notices delivered.",
            "",
            self.notified,
        );
        counter(
            out,
            "salus_break_glass_notification_failures_total",
            "Break-glass webhook delivery attempts that failed.",
            "",
            self.notify_failed,
        );
        gauge(out, "salus_sessions_active", "Interactive sessions open now.", self.sessions_active);
        if self.tls_not_after > 0 {
            gauge(
                out,
                "salus_tls_certificate_expiry_timestamp_seconds",
                "When the serving TLS certificate expires (notAfter, Unix seconds).",
                self.tls_not_after,
            );
        }
    }
}

/// All process metrics.
pub struct Metrics {
    model_id: String,
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    in_flight: AtomicU64,
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
    panics: AtomicU64,
    auth_denials: AtomicU64,
    auth_rate_limited: AtomicU64,
    auth_denials_pending: AtomicU64,
    audit_volume_free_bytes: AtomicU64,
    /// Per-principal policy and break-glass.
    access: Mutex<AccessCounts>,
    /// Output-constraint lookups by result: cache hit, compiled, refused, timed out.
    constraints: [AtomicU64; 4],
    /// Time to compile an output constraint (cache misses).
    pub grammar_compile: Histogram,
    pub ttft: Histogram,
    pub inter_token: Histogram,
    pub e2e: Histogram,
    /// The SIEM forwarder's gauges and counters (`[audit.forward]`).
    forward: crate::audit_forward::ForwardMetrics,
    /// Spans exported and failed exports (`[telemetry]`).
    traces: Arc<crate::telemetry::TraceCounters>,
    /// The off-host shipper's gauges and counters (`[audit.ship]`).
    ship: crate::audit_ship::ShipMetrics,
}

/// Maps a matched route template to a fixed label (unknown → `other`).
pub fn route_label(template: Option<&str>) -> &'static str {
    const ROUTES: &[&str] = &[
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/models",
        "/v1/models/{*id}",
        "/v1/reviews",
        "/v1/reviews/pending",
        "/v1/audit/events",
        "/tokenize",
        "/detokenize",
        "/tokenizer_info",
        "/health",
        "/ready",
        "/metrics",
    ];
    template.and_then(|t| ROUTES.iter().find(|r| **r == t).copied()).unwrap_or("other")
}

impl Metrics {
    /// `model_id` is the configured model id (a label on token counters).
    pub fn new(model_id: &str) -> Self {
        Metrics {
            model_id: model_id.to_string(),
            requests: Mutex::new(BTreeMap::new()),
            in_flight: AtomicU64::new(0),
            prompt_tokens: AtomicU64::new(0),
            completion_tokens: AtomicU64::new(0),
            panics: AtomicU64::new(0),
            auth_denials: AtomicU64::new(0),
            auth_rate_limited: AtomicU64::new(0),
            auth_denials_pending: AtomicU64::new(0),
            audit_volume_free_bytes: AtomicU64::new(0),
            access: Mutex::new(AccessCounts::default()),
            constraints: Default::default(),
            grammar_compile: Histogram::new(COMPILE_BUCKETS),
            ttft: Histogram::new(TOKEN_LATENCY_BUCKETS_TTFT),
            inter_token: Histogram::new(TOKEN_LATENCY_BUCKETS),
            e2e: Histogram::new(LATENCY_BUCKETS),
            forward: Default::default(),
            traces: Default::default(),
            ship: Default::default(),
        }
    }

    /// The trace exporter's counters (handed to it at start).
    pub fn traces_arc(&self) -> Arc<crate::telemetry::TraceCounters> {
        self.traces.clone()
    }

    /// The SIEM forwarder's part (attach the running forwarder here).
    pub fn forward(&self) -> &crate::audit_forward::ForwardMetrics {
        &self.forward
    }

    /// The off-host shipper's part (attach the running shipper here).
    pub fn ship(&self) -> &crate::audit_ship::ShipMetrics {
        &self.ship
    }

    pub fn request_done(&self, route: &'static str, status: u16) {
        *self.requests.lock().unwrap_or_else(|e| e.into_inner()).entry((route, status)).or_insert(0) += 1;
    }
    pub fn request_started(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }
    pub fn request_finished(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
    pub fn add_tokens(&self, prompt: usize, completion: usize) {
        self.prompt_tokens.fetch_add(prompt as u64, Ordering::Relaxed);
        self.completion_tokens.fetch_add(completion as u64, Ordering::Relaxed);
    }
    pub fn panic_caught(&self) {
        self.panics.fetch_add(1, Ordering::Relaxed);
    }
    /// One denied request (401, 403 or an authentication rate limit).
    pub fn auth_denied(&self) {
        self.auth_denials.fetch_add(1, Ordering::Relaxed);
    }
    /// One failed authentication refused by the per-source limit.
    pub fn auth_rate_limited(&self) {
        self.auth_rate_limited.fetch_add(1, Ordering::Relaxed);
    }
    /// Denials counted but not yet in the audit trail.
    pub fn set_auth_denials_pending(&self, n: u64) {
        self.auth_denials_pending.store(n, Ordering::Relaxed);
    }
    /// Free bytes on the audit trail's volume, as last measured.
    pub fn set_audit_volume_free_bytes(&self, n: u64) {
        self.audit_volume_free_bytes.store(n, Ordering::Relaxed);
    }
    /// A request refused by a per-principal rule; `principal` only when it
    /// is in `auth.limits.metric_principals`.
    pub fn policy_rejected(&self, rule: &'static str, principal: Option<&str>) {
        let mut a = self.access.lock().unwrap_or_else(|e| e.into_inner());
        *a.rejections.entry(rule).or_insert(0) += 1;
        if let Some(p) = principal {
            *a.rejections_by_principal.entry((p.to_string(), rule)).or_insert(0) += 1;
        }
    }
    /// A break-glass window opened, overriding `rule`.
    pub fn break_glass_used(&self, rule: &'static str) {
        *self.access.lock().unwrap_or_else(|e| e.into_inner()).break_glass.entry(rule).or_insert(0) += 1;
    }
    /// A break-glass notice delivered.
    pub fn break_glass_notified(&self) {
        self.access.lock().unwrap_or_else(|e| e.into_inner()).notified += 1;
    }
    /// A break-glass notice delivery attempt failed (or the queue was full).
    pub fn break_glass_notify_failed(&self) {
        self.access.lock().unwrap_or_else(|e| e.into_inner()).notify_failed += 1;
    }
    /// `notAfter` of the serving TLS certificate (Unix seconds; 0: no TLS).
    pub fn set_tls_certificate_expiry(&self, unix: i64) {
        self.access.lock().unwrap_or_else(|e| e.into_inner()).tls_not_after = unix.max(0) as u64;
    }
    /// Sessions open now.
    pub fn set_sessions_active(&self, n: usize) {
        self.access.lock().unwrap_or_else(|e| e.into_inner()).sessions_active = n as u64;
    }

    /// One request's output constraint: looked up, compiled or refused.
    pub fn constraint(&self, result: ConstraintResult) {
        self.constraints[result as usize].fetch_add(1, Ordering::Relaxed);
    }
    pub fn requests_total(&self, route: &'static str, status: u16) -> u64 {
        self.requests.lock().unwrap_or_else(|e| e.into_inner()).get(&(route, status)).copied().unwrap_or(0)
    }

    /// The exposition text, with the engine's current load and the audit
    /// trail's health.
    pub fn render(&self, engine: &EngineStats, audit: &salus_audit::AuditHealth) -> String {
        let mut out = String::with_capacity(8192);
        let model = format!("model=\"{}\"", self.model_id);
        out.push_str("# HELP salus_requests_total HTTP requests by route template and status.\n# TYPE salus_requests_total counter\n");
        for ((route, status), n) in self.requests.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(out, "salus_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}");
        }
        gauge(
            &mut out,
            "salus_http_requests_in_flight",
            "HTTP requests being served.",
            self.in_flight.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "salus_prompt_tokens_total",
            "Prompt tokens processed.",
            &model,
            self.prompt_tokens.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "salus_completion_tokens_total",
            "Completion tokens generated.",
            &model,
            self.completion_tokens.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "salus_panics_total",
            "Panics caught inside request handlers.",
            "",
            self.panics.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "salus_auth_denials_total",
            "Requests refused for their credentials (401, 403, authentication rate limit).",
            "",
            self.auth_denials.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "salus_auth_rate_limited_total",
            "Failed authentications refused by the per-source rate limit (429).",
            "",
            self.auth_rate_limited.load(Ordering::Relaxed),
        );
        self.access.lock().unwrap_or_else(|e| e.into_inner()).render(&mut out);
        gauge(
            &mut out,
            "salus_auth_denials_pending",
            "Denials counted but not yet written to the audit trail (coalesced per interval).",
            self.auth_denials_pending.load(Ordering::Relaxed),
        );
        gauge(
            &mut out,
            "salus_audit_volume_free_bytes",
            "Free bytes on the audit trail's volume, as last measured.",
            self.audit_volume_free_bytes.load(Ordering::Relaxed),
        );
        out.push_str("# HELP salus_output_constraints_total Requests with an output constraint (structured outputs), by result.\n# TYPE salus_output_constraints_total counter\n");
        for r in ConstraintResult::ALL {
            let n = self.constraints[r as usize].load(Ordering::Relaxed);
            let _ = writeln!(out, "salus_output_constraints_total{{result=\"{}\"}} {n}", r.label());
        }
        self.grammar_compile.render(
            &mut out,
            "salus_grammar_compile_seconds",
            "Time to compile an output constraint (cache misses).",
            "",
        );
        self.ttft.render(
            &mut out,
            "salus_time_to_first_token_seconds",
            "Time from request to first generated token.",
            &model,
        );
        self.inter_token.render(
            &mut out,
            "salus_inter_token_latency_seconds",
            "Time between consecutive streamed deltas.",
            &model,
        );
        self.e2e.render(
            &mut out,
            "salus_e2e_request_latency_seconds",
            "Generation request latency, end to end.",
            &model,
        );
        gauge(&mut out, "salus_queue_depth", "Sequences waiting to be scheduled.", engine.waiting_seqs as u64);
        gauge(&mut out, "salus_running_requests", "Sequences being generated.", engine.running_seqs as u64);
        gauge(&mut out, "salus_kv_cache_blocks_used", "KV cache blocks in use.", engine.kv_blocks_used as u64);
        gauge(&mut out, "salus_kv_cache_blocks_total", "KV cache blocks in total.", engine.kv_blocks_total as u64);
        gauge(
            &mut out,
            "salus_kv_cache_blocks_cached",
            "KV cache blocks registered in the prefix cache (held or reusable).",
            engine.kv_blocks_cached as u64,
        );
        counter(
            &mut out,
            "salus_prefix_cache_hit_tokens_total",
            "Prompt tokens reused from the prefix cache instead of being computed.",
            "",
            engine.prefix_cache_hit_tokens_total,
        );
        gauge(
            &mut out,
            "salus_last_batch_sequences",
            "Sequences in the last forward step.",
            engine.last_batch_seqs as u64,
        );
        gauge(&mut out, "salus_last_batch_tokens", "Tokens in the last forward step.", engine.last_batch_tokens as u64);
        counter(
            &mut out,
            "salus_preemptions_total",
            "Sequences preempted for lack of KV cache.",
            "",
            engine.preemptions_total,
        );
        counter(&mut out, "salus_engine_steps_total", "Forward steps run by the engine.", "", engine.steps_total);
        let memory = salus_kernels::memory::protection_report();
        gauge(
            &mut out,
            "salus_memory_locked_bytes",
            "Bytes of weights and KV cache locked in RAM (memory.lock).",
            memory.locked_bytes,
        );
        gauge(
            &mut out,
            "salus_memory_lock_failed_bytes",
            "Bytes of weights and KV cache that could not be locked (memlock limit too small).",
            memory.lock_failed_bytes,
        );
        gauge(
            &mut out,
            "salus_audit_healthy",
            "1 while the audit trail can be written; 0 means fail closed: every inference is refused.",
            u64::from(audit.healthy),
        );
        counter(
            &mut out,
            "salus_audit_write_failures_total",
            "Audit trail writes or syncs that failed.",
            "",
            audit.write_failures,
        );
        gauge(
            &mut out,
            "salus_audit_last_durable_timestamp_seconds",
            "Unix time a record last became durable in the audit trail (0 before the first).",
            audit.last_durable_unix_ms.map_or(0, |ms| ms / 1000),
        );
        self.forward.render(&mut out);
        counter(
            &mut out,
            "salus_trace_spans_exported_total",
            "Spans the OTLP collector accepted ([telemetry]).",
            "",
            self.traces.exported(),
        );
        counter(
            &mut out,
            "salus_trace_export_failures_total",
            "OTLP exports that failed; their spans are dropped ([telemetry]).",
            "",
            self.traces.failures(),
        );
        self.ship.render(&mut out);
        out
    }
}

const TOKEN_LATENCY_BUCKETS_TTFT: &[f64] = &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_histograms() {
        let m = Metrics::new("smol");
        m.request_done("/v1/chat/completions", 200);
        m.request_done("/v1/chat/completions", 200);
        m.request_done(route_label(Some("/nope/{x}")), 404);
        m.ttft.observe(0.03);
        m.add_tokens(5, 7);
        let audit = salus_audit::AuditHealth {
            healthy: false,
            closed: false,
            write_failures: 2,
            last_durable_unix_ms: Some(1_700_000_000_123),
        };
        let text = m.render(&EngineStats { waiting_seqs: 3, ..Default::default() }, &audit);
        assert!(text.contains("salus_audit_healthy 0"));
        assert!(text.contains("salus_audit_write_failures_total 2"));
        assert!(text.contains("salus_audit_last_durable_timestamp_seconds 1700000000"));
        assert!(text.contains("salus_requests_total{route=\"/v1/chat/completions\",status=\"200\"} 2"));
        assert!(text.contains("salus_requests_total{route=\"other\",status=\"404\"} 1"));
        assert!(text.contains("salus_time_to_first_token_seconds_bucket{model=\"smol\",le=\"0.025\"} 0"));
        assert!(text.contains("salus_time_to_first_token_seconds_bucket{model=\"smol\",le=\"0.05\"} 1"));
        assert!(text.contains("salus_time_to_first_token_seconds_count{model=\"smol\"} 1"));
        assert!(text.contains("salus_completion_tokens_total{model=\"smol\"} 7"));
        assert!(text.contains("salus_queue_depth 3"));
    }
}
