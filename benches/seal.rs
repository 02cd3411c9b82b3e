//! Sealed-weights benchmark (`cargo bench --bench seal`).
//!
//! 1. Decryption throughput of `SealedFile::decrypt_all` (pread + AES-256-GCM into
//!    locked memory) on one core and on all cores, in GB/s of plaintext.
//! 2. Time to ready for the default model, sealed vs plaintext:
//!    `salus_seal::load_model` + `salus_models::load` (network, tokenizer, chat template).
//!    Target: sealed ≤ 1.25× plaintext.
//!
//! Environment: `SALUS_BENCH_MB` (throughput size, default 256),
//! `SALUS_BENCH_MODEL` (default: the SmolLM2-135M Q4_1 GGUF in ~/.cache/salus/models),
//! `SALUS_BENCH_RUNS` (default 5; the median is reported).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use salus_seal::{self, ObjectKind, PartSpec, SealWriter, SealedFile};
use salus_sensitive::secret::{write_new_key_file, KeySource};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Process CPU time (user + system, all threads) from /proc/self/stat, in seconds.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<f64> = after.split_whitespace().map(|x| x.parse().unwrap_or(0.0)).collect();
    // Fields 14 and 15 (utime, stime) are at 11 and 12 after the command name; ticks of 1/100 s.
    (f.get(11).copied().unwrap_or(0.0) + f.get(12).copied().unwrap_or(0.0)) / 100.0
}

/// Median wall time and median CPU time of `runs` runs (after one warm-up run).
fn time_runs<T>(runs: usize, mut f: impl FnMut() -> T) -> (Duration, f64) {
    let _warm = f();
    let mut walls = Vec::new();
    let mut cpus = Vec::new();
    for _ in 0..runs {
        let (t, c) = (Instant::now(), cpu_seconds());
        let r = f();
        walls.push(t.elapsed());
        cpus.push(cpu_seconds() - c);
        drop(r);
    }
    cpus.sort_by(|a, b| a.total_cmp(b));
    (median(walls), cpus[cpus.len() / 2])
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` / `cargo bench -- --list` probing
    }
    let runs: usize = std::env::var("SALUS_BENCH_RUNS").ok().and_then(|s| s.parse().ok()).unwrap_or(5);
    let mb: usize = std::env::var("SALUS_BENCH_MB").ok().and_then(|s| s.parse().ok()).unwrap_or(256);
    let dir = tempfile::tempdir().expect("tempdir");
    let kek_path = dir.path().join("kek");
    let kek = write_new_key_file(&kek_path).expect("key");
    let kek_src = KeySource::File(kek_path);
    let cores = rayon::current_num_threads();

    // 1. Throughput.
    let len = mb << 20;
    let sealed = dir.path().join("bench.sealed");
    let mut w = SealWriter::create(
        &sealed,
        &kek,
        ObjectKind::Gguf,
        "bench",
        vec![PartSpec { name: "bench.gguf".into(), len: len as u64 }],
        salus_seal::DEFAULT_CHUNK_SIZE,
    )
    .expect("create");
    let block: Vec<u8> = (0..1 << 20).map(|i: u32| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    let t = Instant::now();
    for _ in 0..mb {
        w.write(&block).expect("write");
    }
    w.end_part(None).expect("end");
    w.finish().expect("finish");
    let seal_s = t.elapsed().as_secs_f64();
    let file = SealedFile::open(&sealed).expect("open");
    let (dk, _) = file.unwrap_key(&kek).expect("unwrap");
    let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().expect("pool");
    let (d1, c1) = time_runs(runs, || one.install(|| file.decrypt_all(&dk).expect("decrypt")));
    let (dn, cn) = time_runs(runs, || file.decrypt_all(&dk).expect("decrypt"));
    let gb = len as f64 / 1e9;
    println!("seal (1 core, write to disk)     {:>7.2} GB/s  ({mb} MiB)", gb / seal_s);
    println!(
        "decrypt_all 1 core      {:>6.2} GB/s wall, {:>6.2} GB per CPU-second",
        gb / d1.as_secs_f64(),
        gb / c1.max(0.01)
    );
    println!(
        "decrypt_all {cores} cores     {:>6.2} GB/s wall ({:.2} GB/s per core), {:>6.2} GB per CPU-second",
        gb / dn.as_secs_f64(),
        gb / dn.as_secs_f64() / cores as f64,
        gb / cn.max(0.01)
    );
    drop(file);
    let _ = std::fs::remove_file(&sealed);

    // 2. Time to ready for the default model.
    let model: PathBuf = std::env::var_os("SALUS_BENCH_MODEL").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into()))
            .join(".cache/salus/models/SmolLM2-135M-Instruct.Q4_1.gguf")
    });
    if !model.exists() {
        println!("time-to-ready: skipped, {} not found (scripts/fetch-model.sh)", model.display());
        return;
    }
    let sealed_model = dir.path().join("model.sealed");
    salus_seal::seal_path(&model, &sealed_model, &kek, None, salus_seal::DEFAULT_CHUNK_SIZE, &|_| {})
        .expect("seal model");
    let size = std::fs::metadata(&model).expect("meta").len() as f64 / 1e6;
    let opts = salus_models::LoadOptions::default();
    let ready = |p: &Path, kek: Option<&KeySource>| {
        let w = salus_seal::load_model(p, kek, true).expect("load_model");
        let m = salus_models::load(&w.source, &opts).expect("salus_models::load");
        (w, m)
    };
    let (only_plain, _) = time_runs(runs, || salus_seal::load_model(&model, None, true).expect("plain"));
    let (only_sealed, _) =
        time_runs(runs, || salus_seal::load_model(&sealed_model, Some(&kek_src), false).expect("sealed"));
    let (raw_read, _) = time_runs(runs, || std::fs::read(&model).expect("read"));
    let (plain, _) = time_runs(runs, || ready(&model, None));
    let (sealed, _) = time_runs(runs, || ready(&sealed_model, Some(&kek_src)));
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!("model {} ({size:.1} MB), median of {runs}:", model.display());
    println!("  std::fs::read (reference)              {:>8.1} ms", ms(raw_read));
    println!("  load_model plaintext (read + sha256)   {:>8.1} ms", ms(only_plain));
    println!("  load_model sealed (unwrap + decrypt)   {:>8.1} ms", ms(only_sealed));
    println!("  time to ready plaintext (+models::load){:>8.1} ms", ms(plain));
    println!("  time to ready sealed    (+models::load){:>8.1} ms", ms(sealed));
    println!(
        "  ratio sealed/plaintext                 {:>8.2}x (target <= 1.25x)",
        sealed.as_secs_f64() / plain.as_secs_f64()
    );
}
