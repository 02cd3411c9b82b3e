//! Opening a trail: bringing the directory to a consistent state (a torn
//! tail cut and noted, damage refused) and positioning the writer at its end.
//! Kept apart from the record path in `writer.rs`; it runs once, in
//! [`AuditLog::open`].

use super::*;

impl Writer {
    /// Brings the directory to a consistent state and positions the writer at its end.
    pub(super) fn recover(
        cfg: AuditLogSettings,
        keys: Arc<AuditKeys>,
        shared: Arc<Shared>,
        lock: File,
    ) -> Result<(Writer, Option<serde_json::Value>), AuditError> {
        let dir = cfg.dir.clone();
        let io = |what: String| move |e| AuditError::io(what, e);
        let mut notes = serde_json::Map::new();
        let files = list_segments(&dir).map_err(io(format!("listing {}", dir.display())))?;
        let mut logs = std::collections::BTreeSet::new();
        let mut sealed = std::collections::BTreeSet::new();
        for (f, path) in &files {
            match f {
                SegFile::SealedTmp(_) => {
                    std::fs::remove_file(path).map_err(io(format!("removing {}", path.display())))?;
                    notes.insert("removed_partial_seal".into(), json!(true));
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
                notes.insert("open_segment_missing".into(), json!(log_name(m + 1)));
                let seg = OpenSegment::create(&dir, &keys, m + 1, tail.next_seq)
                    .map_err(io(format!("creating {}", log_name(m + 1))))?;
                (seg, tail)
            }
        };
        if tail.last_kind.as_deref().is_some_and(|k| k != EventKind::ServerStopped.as_str()) {
            notes.insert("unclean_shutdown".into(), json!(true));
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
        Ok((writer, (!notes.is_empty()).then_some(serde_json::Value::Object(notes))))
    }
}
