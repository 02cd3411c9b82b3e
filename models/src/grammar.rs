//! Grammar-constrained decoding: structured outputs.
//!
//! A request may constrain its output to a JSON Schema, any JSON object, a regular
//! expression, one of a list of strings, or a Lark grammar. The constraint is
//! compiled once per request (the server caches compiled grammars) by
//! [`GrammarCompiler::compile`] into a [`CompiledGrammar`], and each choice gets its
//! own [`ConstraintMatcher`], which the per-choice decoder
//! ([`crate::decoder::ChoiceDecoder`]) asks before every sampling step for the set
//! of tokens the grammar allows next, and tells which token was chosen.
//!
//! The engine is [`llguidance`] (the Earley parser and lazy lexer that mistral.rs
//! and vLLM use), over a token trie built from this model's tokenizer: we write
//! no JSON state machine of our own. What we add is the boundary:
//!
//! * **Refuse what cannot be enforced.** A JSON Schema keyword llguidance does not
//!   implement (`uniqueItems`, `not`, `if`…), an unknown `format`, a remote `$ref`
//!   is an error naming the keyword and where it is ([`schema_check`]), never
//!   silently dropped. llguidance's own "lenient" mode and its `x-guidance`
//!   override key are never reachable from a request.
//! * **No PHI in errors or logs.** Schemas, regexes, choices and grammars may
//!   carry PHI (enum values, descriptions). llguidance's messages quote the
//!   grammar, so they are never passed on: every [`GrammarError`] names a keyword,
//!   a JSON pointer (its segments shown only when they look like identifiers) or
//!   a fixed problem. llguidance's logging is off (`quiet`, no verbose errors).
//! * **Bounded work.** llguidance's fuel limits bound lexer construction and the
//!   work of one mask; a grammar that runs out fails its choice with
//!   [`GrammarError::Runtime`], never the batch.

use std::sync::Arc;

use llguidance::api::{ParserLimits, TopLevelGrammar};
use llguidance::toktrie::{InferenceCapabilities, SimpleVob, TokEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::Value as Json;

use crate::tokenizer::Tokenizer;
use crate::Phi;

pub mod schema_check;
mod tok_env;

pub use schema_check::SUPPORTED_FORMATS;

/// What kind of constraint a request carries (for the audit record and metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConstraintKind {
    /// `response_format: json_object`: any JSON object.
    JsonObject,
    /// `response_format: json_schema`, or vLLM's `structured_outputs.json`.
    JsonSchema,
    /// vLLM's `structured_outputs.regex`: the whole output matches.
    Regex,
    /// vLLM's `structured_outputs.choice`: the output is one of the strings.
    Choice,
    /// vLLM's `structured_outputs.grammar`: a Lark grammar (llguidance dialect).
    Grammar,
}

impl ConstraintKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ConstraintKind::JsonObject => "json_object",
            ConstraintKind::JsonSchema => "json_schema",
            ConstraintKind::Regex => "regex",
            ConstraintKind::Choice => "choice",
            ConstraintKind::Grammar => "grammar",
        }
    }
}

/// A constraint as a request states it (after the API layer's shape checks). PHI.
#[derive(Debug, Clone)]
pub enum ConstraintSpec {
    JsonObject,
    /// The schema as JSON text, and vLLM's `whitespace_pattern` (a regex for the
    /// whitespace allowed between JSON tokens; without it the separators are
    /// fixed: `", "` and `": "`, no newlines).
    JsonSchema {
        schema: Phi<String>,
        whitespace_pattern: Option<Phi<String>>,
    },
    Regex(Phi<String>),
    Choice(Vec<Phi<String>>),
    /// A Lark grammar; its start rule is `start`.
    Grammar(Phi<String>),
}

impl ConstraintSpec {
    pub fn kind(&self) -> ConstraintKind {
        match self {
            ConstraintSpec::JsonObject => ConstraintKind::JsonObject,
            ConstraintSpec::JsonSchema { .. } => ConstraintKind::JsonSchema,
            ConstraintSpec::Regex(_) => ConstraintKind::Regex,
            ConstraintSpec::Choice(_) => ConstraintKind::Choice,
            ConstraintSpec::Grammar(_) => ConstraintKind::Grammar,
        }
    }

