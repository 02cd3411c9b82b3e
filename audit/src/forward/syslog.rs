//! RFC 5424 messages for audit records, framed for TLS transport (RFC 5425:
//! octet counting, `MSG-LEN SP SYSLOG-MSG`).
//!
//! A message carries the record's metadata as structured data, one
//! `[salus@32473 …]` element (32473 is the private enterprise number reserved
//! for documentation, RFC 5612: Salus has none of its own). What goes in is an
//! allow-list of the fields of the FHIR export: identifiers, fixed codes,
//! counts and times. Never the prompt or completion HMACs, never
//! `params`, never a display name, and of `detail` only a few boolean and
//! numeric fields (a break-glass reason is free text a person typed).
//!
//! ```text
//! <110>1 2025-01-02T03:04:05.123456Z host salus - inference.completed [salus@32473 seq="42" …] inference.completed seq=42 outcome=success
//! ```

use std::fmt::Write as _;

use crate::event::{AuditRecord, Outcome};

/// The SD-ID of the element holding a record's fields.
pub const SD_ID: &str = "salus@32473";

/// Syslog facility 13, "log audit" (RFC 5424, table 1).
const FACILITY_LOG_AUDIT: u8 = 13;

/// Fields of `detail` that may be forwarded, and only when their value is a
/// boolean or a number (so no free text can pass).
const DETAIL_ALLOWED: &[&str] = &["break_glass", "count", "window_secs"];

/// How the header names the sender.
#[derive(Clone, Debug)]
pub struct MessageHeader {
    /// APP-NAME (1–48 printable US-ASCII characters).
    pub app_name: String,
    /// HOSTNAME; `None`: each record's `instance`.
    pub hostname: Option<String>,
}

impl Default for MessageHeader {
    fn default() -> Self {
        MessageHeader { app_name: "salus".into(), hostname: None }
    }
}

/// The syslog severity of a record: failures warn, refusals and security
/// events are notices, the rest informational.
fn severity(r: &AuditRecord) -> u8 {
    match r.outcome {
        Outcome::Failure => 4,
        Outcome::Denied => 5,
        _ if r.kind == "access.break_glass" || r.kind.starts_with("audit.") => 5,
        _ => 6,
    }
}

fn outcome_name(o: Outcome) -> &'static str {
    match o {
        Outcome::Success => "success",
        Outcome::Denied => "denied",
        Outcome::Failure => "failure",
        Outcome::Cancelled => "cancelled",
    }
}

/// A header field: printable US-ASCII (33–126) only, at most `max` bytes,
/// `-` (the NILVALUE) when empty.
pub(crate) fn header_field(s: &str, max: usize) -> String {
    let out: String = s.chars().map(|c| if c.is_ascii_graphic() { c } else { '_' }).take(max).collect();
    if out.is_empty() {
        "-".into()
    } else {
        out
    }
}

/// Appends an SD-PARAM value with `"`, `\` and `]` escaped (RFC 5424 §6.3.3).
/// Control characters become `?`: they are valid UTF-8 but break line-based
/// collectors and SIEM parsers.
pub(crate) fn escape_param_value(out: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '"' | '\\' | ']' => {
                out.push('\\');
                out.push(c);
            }
            c if c.is_control() => out.push('?'),
            c => out.push(c),
        }
    }
}

/// The record's time as an RFC 5424 TIMESTAMP (UTC, at most microseconds:
/// RFC 5424 allows six fraction digits, the trail keeps nine).
fn timestamp(t: &str) -> String {
    use time::format_description::well_known::Rfc3339;
    let fmt = time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z");
    time::OffsetDateTime::parse(t, &Rfc3339)
        .ok()
        .and_then(|t| t.to_offset(time::UtcOffset::UTC).format(&fmt).ok())
        .unwrap_or_else(|| "-".into())
}

struct Sd(String);

impl Sd {
    fn param(&mut self, name: &str, value: &str) {
        let _ = write!(self.0, " {name}=\"");
        escape_param_value(&mut self.0, value);
        self.0.push('"');
    }
    fn opt(&mut self, name: &str, value: Option<&str>) {
        if let Some(v) = value {
            self.param(name, v);
        }
    }
    fn num(&mut self, name: &str, value: impl std::fmt::Display) {
        let _ = write!(self.0, " {name}=\"{value}\"");
    }
}

/// One record as an RFC 5424 SYSLOG-MSG (without the transport framing).
pub fn format_message(r: &AuditRecord, header: &MessageHeader) -> String {
    let pri = FACILITY_LOG_AUDIT * 8 + severity(r);
    let host = header_field(header.hostname.as_deref().unwrap_or(&r.instance), 255);
    let app = header_field(&header.app_name, 48);
    let msgid = header_field(&r.kind, 32);
    let mut sd = Sd(String::with_capacity(512));
    let _ = write!(sd.0, "[{SD_ID}");
    sd.num("seq", r.seq);
    sd.param("kind", &r.kind);
    sd.param("time", &r.time);
    sd.param("event_id", &r.event_id);
    sd.param("instance", &r.instance);
    sd.param("action", r.action.code());
    sd.param("outcome", outcome_name(r.outcome));
    sd.param("outcome_code", r.outcome.fhir_code());
    sd.opt("outcome_reason", r.outcome_reason.as_deref());
    if let Some(p) = &r.principal {
        // The id, how it authenticated and its roles; never the display name.
        sd.param("principal_id", &p.id);
        sd.param("principal_kind", &p.kind);
        sd.param("principal_roles", &p.roles.join(","));
    }
    sd.opt("source_addr", r.source_addr.as_deref());
    sd.opt("operation", r.operation.as_deref());
    if let Some(m) = &r.model {
        sd.param("model_id", &m.id);
        sd.param("model_fingerprint", &m.weights_fingerprint);
    }
    if let Some(t) = &r.tokens {
        sd.num("prompt_tokens", t.prompt);
        sd.num("completion_tokens", t.completion);
    }
    if let Some(l) = r.latency_us {
        sd.num("latency_us", l);
    }
    sd.opt("request_id", r.request_id.as_deref());
    sd.opt("target", r.target.as_deref());
    if let Some(d) = &r.detail {
        for key in DETAIL_ALLOWED {
            match d.get(*key) {
                Some(serde_json::Value::Bool(b)) => sd.num(key, b),
                Some(serde_json::Value::Number(n)) => sd.num(key, n),
                _ => {}
            }
        }
    }
    sd.0.push(']');
    // MSG: the kind, seq and outcome again, for collectors that show only the
    // message text (fixed codes and a number: nothing else can appear here).
    format!(
        "<{pri}>1 {} {host} {app} - {msgid} {} {msgid} seq={} outcome={}",
        timestamp(&r.time),
        sd.0,
        r.seq,
        outcome_name(r.outcome)
    )
}

/// Appends `msg` framed by octet counting (RFC 5425 §4.3: `MSG-LEN SP SYSLOG-MSG`).
pub fn frame_into(out: &mut Vec<u8>, msg: &str) {
    let _ = write!(FmtVec(out), "{} ", msg.len());
    out.extend_from_slice(msg.as_bytes());
}

struct FmtVec<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for FmtVec<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}
