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

use salus_models::paged_cache::{KvCapacity, KvDtype};

mod auth;
mod forward;
pub use forward::ForwardConfig;
mod reviews;
mod ship;
mod telemetry;
pub use auth::{
    AuthConfig, BreakGlassConfig, LimitSpec, OidcProviderConfig, OidcRoleConfig, PrincipalLimitsConfig, SessionConfig,
};
pub use reviews::ReviewsConfig;
pub use salus_models::KernelConfig;
pub use ship::ShipConfig;
pub use telemetry::{OtlpProtocol, TelemetryConfig};

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
    /// Other users could write the config file (or its directory).
    #[error("config file: {0}")]
    Insecure(#[from] salus_sensitive::file_mode::FileModeError),
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
    pub kernels: KernelConfig,
    pub memory: MemoryConfig,
    pub audit: AuditConfig,
    pub logging: LoggingConfig,
    pub reviews: ReviewsConfig,
    /// `[telemetry]`: OpenTelemetry traces over OTLP (the section being present turns them on).
    pub telemetry: Option<TelemetryConfig>,
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
    /// Seconds a client has to send a request's headers (HTTP/1), also while
    /// an idle keep-alive connection waits for its next request.
    pub header_read_timeout_secs: u64,
    /// A connection with no request in flight for this many seconds is closed
    /// (HTTP/1 and HTTP/2; a streaming response counts as in flight).
    pub idle_timeout_secs: u64,
    /// Seconds between HTTP/2 keep-alive pings.
    pub http2_keepalive_interval_secs: u64,
    /// Seconds to wait for a ping's answer before closing the connection.
    pub http2_keepalive_timeout_secs: u64,
    /// Most open connections in all; more are closed at once.
    pub max_connections: usize,
    /// Most open connections from one source address; more are closed at once.
    pub max_connections_per_source: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:8443".into(),
            metrics_listen: None,
            shutdown_timeout_secs: 30,
            handshake_timeout_secs: 10,
            header_read_timeout_secs: 10,
            idle_timeout_secs: 60,
            http2_keepalive_interval_secs: 30,
            http2_keepalive_timeout_secs: 20,
            max_connections: 4096,
            max_connections_per_source: 256,
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
    /// How the model writes tool calls: `hermes`, `llama3_json` or `mistral`.
    /// Unset: detected from the chat template (a template without tools gets
    /// the generic rendering, in the Hermes format).
    pub tool_parser: Option<String>,
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
            tool_parser: None,
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
    /// Largest structured-output constraint in bytes (a JSON schema's text, a
    /// regex, a grammar, the choices together); 400 above.
    pub max_schema_bytes: usize,
    /// Milliseconds a constraint may take to compile; 400 above.
    pub grammar_compile_timeout_ms: u64,
    /// Compiled constraints kept for reuse (per principal, by exact bytes).
    pub grammar_cache_entries: usize,
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
            max_schema_bytes: 64 * 1024,
            grammar_compile_timeout_ms: 2000,
            grammar_cache_entries: 64,
        }
    }
}

/// `[scheduler]`: continuous batching and the paged KV cache.
/// KV cache storage type in the configuration (`"f32"`, `"f16"`, `"bf16"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvDtypeConfig {
    F32,
    F16,
    Bf16,
}

impl From<KvDtypeConfig> for KvDtype {
    fn from(d: KvDtypeConfig) -> KvDtype {
        match d {
            KvDtypeConfig::F32 => KvDtype::F32,
            KvDtypeConfig::F16 => KvDtype::F16,
            KvDtypeConfig::Bf16 => KvDtype::BF16,
        }
    }
}

