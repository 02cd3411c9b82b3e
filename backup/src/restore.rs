//! `salus backup restore`: a backup's trail into a new audit directory (and
//! its key store and config into another), every object verified on the way.
//!
//! The restored directory is the trail as it was when the backup read it:
//! the sealed segments, the open segment cut at its last whole record, the
//! checkpoint and `keys.recorded`. A server started on it recovers as after
//! a crash (`audit.recovered`, `inference.interrupted` for inferences the
//! backup caught in flight) and continues the same hash chain.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;

use crate::anchor::{write_anchor, Anchor, ANCHOR_FORMAT};
use crate::error::{BackupError, Problem};
use crate::manifest::*;
use crate::target::{sync_dir, Target};
use crate::verify::{check_chain, check_file, fetch_file, FileCheck, Select, VerifyOptions};
use crate::Progress;

/// What to restore, where.
pub struct RestoreOptions {
    /// The new audit directory (must not exist, or be empty).
    pub to: PathBuf,
    /// Where the key store and config go (must not exist, or be empty);
    /// `None`: they are not restored.
    pub files_to: Option<PathBuf>,
    /// The newest backup at or before this time (default: the newest).
    pub at: Option<time::OffsetDateTime>,
    /// Keys, and what to check first (as `verify`).
    pub verify: VerifyOptions,
}

#[derive(Clone, Debug)]
pub struct RestoreReport {
    pub number: u64,
    pub created: String,
    pub trail: TrailPosition,
    pub files: usize,
    pub bytes: u64,
    /// Files of the backup not restored (no `files_to`).
    pub skipped: Vec<String>,
    /// The restored trail's `verify_trail` report, when the audit key was given.
    pub verified: Option<salus_audit::TrailReport>,
    pub elapsed: std::time::Duration,
}

/// A plain file name: no directory part, no `.`/`..`, printable ASCII.
pub fn valid_file_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name.starts_with('.')
        && name.len() <= 255
        && name.bytes().all(|b| b.is_ascii_graphic() && b != b'/' && b != b'\\')
}

/// Refuses a directory that holds anything; creates it (0700) otherwise.
fn prepare_empty_dir(dir: &Path) -> Result<(), BackupError> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(BackupError::NotEmpty(dir.to_path_buf()));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(BackupError::io(format!("reading {}", dir.display()), e)),
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| BackupError::io(format!("creating {}", dir.display()), e))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| BackupError::io(format!("setting the mode of {}", dir.display()), e))
}

/// Writes `dir/.name.restoring`, fsyncs it; renamed into place at the end.
fn write_partial(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), BackupError> {
    let tmp = dir.join(format!(".{name}.restoring"));
    let io = |e| BackupError::io(format!("writing {}", tmp.display()), e);
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp).map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)
}

