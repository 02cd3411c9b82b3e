//! `salus keys` and `salus serve` start-up checks, run against the real binary.
//! (The full HTTPS + openai SDK end-to-end test is scripts/e2e.sh.)

use std::process::{Command, Output};

fn salus(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_salus"));
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.env_remove("RUST_LOG");
    c.output().expect("run salus")
}

#[test]
fn keys_create_list_revoke_roundtrip() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("keys.json");
    let store = store.to_str().unwrap();
    let out = salus(
        &[
            "keys",
            "--api-keys",
            store,
            "create",
            "--principal",
            "dr.smith",
            "--kind",
            "human",
            "--role",
            "inference",
            "--role",
            "auditor",
            "--expires",
            "90d",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let key = String::from_utf8(out.stdout).unwrap();
    let key = key.trim();
    assert!(key.starts_with("sk-salus-") && key.len() == 9 + 64, "stdout must be the key alone: {key:?}");
    let file = std::fs::read_to_string(dir.path().join("keys.json")).unwrap();
    assert!(!file.contains(&key[9..]), "the store must hold only a hash");

    let list = salus(&["keys", "--api-keys", store, "list"], &[]);
    let text = String::from_utf8(list.stdout).unwrap();
    assert!(text.contains("dr.smith") && text.contains("inference,audit.read") && text.contains("active"), "{text}");
    assert!(text.contains("defaults"), "no limits of its own: {text}");
    assert!(!text.contains(&key[9..]));

    let rev = salus(&["keys", "--api-keys", store, "revoke", "dr.smith"], &[]);
    assert!(rev.status.success());
    let text = String::from_utf8(salus(&["keys", "--api-keys", store, "list"], &[]).stdout).unwrap();
    assert!(text.contains("revoked"), "{text}");

    // Bad input: one-line error, non-zero exit, store untouched.
    let before = std::fs::read(dir.path().join("keys.json")).unwrap();
    for args in [
        vec!["keys", "--api-keys", store, "create", "--principal", "x", "--kind", "robot", "--role", "inference"],
        vec!["keys", "--api-keys", store, "create", "--principal", "x", "--kind", "human", "--role", "root"],
        vec!["keys", "--api-keys", store, "create", "--principal", "x y", "--kind", "human", "--role", "inference"],
        vec!["keys", "--api-keys", store, "revoke", "nobody"],
        vec![
            "keys",
            "--api-keys",
            store,
            "create",
            "--principal",
            "x",
            "--kind",
            "service",
            "--role",
            "inference",
            "--allow-cidr",
            "10.0.0.300/8",
        ],
        vec![
            "keys",
            "--api-keys",
            store,
            "create",
            "--principal",
            "x",
            "--kind",
            "service",
            "--role",
            "inference",
            "--requests-per-minute",
            "0",
        ],
    ] {
        let out = salus(&args, &[]);
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.starts_with("error: ") && err.trim_end().lines().count() == 1, "{err}");
    }
    assert_eq!(std::fs::read(dir.path().join("keys.json")).unwrap(), before);

    // A key with limits of its own (and the permission to break glass).
    let out = salus(
        &[
            "keys",
            "--api-keys",
            store,
            "create",
            "--principal",
            "svc-lab",
            "--kind",
            "service",
            "--role",
            "inference",
            "--role",
            "break_glass",
            "--requests-per-minute",
            "120",
            "--tokens-per-minute",
            "50000",
            "--concurrent-requests",
            "4",
            "--allow-cidr",
            "10.20.0.0/16",
            "--allow-cidr",
            "fd00::/8",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let store_json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("keys.json")).unwrap()).unwrap();
    let rec = store_json["keys"].as_array().unwrap().iter().find(|k| k["principal"] == "svc-lab").unwrap().clone();
    assert_eq!(rec["roles"], serde_json::json!(["inference", "break_glass"]));
    assert_eq!(
        rec["limits"],
        serde_json::json!({"requests_per_minute": 120, "tokens_per_minute": 50000, "concurrent_requests": 4, "allowed_cidrs": ["10.20.0.0/16", "fd00::/8"]})
    );
    let text = String::from_utf8(salus(&["keys", "--api-keys", store, "list"], &[]).stdout).unwrap();
    assert!(text.contains("120 req/min; 50000 tok/min; 4 concurrent; from 10.20.0.0/16,fd00::/8"), "{text}");
}

