#!/usr/bin/env python3
"""Reference training trajectories (PyTorch + transformers) for the Rust trainer tests: WRPO, and
SimPO / IPO with and without WRPO's α-blend (loss_type simpo, ipo, wrpo-simpo, wrpo-ipo).

Run from the repository root:

    /opt/ref/bin/python tests/reference/make_train_fixture.py

Rewrites tests/fixtures/train/ only.  Deterministic: one thread, fixed seeds,
torch.use_deterministic_algorithms(True), float32 throughout.  The trainer below is an
independent re-statement of WRPO.md (the objective and "Our extensions") with Hugging Face
Trainer semantics (AdamW, LambdaLR warmup + cosine/linear/constant, global-norm clipping,
gradient accumulation).  See the
"Training trajectories" section of tests/reference/README.md.
"""

from __future__ import annotations

import copy
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
from make_fixtures import list_files, pad_batch, read_jsonl, seq_logps, tokenize_row, truncate  # noqa: E402

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

# (T, W) and the number of clipped updates of the new cases
EXPECT_TW = {"simpo_k1r1": (4, 1), "ipo_k1r1": (4, 2), "wrpo_simpo_k2r2": (4, 0), "wrpo_ipo_k2r2": (4, 0)}
EXPECT_CLIPPED = {"simpo_k1r1": 2, "ipo_k1r1": 2, "wrpo_simpo_k2r2": 2, "wrpo_ipo_k2r2": 0}

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
    # ---- the other objectives (WRPO.md, "Our extensions"): 2 updates per epoch, 2 epochs (update
    # 3 sees update 1's rows again).
    # simpo / ipo ignore `alpha` and `is_dynamic` (α = 0, sources unused): set to non-trivial
    # values so that a trainer that blends anyway is caught.
    "simpo_k1r1": dict(data="train_rows.jsonl", k=1, r=1, cfg=dict(
        COMMON, loss_type="simpo", simpo_gamma=0.8,
        learning_rate=2e-3, beta=2.0, alpha=0.5, is_dynamic=True, label_smoothing=0.1,
        per_device_train_batch_size=3, gradient_accumulation_steps=2, num_train_epochs=2,
        lr_scheduler_type="constant_with_warmup", warmup_ratio=0.0, warmup_steps=1,
        max_grad_norm=5.0, weight_decay=0.05)),
    "ipo_k1r1": dict(data="train_rows.jsonl", k=1, r=1, cfg=dict(
        COMMON, loss_type="ipo",
        learning_rate=4e-3, beta=0.5, alpha=0.3, is_dynamic=False, label_smoothing=0.0,
        per_device_train_batch_size=2, gradient_accumulation_steps=3, num_train_epochs=2,
        lr_scheduler_type="cosine", warmup_ratio=0.5, warmup_steps=0,
        max_grad_norm=12.0, weight_decay=0.0,
        # non-default AdamW constants, so the trainer must read them
        adam_beta1=0.8, adam_beta2=0.99, adam_epsilon=1e-6)),
    "wrpo_simpo_k2r2": dict(data="train_rows_k2r2.jsonl", k=2, r=2, cfg=dict(
        COMMON, loss_type="wrpo-simpo", simpo_gamma=0.5,
        learning_rate=2e-3, beta=2.5, alpha=0.5, is_dynamic=True, label_smoothing=0.0,
        per_device_train_batch_size=1, gradient_accumulation_steps=4, num_train_epochs=2,
        lr_scheduler_type="linear", warmup_ratio=0.0, warmup_steps=0,
        max_grad_norm=5.0, weight_decay=0.0,
        # TRL truncation on every row: the prompt keeps its last 24 tokens, completions are cut
        # to fit 40
        max_length=40, max_prompt_length=24)),
    "wrpo_ipo_k2r2": dict(data="train_rows_k2r2.jsonl", k=2, r=2, cfg=dict(
        COMMON, loss_type="wrpo-ipo",
        learning_rate=4e-3, beta=0.2, alpha=0.6, is_dynamic=False, label_smoothing=0.0,
        per_device_train_batch_size=2, gradient_accumulation_steps=2, num_train_epochs=2,
        # HF's `constant` has no warm-up: warmup_ratio is ignored
        lr_scheduler_type="constant", warmup_ratio=0.25, warmup_steps=0,
        max_grad_norm=0.0, weight_decay=0.01)),
}

