//! Where backups go: a directory (a mounted backup volume, NFS, a WORM
//! mount) or S3-compatible object storage. Every name is written once and
//! never replaced (`put` is create-only), so either suits write-once media.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::error::BackupError;
use crate::s3::S3Target;

/// S3 Object Lock for what `create` writes (ignored for a directory).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ObjectLock {
    /// No retention headers (for a bucket without Object Lock).
    Off,
    /// COMPLIANCE mode: nobody, not even the root account, can delete or
    /// overwrite a version before retain-until.
    Compliance { days: u32 },
    /// GOVERNANCE mode: users with `s3:BypassGovernanceRetention` can.
    Governance { days: u32 },
}

/// How to reach a destination.
#[derive(Clone, Debug)]
pub struct TargetOptions {
    /// Object Lock for new objects on S3.
    pub object_lock: ObjectLock,
    /// A PEM CA bundle trusted for the S3 endpoint, besides the system's roots.
    pub ca_file: Option<PathBuf>,
    /// The S3 endpoint URL and region; unset: `AWS_ENDPOINT_URL` and
    /// `AWS_REGION` from the environment (AWS itself and us-east-1 without them).
    pub endpoint: Option<String>,
    pub region: Option<String>,
}

impl Default for TargetOptions {
    fn default() -> Self {
        TargetOptions { object_lock: ObjectLock::Off, ca_file: None, endpoint: None, region: None }
    }
}

/// Whether `put` wrote the object or found it there already.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PutOutcome {
    Created,
    Existed,
}

/// A backup destination.
pub enum Target {
    Dir(DirTarget),
    S3(Box<S3Target>),
}

impl Target {
    /// `s3://bucket[/prefix]` or a directory path.
    pub fn open(spec: &str, opts: &TargetOptions) -> Result<Target, BackupError> {
        if let Some(rest) = spec.strip_prefix("s3://") {
            return Ok(Target::S3(Box::new(S3Target::open(rest, opts)?)));
        }
        if spec.contains("://") {
            return Err(BackupError::Invalid(format!(
                "destination '{spec}': expected a directory or s3://BUCKET/PREFIX"
            )));
        }
        if spec.is_empty() {
            return Err(BackupError::Invalid("destination is empty".into()));
        }
        Ok(Target::Dir(DirTarget { root: PathBuf::from(spec) }))
    }

    /// How messages and the local backup record name this destination.
    pub fn describe(&self) -> String {
        match self {
            Target::Dir(d) => std::path::absolute(&d.root).unwrap_or_else(|_| d.root.clone()).display().to_string(),
            Target::S3(s) => s.describe(),
        }
    }

    /// Names under `prefix` (`manifests/`, `objects/`) with their sizes.
    pub async fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>, BackupError> {
        match self {
            Target::Dir(d) => {
                let d = d.clone();
                let prefix = prefix.to_string();
                blocking(move || d.list(&prefix)).await
            }
            Target::S3(s) => s.list(prefix).await,
        }
    }

    /// The object's bytes; `None` when it does not exist.
    pub async fn get(&self, name: &str) -> Result<Option<Vec<u8>>, BackupError> {
        match self {
            Target::Dir(d) => {
                let path = d.path(name)?;
                blocking(move || match std::fs::read(&path) {
                    Ok(b) => Ok(Some(b)),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(BackupError::io(format!("reading {}", path.display()), e)),
                })
                .await
            }
            Target::S3(s) => s.get(name).await,
        }
    }

    /// Writes a new object (never replacing one). `sha256` is of `bytes`.
    pub async fn put(&self, name: &str, bytes: Vec<u8>, sha256: [u8; 32]) -> Result<PutOutcome, BackupError> {
        match self {
            Target::Dir(d) => {
                let d = d.clone();
                let name = name.to_string();
                blocking(move || d.put(&name, &bytes)).await
            }
            Target::S3(s) => s.put(name, bytes, sha256).await,
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, BackupError> + Send + 'static,
) -> Result<T, BackupError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| BackupError::Invalid(format!("internal task failed: {e}")))?
}

