//! `[audit.ship]`: continuous off-host retention — the server ships every
//! sealed segment and checkpoint to a backup destination (a directory or
//! S3-compatible storage with Object Lock) as they appear; see
//! `salus_backup::Shipper` and `crate::audit_ship`.
//!
//! Checked at start-up like every key: a bad destination, key source or
//! range is a one-line error naming the key, before the trail is opened or
//! the model loaded. A key source that does not parse is not echoed (it may
//! be a key pasted where its source belongs).

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{bad, ConfigError};

/// `[audit.ship]`. The section being present turns shipping on.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ShipConfig {
    /// `false` keeps the section but ships nothing.
    pub enabled: bool,
    /// The destination: a directory (a mounted backup volume) or `s3://BUCKET/PREFIX`.
    pub target: String,
    /// The backup key source (`file:`, `env:`, `cmd:`; as `salus backup --backup-key`).
    pub backup_key: Option<String>,
    /// Earlier backup keys, after a rotation (their data keys are rewrapped).
    pub previous_backup_keys: Vec<String>,
    /// PEM CA bundle trusted for the S3 endpoint, besides the system's roots.
    pub ca_file: Option<PathBuf>,
    /// S3 endpoint URL (S3-compatible storage); unset: `AWS_ENDPOINT_URL`, else AWS.
    pub endpoint: Option<String>,
    /// S3 region; unset: `AWS_REGION`, else us-east-1.
    pub region: Option<String>,
    /// S3 Object Lock of what is shipped: `compliance` (default), `governance` or `off`.
    pub object_lock: String,
    /// Object Lock retention in days; unset: `audit.retention_days`.
    pub retain_days: Option<u64>,
    /// Least seconds between two shipments of new checkpoints alone (a newly
    /// sealed segment ships at once).
    pub min_interval_secs: u64,
    /// Past this many seconds of lag `/ready` warns (`audit_ship_lagging`).
    pub lag_warning_secs: u64,
    /// Retry waits double from 1 s up to this many seconds.
    pub retry_max_backoff_secs: u64,
    /// At shutdown, seconds the last shipment (the final checkpoint) may take.
    pub shutdown_flush_secs: u64,
}

impl Default for ShipConfig {
    fn default() -> Self {
        ShipConfig {
            enabled: true,
            target: String::new(),
            backup_key: None,
            previous_backup_keys: Vec::new(),
            ca_file: None,
            endpoint: None,
            region: None,
            object_lock: "compliance".into(),
            retain_days: None,
            min_interval_secs: 60,
            lag_warning_secs: 900,
            retry_max_backoff_secs: 60,
            shutdown_flush_secs: 10,
        }
    }
}

/// Parses a key source without echoing it.
pub(crate) fn key_source(key: &'static str, v: &str) -> Result<salus_sensitive::secret::KeySource, ConfigError> {
    v.parse().map_err(|_| {
        bad(key, "not a key source (expected file:PATH, env:NAME or cmd:PROGRAM [ARGS]; the value is not shown)")
    })
}

impl ShipConfig {
    /// Checks every key (keys are loaded and the destination opened when the
    /// shipper starts). `audit` is the enclosing `[audit]` section.
    pub fn validate(&self, audit: &super::AuditConfig) -> Result<(), ConfigError> {
        if !self.enabled {
            return Ok(());
        }
        let t = self.target.as_str();
        if t.is_empty() {
            return Err(bad(
                "audit.ship.target",
                "must be set: a directory or s3://BUCKET/PREFIX (as `salus backup create --to`)",
            ));
        }
        if let Some(rest) = t.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            let prefix_ok = prefix.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b));
            if bucket.is_empty() || !prefix_ok {
                return Err(bad("audit.ship.target", "expected s3://BUCKET/PREFIX (the prefix: A-Z a-z 0-9 . _ - /)"));
            }
        } else if t.contains("://") {
            return Err(bad("audit.ship.target", "expected a directory or s3://BUCKET/PREFIX"));
        } else {
            let abs = |p: &std::path::Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
            if abs(std::path::Path::new(t)).starts_with(abs(&audit.dir)) {
                return Err(bad("audit.ship.target", "must not be inside audit.dir (the copy belongs off the host)"));
            }
        }
        let Some(k) = &self.backup_key else {
            return Err(bad(
                "audit.ship.backup_key",
                "must be set: file:PATH, env:NAME or cmd:PROGRAM (create one with `salus backup keygen PATH`)",
            ));
        };
        key_source("audit.ship.backup_key", k)?;
        for k in &self.previous_backup_keys {
            key_source("audit.ship.previous_backup_keys", k)?;
        }
        if !matches!(self.object_lock.as_str(), "compliance" | "governance" | "off") {
            return Err(bad("audit.ship.object_lock", "must be \"compliance\", \"governance\" or \"off\""));
        }
        if let Some(d) = self.retain_days {
            if !(1..=36_500).contains(&d) {
                return Err(bad("audit.ship.retain_days", "must be 1 to 36500"));
            }
        }
        if let Some(e) = &self.endpoint {
            if !(e.starts_with("https://") || e.starts_with("http://")) || e.chars().any(|c| c.is_whitespace()) {
                return Err(bad("audit.ship.endpoint", "must be an https:// URL"));
            }
        }
        if self.region.as_ref().is_some_and(|r| r.is_empty() || !r.bytes().all(|b| b.is_ascii_graphic())) {
            return Err(bad("audit.ship.region", "must be a region name such as eu-central-1"));
        }
        if self.ca_file.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
            return Err(bad("audit.ship.ca_file", "must not be empty"));
        }
        for (key, v, max) in [
            ("audit.ship.min_interval_secs", self.min_interval_secs, 86_400),
            ("audit.ship.lag_warning_secs", self.lag_warning_secs, 30 * 86_400),
            ("audit.ship.retry_max_backoff_secs", self.retry_max_backoff_secs, 3600),
        ] {
            if !(1..=max).contains(&v) {
                return Err(bad(key, format!("must be 1 to {max}")));
            }
        }
        if self.shutdown_flush_secs > 300 {
            return Err(bad("audit.ship.shutdown_flush_secs", "must be at most 300"));
        }
        Ok(())
    }
}

