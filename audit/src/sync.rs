//! The committer thread: the second stage of the writer's pipeline.
//!
//! Why a second thread: a durable write costs one device flush (`fdatasync`),
//! which on virtualized disks is 0.05–4 ms and dominates a commit. While the
//! committer waits for the flush of batch N, the writer thread already
//! serializes, hashes and encrypts batch N+1, so per-record CPU work is off the
//! critical path and the disk is kept busy back to back.
//!
//! Ordering and durability are unchanged: only one job is in flight, its chunks
//! are written and synced in order, each chunk's callers are answered only
//! after its sync succeeded, and a failed chunk fails every chunk after it (their
//! records chain onto it). The writer rolls its chain back to the start of the
//! failed chunk and fails whatever it encoded on top of it (fail closed).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};

use super::event::RecordReceipt;
use super::writer::{Cmd, Reply, Shared};
use super::AuditError;

/// A position in the hash chain: the next seq and the hash of the record before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct ChainPos {
    pub next_seq: u64,
    pub last_hash: [u8; 32],
}

/// Encoded frames written with one `pwrite` and made durable with one sync.
pub(super) struct Chunk {
    pub buf: Vec<u8>,
    pub replies: Vec<(RecordReceipt, Reply)>,
    /// Chain position before the chunk's first record.
    pub start: ChainPos,
}

/// Chunks to append at `offset` of the open segment, in order.
pub(super) struct Job {
    pub file: Arc<File>,
    pub offset: u64,
    pub chunks: Vec<Chunk>,
}

/// What the committer reports back to the writer.
pub(super) struct Done {
    /// Bytes appended and synced (from the job's offset).
    pub written: u64,
    /// Records made durable.
    pub records: u64,
    /// Chain position before the first chunk that failed, if one did.
    pub failed_at: Option<ChainPos>,
    /// Emptied buffers, for reuse.
    pub spare: Vec<Vec<u8>>,
    /// Time of one write + sync (the first chunk's), for the writer's batching.
    pub sync_time: std::time::Duration,
}

/// Runs until the writer drops its job sender.
pub(super) fn run(jobs: mpsc::Receiver<Job>, done: mpsc::Sender<Cmd>, shared: Arc<Shared>) {
    for job in jobs {
        let mut offset = job.offset;
        let mut out = Done {
            written: 0,
            records: 0,
            failed_at: None,
            spare: Vec::with_capacity(job.chunks.len()),
            sync_time: std::time::Duration::ZERO,
        };
        let mut error: Option<(std::io::ErrorKind, String)> = None;
        let mut failed = Vec::new();
        for mut chunk in job.chunks {
            if error.is_none() {
                let t0 = std::time::Instant::now();
                let r = write_and_sync(&job.file, &chunk.buf, offset, &shared);
                if out.sync_time.is_zero() {
                    out.sync_time = t0.elapsed();
                }
                match r {
                    Ok(()) => {
                        offset += chunk.buf.len() as u64;
                        out.written += chunk.buf.len() as u64;
                        out.records += chunk.replies.len() as u64;
                        shared.healthy.store(true, Ordering::Release);
                        if let Some((last, _)) = chunk.replies.last() {
                            shared.durable_through(last.seq);
                        }
                        chunk.replies.drain(..).for_each(|(r, reply)| reply.send(Ok(r)));
                    }
                    Err(e) => {
                        shared.write_failed();
                        tracing::error!(error = %e, "audit: write failed; failing closed");
                        out.failed_at = Some(chunk.start);
                        error = Some((e.kind(), e.to_string()));
                    }
                }
            }
            if error.is_some() {
                failed.append(&mut chunk.replies);
            }
            chunk.buf.clear();
            out.spare.push(chunk.buf);
        }
        // The writer hears of a failure before its callers do, so that a caller
        // retrying at once is not encoded onto the failed chain.
        let stop = done.send(Cmd::Synced(out)).is_err();
        if let Some((kind, msg)) = &error {
            for (_, reply) in failed.drain(..) {
                let e = std::io::Error::new(*kind, msg.clone());
                reply.send(Err(AuditError::io("committing batch", e)));
            }
        }
        if stop {
            return;
        }
    }
}

/// One write of the whole chunk, then `fdatasync`: data only, no metadata
/// that is not needed to read it back.
pub(super) fn write_and_sync(file: &File, buf: &[u8], offset: u64, shared: &Shared) -> std::io::Result<()> {
    if shared.take_injected_failure() {
        let half = buf.len() / 2;
        let _ = file.write_all_at(&buf[..half], offset);
        return Err(std::io::Error::other("injected write failure"));
    }
    file.write_all_at(buf, offset)?;
    file.sync_data()
}
