#!/usr/bin/env python3
"""Time one full WRPO training step in PyTorch (the baseline the Rust trainer is compared with).

    /opt/ref/bin/python tests/reference/bench_step.py --threads 2

One step = policy forward on 3·B sequences (source, target, rejected), reference forward under
no_grad, WRPO loss, backward, global-norm clip, AdamW step.  Random init, random token ids, the
first quarter of every sequence is the (unscored) prompt.  Prints one JSON line; tokens = 3·B·T
policy tokens per step.
"""
import argparse
import copy
import json
import os
import resource
import statistics
import time

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

ap = argparse.ArgumentParser()
for name, default in [("hidden", 256), ("layers", 4), ("heads", 4), ("kv-heads", 4), ("intermediate", 688),
                      ("vocab", 32000), ("batch", 2), ("seq", 256), ("steps", 5), ("warmup", 2),
                      ("threads", os.cpu_count())]:
    ap.add_argument(f"--{name}", type=int, default=default)
ap.add_argument("--attn", default="eager", choices=["eager", "sdpa"])
args = ap.parse_args()
torch.set_num_threads(args.threads)
torch.manual_seed(0)

cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                  num_hidden_layers=args.layers, num_attention_heads=args.heads,
                  num_key_value_heads=args.kv_heads, max_position_embeddings=max(args.seq, 256),
                  tie_word_embeddings=False)
policy = LlamaForCausalLM._from_config(cfg, attn_implementation=args.attn, dtype=torch.float32).train()
ref = copy.deepcopy(policy).eval().requires_grad_(False)
opt = torch.optim.AdamW(policy.parameters(), lr=1e-6, weight_decay=0.0)
B, T, beta, alpha = args.batch, args.seq, 0.1, 0.1
ids = torch.randint(0, args.vocab, (3 * B, T))  # rows: [sources(B), targets(B), rejected(B)]
mask = torch.ones_like(ids)
labels = ids.clone()
labels[:, : T // 4] = -100
labels = labels[:, 1:]
valid = labels != -100


def logps(model):
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    lp = torch.log_softmax(logits[:, :-1].float(), -1)
    return (torch.gather(lp, 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * valid).sum(-1).view(3, B)


def step():
    opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        r = logps(ref)
    d = logps(policy) - r
    m = alpha * d[0] + (1 - alpha) * d[1] - d[2]
    F.softplus(-beta * m).mean().backward()
    torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
    opt.step()


times = []
for i in range(args.warmup + args.steps):
    t0 = time.perf_counter()
    step()
    if i >= args.warmup:
        times.append(time.perf_counter() - t0)
med = statistics.median(times)
print(json.dumps({"tokens_per_second": 3 * B * T / med, "step_ms_median": med * 1e3,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
                  "torch": torch.__version__, "threads": torch.get_num_threads()}))
