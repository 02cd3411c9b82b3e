//! Backup manifests: what one backup holds, signed with the trail's
//! checkpoint key, chained to the previous backup by its SHA-256.

use serde::{Deserialize, Serialize};

use crate::crypto::{sha256_hex, WrappedKey};
use crate::error::BackupError;

pub const MANIFEST_FORMAT: &str = "salus-backup-manifest/v1";

/// What a stored object is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ObjectKind {
    /// A sealed segment (`seg-N.sealed`): immutable, shared by every later backup.
    SealedSegment,
    /// A `.log` segment: the open one as a point-in-time copy cut at its last
    /// whole record (later backups supersede it), or a full one not yet sealed.
    LogSegment,
    /// `checkpoint.json`, the trail's latest signed checkpoint.
    Checkpoint,
    /// `keys.recorded`, the key-store baseline of the trail.
    KeyBaseline,
    /// The API key store (`[auth] api_keys`: key hashes only, as stored).
    KeyStore,
    /// The server's config file (it names key sources, never holds keys).
    Config,
}

impl ObjectKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ObjectKind::SealedSegment => "sealed_segment",
            ObjectKind::LogSegment => "log_segment",
            ObjectKind::Checkpoint => "checkpoint",
            ObjectKind::KeyBaseline => "key_baseline",
            ObjectKind::KeyStore => "key_store",
            ObjectKind::Config => "config",
        }
    }

    /// Files of the audit directory (restored into `--to`); the others are
    /// restored into `--files-to`.
    pub fn is_trail(self) -> bool {
        !matches!(self, ObjectKind::KeyStore | ObjectKind::Config)
    }

    pub fn is_segment(self) -> bool {
        matches!(self, ObjectKind::SealedSegment | ObjectKind::LogSegment)
    }
}

/// One stored object: part of a file's bytes, encrypted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Part {
    /// Its name in the destination: `objects/<first two hex digits>/<plain_sha256>`.
    pub object: String,
    /// Hex SHA-256 of the stored (encrypted) object.
    pub sha256: String,
    /// Hex SHA-256 of its plaintext.
    pub plain_sha256: String,
    /// Plaintext length.
    pub size: u64,
    /// Stored length.
    pub stored_size: u64,
    /// The id of the data key that encrypts it (its wrap is in `keys`).
    pub key: String,
}

/// One file of the backup.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObjectEntry {
    /// The file name it restores to (`seg-0000000000000003.sealed`,
    /// `checkpoint.json`, `keys.recorded`, `api-keys.json`, `salus.toml`).
    pub path: String,
    pub kind: ObjectKind,
    /// The file's length in bytes.
    pub size: u64,
    /// Hex SHA-256 of the file's bytes.
    pub plain_sha256: String,
    /// The objects whose plaintexts, concatenated, are the file: one, except
    /// for a `.log` that an earlier backup copied shorter — its parts are
    /// that copy's parts and one object with the bytes appended since.
    pub parts: Vec<Part>,
    /// Segments: the index, the seqs of the first and last record, the chain
    /// hash before the first and of the last (hex). An empty `.log` has
    /// `last_seq = first_seq - 1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub segment: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_seq: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seq: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev_hash: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_hash: Option<String>,
    /// A checkpoint: the records it covers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub records: Option<u64>,
}

impl ObjectEntry {
    pub fn stored_size(&self) -> u64 {
        self.parts.iter().map(|p| p.stored_size).sum()
    }
}

/// The trail position a backup covers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrailPosition {
    /// Seq of the first record held (later than 1 after retention purges).
    pub first_seq: u64,
    /// Seq of the last record held.
    pub last_seq: u64,
    /// Hex chain hash of record `last_seq`.
    pub chain_head: String,
    pub first_segment: u64,
    pub last_segment: u64,
    /// Records covered by the checkpoint in the backup.
    pub checkpoint_records: u64,
}