    /// The canonical text of the constraint: what the audit HMAC and the grammar
    /// cache key are computed over. JSON Schema: the schema's JSON text as
    /// received (member order kept), then, if a whitespace pattern was given, a
    /// newline and the pattern; regex and grammar: their text; choice: the JSON
    /// array of the strings; `json_object`: the empty string.
    pub fn canonical_text(&self) -> Phi<String> {
        Phi::new(match self {
            ConstraintSpec::JsonObject => String::new(),
            ConstraintSpec::JsonSchema { schema, whitespace_pattern } => {
                let mut s = schema.expose().clone();
                if let Some(w) = whitespace_pattern {
                    s.push('\n');
                    s.push_str(w.expose());
                }
                s
            }
            ConstraintSpec::Regex(r) => r.expose().clone(),
            ConstraintSpec::Choice(c) => {
                serde_json::to_string(&c.iter().map(|s| s.expose().as_str()).collect::<Vec<_>>()).unwrap_or_default()
            }
            ConstraintSpec::Grammar(g) => g.expose().clone(),
        })
    }

    /// Bytes of client-supplied text in the constraint (bounded by
    /// `[limits] max_schema_bytes`).
    pub fn size_bytes(&self) -> usize {
        match self {
            ConstraintSpec::JsonObject => 0,
            ConstraintSpec::JsonSchema { schema, whitespace_pattern } => {
                schema.expose().len() + whitespace_pattern.as_ref().map_or(0, |w| w.expose().len())
            }
            ConstraintSpec::Regex(r) | ConstraintSpec::Grammar(r) => r.expose().len(),
            ConstraintSpec::Choice(c) => c.iter().map(|s| s.expose().len() + 1).sum(),
        }
    }
}

