#!/usr/bin/env bash
# The GPU check, for a machine with an NVIDIA GPU, its driver and a Python
# environment with the CUDA 13 libraries (e.g. PyTorch's nvidia-* wheels), but
# NO Rust toolchain and no network:
#
#   scripts/gpu-check.sh [PACKAGE] [REPORT]
#     PACKAGE  dist/salus-gpu.tar.xz from scripts/gpu-package.sh (or an unpacked dir)
#     REPORT   JSON report path (default $OUT/gpu-report.json, else ./gpu-report.json)
#
# Runs `salus-gpu-check`: paged attention vs a reference attention, CUDA logits
# vs CPU logits (f32 and bf16), continuous-batching equivalence, then the
# throughput benchmark on a synthetic Llama-3-8B-shaped bf16 model (decode at
# batch 1/8/32/128, a 2,048-token prefill, bandwidth fraction at batch 1).
# Extra arguments go to salus-gpu-check via SALUS_GPU_CHECK_ARGS
# (e.g. "--skip-bench" or "--decode-steps 16").
#
# Libraries: LD_LIBRARY_PATH is pointed at the CUDA 13 libraries of the
# Python environment (nvidia.* packages, torch/lib); libcuda.so.1 comes from
# the driver. Never put a libcuda stub on this path.
set -euo pipefail
cd "$(dirname "$0")/.."
PKG=${1:-dist/salus-gpu.tar.xz}
REPORT=${2:-${OUT:-.}/gpu-report.json}
PY=${PYTHON:-python3}

if [ -d "$PKG" ]; then
  ROOT=$PKG
else
  [ -f "$PKG" ] || { echo "gpu-check: package $PKG not found (build it with scripts/gpu-package.sh)" >&2; exit 2; }
  ROOT=$(mktemp -d)/pkg
  mkdir -p "$ROOT"
  "$PY" -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' "$PKG" "$ROOT"
  ROOT=$ROOT/salus-gpu
fi
BIN=$ROOT/bin/salus-gpu-check
[ -x "$BIN" ] || { echo "gpu-check: $BIN missing" >&2; exit 2; }

CUDA_LIBS=$("$PY" - <<'PY'
import glob, os
dirs = []
def add(d):
    if d and os.path.isdir(d) and d not in dirs and "stubs" not in d:
        dirs.append(d)
try:
    import nvidia
    for base in list(nvidia.__path__):
        for lib in sorted(glob.glob(os.path.join(base, "**", "lib*.so*"), recursive=True)):
            add(os.path.dirname(lib))
except Exception:
    pass
try:
    import torch
    add(os.path.join(os.path.dirname(torch.__file__), "lib"))
except Exception:
    pass
print(":".join(dirs))
PY
)
if [ -z "$CUDA_LIBS" ]; then
  echo "gpu-check: found no CUDA libraries in the Python environment ($PY)" >&2
  exit 2
fi
export LD_LIBRARY_PATH="$CUDA_LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "gpu-check: LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
missing=$(ldd "$BIN" | grep "not found" || true)
if [ -n "$missing" ]; then
  echo "gpu-check: unresolved libraries:" >&2
  echo "$missing" >&2
  exit 2
fi
ldd "$BIN" | grep -E "libcuda|nvrtc|cublas|curand|cudart" || true
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
mkdir -p "$(dirname "$REPORT")"
# shellcheck disable=SC2086
"$BIN" --device "${SALUS_GPU_DEVICE:-cuda:0}" --out "$REPORT" ${SALUS_GPU_CHECK_ARGS:-}
