#!/usr/bin/env bash
# Benchmark: model-load time and generation speed for SmolLM2-135M-Instruct (Q4_1 GGUF,
# dequantized to f32) with the release build. Prints one line per run and the medians.
#
#   RUNS   number of runs (default 5)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
model=$(./scripts/fetch_model.sh)
runs="${RUNS:-5}"
loads=(); speeds=()
for i in $(seq "$runs"); do
  # --raw text continuation with --max-tokens 128 so every run generates the same count.
  line=$(target/release/your_ai generate --model "$model" --raw --max-tokens 128 \
    --prompt "The history of the printing press begins" 2>&1 >/dev/null | tail -1)
  echo "run $i: $line"
  loads+=("$(sed -E 's/.*load ([0-9.]+) s.*/\1/' <<<"$line")")
  speeds+=("$(sed -E 's/.* ([0-9.]+) tokens\/s.*/\1/' <<<"$line")")
done
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
echo "median model load: $(median "${loads[@]}") s; median generation: $(median "${speeds[@]}") tokens/s ($(nproc) cores)"
