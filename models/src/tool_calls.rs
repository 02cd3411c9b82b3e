//! Tool calls: how each model family writes them, so that OpenAI-style tool
//! calling can work on plain text generation.
//!
//! A model calls a tool by writing text in a family-specific format (Qwen and
//! Hermes models wrap JSON in `<tool_call>` tags, Llama 3.1/3.2 write a bare
//! JSON object, Mistral models write `[TOOL_CALLS]` and a JSON array). This
//! module knows those formats in both directions:
//!
//! * **Out of the model:** [`parse`] splits a complete output into content and
//!   calls; [`ToolCallStreamer`] does the same incrementally for streamed output,
//!   holding back text that could still turn out to be the start of a call
//!   (exactly like a stop-string matcher holds back a partial stop string), so
//!   call text never leaks into streamed content.
//! * **Into the prompt:** [`ToolCallFormat::render_calls`] writes earlier calls
//!   of the conversation the way the model would have written them.
//! * **Forcing a call** (`tool_choice: required` or a named tool):
//!   [`ToolCallFormat::call_grammar`] is an llguidance Lark grammar whose
//!   language is exactly the calls [`ToolCallFormat::render_calls`] writes, with
//!   arguments valid against the tool's JSON Schema.
//!
//! Nothing the model wrote is lost: text that looks like a call but is not one
//! (not JSON, no valid name, arguments not an object) stays in the content.
//!
//! **Content rule.** The content is the text outside calls, in pieces (a piece
//! is the text between two calls, or before the first, or after the last). A
//! piece loses the whitespace where it touches a call; pieces left empty are
//! dropped; the rest are joined with `"\n"`. An output without calls is its
//! content unchanged. [`parse`] is the streamer fed the whole text at once, so
//! both follow this rule identically, whatever the chunking.
//!
//! Tool-call arguments and model output are PHI: they are kept in [`Phi`] and
//! never reach an error, a `Debug` output or a log line. Call names are only
//! accepted when they are valid function names (`^[A-Za-z0-9_-]{1,64}$`, as
//! OpenAI requires), so a name is never free text.

use std::io;

use serde_json::Value as Json;

use crate::Phi;

const HERMES_OPEN: &str = "<tool_call>";
const HERMES_CLOSE: &str = "</tool_call>";
const MISTRAL_MARKER: &str = "[TOOL_CALLS]";
const MISTRAL_ARGS: &str = "[ARGS]";
const PYTHON_TAG: &str = "<|python_tag|>";

/// How a model family writes tool calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ToolCallFormat {
    /// Hermes / Qwen2.5 / Qwen3: `<tool_call>\n{"name": …, "arguments": {…}}\n</tool_call>`.
    Hermes,
    /// Llama 3.1 / 3.2 JSON tool calling: `{"name": …, "parameters": {…}}`.
    Llama3Json,
    /// Mistral: `[TOOL_CALLS][{"name": …, "arguments": {…}}]` (and the v11+
    /// form `[TOOL_CALLS]name[ARGS]{…}`).
    Mistral,
}

impl ToolCallFormat {
    /// The format a chat template's source shows: Hermes if it mentions
    /// `<tool_call>`, Mistral if `[TOOL_CALLS]`, Llama3Json if `<|python_tag|>`,
    /// the `ipython` role, or `"parameters"` calls like the Llama 3.1/3.2
    /// templates; `None` if the template shows no tool-call format.
    pub fn detect(template_source: &str) -> Option<Self> {
        let has = |s: &str| template_source.contains(s);
        if has(HERMES_OPEN) {
            Some(ToolCallFormat::Hermes)
        } else if has(MISTRAL_MARKER) {
            Some(ToolCallFormat::Mistral)
        } else if has(PYTHON_TAG) || has("ipython") || (has("\"parameters\"") && has("tool_call")) {
            Some(ToolCallFormat::Llama3Json)
        } else {
            None
        }
    }

