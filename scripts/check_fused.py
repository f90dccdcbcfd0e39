#!/usr/bin/env python3
"""Check what `your_ai fuse` and `your_ai export-adapter` wrote, with other people's loaders.

Usage:
  python scripts/check_fused.py --hf FUSED_DIR --gguf FUSED.gguf [--gguf FUSED_Q8.gguf ...] \
      --data valid.jsonl [--base BASE.gguf --adapter ADAPTER_DIR --adapter-gguf ADAPTER.gguf]

1. transformers loads the fused Hugging Face directory (model, tokenizer, chat template) and
   computes the validation loss (assistant tokens, your_ai's span rule, see peft_check.py).
   With --base and --adapter, PEFT applies the adapter to the base in transformers and the two
   losses must agree (--tolerance).
2. The `gguf` package reads each fused GGUF: required llama metadata and tokenizer keys, and a
   tensor listing that must match the Hugging Face directory one to one (llama.cpp names,
   shapes); every tensor is dequantized and compared with the Hugging Face tensor (q/k rows
   un-permuted from llama.cpp's order), reporting the largest difference per file.
3. When llama-cpp-python is installed, llama.cpp itself loads each GGUF and computes the same
   validation loss; with --base (a GGUF) and --adapter-gguf, llama.cpp also applies the exported
   adapter to the base with --lora semantics, which must give the fused model's loss.

Exits 1 when a check fails. Needs: torch, transformers, gguf, numpy, safetensors; peft for
--adapter; llama-cpp-python for step 3.
"""
import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peft_check import encode_chat, hf_loss, load_examples, your_ai_eval  # noqa: E402

FAILURES = []


def check(ok, msg):
    print(("ok    " if ok else "FAIL  ") + msg)
    if not ok:
        FAILURES.append(msg)


HF_TO_GGUF = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(hf):
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf in fixed:
        return fixed[hf]
    _, _, layer, rest = hf.split(".", 3)
    module, suffix = rest.rsplit(".", 1)
    return f"blk.{layer}.{HF_TO_GGUF[module]}.{suffix}"


