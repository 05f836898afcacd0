#!/usr/bin/env python3
"""Reference WRPO training trajectories (PyTorch + transformers) for the Rust trainer tests.

Run from the repository root:

    /opt/ref/bin/python tests/reference/make_train_fixture.py

Rewrites tests/fixtures/train/ only.  Deterministic: one thread, fixed seeds,
torch.use_deterministic_algorithms(True), float32 throughout.  The trainer below is an
independent re-statement of WRPO.md with Hugging Face Trainer semantics (AdamW, LambdaLR
warmup + cosine/linear/constant, global-norm clipping, gradient accumulation).  See the
"Training trajectories" section of tests/reference/README.md.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import AutoTokenizer, LlamaForCausalLM  # noqa: E402

# Tokenisation helpers of the existing fixture script (importing it does not run its main()).
from make_fixtures import pad_batch, read_jsonl, seq_logps, tokenize_row, truncate  # noqa: E402

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

REPO = Path(__file__).resolve().parents[2]
FIX = REPO / "tests" / "fixtures"
OUT = FIX / "train"
MODEL_DIR = FIX / "llama-tied"
TINY = REPO / "engine" / "assets" / "tiny" / "wrpo_tiny.jsonl"
PAD_ID = 0


def a(content):
    return {"role": "assistant", "content": content}


def u(content):
    return {"role": "user", "content": content}


# 8 rows, K=2 sources + target (chosen = [src1, src2, target]) and R=2 rejected; varied lengths.
ROWS_K2R2 = [
    {"prompt_id": "k2r2-000", "prompt": u("What is 7 + 5?"),
     "chosen": [a("7 + 5 = 12."), a("Adding 7 and 5 gives 12."), a("It is 12.")],
     "rejected": [a("It is 13."), a("7 + 5 = 75.")]},
    {"prompt_id": "k2r2-001", "prompt": u("What is 23 + 19?"),
     "chosen": [a("23 + 19 = 42."), a("First 23 + 20 = 43, then subtract 1: 42."), a("42.")],
     "rejected": [a("It is 41."), a("23 + 19 = 32, I think.")]},
    {"prompt_id": "k2r2-002",
     "prompt": [{"role": "system", "content": "You are a concise math tutor."}, u("What is 9 + 9?")],
     "chosen": [a("9 + 9 = 18."), a("Double 9 is 18."), a("18")],
     "rejected": [a("It is 19."), a("99")]},
    {"prompt_id": "k2r2-003", "prompt": u("What is 100 + 250? Explain briefly."),
     "chosen": [a("100 + 250 = 350, because 1 hundred plus 2 hundreds is 3 hundreds, and 50 more makes 350."),
                a("100 + 250 = 350."), a("The answer is 350.")],
     "rejected": [a("It is 300."), a("100 + 250 = 1250, since you put the digits together.")]},
    {"prompt_id": "k2r2-004", "prompt": u("What is 4 + 4?"),
     "chosen": [a("4 + 4 = 8."), a("8."), a("It is 8.")],
     "rejected": [a("It is 9."), a("44")]},
    {"prompt_id": "k2r2-005", "prompt": u("What is 15 + 27?"),
     "chosen": [a("15 + 27 = 42."), a("15 + 25 = 40, plus 2 is 42."), a("It is 42.")],
     "rejected": [a("It is 32."), a("It is 43.")]},
    {"prompt_id": "k2r2-006", "prompt": u("Add 6 and 11."),
     "chosen": [a("6 + 11 = 17."), a("Six plus eleven is seventeen: 17."), a("17.")],
     "rejected": [a("6 + 11 = 16."), a("It is 611.")]},
    {"prompt_id": "k2r2-007", "prompt": u("What is 3 + 8 + 2?"),
     "chosen": [a("3 + 8 + 2 = 13."), a("3 + 8 = 11 and 11 + 2 = 13."), a("It is 13.")],
     "rejected": [a("It is 12."), a("3 + 8 + 2 = 14.")]},
]

COMMON = dict(loss_type="wrpo", max_steps=-1, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
              seed=42, shuffle=False, max_length=1024, max_prompt_length=512, logging_steps=1)

CASES = {
    "wrpo_k1r1": dict(data="train_rows.jsonl", k=1, r=1, cfg=dict(
        # beta 0.1 (not 0.5): with 0.5 the loss saturates (0.0009) by the last update
        learning_rate=2e-3, beta=0.1, alpha=0.6, is_dynamic=True, label_smoothing=0.0,
        per_device_train_batch_size=2, gradient_accumulation_steps=2, num_train_epochs=2,
        lr_scheduler_type="cosine", warmup_ratio=0.2, warmup_steps=0,
        # pre-clip norms ~4.5-4.8 in updates 1-3, ~1.7-2.0 in 4-6: clipping active in 3 of 6
        max_grad_norm=3.0, weight_decay=0.01, **COMMON)),
    "wrpo_k2r2_ls": dict(data="train_rows_k2r2.jsonl", k=2, r=2, cfg=dict(
        learning_rate=1e-3, beta=0.3, alpha=0.4, is_dynamic=False, label_smoothing=0.1,
        per_device_train_batch_size=2, gradient_accumulation_steps=2, num_train_epochs=2,
        lr_scheduler_type="linear", warmup_ratio=0.0, warmup_steps=1,
        max_grad_norm=1.0, weight_decay=0.0, **COMMON)),
}

CONFIG_KEYS = ["learning_rate", "beta", "alpha", "is_dynamic", "loss_type", "label_smoothing",
               "per_device_train_batch_size", "gradient_accumulation_steps", "num_train_epochs",
               "max_steps", "lr_scheduler_type", "warmup_ratio", "warmup_steps", "max_grad_norm",
               "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "seed", "shuffle",
               "max_length", "max_prompt_length", "logging_steps"]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

def yaml_scalar(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        # Plain decimals, or "1.0e-8" (mantissa with a dot, signed exponent): a float under
        # both YAML 1.1 (PyYAML) and YAML 1.2 (serde_yaml) resolvers.
        if v != 0 and abs(v) < 1e-4:
            m, e = f"{v:.1e}".split("e")
            return f"{m}e{int(e):+d}"
        return repr(v)
    return str(v)


def write_config(path: Path, cfg: dict):
    assert set(cfg) == set(CONFIG_KEYS), set(cfg) ^ set(CONFIG_KEYS)
    text = "".join(f"{k}: {yaml_scalar(cfg[k])}\n" for k in CONFIG_KEYS)
    try:  # round-trip check when PyYAML is available
        import yaml
        assert yaml.safe_load(text) == {k: cfg[k] for k in CONFIG_KEYS}, text
    except ImportError:
        pass
    path.write_text(text, encoding="utf-8")


def load_policy():
    m = LlamaForCausalLM.from_pretrained(str(MODEL_DIR), dtype=torch.float32, attn_implementation="eager")
    assert m.config.tie_word_embeddings
    assert all(p.dtype == torch.float32 for p in m.parameters())
    return m


def schedule(cfg, T):
    """(W, lambda) with the formulas of HF's get_{cosine,linear,constant}_schedule_with_warmup."""
    W = cfg["warmup_steps"] if cfg["warmup_steps"] > 0 else math.ceil(cfg["warmup_ratio"] * T)
    kind = cfg["lr_scheduler_type"]

    def lam(s):
        if s < W:
            return float(s) / float(max(1, W))
        if kind == "cosine":
            progress = float(s - W) / float(max(1, T - W))
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
        if kind == "linear":
            return max(0.0, float(T - s) / float(max(1, T - W)))
        if kind == "constant":
            return 1.0
        raise ValueError(kind)
    return W, lam