impl ShipConfig {
    /// The shipper's settings, with the audit key and backup keys loaded
    /// (errors name the key); `None` when `enabled = false`.
    pub fn to_settings(
        &self,
        audit: &super::AuditConfig,
        instance: &str,
    ) -> Result<Option<salus_backup::ShipSettings>, ConfigError> {
        if !self.enabled {
            return Ok(None);
        }
        self.validate(audit)?;
        let load = |key: &'static str, v: &str| key_source(key, v)?.load().map_err(|e| bad(key, e.to_string()));
        let audit_key = load("audit.key", audit.key.as_deref().ok_or_else(|| bad("audit.key", "not set"))?)?;
        let backup_key = load("audit.ship.backup_key", self.backup_key.as_deref().unwrap_or_default())?;
        let previous = self
            .previous_backup_keys
            .iter()
            .map(|k| load("audit.ship.previous_backup_keys", k))
            .collect::<Result<Vec<_>, _>>()?;
        let days = u32::try_from(self.retain_days.unwrap_or(audit.retention_days))
            .map_err(|_| bad("audit.ship.retain_days", "too large"))?;
        let object_lock = match self.object_lock.as_str() {
            "governance" => salus_backup::ObjectLock::Governance { days },
            "off" => salus_backup::ObjectLock::Off,
            _ => salus_backup::ObjectLock::Compliance { days },
        };
        let mut s = salus_backup::ShipSettings::new(&self.target, &audit.dir, audit_key, backup_key);
        s.target_options = salus_backup::TargetOptions {
            object_lock,
            ca_file: self.ca_file.clone(),
            endpoint: self.endpoint.clone(),
            region: self.region.clone(),
        };
        s.previous_backup_keys = previous;
        s.instance = instance.to_string();
        s.min_interval = Duration::from_secs(self.min_interval_secs);
        s.lag_warning = Duration::from_secs(self.lag_warning_secs);
        s.retry_max_backoff = Duration::from_secs(self.retry_max_backoff_secs);
        s.shutdown_flush = Duration::from_secs(self.shutdown_flush_secs);
        Ok(Some(s))
    }
}

