"""SALS steps 5-6 as one Triton kernel, flash-decoding style: gather, rebuild, rotate, dequantize, attend.

Grid (B, Hkv, 1 + n_splits). Split 0 of each (sequence, KV head) attends over the full-precision sinks
and window; split s >= 1 over its share of the selected tokens, whose keys are rebuilt from the latent
rows (k_lat_score | k_lat_rest)[idx] @ U[h*Dh:(h+1)*Dh]^T in two halves (rotate-half RoPE pairs channel
i with i + Dh/2), rotated at each token's original position, and never written to memory; values are
dequantized on the fly. All G query heads of the KV group attend in the same program (online softmax
in float32, base 2); each split writes a partial (max, sum, acc) and torch ops combine the splits.

RoPE angles: pos * inv_freq in float32 loses ~1e-3 rad at 32K positions, so the kernel turns
inv_freq / (2 pi) into a 64-bit fixed-point fraction F and takes pos * F modulo 2^64 (integer
wrap-around = whole turns dropped, exactly): the angle keeps a 2^-24-turn resolution at any position.

    python kernels/sals_decode.py          # micro-benchmark on a GPU (Llama-2-7B layer, SALS-12.5%)
"""
import math
import sys
from pathlib import Path
from typing import Optional  # torch.library's schema inference reads typing.Optional in older torch

import torch
import triton
import triton.language as tl
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# 2^64 / (2 pi) as a sum of two float32-exact numbers: Triton makes float literals float32 constants.
_TURN_HI = tl.constexpr(2.9358903848421294e+18)
_TURN_LO = tl.constexpr(118439870464.0)
_PI = tl.constexpr(math.pi)


