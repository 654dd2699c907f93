"""The Triton SALS kernels (kernels/) against the PyTorch reference, run by Triton's CPU interpreter.

Triton fixes interpreter mode when a kernel (or triton.language itself) is first defined, and mixing the
modes in one process fails, so the kernel checks run in a child pytest with TRITON_INTERPRET=1: the one
test this module shows to the parent process, and nothing else in the parent sees Triton at all.
Outputs are poisoned with NaN before each kernel runs. float32 inputs are compared tightly (1e-5 relative:
the kernels and the reference differ only in summation order; both rotate with the model's RoPE table); the
float16 case at 2e-3.
"""
import math
import os

import pytest
import torch

from bench.attention_bench import kernel_errors, random_cache, rel_err
from conftest import run_interpreted
from model import ModelArgs, Transformer, apply_rope, rope_table
from sals_attention import SALSCache, SALSConfig, setup_sals

PAPER = dict(selection="layer", ranking="pre-rope")  # one selection per layer: the counts below are per row

CHILD = os.environ.get("SALS_KERNEL_TESTS") == "child"


def test_kernels_in_triton_interpreter():
    """Runs the check_* functions below (collected as tests in the child) under TRITON_INTERPRET=1."""
    run_interpreted(__file__, N_CHILD_TESTS)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: a second thread only adds synchronisation
    yield
    torch.set_num_threads(n)


# (n_head, n_kv_head, head_dim, SALSConfig overrides): MHA and GQA (G = 4, and G = 3), 2-, 4- and 16-bit
# values, r and r* multiples of the block and not.
CASES = [
    (4, 4, 64, dict(rank_fraction=0.25, value_bits=4)),  # r = 64, r* = 32
    (8, 2, 128, dict(rank_fraction=0.125, value_bits=2)),  # r = 32, r* = 16
    (6, 2, 64, dict(rank=40, score_dims=24, value_bits=16)),
    (2, 2, 128, dict(rank=72, score_dims=8, value_bits=2)),
]


@pytest.mark.parametrize("n_head,n_kv_head,head_dim,kw", CASES)
def check_decode_kernels_float32(n_head, n_kv_head, head_dim, kw):
    """Rows at different lengths: a full budget, a partial one, and one with no selected token at all."""
    cache, *step = random_cache(3, 256, n_head, n_kv_head, head_dim, pos=[255, 150, 60], dtype=torch.float32,
                                seed=n_head + head_dim, sink=4, window=8, sparsity=0.25, min_tokens=0, **PAPER, **kw)
    err = kernel_errors(cache, *step)
    assert err["selected"] == (64 - 12) + (37 - 12) + 3 and err["scores"] < 1e-5 and err["attention"] < 1e-5, err


def check_decode_kernels_float16():
    """16-bit inputs as on a GPU: keys, probabilities and values rounded to 16 bits where the reference rounds
    them too, but at different points (2e-3: two half-precision ulps; 3e-4 measured). float16, not bfloat16:
    Triton's interpreter holds bfloat16 as raw integers and adds them as such (gpu_sals.sh checks bf16 on a GPU)."""
    cache, *step = random_cache(2, 200, 8, 2, 64, pos=[199, 120], dtype=torch.float16, seed=5, sink=4, window=8,
                                sparsity=0.25, min_tokens=0, rank_fraction=0.25, value_bits=4, **PAPER)
    err = kernel_errors(cache, *step)
    assert err["selected"] == (50 - 12) + (30 - 12) and err["scores"] < 1e-5 and err["attention"] < 2e-3, err


def check_decode_kernel_rotates_far_positions_exactly():
    """Keys selected near position 32K: RoPE angles as float32 products pos * inv_freq would be off by up to
    ~2e-3 rad there (a relative error of ~1e-3 in the output); the kernel reads the table's float64-made rows."""
    cache, *step = random_cache(1, 33000, 1, 1, 64, dtype=torch.float32, seed=9, sink=4, window=8,
                                sparsity=1 / 256, min_tokens=0, rank_fraction=0.25, value_bits=16, **PAPER)
    err = kernel_errors(cache, *step)
    assert err["selected"] == 128 - 12 and err["attention"] < 1e-5, err


