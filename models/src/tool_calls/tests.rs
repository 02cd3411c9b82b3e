use super::*;
use crate::grammar::{CompiledGrammar, ConstraintSpec, GrammarCompiler, GrammarError};
use rand::{Rng, SeedableRng};
use serde_json::json;

const ALL: [ToolCallFormat; 3] = [ToolCallFormat::Hermes, ToolCallFormat::Llama3Json, ToolCallFormat::Mistral];

/// An output and how it splits: its content and its calls (name, compact arguments).
struct Golden {
    format: ToolCallFormat,
    text: &'static str,
    content: &'static str,
    calls: &'static [(&'static str, &'static str)],
}

const fn g(
    format: ToolCallFormat,
    text: &'static str,
    content: &'static str,
    calls: &'static [(&'static str, &'static str)],
) -> Golden {
    Golden { format, text, content, calls }
}

const PARIS: (&str, &str) = ("get_weather", r#"{"city":"Paris"}"#);
const TIME: (&str, &str) = ("get_time", r#"{"timezone":"Europe/Paris"}"#);

use ToolCallFormat::{Hermes, Llama3Json, Mistral};

/// Outputs as the reference templates and model cards show them (Qwen2.5,
/// Llama 3.1/3.2, Mistral v3 and v11+), and the malformed cases that must stay content.
const GOLDEN: &[Golden] = &[
    // Qwen2.5 / Hermes.
    g(Hermes, "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>", "", &[PARIS]),
    g(
        Hermes,
        "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": {\"timezone\": \"Europe/Paris\"}}\n</tool_call>",
        "",
        &[PARIS, TIME],
    ),
    g(
        Hermes,
        "I'll check the weather in Paris for you.\n\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
        "I'll check the weather in Paris for you.",
        &[PARIS],
    ),
    g(
        Hermes,
        "Let me look.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n  I asked for the weather. ",
        "Let me look.\nI asked for the weather. ",
        &[PARIS],
    ),
    g(
        Hermes,
        "<think>\nThe user wants the weather.\n</think>\n\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
        "<think>\nThe user wants the weather.\n</think>",
        &[PARIS],
    ),
    // Regression: a string argument holding the close tag (seen from the
    // default model at temperature 1) does not end the block.
    g(
        Hermes,
        "<tool_call>\n{\"name\": \"note\", \"arguments\": {\"text\": \"]]}</tool_call> ok\"}}\n</tool_call>",
        "",
        &[("note", r#"{"text":"]]}</tool_call> ok"}"#)],
    ),
    // Malformed JSON inside the tags stays content, verbatim.
    g(
        Hermes,
        "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": }\n</tool_call>",
        "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": }\n</tool_call>",
        &[],
    ),
    g(
        Hermes,
        "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": }\n</tool_call>\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": {\"timezone\": \"Europe/Paris\"}}\n</tool_call>",
        "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": }\n</tool_call>",
        &[TIME],
    ),
    g(
        Hermes,
        "<tool_call>\n{\"name\": \"get weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
        "<tool_call>\n{\"name\": \"get weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
        &[],
    ),
    g(
        Hermes,
        "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": \"{\\\"city\\\": \\\"Paris\\\"}\"}\n</tool_call>",
        "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": \"{\\\"city\\\": \\\"Paris\\\"}\"}\n</tool_call>",
        &[],
    ),
    // A missing final </tool_call> is tolerated when the JSON is complete.
    g(Hermes, "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n", "", &[PARIS]),
    g(
        Hermes,
        "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"ci",
        "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"ci",
        &[],
    ),
    g(Hermes, "It is 21 °C in Paris — sunny.  ", "It is 21 °C in Paris — sunny.  ", &[]),
    g(Hermes, "Use the <tool", "Use the <tool", &[]),
    g(Hermes, "   ", "   ", &[]),
    // Llama 3.1 / 3.2.
    g(Llama3Json, "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}", "", &[PARIS]),
    g(Llama3Json, "<|python_tag|>{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}", "", &[PARIS]),
    g(
        Llama3Json,
        "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}; {\"name\": \"get_time\", \"parameters\": {\"timezone\": \"Europe/Paris\"}}",
        "",
        &[PARIS, TIME],
    ),
    g(Llama3Json, "\n\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}};\n", "", &[PARIS]),
    g(
        Llama3Json,
        "The set {1, 2} has two elements; {\"name\": \"x\"} is JSON.",
        "The set {1, 2} has two elements; {\"name\": \"x\"} is JSON.",
        &[],
    ),
    g(Llama3Json, "{\"answer\": 42}", "{\"answer\": 42}", &[]),
    g(
        Llama3Json,
        "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}} Sure!",
        "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}} Sure!",
        &[],
    ),
    g(
        Llama3Json,
        "<|python_tag|>brave_search.call(query=\"weather in Paris\")",
        "<|python_tag|>brave_search.call(query=\"weather in Paris\")",
        &[],
    ),
    g(Llama3Json, "  <|python", "  <|python", &[]),
    g(Llama3Json, " Il fait 21 °C à Paris. ", " Il fait 21 °C à Paris. ", &[]),
    // Mistral v3 (array) and v11+ (`name[ARGS]{…}`).
    g(Mistral, "[TOOL_CALLS][{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}]", "", &[PARIS]),
    g(
        Mistral,
        "[TOOL_CALLS] [{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}, \"id\": \"a1B2c3D4e\"}, {\"name\": \"get_time\", \"arguments\": {\"timezone\": \"Europe/Paris\"}, \"id\": \"f5G6h7I8j\"}]",
        "",
        &[PARIS, TIME],
    ),
    g(Mistral, "[TOOL_CALLS]get_weather[ARGS]{\"city\": \"Paris\"}", "", &[PARIS]),
    g(
        Mistral,
        "[TOOL_CALLS]get_weather[ARGS]{\"city\": \"Paris\"}[TOOL_CALLS]get_time[ARGS]{\"timezone\": \"Europe/Paris\"}",
        "",
        &[PARIS, TIME],
    ),
    g(
        Mistral,
        "[TOOL_CALLS]get_weather[ARGS]{\"city\": \"Paris\"}get_time[ARGS]{\"timezone\": \"Europe/Paris\"}",
        "",
        &[PARIS, TIME],
    ),
    g(
        Mistral,
        "Sure, let me check.\n[TOOL_CALLS][{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}]\n",
        "Sure, let me check.",
        &[PARIS],
    ),
    g(
        Mistral,
        "[TOOL_CALLS][{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}] Done.",
        "Done.",
        &[PARIS],
    ),
    g(
        Mistral,
        "Hi [TOOL_CALLS][{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Pa",
        "Hi [TOOL_CALLS][{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Pa",
        &[],
    ),
    g(Mistral, "[TOOL_CALLS][]", "[TOOL_CALLS][]", &[]),
    g(Mistral, "No tools needed [TOOL", "No tools needed [TOOL", &[]),
    g(Mistral, "Il fait 21 °C.", "Il fait 21 °C.", &[]),
];

fn calls_of(calls: &[ParsedCall]) -> Vec<(String, String)> {
    calls.iter().map(|c| (c.name.clone(), c.arguments.expose().clone())).collect()
}

fn expected_calls(golden: &Golden) -> Vec<(String, String)> {
    golden.calls.iter().map(|(n, a)| (n.to_string(), a.to_string())).collect()
}

#[test]
fn golden_outputs_parse() {
    for golden in GOLDEN {
        let out = parse(golden.format, golden.text);
        assert_eq!(out.content.expose(), golden.content, "{:?}: {:?}", golden.format, golden.text);
        assert_eq!(calls_of(&out.calls), expected_calls(golden), "{:?}: {:?}", golden.format, golden.text);
    }
}

/// Streams `chunks` through `streamer`: the concatenated content and all calls.
fn stream_with(mut streamer: ToolCallStreamer, chunks: &[&str]) -> (String, Vec<ParsedCall>) {
    let mut out = ParsedOutput::default();
    for chunk in chunks {
        out.add(streamer.push(chunk));
    }
    out.add(streamer.finish());
    (out.content.expose().clone(), out.calls)
}

/// Streams `chunks` through a streamer for any output.
fn stream(format: ToolCallFormat, chunks: &[&str]) -> (String, Vec<ParsedCall>) {
    stream_with(ToolCallStreamer::new(format), chunks)
}

/// The whole calls a piece holds (name, arguments).
fn piece_calls(piece: StreamPiece) -> Vec<(String, String)> {
    let mut out = ParsedOutput::default();
    out.add(piece);
    calls_of(&out.calls)
}

fn char_boundaries(text: &str) -> Vec<usize> {
    (0..=text.len()).filter(|&i| text.is_char_boundary(i)).collect()
}

/// The streamed result equals `parse`, whatever the chunking: every two-way
/// split, one char at a time, and seeded random chunkings.
#[test]
fn streaming_equals_parse_for_every_chunking() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for golden in GOLDEN {
        let text = golden.text;
        let expected = parse(golden.format, text);
        let expected = (expected.content.expose().clone(), expected.calls);
        let bounds = char_boundaries(text);
        for &i in &bounds {
            assert_eq!(stream(golden.format, &[&text[..i], &text[i..]]), expected, "split at {i}: {text:?}");
        }
        let chars: Vec<String> = text.chars().map(String::from).collect();
        let chars: Vec<&str> = chars.iter().map(String::as_str).collect();
        assert_eq!(stream(golden.format, &chars), expected, "one char at a time: {text:?}");
        for _ in 0..50 {
            let mut cuts: Vec<usize> = bounds.iter().copied().filter(|_| rng.random_range(0..4) == 0).collect();
            cuts.insert(0, 0);
            cuts.push(text.len());
            let chunks: Vec<&str> = cuts.windows(2).map(|w| &text[w[0]..w[1]]).collect();
            assert_eq!(stream(golden.format, &chunks), expected, "chunks {chunks:?}");
        }
    }
}

