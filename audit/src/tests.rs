//! Behaviour of the audit trail: durability, tamper evidence, fail-closed
//! writes, recovery, retention, concurrency.

use std::path::{Path, PathBuf};
use std::time::Duration;

use salus_sensitive::Phi;

use super::format::{log_name, sealed_name, FRAME_HEADER_LEN, LOG_HEADER_LEN};
use super::*;
use salus_sensitive::secret::{write_new_key_file, KeySource, SecretKey};

mod torn;

const SECRET_TEXT: &str = "patient Jane Roe, MRN 99812, HIV positive";

struct Trail {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    ckpt_dir: PathBuf,
    key: SecretKey,
    source: KeySource,
}

impl Trail {
    fn new() -> Trail {
        let tmp = tempfile::tempdir().unwrap();
        let key_path = tmp.path().join("audit.key");
        let key = write_new_key_file(&key_path).unwrap();
        let source = KeySource::File(key_path);
        let dir = tmp.path().join("audit");
        let ckpt_dir = tmp.path().join("worm");
        Trail { _tmp: tmp, dir, ckpt_dir, key, source }
    }

    fn config(&self, segment_max_bytes: u64) -> AuditLogSettings {
        let mut c = AuditLogSettings::new(&self.dir, self.source.clone());
        c.checkpoint_dir = Some(self.ckpt_dir.clone());
        c.segment_max_bytes = segment_max_bytes;
        c.checkpoint_every_records = 5;
        c.instance = "test-host".into();
        c
    }

    fn open(&self, segment_max_bytes: u64) -> AuditLog {
        AuditLog::open(self.config(segment_max_bytes)).unwrap()
    }

    fn verify(&self) -> Result<TrailReport, AuditError> {
        verify_trail(&self.dir, &self.key, Some(&self.ckpt_dir))
    }

    fn records(&self) -> Vec<AuditRecord> {
        let mut out = Vec::new();
        read_trail(&self.dir, &self.key, |r, _| out.push(r.clone())).unwrap();
        out
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn segment_files(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&self.dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with("seg-"))
            .collect();
        v.sort();
        v
    }
}

fn inference(log: &AuditLog, i: u32) -> AuditEvent {
    let prompt = Phi::new(format!("{SECRET_TEXT} #{i}"));
    AuditEvent::new(EventKind::InferenceStarted)
        .request_id(format!("req-{i}"))
        .principal(AuditPrincipal::new(format!("user-{}", i % 3), "api_key", ["clinician"]))
        .source_addr("10.0.0.7:4711".parse().unwrap())
        .operation("chat.completions")
        .model("smollm2-135m", "sha256:0123abcd")
        .params(InferenceParams {
            temperature: Some(0.7),
            max_tokens: Some(64),
            stream: Some(false),
            ..Default::default()
        })
        .prompt_hmac(log.hmac(&prompt))
}

/// A closed trail with `n` inference events; small segments so several are sealed.
fn build(n: u32, segment_max_bytes: u64) -> Trail {
    let t = Trail::new();
    let log = t.open(segment_max_bytes);
    for i in 0..n {
        log.record_blocking(inference(&log, i)).unwrap();
    }
    log.close().unwrap();
    t
}

/// Byte offsets of the frames of a `.log` file.
fn frames(bytes: &[u8]) -> Vec<std::ops::Range<usize>> {
    let mut pos = LOG_HEADER_LEN;
    let mut out = Vec::new();
    while pos + FRAME_HEADER_LEN <= bytes.len() {
        let len = u32::from_le_bytes(bytes[pos..pos + 4].try_into().unwrap()) as usize + FRAME_HEADER_LEN;
        out.push(pos..pos + len);
        pos += len;
    }
    out
}

