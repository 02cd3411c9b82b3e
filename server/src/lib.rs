//! Salus server: HTTP API, authentication, audit trail, sealed weights,
//! scheduling, configuration and observability.
