#!/usr/bin/env bash
# End-to-end test of `salus serve` with the official `openai` Python SDK.
#
# Starts the real binary on the default model, over TLS, on a loopback port,
# with a freshly generated self-signed certificate and API keys created by
# `salus keys`, then runs tests/e2e/test_openai_sdk.py against it, and
# tests/e2e/test_production_docs.py (the deployment guide, verbatim). Everything
# stays on 127.0.0.1; nothing is downloaded at test time except the `openai`
# package into a virtualenv (cached under target/e2e-venv) and, on a fresh
# machine, the default model through scripts/fetch-model.sh.
#
# Needs: python3 (with venv), openssl, curl, cargo (the binary is built here if
# stale; set SALUS_BIN to use another). Bounded: the whole run is limited to
# SALUS_E2E_TIMEOUT seconds (default 900). Exit status 0 = all checks passed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TIMEOUT="${SALUS_E2E_TIMEOUT:-900}"
if [ -z "${SALUS_E2E_INNER:-}" ]; then
  SALUS_E2E_INNER=1 exec timeout --kill-after=10 "$TIMEOUT" "$0" "$@"
fi

TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
if [ -n "${SALUS_BIN:-}" ]; then
  BIN="$SALUS_BIN"
else
  (cd "$ROOT" && cargo build --quiet --bin salus)
  BIN="$TARGET_DIR/debug/salus"
fi
VENV="${SALUS_E2E_VENV:-$TARGET_DIR/e2e-venv}"
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import openai, jsonschema, langchain_openai, jwt, fhir.resources" 2>/dev/null; then
  python3 -m venv "$VENV"
  # jsonschema validates structured outputs and tool arguments; LangChain is a
  # real tool-calling client (tests/e2e/test_structured_outputs.py, test_tools.py);
  # PyJWT mints the identity provider's tokens (test_access.py).
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "openai>=1.40,<3" "jsonschema>=4.18,<5" \
    "langchain-openai>=0.2,<2" "pyjwt[crypto]>=2.8,<3" "fhir.resources>=7.1,<9"
fi
MODEL="$("$ROOT/scripts/fetch-model.sh")"