fn err_text(r: Result<TrailReport, AuditError>) -> String {
    match r {
        Ok(rep) => panic!("verification passed but must fail: {rep:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn untouched_trail_verifies_reads_back_and_holds_no_phi() {
    let t = build(30, 4096);
    let rep = t.verify().unwrap();
    assert_eq!(rep.records, 32, "server.started + 30 + server.stopped");
    assert_eq!((rep.first_seq, rep.last_seq), (1, 32));
    assert!(rep.sealed_segments >= 2, "small segments must have been sealed: {rep:?}");
    assert_eq!(rep.checkpoints.len(), 2);
    let recs = t.records();
    assert_eq!(recs.first().unwrap().kind, "server.started");
    assert_eq!(recs.last().unwrap().kind, "server.stopped");
    let keys = AuditKeys::from_master(&t.key);
    let r5 = &recs[6];
    assert_eq!(r5.request_id.as_deref(), Some("req-5"));
    assert_eq!(r5.prompt_hmac.as_deref(), Some(keys.hmac_hex(format!("{SECRET_TEXT} #5").as_bytes()).as_str()));
    assert_eq!(r5.action, AuditAction::Execute);
    assert_eq!(r5.params.as_ref().unwrap().max_tokens, Some(64));
    // Neither the text nor any identifier is readable on disk (everything encrypted).
    for entry in std::fs::read_dir(&t.dir).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        let hay = String::from_utf8_lossy(&bytes);
        assert!(!hay.contains("Jane Roe") && !hay.contains("user-1") && !hay.contains("req-5"));
    }
}

#[test]
fn any_flipped_byte_is_detected() {
    let t = build(12, 4096);
    t.verify().unwrap();
    let mut files = t.segment_files();
    files.push("checkpoint.json".into());
    let mut checked = 0;
    for name in files {
        let path = t.path(&name);
        let orig = std::fs::read(&path).unwrap();
        let mut offsets: Vec<usize> = (0..orig.len().min(200)).collect();
        offsets.extend((200..orig.len()).step_by(13));
        offsets.push(orig.len() - 1);
        for off in offsets {
            let mut bad = orig.clone();
            bad[off] ^= 0x5a;
            std::fs::write(&path, &bad).unwrap();
            let msg = err_text(t.verify());
            assert!(msg.contains(&name), "flip at {name}:{off} reported without the file: {msg}");
            checked += 1;
        }
        std::fs::write(&path, &orig).unwrap();
    }
    assert!(checked > 500);
    t.verify().unwrap();
}

#[test]
fn deleted_swapped_duplicated_or_truncated_records_are_detected() {
    let t = build(8, 1 << 20); // everything in one open segment
    let name = log_name(1);
    let path = t.path(&name);
    let orig = std::fs::read(&path).unwrap();
    let f = frames(&orig);
    assert_eq!(f.len(), 10);
    let splice = |parts: &[std::ops::Range<usize>]| -> Vec<u8> {
        let mut out = orig[..LOG_HEADER_LEN].to_vec();
        for r in parts {
            out.extend_from_slice(&orig[r.clone()]);
        }
        out
    };
    let mut deleted = f.clone();
    deleted.remove(4);
    let mut swapped = f.clone();
    swapped.swap(4, 5);
    let mut duplicated = f.clone();
    duplicated.insert(5, f[4].clone());
    let cases = [
        ("deleted", splice(&deleted), "seq 6"),
        ("swapped", splice(&swapped), "seq 6"),
        ("duplicated", splice(&duplicated), "seq 5"),
        ("cut at a record boundary", splice(&f[..9]), "truncated"),
        ("cut inside a record", orig[..orig.len() - 7].to_vec(), "torn tail"),
    ];
    for (what, bytes, expect) in cases {
        std::fs::write(&path, &bytes).unwrap();
        let msg = err_text(t.verify());
        assert!(msg.contains(&name) || msg.contains("checkpoint"), "{what}: {msg}");
        assert!(msg.contains(expect), "{what}: expected '{expect}' in: {msg}");
    }
    std::fs::write(&path, &orig).unwrap();
    t.verify().unwrap();
}

#[test]
fn deleted_swapped_or_duplicated_segments_are_detected() {
    let t = build(30, 4096);
    let files = t.segment_files();
    assert!(files.len() >= 4, "{files:?}");
    let backup: Vec<(String, Vec<u8>)> = files.iter().map(|n| (n.clone(), std::fs::read(t.path(n)).unwrap())).collect();
    let restore = || {
        for n in t.segment_files() {
            std::fs::remove_file(t.path(&n)).unwrap();
        }
        for (n, b) in &backup {
            std::fs::write(t.path(n), b).unwrap();
        }
    };
    let (s1, s2, s3) = (sealed_name(1), sealed_name(2), sealed_name(3));

    std::fs::remove_file(t.path(&s2)).unwrap();
    let msg = err_text(t.verify());
    assert!(msg.contains(&s2) && msg.contains("missing"), "{msg}");
    restore();

    std::fs::rename(t.path(&s2), t.path("tmp")).unwrap();
    std::fs::rename(t.path(&s3), t.path(&s2)).unwrap();
    std::fs::rename(t.path("tmp"), t.path(&s3)).unwrap();
    let msg = err_text(t.verify());
    assert!(msg.contains(&s2) && msg.contains("renamed or swapped"), "{msg}");
    restore();

    std::fs::copy(t.path(&s2), t.path(&s3)).unwrap();
    let msg = err_text(t.verify());
    assert!(msg.contains(&s3), "{msg}");
    restore();

    std::fs::remove_file(t.path(&s1)).unwrap();
    let msg = err_text(t.verify());
    assert!(msg.contains(&s1) && msg.contains("no audit.purged"), "{msg}");
    restore();

    let last = files.iter().rev().find(|n| n.ends_with(".log")).unwrap().clone();
    std::fs::remove_file(t.path(&last)).unwrap();
    let msg = err_text(t.verify());
    assert!(msg.contains("open segment missing"), "{msg}");
    restore();
    t.verify().unwrap();
}

#[test]
fn tail_truncation_with_rolled_back_checkpoint_is_caught_by_the_second_directory() {
    let t = build(8, 1 << 20);
    let path = t.path(&log_name(1));
    let orig = std::fs::read(&path).unwrap();
    let f = frames(&orig);
    // Attacker removes the last two records and puts back an older (validly signed) checkpoint.
    std::fs::write(&path, &orig[..f[f.len() - 3].end]).unwrap();
    let kept = (f.len() - 2) as u64;
    let older = std::fs::read_dir(&t.ckpt_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| Checkpoint::read(p).unwrap().records <= kept)
        .max()
        .unwrap();
    std::fs::copy(&older, t.path("checkpoint.json")).unwrap();
    verify_trail(&t.dir, &t.key, None).expect("the local checkpoint alone is fooled");
    let msg = err_text(t.verify());
    assert!(msg.contains("trail truncated"), "{msg}");
}

#[test]
fn verification_needs_the_right_key() {
    let t = build(3, 1 << 20);
    let other = SecretKey::generate();
    let msg = err_text(verify_trail(&t.dir, &other, None));
    assert!(msg.contains("key"), "{msg}");
}

#[test]
fn injected_write_failure_fails_closed_until_writes_succeed() {
    let t = Trail::new();
    let log = t.open(1 << 20);
    log.record_blocking(inference(&log, 1)).unwrap();
    assert!(log.is_healthy());
    log.inject_write_failures(1_000);
    let err = log.record_blocking(inference(&log, 2)).unwrap_err();
    assert!(matches!(err, AuditError::Io { .. }), "{err}");
    assert!(!log.is_healthy());
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    assert!(rt.block_on(log.record(inference(&log, 3))).is_err());
    std::thread::sleep(Duration::from_millis(600));
    assert!(!log.is_healthy(), "probes must keep failing while the disk fails");
    log.inject_write_failures(0);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !log.is_healthy() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(log.is_healthy(), "a successful probe restores health");
    // One more failure right before a write: the half-written batch must not survive.
    log.inject_write_failures(1);
    assert!(log.record_blocking(inference(&log, 4)).is_err());
    let ok = log.record_blocking(inference(&log, 5)).unwrap();
    assert!(log.is_healthy());
    assert_eq!(ok.seq, 3, "failed records never got a seq");
    log.close().unwrap();
    t.verify().unwrap();
    let ids: Vec<_> = t.records().into_iter().filter_map(|r| r.request_id).collect();
    assert_eq!(ids, ["req-1", "req-5"]);
}

#[test]
fn oversized_record_is_refused_alone() {
    let t = Trail::new();
    let log = t.open(1 << 20);
    let huge = AuditEvent::new(EventKind::AdminConfigReloaded).target("x".repeat(100 << 10));
    assert!(matches!(log.record_blocking(huge), Err(AuditError::RecordTooLarge { .. })));
    assert!(log.is_healthy());
    assert_eq!(log.record_blocking(inference(&log, 1)).unwrap().seq, 2);
    log.close().unwrap();
    t.verify().unwrap();
}

#[test]
fn crash_keeps_every_acknowledged_record() {
    let t = Trail::new();
    let log = t.open(8192);
    let receipts: Vec<RecordReceipt> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..8)
            .map(|w| {
                let log = log.clone();
                s.spawn(move || {
                    (0..25).map(|i| log.record_blocking(inference(&log, w * 100 + i)).unwrap()).collect::<Vec<_>>()
                })
            })
            .collect();
        hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    drop(log); // no close: no server.stopped, no final checkpoint
    let log = t.open(8192);
    log.close().unwrap();
    t.verify().unwrap();
    let recs = t.records();
    for r in &receipts {
        let rec = &recs[(r.seq - 1) as usize];
        assert_eq!((rec.seq, &rec.event_id), (r.seq, &r.event_id));
    }
    let rec = recs.iter().find(|r| r.kind == "audit.recovered").expect("unclean shutdown recorded");
    assert_eq!(rec.detail.as_ref().unwrap()["unclean_shutdown"], true);
}

