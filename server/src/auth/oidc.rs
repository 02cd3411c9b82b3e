//! Sign-in with the hospital's identity provider: bearer JWTs from configured
//! OIDC issuers, verified against the issuer's JWKS.
//!
//! Why these steps, in this order:
//!
//! 1. The token's header and payload are *read* (not trusted) to classify it:
//!    `alg: none` and every symmetric algorithm are refused outright (an
//!    issuer's keys are public, so an HMAC "signed" with one proves nothing),
//!    and the unverified `iss` only selects which issuer's keys to check with.
//! 2. The key is the JWKS entry with the token's `kid`, of a type that fits the
//!    algorithm. An unknown `kid` refetches the JWKS (the issuer rotated its
//!    keys), at most once per `jwks_min_refresh_secs`, so a flood of made-up
//!    `kid`s cannot turn Salus into a load generator against the IdP.
//! 3. Signature, `exp`, `nbf`, `iss` and `aud` are checked by `jsonwebtoken`
//!    (no hand-written cryptography), with `leeway_secs` of clock skew.
//!
//! Each refusal has its own `code` (see [`TokenRejection`]); the token itself
//! never reaches a log, an error or a metric.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use jsonwebtoken::jwk::{AlgorithmParameters, Jwk};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;

use super::policy::LimitSpec;
use super::Permission;
use crate::config::OidcProviderConfig;

/// Why a bearer JWT was refused (401). Messages are fixed text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenRejection {
    /// Not a JWS compact token, or its header or claims are not what an
    /// identity token must carry (`exp`, `iss`, `aud`, the principal claim).
    #[error("the bearer token is not a well-formed identity token")]
    Malformed,
    /// `alg: none`, a symmetric (`HS*`) or otherwise unaccepted algorithm.
    #[error("the bearer token's signature algorithm is not accepted")]
    AlgorithmNotAllowed,
    /// No key of the issuer's JWKS has the token's `kid` (after a refresh).
    #[error("the bearer token was signed with a key the issuer does not publish")]
    UnknownKey,
    /// The signature does not verify.
    #[error("the bearer token's signature is invalid")]
    InvalidSignature,
    /// `iss` is not a configured issuer.
    #[error("the bearer token's issuer is not trusted")]
    InvalidIssuer,
    /// `aud` names none of the issuer's configured audiences.
    #[error("the bearer token is not meant for this server (audience)")]
    InvalidAudience,
    /// `exp` has passed.
    #[error("the bearer token has expired")]
    Expired,
    /// `nbf` or `iat` is in the future.
    #[error("the bearer token is not valid yet")]
    NotYetValid,
}

impl TokenRejection {
    pub fn code(self) -> &'static str {
        match self {
            TokenRejection::Malformed => "token_malformed",
            TokenRejection::AlgorithmNotAllowed => "token_algorithm_not_allowed",
            TokenRejection::UnknownKey => "token_unknown_key",
            TokenRejection::InvalidSignature => "token_invalid_signature",
            TokenRejection::InvalidIssuer => "token_invalid_issuer",
            TokenRejection::InvalidAudience => "token_invalid_audience",
            TokenRejection::Expired => "token_expired",
            TokenRejection::NotYetValid => "token_not_yet_valid",
        }
    }
}

/// Why verification could not be done at all (the issuer's keys cannot be had).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OidcError {
    #[error(transparent)]
    Rejected(#[from] TokenRejection),
    /// The JWKS cannot be fetched or read, and no cached copy exists (503).
    #[error("the identity provider's keys are unavailable")]
    KeysUnavailable,
}

/// A token that verified: who, what they may do, and the session facts.
#[derive(Debug, Clone)]
pub struct VerifiedToken {
    /// `<alias>:<principal claim>`.
    pub principal: String,
    /// The display name claim, for audit records only.
    pub display_name: Option<String>,
    pub permissions: Vec<Permission>,
    /// The user's roles' limits, combined (the defaults not yet applied).
    pub limits: LimitSpec,
    /// `iat`, Unix seconds.
    pub issued_at: Option<i64>,
    /// `sid`: the IdP's session id.
    pub sid: Option<String>,
}

