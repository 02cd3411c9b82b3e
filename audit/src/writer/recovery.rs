//! Opening a trail: bringing the directory to a consistent state (a torn
//! tail cut and noted, damage refused) and positioning the writer at its end.
//! Kept apart from the record path in `writer.rs`; it runs once, in
//! [`AuditLog::open`].

use super::*;
use crate::event::AuditRecord;
use crate::segment::segment_records;

impl Writer {
    /// Brings the directory to a consistent state and positions the writer at its end.
    pub(super) fn recover(
        cfg: AuditLogSettings,
        keys: Arc<AuditKeys>,
        shared: Arc<Shared>,
        lock: File,
    ) -> Result<Recovered, AuditError> {
        let dir = cfg.dir.clone();
        let io = |what: String| move |e| AuditError::io(what, e);
        let mut notes = serde_json::Map::new();
        let files = list_segments(&dir).map_err(io(format!("listing {}", dir.display())))?;
        let mut logs = std::collections::BTreeSet::new();
        let mut sealed = std::collections::BTreeSet::new();
        for (f, path) in &files {
            match f {
                SegFile::SealedTmp(_) | SegFile::LogTmp(_) => {
                    std::fs::remove_file(path).map_err(io(format!("removing {}", path.display())))?;
                    let note = if matches!(f, SegFile::LogTmp(_)) {
                        "removed_partial_segment"
                    } else {
                        "removed_partial_seal"
                    };
                    notes.insert(note.into(), json!(true));
                }
                SegFile::Log(i) => drop(logs.insert(*i)),
                SegFile::Sealed(i) => drop(sealed.insert(*i)),
            }
        }
        // A crash between sealing and deleting the .log leaves both: keep the sealed one.
        for i in logs.intersection(&sealed).copied().collect::<Vec<_>>() {
            let name = sealed_name(i);
            let bytes = std::fs::read(dir.join(&name)).map_err(io(format!("reading {name}")))?;
            decode_sealed(&keys, &bytes).map_err(|p| integrity(&name, None, p))?;
            std::fs::remove_file(dir.join(log_name(i))).map_err(io(format!("removing {}", log_name(i))))?;
            logs.remove(&i);
        }
        // A last `.log` shorter than its header was being created when the
        // process died (builds before segments were created under a temporary
        // name could leave one): no record was ever appended to it. Remove it;
        // the trail then ends where the segment before it ended, and the open
        // segment is created (or reopened) from there.
        if let Some(&l) = logs.iter().max().filter(|&&l| sealed.iter().all(|&s| s < l)) {
            let path = dir.join(log_name(l));
            let len = std::fs::metadata(&path).map_err(io(format!("reading {}", log_name(l))))?.len();
            if len < LOG_HEADER_LEN as u64 {
                std::fs::remove_file(&path).map_err(io(format!("removing {}", log_name(l))))?;
                notes.insert(
                    "interrupted_segment_creation".into(),
                    json!({ "segment": log_name(l), "header_bytes": len }),
                );
                logs.remove(&l);
            }
        }
        let max_index = logs.iter().chain(sealed.iter()).max().copied();
        let last_log = logs.iter().max().copied().filter(|l| Some(*l) == max_index);
        // Full segments that were rolled but not yet sealed: seal them now.
        for &i in logs.iter().filter(|&&i| Some(i) != last_log) {
            seal_log(&dir, &keys, i)?;
            notes.insert("sealed_at_startup".into(), json!(true));
        }
        sync_dir(&dir).map_err(io(format!("syncing {}", dir.display())))?;

        let (seg, tail) = match (max_index, last_log) {
            (None, _) => {
                let seg = OpenSegment::create(&dir, &keys, 1, 1).map_err(io("creating segment 1".into()))?;
                (seg, Tail { next_seq: 1, last_hash: [0; 32], last_kind: None })
            }
            (Some(_), Some(l)) => reopen_log(&dir, &keys, l, &mut notes)?,
            (Some(m), None) => {
                // The trail ends in a sealed segment: the open segment is gone.
                let tail = sealed_tail(&dir, &keys, m)?;
                if !notes.contains_key("interrupted_segment_creation") {
                    notes.insert("open_segment_missing".into(), json!(log_name(m + 1)));
                }
                let seg = OpenSegment::create(&dir, &keys, m + 1, tail.next_seq)
                    .map_err(io(format!("creating {}", log_name(m + 1))))?;
                (seg, tail)
            }
        };
        let mut interrupted = Vec::new();
        if tail.last_kind.as_deref().is_some_and(|k| k != EventKind::ServerStopped.as_str()) {
            notes.insert("unclean_shutdown".into(), json!(true));
            // Newest first: the open segment, then every sealed one.
            let mut segments: Vec<(u64, bool)> = sealed.iter().map(|&i| (i, true)).collect();
            segments.extend(logs.iter().filter(|&&i| Some(i) != last_log).map(|&i| (i, true)));
            segments.extend(last_log.map(|i| (i, false)));
            segments.sort_unstable_by_key(|s| std::cmp::Reverse(s.0));
            interrupted = unfinished_inferences(&dir, &keys, &segments)?;
            notes.insert("interrupted_inferences".into(), json!(interrupted.len()));
        }
        let writer = Writer {
            cfg,
            keys,
            shared,
            _lock: lock,
            seg,
            next_seq: tail.next_seq,
            last_hash: tail.last_hash,
            durable: ChainPos { next_seq: tail.next_seq, last_hash: tail.last_hash },
            buf: Vec::with_capacity(1 << 16),
            since_ckpt: 0,
            last_ckpt: Instant::now(),
            last_purge: Instant::now(),
            house: None,
            committer: None,
            in_flight: false,
            pending: Vec::new(),
            spare: Vec::new(),
            deferred: std::collections::VecDeque::new(),
            pending_since: None,
            last_job_records: 0,
            sync_ewma: Duration::ZERO,
            session: None,
        };
        let notes = (!notes.is_empty()).then_some(serde_json::Value::Object(notes));
        Ok(Recovered { writer, notes, interrupted })
    }
}

