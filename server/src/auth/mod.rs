//! Authentication: `Authorization: Bearer <credential>` → [`AuthenticatedPrincipal`].
//!
//! A credential is a Salus API key (`sk-salus-…`, checked against the
//! [`KeyStore`]) or, with `[[auth.oidc]]` issuers configured, a JWT from the
//! hospital's identity provider ([`oidc`]). Either way the extractor then
//! applies what every principal is subject to ([`access`]): the session
//! timeout for interactive principals, the principal's source networks and
//! request rate, and break-glass.
//!
//! [`AuthenticatedPrincipal`] has private fields and no public constructor: the
//! only way to get one is the axum extractor below. Handlers that run inference
//! take it as an argument, so an unauthenticated path to the model cannot compile.
//!
//! The server re-reads the key store when its file changes (checked at most once
//! a second), so `salus keys revoke` takes effect on a running server. With an
//! audit trail attached ([`KeyStoreHandle::record_changes_in`]) each reload
//! records `admin.key_created` / `admin.key_revoked` for what changed
//! ([`crate::auth::key_events::key_store_events`]) durably before the new keys are
//! used. [`KeyStoreHandle::reconcile_with_trail`] (at server start) records
//! what changed while no one was recording, and from then on every recorded
//! reload also advances the trail's key baseline
//! ([`crate::auth::key_baseline`]).

pub mod access;
pub mod break_glass;
pub mod denials;
pub mod key_baseline;
pub mod key_events;
pub mod oidc;
pub mod policy;
pub mod sessions;
pub mod store;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use time::OffsetDateTime;

pub use store::{KeyRecord, KeyStore, KeyStoreError, Permission, PrincipalKind};

use crate::api::error::ApiError;
use crate::state::{AppState, RequestContext};

/// How a principal proved who it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    /// A Salus API key (its public id).
    ApiKey { key_id: String },
    /// A JWT from a configured OIDC issuer: its `iat` and the IdP's `sid`.
    Oidc { issued_at: Option<i64>, sid: Option<String> },
}

/// A caller whose credential was verified. Only the auth layer constructs it.
#[derive(Debug, Clone)]
pub struct AuthenticatedPrincipal {
    id: String,
    kind: PrincipalKind,
    permissions: Vec<Permission>,
    credential: Credential,
    /// A signed-in person's display name (audit records only).
    display_name: Option<String>,
    /// The limits it runs under (its own, else `[auth.limits]`).
    limits: policy::LimitSpec,
    /// The break-glass reason sent with this request (only when the principal
    /// holds `break_glass`).
    break_glass: Option<salus_sensitive::Phi<String>>,
}

impl AuthenticatedPrincipal {
    pub fn id(&self) -> &str {
        &self.id
    }
    pub fn kind(&self) -> PrincipalKind {
        self.kind
    }
    /// What the principal may do (its key's `roles`, or its IdP roles' permissions).
    pub fn permissions(&self) -> &[Permission] {
        &self.permissions
    }
    pub fn credential(&self) -> &Credential {
        &self.credential
    }
    /// The public id of the API key used (never the key); `None` for a JWT.
    pub fn key_id(&self) -> Option<&str> {
        match &self.credential {
            Credential::ApiKey { key_id } => Some(key_id),
            Credential::Oidc { .. } => None,
        }
    }
    pub fn has_permission(&self, permission: Permission) -> bool {
        self.permissions.contains(&permission)
    }
    /// 403 unless the principal has `permission`.
    pub fn require(&self, permission: Permission) -> Result<(), ApiError> {
        if self.has_permission(permission) {
            Ok(())
        } else {
            Err(ApiError::Forbidden { role: permission.as_str() })
        }
    }
    /// The principal as the trail records it: id, kind, roles and (for a
    /// signed-in person) display name.
    pub fn audit_principal(&self) -> salus_audit::AuditPrincipal {
        salus_audit::AuditPrincipal::new(&self.id, self.kind.as_str(), self.permissions.iter().map(|r| r.as_str()))
            .with_display_name(self.display_name.clone())
    }
}

