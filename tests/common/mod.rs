//! What several end-to-end tests share: a `salus serve --dev` on loopback.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A running `salus serve --dev`: the process, its development key, its base URL.
pub struct Server {
    pub child: Child,
    pub key: String,
    pub base: String,
}

/// Starts `serve --dev` and waits for the printed development API key (printed
/// once the listener is bound).
pub fn start(dev_dir: &Path, model: &Path, port: u16) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_salus"))
        .args(["serve", "--dev", "--dev-dir"])
        .arg(dev_dir)
        .args(["--listen", &format!("127.0.0.1:{port}"), "--model"])
        .arg(model)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting salus");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(k) = line.trim().strip_prefix("export SALUS_API_KEY=") {
                let _ = tx.send(k.to_string());
            }
        }
    });
    let key = match rx.recv_timeout(Duration::from_secs(90)) {
        Ok(k) => k,
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("salus serve --dev did not come up within 90 s");
        }
    };
    Server { child, key, base: format!("https://127.0.0.1:{port}") }
}
