//! The audit trail: a tamper-evident, encrypted, append-only, fail-closed record
//! of every inference and every security-relevant action.
//!
//! HIPAA requires an audit record of every access to PHI, and for Salus every
//! inference is one. The trail is built so that
//!
//! * **nothing in it is PHI**: events carry identifiers, counts and parameters,
//!   and for the prompt and completion only `HMAC-SHA256(audit HMAC key, text)`
//!   ([`TextHmac`]). A `TextHmac` can only be made by [`AuditLog::hmac`] /
//!   [`AuditKeys::text_hmac`] from bytes wrapped in [`salus_sensitive::Phi`], so the
//!   text itself has no way into an [`AuditEvent`]. An auditor holding the key
//!   can still check whether a given text was sent (`salus audit hash`).
//! * **it is durable before anything happens**: [`AuditLog::record`] returns only
//!   after the record is written and `fdatasync`ed. Concurrent records are
//!   committed together, one `pwrite` + one `fdatasync` per batch (group
//!   commit), in a two-stage pipeline: a writer thread encodes the next batch
//!   while a commit thread waits for the disk to make the current one durable
//!   (see `writer.rs`, `sync.rs` and `docs/audit-trail.md` for measurements).
//! * **it fails closed**: a write or sync error is returned to every caller in the
//!   batch as [`AuditError`], and [`AuditLog::is_healthy`] turns false (the
//!   server's `/ready` uses it) until a write succeeds again. The server answers
//!   503 and never runs the model when `inference.started` cannot be recorded.
//! * **it is tamper-evident**: records form a hash chain across segments, sealed
//!   segments carry an RFC 6962 Merkle root, every record is authenticated
//!   encryption, and Ed25519-signed checkpoints (optionally copied to a second,
//!   write-once directory) make deletion of the tail detectable.
//!
//! # API
//!
//! ```no_run
//! # async fn demo() -> Result<(), salus_audit::AuditError> {
//! use salus_audit::*;
//! use salus_sensitive::Phi;
//! let cfg = AuditLogSettings::new("/var/lib/salus/audit", "file:/etc/salus/audit.key".parse().unwrap());
//! let log = AuditLog::open(cfg)?;                 // recovers a torn tail, writes server.started
//! let prompt = Phi::new(String::from("…"));
//! let receipt = log
//!     .record(
//!         AuditEvent::new(EventKind::InferenceStarted)
//!             .request_id("req-1")
//!             .principal(AuditPrincipal::new("alice", "api_key", ["clinician"]))
//!             .model("smollm2-135m", "sha256:…")
//!             .prompt_hmac(log.hmac(&prompt)),
//!     )
//!     .await?;                                       // durable here; now run the model
//! # let _ = receipt; log.close()?; Ok(()) }
//! ```
//!
//! [`AuditLog`] is an `Arc` handle: clone it into every request handler.
//! [`AuditLog::record_blocking`] is the same for non-async callers;
//! [`AuditLog::record_nowait`] queues without waiting. [`AuditLog::close`]
//! writes `server.stopped` and a final checkpoint. [`AuditLog::open_tool`]
//! opens a short session for a CLI tool (`salus keys` when no server holds
//! the trail). The server's key store keeps `keys.recorded` beside the trail
//! (`salus_server::auth::key_baseline`), authenticated with
//! [`AuditKeys::baseline_mac`], so that a key change made while no one was
//! recording (a server killed before it noticed) is recorded at the next start.
//! Offline readers: [`verify_trail`], [`read_trail`], [`fhir::export_bundle`].
//! [`forward::Forwarder`] streams every record's metadata to a SIEM (RFC 5424
//! over TLS, at least once, off the write path).
//!
//! # On-disk format (version 1)
//!
//! All integers little-endian. The audit directory holds:
//!
//! * `seg-NNNNNNNNNNNNNNNN.log` — an *open* segment (`N` = 16-digit segment index,
//!   from 1). Header (100 bytes): magic `SALAUDL1`, version u16 = 1, u16 0,
//!   index u64, first_seq u64, created (unix ms) i64, salt `[16]`, key id `[16]`
//!   (ASCII hex of [`SecretKey::key_id`]), then HMAC-SHA256 of those 68 bytes
//!   under the header key. Then frames, one per record:
//!   `len u32 | seq u64 | nonce [12] | AES-256-GCM ciphertext+tag (len bytes)`,
//!   AAD = `"salus-audit-record/v1" | index u64 | seq u64`. Records are at most
//!   64 KiB and the writer issues at most ~4 MiB per write + sync, so on start-up
//!   an unreadable end of the last `.log` (a frame past end of file, a bad length,
//!   or a frame failing authentication that no valid frame follows) no longer
//!   than one write is a *torn tail*: it is cut and `audit.recovered` records the
//!   offset and byte count. Anything else unreadable is damage: `open` refuses
//!   ([`AuditError::Integrity`]) and cuts nothing.
//! * `seg-NNNNNNNNNNNNNNNN.sealed` — a sealed segment. Header (192 bytes):
//!   magic `SALAUDS1`, version u16, u16 0, index u64, first_seq u64, record
//!   count u64, created ms i64, sealed ms i64, prev hash `[32]` (hash of the record
//!   before the first), last hash `[32]`, Merkle root `[32]`, salt `[16]`, key id `[16]`,
//!   nonce `[12]`; then AES-256-GCM(zstd(`len u32 | record` …)) with the header as
//!   AAD.
//! * `checkpoint.json` — the latest signed checkpoint (replaced atomically); the
//!   optional checkpoint directory receives `checkpoint-<last_seq>.json` files,
//!   never overwritten (suits a WORM mount).
//! * `LOCK` — held (`flock`) by the one process writing the trail.
//! * `keys.recorded` — the API key ids (and revocations) the trail has recorded,
//!   authenticated with an HMAC (written by the server's key store).
//! * `backup-head-<id>.json` — the newest backup `salus backup create` wrote to
//!   a destination (the anchor that catches a destination rolled back; see
//!   `salus_backup`). [`inspect_segment`] is what backups read segments with.
//!
//! A *record* is the UTF-8 JSON of an [`AuditRecord`]. Its hash is the RFC 6962
//! leaf hash `SHA-256(0x00 | record bytes)`; each record's `prev_hash` is the
//! previous record's hash (32 zero bytes before the first record ever), so the
//! chain runs across segments. Seqs start at 1 and have no gaps.
//!
//! Keys: one master key ([`KeySource`]); derived with [`SecretKey::derive`]:
//! `audit-enc` (per-segment data keys `audit-enc` → `segment/<index>/<salt>`),
//! `audit-header`, `audit-hmac` (prompt/completion HMACs), `audit-signing`
//! (Ed25519 seed for checkpoints), `audit-keys-recorded` (MAC of `keys.recorded`).
//!
//! A segment is sealed (by a background thread) when it reaches
//! `segment_max_bytes` or `segment_max_age`; the writer first starts the next
//! `.log`, so records never wait for sealing. Retention purges only sealed
//! segments whose seal time is older than `retention_days`, oldest first, and
//! records an `audit.purged` event (with the segment's last seq and hash, which
//! lets `verify` accept the missing prefix) before deleting the file; with a
//! [`PurgeHold`] (off-host shipping) it also stops at the first segment not yet
//! shipped. [`AuditLog::changes`] tells a shipper when a segment was sealed or
//! a checkpoint written.