def check_schedule_against_transformers(cfg, T):
    W, lam = schedule(cfg, T)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=cfg["learning_rate"])
    fn = {"cosine": transformers.get_cosine_schedule_with_warmup,
          "linear": transformers.get_linear_schedule_with_warmup}[cfg["lr_scheduler_type"]]
    sch = fn(opt, num_warmup_steps=W, num_training_steps=T)
    for s in range(T):
        assert abs(sch.get_last_lr()[0] - cfg["learning_rate"] * lam(s)) <= 1e-15, s
        opt.step()
        sch.step()


def completion_logps(model, prompts, completions):
    """Summed completion log-probs of prompts[i] + completions[i], ONE right-padded batch
    (pad id 0, attention_mask 0 at padding).  Differentiable when grad is enabled."""
    seqs = [p + c for p, c in zip(prompts, completions)]
    ids, mask = pad_batch(seqs, PAD_ID)
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    labels = ids.clone()
    labels[mask == 0] = -100
    for i, p in enumerate(prompts):
        labels[i, : len(p)] = -100
    labels = labels[:, 1:]
    lp = torch.log_softmax(logits[:, :-1, :].float(), dim=-1)
    valid = labels != -100
    gathered = torch.gather(lp, 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (gathered * valid).sum(-1)


def micro_batch_logps(model, rows):
    """rows: list of (prompt, chosen[K+1], rejected[R]).  Layout (authors' concatenated forward):
    chosen column 0 of every row, then column 1, ..., then rejected column 0, ... -> one batch of
    (K+1+R)*B sequences.  Returns (chosen [B,K+1], rejected [B,R])."""
    B = len(rows)
    nc, nr = len(rows[0][1]), len(rows[0][2])
    prompts, comps = [], []
    for j in range(nc):
        for p, ch, _ in rows:
            prompts.append(p); comps.append(ch[j])
    for j in range(nr):
        for p, _, rj in rows:
            prompts.append(p); comps.append(rj[j])
    lp = completion_logps(model, prompts, comps)
    chosen = lp[: nc * B].view(nc, B).t()
    rejected = lp[nc * B:].view(nr, B).t()
    return chosen, rejected


def wrpo_terms(pc, pr, rc, rr, beta, alpha, eps):
    """pc/rc: policy/reference chosen log-probs [B,K+1] (sources first, target last);
    pr/rr: rejected [B,R].  Returns (per-row loss [B], per-row metric tensors)."""
    K = pc.shape[1] - 1
    d_c = pc - rc
    d_l = pr - rr                                 # [B,R]
    d_s = d_c[:, :K].mean(dim=1)                  # [B]
    d_t = d_c[:, K]                               # [B]
    w = alpha * d_s + (1.0 - alpha) * d_t         # [B]
    m = w.unsqueeze(1) - d_l                      # [B,R]
    z = beta * m
    per_rc = (1.0 - eps) * F.softplus(-z) + eps * F.softplus(z)
    loss_rows = per_rc.mean(dim=1)
    with torch.no_grad():
        lp_s = pc[:, :K].mean(dim=1)
        lp_t = pc[:, K]
        met = {
            "rewards/chosen": beta * w,
            "rewards/source_chosen": beta * d_s,
            "rewards/target_chosen": beta * d_t,
            "rewards/rejected": (beta * d_l).mean(dim=1),
            "rewards/margins": (beta * m).mean(dim=1),
            "rewards/accuracies": ((beta * w).unsqueeze(1) > beta * d_l).float().mean(dim=1),
            "rewards/source_accuracies": ((beta * d_s).unsqueeze(1) > beta * d_l).float().mean(dim=1),
            "rewards/pivot_accuracies": ((beta * d_t).unsqueeze(1) > beta * d_l).float().mean(dim=1),
            "logps/chosen": alpha * lp_s + (1.0 - alpha) * lp_t,
            "logps/source_chosen": lp_s,
            "logps/target_chosen": lp_t,
            "logps/rejected": pr.mean(dim=1),
        }
    return loss_rows, {k: v.detach() for k, v in met.items()}


METRIC_KEYS = ["rewards/chosen", "rewards/source_chosen", "rewards/target_chosen", "rewards/rejected",
               "rewards/margins", "rewards/accuracies", "rewards/source_accuracies",
               "rewards/pivot_accuracies", "logps/chosen", "logps/source_chosen",
               "logps/target_chosen", "logps/rejected"]


# --------------------------------------------------------------------------------------------
# the trainer
# --------------------------------------------------------------------------------------------

def train(case_name, tok, overrides=None):
    spec = CASES[case_name]
    cfg = dict(spec["cfg"], **(overrides or {}))
    rows = read_jsonl(OUT / spec["data"])
    data = []
    for r in rows:
        p, ch, rj = tokenize_row(tok, r)
        p, ch, rj = truncate(p, ch, rj, cfg["max_length"], cfg["max_prompt_length"])
        assert len(ch) == spec["k"] + 1 and len(rj) == spec["r"], r["prompt_id"]
        data.append((p, ch, rj))

    torch.manual_seed(cfg["seed"])
    policy = load_policy()
    policy.train()  # attention_dropout is 0: train/eval give the same numbers
    ref = copy.deepcopy(policy).eval()
    for q in ref.parameters():
        q.requires_grad_(False)
    init = {k: v.detach().clone() for k, v in policy.state_dict().items()}

    B, G = cfg["per_device_train_batch_size"], cfg["gradient_accumulation_steps"]
    per_update = B * G
    upe = math.ceil(len(data) / per_update)      # updates per epoch (a partial last batch counts)
    assert cfg["max_steps"] == -1
    T = cfg["num_train_epochs"] * upe
    W, lam = schedule(cfg, T)

    params = list(policy.parameters())           # tied: embed_tokens.weight appears once
    opt = torch.optim.AdamW(params, lr=cfg["learning_rate"], betas=(cfg["adam_beta1"], cfg["adam_beta2"]),
                            eps=cfg["adam_epsilon"], weight_decay=cfg["weight_decay"], foreach=False)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lam)

    steps, ref_logps = [], {}
    s = 0
    for epoch in range(cfg["num_train_epochs"]):
        for u0 in range(0, len(data), per_update):
            glob = list(range(u0, min(u0 + per_update, len(data))))
            n_glob = len(glob)
            alpha = cfg["alpha"] * s / T if cfg["is_dynamic"] else cfg["alpha"]
            lr = sched.get_last_lr()[0]
            opt.zero_grad(set_to_none=True)
            losses, mets = [], {k: [] for k in METRIC_KEYS}
            for m0 in range(0, n_glob, B):
                idx = glob[m0: m0 + B]
                mb = [data[i] for i in idx]
                with torch.no_grad():
                    rc, rr = micro_batch_logps(ref, mb)
                pc, pr = micro_batch_logps(policy, mb)
                loss_rows, met = wrpo_terms(pc, pr, rc, rr, cfg["beta"], alpha, cfg["label_smoothing"])
                (loss_rows.sum() / n_glob).backward()
                losses.append(loss_rows.detach())
                for k in METRIC_KEYS:
                    mets[k].append(met[k])
                for j, i in enumerate(idx):
                    ref_logps.setdefault(i, {"chosen": [float(x) for x in rc[j]],
                                             "rejected": [float(x) for x in rr[j]]})
            gn = torch.nn.utils.clip_grad_norm_(params, cfg["max_grad_norm"])
            opt.step()
            sched.step()
            s += 1
            rec = {"step": s, "epoch": s / upe, "loss": float(torch.cat(losses).mean()),
                   "grad_norm": float(gn), "learning_rate": lr, "cur_alpha": alpha}
            for k in METRIC_KEYS:
                rec[k] = float(torch.cat(mets[k]).mean())
            steps.append(rec)
    assert s == T
    final = {k: v.detach().clone() for k, v in policy.state_dict().items()}
    change = max(float((final[k] - init[k]).abs().max()) for k in final)
    result = {
        "case": case_name,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "total_steps": T,
        "warmup_steps": W,
        "steps": steps,
        "initial_ref_logps": [ref_logps[i] for i in range(len(data))],
        "final_max_abs_weight_change": change,
    }
    return result, final, cfg, policy, ref, data


