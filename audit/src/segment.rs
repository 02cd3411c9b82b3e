//! Segment files on the writer side: the open segment, recovery of the last
//! one after a crash (torn-tail detection), and sealing.

use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;

use serde_json::json;

use super::event::AuditRecord;
use super::format::*;
use super::reader::integrity;
use super::writer::MAX_TORN_TAIL;
use super::AuditError;

/// The segment being appended to.
pub(super) struct OpenSegment {
    pub(super) file: Arc<File>,
    pub(super) index: u64,
    pub(super) created_ms: i64,
    pub(super) cipher: SegmentCipher,
    /// Bytes known durable; anything after is garbage from a failed write.
    pub(super) len: u64,
    pub(super) dirty: bool,
    pub(super) records: u64,
}

impl OpenSegment {
    /// Creates segment `index`. The header is written and synced under a
    /// temporary name (`seg-N.log.tmp`) and only then linked to `seg-N.log`,
    /// so a crash can never leave a `.log` without a whole header (before
    /// this, a kill between creating the file and writing its header left
    /// an empty `.log` that no later start could open). Linking, unlike a
    /// rename, fails if the `.log` already exists.
    pub(super) fn create(dir: &Path, keys: &AuditKeys, index: u64, first_seq: u64) -> std::io::Result<OpenSegment> {
        let header =
            LogHeader { index, first_seq, created_ms: now_ms(), salt: random_bytes(), key_id: key_id_bytes(keys) };
        let tmp = dir.join(log_tmp_name(index));
        let path = dir.join(log_name(index));
        let file =
            std::fs::OpenOptions::new().create(true).truncate(true).read(true).write(true).mode(0o600).open(&tmp)?;
        file.write_all_at(&header.encode(keys), 0)?;
        file.sync_all()?;
        std::fs::hard_link(&tmp, &path)?;
        std::fs::remove_file(&tmp)?;
        sync_dir(dir)?;
        Ok(OpenSegment {
            file: Arc::new(file),
            index,
            created_ms: header.created_ms,
            cipher: keys.segment_cipher(index, &header.salt),
            len: LOG_HEADER_LEN as u64,
            dirty: false,
            records: 0,
        })
    }
}

/// What the scan of the last segment found.
pub(super) struct Tail {
    pub(super) next_seq: u64,
    pub(super) last_hash: [u8; 32],
    pub(super) last_kind: Option<String>,
}

/// What unreadable data at the end of the last `.log` is. Both the writer's
/// recovery (which cuts a torn tail) and the offline verifier (which names
/// it) decide here, so they always agree.
pub(super) enum TailVerdict {
    /// An interrupted write: an incomplete or unauthenticated last frame, no
    /// good frame after it, no longer than one write. Cut at the next start.
    Torn { cut: usize },
    /// A bad frame with a good one after it: damage.
    FollowedByGood { seq: u64 },
    /// Longer than any single write: damage.
    TooLong { cut: usize },
}

/// Judges the unreadable data from `pos` on (`bytes` is the whole `.log`).
pub(super) fn judge_tail(cipher: &SegmentCipher, index: u64, bytes: &[u8], pos: usize) -> TailVerdict {
    if let Frame::BadAuth { seq, len } = decode_frame(cipher, index, &bytes[pos..]) {
        if let Frame::Ok { .. } = decode_frame(cipher, index, &bytes[pos + len..]) {
            return TailVerdict::FollowedByGood { seq };
        }
    }
    let cut = bytes.len() - pos;
    if cut > MAX_TORN_TAIL {
        TailVerdict::TooLong { cut }
    } else {
        TailVerdict::Torn { cut }
    }
}

/// Reopens the last `.log` for appending, cutting a torn tail.
pub(super) fn reopen_log(
    dir: &Path,
    keys: &AuditKeys,
    index: u64,
    notes: &mut serde_json::Map<String, serde_json::Value>,
) -> Result<(OpenSegment, Tail), AuditError> {
    let name = log_name(index);
    let path = dir.join(&name);
    let io = |e| AuditError::io(format!("recovering {name}"), e);
    let file = std::fs::OpenOptions::new().read(true).write(true).open(&path).map_err(io)?;
    let bytes = std::fs::read(&path).map_err(io)?;
    let header = LogHeader::decode(&bytes, keys).map_err(|p| integrity(&name, None, p))?;
    if header.index != index {
        return Err(integrity(&name, None, format!("header names segment {}", header.index)).into());
    }
    let cipher = keys.segment_cipher(index, &header.salt);
    let mut pos = LOG_HEADER_LEN;
    let mut next_seq = header.first_seq;
    let mut last: Option<Vec<u8>> = None;
    while pos < bytes.len() {
        if let Frame::Ok { seq, record, len } = decode_frame(&cipher, index, &bytes[pos..]) {
            if seq != next_seq {
                return Err(integrity(&name, Some(seq), format!("expected seq {next_seq}")).into());
            }
            next_seq += 1;
            pos += len;
            last = Some(record);
            continue;
        }
        match judge_tail(&cipher, index, &bytes, pos) {
            TailVerdict::Torn { cut } => {
                file.set_len(pos as u64).map_err(io)?;
                file.sync_all().map_err(io)?;
                notes.insert("torn_tail".into(), json!({ "segment": name, "offset": pos, "bytes_cut": cut }));
                break;
            }
            TailVerdict::FollowedByGood { seq } => {
                return Err(integrity(&name, Some(seq), "record failed authentication".into()).into())
            }
            TailVerdict::TooLong { cut } => {
                let p = format!("unreadable data from byte {pos} ({cut} bytes) is longer than any single write: damage, not a torn tail; not cutting");
                return Err(integrity(&name, Some(next_seq), p).into());
            }
        }
    }
    let seg = OpenSegment {
        file: Arc::new(file),
        index,
        created_ms: header.created_ms,
        cipher,
        len: pos as u64,
        dirty: false,
        records: next_seq - header.first_seq,
    };
    let tail = match last {
        Some(rec) => Tail {
            next_seq,
            last_hash: leaf_hash(&rec),
            last_kind: serde_json::from_slice::<AuditRecord>(&rec).ok().map(|r| r.kind),
        },
        None if index > 1 => {
            let prev = sealed_tail(dir, keys, index - 1)?;
            if prev.next_seq != header.first_seq {
                return Err(integrity(
                    &name,
                    None,
                    format!("starts at seq {}, expected {}", header.first_seq, prev.next_seq),
                )
                .into());
            }
            prev
        }
        None => Tail { next_seq, last_hash: [0; 32], last_kind: None },
    };
    Ok((seg, tail))
}

