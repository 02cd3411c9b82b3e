//! Streaming the trail to a SIEM: every record's metadata, as RFC 5424
//! syslog messages over TLS (RFC 5425), at least once.
//!
//! * **What is sent**: the fields of the FHIR export (kind, seq, time, event
//!   id, action, outcome and reason, principal id/kind/roles, source address,
//!   operation, model id and fingerprint, token counts, latency, request id,
//!   target) as structured data. Never text, never the prompt or completion
//!   HMACs, never a display name, never the free text of `detail` (see
//!   `syslog.rs`, an allow-list).
//! * **Off the hot path**: the forwarder is a thread of its own that tails
//!   the trail files ([`AuditLog::durable_seq`] tells it how far they are
//!   durable). Recording an event does nothing for it beyond updating that
//!   atomic, so a slow or absent collector can never block or slow inference:
//!   the backlog waits on disk, in the trail itself (bounded by retention),
//!   and in memory there is at most one batch.
//! * **At least once**: a durable cursor file holds the seq of the last
//!   record the collector accepted. A batch counts as accepted once it was
//!   written and flushed to the TLS stream and the connection is still open a
//!   moment later ([`CONFIRM_AFTER`]); only then is the cursor moved. After a
//!   broken connection or a restart, forwarding resumes at the cursor + 1, so
//!   nothing is skipped and at most one batch is sent twice. Records arrive in
//!   seq order. (RFC 5425 has no application-level acknowledgment: a
//!   collector that takes bytes off the socket and then loses them before
//!   writing is beyond what any RFC 5425 sender can see.)
//! * **Observable**: [`ForwardMonitor::status`] gives the lag (durable seq −
//!   forwarded seq), records sent, connection failures; the server exports
//!   them as metrics and warns on `/ready` past a lag threshold. The lag is
//!   never a failure: the trail, not the SIEM, is the record.

mod cursor;
mod follow;
mod syslog;
mod transport;

#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

pub use cursor::Cursor;
pub use syslog::{format_message, frame_into, MessageHeader, SD_ID};

use crate::writer::Shared;
use crate::{AuditError, AuditLog};

/// How long a flushed batch must find the connection still open before it
/// counts as accepted (a collector that died with it unread resets or closes
/// the connection well within this on any LAN).
pub const CONFIRM_AFTER: Duration = Duration::from_millis(100);
/// Most records per batch.
pub const MAX_BATCH_RECORDS: usize = 10_000;
const FIRST_BACKOFF: Duration = Duration::from_millis(250);

