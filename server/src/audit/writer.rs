//! [`AuditLog`]: the writer side. One thread owns the open segment and does
//! group commit: it takes every record waiting in its queue, appends them with
//! one `pwrite`, `fdatasync`s once, and only then answers the callers. A second
//! thread (the housekeeper) seals full segments and writes checkpoints so that
//! neither delays a commit.

use std::fs::File;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::json;

use super::checkpoint::Checkpoint;
use super::event::{AuditEvent, AuditRecord, EventKind, RecordReceipt, TextHmac};
use super::format::*;
use super::reader::integrity;
use super::segment::{reopen_log, seal_log, sealed_tail, OpenSegment, Tail};
use super::{AuditConfig, AuditError};

/// Most records taken from the queue for one group commit.
const MAX_BATCH: usize = 4096;
/// A write + sync is issued once this many bytes are buffered.
const MAX_WRITE: usize = 4 << 20;
/// Largest encoded record accepted (identifiers and numbers only: small).
pub(crate) const MAX_RECORD: usize = 64 << 10;
/// Longest tail a crash can tear: one write plus one record and its frame.
pub(crate) const MAX_TORN_TAIL: usize = MAX_WRITE + MAX_RECORD + 64;
/// How often the idle writer wakes for age-based sealing, checkpoints, probes.
const TICK: Duration = Duration::from_millis(250);
const PURGE_EVERY: Duration = Duration::from_secs(3600);

/// Handle to the audit trail. Cheap to clone; all clones share one writer.
#[derive(Clone)]
pub struct AuditLog {
    inner: Arc<Inner>,
}

struct Inner {
    tx: mpsc::Sender<Cmd>,
    shared: Arc<Shared>,
    keys: Arc<AuditKeys>,
    dir: PathBuf,
    writer: Mutex<Option<JoinHandle<()>>>,
}

struct Shared {
    healthy: AtomicBool,
    closed: AtomicBool,
    inject_failures: AtomicU32,
}

impl Shared {
    fn take_injected_failure(&self) -> bool {
        self.inject_failures.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok()
    }
}

// Records are moved, not boxed: one allocation less per event on the hot path.
#[allow(clippy::large_enum_variant)]
enum Cmd {
    Record(AuditEvent, Reply),
    Close(mpsc::SyncSender<Result<(), AuditError>>),
    /// The last handle was dropped without `close` (treated like a crash).
    Abandon,
}

enum Reply {
    Async(tokio::sync::oneshot::Sender<Result<RecordReceipt, AuditError>>),
    Blocking(mpsc::SyncSender<Result<RecordReceipt, AuditError>>),
}

impl Reply {
    fn send(self, r: Result<RecordReceipt, AuditError>) {
        // A caller that went away (request cancelled) is not an error here.
        match self {
            Reply::Async(tx) => drop(tx.send(r)),
            Reply::Blocking(tx) => drop(tx.send(r)),
        }
    }
}

impl AuditLog {
    /// Opens (or creates) the trail in `cfg.dir`: takes its lock, seals leftover
    /// full segments, cuts a torn tail (recording `audit.recovered`), writes
    /// `server.started` and a checkpoint, purges expired sealed segments, and
    /// starts the writer. Fails if any of that cannot be made durable.
    pub fn open(cfg: AuditConfig) -> Result<AuditLog, AuditError> {
        if cfg.segment_max_bytes < 4096 {
            return Err(AuditError::Config("segment_max_bytes must be at least 4096".into()));
        }
        if cfg.checkpoint_every_records == 0 {
            return Err(AuditError::Config("checkpoint_every_records must be at least 1".into()));
        }
        let keys = Arc::new(AuditKeys::from_master(&cfg.key.load()?));
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&cfg.dir)
            .map_err(|e| AuditError::io(format!("creating {}", cfg.dir.display()), e))?;
        if let Some(cd) = &cfg.checkpoint_dir {
            std::fs::create_dir_all(cd).map_err(|e| AuditError::io(format!("creating {}", cd.display()), e))?;
        }
        let lock = lock_dir(&cfg.dir)?;
        let shared = Arc::new(Shared {
            healthy: AtomicBool::new(true),
            closed: AtomicBool::new(false),
            inject_failures: 0.into(),
        });
        let dir = cfg.dir.clone();
        let (mut writer, recovered) = Writer::recover(cfg, keys.clone(), shared.clone(), lock)?;
        if let Some(detail) = recovered {
            writer.commit_internal(AuditEvent::new(EventKind::AuditRecovered).detail(detail))?;
        }
        let started =
            json!({ "version": env!("CARGO_PKG_VERSION"), "key_id": keys.key_id(), "pid": std::process::id() });
        writer.commit_internal(AuditEvent::new(EventKind::ServerStarted).detail(started))?;
        writer.purge_expired();
        let ckpt = writer.make_checkpoint();
        write_checkpoint(&writer.cfg, &ckpt).map_err(|e| AuditError::io("writing checkpoint", e))?;
        writer.start_housekeeper();
        let (tx, rx) = mpsc::channel();
        let handle = std::thread::Builder::new()
            .name("salus-audit-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| AuditError::io("starting the audit writer thread", e))?;
        Ok(AuditLog { inner: Arc::new(Inner { tx, shared, keys, dir, writer: Mutex::new(Some(handle)) }) })
    }

