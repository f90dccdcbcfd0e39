#!/usr/bin/env python3
"""Cross-check a your_ai LoRA adapter against Hugging Face PEFT.

Usage: python scripts/peft_check.py --model SmolLM2.gguf --adapter /tmp/run --data examples/invented-country/valid.jsonl

Loads the GGUF base with transformers (dequantized to float32), applies the adapter with
`peft.PeftModel.from_pretrained`, and computes the mean token cross-entropy over the
assistant tokens of every chat (assistant content plus the `<|im_end|>` that closes the
turn). Assistant spans follow your_ai's rule: the text between
render(messages[:i], add_generation_prompt=True) and render(messages[:i+1]) with trailing
whitespace stripped; a token is scored when its character offsets overlap a span. The mean
is taken over all scored tokens of the file (token-weighted, as `your_ai eval` does).

It then runs `your_ai eval` on the same model/adapter/data, parses its `loss:` line, prints
the base (no adapter) and adapter losses from both tools and their differences, and exits 1
if the adapter losses (or the base losses) differ by more than --tolerance (0.02 nats).

Tokenization: by default the transformers tokenizer gets llama.cpp's `smollm` pre-tokenizer
(every digit its own piece, as your_ai and upstream SmolLM2 do); --hf-tokenizer keeps
transformers' GGUF pre-tokenizer, which groups a space before digits differently.

Needs: torch, transformers, gguf, accelerate, peft (e.g. /tmp/venv-ref/bin/pip install peft).
"""
import argparse
import json
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smollm_pretok(hf_tok):
    """A `tokenizers.Tokenizer` copy of hf_tok with llama.cpp's smollm pre-tokenizer."""
    from tokenizers import Regex, Tokenizer, pre_tokenizers
    tok = Tokenizer.from_str(hf_tok.backend_tokenizer.to_str())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    return tok


def load_examples(path):
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                rec = json.loads(line)
                if "messages" not in rec:
                    sys.exit(f"{path}:{n}: only chat (`messages`) examples are supported")
                out.append(rec)
    return out


def encode_chat(tok, encode, messages, tools, max_len):
    """(ids, scored mask) for one conversation, by your_ai's span rule."""
    def render(msgs, gen):
        kw = {"tools": tools} if tools else {}
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen, **kw)

    full = render(messages, False)
    spans = []
    last_assistant = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(messages[:i], True)
        upto = render(messages[:i + 1], False)
        if upto.startswith(before) and full.startswith(upto) and len(upto) > len(before):
            spans.append((len(before), len(before) + len(upto[len(before):].rstrip())))
        elif i == last_assistant:
            raise ValueError(f"assistant turn {i} is not rendered as an extension of the conversation")
    ids, offsets = encode(full)
    scored = [any(s < b and e > a for a, b in spans) for s, e in offsets]
    return ids[:max_len], scored[:max_len]


def hf_loss(model, samples, batch_size):
    """Token-weighted mean cross-entropy over scored targets (right-padded batches)."""
    import torch
    import torch.nn.functional as F
    total, n = 0.0, 0
    with torch.no_grad():
        for k in range(0, len(samples), batch_size):
            batch = samples[k:k + batch_size]
            t = max(len(ids) for ids, _ in batch)
            ids = torch.zeros(len(batch), t, dtype=torch.long)
            att = torch.zeros(len(batch), t, dtype=torch.long)
            lab = torch.full((len(batch), t), -100, dtype=torch.long)
            for b, (x, m) in enumerate(batch):
                ids[b, :len(x)] = torch.tensor(x)
                att[b, :len(x)] = 1
                for p in range(len(x)):
                    if m[p]:
                        lab[b, p] = x[p]
            logits = model(input_ids=ids, attention_mask=att).logits.float()
            lp = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), lab[:, 1:].reshape(-1),
                                 ignore_index=-100, reduction="sum")
            total += lp.item()
            n += int((lab[:, 1:] != -100).sum())
    return total / n, n


def your_ai_eval(binary, model, data, adapter, max_len):
    cmd = [binary, "eval", "--model", model, "--data", data, "--max-seq-length", str(max_len)]
    if adapter:
        cmd += ["--adapter", adapter]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"`{' '.join(cmd)}` failed ({r.returncode}):\n{r.stderr}")
    loss = re.search(r"^loss:\s*([-\d.eE+naif]+)", r.stdout, re.M)
    toks = re.search(r"^tokens:\s*(\d+)", r.stdout, re.M)
    if not loss:
        sys.exit(f"no `loss:` line in your_ai eval output:\n{r.stdout}")
    return float(loss.group(1)), int(toks.group(1)) if toks else None