impl super::AuditConfig {
    /// The shipper's settings, when `[audit.ship]` is present and enabled.
    pub fn ship_settings(&self, instance: &str) -> Result<Option<salus_backup::ShipSettings>, ConfigError> {
        match &self.ship {
            Some(s) => s.to_settings(self, instance),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::Config;
    use super::*;

    fn env(v: &str) -> Vec<(String, String)> {
        vec![("SALUS_AUDIT__SHIP".to_string(), v.to_string())]
    }

    #[test]
    fn section_from_the_environment_with_defaults() {
        let v =
            r#"{target = "s3://evidence/site-a", backup_key = "file:/etc/salus/backup.key", lag_warning_secs = 60}"#;
        let c = Config::load(None, env(v)).unwrap();
        c.validate().unwrap();
        let s = c.audit.ship.as_ref().unwrap();
        assert_eq!((s.target.as_str(), s.object_lock.as_str()), ("s3://evidence/site-a", "compliance"));
        assert_eq!((s.lag_warning_secs, s.min_interval_secs, s.retain_days), (60, 60, None));
        assert!(Config::default().audit.ship.is_none(), "no section: no shipping");
    }

    #[test]
    fn the_commented_example_in_the_shipped_config_is_valid() {
        let text = include_str!("../../../configs/salus.toml");
        let start = text.find("# [audit.ship]").expect("the [audit.ship] example");
        let block: Vec<&str> = text[start..]
            .lines()
            .take_while(|l| l.starts_with('#'))
            .map(|l| l.trim_start_matches('#').trim_start())
            .filter(|l| {
                *l == "[audit.ship]"
                    || l.split_once(" = ").is_some_and(|(k, _)| k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
            })
            .collect();
        assert!(block.len() >= 10, "{block:?}");
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("salus.toml");
        std::fs::write(&path, block.join("\n")).unwrap();
        let c = Config::load(Some(&path), Vec::new()).unwrap();
        c.validate().unwrap();
        assert_eq!(c.audit.ship.unwrap().target, "s3://evidence-bucket/salus/gw-1");
    }

    #[test]
    fn settings_load_the_keys_and_default_the_retention() {
        let tmp = tempfile::tempdir().unwrap();
        let (ak, bk) = (tmp.path().join("audit.key"), tmp.path().join("backup.key"));
        salus_sensitive::secret::write_new_key_file(&ak).unwrap();
        let backup = salus_sensitive::secret::write_new_key_file(&bk).unwrap();
        let v = format!(r#"{{target = "s3://b/p", backup_key = "file:{}", region = "eu-central-1"}}"#, bk.display());
        let mut c = Config::load(None, env(&v)).unwrap();
        c.audit.key = Some(format!("file:{}", ak.display()));
        c.audit.retention_days = 30;
        let s = c.audit.ship_settings("gw-1").unwrap().unwrap();
        assert_eq!(s.target_options.object_lock, salus_backup::ObjectLock::Compliance { days: 30 });
        assert_eq!(s.target_options.region.as_deref(), Some("eu-central-1"));
        assert_eq!((s.backup_key.key_id(), s.instance.as_str()), (backup.key_id(), "gw-1"));
        assert_eq!(s.lag_warning, Duration::from_secs(900));
        // A key that cannot be loaded names its key.
        c.audit.ship.as_mut().unwrap().backup_key = Some(format!("file:{}", tmp.path().join("none").display()));
        let e = c.audit.ship_settings("gw-1").unwrap_err().to_string();
        assert!(e.contains("audit.ship.backup_key"), "{e}");
        c.audit.ship.as_mut().unwrap().enabled = false;
        assert!(c.audit.ship_settings("gw-1").unwrap().is_none());
    }

    #[test]
    fn bad_values_name_their_key_and_never_echo_a_key() {
        let k = r#"backup_key = "file:/k""#;
        let cases: Vec<(String, &str)> = vec![
            (format!("{{{k}}}"), "audit.ship.target"),
            (format!(r#"{{target = "ftp://x", {k}}}"#), "audit.ship.target"),
            (format!(r#"{{target = "s3:///p", {k}}}"#), "audit.ship.target"),
            (format!(r#"{{target = "/var/lib/salus/audit/copy", {k}}}"#), "audit.ship.target"),
            (r#"{target = "/backup"}"#.into(), "audit.ship.backup_key"),
            (r#"{target = "/backup", backup_key = "c2VjcmV0LWtleS1tYXRlcmlhbA=="}"#.into(), "audit.ship.backup_key"),
            (format!(r#"{{target = "/backup", {k}, object_lock = "legal"}}"#), "audit.ship.object_lock"),
            (format!(r#"{{target = "/backup", {k}, retain_days = 0}}"#), "audit.ship.retain_days"),
            (format!(r#"{{target = "/backup", {k}, endpoint = "minio:9000"}}"#), "audit.ship.endpoint"),
            (format!(r#"{{target = "/backup", {k}, lag_warning_secs = 0}}"#), "audit.ship.lag_warning_secs"),
            (format!(r#"{{target = "/backup", {k}, min_interval_secs = 0}}"#), "audit.ship.min_interval_secs"),
            (
                format!(r#"{{target = "/backup", {k}, retry_max_backoff_secs = 0}}"#),
                "audit.ship.retry_max_backoff_secs",
            ),
            (format!(r#"{{target = "/backup", {k}, shutdown_flush_secs = 301}}"#), "audit.ship.shutdown_flush_secs"),
        ];
        for (v, key) in &cases {
            let c = Config::load(None, env(v)).unwrap();
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(key), "{v}: {e}");
            assert!(!e.contains("c2VjcmV0"), "the value was echoed: {e}");
        }
        let e = Config::load(None, env(r#"{target = "/b", tarket = 1}"#)).unwrap_err().to_string();
        assert!(e.contains("tarket"), "unknown keys are refused: {e}");
        let off = Config::load(None, env(r#"{enabled = false}"#)).unwrap();
        off.validate().unwrap();
    }
}
