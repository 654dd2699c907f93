"""SALS step 3 as one Triton kernel: the latent score of every compressed token of every sequence.

    s[b, j] = q_lat[b] . k_lat_score[b, j]   for n_sink <= j <= pos[b] - window, else -inf

A GEMV per sequence: it reads the r* prefix of each candidate once (tokens past pos - window are
never read) and accumulates in float32. Scores stay float32 so that near-ties rank the same way as
the float32 reference; torch.topk on them is the next step.

    python -m kernels.latent_score          # micro-benchmark on a GPU (B=16, S=4K and B=8, S=32K, r*=256)
"""
import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _latent_score_kernel(k_ptr, q_ptr, pos_ptr, out_ptr, S, n_sink, window, stride_kb, stride_ks, stride_qb,
                         RS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr):
    b, blk = tl.program_id(0), tl.program_id(1)
    j = blk * BLOCK_S + tl.arange(0, BLOCK_S)  # (BLOCK_S,) token positions
    last = tl.load(pos_ptr + b) - window  # the newest compressed token outside the window
    cand = (j >= n_sink) & (j <= last)
    acc = tl.zeros([BLOCK_S], dtype=tl.float32)
    if blk * BLOCK_S <= last:  # blocks wholly past the candidates read nothing
        for r0 in range(0, RS, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            q = tl.load(q_ptr + b * stride_qb + r, mask=r < RS, other=0.0).to(tl.float32)
            k = tl.load(k_ptr + b * stride_kb + j[:, None] * stride_ks + r[None, :],
                        mask=cand[:, None] & (r[None, :] < RS), other=0.0)
            acc += tl.sum(k.to(tl.float32) * q[None, :], axis=1)
    tl.store(out_ptr + b * S + j, tl.where(cand, acc, float("-inf")), mask=j < S)


@torch.library.triton_op("sals::latent_scores", mutates_args=())
def latent_scores(k_lat_score: Tensor, q_lat: Tensor, input_pos: Tensor, n_sink: int, window: int) -> Tensor:
    """k_lat_score (B, S, r*) 16-bit, q_lat (B, r*), input_pos (B, 1) the new token's position.
    Returns (B, S) float32 scores, -inf outside n_sink <= j <= pos - window."""
    B, S, _ = k_lat_score.shape
    out = torch.empty(B, S, dtype=torch.float32, device=k_lat_score.device)
    launch_latent_scores(k_lat_score, q_lat, input_pos, n_sink, window, out)
    return out


def launch_latent_scores(k_lat_score: Tensor, q_lat: Tensor, input_pos: Tensor, n_sink: int, window: int, out: Tensor):
    """latent_scores into out (B, S) float32 (tests pass a buffer poisoned with NaN)."""
    B, S, RS = k_lat_score.shape
    assert k_lat_score.stride(2) == 1 and q_lat.stride(1) == 1 and out.is_contiguous(), "rows must be contiguous"
    BLOCK_S, BLOCK_R = 64, min(128, triton.next_power_of_2(RS))
    torch.library.wrap_triton(_latent_score_kernel)[(B, triton.cdiv(S, BLOCK_S))](
        k_lat_score, q_lat, input_pos.reshape(B), out, S, n_sink, window, k_lat_score.stride(0),
        k_lat_score.stride(1), q_lat.stride(0), RS=RS, BLOCK_S=BLOCK_S, BLOCK_R=BLOCK_R, num_warps=4)


def latent_scores_reference(k_lat_score: Tensor, q_lat: Tensor, input_pos: Tensor, n_sink: int, window: int) -> Tensor:
    """The same in float32 PyTorch (SALSCache.scores + the candidate mask of SALSCache.select)."""
    s = (k_lat_score.float() @ q_lat.float()[:, :, None])[..., 0]
    j = torch.arange(s.shape[1], device=s.device)
    return s.masked_fill((j < n_sink) | (j > input_pos.reshape(-1, 1) - window), float("-inf"))


if __name__ == "__main__":
    from triton.testing import do_bench
    for B, S, RS in [(16, 4096, 256), (8, 32768, 256), (8, 32768, 64)]:
        k = torch.randn(B, S, RS, device="cuda", dtype=torch.bfloat16)
        q = torch.randn(B, RS, device="cuda", dtype=torch.bfloat16)
        pos = torch.full((B, 1), S - 1, device="cuda")
        err = (latent_scores(k, q, pos, 16, 64) - latent_scores_reference(k, q, pos, 16, 64))[:, 16:S - 64].norm()
        t = do_bench(lambda: latent_scores(k, q, pos, 16, 64))
        print(f"B={B} S={S} r*={RS}: {t * 1e3:.1f} us, {k.numel() * 2 / t / 1e9:.2f} TB/s, "
              f"rel err {err / latent_scores_reference(k, q, pos, 16, 64)[:, 16:S - 64].norm():.1e}")
