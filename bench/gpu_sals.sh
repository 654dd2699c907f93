#!/usr/bin/env bash
# One device call (< 8 min): the SALS Triton kernels checked against the PyTorch reference at real sizes, then
# one layer timed against SDPA flash. Logs in $OUT; the markdown table is printed last (see bench/NOTES.md).
# `bash bench/gpu_sals.sh grid` (~8 min on an H200): the check, the radix select against torch.topk, then SALS-12.5% and
# 25% against SDPA at every cell of issue 4's grid (S 4K-32K, B 1, 8, 16, both shapes), the step eager in a CUDA graph,
# and compiled (torch.compile, then a graph) at the cells the targets name; kernels compiled beforehand in parallel.
# `bash bench/gpu_sals.sh sweep` (~3 min): the check, the fused kernel's launch variants timed alone, then the fastest in the
# eager step against SDPA at five cells.
# `bash bench/gpu_sals.sh fast` (< 8 min on a warm H100): the kernels checked at two real sizes, the fused kernel's
# launch-setting sweep (fastest variant kept), then SALS-12.5% (Triton and PyTorch reference) vs SDPA at six shapes (bench/attention_bench.py --fast).
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
# warm N eager|compiled CONFIGS...: attention_bench.py --warm over the configs (SHAPE:S:B words) split into N processes side by
# side, so the timing runs after it load every Triton / inductor kernel from disk instead of compiling it; stops the
# script if any of them failed (a kernel that does not compile on this GPU fails here, in seconds).
warm() { local n=$1 mode=$2; shift 2; local items=("$@") p i pids=()
         for ((p = 0; p < n; p++)); do sub=(); for ((i = p; i < ${#items[@]}; i += n)); do sub+=("${items[i]}"); done
             [ ${#sub[@]} -gt 0 ] || continue
             flag=""; [ "$mode" = eager ] && flag=--eager
             timeout 400 python bench/attention_bench.py --warm $flag --configs "${sub[@]}" > "$OUT/warm_$mode$p.log" 2>&1 &
             pids+=($!); done
         local bad=0; for p in "${pids[@]}"; do wait "$p" || bad=1; done
         if [ $bad = 1 ]; then echo "warm-up failed:"; grep -h -B2 -A12 Traceback "$OUT"/warm_*.log | tail -60; exit 1; fi; }
if [ "${1:-}" = grid ]; then  # the whole one-layer grid of issue 4, eager step in a CUDA graph; compiled at the targets
  cells=(); for shape in llama-2-7b mistral-7b; do for S in 4096 8192 16384 32768; do for B in 1 8 16; do
      cells+=("$shape:$S:$B"); done; done; done
  targets=(llama-2-7b:4096:16 llama-2-7b:4096:8 llama-2-7b:32768:8 mistral-7b:4096:16 mistral-7b:4096:8 mistral-7b:32768:8)
  timeout 200 python bench/attention_bench.py --check 2>&1 | grep -v Warning > "$OUT/check.log" &
  check_pid=$!
  warm 12 eager "${cells[@]}"
  warm 6 compiled "${targets[@]}"
  wait $check_pid; echo "check exit status $? (0 = every kernel and step within tolerance)"; cat "$OUT/check.log"
  timeout 60 python -m kernels.topk 2>&1 | grep -v Warning | tee "$OUT/select.log"
  timeout 300 python bench/attention_bench.py --eager --configs "${cells[@]}" 2>&1 | grep -v Warning > "$OUT/grid_eager.log"
  echo "grid_eager exit status: $? (124 = ran out of time)"
  timeout 150 python bench/attention_bench.py --configs "${targets[@]}" 2>&1 | grep -v Warning > "$OUT/grid_compiled.log"
  echo "grid_compiled exit status: $? (124 = ran out of time)"
  for log in grid_eager.log grid_compiled.log; do echo "== $log"; grep "^| " "$OUT/$log" | grep -v "^| shape\|^| ---" | sort -u; done
  exit 0
fi
if [ "${1:-}" = sweep ]; then  # (~3 min on an H200) the check, then the fused kernel's launch variants (attention_bench.SWEEP) at four
  # cells, the fastest of each family then timed in the eager step (CUDA graph) against SDPA at the target cells
  timeout 200 python bench/attention_bench.py --check 2>&1 | grep -v Warning | tee "$OUT/check.log"
  echo "check exit status: $? (0 = every kernel and step within tolerance)"
  timeout 330 python bench/attention_bench.py --eager --fraction 0.125 0.25 \
      --sweep llama-2-7b:4096:8 llama-2-7b:32768:8 mistral-7b:4096:8 mistral-7b:32768:8 \
      --configs llama-2-7b:4096:8 llama-2-7b:4096:16 llama-2-7b:32768:8 mistral-7b:4096:8 mistral-7b:32768:8 \
      2>&1 | grep -v Warning > "$OUT/sweep.log"
  echo "sweep exit status: $? (124 = ran out of time)"; grep "^| " "$OUT/sweep.log" | grep -v "^| shape\|^| ---"
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
  timeout 45 python -m kernels.latent_score 2>&1 | tee "$OUT/kernels.log"
  timeout 45 python -m kernels.sals_decode 2>&1 | tee -a "$OUT/kernels.log"
  timeout 90 python -m kernels.compress 2>&1 | tee -a "$OUT/kernels.log"
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