mod checkpoint;
mod event;
pub mod fhir;
mod format;
pub mod forward;
mod reader;
mod segment;
mod snapshot;
mod sync;
mod writer;

#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::time::Duration;

pub use checkpoint::Checkpoint;
pub use event::{
    AuditAction, AuditEvent, AuditPrincipal, AuditRecord, EventKind, InferenceParams, ModelRef, Outcome, RecordReceipt,
    TextHmac, TokenCounts,
};
pub use format::AuditKeys;
pub use reader::{
    read_durable, read_trail, read_trail_with_keys, verify_trail, IntegrityError, RecordFilter, TrailReport,
};
pub use snapshot::{
    inspect_segment, parse_segment_name, segment_file_name, verify_backup_manifest, Inspect, SegmentSummary,
    BACKUP_MANIFEST_CONTEXT,
};
pub use writer::{AuditHealth, AuditLog, TrailChanges};

#[allow(unused_imports)] // referenced by the docs above
use salus_sensitive::secret::SecretKey;
use salus_sensitive::secret::{KeySource, SecretError};

/// Default retention: six years (2,192 days), the HIPAA documentation period.
pub const DEFAULT_RETENTION_DAYS: u32 = 2192;

/// Where and how the audit trail is kept.
#[derive(Clone, Debug)]
pub struct AuditLogSettings {
    /// Directory of segment files (created with mode 0700 if missing).
    pub dir: PathBuf,
    /// Optional second directory receiving every checkpoint (a WORM mount or
    /// another host), so that deleting the tail of the trail is detectable.
    pub checkpoint_dir: Option<PathBuf>,
    /// The master audit key; encryption, HMAC and signing keys derive from it.
    pub key: KeySource,
    /// Seal the open segment when it reaches this size.
    pub segment_max_bytes: u64,
    /// Seal the open segment when it is this old (and holds records).
    pub segment_max_age: Duration,
    /// Write a checkpoint after this many records…
    pub checkpoint_every_records: u64,
    /// …or this long after the last one, whichever comes first.
    pub checkpoint_every: Duration,
    /// Sealed segments older than this many days are purged.
    pub retention_days: u32,
    /// Name of this server instance (FHIR `AuditEvent.source`); defaults to the host name.
    pub instance: String,
    /// Set when the trail is shipped off the host (`[audit.ship]`): the
    /// retention purge deletes no segment past the hold's watermark.
    pub purge_hold: Option<PurgeHold>,
}