/// The asymmetric JWS algorithms Salus accepts, by name.
pub fn asymmetric_algorithm(name: &str) -> Option<Algorithm> {
    Some(match name {
        "RS256" => Algorithm::RS256,
        "RS384" => Algorithm::RS384,
        "RS512" => Algorithm::RS512,
        "PS256" => Algorithm::PS256,
        "PS384" => Algorithm::PS384,
        "PS512" => Algorithm::PS512,
        "ES256" => Algorithm::ES256,
        "ES384" => Algorithm::ES384,
        "EdDSA" => Algorithm::EdDSA,
        _ => return None,
    })
}

/// Most bytes of a JWKS document read.
const MAX_JWKS_BYTES: u64 = 1 << 20;

/// A JWKS file's keys as last read, with the file's modification time then.
type FileCache = Mutex<Option<(Option<SystemTime>, Arc<Vec<Jwk>>)>>;

/// Where an issuer's keys come from, with the cached copy.
enum JwksSource {
    File { path: PathBuf, cached: FileCache },
    Uri { url: String, agent: ureq::Agent, cached: tokio::sync::Mutex<UriCache> },
}

#[derive(Default)]
struct UriCache {
    keys: Option<Arc<Vec<Jwk>>>,
    fetched: Option<Instant>,
    attempted: Option<Instant>,
}

/// One configured issuer.
struct Issuer {
    cfg: OidcProviderConfig,
    algorithms: Vec<Algorithm>,
    source: JwksSource,
}

/// Every configured issuer.
pub struct OidcVerifier {
    issuers: Vec<Issuer>,
}

impl OidcVerifier {
    /// Builds the verifiers; the JWKS is loaded on first use (a file is
    /// checked here, so a wrong path stops the server).
    pub fn new(configs: &[OidcProviderConfig]) -> Result<Self, String> {
        let mut issuers = Vec::with_capacity(configs.len());
        for cfg in configs {
            let algorithms = cfg.algorithms.iter().filter_map(|a| asymmetric_algorithm(a)).collect();
            let source = match (&cfg.jwks_file, &cfg.jwks_uri) {
                (Some(path), _) => {
                    read_jwks_file(path).map_err(|e| format!("auth.oidc '{}': {e}", cfg.alias))?;
                    JwksSource::File { path: path.clone(), cached: Mutex::new(None) }
                }
                (None, Some(url)) => JwksSource::Uri {
                    url: url.clone(),
                    agent: https_agent(cfg.ca_file.as_deref())
                        .map_err(|e| format!("auth.oidc '{}': {e}", cfg.alias))?,
                    cached: tokio::sync::Mutex::new(UriCache::default()),
                },
                (None, None) => return Err(format!("auth.oidc '{}': no jwks_uri or jwks_file", cfg.alias)),
            };
            issuers.push(Issuer { cfg: cfg.clone(), algorithms, source });
        }
        Ok(OidcVerifier { issuers })
    }

    pub fn is_empty(&self) -> bool {
        self.issuers.is_empty()
    }

    /// Verifies `token` (see the module doc for the steps).
    pub async fn verify(&self, token: &str) -> Result<VerifiedToken, OidcError> {
        let (header, claims) = peek(token)?;
        let alg_name = header.get("alg").and_then(Value::as_str).ok_or(TokenRejection::Malformed)?;
        let alg = asymmetric_algorithm(alg_name).ok_or(TokenRejection::AlgorithmNotAllowed)?;
        let iss = claims.get("iss").and_then(Value::as_str).ok_or(TokenRejection::Malformed)?;
        let issuer = self.issuers.iter().find(|i| i.cfg.issuer == iss).ok_or(TokenRejection::InvalidIssuer)?;
        if !issuer.algorithms.contains(&alg) {
            return Err(TokenRejection::AlgorithmNotAllowed.into());
        }
        let kid = header.get("kid").and_then(Value::as_str);
        let key = issuer.key_for(kid, alg).await?;
        let mut validation = Validation::new(alg);
        validation.algorithms = vec![alg];
        validation.leeway = issuer.cfg.leeway_secs;
        validation.validate_nbf = true;
        validation.set_issuer(&[issuer.cfg.issuer.as_str()]);
        validation.set_audience(&issuer.cfg.audience);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        let data = jsonwebtoken::decode::<Value>(token, &key, &validation).map_err(|e| rejection(e.kind()))?;
        issuer.principal_of(&data.claims)
    }
}

