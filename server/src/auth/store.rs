//! The API key store: a JSON file of key *hashes* and the principals they map to.
//!
//! Keys are 256 random bits, shown once at creation as `sk-salus-<64 hex>`. The
//! store keeps SHA-256 of the key (enough for uniformly random 256-bit secrets:
//! no dictionary to guess from, so no slow hash is needed), the principal, its
//! kind and roles, and optional expiry/revocation times. Writes go to a temporary
//! file in the same directory, are fsynced, then renamed over the store (and the
//! directory fsynced), so a crash leaves either the old or the new store.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
pub use time::OffsetDateTime;
use zeroize::Zeroizing;

/// The prefix of every Salus API key.
pub const KEY_PREFIX: &str = "sk-salus-";

/// Errors of the key store. Messages never contain key material.
#[derive(Debug, thiserror::Error)]
pub enum KeyStoreError {
    /// The store cannot be read or written.
    #[error("key store {path}: {reason}")]
    Io { path: String, reason: String },
    /// The store file is not a valid key store.
    #[error("key store {path} is corrupt: {reason}")]
    Corrupt { path: String, reason: String },
    /// A command-line argument is invalid.
    #[error("{0}")]
    Invalid(String),
    /// No key or principal has this id.
    #[error("no key or principal with id '{0}'")]
    NotFound(String),
    /// Other users could write the store (and so add a key).
    #[error("key store: {0}")]
    Insecure(#[from] salus_sensitive::file_mode::FileModeError),
}

/// Human user or service account.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PrincipalKind {
    Human,
    Service,
}

impl PrincipalKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PrincipalKind::Human => "human",
            PrincipalKind::Service => "service",
        }
    }
    pub fn parse(s: &str) -> Result<Self, KeyStoreError> {
        match s {
            "human" => Ok(PrincipalKind::Human),
            "service" => Ok(PrincipalKind::Service),
            _ => Err(KeyStoreError::Invalid("kind must be 'human' or 'service'".into())),
        }
    }
}

/// What a principal may do. A key lists its permissions as its `roles`
/// (the key store's and the CLI's name for them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Permission {
    /// Run generations (`/v1/chat/completions`, `/v1/completions`, `/v1/models`).
    #[serde(rename = "inference")]
    Inference,
    /// Administrative actions.
    #[serde(rename = "admin")]
    Admin,
    /// Read the audit trail (`audit.read`; `auditor` is accepted as its old name).
    #[serde(rename = "audit.read", alias = "auditor")]
    Auditor,
    /// Scrape `/metrics`.
    #[serde(rename = "metrics")]
    Metrics,
    /// Attest human reviews of outputs.
    #[serde(rename = "review")]
    Review,
    /// Override a policy rule in an emergency (`Salus-Break-Glass`).
    #[serde(rename = "break_glass")]
    BreakGlass,
}

impl Permission {
    pub const ALL: [Permission; 6] = [
        Permission::Inference,
        Permission::Admin,
        Permission::Auditor,
        Permission::Metrics,
        Permission::Review,
        Permission::BreakGlass,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Permission::Inference => "inference",
            Permission::Admin => "admin",
            Permission::Auditor => "audit.read",
            Permission::Metrics => "metrics",
            Permission::Review => "review",
            Permission::BreakGlass => "break_glass",
        }
    }
    pub fn parse(s: &str) -> Result<Self, KeyStoreError> {
        if s == "auditor" {
            return Ok(Permission::Auditor);
        }
        Permission::ALL.into_iter().find(|p| p.as_str() == s).ok_or_else(|| {
            KeyStoreError::Invalid(
                "role must be one of inference, admin, audit.read, metrics, review, break_glass".into(),
            )
        })
    }
}

/// One stored key (no key material, only its hash).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRecord {
    /// Public id of the key (`key_` + 16 hex), used to revoke it.
    pub id: String,
    pub principal: String,
    pub kind: PrincipalKind,
    pub roles: Vec<Permission>,
    /// SHA-256 of the full key string, hex.
    pub hash: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created: OffsetDateTime,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub expires: Option<OffsetDateTime>,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub revoked: Option<OffsetDateTime>,
    /// The principal's own limits (unset ones: `[auth.limits]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<crate::auth::policy::LimitSpec>,
}

impl KeyRecord {
    /// Usable at `now`: not revoked, not expired.
    pub fn is_active(&self, now: OffsetDateTime) -> bool {
        self.revoked.is_none() && self.expires.is_none_or(|e| now < e)
    }
}

/// The on-disk store.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyStore {
    pub version: u32,
    pub keys: Vec<KeyRecord>,
}

/// A key just created: the only time its secret exists outside the client.
pub struct NewKey {
    pub record: KeyRecord,
    /// The full key (`sk-salus-…`). Zeroized on drop.
    pub secret: Zeroizing<String>,
}

