#!/usr/bin/env bash
# A GuideLLM concurrency sweep against Salus on the default model, and the same
# sweep against llama-server on the same GGUF when one is built: what a team
# evaluating Salus would run. Not part of CI (GuideLLM pulls torch: ~3 GB).
#
#   scripts/guidellm-sweep.sh               # Salus, then llama-server if built
#   TARGETS=salus scripts/guidellm-sweep.sh
#
# Environment (defaults):
#   STREAMS=1,4,8,16         concurrent streams of the sweep
#   PROMPT_TOKENS=256        synthetic prompt length (GuideLLM counts it with the model's tokenizer)
#   OUTPUT_TOKENS=128        tokens per answer
#   REQUESTS=32              requests per concurrency level
#   TARGETS="salus llama"    what to measure
#   GUIDELLM_VENV=~/.cache/salus/guidellm-venv
#   LLAMA_SERVER=/tmp/peers/llama-build/bin/llama-server  (../shared/peers/build_llama_server.sh builds it)
#   OUT=target/guidellm      JSON reports and a summary table
#
# GuideLLM needs the model's tokenizer to build prompts of a given length; a
# hospital network has no model hub, so the script writes it from the GGUF
# itself (transformers' GGUF reader) into the output directory.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
STREAMS="${STREAMS:-1,4,8,16}"
PROMPT_TOKENS="${PROMPT_TOKENS:-256}"
OUTPUT_TOKENS="${OUTPUT_TOKENS:-128}"
REQUESTS="${REQUESTS:-32}"
TARGETS="${TARGETS:-salus llama}"
VENV="${GUIDELLM_VENV:-$HOME/.cache/salus/guidellm-venv}"
LLAMA_SERVER="${LLAMA_SERVER:-/tmp/peers/llama-build/bin/llama-server}"
OUT="${OUT:-$ROOT/target/guidellm}"
mkdir -p "$OUT"