impl Issuer {
    /// The key to check a token with `kid` and `alg`, refreshing the JWKS once
    /// (rate-limited) when the `kid` is unknown.
    async fn key_for(&self, kid: Option<&str>, alg: Algorithm) -> Result<DecodingKey, OidcError> {
        let keys = self.keys(false).await?;
        if let Some(k) = pick(&keys, kid, alg) {
            return k;
        }
        let keys = self.keys(true).await?;
        pick(&keys, kid, alg).unwrap_or(Err(TokenRejection::UnknownKey.into()))
    }

    /// The current keys; `unknown_kid` asks for a refetch (honoured at most
    /// once per `jwks_min_refresh_secs`).
    async fn keys(&self, unknown_kid: bool) -> Result<Arc<Vec<Jwk>>, OidcError> {
        match &self.source {
            JwksSource::File { path, cached } => {
                let stamp = std::fs::metadata(path).and_then(|m| m.modified()).ok();
                let mut c = cached.lock().unwrap_or_else(|e| e.into_inner());
                if let Some((s, keys)) = c.as_ref() {
                    if *s == stamp && stamp.is_some() {
                        return Ok(keys.clone());
                    }
                }
                match read_jwks_file(path) {
                    Ok(keys) => {
                        let keys = Arc::new(keys);
                        *c = Some((stamp, keys.clone()));
                        Ok(keys)
                    }
                    Err(e) => {
                        tracing::error!(issuer = %self.cfg.alias, error = %e, "OIDC: JWKS file unreadable");
                        c.as_ref().map(|(_, k)| k.clone()).ok_or(OidcError::KeysUnavailable)
                    }
                }
            }
            JwksSource::Uri { url, agent, cached } => {
                let mut c = cached.lock().await;
                let now = Instant::now();
                let fresh = c.fetched.is_some_and(|t| now - t < Duration::from_secs(self.cfg.jwks_cache_secs));
                let may_retry =
                    c.attempted.is_none_or(|t| now - t >= Duration::from_secs(self.cfg.jwks_min_refresh_secs));
                let want = c.keys.is_none() || !fresh || unknown_kid;
                if want && may_retry {
                    c.attempted = Some(now);
                    let (agent, url) = (agent.clone(), url.clone());
                    let fetched = tokio::task::spawn_blocking(move || fetch_jwks(&agent, &url))
                        .await
                        .unwrap_or_else(|_| Err("the JWKS fetch panicked".into()));
                    match fetched {
                        Ok(keys) => {
                            c.keys = Some(Arc::new(keys));
                            c.fetched = Some(now);
                        }
                        Err(e) => tracing::error!(issuer = %self.cfg.alias, error = %e, "OIDC: JWKS fetch failed"),
                    }
                }
                c.keys.clone().ok_or(OidcError::KeysUnavailable)
            }
        }
    }