/// The signed body of a manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    /// 1, 2, 3… within one destination; the file is `manifests/<number:010>.json`.
    pub number: u64,
    /// A random id (UUID v4).
    pub id: String,
    /// RFC 3339 UTC.
    pub created: String,
    /// The host that made it.
    pub instance: String,
    pub salus_version: String,
    /// Hex SHA-256 of manifest `number - 1`'s file (`None` for the first).
    pub previous: Option<String>,
    /// The audit master key's public id.
    pub audit_key_id: String,
    /// Hex Ed25519 public key of the trail's checkpoints; signs this manifest.
    pub public_key: String,
    pub trail: TrailPosition,
    /// Wraps of every data key the objects use, under the backup key.
    pub keys: Vec<WrappedKey>,
    pub objects: Vec<ObjectEntry>,
}

/// A manifest file: the body and its signature.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedManifest {
    pub manifest: Manifest,
    /// Hex Ed25519 signature over `BACKUP_MANIFEST_CONTEXT ‖ compact JSON of manifest`.
    pub signature: String,
}

/// The name of manifest `number` in a destination.
pub fn manifest_name(number: u64) -> String {
    format!("manifests/{number:010}.json")
}

/// The number in a manifest name (`manifests/0000000003.json` → 3).
pub fn parse_manifest_name(name: &str) -> Option<u64> {
    let n = name.strip_prefix("manifests/")?.strip_suffix(".json")?;
    (n.len() == 10 && n.bytes().all(|b| b.is_ascii_digit())).then(|| n.parse().ok()).flatten()
}

/// The name of the object holding a file with this plaintext SHA-256.
pub fn object_name(plain_sha256: &str) -> String {
    format!("objects/{}/{plain_sha256}", &plain_sha256[..2])
}

impl Manifest {
    /// The exact bytes signed (after the context string).
    pub fn body_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a manifest serializes")
    }

    pub fn sign(self, keys: &salus_audit::AuditKeys) -> SignedManifest {
        let sig = keys.sign_backup_manifest(&self.body_bytes());
        SignedManifest { manifest: self, signature: hex::encode(sig) }
    }

    pub fn total_size(&self) -> u64 {
        self.objects.iter().map(|o| o.size).sum()
    }
}

impl SignedManifest {
    /// The file's bytes (pretty JSON, newline-terminated).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = serde_json::to_vec_pretty(self).expect("a manifest serializes");
        b.push(b'\n');
        b
    }

    /// Parses a manifest file named `name`; checks the format, that the
    /// number matches the name, and the signature against the public key it
    /// names. (Whose key that is, is the caller's check.)
    pub fn parse(name: &str, bytes: &[u8]) -> Result<SignedManifest, BackupError> {
        let bad = |p: String| BackupError::verification(name, p);
        let m: SignedManifest =
            serde_json::from_slice(bytes).map_err(|e| bad(format!("not a backup manifest: {e}")))?;
        if m.manifest.format != MANIFEST_FORMAT {
            return Err(bad(format!("unknown manifest format '{}'", m.manifest.format)));
        }
        if parse_manifest_name(name) != Some(m.manifest.number) {
            return Err(bad(format!(
                "holds manifest #{} (replaced by another backup's manifest: rolled back?)",
                m.manifest.number
            )));
        }
        let pk: [u8; 32] = hex::decode(&m.manifest.public_key)
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| bad("public key is not 32 bytes of hex".into()))?;
        let sig: [u8; 64] = hex::decode(&m.signature)
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| bad("signature is not 64 bytes of hex".into()))?;
        salus_audit::verify_backup_manifest(&pk, &m.manifest.body_bytes(), &sig)
            .map_err(|e| bad(format!("manifest signature: {e} (modified)")))?;
        Ok(m)
    }
}

/// SHA-256 of a manifest file, as the next manifest's `previous` names it.
pub fn manifest_hash(bytes: &[u8]) -> String {
    sha256_hex(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        assert_eq!(parse_manifest_name(&manifest_name(42)), Some(42));
        assert_eq!(parse_manifest_name("manifests/42.json"), None);
        assert_eq!(parse_manifest_name("objects/ab/abc"), None);
        assert_eq!(object_name("abcdef"), "objects/ab/abcdef");
    }
}
