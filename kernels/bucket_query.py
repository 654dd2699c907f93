"""The bucket-rope ranking's queries as one Triton kernel: each KV group's query sum, rotated by RoPE's mean rotation
over each distance bucket's candidates (kernels.ranking.bucket_rotations), for every row and bucket at once.

    out[b, i, h] = rotate(sum_g q[b, h G + g], mean rotation over the distances of bucket i at input_pos[b])

In PyTorch this is some twenty small kernels (the float64 mean-rotation table, the sum, the rotation); a decode step
that is not compiled pays a launch for each, in every SALS layer. The kernel computes the table in registers: angles
in float64, reduced to [-pi, pi] before the float32 sine and cosine (the reference rounds its float64 table to
float32). The projection on U that follows is one batched matmul (SALSCache.project_query).

    python -m kernels.bucket_query          # micro-benchmark on a GPU
"""
import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.ranking import bucket_rotations
from model import apply_rope


@triton.jit
def _sin_cos(x):
    """float32 (sin, cos) of float64 angles x >= 0, reduced to [-pi, pi] in float64 first."""
    TWO_PI: tl.constexpr = 6.283185307179586
    r = (x - (x / TWO_PI + 0.5).to(tl.int64).to(tl.float64) * TWO_PI).to(tl.float32)
    return tl.sin(r), tl.cos(r)


@triton.jit
def _bucket_query_kernel(q_ptr, pos_ptr, inv_freq_ptr, out_ptr, sink, window, stride_qb, stride_qh, stride_ob,
                         stride_on, stride_oh, HKV: tl.constexpr, HKV_P: tl.constexpr, G: tl.constexpr,
                         HALF: tl.constexpr, HALF_P: tl.constexpr, NB: tl.constexpr):
    b, i = tl.program_id(0), tl.program_id(1)
    # bucket i's distances lo..hi: window 2^i .. window 2^(i+1) - 1 (the last bucket: to the end), clipped to the
    # candidates' window..pos - sink, as kernels.ranking.bucket_rotations
    last = tl.maximum(tl.load(pos_ptr + b) - sink, window).to(tl.float64)
    lo = (window * (1 << i)).to(tl.float64)
    hi = tl.where(i < NB - 1, tl.minimum((window * (2 << i) - 1).to(tl.float64), last), last)
    lo = tl.minimum(lo, hi)
    n, mid = hi - lo + 1, (hi + lo) / 2
    p = tl.arange(0, HALF_P)
    theta = tl.load(inv_freq_ptr + p, mask=p < HALF, other=1.0)  # (HALF_P,) float64
    sin_n, _ = _sin_cos(n * theta / 2)
    damp = sin_n / (n.to(tl.float32) * tl.sin((theta / 2).to(tl.float32)))  # Dirichlet kernel (mean_rotation)
    sin_m, cos_m = _sin_cos(mid * theta)
    c, s = (cos_m * damp)[None, :], (sin_m * damp)[None, :]  # (1, HALF_P)
    # the G query heads of each KV head summed, rounded to q's type as the reference's sum
    h = tl.arange(0, HKV_P)[:, None]
    at = q_ptr + b * stride_qb + p[None, :]
    ok = (h < HKV) & (p[None, :] < HALF)
    x1 = tl.zeros((HKV_P, HALF_P), tl.float32)
    x2 = tl.zeros((HKV_P, HALF_P), tl.float32)
    for g in tl.static_range(G):
        x1 += tl.load(at + (h * G + g) * stride_qh, mask=ok, other=0.0).to(tl.float32)
        x2 += tl.load(at + (h * G + g) * stride_qh + HALF, mask=ok, other=0.0).to(tl.float32)
    dt = q_ptr.dtype.element_ty
    x1, x2 = x1.to(dt).to(tl.float32), x2.to(dt).to(tl.float32)
    o = out_ptr + b * stride_ob + i * stride_on + h * stride_oh + p[None, :]
    tl.store(o, (x1 * c - x2 * s).to(dt), mask=ok)
    tl.store(o + HALF, (x2 * c + x1 * s).to(dt), mask=ok)


