//! The OpenAI-compatible HTTP API.
//!
//! A generation request flows: [`completions`] (handlers: validate with
//! [`types`], compile any output constraint with [`structured`], encode the
//! prompt) → [`generation`] (limits, audit start,
//! submission to the engine, accounting and the audit outcome) → one of two
//! consumers: [`response::respond_whole`] (one JSON body) or
//! [`sse::respond_stream`] (Server-Sent Events), both building their JSON with
//! [`response::ResponseBuilder`].

pub mod audit_events;
pub mod completions;
pub mod error;
pub mod generation;
pub mod inference_audit;
pub mod json;
pub mod meta;
pub mod response;
pub mod reviews;
pub mod sse;
pub mod structured;
pub mod tokenize;
pub mod tools;
pub mod types;

pub use error::ApiError;
