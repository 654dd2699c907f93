#!/usr/bin/env bash
# One device call (< 9 min): end-to-end decode throughput of the whole model (random weights), dense against
# SALS-25% and SALS-12.5%, each step captured in a CUDA graph (bench/decode_bench.py --graph). Logs in $OUT;
# the markdown table of every run is printed last (rows of a run cut short by its timeout included).
#   a: Llama-2-7B and Mistral-7B, prompts 4K-32K, batch 8, the three methods (one process per shape).
#   b: the largest batch that fits at 32K, for each shape and method, and its timing.
# Estimate (H100): each process ~10 s to start and make 7B random weights; each config ~2-4 s to allocate, fill,
# warm up (Triton compiles a fused-kernel variant per batch and length) and capture one graph, then 3 + 3 x 32
# steps (a: ~10-20 ms at 4K to ~100 ms for Llama-2 SALS at 32K: ~50 s of steps for all Llama-2 rows, ~20 s for
# Mistral): a ~100 s + ~70 s. Dense Llama-2 at 32K batch 8 does not fit (16 GiB of cache per sequence); at 16K
# batch 8 (69 GB + 13.5 GB of weights) it is at the edge. b: per method a try at batch 1, then 2-5 tries from
# the guess free memory / one sequence's cache (~1-4 s each), then 3 + 3 x 16 steps at up to ~250 ms (Mistral
# SALS-12.5% near batch 60): ~70-90 s per shape. Total ~6 min; the timeouts below add up to 8.7 min.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
run() { log=$1; limit=$2; shift 2; echo "== $*"
        timeout "$limit" python bench/decode_bench.py --graph --method dense sals-25 sals-12.5 "$@" 2>&1 \
            | grep -v Warning | tee "$OUT/$log"
        echo "$log exit status $? (124: cut short by its ${limit} s timeout)"; }
run a_llama.log 150 --shape llama-2-7b --prompt 4096 8192 16384 32768 --batch 8 --steps 32
run a_mistral.log 120 --shape mistral-7b --prompt 4096 8192 16384 32768 --batch 8 --steps 32
run b_llama.log 120 --shape llama-2-7b --prompt 32768 --max_batch --steps 16
run b_mistral.log 130 --shape mistral-7b --prompt 32768 --max_batch --steps 16
# the table: header once, then each run's final table (its progress rows if it was cut short)
echo; python -c "import sys; sys.path.insert(0, 'bench'); from decode_bench import HEADER; print(HEADER)"
for log in a_llama.log a_mistral.log b_llama.log b_mistral.log; do
    rows=$(sed -n '/^| shape/,$p' "$OUT/$log"); [ -n "$rows" ] || rows=$(grep '^| ' "$OUT/$log")
    echo "$rows" | grep '^| ' | grep -v '^| shape\|^| ---'
done
