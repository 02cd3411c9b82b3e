//! Call grammars (calls only, text or calls) over a byte-level vocabulary,
//! and the reader of grammar-shaped output: what a grammar accepts, and that
//! the reader splits every output the grammar allows as `parse` does.

use super::*;

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
