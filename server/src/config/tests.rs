//! The configuration's parsing, overrides, defaults and validation.

use super::*;

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

#[test]
fn shipped_config_parses_and_equals_defaults_where_documented() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/salus.toml");
    let c = Config::load(Some(&path), Vec::new()).unwrap();
    c.validate().unwrap();
    assert!(c.tls.enabled);
    assert_eq!(c.limits, LimitsConfig::default());
    assert_eq!(c.scheduler, SchedulerConfig::default());
    assert_eq!(c.kernels, KernelConfig::default());
    assert_eq!(c.memory.lock, MemoryLock::BestEffort);
    assert_eq!((c.server.idle_timeout_secs, c.server.max_connections), (60, 4096));
    assert_eq!(c.auth.denial_record_interval_secs, AuthConfig::default().denial_record_interval_secs);
    assert_eq!(c.audit.denial_reserve_bytes, AuditConfig::default().denial_reserve_bytes);
    assert_eq!(c.audit.retention_days, 2192);
    let auth = AuthConfig::default();
    assert_eq!(
        (&c.auth.sessions, &c.auth.limits, &c.auth.break_glass),
        (&auth.sessions, &auth.limits, &auth.break_glass)
    );
    assert!(c.auth.oidc.is_empty(), "the shipped [[auth.oidc]] is an example, commented out");
}

#[test]
fn env_overrides_file_and_types_are_parsed() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.toml");
    std::fs::write(&p, "[server]\nlisten = \"127.0.0.1:1\"\n[limits]\nmax_n = 2\n").unwrap();
    let c = Config::load(
        Some(&p),
        env(&[
            ("SALUS_SERVER__LISTEN", "127.0.0.1:9999"),
            ("SALUS_LIMITS__MAX_TOKENS", "77"),
            ("SALUS_TLS__ENABLED", "false"),
            ("SALUS_MODEL__PATH", "/m/model.gguf"),
            ("SALUS_MODEL_DIR", "/ignored"),
            ("PATH", "/bin"),
        ]),
    )
    .unwrap();
    assert_eq!(c.server.listen, "127.0.0.1:9999");
    assert_eq!(c.limits.max_tokens, 77);
    assert_eq!(c.limits.max_n, 2);
    assert!(!c.tls.enabled);
    assert_eq!(c.model.path.as_deref(), Some(Path::new("/m/model.gguf")));
}

#[test]
fn unknown_keys_and_bad_values_are_errors() {
    assert!(Config::load(None, env(&[("SALUS_SERVER__LISTN", "x")])).is_err());
    assert!(Config::load(None, env(&[("SALUS_NOPE__X", "1")])).is_err());
    assert!(Config::load(None, env(&[("SALUS_LIMITS__MAX_N", "many")])).is_err());
    let c = Config::load(None, env(&[("SALUS_SERVER__LISTEN", "localhost")])).unwrap();
    assert!(matches!(c.validate(), Err(ConfigError::Value { key: "server.listen", .. })));
    let c = Config::load(None, env(&[("SALUS_SERVER__METRICS_LISTEN", "0.0.0.0:9100")])).unwrap();
    assert!(c.validate().is_err());
    let c = Config::load(None, env(&[("SALUS_MODEL__ID", "bad id")])).unwrap();
    assert!(c.validate().is_err());
}

