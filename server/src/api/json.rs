//! Our own JSON body extractor and typed field reader.
//!
//! axum's `Json` rejection and serde's error messages can quote the input
//! ("invalid type: string \"<text>\", expected u32"). Request bodies are PHI, so
//! bodies are parsed into a `serde_json` object here and every field is read with
//! [`Fields`], whose errors name the parameter (from Salus' own list) and the
//! expected type, and nothing else.

use std::borrow::Cow;

use axum::body::Body;
use axum::extract::FromRequest;
use axum::http::{header, Request};
use serde::Deserialize as _;
use serde_json::{Map, Value};

use super::error::ApiError;
use crate::state::AppState;

/// A request body that was a JSON object.
pub struct JsonObject(pub Map<String, Value>);

impl FromRequest<AppState> for JsonObject {
    type Rejection = ApiError;

    async fn from_request(req: Request<Body>, state: &AppState) -> Result<Self, ApiError> {
        let is_json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| {
                let mime = v.split(';').next().unwrap_or("").trim();
                mime.eq_ignore_ascii_case("application/json")
            })
            .unwrap_or(false);
        if !is_json {
            return Err(ApiError::ContentType);
        }
        let limit = state.limits().max_body_bytes;
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        let expects_continue = req
            .headers()
            .get(header::EXPECT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"));
        let mut body = req.into_body();
        // Too large by its own declaration: refused before reading a byte (with
        // `Expect: 100-continue` the client never sends it).
        if declared.is_some_and(|n| n > limit as u64) {
            if !expects_continue {
                drain_bounded(&mut body, DRAIN_MAX_BYTES, DRAIN_TIMEOUT).await;
            }
            return Err(ApiError::PayloadTooLarge { limit });
        }
        let bytes = match read_limited(&mut body, limit).await {
            Some(b) => b,
            None => {
                drain_bounded(&mut body, DRAIN_MAX_BYTES, DRAIN_TIMEOUT).await;
                return Err(ApiError::PayloadTooLarge { limit });
            }
        };
        parse_object(&bytes)
    }
}

/// Most bytes of an oversized body read and discarded after the limit, so
/// the client is reading when the 413 arrives instead of seeing its upload
/// reset; past this (or after [`DRAIN_TIMEOUT`]) the connection just closes.
const DRAIN_MAX_BYTES: usize = 4 << 20;
const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// The body up to `limit` bytes, or `None` when it is longer (or breaks).
async fn read_limited(body: &mut Body, limit: usize) -> Option<Vec<u8>> {
    use http_body_util::BodyExt;
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.ok()?;
        if let Some(data) = frame.data_ref() {
            if out.len() + data.len() > limit {
                return None;
            }
            out.extend_from_slice(data);
        }
    }
    Some(out)
}

/// Reads and discards up to `max_bytes` more of `body`, for at most `timeout`
/// (a refused request's body, so the client sees the answer, not a reset).
pub(crate) async fn drain_bounded(body: &mut Body, max_bytes: usize, timeout: std::time::Duration) {
    use http_body_util::BodyExt;
    let work = async {
        let mut seen = 0usize;
        while let Some(Ok(frame)) = body.frame().await {
            seen += frame.data_ref().map_or(0, |d| d.len());
            if seen > max_bytes {
                return;
            }
        }
    };
    let _ = tokio::time::timeout(timeout, work).await;
}

/// Parses bytes into a JSON object with fixed error messages. A key that
/// appears twice in one object is refused (anywhere in the document):
/// parsers disagree on which one wins, and a proxy or filter in front of
/// Salus must not see a different request than Salus does.
pub fn parse_object(bytes: &[u8]) -> Result<JsonObject, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = match StrictValue::deserialize(&mut de).and_then(|v| de.end().map(|()| v)) {
        Ok(StrictValue(v)) => v,
        Err(e) if e.to_string().starts_with(DUPLICATE_KEY) => return Err(ApiError::DuplicateKey),
        Err(_) => return Err(ApiError::MalformedJson),
    };
    match value {
        Value::Object(m) => Ok(JsonObject(m)),
        _ => Err(ApiError::NotAnObject),
    }
}

/// The marker of the duplicate-key error (never shown to the client).
const DUPLICATE_KEY: &str = "salus: duplicate key";

/// A `serde_json::Value` that refuses duplicate object keys.
struct StrictValue(Value);

