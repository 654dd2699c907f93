"""SALS step 1 as one Triton kernel: compress and store the new token of every sequence (SALSCache.write, T = 1).

One launch does all of it. Programs [0, n_lat) compute the latent keys, a GEMV per sequence:
k_lat[b] = (pre-RoPE k of all KV heads concatenated, width D) @ U (D, r); each program owns a block of latent
columns for a block of (up to 64) sequences, a tensor-core dot with the sequences padded to 16 rows, so U is
read once per step (per 64 sequences). Each of the B programs after them stores one sequence's value and
full-precision copies: the value quantized exactly as sals_attention.quantize_values (or copied, 16-bit),
the post-RoPE key and the value into the window ring slot (pos - sink) % window when pos >= sink (or the sink
slot pos when pos < sink), and the ring's positions, where slots holding positions >= pos (an earlier, longer
sequence of the row) are emptied first; when pos < n_exact, also the pre-RoPE key at full rank, its heads' first and
second channel halves into k_lat_score's and k_lat_rest's rows from n_exact on (sals_attention.latent_rows).

Bit for bit SALSCache.write: the quantized codes, scales, zeros and every copy are identical; the latents
agree up to the float32 summation order of the GEMV (within one unit in the last place of the cache dtype
where the two float32 sums straddle a rounding boundary). Positions outside 0..S-1 write nothing (the
reference raises an indexing error; a kernel cannot without a host sync).

    python -m kernels.compress          # micro-benchmark on a GPU (Llama-2-7B / Mistral-7B, SALS-12.5%)
"""
from typing import Optional  # torch.library's schema inference reads typing.Optional in older torch

import torch
import triton
import triton.language as tl
from torch import Tensor

# Launch settings: latent columns and key channels per GEMV tile, channels per step of a sequence's value program
# (a power of two >= the quantization group). block_c 16 gives r / 16 GEMV programs (32 for Llama-2-7B SALS-12.5%,
# 8 for Mistral-7B), so that the GEMV, which reads U once, is spread over enough SMs.
CONFIG = dict(block_c=16, block_d=256, chunk=1024, num_warps=4, num_stages=3)
INTERPRETER_CONFIG = dict(block_c=16, block_d=32, chunk=64, num_warps=1, num_stages=1)
MAX_BLOCK_B = 64  # sequences per GEMV program; more sequences take more programs (and read U again)


@triton.jit
def _round_toward(x, SDT: tl.constexpr, UP: tl.constexpr):
    """float32 x in the 16-bit float type SDT, rounded toward +inf (UP) or -inf: sals_attention._round_toward.
    Any conversion that lands on one of x's two 16-bit neighbours will do (round to nearest on a GPU; Triton's
    interpreter truncates bfloat16): a result on the wrong side of x moves one unit toward the direction, on the
    bits (+1 on a bit pattern moves away from zero in either sign; from zero, to the smallest subnormal)."""
    y = x.to(SDT)
    yf = y.to(tl.float32)
    bits = y.to(tl.int16, bitcast=True).to(tl.int32)
    if UP:
        off = yf < x
        step = tl.where(yf == 0, 1, tl.where(yf > 0, bits + 1, bits - 1))  # from zero: 0x0001
    else:
        off = yf > x
        step = tl.where(yf == 0, -32767, tl.where(yf > 0, bits - 1, bits + 1))  # from zero: 0x8001
    return tl.where(off, step.to(tl.int16).to(SDT, bitcast=True), y)