# --------------------------------------------------------------------------------------------
# independent checks
# --------------------------------------------------------------------------------------------

def check_dpo_equivalence(policy, ref, data, beta):
    """WRPO with α=0 (α=1) equals plain DPO on (target, rejected) ((mean source, rejected)),
    with log-probs computed one sequence at a time by make_fixtures.seq_logps (no padding)."""
    policy.eval()
    with torch.no_grad():
        pc, pr = micro_batch_logps(policy, data)
        rc, rr = micro_batch_logps(ref, data)
    K = pc.shape[1] - 1
    for alpha in (0.0, 1.0):
        wl, _ = wrpo_terms(pc, pr, rc, rr, beta, alpha, 0.0)
        ours = float(wl.mean())
        terms = []
        for p, ch, rj in data:
            def lp(model, c):
                return seq_logps(model, [p], [c])[0][0]
            if alpha == 0.0:
                dw = lp(policy, ch[K]) - lp(ref, ch[K])
            else:
                dw = sum(lp(policy, ch[k]) - lp(ref, ch[k]) for k in range(K)) / K
            for c in rj:
                dl = lp(policy, c) - lp(ref, c)
                z = beta * (dw - dl)
                terms.append(-math.log(1.0 / (1.0 + math.exp(-z))) / len(rj))
        dpo = sum(terms) / len(data)
        assert abs(ours - dpo) <= 1e-5 * max(1.0, abs(dpo)), (alpha, ours, dpo)
        assert ours != math.log(2.0)  # the policy moved
    policy.train()
    return ours, dpo