/// Hashes a presented key for lookup.
pub fn hash_key(key: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(key.as_bytes());
    h.finalize().into()
}

impl KeyStore {
    /// Reads the store; a missing file is an empty store.
    pub fn load(path: &Path) -> Result<KeyStore, KeyStoreError> {
        salus_sensitive::file_mode::check_not_writable_by_others(path)?;
        let shown = path.display().to_string();
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(KeyStore { version: 1, keys: Vec::new() }),
            Err(e) => return Err(KeyStoreError::Io { path: shown, reason: e.to_string() }),
        };
        let store: KeyStore = serde_json::from_slice(&bytes).map_err(|e| KeyStoreError::Corrupt {
            path: shown.clone(),
            reason: format!("line {} column {}", e.line(), e.column()),
        })?;
        if store.version != 1 {
            return Err(KeyStoreError::Corrupt {
                path: shown,
                reason: format!("unsupported version {}", store.version),
            });
        }
        for k in &store.keys {
            if k.hash.len() != 64 || hex::decode(&k.hash).is_err() {
                return Err(KeyStoreError::Corrupt {
                    path: shown,
                    reason: format!("key {} has a malformed hash", k.id),
                });
            }
            if let Some(Err(reason)) = k.limits.as_ref().map(|l| l.validate()) {
                return Err(KeyStoreError::Corrupt { path: shown, reason: format!("key {}: {reason}", k.id) });
            }
        }
        Ok(store)
    }

    /// Writes the store atomically (temp file + fsync + rename + directory fsync), mode 0600.
    pub fn save(&self, path: &Path) -> Result<(), KeyStoreError> {
        let io = |e: std::io::Error| KeyStoreError::Io { path: path.display().to_string(), reason: e.to_string() };
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&dir).map_err(io)?;
        let json = serde_json::to_vec_pretty(self).expect("key store serializes");
        let mut tmp = tempfile::Builder::new().prefix(".api-keys.").suffix(".tmp").tempfile_in(&dir).map_err(io)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            tmp.as_file().set_permissions(std::fs::Permissions::from_mode(0o600)).map_err(io)?;
        }
        tmp.write_all(&json).map_err(io)?;
        tmp.write_all(b"\n").map_err(io)?;
        tmp.as_file().sync_all().map_err(io)?;
        tmp.persist(path).map_err(|e| io(e.error))?;
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// Creates a key for `principal` and adds its record. The caller saves the store.
    pub fn create(
        &mut self,
        principal: &str,
        kind: PrincipalKind,
        roles: &[Permission],
        expires: Option<OffsetDateTime>,
        now: OffsetDateTime,
    ) -> Result<NewKey, KeyStoreError> {
        if !valid_principal_id(principal) {
            return Err(KeyStoreError::Invalid("principal id must be 1-64 characters from A-Z a-z 0-9 . _ - @".into()));
        }
        if roles.is_empty() {
            return Err(KeyStoreError::Invalid("give at least one --role".into()));
        }
        if expires.is_some_and(|e| e <= now) {
            return Err(KeyStoreError::Invalid("expiry is in the past".into()));
        }
        let mut raw = Zeroizing::new([0u8; 32]);
        rand::Rng::fill(&mut rand::rng(), &mut raw[..]);
        let secret = Zeroizing::new(format!("{KEY_PREFIX}{}", hex::encode(&raw[..])));
        let mut id_bytes = [0u8; 8];
        rand::Rng::fill(&mut rand::rng(), &mut id_bytes[..]);
        let mut roles = roles.to_vec();
        roles.sort();
        roles.dedup();
        let record = KeyRecord {
            id: format!("key_{}", hex::encode(id_bytes)),
            principal: principal.to_string(),
            kind,
            roles,
            hash: hex::encode(hash_key(&secret)),
            created: now,
            expires,
            revoked: None,
            limits: None,
        };
        self.version = 1;
        self.keys.push(record.clone());
        Ok(NewKey { record, secret })
    }

    /// Sets the limits of the key with this id (empty: the defaults).
    pub fn set_limits(&mut self, id: &str, limits: crate::auth::policy::LimitSpec) -> Result<(), KeyStoreError> {
        limits.validate().map_err(KeyStoreError::Invalid)?;
        let key = self.keys.iter_mut().find(|k| k.id == id).ok_or_else(|| KeyStoreError::NotFound(id.to_string()))?;
        key.limits = (!limits.is_empty()).then_some(limits);
        Ok(())
    }

    /// Revokes the key with this id, or every active key of the principal with this id.
    /// Returns the ids of the keys revoked now.
    pub fn revoke(&mut self, id: &str, now: OffsetDateTime) -> Result<Vec<String>, KeyStoreError> {
        let by_key = self.keys.iter().any(|k| k.id == id);
        let mut revoked = Vec::new();
        let mut found = false;
        for k in &mut self.keys {
            let hit = if by_key { k.id == id } else { k.principal == id };
            if hit {
                found = true;
                if k.revoked.is_none() {
                    k.revoked = Some(now);
                    revoked.push(k.id.clone());
                }
            }
        }
        if !found {
            return Err(KeyStoreError::NotFound(id.chars().take(64).collect()));
        }
        Ok(revoked)
    }

    /// Finds the record of a presented key. Every stored hash is compared in
    /// constant time (no early exit), so timing reveals nothing about which
    /// prefix matched. Returns the record even if revoked or expired; the caller
    /// checks [`KeyRecord::is_active`].
    pub fn lookup(&self, presented: &str) -> Option<&KeyRecord> {
        let digest = hash_key(presented);
        let mut found = None;
        for k in &self.keys {
            let mut stored = [0u8; 32];
            if hex::decode_to_slice(&k.hash, &mut stored).is_err() {
                continue;
            }
            if bool::from(stored.ct_eq(&digest)) {
                found = Some(k);
            }
        }
        found
    }
}