/// Child side of `kill_9_keeps_every_acknowledged_record` (run only by it).
#[test]
#[ignore = "helper process for kill_9_keeps_every_acknowledged_record"]
fn kill_9_child_writer() {
    use std::io::Write;
    let Ok(dir) = std::env::var("SALUS_AUDIT_CHILD_DIR") else {
        return; // only meaningful when spawned by the parent test
    };
    let mut cfg = AuditLogSettings::new(dir, KeySource::Env("SALUS_AUDIT_CHILD_KEY".into()));
    cfg.segment_max_bytes = 16 << 10;
    let log = AuditLog::open(cfg).unwrap();
    let out = std::sync::Mutex::new(std::io::stdout());
    std::thread::scope(|s| {
        for w in 0..4u32 {
            let (log, out) = (log.clone(), &out);
            s.spawn(move || {
                for i in 0.. {
                    let r = log.record_blocking(inference(&log, w * 1_000_000 + i)).unwrap();
                    let mut o = out.lock().unwrap();
                    writeln!(o, "ACK {} {}", r.seq, r.event_id).unwrap();
                    o.flush().unwrap();
                }
            });
        }
    });
}

#[test]
fn kill_9_keeps_every_acknowledged_record() {
    use std::io::BufRead;
    let t = Trail::new();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "tests::kill_9_child_writer", "--ignored", "--nocapture", "--test-threads=1"])
        .env("SALUS_AUDIT_CHILD_DIR", &t.dir)
        .env("SALUS_AUDIT_CHILD_KEY", t.key.to_hex().as_str())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut acked = Vec::new();
    while acked.len() < 400 {
        let line = lines.next().expect("child ended early").unwrap();
        if let Some(rest) = line.strip_prefix("ACK ") {
            let (seq, id) = rest.split_once(' ').unwrap();
            acked.push((seq.parse::<u64>().unwrap(), id.to_string()));
        }
    }
    child.kill().unwrap(); // SIGKILL, mid-stream
    child.wait().unwrap();
    for line in lines.map_while(Result::ok) {
        if let Some(rest) = line.strip_prefix("ACK ") {
            let (seq, id) = rest.split_once(' ').unwrap();
            acked.push((seq.parse::<u64>().unwrap(), id.to_string()));
        }
    }
    let log = t.open(16 << 10);
    log.close().unwrap();
    verify_trail(&t.dir, &t.key, None).unwrap();
    let recs = t.records();
    for (seq, id) in &acked {
        assert_eq!(&recs[(*seq - 1) as usize].event_id, id, "acknowledged seq {seq} lost or changed");
    }
    assert!(recs.iter().any(|r| r.kind == "audit.recovered"));
}

