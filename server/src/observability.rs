//! The one place that configures tracing for the whole process.
//!
//! * Only allowlisted field names are ever written (request id, principal id,
//!   route template, status, counts, durations, …); every other field of every
//!   event — ours or a dependency's — is dropped, at every level including TRACE.
//!   Span fields are not recorded at all.
//! * Crates that can log bytes or headers (hyper, h2, rustls, tower, …) are
//!   capped at INFO whatever `RUST_LOG` says.
//! * A panic hook records only the panic's location and the request id; the
//!   payload (which may quote request data) is never formatted.
//!
//! Output is one line per event, `text` or `json`, to stderr or an append-only
//! log file whose directory must not be world-readable.

use std::fmt;
use std::path::Path;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// Field names that may appear in a log line.
pub const ALLOWED_FIELDS: &[&str] = &[
    "message",
    "request_id",
    "principal",
    "principal_kind",
    "key_id",
    "route",
    "method",
    "status",
    "error",
    "prompt_tokens",
    "completion_tokens",
    "duration_ms",
    "failed",
    "model",
    "fingerprint",
    "sealed",
    "listen",
    "addr",
    "tls",
    "mtls",
    "connections",
    "location",
    "path",
    "count",
    "seqs",
    "tokens",
    "queue",
    "running",
    "step",
    "elapsed_ms",
    "version",
    // Operational numbers and settings (operator data, never request data).
    "dir",
    "segment",
    "blocks",
    "events",
    "open_files_limit",
    "suppressed",
    "refused_total",
    "locked_bytes",
    "lock_failed_bytes",
    "excluded_from_dumps_bytes",
    "memlock_limit",
    "needed_bytes",
    "free_bytes",
    "warning_bytes",
    "kv_blocks",
    "block_size",
    "kv_dtype",
    "capacity_tokens",
    "max_prefill_tokens",
    "max_admissions_per_step",
    "prefix_cache",
    "prefix_cache_idle_secs",
    "kv_prefault",
    // Access control (operator configuration and fixed names, never request data).
    "issuer",
    "rule",
    "attempt",
    "attempts",
    "why",
    "records",
    // Off-host shipping ([audit.ship]): the destination's name (no credentials) and counts.
    "destination",
    "backup",
    "bytes",
    "retry_ms",
    "lag_segments",
];

/// Crates known to log bytes, headers or rejection texts below INFO: always
/// capped at INFO.
pub const CAPPED_TARGETS: &[&str] =
    &["hyper", "hyper_util", "h2", "rustls", "tokio_rustls", "tower", "tower_http", "reqwest", "axum"];

/// Salus' own crates: the only targets that may log below INFO. Every other
/// target (any dependency, present or future, including `log` records bridged
/// into tracing) is capped at INFO too, so a new dependency cannot start
/// writing request data at DEBUG/TRACE.
pub const OWN_TARGETS: &[&str] = &["salus", "salus_server", "salus_models", "salus_kernels"];

/// Errors setting up logging.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("invalid log level filter: {0}")]
    Filter(String),
    #[error("log file {path}: {reason}")]
    File { path: String, reason: String },
    #[error("a global tracing subscriber is already installed")]
    AlreadySet,
}

