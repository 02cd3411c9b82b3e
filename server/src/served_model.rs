//! The served model: weights (sealed or, in development, plaintext) loaded into
//! memory, the network, the tokenizer and the chat template — and
//! [`ModelCodec`], the [`PromptCodec`] handlers use to turn requests into tokens.

use std::path::Path;
use std::sync::Arc;

use salus_models::chat::{ChatMessage, RenderOptions};
use salus_models::grammar::{CompiledGrammar, ConstraintSpec, GrammarCompiler, GrammarError};
use salus_models::tool_calls::ToolCallFormat;
use salus_models::{KernelConfig, LoadOptions, LoadedModel, Phi};

use crate::config::ModelConfig;
use crate::state::{EncodedChat, PromptCodec, PromptError, TokenizerInfo};
use salus_sensitive::secret::KeySource;

/// Errors loading the served model. Messages name files and keys.
#[derive(Debug, thiserror::Error)]
pub enum ServedModelError {
    #[error("config key model.path is not set (use --model PATH)")]
    NoPath,
    #[error("model.kek: {0}")]
    Kek(String),
    #[error("{0}")]
    Seal(#[from] salus_seal::SealError),
    #[error("model: {0}")]
    Model(#[from] salus_models::ModelError),
    #[error("chat template file {path}: {reason}")]
    Template { path: String, reason: String },
    #[error("model.tool_parser must be hermes, llama3_json or mistral")]
    ToolParser,
    #[error("model.device '{0}' is not a device (use \"cpu\" or \"cuda:N\")")]
    Device(String),
    #[error("model.device '{0}': this build has no CUDA support (build with `--features cuda`, or use \"cpu\")")]
    CudaNotBuilt(String),
    #[error("model.device '{device}': no usable CUDA device ({reason})")]
    CudaUnavailable { device: String, reason: String },
}

/// Parses and opens `model.device`: `cpu`, `cuda` (= `cuda:0`) or `cuda:N`.
/// Fails with one line when the build lacks CUDA or the device cannot be opened.
pub fn open_device(spec: &str) -> Result<candle_core::Device, ServedModelError> {
    let spec = spec.trim();
    if spec == "cpu" {
        return Ok(candle_core::Device::Cpu);
    }
    let ordinal = match spec.strip_prefix("cuda") {
        Some("") => 0,
        Some(rest) => rest
            .strip_prefix(':')
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| ServedModelError::Device(spec.chars().take(32).collect()))?,
        None => return Err(ServedModelError::Device(spec.chars().take(32).collect())),
    };
    if !cfg!(feature = "cuda") {
        return Err(ServedModelError::CudaNotBuilt(spec.to_string()));
    }
    // The driver library may report a missing device by panicking in a binding;
    // turn that into the same one-line error.
    let opened = std::panic::catch_unwind(|| candle_core::Device::new_cuda(ordinal));
    let unavailable = |reason: String| ServedModelError::CudaUnavailable {
        device: spec.to_string(),
        reason: reason.lines().next().unwrap_or("unknown error").chars().take(200).collect(),
    };
    match opened {
        Ok(Ok(d)) => Ok(d),
        Ok(Err(e)) => Err(unavailable(e.to_string())),
        Err(_) => Err(unavailable("the CUDA driver library failed to initialise".into())),
    }
}

/// Compute dtype of activations and dense weights on a device: f32 on CPU
/// (our kernels' native type), bf16 on CUDA (tensor cores, half the memory traffic).
pub fn compute_dtype(device: &candle_core::Device) -> candle_core::DType {
    if device.is_cpu() {
        candle_core::DType::F32
    } else {
        candle_core::DType::BF16
    }
}

/// Everything loaded for serving.
pub struct ServedModel {
    /// Network, tokenizer, chat template and facts (EOS ids include end-of-turn tokens).
    pub lm: Arc<LoadedModel>,
    /// Fingerprint of the weights (identical for sealed and plaintext forms).
    pub fingerprint: String,
    pub sealed: bool,
}

impl ServedModel {
    /// Loads the model named by the config (sealed, or plaintext if allowed).
    pub fn load(cfg: &ModelConfig, kernels: &KernelConfig) -> Result<Self, ServedModelError> {
        let path = cfg.path.as_deref().ok_or(ServedModelError::NoPath)?;
        let kek: Option<KeySource> = match &cfg.kek {
            Some(k) => Some(
                k.parse().map_err(|e: salus_sensitive::secret::SecretError| ServedModelError::Kek(e.to_string()))?,
            ),
            None => None,
        };
        let device = open_device(&cfg.device)?;
        let tool_format = match cfg.tool_parser.as_deref() {
            Some(name) => Some(ToolCallFormat::from_name(name).ok_or(ServedModelError::ToolParser)?),
            None => None,
        };
        let template_override = match &cfg.chat_template {
            Some(p) => Some(
                std::fs::read_to_string(p)
                    .map_err(|e| ServedModelError::Template { path: p.display().to_string(), reason: e.to_string() })?,
            ),
            None => None,
        };
        let loaded = salus_seal::load_model(path, kek.as_ref(), cfg.allow_plaintext_weights)?;
        let dtype = compute_dtype(&device);
        let opts =
            LoadOptions { device, dtype, chat_template_override: template_override, kernels: Some(kernels.clone()) };
        let mut lm = salus_models::load(&loaded.source, &opts)?;
        if let Some(format) = tool_format {
            lm.chat_template = lm.chat_template.map(|t| t.with_tool_format(format));
        }
        // Uploads to a GPU are finished before the engine's thread (another CUDA
        // stream) reads the weights, and before the host copy is released below.
        lm.model.device().synchronize().map_err(salus_models::ModelError::from)?;
        let salus_seal::LoadedWeights { source, fingerprint, sealed } = loaded;
        // The network now holds its own copy of the weights (on a GPU: in device
        // memory, uploaded straight from the locked buffers). Dropping the source
        // releases the last handles to the decrypted host buffers, which zeroize
        // and unlock themselves on drop.
        drop(source);
        Ok(ServedModel { lm: Arc::new(lm), fingerprint, sealed })
    }

