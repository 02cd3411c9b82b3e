//! Structured outputs at the API: reading a request's constraint, and compiling
//! it (cached) before the request is audited and submitted.
//!
//! A request states at most one constraint, in one of three spellings:
//!
//! * OpenAI's `response_format`: `{"type": "text"}` (none), `{"type":
//!   "json_object"}`, `{"type": "json_schema", "json_schema": {"name",
//!   "schema", "strict", "description"}}`;
//! * vLLM's `structured_outputs`: exactly one of `json` (a schema, or its JSON
//!   text), `regex`, `choice`, `grammar` (Lark), `json_object: true`, and
//!   `whitespace_pattern` with `json`;
//! * vLLM's older top-level `guided_json`, `guided_regex`, `guided_choice`,
//!   `guided_grammar`, `guided_whitespace_pattern`.
//!
//! Two constraints are a 400. So is anything the engine would not enforce
//! (see `salus_models::grammar`): a request is refused before the model runs
//! and before `inference.started`, so a refused schema costs no audit record.
//!
//! Compiled grammars are cached by principal and the constraint's exact bytes
//! (its canonical text), so a client that sends the same schema again skips
//! compiling, and no principal can learn from timing whether another sent a
//! given schema (as for the prefix cache).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use salus_models::grammar::{CompiledGrammar, ConstraintSpec, GrammarError};
use salus_models::Phi;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::error::ApiError;
use super::json::Fields;
use super::types::GenerationParams;
use crate::auth::AuthenticatedPrincipal;
use crate::config::LimitsConfig;
use crate::metrics::ConstraintResult;
use crate::state::AppState;

/// A constraint as the request states it, and the field that stated it (for errors).
#[derive(Debug, Clone)]
pub struct RequestedConstraint {
    pub spec: ConstraintSpec,
    pub param: &'static str,
}

/// Top-level fields that may carry a constraint.
pub const LEGACY_GUIDED: [&str; 5] =
    ["guided_json", "guided_regex", "guided_choice", "guided_grammar", "guided_whitespace_pattern"];

/// Reads the constraint fields of a request (both endpoints).
pub fn parse_constraint(f: &mut Fields, limits: &LimitsConfig) -> Result<Option<RequestedConstraint>, ApiError> {
    let mut found: Vec<RequestedConstraint> = Vec::new();
    if let Some(spec) = parse_response_format(f).map_err(|e| at_top("response_format", e))? {
        found.push(RequestedConstraint { spec, param: "response_format" });
    }
    if let Some(so) = f.object("structured_outputs")? {
        let spec = parse_structured_outputs(so).map_err(|e| at_top("structured_outputs", e))?;
        found.push(RequestedConstraint { spec, param: "structured_outputs" });
    }
    if let Some((spec, param)) = parse_guided(f)? {
        found.push(RequestedConstraint { spec, param });
    }
    if found.len() > 1 {
        return Err(ApiError::invalid(
            found[1].param,
            "a request may carry one output constraint: response_format, structured_outputs or guided_* (not several)",
        ));
    }
    let Some(c) = found.pop() else { return Ok(None) };
    if c.spec.size_bytes() > limits.max_schema_bytes {
        return Err(ApiError::ConstraintTooLarge { param: c.param, limit: limits.max_schema_bytes });
    }
    Ok(Some(c))
}

/// Errors inside a constraint object name the object as their `param` (as
/// OpenAI does); the message says which member.
fn at_top(param: &'static str, e: ApiError) -> ApiError {
    match e {
        ApiError::InvalidParam { message, .. } => ApiError::InvalidParam { param: param.into(), message },
        other => other,
    }
}

