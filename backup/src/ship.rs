//! Continuous off-host retention (`[audit.ship]`): while the server runs, a
//! thread of its own ships the trail to a backup destination as it grows —
//! a newly sealed segment at once, new checkpoints at most every
//! `min_interval` — each shipment one incremental backup made by
//! [`create`], so that the destination is an ordinary backup destination:
//! `salus backup list|verify|restore|checkpoints` work on it, its checkpoints
//! are the external anchor `salus audit verify --checkpoints` needs, and a
//! restart resumes from its newest manifest (only what it lacks is uploaded).
//!
//! Why backups rather than a copy of each file: one format, one verifier and
//! one restore path; every shipment's manifest is signed by the trail's key and
//! chained to the one before, and S3 Object Lock (compliance mode, the
//! retention of the trail) keeps even the server's own credentials from
//! deleting or replacing what was shipped.
//!
//! Never on the request path: a failing destination only makes the shipper
//! retry, waits doubling from 1 s up to `retry_max_backoff`, while the lag
//! grows (the monitor's figures become metrics and a `/ready` warning past
//! `lag_warning`). The retention purge deletes no segment the destination does
//! not hold: the shipper raises a [`PurgeHold`] after each shipment. At
//! shutdown one last shipment (the final checkpoint) is bounded by
//! `shutdown_flush`. Logs carry segment indexes, seqs, counts and the
//! destination's name, never credentials.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use salus_audit::{AuditKeys, AuditLog, Checkpoint, PurgeHold, TrailChanges};
use salus_sensitive::secret::SecretKey;

use crate::create::{create, CreateOptions};
use crate::error::BackupError;
use crate::manifest::Manifest;
use crate::target::{Target, TargetOptions};
use crate::{load_manifest, manifest_numbers, NoProgress};

/// How often the shipper looks at the trail without being woken (a seal
/// made by recovery, a clock-driven retry).
const POLL: Duration = Duration::from_secs(5);
/// The first wait after a failure (then doubling up to `retry_max_backoff`).
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// Least time between two shipments, even for sealed segments.
const MIN_GAP: Duration = Duration::from_secs(1);

/// Where and how to ship the trail.
#[derive(Clone)]
pub struct ShipSettings {
    /// A directory or `s3://bucket/prefix`.
    pub target: String,
    pub target_options: TargetOptions,
    pub audit_dir: PathBuf,
    /// The audit master key (reads the trail, signs the manifests).
    pub audit_key: SecretKey,
    /// The backup key (wraps the data keys) and earlier ones (after a rotation).
    pub backup_key: SecretKey,
    pub previous_backup_keys: Vec<SecretKey>,
    /// This host's name (in the manifests).
    pub instance: String,
    /// Least time between two shipments of new checkpoints alone (a newly
    /// sealed segment ships at once).
    pub min_interval: Duration,
    /// Retry waits double from 1 s up to this.
    pub retry_max_backoff: Duration,
    /// Past this lag the monitor reports `lagging`.
    pub lag_warning: Duration,
    /// At shutdown, time the last shipment may take.
    pub shutdown_flush: Duration,
    /// Objects read, encrypted and uploaded at once.
    pub concurrency: usize,
}

/// Names the destination and the timings; of the keys only their ids.
impl std::fmt::Debug for ShipSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShipSettings")
            .field("target", &self.target)
            .field("target_options", &self.target_options)
            .field("audit_dir", &self.audit_dir)
            .field("backup_key_id", &self.backup_key.key_id())
            .field("min_interval", &self.min_interval)
            .field("retry_max_backoff", &self.retry_max_backoff)
            .field("lag_warning", &self.lag_warning)
            .field("shutdown_flush", &self.shutdown_flush)
            .finish_non_exhaustive()
    }
}

