//! The OTLP/HTTP exporter against a local receiver: what is posted, what is
//! counted, and that a collector that is down costs the request nothing.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;

use super::*;

/// One POST the receiver got: its path, content type and body.
type Received = Arc<Mutex<Vec<(String, String, Vec<u8>)>>>;

/// A minimal HTTP/1.1 receiver on loopback answering 200 to every POST.
fn receiver() -> (String, Received) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let got: Received = Arc::default();
    let sink = got.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let sink = sink.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut stream = stream;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    let path = line.split_whitespace().nth(1).unwrap_or_default().to_string();
                    let (mut length, mut content_type) = (0usize, String::new());
                    loop {
                        let mut h = String::new();
                        reader.read_line(&mut h).unwrap();
                        let h = h.trim_end();
                        if h.is_empty() {
                            break;
                        }
                        let (name, value) = h.split_once(':').unwrap();
                        match name.to_ascii_lowercase().as_str() {
                            "content-length" => length = value.trim().parse().unwrap(),
                            "content-type" => content_type = value.trim().to_string(),
                            _ => {}
                        }
                    }
                    let mut body = vec![0; length];
                    reader.read_exact(&mut body).unwrap();
                    sink.lock().unwrap().push((path, content_type, body));
                    stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").unwrap();
                }
            });
        }
    });
    (url, got)
}

fn config(endpoint: &str) -> TelemetryConfig {
    TelemetryConfig {
        endpoint: endpoint.into(),
        batch_delay_ms: 50,
        export_timeout_secs: 2,
        shutdown_flush_secs: 5,
        ..TelemetryConfig::default()
    }
}

/// One traced completion request with its phases.
fn one_request(t: &Telemetry) {
    let mut trace = t.begin("POST", "/v1/completions", &HeaderMap::new()).expect("traced");
    let now = Instant::now();
    trace.phase(TracePhase::Queue, now, now);
    trace.phase(TracePhase::Decode { completion_tokens: 3 }, now, Instant::now());
    trace.end(RequestOutcome { request_id: "req_1", status: 200, completion_tokens: 3, ..Default::default() });
}

#[test]
fn spans_are_posted_as_otlp_protobuf_to_v1_traces_and_counted() {
    let (url, got) = receiver();
    let counters = Arc::new(TraceCounters::default());
    let t = Telemetry::start(&config(&url), "m", "replica-0", counters.clone()).unwrap();
    one_request(&t);
    t.shutdown();
    let got = got.lock().unwrap();
    assert!(!got.is_empty(), "nothing was exported");
    let (path, content_type, body) = &got[0];
    assert_eq!(path, "/v1/traces");
    assert_eq!(content_type, "application/x-protobuf");
    // The protobuf holds the span names and the resource as plain strings.
    let has = |needle: &[u8]| body.windows(needle.len()).any(|w| w == needle);
    assert!(has(b"POST /v1/completions") && has(b"decode") && has(b"queue"));
    assert!(has(b"replica-0") && has(b"salus"), "the resource names the service and the replica");
    assert_eq!(counters.exported(), 3);
    assert_eq!(counters.failures(), 0);
}

#[test]
fn a_collector_that_is_down_fails_exports_not_requests() {
    // A port nothing listens on.
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let counters = Arc::new(TraceCounters::default());
    let t = Telemetry::start(&config(&url), "m", "replica-0", counters.clone()).unwrap();
    for _ in 0..100 {
        one_request(&t);
    }
    t.shutdown();
    assert_eq!(counters.exported(), 0);
    assert!(counters.failures() >= 1, "the failed export is counted");
}

#[test]
fn probes_are_skipped_unless_configured_and_disabled_traces_nothing() {
    let (url, _) = receiver();
    let counters = Arc::new(TraceCounters::default());
    let t = Telemetry::start(&config(&url), "m", "r", counters.clone()).unwrap();
    assert!(t.begin("GET", "/health", &HeaderMap::new()).is_none());
    assert!(t.begin("GET", "/v1/models", &HeaderMap::new()).is_some());
    let with_probes = TelemetryConfig { trace_probes: true, ..config(&url) };
    let t = Telemetry::start(&with_probes, "m", "r", counters.clone()).unwrap();
    assert!(t.begin("GET", "/health", &HeaderMap::new()).is_some());
    let off = TelemetryConfig { enabled: false, ..config(&url) };
    assert!(Telemetry::start(&off, "m", "r", counters)
        .unwrap()
        .begin("GET", "/v1/models", &HeaderMap::new())
        .is_none());
    assert!(Telemetry::disabled().begin("GET", "/v1/models", &HeaderMap::new()).is_none());
}