CONFIG_KEYS = ["learning_rate", "beta", "alpha", "is_dynamic", "loss_type", "label_smoothing",
               "per_device_train_batch_size", "gradient_accumulation_steps", "num_train_epochs",
               "max_steps", "lr_scheduler_type", "warmup_ratio", "warmup_steps", "max_grad_norm",
               "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "seed", "shuffle",
               "max_length", "max_prompt_length", "logging_steps"]

# The objectives (engine `loss_type`): which read a reference model, which blend sources with α.
SIMPO_LIKE = ("simpo", "wrpo-simpo")
IPO_LIKE = ("ipo", "wrpo-ipo")
BLENDS = ("wrpo", "wrpo-simpo", "wrpo-ipo")


def needs_reference(loss_type):
    return loss_type not in SIMPO_LIKE


def config_keys(cfg):
    """CONFIG_KEYS, plus `simpo_gamma` after `loss_type` for the SimPO objectives (the only ones
    that read it; the wrpo cases' files predate the key)."""
    keys = list(CONFIG_KEYS)
    assert ("simpo_gamma" in cfg) == (cfg["loss_type"] in SIMPO_LIKE), cfg
    if "simpo_gamma" in cfg:
        keys.insert(keys.index("loss_type") + 1, "simpo_gamma")
    return keys


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
    keys = config_keys(cfg)
    assert set(cfg) == set(keys), set(cfg) ^ set(keys)
    text = "".join(f"{k}: {yaml_scalar(cfg[k])}\n" for k in keys)
    try:  # round-trip check when PyYAML is available
        import yaml
        assert yaml.safe_load(text) == {k: cfg[k] for k in keys}, text
    except ImportError:
        pass
    path.write_text(text, encoding="utf-8")


def load_policy():
    m = LlamaForCausalLM.from_pretrained(str(MODEL_DIR), dtype=torch.float32, attn_implementation="eager")
    assert m.config.tie_word_embeddings
    assert all(p.dtype == torch.float32 for p in m.parameters())
    return m


def schedule(cfg, T):
    """(W, lambda) with the formulas of HF's get_{cosine,linear,constant}_schedule_with_warmup
    and get_constant_schedule (`constant`: no warm-up whatever W says)."""
    W = cfg["warmup_steps"] if cfg["warmup_steps"] > 0 else math.ceil(cfg["warmup_ratio"] * T)
    kind = cfg["lr_scheduler_type"]
    if kind == "constant":
        W = 0

    def lam(s):
        if kind == "constant":
            return 1.0
        if s < W:
            return float(s) / float(max(1, W))
        if kind == "cosine":
            progress = float(s - W) / float(max(1, T - W))
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
        if kind == "linear":
            return max(0.0, float(T - s) / float(max(1, T - W)))
        if kind == "constant_with_warmup":
            return 1.0
        raise ValueError(kind)
    return W, lam


def check_schedule_against_transformers(cfg, T):
    W, lam = schedule(cfg, T)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=cfg["learning_rate"])
    kind = cfg["lr_scheduler_type"]
    if kind == "constant":
        sch = transformers.get_constant_schedule(opt)
    elif kind == "constant_with_warmup":
        sch = transformers.get_constant_schedule_with_warmup(opt, num_warmup_steps=W)
    else:
        fn = {"cosine": transformers.get_cosine_schedule_with_warmup,
              "linear": transformers.get_linear_schedule_with_warmup}[kind]
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


