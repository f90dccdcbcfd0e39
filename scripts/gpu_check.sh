#!/usr/bin/env bash
# The GPU check (docs/gpu.md), for a lent NVIDIA GPU machine that has no Rust and no network,
# only PyTorch, PEFT and the CUDA libraries. Two halves:
#
#   scripts/gpu_check.sh prepare   here, with Rust and the network: builds and gathers what the
#                                  check needs into .gpu/ (ignored by git; about 60 MB with both
#                                  GPU paths, small enough to copy along with the repository) and
#                                  prints its size
#   scripts/gpu_check.sh run       there, from a copy of the repository with .gpu/ in it;
#                                  figures go to $OUT (default gpu-check-out/), the table to
#                                  stdout
#
# `run` takes each GPU path in turn (the candle CUDA binary; MLX's CUDA build where .gpu/ has
# it), then PyTorch+PEFT on the same GPU:
#   1. SmolLM2 (its first LAYERS blocks: its weights, the embedding re-quantized to Q4_1; its
#      tokenizer and chat template) trained 20
#      steps in f32 on the shipped example: the losses must equal those of the CPU run that
#      `prepare` made, within 1e-3 relative. Then 3 steps with --quantize 4 must run.
#   2. An 8B-shaped LoRA step: Llama-3.1-8B's shapes, random bf16 weights made there by
#      scripts/bench/make_shaped_model.py; rank 16, length 2048, batch 1, STEPS steps. Tokens/s
#      (median step after the first two) and peak GPU memory (nvidia-smi every 200 ms, less
#      what was in use before), against scripts/gpu/peft_step.py on the same tokens (the
#      first losses agree: the same workload).
#   3. scripts/memory_check.sh with the candle binary on the GPU: estimates against measured
#      peaks, flat steps, a budget crossed mid-run and the resume after it.
# It exits non-zero when a check fails, after reporting everything it could.
#
#   GPU_CHECK_MLX=0  leave MLX's CUDA build out (prepare)
#   LAYERS  SmolLM2 blocks taken along (prepare; default 2 keeps .gpu/ under 64 MiB: the whole
#           model is 98 MB)
#   STEPS   steps of the 8B-shaped runs (default 8)
#   GPU_CHECK_DEVICE=cpu   a rehearsal here without a GPU: the CPU binary, one 8B-shaped block
#           and 128 tokens. It checks the script, not a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { echo "gpu_check: $*" >&2; }
bundle=.gpu
smol_flags=(--data examples/invented-country --dtype f32 --batch-size 2 --max-seq-length 256
  --lora-rank 8 --learning-rate 1e-3 --seed 7 --steps-per-eval 0 --val-batches 0)

prepare() {
  local cache venv model cpu bin layers=${LAYERS:-2}
  cache="${YOUR_AI_CACHE:-$HOME/.cache/your_ai}"
  venv="$cache/gpu-check-venv"
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check gguf==0.19.0 numpy >&2
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  mkdir -p "$tmp/bundle/tokenizer"

  model=$(./scripts/fetch_model.sh)
  # Its first blocks, the embedding in Q4_1 (the file's is Q8_0, 30 MB of its 98).
  "$venv/bin/python" scripts/gpu/smollm2_slice.py "$model" "$tmp/bundle/smollm2.gguf" \
    --layers "$layers" --embedding q4_1
  say "building the CPU binary; the reference run"
  cargo build --release --quiet
  cpu=target/release/your_ai
  "$cpu" train --model "$tmp/bundle/smollm2.gguf" "${smol_flags[@]}" --device cpu \
    --max-steps 20 --output "$tmp/cpu" >"$tmp/cpu.log" 2>&1 || { cat "$tmp/cpu.log"; exit 1; }
  cp "$tmp/cpu/metrics.jsonl" "$tmp/bundle/cpu_metrics.jsonl"
  # A Hugging Face tokenizer for the 8B-shaped model: SmolLM2's, from a fused copy.
  "$cpu" fuse --model "$tmp/bundle/smollm2.gguf" --adapter "$tmp/cpu" --output "$tmp/fused" \
    --format hf --dequantize >"$tmp/fuse.log" 2>&1 || { cat "$tmp/fuse.log"; exit 1; }
  for f in tokenizer.json tokenizer_config.json chat_template.jinja config.json; do
    [ -f "$tmp/fused/$f" ] && cp "$tmp/fused/$f" "$tmp/bundle/tokenizer/"
  done

  if [ "${GPU_CHECK_DEVICE:-cuda}" = cpu ]; then
    say "a rehearsal: no CUDA binary"
  else
    say "building the candle CUDA binary (scripts/build_cuda.sh)"
    # Each build in its own folder (their binaries differ).
    bin=$(env -u CARGO_TARGET_DIR ./scripts/build_cuda.sh)
    xz -T2 -6 -c "$bin" >"$tmp/bundle/your_ai-cuda.xz"
  fi

  if [ "${GPU_CHECK_DEVICE:-cuda}" != cpu ] && [ "${GPU_CHECK_MLX:-1}" = 1 ]; then
    say "building the MLX CUDA binary (scripts/build_mlx.sh --cuda)"
    local mlx_bin wheel="$cache/mlx-cuda-13-0.32.4" m="$tmp/mlx-cuda"
    mlx_bin=$(env -u CARGO_TARGET_DIR ./scripts/build_mlx.sh --cuda)
    mkdir -p "$m/mlx/lib"
    cp "$mlx_bin" "$m/your_ai"
    # libmlx.so without symbols and with only the H100/H200's device code: 146 MB → 15 MB of xz.
    strip --strip-all -o "$m/mlx/lib/libmlx.so" "$wheel/mlx/lib/libmlx.so"
    python3 scripts/gpu/prune_fatbin.py "$m/mlx/lib/libmlx.so" 90
    # The headers its run-time compiled kernels include, and the BLAS it links.
    cp -r "$wheel/mlx/include" "$m/mlx/"
    cp -r "$wheel/mlx_cuda_13.libs" "$m/"
    tar -C "$m" -cf - your_ai mlx mlx_cuda_13.libs | xz -9 -T2 >"$tmp/bundle/mlx-cuda.tar.xz"
  fi

  rm -rf "$bundle"
  mv "$tmp/bundle" "$bundle"
  du -sh "$bundle" >&2
  say "copy the repository with .gpu/ to the GPU machine and run: scripts/gpu_check.sh run"
}

