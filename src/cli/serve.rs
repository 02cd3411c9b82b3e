//! `salus serve`: the OpenAI-compatible HTTPS server.
//!
//! `salus serve --dev` is the one-line start for development: it serves the
//! default model (plaintext weights allowed), generates a self-signed
//! certificate for localhost into the dev directory on first use, creates a
//! fresh API key (valid 24 h) for the principal `dev`, and prints working `curl`
//! and Python `openai` examples.
//!
//! The audit trail is required: without `[audit] key` (and a private
//! `audit.dir`) the server refuses to start. `--dev` keeps a development trail
//! in `<dev-dir>/audit` under a key generated once into `<dev-dir>/audit.key`
//! (inspect it with `salus audit query --dir <dev-dir>/audit --key file:<dev-dir>/audit.key`).
//! The log is opened before anything is served (`server.started`), records
//! what the key store holds that the trail's key baseline (`keys.recorded`)
//! does not (`keys.startup_reconcile`), `admin.key_created` for the development
//! key and `admin.model_loaded`, and is
//! closed (`server.stopped`, final checkpoint) after the listener has drained.
//! With `[audit.forward]`, a forwarder thread streams the trail to a SIEM from
//! just after the open until just after the close (so `server.stopped` goes too).
//! With `[audit.ship]`, a shipper thread copies every sealed segment and
//! checkpoint to the backup destination over the same span (the final
//! checkpoint goes too), and the retention purge keeps what it has not shipped.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use salus_audit::forward::{ForwardMonitor, Forwarder};
use salus_audit::{AuditLog, PurgeHold};
use salus_backup::{ShipMonitor, Shipper};
use salus_server::admin_events;
use salus_server::app::{app, metrics_app};
use salus_server::auth::access::AccessControl;
use salus_server::auth::denials::DenialRecorder;
use salus_server::auth::key_baseline;
use salus_server::auth::store::{parse_expiry, OffsetDateTime};
use salus_server::auth::{KeyStore, KeyStoreHandle, Permission, PrincipalKind};
use salus_server::config::{valid_model_id, Config, MemoryLock};
use salus_server::engine::Engine;
use salus_server::listener::{raise_fd_limit, serve, ConnectionSettings};
use salus_server::metrics::Metrics;
use salus_server::reviews::ReviewIndex;
use salus_server::scheduler::ContinuousBatchingEngine;
use salus_server::served_model::{ModelCodec, ServedModel};
use salus_server::state::{AppParts, AppState, ServedModelInfo};
use salus_server::telemetry::Telemetry;
use salus_server::tls::{check_plaintext_allowed, write_self_signed, ReloadableTls, TlsSettings};

#[derive(Args)]
pub struct ServeArgs {
    /// Config file (TOML); see configs/salus.toml. SALUS_<SECTION>__<KEY> variables override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Listen address (server.listen), e.g. 127.0.0.1:8443.
    #[arg(long)]
    listen: Option<String>,
    /// Model file (model.path): sealed, or plaintext GGUF / HF directory when allowed.
    #[arg(long)]
    model: Option<PathBuf>,
    /// PEM certificate chain (tls.cert).
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    /// PEM private key (tls.key).
    #[arg(long)]
    tls_key: Option<PathBuf>,
    /// API key store (auth.api_keys).
    #[arg(long)]
    api_keys: Option<PathBuf>,
    /// Development mode: default model, self-signed certificate, a fresh API key, examples printed.
    #[arg(long)]
    dev: bool,
    /// Directory for --dev files (certificate, key store). Default: ~/.local/share/salus/dev.
    #[arg(long)]
    dev_dir: Option<PathBuf>,
    /// Compute device (model.device): `cpu` or `cuda:N` (CUDA needs a `--features cuda` build).
    #[arg(long)]
    device: Option<String>,
}

fn home() -> PathBuf {
    std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."))
}

fn private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    Ok(())
}

