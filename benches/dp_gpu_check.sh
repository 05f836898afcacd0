#!/usr/bin/env bash
# GPU check of data parallelism (the CPU tests are cli/tests/dp.rs). Runs the built-in tiny model
# for 5 updates on the GPU: one process with batch 4 against (a) `--devices cuda:0,cuda:1` with
# batch 2 per device (one GPU: cuda:0,cuda:0) and (b) two processes (`--nodes 2`, one GPU each)
# with batch 2, and prints the largest metric and weight differences (expect ≤ 1e-4 relative /
# 1e-4 absolute: f32 summation order; TF32 matmuls on CUDA may add ~1e-3, see README Parity).
# Usage: bash benches/dp_gpu_check.sh [path/to/wrpo-engine] [gpus]
set -euo pipefail
BIN=${1:-target/release/wrpo-engine}
GPUS=${2:-$(nvidia-smi -L 2>/dev/null | wc -l)}
OUT=${OUT:-dp-gpu-check}
rm -rf "$OUT" && mkdir -p "$OUT"
C=(train --max-steps 5 --gradient-accumulation-steps 1 --eval-fraction 0 --save-steps 0)
D1=0; [ "$GPUS" -ge 2 ] && D1=1
"$BIN" "${C[@]}" --backend cuda --per-device-train-batch-size 4 --output "$OUT/one" 2> "$OUT/one.log"
"$BIN" "${C[@]}" --devices "cuda:0,cuda:$D1" --per-device-train-batch-size 2 --output "$OUT/devices" 2> "$OUT/devices.log"
PORT=29650
"$BIN" orchestrator --port $PORT 2> "$OUT/orch.log" & ORCH=$!
trap 'kill $ORCH 2>/dev/null || true' EXIT
sleep 1
CUDA_VISIBLE_DEVICES=$D1 "$BIN" "${C[@]}" --backend cuda --per-device-train-batch-size 2 --output "$OUT/nodes" \
    --nodes 2 --node-rank 1 --orchestrator 127.0.0.1:$PORT 2> "$OUT/nodes1.log" & N1=$!
CUDA_VISIBLE_DEVICES=0 "$BIN" "${C[@]}" --backend cuda --per-device-train-batch-size 2 --output "$OUT/nodes" \
    --nodes 2 --node-rank 0 --orchestrator 127.0.0.1:$PORT 2> "$OUT/nodes0.log"
wait $N1
grep -h "all-reduce" "$OUT"/*.log || true
python3 - "$OUT" <<'PY'
import json, struct, sys
out = sys.argv[1]
def metrics(d):
    return [json.loads(l) for l in open(f"{out}/{d}/metrics.jsonl")]
def weights(d):
    b = open(f"{out}/{d}/final/model.safetensors", "rb").read()
    n = struct.unpack("<Q", b[:8])[0]; h = json.loads(b[8:8 + n]); data = b[8 + n:]
    return {k: struct.unpack("<%df" % ((v["data_offsets"][1] - v["data_offsets"][0]) // 4),
                             data[v["data_offsets"][0]:v["data_offsets"][1]])
            for k, v in h.items() if k != "__metadata__"}
one, w1 = metrics("one"), weights("one")
for d in ["devices", "nodes"]:
    m, w = metrics(d), weights(d)
    rel = max(abs(a[k] - b[k]) / max(abs(b[k]), 1e-12) for a, b in zip(m, one) for k in b
              if k != "tokens_per_second" and b[k] not in (0, None))
    wd = max(max(abs(x - y) for x, y in zip(w[k], w1[k])) for k in w1)
    print(f"{d}: {len(m)} updates, max metric rel diff {rel:.2e}, max weight abs diff {wd:.2e}")
PY
