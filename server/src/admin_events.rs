//! The administrative events the server and the CLI record about themselves:
//! who acted (a local operator), the model loaded at start and unloaded at
//! shutdown, the development key `serve --dev` creates, and SIGHUP reloads.
//! Key-store changes are built beside the key store
//! ([`crate::auth::key_events`]). None of these carry request text or keys.

use salus_audit::{AuditEvent, AuditPrincipal, EventKind, Outcome};
use serde_json::json;

/// The principal of events `salus serve` writes on its own behalf.
pub fn serve_operator() -> AuditPrincipal {
    AuditPrincipal::new("salus-serve", "local", Vec::<String>::new())
}

/// The local operator running a CLI command: the OS user (`$USER`/`$LOGNAME`,
/// else the uid), kind `local`. Only a fixed, harmless alphabet is kept.
pub fn local_operator(tool: &str) -> AuditPrincipal {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .ok()
        .filter(|u| crate::auth::store::valid_principal_id(u))
        .unwrap_or_else(|| format!("uid-{}", own_uid()));
    AuditPrincipal::new(format!("{user}@{tool}"), "local", Vec::<String>::new())
}

fn own_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    // The owner of our own /proc entry is our real uid, without `unsafe`.
    std::fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(u32::MAX)
}

/// `admin.model_loaded`: the served model, with the fingerprint of its weights.
pub fn model_loaded(model_id: &str, fingerprint: &str) -> AuditEvent {
    AuditEvent::new(EventKind::AdminModelLoaded)
        .principal(serve_operator())
        .operation("serve.load_model")
        .model(model_id.to_string(), fingerprint.to_string())
        .target(model_id.to_string())
}

/// `admin.model_unloaded` at shutdown.
pub fn model_unloaded(model_id: &str, fingerprint: &str) -> AuditEvent {
    AuditEvent::new(EventKind::AdminModelUnloaded)
        .principal(serve_operator())
        .operation("serve.shutdown")
        .model(model_id.to_string(), fingerprint.to_string())
        .target(model_id.to_string())
}

/// `admin.key_created` for the key `serve --dev` creates (target: its key id).
pub fn dev_key_created(key_id: &str) -> AuditEvent {
    AuditEvent::new(EventKind::AdminKeyCreated)
        .principal(serve_operator())
        .operation("serve.dev_key")
        .target(key_id.to_string())
}

/// `admin.config_reloaded` for a SIGHUP: what was reloaded (`tls`, `api_keys`:
/// `reloaded`, `failed` or `not_configured`); outcome failure if anything failed.
pub fn config_reloaded(tls: &'static str, api_keys: &'static str) -> AuditEvent {
    let mut ev = AuditEvent::new(EventKind::AdminConfigReloaded)
        .principal(serve_operator())
        .operation("sighup")
        .target("tls+api_keys")
        .detail(json!({ "tls": tls, "api_keys": api_keys }));
    if tls == "failed" || api_keys == "failed" {
        ev = ev.outcome(Outcome::Failure).outcome_reason("reload_failed");
    }
    ev
}
