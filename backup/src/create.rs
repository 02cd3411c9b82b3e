//! `salus backup create`: one incremental backup of the trail, its
//! checkpoint, the key baseline, the key store and the config.
//!
//! The trail is read without its lock, while a server may be appending:
//! `checkpoint.json` first, then every segment file (a sealed one where both
//! the `.log` and the `.sealed` of an index exist, i.e. mid-seal), the open
//! `.log` cut at its last whole, authenticated record. A file that vanishes
//! while being read (sealed, purged) restarts the pass; what was uploaded is
//! found by name the next time. Everything read is authenticated with the
//! audit key and checked to chain (segment to segment, to the checkpoint, to
//! the previous backup) before the manifest is written: a damaged trail is
//! not certified by a signed manifest (exit code 3).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use salus_audit::{AuditKeys, Checkpoint, Inspect, SegmentSummary};
use salus_sensitive::secret::SecretKey;

use crate::anchor::{read_anchor, write_anchor, Anchor, ANCHOR_FORMAT};
use crate::crypto::{open_object, seal_object, sha256_hex, unwrap, wrap, DataKey, ObjectHeader, WrappedKey};
use crate::error::{BackupError, Problem};
use crate::manifest::*;
use crate::target::{PutOutcome, Target};
use crate::{load_manifest, manifest_numbers, now_rfc3339, Loaded, Progress};

mod trail;
use trail::check_trail;

/// Attempts at a consistent pass over a trail that changes under it.
const PASSES: usize = 10;

/// What to back up, with which keys.
#[derive(Clone)]
pub struct CreateOptions {
    /// The audit directory.
    pub audit_dir: PathBuf,
    /// The audit master key (reads and authenticates the trail; signs the manifest).
    pub audit_key: SecretKey,
    /// The backup key (wraps the data keys).
    pub backup_key: SecretKey,
    /// Earlier backup keys, to rewrap the data keys of objects that earlier
    /// backups wrote under them (after a rotation).
    pub previous_backup_keys: Vec<SecretKey>,
    /// The API key store (`[auth] api_keys`), if it is to be included.
    pub key_store: Option<PathBuf>,
    /// The config file, if it is to be included.
    pub config_file: Option<PathBuf>,
    /// This host's name (in the manifest).
    pub instance: String,
    /// Objects read, encrypted and uploaded at once.
    pub concurrency: usize,
    /// Take a sealed segment the previous backup holds (same name and size,
    /// its objects in the destination) from that backup without reading it
    /// again: sealed segments are written once, and the shipper backs up a
    /// growing trail often. Off for `salus backup create`, which re-reads
    /// and re-checks every file.
    pub reuse_sealed: bool,
}

/// What `create` did.
#[derive(Clone, Debug)]
pub struct CreateReport {
    pub number: u64,
    pub manifest: Manifest,
    /// Objects uploaded by this run, and their stored bytes.
    pub uploaded_objects: usize,
    pub uploaded_bytes: u64,
    /// Objects already in the destination (by content hash).
    pub reused_objects: usize,
    /// Bytes read from local files.
    pub read_bytes: u64,
    pub elapsed: std::time::Duration,
    /// Set when the local record of this backup could not be written.
    pub anchor_warning: Option<String>,
}

/// A local file to back up.
#[derive(Clone, Debug)]
struct Source {
    path: PathBuf,
    /// The name it restores to.
    name: String,
    kind: ObjectKind,
    segment: Option<u64>,
    /// The open segment: cut at its last whole record.
    open: bool,
}

/// The outcome for one file.
struct Done {
    entry: ObjectEntry,
    read: u64,
    /// The chain hashes of the seqs the checks want, where this segment holds them.
    wanted: Vec<(u64, [u8; 32])>,
    /// Wraps of data keys not made by this run (an interrupted run's objects).
    foreign_wraps: Vec<WrappedKey>,
}

/// How one part was stored.
struct Stored {
    part: Part,
    foreign_wrap: Option<WrappedKey>,
}

