//! Shared server state and the per-request context.
//!
//! [`AppState`] bundles what handlers need: the [`Engine`], the [`PromptCodec`]
//! (chat template + tokenizer of the served model), the API keys, metrics, the
//! served model's public description, the limits and the [`AuditLog`] (required:
//! there is no way to build an `AppState` that serves inference without an audit
//! trail). [`RequestContext`] is put
//! into each request's extensions by the middleware; the auth extractor and the
//! handlers fill in the principal and token counts, and the middleware logs them
//! when the response is done.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use salus_models::chat::{ChatMessage, RenderOptions};
use salus_models::grammar::{CompiledGrammar, ConstraintSpec, GrammarError};
use salus_models::tool_calls::ToolCallFormat;
use salus_models::Phi;

use crate::api::structured::GrammarCache;
use crate::auth::access::AccessControl;
use crate::auth::denials::DenialRecorder;
use crate::auth::KeyStoreHandle;
use crate::config::LimitsConfig;
use crate::engine::Engine;
use crate::metrics::Metrics;
use crate::telemetry::{RequestOutcome, RequestTrace, Telemetry, TracePhase};
use salus_audit::AuditLog;

/// Why a prompt could not be encoded. Messages never quote the prompt.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PromptError {
    /// The chat template rejected the conversation (roles out of order, …): a client error.
    #[error("the model's chat template rejected these messages (check the order of roles)")]
    Template,
    /// The encoded prompt is empty.
    #[error("the prompt is empty")]
    Empty,
    /// The tokenizer failed: a server error.
    #[error("tokenizer failure")]
    Tokenizer,
}

/// A chat conversation after the chat template: the rendered text (what the
/// model reads; its UTF-8 bytes are the canonical input of the audit
/// `prompt_hmac`) and its token ids.
pub struct EncodedChat {
    pub text: Phi<String>,
    pub ids: Phi<Vec<u32>>,
}

/// Turns requests into prompt tokens and token ids into text, for the served
/// model. Implemented over `salus_models`' tokenizer and chat template; tests use
/// a tiny byte-level codec.
pub trait PromptCodec: Send + Sync + 'static {
    /// The model's context window in tokens.
    fn context_length(&self) -> usize;
    /// Vocabulary size (bounds `logit_bias` token ids).
    fn vocab_size(&self) -> usize;
    /// Applies the chat template (with the generation prompt) and tokenizes.
    fn encode_chat(&self, messages: &[ChatMessage], template: &RenderOptions) -> Result<EncodedChat, PromptError>;
    /// Tokenizes raw text: a completion prompt (`add_special_tokens`: with the
    /// model's BOS handling), or `/tokenize`'s text.
    fn tokenize(&self, text: &Phi<String>, add_special_tokens: bool) -> Result<Phi<Vec<u32>>, PromptError>;
    /// The text of token ids, special tokens included (`/detokenize`; ids
    /// below the vocabulary size).
    fn detokenize(&self, ids: &[u32]) -> Result<Phi<String>, PromptError>;
    /// The texts of the BOS and EOS tokens, and the chat template's source
    /// (`/tokenizer_info`).
    fn tokenizer_info(&self) -> TokenizerInfo;
    /// The text of one token (for logprobs).
    fn token_text(&self, id: u32) -> Phi<String>;
    /// The most UTF-8 bytes one token stands for: a text of `n` bytes is at
    /// least `n / max_bytes_per_token` tokens, which rejects an oversized
    /// prompt before tokenizing it.
    fn max_bytes_per_token(&self) -> usize;
    /// Compiles an output constraint over the model's vocabulary (blocking CPU
    /// work: called on the blocking pool).
    fn compile_constraint(&self, spec: &ConstraintSpec) -> Result<CompiledGrammar, GrammarError>;
    /// How the model writes tool calls; `None` when tool calling is not
    /// available (no chat template, or one whose call format is unknown).
    fn tool_format(&self) -> Option<ToolCallFormat>;
    /// The id of `text` when it is a special (control) token of the vocabulary.
    fn special_token_id(&self, text: &str) -> Option<u32>;
}

/// What `/tokenizer_info` reports (vLLM's endpoint; lm-evaluation-harness
/// reads it to tokenize through the server). Model facts, not PHI.
#[derive(Debug, Clone, Default)]
pub struct TokenizerInfo {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub chat_template: Option<String>,
}

/// What `/v1/models` says about the served model.
#[derive(Debug, Clone)]
pub struct ServedModelInfo {
    /// The id clients send as `model`.
    pub id: String,
    /// Unix time the model was loaded.
    pub created: u64,
    /// SHA-256 fingerprint of the weights (hex).
    pub fingerprint: String,
    /// Whether the weights were loaded sealed (encrypted at rest).
    pub sealed: bool,
}

