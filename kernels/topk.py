"""SALS step 4 as one Triton kernel: each sequence's top tokens within its budget, by radix select, no sort.

For row b, the selection is the n[b] highest of its finite scores (n[b] = the row's budget, at most k):
the scores are mapped to integers that order like them, the n[b]-th largest is found by four
8-bit radix passes (a 256-bin histogram each, over the keys that share the digits found so far), and a last
pass writes the positions of the scores above it, then of the first ties, in position order. torch.topk
(SALSCache.top, the reference) gives the same set up to the order of ties, but sorts its k results, half of
its time in a step (bench/NOTES.md). One program per row; the row is read five times, from L2 after the first, and
the histograms cost ~0.85 ns per element and pass on an H200, so SALSCache uses it up to SELECT_MAX_LEN tokens
(faster than torch.topk up to 16K: 17 against 46 us at 4K, 89 against 116 at 16K; slower at 32K: 141 against 94).

    idx (B, k) int64: the selected positions first, ascending, then 0; keep (B, k) bool: which are selected.

    python kernels/topk.py          # micro-benchmark on a GPU against torch.topk
"""
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@triton.jit
def _ordered(s):
    """float32 -> int32 keys in the same order: the low 31 bits of negative floats flipped."""
    bits = s.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _select_kernel(s_ptr, n_ptr, idx_ptr, keep_ptr, S: tl.constexpr, K: tl.constexpr, BLOCK: tl.constexpr):
    # S and K are constexprs (fixed per cache): loop bounds from arguments do not run in Triton's interpreter
    b = tl.program_id(0)
    row = s_ptr + b.to(tl.int64) * S
    bins = tl.arange(0, 256)
    prefix = tl.zeros([], tl.int32)  # the bytes of the threshold key found so far
    need = tl.zeros([], tl.int32)  # how many keys still to take among those sharing the prefix
    for p in tl.static_range(4):
        SHIFT = 24 - 8 * p  # a constexpr: p is one
        hist = tl.zeros([256], tl.int32)
        n_fin = tl.zeros([], tl.int32)
        for c0 in range(0, S, BLOCK):
            j = c0 + tl.arange(0, BLOCK)
            s = tl.load(row + j, mask=j < S, other=float("-inf"))
            key = _ordered(s)
            live = s > float("-inf")  # only candidates (finite scores) can be selected
            if p > 0:
                live = live & ((key >> (SHIFT + 8)) == (prefix >> (SHIFT + 8)))
            else:
                n_fin += tl.sum(live.to(tl.int32), 0)
            digit = (key >> SHIFT) & 255
            if p == 0:
                digit = digit ^ 128  # the sign byte: negative keys below positive ones
            hist += tl.histogram(255 - digit, 256, mask=live)  # bin 0: the largest digit
        if p == 0:
            n = tl.load(n_ptr + b).to(tl.int32)
            need = tl.maximum(tl.minimum(tl.minimum(n, K), n_fin), 0)
            count = need
        cum = tl.cumsum(hist, 0)  # keys whose digit is >= 255 - bin
        pick = tl.sum((cum < need).to(tl.int32), 0)  # the bin holding the need-th largest key
        need -= tl.sum(tl.where(bins < pick, hist, 0), 0)
        prefix = prefix | (((255 - pick) ^ (128 if p == 0 else 0)) << SHIFT)
    # prefix is now the count-th largest key, and need how many of the keys equal to it are taken
    n_out = tl.zeros([], tl.int32)
    n_eq = tl.zeros([], tl.int32)
    for c0 in range(0, S, BLOCK):
        j = c0 + tl.arange(0, BLOCK)
        s = tl.load(row + j, mask=j < S, other=float("-inf"))
        key = _ordered(s)
        live = s > float("-inf")
        eq = (live & (key == prefix)).to(tl.int32)
        sel = (live & (key > prefix)) | ((eq != 0) & (n_eq + tl.cumsum(eq, 0) <= need))
        slot = n_out + tl.cumsum(sel.to(tl.int32), 0) - 1
        tl.store(idx_ptr + b * K + slot, j.to(tl.int64), mask=sel)
        n_out += tl.sum(sel.to(tl.int32), 0)
        n_eq += tl.sum(eq, 0)
    for k0 in range(0, K, BLOCK):
        k = k0 + tl.arange(0, BLOCK)
        tl.store(keep_ptr + b * K + k, k < count, mask=k < K)
        tl.store(idx_ptr + b * K + k, tl.zeros([BLOCK], tl.int64), mask=(k >= count) & (k < K))


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
    assert scores.dtype == torch.float32 and scores.is_contiguous() and budget.shape == (B,)
    block = min(8192, triton.next_power_of_2(max(S, 16))) if scores.is_cuda else 64
    torch.library.wrap_triton(_select_kernel)[(B,)](scores, budget, idx, keep, S, idx.shape[1], BLOCK=block,
                                                    num_warps=8 if scores.is_cuda else 1)


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
    from triton.testing import do_bench
    for B, S in [(8, 4096), (16, 4096), (8, 8192), (8, 16384), (1, 32768), (8, 32768)]:
        k = S // 8 - 80
        s = torch.randn(B, S, device="cuda")
        s[:, :16] = s[:, -64:] = float("-inf")
        n = torch.full((B,), k, device="cuda")
        idx, keep = select_top(s, n, k)
        ref = s.topk(k, dim=-1).indices.sort(-1).values
        same = torch.equal(idx, ref) and bool(keep.all())
        t = do_bench(lambda: select_top(s, n, k), return_mode="median")
        t_ref = do_bench(lambda: s.topk(k, dim=-1), return_mode="median")
        print(f"B={B} S={S} k={k}: select_top {t * 1e3:.1f} us, torch.topk {t_ref * 1e3:.1f} us, same set: {same}")
