//! `[auth]`: API keys, OIDC issuers, sessions, per-principal limits and
//! break-glass.
//!
//! Why here and not beside each feature: every key must be checked at start-up
//! (a typo in an issuer or a CIDR must stop the server, not open it), and the
//! checks need the whole section (an OIDC role map may grant `break_glass`,
//! which needs `[auth.break_glass]` to be usable).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use super::ConfigError;
pub use crate::auth::policy::LimitSpec;
use crate::auth::Permission;

/// `[auth]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// The API key store (JSON, hashes only), managed with `salus keys`.
    pub api_keys: PathBuf,
    /// Denied requests are written to the audit trail as one `auth.denied`
    /// record per (source, reason) per this many seconds, with their count.
    pub denial_record_interval_secs: u64,
    /// Most (source, reason) tallies held per interval; denials from further
    /// sources are folded into one tally per reason.
    pub denial_max_sources: usize,
    /// Failed authentications one source address may make at once…
    pub failed_auth_burst: u32,
    /// …and per second after that; past it, 429 with Retry-After.
    pub failed_auth_per_second: f64,
    /// `[[auth.oidc]]`: identity providers whose JWTs sign people in.
    pub oidc: Vec<OidcProviderConfig>,
    /// `[auth.sessions]`: automatic session timeout.
    pub sessions: SessionConfig,
    /// `[auth.limits]`: default per-principal limits.
    pub limits: PrincipalLimitsConfig,
    /// `[auth.break_glass]`: emergency access.
    pub break_glass: BreakGlassConfig,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            api_keys: PathBuf::from("/var/lib/salus/api-keys.json"),
            denial_record_interval_secs: 10,
            denial_max_sources: 256,
            failed_auth_burst: 20,
            failed_auth_per_second: 5.0,
            oidc: Vec::new(),
            sessions: SessionConfig::default(),
            limits: PrincipalLimitsConfig::default(),
            break_glass: BreakGlassConfig::default(),
        }
    }
}

/// One `[[auth.oidc]]` issuer.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OidcProviderConfig {
    /// Short name: principals are `<alias>:<sub>`. `[A-Za-z0-9_-]`, 1–32 characters.
    pub alias: String,
    /// The exact `iss` the tokens carry.
    pub issuer: String,
    /// Accepted `aud` values (a token needs one of them).
    #[serde(deserialize_with = "one_or_many")]
    pub audience: Vec<String>,
    /// Where the issuer publishes its keys (HTTPS). One of this and `jwks_file`.
    #[serde(default)]
    pub jwks_uri: Option<String>,
    /// A local JWKS file (re-read when it changes).
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// CA bundle (PEM) for `jwks_uri`; the system roots when absent.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// The claim that names the user.
    #[serde(default = "default_principal_claim")]
    pub principal_claim: String,
    /// The claim shown as the user's name in audit records.
    #[serde(default = "default_display_name_claim")]
    pub display_name_claim: String,
    /// The claim (dotted path, e.g. `realm_access.roles`) holding the user's
    /// roles or groups: a string or an array of strings.
    #[serde(default = "default_roles_claim")]
    pub roles_claim: String,
    /// IdP role or group → Salus permissions and limits: a table
    /// `{ permissions = [...], limits = {...} }`, or just the list of permissions.
    #[serde(default, alias = "role_map", alias = "role_mapping")]
    pub roles: BTreeMap<String, OidcRoleConfig>,
    /// Accepted signature algorithms (asymmetric only).
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<String>,
    /// Clock skew allowed on `exp`, `nbf` and `iat`.
    #[serde(default = "default_leeway")]
    pub leeway_secs: u64,
    /// A fetched JWKS is used for at most this long before it is fetched again.
    #[serde(default = "default_jwks_cache")]
    pub jwks_cache_secs: u64,
    /// An unknown `kid` refetches the JWKS at most this often.
    #[serde(default = "default_jwks_min_refresh")]
    pub jwks_min_refresh_secs: u64,
}

fn default_principal_claim() -> String {
    "sub".into()
}
fn default_display_name_claim() -> String {
    "preferred_username".into()
}
fn default_roles_claim() -> String {
    "roles".into()
}
fn default_algorithms() -> Vec<String> {
    ["RS256", "ES256", "EdDSA"].map(String::from).to_vec()
}
fn default_leeway() -> u64 {
    30
}
fn default_jwks_cache() -> u64 {
    3600
}
fn default_jwks_min_refresh() -> u64 {
    30
}

fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

/// `[auth.oidc.roles.<name>]`: what an IdP role grants.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(from = "RoleForm")]
pub struct OidcRoleConfig {
    pub permissions: Vec<Permission>,
    /// Limits for holders of this role (the most generous of a user's roles wins;
    /// unset ones fall back to `[auth.limits]`).
    pub limits: LimitSpec,
}

/// The two spellings of a role: the permissions alone, or a table.
#[derive(Deserialize)]
#[serde(untagged)]
enum RoleForm {
    Permissions(Vec<Permission>),
    Table(RoleTable),
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct RoleTable {
    permissions: Vec<Permission>,
    limits: LimitSpec,
}

impl From<RoleForm> for OidcRoleConfig {
    fn from(f: RoleForm) -> Self {
        match f {
            RoleForm::Permissions(permissions) => OidcRoleConfig { permissions, limits: LimitSpec::default() },
            RoleForm::Table(t) => OidcRoleConfig { permissions: t.permissions, limits: t.limits },
        }
    }
}

/// `[auth.sessions]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SessionConfig {
    /// A session with no request for this long expires.
    pub idle_timeout_secs: u64,
    /// A session expires this long after it began, however busy.
    pub max_session_secs: u64,
    /// Service API keys get sessions too (default: exempt).
    pub service_keys: bool,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig { idle_timeout_secs: 900, max_session_secs: 43_200, service_keys: false }
    }
}

