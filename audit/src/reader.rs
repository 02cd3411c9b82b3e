//! Offline reading and verification of a trail (`salus audit verify/query/export`).
//!
//! Every segment is walked in order and every record decrypted, so a check
//! needs the audit key. Each problem is reported with the segment file and the
//! record's seq, and the walk stops at the first one (everything after an
//! integrity failure is suspect).

use std::collections::BTreeMap;
use std::path::Path;

use super::checkpoint::{latest_numbered, Checkpoint, CHECKPOINT_FILE};
use super::event::{AuditRecord, EventKind};
use super::format::*;
use super::segment::{judge_tail, TailVerdict};
use super::AuditError;
use salus_sensitive::secret::SecretKey;

/// Where and how the trail fails verification.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.describe())]
pub struct IntegrityError {
    /// The segment (or checkpoint) file.
    pub file: Option<String>,
    /// The record's seq, where known.
    pub seq: Option<u64>,
    pub problem: String,
}

impl IntegrityError {
    fn describe(&self) -> String {
        match (&self.file, self.seq) {
            (Some(f), Some(s)) => format!("{f}, record seq {s}: {}", self.problem),
            (Some(f), None) => format!("{f}: {}", self.problem),
            (None, Some(s)) => format!("record seq {s}: {}", self.problem),
            (None, None) => self.problem.clone(),
        }
    }
}

pub(crate) fn integrity(file: &str, seq: Option<u64>, problem: String) -> IntegrityError {
    IntegrityError { file: Some(file.to_string()), seq, problem }
}

/// Selects records for `salus audit query` / `export`.
#[derive(Clone, Debug, Default)]
pub struct RecordFilter {
    /// Principal id, exact.
    pub principal: Option<String>,
    /// An event kind (`inference.started`) or a family (`inference`, `admin`…).
    pub event: Option<String>,
    /// Inclusive bounds on the record time.
    pub since: Option<time::OffsetDateTime>,
    pub until: Option<time::OffsetDateTime>,
}

impl RecordFilter {
    /// Parses an RFC 3339 time, or a date `YYYY-MM-DD` (midnight UTC).
    pub fn parse_time(s: &str) -> Result<time::OffsetDateTime, String> {
        use time::format_description::well_known::Rfc3339;
        if let Ok(t) = time::OffsetDateTime::parse(s, &Rfc3339) {
            return Ok(t);
        }
        let fmt = time::macros::format_description!("[year]-[month]-[day]");
        time::Date::parse(s, &fmt)
            .map(|d| d.midnight().assume_utc())
            .map_err(|_| format!("'{s}' is not an RFC 3339 time or a YYYY-MM-DD date"))
    }

    /// Checks that `event` names a kind or a family of kinds.
    pub fn check_event(event: &str) -> Result<(), String> {
        let known = EventKind::ALL.iter().any(|k| k.as_str() == event || k.as_str().split('.').next() == Some(event));
        if known {
            Ok(())
        } else {
            let names: Vec<&str> = EventKind::ALL.iter().map(|k| k.as_str()).collect();
            Err(format!("unknown event '{event}'; known: {}", names.join(", ")))
        }
    }

    pub fn matches(&self, r: &AuditRecord) -> bool {
        if let Some(p) = &self.principal {
            if r.principal.as_ref().map(|x| &x.id) != Some(p) {
                return false;
            }
        }
        if let Some(e) = &self.event {
            if r.kind != *e && r.kind.split('.').next() != Some(e.as_str()) {
                return false;
            }
        }
        if self.since.is_some() || self.until.is_some() {
            let Ok(t) = Self::parse_time(&r.time) else {
                return false;
            };
            if self.since.is_some_and(|s| t < s) || self.until.is_some_and(|u| t > u) {
                return false;
            }
        }
        true
    }
}

