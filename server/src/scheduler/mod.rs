//! Continuous batching: the [`Engine`] that packs many sequences into every
//! forward step over a paged KV cache.
//!
//! Split in two so the interesting part is testable without a model:
//! - [`policy`]: the pure scheduling policy (queues, admission by free KV blocks,
//!   preemption by recompute, the per-step token budget, chunked prefill);
//! - `worker`: a dedicated thread that owns the model and the
//!   [`PagedKvCache`], asks the policy for a plan each step, runs one packed
//!   forward pass, samples, detokenizes, applies stop conditions and streams
//!   [`GenerationEvent`]s back.
//!
//! HTTP handlers only see the [`Engine`] trait. Backpressure happens in
//! [`Engine::submit`]: a request that can never fit the cache is refused at once
//! ([`EngineError::TooLarge`]), and beyond `max_waiting` queued sequences the
//! caller gets [`EngineError::QueueFull`] with a retry delay.

pub mod policy;
mod worker;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use salus_models::paged_cache::{KvCapacity, KvDtype, PagedCacheConfig, PagedKvCache};
use salus_models::LoadedModel;
use serde::Deserialize;

use crate::engine::{CancelToken, Engine, EngineError, EngineStats, GenerationHandle, GenerationRequest};

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
    /// (see the policy's module doc for why).
    pub max_prefill_tokens: Option<usize>,
    /// Most waiting sequences admitted (starting their prefill) per step.
    /// Default: [`DEFAULT_CPU_MAX_ADMISSIONS_PER_STEP`] on a CPU,
    /// `max_running_seqs` on a GPU (see the policy's module doc for why).
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
        }
    }
}

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
    pub fn validate(&self) -> Result<(), SchedulerError> {
        let bad = |m: &str| Err(SchedulerError::Config(m.to_string()));
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

    fn capacity(&self) -> KvCapacity {
        match (self.kv_cache_bytes, self.kv_cache_fraction) {
            (_, Some(f)) => KvCapacity::FractionOfFree(f),
            (Some(b), None) => KvCapacity::Bytes(b),
            (None, None) => KvCapacity::Bytes(DEFAULT_KV_CACHE_BYTES),
        }
    }
}

/// Why the engine could not start.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    #[error("invalid scheduler config: {0}")]
    Config(String),
    #[error("KV cache: {0}")]
    Cache(#[from] salus_models::ModelError),
    #[error("cannot start the engine worker thread: {0}")]
    Thread(std::io::Error),
}

/// A submitted request on its way to the worker.
pub(crate) struct Submission {
    pub request: GenerationRequest,
    pub events: tokio::sync::mpsc::UnboundedSender<crate::engine::GenerationEvent>,
    pub cancel: CancelToken,
}

/// State shared between the engine handle and its worker.
#[derive(Default)]
pub(crate) struct Shared {
    pub alive: AtomicBool,
    /// Sequences submitted but not yet received by the worker.
    pub in_channel: AtomicUsize,
    /// Fresh (never admitted) sequences in the worker's waiting queue.
    pub waiting: AtomicUsize,
    pub stats: Mutex<EngineStats>,
}

/// The continuous-batching engine.
pub struct ContinuousBatchingEngine {
    tx: Mutex<Sender<Submission>>,
    shared: Arc<Shared>,
    capacity_tokens: usize,
    context_length: usize,
    max_waiting: usize,
    retry_after: Duration,
}