/// `[auth.limits]`: the limits of a principal that sets none of its own.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PrincipalLimitsConfig {
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u64>,
    pub concurrent_requests: Option<u32>,
    pub allowed_cidrs: Option<Vec<ipnet::IpNet>>,
    /// Principal ids that may appear as a metric label (limit rejections per
    /// principal); every other principal is counted only per limit kind.
    pub metric_principals: Vec<String>,
}

impl PrincipalLimitsConfig {
    pub fn defaults(&self) -> LimitSpec {
        LimitSpec {
            requests_per_minute: self.requests_per_minute,
            tokens_per_minute: self.tokens_per_minute,
            concurrent_requests: self.concurrent_requests,
            allowed_cidrs: self.allowed_cidrs.clone(),
        }
    }
}

/// `[auth.break_glass]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct BreakGlassConfig {
    /// How long one use keeps overriding the principal's policy.
    pub window_secs: u64,
    /// HTTPS URL told of every use (JSON, no PHI).
    pub notify_url: Option<String>,
    /// CA bundle (PEM) for `notify_url`; the system roots when absent.
    pub notify_ca_file: Option<PathBuf>,
    /// Delivery attempts per notification (exponential backoff from 1 s).
    pub notify_attempts: u32,
}

impl Default for BreakGlassConfig {
    fn default() -> Self {
        BreakGlassConfig { window_secs: 3600, notify_url: None, notify_ca_file: None, notify_attempts: 6 }
    }
}

fn value(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Value { key, reason: reason.into() }
}

impl AuthConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.denial_record_interval_secs == 0 || self.denial_max_sources == 0 || self.failed_auth_burst == 0 {
            return Err(value(
                "auth",
                "denial_record_interval_secs, denial_max_sources and failed_auth_burst must be at least 1",
            ));
        }
        if !(self.failed_auth_per_second.is_finite() && self.failed_auth_per_second > 0.0) {
            return Err(value("auth.failed_auth_per_second", "must be a positive number"));
        }
        let s = &self.sessions;
        if s.idle_timeout_secs == 0 || s.max_session_secs == 0 {
            return Err(value("auth.sessions", "idle_timeout_secs and max_session_secs must be at least 1"));
        }
        self.limits.defaults().validate().map_err(|r| value("auth.limits", r))?;
        let b = &self.break_glass;
        if b.window_secs == 0 {
            return Err(value("auth.break_glass.window_secs", "must be at least 1"));
        }
        if b.notify_attempts == 0 || b.notify_attempts > 20 {
            return Err(value("auth.break_glass.notify_attempts", "must be 1 to 20"));
        }
        if let Some(url) = &b.notify_url {
            if !url.starts_with("https://") || url.len() <= "https://".len() {
                return Err(value("auth.break_glass.notify_url", "must be an https:// URL"));
            }
        }
        let mut aliases = std::collections::BTreeSet::new();
        for p in &self.oidc {
            p.validate()?;
            if !aliases.insert(p.alias.as_str()) {
                return Err(value("auth.oidc.alias", format!("'{}' is used by two issuers", p.alias)));
            }
        }
        Ok(())
    }
}

impl OidcProviderConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let alias_ok = !self.alias.is_empty()
            && self.alias.len() <= 32
            && self.alias.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !alias_ok {
            return Err(value("auth.oidc.alias", "use 1-32 characters from A-Z a-z 0-9 _ -"));
        }
        let key = |k: &'static str, r: String| value(k, format!("issuer '{}': {r}", self.alias));
        if self.issuer.is_empty() {
            return Err(key("auth.oidc.issuer", "must not be empty".into()));
        }
        if self.audience.is_empty() || self.audience.iter().any(String::is_empty) {
            return Err(key("auth.oidc.audience", "needs at least one non-empty audience".into()));
        }
        match (&self.jwks_uri, &self.jwks_file) {
            (Some(_), Some(_)) | (None, None) => {
                return Err(key("auth.oidc.jwks_uri", "set exactly one of jwks_uri and jwks_file".into()))
            }
            (Some(u), None) if !u.starts_with("https://") => {
                return Err(key("auth.oidc.jwks_uri", "must be an https:// URL".into()))
            }
            _ => {}
        }
        if self.algorithms.is_empty() {
            return Err(key("auth.oidc.algorithms", "must name at least one algorithm".into()));
        }
        for a in &self.algorithms {
            crate::auth::oidc::asymmetric_algorithm(a).ok_or_else(|| {
                key("auth.oidc.algorithms", format!("'{a}' is not an accepted asymmetric JWS algorithm"))
            })?;
        }
        for (name, claim) in [("principal_claim", &self.principal_claim), ("roles_claim", &self.roles_claim)] {
            if claim.is_empty() || claim.split('.').any(str::is_empty) {
                return Err(key("auth.oidc", format!("{name} must be a claim name or dotted path")));
            }
        }
        if self.jwks_min_refresh_secs == 0 || self.jwks_cache_secs == 0 {
            return Err(key("auth.oidc", "jwks_cache_secs and jwks_min_refresh_secs must be at least 1".into()));
        }
        for (role, r) in &self.roles {
            r.limits.validate().map_err(|e| key("auth.oidc.roles", format!("role '{role}': {e}")))?;
        }
        Ok(())
    }
}
