#!/usr/bin/env bash
# One device call (< 8 min): the SALS Triton kernels checked against the PyTorch reference at real sizes, then
# one layer timed against SDPA flash. Logs in $OUT; the markdown table is printed last (see bench/NOTES.md).
# `bash bench/gpu_sals.sh grid`: the radix select against torch.topk, then SALS-12.5% and 25% against SDPA at the shapes
# the issue's targets name (B = 16, 8 at 4K; 32K) with kernels/sals_decode.CONFIGS (the sweep: --sweep, or `fast`).
# `bash bench/gpu_sals.sh fast` (< 8 min on a warm H100): the kernels checked at two real sizes, the fused kernel's
# launch-setting sweep (fastest variant kept), then SALS-12.5% (Triton and PyTorch reference) vs SDPA at six shapes (bench/attention_bench.py --fast).
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
if [ "${1:-}" = grid ]; then  # ~4.5 min on a warm H200 (BENCHMARKS.md, 2026-12-01): select, then the target cells
  timeout 45 python kernels/topk.py 2>&1 | grep -v Warning | tee "$OUT/select.log"
  timeout 170 python bench/attention_bench.py --fraction 0.125 --configs llama-2-7b:4096:16 llama-2-7b:4096:8 \
      llama-2-7b:32768:8 mistral-7b:4096:16 mistral-7b:4096:8 mistral-7b:32768:8 2>&1 | grep -v Warning > "$OUT/grid125.log"
  echo "grid125 exit status: $? (124 = ran out of time)"
  timeout 90 python bench/attention_bench.py --fraction 0.25 --configs llama-2-7b:4096:16 mistral-7b:4096:8 \
      mistral-7b:32768:8 2>&1 | grep -v Warning > "$OUT/grid25.log"
  echo "grid25 exit status: $? (124 = ran out of time)"
  grep -h "^| " "$OUT/grid125.log" "$OUT/grid25.log" | grep -v "^| shape\|^| ---" | sort -u
  exit 0
fi
if [ "${1:-}" = fast ]; then
  timeout 480 python bench/attention_bench.py --fast 2>&1 | grep -v Warning | tee "$OUT/fast.log"
  echo "fast exit status: $? (0 = every check within tolerance; 124 = ran out of time, partial rows above)"
  exit 0
fi

echo "== kernels and whole step vs the PyTorch reference (NaN-poisoned outputs, bf16, relative errors)"
timeout 150 python bench/attention_bench.py --check 2>&1 | grep -v Warning | tee "$OUT/check.log"
check=$?
if [ -n "${MICRO:-}" ]; then
  echo "== micro-benchmarks of each kernel"
  timeout 45 python kernels/latent_score.py 2>&1 | tee "$OUT/kernels.log"
  timeout 45 python kernels/sals_decode.py 2>&1 | tee -a "$OUT/kernels.log"
  timeout 90 python kernels/compress.py 2>&1 | tee -a "$OUT/kernels.log"
fi

echo "== one layer: SALS step (torch.compile'd, CUDA graph) vs SDPA flash"
bench() { log=$1; shift; timeout "$@" 2>&1 | grep -v Warning > "$OUT/$log"; echo "$log exit status $?"; \
          grep -v '^| ' "$OUT/$log" | tail -8; }
bench bench_4k.log 150 python bench/attention_bench.py --fraction 0.25 0.125 \
    --configs llama-2-7b:4096:8 llama-2-7b:4096:16 mistral-7b:4096:8
bench bench_32k.log 150 python bench/attention_bench.py --fraction 0.125 \
    --configs llama-2-7b:4096:1 llama-2-7b:32768:1 llama-2-7b:32768:8 mistral-7b:32768:8
echo "check exit status: $check (0 = every kernel within tolerance)"
# the table: header once, then the rows of both runs (progress rows if a run was cut short)
for log in bench_4k.log bench_32k.log; do
    rows=$(sed -n '/^| shape/,$p' "$OUT/$log"); [ -n "$rows" ] || rows=$(grep '^| ' "$OUT/$log")
    if [ "$log" = bench_4k.log ]; then echo "$rows" | grep '^| shape\|^| ---' | head -2; fi
    echo "$rows" | grep '^| ' | grep -v '^| shape\|^| ---'
done