impl ShipSettings {
    /// The defaults: checkpoints at most every 60 s, retries up to every
    /// 60 s, a warning past 15 minutes of lag, 10 s for the last shipment.
    pub fn new(target: &str, audit_dir: &Path, audit_key: SecretKey, backup_key: SecretKey) -> ShipSettings {
        ShipSettings {
            target: target.to_string(),
            target_options: TargetOptions::default(),
            audit_dir: audit_dir.to_path_buf(),
            audit_key,
            backup_key,
            previous_backup_keys: Vec::new(),
            instance: "salus".into(),
            min_interval: Duration::from_secs(60),
            retry_max_backoff: Duration::from_secs(60),
            lag_warning: Duration::from_secs(900),
            shutdown_flush: Duration::from_secs(10),
            concurrency: 4,
        }
    }
}

/// The shipper's figures, shared with its monitor.
#[derive(Default)]
struct State {
    lag_segments: AtomicU64,
    /// Unix ms of the oldest change the destination lacks (0: none).
    unshipped_since_ms: AtomicU64,
    shipped_segment: AtomicU64,
    shipped_seq: AtomicU64,
    shipments: AtomicU64,
    failures: AtomicU64,
    uploaded_objects: AtomicU64,
    uploaded_bytes: AtomicU64,
    failing: AtomicBool,
    lag_warning_secs: u64,
}

/// Reads the shipper's progress (for metrics and `/ready`).
#[derive(Clone)]
pub struct ShipMonitor(Arc<State>);

/// A snapshot of the shipper's progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShipStatus {
    /// Sealed segments the destination does not hold yet.
    pub lag_segments: u64,
    /// Seconds since the oldest change the destination lacks appeared (a
    /// segment sealed, a checkpoint written); 0 when it holds everything.
    pub lag_seconds: u64,
    /// `lag_seconds` is past the warning threshold.
    pub lagging: bool,
    pub lag_warning_secs: u64,
    /// Every segment up to this index is in the destination.
    pub shipped_segment: u64,
    /// The newest shipment covers the trail up to this seq.
    pub shipped_seq: u64,
    /// Shipments (backups) written, and attempts that failed.
    pub shipments: u64,
    pub failures: u64,
    /// Objects and stored bytes uploaded.
    pub uploaded_objects: u64,
    pub uploaded_bytes: u64,
    /// The last attempt failed.
    pub failing: bool,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl ShipMonitor {
    pub fn status(&self) -> ShipStatus {
        let s = &self.0;
        let since = s.unshipped_since_ms.load(Ordering::Acquire);
        let lag_seconds = if since == 0 { 0 } else { now_ms().saturating_sub(since) / 1000 };
        ShipStatus {
            lag_segments: s.lag_segments.load(Ordering::Acquire),
            lag_seconds,
            lagging: lag_seconds > s.lag_warning_secs,
            lag_warning_secs: s.lag_warning_secs,
            shipped_segment: s.shipped_segment.load(Ordering::Acquire),
            shipped_seq: s.shipped_seq.load(Ordering::Acquire),
            shipments: s.shipments.load(Ordering::Acquire),
            failures: s.failures.load(Ordering::Acquire),
            uploaded_objects: s.uploaded_objects.load(Ordering::Acquire),
            uploaded_bytes: s.uploaded_bytes.load(Ordering::Acquire),
            failing: s.failing.load(Ordering::Acquire),
        }
    }
}

/// The running shipper: its thread and the way to stop it.
pub struct Shipper {
    stop: tokio::sync::watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
    monitor: ShipMonitor,
}