#[derive(Default)]
struct AllowVisitor {
    fields: Vec<(&'static str, serde_json::Value)>,
}

impl AllowVisitor {
    fn push(&mut self, field: &Field, v: serde_json::Value) {
        if ALLOWED_FIELDS.contains(&field.name()) {
            self.fields.push((field.name(), v));
        }
    }
}

impl Visit for AllowVisitor {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.push(field, serde_json::json!(value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.push(field, value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.push(field, value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.push(field, value.into());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.push(field, value.into());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if ALLOWED_FIELDS.contains(&field.name()) {
            self.fields.push((field.name(), format!("{value:?}").into()));
        }
    }
}

/// Formats events with allowlisted fields only.
pub struct SafeFormat {
    pub json: bool,
}

impl SafeFormat {
    /// Formats one event into a line (without the newline).
    pub fn line(&self, level: &Level, target: &str, event: &Event<'_>) -> String {
        let mut v = AllowVisitor::default();
        event.record(&mut v);
        let ts =
            time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).unwrap_or_default();
        if self.json {
            let mut m = serde_json::Map::new();
            m.insert("ts".into(), ts.into());
            m.insert("level".into(), level.as_str().into());
            m.insert("target".into(), target.into());
            for (k, val) in v.fields {
                m.insert(k.into(), val);
            }
            serde_json::Value::Object(m).to_string()
        } else {
            let mut s = format!("{ts} {:>5} {target}:", level.as_str());
            if let Some((_, msg)) = v.fields.iter().find(|(k, _)| *k == "message") {
                s.push(' ');
                s.push_str(msg.as_str().unwrap_or_default());
            }
            for (k, val) in v.fields.iter().filter(|(k, _)| *k != "message") {
                match val {
                    serde_json::Value::String(t) => s.push_str(&format!(" {k}={t:?}")),
                    other => s.push_str(&format!(" {k}={other}")),
                }
            }
            s
        }
    }
}

impl<S, N> FormatEvent<S, N> for SafeFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, _ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let meta = event.metadata();
        writeln!(writer, "{}", self.line(meta.level(), meta.target(), event))
    }
}

/// Span fields are never recorded: the fmt layer would otherwise format every
/// span's fields (all of them, allowlisted or not) into a string kept with the
/// span. Nothing prints them, but PHI must not be copied around either.
pub struct NoSpanFields;

impl<'w> FormatFields<'w> for NoSpanFields {
    fn format_fields<R: tracing_subscriber::field::RecordFields>(&self, _: Writer<'w>, _: R) -> fmt::Result {
        Ok(())
    }
}

fn in_crate(target: &str, krate: &str) -> bool {
    target == krate || target.strip_prefix(krate).is_some_and(|r| r.starts_with("::"))
}

/// Whether events of `target` are limited to INFO and above.
fn capped(target: &str) -> bool {
    CAPPED_TARGETS.iter().any(|c| in_crate(target, c)) || !OWN_TARGETS.iter().any(|c| in_crate(target, c))
}

/// Refuses a directory that other users can read, write or enter (mode &
/// 0o007): logs and audit trails are private. Entering alone would be enough to
/// read a file of known name, so `o+x` is refused too.
pub fn check_private_dir(dir: &Path) -> Result<(), String> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(dir).map_err(|e| e.to_string())?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o007 != 0 {
            return Err(format!(
                "directory {} is world-readable or accessible to other users (mode {mode:o}); run: chmod o-rwx {}",
                dir.display(),
                dir.display()
            ));
        }
    }
    let _ = dir;
    Ok(())
}

/// Refuses an existing log file that other users can access (a file created
/// here is 0600; one left from an earlier setup may not be).
fn check_private_file(file: &std::fs::File) -> Result<(), String> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = file.metadata().map_err(|e| e.to_string())?.permissions().mode() & 0o777;
        if mode & 0o007 != 0 {
            return Err(format!("the file is accessible to other users (mode {mode:o}); run: chmod o-rwx on it"));
        }
    }
    let _ = file;
    Ok(())
}

/// Installs the global subscriber and the panic hook. `level` is used unless
/// `RUST_LOG` is set.
pub fn init(format: &str, level: &str, file: Option<&Path>) -> Result<(), LogError> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.trim().is_empty() => EnvFilter::try_new(v),
        _ => EnvFilter::try_new(level),
    }
    .map_err(|e| LogError::Filter(e.to_string()))?;
    let cap = tracing_subscriber::filter::filter_fn(|meta| !(capped(meta.target()) && *meta.level() > Level::INFO));
    let json = format == "json";
    let registry = tracing_subscriber::registry().with(filter).with(cap);
    let result = match file {
        Some(path) => {
            let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
            check_private_dir(dir).map_err(|reason| LogError::File { path: path.display().to_string(), reason })?;
            let mut opts = std::fs::OpenOptions::new();
            opts.create(true).append(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                opts.mode(0o600);
            }
            let f = opts
                .open(path)
                .map_err(|e| LogError::File { path: path.display().to_string(), reason: e.to_string() })?;
            check_private_file(&f).map_err(|reason| LogError::File { path: path.display().to_string(), reason })?;
            let layer = tracing_subscriber::fmt::layer()
                .fmt_fields(NoSpanFields)
                .event_format(SafeFormat { json })
                .with_ansi(false)
                .with_writer(std::sync::Mutex::new(f));
            registry.with(layer).try_init()
        }
        None => {
            let layer = tracing_subscriber::fmt::layer()
                .fmt_fields(NoSpanFields)
                .event_format(SafeFormat { json })
                .with_ansi(false)
                .with_writer(std::io::stderr);
            registry.with(layer).try_init()
        }
    };
    result.map_err(|_| LogError::AlreadySet)?;
    install_panic_hook();
    Ok(())
}

