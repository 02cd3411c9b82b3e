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

mod grammars;
