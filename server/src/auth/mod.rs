//! Authentication: `Authorization: Bearer <key>` → [`AuthenticatedPrincipal`].
//!
//! [`AuthenticatedPrincipal`] has private fields and no public constructor: the
//! only way to get one is the axum extractor below, which checks the key against
//! the [`KeyStore`]. Handlers that run inference take it as an argument, so an
//! unauthenticated path to the model cannot compile.
//!
//! The server re-reads the key store when its file changes (checked at most once
//! a second), so `salus keys revoke` takes effect on a running server. With an
//! audit trail attached ([`KeyStoreHandle::record_changes_in`]) each reload
//! records `admin.key_created` / `admin.key_revoked` for what changed
//! ([`crate::audit::admin::key_store_events`]) before the new keys are used.

pub mod store;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use time::OffsetDateTime;

pub use store::{KeyRecord, KeyStore, KeyStoreError, PrincipalKind, Role};

use crate::api::error::ApiError;
use crate::state::{AppState, RequestContext};

/// A caller whose API key was verified. Only the auth layer constructs it.
#[derive(Debug, Clone)]
pub struct AuthenticatedPrincipal {
    id: String,
    kind: PrincipalKind,
    roles: Vec<Role>,
    key_id: String,
}

impl AuthenticatedPrincipal {
    pub fn id(&self) -> &str {
        &self.id
    }
    pub fn kind(&self) -> PrincipalKind {
        self.kind
    }
    pub fn roles(&self) -> &[Role] {
        &self.roles
    }
    /// The public id of the key used (never the key).
    pub fn key_id(&self) -> &str {
        &self.key_id
    }
    pub fn has_role(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }
    /// 403 unless the principal has `role`.
    pub fn require(&self, role: Role) -> Result<(), ApiError> {
        if self.has_role(role) {
            Ok(())
        } else {
            Err(ApiError::Forbidden { role: role.as_str() })
        }
    }
}

/// The key store as the server sees it: reloaded when the file changes.
pub struct KeyStoreHandle {
    path: Option<PathBuf>,
    store: RwLock<Arc<KeyStore>>,
    check: Mutex<(Instant, Option<(SystemTime, u64)>)>,
    audit: std::sync::OnceLock<crate::audit::AuditLog>,
}

impl KeyStoreHandle {
    /// Loads the store at `path`.
    pub fn open(path: PathBuf) -> Result<Self, KeyStoreError> {
        let store = KeyStore::load(&path)?;
        let stamp = file_stamp(&path);
        Ok(KeyStoreHandle {
            path: Some(path),
            store: RwLock::new(Arc::new(store)),
            check: Mutex::new((Instant::now(), stamp)),
            audit: std::sync::OnceLock::new(),
        })
    }

    /// A fixed in-memory store (tests).
    pub fn fixed(store: KeyStore) -> Self {
        KeyStoreHandle {
            path: None,
            store: RwLock::new(Arc::new(store)),
            check: Mutex::new((Instant::now(), None)),
            audit: std::sync::OnceLock::new(),
        }
    }

    /// From now on, every reload that changes the store records
    /// `admin.key_created` / `admin.key_revoked` in `log` (queued before the
    /// new store is used, so they precede any request made with a new key).
    pub fn record_changes_in(&self, log: crate::audit::AuditLog) {
        let _ = self.audit.set(log);
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

    /// Replaces the store, first queueing the audit events for the difference.
    fn install(&self, new: KeyStore, operation: &'static str) {
        if let Some(log) = self.audit.get() {
            let old = self.store.read().unwrap_or_else(|e| e.into_inner()).clone();
            let actor = crate::audit::AuditPrincipal::new("key-store-file", "local", Vec::<String>::new());
            for ev in crate::audit::admin::key_store_events(&old, &new, &actor, operation) {
                if let Err(e) = log.record_nowait(ev) {
                    tracing::error!(error = %e, "audit: key store change not recorded");
                }
            }
        }
        *self.store.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(new);
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

    /// Verifies a presented key.
    pub fn authenticate(&self, presented: &str, now: OffsetDateTime) -> Result<AuthenticatedPrincipal, ApiError> {
        let store = self.current();
        match store.lookup(presented) {
            Some(rec) if rec.is_active(now) => Ok(AuthenticatedPrincipal {
                id: rec.principal.clone(),
                kind: rec.kind,
                roles: rec.roles.clone(),
                key_id: rec.id.clone(),
            }),
            _ => Err(ApiError::Unauthorized),
        }
    }
}

fn file_stamp(path: &std::path::Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// Extracts the bearer token; any malformed header is simply "no valid key".
fn bearer(parts: &Parts) -> Option<&str> {
    let value = parts.headers.get(axum::http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = token.trim();
    (!token.is_empty() && token.len() <= 256).then_some(token)
}

impl FromRequestParts<AppState> for AuthenticatedPrincipal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let result = match bearer(parts) {
            Some(token) => state.keys().authenticate(token, OffsetDateTime::now_utc()),
            None => Err(ApiError::Unauthorized),
        };
        if let Some(ctx) = parts.extensions.get::<Arc<RequestContext>>() {
            match &result {
                Ok(p) => ctx.set_principal(p.id()),
                Err(_) => ctx.set_auth_denied(),
            }
        }
        result
    }
}
