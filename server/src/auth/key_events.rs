//! `admin.key_created` / `admin.key_revoked`: what changed in the API key store.
//!
//! Keys are managed with `salus keys` on the key-store file, often while a
//! server runs. That server holds the trail's lock, so the CLI cannot write to
//! the trail then; instead the server records the change when it reloads the
//! store (it notices a changed file within a second, and on SIGHUP), by diffing
//! the store it had against the one it loads. When no server holds the trail,
//! `salus keys` records the change itself. A change nobody recorded (a server
//! killed before it noticed) is recorded at the next start from the trail's
//! key baseline ([`super::key_baseline`]). Either way the events are built
//! here, from key ids, principal ids, kinds, roles and times: never a key or a
//! key hash.

use serde_json::json;

use salus_audit::{AuditEvent, AuditPrincipal, EventKind};

use super::store::{format_time, KeyRecord, KeyStore};

/// The events for the difference between two versions of the key store:
/// `admin.key_created` for each key id only in `new`, `admin.key_revoked` for
/// each key revoked in `new` but not in `old`, and for each key id that
/// disappeared from the file (`detail.removed = true`). `actor` is who changed
/// the store, as far as the recorder knows; `operation` says how it was noticed.
pub fn key_store_events(
    old: &KeyStore,
    new: &KeyStore,
    actor: &AuditPrincipal,
    operation: &'static str,
) -> Vec<AuditEvent> {
    let mut out = Vec::new();
    for k in &new.keys {
        match old.keys.iter().find(|o| o.id == k.id) {
            None => {
                out.push(key_event(EventKind::AdminKeyCreated, k, actor, operation));
                if k.revoked.is_some() {
                    out.push(key_event(EventKind::AdminKeyRevoked, k, actor, operation));
                }
            }
            Some(o) if o.revoked.is_none() && k.revoked.is_some() => {
                out.push(key_event(EventKind::AdminKeyRevoked, k, actor, operation));
            }
            Some(_) => {}
        }
    }
    for o in &old.keys {
        if !new.keys.iter().any(|k| k.id == o.id) {
            let mut ev = key_event(EventKind::AdminKeyRevoked, o, actor, operation);
            if let Some(d) = ev.detail.as_mut() {
                d.insert("removed".into(), json!(true));
            }
            out.push(ev);
        }
    }
    out
}

/// One key event: target = key id; detail = the key's principal, kind, roles
/// and times.
pub fn key_event(kind: EventKind, k: &KeyRecord, actor: &AuditPrincipal, operation: &'static str) -> AuditEvent {
    AuditEvent::new(kind).principal(actor.clone()).operation(operation).target(k.id.clone()).detail(json!({
        "key_principal": k.principal,
        "key_principal_kind": k.kind.as_str(),
        "key_roles": k.roles.iter().map(|r| r.as_str()).collect::<Vec<_>>(),
        "key_created": format_time(k.created),
        "key_expires": k.expires.map(format_time),
        "key_revoked": k.revoked.map(format_time),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::store::{OffsetDateTime, Permission, PrincipalKind};

    #[test]
    fn diff_names_created_revoked_and_removed_keys_without_secrets() {
        let now = OffsetDateTime::now_utc();
        let mut old = KeyStore::default();
        let a = old.create("alice", PrincipalKind::Human, &[Permission::Inference], None, now).unwrap();
        let b = old.create("svc-b", PrincipalKind::Service, &[Permission::Metrics], None, now).unwrap();
        let mut new = old.clone();
        let c = new.create("carol", PrincipalKind::Human, &[Permission::Auditor], None, now).unwrap();
        new.revoke(&a.record.id, now).unwrap();
        new.keys.retain(|k| k.id != b.record.id);
        let actor = AuditPrincipal::new("ops@salus-keys", "local", Vec::<String>::new());
        let evs = key_store_events(&old, &new, &actor, "keys.reload");
        let got: Vec<(EventKind, String, bool)> = evs
            .iter()
            .map(|e| {
                let removed = e.detail.as_ref().and_then(|d| d.get("removed")).is_some();
                (e.kind(), e.target.clone().unwrap(), removed)
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (EventKind::AdminKeyRevoked, a.record.id.clone(), false),
                (EventKind::AdminKeyCreated, c.record.id.clone(), false),
                (EventKind::AdminKeyRevoked, b.record.id.clone(), true),
            ]
        );
        let text = format!("{evs:?}");
        for k in [&a, &b, &c] {
            assert!(!text.contains(&k.record.hash), "a key hash leaked into an event");
            assert!(!text.contains(&k.secret[9..]), "a key leaked into an event");
        }
        assert!(key_store_events(&new, &new, &actor, "keys.reload").is_empty());
    }
}
