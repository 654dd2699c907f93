"""The selection rule of a SALS decode step in PyTorch, without Triton: the reference of kernels/topk.py, and what
the PyTorch decode path (sals_attention) can import without initializing Triton.

A row of float32 scores (-inf: not a candidate) selects its n = min(budget, k, #candidates) candidates with the best
ranking keys, and among equal keys the earliest positions. The ranking key is the score's float32 bits as an
order-preserving integer, cut to its top 16 bits (the score truncated to bfloat16's precision, under 0.8% relative:
far below the latent ranking's own error), so near-equal scores tie exactly and the order never depends on float32
rounding below that precision.
"""
import torch
from torch import Tensor


def ranking_key(s: Tensor) -> Tensor:
    """float32 scores (...) -> int32 keys (...) in [0, 65535], smaller for larger scores (-0.0 after 0.0); the
    kernels' _desc16."""
    bits = s.float().view(torch.int32)
    return 32767 - ((bits ^ ((bits >> 31) & 0x7FFFFFFF)) >> 16)


def select_top_reference(scores: Tensor, budget: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The rule by brute force (integer keys, no float arithmetic): scores (B, ..., S) float32, budget (B,) integer
    (may be <= 0 or > k), k <= S. Returns idx (B, ..., k) int64, the selected positions ascending, then 0, and keep
    (B, ..., k) bool, which slots are selected. Ranks by (key, position), unique, with torch.topk."""
    S = scores.shape[-1]
    j = torch.arange(S, device=scores.device)
    live = scores > float("-inf")
    order = (ranking_key(scores).long() * S + j).masked_fill(~live, 1 << 40)  # smaller: ranked first
    first = order.topk(k, dim=-1, largest=False).indices  # best first
    n = torch.minimum(budget.clamp(min=0, max=k).view(-1, *(1,) * (scores.dim() - 2)), live.sum(-1))  # (B, ...)
    keep = torch.arange(k, device=scores.device) < n[..., None]
    idx = torch.where(keep, first, S).sort(-1).values  # the selected positions ascending, then S
    return idx.masked_fill(~keep, 0), keep
