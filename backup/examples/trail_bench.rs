//! Synthesizes audit trails and measures backup and restore throughput.
//!
//! ```text
//! cargo run --release -p salus-backup --example trail_bench -- synth DIR KEYFILE SIZE_MB [SEGMENT_MB]
//! cargo run --release -p salus-backup --example trail_bench -- measure SIZE_MB [WORKDIR]
//! ```
//!
//! `synth` writes a trail of about SIZE_MB of realistic `inference.*`
//! records (principal, model, parameters, prompt HMAC; ~0.6 KB each) with the
//! audit library itself (group commit, sealing, checkpoints), creating
//! KEYFILE when missing. `measure` synthesizes a trail in WORKDIR (default:
//! the system temp dir), then times a full `create` to a directory, an
//! incremental one after 1 % more records, `verify` of both backups, and
//! `restore` (objects verified on the way) plus `verify_trail` of the
//! restored trail, and prints MB/s for each (MB = 10^6 bytes of trail).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use salus_audit::{AuditEvent, AuditLog, AuditLogSettings, AuditPrincipal, EventKind, InferenceParams};
use salus_backup::{CreateOptions, NoProgress, RestoreOptions, Target, TargetOptions, VerifyOptions};
use salus_sensitive::secret::{write_new_key_file, KeySource, SecretKey};
use salus_sensitive::Phi;

fn event(log: &AuditLog, i: u64) -> AuditEvent {
    let kind = if i & 1 == 0 { EventKind::InferenceStarted } else { EventKind::InferenceCompleted };
    let prompt = Phi::new(format!("synthetic prompt number {i} with some length to it, as a chat turn would have"));
    let mut ev = AuditEvent::new(kind)
        .request_id(format!("req-{:016x}", i / 2))
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
        .prompt_hmac(log.hmac(&prompt));
    if kind == EventKind::InferenceCompleted {
        ev = ev.tokens(412, 256).latency(Duration::from_millis(1834)).completion_hmac(log.hmac(&prompt));
    }
    ev
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir).map(|d| d.filter_map(|e| e.ok()?.metadata().ok()).map(|m| m.len()).sum()).unwrap_or(0)
}

/// The trail's size on disk as it settles: sealed segments, the newest
/// `.log`, and full `.log`s not sealed yet at the ratio sealing has shown
/// (a partial `.sealed.tmp` is not counted).
fn trail_bytes(dir: &Path) -> u64 {
    let (mut sealed, mut sealed_n) = (0u64, 0u64);
    let mut logs: Vec<(u64, u64)> = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let len = e.metadata().map(|m| m.len()).unwrap_or(0);
        match e.file_name().to_str().and_then(salus_audit::parse_segment_name) {
            Some((_, true)) => (sealed, sealed_n) = (sealed + len, sealed_n + 1),
            Some((i, false)) => logs.push((i, len)),
            _ => {}
        }
    }
    logs.sort_unstable();
    let newest = logs.pop().map(|l| l.1).unwrap_or(0);
    let per_sealed = sealed.checked_div(sealed_n).unwrap_or(0);
    sealed + newest + per_sealed * logs.len() as u64
}

/// Appends records to the trail in `dir` until it holds about `size` bytes.
fn synth(dir: &Path, key: &Path, size: u64, segment: u64) -> Duration {
    if !key.exists() {
        write_new_key_file(key).expect("writing the key file");
    }
    let src: KeySource = format!("file:{}", key.display()).parse().unwrap();
    let mut cfg = AuditLogSettings::new(dir, src);
    cfg.segment_max_bytes = segment;
    cfg.checkpoint_every_records = 10_000;
    let log = AuditLog::open(cfg).expect("opening the trail");
    let t0 = Instant::now();
    let threads = 4;
    // Bursts of about a quarter segment, so segments roll near their size.
    let burst = (segment / 4 / threads / 750).clamp(50, 2_500);
    let mut i = 0u64;
    while trail_bytes(dir) < size {
        // A burst queued without waiting, then one durable record per thread:
        // the writer commits them in large groups.
        std::thread::scope(|s| {
            for t in 0..threads {
                let log = log.clone();
                s.spawn(move || {
                    for j in 0..burst {
                        let _ = log.record_nowait(event(&log, i + t * burst + j));
                    }
                    log.record_blocking(event(&log, i)).expect("recording");
                });
            }
        });
        i += threads * burst;
    }
    log.close().expect("closing the trail");
    t0.elapsed()
}