fn parse_response_format(f: &mut Fields) -> Result<Option<ConstraintSpec>, ApiError> {
    let Some(mut rf) = f.object("response_format")? else { return Ok(None) };
    let kind = rf.string("type")?;
    let spec = match kind.as_deref() {
        Some("text") => None,
        Some("json_object") => Some(ConstraintSpec::JsonObject),
        Some("json_schema") => {
            let Some(mut js) = rf.object("json_schema")? else {
                return Err(ApiError::invalid(
                    "response_format.json_schema",
                    "response_format of type json_schema needs a json_schema object",
                ));
            };
            if let Some(name) = js.string("name")? {
                let ok = !name.is_empty()
                    && name.len() <= 64
                    && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
                if !ok {
                    return Err(ApiError::invalid(
                        "response_format.json_schema.name",
                        "response_format.json_schema.name must be 1 to 64 characters of a-z, A-Z, 0-9, _ and -",
                    ));
                }
            }
            // `strict` and `description` carry no further meaning here: every
            // schema is enforced strictly.
            js.bool("strict")?;
            js.string("description")?;
            let schema = match js.take("schema") {
                Some(v @ (Value::Object(_) | Value::Bool(_))) => v,
                Some(_) => {
                    return Err(ApiError::invalid(
                        "response_format.json_schema.schema",
                        "response_format.json_schema.schema must be a JSON Schema object",
                    ))
                }
                None => {
                    return Err(ApiError::invalid(
                        "response_format.json_schema.schema",
                        "missing required parameter response_format.json_schema.schema",
                    ))
                }
            };
            js.finish(&[])?;
            Some(ConstraintSpec::JsonSchema { schema: schema_text(&schema), whitespace_pattern: None })
        }
        _ => {
            return Err(ApiError::invalid(
                "response_format.type",
                "response_format.type must be text, json_object or json_schema",
            ))
        }
    };
    rf.finish(&[])?;
    Ok(spec)
}

fn schema_text(v: &Value) -> Phi<String> {
    Phi::new(serde_json::to_string(v).unwrap_or_default())
}

/// A schema given as an object or as its JSON text.
fn schema_value(v: Value, param: &'static str) -> Result<Phi<String>, ApiError> {
    match v {
        Value::Object(_) | Value::Bool(_) => Ok(schema_text(&v)),
        // Kept as sent: the compiler parses it (a parse error is a 400 there).
        Value::String(s) => Ok(Phi::new(s)),
        _ => Err(ApiError::invalid(param, format!("{param} must be a JSON Schema (an object or its JSON text)"))),
    }
}

fn choices(v: Value, param: &'static str) -> Result<Vec<Phi<String>>, ApiError> {
    let bad = || ApiError::invalid(param, format!("{param} must be a non-empty array of strings"));
    let Value::Array(items) = v else { return Err(bad()) };
    if items.is_empty() {
        return Err(bad());
    }
    items.into_iter().map(|i| if let Value::String(s) = i { Ok(Phi::new(s)) } else { Err(bad()) }).collect()
}

fn parse_structured_outputs(mut so: Fields) -> Result<ConstraintSpec, ApiError> {
    let mut specs = Vec::new();
    if let Some(v) = so.take("json") {
        specs.push(ConstraintSpec::JsonSchema {
            schema: schema_value(v, "structured_outputs.json")?,
            whitespace_pattern: None,
        });
    }
    if let Some(rx) = so.string("regex")? {
        specs.push(ConstraintSpec::Regex(Phi::new(rx)));
    }
    if let Some(v) = so.take("choice") {
        specs.push(ConstraintSpec::Choice(choices(v, "structured_outputs.choice")?));
    }
    if let Some(g) = so.string("grammar")? {
        specs.push(ConstraintSpec::Grammar(Phi::new(g)));
    }
    if so.bool("json_object")? == Some(true) {
        specs.push(ConstraintSpec::JsonObject);
    }
    let whitespace = so.string("whitespace_pattern")?;
    // vLLM's knobs with no meaning for our single engine.
    so.bool("disable_fallback")?;
    so.bool("disable_additional_properties")?;
    if so.bool("disable_any_whitespace")? == Some(true) && whitespace.is_some() {
        return Err(ApiError::invalid(
            "structured_outputs.disable_any_whitespace",
            "structured_outputs.disable_any_whitespace excludes whitespace_pattern",
        ));
    }
    so.finish(&["structural_tag"])?;
    if specs.len() != 1 {
        return Err(ApiError::invalid(
            "structured_outputs",
            "structured_outputs must hold exactly one of json, regex, choice, grammar, json_object",
        ));
    }
    attach_whitespace(specs.pop().expect("one"), whitespace, "structured_outputs.whitespace_pattern")
}