/// Applies flags (and --dev defaults) on top of file + environment.
fn build_config(args: &ServeArgs) -> anyhow::Result<(Config, Option<PathBuf>)> {
    let mut c = Config::load(args.config.as_deref(), std::env::vars())?;
    let mut dev_dir = None;
    if args.dev {
        let dir = args.dev_dir.clone().unwrap_or_else(|| home().join(".local/share/salus/dev"));
        private_dir(&dir)?;
        c.tls.enabled = true;
        c.tls.cert = Some(dir.join("cert.pem"));
        c.tls.key = Some(dir.join("key.pem"));
        c.auth.api_keys = dir.join("api-keys.json");
        if c.model.path.is_none() {
            c.model.path = Some(salus_models::dev_model::default_model_path());
        }
        c.model.allow_plaintext_weights = true;
        let audit_key = dir.join("audit.key");
        if !audit_key.exists() {
            salus_sensitive::secret::write_new_key_file(&audit_key)
                .with_context(|| format!("writing the development audit key {}", audit_key.display()))?;
        }
        c.audit.enabled = true;
        c.audit.dir = dir.join("audit");
        c.audit.key = Some(format!("file:{}", audit_key.display()));
        c.audit.checkpoint_dir = None;
        dev_dir = Some(dir);
    }
    if let Some(v) = &args.listen {
        c.server.listen = v.clone();
    }
    if let Some(v) = &args.model {
        c.model.path = Some(v.clone());
    }
    if let Some(v) = &args.device {
        c.model.device = v.clone();
    }
    if let Some(v) = &args.tls_cert {
        c.tls.cert = Some(v.clone());
    }
    if let Some(v) = &args.tls_key {
        c.tls.key = Some(v.clone());
    }
    if let Some(v) = &args.api_keys {
        c.auth.api_keys = v.clone();
    }
    c.validate()?;
    if args.dev && !c.listen_addr()?.ip().is_loopback() {
        bail!("--dev serves a self-signed certificate and a development key: listen on a loopback address");
    }
    Ok((c, dev_dir))
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let (mut config, dev_dir) = build_config(&args)?;
    salus_server::observability::init(&config.logging.format, &config.logging.level, config.logging.file.as_deref())?;
    if let Err(e) = salus_seal::harden_process() {
        tracing::warn!(error = %e, "process hardening incomplete");
    }
    match raise_fd_limit() {
        Ok(n) => tracing::info!(open_files_limit = n, "descriptor limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-files limit"),
    }
    let addr = config.listen_addr()?;
    // Transport first: refuse a bad TLS setup before spending time on the model.
    if let Some(dir) = &dev_dir {
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        if !cert.exists() || !key.exists() {
            let names = vec!["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()];
            write_self_signed(&cert, &key, &names)?;
        }
    }
    let tls = if config.tls.enabled {
        let (Some(cert), Some(key)) = (&config.tls.cert, &config.tls.key) else {
            bail!("TLS is on but tls.cert / tls.key are not set (use --tls-cert/--tls-key, or --dev for a self-signed development setup)");
        };
        let settings = TlsSettings { cert: cert.clone(), key: key.clone(), client_ca: config.tls.client_ca.clone() };
        Some(Arc::new(ReloadableTls::new(settings)?))
    } else {
        check_plaintext_allowed(addr)?;
        tracing::warn!(listen = %addr, "TLS is off (tls.enabled = false): plain HTTP on loopback only");
        None
    };

    // The audit trail: required; refused before any model or key work if it is
    // not configured, not private, or cannot be made durable.
    let mut audit_cfg = config.audit.to_log_settings()?;
    // The replica's name (the host name unless configured), also for traces.
    config.audit.instance = Some(audit_cfg.instance.clone());
    let forward_cfg = config.audit.forward_settings()?;
    // [audit.ship]: keys loaded now; the purge keeps what the destination lacks.
    let ship_cfg = config.audit.ship_settings(&audit_cfg.instance)?;
    let hold = ship_cfg.as_ref().map(|_| PurgeHold::new());
    audit_cfg.purge_hold = hold.clone();
    let audit_dir = audit_cfg.dir.clone();
    let audit =
        AuditLog::open(audit_cfg).with_context(|| format!("opening the audit trail {}", audit_dir.display()))?;
    tracing::info!(dir = %audit_dir.display(), "audit trail open");
    // The SIEM forwarder tails the trail on a thread of its own ([audit.forward]).
    let forwarder = match forward_cfg.map(|s| Forwarder::start(&audit, s)).transpose() {
        Ok(f) => f,
        Err(e) => {
            let _ = audit.close();
            return Err(e).context("starting the audit forwarder ([audit.forward])");
        }
    };
    // The shipper copies sealed segments and checkpoints off the host, on a thread of its own.
    let shipper = match ship_cfg.map(|s| Shipper::start(&audit, s, hold)).transpose() {
        Ok(s) => s,
        Err(e) => {
            let _ = audit.close();
            return Err(e).context("starting the audit shipper ([audit.ship] target)");
        }
    };
    let copies = TrailCopies {
        forward: forwarder.as_ref().map(Forwarder::monitor),
        ship: shipper.as_ref().map(Shipper::monitor),
    };
    let result = run_with_audit(&args, config, dev_dir, addr, tls, audit.clone(), copies);
    // server.stopped + final checkpoint, also when start-up failed after opening the trail.
    let closed = audit.close().context("closing the audit trail");
    // After the close, so that the final checkpoint is shipped (bounded by shutdown_flush_secs)…
    if let Some(s) = shipper {
        s.stop();
    }
    // …and server.stopped is forwarded too.
    if let Some(f) = forwarder {
        f.stop();
    }
    result.and(closed)
}

/// The running copies of the trail (SIEM forwarder, off-host shipper), whose
/// figures the metrics and `/ready` show.
struct TrailCopies {
    forward: Option<ForwardMonitor>,
    ship: Option<ShipMonitor>,
}

/// The served model, loaded and announced in the trail.
struct LoadedServedModel {
    id: String,
    served: ServedModel,
}

/// API keys: in `--dev`, first records what the trail's key baseline lacks,
/// then creates (and records) the development key; then opens the store for
/// serving, recording whatever changed while no one was recording. Returns the
/// store and the development key (shown once).
fn set_up_keys(
    args: &ServeArgs,
    config: &Config,
    audit: &AuditLog,
) -> anyhow::Result<(Arc<KeyStoreHandle>, Option<zeroize::Zeroizing<String>>)> {
    let mut dev_key = None;
    if args.dev {
        let now = OffsetDateTime::now_utc();
        let mut store = KeyStore::load(&config.auth.api_keys)?;
        // First the trail learns the store as it is (what the baseline lacks),
        // so that below the development key is recorded once, as serve.dev_key.
        key_baseline::reconcile(audit, &store)
            .context("recording key-store changes the audit trail had missed (keys.startup_reconcile)")?;
        let new =
            store.create("dev", PrincipalKind::Human, &DEV_KEY_PERMISSIONS, Some(parse_expiry("24h", now)?), now)?;
        store.save(&config.auth.api_keys)?;
        audit
            .record_blocking(admin_events::dev_key_created(&new.record.id))
            .context("recording admin.key_created in the audit trail")?;
        // The key's creation is durable: the baseline may include it.
        key_baseline::note_recorded(audit, &store).context("writing the audit trail's key baseline")?;
        dev_key = Some(new.secret);
    }
    let keys = Arc::new(KeyStoreHandle::open(config.auth.api_keys.clone())?);
    // `salus keys` cannot write to the trail while we hold it: we record what
    // changes in the key store when we reload it.
    keys.record_changes_in(audit.clone());
    // What changed while no one was recording (the last server was killed
    // before it noticed a change) is recorded now, before any key is used.
    let missed = keys
        .reconcile_with_trail()
        .context("recording key-store changes the audit trail had missed (keys.startup_reconcile)")?;
    if missed > 0 {
        tracing::info!(events = missed, "audit: recorded key-store changes the trail did not hold yet");
    }
    Ok((keys, dev_key))
}

/// What the development key may do.
const DEV_KEY_PERMISSIONS: [Permission; 4] =
    [Permission::Inference, Permission::Metrics, Permission::Review, Permission::Auditor];

/// Loads the model (sealed, or plaintext where allowed) and records `admin.model_loaded`.
fn load_served_model(config: &Config, audit: &AuditLog) -> anyhow::Result<LoadedServedModel> {
    let model_path = config.model.path.clone().context("model.path is not set (use --model PATH)")?;
    let id = match &config.model.id {
        Some(id) => id.clone(),
        None => {
            let id = ServedModel::default_id(&model_path);
            if !valid_model_id(&id) {
                bail!("model id derived from the file name is unusable; set model.id");
            }
            tracing::info!(model = %id, "model.id is not set: serving the model under its file name");
            id
        }
    };
    let started = std::time::Instant::now();
    let served = ServedModel::load(&config.model, &config.kernels)?;
    tracing::info!(
        model = %id,
        fingerprint = %served.fingerprint,
        sealed = served.sealed,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "model loaded"
    );
    audit
        .record_blocking(admin_events::model_loaded(&id, &served.fingerprint))
        .context("recording admin.model_loaded in the audit trail")?;
    Ok(LoadedServedModel { id, served })
}

/// The handlers' state: the engine started on the model, its codec, keys,
/// metrics, limits and the trail.
fn build_state(
    config: &Config,
    model: &LoadedServedModel,
    keys: Arc<KeyStoreHandle>,
    audit: AuditLog,
    runtime: &tokio::runtime::Runtime,
) -> anyhow::Result<AppState> {
    let engine: Arc<dyn Engine> =
        Arc::new(ContinuousBatchingEngine::start(model.served.lm.clone(), config.scheduler.clone())?);
    let created = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let info = ServedModelInfo {
        id: model.id.clone(),
        created,
        fingerprint: model.served.fingerprint.clone(),
        sealed: model.served.sealed,
    };
    let metrics = Arc::new(Metrics::new(&model.id));
    let access = AccessControl::from_config(&config.auth, metrics.clone()).map_err(anyhow::Error::msg)?;
    let reviews = Arc::new(
        ReviewIndex::new(Duration::from_secs(config.reviews.lookup_window_secs), config.reviews.max_pending, false)
            .with_reason_codes(config.reviews.reason_codes.clone()),
    );
    spawn_review_index_rebuild(reviews.clone(), audit.clone());
    let telemetry = match &config.telemetry {
        Some(t) => {
            // Inside the runtime's context: a gRPC exporter runs its connection there.
            let _context = runtime.enter();
            let instance = config.audit.instance.as_deref().unwrap_or("salus");
            let started = Telemetry::start(t, &model.id, instance, metrics.traces_arc())?;
            if started.is_enabled() {
                tracing::info!("telemetry: exporting traces over OTLP");
            }
            started
        }
        None => Telemetry::disabled(),
    };
    let denials = Arc::new(DenialRecorder::new(config.denial_settings(), audit.clone(), metrics.clone()));
    denials.spawn_flusher();
    Ok(AppState::new(AppParts {
        telemetry: Arc::new(telemetry),
        engine,
        codec: Arc::new(ModelCodec::new(model.served.lm.clone())),
        keys,
        metrics,
        model: info,
        limits: config.limits.clone(),
        audit,
        denials,
        access: Arc::new(access),
        reviews,
    }))
}

/// Rebuilds the review index from the trail (the window's completions and
/// their reviews) on a thread of its own: a review of an inference from before
/// the restart waits for it, nothing else does.
fn spawn_review_index_rebuild(index: Arc<ReviewIndex>, audit: AuditLog) {
    let spawned = std::thread::Builder::new().name("review-index".into()).spawn(move || {
        let started = std::time::Instant::now();
        let mut records = Vec::new();
        // The server is already recording: read only what is durable.
        let walked = salus_audit::read_durable(&audit, |r, _| {
            if matches!(r.kind.as_str(), "inference.completed" | "review.recorded") {
                records.push(r.clone());
            }
        });
        match walked {
            Ok(report) => {
                index.load_from(&records);
                tracing::info!(
                    records = report.records,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "review index rebuilt from the audit trail"
                );
            }
            Err(e) => {
                index.give_up_loading();
                tracing::error!(error = %e, "review index not rebuilt: only inferences from now on can be reviewed");
            }
        }
    });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "review index not rebuilt: no thread");
    }
}

