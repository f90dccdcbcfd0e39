#!/usr/bin/env bash
# Runs every test: fetches the real test model if needed, then the unit, integration and CLI
# tests; then the MLX engine's (the `mlx` feature, on MLX's CPU backend): the build script
# installs what that build needs (cmake, libclang, the pinned mlx-cpu wheel), and the feature is
# linted and its tests run. It also installs the pinned `openai` Python client the server's tests
# use, and type-checks the crate for macOS on Apple silicon. This is the command the README
# names and `.ci/run` calls.
#
#   YOUR_AI_SKIP_MLX=1     skip the MLX part (a machine where it cannot be set up)
#   YOUR_AI_SKIP_MACOS=1   skip type-checking the macOS build (scripts/check_macos.sh)
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/fetch_model.sh >/dev/null
# The official `openai` Python client, which tests/serve.rs and tests/serve_tools.rs drive the
# server with: pinned, and installed into a folder of its own (no virtual environment needed).
pydeps=.venv/openai-3.57.0
if [ ! -d "$pydeps" ]; then
  rm -rf "$pydeps.partial"
  PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check \
    --no-warn-conflicts --target "$pydeps.partial" openai==3.57.0 >&2
  python3 -c "import sys; sys.path.insert(0, '$pydeps.partial'); import openai" ||
    { echo "error: could not install the openai client into $pydeps" >&2; exit 1; }
  mv "$pydeps.partial" "$pydeps"
fi
cargo fmt --all -- --check
cargo clippy --all-targets --quiet -- -D warnings
cargo test --all-targets --no-fail-fast

# Apple silicon is where most users train, and no machine here is a Mac: the crate is at least
# type-checked for it (scripts/check_macos.sh says what that covers).
if [ -n "${YOUR_AI_SKIP_MACOS:-}" ]; then
  echo "macOS check: skipped (YOUR_AI_SKIP_MACOS is set)"
else
  ./scripts/check_macos.sh
fi

if [ -n "${YOUR_AI_SKIP_MLX:-}" ]; then
  echo "MLX engine: skipped (YOUR_AI_SKIP_MLX is set)"
  exit 0
fi
MLX_SYS_MLX_DIR="$(./scripts/build_mlx.sh --setup | tail -n 1)"
export MLX_SYS_MLX_DIR
cargo clippy --all-targets --features mlx --quiet -- -D warnings
# Only what the feature adds: the library's MLX tests, and the integration tests named mlx_*.
mlx_tests=()
for t in tests/mlx_*.rs; do
  [ -e "$t" ] && mlx_tests+=(--test "$(basename "$t" .rs)")
done
cargo test --features mlx --no-fail-fast --lib "${mlx_tests[@]}" -- mlx
