#!/usr/bin/env bash
# One device call: dense decode throughput for BENCHMARKS.md (see bench/NOTES.md for predictions).
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
run() { echo "== $*"; python bench/decode_bench.py --compile "$@" 2>&1 | grep -v Warning | tee -a "$OUT/dense.log"; }
case "${1:-a}" in
a) run --shape llama-2-7b --prompt 4096 --batch 1 16
   run --shape llama-2-7b --prompt 32768 --batch 1
   run --shape mistral-7b --prompt 4096 8192 16384 --batch 8 ;;
b) run --shape llama-2-7b --prompt 4096 --batch 1 16 --attn matmul
   run --shape mistral-7b --prompt 4096 --batch 8 --attn matmul
   run --shape mistral-7b --prompt 32768 --batch 8 ;;
esac
