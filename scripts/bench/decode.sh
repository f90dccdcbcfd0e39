#!/usr/bin/env bash
# Decoding speed side by side: `your_ai generate` and llama.cpp (llama-cpp-python) on the same
# GGUF, the same prompt through the model's chat template, greedy, the same number of new
# tokens (end tokens ignored) and threads. The tools take turns run after run, so that a
# machine's changing load falls on both. Prints each run's decode tokens/s and the medians.
#
# Usage: scripts/bench/decode.sh [BIN]
#   MODEL    the GGUF (default: the SmolLM2 test model, fetched if needed); a BF16 or F16 GGUF
#            (`your_ai fuse --format gguf --gguf-type bf16|f16`) measures decoding from
#            half-precision weights
#   THREADS  threads for both (default: 2)
#   TOKENS   new tokens per run (default: 128, at most 900)
#   RUNS     runs per row (default: 5)
#   ROWS     your_ai rows, space-separated: gguf (the default: the GGUF's weights as stored),
#            dense (--dtype f32: the weights dequantized to f32) (default: "gguf dense")
#   PYTHON   a python with llama-cpp-python (default: python3; the llama.cpp row is skipped
#            when it is missing)
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=${1:-target/release/your_ai}
model=${MODEL:-$(./scripts/fetch_model.sh)}
threads=${THREADS:-2}
tokens=${TOKENS:-128}
runs=${RUNS:-5}
rows=${ROWS:-"gguf dense"}
python=${PYTHON:-python3}
prompt="Write a long story about a dragon who learns to sail."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

cat >"$tmp/llama.py" <<'PY'
import sys, time
import llama_cpp
from llama_cpp.llama_chat_format import Jinja2ChatFormatter
model, threads, tokens, prompt = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
llm = llama_cpp.Llama(model_path=model, n_threads=threads, n_threads_batch=threads, n_ctx=1024,
                      n_batch=1024,
                      verbose=False)
# The prompt through the model's own chat template, as `your_ai generate` renders it.
fmt = Jinja2ChatFormatter(template=llm.metadata["tokenizer.chat_template"], eos_token="",
                          bos_token="", add_generation_prompt=True)
text = fmt(messages=[{"role": "user", "content": prompt}]).prompt
llm.eval(llm.tokenize(text.encode(), add_bos=False, special=True))
t0 = time.perf_counter()
for _ in range(tokens):
    llm.eval([int(llm.scores[llm.n_tokens - 1].argmax())])
print(f"{tokens / (time.perf_counter() - t0):.1f}")
PY
llama=false
if "$python" -c "import llama_cpp" 2>/dev/null; then
  llama=true
  version=$("$python" -c "import llama_cpp; print(llama_cpp.__version__)")
fi

declare -A rates
for _ in $(seq "$runs"); do
  for row in $rows; do
    case $row in
      gguf) flags=() ;;
      dense) flags=(--dtype f32) ;;
      *) echo "unknown row $row" >&2; exit 2 ;;
    esac
    line=$("$bin" generate --model "$model" "${flags[@]}" --threads "$threads" --prompt "$prompt" \
      --max-tokens "$tokens" --temperature 0 --ignore-eos 2>&1 >/dev/null | grep -o '[0-9.]* tokens/s' | tail -1)
    rates[$row]="${rates[$row]:-} ${line%% *}"
  done
  if $llama; then
    rates[llama]="${rates[llama]:-} $("$python" "$tmp/llama.py" "$model" "$threads" "$tokens" "$prompt")"
  fi
done

median() { tr ' ' '\n' | grep . | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
for row in $rows; do
  printf '%-22s%s  median %s tokens/s\n' "your_ai $row" "${rates[$row]}" "$(median <<<"${rates[$row]}")"
done
if $llama; then
  printf '%-22s%s  median %s tokens/s\n' "llama.cpp $version" "${rates[llama]}" "$(median <<<"${rates[llama]}")"
else
  echo "llama.cpp: skipped ($python has no llama_cpp; pip install llama-cpp-python)"
fi
echo "($threads threads, $tokens new tokens, $(basename "$model"))"
