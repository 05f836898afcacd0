#!/usr/bin/env python3
"""Generate the PyTorch/transformers reference fixtures under tests/fixtures/.

Run from the repository root:

    /opt/ref/bin/python tests/reference/make_fixtures.py

Everything is deterministic (fixed seeds, single-threaded CPU, fixed corpus), and
everything under tests/fixtures/ is rewritten.  See tests/reference/README.md.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import platform
import shutil
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import numpy as np  # noqa: E402
import safetensors  # noqa: E402
import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
transformers.utils.logging.disable_progress_bar()
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

REPO = Path(__file__).resolve().parents[2]
FIX = REPO / "tests" / "fixtures"

# --------------------------------------------------------------------------------------------
# Tokenizer definitions
# --------------------------------------------------------------------------------------------

# Pre-tokenizer regex of Meta's Llama-3 tokenizer (tiktoken pat_str == tokenizer.json Split).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Pre-tokenizer regex of Qwen2 (single digits).
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

BPE_VOCAB_SIZE = 480  # 256 byte tokens + 224 merges; special tokens come after (ids 480..)

LLAMA3_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|reserved_special_token_0|>",
]
CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Exact chat template of Meta-Llama-3-8B-Instruct's tokenizer_config.json.
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Qwen2-style ChatML template (default system message, loop.first, attribute access).  Every tag
# strips the whitespace around it, so the result does not depend on trim_blocks/lstrip_blocks.
CHATML_CHAT_TEMPLATE = """{%- for message in messages %}
    {%- if loop.first and messages[0].role != 'system' %}
        {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
    {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}"""

# Small training corpus (English chat-like text, numbers, code, unicode).  Fixed: changing it
# changes every token id in the fixtures.
CORPUS = [
    "You are a helpful assistant. You are a helpful assistant. You are a helpful assistant.",
    "The user asks a question and the assistant gives a short, helpful answer.",
    "What is the capital of France? The capital of France is Paris. Paris is in France.",
    "What is the capital of Italy? The capital of Italy is Rome.",
    "The answer is 42. The answer is 12 + 30 = 42. Maybe the answer is 40?",
    "Name a primary color. Red, blue and yellow are the primary colors. Blue is a primary color.",
    "Hi! Can you help me? Of course. What do you need? Tell me a fun fact about cats.",
    "Cats sleep for about 13 to 16 hours a day. Cats can rotate their ears. I like cats and dogs.",
    "The quick brown fox jumps over the lazy dog. The lazy dog sleeps in the sun.",
    "Once upon a time there was a little robot. The little robot walked to the market every morning.",
    "It bought apples, bread and milk for the old man who lived next door.",
    "One day the market was closed, so the robot went to the farm and came back with apples.",
    "Write a short poem about the sea. The sea is blue and the waves are white.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n",
    "for i in range(10):\n    print(i * i)\n",
    "Numbers: 1, 2, 3, 10, 100, 1000, 2024, 3.14159, 0.5, -7.",
    "Translate 'coffee' to French: café. Voilà! C'est déjà le matin. Merci beaucoup.",
    "Emoji: 🙂 👍 ☕ 🤷 🚀 — “quotes” «guillemets» … ellipsis.",
    "I think it is Lyon. I don't know. I'm not sure, but I'd say it's fine. We'll see, they've gone.",
    "Thanks! Thank you very much. You're welcome. Have a nice day.",
    "Please explain the difference between a list and a tuple in Python.",
    "A list is mutable and a tuple is immutable. Both can hold any kind of value.",
    "The model learns from the preferred response and avoids the rejected response.",
    "Source models give the best response; the target model learns to prefer it.",
]

# --------------------------------------------------------------------------------------------
# Data rows
# --------------------------------------------------------------------------------------------


def a(content: str) -> dict:
    return {"role": "assistant", "content": content}


def u(content: str) -> dict:
    return {"role": "user", "content": content}


def s(content: str) -> dict:
    return {"role": "system", "content": content}


ROWS = [
    {   # (1) authors' format: prompt is one message dict, chosen = [y_ws, y_wt], rejected = [y_l]
        "prompt_id": "row-1-single-dict",
        "prompt": u("What is the capital of France?"),
        "chosen": [a("The capital of France is Paris."), a("Paris.")],
        "rejected": [a("I think it is Lyon.")],
    },
    {   # (2) system + user list, K=2 sources + target, two rejected
        "prompt_id": "row-2-system-k2-r2",
        "prompt": [s("You are a concise math tutor."), u("What is 12 + 30?")],
        "chosen": [a("12 + 30 = 42."), a("The answer is 42."), a("42")],
        "rejected": [a("It is 1230."), a("Maybe 40?")],
    },
    {   # (3) plain-string prompt, message-dict completions -> conversational
        "prompt_id": "row-3-string-prompt",
        "prompt": "Name a primary color.",
        "chosen": [a("Blue is a primary color."), a("Red.")],
        "rejected": [a("Green, probably.")],
    },
    {   # (4) multi-turn prompt
        "prompt_id": "row-4-multi-turn",
        "prompt": [u("Hi! Can you help me?"), a("Of course. What do you need?"), u("Tell me a fun fact about cats.")],
        "chosen": [a("Cats sleep for about 13 to 16 hours a day."), a("Cats can rotate their ears.")],
        "rejected": [a("I don't like cats.")],
    },
    {   # (5) unicode, emoji, newlines, tabs, leading/trailing spaces (the Llama-3 template trims
        #     content; the ChatML one does not). "e\u0301" is a decomposed é (NFC-normalised by the
        #     ChatML tokenizer only).
        "prompt_id": "row-5-unicode",
        "prompt": u("  Translate 'coffee' → French? 🙂\nThanks!  "),
        "chosen": [a("  «Cafe\u0301» — voilà ☕\n\nMerci!  "), a("C'est «café». 👍")],
        "rejected": [a("\tNo idea… 🤷  ")],
    },
    {   # (6) longer prompt and responses (truncated by the truncation case)
        "prompt_id": "row-6-long",
        "prompt": [
            s("You are a careful assistant."),
            u("A little robot walked to the market every morning to buy apples and bread. "
              "One day the market was closed. What did the robot do?"),
        ],
        "chosen": [
            a("The robot went to the farm instead and came back with apples and bread."),
            a("It went to the farm and bought apples."),
        ],
        "rejected": [a("The robot went home and did nothing.")],
    },
]

ROWS_PLAIN = [
    {"prompt_id": "plain-1", "prompt": "The quick brown fox",
     "chosen": [" jumps over the lazy dog.", " jumps."], "rejected": [" sleeps."]},
    {"prompt_id": "plain-2", "prompt": "def add(a, b):\n",
     "chosen": ["    return a + b\n", "    return b + a"], "rejected": ["    pass"]},
    {"prompt_id": "plain-3", "prompt": "Numbers: 1, 2, 3,",
     "chosen": [" 4, 5, 6.", " 4."], "rejected": [" 10, 100, 1000."]},
]

ROWS_PRETOK = [
    # ids are arbitrary (< 300).  Token id 0 (== the pad id) appears inside real sequences on
    # purpose: padding must come from attention_mask / lengths, never from "id == 0".
    {"prompt_input_ids": [5, 17, 42, 99, 123, 7],
     "chosen_input_ids": [[64, 65, 66, 67], [0, 12, 255]],
     "rejected_input_ids": [[299, 3, 3, 3, 1]]},
    {"prompt_input_ids": [0, 250, 31],
     "chosen_input_ids": [[10, 20, 30, 40, 50, 60, 70], [11], [200, 201]],
     "rejected_input_ids": [[150, 151, 152], [0]]},
]

# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------

VOCAB = 512
INIT_RANGE = 0.25  # N(0, 0.25) for every linear/embedding weight -> logit std ~ 2

MODELS = {
    "llama-gqa": dict(
        tokenizer="llama3",
        save_dtype=torch.bfloat16,
        max_shard_size="100KB",
        config=dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, rope_theta=500000.0,
                    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
                    max_position_embeddings=256, tie_word_embeddings=False, rms_norm_eps=1e-5),
        seed=1001,
    ),
    "llama-tied": dict(
        tokenizer="chatml",
        save_dtype=torch.float32,
        max_shard_size=None,
        config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=4, rope_theta=10000.0, rope_scaling=None,
                    max_position_embeddings=256, tie_word_embeddings=True, rms_norm_eps=1e-6),
        seed=1002,
    ),
    "llama-linear": dict(
        tokenizer="llama3",
        save_dtype=torch.float16,
        max_shard_size=None,
        config=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=1, head_dim=24, rope_theta=10000.0,
                    rope_scaling={"rope_type": "linear", "factor": 2.0},
                    max_position_embeddings=256, tie_word_embeddings=False, rms_norm_eps=1e-5),
        seed=1003,
    ),
}

DTYPE_NAME = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}

# Truncation settings per tokenizer (recorded in expected_logps.json; checked below).
#   (max_length, max_prompt_length): row 6 gets prompt AND completion truncation, rows 1/3 none.
#   (max_length, None): prompts kept whole, only completions cut (rows 6 (+4 for chatml)).
TRUNC = {
    "llama3": [(40, 24), (80, None)],
    "chatml": [(44, 28), (76, None)],
}

# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def write_json(path: Path, obj, indent=2) -> None:
    path.write_text(json.dumps(obj, indent=indent, ensure_ascii=False) + "\n", encoding="utf-8")


def write_jsonl(path: Path, rows) -> None:
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def write_expected_logps(path: Path, cases) -> None:
    """{"cases": [...]} with one row object per line (valid JSON, diff-friendly, small)."""
    lines = ['{"cases": [']
    for ci, c in enumerate(cases):
        head = {k: c[k] for k in ("data", "max_length", "max_prompt_length")}
        lines.append(" " + json.dumps(head)[:-1] + ', "rows": [')
        for ri, r in enumerate(c["rows"]):
            lines.append("  " + json.dumps(r) + ("," if ri + 1 < len(c["rows"]) else ""))
        lines.append(" ]}" + ("," if ci + 1 < len(cases) else ""))
    lines.append("]}")
    text = "\n".join(lines) + "\n"
    assert json.loads(text) == {"cases": cases}
    path.write_text(text, encoding="utf-8")


def read_jsonl(path: Path):
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def train_bpe():
    """Train the shared byte-level BPE; returns (vocab, merges)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE, min_frequency=2, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[],
    )
    # Chat role names and the fixture texts are weighted up so the fixture sequences stay short.
    roles = ["system", "user", "assistant", "<|im_start|>system\n", "<|im_start|>user\n",
             "<|im_start|>assistant\n"]
    texts = [m["content"] for rows in (ROWS, ROWS_PLAIN) for r in rows for m in _all_messages(r)]
    corpus = CORPUS + roles * 20 + texts * 4
    tok.train_from_iterator(corpus, trainer=trainer)
    d = json.loads(tok.to_str())
    vocab = d["model"]["vocab"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in d["model"]["merges"]]
    assert len(vocab) == BPE_VOCAB_SIZE, len(vocab)
    assert all(b in vocab for b in pre_tokenizers.ByteLevel.alphabet())
    return vocab, merges