#[test]
fn concurrent_async_recorders_are_all_durable_and_chained() {
    let t = Trail::new();
    let log = t.open(64 << 10);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let receipts = rt.block_on(async {
        let tasks: Vec<_> = (0..200u32)
            .map(|i| {
                let log = log.clone();
                tokio::spawn(async move {
                    let mut out = Vec::new();
                    for j in 0..10 {
                        out.push(log.record(inference(&log, i * 10 + j)).await.unwrap());
                    }
                    out
                })
            })
            .collect();
        let mut all = Vec::new();
        for task in tasks {
            all.extend(task.await.unwrap());
        }
        all
    });
    log.close().unwrap();
    let rep = t.verify().unwrap();
    assert_eq!(rep.records, 2002);
    let mut seqs: Vec<u64> = receipts.iter().map(|r| r.seq).collect();
    seqs.sort();
    seqs.dedup();
    assert_eq!(seqs.len(), 2000);
    let recs = t.records();
    for r in &receipts {
        assert_eq!(recs[(r.seq - 1) as usize].event_id, r.event_id);
    }
}

#[test]
fn retention_purges_only_expired_sealed_segments_and_records_it() {
    let t = build(30, 4096);
    let before = t.segment_files();
    let sealed = before.iter().filter(|n| n.ends_with(".sealed")).count();
    // Default retention (six years): nothing goes.
    t.open(4096).close().unwrap();
    assert_eq!(t.segment_files().iter().filter(|n| n.ends_with(".sealed")).count(), sealed);
    // Retention 0 days: every sealed segment is expired; the open one stays.
    let mut cfg = t.config(4096);
    cfg.retention_days = 0;
    AuditLog::open(cfg).unwrap().close().unwrap();
    let after = t.segment_files();
    assert!(!after.contains(&sealed_name(1)));
    assert!(after.iter().any(|n| n.ends_with(".log")));
    let rep = t.verify().unwrap();
    assert!(rep.purged_segments >= sealed as u64, "{rep:?}");
    let purged: Vec<_> = t.records().into_iter().filter(|r| r.kind == "audit.purged").collect();
    assert_eq!(purged.len(), sealed);
    assert_eq!(purged[0].target.as_deref(), Some(sealed_name(1).as_str()));
}