/// What every file's task of a run shares.
struct Ctx {
    keys: AuditKeys,
    dek: DataKey,
    backup_key: SecretKey,
    previous_keys: Vec<SecretKey>,
    target: Arc<Target>,
    /// The previous backup's parts by object name.
    prev_parts: HashMap<String, Part>,
    /// The previous backup's entries by file name.
    prev_files: HashMap<String, ObjectEntry>,
    /// What this run uploaded (a pass that starts over reuses it).
    ours: std::sync::Mutex<HashMap<String, Part>>,
    progress: Arc<dyn Progress>,
    reuse_sealed: bool,
}

/// What one pass over the trail knows.
struct Pass {
    /// Objects already in the destination: name → stored size.
    existing: HashMap<String, u64>,
    /// Seqs whose chain hash the checks need.
    want: BTreeSet<u64>,
}

fn vanished(e: &BackupError) -> bool {
    matches!(e, BackupError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
}

fn read(path: &Path) -> Result<Vec<u8>, BackupError> {
    std::fs::read(path).map_err(|e| BackupError::io(format!("reading {}", path.display()), e))
}

/// The trail's files now: (index, sealed, path), one per index, in order.
fn segment_files(dir: &Path) -> Result<Vec<(u64, bool, PathBuf)>, BackupError> {
    let mut by_index: BTreeMap<u64, (bool, PathBuf)> = BTreeMap::new();
    let entries = std::fs::read_dir(dir).map_err(|e| BackupError::io(format!("listing {}", dir.display()), e))?;
    for entry in entries {
        let entry = entry.map_err(|e| BackupError::io(format!("listing {}", dir.display()), e))?;
        let Some((index, sealed)) = entry.file_name().to_str().and_then(salus_audit::parse_segment_name) else {
            continue;
        };
        let slot = by_index.entry(index).or_insert((sealed, entry.path()));
        if sealed {
            *slot = (true, entry.path()); // mid-seal: both exist; the sealed one is complete
        }
    }
    Ok(by_index.into_iter().map(|(i, (s, p))| (i, s, p)).collect())
}

/// The seqs of `want` in `from..to` (none when the range is empty).
fn seqs_in(want: &BTreeSet<u64>, from: u64, to: u64) -> impl Iterator<Item = &u64> {
    want.range(from..to.max(from))
}

fn hex32(s: &str) -> Option<[u8; 32]> {
    hex::decode(s).ok()?.try_into().ok()
}

/// Backs up the trail in `opts.audit_dir` to `target`.
pub async fn create(
    target: Arc<Target>,
    opts: CreateOptions,
    progress: Arc<dyn Progress>,
) -> Result<CreateReport, BackupError> {
    let t0 = Instant::now();
    let keys = AuditKeys::from_master(&opts.audit_key);
    let public_key = hex::encode(keys.checkpoint_public_key());
    let destination = target.describe();

    // The destination's newest backup: ours (same signer), and not rolled back
    // behind what this host wrote there last.
    let (numbers, _) = manifest_numbers(&target).await?;
    let newest_loaded = match numbers.last() {
        Some(&n) => load_manifest(&target, n).await?,
        None => None,
    };
    let newest = match &newest_loaded {
        Some(l) => Some(l.parsed.clone().map_err(|p| BackupError::Verification(vec![p]))?),
        None => None,
    };
    if let Some(m) = &newest {
        if m.manifest.public_key != public_key {
            return Err(BackupError::verification(
                manifest_name(m.manifest.number),
                format!(
                    "signed by key {}…, not this trail's {}…: {destination} holds another server's backups (use another destination)",
                    &m.manifest.public_key[..16],
                    &public_key[..16]
                ),
            ));
        }
    }
    let anchor = read_anchor(&opts.audit_dir, &destination)?;
    let prev_number = newest.as_ref().map(|m| m.manifest.number).unwrap_or(0);
    if let Some(a) = &anchor {
        let at = match &newest_loaded {
            Some(l) if l.number == a.number => None,
            _ if a.number <= prev_number => load_manifest(&target, a.number).await?,
            _ => None,
        };
        check_anchor(a, prev_number, at.as_ref().or(newest_loaded.as_ref().filter(|l| l.number == a.number)))?;
    }
    let prev_hash = newest_loaded.as_ref().map(|l| manifest_hash(&l.bytes));

    let existing: HashMap<String, u64> = target.list("objects/").await?.into_iter().collect();
    let prev_files: HashMap<String, ObjectEntry> =
        newest.iter().flat_map(|m| m.manifest.objects.iter()).map(|o| (o.path.clone(), o.clone())).collect();
    let prev_parts: HashMap<String, Part> =
        prev_files.values().flat_map(|o| o.parts.iter()).map(|p| (p.object.clone(), p.clone())).collect();
    let mut want = BTreeSet::new();
    if let Some(m) = &newest {
        want.insert(m.manifest.trail.last_seq);
    }
    let ctx = Arc::new(Ctx {
        keys,
        dek: DataKey::generate(&opts.backup_key),
        backup_key: opts.backup_key.clone(),
        previous_keys: opts.previous_backup_keys.clone(),
        target: target.clone(),
        prev_parts,
        prev_files,
        ours: Default::default(),
        progress: progress.clone(),
        reuse_sealed: opts.reuse_sealed,
    });

    let mut pass = Pass { existing, want };
    let mut attempt = 0;
    let (checkpoint, done) = loop {
        attempt += 1;
        match one_pass(&ctx, pass, &opts).await {
            Ok(r) => break r,
            Err(e) if vanished(&e) && attempt < PASSES => {
                tracing::info!(error = %e, "a trail file changed while it was read; reading the trail again");
                // What the pass uploaded is in the destination now.
                let existing = target.list("objects/").await?.into_iter().collect();
                let want = newest.iter().map(|m| m.manifest.trail.last_seq).collect();
                pass = Pass { existing, want };
                continue;
            }
            Err(e) => return Err(e),
        }
    };
    progress.end();

    let segments: Vec<&Done> = done.iter().filter(|d| d.entry.kind.is_segment()).collect();
    let trail = check_trail(&segments, &checkpoint, newest.as_ref().map(|m| &m.manifest))?;

    // The wraps of every data key used, under the current backup key.
    let mut key_wraps: BTreeMap<String, WrappedKey> = BTreeMap::new();
    let prev_wraps: HashMap<&str, &WrappedKey> =
        newest.iter().flat_map(|m| m.manifest.keys.iter()).map(|w| (w.id.as_str(), w)).collect();
    let foreign: HashMap<&str, &WrappedKey> =
        done.iter().flat_map(|d| d.foreign_wraps.iter()).map(|w| (w.id.as_str(), w)).collect();
    for (d, part) in done.iter().flat_map(|d| d.entry.parts.iter().map(move |p| (d, p))) {
        let id = &part.key;
        if key_wraps.contains_key(id) {
            continue;
        }
        let w = if *id == ctx.dek.wrap.id {
            ctx.dek.wrap.clone()
        } else {
            let old = foreign.get(id.as_str()).or(prev_wraps.get(id.as_str())).copied().ok_or_else(|| {
                BackupError::verification(
                    manifest_name(prev_number),
                    format!("no wrap of data key {id} (used by {} of {})", part.object, d.entry.path),
                )
            })?;
            rewrap(old, &ctx.backup_key, &ctx.previous_keys)?
        };
        key_wraps.insert(id.clone(), w);
    }

    let manifest = Manifest {
        format: MANIFEST_FORMAT.into(),
        number: prev_number + 1,
        id: uuid::Uuid::new_v4().to_string(),
        created: now_rfc3339(),
        instance: opts.instance.clone(),
        salus_version: env!("CARGO_PKG_VERSION").into(),
        previous: prev_hash,
        audit_key_id: opts.audit_key.key_id(),
        public_key,
        trail,
        keys: key_wraps.into_values().collect(),
        objects: done.iter().map(|d| d.entry.clone()).collect(),
    };
    let signed = manifest.clone().sign(&ctx.keys);
    let bytes = signed.to_bytes();
    let digest: [u8; 32] = ring::digest::digest(&ring::digest::SHA256, &bytes).as_ref().try_into().expect("32");
    let name = manifest_name(manifest.number);
    if target.put(&name, bytes, digest).await? == PutOutcome::Existed {
        return Err(BackupError::Invalid(format!(
            "{destination}: another backup wrote {name} at the same time; nothing of this run is lost: run it again"
        )));
    }
    let anchor = Anchor {
        format: ANCHOR_FORMAT.into(),
        destination: destination.clone(),
        number: manifest.number,
        sha256: hex::encode(digest),
        created: manifest.created.clone(),
        last_seq: manifest.trail.last_seq,
    };
    let anchor_warning = write_anchor(&opts.audit_dir, &anchor).err().map(|e| e.to_string());
    // Counted by what this run uploaded (a pass that started over reused it).
    let ours = std::mem::take(&mut *ctx.ours.lock().unwrap_or_else(|p| p.into_inner()));
    Ok(CreateReport {
        number: manifest.number,
        uploaded_objects: ours.len(),
        uploaded_bytes: ours.values().map(|p| p.stored_size).sum(),
        reused_objects: done.iter().map(|d| d.entry.parts.len()).sum::<usize>().saturating_sub(ours.len()),
        read_bytes: done.iter().map(|d| d.read).sum(),
        manifest,
        elapsed: t0.elapsed(),
        anchor_warning,
    })
}

/// Fails when the destination is behind (or differs from) what this host
/// last wrote there.
pub(crate) fn check_anchor(a: &Anchor, newest: u64, at: Option<&Loaded>) -> Result<(), BackupError> {
    if newest < a.number {
        return Err(BackupError::verification(
            a.destination.clone(),
            format!(
                "rolled back: this host wrote backup #{} there ({}, trail up to seq {}), but the newest manifest there is {}",
                a.number,
                a.created,
                a.last_seq,
                if newest == 0 { "none".to_string() } else { format!("#{newest}") }
            ),
        ));
    }
    match at {
        Some(l) if manifest_hash(&l.bytes) == a.sha256 => Ok(()),
        Some(_) => Err(BackupError::verification(
            manifest_name(a.number),
            "differs from the manifest this host wrote (replaced: rolled back or forged)",
        )),
        None => Err(BackupError::verification(
            manifest_name(a.number),
            "missing: this host wrote it (deleted: rolled back)",
        )),
    }
}

/// `old` wrapped under the current key: as it is, or unwrapped with an
/// earlier key and wrapped again.
fn rewrap(old: &WrappedKey, current: &SecretKey, previous: &[SecretKey]) -> Result<WrappedKey, BackupError> {
    if old.kek_id == current.key_id() {
        return Ok(old.clone());
    }
    let kek = previous.iter().find(|k| k.key_id() == old.kek_id).ok_or_else(|| {
        BackupError::Invalid(format!(
            "objects of earlier backups are encrypted under data key {} wrapped by backup key id {}, not the given backup key ({}): after rotating the backup key pass the old one as --previous-backup-key",
            old.id,
            old.kek_id,
            current.key_id()
        ))
    })?;
    let dek = unwrap(old, kek).map_err(|e| BackupError::verification(format!("data key {}", old.id), e))?;
    Ok(wrap(&dek, current))
}

/// One pass over the local files: checkpoint first, then segments in order,
/// then the companions.
async fn one_pass(
    ctx: &Arc<Ctx>,
    mut pass: Pass,
    opts: &CreateOptions,
) -> Result<(Checkpoint, Vec<Done>), BackupError> {
    let dir = &opts.audit_dir;
    let ckpt_path = dir.join("checkpoint.json");
    let ckpt_bytes = match std::fs::read(&ckpt_path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(BackupError::Invalid(format!(
                "{} has no checkpoint.json: not an audit trail directory",
                dir.display()
            )))
        }
        Err(e) => return Err(BackupError::io(format!("reading {}", ckpt_path.display()), e)),
    };
    let checkpoint: Checkpoint = serde_json::from_slice(&ckpt_bytes)
        .map_err(|e| BackupError::verification("checkpoint.json", format!("not a checkpoint: {e}")))?;
    checkpoint.verify_signature().map_err(|e| BackupError::verification("checkpoint.json", e))?;
    if checkpoint.public_key != hex::encode(ctx.keys.checkpoint_public_key()) {
        return Err(BackupError::verification(
            "checkpoint.json",
            "signed by another key than the given audit key's (wrong --key, or a foreign trail)",
        ));
    }
    pass.want.insert(checkpoint.records);

    let segs = segment_files(dir)?;
    let Some(&(last_index, last_sealed, _)) = segs.last() else {
        return Err(BackupError::Invalid(format!("no audit segments in {}", dir.display())));
    };
    if last_sealed {
        return Err(BackupError::verification(
            salus_audit::segment_file_name(last_index + 1, false),
            "open segment missing (tail of the trail deleted)",
        ));
    }
    let mut sources: Vec<Source> = segs
        .iter()
        .map(|(i, sealed, path)| Source {
            path: path.clone(),
            name: salus_audit::segment_file_name(*i, *sealed),
            kind: if *sealed { ObjectKind::SealedSegment } else { ObjectKind::LogSegment },
            segment: Some(*i),
            open: *i == last_index,
        })
        .collect();
    let companion = |path: PathBuf, name: String, kind| Source { path, name, kind, segment: None, open: false };
    if dir.join("keys.recorded").exists() {
        sources.push(companion(dir.join("keys.recorded"), "keys.recorded".into(), ObjectKind::KeyBaseline));
    }
    for (file, kind) in [(&opts.key_store, ObjectKind::KeyStore), (&opts.config_file, ObjectKind::Config)] {
        if let Some(p) = file {
            let name = p
                .file_name()
                .and_then(|n| n.to_str())
                .filter(|n| crate::restore::valid_file_name(n))
                .ok_or_else(|| BackupError::Invalid(format!("{}: not a plain file name", p.display())))?
                .to_string();
            if sources.iter().any(|s| s.name == name) || name == "checkpoint.json" {
                return Err(BackupError::Invalid(format!("{}: another file of the backup has that name", p.display())));
            }
            sources.push(companion(p.clone(), name, kind));
        }
    }
    let total: u64 = sources.iter().map(|s| std::fs::metadata(&s.path).map(|m| m.len()).unwrap_or(0)).sum();
    ctx.progress.begin("backing up", total + ckpt_bytes.len() as u64);

    let pass = Arc::new(pass);
    let ckpt_source = companion(ckpt_path, "checkpoint.json".into(), ObjectKind::Checkpoint);
    let ckpt_records = checkpoint.records;
    let first = back_up(ctx.clone(), pass.clone(), ckpt_source, Some(ckpt_bytes));
    let rest = sources.into_iter().map(|s| back_up(ctx.clone(), pass.clone(), s, None));
    let results: Vec<Result<Done, BackupError>> =
        futures::stream::iter(std::iter::once(first).chain(rest)).buffered(opts.concurrency.max(1)).collect().await;
    let mut done = Vec::with_capacity(results.len());
    for r in results {
        done.push(r?);
    }
    if let Some(c) = done.first_mut() {
        c.entry.records = Some(ckpt_records);
    }
    Ok((checkpoint, done))
}

