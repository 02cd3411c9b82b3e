//! Tool calling through the router: the model's output (scripted here) is
//! parsed into `tool_calls`, whole and streamed alike; `required` and named
//! choices constrain decoding; the history's calls and results are accepted;
//! the trail names the tools offered and called, never their arguments.

use super::*;

const ARGS_CANARY: &str = "CANARY-MRN-00417";

fn tools_body(extra: Value) -> Vec<u8> {
    let tools = json!([
        {"type": "function", "function": {"name": "get_lab", "description": "Latest lab results",
            "parameters": {"type": "object", "properties": {"mrn": {"type": "string"}}, "required": ["mrn"]}}},
        {"type": "function", "function": {"name": "schedule", "parameters": {"type": "object"}}}
    ]);
    chat_body(with_fields(json!({"tools": tools, "max_tokens": 50}), &extra))
}

/// The scripted reply: text, then calls, each split over four deltas (its
/// arguments over two), as the call grammar of `auto` allows them.
fn script_call(f: &Fixture, calls: usize) {
    let mut reply = vec!["Let me check.".to_string()];
    let (head, tail) = ARGS_CANARY.split_at(8);
    for _ in 0..calls {
        reply.push("\n<tool_call>\n{\"name\": \"get_lab\", ".into());
        reply.push(format!("\"arguments\": {{\"mrn\": \"{head}"));
        reply.push(format!("{tail}\"}}}}"));
        reply.push("\n</tool_call>".into());
    }
    *f.engine.reply.lock().unwrap() = Some(reply);
}

#[tokio::test]
async fn calls_in_the_output_become_tool_calls_whole_and_streamed() {
    let f = fixture();
    script_call(&f, 1);
    let (s, v, text) =
        send(&f.state, "POST", "/v1/chat/completions", Some(&f.inference), Some(&tools_body(json!({})))).await;
    assert_eq!(s, StatusCode::OK, "{text}");
    let choice = &v["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{text}");
    assert_eq!(choice["message"]["content"], "Let me check.");
    let call = &choice["message"]["tool_calls"][0];
    assert_eq!((call["type"].as_str(), call["function"]["name"].as_str()), (Some("function"), Some("get_lab")));
    let args: Value = serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(args, json!({"mrn": ARGS_CANARY}));
    assert!(call["id"].as_str().unwrap().starts_with("call_"));

    // Streamed: the same content and call, assembled from the deltas.
    let (s, _, sse) =
        send(&f.state, "POST", "/v1/chat/completions", Some(&f.inference), Some(&tools_body(json!({"stream": true}))))
            .await;
    assert_eq!(s, StatusCode::OK);
    let chunks = sse_chunks(&sse);
    let mut content = String::new();
    let (mut name, mut arguments, mut finish) = (String::new(), String::new(), String::new());
    let mut call_deltas = Vec::new();
    for c in &chunks {
        let d = &c["choices"][0]["delta"];
        content.push_str(d["content"].as_str().unwrap_or(""));
        if let Some(calls) = d["tool_calls"].as_array() {
            assert_eq!(calls[0]["index"], 0);
            name.push_str(calls[0]["function"]["name"].as_str().unwrap_or(""));
            arguments.push_str(calls[0]["function"]["arguments"].as_str().unwrap_or(""));
            call_deltas.push(calls[0].clone());
        }
        if let Some(r) = c["choices"][0]["finish_reason"].as_str() {
            finish = r.to_string();
        }
    }
    assert_eq!((content.as_str(), name.as_str(), finish.as_str()), ("Let me check.", "get_lab", "tool_calls"));
    assert_eq!(arguments, call["function"]["arguments"].as_str().unwrap(), "the same arguments text");
    // OpenAI's delta shape: id, type and name first, then argument fragments.
    assert!(call_deltas.len() >= 2, "{call_deltas:?}");
    assert!(call_deltas[0]["id"].as_str().unwrap().starts_with("call_"));
    assert_eq!(
        (call_deltas[0]["type"].as_str(), call_deltas[0]["function"]["name"].as_str()),
        (Some("function"), Some("get_lab"))
    );
    for later in &call_deltas[1..] {
        assert!(later.get("id").is_none() && later["function"].get("name").is_none(), "{later}");
    }
    // No streamed chunk ever carried the call's markup as content.
    assert!(!sse.contains("\\u003ctool_call") && !sse.contains("<tool_call>"), "{sse}");

    // The trail: tools offered and called by name; the arguments nowhere.
    let recs = trail(&f);
    let started = recs.iter().find(|r| r.kind == "inference.started").unwrap();
    assert_eq!(
        started.params.as_ref().unwrap().tools_offered.as_deref(),
        Some(&["get_lab".into(), "schedule".into()][..])
    );
    let done = recs.iter().find(|r| r.kind == "inference.completed").unwrap();
    assert_eq!(done.params.as_ref().unwrap().tools_called.as_deref(), Some(&["get_lab".to_string()][..]));
    assert!(!contains(&raw_bytes(f.audit_dir.path()), ARGS_CANARY.as_bytes()));
    // `auto` constrains decoding to text or calls.
    let decodes = f.engine.decodes.lock().unwrap().clone();
    assert!(decodes
        .iter()
        .all(|d| d.constraint.as_ref().map(|g| g.kind()) == Some(salus_models::ConstraintKind::Grammar)));
}