    /// Records an event; returns once it is durable (written and synced).
    /// An error means the event is NOT recorded: the caller must fail closed.
    pub async fn record(&self, event: AuditEvent) -> Result<RecordReceipt, AuditError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(event, Reply::Async(tx))?;
        rx.await.map_err(|_| AuditError::Closed)?
    }

    /// [`AuditLog::record`] for threads that are not async tasks.
    pub fn record_blocking(&self, event: AuditEvent) -> Result<RecordReceipt, AuditError> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.submit(event, Reply::Blocking(tx))?;
        rx.recv().map_err(|_| AuditError::Closed)?
    }

    fn submit(&self, event: AuditEvent, reply: Reply) -> Result<(), AuditError> {
        if event.kind.is_reserved() {
            return Err(AuditError::ReservedKind(event.kind.as_str()));
        }
        if self.inner.shared.closed.load(Ordering::Acquire) {
            return Err(AuditError::Closed);
        }
        self.inner.tx.send(Cmd::Record(event, reply)).map_err(|_| AuditError::Closed)
    }

    /// False after a write or sync failure, until a write succeeds again (the
    /// idle writer probes the directory every 250 ms). `/ready` reports this.
    /// Also false once closed, or if the writer thread has died.
    pub fn is_healthy(&self) -> bool {
        let writer_alive =
            self.inner.writer.lock().unwrap_or_else(|p| p.into_inner()).as_ref().is_some_and(|h| !h.is_finished());
        writer_alive
            && self.inner.shared.healthy.load(Ordering::Acquire)
            && !self.inner.shared.closed.load(Ordering::Acquire)
    }

    /// The HMAC the trail stores for a prompt or completion.
    pub fn hmac<T: zeroize::Zeroize + AsRef<[u8]>>(&self, text: &salus_models::Phi<T>) -> TextHmac {
        self.inner.keys.text_hmac(text)
    }

    /// Hex HMAC-SHA256 of `text` under the audit HMAC key (what an auditor searches for).
    pub fn prompt_hmac(&self, text: &[u8]) -> String {
        self.inner.keys.hmac_hex(text)
    }

    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Writes `server.stopped` and a final checkpoint, then stops the writer.
    /// Later `record` calls fail with [`AuditError::Closed`].
    pub fn close(&self) -> Result<(), AuditError> {
        if self.inner.shared.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let (tx, rx) = mpsc::sync_channel(1);
        self.inner.tx.send(Cmd::Close(tx)).map_err(|_| AuditError::Closed)?;
        let result = rx.recv().map_err(|_| AuditError::Closed)?;
        if let Some(h) = self.inner.writer.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = h.join();
        }
        result
    }

    /// Fault injection for tests: the next `count` writes to the trail fail
    /// with an I/O error, as on a full or failing disk. (Half of the batch is
    /// written first, so the recovery path for partial writes is exercised.)
    pub fn inject_write_failures(&self, count: u32) {
        self.inner.shared.inject_failures.store(count, Ordering::SeqCst);
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if !self.shared.closed.load(Ordering::Acquire) {
            let _ = self.tx.send(Cmd::Abandon);
        }
        if let Some(h) = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = h.join();
        }
    }
}