/// What the blocking part found in one file.
struct Examined {
    plain: Vec<u8>,
    plain_sha256: String,
    /// For a `.log` the previous backup copied: (that copy's length, SHA-256
    /// of this file's bytes up to it).
    prefix_sha256: Option<(u64, String)>,
    summary: Option<SegmentSummary>,
    read: u64,
}

/// Reads, authenticates and (what the destination lacks) encrypts and
/// uploads one file.
async fn back_up(ctx: Arc<Ctx>, pass: Arc<Pass>, mut src: Source, bytes: Option<Vec<u8>>) -> Result<Done, BackupError> {
    if let Some(done) = reused(&ctx, &pass, &src) {
        return Ok(done);
    }
    let run = |src: Source, bytes: Option<Vec<u8>>| {
        let (c, p) = (ctx.clone(), pass.clone());
        async move {
            tokio::task::spawn_blocking(move || examine(&c, &p, &src, bytes))
                .await
                .map_err(|e| BackupError::Invalid(format!("internal task failed: {e}")))?
        }
    };
    let ex = match run(src.clone(), bytes).await {
        // A full `.log` sealed meanwhile: take the sealed segment.
        Err(e) if vanished(&e) && src.kind == ObjectKind::LogSegment && !src.open => {
            let index = src.segment.expect("segments have an index");
            src.name = salus_audit::segment_file_name(index, true);
            src.path = src.path.with_file_name(&src.name);
            src.kind = ObjectKind::SealedSegment;
            run(src.clone(), None).await?
        }
        r => r?,
    };
    let mut summary = ex.summary;
    let size = ex.plain.len() as u64;
    // A `.log` an earlier backup copied shorter: keep that copy's parts, add the rest.
    let prev = ctx.prev_files.get(&src.name).filter(|p| p.kind == src.kind);
    let base = prev.filter(|p| {
        src.kind == ObjectKind::LogSegment
            && p.parts.iter().all(|x| pass.existing.get(&x.object) == Some(&x.stored_size))
            && ex.prefix_sha256.as_ref().is_some_and(|(len, h)| *len == p.size && *h == p.plain_sha256)
    });
    let mut parts = Vec::new();
    let mut foreign_wraps = Vec::new();
    let rest = match base {
        Some(b) => {
            parts.extend(b.parts.iter().cloned());
            let rest = ex.plain[b.size as usize..].to_vec();
            (!rest.is_empty()).then_some(rest)
        }
        None => Some(ex.plain),
    };
    if let Some(bytes) = rest {
        let st = store_part(&ctx, &pass, bytes).await?;
        foreign_wraps.extend(st.foreign_wrap);
        parts.push(st.part);
    }
    let mut entry = ObjectEntry {
        path: src.name.clone(),
        kind: src.kind,
        size,
        plain_sha256: ex.plain_sha256.clone(),
        parts,
        segment: None,
        first_seq: None,
        last_seq: None,
        prev_hash: None,
        last_hash: None,
        records: None,
    };
    let mut wanted = Vec::new();
    if src.kind.is_segment() {
        let index = src.segment.expect("segments have an index");
        // A sealed segment the previous backup holds unchanged: its seq range is known.
        let known = prev.filter(|p| p.plain_sha256 == ex.plain_sha256 && p.first_seq.is_some());
        if summary.is_none() && known.is_none() {
            let (c, p) = (ctx.clone(), pass.clone());
            let (name, path) = (src.name.clone(), src.path.clone());
            summary = Some(
                tokio::task::spawn_blocking(move || inspect(&c.keys, &name, &read(&path)?, &p.want))
                    .await
                    .map_err(|e| BackupError::Invalid(format!("internal task failed: {e}")))??,
            );
        }
        if let Some(s) = &summary {
            if s.index != index {
                return Err(BackupError::verification(&src.name, format!("header names segment {}", s.index)));
            }
            entry.segment = Some(index);
            entry.first_seq = Some(s.first_seq);
            entry.last_seq = Some(s.last_seq());
            entry.prev_hash = s.prev_hash.map(hex::encode);
            entry.last_hash = s.last_hash().map(hex::encode);
            for &seq in seqs_in(&pass.want, s.first_seq, s.last_seq().saturating_add(1)) {
                if let Some(h) = s.hash_of(seq) {
                    wanted.push((seq, h));
                }
            }
        } else if let Some(k) = known {
            entry.segment = k.segment;
            entry.first_seq = k.first_seq;
            entry.last_seq = k.last_seq;
            entry.prev_hash = k.prev_hash.clone();
            entry.last_hash = k.last_hash.clone();
            if let (Some(l), Some(h)) = (k.last_seq, k.last_hash.as_deref().and_then(hex32)) {
                if pass.want.contains(&l) {
                    wanted.push((l, h));
                }
            }
        }
    }
    Ok(Done { entry, read: ex.read, wanted, foreign_wraps })
}