# nvidia-smi's memory in use now (MiB); 0 without one.
smi_now() {
  command -v nvidia-smi >/dev/null || { echo 0; return; }
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -n 1
}

# Runs "$@" while nvidia-smi samples the GPU's memory into $1's log; the command is "${@:2}".
sampled() {
  local log=$1 pid=""
  shift
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 >"$log" &
    pid=$!
  else
    : >"$log"
  fi
  local rc=0
  "$@" || rc=$?
  [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  return $rc
}

run() {
  local device=${GPU_CHECK_DEVICE:-cuda} out=${OUT:-gpu-check-out}
  local work=${GPU_CHECK_WORK:-/tmp/gpu_check} steps=${STEPS:-8} length=2048 layers=()
  local results failed=0 t
  [ -f "$bundle/cpu_metrics.jsonl" ] ||
    { say "error: no $bundle/: run 'scripts/gpu_check.sh prepare' first, and copy $bundle/ here"; exit 1; }
  mkdir -p "$out" "$work"
  results="$out/gpu_check.jsonl"
  : >"$results"
  declare -A bin engine
  if [ "$device" = cpu ]; then
    bin[candle]=target/release/your_ai
    [ -x "${bin[candle]}" ] || cargo build --release --quiet
    length=128 steps=3 layers=(--layers 1)
  else
    xz -dc "$bundle/your_ai-cuda.xz" >"$work/your_ai-cuda"
    chmod +x "$work/your_ai-cuda"
    bin[candle]=$work/your_ai-cuda
    # The CUDA libraries come from PyTorch's wheels (nvidia/*/lib in its site-packages), and
    # the driver's libcuda from wherever PyTorch finds it.
    local libs driver
    libs=$(python3 -c 'import glob, os, nvidia; print(":".join(sorted(glob.glob(os.path.join(list(nvidia.__path__)[0], "*", "lib")))))') ||
      { say "error: python3 has no NVIDIA CUDA wheels (PyTorch's cu13 build installs them)"; exit 1; }
    driver=$(python3 -c 'import os, torch; torch.cuda.init(); print(next(os.path.dirname(l.split()[-1]) for l in open("/proc/self/maps") if "libcuda.so" in l))') ||
      { say "error: PyTorch finds no CUDA driver here"; exit 1; }
    export LD_LIBRARY_PATH="$libs:$driver${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    { date -u; nvidia-smi -L; nvidia-smi --query-gpu=driver_version --format=csv,noheader
      python3 -c 'import torch, transformers, peft; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__)'
    } >"$out/machine.txt" 2>&1 || true
  fi
  engine[candle]=candle
  local tools=(candle)
  if [ "$device" != cpu ] && [ -f "$bundle/mlx-cuda.tar.xz" ]; then
    # MLX's CUDA build as its wheel lays it out: libmlx.so finds the CUDA libraries and headers
    # through ../../nvidia from its folder, here a link to PyTorch's.
    local m="$work/mlx-cuda"
    rm -rf "$m"
    mkdir -p "$m"
    tar -C "$m" -xJf "$bundle/mlx-cuda.tar.xz"
    ln -sfn "$(python3 -c 'import nvidia; print(list(nvidia.__path__)[0])')" "$m/nvidia"
    printf '#!/bin/sh\nLD_LIBRARY_PATH="%s/mlx/lib:$LD_LIBRARY_PATH" exec "%s/your_ai" "$@"\n' \
      "$m" "$m" >"$m/run"
    chmod +x "$m/run"
    bin[mlx]=$m/run
    engine[mlx]=mlx
    tools+=(mlx)
  fi

  fail() { # tool, what, log
    failed=1
    local why
    why=$(grep -m1 -E "[Ee]rror|panicked|^FAIL" "$3" 2>/dev/null || tail -n 1 "$3" 2>/dev/null || echo "no log")
    say "$1: $2 failed: $why"
    python3 -c 'import json, sys; print(json.dumps({"check": "error", "tool": sys.argv[1], "what": sys.argv[2], "error": sys.argv[3][:300]}))' \
      "$1" "$2" "$why" >>"$results"
  }

  # 1. SmolLM2 against the CPU, and --quantize 4.
  for t in "${tools[@]}"; do
    local o="$work/smol-$t"
    rm -rf "$o" "$o-q4"
    if timeout 120 "${bin[$t]}" train --engine "${engine[$t]}" --model "$bundle/smollm2.gguf" \
      "${smol_flags[@]}" --device "$device" --max-steps 20 --output "$o" >"$o.log" 2>&1; then
      python3 scripts/gpu/report.py losses "$bundle/cpu_metrics.jsonl" "$o/metrics.jsonl" \
        --tol 1e-3 --name "$t" >>"$results" || fail "$t" "SmolLM2 losses" "$o.log"
    else
      fail "$t" "SmolLM2 run" "$o.log"
    fi
    if ! timeout 120 "${bin[$t]}" train --engine "${engine[$t]}" --model "$bundle/smollm2.gguf" \
      "${smol_flags[@]}" --device "$device" --max-steps 3 --quantize 4 --output "$o-q4" \
      >"$o-q4.log" 2>&1; then
      fail "$t" "SmolLM2 --quantize 4" "$o-q4.log"
    fi
  done

  # 2. The 8B-shaped step.
  local shaped="$work/llama-8b-shaped"
  if [ ! -f "$shaped/config.json" ]; then
    say "writing the 8B-shaped model"
    python3 scripts/bench/make_shaped_model.py llama-8b "$shaped" --tokenizer "$bundle/tokenizer" \
      "${layers[@]}" >"$work/shaped.log" 2>&1 || { cat "$work/shaped.log"; exit 1; }
  fi
  mkdir -p "$work/data"
  # One row, so every tool trains on the same 2048 tokens and their first losses compare.
  python3 scripts/bench/long_rows.py "$work/data/train.jsonl" --rows 1
  local idle
  for t in "${tools[@]}"; do
    local o="$work/8b-$t"
    rm -rf "$o"
    idle=$(smi_now)
    if sampled "$o.smi" timeout 240 "${bin[$t]}" train --engine "${engine[$t]}" --model "$shaped" \
      --data "$work/data" --device "$device" --dtype bf16 --batch-size 1 \
      --max-seq-length "$length" --lora-rank 16 --max-steps "$steps" --learning-rate 1e-4 \
      --lr-schedule constant --warmup-steps 0 --steps-per-eval 0 --val-batches 0 \
      --output "$o" >"$o.log" 2>&1; then
      python3 scripts/gpu/report.py train "$o/metrics.jsonl" --name "your_ai $t" \
        --smi "$o.smi" --idle "$idle" >>"$results"
    else
      fail "$t" "8B-shaped step" "$o.log"
    fi
  done
  idle=$(smi_now)
  if ! sampled "$work/peft.smi" timeout 240 python3 scripts/gpu/peft_step.py "$shaped" \
    "$work/data/train.jsonl" --rank 16 --length "$length" --steps "$steps" --device "$device" \
    >"$work/peft.jsonl" 2>"$work/peft.log"; then
    fail "PyTorch+PEFT" "8B-shaped step" "$work/peft.log"
  fi
  cat "$work/peft.jsonl" >>"$results"

  # 3. The memory contract on the GPU (candle's measure there is the GPU's memory in use). The
  # estimate's fixed allowances are a larger share of a two-block model's peaks: on the CPU its
  # estimates run up to 17% over the measured peak, so the bar is 25% here, not 15%.
  if ! BAR=0.25 timeout 300 scripts/memory_check.sh "${bin[candle]}" "$bundle/smollm2.gguf" "$device" \
    "$([ "$device" = cpu ] && echo f32 || echo bf16)" >"$work/memory-check.log" 2>&1; then
    fail candle "memory contract (scripts/memory_check.sh)" "$work/memory-check.log"
  fi

  python3 scripts/gpu/report.py table "$results" | tee "$out/gpu_check.md"
  # The logs' tails in one file, beside the table.
  for f in "$work"/*.log; do
    echo "== $(basename "$f")"
    tail -n 60 "$f"
  done >"$out/logs.txt"
  return $failed
}

case "${1:-}" in
  prepare) prepare ;;
  run) run ;;
  *) echo "usage: $0 prepare|run   (see the top of this file)" >&2; exit 2 ;;
esac
