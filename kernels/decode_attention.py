"""Dense decode attention as one Triton split-KV (flash-decoding) kernel and a small combine kernel.

    out[b, h] = softmax(q[b, h] . K[b, h // G, :len_b] / sqrt(D)) @ V[b, h // G, :len_b],   len_b = input_pos[b] + 1

Each program serves one KV head and one chunk of one row's own tokens: the G = H / Hkv query heads of the KV head
are the rows of one query tile (padded to >= 16 rows for tl.dot), so every key and value is read once for all of
them, and no slot past a row's length is read: a short row in a large static cache costs its own length.

Work is balanced across rows of different lengths: the P = B * n_split programs of a KV head share the batch's
tokens in equal chunks (about sum of lengths / P, a multiple of BLOCK_N; _plan), a row taking cdiv(len, chunk)
consecutive programs, so a long row gets more programs than a short one and every program reads about the same
bytes, whatever the mix. Each program derives this plan from input_pos on the device (no host sync, static shapes:
a decode step compiles into one CUDA graph); n_split is chosen on the host from static things only (B, Hkv, S_max,
the GPU's SM count) to give several programs per SM. Programs past the batch's last chunk are idle and write
nothing. Online softmax in float32, base 2; each program writes a partial (max, sum, acc) per query head, and the
combine kernel merges the partials of each row.

    python -m kernels.decode_attention              # micro-benchmark on a GPU: Llama-2-7B / Mistral-7B layers
                                                    # against the copy ceiling, under both L2 flushes of
                                                    # kernels/timing.graph_us (every SDPA backend:
                                                    # bench/attention_bench.py)
    python -m kernels.decode_attention --variants   # the same for every launch setting of VARIANTS
"""
import functools
import math
from typing import Optional  # torch.library's schema inference reads typing.Optional in older torch

import torch
import triton
import triton.language as tl
from torch import Tensor

# Launch settings: block_n tokens per K/V tile (16-bit; halved for float32, so that a tile holds the same bytes),
# num_warps, num_stages (K/V loads pipelined num_stages - 1 blocks ahead), programs_per_sm (how many programs in all
# n_split aims for), min_chunk (n_split never cuts a full cache row into chunks shorter than this), dot (q.k and p.v on
# the tensor cores, the G query rows padded to 16; else multiply-and-sum in registers on G rows, which skips the
# shared-memory staging of K and V that tl.dot needs: for MHA's single query row), merge (the last program of each row
# and KV head to finish merges the row's partials, counted in a lock buffer: one launch instead of two).
DEFAULT_CONFIG = dict(block_n=64, num_warps=4, num_stages=3, programs_per_sm=8, min_chunk=256, dot=True, merge=False)
# The variants a GPU benchmark times (python -m kernels.decode_attention --variants). Compiled offline for sm_90 at
# D = 128, bf16 (no spills): the default 70 KB of shared memory and 96 registers (three programs per SM), 4 stages
# 102 KB (two), 128-token tiles with 3 stages 136 KB (one), with 2 stages 72 KB and 128 registers (three).
VARIANTS = (
    DEFAULT_CONFIG,
    dict(block_n=64, num_warps=4, num_stages=4, programs_per_sm=8, min_chunk=256),
    dict(block_n=128, num_warps=8, num_stages=3, programs_per_sm=4, min_chunk=512),
    dict(block_n=128, num_warps=4, num_stages=2, programs_per_sm=8, min_chunk=256),
    dict(block_n=64, num_warps=4, num_stages=3, programs_per_sm=16, min_chunk=128),
    dict(block_n=64, num_warps=4, num_stages=3, programs_per_sm=8, min_chunk=256, dot=False),
    dict(block_n=32, num_warps=4, num_stages=4, programs_per_sm=8, min_chunk=256, dot=False),
    dict(DEFAULT_CONFIG, merge=True),
    dict(block_n=64, num_warps=4, num_stages=3, programs_per_sm=16, min_chunk=128, merge=True),
)
INTERPRETER_SMS = 4  # the SM count split_count assumes off the GPU (Triton's interpreter): several splits at tiny sizes


