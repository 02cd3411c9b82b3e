#!/usr/bin/env bash
# Builds the CUDA release binaries on this (GPU-less) machine and packages them
# for a GPU machine that has no Rust toolchain and no network:
#
#   scripts/gpu-package.sh [OUT_FILE]        # default dist/salus-gpu.tar.xz
#
# - `--features cuda`, CUDA_COMPUTE_CAP (default 90 = H100/H200) for candle's
#   own kernels (nvcc from the CUDA 13.0 wheels, see scripts/cuda-build-check.sh);
#   Salus' paged-attention kernels are compiled on the GPU machine by NVRTC.
# - `salus` and `salus-gpu-check`, stripped, in one xz-compressed tar (the
#   embedded PTX compresses well); the script fails if it exceeds 64 MiB.
# Then copy it to the GPU machine and run scripts/gpu-check.sh there.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_FILE=${1:-dist/salus-gpu.tar.xz}
TOOLKIT_ENV=${CUDA_TOOLKIT_ENV:-/work/shared/tools/cuda-toolkit-env.sh}
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
eval "$(bash "$TOOLKIT_ENV" env)"
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export CARGO_TARGET_DIR="${SALUS_CUDA_TARGET_DIR:-$HOME/.cache/salus/target-cuda}"
t0=$(date +%s)
cargo build --locked --release --features cuda --bin salus --bin salus-gpu-check
echo "gpu-package: release build took $(( $(date +%s) - t0 )) s" >&2
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/salus-gpu/bin"
for b in salus salus-gpu-check; do
  cp "$CARGO_TARGET_DIR/release/$b" "$stage/salus-gpu/bin/$b"
  strip "$stage/salus-gpu/bin/$b"
done
git rev-parse HEAD > "$stage/salus-gpu/COMMIT" 2>/dev/null || echo unknown > "$stage/salus-gpu/COMMIT"
echo "CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP" > "$stage/salus-gpu/BUILD"
mkdir -p "$(dirname "$OUT_FILE")"
tar -C "$stage" -cf - salus-gpu | xz -T0 -6 > "$OUT_FILE"
size=$(stat -c %s "$OUT_FILE")
echo "gpu-package: $OUT_FILE is $(( size / 1024 / 1024 )) MiB" >&2
if [ "$size" -gt $(( 64 * 1024 * 1024 )) ]; then
  echo "gpu-package: larger than 64 MiB" >&2
  exit 1
fi