/// Why a constraint was refused or failed. Messages never quote the constraint:
/// they name a keyword, a JSON pointer (see [`schema_check`]) or a fixed problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrammarError {
    /// A JSON Schema keyword the engine does not enforce.
    #[error("JSON Schema keyword `{keyword}` at {pointer} is not supported: it cannot be enforced")]
    UnsupportedKeyword { keyword: &'static str, pointer: String },
    /// A `format` the engine does not know.
    #[error("the `format` at {pointer} is not one that can be enforced (supported: {})", SUPPORTED_FORMATS.join(", "))]
    UnsupportedFormat { pointer: String },
    /// The schema is not valid JSON Schema (or not JSON at all).
    #[error("invalid JSON Schema at {pointer}: {problem}")]
    InvalidSchema { pointer: String, problem: &'static str },
    /// No output can satisfy the schema (for example `minimum` above `maximum`).
    #[error("the JSON Schema cannot be satisfied by any value")]
    Unsatisfiable,
    /// The regular expression does not parse. `reason` is the parser's error kind
    /// (for example "unclosed group"), never the expression.
    #[error("invalid regular expression: {reason}")]
    InvalidRegex { reason: String },
    /// The Lark grammar does not compile.
    #[error("invalid grammar: the Lark grammar does not compile")]
    InvalidGrammar,
    /// `choice` is empty or holds an empty string.
    #[error("invalid choice list: {0}")]
    InvalidChoice(&'static str),
    /// The constraint is larger or more complex than the compile limits allow.
    #[error("the constraint is too large or too complex to compile")]
    TooComplex,
    /// The grammar failed while decoding (it ran out of its per-token work
    /// budget, or allowed no token): the choice ends with an error.
    #[error("the output constraint could not be continued")]
    Runtime,
    /// The tokenizer's vocabulary could not be turned into a token trie.
    #[error("structured outputs are not available for this model's tokenizer: {0}")]
    Tokenizer(&'static str),
}

/// Compiles constraints for one model: holds the token trie of its vocabulary.
pub struct GrammarCompiler {
    factory: ParserFactory,
    vocab_size: usize,
}

impl std::fmt::Debug for GrammarCompiler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrammarCompiler").field("vocab_size", &self.vocab_size).finish()
    }
}

/// Work limits for one grammar (llguidance's fuel units; its defaults, but for
/// errors that do not carry the parser state, and a smaller lexer to bound memory).
fn parser_limits() -> ParserLimits {
    ParserLimits { verbose_errors: false, max_lexer_states: 100_000, ..ParserLimits::default() }
}

impl GrammarCompiler {
    /// Builds the token trie of `tokenizer` for logits of `vocab_size` entries
    /// (ids past the tokenizer's vocabulary are never allowed). `end_ids` are the
    /// model's end-of-generation tokens: allowed when the grammar is complete.
    pub fn new(tokenizer: &Tokenizer, vocab_size: usize, end_ids: &[u32]) -> Result<Self, GrammarError> {
        Self::with_env(tok_env::TrieEnv::new(tokenizer, vocab_size, end_ids)?, vocab_size)
    }

    /// A compiler for a vocabulary given as the bytes of each token (index =
    /// id; an empty entry is a token without text, never allowed).
    pub fn from_token_bytes(tokens: Vec<Vec<u8>>, vocab_size: usize, end_ids: &[u32]) -> Result<Self, GrammarError> {
        Self::with_env(tok_env::TrieEnv::from_token_bytes(tokens, vocab_size, end_ids, None)?, vocab_size)
    }

    fn with_env(env: tok_env::TrieEnv, vocab_size: usize) -> Result<Self, GrammarError> {
        let env: TokEnv = Arc::new(env);
        let mut factory = ParserFactory::new(&env, InferenceCapabilities::default(), &[])
            .map_err(|_| GrammarError::Tokenizer("the token trie could not be built"))?;
        factory.quiet();
        *factory.limits_mut() = parser_limits();
        Ok(GrammarCompiler { factory, vocab_size })
    }

    /// Compiles `spec`. Checks the schema first ([`schema_check`]), so that what
    /// the engine would not enforce is refused by name.
    pub fn compile(&self, spec: &ConstraintSpec) -> Result<CompiledGrammar, GrammarError> {
        let grammar = match spec {
            ConstraintSpec::JsonObject => json_grammar(serde_json::json!({"type": "object"}), None),
            ConstraintSpec::JsonSchema { schema, whitespace_pattern } => {
                let value: Json = serde_json::from_str(schema.expose())
                    .map_err(|_| GrammarError::InvalidSchema { pointer: "#".into(), problem: "not valid JSON" })?;
                if let Some(w) = whitespace_pattern {
                    check_regex(w.expose())?;
                }
                let value = schema_check::check(value)?;
                json_grammar(value, whitespace_pattern.as_ref().map(|w| w.expose().as_str()))
            }
            ConstraintSpec::Regex(rx) => {
                check_regex(rx.expose())?;
                TopLevelGrammar::from_regex(rx.expose())
            }
            ConstraintSpec::Choice(choices) => {
                if choices.is_empty() {
                    return Err(GrammarError::InvalidChoice("it is empty"));
                }
                if choices.iter().any(|c| c.expose().is_empty()) {
                    return Err(GrammarError::InvalidChoice("it holds an empty string"));
                }
                let alternatives: Vec<String> = choices.iter().map(|c| regex_syntax::escape(c.expose())).collect();
                TopLevelGrammar::from_regex(&alternatives.join("|"))
            }
            ConstraintSpec::Grammar(lark) => {
                if lark.expose().trim().is_empty() {
                    return Err(GrammarError::InvalidGrammar);
                }
                TopLevelGrammar::from_lark(lark.expose().clone())
            }
        };
        let parser =
            self.factory.create_parser(grammar).map_err(|e| classify_compile_error(spec.kind(), &e.to_string()))?;
        let prototype = Matcher::new(Ok(parser));
        if prototype.is_error() {
            return Err(GrammarError::TooComplex);
        }
        Ok(CompiledGrammar { kind: spec.kind(), prototype, vocab_size: self.vocab_size })
    }
}

/// A JSON grammar with our fixed options: no `lenient` mode, and compact fixed
/// separators unless a whitespace pattern is given.
fn json_grammar(mut schema: Json, whitespace_pattern: Option<&str>) -> TopLevelGrammar {
    let options = match whitespace_pattern {
        Some(w) => serde_json::json!({ "whitespace_flexible": true, "whitespace_pattern": w, "lenient": false }),
        None => serde_json::json!({
            "whitespace_flexible": false, "item_separator": ", ", "key_separator": ": ", "lenient": false
        }),
    };
    match &mut schema {
        Json::Object(map) => {
            // `schema_check` refused any client-supplied `x-guidance`.
            map.insert("x-guidance".into(), options);
        }
        Json::Bool(_) => {
            // `true`: any JSON value (`schema_check` refuses a top-level `false`).
            schema = serde_json::json!({ "x-guidance": options });
        }
        _ => {}
    }
    TopLevelGrammar::from_json_schema(schema)
}

fn check_regex(rx: &str) -> Result<(), GrammarError> {
    regex_syntax::Parser::new().parse(rx).map(|_| ()).map_err(|e| GrammarError::InvalidRegex {
        reason: match e {
            regex_syntax::Error::Parse(p) => p.kind().to_string(),
            regex_syntax::Error::Translate(t) => t.kind().to_string(),
            _ => "not a valid regular expression".into(),
        },
    })
}

/// Maps an llguidance compile error to ours without passing its message on (it
/// may quote the constraint).
fn classify_compile_error(kind: ConstraintKind, msg: &str) -> GrammarError {
    if msg.contains("Unsatisfiable") {
        GrammarError::Unsatisfiable
    } else if msg.contains("too large") || msg.contains("fuel") || msg.contains("limit") || msg.contains("too many") {
        GrammarError::TooComplex
    } else {
        match kind {
            ConstraintKind::Grammar => GrammarError::InvalidGrammar,
            ConstraintKind::Regex | ConstraintKind::Choice => {
                GrammarError::InvalidRegex { reason: "the expression cannot be compiled".into() }
            }
            ConstraintKind::JsonObject | ConstraintKind::JsonSchema => {
                GrammarError::InvalidSchema { pointer: "#".into(), problem: "the schema cannot be compiled" }
            }
        }
    }
}

/// A compiled constraint, shared (the server caches it) by every choice that
/// uses it; each choice decodes with its own [`ConstraintMatcher`].
pub struct CompiledGrammar {
    kind: ConstraintKind,
    prototype: Matcher,
    vocab_size: usize,
}

impl std::fmt::Debug for CompiledGrammar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompiledGrammar").field("kind", &self.kind).finish_non_exhaustive()
    }
}

