//! Disaster drill with the real binary: `salus serve --dev` on the default
//! model records requests; `salus backup create` backs the trail up while the
//! server runs and again after it stopped; the audit directory is destroyed;
//! `salus backup restore` brings it back; `salus audit verify` passes; a
//! server started on the restored trail records more, and its first record
//! links to the last restored one; the whole chain verifies. Then the exit
//! codes a cron job acts on: a flipped byte in a backed-up object (3, naming
//! it), a restore into a non-empty directory (1).
//!
//! Skips (with a message) when the default model or `curl` is absent. The
//! model: `$SALUS_MODEL`, else `~/.cache/salus/models/SmolLM2-135M-Instruct.Q4_1.gguf`.

use std::process::{Command, Output};
use std::time::Instant;

mod common;
use common::{free_port, start, Server};

impl Server {
    fn chat(&self, i: usize) -> u32 {
        let body = format!(
            r#"{{"model":"SmolLM2-135M-Instruct.Q4_1","max_tokens":4,"messages":[{{"role":"user","content":"Say {i}."}}]}}"#
        );
        let out = Command::new("curl")
            .args(["-sk", "--max-time", "60", "-o", "/dev/null", "-w", "%{http_code}"])
            .args(["-H", &format!("Authorization: Bearer {}", self.key), "-H", "Content-Type: application/json"])
            .args(["--data-binary", &body])
            .arg(format!("{}/v1/chat/completions", self.base))
            .output()
            .expect("running curl");
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0)
    }

    fn stop(mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let status = self.child.wait().unwrap();
        assert!(status.success(), "salus did not stop cleanly: {status}");
    }
}

fn salus(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_salus")).args(args).output().unwrap()
}

fn ok(what: &str, o: &Output) -> String {
    assert!(
        o.status.success(),
        "{what} failed ({}): {}{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn disaster_drill_backup_destroy_restore_verify_serve_again() {
    let model = salus_models::dev_model::default_model_path();
    if !model.exists() {
        eprintln!("SKIP: default model {} not found (run scripts/fetch-model.sh or set SALUS_MODEL)", model.display());
        return;
    }
    if Command::new("curl").arg("--version").output().is_err() {
        eprintln!("SKIP: curl not found");
        return;
    }
    let t0 = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let dev = tmp.path().join("dev");
    let audit = dev.join("audit");
    let dest = tmp.path().join("backups");
    let bk = tmp.path().join("backup.key");
    let key = format!("file:{}", dev.join("audit.key").display());
    let bkey = format!("file:{}", bk.display());
    let (audit_s, dest_s) = (audit.to_str().unwrap(), dest.to_str().unwrap());
    ok("backup keygen", &salus(&["backup", "keygen", bk.to_str().unwrap()]));
    let port = free_port();

    // Serve and record; back up while the server runs; record more; stop; back up again.
    let srv = start(&dev, &model, port);
    for i in 0..3 {
        assert_eq!(srv.chat(i), 200);
    }
    let api_keys = dev.join("api-keys.json");
    let create = |what: &str| {
        ok(
            what,
            &salus(&[
                "backup",
                "create",
                "--to",
                dest_s,
                "--audit-dir",
                audit_s,
                "--key",
                &key,
                "--backup-key",
                &bkey,
                "--api-keys",
                api_keys.to_str().unwrap(),
            ]),
        )
    };
    let first = create("backup create (server running)");
    assert!(first.starts_with("backup #1 "), "{first}");
    assert_eq!(srv.chat(3), 200);
    srv.stop();
    let second = create("backup create (server stopped)");
    assert!(second.starts_with("backup #2 ") && second.contains("already there"), "{second}");
    let listed = ok("backup list", &salus(&["backup", "list", dest_s]));
    assert_eq!(listed.lines().count(), 3, "{listed}");
    let before = ok("audit verify", &salus(&["audit", "verify", "--dir", audit_s, "--key", &key]));
    let head = before.split("chain head ").nth(1).unwrap().split(';').next().unwrap().trim().to_string();
    let verified = ok(
        "backup verify",
        &salus(&["backup", "verify", dest_s, "--backup-key", &bkey, "--key", &key, "--audit-dir", audit_s]),
    );
    assert!(verified.starts_with("OK: 2 backups"), "{verified}");

    // Disaster: the audit directory is gone. Restore it.
    std::fs::remove_dir_all(&audit).unwrap();
    let files = tmp.path().join("restored-files");
    let restored = ok(
        "backup restore",
        &salus(&[
            "backup",
            "restore",
            dest_s,
            "--to",
            audit_s,
            "--files-to",
            files.to_str().unwrap(),
            "--backup-key",
            &bkey,
            "--key",
            &key,
        ]),
    );
    assert!(restored.contains("restored backup #2") && restored.contains(&head), "{restored}");
    assert!(files.join("api-keys.json").exists() && audit.join("keys.recorded").exists());
    let after = ok("audit verify (restored)", &salus(&["audit", "verify", "--dir", audit_s, "--key", &key]));
    assert!(after.contains(&head), "restored trail ends elsewhere: {after} (expected head {head})");
    let last_seq: u64 = after.split("..").nth(1).unwrap().split(')').next().unwrap().parse().unwrap();

    // Serve again on the restored trail, record more; the chain continues.
    let srv = start(&dev, &model, port);
    assert_eq!(srv.chat(4), 200);
    srv.stop();
    ok("audit verify (after)", &salus(&["audit", "verify", "--dir", audit_s, "--key", &key]));
    let q = ok("audit query", &salus(&["audit", "query", "--dir", audit_s, "--key", &key]));
    let records: Vec<serde_json::Value> = q.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let next = records.iter().find(|r| r["seq"] == last_seq + 1).expect("a record after the restored ones");
    assert_eq!(next["prev_hash"], head.as_str(), "the next record must link to the last restored one");
    assert!(records.iter().filter(|r| r["kind"] == "inference.completed").count() >= 5);
    let third = create("backup create (after restore)");
    assert!(third.starts_with("backup #3 "), "{third}");
    ok(
        "backup verify (3)",
        &salus(&["backup", "verify", dest_s, "--backup-key", &bkey, "--key", &key, "--audit-dir", audit_s]),
    );

    // What a cron job sees: a flipped byte is exit code 3 and names the object…
    let objects = dest.join("objects");
    let victim = std::fs::read_dir(&objects)
        .unwrap()
        .flat_map(|d| std::fs::read_dir(d.unwrap().path()).unwrap())
        .map(|f| f.unwrap().path())
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    let mut bytes = std::fs::read(&victim).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x20;
    std::fs::write(&victim, &bytes).unwrap();
    let bad = salus(&["backup", "verify", dest_s, "--backup-key", &bkey]);
    let err = String::from_utf8_lossy(&bad.stderr);
    let name = victim.file_name().unwrap().to_str().unwrap();
    assert_eq!(bad.status.code(), Some(3), "{err}");
    assert!(err.contains(name) && err.contains("modified"), "{err}");
    // …and a restore into a non-empty directory is exit code 1.
    let refused = salus(&["backup", "restore", dest_s, "--to", audit_s, "--backup-key", &bkey]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("not empty"));
    eprintln!("backup_cli: disaster drill in {:.1} s", t0.elapsed().as_secs_f64());
}