@torch.library.triton_op("sals::bucket_queries", mutates_args=())
def bucket_queries(q: Tensor, input_pos: Tensor, inv_freq: Tensor, n_kv_head: int, sink: int, window: int,
                   n_buckets: int) -> Tensor:
    """q (B, H, Dh) pre-RoPE (channels contiguous), input_pos (B, 1), inv_freq (Dh/2,) float64 -> (B, n_buckets, Hkv,
    Dh) in q's type: bucket_queries_reference in one launch."""
    B, H, Dh = q.shape
    if q.stride(2) != 1 or H % n_kv_head or Dh % 2 or inv_freq.dtype != torch.float64 or inv_freq.numel() != Dh // 2:
        raise ValueError(f"q must be (B, H, Dh) with contiguous channels, H a multiple of n_kv_head ({n_kv_head}), "
                         f"and inv_freq ({Dh // 2},) float64; got q {tuple(q.shape)} strides {q.stride()}, inv_freq "
                         f"{tuple(inv_freq.shape)} {inv_freq.dtype}.")
    out = torch.empty(B, n_buckets, n_kv_head, Dh, dtype=q.dtype, device=q.device)
    torch.library.wrap_triton(_bucket_query_kernel)[(B, n_buckets)](
        q, input_pos.reshape(B), inv_freq, out, sink, window, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        out.stride(2), HKV=n_kv_head, HKV_P=triton.next_power_of_2(n_kv_head), G=H // n_kv_head, HALF=Dh // 2,
        HALF_P=triton.next_power_of_2(Dh // 2), NB=n_buckets)
    return out


def bucket_queries_reference(q: Tensor, input_pos: Tensor, inv_freq: Tensor, n_kv_head: int, sink: int, window: int,
                             n_buckets: int) -> Tensor:
    """The same in PyTorch (what SALSCache.latent_query computes): (B, n_buckets, Hkv, Dh)."""
    q_sum = q.unflatten(1, (n_kv_head, -1)).sum(2)  # (B, Hkv, Dh)
    rot = bucket_rotations(inv_freq, input_pos, sink, window, n_buckets)  # (B, n_buckets, Dh/2, 2)
    return apply_rope(q_sum[:, None], rot[:, :, None])


if __name__ == "__main__":
    from kernels.timing import graph_us

    print("bucket queries: the kernel against its PyTorch reference (the same work in small kernels), CUDA graphs")
    print("| shape | B | S | NB | kernel us | PyTorch us | max abs err / max abs |\n" + "| --- " * 7 + "|")
    for name, H, Hkv in (("llama-2-7b", 32, 32), ("mistral-7b", 32, 8)):
        inv = 1.0 / 10000 ** (torch.arange(0, 128, 2, dtype=torch.float64, device="cuda") / 128)
        for B in (1, 8, 16):
            for S in (4096, 32768):
                NB = math.ceil(math.log2(S / 64))
                q = torch.randn(B, H, 128, device="cuda", dtype=torch.bfloat16)
                pos = torch.full((B, 1), S - 1, device="cuda")
                out = bucket_queries(q, pos, inv, Hkv, 16, 64, NB)
                ref = bucket_queries_reference(q, pos, inv, Hkv, 16, 64, NB)
                err = float((out.float() - ref.float()).abs().max() / ref.float().abs().max())
                t = graph_us(lambda: bucket_queries(q, pos, inv, Hkv, 16, 64, NB))
                t_ref = graph_us(lambda: bucket_queries_reference(q, pos, inv, Hkv, 16, 64, NB))
                print(f"| {name} | {B} | {S} | {NB} | {t:.1f} | {t_ref:.1f} | {err:.1e} |", flush=True)
