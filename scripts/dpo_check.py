#!/usr/bin/env python3
"""Cross-check `your_ai eval --method dpo` against transformers + PEFT.

Usage: python scripts/dpo_check.py --model SmolLM2.gguf --adapter RUN_DIR \
           --data examples/invented-country-preferences/valid.jsonl [--beta 0.1]

transformers loads the GGUF base (dequantized to float32) and PEFT applies the adapter. For
every pair of the file (conversational `prompt`/`chosen`/`rejected` rows), each answer is
rendered after its prompt with the model's chat template and scored on the answer's tokens only
(your_ai's span rule, see peft_check.py: the assistant turn up to and including its end-of-turn
token). The policy's log-probabilities come from the PEFT model, the reference's from the same
model under `disable_adapter()`. The DPO loss −log σ(β·((π_c − ref_c) − (π_r − ref_r))), the
reward accuracy (chosen reward above rejected, ties count as misses, as in TRL) and the mean
margin are computed here with torch, then compared with `your_ai eval --method dpo` on the same
model, adapter and file: the loss must agree within --loss-tolerance (2%), the accuracy within
--accuracy-tolerance (5 points). Exits 1 otherwise.

Needs: torch, transformers, gguf, peft.
"""
import argparse
import json
import os
import re
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peft_check import smollm_pretok  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_pairs(path):
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            r = json.loads(line)
            if not isinstance(r.get("prompt"), list):
                sys.exit(f"{path}:{n}: only the conversational form (a `prompt` list) is supported here")
            out.append(r)
    return out


def encode_answer(tok, encode, prompt, answer, max_len):
    """(ids, scored) for prompt + answer, scoring the answer's assistant turns only."""
    messages = prompt + answer

    def render(msgs, gen):
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    full = render(messages, False)
    spans = []
    for i in range(len(prompt), len(messages)):
        if messages[i]["role"] != "assistant":
            continue
        before = render(messages[:i], True)
        upto = render(messages[:i + 1], False)
        if not (upto.startswith(before) and full.startswith(upto)):
            sys.exit("the template does not render the answer as an extension of its prompt")
        spans.append((len(before), len(before) + len(upto[len(before):].rstrip())))
    ids, offsets = encode(full)
    scored = [any(s < b and e > a for a, b in spans) for s, e in offsets]
    return ids[:max_len], scored[:max_len]


def logps(model, samples):
    """Σ log p over the scored tokens of each sample (one at a time: no padding involved)."""
    import torch
    out = []
    with torch.no_grad():
        for ids, scored in samples:
            x = torch.tensor([ids])
            logits = model(input_ids=x).logits.float()[0, :-1]
            lp = torch.log_softmax(logits, dim=-1).gather(1, x[0, 1:].unsqueeze(1)).squeeze(1)
            mask = torch.tensor(scored[1:], dtype=torch.bool)
            out.append(float(lp[mask].sum()))
    return out


def your_ai_dpo(binary, model, data, adapter, beta):
    cmd = [binary, "eval", "--method", "dpo", "--beta", str(beta), "--model", model,
           "--data", data, "--adapter", adapter]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"`{' '.join(cmd)}` failed ({r.returncode}):\n{r.stderr}")
    figure = {}
    for key in ["dpo loss", "accuracy", "margin"]:
        m = re.search(rf"^{key}:\s*([-\d.eE+naif]+)", r.stdout, re.M)
        if not m:
            sys.exit(f"no `{key}:` line in your_ai's output:\n{r.stdout}")
        figure[key] = float(m.group(1))
    return figure


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="GGUF file")
    ap.add_argument("--adapter", required=True, help="PEFT adapter directory written by your_ai")
    ap.add_argument("--data", required=True, help="preference JSONL file (conversational form)")
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--your-ai", default=os.path.join(REPO, "target/release/your_ai"))
    ap.add_argument("--max-seq-length", type=int, default=2048)
    ap.add_argument("--loss-tolerance", type=float, default=0.02, help="relative")
    ap.add_argument("--accuracy-tolerance", type=float, default=5.0, help="points")
    args = ap.parse_args()

    import peft
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.manual_seed(0)

    gguf = os.path.abspath(os.path.expanduser(args.model))
    d, name = os.path.split(gguf)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    fast = smollm_pretok(tok)

    def encode(text):
        e = fast.encode(text, add_special_tokens=False)
        return e.ids, e.offsets

    pairs = load_pairs(args.data)
    chosen = [encode_answer(tok, encode, p["prompt"], p["chosen"], args.max_seq_length) for p in pairs]
    rejected = [encode_answer(tok, encode, p["prompt"], p["rejected"], args.max_seq_length) for p in pairs]

    base = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32).eval()
    model = peft.PeftModel.from_pretrained(base, args.adapter).eval()
    pc, pr = logps(model, chosen), logps(model, rejected)
    with model.disable_adapter():
        rc, rr = logps(model, chosen), logps(model, rejected)
    pc, pr, rc, rr = (torch.tensor(v, dtype=torch.float64) for v in (pc, pr, rc, rr))
    chosen_rewards = args.beta * (pc - rc)
    rejected_rewards = args.beta * (pr - rr)
    loss = float(-torch.nn.functional.logsigmoid(chosen_rewards - rejected_rewards).mean())
    accuracy = 100.0 * float((chosen_rewards > rejected_rewards).double().mean())
    margin = float((chosen_rewards - rejected_rewards).mean())

    ours = your_ai_dpo(args.your_ai, gguf, args.data, args.adapter, args.beta)
    print(f"versions: torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")
    print(f"data: {args.data} ({len(pairs)} pairs), beta {args.beta}, adapter {args.adapter}")
    print(f"{'':10}{'transformers+peft':>20}{'your_ai eval':>16}")
    print(f"{'dpo loss':10}{loss:>20.4f}{ours['dpo loss']:>16.4f}")
    print(f"{'accuracy':10}{accuracy:>19.1f}%{ours['accuracy']:>15.1f}%")
    print(f"{'margin':10}{margin:>20.4f}{ours['margin']:>16.4f}")
    bad = []
    if abs(ours["dpo loss"] - loss) > args.loss_tolerance * abs(loss):
        bad.append(f"DPO losses differ by {abs(ours['dpo loss'] - loss) / abs(loss):.1%}")
    if abs(ours["accuracy"] - accuracy) > args.accuracy_tolerance:
        bad.append(f"accuracies differ by {abs(ours['accuracy'] - accuracy):.1f} points")
    if bad:
        print("FAIL: " + "; ".join(bad))
        sys.exit(1)
    print(f"OK: loss within {args.loss_tolerance:.0%}, accuracy within {args.accuracy_tolerance} points")


if __name__ == "__main__":
    main()
