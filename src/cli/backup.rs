//! `salus backup create|list|verify|restore|checkpoints|keygen`: backups of the audit
//! trail, its checkpoint, key baseline, API key store and config, to a
//! directory or `s3://bucket/prefix` (format and design: `salus_backup` and
//! docs/deployment.md "Backups").
//!
//! Exit codes (for cron jobs and monitoring): 0 done; 1 error (a bad
//! value, unreadable key or file, destination unreachable, restore into a
//! non-empty directory); 2 usage error (unknown option, missing argument);
//! 3 verification failed (a modified, missing, foreign or rolled-back
//! backup, or a damaged local trail that `create` will not certify). Every problem found is printed on its own line
//! (`FAIL subject: problem`) before the one-line error.
//!
//! S3 credentials come from the environment (`AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, web identity / container /
//! instance credentials), `AWS_REGION`, and `AWS_ENDPOINT_URL` for an
//! S3-compatible endpoint; they are never printed.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use salus_backup::{
    BackupError, CreateOptions, ObjectLock, Progress, RestoreOptions, Target, TargetOptions, VerifyOptions,
};
use salus_sensitive::secret::{write_new_key_file, KeySource, SecretKey};

#[derive(Args)]
pub struct BackupArgs {
    #[command(subcommand)]
    command: BackupCommand,
}

#[derive(Args, Clone)]
struct DestArgs {
    /// PEM CA bundle trusted for the S3 endpoint (besides the system's roots).
    #[arg(long, env = "SALUS_BACKUP_CA")]
    ca: Option<PathBuf>,
    /// Objects read, encrypted and transferred at once.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
}

#[derive(Args, Clone)]
struct BackupKeyArgs {
    /// Backup key (wraps the data keys): file:PATH, env:NAME or cmd:PROGRAM [ARGS].
    #[arg(long, env = "SALUS_BACKUP_KEY", hide_env_values = true)]
    backup_key: String,
    /// An earlier backup key (after a rotation); repeat for several.
    #[arg(long = "previous-backup-key")]
    previous_backup_keys: Vec<String>,
}

#[derive(Clone, Copy, ValueEnum)]
enum LockMode {
    /// Nobody can delete or overwrite an object version before retain-until.
    Compliance,
    /// Users with s3:BypassGovernanceRetention can.
    Governance,
    /// No Object Lock headers (bucket without Object Lock).
    Off,
}

#[derive(Subcommand)]
enum BackupCommand {
    /// Back up the trail (incremental: only objects the destination lacks are uploaded).
    Create {
        /// Destination: a directory or s3://BUCKET/PREFIX.
        #[arg(long)]
        to: String,
        /// Server config: audit.dir, audit.key, audit.retention_days, auth.api_keys, and the file itself.
        #[arg(long)]
        config: Option<PathBuf>,
        /// The audit directory (overrides audit.dir).
        #[arg(long)]
        audit_dir: Option<PathBuf>,
        /// Audit master key (overrides audit.key): file:PATH, env:NAME or cmd:PROGRAM [ARGS].
        #[arg(long, env = "SALUS_AUDIT_KEY", hide_env_values = true)]
        key: Option<String>,
        #[command(flatten)]
        keys: BackupKeyArgs,
        /// The API key store to include (overrides auth.api_keys).
        #[arg(long)]
        api_keys: Option<PathBuf>,
        /// Leave the API key store out.
        #[arg(long)]
        no_api_keys: bool,
        /// Leave the config file out.
        #[arg(long)]
        no_config: bool,
        /// S3 Object Lock mode of what is written (a directory ignores it).
        #[arg(long, value_enum, default_value = "compliance")]
        object_lock: LockMode,
        /// Object Lock retention in days (default: audit.retention_days, else 2192).
        #[arg(long)]
        retain_days: Option<u32>,
        #[command(flatten)]
        dest: DestArgs,
    },
    /// List the backups in a destination (no key needed).
    List {
        /// A directory or s3://BUCKET/PREFIX.
        dest: String,
        #[command(flatten)]
        dest_args: DestArgs,
    },
    /// Check every backup: manifests signed and chained, objects present and authentic.
    Verify {
        /// A directory or s3://BUCKET/PREFIX.
        dest: String,
        #[command(flatten)]
        keys: BackupKeyArgs,
        /// Audit master key: pins the signer and authenticates every record.
        #[arg(long, env = "SALUS_AUDIT_KEY", hide_env_values = true)]
        key: Option<String>,
        /// Server config (audit.key and audit.dir, as --key and --audit-dir).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Audit directory holding this host's record of its newest backup (catches a rollback).
        #[arg(long)]
        audit_dir: Option<PathBuf>,
        /// Hex checkpoint public key to pin the signer without the audit key.
        #[arg(long)]
        public_key: Option<String>,
        #[command(flatten)]
        dest_args: DestArgs,
    },
    /// Restore a backup into a new audit directory.
    Restore {
        /// A directory or s3://BUCKET/PREFIX.
        dest: String,
        /// The new audit directory (must not exist, or be empty).
        #[arg(long)]
        to: PathBuf,
        /// Where the API key store and config go (must not exist, or be empty); default: not restored.
        #[arg(long)]
        files_to: Option<PathBuf>,
        /// Restore the newest backup at or before this time (RFC 3339 or YYYY-MM-DD).
        #[arg(long)]
        at: Option<String>,
        #[command(flatten)]
        keys: BackupKeyArgs,
        /// Audit master key: also verifies the restored trail (as `salus audit verify`).
        #[arg(long, env = "SALUS_AUDIT_KEY", hide_env_values = true)]
        key: Option<String>,
        #[command(flatten)]
        dest_args: DestArgs,
    },
    /// Write every backup's signed checkpoint into DIR (for `salus audit verify --checkpoints DIR`).
    Checkpoints {
        /// A directory or s3://BUCKET/PREFIX.
        dest: String,
        /// The directory to write checkpoint-<records>.json files into.
        #[arg(long)]
        to: PathBuf,
        #[command(flatten)]
        keys: BackupKeyArgs,
        /// Audit master key: pins the signer.
        #[arg(long, env = "SALUS_AUDIT_KEY", hide_env_values = true)]
        key: Option<String>,
        #[command(flatten)]
        dest_args: DestArgs,
    },
    /// Write a new random 32-byte backup key to PATH (mode 0600; never overwrites).
    Keygen { path: PathBuf },
}