fn attach_whitespace(
    spec: ConstraintSpec,
    whitespace: Option<String>,
    param: &'static str,
) -> Result<ConstraintSpec, ApiError> {
    match (spec, whitespace) {
        (spec, None) => Ok(spec),
        (ConstraintSpec::JsonSchema { schema, .. }, Some(w)) => {
            Ok(ConstraintSpec::JsonSchema { schema, whitespace_pattern: Some(Phi::new(w)) })
        }
        (ConstraintSpec::JsonObject, Some(w)) => Ok(ConstraintSpec::JsonSchema {
            schema: Phi::new(r#"{"type":"object"}"#.into()),
            whitespace_pattern: Some(Phi::new(w)),
        }),
        (_, Some(_)) => Err(ApiError::invalid(param, format!("{param} applies to JSON constraints only"))),
    }
}

/// vLLM's older top-level fields; the constraint and the field that carried it.
fn parse_guided(f: &mut Fields) -> Result<Option<(ConstraintSpec, &'static str)>, ApiError> {
    let mut specs = Vec::new();
    if let Some(v) = f.take("guided_json") {
        let schema = schema_value(v, "guided_json")?;
        specs.push((ConstraintSpec::JsonSchema { schema, whitespace_pattern: None }, "guided_json"));
    }
    if let Some(rx) = f.string("guided_regex")? {
        specs.push((ConstraintSpec::Regex(Phi::new(rx)), "guided_regex"));
    }
    if let Some(v) = f.take("guided_choice") {
        specs.push((ConstraintSpec::Choice(choices(v, "guided_choice")?), "guided_choice"));
    }
    if let Some(g) = f.string("guided_grammar")? {
        specs.push((ConstraintSpec::Grammar(Phi::new(g)), "guided_grammar"));
    }
    let whitespace = f.string("guided_whitespace_pattern")?;
    match specs.len() {
        0 if whitespace.is_some() => {
            Err(ApiError::invalid("guided_whitespace_pattern", "guided_whitespace_pattern applies to guided_json only"))
        }
        0 => Ok(None),
        1 => {
            let (spec, param) = specs.pop().expect("one");
            Ok(Some((attach_whitespace(spec, whitespace, "guided_whitespace_pattern")?, param)))
        }
        _ => Err(ApiError::invalid(
            specs[1].1,
            "a request may carry one of guided_json, guided_regex, guided_choice, guided_grammar",
        )),
    }
}

/// A cache entry: when it was last used (a logical clock), the grammar, and
/// the principal it belongs to.
type CacheEntry = (u64, Arc<CompiledGrammar>, String);

/// Compiled constraints, shared between requests of one principal with the same
/// constraint bytes. Bounded: the least recently used entry goes first.
pub struct GrammarCache {
    entries: Mutex<HashMap<[u8; 32], CacheEntry>>,
    capacity: usize,
    clock: std::sync::atomic::AtomicU64,
    compiles: Arc<tokio::sync::Semaphore>,
}

impl std::fmt::Debug for GrammarCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrammarCache").field("capacity", &self.capacity).finish_non_exhaustive()
    }
}

/// The outcome of [`GrammarCache::get_or_compile`], for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOutcome {
    Hit,
    Compiled,
}

impl GrammarCache {
    /// A cache of `capacity` entries; at most `parallel` compiles run at once
    /// (each takes a blocking thread).
    pub fn new(capacity: usize, parallel: usize) -> Self {
        GrammarCache {
            entries: Mutex::new(HashMap::new()),
            capacity,
            clock: std::sync::atomic::AtomicU64::new(0),
            compiles: Arc::new(tokio::sync::Semaphore::new(parallel.max(1))),
        }
    }

