#!/usr/bin/env bash
# One device call (< 10 min): end-to-end decode throughput of the whole model (random weights), dense against
# SALS-25% and SALS-12.5%, each step captured in a CUDA graph (bench/decode_bench.py --graph). Logs in $OUT;
# the markdown table of every run is printed last (rows of a run cut short by its timeout included).
#   `bash bench/gpu_e2e.sh`: Llama-2-7B and Mistral-7B, prompts 4K-32K, batch 8, the three methods (one process per
#   shape; the Llama-2 one needs more than its 150 s for the 32K SALS-12.5% row, which `largest` times).
#   `bash bench/gpu_e2e.sh largest`: the largest batch that fits at 32K, for each shape and method, and its timing, each
#   batch in its own process.
# H200 (bench/NOTES.md): the batch-8 runs ~300 s with the warm-up (2026-12-01, call 4); `largest` 253 s and
# `largest next` 226 s (2026-12-02, calls 5 and 3; in one process per shape and method, runs after a batch near the
# memory limit stalled on 2026-12-01: each batch now has its own process).
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
if [ "${1:-}" = largest ]; then
  # b: the largest batch at 32K, for each shape and method: each batch in its own process (in one process the run
  # after a batch near the memory limit stalled, 2026-12-01), upward from a batch known to fit (bench/kv_memory.py's
  # bytes per sequence, the batch-8 rows' peak memory) until one does not ("out of memory" row) or a run is cut by its
  # timeout; one log per shape and method.
  big() { name=$1; limit=$2; args=$3; shift 3; echo "== $name: $args"
          for b in "$@"; do
              timeout "$limit" python bench/decode_bench.py --graph --steps 16 --prompt 32768 $args --batch "$b" 2>&1 \
                  | grep -v Warning > /tmp/batch.log; status=$?
              cat /tmp/batch.log >> "$OUT/b_$name.log"
              grep '^| [lm]' /tmp/batch.log | tail -1; echo "batch $b exit status $status (124: timeout)"
              { [ $status = 0 ] && ! grep -q "out of memory |" /tmp/batch.log; } || break
          done; }
  # `largest`: each largest batch timed (one call, ~5 min). `largest next`: the batches tried above the lower bounds of
  # 2026-12-01 up to the first that ran out of memory (2026-12-02: 23, 34, 89; dense 8 and 32 and SALS-12.5% Mistral
  # 132 ran out on 2026-12-01).
  if [ "${2:-}" = next ]; then
    big llama_25 75 "--shape llama-2-7b --method sals-25" 22 23
    big llama_125 75 "--shape llama-2-7b --method sals-12.5" 32 33 34
    big mistral_25 75 "--shape mistral-7b --method sals-25" 89
    exit 0
  fi
  big llama_dense 75 "--shape llama-2-7b --method dense" 7
  big llama_25 75 "--shape llama-2-7b --method sals-25" 22
  big llama_125 75 "--shape llama-2-7b --method sals-12.5" 33
  big mistral_dense 75 "--shape mistral-7b --method dense" 31
  big mistral_25 75 "--shape mistral-7b --method sals-25" 88
  big mistral_125 90 "--shape mistral-7b --method sals-12.5" 131
  exit 0
fi
# The Triton kernels of every SALS run below, compiled side by side first (one-layer steps with the same cache shapes:
# S = prompt + 32 steps, the same batches; kernel variants follow S, B and the shape), so that no timed process waits on
# the compiler: the searches of an earlier call ran out of time compiling and filling caches.
warm=(); for shape in llama-2-7b mistral-7b; do for P in 4096 8192 16384 32768; do warm+=("$shape:$((P + 32)):8"); done; done
warm+=(llama-2-7b:32800:24 mistral-7b:32800:100)  # the largest batches' variants (B 17-32, and B > 64)
for c in "${warm[@]}"; do timeout 150 python bench/attention_bench.py --warm --eager --configs "$c" > "$OUT/warm_${c//:/_}.log" 2>&1 & done
wait; grep -l Traceback "$OUT"/warm_*.log && { grep -h -A12 Traceback "$OUT"/warm_*.log | tail -40; exit 1; }
run() { log=$1; limit=$2; shift 2; echo "== $*"
        timeout "$limit" python bench/decode_bench.py --graph --method dense sals-25 sals-12.5 --steps 32 "$@" 2>&1 \
            | grep -v Warning | tee "$OUT/$log"
        echo "$log exit status $? (124: cut short by its ${limit} s timeout)"; }
run a_llama.log 150 --shape llama-2-7b --prompt 4096 8192 16384 32768 --batch 8
run a_mistral.log 110 --shape mistral-7b --prompt 4096 8192 16384 32768 --batch 8
# the table: header once, then each run's final table (its progress rows if it was cut short)
echo; python -c "import sys; sys.path.insert(0, 'bench'); from decode_bench import HEADER; print(HEADER)"
for log in a_llama.log a_mistral.log; do
    rows=$(sed -n '/^| shape/,$p' "$OUT/$log"); [ -n "$rows" ] || rows=$(grep '^| ' "$OUT/$log")
    echo "$rows" | grep '^| ' | grep -v '^| shape\|^| ---'
done
