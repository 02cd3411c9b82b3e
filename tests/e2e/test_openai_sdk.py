"""End-to-end checks of `salus serve` with the official openai Python SDK.

Run by scripts/e2e.sh, which starts the server over TLS on loopback and passes:
SALUS_E2E_BASE, SALUS_E2E_CA, SALUS_E2E_MODEL, SALUS_E2E_KEY,
SALUS_E2E_METRICS_KEY, SALUS_E2E_REVOKED_KEY.
Prints one PASS/FAIL line per check; exits 1 if any check failed.
"""

import os
import ssl
import subprocess
import sys
import time
import traceback

import httpx
import openai

BASE = os.environ["SALUS_E2E_BASE"]
CA = os.environ["SALUS_E2E_CA"]
MODEL = os.environ["SALUS_E2E_MODEL"]
KEY = os.environ["SALUS_E2E_KEY"]
METRICS_KEY = os.environ["SALUS_E2E_METRICS_KEY"]
REVOKED_KEY = os.environ["SALUS_E2E_REVOKED_KEY"]

CTX = ssl.create_default_context(cafile=CA)
MSG = [{"role": "user", "content": "Write one sentence about the sea."}]
# SmolLM2's end tokens (<|endoftext|>, <|im_start|>, <|im_end|>), banned to force long generations.
NO_EOS = {"0": -100, "1": -100, "2": -100}


def client(key=KEY, **kw):
    return openai.OpenAI(
        base_url=f"{BASE}/v1", api_key=key, max_retries=0, timeout=120,
        http_client=httpx.Client(verify=CTX), **kw)


C = client()


def check_non_streaming():
    r = C.chat.completions.create(model=MODEL, messages=MSG, max_tokens=24, temperature=0)
    assert r.object == "chat.completion" and r.model == MODEL
    assert len(r.choices) == 1 and r.choices[0].message.role == "assistant"
    assert isinstance(r.choices[0].message.content, str) and r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")
    u = r.usage
    assert u.prompt_tokens > 0 and 0 < u.completion_tokens <= 24
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens


