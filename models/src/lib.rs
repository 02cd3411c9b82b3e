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
pub mod error;
pub mod phi;
pub mod source;

pub use batch::{PackedBatch, SeqId, SeqSpan};
pub use error::ModelError;
pub use phi::Phi;
pub use source::{ModelSource, WeightBytes};

pub type Result<T> = std::result::Result<T, ModelError>;
