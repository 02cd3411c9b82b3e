//! `salus keys create|list|revoke`: manage the API key store named in the config.
//!
//! `create` prints the new key — once — alone on standard output (so scripts can
//! capture it); everything else goes to standard error.
//!
//! Every change is an `admin.key_created` / `admin.key_revoked` audit event
//! (key id, principal, kind, roles, times; never key material). When an audit
//! trail is configured (`[audit]` in `--config`, or `--audit-dir`/`--audit-key`):
//! * if no server holds it, this command records the events itself (in a short
//!   session bracketed by `server.started`/`server.stopped` with
//!   `detail.session = "salus keys"`) before the store is written, and then
//!   advances the trail's key baseline (`keys.recorded`); a change the baseline
//!   lacks (made while a server ran that was killed before it noticed) is
//!   recorded first, as `keys.startup_reconcile`;
//! * if a running server holds it, the store is written and that server records
//!   the events when it reloads the store (it checks the file every second);
//! * if it cannot be opened for any other reason, nothing is changed (fail closed).
//!
//! Without a configured trail the change is made and a note says it is not audited.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};
use salus_audit::{AuditError, AuditLog, AuditLogSettings};
use salus_server::admin_events::local_operator;
use salus_server::auth::key_baseline;
use salus_server::auth::key_events::key_store_events;
use salus_server::auth::policy::LimitSpec;
use salus_server::auth::store::{format_time, parse_expiry, OffsetDateTime};
use salus_server::auth::{KeyStore, Permission, PrincipalKind};
use salus_server::config::Config;

