//! `salus backup checkpoints`: the signed checkpoints of every backup, as
//! `checkpoint-<records>.json` files (the names the trail's own checkpoint
//! directory uses), for `salus audit verify --checkpoints DIR`: a local trail
//! rolled back behind what was backed up fails with "trail truncated".

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;

use salus_audit::Checkpoint;

use crate::error::{BackupError, Problem};
use crate::manifest::ObjectKind;
use crate::target::{sync_dir, Target};
use crate::verify::{check_chain, check_file, fetch_file, Select, VerifyOptions};

/// Writes every backup's checkpoint into `dir`; returns how many files were
/// written (files already there with the same bytes are kept, others refused).
pub async fn export_checkpoints(target: Arc<Target>, opts: VerifyOptions, dir: &Path) -> Result<usize, BackupError> {
    let chain = check_chain(&target, &opts, Select::All).await?;
    if !chain.problems.is_empty() {
        return Err(BackupError::Verification(chain.problems));
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| BackupError::io(format!("creating {}", dir.display()), e))?;
    let keys = Arc::new(opts.backup_keys.clone());
    let mut written = 0;
    let mut problems = Vec::new();
    for fc in chain.files.values().filter(|f| f.entry.kind == ObjectKind::Checkpoint) {
        let plain = match fetch_file(&target, &fc.entry, &chain.parts, &keys).await? {
            Ok(p) => p,
            Err(p) => {
                problems.extend(p);
                continue;
            }
        };
        let p = check_file(fc, &plain, None, &chain.signer);
        if !p.is_empty() {
            problems.extend(p);
            continue;
        }
        let c: Checkpoint = serde_json::from_slice(&plain).expect("checked above");
        let path = dir.join(format!("checkpoint-{:020}.json", c.records));
        match std::fs::read(&path) {
            Ok(existing) if existing == plain => continue,
            Ok(_) => {
                problems.push(Problem::new(path.display().to_string(), "exists with other contents (not replaced)"));
                continue;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(BackupError::io(format!("reading {}", path.display()), e)),
        }
        let io = |e| BackupError::io(format!("writing {}", path.display()), e);
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path).map_err(io)?;
        f.write_all(&plain).map_err(io)?;
        f.sync_all().map_err(io)?;
        written += 1;
    }
    sync_dir(dir).map_err(|e| BackupError::io(format!("syncing {}", dir.display()), e))?;
    if !problems.is_empty() {
        return Err(BackupError::Verification(problems));
    }
    Ok(written)
}