/// The exit code for an error of `run` (3: verification failed).
pub fn exit_code(e: &anyhow::Error) -> u8 {
    e.chain().find_map(|c| c.downcast_ref::<BackupError>()).map(|b| b.exit_code()).unwrap_or(1)
}

struct Bars(std::sync::Mutex<Option<ProgressBar>>);

impl Bars {
    fn new() -> Arc<Bars> {
        Arc::new(Bars(std::sync::Mutex::new(None)))
    }
}

impl Progress for Bars {
    fn begin(&self, what: &str, total: u64) {
        if !std::io::stderr().is_terminal() {
            return;
        }
        let pb = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
        pb.set_style(
            ProgressStyle::with_template("{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        pb.set_message(what.to_string());
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(pb);
    }
    fn advance(&self, bytes: u64) {
        if let Some(pb) = &*self.0.lock().unwrap_or_else(|p| p.into_inner()) {
            pb.inc(bytes);
        }
    }
    fn end(&self) {
        if let Some(pb) = self.0.lock().unwrap_or_else(|p| p.into_inner()).take() {
            pb.finish_and_clear();
        }
    }
}

/// A key source from the command line or the environment. An invalid one
/// is not echoed: it may be a key pasted where its source belongs.
fn source(what: &str, s: &str) -> anyhow::Result<KeySource> {
    s.parse::<KeySource>().map_err(|_| {
        anyhow::anyhow!(
            "{what}: not a key source (expected file:PATH, env:NAME or cmd:PROGRAM [ARGS]; the value is not shown)"
        )
    })
}

fn load(what: &'static str, src: &str) -> anyhow::Result<SecretKey> {
    Ok(salus_backup::load_key(what, &source(what, src)?)?)
}

fn backup_keys(k: &BackupKeyArgs) -> anyhow::Result<(SecretKey, Vec<SecretKey>)> {
    let current = load("backup key", &k.backup_key)?;
    let previous =
        k.previous_backup_keys.iter().map(|s| load("previous backup key", s)).collect::<anyhow::Result<Vec<_>>>()?;
    Ok((current, previous))
}

fn open_target(spec: &str, d: &DestArgs, lock: ObjectLock) -> anyhow::Result<Arc<Target>> {
    Ok(Arc::new(Target::open(
        spec,
        &TargetOptions { object_lock: lock, ca_file: d.ca.clone(), ..TargetOptions::default() },
    )?))
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")
}

fn instance() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "salus".into())
}

fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

fn rate(bytes: u64, d: std::time::Duration) -> String {
    format!("{:.0} MB/s", bytes as f64 / 1e6 / d.as_secs_f64().max(1e-6))
}

/// Prints every problem of a verification failure on its own line.
fn report<T>(r: Result<T, BackupError>) -> anyhow::Result<T> {
    if let Err(e) = &r {
        for p in e.problems() {
            eprintln!("FAIL {p}");
        }
    }
    Ok(r?)
}

