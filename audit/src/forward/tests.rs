//! The forwarder: message format, cursor, trail following, and delivery to a
//! TLS collector that dies mid-stream.

use std::io::Read as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

use super::follow::Follower;
use super::*;
use crate::{AuditEvent, AuditLogSettings, AuditPrincipal, AuditRecord, EventKind, InferenceParams};
use salus_sensitive::secret::{write_new_key_file, KeySource};
use salus_sensitive::Phi;

const SECRET: &str = "patient Jane Roe, MRN 99812, HIV positive";

fn record(v: serde_json::Value) -> AuditRecord {
    let mut base = json!({
        "v": 1, "seq": 7, "time": "2025-01-02T03:04:05.123456789Z",
        "event_id": "0b9e1c5e-7a51-4a8e-9d3f-5b1f2a6c7d8e", "prev_hash": "00", "kind": "inference.completed",
        "instance": "test-host", "action": "E", "outcome": "success",
    });
    if let (Some(b), serde_json::Value::Object(extra)) = (base.as_object_mut(), v) {
        b.extend(extra);
    }
    serde_json::from_value(base).unwrap()
}

#[test]
fn message_is_rfc5424_with_the_records_fields_as_structured_data() {
    let r = record(json!({
        "request_id": "req_1", "source_addr": "10.0.0.7:4711", "operation": "chat.completions",
        "principal": { "id": "alice", "kind": "api_key", "roles": ["clinician", "metrics"] },
        "model": { "id": "smollm2-135m", "weights_fingerprint": "sha256:0123abcd" },
        "tokens": { "prompt": 12, "completion": 34 }, "latency_us": 5678, "outcome_reason": "stop",
    }));
    let m = format_message(&r, &MessageHeader::default());
    // PRI 110 = facility 13 (log audit) * 8 + severity 6; TIMESTAMP at microseconds.
    let head = "<110>1 2025-01-02T03:04:05.123456Z test-host salus - inference.completed [salus@32473 seq=\"7\" ";
    assert!(m.starts_with(head), "{m}");
    for p in [
        "kind=\"inference.completed\"",
        "time=\"2025-01-02T03:04:05.123456789Z\"",
        "event_id=\"0b9e1c5e-7a51-4a8e-9d3f-5b1f2a6c7d8e\"",
        "action=\"E\"",
        "outcome=\"success\"",
        "outcome_code=\"0\"",
        "outcome_reason=\"stop\"",
        "principal_id=\"alice\"",
        "principal_kind=\"api_key\"",
        "principal_roles=\"clinician,metrics\"",
        "source_addr=\"10.0.0.7:4711\"",
        "operation=\"chat.completions\"",
        "model_id=\"smollm2-135m\"",
        "model_fingerprint=\"sha256:0123abcd\"",
        "prompt_tokens=\"12\"",
        "completion_tokens=\"34\"",
        "latency_us=\"5678\"",
        "request_id=\"req_1\"",
    ] {
        assert!(m.contains(&format!(" {p}")), "{p} missing in {m}");
    }
    assert!(m.ends_with("] inference.completed seq=7 outcome=success"), "{m}");
    // Severity follows the outcome; the HOSTNAME can be fixed.
    let failed = record(json!({ "kind": "inference.failed", "outcome": "failure" }));
    let header = MessageHeader { app_name: "salus-prod".into(), hostname: Some("gw 1".into()) };
    let m = format_message(&failed, &header);
    assert!(
        m.starts_with("<108>1 2025-01-02T03:04:05.123456Z gw_1 salus-prod - inference.failed [salus@32473 "),
        "{m}"
    );
}

