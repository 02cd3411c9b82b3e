//! The served model: weights (sealed or, in development, plaintext) loaded into
//! memory, the network, the tokenizer and the chat template — and
//! [`ModelCodec`], the [`PromptCodec`] handlers use to turn requests into tokens.

use std::path::Path;
use std::sync::Arc;

use salus_models::chat::{ChatMessage as TemplateMessage, Role as TemplateRole};
use salus_models::{LoadOptions, LoadedModel, Phi};

use crate::api::types::{ChatMessage, MessageRole};
use crate::config::ModelConfig;
use crate::secret::KeySource;
use crate::state::{EncodedChat, PromptCodec, PromptError};

/// Errors loading the served model. Messages name files and keys.
#[derive(Debug, thiserror::Error)]
pub enum ServedModelError {
    #[error("config key model.path is not set (use --model PATH)")]
    NoPath,
    #[error("model.kek: {0}")]
    Kek(String),
    #[error("{0}")]
    Seal(#[from] crate::seal::SealError),
    #[error("model: {0}")]
    Model(#[from] salus_models::ModelError),
    #[error("chat template file {path}: {reason}")]
    Template { path: String, reason: String },
    #[error("model.device '{0}' is not supported by this build (use \"cpu\")")]
    Device(String),
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
    pub fn load(cfg: &ModelConfig) -> Result<Self, ServedModelError> {
        let path = cfg.path.as_deref().ok_or(ServedModelError::NoPath)?;
        let kek: Option<KeySource> = match &cfg.kek {
            Some(k) => Some(k.parse().map_err(|e: crate::secret::SecretError| ServedModelError::Kek(e.to_string()))?),
            None => None,
        };
        let device = match cfg.device.as_str() {
            "cpu" => candle_core::Device::Cpu,
            other => return Err(ServedModelError::Device(other.to_string())),
        };
        let template_override = match &cfg.chat_template {
            Some(p) => Some(
                std::fs::read_to_string(p)
                    .map_err(|e| ServedModelError::Template { path: p.display().to_string(), reason: e.to_string() })?,
            ),
            None => None,
        };
        let loaded = crate::seal::load_model(path, kek.as_ref(), cfg.allow_plaintext_weights)?;
        let opts = LoadOptions { device, chat_template_override: template_override, ..Default::default() };
        let lm = salus_models::load(&loaded.source, &opts)?;
        Ok(ServedModel { lm: Arc::new(lm), fingerprint: loaded.fingerprint, sealed: loaded.sealed })
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
}

impl ModelCodec {
    pub fn new(lm: Arc<LoadedModel>) -> Self {
        ModelCodec { lm }
    }
}

impl PromptCodec for ModelCodec {
    fn context_length(&self) -> usize {
        self.lm.info.context_length
    }
    fn vocab_size(&self) -> usize {
        self.lm.info.vocab_size
    }
    fn encode_chat(&self, messages: &[ChatMessage]) -> Result<EncodedChat, PromptError> {
        let template = self.lm.chat_template.as_ref().ok_or(PromptError::Template)?;
        let msgs: Vec<TemplateMessage> = messages
            .iter()
            .map(|m| TemplateMessage {
                role: match m.role {
                    MessageRole::System => TemplateRole::System,
                    MessageRole::User => TemplateRole::User,
                    MessageRole::Assistant => TemplateRole::Assistant,
                },
                content: m.content.clone(),
            })
            .collect();
        let text = template.render(&msgs, true).map_err(|_| PromptError::Template)?;
        // The template writes any BOS itself (as Hugging Face's apply_chat_template).
        let ids = self.lm.tokenizer.encode(text.expose(), false).map_err(|_| PromptError::Tokenizer)?;
        if ids.is_empty() {
            return Err(PromptError::Empty);
        }
        Ok(EncodedChat { text, ids: Phi::new(ids) })
    }
    fn encode_text(&self, text: &Phi<String>) -> Result<Phi<Vec<u32>>, PromptError> {
        let ids = self.lm.tokenizer.encode(text.expose(), true).map_err(|_| PromptError::Tokenizer)?;
        if ids.is_empty() {
            return Err(PromptError::Empty);
        }
        Ok(Phi::new(ids))
    }
    fn token_text(&self, id: u32) -> Phi<String> {
        Phi::new(self.lm.tokenizer.decode(&[id], false).unwrap_or_default())
    }
}