    /// The format named in a configuration: `hermes` (also `qwen`, `qwen2_5`),
    /// `llama3_json`, `mistral`.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "hermes" | "qwen" | "qwen2_5" => Some(ToolCallFormat::Hermes),
            "llama3_json" => Some(ToolCallFormat::Llama3Json),
            "mistral" => Some(ToolCallFormat::Mistral),
            _ => None,
        }
    }

    /// The configuration name ([`ToolCallFormat::from_name`] reads it back).
    pub fn as_str(self) -> &'static str {
        match self {
            ToolCallFormat::Hermes => "hermes",
            ToolCallFormat::Llama3Json => "llama3_json",
            ToolCallFormat::Mistral => "mistral",
        }
    }

    /// The key of the arguments in a call object.
    fn arguments_key(self) -> &'static str {
        match self {
            ToolCallFormat::Llama3Json => "parameters",
            ToolCallFormat::Hermes | ToolCallFormat::Mistral => "arguments",
        }
    }

    /// How `calls` (name, arguments) are written in an assistant message: Hermes
    /// blocks separated by `"\n"`, Llama3Json objects separated by `"; "`, one
    /// Mistral `[TOOL_CALLS]` array. JSON is written with the separators `", "`
    /// and `": "` (those [`ToolCallFormat::call_grammar`] enforces). No calls: `""`.
    pub fn render_calls(self, calls: &[(&str, &Json)]) -> String {
        if calls.is_empty() {
            return String::new();
        }
        let objects: Vec<String> = calls.iter().map(|(name, args)| self.call_object(name, args)).collect();
        match self {
            ToolCallFormat::Hermes => {
                objects.iter().map(|o| format!("{HERMES_OPEN}\n{o}\n{HERMES_CLOSE}")).collect::<Vec<_>>().join("\n")
            }
            ToolCallFormat::Llama3Json => objects.join("; "),
            ToolCallFormat::Mistral => format!("{MISTRAL_MARKER}[{}]", objects.join(", ")),
        }
    }

    /// One call object: `{"name": "f", "arguments": {…}}`.
    fn call_object(self, name: &str, arguments: &Json) -> String {
        format!("{}{}}}", self.call_prefix(name), json_text(arguments))
    }

    /// The call object up to its arguments: `{"name": "f", "arguments": `.
    fn call_prefix(self, name: &str) -> String {
        format!("{{\"name\": {}, \"{}\": ", json_text(&Json::String(name.to_owned())), self.arguments_key())
    }

    /// An llguidance Lark grammar whose language is exactly one call (with
    /// `parallel`, one or more calls) in this format, as
    /// [`ToolCallFormat::render_calls`] writes them, each to one of `tools`
    /// (name, JSON Schema of the parameters) with arguments valid against that
    /// tool's schema. Markers are written as text; see
    /// [`ToolCallFormat::call_grammar_with_special_tokens`] for tokenizers in
    /// which they are special tokens.
    ///
    /// The schemas should have passed [`crate::grammar::schema_check::check`].
    /// A `null` schema means no parameters (`{}`). With no tools the grammar is
    /// empty, which [`crate::grammar::GrammarCompiler::compile`] refuses.
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
        let marker = |text: &str| match special_tokens.iter().find(|(t, _)| *t == text) {
            Some((_, id)) => format!("<[{id}]>"),
            None => lark_string(text),
        };
        let (prefix, call, separator, suffix) = match self {
            ToolCallFormat::Hermes => (
                String::new(),
                format!("{} \"\\n\" tool \"\\n\" {}", marker(HERMES_OPEN), marker(HERMES_CLOSE)),
                "\n",
                String::new(),
            ),
            ToolCallFormat::Llama3Json => (String::new(), "tool".to_owned(), "; ", String::new()),
            ToolCallFormat::Mistral => {
                (format!("{} \"[\"", marker(MISTRAL_MARKER)), "tool".to_owned(), ", ", lark_string("]"))
            }
        };
        let more = if parallel { format!(" ({} call)*", lark_string(separator)) } else { String::new() };
        let mut lark = format!("start: {prefix} call{more} {suffix}\ncall: {call}\n");
        let alternatives: Vec<String> = (0..tools.len()).map(|i| format!("tool_{i}")).collect();
        lark.push_str(&format!("tool: {}\n", alternatives.join(" | ")));
        for (i, (name, parameters)) in tools.iter().enumerate() {
            lark.push_str(&format!(
                "tool_{i}: {} %json {} \"}}\"\n",
                lark_string(&self.call_prefix(name)),
                json_text_compact(&arguments_schema(parameters))
            ));
        }
        lark
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