#[test]
fn sd_param_values_are_escaped() {
    let mut out = String::new();
    syslog::escape_param_value(&mut out, "a\"b\\c]d[e=f\ng\u{7f}h é");
    assert_eq!(out, "a\\\"b\\\\c\\]d[e=f?g?h é");
    let r = record(json!({ "principal": { "id": "x\"] evil=\"1", "kind": "oidc", "roles": [] } }));
    let m = format_message(&r, &MessageHeader::default());
    assert!(m.contains(" principal_id=\"x\\\"\\] evil=\\\"1\""), "{m}");
    // Header fields: printable ASCII only, NILVALUE when empty.
    assert_eq!(syslog::header_field("", 48), "-");
    assert_eq!(syslog::header_field("a b\u{e9}c", 48), "a_b_c");
    assert_eq!(syslog::header_field(&"x".repeat(300), 255).len(), 255);
}

#[test]
fn frames_are_octet_counted() {
    let mut out = Vec::new();
    frame_into(&mut out, "abc é");
    frame_into(&mut out, "<110>1 -");
    assert_eq!(out, "6 abc é8 <110>1 -".as_bytes());
}

#[test]
fn no_text_hmac_display_name_or_free_detail_is_forwarded() {
    let hmac = "9f".repeat(32);
    let r = record(json!({
        "kind": "access.break_glass",
        "principal": { "id": "dr-who", "kind": "oidc", "roles": ["oncall"], "display_name": SECRET },
        "prompt_hmac": hmac, "completion_hmac": "ab".repeat(32),
        "params": { "temperature": 0.5, "tools_offered": [SECRET], "constraint_hmac": "cd".repeat(32) },
        "detail": { "reason": SECRET, "rule": SECRET, "nested": { "x": SECRET }, "break_glass": true,
                    "count": 3, "window_secs": 600, "list": [SECRET] },
    }));
    let m = format_message(&r, &MessageHeader::default());
    for banned in [SECRET, "MRN", &hmac, &"ab".repeat(32), &"cd".repeat(32), "display", "reason=", "temperature"] {
        assert!(!m.contains(banned), "{banned:?} forwarded: {m}");
    }
    assert!(m.contains(" break_glass=\"true\" count=\"3\" window_secs=\"600\"]"), "{m}");
    assert!(m.contains(" principal_id=\"dr-who\""), "{m}");
    // A string where an allowed number is expected is dropped, not quoted.
    let r = record(json!({ "detail": { "count": SECRET } }));
    assert!(!format_message(&r, &MessageHeader::default()).contains(SECRET));
}

#[test]
fn cursor_is_replaced_atomically() {
    let tmp = tempfile::tempdir().unwrap();
    let c = Cursor::new(tmp.path().join("forward.cursor"));
    assert_eq!(c.load().unwrap(), 0, "no file: nothing forwarded yet");
    c.store(42).unwrap();
    assert_eq!(c.load().unwrap(), 42);
    c.store(u64::MAX).unwrap();
    assert_eq!(c.load().unwrap(), u64::MAX);
    assert_eq!(std::fs::read_to_string(c.path()).unwrap(), format!("{}\n", u64::MAX));
    // A temporary file left by a crash before the rename changes nothing.
    std::fs::write(tmp.path().join("forward.cursor.tmp"), "7").unwrap();
    assert_eq!(c.load().unwrap(), u64::MAX);
    c.store(43).unwrap();
    assert!(!tmp.path().join("forward.cursor.tmp").exists(), "the temporary file is renamed over the cursor");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(c.path()).unwrap().permissions().mode() & 0o777, 0o600);
    std::fs::write(c.path(), "43 garbage").unwrap();
    assert!(matches!(c.load(), Err(ForwardError::CursorInvalid { .. })));
}

#[test]
fn targets_parse() {
    assert_eq!(parse_target("siem.hospital.example:6514").unwrap(), ("siem.hospital.example".into(), 6514));
    assert_eq!(parse_target("127.0.0.1:514").unwrap(), ("127.0.0.1".into(), 514));
    assert_eq!(parse_target("[2001:db8::1]:6514").unwrap(), ("2001:db8::1".into(), 6514));
    for bad in ["siem", "siem:", "siem:0", "siem:70000", ":6514", "2001:db8::1:6514", "[nope]:1", "a b:1", "x/y:1"] {
        assert!(parse_target(bad).is_err(), "{bad} accepted");
    }
    let s = ForwardSettings::new("[::1]:6514", "/tmp/c").unwrap();
    assert_eq!(s.target(), "[::1]:6514");
}