fn mbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("synth") if args.len() >= 4 => {
            let size: u64 = args[3].parse().expect("SIZE_MB");
            let seg: u64 = args.get(4).map(|s| s.parse().expect("SEGMENT_MB")).unwrap_or(64);
            let d = synth(Path::new(&args[1]), Path::new(&args[2]), size << 20, seg << 20);
            println!("wrote {} MB of trail in {:.1} s", dir_bytes(Path::new(&args[1])) / 1_000_000, d.as_secs_f64());
        }
        Some("measure") if args.len() >= 2 => {
            let size: u64 = args[1].parse().expect("SIZE_MB");
            let base = args.get(2).map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
            measure(size << 20, &base);
        }
        _ => {
            eprintln!("usage: trail_bench synth DIR KEYFILE SIZE_MB [SEGMENT_MB] | measure SIZE_MB [WORKDIR]");
            std::process::exit(1);
        }
    }
}

fn measure(size: u64, base: &Path) {
    let work = tempfile::tempdir_in(base).expect("work dir");
    let (trail, key_path) = (work.path().join("audit"), work.path().join("audit.key"));
    let t = synth(&trail, &key_path, size, 64 << 20);
    let trail_bytes = dir_bytes(&trail);
    println!("trail: {:.0} MB in {:.1} s (synthesized)", trail_bytes as f64 / 1e6, t.as_secs_f64());
    let audit_key = KeySource::load(&format!("file:{}", key_path.display()).parse().unwrap()).unwrap();
    let backup_key = SecretKey::generate();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let dest_dir = work.path().join("dest");
    let dest = Arc::new(Target::open(dest_dir.to_str().unwrap(), &TargetOptions::default()).unwrap());
    let opts = CreateOptions {
        audit_dir: trail.clone(),
        audit_key: audit_key.clone(),
        backup_key: backup_key.clone(),
        previous_backup_keys: Vec::new(),
        key_store: None,
        config_file: None,
        instance: "bench".into(),
        concurrency: 4,
        reuse_sealed: false,
    };
    let sync = || {
        let _ = std::process::Command::new("sync").status();
    };
    sync();
    let full = rt.block_on(salus_backup::create(dest.clone(), opts.clone(), Arc::new(NoProgress))).unwrap();
    println!(
        "create (full):        {:>7.1} s  {:>6.0} MB/s  ({} objects, {:.0} MB uploaded)",
        full.elapsed.as_secs_f64(),
        mbps(full.read_bytes, full.elapsed),
        full.uploaded_objects,
        full.uploaded_bytes as f64 / 1e6
    );
    synth(&trail, &key_path, trail_bytes + trail_bytes / 100, 64 << 20);
    sync();
    let inc = rt.block_on(salus_backup::create(dest.clone(), opts, Arc::new(NoProgress))).unwrap();
    println!(
        "create (incremental): {:>7.1} s  {:>6.0} MB/s read  ({} objects, {:.1} MB uploaded, {} reused)",
        inc.elapsed.as_secs_f64(),
        mbps(inc.read_bytes, inc.elapsed),
        inc.uploaded_objects,
        inc.uploaded_bytes as f64 / 1e6,
        inc.reused_objects
    );
    let vopts = VerifyOptions {
        backup_keys: vec![backup_key],
        audit_key: None,
        public_key: None,
        anchor_dir: Some(trail.clone()),
        concurrency: 4,
    };
    let v = rt.block_on(salus_backup::verify(dest.clone(), vopts.clone(), Arc::new(NoProgress))).unwrap();
    println!(
        "verify (2 backups):   {:>7.1} s  {:>6.0} MB/s  ({} objects)",
        v.elapsed.as_secs_f64(),
        mbps(v.bytes, v.elapsed),
        v.objects
    );
    let with_key = VerifyOptions { audit_key: Some(audit_key.clone()), ..vopts.clone() };
    let v = rt.block_on(salus_backup::verify(dest.clone(), with_key, Arc::new(NoProgress))).unwrap();
    println!(
        "verify --key:         {:>7.1} s  {:>6.0} MB/s  (every record authenticated)",
        v.elapsed.as_secs_f64(),
        mbps(v.bytes, v.elapsed)
    );
    let to = work.path().join("restored");
    sync();
    let ropts = RestoreOptions { to: to.clone(), files_to: None, at: None, verify: vopts };
    let r = rt.block_on(salus_backup::restore(dest.clone(), ropts, Arc::new(NoProgress))).unwrap();
    println!(
        "restore:              {:>7.1} s  {:>6.0} MB/s  ({} files, {:.0} MB)",
        r.elapsed.as_secs_f64(),
        mbps(r.bytes, r.elapsed),
        r.files,
        r.bytes as f64 / 1e6
    );
    let t0 = Instant::now();
    let rep = salus_audit::verify_trail(&to, &audit_key, None).unwrap();
    let tv = t0.elapsed();
    println!(
        "audit verify (restored): {:>4.1} s  {:>6.0} MB/s  ({} records)",
        tv.as_secs_f64(),
        mbps(r.bytes, tv),
        rep.records
    );
    println!(
        "time to restore a {:.2} GB trail and verify it: {:.1} s",
        r.bytes as f64 / 1e9,
        (r.elapsed + tv).as_secs_f64()
    );
}
