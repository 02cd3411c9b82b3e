//! Signing keys for tests: RSA (a fixed 2048-bit test key, `test-rsa-key.pem`;
//! ring cannot generate RSA keys), and P-256 and Ed25519 keys made per run.
//! Tokens are minted with `jsonwebtoken`, the JWKS is written from the public
//! halves.

use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

const RSA_PEM: &[u8] = include_bytes!("test-rsa-key.pem");
const RSA_N: &str = include_str!("test-rsa-n.txt");

pub struct TestKey {
    pub kid: String,
    pub alg: Algorithm,
    encoding: EncodingKey,
    pub jwk: Value,
}

impl TestKey {
    pub fn rsa(kid: &str) -> Self {
        let jwk = json!({ "kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256", "n": RSA_N.trim(), "e": "AQAB" });
        TestKey { kid: kid.into(), alg: Algorithm::RS256, encoding: EncodingKey::from_rsa_pem(RSA_PEM).unwrap(), jwk }
    }

    pub fn ec(kid: &str) -> Self {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let raw = kp.public_key_raw();
        assert_eq!(raw.len(), 65, "uncompressed P-256 point");
        let jwk = json!({ "kty": "EC", "kid": kid, "crv": "P-256", "x": b64(&raw[1..33]), "y": b64(&raw[33..]) });
        TestKey { kid: kid.into(), alg: Algorithm::ES256, encoding: EncodingKey::from_ec_der(&kp.serialize_der()), jwk }
    }

    pub fn ed(kid: &str) -> Self {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let jwk = json!({ "kty": "OKP", "kid": kid, "crv": "Ed25519", "x": b64(kp.public_key_raw()) });
        TestKey { kid: kid.into(), alg: Algorithm::EdDSA, encoding: EncodingKey::from_ed_der(&kp.serialize_der()), jwk }
    }

    /// A token with this key, its `kid` and `claims`.
    pub fn mint(&self, claims: &Value) -> String {
        let mut header = Header::new(self.alg);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding).unwrap()
    }
}

pub fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

pub fn jwks(keys: &[&TestKey]) -> Value {
    json!({ "keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>() })
}

pub fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// Standard claims for `sub` at issuer `iss`, audience `salus`, valid now.
pub fn claims(iss: &str, sub: &str, roles: &[&str]) -> Value {
    let now = now();
    json!({ "iss": iss, "aud": "salus", "sub": sub, "iat": now, "nbf": now - 1, "exp": now + 600,
            "preferred_username": format!("{sub}.name"), "roles": roles })
}

/// A compact token with an arbitrary header and claims and a junk signature.
pub fn unsigned(header: &Value, claims: &Value) -> String {
    format!("{}.{}.{}", b64(header.to_string().as_bytes()), b64(claims.to_string().as_bytes()), b64(b"sig"))
}

/// A local HTTPS server (self-signed for 127.0.0.1) serving `router`:
/// the base URL, the CA file to trust, and the directory holding it.
pub async fn https_server(router: axum::Router) -> (String, std::path::PathBuf, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    crate::tls::write_self_signed(&cert, &key, &["127.0.0.1".to_string()]).unwrap();
    let tls =
        crate::tls::ReloadableTls::new(crate::tls::TlsSettings { cert: cert.clone(), key, client_ca: None }).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let settings = crate::listener::ConnectionSettings::from_config(&crate::config::ServerConfig::default());
    tokio::spawn(crate::listener::serve(
        listener,
        router,
        Some(std::sync::Arc::new(tls)),
        settings,
        std::future::pending::<()>(),
    ));
    (format!("https://{addr}"), cert, dir)
}