/// Summary of a walk over the trail.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrailReport {
    pub segments: u64,
    pub sealed_segments: u64,
    /// Segments before the first present one, accounted for by `audit.purged` events.
    pub purged_segments: u64,
    pub records: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    pub chain_head: String,
    /// Checkpoints checked (file names).
    pub checkpoints: Vec<String>,
}

/// Walks and verifies the whole trail, calling `visit` with each record (parsed
/// and as stored) in order. Fails at the first integrity problem.
pub fn read_trail(
    dir: &Path,
    key: &SecretKey,
    visit: impl FnMut(&AuditRecord, &[u8]),
) -> Result<TrailReport, AuditError> {
    let keys = AuditKeys::from_master(key);
    Walk::new(&keys, visit).run(dir)
}

/// [`read_trail`] with the derived keys in hand (a server holding its open
/// [`crate::AuditLog`] reads its own trail with `log.audit_keys()`).
pub fn read_trail_with_keys(
    dir: &Path,
    keys: &AuditKeys,
    visit: impl FnMut(&AuditRecord, &[u8]),
) -> Result<TrailReport, AuditError> {
    Walk::new(keys, visit).run(dir)
}

/// Reads the trail of a running [`crate::AuditLog`] up to its durable seq (as
/// it stood when the read began), from its own process: what the server's
/// auditor API and start-up index read. Unlike [`read_trail_with_keys`] it
/// ignores what lies past the durable seq — a frame being written, which a
/// plain walk would call a torn tail — and walks again when a segment was
/// sealed (renamed) under it.
pub fn read_durable(
    log: &crate::AuditLog,
    mut visit: impl FnMut(&AuditRecord, &[u8]),
) -> Result<TrailReport, AuditError> {
    const ATTEMPTS: usize = 3;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let up_to = log.durable_seq();
        let mut seen = 0u64;
        // A retried walk delivers only what the failed one did not.
        let mut walk = Walk::new(log.audit_keys(), |r: &AuditRecord, raw: &[u8]| {
            if r.seq > seen {
                seen = r.seq;
                visit(r, raw);
            }
        });
        walk.up_to = Some(up_to);
        match walk.run(log.dir()) {
            Ok(report) => return Ok(report),
            // A segment sealed (renamed) between the listing and its read.
            Err(_) if attempt < ATTEMPTS => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Verifies the trail and its checkpoints (`dir/checkpoint.json`, and the newest
/// checkpoint in `checkpoint_dir` if given): signatures, signer, and that the
/// trail still reaches each checkpoint with the same chain head.
pub fn verify_trail(dir: &Path, key: &SecretKey, checkpoint_dir: Option<&Path>) -> Result<TrailReport, AuditError> {
    let keys = AuditKeys::from_master(key);
    let mut ckpts = Vec::new();
    let main = dir.join(CHECKPOINT_FILE);
    ckpts.push((CHECKPOINT_FILE.to_string(), main));
    if let Some(cd) = checkpoint_dir {
        let latest = latest_numbered(cd).map_err(|e| AuditError::io(format!("listing {}", cd.display()), e))?;
        let p = latest.ok_or_else(|| IntegrityError {
            file: Some(cd.display().to_string()),
            seq: None,
            problem: "no checkpoint-*.json files".into(),
        })?;
        ckpts.push((p.display().to_string(), p));
    }
    let our_pk = hex::encode(keys.signing_key().verifying_key().as_bytes());
    let mut loaded = Vec::new();
    for (name, path) in ckpts {
        let c = Checkpoint::read(&path).map_err(|p| integrity(&name, None, p))?;
        c.verify_signature().map_err(|p| integrity(&name, None, format!("checkpoint {p}")))?;
        if c.public_key != our_pk {
            return Err(integrity(&name, None, "checkpoint is signed by a different key".into()).into());
        }
        loaded.push((name, c));
    }
    let mut walk = Walk::new(&keys, |_: &AuditRecord, _: &[u8]| {});
    for (_, c) in &loaded {
        walk.capture.insert(c.records, None);
    }
    let mut report = walk.run(dir)?;
    let last_index = report.segments + report.purged_segments;
    for (name, c) in loaded {
        if c.records > report.last_seq {
            return Err(integrity(
                &name,
                Some(c.records),
                format!(
                    "trail truncated: checkpoint of {} covers {} records but the trail ends at seq {}",
                    c.time, c.records, report.last_seq
                ),
            )
            .into());
        }
        if c.segments > last_index {
            return Err(integrity(
                &name,
                None,
                format!("checkpoint covers {} segments but the trail has {last_index}", c.segments),
            )
            .into());
        }
        if let Some(Some(h)) = walk.capture.get(&c.records) {
            if hex::encode(h) != c.chain_head {
                return Err(integrity(
                    &name,
                    Some(c.records),
                    "chain head differs from the checkpoint (records rewritten)".into(),
                )
                .into());
            }
        }
        report.checkpoints.push(name);
    }
    Ok(report)
}

struct Walk<'k, F> {
    keys: &'k AuditKeys,
    visit: F,
    /// Seqs whose record hash is wanted (checkpoints).
    capture: BTreeMap<u64, Option<[u8; 32]>>,
    /// (next expected seq, hash of the previous record), once known.
    expect: Option<(u64, [u8; 32])>,
    start: Option<(u64, [u8; 32])>,
    /// segment index → (last seq, last hash) from `audit.purged` events.
    purges: BTreeMap<u64, (u64, String)>,
    report: TrailReport,
    /// Stop after this seq (a live trail's durable seq): later bytes of the
    /// open segment may be a write in progress.
    up_to: Option<u64>,
}

impl<'k, F: FnMut(&AuditRecord, &[u8])> Walk<'k, F> {
    fn new(keys: &'k AuditKeys, visit: F) -> Self {
        Walk {
            keys,
            visit,
            capture: BTreeMap::new(),
            expect: None,
            start: None,
            purges: BTreeMap::new(),
            report: TrailReport::default(),
            up_to: None,
        }
    }

    fn run(&mut self, dir: &Path) -> Result<TrailReport, AuditError> {
        let files = list_segments(dir).map_err(|e| AuditError::io(format!("listing {}", dir.display()), e))?;
        let mut present: BTreeMap<u64, (bool, bool)> = BTreeMap::new();
        for (f, _) in &files {
            match f {
                SegFile::Log(i) => present.entry(*i).or_default().0 = true,
                SegFile::Sealed(i) => present.entry(*i).or_default().1 = true,
                SegFile::SealedTmp(_) | SegFile::LogTmp(_) => {}
            }
        }
        let (Some(&first), Some((&last, &(last_is_log, last_is_sealed)))) =
            (present.keys().next(), present.iter().next_back())
        else {
            return Err(IntegrityError {
                file: None,
                seq: None,
                problem: format!("no audit segments in {}", dir.display()),
            }
            .into());
        };
        if !last_is_log || last_is_sealed {
            return Err(integrity(
                &log_name(last + 1),
                None,
                "open segment missing (tail of the trail deleted)".into(),
            )
            .into());
        }
        for i in first..=last {
            let Some(&(log, sealed)) = present.get(&i) else {
                return Err(integrity(&sealed_name(i), None, "segment missing (deleted)".into()).into());
            };
            if sealed {
                self.sealed(dir, i)?;
                self.report.sealed_segments += 1;
            } else if log {
                self.log(dir, i, i == last)?;
            }
            self.report.segments += 1;
        }
        if first > 1 {
            let (start_seq, start_prev) = self.start.unwrap_or((1, [0; 32]));
            let name = present.get(&first).map(|p| if p.1 { sealed_name(first) } else { log_name(first) }).unwrap();
            match self.purges.get(&(first - 1)) {
                Some((last_seq, last_hash)) if last_seq + 1 == start_seq && *last_hash == hex::encode(start_prev) => {
                    self.report.purged_segments = first - 1;
                }
                Some(_) => {
                    return Err(integrity(
                        &name,
                        Some(start_seq),
                        "does not chain to the purged segment before it".into(),
                    )
                    .into())
                }
                None => {
                    return Err(integrity(
                        &sealed_name(first - 1),
                        None,
                        "segment missing (deleted, no audit.purged event for it)".into(),
                    )
                    .into())
                }
            }
        } else if let Some((s, p)) = self.start {
            if s != 1 || p != [0; 32] {
                return Err(integrity(&log_name(1), Some(s), "trail does not start at seq 1".into()).into());
            }
        }
        if let Some((next, head)) = self.expect {
            self.report.last_seq = next - 1;
            self.report.chain_head = hex::encode(head);
        }
        self.report.first_seq = self.start.map(|s| s.0).unwrap_or(0);
        Ok(std::mem::take(&mut self.report))
    }

    fn sealed(&mut self, dir: &Path, i: u64) -> Result<(), AuditError> {
        let name = sealed_name(i);
        let bytes = std::fs::read(dir.join(&name)).map_err(|e| AuditError::io(format!("reading {name}"), e))?;
        let (h, records) = decode_sealed(self.keys, &bytes).map_err(|p| integrity(&name, None, p))?;
        if h.index != i {
            return Err(integrity(&name, None, format!("header names segment {} (renamed or swapped)", h.index)).into());
        }
        self.segment_start(&name, h.first_seq, h.prev_hash)?;
        for r in &records {
            self.record(&name, None, r)?;
        }
        if self.expect.map(|e| e.1) != Some(h.last_hash) {
            return Err(integrity(&name, None, "last hash in header does not match the records".into()).into());
        }
        Ok(())
    }

    fn log(&mut self, dir: &Path, i: u64, is_last: bool) -> Result<(), AuditError> {
        let name = log_name(i);
        let bytes = std::fs::read(dir.join(&name)).map_err(|e| AuditError::io(format!("reading {name}"), e))?;
        if is_last && bytes.len() < LOG_HEADER_LEN {
            // Still an error (the trail is not whole), but not tampering.
            return Err(integrity(
                &name,
                None,
                format!("header truncated ({} of {LOG_HEADER_LEN} bytes): a segment whose creation a crash interrupted, holding no record; the server removes it and records audit.recovered at its next start", bytes.len()),
            )
            .into());
        }
        let h = LogHeader::decode(&bytes, self.keys).map_err(|p| integrity(&name, None, p))?;
        if h.index != i {
            return Err(integrity(&name, None, format!("header names segment {} (renamed or swapped)", h.index)).into());
        }
        let cipher = self.keys.segment_cipher(i, &h.salt);
        let mut pos = LOG_HEADER_LEN;
        let mut first = true;
        if pos >= bytes.len() {
            // An empty segment: it must start where the previous one ended.
            if let Some((next, _)) = self.expect {
                if h.first_seq != next {
                    return Err(
                        integrity(&name, None, format!("starts at seq {}, expected {next}", h.first_seq)).into()
                    );
                }
            }
        }
        while pos < bytes.len() {
            let after = self.expect.map(|e| e.0.saturating_sub(1)).unwrap_or(0);
            if is_last && self.up_to.is_some_and(|u| after >= u) {
                // Past the durable seq of a live trail: not ours to judge.
                break;
            }
            let frame = decode_frame(&cipher, i, &bytes[pos..]);
            if is_last && !matches!(frame, Frame::Ok { .. }) {
                if let TailVerdict::Torn { cut } = judge_tail(&cipher, i, &bytes, pos) {
                    // Not tampering: a write cut short (a crash, a full disk). Still
                    // an error: the trail is not whole until the server repairs it.
                    return Err(integrity(
                        &name,
                        None,
                        format!("torn tail at byte {pos} ({cut} bytes after seq {after}): a write cut short by a crash or a full disk, not tampering; the server cuts it and records audit.recovered at its next start"),
                    )
                    .into());
                }
            }
            match frame {
                Frame::Ok { seq, record, len } => {
                    if first {
                        let prev = serde_json::from_slice::<AuditRecord>(&record)
                            .ok()
                            .and_then(|r| hex::decode(r.prev_hash).ok())
                            .and_then(|v| <[u8; 32]>::try_from(v).ok())
                            .ok_or_else(|| integrity(&name, Some(seq), "record is not a valid audit record".into()))?;
                        self.segment_start(&name, h.first_seq, prev)?;
                        first = false;
                    }
                    self.record(&name, Some(seq), &record)?;
                    pos += len;
                }
                Frame::Incomplete => {
                    let what = if is_last { "torn or truncated tail" } else { "truncated segment" };
                    return Err(integrity(&name, None, format!("{what} at byte {pos} (after seq {after})")).into());
                }
                Frame::BadLength => {
                    return Err(
                        integrity(&name, None, format!("bad record length at byte {pos} (after seq {after})")).into()
                    )
                }
                Frame::BadAuth { seq, .. } => {
                    return Err(integrity(
                        &name,
                        Some(seq),
                        format!("record at byte {pos} failed authentication (modified or moved)"),
                    )
                    .into())
                }
            }
        }
        Ok(())
    }

    fn segment_start(&mut self, name: &str, first_seq: u64, prev: [u8; 32]) -> Result<(), AuditError> {
        match self.expect {
            None => {
                self.start = Some((first_seq, prev));
                self.expect = Some((first_seq, prev));
            }
            Some((next, head)) => {
                if first_seq != next {
                    return Err(integrity(
                        name,
                        Some(first_seq),
                        format!("segment starts at seq {first_seq}, expected {next} (records missing or duplicated)"),
                    )
                    .into());
                }
                if prev != head {
                    return Err(
                        integrity(name, Some(first_seq), "does not chain to the previous segment".into()).into()
                    );
                }
            }
        }
        Ok(())
    }

    fn record(&mut self, name: &str, frame_seq: Option<u64>, bytes: &[u8]) -> Result<(), AuditError> {
        let (next, prev) = self.expect.expect("segment_start sets the expectation");
        let rec: AuditRecord = serde_json::from_slice(bytes)
            .map_err(|_| integrity(name, frame_seq.or(Some(next)), "record is not a valid audit record".into()))?;
        if frame_seq.is_some_and(|s| s != rec.seq) {
            return Err(integrity(name, frame_seq, format!("frame seq differs from record seq {}", rec.seq)).into());
        }
        if rec.seq != next {
            let what = if rec.seq < next { "duplicated or reordered record" } else { "records missing before it" };
            return Err(integrity(name, Some(rec.seq), format!("{what}: expected seq {next}")).into());
        }
        if rec.prev_hash != hex::encode(prev) {
            return Err(integrity(
                name,
                Some(rec.seq),
                "prev_hash does not match the previous record (chain broken)".into(),
            )
            .into());
        }
        if rec.kind == EventKind::AuditPurged.as_str() {
            if let Some(d) = &rec.detail {
                if let (Some(seg), Some(ls), Some(lh)) = (
                    d.get("segment").and_then(|v| v.as_u64()),
                    d.get("last_seq").and_then(|v| v.as_u64()),
                    d.get("last_hash").and_then(|v| v.as_str()),
                ) {
                    self.purges.insert(seg, (ls, lh.to_string()));
                }
            }
        }
        let h = leaf_hash(bytes);
        if let Some(slot) = self.capture.get_mut(&rec.seq) {
            *slot = Some(h);
        }
        self.expect = Some((next + 1, h));
        self.report.records += 1;
        (self.visit)(&rec, bytes);
        Ok(())
    }
}
