#!/usr/bin/env bash
# Peer LoRA-training benchmark: your_ai vs PyTorch+PEFT vs mlx-lm on SmolLM2-135M (CPU, fp32,
# 2 threads each). Sets up a Python venv in a cache directory outside the repository, builds
# your_ai in release mode, fetches the model and runs scripts/bench/peer_train.py.
#
#   scripts/bench/peer_train.sh [--steps N] [--json OUT.json] [--no-wait] [--tools your_ai,peft,mlx_openblas,mlx]
#
#   YOUR_AI_CACHE   cache directory (default: ~/.cache/your_ai); the venv is $YOUR_AI_CACHE/bench-venv
#   BENCH_VENV      use this venv instead (it must already have what the .py needs, or gets it)
#   BENCH_SKIP_INSTALL=1   do not pip-install anything (use the venv as it is)
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cache="${YOUR_AI_CACHE:-$HOME/.cache/your_ai}"
venv="${BENCH_VENV:-$cache/bench-venv}"

if [ ! -x "$venv/bin/python" ]; then
  echo "creating venv $venv" >&2
  mkdir -p "$(dirname "$venv")"
  python3 -m venv "$venv"
fi
py="$venv/bin/python"

if [ "${BENCH_SKIP_INSTALL:-0}" != 1 ]; then
  stamp="$venv/.your_ai_bench_installed"
  if [ ! -f "$stamp" ]; then
    "$py" -m pip install --quiet --disable-pip-version-check --upgrade pip >&2
    # torch from PyPI (the CPU is what is measured; the wheel may carry CUDA libraries).
    "$py" -m pip install --quiet --disable-pip-version-check \
      torch transformers peft accelerate gguf safetensors numpy psutil >&2
    # mlx-lm is optional: on Linux mlx has CPU-only wheels (`mlx[cpu]`). Failure is recorded,
    # not fatal; peer_train.py reports the import error for that tool.
    if ! "$py" -m pip install --quiet --disable-pip-version-check "mlx[cpu]" mlx-lm \
        > "$venv/.mlx_install.log" 2>&1; then
      echo "warning: could not install mlx[cpu] + mlx-lm (see $venv/.mlx_install.log); the mlx-lm row will carry the error" >&2
    fi
    touch "$stamp"
  fi
  # The mlx-cpu Linux wheel links the reference (netlib) BLAS; the extra `mlx_openblas` row
  # preloads Debian's OpenBLAS instead. Installed when we are root with apt-get; else skipped.
  if [ ! -e /usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 ] && [ "$(id -u)" = 0 ] \
      && command -v apt-get > /dev/null; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenblas0-pthread; } >&2 \
      || echo "warning: could not install libopenblas0-pthread; the mlx-lm+OpenBLAS row is skipped" >&2
  fi
fi

cd "$repo"
# Release build of your_ai (skipped when the binary is already there and BENCH_NO_BUILD=1).
if [ "${BENCH_NO_BUILD:-0}" != 1 ] || [ ! -x target/release/your_ai ]; then
  cargo build --release >&2
fi
model="$(scripts/fetch_model.sh)"

exec "$py" "$here/peer_train.py" --model "$model" --your-ai "$repo/target/release/your_ai" "$@"