/// After the weights and the KV cache are allocated: `memory.lock = required`
/// refuses to go on unless all of them are locked (naming the limit needed);
/// `best_effort` warns once.
fn check_memory_protection(lock: MemoryLock) -> anyhow::Result<()> {
    let r = salus_kernels::memory::protection_report();
    let total = r.locked_bytes + r.lock_failed_bytes;
    let limit = rustix::process::getrlimit(rustix::process::Resource::Memlock).current;
    let shown = limit.map_or_else(|| "unlimited".to_string(), |l| format!("{l} bytes"));
    if r.lock_failed_bytes == 0 {
        tracing::info!(
            locked_bytes = r.locked_bytes,
            excluded_from_dumps_bytes = r.excluded_bytes,
            "weights and KV cache protected"
        );
        return Ok(());
    }
    // Locked bytes plus the process's other locked memory (the sealed loader's buffers are freed by now).
    let needed = total + (64 << 20);
    match lock {
        MemoryLock::Required => bail!(
            "memory.lock = \"required\": {} of {total} bytes of weights and KV cache could not be locked; the memlock limit is {shown}: raise it to at least {needed} bytes (systemd LimitMEMLOCK=infinity; docker --ulimit memlock=-1 --cap-add IPC_LOCK; Kubernetes: the IPC_LOCK capability), or set memory.lock = \"best_effort\"",
            r.lock_failed_bytes
        ),
        MemoryLock::BestEffort => tracing::warn!(
            locked_bytes = r.locked_bytes,
            lock_failed_bytes = r.lock_failed_bytes,
            memlock_limit = %shown,
            needed_bytes = needed,
            "memory.lock = best_effort: part of the weights and KV cache is not locked in RAM (may be swapped); raise the memlock limit"
        ),
        MemoryLock::Off => {}
    }
    Ok(())
}

