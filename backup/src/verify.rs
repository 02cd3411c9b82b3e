//! `salus backup verify` (and the checks `restore` runs first): every
//! manifest authentic, signed by the trail's key, chained to the one before;
//! the trail continuous from backup to backup; every object present,
//! unmodified, decrypting to the bytes its manifest names. Every problem
//! found is reported, not only the first.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use salus_audit::{AuditKeys, Checkpoint};
use salus_sensitive::secret::SecretKey;

use crate::anchor::read_anchor;
use crate::create::check_anchor;
use crate::crypto::{open_object, sha256_hex, unwrap, ObjectHeader, WrappedKey};
use crate::error::{BackupError, Problem};
use crate::manifest::*;
use crate::target::Target;
use crate::{load_manifest, manifest_numbers, Progress};

/// How to verify.
#[derive(Clone, Default)]
pub struct VerifyOptions {
    /// Backup keys (the current one, and earlier ones for older backups).
    pub backup_keys: Vec<SecretKey>,
    /// The audit key: pins the signer, and authenticates every segment's
    /// records and the chain inside it (without it, segments are checked
    /// against their manifests only).
    pub audit_key: Option<SecretKey>,
    /// The trail's checkpoint public key, to pin the signer without the audit key.
    pub public_key: Option<[u8; 32]>,
    /// An audit directory holding this host's record of its newest backup
    /// here (`backup-head-*.json`): catches a destination rolled back.
    pub anchor_dir: Option<PathBuf>,
    /// Objects checked at once.
    pub concurrency: usize,
}

/// What verification covered.
#[derive(Clone, Debug, Default)]
pub struct VerifyReport {
    /// Manifests checked, first and newest number.
    pub manifests: u64,
    pub first: u64,
    pub newest: u64,
    /// Distinct objects checked and their stored bytes.
    pub objects: u64,
    pub bytes: u64,
    /// Hex public key that signed the manifests; whether it was pinned
    /// (`--key` / `--public-key`) or taken from the first manifest.
    pub signer: String,
    pub pinned: bool,
    /// The newest manifest's trail position.
    pub trail: Option<TrailPosition>,
    /// Observations that are not failures (manifests expired before the first).
    pub notes: Vec<String>,
    pub elapsed: std::time::Duration,
}

/// What a file must satisfy beyond its own entry.
#[derive(Clone, Debug)]
enum Expect {
    /// It starts with an earlier backup's copy of the same `.log`.
    Prefix { len: u64, sha256: String, from: u64 },
    /// Its record `seq` has chain hash `hash` (an earlier backup's head there).
    Hash { seq: u64, hash: String, from: u64 },
}

/// One distinct stored object to check.
#[derive(Clone, Debug)]
pub(crate) struct PartCheck {
    pub part: Part,
    /// Wraps of its data key, from the manifests that use it.
    pub wraps: Vec<WrappedKey>,
    /// The backups that use it, and the file (name) it is part of.
    pub used_by: Vec<u64>,
    pub file: String,
}

/// A file whose contents are checked (beyond its parts' hashes).
#[derive(Clone, Debug)]
pub(crate) struct FileCheck {
    pub entry: ObjectEntry,
    /// The backup it is from.
    pub backup: u64,
    expect: Vec<Expect>,
    /// Record-level checks under the audit key (segments).
    deep: bool,
}

impl FileCheck {
    /// The file's own checks only (hash, checkpoint signature).
    pub(crate) fn plain(entry: ObjectEntry, backup: u64) -> FileCheck {
        FileCheck { entry, backup, expect: Vec::new(), deep: false }
    }
}

/// The manifest-level result.
pub(crate) struct Chain {
    pub problems: Vec<Problem>,
    pub notes: Vec<String>,
    /// Every distinct object of the collected manifests.
    pub parts: BTreeMap<String, PartCheck>,
    /// Files checked whole: by plain SHA-256 (one check per content).
    pub files: BTreeMap<String, FileCheck>,
    pub manifests: u64,
    pub first: u64,
    pub newest: u64,
    pub signer: String,
    pub pinned: bool,
    /// The selected manifest (the newest, or per `select`).
    pub selected: Option<SignedManifest>,
}

