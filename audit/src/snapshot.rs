//! What a backup tool needs to know about a trail's files without holding its
//! lock: the segment files' names, and for one segment's bytes (read while a
//! server may be appending) what it covers — its index, seq range, the hash
//! before its first record and of its last one, every record's chain hash,
//! and for an open `.log` how many of its bytes are whole, authenticated
//! frames (a copy cut there is a consistent point-in-time copy of the
//! segment). Also the backup-manifest signature with the trail's checkpoint
//! key (`salus-backup`).
//!
//! Everything here reads; nothing writes to the trail.

use ed25519_dalek::{Signature, Signer, Verifier, VerifyingKey};
use serde::Deserialize;

use super::format::*;
use super::reader::{integrity, IntegrityError};

/// The signed bytes of a backup manifest are this context, then the
/// manifest's body. A checkpoint's signed bytes start with
/// `salus-audit-checkpoint/v`, so one signature can never pass for the other.
pub const BACKUP_MANIFEST_CONTEXT: &[u8] = b"salus-backup-manifest/v1\n";

/// A segment file name of the trail: `(index, sealed)`. `seg-N.sealed.tmp`
/// (a seal in progress), `seg-N.log.tmp` (a segment being created) and every
/// other name are `None`.
pub fn parse_segment_name(name: &str) -> Option<(u64, bool)> {
    match parse_name(name)? {
        SegFile::Log(i) => Some((i, false)),
        SegFile::Sealed(i) => Some((i, true)),
        SegFile::SealedTmp(_) | SegFile::LogTmp(_) => None,
    }
}

/// The file name of segment `index`, sealed or open.
pub fn segment_file_name(index: u64, sealed: bool) -> String {
    if sealed {
        sealed_name(index)
    } else {
        log_name(index)
    }
}

/// How deep [`inspect_segment`] looks into a sealed segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Inspect {
    /// Authenticate the header and the encrypted body (AES-GCM): fast; the
    /// seq range and the last record's hash come from the authenticated
    /// header. Only the last record's hash is known.
    Authenticate,
    /// Also decompress, check the record count and Merkle root, and hash
    /// every record.
    Records,
}

/// What one segment's bytes hold (see [`inspect_segment`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentSummary {
    pub index: u64,
    pub sealed: bool,
    /// The seq of the first record (from the authenticated header).
    pub first_seq: u64,
    /// Records in the segment (in the whole frames, for a `.log`).
    pub records: u64,
    /// The chain hash before the first record (`None`: an empty `.log`).
    pub prev_hash: Option<[u8; 32]>,
    /// The chain hash of the last record (`None`: an empty `.log`).
    pub last_hash: Option<[u8; 32]>,
    /// The chain hash of every record, in order (empty for a sealed segment
    /// inspected with [`Inspect::Authenticate`]).
    pub hashes: Vec<[u8; 32]>,
    /// Bytes of whole, authenticated frames from the start (for a sealed
    /// segment: the file's length). A `.log` read while it is appended to can
    /// end in part of a frame; its first `valid_len` bytes are a consistent copy.
    pub valid_len: u64,
}

impl SegmentSummary {
    /// The seq of the last record (`first_seq - 1` when empty).
    pub fn last_seq(&self) -> u64 {
        self.first_seq + self.records - 1
    }

    /// The chain hash of the last record (the prev hash when empty).
    pub fn last_hash(&self) -> Option<[u8; 32]> {
        self.last_hash.or(self.prev_hash)
    }

    /// The chain hash of record `seq`, when known.
    pub fn hash_of(&self, seq: u64) -> Option<[u8; 32]> {
        if self.records > 0 && seq == self.last_seq() {
            return self.last_hash;
        }
        let i = seq.checked_sub(self.first_seq)?;
        self.hashes.get(usize::try_from(i).ok()?).copied()
    }

    /// Whether [`SegmentSummary::hash_of`] knows every record's hash.
    pub fn has_all_hashes(&self) -> bool {
        self.hashes.len() as u64 == self.records
    }
}

#[derive(Deserialize)]
struct Link {
    seq: u64,
    prev_hash: String,
}

