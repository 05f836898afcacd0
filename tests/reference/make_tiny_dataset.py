"""Write engine/assets/tiny/wrpo_tiny.jsonl: the bundled WRPO dataset of the embedded default.

Arithmetic questions in the authors' row format (prompt message, chosen = [source, target],
rejected = [one]): the source's answer states the sum in full, the target's best answer is short
and right, the rejected answer is wrong. Deterministic; plain Python (no torch needed).
Run from the repo root: python3 tests/reference/make_tiny_dataset.py
"""
import json
import random

rng = random.Random(20241203)
rows = []
for i in range(64):
    a, b = rng.randint(1, 20), rng.randint(1, 20)
    wrong = a + b + rng.choice([-3, -2, -1, 1, 2, 3])
    rows.append({
        "prompt_id": f"tiny-{i:03d}",
        "prompt": {"role": "user", "content": f"What is {a} + {b}?"},
        "chosen": [
            {"role": "assistant", "content": f"{a} + {b} = {a + b}."},
            {"role": "assistant", "content": f"It is {a + b}."},
        ],
        "rejected": [{"role": "assistant", "content": f"It is {wrong}."}],
    })
with open("engine/assets/tiny/wrpo_tiny.jsonl", "w") as f:
    for r in rows:
        f.write(json.dumps(r) + "\n")
