//! The public model: loading from a [`ModelSource`] and the packed forward pass.
//!
//! Loading detects the format (GGUF or a Hugging Face safetensors directory) and
//! the architecture, parses and validates the configuration, reads the tensors
//! from the in-memory bytes and builds the tokenizer and chat template. Nothing
//! here touches the filesystem.

use candle_core::{DType, Device, Tensor};

use crate::batch::{check_spans, PackedBatch};
use crate::chat::ChatTemplate;
use crate::config::{Architecture, DecoderConfig};
use crate::kv_cache::{ContiguousKvCache, KvCache};
use crate::llama::{config_from_gguf, LlamaConfig, LlamaDecoder};
use crate::mistral::MistralConfig;
use crate::qwen2::Qwen2Config;
use crate::source::ModelSource;
use crate::tokenizer::Tokenizer;
use crate::weights::{GgufFile, SafetensorsFiles, Weights};
use crate::{ModelError, Result};

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    /// Compute dtype of activations and dense weights (f32 on CPU; bf16 on CUDA later).
    pub dtype: DType,
    /// Jinja chat template used instead of the model's own.
    pub chat_template_override: Option<String>,
    /// Which kernels run the model, applied when it is loaded (the server and
    /// the CLI pass the `[kernels]` section). `None` leaves the process's
    /// current selection as it is (tests switch it with
    /// [`crate::qlinear::set_salus_kernels_enabled`]).
    pub kernels: Option<crate::kernel_config::KernelConfig>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions { device: Device::Cpu, dtype: DType::F32, chat_template_override: None, kernels: None }
    }
}

/// Facts about a loaded model (safe to log: no weights, no prompts).
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInfo {
    pub name: String,
    pub architecture: Architecture,
    pub context_length: usize,
    pub vocab_size: usize,
    pub eos_token_ids: Vec<u32>,
    pub bos_token_id: Option<u32>,
    pub num_params: usize,
    /// GGUF quantization types of the linear layers (e.g. `Q4_1+Q8_0`) or the
    /// safetensors dtype (e.g. `BF16`).
    pub quantization: String,
}

/// Everything needed to serve a model.
pub struct LoadedModel {
    pub model: Model,
    pub tokenizer: Tokenizer,
    /// The model's (or the configured) chat template; `None` if it has none.
    pub chat_template: Option<ChatTemplate>,
    pub info: ModelInfo,
}

/// Loads network, tokenizer and chat template from in-memory files.
///
/// End-of-generation ids are the config's EOS ids followed by the tokenizer's
/// end-of-turn tokens (`<|im_end|>`, `<|eot_id|>`…).
pub fn load(source: &ModelSource, opts: &LoadOptions) -> Result<LoadedModel> {
    if let Some(k) = &opts.kernels {
        k.apply()?;
    }
    let gguf = match source.gguf() {
        Some((file, bytes)) => Some(GgufFile::parse(file, bytes.as_slice())?),
        None => None,
    };
    let (model, mut info) = Model::load_parsed(source, gguf.as_ref(), opts)?;
    let md = gguf.as_ref().map(|g| g.metadata());
    let tokenizer = Tokenizer::from_source(source, md)?;
    let chat_template = ChatTemplate::from_source(source, md, opts.chat_template_override.as_deref())?;
    for &id in tokenizer.eos_token_ids() {
        if !info.eos_token_ids.contains(&id) && (id as usize) < info.vocab_size {
            info.eos_token_ids.push(id);
        }
    }
    if info.bos_token_id.is_none() {
        info.bos_token_id = tokenizer.bos_token_id();
    }
    Ok(LoadedModel { model, tokenizer, chat_template, info })
}

/// A Llama-family decoder ready to run.
pub struct Model {
    decoder: LlamaDecoder,
}

impl Model {
    /// Loads only the network (no tokenizer) from a source.
    pub fn load_weights(source: &ModelSource, opts: &LoadOptions) -> Result<(Model, ModelInfo)> {
        let gguf = match source.gguf() {
            Some((file, bytes)) => Some(GgufFile::parse(file, bytes.as_slice())?),
            None => None,
        };
        Self::load_parsed(source, gguf.as_ref(), opts)
    }

    fn load_parsed(
        source: &ModelSource,
        gguf: Option<&GgufFile<'_>>,
        opts: &LoadOptions,
    ) -> Result<(Model, ModelInfo)> {
        let (decoder, num_params, quantization) = if let Some(gguf) = gguf {
            let file = &gguf.file;
            let arch_name =
                gguf.metadata().get("general.architecture").and_then(|v| v.to_string().ok()).ok_or_else(|| {
                    ModelError::InvalidConfig(format!("{file}: GGUF metadata general.architecture missing"))
                })?;
            let architecture = Architecture::from_name(arch_name)?;
            let vocab = gguf
                .content
                .tensor_infos
                .get("token_embd.weight")
                .ok_or_else(|| ModelError::Tensor {
                    name: "token_embd.weight".into(),
                    reason: "missing from the weights".into(),
                })?
                .shape
                .dims()
                .first()
                .copied()
                .unwrap_or(0);
            let cfg = config_from_gguf(gguf.metadata(), architecture, vocab)?;
            let w = Weights::from_gguf(gguf, &opts.device, opts.dtype);
            let decoder = LlamaDecoder::load(&w, &cfg)?;
            (decoder, w.num_params(), w.quantization())
        } else {
            let shards: Vec<(&str, &[u8])> = source.safetensors().into_iter().map(|(n, b)| (n, b.as_slice())).collect();
            if shards.is_empty() {
                return Err(ModelError::InvalidWeights {
                    file: source.name.clone(),
                    reason: "no .gguf or .safetensors file in the model source".into(),
                });
            }
            let cfg = hf_config(source)?;
            let files = SafetensorsFiles::parse(&shards)?;
            let w = Weights::from_safetensors(&files, &opts.device, opts.dtype);
            let decoder = LlamaDecoder::load(&w, &cfg)?;
            (decoder, w.num_params(), w.safetensors_dtype().unwrap_or_default())
        };
        let cfg = decoder.config();
        let info = ModelInfo {
            name: source.name.clone(),
            architecture: cfg.architecture,
            context_length: cfg.max_context,
            vocab_size: cfg.vocab_size,
            eos_token_ids: cfg.eos_token_ids.clone(),
            bos_token_id: cfg.bos_token_id,
            num_params,
            quantization,
        };
        Ok((Model { decoder }, info))
    }