if [ ! -x "$VENV/bin/guidellm" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "guidellm==0.8.1" "gguf>=0.17"
fi
MODEL="$("$ROOT/scripts/fetch-model.sh")"
TOKENIZER="$OUT/tokenizer"
if [ ! -f "$TOKENIZER/tokenizer.json" ]; then
  "$VENV/bin/python" - "$MODEL" "$TOKENIZER" <<'EOF'
import os, sys
from transformers import AutoTokenizer
model, out = sys.argv[1], sys.argv[2]
AutoTokenizer.from_pretrained(os.path.dirname(model), gguf_file=os.path.basename(model)).save_pretrained(out)
EOF
fi

WORK="$(mktemp -d)"
chmod 700 "$WORK"
SERVER_PID=""
stop_server() {
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  SERVER_PID=""
}
trap 'stop_server; rm -rf "$WORK"' EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_healthy() { # url, curl args…
  local url="$1"; shift
  for _ in $(seq 1 120); do
    if curl -sf "$@" "$url" >/dev/null 2>&1; then return 0; fi
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then echo "guidellm-sweep: the server exited during start-up" >&2; return 1; fi
    sleep 1
  done
  echo "guidellm-sweep: the server did not become healthy" >&2; return 1
}
sweep() { # name, target, model id, api key (or "")
  local name="$1" target="$2" model="$3" key="$4" backend
  backend="kind=openai_http,target=$target,model=$model"
  [ -n "$key" ] && backend="$backend,api_key=$key"
  "$VENV/bin/guidellm" run --backend "$backend" \
    --profile kind=concurrent,streams=1 --override profile.streams "$STREAMS" \
    --constraint "kind=max_requests,count=$REQUESTS" \
    --tokenizer "kind=huggingface_auto,model=$TOKENIZER" \
    --data "kind=synthetic_text,prompt_tokens=$PROMPT_TOKENS,output_tokens=$OUTPUT_TOKENS" \
    --output "kind=json,path=$OUT/$name.json" --disable-console-interactive >"$OUT/$name.txt" 2>&1 \
    || { echo "guidellm-sweep: GuideLLM failed against $name (see $OUT/$name.txt)" >&2; tail -20 "$OUT/$name.txt" >&2; return 1; }
  echo "guidellm-sweep: $name done ($OUT/$name.json)"
}

for t in $TARGETS; do
  case "$t" in
    salus)
      (cd "$ROOT" && cargo build --quiet --release --bin salus)
      BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/salus"
      openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 \
        -subj "/CN=localhost" -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
        -keyout "$WORK/key.pem" -out "$WORK/cert.pem" 2>/dev/null
      chmod 600 "$WORK/key.pem"
      KEY="$("$BIN" keys --api-keys "$WORK/keys.json" create --principal guidellm --kind service --role inference 2>/dev/null)"
      "$BIN" audit keygen "$WORK/audit.key" >/dev/null
      PORT="$(free_port)"
      SALUS_MODEL__ALLOW_PLAINTEXT_WEIGHTS=true SALUS_MODEL__ID=smollm2-135m \
      SALUS_AUDIT__DIR="$WORK/audit" SALUS_AUDIT__KEY="file:$WORK/audit.key" \
        "$BIN" serve --listen "127.0.0.1:$PORT" --model "$MODEL" \
          --tls-cert "$WORK/cert.pem" --tls-key "$WORK/key.pem" --api-keys "$WORK/keys.json" \
          >"$OUT/salus.server.log" 2>&1 &
      SERVER_PID=$!
      wait_healthy "https://127.0.0.1:$PORT/health" --cacert "$WORK/cert.pem"
      # GuideLLM's HTTP client (httpx) trusts SSL_CERT_FILE: Salus speaks TLS only.
      SSL_CERT_FILE="$WORK/cert.pem" sweep salus "https://127.0.0.1:$PORT" smollm2-135m "$KEY"
      stop_server
      ;;
    llama)
      if [ ! -x "$LLAMA_SERVER" ]; then
        echo "guidellm-sweep: no llama-server at $LLAMA_SERVER (build it with ../shared/peers/build_llama_server.sh); skipped" >&2
        continue
      fi
      PORT="$(free_port)"
      "$LLAMA_SERVER" -m "$MODEL" --host 127.0.0.1 --port "$PORT" -t 2 -tb 2 --parallel 16 --cont-batching \
        -c 8192 -a smollm2-135m >"$OUT/llama.server.log" 2>&1 &
      SERVER_PID=$!
      wait_healthy "http://127.0.0.1:$PORT/health"
      sweep llama "http://127.0.0.1:$PORT" smollm2-135m ""
      stop_server
      ;;
    *) echo "guidellm-sweep: unknown target $t (salus, llama)" >&2; exit 2 ;;
  esac
done

# One table: per target and concurrency, output tok/s, TTFT and ITL medians.
python3 - "$OUT" $TARGETS <<'EOF'
import json, os, sys
out, targets = sys.argv[1], sys.argv[2:]
print(f"{'target':<8} {'streams':>7} {'out tok/s':>10} {'TTFT p50 ms':>12} {'ITL p50 ms':>11} {'req ok':>7}")
for t in targets:
    path = os.path.join(out, f"{t}.json")
    if not os.path.exists(path):
        continue
    for b in json.load(open(path))["benchmarks"]:
        m = b["metrics"]
        streams = b["config"]["strategy"].get("streams", "?")
        tps = m["output_tokens_per_second"]["successful"]["mean"]
        ttft = m["time_to_first_token_ms"]["successful"]["median"]
        itl = m["inter_token_latency_ms"]["successful"]["median"]
        ok = m["request_totals"]["successful"]
        print(f"{t:<8} {streams:>7} {tps:>10.1f} {ttft:>12.1f} {itl:>11.2f} {ok:>7}")
EOF