/// JSON text with the separators `", "` and `": "` and no other whitespace.
fn json_text(value: &Json) -> String {
    python_style_json(value)
}

/// JSON text as Python's `json.dumps` writes it by default (separators `", "`
/// and `": "`, no HTML escaping): what Hugging Face chat templates' `tojson`
/// produces, so prompts match the ones the models were trained on.
pub(crate) fn python_style_json<T: serde::Serialize + ?Sized>(value: &T) -> String {
    let mut out = Vec::new();
    let mut serializer = serde_json::Serializer::with_formatter(&mut out, SpacedFormatter);
    if value.serialize(&mut serializer).is_err() {
        return String::new();
    }
    String::from_utf8(out).unwrap_or_default()
}

/// A `serde_json` formatter writing `", "` between items and `": "` after keys.
struct SpacedFormatter;

impl serde_json::ser::Formatter for SpacedFormatter {
    fn begin_array_value<W: ?Sized + io::Write>(&mut self, writer: &mut W, first: bool) -> io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + io::Write>(&mut self, writer: &mut W, first: bool) -> io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_value<W: ?Sized + io::Write>(&mut self, writer: &mut W) -> io::Result<()> {
        writer.write_all(b": ")
    }
}

/// A call found in the output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedCall {
    /// The function name (a valid one: `^[A-Za-z0-9_-]{1,64}$`; not
    /// necessarily one of the request's tools).
    pub name: String,
    /// The arguments object as compact JSON text. PHI.
    pub arguments: Phi<String>,
}

/// A complete output, split into content and calls.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ParsedOutput {
    /// The text outside calls (see the module's content rule); may be empty. PHI.
    pub content: Phi<String>,
    pub calls: Vec<ParsedCall>,
}

/// What one [`ToolCallStreamer::push`] or [`ToolCallStreamer::finish`] releases.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StreamPiece {
    /// Content that is certainly not part of a call. PHI.
    pub content: Phi<String>,
    /// Calls that became complete.
    pub calls: Vec<ParsedCall>,
}

/// Splits a complete output into content and calls (see the module's content
/// rule). Malformed call text stays in the content.
///
/// * Hermes: any number of `<tool_call>…</tool_call>` blocks anywhere; a last
///   block may lack its `</tool_call>` if the JSON inside is complete.
/// * Llama3Json: the whole output (after an optional `<|python_tag|>`) is one
///   call object `{"name", "parameters" | "arguments"}`, or several separated by
///   `;` — otherwise it is all content.
/// * Mistral: `[TOOL_CALLS]` then a JSON array of call objects, or the v11+
///   form `name[ARGS]{…}` (repeated, each optionally after its own
///   `[TOOL_CALLS]`); text before the marker is content. A malformed group
///   makes the rest of the output, from its marker on, content.
pub fn parse(format: ToolCallFormat, text: &str) -> ParsedOutput {
    let mut streamer = ToolCallStreamer::new(format);
    let first = streamer.push(text);
    let last = streamer.finish();
    let mut content = first.content;
    content.expose_mut().push_str(last.content.expose());
    let mut calls = first.calls;
    calls.extend(last.calls);
    ParsedOutput { content, calls }
}

/// Where a [`ToolCallStreamer`] is in the output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Looking for a call marker (Llama3Json: for the first non-whitespace text).
    Scan,
    /// Hermes: inside `<tool_call>`, waiting for `</tool_call>`.
    InCall,
    /// Everything from here is held until the end of the output.
    Held,
    /// Llama3Json: the output is plain content; nothing is held.
    Plain,
}

/// Incremental [`parse`] for streamed output: the concatenated pieces of all
/// pushes and the finish equal `parse` of the concatenated text.
///
/// It holds back a suffix that could be the beginning of a call marker, and
/// whitespace that could precede a call (the content rule drops it). Hermes
/// calls are released at their `</tool_call>`; from a Mistral `[TOOL_CALLS]`,
/// or a Llama3Json output that starts with `{` or `<|python_tag|>`, everything
/// is held until [`ToolCallStreamer::finish`].
#[derive(Debug)]
pub struct ToolCallStreamer {
    format: ToolCallFormat,
    mode: Mode,
    /// Text received and not yet decided. PHI.
    pending: Phi<String>,
    /// Hermes, in a call: bytes of `pending` already searched for `</tool_call>`.
    searched: usize,
    splitter: Splitter,
}

