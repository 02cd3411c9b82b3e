#!/usr/bin/env bash
# The fleet kit, tested: Kubernetes manifests (configs/kubernetes), Prometheus
# alerts and scrape config (configs/prometheus), Grafana dashboard
# (configs/grafana), against the Kubernetes schemas, promtool, a real
# `salus serve` and a real Prometheus. What is checked: tests/fleet/test_fleet.py.
#
#   scripts/fleet-test.sh [SALUS_BINARY]
#
# The binary: $1, else $SALUS_BIN, else target/debug/salus built here with
# cargo. Installs what is missing: the Debian package `prometheus` (Prometheus
# and promtool; as root, with apt-get) and a virtualenv with kubernetes-validate
# (the Kubernetes JSON schemas ship inside it: validation is offline) under
# target/fleet-venv (SALUS_FLEET_VENV to override). kubectl is used when
# installed (its `kustomize` must render what the test's own renderer does).
# Everything listens on 127.0.0.1. Bounded by SALUS_FLEET_TIMEOUT seconds
# (default 300). Exit status 0 = every check passed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TIMEOUT="${SALUS_FLEET_TIMEOUT:-300}"
if [ -z "${SALUS_FLEET_INNER:-}" ]; then
  SALUS_FLEET_INNER=1 exec timeout --kill-after=10 "$TIMEOUT" "$0" "$@"
fi

TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
if [ -n "${1:-}" ]; then
  BIN="$1"
elif [ -n "${SALUS_BIN:-}" ]; then
  BIN="$SALUS_BIN"
else
  (cd "$ROOT" && cargo build --quiet --bin salus)
  BIN="$TARGET_DIR/debug/salus"
fi
BIN="$(cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN")"

# Prometheus and promtool (Debian's package).
if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
  if [ "$(id -u)" != 0 ]; then
    echo "fleet-test: needs prometheus and promtool (apt-get install prometheus, as root)" >&2; exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1 || \
    { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1; }
  # The package starts a system Prometheus where systemd runs; this test brings its own.
  if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet prometheus 2>/dev/null; then
    systemctl disable --now prometheus >/dev/null 2>&1 || true
  fi
fi

VENV="${SALUS_FLEET_VENV:-$TARGET_DIR/fleet-venv}"
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import kubernetes_validate, yaml, tomllib" 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "kubernetes-validate>=1.34,<2" "PyYAML>=6,<7"
fi

MODEL="$("$ROOT/scripts/fetch-model.sh")"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/salus-fleet.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

"$VENV/bin/python" "$ROOT/tests/fleet/test_fleet.py" --bin "$BIN" --model "$MODEL" \
  --promtool "$(command -v promtool)" --prometheus "$(command -v prometheus)" --work "$WORK" \
  --k8s-versions "${SALUS_FLEET_K8S_VERSIONS:-1.29.0,1.34.0}"
