#!/usr/bin/env bash
# Training throughput and peak memory of your_ai against batch size and sequence length, with
# where the time goes (`train --profile`): SmolLM2-135M, LoRA r 8 on all seven linears, f32,
# plain-text rows cut to exactly the length (every token trained).
#
#   scripts/bench/scaling.sh [--batches 1,2,4,8] [--lengths 128,256,512,1024,2048] [--steps 4]
#                            [--json OUT.json]
#
#   BENCH_NO_BUILD=1   use target/release/your_ai as it is
# The first step of each run is not timed (it reaches the allocator's high-water mark).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
batches=1,2,4,8
lengths=128,256,512,1024,2048
steps=4
json=
while [ $# -gt 0 ]; do
  case "$1" in
    --batches) batches=$2; shift 2 ;;
    --lengths) lengths=$2; shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    --json) json=$2; shift 2 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
[ "$steps" -ge 2 ] || { echo "--steps must be at least 2" >&2; exit 2; }

cd "$repo"
if [ "${BENCH_NO_BUILD:-0}" != 1 ] || [ ! -x target/release/your_ai ]; then
  cargo build --release >&2
fi
model="$(scripts/fetch_model.sh)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

python3 - "$repo" "$work" "$model" "$batches" "$lengths" "$steps" "$json" <<'PY'
import json, os, statistics, subprocess, sys, time
repo, work, model, batches, lengths, steps, out_json = sys.argv[1:]
batches = [int(x) for x in batches.split(",")]
lengths = [int(x) for x in lengths.split(",")]
steps = int(steps)

# Plain-text rows of the example's own words, long enough that every row is cut to the length
# (a word is at least one token).
words = []
for line in open(os.path.join(repo, "examples/invented-country/train.jsonl")):
    for m in json.loads(line)["messages"]:
        words += m["content"].split()
need = max(lengths) + 16
data = os.path.join(work, "data")
os.makedirs(data)
with open(os.path.join(data, "train.jsonl"), "w") as f:
    for r in range(max(batches) * 2):
        row = [words[(r * 131 + i) % len(words)] for i in range(need)]
        f.write(json.dumps({"text": " ".join(row)}) + "\n")

exe = os.path.join(repo, "target/release/your_ai")
results = []
print(f"{'batch':>5} {'length':>6} {'tok/s':>7} {'s/step':>7} {'peak MiB':>8}  "
      f"{'forward':>7} {'head':>5} {'recomp':>6} {'backward':>8} {'attention':>9}", flush=True)
for b in batches:
    for L in lengths:
        out = os.path.join(work, f"run-{b}-{L}")
        cmd = [exe, "train", "--model", model, "--data", data, "--output", out,
               "--max-steps", str(steps), "--batch-size", str(b), "--max-seq-length", str(L),
               "--lora-rank", "8", "--lora-alpha", "16", "--learning-rate", "1e-4",
               "--warmup-steps", "0", "--steps-per-eval", "0", "--no-save-best",
               "--save-every", "1000000", "--profile"]
        t0 = time.time()
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            msg = (p.stderr.strip().splitlines() or ["?"])[-1]
            print(f"{b:>5} {L:>6}  failed: {msg}", flush=True)
            results.append({"batch": b, "length": L, "error": msg})
            continue
        recs = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
        train = [r for r in recs if r.get("type") == "train"][1:]
        end = [r for r in recs if r.get("type") == "end"][-1]
        tok = sum(r["tokens"] for r in train)
        secs = sum(r["step_time_s"] for r in train)
        prof = end.get("profile_seconds", {})
        total = sum(v for k, v in prof.items() if k != "attention") or 1.0
        share = lambda k: 100.0 * prof.get(k, 0.0) / total
        row = {"batch": b, "length": L, "tokens_per_s": tok / secs,
               "s_per_step": statistics.median(r["step_time_s"] for r in train),
               "peak_mib": end["peak_rss_bytes"] / 2**20,
               "share_percent": {"forward": share("forward (blocks)"),
                                 "head": share("LM head + loss + its backward"),
                                 "recompute": share("recompute (blocks)"),
                                 "backward": share("backward (blocks)"),
                                 "attention": share("attention")},
               "wall_s": time.time() - t0}
        results.append(row)
        s = row["share_percent"]
        print(f"{b:>5} {L:>6} {row['tokens_per_s']:>7.1f} {row['s_per_step']:>7.2f} "
              f"{row['peak_mib']:>8.0f}  {s['forward']:>6.1f}% {s['head']:>4.1f}% "
              f"{s['recompute']:>5.1f}% {s['backward']:>7.1f}% {s['attention']:>8.1f}%", flush=True)
if out_json:
    json.dump({"model": model, "steps": steps, "results": results}, open(out_json, "w"), indent=1)
PY