@triton.jit
def _latent_block(k_ptr, pos_ptr, u_ptr, kls_ptr, klr_ptr, blk, B, S, S_LAT, stride_kb, stride_kh, stride_ud, stride_ur,
                  HD: tl.constexpr, D: tl.constexpr, R: tl.constexpr, RS: tl.constexpr, N_C: tl.constexpr,
                  BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    """Latent columns c of sequences bb: (k (BLOCK_B, D) @ U[:, c]) into k_lat_score / k_lat_rest at each pos."""
    c = (blk % N_C) * BLOCK_C + tl.arange(0, BLOCK_C)  # (BLOCK_C,) latent columns
    bb = (blk // N_C) * BLOCK_B + tl.arange(0, BLOCK_B)  # (BLOCK_B,) sequences, padded
    acc = tl.zeros([BLOCK_B, BLOCK_C], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)  # channel d of the concatenation is channel d % HD of KV head d // HD
        x = tl.load(k_ptr + bb[:, None] * stride_kb + (d // HD)[None, :] * stride_kh + (d % HD)[None, :],
                    mask=(bb[:, None] < B) & (d[None, :] < D), other=0.0)
        u = tl.load(u_ptr + d[:, None] * stride_ud + c[None, :] * stride_ur,
                    mask=(d[:, None] < D) & (c[None, :] < R), other=0.0)
        # float32 operands: the interpreter multiplies bfloat16 as raw integers; 16-bit values are exact in
        # tf32, so the tensor cores still form exact products and accumulate in float32
        acc = tl.dot(x.to(tl.float32), u.to(tl.float32), acc, input_precision=PREC)
    pos = tl.load(pos_ptr + bb, mask=bb < B, other=-1).to(tl.int64)
    row = (bb * S_LAT + pos)[:, None]  # (BLOCK_B, 1) token rows of the (B, S_LAT, ...) latent buffers
    live = ((bb < B) & (pos >= 0) & (pos < S))[:, None]
    out = acc.to(kls_ptr.dtype.element_ty)
    tl.store(kls_ptr + row * RS + c[None, :], out, mask=live & (c[None, :] < RS))
    if RS < R:
        tl.store(klr_ptr + row * (R - RS) + (c[None, :] - RS), out, mask=live & (c[None, :] >= RS) & (c[None, :] < R))


@triton.jit
def _row(k_ptr, kr_ptr, v_ptr, pos_ptr, kls_ptr, klr_ptr, vq_ptr, vs_ptr, vz_ptr, sink_k_ptr, sink_v_ptr, win_k_ptr,
         win_v_ptr, win_pos_ptr, b, S, S_LAT, stride_kb, stride_kh, stride_rb, stride_rh, stride_vb, stride_vh,
         HD: tl.constexpr, CH: tl.constexpr, CHUNK: tl.constexpr, RS: tl.constexpr, RR: tl.constexpr,
         N_EXACT: tl.constexpr, N_SINK: tl.constexpr, W: tl.constexpr, W_P: tl.constexpr, BITS: tl.constexpr,
         TINY: tl.constexpr, GROUP: tl.constexpr):
    """Sequence b: its value (quantized or copied) at pos, the full-precision copies, the ring's positions, and the
    full-rank key of an early position."""
    pos = tl.load(pos_ptr + b).to(tl.int64)
    live = (pos >= 0) & (pos < S)
    row = b * S + pos  # int64: B * S * Hkv * Dh can pass 2^31
    in_sink = live & (pos < N_SINK)
    in_win = live & (pos >= N_SINK)
    slot = (pos - N_SINK) % W  # only used when pos >= N_SINK (Triton's % truncates like C)
    for c0 in range(0, CH, CHUNK):  # CHUNK channels of the Hkv heads at a time, whole groups
        ch = c0 + tl.arange(0, CHUNK)  # channel ch % HD of head ch // HD
        chm = ch < CH
        kr = tl.load(kr_ptr + b * stride_rb + (ch // HD) * stride_rh + ch % HD, mask=chm)
        v = tl.load(v_ptr + b * stride_vb + (ch // HD) * stride_vh + ch % HD, mask=chm)
        if BITS == 16:
            tl.store(vq_ptr + row * CH + ch, v, mask=live & chm)
        else:  # quantize_values: groups of GROUP channels, zero rounded down and scale up to 16 bits, then the codes
            LEVELS: tl.constexpr = 2 ** BITS - 1
            PER: tl.constexpr = 8 // BITS  # codes per byte
            SDT: tl.constexpr = vs_ptr.dtype.element_ty
            g = tl.reshape(v.to(tl.float32), [CHUNK // GROUP, GROUP])  # padded groups are zeros, never stored
            zero = _round_toward(tl.min(g, 1), SDT, False)
            span = tl.math.div_rn(tl.max(g, 1) - zero.to(tl.float32), tl.full([CHUNK // GROUP], LEVELS, tl.float32))
            scale = _round_toward(tl.maximum(span, TINY), SDT, True)
            q = tl.math.div_rn(g - zero.to(tl.float32)[:, None], scale.to(tl.float32)[:, None])  # >= 0
            q = (q + 8388608.0) - 8388608.0  # round half to even, as torch.round: 2^23 has no fractional bits
            q = tl.minimum(q, LEVELS).to(tl.int32)
            q = tl.reshape(q, [CHUNK // PER, PER]) << (tl.arange(0, PER) * BITS)[None, :]  # code i at bit BITS*i
            byte = c0 // PER + tl.arange(0, CHUNK // PER)
            tl.store(vq_ptr + row * (CH // PER) + byte, tl.sum(q, 1).to(tl.uint8), mask=live & (byte < CH // PER))
            grp = c0 // GROUP + tl.arange(0, CHUNK // GROUP)
            tl.store(vs_ptr + row * (CH // GROUP) + grp, scale, mask=live & (grp < CH // GROUP))
            tl.store(vz_ptr + row * (CH // GROUP) + grp, zero, mask=live & (grp < CH // GROUP))
        if N_SINK > 0:
            tl.store(sink_k_ptr + (b * N_SINK + pos) * CH + ch, kr, mask=in_sink & chm)
            tl.store(sink_v_ptr + (b * N_SINK + pos) * CH + ch, v, mask=in_sink & chm)
        tl.store(win_k_ptr + (b * W + slot) * CH + ch, kr, mask=in_win & chm)
        tl.store(win_v_ptr + (b * W + slot) * CH + ch, v, mask=in_win & chm)
        if N_EXACT > 0:  # channel e of head hh: half e // (HD/2) at ((b, n_exact + ...), hh, e % (HD/2))
            HD2: tl.constexpr = HD // 2
            k = tl.load(k_ptr + b * stride_kb + (ch // HD) * stride_kh + ch % HD, mask=chm)
            early = live & chm & (pos < N_EXACT)
            at = (pos * (CH // HD) + ch // HD) * HD2 + ch % HD2
            first = (ch % HD) < HD2
            tl.store(kls_ptr + (b * S_LAT + N_EXACT) * RS + at, k, mask=early & first)
            tl.store(klr_ptr + (b * S_LAT + N_EXACT) * RR + at, k, mask=early & ~first)
    j = tl.arange(0, W_P)
    wp = tl.load(win_pos_ptr + b * W + j, mask=j < W, other=-1)
    wp = tl.where(wp >= pos, -1, wp)  # slots of an earlier sequence of this row
    wp = tl.where((j == slot) & in_win, pos, wp)
    tl.store(win_pos_ptr + b * W + j, wp.to(tl.int32), mask=live & (j < W))


@triton.jit
def _compress_kernel(
        k_ptr, kr_ptr, v_ptr, pos_ptr, u_ptr, kls_ptr, klr_ptr, vq_ptr, vs_ptr, vz_ptr,
        sink_k_ptr, sink_v_ptr, win_k_ptr, win_v_ptr, win_pos_ptr,
        B, S, S_LAT, stride_kb, stride_kh, stride_rb, stride_rh, stride_vb, stride_vh, stride_ud, stride_ur,
        HD: tl.constexpr, HKV: tl.constexpr, CHUNK: tl.constexpr, R: tl.constexpr, RS: tl.constexpr,
        N_SINK: tl.constexpr, W: tl.constexpr, W_P: tl.constexpr, BITS: tl.constexpr, TINY: tl.constexpr,
        GROUP: tl.constexpr, N_C: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
        N_EXACT: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)
    n_lat = N_C * tl.cdiv(B, BLOCK_B)
    if pid < n_lat:
        _latent_block(k_ptr, pos_ptr, u_ptr, kls_ptr, klr_ptr, pid, B, S, S_LAT, stride_kb, stride_kh, stride_ud, stride_ur,
                      HD, HKV * HD, R, RS, N_C, BLOCK_B, BLOCK_C, BLOCK_D, PREC)
    else:
        _row(k_ptr, kr_ptr, v_ptr, pos_ptr, kls_ptr, klr_ptr, vq_ptr, vs_ptr, vz_ptr, sink_k_ptr, sink_v_ptr,
             win_k_ptr, win_v_ptr, win_pos_ptr, pid - n_lat, S, S_LAT, stride_kb, stride_kh, stride_rb, stride_rh, stride_vb,
             stride_vh, HD, HKV * HD, CHUNK, RS, R - RS, N_EXACT, N_SINK, W, W_P, BITS, TINY, GROUP)


@torch.library.triton_op("sals::compress_step", mutates_args=(
    "k_lat_score", "k_lat_rest", "v_q", "v_scale", "v_zero", "sink_k", "sink_v", "win_k", "win_v", "window_pos"))
def compress_step(k: Tensor, k_rope: Tensor, v: Tensor, input_pos: Tensor, U: Tensor, k_lat_score: Tensor,
                  k_lat_rest: Tensor, v_q: Tensor, v_scale: Optional[Tensor], v_zero: Optional[Tensor],
                  sink_k: Tensor, sink_v: Tensor, win_k: Tensor, win_v: Tensor, window_pos: Tensor,
                  bits: int, n_exact: int) -> None:
    """Stores the new token (position input_pos (B, 1)) of every sequence into a SALS cache's buffers, in place.
    k (B, Hkv, 1, Dh) pre-RoPE, k_rope, v (B, Hkv, 1, Dh) (any strides with contiguous channels); U (D, r) any
    strides; the buffers as SALSCache allocates them (contiguous): k_lat_score (B, S_lat, r*), k_lat_rest
    (B, S_lat, r - r*) with S_lat >= S (sals_attention.latent_rows), v_q (B, S, Hkv, Dh*bits/8) uint8 with
    v_scale, v_zero (B, S, Hkv, Dh/group), or v_q (B, S, Hkv, Dh) when bits == 16 (v_scale, v_zero None); sink_k/v (B, n_sink, Hkv, Dh), win_k/v (B, W, Hkv, Dh),
    window_pos (B, W) int32; n_exact the cache's (positions whose keys are also kept at full rank; 0: none). Raises
    ValueError on inputs of another shape or dtype than the buffers'."""
    B, Hkv, T, HD = k.shape
    if T != 1 or tuple(input_pos.shape) != (B, 1) or k_rope.shape != k.shape or v.shape != k.shape:
        raise ValueError(f"compress_step stores one token per sequence: k, k_rope, v (B, Hkv, 1, Dh) and "
                         f"input_pos (B, 1), got {tuple(k.shape)}, {tuple(k_rope.shape)}, {tuple(v.shape)} and "
                         f"{tuple(input_pos.shape)}; use SALSCache.write for chunks.")
    if B != k_lat_score.shape[0] or (Hkv, HD) != tuple(win_k.shape[2:]):
        raise ValueError(f"k has {B} rows of {Hkv} heads x {HD}, the cache {k_lat_score.shape[0]} rows of "
                         f"{win_k.shape[2]} x {win_k.shape[3]}; compress_step writes every row of the cache.")
    if not k.dtype == k_rope.dtype == v.dtype == U.dtype:
        raise ValueError(f"k, k_rope and v are {k.dtype}, {k_rope.dtype}, {v.dtype}; the cache holds {U.dtype}: "
                         f"cast them to the cache's dtype.")
    launch_compress(k, k_rope, v, input_pos, U, k_lat_score, k_lat_rest, v_q, v_scale, v_zero, sink_k, sink_v,
                    win_k, win_v, window_pos, bits, n_exact)


def launch_compress(k, k_rope, v, input_pos, U, k_lat_score, k_lat_rest, v_q, v_scale, v_zero, sink_k, sink_v,
                    win_k, win_v, window_pos, bits: int, n_exact: int, cfg: dict | None = None):
    """The kernel (compress_step's arguments); cfg: launch settings as CONFIG (default: CONFIG on CUDA, else
    INTERPRETER_CONFIG)."""
    B, Hkv, _, HD = k.shape
    S, S_lat, RS, R, W = v_q.shape[1], k_lat_score.shape[1], k_lat_score.shape[2], U.shape[1], win_k.shape[1]
    cfg = cfg or (CONFIG if k.is_cuda else INTERPRETER_CONFIG)
    for t in (k, k_rope, v):
        assert t.stride(3) == 1, "k, k_rope and v need contiguous channels"
    for t in (k_lat_score, k_lat_rest, v_q, v_scale, v_zero, sink_k, sink_v, win_k, win_v, window_pos):
        assert t is None or t.is_contiguous(), "the cache buffers must be contiguous"
    BLOCK_B = min(MAX_BLOCK_B, max(16, triton.next_power_of_2(B)))
    N_C = triton.cdiv(R, cfg["block_c"])
    # empty buffers (no sinks, r* = r) go in as None (their stores are compiled out), as do the scale and zero of
    # 16-bit values: a stand-in pointer to another buffer would pass one tensor twice to a kernel that writes it
    klr = k_lat_rest if k_lat_rest.numel() else None
    sk, sv = (sink_k, sink_v) if sink_k.numel() else (None, None)
    torch.library.wrap_triton(_compress_kernel)[(N_C * triton.cdiv(B, BLOCK_B) + B,)](
        k, k_rope, v, input_pos.reshape(B), U, k_lat_score, klr, v_q, v_scale, v_zero, sk, sv, win_k, win_v, window_pos,
        B, S, S_lat, k.stride(0), k.stride(1), k_rope.stride(0), k_rope.stride(1), v.stride(0), v.stride(1),
        U.stride(0), U.stride(1),
        HD=HD, HKV=Hkv, CHUNK=min(cfg["chunk"], triton.next_power_of_2(Hkv * HD)), R=R, RS=RS,
        N_SINK=sink_k.shape[1], W=W, W_P=triton.next_power_of_2(W), BITS=bits,
        TINY=0.0 if v_scale is None else torch.finfo(v_scale.dtype).tiny,
        GROUP=32 if v_scale is None else HD // v_scale.shape[-1], N_C=N_C, BLOCK_B=BLOCK_B, BLOCK_C=cfg["block_c"],
        BLOCK_D=cfg["block_d"], N_EXACT=n_exact,
        PREC="ieee" if k.dtype == torch.float32 else "tf32", num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


if __name__ == "__main__":
    from kernels.timing import copy_ceiling, graph_us
    for name, Hkv in [("Llama-2-7B", 32), ("Mistral-7B", 8)]:
        D, r, S = Hkv * 128, Hkv * 128 // 8, 4096  # SALS-12.5%: rank D/8, 2-bit values
        for B in (1, 8, 16):
            dev, dt = "cuda", torch.bfloat16
            k, k_rope, v = (torch.randn(B, Hkv, 1, 128, device=dev, dtype=dt) for _ in range(3))
            pos = torch.full((B, 1), S - 1, device=dev)
            U = torch.randn(D, r, device=dev, dtype=dt)
            buffers = (torch.zeros(B, S, r // 2, device=dev, dtype=dt), torch.zeros(B, S, r - r // 2, device=dev, dtype=dt),
                       torch.zeros(B, S, Hkv, 32, device=dev, dtype=torch.uint8),
                       torch.zeros(B, S, Hkv, 4, device=dev, dtype=dt), torch.zeros(B, S, Hkv, 4, device=dev, dtype=dt),
                       torch.zeros(B, 16, Hkv, 128, device=dev, dtype=dt), torch.zeros(B, 16, Hkv, 128, device=dev, dtype=dt),
                       torch.zeros(B, 64, Hkv, 128, device=dev, dtype=dt), torch.zeros(B, 64, Hkv, 128, device=dev, dtype=dt),
                       torch.full((B, 64), -1, device=dev, dtype=torch.int32))
            t = graph_us(lambda: compress_step(k, k_rope, v, pos, U, *buffers, 2, 0))
            nbytes = U.numel() * 2 + 3 * k.numel() * 2  # U and the new token (the writes are a few KB)
            print(f"{name} SALS-12.5% (D={D}, r={r}) B={B}: {t:.1f} us, floor {nbytes / copy_ceiling() * 1e6:.1f} us "
                  f"({nbytes / t / 1e6 / (copy_ceiling() / 1e12):.0%} of the copy ceiling)")