# ---- SimPO and IPO, with and without WRPO's α-blend (WRPO.md, "Our extensions"), restated from
# WRPO.md rather than from the engine.  n_*: the number of scored completion tokens |y| of each
# response (the per-token average is log π(y) / |y|).

def blend_metrics(rew_c, rew_l, pc, pr, alpha):
    """The logged metrics from β-scaled per-response rewards (rew_c [B,K+1], sources first;
    rew_l [B,R]) and the policy's summed log-probs, defined as for WRPO: chosen = the α-blend of
    the mean source reward and the target reward, margins = chosen − rejected (SimPO's γ is a
    margin of the loss, not of the rewards), accuracies with a strict >, log-probs summed."""
    K = pc.shape[1] - 1
    with torch.no_grad():
        r_s = rew_c[:, :K].mean(dim=1)
        r_t = rew_c[:, K]
        r_w = alpha * r_s + (1.0 - alpha) * r_t
        lp_s = pc[:, :K].mean(dim=1)
        lp_t = pc[:, K]
        met = {
            "rewards/chosen": r_w,
            "rewards/source_chosen": r_s,
            "rewards/target_chosen": r_t,
            "rewards/rejected": rew_l.mean(dim=1),
            "rewards/margins": (r_w.unsqueeze(1) - rew_l).mean(dim=1),
            "rewards/accuracies": (r_w.unsqueeze(1) > rew_l).float().mean(dim=1),
            "rewards/source_accuracies": (r_s.unsqueeze(1) > rew_l).float().mean(dim=1),
            "rewards/pivot_accuracies": (r_t.unsqueeze(1) > rew_l).float().mean(dim=1),
            "logps/chosen": alpha * lp_s + (1.0 - alpha) * lp_t,
            "logps/source_chosen": lp_s,
            "logps/target_chosen": lp_t,
            "logps/rejected": pr.mean(dim=1),
        }
    return {k: v.detach() for k, v in met.items()}


def simpo_terms(pc, pr, nc, nr, beta, alpha, eps, gamma):
    """SimPO-blend: r(y) = β·log π(y)/|y| (no reference model), m_r = α·r_s + (1−α)·r_t − r_l,r − γ
    with r_s the mean over the K sources; per-row loss = mean over r of
    (1−ε)·softplus(−m_r) + ε·softplus(m_r).  α = 0 is SimPO on (target, rejected)."""
    K = pc.shape[1] - 1
    r_c = beta * (pc / nc)                        # [B,K+1]
    r_l = beta * (pr / nr)                        # [B,R]
    r_w = alpha * r_c[:, :K].mean(dim=1) + (1.0 - alpha) * r_c[:, K]
    m = r_w.unsqueeze(1) - r_l - gamma            # [B,R]
    per_rc = (1.0 - eps) * F.softplus(-m) + eps * F.softplus(m)
    return per_rc.mean(dim=1), blend_metrics(r_c.detach(), r_l.detach(), pc, pr, alpha)


def ipo_terms(pc, pr, rc, rr, nc, nr, beta, alpha):
    """IPO-blend: per-token log-ratios Δ̄ = (log π − log π_ref)/|y|, h_r = α·Δ̄_s + (1−α)·Δ̄_t − Δ̄_l,r;
    per-row loss = mean over r of (h_r − 1/(2β))².  Rewards are β·Δ̄.  α = 0 is IPO on
    (target, rejected); label smoothing does not apply."""
    K = pc.shape[1] - 1
    d_c = (pc - rc) / nc
    d_l = (pr - rr) / nr
    w = alpha * d_c[:, :K].mean(dim=1) + (1.0 - alpha) * d_c[:, K]
    h = w.unsqueeze(1) - d_l
    per_rc = (h - 1.0 / (2.0 * beta)) ** 2
    return per_rc.mean(dim=1), blend_metrics(beta * d_c.detach(), beta * d_l.detach(), pc, pr, alpha)


