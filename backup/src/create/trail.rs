//! The checks `create` makes before it signs a manifest: the segments read
//! chain to each other, to the checkpoint and to the previous backup (a
//! damaged, truncated or rolled-back trail is not certified).

use super::*;

/// The chain checks over what was read; returns the trail position.
pub(super) fn check_trail(
    segments: &[&Done],
    checkpoint: &Checkpoint,
    prev: Option<&Manifest>,
) -> Result<TrailPosition, BackupError> {
    let mut problems = Vec::new();
    let mut hashes: BTreeMap<u64, [u8; 32]> = BTreeMap::new();
    let mut last: Option<(u64, u64, [u8; 32])> = None; // (index, last seq, last hash)
    for d in segments {
        let e = &d.entry;
        hashes.extend(d.wanted.iter().copied());
        let (Some(index), Some(first), Some(last_seq)) = (e.segment, e.first_seq, e.last_seq) else {
            problems.push(Problem::new(&e.path, "no seq range (internal)"));
            continue;
        };
        let prev_hash = e.prev_hash.as_deref().and_then(hex32);
        if let Some((pi, pl, ph)) = last {
            if index != pi + 1 {
                problems.push(Problem::new(salus_audit::segment_file_name(pi + 1, true), "segment missing (deleted)"));
            } else if first != pl + 1 {
                problems.push(Problem::new(&e.path, format!("starts at seq {first}, expected {}", pl + 1)));
            } else if prev_hash.is_some_and(|h| h != ph) {
                problems.push(Problem::new(&e.path, "does not chain to the previous segment"));
            }
        }
        let lh = e.last_hash.as_deref().and_then(hex32).or(last.map(|l| l.2)).unwrap_or([0; 32]);
        last = Some((index, last_seq, lh));
    }
    let first_entry = &segments[0].entry;
    let (last_index, head, head_hash) = last.unwrap_or((0, 0, [0; 32]));
    let first_seq = first_entry.first_seq.unwrap_or(1);
    hashes.insert(head, head_hash);
    if checkpoint.records > head {
        problems.push(Problem::new(
            "checkpoint.json",
            format!(
                "trail truncated: the checkpoint of {} covers {} records but the trail ends at seq {head}",
                checkpoint.time, checkpoint.records
            ),
        ));
    } else if checkpoint.records >= first_seq {
        match hashes.get(&checkpoint.records) {
            Some(h) if hex::encode(h) == checkpoint.chain_head => {}
            Some(_) => problems.push(Problem::new(
                "checkpoint.json",
                format!("chain head at seq {} differs from the checkpoint (records rewritten)", checkpoint.records),
            )),
            None => problems.push(Problem::new("checkpoint.json", "chain head not found in the trail (internal)")),
        }
    }
    if let Some(p) = prev {
        let pname = format!("backup #{}", p.number);
        if p.trail.last_seq > head {
            problems.push(Problem::new(
                "audit trail",
                format!(
                    "ends at seq {head}, behind {pname} (seq {}): the local trail was rolled back or replaced",
                    p.trail.last_seq
                ),
            ));
        } else if p.trail.last_seq >= first_seq {
            match hashes.get(&p.trail.last_seq) {
                Some(h) if hex::encode(h) == p.trail.chain_head => {}
                Some(_) => problems.push(Problem::new(
                    "audit trail",
                    format!(
                        "record seq {} differs from {pname} (the trail diverged or was rewritten)",
                        p.trail.last_seq
                    ),
                )),
                None => {
                    problems.push(Problem::new("audit trail", format!("seq {} not found (internal)", p.trail.last_seq)))
                }
            }
        }
        let now: HashMap<u64, &ObjectEntry> =
            segments.iter().filter_map(|d| d.entry.segment.map(|i| (i, &d.entry))).collect();
        for old in p.objects.iter().filter(|o| o.kind == ObjectKind::SealedSegment) {
            if let Some(cur) = old.segment.and_then(|i| now.get(&i)) {
                if cur.kind == ObjectKind::SealedSegment && cur.plain_sha256 != old.plain_sha256 {
                    problems.push(Problem::new(&cur.path, format!("differs from {pname} (rewritten)")));
                }
            }
        }
    }
    if !problems.is_empty() {
        return Err(BackupError::Verification(problems));
    }
    Ok(TrailPosition {
        first_seq,
        last_seq: head,
        chain_head: hex::encode(head_hash),
        first_segment: first_entry.segment.unwrap_or(1),
        last_segment: last_index,
        checkpoint_records: checkpoint.records,
    })
}