/// The key store as the server sees it: reloaded when the file changes.
pub struct KeyStoreHandle {
    path: Option<PathBuf>,
    store: RwLock<Arc<KeyStore>>,
    check: Mutex<(Instant, Option<(SystemTime, u64)>)>,
    audit: std::sync::OnceLock<salus_audit::AuditLog>,
    /// The store whose keys the trail has recorded: reload diffs start here,
    /// so changes whose events could not be recorded are tried again.
    recorded: Mutex<Arc<KeyStore>>,
    /// Set once [`KeyStoreHandle::reconcile_with_trail`] succeeded: recorded
    /// reloads then rewrite the trail's key baseline.
    keep_baseline: AtomicBool,
    /// Told the previous and the new store after each reload (see [`Self::on_reload`]).
    on_reload: std::sync::OnceLock<OnReload>,
}

/// What a reload tells its listener: the previous store and the new one.
pub type OnReload = Box<dyn Fn(&KeyStore, &KeyStore) + Send + Sync>;

impl KeyStoreHandle {
    /// Loads the store at `path`.
    pub fn open(path: PathBuf) -> Result<Self, KeyStoreError> {
        // Stamp first: a change between the two is then reloaded (and recorded) later.
        let stamp = file_stamp(&path);
        let store = Arc::new(KeyStore::load(&path)?);
        Ok(KeyStoreHandle {
            path: Some(path),
            store: RwLock::new(store.clone()),
            check: Mutex::new((Instant::now(), stamp)),
            audit: std::sync::OnceLock::new(),
            recorded: Mutex::new(store),
            keep_baseline: AtomicBool::new(false),
            on_reload: std::sync::OnceLock::new(),
        })
    }

    /// A fixed in-memory store (tests).
    pub fn fixed(store: KeyStore) -> Self {
        let store = Arc::new(store);
        KeyStoreHandle {
            path: None,
            store: RwLock::new(store.clone()),
            check: Mutex::new((Instant::now(), None)),
            audit: std::sync::OnceLock::new(),
            recorded: Mutex::new(store),
            keep_baseline: AtomicBool::new(false),
            on_reload: std::sync::OnceLock::new(),
        }
    }

    /// `f` is told the previous and the new store after every reload (one
    /// listener; a second is ignored). The server drops what it keeps per
    /// principal for principals that lost their last active key.
    pub fn on_reload(&self, f: OnReload) {
        let _ = self.on_reload.set(f);
    }

    /// From now on, every reload that changes the store records
    /// `admin.key_created` / `admin.key_revoked` in `log` (durable before the
    /// new store is used, so they precede any request made with a new key).
    pub fn record_changes_in(&self, log: salus_audit::AuditLog) {
        let _ = self.audit.set(log);
    }

    /// At server start, after [`KeyStoreHandle::record_changes_in`]: records
    /// what the loaded store holds that the trail's key baseline does not
    /// (operation `keys.startup_reconcile`; e.g. a change made while the last
    /// server ran, which was killed before it noticed), writes the baseline, and
    /// keeps it up to date on every recorded reload from then on. Returns the
    /// number of events recorded. An error means the trail cannot be written:
    /// the server must not start.
    pub fn reconcile_with_trail(&self) -> Result<usize, salus_audit::AuditError> {
        let Some(log) = self.audit.get() else {
            return Err(salus_audit::AuditError::Config(
                "the key store has no audit trail attached (record_changes_in)".into(),
            ));
        };
        // No reload may run in between: it diffs from `recorded`.
        let _check = self.check.lock().unwrap_or_else(|e| e.into_inner());
        let store = self.store.read().unwrap_or_else(|e| e.into_inner()).clone();
        let n = crate::auth::key_baseline::reconcile(log, &store)?;
        *self.recorded.lock().unwrap_or_else(|e| e.into_inner()) = store;
        self.keep_baseline.store(true, Ordering::Release);
        Ok(n)
    }