    /// The principal, permissions and session facts of verified claims.
    fn principal_of(&self, claims: &Value) -> Result<VerifiedToken, OidcError> {
        let subject =
            claim(claims, &self.cfg.principal_claim).and_then(Value::as_str).ok_or(TokenRejection::Malformed)?;
        if subject.is_empty() || subject.len() > 256 || subject.chars().any(char::is_control) {
            return Err(TokenRejection::Malformed.into());
        }
        let issued_at = match claims.get("iat") {
            None => None,
            Some(v) => Some(v.as_f64().ok_or(TokenRejection::Malformed)? as i64),
        };
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        if issued_at.is_some_and(|iat| iat > now + self.cfg.leeway_secs as i64) {
            return Err(TokenRejection::NotYetValid.into());
        }
        let display_name = claim(claims, &self.cfg.display_name_claim)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty() && s.len() <= 256 && !s.chars().any(char::is_control))
            .map(str::to_string);
        let sid =
            claims.get("sid").and_then(Value::as_str).filter(|s| !s.is_empty() && s.len() <= 256).map(str::to_string);
        let roles: BTreeSet<&str> = match claim(claims, &self.cfg.roles_claim) {
            Some(Value::String(s)) => s.split_whitespace().collect(),
            Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
            _ => BTreeSet::new(),
        };
        let granted: Vec<_> = roles.iter().filter_map(|r| self.cfg.roles.get(*r)).collect();
        let mut permissions: Vec<Permission> = granted.iter().flat_map(|r| r.permissions.iter().copied()).collect();
        permissions.sort();
        permissions.dedup();
        let limits = LimitSpec::most_generous(granted.iter().map(|r| &r.limits));
        Ok(VerifiedToken {
            principal: format!("{}:{subject}", self.cfg.alias),
            display_name,
            permissions,
            limits,
            issued_at,
            sid,
        })
    }
}

/// The key with `kid` fitting `alg` (`None`: not found). Without a `kid` the
/// only fitting key is used, if there is exactly one.
fn pick(keys: &[Jwk], kid: Option<&str>, alg: Algorithm) -> Option<Result<DecodingKey, OidcError>> {
    let fits = |k: &&Jwk| fits_algorithm(k, alg);
    let key = match kid {
        Some(kid) => {
            let k = keys.iter().find(|k| k.common.key_id.as_deref() == Some(kid))?;
            if !fits(&k) {
                return Some(Err(TokenRejection::AlgorithmNotAllowed.into()));
            }
            k
        }
        None => {
            let mut fitting = keys.iter().filter(fits);
            let k = fitting.next()?;
            if fitting.next().is_some() {
                return None;
            }
            k
        }
    };
    Some(DecodingKey::from_jwk(key).map_err(|_| TokenRejection::UnknownKey.into()))
}

/// Whether a JWK may verify `alg`: its key type, curve and declared `alg`.
fn fits_algorithm(k: &Jwk, alg: Algorithm) -> bool {
    use jsonwebtoken::jwk::{EllipticCurve, PublicKeyUse};
    if matches!(k.common.public_key_use, Some(PublicKeyUse::Encryption)) {
        return false;
    }
    if let Some(declared) = k.common.key_algorithm {
        if format!("{declared:?}") != format!("{alg:?}") {
            return false;
        }
    }
    match (&k.algorithm, alg) {
        (AlgorithmParameters::RSA(_), Algorithm::RS256 | Algorithm::RS384 | Algorithm::RS512)
        | (AlgorithmParameters::RSA(_), Algorithm::PS256 | Algorithm::PS384 | Algorithm::PS512) => true,
        (AlgorithmParameters::EllipticCurve(p), Algorithm::ES256) => p.curve == EllipticCurve::P256,
        (AlgorithmParameters::EllipticCurve(p), Algorithm::ES384) => p.curve == EllipticCurve::P384,
        (AlgorithmParameters::OctetKeyPair(p), Algorithm::EdDSA) => p.curve == EllipticCurve::Ed25519,
        _ => false,
    }
}

/// Decodes a compact JWS's header and claims without verifying anything.
fn peek(token: &str) -> Result<(Value, Value), TokenRejection> {
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(_sig), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(TokenRejection::Malformed);
    };
    let decode = |s: &str| -> Result<Value, TokenRejection> {
        let bytes =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(s).map_err(|_| TokenRejection::Malformed)?;
        let v: Value = serde_json::from_slice(&bytes).map_err(|_| TokenRejection::Malformed)?;
        v.is_object().then_some(v).ok_or(TokenRejection::Malformed)
    };
    Ok((decode(h)?, decode(p)?))
}