/// Which manifest `check_chain` selects, and whose objects it collects.
#[derive(Clone, Copy)]
pub(crate) enum Select {
    /// Collect every manifest's objects; select the newest.
    All,
    /// Collect only the selected manifest's objects: the newest whose
    /// `created` is at or before the time (all when `None`).
    AtOrBefore(Option<time::OffsetDateTime>),
}

fn pk_of(opts: &VerifyOptions) -> Option<String> {
    opts.audit_key
        .as_ref()
        .map(|k| hex::encode(AuditKeys::from_master(k).checkpoint_public_key()))
        .or(opts.public_key.map(hex::encode))
}

fn created_at(m: &Manifest) -> Option<time::OffsetDateTime> {
    time::OffsetDateTime::parse(&m.created, &time::format_description::well_known::Rfc3339).ok()
}

/// Checks the manifests, in order, keeping only the previous one in memory.
pub(crate) async fn check_chain(target: &Target, opts: &VerifyOptions, select: Select) -> Result<Chain, BackupError> {
    let (numbers, stray) = manifest_numbers(target).await?;
    if numbers.is_empty() {
        return Err(BackupError::NoBackup(format!("no backups in {}", target.describe())));
    }
    let deep = opts.audit_key.is_some();
    let mut chain = Chain {
        problems: stray.into_iter().map(|n| Problem::new(n, "not a manifest name (unexpected file)")).collect(),
        notes: Vec::new(),
        parts: BTreeMap::new(),
        files: BTreeMap::new(),
        manifests: 0,
        first: numbers[0],
        newest: *numbers.last().expect("not empty"),
        signer: String::new(),
        pinned: false,
        selected: None,
    };
    let pin = pk_of(opts);
    chain.pinned = pin.is_some();
    let mut signer = pin;
    if chain.first > 1 {
        chain.notes.push(format!(
            "manifests before #{} are not in the destination (expired and removed, or deleted)",
            chain.first
        ));
    }
    let mut prev: Option<(u64, Vec<u8>, Option<SignedManifest>)> = None;
    // Fetch a few ahead; check in order.
    let fetched = futures::stream::iter(numbers.iter().copied())
        .map(|n| async move { (n, load_manifest(target, n).await) })
        .buffered(8);
    futures::pin_mut!(fetched);
    while let Some((n, loaded)) = fetched.next().await {
        let loaded = loaded?.ok_or_else(|| BackupError::Target {
            context: manifest_name(n),
            message: "vanished while being read".into(),
        })?;
        chain.manifests += 1;
        let name = manifest_name(n);
        let parsed = match loaded.parsed {
            Ok(m) => Some(m),
            Err(p) => {
                chain.problems.push(p);
                None
            }
        };
        if let Some(sm) = &parsed {
            let m = &sm.manifest;
            match &signer {
                None => signer = Some(m.public_key.clone()),
                Some(s) if *s != m.public_key => chain.problems.push(Problem::new(
                    &name,
                    format!(
                        "signed by key {}…, not the trail's {}…: a manifest from another server",
                        &m.public_key[..16.min(m.public_key.len())],
                        &s[..16.min(s.len())]
                    ),
                )),
                Some(_) => {}
            }
            chain.problems.extend(check_manifest(m, &name));
            let take = match select {
                Select::All | Select::AtOrBefore(None) => true,
                Select::AtOrBefore(Some(t)) => created_at(m).is_some_and(|c| c <= t),
            };
            if take {
                if let Select::AtOrBefore(_) = select {
                    chain.parts.clear();
                    chain.files.clear();
                }
                collect(&mut chain, m, deep);
                chain.selected = Some(sm.clone());
            }
        }
        match (&prev, &parsed) {
            (Some((pn, pbytes, pm)), Some(sm)) => {
                let m = &sm.manifest;
                if *pn + 1 != n {
                    chain.problems.push(Problem::new(
                        manifest_name(pn + 1),
                        format!("missing (deleted): the chain goes from #{pn} to #{n}"),
                    ));
                } else if m.previous.as_deref() != Some(&manifest_hash(pbytes)) {
                    chain.problems.push(Problem::new(
                        &name,
                        format!("does not chain to manifest #{pn} (its previous hash differs: replaced or forged)"),
                    ));
                }
                if let Some(p) = pm {
                    let expects = check_pair(&p.manifest, m, &mut chain.problems);
                    if matches!(select, Select::All) {
                        for (entry, e) in expects {
                            if matches!(e, Expect::Hash { .. }) && !deep {
                                continue;
                            }
                            let fc = chain.files.entry(entry.plain_sha256.clone()).or_insert_with(|| FileCheck {
                                entry: entry.clone(),
                                backup: n,
                                expect: Vec::new(),
                                deep,
                            });
                            fc.expect.push(e);
                        }
                    }
                }
            }
            (None, Some(sm)) if n == 1 && sm.manifest.previous.is_some() => {
                chain.problems.push(Problem::new(&name, "the first backup names a previous one"));
            }
            _ => {}
        }
        prev = Some((n, loaded.bytes, parsed));
    }
    // The newest backup's open-segment copy is checked whole (with the audit key).
    if deep {
        if let Some(sm) = &chain.selected {
            for e in sm.manifest.objects.iter().filter(|o| o.kind == ObjectKind::LogSegment) {
                chain.files.entry(e.plain_sha256.clone()).or_insert_with(|| FileCheck {
                    entry: e.clone(),
                    backup: sm.manifest.number,
                    expect: Vec::new(),
                    deep,
                });
            }
        }
    }
    chain.signer = signer.unwrap_or_default();
    if let Some(dir) = &opts.anchor_dir {
        match read_anchor(dir, &target.describe()) {
            Ok(Some(a)) => {
                let at = if a.number <= chain.newest { load_manifest(target, a.number).await? } else { None };
                if let Err(e) = check_anchor(&a, chain.newest, at.as_ref()) {
                    chain.problems.extend(e.problems().iter().cloned());
                }
            }
            Ok(None) => chain.notes.push(format!(
                "{} holds no record of backups to this destination (nothing to compare with)",
                dir.display()
            )),
            Err(e) => chain.problems.extend(e.problems().iter().cloned()),
        }
    }
    Ok(chain)
}

