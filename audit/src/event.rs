//! Audit events: what a caller hands to the log ([`AuditEvent`], a builder with
//! typed, non-PHI fields) and what the log stores ([`AuditRecord`]).
//!
//! Free text cannot get in: parameters are numbers and flags, the outcome reason
//! and operation are `&'static str` (compile-time strings, never request data),
//! the source is a `SocketAddr`, and prompt/completion appear only as a
//! [`TextHmac`], which only the log can compute.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The kinds of audit events.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventKind {
    InferenceStarted,
    InferenceCompleted,
    InferenceFailed,
    InferenceCancelled,
    /// Written by the log at start-up for an inference the last session
    /// started but never finished (the process died): every inference gets an outcome.
    InferenceInterrupted,
    AuthDenied,
    AdminKeyCreated,
    AdminKeyRevoked,
    AdminModelLoaded,
    AdminModelUnloaded,
    AdminConfigReloaded,
    /// An interactive principal's server-side session began (first request).
    SessionStarted,
    /// A session ran past its idle or absolute timeout (`detail.reason`).
    SessionExpired,
    /// A session ended otherwise: replaced by a new sign-in, or the server stopped.
    SessionEnded,
    /// A principal holding `break_glass` overrode a policy rule (`detail`:
    /// the rule and the reason given, encrypted like every record).
    AccessBreakGlass,
    /// A person reviewed a generated output (accepted, edited, rejected, escalated).
    ReviewRecorded,
    /// The trail was read over the API (who, the filter, how many records).
    AuditAccessed,
    ServerStarted,
    ServerStopped,
    AuditRecovered,
    AuditPurged,
}

impl EventKind {
    pub const ALL: [EventKind; 21] = [
        EventKind::InferenceStarted,
        EventKind::InferenceCompleted,
        EventKind::InferenceFailed,
        EventKind::InferenceCancelled,
        EventKind::InferenceInterrupted,
        EventKind::AuthDenied,
        EventKind::AdminKeyCreated,
        EventKind::AdminKeyRevoked,
        EventKind::AdminModelLoaded,
        EventKind::AdminModelUnloaded,
        EventKind::AdminConfigReloaded,
        EventKind::SessionStarted,
        EventKind::SessionExpired,
        EventKind::SessionEnded,
        EventKind::AccessBreakGlass,
        EventKind::ReviewRecorded,
        EventKind::AuditAccessed,
        EventKind::ServerStarted,
        EventKind::ServerStopped,
        EventKind::AuditRecovered,
        EventKind::AuditPurged,
    ];

    /// The dotted name stored in the trail (`inference.started`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::InferenceStarted => "inference.started",
            EventKind::InferenceCompleted => "inference.completed",
            EventKind::InferenceFailed => "inference.failed",
            EventKind::InferenceCancelled => "inference.cancelled",
            EventKind::InferenceInterrupted => "inference.interrupted",
            EventKind::AuthDenied => "auth.denied",
            EventKind::AdminKeyCreated => "admin.key_created",
            EventKind::AdminKeyRevoked => "admin.key_revoked",
            EventKind::AdminModelLoaded => "admin.model_loaded",
            EventKind::AdminModelUnloaded => "admin.model_unloaded",
            EventKind::AdminConfigReloaded => "admin.config_reloaded",
            EventKind::SessionStarted => "session.started",
            EventKind::SessionExpired => "session.expired",
            EventKind::SessionEnded => "session.ended",
            EventKind::AccessBreakGlass => "access.break_glass",
            EventKind::ReviewRecorded => "review.recorded",
            EventKind::AuditAccessed => "audit.accessed",
            EventKind::ServerStarted => "server.started",
            EventKind::ServerStopped => "server.stopped",
            EventKind::AuditRecovered => "audit.recovered",
            EventKind::AuditPurged => "audit.purged",
        }
    }

    pub fn parse(s: &str) -> Option<EventKind> {
        EventKind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// `server.*` and `audit.*` events are written only by the log itself.
    pub fn is_reserved(self) -> bool {
        matches!(
            self,
            EventKind::ServerStarted
                | EventKind::ServerStopped
                | EventKind::AuditRecovered
                | EventKind::AuditPurged
                | EventKind::InferenceInterrupted
        )
    }

    /// The FHIR `AuditEvent.action` this kind implies unless overridden.
    pub fn default_action(self) -> AuditAction {
        match self {
            EventKind::AdminKeyCreated => AuditAction::Create,
            EventKind::AdminKeyRevoked | EventKind::AuditPurged => AuditAction::Delete,
            EventKind::AdminConfigReloaded => AuditAction::Update,
            EventKind::ReviewRecorded => AuditAction::Create,
            EventKind::AuditAccessed => AuditAction::Read,
            _ => AuditAction::Execute,
        }
    }

    fn default_outcome(self) -> Outcome {
        match self {
            EventKind::InferenceFailed | EventKind::InferenceInterrupted => Outcome::Failure,
            EventKind::InferenceCancelled => Outcome::Cancelled,
            EventKind::AuthDenied => Outcome::Denied,
            _ => Outcome::Success,
        }
    }
}

