//! The writer's housekeeping: when a segment is due to be sealed, when a
//! checkpoint is due, sealing (rolling) the open segment, writing checkpoints
//! (on the housekeeper thread, which tells [`AuditLog::changes`] subscribers),
//! and purging sealed segments past the retention period (never one a
//! [`PurgeHold`](crate::PurgeHold) keeps because it is not yet shipped off the host). Kept apart from the
//! record path in `writer.rs`; it runs on the writer thread between batches
//! (and hands the slow parts to the housekeeper thread).

use super::*;

impl Writer {
    pub(super) fn roll_due(&self) -> bool {
        let age_ms = now_ms().saturating_sub(self.seg.created_ms).max(0) as u128;
        self.seg.records > 0
            && (self.seg.len >= self.cfg.segment_max_bytes || age_ms >= self.cfg.segment_max_age.as_millis())
    }

    pub(super) fn checkpoint_due(&self) -> bool {
        self.since_ckpt >= self.cfg.checkpoint_every_records
            || (self.since_ckpt > 0 && self.last_ckpt.elapsed() >= self.cfg.checkpoint_every)
    }

    pub(super) fn maintenance_due(&self) -> bool {
        self.roll_due() || self.checkpoint_due() || self.last_purge.elapsed() >= PURGE_EVERY
    }

    /// Rolls, checkpoints and purges when due. Rolling and purging need the
    /// pipeline empty (drained first); a checkpoint covers what is durable.
    pub(super) fn maintain(&mut self, rx: &mpsc::Receiver<Cmd>) {
        let roll = self.roll_due();
        let purge = self.last_purge.elapsed() >= PURGE_EVERY;
        if roll || purge {
            self.drain(rx);
        }
        if roll && self.roll_due() {
            self.roll();
        }
        if self.checkpoint_due() {
            let c = self.make_checkpoint();
            self.job(Job::Checkpoint(c));
        }
        if purge {
            self.purge_expired();
        }
    }

    /// Starts the next segment and hands the full one to the housekeeper to seal.
    pub(super) fn roll(&mut self) {
        if self.seg.dirty && self.seg.file.set_len(self.seg.len).and_then(|_| self.seg.file.sync_data()).is_err() {
            return;
        }
        match OpenSegment::create(&self.cfg.dir, &self.keys, self.seg.index + 1, self.next_seq) {
            Ok(new) => {
                let old = std::mem::replace(&mut self.seg, new);
                self.job(Job::Seal(old.index));
            }
            Err(e) => {
                tracing::error!(error = %e, "audit: cannot start a new segment; still appending to the old one")
            }
        }
    }

    pub(super) fn make_checkpoint(&mut self) -> Checkpoint {
        self.since_ckpt = 0;
        self.last_ckpt = Instant::now();
        let ChainPos { next_seq, last_hash } = self.durable;
        Checkpoint::new(&self.keys, self.seg.index, next_seq - 1, &last_hash, now_rfc3339())
    }

    /// Purges sealed segments older than the retention period, oldest first,
    /// each after a durable `audit.purged` event. Stops at the first segment
    /// that is not sealed, not expired, or not intact (kept as evidence).
    pub(super) fn purge_expired(&mut self) {
        self.last_purge = Instant::now();
        let cutoff = now_ms() - self.cfg.retention_days as i64 * 86_400_000;
        let Ok(files) = list_segments(&self.cfg.dir) else {
            return;
        };
        for (f, path) in files {
            let SegFile::Sealed(i) = f else { return };
            if i >= self.seg.index {
                return;
            }
            // Not yet shipped off the host (`PurgeHold`): kept, expired or not.
            if self.cfg.purge_hold.as_ref().is_some_and(|h| i > h.through()) {
                return;
            }
            // Cheap look at the (not yet authenticated) header first; the whole
            // segment is authenticated only when it claims to be expired.
            let mut head = [0u8; SEALED_HEADER_LEN];
            let claimed = File::open(&path)
                .and_then(|f| f.read_exact_at(&mut head, 0))
                .ok()
                .and_then(|_| SealedHeader::decode(&head).ok());
            if claimed.is_some_and(|h| h.sealed_ms > cutoff) {
                return;
            }
            let header =
                match std::fs::read(&path).map_err(|e| e.to_string()).and_then(|b| decode_sealed(&self.keys, &b)) {
                    Ok((h, _)) => h,
                    Err(e) => {
                        tracing::error!(segment = i, error = %e, "audit: not purging a damaged sealed segment");
                        return;
                    }
                };
            if header.sealed_ms > cutoff {
                return;
            }
            let detail = json!({
                "segment": i,
                "first_seq": header.first_seq,
                "last_seq": header.first_seq + header.count - 1,
                "records": header.count,
                "last_hash": hex::encode(header.last_hash),
                "sealed_ms": header.sealed_ms,
            });
            let ev = AuditEvent::new(EventKind::AuditPurged).target(sealed_name(i)).detail(detail);
            if self.commit_internal(ev).is_err() {
                return;
            }
            if let Err(e) = std::fs::remove_file(&path).and_then(|_| sync_dir(&self.cfg.dir)) {
                tracing::error!(segment = i, error = %e, "audit: purge could not delete the segment");
                return;
            }
        }
    }
}

impl Writer {
    pub(super) fn start_housekeeper(&mut self) {
        let (tx, rx) = mpsc::channel::<Job>();
        let (cfg, keys, shared) = (self.cfg.clone(), self.keys.clone(), self.shared.clone());
        let handle = std::thread::Builder::new()
            .name("salus-audit-housekeeper".into())
            .spawn(move || {
                for job in rx {
                    run_job(&cfg, &keys, &shared, job);
                }
            })
            .expect("spawning the audit housekeeper thread");
        self.house = Some((tx, handle));
    }

    pub(super) fn stop_housekeeper(&mut self) {
        if let Some((tx, handle)) = self.house.take() {
            drop(tx);
            let _ = handle.join();
        }
    }

    /// Hands a job to the housekeeper (or does it here when it is not running).
    pub(super) fn job(&mut self, job: Job) {
        let job = match &self.house {
            Some((tx, _)) => match tx.send(job) {
                Ok(()) => return,
                Err(mpsc::SendError(job)) => job,
            },
            None => job,
        };
        run_job(&self.cfg, &self.keys, &self.shared, job);
    }
}

/// Seals a segment or writes a checkpoint; tells a shipper when it did.
fn run_job(cfg: &AuditLogSettings, keys: &AuditKeys, shared: &Shared, job: Job) {
    match job {
        Job::Seal(i) => match seal_log(&cfg.dir, keys, i) {
            Ok(_) => shared.trail_changed(),
            Err(e) => tracing::error!(segment = i, error = %e, "audit: sealing failed; retried at next start"),
        },
        Job::Checkpoint(c) => match write_checkpoint(cfg, &c) {
            Ok(()) => shared.trail_changed(),
            Err(e) => tracing::error!(error = %e, "audit: checkpoint write failed"),
        },
    }
}

pub(super) fn write_checkpoint(cfg: &AuditLogSettings, c: &Checkpoint) -> std::io::Result<()> {
    c.write_latest(&cfg.dir)?;
    if let Some(cd) = &cfg.checkpoint_dir {
        c.write_numbered(cd)?;
    }
    Ok(())
}
