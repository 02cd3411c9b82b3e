//! Salus server: the OpenAI-compatible HTTP API, authentication, the
//! continuous-batching engine, configuration and observability.
//!
//! The audit trail (`salus-audit`), the sealed-weights format (`salus-seal`)
//! and the sensitive-data types (`salus-sensitive`) are crates of their own:
//! each is specified on its own and used by the CLI without a server.

pub mod admin_events;
pub mod api;
pub mod app;
pub mod audit_forward;
pub mod audit_ship;
pub mod auth;
pub mod config;
pub mod engine;
pub mod listener;
pub mod metrics;
pub mod observability;
pub mod reviews;
pub mod scheduler;
pub mod served_model;
pub mod state;
pub mod telemetry;
pub mod tls;
