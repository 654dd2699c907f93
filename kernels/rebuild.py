"""SALS step 5 as one Triton kernel: the attended keys and values of every sequence, gathered into a small dense
buffer, so that step 6 is the dense split-KV decode kernel (kernels/decode_attention.py) over it.

For each sequence b and KV head h, row (b, h) of the buffers K, V (B, Hkv, n_sink + W + k, Dh) receives, in order:
the sinks at positions <= pos (post-RoPE, as stored), the window ring's filled slots (window_pos >= 0), then the
first n selected positions idx[b, h % NQ, :n], n = min(budget[b], k, #candidates) (the selection's count: kernels/
topk.py writes the selected positions first), their keys rebuilt from the latent rows (k_lat_score | k_lat_rest)[j]
@ U[rows of head h]^T and rotated at their original positions with the model's float32 (cos, sin) table, their
values dequantized. last[b] = (how many were written) - 1, the position argument of the dense kernel, which then
reads each row's own prefix and nothing past it.

Grid (1 + n_blocks, Hkv, B): program 0 of a (b, h) copies the sinks and the window, program i >= 1 rebuilds
selected tokens (i - 1) * BLOCK_T ..; blocks past n write nothing. The rebuild is a gather-GEMM per block: BLOCK_T
latent rows times the head's U rows, as two head-dim halves k1, k2 (BLOCK_T, Dh/2), so that rotate-half RoPE is
element-wise in registers, written once in the model's dtype (the paper's split: a "recover" kernel, then a dense
attention kernel).

    python -m kernels.rebuild          # micro-benchmark on a GPU (Llama-2-7B / Mistral-7B layers, SALS-12.5%)
"""
from typing import Optional  # torch.library's schema inference reads typing.Optional in older torch

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.sals_decode import _rebuild, _values, latent_block

CONFIG = dict(block_t=64, block_r=64, num_warps=4, num_stages=3)
# Launch settings the micro-benchmark times (python -m kernels.rebuild). Compiled offline for sm_90 (Llama-2-7B /
# Mistral-7B shapes, no spills): 64 tokens at 4 warps 223 / 196 registers (two programs per SM), at 8 warps 135 / 134
# (one), 32 tokens at 4 warps 142 / 140 (three).
VARIANTS = (CONFIG, dict(block_t=32, block_r=64, num_warps=4, num_stages=3),
            dict(block_t=64, block_r=64, num_warps=8, num_stages=3), dict(block_t=128, block_r=64, num_warps=8, num_stages=3))
INTERPRETER_CONFIG = dict(block_t=16, block_r=16, num_warps=1, num_stages=1)