#[test]
fn key_store_from_config_and_environment() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("salus.toml");
    let store = dir.path().join("from-config.json");
    std::fs::write(&cfg, format!("[auth]\napi_keys = {:?}\n", store.to_str().unwrap())).unwrap();
    let out = salus(
        &[
            "keys",
            "--config",
            cfg.to_str().unwrap(),
            "create",
            "--principal",
            "svc",
            "--kind",
            "service",
            "--role",
            "metrics",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(store.exists());
    let env_store = dir.path().join("from-env.json");
    let out = salus(
        &["keys", "create", "--principal", "svc", "--kind", "service", "--role", "metrics"],
        &[("SALUS_AUTH__API_KEYS", env_store.to_str().unwrap())],
    );
    assert!(out.status.success());
    assert!(env_store.exists());
}

#[test]
fn serve_refuses_plain_http_off_loopback_and_tls_without_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("k.json");
    let out = salus(
        &["serve", "--listen", "0.0.0.0:0", "--model", "/nonexistent.gguf", "--api-keys", keys.to_str().unwrap()],
        &[("SALUS_TLS__ENABLED", "false")],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refusing to serve plain HTTP on 0.0.0.0:0"), "{err}");

    let out = salus(&["serve", "--listen", "127.0.0.1:0", "--model", "/nonexistent.gguf"], &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("tls.cert / tls.key are not set"), "{err}");

    let out = salus(&["serve", "--listen", "not-an-address"], &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("server.listen"));
}

/// Regression (a 0666 key store, a 0666 config and a 0644 TLS key were
/// accepted without a word): each is refused with the chmod that fixes it.
#[test]
fn files_others_can_write_or_read_are_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let chmod = |p: &std::path::Path, m: u32| std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
    // A key store any local user could add a key to.
    let keys = dir.path().join("k.json");
    let out = salus(
        &[
            "keys",
            "--api-keys",
            keys.to_str().unwrap(),
            "create",
            "--principal",
            "a",
            "--kind",
            "service",
            "--role",
            "inference",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    chmod(&keys, 0o666);
    let out = salus(&["keys", "--api-keys", keys.to_str().unwrap(), "list"], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("chmod go-w") && err.lines().count() == 1, "{err}");
    assert_eq!(err.matches("writable by other users").count(), 1, "the cause is not repeated: {err}");
    // A config any local user could add a `cmd:` key source to.
    let config = dir.path().join("salus.toml");
    std::fs::write(&config, "[server]\nlisten = \"127.0.0.1:0\"\n").unwrap();
    chmod(&config, 0o666);
    let out = salus(&["serve", "--config", config.to_str().unwrap()], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("salus.toml is writable by other users"), "{err}");
    // A TLS private key every user can read.
    chmod(&config, 0o600);
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    salus_server::tls::write_self_signed(&cert, &key, &["localhost".into()]).unwrap();
    chmod(&key, 0o644);
    let out = salus(
        &[
            "serve",
            "--config",
            config.to_str().unwrap(),
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
        &[],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("key.pem is readable by all users"), "{err}");
}

/// `salus generate --device`: a device this build or host cannot use is a
/// one-line error before any model is read.
#[test]
fn generate_refuses_an_unusable_device_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-model.gguf");
    let mut cases = vec![("tpu:0", "is not a device")];
    if !cfg!(feature = "cuda") {
        cases.push(("cuda:0", "no cuda support"));
    }
    for (device, expect) in cases {
        let out = salus(&["generate", "--model", missing.to_str().unwrap(), "--prompt", "hi", "--device", device], &[]);
        assert!(!out.status.success(), "{device}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.starts_with("error: ") && err.trim_end().lines().count() == 1, "{device}: {err}");
        assert!(err.to_lowercase().contains(expect), "{device}: {err}");
        assert!(!err.contains("no-model.gguf"), "the device is checked before the model: {err}");
    }
}
