//! The connection loop against real sockets on loopback (plain HTTP).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

use axum::routing::get;

use super::*;

fn settings() -> ConnectionSettings {
    ConnectionSettings {
        handshake_timeout: Duration::from_secs(5),
        header_read_timeout: Duration::from_secs(1),
        idle_timeout: Duration::from_secs(1),
        http2_keepalive_interval: Duration::from_secs(30),
        http2_keepalive_timeout: Duration::from_secs(20),
        max_connections: 64,
        max_connections_per_source: 2,
        drain_timeout: Duration::from_secs(2),
    }
}

/// Starts the loop on a runtime thread; returns its address and a stopper.
fn start(settings: ConnectionSettings) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async move {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            addr_tx.send(listener.local_addr().unwrap()).unwrap();
            let app = Router::new().route("/health", get(|| async { "ok" }));
            serve(listener, app, None, settings, async {
                let _ = stop_rx.await;
            })
            .await;
        });
    });
    (addr_rx.recv().unwrap(), stop_tx)
}

/// Seconds until the server closes `s` (reads until EOF or reset), at most `limit`.
fn seconds_until_closed(s: &mut TcpStream, limit: Duration) -> Option<f64> {
    let t = Instant::now();
    s.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Some(t.elapsed().as_secs_f64()),
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Some(t.elapsed().as_secs_f64()),
            Err(_) => return None,
        }
    }
}

fn get_health(s: &mut TcpStream) -> String {
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 1024];
    let n = s.read(&mut buf).unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// Connects from `source` (any 127.0.0.0/8 address) to `addr`.
fn connect_from(source: &str, addr: SocketAddr) -> TcpStream {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let s = rt.block_on(async {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
        socket.connect(addr).await.unwrap().into_std().unwrap()
    });
    s.set_nonblocking(false).unwrap();
    s
}

#[test]
fn an_idle_connection_is_closed_within_the_idle_timeout() {
    let (addr, _stop) = start(settings());
    // Connected, never sends a byte.
    let mut silent = TcpStream::connect(addr).unwrap();
    let t = seconds_until_closed(&mut silent, Duration::from_secs(10)).expect("an idle connection stays open");
    assert!(t < 3.0, "closed after {t:.1} s");
    // A keep-alive connection after one request is closed too.
    let mut kept = TcpStream::connect(addr).unwrap();
    assert!(get_health(&mut kept).starts_with("HTTP/1.1 200"));
    let t = seconds_until_closed(&mut kept, Duration::from_secs(10)).expect("an idle keep-alive connection stays open");
    assert!(t < 3.0, "closed after {t:.1} s");
    // Half a request (slowloris) is cut off by the header-read timeout.
    let mut slow = TcpStream::connect(addr).unwrap();
    slow.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n").unwrap();
    let t = seconds_until_closed(&mut slow, Duration::from_secs(10)).expect("a slow header stays open");
    assert!(t < 3.0, "closed after {t:.1} s");
}

#[test]
fn per_source_cap_leaves_room_for_other_sources() {
    let (addr, _stop) = start(ConnectionSettings { idle_timeout: Duration::from_secs(30), ..settings() });
    let mut held: Vec<TcpStream> = (0..2).map(|_| connect_from("127.0.0.1", addr)).collect();
    // Both held connections are served.
    for s in &mut held {
        assert!(get_health(s).starts_with("HTTP/1.1 200"));
    }
    // A third from the same source is closed at once.
    let mut over = connect_from("127.0.0.1", addr);
    let t = seconds_until_closed(&mut over, Duration::from_secs(5)).expect("the connection over the cap was served");
    assert!(t < 1.0);
    // Another source is still served.
    let mut other = connect_from("127.0.0.2", addr);
    assert!(get_health(&mut other).starts_with("HTTP/1.1 200"));
    // Closing one frees its place.
    drop(held.pop());
    std::thread::sleep(Duration::from_millis(200));
    let mut again = connect_from("127.0.0.1", addr);
    assert!(get_health(&mut again).starts_with("HTTP/1.1 200"));
}

#[test]
fn caps_count_and_release_connections() {
    let caps = ConnectionCaps::new(3, 2);
    let a: IpAddr = "10.0.0.1".parse().unwrap();
    let b: IpAddr = "10.0.0.2".parse().unwrap();
    let s1 = caps.admit(a).unwrap();
    let _s2 = caps.admit(a).unwrap();
    assert!(caps.admit(a).is_none(), "per-source cap");
    let _s3 = caps.admit(b).unwrap();
    assert!(caps.admit(b).is_none(), "global cap");
    drop(s1);
    assert_eq!(caps.open(), 2);
    assert!(caps.admit(b).is_some());
}

#[test]
fn accept_errors_are_logged_at_most_once_per_interval() {
    let mut log = AcceptErrorLog { last: None, suppressed: 0 };
    let e = std::io::Error::other("Too many open files");
    for _ in 0..100 {
        log.failed(&e);
    }
    assert_eq!(log.suppressed, 99);
    assert!(log.last.is_some());
}

#[test]
fn the_soft_descriptor_limit_is_raised_to_the_hard_limit() {
    use rustix::process::{getrlimit, Resource};
    let n = raise_fd_limit().unwrap();
    let l = getrlimit(Resource::Nofile);
    assert_eq!(l.current, Some(n));
    if let Some(max) = l.maximum {
        assert_eq!(n, max);
    }
}

/// Regression (#27): a request hyper cannot parse got hyper's own empty 400
/// (or 431); every error must have the OpenAI shape.
#[test]
fn requests_hyper_cannot_parse_get_openai_errors() {
    let (addr, _stop) = start(settings());
    let answer = |request: &[u8]| {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(request).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    };
    let huge_header = format!("GET /health HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(512 << 10));
    for (request, status, code) in [
        (
            &b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999999\r\n\r\n"[..],
            400,
            "malformed_request",
        ),
        (b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: 1, 2\r\n\r\n", 400, "malformed_request"),
        (b"GARBAGE\r\n\r\n", 400, "malformed_request"),
        (huge_header.as_bytes(), 431, "headers_too_large"),
    ] {
        let text = answer(request);
        assert!(text.starts_with(&format!("HTTP/1.1 {status} ")), "{text}");
        let body: serde_json::Value = serde_json::from_str(text.split("\r\n\r\n").nth(1).unwrap_or_default())
            .unwrap_or_else(|_| panic!("not JSON: {text}"));
        assert_eq!(body["error"]["code"], code, "{text}");
        assert_eq!(body["error"]["type"], "invalid_request_error");
    }
    // Well-formed requests are untouched.
    let mut s = TcpStream::connect(addr).unwrap();
    assert!(get_health(&mut s).contains("200 OK"));
}
