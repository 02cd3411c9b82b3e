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

use salus_models::paged_cache::{PagedCacheConfig, PagedKvCache};

pub use crate::config::{
    KvDtypeConfig, SchedulerConfig, CPU_MASK_OVERLAP_MIN_SEQS, DEFAULT_CPU_MAX_ADMISSIONS_PER_STEP,
    DEFAULT_CPU_MAX_PREFILL_TOKENS, DEFAULT_KV_CACHE_BYTES,
};
use salus_models::LoadedModel;

use crate::engine::{CancelToken, Engine, EngineError, EngineStats, GenerationHandle, GenerationRequest};

/// Why the engine could not start.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
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
        let settings = worker::WorkerSettings {
            cache_idle: Duration::from_secs(cfg.prefix_cache_idle_secs),
            mask_overlap_min: match cfg.constraint_mask_overlap {
                Some(true) => Some(1),
                Some(false) => None,
                // On a GPU the host idles during the pass; on a CPU the pass
                // uses every core, and a helper thread pays off only when
                // several masks are due (docs/performance.md).
                None if !device.is_cpu() => Some(1),
                None => Some(CPU_MASK_OVERLAP_MIN_SEQS),
            },
        };
        std::thread::Builder::new()
            .name("salus-batch-engine".into())
            .spawn(move || worker::run(lm, cache, limits, settings, rx, w_shared))
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
            constraint_mask_overlap_min_seqs = settings.mask_overlap_min.unwrap_or(0),
            "continuous batching engine started"
        );
        Ok(ContinuousBatchingEngine {
            tx: Mutex::new(tx),
            shared,
            capacity_tokens,
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
        // The context window was checked at validation; the KV cache's size is
        // the engine's own limit.
        let needed = request.prompt_tokens.expose().len() + request.decode.max_tokens;
        if needed > self.capacity_tokens {
            return Err(EngineError::TooLarge { needed, capacity: self.capacity_tokens });
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