def _all_messages(row):
    out = []
    for key in ("prompt", "chosen", "rejected"):
        v = row[key]
        items = v if isinstance(v, list) else [v]
        for it in items:
            out.append(it if isinstance(it, dict) else {"content": it})
    return out


def build_llama3_tokenizer(vocab, merges) -> Tokenizer:
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in LLAMA3_SPECIALS])
    bos = "<|begin_of_text|>"
    bos_id = tok.token_to_id(bos)
    # Same structure as Meta-Llama-3's tokenizer.json: ByteLevel (offsets only) + TemplateProcessing.
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True),
        processors.TemplateProcessing(
            single=f"{bos}:0 $A:0",
            pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, bos_id)],
        ),
    ])
    return tok


def build_chatml_tokenizer(vocab, merges) -> Tokenizer:
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in CHATML_SPECIALS])
    return tok


def added_tokens_decoder(tok: Tokenizer, specials):
    return {
        str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                  "single_word": False, "special": True}
        for t in specials
    }


def save_tokenizers(vocab, merges):
    out = {}
    # ---- llama3
    d = FIX / "tokenizer-llama3"
    d.mkdir(parents=True)
    t3 = build_llama3_tokenizer(vocab, merges)
    j = json.loads(t3.to_str())
    # Meta's file stores merges as "a b" strings (older format); both formats are valid.
    j["model"]["merges"] = [" ".join(m) if isinstance(m, list) else m for m in j["model"]["merges"]]
    write_json(d / "tokenizer.json", j)
    write_json(d / "tokenizer_config.json", {
        "added_tokens_decoder": added_tokens_decoder(t3, LLAMA3_SPECIALS),
        "bos_token": "<|begin_of_text|>",
        "chat_template": LLAMA3_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|eot_id|>",
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 256,
        "tokenizer_class": "PreTrainedTokenizerFast",
    })
    out["llama3"] = d
    # ---- chatml
    d = FIX / "tokenizer-chatml"
    d.mkdir(parents=True)
    tc = build_chatml_tokenizer(vocab, merges)
    write_json(d / "tokenizer.json", json.loads(tc.to_str()))
    write_json(d / "tokenizer_config.json", {
        "added_tokens_decoder": added_tokens_decoder(tc, CHATML_SPECIALS),
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 256,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
    })
    (d / "chat_template.jinja").write_text(CHATML_CHAT_TEMPLATE, encoding="utf-8")
    out["chatml"] = d
    return out


