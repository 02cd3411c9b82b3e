//! The shipper against directory destinations: segments shipped as they
//! seal, a restart that uploads nothing twice, a failing destination that
//! holds back the purge and recovers, and what a shipped destination is good
//! for (restore, verify, the checkpoints that catch a rolled-back trail).

use std::path::Path;
use std::time::{Duration, Instant};

use salus_audit::{AuditEvent, AuditLog, EventKind, PurgeHold};

use super::*;
use crate::{export_checkpoints, list, restore, verify, ObjectKind, RestoreOptions, VerifyOptions};

/// The backup tests' fixture, and the purge hold every trail here is opened with.
struct Fixture {
    base: crate::tests::Fixture,
    hold: PurgeHold,
}

impl std::ops::Deref for Fixture {
    type Target = crate::tests::Fixture;
    fn deref(&self) -> &Self::Target {
        &self.base
    }
}

fn block<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap().block_on(f)
}

/// Waits (up to 60 s) until `cond` holds.
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < Duration::from_secs(60), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Fixture {
    fn new() -> Fixture {
        Fixture { base: crate::tests::Fixture::new(), hold: PurgeHold::new() }
    }

    fn open(&self, retention_days: u32) -> AuditLog {
        let mut cfg = self.settings(&self.trail);
        cfg.retention_days = retention_days;
        cfg.purge_hold = Some(self.hold.clone());
        AuditLog::open(cfg).unwrap()
    }

    fn ship(&self, log: &AuditLog, dest: &Path) -> Shipper {
        let mut s =
            ShipSettings::new(dest.to_str().unwrap(), &self.trail, self.audit_key.clone(), self.backup_key.clone());
        s.instance = "test".into();
        s.min_interval = Duration::from_millis(100);
        s.retry_max_backoff = Duration::from_millis(200);
        s.lag_warning = Duration::ZERO;
        s.shutdown_flush = Duration::from_secs(5);
        Shipper::start(log, s, Some(self.hold.clone())).unwrap()
    }

    /// A server session: open the trail, ship it, record `n` events, close, stop.
    fn session(&self, dest: &Path, n: usize) {
        let log = self.open(2192);
        let shipper = self.ship(&log, dest);
        self.record(&log, n);
        log.close().unwrap();
        shipper.stop();
    }

    fn record(&self, log: &AuditLog, n: usize) {
        for i in 0..n {
            log.record_blocking(AuditEvent::new(EventKind::InferenceStarted).request_id(format!("req-{i}"))).unwrap();
        }
    }

    fn sealed(&self) -> Vec<u64> {
        let mut v: Vec<u64> = std::fs::read_dir(&self.trail)
            .unwrap()
            .filter_map(|e| salus_audit::parse_segment_name(e.unwrap().file_name().to_str().unwrap()))
            .filter(|(_, sealed)| *sealed)
            .map(|(i, _)| i)
            .collect();
        v.sort_unstable();
        v
    }

    fn local_checkpoint(&self) -> Checkpoint {
        serde_json::from_slice(&std::fs::read(self.trail.join("checkpoint.json")).unwrap()).unwrap()
    }
}

fn target(dest: &Path) -> Arc<Target> {
    Arc::new(Target::open(dest.to_str().unwrap(), &TargetOptions::default()).unwrap())
}

fn newest(dest: &Path) -> Manifest {
    let all = block(list(&target(dest))).unwrap();
    all.last().expect("a backup").manifest.clone().unwrap()
}

#[test]
fn segments_ship_as_they_seal_and_the_destination_restores_and_verifies() {
    let f = Fixture::new();
    let dest = f.root.join("dest");
    let log = f.open(2192);
    let shipper = f.ship(&log, &dest);
    let monitor = shipper.monitor();
    f.record(&log, 80);
    let sealed = f.sealed();
    assert!(sealed.len() >= 3, "{sealed:?}");
    let last_sealed = *sealed.last().unwrap();
    wait_for("the sealed segments to ship", || monitor.status().shipped_segment >= last_sealed);
    let st = monitor.status();
    assert!(st.shipments >= 1 && st.uploaded_objects >= sealed.len() as u64, "{st:?}");
    assert_eq!(f.hold.through(), st.shipped_segment, "the purge may go as far as what is shipped");
    let m = newest(&dest);
    let shipped: Vec<u64> =
        m.objects.iter().filter(|o| o.kind == ObjectKind::SealedSegment).filter_map(|o| o.segment).collect();
    assert!(sealed.iter().all(|i| shipped.contains(i)), "sealed {sealed:?}, shipped {shipped:?}");
    wait_for("no lag", || monitor.status().lag_segments == 0);

    // Closing writes server.stopped and the final checkpoint: the last shipment carries them.
    log.close().unwrap();
    shipper.stop();
    let ckpt = f.local_checkpoint();
    let m = newest(&dest);
    assert_eq!((m.trail.checkpoint_records, m.trail.last_seq), (ckpt.records, ckpt.records));
    let v = block(verify(target(&dest), f.verify_opts(), Arc::new(NoProgress))).unwrap();
    assert!(v.pinned && v.manifests >= 2, "{v:?}");

    let to = f.root.join("restored");
    let opts = RestoreOptions { to: to.clone(), files_to: None, at: None, verify: f.verify_opts() };
    let r = block(restore(target(&dest), opts, Arc::new(NoProgress))).unwrap();
    let local = salus_audit::verify_trail(&f.trail, &f.audit_key, None).unwrap();
    let restored = salus_audit::verify_trail(&to, &f.audit_key, None).unwrap();
    assert_eq!((restored.last_seq, &restored.chain_head), (local.last_seq, &local.chain_head));
    assert_eq!(r.verified.unwrap().last_seq, local.last_seq);
}