@triton.jit
def _rebuild_kernel(sink_k_ptr, sink_v_ptr, win_k_ptr, win_v_ptr, win_pos_ptr, pos_ptr, budget_ptr, idx_ptr,
                    kls_ptr, klr_ptr, u_ptr, rope_ptr, vq_ptr, vs_ptr, vz_ptr, k_out_ptr, v_out_ptr, last_ptr, S, K,
                    HKV: tl.constexpr, NQ: tl.constexpr, HD: tl.constexpr, N_SINK: tl.constexpr, N_SINK_P: tl.constexpr,
                    W: tl.constexpr, W_P: tl.constexpr, RS: tl.constexpr, RR: tl.constexpr, BITS: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, PREC: tl.constexpr):
    blk, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    HD2: tl.constexpr = HD // 2
    N_OUT = N_SINK + W + K  # slots of a buffer row
    pos = tl.load(pos_ptr + b).to(tl.int32)
    ws = tl.arange(0, W_P)
    filled = tl.load(win_pos_ptr + b * W + ws, mask=ws < W, other=-1) >= 0  # (W_P,) the ring's filled slots
    n_fixed = tl.minimum(pos + 1, N_SINK) + tl.sum(filled.to(tl.int32), 0)  # sinks and window slots written
    n_sel = tl.minimum(tl.minimum(tl.maximum(tl.load(budget_ptr + b), 0), K), tl.maximum(pos - N_SINK - W + 1, 0))
    row = (b * HKV + h).to(tl.int64) * N_OUT  # this (sequence, KV head)'s first slot in the buffers
    d = tl.arange(0, HD)
    if blk == 0:  # sinks at positions <= pos, then the filled ring slots, packed
        ts = tl.arange(0, N_SINK_P)
        live = (ts < N_SINK) & (ts <= pos)
        src = ((b * N_SINK + ts[:, None]) * HKV + h) * HD + d[None, :]
        dst = (row + ts[:, None]) * HD + d[None, :]
        tl.store(k_out_ptr + dst, tl.load(sink_k_ptr + src, mask=live[:, None]), mask=live[:, None])
        tl.store(v_out_ptr + dst, tl.load(sink_v_ptr + src, mask=live[:, None]), mask=live[:, None])
        slot = tl.minimum(pos + 1, N_SINK) + tl.cumsum(filled.to(tl.int32), 0) - 1  # (W_P,)
        src_w = ((b * W + ws[:, None]) * HKV + h) * HD + d[None, :]
        dst_w = (row + slot[:, None]) * HD + d[None, :]
        tl.store(k_out_ptr + dst_w, tl.load(win_k_ptr + src_w, mask=filled[:, None]), mask=filled[:, None])
        tl.store(v_out_ptr + dst_w, tl.load(win_v_ptr + src_w, mask=filled[:, None]), mask=filled[:, None])
        tl.store(last_ptr + b, n_fixed + n_sel - 1, mask=h == 0)
    else:  # selected tokens [lo, lo + BLOCK_T) of this KV head's index row
        t = (blk - 1) * BLOCK_T + tl.arange(0, BLOCK_T)
        ok = t < n_sel
        j = tl.load(idx_ptr + (b * NQ + h % NQ).to(tl.int64) * K + t, mask=ok, other=0)  # (BLOCK_T,) positions
        lat = b * S + j[:, None]  # (BLOCK_T, 1) latent rows
        dh = tl.arange(0, HD2)
        u1 = u_ptr + (h * HD + dh[:, None]) * (RS + RR)  # (HD2, 1): rows of U (D, r) of the first halves ...
        u2 = u1 + HD2 * (RS + RR)  # ... and of the second halves
        k1 = tl.zeros([BLOCK_T, HD2], tl.float32)
        k2 = tl.zeros([BLOCK_T, HD2], tl.float32)
        k1, k2 = _rebuild(k1, k2, kls_ptr + lat * RS, ok, u1, u2, 0, RS, BLOCK_R, PREC)
        k1, k2 = _rebuild(k1, k2, klr_ptr + lat * RR, ok, u1, u2, RS, RR, BLOCK_R, PREC)
        cs = tl.load(rope_ptr + j[:, None] * HD + d[None, :], mask=ok[:, None], other=0.0)  # (cos, sin) pairs
        cos, sin = tl.split(tl.reshape(cs, [BLOCK_T, HD2, 2]))  # (BLOCK_T, HD2)
        dt = k_out_ptr.dtype.element_ty
        out = (row + n_fixed + t[:, None]) * HD  # (BLOCK_T, 1) the tokens' slots
        tl.store(k_out_ptr + out + dh[None, :], (k1 * cos - k2 * sin).to(dt), mask=ok[:, None])
        tl.store(k_out_ptr + out + HD2 + dh[None, :], (k2 * cos + k1 * sin).to(dt), mask=ok[:, None])
        v = _values(vq_ptr, vs_ptr, vz_ptr, lat * HKV + h, ok, BLOCK_T, HD, HD, BITS, dt)
        tl.store(v_out_ptr + out + d[None, :], v, mask=ok[:, None])