/// Authenticates the segment `file_name` (`seg-N.log` or `seg-N.sealed`)
/// from its bytes under the audit key: a sealed segment's header and
/// encrypted body (AES-GCM; with [`Inspect::Records`] also the record count
/// and Merkle root), or each frame of a `.log` (AES-GCM with its segment
/// index and seq as associated data, seqs consecutive from the header's
/// first seq). Only the holder of the audit key can make bytes that pass, so
/// the records are the writer's; the hash chain record by record is what
/// [`crate::verify_trail`] checks. For a `.log`, reading stops at the first
/// frame that is not whole and authentic (one still being written); the
/// bytes before it are [`SegmentSummary::valid_len`].
pub fn inspect_segment(
    keys: &AuditKeys,
    file_name: &str,
    bytes: &[u8],
    depth: Inspect,
) -> Result<SegmentSummary, IntegrityError> {
    let (index, sealed) =
        parse_segment_name(file_name).ok_or_else(|| integrity(file_name, None, "not a segment file name".into()))?;
    let mut s = SegmentSummary {
        index,
        sealed,
        first_seq: 0,
        records: 0,
        prev_hash: None,
        last_hash: None,
        hashes: Vec::new(),
        valid_len: 0,
    };
    // The first record names the hash before it (a sealed header does too).
    let first_link = |s: &mut SegmentSummary, record: &[u8]| -> Result<(), IntegrityError> {
        let l: Link = serde_json::from_slice(record)
            .map_err(|_| integrity(file_name, Some(s.first_seq), "record is not a valid audit record".into()))?;
        if l.seq != s.first_seq {
            return Err(integrity(file_name, Some(l.seq), format!("expected seq {}", s.first_seq)));
        }
        let p = hex::decode(&l.prev_hash)
            .ok()
            .and_then(|v| <[u8; 32]>::try_from(v).ok())
            .ok_or_else(|| integrity(file_name, Some(l.seq), "bad prev_hash".into()))?;
        if s.prev_hash.is_some_and(|h| h != p) {
            return Err(integrity(file_name, Some(l.seq), "prev_hash differs from the segment header".into()));
        }
        s.prev_hash = Some(p);
        Ok(())
    };
    if sealed {
        let h = match depth {
            Inspect::Records => {
                let (h, records) = decode_sealed(keys, bytes).map_err(|p| integrity(file_name, None, p))?;
                s.first_seq = h.first_seq;
                s.prev_hash = Some(h.prev_hash);
                if let Some(r) = records.first() {
                    first_link(&mut s, r)?;
                }
                s.hashes = records.iter().map(|r| leaf_hash(r)).collect();
                if s.hashes.last() != Some(&h.last_hash) {
                    return Err(integrity(file_name, None, "last hash in header does not match the records".into()));
                }
                h
            }
            Inspect::Authenticate => authenticate_sealed(keys, bytes).map_err(|p| integrity(file_name, None, p))?,
        };
        if h.index != index {
            return Err(integrity(file_name, None, format!("header names segment {} (renamed or swapped)", h.index)));
        }
        if h.count == 0 {
            return Err(integrity(file_name, None, "sealed segment without records".into()));
        }
        s.first_seq = h.first_seq;
        s.prev_hash = Some(h.prev_hash);
        s.records = h.count;
        s.last_hash = Some(h.last_hash);
        s.valid_len = bytes.len() as u64;
        return Ok(s);
    }
    let h = LogHeader::decode(bytes, keys).map_err(|p| integrity(file_name, None, p))?;
    if h.index != index {
        return Err(integrity(file_name, None, format!("header names segment {} (renamed or swapped)", h.index)));
    }
    s.first_seq = h.first_seq;
    let cipher = keys.segment_cipher(index, &h.salt);
    let mut pos = LOG_HEADER_LEN;
    while let Frame::Ok { seq, record, len } = decode_frame(&cipher, index, &bytes[pos..]) {
        if seq != s.first_seq + s.records {
            return Err(integrity(file_name, Some(seq), format!("frame seq, expected {}", s.first_seq + s.records)));
        }
        if s.records == 0 {
            first_link(&mut s, &record)?;
        }
        s.hashes.push(leaf_hash(&record));
        s.records += 1;
        pos += len;
    }
    s.last_hash = s.hashes.last().copied();
    s.valid_len = pos as u64;
    Ok(s)
}

/// A sealed segment's header, once the header and the encrypted body
/// authenticate (nothing is decompressed).
fn authenticate_sealed(keys: &AuditKeys, bytes: &[u8]) -> Result<SealedHeader, String> {
    use ring::aead::{Aad, Nonce};
    let header = SealedHeader::decode(bytes)?;
    if header.key_id != key_id_bytes(keys) {
        return Err(format!("written with key id {}, not {}", String::from_utf8_lossy(&header.key_id), keys.key_id()));
    }
    let cipher = keys.segment_cipher(header.index, &header.salt);
    let mut body = bytes[SEALED_HEADER_LEN..].to_vec();
    cipher
        .open_in_place(Nonce::assume_unique_for_key(header.nonce), Aad::from(&bytes[..SEALED_HEADER_LEN]), &mut body)
        .map_err(|_| "authentication failed (modified or truncated sealed segment)".to_string())?;
    Ok(header)
}

impl AuditKeys {
    /// The trail's checkpoint (Ed25519) public key: what its checkpoints
    /// carry, and what verifies the backup manifests it signs.
    pub fn checkpoint_public_key(&self) -> [u8; 32] {
        self.signing_key().verifying_key().to_bytes()
    }

