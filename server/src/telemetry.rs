//! OpenTelemetry traces of requests, exported over OTLP, without PHI.
//!
//! # Why spans are built here, not bridged from `tracing`
//!
//! A bridge (`tracing-opentelemetry`) turns every `tracing` span of every crate
//! into an exported span with all its fields; one careless field in a
//! dependency would ship request data to a collector on another host. Here a
//! request's spans are assembled once, when the request is done, from timings
//! the server recorded, and the types allow nothing else: a span's name is one
//! of a fixed set, its attributes are the keys of [`SPAN_ATTRIBUTES`] with
//! values that are ids, fixed codes, counts or the configured model id. No
//! prompt, completion, header value, query string, schema or tool text can
//! reach a span.
//!
//! # The spans of one request
//!
//! * `"{method} {route}"` (server kind), the whole request from the first byte
//!   to the last one of its response (for a stream, its end): method, route
//!   *template*, status, Salus' request id, the principal id, the model and
//!   token counts for the completion routes, the error code.
//! * Children, when the request generated: `queue` (submitted → first scheduled
//!   by the engine), `prefill` (→ first token sampled), `decode` (→ last choice
//!   finished), and one `audit.write` per inference record written on the
//!   request's path (`inference.started`, then the outcome).
//!
//! A valid W3C `traceparent` from the client makes the request span its child
//! (same trace id); an invalid one is ignored (a new trace starts). `tracestate`
//! is never read: it is free text from the client and would be copied into
//! every exported span.
//!
//! # Export never slows a request
//!
//! Spans are handed to the SDK's batch processor (a bounded queue: when it is
//! full, spans are dropped, and the request goes on); export runs on the
//! processor's own thread with a timeout. Failures are counted
//! (`salus_trace_export_failures_total`) and logged at most once a minute,
//! without the collector's answer.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use axum::http::HeaderMap;
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{Span as _, SpanKind, Status, TraceContextExt, Tracer as _, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig, WithTonicConfig};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracer, SdkTracerProvider, SpanData, SpanExporter,
};
use opentelemetry_sdk::Resource;

use crate::config::{OtlpProtocol, TelemetryConfig};

/// Every attribute key a span can carry.
pub const SPAN_ATTRIBUTES: &[&str] = &[
    "http.request.method",
    "http.route",
    "http.response.status_code",
    "error.type",
    "salus.request_id",
    "salus.principal",
    "gen_ai.operation.name",
    "gen_ai.request.model",
    "gen_ai.usage.input_tokens",
    "gen_ai.usage.output_tokens",
    "salus.cached_prompt_tokens",
    "salus.audit.event",
    "salus.audit.written",
];

/// Errors starting the exporter (operator configuration; never request data).
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// `telemetry.ca_file` cannot be read or holds no certificate.
    #[error("telemetry.ca_file: {0}")]
    CaFile(String),
    /// The OTLP exporter refused its settings.
    #[error("telemetry: the OTLP exporter cannot start: {0}")]
    Exporter(String),
}

/// A stretch of a request's work, a child span of its request span.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TracePhase {
    /// Submitted to the engine → first scheduled.
    Queue,
    /// First scheduled → first token; prompt tokens served from the prefix cache.
    Prefill { cached_prompt_tokens: usize },
    /// First token → last choice finished.
    Decode { completion_tokens: usize },
    /// One audit record written on the request's path (`event`: its kind);
    /// `written`: durable (false: the write failed).
    AuditWrite { event: &'static str, written: bool },
}

impl TracePhase {
    fn name(&self) -> &'static str {
        match self {
            TracePhase::Queue => "queue",
            TracePhase::Prefill { .. } => "prefill",
            TracePhase::Decode { .. } => "decode",
            TracePhase::AuditWrite { .. } => "audit.write",
        }
    }

    fn attributes(&self) -> Vec<KeyValue> {
        match *self {
            TracePhase::Queue => Vec::new(),
            TracePhase::Prefill { cached_prompt_tokens } => {
                vec![KeyValue::new("salus.cached_prompt_tokens", count(cached_prompt_tokens))]
            }
            TracePhase::Decode { completion_tokens } => {
                vec![KeyValue::new("gen_ai.usage.output_tokens", count(completion_tokens))]
            }
            TracePhase::AuditWrite { event, written } => {
                vec![KeyValue::new("salus.audit.event", event), KeyValue::new("salus.audit.written", written)]
            }
        }
    }
}

