//! Mistral: the Llama decoder with sliding-window attention. Only the raw
//! Hugging Face config lives here; the window is enforced by the KV cache's
//! attention (`KvCache::attend`), so the decoder itself is shared.

use serde::Deserialize;

use crate::config::{Architecture, DecoderConfig, HfDecoderFields};
use crate::Result;

fn default_rope_theta() -> f32 {
    10_000.0
}

/// Mistral's Hugging Face `config.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct MistralConfig {
    #[serde(flatten)]
    pub common: HfDecoderFields,
    pub head_dim: Option<usize>,
    pub max_position_embeddings: usize,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f32,
    /// `null` in newer Mistral releases (full attention).
    pub sliding_window: Option<usize>,
}

impl MistralConfig {
    pub fn into_config(self) -> Result<DecoderConfig> {
        DecoderConfig {
            sliding_window: self.sliding_window,
            ..self.common.decoder_config(
                Architecture::Mistral,
                self.head_dim,
                self.rope_theta,
                self.max_position_embeddings,
            )
        }
        .validate()
    }
}
