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
from model import KVCache, ModelArgs, Transformer  # noqa: E402
from sals_attention import SALSConfig, SALSCache  # noqa: E402


def cache_bytes(args: ModelArgs, batch: int, context: int, cfg: SALSConfig | None, dtype=torch.bfloat16) -> int:
    """Bytes allocated by all layers' caches: dense everywhere when cfg is None."""
    D = args.n_kv_head * args.head_dim
    with torch.device("meta"):
        dense = KVCache(batch, context, args.n_kv_head, args.head_dim, dtype).bytes_allocated()
        if cfg is None:
            return args.n_layer * dense
        cfg = cfg.resolve(args, D)
        sals = SALSCache(cfg, args, batch, context, torch.empty(D, cfg.rank, dtype=dtype)).bytes_allocated()
    n_dense = len(cfg.dense_layers)
    return n_dense * dense + (args.n_layer - n_dense) * sals


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
