//! Round trips, incremental backups, key rotation, resumption, and the
//! tampering cases `verify` must name: a flipped byte, a missing object, a
//! manifest from another server, a destination rolled back.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use salus_audit::{AuditEvent, AuditLog, AuditLogSettings, EventKind};
use salus_sensitive::secret::{write_new_key_file, KeySource, SecretKey};

use super::*;

/// A temporary audit key and trail directory, and a backup key (the
/// shipper's tests use it too).
pub(crate) struct Fixture {
    _tmp: tempfile::TempDir,
    pub(crate) root: PathBuf,
    pub(crate) trail: PathBuf,
    pub(crate) key_src: KeySource,
    pub(crate) audit_key: SecretKey,
    pub(crate) backup_key: SecretKey,
}

impl Fixture {
    pub(crate) fn new() -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        let key_path = root.join("audit.key");
        let audit_key = write_new_key_file(&key_path).unwrap();
        Fixture {
            root: root.clone(),
            trail: root.join("audit"),
            key_src: format!("file:{}", key_path.display()).parse().unwrap(),
            audit_key,
            backup_key: SecretKey::generate(),
            _tmp: tmp,
        }
    }

    pub(crate) fn settings(&self, dir: &Path) -> AuditLogSettings {
        let mut cfg = AuditLogSettings::new(dir, self.key_src.clone());
        cfg.segment_max_bytes = 4096;
        cfg.checkpoint_every_records = 10;
        cfg
    }

    /// Opens the trail in `dir`, records `n` events, closes it.
    fn record(&self, dir: &Path, n: usize) {
        let log = AuditLog::open(self.settings(dir)).unwrap();
        for i in 0..n {
            log.record_blocking(AuditEvent::new(EventKind::InferenceStarted).request_id(format!("req-{i}"))).unwrap();
        }
        log.close().unwrap();
    }

    fn dest(&self, name: &str) -> Arc<Target> {
        Arc::new(Target::open(self.root.join(name).to_str().unwrap(), &TargetOptions::default()).unwrap())
    }

    fn create_opts(&self) -> CreateOptions {
        CreateOptions {
            audit_dir: self.trail.clone(),
            audit_key: self.audit_key.clone(),
            backup_key: self.backup_key.clone(),
            previous_backup_keys: Vec::new(),
            key_store: None,
            config_file: None,
            instance: "test".into(),
            concurrency: 3,
            reuse_sealed: false,
        }
    }

    pub(crate) fn verify_opts(&self) -> VerifyOptions {
        VerifyOptions {
            backup_keys: vec![self.backup_key.clone()],
            audit_key: Some(self.audit_key.clone()),
            public_key: None,
            anchor_dir: Some(self.trail.clone()),
            concurrency: 3,
        }
    }

    async fn create(&self, dest: &Arc<Target>) -> Result<CreateReport, BackupError> {
        create(dest.clone(), self.create_opts(), Arc::new(NoProgress)).await
    }

    async fn verify(&self, dest: &Arc<Target>, opts: VerifyOptions) -> Result<VerifyReport, BackupError> {
        verify(dest.clone(), opts, Arc::new(NoProgress)).await
    }
}

fn problems(e: BackupError) -> String {
    assert_eq!(e.exit_code(), 3, "not a verification failure: {e}");
    e.problems().iter().map(|p| p.to_string()).collect::<Vec<_>>().join("\n")
}

