//! The validated decoder configuration shared by every Llama-family architecture.
//!
//! Each architecture file (`llama.rs`, `mistral.rs`, `qwen2.rs`) parses its raw
//! Hugging Face `config.json` or GGUF metadata and maps it onto [`DecoderConfig`]
//! (the `config.json` fields all of them read alike live here, in
//! [`HfDecoderFields`], so the mapping of those is written once);
//! [`DecoderConfig::validate`] then checks the invariants the decoder relies on
//! (head counts divide, head_dim is even, ids fit the vocabulary), so the forward
//! pass never has to.

use serde::Deserialize;

use crate::{ModelError, Result};

/// The architectures Salus implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Architecture {
    /// Llama 2/3/3.1, SmolLM and other `LlamaForCausalLM` models.
    Llama,
    /// Mistral (Llama layout plus sliding-window attention).
    Mistral,
    /// Qwen2 (Llama layout plus q/k/v projection biases).
    Qwen2,
}

impl Architecture {
    /// Maps a GGUF `general.architecture` or HF `model_type` to an architecture.
    pub fn from_name(name: &str) -> Result<Self> {
        match name.to_ascii_lowercase().as_str() {
            "llama" | "llamaforcausallm" | "smollm" => Ok(Architecture::Llama),
            "mistral" | "mistralforcausallm" => Ok(Architecture::Mistral),
            "qwen2" | "qwen2forcausallm" => Ok(Architecture::Qwen2),
            _ => Err(ModelError::UnsupportedArchitecture(name.chars().take(64).collect())),
        }
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Mistral => "mistral",
            Architecture::Qwen2 => "qwen2",
        }
    }
}

/// How rotary embeddings pair the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Pairs (2i, 2i+1). GGUF llama files store Q/K permuted for this layout.
    Interleaved,
    /// Pairs (i, i + head_dim/2): the Hugging Face layout (and GGUF qwen2).
    HalfSplit,
}

/// Context-extension scaling of the rotary frequencies.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Positions divided by `factor` (all frequencies divided by `factor`).
    Linear { factor: f32 },
    /// Llama 3.1 frequency-dependent scaling.
    Llama3 { factor: f32, low_freq_factor: f32, high_freq_factor: f32, original_max_position_embeddings: usize },
}

/// `eos_token_id` in HF configs: one id or a list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum EosTokenIds {
    Single(u32),
    Multiple(Vec<u32>),
}

impl EosTokenIds {
    pub fn into_vec(self) -> Vec<u32> {
        match self {
            EosTokenIds::Single(id) => vec![id],
            EosTokenIds::Multiple(ids) => ids,
        }
    }
}

/// The Hugging Face `config.json` fields every Llama-family architecture reads
/// the same way; each raw config flattens them in (`#[serde(flatten)]`). What
/// differs stays with the architecture: `rope_theta` and
/// `max_position_embeddings` (their defaults differ), `head_dim` (Qwen2 always
/// derives it), rope scaling, biases and sliding windows.
#[derive(Debug, Clone, Deserialize)]
pub struct HfDecoderFields {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<EosTokenIds>,
}

impl HfDecoderFields {
    /// The (not yet validated) decoder config of these fields in the plain
    /// Hugging Face layout: half-split rope without scaling, no projection
    /// biases, full attention. `head_dim` defaults to `hidden / heads`. The
    /// architecture overrides what differs, then calls [`DecoderConfig::validate`].
    pub fn decoder_config(
        self,
        architecture: Architecture,
        head_dim: Option<usize>,
        rope_theta: f32,
        max_context: usize,
    ) -> DecoderConfig {
        DecoderConfig {
            architecture,
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_hidden_layers,
            num_heads: self.num_attention_heads,
            num_kv_heads: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            head_dim: head_dim.unwrap_or(self.hidden_size / self.num_attention_heads.max(1)),
            rms_norm_eps: self.rms_norm_eps,
            rope_theta,
            rope_scaling: RopeScaling::None,
            rope_style: RopeStyle::HalfSplit,
            max_context,
            tie_embeddings: self.tie_word_embeddings,
            attention_bias: false,
            sliding_window: None,
            bos_token_id: self.bos_token_id,
            eos_token_ids: self.eos_token_id.map(EosTokenIds::into_vec).unwrap_or_default(),
        }
    }
}

/// A decoder configuration that passed [`DecoderConfig::validate`].
#[derive(Debug, Clone, PartialEq)]
pub struct DecoderConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f32,
    pub rope_scaling: RopeScaling,
    pub rope_style: RopeStyle,
    /// Longest sequence (prompt + completion) the model accepts.
    pub max_context: usize,
    /// The output projection reuses the token embedding matrix.
    pub tie_embeddings: bool,
    /// q/k/v projections carry a bias (Qwen2).
    pub attention_bias: bool,
    /// Each token attends to at most this many most recent tokens (itself included).
    pub sliding_window: Option<usize>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