/// Adds a manifest's objects (and the files checked whole) to the chain.
fn collect(chain: &mut Chain, m: &Manifest, deep: bool) {
    let name = manifest_name(m.number);
    for o in &m.objects {
        for p in &o.parts {
            let wraps: Vec<WrappedKey> = m.keys.iter().filter(|w| w.id == p.key).cloned().collect();
            match chain.parts.get_mut(&p.object) {
                Some(pc) => {
                    if (&pc.part.sha256, pc.part.size, pc.part.stored_size) != (&p.sha256, p.size, p.stored_size) {
                        chain.problems.push(Problem::new(
                            &name,
                            format!("lists {} differently from backup #{}", p.object, pc.used_by[0]),
                        ));
                    }
                    pc.used_by.push(m.number);
                    pc.wraps.extend(wraps);
                }
                None => {
                    chain.parts.insert(
                        p.object.clone(),
                        PartCheck { part: p.clone(), wraps, used_by: vec![m.number], file: o.path.clone() },
                    );
                }
            }
        }
        // Checkpoints always; sealed segments record by record with the audit key.
        if o.kind == ObjectKind::Checkpoint || (deep && o.kind == ObjectKind::SealedSegment) {
            chain.files.entry(o.plain_sha256.clone()).or_insert_with(|| FileCheck {
                entry: o.clone(),
                backup: m.number,
                expect: Vec::new(),
                deep,
            });
        }
    }
}

