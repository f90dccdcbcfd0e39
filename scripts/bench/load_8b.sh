#!/usr/bin/env bash
# Load and training memory at full scale: a Llama-3.1-8B-shaped checkpoint (random bf16 weights,
# sharded, SmolLM2's tokenizer; made once by make_shaped_model.py, 16 GB on disk) trained for a
# step or two in several configurations. Prints the pre-flight's estimates beside the measured
# peaks of resident memory, for loading and for training, one row per configuration.
#
# Usage: scripts/bench/load_8b.sh [BIN]
#   DIR    where the shaped checkpoint lives (default: models/llama-8b-shaped)
#   SHAPE  a key of presets/model_shapes.json (default: llama-8b)
#   RUNS   space-separated FORMAT:LENGTH[:BUDGET_GB], FORMAT one of q4, q8, bf16
#          (default: "q4:256 q4:256:12 q8:256 bf16:256 q4:2048")
#   STEPS  optimizer steps per run (default: 2)
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=${1:-target/release/your_ai}
shape=${SHAPE:-llama-8b}
dir=${DIR:-models/$shape-shaped}
runs=${RUNS:-"q4:256 q4:256:12 q8:256 bf16:256 q4:2048"}
steps=${STEPS:-2}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

if [ ! -f "$dir/config.json" ]; then
  model=$(./scripts/fetch_model.sh)
  # SmolLM2's tokenizer as a Hugging Face directory: a one-step rank-1 adapter fused into it.
  "$bin" train --model "$model" --data examples/invented-country --output "$tmp/adapter" \
    --max-steps 1 --lora-rank 1 --steps-per-eval 0 --val-batches 0 >"$tmp/log" 2>&1 ||
    { cat "$tmp/log"; exit 1; }
  "$bin" fuse --model "$model" --adapter "$tmp/adapter" --output "$tmp/tokenizer" \
    --format hf >"$tmp/log" 2>&1 || { cat "$tmp/log"; exit 1; }
  python3 scripts/bench/make_shaped_model.py "$shape" "$dir" --tokenizer "$tmp/tokenizer"
fi

# Plain-text rows longer than the longest length asked for, so every batch is full length, as
# the estimate sizes it.
mkdir -p "$tmp/data"
python3 scripts/bench/long_rows.py "$tmp/data/train.jsonl"

printf '%-6s %6s %7s | %9s %9s | %9s %9s | %s\n' format length budget \
  "load est" measured "train est" measured "s/step"
for r in $runs; do
  IFS=: read -r fmt len budget <<<"$r"
  case $fmt in
    q4) flags=(--quantize 4) ;;
    q8) flags=(--quantize 8) ;;
    bf16) flags=(--dtype bf16) ;;
    *) echo "unknown format $fmt in RUNS" >&2; exit 2 ;;
  esac
  [ -n "${budget:-}" ] && flags+=(--max-memory "$budget")
  out="$tmp/run-$fmt-$len-${budget:-auto}"
  if ! "$bin" train --model "$dir" "${flags[@]}" --data "$tmp/data" --output "$out" \
    --max-steps "$steps" --batch-size 1 --lora-rank 16 --max-seq-length "$len" \
    --steps-per-eval 0 --val-batches 0 >"$out.log" 2>&1; then
    printf '%-6s %6s %7s | refused or failed: %s\n' "$fmt" "$len" "${budget:-auto}" \
      "$(grep -m1 -i error "$out.log" || tail -n 1 "$out.log")"
    continue
  fi
  python3 - "$out/metrics.jsonl" "$fmt" "$len" "${budget:-auto}" <<'PY'
import json, sys
recs = [json.loads(l) for l in open(sys.argv[1])]
start = next(r for r in recs if r["type"] == "start")
end = next(r for r in recs if r["type"] == "end")
steps = [r for r in recs if r["type"] == "train"]
gb = lambda b: f"{b / 1e9:9.2f}"
per_step = end["seconds"] / max(1, len(steps))
print(f"{sys.argv[2]:<6} {sys.argv[3]:>6} {sys.argv[4]:>7} | {gb(start['estimate_load_peak_bytes'])} "
      f"{gb(start['load_peak_rss_bytes'])} | {gb(start['estimate_train_peak_bytes'])} "
      f"{gb(end['train_peak_rss_bytes'])} | {per_step:.0f}")
PY
done
