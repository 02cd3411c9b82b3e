//! `salus audit …` end to end: a trail written by the library is verified,
//! queried, exported and searched through the binary; tampering makes
//! `verify` exit non-zero naming the segment and record.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use salus_audit::{AuditEvent, AuditLog, AuditLogSettings, AuditPrincipal, EventKind};
use salus_models::Phi;
use salus_sensitive::secret::KeySource;

fn salus(args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_salus"))
        .args(args)
        .env_remove("SALUS_AUDIT_KEY")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or_default()).unwrap();
    drop(input);
    child.wait_with_output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn write_trail(dir: &Path, key: &str) -> String {
    let mut cfg = AuditLogSettings::new(dir.join("audit"), key.parse::<KeySource>().unwrap());
    cfg.checkpoint_dir = Some(dir.join("worm"));
    cfg.segment_max_bytes = 4096;
    cfg.instance = "cli-test".into();
    let log = AuditLog::open(cfg).unwrap();
    let prompt = Phi::new(String::from("chest pain since Tuesday, BP 150/95"));
    let hmac = log.hmac(&prompt);
    for i in 0..20 {
        let who = if i % 2 == 0 { "alice" } else { "bob" };
        let ev = AuditEvent::new(if i == 7 { EventKind::InferenceFailed } else { EventKind::InferenceCompleted })
            .request_id(format!("r{i}"))
            .principal(AuditPrincipal::new(who, "api_key", ["clinician"]))
            .model("smollm2", "sha256:aa")
            .tokens(12, 30)
            .prompt_hmac(hmac.clone());
        log.record_blocking(ev).unwrap();
    }
    log.close().unwrap();
    hmac.as_str().to_string()
}

#[test]
fn verify_query_export_and_hash() {
    let tmp = tempfile::tempdir().unwrap();
    let key_path = tmp.path().join("audit.key");
    let key = format!("file:{}", key_path.display());
    let out = salus(&["audit", "keygen", key_path.to_str().unwrap()], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let hmac = write_trail(tmp.path(), &key);
    let dir = tmp.path().join("audit");
    let d = dir.to_str().unwrap();
    let worm = tmp.path().join("worm");

    let out = salus(&["audit", "verify", "--dir", d, "--checkpoints", worm.to_str().unwrap(), "--key", &key], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).starts_with("OK: 22 records"), "{}", text(&out.stdout));

    let out = salus(&["audit", "query", "--dir", d, "--key", &key, "--principal", "bob", "--event", "inference"], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let lines: Vec<serde_json::Value> = text(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 10);
    assert!(lines.iter().all(|r| r["principal"]["id"] == "bob"));
    assert_eq!(lines.iter().filter(|r| r["kind"] == "inference.failed").count(), 1);
    let out = salus(&["audit", "query", "--dir", d, "--key", &key, "--until", "2000-01-01"], None);
    assert!(out.status.success() && out.stdout.is_empty());
    let out = salus(&["audit", "query", "--dir", d, "--key", &key, "--event", "nonsense"], None);
    assert!(!out.status.success() && text(&out.stderr).contains("unknown event"));

    let out =
        salus(&["audit", "export", "--format", "fhir", "--dir", d, "--key", &key, "--event", "inference.failed"], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let bundle: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(bundle["resourceType"], "Bundle");
    let ev = &bundle["entry"][0]["resource"];
    assert_eq!(
        (ev["resourceType"].as_str(), ev["action"].as_str(), ev["outcome"].as_str()),
        (Some("AuditEvent"), Some("E"), Some("8"))
    );
    assert_eq!(bundle["entry"].as_array().unwrap().len(), 1);

    let out = salus(&["audit", "hash", "--key", &key, "--text", "-"], Some(b"chest pain since Tuesday, BP 150/95"));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), hmac);
    let out = salus(&["audit", "hash", "--key", &key, "--text", "some text"], None);
    assert!(!out.status.success());

    // Tamper with one byte of a sealed segment: verify fails, naming it.
    let seg = dir.join("seg-0000000000000002.sealed");
    let mut bytes = std::fs::read(&seg).unwrap();
    let n = bytes.len();
    bytes[n - 20] ^= 1;
    std::fs::write(&seg, &bytes).unwrap();
    let out = salus(&["audit", "verify", "--dir", d, "--key", &key], None);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("seg-0000000000000002.sealed") && err.contains("FAILED"), "{err}");
    // Query stops at the damage and fails too.
    let out = salus(&["audit", "query", "--dir", d, "--key", &key], None);
    assert!(!out.status.success());
}