/// Restores a backup of `target`.
pub async fn restore(
    target: Arc<Target>,
    opts: RestoreOptions,
    progress: Arc<dyn Progress>,
) -> Result<RestoreReport, BackupError> {
    let t0 = Instant::now();
    if opts.verify.backup_keys.is_empty() {
        return Err(BackupError::Invalid("restore needs the backup key".into()));
    }
    if opts.files_to.as_deref() == Some(opts.to.as_path()) {
        return Err(BackupError::Invalid("--files-to must be another directory than --to".into()));
    }
    // Refuse before any download.
    for d in std::iter::once(&opts.to).chain(opts.files_to.iter()) {
        if std::fs::read_dir(d).is_ok_and(|mut e| e.next().is_some()) {
            return Err(BackupError::NotEmpty(d.clone()));
        }
    }
    let chain = check_chain(&target, &opts.verify, Select::AtOrBefore(opts.at)).await?;
    if !chain.problems.is_empty() {
        return Err(BackupError::Verification(chain.problems));
    }
    let Some(selected) = chain.selected else {
        let t = opts.at.and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok());
        return Err(BackupError::NoBackup(format!(
            "no backup in {} at or before {} (the oldest is #{})",
            target.describe(),
            t.unwrap_or_default(),
            chain.first
        )));
    };
    let m = selected.manifest;
    let created: Vec<PathBuf> =
        std::iter::once(&opts.to).chain(opts.files_to.iter()).filter(|d| !d.exists()).cloned().collect();
    prepare_empty_dir(&opts.to)?;
    if let Some(f) = &opts.files_to {
        prepare_empty_dir(f)?;
    }
    let mut skipped = Vec::new();
    let files: Vec<ObjectEntry> = m
        .objects
        .iter()
        .filter(|e| {
            let keep = e.kind.is_trail() || opts.files_to.is_some();
            if !keep {
                skipped.push(e.path.clone());
            }
            keep
        })
        .cloned()
        .collect();
    let total: u64 = files.iter().map(|e| e.stored_size()).sum();
    progress.begin("restoring", total);
    let keys = Arc::new(opts.verify.backup_keys.clone());
    let signer = Arc::new(chain.signer.clone());
    let parts = Arc::new(chain.parts);
    let to = Arc::new(opts.to.clone());
    let files_to = Arc::new(opts.files_to.clone());
    let backup = m.number;
    let mut results = futures::stream::iter(files.iter().cloned().map(|e| {
        let (target, keys, signer, progress, to, files_to, parts) = (
            target.clone(),
            keys.clone(),
            signer.clone(),
            progress.clone(),
            to.clone(),
            files_to.clone(),
            parts.clone(),
        );
        async move {
            let plain = match fetch_file(&target, &e, &parts, &keys).await? {
                Ok(p) => p,
                Err(p) => return Ok(Err(p)),
            };
            let size = e.stored_size();
            let r = tokio::task::spawn_blocking(move || -> Result<Result<u64, Vec<Problem>>, BackupError> {
                // The whole file's hash, and a checkpoint's signature; the
                // records are checked by `verify_trail` below (with the audit key).
                let fc = FileCheck::plain(e.clone(), backup);
                let problems = check_file(&fc, &plain, None, &signer);
                if !problems.is_empty() {
                    return Ok(Err(problems));
                }
                let dir =
                    if e.kind.is_trail() { to.as_ref().clone() } else { files_to.as_ref().clone().expect("kept") };
                write_partial(&dir, &e.path, &plain)?;
                Ok(Ok(plain.len() as u64))
            })
            .await
            .map_err(|e| BackupError::Invalid(format!("internal task failed: {e}")))??;
            progress.advance(size);
            Ok::<_, BackupError>(r)
        }
    }))
    .buffer_unordered(opts.verify.concurrency.max(1));
    let mut problems = Vec::new();
    let mut bytes = 0;
    while let Some(r) = results.next().await {
        match r? {
            Ok(n) => bytes += n,
            Err(p) => problems.extend(p),
        }
    }
    progress.end();
    if !problems.is_empty() {
        // Leave nothing behind: the partial files, and the directories made here.
        for e in &files {
            let dir = if e.kind.is_trail() { &opts.to } else { opts.files_to.as_ref().expect("kept") };
            let _ = std::fs::remove_file(dir.join(format!(".{}.restoring", e.path)));
        }
        for d in &created {
            let _ = std::fs::remove_dir(d);
        }
        return Err(BackupError::Verification(problems));
    }
    // Everything verified and durable: move into place.
    for e in &files {
        let dir = if e.kind.is_trail() { &opts.to } else { opts.files_to.as_ref().expect("kept") };
        std::fs::rename(dir.join(format!(".{}.restoring", e.path)), dir.join(&e.path))
            .map_err(|err| BackupError::io(format!("renaming {} in {}", e.path, dir.display()), err))?;
    }
    for d in std::iter::once(&opts.to).chain(opts.files_to.iter()) {
        sync_dir(d).map_err(|e| BackupError::io(format!("syncing {}", d.display()), e))?;
    }
    let verified = match &opts.verify.audit_key {
        Some(k) => Some(salus_audit::verify_trail(&opts.to, k, None)?),
        None => None,
    };
    // This host now knows the destination up to the restored backup.
    let manifest_bytes = target.get(&manifest_name(m.number)).await?.unwrap_or_default();
    let _ = write_anchor(
        &opts.to,
        &Anchor {
            format: ANCHOR_FORMAT.into(),
            destination: target.describe(),
            number: m.number,
            sha256: manifest_hash(&manifest_bytes),
            created: m.created.clone(),
            last_seq: m.trail.last_seq,
        },
    );
    skipped.sort();
    Ok(RestoreReport {
        number: m.number,
        created: m.created.clone(),
        trail: m.trail.clone(),
        files: files.len(),
        bytes,
        skipped,
        verified,
        elapsed: t0.elapsed(),
    })
}
