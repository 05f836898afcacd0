#!/usr/bin/env python3
"""What wrpo-engine writes, loaded by transformers: tests/fixtures/saved/.

Run from the repository root after `cargo build -p wrpo-cli`:

    /opt/ref/bin/python tests/reference/make_saved_fixture.py [--bin target/debug/wrpo-engine]

For each case of tests/fixtures/saved/commands.json (a `train` run on the tied f32 fixture model
with a chat template, an `sft` run on the untied, bf16, 4-shard GQA fixture model), it runs the
engine, keeps the files of `OUTPUT/final/` that transformers reads (config, weights, generation
config, tokenizer files) in tests/fixtures/saved/CASE/, and checks with transformers that:
- `LlamaForCausalLM.from_pretrained` loads the folder with no missing, unexpected or mismatched
  weights and no load errors, `AutoTokenizer` and `GenerationConfig` load it too;
- the training moved the weights (the logits differ from the base model's), so the folder is not a
  copy of its input.
It then writes `expected_logits.safetensors` (input_ids, attention_mask, logits; the layout of
check_saved.py) from transformers' forward of that folder. The Rust test
`cli/tests/features.rs::saved_folders_load_in_transformers` reruns the same commands, requires the
same files, config and weights, and the engine's logits of its own output to equal these.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import AutoTokenizer, GenerationConfig, LlamaForCausalLM  # noqa: E402

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "tests" / "fixtures" / "saved"
# The files of a Hugging Face model folder that transformers reads (those present are kept).
MODEL_FILES = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
               "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
               "tokenizer.model"]
TEXTS = ["What is 7 + 5? It is 12.", "def add(a, b):\n    return a + b", "Hi"]


def load(folder: Path):
    model, info = LlamaForCausalLM.from_pretrained(str(folder), dtype=torch.float32,
                                                   attn_implementation="eager",
                                                   output_loading_info=True)
    for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info.get(k), (folder, k, info.get(k))
    return model.eval()


def logits_of(model, tok):
    seqs = [tok(t, add_special_tokens=True)["input_ids"] for t in TEXTS]
    T = max(map(len, seqs))
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
    return ids, mask, logits


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=str(REPO / "target" / "debug" / "wrpo-engine"))
    args = ap.parse_args()
    commands = json.loads((OUT / "commands.json").read_text(encoding="utf-8"))
    for case, spec in commands.items():
        dest = OUT / case
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir(parents=True)
        with tempfile.TemporaryDirectory() as tmp:
            run = [args.bin, *spec["args"], "--output", str(Path(tmp) / "run")]
            subprocess.run(run, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
            final = Path(tmp) / "run" / "final"
            for f in MODEL_FILES:
                if (final / f).is_file():
                    shutil.copy(final / f, dest / f)
        model = load(dest)
        tok = AutoTokenizer.from_pretrained(str(dest))
        GenerationConfig.from_pretrained(str(dest))
        base = load(REPO / spec["base"])
        ids, mask, logits = logits_of(model, tok)
        _, _, base_logits = logits_of(base, tok)
        moved = float((logits - base_logits)[mask.bool()].abs().max())
        assert moved > 1e-3, (case, moved)
        assert torch.isfinite(logits).all()
        save_file({"input_ids": ids, "attention_mask": mask, "logits": logits.contiguous()},
                  str(dest / "expected_logits.safetensors"))
        files = sorted(p.name for p in dest.iterdir())
        print(f"{case}: {files}; logits moved by up to {moved:.3e} from {spec['base']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
