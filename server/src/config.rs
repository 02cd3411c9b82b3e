//! Server configuration: one TOML file, every key overridable from the
//! environment, the main ones from command-line flags.
//!
//! Precedence, lowest first: built-in defaults → the TOML file → environment
//! variables → flags (applied by the CLI on the parsed [`Config`]).
//!
//! Environment scheme: `SALUS_<SECTION>__<KEY>` (double underscore between the
//! section and the key, case-insensitive), e.g. `SALUS_SERVER__LISTEN=0.0.0.0:8443`
//! or `SALUS_LIMITS__MAX_TOKENS=512`. The value is read as a TOML value when it
//! parses as one (`true`, `42`, `"text"`, `["a","b"]`) and as a plain string
//! otherwise. Variables without `__` (such as `SALUS_MODEL_DIR`) are not config
//! keys and are ignored. Unknown sections or keys are errors, in the file and in
//! the environment, so a typo never silently falls back to a default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use crate::scheduler::SchedulerConfig;

/// Errors loading the configuration. They name the file or variable and the key;
/// configuration is operator data, never request data.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file cannot be read.
    #[error("config file {path}: {reason}")]
    Read { path: String, reason: String },
    /// The file (or an override) is not valid TOML or has a wrong key/type.
    #[error("config {origin}: {reason}")]
    Invalid { origin: String, reason: String },
    /// A value is out of range or inconsistent with another.
    #[error("config key {key}: {reason}")]
    Value { key: &'static str, reason: String },
}

/// The whole configuration.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub tls: TlsConfig,
    pub auth: AuthConfig,
    pub model: ModelConfig,
    pub limits: LimitsConfig,
    pub scheduler: SchedulerConfig,
    pub audit: AuditConfig,
    pub logging: LoggingConfig,
}

/// `[server]`: listeners and lifecycle.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address of the API listener.
    pub listen: String,
    /// Optional separate plain-HTTP listener serving only `/metrics` without
    /// authentication; must be a loopback address.
    pub metrics_listen: Option<String>,
    /// Seconds in-flight requests get to finish after SIGTERM/SIGINT.
    pub shutdown_timeout_secs: u64,
    /// Seconds a TLS handshake may take before the connection is closed.
    pub handshake_timeout_secs: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:8443".into(),
            metrics_listen: None,
            shutdown_timeout_secs: 30,
            handshake_timeout_secs: 10,
        }
    }
}

/// `[tls]`: transport security.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// TLS on (default). `false` serves plain HTTP, allowed only on loopback.
    pub enabled: bool,
    /// PEM certificate chain (leaf first).
    pub cert: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: Option<PathBuf>,
    /// PEM CA bundle; when set, clients must present a certificate it signed (mTLS).
    pub client_ca: Option<PathBuf>,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig { enabled: true, cert: None, key: None, client_ca: None }
    }
}

/// `[auth]`: API keys.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// The API key store (JSON, hashes only), managed with `salus keys`.
    pub api_keys: PathBuf,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig { api_keys: PathBuf::from("/var/lib/salus/api-keys.json") }
    }
}

/// `[model]`: the served model.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// Sealed model file, or (with `allow_plaintext_weights`) a GGUF file / HF directory.
    pub path: Option<PathBuf>,
    /// Model id clients send in `model`; defaults to the file name without extension.
    pub id: Option<String>,
    /// Key-encryption key source for sealed weights (`file:`, `env:`, `cmd:`).
    pub kek: Option<String>,
    /// Allow loading unencrypted weights (development only).
    pub allow_plaintext_weights: bool,
    /// Jinja chat template file overriding the model's own template.
    pub chat_template: Option<PathBuf>,
    /// Compute device: `cpu` or `cuda:N`.
    pub device: String,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            path: None,
            id: None,
            kek: None,
            allow_plaintext_weights: false,
            chat_template: None,
            device: "cpu".into(),
        }
    }
}

