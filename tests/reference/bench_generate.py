#!/usr/bin/env python3
"""Time greedy generation with transformers' `generate` (the baseline of `wrpo-engine bench sample`).

    /opt/ref/bin/python tests/reference/bench_generate.py --threads 2 --batch 4

A random LLaMA (default: the 135M SmolLM-style configuration: 30 layers, hidden 576, 9 heads and
3 KV heads, intermediate 1536, V 49152, tied embeddings), `batch` random prompts of `prompt-len`
ids, greedy decoding of exactly `max-new-tokens` tokens per prompt (no stop token), KV cache on,
eager attention.  Prints one JSON line: the median time of one whole generation (prefill
included, model creation not) and generated tokens per second (batch · max-new-tokens per
generation), the same count as `wrpo-engine bench sample`.
"""
import argparse
import json
import os
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

ap = argparse.ArgumentParser()
for name, default in [("hidden", 576), ("layers", 30), ("heads", 9), ("kv-heads", 3), ("intermediate", 1536),
                      ("vocab", 49152), ("batch", 4), ("prompt-len", 32), ("max-new-tokens", 32),
                      ("reps", 3), ("warmup", 1), ("threads", os.cpu_count())]:
    ap.add_argument(f"--{name}", type=int, default=default)
ap.add_argument("--attn", default="eager", choices=["eager", "sdpa"])
args = ap.parse_args()
torch.set_num_threads(args.threads)
torch.manual_seed(0)

cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                  num_hidden_layers=args.layers, num_attention_heads=args.heads,
                  num_key_value_heads=args.kv_heads, max_position_embeddings=2048,
                  tie_word_embeddings=True, pad_token_id=0, bos_token_id=None, eos_token_id=None)
model = LlamaForCausalLM._from_config(cfg, attn_implementation=args.attn, dtype=torch.float32).eval()
ids = torch.randint(0, args.vocab, (args.batch, args.prompt_len))
mask = torch.ones_like(ids)


def run():
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                             max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens,
                             pad_token_id=0, eos_token_id=None, use_cache=True)
    assert out.shape == (args.batch, args.prompt_len + args.max_new_tokens), out.shape


for _ in range(args.warmup):
    run()
times = []
for _ in range(max(args.reps, 1)):
    t0 = time.perf_counter()
    run()
    times.append(time.perf_counter() - t0)
med = statistics.median(times)
print(json.dumps({
    "op": "greedy_decode", "engine": f"transformers {__import__('transformers').__version__}, torch {torch.__version__}",
    "threads": args.threads, "attn": args.attn,
    "shape": {"hidden": args.hidden, "layers": args.layers, "heads": args.heads, "kv_heads": args.kv_heads,
              "intermediate": args.intermediate, "vocab": args.vocab, "tied": True, "batch": args.batch,
              "prompt_len": args.prompt_len, "new_tokens": args.max_new_tokens},
    "generate_ms_median": med * 1e3,
    "tokens_per_second": args.batch * args.max_new_tokens / med,
}))