#[test]
fn purge_keeps_segments_a_purge_hold_has_not_released() {
    let t = build(30, 4096);
    let sealed = |t: &Trail| t.segment_files().into_iter().filter(|n| n.ends_with(".sealed")).collect::<Vec<_>>();
    let before = sealed(&t);
    assert!(before.len() >= 3, "{before:?}");
    // Everything is expired (0 days), nothing is shipped: nothing goes.
    let hold = PurgeHold::new();
    let mut cfg = t.config(4096);
    cfg.retention_days = 0;
    cfg.purge_hold = Some(hold.clone());
    AuditLog::open(cfg.clone()).unwrap().close().unwrap();
    assert_eq!(sealed(&t), before, "unshipped segments were purged");
    // Segments 1 and 2 shipped: those go, the rest stays.
    hold.release_through(2);
    hold.release_through(1); // never lowers the watermark
    assert_eq!(hold.through(), 2);
    AuditLog::open(cfg).unwrap().close().unwrap();
    let after = sealed(&t);
    assert!(!after.contains(&sealed_name(1)) && !after.contains(&sealed_name(2)), "{after:?}");
    assert_eq!(after, before[2..].to_vec());
    let purged = t.records().into_iter().filter(|r| r.kind == "audit.purged").count();
    assert_eq!(purged, 2);
    t.verify().unwrap();
}

