#!/usr/bin/env python3
"""Reference fixtures for the pipeline commands: greedy generation and reward scores.

Run from the repository root, after make_fixtures.py (which deletes tests/fixtures/):

    /opt/ref/bin/python tests/reference/make_generate_fixture.py

Writes (and only these):

- tests/fixtures/generate/<model>.json for llama-tied (ChatML) and llama-gqa (Llama-3 template):
  transformers' greedy `generate` (KV cache, left padding, eager attention, f32) on a batch of
  five prompts of different lengths, max_new_tokens 20, in two cases: the engine's default stop
  set, and a stop token chosen so that the rows stop at different steps.
- tests/fixtures/reward-llama/: a tiny random `LlamaForSequenceClassification` (num_labels 1,
  pad_token_id = <|endoftext|>, tokenizer and ChatML template of llama-tied) and
  expected_scores.json: its scores of every (prompt, response) pair of rows.jsonl, one
  right-padded batch, plus two id-level sequences that exercise transformers' pooling rule
  (the rightmost token whose id is not pad_token_id).

Deterministic: one thread, fixed seeds, torch.use_deterministic_algorithms(True).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fixtures import chat_ids, init_weights, prompt_messages, read_jsonl  # noqa: E402

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

REPO = Path(__file__).resolve().parents[2]
FIX = REPO / "tests" / "fixtures"
MAX_NEW = 20

# Prompts of different lengths and forms (a message, a list with a system message, a plain
# string, a multi-turn conversation, a long one), from rows.jsonl.
PROMPT_ROWS = [0, 1, 2, 3, 5]


def write_compact(path: Path, obj: dict) -> None:
    """One top-level key per line, lists of objects one item per line: valid JSON, small, and
    diff-friendly."""
    lines = []
    for k, v in obj.items():
        if isinstance(v, list) and v and isinstance(v[0], dict):
            items = ",\n".join("  " + json.dumps(x, ensure_ascii=False) for x in v)
            lines.append(f" {json.dumps(k)}: [\n{items}\n ]")
        else:
            lines.append(f" {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}")
    text = "{\n" + ",\n".join(lines) + "\n}\n"
    assert json.loads(text) == obj
    path.write_text(text, encoding="utf-8")


def stop_ids(tok, model_dir: Path) -> list[int]:
    """The engine's stop set: the tokenizer's eos, <|eot_id|> and <|im_end|> when in the
    vocabulary, and generation_config.json's eos_token_id (what transformers stops at)."""
    ids = set()
    if tok.eos_token_id is not None:
        ids.add(tok.eos_token_id)
    vocab = tok.get_vocab()
    for t in ("<|eot_id|>", "<|im_end|>"):
        if t in vocab:
            ids.add(vocab[t])
    gc = json.loads((model_dir / "generation_config.json").read_text())
    e = gc.get("eos_token_id")
    ids.update(e if isinstance(e, list) else [] if e is None else [e])
    return sorted(ids)


@torch.no_grad()
def greedy(model, prompts, pad_id, stops):
    """Left-padded batch through `generate`; returns per-row generated ids (cut after the first
    stop token, which is kept) and per-row minimum top-1/top-2 logit margin over the steps."""
    t = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), t), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, t - len(p):] = torch.tensor(p)
        mask[i, t - len(p):] = 1
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=MAX_NEW,
                         eos_token_id=stops, pad_token_id=pad_id, output_scores=True,
                         return_dict_in_generate=True, temperature=None, top_p=None, top_k=None)
    gen = out.sequences[:, t:].tolist()
    rows, margins = [], []
    for i, g in enumerate(gen):
        cut = next((k + 1 for k, x in enumerate(g) if x in stops), len(g))
        rows.append(g[:cut])
        m = float("inf")
        for k in range(cut):
            top2 = torch.topk(out.scores[k][i].float(), 2).values
            m = min(m, float(top2[0] - top2[1]))
        margins.append(m)
    return rows, margins