fn object_files(dest: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for d in std::fs::read_dir(dest.join("objects")).unwrap() {
        for f in std::fs::read_dir(d.unwrap().path()).unwrap() {
            out.push(f.unwrap().path());
        }
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_restores_a_trail_that_verifies_and_continues_the_chain() {
    let f = Fixture::new();
    f.record(&f.trail, 120);
    let store = f.root.join("api-keys.json");
    std::fs::write(&store, br#"{"keys":[]}"#).unwrap();
    let dest = f.dest("dest");
    let mut opts = f.create_opts();
    opts.key_store = Some(store.clone());
    let r = create(dest.clone(), opts, Arc::new(NoProgress)).await.unwrap();
    assert_eq!(r.number, 1);
    assert!(r.manifest.objects.iter().filter(|o| o.kind == ObjectKind::SealedSegment).count() >= 2);
    let original = salus_audit::verify_trail(&f.trail, &f.audit_key, None).unwrap();
    assert_eq!(r.manifest.trail.last_seq, original.last_seq);
    assert_eq!(r.manifest.trail.chain_head, original.chain_head);
    let v = f.verify(&dest, f.verify_opts()).await.unwrap();
    assert_eq!((v.manifests, v.newest), (1, 1));
    assert!(v.pinned);

    // Lose the trail, restore it.
    std::fs::remove_dir_all(&f.trail).unwrap();
    let to = f.root.join("restored");
    let files_to = f.root.join("files");
    let ropts = RestoreOptions {
        to: to.clone(),
        files_to: Some(files_to.clone()),
        at: None,
        verify: VerifyOptions { anchor_dir: None, ..f.verify_opts() },
    };
    let rr = restore(dest.clone(), ropts, Arc::new(NoProgress)).await.unwrap();
    let report = rr.verified.unwrap();
    assert_eq!((report.last_seq, report.chain_head.clone()), (original.last_seq, original.chain_head.clone()));
    assert_eq!(std::fs::read(files_to.join("api-keys.json")).unwrap(), br#"{"keys":[]}"#);
    assert!(to.join("keys.recorded").exists() || !r.manifest.objects.iter().any(|o| o.kind == ObjectKind::KeyBaseline));

    // A server on the restored trail continues the same chain.
    f.record(&to, 5);
    let mut first_new = None;
    let after = salus_audit::read_trail(&to, &f.audit_key, |rec, _| {
        if rec.seq == original.last_seq + 1 {
            first_new = Some(rec.prev_hash.clone());
        }
    })
    .unwrap();
    assert_eq!(first_new.as_deref(), Some(original.chain_head.as_str()));
    assert!(after.last_seq > original.last_seq + 5);
    salus_audit::verify_trail(&to, &f.audit_key, None).unwrap();

    // A restore into a non-empty directory refuses.
    let again = RestoreOptions { to: to.clone(), files_to: None, at: None, verify: f.verify_opts() };
    let e = restore(dest.clone(), again, Arc::new(NoProgress)).await.unwrap_err();
    assert!(matches!(e, BackupError::NotEmpty(_)), "{e}");
    assert_eq!(e.exit_code(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backups_are_incremental_and_restore_at_picks_the_newest_at_or_before() {
    let f = Fixture::new();
    f.record(&f.trail, 100);
    let dest = f.dest("dest");
    let first = f.create(&dest).await.unwrap();
    assert_eq!(first.reused_objects, 0);
    f.record(&f.trail, 100);
    let second = f.create(&dest).await.unwrap();
    let sealed_before = first.manifest.objects.iter().filter(|o| o.kind == ObjectKind::SealedSegment).count();
    assert!(second.reused_objects >= sealed_before, "{} < {sealed_before}", second.reused_objects);
    assert!(second.uploaded_objects < second.manifest.objects.len());
    assert_eq!(second.manifest.previous.as_deref().map(str::len), Some(64));
    // Nothing changed: nothing uploaded.
    let third = f.create(&dest).await.unwrap();
    assert_eq!(third.uploaded_objects, 0, "{:?}", third.manifest.objects);
    let stored: u64 = object_files(&f.root.join("dest")).iter().map(|p| std::fs::metadata(p).unwrap().len()).sum();
    let listed = list(&dest).await.unwrap();
    assert_eq!(listed.len(), 3);
    assert_eq!(listed.iter().map(|b| b.new_bytes).sum::<u64>(), stored);
    f.verify(&dest, f.verify_opts()).await.unwrap();

    // --at the first backup's time restores the first backup.
    let at =
        time::OffsetDateTime::parse(&first.manifest.created, &time::format_description::well_known::Rfc3339).unwrap();
    let to = f.root.join("at-first");
    let ropts = RestoreOptions { to: to.clone(), files_to: None, at: Some(at), verify: f.verify_opts() };
    let rr = restore(dest.clone(), ropts, Arc::new(NoProgress)).await.unwrap();
    assert_eq!(rr.number, 1);
    assert_eq!(rr.verified.unwrap().last_seq, first.manifest.trail.last_seq);
    let before = at - time::Duration::days(1);
    let ropts = RestoreOptions { to: f.root.join("none"), files_to: None, at: Some(before), verify: f.verify_opts() };
    let e = restore(dest.clone(), ropts, Arc::new(NoProgress)).await.unwrap_err();
    assert!(matches!(e, BackupError::NoBackup(_)), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_names_a_flipped_byte_and_a_missing_object() {
    let f = Fixture::new();
    f.record(&f.trail, 80);
    let dest = f.dest("dest");
    f.create(&dest).await.unwrap();
    let objects = object_files(&f.root.join("dest"));
    let victim = &objects[0];
    let mut b = std::fs::read(victim).unwrap();
    let at = b.len() / 2;
    b[at] ^= 0x01;
    std::fs::write(victim, &b).unwrap();
    let name = victim.file_name().unwrap().to_str().unwrap().to_string();
    let p = problems(f.verify(&dest, f.verify_opts()).await.unwrap_err());
    assert!(p.contains(&name) && p.contains("(modified)"), "{p}");
    // A restore refuses too, before writing anything.
    let to = f.root.join("restored");
    let ropts = RestoreOptions { to: to.clone(), files_to: None, at: None, verify: f.verify_opts() };
    let e = restore(dest.clone(), ropts, Arc::new(NoProgress)).await.unwrap_err();
    assert!(problems(e).contains("(modified)"));
    assert!(!to.exists(), "a failed restore leaves nothing behind");

    b[at] ^= 0x01;
    std::fs::write(victim, &b).unwrap();
    f.verify(&dest, f.verify_opts()).await.unwrap();
    std::fs::remove_file(&objects[1]).unwrap();
    let missing = objects[1].file_name().unwrap().to_str().unwrap().to_string();
    let p = problems(f.verify(&dest, f.verify_opts()).await.unwrap_err());
    assert!(p.contains(&missing) && p.contains("missing (deleted)"), "{p}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_names_a_manifest_from_another_server() {
    let f = Fixture::new();
    f.record(&f.trail, 30);
    let dest = f.dest("dest");
    f.create(&dest).await.unwrap();
    f.record(&f.trail, 30);
    f.create(&dest).await.unwrap();

    // Another server (another audit key) backs up to its own destination…
    let g = Fixture::new();
    g.record(&g.trail, 30);
    let other = g.dest("other");
    let mut gopts = g.create_opts();
    gopts.backup_key = f.backup_key.clone(); // even under the same backup key
    create(other.clone(), gopts.clone(), Arc::new(NoProgress)).await.unwrap();
    create(other.clone(), gopts, Arc::new(NoProgress)).await.unwrap();
    // …and its manifest #2 replaces ours.
    let ours = f.root.join("dest/manifests/0000000002.json");
    std::fs::copy(g.root.join("other/manifests/0000000002.json"), &ours).unwrap();
    let p = problems(f.verify(&dest, f.verify_opts()).await.unwrap_err());
    assert!(p.contains("0000000002.json") && p.contains("another server"), "{p}");
    // Without the audit key the signer is the first manifest's: still caught.
    let unpinned = VerifyOptions { audit_key: None, anchor_dir: None, ..f.verify_opts() };
    let p = problems(f.verify(&dest, unpinned).await.unwrap_err());
    assert!(p.contains("another server"), "{p}");
    // And `create` refuses to continue a destination whose newest backup is foreign.
    let e = f.create(&dest).await.unwrap_err();
    assert!(problems(e).contains("another server"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_names_a_destination_rolled_back_to_an_older_manifest() {
    let f = Fixture::new();
    let dest = f.dest("dest");
    for _ in 0..3 {
        f.record(&f.trail, 25);
        f.create(&dest).await.unwrap();
    }
    let manifests = f.root.join("dest/manifests");
    let m2 = std::fs::read(manifests.join("0000000002.json")).unwrap();
    let m3 = std::fs::read(manifests.join("0000000003.json")).unwrap();
    // The newest manifest deleted: the chain alone looks fine, the host's record does not.
    std::fs::remove_file(manifests.join("0000000003.json")).unwrap();
    let p = problems(f.verify(&dest, f.verify_opts()).await.unwrap_err());
    assert!(p.contains("rolled back") && p.contains("#3"), "{p}");
    let e = f.create(&dest).await.unwrap_err();
    assert!(problems(e).contains("rolled back"));
    // Manifest #3 replaced by #2's bytes.
    std::fs::write(manifests.join("0000000003.json"), &m2).unwrap();
    let p = problems(f.verify(&dest, f.verify_opts()).await.unwrap_err());
    assert!(p.contains("0000000003.json") && p.contains("holds manifest #2"), "{p}");
    std::fs::write(manifests.join("0000000003.json"), &m3).unwrap();
    f.verify(&dest, f.verify_opts()).await.unwrap();
    // A gap in the middle is named too.
    std::fs::remove_file(manifests.join("0000000002.json")).unwrap();
    let p = problems(f.verify(&dest, f.verify_opts()).await.unwrap_err());
    assert!(p.contains("0000000002.json: missing (deleted)"), "{p}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_refuses_a_damaged_or_rolled_back_local_trail() {
    let f = Fixture::new();
    f.record(&f.trail, 60);
    let copy = f.root.join("old-copy");
    copy_dir(&f.trail, &copy);
    f.record(&f.trail, 60);
    let dest = f.dest("dest");
    f.create(&dest).await.unwrap();
    // The local trail replaced by an older copy: behind the backup.
    let current = f.root.join("current");
    std::fs::rename(&f.trail, &current).unwrap();
    copy_dir(&copy, &f.trail);
    std::fs::remove_file(crate::anchor_path(&f.trail, &dest.describe())).ok();
    let e = f.create(&dest).await.unwrap_err();
    assert!(problems(e).contains("rolled back or replaced"));
    std::fs::remove_dir_all(&f.trail).unwrap();
    std::fs::rename(&current, &f.trail).unwrap();
    // A flipped byte in a sealed segment new to the destination.
    f.record(&f.trail, 60);
    let sealed = std::fs::read_dir(&f.trail)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "sealed"))
        .max()
        .unwrap();
    let mut b = std::fs::read(&sealed).unwrap();
    let at = b.len() - 30;
    b[at] ^= 4;
    std::fs::write(&sealed, &b).unwrap();
    let e = f.create(&dest).await.unwrap_err();
    assert_eq!(e.exit_code(), 3, "{e}");
    assert!(e.to_string().contains(sealed.file_name().unwrap().to_str().unwrap()), "{e}");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_name() != "LOCK" {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_the_backup_key_rewraps_and_an_interrupted_run_is_resumed() {
    let f = Fixture::new();
    f.record(&f.trail, 60);
    let dest = f.dest("dest");
    let first = f.create(&dest).await.unwrap();

    // Rotation without the old key is refused with a hint; with it, data keys are rewrapped.
    let new_key = SecretKey::generate();
    let mut opts = f.create_opts();
    opts.backup_key = new_key.clone();
    let e = create(dest.clone(), opts, Arc::new(NoProgress)).await.unwrap_err();
    assert!(e.to_string().contains("--previous-backup-key"), "{e}");
    let mut opts = f.create_opts();
    opts.backup_key = new_key.clone();
    opts.previous_backup_keys = vec![f.backup_key.clone()];
    let second = create(dest.clone(), opts, Arc::new(NoProgress)).await.unwrap();
    assert!(second.manifest.keys.iter().all(|w| w.kek_id == new_key.key_id()));
    assert_eq!(second.uploaded_objects, 0, "rotation rewraps, it does not re-upload");
    // The newest backup restores with the new key alone.
    let only_new = VerifyOptions { backup_keys: vec![new_key.clone()], ..f.verify_opts() };
    let ropts = RestoreOptions { to: f.root.join("r"), files_to: None, at: None, verify: only_new };
    restore(dest.clone(), ropts, Arc::new(NoProgress)).await.unwrap();
    let both = VerifyOptions { backup_keys: vec![new_key.clone(), f.backup_key.clone()], ..f.verify_opts() };
    f.verify(&dest, both).await.unwrap();

    // An interrupted run: objects uploaded, no manifest. The next run adopts them.
    let g = Fixture::new();
    g.record(&g.trail, 60);
    let gdest = g.dest("dest");
    let r = g.create(&gdest).await.unwrap();
    std::fs::remove_file(g.root.join("dest").join(manifest_name(1))).unwrap();
    std::fs::remove_file(crate::anchor_path(&g.trail, &gdest.describe())).unwrap();
    let again = g.create(&gdest).await.unwrap();
    assert_eq!(again.number, 1);
    assert_eq!(again.uploaded_objects, 0);
    assert_eq!(again.reused_objects, r.manifest.objects.len());
    g.verify(&gdest, g.verify_opts()).await.unwrap();
    let _ = first;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_appended_log_is_backed_up_as_the_earlier_copy_plus_the_new_bytes() {
    let f = Fixture::new();
    let record = |n: usize| {
        let mut cfg = f.settings(&f.trail);
        cfg.segment_max_bytes = 8 << 20;
        let log = AuditLog::open(cfg).unwrap();
        for i in 0..n {
            log.record_blocking(AuditEvent::new(EventKind::InferenceStarted).request_id(format!("r{i}"))).unwrap();
        }
        log.close().unwrap();
    };
    record(200);
    let dest = f.dest("dest");
    let first = f.create(&dest).await.unwrap();
    record(20);
    let second = f.create(&dest).await.unwrap();
    let log = |m: &Manifest| m.objects.iter().find(|o| o.kind == ObjectKind::LogSegment).unwrap().clone();
    let (a, b) = (log(&first.manifest), log(&second.manifest));
    assert_eq!(a.parts.len(), 1);
    assert_eq!(b.parts.len(), 2, "the earlier copy, then what was appended");
    assert_eq!(b.parts[0], a.parts[0]);
    assert_eq!(b.parts[1].size, b.size - a.size);
    assert!(second.uploaded_bytes < b.size / 2, "uploaded {} of a {}-byte log", second.uploaded_bytes, b.size);
    f.verify(&dest, f.verify_opts()).await.unwrap();
    let to = f.root.join("restored");
    let ropts = RestoreOptions { to: to.clone(), files_to: None, at: None, verify: f.verify_opts() };
    let r = restore(dest.clone(), ropts, Arc::new(NoProgress)).await.unwrap();
    assert_eq!(r.verified.unwrap().last_seq, second.manifest.trail.last_seq);
    assert_eq!(std::fs::read(to.join(&b.path)).unwrap(), std::fs::read(f.trail.join(&b.path)).unwrap());
    // A flipped byte in the appended part is named, as the part of that file.
    let victim = f.root.join("dest").join(&b.parts[1].object);
    let mut bytes = std::fs::read(&victim).unwrap();
    let at = bytes.len() - 5;
    bytes[at] ^= 2;
    std::fs::write(&victim, &bytes).unwrap();
    let p = problems(f.verify(&dest, f.verify_opts()).await.unwrap_err());
    assert!(p.contains(&b.parts[1].object) && p.contains(&b.path) && p.contains("(modified)"), "{p}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backups_taken_while_records_are_written_restore_to_consistent_trails() {
    let f = Fixture::new();
    let mut cfg = f.settings(&f.trail);
    cfg.segment_max_bytes = 64 << 10;
    let log = AuditLog::open(cfg).unwrap();
    let writer = {
        let log = log.clone();
        std::thread::spawn(move || {
            for i in 0..3000 {
                log.record_blocking(AuditEvent::new(EventKind::InferenceStarted).request_id(format!("w{i}"))).unwrap();
            }
        })
    };
    let dest = f.dest("dest");
    let mut reports = Vec::new();
    while !writer.is_finished() {
        reports.push(f.create(&dest).await.unwrap());
    }
    writer.join().unwrap();
    log.close().unwrap();
    reports.push(f.create(&dest).await.unwrap());
    assert!(reports.len() >= 2);
    f.verify(&dest, f.verify_opts()).await.unwrap();
    // Every backup restores to a trail that verifies and ends where its manifest says.
    for r in &reports {
        let at =
            time::OffsetDateTime::parse(&r.manifest.created, &time::format_description::well_known::Rfc3339).unwrap();
        let to = f.root.join(format!("r{}", r.number));
        let ropts = RestoreOptions { to, files_to: None, at: Some(at), verify: f.verify_opts() };
        let rr = restore(dest.clone(), ropts, Arc::new(NoProgress)).await.unwrap();
        assert_eq!(rr.number, r.number);
        let v = rr.verified.unwrap();
        assert_eq!((v.last_seq, v.chain_head), (r.manifest.trail.last_seq, r.manifest.trail.chain_head.clone()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exported_checkpoints_catch_a_local_trail_rolled_back_behind_the_backups() {
    let f = Fixture::new();
    f.record(&f.trail, 40);
    let old = f.root.join("old");
    copy_dir(&f.trail, &old);
    f.record(&f.trail, 40);
    let dest = f.dest("dest");
    f.create(&dest).await.unwrap();
    let ckpts = f.root.join("ckpts");
    assert_eq!(export_checkpoints(dest.clone(), f.verify_opts(), &ckpts).await.unwrap(), 1);
    assert_eq!(export_checkpoints(dest.clone(), f.verify_opts(), &ckpts).await.unwrap(), 0, "idempotent");
    salus_audit::verify_trail(&f.trail, &f.audit_key, Some(&ckpts)).unwrap();
    // The older copy verifies on its own, not against the backed-up checkpoints.
    salus_audit::verify_trail(&old, &f.audit_key, None).unwrap();
    let e = salus_audit::verify_trail(&old, &f.audit_key, Some(&ckpts)).unwrap_err();
    assert!(e.to_string().contains("trail truncated"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reuse_sealed_takes_unchanged_sealed_segments_from_the_previous_backup_unread() {
    let f = Fixture::new();
    f.record(&f.trail, 120);
    let dest = f.dest("dest");
    let mut opts = f.create_opts();
    opts.reuse_sealed = true;
    let first = create(dest.clone(), opts.clone(), Arc::new(NoProgress)).await.unwrap();
    f.record(&f.trail, 2);
    let second = create(dest.clone(), opts, Arc::new(NoProgress)).await.unwrap();
    // The same trail again, every file read: the difference is the sealed segments taken unread.
    let third = f.create(&dest).await.unwrap();
    let sealed = |m: &Manifest| -> Vec<(String, u64)> {
        m.objects.iter().filter(|o| o.kind == ObjectKind::SealedSegment).map(|o| (o.path.clone(), o.size)).collect()
    };
    let before = sealed(&first.manifest);
    let unread: u64 = sealed(&second.manifest).iter().filter(|s| before.contains(s)).map(|(_, n)| n).sum();
    assert!(unread > 0 && before.len() >= 2, "{before:?}");
    assert_eq!(third.read_bytes - second.read_bytes, unread);
    assert_eq!(second.manifest.objects, third.manifest.objects, "the same backup either way");
    f.verify(&dest, f.verify_opts()).await.unwrap();
}