/// Scheduler settings (the `[scheduler]` section of the server config).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SchedulerConfig {
    /// Tokens per KV block. Default 16.
    pub block_size: usize,
    /// KV cache size in bytes. Mutually exclusive with `kv_cache_fraction`;
    /// when neither is set the cache takes 1 GiB.
    pub kv_cache_bytes: Option<u64>,
    /// KV cache size as a fraction (0, 1] of the memory available at start.
    pub kv_cache_fraction: Option<f64>,
    /// KV storage type; attention always accumulates in f32. Default bf16: the
    /// type the supported model families are trained and usually served in,
    /// half the memory of f32 (twice the sequences per byte), and a faster
    /// decode step once attention is a large part of it (many long sequences).
    pub kv_dtype: KvDtypeConfig,
    /// Most tokens (decode + prefill) per forward step. Default 512.
    pub max_batch_tokens: usize,
    /// Most sequences running at once. Default 64.
    pub max_running_seqs: usize,
    /// Most sequences waiting for admission; beyond it `submit` returns
    /// `QueueFull` (HTTP 429). Default 256.
    pub max_waiting: usize,
    /// Most prompt tokens of one sequence per step (chunked prefill). Default 256.
    pub prefill_chunk: usize,
    /// Most prompt tokens of all sequences together per step. Default:
    /// [`DEFAULT_CPU_MAX_PREFILL_TOKENS`] on a CPU, `max_batch_tokens` on a GPU
    /// (see `scheduler::policy`'s module doc for why).
    pub max_prefill_tokens: Option<usize>,
    /// Most waiting sequences admitted (starting their prefill) per step.
    /// Default: [`DEFAULT_CPU_MAX_ADMISSIONS_PER_STEP`] on a CPU,
    /// `max_running_seqs` on a GPU (see `scheduler::policy`'s module doc for why).
    pub max_admissions_per_step: Option<usize>,
    /// Retry-After sent with `QueueFull`, in seconds. Default 1.
    pub retry_after_secs: u64,
    /// Reuse the K/V of prompt blocks a caller has sent before (the chat
    /// template's system prompt, fixed instructions, earlier turns) instead of
    /// recomputing them. Shared only between requests of the same principal,
    /// never across callers. Cached blocks are held in process memory until
    /// evicted (least recently used first, only when the cache needs room).
    /// Default true.
    pub prefix_cache: bool,
    /// Cached prompt blocks nobody has used for this many seconds are dropped
    /// (their token ids zeroized, their KV blocks freed), bounding how long a
    /// prompt stays reusable in memory after its last use. Default 600.
    pub prefix_cache_idle_secs: u64,
    /// Commit the KV cache's memory at start instead of on first use (CPU):
    /// a host that cannot back the configured capacity fails at start rather
    /// than under load, and serving never pays for first-touch page faults.
    /// Costs the whole cache in resident memory from the start.
    pub kv_prefault: bool,
    /// Compute the grammar masks of constrained sequences (structured outputs)
    /// on a helper thread while the forward pass runs, instead of after it.
    /// Default (unset): always on a GPU (the host idles during the pass); on a
    /// CPU only for steps with at least 4 constrained sequences (the pass
    /// already uses every core; see docs/performance.md).
    pub constraint_mask_overlap: Option<bool>,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            block_size: salus_models::paged_cache::DEFAULT_BLOCK_SIZE,
            kv_cache_bytes: None,
            kv_cache_fraction: None,
            kv_dtype: KvDtypeConfig::Bf16,
            max_batch_tokens: 512,
            max_running_seqs: 64,
            max_waiting: 256,
            prefill_chunk: 256,
            max_prefill_tokens: None,
            max_admissions_per_step: None,
            retry_after_secs: 1,
            prefix_cache: true,
            prefix_cache_idle_secs: 600,
            kv_prefault: false,
            constraint_mask_overlap: None,
        }
    }
}

/// On a CPU, with `constraint_mask_overlap` unset, grammar masks are computed
/// beside the forward pass only when a step has at least this many constrained
/// sequences.
pub const CPU_MASK_OVERLAP_MIN_SEQS: usize = 4;

/// Prompt tokens per step on a CPU when `max_prefill_tokens` is not set: a CPU
/// step is compute-bound from a few dozen rows on, so larger steps gain little
/// throughput and make every prompt in them wait for the slowest.
pub const DEFAULT_CPU_MAX_PREFILL_TOKENS: usize = 64;

/// New sequences per step on a CPU when `max_admissions_per_step` is not set:
/// sequences admitted together finish together (same `max_tokens`), and their
/// successors then arrive together, so admitting one per step keeps streams
/// staggered (see the policy's module doc and the README's measurements).
pub const DEFAULT_CPU_MAX_ADMISSIONS_PER_STEP: usize = 1;