/// Holds back the retention purge until segments are copied off the host:
/// sealed segments with an index above [`PurgeHold::through`] are kept even
/// when expired. Starts at 0 (nothing released); the shipper raises it as the
/// destination confirms what it holds. Clones share one watermark.
#[derive(Clone, Debug, Default)]
pub struct PurgeHold(std::sync::Arc<std::sync::atomic::AtomicU64>);

impl PurgeHold {
    pub fn new() -> PurgeHold {
        PurgeHold::default()
    }

    /// Segments up to `index` may be purged (the watermark never goes down).
    pub fn release_through(&self, index: u64) {
        self.0.fetch_max(index, std::sync::atomic::Ordering::AcqRel);
    }

    /// The highest segment index the purge may delete.
    pub fn through(&self) -> u64 {
        self.0.load(std::sync::atomic::Ordering::Acquire)
    }
}

impl AuditLogSettings {
    /// A configuration with the defaults: 64 MiB / 24 h segments, a checkpoint
    /// every 10,000 records or 10 s, 2,192 days retention.
    pub fn new(dir: impl Into<PathBuf>, key: KeySource) -> Self {
        AuditLogSettings {
            dir: dir.into(),
            checkpoint_dir: None,
            key,
            segment_max_bytes: 64 << 20,
            segment_max_age: Duration::from_secs(24 * 3600),
            checkpoint_every_records: 10_000,
            checkpoint_every: Duration::from_secs(10),
            retention_days: DEFAULT_RETENTION_DAYS,
            instance: default_instance(),
            purge_hold: None,
        }
    }
}

fn default_instance() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "salus".to_string())
}

/// Errors of the audit layer. Messages name files, segments and records, never
/// key material or event contents.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The audit key could not be loaded.
    #[error("audit key: {0}")]
    Key(#[from] SecretError),
    /// Writing or syncing the trail failed: the record is NOT durable (fail closed).
    #[error("audit trail write failed ({context}): {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// Another process holds the trail's lock.
    #[error("audit directory {0} is in use by another process")]
    Locked(PathBuf),
    /// The trail is damaged or has been tampered with (names the place).
    #[error("audit trail integrity: {0}")]
    Integrity(#[from] IntegrityError),
    /// The trail was written under a different key.
    #[error("audit trail {file} was written with key id {found}, not {expected}")]
    WrongKey { file: String, found: String, expected: String },
    /// `server.*` and `audit.*` events are written only by the log itself.
    #[error("event kind {0} is reserved to the audit log")]
    ReservedKind(&'static str),
    /// One event encodes to more than the per-record limit (64 KiB).
    #[error("audit record of {bytes} bytes exceeds the {max}-byte limit")]
    RecordTooLarge { bytes: usize, max: usize },
    /// The log was closed (or its writer stopped).
    #[error("audit log is closed")]
    Closed,
    /// An invalid setting.
    #[error("audit config: {0}")]
    Config(String),
}

impl AuditError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        AuditError::Io { context: context.into(), source }
    }
}
