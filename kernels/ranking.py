"""The ranking and selection rules of a SALS decode step in PyTorch, without Triton: the references of
kernels/bucket_query.py and kernels/topk.py, and what the PyTorch decode path (sals_attention) and calibrate.py can
import without initializing Triton.

Ranking with RoPE's mean rotation ("bucket-rope"): a candidate's post-RoPE logit depends on its distance to the query,
which is unknown before its key is rebuilt; the query is rotated instead by the mean of RoPE's rotation over the
distances of the candidate's distance bucket (mean_rotation, bucket_rotations).

Selection:
A row of float32 scores (-inf: not a candidate) selects its n = min(budget, k, #candidates) candidates with the best
ranking keys, and among equal keys the earliest positions. The ranking key is the score's float32 bits as an
order-preserving integer, cut to its top 16 bits (the score truncated to bfloat16's precision, under 0.8% relative:
far below the latent ranking's own error), so near-equal scores tie exactly and the order never depends on float32
rounding below that precision.
"""
import math

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


def mean_rotation(inv_freq: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """The mean RoPE rotation over the integer distances lo..hi (float64 (...), hi >= lo) as a (..., Dh/2, 2)
    float32 (cos, sin) table for model.apply_rope; inv_freq (Dh/2,) float64.

    Per frequency pair, the post-RoPE logit is q_rot(d).k with q_rot(d) = q rotated by d * theta, d = pos - j
    (the pre-RoPE ranking takes d = 0). d is unknown without rebuilding the key, so take its mean over a range of
    distances: mean e^(i theta d) = e^(i theta m) sin(n theta/2) / (n sin(theta/2)), m the middle distance, n how
    many there are. Pairs fast for that range average out (their factor tends to 0) and slow ones stay; theta in
    (0, 1] keeps sin(theta/2) away from 0."""
    n, mid = (hi - lo + 1)[..., None], ((hi + lo) / 2)[..., None]
    damp = torch.sin(n * inv_freq / 2) / (n * torch.sin(inv_freq / 2))  # (..., Dh/2) Dirichlet kernel
    return torch.stack([(mid * inv_freq).cos() * damp, (mid * inv_freq).sin() * damp], -1).float()


def bucket_rotations(inv_freq: Tensor, input_pos: Tensor, sink: int, window: int, n: int) -> Tensor:
    """(b, n, Dh/2, 2): mean_rotation per distance bucket i, the distances window 2^i .. window 2^(i+1) - 1 (the
    last bucket: up to the end), clipped to the candidates' window..pos - sink of a query at input_pos (b, 1); with
    n = 1, d uniform on window..pos - sink. Tensor ops only: no host sync, static shapes."""
    lo = window * 2.0 ** torch.arange(n, dtype=torch.float64, device=input_pos.device)  # (n,)
    last = (input_pos - sink).double().clamp(min=window)  # (b, 1)
    hi = torch.cat([lo[1:] - 1, torch.full_like(lo[:1], math.inf)]).minimum(last)  # (b, n)
    return mean_rotation(inv_freq, lo.minimum(hi), hi)  # empty buckets (lo > last) rank nothing: any table