impl ToolCallStreamer {
    pub fn new(format: ToolCallFormat) -> Self {
        ToolCallStreamer {
            format,
            mode: Mode::Scan,
            pending: Phi::default(),
            searched: 0,
            splitter: Splitter::default(),
        }
    }

    /// Feeds generated text; returns the content now known not to be part of a
    /// call, and the calls that became complete.
    pub fn push(&mut self, text: &str) -> StreamPiece {
        self.pending.expose_mut().push_str(text);
        match self.format {
            ToolCallFormat::Hermes => self.advance_hermes(),
            ToolCallFormat::Mistral => self.advance_mistral(),
            ToolCallFormat::Llama3Json => self.advance_llama(),
        }
        self.splitter.take()
    }

    /// End of output: releases everything held (calls as [`parse`] finds them;
    /// malformed call text as content).
    pub fn finish(&mut self) -> StreamPiece {
        let pending = Phi::new(std::mem::take(self.pending.expose_mut()));
        let text = pending.expose().as_str();
        match (self.format, self.mode) {
            (ToolCallFormat::Hermes, Mode::InCall) => match hermes_call(&text[HERMES_OPEN.len()..]) {
                Some(call) => self.splitter.call(call),
                None => self.splitter.text(text),
            },
            (ToolCallFormat::Mistral, Mode::Held) => mistral_scan(text, &mut self.splitter),
            (ToolCallFormat::Llama3Json, Mode::Held) => match llama_calls(text) {
                Some(calls) => calls.into_iter().for_each(|c| self.splitter.call(c)),
                None => self.splitter.text(text),
            },
            _ => self.splitter.text(text),
        }
        self.mode = Mode::Plain;
        self.splitter.finish();
        self.splitter.take()
    }

    /// Hermes: releases text before a `<tool_call>` and each block at its
    /// `</tool_call>` (a call, or content if malformed).
    fn advance_hermes(&mut self) {
        loop {
            let pending = self.pending.expose();
            match self.mode {
                Mode::Scan => match pending.find(HERMES_OPEN) {
                    Some(start) => {
                        self.splitter.text(&pending[..start]);
                        self.pending.expose_mut().drain(..start);
                        self.mode = Mode::InCall;
                        self.searched = HERMES_OPEN.len();
                    }
                    None => {
                        self.release_before_partial_marker(HERMES_OPEN);
                        return;
                    }
                },
                Mode::InCall => match pending[self.searched..].find(HERMES_CLOSE) {
                    Some(at) => {
                        let close = self.searched + at;
                        let end = close + HERMES_CLOSE.len();
                        let inner = pending[HERMES_OPEN.len()..close].trim();
                        match serde_json::from_str::<Json>(inner) {
                            Ok(v) => match call_from_value(v) {
                                Some(call) => self.splitter.call(call),
                                None => self.splitter.text(&pending[..end]),
                            },
                            // The JSON is still open (a string holding
                            // "</tool_call>"): the block ends at a later tag.
                            Err(e) if e.is_eof() => {
                                self.searched = end;
                                continue;
                            }
                            Err(_) => self.splitter.text(&pending[..end]),
                        }
                        self.pending.expose_mut().drain(..end);
                        self.mode = Mode::Scan;
                    }
                    None => {
                        // The close tag may straddle the next push.
                        let from = pending.len().saturating_sub(HERMES_CLOSE.len() - 1).max(HERMES_OPEN.len());
                        self.searched = floor_char_boundary(pending, from);
                        return;
                    }
                },
                Mode::Held | Mode::Plain => return,
            }
        }
    }