impl ContinuousBatchingEngine {
    /// Allocates the paged KV cache for `lm`'s geometry and starts the worker thread.
    pub fn start(lm: Arc<LoadedModel>, cfg: SchedulerConfig) -> Result<Self, SchedulerError> {
        cfg.validate()?;
        let mc = lm.model.config();
        // On a GPU the cache lives in device memory and a fraction means a
        // fraction of the device memory left free after loading the weights.
        let device = lm.model.device();
        let cache_cfg = PagedCacheConfig::from_capacity_on(
            mc.num_layers,
            mc.num_kv_heads,
            mc.head_dim,
            cfg.block_size,
            cfg.kv_dtype.into(),
            cfg.capacity(),
            device,
        )?;
        let mut cache = PagedKvCache::new_on(cache_cfg, device)?.with_prefix_cache(cfg.prefix_cache);
        if cfg.kv_prefault {
            let t = std::time::Instant::now();
            cache.prefault();
            tracing::info!(elapsed_ms = t.elapsed().as_millis() as u64, "KV cache memory committed");
        }
        let capacity_tokens = cache_cfg.capacity_tokens();
        let context_length = lm.info.context_length.min(mc.max_context);
        let shared = Arc::new(Shared::default());
        shared.alive.store(true, Ordering::Release);
        if let Ok(mut s) = shared.stats.lock() {
            s.kv_blocks_total = cache_cfg.num_blocks;
        }
        let (tx, rx) = channel();
        let limits = policy::PolicyLimits {
            max_batch_tokens: cfg.max_batch_tokens,
            max_running_seqs: cfg.max_running_seqs,
            prefill_chunk: cfg.prefill_chunk,
            max_prefill_tokens: cfg.max_prefill_tokens.unwrap_or(if device.is_cpu() {
                DEFAULT_CPU_MAX_PREFILL_TOKENS
            } else {
                cfg.max_batch_tokens
            }),
            max_admissions_per_step: cfg.max_admissions_per_step.unwrap_or(if device.is_cpu() {
                DEFAULT_CPU_MAX_ADMISSIONS_PER_STEP
            } else {
                cfg.max_running_seqs
            }),
        };
        let w_shared = shared.clone();
        let cache_idle = Duration::from_secs(cfg.prefix_cache_idle_secs);
        std::thread::Builder::new()
            .name("salus-batch-engine".into())
            .spawn(move || worker::run(lm, cache, limits, cache_idle, rx, w_shared))
            .map_err(SchedulerError::Thread)?;
        tracing::info!(
            kv_blocks = cache_cfg.num_blocks,
            block_size = cache_cfg.block_size,
            kv_dtype = cache_cfg.dtype.as_str(),
            capacity_tokens,
            max_prefill_tokens = limits.max_prefill_tokens,
            max_admissions_per_step = limits.max_admissions_per_step,
            prefix_cache = cfg.prefix_cache,
            prefix_cache_idle_secs = cfg.prefix_cache_idle_secs,
            kv_prefault = cfg.kv_prefault,
            "continuous batching engine started"
        );
        Ok(ContinuousBatchingEngine {
            tx: Mutex::new(tx),
            shared,
            capacity_tokens,
            context_length,
            max_waiting: cfg.max_waiting,
            retry_after: Duration::from_secs(cfg.retry_after_secs),
        })
    }

    /// Tokens the KV cache holds in all.
    pub fn capacity_tokens(&self) -> usize {
        self.capacity_tokens
    }
}

impl Engine for ContinuousBatchingEngine {
    fn submit(&self, request: GenerationRequest) -> Result<GenerationHandle, EngineError> {
        let needed = request.prompt_tokens.expose().len() + request.max_tokens;
        if needed > self.capacity_tokens {
            return Err(EngineError::TooLarge { needed, capacity: self.capacity_tokens });
        }
        if needed > self.context_length {
            return Err(EngineError::TooLarge { needed, capacity: self.context_length });
        }
        if !self.shared.alive.load(Ordering::Acquire) {
            return Err(EngineError::NotRunning);
        }
        let n = request.n.max(1);
        let queued = self.shared.in_channel.load(Ordering::Acquire) + self.shared.waiting.load(Ordering::Acquire);
        if queued + n > self.max_waiting {
            return Err(EngineError::QueueFull { retry_after: self.retry_after });
        }
        let (events, rx) = tokio::sync::mpsc::unbounded_channel();
        let cancel = CancelToken::new();
        self.shared.in_channel.fetch_add(n, Ordering::AcqRel);
        let tx = self.tx.lock().map_err(|_| EngineError::NotRunning)?;
        if tx.send(Submission { request, events, cancel: cancel.clone() }).is_err() {
            self.shared.in_channel.fetch_sub(n, Ordering::AcqRel);
            return Err(EngineError::NotRunning);
        }
        Ok(GenerationHandle::new(rx, cancel))
    }

    fn stats(&self) -> EngineStats {
        let mut s = self.shared.stats.lock().map(|s| s.clone()).unwrap_or_default();
        s.waiting_seqs += self.shared.in_channel.load(Ordering::Acquire);
        s
    }

    fn is_ready(&self) -> bool {
        self.shared.alive.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scheduler_config_defaults_and_validation() {
        let c: SchedulerConfig = toml::from_str("").unwrap();
        assert_eq!(c, SchedulerConfig::default());
        assert_eq!(c.block_size, 16);
        assert!(c.validate().is_ok());
        let c: SchedulerConfig =
            toml::from_str("kv_dtype = \"f32\"\nkv_cache_fraction = 0.5\nblock_size = 32").unwrap();
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
}
