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
//! * **Constraining calls** ([`grammar`]): [`ToolCallFormat::call_grammar`]
//!   (`tool_choice: required` or a named tool) is an llguidance Lark grammar
//!   whose language is exactly the calls [`ToolCallFormat::render_calls`]
//!   writes, with arguments valid against the tool's JSON Schema;
//!   [`ToolCallFormat::text_or_calls_grammar`] (`auto`) allows text before them.
//!   [`ToolCallStreamer::for_call_grammar`] reads output shaped by either as it
//!   is written: a call's name first, then its arguments in fragments.
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

/// A piece of a call, as [`ToolCallStreamer`] releases it: a call's first
/// delta names the function; every delta may add to its arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallDelta {
    /// Which call of the output this is (0, 1, …).
    pub index: usize,
    /// The function name, in the call's first delta only.
    pub name: Option<String>,
    /// More of the arguments' JSON text (compact). PHI.
    pub arguments: Phi<String>,
}

/// What one [`ToolCallStreamer::push`] or [`ToolCallStreamer::finish`] releases.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StreamPiece {
    /// Content that is certainly not part of a call. PHI.
    pub content: Phi<String>,
    /// Calls, or pieces of calls, in order.
    pub calls: Vec<CallDelta>,
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
    let mut out = ParsedOutput::default();
    for piece in [streamer.push(text), streamer.finish()] {
        out.add(piece);
    }
    out
}

impl ParsedOutput {
    /// Adds what a [`ToolCallStreamer`] released: the content, and the calls'
    /// deltas joined into calls.
    pub fn add(&mut self, piece: StreamPiece) {
        self.content.expose_mut().push_str(piece.content.expose());
        for delta in piece.calls {
            match delta.name {
                Some(name) => self.calls.push(ParsedCall { name, arguments: delta.arguments }),
                None => {
                    if let Some(call) = self.calls.last_mut() {
                        call.arguments.expose_mut().push_str(delta.arguments.expose());
                    }
                }
            }
        }
    }
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
    /// Output that follows a call grammar, in its calls: read as they come.
    Calls,
}

/// Incremental [`parse`] for streamed output: the concatenated pieces of all
/// pushes and the finish equal `parse` of the concatenated text.
///
/// It holds back a suffix that could be the beginning of a call marker, and
/// whitespace that could precede a call (the content rule drops it). Hermes
/// calls are released at their `</tool_call>`; from a Mistral `[TOOL_CALLS]`,
/// or a Llama3Json output that starts with `{` or `<|python_tag|>`, everything
/// is held until [`ToolCallStreamer::finish`].
///
/// [`ToolCallStreamer::for_call_grammar`] reads output that a call grammar
/// shaped: its calls are released as they are written, the name first, then
/// the arguments in fragments (see [`fragments`]).
#[derive(Debug)]
pub struct ToolCallStreamer {
    format: ToolCallFormat,
    mode: Mode,
    /// Reads the calls of output that follows a call grammar.
    fragments: Option<fragments::CallFragments>,
    /// Text received and not yet decided. PHI.
    pending: Phi<String>,
    /// Hermes, in a call: bytes of `pending` already searched for `</tool_call>`.
    searched: usize,
    splitter: Splitter,
}

impl ToolCallStreamer {
    /// A streamer for any output: a call is released once it is complete.
    pub fn new(format: ToolCallFormat) -> Self {
        ToolCallStreamer {
            format,
            mode: Mode::Scan,
            fragments: None,
            pending: Phi::default(),
            searched: 0,
            splitter: Splitter::default(),
        }
    }

    /// A streamer for output decoded under [`ToolCallFormat::call_grammar`] or
    /// [`ToolCallFormat::text_or_calls_grammar`] in this format: content as
    /// [`ToolCallStreamer::new`] releases it, then each call's name as soon as
    /// it is written and its arguments in fragments.
    pub fn for_call_grammar(format: ToolCallFormat) -> Self {
        ToolCallStreamer { fragments: Some(fragments::CallFragments::new(format)), ..ToolCallStreamer::new(format) }
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
        if self.mode == Mode::Calls {
            self.read_calls();
        }
        self.splitter.take()
    }

    /// In the calls of grammar-shaped output: passes on everything pending.
    fn read_calls(&mut self) {
        let pending = Phi::new(std::mem::take(self.pending.expose_mut()));
        if let Some(fragments) = self.fragments.as_mut() {
            fragments.push(pending.expose(), &mut self.splitter);
        }
    }

    /// End of output: releases everything held (calls as [`parse`] finds them;
    /// malformed call text as content).
    pub fn finish(&mut self) -> StreamPiece {
        if self.mode == Mode::Calls {
            self.read_calls();
        }
        let pending = Phi::new(std::mem::take(self.pending.expose_mut()));
        let text = pending.expose().as_str();
        match (self.format, self.mode) {
            (_, Mode::Calls) => {}
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
                        if self.fragments.is_some() {
                            self.mode = Mode::Calls;
                            return;
                        }
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
                Mode::Held | Mode::Plain | Mode::Calls => return,
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
                self.mode = if self.fragments.is_some() { Mode::Calls } else { Mode::Held };
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
            self.mode = match start.chars().next() {
                Some('{') if self.fragments.is_some() => Mode::Calls,
                _ if start.starts_with('{') || start.starts_with(PYTHON_TAG) => Mode::Held,
                _ => Mode::Plain,
            };
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
    calls: Vec<CallDelta>,
    /// Calls started so far.
    started_calls: usize,
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

    /// A whole call: the whitespace before it is dropped, and that after it.
    fn call(&mut self, call: ParsedCall) {
        self.call_start(call.name);
        self.call_arguments(call.arguments.expose());
    }

    /// The start of a call, named (whitespace around it dropped as for a call).
    fn call_start(&mut self, name: String) {
        self.held_space.clear();
        self.after_call = true;
        self.calls.push(CallDelta { index: self.started_calls, name: Some(name), arguments: Phi::default() });
        self.started_calls += 1;
    }

    /// More arguments of the call started last.
    fn call_arguments(&mut self, text: &str) {
        if text.is_empty() {
            return;
        }
        match self.calls.last_mut() {
            Some(delta) if delta.index + 1 == self.started_calls => delta.arguments.expose_mut().push_str(text),
            _ if self.started_calls > 0 => self.calls.push(CallDelta {
                index: self.started_calls - 1,
                name: None,
                arguments: Phi::new(text.to_owned()),
            }),
            _ => {}
        }
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

mod fragments;
mod grammar;

#[cfg(test)]
mod tests;