#[tokio::test]
async fn changes_wake_a_subscriber_on_seal_and_checkpoint() {
    let t = Trail::new();
    let log = t.open(4096);
    let mut changes = log.changes();
    async fn wait(c: &mut TrailChanges) -> Result<bool, tokio::time::error::Elapsed> {
        tokio::time::timeout(Duration::from_secs(10), c.changed()).await
    }
    // Five records: a checkpoint is due (checkpoint_every_records = 5).
    for i in 0..5 {
        log.record(inference(&log, i)).await.unwrap();
    }
    assert_eq!(wait(&mut changes).await, Ok(true), "no notice of the checkpoint");
    log.close().unwrap();
    // The final checkpoint was written; then the log is gone.
    assert_eq!(wait(&mut changes).await, Ok(true));
    drop(log);
    assert_eq!(wait(&mut changes).await, Ok(false), "a closed log still reports changes");
}

#[test]
fn reserved_kinds_second_writer_and_hmacs() {
    let t = Trail::new();
    let log = t.open(1 << 20);
    let e = log.record_blocking(AuditEvent::new(EventKind::ServerStarted)).unwrap_err();
    assert!(matches!(e, AuditError::ReservedKind("server.started")));
    assert!(matches!(AuditLog::open(t.config(1 << 20)), Err(AuditError::Locked(_))));
    let keys = AuditKeys::from_master(&t.key);
    let text = Phi::new(SECRET_TEXT.to_string());
    assert_eq!(log.hmac(&text).as_str(), log.prompt_hmac(SECRET_TEXT.as_bytes()));
    assert_eq!(log.prompt_hmac(b"x"), keys.hmac_hex(b"x"));
    assert_ne!(log.prompt_hmac(b"x"), AuditKeys::from_master(&SecretKey::generate()).hmac_hex(b"x"));
    log.close().unwrap();
    assert!(matches!(log.record_blocking(inference(&log, 1)), Err(AuditError::Closed)));
    assert!(!log.is_healthy());
}

#[test]
fn fhir_export_maps_inference_to_execute_with_agent_and_entities() {
    let t = build(2, 1 << 20);
    let recs = t.records();
    let b = fhir::export_bundle(&recs);
    assert_eq!(b["resourceType"], "Bundle");
    assert_eq!(b["entry"].as_array().unwrap().len(), 4);
    let ev = &b["entry"][1]["resource"];
    assert_eq!(ev["resourceType"], "AuditEvent");
    assert_eq!(ev["action"], "E");
    assert_eq!(ev["outcome"], "0");
    assert_eq!(ev["agent"][0]["who"]["identifier"]["value"], "user-0");
    assert_eq!(ev["agent"][0]["network"]["address"], "10.0.0.7:4711");
    assert_eq!(ev["source"]["site"], "test-host");
    assert_eq!(ev["entity"][0]["what"]["identifier"]["value"], "smollm2-135m");
    assert_eq!(ev["entity"][1]["what"]["identifier"]["value"], recs[1].prompt_hmac.as_deref().unwrap());
}

