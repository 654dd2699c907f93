"""The ranking, scoring and selection kernels (kernels/bucket_query.py, kernels/latent_score.py, kernels/topk.py)
against brute force, run by Triton's
CPU interpreter in a child pytest (conftest.run_interpreted; the parent never imports Triton: kernels/ranking.py,
the rule in PyTorch, is checked in the parent).

Bucket queries: each bucket's mean rotation summed over its distances one by one in float64. Scores: every position
against float64 sums, each token by the query of its own distance bucket
(sals_attention.distance_bucket). Coarse histograms: a brute-force count of the keys of the kernel's own scores.
Selection: the exact rule (kernels/ranking.select_top_reference: integer keys, positions) on crafted scores (ties, equal
scores, signed zeros, floats that differ below the key's precision), its coarse bins counted here, not by the
scoring kernel. Outputs are poisoned (NaN, -7, True) before each kernel runs.
"""
import math
import os

import pytest
import torch

from conftest import run_interpreted
from kernels.ranking import ranking_key, select_top_reference  # no Triton
from sals_attention import distance_bucket

CHILD = os.environ.get("SALS_KERNEL_TESTS") == "child"
SINK, WINDOW = 4, 8


def test_select_kernels_in_triton_interpreter():
    """Runs the check_* functions below (collected as tests in the child) under TRITON_INTERPRET=1."""
    run_interpreted(__file__, N_CHILD_TESTS)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: a second thread only adds synchronisation
    yield
    torch.set_num_threads(n)


