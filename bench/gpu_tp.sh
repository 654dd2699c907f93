#!/usr/bin/env bash
# Tensor-parallel decode (tp.py): ms/step of the Llama-2-7B and Mistral-7B shapes (random weights), dense, SALS-25% and
# SALS-12.5%, batch 1 and 8, prompts 4K and 32K, each step captured in a CUDA graph (bench/decode_bench.py --graph),
# one process per GPU started by torchrun, NCCL all-reduces. One device call each, on the same machine kind:
#   `bash bench/gpu_tp.sh 1`   the one-GPU baseline (plain python)
#   `bash bench/gpu_tp.sh N`   N = 2, 4 or 8 ranks (on a machine with at least N GPUs)
# NVLink multicast stays off (a program using it can take the host's shared GPUs out of service): the three variables
# below are exported for every process torchrun starts. Logs in $OUT, each ending with its run's table.
# Not run yet. If capturing the NCCL all-reduce in a CUDA graph fails, replace --graph by --compile (minutes per row).
set -o pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
N=${1:?usage: bash bench/gpu_tp.sh N (1, 2, 4 or 8 GPUs)}
OUT=${OUT:-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'GPUs', torch.cuda.device_count())" | tee -a "$OUT/gpu.txt"
launch=(python3 -m torch.distributed.run --standalone --nproc_per_node "$N")
[ "$N" = 1 ] && launch=(python3)
for shape in llama-2-7b mistral-7b; do
  log="$OUT/tp${N}_$shape.log"; echo "== tp $N $shape"
  timeout 270 "${launch[@]}" bench/decode_bench.py --graph --shape "$shape" --prompt 4096 32768 --batch 1 8 \
      --method dense sals-25 sals-12.5 --steps 32 2>&1 | grep -v Warning | tee "$log"
  echo "tp $N $shape exit status $? (124: cut short by its 270 s timeout)"
done
