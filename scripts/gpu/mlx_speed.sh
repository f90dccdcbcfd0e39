#!/usr/bin/env bash
# Where the MLX engine's step time goes on a GPU: short runs of the bundled MLX CUDA binary
# (scripts/gpu_check.sh prepare) on an 8-block model of Llama-3.1-8B's shapes, across lengths,
# evaluation modes and MLX's settings, with PyTorch+PEFT on the same model and tokens. One JSON
# line per run on stdout (scripts/gpu/report.py's), and the logs' tails in $OUT/speed-logs.txt.
#
#   scripts/gpu/mlx_speed.sh [RUN...]   RUN: NAME:LENGTH[:VAR=VALUE,...] for MLX (VAR=VALUE are
#                                       environment settings; keep=N sets --keep-activations,
#                                       quantize=N --quantize),
#                                       peft:LENGTH[:...] for PyTorch+PEFT; the setting `trace`
#                                       records each kernel's GPU time (scripts/gpu/kernel_trace.c)
#                                       into $OUT/trace-NAME-LENGTH.tsv; bin=base runs the binary
#                                       of the revision prepare was given as GPU_CHECK_BASE
#   default: the engine's step at three lengths beside PEFT, block by block, and recomputing
#   LAYERS (8), STEPS (10), SPEED_SECONDS (240: later runs are skipped)
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-gpu-check-out} work=${GPU_CHECK_WORK:-/tmp/gpu_check}
layers=${LAYERS:-8} steps=${STEPS:-10} end=$((SECONDS + ${SPEED_SECONDS:-240}))
mkdir -p "$out" "$work/speed-data"
model="$work/llama-8b-shaped-$layers"
[ -f "$model/config.json" ] || python3 scripts/bench/make_shaped_model.py llama-8b "$model" \
  --tokenizer .gpu/tokenizer --layers "$layers" --shard-bytes 2000000000 >&2 || exit 1
python3 scripts/bench/long_rows.py "$work/speed-data/train.jsonl" --rows 1 --words 8000
runs=("$@")
# The engine's default (pipelined, products kept), then what it is compared with. (Raising
# MLX_MAX_OPS_PER_BUFFER to 1000 made no step in under a minute on the H200: left out.)
[ ${#runs[@]} -gt 0 ] || runs=(mlx:2048 peft:2048 mlx:512 peft:512
  block:2048:YOUR_AI_MLX_EVAL=block recompute:2048:keep=none mlx:4096)
: >"$out/speed-logs.txt"
for run in "${runs[@]}"; do
  IFS=: read -r name length settings <<<"$run"
  left=$((end - SECONDS))
  [ "$left" -gt 20 ] || { echo "{\"run\": \"$run\", \"skipped\": true}"; continue; }
  o="$work/speed-$name-$length"
  rm -rf "$o"
  env=() keep=auto tool=mlx quant=()
  IFS=, read -ra pairs <<<"${settings:-}"
  for p in "${pairs[@]}"; do
    case "$p" in
      keep=*) keep=${p#keep=} ;;
      quantize=*) quant=(--quantize "${p#quantize=}") ;;
      bin=base) tool=mlx-base ;;
      trace)
        t="$work/trace"
        [ -f "$t/libcupti.so.13" ] || { mkdir -p "$t" && cp .gpu/trace/kernel_trace.so "$t/" &&
          xz -dc .gpu/trace/libcupti.so.13.xz >"$t/libcupti.so.13"; }
        env+=("KERNEL_TRACE=$out/trace-$name-$length.tsv"
          "LD_PRELOAD=$t/libcupti.so.13 $t/kernel_trace.so") ;;
      ?*) env+=("$p") ;;
    esac
  done
  if [ "$name" = peft ]; then
    timeout "$((left < 90 ? left : 90))" env "${env[@]}" python3 scripts/gpu/peft_step.py "$model" \
      "$work/speed-data/train.jsonl" --rank 16 --length "$length" --steps "$steps" \
      2>"$o.log" | sed "s/^{/{\"run\": \"$run\", /"
  else
    timeout "$((left < 90 ? left : 90))" env "${env[@]}" scripts/gpu_check.sh tool "$tool" train \
      --engine mlx --model "$model" --data "$work/speed-data" --device cuda --dtype bf16 \
      --batch-size 1 --max-seq-length "$length" --lora-rank 16 --max-steps "$steps" \
      --learning-rate 1e-4 --lr-schedule constant --warmup-steps 0 --steps-per-eval 0 \
      --val-batches 0 --keep-activations "$keep" "${quant[@]}" --output "$o" >"$o.log" 2>&1
    python3 scripts/gpu/report.py train "$o/metrics.jsonl" --name "$run" 2>>"$o.log" ||
      echo "{\"run\": \"$run\", \"failed\": true}"
  fi
  { echo "== $run"; tr '\r' '\n' <"$o.log" | grep -v '^\[' | tail -n 25; } >>"$out/speed-logs.txt"
done
