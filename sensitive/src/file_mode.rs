//! Refusing files that the wrong users could write or read.
//!
//! Why: a key store that anyone can write lets any local user add an API key
//! (the server reloads it within a second); a config anyone can write can add
//! a `cmd:` key source that then runs as the service user; a TLS private key
//! anyone can read is a stolen identity. The key-encryption key, the audit key
//! and the audit directory were already checked strictly; these checks extend
//! the same rule to the other files Salus trusts, with the same `chmod` hint.
//!
//! A directory counts too: whoever can write it can replace the file. A
//! directory with the sticky bit (`/tmp`) is fine: others cannot replace or
//! remove what they do not own there.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Why a file's permissions were refused. The message names the file, its
/// mode and the `chmod` that fixes it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FileModeError {
    #[error("{path} is writable by other users (mode {mode:o}); run `chmod go-w {path}`")]
    WritableByOthers { path: String, mode: u32 },
    #[error("{path} is readable by all users (mode {mode:o}); run `chmod o-rwx {path}`")]
    ReadableByAll { path: String, mode: u32 },
    #[error("{path}: {reason}")]
    Unreadable { path: String, reason: String },
}

const STICKY: u32 = 0o1000;

fn mode_of(path: &Path) -> Result<Option<u32>, FileModeError> {
    match std::fs::metadata(path) {
        Ok(m) => Ok(Some(m.permissions().mode())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(FileModeError::Unreadable { path: path.display().to_string(), reason: e.to_string() }),
    }
}

/// Refuses `path` (when it exists) and its directory if users other than the
/// owner can write them (mode & 0o022), sticky directories excepted.
pub fn check_not_writable_by_others(path: &Path) -> Result<(), FileModeError> {
    if let Some(mode) = mode_of(path)? {
        if mode & 0o022 != 0 {
            return Err(FileModeError::WritableByOthers { path: path.display().to_string(), mode: mode & 0o7777 });
        }
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if let Some(mode) = mode_of(dir)? {
        if mode & 0o022 != 0 && mode & STICKY == 0 {
            return Err(FileModeError::WritableByOthers { path: dir.display().to_string(), mode: mode & 0o7777 });
        }
    }
    Ok(())
}

/// Refuses a secret file that every user can read (mode & 0o004), and one
/// that others can replace ([`check_not_writable_by_others`]).
pub fn check_private_file(path: &Path) -> Result<(), FileModeError> {
    if let Some(mode) = mode_of(path)? {
        if mode & 0o004 != 0 {
            return Err(FileModeError::ReadableByAll { path: path.display().to_string(), mode: mode & 0o7777 });
        }
    }
    check_not_writable_by_others(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chmod(p: &Path, mode: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn writable_files_and_directories_are_refused_with_a_hint() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("store.json");
        std::fs::write(&f, "{}").unwrap();
        chmod(dir.path(), 0o755);
        chmod(&f, 0o644);
        check_not_writable_by_others(&f).unwrap();
        chmod(&f, 0o666);
        let e = check_not_writable_by_others(&f).unwrap_err().to_string();
        assert!(e.contains("chmod go-w") && e.contains("666"), "{e}");
        chmod(&f, 0o600);
        chmod(dir.path(), 0o777);
        assert!(matches!(check_not_writable_by_others(&f), Err(FileModeError::WritableByOthers { .. })));
        // A sticky, world-writable directory (like /tmp) is fine.
        chmod(dir.path(), 0o1777);
        check_not_writable_by_others(&f).unwrap();
        chmod(dir.path(), 0o700);
        // A missing file is fine (it will be created private).
        check_not_writable_by_others(&dir.path().join("missing")).unwrap();
    }

    #[test]
    fn world_readable_private_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("key.pem");
        std::fs::write(&f, "k").unwrap();
        chmod(&f, 0o644);
        let e = check_private_file(&f).unwrap_err().to_string();
        assert!(e.contains("chmod o-rwx"), "{e}");
        chmod(&f, 0o640);
        check_private_file(&f).unwrap();
    }
}
