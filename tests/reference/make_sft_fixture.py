#!/usr/bin/env python3
"""PyTorch reference of `wrpo-engine sft`: a few supervised fine-tuning updates on the tied fixture
model, written to tests/fixtures/sft/.  Run from the repository root:

    /opt/ref/bin/python tests/reference/make_sft_fixture.py

Conventions (the engine's, see README "wrpo-engine sft"):
- rows = `prompt` + `chosen[0]` of WRPO rows (the best source response), TRL-1.x chat tokenisation
  (same helpers as make_fixtures.py); completion-only loss (prompt and padding labels = -100);
- one right-padded forward per micro-batch; the loss of an update is the mean token NLL over all
  completion tokens of its global batch (each micro-batch backpropagates sum(NLL) / tokens in the
  global batch); `mean_token_accuracy` = fraction of those tokens whose argmax logit is the label;
- AdamW (foreach=False, one group, decay on every parameter), HF LR lambda, clip_grad_norm_ on the
  global norm; grad_norm logged before clipping; learning_rate = the LR the update used.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_train_fixture as T  # noqa: E402  (reuses its model loading, schedule, config writer)
from make_fixtures import pad_batch, read_jsonl, tokenize_row, truncate  # noqa: E402

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

OUT = T.FIX / "sft"
CFG = dict(T.COMMON, learning_rate=2e-3, beta=0.01, alpha=0.1, is_dynamic=True, label_smoothing=0.0,
           per_device_train_batch_size=2, gradient_accumulation_steps=2, num_train_epochs=2,
           lr_scheduler_type="cosine", warmup_ratio=0.0, warmup_steps=1, max_grad_norm=1.0,
           weight_decay=0.01, seed=42, shuffle=False, max_length=1024, max_prompt_length=512,
           logging_steps=1)


def train(data, completion_only=True):
    torch.manual_seed(CFG["seed"])
    policy = T.load_policy().train()
    B, G = CFG["per_device_train_batch_size"], CFG["gradient_accumulation_steps"]
    per_update = B * G
    upe = math.ceil(len(data) / per_update)
    total = CFG["num_train_epochs"] * upe
    W, lam = T.schedule(CFG, total)
    params = list(policy.parameters())
    opt = torch.optim.AdamW(params, lr=CFG["learning_rate"], betas=(CFG["adam_beta1"], CFG["adam_beta2"]),
                            eps=CFG["adam_epsilon"], weight_decay=CFG["weight_decay"], foreach=False)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lam)
    steps, s = [], 0
    for _ in range(CFG["num_train_epochs"]):
        for u0 in range(0, len(data), per_update):
            glob = data[u0: u0 + per_update]
            # scored tokens: the completion's, or (completion_only False) every token after the first
            n_tok = sum(len(c) if completion_only else len(p) + len(c) - 1 for p, c in glob)
            lr = sched.get_last_lr()[0]
            opt.zero_grad(set_to_none=True)
            nll_sum, correct = 0.0, 0
            for m0 in range(0, len(glob), B):
                mb = glob[m0: m0 + B]
                ids, mask = pad_batch([p + c for p, c in mb], T.PAD_ID)
                labels = ids.clone()
                labels[mask == 0] = -100
                if completion_only:
                    for i, (p, _) in enumerate(mb):
                        labels[i, : len(p)] = -100
                logits = policy(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1, :]
                labels = labels[:, 1:]
                valid = labels != -100
                lp = torch.log_softmax(logits.float(), dim=-1)
                tok_lp = torch.gather(lp, 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
                nll = -(tok_lp * valid).sum()
                (nll / n_tok).backward()
                nll_sum += float(nll.detach())
                correct += int(((logits.argmax(-1) == labels) & valid).sum())
            gn = torch.nn.utils.clip_grad_norm_(params, CFG["max_grad_norm"])
            opt.step()
            sched.step()
            s += 1
            steps.append({"step": s, "epoch": s / upe, "loss": nll_sum / n_tok, "grad_norm": float(gn),
                          "learning_rate": lr, "mean_token_accuracy": correct / n_tok})
    final = {k: v.detach().clone() for k, v in policy.state_dict().items()}
    return steps, final, total, W


def main():
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    lines = T.TINY.read_bytes().splitlines(keepends=True)[:10]
    (OUT / "sft_rows.jsonl").write_bytes(b"".join(lines))
    tok = T.AutoTokenizer.from_pretrained(str(T.MODEL_DIR))
    data = []
    for r in read_jsonl(OUT / "sft_rows.jsonl"):
        p, ch, rj = tokenize_row(tok, r)
        p, ch, _ = truncate(p, [ch[0]], [ch[0]], CFG["max_length"], CFG["max_prompt_length"])
        data.append((p, ch[0]))
    steps, final, total, W = train(data)
    steps2, final2, _, _ = train(data)
    assert steps == steps2 and all(torch.equal(final[k], final2[k]) for k in final), "not reproducible"
    assert steps[-1]["loss"] < steps[0]["loss"], [x["loss"] for x in steps]
    assert any(x["grad_norm"] > CFG["max_grad_norm"] for x in steps), "clipping never active"
    T.write_config(OUT / "config.yaml", CFG)
    T.save_final(OUT / "final_model.safetensors", final, tied=True)
    head = {"case": "sft", "versions": {"torch": torch.__version__, "transformers": T.transformers.__version__},
            "total_steps": total, "warmup_steps": W}
    text = json.dumps(head)[:-1] + ',\n "steps": [\n' + ",\n".join("  " + json.dumps(x) for x in steps) + "\n ]\n}\n"
    assert json.loads(text)["steps"] == steps
    (OUT / "expected.json").write_text(text, encoding="utf-8")
    for x in steps:
        print(x)

    # The same run with the loss on every token (`completion_only: false`, TRL's
    # completion_only_loss=False): prompt tokens are scored too.
    full = OUT / "full_sequence"
    full.mkdir()
    fsteps, ffinal, ftotal, fW = train(data, completion_only=False)
    assert [x["loss"] for x in fsteps] != [x["loss"] for x in steps]
    assert any(x["grad_norm"] > CFG["max_grad_norm"] for x in fsteps), "clipping never active"
    (full / "config.yaml").write_text((OUT / "config.yaml").read_text(encoding="utf-8")
                                      + "completion_only: false\n", encoding="utf-8")
    T.save_final(full / "final_model.safetensors", ffinal, tied=True)
    head = dict(head, case="sft_full_sequence", total_steps=ftotal, warmup_steps=fW)
    text = json.dumps(head)[:-1] + ',\n "steps": [\n' + ",\n".join("  " + json.dumps(x) for x in fsteps) + "\n ]\n}\n"
    (full / "expected.json").write_text(text, encoding="utf-8")
    for x in fsteps:
        print(x)


if __name__ == "__main__":
    main()
