"""SALS step 3 as one Triton kernel: the latent score of every compressed token, and the coarse histogram of the
scores' ranking keys from which the selection (kernels/topk.py) starts.

    s[b, q, j] = q_lat[b, bucket(pos[b] - j), q] . k_lat_score[b, j]   for n_sink <= j <= pos[b] - window, else -inf

q_lat (B, NB, NQ, r*) holds NQ rankings (1 per layer, or 1 per KV head) and NB distance buckets (token j at
distance d ranks by bucket min(floor(log2(d / window)), NB - 1), as sals_attention.distance_bucket). A program
scores BLOCK_S consecutive tokens and reads their r* prefix once (tokens past pos - window are never read). Buckets
are contiguous position ranges, so a block spans a few of them at most (mostly one): the program multiplies the
tile only by the queries of the buckets present, (BLOCK_S, r*) @ (r*, NQ) for each, and keeps each token's own.
The work per token is then that of one bucket whatever NB is, and the accumulator is (BLOCK_S, NQ) whatever NB is.
16-bit latents and queries of one type go to the tensor cores as they are: their products are exact and the sums
float32, as in the reference; float32 ones take the exact "ieee" path.

Ranking key (kernels/ranking.py): the selection ranks the float32 scores by their order-preserving integer cut to
its top 16 bits (the score truncated to bfloat16's precision), `desc` in [0, 65535], 0 for the largest. Each program
adds, for each ranking, the histogram of desc >> 8 (256 coarse bins) over its candidates to the row's bins in global
memory, only the bins it hit (integer atomics: the sums do not depend on the order). A histogram costs about the
same whether it counts 32 tokens or 128 (one per thread at 4 warps), and scores cluster in a few coarse bins, so
blocks of 128 tokens make the histograms and their atomics cheap per token; the histograms take the block's scores
back from L2 (see the kernel) rather than from the tensor cores' layout, which holds each score in 4 threads.

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
def _bucket(d, window, NB: tl.constexpr):
    """Distance buckets of distances d (a tensor or a scalar): min(floor(log2(d / window)), NB - 1), 0 below
    2 window (sals_attention.distance_bucket)."""
    bucket = tl.zeros_like(d).to(tl.int32)
    for i in tl.static_range(1, NB):
        bucket += (d >= window * (1 << i)).to(tl.int32)
    return bucket


@triton.jit
def _latent_score_kernel(k_ptr, q_ptr, pos_ptr, out_ptr, hist_ptr, S, n_sink, window, stride_kb, stride_ks,
                         stride_qb, stride_qn, stride_qq, stride_h, RS: tl.constexpr, NB: tl.constexpr,
                         NQ: tl.constexpr, NQP: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr,
                         DOT: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    b, blk = tl.program_id(0), tl.program_id(1)
    j = blk * BLOCK_S + tl.arange(0, BLOCK_S)  # (BLOCK_S,) token positions
    pos = tl.load(pos_ptr + b)
    cand = (j >= n_sink) & (j <= pos - window) & (j < S)  # pos - window: the newest token outside the window
    bucket = _bucket(pos - j, window, NB)  # (BLOCK_S,)
    # the buckets of the block's candidates first..last: b_lo..b_hi (distances fall as j grows)
    first = tl.maximum(blk * BLOCK_S, n_sink)
    last = tl.minimum(tl.minimum(blk * BLOCK_S + BLOCK_S, S) - 1, pos - window)
    b_lo, b_hi = _bucket(pos - last, window, NB), _bucket(pos - first, window, NB)
    qq = tl.arange(0, NQP)  # rankings (padded to a power of 2, 16 or more for tl.dot)
    k_blk = k_ptr + b.to(tl.int64) * stride_kb + j[:, None] * stride_ks  # (BLOCK_S, 1)
    q_blk = q_ptr + b.to(tl.int64) * stride_qb + qq[None, :] * stride_qq  # (1, NQP)
    s = tl.full([BLOCK_S, NQP], float("-inf"), dtype=tl.float32)
    for bk in range(NB):
        if (first <= last) & (b_lo <= bk) & (bk <= b_hi):  # a bucket of the block's candidates (mostly the only one)
            acc = tl.zeros([BLOCK_S, NQP], dtype=tl.float32)  # the block's tokens by bucket bk's queries
            for r0 in range(0, RS, BLOCK_R):
                r = r0 + tl.arange(0, BLOCK_R)
                k = tl.load(k_blk + r[None, :], mask=cand[:, None] & (r[None, :] < RS),
                            other=0.0)  # (BLOCK_S, BLOCK_R)
                q = tl.load(q_blk + bk * stride_qn + r[:, None], mask=(qq[None, :] < NQ) & (r[:, None] < RS),
                            other=0.0)  # (BLOCK_R, NQP)
                if DOT:
                    if UPCAST:  # float32 products (launch_latent_scores says when)
                        k, q = k.to(tl.float32), q.to(tl.float32)
                    acc = tl.dot(k, q, acc, input_precision=PREC)
                else:
                    acc += tl.sum(k.to(tl.float32)[:, :, None] * q.to(tl.float32)[None, :, :], axis=1)
            s = tl.where(((bucket == bk) & cand)[:, None], acc, s)  # (BLOCK_S, NQP), -inf off the candidates
    row = b * NQ + qq  # (NQP,)
    tl.store(out_ptr + row[None, :].to(tl.int64) * S + j[:, None], s, mask=(j[:, None] < S) & (qq[None, :] < NQ))
    # The histograms count the scores read back (from L2), not the tile: the tensor cores leave each token's score
    # in 4 threads, and a histogram counts every copy (4x the work); loaded, a ranking's BLOCK_S scores are spread
    # over the threads once each when BLOCK_S >= 32 num_warps. Volatile: the compiler keeps these loads after the
    # barrier and in program order (plain ones it may move), so each is issued ahead of the previous histogram.
    tl.debug_barrier()  # the block's stored scores visible to all its threads
    rows = out_ptr + (b * NQ).to(tl.int64) * S + j  # (BLOCK_S,) ranking 0's scores of the block
    bins = tl.arange(0, 256)
    nxt = tl.load(rows, mask=j < S, other=float("-inf"), volatile=True)
    for qi in tl.static_range(NQ):  # one 256-bin histogram per ranking (one of NQ x 256 bins costs more)
        s_q = nxt  # (BLOCK_S,)
        if qi + 1 < NQ:  # the next ranking's scores load while this one's are counted
            nxt = tl.load(rows + (qi + 1) * S, mask=j < S, other=float("-inf"), volatile=True)
        h = tl.histogram(_desc16(s_q) >> 8, 256, mask=s_q > float("-inf"))  # the candidates' scores only
        tl.atomic_add(hist_ptr + (b * NQ + qi) * stride_h + bins, h, mask=h > 0, sem="relaxed")


def query_shape(k_lat_score: Tensor, q_lat: Tensor) -> tuple[int, int]:
    """(NB, NQ) of q_lat (B, NB, NQ, r*), checked against k_lat_score (B, S, r*)."""
    B, _, RS = k_lat_score.shape
    if q_lat.dim() != 4 or q_lat.shape[0] != B or q_lat.shape[3] != RS:
        raise ValueError(f"q_lat has shape {tuple(q_lat.shape)}, expected (B, n_buckets, n_rankings, r*) with "
                         f"B = {B} and r* = {RS} as in k_lat_score; add the missing axes with q_lat.view(...).")
    return q_lat.shape[1], q_lat.shape[2]


def launch_latent_scores(k_lat_score: Tensor, q_lat: Tensor, input_pos: Tensor, n_sink: int, window: int,
                         scores: Tensor, hist: Tensor, block_s: int = 128, block_r: int = 64, dot: bool = True,
                         num_warps: int = 4):
    """Scores into scores (B, NQ, S) float32 (-inf outside n_sink <= j <= pos - window), and each row's coarse key
    histogram added into hist[:, :256] ((B * NQ, >= 256) int32, zero on entry; kernels.topk.select_state).
    k_lat_score (B, S, r*), q_lat (B, NB, NQ, r*) (channels contiguous), input_pos (B, 1) the new token's position.
    Launch settings: block_s tokens per program (a ranking's histogram costs about the same for any block up to
    32 num_warps tokens, one per thread: larger blocks make it and its atomics cheaper per token, for a larger
    accumulator), block_r channels per step; dot: tl.dot against a bucket's NQ queries (else a multiply-and-sum, whose
    (block_s, block_r, NQ) product must fit in registers: a third as many instructions with tl.dot, even at NQ = 1)."""
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
    NQP = triton.next_power_of_2(NQ)
    if dot:  # tl.dot needs 16 rows, columns and channels or more: pad with empty rankings
        NQP, block_s, block_r = max(NQP, 16), max(block_s, 16), max(block_r, 16)
    block_r = min(block_r, max(16 if dot else 1, triton.next_power_of_2(RS)))
    # One 16-bit type on a GPU goes to the tensor cores as is: exact products, float32 sums. Else float32 products:
    # "ieee" for float32 inputs; tf32 is exact for 16-bit values (a bfloat16 x float16 mix, or bfloat16 in Triton's
    # interpreter, which multiplies bfloat16 as raw integers).
    upcast = not (k_lat_score.is_cuda and k_lat_score.dtype == q_lat.dtype and
                  q_lat.dtype in (torch.bfloat16, torch.float16))
    prec = "ieee" if {k_lat_score.dtype, q_lat.dtype} - {torch.bfloat16, torch.float16} else "tf32"
    torch.library.wrap_triton(_latent_score_kernel)[(B, triton.cdiv(S, block_s))](
        k_lat_score, q_lat, input_pos.reshape(B), scores, hist, S, n_sink, window, k_lat_score.stride(0),
        k_lat_score.stride(1), q_lat.stride(0), q_lat.stride(1), q_lat.stride(2), hist.stride(0), RS=RS, NB=NB, NQ=NQ,
        NQP=NQP, BLOCK_S=block_s, BLOCK_R=block_r, DOT=dot, UPCAST=upcast, PREC=prec, num_warps=num_warps)


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

    from kernels.ranking import ranking_key
    from kernels.timing import copy_ceiling, graph_us

    def bench_case(B: int, S: int, RS: int, NB: int, NQ: int, **cfg) -> tuple[float, float, float]:
        """(us, floor us, max relative error) of the scoring kernel on random bf16 latents, every row at position
        S - 1 (n_sink 16, window 64), with launch settings cfg; the histogram checked against a count of the scores'
        keys (then it accumulates over the replays: harmless)."""
        k = torch.randn(B, S, RS, device="cuda", dtype=torch.bfloat16)
        q = torch.randn(B, NB, NQ, RS, device="cuda", dtype=torch.bfloat16)
        pos = torch.full((B, 1), S - 1, device="cuda")
        out = torch.empty(B, NQ, S, device="cuda")
        hist = torch.zeros(B * NQ, 256, dtype=torch.int32, device="cuda")
        launch_latent_scores(k, q, pos, 16, 64, out, hist, **cfg)
        ref = latent_scores_reference(k, q, pos, 16, 64)
        ok = ref.isfinite()
        assert torch.equal(out.isfinite(), ok), "wrong candidates"
        bins = (ranking_key(out).long() >> 8) + 256 * torch.arange(B * NQ, device="cuda").view(B, NQ, 1)
        assert torch.equal(hist.view(-1).long(), torch.bincount(bins[ok], minlength=B * NQ * 256)), "wrong histogram"
        err = float(((out - ref).abs() / ref.abs().amax(-1, keepdim=True))[ok].max())
        t = graph_us(lambda: launch_latent_scores(k, q, pos, 16, 64, out, hist, **cfg))
        return t, (int(ok[:, 0].sum()) * RS * 2 + out.numel() * 4) / copy_ceiling() * 1e6, err

    print("scoring: random bf16 latents, n_sink 16, window 64, every row at the end; floor: the candidates' r* "
          "prefix read and the scores written at the copy ceiling")
    # (r*, NQ, NB): one ranking per layer, without and with distance buckets; the defaults' rankings per KV head,
    # Mistral-7B (8 KV heads, r* 64, 9 buckets at 32K) and Llama-2-7B (32 KV heads, r* 256, 10 buckets)
    SHAPES = [(64, 1, 1), (64, 1, 9), (64, 8, 1), (64, 8, 9), (256, 1, 1), (256, 32, 1), (256, 32, 10)]
    if sys.argv[1:] == ["sweep"]:  # launch settings, at B = 8, S = 32768
        print("| r* | NQ | NB | block_s | block_r | warps | us | of floor |\n" + "| --- " * 8 + "|")
        for RS, NQ, NB in SHAPES:
            for block_s in (64, 128, 256):
                for block_r in (32, 64, 128):
                    for warps in (4, 8):
                        t, floor, _ = bench_case(8, 32768, RS, NB, NQ, block_s=block_s, block_r=block_r,
                                                 num_warps=warps)
                        print(f"| {RS} | {NQ} | {NB} | {block_s} | {block_r} | {warps} | {t:.1f} | "
                              f"{floor / t:.0%} |", flush=True)
    else:
        print("| B | S | r* | NQ | NB | us | floor us | of floor | max rel err |\n" + "| --- " * 9 + "|")
        for RS, NQ, NB in SHAPES:
            for B in (1, 8, 16):
                for S in (4096, 8192, 16384, 32768, 131072):
                    t, floor, err = bench_case(B, S, RS, NB, NQ)
                    print(f"| {B} | {S} | {RS} | {NQ} | {NB} | {t:.1f} | {floor:.1f} | {floor / t:.0%} | "
                          f"{err:.1e} |", flush=True)
