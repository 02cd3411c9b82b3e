//! `salus model …` end to end through the real binary: exit codes and messages.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

fn salus(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_salus")).args(args).env_remove("HF_ENDPOINT").output().expect("run salus")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "expected success, got {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Asserts failure with a one-line `error:` message containing `needle`.
fn fails(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure; stdout: {}", String::from_utf8_lossy(&out.stdout));
    assert!(err.contains("error:") && err.contains(needle), "stderr lacks {needle:?}: {err}");
    assert!(!err.contains("panicked"), "must not panic: {err}");
}

fn keygen(path: &Path) -> String {
    let out = ok(&salus(&["model", "keygen", path.to_str().unwrap()]));
    assert_eq!(std::fs::metadata(path).unwrap().permissions().mode() & 0o777, 0o600);
    out.split("key id ").nth(1).unwrap().trim().trim_end_matches(')').to_string()
}

fn fingerprint_line(stdout: &str) -> String {
    stdout.lines().find(|l| l.contains("fingerprint")).unwrap().split_whitespace().last().unwrap().to_string()
}

#[test]
fn seal_inspect_verify_rewrap_and_failures() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    let id_a = keygen(Path::new(&p("a.key")));
    let id_b = keygen(Path::new(&p("b.key")));
    assert_ne!(id_a, id_b);
    let (kek_a, kek_b) = (format!("file:{}", p("a.key")), format!("file:{}", p("b.key")));

    let mut gguf = b"GGUF".to_vec();
    gguf.extend((0..3000u32).map(|i| (i * 31 % 253) as u8));
    std::fs::write(p("m.gguf"), &gguf).unwrap();
    let sealed = p("m.sealed");
    let out = ok(&salus(&["model", "seal", &p("m.gguf"), "--out", &sealed, "--kek", &kek_a, "--chunk-size", "256"]));
    let fp = fingerprint_line(&out);
    assert_eq!(fp.len(), 64);
    // Never overwrites.
    fails(&salus(&["model", "seal", &p("m.gguf"), "--out", &sealed, "--kek", &kek_a]), "refusing to overwrite");

    let info: serde_json::Value = serde_json::from_str(&ok(&salus(&["model", "inspect", &sealed, "--json"]))).unwrap();
    assert_eq!(info["kind"], "gguf");
    assert_eq!(info["name"], "m");
    assert_eq!(info["chunk_size"], 256);
    assert_eq!(info["kek_ids"], serde_json::json!([id_a]));
    let key_hex = std::fs::read_to_string(p("a.key")).unwrap();
    assert!(!ok(&salus(&["model", "inspect", &sealed])).contains(key_hex.trim()));

    let v = ok(&salus(&["model", "verify", &sealed, "--kek", &kek_a]));
    assert!(v.starts_with("OK "));
    assert_eq!(fingerprint_line(&v), fp, "verify recomputes the same fingerprint");
    fails(&salus(&["model", "verify", &sealed, "--kek", &kek_b]), &format!("sealed under key id {id_a}"));

    // Tampering: verify exits non-zero and names the file and the failure.
    let pristine = std::fs::read(&sealed).unwrap();
    let mut t = pristine.clone();
    t[4096 + 300] ^= 1;
    std::fs::write(&sealed, &t).unwrap();
    fails(&salus(&["model", "verify", &sealed, "--kek", &kek_a]), "chunk 1 of");
    std::fs::write(&sealed, &pristine[..pristine.len() - 10]).unwrap();
    fails(&salus(&["model", "verify", &sealed, "--kek", &kek_a]), "m.sealed");
    let mut g = pristine.clone();
    g.extend_from_slice(b"junk");
    std::fs::write(&sealed, &g).unwrap();
    fails(&salus(&["model", "verify", &sealed, "--kek", &kek_a]), "trailing data");
    std::fs::write(&sealed, &pristine).unwrap();

    // Rotation: the payload stays, only the key slot changes.
    ok(&salus(&["model", "rewrap", &sealed, "--from-kek", &kek_a, "--to-kek", &kek_b]));
    let rotated = std::fs::read(&sealed).unwrap();
    assert_eq!(&rotated[4096..], &pristine[4096..]);
    assert_eq!(fingerprint_line(&ok(&salus(&["model", "verify", &sealed, "--kek", &kek_b]))), fp);
    fails(&salus(&["model", "verify", &sealed, "--kek", &kek_a]), "sealed under key id");

    // Key sources: env works; a group-readable key file is refused.
    let key_b = std::fs::read_to_string(p("b.key")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_salus"))
        .args(["model", "verify", &sealed, "--kek", "env:SALUS_CLI_TEST_KEK"])
        .env("SALUS_CLI_TEST_KEK", key_b.trim())
        .output()
        .unwrap();
    ok(&out);
    std::fs::set_permissions(p("b.key"), std::fs::Permissions::from_mode(0o640)).unwrap();
    fails(&salus(&["model", "verify", &sealed, "--kek", &kek_b]), "readable by group or others");
    fails(&salus(&["model", "verify", &p("m.gguf"), "--kek", &kek_a]), "not a sealed Salus file");
    fails(&salus(&["model", "seal", &p("a.key"), "--out", &p("x.sealed"), "--kek", &kek_a]), "not a GGUF file");
}