#[test]
fn hermes_streams_content_and_releases_calls_at_their_close_tag() {
    let mut s = ToolCallStreamer::new(Hermes);
    let p = s.push("Let me check. <tool");
    assert_eq!(p.content.expose(), "Let me check.");
    let p = s.push("_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_");
    assert_eq!((p.content.expose().as_str(), p.calls.len()), ("", 0));
    let p = s.push("call>\nMore");
    assert_eq!(p.content.expose(), "\nMore");
    assert_eq!(piece_calls(p), vec![(PARIS.0.to_string(), PARIS.1.to_string())]);
    let p = s.push(" text <toolkit");
    assert_eq!(p.content.expose(), " text <toolkit");
    assert_eq!(s.finish(), StreamPiece::default());
}

#[test]
fn streamers_hold_only_what_could_be_a_call() {
    let mut s = ToolCallStreamer::new(Llama3Json);
    assert_eq!(s.push("  ").content.expose(), "");
    assert_eq!(s.push("<|py").content.expose(), "");
    assert_eq!(s.push("thonic answer").content.expose(), "  <|pythonic answer");
    let mut s = ToolCallStreamer::new(Llama3Json);
    assert_eq!(s.push("{\"name\": \"get_weather\", ").content.expose(), "");
    assert_eq!(s.push("\"parameters\": {\"city\": \"Paris\"}}").calls, vec![]);
    assert_eq!(s.finish().calls.len(), 1);
    let mut s = ToolCallStreamer::new(Mistral);
    assert_eq!(s.push("Sure.\n[TOOL_").content.expose(), "Sure.");
    let p = s.push("CALLS][{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}]");
    assert_eq!((p.content.expose().as_str(), p.calls.len()), ("", 0));
    let p = s.finish();
    assert_eq!((p.content.expose().as_str(), p.calls.len()), ("", 1));
}