    /// The default model id: the file name without its extension(s).
    pub fn default_id(path: &Path) -> String {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
        let stem = name.trim_end_matches(".sealed").trim_end_matches(".salus");
        let stem = stem.strip_suffix(".gguf").unwrap_or(stem);
        let cleaned: String = stem
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') { c } else { '-' })
            .take(128)
            .collect();
        if cleaned.is_empty() {
            "model".into()
        } else {
            cleaned
        }
    }
}

/// [`PromptCodec`] over the model's tokenizer and chat template.
pub struct ModelCodec {
    lm: Arc<LoadedModel>,
    max_bytes_per_token: usize,
    /// `None` when the tokenizer's vocabulary cannot be read as bytes
    /// (structured outputs are then refused with a clear error).
    grammar: Result<GrammarCompiler, GrammarError>,
}

impl ModelCodec {
    pub fn new(lm: Arc<LoadedModel>) -> Self {
        // The longest text one token decodes to, plus one for a leading space a
        // SentencePiece decoder drops from a lone token.
        let longest = (0..lm.info.vocab_size as u32)
            .filter_map(|id| lm.tokenizer.decode(&[id], false).ok())
            .map(|t| t.len())
            .max()
            .unwrap_or(0);
        let grammar = GrammarCompiler::new(&lm.tokenizer, lm.info.vocab_size, &lm.info.eos_token_ids);
        if let Err(e) = &grammar {
            tracing::warn!(error = %e, "structured outputs are unavailable for this model");
        }
        ModelCodec { lm, max_bytes_per_token: longest + 1, grammar }
    }
}

impl PromptCodec for ModelCodec {
    fn context_length(&self) -> usize {
        self.lm.info.context_length
    }
    fn vocab_size(&self) -> usize {
        self.lm.info.vocab_size
    }
    fn encode_chat(&self, messages: &[ChatMessage], options: &RenderOptions) -> Result<EncodedChat, PromptError> {
        let template = self.lm.chat_template.as_ref().ok_or(PromptError::Template)?;
        let text = template.render_with(messages, options).map_err(|_| PromptError::Template)?;
        // The template writes any BOS itself (as Hugging Face's apply_chat_template).
        let ids = self.lm.tokenizer.encode(text.expose(), false).map_err(|_| PromptError::Tokenizer)?;
        if ids.is_empty() {
            return Err(PromptError::Empty);
        }
        Ok(EncodedChat { text, ids: Phi::new(ids) })
    }
    fn tokenize(&self, text: &Phi<String>, add_special_tokens: bool) -> Result<Phi<Vec<u32>>, PromptError> {
        let ids = self.lm.tokenizer.encode(text.expose(), add_special_tokens).map_err(|_| PromptError::Tokenizer)?;
        if ids.is_empty() {
            return Err(PromptError::Empty);
        }
        Ok(Phi::new(ids))
    }
    fn detokenize(&self, ids: &[u32]) -> Result<Phi<String>, PromptError> {
        self.lm.tokenizer.decode(ids, false).map(Phi::new).map_err(|_| PromptError::Tokenizer)
    }
    fn tokenizer_info(&self) -> TokenizerInfo {
        let text = |id: u32| self.lm.tokenizer.decode(&[id], false).ok();
        TokenizerInfo {
            bos_token: self.lm.info.bos_token_id.and_then(text),
            eos_token: self.lm.info.eos_token_ids.first().copied().and_then(text),
            chat_template: self.lm.chat_template.as_ref().map(|t| t.source().to_owned()),
        }
    }
    fn token_text(&self, id: u32) -> Phi<String> {
        Phi::new(self.lm.tokenizer.decode(&[id], false).unwrap_or_default())
    }
    fn max_bytes_per_token(&self) -> usize {
        self.max_bytes_per_token
    }
    fn compile_constraint(&self, spec: &ConstraintSpec) -> Result<CompiledGrammar, GrammarError> {
        self.grammar.as_ref().map_err(Clone::clone)?.compile(spec)
    }
    fn tool_format(&self) -> Option<ToolCallFormat> {
        self.lm.chat_template.as_ref()?.tool_format()
    }
    fn special_token_id(&self, text: &str) -> Option<u32> {
        self.lm.tokenizer.token_to_id(text).filter(|&id| self.lm.tokenizer.is_special(id))
    }
}

#[cfg(test)]
mod device_tests {
    use super::*;

    #[test]
    fn open_device_parses_and_refuses_cleanly() {
        assert!(matches!(open_device("cpu"), Ok(candle_core::Device::Cpu)));
        assert!(matches!(open_device("gpu0"), Err(ServedModelError::Device(_))));
        assert!(matches!(open_device("cuda:x"), Err(ServedModelError::Device(_))));
        assert!(matches!(open_device("cuda0"), Err(ServedModelError::Device(_))));
        assert_eq!(compute_dtype(&candle_core::Device::Cpu), candle_core::DType::F32);
        #[cfg(not(feature = "cuda"))]
        {
            let e = open_device("cuda:0").unwrap_err();
            assert!(matches!(e, ServedModelError::CudaNotBuilt(_)));
            let msg = e.to_string();
            assert!(msg.contains("--features cuda") && msg.lines().count() == 1, "{msg}");
        }
    }
}
