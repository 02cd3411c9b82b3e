//! `pull` against a mock hub served on loopback (never the real network).

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

use std::path::PathBuf;

use salus_seal::load_model;
use salus_sensitive::secret::{write_new_key_file, KeySource, SecretKey};
use sha2::{Digest, Sha256};

use super::pull::{self, PullError, PullOptions};

struct Fixture {
    dir: tempfile::TempDir,
    kek: SecretKey,
    kek_src: KeySource,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("kek");
    let kek = write_new_key_file(&p).unwrap();
    Fixture { kek_src: KeySource::File(p), kek, dir }
}

impl Fixture {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

#[derive(Clone)]
struct HubFile {
    name: &'static str,
    bytes: Vec<u8>,
    /// The LFS sha256 the hub advertises (may deliberately be wrong).
    lfs_sha256: Option<String>,
}

/// Every request the mock saw: (path, Range header, Authorization header).
type Log = Arc<Mutex<Vec<(String, Option<String>, Option<String>)>>>;

/// Serves hf-style metadata and `resolve` downloads. The first full GET of
/// `cut.0` sends only `cut.1` body bytes and closes the connection.
fn mock_hub(files: Vec<HubFile>, cut: Option<(&'static str, usize)>) -> (String, Log) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let log: Log = Arc::default();
    let log2 = log.clone();
    std::thread::spawn(move || {
        let mut cut = cut;
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
            let (mut range, mut auth) = (None, None);
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                    break;
                }
                let (k, v) = h.split_once(':').unwrap_or(("", ""));
                match k.to_ascii_lowercase().as_str() {
                    "range" => range = Some(v.trim().to_string()),
                    "authorization" => auth = Some(v.trim().to_string()),
                    _ => {}
                }
            }
            log2.lock().unwrap().push((path.clone(), range.clone(), auth));
            let respond = |stream: &mut std::net::TcpStream, status: &str, extra: &str, body: &[u8], send: usize| {
                let head =
                    format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n", body.len());
                let _ = stream.write_all(head.as_bytes());
                let _ = stream.write_all(&body[..send.min(body.len())]);
                let _ = stream.flush();
            };
            if path.starts_with("/api/models/acme/tiny/revision/main") {
                let siblings: Vec<serde_json::Value> = files
                    .iter()
                    .map(|f| match &f.lfs_sha256 {
                        Some(s) => serde_json::json!({"rfilename": f.name, "size": f.bytes.len(),
                            "lfs": {"sha256": s, "size": f.bytes.len()}}),
                        None => serde_json::json!({"rfilename": f.name, "size": f.bytes.len()}),
                    })
                    .chain([serde_json::json!({"rfilename": "onnx/model.json", "size": 2})])
                    .collect();
                let body = serde_json::json!({"id": "acme/tiny", "sha": COMMIT, "siblings": siblings}).to_string();
                respond(&mut stream, "200 OK", "Content-Type: application/json\r\n", body.as_bytes(), usize::MAX);
                continue;
            }
            let prefix = format!("/acme/tiny/resolve/{COMMIT}/");
            let Some(f) = path.strip_prefix(&prefix).and_then(|n| files.iter().find(|f| f.name == n)) else {
                respond(&mut stream, "404 Not Found", "", b"", 0);
                continue;
            };
            let start = range
                .as_deref()
                .and_then(|r| r.strip_prefix("bytes="))
                .and_then(|r| r.strip_suffix('-'))
                .and_then(|r| r.parse::<usize>().ok());
            match start {
                Some(s) => {
                    let cr = format!("Content-Range: bytes {s}-{}/{}\r\n", f.bytes.len() - 1, f.bytes.len());
                    respond(&mut stream, "206 Partial Content", &cr, &f.bytes[s..], usize::MAX);
                }
                None => {
                    let send = match cut {
                        Some((name, n)) if name == f.name => {
                            cut = None;
                            n
                        }
                        _ => usize::MAX,
                    };
                    respond(&mut stream, "200 OK", "", &f.bytes, send);
                }
            }
        }
    });
    (format!("http://{addr}"), log)
}