def launch_rebuild(sink_k, sink_v, win_k, win_v, window_pos, input_pos, budget, idx, k_lat_score, k_lat_rest, U, rope,
                   v_q, v_scale, v_zero, bits: int, k_out: Tensor, v_out: Tensor, last: Tensor,
                   cfg: dict | None = None):
    """The kernel, writing into k_out, v_out (B, Hkv, n_sink + W + k, Dh) and last (B,) int32 (tests pass buffers
    poisoned with NaN: slots past a row's count are left as they were). cfg: launch settings as CONFIG."""
    B, n_sink, Hkv, HD = sink_k.shape
    W, (S, RS), RR, (NQ, K) = win_k.shape[1], k_lat_score.shape[1:], k_lat_rest.shape[2], idx.shape[1:]
    cfg = cfg or (CONFIG if k_out.is_cuda else INTERPRETER_CONFIG)
    assert HD in (32, 64, 128, 256) and (bits == 16 or HD % 32 == 0), f"unsupported head_dim {HD}"
    assert rope.shape[1:] == (HD // 2, 2) and rope.shape[0] >= S and rope.dtype == torch.float32, \
        f"rope must be the model's (cos, sin) table (>= {S}, {HD // 2}, 2) float32, not {tuple(rope.shape)}"
    assert idx.dim() == 3 and NQ in (1, Hkv), f"idx must be (B, 1 or Hkv, k), not {tuple(idx.shape)}"
    assert k_out.shape == v_out.shape == (B, Hkv, n_sink + W + K, HD) and last.shape == (B,)
    for t in (sink_k, sink_v, win_k, win_v, window_pos, idx, k_lat_score, k_lat_rest, U, rope, v_q, k_out, v_out):
        assert t.is_contiguous(), "rebuild expects contiguous buffers"
    n_blocks = triton.cdiv(K, cfg["block_t"])
    scale = v_q if v_scale is None else v_scale  # unused when bits == 16
    zero = v_q if v_zero is None else v_zero
    torch.library.wrap_triton(_rebuild_kernel)[(1 + n_blocks, Hkv, B)](
        sink_k, sink_v, win_k, win_v, window_pos, input_pos.reshape(B), budget, idx, k_lat_score, k_lat_rest, U,
        rope, v_q, scale, zero, k_out, v_out, last, S, K,
        HKV=Hkv, NQ=NQ, HD=HD, N_SINK=n_sink, N_SINK_P=triton.next_power_of_2(max(n_sink, 1)), W=W, W_P=triton.next_power_of_2(W), RS=RS, RR=RR, BITS=bits,
        BLOCK_T=cfg["block_t"], BLOCK_R=latent_block(RS, RR, cfg["block_r"]),
        PREC="tf32" if k_out.dtype != torch.float32 else "ieee", num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"])


@torch.library.triton_op("sals::rebuild_attended", mutates_args=())
def rebuild_attended(sink_k: Tensor, sink_v: Tensor, win_k: Tensor, win_v: Tensor, window_pos: Tensor,
                     input_pos: Tensor, budget: Tensor, idx: Tensor, k_lat_score: Tensor, k_lat_rest: Tensor,
                     U: Tensor, rope: Tensor, v_q: Tensor, v_scale: Optional[Tensor], v_zero: Optional[Tensor],
                     bits: int) -> tuple[Tensor, Tensor, Tensor]:
    """Every sequence's attended keys and values packed as in the module docstring: sink_k/v (B, n_sink, Hkv, Dh),
    win_k/v (B, W, Hkv, Dh) post-RoPE, window_pos (B, W) (-1 empty), input_pos (B, 1), budget (B,) int32 the
    tokens each sequence selects (SALSCache.n_attend), idx (B, NQ, k) the selection (NQ = 1 or Hkv), k_lat_score
    (B, S, r*), k_lat_rest (B, S, r - r*), U (D, r), rope (>= S, Dh/2, 2) float32, v_q (B, S, Hkv, Dh*bits/8) uint8
    with v_scale, v_zero (B, S, Hkv, Dh/32) (or (B, S, Hkv, Dh) when bits == 16). Returns K, V (B, Hkv,
    n_sink + W + k, Dh) in sink_k's dtype and last (B,) int32: row b's slots 0..last[b] hold its tokens."""
    B, n_sink, Hkv, HD = sink_k.shape
    n_out = n_sink + win_k.shape[1] + idx.shape[-1]
    k_out = torch.empty(B, Hkv, n_out, HD, dtype=sink_k.dtype, device=sink_k.device)
    v_out = torch.empty_like(k_out)
    last = torch.empty(B, dtype=torch.int32, device=sink_k.device)
    launch_rebuild(sink_k, sink_v, win_k, win_v, window_pos, input_pos, budget, idx, k_lat_score, k_lat_rest, U, rope,
                   v_q, v_scale, v_zero, bits, k_out, v_out, last)
    return k_out, v_out, last


if __name__ == "__main__":
    import math
    from kernels.timing import copy_ceiling, graph_us, matmul_rate
    dev, dt = "cuda", torch.bfloat16
    for B, S, Hkv in [(16, 4096, 32), (8, 4096, 32), (8, 32768, 8), (8, 4096, 8)]:  # SALS-12.5%, 2-bit values
        H, HD, D = 32, 128, Hkv * 128
        r, K = D // 8, S // 8 - 80  # rank D/8; the budget of 1/8 of the tokens, less 16 sinks and a 64-token window
        gen = torch.Generator(dev).manual_seed(B)
        rnd = lambda *shape: torch.randn(*shape, device=dev, generator=gen).to(dt)  # noqa: E731
        sink_k, sink_v, win_k, win_v = rnd(B, 16, Hkv, HD), rnd(B, 16, Hkv, HD), rnd(B, 64, Hkv, HD), rnd(B, 64, Hkv, HD)
        window_pos, pos = torch.arange(S - 64, S, device=dev).int().expand(B, 64).contiguous(), torch.full((B, 1), S - 1, device=dev)
        idx = torch.stack([torch.randperm(S - 80, device=dev, generator=gen)[:K] + 16 for _ in range(B)]).sort(-1).values
        budget = torch.full((B,), K, dtype=torch.int32, device=dev)
        kls, klr, U = rnd(B, S, r // 2), rnd(B, S, r - r // 2), rnd(D, r) / math.sqrt(r)
        angles = torch.arange(S, device=dev, dtype=torch.float64)[:, None] * 10000.0 ** (-torch.arange(0, HD, 2, device=dev) / HD)
        rope = torch.stack([angles.cos(), angles.sin()], -1).float()
        v_q = torch.randint(0, 256, (B, S, Hkv, HD // 4), device=dev, dtype=torch.uint8)
        v_scale, v_zero = rnd(B, S, Hkv, HD // 32).abs(), rnd(B, S, Hkv, HD // 32)
        args = (sink_k, sink_v, win_k, win_v, window_pos, pos, budget, idx[:, None], kls, klr, U, rope, v_q, v_scale,
                v_zero, 2)
        n_out = 80 + K
        outs = (torch.empty(B, Hkv, n_out, HD, device=dev, dtype=dt), torch.empty(B, Hkv, n_out, HD, device=dev, dtype=dt),
                torch.empty(B, device=dev, dtype=torch.int32))
        times = [graph_us(lambda: launch_rebuild(*args, *outs, cfg)) for cfg in VARIANTS]
        t = min(times)
        flop = 2 * B * K * D * r
        written = 2 * B * Hkv * n_out * HD * 2
        nbytes = B * K * (r * 2 + Hkv * (HD // 4 + 2 * 2 * HD // 32) + HD * 4 + 8) + U.numel() * 2 + written
        floor = max(flop / matmul_rate(), nbytes / copy_ceiling()) * 1e6
        print(f"B={B} S={S} Hkv={Hkv} SALS-12.5%: {t:.1f} us (variants {' / '.join(f'{x:.1f}' for x in times)}), "
              f"floor {floor:.1f} us ({floor / t:.0%}); {nbytes / 1e6:.1f} MB ({written / 1e6:.1f} MB written), "
              f"rebuild {flop / t / 1e6:.0f} TFLOP/s", flush=True)
