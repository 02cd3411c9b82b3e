//! `keys.recorded`: the API key set the audit trail has recorded, kept next to
//! the trail so that a key-store change is never left out of it.
//!
//! Why: a running server records a key-store change when it notices the
//! changed file (within a second). If the server is killed (`kill -9`) in
//! between, the next start would simply load the new store and the change
//! would never be recorded. So the trail keeps a durable *baseline*: for each
//! key id whose creation the trail holds, whether its revocation is recorded
//! too. When a trail session starts (`salus serve`, or `salus keys` when no
//! server holds the trail) the key store is diffed against the baseline and
//! what is missing is recorded (operation [`STARTUP_RECONCILE`]) before the
//! baseline is rewritten.
//!
//! # File format
//!
//! `<audit dir>/keys.recorded`, mode 0600, UTF-8 JSON:
//!
//! ```json
//! {"format":"salus-keys-recorded/v1",
//!  "keys":[{"id":"key_0123456789abcdef","principal":"alice","revoked":false}],
//!  "mac":"<hex HMAC-SHA256>"}
//! ```
//!
//! Keys are sorted by id. Nothing secret: no key, no key hash. `mac` is
//! HMAC-SHA256 under a key derived from the audit master key
//! (`audit-keys-recorded`) over the compact JSON of `{"format":…,"keys":…}`, so
//! the file cannot be edited to claim that a key was recorded when it was not.
//! It is replaced atomically (temporary file, fsync, rename, directory fsync)
//! and written only by the process holding the trail's `LOCK`.
//!
//! # Ordering
//!
//! Events are made durable first, then the baseline is written. A crash in
//! between leaves the old baseline, so the next start records the change a
//! second time: a duplicate at worst, never a missing event.
//!
//! # Failure behaviour
//!
//! * A *missing* file (first start of a trail, or a trail from before this file
//!   existed) is an empty baseline: every key in the store is recorded once as
//!   `admin.key_created` with `detail.baseline = "missing"`, so the trail knows
//!   the key set it starts with.
//! * An *invalid* file (not JSON, unknown format, or a MAC that does not verify)
//!   is treated the same way, with `detail.baseline = "invalid"`, and a warning
//!   naming the file and the kind of problem (never its contents). We do not
//!   fail closed here: the baseline only exists to avoid *duplicate* events,
//!   and a baseline that cannot be authenticated can only be trusted to hide
//!   changes, so discarding it errs on the side a HIPAA auditor wants (every key
//!   accounted for, with the reason visible in the tamper-evident trail itself,
//!   not only in a log file). Refusing to start would stop a clinical service
//!   over a bookkeeping file, and the operator's only remedy — deleting it —
//!   leads to the same re-recording.
//! * An I/O error reading or writing the file (other than "not found") is an
//!   [`AuditError::Io`]: the server refuses to start, as for any audit write.
//!
//! A key that was revoked and is later un-revoked by editing the file, and
//! changes to a key's roles or expiry, are not events (as for reloads).

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::json;
use subtle::ConstantTimeEq;

use salus_audit::{AuditError, AuditEvent, AuditKeys, AuditLog, AuditPrincipal, EventKind};

use super::key_events::key_event;
use super::store::KeyStore;

/// The baseline's file name in the audit directory.
pub const BASELINE_FILE: &str = "keys.recorded";

/// The operation of events recorded because the store held a change the
/// baseline did not (made while no one was recording, e.g. before a `kill -9`).
pub const STARTUP_RECONCILE: &str = "keys.startup_reconcile";

const FORMAT: &str = "salus-keys-recorded/v1";

/// One key the trail has recorded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordedKey {
    /// The key's public id.
    pub id: String,
    /// The key's principal (so that a removal can name it).
    pub principal: String,
    /// Whether the trail holds the key's revocation.
    pub revoked: bool,
}

/// The recorded key set, sorted by id.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyBaseline {
    keys: Vec<RecordedKey>,
}

/// What was found in the audit directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BaselineState {
    /// A valid, authenticated baseline.
    Present(KeyBaseline),
    /// No file: an empty baseline.
    Missing,
    /// A file that cannot be trusted; the reason names the problem, never contents.
    Invalid(String),
}

#[derive(Serialize)]
struct MacInput<'a> {
    format: &'a str,
    keys: &'a [RecordedKey],
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct BaselineFile {
    format: String,
    keys: Vec<RecordedKey>,
    mac: String,
}

