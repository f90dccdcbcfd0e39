#!/usr/bin/env python3
"""PyTorch+PEFT's LoRA step on a Hugging Face model directory, as scripts/gpu_check.sh compares
it with your_ai's: bf16 weights, LoRA rank R (alpha 2R, no dropout) on q,k,v,o,gate,up,down of
every block, batch 1, LENGTH tokens of the first text row of DATA (every token scored), AdamW
(lr 1e-4, weight decay 0.01), the gradient norm clipped to 1, transformers' sdpa attention.

It runs STEPS steps, plain (PEFT's default, activations kept) or with --checkpointing
(gradient checkpointing, what a user turns on when memory is short), and prints one JSON line:
the median step time over steps 3..STEPS, tokens/s, the losses, and the peaks of torch's
allocator (allocated and reserved).

    peft_step.py MODEL_DIR DATA.jsonl [--rank 16] [--length 2048] [--steps 8] [--device cuda]
                 [--checkpointing]
"""
import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def phase(model, params, opt, ids, steps, device, name):
    times, losses = [], []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        logits = model(input_ids=ids).logits
        loss = F.cross_entropy(logits[0, :-1].float(), ids[0, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        del logits
        sync(device)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    timed = times[2:] or times
    step_s = statistics.median(timed)
    out = {
        "tool": name,
        "steps": steps,
        "step_s": step_s,
        "tokens_per_s": ids.shape[1] / step_s,
        "losses": losses,
    }
    if device.startswith("cuda"):
        out["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
        out["peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
    print(json.dumps(out), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("data")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--checkpointing", action="store_true")
    a = ap.parse_args()

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(a.model)
    with open(a.data) as f:
        text = json.loads(f.readline())["text"]
    ids = tok(text, return_tensors="pt").input_ids[:, : a.length]
    if ids.shape[1] < a.length:
        raise SystemExit(f"{a.data}: the first row has {ids.shape[1]} tokens, fewer than {a.length}")
    ids = ids.to(a.device)

    # Loaded straight onto the device: 16 GB through the host first costs the timed check ~20 s.
    model = AutoModelForCausalLM.from_pretrained(
        a.model, dtype=torch.bfloat16, attn_implementation="sdpa", device_map=a.device
    )
    cfg = LoraConfig(r=a.rank, lora_alpha=2 * a.rank, lora_dropout=0.0,
                     target_modules=TARGETS, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, cfg)
    # LoRA's own weights in f32, as your_ai keeps them.
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    name = "PyTorch+PEFT"
    if a.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        name += ", checkpointing"
    phase(model, params, opt, ids, a.steps, a.device, name)


if __name__ == "__main__":
    main()
