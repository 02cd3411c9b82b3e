//! The audit trail's key baseline (`keys.recorded`) closes the gap of a
//! key-store change made while a server runs and the server being killed
//! (`kill -9`) before it noticed the change: the next start (or the next
//! `salus keys` session) records it, once.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use salus_audit::{read_trail, verify_trail, AuditLog, AuditLogSettings, AuditRecord};
use salus_sensitive::secret::{write_new_key_file, KeySource, SecretKey};
use salus_server::auth::key_baseline::{BASELINE_FILE, STARTUP_RECONCILE};
use salus_server::auth::store::{NewKey, OffsetDateTime};
use salus_server::auth::{KeyStore, KeyStoreHandle, Permission, PrincipalKind};

struct Site {
    tmp: tempfile::TempDir,
    key: SecretKey,
}

impl Site {
    fn new() -> Site {
        let tmp = tempfile::tempdir().unwrap();
        let key = write_new_key_file(&tmp.path().join("audit.key")).unwrap();
        Site { tmp, key }
    }
    fn audit_dir(&self) -> PathBuf {
        self.tmp.path().join("audit")
    }
    fn store_path(&self) -> PathBuf {
        self.tmp.path().join("api-keys.json")
    }
    fn key_source(&self) -> String {
        format!("file:{}", self.tmp.path().join("audit.key").display())
    }
    /// The trail and key store opened as `salus serve` opens them (trail,
    /// key-store handle, record_changes_in, reconcile). Returns the number of
    /// events the reconcile recorded.
    fn start_server(&self) -> (AuditLog, KeyStoreHandle, usize) {
        let cfg = AuditLogSettings::new(self.audit_dir(), self.key_source().parse::<KeySource>().unwrap());
        let log = AuditLog::open(cfg).unwrap();
        let keys = KeyStoreHandle::open(self.store_path()).unwrap();
        keys.record_changes_in(log.clone());
        let n = keys.reconcile_with_trail().unwrap();
        (log, keys, n)
    }
    /// Adds a key to the store file, as `salus keys create` does while a
    /// server holds the trail (no audit record of its own).
    fn create_behind_the_servers_back(&self, principal: &str) -> NewKey {
        let mut store = KeyStore::load(&self.store_path()).unwrap();
        let k = store
            .create(principal, PrincipalKind::Human, &[Permission::Inference], None, OffsetDateTime::now_utc())
            .unwrap();
        store.save(&self.store_path()).unwrap();
        k
    }
    fn records(&self) -> Vec<AuditRecord> {
        let mut out = Vec::new();
        read_trail(&self.audit_dir(), &self.key, |r, _| out.push(r.clone())).unwrap();
        out
    }
    fn salus(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_salus")).args(args).env_remove("SALUS_AUDIT_KEY").output().unwrap()
    }
}

/// `(kind, target, operation)` of the `admin.key_*` records.
fn key_events(recs: &[AuditRecord]) -> Vec<(String, String, String)> {
    recs.iter()
        .filter(|r| r.kind.starts_with("admin.key_"))
        .map(|r| (r.kind.clone(), r.target.clone().unwrap_or_default(), r.operation.clone().unwrap_or_default()))
        .collect()
}

fn created(id: &str, operation: &str) -> (String, String, String) {
    ("admin.key_created".into(), id.into(), operation.into())
}

fn assert_no_key_material(path: &Path, keys: &[&NewKey]) {
    let text = std::fs::read_to_string(path).unwrap();
    for k in keys {
        assert!(!text.contains(&k.record.hash), "a key hash in {}", path.display());
        assert!(!text.contains(&k.secret[9..]), "a key in {}", path.display());
    }
}

#[test]
fn change_before_kill_9_is_recorded_once_at_the_next_start() {
    let site = Site::new();
    let alice = site.create_behind_the_servers_back("alice");

    // Server 1: first start on this trail records the key set it starts with.
    let (log, keys, n) = site.start_server();
    assert_eq!(n, 1);
    // While it runs, `salus keys create` changes the store; the server is
    // killed before its one-second check: no reload, no close.
    let bob = site.create_behind_the_servers_back("bob");
    drop(keys);
    drop(log); // abandoned like a crash: no server.stopped
    assert!(
        !key_events(&site.records()).iter().any(|e| e.1 == bob.record.id),
        "the test needs the change to be unrecorded before the restart"
    );

    // Server 2 records the missed change; server 3 finds nothing to record.
    let (log, _keys, n) = site.start_server();
    assert_eq!(n, 1, "the restart must record the key created before the kill");
    log.close().unwrap();
    let (log, _keys, n) = site.start_server();
    assert_eq!(n, 0, "a second restart records nothing");
    log.close().unwrap();

    verify_trail(&site.audit_dir(), &site.key, None).unwrap();
    let recs = site.records();
    assert_eq!(
        key_events(&recs),
        [created(&alice.record.id, STARTUP_RECONCILE), created(&bob.record.id, STARTUP_RECONCILE)]
    );
    let first = recs.iter().find(|r| r.target.as_deref() == Some(alice.record.id.as_str())).unwrap();
    assert_eq!(first.detail.as_ref().unwrap()["baseline"], "missing", "the first inventory is marked");
    let missed = recs.iter().find(|r| r.target.as_deref() == Some(bob.record.id.as_str())).unwrap();
    let d = missed.detail.as_ref().unwrap();
    assert_eq!(d["key_principal"], "bob");
    assert!(d.get("baseline").is_none());
    assert_no_key_material(&site.audit_dir().join(BASELINE_FILE), &[&alice, &bob]);
}

