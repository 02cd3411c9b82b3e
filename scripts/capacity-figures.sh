#!/usr/bin/env bash
# Capacity-planning figures of one replica (docs/deployment.md, "Capacity
# planning"): start-up time from launch to ready, with plaintext and with
# sealed weights; resident and locked memory when ready and after a burst of
# 8 concurrent requests; the KV cache's capacity in tokens. Prints one line
# per run and a summary; a benchmark, not a test (not run by CI).
#
# Usage: scripts/capacity-figures.sh [RUNS]   (SALUS_BIN: the binary, default
# target/release/salus if built, else target/debug/salus; SALUS_MODEL: a GGUF,
# default the default model; extra SALUS_* config variables pass through,
# e.g. SALUS_SCHEDULER__KV_CACHE_BYTES).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUNS="${1:-3}"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
BIN="${SALUS_BIN:-}"
if [ -z "$BIN" ]; then
  if [ -x "$TARGET_DIR/release/salus" ]; then BIN="$TARGET_DIR/release/salus"; else BIN="$TARGET_DIR/debug/salus"; fi
fi
[ -x "$BIN" ] || { echo "capacity-figures: no salus binary at $BIN (cargo build --release --bin salus)" >&2; exit 1; }
MODEL="${SALUS_MODEL:-$("$ROOT/scripts/fetch-model.sh")}"
WORK="$(mktemp -d)"
chmod 700 "$WORK"
PID=""
cleanup() {
  if [ -n "$PID" ] && kill -0 "$PID" 2>/dev/null; then kill -KILL "$PID" 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'; }
status_kib() { awk -v k="$2:" '$1 == k {print $2}' "/proc/$1/status"; }

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 -subj "/CN=localhost" \
  -addext "subjectAltName=IP:127.0.0.1" -keyout "$WORK/key.pem" -out "$WORK/cert.pem" 2>/dev/null
chmod 600 "$WORK/key.pem"
KEY="$("$BIN" keys --api-keys "$WORK/api-keys.json" create --principal capacity --kind service --role inference 2>/dev/null)"
"$BIN" audit keygen "$WORK/audit.key" >/dev/null
"$BIN" model keygen "$WORK/kek" >/dev/null
"$BIN" model seal "$MODEL" --out "$WORK/model.sealed" --kek "file:$WORK/kek" >/dev/null
echo "binary $BIN; model $(basename "$MODEL") ($(stat -c %s "$MODEL") bytes); $(nproc) CPUs"

# One start: prints "mode seconds rss_mib locked_mib burst_rss_mib capacity_tokens".
run_once() { # mode
  local mode="$1" port mport start ready t rss lck hwm cap
  port="$(free_port)" mport="$(free_port)"
  local -a model_args=(--model "$MODEL")
  local -a env=(SALUS_MODEL__ALLOW_PLAINTEXT_WEIGHTS=true)
  if [ "$mode" = sealed ]; then model_args=(--model "$WORK/model.sealed"); env=(SALUS_MODEL__KEK="file:$WORK/kek"); fi
  rm -rf "$WORK/audit"
  start="$(date +%s.%N)"
  env "${env[@]}" SALUS_MODEL__ID=capacity SALUS_LOGGING__FORMAT=json SALUS_SERVER__METRICS_LISTEN="127.0.0.1:$mport" \
    SALUS_AUDIT__DIR="$WORK/audit" SALUS_AUDIT__KEY="file:$WORK/audit.key" \
    "$BIN" serve --listen "127.0.0.1:$port" "${model_args[@]}" --tls-cert "$WORK/cert.pem" --tls-key "$WORK/key.pem" \
    --api-keys "$WORK/api-keys.json" >/dev/null 2>"$WORK/server.err" &
  PID=$!
  for _ in $(seq 1 6000); do
    curl -sf "http://127.0.0.1:$mport/ready" >/dev/null 2>&1 && break
    kill -0 "$PID" 2>/dev/null || { tail -5 "$WORK/server.err" >&2; exit 1; }
    sleep 0.01
  done
  ready="$(date +%s.%N)"
  t="$(python3 -c "print(f'{$ready - $start:.2f}')")"
  rss="$(status_kib "$PID" VmRSS)" lck="$(status_kib "$PID" VmLck)"
  local -a pids=()
  for i in $(seq 1 8); do
    curl -s --cacert "$WORK/cert.pem" "https://127.0.0.1:$port/v1/chat/completions" -H "Authorization: Bearer $KEY" \
      -H "Content-Type: application/json" \
      -d "{\"model\":\"capacity\",\"max_tokens\":64,\"messages\":[{\"role\":\"user\",\"content\":\"Summarize note $i: 67-year-old with chest pain radiating to the left arm, troponin pending, ECG shows ST depression in V4-V6.\"}]}" \
      >/dev/null &
    pids+=($!)
  done
  wait "${pids[@]}" || true
  hwm="$(status_kib "$PID" VmHWM)"
  cap="$(sed -n 's/.*"capacity_tokens":\([0-9]*\).*/\1/p' "$WORK/server.err" | head -1)"
  kill -TERM "$PID"; wait "$PID" 2>/dev/null || true; PID=""
  echo "$mode $t $((rss / 1024)) $((lck / 1024)) $((hwm / 1024)) $cap"
}

RESULTS="$WORK/results"
for _ in $(seq 1 "$RUNS"); do
  for mode in plaintext sealed; do
    line="$(run_once "$mode")"
    echo "$line" >>"$RESULTS"
    read -r m t rss lck hwm cap <<<"$line"
    echo "  $m: ready after ${t}s; RSS ${rss} MiB (locked ${lck} MiB) when ready, peak ${hwm} MiB after 8 requests; KV cache ${cap} tokens"
  done
done
python3 - "$RESULTS" <<'PY'
import sys
rows = [l.split() for l in open(sys.argv[1])]
for mode in ("plaintext", "sealed"):
    r = [x for x in rows if x[0] == mode]
    t = sorted(float(x[1]) for x in r)
    print(f"{mode}: start-up {t[0]:.2f}-{t[-1]:.2f} s (median {t[len(t)//2]:.2f}); "
          f"RSS {min(int(x[2]) for x in r)}-{max(int(x[2]) for x in r)} MiB; "
          f"peak {max(int(x[4]) for x in r)} MiB; KV {r[0][5]} tokens")
PY