/// `[limits]`: request size limits.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest request body in bytes (413 above).
    pub max_body_bytes: usize,
    /// Most chat messages per request.
    pub max_messages: usize,
    /// Most prompt tokens per request (also bounded by the context length).
    pub max_prompt_tokens: usize,
    /// Largest `max_tokens` a client may ask for.
    pub max_tokens: usize,
    /// `max_tokens` when the client sends none (bounded by the room left in the context).
    pub default_max_tokens: usize,
    /// Largest `n`.
    pub max_n: usize,
    /// Most stop strings.
    pub max_stop: usize,
    /// Most prompts in one `/v1/completions` request.
    pub max_prompts: usize,
    /// Seconds a generation may run before it is cancelled.
    pub request_timeout_secs: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_body_bytes: 1 << 20,
            max_messages: 256,
            max_prompt_tokens: 8192,
            max_tokens: 4096,
            default_max_tokens: 512,
            max_n: 8,
            max_stop: 4,
            max_prompts: 16,
            request_timeout_secs: 600,
        }
    }
}

/// `[audit]`: the tamper-evident audit trail.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AuditConfig {
    /// Audit trail on (default). Off only for development.
    pub enabled: bool,
    /// Directory of the segment files (must not be world-readable).
    pub dir: PathBuf,
    /// Audit master key source (`file:`, `env:`, `cmd:`); encryption, HMAC and signing keys derive from it.
    pub key: Option<String>,
    /// Optional second directory for signed checkpoints (WORM mount, other host).
    pub checkpoint_dir: Option<PathBuf>,
    /// A checkpoint every this many records…
    pub checkpoint_every_records: u64,
    /// …or this many seconds, whichever comes first.
    pub checkpoint_every_secs: u64,
    /// Seal a segment at this size in bytes…
    pub segment_max_bytes: u64,
    /// …or this age in seconds.
    pub segment_max_age_secs: u64,
    /// Days sealed segments are kept (default six years).
    pub retention_days: u64,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            enabled: true,
            dir: PathBuf::from("/var/lib/salus/audit"),
            key: None,
            checkpoint_dir: None,
            checkpoint_every_records: 1000,
            checkpoint_every_secs: 60,
            segment_max_bytes: 64 << 20,
            segment_max_age_secs: 86_400,
            retention_days: 2192,
        }
    }
}

impl AuditConfig {
    /// Maps `[audit]` to the audit library's settings. The trail is required:
    /// `enabled = false` and a missing `key` are errors (Salus never serves
    /// inference without an audit trail; `salus serve --dev` sets one up in the
    /// dev directory). The directory must not be accessible to other users
    /// (checked when it exists; the log creates it with mode 0700 otherwise).
    pub fn to_audit_config(&self) -> Result<crate::audit::AuditConfig, ConfigError> {
        if !self.enabled {
            return Err(ConfigError::Value {
                key: "audit.enabled",
                reason: "the audit trail cannot be turned off: every inference must be recorded (use `salus serve --dev` for a development trail)".into(),
            });
        }
        let key = self.key.as_deref().ok_or(ConfigError::Value {
            key: "audit.key",
            reason: "not set: the audit trail needs a master key (file:PATH, env:NAME or cmd:PROGRAM; create one with `salus audit keygen PATH`), or use `salus serve --dev`".into(),
        })?;
        let key: crate::secret::KeySource = key
            .parse()
            .map_err(|e: crate::secret::SecretError| ConfigError::Value { key: "audit.key", reason: e.to_string() })?;
        if self.dir.as_os_str().is_empty() {
            return Err(ConfigError::Value { key: "audit.dir", reason: "must be set".into() });
        }
        check_not_world_accessible(&self.dir, "audit.dir")?;
        if let Some(cd) = &self.checkpoint_dir {
            check_not_world_accessible(cd, "audit.checkpoint_dir")?;
        }
        let positive = |key: &'static str, v: u64| {
            if v == 0 {
                Err(ConfigError::Value { key, reason: "must be at least 1".into() })
            } else {
                Ok(v)
            }
        };
        let mut c = crate::audit::AuditConfig::new(&self.dir, key);
        c.checkpoint_dir = self.checkpoint_dir.clone();
        c.checkpoint_every_records = positive("audit.checkpoint_every_records", self.checkpoint_every_records)?;
        c.checkpoint_every =
            std::time::Duration::from_secs(positive("audit.checkpoint_every_secs", self.checkpoint_every_secs)?);
        if self.segment_max_bytes < 4096 {
            return Err(ConfigError::Value { key: "audit.segment_max_bytes", reason: "must be at least 4096".into() });
        }
        c.segment_max_bytes = self.segment_max_bytes;
        c.segment_max_age =
            std::time::Duration::from_secs(positive("audit.segment_max_age_secs", self.segment_max_age_secs)?);
        c.retention_days = u32::try_from(positive("audit.retention_days", self.retention_days)?)
            .map_err(|_| ConfigError::Value { key: "audit.retention_days", reason: "too large".into() })?;
        Ok(c)
    }
}