impl DecoderConfig {
    /// Checks the invariants the decoder relies on; names the offending field.
    pub fn validate(self) -> Result<Self> {
        let bad = |m: String| Err(ModelError::InvalidConfig(m));
        for (field, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_context),
        ] {
            if v == 0 {
                return bad(format!("{field} must be positive"));
            }
            if v > 1 << 24 {
                return bad(format!("{field} = {v} is implausibly large"));
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return bad(format!(
                "num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                self.num_heads, self.num_kv_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!("head_dim ({}) must be even for rotary embeddings", self.head_dim));
        }
        if !(self.rms_norm_eps > 0.0 && self.rms_norm_eps < 1.0) {
            return bad("rms_norm_eps must be in (0, 1)".into());
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 1.0) {
            return bad("rope_theta must be a finite number > 1".into());
        }
        match self.rope_scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => {
                if !(factor.is_finite() && factor > 0.0) {
                    return bad("rope_scaling.factor must be positive".into());
                }
            }
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                // Written so that NaN fails every comparison.
                let valid = factor.is_finite()
                    && factor > 0.0
                    && low_freq_factor > 0.0
                    && high_freq_factor > low_freq_factor
                    && original_max_position_embeddings > 0;
                if !valid {
                    return bad("rope_scaling (llama3) needs factor > 0, 0 < low_freq_factor < high_freq_factor and original_max_position_embeddings > 0".into());
                }
            }
        }
        if self.sliding_window == Some(0) {
            return bad("sliding_window must be positive".into());
        }
        for (field, id) in self
            .bos_token_id
            .iter()
            .map(|b| ("bos_token_id", b))
            .chain(self.eos_token_ids.iter().map(|e| ("eos_token_id", e)))
        {
            if *id as usize >= self.vocab_size {
                return bad(format!("{field} {id} is outside the vocabulary ({})", self.vocab_size));
            }
        }
        Ok(self)
    }

    /// Query heads per key/value head (grouped-query attention).
    pub fn kv_groups(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> DecoderConfig {
        DecoderConfig {
            architecture: Architecture::Llama,
            vocab_size: 100,
            hidden_size: 64,
            intermediate_size: 128,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 16,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            rope_scaling: RopeScaling::None,
            rope_style: RopeStyle::HalfSplit,
            max_context: 128,
            tie_embeddings: false,
            attention_bias: false,
            sliding_window: None,
            bos_token_id: Some(1),
            eos_token_ids: vec![2],
        }
    }

    #[test]
    fn validate_names_the_bad_field() {
        assert!(cfg().validate().is_ok());
        let e = DecoderConfig { num_kv_heads: 3, ..cfg() }.validate().unwrap_err().to_string();
        assert!(e.contains("num_key_value_heads"), "{e}");
        let e = DecoderConfig { head_dim: 15, ..cfg() }.validate().unwrap_err().to_string();
        assert!(e.contains("head_dim"), "{e}");
        let e = DecoderConfig { eos_token_ids: vec![100], ..cfg() }.validate().unwrap_err().to_string();
        assert!(e.contains("eos_token_id"), "{e}");
        let e = DecoderConfig { num_layers: 0, ..cfg() }.validate().unwrap_err().to_string();
        assert!(e.contains("num_hidden_layers"), "{e}");
    }

    /// The shared fields map alike for every architecture; what differs stays
    /// with it (Qwen2 derives head_dim and has its own rope_theta default and
    /// biases; Mistral keeps its window; Qwen2 only with use_sliding_window).
    #[test]
    fn hf_configs_share_the_common_mapping() {
        let base = r#""vocab_size":100,"hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,
            "max_position_embeddings":128,"rms_norm_eps":1e-5,"head_dim":32,
            "sliding_window":8,"bos_token_id":1,"eos_token_id":[2,3]"#;
        let json = |extra: &str| format!("{{{base}{extra}}}");
        let llama: crate::llama::LlamaConfig = serde_json::from_str(&json("")).unwrap();
        let llama = llama.into_config().unwrap();
        assert_eq!(llama, DecoderConfig { head_dim: 32, eos_token_ids: vec![2, 3], ..cfg() });
        let mistral: crate::mistral::MistralConfig = serde_json::from_str(&json("")).unwrap();
        assert_eq!(
            mistral.into_config().unwrap(),
            DecoderConfig { architecture: Architecture::Mistral, sliding_window: Some(8), ..llama.clone() }
        );
        let qwen2 = |extra: &str| {
            serde_json::from_str::<crate::qwen2::Qwen2Config>(&json(extra)).unwrap().into_config().unwrap()
        };
        let want = DecoderConfig {
            architecture: Architecture::Qwen2,
            head_dim: 16,
            rope_theta: 1_000_000.0,
            attention_bias: true,
            ..llama
        };
        assert_eq!(qwen2(""), want);
        assert_eq!(qwen2(r#","use_sliding_window":true"#), DecoderConfig { sliding_window: Some(8), ..want });
        let e = serde_json::from_str::<crate::mistral::MistralConfig>(r#"{"hidden_size":64}"#).unwrap_err().to_string();
        assert!(e.contains("missing field"), "{e}");
    }

    #[test]
    fn architecture_names() {
        assert_eq!(Architecture::from_name("LlamaForCausalLM").unwrap(), Architecture::Llama);
        assert_eq!(Architecture::from_name("qwen2").unwrap(), Architecture::Qwen2);
        assert!(matches!(Architecture::from_name("gpt2"), Err(ModelError::UnsupportedArchitecture(_))));
    }
}
