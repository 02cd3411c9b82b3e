//! Audit trail throughput and added latency with group commit.
//!
//! `cargo bench --bench audit` (env: `SALUS_BENCH_SECS` per scenario, default 3;
//! `SALUS_BENCH_DIR` to put the trail on a specific disk, default the cargo
//! target dir). For each number of concurrent recorders (tokio tasks, each
//! awaiting `AuditLog::record` in a loop, i.e. every record durable before the
//! next) it prints sustained events/s and the latency of one `record` call
//! (p50/p99/p99.9): the latency added to an inference before the model may run.
//! Targets: ≥ 50,000 events/s, < 1 ms p99.
//!
//! No commit can be faster than one device flush, so next to each row it prints
//! the disk's own floor, measured right before and right after the row on the
//! same disk: a
//! 4 KiB append + `fdatasync` (what one group commit does), p50/p99, and the
//! ratio of our p99 to the floor's p99. It also prints the CPU time the audit
//! threads spent per event (writer: JSON + SHA-256 chain + AES-GCM; commit:
//! the write + sync syscalls), read from `/proc/self/task/*/schedstat`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use salus_audit::{AuditEvent, AuditLog, AuditLogSettings, AuditPrincipal, EventKind, InferenceParams};
use salus_models::Phi;
use salus_sensitive::secret::{write_new_key_file, KeySource};

fn event(log: &AuditLog, i: u64) -> AuditEvent {
    let prompt = Phi::new(format!("synthetic prompt number {i} with some length to it, as a chat turn would have"));
    AuditEvent::new(EventKind::InferenceStarted)
        .request_id(format!("req-{i:016x}"))
        .principal(AuditPrincipal::new("svc-ehr-integration", "api_key", ["clinician", "service"]))
        .source_addr("10.20.30.40:51234".parse().unwrap())
        .operation("chat.completions")
        .model("smollm2-135m-instruct", "sha256:5f1c0a4d9e8b7c6a5f1c0a4d9e8b7c6a5f1c0a4d9e8b7c6a5f1c0a4d9e8b7c6a")
        .params(InferenceParams {
            temperature: Some(0.7),
            max_tokens: Some(256),
            stream: Some(true),
            ..Default::default()
        })
        .prompt_hmac(log.hmac(&prompt))
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

/// What the disk itself costs: `n` 4 KiB appends, each followed by `fdatasync`.
fn fsync_floor(dir: &std::path::Path, n: usize) -> Vec<Duration> {
    use std::io::Write;
    let path = dir.join("fsync-floor");
    let mut f = std::fs::File::create(&path).unwrap();
    let mut lat = Vec::new();
    for _ in 0..n {
        let t0 = Instant::now();
        f.write_all(&[7u8; 4096]).unwrap();
        f.sync_data().unwrap();
        lat.push(t0.elapsed());
    }
    std::fs::remove_file(path).unwrap();
    lat
}

/// CPU time (ns) used so far by this process's threads whose name starts with `prefix`.
fn thread_cpu_ns(prefix: &str) -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return 0 };
    tasks
        .filter_map(|t| t.ok())
        .filter(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.starts_with(prefix)))
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()))
        .sum()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    let secs: u64 = std::env::var("SALUS_BENCH_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    let base = std::env::var("SALUS_BENCH_DIR").unwrap_or_else(|_| {
        option_env!("CARGO_TARGET_TMPDIR")
            .map(String::from)
            .unwrap_or_else(|| std::env::temp_dir().display().to_string())
    });
    std::fs::create_dir_all(&base).unwrap();
    let tmp = tempfile::Builder::new().prefix("audit-bench").tempdir_in(&base).unwrap();
    let key_path = tmp.path().join("audit.key");
    write_new_key_file(&key_path).unwrap();
    let mut cfg = AuditLogSettings::new(tmp.path().join("audit"), KeySource::File(key_path));
    cfg.checkpoint_dir = Some(tmp.path().join("worm"));
    let log = AuditLog::open(cfg).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("audit bench: trail in {}, {secs} s per scenario, load average {}", tmp.path().display(), load.trim());
    println!("added = latency of one durable `record` (what an inference waits before the model runs)");
    println!("floor = 4 KiB append + fdatasync on the same disk, measured just before and after the row");
    println!("cpu/event = writer (encode) + commit (syscalls) thread CPU time per event");
    println!(
        "{:>9} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>9} {:>16}",
        "recorders",
        "events/s",
        "added p50",
        "added p99",
        "p99.9",
        "floor p50",
        "floor p99",
        "p99/floor",
        "cpu/event w+c"
    );
    for concurrency in [1usize, 16, 128, 512, 2048] {
        let mut floor = fsync_floor(tmp.path(), 150);
        let (w0, c0) = (thread_cpu_ns("salus-audit-wri"), thread_cpu_ns("salus-audit-com"));
        let deadline = Instant::now() + Duration::from_secs(secs);
        let counter = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let start = Instant::now();
        let mut lat: Vec<Duration> = rt.block_on(async {
            let tasks: Vec<_> = (0..concurrency)
                .map(|_| {
                    let (log, counter) = (log.clone(), counter.clone());
                    tokio::spawn(async move {
                        let mut lat = Vec::with_capacity(1 << 16);
                        while Instant::now() < deadline {
                            let i = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let ev = event(&log, i);
                            let t0 = Instant::now();
                            log.record(ev).await.expect("record");
                            lat.push(t0.elapsed());
                        }
                        lat
                    })
                })
                .collect();
            let mut all = Vec::new();
            for t in tasks {
                all.extend(t.await.unwrap());
            }
            all
        });
        let elapsed = start.elapsed().as_secs_f64();
        let n = lat.len() as f64;
        let (w, c) = (thread_cpu_ns("salus-audit-wri") - w0, thread_cpu_ns("salus-audit-com") - c0);
        floor.extend(fsync_floor(tmp.path(), 150));
        floor.sort();
        let (floor50, floor99) = (pct(&floor, 0.5), pct(&floor, 0.99));
        lat.sort();
        println!(
            "{concurrency:>9} {:>10.0} {:>8.3}ms {:>8.3}ms {:>8.3}ms {:>8.3}ms {:>8.3}ms {:>9.2} {:>6.1}+{:<5.1}µs",
            n / elapsed,
            ms(pct(&lat, 0.5)),
            ms(pct(&lat, 0.99)),
            ms(pct(&lat, 0.999)),
            ms(floor50),
            ms(floor99),
            pct(&lat, 0.99).as_secs_f64() / floor99.as_secs_f64(),
            w as f64 / n / 1e3,
            c as f64 / n / 1e3,
        );
    }
    log.close().unwrap();
    let key = KeySource::File(tmp.path().join("audit.key")).load().unwrap();
    let t0 = Instant::now();
    let rep = salus_audit::verify_trail(&tmp.path().join("audit"), &key, Some(&tmp.path().join("worm"))).unwrap();
    let dt = t0.elapsed().as_secs_f64();
    println!(
        "verify: {} records in {} segments ({} sealed) in {dt:.2} s ({:.0} records/s)",
        rep.records,
        rep.segments,
        rep.sealed_segments,
        rep.records as f64 / dt
    );
}
