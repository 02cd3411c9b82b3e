//! Qwen2: the Llama decoder with biases on the q/k/v projections (and, when
//! `use_sliding_window` is set, sliding-window attention). Only the raw
//! Hugging Face config lives here; the decoder is shared (`llama.rs`).

use serde::Deserialize;

use crate::config::{Architecture, DecoderConfig, HfDecoderFields};
use crate::Result;

fn default_rope_theta() -> f32 {
    1_000_000.0
}

/// Qwen2's Hugging Face `config.json` (its `head_dim` is always `hidden / heads`).
#[derive(Debug, Clone, Deserialize)]
pub struct Qwen2Config {
    #[serde(flatten)]
    pub common: HfDecoderFields,
    pub max_position_embeddings: usize,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f32,
    #[serde(default)]
    pub use_sliding_window: bool,
    pub sliding_window: Option<usize>,
}

impl Qwen2Config {
    pub fn into_config(self) -> Result<DecoderConfig> {
        DecoderConfig {
            attention_bias: true,
            sliding_window: if self.use_sliding_window { self.sliding_window } else { None },
            ..self.common.decoder_config(Architecture::Qwen2, None, self.rope_theta, self.max_position_embeddings)
        }
        .validate()
    }
}
