#!/usr/bin/env bash
# Training speed and peak memory of LoRA on a dense base against --quantize 8 and --quantize 4.
#
# Usage: scripts/bench/qlora_train.sh MODEL [STEPS]
#   MODEL: a dense (f16/bf16/f32) Hugging Face directory or GGUF; a quantized GGUF would keep its
#   own blocks under both --quantize values. `your_ai fuse` of a zero-update adapter onto the
#   SmolLM2 GGUF (--dequantize --hf-dtype f32) gives a dense SmolLM2.
# YOUR_AI_BIN=path uses that binary instead of building a release one.
# Prints, per configuration, the train command's own summary (tokens/s, peak resident memory).
set -euo pipefail
model=${1:?usage: $0 MODEL [STEPS]}
steps=${2:-10}
cd "$(dirname "$0")/../.."
bin=${YOUR_AI_BIN:-target/release/your_ai}
[[ -n ${YOUR_AI_BIN:-} ]] || cargo build --release --quiet
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for q in none 8 4; do
  args=()
  [[ $q != none ]] && args=(--quantize "$q")
  echo "== quantize: $q"
  "$bin" train --model "$model" --data examples/invented-country --output "$tmp/$q" \
    --max-steps "$steps" --batch-size 4 --lora-rank 8 --learning-rate 3e-4 --warmup-steps 2 \
    --max-seq-length 256 --steps-per-eval 0 --val-batches 1 --seed 1 "${args[@]}" 2>&1 |
    grep -E "tokens: |speed: |peak memory|Training finished"
done
