"""Tensor parallelism: one process per GPU, started by torchrun, each holding a slice of every layer.

    torchrun --standalone --nproc_per_node 2 generate.py --prompt "The capital of France is" --tp 2

The model is split by KV-head groups (Megatron style): rank r of N holds KV heads [r Hkv/N, (r+1) Hkv/N) with the
query heads that share them (rows of wqkv, columns of wo) and 1/N of the MLP's hidden units (rows of both the gate
and the up half of w13, columns of w2). The outputs of wo and w2 are then partial sums of the full ones: an
all-reduce after each makes every rank's residual stream whole again. Embeddings, norms and the output head are
replicated, so all ranks compute the same logits and, from the same seed, sample the same tokens.

Each rank's static cache holds only its own KV heads. A SALS cache compresses them with a basis of its own heads'
keys (`calibrate.py --tp N`) and selects its tokens with its own heads' latent query, without communication
(one selection per rank: docs/sals.md says why).
"""
import atexit
import contextlib
import os
import sys
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn as nn
from torch import Tensor

from model import ModelArgs, Transformer, load_model


@dataclass(frozen=True)
class TPInfo:
    rank: int
    world: int
    args: ModelArgs  # the whole model's; model.args becomes one rank's (local_args)


def tp_sizes(args: ModelArgs) -> list[int]:
    """The numbers of ranks this model splits over: each must divide the KV heads, the query heads and the MLP."""
    return [n for n in range(1, args.n_kv_head + 1)
            if args.n_kv_head % n == 0 and args.n_head % n == 0 and args.intermediate_size % n == 0]


def check_tp_size(args: ModelArgs, world: int):
    if world not in tp_sizes(args):
        raise ValueError(f"tensor parallelism over {world} ranks needs {world} to divide n_kv_head ({args.n_kv_head}), "
                         f"n_head ({args.n_head}) and intermediate_size ({args.intermediate_size}): each rank holds "
                         f"whole KV heads. Valid sizes for this model: {', '.join(map(str, tp_sizes(args)))}.")


def local_args(args: ModelArgs, world: int) -> ModelArgs:
    """One rank's share of the model: what its layers and caches are built with."""
    return replace(args, n_head=args.n_head // world, n_kv_head=args.n_kv_head // world,
                   intermediate_size=args.intermediate_size // world)


def _rows(w: Tensor, spans: list[tuple[int, int]]) -> nn.Parameter:
    """Rows [start, start + size) of w for each (start, size) in spans, concatenated."""
    return nn.Parameter(torch.cat([w[s:s + n] for s, n in spans]), requires_grad=False)


def _columns(w: Tensor, start: int, size: int) -> nn.Parameter:
    return nn.Parameter(w[:, start:start + size].contiguous(), requires_grad=False)


def _all_reduce(module: nn.Module, inputs, output: Tensor) -> Tensor:
    """Forward hook: the sum of every rank's partial output. A functional collective, so that torch.compile traces
    it into the graph (fullgraph) and a CUDA graph captures it."""
    return funcol.all_reduce(output, "sum", dist.group.WORLD)


def shard_model(model: Transformer, rank: int, world: int) -> Transformer:
    """Keeps rank's slice of every layer's weights (in place; also on the meta device) and all-reduces the outputs of
    wo and w2. Call before setup_caches: the caches are then built for this rank's heads."""
    a = model.args
    check_tp_size(a, world)
    if model.tp is not None:
        raise ValueError("the model is already sharded.")
    la = local_args(a, world)
    Dh, q_size, kv_size, hidden = a.head_dim, a.n_head * a.head_dim, a.n_kv_head * a.head_dim, a.intermediate_size
    q_local, kv_local, hidden_local = la.n_head * Dh, la.n_kv_head * Dh, la.intermediate_size
    for layer in model.layers:
        attn, ffn = layer.attention, layer.feed_forward
        # wqkv rows are [q | k | v]; query head h belongs to KV head h // G, so a rank's query heads are contiguous
        attn.wqkv.weight = _rows(attn.wqkv.weight, [(rank * q_local, q_local), (q_size + rank * kv_local, kv_local),
                                                    (q_size + kv_size + rank * kv_local, kv_local)])
        attn.wo.weight = _columns(attn.wo.weight, rank * q_local, q_local)
        attn.n_head, attn.n_kv_head = la.n_head, la.n_kv_head
        ffn.w13.weight = _rows(ffn.w13.weight, [(rank * hidden_local, hidden_local),
                                                (hidden + rank * hidden_local, hidden_local)])
        ffn.w2.weight = _columns(ffn.w2.weight, rank * hidden_local, hidden_local)
        if world > 1:
            attn.register_forward_hook(_all_reduce)
            ffn.register_forward_hook(_all_reduce)
    model.args, model.tp = la, TPInfo(rank, world, a)
    return model


def load_sharded(checkpoint_dir, rank: int, world: int, device, dtype) -> Transformer:
    """model.load_model, keeping rank's shard: loaded memory-mapped on the CPU, sharded there, then moved, so no GPU
    ever holds the whole model."""
    return shard_model(load_model(checkpoint_dir, "cpu", dtype), rank, world).to(device)


def init_distributed(device: torch.device, expected: int | None = None) -> tuple[int, int, torch.device]:
    """Under torchrun (WORLD_SIZE > 1): joins the process group (NCCL on GPUs, gloo on the CPU), takes this rank's
    GPU and silences the other ranks' output, so that only rank 0 prints. Returns (rank, world, device); (0, 1,
    device) in a plain run. expected: the --tp asked for, checked against the number of processes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if expected is not None and expected != world:
        raise ValueError(f"--tp {expected} runs as {expected} processes, but this run has {world}: start it with "
                         f"`torchrun --standalone --nproc_per_node {expected} {Path(sys.argv[0]).name} ...`.")
    if world == 1:
        return 0, 1, device
    rank = int(os.environ["RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(dist.destroy_process_group)
    if rank:  # every rank computes the same tokens and statistics: rank 0 prints them; errors still reach the terminal
        sys.stdout = sys.stderr = open(os.devnull, "w")
        sys.excepthook = lambda *exc: traceback.print_exception(*exc, file=sys.__stderr__)
    return rank, world, device


@contextlib.contextmanager
def rank_zero_first():
    """Runs the block on rank 0, then on the other ranks, which find what it made (a converted checkpoint, a
    calibration file) instead of racing to write the same files. Outside torchrun, just runs the block."""
    shared = dist.is_initialized() and dist.get_world_size() > 1
    if shared and dist.get_rank():
        dist.barrier()
    yield
    if shared and not dist.get_rank():
        dist.barrier()
