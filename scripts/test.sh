#!/usr/bin/env bash
# Runs every test: fetches the real test model if needed, then the unit, integration and CLI
# tests. This is the command the README names and `.ci/run` calls.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/fetch_model.sh >/dev/null
cargo fmt --all -- --check
cargo clippy --all-targets --quiet -- -D warnings
cargo test --all-targets --no-fail-fast
