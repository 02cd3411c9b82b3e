"""End-to-end checks of people and policy with the official openai SDK.

Run by scripts/e2e.sh against the real `salus serve`, configured with an OIDC
issuer (`e2e-idp`, a local JWKS file; roles `clinician` → inference, `oncall`
→ break_glass only) and a break-glass webhook on SALUS_E2E_HOOK_PORT. Tokens
are minted here with PyJWT (ES256) from SALUS_E2E_IDP_KEY. Checks: a signed-in
user chats through the SDK; refused tokens raise `AuthenticationError` with
their own code; a per-minute limit raises `RateLimitError` with Retry-After;
break-glass without permission raises `PermissionDeniedError`; with it the
request is served, the webhook receiver (which fails the first delivery) gets
the notice without the reason, and `salus audit report break-glass` lists the
window and its requests. Prints one PASS/FAIL line per check; exits 1 if any
check failed.
"""

import json
import os
import ssl
import subprocess
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import jwt
import openai

import checks

BASE = os.environ["SALUS_E2E_BASE"]
CA = os.environ["SALUS_E2E_CA"]
MODEL = os.environ["SALUS_E2E_MODEL"]
KEY = os.environ["SALUS_E2E_KEY"]
LIMITED_KEY = os.environ["SALUS_E2E_LIMITED_KEY"]
ISSUER = os.environ["SALUS_E2E_ISSUER"]
with open(os.environ["SALUS_E2E_IDP_KEY"], "rb") as f:
    IDP_KEY = f.read()
HOOK_PORT = int(os.environ["SALUS_E2E_HOOK_PORT"])
HOOK_CERT = os.environ["SALUS_E2E_HOOK_CERT"]
HOOK_KEY = os.environ["SALUS_E2E_HOOK_KEY"]
BIN = os.environ["SALUS_E2E_BIN"]
AUDIT_DIR = os.environ["SALUS_E2E_AUDIT_DIR"]
AUDIT_KEY = os.environ["SALUS_E2E_AUDIT_KEY"]
CTX = ssl.create_default_context(cafile=CA)
HELLO = [{"role": "user", "content": "Say hello."}]


def client(api_key, **kw):
    return openai.OpenAI(base_url=f"{BASE}/v1", api_key=api_key, max_retries=0, timeout=120,
                         http_client=httpx.Client(verify=CTX), **kw)


def token(sub, roles, **claims):
    now = int(time.time())
    body = {"iss": ISSUER, "aud": "salus", "sub": sub, "iat": now, "nbf": now, "exp": now + 600,
            "preferred_username": f"{sub}-display", "roles": roles, "jti": str(uuid.uuid4())}
    body.update(claims)
    return jwt.encode(body, IDP_KEY, algorithm="ES256", headers={"kid": "e2e-1"})


def check_signed_in_user_chats_through_the_sdk():
    r = client(token("alice", ["clinician"])).chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8)
    assert r.choices[0].message.content is not None, r
    streamed = client(token("alice", ["clinician"])).chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=8, stream=True)
    assert any(c.choices and c.choices[0].delta.content for c in streamed)


def check_refused_tokens_raise_authentication_error_with_their_code():
    cases = [
        (token("alice", ["clinician"], exp=int(time.time()) - 60), "token_expired"),
        (token("alice", ["clinician"], aud="another-app"), "token_invalid_audience"),
        (token("alice", ["clinician"], iss="https://evil.example"), "token_invalid_issuer"),
        (jwt.encode({"iss": ISSUER, "sub": "x"}, "k" * 32, algorithm="HS256"), "token_algorithm_not_allowed"),
    ]
    for tok, code in cases:
        try:
            client(tok).chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4)
        except openai.AuthenticationError as e:
            assert e.code == code, (code, e.body)
            assert tok not in json.dumps(e.body)
        else:
            raise AssertionError(f"{code}: served")
    # No inference role: 403.
    try:
        client(token("rita", ["unmapped"])).chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4)
        raise AssertionError("served without a role")
    except openai.PermissionDeniedError as e:
        assert e.code == "insufficient_permissions", e.body


def check_a_per_minute_limit_raises_rate_limit_error():
    c = client(LIMITED_KEY)
    for i in range(3):
        c.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
    try:
        c.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
        raise AssertionError("the fourth request of a 3/min key was served")
    except openai.RateLimitError as e:
        assert e.code == "rate_limit_exceeded", e.body
        assert int(e.response.headers["retry-after"]) >= 1


class Hook(BaseHTTPRequestHandler):
    received = []
    calls = 0

    def do_POST(self):  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        Hook.calls += 1
        if Hook.calls == 1:
            self.send_response(503)
        else:
            Hook.received.append(json.loads(body))
            self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def check_break_glass_is_refused_served_notified_and_reported():
    hook = ThreadingHTTPServer(("127.0.0.1", HOOK_PORT), Hook)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(HOOK_CERT, HOOK_KEY)
    hook.socket = tls.wrap_socket(hook.socket, server_side=True)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    try:
        reason = "code blue in ward 4, attending unreachable"
        # The service key does not hold break_glass.
        try:
            client(KEY, default_headers={"Salus-Break-Glass": reason}).chat.completions.create(
                model=MODEL, messages=HELLO, max_tokens=2)
            raise AssertionError("break-glass without permission was served")
        except openai.PermissionDeniedError as e:
            assert e.code == "break_glass_not_permitted", e.body
        doc = token("doc", ["oncall"])
        # On call, no inference permission: refused without a reason…
        try:
            client(doc).chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
            raise AssertionError("served without inference")
        except openai.PermissionDeniedError:
            pass
        # …served with one, and inside the window without the header.
        client(doc, default_headers={"Salus-Break-Glass": reason}).chat.completions.create(
            model=MODEL, messages=HELLO, max_tokens=4)
        client(doc).chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4)
        deadline = time.time() + 15
        while not Hook.received and time.time() < deadline:
            time.sleep(0.2)
        assert Hook.calls >= 2 and len(Hook.received) == 1, (Hook.calls, Hook.received)
        notice = Hook.received[0]
        assert notice["principal"] == "e2e-idp:doc" and notice["rule"] == "inference_permission", notice
        assert reason not in json.dumps(notice)
    finally:
        hook.shutdown()
    out = subprocess.run([BIN, "audit", "report", "break-glass", "--dir", AUDIT_DIR, "--key", f"file:{AUDIT_KEY}",
                          "--format", "json"], capture_output=True, text=True, check=True)
    report = json.loads(out.stdout)
    windows = [w for w in report["windows"] if w["principal"] == "e2e-idp:doc"]
    assert len(windows) == 1, report
    w = windows[0]
    assert w["rule"] == "inference_permission" and w["reason"] == reason, w
    assert w["display_name"] == "doc-display", w
    assert len(w["requests"]) == 2 and all(q["outcome"] == "completed" for q in w["requests"]), w
    text = subprocess.run([BIN, "audit", "report", "break-glass", "--dir", AUDIT_DIR, "--key", f"file:{AUDIT_KEY}",
                           "--since", "2000-01-01"], capture_output=True, text=True, check=True).stdout
    assert "e2e-idp:doc (doc-display) overrode inference_permission" in text, text
    bad = subprocess.run([BIN, "audit", "report", "break-glass", "--dir", AUDIT_DIR, "--key", f"file:{AUDIT_KEY}",
                          "--since", "yesterday"], capture_output=True, text=True)
    assert bad.returncode != 0 and "--since" in bad.stderr, bad.stderr


if __name__ == "__main__":
    checks.run(globals())
