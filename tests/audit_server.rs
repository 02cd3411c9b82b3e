//! End-to-end audit trail of the real server: `salus serve --dev` on the default
//! model, concurrent requests over HTTPS (`curl -k`), `kill -9` mid-way, restart,
//! then `salus audit verify` passes and every request that got a full response
//! has both `inference.started` and `inference.completed` in the trail.
//!
//! Skips (with a message) when the default model or `curl` is absent. The model:
//! `$SALUS_MODEL`, else `~/.cache/salus/models/SmolLM2-135M-Instruct.Q4_1.gguf`.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{free_port, start};

/// One request's result: HTTP status, x-request-id, body.
struct Reply {
    status: u32,
    request_id: Option<String>,
    body: String,
}

fn post(base: &str, key: &str, path: &str, body: &str, tag: &str, dir: &Path) -> Reply {
    let hdr = dir.join(format!("{tag}.hdr"));
    let out = Command::new("curl")
        .args(["-sk", "--max-time", "60", "-o", "-", "-D"])
        .arg(&hdr)
        .args(["-w", "\n%{http_code}", "-H", &format!("Authorization: Bearer {key}")])
        .args(["-H", "Content-Type: application/json", "--data-binary", body])
        .arg(format!("{base}{path}"))
        .output()
        .expect("running curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    let headers = std::fs::read_to_string(&hdr).unwrap_or_default();
    let request_id = headers.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("x-request-id").then(|| v.trim().to_string())
    });
    Reply { status: code.trim().parse().unwrap_or(0), request_id, body: body.to_string() }
}

/// A full response: 200 and a complete body (JSON with choices, or a stream ending in [DONE]).
fn is_full(r: &Reply) -> bool {
    r.status == 200
        && (r.body.trim_end().ends_with("data: [DONE]")
            || serde_json::from_str::<serde_json::Value>(&r.body).is_ok_and(|v| v["choices"].is_array()))
}

