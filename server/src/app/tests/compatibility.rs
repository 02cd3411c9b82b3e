//! What benchmark and evaluation harnesses send, through the router: vLLM's
//! decoding extensions reach the engine, inert OpenAI fields are accepted,
//! unknown parameters are named when their name is safe to echo.

use super::*;

#[tokio::test]
async fn vllm_decoding_extensions_reach_the_engine() {
    let f = fixture();
    let body = chat_body(json!({
        "max_tokens": 10, "ignore_eos": true, "min_tokens": 4, "stop_token_ids": [7, 9],
        "include_stop_str_in_output": true, "skip_special_tokens": false, "spaces_between_special_tokens": true,
    }));
    let (s, _, text) = send(&f.state, "POST", "/v1/chat/completions", Some(&f.inference), Some(&body)).await;
    assert_eq!(s, StatusCode::OK, "{text}");
    let d = f.engine.decodes.lock().unwrap()[0].clone();
    assert!(d.ignore_eos && d.include_stop_str_in_output && !d.skip_special_tokens);
    assert_eq!((d.min_tokens, d.max_tokens, d.stop_token_ids), (4, 10, vec![7, 9]));
    // The defaults when absent.
    let (s, _, _) = send(
        &f.state,
        "POST",
        "/v1/completions",
        Some(&f.inference),
        Some(&serde_json::to_vec(&json!({"model": "test-model", "prompt": "hi"})).unwrap()),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let d = f.engine.decodes.lock().unwrap()[1].clone();
    assert!(!d.ignore_eos && !d.include_stop_str_in_output && d.skip_special_tokens && d.min_tokens == 0);
}

#[tokio::test]
async fn invalid_extensions_are_refused_by_name() {
    let f = fixture();
    for (extra, param, code) in [
        (json!({"stop_token_ids": [256]}), "stop_token_ids", "invalid_value"),
        (json!({"stop_token_ids": ["x"]}), "stop_token_ids", "invalid_value"),
        (json!({"max_tokens": 3, "min_tokens": 5}), "min_tokens", "invalid_value"),
        (json!({"ignore_eos": "yes"}), "ignore_eos", "invalid_value"),
        (json!({"spaces_between_special_tokens": false}), "spaces_between_special_tokens", "unsupported_parameter"),
        (json!({"store": true}), "store", "unsupported_parameter"),
        (json!({"service_tier": "flex"}), "service_tier", "unsupported_parameter"),
        (json!({"modalities": ["text", "audio"]}), "modalities", "unsupported_parameter"),
        (json!({"reasoning_effort": "low"}), "reasoning_effort", "unsupported_parameter"),
    ] {
        let (s, v, text) =
            send(&f.state, "POST", "/v1/chat/completions", Some(&f.inference), Some(&chat_body(extra.clone()))).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{extra}: {text}");
        assert_eq!((v["error"]["param"].as_str(), v["error"]["code"].as_str()), (Some(param), Some(code)), "{extra}");
    }
    assert!(f.engine.seen.lock().unwrap().is_empty(), "nothing refused reached the engine");
}

#[tokio::test]
async fn inert_openai_fields_are_accepted_and_dropped() {
    let f = fixture();
    let body = chat_body(json!({
        "store": false, "metadata": {"ticket": "CANARY-META"}, "service_tier": "auto",
        "modalities": ["text"], "prediction": {"type": "content", "content": "CANARY-PRED"},
    }));
    let (s, _, text) = send(&f.state, "POST", "/v1/chat/completions", Some(&f.inference), Some(&body)).await;
    assert_eq!(s, StatusCode::OK, "{text}");
    let raw = raw_bytes(f.audit_dir.path());
    assert!(!contains(&raw, b"CANARY-META") && !contains(&raw, b"CANARY-PRED"));
}

/// Regression: an unknown parameter got "unrecognized request parameter" with
/// no name; now it is named when its path is short and plain.
#[tokio::test]
async fn unknown_parameters_are_named_when_safe() {
    let f = fixture();
    let cases = [
        (chat_body(json!({"temprature": 0.5})), Some("temprature")),
        (
            chat_body(json!({"stream": true, "stream_options": {"include_usage": true, "chunk_size": 3}})),
            Some("stream_options.chunk_size"),
        ),
        (chat_body(json!({"patient Jane Doe": 1})), None),
        (chat_body(json!({"x".repeat(100): 1})), None),
        (chat_body(json!({"messages": [{"role": "user", "content": "hi", "mood": "ok"}]})), Some("messages[0]")),
    ];
    for (body, name) in cases {
        let (s, v, text) = send(&f.state, "POST", "/v1/chat/completions", Some(&f.inference), Some(&body)).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{text}");
        assert_eq!(v["error"]["param"].as_str(), name, "{text}");
        if let Some(n) = name.filter(|n| !n.starts_with("messages")) {
            assert!(v["error"]["message"].as_str().unwrap().contains(n), "{text}");
            assert_eq!(v["error"]["code"], "unknown_parameter");
        }
        assert!(!text.contains("Jane") && !text.contains("xxxxxxxxxx"), "{text}");
    }
}

#[tokio::test]
async fn continuous_usage_stats_put_usage_in_every_chunk() {
    let f = fixture();
    let body = chat_body(json!({"stream": true, "stream_options": {"continuous_usage_stats": true}}));
    let (s, _, text) = send(&f.state, "POST", "/v1/chat/completions", Some(&f.inference), Some(&body)).await;
    assert_eq!(s, StatusCode::OK);
    let chunks = sse_chunks(&text);
    assert!(chunks.len() >= 3, "{text}");
    let mut last = 0;
    for c in &chunks {
        let u = &c["usage"];
        let done = u["completion_tokens"].as_u64().unwrap();
        assert!(done >= last, "counts never go back: {text}");
        assert_eq!(u["total_tokens"].as_u64().unwrap(), u["prompt_tokens"].as_u64().unwrap() + done);
        last = done;
    }
    assert_eq!(last, 2, "the scripted engine generates two tokens");
}

#[tokio::test]
async fn truncate_prompt_tokens_keeps_the_last_tokens_and_priority_is_refused() {
    let f = fixture();
    let body = serde_json::to_vec(&json!({"model": "test-model", "prompt": "abcdefghij", "truncate_prompt_tokens": 4}))
        .unwrap();
    let (s, _, text) = send(&f.state, "POST", "/v1/completions", Some(&f.inference), Some(&body)).await;
    assert_eq!(s, StatusCode::OK, "{text}");
    assert_eq!(f.engine.seen.lock().unwrap()[0].0, 4, "the engine saw the last 4 tokens only");
    // Longer than the context, truncated into it: served.
    let long = "x".repeat(500);
    let body = serde_json::to_vec(
        &json!({"model": "test-model", "prompt": long, "max_tokens": 2, "truncate_prompt_tokens": 10}),
    )
    .unwrap();
    assert_eq!(send(&f.state, "POST", "/v1/completions", Some(&f.inference), Some(&body)).await.0, StatusCode::OK);
    let (s, v, _) =
        send(&f.state, "POST", "/v1/chat/completions", Some(&f.inference), Some(&chat_body(json!({"priority": 5}))))
            .await;
    assert_eq!((s, v["error"]["param"].as_str()), (StatusCode::BAD_REQUEST, Some("priority")));
    let (s, _, _) =
        send(&f.state, "POST", "/v1/chat/completions", Some(&f.inference), Some(&chat_body(json!({"priority": 0}))))
            .await;
    assert_eq!(s, StatusCode::OK);
}

#[tokio::test]
async fn models_report_max_model_len() {
    let f = fixture();
    let (s, v, _) = send(&f.state, "GET", "/v1/models", Some(&f.inference), None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["data"][0]["max_model_len"], 64);
}

#[tokio::test]
async fn chat_template_options_are_validated() {
    let f = fixture();
    let ok = chat_body(json!({"chat_template_kwargs": {"enable_thinking": false}, "add_generation_prompt": true}));
    assert_eq!(send(&f.state, "POST", "/v1/chat/completions", Some(&f.inference), Some(&ok)).await.0, StatusCode::OK);
    let open = chat_body(json!({"continue_final_message": true, "add_generation_prompt": false}));
    assert_eq!(send(&f.state, "POST", "/v1/chat/completions", Some(&f.inference), Some(&open)).await.0, StatusCode::OK);
    for (extra, param) in [
        (json!({"continue_final_message": true}), "add_generation_prompt"),
        (json!({"chat_template_kwargs": {"messages": []}}), "chat_template_kwargs"),
        (json!({"chat_template_kwargs": {"bad name-CANARY": 1}}), "chat_template_kwargs"),
        (json!({"chat_template_kwargs": [1]}), "chat_template_kwargs"),
    ] {
        let (s, v, text) =
            send(&f.state, "POST", "/v1/chat/completions", Some(&f.inference), Some(&chat_body(extra.clone()))).await;
        assert_eq!((s, v["error"]["param"].as_str()), (StatusCode::BAD_REQUEST, Some(param)), "{extra}: {text}");
        assert!(!text.contains("CANARY"), "{text}");
    }
}

/// The request bodies GuideLLM sends (its OpenAI backend's chat and text
/// completion handlers: streaming with `include_usage` and
/// `continuous_usage_stats`, `max_completion_tokens` / `max_tokens`,
/// `"stop": null`, `ignore_eos`, text content parts), recorded as fixtures.
/// Regression: every one of them was a 400.
#[tokio::test]
async fn guidellm_request_bodies_are_accepted() {
    let f = fixture();
    for (route, body) in [
        ("/v1/chat/completions", include_str!("fixtures/guidellm_chat.json")),
        ("/v1/completions", include_str!("fixtures/guidellm_completions.json")),
    ] {
        let (s, _, text) = send(&f.state, "POST", route, Some(&f.inference), Some(body.as_bytes())).await;
        assert_eq!(s, StatusCode::OK, "{route}: {text}");
        let last_usage = text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter(|d| *d != "[DONE]")
            .filter_map(|d| serde_json::from_str::<Value>(d).ok())
            .all(|c| c["usage"].is_object());
        assert!(last_usage, "{route}: every chunk carries usage: {text}");
    }
    let seen = f.engine.decodes.lock().unwrap();
    assert!(seen.iter().all(|d| d.ignore_eos && d.max_tokens == 8), "{seen:?}");
}

/// The request bodies `vllm bench serve` (its OpenAI completions and chat
/// request functions: `repetition_penalty`, `"logprobs": null`,
/// `max_completion_tokens`, text content parts, `ignore_eos`, streamed with
/// `include_usage`) and lm-evaluation-harness (`local-completions` with text
/// prompts, and with token-id prompts, its default; `local-chat-completions`)
/// send, recorded as fixtures from their request builders.
#[tokio::test]
async fn vllm_bench_and_lm_eval_request_bodies_are_accepted() {
    let f = fixture();
    for (route, body, choices) in [
        ("/v1/completions", include_str!("fixtures/vllm_bench_completions.json"), 1),
        ("/v1/chat/completions", include_str!("fixtures/vllm_bench_chat.json"), 1),
        ("/v1/completions", include_str!("fixtures/lm_eval_completions_text.json"), 2),
        ("/v1/completions", include_str!("fixtures/lm_eval_completions_tokens.json"), 2),
        ("/v1/chat/completions", include_str!("fixtures/lm_eval_chat.json"), 1),
    ] {
        let (s, v, text) = send(&f.state, "POST", route, Some(&f.inference), Some(body.as_bytes())).await;
        assert_eq!(s, StatusCode::OK, "{route}: {text}");
        if v.is_object() {
            assert_eq!(v["choices"].as_array().map(Vec::len), Some(choices), "{text}");
        } else {
            assert!(text.contains("\"usage\":{") && text.ends_with("data: [DONE]\n\n"), "{route}: {text}");
        }
    }
    // The token-id prompts reached the engine as those ids (14 and 7 tokens).
    let seen = f.engine.seen.lock().unwrap().clone();
    assert_eq!(seen[seen.len() - 3].0, 14, "{seen:?}");
    assert_eq!(seen[seen.len() - 2].0, 7, "{seen:?}");
    // lm-eval's loglikelihood requests: the prompt echoed with its scores,
    // which lm-eval reads as `token_logprobs[ctxlen:-1]`.
    let body = include_str!("fixtures/lm_eval_loglikelihood.json");
    let (s, v, text) = send(&f.state, "POST", "/v1/completions", Some(&f.inference), Some(body.as_bytes())).await;
    assert_eq!(s, StatusCode::OK, "{text}");
    let lps = &v["choices"][0]["logprobs"];
    let prompt = "Question: 2+2?\nAnswer: 4";
    assert_eq!(lps["token_logprobs"].as_array().unwrap().len(), prompt.len() + 1, "{text}");
}

/// `echo` on `/v1/completions`: the prompt begins each choice's text and, with
/// `logprobs`, its tokens begin the logprobs (the first with `null`: nothing
/// precedes it); `max_tokens: 0` then scores the prompt only.
#[tokio::test]
async fn echo_returns_the_prompt_with_its_scores() {
    let f = fixture();
    let body = |extra: Value| {
        serde_json::to_vec(&with_fields(json!({"model": "test-model", "prompt": "Hi there", "echo": true}), &extra))
            .unwrap()
    };
    let (s, v, text) =
        send(&f.state, "POST", "/v1/completions", Some(&f.inference), Some(&body(json!({"max_tokens": 2})))).await;
    assert_eq!(s, StatusCode::OK, "{text}");
    assert_eq!(v["choices"][0]["text"], "Hi thereHello world", "{text}");
    assert!(v["choices"][0]["logprobs"].is_null(), "{text}");
    assert_eq!(f.engine.seen.lock().unwrap().len(), 1);
    let body2 = body(json!({"max_tokens": 0, "logprobs": 2, "n": 2}));
    let (s, v, text) = send(&f.state, "POST", "/v1/completions", Some(&f.inference), Some(&body2)).await;
    assert_eq!(s, StatusCode::OK, "{text}");
    for choice in v["choices"].as_array().unwrap() {
        assert_eq!(choice["text"], "Hi there", "{text}");
        let lps = &choice["logprobs"];
        let tokens: Vec<&str> = lps["tokens"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
        assert_eq!(tokens.concat(), "Hi there");
        let scores = lps["token_logprobs"].as_array().unwrap();
        assert_eq!(scores.len(), 8);
        assert!(scores[0].is_null() && lps["top_logprobs"][0].is_null(), "{text}");
        assert_eq!(scores[1], -1.0);
        assert_eq!(scores[7], -7.0);
        assert_eq!(lps["text_offset"][7], 7);
    }
    assert_eq!(v["usage"]["completion_tokens"], 0, "{text}");
    let last = *f.engine.seen.lock().unwrap().last().unwrap();
    assert_eq!(last.3, 0, "max_tokens 0 reached the engine");
    // Refusals: with stream, and max_tokens 0 without echo.
    for (extra, param) in [
        (json!({"stream": true}), "echo"),
        (json!({"truncate_prompt_tokens": 2}), "echo"),
        (json!({"echo": false, "max_tokens": 0}), "max_tokens"),
    ] {
        let (s, v, text) = send(&f.state, "POST", "/v1/completions", Some(&f.inference), Some(&body(extra))).await;
        assert_eq!((s, v["error"]["param"].as_str()), (StatusCode::BAD_REQUEST, Some(param)), "{text}");
    }
}

/// vLLM's `prompt_logprobs`: the prompt's tokens after the first with their
/// logprob, rank and text, and the top alternatives; per choice on
/// completions, beside the choices on chat.
#[tokio::test]
async fn prompt_logprobs_score_the_prompt_like_vllm() {
    let f = fixture();
    let body = serde_json::to_vec(&json!({"model": "test-model", "prompt": "Hi there", "max_tokens": 2,
                                          "prompt_logprobs": 2, "n": 2}))
    .unwrap();
    let (s, v, text) = send(&f.state, "POST", "/v1/completions", Some(&f.inference), Some(&body)).await;
    assert_eq!(s, StatusCode::OK, "{text}");
    for choice in v["choices"].as_array().unwrap() {
        assert_eq!(choice["text"], "Hello world", "no echo without echo: {text}");
        let p = choice["prompt_logprobs"].as_array().unwrap();
        assert_eq!(p.len(), "Hi there".len(), "one entry per prompt token: {text}");
        assert!(p[0].is_null());
        // Position 1 is 'i' (105): its own entry, then the two alternatives.
        let at1 = p[1].as_object().unwrap();
        assert_eq!(at1.len(), 3, "{text}");
        assert_eq!(at1["105"], json!({"logprob": -1.0, "rank": 1, "decoded_token": "i"}));
        assert_eq!(at1["106"]["rank"], 1);
        assert_eq!(at1["107"]["rank"], 2);
        assert_eq!(p[7]["101"]["logprob"], -7.0, "'e' scored last: {text}");
        assert_eq!(p[7]["101"]["rank"], 7);
    }
    // Chat: the templated prompt's scores, once, beside the choices.
    let (s, v, text) = send(
        &f.state,
        "POST",
        "/v1/chat/completions",
        Some(&f.inference),
        Some(&chat_body(json!({"prompt_logprobs": 0}))),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{text}");
    let p = v["prompt_logprobs"].as_array().unwrap();
    assert_eq!(p.len() as u64, v["usage"]["prompt_tokens"].as_u64().unwrap(), "{text}");
    assert!(p[0].is_null() && p[1].as_object().unwrap().len() == 1, "{text}");
    assert!(v["choices"][0].get("prompt_logprobs").is_none());
    // With echo and logprobs 1 as well: the legacy shape keeps its one alternative.
    let body = serde_json::to_vec(&json!({"model": "test-model", "prompt": "Hi", "max_tokens": 1, "echo": true,
                                          "logprobs": 1, "prompt_logprobs": 3}))
    .unwrap();
    let (s, v, text) = send(&f.state, "POST", "/v1/completions", Some(&f.inference), Some(&body)).await;
    assert_eq!(s, StatusCode::OK, "{text}");
    assert_eq!(v["choices"][0]["logprobs"]["top_logprobs"][1].as_object().unwrap().len(), 1, "{text}");
    assert_eq!(v["choices"][0]["prompt_logprobs"][1].as_object().unwrap().len(), 4, "{text}");
    // Refused: with stream; out of range.
    for (extra, param) in [
        (json!({"stream": true, "prompt_logprobs": 1}), "prompt_logprobs"),
        (json!({"prompt_logprobs": 21}), "prompt_logprobs"),
        (json!({"prompt_logprobs": -1}), "prompt_logprobs"),
    ] {
        let (s, v, text) =
            send(&f.state, "POST", "/v1/chat/completions", Some(&f.inference), Some(&chat_body(extra))).await;
        assert_eq!((s, v["error"]["param"].as_str()), (StatusCode::BAD_REQUEST, Some(param)), "{text}");
    }
}

/// vLLM's `echo` on chat: a reply that continues the last (assistant)
/// message begins with it; after a user message nothing is prepended.
#[tokio::test]
async fn chat_echo_prepends_the_continued_assistant_message() {
    let f = fixture();
    let continued = serde_json::to_vec(&json!({
        "model": "test-model", "echo": true, "add_generation_prompt": false, "continue_final_message": true,
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Sure: "}],
    }))
    .unwrap();
    let (s, v, text) = send(&f.state, "POST", "/v1/chat/completions", Some(&f.inference), Some(&continued)).await;
    assert_eq!(s, StatusCode::OK, "{text}");
    assert_eq!(v["choices"][0]["message"]["content"], "Sure: Hello world", "{text}");
    let (s, v, text) =
        send(&f.state, "POST", "/v1/chat/completions", Some(&f.inference), Some(&chat_body(json!({"echo": true}))))
            .await;
    assert_eq!(s, StatusCode::OK, "{text}");
    assert_eq!(v["choices"][0]["message"]["content"], "Hello world", "{text}");
    let (s, v, text) = send(
        &f.state,
        "POST",
        "/v1/chat/completions",
        Some(&f.inference),
        Some(&chat_body(json!({"echo": true, "stream": true}))),
    )
    .await;
    assert_eq!((s, v["error"]["param"].as_str()), (StatusCode::BAD_REQUEST, Some("echo")), "{text}");
}

#[tokio::test]
async fn token_id_prompts_are_checked() {
    let f = fixture();
    for (prompt, param_ok) in [
        (json!([]), true),
        (json!([[]]), true),
        (json!([72, 300]), true),
        (json!([72, -1]), true),
        (json!([72, "x"]), true),
        (json!([[72], "text", 5]), true),
    ] {
        let body = serde_json::to_vec(&json!({"model": "test-model", "prompt": prompt, "max_tokens": 2})).unwrap();
        let (s, v, text) = send(&f.state, "POST", "/v1/completions", Some(&f.inference), Some(&body)).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{prompt}: {text}");
        assert_eq!(v["error"]["param"].as_str().is_some_and(|p| p == "prompt"), param_ok, "{text}");
        assert!(!text.contains("300"), "the ids are not echoed: {text}");
    }
    let body = serde_json::to_vec(&json!({"model": "test-model", "prompt": [72, 105], "max_tokens": 2})).unwrap();
    let (s, v, text) = send(&f.state, "POST", "/v1/completions", Some(&f.inference), Some(&body)).await;
    assert_eq!(s, StatusCode::OK, "{text}");
    assert_eq!(v["usage"]["prompt_tokens"], 2, "{text}");
}

/// Regression: a too-long prompt on `/v1/completions` named `messages` as the
/// offending field.
#[tokio::test]
async fn length_errors_name_the_prompt_field_of_their_endpoint() {
    let f = fixture();
    let long = "x".repeat(200);
    let body = serde_json::to_vec(&json!({"model": "test-model", "prompt": long})).unwrap();
    let (s, v, _) = send(&f.state, "POST", "/v1/completions", Some(&f.inference), Some(&body)).await;
    assert_eq!((s, v["error"]["param"].as_str()), (StatusCode::BAD_REQUEST, Some("prompt")));
    let body = serde_json::to_vec(&json!({"model": "test-model", "prompt": "abc", "max_tokens": 80})).unwrap();
    let (s, v, _) = send(&f.state, "POST", "/v1/completions", Some(&f.inference), Some(&body)).await;
    assert_eq!((s, v["error"]["param"].as_str()), (StatusCode::BAD_REQUEST, Some("prompt")));
    let (s, v, _) =
        send(&f.state, "POST", "/v1/chat/completions", Some(&f.inference), Some(&chat_body(json!({"max_tokens": 80}))))
            .await;
    assert_eq!((s, v["error"]["param"].as_str()), (StatusCode::BAD_REQUEST, Some("messages")));
}

/// vLLM's tokenizer endpoints, as lm-evaluation-harness' remote tokenizer
/// calls them: `GET /tokenizer_info` (it needs `eos_token`), `POST /tokenize`
/// `{"prompt", "add_special_tokens": false}` and `POST /detokenize`.
#[tokio::test]
async fn tokenizer_endpoints_answer_like_vllm() {
    let f = fixture();
    let (s, v, text) = send(&f.state, "GET", "/tokenizer_info", Some(&f.inference), None).await;
    assert_eq!(s, StatusCode::OK, "{text}");
    assert!(v.get("eos_token").is_some() && v["model_max_length"] == 64, "{text}");
    let body = serde_json::to_vec(&json!({"prompt": "Hi there", "add_special_tokens": false})).unwrap();
    let (s, v, text) = send(&f.state, "POST", "/tokenize", Some(&f.inference), Some(&body)).await;
    assert_eq!(s, StatusCode::OK, "{text}");
    assert_eq!(v["tokens"], json!([72, 105, 32, 116, 104, 101, 114, 101]), "{text}");
    assert_eq!((v["count"].as_u64(), v["max_model_len"].as_u64()), (Some(8), Some(64)));
    let body = serde_json::to_vec(&json!({"model": "test-model", "tokens": [72, 105]})).unwrap();
    let (s, v, text) = send(&f.state, "POST", "/detokenize", Some(&f.inference), Some(&body)).await;
    assert_eq!((s, v["prompt"].as_str()), (StatusCode::OK, Some("Hi")), "{text}");
    // Refusals name the field and never echo the text or ids.
    for (route, body, status, param) in [
        ("/tokenize", json!({"prompt": 5}), StatusCode::BAD_REQUEST, Some("prompt")),
        (
            "/tokenize",
            json!({"messages": [{"role": "user", "content": "CANARY-1"}]}),
            StatusCode::BAD_REQUEST,
            Some("prompt"),
        ),
        ("/tokenize", json!({"prompt": "CANARY-2", "model": "other"}), StatusCode::NOT_FOUND, Some("model")),
        ("/detokenize", json!({"tokens": [72, 9999]}), StatusCode::BAD_REQUEST, Some("tokens")),
        ("/detokenize", json!({"tokens": "CANARY-3"}), StatusCode::BAD_REQUEST, Some("tokens")),
    ] {
        let bytes = serde_json::to_vec(&body).unwrap();
        let (s, v, text) = send(&f.state, "POST", route, Some(&f.inference), Some(&bytes)).await;
        assert_eq!(s, status, "{route} {body}: {text}");
        if status == StatusCode::BAD_REQUEST {
            assert_eq!(v["error"]["param"].as_str(), param, "{text}");
        }
        assert!(!text.contains("CANARY") && !text.contains("9999"), "{text}");
    }
    // The inference permission is needed.
    let (s, _, _) = send(&f.state, "GET", "/tokenizer_info", None, None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
}