/// Serves the API (and the metrics listener) until SIGTERM/SIGINT, then drains.
async fn serve_until_stopped(
    config: &Config,
    addr: std::net::SocketAddr,
    tls: Option<Arc<ReloadableTls>>,
    state: AppState,
    keys: Arc<KeyStoreHandle>,
    on_listening: impl FnOnce(),
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let shutdown = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };
    let connections = ConnectionSettings::from_config(&config.server);
    let mut metrics_task = None;
    if let Some(m) = &config.server.metrics_listen {
        let maddr: std::net::SocketAddr = m.parse()?;
        let ml = tokio::net::TcpListener::bind(maddr).await.with_context(|| format!("binding {maddr}"))?;
        let fut = serve(ml, metrics_app(state.clone()), None, connections.clone(), shutdown(stop_rx.clone()));
        metrics_task = Some(tokio::spawn(fut));
        tracing::info!(addr = %maddr, "metrics listener (plain HTTP, loopback)");
    }
    tracing::info!(listen = %addr, tls = tls.is_some(), mtls = config.tls.client_ca.is_some(), "salus is serving");
    on_listening();
    if let Some(t) = &tls {
        state.metrics().set_tls_certificate_expiry(t.not_after());
    }
    let signals = tokio::spawn(handle_signals(state.clone(), tls.clone(), keys, stop_tx));
    serve(listener, app(state), tls, connections, shutdown(stop_rx)).await;
    if let Some(t) = metrics_task {
        let _ = t.await;
    }
    signals.abort();
    tracing::info!("salus stopped");
    Ok(())
}

