#!/usr/bin/env bash
# The memory contract on one device, end to end, with a built binary: `benchmark`'s measured
# peaks against the pre-flight estimates (rows of exactly the length, as the estimate assumes),
# flat memory over a real run's steps, and a budget crossed mid-run (train --test-memory-limit)
# that must stop with exit 3 and a checkpoint that resumes to the uninterrupted run's losses. The
# measure is resident memory, or under ENGINE=mlx MLX's (on a GPU its device memory; its flat
# check reads the process's resident memory too); the same script runs here on the CPU and on a
# GPU machine (which needs only this script, the binary and the model: no toolchain).
#
# Usage: scripts/memory_check.sh BIN MODEL [DEVICE] [DTYPE]
#   DEVICE: cpu (default) | cuda | metal     DTYPE: f32 (default) | bf16 | f16
#   BAR     how far an estimate may be from the measured peak (default 0.15; a model of a few
#           blocks needs more, as the estimate's fixed allowances weigh more in its small peaks)
#   ENGINE  candle (default) | mlx: under MLX the flat check reads MLX's active memory
# Prints one line per check and exits 1 if one fails.
set -euo pipefail
bin=${1:?usage: $0 BIN MODEL [DEVICE] [DTYPE]}
model=${2:?usage: $0 BIN MODEL [DEVICE] [DTYPE]}
device=${3:-cpu}
dtype=${4:-f32}
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

engine=${ENGINE:-candle}

train() {
  "$bin" train --engine "$engine" --model "$model" --device "$device" --dtype "$dtype" \
    --data examples/invented-country --batch-size 4 --lora-rank 8 --max-seq-length 256 \
    --learning-rate 3e-4 --warmup-steps 2 --steps-per-eval 0 --val-batches 0 --seed 1 \
    --save-every 2 "$@"
}

status=0
YOUR_AI_CONFIG_DIR="$tmp" "$bin" benchmark --engine "$engine" --model "$model" --device "$device" --dtype "$dtype" --steps 3 --ranks 8 \
  --batch-sizes 1,4 --lengths 128,512 --output "$tmp/bench.json" >"$tmp/bench.log" 2>&1 ||
  { cat "$tmp/bench.log"; echo "FAIL benchmark failed"; exit 1; }
python3 - "$tmp/bench.json" "${BAR:-0.15}" <<'PY' || status=1
import json, sys
fails = 0
bar = float(sys.argv[2])
for c in json.load(open(sys.argv[1]))["configurations"]:
    name = f"{c['batch_size']} x {c['max_seq_length']}, rank {c['lora_rank']}"
    if not c["ok"]:
        print(f"FAIL {name}: {c['status']}")
        fails += 1
        continue
    err = c["estimate_error"]
    ok = abs(err) <= bar
    fails += not ok
    print(f"{'ok  ' if ok else 'FAIL'} {name}: measured peak {c['peak_bytes']/1e9:.3f} GB, "
          f"estimate {c['estimate_bytes']/1e9:.3f} GB ({err:+.0%}; bar {bar:.0%}), {c['tokens_per_s']:.0f} tokens/s")
sys.exit(1 if fails else 0)
PY

train --output "$tmp/whole" --max-steps 12 >"$tmp/whole.log" 2>&1 ||
  { cat "$tmp/whole.log"; echo "FAIL the plain run failed"; exit 1; }
python3 - "$tmp/whole/metrics.jsonl" <<'PY' || status=1
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
steps = [r for r in rows if r["type"] == "train"]
if "mlx_active_bytes" in steps[0]:
    # MLX's own figure, and the process's: its allocator's cache must not grow it either.
    measures = [("MLX's active memory", "mlx_active_bytes"), ("resident memory", "rss_bytes")]
else:
    measures = [("resident memory", "rss_bytes")]
fails = 0
for measure, now in measures:
    a, b = steps[1][now], steps[-1][now]
    flat = abs(b - a) <= max(0.02 * a, 32 << 20)
    fails += not flat
    print(f"{'ok  ' if flat else 'FAIL'} flat: {measure} {a/1e9:.3f} GB at step 2, {b/1e9:.3f} GB at step {len(steps)}")
sys.exit(1 if fails else 0)
PY

set +e
train --output "$tmp/cut" --max-steps 12 --test-memory-limit 1@5 \
  >"$tmp/cut.log" 2>&1
code=$?
set -e
if [ $code -eq 3 ] && grep -q "memory budget exceeded" "$tmp/cut.log" &&
  [ -f "$tmp/cut/checkpoints/step-4/adapter_model.safetensors" ]; then
  echo "ok   budget crossed at step 5: exit 3, checkpoint of step 4"
else
  cat "$tmp/cut.log"
  echo "FAIL budget crossed at step 5: exit $code"
  status=1
fi
if train --output "$tmp/cut" --max-steps 12 --resume >"$tmp/resume.log" 2>&1 &&
  [ -f "$tmp/cut/adapter_model.safetensors" ]; then
  python3 - "$tmp/whole/metrics.jsonl" "$tmp/cut/metrics.jsonl" <<'PY' || status=1
import json, sys
loss = lambda p: {r["step"]: r["loss"] for r in map(json.loads, open(p)) if r["type"] == "train"}
a, b = loss(sys.argv[1]), loss(sys.argv[2])
d = max(abs(a[s] - b[s]) for s in a)
ok = d <= 1e-3
print(f"{'ok  ' if ok else 'FAIL'} resumed run's losses against the uninterrupted run's: largest difference {d:.2e}")
sys.exit(0 if ok else 1)
PY
else
  cat "$tmp/resume.log"
  echo "FAIL the resume did not finish"
  status=1
fi
exit $status