/// The same gap, closed by the next `salus keys` run instead of a server start:
/// the CLI records the missed change before its own, and a later server start
/// records neither again.
#[test]
fn salus_keys_records_the_change_a_killed_server_missed_before_its_own() {
    let site = Site::new();
    let store = site.store_path();
    let audit_dir = site.audit_dir();
    let key_source = site.key_source();
    let base = [
        "keys",
        "--api-keys",
        store.to_str().unwrap(),
        "--audit-dir",
        audit_dir.to_str().unwrap(),
        "--audit-key",
        key_source.as_str(),
    ];
    let create = |principal: &str| {
        let out = site.salus(
            &[&base[..], &["create", "--principal", principal, "--kind", "human", "--role", "inference"]].concat(),
        );
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };

    let (log, keys, n) = site.start_server();
    assert_eq!(n, 0, "an empty store has nothing to record");
    let err = create("nurse.joy");
    assert!(err.contains("held by a running server"), "{err}");
    drop(keys);
    drop(log); // killed before it noticed the new key

    let err = create("dr.who");
    assert!(err.contains("recorded in the audit trail"), "{err}");
    let (log, _keys, n) = site.start_server();
    assert_eq!(n, 0, "the CLI advanced the baseline: nothing left for the next start");
    log.close().unwrap();

    let stored = KeyStore::load(&store).unwrap();
    let id = |p: &str| stored.keys.iter().find(|k| k.principal == p).unwrap().id.clone();
    let q = site.salus(&["audit", "query", "--dir", audit_dir.to_str().unwrap(), "--key", &key_source]);
    assert!(q.status.success(), "{}", String::from_utf8_lossy(&q.stderr));
    let recs: Vec<serde_json::Value> =
        String::from_utf8_lossy(&q.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let events: Vec<(&str, &str, &str)> = recs
        .iter()
        .filter(|r| r["kind"].as_str().unwrap().starts_with("admin.key_"))
        .map(|r| (r["kind"].as_str().unwrap(), r["target"].as_str().unwrap(), r["operation"].as_str().unwrap()))
        .collect();
    assert_eq!(
        events,
        [
            ("admin.key_created", id("nurse.joy").as_str(), STARTUP_RECONCILE),
            ("admin.key_created", id("dr.who").as_str(), "keys.create"),
        ]
    );
}

/// `salus serve --dev` creates a development key on every start: it is
/// recorded once (as `serve.dev_key`), never again by the start-up reconcile.
/// (The model path does not exist, so each start stops after the key work.)
#[test]
fn serve_dev_records_each_development_key_once() {
    let site = Site::new();
    let dev = site.tmp.path().join("dev");
    for _ in 0..2 {
        let out = site.salus(&[
            "serve",
            "--dev",
            "--dev-dir",
            dev.to_str().unwrap(),
            "--model",
            "/nonexistent/model.gguf",
            "--listen",
            "127.0.0.1:0",
        ]);
        assert!(!out.status.success(), "serve must stop: the model does not exist");
    }
    let audit_dir = dev.join("audit");
    let key_source = format!("file:{}", dev.join("audit.key").display());
    let q = site.salus(&["audit", "query", "--dir", audit_dir.to_str().unwrap(), "--key", &key_source]);
    assert!(q.status.success(), "{}", String::from_utf8_lossy(&q.stderr));
    let recs: Vec<serde_json::Value> =
        String::from_utf8_lossy(&q.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let stored = KeyStore::load(&dev.join("api-keys.json")).unwrap();
    assert_eq!(stored.keys.len(), 2);
    let created: Vec<(&str, &str)> = recs
        .iter()
        .filter(|r| r["kind"] == "admin.key_created")
        .map(|r| (r["target"].as_str().unwrap(), r["operation"].as_str().unwrap()))
        .collect();
    let expected: Vec<(&str, &str)> = stored.keys.iter().map(|k| (k.id.as_str(), "serve.dev_key")).collect();
    assert_eq!(created, expected);
}
