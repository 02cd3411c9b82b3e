//! The Llama-family decoder (Llama 2/3/3.1, SmolLM; Mistral and Qwen2 reuse it
//! with their own configs), plus Llama's raw configurations: Hugging Face
//! `config.json` and GGUF `llama.*` metadata.
//!
//! Written here rather than wrapped from candle-transformers because continuous
//! batching needs a forward pass over a *packed* batch: all tokens of all
//! sequences go through the projections and the MLP as one `[T, hidden]`
//! matrix, and only attention is done per sequence, by the [`KvCache`].

use std::collections::HashMap;

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use crate::batch::PackedBatch;
use crate::config::{Architecture, DecoderConfig, HfDecoderFields, RopeScaling, RopeStyle};
use crate::kv_cache::KvCache;
use crate::layers::{residual_add, RmsNorm, RopeTables, RotaryEmbedding};
use crate::linear::{Linear, StackedLinear};
use crate::weights::{TensorName, Weights};
use crate::{ModelError, Result};

pub use crate::config::EosTokenIds;

/// `rope_scaling` in HF configs (`rope_type` or the older `type` key).
#[derive(Debug, Clone, Deserialize)]
pub struct RawRopeScaling {
    #[serde(alias = "type")]
    pub rope_type: String,
    pub factor: Option<f32>,
    pub low_freq_factor: Option<f32>,
    pub high_freq_factor: Option<f32>,
    pub original_max_position_embeddings: Option<usize>,
}

impl RawRopeScaling {
    pub fn to_scaling(&self) -> Result<RopeScaling> {
        let need =
            |v: Option<f32>, f: &str| v.ok_or_else(|| ModelError::InvalidConfig(format!("rope_scaling.{f} missing")));
        match self.rope_type.as_str() {
            "default" => Ok(RopeScaling::None),
            "linear" => Ok(RopeScaling::Linear { factor: need(self.factor, "factor")? }),
            "llama3" => Ok(RopeScaling::Llama3 {
                factor: need(self.factor, "factor")?,
                low_freq_factor: need(self.low_freq_factor, "low_freq_factor")?,
                high_freq_factor: need(self.high_freq_factor, "high_freq_factor")?,
                original_max_position_embeddings: self.original_max_position_embeddings.ok_or_else(|| {
                    ModelError::InvalidConfig("rope_scaling.original_max_position_embeddings missing".into())
                })?,
            }),
            other => Err(ModelError::InvalidConfig(format!(
                "rope_scaling type '{}' is not supported (default, linear, llama3)",
                other.chars().take(32).collect::<String>()
            ))),
        }
    }
}

fn default_rope_theta() -> f32 {
    10_000.0
}
fn default_max_positions() -> usize {
    4096
}

/// Llama's Hugging Face `config.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct LlamaConfig {
    #[serde(flatten)]
    pub common: HfDecoderFields,
    pub head_dim: Option<usize>,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f32,
    pub rope_scaling: Option<RawRopeScaling>,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub attention_bias: bool,
}

impl LlamaConfig {
    pub fn into_config(self) -> Result<DecoderConfig> {
        let rope_scaling = match &self.rope_scaling {
            Some(r) => r.to_scaling()?,
            None => RopeScaling::None,
        };
        DecoderConfig {
            rope_scaling,
            attention_bias: self.attention_bias,
            ..self.common.decoder_config(
                Architecture::Llama,
                self.head_dim,
                self.rope_theta,
                self.max_position_embeddings,
            )
        }
        .validate()
    }
}

/// Reads an integer metadata value of any integer width.
pub fn md_usize(md: &HashMap<String, gguf_file::Value>, key: &str) -> Result<Option<usize>> {
    use gguf_file::Value::*;
    let Some(v) = md.get(key) else {
        return Ok(None);
    };
    let n: i128 = match v {
        U8(x) => *x as i128,
        I8(x) => *x as i128,
        U16(x) => *x as i128,
        I16(x) => *x as i128,
        U32(x) => *x as i128,
        I32(x) => *x as i128,
        U64(x) => *x as i128,
        I64(x) => *x as i128,
        _ => return Err(ModelError::InvalidConfig(format!("GGUF metadata {key} is not an integer"))),
    };
    usize::try_from(n).map(Some).map_err(|_| ModelError::InvalidConfig(format!("GGUF metadata {key} is negative")))
}

fn md_f32(md: &HashMap<String, gguf_file::Value>, key: &str) -> Result<Option<f32>> {
    use gguf_file::Value::*;
    match md.get(key) {
        None => Ok(None),
        Some(F32(x)) => Ok(Some(*x)),
        Some(F64(x)) => Ok(Some(*x as f32)),
        Some(_) => Err(ModelError::InvalidConfig(format!("GGUF metadata {key} is not a float"))),
    }
}

fn md_required(md: &HashMap<String, gguf_file::Value>, key: &str) -> Result<usize> {
    md_usize(md, key)?.ok_or_else(|| ModelError::InvalidConfig(format!("GGUF metadata {key} missing")))
}

