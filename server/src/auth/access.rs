//! Access control after authentication: sessions, per-principal policy and
//! break-glass, with their audit records.
//!
//! Why a separate step from checking the credential: an API key and an OIDC
//! token both end as an [`AuthenticatedPrincipal`]; the rules that follow
//! (timeouts, limits, emergency override) are the same for both and each of
//! them writes to the audit trail, so they live here once.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use salus_audit::{AuditEvent, AuditLog, EventKind};
use serde_json::json;
use time::OffsetDateTime;

use super::break_glass::{BreakGlassNotice, BreakGlassNotifier};
use super::oidc::OidcVerifier;
use super::policy::{
    BreakGlassOpened, Caller, InferenceRefusal, InferenceSlot, LimitSpec, Policy, PolicyRefusal, PolicyRule,
};
use super::sessions::{SessionCredential, SessionEvent, SessionRejection, SessionSettings, Sessions};
use super::{AuthenticatedPrincipal, Credential, Permission, PrincipalKind};
use crate::api::error::ApiError;
use crate::config::AuthConfig;
use crate::metrics::Metrics;

/// Sessions, policy and break-glass of one server.
pub struct AccessControl {
    oidc: OidcVerifier,
    sessions: Sessions,
    policy: Arc<Policy>,
    defaults: LimitSpec,
    metric_principals: BTreeSet<String>,
    notifier: Option<BreakGlassNotifier>,
}

impl AccessControl {
    /// From `[auth]`.
    pub fn from_config(cfg: &AuthConfig, metrics: Arc<Metrics>) -> Result<Self, String> {
        let notifier = match &cfg.break_glass.notify_url {
            Some(url) => {
                let agent = super::oidc::https_agent(cfg.break_glass.notify_ca_file.as_deref())
                    .map_err(|e| format!("auth.break_glass.notify_ca_file: {e}"))?;
                Some(BreakGlassNotifier::new(
                    url.clone(),
                    agent,
                    cfg.break_glass.notify_attempts,
                    Duration::from_secs(1),
                    metrics,
                ))
            }
            None => None,
        };
        Ok(AccessControl {
            oidc: OidcVerifier::new(&cfg.oidc)?,
            sessions: Sessions::new(SessionSettings {
                idle: Duration::from_secs(cfg.sessions.idle_timeout_secs),
                max: Duration::from_secs(cfg.sessions.max_session_secs),
                service_keys: cfg.sessions.service_keys,
            }),
            policy: Policy::new(Duration::from_secs(cfg.break_glass.window_secs)),
            defaults: cfg.limits.defaults(),
            metric_principals: cfg.limits.metric_principals.iter().cloned().collect(),
            notifier,
        })
    }

    pub fn oidc(&self) -> &OidcVerifier {
        &self.oidc
    }

    pub fn sessions(&self) -> &Sessions {
        &self.sessions
    }

    /// The limits a principal runs under: its own, else the defaults.
    pub fn resolve_limits(&self, own: &LimitSpec) -> LimitSpec {
        own.or(&self.defaults)
    }

    /// Whether `principal` is inside a break-glass window now (its inference
    /// records are flagged).
    pub fn in_break_glass_window(&self, principal: &str) -> bool {
        self.policy.in_break_glass_window(principal, Instant::now())
    }

    /// The session check of one request; records what began and ended.
    /// Session records are durable before the request goes on: a session the
    /// trail does not know of does not serve.
    pub async fn check_session(&self, p: &AuthenticatedPrincipal, log: &AuditLog) -> Result<(), ApiError> {
        let settings = self.sessions.settings();
        let applies = p.kind == PrincipalKind::Human || settings.service_keys;
        if !applies {
            return Ok(());
        }
        let (key, issued_at, sid, signed_in) = match &p.credential {
            Credential::ApiKey { key_id } => (format!("key:{key_id}"), None, None, false),
            Credential::Oidc { issued_at, sid } => (format!("oidc:{}", p.id), *issued_at, sid.as_deref(), true),
        };
        let cred = SessionCredential { key: &key, principal: &p.id, issued_at, sid, signed_in };
        let (result, events) = match self.sessions.touch(&cred, Instant::now(), OffsetDateTime::now_utc()) {
            Ok(events) => (Ok(()), events),
            Err((SessionRejection::Expired, events)) => (Err(ApiError::SessionExpired), events),
        };
        for ev in events {
            if let Err(e) = log.record(session_record(&ev, Some(p))).await {
                tracing::error!(principal = %p.id, error = %e, "audit: session event not recorded; request refused");
                return Err(ApiError::AuditUnavailable);
            }
        }
        result
    }

    /// Records sessions that timed out since the last sweep.
    pub async fn sweep_sessions(&self, log: &AuditLog) {
        for ev in self.sessions.sweep(Instant::now(), OffsetDateTime::now_utc()) {
            if let Err(e) = log.record(session_record(&ev, None)).await {
                tracing::error!(error = %e, "audit: session expiry not recorded");
            }
        }
    }

    /// Ends every session (shutdown), recording each.
    pub fn end_sessions_blocking(&self, log: &AuditLog) {
        for ev in self.sessions.end_all(Instant::now()) {
            if let Err(e) = log.record_blocking(session_record(&ev, None)) {
                tracing::error!(error = %e, "audit: session end not recorded");
            }
        }
    }

