//! Reading the trail from a given seq on while the writer appends to it.
//!
//! The follower finds the segment holding its next seq from the segment
//! headers (newest first), then reads frames from there: a sealed segment is
//! decrypted once and kept until its last record is taken; the open `.log` is
//! read from the byte offset reached, at most [`READ_CHUNK`] at a time. It
//! never reads past the durable seq it is given: bytes after it may be a
//! write in progress, or what a failed write left (whose seqs are reused).
//! When the writer starts the next segment, or seals the one being read
//! (the `.log` disappears), the follower locates its seq again.
//!
//! Every record is authenticated (AES-GCM) and checked against the chain:
//! its seq is the expected one and its `prev_hash` is the hash of the record
//! before it (once that record has been seen).

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::event::AuditRecord;
use crate::format::*;
use crate::reader::{integrity, IntegrityError};
use crate::AuditError;

/// Bytes of the open segment read at once (more than one frame, [`MAX_FRAME`]).
const READ_CHUNK: u64 = 4 << 20;

enum Current {
    /// The key schedule is boxed: it is most of the enum's size.
    Log {
        index: u64,
        cipher: Box<SegmentCipher>,
        offset: u64,
    },
    Sealed {
        index: u64,
        first_seq: u64,
        records: Vec<Vec<u8>>,
    },
}

/// A reader of the trail positioned at a seq.
pub(crate) struct Follower {
    dir: PathBuf,
    keys: Arc<AuditKeys>,
    next_seq: u64,
    /// Hash of the record before `next_seq`, once known (the chain check).
    prev_hash: Option<[u8; 32]>,
    cur: Option<Current>,
    /// Records that retention purged before they were read…
    pub(crate) skipped: u64,
    /// …and the seq the follower skipped to last (0: none skipped).
    pub(crate) skipped_to: u64,
}

impl Follower {
    pub(crate) fn new(dir: &Path, keys: Arc<AuditKeys>, next_seq: u64) -> Self {
        Follower {
            dir: dir.to_path_buf(),
            keys,
            next_seq: next_seq.max(1),
            prev_hash: None,
            cur: None,
            skipped: 0,
            skipped_to: 0,
        }
    }

    /// The seq the next [`Follower::read`] starts at.
    pub(crate) fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Pretends the record before the next one had hash `h` (tests of the chain check).
    #[cfg(test)]
    pub(crate) fn prev_hash_for_test(&mut self, h: [u8; 32]) {
        self.prev_hash = Some(h);
    }

    /// Moves to `seq` (backwards to re-send, or forwards).
    pub(crate) fn seek(&mut self, seq: u64) {
        if seq != self.next_seq {
            self.next_seq = seq.max(1);
            self.prev_hash = None;
            self.cur = None;
        }
    }

    /// Up to `max` records from the next seq on, none past `upto` (the
    /// durable seq). Fewer when the trail holds no more yet.
    pub(crate) fn read(&mut self, upto: u64, max: usize) -> Result<Vec<AuditRecord>, AuditError> {
        let mut out = Vec::new();
        // Looks that found nothing in a row. The record is durable, so some
        // segment holds it; one sealed or started between listing and
        // reading is found on the next look.
        let mut fruitless = 0;
        while out.len() < max && self.next_seq <= upto {
            if fruitless >= 3 {
                let problem = format!("record seq {} is durable but no segment holds it", self.next_seq);
                return Err(IntegrityError { file: None, seq: Some(self.next_seq), problem }.into());
            }
            let before = out.len();
            match self.cur.take() {
                None => self.locate()?,
                Some(Current::Sealed { index, first_seq, records }) => {
                    self.take_sealed(index, first_seq, &records, upto, max, &mut out)?;
                    if self.next_seq < first_seq + records.len() as u64 {
                        self.cur = Some(Current::Sealed { index, first_seq, records });
                    }
                }
                Some(Current::Log { index, cipher, mut offset }) => {
                    let present = self.take_log(index, &cipher, &mut offset, upto, max, &mut out)?;
                    // Nothing more here although a record is durable: the
                    // writer went on in the next segment (or sealed this one).
                    if present && out.len() > before {
                        self.cur = Some(Current::Log { index, cipher, offset });
                    }
                }
            }
            if out.len() > before {
                fruitless = 0;
            } else if self.cur.is_none() {
                fruitless += 1;
            }
        }
        Ok(out)
    }

    fn accept(&mut self, name: &str, record: &[u8], out: &mut Vec<AuditRecord>) -> Result<(), AuditError> {
        let seq = self.next_seq;
        let rec: AuditRecord = serde_json::from_slice(record)
            .map_err(|_| integrity(name, Some(seq), "record is not a valid audit record".into()))?;
        if rec.seq != seq {
            return Err(integrity(name, Some(rec.seq), format!("expected seq {seq}")).into());
        }
        if let Some(prev) = self.prev_hash {
            if rec.prev_hash != hex::encode(prev) {
                return Err(integrity(name, Some(seq), "prev_hash does not match the previous record".into()).into());
            }
        }
        self.prev_hash = Some(leaf_hash(record));
        self.next_seq += 1;
        out.push(rec);
        Ok(())
    }

    fn take_sealed(
        &mut self,
        index: u64,
        first_seq: u64,
        records: &[Vec<u8>],
        upto: u64,
        max: usize,
        out: &mut Vec<AuditRecord>,
    ) -> Result<(), AuditError> {
        let name = sealed_name(index);
        while out.len() < max && self.next_seq <= upto {
            let Some(i) = self.next_seq.checked_sub(first_seq) else { break };
            let Some(r) = records.get(i as usize) else { break };
            self.accept(&name, r, out)?;
        }
        Ok(())
    }

