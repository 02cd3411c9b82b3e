//! `[telemetry]`: OpenTelemetry traces of every request, exported over OTLP
//! (see `crate::telemetry` for what a span may carry).
//!
//! Checked at start-up like every key: a bad endpoint or ratio is a one-line
//! error naming the key, before the trail is opened or the model loaded.

use std::path::PathBuf;

use serde::Deserialize;

use super::{bad, ConfigError};

/// How spans travel to the collector.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
pub enum OtlpProtocol {
    /// OTLP/HTTP with protobuf bodies (`POST <endpoint>/v1/traces`, port 4318).
    #[default]
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
    /// OTLP/gRPC (port 4317).
    #[serde(rename = "grpc")]
    Grpc,
}

/// `[telemetry]`. The section being present (with `enabled`, the default)
/// turns trace export on.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// `false` keeps the section but exports nothing.
    pub enabled: bool,
    /// The collector: `http://` or `https://` URL. For `http/protobuf` a URL
    /// without a path gets `/v1/traces` (as `OTEL_EXPORTER_OTLP_ENDPOINT`);
    /// one with a path is used as it is.
    pub endpoint: String,
    /// `"http/protobuf"` (default) or `"grpc"`.
    pub protocol: OtlpProtocol,
    /// PEM CA certificates trusted for an `https://` endpoint; unset: the system's roots.
    pub ca_file: Option<PathBuf>,
    /// Fraction of new traces sampled, 0.0 to 1.0.
    pub sample_ratio: f64,
    /// A valid `traceparent` from the client decides whether its request is
    /// sampled (its sampled flag), as W3C Trace Context intends; `false`:
    /// `sample_ratio` decides for every request (the trace id is still the client's).
    pub follow_client_sampling: bool,
    /// `/health`, `/ready` and `/metrics` get spans too (probes are frequent
    /// and tell little; off by default).
    pub trace_probes: bool,
    /// `service.name` of the exported resource.
    pub service_name: String,
    /// Most milliseconds between two exports of the batch.
    pub batch_delay_ms: u64,
    /// Most spans waiting for export; more are dropped (export never slows a request).
    pub max_queued_spans: usize,
    /// Seconds one export may take before it is abandoned.
    pub export_timeout_secs: u64,
    /// At shutdown, seconds spent exporting what is still queued.
    pub shutdown_flush_secs: u64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            enabled: true,
            endpoint: String::new(),
            protocol: OtlpProtocol::default(),
            ca_file: None,
            sample_ratio: 1.0,
            follow_client_sampling: true,
            trace_probes: false,
            service_name: "salus".into(),
            batch_delay_ms: 5000,
            max_queued_spans: 2048,
            export_timeout_secs: 10,
            shutdown_flush_secs: 5,
        }
    }
}

impl TelemetryConfig {
    /// Checks every key (the CA file is read when the exporter starts).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.enabled {
            return Ok(());
        }
        let scheme = self.endpoint.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
        let Some(scheme) = scheme.filter(|s| s == "http" || s == "https") else {
            return Err(bad(
                "telemetry.endpoint",
                "must be an http:// or https:// URL of the OTLP collector (e.g. http://127.0.0.1:4318)",
            ));
        };
        if self.endpoint.parse::<axum::http::Uri>().map_or(true, |u| u.host().is_none()) {
            return Err(bad("telemetry.endpoint", "is not a valid URL with a host"));
        }
        if self.ca_file.is_some() && scheme != "https" {
            return Err(bad("telemetry.ca_file", "applies to an https:// endpoint only"));
        }
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            return Err(bad("telemetry.sample_ratio", "must be between 0.0 and 1.0"));
        }
        let name_ok = !self.service_name.is_empty()
            && self.service_name.len() <= 128
            && self.service_name.bytes().all(|b| b.is_ascii_graphic());
        if !name_ok {
            return Err(bad("telemetry.service_name", "use 1-128 printable ASCII characters, no spaces"));
        }
        for (key, v, max) in [
            ("telemetry.batch_delay_ms", self.batch_delay_ms, 60_000),
            ("telemetry.max_queued_spans", self.max_queued_spans as u64, 1 << 20),
            ("telemetry.export_timeout_secs", self.export_timeout_secs, 300),
        ] {
            if v == 0 || v > max {
                return Err(bad(key, format!("must be 1 to {max}")));
            }
        }
        if self.shutdown_flush_secs > 300 {
            return Err(bad("telemetry.shutdown_flush_secs", "must be at most 300"));
        }
        Ok(())
    }

    /// The URL spans are sent to: `/v1/traces` added to a bare OTLP/HTTP endpoint.
    pub fn export_url(&self) -> String {
        let bare =
            self.endpoint.split_once("://").is_some_and(|(_, rest)| rest.trim_end_matches('/').find('/').is_none());
        match self.protocol {
            OtlpProtocol::HttpProtobuf if bare => format!("{}/v1/traces", self.endpoint.trim_end_matches('/')),
            _ => self.endpoint.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_endpoint(endpoint: &str) -> TelemetryConfig {
        TelemetryConfig { endpoint: endpoint.into(), ..TelemetryConfig::default() }
    }

    #[test]
    fn bare_http_endpoints_get_the_traces_path() {
        assert_eq!(with_endpoint("http://127.0.0.1:4318").export_url(), "http://127.0.0.1:4318/v1/traces");
        assert_eq!(with_endpoint("http://127.0.0.1:4318/").export_url(), "http://127.0.0.1:4318/v1/traces");
        assert_eq!(
            with_endpoint("https://otel.example/custom/traces").export_url(),
            "https://otel.example/custom/traces"
        );
        let grpc = TelemetryConfig { protocol: OtlpProtocol::Grpc, ..with_endpoint("http://127.0.0.1:4317") };
        assert_eq!(grpc.export_url(), "http://127.0.0.1:4317");
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases: [(TelemetryConfig, &str); 7] = [
            (with_endpoint(""), "telemetry.endpoint"),
            (with_endpoint("ftp://x:1"), "telemetry.endpoint"),
            (with_endpoint("http://"), "telemetry.endpoint"),
            (TelemetryConfig { sample_ratio: 1.5, ..with_endpoint("http://a:1") }, "telemetry.sample_ratio"),
            (TelemetryConfig { ca_file: Some("/ca.pem".into()), ..with_endpoint("http://a:1") }, "telemetry.ca_file"),
            (TelemetryConfig { service_name: "a b".into(), ..with_endpoint("http://a:1") }, "telemetry.service_name"),
            (TelemetryConfig { batch_delay_ms: 0, ..with_endpoint("http://a:1") }, "telemetry.batch_delay_ms"),
        ];
        for (cfg, key) in cases {
            match cfg.validate() {
                Err(ConfigError::Value { key: k, .. }) => assert_eq!(k, key),
                other => panic!("{key}: {other:?}"),
            }
        }
        assert!(with_endpoint("https://otel.example:4318").validate().is_ok());
        assert!(TelemetryConfig { enabled: false, ..TelemetryConfig::default() }.validate().is_ok());
    }
}