/// What opening a trail found.
pub(super) struct Recovered {
    pub writer: Writer,
    /// The detail of `audit.recovered`, when anything was repaired or the
    /// last session did not end cleanly.
    pub notes: Option<serde_json::Value>,
    /// The `inference.started` records of the last session with no outcome.
    pub interrupted: Vec<AuditRecord>,
}

/// The `inference.started` records of the last session (back to its
/// `server.started`) that have no outcome record, oldest first. `segments`
/// are (index, sealed), newest first; only the last session's are read.
fn unfinished_inferences(
    dir: &Path,
    keys: &AuditKeys,
    segments: &[(u64, bool)],
) -> Result<Vec<AuditRecord>, AuditError> {
    let mut finished = std::collections::HashSet::new();
    let mut open = Vec::new();
    for &(index, sealed) in segments {
        for raw in segment_records(dir, keys, index, sealed)?.iter().rev() {
            let Ok(r) = serde_json::from_slice::<AuditRecord>(raw) else { continue };
            match r.kind.as_str() {
                k if k == EventKind::ServerStarted.as_str() => {
                    open.reverse();
                    return Ok(open);
                }
                k if k == EventKind::InferenceStarted.as_str()
                    && r.request_id.as_ref().is_some_and(|id| !finished.contains(id)) =>
                {
                    open.push(r);
                }
                k if k == EventKind::InferenceStarted.as_str() => {}
                k if k.starts_with("inference.") => {
                    finished.extend(r.request_id);
                }
                _ => {}
            }
        }
    }
    open.reverse();
    Ok(open)
}

/// The `inference.interrupted` event for an inference that never finished:
/// the same request, principal, source, operation and model as its start.
pub(super) fn interrupted_event(started: &AuditRecord) -> AuditEvent {
    let mut ev = AuditEvent::new(EventKind::InferenceInterrupted).outcome_reason("server_restarted");
    ev.request_id = started.request_id.clone();
    ev.principal = started.principal.clone();
    ev.source_addr = started.source_addr.as_deref().and_then(|a| a.parse().ok());
    ev.operation = match started.operation.as_deref() {
        Some("chat.completions") => Some("chat.completions"),
        Some("completions") => Some("completions"),
        _ => None,
    };
    ev.model = started.model.clone();
    ev
}