#[test]
fn debug_output_never_shows_arguments_or_content() {
    let out =
        parse(Hermes, "Patient Jane Roe <tool_call>{\"name\": \"f\", \"arguments\": {\"mrn\": \"0427\"}}</tool_call>");
    assert_eq!(out.calls.len(), 1);
    let mut streamer = ToolCallStreamer::new(Hermes);
    streamer.push("Patient Jane Roe <tool_call>{\"name\": \"f\", \"arguments\": {\"mrn\": \"0427\"");
    for debug in [format!("{out:?}"), format!("{streamer:?}"), format!("{:?}", streamer.push(""))] {
        assert!(!debug.contains("Jane") && !debug.contains("0427"), "{debug}");
    }
}

#[test]
fn render_writes_each_family_s_format() {
    let args = json!({"city": "Paris"});
    let one = [("get_weather", &args)];
    assert_eq!(Hermes.render_calls(&one), GOLDEN[0].text);
    assert_eq!(Llama3Json.render_calls(&one), "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}");
    assert_eq!(
        Mistral.render_calls(&one),
        "[TOOL_CALLS][{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}]"
    );
    let time = json!({"timezone": "Europe/Paris"});
    let two = [("get_weather", &args), ("get_time", &time)];
    assert_eq!(Hermes.render_calls(&two), GOLDEN[1].text);
    assert_eq!(
        Llama3Json.render_calls(&two),
        "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}; {\"name\": \"get_time\", \"parameters\": {\"timezone\": \"Europe/Paris\"}}"
    );
    assert_eq!(
        Mistral.render_calls(&two),
        "[TOOL_CALLS][{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}, {\"name\": \"get_time\", \"arguments\": {\"timezone\": \"Europe/Paris\"}}]"
    );
    assert_eq!(Mistral.render_calls(&[]), "");
}

#[test]
fn rendered_calls_parse_back() {
    let weather =
        json!({"city": "São Paulo", "unit": "celsius", "days": [1, 2.5, -3e-7], "nested": {"a": null, "b": true}});
    let note = json!({"note": "a \"quoted\" }{ ; [TOOL_CALLS] <|python_tag|> ü\nline\t\u{1}", "empty": {}, "list": []});
    let none = json!({});
    for format in ALL {
        for calls in
            [vec![("get_weather", &weather)], vec![("get_weather", &weather), ("note", &note), ("ping", &none)]]
        {
            let text = format.render_calls(&calls);
            let out = parse(format, &text);
            assert_eq!(out.content.expose(), "", "{format:?}: {text}");
            let expected: Vec<(String, String)> =
                calls.iter().map(|(n, a)| (n.to_string(), serde_json::to_string(a).unwrap())).collect();
            assert_eq!(calls_of(&out.calls), expected, "{format:?}: {text}");
        }
    }
}