def check_gradient_formula(data, beta, alpha, eps):
    """∂L/∂logπ(y) = −β/B·[(1−ε)σ(−βm) − εσ(βm)]/R × (α/K for each source, 1−α for the target,
    −1 for the rejected), WRPO.md, against autograd on random log-probs."""
    g = torch.Generator().manual_seed(7)
    B, K1, R = len(data), len(data[0][1]), len(data[0][2])
    K = K1 - 1
    pc = (-20 * torch.rand(B, K1, generator=g)).requires_grad_(True)
    pr = (-20 * torch.rand(B, R, generator=g)).requires_grad_(True)
    rc, rr = -20 * torch.rand(B, K1, generator=g), -20 * torch.rand(B, R, generator=g)
    loss_rows, _ = wrpo_terms(pc, pr, rc, rr, beta, alpha, eps)
    loss_rows.mean().backward()
    d = pc.detach() - rc
    w = alpha * d[:, :K].mean(1) + (1 - alpha) * d[:, K]
    m = w.unsqueeze(1) - (pr.detach() - rr)
    c = -beta / B * ((1 - eps) * torch.sigmoid(-beta * m) - eps * torch.sigmoid(beta * m)) / R  # [B,R]
    exp_pr = -c
    exp_pc = torch.cat([c.sum(1, keepdim=True).expand(B, K) * alpha / K, c.sum(1, keepdim=True) * (1 - alpha)], 1)
    assert torch.allclose(pc.grad, exp_pc, atol=1e-7, rtol=1e-5)
    assert torch.allclose(pr.grad, exp_pr, atol=1e-7, rtol=1e-5)


