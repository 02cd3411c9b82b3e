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
        let bytes =
            axum::body::to_bytes(req.into_body(), limit).await.map_err(|_| ApiError::PayloadTooLarge { limit })?;
        parse_object(&bytes)
    }
}

/// Parses bytes into a JSON object with fixed error messages.
pub fn parse_object(bytes: &[u8]) -> Result<JsonObject, ApiError> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(m)) => Ok(JsonObject(m)),
        Ok(_) => Err(ApiError::NotAnObject),
        Err(_) => Err(ApiError::MalformedJson),
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
    /// anything else without echoing its name.
    pub fn finish(self, unsupported: &[&'static str]) -> Result<(), ApiError> {
        let mut first_unknown = false;
        for key in self.map.keys() {
            if self.map[key].is_null() {
                continue;
            }
            if let Some(p) = unsupported.iter().find(|p| **p == key.as_str()) {
                return Err(ApiError::Unsupported(p));
            }
            first_unknown = true;
        }
        if first_unknown {
            Err(ApiError::Unrecognized)
        } else {
            Ok(())
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
    fn leftovers_are_rejected_by_name_only_if_known() {
        let JsonObject(m) = parse_object(br#"{"tools":[1]}"#).ok().unwrap();
        assert!(matches!(Fields::new(m).finish(&["tools"]), Err(ApiError::Unsupported("tools"))));
        let JsonObject(m) = parse_object(br#"{"CANARY_FIELD":1}"#).ok().unwrap();
        let e = Fields::new(m).finish(&["tools"]).unwrap_err();
        assert!(!e.body().to_string().contains("CANARY"));
        let JsonObject(m) = parse_object(br#"{"tools":null}"#).ok().unwrap();
        assert!(Fields::new(m).finish(&["tools"]).is_ok());
    }
}