# Launch settings beyond the interpreter default (block_n=16, block_r=16): larger token blocks, several blocks per
# split, one split in all, and latents rebuilt in one shot (block_r 32 covers r* = 24 and r - r* = 16).
VARIANTS = [dict(block_n=32, block_r=16, split_blocks=2),
            dict(block_n=16, block_r=32, split_blocks=1),
            dict(block_n=16, block_r=16, split_blocks=99),
            dict(block_n=32, block_r=32, split_blocks=None)]


@pytest.mark.parametrize("cfg", VARIANTS)
@pytest.mark.parametrize("n_head,n_kv_head", [(4, 4), (8, 2)])
def check_decode_kernel_launch_variants(cfg, n_head, n_kv_head):
    """Each launch setting the GPU sweep may pick gives the reference's output (float32, 1e-5), with the
    split count the setting implies (kernels.sals_decode.split_count), partials NaN-poisoned."""
    from kernels import sals_decode
    cfg = dict(cfg, num_warps=1, num_stages=1)
    cache, *step = random_cache(3, 256, n_head, n_kv_head, 64, pos=[255, 150, 60], dtype=torch.float32, seed=n_head,
                                sink=4, window=8, sparsity=0.25, min_tokens=0, rank=40, score_dims=24, value_bits=4,
                                **PAPER)
    n_split = 1 + sals_decode.split_count(cache.k_max, 3 * n_kv_head, cfg)
    err = kernel_errors(cache, *step, cfg=cfg, n_split=n_split)
    assert err["selected"] == (64 - 12) + (37 - 12) + 3 and err["attention"] < 1e-5, (err, n_split)


@pytest.mark.parametrize("min_tokens,rows,selected", [(40, 256, 52 + 28 + 19), (64, 320, 52 + 52 + 19)])
@pytest.mark.parametrize("n_head,n_kv_head", [(4, 4), (8, 2)])
def check_decode_kernel_reads_short_rows_at_full_rank(n_head, n_kv_head, min_tokens, rows, selected):
    """A row shorter than n_exact (= min_tokens) attends its tokens with the full-rank keys held in the latent rows it
    has not reached, as the reference does (float32, 1e-5), and the longer rows rebuild theirs; rebuilt keys would
    give that row another output. Those keys fit in the cache's own 256 latent rows (40 + 40 * 4), or need more
    (64 + 64 * 4: sals_attention.latent_rows)."""
    cache, *step = random_cache(3, 256, n_head, n_kv_head, 64, pos=[255, 150, 30], dtype=torch.float32, seed=3,
                                sink=4, window=8, sparsity=0.25, min_tokens=min_tokens, rank_fraction=0.25,
                                value_bits=4, **PAPER)
    assert cache.n_exact == min_tokens and cache.k_lat_score.shape[1] == rows
    err = kernel_errors(cache, *step)
    assert err["selected"] == selected and err["attention"] < 1e-5, err
    q, _, _, input_pos, rope = step
    b, (idx, keep) = torch.tensor([2]), cache.select(q, input_pos, None)
    exact = cache.attend_selected(apply_rope(q, rope)[2:], b, input_pos[2:], idx[2:], keep[2:])
    cache.n_exact = 0
    assert rel_err(cache.attend_selected(apply_rope(q, rope)[2:], b, input_pos[2:], idx[2:], keep[2:]), exact) > 1e-2


@pytest.mark.parametrize("one_shot", [False, True])
def check_decode_kernel_per_kv_head_selection(one_shot):
    """Selections made per KV head (idx (B, Hkv, k): each KV head its own tokens, as with kv-head selection):
    the kernel attends each head's own tokens, as the reference does (float32, 1e-5)."""
    cfg = dict(block_n=16, block_r=32 if one_shot else 16, split_blocks=None, num_warps=1, num_stages=1)
    cache, *step = random_cache(2, 200, 8, 2, 64, pos=[199, 90], dtype=torch.float32, seed=11, sink=4, window=8,
                                sparsity=0.25, min_tokens=0, rank=40, score_dims=24, value_bits=2,
                                selection="kv-head")
    err = kernel_errors(cache, *step, cfg=cfg)
    assert err["selected"] == 2 * ((50 - 12) + (22 - 12)) and err["attention"] < 1e-5, err