    pub fn config(&self) -> &DecoderConfig {
        self.decoder.config()
    }

    /// Builds the network from any weight source for a given configuration
    /// (e.g. [`Weights::synthetic`] for device-parity tests and benchmarks).
    pub fn from_weights(w: &Weights<'_>, cfg: &DecoderConfig) -> Result<Model> {
        Ok(Model { decoder: LlamaDecoder::load(w, cfg)? })
    }

    pub fn device(&self) -> &Device {
        self.decoder.device()
    }

    /// The KV cache single-stream generation uses: on CPU, the paged cache the
    /// server's scheduler uses (same attention kernel, f32 storage, default
    /// block size), sized for one sequence of up to `tokens` tokens; elsewhere
    /// a contiguous cache.
    pub fn new_sequence_cache(&self, tokens: usize) -> Result<Box<dyn KvCache>> {
        let c = self.config();
        if !self.device().is_cpu() {
            return Ok(Box::new(self.new_cache()));
        }
        let block_size = crate::paged_cache::DEFAULT_BLOCK_SIZE;
        let cfg = crate::paged_cache::PagedCacheConfig {
            num_layers: c.num_layers,
            num_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            block_size,
            num_blocks: tokens.clamp(1, c.max_context).div_ceil(block_size),
            dtype: crate::paged_cache::KvDtype::F32,
        };
        Ok(Box::new(crate::paged_cache::PagedKvCache::new(cfg)?))
    }

    /// A contiguous KV cache sized for this model (the reference attention path).
    pub fn new_cache(&self) -> ContiguousKvCache {
        let c = self.config();
        ContiguousKvCache::new(
            c.num_layers,
            c.num_kv_heads,
            c.head_dim,
            c.max_context,
            self.decoder.dtype(),
            self.device(),
        )
    }

    /// Runs one step over a packed batch and returns the last-position logits
    /// (f32) of each sequence, in span order: `[num_seqs, vocab]`, or more rows
    /// when the batch wants every position of some sequences
    /// ([`PackedBatch::logit_rows`]).
    ///
    /// Every span must continue its sequence exactly where the cache ends
    /// (`start_pos == cache.seq_len(seq)`) and stay within the context window;
    /// token ids must be inside the vocabulary.
    pub fn forward(&self, batch: &PackedBatch, cache: &mut dyn KvCache) -> Result<Tensor> {
        if batch.is_empty() {
            return Err(ModelError::InvalidBatch("empty batch".into()));
        }
        let cfg = self.config();
        check_spans(batch.spans(), batch.num_tokens(), Some(cfg.max_context), |seq| cache.seq_len(seq))?;
        if let Some(&t) = batch.tokens().iter().find(|&&t| t as usize >= cfg.vocab_size) {
            return Err(ModelError::InvalidBatch(format!(
                "token id {t} is outside the vocabulary ({})",
                cfg.vocab_size
            )));
        }
        self.decoder.forward(batch, cache)
    }
}

/// Reads `config.json` and maps it to the architecture's validated config.
fn hf_config(source: &ModelSource) -> Result<DecoderConfig> {
    let bytes = source
        .get("config.json")
        .ok_or_else(|| ModelError::InvalidConfig("config.json is missing from the model directory".into()))?;
    let value: serde_json::Value = serde_json::from_slice(bytes.as_slice())
        .map_err(|e| ModelError::InvalidConfig(format!("config.json is not valid JSON: {e}")))?;
    let arch_name = value
        .get("model_type")
        .and_then(|v| v.as_str())
        .or_else(|| value.get("architectures").and_then(|a| a.get(0)).and_then(|v| v.as_str()))
        .ok_or_else(|| ModelError::InvalidConfig("config.json names no model_type or architectures".into()))?;
    let parse_err = |e: serde_json::Error| ModelError::InvalidConfig(format!("config.json: {e}"));
    match Architecture::from_name(arch_name)? {
        Architecture::Llama => serde_json::from_value::<LlamaConfig>(value).map_err(parse_err)?.into_config(),
        Architecture::Mistral => serde_json::from_value::<MistralConfig>(value).map_err(parse_err)?.into_config(),
        Architecture::Qwen2 => serde_json::from_value::<Qwen2Config>(value).map_err(parse_err)?.into_config(),
    }
}