    /// Reads frames of the open segment from `offset`. False when the file
    /// is gone (sealed meanwhile: locate again).
    fn take_log(
        &mut self,
        index: u64,
        cipher: &SegmentCipher,
        offset: &mut u64,
        upto: u64,
        max: usize,
        out: &mut Vec<AuditRecord>,
    ) -> Result<bool, AuditError> {
        let name = log_name(index);
        let io = |e| AuditError::io(format!("reading {name} (forwarding)"), e);
        let f = match std::fs::File::open(self.dir.join(&name)) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(io(e)),
        };
        let len = f.metadata().map_err(io)?.len();
        while out.len() < max && self.next_seq <= upto && *offset < len {
            let want = (len - *offset).min(READ_CHUNK) as usize;
            let mut buf = vec![0u8; want];
            f.read_exact_at(&mut buf, *offset).map_err(io)?;
            let mut pos = 0;
            while pos < buf.len() && out.len() < max && self.next_seq <= upto {
                match decode_frame(cipher, index, &buf[pos..]) {
                    Frame::Ok { seq, record, len } => {
                        if seq < self.next_seq {
                            // Before the resume point: only its hash is wanted.
                            self.prev_hash = Some(leaf_hash(&record));
                        } else if seq == self.next_seq {
                            self.accept(&name, &record, out)?;
                        } else {
                            let p = format!("expected seq {}", self.next_seq);
                            return Err(integrity(&name, Some(seq), p).into());
                        }
                        pos += len;
                    }
                    Frame::Incomplete => break,
                    Frame::BadLength | Frame::BadAuth { .. } => {
                        // Durable records only lie before the durable end.
                        let p = format!("unreadable frame at byte {} (forwarding)", *offset + pos as u64);
                        return Err(integrity(&name, Some(self.next_seq), p).into());
                    }
                }
            }
            if pos == 0 {
                break;
            }
            *offset += pos as u64;
        }
        Ok(true)
    }

    /// Finds the segment holding `next_seq`: the newest whose first seq is
    /// not after it. If retention purged it, skips to the oldest record left.
    fn locate(&mut self) -> Result<(), AuditError> {
        let files =
            list_segments(&self.dir).map_err(|e| AuditError::io(format!("listing {}", self.dir.display()), e))?;
        let mut by_index: BTreeMap<u64, bool> = BTreeMap::new();
        for (f, _) in &files {
            match f {
                SegFile::Log(i) => {
                    by_index.entry(*i).or_insert(false);
                }
                SegFile::Sealed(i) => {
                    by_index.insert(*i, true);
                }
                SegFile::SealedTmp(_) | SegFile::LogTmp(_) => {}
            }
        }
        let mut oldest = None;
        for (&index, &sealed) in by_index.iter().rev() {
            let Some(first) = self.first_seq(index, sealed)? else { continue };
            oldest = Some((index, sealed, first));
            if first <= self.next_seq {
                return self.open(index, sealed);
            }
        }
        match oldest {
            Some((index, sealed, first)) => {
                // Purged before it was forwarded: nothing can bring it back.
                self.skipped += first - self.next_seq;
                tracing::warn!(
                    from_seq = self.next_seq,
                    to_seq = first - 1,
                    "audit forward: records purged by retention before they were forwarded; skipping them"
                );
                self.next_seq = first;
                self.skipped_to = first;
                self.prev_hash = None;
                self.open(index, sealed)
            }
            None => Ok(()),
        }
    }

    /// The first seq of a segment, from its header; `None` if the file is gone.
    fn first_seq(&self, index: u64, sealed: bool) -> Result<Option<u64>, AuditError> {
        let name = if sealed { sealed_name(index) } else { log_name(index) };
        let io = |e| AuditError::io(format!("reading {name} (forwarding)"), e);
        let f = match std::fs::File::open(self.dir.join(&name)) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(e)),
        };
        let mut head = vec![0u8; if sealed { SEALED_HEADER_LEN } else { LOG_HEADER_LEN }];
        f.read_exact_at(&mut head, 0).map_err(io)?;
        let first = if sealed {
            SealedHeader::decode(&head).map_err(|p| integrity(&name, None, p))?.first_seq
        } else {
            LogHeader::decode(&head, &self.keys).map_err(|p| integrity(&name, None, p))?.first_seq
        };
        Ok(Some(first))
    }

    fn open(&mut self, index: u64, sealed: bool) -> Result<(), AuditError> {
        if sealed {
            let name = sealed_name(index);
            let bytes = match std::fs::read(self.dir.join(&name)) {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(AuditError::io(format!("reading {name} (forwarding)"), e)),
            };
            let (h, records) = decode_sealed(&self.keys, &bytes).map_err(|p| integrity(&name, None, p))?;
            let i = self.next_seq.saturating_sub(h.first_seq) as usize;
            self.prev_hash = match i {
                0 => Some(h.prev_hash),
                i => records.get(i - 1).map(|r| leaf_hash(r)),
            };
            self.cur = Some(Current::Sealed { index, first_seq: h.first_seq, records });
        } else {
            let name = log_name(index);
            let mut head = [0u8; LOG_HEADER_LEN];
            let read = std::fs::File::open(self.dir.join(&name)).and_then(|f| f.read_exact_at(&mut head, 0));
            match read {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(AuditError::io(format!("reading {name} (forwarding)"), e)),
            }
            let h = LogHeader::decode(&head, &self.keys).map_err(|p| integrity(&name, None, p))?;
            let cipher = Box::new(self.keys.segment_cipher(index, &h.salt));
            self.cur = Some(Current::Log { index, cipher, offset: LOG_HEADER_LEN as u64 });
        }
        Ok(())
    }
}