fn request_body(i: usize) -> (&'static str, String) {
    let model = "SmolLM2-135M-Instruct.Q4_1";
    match i % 3 {
        0 => (
            "/v1/chat/completions",
            format!(r#"{{"model":"{model}","max_tokens":6,"messages":[{{"role":"user","content":"Count to {i}."}}]}}"#),
        ),
        1 => (
            "/v1/chat/completions",
            format!(
                r#"{{"model":"{model}","max_tokens":6,"stream":true,"messages":[{{"role":"user","content":"Name a color number {i}."}}]}}"#
            ),
        ),
        _ => ("/v1/completions", format!(r#"{{"model":"{model}","max_tokens":6,"prompt":"Once upon a time {i}"}}"#)),
    }
}

/// Sends requests `range` concurrently (one thread each).
fn burst(base: &str, key: &str, range: std::ops::Range<usize>, dir: &Path) -> Vec<std::thread::JoinHandle<Reply>> {
    range
        .map(|i| {
            let (base, key, dir) = (base.to_string(), key.to_string(), dir.to_path_buf());
            std::thread::spawn(move || {
                let (path, body) = request_body(i);
                post(&base, &key, path, &body, &format!("r{i}"), &dir)
            })
        })
        .collect()
}

fn salus(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_salus")).args(args).output().unwrap()
}

#[test]
fn kill9_mid_traffic_then_every_answered_request_is_in_a_verified_trail() {
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
    let scratch = tmp.path().join("scratch");
    std::fs::create_dir(&scratch).unwrap();
    let port = free_port();

    // Round 1: concurrent requests that complete, then more in flight while the server is killed.
    let mut srv = start(&dev, &model, port);
    let mut replies: Vec<Reply> =
        burst(&srv.base, &srv.key, 0..4, &scratch).into_iter().map(|h| h.join().unwrap()).collect();
    assert!(
        replies.iter().all(is_full),
        "first burst must succeed: {:?}",
        replies.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    let in_flight = burst(&srv.base, &srv.key, 4..10, &scratch);
    std::thread::sleep(Duration::from_millis(400));
    srv.child.kill().unwrap(); // SIGKILL
    srv.child.wait().unwrap();
    replies.extend(in_flight.into_iter().map(|h| h.join().unwrap()));

    // Round 2: restart on the same trail (torn tail recovery), one more request, clean stop.
    let mut srv = start(&dev, &model, port);
    let after = post(&srv.base, &srv.key, "/v1/chat/completions", &request_body(0).1, "after", &scratch);
    assert!(is_full(&after), "request after restart: {} {}", after.status, after.body.len());
    replies.push(after);
    // Key management while the server holds the trail: `salus keys` leaves the
    // record to the server, which notices the changed store within a second.
    let audit_key = format!("file:{}", dev.join("audit.key").display());
    let created = salus(&[
        "keys",
        "--api-keys",
        dev.join("api-keys.json").to_str().unwrap(),
        "--audit-dir",
        dev.join("audit").to_str().unwrap(),
        "--audit-key",
        &audit_key,
        "create",
        "--principal",
        "nurse.joy",
        "--kind",
        "human",
        "--role",
        "inference",
    ]);
    let created_err = String::from_utf8_lossy(&created.stderr).into_owned();
    assert!(created.status.success() && created_err.contains("held by a running server"), "{created_err}");
    let new_key_id = created_err.split_whitespace().find(|w| w.starts_with("key_")).expect("key id").to_string();
    std::thread::sleep(Duration::from_millis(1500));
    let _ = Command::new("kill").args(["-HUP", &srv.child.id().to_string()]).status();
    std::thread::sleep(Duration::from_millis(300));
    let _ = Command::new("kill").args(["-TERM", &srv.child.id().to_string()]).status();
    let status = srv.child.wait().unwrap();
    assert!(status.success(), "salus did not stop cleanly on SIGTERM: {status}");

    let audit_dir = dev.join("audit");
    let key = format!("file:{}", dev.join("audit.key").display());
    let v = salus(&["audit", "verify", "--dir", audit_dir.to_str().unwrap(), "--key", &key]);
    assert!(v.status.success(), "audit verify failed: {}", String::from_utf8_lossy(&v.stderr));
    let q = salus(&["audit", "query", "--dir", audit_dir.to_str().unwrap(), "--key", &key]);
    assert!(q.status.success(), "audit query failed: {}", String::from_utf8_lossy(&q.stderr));
    let records: Vec<serde_json::Value> =
        String::from_utf8_lossy(&q.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let kinds_of = |rid: &str| -> Vec<String> {
        records
            .iter()
            .filter(|r| r["request_id"] == rid)
            .map(|r| r["kind"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    let full: Vec<&Reply> = replies.iter().filter(|r| is_full(r)).collect();
    assert!(full.len() >= 5, "expected at least 5 full responses, got {}", full.len());
    for r in &full {
        let rid = r.request_id.as_deref().expect("x-request-id on a full response");
        let kinds = kinds_of(rid);
        assert!(
            kinds.iter().any(|k| k == "inference.started") && kinds.iter().any(|k| k == "inference.completed"),
            "request {rid} got a full response but the trail has {kinds:?}"
        );
    }
    // No record holds prompt text; the trail has two starts and one clean stop.
    let all = String::from_utf8_lossy(&q.stdout);
    assert!(!all.contains("Once upon a time") && !all.contains("Count to"));
    // `salus audit hash --chat-model` reproduces the prompt HMAC of a chat request.
    let mut h = Command::new(env!("CARGO_BIN_EXE_salus"))
        .args(["audit", "hash", "--text", "-", "--key", &key, "--chat-model"])
        .arg(&model)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut h.stdin.take().unwrap(), b"Count to 0.").unwrap();
    let h = h.wait_with_output().unwrap();
    assert!(h.status.success());
    let hmac = String::from_utf8_lossy(&h.stdout).trim().to_string();
    assert_eq!(hmac.len(), 64);
    assert!(
        records.iter().any(|r| r["kind"] == "inference.started" && r["prompt_hmac"] == hmac.as_str()),
        "no inference.started carries the HMAC of the rendered chat prompt"
    );
    let count = |k: &str| records.iter().filter(|r| r["kind"] == k).count();
    assert_eq!(count("server.started"), 2);
    assert_eq!(count("server.stopped"), 1);
    assert_eq!(count("admin.model_loaded"), 2);
    assert_eq!(count("admin.model_unloaded"), 1, "only the cleanly stopped run unloads");
    assert_eq!(count("admin.config_reloaded"), 1, "one SIGHUP");
    assert!(
        records.iter().any(|r| r["kind"] == "admin.key_created"
            && r["target"] == new_key_id.as_str()
            && r["operation"] == "keys.reload_file_changed"),
        "the running server must record the key created by `salus keys`"
    );
    eprintln!(
        "audit_server: {} requests, {} full responses, {} records, {:.1} s",
        replies.len(),
        full.len(),
        records.len(),
        t0.elapsed().as_secs_f64()
    );
}

#[test]
fn serve_refuses_without_audit_key_or_with_a_world_readable_audit_dir() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let keys = tmp.path().join("k.json");
    let base =
        ["serve", "--listen", "127.0.0.1:0", "--model", "/nonexistent.gguf", "--api-keys", keys.to_str().unwrap()];
    let out = Command::new(env!("CARGO_BIN_EXE_salus"))
        .args(base)
        .env("SALUS_TLS__ENABLED", "false")
        .env_remove("SALUS_AUDIT__KEY")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("audit.key"), "{err}");

    let open_dir = tmp.path().join("audit");
    std::fs::create_dir(&open_dir).unwrap();
    std::fs::set_permissions(&open_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let key = tmp.path().join("audit.key");
    let g = salus(&["audit", "keygen", key.to_str().unwrap()]);
    assert!(g.status.success());
    let out = Command::new(env!("CARGO_BIN_EXE_salus"))
        .args(base)
        .env("SALUS_TLS__ENABLED", "false")
        .env("SALUS_AUDIT__KEY", format!("file:{}", key.display()))
        .env("SALUS_AUDIT__DIR", open_dir.to_str().unwrap())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("audit.dir") && err.contains("accessible to other users"), "{err}");

    let out = Command::new(env!("CARGO_BIN_EXE_salus"))
        .args(base)
        .env("SALUS_TLS__ENABLED", "false")
        .env("SALUS_AUDIT__ENABLED", "false")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot be turned off"));
}
