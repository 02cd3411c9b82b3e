//! The forwarder's cursor: the seq of the last record the collector accepted,
//! durable across restarts.
//!
//! The file holds that seq in decimal and a newline. It is replaced
//! atomically (a temporary file beside it, written, `fsync`ed, renamed over
//! the old one, the directory `fsync`ed), so after a crash it holds either the
//! old or the new value, never a torn one. A missing file means nothing was
//! forwarded yet.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::ForwardError;

/// A cursor file.
#[derive(Clone, Debug)]
pub struct Cursor {
    path: PathBuf,
}

impl Cursor {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Cursor { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The last accepted seq; 0 when the file does not exist.
    pub fn load(&self) -> Result<u64, ForwardError> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(ForwardError::cursor(&self.path, e)),
        };
        text.trim_end_matches('\n')
            .parse::<u64>()
            .map_err(|_| ForwardError::CursorInvalid { path: self.path.display().to_string() })
    }

    /// Replaces the file with `seq`, atomically and durably.
    pub fn store(&self, seq: u64) -> Result<(), ForwardError> {
        let io = |e| ForwardError::cursor(&self.path, e);
        let mut name = self.path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
        name.push(".tmp");
        let tmp = self.path.with_file_name(name);
        // A temporary file left by a crash is replaced, not reused: a new one
        // gets mode 0600 whatever the old one had.
        match std::fs::remove_file(&tmp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(e)),
            _ => {}
        }
        {
            let mut f = std::fs::OpenOptions::new().create_new(true).write(true).mode(0o600).open(&tmp).map_err(io)?;
            f.write_all(format!("{seq}\n").as_bytes()).map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        std::fs::rename(&tmp, &self.path).map_err(io)?;
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        crate::format::sync_dir(dir).map_err(io)
    }
}