#[test]
fn record_view_matches_record() {
    let keys = AuditKeys::from_master(&SecretKey::generate());
    let ev = AuditEvent::new(EventKind::InferenceCompleted)
        .request_id("req-\"quoted\"")
        .principal(AuditPrincipal::new("alice@example.org", "api_key", ["clinician", "auditor"]))
        .source_addr("[2001:db8::7]:443".parse().unwrap())
        .operation("chat.completions")
        .outcome_reason("stop")
        .model("smollm2-135m", "sha256:00ff")
        .tokens(12, 34)
        .latency(Duration::from_micros(1234))
        .params(InferenceParams { temperature: Some(0.25), stop_sequences: Some(2), ..Default::default() })
        .prompt_hmac(keys.text_hmac(&Phi::new(String::from("p"))))
        .completion_hmac(keys.text_hmac(&Phi::new(String::from("c"))))
        .target("t")
        .detail(serde_json::json!({ "a": 1, "b": [true, null] }));
    let prev = [0xabu8; 32];
    let prev_hex = hex::encode(prev);
    let view = super::event::RecordView::new(&ev, 42, "2026-01-01T00:00:00Z", "id-1", &prev_hex, "host");
    let view_json = serde_json::to_vec(&view).unwrap();
    let rec = AuditRecord::from_event(ev, 42, "2026-01-01T00:00:00Z".into(), "id-1".into(), &prev, "host");
    assert_eq!(String::from_utf8(view_json.clone()).unwrap(), serde_json::to_string(&rec).unwrap());
    assert_eq!(serde_json::from_slice::<AuditRecord>(&view_json).unwrap(), rec);
}

#[test]
fn hmacs_are_hmac_sha256_under_the_derived_key() {
    use hmac::{Hmac, Mac};
    let master = SecretKey::generate();
    let keys = AuditKeys::from_master(&master);
    let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(master.derive("audit-hmac").expose()).unwrap();
    mac.update(SECRET_TEXT.as_bytes());
    assert_eq!(keys.hmac_hex(SECRET_TEXT.as_bytes()), hex::encode(mac.finalize().into_bytes()));
}

#[test]
fn failure_in_the_pipeline_fails_what_was_encoded_on_top_and_keeps_every_ack() {
    let t = Trail::new();
    let log = t.open(256 << 10);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let results = rt.block_on(async {
        let tasks: Vec<_> = (0..64u32)
            .map(|i| {
                let log = log.clone();
                tokio::spawn(async move {
                    let mut out = Vec::new();
                    for j in 0..40 {
                        if i == 0 && j % 10 == 5 {
                            log.inject_write_failures(1);
                        }
                        out.push(log.record(inference(&log, i * 100 + j)).await);
                    }
                    out
                })
            })
            .collect();
        let mut all = Vec::new();
        for task in tasks {
            all.extend(task.await.unwrap());
        }
        all
    });
    let ok: Vec<RecordReceipt> = results.iter().filter_map(|r| r.as_ref().ok().cloned()).collect();
    let failed = results.len() - ok.len();
    assert!(failed > 0, "injected failures must fail some records");
    log.close().unwrap();
    let rep = t.verify().unwrap();
    let recs = t.records();
    assert_eq!(rep.records as usize, ok.len() + 2, "only acknowledged records (and server.*) are in the trail");
    for r in &ok {
        let rec = &recs[(r.seq - 1) as usize];
        assert_eq!((&rec.event_id, &rec.time), (&r.event_id, &r.time));
        assert_eq!(hex::encode(super::format::leaf_hash(&serde_json::to_vec(rec).unwrap())), r.hash);
    }
}

#[test]
fn tool_sessions_are_marked_and_record_nowait_is_durable_by_close() {
    let t = Trail::new();
    let log = AuditLog::open_tool(t.config(1 << 20), "salus keys").unwrap();
    log.record_nowait(AuditEvent::new(EventKind::AdminConfigReloaded).target("x")).unwrap();
    log.close().unwrap();
    let recs = t.records();
    let kinds: Vec<&str> = recs.iter().map(|r| r.kind.as_str()).collect();
    assert_eq!(kinds, ["server.started", "admin.config_reloaded", "server.stopped"]);
    assert_eq!(recs[0].detail.as_ref().unwrap()["session"], "salus keys");
    assert_eq!(recs[2].detail.as_ref().unwrap()["session"], "salus keys");
    // A plain open afterwards sees a clean shutdown.
    t.open(1 << 20).close().unwrap();
    assert!(!t.records().iter().any(|r| r.kind == "audit.recovered"));
}

