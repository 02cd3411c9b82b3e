//! The PHI canary harness (issue 7): proves that nothing a client sends ends up
//! anywhere outside the HTTP response.
//!
//! It starts the real `salus serve --dev` binary with `RUST_LOG=trace`, once
//! logging JSON to a log file and once logging text to stderr (the server writes
//! its log to one or the other), with its home, working and temp directories in
//! fresh temp dirs. It then sends a unique random canary through every path a
//! client can reach — message text of every role, stop strings, `user`,
//! `logit_bias` keys, the model name, parameter names and values of the wrong
//! type, the query string, the URL path, the method, custom headers, a bad API
//! key, malformed JSON, invalid UTF-8, an oversized body, a context overflow,
//! `n=2`, a completed stream and a stream cancelled midway, structured-output
//! schemas (enum values, descriptions, property names, consts, choices) accepted
//! and refused, regexes and grammars that do not compile, tools (a description,
//! generated call arguments, a history call's arguments, a tool result), JWT
//! claims of signed-in users, break-glass reasons, review texts and codes, and
//! auditor query parameters, `traceparent` and `tracestate` headers — stops
//! the server with
//! SIGTERM and scans every byte the process produced outside the HTTP responses
//! (stdout, stderr, log file, `/metrics`, the OpenTelemetry spans it exported
//! to a local OTLP receiver, the dev (with the audit trail), home,
//! temp and working directories, and the decrypted audit records) for
//! each canary: raw, lowercase, hex (both cases) and base64 (standard and
//! URL-safe, all three alignments). Error bodies must not echo any canary either.
//! A signed-in user's display name and an accepted break-glass reason belong
//! in the audit trail: they must be found in the decrypted records (and in
//! nothing else, the trail's own files included).
//!
//! No request can force a 500 from outside: every internal-error path
//! (tokenizer failure, engine failure, a panicking forward step) needs a broken
//! model or engine, and there is no panic-forcing switch in the binary. The
//! panic path (hook → location + request id only, 500, server keeps serving) is
//! covered by the in-process router tests; here the server must still answer
//! `/health` after everything else.
//!
//! Skips (passes with a message) when the default model is absent; set
//! `SALUS_MODEL` to use another GGUF file.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_salus");

/// The source name of the decrypted audit records.
const DECRYPTED_TRAIL: &str = "decrypted audit records";

/// JWT claims and break-glass reasons.
#[path = "phi_canary/access.rs"]
mod access;
/// The exported OpenTelemetry spans.
#[path = "phi_canary/otlp.rs"]
mod otlp;
/// Canaries, the scanner, and what the server produced.
#[path = "phi_canary/scan.rs"]
mod scan;
use scan::{base64, hex, Canaries, Produced};

struct Resp {
    status: u16,
    body: Vec<u8>,
}

impl Resp {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One running `salus serve --dev`.
struct Server {
    child: Child,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    pumps: Vec<JoinHandle<()>>,
    base: String,
    key: String,
    /// Where curl runs and request bodies are written (not scanned: it holds the canaries).
    client_dir: PathBuf,
    requests: usize,
}

fn pump(mut from: impl Read + Send + 'static, to: Arc<Mutex<Vec<u8>>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => to.lock().unwrap().extend_from_slice(&buf[..n]),
            }
        }
    })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The directories the server may write to, all scanned afterwards.
struct Dirs {
    root: tempfile::TempDir,
}

impl Dirs {
    fn new() -> Self {
        let root = tempfile::tempdir().unwrap();
        for d in ["dev", "home", "tmp", "work", "logs"] {
            private_dir(&root.path().join(d));
        }
        Dirs { root }
    }
    fn path(&self, d: &str) -> PathBuf {
        self.root.path().join(d)
    }
}

fn private_dir(p: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(p).unwrap();
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o700)).unwrap();
}

/// The environment the server runs with: nothing inherited but PATH.
fn server_command(dirs: &Dirs, model: &Path, port: u16, log_to_file: bool) -> Command {
    let mut c = Command::new(BIN);
    c.args(["serve", "--dev", "--dev-dir"])
        .arg(dirs.path("dev"))
        .args(["--listen", &format!("127.0.0.1:{port}"), "--model"])
        .arg(model)
        .current_dir(dirs.path("work"))
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", dirs.path("home"))
        .env("TMPDIR", dirs.path("tmp"))
        .env("RUST_LOG", "trace")
        .env("SALUS_SERVER__SHUTDOWN_TIMEOUT_SECS", "5")
        .envs([access::server_env(dirs)])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if log_to_file {
        c.env("SALUS_LOGGING__FILE", dirs.path("logs").join("salus.log")).env("SALUS_LOGGING__FORMAT", "json");
    } else {
        c.env("SALUS_LOGGING__FORMAT", "text");
    }
    c
}