/// Path of the baseline of the trail in `audit_dir`.
pub fn baseline_path(audit_dir: &Path) -> PathBuf {
    audit_dir.join(BASELINE_FILE)
}

impl KeyBaseline {
    /// The baseline for a store whose every key (and revocation) is recorded.
    pub fn from_store(store: &KeyStore) -> Self {
        let mut keys: Vec<RecordedKey> = store
            .keys
            .iter()
            .map(|k| RecordedKey { id: k.id.clone(), principal: k.principal.clone(), revoked: k.revoked.is_some() })
            .collect();
        keys.sort_by(|a, b| a.id.cmp(&b.id));
        keys.dedup_by(|a, b| a.id == b.id);
        KeyBaseline { keys }
    }

    pub fn keys(&self) -> &[RecordedKey] {
        &self.keys
    }

    fn mac_hex(keys: &[RecordedKey], audit_keys: &AuditKeys) -> String {
        let body = serde_json::to_vec(&MacInput { format: FORMAT, keys }).expect("baseline serializes");
        hex::encode(audit_keys.baseline_mac(&body))
    }

    /// The file's bytes: the key set and its MAC.
    fn encode(&self, audit_keys: &AuditKeys) -> Vec<u8> {
        let file =
            BaselineFile { format: FORMAT.into(), keys: self.keys.clone(), mac: Self::mac_hex(&self.keys, audit_keys) };
        let mut out = serde_json::to_vec_pretty(&file).expect("baseline serializes");
        out.push(b'\n');
        out
    }

    /// Writes the baseline atomically: temporary file (0600), fsync, rename,
    /// directory fsync.
    pub fn save(&self, audit_dir: &Path, audit_keys: &AuditKeys) -> Result<(), AuditError> {
        let path = baseline_path(audit_dir);
        let io = |what: &str, e: std::io::Error| AuditError::io(format!("{what} {}", path.display()), e);
        let mut tmp = tempfile::Builder::new()
            .prefix(".keys.recorded.")
            .suffix(".tmp")
            .tempfile_in(audit_dir)
            .map_err(|e| io("creating a temporary file for", e))?;
        {
            use std::os::unix::fs::PermissionsExt;
            tmp.as_file().set_permissions(std::fs::Permissions::from_mode(0o600)).map_err(|e| io("writing", e))?;
        }
        tmp.write_all(&self.encode(audit_keys)).map_err(|e| io("writing", e))?;
        tmp.as_file().sync_all().map_err(|e| io("syncing", e))?;
        tmp.persist(&path).map_err(|e| io("replacing", e.error))?;
        std::fs::File::open(audit_dir).and_then(|d| d.sync_all()).map_err(|e| io("syncing the directory of", e))?;
        Ok(())
    }
}

impl BaselineState {
    /// Reads the baseline of the trail in `audit_dir`. Only I/O errors other
    /// than a missing file are errors; an unusable file is [`BaselineState::Invalid`].
    pub fn load(audit_dir: &Path, audit_keys: &AuditKeys) -> Result<BaselineState, AuditError> {
        let path = baseline_path(audit_dir);
        match std::fs::read(&path) {
            Ok(bytes) => Ok(Self::parse(&bytes, audit_keys)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BaselineState::Missing),
            Err(e) => Err(AuditError::io(format!("reading {}", path.display()), e)),
        }
    }

    fn parse(bytes: &[u8], audit_keys: &AuditKeys) -> BaselineState {
        let file: BaselineFile = match serde_json::from_slice(bytes) {
            Ok(f) => f,
            Err(e) => {
                return BaselineState::Invalid(format!("not a baseline file (line {} column {})", e.line(), e.column()))
            }
        };
        if file.format != FORMAT {
            return BaselineState::Invalid("unsupported format".into());
        }
        let expected = KeyBaseline::mac_hex(&file.keys, audit_keys);
        if !bool::from(expected.as_bytes().ct_eq(file.mac.as_bytes())) {
            return BaselineState::Invalid("authentication failed (MAC mismatch)".into());
        }
        let mut keys = file.keys;
        keys.sort_by(|a, b| a.id.cmp(&b.id));
        if keys.windows(2).any(|w| w[0].id == w[1].id) {
            return BaselineState::Invalid("duplicate key id".into());
        }
        BaselineState::Present(KeyBaseline { keys })
    }