/// Everything the handlers need, handed over once at start.
pub struct AppParts {
    pub engine: Arc<dyn Engine>,
    pub codec: Arc<dyn PromptCodec>,
    pub keys: Arc<KeyStoreHandle>,
    pub metrics: Arc<Metrics>,
    pub model: ServedModelInfo,
    pub limits: LimitsConfig,
    pub audit: AuditLog,
    /// Counts and records denied requests (coalesced) and limits failed
    /// authentication; built on the same `audit` and `metrics`.
    pub denials: Arc<DenialRecorder>,
    /// Sessions, per-principal limits and break-glass.
    pub access: Arc<AccessControl>,
    /// Recent completions that can be reviewed (`POST /v1/reviews`).
    pub reviews: Arc<crate::reviews::ReviewIndex>,
    /// Trace export (OpenTelemetry), or off.
    pub telemetry: Arc<Telemetry>,
}

struct Inner {
    parts: AppParts,
    accepting: AtomicBool,
    encode_permits: tokio::sync::Semaphore,
    grammars: GrammarCache,
}

/// Constraints compiled at once on the blocking pool (more wait their turn, up
/// to the compile timeout).
pub const COMPILE_CONCURRENCY: usize = 2;

/// Prompts encoded at once on the blocking pool (more wait their turn).
pub const ENCODE_CONCURRENCY: usize = 4;

/// Handler state (cheap to clone).
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

impl AppState {
    pub fn new(parts: AppParts) -> Self {
        let grammars = GrammarCache::new(parts.limits.grammar_cache_entries, COMPILE_CONCURRENCY);
        let state = AppState(Arc::new(Inner {
            parts,
            accepting: AtomicBool::new(true),
            encode_permits: tokio::sync::Semaphore::new(ENCODE_CONCURRENCY),
            grammars,
        }));
        // A principal whose last active key went (revoked, expired, removed)
        // loses its compiled constraints at once, not when they age out.
        let weak = Arc::downgrade(&state.0);
        state.0.parts.keys.on_reload(Box::new(move |old, new| {
            let Some(inner) = weak.upgrade() else { return };
            let now = time::OffsetDateTime::now_utc();
            let keyed = |p: &str| old.keys.iter().chain(&new.keys).any(|k| k.principal == p);
            let active = |p: &str| new.keys.iter().any(|k| k.principal == p && k.is_active(now));
            inner.grammars.retain_principals(|p| !keyed(p) || active(p));
        }));
        state
    }

    /// Compiled output constraints, cached per principal.
    pub fn grammars(&self) -> &GrammarCache {
        &self.0.grammars
    }

    /// The codec, shared (for work moved to the blocking pool).
    pub fn codec_arc(&self) -> Arc<dyn PromptCodec> {
        self.0.parts.codec.clone()
    }

    pub fn engine(&self) -> &dyn Engine {
        &*self.0.parts.engine
    }
    pub fn codec(&self) -> &dyn PromptCodec {
        &*self.0.parts.codec
    }
    /// Runs `f` with the codec on the blocking pool, at most
    /// [`ENCODE_CONCURRENCY`] at a time: tokenizing and rendering a template
    /// take milliseconds to seconds for large prompts, and must not stall the
    /// async workers that serve every other connection.
    pub async fn with_codec_off_runtime<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn PromptCodec) -> T + Send + 'static,
    ) -> T {
        let _permit = self.0.encode_permits.acquire().await;
        let codec = self.0.parts.codec.clone();
        match tokio::task::spawn_blocking(move || f(&*codec)).await {
            Ok(v) => v,
            // A panic in the codec surfaces here, where the request's panic
            // guard turns it into a 500 (its payload is dropped unread).
            Err(e) => match e.try_into_panic() {
                Ok(payload) => std::panic::resume_unwind(payload),
                Err(_) => panic!("prompt encoding was cancelled: the runtime is shutting down"),
            },
        }
    }
    pub fn keys(&self) -> &KeyStoreHandle {
        &self.0.parts.keys
    }
    pub fn keys_arc(&self) -> Arc<KeyStoreHandle> {
        self.0.parts.keys.clone()
    }
    pub fn metrics(&self) -> &Metrics {
        &self.0.parts.metrics
    }
    pub fn model(&self) -> &ServedModelInfo {
        &self.0.parts.model
    }
    pub fn limits(&self) -> &LimitsConfig {
        &self.0.parts.limits
    }
    /// Denied requests: counting, coalesced records, failed-auth limits.
    pub fn denials(&self) -> &DenialRecorder {
        &self.0.parts.denials
    }
    pub fn denials_arc(&self) -> Arc<DenialRecorder> {
        self.0.parts.denials.clone()
    }
    /// The audit trail every inference is recorded in.
    pub fn access(&self) -> &AccessControl {
        &self.0.parts.access
    }
    pub fn reviews(&self) -> &crate::reviews::ReviewIndex {
        &self.0.parts.reviews
    }
    pub fn reviews_arc(&self) -> Arc<crate::reviews::ReviewIndex> {
        self.0.parts.reviews.clone()
    }
    pub fn access_arc(&self) -> Arc<AccessControl> {
        self.0.parts.access.clone()
    }
    pub fn audit(&self) -> &AuditLog {
        &self.0.parts.audit
    }
    /// Trace export (OpenTelemetry), or off.
    pub fn telemetry(&self) -> &Telemetry {
        &self.0.parts.telemetry
    }
    pub fn telemetry_arc(&self) -> Arc<Telemetry> {
        self.0.parts.telemetry.clone()
    }
    /// Ready: accepting requests, the engine is up and the audit trail can be
    /// written (fail closed: no trail, no inference).
    pub fn is_ready(&self) -> bool {
        self.not_ready_reasons().is_empty()
    }
    /// Why the server is not ready, as fixed codes: `shutting_down`,
    /// `engine_not_running`, `audit_trail_unavailable` (fail closed).
    pub fn not_ready_reasons(&self) -> Vec<&'static str> {
        let mut reasons = Vec::new();
        if !self.0.accepting.load(Ordering::Acquire) {
            reasons.push("shutting_down");
        }
        if !self.0.parts.engine.is_ready() {
            reasons.push("engine_not_running");
        }
        if !self.0.parts.audit.is_healthy() {
            reasons.push("audit_trail_unavailable");
        }
        reasons
    }
    /// Called when shutdown starts: `/ready` turns false so balancers drain us.
    pub fn stop_accepting(&self) {
        self.0.accepting.store(false, Ordering::Release);
    }
}

