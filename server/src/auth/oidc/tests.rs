//! OIDC token verification: tokens minted here with RSA, P-256 and Ed25519
//! keys, checked against a JWKS file and a JWKS served over local HTTPS.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};

use super::test_support::{b64, claims, https_server, jwks, now, unsigned, TestKey};
use super::*;
use crate::config::OidcRoleConfig;

const ISS: &str = "https://idp.example.org/realms/hospital";

fn provider(jwks_file: Option<PathBuf>, jwks_uri: Option<String>, ca_file: Option<PathBuf>) -> OidcProviderConfig {
    let mut roles = BTreeMap::new();
    roles.insert(
        "clinician".to_string(),
        OidcRoleConfig {
            permissions: vec![Permission::Inference],
            limits: LimitSpec { requests_per_minute: Some(30), ..LimitSpec::default() },
        },
    );
    roles.insert(
        "oncall".to_string(),
        OidcRoleConfig {
            permissions: vec![Permission::BreakGlass, Permission::Inference],
            limits: LimitSpec::default(),
        },
    );
    OidcProviderConfig {
        alias: "hosp".into(),
        issuer: ISS.into(),
        audience: vec!["salus".into()],
        jwks_uri,
        jwks_file,
        ca_file,
        principal_claim: "sub".into(),
        display_name_claim: "preferred_username".into(),
        roles_claim: "roles".into(),
        roles,
        algorithms: vec!["RS256".into(), "ES256".into(), "EdDSA".into()],
        leeway_secs: 5,
        jwks_cache_secs: 3600,
        jwks_min_refresh_secs: 1,
    }
}

struct FileFixture {
    _dir: tempfile::TempDir,
    path: PathBuf,
    verifier: OidcVerifier,
    rsa: TestKey,
    ec: TestKey,
    ed: TestKey,
}

fn file_fixture() -> FileFixture {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    let (rsa, ec, ed) = (TestKey::rsa("rsa-1"), TestKey::ec("ec-1"), TestKey::ed("ed-1"));
    // An encryption key and a symmetric key in the set are ignored, not fatal.
    let mut set = jwks(&[&rsa, &ec, &ed]);
    set["keys"].as_array_mut().unwrap().push(json!({"kty": "oct", "kid": "hmac", "k": b64(b"secret")}));
    set["keys"].as_array_mut().unwrap().push(json!({"kty": "XYZ", "kid": "future"}));
    std::fs::write(&path, set.to_string()).unwrap();
    let verifier = OidcVerifier::new(&[provider(Some(path.clone()), None, None)]).unwrap();
    FileFixture { _dir: dir, path, verifier, rsa, ec, ed }
}

async fn rejection_of(v: &OidcVerifier, token: &str) -> TokenRejection {
    match v.verify(token).await {
        Err(OidcError::Rejected(r)) => r,
        other => panic!("expected a rejection, got {other:?}"),
    }
}

#[tokio::test]
async fn rsa_ec_and_ed25519_tokens_sign_people_in_with_their_roles() {
    let f = file_fixture();
    for key in [&f.rsa, &f.ec, &f.ed] {
        let token = key.mint(&claims(ISS, "alice", &["clinician", "unmapped-group"]));
        let t = f.verifier.verify(&token).await.unwrap_or_else(|e| panic!("{:?}: {e:?}", key.alg));
        assert_eq!(t.principal, "hosp:alice");
        assert_eq!(t.display_name.as_deref(), Some("alice.name"));
        assert_eq!(t.permissions, vec![Permission::Inference]);
        assert_eq!(t.limits.requests_per_minute, Some(30));
        assert!(t.issued_at.is_some_and(|iat| (iat - now()).abs() < 5));
    }
    // Two roles: the union of permissions.
    let t = f.verifier.verify(&f.ed.mint(&claims(ISS, "bob", &["clinician", "oncall"]))).await.unwrap();
    assert_eq!(t.permissions, vec![Permission::Inference, Permission::BreakGlass]);
    // Roles at a dotted path (Keycloak's realm_access.roles), and as a space-separated string.
    let mut cfg = provider(Some(f.path.clone()), None, None);
    cfg.roles_claim = "realm_access.roles".into();
    let v = OidcVerifier::new(&[cfg]).unwrap();
    let mut c = claims(ISS, "carol", &[]);
    c["realm_access"] = json!({"roles": ["oncall"]});
    assert!(v.verify(&f.rsa.mint(&c)).await.unwrap().permissions.contains(&Permission::BreakGlass));
    c["roles"] = json!("clinician oncall");
    let t = f.verifier.verify(&f.rsa.mint(&c)).await.unwrap();
    assert_eq!(t.permissions.len(), 2);
}

