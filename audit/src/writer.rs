//! [`AuditLog`]: the writer side, a two-stage pipeline with group commit.
//!
//! The writer thread takes records from its queue and encodes them (JSON,
//! chain hash, AES-GCM) straight into the write buffer, with no per-record
//! allocation beyond the caller's event. The committer thread (`sync.rs`)
//! appends each buffer with one `pwrite` and one `fdatasync`, and only then
//! answers the callers. While the committer waits for the disk, the writer
//! encodes the next batch, so a batch is as large as what arrived during one
//! sync (group commit) and the CPU work is off the critical path. A third
//! thread (the housekeeper) seals full segments and writes checkpoints so that
//! neither delays a commit.

use std::fs::File;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::json;

use super::checkpoint::Checkpoint;
use super::event::{AuditEvent, EventKind, RecordReceipt, RecordView, TextHmac};
use super::format::*;
use super::reader::integrity;
use super::segment::{reopen_log, seal_log, sealed_tail, OpenSegment, Tail};
use super::sync::{self, ChainPos, Chunk, Done};
use super::{AuditError, AuditLogSettings};

mod maintenance;
mod recovery;
use maintenance::write_checkpoint;

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

pub(super) struct Shared {
    pub(super) healthy: AtomicBool,
    closed: AtomicBool,
    inject_failures: AtomicU32,
    /// Writes or syncs that failed (each one failed its records closed).
    write_failures: AtomicU64,
    /// Unix time (ms) when a record last became durable; 0 before the first.
    last_durable_ms: AtomicU64,
    /// The seq of the newest durable record (0 before the first): what the
    /// SIEM forwarder may read up to. Bytes past it in the open segment may be
    /// a write in progress, or the remains of a failed one whose seqs are reused.
    pub(super) durable_seq: AtomicU64,
    /// Bumped after each seal and checkpoint written ([`AuditLog::changes`]).
    pub(super) changes: tokio::sync::watch::Sender<u64>,
}