#[tokio::test]
async fn parallel_tool_calls_false_keeps_one_call_and_none_parses_nothing() {
    let f = fixture();
    script_call(&f, 2);
    let (_, v, text) =
        send(&f.state, "POST", "/v1/chat/completions", Some(&f.inference), Some(&tools_body(json!({})))).await;
    assert_eq!(v["choices"][0]["message"]["tool_calls"].as_array().map(Vec::len), Some(2), "{text}");
    let body = tools_body(json!({"parallel_tool_calls": false}));
    let (_, v, text) = send(&f.state, "POST", "/v1/chat/completions", Some(&f.inference), Some(&body)).await;
    assert_eq!(v["choices"][0]["message"]["tool_calls"].as_array().map(Vec::len), Some(1), "{text}");
    let body = tools_body(json!({"tool_choice": "none"}));
    let (_, v, text) = send(&f.state, "POST", "/v1/chat/completions", Some(&f.inference), Some(&body)).await;
    assert!(v["choices"][0]["message"]["tool_calls"].is_null(), "{text}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
}

#[tokio::test]
async fn required_and_named_choices_constrain_decoding() {
    let f = fixture();
    script_call(&f, 1);
    for choice in [json!("required"), json!({"type": "function", "function": {"name": "get_lab"}})] {
        let body = tools_body(json!({"tool_choice": choice}));
        let (s, _, text) = send(&f.state, "POST", "/v1/chat/completions", Some(&f.inference), Some(&body)).await;
        assert_eq!(s, StatusCode::OK, "{text}");
    }
    let decodes = f.engine.decodes.lock().unwrap().clone();
    assert!(decodes
        .iter()
        .all(|d| d.constraint.as_ref().map(|g| g.kind()) == Some(salus_models::ConstraintKind::Grammar)));
    // `auto` with a response_format: that constraint applies, calls are parsed.
    let body = tools_body(json!({"response_format": {"type": "json_object"}}));
    let (s, v, text) = send(&f.state, "POST", "/v1/chat/completions", Some(&f.inference), Some(&body)).await;
    assert_eq!(s, StatusCode::OK, "{text}");
    assert_eq!(v["choices"][0]["message"]["tool_calls"][0]["function"]["name"], "get_lab", "{text}");
    let last = f.engine.decodes.lock().unwrap().last().unwrap().clone();
    assert_eq!(last.constraint.map(|g| g.kind()), Some(salus_models::ConstraintKind::JsonObject));
    // `required` not with a response_format as well.
    let body = tools_body(json!({"tool_choice": "required", "response_format": {"type": "json_object"}}));
    let (s, v, _) = send(&f.state, "POST", "/v1/chat/completions", Some(&f.inference), Some(&body)).await;
    assert_eq!((s, v["error"]["param"].as_str()), (StatusCode::BAD_REQUEST, Some("tool_choice")));
}

#[tokio::test]
async fn the_history_carries_calls_and_results() {
    let f = fixture();
    let messages = json!([
        {"role": "user", "content": "Latest potassium?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "get_lab", "arguments": format!("{{\"mrn\": \"{ARGS_CANARY}\"}}")}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "K 4.1 mmol/L"}]},
    ]);
    let (s, v, text) = send(
        &f.state,
        "POST",
        "/v1/chat/completions",
        Some(&f.inference),
        Some(&tools_body(json!({"messages": messages, "max_tokens": 2}))),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{text}");
    assert_eq!(v["choices"][0]["message"]["content"], "Hello world");
    // A result for a call nobody made, and a call in a user message.
    let bad = json!([{"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": "call_9", "content": "r"}]);
    let (s, v, _) =
        send(&f.state, "POST", "/v1/chat/completions", Some(&f.inference), Some(&tools_body(json!({"messages": bad}))))
            .await;
    assert_eq!((s, v["error"]["param"].as_str()), (StatusCode::BAD_REQUEST, Some("messages[1].tool_call_id")));
    let bad = json!([{"role": "user", "content": "x", "tool_calls": []}]);
    let (s, v, _) =
        send(&f.state, "POST", "/v1/chat/completions", Some(&f.inference), Some(&tools_body(json!({"messages": bad}))))
            .await;
    assert_eq!((s, v["error"]["param"].as_str()), (StatusCode::BAD_REQUEST, Some("messages[0].tool_calls")));
    assert!(!contains(&raw_bytes(f.audit_dir.path()), ARGS_CANARY.as_bytes()));
}

#[tokio::test]
async fn a_call_cut_off_by_max_tokens_keeps_its_arguments_so_far_and_finishes_with_length() {
    let f = fixture();
    script_call(&f, 1);
    // Three deltas: the text, the call's name, the first half of its arguments.
    for stream in [false, true] {
        let body = tools_body(json!({"max_tokens": 3, "stream": stream}));
        let (s, v, text) = send(&f.state, "POST", "/v1/chat/completions", Some(&f.inference), Some(&body)).await;
        assert_eq!(s, StatusCode::OK, "{text}");
        let (finish, arguments) = if stream {
            let chunks = sse_chunks(&text);
            let finish = chunks.iter().find_map(|c| c["choices"][0]["finish_reason"].as_str().map(String::from));
            let args: String = chunks
                .iter()
                .filter_map(|c| c["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"].as_str())
                .collect();
            (finish.unwrap(), args)
        } else {
            let choice = &v["choices"][0];
            let args = choice["message"]["tool_calls"][0]["function"]["arguments"].as_str().unwrap().to_string();
            (choice["finish_reason"].as_str().unwrap().to_string(), args)
        };
        assert_eq!(finish, "length", "stream {stream}: {text}");
        assert_eq!(arguments, format!("{{\"mrn\":\"{}", &ARGS_CANARY[..8]), "stream {stream}: {text}");
    }
}
