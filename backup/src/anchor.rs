//! The local record of the newest backup this host wrote to a destination
//! (`<audit dir>/backup-head-<id>.json`): the external anchor that catches a
//! destination rolled back to an older manifest (newest manifests deleted, or
//! a manifest replaced). S3 Object Lock prevents that on the bucket; this
//! catches it on a plain directory too.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::crypto::sha256_hex;
use crate::error::BackupError;
use crate::target::sync_dir;

pub const ANCHOR_FORMAT: &str = "salus-backup-head/v1";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Anchor {
    pub format: String,
    /// The destination, as `salus backup` names it (no credentials).
    pub destination: String,
    /// The newest manifest this host wrote (or restored from) there.
    pub number: u64,
    /// Hex SHA-256 of that manifest file.
    pub sha256: String,
    pub created: String,
    pub last_seq: u64,
}

/// `backup-head-<16 hex digits of SHA-256(destination)>.json`.
pub fn anchor_path(audit_dir: &Path, destination: &str) -> PathBuf {
    audit_dir.join(format!("backup-head-{}.json", &sha256_hex(destination.as_bytes())[..16]))
}

/// The anchor for `destination`, if this host keeps one.
pub fn read_anchor(audit_dir: &Path, destination: &str) -> Result<Option<Anchor>, BackupError> {
    let path = anchor_path(audit_dir, destination);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(BackupError::io(format!("reading {}", path.display()), e)),
    };
    let a: Anchor = serde_json::from_slice(&bytes)
        .map_err(|e| BackupError::verification(path.display().to_string(), format!("not a backup record: {e}")))?;
    if a.format != ANCHOR_FORMAT || a.destination != destination {
        return Err(BackupError::verification(path.display().to_string(), "not the backup record of this destination"));
    }
    Ok(Some(a))
}

/// Replaces the anchor atomically (temporary file, fsync, rename, fsync dir).
pub fn write_anchor(audit_dir: &Path, a: &Anchor) -> Result<(), BackupError> {
    let path = anchor_path(audit_dir, &a.destination);
    let tmp = path.with_extension("json.tmp");
    let io = |e| BackupError::io(format!("writing {}", path.display()), e);
    let mut f =
        std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp).map_err(io)?;
    f.write_all(&serde_json::to_vec_pretty(a).expect("serializable")).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, &path).map_err(io)?;
    sync_dir(audit_dir).map_err(io)
}