/// Builds the decoder config from GGUF metadata (`{arch}.*` keys, llama.cpp
/// conventions). `vocab_size` comes from the embedding tensor's shape.
pub fn config_from_gguf(
    md: &HashMap<String, gguf_file::Value>,
    architecture: Architecture,
    vocab_size: usize,
) -> Result<DecoderConfig> {
    let p = architecture.as_str();
    let key = |k: &str| format!("{p}.{k}");
    let hidden = md_required(md, &key("embedding_length"))?;
    let heads = md_required(md, &key("attention.head_count"))?;
    let kv_heads = md_usize(md, &key("attention.head_count_kv"))?.unwrap_or(heads);
    let head_dim = match md_usize(md, &key("attention.key_length"))? {
        Some(d) => d,
        None => hidden / heads.max(1),
    };
    if let Some(rope_dim) = md_usize(md, &key("rope.dimension_count"))? {
        if rope_dim != head_dim {
            return Err(ModelError::InvalidConfig(format!(
                "{p}.rope.dimension_count ({rope_dim}) differs from the head dimension ({head_dim}); partial rotary is not supported"
            )));
        }
    }
    let rope_scaling = match md.get(&key("rope.scaling.type")).and_then(|v| v.to_string().ok()).map(String::as_str) {
        None | Some("none") => RopeScaling::None,
        Some("linear") => RopeScaling::Linear {
            factor: md_f32(md, &key("rope.scaling.factor"))?
                .ok_or_else(|| ModelError::InvalidConfig(format!("{p}.rope.scaling.factor missing")))?,
        },
        Some(other) => {
            return Err(ModelError::InvalidConfig(format!(
                "{p}.rope.scaling.type '{}' is not supported",
                other.chars().take(32).collect::<String>()
            )))
        }
    };
    let eos = md_usize(md, "tokenizer.ggml.eos_token_id")?.map(|e| e as u32);
    DecoderConfig {
        architecture,
        vocab_size,
        hidden_size: hidden,
        intermediate_size: md_required(md, &key("feed_forward_length"))?,
        num_layers: md_required(md, &key("block_count"))?,
        num_heads: heads,
        num_kv_heads: kv_heads,
        head_dim,
        rms_norm_eps: md_f32(md, &key("attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-5) as f64,
        rope_theta: md_f32(md, &key("rope.freq_base"))?.unwrap_or(10_000.0),
        rope_scaling,
        // llama.cpp converts HF Q/K for interleaved rope on llama; qwen2 keeps the HF layout.
        rope_style: match architecture {
            Architecture::Qwen2 => RopeStyle::HalfSplit,
            Architecture::Llama | Architecture::Mistral => RopeStyle::Interleaved,
        },
        max_context: md_usize(md, &key("context_length"))?.unwrap_or(4096),
        tie_embeddings: false,
        attention_bias: architecture == Architecture::Qwen2,
        sliding_window: md_usize(md, &key("attention.sliding_window"))?,
        bos_token_id: md_usize(md, "tokenizer.ggml.bos_token_id")?.map(|b| b as u32),
        eos_token_ids: eos.into_iter().collect(),
    }
    .validate()
}

struct Attention {
    /// Q, K and V, stacked (one matmul when the weights allow it).
    qkv: StackedLinear,
    o: Linear,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn load(w: &Weights<'_>, cfg: &DecoderConfig, l: usize) -> Result<Self> {
        let (h, q_out, kv_out) = (cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim);
        let bias = |b: TensorName| if cfg.attention_bias { Some(b) } else { None };
        Ok(Attention {
            qkv: StackedLinear::new(vec![
                w.linear(TensorName::Q(l), bias(TensorName::QBias(l)), q_out, h)?,
                w.linear(TensorName::K(l), bias(TensorName::KBias(l)), kv_out, h)?,
                w.linear(TensorName::V(l), bias(TensorName::VBias(l)), kv_out, h)?,
            ])?,
            o: w.linear(TensorName::O(l), None, h, q_out)?,
            n_heads: cfg.num_heads,
            n_kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
        })
    }

    fn forward(&self, x: &Tensor, step: &Step<'_>, layer: usize, cache: &mut dyn KvCache) -> Result<Tensor> {
        let t = x.dim(0)?;
        let mut qkv = self.qkv.forward_split(x)?.into_iter();
        let (Some(q), Some(k), Some(v)) = (qkv.next(), qkv.next(), qkv.next()) else {
            return Err(ModelError::InvalidConfig("Q/K/V projection lost a part".into()));
        };
        let q = q.reshape((t, self.n_heads, self.head_dim))?;
        let k = k.reshape((t, self.n_kv_heads, self.head_dim))?;
        let v = v.reshape((t, self.n_kv_heads, self.head_dim))?;
        let q = step.rope.apply(&q, &step.tables)?;
        let k = step.rope.apply(&k, &step.tables)?;
        let y = cache.attend(layer, step.batch.spans(), &q, &k, &v, step.sliding_window)?;
        self.o.forward(&y)
    }
}

struct Mlp {
    /// Gate and up, stacked: `[T, 2 * intermediate]`.
    gate_up: StackedLinear,
    down: Linear,
    /// SwiGLU as a CPU loop (see `layers::fast_ops_enabled`).
    fast: bool,
}

impl Mlp {
    fn load(w: &Weights<'_>, cfg: &DecoderConfig, l: usize) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Mlp {
            gate_up: StackedLinear::new(vec![
                w.linear(TensorName::Gate(l), None, i, h)?,
                w.linear(TensorName::Up(l), None, i, h)?,
            ])?,
            down: w.linear(TensorName::Down(l), None, h, i)?,
            fast: crate::layers::fast_ops_enabled(),
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gu = self.gate_up.forward_joined(x)?;
        self.down.forward(&crate::layers::silu_mul(&gu, self.fast)?)
    }
}

struct Block {
    attn_norm: RmsNorm,
    attn: Attention,
    mlp_norm: RmsNorm,
    mlp: Mlp,
    /// Residual adds as a CPU loop (see `layers::residual_add`).
    fast: bool,
}

impl Block {
    fn load(w: &Weights<'_>, cfg: &DecoderConfig, l: usize) -> Result<Self> {
        let h = cfg.hidden_size;
        Ok(Block {
            attn_norm: RmsNorm::new(w.tensor(TensorName::AttnNorm(l), &[h])?, cfg.rms_norm_eps),
            attn: Attention::load(w, cfg, l)?,
            mlp_norm: RmsNorm::new(w.tensor(TensorName::MlpNorm(l), &[h])?, cfg.rms_norm_eps),
            mlp: Mlp::load(w, cfg, l)?,
            fast: crate::layers::fast_ops_enabled(),
        })
    }

    fn forward(&self, x: &Tensor, step: &Step<'_>, layer: usize, cache: &mut dyn KvCache) -> Result<Tensor> {
        let h = self.attn.forward(&self.attn_norm.forward(x)?, step, layer, cache)?;
        let x = residual_add(&h, x, self.fast)?;
        let y = self.mlp.forward(&self.mlp_norm.forward(&x)?)?;
        residual_add(&y, &x, self.fast)
    }
}

/// Per-step state shared by all layers.
struct Step<'a> {
    batch: &'a PackedBatch,
    rope: &'a RotaryEmbedding,
    tables: RopeTables,
    sliding_window: Option<usize>,
}

/// The decoder: embedding, blocks, final norm and output projection.
pub struct LlamaDecoder {
    cfg: DecoderConfig,
    embed: Tensor,
    blocks: Vec<Block>,
    norm: RmsNorm,
    lm_head: Linear,
    rope: RotaryEmbedding,
    device: Device,
    dtype: DType,
}

impl LlamaDecoder {
    pub fn load(w: &Weights<'_>, cfg: &DecoderConfig) -> Result<Self> {
        let (embed, lm_head) = w.embedding_and_head(cfg.vocab_size, cfg.hidden_size, cfg.tie_embeddings)?;
        crate::host_memory::protect_tensor(&embed);
        let blocks = (0..cfg.num_layers).map(|l| Block::load(w, cfg, l)).collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::new(w.tensor(TensorName::FinalNorm, &[cfg.hidden_size])?, cfg.rms_norm_eps);
        Ok(LlamaDecoder {
            cfg: cfg.clone(),
            embed,
            blocks,
            norm,
            lm_head,
            rope: RotaryEmbedding::new(cfg),
            device: w.device().clone(),
            dtype: w.dtype(),
        })
    }

    pub fn config(&self) -> &DecoderConfig {
        &self.cfg
    }
    pub fn device(&self) -> &Device {
        &self.device
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Logits (f32) of each sequence's last position in `batch` (of every
    /// position for the sequences [`PackedBatch::want_every_position`] names),
    /// `[rows, vocab]` in span order. The batch must have been validated
    /// against the cache (see `Model::forward`).
    pub fn forward(&self, batch: &PackedBatch, cache: &mut dyn KvCache) -> Result<Tensor> {
        let tokens = Tensor::new(batch.tokens(), &self.device)?;
        let mut x = self.embed.index_select(&tokens, 0)?;
        let tables = self.rope.tables(batch.positions(), &self.device, self.dtype)?;
        let step = Step { batch, rope: &self.rope, tables, sliding_window: self.cfg.sliding_window };
        for (l, block) in self.blocks.iter().enumerate() {
            x = block.forward(&x, &step, l, cache)?;
        }
        let rows = batch.logit_rows();
        let x = if rows.len() == batch.num_tokens() {
            x
        } else {
            x.index_select(&Tensor::new(rows.as_slice(), &self.device)?, 0)?
        };
        let logits = self.lm_head.forward(&self.norm.forward(&x)?)?;
        Ok(logits.to_dtype(DType::F32)?)
    }
}