def special_ids(tok_dir: Path, specials):
    t = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    return {s: t.token_to_id(s) for s in specials}


def verify_tokenizers(dirs):
    """Load through transformers and check it agrees with the raw `tokenizers` file."""
    probe_texts = ["hi", "Hello world!", "  spaces  and\ttabs\n\nnewlines ", "12345 678", "café 🙂 «x»",
                   "Cafe\u0301", "<|eot_id|> <|im_end|> plain"] + [m["content"] for r in ROWS for m in _all_messages(r)]
    # ---- llama3
    hf = AutoTokenizer.from_pretrained(str(dirs["llama3"]))
    raw = Tokenizer.from_file(str(dirs["llama3"] / "tokenizer.json"))
    bos = raw.token_to_id("<|begin_of_text|>")
    eot = raw.token_to_id("<|eot_id|>")
    assert hf.bos_token_id == bos and hf.eos_token_id == eot and hf.pad_token is None, (hf.bos_token_id, hf.eos_token_id, hf.pad_token)
    ids = hf("hi")["input_ids"]
    assert ids[0] == bos and bos not in ids[1:], ids
    assert hf.chat_template == LLAMA3_CHAT_TEMPLATE
    for t in probe_texts:
        assert hf(t)["input_ids"] == raw.encode(t).ids, t
        assert hf(t, add_special_tokens=False)["input_ids"] == raw.encode(t, add_special_tokens=False).ids, t
        assert raw.decode(raw.encode(t, add_special_tokens=False).ids, skip_special_tokens=False) == t, t
    # ---- chatml
    hf = AutoTokenizer.from_pretrained(str(dirs["chatml"]))
    raw = Tokenizer.from_file(str(dirs["chatml"] / "tokenizer.json"))
    assert hf.bos_token is None and hf.bos_token_id is None
    assert hf.eos_token_id == raw.token_to_id("<|im_end|>")
    assert hf.pad_token_id == raw.token_to_id("<|endoftext|>")
    assert hf.chat_template == CHATML_CHAT_TEMPLATE, "chat_template.jinja not picked up"
    rendered = hf.apply_chat_template([u("hi")], add_generation_prompt=True, tokenize=False)
    assert rendered == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"), repr(rendered)
    for t in probe_texts:
        assert hf(t)["input_ids"] == raw.encode(t).ids == raw.encode(t, add_special_tokens=False).ids, t
    # NFC normaliser: decomposed and precomposed é tokenize identically for ChatML only.
    assert raw.encode("Cafe\u0301").ids == raw.encode("Caf\u00e9").ids


