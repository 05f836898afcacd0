#!/usr/bin/env python3
"""Check that a Hugging Face model folder loads in transformers and reproduces stored logits.

    /opt/ref/bin/python tests/reference/check_saved.py MODEL_DIR EXPECTED_LOGITS_SAFETENSORS [--tol 1e-4]

MODEL_DIR is loaded with transformers' LlamaForCausalLM in float32 with eager attention.
EXPECTED_LOGITS_SAFETENSORS holds `input_ids` int64 [N,T] (right padded), `attention_mask` int64
[N,T] and `logits` float32 [N,T,V] (the layout of tests/fixtures/*/expected_logits.safetensors).
The model is run on input_ids/attention_mask and compared with `logits` at the positions where
attention_mask == 1 (what a padded position holds is implementation-defined).

Prints the max abs difference, max |expected|, and the relative error
    rel = max|got - expected| / max|expected|
and exits 1 if rel > tol (default 1e-4), if weights are missing/unexpected/mismatched, or if
anything is not finite; exits 2 on unusable input.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
transformers.utils.logging.disable_progress_bar()
from safetensors.torch import load_file  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402


def load_model(model_dir: str):
    kwargs = dict(attn_implementation="eager", output_loading_info=True)
    try:
        model, info = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kwargs)
    except TypeError:  # transformers < 4.56 only knows torch_dtype
        model, info = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32, **kwargs)
    return model.eval(), info


def read_expected(path: str):
    """(input_ids, attention_mask, logits) of an expected-logits file, or None after printing why
    it is unusable (exit code 2)."""
    exp = load_file(path)
    for k in ("input_ids", "attention_mask", "logits"):
        if k not in exp:
            print(f"error: {path} has no tensor {k!r}", file=sys.stderr)
            return None
    ids = exp["input_ids"].to(torch.long)
    mask = exp["attention_mask"].to(torch.long)
    want = exp["logits"].to(torch.float32)
    if ids.shape != mask.shape or want.shape[:2] != ids.shape:
        print(f"error: shapes input_ids {tuple(ids.shape)} attention_mask {tuple(mask.shape)} "
              f"logits {tuple(want.shape)} do not fit", file=sys.stderr)
        return None
    return ids, mask, want


def describe_model(model, model_dir: str, info) -> bool:
    """Print the versions and the model's shape; print and return whether the weights did not
    load cleanly (missing / unexpected / mismatched keys, error messages)."""
    c = model.config
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    print(f"model: {model_dir}")
    print(f"  vocab {c.vocab_size}, hidden {c.hidden_size}, layers {c.num_hidden_layers}, heads "
          f"{c.num_attention_heads}/{c.num_key_value_heads}, head_dim {getattr(c, 'head_dim', None)}, "
          f"tie {c.tie_word_embeddings}, rope {getattr(c, 'rope_parameters', None) or getattr(c, 'rope_scaling', None)}")
    bad_load = False
    for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        v = info.get(k) if isinstance(info, dict) else None
        if v:
            print(f"  {k}: {sorted(map(str, v))}")
            bad_load = True
    return bad_load


def compare(model, ids, mask, want, tol: float, bad_load: bool) -> int:
    """Run the model on ids/mask, compare with `want` at mask == 1, print the errors and OK/FAIL;
    returns the exit code (0 OK, 1 FAIL)."""
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()

    real = mask.bool()
    g, w = got[real], want[real]
    finite = bool(torch.isfinite(g).all() and torch.isfinite(w).all())
    abs_err = (g - w).abs()
    max_abs = float(abs_err.max())
    max_ref = float(w.abs().max())
    rel = max_abs / max(max_ref, 1e-30)
    elem_rel = float((abs_err / w.abs().clamp(min=1e-3)).max())
    print(f"compared {int(real.sum())} positions x {want.shape[2]} logits (N={ids.shape[0]}, T={ids.shape[1]})")
    print(f"  max abs diff        {max_abs:.3e}")
    print(f"  max |expected|      {max_ref:.4f}")
    print(f"  rel error           {rel:.3e}   (max abs diff / max |expected|; tolerance {tol:g})")
    print(f"  max elementwise rel {elem_rel:.3e}   (|diff| / max(|expected|, 1e-3), informational)")
    if (~real).any():
        pad_abs = float((got[~real] - want[~real]).abs().max())
        print(f"  padded positions    max abs diff {pad_abs:.3e} (informational, not checked)")

    ok = finite and not bad_load and rel <= tol
    print("OK" if ok else "FAIL" + ("" if finite else " (non-finite values)") + (" (weights did not load cleanly)" if bad_load else ""))
    return 0 if ok else 1


def prepare(expected_logits: str, model_dir: str):
    """Read the expected logits and load the model: (model, bad_load, ids, mask, want), or the
    exit code 2 after printing why the input is unusable."""
    try:
        exp = read_expected(expected_logits)
    except Exception as e:  # noqa: BLE001  (not a safetensors file, ...)
        print(f"error: cannot read {expected_logits}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    if exp is None:
        return 2
    ids, mask, want = exp
    model, info = load_model(model_dir)
    bad_load = describe_model(model, model_dir, info)
    if want.shape[2] != model.config.vocab_size:
        print(f"error: expected logits have vocab {want.shape[2]}, model has {model.config.vocab_size}", file=sys.stderr)
        return 2
    return model, bad_load, ids, mask, want


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("expected_logits")
    ap.add_argument("--tol", type=float, default=1e-4, help="max allowed relative error (default 1e-4)")
    args = ap.parse_args()

    ready = prepare(args.expected_logits, args.model_dir)
    if isinstance(ready, int):
        return ready
    model, bad_load, ids, mask, want = ready
    return compare(model, ids, mask, want, args.tol, bad_load)


if __name__ == "__main__":
    sys.exit(main())