/// A failed assertion must not leave the server running.
impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Server {
    fn start(dirs: &Dirs, model: &Path, log_to_file: bool, client_dir: PathBuf, spans: &otlp::Receiver) -> Server {
        let port = free_port();
        let mut child =
            server_command(dirs, model, port, log_to_file).envs(spans.server_env()).spawn().expect("spawn salus");
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let pumps = vec![
            pump(child.stdout.take().unwrap(), stdout.clone()),
            pump(child.stderr.take().unwrap(), stderr.clone()),
        ];
        let deadline = Instant::now() + Duration::from_secs(60);
        let key = loop {
            let out = String::from_utf8_lossy(&stdout.lock().unwrap()).into_owned();
            if let Some(rest) = out.split("export SALUS_API_KEY=").nth(1) {
                break rest.split_whitespace().next().unwrap().to_string();
            }
            if let Some(status) = child.try_wait().unwrap() {
                panic!("salus exited ({status}) before serving: {}", String::from_utf8_lossy(&stderr.lock().unwrap()));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("salus did not start within 60 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        Server { child, stdout, stderr, pumps, base: format!("https://127.0.0.1:{port}"), key, client_dir, requests: 0 }
    }

    fn curl_args(&self, method: &str, path: &str, key: Option<&str>, headers: &[String]) -> Command {
        let mut c = Command::new("curl");
        c.current_dir(&self.client_dir)
            .args(["-k", "-sS", "--http1.1", "--max-time", "60", "-o", "-", "-w", "\n%{http_code}", "-X", method])
            .args(["-H", "Expect:"]);
        if let Some(k) = key {
            c.args(["-H", &format!("Authorization: Bearer {k}")]);
        }
        for h in headers {
            c.args(["-H", h]);
        }
        c.arg(format!("{}{path}", self.base));
        c
    }

    fn run(&mut self, mut c: Command) -> Resp {
        self.requests += 1;
        let out = c.output().expect("run curl");
        assert!(out.status.success(), "curl failed: {}", String::from_utf8_lossy(&out.stderr));
        let mut body = out.stdout;
        let nl = body.iter().rposition(|b| *b == b'\n').expect("curl status line");
        let status = std::str::from_utf8(&body[nl + 1..]).unwrap().trim().parse().unwrap();
        body.truncate(nl);
        Resp { status, body }
    }

    fn get(&mut self, path: &str, key: Option<&str>, headers: &[String]) -> Resp {
        let c = self.curl_args("GET", path, key, headers);
        self.run(c)
    }

    /// POSTs raw bytes (written to a file so any byte goes through unchanged).
    fn post_raw(&mut self, path: &str, key: Option<&str>, headers: &[String], body: &[u8]) -> Resp {
        let file = self.client_dir.join(format!("body-{}", self.requests));
        std::fs::write(&file, body).unwrap();
        let mut h = vec!["Content-Type: application/json".to_string()];
        h.extend_from_slice(headers);
        let mut c = self.curl_args("POST", path, key, &h);
        c.arg("--data-binary").arg(format!("@{}", file.display()));
        self.run(c)
    }

    fn post(&mut self, path: &str, body: &serde_json::Value) -> Resp {
        let key = self.key.clone();
        self.post_raw(path, Some(&key), &[], body.to_string().as_bytes())
    }

    /// Starts a streamed request and disconnects after the first content chunk.
    fn stream_and_cancel(&mut self, body: &serde_json::Value) {
        let file = self.client_dir.join("stream-cancel");
        std::fs::write(&file, body.to_string()).unwrap();
        let key = self.key.clone();
        let mut c =
            self.curl_args("POST", "/v1/chat/completions", Some(&key), &["Content-Type: application/json".into()]);
        c.args(["-N", "--data-binary"]).arg(format!("@{}", file.display())).stdout(Stdio::piped());
        self.requests += 1;
        let mut child = c.spawn().unwrap();
        let mut out = child.stdout.take().unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        // The preamble chunk carries the role; wait for a second chunk (generated text).
        while seen.windows(5).filter(|w| w == b"data:").count() < 2 {
            let n = out.read(&mut buf).unwrap();
            assert!(n > 0, "stream ended before two chunks: {}", String::from_utf8_lossy(&seen));
            seen.extend_from_slice(&buf[..n]);
        }
        assert!(!seen.windows(12).any(|w| w == b"data: [DONE]"), "the stream finished before it was cancelled");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// SIGTERM, then waits for the exit and the end of its output.
    fn stop(mut self) -> (Vec<u8>, Vec<u8>) {
        let st = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap();
        assert!(st.success());
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("salus did not stop within 30 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        for p in self.pumps.drain(..) {
            p.join().unwrap();
        }
        let (out, err) = (self.stdout.lock().unwrap().clone(), self.stderr.lock().unwrap().clone());
        assert!(status.success(), "salus exited with {status}: {}", String::from_utf8_lossy(&err));
        (out, err)
    }
}

/// Checks an error response (status, OpenAI error object) and keeps it for the echo check.
fn expect_error(point: &str, r: Resp, status: u16, errors: &mut Vec<(String, Resp)>) {
    assert_eq!(r.status, status, "{point}: {}", r.text());
    let v: serde_json::Value =
        serde_json::from_slice(&r.body).unwrap_or_else(|_| panic!("{point}: error body is not JSON: {}", r.text()));
    assert!(v["error"]["message"].is_string(), "{point}: {}", r.text());
    errors.push((point.to_string(), r));
}

fn chat(model: &str, messages: serde_json::Value) -> serde_json::Value {
    serde_json::json!({"model": model, "messages": messages, "max_tokens": 3, "temperature": 0})
}

/// What one campaign sent and scanned.
struct Campaign {
    points: usize,
    requests: usize,
    bytes: usize,
}

/// Sends every injection, stops the server and scans what it produced.
fn campaign(model_file: &Path, log_to_file: bool) -> Campaign {
    let dirs = Dirs::new();
    let client = tempfile::tempdir().unwrap();
    let issuer = access::Issuer::new(&dirs);
    let t0 = Instant::now();
    let spans = otlp::Receiver::start();
    let mut s = Server::start(&dirs, model_file, log_to_file, client.path().to_path_buf(), &spans);
    let t_started = t0.elapsed().as_secs_f64();
    let key = s.key.clone();
    let models = s.get("/v1/models", Some(&key), &[]);
    assert_eq!(models.status, 200, "{}", models.text());
    let v: serde_json::Value = serde_json::from_slice(&models.body).unwrap();
    let model = v["data"][0]["id"].as_str().unwrap().to_string();

    let mut cn = Canaries::new();
    // Error responses: (injection point, response) — bodies must not echo any canary.
    let mut errors: Vec<(String, Resp)> = Vec::new();

    // 1. A successful chat request carrying canaries everywhere at once.
    let (sys, usr, asst, stop, user) = (
        cn.mint("system message"),
        cn.mint("user message"),
        cn.mint("assistant history"),
        cn.mint("stop string"),
        cn.mint("user field"),
    );
    let (query, header, agent) = (cn.mint("query string"), cn.mint("custom header"), cn.mint("user-agent header"));
    let (traceparent, tracestate) = (cn.mint("traceparent header"), cn.mint("tracestate header"));
    let mut body = chat(
        &model,
        serde_json::json!([
            {"role": "system", "content": format!("You are {sys}.")},
            {"role": "user", "content": format!("Patient {usr} reports chest pain.")},
            {"role": "assistant", "content": format!("Noted for {asst}.")},
            {"role": "user", "content": [{"type": "text", "text": format!("Summarize for {usr}.")}]},
        ]),
    );
    body["stop"] = serde_json::json!([stop]);
    body["user"] = serde_json::json!(user);
    let file = s.client_dir.join("full.json");
    std::fs::write(&file, body.to_string()).unwrap();
    let mut c = s.curl_args(
        "POST",
        &format!("/v1/chat/completions?patient={query}&{query}=1"),
        Some(&key),
        &[
            "Content-Type: application/json".into(),
            format!("X-Patient-Name: {header}"),
            format!("User-Agent: {agent}"),
            // A valid parent, so that its tracestate would be taken if anything took it.
            "traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
            format!("tracestate: vendor={tracestate}"),
        ],
    );
    c.arg("--data-binary").arg(format!("@{}", file.display()));
    let r = s.run(c);
    assert_eq!(r.status, 200, "{}", r.text());
    // A traceparent that is not one (ignored: a new trace).
    let r = s.get("/v1/models", Some(&key), &[format!("traceparent: 00-{traceparent}-00f067aa0ba902b7-01")]);
    assert_eq!(r.status, 200, "{}", r.text());

    // 2. n = 2.
    let mut body = chat(&model, serde_json::json!([{"role": "user", "content": cn.mint("n=2 message")}]));
    body["n"] = 2.into();
    let r = s.post("/v1/chat/completions", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["choices"].as_array().unwrap().len(), 2);

    // 3. A stream that completes (with usage), and one cancelled midway.
    let mut body = chat(&model, serde_json::json!([{"role": "user", "content": cn.mint("streamed message")}]));
    body["stream"] = true.into();
    body["stream_options"] = serde_json::json!({"include_usage": true});
    let r = s.post("/v1/chat/completions", &body);
    assert_eq!(r.status, 200);
    assert!(r.text().contains("data: [DONE]"), "{}", r.text());
    let mut body = chat(&model, serde_json::json!([{"role": "user", "content": cn.mint("cancelled stream")}]));
    body["stream"] = true.into();
    body["max_tokens"] = 2000.into();
    body["min_p"] = 0.into();
    body["temperature"] = 1.into();
    body["seed"] = 7.into();
    // No EOS: the stream must still be running when the client leaves.
    body["logit_bias"] = serde_json::json!({"2": -100, "0": -100});
    s.stream_and_cancel(&body);

    // 4. /v1/completions.
    let r = s.post(
        "/v1/completions",
        &serde_json::json!({"model": model, "prompt": [cn.mint("completion prompt")], "max_tokens": 2, "temperature": 0}),
    );
    assert_eq!(r.status, 200, "{}", r.text());

    // 4b. Structured outputs: a schema carrying canaries in an enum value, a
    // description, a property name and a const (succeeds), and a regex choice.
    let (enum_c, desc_c, prop_c) =
        (cn.mint("schema enum value"), cn.mint("schema description"), cn.mint("schema property name"));
    let mut body = chat(&model, serde_json::json!([{"role": "user", "content": cn.mint("structured-output message")}]));
    body["max_tokens"] = 12.into();
    body["response_format"] = serde_json::json!({"type": "json_schema", "json_schema": {"name": "triage", "strict": true,
        "description": cn.mint("json_schema description"),
        "schema": {"type": "object", "description": desc_c,
            "properties": {prop_c.clone(): {"enum": [enum_c, "routine"]}, "k": {"const": cn.mint("schema const")}},
            "required": [prop_c]}}});
    let r = s.post("/v1/chat/completions", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    let mut body = chat(&model, serde_json::json!([{"role": "user", "content": "x"}]));
    body["structured_outputs"] = serde_json::json!({"choice": [cn.mint("structured_outputs choice"), "no"]});
    let r = s.post("/v1/chat/completions", &body);
    assert_eq!(r.status, 200, "{}", r.text());

    // 4c. Tool calling: canaries in a tool's description and in the only value
    // its arguments may take (so the generated call carries it), in a history
    // call's arguments and in a tool result.
    let (arg_c, result_c) = (cn.mint("history call arguments"), cn.mint("tool result"));
    let mut body = chat(
        &model,
        serde_json::json!([
            {"role": "user", "content": cn.mint("tool-calling user message")},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_h1", "type": "function",
                "function": {"name": "get_lab", "arguments": format!("{{\"mrn\": \"{arg_c}\"}}")}}]},
            {"role": "tool", "tool_call_id": "call_h1", "content": format!("potassium 4.1 for {result_c}")},
        ]),
    );
    body["max_tokens"] = 60.into();
    body["tools"] = serde_json::json!([{"type": "function", "function": {"name": "get_lab",
        "description": cn.mint("tool description"),
        "parameters": {"type": "object", "properties": {"mrn": {"enum": [cn.mint("generated call arguments")]}},
            "required": ["mrn"], "additionalProperties": false}}}]);
    body["tool_choice"] = "required".into();
    let r = s.post("/v1/chat/completions", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("tool_calls"), "{}", r.text());

    // 4d. Evaluation harness paths: an echoed, scored prompt, and vLLM's
    // tokenizer endpoints (the canary comes back to its sender only).
    let echo_c = cn.mint("echoed scored prompt");
    let r = s.post(
        "/v1/completions",
        &serde_json::json!({"model": model, "prompt": echo_c, "echo": true, "logprobs": 2, "max_tokens": 1}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains(&echo_c), "the prompt is echoed: {}", r.text());
    let r =
        s.post("/tokenize", &serde_json::json!({"prompt": cn.mint("tokenize prompt"), "add_special_tokens": false}));
    assert_eq!(r.status, 200, "{}", r.text());
    let ids: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    let r = s.post("/detokenize", &serde_json::json!({"tokens": ids["tokens"]}));
    assert_eq!(r.status, 200, "{}", r.text());

    // 5. Error paths, each with its own canary.
    let msg = |c: String| serde_json::json!([{"role": "user", "content": c}]);
    let mut body = chat(&model, msg(cn.mint("message of a bad logit_bias request")));
    let p = "logit_bias key";
    body["logit_bias"] = serde_json::json!({ cn.mint(p): 1 });
    let r = s.post("/v1/chat/completions", &body);
    expect_error(p, r, 400, &mut errors);

    let p = "bad API key";
    let bad_key = format!("sk-salus-{}", cn.mint(p));
    let b = chat(&model, msg(cn.mint("message of a bad-key request"))).to_string();
    let r = s.post_raw("/v1/chat/completions", Some(&bad_key), &[], b.as_bytes());
    expect_error(p, r, 401, &mut errors);

    let p = "non-bearer Authorization header";
    let r = s.get("/v1/models", None, &[format!("Authorization: Basic {}", cn.mint(p))]);
    expect_error(p, r, 401, &mut errors);

    let p = "malformed JSON";
    let b = format!("{{\"model\": \"{model}\", \"messages\": [{{\"role\": \"user\", \"content\": \"{}\"", cn.mint(p));
    let r = s.post_raw("/v1/chat/completions", Some(&key), &[], b.as_bytes());
    expect_error(p, r, 400, &mut errors);

    for (p, field) in [("wrong-typed temperature", "temperature"), ("wrong-typed max_tokens", "max_tokens")] {
        let mut body = chat(&model, msg(cn.mint(&format!("message of the {p} request"))));
        body[field] = cn.mint(p).into();
        let r = s.post("/v1/chat/completions", &body);
        expect_error(p, r, 400, &mut errors);
    }

    let p = "wrong-typed content part";
    let body = chat(&model, serde_json::json!([{"role": "user", "content": [{"type": cn.mint(p), "text": "x"}]}]));
    let r = s.post("/v1/chat/completions", &body);
    expect_error(p, r, 400, &mut errors);

    let p = "unknown role";
    let body =
        chat(&model, serde_json::json!([{"role": cn.mint(p), "content": cn.mint("content with an unknown role")}]));
    let r = s.post("/v1/chat/completions", &body);
    expect_error(p, r, 400, &mut errors);

    // Refused constraints: an unenforceable keyword beside canaries, a schema
    // that is not JSON, a bad regex and a bad grammar.
    let p = "schema with an unsupported keyword";
    let mut body = chat(&model, msg(cn.mint("message of an unsupported-schema request")));
    body["response_format"] = serde_json::json!({"type": "json_schema", "json_schema": {"name": "n", "schema":
        {"type": "array", "uniqueItems": true, "description": cn.mint(p), "items": {"enum": [cn.mint("refused schema enum")]}}}});
    let r = s.post("/v1/chat/completions", &body);
    expect_error(p, r, 400, &mut errors);
    let p = "schema that is not JSON";
    let mut body = chat(&model, msg(cn.mint("message of a non-JSON-schema request")));
    body["structured_outputs"] = serde_json::json!({"json": format!("{{\"enum\": [\"{}\"", cn.mint(p))});
    let r = s.post("/v1/chat/completions", &body);
    expect_error(p, r, 400, &mut errors);
    for (p, field) in [("invalid regex", "regex"), ("invalid Lark grammar", "grammar")] {
        let mut body = chat(&model, msg(cn.mint(&format!("message of the {p} request"))));
        body["structured_outputs"] = serde_json::json!({ field: format!("start: ({}", cn.mint(p)) });
        let r = s.post("/v1/chat/completions", &body);
        expect_error(p, r, 400, &mut errors);
    }

    // An unknown parameter whose name is not a plain path (here with a `-`,
    // like `mrn-…`) is never named in the error.
    let p = "unknown parameter name";
    let mut body = chat(&model, msg(cn.mint("message of an unknown-parameter request")));
    body[format!("mrn-{}", cn.mint(p))] = cn.mint("unknown parameter value").into();
    let r = s.post("/v1/chat/completions", &body);
    expect_error(p, r, 400, &mut errors);

    // A plain one is named in the client's own error (so a typo can be found),
    // and nowhere else: every output below is scanned for it too.
    let plain = cn.mint("plain unknown parameter name (named only in its own error)");
    let mut body = chat(&model, msg(cn.mint("message of a plain-unknown-parameter request")));
    body[plain.clone()] = 1.into();
    let r = s.post("/v1/chat/completions", &body);
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains(&plain), "the plain unknown name is named in its error: {}", r.text());

    let p = "unknown model name";
    let body = chat(&cn.mint(p), msg(cn.mint("message of an unknown-model request")));
    let r = s.post("/v1/chat/completions", &body);
    expect_error(p, r, 404, &mut errors);

    // Chunked, and only just over the 1 MiB limit: the server must read the
    // canary-filled body into memory before refusing it, and the few bytes left
    // unread fit in the socket buffer (a Content-Length over the limit is refused
    // before reading, and curl may then fail to send with EPIPE).
    let p = "oversized body";
    let big = cn.mint(p);
    let mut reps = (1 << 20) / (big.len() + 1);
    let body = loop {
        let b = chat(&model, msg(format!("{big} ").repeat(reps))).to_string();
        if b.len() > 1 << 20 {
            break b;
        }
        reps += 1;
    };
    let r = s.post_raw("/v1/chat/completions", Some(&key), &["Transfer-Encoding: chunked".into()], body.as_bytes());
    expect_error(p, r, 413, &mut errors);

    let p = "invalid UTF-8";
    let mut b = format!("{{\"model\": \"{model}\", \"messages\": [{{\"role\": \"user\", \"content\": \"").into_bytes();
    b.extend_from_slice(cn.mint(p).as_bytes());
    b.extend_from_slice(b"\xff\xfe\xc3\x28");
    b.extend_from_slice(cn.mint("after invalid UTF-8").as_bytes());
    b.extend_from_slice(b"\"}], \"max_tokens\": 2}");
    let r = s.post_raw("/v1/chat/completions", Some(&key), &[], &b);
    expect_error(p, r, 400, &mut errors);

    let p = "context-length overflow";
    let long = format!("{} ", cn.mint(p)).repeat(1500);
    let body = chat(&model, msg(long));
    let r = s.post("/v1/chat/completions", &body);
    expect_error(p, r, 400, &mut errors);
    let v: serde_json::Value = serde_json::from_slice(&errors.last().unwrap().1.body).unwrap();
    assert_eq!(v["error"]["code"], "context_length_exceeded");

    let p = "Content-Type header";
    let b = chat(&model, msg(cn.mint("message with a bad Content-Type"))).to_string();
    let file = s.client_dir.join("ct.json");
    std::fs::write(&file, b).unwrap();
    let mut c =
        s.curl_args("POST", "/v1/chat/completions", Some(&key), &[format!("Content-Type: text/{}", cn.mint(p))]);
    c.arg("--data-binary").arg(format!("@{}", file.display()));
    let r = s.run(c);
    expect_error(p, r, 400, &mut errors);

    let p = "unknown URL path";
    let r = s.get(&format!("/v1/{}?{}", cn.mint(p), cn.mint("query of an unknown URL")), Some(&key), &[]);
    expect_error(p, r, 404, &mut errors);

    let p = "model id in the URL";
    let r = s.get(&format!("/v1/models/{}", cn.mint(p)), Some(&key), &[]);
    expect_error(p, r, 404, &mut errors);

    let p = "HTTP method";
    let c = s.curl_args(&cn.mint(p), "/v1/chat/completions", Some(&key), &[]);
    let r = s.run(c);
    expect_error(p, r, 405, &mut errors);

    // 6. Signed-in people and break-glass.
    let hello = chat(&model, serde_json::json!([{"role": "user", "content": "Hello"}]));
    access::inject(&mut s, &issuer, &mut cn, &hello, &mut errors);
    access::inject_reviews(&mut s, &mut cn, &hello, &mut errors);

    // 7. Still serving; then /metrics with the metrics role.
    let r = s.get("/health", None, &[]);
    assert_eq!(r.status, 200, "the server must keep serving after every error");
    let metrics = s.get("/metrics", Some(&key), &[]);
    assert_eq!(metrics.status, 200, "{}", metrics.text());
    let requests = s.requests;

    // 8. Stop and collect.
    let t_sent = t0.elapsed().as_secs_f64();
    let (stdout, stderr) = s.stop();
    let t_stopped = t0.elapsed().as_secs_f64();
    let scanner = cn.scanner();
    for (point, r) in &errors {
        let hits = scanner.find(&r.body);
        assert!(hits.is_empty(), "the error body for '{point}' echoes input: {hits:?}: {}", r.text());
    }
    let mut produced = Produced::default();
    produced.add("stdout", stdout);
    produced.add("stderr", stderr);
    produced.add("/metrics", metrics.body);
    // The spans of this run (the server flushed them at shutdown): every request has some.
    let (exported, posts) = spans.received();
    assert!(
        posts > 0 && exported.len() > requests * 50,
        "too few spans exported ({posts} posts, {} bytes)",
        exported.len()
    );
    produced.add("exported OpenTelemetry spans", exported);
    for d in ["dev", "home", "tmp", "work", "logs"] {
        produced.add_tree(&dirs.path(d));
    }
    audit_records(&dirs, &mut produced);

    // The log must really hold the trace of this run, or the scan proves nothing.
    let log = if log_to_file {
        std::fs::read_to_string(dirs.path("logs").join("salus.log")).expect("the log file was written")
    } else {
        String::from_utf8_lossy(&produced.sources[1].1).into_owned()
    };
    let access = log.lines().filter(|l| l.contains("request_id") && l.contains("status")).count();
    assert!(access >= requests - 1, "expected an access-log line per request ({requests}), found {access}:\n{log}");
    assert!(log.contains("client disconnected; generation cancelled"), "the cancelled stream was not seen:\n{log}");
    if log_to_file {
        // Whatever RUST_LOG says, only Salus' own crates log below INFO.
        let mut levels: HashMap<String, usize> = HashMap::new();
        for line in log.lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|_| panic!("not JSON: {line}"));
            let (level, target) = (v["level"].as_str().unwrap(), v["target"].as_str().unwrap());
            *levels.entry(level.to_string()).or_default() += 1;
            if matches!(level, "DEBUG" | "TRACE") {
                assert!(target == "salus" || target.starts_with("salus"), "a dependency logged at {level}: {line}");
            }
        }
        let mut levels: Vec<_> = levels.into_iter().collect();
        levels.sort();
        println!("  log lines by level: {levels:?}");
    }

    let mut leaks = Vec::new();
    let mut in_trail = std::collections::BTreeSet::new();
    for (name, bytes) in &produced.sources {
        let decrypted_trail = name == DECRYPTED_TRAIL;
        for (canary, hit) in scanner.find_canaries(bytes) {
            if decrypted_trail && scanner.audit_only.contains(&canary) {
                in_trail.insert(canary);
            } else {
                leaks.push(format!("{name}: {hit}"));
            }
        }
    }
    for &c in &scanner.audit_only {
        assert!(
            in_trail.contains(&c),
            "'{}' should be in the decrypted audit records (the harness sent it)",
            cn.list[c].0
        );
    }
    assert!(leaks.is_empty(), "PHI canaries leaked:\n{}", leaks.join("\n"));
    for (name, bytes) in &produced.sources {
        println!("  scanned {name}: {} bytes", bytes.len());
    }
    println!(
        "  timing: serving after {t_started:.1} s, requests done at {t_sent:.1} s, stopped at {t_stopped:.1} s, scanned at {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    Campaign { points: cn.list.len(), requests, bytes: produced.total() }
}

/// Decrypted audit records (`salus audit query`) of the development trail
/// (`<dev-dir>/audit`, key `<dev-dir>/audit.key`), when the server wrote one.
fn audit_records(dirs: &Dirs, produced: &mut Produced) {
    let dir = dirs.path("dev").join("audit");
    let has_files = std::fs::read_dir(&dir).map(|mut d| d.next().is_some()).unwrap_or(false);
    if !has_files {
        println!("  no audit trail in {}: raw-byte scan only", dir.display());
        return;
    }
    let out = Command::new(BIN)
        .args(["audit", "query", "--dir"])
        .arg(&dir)
        .arg("--key")
        .arg(format!("file:{}", dirs.path("dev").join("audit.key").display()))
        .env_remove("RUST_LOG")
        .env_remove("SALUS_AUDIT_KEY")
        .output()
        .unwrap();
    assert!(out.status.success(), "salus audit query: {}", String::from_utf8_lossy(&out.stderr));
    let records = out.stdout.iter().filter(|b| **b == b'\n').count();
    assert!(records > 0, "the audit trail has files but no records");
    println!("  decrypted {records} audit records");
    produced.add(DECRYPTED_TRAIL, out.stdout);
    produced.add("salus audit query stderr", out.stderr);
}

#[test]
fn no_canary_leaves_the_request() {
    let Some(model) = salus_models::dev_model::default_model_if_present() else {
        return;
    };
    if Command::new("curl").arg("--version").output().map(|o| !o.status.success()).unwrap_or(true) {
        println!("SKIPPED: curl is not installed");
        return;
    }
    let started = Instant::now();
    let mut points = 0;
    let mut requests = 0;
    let mut bytes = 0;
    for (log_to_file, what) in [(true, "JSON log file"), (false, "text log on stderr")] {
        println!("campaign: RUST_LOG=trace, {what}");
        let c = campaign(&model, log_to_file);
        println!("  {} injection points, {} requests, {} bytes scanned", c.points, c.requests, c.bytes);
        points += c.points;
        requests += c.requests;
        bytes += c.bytes;
    }
    println!(
        "phi canary: {points} injection points in {requests} requests, {bytes} bytes scanned, no canary found ({:.1} s)",
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn refuses_a_world_readable_log_directory() {
    use std::os::unix::fs::PermissionsExt;
    let dirs = Dirs::new();
    let logs = dirs.path("logs");
    std::fs::set_permissions(&logs, std::fs::Permissions::from_mode(0o755)).unwrap();
    let model = dirs.path("no-model.gguf");
    let out = server_command(&dirs, &model, free_port(), true).output().unwrap();
    assert!(!out.status.success(), "salus must refuse a world-readable log directory");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("world-readable"), "{err}");
}

#[test]
fn refuses_a_world_readable_audit_directory() {
    use std::os::unix::fs::PermissionsExt;
    let dirs = Dirs::new();
    let audit = dirs.path("dev").join("audit");
    std::fs::create_dir(&audit).unwrap();
    std::fs::set_permissions(&audit, std::fs::Permissions::from_mode(0o755)).unwrap();
    let model = dirs.path("no-model.gguf");
    let out = server_command(&dirs, &model, free_port(), false).output().unwrap();
    assert!(!out.status.success(), "salus must refuse a world-readable audit directory");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("audit.dir") && err.contains("other users"), "{err}");
}

#[test]
fn the_scanner_finds_every_form_at_every_offset() {
    assert_eq!(base64(b"Man", false), "TWFu");
    assert_eq!(base64(b"hello world", false), "aGVsbG8gd29ybGQ");
    assert_eq!(base64(&[0xfb, 0xff], false), "+/8");
    assert_eq!(base64(&[0xfb, 0xff], true), "-_8");
    assert_eq!(hex(&[0xab, 0x01], false), "ab01");
    let mut cn = Canaries::new();
    let c = cn.mint("test");
    let scanner = cn.scanner();
    let raw = c.as_bytes();
    let mut encodings =
        vec![c.to_ascii_lowercase().into_bytes(), hex(raw, false).into_bytes(), hex(raw, true).into_bytes()];
    for prefix in 0..3 {
        let mut data = vec![b'x'; prefix];
        data.extend_from_slice(raw);
        data.extend_from_slice(b"tail");
        encodings.push(data.clone());
        encodings.push(base64(&data, false).into_bytes());
        encodings.push(base64(&data, true).into_bytes());
    }
    for e in encodings {
        let mut data = b"some log text ".to_vec();
        data.extend_from_slice(&e);
        assert!(!scanner.find(&data).is_empty(), "not found in {}", String::from_utf8_lossy(&data));
    }
    assert!(scanner.find(b"CANARY0000000000000000 nothing here").is_empty());
}