/// Default KV cache size when none is configured.
pub const DEFAULT_KV_CACHE_BYTES: u64 = 1 << 30;

impl SchedulerConfig {
    /// Checks ranges and combinations; the message names the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Value { key: "scheduler", reason: m.to_string() });
        if self.block_size == 0 || self.block_size > 1024 {
            return bad("scheduler.block_size must be in 1..=1024");
        }
        if self.kv_cache_bytes.is_some() && self.kv_cache_fraction.is_some() {
            return bad("set only one of scheduler.kv_cache_bytes and scheduler.kv_cache_fraction");
        }
        if let Some(f) = self.kv_cache_fraction {
            if !(f > 0.0 && f <= 1.0) {
                return bad("scheduler.kv_cache_fraction must be in (0, 1]");
            }
        }
        if self.max_batch_tokens == 0 || self.max_running_seqs == 0 || self.prefill_chunk == 0 {
            return bad("scheduler.max_batch_tokens, max_running_seqs and prefill_chunk must be > 0");
        }
        if self.max_prefill_tokens == Some(0) {
            return bad("scheduler.max_prefill_tokens must be > 0");
        }
        if self.prefix_cache_idle_secs == 0 {
            return bad("scheduler.prefix_cache_idle_secs must be > 0 (set prefix_cache = false to turn caching off)");
        }
        if self.max_admissions_per_step == Some(0) {
            return bad("scheduler.max_admissions_per_step must be > 0");
        }
        if self.max_running_seqs > self.max_batch_tokens {
            return bad("scheduler.max_running_seqs must not exceed max_batch_tokens (every running sequence decodes each step)");
        }
        Ok(())
    }

    pub(crate) fn capacity(&self) -> KvCapacity {
        match (self.kv_cache_bytes, self.kv_cache_fraction) {
            (_, Some(f)) => KvCapacity::FractionOfFree(f),
            (Some(b), None) => KvCapacity::Bytes(b),
            (None, None) => KvCapacity::Bytes(DEFAULT_KV_CACHE_BYTES),
        }
    }
}

/// `memory.lock`: whether weights and the KV cache are locked in RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemoryLock {
    /// Locked, or the server refuses to start (naming the memlock limit needed).
    Required,
    /// Locked where the memlock limit allows; otherwise a warning and a metric.
    #[default]
    BestEffort,
    /// Not locked (still excluded from core dumps).
    Off,
}

/// `[memory]`: how the host memory that holds weights and K/V is protected.
/// Both are PHI-grade, so their pages are always excluded from core dumps
/// (`MADV_DONTDUMP`, besides the process being non-dumpable) and, per `lock`,
/// locked so they are never written to swap.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MemoryConfig {
    pub lock: MemoryLock,
}

impl MemoryLock {
    /// The kernels' policy for this setting.
    pub fn policy(self) -> salus_kernels::memory::LockPolicy {
        use salus_kernels::memory::LockPolicy;
        match self {
            MemoryLock::Required => LockPolicy::Required,
            MemoryLock::BestEffort => LockPolicy::BestEffort,
            MemoryLock::Off => LockPolicy::Off,
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
    /// Below this many free bytes on the audit volume a warning is logged.
    pub low_space_warning_bytes: u64,
    /// Below this many free bytes `auth.denied` records wait (still counted),
    /// so the space left is kept for inference records.
    pub denial_reserve_bytes: u64,
    /// This replica's name in every record (`instance`, FHIR `source.site`):
    /// unique per replica and stable across restarts. Unset: the host name
    /// (a Kubernetes StatefulSet pod's is its stable pod name).
    pub instance: Option<String>,
    /// `[audit.forward]`: stream every record's metadata to a SIEM (syslog over TLS).
    pub forward: Option<ForwardConfig>,
    /// `[audit.ship]`: ship sealed segments and checkpoints off the host (backup format).
    pub ship: Option<ShipConfig>,
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
            low_space_warning_bytes: 1 << 30,
            denial_reserve_bytes: 256 << 20,
            instance: None,
            forward: None,
            ship: None,
        }
    }
}