@triton.jit
def _attend_block(q1, q2, k1, k2, v, valid, m, l, acc, qk_scale, PREC: tl.constexpr):
    """Online softmax update of (m, l, acc) (BLOCK_G,), (BLOCK_G,), (BLOCK_G, Dh) with BLOCK_N keys given
    as halves k1, k2 (BLOCK_N, Dh/2) and values v (BLOCK_N, Dh); base-2 logits."""
    s = tl.dot(q1, tl.trans(k1), input_precision=PREC) + tl.dot(q2, tl.trans(k2), input_precision=PREC)
    s = tl.where(valid[None, :], s * qk_scale, float("-inf"))  # (BLOCK_G, BLOCK_N)
    m_new = tl.maximum(m, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing valid yet: keep exp2 finite
    alpha = tl.exp2(m - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l = l * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return m_new, l, acc


@triton.jit
def _sals_decode_kernel(
        q_ptr, sink_k_ptr, sink_v_ptr, win_k_ptr, win_v_ptr, win_pos_ptr, pos_ptr,
        idx_ptr, keep_ptr, kls_ptr, klr_ptr, u_ptr, inv_freq_ptr, vq_ptr, vs_ptr, vz_ptr,
        m_ptr, l_ptr, acc_ptr, S, Hkv, K, stride_ud, stride_ur,
        qk_scale: tl.constexpr,  # constexpr: under torch.compile a float argument would arrive as fp64
        G: tl.constexpr, HD: tl.constexpr, N_SINK: tl.constexpr, W: tl.constexpr, RS: tl.constexpr,
        RR: tl.constexpr, BITS: tl.constexpr, TPS: tl.constexpr, BLOCK_G: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, PREC: tl.constexpr):
    b, h, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n_split = tl.num_programs(2)
    HD2: tl.constexpr = HD // 2
    g = tl.arange(0, BLOCK_G)
    d2 = tl.arange(0, HD2)
    d = tl.arange(0, HD)
    q_row = q_ptr + ((b * Hkv + h) * G + g[:, None]) * HD  # heads h*G .. h*G+G-1, (BLOCK_G, 1)
    q1 = tl.load(q_row + d2[None, :], mask=g[:, None] < G, other=0.0)  # (BLOCK_G, HD2), post-RoPE
    q2 = tl.load(q_row + HD2 + d2[None, :], mask=g[:, None] < G, other=0.0)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, HD], tl.float32)
    if split == 0:  # sinks (positions 0..N_SINK-1, valid up to pos) then the window ring (slot valid if pos >= 0)
        pos = tl.load(pos_ptr + b)
        for t0 in range(0, N_SINK + W, BLOCK_N):
            t = t0 + tl.arange(0, BLOCK_N)
            w = t - N_SINK
            in_sink = (t < N_SINK) & (t <= pos)
            in_win = (w >= 0) & (w < W)
            in_win = in_win & (tl.load(win_pos_ptr + b * W + w, mask=in_win, other=-1) >= 0)
            s_off = ((b * N_SINK + t[:, None]) * Hkv + h) * HD
            w_off = ((b * W + w[:, None]) * Hkv + h) * HD
            ms, mw = in_sink[:, None], in_win[:, None]
            k1 = tl.load(sink_k_ptr + s_off + d2[None, :], mask=ms, other=0.0) + \
                tl.load(win_k_ptr + w_off + d2[None, :], mask=mw, other=0.0)
            k2 = tl.load(sink_k_ptr + s_off + HD2 + d2[None, :], mask=ms, other=0.0) + \
                tl.load(win_k_ptr + w_off + HD2 + d2[None, :], mask=mw, other=0.0)
            v = tl.load(sink_v_ptr + s_off + d[None, :], mask=ms, other=0.0) + \
                tl.load(win_v_ptr + w_off + d[None, :], mask=mw, other=0.0)
            m, l, acc = _attend_block(q1, q2, k1, k2, v, in_sink | in_win, m, l, acc, qk_scale, PREC)
    else:  # selected tokens [(split-1)*TPS, split*TPS) of idx
        freq = tl.load(inv_freq_ptr + d2)  # (HD2,) float64
        turn = (freq * _TURN_HI + freq * _TURN_LO).to(tl.int64)  # inv_freq / (2 pi) in units of 2^-64 turn
        for t0 in range(0, TPS, BLOCK_N):
            t = (split - 1) * TPS + t0 + tl.arange(0, BLOCK_N)
            ok = tl.load(keep_ptr + b * K + t, mask=t < K, other=0) != 0
            j = tl.load(idx_ptr + b * K + t, mask=ok, other=0)  # (BLOCK_N,) positions
            row = (b * S + j)[:, None]
            k1 = tl.zeros([BLOCK_N, HD2], tl.float32)
            k2 = tl.zeros([BLOCK_N, HD2], tl.float32)
            u1_ptr = u_ptr + (h * HD + d2)[None, :] * stride_ud  # (1, HD2) rows of U (D, r) for both halves
            u2_ptr = u1_ptr + HD2 * stride_ud
            for c0 in range(0, RS, BLOCK_R):  # latent prefix ...
                c = c0 + tl.arange(0, BLOCK_R)
                lat = tl.load(kls_ptr + row * RS + c[None, :], mask=ok[:, None] & (c[None, :] < RS), other=0.0)
                u1 = tl.load(u1_ptr + c[:, None] * stride_ur, mask=c[:, None] < RS, other=0.0)  # (BLOCK_R, HD2)
                u2 = tl.load(u2_ptr + c[:, None] * stride_ur, mask=c[:, None] < RS, other=0.0)
                k1 += tl.dot(lat, u1, input_precision=PREC)
                k2 += tl.dot(lat, u2, input_precision=PREC)
            for c0 in range(0, RR, BLOCK_R):  # ... and the rest of the latent
                c = c0 + tl.arange(0, BLOCK_R)
                lat = tl.load(klr_ptr + row * RR + c[None, :], mask=ok[:, None] & (c[None, :] < RR), other=0.0)
                u1 = tl.load(u1_ptr + (RS + c[:, None]) * stride_ur, mask=c[:, None] < RR, other=0.0)
                u2 = tl.load(u2_ptr + (RS + c[:, None]) * stride_ur, mask=c[:, None] < RR, other=0.0)
                k1 += tl.dot(lat, u1, input_precision=PREC)
                k2 += tl.dot(lat, u2, input_precision=PREC)
            turns = j.to(tl.int64)[:, None] * turn[None, :]  # wraps modulo 2^64 = whole turns
            angle = ((turns >> 40) & 0xFFFFFF).to(tl.float32) * (2 * _PI / 16777216)  # [0, 2 pi)
            angle = tl.where(angle > _PI, angle - 2 * _PI, angle)
            cos, sin = tl.cos(angle), tl.sin(angle)
            r1 = (k1 * cos - k2 * sin).to(q1.dtype)
            r2 = (k2 * cos + k1 * sin).to(q1.dtype)
            vrow = (b * S + j)[:, None] * Hkv + h  # (BLOCK_N, 1) row of (B, S, Hkv)
            if BITS == 16:
                v = tl.load(vq_ptr + vrow * HD + d[None, :], mask=ok[:, None], other=0.0)
            else:
                PER: tl.constexpr = 8 // BITS
                byte = tl.load(vq_ptr + vrow * (HD // PER) + d[None, :] // PER, mask=ok[:, None], other=0)
                qv = (byte.to(tl.int32) >> ((d[None, :] % PER) * BITS)) & (2 ** BITS - 1)
                grp = vrow * (HD // 32) + d[None, :] // 32
                scale = tl.load(vs_ptr + grp, mask=ok[:, None], other=0.0).to(tl.float32)
                zero = tl.load(vz_ptr + grp, mask=ok[:, None], other=0.0).to(tl.float32)
                v = (qv.to(tl.float32) * scale + zero).to(q1.dtype)
            m, l, acc = _attend_block(q1, q2, r1, r2, v, ok, m, l, acc, qk_scale, PREC)
    out = (b * Hkv + h) * G + g  # (BLOCK_G,) query heads
    tl.store(m_ptr + out * n_split + split, m, mask=g < G)
    tl.store(l_ptr + out * n_split + split, l, mask=g < G)
    tl.store(acc_ptr + (out[:, None] * n_split + split) * HD + d[None, :], acc, mask=g[:, None] < G)


@torch.library.triton_op("sals::decode_attention", mutates_args=())
def decode_attention(q: Tensor, sink_k: Tensor, sink_v: Tensor, win_k: Tensor, win_v: Tensor, window_pos: Tensor,
                     input_pos: Tensor, idx: Tensor, keep: Tensor, k_lat_score: Tensor, k_lat_rest: Tensor,
                     U: Tensor, inv_freq: Tensor, v_q: Tensor, v_scale: Optional[Tensor], v_zero: Optional[Tensor],
                     bits: int) -> Tensor:
    """One decode step of attention over sinks + window + selected tokens, for every sequence.
    q (B, H, Dh) post-RoPE; sink_k/v (B, n_sink, Hkv, Dh), win_k/v (B, W, Hkv, Dh) post-RoPE, window_pos (B, W)
    (-1 empty); input_pos (B, 1); idx, keep (B, k) selected positions and which count; k_lat_score (B, S, r*),
    k_lat_rest (B, S, r - r*), U (D, r), inv_freq (Dh/2,) float64; v_q (B, S, Hkv, Dh*bits/8) uint8 with
    v_scale, v_zero (B, S, Hkv, Dh/32), or (B, S, Hkv, Dh) when bits == 16. Returns (B, H, Dh) in q's dtype."""
    B, H, HD = q.shape
    Hkv, K = win_k.shape[2], idx.shape[1]
    assert HD in (32, 64, 128, 256) and (bits == 16 or HD % 32 == 0), f"unsupported head_dim {HD}"
    BLOCK_N = 64 if q.is_cuda else 16
    blocks = triton.cdiv(K, BLOCK_N)
    # enough programs to fill the GPU (about 4 per SM of an H100) without splitting finer than one block
    n_sel = min(blocks, max(1, triton.cdiv(528, B * Hkv)))
    n_sel = triton.cdiv(K, BLOCK_N * triton.cdiv(blocks, n_sel)) if blocks else 0
    m = torch.empty(B, H, 1 + n_sel, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    acc = torch.empty(B, H, 1 + n_sel, HD, dtype=torch.float32, device=q.device)
    launch_decode(q, sink_k, sink_v, win_k, win_v, window_pos, input_pos, idx, keep, k_lat_score, k_lat_rest, U,
                  inv_freq, v_q, v_scale, v_zero, bits, m, l, acc)
    return combine_splits(m, l, acc).to(q.dtype)


def launch_decode(q, sink_k, sink_v, win_k, win_v, window_pos, input_pos, idx, keep, k_lat_score, k_lat_rest, U,
                  inv_freq, v_q, v_scale, v_zero, bits: int, m: Tensor, l: Tensor, acc: Tensor):
    """The kernel, writing the partials of 1 + n_sel splits into m, l (B, H, 1 + n_sel), acc (B, H, 1 + n_sel, Dh)
    float32 (tests pass buffers poisoned with NaN); the selected tokens are shared evenly by the n_sel splits."""
    B, H, HD = q.shape
    n_sink, W, Hkv = sink_k.shape[1], win_k.shape[1], win_k.shape[2]
    S, RS, RR, K = k_lat_score.shape[1], k_lat_score.shape[2], k_lat_rest.shape[2], idx.shape[1]
    n_split = m.shape[2]
    BLOCK_N, BLOCK_R = (64, 64) if q.is_cuda else (16, 16)
    TPS = BLOCK_N * max(1, triton.cdiv(triton.cdiv(K, BLOCK_N), max(1, n_split - 1)))  # tokens per split
    assert TPS * (n_split - 1) >= K, "too few splits for the selection"
    for t in (q, sink_k, sink_v, win_k, win_v, window_pos, idx, keep, k_lat_score, k_lat_rest, v_q, m, l, acc):
        assert t.is_contiguous(), "decode_attention expects contiguous buffers (U may have any strides)"
    scale = v_q if v_scale is None else v_scale  # unused when bits == 16
    zero = v_q if v_zero is None else v_zero
    torch.library.wrap_triton(_sals_decode_kernel)[(B, Hkv, n_split)](
        q, sink_k, sink_v, win_k, win_v, window_pos, input_pos.reshape(B), idx, keep, k_lat_score, k_lat_rest,
        U, inv_freq, v_q, scale, zero, m, l, acc, S, Hkv, K, U.stride(0), U.stride(1), HD ** -0.5 * math.log2(math.e),
        G=H // Hkv, HD=HD, N_SINK=n_sink, W=W, RS=RS, RR=RR, BITS=bits, TPS=TPS,
        BLOCK_G=max(16, triton.next_power_of_2(H // Hkv)), BLOCK_N=BLOCK_N, BLOCK_R=BLOCK_R,
        PREC="tf32" if q.dtype != torch.float32 else "ieee", num_warps=8 if q.is_cuda else 1)


def combine_splits(m: Tensor, l: Tensor, acc: Tensor) -> Tensor:
    """Partials m, l (B, H, n) base-2 and acc (B, H, n, Dh) -> softmax-weighted output (B, H, Dh) float32."""
    w = torch.exp2(m - m.amax(-1, keepdim=True))  # split 0 always holds the new token: the max is finite
    return (acc * w[..., None]).sum(2) / (l * w).sum(2)[..., None]


def decode_attention_reference(cache, q_rope: Tensor, input_pos: Tensor, idx: Tensor, keep: Tensor) -> Tensor:
    """SALSCache's own steps 5-6 (PyTorch): q_rope (B, H, 1, Dh) -> (B, H, 1, Dh)."""
    from model import attend
    b = torch.arange(q_rope.shape[0], device=q_rope.device)
    K = torch.cat([cache.sink_k, cache.win_k, cache.keys(b, idx)], 1)  # (B, n, Hkv, Dh)
    V = torch.cat([cache.sink_v, cache.win_v, cache.values(b, idx)], 1)
    sink_ok = torch.arange(cache.n_sink, device=q_rope.device) <= input_pos
    mask = torch.cat([sink_ok, cache.window_pos >= 0, keep], 1)
    return attend(q_rope, K.transpose(1, 2), V.transpose(1, 2), mask[:, None])


def fused_decode(cache, q_rope: Tensor, input_pos: Tensor, idx: Tensor, keep: Tensor) -> Tensor:
    """decode_attention on a SALSCache's buffers: q_rope (B, H, 1, Dh) -> (B, H, 1, Dh)."""
    return decode_attention(q_rope[:, :, 0].contiguous(), cache.sink_k, cache.sink_v, cache.win_k, cache.win_v,
                            cache.window_pos, input_pos, idx, keep, cache.k_lat_score, cache.k_lat_rest, cache.U,
                            cache.inv_freq, cache.v_q, cache.v_scale, cache.v_zero, cache.bits)[:, :, None]


if __name__ == "__main__":
    from triton.testing import do_bench
    from bench.attention_bench import random_cache
    from model import apply_rope
    for B, S, Hkv in [(16, 4096, 32), (8, 4096, 32), (8, 32768, 8)]:
        cache, q, k, v, pos, rope = random_cache(B, S, 32, Hkv, fraction=0.125, device="cuda", seed=B)
        q_rope = apply_rope(q, rope)
        idx, keep = cache.select(q, q_rope, pos, None)
        ref = decode_attention_reference(cache, q_rope, pos, idx, keep).float()
        err = (fused_decode(cache, q_rope, pos, idx, keep).float() - ref).norm() / ref.norm()
        t = do_bench(lambda: fused_decode(cache, q_rope, pos, idx, keep), return_mode="median")
        flop = 2 * int(keep.sum()) * cache.U.numel() * 1.0
        print(f"B={B} S={S} Hkv={Hkv} SALS-12.5%: fused decode {t * 1e3:.1f} us (key rebuild {flop / t / 1e9:.0f} "
              f"TFLOP/s), rel err {err:.1e}")