#[tokio::test]
async fn every_rejection_has_its_own_reason() {
    let f = file_fixture();
    let v = &f.verifier;
    let good = claims(ISS, "alice", &["clinician"]);
    // alg: none, and HS256 "signed" with the issuer's public key.
    let none = unsigned(&json!({"alg": "none", "typ": "JWT"}), &good);
    assert_eq!(
        rejection_of(v, &format!("{}.", none.rsplit_once('.').unwrap().0)).await,
        TokenRejection::AlgorithmNotAllowed
    );
    let n = f.rsa.jwk["n"].as_str().unwrap().as_bytes().to_vec();
    let mut hs = jsonwebtoken::Header::new(Algorithm::HS256);
    hs.kid = Some("rsa-1".into());
    let forged = jsonwebtoken::encode(&hs, &good, &jsonwebtoken::EncodingKey::from_secret(&n)).unwrap();
    assert_eq!(rejection_of(v, &forged).await, TokenRejection::AlgorithmNotAllowed);
    // A key the issuer does not publish.
    let stranger = TestKey::ec("ec-unknown");
    assert_eq!(rejection_of(v, &stranger.mint(&good)).await, TokenRejection::UnknownKey);
    // A published kid, but a key not of the token's algorithm (EC key, RS256 header).
    let mut wrong = jsonwebtoken::Header::new(Algorithm::RS256);
    wrong.kid = Some("ec-1".into());
    let t = jsonwebtoken::encode(
        &wrong,
        &good,
        &jsonwebtoken::EncodingKey::from_rsa_pem(include_bytes!("test-rsa-key.pem")).unwrap(),
    )
    .unwrap();
    assert_eq!(rejection_of(v, &t).await, TokenRejection::AlgorithmNotAllowed);
    // Someone else's key under our kid: the signature fails.
    let impostor = TestKey::ec("ec-1");
    assert_eq!(rejection_of(v, &impostor.mint(&good)).await, TokenRejection::InvalidSignature);
    // A tampered payload.
    let token = f.ec.mint(&good);
    let parts: Vec<&str> = token.split('.').collect();
    let mut evil = good.clone();
    evil["sub"] = json!("mallory");
    let tampered = format!("{}.{}.{}", parts[0], b64(evil.to_string().as_bytes()), parts[2]);
    assert_eq!(rejection_of(v, &tampered).await, TokenRejection::InvalidSignature);
    // Issuer, audience, expiry, not-before, iat in the future.
    let with = |k: &str, val: Value| {
        let mut c = good.clone();
        c[k] = val;
        c
    };
    assert_eq!(
        rejection_of(v, &f.rsa.mint(&with("iss", json!("https://evil.example")))).await,
        TokenRejection::InvalidIssuer
    );
    assert_eq!(rejection_of(v, &f.rsa.mint(&with("aud", json!("other-app")))).await, TokenRejection::InvalidAudience);
    assert_eq!(rejection_of(v, &f.rsa.mint(&with("exp", json!(now() - 60)))).await, TokenRejection::Expired);
    assert_eq!(rejection_of(v, &f.rsa.mint(&with("nbf", json!(now() + 120)))).await, TokenRejection::NotYetValid);
    assert_eq!(rejection_of(v, &f.rsa.mint(&with("iat", json!(now() + 120)))).await, TokenRejection::NotYetValid);
    // Not a token; no exp; no subject.
    assert_eq!(rejection_of(v, "not.a.jwt").await, TokenRejection::Malformed);
    assert_eq!(rejection_of(v, "abc").await, TokenRejection::Malformed);
    let mut no_exp = good.clone();
    no_exp.as_object_mut().unwrap().remove("exp");
    assert_eq!(rejection_of(v, &f.rsa.mint(&no_exp)).await, TokenRejection::Malformed);
    let mut no_sub = good.clone();
    no_sub.as_object_mut().unwrap().remove("sub");
    assert_eq!(rejection_of(v, &f.rsa.mint(&no_sub)).await, TokenRejection::Malformed);
    // Codes are distinct.
    let codes: std::collections::BTreeSet<_> = [
        TokenRejection::Malformed,
        TokenRejection::AlgorithmNotAllowed,
        TokenRejection::UnknownKey,
        TokenRejection::InvalidSignature,
        TokenRejection::InvalidIssuer,
        TokenRejection::InvalidAudience,
        TokenRejection::Expired,
        TokenRejection::NotYetValid,
    ]
    .map(TokenRejection::code)
    .into();
    assert_eq!(codes.len(), 8);
}