/// Per-request facts for the access log, metrics and the request's trace.
/// Holds no request text. When the last reference goes (the response, a
/// stream included, is done), the request's spans are exported.
#[derive(Debug, Default)]
pub struct RequestContext {
    request_id: String,
    principal: Mutex<Option<String>>,
    auth_denied: AtomicBool,
    prompt_tokens: AtomicUsize,
    completion_tokens: AtomicUsize,
    /// The response's status and error code (set by the middleware).
    response: Mutex<(u16, &'static str)>,
    /// The spans of this request, when it is traced.
    trace: Mutex<Option<RequestTrace>>,
}

impl RequestContext {
    pub fn new(request_id: String) -> Self {
        Self::traced(request_id, None)
    }
    /// A context whose request is traced by `trace` (when `Some`).
    pub fn traced(request_id: String, trace: Option<RequestTrace>) -> Self {
        RequestContext {
            request_id,
            principal: Mutex::default(),
            auth_denied: AtomicBool::default(),
            prompt_tokens: AtomicUsize::default(),
            completion_tokens: AtomicUsize::default(),
            response: Mutex::default(),
            trace: Mutex::new(trace),
        }
    }
    pub fn request_id(&self) -> &str {
        &self.request_id
    }
    pub fn set_principal(&self, id: &str) {
        *self.principal.lock().unwrap_or_else(|e| e.into_inner()) = Some(id.to_string());
    }
    pub fn principal(&self) -> Option<String> {
        self.principal.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
    pub fn set_auth_denied(&self) {
        self.auth_denied.store(true, Ordering::Relaxed);
    }
    pub fn auth_denied(&self) -> bool {
        self.auth_denied.load(Ordering::Relaxed)
    }
    pub fn set_tokens(&self, prompt: usize, completion: usize) {
        self.prompt_tokens.store(prompt, Ordering::Relaxed);
        self.completion_tokens.store(completion, Ordering::Relaxed);
    }
    pub fn tokens(&self) -> (usize, usize) {
        (self.prompt_tokens.load(Ordering::Relaxed), self.completion_tokens.load(Ordering::Relaxed))
    }
    /// The response's status and fixed error code ("" when none).
    pub fn set_response(&self, status: u16, error_code: &'static str) {
        *self.response.lock().unwrap_or_else(|e| e.into_inner()) = (status, error_code);
    }
    /// Records a stretch of this request's work in its trace (if traced).
    pub fn trace_phase(&self, phase: TracePhase, start: std::time::Instant, end: std::time::Instant) {
        if let Some(t) = self.trace.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            t.phase(phase, start, end);
        }
    }
}

impl Drop for RequestContext {
    fn drop(&mut self) {
        let Some(trace) = self.trace.get_mut().unwrap_or_else(|e| e.into_inner()).take() else { return };
        let principal = self.principal.get_mut().unwrap_or_else(|e| e.into_inner()).take();
        let (status, error_code) = *self.response.get_mut().unwrap_or_else(|e| e.into_inner());
        let (prompt_tokens, completion_tokens) = self.tokens();
        trace.end(RequestOutcome {
            request_id: &self.request_id,
            principal: principal.as_deref(),
            status,
            error_code,
            prompt_tokens,
            completion_tokens,
        });
    }
}
