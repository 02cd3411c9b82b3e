//! Salus server: HTTP API, authentication, audit trail, sealed weights,
//! scheduling, configuration and observability.

pub mod seal;
pub mod secret;
pub mod audit;
pub mod engine;
pub mod scheduler;
pub mod api;
pub mod app;
pub mod auth;
pub mod config;
pub mod metrics;
pub mod served_model;
pub mod state;
pub mod observability;
pub mod tls;
#[cfg(test)]
mod app_tests;