#[allow(dead_code)]
fn _assert_send_sync(_: &Path) {
    fn is<T: Send + Sync + Clone>() {}
    is::<AuditLog>();
}

/// Regression (a 0644 checkpoint.json beside 0600 segments): every file the
/// trail writes, in the trail and the checkpoint directory, is private.
#[test]
fn every_file_of_the_trail_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let t = build(40, 4096);
    for dir in [&t.dir, &t.ckpt_dir] {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let mode = e.metadata().unwrap().permissions().mode() & 0o777;
            assert_eq!(mode & 0o077, 0, "{} has mode {mode:o}", e.path().display());
        }
    }
}

/// Regression (requests cut off by a crash had no outcome): on recovery,
/// every `inference.started` of the dead session without an outcome gets
/// `inference.interrupted`, and `audit.recovered` says how many; a clean
/// shutdown or a second start adds none.
#[test]
fn inferences_a_crash_cut_off_are_recorded_as_interrupted() {
    let t = Trail::new();
    let log = t.open(4096); // small segments: the session spans sealed ones too
    for i in 0..30 {
        log.record_blocking(inference(&log, i)).unwrap();
    }
    for i in (0..30).filter(|i| i % 3 == 0) {
        let done = AuditEvent::new(EventKind::InferenceCompleted).request_id(format!("req-{i}"));
        log.record_blocking(done).unwrap();
    }
    drop(log); // no close: the process died
    let log = t.open(4096);
    log.close().unwrap();
    t.open(4096).close().unwrap(); // a clean restart adds nothing
    t.verify().unwrap();
    let recs = t.records();
    let interrupted: Vec<&str> =
        recs.iter().filter(|r| r.kind == "inference.interrupted").map(|r| r.request_id.as_deref().unwrap()).collect();
    let expected: Vec<String> = (0..30).filter(|i| i % 3 != 0).map(|i| format!("req-{i}")).collect();
    assert_eq!(interrupted, expected);
    let first = recs.iter().find(|r| r.kind == "inference.interrupted").unwrap();
    assert_eq!(first.outcome_reason.as_deref(), Some("server_restarted"));
    assert_eq!(first.principal.as_ref().map(|p| p.id.as_str()), Some("user-1"));
    assert_eq!(first.operation.as_deref(), Some("chat.completions"));
    let recovered: Vec<_> = recs.iter().filter(|r| r.kind == "audit.recovered").collect();
    assert_eq!(recovered.len(), 1);
    assert_eq!(recovered[0].detail.as_ref().unwrap()["interrupted_inferences"], 20);
}

/// Regression: the server's auditor API and review index read the live
/// trail, and a frame being written (bytes past the durable seq) made the
/// walk fail as a torn tail. `read_durable` stops at the durable seq.
#[test]
fn read_durable_ignores_a_write_in_progress_past_the_durable_seq() {
    let t = Trail::new();
    let log = t.open(1 << 20);
    for i in 0..7 {
        log.record_blocking(inference(&log, i)).unwrap();
    }
    let durable = log.durable_seq();
    assert!(durable >= 7);
    // Half a frame at the end of the open segment: what a reader can meet
    // while the writer appends.
    let open = t.segment_files().into_iter().rfind(|n| n.ends_with(".log")).unwrap();
    let mut f = std::fs::OpenOptions::new().append(true).open(t.path(&open)).unwrap();
    std::io::Write::write_all(&mut f, &[0x00, 0x00, 0x01, 0x40, 0xde, 0xad]).unwrap();
    drop(f);
    assert!(read_trail_with_keys(log.dir(), log.audit_keys(), |_, _| {}).is_err(), "a plain walk calls it a torn tail");
    let mut seqs = Vec::new();
    let report = read_durable(&log, |r, _| seqs.push(r.seq)).unwrap();
    assert_eq!(seqs, (1..=durable).collect::<Vec<_>>());
    assert_eq!(report.last_seq, durable);
}
