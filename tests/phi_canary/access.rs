//! Canaries in what people and emergencies send: JWT claims (a display name,
//! e-mail, name, IdP session id, token id, an unmapped group, a custom claim)
//! and break-glass reasons. The display name and an accepted reason belong in
//! the (encrypted) audit trail and nowhere else; everything else nowhere.

use base64::Engine as _;
use serde_json::json;

use super::{expect_error, Canaries, Dirs, Resp, Server};

/// The issuer the harness server trusts.
pub const ISSUER: &str = "https://idp.canary.test/realms/hospital";

/// A P-256 signing key and its JWKS, written where the server reads it.
pub struct Issuer {
    encoding: jsonwebtoken::EncodingKey,
}

impl Issuer {
    pub fn new(dirs: &Dirs) -> Issuer {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let raw = kp.public_key_raw();
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let jwks =
            json!({"keys": [{"kty": "EC", "kid": "k1", "crv": "P-256", "x": b64(&raw[1..33]), "y": b64(&raw[33..])}]});
        std::fs::write(jwks_path(dirs), jwks.to_string()).unwrap();
        Issuer { encoding: jsonwebtoken::EncodingKey::from_ec_der(&kp.serialize_der()) }
    }

    fn mint(&self, claims: &serde_json::Value) -> String {
        let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        h.kid = Some("k1".into());
        jsonwebtoken::encode(&h, claims, &self.encoding).unwrap()
    }
}

fn jwks_path(dirs: &Dirs) -> std::path::PathBuf {
    dirs.path("home").join("jwks.json")
}

/// `[[auth.oidc]]` as the server's environment: role `oncall` may break glass
/// but not run inference (so a reason is needed and recorded).
pub fn server_env(dirs: &Dirs) -> (String, String) {
    let value = format!(
        r#"[{{alias = "hosp", issuer = "{ISSUER}", audience = "salus", jwks_file = "{}", roles = {{ oncall = {{ permissions = ["break_glass"] }}, clinician = {{ permissions = ["inference"] }} }} }}]"#,
        jwks_path(dirs).display()
    );
    ("SALUS_AUTH__OIDC".into(), value)
}

fn post_with(s: &mut Server, bearer: &str, headers: &[String], body: &serde_json::Value) -> Resp {
    s.post_raw("/v1/chat/completions", Some(bearer), headers, body.to_string().as_bytes())
}

/// Sends the injections; returns nothing but fills `cn` and `errors`.
pub fn inject(
    s: &mut Server,
    issuer: &Issuer,
    cn: &mut Canaries,
    body: &serde_json::Value,
    errors: &mut Vec<(String, Resp)>,
) {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let display = cn.mint_audit_only("JWT preferred_username");
    let claims = json!({
        "iss": ISSUER, "aud": "salus", "sub": "clin-7", "iat": now, "exp": now + 600,
        "preferred_username": display,
        "email": format!("{}@hospital.test", cn.mint("JWT email")),
        "name": cn.mint("JWT name"),
        "sid": cn.mint("JWT sid"),
        "jti": cn.mint("JWT jti"),
        "roles": ["clinician", cn.mint("JWT unmapped role")],
        "patient_context": cn.mint("JWT custom claim"),
    });
    let token = issuer.mint(&claims);
    let r = post_with(s, &token, &[], body);
    assert_eq!(r.status, 200, "a signed-in clinician is served: {}", r.text());
    // The same claims, refused: a tampered signature, an expired token, a foreign audience.
    let mut parts: Vec<String> = token.split('.').map(String::from).collect();
    parts[2] = parts[2].chars().rev().collect();
    expect_error("JWT with a bad signature", post_with(s, &parts.join("."), &[], body), 401, errors);
    let mut expired = claims.clone();
    expired["exp"] = json!(now - 120);
    expect_error("expired JWT", post_with(s, &issuer.mint(&expired), &[], body), 401, errors);
    let mut foreign = claims.clone();
    foreign["aud"] = json!(cn.mint("JWT audience"));
    expect_error("JWT for another audience", post_with(s, &issuer.mint(&foreign), &[], body), 401, errors);
    // Break-glass: an on-call doctor without inference breaks glass with a reason.
    let reason = format!("code blue, {}", cn.mint_audit_only("break-glass reason"));
    let mut oncall = claims.clone();
    oncall["sub"] = json!("doc-3");
    oncall["roles"] = json!(["oncall"]);
    let doc = issuer.mint(&oncall);
    let r = post_with(s, &doc, &[format!("Salus-Break-Glass: {reason}")], body);
    assert_eq!(r.status, 200, "break-glass serves: {}", r.text());
    // Refused reasons: from a principal without break_glass, and one too long.
    let key = s.key.clone();
    let refused = format!("please let me in {}", cn.mint("refused break-glass reason"));
    expect_error(
        "break-glass without permission",
        post_with(s, &key, &[format!("Salus-Break-Glass: {refused}")], body),
        403,
        errors,
    );
    let long = format!("{} {}", cn.mint("overlong break-glass reason"), "x".repeat(600));
    expect_error(
        "overlong break-glass reason",
        post_with(s, &doc, &[format!("Salus-Break-Glass: {long}")], body),
        400,
        errors,
    );
}

/// Reviews and auditor reads: an edited text (only its HMAC may be kept), a
/// refused reason code, a made-up response id, query parameters.
pub fn inject_reviews(s: &mut Server, cn: &mut Canaries, body: &serde_json::Value, errors: &mut Vec<(String, Resp)>) {
    let key = s.key.clone();
    let r = post_with(s, &key, &[], body);
    assert_eq!(r.status, 200, "{}", r.text());
    let id = serde_json::from_slice::<serde_json::Value>(&r.body).unwrap()["id"].as_str().unwrap().to_string();
    let post_review = |s: &mut Server, review: serde_json::Value| {
        s.post_raw("/v1/reviews", Some(&key), &[], review.to_string().as_bytes())
    };
    let edited = format!("Reviewed note for {}", cn.mint("review edited_text"));
    let r = post_review(s, json!({"response_id": id, "action": "edited", "edited_text": edited}));
    assert_eq!(r.status, 200, "a review is recorded: {}", r.text());
    let r =
        post_review(s, json!({"response_id": id, "action": "rejected", "reason_code": cn.mint("review reason_code")}));
    expect_error("review reason_code", r, 400, errors);
    let r = post_review(
        s,
        json!({"response_id": format!("chatcmpl-{}", cn.mint("review response_id")), "action": "accepted"}),
    );
    expect_error("review response_id", r, 404, errors);
    let r = post_review(s, json!({"response_id": id, "action": cn.mint("review action")}));
    expect_error("review action", r, 400, errors);
    let r = s.get(&format!("/v1/reviews/pending?since={}", cn.mint("pending since")), Some(&key), &[]);
    expect_error("pending since", r, 400, errors);
    let r = s.get(&format!("/v1/audit/events?kind={}", cn.mint("audit events kind")), Some(&key), &[]);
    expect_error("audit events kind", r, 400, errors);
    // A filter value the server keeps only inside its (encrypted) audit.accessed record.
    let who = cn.mint_audit_only("audit events principal filter");
    let r = s.get(&format!("/v1/audit/events?principal={who}&limit=5"), Some(&key), &[]);
    assert_eq!(r.status, 200, "{}", r.text());
}