@triton.jit
def _plan(pos_ptr, stride_pos, B, S, P, BLOCK_N: tl.constexpr, B_P: tl.constexpr):
    """Each row's length n (B_P,) = input_pos + 1 clipped to [0, S] (rows >= B: 0), the first of its programs
    start (B_P,) and their count (B_P,) among the P programs of a KV head, and the chunk length (a multiple of
    BLOCK_N): the batch's tokens over P if the rows' counts then fit in P (rows of equal lengths use every program),
    else over P - B, which always fits (count_b <= n_b / chunk + 1), or with P == B one program per row."""
    rb = tl.arange(0, B_P)
    n = tl.load(pos_ptr + rb * stride_pos, mask=rb < B, other=-1).to(tl.int32) + 1
    n = tl.minimum(tl.maximum(n, 0), S)  # a position past the cache is never read past it
    total = tl.sum(n, 0)
    even = tl.maximum(tl.cdiv(tl.cdiv(total, P), BLOCK_N), 1) * BLOCK_N
    safe = tl.where(P > B, tl.cdiv(total, tl.maximum(P - B, 1)), tl.max(n, 0))
    safe = tl.maximum(tl.cdiv(safe, BLOCK_N), 1) * BLOCK_N
    chunk = tl.where(tl.sum(tl.cdiv(n, even), 0) <= P, even, safe)
    count = tl.cdiv(n, chunk)
    start = tl.cumsum(count, 0) - count
    return n, start, count, chunk


@triton.jit
def _attend_block(q, k_ptr, v_ptr, kv, n0, hi, m, l, acc, qk_scale, D: tl.constexpr, BLOCK_N: tl.constexpr,
                  PREC: tl.constexpr, DOT: tl.constexpr):
    """Online softmax update of (m, l, acc) (BLOCK_M,), (BLOCK_M,), (BLOCK_M, D) with the tokens n0 .. n0+BLOCK_N-1
    (< hi) of the (S, D) key and value rows at offset kv; base-2 logits."""
    t = n0 + tl.arange(0, BLOCK_N)
    d = tl.arange(0, D)
    ok = t < hi
    k = tl.load(k_ptr + kv + t[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)  # (BLOCK_N, D)
    v = tl.load(v_ptr + kv + t[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)
    if DOT:
        s = tl.dot(q, tl.trans(k), input_precision=PREC)  # (BLOCK_M, BLOCK_N)
    else:
        s = tl.sum(q.to(tl.float32)[:, None, :] * k.to(tl.float32)[None, :, :], 2)
    s = tl.where(ok[None, :], s * qk_scale, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))  # finite: every block holds >= 1 token
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(s - m_new[:, None])
    l = l * alpha + tl.sum(p, 1)
    if DOT:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    else:
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], 1)
    return m_new, l, acc