def check_streaming_with_usage():
    chunks = list(C.chat.completions.create(
        model=MODEL, messages=MSG, max_tokens=16, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes in (["stop"], ["length"]), finishes
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert 0 < last.usage.completion_tokens <= 16
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1
    # The same request without streaming gives the same greedy text.
    r = C.chat.completions.create(model=MODEL, messages=MSG, max_tokens=16, temperature=0)
    assert r.choices[0].message.content == text, (r.choices[0].message.content, text)


def check_n2():
    r = C.chat.completions.create(model=MODEL, messages=MSG, max_tokens=8, n=2, seed=3)
    assert [c.index for c in r.choices] == [0, 1]
    assert all(c.message.content for c in r.choices)
    assert r.usage.completion_tokens >= 2


def check_stop():
    base = C.chat.completions.create(model=MODEL, messages=MSG, max_tokens=40, temperature=0,
                                     logit_bias=NO_EOS).choices[0].message.content
    words = base.split()
    assert len(words) >= 4, base
    stop = " " + words[3]
    cut = base[:base.index(stop)]
    r = C.chat.completions.create(model=MODEL, messages=MSG, max_tokens=40, temperature=0,
                                  logit_bias=NO_EOS, stop=[stop])
    assert r.choices[0].message.content == cut, (r.choices[0].message.content, cut)
    assert r.choices[0].finish_reason == "stop"


def check_seed_reproducible():
    kw = dict(model=MODEL, messages=MSG, max_tokens=24, temperature=1.0, seed=1234)
    a = C.chat.completions.create(**kw).choices[0].message.content
    b = C.chat.completions.create(**kw).choices[0].message.content
    assert a == b, (a, b)


def check_completions():
    r = C.completions.create(model=MODEL, prompt=["The capital of France is", "One, two,"], max_tokens=6,
                             temperature=0)
    assert r.object == "text_completion" and [c.index for c in r.choices] == [0, 1]
    assert all(c.text for c in r.choices)
    chunks = list(C.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices)


def check_models():
    ids = [m.id for m in C.models.list()]
    assert ids == [MODEL], ids
    m = C.models.retrieve(MODEL)
    assert m.id == MODEL and len(m.metadata["weights_fingerprint"]) == 64


def check_errors():
    for key in ("sk-salus-" + "0" * 64, REVOKED_KEY):
        try:
            client(key).chat.completions.create(model=MODEL, messages=MSG, max_tokens=2)
            raise AssertionError("bad key accepted")
        except openai.AuthenticationError as e:
            assert e.status_code == 401
    try:
        C.chat.completions.create(model=MODEL, messages=MSG, max_tokens=2,
                                  response_format={"type": "json_schema", "json_schema": {
                                      "name": "n", "schema": {"type": "array", "uniqueItems": True}}})
        raise AssertionError("an unenforceable schema was accepted")
    except openai.BadRequestError as e:
        assert e.status_code == 400 and e.body["param"] == "response_format", e.body
        assert "uniqueItems" in e.body["message"], e.body
    try:
        C.chat.completions.create(model=MODEL, messages=MSG, max_tokens=2, extra_body={"functions": [{
            "name": "f", "parameters": {"type": "object"}}]})
        raise AssertionError("the deprecated functions parameter was accepted")
    except openai.BadRequestError as e:
        assert e.body["param"] == "functions", e.body
    try:
        C.chat.completions.create(model="no-such-model", messages=MSG, max_tokens=2)
        raise AssertionError("unknown model accepted")
    except openai.NotFoundError as e:
        assert e.status_code == 404 and e.body["code"] == "model_not_found"
    try:
        C.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x " * 9000}], max_tokens=2)
        raise AssertionError("context overflow accepted")
    except openai.BadRequestError as e:
        assert e.body["code"] == "context_length_exceeded", e.body


def metrics_text():
    r = httpx.get(f"{BASE}/metrics", headers={"Authorization": f"Bearer {METRICS_KEY}"}, verify=CTX)
    assert r.status_code == 200
    return r.text


def check_disconnect_cancels():
    # A stream that would run for thousands of tokens; close it after a few chunks.
    stream = C.chat.completions.create(model=MODEL, messages=MSG, max_tokens=3000, logit_bias=NO_EOS,
                                       stream=True)
    for i, _ in enumerate(stream):
        if i >= 3:
            break
    stream.close()
    # The engine must drop the sequence at once (not after 3000 tokens).
    deadline = time.time() + 10
    while True:
        text = metrics_text()
        if "\nsalus_running_requests 0\n" in text and "\nsalus_queue_depth 0\n" in text:
            break
        assert time.time() < deadline, "generation still running 10 s after the client disconnected"
        time.sleep(0.2)
    t = time.time()
    C.chat.completions.create(model=MODEL, messages=MSG, max_tokens=4)
    assert time.time() - t < 30, f"next request waited {time.time() - t:.1f}s"


def check_prefix_cache():
    # A prompt of several 16-token blocks, new to this server: the second send
    # reuses every whole block before its last token, and the answer is the same.
    msg = [{"role": "user", "content": "List three common causes of chest pain in adults, with one "
            "distinguishing feature of each, in plain words for a patient leaflet."}]
    kw = dict(model=MODEL, messages=msg, max_tokens=24, temperature=0)
    first = C.chat.completions.create(**kw)
    second = C.chat.completions.create(**kw)
    p = second.usage.prompt_tokens
    assert p >= 48, p
    assert second.usage.prompt_tokens_details.cached_tokens == (p - 1) // 16 * 16, second.usage
    assert first.usage.prompt_tokens_details.cached_tokens < second.usage.prompt_tokens_details.cached_tokens
    assert first.choices[0].message.content == second.choices[0].message.content
    hits = [l for l in metrics_text().splitlines() if l.startswith("salus_prefix_cache_hit_tokens_total ")]
    assert hits and int(hits[0].split()[1]) >= (p - 1) // 16 * 16, hits


def check_metrics():
    text = metrics_text()
    assert 'salus_requests_total{route="/v1/chat/completions",status="200"}' in text
    assert "salus_time_to_first_token_seconds_bucket" in text
    r = httpx.get(f"{BASE}/metrics", headers={"Authorization": f"Bearer {KEY}"}, verify=CTX)
    assert r.status_code == 403


def check_tls_versions():
    url = f"{BASE}/health"
    old = subprocess.run(["curl", "-s", "--cacert", CA, "--tlsv1.1", "--tls-max", "1.1", url],
                         capture_output=True, timeout=30)
    assert old.returncode != 0, "TLS 1.1 connection succeeded"
    for v in ("1.2", "1.3"):
        ok = subprocess.run(["curl", "-sf", "--cacert", CA, f"--tlsv{v}", "--tls-max", v, url],
                            capture_output=True, timeout=30)
        assert ok.returncode == 0, f"TLS {v} failed: {ok.returncode}"


def raw_post(path, body_parts, headers):
    """POSTs over TLS with http.client; returns (status, parsed JSON body)."""
    import http.client
    import json
    from urllib.parse import urlparse
    u = urlparse(BASE)
    conn = http.client.HTTPSConnection(u.hostname, u.port, context=CTX, timeout=30)
    try:
        conn.putrequest("POST", path)
        for k, v in headers.items():
            conn.putheader(k, v)
        conn.endheaders()
        for part in body_parts:
            conn.send(part)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"null")
    finally:
        conn.close()


def check_oversized_bodies_get_413():
    """Regression: a body over limits.max_body_bytes gets the 413 (JSON), not a dropped connection."""
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    big = b'{"model":"x","prompt":"' + b"a" * (2 << 20) + b'"}'
    # Declared by Content-Length: refused before reading, the client still sees the answer.
    status, body = raw_post("/v1/completions", [big], {**auth, "Content-Length": str(len(big))})
    assert status == 413 and body["error"]["code"] == "request_too_large", (status, body)
    # Expect: 100-continue: the client is told before it sends the body.
    status, body = raw_post("/v1/completions", [], {**auth, "Content-Length": str(50 << 20), "Expect": "100-continue"})
    assert status == 413 and body["error"]["code"] == "request_too_large", (status, body)
    # Chunked, no length: refused when the limit is crossed.
    chunks = [f"{len(c):x}\r\n".encode() + c + b"\r\n" for c in (big[i:i + 65536] for i in range(0, len(big), 65536))]
    status, body = raw_post("/v1/completions", chunks + [b"0\r\n\r\n"], {**auth, "Transfer-Encoding": "chunked"})
    assert status == 413 and body["error"]["code"] == "request_too_large", (status, body)
    # A duplicated key is refused, not resolved (parser differential).
    dup = b'{"model":"x","model":"y","prompt":"hi"}'
    status, body = raw_post("/v1/completions", [dup], {**auth, "Content-Length": str(len(dup))})
    assert status == 400 and body["error"]["code"] == "invalid_json", (status, body)


def check_http2_rejections_reach_the_client():
    """Regression: over HTTP/2, rejected POSTs ended as stream resets (curl error 92), not the 401."""
    import tempfile
    with tempfile.NamedTemporaryFile("wb", suffix=".json") as f:
        f.write(b'{"model":"x","prompt":"' + b"a" * (256 << 10) + b'"}')
        f.flush()
        results = []
        for _ in range(20):
            r = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--http2", "--cacert", CA,
                                "-H", "Content-Type: application/json", "--data-binary", f"@{f.name}",
                                f"{BASE}/v1/completions"], capture_output=True, text=True, timeout=30)
            results.append((r.returncode, r.stdout))
    assert all(rc == 0 and code == "401" for rc, code in results), results