PROBE_TEXTS = ["hi", "Hello world!", "  two  spaces\tand a tab\n\nnewlines ", "12345 678.9",
               "café 🙂 «x» — ok…", "Cafe\u0301 vs caf\u00e9", "it's they'LL we've",
               "<|eot_id|> and <|im_end|> inside text"]


def write_tokenization_reference(tok_dirs, rows, rows_plain):
    """expected_tokenization.json: rendered chat templates and raw encodings, to debug a
    prompt_ids mismatch (template rendering vs tokenizer)."""
    out = {}
    for name, d in tok_dirs.items():
        tok = AutoTokenizer.from_pretrained(str(d))
        conv = []
        for r in rows:
            pm = prompt_messages(r["prompt"])
            conv.append({
                "prompt_id": r["prompt_id"],
                "prompt_text": tok.apply_chat_template(pm, add_generation_prompt=True, tokenize=False),
                "chosen_full_text": [tok.apply_chat_template(pm + [c], add_generation_prompt=False, tokenize=False)
                                     for c in r["chosen"]],
                "rejected_full_text": [tok.apply_chat_template(pm + [c], add_generation_prompt=False, tokenize=False)
                                       for c in r["rejected"]],
            })
        probes = [{"text": t,
                   "ids": tok(t)["input_ids"],
                   "ids_no_special": tok(t, add_special_tokens=False)["input_ids"]}
                  for t in PROBE_TEXTS + [r["prompt"] for r in rows_plain]]
        out[name] = {"chat": conv, "encode": probes}
    write_json(FIX / "expected_tokenization.json", out, indent=1)


