#!/usr/bin/env python3
"""Generate golden chat-template renderings with Hugging Face transformers.

Reads the verbatim templates in tests/fixtures/chat_templates/*.jinja, renders a
fixed set of conversations with transformers' own renderer, and writes
tests/fixtures/chat_templates/goldens.json. The Rust (minijinja) renderer must
reproduce every "expected" string byte for byte.

Setup (outside the repo; no torch, no Hugging Face hub access needed):
    python3 -m venv /tmp/venv-tpl
    /tmp/venv-tpl/bin/pip install transformers jinja2
    /tmp/venv-tpl/bin/python scripts/reference/chat_template_goldens.py
"""
import copy
import json
from datetime import datetime
from pathlib import Path

import transformers
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast
from transformers.utils.chat_template_utils import render_jinja_template

FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "chat_templates"
FIXED_DATE = "26 Jul 2024"
TODAY_PLACEHOLDER = "{{TODAY}}"

# Special tokens per template (None = the model has no such token, so the
# variable is left undefined in the template, exactly as apply_chat_template does).
TOKENS = {
    "llama31": ("<|begin_of_text|>", "<|eot_id|>"),
    "llama32": ("<|begin_of_text|>", "<|eot_id|>"),
    "mistral": ("<s>", "</s>"),
    "smollm2": ("<|im_start|>", "<|im_end|>"),
    "qwen25": (None, "<|im_end|>"),
    "hermes": ("<|begin_of_text|>", "<|im_end|>"),
}

# One JSON-schema tool with nested object/array parameters and non-ASCII/HTML text.
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather — météo & <forecast> for a city",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {"type": "string", "description": "City and country, e.g. \"Paris, France\""},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "description": "Temperature unit"},
                "options": {
                    "type": "object",
                    "description": "Extra options",
                    "properties": {
                        "days": {"type": "integer", "description": "Forecast days"},
                        "include": {"type": "array", "items": {"type": "string"}, "description": "Fields"},
                    },
                    "required": ["days"],
                },
            },
            "required": ["location"],
        },
    },
}

SYS = {"role": "system", "content": "You are a helpful assistant."}
U = lambda c: {"role": "user", "content": c}  # noqa: E731
A = lambda c: {"role": "assistant", "content": c}  # noqa: E731


def call(name, args, call_id="call00001"):
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}


ARGS = {"location": "Paris, France", "unit": "celsius", "options": {"days": 2, "include": ["wind", "humidité"]}}
TOOL_RESULT = '{"temperature": 22.5, "condition": "ensoleillé <sunny> & calm"}'

# (case name, messages, tools, add_generation_prompt, extra template kwargs)
COMMON = [
    ("single_user", [U("Hello! How are you?")], None, True, {}),
    ("system_two_turn", [SYS, U("What is 2+2?"), A("2+2 equals 4."), U("And 3+3?")], None, True, {}),
    ("system_three_turn",
     [SYS, U("Name a colour."), A("Blue."), U("Another one?"), A("Green."), U("One more."), A("Red, the last one.")],
     None, False, {}),
    ("non_ascii",
     [{"role": "system", "content": "Réponds en français. 回答要简洁。"}, U("Café, naïve, 中文, emoji 🦀🚀?"),
      A("Oui ! Café ☕ — 你好 👋 🎉"), U("Merci 🙏")], None, True, {}),
    ("whitespace_html",
     [U("  <b>bold</b> & 'single' \"double\"  \n"), A("\n  Answer with <tags> & spaces  \n")], None, False, {}),
    ("user_assistant_no_gen", [U("Ping"), A("Pong")], None, False, {}),
]

TOOL_CASES = [
    ("tools_prompt", [U("What's the weather in Paris?")], [WEATHER_TOOL], True, {}),
    ("tools_call_roundtrip",
     [{"role": "system", "content": "You are a weather bot."}, U("What's the weather in Paris?"),
      {"role": "assistant", "content": None, "tool_calls": [call("get_weather", ARGS)]},
      {"role": "tool", "tool_call_id": "call00001", "name": "get_weather", "content": TOOL_RESULT},
      A("It is 22.5 °C and sunny in Paris.")], [WEATHER_TOOL], False, {}),
    # OpenAI-style: arguments given as a JSON *string* instead of a dict.
    ("tools_call_string_args",
     [U("Weather in Paris?"), {"role": "assistant", "tool_calls": [call("get_weather", json.dumps(ARGS, ensure_ascii=False))]},
      {"role": "tool", "content": TOOL_RESULT}], [WEATHER_TOOL], True, {}),
]

PARALLEL = ("tools_parallel_calls",
            [U("Weather in Paris and Rome?"),
             {"role": "assistant", "tool_calls": [call("get_weather", {"location": "Paris"}, "call00001"),
                                                  call("get_weather", {"location": "Rome"}, "call00002")]},
             {"role": "tool", "tool_call_id": "call00001", "content": "sunny"},
             {"role": "tool", "tool_call_id": "call00002", "content": "rainy"},
             A("Paris is sunny, Rome is rainy.")], [WEATHER_TOOL], False, {})

