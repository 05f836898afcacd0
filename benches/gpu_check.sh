#!/usr/bin/env bash
# The prepared GPU check: on a machine with an NVIDIA driver, run the CUDA parity tests (kernels:
# fused vs composite vs f64; model: logits and log-probs vs transformers) and the kernel benchmarks
# on --backend cuda, and write the results to $OUT (or ./gpu-results). Target: under 5 minutes.
#
# Two ways to run it:
#   * with cargo on the GPU machine:   bash benches/gpu_check.sh
#   * with binaries built elsewhere:   bash benches/prepare_gpu_check.sh   (here, builds .gpu/)
#                                      then on the GPU machine, from the repo root, with .gpu/ beside it:
#                                      bash benches/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-results}
mkdir -p "$out"
export WRPO_FIXTURES="$PWD/tests/fixtures" XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-/tmp}
if [ -f .gpu/bin.tar.gz ] && [ ! -x .gpu/wrpo-engine ]; then
  tar -C .gpu -xzf .gpu/bin.tar.gz
fi
if [ -x .gpu/wrpo-engine ]; then
  engine=.gpu/wrpo-engine kernels=.gpu/kernels-tests parity=.gpu/parity-tests
else
  cargo build --release -p wrpo-cli
  engine="${CARGO_TARGET_DIR:-target}/release/wrpo-engine"
  kernels=$(cargo test --release -p wrpo-kernels --no-run --message-format=json 2>/dev/null | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | head -n1)
  parity=$(cargo test --release -p wrpo-tests --test parity --no-run --message-format=json 2>/dev/null | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | head -n1)
fi
rm -f "$out/failed"
{
  echo "== machine"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  echo "== backends"; "$engine" backends
  echo "== kernel parity on CUDA (ignored tests named cuda)"
  timeout 150 "$kernels" --ignored cuda --test-threads 1 --nocapture || echo "kernel parity failed" >> "$out/failed"
  echo "== model parity on CUDA vs transformers"
  timeout 150 "$parity" --ignored cuda --test-threads 1 --nocapture || echo "model parity failed" >> "$out/failed"
  echo "== kernel benchmarks on CUDA (one JSON record per case)"
  timeout 200 "$engine" bench kernels --backend cuda --warmup 2 --reps 10 --json \
    --shape 8,256,128256 --shape 4,2048,128256 --shape 8,1024,32000 --shape 2,512,151936 \
    --attention 1,32,8,2048,128 --attention 2,32,8,1024,128 --attention 1,9,3,4096,64 \
    | tee "$out/bench_cuda.jsonl" || echo "benchmarks failed" >> "$out/failed"
  echo "== one WRPO update of a 1B-class LLaMA at T 2048: fused vs dense LM head, tiled vs dense attention, checkpointing (peak = pool reservation, beside the memory plan's prediction: predicted_peak_mb)"
  for cfg in "fused tiled false" "dense tiled false" "fused dense false" "fused tiled true"; do
    set -- $cfg
    timeout 150 "$engine" bench step --backend cuda --hidden 2048 --layers 16 --heads 32 --kv-heads 8 \
      --intermediate 8192 --vocab 128256 --batch 1 --seq 2048 --steps 2 --warmup 1 --lm-head-impl $1 \
      --attn-implementation $2 --gradient-checkpointing $3 --json \
      | tee -a "$out/bench_step_cuda.jsonl" || echo "bench step ($cfg) failed" >> "$out/failed"
  done
  echo "== the same update with LoRA r 16 on every linear layer + checkpointing, the base in f32 and in bf16 (full_peak_mb: the full fine-tune of the same shape, same run)"
  for base in f32 bf16; do
    timeout 200 "$engine" bench step --backend cuda --hidden 2048 --layers 16 --heads 32 --kv-heads 8 \
      --intermediate 8192 --vocab 128256 --batch 1 --seq 2048 --steps 2 --warmup 1 \
      --gradient-checkpointing true --lora-r 16 --lora-base-dtype $base --json \
      | tee -a "$out/bench_step_cuda.jsonl" || echo "bench step (LoRA, $base base) failed" >> "$out/failed"
  done
} 2>&1 | tee "$out/gpu_check.txt"
if [ -f "$out/failed" ]; then
  echo "gpu check: some steps failed (see $out/failed and $out/gpu_check.txt)"
  exit 1
fi
echo "gpu check passed; results in $out/"
