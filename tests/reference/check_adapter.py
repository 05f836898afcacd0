#!/usr/bin/env python3
"""Check that a PEFT LoRA adapter folder loads in peft on its base model and reproduces stored logits.

    /opt/ref/bin/python tests/reference/check_adapter.py BASE_DIR ADAPTER_DIR EXPECTED_LOGITS_SAFETENSORS [--tol 1e-4]

BASE_DIR is loaded as in check_saved.py (transformers' LlamaForCausalLM, float32, eager
attention), then ADAPTER_DIR (adapter_config.json + adapter_model.safetensors) with
`peft.PeftModel.from_pretrained(base, ADAPTER_DIR)`.  EXPECTED_LOGITS_SAFETENSORS has the layout
check_saved.py reads (`input_ids` int64 [N,T] right padded, `attention_mask` int64 [N,T], `logits`
float32 [N,T,V]); the logits are compared at the positions where attention_mask == 1.

The adapter file must hold exactly the tensors PEFT itself would save for that configuration
(`get_peft_model_state_dict`: keys like
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`), and every one of them must
arrive in the model unchanged.  PEFT only warns about missing adapter keys and ignores unexpected
ones; here both are failures.

Exits 0 if OK; 1 if rel > tol, anything is not finite, the base weights or the adapter do not
load, or adapter keys are missing / unexpected / not loaded as stored; 2 on unusable input (the
expected-logits file, or a vocabulary that does not fit the model).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# sets the offline / verbosity environment
from check_saved import compare, prepare  # noqa: E402

import torch  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)


def adapter_file_tensors(adapter_dir: Path):
    from safetensors.torch import load_file
    f = adapter_dir / "adapter_model.safetensors"
    if not f.is_file():
        return None, f"{f} does not exist"
    return load_file(str(f)), None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base_dir")
    ap.add_argument("adapter_dir")
    ap.add_argument("expected_logits")
    ap.add_argument("--tol", type=float, default=1e-4, help="max allowed relative error (default 1e-4)")
    args = ap.parse_args()

    ready = prepare(args.expected_logits, args.base_dir)
    if isinstance(ready, int):
        return ready
    base, bad_load, ids, mask, want = ready

    import peft
    from peft import PeftModel, get_peft_model_state_dict

    adapter_dir = Path(args.adapter_dir)
    print(f"peft {peft.__version__}")
    print(f"adapter: {adapter_dir}")
    stored, err = adapter_file_tensors(adapter_dir)
    if stored is None:
        print(f"  {err}")
        print("FAIL (adapter did not load)")
        return 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model = PeftModel.from_pretrained(base, str(adapter_dir))
        except Exception as e:  # noqa: BLE001  (bad config, shape mismatch, ...)
            print(f"  peft could not load the adapter: {type(e).__name__}: {e}")
            print("FAIL (adapter did not load)")
            return 1
    model.eval()

    cfg = model.peft_config["default"]
    if cfg.peft_type != peft.PeftType.LORA:
        print(f"  peft_type {cfg.peft_type}: not a LoRA adapter")
        bad_load = True
    else:
        scaling = cfg.lora_alpha / (math.sqrt(cfg.r) if cfg.use_rslora else cfg.r)
        print(f"  r {cfg.r}, lora_alpha {cfg.lora_alpha}, use_rslora {cfg.use_rslora} (scaling {scaling:g}), "
              f"lora_dropout {cfg.lora_dropout}, target_modules {sorted(cfg.target_modules)}")
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in stored.values()})
    print(f"  {len(stored)} tensors in adapter_model.safetensors ({', '.join(dtypes)})")

    for w in caught:
        msg = str(w.message)
        if "adapter keys" in msg or "unexpected" in msg.lower():
            print(f"  peft warning: {msg}")
            bad_load = True

    # exactly the keys PEFT saves for this configuration, each loaded as stored
    want_keys = get_peft_model_state_dict(model)
    missing = sorted(set(want_keys) - set(stored))
    unexpected = sorted(set(stored) - set(want_keys))
    not_loaded = sorted(k for k in set(stored) & set(want_keys)
                        if stored[k].shape != want_keys[k].shape
                        or not torch.equal(stored[k].to(want_keys[k].dtype), want_keys[k]))
    for label, keys in (("missing adapter keys", missing), ("unexpected adapter keys", unexpected),
                        ("adapter keys not loaded as stored", not_loaded)):
        if keys:
            print(f"  {label}: {keys}")
            bad_load = True
    return compare(model, ids, mask, want, args.tol, bad_load)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