fn files() -> Vec<HubFile> {
    let weights: Vec<u8> = (0..5000u32).map(|i| (i * 7 % 251) as u8).collect();
    vec![
        HubFile { name: "config.json", bytes: br#"{"hidden_size":8}"#.to_vec(), lfs_sha256: None },
        HubFile { name: "README.md", bytes: b"# tiny".to_vec(), lfs_sha256: None },
        HubFile { name: "model.safetensors", lfs_sha256: Some(hex::encode(Sha256::digest(&weights))), bytes: weights },
        HubFile { name: "tokenizer.json", bytes: b"{}".to_vec(), lfs_sha256: None },
    ]
}

#[test]
fn pull_streams_resumes_checks_and_seals() {
    let fx = fixture();
    let (endpoint, log) = mock_hub(files(), Some(("model.safetensors", 1800)));
    let opts = PullOptions {
        endpoint: Some(endpoint),
        token: Some("hf_test_token".into()),
        chunk_size: 1024,
        ..Default::default()
    };
    let (repo, rev) = pull::parse_repo_spec("acme/tiny").unwrap();
    let plan = pull::plan(&repo, &rev, &opts).unwrap();
    assert_eq!(plan.commit, COMMIT);
    let names: Vec<_> = plan.files.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, ["config.json", "model.safetensors", "tokenizer.json"]);
    let out = fx.path("tiny.sealed");
    let got = std::sync::atomic::AtomicU64::new(0);
    let summary = pull::pull(&plan, &out, &fx.kek, &opts, &|n| {
        got.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    })
    .unwrap();
    assert_eq!(got.into_inner(), plan.total_bytes());
    let log = log.lock().unwrap().clone();
    assert!(
        log.iter().any(|(p, r, _)| p.ends_with("/model.safetensors") && r.as_deref() == Some("bytes=1800-")),
        "the cut download must resume with a Range request: {log:?}"
    );
    assert!(log.iter().all(|(_, _, a)| a.as_deref() == Some("Bearer hf_test_token")), "token sent on every request");
    // Only the sealed file (and the KEK) exist afterwards: no plaintext on disk.
    let mut entries: Vec<_> =
        std::fs::read_dir(fx.dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    entries.sort();
    assert_eq!(entries, ["kek", "tiny.sealed"]);
    // Loads, and matches the plaintext directory's fingerprint.
    let loaded = load_model(&out, Some(&fx.kek_src), false).unwrap();
    let plain_dir = tempfile::tempdir().unwrap();
    for f in files() {
        std::fs::write(plain_dir.path().join(f.name), &f.bytes).unwrap();
        if f.name != "README.md" {
            assert_eq!(loaded.source.get(f.name).unwrap().as_slice(), &f.bytes[..], "{}", f.name);
        }
    }
    let plain = load_model(plain_dir.path(), None, true).unwrap();
    assert_eq!(loaded.fingerprint, plain.fingerprint);
    assert_eq!(loaded.fingerprint, summary.fingerprint);
}

#[test]
fn pull_rejects_a_file_that_fails_the_hub_sha256() {
    let fx = fixture();
    let mut fs = files();
    fs[2].lfs_sha256 = Some(hex::encode(Sha256::digest(b"something else")));
    let (endpoint, _) = mock_hub(fs, None);
    let opts = PullOptions { endpoint: Some(endpoint), chunk_size: 1024, ..Default::default() };
    let plan = pull::plan("acme/tiny", "main", &opts).unwrap();
    let out = fx.path("bad.sealed");
    let e = pull::pull(&plan, &out, &fx.kek, &opts, &|_| {}).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("model.safetensors") && msg.contains("SHA-256"), "{msg}");
    assert!(!out.exists());
    assert_eq!(std::fs::read_dir(fx.dir.path()).unwrap().count(), 1, "temporary file removed");
    // Unknown repository: a clear error, not a panic.
    assert!(matches!(pull::plan("acme/nope", "main", &opts), Err(PullError::Hub(_))));
    assert!(pull::parse_repo_spec("../x").is_err());
    assert_eq!(pull::parse_repo_spec("a/b@v1.0").unwrap(), ("a/b".to_string(), "v1.0".to_string()));
}