# --------------------------------------------------------------------------------------------
# Tokenisation convention (the spec the Rust code follows)
# --------------------------------------------------------------------------------------------


def _ids(x):
    if isinstance(x, dict) or hasattr(x, "keys"):
        x = x["input_ids"]
    if hasattr(x, "tolist"):
        x = x.tolist()
    return list(x)


def is_conversational(row) -> bool:
    def msg(v):
        return isinstance(v, dict) or (isinstance(v, list) and any(isinstance(i, dict) for i in v))
    return msg(row["prompt"]) or any(isinstance(c, dict) for c in row["chosen"] + row["rejected"])


def prompt_messages(p):
    if isinstance(p, str):
        return [{"role": "user", "content": p}]
    if isinstance(p, dict):
        return [p]
    return list(p)


def chat_ids(tok, msgs, add_generation_prompt):
    a_ids = _ids(tok.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt, tokenize=True))
    text = tok.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt, tokenize=False)
    b_ids = tok(text, add_special_tokens=False)["input_ids"]
    assert a_ids == b_ids, (msgs, a_ids, b_ids)
    return a_ids


def tokenize_row(tok, row):
    if "prompt_input_ids" in row:
        return (list(row["prompt_input_ids"]), [list(c) for c in row["chosen_input_ids"]],
                [list(c) for c in row["rejected_input_ids"]])
    if is_conversational(row):
        pm = prompt_messages(row["prompt"])
        p_ids = chat_ids(tok, pm, True)

        def comp(c):
            m = c if isinstance(c, dict) else {"role": "assistant", "content": c}
            full = chat_ids(tok, pm + [m], False)
            assert full[: len(p_ids)] == p_ids, (row.get("prompt_id"), p_ids, full)
            out = full[len(p_ids):]
            assert len(out) > 0
            return out
    else:
        p_ids = tok(row["prompt"])["input_ids"]

        def comp(c):
            return tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ch, rj = [comp(c) for c in row["chosen"]], [comp(c) for c in row["rejected"]]
    bos = tok.bos_token_id
    if bos is not None:  # exactly one BOS, at the start of the prompt
        assert p_ids[0] == bos and p_ids.count(bos) == 1 and all(bos not in c for c in ch + rj), row
    else:
        assert p_ids and all(len(c) > 0 for c in ch + rj)
    return p_ids, ch, rj


def truncate(p, chosen, rejected, max_length, max_prompt_length):
    if max_length is None:
        return p, chosen, rejected
    longest = max(len(c) for c in chosen + rejected)
    if len(p) + longest > max_length:
        if max_prompt_length is not None:
            p = p[-max_prompt_length:]
        keep = max_length - len(p)
        chosen = [c[:keep] for c in chosen]
        rejected = [c[:keep] for c in rejected]
    assert all(len(c) > 0 for c in chosen + rejected), "truncation left an empty completion"
    return p, chosen, rejected


# --------------------------------------------------------------------------------------------
# Model building / evaluation
# --------------------------------------------------------------------------------------------