@pytest.mark.parametrize("n", [1, 5, 37])
def check_combine_splits(n):
    """The split-combine kernel against float64 brute force, in the model's dtype: 1 split, fewer and more than
    its 16-split block; empty splits (max -inf, sum 0, as the decode kernel leaves them) weigh nothing."""
    from kernels.sals_decode import launch_combine
    gen = torch.Generator().manual_seed(n)
    B, H, Dh = 2, 3, 64
    m = torch.randn(B, H, n, generator=gen) * 4
    m[:, :, 1::3] = -math.inf  # empty splits (never split 0, which holds the new token)
    l = torch.rand(B, H, n, generator=gen) * 10 + 1
    l[m == -math.inf] = 0
    acc = torch.randn(B, H, n, Dh, generator=gen)
    out = torch.full((B, H, Dh), float("nan"), dtype=torch.float16)
    launch_combine(m, l, acc, out)
    w = torch.exp2(m.double() - m.double().amax(-1, keepdim=True))
    ref = (acc.double() * w[..., None]).sum(2) / (l.double() * w).sum(2)[..., None]
    assert rel_err(out, ref) < 1e-3  # float16 rounding of the output (2^-11)


@pytest.mark.parametrize("selection,ranking", [("layer", "pre-rope"), ("kv-head", "bucket-rope")])
def check_dispatched_decode_equals_reference_model(selection, ranking):
    """A small random model (float32) with SALS caches: prefill rows of different lengths one at a time, then
    decode steps of all rows; logits with fused=True (kernels) equal those of the reference path, and the
    kernels really ran in every SALS layer of every step; one selection per layer with the paper's ranking, and
    one per KV head with a latent query per distance bucket."""
    from kernels import sals_decode
    torch.manual_seed(0)
    args = ModelArgs(vocab_size=97, dim=128, n_layer=3, n_head=4, n_kv_head=2, head_dim=64, intermediate_size=96,
                     max_position_embeddings=256, rope_base=100.0)
    model = Transformer(args).eval()
    gen = torch.Generator().manual_seed(1)
    calib = {"eigvecs": [torch.linalg.qr(torch.randn(128, 128, generator=gen))[0] for _ in range(3)]}
    # min_tokens 40: the 9-token row attends everything, the others 40 tokens, then a quarter (the budget's regimes)
    cfg = SALSConfig(rank_fraction=0.25, value_bits=4, sparsity=0.25, sink=4, window=8, dense_layers=(0,),
                     min_tokens=40, selection=selection, ranking=ranking)
    prompts = [torch.randint(0, 97, (n,), generator=gen) for n in (70, 41, 9)]
    steps = torch.randint(0, 97, (3, 5), generator=gen)
    calls = []
    attention = sals_decode.decode_attention

    def counting(*a):
        calls.append(1)
        return attention(*a)

    def run(fused):
        setup_sals(model, 3, 96, cfg, calib, fused=fused)
        for i, p in enumerate(prompts):
            model(p[None], torch.arange(len(p))[None], rows=torch.tensor([i]))
        pos = torch.tensor([[len(p)] for p in prompts])
        return torch.cat([model(steps[:, t:t + 1], pos + t) for t in range(steps.shape[1])], 1)

    with torch.no_grad():
        ref = run(False)
        sals_decode.decode_attention = counting
        try:
            out = run(True)
        finally:
            sals_decode.decode_attention = attention
    assert len(calls) == 2 * steps.shape[1]  # layers 1 and 2 are SALS layers, one call per decode step
    assert ref.std() > 0.1
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


# The compression kernel (kernels/compress.py): MHA, GQA, and 3 KV heads of 32 channels (96, no power of two);
# 4-, 2- and 16-bit values.
COMPRESS_CASES = [
    (4, 4, 64, dict(rank_fraction=0.25, value_bits=4)),  # r = 64, r* = 32
    (8, 2, 64, dict(rank_fraction=0.125, value_bits=2)),  # r = 16, r* = 8
    (6, 3, 32, dict(rank=40, score_dims=24, value_bits=16)),
]
# Each row's new position, sink 4, window 8: the first and the last sink, exactly at the sink boundary, a wrapped
# ring, a ring left whole by an earlier, longer sequence of the row (positions 33..40 >= 13), one left partly
# (16..23, of which 20..23 >= 20), and the last position.
COMPRESS_POS = [0, 3, 4, 37, 13, 20, 47]
STALE = {4: 40, 5: 23}  # row: the last position the earlier sequence reached


