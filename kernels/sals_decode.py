"""SALS steps 5-6 as one Triton kernel, flash-decoding style: gather, rebuild, rotate, dequantize, attend.

Grid (1 + n_splits, Hkv, B), the split fastest: each program serves one KV head of one sequence, the G query heads
of that KV head being the rows of its query tile (padded to 16 rows for the tensor cores), so every selected token
is rebuilt once per KV head. Split 0 attends over the full-precision sinks and window; split s >= 1 over its share
of the selected tokens, whose keys are rebuilt from their latent rows (k_lat_score | k_lat_rest)[idx] @ U[rows of
the head]^T as two halves k1, k2 (BLOCK_N, Dh/2) (rotate-half RoPE pairs channel i with i + Dh/2, so the rotation
is element-wise), rotated at each token's original position with the model's float32 (cos, sin) table, and never
written to memory; values are dequantized on the fly. A latent of at most two r tiles (GQA models) is rebuilt in
one shot with the head's rows of U loaded once, before the token loop, so the loop body holds only gathers the
pipeliner can overlap; wider latents (MHA) loop over r tiles. The query arrives pre-RoPE, straight from the model's
projection, and is rotated here with its own row of the table. Selections are one per layer (idx (B, 1, k)) or one
per KV head (idx (B, Hkv, k)). A sequence shorter than n_exact reads its keys at full rank instead (a second copy
of the token loop, so that the rebuild loop of long rows is unchanged). Online softmax in float32, base 2; each
split writes a partial (max, sum, acc) and a second, small kernel combines the splits.

    python -m kernels.sals_decode          # micro-benchmark on a GPU (Llama-2-7B / Mistral-7B layers, SALS-12.5%)
"""
import math
from typing import Optional  # torch.library's schema inference reads typing.Optional in older torch

import torch
import triton
import triton.language as tl
from torch import Tensor

# Launch settings per family (G == 1: "mha", else "gqa"), chosen by bench/attention_bench.py --sweep (BENCHMARKS.md).
# block_r: the r tile of the rebuild (a latent of at most two tiles is rebuilt in one shot); split_blocks: token
# blocks per selection split (None: enough splits for ~4 programs per SM).
CONFIGS = {
    "mha": dict(block_n=64, block_r=64, split_blocks=1, num_warps=4, num_stages=3),
    "gqa": dict(block_n=32, block_r=64, split_blocks=None, num_warps=4, num_stages=3),
}
INTERPRETER_CONFIG = dict(block_n=16, block_r=16, split_blocks=None, num_warps=1, num_stages=1)