def test_ranking_key():
    """ranking_key orders like the floats, and two floats share a key exactly when their bfloat16 truncations
    (the top 16 bits) are equal: -0.0 ranks just after 0.0, infinities at the ends."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1500, generator=gen) * 10.0 ** torch.randint(-44, 39, (1500,), generator=gen).float()
    special = torch.tensor([0.0, -0.0, 1e-45, -1e-45, math.inf, -math.inf, 1.0, 1.0 + 2 ** -8, 1.0 + 2 ** -7])
    x = torch.cat([x, special])
    key, bits = ranking_key(x).long(), x.view(torch.int32).long()
    i, j = torch.triu_indices(len(x), len(x), 1)
    below = (x[i] < x[j]) | ((x[i] == 0) & (x[j] == 0) & (bits[i] < 0) & (bits[j] >= 0))  # -0.0 below 0.0
    assert (key[i][below] >= key[j][below]).all()  # larger floats, smaller (earlier) keys
    assert torch.equal(key[i] == key[j], (bits[i] >> 16) == (bits[j] >> 16))
    assert (key >= 0).all() and (key < 65536).all()
    ks = ranking_key(special).tolist()
    assert ks[4] < ks[8] < ks[6] == ks[7] < ks[0] == ks[2] < ks[1] == ks[3] < ks[5]  # +-1e-45 cut to +-0.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("H,Hkv,Dh,NB", [(4, 4, 16, 1), (8, 2, 16, 4), (6, 2, 24, 3), (8, 1, 32, 6)])
def check_bucket_queries(H, Hkv, Dh, NB, dtype):
    """The bucket-rope queries against float64 brute force: each KV group's query sum (rounded to q's type, as the
    reference's sum) rotated by the mean of e^(i theta d) over bucket i's distances d, summed one by one; rows at
    positions on and beside the buckets' edges, and one with no candidate. Buckets with no distance in range rank
    nothing (any table): checked against bucket_queries_reference only. Bound: float32 within 2^-20 of the row's
    largest value (the table's float32 sine and cosine); bfloat16 within 3 units in the last place of it, because
    Triton's interpreter truncates float32 to bfloat16 where the GPU rounds to nearest: a unit in each of the summed
    halves (carried through |cos| + |sin| <= 2^0.5) and one in the output."""
    from kernels.bucket_query import bucket_queries, bucket_queries_reference
    gen = torch.Generator().manual_seed(H * Dh + NB)
    q = torch.randn(7, H, Dh + 3, generator=gen).to(dtype)[..., :Dh]  # strided rows
    inv_freq = 1.0 / 10000 ** (torch.arange(0, Dh, 2, dtype=torch.float64) / Dh)
    last = [WINDOW * 2 ** (NB - 1) + 37, WINDOW * 4 - 1, WINDOW * 4, WINDOW * 2, WINDOW, WINDOW - 3, 3000]
    pos = torch.tensor(last)[:, None] + SINK  # last = pos - SINK, the oldest candidate's distance
    out = bucket_queries(q, pos, inv_freq, Hkv, SINK, WINDOW, NB).double()
    ref = bucket_queries_reference(q, pos, inv_freq, Hkv, SINK, WINDOW, NB).double()
    ulp = 3 * 2 ** -7 if dtype == torch.bfloat16 else 2 ** -20
    q_sum = q.unflatten(1, (Hkv, -1)).sum(2).double()  # (B, Hkv, Dh), in q's type first
    for b, l in enumerate(last):
        l = max(l, WINDOW)
        for i in range(NB):
            lo, hi = WINDOW * 2 ** i, (WINDOW * 2 ** (i + 1) - 1 if i < NB - 1 else l)
            tol = ulp * ref[b, i].abs().amax() + 1e-30
            assert (out[b, i] - ref[b, i]).abs().max() <= tol
            if lo > l:
                continue
            d = torch.arange(lo, min(hi, l) + 1, dtype=torch.float64)
            angle = d[:, None] * inv_freq  # (n, Dh/2)
            c, s = angle.cos().mean(0), angle.sin().mean(0)
            x1, x2 = q_sum[b, :, :Dh // 2], q_sum[b, :, Dh // 2:]
            want = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1)
            assert (out[b, i] - want).abs().max() <= tol, (b, i)
    with pytest.raises(ValueError, match="inv_freq"):
        bucket_queries(q, pos, inv_freq.float(), Hkv, SINK, WINDOW, NB)


def brute_force_scores(k, q, pos):
    """float64 scores (B, NQ, S) of candidates, each by its distance bucket's query, and the float32 summation
    bound rs * 2^-24 * sum |terms|."""
    B, S, rs = k.shape
    NB = q.shape[1]
    terms = k.double()[:, None, None] * q.double()[:, :, :, None]  # (B, NB, NQ, S, rs)
    bucket = distance_bucket(pos - torch.arange(S), WINDOW, NB)  # (B, S)
    pick = bucket[:, None, None, :, None].expand(B, 1, q.shape[2], S, rs)
    terms = terms.gather(1, pick)[:, 0]  # (B, NQ, S, rs)
    return terms.sum(-1), rs * 2 ** -24 * terms.abs().sum(-1)


@pytest.mark.parametrize("block_s", [32, 128])
@pytest.mark.parametrize("dot", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("NB,NQ", [(1, 1), (1, 3), (4, 1), (3, 2), (4, 8)])
def check_scores_and_histograms(NB, NQ, dtype, dot, block_s):
    """Scores of every position against float64 brute force (-inf exactly outside n_sink <= j <= pos - window;
    rows at different lengths, one with no candidate), several rankings and distance buckets (blocks of 32 and of
    128 tokens, most of them spanning several buckets), strided queries; latent_scores_reference within the same
    bound; the coarse histogram equal to a count of the scores' keys; the rest of the state left alone."""
    from kernels.latent_score import launch_latent_scores, latent_scores_reference
    B, S, rs = 3, 300, 24
    gen = torch.Generator().manual_seed(NB * 10 + NQ)
    k = torch.randn(B, S, rs, generator=gen).to(dtype)
    q = torch.randn(B, NB, NQ, rs + 5, generator=gen).to(dtype)[..., :rs]  # strided rows
    pos = torch.tensor([[S - 1], [150], [10]])
    scores = torch.full((B, NQ, S), float("nan"))
    state = torch.zeros(B * NQ, 288, dtype=torch.int32)
    state[:, 256:] = 12345  # beyond the coarse bins: not the scoring kernel's
    launch_latent_scores(k, q, pos, SINK, WINDOW, scores, state, block_s=block_s, block_r=16, dot=dot)
    ref, bound = brute_force_scores(k, q, pos)
    j = torch.arange(S)
    cand = ((j >= SINK) & (j <= pos - WINDOW))[:, None].expand(B, NQ, S)
    assert torch.equal(scores.isfinite(), cand) and (scores[~cand] == -math.inf).all()
    assert ((scores.double() - ref).abs()[cand] <= bound[cand]).all()
    torch_ref = latent_scores_reference(k, q, pos, SINK, WINDOW).double()
    assert torch.equal(torch_ref.isfinite(), cand) and ((torch_ref - ref).abs()[cand] <= bound[cand]).all()
    assert len(set(distance_bucket(pos[0] - j[cand[0, 0]], WINDOW, NB).tolist())) == NB  # every bucket used
    coarse = ranking_key(scores).long() >> 8
    count = torch.stack([torch.bincount(c[m], minlength=256) for c, m in zip(coarse.view(-1, S), cand.reshape(-1, S))])
    assert torch.equal(state[:, :256].long(), count) and count.sum() == cand.sum()
    assert (state[:, 256:] == 12345).all()


def coarse_state(scores, chunk):
    """A select state for scores (B, NQ, S) with the coarse bins counted here (as the scoring kernel would)."""
    from kernels.topk import select_state
    B, NQ, S = scores.shape
    state = select_state(B * NQ, S, chunk)
    live = (scores > -math.inf).view(-1, S)
    coarse = (ranking_key(scores).long() >> 8).view(-1, S)
    state[:, :256] = torch.stack([torch.bincount(c[m], minlength=256) for c, m in zip(coarse, live)])
    return state


def crafted_scores(kind: str, B: int, NQ: int, S: int, gen) -> torch.Tensor:
    """(B, NQ, S) float32 candidate scores of one kind (positions outside the candidates are masked later)."""
    x = torch.randn(B, NQ, S, generator=gen)
    if kind == "random":  # both signs
        return x * 3
    if kind == "levels":  # 7 values: most of the selection is ties
        return x.round().clamp(-3, 3) / 2
    if kind == "equal":
        return torch.full((B, NQ, S), 0.75)
    if kind == "zeros":  # -0.0 and 0.0 are different keys (-0.0 ranks after 0.0), with a few values around them
        pick = torch.randint(0, 4, (B, NQ, S), generator=gen)
        return torch.tensor([-0.0, 0.0, 1e-3, -1e-3])[pick]
    if kind == "near":  # distinct floats within one bfloat16 step: equal keys, ranked by position
        return 1 + torch.rand(B, NQ, S, generator=gen) * 2 ** -8
    assert kind == "wide"  # many binades of both signs: keys spread over the coarse bins
    return torch.sign(x) * torch.exp(x * 20)


@pytest.mark.parametrize("chunk", [16, 64, 512])
@pytest.mark.parametrize("kind", ["random", "levels", "equal", "zeros", "near", "wide"])
def check_select(kind, chunk):
    """launch_select against the brute-force rule: the same positions in the same (ascending) order and the same
    keep mask, for budgets below k, above k, above the number of candidates, zero and negative, rows at different
    lengths and one without candidates, two rankings per sequence, one chunk and many (the threshold key's ties
    spread over several chunks); a second launch on the same state writes nothing and does not hang."""
    from kernels.topk import launch_select
    B, NQ, S, k = 5, 2, 300, 40
    gen = torch.Generator().manual_seed(chunk + len(kind))
    scores = crafted_scores(kind, B, NQ, S, gen)
    last = torch.tensor([S - 1, S - 1, 150, 40, 3])  # each sequence's newest candidate (3 < SINK: none)
    j = torch.arange(S)
    scores = scores.masked_fill(((j < SINK) | (j > last[:, None]))[:, None], -math.inf)
    budget = torch.tensor([k - 3, k + 50, 1000, 0, 9]) if chunk != 64 else torch.tensor([7, k, 20, -5, 9])
    state = coarse_state(scores, chunk)
    idx, keep = torch.full((B, NQ, k), -7), torch.ones(B, NQ, k, dtype=torch.bool)  # poisoned
    launch_select(scores, state, budget, idx, keep, chunk=chunk)
    ref_idx, ref_keep = select_top_reference(scores, budget, k)
    assert torch.equal(keep, ref_keep) and torch.equal(idx, ref_idx)
    assert keep[0].sum() > 0 and not keep[-1].any()
    if kind == "random":  # a used state (not zeroed again) ends the launch without a wait and without a write
        idx.fill_(-7)
        launch_select(scores, state, budget, idx, keep, chunk=chunk)
        assert (idx == -7).all()
    if kind in ("levels", "equal", "zeros", "near"):  # the n-th key is tied with unselected candidates
        key = ranking_key(scores[0, 0])
        nth = key[idx[0, 0, keep[0, 0]]].max()
        assert (key == nth).sum() > (key[idx[0, 0, keep[0, 0]]] == nth).sum()
    if kind == "near":  # the rule is not the floats' top-k: equal keys go by position
        assert not torch.equal(idx[0, 0], scores[0, 0].topk(int(keep[0, 0].sum())).indices.sort().values)


def test_reference_rule():
    """select_top_reference against the rule written out in Python (sorted by key, then position)."""
    gen = torch.Generator().manual_seed(3)
    scores = (torch.randn(3, 1, 200, generator=gen) * 4).round() / 4
    scores[1, 0, 150:] = -math.inf
    scores[2] = -math.inf
    budget, k = torch.tensor([30, 170, 5]), 60
    idx, keep = select_top_reference(scores, budget, k)
    for b in range(3):
        key = ranking_key(scores[b, 0]).tolist()
        ranked = sorted((key[j], j) for j in range(200) if scores[b, 0, j] > -math.inf)
        n = min(max(int(budget[b]), 0), k, len(ranked))
        assert idx[b, 0].tolist() == sorted(j for _, j in ranked[:n]) + [0] * (k - n)
        assert keep[b, 0].tolist() == [True] * n + [False] * (k - n)


def check_select_top_op():
    """The op scores and selects in one call: the rule applied to the scoring kernel's own scores, bfloat16
    latents, two distance buckets and two rankings, rows at different positions; bad inputs refused."""
    from kernels.latent_score import launch_latent_scores
    from kernels.topk import select_state, select_top
    B, S, rs, k = 3, 400, 32, 50
    gen = torch.Generator().manual_seed(7)
    lat = torch.randn(B, S, rs, generator=gen).to(torch.bfloat16)
    q = torch.randn(B, 2, 2, rs, generator=gen).to(torch.bfloat16)
    pos, budget = torch.tensor([[399], [250], [90]]), torch.tensor([45, 60, 30])
    idx, keep = select_top(lat, q, pos, budget, SINK, WINDOW, k)
    scores = torch.empty(B, 2, S)
    launch_latent_scores(lat, q, pos, SINK, WINDOW, scores, select_state(B * 2, S))
    ref_idx, ref_keep = select_top_reference(scores, budget, k)
    assert torch.equal(idx, ref_idx) and torch.equal(keep, ref_keep)
    assert keep.sum(-1).tolist() == [[45, 45], [50, 50], [30, 30]]
    with pytest.raises(ValueError, match="q_lat has shape"):
        select_top(lat, q[:, 0], pos, budget, SINK, WINDOW, k)
    with pytest.raises(ValueError, match="budget must be"):
        select_top(lat, q, pos, budget[:2], SINK, WINDOW, k)
    with pytest.raises(ValueError, match="k = 500"):
        select_top(lat, q, pos, budget, SINK, WINDOW, 500)


N_CHILD_TESTS = 8 + 60 + 18 + 1
if CHILD:  # the child collects the checks as tests, and not the launcher
    assert os.environ.get("TRITON_INTERPRET") == "1"
    del test_select_kernels_in_triton_interpreter, test_ranking_key, test_reference_rule  # parent-only: no Triton
    for _name in [n for n in globals() if n.startswith("check_")]:
        globals()["test_" + _name[len("check_"):]] = globals()[_name]
