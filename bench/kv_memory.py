"""KV-cache memory of dense and SALS caches, from the allocations alone (meta tensors, no weights).

    python bench/kv_memory.py --shape llama-2-7b llama-3-8b --context 32768

Every buffer each layer's cache allocates is counted (latents, packed values, scales and zeros,
sinks, window ring, positions, U, and the dense caches of the layers that stay dense).
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from decode_bench import SHAPES  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402
from sals_attention import SALSConfig, cache_bytes  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", nargs="+", default=["llama-2-7b", "llama-3-8b"], choices=sorted(SHAPES))
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--gpu_gb", type=float, default=80.0, help="memory for weights + caches, for the batch column")
    a = p.parse_args(argv)
    print(f"| shape | cache | bytes / token (all layers) | ratio to dense | ratio, SALS layers only | "
          f"largest batch at {a.context} in {a.gpu_gb:g} GB |")
    print("| --- | --- | --- | --- | --- | --- |")
    for shape in a.shape:
        args = ModelArgs.from_config(dict(SHAPES[shape], model_type="llama", max_position_embeddings=1 << 20))
        with torch.device("meta"):
            weights = sum(p.numel() * 2 for p in Transformer(args).parameters())  # bf16, tied or not
        dense = cache_bytes(args, 1, a.context, None)
        for name, cfg in [("dense bf16", None), ("SALS-25%", SALSConfig.preset(0.25)),
                          ("SALS-12.5%", SALSConfig.preset(0.125))]:
            total = cache_bytes(args, 1, a.context, cfg)
            only = "" if cfg is None else (
                f"{cache_bytes(args, 1, a.context, SALSConfig.preset(cfg.rank_fraction, dense_layers=())) / dense:.3f}")
            fits = int((a.gpu_gb * 1e9 - weights) // total)
            print(f"| {shape} | {name} | {total / a.context / 1024:.1f} KiB | {total / dense:.3f} | {only} | {fits} |")


if __name__ == "__main__":
    main()