def token_counts(rows):
    """|y| of every chosen / rejected completion of `rows`, ([B,K+1], [B,R]) float32."""
    nc = torch.tensor([[float(len(c)) for c in ch] for _, ch, _ in rows], dtype=torch.float32)
    nr = torch.tensor([[float(len(c)) for c in rj] for _, _, rj in rows], dtype=torch.float32)
    return nc, nr


def objective_terms(cfg, alpha, rows, pc, pr, rc, rr):
    """(per-row loss [B], metrics) of `cfg["loss_type"]` for one group of rows."""
    lt = cfg["loss_type"]
    if lt == "wrpo":
        return wrpo_terms(pc, pr, rc, rr, cfg["beta"], alpha, cfg["label_smoothing"])
    nc, nr = token_counts(rows)
    if lt in SIMPO_LIKE:
        assert rc is None and rr is None
        return simpo_terms(pc, pr, nc, nr, cfg["beta"], alpha, cfg["label_smoothing"], cfg["simpo_gamma"])
    if lt in IPO_LIKE:
        assert cfg["label_smoothing"] == 0.0, "IPO has no label smoothing"
        return ipo_terms(pc, pr, rc, rr, nc, nr, cfg["beta"], alpha)
    raise ValueError(lt)


def alpha_at(cfg, s, T):
    """α of update s (0-based) of T: WRPO.md's progressive schedule for the blending objectives,
    0 for the plain ones (their sources are unused)."""
    if cfg["loss_type"] not in BLENDS:
        return 0.0
    return cfg["alpha"] * s / T if cfg["is_dynamic"] else cfg["alpha"]


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
    ref = None  # SimPO has no reference model at all
    if needs_reference(cfg["loss_type"]):
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
            alpha = alpha_at(cfg, s, T)
            lr = sched.get_last_lr()[0]
            opt.zero_grad(set_to_none=True)
            losses, mets = [], {k: [] for k in METRIC_KEYS}
            for m0 in range(0, n_glob, B):
                idx = glob[m0: m0 + B]
                mb = [data[i] for i in idx]
                rc = rr = None
                if ref is not None:
                    with torch.no_grad():
                        rc, rr = micro_batch_logps(ref, mb)
                pc, pr = micro_batch_logps(policy, mb)
                loss_rows, met = objective_terms(cfg, alpha, mb, pc, pr, rc, rr)
                (loss_rows.sum() / n_glob).backward()
                losses.append(loss_rows.detach())
                for k in METRIC_KEYS:
                    mets[k].append(met[k])
                if ref is not None:
                    for j, i in enumerate(idx):
                        ref_logps.setdefault(i, {"chosen": [float(x) for x in rc[j]],
                                                 "rejected": [float(x) for x in rr[j]]})
            # max_grad_norm 0: no clipping (HF Trainer), the pre-clip norm is still logged
            gn = torch.nn.utils.clip_grad_norm_(params, cfg["max_grad_norm"] or math.inf)
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
    }
    if ref is not None:
        result["initial_ref_logps"] = [ref_logps[i] for i in range(len(data))]
    else:  # SimPO: no reference model, no reference log-probs
        assert not ref_logps
    result["final_max_abs_weight_change"] = change
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