/// `[audit]` / `[auth]` values of a server config.
struct FromConfig {
    audit_dir: PathBuf,
    audit_key: Option<String>,
    retention_days: u64,
    api_keys: PathBuf,
}

fn from_config(path: &std::path::Path) -> anyhow::Result<FromConfig> {
    let c = salus_server::config::Config::load(Some(path), std::env::vars())
        .with_context(|| format!("loading {}", path.display()))?;
    Ok(FromConfig {
        audit_dir: c.audit.dir,
        audit_key: c.audit.key,
        retention_days: c.audit.retention_days,
        api_keys: c.auth.api_keys,
    })
}

pub fn run(args: BackupArgs) -> anyhow::Result<()> {
    match args.command {
        BackupCommand::Keygen { path } => {
            let key = write_new_key_file(&path).with_context(|| format!("writing {}", path.display()))?;
            println!("wrote backup key {} (id {})", path.display(), key.key_id());
            Ok(())
        }
        BackupCommand::Create {
            to,
            config,
            audit_dir,
            key,
            keys,
            api_keys,
            no_api_keys,
            no_config,
            object_lock,
            retain_days,
            dest,
        } => {
            let cfg = config.as_deref().map(from_config).transpose()?;
            let audit_dir = audit_dir
                .or(cfg.as_ref().map(|c| c.audit_dir.clone()))
                .context("--audit-dir (or --config with audit.dir) is required")?;
            let key_src = key
                .or(cfg.as_ref().and_then(|c| c.audit_key.clone()))
                .context("--key (or SALUS_AUDIT_KEY, or --config with audit.key) is required")?;
            let audit_key = load("audit key", &key_src)?;
            let (backup_key, previous_backup_keys) = backup_keys(&keys)?;
            let days = match retain_days {
                Some(d) => d,
                None => u32::try_from(cfg.as_ref().map(|c| c.retention_days).unwrap_or(2192))
                    .context("audit.retention_days")?,
            };
            let lock = match object_lock {
                LockMode::Compliance => ObjectLock::Compliance { days },
                LockMode::Governance => ObjectLock::Governance { days },
                LockMode::Off => ObjectLock::Off,
            };
            let key_store = if no_api_keys {
                None
            } else {
                api_keys.or(cfg.as_ref().map(|c| c.api_keys.clone())).filter(|p| p.exists())
            };
            let config_file = if no_config { None } else { config.clone() };
            let target = open_target(&to, &dest, lock)?;
            let opts = CreateOptions {
                audit_dir,
                audit_key,
                backup_key,
                previous_backup_keys,
                key_store,
                config_file,
                instance: instance(),
                concurrency: dest.concurrency,
                reuse_sealed: false,
            };
            let r = report(runtime()?.block_on(salus_backup::create(target.clone(), opts, Bars::new())))?;
            let t = &r.manifest.trail;
            println!(
                "backup #{} to {}: seq {}..{} ({} segments); {} objects uploaded ({}), {} already there; {} read in {:.1} s ({})",
                r.number,
                target.describe(),
                t.first_seq,
                t.last_seq,
                t.last_segment + 1 - t.first_segment,
                r.uploaded_objects,
                mb(r.uploaded_bytes),
                r.reused_objects,
                mb(r.read_bytes),
                r.elapsed.as_secs_f64(),
                rate(r.read_bytes, r.elapsed)
            );
            if let Some(w) = r.anchor_warning {
                eprintln!("warning: the local record of this backup was not written ({w}): a rollback of the destination will not be noticed from this host");
            }
            Ok(())
        }
        BackupCommand::Checkpoints { dest, to, keys, key, dest_args } => {
            let audit_key = key.as_ref().map(|k| load("audit key", k)).transpose()?;
            let (current, previous) = backup_keys(&keys)?;
            let target = open_target(&dest, &dest_args, ObjectLock::Off)?;
            let opts = VerifyOptions {
                backup_keys: std::iter::once(current).chain(previous).collect(),
                audit_key,
                public_key: None,
                anchor_dir: None,
                concurrency: dest_args.concurrency,
            };
            let n = report(runtime()?.block_on(salus_backup::export_checkpoints(target.clone(), opts, &to)))?;
            println!("wrote {n} checkpoints from {} into {}", target.describe(), to.display());
            Ok(())
        }
        BackupCommand::List { dest, dest_args } => {
            let target = open_target(&dest, &dest_args, ObjectLock::Off)?;
            let rt = runtime()?;
            let all = rt.block_on(salus_backup::list(&target))?;
            if all.is_empty() {
                println!("no backups in {}", target.describe());
                return Ok(());
            }
            println!(
                "{:>6}  {:<30}  {:<16}  {:>21}  {:>7}  {:>10}  {:>10}",
                "#", "created", "instance", "seq", "files", "size", "new"
            );
            let mut bad = Vec::new();
            for b in &all {
                match &b.manifest {
                    Ok(m) => println!(
                        "{:>6}  {:<30}  {:<16}  {:>21}  {:>7}  {:>10}  {:>10}",
                        m.number,
                        m.created,
                        m.instance,
                        format!("{}..{}", m.trail.first_seq, m.trail.last_seq),
                        m.objects.len(),
                        mb(m.total_size()),
                        mb(b.new_bytes)
                    ),
                    Err(p) => {
                        println!("{:>6}  INVALID: {p}", b.number);
                        bad.push(p.clone());
                    }
                }
            }
            if !bad.is_empty() {
                return Err(BackupError::Verification(bad).into());
            }
            Ok(())
        }
        BackupCommand::Verify { dest, keys, key, config, audit_dir, public_key, dest_args } => {
            let cfg = config.as_deref().map(from_config).transpose()?;
            let key = key.or(cfg.as_ref().and_then(|c| c.audit_key.clone()));
            let audit_key = key.as_ref().map(|k| load("audit key", k)).transpose()?;
            let public_key = public_key
                .map(|h| {
                    hex::decode(h.trim())
                        .ok()
                        .and_then(|v| <[u8; 32]>::try_from(v).ok())
                        .context("--public-key: expected 64 hex digits")
                })
                .transpose()?;
            let (current, previous) = backup_keys(&keys)?;
            let target = open_target(&dest, &dest_args, ObjectLock::Off)?;
            let opts = VerifyOptions {
                backup_keys: std::iter::once(current).chain(previous).collect(),
                audit_key,
                public_key,
                anchor_dir: audit_dir.or(cfg.map(|c| c.audit_dir)),
                concurrency: dest_args.concurrency,
            };
            let r = report(runtime()?.block_on(salus_backup::verify(target.clone(), opts, Bars::new())))?;
            for n in &r.notes {
                eprintln!("note: {n}");
            }
            let seq = r.trail.as_ref().map(|t| format!("seq {}..{}", t.first_seq, t.last_seq)).unwrap_or_default();
            println!(
                "OK: {} backups (#{}..#{}) in {}: manifests signed by {}… ({}) and chained; {} objects ({}) present and authentic; the newest covers {seq}; {:.1} s ({})",
                r.manifests,
                r.first,
                r.newest,
                target.describe(),
                &r.signer[..16.min(r.signer.len())],
                if r.pinned { "the trail's key" } else { "not pinned: pass --key or --public-key" },
                r.objects,
                mb(r.bytes),
                r.elapsed.as_secs_f64(),
                rate(r.bytes, r.elapsed)
            );
            Ok(())
        }
        BackupCommand::Restore { dest, to, files_to, at, keys, key, dest_args } => {
            let at = at
                .map(|s| salus_audit::RecordFilter::parse_time(&s).map_err(anyhow::Error::msg).context("--at"))
                .transpose()?;
            let audit_key = key.as_ref().map(|k| load("audit key", k)).transpose()?;
            let (current, previous) = backup_keys(&keys)?;
            let target = open_target(&dest, &dest_args, ObjectLock::Off)?;
            let opts = RestoreOptions {
                to: to.clone(),
                files_to,
                at,
                verify: VerifyOptions {
                    backup_keys: std::iter::once(current).chain(previous).collect(),
                    audit_key,
                    public_key: None,
                    anchor_dir: None,
                    concurrency: dest_args.concurrency,
                },
            };
            let r = report(runtime()?.block_on(salus_backup::restore(target, opts, Bars::new())))?;
            println!(
                "restored backup #{} (created {}, seq {}..{}) into {}: {} files, {} in {:.1} s ({})",
                r.number,
                r.created,
                r.trail.first_seq,
                r.trail.last_seq,
                to.display(),
                r.files,
                mb(r.bytes),
                r.elapsed.as_secs_f64(),
                rate(r.bytes, r.elapsed)
            );
            if !r.skipped.is_empty() {
                eprintln!("note: not restored (pass --files-to DIR): {}", r.skipped.join(", "));
            }
            match r.verified {
                Some(v) => println!(
                    "OK: restored trail verifies: {} records (seq {}..{}), chain head {}",
                    v.records, v.first_seq, v.last_seq, v.chain_head
                ),
                None => eprintln!("note: check it with `salus audit verify --dir {} --key …`", to.display()),
            }
            Ok(())
        }
    }
}
