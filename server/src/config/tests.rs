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
