//! Call grammars: llguidance Lark grammars whose language is the calls a
//! family writes ([`ToolCallFormat::render_calls`]), to the request's tools,
//! with each call's arguments valid against its tool's JSON Schema.
//!
//! Two shapes:
//! * **calls only** ([`ToolCallFormat::call_grammar`]): `tool_choice` required
//!   or a named tool. The output is one call (or, parallel, several).
//! * **text or calls** ([`ToolCallFormat::text_or_calls_grammar`]):
//!   `tool_choice: auto`. The output is free text, or (Hermes, Mistral) text
//!   followed by calls, or (Llama 3) calls alone. The text may hold anything
//!   but the format's call marker, so the moment the model writes the marker
//!   the call is constrained: its name is one of the tools and its arguments
//!   follow the tool's schema (or, for a tool that is not `strict`, are any
//!   JSON object). Nothing follows the calls.
//!
//! Both are exactly the language [`super::ToolCallStreamer::for_call_grammar`]
//! reads, call by call, as argument fragments.

use serde_json::Value as Json;

use super::{ToolCallFormat, HERMES_CLOSE, HERMES_OPEN, MISTRAL_MARKER, PYTHON_TAG};

/// Any text (a Lark regex).
const ANY: &str = "/(?s:.*)/";

impl ToolCallFormat {
    /// An llguidance Lark grammar whose language is exactly one call (with
    /// `parallel`, one or more calls) in this format, as
    /// [`ToolCallFormat::render_calls`] writes them, each to one of `tools`
    /// (name, JSON Schema of the parameters) with arguments valid against that
    /// tool's schema. Markers are written as text; see
    /// [`ToolCallFormat::call_grammar_with_special_tokens`] for tokenizers in
    /// which they are special tokens.
    ///
    /// The schemas should have passed [`crate::grammar::schema_check::check`].
    /// A `null` schema means no parameters (`{}`); `true` means any object.
    /// With no tools the grammar is empty, which
    /// [`crate::grammar::GrammarCompiler::compile`] refuses.
    pub fn call_grammar(self, tools: &[(&str, &Json)], parallel: bool) -> String {
        self.call_grammar_with_special_tokens(tools, parallel, &[])
    }

    /// [`ToolCallFormat::call_grammar`], with the markers listed in
    /// `special_tokens` (`"[TOOL_CALLS]"`, `"<tool_call>"`, `"</tool_call>"`)
    /// written as that token id (`<[id]>`): a special token is never matched by
    /// text in llguidance, so a marker that is one in the model's tokenizer must
    /// be allowed by id.
    pub fn call_grammar_with_special_tokens(
        self,
        tools: &[(&str, &Json)],
        parallel: bool,
        special_tokens: &[(&str, u32)],
    ) -> String {
        if tools.is_empty() {
            return String::new();
        }
        let mut lark = String::from("start: calls\n");
        self.push_calls_rules(&mut lark, tools, parallel, special_tokens);
        lark
    }

    /// The grammar of `tool_choice: auto` (see the module docs): free text
    /// without the call marker, optionally followed by calls (Hermes, Mistral),
    /// or calls alone (Llama 3, whose calls are the whole output). The empty
    /// output is allowed. Arguments of a tool given the schema `true` are any
    /// JSON object. Special-token markers as in
    /// [`ToolCallFormat::call_grammar_with_special_tokens`].
    pub fn text_or_calls_grammar(
        self,
        tools: &[(&str, &Json)],
        parallel: bool,
        special_tokens: &[(&str, u32)],
    ) -> String {
        if tools.is_empty() {
            return String::new();
        }
        let mut lark = match self {
            ToolCallFormat::Hermes | ToolCallFormat::Mistral => {
                let open = self.open_marker();
                // The text never holds the marker as text, whether or not it
                // is also a special token: the reader would take it for a call.
                let text = format!("~({ANY} {} {ANY})", lark_string(open));
                if special_tokens.iter().any(|(t, _)| *t == open) {
                    // The marker is a token of its own, which ends the text lexeme.
                    format!("start: TEXT | TEXT calls | calls\nTEXT: {text} & /(?s:.+)/\n")
                } else {
                    // Text and marker are one lazy lexeme, ending at the
                    // first marker: a (greedy) text lexeme followed by a
                    // marker lexeme would have swallowed the marker's bytes.
                    format!("start: TEXT | lead after_marker\nTEXT: {text}\nlead[lazy]: TEXT {}\n", lark_string(open))
                }
            }
            ToolCallFormat::Llama3Json => {
                // Text whose first non-blank character does not open a call
                // (`{`, or the `<|python_tag|>` the reader also takes as one).
                let text =
                    format!("TEXT: /\\s*/ | (/(?s:\\s*[^\\s{{].*)/ & ~(/\\s*/ {} {ANY}))\n", lark_string(PYTHON_TAG));
                format!("start: TEXT | calls\n{text}")
            }
        };
        self.push_calls_rules(&mut lark, tools, parallel, special_tokens);
        lark
    }