def save_final(path: Path, sd: dict, tied: bool):
    out = {k: v.contiguous().clone() for k, v in sd.items() if not (tied and k == "lm_head.weight")}
    with safe_open(str(MODEL_DIR / "model.safetensors"), "pt") as fh:
        want = set(fh.keys())
    assert set(out) == want, set(out) ^ want
    assert all(v.dtype == torch.float32 for v in out.values())
    save_file(out, str(path), metadata={"format": "pt"})
    # load back into a fresh model: tied lm_head follows the embedding
    m = load_policy()
    missing, unexpected = m.load_state_dict(out, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    assert torch.equal(m.lm_head.weight, out["model.embed_tokens.weight"])


def write_expected(path: Path, res: dict):
    """One step object / ref-logps row per line (valid JSON, diff-friendly)."""
    head = {k: res[k] for k in ("case", "versions", "total_steps", "warmup_steps")}
    lines = [json.dumps(head)[:-1] + ","]
    lines.append(' "steps": [')
    for i, st in enumerate(res["steps"]):
        lines.append("  " + json.dumps(st) + ("," if i + 1 < len(res["steps"]) else ""))
    lines.append(" ],")
    lines.append(' "initial_ref_logps": [')
    for i, r in enumerate(res["initial_ref_logps"]):
        lines.append("  " + json.dumps(r) + ("," if i + 1 < len(res["initial_ref_logps"]) else ""))
    lines.append(" ],")
    lines.append(f' "final_max_abs_weight_change": {json.dumps(res["final_max_abs_weight_change"])}')
    lines.append("}")
    text = "\n".join(lines) + "\n"
    assert json.loads(text) == res
    path.write_text(text, encoding="utf-8")


def main():
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    # ---- data: case A = first 12 lines of wrpo_tiny.jsonl verbatim; case B embedded above
    lines = TINY.read_bytes().splitlines(keepends=True)[:12]
    (OUT / "train_rows.jsonl").write_bytes(b"".join(lines))
    with (OUT / "train_rows_k2r2.jsonl").open("w", encoding="utf-8") as f:
        for r in ROWS_K2R2:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    assert read_jsonl(OUT / "train_rows_k2r2.jsonl") == ROWS_K2R2

    tok = AutoTokenizer.from_pretrained(str(MODEL_DIR))
    summary = {}
    for name in CASES:
        res, final, cfg, policy, ref, data = train(name, tok)
        res2, final2, _, _, _, _ = train(name, tok)
        assert res2 == res, "trajectory not bitwise reproducible"
        assert all(torch.equal(final[k], final2[k]) for k in final), "final weights not reproducible"
        check_schedule_against_transformers(cfg, res["total_steps"])
        check_gradient_formula(data, cfg["beta"], 0.3, cfg["label_smoothing"])
        check_dpo_equivalence(policy, ref, data, cfg["beta"])

        st = res["steps"]
        # policy == reference until the first update with lr > 0
        assert abs(st[0]["loss"] - math.log(2.0)) < 1e-6 and st[0]["rewards/margins"] == 0.0
        assert res["final_max_abs_weight_change"] > 1e-3, res["final_max_abs_weight_change"]
        assert all(math.isfinite(v) for x in st for v in x.values())
        clipped = sum(x["grad_norm"] > cfg["max_grad_norm"] for x in st)
        if name == "wrpo_k1r1":
            assert res["total_steps"] == 6 and res["warmup_steps"] == 2
            assert math.ceil(len(st) / 2) <= clipped < len(st), [x["grad_norm"] for x in st]
            assert st[-1]["rewards/margins"] > 0.0 and st[-1]["loss"] < math.log(2.0)
        else:
            assert res["total_steps"] == 4 and res["warmup_steps"] == 1

        d = OUT / name
        d.mkdir()
        write_config(d / "config.yaml", cfg)
        write_expected(d / "expected.json", res)
        save_final(d / "final_model.safetensors", final, policy.config.tie_word_embeddings)
        summary[name] = {
            "T": res["total_steps"], "W": res["warmup_steps"], "clipped_steps": clipped,
            "max_grad_norm": cfg["max_grad_norm"],
            "final_max_abs_weight_change": res["final_max_abs_weight_change"],
            "steps": [{k: x[k] for k in ("step", "loss", "grad_norm", "learning_rate", "cur_alpha",
                                         "rewards/margins", "rewards/accuracies")} for x in st],
        }
    print(json.dumps(summary, indent=1))
    total = 0
    for f in sorted(OUT.rglob("*")):
        if f.is_file():
            total += f.stat().st_size
            print(f"{f.stat().st_size:>9}  {hashlib.sha256(f.read_bytes()).hexdigest()[:12]}  {f.relative_to(FIX)}")
    print(f"total {total} bytes")
    assert total < 1_500_000, total


if __name__ == "__main__":
    sys.exit(main())
