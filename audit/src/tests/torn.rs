//! A crash mid-write or mid-creation is repaired at open; damage is refused.
//! (Split from `tests.rs`, whose helpers these use.)

use super::*;

#[test]
fn torn_tail_is_cut_and_recorded_on_reopen() {
    let t = build(5, 1 << 20);
    let path = t.path(&log_name(1));
    let orig = std::fs::read(&path).unwrap();
    let last = frames(&orig).pop().unwrap();
    // A crash mid-write: half of a copy of the last frame appended.
    let mut torn = orig.clone();
    torn.extend_from_slice(&orig[last.start..last.start + last.len() / 2]);
    std::fs::write(&path, &torn).unwrap();
    // Offline: named as a torn tail the server repairs, not as tampering, and
    // still an error (the trail is not whole until then).
    let offline = err_text(t.verify());
    assert!(offline.contains("torn tail") && offline.contains("not tampering"), "{offline}");
    assert!(offline.contains("the server cuts it"), "{offline}");
    let log = t.open(1 << 20);
    log.close().unwrap();
    t.verify().unwrap();
    let recs = t.records();
    assert_eq!(recs.len(), 7 + 3);
    let rec = recs.iter().find(|r| r.kind == "audit.recovered").unwrap();
    let torn = &rec.detail.as_ref().unwrap()["torn_tail"];
    assert_eq!(torn["bytes_cut"], last.len() / 2);
    assert_eq!(torn["offset"], orig.len());
}

/// Segment indexes of the trail's files, `(index, sealed)`, in order.
fn segment_files(t: &Trail) -> Vec<(u64, bool)> {
    let mut out: Vec<_> = std::fs::read_dir(&t.dir)
        .unwrap()
        .filter_map(|e| crate::snapshot::parse_segment_name(e.unwrap().file_name().to_str()?))
        .collect();
    out.sort_unstable();
    out
}

/// CI caught this in `kill_9_keeps_every_acknowledged_record`: a kill between
/// creating the next segment file and writing its header left an empty
/// `.log` that every later start refused ("header truncated (0 of 100
/// bytes)"), so the server could not come back. Segments are now created
/// under a temporary name and linked whole; a short last `.log` left by an
/// older build, and a leftover temporary, are repaired at open.
#[test]
fn regression_kill_between_segment_creation_and_header_write() {
    for header_bytes in [0usize, 37] {
        let t = build(40, 4 << 10);
        let files = segment_files(&t);
        let &(last, sealed) = files.last().unwrap();
        assert!(!sealed && files.len() > 2, "several segments: {files:?}");
        let before = t.records();
        // What the old creation could leave: the next `.log` with none or
        // part of its header; and what the new one can: a temporary.
        std::fs::write(t.path(&log_name(last + 1)), vec![0u8; header_bytes]).unwrap();
        std::fs::write(t.path(&format!("seg-{:016}.log.tmp", last + 2)), b"partial").unwrap();
        let offline = err_text(t.verify());
        assert!(offline.contains("creation a crash interrupted"), "{offline}");
        let log = t.open(4 << 10);
        log.record_blocking(inference(&log, 99)).unwrap();
        log.close().unwrap();
        t.verify().unwrap();
        let after = t.records();
        assert_eq!(&after[..before.len()], &before[..], "no record lost or changed");
        let rec = after.iter().find(|r| r.kind == "audit.recovered").unwrap();
        let detail = rec.detail.as_ref().unwrap();
        assert_eq!(detail["interrupted_segment_creation"]["header_bytes"], header_bytes);
        assert_eq!(detail["removed_partial_segment"], true);
        assert!(detail.get("open_segment_missing").is_none(), "{detail:?}");
        assert!(!t.path(&format!("seg-{:016}.log.tmp", last + 2)).exists());
        assert!(after.iter().any(|r| r.request_id.as_deref() == Some("req-99")));
    }
}

#[test]
fn damage_in_the_middle_is_not_mistaken_for_a_torn_tail() {
    let t = build(5, 1 << 20);
    let path = t.path(&log_name(1));
    let mut bytes = std::fs::read(&path).unwrap();
    let f = frames(&bytes);
    bytes[f[2].end - 3] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    let err = AuditLog::open(t.config(1 << 20)).err().expect("must refuse to open");
    assert!(matches!(err, AuditError::Integrity(_)), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), bytes, "nothing cut");
}

#[test]
fn long_unreadable_tail_is_damage_not_a_torn_write() {
    let t = build(3, 1 << 20);
    let path = t.path(&log_name(1));
    let mut bytes = std::fs::read(&path).unwrap();
    let n = bytes.len();
    bytes.extend(std::iter::repeat_n(0xa5u8, 6 << 20));
    std::fs::write(&path, &bytes).unwrap();
    let err = AuditLog::open(t.config(1 << 20)).err().expect("must refuse to open");
    assert!(err.to_string().contains("not cutting"), "{err}");
    assert_eq!(std::fs::metadata(&path).unwrap().len() as usize, n + (6 << 20));
}
