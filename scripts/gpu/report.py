#!/usr/bin/env python3
"""Figures for scripts/gpu_check.sh, from what each run left behind. Standard library only.

    report.py losses CPU_METRICS GPU_METRICS --tol T --name NAME
        the runs' per-step losses side by side; fails when one differs by more than T relative
    report.py train METRICS --name NAME [--smi LOG --idle MB] [--skip 2]
        one JSON line: median step time (steps after the first SKIP), tokens/s, the tool's own
        peak, and the GPU's memory in use at its highest while the run ran (nvidia-smi samples,
        less what was in use before it started)
    report.py smi RECORDS --smi LOG --idle MB
        RECORDS (peft_step.py's JSON lines) with the same GPU peak added
    report.py table RESULTS.jsonl    the results as a Markdown table
"""
import argparse
import json
import statistics
import sys

MB = 1 << 20


def records(path, kind):
    with open(path) as f:
        return [r for r in map(json.loads, filter(str.strip, f)) if r.get("type") == kind]


def smi_peak(log, idle_mb):
    """The highest `memory.used` sample (MiB) of an nvidia-smi log, less the idle figure, in bytes."""
    peak = 0
    with open(log) as f:
        for line in f:
            try:
                peak = max(peak, int(line.split(",")[0]))
            except ValueError:
                continue
    return max(0, peak - idle_mb) * MB


def cmd_losses(a):
    cpu = [r["loss"] for r in records(a.cpu, "train")]
    gpu = [r["loss"] for r in records(a.gpu, "train")]
    if not cpu or len(cpu) != len(gpu):
        print(f"{a.name}: {len(gpu)} steps against the CPU run's {len(cpu)}", file=sys.stderr)
        sys.exit(1)
    worst = max(abs(g - c) / abs(c) for c, g in zip(cpu, gpu))
    print(json.dumps({"check": "losses", "tool": a.name, "steps": len(cpu), "max_rel_diff": worst,
                      "tolerance": a.tol, "first": [cpu[0], gpu[0]], "last": [cpu[-1], gpu[-1]]}))
    if not worst <= a.tol:
        for i, (c, g) in enumerate(zip(cpu, gpu), 1):
            print(f"  step {i}: CPU {c:.6f}  {a.name} {g:.6f}", file=sys.stderr)
        sys.exit(1)


def cmd_train(a):
    steps = records(a.metrics, "train")
    timed = [r["step_time_s"] for r in steps[a.skip:]] or [r["step_time_s"] for r in steps]
    if not timed:
        sys.exit(f"{a.metrics}: no training steps")
    step_s = statistics.median(timed)
    tokens = statistics.median(r["tokens"] for r in steps)
    end = (records(a.metrics, "end") or [{}])[-1]
    own = end.get("train_peak_mlx_bytes")
    out = {"tool": a.name, "steps": len(steps), "step_s": step_s, "tokens_per_s": tokens / step_s,
           "losses": [r["loss"] for r in steps], "peak_own_bytes": own}
    if "profile_seconds" in end:
        out["profile_seconds"] = end["profile_seconds"]
    if a.smi:
        out["peak_gpu_bytes"] = smi_peak(a.smi, a.idle)
    print(json.dumps(out))


def cmd_smi(a):
    with open(a.records) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if not rows:
        sys.exit(f"{a.records}: no records")
    for r in rows:
        r["peak_gpu_bytes"] = smi_peak(a.smi, a.idle)
        print(json.dumps(r))


def cmd_table(a):
    rows = [json.loads(line) for line in open(a.results) if line.strip()]
    gib = lambda b: f"{b / (1 << 30):.2f}" if b else "–"
    print("| tool | tokens/s | s a step | peak GPU memory, GiB | tool's own peak, GiB | first loss |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if r.get("check") in ("losses", "error"):
            continue
        # The GPU's memory in use (nvidia-smi, less what was in use before): the same measure
        # for every tool. The tool's own: MLX's peak, torch's allocated peak.
        own = r.get("peak_own_bytes") or r.get("peak_allocated_bytes")
        print(f"| {r['tool']} | {r['tokens_per_s']:.0f} | {r['step_s']:.3f} | "
              f"{gib(r.get('peak_gpu_bytes'))} | {gib(own)} | {r['losses'][0]:.4f} |")
    print()
    for r in rows:
        if r.get("check") == "losses":
            print(f"- SmolLM2 losses, {r['tool']} against the CPU: {r['steps']} steps, largest "
                  f"relative difference {r['max_rel_diff']:.2e} (tolerance {r['tolerance']})")
        elif r.get("check") == "error":
            print(f"- **{r['tool']}: {r['what']}: {r['error']}**")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("losses")
    p.add_argument("cpu")
    p.add_argument("gpu")
    p.add_argument("--tol", type=float, required=True)
    p.add_argument("--name", required=True)
    p = sub.add_parser("train")
    p.add_argument("metrics")
    p.add_argument("--name", required=True)
    p.add_argument("--smi")
    p.add_argument("--idle", type=int, default=0)
    p.add_argument("--skip", type=int, default=2)
    p = sub.add_parser("smi")
    p.add_argument("records")
    p.add_argument("--smi", required=True)
    p.add_argument("--idle", type=int, default=0)
    p = sub.add_parser("table")
    p.add_argument("results")
    a = ap.parse_args()
    {"losses": cmd_losses, "train": cmd_train, "smi": cmd_smi, "table": cmd_table}[a.cmd](a)


if __name__ == "__main__":
    main()