// ---- the trail -------------------------------------------------------------

struct Trail {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    dir: PathBuf,
    source: KeySource,
}

impl Trail {
    fn new() -> Trail {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        write_new_key_file(&root.join("audit.key")).unwrap();
        let source = KeySource::File(root.join("audit.key"));
        Trail { dir: root.join("audit"), root, source, _tmp: tmp }
    }

    /// Small segments: the writer seals every few records, so following the
    /// trail crosses sealed segments, rotation and sealing in flight.
    fn open(&self) -> AuditLog {
        let mut c = AuditLogSettings::new(&self.dir, self.source.clone());
        c.segment_max_bytes = 4096;
        c.instance = "test-host".into();
        AuditLog::open(c).unwrap()
    }
}

fn event(log: &AuditLog, i: u32) -> AuditEvent {
    let prompt = Phi::new(format!("{SECRET} #{i}"));
    AuditEvent::new(EventKind::AccessBreakGlass)
        .request_id(format!("req-{i}"))
        .principal(
            AuditPrincipal::new(format!("user-{}", i % 3), "oidc", ["clinician"])
                .with_display_name(Some(SECRET.into())),
        )
        .source_addr("10.0.0.7:4711".parse().unwrap())
        .operation("chat.completions")
        .model("smollm2-135m", "sha256:0123abcd")
        .params(InferenceParams { tools_offered: Some(vec![SECRET.into()]), ..Default::default() })
        .prompt_hmac(log.hmac(&prompt))
        .detail(json!({ "reason": SECRET, "break_glass": true }))
}

fn follower(log: &AuditLog, from: u64) -> Follower {
    Follower::new(log.dir(), log.forward_parts().1, from)
}

#[test]
fn follower_reads_every_durable_record_in_order_across_segments() {
    let t = Trail::new();
    let log = t.open();
    for i in 0..120 {
        log.record_blocking(event(&log, i)).unwrap();
    }
    let durable = log.durable_seq();
    assert!(durable >= 121, "server.started + 120 records: {durable}");
    let sealed = std::fs::read_dir(&t.dir)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "sealed"))
        .count();
    assert!(sealed >= 3, "the test needs sealed segments ({sealed})");
    let mut f = follower(&log, 1);
    let mut seqs = Vec::new();
    loop {
        let batch = f.read(durable, 9).unwrap();
        assert!(batch.len() <= 9);
        if batch.is_empty() {
            break;
        }
        seqs.extend(batch.iter().map(|r| r.seq));
    }
    assert_eq!(seqs, (1..=durable).collect::<Vec<_>>());
    // Never past the durable seq given; from the middle; and back.
    let mut f = follower(&log, 50);
    assert_eq!(f.read(52, 100).unwrap().iter().map(|r| r.seq).collect::<Vec<_>>(), [50, 51, 52]);
    assert!(f.read(52, 100).unwrap().is_empty());
    f.seek(3);
    assert_eq!(f.read(durable, 2).unwrap().iter().map(|r| r.seq).collect::<Vec<_>>(), [3, 4]);
    log.close().unwrap();
}

#[test]
fn follower_keeps_up_with_a_writer_that_rotates_and_seals() {
    let t = Trail::new();
    let log = t.open();
    let writer = {
        let log = log.clone();
        std::thread::spawn(move || {
            for i in 0..300 {
                log.record_blocking(event(&log, i)).unwrap();
            }
        })
    };
    let mut f = follower(&log, 1);
    let (mut next, deadline) = (1, Instant::now() + Duration::from_secs(60));
    while !(writer.is_finished() && next > log.durable_seq()) {
        assert!(Instant::now() < deadline, "stuck at seq {next}");
        for r in f.read(log.durable_seq(), 16).unwrap() {
            assert_eq!(r.seq, next);
            next += 1;
        }
    }
    writer.join().unwrap();
    assert_eq!(next, log.durable_seq() + 1);
    log.close().unwrap();
}