/// A manifest's own consistency.
fn check_manifest(m: &Manifest, name: &str) -> Vec<Problem> {
    let mut p = Vec::new();
    let mut bad = |what: String| p.push(Problem::new(name, what));
    let mut paths = std::collections::HashSet::new();
    let is_hex64 = |s: &str| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit());
    let overhead = (crate::crypto::OBJECT_HEADER_LEN + crate::crypto::TAG_LEN) as u64;
    for o in &m.objects {
        if !paths.insert(o.path.as_str()) {
            bad(format!("lists {} twice", o.path));
        }
        if !crate::restore::valid_file_name(&o.path) {
            bad(format!("invalid file name '{}'", o.path));
        }
        if !is_hex64(&o.plain_sha256) {
            bad(format!("{}: bad SHA-256", o.path));
        }
        if o.parts.is_empty()
            || o.parts.iter().map(|x| x.size).sum::<u64>() != o.size
            || (o.parts.len() > 1 && o.kind != ObjectKind::LogSegment)
            || (o.parts.len() == 1 && o.parts[0].plain_sha256 != o.plain_sha256)
        {
            bad(format!("{}: its parts do not make up the file", o.path));
        }
        for x in &o.parts {
            if !is_hex64(&x.plain_sha256) || !is_hex64(&x.sha256) || x.object != object_name(&x.plain_sha256) {
                bad(format!("{}: object name and hashes do not match", x.object));
            }
            if x.stored_size != x.size + overhead {
                bad(format!("{}: stored size does not match the plaintext size", x.object));
            }
            if !m.keys.iter().any(|w| w.id == x.key) {
                bad(format!("{}: no wrap of its data key {}", x.object, x.key));
            }
        }
        let seg = salus_audit::parse_segment_name(&o.path);
        let expect_kind = match (o.kind, seg) {
            (ObjectKind::SealedSegment, Some((i, true))) | (ObjectKind::LogSegment, Some((i, false))) => {
                o.segment == Some(i)
            }
            (ObjectKind::Checkpoint, None) => o.path == "checkpoint.json",
            (ObjectKind::KeyBaseline, None) => o.path == "keys.recorded",
            (ObjectKind::KeyStore | ObjectKind::Config, None) => true,
            _ => false,
        };
        if !expect_kind {
            bad(format!("{}: kind {} does not match the name", o.path, o.kind.as_str()));
        }
    }
    let ckpts: Vec<&ObjectEntry> = m.objects.iter().filter(|o| o.kind == ObjectKind::Checkpoint).collect();
    if ckpts.len() != 1 || ckpts[0].records != Some(m.trail.checkpoint_records) {
        bad("the checkpoint entry does not match the trail position".into());
    }
    let mut segs: Vec<&ObjectEntry> = m.objects.iter().filter(|o| o.kind.is_segment()).collect();
    segs.sort_by_key(|o| o.segment);
    let mut last: Option<&ObjectEntry> = None;
    let mut head_hash: Option<&str> = None;
    for s in &segs {
        let (Some(i), Some(f), Some(l)) = (s.segment, s.first_seq, s.last_seq) else {
            bad(format!("{}: no seq range", s.path));
            continue;
        };
        if let Some(prev) = last {
            if prev.segment.map(|x| x + 1) != Some(i) {
                bad(format!("{}: segment {} missing before it", s.path, prev.segment.unwrap_or(0) + 1));
            }
            if prev.last_seq.map(|x| x + 1) != Some(f) {
                bad(format!("{}: starts at seq {f}, not after seq {}", s.path, prev.last_seq.unwrap_or(0)));
            }
            if let (Some(ph), Some(h)) = (s.prev_hash.as_deref(), head_hash) {
                if ph != h {
                    bad(format!("{}: does not chain to the segment before it", s.path));
                }
            }
        }
        if l + 1 < f {
            bad(format!("{}: seq range {f}..{l} is impossible", s.path));
        }
        if s.last_hash.is_some() {
            head_hash = s.last_hash.as_deref();
        }
        last = Some(s);
    }
    match (segs.first(), last) {
        (Some(first), Some(l)) => {
            if l.kind != ObjectKind::LogSegment {
                bad("the last segment is not the open (.log) segment".into());
            }
            let t = &m.trail;
            if first.first_seq != Some(t.first_seq)
                || l.last_seq != Some(t.last_seq)
                || (head_hash != Some(t.chain_head.as_str()) && t.last_seq > 0)
                || first.segment != Some(t.first_segment)
                || l.segment != Some(t.last_segment)
                || t.checkpoint_records > t.last_seq
            {
                bad("the trail position does not match the segments".into());
            }
        }
        _ => bad("holds no segments".into()),
    }
    p
}