LLAMA_EXTRA = [
    ("tools_empty_list", [U("Hi")], [], True, {}),
    ("date_string_custom", [U("What day is it?")], None, True, {"date_string": "01 Jan 2025"}),
    ("tools_in_system_message", [SYS, U("Weather?")], [WEATHER_TOOL], True, {"tools_in_user_message": False}),
    ("no_date_string", [U("What day is it?")], None, True, {"date_string": None}),  # None = leave undefined
]

MISTRAL_ERRORS = [
    ("error_non_alternating", [U("one"), U("two")], None, True, {}),
    ("error_assistant_first", [A("I speak first"), U("ok")], None, True, {}),
    ("error_tool_role", [U("hi"), A("calling"), {"role": "tool", "content": "x"}], None, True, {}),
]

CASES = {
    "llama31": COMMON + TOOL_CASES + LLAMA_EXTRA + [(PARALLEL[0] + "_error",) + PARALLEL[1:]],
    "llama32": [COMMON[0], COMMON[1], TOOL_CASES[1], LLAMA_EXTRA[3]],
    "mistral": COMMON + MISTRAL_ERRORS,
    "smollm2": COMMON,
    "qwen25": COMMON + TOOL_CASES + [PARALLEL],
    # Hermes' tool_use template iterates `tools` unconditionally: render common cases with tools too,
    # plus one case without tools to record that it raises.
    "hermes": [(n + "_with_tools", m, [WEATHER_TOOL], g, k) for n, m, _, g, k in COMMON[:4]]
    + TOOL_CASES + [PARALLEL, ("error_no_tools", [U("Hi")], None, True, {})],
}


def make_tokenizer(bos, eos):
    """Trivial fast tokenizer: only its special tokens matter for rendering."""
    specials = {k: v for k, v in (("bos_token", bos), ("eos_token", eos)) if v is not None}
    tok = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, **specials)


def byte_spans(rendered, messages):
    """UTF-8 byte [start, end) of each assistant content found verbatim, searching in message order."""
    spans, pos = [], 0
    for m in messages:
        c = m.get("content")
        if not isinstance(c, str) or not c:
            continue
        i = rendered.find(c, pos)
        if i < 0:
            continue  # not verbatim (e.g. trimmed by the template): skipped
        pos = i + len(c)
        if m["role"] == "assistant":
            start = len(rendered[:i].encode("utf-8"))
            spans.append([start, start + len(c.encode("utf-8"))])
    return spans


def main():
    out = []
    for name, cases in CASES.items():
        template = (FIXTURES / f"{name}.jinja").read_text(encoding="utf-8")
        bos, eos = TOKENS[name]
        tok = make_tokenizer(bos, eos)
        for case, messages, tools, gen, extra in cases:
            kwargs = dict(extra)
            if name.startswith("llama") and "date_string" not in kwargs:
                kwargs["date_string"] = FIXED_DATE
            kwargs = {k: v for k, v in kwargs.items() if v is not None}
            rec = {"template": name, "case": case, "messages": messages, "tools": tools,
                   "add_generation_prompt": gen, "bos_token": bos, "eos_token": eos}
            if "date_string" in kwargs:
                rec["date_string"] = kwargs["date_string"]
            rec["extra_kwargs"] = kwargs  # every template variable besides messages/tools/gen/bos/eos
            try:
                expected = tok.apply_chat_template(copy.deepcopy(messages), tools=tools, chat_template=template,
                                                   add_generation_prompt=gen, tokenize=False, **kwargs)
                # Cross-check against the lower-level renderer (None-valued keys dropped, as apply_chat_template does).
                plain = [{k: v for k, v in m.items() if v is not None} for m in messages]
                specials = {k: v for k, v in (("bos_token", bos), ("eos_token", eos)) if v is not None}
                low, _ = render_jinja_template([plain], tools=tools, chat_template=template,
                                               add_generation_prompt=gen, **specials, **kwargs)
                assert low[0] == expected, (name, case)
            except Exception as e:  # noqa: BLE001 - record template errors as data
                rec.update(expected=None, expected_error=True, error=f"{type(e).__name__}: {e}")
                out.append(rec)
                continue
            if "date_string" not in kwargs:
                today = datetime.now().strftime("%d %b %Y")
                if f"Today Date: {today}" in expected:  # template called strftime_now()
                    expected = expected.replace(f"Today Date: {today}", f"Today Date: {TODAY_PLACEHOLDER}")
                    rec["today_placeholder"] = TODAY_PLACEHOLDER
            rec.update(expected=expected, expected_error=False, assistant_spans=byte_spans(expected, messages))
            out.append(rec)
    (FIXTURES / "goldens.json").write_text(json.dumps(out, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {len(out)} cases with transformers {transformers.__version__}")


if __name__ == "__main__":
    main()
