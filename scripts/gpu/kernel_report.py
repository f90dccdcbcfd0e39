#!/usr/bin/env python3
"""Where the GPU time went, from scripts/gpu/kernel_trace.c's files: per trace, the GPU's busy
time against its span (and, with --window, over the trace's last seconds: a run's steady steps,
apart from its load), time by kind of kernel (matrix products, attention, element-wise, ...),
and the costliest kernels, all per step when --steps says how many steps the run made. Where a
program runs kernels concurrently (MLX), their times overlap: read the launches and the busy
share, not the kernels' times.

    scripts/gpu/kernel_report.py TRACE.tsv [TRACE.tsv ...] [--steps N] [--top 25] [--window S]
"""
import argparse
import re
import shutil
import subprocess
import sys
from collections import defaultdict

# First match wins: a kernel's kind from its (demangled) name.
KINDS = [
    ("attention", r"sdpa|flash|fmha|attention|cudnn"),
    ("matmul", r"gemm|nvjet|cutlass|xmma|s16816|wgmma|matmul|gemv|qmm|qmv"),
    ("norm/softmax", r"rms|layer_?norm|softmax|logsumexp"),
    ("reduce", r"reduce|scan|arg_?max|sum"),
    ("gather/scatter", r"gather|scatter|index|take"),
    ("copy/cast", r"copy|cast|convert|contiguous|transpose"),
    ("random", r"random|bernoulli|philox|bits"),
    ("element-wise", r"binary|unary|ternary|elementwise|vectorized|compiled|fused|silu|sigmoid|mul|add"),
]


def demangle(names):
    if not names or not shutil.which("c++filt"):
        return names
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True)
    got = out.stdout.splitlines()
    return got if len(got) == len(names) else names


def kind(name):
    low = name.lower()
    return next((k for k, pat in KINDS if re.search(pat, low)), "other")


def read(path):
    head, rows = {}, []
    with open(path) as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if line.startswith("#"):
                head[parts[0][1:]] = [int(p) for p in parts[1:]]
            elif len(parts) == 3:
                rows.append((int(parts[0]), int(parts[1]), parts[2]))
    names = demangle([r[2] for r in rows])
    merged = defaultdict(lambda: [0, 0])
    for (n, ns, _), name in zip(rows, names):
        merged[name][0] += n
        merged[name][1] += ns
    return head, merged


def report(path, steps, top, window):
    head, kernels = read(path)
    per = max(steps, 1)
    total = sum(ns for _, ns in kernels.values())
    launches = sum(n for n, _ in kernels.values())
    busy = head.get("busy_ns", [0])[0]
    span = head.get("span_ns", [0])[0]
    print(f"== {path}")
    print(f"kernels: {launches / per:.0f} launches and {total / per / 1e6:.2f} ms a step; "
          f"GPU busy {busy / 1e9:.2f} s of a {span / 1e9:.2f} s span "
          f"({100 * busy / span if span else 0:.0f}%)")
    buckets = head.get("bucket_busy_ns", [])
    if window and len(buckets) > 1:
        size, busy_by = buckets[0], buckets[1:]
        n = max(1, min(len(busy_by), round(window * 1e9 / size)))
        last = busy_by[-n:]
        print(f"GPU busy {100 * sum(last) / (n * size):.0f}% of the last {n * size / 1e9:.2f} s")
    mc, ms = head.get("memcpy", [0, 0, 0]), head.get("memset", [0, 0])
    print(f"memcpy: {mc[0]} ({mc[1] / 1e6:.1f} ms, {mc[2] / 1e9:.2f} GB); "
          f"memset: {ms[0]} ({ms[1] / 1e6:.1f} ms)")
    by_kind = defaultdict(lambda: [0, 0])
    for name, (n, ns) in kernels.items():
        by_kind[kind(name)][0] += n
        by_kind[kind(name)][1] += ns
    print(f"{'kind':<16}{'ms/step':>9}{'share':>7}{'launches/step':>15}")
    for k, (n, ns) in sorted(by_kind.items(), key=lambda kv: -kv[1][1]):
        print(f"{k:<16}{ns / per / 1e6:>9.2f}{100 * ns / total:>6.1f}%{n / per:>15.0f}")
    print(f"{'ms/step':>9}{'share':>7}{'n/step':>8}{'µs each':>9}  kernel")
    for name, (n, ns) in sorted(kernels.items(), key=lambda kv: -kv[1][1])[:top]:
        short = re.sub(r"\s+", " ", name)[:150]
        print(f"{ns / per / 1e6:>9.2f}{100 * ns / total:>6.1f}%{n / per:>8.0f}"
              f"{ns / n / 1e3:>9.1f}  {short}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("traces", nargs="+")
    ap.add_argument("--steps", type=int, default=1, help="steps the run made (figures per step)")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--window", type=float, default=0.0,
                    help="seconds at the trace's end to give the GPU's busy share over "
                         "(the steps, e.g. steps × step time)")
    a = ap.parse_args()
    for path in a.traces:
        try:
            report(path, a.steps, a.top, a.window)
        except OSError as e:
            print(f"kernel_report: {path}: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