/// FHIR `AuditEvent.action` codes: create, read, update, delete, execute.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AuditAction {
    #[serde(rename = "C")]
    Create,
    #[serde(rename = "R")]
    Read,
    #[serde(rename = "U")]
    Update,
    #[serde(rename = "D")]
    Delete,
    #[serde(rename = "E")]
    Execute,
}

impl AuditAction {
    pub fn code(self) -> &'static str {
        match self {
            AuditAction::Create => "C",
            AuditAction::Read => "R",
            AuditAction::Update => "U",
            AuditAction::Delete => "D",
            AuditAction::Execute => "E",
        }
    }
}

/// How the audited action ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Success,
    /// Refused by authentication/authorization or policy.
    Denied,
    /// Failed (server or model error).
    Failure,
    /// Cancelled by the client (disconnect) or by shutdown.
    Cancelled,
}

impl Outcome {
    /// FHIR R4 `AuditEvent.outcome` code.
    pub fn fhir_code(self) -> &'static str {
        match self {
            Outcome::Success => "0",
            Outcome::Denied | Outcome::Cancelled => "4",
            Outcome::Failure => "8",
        }
    }
}

/// Who acted: an authenticated principal (or, for `auth.denied`, the claimed one).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditPrincipal {
    pub id: String,
    /// How the principal authenticated, e.g. `api_key`, `mtls`, `anonymous`.
    pub kind: String,
    pub roles: Vec<String>,
    /// A signed-in person's display name (the IdP's `preferred_username`),
    /// kept in the encrypted trail only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
}

impl AuditPrincipal {
    pub fn new<R: Into<String>>(
        id: impl Into<String>,
        kind: impl Into<String>,
        roles: impl IntoIterator<Item = R>,
    ) -> Self {
        AuditPrincipal {
            id: id.into(),
            kind: kind.into(),
            roles: roles.into_iter().map(Into::into).collect(),
            display_name: None,
        }
    }

    /// The same principal with a display name.
    pub fn with_display_name(mut self, name: Option<String>) -> Self {
        self.display_name = name;
        self
    }
}

/// The model that served (or was administered).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelRef {
    pub id: String,
    /// Fingerprint of the weights (e.g. `sha256:…` of the sealed file).
    pub weights_fingerprint: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenCounts {
    pub prompt: u32,
    pub completion: u32,
}

/// Non-PHI generation parameters. Only numbers and flags: stop sequences and
/// other strings a caller sends may contain PHI, so only their count is kept.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct InferenceParams {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presence_penalty: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frequency_penalty: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repetition_penalty: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_sequences: Option<u32>,
    /// The structured-output constraint's kind (`json_object`, `json_schema`,
    /// `regex`, `choice`, `grammar`), when the request had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub constraint: Option<String>,
    /// HMAC of the constraint's canonical text (the schema, regex, choices or
    /// grammar may hold PHI: never stored itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub constraint_hmac: Option<String>,
    /// The names of the tools offered (app-defined identifiers, never their
    /// descriptions or schemas).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools_offered: Option<Vec<String>>,
    /// The names of the tools the output called (`inference.completed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools_called: Option<Vec<String>>,
}

/// `HMAC-SHA256(audit HMAC key, text)` in hex. Only the audit log (or
/// [`super::AuditKeys`]) can construct one, from `Phi`-wrapped bytes, so no
/// plain text can be passed where a `TextHmac` is expected.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct TextHmac(String);

