//! Errors of the model layer. Messages name the problem (file, tensor, field)
//! and never quote token text or prompt content.

/// Everything that can go wrong loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The weight file is not a valid GGUF / safetensors file (corrupt, truncated).
    #[error("invalid weights file {file}: {reason}")]
    InvalidWeights { file: String, reason: String },
    /// A tensor the architecture needs is missing or has the wrong shape.
    #[error("tensor {name}: {reason}")]
    Tensor { name: String, reason: String },
    /// The model's configuration is missing, malformed or inconsistent.
    #[error("invalid model config: {0}")]
    InvalidConfig(String),
    /// The architecture is not one Salus implements.
    #[error("unsupported model architecture '{0}' (supported: llama, mistral, qwen2)")]
    UnsupportedArchitecture(String),
    /// No tokenizer could be built (no tokenizer.json, no GGUF tokenizer metadata).
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The chat template is missing or failed to render. Never contains message text.
    #[error("chat template: {0}")]
    ChatTemplate(String),
    /// The prompt is empty or otherwise unusable.
    #[error("invalid prompt: {0}")]
    InvalidPrompt(String),
    /// The sampling parameters are out of range.
    #[error("invalid sampling parameter {param}: {reason}")]
    InvalidSampling { param: &'static str, reason: String },
    /// A packed batch is inconsistent (empty span, duplicate sequence, wrong position).
    #[error("invalid batch: {0}")]
    InvalidBatch(String),
    /// A sequence does not fit into the model's context window.
    #[error("context length exceeded: {needed} tokens needed, the model allows {limit}")]
    ContextOverflow { needed: usize, limit: usize },
    /// The KV cache has no room left.
    #[error("KV cache exhausted: {0}")]
    CacheExhausted(String),
    /// An error inside candle (shape mismatch, device failure). Candle's messages
    /// describe shapes and dtypes, not tensor contents.
    #[error("tensor backend: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The compute device is missing, unsupported by this build, or failed
    /// (no CUDA device, out of device memory, kernel compile or launch failure).
    #[error("device: {0}")]
    Device(String),
    /// A structured-output constraint was refused or failed (never quotes it).
    #[error("{0}")]
    Grammar(#[from] crate::grammar::GrammarError),
}