#[test]
fn detect_reads_the_chat_template() {
    const QWEN2_5: &str = r#"{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- endif %}
{%- for message in messages %}
    {%- elif message.role == "assistant" %}
        {%- for tool_call in message.tool_calls %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
{%- endfor %}"#;
    const LLAMA3_1: &str = r#"{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {%- elif 'tool_calls' in message %}
        {%- set tool_call = message.tool_calls[0].function %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
        {%- else %}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}"#;
    const LLAMA3_2: &str = r#"{%- elif 'tool_calls' in message %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}"#;
    const MISTRAL: &str = r#"{%- elif message.tool_calls is defined and message.tool_calls is not none %}
        {{- "[TOOL_CALLS][" }}
        {%- for tool_call in message.tool_calls %}
            {%- set out = tool_call.function|tojson %}
            {{- out[:-1] }}
            {{- ', "id": "' + tool_call.id + '"}' }}
        {%- endfor %}
        {{- "]" + eos_token }}"#;
    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
    assert_eq!(ToolCallFormat::detect(QWEN2_5), Some(Hermes));
    assert_eq!(ToolCallFormat::detect(LLAMA3_1), Some(Llama3Json));
    assert_eq!(ToolCallFormat::detect(LLAMA3_2), Some(Llama3Json));
    assert_eq!(ToolCallFormat::detect(MISTRAL), Some(Mistral));
    assert_eq!(ToolCallFormat::detect(SMOLLM2), None);
}

#[test]
fn names_round_trip() {
    for format in ALL {
        assert_eq!(ToolCallFormat::from_name(format.as_str()), Some(format));
    }
    assert_eq!(ToolCallFormat::from_name("qwen"), Some(Hermes));
    assert_eq!(ToolCallFormat::from_name("qwen2_5"), Some(Hermes));
    assert_eq!(ToolCallFormat::from_name("pythonic"), None);
}

// Grammars, checked over a byte-level vocabulary: token i is byte i, id 0 is
// the end token (and byte 0 has no token); ids from 256 up are special tokens.

const END: u32 = 0;

fn compiler(vocab_size: usize) -> GrammarCompiler {
    let tokens: Vec<Vec<u8>> = (0..=255u8).map(|b| if b == 0 { Vec::new() } else { vec![b] }).collect();
    GrammarCompiler::from_token_bytes(tokens, vocab_size, &[END]).unwrap()
}

fn compile(c: &GrammarCompiler, grammar: String) -> Result<CompiledGrammar, GrammarError> {
    c.compile(&ConstraintSpec::Grammar(Phi::new(grammar)))
}

/// Whether the grammar accepts exactly the tokens `ids`.
fn accepts_ids(g: &CompiledGrammar, ids: impl IntoIterator<Item = u32>) -> bool {
    let mut m = g.matcher();
    let mut stopped = false;
    for id in ids {
        // A complete grammar allows only the end (the decoder stops there).
        if stopped || !m.allows(id).unwrap() {
            return false;
        }
        stopped = m.commit(id).unwrap();
    }
    m.is_accepting().unwrap()
}

fn accepts(g: &CompiledGrammar, text: &str) -> bool {
    accepts_ids(g, text.bytes().map(u32::from))
}

fn tools() -> Vec<(&'static str, Json)> {
    vec![
        (
            "get_weather",
            json!({
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
                "required": ["city"],
                "additionalProperties": false
            }),
        ),
        (
            "get_time",
            json!({
                "type": "object",
                "properties": {
                    "timezone": {"type": "string", "description": "IANA name, \"Europe/Paris\" # not // a } comment"},
                    "utc_offset": {"type": "integer", "minimum": -12, "maximum": 14}
                },
                "required": ["timezone", "utc_offset"],
                "additionalProperties": false
            }),
        ),
        (
            "lookup",
            json!({
                "$defs": {"code": {"type": "string", "pattern": "^[A-Z]{3}$"}},
                "properties": {"code": {"$ref": "#/$defs/code"}},
                "required": ["code"],
                "additionalProperties": false
            }),
        ),
        ("ping", Json::Null),
    ]
}

fn valid_calls() -> Vec<(&'static str, Json)> {
    vec![
        ("get_weather", json!({"city": "Paris"})),
        ("get_weather", json!({"city": "São Paulo", "unit": "celsius"})),
        ("get_time", json!({"timezone": "Europe/Paris", "utc_offset": 1})),
        ("lookup", json!({"code": "CDG"})),
        ("ping", json!({})),
    ]
}

fn invalid_calls() -> Vec<(&'static str, Json)> {
    vec![
        ("get_wether", json!({"city": "Paris"})),
        ("get_weather", json!({"city": 5})),
        ("get_weather", json!({})),
        ("get_weather", json!({"city": "Paris", "country": "FR"})),
        ("get_weather", json!({"city": "Paris", "unit": "kelvin"})),
        ("get_time", json!({"timezone": "Europe/Paris", "utc_offset": 20})),
        ("get_time", json!({"utc_offset": 1, "timezone": "Europe/Paris"})),
        ("lookup", json!({"code": "cdg"})),
        ("ping", json!({"x": 1})),
    ]
}

#[test]
fn call_grammars_accept_exactly_the_rendered_calls() {
    let c = compiler(256);
    let tools = tools();
    let tools: Vec<(&str, &Json)> = tools.iter().map(|(n, s)| (*n, s)).collect();
    for format in ALL {
        for parallel in [false, true] {
            let g = compile(&c, format.call_grammar(&tools, parallel)).unwrap();
            for (name, args) in valid_calls() {
                let text = format.render_calls(&[(name, &args)]);
                assert!(accepts(&g, &text), "{format:?} refused {text}");
                let compact = text.replace(", ", ",").replace(": ", ":");
                assert!(!accepts(&g, &compact), "{format:?} accepted {compact}");
                assert!(!accepts(&g, &format!("Sure. {text}")), "{format:?} accepted content before {text}");
            }
            for (name, args) in invalid_calls() {
                let text = format.render_calls(&[(name, &args)]);
                assert!(!accepts(&g, &text), "{format:?} accepted {text}");
            }
            let (a, b) = (json!({"city": "Paris"}), json!({"code": "CDG"}));
            let two = format.render_calls(&[("get_weather", &a), ("lookup", &b)]);
            assert_eq!(accepts(&g, &two), parallel, "{format:?}, parallel {parallel}: {two}");
            assert!(!accepts(&g, ""), "{format:?} accepted no call");
        }
    }
}

#[test]
fn call_grammar_escapes_names() {
    let c = compiler(256);
    let schema = json!({"properties": {"q": {"type": "string"}}, "required": ["q"]});
    let name = "we\"ird\\ %json {} name\u{7f}";
    let args = json!({"q": "x"});
    for format in ALL {
        let g = compile(&c, format.call_grammar(&[(name, &schema)], false)).unwrap();
        assert!(accepts(&g, &format.render_calls(&[(name, &args)])), "{format:?}");
        assert!(!accepts(&g, &format.render_calls(&[("weird", &args)])), "{format:?}");
    }
}

#[test]
fn markers_that_are_special_tokens_are_allowed_by_id() {
    let c = compiler(300);
    let tools = tools();
    let tools: Vec<(&str, &Json)> = tools.iter().map(|(n, s)| (*n, s)).collect();
    let args = json!({"city": "Paris"});
    let g = compile(&c, Mistral.call_grammar_with_special_tokens(&tools, false, &[("[TOOL_CALLS]", 260)])).unwrap();
    let text = Mistral.render_calls(&[("get_weather", &args)]);
    let rest = text.strip_prefix("[TOOL_CALLS]").unwrap();
    assert!(accepts_ids(&g, std::iter::once(260).chain(rest.bytes().map(u32::from))));
    assert!(!accepts(&g, &text), "the marker spelled as text");
    let special = [("<tool_call>", 270), ("</tool_call>", 271)];
    let g = compile(&c, Hermes.call_grammar_with_special_tokens(&tools, true, &special)).unwrap();
    let object = Hermes.render_calls(&[("get_weather", &args)]);
    let object = object.strip_prefix("<tool_call>").and_then(|t| t.strip_suffix("</tool_call>")).unwrap();
    let call = || std::iter::once(270).chain(object.bytes().map(u32::from)).chain(std::iter::once(271));
    assert!(accepts_ids(&g, call()));
    assert!(accepts_ids(&g, call().chain(std::iter::once(u32::from(b'\n'))).chain(call())));
}

#[test]
fn a_tool_whose_schema_nothing_satisfies_gets_no_call() {
    let c = compiler(256);
    let args = json!({});
    for format in ALL {
        let refused = match compile(&c, format.call_grammar(&[("never", &Json::Bool(false))], false)) {
            Ok(g) => !accepts(&g, &format.render_calls(&[("never", &args)])),
            Err(e) => e == GrammarError::Unsatisfiable || e == GrammarError::InvalidGrammar,
        };
        assert!(refused, "{format:?}");
    }
}

#[test]
fn a_call_grammar_without_tools_does_not_compile() {
    let c = compiler(256);
    for format in ALL {
        assert_eq!(compile(&c, format.call_grammar(&[], true)).unwrap_err(), GrammarError::InvalidGrammar);
    }
}

/// Random texts built from markers, partial markers, JSON pieces, whitespace
/// and multi-byte characters: no panic, and the streamed result equals `parse`
/// for random chunkings.
#[test]
fn random_texts_stream_like_they_parse() {
    const FRAGMENTS: &[&str] = &[
        "<tool_call>",
        "</tool_call>",
        "<tool_",
        "[TOOL_CALLS]",
        "[TOOL_",
        "[ARGS]",
        "<|python_tag|>",
        "<|py",
        "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Zürich\"}}",
        "{\"name\": \"f\", \"parameters\": {}}",
        "[{\"name\": \"f\", \"arguments\": {\"a\": [1, \"}\"]}}]",
        "get_weather",
        "{",
        "}",
        ";",
        "\n",
        " ",
        "\t ",
        "é",
        "日本",
        "text",
    ];
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    for _ in 0..400 {
        let n = rng.random_range(0..12);
        let text: String = (0..n).map(|_| FRAGMENTS[rng.random_range(0..FRAGMENTS.len())]).collect();
        let bounds = char_boundaries(&text);
        for format in ALL {
            let expected = parse(format, &text);
            let expected = (expected.content.expose().clone(), expected.calls);
            for _ in 0..5 {
                let mut cuts: Vec<usize> = bounds.iter().copied().filter(|_| rng.random_range(0..3) == 0).collect();
                cuts.insert(0, 0);
                cuts.push(text.len());
                let chunks: Vec<&str> = cuts.windows(2).map(|w| &text[w[0]..w[1]]).collect();
                assert_eq!(stream(format, &chunks), expected, "{format:?}: {chunks:?}");
            }
        }
    }
}

#[test]
fn text_or_calls_grammars_take_text_or_valid_calls() {
    let c = compiler(256);
    let tools = tools();
    let tools: Vec<(&str, &Json)> = tools.iter().map(|(n, s)| (*n, s)).collect();
    let texts = ["", "Hello there.", "Two lines,\nünïcode — and { braces }; [x]", "I would call <tool_c"];
    for format in ALL {
        for parallel in [false, true] {
            let g = compile(&c, format.text_or_calls_grammar(&tools, parallel, &[])).unwrap();
            for text in texts {
                assert!(accepts(&g, text), "{format:?} refused the text {text:?}");
            }
            for (name, args) in valid_calls() {
                let call = format.render_calls(&[(name, &args)]);
                assert!(accepts(&g, &call), "{format:?} refused {call}");
                let after = format!("{call} And some text after.");
                assert!(!accepts(&g, &after), "{format:?} accepted text after the call: {after}");
                if format != Llama3Json {
                    let led = format!("Let me check.\n{call}");
                    assert!(accepts(&g, &led), "{format:?} refused {led}");
                }
            }
            for (name, args) in invalid_calls() {
                let call = format.render_calls(&[(name, &args)]);
                assert!(!accepts(&g, &call), "{format:?} accepted {call}");
            }
            let (a, b) = (json!({"city": "Paris"}), json!({"code": "CDG"}));
            let two = format.render_calls(&[("get_weather", &a), ("lookup", &b)]);
            assert_eq!(accepts(&g, &two), parallel, "{format:?}, parallel {parallel}: {two}");
        }
    }
    // The marker starts a call: it cannot be followed by anything else.
    let g = compile(&c, Hermes.text_or_calls_grammar(&tools, true, &[])).unwrap();
    assert!(!accepts(&g, "Text <tool_call> and more text"));
    let g = compile(&c, Mistral.text_or_calls_grammar(&tools, true, &[])).unwrap();
    assert!(!accepts(&g, "Text [TOOL_CALLS] and more text"));
    // Llama 3: an output that opens with `{` (or the python tag) is a call.
    let g = compile(&c, Llama3Json.text_or_calls_grammar(&tools, true, &[])).unwrap();
    for text in ["{\"a\": 1}", "  {\"name\": \"ping\", \"parameters\": {}}", "<|python_tag|>hello", " \n"] {
        assert_eq!(accepts(&g, text), text.trim().is_empty(), "{text:?}");
    }
    assert!(accepts(&g, "Sure: {\"name\": \"ping\", \"parameters\": {}}"), "text that holds JSON later is text");
}

#[test]
fn text_or_calls_arguments_of_tools_that_are_not_strict_are_any_object() {
    let c = compiler(256);
    let any = Json::Bool(true);
    for format in ALL {
        let g = compile(&c, format.text_or_calls_grammar(&[("note", &any)], false, &[])).unwrap();
        for args in [json!({}), json!({"x": [1, {"y": null}], "z": "w"})] {
            let call = format.render_calls(&[("note", &args)]);
            assert!(accepts(&g, &call), "{format:?} refused {call}");
        }
        let not_object = format.render_calls(&[("note", &json!([1]))]);
        assert!(!accepts(&g, &not_object), "{format:?} accepted {not_object}");
    }
}

#[test]
fn text_or_calls_with_special_token_markers() {
    let c = compiler(300);
    let tools = tools();
    let tools: Vec<(&str, &Json)> = tools.iter().map(|(n, s)| (*n, s)).collect();
    let args = json!({"city": "Paris"});
    let special = [("<tool_call>", 270), ("</tool_call>", 271)];
    let g = compile(&c, Hermes.text_or_calls_grammar(&tools, false, &special)).unwrap();
    let object = Hermes.render_calls(&[("get_weather", &args)]);
    let object = object.strip_prefix("<tool_call>").and_then(|t| t.strip_suffix("</tool_call>")).unwrap();
    let call = || std::iter::once(270).chain(object.bytes().map(u32::from)).chain(std::iter::once(271));
    assert!(accepts_ids(&g, call()));
    assert!(accepts_ids(&g, "Checking. ".bytes().map(u32::from).chain(call())));
    assert!(accepts(&g, "Plain text"));
    assert!(!accepts(&g, "Text with <tool_call> spelled out"), "the marker as text is never text");
    let g = compile(&c, Mistral.text_or_calls_grammar(&tools, false, &[("[TOOL_CALLS]", 260)])).unwrap();
    let text = Mistral.render_calls(&[("get_weather", &args)]);
    let rest = text.strip_prefix("[TOOL_CALLS]").unwrap();
    assert!(accepts_ids(
        &g,
        "Ok. ".bytes().map(u32::from).chain(std::iter::once(260)).chain(rest.bytes().map(u32::from))
    ));
    assert!(!accepts(&g, &text), "the marker spelled as text");
}

/// Outputs in the language of the text-or-calls grammars (to the test tools):
/// the grammar reader must split them as `parse` does.
fn grammar_outputs(format: ToolCallFormat) -> Vec<String> {
    let calls = valid_calls();
    let mut outputs: Vec<String> = vec![String::new(), "Plain answer, no call.".into(), "ünïcode\n{ x }".into()];
    for (name, args) in &calls {
        outputs.push(format.render_calls(&[(name, args)]));
    }
    let all: Vec<(&str, &Json)> = calls.iter().map(|(n, a)| (*n, a)).collect();
    outputs.push(format.render_calls(&all));
    if format != Llama3Json {
        outputs.push(format!("Checking that now.\n\n{}", format.render_calls(&all[..2])));
    }
    outputs
}

#[test]
fn the_grammar_reader_splits_like_parse_in_any_chunking() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let c = compiler(256);
    let tools = tools();
    let tools: Vec<(&str, &Json)> = tools.iter().map(|(n, s)| (*n, s)).collect();
    for format in ALL {
        let g = compile(&c, format.text_or_calls_grammar(&tools, true, &[])).unwrap();
        for text in grammar_outputs(format) {
            assert!(accepts(&g, &text), "{format:?}: not in the grammar: {text:?}");
            let parsed = parse(format, &text);
            let expected = (parsed.content.expose().clone(), parsed.calls);
            let read = |chunks: &[&str]| stream_with(ToolCallStreamer::for_call_grammar(format), chunks);
            assert_eq!(read(&[&text]), expected, "{format:?}: {text:?}");
            let chars: Vec<String> = text.chars().map(String::from).collect();
            let chars: Vec<&str> = chars.iter().map(String::as_str).collect();
            assert_eq!(read(&chars), expected, "{format:?}, one char at a time: {text:?}");
            let bounds = char_boundaries(&text);
            for _ in 0..30 {
                let mut cuts: Vec<usize> = bounds.iter().copied().filter(|_| rng.random_range(0..5) == 0).collect();
                cuts.insert(0, 0);
                cuts.push(text.len());
                let chunks: Vec<&str> = cuts.windows(2).map(|w| &text[w[0]..w[1]]).collect();
                assert_eq!(read(&chunks), expected, "{format:?}: {chunks:?}");
            }
        }
    }
}

