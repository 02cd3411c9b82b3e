//! `salus-bench` against a scripted OpenAI-style SSE server on loopback: every
//! level completes, tokens are counted from `usage`, latencies are reported, and
//! failing requests are counted as errors. Writes JSON and SVG.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Answers requests: the `fail_every`-th gets a 500, the others stream 5 chunks.
fn serve(conn: TcpStream, hits: &AtomicUsize, fail_every: usize) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    loop {
        let mut len = 0usize;
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let list_models = line.starts_with("GET /v1/models ");
        assert!(list_models || line.starts_with("POST /v1/chat/completions "), "unexpected request line");
        loop {
            line.clear();
            reader.read_line(&mut line).unwrap();
            if line == "\r\n" {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap();
            }
        }
        if list_models {
            let list =
                r#"{"object":"list","data":[{"id":"scripted","object":"model"},{"id":"other","object":"model"}]}"#;
            let mut w = conn.try_clone().unwrap();
            write!(
                w,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{list}",
                list.len()
            )
            .unwrap();
            continue;
        }
        let mut body = vec![0; len];
        reader.read_exact(&mut body).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["stream"], true);
        assert_eq!(v["max_tokens"], 7);
        assert_eq!(v["model"], "scripted");
        let n = hits.fetch_add(1, Ordering::SeqCst) + 1;
        let mut w = conn.try_clone().unwrap();
        if fail_every > 0 && n % fail_every == 0 {
            let msg = r#"{"error":{"message":"boom"}}"#;
            write!(w, "HTTP/1.1 500 Internal Server Error\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{msg}", msg.len()).unwrap();
            continue;
        }
        let mut sse = String::new();
        for i in 0..5 {
            sse.push_str(&format!("data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"t{i}\"}}}}]}}\n\n"));
        }
        sse.push_str(
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":7,\"total_tokens\":10}}\n\n",
        );
        sse.push_str("data: [DONE]\n\n");
        write!(w, "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: {}\r\n\r\n{sse}", sse.len())
            .unwrap();
    }
}

/// Starts [`serve`] on a loopback port; returns its address and the count of
/// chat requests it answered or failed.
fn scripted_server(fail_every: usize) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let h = h.clone();
            std::thread::spawn(move || serve(conn.unwrap(), &h, fail_every));
        }
    });
    (addr, hits)
}

#[test]
fn salus_bench_reports_every_level_against_a_loopback_server() {
    let (addr, hits) = scripted_server(4);
    let dir = tempfile::tempdir().unwrap();
    let (json, svg) = (dir.path().join("r.json"), dir.path().join("r.svg"));
    let out = Command::new(env!("CARGO_BIN_EXE_salus-bench"))
        .args([
            "--base-url",
            &format!("http://{addr}/v1"),
            "--model",
            "scripted",
            "--concurrency",
            "1,2",
            "--requests",
            "4",
            "--max-tokens",
            "7",
            "--quiet",
        ])
        .arg("--out-json")
        .arg(&json)
        .arg("--out-svg")
        .arg(&svg)
        .env("SALUS_API_KEY", "test-key")
        .output()
        .unwrap();
    assert!(out.status.success(), "salus-bench failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(!String::from_utf8_lossy(&out.stdout).contains("test-key"));
    assert_eq!(hits.load(Ordering::SeqCst), 8);
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let levels = report["levels"].as_array().unwrap();
    assert_eq!(levels.len(), 2);
    for (l, c) in levels.iter().zip([1, 2]) {
        assert_eq!(l["concurrency"], c);
        assert_eq!(l["requests"], 4);
        assert_eq!(l["errors"], 1, "every 4th request fails");
        assert_eq!(l["output_tokens"], 21, "usage.completion_tokens of the 3 successes");
        assert!(l["output_tok_per_s"].as_f64().unwrap() > 0.0);
        assert!(l["ttft_ms"]["p99"].as_f64().unwrap() >= l["ttft_ms"]["p50"].as_f64().unwrap());
        assert!(l["itl_ms"]["p50"].is_number());
    }
    let svg = std::fs::read_to_string(&svg).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("<polyline") && svg.contains("Time to first token"));
}

#[test]
fn salus_bench_rejects_bad_arguments() {
    let out = Command::new(env!("CARGO_BIN_EXE_salus-bench")).args(["--concurrency", "0", "--quiet"]).output().unwrap();
    assert!(!out.status.success());
    let out = Command::new(env!("CARGO_BIN_EXE_salus-bench"))
        .args(["--prompts", "/nonexistent/prompts.txt", "--quiet"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("prompt file"));
}

/// Without `--model`, the model id is the first one `GET /v1/models` lists
/// (the scripted server asserts it receives `scripted`).
#[test]
fn salus_bench_uses_the_first_listed_model() {
    let (addr, hits) = scripted_server(0);
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_salus-bench"))
        .args([
            "--base-url",
            &format!("http://{addr}/v1"),
            "--concurrency",
            "1",
            "--requests",
            "2",
            "--max-tokens",
            "7",
        ])
        .args(["--quiet", "--out-json"])
        .arg(dir.path().join("r.json"))
        .arg("--out-svg")
        .arg(dir.path().join("r.svg"))
        .output()
        .unwrap();
    assert!(out.status.success(), "salus-bench failed: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(hits.load(Ordering::SeqCst), 2);
}
