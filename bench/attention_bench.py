"""One layer's decode attention: the SALS step (Triton kernels) against the fastest dense decode attention.

    python bench/attention_bench.py --shape llama-2-7b mistral-7b --seq 4096 32768 --batch 1 8 16
    python bench/attention_bench.py --configs mistral-7b:32768:8 --selection layer "kv-head bucket"
    python bench/attention_bench.py --check      # kernels vs the PyTorch reference at real sizes
    python bench/attention_bench.py --sweep llama-2-7b:4096:16   # the fused kernel's launch settings alone

Per cell, on the same bf16 K, V: our split-KV kernel (kernels/decode_attention.py) and every SDPA backend, each
forced and named (flash, efficient, cuDNN; the masked path the engine used before); SALS's ratio is to the fastest.
The SALS step is SALSCache.forward for one new token, everything a step needs: RoPE of k, compression and writes of
the new token, latent queries, scoring with the coarse histogram, the selection, the fused gather/rebuild/attend
kernel (which rotates q) and the split combine. Everything is captured in CUDA graphs and timed by
kernels/timing.graph_us (median, L2 cleared before every call). The step is torch.compile'd before capture (as
generate.py --compile does), or eager with --eager. Each row prints its floor: the bytes it must read at the copy
ceiling, or the key rebuild's FLOPs at the bf16 matmul rate, both measured in this process; each SALS piece beside
its own floor.
"""
import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernels.timing import copy_ceiling, graph_us  # noqa: E402
from model import ModelArgs, apply_rope, rope_table  # noqa: E402
from sals_attention import GROUP, SALSCache, SALSConfig  # noqa: E402

SHAPES = {"llama-2-7b": (32, 32), "mistral-7b": (32, 8)}  # (query heads, KV heads); head_dim 128
# How a SALS step selects: the paper's one ranking per layer, or one per KV head with a latent query per distance
# bucket (what the kernels run for the accuracy-chosen configurations)
SELECTION_VARIANTS = {"layer": dict(selection="layer", ranking="pre-rope"),  # the paper's
                      "kv-head bucket": dict(selection="kv-head", ranking="bucket-rope")}  # the default


# ---------------------------------------------------------------------------------------------
# Random caches and step inputs (shared with tests/test_kernels.py).

def random_cache(B: int, S: int, n_head: int, n_kv_head: int, head_dim: int = 128, fraction: float = 0.125,
                 pos=None, device="cpu", dtype=torch.bfloat16, seed: int = 0, **overrides):
    """A SALSCache (max length S) holding random data as if row b had been filled up to position pos[b]
    (default S - 1), and a random step there. Keys are scaled so that logits have a standard deviation
    of about 2.5 whether they come from the window or from rebuilt latents. Returns (cache, q, k, v, input_pos,
    rope): q (B, H, 1, Dh), k, v (B, Hkv, 1, Dh) pre-RoPE, input_pos (B, 1), rope (B, 1, Dh/2, 2)."""
    args = ModelArgs(vocab_size=1, dim=n_head * head_dim, n_layer=1, n_head=n_head, n_kv_head=n_kv_head,
                     head_dim=head_dim, intermediate_size=1, max_position_embeddings=S)
    D, gen = n_kv_head * head_dim, torch.Generator(device).manual_seed(seed)
    cfg = SALSConfig.preset(fraction, **overrides).resolve(args, D)
    U = torch.linalg.qr(torch.randn(D, cfg.rank, generator=gen, device=device))[0]  # orthonormal columns
    table = rope_table(args, S).to(device)
    cache = SALSCache(cfg, args, B, S, U.to(dtype), table).to(device)
    k_std = math.sqrt(cfg.rank / D)  # a reconstructed key channel's std when latents are N(0, 1)
    with torch.no_grad():
        for name, std in [("k_lat_score", 1), ("k_lat_rest", 1), ("sink_k", k_std), ("win_k", k_std),
                          ("sink_v", 1), ("win_v", 1)]:
            getattr(cache, name).normal_(0, std, generator=gen)
        if cache.bits == 16:
            cache.v_q.normal_(generator=gen)
        else:
            cache.v_q.random_(0, 256, generator=gen)
            cache.v_scale.uniform_(0.1, 0.5, generator=gen)
            cache.v_zero.normal_(generator=gen)
        pos = torch.full((B,), S - 1) if pos is None else torch.as_tensor(pos)
        slot = torch.arange(cfg.window)
        last = pos[:, None] - (pos[:, None] - cfg.sink - slot) % cfg.window  # newest position of each slot
        cache.window_pos.copy_(torch.where(last >= cfg.sink, last, -1))
    q_std = 2.5 / k_std
    q = torch.randn(B, n_head, 1, head_dim, generator=gen, device=device).mul(q_std).to(dtype)
    k = torch.randn(B, n_kv_head, 1, head_dim, generator=gen, device=device).to(dtype)
    v = torch.randn(B, n_kv_head, 1, head_dim, generator=gen, device=device).to(dtype)
    input_pos = pos[:, None].to(device)
    return cache, q, k, v, input_pos, table[input_pos]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def attention_step(cache: SALSCache, q, input_pos, idx, keep, cfg: dict | None = None):
    """kernels/sals_decode.decode_attention alone on a cache's buffers: q (B, H, 1, Dh) pre-RoPE -> (B, H, Dh)."""
    from kernels.sals_decode import decode_attention
    return decode_attention(q[:, :, 0], cache.sink_k, cache.sink_v, cache.win_k, cache.win_v, cache.window_pos,
                            input_pos, idx.view(len(idx), -1, idx.shape[-1]), keep.view(len(idx), -1, idx.shape[-1]), cache.k_lat_score, cache.k_lat_rest, cache.U, cache.rope, cache.v_q,
                            cache.v_scale, cache.v_zero, cache.bits, cache.n_exact)