/// Refuses a directory that other users can read, write or enter (mode & 0o007).
/// A missing directory is fine: it is created private.
pub fn check_not_world_accessible(dir: &Path, key: &'static str) -> Result<(), ConfigError> {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::metadata(dir) {
        Ok(m) if !m.is_dir() => {
            Err(ConfigError::Value { key, reason: format!("{} is not a directory", dir.display()) })
        }
        Ok(m) if m.permissions().mode() & 0o007 != 0 => Err(ConfigError::Value {
            key,
            reason: format!(
                "{} is accessible to other users (mode {:o}); run `chmod o-rwx {}`",
                dir.display(),
                m.permissions().mode() & 0o777,
                dir.display()
            ),
        }),
        _ => Ok(()),
    }
}

/// `[logging]`: structured logs (never request text).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LoggingConfig {
    /// `text` or `json`.
    pub format: String,
    /// Level filter (`info`, `debug`, `salus_server=debug,info`…); `RUST_LOG` wins when set.
    pub level: String,
    /// Optional log file (appended; its directory must not be world-readable).
    pub file: Option<PathBuf>,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        LoggingConfig { format: "text".into(), level: "info".into(), file: None }
    }
}

impl Config {
    /// Loads `path` (if any), then applies `SALUS_…` variables from `env`.
    pub fn load(path: Option<&Path>, env: impl IntoIterator<Item = (String, String)>) -> Result<Config, ConfigError> {
        let mut table = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|e| ConfigError::Read { path: p.display().to_string(), reason: e.to_string() })?;
                toml::from_str::<toml::Table>(&text).map_err(|e| ConfigError::Invalid {
                    origin: p.display().to_string(),
                    reason: e.message().to_string(),
                })?
            }
            None => toml::Table::new(),
        };
        let mut overrides: Vec<(String, String)> =
            env.into_iter().filter(|(k, _)| k.starts_with("SALUS_") && k.contains("__")).collect();
        overrides.sort();
        for (name, value) in overrides {
            let rest = &name["SALUS_".len()..];
            let (section, key) = rest.split_once("__").expect("filtered on __");
            let (section, key) = (section.to_ascii_lowercase(), key.to_ascii_lowercase());
            if section.is_empty() || key.is_empty() || key.contains("__") {
                return Err(ConfigError::Invalid {
                    origin: name.clone(),
                    reason: "expected SALUS_<SECTION>__<KEY>".into(),
                });
            }
            let entry = table.entry(section).or_insert_with(|| toml::Value::Table(toml::Table::new()));
            let toml::Value::Table(sec) = entry else {
                return Err(ConfigError::Invalid { origin: name.clone(), reason: "section is not a table".into() });
            };
            sec.insert(key, parse_env_value(&value));
        }
        let origin = path.map(|p| p.display().to_string()).unwrap_or_else(|| "(defaults + environment)".into());
        let config: Config = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Invalid { origin, reason: e.message().to_string() })?;
        Ok(config)
    }

    /// Checks values that serde cannot (ranges, formats).
    pub fn validate(&self) -> Result<(), ConfigError> {
        parse_addr(&self.server.listen, "server.listen")?;
        if let Some(m) = &self.server.metrics_listen {
            let addr = parse_addr(m, "server.metrics_listen")?;
            if !addr.ip().is_loopback() {
                return Err(ConfigError::Value {
                    key: "server.metrics_listen",
                    reason: "the unauthenticated metrics listener must be a loopback address".into(),
                });
            }
        }
        let l = &self.limits;
        for (key, v) in [
            ("limits.max_body_bytes", l.max_body_bytes),
            ("limits.max_messages", l.max_messages),
            ("limits.max_prompt_tokens", l.max_prompt_tokens),
            ("limits.max_tokens", l.max_tokens),
            ("limits.default_max_tokens", l.default_max_tokens),
            ("limits.max_n", l.max_n),
            ("limits.max_prompts", l.max_prompts),
        ] {
            if v == 0 {
                return Err(ConfigError::Value { key, reason: "must be at least 1".into() });
            }
        }
        self.scheduler.validate().map_err(|e| ConfigError::Value { key: "scheduler", reason: e.to_string() })?;
        if !matches!(self.logging.format.as_str(), "text" | "json") {
            return Err(ConfigError::Value { key: "logging.format", reason: "must be \"text\" or \"json\"".into() });
        }
        if let Some(id) = &self.model.id {
            if !valid_model_id(id) {
                return Err(ConfigError::Value {
                    key: "model.id",
                    reason: "use 1-128 characters from A-Z a-z 0-9 . _ - : /".into(),
                });
            }
        }
        Ok(())
    }

    /// The API listener address.
    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        parse_addr(&self.server.listen, "server.listen")
    }
}