/// Continuity from backup `a` to the next one, `b`. Returns the files of `b`
/// whose contents must show it.
fn check_pair(a: &Manifest, b: &Manifest, problems: &mut Vec<Problem>) -> Vec<(ObjectEntry, Expect)> {
    let name = manifest_name(b.number);
    let mut expects = Vec::new();
    if b.trail.last_seq < a.trail.last_seq {
        problems.push(Problem::new(
            &name,
            format!(
                "the trail goes backwards: ends at seq {}, backup #{} at seq {} (rolled back)",
                b.trail.last_seq, a.number, a.trail.last_seq
            ),
        ));
    }
    let bsegs: HashMap<u64, &ObjectEntry> =
        b.objects.iter().filter(|o| o.kind.is_segment()).filter_map(|o| o.segment.map(|i| (i, o))).collect();
    for old in a.objects.iter().filter(|o| o.kind.is_segment()) {
        let Some(i) = old.segment else { continue };
        if i < b.trail.first_segment {
            continue; // purged since (retention)
        }
        let Some(new) = bsegs.get(&i) else {
            problems.push(Problem::new(&name, format!("{} of backup #{} is missing", old.path, a.number)));
            continue;
        };
        match old.kind {
            ObjectKind::SealedSegment => {
                if new.kind != ObjectKind::SealedSegment || new.plain_sha256 != old.plain_sha256 {
                    problems.push(Problem::new(
                        &name,
                        format!("{} differs from backup #{} (rewritten)", old.path, a.number),
                    ));
                }
            }
            _ => {
                let (of, ol) = (old.first_seq.unwrap_or(0), old.last_seq.unwrap_or(0));
                if new.first_seq != Some(of) || new.last_seq.unwrap_or(0) < ol {
                    problems.push(Problem::new(
                        &name,
                        format!("segment {i} no longer holds seqs {of}..{ol} of backup #{} (truncated)", a.number),
                    ));
                    continue;
                }
                if new.last_seq == Some(ol) && old.last_hash.is_some() && new.last_hash != old.last_hash {
                    problems.push(Problem::new(
                        &name,
                        format!("segment {i} differs from backup #{} at seq {ol} (rewritten)", a.number),
                    ));
                }
                if new.kind == ObjectKind::LogSegment {
                    // Appended to: the earlier copy's parts come first (else check the bytes).
                    let structural = new.parts.len() >= old.parts.len()
                        && new.parts.iter().zip(&old.parts).all(|(x, y)| x.object == y.object);
                    if !structural {
                        expects.push((
                            (*new).clone(),
                            Expect::Prefix { len: old.size, sha256: old.plain_sha256.clone(), from: a.number },
                        ));
                    }
                } else if let Some(h) = &old.last_hash {
                    expects.push(((*new).clone(), Expect::Hash { seq: ol, hash: h.clone(), from: a.number }));
                }
            }
        }
    }
    expects
}

/// Checks one stored object; returns its plaintext when it is good.
pub(crate) fn check_part(
    pc: &PartCheck,
    stored: Option<Vec<u8>>,
    backup_keys: &[SecretKey],
) -> Result<Vec<u8>, Problem> {
    let x = &pc.part;
    let who = || {
        let list: Vec<String> = pc.used_by.iter().map(|n| format!("#{n}")).collect();
        format!("{} ({} in backup {})", x.object, pc.file, list.join(", "))
    };
    let fail = |p: String| Problem::new(who(), p);
    let Some(stored) = stored else {
        return Err(fail("missing (deleted)".into()));
    };
    if sha256_hex(&stored) != x.sha256 {
        return Err(fail("SHA-256 of the stored object differs from the manifest (modified)".into()));
    }
    let header = ObjectHeader::decode(&stored).map_err(fail)?;
    if header.key.id != x.key {
        return Err(fail(format!("encrypted under data key {}, the manifest says {}", header.key.id, x.key)));
    }
    let mut dek = None;
    let mut tried = Vec::new();
    for w in pc.wraps.iter().chain(std::iter::once(&header.key)) {
        tried.push(w.kek_id.clone());
        if let Some(k) = backup_keys.iter().find(|k| k.key_id() == w.kek_id) {
            match unwrap(w, k) {
                Ok(d) => {
                    dek = Some(d);
                    break;
                }
                Err(p) => return Err(fail(format!("data key: {p}"))),
            }
        }
    }
    let Some(dek) = dek else {
        tried.sort();
        tried.dedup();
        return Err(fail(format!(
            "no given backup key unwraps its data key (wrapped under backup key id {})",
            tried.join(", ")
        )));
    };
    let plain = open_object(&dek, stored).map_err(fail)?;
    if plain.len() as u64 != x.size || sha256_hex(&plain) != x.plain_sha256 {
        return Err(fail("decrypts to other bytes than the manifest names".into()));
    }
    Ok(plain)
}

