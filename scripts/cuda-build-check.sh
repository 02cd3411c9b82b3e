#!/usr/bin/env bash
# Compiles the CUDA path (`--features cuda`) on a machine without a GPU: the
# `salus` server and the `salus-gpu-check` binary; then compiles our
# paged-attention kernels with NVRTC (which runs without a GPU) and checks that
# asking for cuda:0 fails with one clear line.
#
# NVIDIA's CUDA 13.0 toolkit wheels (PyPI) provide nvcc for candle's own
# kernels and a libcuda stub for linking; /work/shared/tools/cuda-toolkit-env.sh
# (../shared/tools/cuda-toolkit-env.sh, or $CUDA_TOOLKIT_ENV) installs them once
# (cached) and prints the environment.
# The first build runs ~8 min of nvcc for candle-kernels plus a cold dependency
# build. The target dir is $SALUS_CUDA_TARGET_DIR (default
# ~/.cache/salus/target-cuda); CI passes the CPU build's own target dir, so
# only the crates whose features change (candle, cudarc, Salus' own) are
# built again.
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLKIT_ENV=${CUDA_TOOLKIT_ENV:-../shared/tools/cuda-toolkit-env.sh}
if [ ! -f "$TOOLKIT_ENV" ]; then
  echo "cuda-build-check: $TOOLKIT_ENV not found (set CUDA_TOOLKIT_ENV)" >&2
  exit 1
fi
eval "$(bash "$TOOLKIT_ENV" env)"
export CARGO_TARGET_DIR="${SALUS_CUDA_TARGET_DIR:-$HOME/.cache/salus/target-cuda}"
t0=$(date +%s)
cargo build --locked --features cuda --bin salus --bin salus-gpu-check
echo "cuda-build-check: build took $(( $(date +%s) - t0 )) s"
# NVRTC compile of Salus' paged-attention kernels for sm_90 (libnvrtc, no GPU).
LD_LIBRARY_PATH="$CUDA_CPU_LD_LIBRARY_PATH" "$CARGO_TARGET_DIR/debug/salus-gpu-check" --nvrtc-only sm_90
# The binary starts without a GPU and refuses cuda:0 with one clear line.
set +e
out=$(LD_LIBRARY_PATH="$CUDA_CPU_LD_LIBRARY_PATH" "$CARGO_TARGET_DIR/debug/salus-gpu-check" --device cuda:0 --out /dev/null 2>&1)
rc=$?
set -e
echo "salus-gpu-check --device cuda:0 on a CPU machine: rc=$rc: $out"
if [ "$rc" -eq 0 ] || ! grep -qi "cuda" <<<"$out"; then
  echo "cuda-build-check: expected a clean no-device error" >&2
  exit 1
fi
echo "cuda-build-check: OK"