def select_step(cache: SALSCache, q_lat, input_pos):
    """kernels/topk.select_top (scores and selection) as the fused step calls it: idx, keep (B, NQ, k_max)."""
    from kernels.topk import select_top
    return select_top(cache.k_lat_score, q_lat, input_pos, cache.n_attend[input_pos[:, 0]], cache.n_sink,
                      cache.window, cache.k_max)


def poisoned(*shape, device) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=torch.float32, device=device)


def kernel_errors(cache: SALSCache, q, k, v, input_pos, rope, cfg: dict | None = None,
                  n_split: int | None = None) -> dict:
    """Relative errors of each kernel against the PyTorch reference on one step of a random cache, with
    outputs poisoned with NaN before each kernel runs; 'selected' is how many tokens the budget keeps.
    cfg: the fused kernel's launch settings (default: kernels.sals_decode.decode_config); n_split: its
    splits, selection included (default: one per 32 selected tokens, plus the sinks/window split)."""
    from kernels.latent_score import launch_latent_scores, latent_scores_reference
    from kernels.sals_decode import combine_splits, launch_decode
    from kernels.topk import select_state
    B, H, _, Dh = q.shape
    q_rope = apply_rope(q, rope)
    q_lat = cache.fused_latent_query(q, input_pos)
    NQ, S = q_lat.shape[2], cache.k_lat_score.shape[1]
    scores = poisoned(B, NQ, S, device=q.device)
    launch_latent_scores(cache.k_lat_score, q_lat, input_pos, cache.n_sink, cache.window, scores,
                         select_state(B * NQ, S, device=q.device))
    ref_scores = latent_scores_reference(cache.k_lat_score, q_lat, input_pos, cache.n_sink, cache.window)
    finite = ref_scores.isfinite()
    assert torch.equal(scores.isfinite(), finite), "scores: -inf outside the candidates, finite inside"
    err_scores = rel_err(scores[finite], ref_scores[finite])
    idx, keep = cache.select(q, input_pos, None)  # the reference selection, (B, [Hkv,] k)
    n_split = n_split or 1 + max(1, math.ceil(idx.shape[1] / 32))  # the selection in several splits
    m, l, acc = poisoned(B, H, n_split, device=q.device), poisoned(B, H, n_split, device=q.device), \
        poisoned(B, H, n_split, Dh, device=q.device)
    launch_decode(q[:, :, 0], cache.sink_k, cache.sink_v, cache.win_k, cache.win_v, cache.window_pos, input_pos,
                  idx.view(B, -1, idx.shape[-1]), keep.view(B, -1, idx.shape[-1]), cache.k_lat_score, cache.k_lat_rest, cache.U,
                  cache.rope, cache.v_q, cache.v_scale, cache.v_zero, cache.bits, cache.n_exact, m, l, acc, cfg)
    assert not (m.isnan().any() or l.isnan().any() or acc.isnan().any()), "a partial was left unwritten"
    out = combine_splits(m, l, acc)[:, :, None]
    ref = cache.attend_selected(q_rope, torch.arange(B, device=q.device), input_pos, idx, keep)
    return {"scores": err_scores, "attention": rel_err(out, ref),
            "selected": int(keep.sum())}