    /// Signs a backup manifest body with the checkpoint key: Ed25519 over
    /// [`BACKUP_MANIFEST_CONTEXT`] ‖ `body`.
    pub fn sign_backup_manifest(&self, body: &[u8]) -> [u8; 64] {
        let mut msg = Vec::with_capacity(BACKUP_MANIFEST_CONTEXT.len() + body.len());
        msg.extend_from_slice(BACKUP_MANIFEST_CONTEXT);
        msg.extend_from_slice(body);
        self.signing_key().sign(&msg).to_bytes()
    }
}

/// Checks a signature made by [`AuditKeys::sign_backup_manifest`] (no key
/// needed beyond the public one).
pub fn verify_backup_manifest(public_key: &[u8; 32], body: &[u8], signature: &[u8; 64]) -> Result<(), String> {
    let vk = VerifyingKey::from_bytes(public_key).map_err(|_| "invalid public key".to_string())?;
    let mut msg = Vec::with_capacity(BACKUP_MANIFEST_CONTEXT.len() + body.len());
    msg.extend_from_slice(BACKUP_MANIFEST_CONTEXT);
    msg.extend_from_slice(body);
    vk.verify(&msg, &Signature::from_bytes(signature)).map_err(|_| "bad signature".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AuditEvent, AuditLog, AuditLogSettings, EventKind};
    use salus_sensitive::secret::{write_new_key_file, SecretKey};

    #[test]
    fn inspects_open_and_sealed_segments_and_cuts_a_partial_frame() {
        let dir = tempfile::tempdir().unwrap();
        let key_path = dir.path().join("k");
        let key = write_new_key_file(&key_path).unwrap();
        let trail = dir.path().join("audit");
        let mut cfg = AuditLogSettings::new(&trail, format!("file:{}", key_path.display()).parse().unwrap());
        cfg.segment_max_bytes = 4096;
        let log = AuditLog::open(cfg).unwrap();
        for i in 0..40 {
            log.record_blocking(AuditEvent::new(EventKind::InferenceStarted).request_id(format!("r{i}"))).unwrap();
        }
        log.close().unwrap();
        let keys = AuditKeys::from_master(&key);
        let mut names: Vec<String> = std::fs::read_dir(&trail)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| parse_segment_name(n).is_some())
            .collect();
        names.sort();
        assert!(names.len() >= 2, "{names:?}");
        let mut next = 1;
        let mut prev = [0u8; 32];
        for n in &names {
            let bytes = std::fs::read(trail.join(n)).unwrap();
            let s = inspect_segment(&keys, n, &bytes, Inspect::Records).unwrap();
            let quick = inspect_segment(&keys, n, &bytes, Inspect::Authenticate).unwrap();
            assert_eq!((quick.first_seq, quick.records, quick.last_hash()), (s.first_seq, s.records, s.last_hash()));
            assert!(s.has_all_hashes());
            assert_eq!(s.first_seq, next, "{n}");
            assert_eq!(s.prev_hash, Some(prev), "{n}");
            assert_eq!(s.valid_len, bytes.len() as u64);
            next = s.last_seq() + 1;
            prev = s.last_hash().unwrap();
        }
        // A partial frame at the end of the open segment is left out.
        let last = names.last().unwrap();
        assert!(last.ends_with(".log"));
        let mut bytes = std::fs::read(trail.join(last)).unwrap();
        let whole = bytes.len();
        bytes.extend_from_slice(&[7u8; 30]);
        let s = inspect_segment(&keys, last, &bytes, Inspect::Authenticate).unwrap();
        assert_eq!(s.valid_len as usize, whole);
        // A different key is refused.
        let other = AuditKeys::from_master(&SecretKey::generate());
        assert!(inspect_segment(&other, last, &bytes, Inspect::Records).is_err());
        // A flipped byte in a sealed segment is refused.
        let sealed = names.iter().find(|n| n.ends_with(".sealed")).unwrap();
        let mut b = std::fs::read(trail.join(sealed)).unwrap();
        let at = b.len() - 20;
        b[at] ^= 1;
        for depth in [Inspect::Authenticate, Inspect::Records] {
            assert!(inspect_segment(&keys, sealed, &b, depth).unwrap_err().problem.contains("authentication"));
        }
    }

    #[test]
    fn manifest_signatures_verify_with_the_checkpoint_key_only() {
        let keys = AuditKeys::from_master(&SecretKey::generate());
        let sig = keys.sign_backup_manifest(b"body");
        let pk = keys.checkpoint_public_key();
        verify_backup_manifest(&pk, b"body", &sig).unwrap();
        assert!(verify_backup_manifest(&pk, b"bodY", &sig).is_err());
        let other = AuditKeys::from_master(&SecretKey::generate()).checkpoint_public_key();
        assert!(verify_backup_manifest(&other, b"body", &sig).is_err());
    }
}