def check_token_id_prompts_match_their_text():
    """lm-evaluation-harness sends completions prompts as token ids by default."""
    text = C.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=5, temperature=0)
    # The same prompt as the default model's token ids (SmolLM2's tokenizer).
    ids = C.completions.create(model=MODEL, prompt=[[504, 3575, 282, 4649, 314]], max_tokens=5, temperature=0)
    assert ids.choices[0].text == text.choices[0].text, (ids.choices[0].text, text.choices[0].text)
    assert ids.usage.prompt_tokens == text.usage.prompt_tokens == 5, (ids.usage, text.usage)


def check_tokenizer_endpoints():
    """vLLM's /tokenize, /detokenize, /tokenizer_info (lm-eval's remote tokenizer)."""
    h = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(verify=CTX, base_url=BASE, headers=h) as http:
        info = http.get("/tokenizer_info").json()
        assert info["eos_token"] and info["chat_template"], info
        r = http.post("/tokenize", json={"prompt": "The capital of France is", "add_special_tokens": False}).json()
        assert r["tokens"] == [504, 3575, 282, 4649, 314] and r["count"] == 5, r
        back = http.post("/detokenize", json={"tokens": r["tokens"]}).json()
        assert back["prompt"] == "The capital of France is", back


def check_echo_scores_prompts_like_lm_eval():
    """lm-evaluation-harness' loglikelihood request: echo, logprobs 1, max_tokens 1."""
    def loglikelihood(context, continuation):
        r = C.completions.create(model=MODEL, prompt=context + continuation, echo=True, logprobs=1, max_tokens=1,
                                 temperature=0, seed=1234)
        lp = r.choices[0].logprobs
        assert r.choices[0].text.startswith(context + continuation), r.choices[0].text
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None, lp.token_logprobs[:2]
        ctxlen = len(C.completions.create(model=MODEL, prompt=context, echo=True, max_tokens=0,
                                          logprobs=0).choices[0].logprobs.tokens)
        scores = lp.token_logprobs[ctxlen:-1]
        assert scores and all(s <= 0 for s in scores), scores
        greedy = all(s >= max(t.values()) - 1e-4 for s, t in zip(scores, lp.top_logprobs[ctxlen:-1]))
        return sum(scores), greedy
    paris, paris_greedy = loglikelihood("The capital of France is", " Paris")
    london, _ = loglikelihood("The capital of France is", " London")
    assert paris > london, (paris, london)
    assert paris_greedy, "greedy decoding writes Paris after this prompt"
    # max_tokens 0: the prompt alone, scored; nothing generated.
    r = C.completions.create(model=MODEL, prompt="The capital of France is", echo=True, logprobs=2, max_tokens=0)
    assert r.choices[0].text == "The capital of France is" and r.usage.completion_tokens == 0, r
    assert len(r.choices[0].logprobs.tokens) == r.usage.prompt_tokens


