//! Reading calls that a call grammar shaped, as they are written: each call's
//! name as soon as it is complete, then its arguments in fragments.
//!
//! Output decoded under [`ToolCallFormat::call_grammar`] or
//! [`ToolCallFormat::text_or_calls_grammar`] has one shape once the calls
//! begin: call objects `{"name": "f", "<key>": {…}}` written with the
//! separators `", "` and `": "`, between markers, separators and closing tags
//! that hold no `{`. So the reader does not need to parse to know where it is:
//! it skips to the next `{`, reads the fixed prefix up to the arguments, and
//! follows the arguments' JSON (strings and nesting) to their end. Unlike the
//! general parser it never has to wait for a call's end to know that it is one,
//! so arguments stream as they are generated, as OpenAI's deltas carry them.
//!
//! The arguments are released with the whitespace outside strings removed (the
//! compact JSON text a client expects; the grammar put a space after every
//! `,` and `:`). Concatenated, the fragments are a call's whole arguments.
//!
//! An output cut off (`max_tokens`, a stop string) inside a call's arguments
//! keeps that call with the arguments written so far, as OpenAI reports a call
//! cut off by the length limit; a call cut off before its name was complete is
//! not reported. Text that does not have the grammar's shape (the grammar was
//! not applied after all) makes the rest of the output content, unparsed.

use super::{valid_name, Splitter, ToolCallFormat};

/// Where the reader is in the calls.
#[derive(Debug)]
enum State {
    /// Before a call object: looking for its `{`.
    Between,
    /// In a call object before its arguments: the text so far (no PHI: a name
    /// and fixed text).
    Prefix(String),
    /// In a call's arguments.
    Arguments(JsonFollower),
    /// The text did not have the grammar's shape: the rest is content.
    Unshaped,
}

/// Reads the calls part of an output that follows a call grammar.
#[derive(Debug)]
pub(super) struct CallFragments {
    state: State,
    /// The prefix up to the arguments, after the name: `, "arguments": `.
    after_name: String,
}

impl CallFragments {
    pub(super) fn new(format: ToolCallFormat) -> Self {
        CallFragments { state: State::Between, after_name: format!(", \"{}\": ", format.arguments_key()) }
    }

    /// Feeds the next text of the calls part; releases call starts and
    /// argument fragments (and, for unshaped text, content) to `out`.
    pub(super) fn push(&mut self, text: &str, out: &mut Splitter) {
        let mut fragment = String::new();
        for (at, c) in text.char_indices() {
            match &mut self.state {
                State::Between => {
                    if c == '{' {
                        self.state = State::Prefix(String::from('{'));
                    }
                }
                State::Prefix(prefix) => {
                    prefix.push(c);
                    match read_prefix(prefix, &self.after_name) {
                        PrefixRead::Incomplete => {}
                        PrefixRead::Name(name) => {
                            out.call_start(name);
                            self.state = State::Arguments(JsonFollower::default());
                        }
                        PrefixRead::Unshaped => {
                            let prefix = std::mem::take(prefix);
                            self.state = State::Unshaped;
                            out.text(&prefix);
                            out.text(&text[at + c.len_utf8()..]);
                            return;
                        }
                    }
                }
                State::Arguments(json) => {
                    let (keep, done) = json.step(c);
                    if keep {
                        fragment.push(c);
                    }
                    if done {
                        out.call_arguments(&std::mem::take(&mut fragment));
                        self.state = State::Between;
                    }
                }
                State::Unshaped => {
                    out.text(&text[at..]);
                    return;
                }
            }
        }
        if !fragment.is_empty() {
            out.call_arguments(&fragment);
        }
    }
}

/// What the prefix of a call object says so far.
enum PrefixRead {
    /// It may still become `{"name": "<name>", "<key>": `.
    Incomplete,
    /// It is complete, naming this function.
    Name(String),
    /// It cannot become one.
    Unshaped,
}

/// Reads `{"name": "<name>", "<key>": ` (the name a JSON string holding a
/// valid function name; `after_name` is the part from the comma on).
fn read_prefix(prefix: &str, after_name: &str) -> PrefixRead {
    const HEAD: &str = "{\"name\": \"";
    if prefix.len() <= HEAD.len() {
        return if HEAD.starts_with(prefix) { PrefixRead::Incomplete } else { PrefixRead::Unshaped };
    }
    let Some(rest) = prefix.strip_prefix(HEAD) else { return PrefixRead::Unshaped };
    // The name's closing quote: the first quote not escaped.
    let mut escaped = false;
    let Some(close) = rest.char_indices().find_map(|(i, c)| {
        let closes = c == '"' && !escaped;
        escaped = c == '\\' && !escaped;
        closes.then_some(i)
    }) else {
        // Names are at most 64 characters (with escapes, six bytes each).
        return if rest.len() <= 64 * 6 { PrefixRead::Incomplete } else { PrefixRead::Unshaped };
    };
    let tail = &rest[close + 1..];
    if tail.len() < after_name.len() {
        return if after_name.starts_with(tail) { PrefixRead::Incomplete } else { PrefixRead::Unshaped };
    }
    if tail != after_name {
        return PrefixRead::Unshaped;
    }
    match serde_json::from_str::<String>(&prefix[HEAD.len() - 1..HEAD.len() + close + 1]) {
        Ok(name) if valid_name(&name) => PrefixRead::Name(name),
        _ => PrefixRead::Unshaped,
    }
}

/// Follows one JSON value (the arguments object) character by character.
#[derive(Debug, Default)]
struct JsonFollower {
    depth: usize,
    in_string: bool,
    escaped: bool,
}

impl JsonFollower {
    /// Takes the next character: whether it belongs in the compact text (not
    /// whitespace outside a string), and whether the value ended with it.
    fn step(&mut self, c: char) -> (bool, bool) {
        if self.in_string {
            if self.escaped {
                self.escaped = false;
            } else if c == '\\' {
                self.escaped = true;
            } else if c == '"' {
                self.in_string = false;
            }
            return (true, false);
        }
        if c.is_whitespace() {
            return (false, false);
        }
        match c {
            '"' => self.in_string = true,
            '{' | '[' => self.depth += 1,
            '}' | ']' => {
                self.depth = self.depth.saturating_sub(1);
                return (true, self.depth == 0);
            }
            _ => {}
        }
        // Arguments are objects: the value ends with its closing brace.
        (true, false)
    }
}
