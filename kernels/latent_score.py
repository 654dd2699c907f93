"""SALS step 3 as one Triton kernel: the latent score of every compressed token, and the coarse histogram of the
scores' ranking keys from which the selection (kernels/topk.py) starts.

    s[b, q, j] = q_lat[b, bucket(pos[b] - j), q] . k_lat_score[b, j]   for n_sink <= j <= pos[b] - window, else -inf

q_lat (B, NB, NQ, r*) holds NQ rankings (1 per layer, or 1 per KV head) and NB distance buckets (token j at
distance d ranks by bucket min(floor(log2(d / window)), NB - 1), as sals_attention.distance_bucket). A program
reads the r* prefix of BLOCK_S tokens once, scores the tile against all NB x NQ queries and keeps each token's own
bucket: the latents cost the same bytes whatever NB and NQ are; tokens past pos - window are never read. Products
of 16-bit numbers are exact in float32 and the sums are float32, as in the reference.

Ranking key (kernels/ranking.py): the selection ranks the float32 scores by their order-preserving integer cut to
its top 16 bits (the score truncated to bfloat16's precision), `desc` in [0, 65535], 0 for the largest. Each program adds the histogram of desc >> 8 (256 coarse bins) over its candidates to the row's bins in
global memory (integer atomics: the sums do not depend on the order).

    python -m kernels.latent_score          # micro-benchmark on a GPU
"""
import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _desc16(s):
    """float32 scores -> ranking keys, int32 in [0, 65535], 0 for the largest (kernels.ranking.ranking_key): the
    float's bits as an order-preserving int32 (negative floats' low 31 bits flipped), its top 16 bits, reversed."""
    bits = s.to(tl.int32, bitcast=True)
    return 32767 - ((bits ^ ((bits >> 31) & 0x7FFFFFFF)) >> 16)