/// RFC 3339 text of a time (for listings).
pub fn format_time(t: OffsetDateTime) -> String {
    let t = t.replace_nanosecond(0).unwrap_or(t);
    t.format(&time::format_description::well_known::Rfc3339).unwrap_or_else(|_| t.unix_timestamp().to_string())
}

/// Principal ids appear in logs and the audit trail: a fixed, harmless alphabet.
pub fn valid_principal_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@'))
}

/// Parses an expiry: a duration from now (`90d`, `12h`, `30m`) or an RFC 3339 time.
pub fn parse_expiry(s: &str, now: OffsetDateTime) -> Result<OffsetDateTime, KeyStoreError> {
    let bad = || KeyStoreError::Invalid("expiry must look like 90d, 12h, 30m or an RFC 3339 time".into());
    if let Ok(t) = OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339) {
        return Ok(t);
    }
    let (num, unit) = s.split_at(s.len().saturating_sub(1));
    let n: i64 = num.parse().map_err(|_| bad())?;
    if n <= 0 || n > 36_500 * 24 * 60 {
        return Err(bad());
    }
    let d = match unit {
        "d" => time::Duration::days(n),
        "h" => time::Duration::hours(n),
        "m" => time::Duration::minutes(n),
        _ => return Err(bad()),
    };
    Ok(now + d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap()
    }

    #[test]
    fn create_lookup_revoke_roundtrip_through_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/keys.json");
        let mut s = KeyStore::load(&path).unwrap();
        let k = s
            .create("alice", PrincipalKind::Human, &[Permission::Inference, Permission::Inference], None, now())
            .unwrap();
        assert!(k.secret.starts_with(KEY_PREFIX) && k.secret.len() == KEY_PREFIX.len() + 64);
        assert_eq!(k.record.roles, vec![Permission::Inference]);
        s.save(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains(&k.secret[KEY_PREFIX.len()..]), "the store must not hold the key");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
        let mut s2 = KeyStore::load(&path).unwrap();
        assert_eq!(s2, s);
        assert_eq!(s2.lookup(&k.secret).unwrap().principal, "alice");
        assert!(s2.lookup("sk-salus-00").is_none());
        assert_eq!(s2.revoke("alice", now()).unwrap(), vec![k.record.id.clone()]);
        assert!(!s2.lookup(&k.secret).unwrap().is_active(now()));
        assert!(matches!(s2.revoke("bob", now()), Err(KeyStoreError::NotFound(_))));
        // no temp files left behind
        assert_eq!(std::fs::read_dir(dir.path().join("sub")).unwrap().count(), 1);
    }

    #[test]
    fn expiry_and_validation() {
        let t = parse_expiry("90d", now()).unwrap();
        assert_eq!(t - now(), time::Duration::days(90));
        assert!(parse_expiry("90x", now()).is_err());
        assert!(parse_expiry("-1d", now()).is_err());
        assert!(parse_expiry("2030-01-01T00:00:00Z", now()).is_ok());
        let mut s = KeyStore::default();
        let k = s
            .create(
                "svc-1",
                PrincipalKind::Service,
                &[Permission::Metrics],
                Some(now() + time::Duration::hours(1)),
                now(),
            )
            .unwrap();
        assert!(k.record.is_active(now()));
        assert!(!k.record.is_active(now() + time::Duration::hours(2)));
        assert!(s.create("bad id", PrincipalKind::Human, &[Permission::Inference], None, now()).is_err());
        assert!(s.create("x", PrincipalKind::Human, &[], None, now()).is_err());
        assert!(s.create("x", PrincipalKind::Human, &[Permission::Admin], Some(now()), now()).is_err());
    }

    #[test]
    fn corrupt_store_is_an_error_not_empty() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.json");
        std::fs::write(&p, b"{not json").unwrap();
        assert!(matches!(KeyStore::load(&p), Err(KeyStoreError::Corrupt { .. })));
    }
}