impl AuditConfig {
    /// Maps `[audit]` to the audit library's settings. The trail is required:
    /// `enabled = false` and a missing `key` are errors (Salus never serves
    /// inference without an audit trail; `salus serve --dev` sets one up in the
    /// dev directory). The directory must not be accessible to other users
    /// (checked when it exists; the log creates it with mode 0700 otherwise).
    pub fn to_log_settings(&self) -> Result<salus_audit::AuditLogSettings, ConfigError> {
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
        let key: salus_sensitive::secret::KeySource =
            key.parse().map_err(|e: salus_sensitive::secret::SecretError| ConfigError::Value {
                key: "audit.key",
                reason: e.to_string(),
            })?;
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
        let mut c = salus_audit::AuditLogSettings::new(&self.dir, key);
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
        if let Some(name) = &self.instance {
            let ok = !name.is_empty()
                && name.len() <= 128
                && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':'));
            if !ok {
                return Err(ConfigError::Value {
                    key: "audit.instance",
                    reason: "use 1-128 characters from A-Z a-z 0-9 . _ - :".into(),
                });
            }
            c.instance = name.clone();
        }
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
    /// The denial recorder's settings (`[auth]` and `[audit]`).
    pub fn denial_settings(&self) -> crate::auth::denials::DenialSettings {
        crate::auth::denials::DenialSettings {
            interval: std::time::Duration::from_secs(self.auth.denial_record_interval_secs),
            max_sources: self.auth.denial_max_sources,
            failed_auth_burst: self.auth.failed_auth_burst,
            failed_auth_per_second: self.auth.failed_auth_per_second,
            low_space_warning_bytes: self.audit.low_space_warning_bytes,
            denial_reserve_bytes: self.audit.denial_reserve_bytes,
        }
    }

    /// Loads `path` (if any), then applies `SALUS_…` variables from `env`.
    pub fn load(path: Option<&Path>, env: impl IntoIterator<Item = (String, String)>) -> Result<Config, ConfigError> {
        let mut table = match path {
            Some(p) => {
                // Who can write the config can add a `cmd:` key source.
                salus_sensitive::file_mode::check_not_writable_by_others(p)?;
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
        let s = &self.server;
        for (key, v) in [
            ("server.handshake_timeout_secs", s.handshake_timeout_secs),
            ("server.header_read_timeout_secs", s.header_read_timeout_secs),
            ("server.idle_timeout_secs", s.idle_timeout_secs),
            ("server.http2_keepalive_interval_secs", s.http2_keepalive_interval_secs),
            ("server.http2_keepalive_timeout_secs", s.http2_keepalive_timeout_secs),
            ("server.max_connections", s.max_connections as u64),
            ("server.max_connections_per_source", s.max_connections_per_source as u64),
        ] {
            if v == 0 {
                return Err(ConfigError::Value { key, reason: "must be at least 1".into() });
            }
        }
        if s.max_connections_per_source > s.max_connections {
            return Err(ConfigError::Value {
                key: "server.max_connections_per_source",
                reason: "must not exceed server.max_connections".into(),
            });
        }
        if let Some(p) = &self.model.tool_parser {
            if salus_models::tool_calls::ToolCallFormat::from_name(p).is_none() {
                return Err(ConfigError::Value {
                    key: "model.tool_parser",
                    reason: "must be hermes, llama3_json or mistral".into(),
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
            ("limits.max_schema_bytes", l.max_schema_bytes),
            ("limits.grammar_compile_timeout_ms", l.grammar_compile_timeout_ms.min(usize::MAX as u64) as usize),
        ] {
            if v == 0 {
                return Err(ConfigError::Value { key, reason: "must be at least 1".into() });
            }
        }
        self.scheduler.validate()?;
        self.kernels.validate().map_err(|e| ConfigError::Value { key: "kernels", reason: e.to_string() })?;
        if !matches!(self.logging.format.as_str(), "text" | "json") {
            return Err(ConfigError::Value { key: "logging.format", reason: "must be \"text\" or \"json\"".into() });
        }
        self.auth.validate()?;
        if let Some(f) = &self.audit.forward {
            f.validate()?;
        }
        if let Some(s) = &self.audit.ship {
            s.validate(&self.audit)?;
        }
        self.reviews.validate()?;
        if let Some(t) = &self.telemetry {
            t.validate()?;
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

/// A value out of range or inconsistent, naming its key.
fn bad(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Value { key, reason: reason.into() }
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
mod tests;