def check_prompt_logprobs_like_vllm():
    """vLLM's prompt_logprobs on both endpoints: per prompt token (the first null) the token's logprob,
    its rank (1 when no alternative is more likely) and text, with the top alternatives; the same scores as echo."""
    prompt = "The capital of France is Paris"
    r = C.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0,
                             extra_body={"prompt_logprobs": 3})
    p = r.choices[0].model_extra["prompt_logprobs"]
    assert len(p) == r.usage.prompt_tokens and p[0] is None, p[:2]
    echo = C.completions.create(model=MODEL, prompt=prompt, echo=True, logprobs=1, max_tokens=0)
    ids = echo.choices[0].logprobs.tokens
    for pos, entry in enumerate(p[1:], start=1):
        assert 1 <= len(entry) <= 4, entry
        ranked = sorted(entry.values(), key=lambda e: e["rank"])
        own = [e for e in entry.values() if e["decoded_token"] == ids[pos]]
        assert own, (pos, entry, ids[pos])
        # Ranks agree with the logprobs: rank 1 is the most likely, a better token never ranks lower.
        best = max(e["logprob"] for e in entry.values())
        assert ranked[0]["rank"] == 1 and abs(ranked[0]["logprob"] - best) < 1e-4, entry
        for e in entry.values():
            assert e["logprob"] <= 0 and e["rank"] >= 1, entry
            assert e["rank"] > 1 or e["logprob"] >= best - 1e-4, entry
            assert e["logprob"] >= best - 1e-3 or e["rank"] > 1, entry
        assert abs(own[0]["logprob"] - echo.choices[0].logprobs.token_logprobs[pos]) < 1e-3, (pos, own, echo)
    chat = C.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=1,
                                     extra_body={"prompt_logprobs": 0})
    cp = chat.model_extra["prompt_logprobs"]
    assert len(cp) == chat.usage.prompt_tokens and cp[0] is None and all(len(e) == 1 for e in cp[1:]), cp[:3]