fn count(n: usize) -> i64 {
    n.min(i64::MAX as usize) as i64
}

/// How a request ended, for its request span.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestOutcome<'a> {
    pub request_id: &'a str,
    /// The authenticated principal's id (none when authentication failed).
    pub principal: Option<&'a str>,
    pub status: u16,
    /// The fixed error code of an error response ("" when none).
    pub error_code: &'a str,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

/// The recorded spans of one request, exported when it ends ([`Self::end`]).
pub struct RequestTrace {
    tracer: SdkTracer,
    /// The client's valid `traceparent`, or an empty context.
    parent: Context,
    method: &'static str,
    route: &'static str,
    /// The served model id, on the completion routes.
    model: Option<Arc<str>>,
    /// The request's start, as wall-clock time and as an instant.
    start: (SystemTime, Instant),
    phases: Vec<(TracePhase, Instant, Instant)>,
}

impl std::fmt::Debug for RequestTrace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestTrace").field("route", &self.route).field("phases", &self.phases.len()).finish()
    }
}

impl RequestTrace {
    /// Records `phase` from `start` to `end`.
    pub fn phase(&mut self, phase: TracePhase, start: Instant, end: Instant) {
        // Clamped into the request span when it ends.
        self.phases.push((phase, start, end));
    }

    /// Wall-clock time of `at`, never before the request's start.
    fn wall(&self, at: Instant) -> SystemTime {
        self.start.0 + at.saturating_duration_since(self.start.1)
    }

    /// Builds the spans (the request span ends now) and hands them to the exporter.
    pub fn end(self, outcome: RequestOutcome<'_>) {
        let end = Instant::now();
        let mut attributes = vec![
            KeyValue::new("http.request.method", self.method),
            KeyValue::new("http.response.status_code", i64::from(outcome.status)),
            KeyValue::new("salus.request_id", outcome.request_id.to_string()),
        ];
        // An unknown path is named by its method alone (HTTP semantic conventions).
        let known = self.route != "other";
        let name = if known { format!("{} {}", self.method, self.route) } else { self.method.to_string() };
        if known {
            attributes.push(KeyValue::new("http.route", self.route));
        }
        if let Some(p) = outcome.principal.filter(|p| !p.is_empty()) {
            attributes.push(KeyValue::new("salus.principal", p.to_string()));
        }
        if !outcome.error_code.is_empty() {
            attributes.push(KeyValue::new("error.type", outcome.error_code.to_string()));
        }
        if let Some(model) = &self.model {
            let operation = if self.route == "/v1/chat/completions" { "chat" } else { "text_completion" };
            attributes.push(KeyValue::new("gen_ai.operation.name", operation));
            attributes.push(KeyValue::new("gen_ai.request.model", model.to_string()));
            attributes.push(KeyValue::new("gen_ai.usage.input_tokens", count(outcome.prompt_tokens)));
            attributes.push(KeyValue::new("gen_ai.usage.output_tokens", count(outcome.completion_tokens)));
        }
        let mut root = self
            .tracer
            .span_builder(name)
            .with_kind(SpanKind::Server)
            .with_start_time(self.start.0)
            .with_attributes(attributes)
            .start_with_context(&self.tracer, &self.parent);
        if !root.is_recording() {
            return; // Not sampled.
        }
        if outcome.status >= 500 {
            root.set_status(Status::error(outcome.error_code.to_string()));
        }
        let cx = Context::new().with_span(root);
        for &(phase, start, stop) in &self.phases {
            // Inside the request span, whatever the engine's clock said.
            let start = start.min(end);
            let mut span = self
                .tracer
                .span_builder(phase.name())
                .with_kind(SpanKind::Internal)
                .with_start_time(self.wall(start))
                .with_attributes(phase.attributes())
                .start_with_context(&self.tracer, &cx);
            span.end_with_timestamp(self.wall(stop.clamp(start, end)));
        }
        cx.span().end_with_timestamp(self.wall(end));
    }
}

