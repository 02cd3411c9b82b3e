//! Backups of the audit trail and what belongs with it (`salus backup`):
//! incremental, encrypted, authenticated, to a directory or to S3-compatible
//! storage (with Object Lock), restorable into a trail that `salus audit
//! verify` accepts and a server continues.
//!
//! # What a backup holds
//!
//! The trail's segment files (sealed ones, which never change, and the open
//! `.log` as a point-in-time copy cut at its last whole record — a later
//! backup supersedes that copy, so the newest records are in the newest
//! backup), `checkpoint.json`, `keys.recorded` (the key-store baseline), and
//! optionally the API key store (key hashes only, as stored) and the config
//! file (which names key sources and never holds a key). Not in a backup:
//! the audit master key, key-encryption keys and the backup key itself —
//! they belong to the KMS; without the audit key a restored trail cannot be
//! read, and without the backup key a backup cannot be decrypted.
//!
//! # Destination layout (every name written once, never replaced)
//!
//! * `manifests/<number:010>.json` — one per backup, numbered 1, 2, 3…
//! * `objects/<xx>/<sha256>` — one encrypted object per distinct file
//!   content, named by the SHA-256 of the plaintext (`xx` = its first two hex
//!   digits). A backup uploads only the objects the destination lacks:
//!   incremental by content hash. A `.log` an earlier backup copied shorter
//!   is that copy's objects plus one object with the bytes appended since.
//!
//! # Object format (`SALBAKO1`, version 1; integers little-endian)
//!
//! ```text
//! 0   .. 8    magic "SALBAKO1"
//! 8   .. 10   version u16 = 1, then u16 0
//! 12  .. 28   data key id (16 ASCII hex: SecretKey::key_id of the data key)
//! 28  .. 44   backup key id (16 ASCII hex) of the wrap below
//! 44  .. 56   wrap nonce
//! 56  .. 104  wrapped data key: AES-256-GCM(wrapping key, data key) ‖ tag,
//!             AAD "salus-backup/v1 key-wrap" ‖ data key id ‖ backup key id
//! 104 .. 116  nonce
//! 116 .. 124  plaintext length u64
//! 124 ..      AES-256-GCM(data key, plaintext) ‖ 16-byte tag, AAD = bytes 0..124
//! ```
//!
//! The wrapping key is `backup key.derive("salus-backup-wrap/v1")` (as sealed
//! weights derive theirs from a KEK). Each `create` run draws one random data
//! key; every object it writes carries that key wrapped (so an interrupted
//! run's objects are readable and reused by the next run). The manifest
//! lists the wraps of every data key its objects use, under the current
//! backup key: after a rotation the next backup rewraps them
//! (`--previous-backup-key`), objects are never rewritten.
//!
//! # Manifest
//!
//! JSON `{"manifest": {…}, "signature": "<hex>"}`: every file (name, kind,
//! size, SHA-256, for a segment its index, seq range and the chain hashes
//! before its first and of its last record) with the objects that make it up
//! (name, SHA-256 of the stored object and of its plaintext, sizes, data key
//! id), the trail position (first
//! and last seq, chain head, segments, checkpoint), the previous manifest's
//! SHA-256 (a hash chain of backups), the audit key id and the trail's
//! checkpoint public key. The signature is Ed25519 with the trail's
//! checkpoint key over `"salus-backup-manifest/v1\n"` ‖ the compact JSON of
//! `manifest`: only the holder of the audit key makes manifests, and anyone
//! with the public key (which every checkpoint carries) checks them.
//!
//! # Rollback
//!
//! `create` records the newest backup it wrote to a destination in the audit
//! directory (`backup-head-<id>.json`); `create` and `verify --audit-dir`
//! fail when the destination is behind it (newest manifests deleted) or
//! holds another manifest under that number. On S3, Object Lock in
//! compliance mode keeps any version from being deleted within retention.
//!
//! # Continuous shipping
//!
//! [`Shipper`] (`[audit.ship]` in the server) makes these backups while the
//! server runs: one each time a segment is sealed or (at most every
//! `min_interval`) a checkpoint written, so the destination is an ordinary
//! backup destination that follows the trail (see `ship.rs`).

mod anchor;
mod checkpoints;
mod create;
mod crypto;
mod error;
mod manifest;
mod restore;
mod s3;
mod ship;
mod target;
mod verify;

#[cfg(test)]
mod tests;

use std::sync::Arc;