/// A claim by dotted path (`realm_access.roles`); a literal key with dots wins.
fn claim<'a>(claims: &'a Value, path: &str) -> Option<&'a Value> {
    if let Some(v) = claims.get(path) {
        return Some(v);
    }
    path.split('.').try_fold(claims, |v, k| v.get(k))
}

fn rejection(kind: &jsonwebtoken::errors::ErrorKind) -> OidcError {
    use jsonwebtoken::errors::ErrorKind as K;
    OidcError::Rejected(match kind {
        K::ExpiredSignature => TokenRejection::Expired,
        K::ImmatureSignature => TokenRejection::NotYetValid,
        K::InvalidIssuer => TokenRejection::InvalidIssuer,
        K::InvalidAudience => TokenRejection::InvalidAudience,
        K::InvalidSignature | K::Crypto(_) | K::InvalidEcdsaKey | K::InvalidRsaKey(_) => {
            TokenRejection::InvalidSignature
        }
        K::InvalidAlgorithm | K::InvalidAlgorithmName | K::MissingAlgorithm => TokenRejection::AlgorithmNotAllowed,
        _ => TokenRejection::Malformed,
    })
}

/// Parses a JWKS document; keys Salus cannot use (symmetric, unknown types or
/// algorithms) are skipped rather than failing the set.
fn parse_jwks(bytes: &[u8]) -> Result<Vec<Jwk>, String> {
    let doc: Value = serde_json::from_slice(bytes).map_err(|_| "the JWKS is not JSON".to_string())?;
    let keys = doc.get("keys").and_then(Value::as_array).ok_or("the JWKS has no \"keys\" array")?;
    let parsed: Vec<Jwk> = keys
        .iter()
        .filter_map(|k| serde_json::from_value::<Jwk>(k.clone()).ok())
        .filter(|k| !matches!(k.algorithm, AlgorithmParameters::OctetKey(_)))
        .collect();
    Ok(parsed)
}

fn read_jwks_file(path: &std::path::Path) -> Result<Vec<Jwk>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("JWKS file {}: {e}", path.display()))?;
    parse_jwks(&bytes).map_err(|e| format!("JWKS file {}: {e}", path.display()))
}

fn fetch_jwks(agent: &ureq::Agent, url: &str) -> Result<Vec<Jwk>, String> {
    use std::io::Read;
    let resp = agent.get(url).call().map_err(|e| short_http_error(&e))?;
    let mut body = Vec::new();
    resp.into_reader().take(MAX_JWKS_BYTES + 1).read_to_end(&mut body).map_err(|e| format!("reading the JWKS: {e}"))?;
    if body.len() as u64 > MAX_JWKS_BYTES {
        return Err("the JWKS is larger than 1 MiB".into());
    }
    parse_jwks(&body)
}

/// An HTTP error without the response body (operator-facing, no PHI anyway).
pub(crate) fn short_http_error(e: &ureq::Error) -> String {
    match e {
        ureq::Error::Status(code, _) => format!("HTTP status {code}"),
        ureq::Error::Transport(t) => match t.message() {
            Some(m) => format!("transport error: {}: {m}", t.kind()),
            None => format!("transport error: {}", t.kind()),
        },
    }
}

/// An HTTPS-only client trusting `ca_file` (PEM) or else the system's roots.
pub(crate) fn https_agent(ca_file: Option<&std::path::Path>) -> Result<ureq::Agent, String> {
    let config = crate::tls::client_config(ca_file)?;
    Ok(ureq::AgentBuilder::new()
        .tls_config(Arc::new(config))
        .https_only(true)
        .timeout_connect(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .redirects(0)
        .build())
}

#[cfg(test)]
pub(crate) mod test_support;
#[cfg(test)]
mod tests;
