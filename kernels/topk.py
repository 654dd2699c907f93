"""SALS step 4 in Triton: each sequence's top tokens within its budget, by radix select, no sort.

For row b, the selection is the n[b] highest of its finite scores (n[b] = the row's budget, at most k):
the scores are mapped to integers that order like them, the n[b]-th largest is found by four
8-bit radix passes (a 256-bin histogram each, over the keys that share the digits found so far), and two last
passes count, then write, the positions of the scores above it and of the first ties, in position order.
torch.topk (SALSCache.top, the reference) gives the same set up to the order of ties, but sorts its k results.
Every pass runs over (row, chunk of CHUNK scores) programs, so a row is spread over the whole GPU: one program per
row (the previous version) took 141-148 us at B=8, 32K on an H200, where 8 programs did all the work; this one
24-34 us at 4K-32K and B = 1-16, against torch.topk's 43-116 (BENCHMARKS.md), but more than the 18 us the one-program
kernel took at 4K: six launches in a CUDA graph, about 4 us each by that count.
Each program adds its chunk's histogram to the row's in global memory (integer atomics: the sums, and so the
result, do not depend on the order) and replays the earlier passes' choices from those histograms, so the
passes share no other state: six launches, no host sync, static shapes.

    idx (B, k) int64: the selected positions first, ascending, then 0; keep (B, k) bool: which are selected.

    python -m kernels.topk          # micro-benchmark on a GPU against torch.topk
"""
import torch
import triton
import triton.language as tl
from torch import Tensor

CHUNK = 1024  # scores per program and pass on a GPU; INTERPRETER_CHUNK under TRITON_INTERPRET (small tests)
INTERPRETER_CHUNK = 64


@triton.jit
def _ordered(s):
    """float32 -> int32 keys in the same order: the low 31 bits of negative floats flipped."""
    bits = s.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _digit(key, p: tl.constexpr):
    """Pass p's 8 bits of key, flipped so that bin 0 holds the largest (the sign byte: negative keys below)."""
    d = (key >> (24 - 8 * p)) & 255
    if p == 0:
        d = d ^ 128
    return 255 - d


@triton.jit
def _threshold(hist_ptr, n_ptr, b, K: tl.constexpr, PASSES: tl.constexpr):
    """Replays passes 0..PASSES-1 from row b's histograms: (prefix, need, count). prefix holds the top 8 * PASSES
    bits of the count-th largest key (count = min(budget, K, candidates)), need is how many keys still to take
    among those sharing them (all bits after four passes: how many of the keys equal to the threshold)."""
    bins = tl.arange(0, 256)
    prefix = tl.zeros([], tl.int32)
    need = tl.zeros([], tl.int32)
    count = tl.zeros([], tl.int32)
    for p in tl.static_range(PASSES):
        hist = tl.load(hist_ptr + (b * 4 + p) * 256 + bins)
        if p == 0:  # pass 0 counts every candidate
            n = tl.load(n_ptr + b).to(tl.int32)
            need = tl.maximum(tl.minimum(tl.minimum(n, K), tl.sum(hist, 0)), 0)
            count = need
        cum = tl.cumsum(hist, 0)  # keys in bins <= this one
        pick = tl.sum((cum < need).to(tl.int32), 0)  # the bin holding the need-th largest key
        need -= tl.sum(tl.where(bins < pick, hist, 0), 0)
        prefix = prefix | (((255 - pick) ^ (128 if p == 0 else 0)) << (24 - 8 * p))
    return prefix, need, count


@triton.jit
def _chunk(s_ptr, b, c, S: tl.constexpr, CHUNK: tl.constexpr):
    """Positions (CHUNK,) of chunk c of row b, their keys, and which are candidates (finite scores)."""
    j = c * CHUNK + tl.arange(0, CHUNK)
    s = tl.load(s_ptr + b.to(tl.int64) * S + j, mask=j < S, other=float("-inf"))
    return j, _ordered(s), s > float("-inf")


@triton.jit
def _histogram_kernel(s_ptr, n_ptr, hist_ptr, S: tl.constexpr, K: tl.constexpr, CHUNK: tl.constexpr,
                      PASS: tl.constexpr):
    """Pass PASS: the chunk's histogram of digit PASS over the candidates sharing the digits found so far."""
    b, c = tl.program_id(0), tl.program_id(1)
    j, key, live = _chunk(s_ptr, b, c, S, CHUNK)
    if PASS > 0:
        prefix, need, count = _threshold(hist_ptr, n_ptr, b, K, PASS)
        live = live & ((key >> (32 - 8 * PASS)) == (prefix >> (32 - 8 * PASS)))
    hist = tl.histogram(_digit(key, PASS), 256, mask=live)
    bins = tl.arange(0, 256)
    tl.atomic_add(hist_ptr + (b * 4 + PASS) * 256 + bins, hist, mask=hist > 0, sem="relaxed")


@triton.jit
def _count_kernel(s_ptr, n_ptr, hist_ptr, cnt_ptr, S: tl.constexpr, K: tl.constexpr, CHUNK: tl.constexpr,
                  N_CHUNK: tl.constexpr):
    """How many keys of the chunk are above the threshold, and how many equal it."""
    b, c = tl.program_id(0), tl.program_id(1)
    j, key, live = _chunk(s_ptr, b, c, S, CHUNK)
    prefix, need, count = _threshold(hist_ptr, n_ptr, b, K, 4)
    base = cnt_ptr + (b * N_CHUNK + c) * 2
    tl.store(base, tl.sum((live & (key > prefix)).to(tl.int32), 0))
    tl.store(base + 1, tl.sum((live & (key == prefix)).to(tl.int32), 0))