#[derive(Args)]
pub struct KeysArgs {
    /// Config file naming the key store ([auth] api_keys).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// The key store file (overrides the config).
    #[arg(long, global = true)]
    api_keys: Option<PathBuf>,
    /// Audit trail directory (overrides audit.dir of the config).
    #[arg(long, global = true)]
    audit_dir: Option<PathBuf>,
    /// Audit master key source, file:PATH / env:NAME / cmd:PROGRAM (overrides audit.key).
    #[arg(long, global = true)]
    audit_key: Option<String>,
    #[command(subcommand)]
    command: KeysCommand,
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Creates a key for a principal and prints it once.
    Create {
        /// Principal id (1-64 characters: A-Z a-z 0-9 . _ - @).
        #[arg(long)]
        principal: String,
        /// human or service.
        #[arg(long)]
        kind: String,
        /// inference, admin, audit.read, metrics, review or break_glass; repeat for several.
        #[arg(long = "role", required = true)]
        roles: Vec<String>,
        /// Expiry: a duration from now (90d, 12h, 30m) or an RFC 3339 time.
        #[arg(long)]
        expires: Option<String>,
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// Lists keys (ids, principals, roles, status; never key material).
    List,
    /// Revokes a key by key id, or every key of a principal by principal id.
    Revoke {
        /// Key id (key_…) or principal id.
        id: String,
    },
}

/// A key's own limits (unset: `[auth.limits]` of the server's config).
#[derive(Args)]
struct LimitArgs {
    /// Requests per minute (token bucket).
    #[arg(long)]
    requests_per_minute: Option<u32>,
    /// Prompt + completion tokens per minute, charged as generated.
    #[arg(long)]
    tokens_per_minute: Option<u64>,
    /// Inference requests in flight at once.
    #[arg(long)]
    concurrent_requests: Option<u32>,
    /// A source network the key may be used from (CIDR); repeat for several.
    #[arg(long = "allow-cidr")]
    allowed_cidrs: Vec<String>,
}

impl LimitArgs {
    fn spec(&self) -> anyhow::Result<LimitSpec> {
        let nets = self
            .allowed_cidrs
            .iter()
            .map(|c| c.parse::<ipnet::IpNet>().map_err(|_| anyhow::anyhow!("--allow-cidr {c}: not a CIDR network")))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(LimitSpec {
            requests_per_minute: self.requests_per_minute,
            tokens_per_minute: self.tokens_per_minute,
            concurrent_requests: self.concurrent_requests,
            allowed_cidrs: (!nets.is_empty()).then_some(nets),
        })
    }
}

/// A key's own limits, for `list` (unset ones are the server's defaults).
fn limits_text(l: &LimitSpec) -> String {
    let mut parts = Vec::new();
    if let Some(n) = l.requests_per_minute {
        parts.push(format!("{n} req/min"));
    }
    if let Some(n) = l.tokens_per_minute {
        parts.push(format!("{n} tok/min"));
    }
    if let Some(n) = l.concurrent_requests {
        parts.push(format!("{n} concurrent"));
    }
    if let Some(nets) = &l.allowed_cidrs {
        parts.push(format!("from {}", nets.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(",")));
    }
    parts.join("; ")
}

/// The key store path and, if one is configured, the audit trail.
fn settings(args: &KeysArgs) -> anyhow::Result<(PathBuf, Option<AuditLogSettings>)> {
    let mut config = Config::load(args.config.as_deref(), std::env::vars())?;
    if let Some(p) = &args.api_keys {
        config.auth.api_keys = p.clone();
    }
    if let Some(d) = &args.audit_dir {
        config.audit.dir = d.clone();
    }
    if let Some(k) = &args.audit_key {
        config.audit.key = Some(k.clone());
    }
    let audit = match config.audit.key {
        Some(_) => Some(config.audit.to_log_settings()?),
        None => None,
    };
    Ok((config.auth.api_keys, audit))
}

/// Writes the changed store, recording the change in the audit trail as the
/// module documentation describes.
fn save_audited(
    path: &Path,
    old: &KeyStore,
    new: &KeyStore,
    audit: Option<AuditLogSettings>,
    operation: &'static str,
) -> anyhow::Result<()> {
    let Some(cfg) = audit else {
        new.save(path).with_context(|| "saving the key store")?;
        eprintln!("note: no audit trail configured (--audit-dir/--audit-key or [audit] in --config): this change is not audited");
        return Ok(());
    };
    let dir = cfg.dir.clone();
    match AuditLog::open_tool(cfg, "salus keys") {
        Ok(log) => {
            // Order, all while we hold the trail (its LOCK, so no server can
            // start and reconcile in between):
            // 1. record what the store holds that the baseline lacks, durably;
            // 2. record this change, durably;
            // 3. save the store;
            // 4. write the baseline for the new store;
            // then close. A crash after 2 leaves a recorded change that was not
            // made (the store is unchanged); after 3 the baseline is old and the
            // next start records the change again. A duplicate at worst, never
            // a change missing from the trail.
            let result = (|| -> anyhow::Result<()> {
                let in_trail =
                    || format!("recording the change in the audit trail {}; key store unchanged", dir.display());
                key_baseline::reconcile(&log, old).with_context(in_trail)?;
                let actor = local_operator("salus-keys");
                key_store_events(old, new, &actor, operation)
                    .into_iter()
                    .try_for_each(|ev| log.record_blocking(ev).map(drop))
                    .with_context(in_trail)?;
                new.save(path).with_context(|| "saving the key store (the change is already in the audit trail)")?;
                if let Err(e) = key_baseline::note_recorded(&log, new) {
                    // The change is recorded and made; only a duplicate record
                    // at the next start follows.
                    eprintln!("warning: {e}: the next server start records this change again");
                }
                Ok(())
            })();
            let closed = log.close();
            result?;
            if let Err(e) = closed {
                // The change is recorded and made (and a new key must still be
                // shown); the next open of the trail records the unclean end.
                eprintln!("warning: closing the audit trail {}: {e}", dir.display());
            }
            eprintln!("recorded in the audit trail {}", dir.display());
        }
        Err(AuditError::Locked(_)) => {
            new.save(path).with_context(|| "saving the key store")?;
            eprintln!(
                "the audit trail {} is held by a running server: it records this change when it reloads the key store (within a second)",
                dir.display()
            );
        }
        Err(e) => {
            return Err(anyhow::Error::new(e))
                .with_context(|| format!("opening the audit trail {}; key store unchanged", dir.display()))
        }
    }
    Ok(())
}

pub fn run(args: KeysArgs) -> anyhow::Result<()> {
    let (path, audit) = settings(&args)?;
    let now = OffsetDateTime::now_utc();
    match args.command {
        KeysCommand::Create { principal, kind, roles, expires, limits } => {
            let kind = PrincipalKind::parse(&kind)?;
            let roles = roles.iter().map(|r| Permission::parse(r)).collect::<Result<Vec<_>, _>>()?;
            let expires = expires.map(|e| parse_expiry(&e, now)).transpose()?;
            let limits = limits.spec()?;
            let mut store = KeyStore::load(&path)?;
            let old = store.clone();
            let mut new = store.create(&principal, kind, &roles, expires, now)?;
            store.set_limits(&new.record.id, limits)?;
            new.record = store.keys.last().cloned().expect("the key just created");
            save_audited(&path, &old, &store, audit, "keys.create")?;
            eprintln!(
                "created key {} for {} {} (roles: {}; expires: {}) in {}",
                new.record.id,
                new.record.kind.as_str(),
                new.record.principal,
                new.record.roles.iter().map(|r| r.as_str()).collect::<Vec<_>>().join(","),
                new.record.expires.map(format_time).unwrap_or_else(|| "never".into()),
                path.display()
            );
            eprintln!("the key is shown only now; store it in a secret manager:");
            println!("{}", new.secret.as_str());
        }
        KeysCommand::List => {
            let store = KeyStore::load(&path)?;
            println!(
                "{:<22} {:<24} {:<8} {:<30} {:<9} {:<21} LIMITS",
                "KEY ID", "PRINCIPAL", "KIND", "ROLES", "STATUS", "EXPIRES"
            );
            for k in &store.keys {
                let status = if k.revoked.is_some() {
                    "revoked"
                } else if !k.is_active(now) {
                    "expired"
                } else {
                    "active"
                };
                println!(
                    "{:<22} {:<24} {:<8} {:<30} {:<9} {:<21} {}",
                    k.id,
                    k.principal,
                    k.kind.as_str(),
                    k.roles.iter().map(|r| r.as_str()).collect::<Vec<_>>().join(","),
                    status,
                    k.expires.map(format_time).unwrap_or_else(|| "never".into()),
                    k.limits.as_ref().map(limits_text).unwrap_or_else(|| "defaults".into())
                );
            }
        }
        KeysCommand::Revoke { id } => {
            let mut store = KeyStore::load(&path)?;
            let old = store.clone();
            let revoked = store.revoke(&id, now)?;
            if !revoked.is_empty() {
                save_audited(&path, &old, &store, audit, "keys.revoke")?;
            }
            if revoked.is_empty() {
                eprintln!("nothing to do: the matching keys were already revoked");
            }
            for k in revoked {
                eprintln!("revoked {k}");
            }
        }
    }
    Ok(())
}