fn lock_dir(dir: &Path) -> Result<File, AuditError> {
    use std::os::fd::AsRawFd;
    let path = dir.join("LOCK");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| AuditError::io(format!("opening {}", path.display()), e))?;
    // SAFETY: flock(2) on a file descriptor we own for the duration of the call;
    // no memory is shared with the kernel.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        if err.kind() == std::io::ErrorKind::WouldBlock {
            return Err(AuditError::Locked(dir.to_path_buf()));
        }
        return Err(AuditError::io(format!("locking {}", path.display()), err));
    }
    Ok(f)
}

enum Job {
    Seal(u64),
    Checkpoint(Checkpoint),
}

struct Writer {
    cfg: AuditConfig,
    keys: Arc<AuditKeys>,
    shared: Arc<Shared>,
    _lock: File,
    seg: OpenSegment,
    next_seq: u64,
    last_hash: [u8; 32],
    buf: Vec<u8>,
    since_ckpt: u64,
    last_ckpt: Instant,
    last_purge: Instant,
    house: Option<(mpsc::Sender<Job>, JoinHandle<()>)>,
}

impl Writer {
    /// Brings the directory to a consistent state and positions the writer at its end.
    fn recover(
        cfg: AuditConfig,
        keys: Arc<AuditKeys>,
        shared: Arc<Shared>,
        lock: File,
    ) -> Result<(Writer, Option<serde_json::Value>), AuditError> {
        let dir = cfg.dir.clone();
        let io = |what: String| move |e| AuditError::io(what, e);
        let mut notes = serde_json::Map::new();
        let files = list_segments(&dir).map_err(io(format!("listing {}", dir.display())))?;
        let mut logs = std::collections::BTreeSet::new();
        let mut sealed = std::collections::BTreeSet::new();
        for (f, path) in &files {
            match f {
                SegFile::SealedTmp(_) => {
                    std::fs::remove_file(path).map_err(io(format!("removing {}", path.display())))?;
                    notes.insert("removed_partial_seal".into(), json!(true));
                }
                SegFile::Log(i) => drop(logs.insert(*i)),
                SegFile::Sealed(i) => drop(sealed.insert(*i)),
            }
        }
        // A crash between sealing and deleting the .log leaves both: keep the sealed one.
        for i in logs.intersection(&sealed).copied().collect::<Vec<_>>() {
            let name = sealed_name(i);
            let bytes = std::fs::read(dir.join(&name)).map_err(io(format!("reading {name}")))?;
            decode_sealed(&keys, &bytes).map_err(|p| integrity(&name, None, p))?;
            std::fs::remove_file(dir.join(log_name(i))).map_err(io(format!("removing {}", log_name(i))))?;
            logs.remove(&i);
        }
        let max_index = logs.iter().chain(sealed.iter()).max().copied();
        let last_log = logs.iter().max().copied().filter(|l| Some(*l) == max_index);
        // Full segments that were rolled but not yet sealed: seal them now.
        for &i in logs.iter().filter(|&&i| Some(i) != last_log) {
            seal_log(&dir, &keys, i)?;
            notes.insert("sealed_at_startup".into(), json!(true));
        }
        sync_dir(&dir).map_err(io(format!("syncing {}", dir.display())))?;

        let (seg, tail) = match (max_index, last_log) {
            (None, _) => {
                let seg = OpenSegment::create(&dir, &keys, 1, 1).map_err(io("creating segment 1".into()))?;
                (seg, Tail { next_seq: 1, last_hash: [0; 32], last_kind: None })
            }
            (Some(_), Some(l)) => reopen_log(&dir, &keys, l, &mut notes)?,
            (Some(m), None) => {
                // The trail ends in a sealed segment: the open segment is gone.
                let tail = sealed_tail(&dir, &keys, m)?;
                notes.insert("open_segment_missing".into(), json!(log_name(m + 1)));
                let seg = OpenSegment::create(&dir, &keys, m + 1, tail.next_seq)
                    .map_err(io(format!("creating {}", log_name(m + 1))))?;
                (seg, tail)
            }
        };
        if tail.last_kind.as_deref().is_some_and(|k| k != EventKind::ServerStopped.as_str()) {
            notes.insert("unclean_shutdown".into(), json!(true));
        }
        let writer = Writer {
            cfg,
            keys,
            shared,
            _lock: lock,
            seg,
            next_seq: tail.next_seq,
            last_hash: tail.last_hash,
            buf: Vec::with_capacity(1 << 16),
            since_ckpt: 0,
            last_ckpt: Instant::now(),
            last_purge: Instant::now(),
            house: None,
        };
        Ok((writer, (!notes.is_empty()).then_some(serde_json::Value::Object(notes))))
    }