/// A sealed segment taken from the previous backup unread
/// ([`CreateOptions::reuse_sealed`]): same name and size, every object in the
/// destination, and no seq the checks want inside it (its last record's hash
/// is in the entry).
fn reused(ctx: &Ctx, pass: &Pass, src: &Source) -> Option<Done> {
    if !ctx.reuse_sealed || src.kind != ObjectKind::SealedSegment {
        return None;
    }
    let prev = ctx.prev_files.get(&src.name).filter(|p| p.kind == ObjectKind::SealedSegment)?;
    let (first, last) = (prev.first_seq?, prev.last_seq?);
    let last_hash = prev.last_hash.as_deref().and_then(hex32)?;
    let same_size = std::fs::metadata(&src.path).ok()?.len() == prev.size;
    let stored = prev.parts.iter().all(|p| pass.existing.get(&p.object) == Some(&p.stored_size));
    if !same_size || !stored || seqs_in(&pass.want, first, last).next().is_some() {
        return None;
    }
    let wanted = if pass.want.contains(&last) { vec![(last, last_hash)] } else { Vec::new() };
    Some(Done { entry: prev.clone(), read: 0, wanted, foreign_wraps: Vec::new() })
}

/// Stores one part: reused when the destination has it (by content hash),
/// uploaded otherwise.
async fn store_part(ctx: &Arc<Ctx>, pass: &Pass, plain: Vec<u8>) -> Result<Stored, BackupError> {
    let plain_sha256 = sha256_hex(&plain);
    let object = object_name(&plain_sha256);
    let size = plain.len() as u64;
    if let Some(p) = ctx.ours.lock().unwrap_or_else(|p| p.into_inner()).get(&object) {
        return Ok(Stored { part: p.clone(), foreign_wrap: None });
    }
    match (ctx.prev_parts.get(&object), pass.existing.get(&object).copied()) {
        // In the previous backup and still in the destination: reuse as is.
        (Some(p), Some(stored)) if stored == p.stored_size => {
            return Ok(Stored { part: p.clone(), foreign_wrap: None })
        }
        (Some(p), Some(stored)) => {
            return Err(BackupError::verification(
                object,
                format!(
                "{stored} bytes in the destination, {} in the previous backup (modified): run `salus backup verify`",
                p.stored_size
            ),
            ))
        }
        // In the destination but in no manifest: written by a run that did
        // not finish. Check it and reuse it.
        (None, Some(_)) => return adopt(ctx, &object, &plain_sha256, size).await,
        (_, None) => {}
    }
    let c = ctx.clone();
    let (stored, digest) = tokio::task::spawn_blocking(move || {
        let stored = seal_object(&c.dek, &plain);
        let digest: [u8; 32] = ring::digest::digest(&ring::digest::SHA256, &stored).as_ref().try_into().expect("32");
        (stored, digest)
    })
    .await
    .map_err(|e| BackupError::Invalid(format!("internal task failed: {e}")))?;
    let stored_size = stored.len() as u64;
    let part = Part {
        object: object.clone(),
        sha256: hex::encode(digest),
        plain_sha256: plain_sha256.clone(),
        size,
        stored_size,
        key: ctx.dek.wrap.id.clone(),
    };
    match ctx.target.put(&object, stored, digest).await? {
        PutOutcome::Created => {
            ctx.ours.lock().unwrap_or_else(|p| p.into_inner()).insert(object, part.clone());
            Ok(Stored { part, foreign_wrap: None })
        }
        // Written meanwhile by a concurrent run: adopt that one.
        PutOutcome::Existed => adopt(ctx, &object, &plain_sha256, size).await,
    }
}