def check_gradient_formula_blend(data, loss_type, beta, alpha, eps, gamma):
    """Closed-form gradients of the SimPO- and IPO-blends with respect to the summed sequence
    log-probs, against autograd on random log-probs and random lengths |y|.  With ℓ the pair loss
    of h_r (IPO: h_r = α·Δ̄_s + (1−α)·Δ̄_t − Δ̄_l,r, ℓ = (h − 1/(2β))², ℓ' = 2(h − 1/(2β));
    SimPO: m_r = β·(α·s̄_s + (1−α)·s̄_t − s̄_l,r) − γ with s̄ = log π/|y|, ℓ = (1−ε)softplus(−m) +
    ε softplus(m), ℓ' = β[εσ(m) − (1−ε)σ(−m)] per unit of the score difference):
    ∂L/∂log π(y) = Σ_r ℓ'_r / (B·R) × (α/K for each source, 1−α for the target, −1 for rejected r
    alone) / |y|."""
    g = torch.Generator().manual_seed(11)
    B, K1, R = len(data), len(data[0][1]), len(data[0][2])
    K = K1 - 1
    pc = (-60 * torch.rand(B, K1, generator=g, dtype=torch.float64)).requires_grad_(True)
    pr = (-60 * torch.rand(B, R, generator=g, dtype=torch.float64)).requires_grad_(True)
    rc = -60 * torch.rand(B, K1, generator=g, dtype=torch.float64)
    rr = -60 * torch.rand(B, R, generator=g, dtype=torch.float64)
    nc = torch.randint(1, 70, (B, K1), generator=g).double()
    nr = torch.randint(1, 70, (B, R), generator=g).double()
    if loss_type in SIMPO_LIKE:
        loss_rows, _ = simpo_terms(pc, pr, nc, nr, beta, alpha, eps, gamma)
        sc, sl = pc.detach() / nc, pr.detach() / nr
    else:
        loss_rows, _ = ipo_terms(pc, pr, rc, rr, nc, nr, beta, alpha)
        sc, sl = (pc.detach() - rc) / nc, (pr.detach() - rr) / nr
    loss_rows.mean().backward()
    d = (alpha * sc[:, :K].mean(1) + (1 - alpha) * sc[:, K]).unsqueeze(1) - sl     # [B,R]
    if loss_type in SIMPO_LIKE:
        m = beta * d - gamma
        lprime = beta * (eps * torch.sigmoid(m) - (1 - eps) * torch.sigmoid(-m))
    else:
        lprime = 2.0 * (d - 1.0 / (2.0 * beta))
    c = lprime / (B * R)                                                          # [B,R]
    exp_pr = -c / nr
    cs = c.sum(1, keepdim=True)
    exp_pc = torch.cat([cs.expand(B, K) * alpha / K, cs * (1 - alpha)], 1) / nc
    assert torch.allclose(pc.grad, exp_pc, atol=1e-12, rtol=1e-9), (pc.grad, exp_pc)
    assert torch.allclose(pr.grad, exp_pr, atol=1e-12, rtol=1e-9), (pr.grad, exp_pr)