#[test]
fn audit_section_maps_and_is_required() {
    let c = Config::default();
    let e = c.audit.to_log_settings().unwrap_err().to_string();
    assert!(e.contains("audit.key"), "{e}");
    let dir = tempfile::tempdir().unwrap();
    let mut a = AuditConfig {
        dir: dir.path().join("trail"),
        key: Some("env:SALUS_TEST_AUDIT_KEY".into()),
        checkpoint_dir: Some(dir.path().join("ckpt")),
        checkpoint_every_records: 7,
        checkpoint_every_secs: 3,
        segment_max_bytes: 8192,
        segment_max_age_secs: 5,
        retention_days: 30,
        ..AuditConfig::default()
    };
    let m = a.to_log_settings().unwrap();
    assert_eq!(m.dir, dir.path().join("trail"));
    assert_eq!(m.checkpoint_dir, Some(dir.path().join("ckpt")));
    assert_eq!((m.checkpoint_every_records, m.checkpoint_every.as_secs()), (7, 3));
    assert_eq!((m.segment_max_bytes, m.segment_max_age.as_secs(), m.retention_days), (8192, 5, 30));
    a.segment_max_bytes = 100;
    assert!(a.to_log_settings().unwrap_err().to_string().contains("audit.segment_max_bytes"));
    a.segment_max_bytes = 8192;
    a.key = Some("nonsense".into());
    assert!(a.to_log_settings().unwrap_err().to_string().contains("audit.key"));
    a.key = Some("env:X".into());
    a.enabled = false;
    assert!(a.to_log_settings().unwrap_err().to_string().contains("cannot be turned off"));
    a.enabled = true;
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir(&a.dir).unwrap();
    std::fs::set_permissions(&a.dir, std::fs::Permissions::from_mode(0o705)).unwrap();
    let e = a.to_log_settings().unwrap_err().to_string();
    assert!(e.contains("audit.dir") && e.contains("accessible to other users"), "{e}");
    std::fs::set_permissions(&a.dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    assert!(a.to_log_settings().is_ok());
}

#[test]
fn scheduler_config_defaults_and_validation() {
    let c: SchedulerConfig = toml::from_str("").unwrap();
    assert_eq!(c, SchedulerConfig::default());
    assert_eq!(c.block_size, 16);
    assert!(c.validate().is_ok());
    let c: SchedulerConfig = toml::from_str("kv_dtype = \"f32\"\nkv_cache_fraction = 0.5\nblock_size = 32").unwrap();
    assert_eq!(KvDtype::from(c.kv_dtype), KvDtype::F32);
    assert_eq!(KvDtype::from(SchedulerConfig::default().kv_dtype), KvDtype::BF16);
    assert!(SchedulerConfig { max_prefill_tokens: Some(0), ..Default::default() }.validate().is_err());
    assert!(SchedulerConfig { max_admissions_per_step: Some(0), ..Default::default() }.validate().is_err());
    assert!(SchedulerConfig { prefix_cache_idle_secs: 0, ..Default::default() }.validate().is_err());
    let adm: SchedulerConfig = toml::from_str("max_admissions_per_step = 4").unwrap();
    assert_eq!(adm.max_admissions_per_step, Some(4));
    assert_eq!(c.capacity(), KvCapacity::FractionOfFree(0.5));
    let both = SchedulerConfig { kv_cache_bytes: Some(1), kv_cache_fraction: Some(0.1), ..Default::default() };
    assert!(both.validate().is_err());
    let zero = SchedulerConfig { block_size: 0, ..Default::default() };
    assert!(zero.validate().is_err());
    assert!(toml::from_str::<SchedulerConfig>("kv_dtype = \"f8\"").is_err());
    assert!(toml::from_str::<SchedulerConfig>("blocksize = 3").is_err());
}

#[test]
fn auth_sections_parse_from_env_and_bad_values_are_errors() {
    let oidc = r#"[{alias = "kc", issuer = "https://kc/realms/h", audience = ["salus", "salus-ui"], jwks_uri = "https://kc/certs", roles = {clinician = {permissions = ["inference", "audit.read"], limits = {requests_per_minute = 30, allowed_cidrs = ["10.0.0.0/8", "fd00::/8"]}}}}]"#;
    let c = Config::load(
        None,
        env(&[
            ("SALUS_AUTH__OIDC", oidc),
            ("SALUS_AUTH__SESSIONS", "{idle_timeout_secs = 60}"),
            ("SALUS_AUTH__LIMITS", "{tokens_per_minute = 1000, allowed_cidrs = [\"192.168.0.0/16\"]}"),
            ("SALUS_AUTH__BREAK_GLASS", "{notify_url = \"https://sec.example/hook\"}"),
        ]),
    )
    .unwrap();
    c.validate().unwrap();
    let p = &c.auth.oidc[0];
    assert_eq!((p.audience.len(), p.principal_claim.as_str(), p.jwks_min_refresh_secs), (2, "sub", 30));
    let role = &p.roles["clinician"];
    assert_eq!(role.permissions, vec![crate::auth::Permission::Inference, crate::auth::Permission::Auditor]);
    assert_eq!(role.limits.allowed_cidrs.as_ref().map(Vec::len), Some(2));
    assert_eq!((c.auth.sessions.idle_timeout_secs, c.auth.sessions.max_session_secs), (60, 43_200));
    assert_eq!(c.auth.limits.defaults().tokens_per_minute, Some(1000));
    assert_eq!(c.auth.break_glass.window_secs, 3600);
    // Each of these is refused at start-up, naming the key.
    let bad = [
        ("SALUS_AUTH__OIDC", r#"[{alias = "kc", issuer = "i", audience = "a"}]"#, "auth.oidc.jwks_uri"),
        (
            "SALUS_AUTH__OIDC",
            r#"[{alias = "kc", issuer = "i", audience = "a", jwks_uri = "http://kc/certs"}]"#,
            "auth.oidc.jwks_uri",
        ),
        ("SALUS_AUTH__OIDC", r#"[{alias = "k c", issuer = "i", audience = "a", jwks_file = "/j"}]"#, "auth.oidc.alias"),
        (
            "SALUS_AUTH__OIDC",
            r#"[{alias = "kc", issuer = "i", audience = [], jwks_file = "/j"}]"#,
            "auth.oidc.audience",
        ),
        (
            "SALUS_AUTH__OIDC",
            r#"[{alias = "kc", issuer = "i", audience = "a", jwks_file = "/j", algorithms = ["HS256"]}]"#,
            "auth.oidc.algorithms",
        ),
        (
            "SALUS_AUTH__OIDC",
            r#"[{alias = "kc", issuer = "i", audience = "a", jwks_file = "/j"}, {alias = "kc", issuer = "j", audience = "a", jwks_file = "/j"}]"#,
            "auth.oidc.alias",
        ),
        ("SALUS_AUTH__SESSIONS", "{idle_timeout_secs = 0}", "auth.sessions"),
        ("SALUS_AUTH__LIMITS", "{requests_per_minute = 0}", "auth.limits"),
        ("SALUS_AUTH__LIMITS", "{allowed_cidrs = []}", "auth.limits"),
        ("SALUS_AUTH__BREAK_GLASS", "{notify_url = \"http://sec.example/hook\"}", "auth.break_glass.notify_url"),
        ("SALUS_AUTH__BREAK_GLASS", "{window_secs = 0}", "auth.break_glass.window_secs"),
    ];
    for (var, value, key) in bad {
        let c = Config::load(None, env(&[(var, value)])).unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains(key), "{value}: {e}");
    }
    // Not a network, an unknown permission: refused while parsing.
    assert!(Config::load(None, env(&[("SALUS_AUTH__LIMITS", "{allowed_cidrs = [\"10.0.0.300/8\"]}")])).is_err());
    // A role given as its permissions alone; limits under their short names.
    let short = r#"[{alias = "kc", issuer = "i", audience = "a", jwks_file = "/j", role_map = {doc = ["inference", "break_glass"], x = {permissions = ["review"], limits = {rpm = 5}}}}]"#;
    let c = Config::load(None, env(&[("SALUS_AUTH__OIDC", short)])).unwrap();
    let roles = &c.auth.oidc[0].roles;
    assert_eq!(roles["doc"].permissions, vec![crate::auth::Permission::Inference, crate::auth::Permission::BreakGlass]);
    assert_eq!(roles["x"].limits.requests_per_minute, Some(5));
    let unknown_role =
        r#"[{alias = "kc", issuer = "i", audience = "a", jwks_file = "/j", roles = {x = {permissions = ["root"]}}}]"#;
    assert!(Config::load(None, env(&[("SALUS_AUTH__OIDC", unknown_role)])).is_err());
}