impl TextHmac {
    pub(crate) fn from_hex(hex: String) -> Self {
        TextHmac(hex)
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What a caller records. The log adds seq, time, event id, prev-hash and instance.
#[derive(Clone, Debug)]
pub struct AuditEvent {
    pub kind: EventKind,
    pub request_id: Option<String>,
    pub principal: Option<AuditPrincipal>,
    pub source_addr: Option<SocketAddr>,
    pub action: AuditAction,
    pub operation: Option<&'static str>,
    pub outcome: Outcome,
    pub outcome_reason: Option<&'static str>,
    pub model: Option<ModelRef>,
    pub tokens: Option<TokenCounts>,
    pub latency: Option<Duration>,
    pub params: Option<InferenceParams>,
    pub prompt_hmac: Option<TextHmac>,
    pub completion_hmac: Option<TextHmac>,
    pub target: Option<String>,
    pub detail: Option<serde_json::Map<String, serde_json::Value>>,
}

impl AuditEvent {
    /// A new event; action and outcome default from the kind
    /// (`inference.failed` → failure, `auth.denied` → denied, …).
    pub fn new(kind: EventKind) -> Self {
        AuditEvent {
            kind,
            request_id: None,
            principal: None,
            source_addr: None,
            action: kind.default_action(),
            operation: None,
            outcome: kind.default_outcome(),
            outcome_reason: None,
            model: None,
            tokens: None,
            latency: None,
            params: None,
            prompt_hmac: None,
            completion_hmac: None,
            target: None,
            detail: None,
        }
    }
    pub fn kind(&self) -> EventKind {
        self.kind
    }
    pub fn request_id(mut self, id: impl Into<String>) -> Self {
        self.request_id = Some(id.into());
        self
    }
    pub fn principal(mut self, principal: AuditPrincipal) -> Self {
        self.principal = Some(principal);
        self
    }
    pub fn source_addr(mut self, addr: SocketAddr) -> Self {
        self.source_addr = Some(addr);
        self
    }
    pub fn action(mut self, action: AuditAction) -> Self {
        self.action = action;
        self
    }
    /// The API operation, e.g. `"chat.completions"`, `"admin.keys.create"`.
    pub fn operation(mut self, operation: &'static str) -> Self {
        self.operation = Some(operation);
        self
    }
    pub fn outcome(mut self, outcome: Outcome) -> Self {
        self.outcome = outcome;
        self
    }
    /// A fixed error code such as `"model_error"` or `"invalid_api_key"`.
    pub fn outcome_reason(mut self, reason: &'static str) -> Self {
        self.outcome_reason = Some(reason);
        self
    }
    pub fn model(mut self, id: impl Into<String>, weights_fingerprint: impl Into<String>) -> Self {
        self.model = Some(ModelRef { id: id.into(), weights_fingerprint: weights_fingerprint.into() });
        self
    }
    pub fn tokens(mut self, prompt: u32, completion: u32) -> Self {
        self.tokens = Some(TokenCounts { prompt, completion });
        self
    }
    pub fn latency(mut self, latency: Duration) -> Self {
        self.latency = Some(latency);
        self
    }
    pub fn params(mut self, params: InferenceParams) -> Self {
        self.params = Some(params);
        self
    }
    pub fn prompt_hmac(mut self, hmac: TextHmac) -> Self {
        self.prompt_hmac = Some(hmac);
        self
    }
    pub fn completion_hmac(mut self, hmac: TextHmac) -> Self {
        self.completion_hmac = Some(hmac);
        self
    }
    /// The object of an admin event: an API key id, a model id, a config file path.
    pub fn target(mut self, target: impl Into<String>) -> Self {
        self.target = Some(target.into());
        self
    }
    /// Structured detail for the log's own events (`audit.recovered`, …).
    pub fn detail(mut self, detail: serde_json::Value) -> Self {
        if let serde_json::Value::Object(map) = detail {
            self.detail = Some(map);
        }
        self
    }
}

/// Version of the record schema.
pub const RECORD_VERSION: u16 = 1;

/// A record as stored in the trail (and printed by `salus audit query`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub v: u16,
    pub seq: u64,
    /// RFC 3339, UTC.
    pub time: String,
    pub event_id: String,
    /// Hex SHA-256 leaf hash of the previous record (zeros before the first).
    pub prev_hash: String,
    pub kind: String,
    pub instance: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub principal: Option<AuditPrincipal>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_addr: Option<String>,
    pub action: AuditAction,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation: Option<String>,
    pub outcome: Outcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<TokenCounts>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_us: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params: Option<InferenceParams>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_hmac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_hmac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<serde_json::Map<String, serde_json::Value>>,
}

impl AuditRecord {
    /// The record the writer stores for `ev` (the writer serializes the
    /// equivalent [`RecordView`] without building this).
    #[cfg(test)]
    pub(crate) fn from_event(
        ev: AuditEvent,
        seq: u64,
        time: String,
        event_id: String,
        prev_hash: &[u8; 32],
        instance: &str,
    ) -> Self {
        AuditRecord {
            v: RECORD_VERSION,
            seq,
            time,
            event_id,
            prev_hash: hex::encode(prev_hash),
            kind: ev.kind.as_str().to_string(),
            instance: instance.to_string(),
            request_id: ev.request_id,
            principal: ev.principal,
            source_addr: ev.source_addr.map(|a| a.to_string()),
            action: ev.action,
            operation: ev.operation.map(String::from),
            outcome: ev.outcome,
            outcome_reason: ev.outcome_reason.map(String::from),
            model: ev.model,
            tokens: ev.tokens,
            latency_us: ev.latency.map(|d| d.as_micros().min(u64::MAX as u128) as u64),
            params: ev.params,
            prompt_hmac: ev.prompt_hmac.map(|h| h.0),
            completion_hmac: ev.completion_hmac.map(|h| h.0),
            target: ev.target,
            detail: ev.detail,
        }
    }
}

/// The writer's zero-copy view of a record: serializes to exactly the JSON of
/// the [`AuditRecord`] that [`AuditRecord::from_event`] would build (same field
/// names, order and omissions; `tests::record_view_matches_record`), without
/// copying the event's strings.
#[derive(Serialize)]
pub(crate) struct RecordView<'a> {
    v: u16,
    seq: u64,
    time: &'a str,
    event_id: &'a str,
    prev_hash: &'a str,
    kind: &'static str,
    instance: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    request_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    principal: Option<&'a AuditPrincipal>,
    #[serde(skip_serializing_if = "Option::is_none")]
    source_addr: Option<SocketAddr>,
    action: AuditAction,
    #[serde(skip_serializing_if = "Option::is_none")]
    operation: Option<&'static str>,
    outcome: Outcome,
    #[serde(skip_serializing_if = "Option::is_none")]
    outcome_reason: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    model: Option<&'a ModelRef>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tokens: Option<TokenCounts>,
    #[serde(skip_serializing_if = "Option::is_none")]
    latency_us: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    params: Option<&'a InferenceParams>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt_hmac: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    completion_hmac: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    target: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<&'a serde_json::Map<String, serde_json::Value>>,
}