def softplus_py(x):
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def check_unbatched(policy, ref, data, cfg):
    """The batched SimPO/IPO(-blend) loss at the final policy with α=0 (α=1) equals plain SimPO /
    IPO on (target, rejected) (on (mean source, rejected)) computed in Python scalars from
    log-probs taken one unpadded sequence at a time (make_fixtures.seq_logps), with |y| counted
    from the label mask of each sequence."""
    lt, beta, eps = cfg["loss_type"], cfg["beta"], cfg["label_smoothing"]
    gamma = cfg.get("simpo_gamma", 0.0)
    policy.eval()
    with torch.no_grad():
        pc, pr = micro_batch_logps(policy, data)
        rc, rr = micro_batch_logps(ref, data) if ref is not None else (None, None)
    K = pc.shape[1] - 1

    def n_scored(p, c):
        labels = torch.tensor(p + c)[1:].clone()
        labels[: len(p) - 1] = -100
        return int((labels != -100).sum())

    for alpha in (0.0, 1.0):
        with torch.no_grad():
            wl, _ = objective_terms(cfg, alpha, data, pc, pr, rc, rr)
        ours = float(wl.mean())
        terms = []
        for p, ch, rj in data:
            def score(c):
                s = seq_logps(policy, [p], [c])[0][0]
                if ref is not None:
                    s -= seq_logps(ref, [p], [c])[0][0]
                n = n_scored(p, c)
                assert n == len(c)
                return s / n
            sw = score(ch[K]) if alpha == 0.0 else sum(score(ch[k]) for k in range(K)) / K
            for c in rj:
                d = sw - score(c)
                if lt in SIMPO_LIKE:
                    m = beta * d - gamma
                    t = (1 - eps) * softplus_py(-m) + eps * softplus_py(m)
                else:
                    t = (d - 1.0 / (2.0 * beta)) ** 2
                terms.append(t / len(rj))
        plain = sum(terms) / len(data)
        assert abs(ours - plain) <= 1e-5 * max(1.0, abs(plain)), (lt, alpha, ours, plain)
    policy.train()
    return ours, plain


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
    if "initial_ref_logps" in res:
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
        lt = cfg["loss_type"]
        if lt == "wrpo":
            check_gradient_formula(data, cfg["beta"], 0.3, cfg["label_smoothing"])
            check_dpo_equivalence(policy, ref, data, cfg["beta"])
        else:
            assert (ref is None) == (lt in SIMPO_LIKE) and ("initial_ref_logps" in res) == (ref is not None)
            for a_ in (0.0, 0.3, 1.0):
                check_gradient_formula_blend(data, lt, cfg["beta"], a_, cfg["label_smoothing"],
                                             cfg.get("simpo_gamma", 0.0))
            check_unbatched(policy, ref, data, cfg)

        st = res["steps"]
        T = res["total_steps"]
        if lt in BLENDS and cfg["is_dynamic"]:
            assert [x["cur_alpha"] for x in st] == [cfg["alpha"] * s / T for s in range(T)]
        if lt not in BLENDS:
            assert cfg["alpha"] > 0.0 and all(x["cur_alpha"] == 0.0 for x in st)
        if lt == "wrpo":
            # policy == reference until the first update with lr > 0
            assert abs(st[0]["loss"] - math.log(2.0)) < 1e-6 and st[0]["rewards/margins"] == 0.0
        elif lt in IPO_LIKE:
            # h = 0 at policy == reference: loss (1/(2β))², every reward 0
            assert abs(st[0]["loss"] - 0.25 / cfg["beta"] ** 2) < 1e-6 * st[0]["loss"]
            assert st[0]["rewards/margins"] == 0.0 and st[0]["rewards/chosen"] == 0.0
        else:
            # no reference: rewards differ from 0 from the start
            assert st[0]["rewards/margins"] != 0.0 and st[0]["rewards/rejected"] < 0.0
        assert res["final_max_abs_weight_change"] > 1e-3, res["final_max_abs_weight_change"]
        assert all(math.isfinite(v) for x in st for v in x.values())
        clipped = sum(x["grad_norm"] > cfg["max_grad_norm"] for x in st) if cfg["max_grad_norm"] > 0 else 0
        if name == "wrpo_k1r1":
            assert res["total_steps"] == 6 and res["warmup_steps"] == 2
            assert math.ceil(len(st) / 2) <= clipped < len(st), [x["grad_norm"] for x in st]
            assert st[-1]["rewards/margins"] > 0.0 and st[-1]["loss"] < math.log(2.0)
        elif name == "wrpo_k2r2_ls":
            assert res["total_steps"] == 4 and res["warmup_steps"] == 1
        else:
            # lean: two epochs of two updates; updates 3 and 4 see the rows of updates 1 and 2
            # again, at a clearly lower loss and larger margins
            assert cfg["num_train_epochs"] == 2 and T == 4
            for j in (0, 1):
                assert st[j + 2]["loss"] < 0.8 * st[j]["loss"], [x["loss"] for x in st]
                assert st[j + 2]["rewards/margins"] > st[j]["rewards/margins"] + 0.1
            assert (T, res["warmup_steps"]) == EXPECT_TW[name], (T, res["warmup_steps"])
            assert clipped == EXPECT_CLIPPED[name], [x["grad_norm"] for x in st]
            if clipped:  # clipping acts on an update that moves the weights
                assert any(x["grad_norm"] > cfg["max_grad_norm"] and x["learning_rate"] > 0 for x in st)

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
    total = list_files(OUT)
    # six cases, each with a 462 KB final_model.safetensors
    assert total < 3_000_000, total


if __name__ == "__main__":
    sys.exit(main())