/// Reads a file; a segment is authenticated and (the open one) cut at its
/// last whole record. Sealed segments the previous backup holds unchanged
/// are only hashed.
fn examine(ctx: &Ctx, pass: &Pass, src: &Source, bytes: Option<Vec<u8>>) -> Result<Examined, BackupError> {
    let mut plain = match bytes {
        Some(b) => b,
        None => read(&src.path)?,
    };
    let read_len = plain.len() as u64;
    let mut summary = None;
    if src.kind == ObjectKind::LogSegment {
        let s = salus_audit::inspect_segment(&ctx.keys, &src.name, &plain, Inspect::Records)?;
        if s.valid_len < plain.len() as u64 && !src.open {
            return Err(BackupError::verification(
                &src.name,
                format!(
                    "{} unreadable bytes after seq {} in a segment no longer written to (damage)",
                    plain.len() as u64 - s.valid_len,
                    s.last_seq()
                ),
            ));
        }
        plain.truncate(s.valid_len as usize);
        summary = Some(s);
    }
    let plain_sha256 = sha256_hex(&plain);
    let prev = ctx.prev_files.get(&src.name).filter(|p| p.kind == src.kind);
    let prefix_sha256 = prev
        .filter(|p| src.kind == ObjectKind::LogSegment && p.size <= plain.len() as u64)
        .map(|p| (p.size, sha256_hex(&plain[..p.size as usize])));
    if src.kind == ObjectKind::SealedSegment {
        let unchanged = prev.filter(|p| p.plain_sha256 == plain_sha256 && p.first_seq.is_some());
        // Inspect it when new, or when a wanted seq lies before its last record.
        let wants_hash = unchanged.is_some_and(|p| {
            let (f, l) = (p.first_seq.unwrap_or(1), p.last_seq.unwrap_or(0));
            seqs_in(&pass.want, f, l).next().is_some()
        });
        if unchanged.is_none() || wants_hash {
            summary = Some(inspect(&ctx.keys, &src.name, &plain, &pass.want)?);
        }
    }
    ctx.progress.advance(read_len);
    Ok(Examined { plain, plain_sha256, prefix_sha256, summary, read: read_len })
}

