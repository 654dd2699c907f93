#!/usr/bin/env bash
# One device call: Nsight Compute (hardware counters, stall reasons per SASS line) over one eager SALS step per
# config, then the kernels checked against the PyTorch reference. Report and text pages in $OUT.
#   bash bench/gpu_profile.sh llama-2-7b:4096:8 mistral-7b:4096:8
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu | head -1)
timeout 300 "$NCU" --profile-from-start off --clock-control none --set full --import-source yes -f -o "$OUT/step" \
    python bench/attention_bench.py --ncu "$@" 2>&1 | grep -v Warning | tail -20
"$NCU" -i "$OUT/step.ncu-rep" --page details > "$OUT/details.txt" 2>&1
"$NCU" -i "$OUT/step.ncu-rep" --page source --csv --print-source sass -k regex:sals_decode > "$OUT/sass.csv" 2>&1 \
    || echo "source page failed: $(tail -2 "$OUT/sass.csv")"
grep -E "^  [a-zA-Z_]|Duration|Registers Per|Occupancy|Throughput|Block Limit|Warp Cycles Per Issued|Issued Ipc" \
    "$OUT/details.txt" | head -200
echo "== kernels vs the PyTorch reference"
timeout 150 python bench/attention_bench.py --check 2>&1 | grep -v Warning | tail -14
timeout 60 python -m kernels.compress 2>&1 | grep -v Warning | tail -6