impl<'de> serde::Deserialize<'de> for StrictValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(StrictValue)
    }
}

struct StrictVisitor;

impl<'de> serde::de::Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        StrictValue::deserialize(d).map(|v| v.0)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(StrictValue(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let StrictValue(v) = map.next_value()?;
            if out.insert(key, v).is_some() {
                return Err(serde::de::Error::custom(DUPLICATE_KEY));
            }
        }
        Ok(Value::Object(out))
    }
}

/// Reads fields out of a JSON object; `null` counts as absent (as OpenAI does).
pub struct Fields {
    map: Map<String, Value>,
    prefix: Cow<'static, str>,
}

fn type_error(param: Cow<'static, str>, expected: &'static str) -> ApiError {
    let message = format!("{param} must be {expected}");
    ApiError::invalid(param, message)
}

impl Fields {
    pub fn new(map: Map<String, Value>) -> Self {
        Fields { map, prefix: Cow::Borrowed("") }
    }

    /// For nested objects: errors name `prefix.field`.
    pub fn nested(map: Map<String, Value>, prefix: impl Into<Cow<'static, str>>) -> Self {
        Fields { map, prefix: prefix.into() }
    }

    pub fn param(&self, name: &'static str) -> Cow<'static, str> {
        if self.prefix.is_empty() {
            Cow::Borrowed(name)
        } else {
            Cow::Owned(format!("{}.{name}", self.prefix))
        }
    }

    /// The field's value as an unsigned integer, if it is one (left in place).
    pub fn peek_u64(&self, name: &'static str) -> Option<u64> {
        self.map.get(name).and_then(Value::as_u64)
    }

    /// Removes a field; `None` if absent or null.
    pub fn take(&mut self, name: &'static str) -> Option<Value> {
        match self.map.remove(name) {
            None | Some(Value::Null) => None,
            Some(v) => Some(v),
        }
    }

    pub fn required(&mut self, name: &'static str) -> Result<Value, ApiError> {
        let param = self.param(name);
        self.take(name).ok_or_else(|| {
            let message = format!("missing required parameter {param}");
            ApiError::invalid(param, message)
        })
    }

    pub fn string(&mut self, name: &'static str) -> Result<Option<String>, ApiError> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(type_error(self.param(name), "a string")),
        }
    }