# ---------------------------------------------------------------------------------------------
# Timing: the dense baselines, the SALS step and its pieces, each beside its floor.

def dense_baselines(q, K, V, pos) -> dict[str, float | None]:
    """Microseconds of one layer's dense decode attention over the same K, V (B, Hkv, S, Dh) (every slot valid),
    q (B, H, 1, Dh): our split-KV kernel (kernels/decode_attention.py, each row bounded by pos (B, 1)) and every
    SDPA backend, each forced with sdpa_kernel so that the one named is the one that ran (None: it refuses the
    shape). 'folded': the G query heads of a KV head as G query rows of it (how model.attend reads a KV head once);
    'masked': the engine's dense path before the kernel (a boolean mask over the slots rules out flash)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from kernels.decode_attention import decode_attention
    B, H, _, Dh = q.shape
    Hkv, S = K.shape[1], K.shape[2]
    qf = q.reshape(B, Hkv, H // Hkv, Dh)
    mask = torch.ones(B, 1, H // Hkv, S, dtype=torch.bool, device=q.device)
    runs = {"ours: split-KV kernel": lambda: decode_attention(q[:, :, 0], K, V, pos),
            "SDPA flash, enable_gqa": (SDPBackend.FLASH_ATTENTION, lambda: F.scaled_dot_product_attention(
                q, K, V, enable_gqa=Hkv != H)),
            "SDPA flash, folded": (SDPBackend.FLASH_ATTENTION, lambda: F.scaled_dot_product_attention(qf, K, V)),
            "SDPA efficient, folded": (SDPBackend.EFFICIENT_ATTENTION, lambda: F.scaled_dot_product_attention(qf, K, V)),
            "SDPA cuDNN, folded": (SDPBackend.CUDNN_ATTENTION, lambda: F.scaled_dot_product_attention(qf, K, V)),
            "SDPA masked (the engine's old path)": (None, lambda: F.scaled_dot_product_attention(qf, K, V,
                                                                                               attn_mask=mask))}
    times = {}
    for name, run in runs.items():
        backend, fn = (None, run) if callable(run) else run
        try:
            if backend is None:
                times[name] = graph_us(fn)
            else:
                with sdpa_kernel([backend]):
                    times[name] = graph_us(fn)
        except RuntimeError as e:  # the backend does not take this shape (or is not built in)
            times[name] = None
            print(f"  {name} does not run here: {str(e).splitlines()[0][:100]}", flush=True)
    return times


def sals_floors(cache: SALSCache, input_pos: torch.Tensor) -> dict[str, tuple[int, int]]:
    """(bytes, FLOPs) each piece of a SALS step must at least read and compute: the compression of the new token
    (U), the latent queries and scores (U's r* columns, the r* prefix of every candidate, the scores written), the
    scores and the selection (the scores read back, idx and keep written), the attention (the selected tokens'
    latent rows and values, sinks, window, U; the key rebuild's FLOPs). Every byte counted once, as if nothing were
    cached in L2. The step's floor: compress + score+select + attention."""
    B, S, rs = cache.k_lat_score.shape
    r = rs + cache.k_lat_rest.shape[2]
    D, Hkv, Dh = cache.U.shape[0], cache.n_kv_head, cache.head_dim
    pos = input_pos.reshape(-1).cpu()
    n_cand = int((pos - cache.window - cache.n_sink + 1).clamp(min=0).sum())
    n_sel = int(cache.n_attend.cpu()[pos].clamp(min=0).sum())  # per sequence, each KV head alike
    n_lat = Hkv if cache.per_head else 1  # latent rows gathered per selected token
    v_token = Hkv * (Dh * 2 if cache.bits == 16 else Dh * cache.bits // 8 + 2 * 2 * Dh // GROUP)
    u, e = cache.U.numel() * 2, 2
    NB, NQ = max(1, cache.n_buckets), Hkv if cache.per_head else 1
    scores = (D * rs * e + n_cand * rs * e + B * NQ * S * 4, 2 * n_cand * rs * NB * NQ)
    return {"compress": (u, 2 * B * D * r),
            "scores": scores,
            "score+select": (scores[0] + B * NQ * (S * 4 + cache.k_max * 9), scores[1]),
            "attention": (n_sel * (n_lat * r * e + v_token) + B * (cache.n_sink + cache.window) * Hkv * Dh * 2 * e + u,
                          2 * n_sel * D * r)}


def floor_us(nbytes: int, flop: int) -> float:
    """The time a piece needs at least: its bytes at the copy ceiling or its FLOPs at the bf16 matmul rate."""
    from kernels.timing import matmul_rate
    return max(nbytes / copy_ceiling(), flop / matmul_rate()) * 1e6


def sals_pieces(cache: SALSCache, q, k, v, pos, rope) -> dict[str, float]:
    """Microseconds of each kernel of a SALS step alone, on the step's own inputs (the cache left as it was)."""
    from kernels.compress import compress_step
    from kernels.latent_score import launch_latent_scores
    from kernels.topk import select_state
    state = {name: t.clone() for name, t in cache.named_buffers()}
    k_rope = apply_rope(k, rope)
    q_lat = cache.fused_latent_query(q, pos)
    idx, keep = select_step(cache, q_lat, pos)
    B, S = cache.k_lat_score.shape[:2]
    scores, hist = poisoned(B, q_lat.shape[2], S, device=q.device), select_state(B * q_lat.shape[2], S, device=q.device)
    times = {"compress": graph_us(lambda: compress_step(
                 k, k_rope, v, pos, cache.U, cache.k_lat_score, cache.k_lat_rest, cache.v_q, cache.v_scale,
                 cache.v_zero, cache.sink_k, cache.sink_v, cache.win_k, cache.win_v, cache.window_pos, cache.bits,
                 cache.n_exact)),
             "scores": graph_us(lambda: launch_latent_scores(cache.k_lat_score, cache.fused_latent_query(q, pos), pos,
                                                             cache.n_sink, cache.window, scores, hist)),
             "score+select": graph_us(lambda: select_step(cache, cache.fused_latent_query(q, pos), pos)),
             "attention": graph_us(lambda: attention_step(cache, q, pos, idx, keep))}
    for name, t in cache.named_buffers():
        t.copy_(state[name])
    return times


HEADER = ("| shape | S | B | method | us / layer | vs best dense | bytes | floor us | % of floor | pieces: us (floor) |\n"
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")


def bench_config(shape: str, S: int, B: int, fractions, eager: bool, reference: bool = False,
                 variants=("layer",)) -> list[str]:
    """One (shape, S, B) cell: every dense baseline on the same K, V, then each SALS preset's whole step (compiled,
    one CUDA graph) and its pieces; the ratio is to the fastest dense run; floors from the bytes at the copy ceiling
    and the FLOPs at the matmul rate, both measured in this process."""
    torch._dynamo.reset()  # each config compiles its own step: no recompile limit across configs
    H, Hkv = SHAPES[shape]
    dense = 2 * B * Hkv * S * 128 * 2
    free = torch.cuda.mem_get_info()[0]
    if 1.3 * dense + 0.5 * dense > free:  # K, V and the largest SALS cache (< 0.3 of dense) + slack
        return [f"| {shape} | {S} | {B} | — | does not fit ({dense / 1e9:.1f} GB dense K+V, "
                f"{free / 1e9:.1f} GB free) | | | | | |"]
    gen = torch.Generator("cuda").manual_seed(S + B)
    q = torch.randn(B, H, 1, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    K = torch.randn(B, Hkv, S, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    V = torch.randn(B, Hkv, S, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    times = dense_baselines(q, K, V, torch.full((B, 1), S - 1, device="cuda"))
    del K, V
    best = min(t for t in times.values() if t is not None)
    d_floor = floor_us(dense, 0)
    rows = [f"| {shape} | {S} | {B} | {name} | " + ("does not run | | | | | |" if t is None else
            f"{t:.1f} | {best / t:.2f}x | {dense / 1e6:.1f} MB | {d_floor:.1f} | {d_floor / t:.0%} | |")
            for name, t in times.items()]
    for fraction, variant in [(f, v) for f in fractions for v in variants]:
        cache, q, k, v, pos, rope = random_cache(B, S, H, Hkv, 128, fraction, device="cuda", seed=S + B,
                                                 **SELECTION_VARIANTS[variant])
        label = f"SALS-{fraction * 100:g}% {variant}"

        def step():
            return cache(q, k, v, pos, rope)
        parts = sals_floors(cache, pos)
        floors = {name: floor_us(*f) for name, f in parts.items()}
        nbytes = sum(parts[n][0] for n in ("compress", "score+select", "attention"))
        with torch.no_grad():
            t_step = graph_us(step if eager else torch.compile(step, fullgraph=True))
            pieces = sals_pieces(cache, q, k, v, pos, rope)
            floor = sum(floors[n] for n in ("compress", "score+select", "attention"))
            rows.append(f"| {shape} | {S} | {B} | {label} step | {t_step:.1f} | {best / t_step:.2f}x | "
                        f"{nbytes / 1e6:.1f} MB | {floor:.1f} | {floor / t_step:.0%} | "
                        + ", ".join(f"{n} {pieces[n]:.1f} ({floors[n]:.1f})" for n in floors) + " |")
            if reference:  # the same step through the PyTorch reference path (gather, matmul rebuild, SDPA)
                cache.fused = False
                try:
                    t_ref = graph_us(step if eager else torch.compile(lambda: cache(q, k, v, pos, rope), fullgraph=True))
                finally:
                    cache.fused = None
                rows.append(f"| {shape} | {S} | {B} | {label} PyTorch reference | {t_ref:.1f} | "
                            f"{best / t_ref:.2f}x | | | | |")
    return rows


# ---------------------------------------------------------------------------------------------
# GPU checks at real sizes.

def check(device="cuda") -> bool:
    """Every kernel and the whole dispatched step (eager, and compiled with mode="reduce-overhead",
    fullgraph=True) against the PyTorch reference, Llama-2 and GQA shapes, 2/4/16-bit values, rows of
    different lengths. bf16 tolerances: kernels 2e-2 relative (keys, probabilities and values are rounded
    to bf16 in a different order than the reference), scores 1e-5 (both float32 sums of the same products)."""
    ok = True
    cases = [("llama-2-7b", 4096, 0.125, {}), ("llama-2-7b", 4096, 0.25, {}), ("mistral-7b", 32768, 0.125, {}),
             ("mistral-7b", 8192, 0.25, dict(value_bits=16)), ("llama-2-7b", 32768, 0.125, {}),
             ("mistral-7b", 32768, 0.125, SELECTION_VARIANTS["kv-head bucket"]),
             ("llama-2-7b", 4096, 0.25, SELECTION_VARIANTS["kv-head bucket"])]
    for n, (shape, S, fraction, kw) in enumerate(cases):
        H, Hkv = SHAPES[shape]
        pos = [S - 1, S // 2 + 37, 1000, 90][:4]  # full, half, short, and no selection at all
        cache, q, k, v, input_pos, rope = random_cache(4, S, H, Hkv, 128, fraction, pos=pos, device=device,
                                                       seed=100 + n, **kw)
        with torch.no_grad():
            err = kernel_errors(cache, q, k, v, input_pos, rope)
            good = err["scores"] < 1e-5 and err["attention"] < 2e-2
            print(f"{'ok  ' if good else 'FAIL'} {shape} S={S} SALS-{fraction * 100:g}% {kw or ''}: "
                  f"scores rel err {err['scores']:.1e}, attention rel err {err['attention']:.1e}, "
                  f"{err['selected']} tokens selected", flush=True)
            ok &= good
            ok &= check_step(cache, q, k, v, input_pos, rope, compiled=n == 0)
    return ok


def check_step(cache, q, k, v, input_pos, rope, compiled: bool) -> bool:
    """The dispatched decode step against the reference step on copies of the same cache: the outputs, and the
    cache each leaves behind (the compression kernel against SALSCache.write: every buffer equal, the latent keys
    up to float32 summation order)."""
    state = {name: t.clone() for name, t in cache.named_buffers()}

    def run(fused, fn):
        for name, t in cache.named_buffers():
            t.copy_(state[name])
        cache.fused = fused
        try:
            return fn(q, k, v, input_pos, rope).clone()
        finally:
            cache.fused = None
    ref = run(False, cache)
    ref_state = {name: t.clone() for name, t in cache.named_buffers()}
    out = run(True, cache)
    latent = max(rel_err(t, ref_state[n]) for n, t in cache.named_buffers() if n.startswith("k_lat"))
    differ = [n for n, t in cache.named_buffers() if not n.startswith("k_lat") and not torch.equal(t, ref_state[n])]
    results = [("eager", rel_err(out, ref))]
    if compiled:
        fn = torch.compile(cache.forward, mode="reduce-overhead", fullgraph=True)
        run(True, fn)  # warm-up and capture
        results.append(("compiled reduce-overhead", rel_err(run(True, fn), ref)))
    good = all(e < 3e-2 for _, e in results) and latent < 1e-2 and not differ
    print(f"{'ok  ' if good else 'FAIL'}   whole step vs reference step: "
          + ", ".join(f"{name} rel err {e:.1e}" for name, e in results)
          + f"; cache after the step: latent keys rel err {latent:.1e}, other buffers "
          + (f"differ: {', '.join(differ)}" if differ else "equal"), flush=True)
    return good


# Launch-setting variants of the fused kernel (kernels/sals_decode.CONFIGS), timed alone by --sweep. Registers,
# spills and shared memory of each: `python bench/kernel_report.py` (an offline sm_90 compile, no GPU needed).
SWEEP = {
    "mha": [dict(block_n=64, block_r=64, split_blocks=None, num_warps=4, num_stages=3),
            dict(block_n=64, block_r=64, split_blocks=None, num_warps=8, num_stages=3),
            dict(block_n=128, block_r=64, split_blocks=None, num_warps=8, num_stages=2),
            dict(block_n=64, block_r=128, split_blocks=None, num_warps=8, num_stages=2),
            dict(block_n=32, block_r=64, split_blocks=None, num_warps=4, num_stages=4),
            dict(block_n=64, block_r=64, split_blocks=1, num_warps=4, num_stages=3)],
    "gqa": [dict(block_n=32, block_r=64, split_blocks=None, num_warps=4, num_stages=3),
            dict(block_n=64, block_r=64, split_blocks=None, num_warps=4, num_stages=3),
            dict(block_n=32, block_r=64, split_blocks=None, num_warps=4, num_stages=2),
            dict(block_n=64, block_r=64, split_blocks=None, num_warps=8, num_stages=3),
            dict(block_n=32, block_r=64, split_blocks=4, num_warps=4, num_stages=3),
            dict(block_n=16, block_r=64, split_blocks=None, num_warps=4, num_stages=4),
            dict(block_n=64, block_r=64, split_blocks=1, num_warps=4, num_stages=3)],
}


SWEEP_HEADER = ("| shape | variant | kernel us | rebuild TFLOP/s | rel err | regs / spills |\n"
                "| --- | --- | --- | --- | --- | --- |")


def sweep(shape: str, S: int, B: int, rounds: int = 3) -> list[str]:
    """Times the fused kernel (with the split combine) alone for each SWEEP variant of the shape's family at
    SALS-12.5%, checks each against the reference (NaN-poisoned partials), and names the fastest correct one
    (the step itself runs kernels.sals_decode.CONFIGS). The variants are timed in turn, `rounds` times over, each
    its fastest round: a variant timed first alone ran ~10% slow (clocks still settling). Returns markdown rows."""
    from kernels import sals_decode as sd
    H, Hkv = SHAPES[shape]
    family = "mha" if H == Hkv else "gqa"
    cache, q, k, v, pos, rope = random_cache(B, S, H, Hkv, 128, 0.125, device="cuda", seed=7)
    q_rope = apply_rope(q, rope)
    idx, keep = select_step(cache, cache.fused_latent_query(q, pos), pos)
    ref = cache.attend_selected(q_rope, torch.arange(B, device="cuda"), pos, idx, keep)
    flop = 2 * int(keep.sum()) * cache.U.numel() // keep.shape[1]  # per KV head selection: each its own rows of U
    args = (q[:, :, 0], cache.sink_k, cache.sink_v, cache.win_k, cache.win_v, cache.window_pos, pos,
            idx, keep, cache.k_lat_score, cache.k_lat_rest, cache.U, cache.rope, cache.v_q, cache.v_scale,
            cache.v_zero, cache.bits, cache.n_exact)
    rows, ready = [], []
    for cfg in SWEEP[family]:
        n = 1 + sd.split_count(idx.shape[-1], B * Hkv, cfg)
        m, l = poisoned(B, H, n, device="cuda"), poisoned(B, H, n, device="cuda")
        acc = poisoned(B, H, n, q.shape[-1], device="cuda")
        out = torch.empty(B, H, q.shape[-1], dtype=q.dtype, device="cuda")  # what the step's combine kernel writes
        name = " ".join(f"{key}={val}" for key, val in cfg.items())
        try:
            handle = sd.launch_decode(*args, m, l, acc, cfg)
            sd.launch_combine(m, l, acc, out)
            err = rel_err(out[:, :, None], ref)
            run = lambda cfg=cfg, m=m, l=l, acc=acc, out=out: (sd.launch_decode(*args, m, l, acc, cfg),  # noqa: E731
                                                               sd.launch_combine(m, l, acc, out))
            ready.append(dict(cfg=cfg, name=name, run=run, err=err, t=graph_us(run),
                              regs=f"{getattr(handle, 'n_regs', '?')} / {getattr(handle, 'n_spills', '?')}"))
        except Exception as e:  # a variant that does not compile (shared memory, registers) is reported, not fatal
            rows.append(f"| {shape} {S} B={B} | {name} | failed: {type(e).__name__}: {str(e)[:80]} | | | |")
            print(rows[-1], flush=True)
    for _ in range(rounds - 1):
        for r in ready:
            r["t"] = min(r["t"], graph_us(r["run"]))
    for r in ready:
        rows.append(f"| {shape} {S} B={B} | {r['name']} | {r['t']:.1f} | {flop / r['t'] / 1e6:.0f} | {r['err']:.1e} | "
                    f"{r['regs']} |")
        print(rows[-1], flush=True)
    best = min((r for r in ready if r["err"] < 2e-2), key=lambda r: r["t"], default=None)
    if best:  # the step runs kernels.sals_decode.CONFIGS: a faster variant found here is copied there by hand
        rows.append(f"| {shape} {S} B={B} | **fastest: {best['name']}** | {best['t']:.1f} | | | |")
    return rows


def profile(shape: str, S: int, B: int, fraction: float = 0.125, steps: int = 20) -> None:
    """Kernel-level device times (torch.profiler) of one SALS step, Triton path and PyTorch reference path, eager,
    with the L2 cache flushed before every step as in a real decode (the other layers evict this one's data)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    H, Hkv = SHAPES[shape]
    cache, q, k, v, pos, rope = random_cache(B, S, H, Hkv, 128, fraction, device="cuda", seed=1)
    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    for fused in (True, False):
        cache.fused = fused
        try:
            with torch.no_grad():
                for _ in range(3):
                    cache(q, k, v, pos, rope)
                torch.cuda.synchronize()
                with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(steps):
                        flush.zero_()
                        cache(q, k, v, pos, rope)
                    torch.cuda.synchronize()
        finally:
            cache.fused = None
        print(f"\n== {shape} S={S} B={B} SALS-{fraction * 100:g}%, {'Triton' if fused else 'PyTorch reference'} step, "
              f"device us per step (flush excluded)")
        for e in sorted(prof.key_averages(), key=lambda e: -e.self_device_time_total):
            us = e.self_device_time_total / steps
            if us >= 0.5 and "fill" not in e.key and "zero" not in e.key:
                print(f"{us:9.1f} us  x{e.count // steps:<3d} {e.key[:110]}")


def ncu_step(shape: str, S: int, B: int, fraction: float = 0.125) -> None:
    """One eager SALS step (after a warm-up that compiles the kernels) inside a profiler range, for ncu."""
    H, Hkv = SHAPES[shape]
    cache, q, k, v, pos, rope = random_cache(B, S, H, Hkv, 128, fraction, device="cuda", seed=1)
    with torch.no_grad():
        cache(q, k, v, pos, rope)
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStart()
        cache(q, k, v, pos, rope)
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), nargs="+", default=["llama-2-7b", "mistral-7b"])
    p.add_argument("--seq", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 16])
    p.add_argument("--fraction", type=float, nargs="+", default=[0.25, 0.125], choices=[0.25, 0.125])
    p.add_argument("--selection", nargs="+", default=["layer"], choices=list(SELECTION_VARIANTS),
                   help="selection variants to time (SELECTION_VARIANTS)")
    p.add_argument("--configs", nargs="+", metavar="SHAPE:S:B", help="explicit configs instead of the grid")
    p.add_argument("--eager", action="store_true",
                   help="do not torch.compile the step (inductor fuses the new token's ~30 small write ops)")
    p.add_argument("--check", action="store_true", help="check the kernels against the reference, then exit")
    p.add_argument("--profile", nargs="+", metavar="SHAPE:S:B", help="kernel-level times of the step (torch.profiler)")
    p.add_argument("--sweep", nargs="+", metavar="SHAPE:S:B",
                   help="time the fused kernel's launch-setting variants alone")
    p.add_argument("--ncu", nargs="+", metavar="SHAPE:S:B",
                   help="one eager step per config between cudaProfilerStart/Stop (run under ncu --profile-from-start off)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("attention_bench.py needs a CUDA GPU (the CPU tests are tests/test_kernels.py).")
    if args.check:
        sys.exit(0 if check() else 1)
    for c in args.ncu or []:
        ncu_step(c.split(":")[0], int(c.split(":")[1]), int(c.split(":")[2]))
    if args.ncu:
        return
    for c in args.profile or []:
        profile(c.split(":")[0], int(c.split(":")[1]), int(c.split(":")[2]))
    with torch.no_grad():
        rows = [row for c in args.sweep or [] for row in sweep(c.split(":")[0], int(c.split(":")[1]), int(c.split(":")[2]))]
    if rows:
        print(SWEEP_HEADER, *rows, sep="\n")
    if (args.profile or args.sweep) and not args.configs:
        return
    configs = [(shape, S, B) for shape in args.shape for S in args.seq for B in args.batch]
    if args.configs:
        try:
            configs = [(c.split(":")[0], int(c.split(":")[1]), int(c.split(":")[2])) for c in args.configs]
            assert all(shape in SHAPES for shape, _, _ in configs)
        except (IndexError, ValueError, AssertionError):
            sys.exit(f"--configs takes SHAPE:S:B items with SHAPE in {sorted(SHAPES)}, e.g. llama-2-7b:4096:16")
    rows = []
    for shape, S, B in configs:
        new = bench_config(shape, S, B, args.fraction, args.eager, variants=args.selection)
        print(*new, sep="\n", flush=True)
        rows += new
        torch.cuda.empty_cache()
    from kernels.timing import matmul_rate
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, one layer, us = median per step "
          f"(CUDA graph, L2 cleared), step compiled={not args.eager}, copy ceiling {copy_ceiling() / 1e12:.2f} TB/s, "
          f"bf16 matmul {matmul_rate() / 1e12:.0f} TFLOP/s")
    print(HEADER)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