    /// Re-reads the file now (SIGHUP). Keeps the old store if the new one is invalid.
    pub fn reload(&self) -> Result<(), KeyStoreError> {
        let Some(path) = &self.path else { return Ok(()) };
        let mut check = self.check.lock().unwrap_or_else(|e| e.into_inner());
        let stamp = file_stamp(path);
        let store = KeyStore::load(path)?;
        self.install(store, "keys.reload_sighup");
        *check = (Instant::now(), stamp);
        Ok(())
    }

    /// Checks the file for changes now and reloads it if it changed: what a
    /// request does anyway (at most once a second), for a periodic timer and
    /// for shutdown, so that changes are noticed (and recorded) on an idle
    /// server too.
    pub fn refresh(&self) {
        self.check_file(true);
    }

    /// Replaces the store, first recording (durably) the audit events for the
    /// difference from the last recorded store, then advancing the baseline.
    ///
    /// Called with `check` locked, possibly on an async executor thread (from
    /// a request's authentication). `record_blocking` waits only for the
    /// audit writer's own OS threads (writer + committer, `writer.rs` /
    /// `sync.rs`), never for a tokio task, so blocking here cannot deadlock
    /// the writer; it costs one group commit (about one `fdatasync`) and
    /// happens only when the key-store file changed.
    ///
    /// If an event cannot be recorded the new store is still installed (a
    /// revocation must take effect), but neither the recorded store nor the
    /// baseline advances: the next reload and the next start record the
    /// change again (a duplicate at worst, never a missing event).
    fn install(&self, new: KeyStore, operation: &'static str) {
        let new = Arc::new(new);
        if let Some(log) = self.audit.get() {
            let mut recorded = self.recorded.lock().unwrap_or_else(|e| e.into_inner());
            let actor = crate::auth::key_baseline::key_store_file_actor();
            let events = crate::auth::key_events::key_store_events(&recorded, &new, &actor, operation);
            let durable = events.into_iter().try_for_each(|ev| log.record_blocking(ev).map(drop));
            match durable {
                Ok(()) => {
                    *recorded = new.clone();
                    if self.keep_baseline.load(Ordering::Acquire) {
                        if let Err(e) = crate::auth::key_baseline::note_recorded(log, &new) {
                            tracing::error!(error = %e, "audit: key baseline not updated (recorded again at start)");
                        }
                    }
                }
                Err(e) => tracing::error!(error = %e, "audit: key store change not recorded"),
            }
        }
        let old = std::mem::replace(&mut *self.store.write().unwrap_or_else(|e| e.into_inner()), new.clone());
        if let Some(f) = self.on_reload.get() {
            f(&old, &new);
        }
    }