@triton.jit
def _decode_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, m_ptr, l_ptr, acc_ptr, span_ptr, out_ptr, lock_ptr, B, S, P,
                   stride_qb, stride_qh, stride_pos, stride_ob, stride_oh,
                   qk_scale: tl.constexpr,  # constexpr: under torch.compile a float argument would arrive as fp64
                   H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, B_P: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, PREC: tl.constexpr, DOT: tl.constexpr, MERGE: tl.constexpr,
                   INTERPRETED: tl.constexpr):
    j, h = tl.program_id(0), tl.program_id(1)  # program j of KV head h
    n, start, count, chunk = _plan(pos_ptr, stride_pos, B, S, P, BLOCK_N, B_P)
    rb = tl.arange(0, B_P)
    b = tl.sum((start + count <= j).to(tl.int32), 0)  # rows whose programs all come before j
    used = j < tl.sum(count, 0)  # programs past the batch's last chunk are idle
    b = tl.minimum(b, B - 1)
    lo = (j - tl.sum(tl.where(rb == b, start, 0), 0)) * chunk  # this program's tokens [lo, hi) of row b
    hi = tl.minimum(lo + chunk, tl.sum(tl.where(rb == b, n, 0), 0))
    lo = tl.where(used, lo, 0)
    hi = tl.where(used, hi, 0)
    first = (j == 0) & (h == 0)  # one program hands the plan to the combine kernel
    tl.store(span_ptr + rb * 2, start, mask=first & (rb < B))
    tl.store(span_ptr + rb * 2 + 1, count, mask=first & (rb < B))

    g = tl.arange(0, BLOCK_M)  # query rows: heads h*G + g, g < G
    d = tl.arange(0, D)
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + (h * G + g[:, None]) * stride_qh + d[None, :],
                mask=g[:, None] < G, other=0.0)  # (BLOCK_M, D)
    kv = (b * (H // G) + h).to(tl.int64) * S * D  # this row's KV head (S, D)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    if INTERPRETED:  # the interpreter's scalars are 1-element arrays, which range() cannot take: a while loop
        n0 = lo
        while n0 < hi:
            m, l, acc = _attend_block(q, k_ptr, v_ptr, kv, n0, hi, m, l, acc, qk_scale, D, BLOCK_N, PREC, DOT)
            n0 += BLOCK_N
    else:  # a for loop, which Triton's pipeliner prefetches num_stages - 1 blocks ahead
        for n0 in range(lo, hi, BLOCK_N):
            m, l, acc = _attend_block(q, k_ptr, v_ptr, kv, n0, hi, m, l, acc, qk_scale, D, BLOCK_N, PREC, DOT)
    live = (g < G) & used
    out = j * H + h * G + g  # (BLOCK_M,) partial rows (program, query head)
    tl.store(m_ptr + out, m, mask=live)
    tl.store(l_ptr + out, l, mask=live)
    tl.store(acc_ptr + out[:, None] * D + d[None, :], acc, mask=live[:, None])
    if MERGE:  # the last of row b's programs of KV head h to finish merges their partials into out
        tl.debug_barrier()  # every thread's partials stored before the count is raised
        lock = lock_ptr + b * (H // G) + h
        if used:
            n_prog = tl.sum(tl.where(rb == b, count, 0), 0)
            if tl.atomic_add(lock, 1, sem="acq_rel", scope="gpu") == n_prog - 1:
                first_b = tl.sum(tl.where(rb == b, start, 0), 0)
                for i in tl.static_range(G):
                    o = _merge(m_ptr, l_ptr, acc_ptr, first_b, n_prog, h * G + i, H, D, 16)
                    tl.store(out_ptr + b.to(tl.int64) * stride_ob + (h * G + i) * stride_oh + d,
                             o.to(out_ptr.dtype.element_ty))
                tl.store(lock, 0)  # zero again for the next launch
        if j == 0:  # rows without programs (negative positions) come out NaN, as from the combine kernel
            empty = (rb < B) & (count == 0)
            nan = tl.full([B_P, D], float("nan"), tl.float32).to(out_ptr.dtype.element_ty)
            for i in tl.static_range(G):
                tl.store(out_ptr + rb.to(tl.int64)[:, None] * stride_ob + (h * G + i) * stride_oh + d[None, :], nan,
                         mask=empty[:, None])


@triton.jit
def _merge(m_ptr, l_ptr, acc_ptr, first, cnt, hq, H: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr):
    """The softmax-weighted merge (D,) of query head hq's partials in rows first .. first + cnt - 1 of m, l (P, H),
    acc (P, H, D), BLOCK partials at a time with a running max; no other partial is read. An empty partial (max -inf,
    sum 0) weighs nothing; cnt == 0 gives NaN. A while loop: its trip count is a loaded value, which a for loop's
    range() cannot take in Triton's interpreter (whose scalars are 1-element arrays). Loads bypass L1 (.cg): other
    programs wrote these partials during the same launch."""
    d = tl.arange(0, D)
    m_run = tl.full([], float("-inf"), tl.float32)
    den = tl.zeros([], tl.float32)
    num = tl.zeros([D], tl.float32)
    i0 = cnt * 0
    while i0 < cnt:
        i = i0 + tl.arange(0, BLOCK)
        row = (first + i) * H + hq  # (BLOCK,) partial rows
        m = tl.load(m_ptr + row, mask=i < cnt, other=float("-inf"), cache_modifier=".cg")
        m_new = tl.maximum(m_run, tl.max(m, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # only empty partials so far: keep exp2 finite
        alpha = tl.exp2(m_run - m_safe)
        w = tl.exp2(m - m_safe)  # (BLOCK,)
        den = den * alpha + tl.sum(w * tl.load(l_ptr + row, mask=i < cnt, other=0.0, cache_modifier=".cg"), 0)
        acc = tl.load(acc_ptr + row[:, None] * D + d[None, :], mask=(i < cnt)[:, None], other=0.0,
                      cache_modifier=".cg")
        num = num * alpha + tl.sum(acc * w[:, None], 0)
        m_run = m_new
        i0 += BLOCK
    return num / den


@triton.jit
def _combine_kernel(span_ptr, m_ptr, l_ptr, acc_ptr, out_ptr, stride_ob, stride_oh, H: tl.constexpr,
                    D: tl.constexpr, BLOCK: tl.constexpr):
    """out[b, hq] = the merge of row b's partials, rows span[b, 0] .. span[b, 0] + span[b, 1] - 1 (a row without
    partials comes out NaN)."""
    b, hq = tl.program_id(0), tl.program_id(1)
    out = _merge(m_ptr, l_ptr, acc_ptr, tl.load(span_ptr + b * 2), tl.load(span_ptr + b * 2 + 1), hq, H, D, BLOCK)
    tl.store(out_ptr + b.to(tl.int64) * stride_ob + hq * stride_oh + tl.arange(0, D),
             out.to(out_ptr.dtype.element_ty))


def resolve_config(config: dict | None) -> dict:
    """DEFAULT_CONFIG updated with config's entries; unknown names and impossible values are refused."""
    cfg = dict(DEFAULT_CONFIG, **(config or {}))
    unknown = sorted(set(cfg) - set(DEFAULT_CONFIG))
    if unknown:
        raise ValueError(f"unknown decode_attention settings {unknown}; the settings are {sorted(DEFAULT_CONFIG)}.")
    bn = cfg["block_n"]
    counts = (cfg["num_warps"], cfg["num_stages"], cfg["programs_per_sm"], cfg["min_chunk"])
    if bn < 16 or bn & (bn - 1) or cfg["dot"] not in (True, False) or cfg["merge"] not in (True, False) or \
            min(counts) < 1:
        raise ValueError(f"decode_attention settings {cfg}: block_n must be a power of two >= 16, dot and merge "
                         f"bools and the others at least 1.")
    return cfg


@functools.cache
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; INTERPRETER_SMS elsewhere."""
    if device.type != "cuda":
        return INTERPRETER_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def split_count(B: int, Hkv: int, S: int, n_sm: int, cfg: dict) -> int:
    """n_split from static shapes only: enough programs (B * Hkv * n_split) for cfg's programs per SM, but no
    chunk of a full cache row below cfg's min_chunk tokens."""
    want = triton.cdiv(cfg["programs_per_sm"] * n_sm, B * Hkv)
    return max(1, min(want, S // cfg["min_chunk"]))


def check_inputs(q: Tensor, k_cache: Tensor, v_cache: Tensor, input_pos: Tensor):
    """Shapes, dtypes and layouts the kernels assume, with what to do when they do not hold (static checks only:
    the positions themselves stay on the device; a position >= S_max is read as S_max - 1, a negative one gives
    NaN for its row)."""
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"decode_attention takes q (B, H, D) and k_cache, v_cache (B, Hkv, S, D) of one shape; got "
                         f"{tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}.")
    B, H, D = q.shape
    if k_cache.shape[0] != B or k_cache.shape[3] != D or H % k_cache.shape[1]:
        raise ValueError(f"q {tuple(q.shape)} does not fit the cache {tuple(k_cache.shape)}: the same batch and "
                         f"head_dim, and a number of query heads divisible by the KV heads.")
    if D not in (16, 32, 64, 128, 256):
        raise ValueError(f"head_dim {D} is not supported: 16, 32, 64, 128 or 256.")
    if not (q.dtype == k_cache.dtype == v_cache.dtype):
        raise ValueError(f"q, k_cache and v_cache must share a dtype; got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}.")
    if q.stride(2) != 1 or not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("q needs contiguous channels and the caches must be contiguous; call .contiguous() first.")
    if input_pos.numel() != B or input_pos.is_floating_point():
        raise ValueError(f"input_pos must hold one integer position per row ({B}); got {tuple(input_pos.shape)} "
                         f"{input_pos.dtype}.")


def launch_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, input_pos: Tensor, m: Tensor, l: Tensor, acc: Tensor,
                  span: Tensor, cfg: dict, out: Tensor | None = None, lock: Tensor | None = None):
    """The split kernel: the P = m.shape[0] programs of each KV head (n_split = P / B) write their partials into m,
    l (P, H) and acc (P, H, D) float32, and the plan into span (B, 2) int32: each row's first program and count
    (tests pass buffers poisoned with NaN; idle programs leave theirs as they were). With cfg["merge"] the programs
    also merge them into out (B, H, D) (any strides with contiguous channels), counting finished programs in lock
    (B, Hkv) int32, which must be zero and is left zero; launch_combine is then not needed."""
    B, H, D = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    P = m.shape[0]
    assert P % B == 0 and m.shape == l.shape == (P, H) and acc.shape == (P, H, D) and span.shape == (B, 2)
    assert m.is_contiguous() and l.is_contiguous() and acc.is_contiguous() and span.is_contiguous()
    if cfg["merge"]:
        assert out is not None and out.shape == (B, H, D) and out.stride(2) == 1, "merge needs out (B, H, D)"
        assert lock is not None and lock.shape == (B, Hkv) and lock.dtype == torch.int32 and lock.is_contiguous(), \
            "merge needs a zero lock (B, Hkv) int32"
    out = m if out is None else out  # unused without merge
    pos = input_pos.reshape(B)
    G = H // Hkv
    torch.library.wrap_triton(_decode_kernel)[(P, Hkv)](
        q, k_cache, v_cache, pos, m, l, acc, span, out, span if lock is None else lock, B, S, P, q.stride(0),
        q.stride(1), pos.stride(0), out.stride(0), out.stride(1),
        D ** -0.5 * math.log2(math.e), H=H, G=G, D=D, B_P=triton.next_power_of_2(B),
        BLOCK_M=max(16 if cfg["dot"] else 1, triton.next_power_of_2(G)),
        BLOCK_N=max(16, cfg["block_n"] * 2 // q.element_size()), PREC="ieee" if q.dtype == torch.float32 else "tf32",
        DOT=cfg["dot"], MERGE=cfg["merge"], INTERPRETED=not q.is_cuda, num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"])


def launch_combine(span: Tensor, m: Tensor, l: Tensor, acc: Tensor, out: Tensor):
    """Merges each row's partials (rows span[b, 0] .. + span[b, 1] - 1 of m, l (P, H), acc (P, H, D)) into out
    (B, H, D) (any strides with contiguous channels)."""
    B, H, D = out.shape
    assert out.stride(2) == 1 and span.shape == (B, 2) and span.is_contiguous()
    torch.library.wrap_triton(_combine_kernel)[(B, H)](span, m, l, acc, out, out.stride(0), out.stride(1), H=H, D=D,
                                                       BLOCK=16, num_warps=4 if out.is_cuda else 1)


# lock is scratch the kernel leaves as it found it (zero), so the op does not declare it mutated: declared, the compiler
# would copy it around every call
@torch.library.triton_op("sals::dense_decode_attention", mutates_args=())
def _decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, input_pos: Tensor, lock: Optional[Tensor],
                      block_n: int, num_warps: int, num_stages: int, programs_per_sm: int, min_chunk: int, dot: bool,
                      merge: bool) -> Tensor:
    """decode_attention with the launch settings as separate arguments (a custom op's schema takes no dict)."""
    cfg = dict(block_n=block_n, num_warps=num_warps, num_stages=num_stages, programs_per_sm=programs_per_sm,
               min_chunk=min_chunk, dot=dot, merge=merge)
    B, H, D = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    P = B * split_count(B, Hkv, S, sm_count(q.device), cfg)
    m = torch.empty(P, H, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    acc = torch.empty(P, H, D, dtype=torch.float32, device=q.device)
    span = torch.empty(B, 2, dtype=torch.int32, device=q.device)
    out = torch.empty(B, H, D, dtype=q.dtype, device=q.device)
    if merge and lock is None:
        lock = torch.zeros(B, Hkv, dtype=torch.int32, device=q.device)
    launch_decode(q, k_cache, v_cache, input_pos, m, l, acc, span, cfg, out, lock)
    if not merge:
        launch_combine(span, m, l, acc, out)
    return out


def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, input_pos: Tensor, config: dict | None = None,
                     lock: Tensor | None = None) -> Tensor:
    """One decode step of dense attention for every row of the cache.

    q (B, H, D) post-RoPE query of the new token (any strides with contiguous channels); k_cache, v_cache
    (B, Hkv, S_max, D) contiguous post-RoPE cache, the new token already written; input_pos (B,) or (B, 1) integer:
    row b attends positions 0..input_pos[b]. Head h reads KV head h // (H / Hkv) (the Hugging Face grouping).
    config: launch settings over DEFAULT_CONFIG (see VARIANTS). lock: (B, Hkv) int32 zeros kept by the caller for
    the merge setting (left zero; None: a fresh one each call, one more small kernel). Returns (B, H, D) in q's dtype.
    Scale 1/sqrt(D); fp32, fp16 and bf16."""
    check_inputs(q, k_cache, v_cache, input_pos)
    cfg = resolve_config(config)
    if lock is not None and (lock.shape != (q.shape[0], k_cache.shape[1]) or lock.dtype != torch.int32
                             or lock.device != q.device or not lock.is_contiguous()):
        raise ValueError(f"lock must be contiguous (B, Hkv) = {(q.shape[0], k_cache.shape[1])} int32 zeros on "
                         f"{q.device}; got {tuple(lock.shape)} {lock.dtype} on {lock.device}.")
    return _decode_attention(q, k_cache, v_cache, input_pos, lock, cfg["block_n"], cfg["num_warps"],
                             cfg["num_stages"], cfg["programs_per_sm"], cfg["min_chunk"], cfg["dot"], cfg["merge"])


def decode_attention_reference(q: Tensor, k_cache: Tensor, v_cache: Tensor, input_pos: Tensor) -> Tensor:
    """The same in float64 PyTorch: (B, H, D) float64."""
    B, H, D = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    k = k_cache.double().repeat_interleave(H // Hkv, 1)  # (B, H, S, D)
    v = v_cache.double().repeat_interleave(H // Hkv, 1)
    s = torch.einsum("bhd,bhsd->bhs", q.double(), k) / math.sqrt(D)
    s = s.masked_fill(torch.arange(S, device=q.device) > input_pos.reshape(B, 1, 1), -math.inf)
    return torch.einsum("bhs,bhsd->bhd", s.softmax(-1), v)


if __name__ == "__main__":
    import argparse
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from kernels.timing import copy_ceiling, graph_us
    p = argparse.ArgumentParser(description="dense split-KV decode attention against the copy ceiling, one layer (GPU)")
    p.add_argument("--variants", action="store_true", help="time every launch setting of VARIANTS, not the default")
    args = p.parse_args()
    configs = VARIANTS if args.variants else (DEFAULT_CONFIG,)
    dev, dt, D, H = "cuda", torch.bfloat16, 128, 32
    ceiling = copy_ceiling()
    print(f"{torch.cuda.get_device_name()}: copy ceiling {ceiling / 1e12:.2f} TB/s, {sm_count(torch.device(dev))} SMs")
    # the merge under torch.compile in a CUDA graph, as a compiled decode step runs it: the lock is a graph input the
    # op does not declare mutated, so replays with new positions must still come out right and leave it zero
    q, k, v = (torch.randn(4, H, *shape, device=dev, dtype=dt) for shape in [(D,), (2048, D), (2048, D)])
    k, v = k[:, :8].contiguous(), v[:, :8].contiguous()  # 8 KV heads
    pos, lock = torch.zeros(4, 1, dtype=torch.long, device=dev), torch.zeros(4, 8, dtype=torch.int32, device=dev)
    step = torch.compile(lambda: decode_attention(q, k, v, pos, dict(merge=True), lock),
                         mode="reduce-overhead", fullgraph=True)
    for lens in ([2048, 7, 1000, 1], [5, 2048, 64, 300], [2048] * 4):
        pos.copy_(torch.tensor(lens, device=dev)[:, None] - 1)
        out = step().clone()
        ref = decode_attention_reference(q.float(), k.float(), v.float(), pos)
        print(f"compiled merge, rows {lens}: rel err {((out.double() - ref).norm() / ref.norm()).item():.1e}, lock "
              f"{'zero' if not lock.any() else 'NOT zero'}")
    del q, k, v, pos, lock, step
    # K and V elements (bf16) at most, a multiple of 256 so that V's view is as aligned as K's
    most = min(20 << 30, int(torch.cuda.mem_get_info()[0] * 0.85) // 4) >> 8 << 8
    pool = torch.randn(2 * most, device=dev, dtype=dt)  # every case's K and V are views of it (no reallocation)
    full_rate = {}  # (name, S, B) -> bytes/us on full rows

    def case(name: str, Hkv: int, S: int, lens: list[int]):
        """Times the kernel (each config) on rows of lengths lens in a cache of S slots, checked against SDPA flash."""
        B = len(lens)
        n = B * Hkv * S * D
        if n > most:
            print(f"{name} S={S} B={B}: skipped, {4 * n / 1e9:.0f} GB of K and V do not fit")
            return
        k, v = pool[:n].view(B, Hkv, S, D), pool[most:most + n].view(B, Hkv, S, D)
        q = torch.randn(B, H, D, device=dev, dtype=dt)
        pos = torch.tensor(lens, device=dev)[:, None] - 1
        nbytes = 2 * sum(lens) * Hkv * D * 2 + 2 * q.numel() * 2  # K and V of each row's own tokens, q and out
        lock = torch.zeros(B, Hkv, dtype=torch.int32, device=dev)  # for the merge settings, kept as a cache keeps it
        outs = [decode_attention(q, k, v, pos, cfg, lock) for cfg in configs]
        out = outs[0]
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # per row, on its own tokens: the reference output
            ref = torch.cat([F.scaled_dot_product_attention(q[b:b + 1, :, None], k[b:b + 1, :, :L], v[b:b + 1, :, :L],
                                                            enable_gqa=True)[:, :, 0] for b, L in enumerate(lens)])
        err = max(((o.float() - ref.float()).norm() / ref.float().norm()).item() for o in outs)  # the worst setting
        assert not lock.any(), "the merging programs left the lock non-zero"
        times = [graph_us(lambda: decode_attention(q, k, v, pos, cfg, lock)) for cfg in configs]
        t = min(times)
        line = (f"{name} S={S} B={B}: {t:.1f} us, {nbytes / 1e6:.1f} MB, {nbytes / t / 1e6:.2f} TB/s "
                f"({nbytes / t / 1e6 / (ceiling / 1e12):.0%} of copy), rel err {err:.1e}")
        if min(lens) == S:  # both L2 flushes of kernels/timing.graph_us, ours and SDPA flash on the same rows
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                flash = lambda: F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)  # noqa: E731
                t_flash = [graph_us(flash, flush=f) for f in ("read", "zero")]
            line += (f"; zeroing flush {graph_us(lambda: decode_attention(q, k, v, pos), flush='zero'):.1f} us; "
                     f"SDPA flash {t_flash[0]:.1f} / {t_flash[1]:.1f} us (read / zeroing flush)")
        if len(configs) > 1:
            line += "; variants " + " / ".join(f"{x:.1f}" for x in times) + " us"
        if min(lens) == S:
            full_rate[name, S, B] = nbytes / t
        elif (name, S, B) in full_rate:  # the balance target: within 10% of the rows' bytes at the full-row rate
            line += (f"; rows {min(lens)}..{max(lens)}: {t * full_rate[name, S, B] / nbytes:.2f}x the time of their "
                     f"bytes at the full-row rate")
        print(line, flush=True)

    for name, Hkv in [("llama-2-7b", 32), ("mistral-7b", 8)]:
        for S in (4096, 32768, 131072):
            for B in (1, 8, 16, 64):
                case(name, Hkv, S, [S] * B)
        # rows of 1K..32K tokens in a 32K cache, longest last and longest first
        case(name, Hkv, 32768, [1024 * (1 + 31 * i // 7) for i in range(8)])
        case(name, Hkv, 32768, [1024 * (1 + 31 * i // 15) for i in range(16)][::-1])