@triton.jit
def _latent_score_kernel(k_ptr, q_ptr, pos_ptr, out_ptr, hist_ptr, S, n_sink, window, stride_kb, stride_ks,
                         stride_qb, stride_qn, stride_qq, stride_h, RS: tl.constexpr, NB: tl.constexpr,
                         NQ: tl.constexpr, NBP: tl.constexpr, NQP: tl.constexpr, BLOCK_S: tl.constexpr,
                         BLOCK_R: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    b, blk = tl.program_id(0), tl.program_id(1)
    j = blk * BLOCK_S + tl.arange(0, BLOCK_S)  # (BLOCK_S,) token positions
    pos = tl.load(pos_ptr + b)
    last = pos - window  # the newest compressed token outside the window
    cand = (j >= n_sink) & (j <= last) & (j < S)
    col = tl.arange(0, NBP * NQP)  # query columns: bucket col // NQP, ranking col % NQP (padded to powers of 2)
    q_col = q_ptr + b.to(tl.int64) * stride_qb + (col // NQP) * stride_qn + (col % NQP) * stride_qq
    col_ok = (col // NQP < NB) & (col % NQP < NQ)
    acc = tl.zeros([BLOCK_S, NBP * NQP], dtype=tl.float32)
    if blk * BLOCK_S <= last:  # blocks wholly past the candidates read nothing
        for r0 in range(0, RS, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            k = tl.load(k_ptr + b.to(tl.int64) * stride_kb + j[:, None] * stride_ks + r[None, :],
                        mask=cand[:, None] & (r[None, :] < RS), other=0.0).to(tl.float32)  # (BLOCK_S, BLOCK_R)
            q = tl.load(q_col[None, :] + r[:, None], mask=col_ok[None, :] & (r[:, None] < RS),
                        other=0.0).to(tl.float32)  # (BLOCK_R, NBP * NQP)
            if DOT:  # 16-bit inputs are exact in tf32, so only float32 ones need "ieee"
                acc = tl.dot(k, q, acc, input_precision=PREC)
            else:
                acc += tl.sum(k[:, :, None] * q[None, :, :], axis=1)
    bucket = tl.zeros([BLOCK_S], dtype=tl.int32)  # min(floor(log2(d / window)), NB - 1), 0 below the window
    for i in tl.static_range(1, NB):
        bucket += (pos - j >= window * (1 << i)).to(tl.int32)
    mine = tl.arange(0, NBP)[None, :, None] == bucket[:, None, None]
    s = tl.max(tl.where(mine, tl.reshape(acc, (BLOCK_S, NBP, NQP)), float("-inf")), axis=1)  # max keeps -0.0
    s = tl.where(cand[:, None], s, float("-inf"))  # (BLOCK_S, NQP)
    qq = tl.arange(0, NQP)
    row = b * NQ + qq  # (NQP,)
    tl.store(out_ptr + row[None, :].to(tl.int64) * S + j[:, None], s, mask=(j[:, None] < S) & (qq[None, :] < NQ))
    coarse = _desc16(s) >> 8
    live = cand[:, None] & (s > float("-inf"))  # a candidate whose score is a number
    bins = tl.arange(0, 256)
    for qi in tl.static_range(NQ):  # one 256-bin histogram per ranking (one of NQ x 256 bins costs more)
        h = tl.histogram(tl.max(tl.where(qq[None, :] == qi, coarse, 0), axis=1), 256,
                         mask=tl.max(tl.where(qq[None, :] == qi, live.to(tl.int32), 0), axis=1) > 0)
        tl.atomic_add(hist_ptr + (b * NQ + qi) * stride_h + bins, h, mask=h > 0, sem="relaxed")


def query_shape(k_lat_score: Tensor, q_lat: Tensor) -> tuple[int, int]:
    """(NB, NQ) of q_lat (B, NB, NQ, r*), checked against k_lat_score (B, S, r*)."""
    B, _, RS = k_lat_score.shape
    if q_lat.dim() != 4 or q_lat.shape[0] != B or q_lat.shape[3] != RS:
        raise ValueError(f"q_lat has shape {tuple(q_lat.shape)}, expected (B, n_buckets, n_rankings, r*) with "
                         f"B = {B} and r* = {RS} as in k_lat_score; add the missing axes with q_lat.view(...).")
    return q_lat.shape[1], q_lat.shape[2]


def launch_latent_scores(k_lat_score: Tensor, q_lat: Tensor, input_pos: Tensor, n_sink: int, window: int,
                         scores: Tensor, hist: Tensor, block_s: int = 32, block_r: int = 64, dot: bool | None = None,
                         num_warps: int = 4):
    """Scores into scores (B, NQ, S) float32 (-inf outside n_sink <= j <= pos - window), and each row's coarse key
    histogram added into hist[:, :256] ((B * NQ, >= 256) int32, zero on entry; kernels.topk.select_state).
    k_lat_score (B, S, r*), q_lat (B, NB, NQ, r*) (channels contiguous), input_pos (B, 1) the new token's position.
    Launch settings: block_s tokens per program, block_r channels per step; dot: tl.dot over the NB x NQ queries
    (default when there are several; else a multiply-and-sum, whose (block_s, block_r, NB x NQ) product must fit in
    registers)."""
    B, S, RS = k_lat_score.shape
    NB, NQ = query_shape(k_lat_score, q_lat)
    if k_lat_score.stride(2) != 1 or q_lat.stride(3) != 1:
        raise ValueError("k_lat_score and q_lat must have contiguous channels (stride 1 in the last axis).")
    if scores.shape != (B, NQ, S) or scores.dtype != torch.float32 or not scores.is_contiguous():
        raise ValueError(f"scores must be a contiguous ({B}, {NQ}, {S}) float32 tensor, got {tuple(scores.shape)} "
                         f"{scores.dtype}.")
    if hist.shape[0] != B * NQ or hist.shape[1] < 256 or hist.dtype != torch.int32 or hist.stride(1) != 1:
        raise ValueError(f"hist must be ({B * NQ}, >= 256) int32 with contiguous rows (kernels.topk.select_state), "
                         f"got {tuple(hist.shape)} {hist.dtype}.")
    dot = NB * NQ > 1 if dot is None else dot
    NBP, NQP = triton.next_power_of_2(NB), triton.next_power_of_2(NQ)
    if dot:  # tl.dot needs 16 columns or more: pad with empty buckets
        NBP, block_s, block_r = max(NBP, 16 // NQP), max(block_s, 16), max(block_r, 16)
    block_r = min(block_r, max(16 if dot else 1, triton.next_power_of_2(RS)))
    fp32 = torch.float32 in (k_lat_score.dtype, q_lat.dtype)
    torch.library.wrap_triton(_latent_score_kernel)[(B, triton.cdiv(S, block_s))](
        k_lat_score, q_lat, input_pos.reshape(B), scores, hist, S, n_sink, window, k_lat_score.stride(0),
        k_lat_score.stride(1), q_lat.stride(0), q_lat.stride(1), q_lat.stride(2), hist.stride(0), RS=RS, NB=NB, NQ=NQ,
        NBP=NBP, NQP=NQP, BLOCK_S=block_s, BLOCK_R=block_r, DOT=dot, PREC="ieee" if fp32 else "tf32",
        num_warps=num_warps)


def latent_scores_reference(k_lat_score: Tensor, q_lat: Tensor, input_pos: Tensor, n_sink: int,
                            window: int) -> Tensor:
    """The scores in float32 PyTorch (SALSCache.scores + the candidate mask of SALSCache.select): (B, NQ, S)."""
    B, S, _ = k_lat_score.shape
    NB = q_lat.shape[1]
    s = (k_lat_score.float() @ q_lat.float().flatten(1, 2).transpose(1, 2))  # (B, S, NB * NQ)
    s = s.transpose(1, 2).unflatten(1, q_lat.shape[1:3])  # (B, NB, NQ, S)
    d = input_pos.reshape(B, 1) - torch.arange(S, device=s.device)  # (B, S) distances
    edges = window * 2 ** torch.arange(1, NB, device=s.device)  # bucket i: window 2^i <= d < window 2^(i+1)
    bucket = (d[..., None] >= edges).sum(-1)  # (B, S)
    s = s.gather(1, bucket[:, None, None].expand(B, 1, s.shape[2], S))[:, 0]
    j = torch.arange(S, device=s.device)
    return s.masked_fill(((j < n_sink) | (d < window))[:, None], float("-inf"))


if __name__ == "__main__":
    import sys

    from kernels.timing import copy_ceiling, graph_us

    def bench_case(B: int, S: int, RS: int, NB: int, NQ: int, **cfg) -> tuple[float, float, float]:
        """(us, floor us, max relative error) of the scoring kernel on random bf16 latents, every row at position
        S - 1 (n_sink 16, window 64), with launch settings cfg; the hist accumulates over replays (harmless)."""
        k = torch.randn(B, S, RS, device="cuda", dtype=torch.bfloat16)
        q = torch.randn(B, NB, NQ, RS, device="cuda", dtype=torch.bfloat16)
        pos = torch.full((B, 1), S - 1, device="cuda")
        out = torch.empty(B, NQ, S, device="cuda")
        hist = torch.zeros(B * NQ, 256, dtype=torch.int32, device="cuda")
        launch_latent_scores(k, q, pos, 16, 64, out, hist, **cfg)
        ref = latent_scores_reference(k, q, pos, 16, 64)
        ok = ref.isfinite()
        assert torch.equal(out.isfinite(), ok) and int(hist.sum()) == int(ok.sum()), "wrong candidates or histogram"
        err = float(((out - ref).abs() / ref.abs().amax(-1, keepdim=True))[ok].max())
        t = graph_us(lambda: launch_latent_scores(k, q, pos, 16, 64, out, hist, **cfg))
        return t, (int(ok[:, 0].sum()) * RS * 2 + out.numel() * 4) / copy_ceiling() * 1e6, err

    print("scoring: random bf16 latents, n_sink 16, window 64, every row at the end; floor: the candidates' r* "
          "prefix read and the scores written at the copy ceiling")
    if sys.argv[1:] == ["sweep"]:  # launch settings, NB = NQ = 1
        print("| B | S | r* | block_s | block_r | dot | warps | us | of floor |\n" + "| --- " * 9 + "|")
        for B, S, RS in [(1, 4096, 64), (1, 4096, 256), (16, 32768, 64), (16, 32768, 256), (8, 131072, 64)]:
            for block_s in (16, 32, 64, 128):
                for block_r in (32, 64, 128):
                    for dot in (False, True):
                        for warps in (4, 8):
                            t, floor, _ = bench_case(B, S, RS, 1, 1, block_s=block_s, block_r=block_r, dot=dot,
                                                     num_warps=warps)
                            print(f"| {B} | {S} | {RS} | {block_s} | {block_r} | {dot} | {warps} | {t:.1f} | "
                                  f"{floor / t:.0%} |", flush=True)
    else:
        print("| B | S | r* | NQ | NB | us | floor us | of floor | max rel err |\n" + "| --- " * 9 + "|")
        for RS in (64, 256):
            for NQ, NB in ((1, 1), (8, 1), (1, 6)):
                for B in (1, 8, 16):
                    for S in (4096, 8192, 16384, 32768, 131072):
                        t, floor, err = bench_case(B, S, RS, NB, NQ)
                        print(f"| {B} | {S} | {RS} | {NQ} | {NB} | {t:.1f} | {floor:.1f} | {floor / t:.0%} | "
                              f"{err:.1e} |", flush=True)