    /// The marker a call (Hermes) or the calls (Mistral) begin with.
    fn open_marker(self) -> &'static str {
        match self {
            ToolCallFormat::Hermes => HERMES_OPEN,
            ToolCallFormat::Mistral => MISTRAL_MARKER,
            ToolCallFormat::Llama3Json => "",
        }
    }

    /// The rules `calls`, `call`, `tool` and `tool_i`.
    fn push_calls_rules(self, lark: &mut String, tools: &[(&str, &Json)], parallel: bool, special: &[(&str, u32)]) {
        let marker = |text: &str| match special.iter().find(|(t, _)| *t == text) {
            Some((_, id)) => format!("<[{id}]>"),
            None => lark_string(text),
        };
        // `calls`; and `after_marker`, the same without its first marker.
        let more = |separator: &str| match parallel {
            true => format!(" ({} call)*", lark_string(separator)),
            false => String::new(),
        };
        match self {
            ToolCallFormat::Hermes => {
                let body = format!("\"\\n\" tool \"\\n\" {}", marker(HERMES_CLOSE));
                let more = more("\n");
                lark.push_str(&format!("calls: call{more}\ncall: {} {body}\n", marker(HERMES_OPEN)));
                lark.push_str(&format!("after_marker: {body}{more}\n"));
            }
            ToolCallFormat::Llama3Json => {
                lark.push_str(&format!("calls: call{}\ncall: tool\n", more("; ")));
            }
            ToolCallFormat::Mistral => {
                let body = format!("\"[\" call{} {}", more(", "), lark_string("]"));
                lark.push_str(&format!("calls: {} {body}\ncall: tool\n", marker(MISTRAL_MARKER)));
                lark.push_str(&format!("after_marker: {body}\n"));
            }
        }
        let alternatives: Vec<String> = (0..tools.len()).map(|i| format!("tool_{i}")).collect();
        lark.push_str(&format!("tool: {}\n", alternatives.join(" | ")));
        for (i, (name, parameters)) in tools.iter().enumerate() {
            lark.push_str(&format!(
                "tool_{i}: {} %json {} \"}}\"\n",
                lark_string(&self.call_prefix(name)),
                json_text_compact(&arguments_schema(parameters))
            ));
        }
    }
}

/// The schema the arguments of a tool are constrained by: its parameters
/// schema, as an object, with our fixed JSON options (`x-guidance`) at its top
/// level. A client's own `x-guidance` is refused before this; it would be
/// replaced here anyway.
fn arguments_schema(parameters: &Json) -> Json {
    let mut schema = match parameters {
        Json::Object(_) => parameters.clone(),
        // No parameters: OpenAI's "empty parameter list".
        Json::Null => serde_json::json!({"properties": {}, "additionalProperties": false}),
        Json::Bool(true) => serde_json::json!({}),
        other => serde_json::json!({ "allOf": [other] }),
    };
    if let Json::Object(map) = &mut schema {
        // A call's arguments are an object. (A schema whose `type` is not
        // `object` is the caller's to refuse: parse would not take such a call.)
        map.entry("type").or_insert_with(|| Json::String("object".into()));
        map.insert(
            "x-guidance".into(),
            serde_json::json!({
                "whitespace_flexible": false, "item_separator": ", ", "key_separator": ": ", "lenient": false
            }),
        );
    }
    schema
}

/// `text` as a Lark string literal (JSON string syntax; the Lark lexer also
/// refuses a raw DEL).
fn lark_string(text: &str) -> String {
    json_text_compact(&Json::String(text.to_owned())).replace('\u{7f}', "\\u007f")
}

/// JSON text with no whitespace (as `serde_json` writes it).
fn json_text_compact(value: &Json) -> String {
    serde_json::to_string(value).unwrap_or_default()
}
