//! Signed checkpoints: an Ed25519 signature over (segment count, record count,
//! chain head, time). Kept in the audit directory and, optionally, in a second
//! directory the writer cannot rewrite, so deleting or rolling back the tail of
//! the trail is detectable by `verify`. The public key is embedded; `verify`
//! also checks it is the one derived from the audit key.

use std::io::Write;
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signature, Signer, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};

use super::format::{sync_dir, AuditKeys};

pub(crate) const CHECKPOINT_FILE: &str = "checkpoint.json";

/// A signed statement of the trail's extent at a moment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub version: u16,
    /// Segments so far (the open segment's index).
    pub segments: u64,
    /// Records so far (= seq of the last record).
    pub records: u64,
    /// Hex leaf hash of record `records`: the head of the hash chain.
    pub chain_head: String,
    /// RFC 3339 UTC.
    pub time: String,
    /// Hex Ed25519 public key.
    pub public_key: String,
    /// Hex Ed25519 signature over [`Checkpoint::signed_bytes`].
    pub signature: String,
}

impl Checkpoint {
    pub(crate) fn new(keys: &AuditKeys, segments: u64, records: u64, chain_head: &[u8; 32], time: String) -> Self {
        let mut c = Checkpoint {
            version: 1,
            segments,
            records,
            chain_head: hex::encode(chain_head),
            time,
            public_key: hex::encode(keys.signing_key().verifying_key().as_bytes()),
            signature: String::new(),
        };
        c.signature = hex::encode(keys.signing_key().sign(&c.signed_bytes()).to_bytes());
        c
    }

    /// The exact bytes signed.
    pub fn signed_bytes(&self) -> Vec<u8> {
        format!(
            "salus-audit-checkpoint/v{}\nsegments={}\nrecords={}\nchain_head={}\ntime={}\npublic_key={}\n",
            self.version, self.segments, self.records, self.chain_head, self.time, self.public_key
        )
        .into_bytes()
    }

    /// Checks the signature against the embedded public key.
    pub fn verify_signature(&self) -> Result<(), String> {
        let pk: [u8; 32] = hex::decode(&self.public_key)
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or("public key is not 32 bytes of hex")?;
        let sig: [u8; 64] = hex::decode(&self.signature)
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or("signature is not 64 bytes of hex")?;
        let vk = VerifyingKey::from_bytes(&pk).map_err(|_| "invalid public key")?;
        vk.verify(&self.signed_bytes(), &Signature::from_bytes(&sig)).map_err(|_| "bad signature".to_string())
    }

    pub(crate) fn read(path: &Path) -> Result<Checkpoint, String> {
        let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
        serde_json::from_slice(&bytes).map_err(|e| format!("not a checkpoint: {e}"))
    }

    /// Replaces `dir/checkpoint.json` atomically (write, fsync, rename, fsync dir).
    pub(crate) fn write_latest(&self, dir: &Path) -> std::io::Result<()> {
        let tmp = dir.join("checkpoint.json.tmp");
        write_synced(&tmp, &serde_json::to_vec(self).expect("serializable"), false)?;
        std::fs::rename(&tmp, dir.join(CHECKPOINT_FILE))?;
        sync_dir(dir)
    }

    /// Adds `dir/checkpoint-<records>.json`, never overwriting (WORM friendly).
    pub(crate) fn write_numbered(&self, dir: &Path) -> std::io::Result<()> {
        let path = dir.join(format!("checkpoint-{:020}.json", self.records));
        if let Err(e) = write_synced(&path, &serde_json::to_vec(self).expect("serializable"), true) {
            if e.kind() != std::io::ErrorKind::AlreadyExists {
                return Err(e);
            }
        }
        sync_dir(dir)
    }
}

/// Writes a checkpoint file, mode 0600 like every file of the trail.
fn write_synced(path: &Path, bytes: &[u8], create_new: bool) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).mode(0o600);
    if create_new {
        opts.create_new(true);
    } else {
        opts.create(true).truncate(true);
    }
    let mut f = opts.open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// The newest `checkpoint-*.json` in a directory (by record count).
pub(crate) fn latest_numbered(dir: &Path) -> std::io::Result<Option<PathBuf>> {
    let mut best: Option<(u64, PathBuf)> = None;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(n) = name
            .to_str()
            .and_then(|s| s.strip_prefix("checkpoint-"))
            .and_then(|s| s.strip_suffix(".json"))
            .and_then(|s| s.parse::<u64>().ok())
        else {
            continue;
        };
        if best.as_ref().is_none_or(|(b, _)| n > *b) {
            best = Some((n, entry.path()));
        }
    }
    Ok(best.map(|(_, p)| p))
}
