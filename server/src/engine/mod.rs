//! The engine: the boundary between the HTTP layer and the model.
//!
//! Handlers validate a request into a [`GenerationRequest`] (token ids, sampling
//! parameters, limits) and [`Engine::submit`] it. The engine schedules it — the
//! continuous-batching scheduler packs many sequences into each forward step —
//! and streams [`GenerationEvent`]s back. Dropping the [`GenerationHandle`]
//! cancels every sequence of the request within one scheduler step (client
//! disconnect, deadline), which frees its KV cache blocks.
//!
//! Handlers depend only on this trait, so the scheduler can change without
//! touching them, and tests can drive the HTTP layer with a scripted engine.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use salus_models::paged_cache::PrefixScope;
use salus_models::Phi;
pub use salus_models::{DecodeParams, FinishReason, TokenLogprob};

/// Opaque request id (also written to logs and the audit trail).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RequestId(pub String);

/// A request that passed validation: everything the engine needs, nothing it
/// must check again (prompt fits the context, parameters in range).
#[derive(Debug)]
pub struct GenerationRequest {
    pub request_id: RequestId,
    /// Prompt token ids (after the chat template). PHI.
    pub prompt_tokens: Phi<Vec<u32>>,
    /// Number of choices (`n`); each is scheduled as its own sequence.
    pub n: usize,
    /// The request-wide index of choice 0 (a multi-prompt request numbers its
    /// choices across prompts); choice `i` is decoded as choice
    /// `first_choice + i`, which derives its seed.
    pub first_choice: usize,
    /// How each choice is decoded. `decode.max_tokens` is validated: the prompt
    /// plus `max_tokens` fit the model's context window.
    pub decode: DecodeParams,
    /// When to give up (the request is cancelled at this instant).
    pub deadline: Option<Instant>,
    /// Requests share cached prompt blocks only within one scope: the HTTP
    /// layer uses the authenticated principal, so callers never share (or can
    /// time) each other's prompts.
    pub prefix_scope: PrefixScope,
    /// Score the prompt (`echo` with logprobs): every choice first sends a
    /// [`GenerationEvent::PromptLogprobs`] with each prompt token's logprob
    /// after the first, and this many alternatives. Its prompt is then computed
    /// whole (no prefix-cache reuse), and `decode.max_tokens` may be 0.
    pub prompt_logprobs: Option<usize>,
}

/// What the engine streams back for one request.
#[derive(Debug)]
pub enum GenerationEvent {
    /// New text for `choice` (may be empty when a token completes no character
    /// yet, or is held back because it may begin a stop string).
    Delta {
        choice: usize,
        text: Phi<String>,
        /// One entry per token this delta covers, when logprobs were requested.
        logprobs: Vec<TokenLogprob>,
        /// Generated tokens this delta covers (a token whose text is still
        /// held back is reported with empty `text`).
        tokens: usize,
    },
    /// `choice` finished; `completion_tokens` counts its generated tokens and
    /// `cached_prompt_tokens` the prompt tokens its sequence took from the
    /// prefix cache instead of computing them (at its first admission);
    /// `timing` says when it was scheduled and sampled first (for traces).
    Finished {
        choice: usize,
        reason: FinishReason,
        completion_tokens: usize,
        cached_prompt_tokens: usize,
        timing: ChoiceTiming,
    },
    /// The prompt's scores for `choice` (requests with `prompt_logprobs`),
    /// before any other event of the choice: one entry per prompt token after
    /// the first (the first has no context to be scored in).
    /// `ranks[i]` is the rank of `logprobs[i]`'s token (1: the most likely).
    PromptLogprobs { choice: usize, logprobs: Vec<TokenLogprob>, ranks: Vec<u32> },
    /// The request failed inside the engine; no further events follow.
    Failed { error: EngineError },
}

/// When the engine worked on a choice: its queue wait ends at `admitted`, its
/// prefill at `first_token`. Both stay `None` for a choice that ended before
/// it ran (nothing to generate).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChoiceTiming {
    /// The start of the first step that scheduled the choice's sequence
    /// (a preempted sequence keeps its first admission).
    pub admitted: Option<Instant>,
    /// When its first token was sampled (the end of its prefill).
    pub first_token: Option<Instant>,
}

/// Errors the engine reports. Messages never contain request text.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    /// The waiting queue is full; retry after the given delay.
    #[error("server is at capacity; retry later")]
    QueueFull { retry_after: Duration },
    /// The request can never fit the KV cache, even alone.
    #[error("request needs {needed} KV cache tokens but the cache holds {capacity}")]
    TooLarge { needed: usize, capacity: usize },
    /// The request ran past its deadline (`limits.request_timeout_secs`).
    #[error("the request ran past its time limit")]
    DeadlineExceeded,
    /// The engine is shutting down or not started.
    #[error("engine is not running")]
    NotRunning,
    /// A model or kernel error while generating (details logged by id only).
    #[error("internal engine error")]
    Internal,
    /// A choice's output constraint failed while generating (its grammar ran
    /// out of its per-token work budget); the request ends, the batch goes on.
    #[error("output constraint failed")]
    ConstraintFailed,
}

/// Cancels a request when dropped (or explicitly).
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Release);
    }
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// The caller's side of a submitted request.
#[derive(Debug)]
pub struct GenerationHandle {
    pub events: tokio::sync::mpsc::UnboundedReceiver<GenerationEvent>,
    cancel: CancelToken,
}

impl GenerationHandle {
    pub fn new(events: tokio::sync::mpsc::UnboundedReceiver<GenerationEvent>, cancel: CancelToken) -> Self {
        GenerationHandle { events, cancel }
    }
}

impl Drop for GenerationHandle {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// A snapshot of the engine's load, for metrics and readiness.
#[derive(Debug, Clone, Default)]
pub struct EngineStats {
    pub running_seqs: usize,
    pub waiting_seqs: usize,
    pub kv_blocks_used: usize,
    pub kv_blocks_total: usize,
    pub preemptions_total: u64,
    /// Blocks registered in the prefix cache (held or idle).
    pub kv_blocks_cached: usize,
    /// Prompt tokens taken from the prefix cache instead of being computed.
    pub prefix_cache_hit_tokens_total: u64,
    pub steps_total: u64,
    pub last_batch_seqs: usize,
    pub last_batch_tokens: usize,
}

/// The generation backend handlers talk to.
pub trait Engine: Send + Sync + 'static {
    /// Queues a request. Fails at once when the queue is full or the request can
    /// never fit; otherwise events arrive on the handle.
    fn submit(&self, request: GenerationRequest) -> Result<GenerationHandle, EngineError>;
    /// Current load.
    fn stats(&self) -> EngineStats;
    /// Whether the engine can take requests (model loaded, worker alive).
    fn is_ready(&self) -> bool;
}