pub use anchor::{anchor_path, Anchor};
pub use checkpoints::export_checkpoints;
pub use create::{create, CreateOptions, CreateReport};
pub use crypto::WrappedKey;
pub use error::{BackupError, Problem};
pub use manifest::{
    manifest_name, object_name, parse_manifest_name, Manifest, ObjectEntry, ObjectKind, SignedManifest, TrailPosition,
    MANIFEST_FORMAT,
};
pub use restore::{restore, RestoreOptions, RestoreReport};
pub use ship::{ShipMonitor, ShipSettings, ShipStatus, Shipper};
pub use target::{ObjectLock, PutOutcome, Target, TargetOptions};
pub use verify::{verify, VerifyOptions, VerifyReport};

/// Progress of a long operation (the CLI draws bars; the server logs).
pub trait Progress: Send + Sync {
    /// A phase starts, over about `total_bytes`.
    fn begin(&self, _what: &str, _total_bytes: u64) {}
    /// `bytes` more are done.
    fn advance(&self, _bytes: u64) {}
    /// The phase is over.
    fn end(&self) {}
}

/// No progress reporting.
pub struct NoProgress;
impl Progress for NoProgress {}

/// One manifest file as read.
pub(crate) struct Loaded {
    pub number: u64,
    pub bytes: Vec<u8>,
    pub parsed: Result<SignedManifest, Problem>,
}

/// The manifest numbers in a destination, ascending, and names under
/// `manifests/` that are not manifest names.
pub(crate) async fn manifest_numbers(target: &Target) -> Result<(Vec<u64>, Vec<String>), BackupError> {
    let mut numbers = Vec::new();
    let mut stray = Vec::new();
    for (name, _) in target.list("manifests/").await? {
        match parse_manifest_name(&name) {
            Some(n) => numbers.push(n),
            None => stray.push(name),
        }
    }
    numbers.sort_unstable();
    Ok((numbers, stray))
}

pub(crate) async fn load_manifest(target: &Target, number: u64) -> Result<Option<Loaded>, BackupError> {
    let name = manifest_name(number);
    let Some(bytes) = target.get(&name).await? else {
        return Ok(None);
    };
    let parsed = SignedManifest::parse(&name, &bytes).map_err(|e| match e {
        BackupError::Verification(mut p) if !p.is_empty() => p.remove(0),
        other => Problem::new(&name, other.to_string()),
    });
    Ok(Some(Loaded { number, bytes, parsed }))
}

pub(crate) fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .expect("formatting the current UTC time")
}

/// One line of `salus backup list`.
#[derive(Clone, Debug)]
pub struct BackupSummary {
    pub number: u64,
    /// `Err`: the manifest does not parse or its signature fails.
    pub manifest: Result<Manifest, Problem>,
    /// Objects (and their bytes) this backup added over the one before it.
    pub new_objects: usize,
    pub new_bytes: u64,
}

/// Every backup in `target`, oldest first. Needs no key: manifests are
/// signed, not encrypted (they hold names, sizes, hashes and seqs, no
/// record contents).
pub async fn list(target: &Target) -> Result<Vec<BackupSummary>, BackupError> {
    let (numbers, _) = manifest_numbers(target).await?;
    let mut out = Vec::with_capacity(numbers.len());
    let mut seen = std::collections::HashSet::new();
    let mut fetched = futures::StreamExt::buffered(
        futures::stream::iter(numbers.into_iter().map(|n| async move { (n, load_manifest(target, n).await) })),
        8,
    );
    while let Some((n, l)) = futures::StreamExt::next(&mut fetched).await {
        let Some(l) = l? else { continue };
        let manifest = l.parsed.map(|s| s.manifest);
        let (mut new_objects, mut new_bytes) = (0, 0);
        if let Ok(m) = &manifest {
            for p in m.objects.iter().flat_map(|o| o.parts.iter()) {
                if seen.insert(p.object.clone()) {
                    new_objects += 1;
                    new_bytes += p.stored_size;
                }
            }
        }
        out.push(BackupSummary { number: n, manifest, new_objects, new_bytes });
    }
    Ok(out)
}

/// Reads a key for `what` ("backup key").
pub fn load_key(
    what: &'static str,
    source: &salus_sensitive::KeySource,
) -> Result<salus_sensitive::SecretKey, BackupError> {
    source.load().map_err(|e| BackupError::Key { what, source: e })
}

/// Shared handle type for a destination.
pub type SharedTarget = Arc<Target>;