def init_weights(model: LlamaForCausalLM, seed: int) -> None:
    """Deterministic init independent of transformers' internals.  RMSNorm weights are
    1 + N(0, 0.2) (not all ones) so an implementation that ignores them is caught."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(INIT_RANGE * torch.randn(p.shape, generator=g))


def classic_config(cfg_path: Path, spec: dict, dtype_name: str, tok_ids: dict) -> dict:
    """transformers 5 writes `rope_parameters` + `dtype`; rewrite config.json in the layout of
    the published Llama-3 / Qwen2 checkpoints (`rope_theta` + `rope_scaling` + `torch_dtype`),
    which transformers 5 still reads (checked after loading)."""
    c = json.loads(cfg_path.read_text())
    c.pop("rope_parameters", None)
    c.pop("dtype", None)
    c["rope_theta"] = spec["rope_theta"]
    c["rope_scaling"] = copy.deepcopy(spec["rope_scaling"])
    c["torch_dtype"] = dtype_name
    c["initializer_range"] = INIT_RANGE
    c.update(tok_ids)
    c = dict(sorted(c.items()))
    write_json(cfg_path, c)
    return c


@torch.no_grad()
def forward_logits(model, input_ids, attention_mask):
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.logits.float()


def pad_batch(seqs, pad_id=0):
    T = max(len(x) for x in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, x in enumerate(seqs):
        ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        mask[i, : len(x)] = 1
    return ids, mask


@torch.no_grad()
def seq_logps(model, prompts, completions):
    """prompts[i] + completions[i] for each i, ONE right-padded batch.  Returns float32 sums."""
    seqs = [p + c for p, c in zip(prompts, completions)]
    ids, mask = pad_batch(seqs)
    logits = forward_logits(model, ids, mask)
    labels = ids.clone()
    labels[mask == 0] = -100
    for i, p in enumerate(prompts):
        labels[i, : len(p)] = -100
    labels = labels[:, 1:]
    lp = torch.log_softmax(logits[:, :-1, :].float(), dim=-1)
    valid = labels != -100
    gathered = torch.gather(lp, 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    sums = (gathered * valid).sum(-1)
    return [float(x) for x in sums.to(torch.float32)], logits


BATCH_VS_SINGLE: list = []


def run_case(model, tok, rows, data_name, max_length, max_prompt_length):
    tokd = []
    for r in rows:
        p, ch, rj = tokenize_row(tok, r)
        tokd.append(truncate(p, ch, rj, max_length, max_prompt_length))
    prompts, comps, where = [], [], []
    for ri, (p, ch, rj) in enumerate(tokd):
        for k, c in enumerate(ch):
            prompts.append(p); comps.append(c); where.append((ri, "chosen", k))
        for k, c in enumerate(rj):
            prompts.append(p); comps.append(c); where.append((ri, "rejected", k))
    vocab = model.config.vocab_size
    assert all(0 <= t < vocab for x in prompts + comps for t in x)
    assert all(len(p) + len(c) <= model.config.max_position_embeddings for p, c in zip(prompts, comps))
    logps, _ = seq_logps(model, prompts, comps)
    # Consistency: each sequence alone (no padding) gives the same value.
    for i in range(len(prompts)):
        alone, _ = seq_logps(model, [prompts[i]], [comps[i]])
        assert abs(alone[0] - logps[i]) <= 1e-4 * max(1.0, abs(logps[i])), (i, alone[0], logps[i])
        BATCH_VS_SINGLE.append(abs(alone[0] - logps[i]))
    out_rows = []
    for ri, (p, ch, rj) in enumerate(tokd):
        d = {"prompt_ids": p, "chosen_ids": ch, "rejected_ids": rj, "chosen": [None] * len(ch),
             "rejected": [None] * len(rj), "chosen_tokens": [len(c) for c in ch],
             "rejected_tokens": [len(c) for c in rj]}
        out_rows.append(d)
    for (ri, kind, k), v in zip(where, logps):
        assert math.isfinite(v)
        out_rows[ri][kind][k] = v
    return {"data": data_name, "max_length": max_length, "max_prompt_length": max_prompt_length,
            "rows": out_rows}, prompts, comps


def check_truncation_case(untrunc, trunc):
    """Row 6 gets prompt (when max_prompt_length is set) and completion truncation; at least one
    row is untouched."""
    r6u, r6t = untrunc["rows"][5], trunc["rows"][5]
    if trunc["max_prompt_length"] is not None:
        assert len(r6t["prompt_ids"]) < len(r6u["prompt_ids"]), "row 6 prompt not truncated"
    else:
        assert all(x["prompt_ids"] == t["prompt_ids"] for x, t in zip(untrunc["rows"], trunc["rows"]))
    assert any(len(t) < len(x) for t, x in zip(r6t["chosen_ids"] + r6t["rejected_ids"],
                                              r6u["chosen_ids"] + r6u["rejected_ids"])), "row 6 completions not truncated"
    untouched = [i for i, (x, t) in enumerate(zip(untrunc["rows"], trunc["rows"]))
                 if x["prompt_ids"] == t["prompt_ids"] and x["chosen_ids"] == t["chosen_ids"]
                 and x["rejected_ids"] == t["rejected_ids"]]
    assert untouched, "no row left untouched"
    return untouched


def build_model(name, spec, tok_dirs, tok_special_ids):
    out_dir = FIX / name
    out_dir.mkdir(parents=True)
    cfg_kwargs = copy.deepcopy(spec["config"])
    if spec["tokenizer"] == "llama3":
        tok_ids = {"bos_token_id": tok_special_ids["llama3"]["<|begin_of_text|>"],
                   "eos_token_id": ([tok_special_ids["llama3"]["<|end_of_text|>"], tok_special_ids["llama3"]["<|eot_id|>"]]
                                    if name == "llama-gqa" else tok_special_ids["llama3"]["<|eot_id|>"])}
    else:
        tok_ids = {"bos_token_id": tok_special_ids["chatml"]["<|endoftext|>"],
                   "eos_token_id": tok_special_ids["chatml"]["<|im_end|>"]}
    # (deep copy: LlamaConfig mutates the rope_scaling dict it is given)
    config = LlamaConfig(vocab_size=VOCAB, hidden_act="silu", attention_bias=False, mlp_bias=False,
                         initializer_range=INIT_RANGE, **copy.deepcopy(cfg_kwargs), **tok_ids)
    torch.manual_seed(spec["seed"])
    model = LlamaForCausalLM(config)
    init_weights(model, spec["seed"])
    if config.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model = model.to(spec["save_dtype"])
    expected_sd = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
    kwargs = {}
    if spec["max_shard_size"]:
        kwargs["max_shard_size"] = spec["max_shard_size"]
    model.save_pretrained(str(out_dir), safe_serialization=True, **kwargs)
    classic_config(out_dir / "config.json", cfg_kwargs, DTYPE_NAME[spec["save_dtype"]], tok_ids)
    for f in tok_dirs[spec["tokenizer"]].iterdir():
        shutil.copy(f, out_dir / f.name)

    # ---- checks on the files
    st_files = sorted(out_dir.glob("*.safetensors"))
    keys = {}
    for f in st_files:
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():
                t = fh.get_tensor(k)
                assert t.dtype == spec["save_dtype"], (k, t.dtype)
                keys[k] = t
    if spec["max_shard_size"]:
        assert len(st_files) >= 2 and (out_dir / "model.safetensors.index.json").exists()
        idx = json.loads((out_dir / "model.safetensors.index.json").read_text())
        assert set(idx["weight_map"]) == set(keys)
    else:
        assert [f.name for f in st_files] == ["model.safetensors"], st_files
    if config.tie_word_embeddings:
        assert "lm_head.weight" not in keys, "tied model saved lm_head.weight"
    else:
        assert "lm_head.weight" in keys

    # ---- load back in float32 (bf16/f16-rounded weights upcast) with eager attention
    m = LlamaForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32, attn_implementation="eager")
    m.eval()
    rp = m.config.rope_parameters
    assert rp["rope_theta"] == cfg_kwargs["rope_theta"], rp
    want_scaling = cfg_kwargs["rope_scaling"] or {"rope_type": "default"}
    for k, v in want_scaling.items():
        assert rp.get(k) == v, (k, rp)
    assert m.config.head_dim == cfg_kwargs.get("head_dim", 16)
    assert m.config.tie_word_embeddings == cfg_kwargs["tie_word_embeddings"]
    sd = m.state_dict()
    for k, v in expected_sd.items():
        assert sd[k].dtype == torch.float32
        assert torch.equal(sd[k], v), k
    if config.tie_word_embeddings:
        assert torch.equal(m.lm_head.weight, m.model.embed_tokens.weight)
    return out_dir, m


def versions_text() -> str:
    return (f"python {platform.python_version()}\n"
            f"torch {torch.__version__}\n"
            f"transformers {transformers.__version__}\n"
            f"tokenizers {tokenizers.__version__}\n"
            f"safetensors {safetensors.__version__}\n"
            f"numpy {np.__version__}\n")


def main():
    old_versions = FIX / "VERSIONS.txt"
    if old_versions.exists() and old_versions.read_text(encoding="utf-8") != versions_text():
        print("warning: library versions differ from the ones that made the current fixtures:\n"
              + old_versions.read_text(encoding="utf-8") + "now:\n" + versions_text(), file=sys.stderr)
    if FIX.exists():
        shutil.rmtree(FIX)
    FIX.mkdir(parents=True)

    # ---- data files
    write_jsonl(FIX / "rows.jsonl", ROWS)
    write_jsonl(FIX / "rows_plain.jsonl", ROWS_PLAIN)
    write_jsonl(FIX / "rows_pretok.jsonl", ROWS_PRETOK)
    rows = read_jsonl(FIX / "rows.jsonl")
    rows_plain = read_jsonl(FIX / "rows_plain.jsonl")
    rows_pretok = read_jsonl(FIX / "rows_pretok.jsonl")
    assert rows == ROWS and rows_plain == ROWS_PLAIN and rows_pretok == ROWS_PRETOK

    # ---- tokenizers
    vocab, merges = train_bpe()
    tok_dirs = save_tokenizers(vocab, merges)
    verify_tokenizers(tok_dirs)
    tok_special_ids = {"llama3": special_ids(tok_dirs["llama3"], LLAMA3_SPECIALS),
                       "chatml": special_ids(tok_dirs["chatml"], CHATML_SPECIALS)}

    write_tokenization_reference(tok_dirs, rows, rows_plain)

    summary = {"special_token_ids": tok_special_ids, "models": {}}
    for name, spec in MODELS.items():
        BATCH_VS_SINGLE.clear()
        out_dir, model = build_model(name, spec, tok_dirs, tok_special_ids)
        tok = AutoTokenizer.from_pretrained(str(out_dir))
        cases = []
        c0, _, _ = run_case(model, tok, rows, "rows.jsonl", None, None)
        cases.append(c0)
        untouched = {}
        for L, P in TRUNC[spec["tokenizer"]]:
            c1, _, _ = run_case(model, tok, rows, "rows.jsonl", L, P)
            untouched[f"L={L}/P={P}"] = [i + 1 for i in check_truncation_case(c0, c1)]
            cases.append(c1)
        c2, _, _ = run_case(model, tok, rows_plain, "rows_plain.jsonl", None, None)
        cases.append(c2)
        c3, _, _ = run_case(model, tok, rows_pretok, "rows_pretok.jsonl", None, None)
        cases.append(c3)
        write_expected_logps(out_dir / "expected_logps.json", cases)

        # ---- logits of the first 4 sequences of rows.jsonl (untruncated), in row order
        #      (row 1 chosen[0], chosen[1], rejected[0], row 2 chosen[0])
        seqs = []
        for r in c0["rows"]:
            for c in r["chosen_ids"] + r["rejected_ids"]:
                seqs.append(r["prompt_ids"] + c)
        seqs = seqs[:4]
        ids, mask = pad_batch(seqs)
        logits = forward_logits(model, ids, mask).contiguous()
        assert torch.isfinite(logits).all()
        save_file({"input_ids": ids.contiguous(), "attention_mask": mask.contiguous(), "logits": logits},
                  str(out_dir / "expected_logits.safetensors"),
                  # one metadata key only: safetensors writes metadata in hash-map order
                  metadata={"description": json.dumps({
                      "source": "rows.jsonl (untruncated)",
                      "sequences": ["row1.chosen0", "row1.chosen1", "row1.rejected0", "row2.chosen0"],
                      "layout": "prompt+completion, right-padded with id 0",
                      "note": "logits at attention_mask==0 positions are what transformers computes there; compare mask==1 only",
                  }, sort_keys=True)})
        real = logits[mask.bool()]
        # same 4 sequences run one at a time (no padding)
        single = max(float((forward_logits(model, torch.tensor([x]), torch.ones(1, len(x), dtype=torch.long))[0]
                            - logits[i, : len(x)]).abs().max()) for i, x in enumerate(seqs))
        summary["models"][name] = {
            "logits_shape": list(logits.shape),
            "max_abs_logit": float(real.abs().max()),
            "logit_std": float(real.std()),
            "logits_batched_vs_single_max_abs": single,
            "logps_batched_vs_single_max_abs": max(BATCH_VS_SINGLE),
            "mean_per_position_std": float(real.std(dim=-1).mean()),
            "untouched_rows_in_truncation_cases": untouched,
            "logps_ranges": {c["data"] + (f" L={c['max_length']}/P={c['max_prompt_length']}" if c["max_length"] else ""):
                             [min(v for r in c["rows"] for v in r["chosen"] + r["rejected"]),
                              max(v for r in c["rows"] for v in r["chosen"] + r["rejected"])] for c in cases},
            "seq_lengths_untruncated": [len(r["prompt_ids"]) + len(c) for r in c0["rows"] for c in r["chosen_ids"] + r["rejected_ids"]],
            "prompt_lengths_untruncated": [len(r["prompt_ids"]) for r in c0["rows"]],
        }

    # ---- versions
    (FIX / "VERSIONS.txt").write_text(versions_text(), encoding="utf-8")

    # ---- report
    print(json.dumps(summary, indent=1, ensure_ascii=False))
    total = list_files(FIX)
    assert total < 3_000_000, total



def list_files(out: Path) -> int:
    """Print every file under `out` (size, SHA-256 prefix, path under tests/fixtures); return the
    total size."""
    total = 0
    for f in sorted(out.rglob("*")):
        if f.is_file():
            total += f.stat().st_size
            print(f"{f.stat().st_size:>9}  {hashlib.sha256(f.read_bytes()).hexdigest()[:12]}  {f.relative_to(FIX)}")
    print(f"total {total} bytes")
    return total

if __name__ == "__main__":
    sys.exit(main())