def generate_fixture(name: str, rows) -> dict:
    d = FIX / name
    model = LlamaForCausalLM.from_pretrained(str(d), dtype=torch.float32, attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(str(d))
    prompts = [rows[i]["prompt"] for i in PROMPT_ROWS]
    p_ids = [chat_ids(tok, prompt_messages(p), True) for p in prompts]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    stops = stop_ids(tok, d)
    cases = []
    out, margins = greedy(model, p_ids, pad, stops)
    # Each prompt alone (no padding) must give the same tokens.
    for p, o in zip(p_ids, out):
        alone, _ = greedy(model, [p], pad, stops)
        assert alone[0] == o, (name, alone[0], o)
    cases.append({"name": "default-stops", "stop_ids": stops, "outputs": out, "min_margins": margins})
    # A stop token that row 0 produces at step 6 (and not before): rows end at different steps.
    tok6 = out[0][5]
    assert tok6 not in out[0][:5]
    stops2 = [tok6]
    out2, margins2 = greedy(model, p_ids, pad, stops2)
    assert out2[0] == out[0][:6], (out2[0], out[0])
    lengths = sorted({len(o) for o in out2})
    assert len(lengths) >= 2, f"{name}: every row stopped at the same step"
    cases.append({"name": "early-stop", "stop_ids": stops2, "outputs": out2, "min_margins": margins2})
    for c in cases:
        assert min(c["min_margins"]) > 1e-3, (name, c["name"], c["min_margins"])
    return {"model": name, "max_new_tokens": MAX_NEW, "pad_id": pad, "prompts": prompts,
            "prompt_ids": p_ids, "cases": cases}


def reward_fixture(rows) -> dict:
    d = FIX / "reward-llama"
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    src = FIX / "llama-tied"
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(src / f, d / f)
    tok = AutoTokenizer.from_pretrained(str(d))
    pad = tok.pad_token_id
    assert pad is not None
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
                         max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False,
                         num_labels=1, pad_token_id=pad, hidden_act="silu",
                         architectures=["LlamaForSequenceClassification"])
    torch.manual_seed(2001)
    model = LlamaForSequenceClassification(config)
    init_weights(model, 2001)
    model.save_pretrained(str(d), safe_serialization=True)
    model = LlamaForSequenceClassification.from_pretrained(
        str(d), dtype=torch.float32, attn_implementation="eager").eval()
    assert model.config.num_labels == 1 and model.config.pad_token_id == pad
    from safetensors import safe_open
    with safe_open(str(d / "model.safetensors"), "pt") as fh:
        keys = set(fh.keys())
    assert "score.weight" in keys and "lm_head.weight" not in keys, sorted(keys)

    pairs, seqs = [], []
    for r in rows:
        pm = prompt_messages(r["prompt"])
        for resp in r["chosen"] + r["rejected"]:
            m = resp if isinstance(resp, dict) else {"role": "assistant", "content": resp}
            pairs.append({"prompt_id": r["prompt_id"], "prompt": r["prompt"], "response": resp})
            seqs.append(chat_ids(tok, pm + [m], False))
    # Id-level sequences for the pooling rule: one ends in the pad id (scored at the token before
    # it), one has the pad id in the middle (scored at its last token).
    extra = [[17, 42, 99, 123, 7, pad], [5, 6, pad, 8, 9, 10]]

    @torch.no_grad()
    def scores(batch):
        t = max(len(x) for x in batch)
        ids = torch.full((len(batch), t), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), t), dtype=torch.long)
        for i, x in enumerate(batch):
            ids[i, :len(x)] = torch.tensor(x)
            mask[i, :len(x)] = 1
        return [float(v) for v in model(input_ids=ids, attention_mask=mask).logits[:, 0]]

    got = scores(seqs)
    got_extra = scores(extra)
    for i, x in enumerate(seqs + extra):
        alone = scores([x])[0]
        want = (got + got_extra)[i]
        assert abs(alone - want) <= 1e-4 * max(1.0, abs(want)), (i, alone, want)
    assert len({round(s, 3) for s in got}) > len(got) // 2, "scores barely differ"
    for p, s, ids in zip(pairs, got, seqs):
        p["ids"] = ids
        p["score"] = s
    return {"pad_token_id": pad, "pairs": pairs,
            "id_sequences": [{"ids": x, "score": s} for x, s in zip(extra, got_extra)]}


def main():
    assert transformers.__version__.startswith("5."), transformers.__version__
    rows = read_jsonl(FIX / "rows.jsonl")
    gdir = FIX / "generate"
    if gdir.exists():
        shutil.rmtree(gdir)
    gdir.mkdir()
    for name in ("llama-tied", "llama-gqa"):
        fx = generate_fixture(name, rows)
        write_compact(gdir / f"{name}.json", fx)
        for c in fx["cases"]:
            print(f"{name} {c['name']}: stops {c['stop_ids']}, lengths {[len(o) for o in c['outputs']]}, "
                  f"min top-2 margin {min(c['min_margins']):.4f}")
    rf = reward_fixture(rows)
    write_compact(FIX / "reward-llama" / "expected_scores.json", rf)
    s = [p["score"] for p in rf["pairs"]]
    print(f"reward-llama: {len(s)} pairs, scores in [{min(s):.4f}, {max(s):.4f}], "
          f"id sequences {[x['score'] for x in rf['id_sequences']]}")


if __name__ == "__main__":
    main()