    fn key(scope: &str, spec: &ConstraintSpec) -> [u8; 32] {
        let mut h = Sha256::new();
        for part in [scope.as_bytes(), spec.kind().as_str().as_bytes(), spec.canonical_text().expose().as_bytes()] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part);
        }
        h.finalize().into()
    }

    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    /// The compiled grammar of `spec` for `scope` (a principal): from the cache,
    /// or compiled by `compile` on a blocking thread within `timeout`.
    pub async fn get_or_compile<F>(
        &self,
        scope: &str,
        spec: ConstraintSpec,
        timeout: Duration,
        compile: F,
    ) -> Result<(Arc<CompiledGrammar>, CacheOutcome), CompileFailure>
    where
        F: FnOnce(&ConstraintSpec) -> Result<CompiledGrammar, GrammarError> + Send + 'static,
    {
        let key = Self::key(scope, &spec);
        if let Some((used, g, _)) = self.entries.lock().expect("grammar cache").get_mut(&key) {
            *used = self.tick();
            return Ok((g.clone(), CacheOutcome::Hit));
        }
        let permit = tokio::time::timeout(timeout, self.compiles.clone().acquire_owned())
            .await
            .map_err(|_| CompileFailure::Timeout)?
            .map_err(|_| CompileFailure::Timeout)?;
        // On a timeout the compile still finishes in the background (bounded by
        // llguidance's fuel limits), holding its permit until then: a flood of
        // slow schemas cannot take more than `parallel` threads.
        let task = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            compile(&spec)
        });
        let compiled = match tokio::time::timeout(timeout, task).await {
            Ok(Ok(r)) => r.map_err(CompileFailure::Refused)?,
            Ok(Err(_)) => return Err(CompileFailure::Refused(GrammarError::TooComplex)),
            Err(_) => return Err(CompileFailure::Timeout),
        };
        let g = Arc::new(compiled);
        let mut entries = self.entries.lock().expect("grammar cache");
        if self.capacity > 0 {
            if entries.len() >= self.capacity {
                if let Some(oldest) = entries.iter().min_by_key(|(_, (used, _, _))| *used).map(|(k, _)| *k) {
                    entries.remove(&oldest);
                }
            }
            entries.insert(key, (self.tick(), g.clone(), scope.to_string()));
        }
        Ok((g, CacheOutcome::Compiled))
    }

    /// Drops the entries of every principal `keep` says no to (their
    /// constraints are request data: kept no longer than the principal can
    /// use them).
    pub fn retain_principals(&self, keep: impl Fn(&str) -> bool) {
        self.entries.lock().expect("grammar cache").retain(|_, (_, _, scope)| keep(scope));
    }

    /// Entries held now.
    pub fn len(&self) -> usize {
        self.entries.lock().expect("grammar cache").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Compiles the request's constraint (or finds it in the cache) into
/// `params.decode.constraint`. Runs before the request is audited or submitted:
/// a refused constraint costs no model run and no `inference.started`.
pub async fn compile_requested(
    state: &AppState,
    principal: &AuthenticatedPrincipal,
    params: &mut GenerationParams,
) -> Result<(), ApiError> {
    let Some(req) = &params.constraint else { return Ok(()) };
    let param = req.param;
    let ms = state.limits().grammar_compile_timeout_ms;
    let codec = state.codec_arc();
    let started = Instant::now();
    let result = state
        .grammars()
        .get_or_compile(principal.id(), req.spec.clone(), Duration::from_millis(ms), move |spec| {
            codec.compile_constraint(spec)
        })
        .await;
    let metrics = state.metrics();
    match result {
        Ok((grammar, outcome)) => {
            if outcome == CacheOutcome::Compiled {
                metrics.grammar_compile.observe(started.elapsed().as_secs_f64());
                metrics.constraint(ConstraintResult::Compiled);
            } else {
                metrics.constraint(ConstraintResult::CacheHit);
            }
            params.decode.constraint = Some(grammar);
            Ok(())
        }
        Err(CompileFailure::Refused(error)) => {
            metrics.constraint(ConstraintResult::Refused);
            Err(ApiError::Constraint { param, error })
        }
        Err(CompileFailure::Timeout) => {
            metrics.constraint(ConstraintResult::TimedOut);
            Err(ApiError::ConstraintTimeout { param, ms })
        }
    }
}

/// Why a constraint could not be compiled.
#[derive(Debug)]
pub enum CompileFailure {
    Refused(GrammarError),
    Timeout,
}

#[cfg(test)]
mod tests;