/// Checks a whole file's bytes against its entry and expectations.
pub(crate) fn check_file(fc: &FileCheck, plain: &[u8], audit_keys: Option<&AuditKeys>, signer: &str) -> Vec<Problem> {
    let e = &fc.entry;
    let who = || format!("{} in backup #{}", e.path, fc.backup);
    let mut problems = Vec::new();
    if plain.len() as u64 != e.size || sha256_hex(plain) != e.plain_sha256 {
        return vec![Problem::new(who(), "its parts do not make up the file the manifest names")];
    }
    for x in &fc.expect {
        if let Expect::Prefix { len, sha256, from } = x {
            if plain.len() < *len as usize || sha256_hex(&plain[..*len as usize]) != *sha256 {
                problems
                    .push(Problem::new(who(), format!("does not continue backup #{from}'s copy (records rewritten)")));
            }
        }
    }
    match e.kind {
        ObjectKind::Checkpoint => match serde_json::from_slice::<Checkpoint>(plain) {
            Ok(c) => {
                if let Err(p) = c.verify_signature() {
                    problems.push(Problem::new(who(), format!("checkpoint {p}")));
                } else if c.public_key != signer {
                    problems.push(Problem::new(who(), "checkpoint signed by another key than the manifests"));
                } else if Some(c.records) != e.records {
                    problems.push(Problem::new(who(), "checkpoint covers other records than the manifest says"));
                }
            }
            Err(_) => problems.push(Problem::new(who(), "not a checkpoint")),
        },
        k if k.is_segment() && fc.deep => {
            if let Some(keys) = audit_keys {
                match salus_audit::inspect_segment(keys, &e.path, plain, salus_audit::Inspect::Records) {
                    Ok(s) => {
                        let same = Some(s.first_seq) == e.first_seq
                            && Some(s.last_seq()) == e.last_seq
                            && s.prev_hash.map(hex::encode) == e.prev_hash
                            && s.last_hash().map(hex::encode) == e.last_hash
                            && s.valid_len == plain.len() as u64;
                        if !same {
                            problems
                                .push(Problem::new(who(), "records do not match the manifest's seq range and hashes"));
                        }
                        for x in &fc.expect {
                            if let Expect::Hash { seq, hash, from } = x {
                                if s.hash_of(*seq).map(hex::encode).as_deref() != Some(hash.as_str()) {
                                    problems.push(Problem::new(
                                        who(),
                                        format!("record seq {seq} differs from backup #{from} (rewritten)"),
                                    ));
                                }
                            }
                        }
                    }
                    Err(ie) => problems.push(Problem::new(who(), format!("audit trail: {ie}"))),
                }
            }
        }
        _ => {}
    }
    problems
}

/// Downloads and checks a file's parts; returns its bytes.
pub(crate) async fn fetch_file(
    target: &Target,
    entry: &ObjectEntry,
    parts: &BTreeMap<String, PartCheck>,
    backup_keys: &Arc<Vec<SecretKey>>,
) -> Result<Result<Vec<u8>, Vec<Problem>>, BackupError> {
    let mut out = Vec::with_capacity(entry.size as usize);
    let mut problems = Vec::new();
    for x in &entry.parts {
        let Some(pc) = parts.get(&x.object).cloned() else {
            problems.push(Problem::new(&x.object, "not collected (internal)"));
            continue;
        };
        let stored = target.get(&x.object).await?;
        let keys = backup_keys.clone();
        let r = tokio::task::spawn_blocking(move || check_part(&pc, stored, &keys))
            .await
            .map_err(|e| BackupError::Invalid(format!("internal task failed: {e}")))?;
        match r {
            Ok(p) => out.extend_from_slice(&p),
            Err(p) => problems.push(p),
        }
    }
    Ok(if problems.is_empty() { Ok(out) } else { Err(problems) })
}

