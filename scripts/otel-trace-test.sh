#!/usr/bin/env bash
# OpenTelemetry traces end to end (tests/e2e/test_traces.py): `salus serve`
# exports the spans of real requests to OTLP receivers built on the
# `opentelemetry-proto` PyPI package (OTLP/HTTP protobuf over HTTPS with a
# configured CA, then OTLP/gRPC), the receiver is stopped and restarted, and no
# exported byte holds request text. Servers of its own on loopback; the Python
# packages go into a virtualenv of their own (cached under the target dir).
#
# Usage: scripts/otel-trace-test.sh [BIN]   (SALUS_BIN / SALUS_MODEL also work)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TIMEOUT="${SALUS_OTEL_TIMEOUT:-300}"
if [ -z "${SALUS_OTEL_INNER:-}" ]; then
  SALUS_OTEL_INNER=1 exec timeout --kill-after=10 "$TIMEOUT" "$0" "$@"
fi
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
BIN="${1:-${SALUS_BIN:-}}"
if [ -z "$BIN" ]; then
  (cd "$ROOT" && cargo build --quiet --bin salus)
  BIN="$TARGET_DIR/debug/salus"
fi
MODEL="${SALUS_MODEL:-$("$ROOT/scripts/fetch-model.sh")}"
VENV="${SALUS_OTEL_VENV:-$TARGET_DIR/otel-venv}"
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import grpc, opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc" 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "opentelemetry-proto>=1.27,<2" "grpcio>=1.60,<2"
fi

WORK="$(mktemp -d)"
chmod 700 "$WORK"
trap 'rm -rf "$WORK"' EXIT
# The collector's CA and its certificate for 127.0.0.1.
# shellcheck source=scripts/lib/test-pki.sh
. "$ROOT/scripts/lib/test-pki.sh"
test_pki "$WORK" collector salus-otel-test-ca
# Salus' own serving certificate, an API key and the audit key.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 \
  -subj "/CN=localhost" -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
  -keyout "$WORK/key.pem" -out "$WORK/cert.pem" 2>/dev/null
chmod 600 "$WORK/key.pem"
"$BIN" keys --api-keys "$WORK/api-keys.json" create --principal otel-client --kind service --role inference \
  >"$WORK/inference.key" 2>/dev/null
"$BIN" audit keygen "$WORK/audit.key" >/dev/null

SALUS_BIN="$BIN" SALUS_MODEL="$MODEL" SALUS_OTEL_WORK="$WORK" "$VENV/bin/python" "$ROOT/tests/e2e/test_traces.py"
