//! Salus model layer: Llama-family decoders on candle, weights loaded from
//! in-memory bytes, tokenizers, chat templates, KV caches and sampling.
//!
//! The central seam is [`model::Model::forward`]: it takes a [`batch::PackedBatch`]
//! — several sequences, each at its own position, each contributing a prefill
//! chunk or a single decode token — and returns the last-position logits of each
//! sequence. Continuous batching builds on exactly this call.
//!
//! Weights never come from a path inside this crate: callers hand over bytes
//! ([`source::ModelSource`]), so that sealed (encrypted) weights can be decrypted
//! into process memory and passed in without plaintext ever touching the disk.

pub mod batch;
pub mod block_pool;
pub mod chat;
pub mod config;
pub mod decoder;
pub mod detok;
pub mod dev_model;
pub mod device_check;
pub mod error;
pub mod grammar;
mod host_memory;
pub mod kernel_config;
pub mod kv_cache;
pub mod layers;
pub mod linear;
pub mod llama;
pub mod mistral;
pub mod model;
pub mod paged_cache;
/// The paged KV cache's CUDA storage and attention (feature `cuda`).
#[cfg(feature = "cuda")]
pub mod paged_cache_cuda;

pub mod qlinear;
pub mod qwen2;
pub mod sampling;
pub mod single_stream;
pub mod source;
pub mod stop;
pub mod tokenizer;
pub mod tool_calls;
pub mod weights;

pub use batch::{PackedBatch, SeqId, SeqSpan};
pub use chat::{ChatMessage, ChatTemplate, Role};
pub use config::{Architecture, DecoderConfig};
pub use decoder::{choice_seed, ChoiceDecoder, DecodeParams, DecodeStep, FinishReason, TokenLogprob};
pub use detok::StreamDecoder;
pub use error::ModelError;
pub use grammar::{CompiledGrammar, ConstraintKind, ConstraintSpec, GrammarCompiler, GrammarError};
pub use kernel_config::{KernelBackend, KernelConfig};
pub use kv_cache::{ContiguousKvCache, KvCache};
pub use model::{load, LoadOptions, LoadedModel, Model, ModelInfo};
pub use salus_sensitive::Phi;
pub use sampling::{Sampled, Sampler, SamplingParams};
pub use single_stream::{run_single_stream, SingleStreamOutput, SingleStreamParams, Timings};
pub use source::{ModelSource, WeightBytes};
pub use stop::{StopMatcher, StopStep};
pub use tokenizer::Tokenizer;

pub type Result<T> = std::result::Result<T, ModelError>;