WORK="$(mktemp -d)"
chmod 700 "$WORK"
SERVER_PID=""
cleanup() {
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    sleep 1
    kill -KILL "$SERVER_PID" 2>/dev/null || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

# Self-signed certificate for localhost / 127.0.0.1.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 \
  -subj "/CN=localhost" -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
  -keyout "$WORK/key.pem" -out "$WORK/cert.pem" 2>/dev/null
chmod 600 "$WORK/key.pem"

# API keys: inference, metrics, and one revoked.
KEYS="$WORK/api-keys.json"
INFERENCE_KEY="$("$BIN" keys --api-keys "$KEYS" create --principal e2e-client --kind service --role inference 2>/dev/null)"
METRICS_KEY="$("$BIN" keys --api-keys "$KEYS" create --principal e2e-prometheus --kind service --role metrics 2>/dev/null)"
REVOKED_KEY="$("$BIN" keys --api-keys "$KEYS" create --principal e2e-revoked --kind human --role inference 2>/dev/null)"
"$BIN" keys --api-keys "$KEYS" revoke e2e-revoked 2>/dev/null
REVIEWER_KEY="$("$BIN" keys --api-keys "$KEYS" create --principal e2e-reviewer --kind human --role inference \
  --role review 2>/dev/null)"
AUDITOR_KEY="$("$BIN" keys --api-keys "$KEYS" create --principal e2e-auditor --kind human --role audit.read 2>/dev/null)"
LIMITED_KEY="$("$BIN" keys --api-keys "$KEYS" create --principal e2e-limited --kind service --role inference \
  --requests-per-minute 3 2>/dev/null)"

# A stand-in identity provider: an ES256 signing key and its JWKS (tests/e2e/test_access.py
# mints the tokens), and a port for the break-glass webhook receiver.
ISSUER="https://idp.e2e.test/realms/hospital"
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$WORK/idp-key.pem" 2>/dev/null
"$VENV/bin/python" - "$WORK/idp-key.pem" "$WORK/jwks.json" <<'PY'
import base64, json, sys
from cryptography.hazmat.primitives.serialization import load_pem_private_key
n = load_pem_private_key(open(sys.argv[1], "rb").read(), None).public_key().public_numbers()
b64 = lambda i: base64.urlsafe_b64encode(i.to_bytes(32, "big")).rstrip(b"=").decode()
json.dump({"keys": [{"kty": "EC", "kid": "e2e-1", "crv": "P-256", "x": b64(n.x), "y": b64(n.y)}]}, open(sys.argv[2], "w"))
PY
HOOK_PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')"
# The receiver's certificate is a leaf (CA:FALSE): rustls, which Salus uses to
# call out, refuses a CA certificate as a server's own.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 \
  -subj "/CN=hook.localhost" -addext "subjectAltName=IP:127.0.0.1" \
  -addext "basicConstraints=critical,CA:FALSE" -addext "extendedKeyUsage=serverAuth" \
  -keyout "$WORK/hook-key.pem" -out "$WORK/hook-cert.pem" 2>/dev/null

# The audit trail is required: a fresh key and a private trail directory.
"$BIN" audit keygen "$WORK/audit.key" >/dev/null

PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')"

# Flags for the main keys, environment variables for the rest (both override paths are exercised).
SALUS_MODEL__ALLOW_PLAINTEXT_WEIGHTS=true SALUS_MODEL__ID=smollm2-135m SALUS_SERVER__SHUTDOWN_TIMEOUT_SECS=60 \
SALUS_LIMITS__MAX_TOKENS=4000 SALUS_LOGGING__FORMAT=json \
SALUS_AUDIT__DIR="$WORK/audit" SALUS_AUDIT__KEY="file:$WORK/audit.key" \
SALUS_AUTH__OIDC="[{alias = \"e2e-idp\", issuer = \"$ISSUER\", audience = \"salus\", jwks_file = \"$WORK/jwks.json\", roles = {clinician = {permissions = [\"inference\"]}, oncall = {permissions = [\"break_glass\"]}}}]" \
SALUS_AUTH__BREAK_GLASS="{window_secs = 600, notify_url = \"https://127.0.0.1:$HOOK_PORT/break-glass\", notify_ca_file = \"$WORK/hook-cert.pem\"}" \
  "$BIN" serve --listen "127.0.0.1:$PORT" --model "$MODEL" \
    --tls-cert "$WORK/cert.pem" --tls-key "$WORK/key.pem" --api-keys "$KEYS" \
    >"$WORK/server.out" 2>"$WORK/server.err" &
SERVER_PID=$!

for _ in $(seq 1 120); do
  if curl -s --cacert "$WORK/cert.pem" "https://127.0.0.1:$PORT/health" >/dev/null 2>&1; then break; fi
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    echo "e2e: server exited during start-up:" >&2; cat "$WORK/server.err" >&2; exit 1
  fi
  sleep 1
done

status=0
SALUS_E2E_BASE="https://127.0.0.1:$PORT" SALUS_E2E_CA="$WORK/cert.pem" SALUS_E2E_MODEL=smollm2-135m \
SALUS_E2E_KEY="$INFERENCE_KEY" SALUS_E2E_METRICS_KEY="$METRICS_KEY" SALUS_E2E_REVOKED_KEY="$REVOKED_KEY" \
  "$VENV/bin/python" "$ROOT/tests/e2e/test_openai_sdk.py" || status=$?

# Structured outputs through the SDK: every output validates against its schema.
SALUS_E2E_BASE="https://127.0.0.1:$PORT" SALUS_E2E_CA="$WORK/cert.pem" SALUS_E2E_MODEL=smollm2-135m \
SALUS_E2E_KEY="$INFERENCE_KEY" \
  "$VENV/bin/python" "$ROOT/tests/e2e/test_structured_outputs.py" || status=$?

# Tool calling through the SDK and LangChain.
SALUS_E2E_BASE="https://127.0.0.1:$PORT" SALUS_E2E_CA="$WORK/cert.pem" SALUS_E2E_MODEL=smollm2-135m \
SALUS_E2E_KEY="$INFERENCE_KEY" \
  "$VENV/bin/python" "$ROOT/tests/e2e/test_tools.py" || status=$?

# Signed-in people, per-principal limits and break-glass through the SDK.
SALUS_E2E_BASE="https://127.0.0.1:$PORT" SALUS_E2E_CA="$WORK/cert.pem" SALUS_E2E_MODEL=smollm2-135m \
SALUS_E2E_KEY="$INFERENCE_KEY" SALUS_E2E_LIMITED_KEY="$LIMITED_KEY" SALUS_E2E_ISSUER="$ISSUER" \
SALUS_E2E_IDP_KEY="$WORK/idp-key.pem" SALUS_E2E_HOOK_PORT="$HOOK_PORT" SALUS_E2E_HOOK_CERT="$WORK/hook-cert.pem" SALUS_E2E_HOOK_KEY="$WORK/hook-key.pem" \
SALUS_E2E_BIN="$BIN" SALUS_E2E_AUDIT_DIR="$WORK/audit" SALUS_E2E_AUDIT_KEY="$WORK/audit.key" \
  "$VENV/bin/python" "$ROOT/tests/e2e/test_access.py" || status=$?

# Review attestations, auditor access and the access report (rendered by
# headless Chromium, installed here when missing).
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 || \
    { apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1; } || true
fi
SALUS_E2E_BASE="https://127.0.0.1:$PORT" SALUS_E2E_CA="$WORK/cert.pem" SALUS_E2E_MODEL=smollm2-135m \
SALUS_E2E_KEY="$INFERENCE_KEY" SALUS_E2E_REVIEWER_KEY="$REVIEWER_KEY" SALUS_E2E_AUDITOR_KEY="$AUDITOR_KEY" \
SALUS_E2E_BIN="$BIN" SALUS_E2E_AUDIT_DIR="$WORK/audit" SALUS_E2E_AUDIT_KEY="$WORK/audit.key" \
  "$VENV/bin/python" "$ROOT/tests/e2e/test_reviews.py" || status=$?

# The production steps of docs/deployment.md, run verbatim with a server of their
# own (plus: every configs/salus.toml key is in docs/configuration.md, every test
# named in docs/compliance.md exists).
if python3 "$ROOT/tests/e2e/test_production_docs.py" --bin "$BIN" --model "$MODEL"; then
  echo "PASS production steps of docs/deployment.md"
else
  echo "FAIL production steps of docs/deployment.md" >&2; status=1
fi

# The fleet kit with a server and a Prometheus of its own: Kubernetes manifests
# (schemas, probes run against the CPU variant), alert rules (promtool), the
# Grafana dashboard, and no Salus label value outside its fixed set.
if "$ROOT/scripts/fleet-test.sh" "$BIN"; then
  echo "PASS fleet kit (configs/kubernetes, configs/prometheus, configs/grafana)"
else
  echo "FAIL fleet kit (configs/kubernetes, configs/prometheus, configs/grafana)" >&2; status=1
fi

# SIGHUP reloads the certificate without dropping a connection that is streaming.
fingerprint() {
  echo | openssl s_client -connect "127.0.0.1:$PORT" -servername localhost 2>/dev/null \
    | openssl x509 -noout -fingerprint -sha256 2>/dev/null
}
OLD_FP="$(fingerprint)"
cp "$WORK/cert.pem" "$WORK/old-cert.pem"
curl -sN --cacert "$WORK/old-cert.pem" "https://127.0.0.1:$PORT/v1/chat/completions" \
  -H "Authorization: Bearer $INFERENCE_KEY" -H "Content-Type: application/json" \
  -d '{"model":"smollm2-135m","messages":[{"role":"user","content":"Count to fifty."}],"max_tokens":60,"logit_bias":{"0":-100,"1":-100,"2":-100},"stream":true}' \
  >"$WORK/stream.out" 2>/dev/null &
CURL_PID=$!
sleep 0.5
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 \
  -subj "/CN=localhost" -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
  -keyout "$WORK/key.pem" -out "$WORK/cert.pem" 2>/dev/null
kill -HUP "$SERVER_PID"
sleep 1
NEW_FP="$(fingerprint)"
FILE_FP="$(openssl x509 -noout -fingerprint -sha256 -in "$WORK/cert.pem")"
if wait "$CURL_PID" && tail -c 200 "$WORK/stream.out" | grep -q 'data: \[DONE\]' \
   && [ "$NEW_FP" = "$FILE_FP" ] && [ "$NEW_FP" != "$OLD_FP" ] \
   && curl -sf --cacert "$WORK/cert.pem" "https://127.0.0.1:$PORT/health" >/dev/null; then
  echo "PASS SIGHUP certificate reload (in-flight stream completed, new handshakes use the new certificate)"
else
  echo "FAIL SIGHUP certificate reload" >&2; status=1
fi

# Graceful shutdown on SIGTERM: a request in flight finishes, then the process exits 0.
curl -sN --cacert "$WORK/cert.pem" "https://127.0.0.1:$PORT/v1/chat/completions" \
  -H "Authorization: Bearer $INFERENCE_KEY" -H "Content-Type: application/json" \
  -d '{"model":"smollm2-135m","messages":[{"role":"user","content":"Count to fifty."}],"max_tokens":30,"logit_bias":{"0":-100,"1":-100,"2":-100},"stream":true}' \
  >"$WORK/drain.out" 2>/dev/null &
CURL_PID=$!
sleep 0.5
kill -TERM "$SERVER_PID"
for _ in $(seq 1 150); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.5; done
if kill -0 "$SERVER_PID" 2>/dev/null; then
  echo "FAIL graceful shutdown: still running 75 s after SIGTERM (drain timeout 60 s)" >&2; status=1
elif ! wait "$SERVER_PID"; then
  echo "FAIL graceful shutdown: non-zero exit status" >&2; status=1
elif wait "$CURL_PID" && tail -c 200 "$WORK/drain.out" | grep -q 'data: \[DONE\]'; then
  echo "PASS graceful shutdown on SIGTERM (in-flight stream completed, exit status 0)"
else
  echo "FAIL graceful shutdown: the in-flight stream was cut off" >&2; status=1
fi
SERVER_PID=""

# The server's own output must hold no request text and no key (a small canary check;
# the full canary harness is a separate test).
if grep -a -q -e "about the sea" -e "Count to fifty" -e "$INFERENCE_KEY" -e "${INFERENCE_KEY#sk-salus-}" \
     "$WORK/server.out" "$WORK/server.err"; then
  echo "FAIL server output contains request text or an API key" >&2; status=1
else
  echo "PASS server output holds no prompt text or API key ($(cat "$WORK/server.out" "$WORK/server.err" | wc -c) bytes scanned)"
fi
# [audit.forward] against a real rsyslog over TLS, killed and restarted mid-stream
# (a server of its own; installs rsyslog + rsyslog-gnutls with apt-get when missing).
if SALUS_BIN="$BIN" SALUS_MODEL="$MODEL" "$ROOT/scripts/siem-forward-test.sh"; then
  echo "PASS audit forwarding to a SIEM (scripts/siem-forward-test.sh)"
else
  echo "FAIL audit forwarding to a SIEM (scripts/siem-forward-test.sh)" >&2; status=1
fi
# OpenTelemetry traces to OTLP receivers (HTTP over TLS, then gRPC; servers of
# its own; opentelemetry-proto and grpcio into a virtualenv of its own).
if SALUS_BIN="$BIN" SALUS_MODEL="$MODEL" "$ROOT/scripts/otel-trace-test.sh"; then
  echo "PASS OpenTelemetry traces over OTLP (scripts/otel-trace-test.sh)"
else
  echo "FAIL OpenTelemetry traces over OTLP (scripts/otel-trace-test.sh)" >&2; status=1
fi
# `salus backup` to S3 with Object Lock (moto in server mode on loopback, from PyPI
# into a virtualenv of its own), and a server of its own shipping there ([audit.ship]).
if SALUS_BIN="$BIN" SALUS_MODEL="$MODEL" "$ROOT/scripts/backup-s3-test.sh"; then
  echo "PASS backups to S3 with Object Lock (scripts/backup-s3-test.sh)"
else
  echo "FAIL backups to S3 with Object Lock (scripts/backup-s3-test.sh)" >&2; status=1
fi

if [ "$status" -ne 0 ]; then
  echo "--- server stderr (last 40 lines) ---" >&2; tail -40 "$WORK/server.err" >&2
fi
exit "$status"
