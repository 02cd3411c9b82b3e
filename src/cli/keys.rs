//! `salus keys create|list|revoke`: manage the API key store named in the config.
//!
//! `create` prints the new key — once — alone on standard output (so scripts can
//! capture it); everything else goes to standard error.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use salus_server::auth::store::{format_time, parse_expiry, OffsetDateTime};
use salus_server::auth::{KeyStore, PrincipalKind, Role};
use salus_server::config::Config;

#[derive(Args)]
pub struct KeysArgs {
    /// Config file naming the key store ([auth] api_keys).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// The key store file (overrides the config).
    #[arg(long, global = true)]
    api_keys: Option<PathBuf>,
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
        /// inference, admin, auditor or metrics; repeat for several.
        #[arg(long = "role", required = true)]
        roles: Vec<String>,
        /// Expiry: a duration from now (90d, 12h, 30m) or an RFC 3339 time.
        #[arg(long)]
        expires: Option<String>,
    },
    /// Lists keys (ids, principals, roles, status; never key material).
    List,
    /// Revokes a key by key id, or every key of a principal by principal id.
    Revoke {
        /// Key id (key_…) or principal id.
        id: String,
    },
}

fn store_path(args: &KeysArgs) -> anyhow::Result<PathBuf> {
    if let Some(p) = &args.api_keys {
        return Ok(p.clone());
    }
    let config = Config::load(args.config.as_deref(), std::env::vars())?;
    Ok(config.auth.api_keys)
}

pub fn run(args: KeysArgs) -> anyhow::Result<()> {
    let path = store_path(&args)?;
    let now = OffsetDateTime::now_utc();
    match args.command {
        KeysCommand::Create { principal, kind, roles, expires } => {
            let kind = PrincipalKind::parse(&kind)?;
            let roles = roles.iter().map(|r| Role::parse(r)).collect::<Result<Vec<_>, _>>()?;
            let expires = expires.map(|e| parse_expiry(&e, now)).transpose()?;
            let mut store = KeyStore::load(&path)?;
            let new = store.create(&principal, kind, &roles, expires, now)?;
            store.save(&path).with_context(|| "saving the key store")?;
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
            println!("{:<22} {:<24} {:<8} {:<30} {:<9} EXPIRES", "KEY ID", "PRINCIPAL", "KIND", "ROLES", "STATUS");
            for k in &store.keys {
                let status = if k.revoked.is_some() {
                    "revoked"
                } else if !k.is_active(now) {
                    "expired"
                } else {
                    "active"
                };
                println!(
                    "{:<22} {:<24} {:<8} {:<30} {:<9} {}",
                    k.id,
                    k.principal,
                    k.kind.as_str(),
                    k.roles.iter().map(|r| r.as_str()).collect::<Vec<_>>().join(","),
                    status,
                    k.expires.map(format_time).unwrap_or_else(|| "never".into())
                );
            }
        }
        KeysCommand::Revoke { id } => {
            let mut store = KeyStore::load(&path)?;
            let revoked = store.revoke(&id, now)?;
            store.save(&path).with_context(|| "saving the key store")?;
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
