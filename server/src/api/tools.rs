//! Tool calling at the API: the request's `tools`, `tool_choice` and
//! `parallel_tool_calls`, checked; the constraint that `required` and a named
//! choice put on decoding; and the ids of the calls in a response.
//!
//! OpenAI's semantics: `tool_choice` defaults to `auto` when tools are given
//! (the model answers in text or calls tools), `none` never calls (and, as in
//! vLLM, the tools are then left out of the prompt), `required` calls at least
//! one tool, `{"type": "function", "function": {"name"}}` calls that one. For
//! `required` and a named choice decoding is constrained to well-formed calls
//! whose arguments validate against the tool's `parameters` (structured
//! outputs). For `auto` it is constrained to text or calls: the model writes
//! what it likes until it writes the call marker, and from there a call to one
//! of the tools, whose arguments follow the tool's `parameters` when it is
//! `strict` and are any JSON object otherwise. (With a `response_format`
//! besides, that constraint applies instead, and calls are parsed from the
//! output: one that does not parse stays text.)
//!
//! Tool names are app-defined identifiers (`[A-Za-z0-9_-]`, 1–64): they are
//! the only part of a tool that reaches the audit trail. Descriptions,
//! parameters, arguments and results are PHI.

use salus_models::chat::ToolDefinitions;
use salus_models::grammar::schema_check;
use salus_models::grammar::ConstraintSpec;
use salus_models::tool_calls::ToolCallFormat;
use salus_models::Phi;
use serde_json::Value;

use super::error::ApiError;
use super::json::Fields;
use super::structured::RequestedConstraint;

/// Most tools in one request.
pub const MAX_TOOLS: usize = 128;

/// What the model may do with the tools.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    None,
    Auto,
    Required,
    /// Index into the request's tools.
    Named(usize),
}

/// One tool, validated. `parameters` is its JSON Schema (checked: every keyword
/// enforceable), kept as JSON for the template and the call grammar.
#[derive(Debug, Clone)]
pub struct ToolSpec {
    pub name: String,
    pub strict: bool,
    parameters: ParametersSchema,
}

/// A tool's parameters schema: client data (it may hold PHI in descriptions or
/// enum values), so `Debug` does not show it.
#[derive(Clone)]
struct ParametersSchema(Value);

impl std::fmt::Debug for ParametersSchema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ParametersSchema([PHI])")
    }
}

/// A request's tools that passed validation.
#[derive(Debug, Clone)]
pub struct ValidatedTools {
    pub tools: Vec<ToolSpec>,
    pub choice: ToolChoice,
    pub parallel: bool,
    /// The request's `tools` in OpenAI's shape, for the chat template (PHI).
    pub definitions: ToolDefinitions,
}

fn is_identifier(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Reads `tools`, `tool_choice` and `parallel_tool_calls`. `None` when the
/// request has no tools (then `tool_choice` may only be `none`).
pub fn parse_tools(f: &mut Fields) -> Result<Option<ValidatedTools>, ApiError> {
    let tools_value = f.take("tools");
    let choice_value = f.take("tool_choice");
    let parallel = f.bool("parallel_tool_calls")?.unwrap_or(true);
    let Some(tools_value) = tools_value else {
        return match choice_value {
            None => Ok(None),
            Some(Value::String(s)) if s == "none" => Ok(None),
            Some(_) => Err(ApiError::invalid("tool_choice", "tool_choice needs tools")),
        };
    };
    let Value::Array(items) = tools_value else {
        return Err(ApiError::invalid("tools", "tools must be an array of function tools"));
    };
    if items.is_empty() || items.len() > MAX_TOOLS {
        return Err(ApiError::invalid("tools", format!("tools must hold 1 to {MAX_TOOLS} tools")));
    }
    let mut tools = Vec::with_capacity(items.len());
    let mut definitions = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let (spec, definition) = parse_tool(item, i)?;
        if tools.iter().any(|t: &ToolSpec| t.name == spec.name) {
            return Err(ApiError::invalid(format!("tools[{i}].function.name"), "tool names must be unique"));
        }
        tools.push(spec);
        definitions.push(definition);
    }
    let choice = match choice_value {
        None => ToolChoice::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            _ => {
                return Err(ApiError::invalid("tool_choice", "tool_choice must be none, auto, required or a function"))
            }
        },
        Some(Value::Object(m)) => {
            let mut cf = Fields::nested(m, "tool_choice");
            if cf.string("type")?.as_deref() != Some("function") {
                return Err(ApiError::invalid("tool_choice", "tool_choice.type must be function"));
            }
            let Some(mut func) = cf.object("function")? else {
                return Err(ApiError::invalid("tool_choice", "tool_choice.function.name is required"));
            };
            let name = func
                .string("name")?
                .ok_or_else(|| ApiError::invalid("tool_choice", "tool_choice.function.name is required"))?;
            func.finish(&[])?;
            cf.finish(&[])?;
            let index = tools
                .iter()
                .position(|t| t.name == name)
                .ok_or_else(|| ApiError::invalid("tool_choice", "tool_choice names a function that is not in tools"))?;
            ToolChoice::Named(index)
        }
        Some(_) => return Err(ApiError::invalid("tool_choice", "tool_choice must be a string or an object")),
    };
    Ok(Some(ValidatedTools { tools, choice, parallel, definitions: ToolDefinitions(definitions) }))
}