    fn caller<'a>(&self, p: &'a AuthenticatedPrincipal) -> Caller<'a> {
        Caller { principal: &p.id, limits: &p.limits, breaking_glass: p.break_glass.is_some() }
    }

    /// Every authenticated request: source network and request rate.
    pub async fn admit_request(
        &self,
        p: &AuthenticatedPrincipal,
        source: Option<IpAddr>,
        log: &AuditLog,
        metrics: &Metrics,
        request_id: &str,
    ) -> Result<(), ApiError> {
        match self.policy.admit_request(&self.caller(p), source, Instant::now()) {
            Ok(opened) => self.opened(opened, p, log, metrics, request_id).await,
            Err(refusal) => Err(self.refused(refusal, p, metrics)),
        }
    }

    /// An inference request: the `inference` permission, concurrency and
    /// token credit. The slot charges tokens and frees itself on drop.
    pub async fn admit_inference(
        &self,
        p: &AuthenticatedPrincipal,
        log: &AuditLog,
        metrics: &Metrics,
        request_id: &str,
    ) -> Result<InferenceSlot, ApiError> {
        let has = p.has_permission(Permission::Inference);
        let human = p.kind == PrincipalKind::Human;
        match self.policy.admit_inference(&self.caller(p), has, human, Instant::now()) {
            Ok((slot, opened)) => {
                self.opened(opened, p, log, metrics, request_id).await?;
                Ok(slot)
            }
            Err(InferenceRefusal::NoPermission) => Err(ApiError::Forbidden { role: Permission::Inference.as_str() }),
            Err(InferenceRefusal::Limit(refusal)) => Err(self.refused(refusal, p, metrics)),
        }
    }

    fn refused(&self, refusal: PolicyRefusal, p: &AuthenticatedPrincipal, metrics: &Metrics) -> ApiError {
        let labelled = self.metric_principals.contains(&p.id).then_some(p.id.as_str());
        metrics.policy_rejected(refusal.rule.as_str(), labelled);
        match refusal.rule {
            PolicyRule::SourceNetwork => ApiError::SourceNotAllowed,
            PolicyRule::InferencePermission => ApiError::Forbidden { role: Permission::Inference.as_str() },
            rule => ApiError::RateLimited { rule: rule.as_str(), retry_after: refusal.retry_after },
        }
    }

    /// A window was opened: `access.break_glass` made durable (or the
    /// request is refused), then the metric and the webhook.
    async fn opened(
        &self,
        opened: Option<BreakGlassOpened>,
        p: &AuthenticatedPrincipal,
        log: &AuditLog,
        metrics: &Metrics,
        request_id: &str,
    ) -> Result<(), ApiError> {
        let Some(opened) = opened else { return Ok(()) };
        let reason = p.break_glass.as_ref().map(|r| r.expose().clone()).unwrap_or_default();
        let ev = AuditEvent::new(EventKind::AccessBreakGlass)
            .request_id(request_id)
            .principal(p.audit_principal())
            .operation("break_glass")
            .outcome_reason(opened.rule.as_str())
            .detail(json!({
                "rule": opened.rule.as_str(),
                "reason": reason,
                "window_secs": opened.window.as_secs(),
            }));
        if let Err(e) = log.record(ev).await {
            tracing::error!(request_id, error = %e, "audit: break-glass use not recorded; request refused");
            return Err(ApiError::AuditUnavailable);
        }
        metrics.break_glass_used(opened.rule.as_str());
        tracing::warn!(request_id, principal = %p.id, rule = opened.rule.as_str(), "BREAK-GLASS: policy overridden");
        if let Some(n) = &self.notifier {
            n.notify(BreakGlassNotice {
                principal: p.id.clone(),
                rule: opened.rule.as_str(),
                request_id: request_id.to_string(),
                time: OffsetDateTime::now_utc(),
                window_secs: opened.window.as_secs(),
            });
        }
        Ok(())
    }
}

/// The audit record of a session event. `p` is the principal at hand (a
/// request's); sweeps and shutdown know only the session key.
fn session_record(ev: &SessionEvent, p: Option<&AuthenticatedPrincipal>) -> AuditEvent {
    let (kind, session, key, principal, detail) = match ev {
        SessionEvent::Started { session, key, principal } => {
            (EventKind::SessionStarted, session, key, principal, json!({}))
        }
        SessionEvent::Ended { session, key, principal, why, started, duration } => (
            if why.is_expiry() { EventKind::SessionExpired } else { EventKind::SessionEnded },
            session,
            key,
            principal,
            json!({
                "reason": why.as_str(),
                "started": started.format(&time::format_description::well_known::Rfc3339).unwrap_or_default(),
                "duration_secs": duration.as_secs(),
            }),
        ),
    };
    let mut detail = detail;
    if let Some(obj) = detail.as_object_mut() {
        obj.insert("session".into(), json!(session));
        obj.insert("session_key".into(), json!(key));
    }
    let mut ev = AuditEvent::new(kind).operation("session").target(session.clone()).detail(detail);
    if let Some(p) = p {
        ev = ev.principal(p.audit_principal());
    } else {
        ev = ev.principal(salus_audit::AuditPrincipal::new(principal.clone(), "human", Vec::<String>::new()));
    }
    ev
}