#[tokio::test]
async fn an_unconfigured_algorithm_is_refused_even_with_a_published_key() {
    let f = file_fixture();
    let mut cfg = provider(Some(f.path.clone()), None, None);
    cfg.algorithms = vec!["ES256".into()];
    let v = OidcVerifier::new(&[cfg]).unwrap();
    let good = claims(ISS, "alice", &[]);
    assert_eq!(rejection_of(&v, &f.rsa.mint(&good)).await, TokenRejection::AlgorithmNotAllowed);
    assert!(v.verify(&f.ec.mint(&good)).await.is_ok());
}

#[tokio::test]
async fn a_changed_jwks_file_is_reread() {
    let f = file_fixture();
    let next = TestKey::ed("ed-2");
    let token = next.mint(&claims(ISS, "alice", &[]));
    assert_eq!(rejection_of(&f.verifier, &token).await, TokenRejection::UnknownKey);
    // mtime granularity: make sure the stamp changes.
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::write(&f.path, jwks(&[&f.rsa, &next]).to_string()).unwrap();
    let later = std::time::SystemTime::now() + std::time::Duration::from_secs(2);
    std::fs::File::options().write(true).open(&f.path).unwrap().set_modified(later).unwrap();
    assert!(f.verifier.verify(&token).await.is_ok());
    // The removed key no longer verifies.
    assert_eq!(rejection_of(&f.verifier, &f.ec.mint(&claims(ISS, "a", &[]))).await, TokenRejection::UnknownKey);
}

#[tokio::test]
async fn jwks_over_https_picks_up_rotated_keys_at_a_bounded_rate() {
    let first = TestKey::rsa("k1");
    let second = TestKey::ec("k2");
    let published = Arc::new(Mutex::new(jwks(&[&first])));
    let fetches = Arc::new(AtomicUsize::new(0));
    let router = {
        let (published, fetches) = (published.clone(), fetches.clone());
        axum::Router::new().route(
            "/jwks",
            axum::routing::get(move || {
                let (published, fetches) = (published.clone(), fetches.clone());
                async move {
                    fetches.fetch_add(1, Ordering::SeqCst);
                    axum::Json(published.lock().unwrap().clone())
                }
            }),
        )
    };
    let (base, ca, _dir) = https_server(router).await;
    let v = OidcVerifier::new(&[provider(None, Some(format!("{base}/jwks")), Some(ca))]).unwrap();
    let c = claims(ISS, "alice", &["clinician"]);
    v.verify(&first.mint(&c)).await.unwrap();
    v.verify(&first.mint(&c)).await.unwrap();
    assert_eq!(fetches.load(Ordering::SeqCst), 1, "cached");
    // The issuer rotates: a token with the new kid before the refresh interval has passed…
    *published.lock().unwrap() = jwks(&[&first, &second]);
    let rotated = second.mint(&c);
    let r = v.verify(&rotated).await;
    let seen = fetches.load(Ordering::SeqCst);
    // …is either picked up by the one refetch allowed, or refused if the first
    // fetch was within the last second; a flood of unknown kids adds no fetches.
    for _ in 0..20 {
        let _ = v.verify(&TestKey::ed("made-up").mint(&c)).await;
    }
    assert!(fetches.load(Ordering::SeqCst) <= seen + 1, "unknown kids refetch at most once per interval");
    if r.is_err() {
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    }
    v.verify(&rotated).await.unwrap();
    // The wrong CA: the fetch fails, and without a cached copy the keys are unavailable.
    let other_ca = tempfile::tempdir().unwrap();
    let (cert, key) = (other_ca.path().join("c.pem"), other_ca.path().join("k.pem"));
    crate::tls::write_self_signed(&cert, &key, &["127.0.0.1".to_string()]).unwrap();
    let v = OidcVerifier::new(&[provider(None, Some(format!("{base}/jwks")), Some(cert))]).unwrap();
    assert_eq!(v.verify(&first.mint(&c)).await.unwrap_err(), OidcError::KeysUnavailable);
}