#[test]
fn follower_detects_a_broken_chain() {
    let t = Trail::new();
    let log = t.open();
    for i in 0..3 {
        log.record_blocking(event(&log, i)).unwrap();
    }
    let durable = log.durable_seq();
    let mut f = follower(&log, 1);
    f.read(durable, 2).unwrap();
    // A forged previous hash, as if a record had been replaced.
    f.prev_hash_for_test([7; 32]);
    let e = f.read(durable, 2).unwrap_err().to_string();
    assert!(e.contains("prev_hash"), "{e}");
    log.close().unwrap();
}

// ---- a TLS collector -------------------------------------------------------

struct Tls {
    server: Arc<rustls::ServerConfig>,
    ca_file: PathBuf,
}

fn tls(dir: &Path) -> Tls {
    let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
    let ca_file = dir.join("collector.pem");
    std::fs::write(&ca_file, ck.cert.pem()).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::try_from(ck.signing_key.serialize_der()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![ck.cert.der().clone()], key)
        .unwrap();
    Tls { server: Arc::new(server), ca_file }
}

/// What a collector received: the bytes of each connection, in order.
type Received = Arc<Mutex<Vec<Vec<u8>>>>;

/// A syslog-over-TLS receiver on loopback. `kill` drops its sockets without
/// a goodbye. With `dies_after`, it crashes on its own once it has taken that
/// many bytes: it keeps exactly those (a message cut there is lost with it, as
/// a collector's queue is lost when it dies), drops its sockets with whatever
/// else arrived unread, and stops listening.
struct Collector {
    port: u16,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Collector {
    fn start(port: u16, tls: &Tls, received: &Received, dies_after: Option<usize>) -> Collector {
        let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let budget = dies_after.map(|n| Arc::new(AtomicUsize::new(n)));
        let (cfg, rx, stop2) = (tls.server.clone(), received.clone(), stop.clone());
        let accept = std::thread::spawn(move || {
            let mut conns = Vec::new();
            while !stop2.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((sock, _)) => {
                        let (cfg, rx, stop, budget) = (cfg.clone(), rx.clone(), stop2.clone(), budget.clone());
                        conns.push(std::thread::spawn(move || serve(sock, cfg, rx, stop, budget)));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
            conns.into_iter().for_each(|c| c.join().unwrap());
        });
        Collector { port, stop, threads: vec![accept] }
    }

    fn is_dead(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    fn kill(self) {
        self.stop.store(true, Ordering::SeqCst);
        self.threads.into_iter().for_each(|t| t.join().unwrap());
    }
}

fn serve(
    sock: std::net::TcpStream,
    cfg: Arc<rustls::ServerConfig>,
    rx: Received,
    stop: Arc<AtomicBool>,
    budget: Option<Arc<AtomicUsize>>,
) {
    sock.set_nonblocking(false).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
    let slot = {
        let mut r = rx.lock().unwrap();
        r.push(Vec::new());
        r.len() - 1
    };
    let conn = rustls::ServerConnection::new(cfg).unwrap();
    let mut s = rustls::StreamOwned::new(conn, sock);
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::SeqCst) {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(mut n) => {
                if let Some(b) = &budget {
                    let left = b.load(Ordering::SeqCst);
                    if n >= left {
                        // The crash: keep what was taken, drop the rest unread.
                        n = left;
                        stop.store(true, Ordering::SeqCst);
                    }
                    b.store(left - n, Ordering::SeqCst);
                }
                rx.lock().unwrap()[slot].extend_from_slice(&buf[..n]);
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
    }
}

/// The seqs of the octet-counted messages of each connection, in arrival
/// order; a message cut off at the end of a connection did not arrive.
fn seqs_of(conns: &[Vec<u8>]) -> Vec<u64> {
    let mut out = Vec::new();
    for bytes in conns {
        let mut rest = &bytes[..];
        while let Some(sp) = rest.iter().position(|b| *b == b' ') {
            let len: usize = std::str::from_utf8(&rest[..sp]).unwrap().parse().expect("MSG-LEN");
            let Some(msg) = rest.get(sp + 1..sp + 1 + len) else { break };
            let msg = std::str::from_utf8(msg).unwrap();
            assert!(msg.starts_with('<'), "{msg}");
            let seq = msg.split_once("seq=\"").unwrap().1.split_once('"').unwrap().0;
            out.push(seq.parse().unwrap());
            rest = &rest[sp + 1 + len..];
        }
    }
    out
}

/// Every seq of `1..=last` is there in order; a seq seen again only as part
/// of one contiguous re-send of at most `batch` records. Returns the duplicates.
fn check_delivery(seqs: &[u64], first: u64, last: u64, batch: usize) -> usize {
    let (mut expect, mut dups, mut i) = (first, 0, 0);
    while i < seqs.len() {
        let s = seqs[i];
        if s == expect {
            expect += 1;
            i += 1;
            continue;
        }
        assert!(s < expect, "seq {s} arrived before {expect}: a gap (arrivals {seqs:?})");
        // A re-send: s, s+1, … up to expect-1, at most one batch.
        let n = (expect - s) as usize;
        assert!(n <= batch, "re-sent {n} records, more than one batch of {batch}");
        assert_eq!(&seqs[i..i + n], &(s..expect).collect::<Vec<_>>()[..], "re-send not contiguous");
        dups += n;
        i += n;
    }
    assert_eq!(expect, last + 1, "records after {} missing", expect - 1);
    dups
}

fn wait_for(what: &str, secs: u64, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn every_record_arrives_once_in_order_across_a_collector_restart_and_a_forwarder_restart() {
    let t = Trail::new();
    let tls = tls(&t.root);
    let received: Received = Arc::default();
    // The first collector crashes mid-stream, within its 30th message or so.
    let c1 = Collector::start(0, &tls, &received, Some(16_000));
    let port = c1.port;
    let log = t.open();
    let settings = || {
        let mut s = ForwardSettings::new(&format!("127.0.0.1:{port}"), t.dir.join("forward.cursor")).unwrap();
        s.ca_file = Some(tls.ca_file.clone());
        s.batch_records = 7;
        s.poll_interval = Duration::from_millis(20);
        s.reconnect_max_backoff = Duration::from_millis(200);
        s.lag_warning_records = 5;
        s
    };
    let fwd = Forwarder::start(&log, settings()).unwrap();
    let mon = fwd.monitor();
    for i in 0..80 {
        log.record_blocking(event(&log, i)).unwrap();
    }
    wait_for("the collector to crash", 30, || c1.is_dead());
    c1.kill();
    assert!(mon.status().forwarded_seq < log.durable_seq(), "the crash came too late to be mid-stream");
    for i in 80..120 {
        log.record_blocking(event(&log, i)).unwrap();
    }
    std::thread::sleep(Duration::from_millis(400));
    let down = mon.status();
    assert!(down.lagging && down.lag_records > 5, "{down:?}");
    assert!(down.connection_failures >= 1 && !down.connected, "{down:?}");
    let c2 = Collector::start(port, &tls, &received, None);
    wait_for("the backlog after the restart", 30, || mon.status().lag_records == 0);
    log.close().unwrap();
    let stopped = fwd.stop();
    let last = log.durable_seq();
    assert_eq!((stopped.forwarded_seq, stopped.lag_records), (last, 0), "server.stopped forwarded too");
    assert_eq!(Cursor::new(t.dir.join("forward.cursor")).load().unwrap(), last);
    // The forwarder closes its session cleanly: the collector sees the end.
    std::thread::sleep(Duration::from_millis(100));
    c2.kill();

    let conns = received.lock().unwrap().clone();
    let text = String::from_utf8_lossy(&conns.concat()).into_owned();
    assert!(!text.contains("Jane Roe") && !text.contains("MRN"), "text reached the collector");
    let seqs = seqs_of(&conns);
    let dups = check_delivery(&seqs, 1, last, 7);
    eprintln!("forwarded {last} records, {} messages, {dups} re-sent", seqs.len());

    // A forwarder started again resumes after the cursor: nothing is re-sent.
    received.lock().unwrap().clear();
    let c3 = Collector::start(port, &tls, &received, None);
    let log = t.open();
    let fwd = Forwarder::start(&log, settings()).unwrap();
    log.record_blocking(event(&log, 999)).unwrap();
    let now = log.durable_seq();
    let mon = fwd.monitor();
    wait_for("the records of the new session", 30, || mon.status().forwarded_seq == now);
    drop(fwd);
    std::thread::sleep(Duration::from_millis(100));
    c3.kill();
    let seqs = seqs_of(&received.lock().unwrap());
    assert!(!seqs.is_empty());
    assert_eq!(seqs, (last + 1..=now).collect::<Vec<_>>());
    log.close().unwrap();
}

#[test]
fn an_unreachable_collector_never_blocks_recording() {
    let t = Trail::new();
    let tls = tls(&t.root);
    // A port nobody listens on.
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let log = t.open();
    let mut s = ForwardSettings::new(&format!("127.0.0.1:{port}"), t.dir.join("forward.cursor")).unwrap();
    s.ca_file = Some(tls.ca_file.clone());
    s.lag_warning_records = 100;
    s.shutdown_flush = Duration::from_millis(300);
    let fwd = Forwarder::start(&log, s).unwrap();
    let t0 = Instant::now();
    for i in 0..300 {
        log.record_blocking(event(&log, i)).unwrap();
    }
    assert!(t0.elapsed() < Duration::from_secs(20));
    let st = fwd.monitor().status();
    assert!(st.lagging && st.lag_records >= 300 && st.forwarded_seq == 0, "{st:?}");
    log.close().unwrap();
    let t0 = Instant::now();
    let st = fwd.stop();
    assert!(t0.elapsed() < Duration::from_secs(3), "stop is bounded: {:?}", t0.elapsed());
    assert!(st.connection_failures >= 1);
    assert!(!t.dir.join("forward.cursor").exists(), "nothing accepted, no cursor");
}

#[test]
fn start_refuses_bad_settings() {
    let t = Trail::new();
    let log = t.open();
    let base = || ForwardSettings::new("127.0.0.1:6514", t.dir.join("forward.cursor")).unwrap();
    let mut s = base();
    s.ca_file = Some(t.root.join("missing.pem"));
    let e = Forwarder::start(&log, s).err().unwrap().to_string();
    assert!(e.contains("ca_file") && e.contains("missing.pem"), "{e}");
    let mut s = base();
    s.client_cert = Some(t.root.join("c.pem"));
    assert!(matches!(Forwarder::start(&log, s), Err(ForwardError::Config(_))));
    let mut s = base();
    s.batch_records = 0;
    assert!(matches!(Forwarder::start(&log, s), Err(ForwardError::Config(_))));
    // A cursor past the end of the trail belongs to another trail.
    Cursor::new(t.dir.join("forward.cursor")).store(1_000_000).unwrap();
    let tls = tls(&t.root);
    let mut s = base();
    s.ca_file = Some(tls.ca_file);
    assert!(matches!(Forwarder::start(&log, s), Err(ForwardError::CursorAhead { cursor: 1_000_000, .. })));
    log.close().unwrap();
}