impl Shipper {
    /// Opens the destination and starts shipping `log`'s trail on a thread of
    /// its own. `hold` (the one the log was opened with) is raised as the
    /// destination confirms segments. Fails only for a destination that
    /// cannot be opened (a bad name or TLS setting); an unreachable one is
    /// retried.
    pub fn start(log: &AuditLog, settings: ShipSettings, hold: Option<PurgeHold>) -> Result<Shipper, BackupError> {
        let target = Arc::new(Target::open(&settings.target, &settings.target_options)?);
        let state = Arc::new(State { lag_warning_secs: settings.lag_warning.as_secs(), ..State::default() });
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let public_key = hex::encode(AuditKeys::from_master(&settings.audit_key).checkpoint_public_key());
        let run = Run {
            target,
            settings,
            hold,
            state: state.clone(),
            public_key,
            shipped: None,
            checkpoint_since: None,
            last_ship: None,
            failures_in_a_row: 0,
            retry_at: None,
        };
        let changes = log.changes();
        let thread = std::thread::Builder::new()
            .name("salus-audit-ship".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(rt) => rt,
                    Err(e) => {
                        tracing::error!(error = %e, "audit shipping: no runtime; nothing is shipped");
                        return;
                    }
                };
                rt.block_on(run.run(changes, stop_rx));
                // An abandoned shipment's file reads end by themselves; don't wait for them.
                rt.shutdown_timeout(Duration::from_secs(1));
            })
            .map_err(|e| BackupError::io("starting the audit shipping thread", e))?;
        Ok(Shipper { stop, thread: Some(thread), monitor: ShipMonitor(state) })
    }

    pub fn monitor(&self) -> ShipMonitor {
        self.monitor.clone()
    }

    /// Ships what the destination still lacks (bounded by `shutdown_flush`),
    /// then stops. Call after the log is closed, so the final checkpoint goes.
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Shipper {
    fn drop(&mut self) {
        self.halt();
    }
}

/// What the destination holds of the trail (from its newest manifest).
#[derive(Clone, Copy, Debug, Default)]
struct Shipped {
    /// Every segment up to this index (the manifest covers all before its open one).
    segments_through: u64,
    checkpoint_records: u64,
    last_seq: u64,
}

impl Shipped {
    fn of(m: &Manifest) -> Shipped {
        Shipped {
            segments_through: m.trail.last_segment.saturating_sub(1),
            checkpoint_records: m.trail.checkpoint_records,
            last_seq: m.trail.last_seq,
        }
    }
}

/// What the destination lacks right now.
#[derive(Clone, Copy, Debug, Default)]
struct Pending {
    sealed: bool,
    checkpoint: bool,
}

struct Run {
    target: Arc<Target>,
    settings: ShipSettings,
    hold: Option<PurgeHold>,
    state: Arc<State>,
    /// Hex checkpoint public key of the trail (a destination signed by another is refused).
    public_key: String,
    /// `None` until the destination has answered.
    shipped: Option<Shipped>,
    /// When a checkpoint the destination lacks was first seen.
    checkpoint_since: Option<SystemTime>,
    last_ship: Option<Instant>,
    failures_in_a_row: u32,
    retry_at: Option<Instant>,
}