    /// Mistral: releases text before the first `[TOOL_CALLS]`; holds the rest.
    fn advance_mistral(&mut self) {
        if self.mode != Mode::Scan {
            return;
        }
        let pending = self.pending.expose();
        match pending.find(MISTRAL_MARKER) {
            Some(start) => {
                self.splitter.text(&pending[..start]);
                self.pending.expose_mut().drain(..start);
                self.mode = Mode::Held;
            }
            None => self.release_before_partial_marker(MISTRAL_MARKER),
        }
    }

    /// Llama3Json: decides at the first non-whitespace text whether the output
    /// may be calls (held to the end) or is plain content (released as it comes).
    fn advance_llama(&mut self) {
        if self.mode == Mode::Scan {
            let start = self.pending.expose().trim_start();
            if start.is_empty() || (PYTHON_TAG.starts_with(start) && start != PYTHON_TAG) {
                return;
            }
            self.mode = if start.starts_with('{') || start.starts_with(PYTHON_TAG) { Mode::Held } else { Mode::Plain };
        }
        if self.mode == Mode::Plain {
            let pending = Phi::new(std::mem::take(self.pending.expose_mut()));
            self.splitter.text(pending.expose());
        }
    }

    /// Releases the pending text but for a suffix that could begin `marker`.
    fn release_before_partial_marker(&mut self, marker: &str) {
        let pending = self.pending.expose();
        let keep = partial_marker_len(pending, marker);
        let release = pending.len() - keep;
        self.splitter.text(&pending[..release]);
        self.pending.expose_mut().drain(..release);
    }
}

/// The length of the longest suffix of `text` that is a proper prefix of
/// `marker` (an ASCII marker, so the suffix starts at a char boundary).
fn partial_marker_len(text: &str, marker: &str) -> usize {
    (1..marker.len()).rev().find(|&k| text.as_bytes().ends_with(&marker.as_bytes()[..k])).unwrap_or(0)
}