@triton.jit
def _write_kernel(s_ptr, n_ptr, hist_ptr, cnt_ptr, idx_ptr, keep_ptr, S: tl.constexpr, K: tl.constexpr,
                  CHUNK: tl.constexpr, N_CHUNK: tl.constexpr, N_POW: tl.constexpr, K_PER: tl.constexpr):
    """The chunk's selected positions, after those of the chunks before it; then slots c*K_PER.. of keep, and 0
    in the unselected slots of idx."""
    b, c = tl.program_id(0), tl.program_id(1)
    j, key, live = _chunk(s_ptr, b, c, S, CHUNK)
    prefix, need, count = _threshold(hist_ptr, n_ptr, b, K, 4)
    chunks = tl.arange(0, N_POW)  # N_POW: N_CHUNK rounded up to a power of two
    before = chunks < c
    cnt = cnt_ptr + (b * N_CHUNK + chunks) * 2
    gt_before = tl.sum(tl.load(cnt, mask=before, other=0), 0)
    eq_before = tl.sum(tl.load(cnt + 1, mask=before, other=0), 0)
    eq = (live & (key == prefix)).to(tl.int32)
    sel = (live & (key > prefix)) | ((eq != 0) & (eq_before + tl.cumsum(eq, 0) <= need))
    slot = gt_before + tl.minimum(eq_before, need) + tl.cumsum(sel.to(tl.int32), 0) - 1
    row = b.to(tl.int64) * K
    tl.store(idx_ptr + row + slot, j.to(tl.int64), mask=sel)
    for k0 in tl.static_range(0, K_PER, CHUNK):
        k = c * K_PER + k0 + tl.arange(0, CHUNK)
        ok = (k0 + tl.arange(0, CHUNK) < K_PER) & (k < K)
        tl.store(keep_ptr + row + k, k < count, mask=ok)
        tl.store(idx_ptr + row + k, tl.zeros([CHUNK], tl.int64), mask=ok & (k >= count))


@torch.library.triton_op("sals::select_top", mutates_args=())
def select_top(scores: Tensor, budget: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """scores (B, S) float32, -inf outside the candidates; budget (B,) int64 tokens each row attends (may be
    <= 0 or > k). Returns idx (B, k) int64 and keep (B, k) bool as in the module docstring."""
    B = scores.shape[0]
    idx = torch.empty(B, k, dtype=torch.int64, device=scores.device)
    keep = torch.empty(B, k, dtype=torch.bool, device=scores.device)
    launch_select(scores, budget, idx, keep)
    return idx, keep


def launch_select(scores: Tensor, budget: Tensor, idx: Tensor, keep: Tensor):
    """select_top into idx, keep (tests pass poisoned buffers)."""
    B, S = scores.shape
    K = idx.shape[1]
    assert scores.dtype == torch.float32 and scores.is_contiguous() and budget.shape == (B,)
    chunk = CHUNK if scores.is_cuda else INTERPRETER_CHUNK
    n_chunk = triton.cdiv(S, chunk)
    hist = torch.zeros(B, 4, 256, dtype=torch.int32, device=scores.device)  # (B, pass, bin), atomics add to it
    cnt = torch.empty(B, n_chunk, 2, dtype=torch.int32, device=scores.device)  # per chunk: above, equal
    grid, warps = (B, n_chunk), 4 if scores.is_cuda else 1
    for p in range(4):
        torch.library.wrap_triton(_histogram_kernel)[grid](scores, budget, hist, S, K, chunk, p, num_warps=warps)
    torch.library.wrap_triton(_count_kernel)[grid](scores, budget, hist, cnt, S, K, chunk, n_chunk, num_warps=warps)
    torch.library.wrap_triton(_write_kernel)[grid](scores, budget, hist, cnt, idx, keep, S, K, chunk, n_chunk,
                                                   triton.next_power_of_2(n_chunk), triton.cdiv(K, n_chunk),
                                                   num_warps=warps)


def select_top_reference(scores: Tensor, budget: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The same by sorting (float64 scores, ties by position): brute force for the tests."""
    B, S = scores.shape
    order = torch.argsort(-scores.double(), dim=1, stable=True)  # position order among equal scores
    n = torch.minimum(budget.clamp(min=0, max=k), scores.isfinite().sum(1))
    keep = torch.arange(k)[None] < n[:, None]
    idx = torch.zeros(B, k, dtype=torch.int64)
    for b in range(B):
        idx[b, :n[b]] = order[b, :n[b]].sort().values
    return idx, keep


if __name__ == "__main__":
    from kernels.timing import graph_us  # CUDA-graph replays: six launches cost no Python time in a step
    for B, S in [(1, 4096), (8, 4096), (16, 4096), (8, 8192), (8, 16384), (16, 16384), (1, 32768), (8, 32768),
                 (16, 32768)]:
        k = S // 8 - 80
        s = torch.randn(B, S, device="cuda")
        s[:, :16] = s[:, -64:] = float("-inf")
        n = torch.full((B,), k, device="cuda")
        idx, keep = select_top(s, n, k)
        ref = s.topk(k, dim=-1).indices.sort(-1).values
        same = torch.equal(idx, ref) and bool(keep.all())
        t, t_ref = graph_us(lambda: select_top(s, n, k)), graph_us(lambda: s.topk(k, dim=-1))
        print(f"B={B} S={S} k={k}: select_top {t:.1f} us, torch.topk {t_ref:.1f} us, same set: {same}")