impl CompiledGrammar {
    pub fn kind(&self) -> ConstraintKind {
        self.kind
    }

    /// A fresh matcher at the start of the output. Clones share the lexer's
    /// caches, so states built for one choice serve the others.
    pub fn matcher(&self) -> ConstraintMatcher {
        ConstraintMatcher { matcher: self.prototype.clone(), mask: None, vocab_size: self.vocab_size }
    }
}

/// The state of one choice's constraint.
pub struct ConstraintMatcher {
    matcher: Matcher,
    /// The allowed set for the next token, once computed.
    mask: Option<SimpleVob>,
    vocab_size: usize,
}

impl std::fmt::Debug for ConstraintMatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConstraintMatcher").field("prepared", &self.mask.is_some()).finish_non_exhaustive()
    }
}

impl ConstraintMatcher {
    /// Computes the set of tokens allowed next, if not computed yet. This is the
    /// costly part of a constrained step, and it depends only on the tokens
    /// already accepted, so it may run while the model computes the logits.
    pub fn prepare(&mut self) -> Result<(), GrammarError> {
        if self.mask.is_none() {
            let mask = self.matcher.compute_mask().map_err(|_| GrammarError::Runtime)?;
            self.mask = Some(mask);
        }
        Ok(())
    }

    /// Whether the prepared mask allows `token`.
    pub fn allows(&mut self, token: u32) -> Result<bool, GrammarError> {
        self.prepare()?;
        Ok(self.mask.as_ref().is_some_and(|m| (token as usize) < m.len() && m.is_allowed(token)))
    }

    /// Whether the output may end here (the grammar is complete).
    pub fn is_accepting(&mut self) -> Result<bool, GrammarError> {
        self.matcher.is_accepting().map_err(|_| GrammarError::Runtime)
    }

    /// Writes into `out` the step's `logits` with every token the grammar does
    /// not allow next at −∞ (the caller then sets the end tokens: allowed
    /// exactly when the grammar is complete). Returns the number of allowed
    /// tokens. Visits only the allowed ones: usually a few hundred.
    pub fn mask_logits(&mut self, logits: &[f32], out: &mut Vec<f32>) -> Result<usize, GrammarError> {
        self.prepare()?;
        let mask = self.mask.as_ref().ok_or(GrammarError::Runtime)?;
        out.clear();
        out.resize(logits.len(), f32::NEG_INFINITY);
        let limit = self.vocab_size.min(logits.len());
        let mut allowed = 0;
        mask.iter_set_entries(|i| {
            if i < limit {
                out[i] = logits[i];
                allowed += 1;
            }
        });
        Ok(allowed)
    }

    /// Accepts the chosen token. Returns true when the grammar allows nothing
    /// more (the output is complete).
    pub fn commit(&mut self, token: u32) -> Result<bool, GrammarError> {
        self.mask = None;
        self.matcher.consume_token(token).map_err(|_| GrammarError::Runtime)?;
        Ok(self.matcher.is_stopped())
    }
}

#[cfg(test)]
mod tests;