    pub fn bool(&mut self, name: &'static str) -> Result<Option<bool>, ApiError> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(b)),
            Some(_) => Err(type_error(self.param(name), "a boolean")),
        }
    }

    pub fn f64_in(&mut self, name: &'static str, lo: f64, hi: f64) -> Result<Option<f64>, ApiError> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::Number(n)) => {
                let v = n.as_f64().unwrap_or(f64::NAN);
                if v.is_finite() && v >= lo && v <= hi {
                    Ok(Some(v))
                } else {
                    let param = self.param(name);
                    let message = format!("{param} must be between {lo} and {hi}");
                    Err(ApiError::invalid(param, message))
                }
            }
            Some(_) => Err(type_error(self.param(name), "a number")),
        }
    }

    pub fn u64_in(&mut self, name: &'static str, lo: u64, hi: u64) -> Result<Option<u64>, ApiError> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::Number(n)) => match n.as_u64() {
                Some(v) if v >= lo && v <= hi => Ok(Some(v)),
                _ => {
                    let param = self.param(name);
                    let message = format!("{param} must be an integer between {lo} and {hi}");
                    Err(ApiError::invalid(param, message))
                }
            },
            Some(_) => Err(type_error(self.param(name), "an integer")),
        }
    }

    /// Any signed 64-bit integer (seeds).
    pub fn i64(&mut self, name: &'static str) -> Result<Option<i64>, ApiError> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::Number(n)) => match n.as_i64() {
                Some(v) => Ok(Some(v)),
                None => Err(type_error(self.param(name), "a 64-bit integer")),
            },
            Some(_) => Err(type_error(self.param(name), "an integer")),
        }
    }

    pub fn object(&mut self, name: &'static str) -> Result<Option<Fields>, ApiError> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::Object(m)) => Ok(Some(Fields::nested(m, self.param(name)))),
            Some(_) => Err(type_error(self.param(name), "an object")),
        }
    }

    /// Rejects what is left: OpenAI parameters Salus does not support by name,
    /// anything else as unrecognized (named only when the name is a safe
    /// path: see [`ApiError::unrecognized`]). Keys are checked in order, so
    /// the error names the first one.
    pub fn finish(self, unsupported: &[&'static str]) -> Result<(), ApiError> {
        let mut unknown = None;
        for key in self.map.keys() {
            if self.map[key].is_null() {
                continue;
            }
            if let Some(p) = unsupported.iter().find(|p| **p == key.as_str()) {
                return Err(ApiError::Unsupported(p));
            }
            unknown.get_or_insert(key);
        }
        match unknown {
            Some(key) if self.prefix.is_empty() => Err(ApiError::unrecognized(key)),
            Some(key) => Err(ApiError::unrecognized(&format!("{}.{key}", self.prefix))),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_field_and_never_the_value() {
        let JsonObject(m) = parse_object(br#"{"temperature":"SECRET-CANARY","n":-1,"x":{"y":1}}"#).ok().unwrap();
        let mut f = Fields::new(m);
        let e = f.f64_in("temperature", 0.0, 2.0).unwrap_err();
        assert!(!format!("{e} {}", e.body()).contains("CANARY"));
        assert_eq!(e.body()["error"]["param"], "temperature");
        let e = f.u64_in("n", 1, 8).unwrap_err();
        assert_eq!(e.body()["error"]["param"], "n");
        let mut inner = f.object("x").unwrap().unwrap();
        let e = inner.string("y").unwrap_err();
        assert_eq!(e.body()["error"]["param"], "x.y");
    }

    #[test]
    fn malformed_and_non_object_bodies() {
        assert!(matches!(parse_object(b"{\"a\": \"CANARY"), Err(ApiError::MalformedJson)));
        assert!(matches!(parse_object(b"{\"a\": \"\xff\xfe\"}"), Err(ApiError::MalformedJson)));
        assert!(matches!(parse_object(b"[1]"), Err(ApiError::NotAnObject)));
    }

    #[test]
    fn leftovers_are_rejected_by_name_only_if_known_or_plain() {
        let JsonObject(m) = parse_object(br#"{"tools":[1]}"#).ok().unwrap();
        assert!(matches!(Fields::new(m).finish(&["tools"]), Err(ApiError::Unsupported("tools"))));
        // A short plain name is named (a typo must be findable)…
        let JsonObject(m) = parse_object(br#"{"temprature":1}"#).ok().unwrap();
        let e = Fields::new(m).finish(&["tools"]).unwrap_err();
        assert_eq!(e.body()["error"]["param"], "temprature");
        // …anything else is not echoed (a key is client data).
        let JsonObject(m) = parse_object(br#"{"CANARY field-1":1}"#).ok().unwrap();
        let e = Fields::new(m).finish(&["tools"]).unwrap_err();
        assert!(!e.body().to_string().contains("CANARY"));
        let JsonObject(m) = parse_object(br#"{"tools":null}"#).ok().unwrap();
        assert!(Fields::new(m).finish(&["tools"]).is_ok());
    }

    /// Regression (parser differential): a duplicated key is refused at any
    /// depth; the first or last value never silently wins.
    #[test]
    fn duplicate_keys_are_refused_anywhere() {
        assert!(matches!(parse_object(br#"{"model":"a","model":"b"}"#), Err(ApiError::DuplicateKey)));
        assert!(matches!(
            parse_object(br#"{"messages":[{"role":"user","role":"system","content":"x"}]}"#),
            Err(ApiError::DuplicateKey)
        ));
        let ok = parse_object(br#"{"a":{"b":[1,2.5,"x",null,true,{"c":-3}]},"d":"e"}"#).unwrap();
        assert_eq!(Value::Object(ok.0), serde_json::json!({"a":{"b":[1,2.5,"x",null,true,{"c":-3}]},"d":"e"}));
        assert!(matches!(parse_object(b"[1]"), Err(ApiError::NotAnObject)));
        assert!(matches!(parse_object(b"{\"a\":1} trailing"), Err(ApiError::MalformedJson)));
        assert!(matches!(parse_object(b"{\"a\":"), Err(ApiError::MalformedJson)));
        // The duplicate key's name is not echoed.
        let e = parse_object(br#"{"patient-Jane":1,"patient-Jane":2}"#).err().unwrap();
        assert!(!e.to_string().contains("Jane"));
    }
}
