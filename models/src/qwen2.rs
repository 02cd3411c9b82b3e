//! Qwen2: the Llama decoder with biases on the q/k/v projections (and, when
//! `use_sliding_window` is set, sliding-window attention). Only the raw
//! Hugging Face config lives here; the decoder is shared (`llama.rs`).

use serde::Deserialize;

use crate::config::{Architecture, DecoderConfig, RopeScaling, RopeStyle};
use crate::llama::EosTokenIds;
use crate::Result;

fn default_rope_theta() -> f32 {
    1_000_000.0
}

/// Qwen2's Hugging Face `config.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct Qwen2Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f32,
    #[serde(default)]
    pub use_sliding_window: bool,
    pub sliding_window: Option<usize>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<EosTokenIds>,
}

impl Qwen2Config {
    pub fn into_config(self) -> Result<DecoderConfig> {
        DecoderConfig {
            architecture: Architecture::Qwen2,
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_hidden_layers,
            num_heads: self.num_attention_heads,
            num_kv_heads: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            head_dim: self.hidden_size / self.num_attention_heads.max(1),
            rms_norm_eps: self.rms_norm_eps,
            rope_theta: self.rope_theta,
            rope_scaling: RopeScaling::None,
            rope_style: RopeStyle::HalfSplit,
            max_context: self.max_position_embeddings,
            tie_embeddings: self.tie_word_embeddings,
            attention_bias: true,
            sliding_window: if self.use_sliding_window {
                self.sliding_window
            } else {
                None
            },
            bos_token_id: self.bos_token_id,
            eos_token_ids: self
                .eos_token_id
                .map(EosTokenIds::into_vec)
                .unwrap_or_default(),
        }
        .validate()
    }
}