    fn start_housekeeper(&mut self) {
        let (tx, rx) = mpsc::channel::<Job>();
        let (cfg, keys) = (self.cfg.clone(), self.keys.clone());
        let handle = std::thread::Builder::new()
            .name("salus-audit-housekeeper".into())
            .spawn(move || {
                for job in rx {
                    match job {
                        Job::Seal(i) => {
                            if let Err(e) = seal_log(&cfg.dir, &keys, i) {
                                tracing::error!(segment = i, error = %e, "audit: sealing failed; retried at next start");
                            }
                        }
                        Job::Checkpoint(c) => {
                            if let Err(e) = write_checkpoint(&cfg, &c) {
                                tracing::error!(error = %e, "audit: checkpoint write failed");
                            }
                        }
                    }
                }
            })
            .expect("spawning the audit housekeeper thread");
        self.house = Some((tx, handle));
    }

    fn stop_housekeeper(&mut self) {
        if let Some((tx, handle)) = self.house.take() {
            drop(tx);
            let _ = handle.join();
        }
    }

    fn job(&mut self, job: Job) {
        let job = match &self.house {
            Some((tx, _)) => match tx.send(job) {
                Ok(()) => return,
                Err(mpsc::SendError(job)) => job,
            },
            None => job,
        };
        let r = match job {
            Job::Seal(i) => seal_log(&self.cfg.dir, &self.keys, i).map_err(|e| e.to_string()),
            Job::Checkpoint(c) => write_checkpoint(&self.cfg, &c).map_err(|e| e.to_string()),
        };
        if let Err(e) = r {
            tracing::error!(error = %e, "audit: housekeeping failed");
        }
    }