def check_adapter_loaded(peft_model, adapter_dir):
    """Every tensor of adapter_model.safetensors must have landed in the PEFT model unchanged."""
    import torch
    from safetensors.torch import load_file
    saved = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    params = dict(peft_model.named_parameters())
    problems, matched = [], 0
    for k, v in saved.items():
        # PEFT file keys omit the adapter name; in the model they carry ".default".
        mk = re.sub(r"\.(lora_[AB]|lora_embedding_[AB])\.", r".\1.default.", k)
        p = params.get(mk)
        if p is None:
            problems.append(f"file tensor {k} has no parameter {mk} in the PEFT model")
        elif tuple(p.shape) != tuple(v.shape):
            problems.append(f"{k}: file shape {tuple(v.shape)} vs model {tuple(p.shape)}")
        elif not torch.equal(p.detach().to(v.dtype), v):
            problems.append(f"{k}: values differ after loading")
        else:
            matched += 1
    n_lora = sum(1 for k in params if ".lora_" in k)
    if n_lora != len(saved):
        problems.append(f"the PEFT model has {n_lora} LoRA tensors, the file {len(saved)}")
    return matched, problems


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="GGUF file")
    ap.add_argument("--adapter", required=True, help="PEFT adapter directory written by your_ai")
    ap.add_argument("--data", required=True, help="chat JSONL file")
    ap.add_argument("--your-ai", default=os.path.join(REPO, "target/release/your_ai"))
    ap.add_argument("--max-seq-length", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--tolerance", type=float, default=0.02)
    ap.add_argument("--hf-tokenizer", action="store_true",
                    help="keep transformers' GGUF pre-tokenizer instead of llama.cpp's")
    args = ap.parse_args()

    import torch
    import peft
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.manual_seed(0)

    gguf = os.path.abspath(os.path.expanduser(args.model))
    d, name = os.path.split(gguf)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    if args.hf_tokenizer:
        def encode(text):
            e = tok(text, add_special_tokens=False, return_offsets_mapping=True)
            return e["input_ids"], e["offset_mapping"]
    else:
        fast = smollm_pretok(tok)

        def encode(text):
            e = fast.encode(text, add_special_tokens=False)
            return e.ids, e.offsets

    examples = load_examples(args.data)
    samples = [encode_chat(tok, encode, ex["messages"], ex.get("tools"), args.max_seq_length)
               for ex in examples]

    base = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32).eval()
    base_hf, n_hf = hf_loss(base, samples, args.batch_size)

    model = peft.PeftModel.from_pretrained(base, args.adapter).eval()
    matched, problems = check_adapter_loaded(model, args.adapter)
    cfg = json.load(open(os.path.join(args.adapter, "adapter_config.json")))
    ad_hf, _ = hf_loss(model, samples, args.batch_size)

    base_ya, n_ya = your_ai_eval(args.your_ai, gguf, args.data, None, args.max_seq_length)
    ad_ya, _ = your_ai_eval(args.your_ai, gguf, args.data, args.adapter, args.max_seq_length)

    print(f"versions: torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")
    print(f"data: {args.data} ({len(examples)} examples); scored tokens: transformers {n_hf}, your_ai {n_ya}"
          f" ({'llama.cpp smollm' if not args.hf_tokenizer else 'transformers GGUF'} pre-tokenizer)")
    print(f"adapter: {args.adapter} (r={cfg.get('r')}, lora_alpha={cfg.get('lora_alpha')}, "
          f"targets={cfg.get('target_modules')}); {matched} tensors loaded into PEFT exactly")
    for p in problems:
        print(f"  LOAD PROBLEM: {p}")
    print(f"{'':10}{'transformers+peft':>20}{'your_ai eval':>16}{'difference':>14}")
    print(f"{'base':10}{base_hf:>20.4f}{base_ya:>16.4f}{base_ya - base_hf:>+14.4f}")
    print(f"{'adapter':10}{ad_hf:>20.4f}{ad_ya:>16.4f}{ad_ya - ad_hf:>+14.4f}")
    print(f"{'adapter-base':10}{ad_hf - base_hf:>+20.4f}{ad_ya - base_ya:>+16.4f}")

    bad = []
    if n_ya is not None and n_ya != n_hf:
        print(f"note: scored token counts differ ({n_hf} vs {n_ya}): tokenization or masking differs")
    if abs(base_ya - base_hf) > args.tolerance:
        bad.append(f"base losses differ by {abs(base_ya - base_hf):.4f} nats")
    if abs(ad_ya - ad_hf) > args.tolerance:
        bad.append(f"adapter losses differ by {abs(ad_ya - ad_hf):.4f} nats")
    if problems:
        bad.append("the adapter did not load cleanly into PEFT")
    if bad:
        print("FAIL: " + "; ".join(bad) + f" (tolerance {args.tolerance})")
        sys.exit(1)
    print(f"OK: within {args.tolerance} nats")


if __name__ == "__main__":
    main()