/// Verifies every backup in `target`.
pub async fn verify(
    target: Arc<Target>,
    opts: VerifyOptions,
    progress: Arc<dyn Progress>,
) -> Result<VerifyReport, BackupError> {
    let t0 = Instant::now();
    if opts.backup_keys.is_empty() {
        return Err(BackupError::Invalid("verify needs the backup key".into()));
    }
    let mut chain = check_chain(&target, &opts, Select::All).await?;
    // Files of one part are checked with that part's bytes; the others
    // (appended `.log` copies) are fetched again whole.
    let single: HashMap<String, Vec<FileCheck>> =
        chain.files.values().filter(|f| f.entry.parts.len() == 1).fold(HashMap::new(), |mut m, f| {
            m.entry(f.entry.parts[0].object.clone()).or_default().push(f.clone());
            m
        });
    let multi: Vec<FileCheck> = chain.files.values().filter(|f| f.entry.parts.len() > 1).cloned().collect();
    let total: u64 = chain.parts.values().map(|p| p.part.stored_size).sum::<u64>()
        + multi.iter().map(|f| f.entry.stored_size()).sum::<u64>();
    progress.begin("verifying", total);
    let keys = Arc::new(opts.backup_keys.clone());
    let audit_keys = Arc::new(opts.audit_key.as_ref().map(AuditKeys::from_master));
    let signer = Arc::new(chain.signer.clone());
    let single = Arc::new(single);
    let parts: Vec<PartCheck> = chain.parts.values().cloned().collect();
    let n_objects = parts.len() as u64;
    let mut results = futures::stream::iter(parts.into_iter().map(|pc| {
        let (target, keys, audit_keys, signer, progress, single) =
            (target.clone(), keys.clone(), audit_keys.clone(), signer.clone(), progress.clone(), single.clone());
        async move {
            let stored = target.get(&pc.part.object).await?;
            let size = pc.part.stored_size;
            let r = tokio::task::spawn_blocking(move || -> Vec<Problem> {
                match check_part(&pc, stored, &keys) {
                    Ok(plain) => single
                        .get(&pc.part.object)
                        .into_iter()
                        .flatten()
                        .flat_map(|fc| check_file(fc, &plain, audit_keys.as_ref().as_ref(), &signer))
                        .collect(),
                    Err(p) => vec![p],
                }
            })
            .await
            .map_err(|e| BackupError::Invalid(format!("internal task failed: {e}")))?;
            progress.advance(size);
            Ok::<_, BackupError>(r)
        }
    }))
    .buffer_unordered(opts.concurrency.max(1));
    let mut part_problems = Vec::new();
    while let Some(r) = results.next().await {
        part_problems.extend(r?);
    }
    drop(results);
    // Whole files only where every part is good (else the part's problem says it).
    if part_problems.is_empty() {
        for fc in &multi {
            match fetch_file(&target, &fc.entry, &chain.parts, &keys).await? {
                Ok(plain) => chain.problems.extend(check_file(fc, &plain, audit_keys.as_ref().as_ref(), &signer)),
                Err(p) => chain.problems.extend(p),
            }
            progress.advance(fc.entry.stored_size());
        }
    }
    chain.problems.extend(part_problems);
    progress.end();
    if !chain.problems.is_empty() {
        return Err(BackupError::Verification(chain.problems));
    }
    Ok(VerifyReport {
        manifests: chain.manifests,
        first: chain.first,
        newest: chain.newest,
        objects: n_objects,
        bytes: total,
        signer: chain.signer,
        pinned: chain.pinned,
        trail: chain.selected.map(|m| m.manifest.trail),
        notes: chain.notes,
        elapsed: t0.elapsed(),
    })
}