    /// The events that bring the trail from this baseline to `store`:
    /// `admin.key_created` for each key not in the baseline (and
    /// `admin.key_revoked` too if it is revoked), `admin.key_revoked` for each
    /// key revoked in the store but not in the baseline, and for each baseline
    /// key missing from the store (`detail.removed = true`). Without a valid
    /// baseline every key is new and each event carries
    /// `detail.baseline = "missing"` or `"invalid"`.
    pub fn events(&self, store: &KeyStore, actor: &AuditPrincipal, operation: &'static str) -> Vec<AuditEvent> {
        let (base, flag): (&[RecordedKey], Option<&str>) = match self {
            BaselineState::Present(b) => (&b.keys, None),
            BaselineState::Missing => (&[], Some("missing")),
            BaselineState::Invalid(_) => (&[], Some("invalid")),
        };
        let mut out = Vec::new();
        for k in &store.keys {
            match base.iter().find(|b| b.id == k.id) {
                None => {
                    out.push(key_event(EventKind::AdminKeyCreated, k, actor, operation));
                    if k.revoked.is_some() {
                        out.push(key_event(EventKind::AdminKeyRevoked, k, actor, operation));
                    }
                }
                Some(b) if !b.revoked && k.revoked.is_some() => {
                    out.push(key_event(EventKind::AdminKeyRevoked, k, actor, operation));
                }
                Some(_) => {}
            }
        }
        for b in base {
            if !store.keys.iter().any(|k| k.id == b.id) {
                out.push(
                    AuditEvent::new(EventKind::AdminKeyRevoked)
                        .principal(actor.clone())
                        .operation(operation)
                        .target(b.id.clone())
                        .detail(json!({ "key_principal": b.principal, "removed": true })),
                );
            }
        }
        if let Some(flag) = flag {
            for ev in &mut out {
                if let Some(d) = ev.detail.as_mut() {
                    d.insert("baseline".into(), json!(flag));
                }
            }
        }
        out
    }
}

/// The principal of changes found in the key-store file, made by someone the
/// recorder cannot name.
pub fn key_store_file_actor() -> AuditPrincipal {
    AuditPrincipal::new("key-store-file", "local", Vec::<String>::new())
}

/// At the start of a trail session: records (durably, operation
/// [`STARTUP_RECONCILE`]) what `store` holds that the trail's baseline does not,
/// then writes the baseline for `store`. Returns the number of events recorded.
/// On error the baseline is left as it was, so the next start tries again.
pub fn reconcile(log: &AuditLog, store: &KeyStore) -> Result<usize, AuditError> {
    let dir = log.dir();
    let state = BaselineState::load(dir, log.audit_keys())?;
    if let BaselineState::Invalid(reason) = &state {
        tracing::warn!(
            file = %baseline_path(dir).display(),
            problem = %reason,
            "audit: the key-store baseline is invalid; recording every key in the store again"
        );
    }
    let events = state.events(store, &key_store_file_actor(), STARTUP_RECONCILE);
    let n = events.len();
    for ev in events {
        log.record_blocking(ev)?;
    }
    let baseline = KeyBaseline::from_store(store);
    if state != BaselineState::Present(baseline.clone()) {
        baseline.save(dir, log.audit_keys())?;
    }
    Ok(n)
}

