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

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use salus_server::app::{app, metrics_app};
use salus_server::audit::{key_baseline, AuditEvent, AuditLog, AuditPrincipal, EventKind};
use salus_server::auth::store::{parse_expiry, OffsetDateTime};
use salus_server::auth::{KeyStore, KeyStoreHandle, PrincipalKind, Role};
use salus_server::config::{valid_model_id, Config};
use salus_server::engine::serial::SerialEngine;
use salus_server::engine::Engine;
use salus_server::metrics::Metrics;
use salus_server::scheduler::ContinuousBatchingEngine;
use salus_server::served_model::{ModelCodec, ServedModel};
use salus_server::state::{AppState, ModelInfo};
use salus_server::tls::{check_plaintext_allowed, serve, write_self_signed, ReloadableTls, TlsSettings};

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
    /// Generation engine: `batching` (continuous batching, default) or `serial`
    /// (one request at a time; a simple reference for debugging).
    #[arg(long, default_value = "batching", value_parser = ["batching", "serial"])]
    engine: String,
}

/// The default model of development setups (fetched by scripts/fetch-model.sh).
fn default_model_path() -> PathBuf {
    let dir =
        std::env::var_os("SALUS_MODEL_DIR").map(PathBuf::from).unwrap_or_else(|| home().join(".cache/salus/models"));
    dir.join("SmolLM2-135M-Instruct.Q4_1.gguf")
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
            c.model.path = Some(default_model_path());
        }
        c.model.allow_plaintext_weights = true;
        let audit_key = dir.join("audit.key");
        if !audit_key.exists() {
            salus_server::secret::write_new_key_file(&audit_key)
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
    let (config, dev_dir) = build_config(&args)?;
    salus_server::observability::init(&config.logging.format, &config.logging.level, config.logging.file.as_deref())?;
    if let Err(e) = salus_server::seal::harden_process() {
        tracing::warn!(error = %e, "process hardening incomplete");
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
    let audit_cfg = config.audit.to_audit_config()?;
    let audit_dir = audit_cfg.dir.clone();
    let audit =
        AuditLog::open(audit_cfg).with_context(|| format!("opening the audit trail {}", audit_dir.display()))?;
    tracing::info!(dir = %audit_dir.display(), "audit trail open");
    let result = run_with_audit(&args, config, dev_dir, addr, tls, audit.clone());
    // server.stopped + final checkpoint, also when start-up failed after opening the trail.
    let closed = audit.close().context("closing the audit trail");
    result.and(closed)
}

/// The operator acting at start-up (for admin events written by `serve`).
fn local_operator() -> AuditPrincipal {
    AuditPrincipal::new("salus-serve", "local", Vec::<String>::new())
}

fn run_with_audit(
    args: &ServeArgs,
    config: Config,
    dev_dir: Option<PathBuf>,
    addr: std::net::SocketAddr,
    tls: Option<Arc<ReloadableTls>>,
    audit: AuditLog,
) -> anyhow::Result<()> {
    // API keys.
    let mut dev_key = None;
    if args.dev {
        let now = OffsetDateTime::now_utc();
        let mut store = KeyStore::load(&config.auth.api_keys)?;
        // First the trail learns the store as it is (what the baseline lacks),
        // so that below the development key is recorded once, as serve.dev_key.
        key_baseline::reconcile(&audit, &store)
            .context("recording key-store changes the audit trail had missed (keys.startup_reconcile)")?;
        let new = store.create(
            "dev",
            PrincipalKind::Human,
            &[Role::Inference, Role::Metrics],
            Some(parse_expiry("24h", now)?),
            now,
        )?;
        store.save(&config.auth.api_keys)?;
        audit
            .record_blocking(
                AuditEvent::new(EventKind::AdminKeyCreated)
                    .principal(local_operator())
                    .operation("serve.dev_key")
                    .target(new.record.id.clone()),
            )
            .context("recording admin.key_created in the audit trail")?;
        // The key's creation is durable: the baseline may include it.
        key_baseline::note_recorded(&audit, &store).context("writing the audit trail's key baseline")?;
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

    // The model.
    let model_path = config.model.path.clone().context("model.path is not set (use --model PATH)")?;
    let model_id = config.model.id.clone().unwrap_or_else(|| ServedModel::default_id(&model_path));
    if !valid_model_id(&model_id) {
        bail!("model id derived from the file name is unusable; set model.id");
    }
    let started = std::time::Instant::now();
    let served = ServedModel::load(&config.model)?;
    tracing::info!(
        model = %model_id,
        fingerprint = %served.fingerprint,
        sealed = served.sealed,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "model loaded"
    );
    audit
        .record_blocking(
            AuditEvent::new(EventKind::AdminModelLoaded)
                .principal(local_operator())
                .operation("serve.load_model")
                .model(model_id.clone(), served.fingerprint.clone())
                .target(model_id.clone()),
        )
        .context("recording admin.model_loaded in the audit trail")?;
    let engine: Arc<dyn Engine> = match args.engine.as_str() {
        "serial" => Arc::new(SerialEngine::start(
            served.lm.clone(),
            config.scheduler.max_waiting,
            Duration::from_secs(config.scheduler.retry_after_secs),
        )),
        _ => Arc::new(ContinuousBatchingEngine::start(served.lm.clone(), config.scheduler.clone())?),
    };
    let created = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let state = AppState::new(
        engine,
        Arc::new(ModelCodec::new(served.lm.clone())),
        keys.clone(),
        Arc::new(Metrics::new(&model_id)),
        ModelInfo { id: model_id.clone(), created, fingerprint: served.fingerprint.clone(), sealed: served.sealed },
        config.limits.clone(),
        audit.clone(),
    );

    let at_exit = (model_id.clone(), served.fingerprint.clone(), keys.clone());
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let shutdown = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|v| *v).await;
        };
        let handshake = Duration::from_secs(config.server.handshake_timeout_secs);
        let drain = Duration::from_secs(config.server.shutdown_timeout_secs);
        let mut metrics_task = None;
        if let Some(m) = &config.server.metrics_listen {
            let maddr: std::net::SocketAddr = m.parse()?;
            let ml = tokio::net::TcpListener::bind(maddr).await.with_context(|| format!("binding {maddr}"))?;
            let fut = serve(ml, metrics_app(state.clone()), None, handshake, drain, shutdown(stop_rx.clone()));
            metrics_task = Some(tokio::spawn(fut));
            tracing::info!(addr = %maddr, "metrics listener (plain HTTP, loopback)");
        }
        tracing::info!(listen = %addr, tls = tls.is_some(), mtls = config.tls.client_ca.is_some(), "salus is serving");
        if let (Some(key), Some(dir)) = (&dev_key, &dev_dir) {
            print_examples(addr, dir, &model_id, key);
        }
        let signals = tokio::spawn(handle_signals(state.clone(), tls.clone(), keys.clone(), stop_tx));
        serve(listener, app(state.clone()), tls, handshake, drain, shutdown(stop_rx)).await;
        if let Some(t) = metrics_task {
            let _ = t.await;
        }
        signals.abort();
        tracing::info!("salus stopped");
        anyhow::Ok(())
    })?;
    // Anything still running (requests past the drain timeout) is dropped with the runtime.
    runtime.shutdown_timeout(Duration::from_secs(1));
    // A key-store change made since the last check is still recorded.
    let (model_id, fingerprint, keys) = at_exit;
    keys.refresh();
    audit
        .record_blocking(
            AuditEvent::new(EventKind::AdminModelUnloaded)
                .principal(local_operator())
                .operation("serve.shutdown")
                .model(model_id.clone(), fingerprint)
                .target(model_id),
        )
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
            _ = key_check.tick() => keys.refresh(),
            _ = hup.recv() => {
                let mut tls_state = "not_configured";
                if let Some(t) = &tls {
                    match t.reload() {
                        Ok(()) => {
                            tls_state = "reloaded";
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
                let ev = salus_server::audit::admin::config_reloaded(local_operator(), tls_state, keys_state);
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
