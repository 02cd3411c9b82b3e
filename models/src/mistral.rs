//! Mistral: the Llama decoder with sliding-window attention. Only the raw
//! Hugging Face config lives here; the window is enforced by the KV cache's
//! attention (`KvCache::attend`), so the decoder itself is shared.

use serde::Deserialize;

use crate::config::{Architecture, DecoderConfig, RopeScaling, RopeStyle};
use crate::llama::EosTokenIds;
use crate::Result;

fn default_rope_theta() -> f32 {
    10_000.0
}

/// Mistral's Hugging Face `config.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct MistralConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f32,
    /// `null` in newer Mistral releases (full attention).
    pub sliding_window: Option<usize>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<EosTokenIds>,
}

impl MistralConfig {
    pub fn into_config(self) -> Result<DecoderConfig> {
        DecoderConfig {
            architecture: Architecture::Mistral,
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_hidden_layers,
            num_heads: self.num_attention_heads,
            num_kv_heads: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            head_dim: self
                .head_dim
                .unwrap_or(self.hidden_size / self.num_attention_heads.max(1)),
            rms_norm_eps: self.rms_norm_eps,
            rope_theta: self.rope_theta,
            rope_scaling: RopeScaling::None,
            rope_style: RopeStyle::HalfSplit,
            max_context: self.max_position_embeddings,
            tie_embeddings: self.tie_word_embeddings,
            attention_bias: false,
            sliding_window: self.sliding_window,
            bos_token_id: self.bos_token_id,
            eos_token_ids: self
                .eos_token_id
                .map(EosTokenIds::into_vec)
                .unwrap_or_default(),
        }
        .validate()
    }
}