/// Authenticates a sealed segment; hashes every record only when a seq the
/// checks want lies inside it (its last record's hash is in the header).
fn inspect(keys: &AuditKeys, name: &str, bytes: &[u8], want: &BTreeSet<u64>) -> Result<SegmentSummary, BackupError> {
    let s = salus_audit::inspect_segment(keys, name, bytes, Inspect::Authenticate)?;
    if !s.has_all_hashes() && seqs_in(want, s.first_seq, s.last_seq()).next().is_some() {
        return Ok(salus_audit::inspect_segment(keys, name, bytes, Inspect::Records)?);
    }
    Ok(s)
}

/// Takes over an object that is in the destination but in no manifest
/// (written by an interrupted run): downloads it, unwraps its data key,
/// checks it decrypts to the bytes its name says.
async fn adopt(ctx: &Ctx, object: &str, plain_sha256: &str, size: u64) -> Result<Stored, BackupError> {
    let stored = ctx
        .target
        .get(object)
        .await?
        .ok_or_else(|| BackupError::Invalid(format!("{object} vanished from the destination while in use")))?;
    let damaged = |p: String| {
        BackupError::verification(
            object,
            format!("{p}; the object cannot be replaced (write-once): remove it from the destination or use another"),
        )
    };
    let header = ObjectHeader::decode(&stored).map_err(damaged)?;
    let kek = std::iter::once(&ctx.backup_key)
        .chain(ctx.previous_keys.iter())
        .find(|k| k.key_id() == header.key.kek_id)
        .ok_or_else(|| {
            BackupError::Invalid(format!(
                "{object} in the destination is wrapped under backup key id {}, which was not given",
                header.key.kek_id
            ))
        })?;
    let dek = unwrap(&header.key, kek).map_err(damaged)?;
    let digest = sha256_hex(&stored);
    let stored_size = stored.len() as u64;
    let plain = open_object(&dek, stored).map_err(damaged)?;
    if sha256_hex(&plain) != plain_sha256 || plain.len() as u64 != size {
        return Err(damaged("decrypts to other bytes than its name says".into()));
    }
    let part = Part {
        object: object.to_string(),
        sha256: digest,
        plain_sha256: plain_sha256.to_string(),
        size,
        stored_size,
        key: header.key.id.clone(),
    };
    Ok(Stored { part, foreign_wrap: Some(header.key) })
}