@triton.jit
def _attend_block(q1, q2, k1, k2, v, valid, m, l, acc, qk_scale, PREC: tl.constexpr):
    """Online softmax update of (m, l, acc) (BLOCK_Q,), (BLOCK_Q,), (BLOCK_Q, Dh) with BLOCK_N keys given as
    halves k1, k2 (BLOCK_N, Dh/2) and values v (BLOCK_N, Dh); base-2 logits."""
    s = tl.dot(q1, tl.trans(k1), input_precision=PREC) + tl.dot(q2, tl.trans(k2), input_precision=PREC)
    s = tl.where(valid[None, :], s * qk_scale, float("-inf"))  # (BLOCK_Q, BLOCK_N)
    m_new = tl.maximum(m, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing valid yet: keep exp2 finite
    alpha = tl.exp2(m - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l = l * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return m_new, l, acc


@triton.jit
def _rebuild(k1, k2, lat_row, ok, u1, u2, C0: tl.constexpr, WIDTH: tl.constexpr, BLOCK_R: tl.constexpr,
             PREC: tl.constexpr):
    """k1, k2 (BLOCK_N, NH) += latent coordinates C0 .. C0+WIDTH-1 of the tokens (lat_row (BLOCK_N, 1): their
    rows of a (B, S, WIDTH) buffer) @ the matching columns of U's rows (u1, u2 (NH, 1) pointers into U (D, r),
    row-major). U tiles are loaded (NH, BLOCK_R), contiguous along r and unmasked when BLOCK_R divides WIDTH, so
    they are 16-byte asynchronous copies that the pipeliner overlaps with the dots; a column-major or masked
    tile falls back to 2-byte synchronous loads."""
    for c0 in range(0, WIDTH, BLOCK_R):
        c = c0 + tl.arange(0, BLOCK_R)
        lat = tl.load(lat_row + c[None, :], mask=ok[:, None] & (c[None, :] < WIDTH), other=0.0)  # (BLOCK_N, BLOCK_R)
        if WIDTH % BLOCK_R == 0:
            u_a, u_b = tl.load(u1 + C0 + c[None, :]), tl.load(u2 + C0 + c[None, :])  # (NH, BLOCK_R)
        else:  # odd latent widths (small models): masked, slow loads
            u_a = tl.load(u1 + C0 + c[None, :], mask=c[None, :] < WIDTH, other=0.0)
            u_b = tl.load(u2 + C0 + c[None, :], mask=c[None, :] < WIDTH, other=0.0)
        k1 = tl.dot(lat, tl.trans(u_a), k1, input_precision=PREC)
        k2 = tl.dot(lat, tl.trans(u_b), k2, input_precision=PREC)
    return k1, k2


@triton.jit
def _values(vq_ptr, vs_ptr, vz_ptr, vrow, ok, BLOCK_N: tl.constexpr, NV: tl.constexpr, HD: tl.constexpr,
            BITS: tl.constexpr, dtype: tl.constexpr):
    """Values (BLOCK_N, NV) of token rows vrow (BLOCK_N, 1) = (b * S + j) * Hkv + head, NV adjacent columns. The
    packed bytes and the scales and zeros are loaded as the tiles they are, (BLOCK_N, NV*BITS/8) and
    (BLOCK_N, NV/32), and widened in registers: a load per element of the (BLOCK_N, NV) tile is L1-bound."""
    if BITS == 16:  # (an early return would still compile the code after it, with 8 // BITS == 0)
        out = tl.load(vq_ptr + vrow * HD + tl.arange(0, NV)[None, :], mask=ok[:, None], other=0.0)
    else:
        PER: tl.constexpr = 8 // BITS
        NG: tl.constexpr = NV // 32
        byte = tl.load(vq_ptr + vrow * (HD // PER) + tl.arange(0, NV // PER)[None, :], mask=ok[:, None], other=0)
        byte = byte.to(tl.int32)  # (BLOCK_N, NV/PER); element c = PER * byte + i sits at bits BITS * i of its byte
        if BITS == 4:
            qv = tl.join(byte & 15, byte >> 4)  # (BLOCK_N, NV/2, 2)
        else:
            # join appends the new axis last: [..., i, t] holds code 2 * i + t
            qv = tl.join(tl.join(byte & 3, (byte >> 4) & 3), tl.join((byte >> 2) & 3, byte >> 6))  # (BLOCK_N, NV/4, 2, 2)
        qv = tl.reshape(qv, [BLOCK_N, NV]).to(tl.float32)
        grp = vrow * (HD // 32) + tl.arange(0, NG)[None, :]  # (BLOCK_N, NG)
        scale = tl.load(vs_ptr + grp, mask=ok[:, None], other=0.0).to(tl.float32)
        zero = tl.load(vz_ptr + grp, mask=ok[:, None], other=0.0).to(tl.float32)
        scale = tl.reshape(tl.broadcast_to(scale[:, :, None], [BLOCK_N, NG, 32]), [BLOCK_N, NV])
        zero = tl.reshape(tl.broadcast_to(zero[:, :, None], [BLOCK_N, NG, 32]), [BLOCK_N, NV])
        out = (qv * scale + zero).to(dtype)
    return out


@triton.jit
def _selected(q1, q2, m, l, acc, b, h, lo, sel, idx_ptr, keep_ptr, kls_ptr, klr_ptr, u1, u2, u1s, u2s, u1r, u2r,
              rope_ptr, vq_ptr, vs_ptr, vz_ptr, S, S_LAT, K, qk_scale, HKV: tl.constexpr, HD: tl.constexpr,
              RS: tl.constexpr, RR: tl.constexpr, BITS: tl.constexpr, TPS: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_R: tl.constexpr, ONE_SHOT: tl.constexpr, N_EXACT: tl.constexpr, EXACT: tl.constexpr,
              PREC: tl.constexpr):
    """The selected tokens [lo, lo + TPS) of index row sel, attended by KV head h of sequence b: (m, l, acc) updated.
    Keys rebuilt from the latents, or, EXACT, read at full rank from the latent buffers' rows from N_EXACT on."""
    HD2: tl.constexpr = HD // 2
    d = tl.arange(0, HD2)
    dt = q1.dtype
    c = tl.arange(0, BLOCK_R)
    # one loop with a static trip count, so that Triton's pipeliner can prefetch a block's positions, then its
    # latent rows, table rows and values, while the blocks before it are rebuilt and attended; blocks past K
    # (in the last split only) are masked whole and load nothing
    for t0 in range(0, TPS, BLOCK_N):
        t = lo + t0 + tl.arange(0, BLOCK_N)
        ok = (t < K) & (tl.load(keep_ptr + sel + t, mask=t < K, other=0) != 0)
        j = tl.load(idx_ptr + sel + t, mask=ok, other=0)  # (BLOCK_N,) positions
        lat = b * S_LAT + j[:, None]  # (BLOCK_N, 1) latent rows
        if EXACT:
            at = (j[:, None] * HKV + h) * HD2 + d[None, :]  # (BLOCK_N, HD2) in the (n_exact, Hkv, Dh/2) halves
            k1 = tl.load(kls_ptr + (b * S_LAT + N_EXACT) * RS + at, mask=ok[:, None], other=0.0).to(tl.float32)
            k2 = tl.load(klr_ptr + (b * S_LAT + N_EXACT) * RR + at, mask=ok[:, None], other=0.0).to(tl.float32)
        elif ONE_SHOT:
            ls = tl.load(kls_ptr + lat * RS + c[None, :], mask=ok[:, None] & (c[None, :] < RS), other=0.0)
            lr = tl.load(klr_ptr + lat * RR + c[None, :], mask=ok[:, None] & (c[None, :] < RR), other=0.0)
            k1 = tl.dot(lr, tl.trans(u1r), tl.dot(ls, tl.trans(u1s), input_precision=PREC), input_precision=PREC)
            k2 = tl.dot(lr, tl.trans(u2r), tl.dot(ls, tl.trans(u2s), input_precision=PREC), input_precision=PREC)
        else:
            k1 = tl.zeros([BLOCK_N, HD2], tl.float32)
            k2 = tl.zeros([BLOCK_N, HD2], tl.float32)
            k1, k2 = _rebuild(k1, k2, kls_ptr + lat * RS, ok, u1, u2, 0, RS, BLOCK_R, PREC)
            k1, k2 = _rebuild(k1, k2, klr_ptr + lat * RR, ok, u1, u2, RS, RR, BLOCK_R, PREC)
        # the tokens' rows of the model's (cos, sin) table, loaded whole (16-byte loads), then split
        cs = tl.load(rope_ptr + j[:, None] * HD + tl.arange(0, HD)[None, :], mask=ok[:, None], other=0.0)
        cos, sin = tl.split(tl.reshape(cs, [BLOCK_N, HD2, 2]))  # (BLOCK_N, HD2)
        r1 = (k1 * cos - k2 * sin).to(dt)
        r2 = (k2 * cos + k1 * sin).to(dt)
        v = _values(vq_ptr, vs_ptr, vz_ptr, (b * S + j[:, None]) * HKV + h, ok, BLOCK_N, HD, HD, BITS, dt)
        m, l, acc = _attend_block(q1, q2, r1, r2, v, ok, m, l, acc, qk_scale, PREC)
    return m, l, acc


@triton.jit
def _sals_decode_kernel(
        q_ptr, sink_k_ptr, sink_v_ptr, win_k_ptr, win_v_ptr, win_pos_ptr, pos_ptr,
        idx_ptr, keep_ptr, kls_ptr, klr_ptr, u_ptr, rope_ptr, vq_ptr, vs_ptr, vz_ptr,
        m_ptr, l_ptr, acc_ptr, S, S_LAT, K, stride_qb, stride_qh,
        qk_scale: tl.constexpr,  # constexpr: under torch.compile a float argument would arrive as fp64
        HKV: tl.constexpr, NQ: tl.constexpr, G: tl.constexpr, HD: tl.constexpr, N_SINK: tl.constexpr,
        W: tl.constexpr, RS: tl.constexpr, RR: tl.constexpr, BITS: tl.constexpr, TPS: tl.constexpr,
        BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, ONE_SHOT: tl.constexpr,
        N_EXACT: tl.constexpr, PREC: tl.constexpr):
    split, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n_split = tl.num_programs(0)
    HD2: tl.constexpr = HD // 2
    row = tl.arange(0, BLOCK_Q)  # query head h * G + row, for row < G
    live = row < G
    d = tl.arange(0, HD2)  # channel d of a key's first half, d + HD2 of its second
    dt = q_ptr.dtype.element_ty
    pos = tl.load(pos_ptr + b)
    q_row = q_ptr + b.to(tl.int64) * stride_qb + (h * G + row[:, None]) * stride_qh + d[None, :]
    q1 = tl.load(q_row, mask=live[:, None], other=0.0).to(tl.float32)  # (BLOCK_Q, HD2), pre-RoPE
    q2 = tl.load(q_row + HD2, mask=live[:, None], other=0.0).to(tl.float32)
    q_cs = rope_ptr + pos * HD + d * 2  # the new token's row of the (cos, sin) table
    q_cos, q_sin = tl.load(q_cs)[None, :], tl.load(q_cs + 1)[None, :]
    # rotated as model.apply_rope does (float32, rounded to the model's dtype), then fed to the tensor cores
    q1, q2 = (q1 * q_cos - q2 * q_sin).to(dt), (q2 * q_cos + q1 * q_sin).to(dt)
    kcol = h * HD + d  # (HD2,) offset of a first-half channel of head h in a (Hkv, HD) row
    m = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_Q], tl.float32)
    acc = tl.zeros([BLOCK_Q, HD], tl.float32)
    if split == 0:  # sinks (positions 0..N_SINK-1, valid up to pos) then the window ring (slot valid if pos >= 0)
        for t0 in range(0, N_SINK + W, BLOCK_N):
            t = t0 + tl.arange(0, BLOCK_N)
            w = t - N_SINK
            in_sink = (t < N_SINK) & (t <= pos)
            in_win = (w >= 0) & (w < W)
            in_win = in_win & (tl.load(win_pos_ptr + b * W + w, mask=in_win, other=-1) >= 0)
            s_off = (b * N_SINK + t[:, None]) * HKV * HD
            w_off = (b * W + w[:, None]) * HKV * HD
            ms, mw = in_sink[:, None], in_win[:, None]
            k1 = tl.load(sink_k_ptr + s_off + kcol[None, :], mask=ms, other=0.0) + \
                tl.load(win_k_ptr + w_off + kcol[None, :], mask=mw, other=0.0)
            k2 = tl.load(sink_k_ptr + s_off + HD2 + kcol[None, :], mask=ms, other=0.0) + \
                tl.load(win_k_ptr + w_off + HD2 + kcol[None, :], mask=mw, other=0.0)
            cv = h * HD + tl.arange(0, HD)
            v = tl.load(sink_v_ptr + s_off + cv[None, :], mask=ms, other=0.0) + \
                tl.load(win_v_ptr + w_off + cv[None, :], mask=mw, other=0.0)
            m, l, acc = _attend_block(q1, q2, k1, k2, v, in_sink | in_win, m, l, acc, qk_scale, PREC)
    else:  # selected tokens [lo, lo + TPS) of this KV head's index row
        lo = (split - 1) * TPS
        sel = (b * NQ + h % NQ).to(tl.int64) * K  # the row of idx and keep: one per sequence, or one per KV head
        u1 = u_ptr + kcol[:, None] * (RS + RR)  # (HD2, 1): rows of U (D, r) of the first halves ...
        u2 = u1 + HD2 * (RS + RR)  # ... and of the second halves
        c = tl.arange(0, BLOCK_R)
        u1s, u2s, u1r, u2r = u1, u2, u1, u2  # unused unless ONE_SHOT
        if ONE_SHOT:  # the head's rows of U, loaded once: (HD2, BLOCK_R) per half and latent part
            u1s = tl.load(u1 + c[None, :], mask=c[None, :] < RS, other=0.0)
            u2s = tl.load(u2 + c[None, :], mask=c[None, :] < RS, other=0.0)
            u1r = tl.load(u1 + RS + c[None, :], mask=c[None, :] < RR, other=0.0)
            u2r = tl.load(u2 + RS + c[None, :], mask=c[None, :] < RR, other=0.0)
        if pos < N_EXACT:  # a short row: its keys at full rank (sals_attention.latent_rows), no rebuild
            m, l, acc = _selected(q1, q2, m, l, acc, b, h, lo, sel, idx_ptr, keep_ptr, kls_ptr, klr_ptr, u1, u2, u1s,
                                  u2s, u1r, u2r, rope_ptr, vq_ptr, vs_ptr, vz_ptr, S, S_LAT, K, qk_scale, HKV, HD, RS,
                                  RR, BITS, TPS, BLOCK_N, BLOCK_R, ONE_SHOT, N_EXACT, True, PREC)
        else:
            m, l, acc = _selected(q1, q2, m, l, acc, b, h, lo, sel, idx_ptr, keep_ptr, kls_ptr, klr_ptr, u1, u2, u1s,
                                  u2s, u1r, u2r, rope_ptr, vq_ptr, vs_ptr, vz_ptr, S, S_LAT, K, qk_scale, HKV, HD, RS,
                                  RR, BITS, TPS, BLOCK_N, BLOCK_R, ONE_SHOT, N_EXACT, False, PREC)
    out = (b * HKV + h) * G + row  # (BLOCK_Q,) query heads
    tl.store(m_ptr + out * n_split + split, m, mask=live)
    tl.store(l_ptr + out * n_split + split, l, mask=live)
    tl.store(acc_ptr + (out[:, None] * n_split + split) * HD + tl.arange(0, HD)[None, :], acc, mask=live[:, None])


@triton.jit
def _combine_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, N: tl.constexpr, N_P: tl.constexpr, HD: tl.constexpr,
                    BLOCK: tl.constexpr):
    """combine_splits for row (b, h) of the partials: the N splits' acc and l weighted by exp2(m - max)."""
    row = tl.program_id(0).to(tl.int64)
    every = tl.arange(0, N_P)
    m_max = tl.max(tl.load(m_ptr + row * N + every, mask=every < N, other=float("-inf")), 0)  # split 0: finite
    d = tl.arange(0, HD)
    num = tl.zeros([HD], tl.float32)
    den = tl.zeros([], tl.float32)
    for n0 in range(0, N, BLOCK):  # BLOCK splits at a time: all of them at once would not fit in registers
        n = n0 + tl.arange(0, BLOCK)
        w = tl.exp2(tl.load(m_ptr + row * N + n, mask=n < N, other=float("-inf")) - m_max)  # (BLOCK,)
        den += tl.sum(w * tl.load(l_ptr + row * N + n, mask=n < N, other=0.0), 0)
        acc = tl.load(acc_ptr + (row * N + n)[:, None] * HD + d[None, :], mask=(n < N)[:, None], other=0.0)
        num += tl.sum(acc * w[:, None], 0)
    tl.store(out_ptr + row * HD + d, (num / den).to(out_ptr.dtype.element_ty))


def launch_combine(m: Tensor, l: Tensor, acc: Tensor, out: Tensor):
    """combine_splits of the partials m, l (B, H, n), acc (B, H, n, Dh) into out (B, H, Dh), in one kernel."""
    B, H, N, HD = acc.shape
    assert m.is_contiguous() and l.is_contiguous() and acc.is_contiguous() and out.is_contiguous()
    torch.library.wrap_triton(_combine_kernel)[(B * H,)](m, l, acc, out, N, triton.next_power_of_2(N), HD,
                                                         BLOCK=16, num_warps=4 if acc.is_cuda else 1)


@torch.library.triton_op("sals::decode_attention", mutates_args=())
def decode_attention(q: Tensor, sink_k: Tensor, sink_v: Tensor, win_k: Tensor, win_v: Tensor, window_pos: Tensor,
                     input_pos: Tensor, idx: Tensor, keep: Tensor, k_lat_score: Tensor, k_lat_rest: Tensor,
                     U: Tensor, rope: Tensor, v_q: Tensor, v_scale: Optional[Tensor], v_zero: Optional[Tensor],
                     bits: int, n_exact: int) -> Tensor:
    """One decode step of attention over sinks + window + selected tokens, for every sequence.
    q (B, H, Dh) pre-RoPE (any strides with contiguous channels: the kernel rotates it at input_pos); sink_k/v
    (B, n_sink, Hkv, Dh), win_k/v (B, W, Hkv, Dh) post-RoPE, window_pos (B, W) (-1 empty); input_pos (B, 1); idx,
    keep (B, NQ, k) selected positions and which count, NQ = 1 (one selection per layer) or Hkv (one per KV head);
    k_lat_score (B, S_lat, r*), k_lat_rest (B, S_lat, r - r*) with S_lat >= S (sals_attention.latent_rows), U (D, r),
    rope (>= S, Dh/2, 2) float32 the model's (cos, sin) table; v_q (B, S, Hkv, Dh*bits/8) uint8 with v_scale, v_zero
    (B, S, Hkv, Dh/32), or (B, S, Hkv, Dh) when bits == 16; n_exact the cache's: a sequence at input_pos < n_exact
    reads its selected keys at full rank from the latent buffers' rows from n_exact on instead of rebuilding them.
    Returns (B, H, Dh) in q's dtype."""
    B, H, HD = q.shape
    Hkv, K = win_k.shape[2], idx.shape[-1]
    cfg = decode_config(H // Hkv, q.is_cuda)
    n_sel = split_count(K, B * Hkv, cfg)
    m = torch.empty(B, H, 1 + n_sel, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    acc = torch.empty(B, H, 1 + n_sel, HD, dtype=torch.float32, device=q.device)
    launch_decode(q, sink_k, sink_v, win_k, win_v, window_pos, input_pos, idx, keep, k_lat_score, k_lat_rest, U,
                  rope, v_q, v_scale, v_zero, bits, n_exact, m, l, acc, cfg)
    out = torch.empty(B, H, HD, dtype=q.dtype, device=q.device)
    launch_combine(m, l, acc, out)
    return out


def decode_config(G: int, is_cuda: bool) -> dict:
    return dict(CONFIGS["mha" if G == 1 else "gqa"]) if is_cuda else dict(INTERPRETER_CONFIG)


def split_count(K: int, programs: int, cfg: dict) -> int:
    """How many selection splits share the K selected tokens of each of `programs` (sequence, KV head) pairs:
    cfg's split_blocks token blocks each, or else enough for about 4 programs per SM of a 132-SM GPU (528) without
    splitting finer than one block."""
    blocks = triton.cdiv(K, cfg["block_n"])
    if not blocks:
        return 0
    per_split = cfg["split_blocks"] or triton.cdiv(blocks, min(blocks, max(1, triton.cdiv(528, programs))))
    return triton.cdiv(blocks, per_split)


def launch_decode(q, sink_k, sink_v, win_k, win_v, window_pos, input_pos, idx, keep, k_lat_score, k_lat_rest, U,
                  rope, v_q, v_scale, v_zero, bits: int, n_exact: int, m: Tensor, l: Tensor, acc: Tensor,
                  cfg: dict | None = None):
    """The kernel, writing the partials of 1 + n_sel splits into m, l (B, H, 1 + n_sel), acc (B, H, 1 + n_sel, Dh)
    float32 (tests pass buffers poisoned with NaN); the selected tokens are shared evenly by the n_sel splits.
    cfg: launch settings as in CONFIGS (default: decode_config). Returns Triton's compiled-kernel handle."""
    B, H, HD = q.shape
    n_sink, W, Hkv = sink_k.shape[1], win_k.shape[1], win_k.shape[2]
    S, S_lat, RS, RR, K = v_q.shape[1], k_lat_score.shape[1], k_lat_score.shape[2], k_lat_rest.shape[2], idx.shape[-1]
    G, n_split, NQ = H // Hkv, m.shape[2], idx.shape[1]
    cfg = cfg or decode_config(G, q.is_cuda)
    assert HD in (32, 64, 128, 256) and (bits == 16 or HD % 32 == 0), f"unsupported head_dim {HD}"
    assert rope.shape[1:] == (HD // 2, 2) and rope.shape[0] >= S and rope.dtype == torch.float32, \
        f"rope must be the model's (cos, sin) table (>= {S}, {HD // 2}, 2) float32, not {tuple(rope.shape)}"
    assert idx.dim() == 3 and NQ in (1, Hkv) and keep.shape == idx.shape, \
        f"idx, keep must be (B, 1 or Hkv, k), not {tuple(idx.shape)} and {tuple(keep.shape)}"
    BLOCK_N = cfg["block_n"]
    TPS = BLOCK_N * max(1, triton.cdiv(triton.cdiv(K, BLOCK_N), max(1, n_split - 1)))  # tokens per split
    assert TPS * (n_split - 1) >= K, "too few splits for the selection"
    assert q.stride(2) == 1, "q needs contiguous channels"
    for t in (sink_k, sink_v, win_k, win_v, window_pos, idx, keep, k_lat_score, k_lat_rest, U, rope, v_q, m, l, acc):
        assert t.is_contiguous(), "decode_attention expects contiguous buffers"
    one_shot = max(RS, RR) <= cfg["block_r"]
    block_r = max(16, triton.next_power_of_2(max(RS, RR))) if one_shot else latent_block(RS, RR, cfg["block_r"])
    scale = v_q if v_scale is None else v_scale  # unused when bits == 16
    zero = v_q if v_zero is None else v_zero
    return torch.library.wrap_triton(_sals_decode_kernel)[(n_split, Hkv, B)](
        q, sink_k, sink_v, win_k, win_v, window_pos, input_pos.reshape(B), idx, keep, k_lat_score, k_lat_rest,
        U, rope, v_q, scale, zero, m, l, acc, S, S_lat, K, q.stride(0), q.stride(1),
        HD ** -0.5 * math.log2(math.e),
        HKV=Hkv, NQ=NQ, G=G, HD=HD, N_SINK=n_sink, W=W, RS=RS, RR=RR, BITS=bits, TPS=TPS,
        BLOCK_Q=max(16, triton.next_power_of_2(G)), BLOCK_N=BLOCK_N, BLOCK_R=block_r, ONE_SHOT=one_shot,
        N_EXACT=n_exact, PREC="tf32" if q.dtype != torch.float32 else "ieee", num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def latent_block(RS: int, RR: int, block_r: int) -> int:
    """The r tile of the rebuild: the largest power of two <= block_r dividing both latent widths (unmasked
    U loads), but at least 16 (tl.dot's minimum; masked loads then)."""
    while block_r > 16 and (RS % block_r or RR % block_r):
        block_r //= 2
    return block_r


def combine_splits(m: Tensor, l: Tensor, acc: Tensor) -> Tensor:
    """Partials m, l (B, H, n) base-2 and acc (B, H, n, Dh) -> softmax-weighted output (B, H, Dh) float32."""
    w = torch.exp2(m - m.amax(-1, keepdim=True))  # split 0 always holds the new token: the max is finite
    return (acc * w[..., None]).sum(2) / (l * w).sum(2)[..., None]


if __name__ == "__main__":
    from kernels.timing import copy_ceiling, graph_us, matmul_rate
    dev, dt = "cuda", torch.bfloat16
    for B, S, Hkv in [(16, 4096, 32), (8, 4096, 32), (8, 32768, 8)]:  # Llama-2-7B and Mistral-7B layers, SALS-12.5%
        H, HD, D = 32, 128, Hkv * 128
        r, K = D // 8, S // 8 - 80  # rank D/8; the budget of 1/8 of the tokens, less 16 sinks and a 64-token window
        gen = torch.Generator(dev).manual_seed(B)
        rnd = lambda *shape: torch.randn(*shape, device=dev, generator=gen).to(dt)  # noqa: E731
        q, sink_k, sink_v, win_k, win_v = rnd(B, H, HD), rnd(B, 16, Hkv, HD), rnd(B, 16, Hkv, HD), rnd(B, 64, Hkv, HD), \
            rnd(B, 64, Hkv, HD)
        window_pos, pos = torch.arange(S - 64, S, device=dev).int().expand(B, 64).contiguous(), torch.full((B, 1), S - 1, device=dev)
        idx = torch.stack([torch.randperm(S - 80, device=dev, generator=gen)[:K] + 16 for _ in range(B)]).sort(-1).values
        idx, keep = idx[:, None], torch.ones(B, 1, K, dtype=torch.bool, device=dev)
        kls, klr, U = rnd(B, S, r // 2), rnd(B, S, r - r // 2), rnd(D, r) / math.sqrt(r)
        angles = torch.arange(S, device=dev, dtype=torch.float64)[:, None] * 10000.0 ** (-torch.arange(0, HD, 2, device=dev) / HD)
        rope = torch.stack([angles.cos(), angles.sin()], -1).float()
        v_q = torch.randint(0, 256, (B, S, Hkv, HD // 4), device=dev, dtype=torch.uint8)
        v_scale, v_zero = rnd(B, S, Hkv, HD // 32).abs(), rnd(B, S, Hkv, HD // 32)
        args = (q, sink_k, sink_v, win_k, win_v, window_pos, pos, idx, keep, kls, klr, U, rope, v_q, v_scale, v_zero, 2,
                S // 8)  # the short-row branch compiled in, as in a cache, but not taken
        t = graph_us(lambda: decode_attention(*args))
        flop = 2 * B * K * D * r  # the key rebuild
        nbytes = B * K * (r * 2 + Hkv * (HD // 4 + 2 * 2 * HD // 32) + 8) + U.numel() * 2 + 2 * sink_k.numel() * 2 * 5
        print(f"B={B} S={S} Hkv={Hkv} SALS-12.5%: {t:.1f} us; rebuild {flop / t / 1e6:.0f} TFLOP/s "
              f"({flop / t / 1e6 / (matmul_rate() / 1e12):.0%} of the matmul rate), floor "
              f"{max(flop / matmul_rate(), nbytes / copy_ceiling()) * 1e6:.1f} us")