impl Run {
    async fn run(mut self, mut changes: TrailChanges, mut stop: tokio::sync::watch::Receiver<bool>) {
        tracing::info!(destination = %self.target.describe(), "audit shipping started");
        let mut log_alive = true;
        while !*stop.borrow() {
            let deadline = self.step(&mut stop).await;
            tokio::select! {
                alive = changes.changed(), if log_alive => log_alive = alive,
                _ = tokio::time::sleep_until(deadline.into()) => {}
                _ = stop.changed() => {}
            }
        }
        // The last shipment: the final checkpoint (and anything a failure held back).
        let flush = self.settings.shutdown_flush;
        let last = async {
            if self.shipped.is_none() {
                self.learn().await?;
            }
            match self.observe() {
                p if p.sealed || p.checkpoint => self.ship().await,
                _ => Ok(()),
            }
        };
        match tokio::time::timeout(flush, last).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "audit shipping: the last shipment failed"),
            Err(_) => tracing::warn!(
                elapsed_ms = flush.as_millis() as u64,
                "audit shipping: the last shipment did not finish in shutdown_flush_secs; the next start ships it"
            ),
        }
        let s = ShipMonitor(self.state.clone()).status();
        tracing::info!(lag_segments = s.lag_segments, segment = s.shipped_segment, "audit shipping stopped");
    }

    /// Does what is due (learn the destination, ship); returns when to look again.
    async fn step(&mut self, stop: &mut tokio::sync::watch::Receiver<bool>) -> Instant {
        let now = Instant::now();
        let mut next = now + POLL;
        let may_try = self.retry_at.is_none_or(|t| now >= t);
        if self.shipped.is_none() && may_try {
            match self.learn().await {
                Ok(()) => self.recovered(),
                Err(e) => self.failed(&e),
            }
        }
        let pending = self.observe();
        if self.shipped.is_some() && (pending.sealed || pending.checkpoint) {
            // Due once the gap since the last shipment is over and no retry wait runs.
            let gap = if pending.sealed { MIN_GAP } else { self.settings.min_interval };
            let due_at = self.last_ship.map_or(now, |t| t + gap).max(self.retry_at.unwrap_or(now));
            if due_at <= now {
                tokio::select! {
                    r = self.ship() => match r {
                        Ok(()) => self.recovered(),
                        Err(e) => self.failed(&e),
                    },
                    // Stopping: the last shipment starts over, bounded.
                    _ = stop.changed() => return Instant::now(),
                }
            } else {
                next = next.min(due_at);
            }
        }
        // Only instants ahead: nothing due must not make the loop spin.
        if let Some(t) = self.retry_at.filter(|t| *t > Instant::now()) {
            next = next.min(t);
        }
        next
    }

    /// Reads the destination's newest backup: what it holds of the trail.
    async fn learn(&mut self) -> Result<(), BackupError> {
        let (numbers, _) = manifest_numbers(&self.target).await?;
        let newest = match numbers.last() {
            Some(&n) => load_manifest(&self.target, n).await?,
            None => None,
        };
        let shipped = match newest {
            None => Shipped::default(),
            Some(l) => {
                let m = l.parsed.map_err(|p| BackupError::Verification(vec![p]))?.manifest;
                if m.public_key != self.public_key {
                    return Err(BackupError::verification(
                        crate::manifest_name(m.number),
                        "signed by another trail's key: the destination holds another server's backups",
                    ));
                }
                Shipped::of(&m)
            }
        };
        self.confirmed(shipped);
        Ok(())
    }

    /// One shipment: an incremental backup of what the trail holds now.
    async fn ship(&mut self) -> Result<(), BackupError> {
        let s = &self.settings;
        let opts = CreateOptions {
            audit_dir: s.audit_dir.clone(),
            audit_key: s.audit_key.clone(),
            backup_key: s.backup_key.clone(),
            previous_backup_keys: s.previous_backup_keys.clone(),
            key_store: None,
            config_file: None,
            instance: s.instance.clone(),
            concurrency: s.concurrency,
            reuse_sealed: true,
        };
        self.last_ship = Some(Instant::now());
        let before = self.shipped.map_or(0, |s| s.segments_through);
        let r = create(self.target.clone(), opts, Arc::new(NoProgress)).await?;
        let st = &self.state;
        st.shipments.fetch_add(1, Ordering::AcqRel);
        st.uploaded_objects.fetch_add(r.uploaded_objects as u64, Ordering::AcqRel);
        st.uploaded_bytes.fetch_add(r.uploaded_bytes, Ordering::AcqRel);
        if let Some(w) = &r.anchor_warning {
            tracing::warn!(error = %w, "audit shipping: the local record of the newest shipment was not written");
        }
        self.checkpoint_since = None;
        let shipped = Shipped::of(&r.manifest);
        self.confirmed(shipped);
        if shipped.segments_through > before {
            tracing::info!(
                backup = r.number,
                segment = shipped.segments_through,
                records = shipped.last_seq,
                count = r.uploaded_objects,
                bytes = r.uploaded_bytes,
                elapsed_ms = r.elapsed.as_millis() as u64,
                "audit shipping: sealed segments shipped"
            );
        }
        self.observe();
        Ok(())
    }

    /// The destination holds `shipped`: gauges, and the purge may go that far.
    fn confirmed(&mut self, shipped: Shipped) {
        let through = self.shipped.map_or(0, |s| s.segments_through).max(shipped.segments_through);
        self.shipped = Some(Shipped { segments_through: through, ..shipped });
        if let Some(h) = &self.hold {
            h.release_through(through);
        }
        self.state.shipped_segment.store(through, Ordering::Release);
        self.state.shipped_seq.store(shipped.last_seq, Ordering::Release);
    }

    /// Compares the trail with what the destination holds; updates the lag.
    fn observe(&mut self) -> Pending {
        let shipped = self.shipped;
        let local = match scan(&self.settings.audit_dir, shipped.map_or(0, |s| s.segments_through)) {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "audit shipping: cannot read the audit directory");
                return Pending::default();
            }
        };
        let checkpoint = match (local.checkpoint_records, shipped) {
            (Some(r), Some(s)) => r > s.checkpoint_records,
            (Some(_), None) => true,
            (None, _) => false,
        };
        if checkpoint {
            self.checkpoint_since.get_or_insert_with(SystemTime::now);
        } else {
            self.checkpoint_since = None;
        }
        let oldest = local.unshipped.iter().map(|(_, t)| *t).chain(self.checkpoint_since).min();
        let since_ms = oldest.map_or(0, |t| t.duration_since(UNIX_EPOCH).map_or(1, |d| d.as_millis().max(1) as u64));
        self.state.lag_segments.store(local.unshipped.len() as u64, Ordering::Release);
        self.state.unshipped_since_ms.store(since_ms, Ordering::Release);
        Pending { sealed: !local.unshipped.is_empty(), checkpoint }
    }

    fn recovered(&mut self) {
        if self.failures_in_a_row > 0 {
            tracing::info!(attempts = self.failures_in_a_row, "audit shipping: the destination answers again");
        }
        self.failures_in_a_row = 0;
        self.retry_at = None;
        self.state.failing.store(false, Ordering::Release);
    }

    fn failed(&mut self, e: &BackupError) {
        self.failures_in_a_row = self.failures_in_a_row.saturating_add(1);
        let factor = 1u32 << (self.failures_in_a_row - 1).min(16);
        let wait = FIRST_BACKOFF.saturating_mul(factor).min(self.settings.retry_max_backoff);
        self.retry_at = Some(Instant::now() + wait);
        self.state.failures.fetch_add(1, Ordering::AcqRel);
        self.state.failing.store(true, Ordering::Release);
        let retry_ms = wait.as_millis() as u64;
        if e.exit_code() == 3 {
            // Rolled back, foreign or modified: shipping on would hide it. Loud, and retried.
            tracing::error!(error = %e, attempt = self.failures_in_a_row, retry_ms, "audit shipping refused: the destination does not match this trail");
        } else {
            tracing::warn!(error = %e, attempt = self.failures_in_a_row, retry_ms, "audit shipping failed; retrying");
        }
    }
}

/// The trail's state as shipping sees it.
struct Local {
    /// Sealed segments above the shipped watermark, with when they were sealed.
    unshipped: Vec<(u64, SystemTime)>,
    checkpoint_records: Option<u64>,
}

/// Lists the sealed segments above `through` and reads the checkpoint.
fn scan(dir: &Path, through: u64) -> Result<Local, BackupError> {
    let io = |e| BackupError::io(format!("listing {}", dir.display()), e);
    let mut unshipped = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let Some((index, true)) = entry.file_name().to_str().and_then(salus_audit::parse_segment_name) else {
            continue;
        };
        if index <= through {
            continue;
        }
        // Sealed files are written once: their time is the seal's. Purged meanwhile: gone.
        if let Ok(t) = entry.metadata().and_then(|m| m.modified()) {
            unshipped.push((index, t));
        }
    }
    unshipped.sort_unstable_by_key(|(i, _)| *i);
    let checkpoint_records = std::fs::read(dir.join("checkpoint.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<Checkpoint>(&b).ok())
        .map(|c| c.records);
    Ok(Local { unshipped, checkpoint_records })
}

#[cfg(test)]
mod tests;
