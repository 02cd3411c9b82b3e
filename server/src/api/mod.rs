//! The OpenAI-compatible HTTP API: request validation, handlers, error objects.

pub mod chat;
pub mod error;
pub mod generate;
pub mod inference_audit;
pub mod json;
pub mod meta;
pub mod types;

pub use error::ApiError;