    fn run(mut self, rx: mpsc::Receiver<Cmd>) {
        let mut batch: Vec<(AuditEvent, Reply)> = Vec::with_capacity(MAX_BATCH);
        loop {
            let first = match rx.recv_timeout(TICK) {
                Ok(cmd) => cmd,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if !self.shared.healthy.load(Ordering::Acquire) {
                        self.probe();
                    }
                    self.maintain();
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return self.stop_housekeeper(),
            };
            let mut control = None;
            match first {
                Cmd::Record(e, r) => batch.push((e, r)),
                other => control = Some(other),
            }
            while control.is_none() && batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(Cmd::Record(e, r)) => batch.push((e, r)),
                    Ok(other) => control = Some(other),
                    Err(_) => break,
                }
            }
            if !batch.is_empty() {
                self.commit_batch(&mut batch);
            }
            match control {
                Some(Cmd::Close(reply)) => {
                    let r = self.close();
                    let _ = reply.send(r);
                    return;
                }
                Some(Cmd::Abandon) => return self.stop_housekeeper(),
                _ => self.maintain(),
            }
        }
    }

    /// Encodes the batch and commits it with one write + sync per `MAX_WRITE`
    /// bytes (so a torn write is never longer than `MAX_TORN_TAIL`).
    fn commit_batch(&mut self, batch: &mut Vec<(AuditEvent, Reply)>) {
        let time = now_rfc3339();
        let mut done = Vec::with_capacity(batch.len());
        let mut start = (self.next_seq, self.last_hash);
        self.buf.clear();
        for (ev, reply) in batch.drain(..) {
            match self.append(ev, &time) {
                Ok(receipt) => done.push((receipt, reply)),
                Err(e) => reply.send(Err(e)),
            }
            if self.buf.len() >= MAX_WRITE {
                self.finish(&mut done, start);
                start = (self.next_seq, self.last_hash);
                self.buf.clear();
            }
        }
        if !done.is_empty() {
            self.finish(&mut done, start);
        }
    }

    /// Writes and syncs the buffer, then answers its records' callers.
    fn finish(&mut self, done: &mut Vec<(RecordReceipt, Reply)>, start: (u64, [u8; 32])) {
        match self.flush(done.len() as u64) {
            Ok(()) => done.drain(..).for_each(|(r, reply)| reply.send(Ok(r))),
            Err(e) => {
                (self.next_seq, self.last_hash) = start;
                let (kind, msg) = match &e {
                    AuditError::Io { source, .. } => (source.kind(), source.to_string()),
                    other => (std::io::ErrorKind::Other, other.to_string()),
                };
                for (_, reply) in done.drain(..) {
                    reply.send(Err(AuditError::io("committing batch", std::io::Error::new(kind, msg.clone()))));
                }
            }
        }
    }

    /// Commits one event of the log's own (server.*, audit.*), synchronously.
    fn commit_internal(&mut self, ev: AuditEvent) -> Result<RecordReceipt, AuditError> {
        let (seq0, hash0) = (self.next_seq, self.last_hash);
        self.buf.clear();
        let receipt = self.append(ev, &now_rfc3339())?;
        self.flush(1).inspect_err(|_| (self.next_seq, self.last_hash) = (seq0, hash0))?;
        Ok(receipt)
    }

    /// Encodes one record into the batch buffer. `time` is the batch's commit time.
    fn append(&mut self, ev: AuditEvent, time: &str) -> Result<RecordReceipt, AuditError> {
        let seq = self.next_seq;
        let time = time.to_string();
        let event_id = uuid::Builder::from_random_bytes(random_bytes()).into_uuid().to_string();
        let rec = AuditRecord::from_event(ev, seq, time.clone(), event_id.clone(), &self.last_hash, &self.cfg.instance);
        let bytes = serde_json::to_vec(&rec).expect("audit records always serialize");
        if bytes.len() > MAX_RECORD {
            return Err(AuditError::RecordTooLarge { bytes: bytes.len(), max: MAX_RECORD });
        }
        let hash = leaf_hash(&bytes);
        encode_frame(&self.seg.cipher, self.seg.index, seq, &bytes, &mut self.buf);
        self.next_seq += 1;
        self.last_hash = hash;
        Ok(RecordReceipt { seq, event_id, time, hash: hex::encode(hash) })
    }

    /// Writes the buffer at the durable end of the segment and syncs it.
    fn flush(&mut self, records: u64) -> Result<(), AuditError> {
        let r = self.write_buf();
        match &r {
            Ok(()) => {
                self.seg.records += records;
                self.since_ckpt += records;
                self.shared.healthy.store(true, Ordering::Release);
            }
            Err(e) => {
                self.shared.healthy.store(false, Ordering::Release);
                tracing::error!(error = %e, segment = self.seg.index, "audit: write failed; failing closed");
            }
        }
        r.map_err(|e| AuditError::io(format!("writing {}", log_name(self.seg.index)), e))
    }

    fn write_buf(&mut self) -> std::io::Result<()> {
        if self.seg.dirty {
            self.seg.file.set_len(self.seg.len)?;
            self.seg.dirty = false;
        }
        self.seg.dirty = true;
        if self.shared.take_injected_failure() {
            let half = self.buf.len() / 2;
            let _ = self.seg.file.write_all_at(&self.buf[..half], self.seg.len);
            return Err(std::io::Error::other("injected write failure"));
        }
        self.seg.file.write_all_at(&self.buf, self.seg.len)?;
        self.seg.file.sync_data()?;
        self.seg.len += self.buf.len() as u64;
        self.seg.dirty = false;
        Ok(())
    }

    /// While unhealthy: does a write + sync in the directory succeed again?
    fn probe(&mut self) {
        let ok = !self.shared.take_injected_failure()
            && (|| -> std::io::Result<()> {
                if self.seg.dirty {
                    self.seg.file.set_len(self.seg.len)?;
                    self.seg.file.sync_data()?;
                    self.seg.dirty = false;
                }
                let p = self.cfg.dir.join(".probe");
                let f = std::fs::OpenOptions::new().create(true).truncate(true).write(true).open(&p)?;
                f.write_all_at(&[0u8; 4096], 0)?;
                f.sync_all()?;
                std::fs::remove_file(&p)
            })()
            .is_ok();
        if ok {
            self.shared.healthy.store(true, Ordering::Release);
        }
    }

    /// Rolls, checkpoints and purges when due.
    fn maintain(&mut self) {
        let age_ms = now_ms().saturating_sub(self.seg.created_ms).max(0) as u128;
        if self.seg.records > 0
            && (self.seg.len >= self.cfg.segment_max_bytes || age_ms >= self.cfg.segment_max_age.as_millis())
        {
            self.roll();
        }
        if self.since_ckpt >= self.cfg.checkpoint_every_records
            || (self.since_ckpt > 0 && self.last_ckpt.elapsed() >= self.cfg.checkpoint_every)
        {
            let c = self.make_checkpoint();
            self.job(Job::Checkpoint(c));
        }
        if self.last_purge.elapsed() >= PURGE_EVERY {
            self.purge_expired();
        }
    }

    /// Starts the next segment and hands the full one to the housekeeper to seal.
    fn roll(&mut self) {
        if self.seg.dirty && self.seg.file.set_len(self.seg.len).and_then(|_| self.seg.file.sync_data()).is_err() {
            return;
        }
        match OpenSegment::create(&self.cfg.dir, &self.keys, self.seg.index + 1, self.next_seq) {
            Ok(new) => {
                let old = std::mem::replace(&mut self.seg, new);
                self.job(Job::Seal(old.index));
            }
            Err(e) => {
                tracing::error!(error = %e, "audit: cannot start a new segment; still appending to the old one")
            }
        }
    }

    fn make_checkpoint(&mut self) -> Checkpoint {
        self.since_ckpt = 0;
        self.last_ckpt = Instant::now();
        Checkpoint::new(&self.keys, self.seg.index, self.next_seq - 1, &self.last_hash, now_rfc3339())
    }

    /// Purges sealed segments older than the retention period, oldest first,
    /// each after a durable `audit.purged` event. Stops at the first segment
    /// that is not sealed, not expired, or not intact (kept as evidence).
    fn purge_expired(&mut self) {
        self.last_purge = Instant::now();
        let cutoff = now_ms() - self.cfg.retention_days as i64 * 86_400_000;
        let Ok(files) = list_segments(&self.cfg.dir) else {
            return;
        };
        for (f, path) in files {
            let SegFile::Sealed(i) = f else { return };
            if i >= self.seg.index {
                return;
            }
            // Cheap look at the (not yet authenticated) header first; the whole
            // segment is authenticated only when it claims to be expired.
            let mut head = [0u8; SEALED_HEADER_LEN];
            let claimed = File::open(&path)
                .and_then(|f| f.read_exact_at(&mut head, 0))
                .ok()
                .and_then(|_| SealedHeader::decode(&head).ok());
            if claimed.is_some_and(|h| h.sealed_ms > cutoff) {
                return;
            }
            let header =
                match std::fs::read(&path).map_err(|e| e.to_string()).and_then(|b| decode_sealed(&self.keys, &b)) {
                    Ok((h, _)) => h,
                    Err(e) => {
                        tracing::error!(segment = i, error = %e, "audit: not purging a damaged sealed segment");
                        return;
                    }
                };
            if header.sealed_ms > cutoff {
                return;
            }
            let detail = json!({
                "segment": i,
                "first_seq": header.first_seq,
                "last_seq": header.first_seq + header.count - 1,
                "records": header.count,
                "last_hash": hex::encode(header.last_hash),
                "sealed_ms": header.sealed_ms,
            });
            let ev = AuditEvent::new(EventKind::AuditPurged).target(sealed_name(i)).detail(detail);
            if self.commit_internal(ev).is_err() {
                return;
            }
            if let Err(e) = std::fs::remove_file(&path).and_then(|_| sync_dir(&self.cfg.dir)) {
                tracing::error!(segment = i, error = %e, "audit: purge could not delete the segment");
                return;
            }
        }
    }

    fn close(&mut self) -> Result<(), AuditError> {
        let r = self.commit_internal(AuditEvent::new(EventKind::ServerStopped));
        self.stop_housekeeper();
        let c = self.make_checkpoint();
        r?;
        write_checkpoint(&self.cfg, &c).map_err(|e| AuditError::io("writing the final checkpoint", e))
    }
}

fn write_checkpoint(cfg: &AuditConfig, c: &Checkpoint) -> std::io::Result<()> {
    c.write_latest(&cfg.dir)?;
    if let Some(cd) = &cfg.checkpoint_dir {
        c.write_numbered(cd)?;
    }
    Ok(())
}