def unpermute(w, n_head):
    """Undo llama.cpp's q/k row interleaving: rows [n, d/2, 2] -> [n, 2, d/2]."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def check_gguf_file(path, hf_tensors, cfg):
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize
    r = GGUFReader(path)
    fields = {f.name: f for f in r.fields.values()}

    def val(key):
        f = fields.get(key)
        if f is None:
            return None
        v = f.contents()
        return v

    arch = val("general.architecture")
    check(arch == "llama", f"{os.path.basename(path)}: general.architecture = {arch}")
    want = {
        "llama.block_count": cfg["num_hidden_layers"], "llama.embedding_length": cfg["hidden_size"],
        "llama.feed_forward_length": cfg["intermediate_size"],
        "llama.attention.head_count": cfg["num_attention_heads"],
        "llama.attention.head_count_kv": cfg["num_key_value_heads"],
    }
    for k, v in want.items():
        check(val(k) == v, f"{os.path.basename(path)}: {k} = {val(k)} (config.json {v})")
    eps = val("llama.attention.layer_norm_rms_epsilon")
    check(eps is not None and abs(eps - cfg["rms_norm_eps"]) < 1e-9 + 1e-6 * cfg["rms_norm_eps"],
          f"{os.path.basename(path)}: rms eps {eps}")
    for k in ["tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
              "tokenizer.ggml.eos_token_id", "tokenizer.chat_template"]:
        check(k in fields, f"{os.path.basename(path)}: has {k}")
    ntok = len(fields["tokenizer.ggml.tokens"].data) if "tokenizer.ggml.tokens" in fields else -1
    check(ntok == cfg["vocab_size"], f"{os.path.basename(path)}: {ntok} tokens, vocab_size {cfg['vocab_size']}")

    by_name = {t.name: t for t in r.tensors}
    expected = {gguf_name(k): k for k in hf_tensors}
    extra = set(by_name) - set(expected) - {"rope_freqs.weight"}
    missing = set(expected) - set(by_name)
    check(not extra and not missing, f"{os.path.basename(path)}: {len(by_name)} tensors; "
          f"missing {sorted(missing)[:5]}, unexpected {sorted(extra)[:5]}")
    worst, worst_name, types = 0.0, "", {}
    for g, hf in expected.items():
        t = by_name.get(g)
        if t is None:
            continue
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
        w = dequantize(t.data, t.tensor_type).astype(np.float32)
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        w = w.reshape(shape)
        ref = hf_tensors[hf]
        if tuple(ref.shape) != shape:
            check(False, f"{os.path.basename(path)}: {g} shape {shape} vs {hf} {tuple(ref.shape)}")
            continue
        if ".attn_q." in g:
            w = unpermute(w, cfg["num_attention_heads"])
        elif ".attn_k." in g:
            w = unpermute(w, cfg["num_key_value_heads"])
        scale = float(np.abs(ref).max()) or 1.0
        d = float(np.abs(w - ref).max()) / scale
        if d > worst:
            worst, worst_name = d, g
    print(f"      {os.path.basename(path)}: tensor types {types}; largest difference from the "
          f"Hugging Face tensors {worst:.2e} of the tensor's max |w| ({worst_name})")
    return worst


def llama_cpp_loss(model_path, samples, lora_path=None, one_token_batches=False):
    """Validation loss computed by llama.cpp. `one_token_batches` evaluates token by token: the
    llama-cpp-python 0.3.36 CPU build we checked with crashes (SIGSEGV) in its batched matmul
    for quantized tensors on an AVX-512/AMX machine, with llama.cpp's own Q8_0/Q4_1 files too."""
    import numpy as np
    from llama_cpp import Llama
    n_ctx = max(len(ids) for ids, _ in samples) + 8
    kw = {"lora_path": lora_path} if lora_path else {}
    batch = 1 if one_token_batches else n_ctx
    llm = Llama(model_path=model_path, n_ctx=n_ctx, n_batch=batch, n_ubatch=batch, logits_all=True,
                verbose=False, n_threads=2, **kw)
    total, n = 0.0, 0
    for ids, mask in samples:
        llm.reset()
        llm.eval(ids)
        logits = np.array(llm.scores[: len(ids)], dtype=np.float64)
        m = logits.max(axis=1, keepdims=True)
        lse = (m[:, 0] + np.log(np.exp(logits - m).sum(axis=1)))
        for p in range(1, len(ids)):
            if mask[p]:
                total += lse[p - 1] - logits[p - 1, ids[p]]
                n += 1
    return total / n, n


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf", required=True, help="fused Hugging Face directory")
    ap.add_argument("--gguf", action="append", default=[], help="fused GGUF file (repeatable)")
    ap.add_argument("--data", required=True, help="chat JSONL file")
    ap.add_argument("--base", help="the base model (GGUF file or Hugging Face directory)")
    ap.add_argument("--adapter", help="the PEFT adapter directory that was fused")
    ap.add_argument("--adapter-gguf", help="the adapter exported by `your_ai export-adapter`")
    ap.add_argument("--your-ai", help="your_ai binary: also compare `your_ai eval` on each GGUF")
    ap.add_argument("--max-seq-length", type=int, default=1024)
    ap.add_argument("--tolerance", type=float, default=0.01,
                    help="loss agreement (nats) for f32/f16 outputs; 8-bit files get 3x")
    args = ap.parse_args()

    import numpy as np
    import torch
    import transformers
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = json.load(open(os.path.join(args.hf, "config.json")))
    tok = AutoTokenizer.from_pretrained(args.hf)
    check(bool(tok.chat_template), "transformers reads the chat template from tokenizer_config.json")

    def encode(text):
        e = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        return e["input_ids"], e["offset_mapping"]

    examples = load_examples(args.data)
    samples = [encode_chat(tok, encode, ex["messages"], ex.get("tools"), args.max_seq_length)
               for ex in examples]
    fused = AutoModelForCausalLM.from_pretrained(args.hf, dtype=torch.float32).eval()
    fused_loss, n = hf_loss(fused, samples, 4)
    print(f"      transformers {transformers.__version__}: fused Hugging Face model loss {fused_loss:.4f} "
          f"over {n} tokens of {args.data}")
    check(math.isfinite(fused_loss), "fused Hugging Face model gives a finite loss")

    if args.base and args.adapter:
        import peft
        if args.base.endswith(".gguf"):
            d, name = os.path.split(os.path.abspath(args.base))
            base = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
        else:
            base = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
        pm = peft.PeftModel.from_pretrained(base.eval(), args.adapter).eval()
        unmerged, _ = hf_loss(pm, samples, 4)
        check(abs(unmerged - fused_loss) < args.tolerance,
              f"transformers: base + adapter (PEFT) {unmerged:.4f} vs fused {fused_loss:.4f} "
              f"(diff {fused_loss - unmerged:+.4f})")

    hf_tensors = {}
    index = os.path.join(args.hf, "model.safetensors.index.json")
    files = sorted(set(json.load(open(index))["weight_map"].values())) if os.path.exists(index) \
        else ["model.safetensors"]
    for f in files:
        hf_tensors.update({k: v.astype(np.float32) for k, v in load_file(os.path.join(args.hf, f)).items()})

    have_llama_cpp = True
    try:
        import llama_cpp
        print(f"      llama-cpp-python {llama_cpp.__version__}")
    except ImportError:
        have_llama_cpp = False
        print("      llama-cpp-python not installed: llama.cpp checks skipped")

    for g in args.gguf:
        check_gguf_file(g, hf_tensors, cfg)
        if have_llama_cpp:
            name = os.path.basename(g)
            dense = any(t in name for t in ("f16", "f32", "bf16"))
            loss, _ = llama_cpp_loss(g, samples, one_token_batches=not dense)
            # Requantizing after the merge costs quality: 8-bit files get 3x the tolerance,
            # 4-bit ones 10x (their difference is the quantization's, reported).
            tol = args.tolerance * (1 if dense else 3 if "8" in name else 10)
            check(abs(loss - fused_loss) < tol,
                  f"llama.cpp: {name} loss {loss:.4f} vs transformers fused {fused_loss:.4f} "
                  f"(diff {loss - fused_loss:+.4f}, bound {tol})")
            if args.your_ai:
                ours = your_ai_eval(args.your_ai, g, args.data, None, args.max_seq_length)[0]
                check(abs(ours - loss) < tol,
                      f"your_ai eval reads {name} as llama.cpp does: {ours:.4f} vs {loss:.4f}")

    if have_llama_cpp and args.adapter_gguf and args.base and args.base.endswith(".gguf"):
        base_loss, _ = llama_cpp_loss(args.base, samples, one_token_batches=True)
        lora_loss, _ = llama_cpp_loss(args.base, samples, lora_path=args.adapter_gguf,
                                      one_token_batches=True)
        check(abs(lora_loss - base_loss) > args.tolerance,
              f"llama.cpp: the exported adapter changes the loss ({base_loss:.4f} -> {lora_loss:.4f})")
        # The base here is the quantized file itself (the fused model merged into its
        # dequantized weights), so the two agree as closely as the f16 fuse does.
        check(abs(lora_loss - fused_loss) < args.tolerance,
              f"llama.cpp: base + --lora {os.path.basename(args.adapter_gguf)} {lora_loss:.4f} vs "
              f"transformers fused {fused_loss:.4f} (diff {lora_loss - fused_loss:+.4f})")

    print(f"{len(FAILURES)} check(s) failed" if FAILURES else "all checks passed")
    sys.exit(1 if FAILURES else 0)


if __name__ == "__main__":
    main()