/// Model ids appear in metric labels and URLs: a fixed, harmless alphabet.
pub fn valid_model_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':' | '/'))
}

fn parse_addr(s: &str, key: &'static str) -> Result<SocketAddr, ConfigError> {
    s.parse::<SocketAddr>().map_err(|_| ConfigError::Value {
        key,
        reason: format!("'{s}' is not an IP:port address (e.g. 127.0.0.1:8443 or [::1]:8443)"),
    })
}

fn parse_env_value(value: &str) -> toml::Value {
    match toml::from_str::<toml::Table>(&format!("v = {value}")) {
        Ok(mut t) => t.remove("v").unwrap_or_else(|| toml::Value::String(value.into())),
        Err(_) => toml::Value::String(value.into()),
    }
}

#[cfg(test)]
mod tests {
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
        let e = c.audit.to_audit_config().unwrap_err().to_string();
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
        let m = a.to_audit_config().unwrap();
        assert_eq!(m.dir, dir.path().join("trail"));
        assert_eq!(m.checkpoint_dir, Some(dir.path().join("ckpt")));
        assert_eq!((m.checkpoint_every_records, m.checkpoint_every.as_secs()), (7, 3));
        assert_eq!((m.segment_max_bytes, m.segment_max_age.as_secs(), m.retention_days), (8192, 5, 30));
        a.segment_max_bytes = 100;
        assert!(a.to_audit_config().unwrap_err().to_string().contains("audit.segment_max_bytes"));
        a.segment_max_bytes = 8192;
        a.key = Some("nonsense".into());
        assert!(a.to_audit_config().unwrap_err().to_string().contains("audit.key"));
        a.key = Some("env:X".into());
        a.enabled = false;
        assert!(a.to_audit_config().unwrap_err().to_string().contains("cannot be turned off"));
        a.enabled = true;
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir(&a.dir).unwrap();
        std::fs::set_permissions(&a.dir, std::fs::Permissions::from_mode(0o705)).unwrap();
        let e = a.to_audit_config().unwrap_err().to_string();
        assert!(e.contains("audit.dir") && e.contains("accessible to other users"), "{e}");
        std::fs::set_permissions(&a.dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert!(a.to_audit_config().is_ok());
    }
}