fn run_with_audit(
    args: &ServeArgs,
    config: Config,
    dev_dir: Option<PathBuf>,
    addr: std::net::SocketAddr,
    tls: Option<Arc<ReloadableTls>>,
    audit: AuditLog,
    copies: TrailCopies,
) -> anyhow::Result<()> {
    let (keys, dev_key) = set_up_keys(args, &config, &audit)?;
    salus_kernels::memory::set_lock_policy(config.memory.lock.policy());
    let model = load_served_model(&config, &audit)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let state = build_state(&config, &model, keys.clone(), audit.clone(), &runtime)?;
    if let Some(m) = copies.forward {
        state.metrics().forward().attach(m);
    }
    if let Some(m) = copies.ship {
        state.metrics().ship().attach(m);
    }
    check_memory_protection(config.memory.lock)?;
    let print = || {
        if let (Some(key), Some(dir)) = (&dev_key, &dev_dir) {
            print_examples(addr, dir, &model.id, key.as_str());
        }
    };
    let denials = state.denials_arc();
    let access = state.access_arc();
    let telemetry = state.telemetry_arc();
    let served = runtime.block_on(serve_until_stopped(&config, addr, tls, state, keys.clone(), print));
    // Spans still queued go out while the runtime (a gRPC connection) still runs.
    telemetry.shutdown();
    served?;
    // Every open session ends with the server (and is recorded so).
    access.end_sessions_blocking(&audit);
    // Denials counted since the last interval go into the trail before it closes.
    if let Err(e) = denials.flush_blocking(true) {
        tracing::error!(error = %e, "audit: the last auth.denied records were not written");
    }
    // Anything still running (requests past the drain timeout) is dropped with the runtime.
    runtime.shutdown_timeout(Duration::from_secs(1));
    // A key-store change made since the last check is still recorded.
    keys.refresh();
    audit
        .record_blocking(admin_events::model_unloaded(&model.id, &model.served.fingerprint))
        .context("recording admin.model_unloaded in the audit trail")?;
    Ok(())
}

