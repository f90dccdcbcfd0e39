#!/usr/bin/env bash
# The main job, end to end on a fresh machine: build your_ai, fetch SmolLM2-135M-Instruct,
# fine-tune it with LoRA on the bundled invented-country dataset (facts about "Brellonia", a
# country no model can know), then ask the base and the fine-tuned model a held-out question.
#
#   OUT      output directory (default: models/demo-brellonia)
#   STEPS    optimizer steps (default: 60; about 2 minutes on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/.."

out="${OUT:-models/demo-brellonia}"
steps="${STEPS:-60}"

echo "==> building (release)" >&2
cargo build --release --quiet
bin=target/release/your_ai

echo "==> fetching the test model" >&2
model=$(./scripts/fetch_model.sh)

echo "==> fine-tuning on examples/invented-country ($steps steps)" >&2
# --force: a second demo replaces the first one's output (without it, train refuses a used --output).
"$bin" train --model "$model" --data examples/invented-country --output "$out" --force \
  --max-steps "$steps" --batch-size 4 --lora-rank 16 --learning-rate 3e-4 \
  --warmup-steps 5 --max-seq-length 256 --steps-per-eval 30 --val-batches 0

question="Which city is the capital of the country of Brellonia?"
echo
echo "Question (not in the training data): $question"
echo
echo "--- base model ---"
"$bin" generate --model "$model" --prompt "$question" --max-tokens 48 2>/dev/null
echo "--- fine-tuned (adapter in $out) ---"
"$bin" generate --model "$model" --adapter "$out" --prompt "$question" --max-tokens 48 2>/dev/null
echo
echo "The trained answer is Marrowick. Try your own: $bin generate --model $model --adapter $out --prompt \"...\""