/// After the events that bring the trail to `store` are durable: makes `store`
/// the baseline. Call only while holding the trail (its `LOCK`, i.e. `log` open).
pub fn note_recorded(log: &AuditLog, store: &KeyStore) -> Result<(), AuditError> {
    KeyBaseline::from_store(store).save(log.dir(), log.audit_keys())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::store::{NewKey, OffsetDateTime, Permission, PrincipalKind};
    use crate::auth::KeyStoreHandle;
    use salus_audit::{read_trail, AuditLogSettings, AuditRecord};
    use salus_sensitive::secret::{write_new_key_file, KeySource, SecretKey};

    fn audit_keys(seed: u8) -> AuditKeys {
        AuditKeys::from_master(&SecretKey::from_bytes([seed; 32]))
    }

    fn key(store: &mut KeyStore, principal: &str) -> NewKey {
        store
            .create(principal, PrincipalKind::Human, &[Permission::Inference], None, OffsetDateTime::now_utc())
            .unwrap()
    }

    /// (kind, target, removed, baseline flag) of each event.
    fn summary(evs: &[AuditEvent]) -> Vec<(EventKind, String, bool, Option<String>)> {
        evs.iter()
            .map(|e| {
                let d = e.detail.as_ref().unwrap();
                let flag = d.get("baseline").and_then(|v| v.as_str()).map(str::to_string);
                (e.kind(), e.target.clone().unwrap(), d.get("removed").is_some(), flag)
            })
            .collect()
    }

    fn actor() -> AuditPrincipal {
        key_store_file_actor()
    }

    #[test]
    fn missing_file_is_an_empty_baseline_and_every_key_is_recorded_flagged() {
        let dir = tempfile::tempdir().unwrap();
        let k = audit_keys(1);
        let state = BaselineState::load(dir.path(), &k).unwrap();
        assert_eq!(state, BaselineState::Missing);
        let mut store = KeyStore::default();
        let a = key(&mut store, "alice");
        let b = key(&mut store, "bob");
        store.revoke(&b.record.id, OffsetDateTime::now_utc()).unwrap();
        let m = Some("missing".to_string());
        assert_eq!(
            summary(&state.events(&store, &actor(), STARTUP_RECONCILE)),
            vec![
                (EventKind::AdminKeyCreated, a.record.id.clone(), false, m.clone()),
                (EventKind::AdminKeyCreated, b.record.id.clone(), false, m.clone()),
                (EventKind::AdminKeyRevoked, b.record.id.clone(), false, m),
            ]
        );
        assert!(state.events(&KeyStore::default(), &actor(), STARTUP_RECONCILE).is_empty());
    }

    #[test]
    fn save_and_load_round_trip_privately_atomically_and_without_key_material() {
        let dir = tempfile::tempdir().unwrap();
        let k = audit_keys(1);
        let mut store = KeyStore::default();
        let a = key(&mut store, "alice");
        let b = key(&mut store, "bob");
        store.revoke(&a.record.id, OffsetDateTime::now_utc()).unwrap();
        let baseline = KeyBaseline::from_store(&store);
        baseline.save(dir.path(), &k).unwrap();
        baseline.save(dir.path(), &k).unwrap(); // replaces
        assert_eq!(BaselineState::load(dir.path(), &k).unwrap(), BaselineState::Present(baseline.clone()));
        let revoked: Vec<(&str, bool)> = baseline.keys().iter().map(|r| (r.id.as_str(), r.revoked)).collect();
        let mut expected = vec![(a.record.id.as_str(), true), (b.record.id.as_str(), false)];
        expected.sort();
        assert_eq!(revoked, expected);
        let path = baseline_path(dir.path());
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let names: Vec<String> =
            std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        assert_eq!(names, [BASELINE_FILE], "no temporary file may be left behind");
        let text = std::fs::read_to_string(&path).unwrap();
        for nk in [&a, &b] {
            assert!(!text.contains(&nk.record.hash), "a key hash in the baseline");
            assert!(!text.contains(&nk.secret[9..]), "a key in the baseline");
        }
        // Nothing changed since: no events.
        let state = BaselineState::load(dir.path(), &k).unwrap();
        assert!(state.events(&store, &actor(), STARTUP_RECONCILE).is_empty());
    }

    #[test]
    fn diff_names_created_revoked_and_removed_keys() {
        let now = OffsetDateTime::now_utc();
        let mut store = KeyStore::default();
        let a = key(&mut store, "alice");
        let b = key(&mut store, "svc-b");
        let state = BaselineState::Present(KeyBaseline::from_store(&store));
        let c = key(&mut store, "carol");
        store.revoke(&a.record.id, now).unwrap();
        store.keys.retain(|k| k.id != b.record.id);
        let evs = state.events(&store, &actor(), STARTUP_RECONCILE);
        assert_eq!(
            summary(&evs),
            vec![
                (EventKind::AdminKeyRevoked, a.record.id.clone(), false, None),
                (EventKind::AdminKeyCreated, c.record.id.clone(), false, None),
                (EventKind::AdminKeyRevoked, b.record.id.clone(), true, None),
            ]
        );
        // The removed key is named by its principal from the baseline.
        assert_eq!(evs[2].detail.as_ref().unwrap()["key_principal"], "svc-b");
        assert!(evs.iter().all(|e| e.operation == Some(STARTUP_RECONCILE)));
        let text = format!("{evs:?}");
        for nk in [&a, &b, &c] {
            assert!(!text.contains(&nk.record.hash) && !text.contains(&nk.secret[9..]), "key material in an event");
        }
        // A revocation already in the baseline is not recorded again.
        let state = BaselineState::Present(KeyBaseline::from_store(&store));
        assert!(state.events(&store, &actor(), STARTUP_RECONCILE).is_empty());
    }

    #[test]
    fn corrupt_forged_or_edited_baseline_is_invalid_and_trusted_for_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let k = audit_keys(1);
        let path = baseline_path(dir.path());
        let mut store = KeyStore::default();
        let a = key(&mut store, "alice");
        let invalid = |k: &AuditKeys| match BaselineState::load(dir.path(), k).unwrap() {
            BaselineState::Invalid(reason) => reason,
            other => panic!("expected an invalid baseline, got {other:?}"),
        };

        std::fs::write(&path, b"{\"format\": \"salus-keys-recorded/v1\", \"keys\": [").unwrap();
        assert!(invalid(&k).starts_with("not a baseline file"));
        std::fs::write(&path, [0xff, 0x00, 0x17]).unwrap();
        invalid(&k);

        // Written under another trail's key: the MAC does not verify.
        KeyBaseline::from_store(&store).save(dir.path(), &audit_keys(2)).unwrap();
        assert!(invalid(&k).contains("MAC"));

        // Edited to claim a key was recorded when it was not.
        KeyBaseline::default().save(dir.path(), &k).unwrap();
        let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        v["keys"] = json!([{ "id": a.record.id, "principal": "alice", "revoked": false }]);
        std::fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();
        let reason = invalid(&k);
        assert!(!reason.contains(&a.record.id) && !reason.contains("alice"), "contents in the reason: {reason}");
        let state = BaselineState::load(dir.path(), &k).unwrap();
        assert_eq!(
            summary(&state.events(&store, &actor(), STARTUP_RECONCILE)),
            vec![(EventKind::AdminKeyCreated, a.record.id.clone(), false, Some("invalid".into()))]
        );

        v["format"] = json!("salus-keys-recorded/v9");
        std::fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();
        assert_eq!(invalid(&k), "unsupported format");

        // An I/O error other than "missing" is an error, not an empty baseline.
        std::fs::remove_file(&path).unwrap();
        std::fs::create_dir(&path).unwrap();
        assert!(matches!(BaselineState::load(dir.path(), &k), Err(AuditError::Io { .. })));
    }

    struct Setup {
        tmp: tempfile::TempDir,
        key: SecretKey,
        source: KeySource,
    }

    impl Setup {
        fn new() -> Setup {
            let tmp = tempfile::tempdir().unwrap();
            let key_path = tmp.path().join("audit.key");
            let key = write_new_key_file(&key_path).unwrap();
            Setup { source: KeySource::File(key_path), key, tmp }
        }
        fn audit_dir(&self) -> PathBuf {
            self.tmp.path().join("audit")
        }
        fn store_path(&self) -> PathBuf {
            self.tmp.path().join("api-keys.json")
        }
        /// A trail and key store as `salus serve` opens them.
        fn server(&self) -> (AuditLog, KeyStoreHandle, usize) {
            let mut cfg = AuditLogSettings::new(self.audit_dir(), self.source.clone());
            cfg.instance = "test-host".into();
            let log = AuditLog::open(cfg).unwrap();
            let handle = KeyStoreHandle::open(self.store_path()).unwrap();
            handle.record_changes_in(log.clone());
            let n = handle.reconcile_with_trail().unwrap();
            (log, handle, n)
        }
        fn admin(&self) -> Vec<(String, String, String)> {
            let mut out: Vec<AuditRecord> = Vec::new();
            read_trail(&self.audit_dir(), &self.key, |r, _| out.push(r.clone())).unwrap();
            out.into_iter()
                .filter(|r| r.kind.starts_with("admin."))
                .map(|r| (r.kind, r.target.unwrap_or_default(), r.operation.unwrap_or_default()))
                .collect()
        }
        fn baseline_ids(&self) -> Vec<String> {
            let keys = AuditKeys::from_master(&self.key);
            match BaselineState::load(&self.audit_dir(), &keys).unwrap() {
                BaselineState::Present(b) => b.keys().iter().map(|k| k.id.clone()).collect(),
                other => panic!("expected a baseline, got {other:?}"),
            }
        }
    }

    #[test]
    fn reload_advances_the_baseline_only_after_its_events_are_durable() {
        let s = Setup::new();
        let mut store = KeyStore::default();
        let a = key(&mut store, "alice");
        store.save(&s.store_path()).unwrap();
        let (log, handle, n) = s.server();
        assert_eq!(n, 1, "the first start records the key set once");
        assert_eq!(s.baseline_ids(), vec![a.record.id.clone()]);

        // A change whose event cannot be recorded: the new key works (the
        // store is installed), but the baseline stays where the trail is.
        let b = key(&mut store, "bob");
        store.save(&s.store_path()).unwrap();
        log.inject_write_failures(1);
        handle.refresh();
        assert!(handle.authenticate(&b.secret, OffsetDateTime::now_utc()).is_ok());
        assert_eq!(s.baseline_ids(), vec![a.record.id.clone()], "baseline advanced past an unrecorded change");

        // The next recorded reload records bob too (its diff starts at the
        // last recorded store) and advances the baseline.
        let c = key(&mut store, "carol");
        store.save(&s.store_path()).unwrap();
        handle.refresh();
        let mut ids = vec![a.record.id.clone(), b.record.id.clone(), c.record.id.clone()];
        ids.sort();
        assert_eq!(s.baseline_ids(), ids);
        drop(handle);
        log.close().unwrap();

        let created = |id: &str| ("admin.key_created".to_string(), id.to_string());
        let admin: Vec<(String, String)> = s.admin().into_iter().map(|(k, t, _)| (k, t)).collect();
        assert_eq!(admin, [created(&a.record.id), created(&b.record.id), created(&c.record.id)]);
        // A restart finds nothing to record.
        let (log, _handle, n) = s.server();
        assert_eq!(n, 0);
        log.close().unwrap();
    }

    #[test]
    fn key_store_reloads_record_created_and_revoked_keys_before_they_are_used() {
        let s = Setup::new();
        let now = OffsetDateTime::now_utc();
        let mut store = KeyStore::default();
        let first = key(&mut store, "alice");
        store.save(&s.store_path()).unwrap();
        let (log, handle, reconciled) = s.server();
        assert_eq!(reconciled, 1, "the first start records the store it finds");
        // As `salus keys create` does while the server runs: a new key in the file.
        let new = store.create("bob", PrincipalKind::Service, &[Permission::Metrics], None, now).unwrap();
        store.save(&s.store_path()).unwrap();
        handle.refresh();
        // The event was queued before the new store was installed: a request made
        // with the new key is recorded after it.
        assert!(handle.authenticate(&new.secret, now).is_ok());
        log.record_blocking(AuditEvent::new(EventKind::InferenceStarted).request_id("req-1")).unwrap();
        store.revoke("alice", now).unwrap();
        store.save(&s.store_path()).unwrap();
        handle.reload().unwrap(); // SIGHUP
        handle.refresh(); // nothing changed since: nothing recorded
        assert!(handle.authenticate(&first.secret, now).is_err());
        drop(handle);
        log.close().unwrap();
        let mut recs: Vec<AuditRecord> = Vec::new();
        read_trail(&s.audit_dir(), &s.key, |r, _| recs.push(r.clone())).unwrap();
        let admin: Vec<(&str, &str, &str)> = recs
            .iter()
            .filter(|r| r.kind.starts_with("admin.") && r.operation.as_deref() != Some(STARTUP_RECONCILE))
            .map(|r| (r.kind.as_str(), r.target.as_deref().unwrap(), r.operation.as_deref().unwrap()))
            .collect();
        assert_eq!(
            admin,
            vec![
                ("admin.key_created", new.record.id.as_str(), "keys.reload_file_changed"),
                ("admin.key_revoked", first.record.id.as_str(), "keys.reload_sighup"),
            ]
        );
        let created = recs
            .iter()
            .position(|r| r.kind == "admin.key_created" && r.target.as_deref() == Some(new.record.id.as_str()))
            .unwrap();
        let used = recs.iter().position(|r| r.request_id.as_deref() == Some("req-1")).unwrap();
        assert!(created < used);
        let d = recs[created].detail.as_ref().unwrap();
        assert_eq!((d["key_principal"].as_str(), d["key_principal_kind"].as_str()), (Some("bob"), Some("service")));
        let all = serde_json::to_string(&recs).unwrap();
        for k in [&first, &new] {
            assert!(!all.contains(&k.record.hash) && !all.contains(&k.secret[9..]), "key material in the trail");
        }
    }
}