/// Replaces the default panic hook (which prints the payload) with one that
/// records only the location and the current request id.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let location = info.location().map(|l| format!("{}:{}", l.file(), l.line())).unwrap_or_default();
        let request_id = crate::app::REQUEST_ID.try_with(|r| r.clone()).unwrap_or_default();
        tracing::error!(location = %location, request_id = %request_id, "panic");
    }));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn only_allowlisted_fields_are_written_at_every_level() {
        for json in [false, true] {
            let buf = Buf::default();
            let w = buf.clone();
            let sub = tracing_subscriber::registry()
                .with(tracing_subscriber::filter::filter_fn(|m| !(capped(m.target()) && *m.level() > Level::INFO)))
                .with(
                    tracing_subscriber::fmt::layer()
                        .fmt_fields(NoSpanFields)
                        .event_format(SafeFormat { json })
                        .with_writer(move || w.clone()),
                );
            tracing::subscriber::with_default(sub, || {
                let _span = tracing::info_span!("req", prompt = "CANARY-SPAN", request_id = "r0").entered();
                tracing::trace!(request_id = "r1", prompt = "CANARY-PROMPT", body = ?"CANARY-BODY", status = 200u64, "hello");
                tracing::trace!(target: "hyper::proto", request_id = "r2", "CANARY-HYPER");
                tracing::info!(target: "h2::codec", request_id = "r3", "visible");
                tracing::trace!(target: "tokenizers::tokenizer", request_id = "r4", "CANARY-DEP");
                tracing::debug!(target: "candle_core::quantized", request_id = "r5", "CANARY-DEP");
                tracing::trace!(target: "salus_models::llama", request_id = "r6", "own-trace");
            });
            let out = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
            assert!(out.contains("r1") && out.contains("hello") && out.contains("200"), "{out}");
            assert!(!out.contains("CANARY"), "{out}");
            assert!(out.contains("r3") && out.contains("r6") && out.contains("own-trace"), "{out}");
            if json {
                for line in out.lines() {
                    serde_json::from_str::<serde_json::Value>(line).unwrap();
                }
            }
        }
        assert!(capped("hyper") && capped("hyper::proto::h1") && capped("hyperx") && capped("log"));
        assert!(!capped("salus") && !capped("salus_server::app") && !capped("salus_models::llama"));
        assert!(capped("salusx") && capped("salus_serverx::a"));
    }

    #[test]
    fn log_directory_and_file_must_be_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let set = |p: &Path, m: u32| std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
        set(dir.path(), 0o700);
        assert!(check_private_dir(dir.path()).is_ok());
        for mode in [0o755, 0o704, 0o701, 0o702] {
            set(dir.path(), mode);
            assert!(check_private_dir(dir.path()).unwrap_err().contains("other users"), "{mode:o}");
        }
        set(dir.path(), 0o700);
        let p = dir.path().join("salus.log");
        std::fs::write(&p, b"").unwrap();
        set(&p, 0o644);
        assert!(check_private_file(&std::fs::File::open(&p).unwrap()).is_err());
        set(&p, 0o640);
        assert!(check_private_file(&std::fs::File::open(&p).unwrap()).is_ok());
    }
}