/// The largest char boundary of `text` at or below `index`.
fn floor_char_boundary(text: &str, index: usize) -> usize {
    let mut i = index.min(text.len());
    while !text.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// Applies the content rule as text and calls arrive: holds trailing
/// whitespace until it is known whether a call follows, drops whitespace after
/// a call, and joins pieces separated by calls with `"\n"`.
#[derive(Debug, Default)]
struct Splitter {
    /// The last thing seen was a call (its following whitespace is dropped).
    after_call: bool,
    /// Some content has been written (a later piece is preceded by `"\n"`).
    wrote_content: bool,
    /// Trailing whitespace of the content, held until it is known whether a
    /// call follows.
    held_space: String,
    /// Released content not yet taken. PHI.
    content: Phi<String>,
    calls: Vec<ParsedCall>,
}

impl Splitter {
    /// Content text (in any chunking: the result does not depend on it).
    fn text(&mut self, text: &str) {
        let text = if self.after_call { text.trim_start() } else { text };
        let body = text.trim_end();
        if body.is_empty() {
            // Whitespace only (never right after a call: trimmed above).
            self.held_space.push_str(text);
            return;
        }
        let content = self.content.expose_mut();
        if self.after_call {
            self.after_call = false;
            if self.wrote_content {
                content.push('\n');
            }
        }
        content.push_str(&self.held_space);
        content.push_str(body);
        self.held_space.clear();
        self.held_space.push_str(&text[body.len()..]);
        self.wrote_content = true;
    }

    /// A call: the whitespace before it is dropped, and that after it.
    fn call(&mut self, call: ParsedCall) {
        self.held_space.clear();
        self.after_call = true;
        self.calls.push(call);
    }

    /// End of output: held whitespace is content after all.
    fn finish(&mut self) {
        let held = std::mem::take(&mut self.held_space);
        self.content.expose_mut().push_str(&held);
    }

    /// What was released since the last take.
    fn take(&mut self) -> StreamPiece {
        StreamPiece {
            content: Phi::new(std::mem::take(self.content.expose_mut())),
            calls: std::mem::take(&mut self.calls),
        }
    }
}

/// Whether `name` is a valid function name (`^[A-Za-z0-9_-]{1,64}$`).
fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The call a JSON value states, if it is one: an object with a valid `name`
/// and an object as `arguments` (or `parameters`). Other members are ignored
/// (Mistral templates add an `id`).
fn call_from_value(value: Json) -> Option<ParsedCall> {
    let Json::Object(mut object) = value else { return None };
    let name = match object.remove("name")? {
        Json::String(name) if valid_name(&name) => name,
        _ => return None,
    };
    let arguments = object.remove("arguments").or_else(|| object.remove("parameters"))?;
    if !arguments.is_object() {
        return None;
    }
    Some(ParsedCall { name, arguments: Phi::new(serde_json::to_string(&arguments).ok()?) })
}

/// The first JSON value in `text` (after whitespace) and the bytes it took.
fn json_prefix(text: &str) -> Option<(Json, usize)> {
    let mut values = serde_json::Deserializer::from_str(text).into_iter::<Json>();
    let value = values.next()?.ok()?;
    Some((value, values.byte_offset()))
}

/// The call inside a Hermes block: exactly one call object, whitespace around it.
fn hermes_call(inner: &str) -> Option<ParsedCall> {
    serde_json::from_str(inner.trim()).ok().and_then(call_from_value)
}

/// Llama3Json: the calls that make up the whole output, if it is only calls.
fn llama_calls(text: &str) -> Option<Vec<ParsedCall>> {
    let text = text.trim_start();
    let mut rest = text.strip_prefix(PYTHON_TAG).unwrap_or(text);
    let mut calls = Vec::new();
    loop {
        rest = rest.trim_start();
        if rest.is_empty() {
            break;
        }
        let (value, used) = json_prefix(rest)?;
        calls.push(call_from_value(value)?);
        rest = rest[used..].trim_start();
        match rest.strip_prefix(';') {
            Some(after) => rest = after,
            None if rest.is_empty() => break,
            None => return None,
        }
    }
    (!calls.is_empty()).then_some(calls)
}

/// Mistral: splits text that starts at a `[TOOL_CALLS]` into calls and content.
fn mistral_scan(text: &str, splitter: &mut Splitter) {
    let mut rest = text;
    while let Some(start) = rest.find(MISTRAL_MARKER) {
        splitter.text(&rest[..start]);
        let after = &rest[start + MISTRAL_MARKER.len()..];
        match mistral_group(after) {
            Some((calls, used)) => {
                calls.into_iter().for_each(|c| splitter.call(c));
                rest = &after[used..];
            }
            None => {
                splitter.text(&rest[start..]);
                return;
            }
        }
    }
    splitter.text(rest);
}

/// The calls right after a `[TOOL_CALLS]`: a JSON array of call objects, or
/// one or more `name[ARGS]{…}`; and the bytes they took.
fn mistral_group(text: &str) -> Option<(Vec<ParsedCall>, usize)> {
    let body = text.trim_start();
    let skipped = text.len() - body.len();
    if body.starts_with('[') {
        let (Json::Array(items), used) = json_prefix(body)? else { return None };
        let calls: Vec<ParsedCall> = items.into_iter().map(call_from_value).collect::<Option<_>>()?;
        return (!calls.is_empty()).then_some((calls, skipped + used));
    }
    let mut calls = Vec::new();
    let mut used = 0;
    loop {
        let rest = &text[used..];
        let call_text = rest.trim_start();
        let Some((call, n)) = mistral_args_call(call_text) else { break };
        calls.push(call);
        used += rest.len() - call_text.len() + n;
    }
    (!calls.is_empty()).then_some((calls, used))
}

/// One v11+ Mistral call, `name[ARGS]{…}`, and the bytes it took.
fn mistral_args_call(text: &str) -> Option<(ParsedCall, usize)> {
    let name_len = text.bytes().take(65).position(|b| !(b.is_ascii_alphanumeric() || b == b'_' || b == b'-'))?;
    let name = &text[..name_len];
    let args_text = text[name_len..].strip_prefix(MISTRAL_ARGS)?;
    if !valid_name(name) || !args_text.trim_start().starts_with('{') {
        return None;
    }
    let (arguments, used) = json_prefix(args_text)?;
    let arguments = Phi::new(serde_json::to_string(&arguments).ok()?);
    Some((ParsedCall { name: name.to_owned(), arguments }, name_len + MISTRAL_ARGS.len() + used))
}

#[cfg(test)]
mod tests;