/// Reads only `traceparent` from the request headers.
struct TraceparentOnly<'a>(&'a HeaderMap);

impl Extractor for TraceparentOnly<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            "traceparent" => self.0.get("traceparent").and_then(|v| v.to_str().ok()),
            _ => None,
        }
    }
    fn keys(&self) -> Vec<&str> {
        vec!["traceparent"]
    }
}

struct Exporting {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    trace_probes: bool,
    shutdown_flush: Duration,
}

/// The process' trace export: off, or an OTLP exporter behind a batch processor.
pub struct Telemetry {
    exporting: Option<Exporting>,
    model: Arc<str>,
}

impl Telemetry {
    /// No traces.
    pub fn disabled() -> Self {
        Telemetry { exporting: None, model: Arc::from("") }
    }

    /// Starts the OTLP exporter of `config` (spans of `model`, from replica
    /// `instance`). Call inside a Tokio runtime context (the gRPC channel
    /// runs its connection there) but not on one of its workers.
    pub fn start(
        config: &TelemetryConfig,
        model: &str,
        instance: &str,
        counters: Arc<TraceCounters>,
    ) -> Result<Self, TelemetryError> {
        if !config.enabled {
            return Ok(Telemetry::disabled());
        }
        let timeout = Duration::from_secs(config.export_timeout_secs);
        let exporter = match config.protocol {
            OtlpProtocol::HttpProtobuf => {
                let tls = crate::tls::client_config(config.ca_file.as_deref()).map_err(TelemetryError::CaFile)?;
                // A blocking client: the batch processor exports on its own thread.
                let client = reqwest::blocking::Client::builder()
                    .use_preconfigured_tls(tls)
                    .timeout(timeout)
                    .redirect(reqwest::redirect::Policy::none())
                    .build()
                    .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
                opentelemetry_otlp::SpanExporter::builder()
                    .with_http()
                    .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                    .with_endpoint(config.export_url())
                    .with_timeout(timeout)
                    .with_http_client(client)
                    .build()
            }
            OtlpProtocol::Grpc => {
                let mut builder = opentelemetry_otlp::SpanExporter::builder()
                    .with_tonic()
                    .with_protocol(opentelemetry_otlp::Protocol::Grpc)
                    .with_endpoint(config.export_url())
                    .with_timeout(timeout);
                if config.endpoint.to_ascii_lowercase().starts_with("https://") {
                    builder = builder.with_tls_config(grpc_tls(config.ca_file.as_deref())?);
                }
                builder.build()
            }
        }
        .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
        let batch = BatchConfigBuilder::default()
            .with_max_queue_size(config.max_queued_spans)
            .with_scheduled_delay(Duration::from_millis(config.batch_delay_ms))
            .build();
        let processor = BatchSpanProcessor::builder(CountingExporter { inner: exporter, counters })
            .with_batch_config(batch)
            .build();
        let ratio = Sampler::TraceIdRatioBased(config.sample_ratio);
        let sampler = match config.follow_client_sampling {
            true => Sampler::ParentBased(Box::new(ratio)),
            false => ratio,
        };
        let resource = Resource::builder()
            .with_service_name(config.service_name.clone())
            .with_attributes([
                KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
                KeyValue::new("service.instance.id", instance.to_string()),
            ])
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_sampler(sampler)
            .with_resource(resource)
            .build();
        let shutdown_flush = Duration::from_secs(config.shutdown_flush_secs);
        Ok(Self::from_provider(provider, model, config.trace_probes, shutdown_flush))
    }

