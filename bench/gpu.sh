#!/usr/bin/env bash
# Device calls (one NVIDIA GPU, < 10 min each): `bash bench/gpu.sh MODE...` runs each mode in turn; logs in $OUT, every
# table printed again at the end. Each step has its own time limit, so a slow one leaves the others their time.
#   check     the SALS kernels and the whole step against the PyTorch reference at real sizes; the bucket-query kernel
#   dense     the dense split-KV kernel's launch settings against the copy ceiling (checked against SDPA flash)
#   select    scoring + selection micro-benchmarks
#   layer     one layer, SALS-12.5% and 25% (per-layer and per-KV-head bucket selection) against every dense
#             baseline at the cells of the SALS-floor issue's targets, eager steps in CUDA graphs
#   sweep     the fused SALS kernel's launch settings alone (bench/attention_bench.py SWEEP)
#   e2e       whole model, random weights, compiled decode step (generate.py --compile's path): dense kernel, dense
#             masked, SALS-25%, SALS-12.5%, at the end-to-end targets' shapes
#   long      whole model, compiled, at the long end-to-end target Llama-2 16K batch 8
#   128k      the same at Llama-3-8B 128K batch 4 (85 GB dense: skipped on a card with less memory)
#   largest   the largest batch at 32K for each method (each batch its own process), and its timing
#   prefill   one long prompt through the Llama-3-8B shape, chunked: time against the compute roofline, memory
#   profile   Nsight Compute over one eager SALS step per cell: stall reasons, registers, occupancy
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
step() { local limit=$1 log=$2; shift 2; echo "== $* (limit ${limit}s)"
         timeout "$limit" "$@" 2>&1 | grep -v Warning | tee "$OUT/$log.log" | grep -v '^|'; echo "exit status $?"; }
targets=(mistral-7b:32768:8 mistral-7b:32768:16 mistral-7b:4096:8 mistral-7b:4096:16 llama-2-7b:4096:16
         llama-2-7b:4096:8 llama-2-7b:32768:8 llama-2-7b:8192:1 llama-2-7b:32768:1 mistral-7b:32768:1)
for mode in "$@"; do case $mode in
check) step 110 check python bench/attention_bench.py --check
       step 60 bucket_query python -m kernels.bucket_query ;;
dense) step 240 dense python -m kernels.decode_attention --variants ;;
select) step 120 select python -m kernels.topk 1 8 ;;
layer)
  step 290 layer python bench/attention_bench.py --eager --fraction 0.125 0.25 --selection layer "kv-head bucket" \
      --configs "${targets[@]}" ;;
sweep)
  step 200 sweep python bench/attention_bench.py --sweep llama-2-7b:4096:16 mistral-7b:32768:8 ;;
e2e)
  step 280 e2e_mistral python bench/decode_bench.py --compile --shape mistral-7b --prompt 4096 32768 --batch 8 \
      --method dense dense-masked sals-25 sals-12.5 --steps 32
  step 250 e2e_llama python bench/decode_bench.py --compile --shape llama-2-7b --prompt 4096 --batch 1 16 \
      --method dense dense-masked sals-25 sals-12.5 --steps 32 ;;
long)
  step 200 e2e_llama16k python bench/decode_bench.py --compile --shape llama-2-7b --prompt 16384 --batch 8 \
      --method dense sals-25 sals-12.5 --steps 32 ;;
128k)
  if [ "$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)" -gt 100000 ]; then
    step 500 e2e_llama3_128k python bench/decode_bench.py --compile --shape llama-3-8b --prompt 131072 --batch 4 \
        --method dense sals-25 sals-12.5 --steps 16
  else echo "== Llama-3-8B 128K batch 4 skipped: it needs ~85 GB"; fi ;;
largest)
  for m in dense sals-25 sals-12.5; do
    step 180 "largest_$m" python bench/decode_bench.py --graph --steps 16 --shape mistral-7b --prompt 32768 \
        --method "$m" --max_batch
  done ;;
prefill)
  step 150 prefill_dense python bench/prefill_bench.py --shape llama-3-8b --prompt 8192 32768 131072
  step 150 prefill_sals python bench/prefill_bench.py --shape llama-3-8b --prompt 8192 32768 --method sals-25 ;;
profile)
  NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu | head -1)
  timeout 300 "$NCU" --profile-from-start off --clock-control none --set full -f -o "$OUT/step" \
      python bench/attention_bench.py --ncu llama-2-7b:4096:16 mistral-7b:32768:8 2>&1 | tail -5
  "$NCU" -i "$OUT/step.ncu-rep" --page details > "$OUT/details.txt" 2>&1
  grep -E "^  [a-zA-Z_]|Duration|Registers Per|Achieved Occupancy|Memory Throughput|Warp Cycles Per Issued" \
      "$OUT/details.txt" | head -120 ;;
*) echo "unknown mode $mode (check, dense, select, layer, sweep, e2e, long, 128k, largest, prefill, profile)"; exit 2 ;;
esac; done
echo; echo "== tables"
for f in "$OUT"/*.log; do grep -q '^|' "$f" && { echo "-- $(basename "$f")"; grep '^|' "$f"; }; done
true