impl<'a> RecordView<'a> {
    pub(crate) fn new(
        ev: &'a AuditEvent,
        seq: u64,
        time: &'a str,
        event_id: &'a str,
        prev_hash_hex: &'a str,
        instance: &'a str,
    ) -> Self {
        RecordView {
            v: RECORD_VERSION,
            seq,
            time,
            event_id,
            prev_hash: prev_hash_hex,
            kind: ev.kind.as_str(),
            instance,
            request_id: ev.request_id.as_deref(),
            principal: ev.principal.as_ref(),
            source_addr: ev.source_addr,
            action: ev.action,
            operation: ev.operation,
            outcome: ev.outcome,
            outcome_reason: ev.outcome_reason,
            model: ev.model.as_ref(),
            tokens: ev.tokens,
            latency_us: ev.latency.map(|d| d.as_micros().min(u64::MAX as u128) as u64),
            params: ev.params.as_ref(),
            prompt_hmac: ev.prompt_hmac.as_ref().map(|h| h.0.as_str()),
            completion_hmac: ev.completion_hmac.as_ref().map(|h| h.0.as_str()),
            target: ev.target.as_deref(),
            detail: ev.detail.as_ref(),
        }
    }
}

/// Proof that a record is durable: returned by [`super::AuditLog::record`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordReceipt {
    pub seq: u64,
    pub event_id: String,
    /// RFC 3339 UTC time stamped on the record.
    pub time: String,
    /// Hex leaf hash of the record (the chain head right after it).
    pub hash: String,
}