#[test]
fn the_grammar_reader_names_the_call_first_then_streams_its_arguments() {
    for format in ALL {
        let args = json!({"city": "São Paulo", "unit": "celsius"});
        let text = format.render_calls(&[("get_weather", &args)]);
        let mut s = ToolCallStreamer::for_call_grammar(format);
        let mut deltas = Vec::new();
        for ch in text.chars() {
            deltas.extend(s.push(&ch.to_string()).calls);
        }
        deltas.extend(s.finish().calls);
        assert_eq!(deltas[0].name.as_deref(), Some("get_weather"), "{format:?}");
        assert!(deltas[0].arguments.expose().len() <= 1, "{format:?}: the name comes before the arguments");
        assert!(deltas[1..].iter().all(|d| d.name.is_none() && d.index == 0), "{format:?}");
        assert!(deltas.len() > 10, "{format:?}: arguments in fragments: {}", deltas.len());
        let joined: String = deltas.iter().map(|d| d.arguments.expose().as_str()).collect();
        assert_eq!(joined, r#"{"city":"São Paulo","unit":"celsius"}"#, "{format:?}");
    }
}

#[test]
fn the_grammar_reader_keeps_a_call_cut_in_its_arguments_and_drops_one_cut_before() {
    let args = json!({"city": "Paris"});
    for format in [Hermes, Mistral] {
        let call = format.render_calls(&[("get_weather", &args)]);
        let text = format!("Let me see. {call}");
        let cut_in_arguments = &text[..text.find("Par").unwrap()];
        let (content, calls) = stream_with(ToolCallStreamer::for_call_grammar(format), &[cut_in_arguments]);
        assert_eq!(content, "Let me see.", "{format:?}");
        assert_eq!(calls_of(&calls), vec![("get_weather".to_string(), r#"{"city":""#.to_string())], "{format:?}");
        let cut_in_name = &text[..text.find("weather").unwrap()];
        let (content, calls) = stream_with(ToolCallStreamer::for_call_grammar(format), &[cut_in_name]);
        // No call began: the whitespace before it is content after all.
        assert_eq!((content.as_str(), calls.len()), ("Let me see. ", 0), "{format:?}");
    }
}

#[test]
fn the_grammar_reader_passes_unshaped_text_on_as_content() {
    let text = "<tool_call>\n{\"arguments\": {}, \"name\": \"ping\"}\n</tool_call>";
    let (content, calls) = stream_with(ToolCallStreamer::for_call_grammar(Hermes), &[text]);
    assert_eq!((content.as_str(), calls.len()), ("{\"arguments\": {}, \"name\": \"ping\"}\n</tool_call>", 0));
}

/// Random walks through the text-or-calls grammars, steered towards calls:
/// every output the grammar allows is read by the grammar reader as `parse`
/// reads it, its calls name offered tools, and their arguments are objects.
#[test]
fn random_grammar_outputs_read_like_they_parse() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(23);
    let c = compiler(256);
    let tools = tools();
    let tools: Vec<(&str, &Json)> = tools.iter().map(|(n, s)| (*n, s)).collect();
    let names: Vec<&str> = tools.iter().map(|(n, _)| *n).collect();
    for format in ALL {
        let g = compile(&c, format.text_or_calls_grammar(&tools, true, &[])).unwrap();
        let targets = grammar_outputs(format);
        let mut with_calls = 0;
        for _ in 0..100 {
            let target = targets[rng.random_range(0..targets.len())].as_bytes();
            let mut m = g.matcher();
            let mut bytes = Vec::new();
            for step in 0..600 {
                let allowed: Vec<u32> = (0..256u32).filter(|&b| m.allows(b).unwrap()).collect();
                if allowed.is_empty() {
                    break;
                }
                // Mostly the target's next byte when allowed; otherwise any allowed byte.
                let next = match target.get(step).map(|&b| u32::from(b)) {
                    Some(b) if allowed.contains(&b) && rng.random_range(0..10) < 9 => b,
                    None if allowed.contains(&END) && rng.random_range(0..2) == 0 => END,
                    _ => allowed[rng.random_range(0..allowed.len())],
                };
                if next == END {
                    break;
                }
                bytes.push(next as u8);
                if m.commit(next).unwrap() {
                    break;
                }
            }
            let Ok(text) = String::from_utf8(bytes) else { continue };
            let parsed = parse(format, &text);
            let chars: Vec<String> = text.chars().map(String::from).collect();
            let chars: Vec<&str> = chars.iter().map(String::as_str).collect();
            let read = stream_with(ToolCallStreamer::for_call_grammar(format), &chars);
            if m.is_accepting().unwrap() {
                assert_eq!(read, (parsed.content.expose().clone(), parsed.calls.clone()), "{format:?}: {text:?}");
            }
            for call in &read.1 {
                assert!(names.contains(&call.name.as_str()), "{format:?}: {text:?}");
            }
            with_calls += usize::from(!read.1.is_empty());
        }
        assert!(with_calls > 10, "{format:?}: the walks reached calls {with_calls} times");
    }
}