/// A directory destination.
#[derive(Clone, Debug)]
pub struct DirTarget {
    root: PathBuf,
}

/// Names are `manifests/…` and `objects/xx/…`: relative, no `..`, no empty parts.
pub(crate) fn check_name(name: &str) -> Result<(), BackupError> {
    let ok = !name.is_empty()
        && name.split('/').all(|p| !p.is_empty() && p != "." && p != "..")
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(BackupError::Invalid(format!("invalid object name '{name}'")))
    }
}

impl DirTarget {
    fn path(&self, name: &str) -> Result<PathBuf, BackupError> {
        check_name(name)?;
        Ok(self.root.join(name))
    }

    fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>, BackupError> {
        let mut out = Vec::new();
        let base = self.root.join(prefix.trim_end_matches('/'));
        let mut stack = vec![(base, prefix.trim_end_matches('/').to_string())];
        while let Some((dir, rel)) = stack.pop() {
            let entries = match std::fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(BackupError::io(format!("listing {}", dir.display()), e)),
            };
            for entry in entries {
                let entry = entry.map_err(|e| BackupError::io(format!("listing {}", dir.display()), e))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') {
                    continue; // a write in progress (or one a crash interrupted)
                }
                let meta = entry.metadata().map_err(|e| BackupError::io(format!("reading {name}"), e))?;
                let rel_name = format!("{rel}/{name}");
                if meta.is_dir() {
                    stack.push((entry.path(), rel_name));
                } else {
                    out.push((rel_name, meta.len()));
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// Temporary file, fsync, hard link to the final name (fails if it
    /// exists: never replaces), fsync the directory.
    fn put(&self, name: &str, bytes: &[u8]) -> Result<PutOutcome, BackupError> {
        let path = self.path(name)?;
        let dir = path.parent().expect("names have a directory").to_path_buf();
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| BackupError::io(format!("creating {}", dir.display()), e))?;
        let file_name = path.file_name().expect("names have a file name").to_string_lossy().into_owned();
        let tmp = dir.join(format!(".{file_name}.{}.tmp", uuid::Uuid::new_v4().simple()));
        let io = |what: &str, e| BackupError::io(format!("{what} {}", path.display()), e);
        let result = (|| {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(|e| io("creating", e))?;
            f.write_all(bytes).map_err(|e| io("writing", e))?;
            f.sync_all().map_err(|e| io("syncing", e))?;
            match std::fs::hard_link(&tmp, &path) {
                Ok(()) => Ok(PutOutcome::Created),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(PutOutcome::Existed),
                Err(e) => Err(io("linking", e)),
            }
        })();
        let _ = std::fs::remove_file(&tmp);
        let outcome = result?;
        sync_dir(&dir).map_err(|e| io("syncing the directory of", e))?;
        Ok(outcome)
    }
}

pub(crate) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn directory_put_never_replaces_and_lists_recursively() {
        let dir = tempfile::tempdir().unwrap();
        let t = Target::open(dir.path().to_str().unwrap(), &TargetOptions::default()).unwrap();
        assert_eq!(t.put("objects/ab/abcd", b"one".to_vec(), [0; 32]).await.unwrap(), PutOutcome::Created);
        assert_eq!(t.put("objects/ab/abcd", b"two".to_vec(), [0; 32]).await.unwrap(), PutOutcome::Existed);
        assert_eq!(t.get("objects/ab/abcd").await.unwrap().unwrap(), b"one");
        assert_eq!(t.get("objects/ab/none").await.unwrap(), None);
        t.put("manifests/0000000001.json", b"{}".to_vec(), [0; 32]).await.unwrap();
        assert_eq!(t.list("objects/").await.unwrap(), vec![("objects/ab/abcd".to_string(), 3)]);
        assert_eq!(t.list("manifests/").await.unwrap().len(), 1);
        assert!(t.get("../escape").await.is_err());
        assert!(Target::open("ftp://x", &TargetOptions::default()).is_err());
    }
}