def check_vllm_extensions_are_honoured():
    """What benchmark harnesses send: ignore_eos really generates max_tokens, min_tokens really defers EOS."""
    hi = [{"role": "user", "content": "Say hi."}]
    short = C.chat.completions.create(model=MODEL, messages=hi, max_tokens=200, temperature=0)
    n = short.usage.completion_tokens
    assert short.choices[0].finish_reason == "stop" and n < 60, (n, short.choices[0].finish_reason)
    full = C.chat.completions.create(model=MODEL, messages=hi, max_tokens=n + 40, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert full.usage.completion_tokens == n + 40 and full.choices[0].finish_reason == "length", full.usage
    least = C.chat.completions.create(model=MODEL, messages=hi, max_tokens=200, temperature=0,
                                      extra_body={"min_tokens": n + 20})
    assert least.usage.completion_tokens >= n + 20, (least.usage, n)
    # An unknown parameter is named (a typo is never silently ignored).
    try:
        C.chat.completions.create(model=MODEL, messages=hi, max_tokens=2, extra_body={"ignore_eoss": True})
        raise AssertionError("unknown parameter accepted")
    except openai.BadRequestError as e:
        assert e.body["param"] == "ignore_eoss" and e.body["code"] == "unknown_parameter", e.body
    # vLLM's continuous usage: every chunk carries the counts so far.
    chunks = list(C.chat.completions.create(model=MODEL, messages=hi, max_tokens=8, stream=True,
                                            extra_body={"stream_options": {"include_usage": True,
                                                                           "continuous_usage_stats": True}}))
    assert all(c.usage is not None for c in chunks), [c.usage for c in chunks]
    # Template options: kwargs reach the template; an open final message is continued.
    r = C.chat.completions.create(model=MODEL, messages=hi, max_tokens=4, temperature=0,
                                  extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert r.choices[0].message.content is not None
    prefix = [{"role": "user", "content": "Name the capital of France."},
              {"role": "assistant", "content": "The capital of France is"}]
    r = C.chat.completions.create(model=MODEL, messages=prefix, max_tokens=6, temperature=0,
                                  extra_body={"continue_final_message": True, "add_generation_prompt": False})
    assert "Paris" in r.choices[0].message.content, r.choices[0].message.content
    models = httpx.get(f"{BASE}/v1/models", headers={"Authorization": f"Bearer {KEY}"}, verify=CTX).json()
    assert models["data"][0]["max_model_len"] > 0, models


CHECKS = [check_non_streaming, check_streaming_with_usage, check_n2, check_stop, check_seed_reproducible,
          check_completions, check_models, check_errors, check_disconnect_cancels, check_prefix_cache, check_metrics,
          check_tls_versions, check_oversized_bodies_get_413, check_http2_rejections_reach_the_client,
          check_vllm_extensions_are_honoured, check_token_id_prompts_match_their_text,
          check_echo_scores_prompts_like_lm_eval, check_tokenizer_endpoints]


def main():
    failed = 0
    for check in CHECKS:
        t = time.time()
        try:
            check()
            print(f"PASS {check.__name__} ({time.time() - t:.1f}s)", flush=True)
        except Exception:  # noqa: BLE001 - report every failure, keep going
            failed += 1
            print(f"FAIL {check.__name__}", flush=True)
            traceback.print_exc()
    print(f"{len(CHECKS) - failed}/{len(CHECKS)} checks passed", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