def compress_step_and_reference(n_head, n_kv_head, head_dim, dtype, pos, stale=(), **kw):
    """A random cache (S = 48) and a step at pos, with the destinations poisoned (NaN, codes 0xFF) and the ring of
    the rows in stale (row: last position) filled by an earlier sequence; k, k_rope and v are views with padded
    heads and U a column slice of a wider matrix, the padding NaN. Returns (the cache after compress_step, a
    copy after SALSCache.write, k, input_pos)."""
    import copy
    from model import apply_rope
    B, S = len(pos), 48
    cache, _, k, v, input_pos, rope = random_cache(B, S, n_head, n_kv_head, head_dim, pos=pos, dtype=dtype,
                                                   seed=n_head + head_dim, sink=kw.pop("sink", 4), window=8,
                                                   sparsity=0.25, **kw)
    b, p, W = torch.arange(B), input_pos[:, 0], cache.window
    with torch.no_grad():
        for row, last in stale:
            slot = torch.arange(W)
            cache.window_pos[row] = last - (last - cache.n_sink - slot) % W
        nan = float("nan")
        for name in ("k_lat_score", "k_lat_rest", "v_scale", "v_zero"):
            if getattr(cache, name) is not None:
                getattr(cache, name)[b, p] = nan
        cache.v_q[b, p] = 255 if cache.bits < 16 else nan
        sink = p < cache.n_sink
        cache.sink_k[b[sink], p[sink]] = cache.sink_v[b[sink], p[sink]] = nan
        slot = (p - cache.n_sink) % W
        cache.win_k[b[~sink], slot[~sink]] = cache.win_v[b[~sink], slot[~sink]] = nan
        D, r = cache.U.shape
        cache.U = torch.cat([cache.U, torch.full((D, 3), nan, dtype=dtype)], 1)[:, :r]
    padded = lambda t: torch.cat([t, torch.full_like(t, nan)], -1)[..., :head_dim]  # noqa: E731
    k, k_rope, v = padded(k), padded(apply_rope(k, rope)), padded(v)
    ref = copy.deepcopy(cache)
    ref.write(b, k, k_rope, v, input_pos)
    compress(cache, k, k_rope, v, input_pos)
    return cache, ref, k, input_pos


def compress(cache, k, k_rope, v, input_pos):
    """kernels.compress.compress_step on a cache's buffers, as SALSCache.fused_decode calls it."""
    from kernels.compress import compress_step
    compress_step(k, k_rope, v, input_pos, cache.U, cache.k_lat_score, cache.k_lat_rest, cache.v_q, cache.v_scale,
                  cache.v_zero, cache.sink_k, cache.sink_v, cache.win_k, cache.win_v, cache.window_pos, cache.bits,
                  cache.n_exact)


def assert_compressed_equal(cache, ref, k, input_pos):
    """Every buffer equal bit for bit, the new latents up to float32 summation order: the two float32 sums of D
    products differ by at most 2 * D * 2^-24 * sum |products|, and their roundings to the cache dtype by 1.5 units
    in the last place more (ulp <= eps * |value|): half for the reference's, one for the kernel's, as Triton's
    interpreter truncates to bfloat16 where a GPU rounds to nearest."""
    rows, p = torch.arange(len(input_pos)), input_pos[:, 0]
    for name, out in cache.named_buffers():
        exp = getattr(ref, name)
        if name.startswith("k_lat"):
            written = torch.zeros(out.shape[:2], dtype=torch.bool)
            written[rows, p] = True
            assert torch.equal(out[~written], exp[~written]), name
            out, exp = out[written], exp[written]  # (B, width), rows in order
        if out.is_floating_point():
            assert not out.isnan().any(), f"{name}: a destination left unwritten"
        if not name.startswith("k_lat"):
            assert torch.equal(out, exp), name
    lat = lambda c: torch.cat([c.k_lat_score[rows, p], c.k_lat_rest[rows, p]], -1).double()  # noqa: E731
    terms = k.transpose(1, 2).flatten(2).double().transpose(1, 2) * ref.U.double()  # (B, D, r)
    tol = 2 * terms.shape[1] * 2 ** -24 * terms.abs().sum(1) + 1.5 * torch.finfo(k.dtype).eps * lat(ref).abs()
    assert ((lat(cache) - lat(ref)).abs() <= tol).all()
    assert ((lat(ref) - terms.sum(1)).abs() <= tol).all()  # the reference itself is the GEMV


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n_head,n_kv_head,head_dim,kw", COMPRESS_CASES)
def check_compress(n_head, n_kv_head, head_dim, kw, dtype):
    """compress_step leaves every buffer as SALSCache.write does, for rows before, at and past the sinks, with
    a wrapped ring and with rings holding an earlier sequence's positions >= the new one; rows before n_exact (5)
    also store their pre-RoPE key at full rank."""
    out = compress_step_and_reference(n_head, n_kv_head, head_dim, dtype, COMPRESS_POS, STALE.items(), min_tokens=5,
                                      **kw)
    assert_compressed_equal(*out)
    cache, _, k, input_pos = out  # rows at positions 0, 3, 4 < n_exact: their pre-RoPE keys kept at full rank too
    early = (input_pos[:, 0] < cache.n_exact).nonzero()[:, 0].tolist()
    assert early == [0, 1, 2], cache.n_exact
    for b in early:
        assert torch.equal(torch.cat([t[b, input_pos[b, 0]] for t in cache.exact_keys()], -1), k[b, :, 0])
    window_pos = out[0].window_pos  # the stale slots emptied, the older ones of row 5 kept
    assert window_pos[4].tolist() == [-1, 13, -1, -1, -1, -1, -1, -1]
    assert window_pos[5].tolist() == [20, -1, -1, -1, 16, 17, 18, 19]