async fn handle_signals(
    state: AppState,
    tls: Option<Arc<ReloadableTls>>,
    keys: Arc<KeyStoreHandle>,
    stop: tokio::sync::watch::Sender<bool>,
) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut hup), Ok(mut term), Ok(mut int)) =
        (signal(SignalKind::hangup()), signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    // Key-store changes are noticed (and audited) within a second even when idle.
    let mut key_check = tokio::time::interval(Duration::from_secs(1));
    key_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = key_check.tick() => {
                keys.refresh();
                // Sessions that timed out are recorded even if their user never returns.
                state.access().sweep_sessions(state.audit()).await;
                state.metrics().set_sessions_active(state.access().sessions().active());
            }
            _ = hup.recv() => {
                let mut tls_state = "not_configured";
                if let Some(t) = &tls {
                    match t.reload() {
                        Ok(()) => {
                            tls_state = "reloaded";
                            state.metrics().set_tls_certificate_expiry(t.not_after());
                            tracing::info!("SIGHUP: TLS certificate and key reloaded")
                        }
                        Err(e) => {
                            tls_state = "failed";
                            tracing::error!(error = %e, "SIGHUP: TLS reload failed; keeping the current certificate")
                        }
                    }
                }
                let keys_state = match keys.reload() {
                    Ok(()) => {
                        tracing::info!("SIGHUP: API keys reloaded");
                        "reloaded"
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "SIGHUP: API key reload failed; keeping the current keys");
                        "failed"
                    }
                };
                let ev = admin_events::config_reloaded(tls_state, keys_state);
                if let Err(e) = state.audit().record(ev).await {
                    tracing::error!(error = %e, "audit: admin.config_reloaded not recorded");
                }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    tracing::info!("shutdown requested: no new connections; draining");
    state.stop_accepting();
    let _ = stop.send(true);
}

fn print_examples(addr: std::net::SocketAddr, dir: &Path, model: &str, key: &str) {
    let host = if addr.is_ipv6() { format!("[{}]", addr.ip()) } else { addr.ip().to_string() };
    let base = format!("https://{host}:{}/v1", addr.port());
    let cert = dir.join("cert.pem");
    let cert = cert.display();
    let dir = dir.display();
    println!(
        r#"
Salus is serving {model} at {base} (TLS, self-signed certificate {cert}).
Development API key for principal "dev" (valid 24 h, shown once):

  export SALUS_API_KEY={key}

curl:
  curl --cacert {cert} {base}/chat/completions \
    -H "Authorization: Bearer $SALUS_API_KEY" -H "Content-Type: application/json" \
    -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "Say hello in five words."}}], "max_tokens": 32}}'

Python (pip install openai):
  python3 - <<'PY'
import os, ssl, httpx, openai
client = openai.OpenAI(base_url="{base}", api_key=os.environ["SALUS_API_KEY"],
                       http_client=httpx.Client(verify=ssl.create_default_context(cafile="{cert}")))
r = client.chat.completions.create(model="{model}", max_tokens=32,
                                   messages=[{{"role": "user", "content": "Say hello in five words."}}])
print(r.choices[0].message.content)
PY

Audit trail (every request is recorded; no prompt or completion text):
  salus audit query --dir {dir}/audit --key file:{dir}/audit.key
"#
    );
}