fn parse_tool(item: Value, i: usize) -> Result<(ToolSpec, Value), ApiError> {
    let param = format!("tools[{i}]");
    let Value::Object(m) = item else {
        return Err(ApiError::invalid(param.clone(), format!("{param} must be an object")));
    };
    let mut tf = Fields::nested(m, param.clone());
    if tf.string("type")?.as_deref() != Some("function") {
        return Err(ApiError::invalid(format!("{param}.type"), format!("{param}.type must be function")));
    }
    let Some(mut func) = tf.object("function")? else {
        return Err(ApiError::invalid(format!("{param}.function"), format!("{param}.function is required")));
    };
    tf.finish(&[])?;
    let name = func.string("name")?.unwrap_or_default();
    if !is_identifier(&name) {
        return Err(ApiError::invalid(
            format!("{param}.function.name"),
            format!("{param}.function.name must be 1 to 64 characters of a-z, A-Z, 0-9, _ and -"),
        ));
    }
    let description = func.string("description")?;
    let strict = func.bool("strict")?.unwrap_or(false);
    let parameters = match func.take("parameters") {
        None => serde_json::json!({"type": "object", "properties": {}}),
        Some(v @ Value::Object(_)) => v,
        Some(_) => {
            return Err(ApiError::invalid(
                format!("{param}.function.parameters"),
                format!("{param}.function.parameters must be a JSON Schema object"),
            ))
        }
    };
    func.finish(&[])?;
    // Every keyword must be enforceable: the arguments are constrained by it.
    let checked = schema_check::check(parameters.clone()).map_err(|e| {
        ApiError::invalid(format!("{param}.function.parameters"), format!("{param}.function.parameters: {e}"))
    })?;
    let mut function = serde_json::Map::new();
    function.insert("name".into(), Value::String(name.clone()));
    if let Some(d) = description {
        function.insert("description".into(), Value::String(d));
    }
    function.insert("parameters".into(), parameters);
    let definition = serde_json::json!({"type": "function", "function": Value::Object(function)});
    Ok((ToolSpec { name, strict, parameters: ParametersSchema(checked) }, definition))
}

impl ValidatedTools {
    /// Whether the model may call tools (its output is then parsed for calls).
    pub fn may_call(&self) -> bool {
        self.choice != ToolChoice::None
    }

    /// The tools as the template sees them: none when `tool_choice` is `none`.
    pub fn for_template(&self) -> ToolDefinitions {
        if self.may_call() {
            self.definitions.clone()
        } else {
            ToolDefinitions::default()
        }
    }

    /// The names of the tools offered (for the audit record).
    pub fn names(&self) -> Vec<String> {
        self.tools.iter().map(|t| t.name.clone()).collect()
    }

    /// Whether decoding allows nothing but calls (`required`, a named tool).
    pub fn calls_only(&self) -> bool {
        matches!(self.choice, ToolChoice::Required | ToolChoice::Named(_))
    }

    /// The decoding constraint: for `required` and a named choice, well-formed
    /// calls in `format` to the allowed tools, arguments valid per their
    /// parameters; for `auto`, text or such calls, arguments valid per the
    /// parameters of `strict` tools and any object for the others. `None` for
    /// `none`. `special_markers` are the format's markers that are special
    /// tokens of the vocabulary, with their ids.
    pub fn constraint(&self, format: ToolCallFormat, special_markers: &[(&str, u32)]) -> Option<RequestedConstraint> {
        let any_object = Value::Bool(true);
        let grammar = match self.choice {
            ToolChoice::Required => {
                let allowed: Vec<(&str, &Value)> =
                    self.tools.iter().map(|t| (t.name.as_str(), &t.parameters.0)).collect();
                format.call_grammar_with_special_tokens(&allowed, self.parallel, special_markers)
            }
            ToolChoice::Named(i) => {
                let allowed = [(self.tools[i].name.as_str(), &self.tools[i].parameters.0)];
                format.call_grammar_with_special_tokens(&allowed, false, special_markers)
            }
            ToolChoice::Auto => {
                let allowed: Vec<(&str, &Value)> = self
                    .tools
                    .iter()
                    .map(|t| (t.name.as_str(), if t.strict { &t.parameters.0 } else { &any_object }))
                    .collect();
                format.text_or_calls_grammar(&allowed, self.parallel, special_markers)
            }
            ToolChoice::None => return None,
        };
        Some(RequestedConstraint { spec: ConstraintSpec::Grammar(Phi::new(grammar)), param: "tools" })
    }
}