    fn current(&self) -> Arc<KeyStore> {
        self.check_file(false);
        self.store.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn check_file(&self, force: bool) {
        if let Some(path) = &self.path {
            let mut check = self.check.lock().unwrap_or_else(|e| e.into_inner());
            if force || check.0.elapsed() >= Duration::from_secs(1) {
                check.0 = Instant::now();
                let stamp = file_stamp(path);
                if stamp != check.1 {
                    match KeyStore::load(path) {
                        Ok(s) => {
                            self.install(s, "keys.reload_file_changed");
                            check.1 = stamp;
                        }
                        Err(e) => tracing::error!(error = %e, "key store reload failed; keeping the previous keys"),
                    }
                }
            }
        }
    }

    /// Verifies a presented key: the principal with its own limits (the
    /// defaults are applied by the extractor).
    pub fn authenticate(&self, presented: &str, now: OffsetDateTime) -> Result<AuthenticatedPrincipal, ApiError> {
        let store = self.current();
        match store.lookup(presented) {
            Some(rec) if rec.is_active(now) => Ok(AuthenticatedPrincipal {
                id: rec.principal.clone(),
                kind: rec.kind,
                permissions: rec.roles.clone(),
                credential: Credential::ApiKey { key_id: rec.id.clone() },
                display_name: None,
                limits: rec.limits.clone().unwrap_or_default(),
                break_glass: None,
            }),
            _ => Err(ApiError::Unauthorized),
        }
    }
}

/// A signed-in person from a verified token.
fn oidc_principal(t: oidc::VerifiedToken) -> AuthenticatedPrincipal {
    AuthenticatedPrincipal {
        id: t.principal,
        kind: PrincipalKind::Human,
        permissions: t.permissions,
        credential: Credential::Oidc { issued_at: t.issued_at, sid: t.sid },
        display_name: t.display_name,
        limits: t.limits,
        break_glass: None,
    }
}

/// Checks a bearer credential: an API key, or a JWT when issuers are configured.
async fn verify_credential(state: &AppState, token: &str) -> Result<AuthenticatedPrincipal, ApiError> {
    let access = state.access();
    // A compact JWS has exactly three dot-separated parts; anything else is
    // taken for an API key (and an unknown one is `invalid_api_key`).
    let jwt_shaped = token.bytes().filter(|b| *b == b'.').count() == 2;
    if token.starts_with(store::KEY_PREFIX) || !jwt_shaped || access.oidc().is_empty() {
        if token.len() > MAX_API_KEY_LEN {
            return Err(ApiError::Unauthorized);
        }
        return state.keys().authenticate(token, OffsetDateTime::now_utc());
    }
    match access.oidc().verify(token).await {
        Ok(t) => Ok(oidc_principal(t)),
        Err(oidc::OidcError::Rejected(r)) => Err(ApiError::Token(r)),
        Err(oidc::OidcError::KeysUnavailable) => Err(ApiError::IdentityProviderUnavailable),
    }
}

fn file_stamp(path: &std::path::Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// Longest API key accepted (`sk-salus-` + 64 hex, with room to spare).
const MAX_API_KEY_LEN: usize = 256;
/// Longest bearer token accepted (identity tokens with many groups are large).
const MAX_BEARER_LEN: usize = 16 * 1024;

/// Extracts the bearer token; any malformed header is simply "no valid credential".
fn bearer(parts: &Parts) -> Option<&str> {
    let value = parts.headers.get(axum::http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = token.trim();
    (!token.is_empty() && token.len() <= MAX_BEARER_LEN).then_some(token)
}

impl FromRequestParts<AppState> for AuthenticatedPrincipal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let ctx = parts.extensions.get::<Arc<RequestContext>>().cloned();
        let result = admit(parts, state, ctx.as_deref()).await;
        if let Some(ctx) = &ctx {
            match &result {
                Ok(p) => ctx.set_principal(p.id()),
                Err(_) => ctx.set_auth_denied(),
            }
        }
        result
    }
}

/// Credential, then session, break-glass header and policy.
async fn admit(
    parts: &Parts,
    state: &AppState,
    ctx: Option<&RequestContext>,
) -> Result<AuthenticatedPrincipal, ApiError> {
    let source = parts.extensions.get::<axum::extract::ConnectInfo<std::net::SocketAddr>>().map(|c| c.0.ip());
    let verified = match bearer(parts) {
        Some(token) => verify_credential(state, token).await,
        None => Err(ApiError::Unauthorized),
    };
    // A bad credential costs this source one attempt; past its limit: 429, no more work.
    let mut principal = verified.map_err(|e| {
        if !matches!(e, ApiError::Unauthorized | ApiError::Token(_)) {
            return e;
        }
        match state.denials().failed_authentication(source) {
            Ok(()) => e,
            Err(retry_after) => ApiError::AuthRateLimited { retry_after },
        }
    })?;
    let access = state.access();
    principal.limits = access.resolve_limits(&principal.limits);
    access.check_session(&principal, state.audit()).await?;
    if let Some(reason) = break_glass::reason_from(&parts.headers)? {
        if !principal.has_permission(Permission::BreakGlass) {
            return Err(ApiError::BreakGlassNotPermitted);
        }
        principal.break_glass = Some(reason);
    }
    let request_id = ctx.map(RequestContext::request_id).unwrap_or("");
    access.admit_request(&principal, source, state.audit(), state.metrics(), request_id).await?;
    Ok(principal)
}