def check_compress_without_sinks_and_with_r_star_equal_r():
    """No sinks and an empty k_lat_rest (their buffers have no elements and their stores are compiled out);
    float16 with 4-bit values; then wrong shapes and a dtype other than the cache's are refused."""
    out = compress_step_and_reference(4, 2, 64, torch.float16, [0, 9, 30], rank=32, score_dims=32, value_bits=4,
                                      sink=0)
    assert_compressed_equal(*out)
    cache, _, k, input_pos = out
    with pytest.raises(ValueError, match="one token per sequence"):
        compress(cache, k.expand(-1, -1, 2, -1), k.expand(-1, -1, 2, -1), k.expand(-1, -1, 2, -1),
                 input_pos.expand(-1, 2))
    with pytest.raises(ValueError, match="every row of the cache"):
        compress(cache, k[:2], k[:2], k[:2], input_pos[:2])
    with pytest.raises(ValueError, match="cast them to the cache's dtype"):
        compress(cache, k, k, k.float(), input_pos)


def test_sals_layers_share_the_models_rope_table():
    """setup_sals hands every SALS layer the model's own (cos, sin) table, not a copy; its rows are bit for bit
    the reference path's float64 angles; a table of the wrong shape is refused with a clear error."""
    args = ModelArgs(vocab_size=97, dim=128, n_layer=4, n_head=4, n_kv_head=2, head_dim=64, intermediate_size=96,
                     max_position_embeddings=300, rope_base=500.0)
    model = Transformer(args)
    gen = torch.Generator().manual_seed(3)
    calib = {"eigvecs": [torch.linalg.qr(torch.randn(128, 128, generator=gen))[0] for _ in range(4)]}
    setup_sals(model, 2, 300, SALSConfig(rank_fraction=0.25, dense_layers=(0,)), calib)
    caches = [layer.attention.kv_cache for layer in model.layers[1:]]
    assert all(c.rope is model.rope for c in caches)
    j = torch.arange(300)
    angles = j[:, None].double() * caches[0].inv_freq  # what SALSCache.keys rotates with
    assert torch.equal(model.rope[j], torch.stack([angles.cos(), angles.sin()], -1).float())
    with pytest.raises(ValueError, match="rope has shape"):
        SALSCache(SALSConfig(rank=32).resolve(args, 128), args, 1, 300, torch.zeros(128, 32), rope_table(args, 200))


N_CHILD_TESTS = len(CASES) + 3 + 3 + 2 * len(VARIANTS) + 4 + 3 + 3 * len(COMPRESS_CASES) + 1
if CHILD:  # the child collects the checks as tests, and not the launcher
    assert os.environ.get("TRITON_INTERPRET") == "1"
    del test_kernels_in_triton_interpreter, test_sals_layers_share_the_models_rope_table  # parent-only tests
    for _name in [n for n in globals() if n.startswith("check_")]:
        globals()["test_" + _name[len("check_"):]] = globals()[_name]