    /// Spans go to `exporter` as each one ends (tests).
    pub fn with_exporter(exporter: impl SpanExporter + 'static, model: &str, sampler: Sampler) -> Self {
        let provider = SdkTracerProvider::builder().with_simple_exporter(exporter).with_sampler(sampler).build();
        Self::from_provider(provider, model, false, Duration::from_secs(1))
    }

    fn from_provider(provider: SdkTracerProvider, model: &str, trace_probes: bool, shutdown_flush: Duration) -> Self {
        let tracer = provider.tracer("salus");
        Telemetry {
            exporting: Some(Exporting { provider, tracer, trace_probes, shutdown_flush }),
            model: Arc::from(model),
        }
    }

    /// Whether spans are exported.
    pub fn is_enabled(&self) -> bool {
        self.exporting.is_some()
    }

    /// The trace of a request that has just arrived (`None`: not traced).
    pub fn begin(&self, method: &'static str, route: &'static str, headers: &HeaderMap) -> Option<RequestTrace> {
        let e = self.exporting.as_ref()?;
        if !e.trace_probes && matches!(route, "/health" | "/ready" | "/metrics") {
            return None;
        }
        let parent = TraceContextPropagator::new().extract(&TraceparentOnly(headers));
        let parent = if parent.span().span_context().is_valid() { parent } else { Context::new() };
        let generates = matches!(route, "/v1/chat/completions" | "/v1/completions");
        Some(RequestTrace {
            tracer: e.tracer.clone(),
            parent,
            method,
            route,
            model: generates.then(|| self.model.clone()),
            start: (SystemTime::now(), Instant::now()),
            phases: Vec::new(),
        })
    }

    /// Exports what is queued (bounded by `telemetry.shutdown_flush_secs`) and
    /// stops the exporter. Blocking: call off the async workers.
    pub fn shutdown(&self) {
        if let Some(e) = &self.exporting {
            if let Err(err) = e.provider.shutdown_with_timeout(e.shutdown_flush) {
                tracing::warn!(error = %err, "telemetry: spans still queued at shutdown were not all exported");
            }
        }
    }
}

/// The TLS settings of an `https://` gRPC collector: `ca_file`, else the system's roots.
fn grpc_tls(
    ca_file: Option<&std::path::Path>,
) -> Result<opentelemetry_otlp::tonic_types::transport::ClientTlsConfig, TelemetryError> {
    use opentelemetry_otlp::tonic_types::transport::{Certificate, ClientTlsConfig};
    Ok(match ca_file {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|e| TelemetryError::CaFile(format!("{}: {e}", path.display())))?;
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem))
        }
        None => ClientTlsConfig::new().with_native_roots(),
    })
}

/// Exported spans and failed exports, for `/metrics`.
#[derive(Debug, Default)]
pub struct TraceCounters {
    exported: AtomicU64,
    failures: AtomicU64,
    /// When a failure was last logged (failures are logged at most once a minute).
    last_logged: Mutex<Option<Instant>>,
}

impl TraceCounters {
    /// Spans the collector accepted.
    pub fn exported(&self) -> u64 {
        self.exported.load(Ordering::Relaxed)
    }
    /// Exports that failed (their spans are dropped).
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    fn record(&self, spans: usize, result: &OTelSdkResult) {
        if result.is_ok() {
            self.exported.fetch_add(spans as u64, Ordering::Relaxed);
            return;
        }
        self.failures.fetch_add(1, Ordering::Relaxed);
        let mut last = self.last_logged.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
            *last = Some(Instant::now());
            // The SDK's error can quote the collector's answer: not logged.
            tracing::warn!(count = spans, "telemetry: a batch of spans could not be exported (dropped)");
        }
    }
}

/// Counts what the wrapped exporter sends.
#[derive(Debug)]
struct CountingExporter<E> {
    inner: E,
    counters: Arc<TraceCounters>,
}

impl<E: SpanExporter> SpanExporter for CountingExporter<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let n = batch.len();
        let result = self.inner.export(batch).await;
        self.counters.record(n, &result);
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

#[cfg(test)]
mod tests;