#[test]
fn a_restart_resumes_from_the_destination_without_uploading_again() {
    let f = Fixture::new();
    let dest = f.root.join("dest");
    f.session(&dest, 60);
    let before: std::collections::HashSet<String> =
        block(target(&dest).list("objects/")).unwrap().into_iter().map(|(n, _)| n).collect();
    let first = newest(&dest);

    // A new session: server.started and a checkpoint are new, nothing else. The
    // destination can be read but not written yet (a file where objects/ was).
    let objects = dest.join("objects");
    std::fs::rename(&objects, dest.join("objects.away")).unwrap();
    std::fs::write(&objects, b"not a directory").unwrap();
    let log = f.open(2192);
    let shipper = f.ship(&log, &dest);
    let monitor = shipper.monitor();
    // What the destination holds is known before anything is shipped: no lag, the purge released.
    let through = first.trail.last_segment - 1;
    wait_for("the destination's newest manifest", || {
        let s = monitor.status();
        s.failures >= 1 && s.shipped_segment == through && s.lag_segments == 0
    });
    assert_eq!((monitor.status().shipments, f.hold.through()), (0, through));
    std::fs::remove_file(&objects).unwrap();
    std::fs::rename(dest.join("objects.away"), &objects).unwrap();
    wait_for("the new checkpoint to ship", || monitor.status().shipments >= 1);
    let st = monitor.status();
    assert_eq!(st.shipped_segment, through, "resumed from the newest manifest");
    // The open segment's new records and the checkpoint: two objects, no segment again.
    assert!(st.uploaded_objects <= 2, "{st:?}");
    let m = newest(&dest);
    assert_eq!(m.number, first.number + 1);
    for o in m.objects.iter().filter(|o| o.kind == ObjectKind::SealedSegment) {
        assert!(o.parts.iter().all(|p| before.contains(&p.object)), "{} uploaded again", o.path);
    }
    log.close().unwrap();
    shipper.stop();
}

#[test]
fn a_failing_destination_holds_back_the_purge_and_catches_up_when_it_recovers() {
    let f = Fixture::new();
    let dest = f.root.join("dest");
    // A file where the directory should be: every request to the destination fails.
    std::fs::write(&dest, b"not a directory").unwrap();
    let log = f.open(2192);
    let shipper = f.ship(&log, &dest);
    let monitor = shipper.monitor();
    f.record(&log, 60);
    let sealed = f.sealed();
    assert!(sealed.len() >= 2, "{sealed:?}");
    wait_for("failures and lag", || {
        let s = monitor.status();
        s.failures >= 2 && s.failing && s.lag_segments == sealed.len() as u64 && s.lagging
    });
    assert_eq!(f.hold.through(), 0);
    log.close().unwrap();
    shipper.stop();

    // Every sealed segment is past retention (0 days) but none is shipped: none is purged.
    let log = f.open(0);
    assert_eq!(f.sealed(), sealed, "unshipped segments were purged");

    // The destination comes back: the shipper catches up and releases the purge.
    std::fs::remove_file(&dest).unwrap();
    let shipper = f.ship(&log, &dest);
    let monitor = shipper.monitor();
    wait_for("the catch-up", || {
        let s = monitor.status();
        s.shipments >= 1 && s.lag_segments == 0 && !s.failing
    });
    assert!(f.hold.through() >= *sealed.last().unwrap());
    log.close().unwrap();
    shipper.stop();
    let through = f.hold.through();
    f.open(0).close().unwrap();
    let left = f.sealed();
    assert!(left.iter().all(|i| *i > through), "purged up to {through}: {left:?}");
    assert!(sealed.iter().all(|i| !left.contains(i)), "shipped segments are purged once expired: {left:?}");
    salus_audit::verify_trail(&f.trail, &f.audit_key, None).unwrap();
    block(verify(target(&dest), f.verify_opts(), Arc::new(NoProgress))).unwrap();
}

#[test]
fn shipped_checkpoints_catch_a_trail_rolled_back_to_an_older_copy() {
    let f = Fixture::new();
    let dest = f.root.join("dest");
    f.session(&dest, 30);
    // The copy an attacker (or a bad restore) would put back later.
    let old = f.root.join("old");
    std::fs::create_dir(&old).unwrap();
    for e in std::fs::read_dir(&f.trail).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), old.join(e.file_name())).unwrap();
    }
    // Too few records to seal a segment: only the checkpoints ship the new records.
    f.session(&dest, 3);

    let ckpts = f.root.join("ckpts");
    let opts = VerifyOptions { anchor_dir: None, ..f.verify_opts() };
    let n = block(export_checkpoints(target(&dest), opts, &ckpts)).unwrap();
    assert!(n >= 2, "{n} checkpoints");
    salus_audit::verify_trail(&f.trail, &f.audit_key, Some(&ckpts)).unwrap();
    salus_audit::verify_trail(&old, &f.audit_key, None).unwrap();
    let e = salus_audit::verify_trail(&old, &f.audit_key, Some(&ckpts)).unwrap_err().to_string();
    assert!(e.contains("trail truncated"), "{e}");
}
