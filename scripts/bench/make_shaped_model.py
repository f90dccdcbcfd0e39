#!/usr/bin/env python3
"""Writes a Hugging Face model directory with a known model's shapes and random bf16 weights,
sharded like a real checkpoint, so load and training memory can be measured at full scale
without downloading the model. Standard library only; numpy, where there is one, makes it
faster, and the shards are written in parallel.

    make_shaped_model.py SHAPE OUT --tokenizer DIR [--shard-bytes N] [--seed S] [--layers N]

SHAPE is a key of presets/model_shapes.json (llama-8b, hermes-mistral-7b, ...). DIR is any
Hugging Face directory whose tokenizer files are copied (scripts/bench/load_8b.sh makes one from
SmolLM2); its ids are all below the shape's vocabulary, so any text encodes.

Weights are drawn uniformly in magnitude from [2^-6, 2^-5) with a random sign (bf16 with
exponent 121 and random mantissa), norms are 1: the forward pass stays finite at any depth.
"""
import argparse
import json
import multiprocessing
import os
import random
import shutil
import struct
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
CHUNK = 1 << 25  # elements generated at a time

# Low byte: the exponent's low bit (1) and 7 random mantissa bits; high byte: a random sign and
# the exponent's top 7 bits (0b0111100): bf16 values of ±[2^-6, 2^-5).
LOW = bytes((0x80 | (b & 0x7F)) for b in range(256))
HIGH = bytes((0x3C | (b & 0x80)) for b in range(256))
ONE = struct.pack("<H", 0x3F80)


def tensors(cfg):
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim") or h // heads
    out = [("model.embed_tokens.weight", [v, h], "random")]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        out += [
            (f"{p}.input_layernorm.weight", [h], "ones"),
            (f"{p}.self_attn.q_proj.weight", [heads * d, h], "random"),
            (f"{p}.self_attn.k_proj.weight", [kv * d, h], "random"),
            (f"{p}.self_attn.v_proj.weight", [kv * d, h], "random"),
            (f"{p}.self_attn.o_proj.weight", [h, heads * d], "random"),
            (f"{p}.post_attention_layernorm.weight", [h], "ones"),
            (f"{p}.mlp.gate_proj.weight", [inter, h], "random"),
            (f"{p}.mlp.up_proj.weight", [inter, h], "random"),
            (f"{p}.mlp.down_proj.weight", [h, inter], "random"),
        ]
    out.append(("model.norm.weight", [h], "ones"))
    if not cfg.get("tie_word_embeddings", False):
        out.append(("lm_head.weight", [v, h], "random"))
    return out


def count(shape):
    n = 1
    for s in shape:
        n *= s
    return n


try:  # numpy, where there is one, only makes the random values faster
    import numpy as np
except ImportError:
    np = None


def write_values(f, n, kind, rng):
    done = 0
    while done < n:
        k = min(CHUNK, n - done)
        if kind == "ones":
            f.write(ONE * k)
        elif np is not None:
            # The same bits as LOW and HIGH below, as little-endian u16: a random sign and
            # mantissa, the exponent fixed. In place: numpy's generator is 4x faster than
            # randbytes, which matters for 16 GB inside a timed GPU check.
            v = rng.integers(0, 1 << 16, k, dtype="<u2")
            v &= 0x807F
            v |= 0x3C80
            f.write(memoryview(v))
        else:
            buf = bytearray(2 * k)
            buf[0::2] = rng.randbytes(k).translate(LOW)
            buf[1::2] = rng.randbytes(k).translate(HIGH)
            f.write(buf)
        done += k


def write_shard(path, items, seed):
    # Each shard has its own stream, so the shards can be written in parallel.
    rng = np.random.default_rng(seed) if np is not None else random.Random(repr(seed))
    header, offset = {}, 0
    for name, shape, _ in items:
        size = 2 * count(shape)
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path + ".partial", "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name, shape, kind in items:
            write_values(f, count(shape), kind, rng)
    os.replace(path + ".partial", path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("shape")
    ap.add_argument("out")
    ap.add_argument("--tokenizer", required=True, help="a Hugging Face directory with tokenizer.json")
    ap.add_argument("--shard-bytes", type=int, default=5_000_000_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, help="keep only this many blocks (a rehearsal of a check)")
    a = ap.parse_args()

    shapes = json.load(open(os.path.join(ROOT, "presets", "model_shapes.json")))
    if a.shape not in shapes or a.shape.startswith("_"):
        sys.exit(f"unknown shape {a.shape!r}; known: {', '.join(k for k in shapes if not k.startswith('_'))}")
    cfg = dict(shapes[a.shape])
    if a.layers is not None:
        if not 0 < a.layers <= cfg["num_hidden_layers"]:
            sys.exit(f"--layers {a.layers}: {a.shape} has {cfg['num_hidden_layers']} blocks")
        cfg["num_hidden_layers"] = a.layers
    tok_cfg_path = os.path.join(a.tokenizer, "config.json")
    tok_cfg = json.load(open(tok_cfg_path)) if os.path.exists(tok_cfg_path) else {}
    for key in ("bos_token_id", "eos_token_id"):
        if key in tok_cfg:
            cfg[key] = tok_cfg[key]
    cfg.update({"model_type": "llama", "torch_dtype": "bfloat16", "hidden_act": "silu"})
    # Contexts this tool is asked for are short; keep RoPE plain (no llama3 scaling needed).
    cfg.pop("rope_scaling", None)

    os.makedirs(a.out, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        src = os.path.join(a.tokenizer, name)
        if os.path.exists(src):
            shutil.copy(src, os.path.join(a.out, name))
    if not os.path.exists(os.path.join(a.out, "tokenizer.json")):
        sys.exit(f"{a.tokenizer}: no tokenizer.json to copy")

    shards, cur, cur_bytes = [], [], 0
    for t in tensors(cfg):
        size = 2 * count(t[1])
        if cur and cur_bytes + size > a.shard_bytes:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(t)
        cur_bytes += size
    shards.append(cur)
    weight_map, total, jobs = {}, 0, []
    for i, items in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        jobs.append((os.path.join(a.out, name), items, [a.seed, i]))
        for t in items:
            weight_map[t[0]] = name
            total += 2 * count(t[1])
    print(f"writing {len(shards)} shards", file=sys.stderr)
    with multiprocessing.Pool(min(len(jobs), os.cpu_count() or 1)) as pool:
        pool.starmap(write_shard, jobs)
    with open(os.path.join(a.out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    print(f"{a.out}: {a.shape} shapes, {total / 1e9:.2f} GB of bf16 in {len(shards)} shards")


if __name__ == "__main__":
    main()