/// A call the model made, as the response message carries it. `arguments` is
/// the JSON text of the arguments (PHI).
#[derive(Debug, Clone)]
pub struct ToolCall {
    /// Its position among the choice's calls (`delta.tool_calls[].index`).
    pub index: usize,
    pub id: String,
    pub name: String,
    pub arguments: Phi<String>,
}

/// A piece of a call, as a stream's `delta.tool_calls[]` carries it: the
/// call's id and name in its first delta, and more of its arguments (PHI).
#[derive(Debug, Clone)]
pub struct ToolCallDelta {
    /// The call's position among the choice's calls.
    pub index: usize,
    /// The call's id and function name: in its first delta only.
    pub head: Option<(String, String)>,
    pub arguments: Phi<String>,
}

/// A fresh call id: `call_` and 24 random hex digits.
pub fn new_call_id() -> String {
    let bytes: [u8; 12] = rand::random();
    format!("call_{}", hex::encode(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(body: Value) -> Result<Option<ValidatedTools>, ApiError> {
        let Value::Object(m) = body else { panic!() };
        let mut f = Fields::new(m);
        parse_tools(&mut f)
    }

    fn tool(name: &str, params: Value) -> Value {
        json!({"type": "function", "function": {"name": name, "description": "d", "parameters": params}})
    }

    #[test]
    fn choices_and_defaults() {
        let t = parse(json!({"tools": [tool("a", json!({"type": "object"})), tool("b", json!({}))]})).unwrap().unwrap();
        assert_eq!((t.choice.clone(), t.parallel), (ToolChoice::Auto, true));
        assert_eq!(t.names(), ["a", "b"]);
        let t = parse(json!({"tools": [tool("a", json!({})), tool("b", json!({}))],
            "tool_choice": {"type": "function", "function": {"name": "b"}}, "parallel_tool_calls": false}))
        .unwrap()
        .unwrap();
        assert_eq!((t.choice.clone(), t.parallel), (ToolChoice::Named(1), false));
        let t = parse(json!({"tools": [tool("a", json!({}))], "tool_choice": "none"})).unwrap().unwrap();
        assert!(!t.may_call() && t.for_template().is_empty());
        assert!(parse(json!({"tool_choice": "none"})).unwrap().is_none());
    }

    #[test]
    fn refusals_name_the_field() {
        let param = |body: Value| parse(body).unwrap_err().body()["error"]["param"].as_str().unwrap().to_string();
        assert_eq!(param(json!({"tool_choice": "auto"})), "tool_choice");
        assert_eq!(
            param(
                json!({"tools": [tool("a", json!({}))], "tool_choice": {"type": "function", "function": {"name": "zz"}}})
            ),
            "tool_choice"
        );
        assert_eq!(param(json!({"tools": [tool("a b", json!({}))]})), "tools[0].function.name");
        assert_eq!(param(json!({"tools": [tool("a", json!({})), tool("a", json!({}))]})), "tools[1].function.name");
        let e = parse(json!({"tools": [tool("a", json!({"type": "object", "description": "CANARY-T",
            "properties": {"x": {"type": "array", "uniqueItems": true, "items": {"enum": ["CANARY-E"]}}}}))]}))
        .unwrap_err();
        let body = e.body().to_string();
        assert!(body.contains("tools[0].function.parameters") && body.contains("uniqueItems"), "{body}");
        assert!(!body.contains("CANARY"), "{body}");
        assert_eq!(param(json!({"tools": [tool("a", json!([]))]})), "tools[0].function.parameters");
        assert_eq!(param(json!({"tools": []})), "tools");
    }

    #[test]
    fn auto_constrains_the_arguments_of_strict_tools_only() {
        let strict = json!({"type": "function", "function": {"name": "a", "strict": true,
            "parameters": {"type": "object", "properties": {"only_strict": {"type": "string"}}}}});
        let loose = tool("b", json!({"type": "object", "properties": {"only_loose": {"type": "string"}}}));
        let t = parse(json!({"tools": [strict, loose]})).unwrap().unwrap();
        let grammar = |t: &ValidatedTools| match t.constraint(ToolCallFormat::Hermes, &[]).map(|c| c.spec) {
            Some(ConstraintSpec::Grammar(g)) => g.expose().clone(),
            other => panic!("{other:?}"),
        };
        let auto = grammar(&t);
        assert!(auto.contains("only_strict") && !auto.contains("only_loose"), "{auto}");
        assert!(auto.contains("TEXT"), "auto allows text: {auto}");
        let mut required = t.clone();
        required.choice = ToolChoice::Required;
        let required = grammar(&required);
        assert!(required.contains("only_strict") && required.contains("only_loose") && !required.contains("TEXT"));
        let mut none = t;
        none.choice = ToolChoice::None;
        assert!(none.constraint(ToolCallFormat::Hermes, &[]).is_none());
    }

    #[test]
    fn call_ids_are_unique_and_shaped() {
        let a = new_call_id();
        assert!(a.starts_with("call_") && a.len() == 29);
        assert_ne!(a, new_call_id());
    }
}