/// Errors starting the forwarder. Messages name keys, files and seqs, never
/// record contents or key material.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// An invalid setting.
    #[error("audit forward config: {0}")]
    Config(String),
    /// The TLS setup (CA file, client certificate or key) is unusable.
    #[error("audit forward TLS: {0}")]
    Tls(String),
    /// The cursor file cannot be read or written.
    #[error("audit forward cursor {path}: {source}")]
    Cursor {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The cursor file holds something other than a seq.
    #[error("audit forward cursor {path} does not hold a seq; delete it to forward the whole trail again")]
    CursorInvalid { path: String },
    /// The cursor is past the end of the trail: it belongs to another trail.
    #[error("audit forward cursor {path} is at seq {cursor} but the trail ends at seq {trail}: it belongs to another trail; delete it to forward this trail from its start")]
    CursorAhead { path: String, cursor: u64, trail: u64 },
    /// The forwarder thread could not be started.
    #[error("audit forward: starting its thread: {0}")]
    Thread(#[source] std::io::Error),
}

impl ForwardError {
    pub(crate) fn cursor(path: &std::path::Path, source: std::io::Error) -> Self {
        ForwardError::Cursor { path: path.display().to_string(), source }
    }
}

/// Where and how to forward.
#[derive(Clone, Debug)]
pub struct ForwardSettings {
    /// The collector's host name or IP address…
    pub host: String,
    /// …and TCP port (6514 is syslog over TLS).
    pub port: u16,
    /// The name the collector's certificate must carry; `None`: `host`.
    pub server_name: Option<String>,
    /// PEM CA certificates trusted for the collector; `None`: the system's roots.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate chain and key, for collectors that require mTLS.
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    /// The cursor file (last accepted seq).
    pub cursor_file: PathBuf,
    /// Most records per batch (1..=[`MAX_BATCH_RECORDS`]): also the most
    /// sent twice after a broken connection.
    pub batch_records: usize,
    /// Lag (records) past which [`ForwardStatus::lagging`] is set.
    pub lag_warning_records: u64,
    /// Reconnection waits double from 250 ms up to this.
    pub reconnect_max_backoff: Duration,
    /// At shutdown, how long [`Forwarder::stop`] keeps forwarding what is durable.
    pub shutdown_flush: Duration,
    /// APP-NAME and HOSTNAME of the messages.
    pub header: MessageHeader,
    /// How often the trail is checked for new records.
    pub poll_interval: Duration,
}

impl ForwardSettings {
    /// The defaults for `target` (`host:port`): 500-record batches, a lag
    /// warning at 10,000 records, reconnection backoff up to 30 s, 5 s to
    /// flush at shutdown, a 200 ms poll, APP-NAME `salus`, HOSTNAME the
    /// record's instance.
    pub fn new(target: &str, cursor_file: impl Into<PathBuf>) -> Result<Self, ForwardError> {
        let (host, port) = parse_target(target).map_err(ForwardError::Config)?;
        Ok(ForwardSettings {
            host,
            port,
            server_name: None,
            ca_file: None,
            client_cert: None,
            client_key: None,
            cursor_file: cursor_file.into(),
            batch_records: 500,
            lag_warning_records: 10_000,
            reconnect_max_backoff: Duration::from_secs(30),
            shutdown_flush: Duration::from_secs(5),
            header: MessageHeader::default(),
            poll_interval: Duration::from_millis(200),
        })
    }

    /// `host:port` (IPv6 in brackets).
    pub fn target(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// Parses `host:port`, `a.b.c.d:port` or `[v6]:port`.
pub fn parse_target(s: &str) -> Result<(String, u16), String> {
    let bad = || format!("'{s}' is not host:port (e.g. siem.hospital.example:6514 or [2001:db8::1]:6514)");
    let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
    let host = match host.strip_prefix('[') {
        Some(h) => h.strip_suffix(']').filter(|h| h.parse::<std::net::Ipv6Addr>().is_ok()).ok_or_else(bad)?,
        None if host.contains(':') => return Err(bad()),
        None => host,
    };
    let name_ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':');
    if host.is_empty() || host.len() > 253 || !host.chars().all(name_ok) {
        return Err(bad());
    }
    let port = port.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(bad)?;
    Ok((host.to_string(), port))
}

/// Counters shared by the forwarder thread and its monitors.
struct Stats {
    shared: Arc<Shared>,
    target: String,
    lag_warning: u64,
    confirmed: AtomicU64,
    sent: AtomicU64,
    failures: AtomicU64,
    connected: AtomicBool,
    skipped: AtomicU64,
}

/// A cheap, cloneable view of a forwarder's progress (metrics, `/ready`).
#[derive(Clone)]
pub struct ForwardMonitor(Arc<Stats>);

/// A forwarder's progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ForwardStatus {
    /// The last seq the collector accepted (the cursor).
    pub forwarded_seq: u64,
    /// The newest durable seq of the trail.
    pub durable_seq: u64,
    /// `durable_seq - forwarded_seq`.
    pub lag_records: u64,
    /// The threshold of `lagging`.
    pub lag_warning_records: u64,
    /// The lag is past the threshold (a warning, not a failure).
    pub lagging: bool,
    /// Records written to the collector since start (re-sends included).
    pub sent_records: u64,
    /// Connections that could not be made or broke.
    pub connection_failures: u64,
    /// A connection is up now.
    pub connected: bool,
    /// Records purged by retention before they could be forwarded.
    pub skipped_records: u64,
}

impl ForwardMonitor {
    pub fn status(&self) -> ForwardStatus {
        let s = &self.0;
        let forwarded = s.confirmed.load(Ordering::Acquire);
        let durable = s.shared.durable_seq.load(Ordering::Acquire);
        let lag = durable.saturating_sub(forwarded);
        ForwardStatus {
            forwarded_seq: forwarded,
            durable_seq: durable,
            lag_records: lag,
            lag_warning_records: s.lag_warning,
            lagging: lag > s.lag_warning,
            sent_records: s.sent.load(Ordering::Relaxed),
            connection_failures: s.failures.load(Ordering::Relaxed),
            connected: s.connected.load(Ordering::Relaxed),
            skipped_records: s.skipped.load(Ordering::Relaxed),
        }
    }

    /// The collector (`host:port`).
    pub fn target(&self) -> &str {
        &self.0.target
    }
}

/// Stop requests and interruptible waits.
#[derive(Default)]
struct Control {
    /// When set: stop, forwarding what is durable until this deadline.
    deadline: Mutex<Option<Instant>>,
    cv: Condvar,
}

impl Control {
    fn deadline(&self) -> Option<Instant> {
        *self.deadline.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn request_stop(&self, deadline: Instant) {
        let mut g = self.deadline.lock().unwrap_or_else(|p| p.into_inner());
        *g = Some(g.map_or(deadline, |d| d.min(deadline)));
        self.cv.notify_all();
    }

    /// Sleeps `d`, never past the stop deadline; a stop request ends the
    /// wait early (to flush now).
    fn sleep(&self, d: Duration) {
        let mut g = self.deadline.lock().unwrap_or_else(|p| p.into_inner());
        let stopping = g.is_some();
        let mut until = Instant::now() + d;
        if let Some(dl) = *g {
            until = until.min(dl);
        }
        loop {
            let now = Instant::now();
            if now >= until || (!stopping && g.is_some()) {
                return;
            }
            g = self.cv.wait_timeout(g, until - now).unwrap_or_else(|p| p.into_inner()).0;
        }
    }
}

/// The running forwarder. [`Forwarder::stop`] flushes and ends it; dropping
/// it stops it without waiting.
pub struct Forwarder {
    monitor: ForwardMonitor,
    control: Arc<Control>,
    done: mpsc::Receiver<()>,
    handle: Option<std::thread::JoinHandle<()>>,
    shutdown_flush: Duration,
}

impl Forwarder {
    /// Checks the settings (TLS files, cursor), then starts forwarding `log`'s
    /// trail from the cursor + 1 (the trail's first record when there is no
    /// cursor yet) on a thread of its own. The collector need not be up: the
    /// thread connects, and reconnects, on its own.
    pub fn start(log: &AuditLog, settings: ForwardSettings) -> Result<Forwarder, ForwardError> {
        if !(1..=MAX_BATCH_RECORDS).contains(&settings.batch_records) {
            return Err(ForwardError::Config(format!("batch_records must be 1 to {MAX_BATCH_RECORDS}")));
        }
        if settings.poll_interval.is_zero() || settings.reconnect_max_backoff.is_zero() {
            return Err(ForwardError::Config("intervals must be positive".into()));
        }
        let client_auth = match (&settings.client_cert, &settings.client_key) {
            (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
            (None, None) => None,
            _ => return Err(ForwardError::Config("client_cert and client_key go together".into())),
        };
        let tls = transport::client_config(settings.ca_file.as_deref(), client_auth)?;
        let name = transport::server_name(settings.server_name.as_deref().unwrap_or(&settings.host))?;
        let cursor = Cursor::new(&settings.cursor_file);
        let confirmed = cursor.load()?;
        let (shared, keys) = log.forward_parts();
        let durable = shared.durable_seq.load(Ordering::Acquire);
        if confirmed > durable {
            let path = cursor.path().display().to_string();
            return Err(ForwardError::CursorAhead { path, cursor: confirmed, trail: durable });
        }
        let target = settings.target();
        let stats = Arc::new(Stats {
            shared,
            target: target.clone(),
            lag_warning: settings.lag_warning_records,
            confirmed: AtomicU64::new(confirmed),
            sent: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            connected: AtomicBool::new(false),
            skipped: AtomicU64::new(0),
        });
        let control = Arc::new(Control::default());
        let shutdown_flush = settings.shutdown_flush;
        let worker = Worker {
            follower: follow::Follower::new(log.dir(), keys, confirmed + 1),
            settings,
            tls,
            name,
            cursor,
            stats: stats.clone(),
            control: control.clone(),
            conn: None,
            pending: None,
            backoff: FIRST_BACKOFF,
            failing: false,
            buf: Vec::new(),
        };
        let (done_tx, done) = mpsc::channel();
        let handle = std::thread::Builder::new()
            .name("salus-audit-forward".into())
            .spawn(move || {
                worker.run();
                let _ = done_tx.send(());
            })
            .map_err(ForwardError::Thread)?;
        tracing::info!(collector = %target, from_seq = confirmed + 1, "audit forward: started");
        Ok(Forwarder { monitor: ForwardMonitor(stats), control, done, handle: Some(handle), shutdown_flush })
    }

    pub fn monitor(&self) -> ForwardMonitor {
        self.monitor.clone()
    }

    /// Forwards what is durable now, for at most the shutdown bound, then
    /// closes the connection and ends the thread. Call it after the log is
    /// closed, so that `server.stopped` goes too.
    pub fn stop(mut self) -> ForwardStatus {
        self.control.request_stop(Instant::now() + self.shutdown_flush);
        // The thread may be inside one connect or write (bounded by their timeouts).
        match self.done.recv_timeout(self.shutdown_flush + Duration::from_secs(15)) {
            Ok(()) => {
                if let Some(h) = self.handle.take() {
                    let _ = h.join();
                }
            }
            Err(_) => tracing::warn!("audit forward: the forwarder did not stop in time; leaving it"),
        }
        let status = self.monitor.status();
        tracing::info!(
            forwarded_seq = status.forwarded_seq,
            lag_records = status.lag_records,
            "audit forward: stopped"
        );
        status
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.control.request_stop(Instant::now());
    }
}

/// A batch written to the connection, not yet accepted.
struct Pending {
    last: u64,
    flushed: Instant,
}

enum Step {
    /// More to do at once.
    Busy,
    /// Caught up: wait for new records.
    Idle,
    /// Wait this long (a batch being confirmed).
    Wait(Duration),
}

enum Trouble {
    Connect(String),
    Lost(String),
    Trail(AuditError),
    Cursor(ForwardError),
}

struct Worker {
    settings: ForwardSettings,
    tls: Arc<rustls::ClientConfig>,
    name: rustls::pki_types::ServerName<'static>,
    follower: follow::Follower,
    cursor: Cursor,
    stats: Arc<Stats>,
    control: Arc<Control>,
    conn: Option<transport::Connection>,
    pending: Option<Pending>,
    backoff: Duration,
    /// A problem was logged and not yet resolved.
    failing: bool,
    buf: Vec<u8>,
}

impl Worker {
    fn run(mut self) {
        let mut stop_at = None;
        loop {
            if let Some(deadline) = self.control.deadline() {
                // What is durable when the stop is first seen (the caller has
                // closed the log by then: server.stopped included).
                let target = *stop_at.get_or_insert_with(|| self.stats.shared.durable_seq.load(Ordering::Acquire));
                if self.confirmed() >= target || Instant::now() >= deadline {
                    break;
                }
            }
            match self.step() {
                Ok(Step::Busy) => {}
                Ok(Step::Idle) => self.control.sleep(self.settings.poll_interval),
                Ok(Step::Wait(d)) => self.control.sleep(d),
                Err(t) => {
                    self.trouble(t);
                    self.control.sleep(self.backoff);
                    self.backoff = (self.backoff * 2).min(self.settings.reconnect_max_backoff.max(FIRST_BACKOFF));
                }
            }
        }
        self.finish();
    }

    fn confirmed(&self) -> u64 {
        self.stats.confirmed.load(Ordering::Acquire)
    }

    fn step(&mut self) -> Result<Step, Trouble> {
        if self.conn.is_none() {
            let (host, port) = (&self.settings.host, self.settings.port);
            let conn = transport::Connection::open(host, port, &self.tls, &self.name).map_err(Trouble::Connect)?;
            self.conn = Some(conn);
            self.stats.connected.store(true, Ordering::Relaxed);
            tracing::info!(collector = %self.stats.target, resume_seq = self.follower.next_seq(), "audit forward: connected");
        }
        let Some(conn) = self.conn.as_mut() else { return Ok(Step::Idle) };
        if let Some(p) = &self.pending {
            let age = p.flushed.elapsed();
            if age < CONFIRM_AFTER {
                return Ok(Step::Wait(CONFIRM_AFTER - age));
            }
            if !conn.is_open() {
                return Err(Trouble::Lost("the collector closed the connection".into()));
            }
            let last = p.last;
            self.cursor.store(last).map_err(Trouble::Cursor)?;
            self.stats.confirmed.store(last, Ordering::Release);
            self.pending = None;
            if self.failing {
                self.failing = false;
                tracing::info!(collector = %self.stats.target, forwarded_seq = last, "audit forward: delivering again");
            }
            self.backoff = FIRST_BACKOFF;
        }
        let upto = self.stats.shared.durable_seq.load(Ordering::Acquire);
        let records = self.follower.read(upto, self.settings.batch_records).map_err(Trouble::Trail)?;
        self.stats.skipped.store(self.follower.skipped, Ordering::Relaxed);
        let Some(last) = records.last().map(|r| r.seq) else {
            // Caught up. A connection the collector dropped is noticed now,
            // not at the next record.
            if !conn.is_open() {
                return Err(Trouble::Lost("the collector closed the connection".into()));
            }
            self.backoff = FIRST_BACKOFF;
            return Ok(Step::Idle);
        };
        self.buf.clear();
        for r in &records {
            frame_into(&mut self.buf, &format_message(r, &self.settings.header));
        }
        conn.send(&self.buf).map_err(|e| Trouble::Lost(format!("sending: {e}")))?;
        self.stats.sent.fetch_add(records.len() as u64, Ordering::Relaxed);
        self.pending = Some(Pending { last, flushed: Instant::now() });
        Ok(Step::Busy)
    }

    /// Something failed: drop the connection if it is the problem, and go
    /// back to the first record not accepted.
    fn trouble(&mut self, t: Trouble) {
        let collector = &self.stats.target;
        let retry_ms = self.backoff.as_millis() as u64;
        match &t {
            Trouble::Connect(e) => {
                tracing::warn!(collector = %collector, error = %e, retry_ms, "audit forward: cannot connect to the collector")
            }
            Trouble::Lost(e) => {
                tracing::warn!(collector = %collector, error = %e, retry_ms, "audit forward: connection to the collector lost")
            }
            Trouble::Trail(e) => tracing::error!(error = %e, retry_ms, "audit forward: cannot read the audit trail"),
            Trouble::Cursor(e) => tracing::error!(error = %e, retry_ms, "audit forward: cannot write the cursor"),
        }
        self.failing = true;
        if matches!(t, Trouble::Connect(_) | Trouble::Lost(_)) {
            self.stats.failures.fetch_add(1, Ordering::Relaxed);
            self.conn = None;
            self.stats.connected.store(false, Ordering::Relaxed);
        }
        // Everything after the cursor goes again (at most the one batch that
        // was pending), skipping only what retention has purged.
        self.pending = None;
        let resume = (self.confirmed() + 1).max(self.follower.skipped_to);
        self.follower.seek(resume);
    }

    /// At the end: a batch in flight counts if the connection is still open
    /// a moment later; then the session is closed.
    fn finish(mut self) {
        if let (Some(p), Some(conn)) = (self.pending.take(), self.conn.as_mut()) {
            if let Some(wait) = CONFIRM_AFTER.checked_sub(p.flushed.elapsed()) {
                std::thread::sleep(wait);
            }
            if conn.is_open() && self.cursor.store(p.last).is_ok() {
                self.stats.confirmed.store(p.last, Ordering::Release);
            }
        }
        if let Some(c) = self.conn.take() {
            c.close();
        }
        self.stats.connected.store(false, Ordering::Relaxed);
    }
}