/// The end of the chain in a sealed segment.
pub(super) fn sealed_tail(dir: &Path, keys: &AuditKeys, index: u64) -> Result<Tail, AuditError> {
    let name = sealed_name(index);
    let bytes = std::fs::read(dir.join(&name)).map_err(|e| AuditError::io(format!("reading {name}"), e))?;
    let (h, records) = decode_sealed(keys, &bytes).map_err(|p| integrity(&name, None, p))?;
    let last_kind = records.last().and_then(|r| serde_json::from_slice::<AuditRecord>(r).ok()).map(|r| r.kind);
    Ok(Tail { next_seq: h.first_seq + h.count, last_hash: h.last_hash, last_kind })
}

/// The records of segment `index` (sealed, or the open `.log` up to its first
/// unreadable frame), in order.
pub(super) fn segment_records(
    dir: &Path,
    keys: &AuditKeys,
    index: u64,
    sealed: bool,
) -> Result<Vec<Vec<u8>>, AuditError> {
    let name = if sealed { sealed_name(index) } else { log_name(index) };
    let bytes = std::fs::read(dir.join(&name)).map_err(|e| AuditError::io(format!("reading {name}"), e))?;
    if sealed {
        return Ok(decode_sealed(keys, &bytes).map_err(|p| integrity(&name, None, p))?.1);
    }
    let header = LogHeader::decode(&bytes, keys).map_err(|p| integrity(&name, None, p))?;
    let cipher = keys.segment_cipher(index, &header.salt);
    let (mut records, mut pos) = (Vec::new(), LOG_HEADER_LEN);
    while let Frame::Ok { record, len, .. } = decode_frame(&cipher, index, bytes.get(pos..).unwrap_or(&[])) {
        records.push(record);
        pos += len;
    }
    Ok(records)
}

/// Seals `seg-<index>.log`: compress, encrypt, write `.sealed`, delete the log.
pub(super) fn seal_log(dir: &Path, keys: &AuditKeys, index: u64) -> Result<(), AuditError> {
    let name = log_name(index);
    let io = |what: &str| {
        let what = format!("{what} (sealing {name})");
        move |e| AuditError::io(what, e)
    };
    let bytes = std::fs::read(dir.join(&name)).map_err(io("reading"))?;
    let header = LogHeader::decode(&bytes, keys).map_err(|p| integrity(&name, None, p))?;
    let cipher = keys.segment_cipher(index, &header.salt);
    let mut records = Vec::new();
    let mut pos = LOG_HEADER_LEN;
    while pos < bytes.len() {
        match decode_frame(&cipher, index, &bytes[pos..]) {
            Frame::Ok { seq, record, len } if seq == header.first_seq + records.len() as u64 => {
                records.push(record);
                pos += len;
            }
            _ => {
                let seq = header.first_seq + records.len() as u64;
                return Err(integrity(&name, Some(seq), format!("bad record at offset {pos}; not sealing")).into());
            }
        }
    }
    let first: AuditRecord = records
        .first()
        .and_then(|r| serde_json::from_slice(r).ok())
        .ok_or_else(|| integrity(&name, None, "no readable records; not sealing".into()))?;
    let prev_hash: [u8; 32] = hex::decode(&first.prev_hash)
        .ok()
        .and_then(|v| v.try_into().ok())
        .ok_or_else(|| integrity(&name, Some(first.seq), "bad prev_hash".into()))?;
    let leaves: Vec<[u8; 32]> = records.iter().map(|r| leaf_hash(r)).collect();
    let sealed = SealedHeader {
        index,
        first_seq: header.first_seq,
        count: records.len() as u64,
        created_ms: header.created_ms,
        sealed_ms: now_ms(),
        prev_hash,
        last_hash: *leaves.last().expect("at least one record"),
        merkle_root: merkle_root(&leaves),
        salt: [0; 16],
        key_id: [0; 16],
        nonce: [0; 12],
    };
    let out = encode_sealed(keys, sealed, &records);
    let tmp = dir.join(sealed_tmp_name(index));
    {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io("creating"))?;
        f.write_all_at(&out, 0).map_err(io("writing"))?;
        f.sync_all().map_err(io("syncing"))?;
    }
    std::fs::rename(&tmp, dir.join(sealed_name(index))).map_err(io("renaming"))?;
    sync_dir(dir).map_err(io("syncing directory"))?;
    std::fs::remove_file(dir.join(&name)).map_err(io("removing log"))?;
    sync_dir(dir).map_err(io("syncing directory"))
}