impl Shared {
    /// A write or sync failed: the trail refuses records until one succeeds.
    pub(super) fn write_failed(&self) {
        self.healthy.store(false, Ordering::Release);
        self.write_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Records became durable now.
    pub(super) fn durable_now(&self) {
        self.last_durable_ms.store(now_ms().max(0) as u64, Ordering::Relaxed);
    }

    /// Records up to `seq` are durable.
    pub(super) fn durable_through(&self, seq: u64) {
        self.durable_seq.fetch_max(seq, Ordering::Release);
    }

    /// A segment was sealed or a checkpoint written.
    pub(super) fn trail_changed(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    pub(super) fn take_injected_failure(&self) -> bool {
        self.inject_failures.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok()
    }
}

// Records are moved, not boxed: one allocation less per event on the hot path.
#[allow(clippy::large_enum_variant)]
pub(super) enum Cmd {
    Record(AuditEvent, Reply),
    Close(mpsc::SyncSender<Result<(), AuditError>>),
    /// The last handle was dropped without `close` (treated like a crash).
    Abandon,
    /// From the committer: the job in flight is done.
    Synced(Done),
}

pub(super) enum Reply {
    Async(tokio::sync::oneshot::Sender<Result<RecordReceipt, AuditError>>),
    Blocking(mpsc::SyncSender<Result<RecordReceipt, AuditError>>),
    /// Nobody waits ([`AuditLog::record_nowait`]); a failure is logged.
    Detached(EventKind),
}

impl Reply {
    pub(super) fn send(self, r: Result<RecordReceipt, AuditError>) {
        // A caller that went away (request cancelled) is not an error here.
        match self {
            Reply::Async(tx) => drop(tx.send(r)),
            Reply::Blocking(tx) => drop(tx.send(r)),
            Reply::Detached(kind) => {
                if let Err(e) = r {
                    tracing::error!(event = kind.as_str(), error = %e, "audit: event not recorded");
                }
            }
        }
    }
}

impl AuditLog {
    /// Opens (or creates) the trail in `cfg.dir`: takes its lock, seals leftover
    /// full segments, cuts a torn tail (recording `audit.recovered`), writes
    /// `server.started` and a checkpoint, purges expired sealed segments, and
    /// starts the writer. Fails if any of that cannot be made durable.
    pub fn open(cfg: AuditLogSettings) -> Result<AuditLog, AuditError> {
        Self::open_as(cfg, None)
    }

    /// [`AuditLog::open`] for a short administrative session of a command-line
    /// tool (e.g. `salus keys` when no server holds the trail): the
    /// `server.started` / `server.stopped` records that bracket the session
    /// carry `detail.session = tool`.
    pub fn open_tool(cfg: AuditLogSettings, tool: &str) -> Result<AuditLog, AuditError> {
        Self::open_as(cfg, Some(tool.to_string()))
    }

    fn open_as(cfg: AuditLogSettings, session: Option<String>) -> Result<AuditLog, AuditError> {
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
            write_failures: AtomicU64::new(0),
            last_durable_ms: AtomicU64::new(0),
            durable_seq: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            inject_failures: 0.into(),
            changes: tokio::sync::watch::channel(0).0,
        });
        let dir = cfg.dir.clone();
        let recovery::Recovered { mut writer, notes, interrupted } =
            Writer::recover(cfg, keys.clone(), shared.clone(), lock)?;
        if let Some(detail) = notes {
            writer.commit_internal(AuditEvent::new(EventKind::AuditRecovered).detail(detail))?;
        }
        // Every inference gets an outcome: those the dead session left open end here.
        for started in &interrupted {
            writer.commit_internal(recovery::interrupted_event(started))?;
        }
        let mut started =
            json!({ "version": env!("CARGO_PKG_VERSION"), "key_id": keys.key_id(), "pid": std::process::id() });
        if let Some(tool) = &session {
            started["session"] = json!(tool);
        }
        writer.session = session;
        writer.commit_internal(AuditEvent::new(EventKind::ServerStarted).detail(started))?;
        writer.purge_expired();
        let ckpt = writer.make_checkpoint();
        write_checkpoint(&writer.cfg, &ckpt).map_err(|e| AuditError::io("writing checkpoint", e))?;
        writer.start_housekeeper();
        let (tx, rx) = mpsc::channel();
        writer.start_committer(tx.clone())?;
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

    /// Queues an event without waiting for it to be durable; a failure is
    /// logged. For notices that must not block the caller. Records stay in
    /// queue order: anything recorded after this call is committed after this
    /// event.
    pub fn record_nowait(&self, event: AuditEvent) -> Result<(), AuditError> {
        let kind = event.kind;
        self.submit(event, Reply::Detached(kind))
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

    /// Why the trail is or is not writable, for metrics and `/ready`.
    pub fn health(&self) -> AuditHealth {
        let last = self.inner.shared.last_durable_ms.load(Ordering::Relaxed);
        AuditHealth {
            healthy: self.is_healthy(),
            closed: self.inner.shared.closed.load(Ordering::Acquire),
            write_failures: self.inner.shared.write_failures.load(Ordering::Relaxed),
            last_durable_unix_ms: (last > 0).then_some(last),
        }
    }

    /// The HMAC the trail stores for a prompt or completion.
    pub fn hmac<T: zeroize::Zeroize + AsRef<[u8]>>(&self, text: &salus_sensitive::Phi<T>) -> TextHmac {
        self.inner.keys.text_hmac(text)
    }

    /// Hex HMAC-SHA256 of `text` under the audit HMAC key (what an auditor searches for).
    pub fn prompt_hmac(&self, text: &[u8]) -> String {
        self.inner.keys.hmac_hex(text)
    }

    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The seq of the newest durable record (0 before the first).
    pub fn durable_seq(&self) -> u64 {
        self.inner.shared.durable_seq.load(Ordering::Acquire)
    }

    /// What the SIEM forwarder reads the trail with: the shared state (for
    /// the durable seq) and the keys. It holds no [`AuditLog`], so that it
    /// neither keeps the writer alive nor changes when the log is dropped.
    pub(crate) fn forward_parts(&self) -> (Arc<Shared>, Arc<AuditKeys>) {
        (self.inner.shared.clone(), self.inner.keys.clone())
    }

    /// Wakes a shipper of the trail (`salus_backup::ship`) whenever a segment
    /// has been sealed or a checkpoint written. Like the forwarder, the
    /// receiver holds no [`AuditLog`].
    pub fn changes(&self) -> TrailChanges {
        TrailChanges(self.inner.shared.changes.subscribe())
    }

    /// The trail's derived keys (for `key_baseline`'s MAC).
    pub fn audit_keys(&self) -> &AuditKeys {
        &self.inner.keys
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
    /// Only in test builds and with the `test-hooks` feature.
    #[cfg(any(test, feature = "test-hooks"))]
    pub fn inject_write_failures(&self, count: u32) {
        self.inner.shared.inject_failures.store(count, Ordering::SeqCst);
    }
}

/// Notice of sealed segments and new checkpoints ([`AuditLog::changes`]).
pub struct TrailChanges(tokio::sync::watch::Receiver<u64>);

impl TrailChanges {
    /// Waits until a segment is sealed or a checkpoint written after the last
    /// call; `false` once the log is gone (nothing more will change).
    pub async fn changed(&mut self) -> bool {
        self.0.changed().await.is_ok()
    }
}

/// The trail's health, as [`AuditLog::health`] reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditHealth {
    /// Records can be written (false: fail closed — every inference is refused).
    pub healthy: bool,
    /// The log was closed (shutdown).
    pub closed: bool,
    /// Writes or syncs that failed since the log was opened.
    pub write_failures: u64,
    /// When a record last became durable (unix ms); `None` before the first.
    pub last_durable_unix_ms: Option<u64>,
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

pub(super) enum Job {
    Seal(u64),
    Checkpoint(Checkpoint),
}

struct Writer {
    cfg: AuditLogSettings,
    keys: Arc<AuditKeys>,
    shared: Arc<Shared>,
    _lock: File,
    seg: OpenSegment,
    /// Where the next encoded record goes in the chain (may run ahead of `durable`).
    next_seq: u64,
    last_hash: [u8; 32],
    /// The chain position up to which records are durable.
    durable: ChainPos,
    buf: Vec<u8>,
    since_ckpt: u64,
    last_ckpt: Instant,
    last_purge: Instant,
    house: Option<(mpsc::Sender<Job>, JoinHandle<()>)>,
    /// The committer: job sender and thread. `None` before start and after stop.
    committer: Option<(mpsc::Sender<sync::Job>, JoinHandle<()>)>,
    /// Whether a job is with the committer.
    in_flight: bool,
    /// Encoded, not yet handed to the committer.
    pending: Vec<Chunk>,
    /// Emptied buffers returned by the committer.
    spare: Vec<Vec<u8>>,
    /// Commands that arrived while draining for maintenance (handled after it).
    deferred: std::collections::VecDeque<Cmd>,
    /// Group-commit pacing: when the first pending record was encoded, how many
    /// records the last job carried, and the recent time of one write + sync.
    pending_since: Option<Instant>,
    last_job_records: usize,
    sync_ewma: Duration,
    /// The tool of an administrative session ([`AuditLog::open_tool`]).
    session: Option<String>,
}

impl Writer {
    fn start_committer(&mut self, done: mpsc::Sender<Cmd>) -> Result<(), AuditError> {
        let (tx, rx) = mpsc::channel::<sync::Job>();
        let shared = self.shared.clone();
        let handle = std::thread::Builder::new()
            .name("salus-audit-commit".into())
            .spawn(move || sync::run(rx, done, shared))
            .map_err(|e| AuditError::io("starting the audit commit thread", e))?;
        self.committer = Some((tx, handle));
        Ok(())
    }

    fn stop_committer(&mut self) {
        if let Some((tx, handle)) = self.committer.take() {
            drop(tx);
            let _ = handle.join();
        }
    }

    /// The event loop: encode records as they arrive, hand the encoded batch to
    /// the committer whenever it is idle, act on its results.
    fn run(mut self, rx: mpsc::Receiver<Cmd>) {
        loop {
            let busy = self.in_flight || self.pending.is_empty();
            let cmd = if let Some(c) = self.deferred.pop_front() {
                Some(c)
            } else if busy {
                match rx.recv_timeout(TICK) {
                    Ok(c) => Some(c),
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        if !self.in_flight && self.pending.is_empty() {
                            if !self.shared.healthy.load(Ordering::Acquire) {
                                self.probe();
                            }
                            self.maintain(&rx);
                        }
                        continue;
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => return self.shutdown(&rx),
                }
            } else if let Some(wait) = self.linger() {
                // The committer is idle, but fewer records are pending than the
                // last batch had: its callers are likely about to send their
                // next ones. Waiting a fraction of one sync for them beats making
                // them wait a whole extra sync behind a small batch.
                rx.recv_timeout(wait).ok()
            } else {
                // The committer is idle and records are encoded: take what else
                // is already queued (bounded by one chunk), then hand the batch
                // over. Measured: draining first gives fewer, larger commits and
                // about twice the throughput at 512+ recorders on 2 cores than
                // handing over at once.
                rx.try_recv().ok()
            };
            match cmd {
                Some(Cmd::Record(ev, reply)) => self.encode(ev, reply),
                Some(Cmd::Synced(done)) => {
                    self.synced(done);
                    if self.maintenance_due() {
                        self.maintain(&rx);
                    }
                }
                Some(Cmd::Close(reply)) => {
                    self.drain(&rx);
                    let r = self.close();
                    let _ = reply.send(r);
                    return;
                }
                Some(Cmd::Abandon) => return self.shutdown(&rx),
                None => self.submit(),
            }
            if !self.in_flight && self.pending.len() > 1 {
                self.submit(); // a full chunk is waiting: no reason to hold it
            }
        }
    }

    /// Stops without `server.stopped` (last handle dropped, or like a crash):
    /// the job in flight still completes and answers its callers.
    fn shutdown(&mut self, rx: &mpsc::Receiver<Cmd>) {
        self.drain(rx);
        self.stop_committer();
        self.stop_housekeeper();
    }

    /// How long to keep collecting before handing the pending batch over, if at
    /// all: while it has fewer records than the last job, for at most half of a
    /// recent sync (capped at 1 ms). Never for a lone recorder (last job of 1).
    fn linger(&self) -> Option<Duration> {
        let pending: usize = self.pending.iter().map(|c| c.replies.len()).sum();
        if pending >= self.last_job_records || self.pending.len() > 1 {
            return None;
        }
        let budget = (self.sync_ewma / 2).min(Duration::from_millis(1));
        let waited = self.pending_since.map_or(Duration::ZERO, |t| t.elapsed());
        budget.checked_sub(waited).filter(|d| !d.is_zero())
    }

    /// Encodes one record onto the pending batch; answers at once if it cannot
    /// be encoded (too large).
    fn encode(&mut self, ev: AuditEvent, reply: Reply) {
        if self.pending.is_empty() {
            self.pending_since = Some(Instant::now());
        }
        let full = self.pending.last().is_none_or(|c| c.buf.len() >= MAX_WRITE || c.replies.len() >= MAX_BATCH);
        if full {
            let mut buf = self.spare.pop().unwrap_or_default();
            buf.clear();
            let start = ChainPos { next_seq: self.next_seq, last_hash: self.last_hash };
            self.pending.push(Chunk { buf, replies: Vec::new(), start });
        }
        let chunk = self.pending.last_mut().expect("a chunk was just ensured");
        match append_record(
            &mut chunk.buf,
            &self.seg,
            &self.cfg.instance,
            ev,
            (&mut self.next_seq, &mut self.last_hash),
        ) {
            Ok(receipt) => chunk.replies.push((receipt, reply)),
            Err(e) => reply.send(Err(e)),
        }
        if chunk.replies.is_empty() && chunk.buf.is_empty() {
            let c = self.pending.pop().expect("the chunk just used");
            self.spare.push(c.buf);
        }
    }

    /// Hands every pending chunk to the committer (which must be idle).
    fn submit(&mut self) {
        if self.in_flight || self.pending.is_empty() {
            return;
        }
        if self.seg.dirty {
            // A failed write may have left bytes past the durable end: cut them first.
            if let Err(e) = self.seg.file.set_len(self.seg.len) {
                self.fail_pending(&e);
                return;
            }
            self.seg.dirty = false;
        }
        self.last_job_records = self.pending.iter().map(|c| c.replies.len()).sum();
        self.pending_since = None;
        let job =
            sync::Job { file: self.seg.file.clone(), offset: self.seg.len, chunks: std::mem::take(&mut self.pending) };
        match &self.committer {
            Some((tx, _)) => match tx.send(job) {
                Ok(()) => self.in_flight = true,
                Err(mpsc::SendError(job)) => {
                    self.pending = job.chunks;
                    self.fail_pending(&std::io::Error::other("audit commit thread stopped"));
                }
            },
            None => {
                self.pending = job.chunks;
                self.fail_pending(&std::io::Error::other("audit commit thread not running"));
            }
        }
    }

    /// Fails every pending record and rolls the chain back to before them.
    fn fail_pending(&mut self, e: &std::io::Error) {
        self.shared.write_failed();
        if let Some(first) = self.pending.first() {
            (self.next_seq, self.last_hash) = (first.start.next_seq, first.start.last_hash);
        }
        for mut chunk in self.pending.drain(..) {
            for (_, reply) in chunk.replies.drain(..) {
                let err = std::io::Error::new(e.kind(), e.to_string());
                reply.send(Err(AuditError::io("committing batch", err)));
            }
            chunk.buf.clear();
            self.spare.push(chunk.buf);
        }
    }

    /// The committer finished a job.
    fn synced(&mut self, done: Done) {
        self.in_flight = false;
        if !done.sync_time.is_zero() {
            self.sync_ewma = (self.sync_ewma * 7 + done.sync_time) / 8;
        }
        self.seg.len += done.written;
        self.seg.records += done.records;
        self.since_ckpt += done.records;
        self.durable.next_seq += done.records;
        self.spare.extend(done.spare);
        self.spare.truncate(4);
        match done.failed_at {
            None => {
                if done.records > 0 {
                    self.shared.durable_now();
                }
                if self.pending.is_empty() {
                    self.durable.last_hash = self.last_hash;
                } else {
                    self.durable.last_hash = self.pending[0].start.last_hash;
                }
            }
            Some(at) => {
                self.seg.dirty = true;
                self.durable = at;
                // What was encoded meanwhile chains onto the failed records: fail it too.
                let e = std::io::Error::other("an earlier write of the batch failed");
                self.fail_pending(&e);
                (self.next_seq, self.last_hash) = (at.next_seq, at.last_hash);
            }
        }
        debug_assert_eq!(self.durable.next_seq, self.pending.first().map_or(self.next_seq, |c| c.start.next_seq));
    }

    /// Hands over what is pending and waits until nothing is in flight or
    /// pending. Records arriving meanwhile are kept for later, not encoded.
    fn drain(&mut self, rx: &mpsc::Receiver<Cmd>) {
        loop {
            self.submit();
            if !self.in_flight {
                return;
            }
            match rx.recv() {
                Ok(Cmd::Synced(done)) => self.synced(done),
                Ok(other) => self.deferred.push_back(other),
                Err(_) => {
                    // Cannot happen while the committer holds a sender; be safe.
                    self.in_flight = false;
                    return;
                }
            }
        }
    }

    /// Commits one event of the log's own (server.*, audit.*), synchronously.
    /// Only called with nothing in flight or pending.
    fn commit_internal(&mut self, ev: AuditEvent) -> Result<RecordReceipt, AuditError> {
        debug_assert!(!self.in_flight && self.pending.is_empty());
        let (seq0, hash0) = (self.next_seq, self.last_hash);
        self.buf.clear();
        let mut buf = std::mem::take(&mut self.buf);
        let r = append_record(&mut buf, &self.seg, &self.cfg.instance, ev, (&mut self.next_seq, &mut self.last_hash));
        self.buf = buf;
        let receipt = r?;
        self.flush(1).inspect_err(|_| (self.next_seq, self.last_hash) = (seq0, hash0))?;
        self.durable = ChainPos { next_seq: self.next_seq, last_hash: self.last_hash };
        self.shared.durable_through(receipt.seq);
        Ok(receipt)
    }

    /// Writes the buffer at the durable end of the segment and syncs it.
    fn flush(&mut self, records: u64) -> Result<(), AuditError> {
        let r = self.write_buf();
        match &r {
            Ok(()) => {
                self.seg.records += records;
                self.since_ckpt += records;
                self.shared.healthy.store(true, Ordering::Release);
                self.shared.durable_now();
            }
            Err(e) => {
                self.shared.write_failed();
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
        sync::write_and_sync(&self.seg.file, &self.buf, self.seg.len, &self.shared)?;
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
                use std::os::unix::fs::OpenOptionsExt;
                let f = std::fs::OpenOptions::new().create(true).truncate(true).write(true).mode(0o600).open(&p)?;
                f.write_all_at(&[0u8; 4096], 0)?;
                f.sync_all()?;
                std::fs::remove_file(&p)
            })()
            .is_ok();
        if ok {
            self.shared.healthy.store(true, Ordering::Release);
        }
    }

    fn close(&mut self) -> Result<(), AuditError> {
        let mut stopped = AuditEvent::new(EventKind::ServerStopped);
        if let Some(tool) = &self.session {
            stopped = stopped.detail(json!({ "session": tool }));
        }
        let r = self.commit_internal(stopped);
        self.stop_committer();
        self.stop_housekeeper();
        let c = self.make_checkpoint();
        r?;
        write_checkpoint(&self.cfg, &c).map_err(|e| AuditError::io("writing the final checkpoint", e))?;
        self.shared.trail_changed();
        Ok(())
    }
}

/// Encodes one record as a frame at the end of `out`: JSON straight into the
/// buffer, chain hash over it, AES-GCM in place. Advances the chain position
/// (`next_seq`, `last_hash`) only on success.
fn append_record(
    out: &mut Vec<u8>,
    seg: &OpenSegment,
    instance: &str,
    ev: AuditEvent,
    (next_seq, last_hash): (&mut u64, &mut [u8; 32]),
) -> Result<RecordReceipt, AuditError> {
    let seq = *next_seq;
    let time = now_rfc3339();
    let event_id = uuid::Builder::from_random_bytes(random_bytes()).into_uuid().to_string();
    let mut prev_hex = [0u8; 64];
    hex_into(last_hash, &mut prev_hex);
    let prev = std::str::from_utf8(&prev_hex).expect("hex is ASCII");
    let start = begin_frame(out);
    let view = RecordView::new(&ev, seq, &time, &event_id, prev, instance);
    serde_json::to_writer(&mut *out, &view).expect("audit records always serialize");
    let len = out.len() - start - FRAME_HEADER_LEN;
    if len > MAX_RECORD {
        out.truncate(start);
        return Err(AuditError::RecordTooLarge { bytes: len, max: MAX_RECORD });
    }
    let hash = leaf_hash(&out[start + FRAME_HEADER_LEN..]);
    seal_frame(&seg.cipher, seg.index, seq, out, start);
    *next_seq += 1;
    *last_hash = hash;
    let mut hash_hex = [0u8; 64];
    hex_into(&hash, &mut hash_hex);
    let hash = String::from_utf8(hash_hex.to_vec()).expect("hex is ASCII");
    Ok(RecordReceipt { seq, event_id, time, hash })
}