/// `salus keys` records its changes in the trail when no server holds it, tells
/// when a running server holds it (that server records them on reload), and
/// changes nothing when the trail cannot be used.
#[test]
fn keys_changes_are_audited_by_the_cli_or_left_to_the_running_server() {
    let tmp = tempfile::tempdir().unwrap();
    let key_path = tmp.path().join("audit.key");
    assert!(salus(&["audit", "keygen", key_path.to_str().unwrap()], None).status.success());
    let audit_key = format!("file:{}", key_path.display());
    let audit_dir = tmp.path().join("audit");
    let store = tmp.path().join("keys.json");
    let base = [
        "keys",
        "--api-keys",
        store.to_str().unwrap(),
        "--audit-dir",
        audit_dir.to_str().unwrap(),
        "--audit-key",
        &audit_key,
    ];
    let run = |extra: &[&str]| salus(&[&base[..], extra].concat(), None);

    let out = run(&["create", "--principal", "dr.who", "--kind", "human", "--role", "inference"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let secret = text(&out.stdout).trim().to_string();
    assert!(text(&out.stderr).contains("recorded in the audit trail"), "{}", text(&out.stderr));
    let out = run(&["revoke", "dr.who"]);
    assert!(out.status.success(), "{}", text(&out.stderr));

    let dir = audit_dir.to_str().unwrap();
    let v = salus(&["audit", "verify", "--dir", dir, "--key", &audit_key], None);
    assert!(v.status.success(), "{}", text(&v.stderr));
    let q = salus(&["audit", "query", "--dir", dir, "--key", &audit_key], None);
    assert!(q.status.success(), "{}", text(&q.stderr));
    let recs: Vec<serde_json::Value> = text(&q.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let stored: serde_json::Value = serde_json::from_slice(&std::fs::read(&store).unwrap()).unwrap();
    let key_id = stored["keys"][0]["id"].as_str().unwrap();
    let hash = stored["keys"][0]["hash"].as_str().unwrap();
    let admin: Vec<(&str, &str)> = recs
        .iter()
        .filter(|r| r["kind"].as_str().unwrap().starts_with("admin."))
        .map(|r| (r["kind"].as_str().unwrap(), r["target"].as_str().unwrap()))
        .collect();
    assert_eq!(admin, [("admin.key_created", key_id), ("admin.key_revoked", key_id)]);
    assert!(recs.iter().any(|r| r["kind"] == "server.started" && r["detail"]["session"] == "salus keys"));
    let created = recs.iter().find(|r| r["kind"] == "admin.key_created").unwrap();
    assert_eq!(created["detail"]["key_principal"], "dr.who");
    assert_eq!(created["principal"]["kind"], "local");
    assert!(!text(&q.stdout).contains(hash) && !text(&q.stdout).contains(&secret[9..]), "key material in the trail");

    // A running server holds the trail: the store changes, the CLI says who records it.
    let cfg = AuditLogSettings::new(&audit_dir, audit_key.parse::<KeySource>().unwrap());
    let held = AuditLog::open(cfg).unwrap();
    let out = run(&["create", "--principal", "nurse.joy", "--kind", "human", "--role", "inference"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("held by a running server"), "{}", text(&out.stderr));
    held.close().unwrap();
    let stored: serde_json::Value = serde_json::from_slice(&std::fs::read(&store).unwrap()).unwrap();
    assert_eq!(stored["keys"].as_array().unwrap().len(), 2);

    // The trail cannot be opened (wrong key): fail closed, store unchanged.
    let before = std::fs::read(&store).unwrap();
    let other = tmp.path().join("other.key");
    assert!(salus(&["audit", "keygen", other.to_str().unwrap()], None).status.success());
    let other = format!("file:{}", other.display());
    let out = salus(
        &[
            "keys",
            "--api-keys",
            store.to_str().unwrap(),
            "--audit-dir",
            dir,
            "--audit-key",
            &other,
            "create",
            "--principal",
            "mallory",
            "--kind",
            "human",
            "--role",
            "admin",
        ],
        None,
    );
    assert!(!out.status.success());
    assert!(text(&out.stderr).starts_with("error: ") && text(&out.stderr).contains("key store unchanged"));
    assert!(out.stdout.is_empty(), "no key may be printed when nothing was stored");
    assert_eq!(std::fs::read(&store).unwrap(), before);
}

/// Several replicas' trails in one command: verified and reported one by one
/// (a damaged one fails the command but the others are still reported),
/// queried together, and reported together.
#[test]
fn several_replica_trails_are_verified_and_reported_per_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let key_path = tmp.path().join("audit.key");
    let key = format!("file:{}", key_path.display());
    assert!(salus(&["audit", "keygen", key_path.to_str().unwrap()], None).status.success());
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    write_trail(&a, &key);
    write_trail(&b, &key);
    let (da, db) = (a.join("audit"), b.join("audit"));
    let (da, db) = (da.to_str().unwrap(), db.to_str().unwrap());
    let out = salus(&["audit", "verify", "--dir", da, "--dir", db, "--key", &key], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let lines: Vec<String> = text(&out.stdout).lines().map(String::from).collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(
        lines[0].starts_with(&format!("OK {da}: 22 records")) && lines[1].starts_with(&format!("OK {db}: 22 records"))
    );
    let out = salus(&["audit", "query", "--dir", da, "--dir", db, "--key", &key, "--event", "inference"], None);
    assert_eq!(text(&out.stdout).lines().count(), 40);
    let out = salus(&["audit", "report", "access", "--dir", da, "--dir", db, "--key", &key], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("\"alice\",0,20,0,0,"), "both trails counted: {}", text(&out.stdout));
    // Damage replica b: the command fails, naming b, and still reports a.
    let seg = std::fs::read_dir(b.join("audit"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "sealed"))
        .expect("a sealed segment");
    let mut bytes = std::fs::read(&seg).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 1;
    std::fs::write(&seg, bytes).unwrap();
    let out = salus(&["audit", "verify", "--dir", da, "--dir", db, "--key", &key], None);
    assert!(!out.status.success());
    let stdout = text(&out.stdout);
    assert!(stdout.contains(&format!("OK {da}:")) && stdout.contains(&format!("FAILED {db}:")), "{stdout}");
    assert!(text(&out.stderr).contains(db), "{}", text(&out.stderr));
    // --checkpoints belongs to one trail.
    let out = salus(&["audit", "verify", "--dir", da, "--dir", db, "--checkpoints", da, "--key", &key], None);
    assert!(!out.status.success() && text(&out.stderr).contains("single --dir"));
}
