"""evals.py: each evaluation computes what it claims, checked against independent references (a single full
forward pass, float64 brute-force attention, the prompt's own tokens)."""
import math

import pytest
import torch
import torch.nn.functional as F

import evals
from calibrate import load_calibration
from model import ModelArgs, Transformer, load_model, rope_frequencies
from eval_variants import RANKINGS, ExpectedRopeCache, HybridCache, OracleCache, VariantConfig
from sals_attention import SALSCache, budget
from tokenizer import load_tokenizer

EXACT = {"rank_fraction": 1.0, "value_bits": 16, "sparsity": 1.0}  # a SALS cache that loses nothing


def M(*names) -> list[evals.Method]:
    return [evals.method_named(n) for n in names]


@pytest.fixture(scope="module")
def real(smollm2_dir, quick_calib):
    model = load_model(smollm2_dir, "cpu", torch.float32)
    tokenizer = load_tokenizer(smollm2_dir)
    calib = load_calibration(quick_calib, model)
    return model, tokenizer, calib, evals.held_out_tokens(tokenizer)


# ---------------------------------------------------------------------------------------------
# 1. Perplexity.

def full_forward_ppl(model, tokens: list[int], context: int, n_tokens: int) -> float:
    """exp(mean NLL) of the last n_tokens of tokens[:context], from ONE forward pass over the whole window."""
    ids = torch.tensor(tokens[:context])
    model.setup_caches(1, context)
    with torch.inference_mode():
        logits = model(ids[None], torch.arange(context)[None])[0].double()  # (context, V)
    logp = F.log_softmax(logits[context - n_tokens - 1:context - 1], -1)
    return math.exp(-logp.gather(-1, ids[context - n_tokens:, None]).mean().item())


def test_held_out_text_is_the_part_calibration_never_saw(real):
    _, tokenizer, _, tokens = real
    calib_text = (evals.ROOT / "data" / "calibration.txt").read_text(encoding="utf-8")
    held_out = tokenizer.decode(tokens[:40])
    assert held_out.startswith(evals.HELD_OUT_START) and held_out[:200] not in calib_text
    assert len(tokens) > 8192 * 2


def test_teacher_forced_decode_perplexity_equals_full_forward(real):
    model, _, calib, tokens = real
    context, n = 200, 48
    ref = full_forward_ppl(model, tokens, context, n)
    assert 2 < ref < 1000
    # dense, and a lossless SALS cache in its own batch row: both must reproduce the single forward pass
    res = evals.perplexity(model, calib, tokens, M("dense", "sals-25"), context, 1, n, EXACT)
    assert res["dense"]["ppl"] == pytest.approx(ref, rel=1e-5)
    assert res["sals-25"]["ppl"] == pytest.approx(ref, rel=1e-4)
    # a lossy method next to dense: dense's row is unaffected, the other row really goes through its cache
    res = evals.perplexity(model, calib, tokens, M("sals-12.5", "dense"), context, 1, n, {"min_tokens": 0})
    assert res["dense"]["ppl"] == pytest.approx(ref, rel=1e-5)
    assert abs(res["sals-12.5"]["ppl"] / ref - 1) > 1e-3


def test_perplexity_pools_the_windows(real):
    model, _, calib, tokens = real
    res = evals.perplexity(model, calib, tokens, M("dense"), 128, 3, 16, batch=2)["dense"]  # batches of 2 and 1
    for w in (1, 2):
        ref = full_forward_ppl(model, tokens[128 * w:], 128, 16)
        assert math.exp(res["window_nll"][w]) == pytest.approx(ref, rel=1e-5)
    assert res["ppl"] == pytest.approx(math.exp(sum(res["window_nll"]) / 3), rel=1e-12)
    with pytest.raises(ValueError, match="too few"):
        evals.perplexity(model, calib, tokens[:300], M("dense"), 200, 2, 16)


def test_batched_windows_equal_one_at_a_time(real):
    """Windows side by side in a batch, every method's rows routed through its own cache: each window's NLL is the
    one it gets alone (a lossy method, so a row mix-up would show)."""
    model, _, calib, tokens = real
    methods = M("sals-12.5-paper", "dense", "sals-25-kvbucket")
    together = evals.perplexity(model, calib, tokens, methods, 160, 3, 12, batch=3)
    alone = evals.perplexity(model, calib, tokens, methods, 160, 3, 12, batch=1)
    for m in together:
        assert together[m]["window_nll"] == pytest.approx(alone[m]["window_nll"], rel=1e-5)
    assert len({round(together[m]["ppl"], 4) for m in together}) == 3


# ---------------------------------------------------------------------------------------------
# 3. Per-layer error of the attention output.

def test_attention_error_zero_when_exact_positive_for_sals_125(real):
    model, _, calib, tokens = real
    # the presets' dense layers: the calibration's lowest overlaps (sals_attention.calibrated)
    dense_layers = evals.method_config(evals.method_named("sals-25"), 1024, calib=calib).dense_layers
    assert len(dense_layers) == 3 and dense_layers == evals.method_config(
        evals.method_named("sals-12.5"), 1024, calib=calib).dense_layers
    exact = evals.attention_error(model, calib, tokens, M("sals-25"), 1024, 6, EXACT)["sals-25"]["max"]
    assert all(exact[i] == 0 for i in dense_layers)  # model.KVCache on both sides
    # elsewhere only float32 round-off: the cache rebuilds keys through U U^T = I (U stored in float32)
    assert max(exact) < 1e-5
    lossy = evals.attention_error(model, calib, tokens, M("dense", "sals-12.5"), 1024, 6)
    assert max(lossy["dense"]["max"]) == 0
    err = lossy["sals-12.5"]["mean"]
    assert all(err[i] == 0 for i in dense_layers)
    assert min(e for i, e in enumerate(err) if i not in dense_layers) > 1e-2


def rope64(x: torch.Tensor, pos: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    """RoPE by definition (rotate-half layout), float64: x (..., T, Dh) at positions pos (T,)."""
    angles = pos.double()[:, None] * rope_frequencies(args)  # (T, Dh/2)
    x1, x2 = x.double().chunk(2, -1)
    return torch.cat([x1 * angles.cos() - x2 * angles.sin(), x2 * angles.cos() + x1 * angles.sin()], -1)


class Recorder(torch.nn.Module):
    """Passes through to a layer's cache and keeps every q, k, v it sees."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.q, self.k, self.v = inner, [], [], []

    def forward(self, q, k, v, input_pos, rope, rows=None):
        self.q.append(q), self.k.append(k), self.v.append(v)
        return self.inner(q, k, v, input_pos, rope, rows)


def test_streaming_error_matches_brute_force_sink_window_attention():
    """On a small random model: the errors MethodCaches records for streaming equal float64 brute force
    with attention restricted to the first `sink` and last `window` tokens, window = budget - sink."""
    torch.manual_seed(0)
    args = ModelArgs(vocab_size=97, dim=64, n_layer=3, n_head=4, n_kv_head=2, head_dim=16, intermediate_size=96,
                     max_position_embeddings=512)
    model = Transformer(args).eval()
    for layer in model.layers:  # sharper attention than the default init, so that dropping tokens matters
        layer.attention.wqkv.weight.data[:args.dim] *= 4
    D = args.n_kv_head * args.head_dim
    calib = {"eigvecs": [torch.linalg.qr(torch.randn(D, D, dtype=torch.float64))[0].float()] * args.n_layer}
    S, prompt_len, sink = 128, 100, 4
    overrides = {"sparsity": 0.25, "sink": sink, "dense_layers": (0,), "min_tokens": 0}
    cfg = evals.setup_methods(model, M("streaming"), S, calib, overrides)["streaming"]
    assert cfg.sink == sink and cfg.window == S // 4 - sink and cfg.dense_layers == (0,)
    for layer in model.layers:
        layer.attention.kv_cache = Recorder(layer.attention.kv_cache)
    ids = torch.randint(0, 97, (S,))
    with torch.inference_mode():
        evals.prefill_methods(model, ids[None, :prompt_len], 1, "dense")
        evals.set_route(model, False)
        for t in range(prompt_len, S):
            model(ids[None, t:t + 1], torch.tensor([[t]]))
    for i, layer in enumerate(model.layers):
        rec = layer.attention.kv_cache
        recorded = rec.inner.errors[0]
        assert len(recorded) == S - prompt_len
        if i == 0:
            assert max(recorded) == 0
            continue
        k = rope64(torch.cat(rec.k, 2)[0], torch.arange(S), args).repeat_interleave(2, 0)  # (H, S, Dh)
        v = torch.cat(rec.v, 2)[0].double().repeat_interleave(2, 0)
        for step, t in enumerate(range(prompt_len, S)):
            q = rope64(rec.q[1 + step][0], torch.tensor([t]), args)  # (H, 1, Dh)
            logits = (q @ k[:, :t + 1].transpose(1, 2)) / math.sqrt(args.head_dim)  # (H, 1, t+1)
            j = torch.arange(t + 1)
            kept = (j < sink) | (j > t - cfg.window)
            assert kept.sum() == min(t + 1, S // 4)
            y_dense = logits.softmax(-1) @ v[:, :t + 1]
            y_stream = logits.masked_fill(~kept, -math.inf).softmax(-1) @ v[:, :t + 1]
            expected = ((y_stream - y_dense).norm() / y_dense.norm()).item()
            assert expected > 1e-2
            assert recorded[step] == pytest.approx(expected, rel=1e-4)


# ---------------------------------------------------------------------------------------------
# Methods: the same budget for all.

def test_streaming_has_the_same_budget_as_the_other_methods(real):
    model, _, calib, _ = real
    r_max = calib["eigvecs"][0].shape[1]
    for context in (400, 1024, 2048, 4096, 8192):
        sals = {m: evals.method_config(evals.method_named(m), context).resolve(model.args, r_max)
                for m in ("sals-25", "sals-12.5", "oracle", "sals-25-paper")}
        stream = evals.method_config(evals.method_named("streaming"), context).resolve(model.args, r_max)
        assert stream.sink == 16 and stream.sink + stream.window == min(max(context // 8, 512), context)
        for name, cfg in sals.items():
            assert (cfg.sparsity, cfg.sink, cfg.window, cfg.dense_layers) == (1 / 8, 16, 64, (0, 1, 29))
            assert stream.sparsity == cfg.sparsity and stream.dense_layers == cfg.dense_layers
            # what a SALS step attends at the full context: sinks + window + its top-k share
            n_total = int(budget(torch.tensor(context - 1), cfg)) + cfg.sink + cfg.window
            assert n_total == (context // 8 if name == "sals-25-paper" else stream.sink + stream.window)
    assert sals["oracle"].selector == "oracle" and sals["oracle"].rank == 192 and sals["oracle"].value_bits == 16
    shared = {"sparsity": 0.25, "sink": 8, "dense_layers": (0, 5), "window": 32, "score_dims": 12, "min_tokens": 0}
    stream = evals.method_config(evals.method_named("streaming"), 4096, shared)
    assert (stream.sink, stream.window, stream.dense_layers) == (8, 1024 - 8, (0, 5))
    oracle = evals.method_config(evals.method_named("oracle"), 4096, shared)
    assert (oracle.window, oracle.score_dims, oracle.dense_layers) == (32, None, (0, 5))
    assert evals.method_config(evals.method_named("sals-25"), 4096, shared).score_dims == 12
    # a method's own overrides come after the command line's
    assert evals.method_config(evals.method_named("sals-25-paper"), 4096, {"min_tokens": 300}).min_tokens == 0
    with pytest.raises(ValueError, match="no room for a window"):
        evals.method_config(evals.method_named("streaming"), 64, {"min_tokens": 0})
    with pytest.raises(ValueError, match="unknown method"):
        evals.method_named("h2o")


def test_define_methods_on_the_command_line():
    a = evals.parse_args(["--define", "kv48", "sals-25", '{"selection": "kv-head", "dense_layers": [0, 29]}',
                          "--methods", "dense", "kv48", "sals-12.5-bucket", "--ranking", "bucket-rope"])
    assert [(m.name, m.base, m.overrides) for m in a.methods] == [
        ("dense", "dense", {}), ("kv48", "sals-25", {"selection": "kv-head", "dense_layers": (0, 29)}),
        ("sals-12.5-bucket", "sals-12.5", {"selection": "layer", "ranking": "bucket-rope"})]
    cfg = evals.method_config(a.methods[1], 1024, {"ranking": a.ranking})
    assert (cfg.selection, cfg.ranking, cfg.dense_layers, cfg.rank_fraction) == ("kv-head", "bucket-rope", (0, 29), 0.25)
    for bad in (["--define", "x", "sals-25", '{"colour": 1}'], ["--define", "x", "h2o", "{}"],
                ["--define", "x", "sals-25", "{oops"], ["--methods", "nope"]):
        with pytest.raises(SystemExit):
            evals.parse_args(bad)


@pytest.mark.parametrize("ranking", RANKINGS)
def test_ranking_override_reaches_the_sals_caches(real, ranking):
    model, _, calib, _ = real
    a = evals.parse_args(["--methods", "sals-25", "oracle", "--ranking", ranking])
    assert a.ranking == ranking
    evals.setup_methods(model, a.methods, 1024, calib, {"ranking": a.ranking})
    sals, oracle = model.layers[5].attention.kv_cache.caches
    cache_class, n_buckets = {"pre-rope": (SALSCache, 0), "bucket-rope": (SALSCache, 4),  # 1024 tokens, window 64
                              "expected-rope": (ExpectedRopeCache, 1), "hybrid": (HybridCache, 4)}[ranking]
    assert type(sals) is cache_class and sals.n_buckets == n_buckets
    assert type(oracle) is OracleCache  # the oracle ranks by true logits whatever --ranking says
    with pytest.raises(SystemExit):
        evals.parse_args(["--ranking", "post-rope"])


def test_selection_override_reaches_the_sals_caches(real):
    model, _, calib, tokens = real
    a = evals.parse_args(["--methods", "sals-25", "streaming", "--selection", "kv-head"])
    assert a.selection == "kv-head"
    evals.setup_methods(model, a.methods, 1024, calib, {"selection": a.selection})
    sals, stream = model.layers[5].attention.kv_cache.caches
    assert sals.per_head and not stream.per_head  # a SALS preset override: streaming selects nothing
    with pytest.raises(SystemExit):
        evals.parse_args(["--selection", "query-head"])
    # lossless, per-KV-head selection reproduces the single forward pass; lossy, it differs from the layer's
    context, n = 200, 48
    ref = full_forward_ppl(model, tokens, context, n)
    res = evals.perplexity(model, calib, tokens, M("sals-25"), context, 1, n, {**EXACT, "selection": "kv-head"})
    assert res["sals-25"]["ppl"] == pytest.approx(ref, rel=1e-4)
    lossy = {m: evals.perplexity(model, calib, tokens, M("sals-25"), context, 1, n,
                                 {"selection": m, "sink": 4, "window": 8, "min_tokens": 0})["sals-25"]["ppl"]
             for m in ("layer", "kv-head")}
    assert abs(lossy["kv-head"] / lossy["layer"] - 1) > 1e-4, lossy


# ---------------------------------------------------------------------------------------------
# 2. Pass-key retrieval.

@pytest.fixture(scope="module")
def haystack(real):
    return evals.haystack_tokens(real[1])


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_passkey_prompt_holds_the_key_at_the_depth(real, haystack, depth):
    tokenizer = real[1]
    key, length, offset = "482910", 1000, 5000
    prompt, at = evals.passkey_prompt(tokenizer, haystack, length, depth, key, offset)
    assert len(prompt) == length
    needle = tokenizer.encode(evals.NEEDLE.format(key=key))
    assert prompt[at:at + len(needle)] == needle
    intro, question = tokenizer.encode(evals.INTRO), tokenizer.encode(evals.QUESTION)
    assert prompt[:len(intro)] == intro and prompt[-len(question):] == question
    n_hay = length - len(intro) - len(needle) - len(question)
    hay_before, hay_after = prompt[len(intro):at], prompt[at + len(needle):len(prompt) - len(question)]
    assert hay_before + hay_after == haystack[offset:offset + n_hay]  # the haystack, whole and in order
    requested = round(depth * n_hay)
    assert requested - evals.SNAP <= len(hay_before) <= requested
    if len(hay_before) not in (0, requested):  # moved back: to just after a sentence
        assert tokenizer.decode(hay_before[-3:]).rstrip().endswith(".")
    text = tokenizer.decode(prompt)
    assert text.count(key) == 2 and text.endswith("What is the pass key? The pass key is")


def test_passkey_scorer():
    assert evals.passkey_found(" 48291. Remember", "48291")
    assert evals.passkey_found("The pass key is 482910", "482910")
    assert not evals.passkey_found(" 4829", "48291")
    assert not evals.passkey_found(" 482911", "48291")  # a longer number is not the key
    assert not evals.passkey_found(" 148291", "48291")
    assert not evals.passkey_found(" 48 291", "48291")
    assert not evals.passkey_found("", "48291")


def test_passkey_end_to_end_retrieves_under_decode(real, haystack):
    """The whole loop on the real model: dense finds a key at 1K, and a lossless SALS cache, which attends
    the question through its own decode steps, answers exactly as dense does."""
    model, tokenizer, calib, _ = real
    res = evals.passkey(model, calib, tokenizer, haystack, M("dense", "sals-25"), [1024], [0.5], 1, EXACT)
    rec = res["records"][0]
    assert rec["found"]["dense"], rec
    assert rec["answers"]["sals-25"] == rec["answers"]["dense"]
    assert res["accuracy"]["dense"] == {"overall": 1.0, "cells": {"1024/0.5": 1.0}}


@pytest.mark.parametrize("min_tokens", [0, 120])
def test_head_topk_cache_attends_each_heads_own_top_tokens(min_tokens):
    """oracle-head's decode step against float64 brute force: for each KV head, softmax over the sinks, the window
    and that head's own top-n_b candidates by its post-RoPE logits summed over its query heads; two rows at
    different positions, heads that choose different tokens. min_tokens 120: the row at 60 attends every token
    (fewer candidates than the top-k width), the one at 150 120 tokens."""
    from kernels.ranking import ranking_key
    from model import apply_rope, rope_table
    torch.manual_seed(0)
    B, H, Hkv, Dh, S = 2, 6, 3, 16, 200
    cfg = VariantConfig(rank_fraction=1.0, value_bits=16, selector="oracle", sink=4, window=8, sparsity=0.25,
                        dense_layers=(), min_tokens=min_tokens)
    args = ModelArgs(vocab_size=1, dim=H * Dh, n_layer=1, n_head=H, n_kv_head=Hkv, head_dim=Dh,
                     intermediate_size=1, max_position_embeddings=S)
    cache = evals.HeadTopKCache(cfg, B, S, Hkv, Dh, torch.float32)
    table = rope_table(args, S)
    pos = torch.tensor([[150], [60]])
    k, v = torch.randn(B, Hkv, S, Dh), torch.randn(B, Hkv, S, Dh)
    all_pos = torch.arange(S).expand(B, S)
    cache(torch.randn(B, H, S, Dh), k, v, all_pos, table[all_pos])  # prefill every slot (later ones unused)
    q = torch.randn(B, H, 1, Dh) * 2
    out = cache(q, torch.randn(B, Hkv, 1, Dh), torch.randn(B, Hkv, 1, Dh), pos, table[pos])  # the new token
    kc, vc = cache.cache.k_cache.double(), cache.cache.v_cache.double()
    q_rope = apply_rope(q, table[pos]).double()[:, :, 0]
    chosen = []
    for b in range(B):
        p = int(pos[b])
        n_b = max(math.floor((p + 1) * cfg.sparsity), min(min_tokens, p + 1)) - cfg.sink - cfg.window
        for h in range(Hkv):
            qs = q_rope[b, h * 2:(h + 1) * 2]  # (G, Dh)
            summed = {j: float(qs.sum(0) @ kc[b, h, j]) for j in range(cfg.sink, p - cfg.window + 1)}
            # the selection rule (kernels.ranking): scores cut to bfloat16 precision, ties to the earliest position
            key = {j: int(ranking_key(torch.tensor(x, dtype=torch.float32))) for j, x in summed.items()}
            top = sorted(summed, key=lambda j: (key[j], j))[:n_b]
            chosen.append(set(top))
            keys = list(range(cfg.sink)) + list(range(p - cfg.window + 1, p + 1)) + top
            for g in range(2):
                w = torch.softmax(kc[b, h, keys] @ q_rope[b, h * 2 + g] / math.sqrt(Dh), 0)
                ref = w @ vc[b, h, keys]
                assert torch.allclose(out[b, h * 2 + g, 0].double(), ref, atol=1e-5), (b, h, g)
    assert chosen[0] != chosen[1] and chosen[1] != chosen[2]  # the heads really choose differently
    assert len(chosen[3]) == (49 if min_tokens else 3)  # row 2 at 60: every candidate, or the proportional 3


def test_short_prompt_pass_key_found_as_dense_finds_it(real, haystack):
    """Issue 14: a 400-token prompt is shorter than (sinks + window) / sparsity = 640 tokens, so the paper's
    proportional budget attends only the 16 sinks and the 64-token window and misses the pass key that dense attention
    finds. The default's minimum budget attends every cached token, and with their keys at full rank (not rank-D/4
    latents, which missed the second key here) both presets find what dense finds."""
    model, tokenizer, calib, _ = real
    res = evals.passkey(model, calib, tokenizer, haystack, M("dense", "sals-25-paper", "sals-25", "sals-12.5"), [410],
                        [0.5], 2)
    for rec in res["records"]:
        assert 0.3 < rec["needle_at"] < 0.7  # far outside the recent window
        assert rec["found"] == {"dense": True, "sals-25-paper": False, "sals-25": True, "sals-12.5": True}, rec


# ---------------------------------------------------------------------------------------------
# RULER-style tasks.

@pytest.mark.parametrize("task", list(evals.RULER_TASKS))
def test_ruler_prompt_holds_its_needles(real, haystack, task):
    """Exact length; the instruction, then the haystack whole and in order with every needle inserted (in order of
    depth), then the question; each expected string in a needle and nowhere else in the haystack part."""
    import random
    tokenizer = real[1]
    for seed in range(3):
        rng = random.Random(f"t/{seed}")
        intro, needles, question, expected = evals.ruler_sample(task, random.Random(f"t/{seed}"))
        ids, rec = evals.ruler_prompt(tokenizer, haystack, task, 700, rng)
        assert len(ids) == 700 and rec["expected"] == expected
        enc = [tokenizer.encode(n) for n in needles]
        at = [round(a * 700) for a in rec["needles_at"]]
        assert at == sorted(at)
        for a, n in zip(at, enc):
            assert ids[a:a + len(n)] == n
        i_q, i_intro = len(ids) - rec["question_tokens"], len(tokenizer.encode(intro))
        assert ids[:i_intro] == tokenizer.encode(intro) and ids[i_q:] == tokenizer.encode(question)
        hay = [t for j, t in enumerate(ids[i_intro:i_q], i_intro)
               if not any(a <= j < a + len(n) for a, n in zip(at, enc))]
        start = next(o for o in range(len(haystack)) if haystack[o:o + 20] == hay[:20])
        assert hay == haystack[start:start + len(hay)]
        text, hay_text = tokenizer.decode(ids), tokenizer.decode(hay)
        for e in expected:
            assert e in "".join(needles) and e not in hay_text and e in text
        n_expected = {"multivalue": evals.RULER_NEEDLES, "multiquery": evals.RULER_NEEDLES,
                      "vartrack": evals.RULER_HOPS + 1}.get(task, 1)
        n_needles = {"niah-number": 1, "niah-word": 1, "vartrack": evals.RULER_HOPS + 1}.get(task, evals.RULER_NEEDLES)
        assert len(expected) == n_expected and len(needles) == n_needles
        if task == "vartrack":  # the chain: X0 = value, X1 = X0, ...
            assert needles[0].strip() == f"VAR {expected[0]} = " + question.split("value ")[1].split(" ")[0]
            assert [n.strip() for n in needles[1:]] == [f"VAR {b} = VAR {a}" for a, b in zip(expected, expected[1:])]


def test_ruler_score_is_string_match_all():
    assert evals.ruler_score(" 1234567.", ["1234567"]) == 1.0
    assert evals.ruler_score(" 1234567, 7654321 and", ["1234567", "7654321", "1111111"]) == pytest.approx(2 / 3)
    assert evals.ruler_score(" abcde, XYZQW", ["ABCDE", "xyzqw"]) == 1.0  # case-insensitive
    assert evals.ruler_score(" 123456", ["1234567"]) == 0.0


def test_generate_batch_rows_are_independent(real, haystack):
    """Prompts side by side: each method's answer to each prompt is the one it gives to that prompt alone (dense,
    and a lossy SALS method in its own rows); the lossless cache answers as dense does."""
    import random
    model, tokenizer, calib, _ = real
    prompts = [evals.ruler_prompt(tokenizer, haystack, "niah-number", 500, random.Random(s))[0] for s in range(2)]
    methods = M("dense", "sals-12.5-paper", "sals-25")
    both = evals.generate_batch(model, calib, methods, prompts, 512, 30, 12, {"value_bits": 16, "rank_fraction": 1.0,
                                                                             "sparsity": 1.0})
    assert torch.equal(both[2], both[0]) and both[0].shape == (2, 12)  # sals-25 made lossless here
    lossy = evals.generate_batch(model, calib, methods[:2], prompts, 512, 30, 12)
    for b in range(2):
        alone = evals.generate_batch(model, calib, methods[:2], prompts[b:b + 1], 512, 30, 12)
        assert torch.equal(alone[:, 0], lossy[:, b])
    assert not torch.equal(lossy[0], lossy[1])


# ---------------------------------------------------------------------------------------------
# Statistics, costs, merged runs.

def test_paired_interval():
    """Percentile bootstrap of the mean of paired differences: a constant difference has a zero-width interval;
    for many Bernoulli differences the interval is close to mean +- 1.96 sd / sqrt(n)."""
    assert evals.paired_interval([0.5] * 30) == pytest.approx((0.5, 0.5, 0.5))
    g = torch.Generator().manual_seed(1)
    d = (torch.rand(400, generator=g) < 0.3).double() - (torch.rand(400, generator=g) < 0.2).double()
    mean, lo, hi = evals.paired_interval(d.tolist())
    half = 1.96 * d.std().item() / math.sqrt(len(d))
    assert mean == pytest.approx(d.mean().item()) and lo < mean < hi
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.1) and (lo + hi) / 2 == pytest.approx(mean, abs=0.2 * half)


def test_decode_cost_counts_what_kv_memory_counts():
    """Memory: every byte, as bench/kv_memory.py counts it; dense reads its whole cache and its attention FLOPs are
    4 H Dh S per layer; SALS reads less than half of dense at 8K, its FLOPs as counted by hand, and per-KV-head
    selection reads the selected latents once per KV head (more) at the same memory; a short context rebuilds
    nothing."""
    import sys
    from conftest import ROOT
    from sals_attention import SALSConfig
    sys.path.insert(0, str(ROOT / "bench"))
    import kv_memory
    args = ModelArgs(vocab_size=1, dim=576, n_layer=30, n_head=9, n_kv_head=3, head_dim=64, intermediate_size=1,
                     max_position_embeddings=8192)
    dense = evals.decode_cost(args, None, 8192, 192)
    assert dense["bytes"] == dense["bytes_read"] == kv_memory.cache_bytes(args, 1, 8192, None)
    assert dense["flops"] == 30 * 4 * 9 * 64 * 8192
    for f in (0.25, 0.125):
        c = evals.decode_cost(args, VariantConfig.preset(f, paper=True), 8192, 192)
        assert c["bytes"] == kv_memory.cache_bytes(args, 1, 8192, SALSConfig.preset(f))
        assert c["bytes_read"] < dense["bytes_read"] / 2
        r = round(192 * f)  # hand count: compress, latent query, 8112 scores, rebuild 944 keys, attend 1024 tokens
        per_layer = 2 * 192 * r + 2 * 192 * (r // 2) + 2 * (r // 2) * 8112 + 2 * r * 192 * 944 + 4 * 9 * 64 * 1024
        assert c["flops"] == 3 * 4 * 9 * 64 * 8192 + 27 * per_layer  # more than dense: rebuilding is 2 r D per key
        kv = evals.decode_cost(args, VariantConfig.preset(f, paper=True, selection="kv-head"), 8192, 192)
        assert kv["bytes"] == c["bytes"] and kv["bytes_read"] > c["bytes_read"]
    # 400 tokens, the default (3 distance buckets, per-KV-head scores): below min_tokens every one of the 320
    # candidates is attended with its key read at full rank, so nothing is rebuilt
    short = evals.decode_cost(args, VariantConfig.preset(0.25), 400, 192)
    per_layer = 2 * 192 * 48 + 3 * 2 * 192 * 24 + 3 * 2 * 24 * 320 + 4 * 9 * 64 * 400
    assert short["flops"] == 3 * 4 * 9 * 64 * 400 + 27 * per_layer


def test_merge_results_pools_parts():
    def part(contexts, found, ruler, task="t"):
        recs = [{"context": c, "depth": 0.5, "found": {"dense": f, "x": not f}} for c, f in zip(contexts, found)]
        rrecs = [{"task": task, "context": c, "score": {"dense": s, "x": 0.0}} for c, s in zip(contexts, ruler)]
        return {"methods": ["dense", "x"], "seconds": {"passkey": 1.0}, "costs": {"context": max(contexts)},
                "passkey": {"contexts": contexts, "depths": [0.5], "trials": 1, "records": recs},
                "ruler": {"contexts": contexts, "tasks": [task], "samples": 1, "records": rrecs},
                "ppl": {"p": {"contexts": {str(c): {} for c in contexts}, "windows": {str(c): 2 for c in contexts}}}}
    merged = evals.merge_results([part([1024], [True], [1.0]), part([2048, 4096], [False, True], [0.5, 0.0])])
    assert merged["passkey"]["accuracy"]["dense"] == {"overall": 2 / 3, "cells": {"1024/0.5": 1.0, "2048/0.5": 0.0,
                                                                                  "4096/0.5": 1.0}}
    assert merged["ruler"]["score"]["dense"] == {"t/1024": 1.0, "t/2048": 0.5, "t/4096": 0.0}
    assert list(merged["ppl"]["p"]["contexts"]) == ["1024", "2048", "4096"] and merged["costs"]["context"] == 4096
    assert len(merged["seconds"]) == 2
    by_task = evals.merge_results([part([1024], [True], [1.0]), part([1024], [True], [0.5], task="u")])  # split runs
    assert by_task["ruler"]["tasks"] == ["t", "u"]
    assert by_task["ruler"]["score"]["dense"] == {"t/1024": 1.0, "u/1024": 0.5}
    with pytest.raises(ValueError, match="same methods"):
        evals.merge_results([part([1024], [True], [1.0]), dict(part([1024], [True], [1.0]), methods=["dense"])])


def test_merge_results_scores_parts_of_different_sizes():
    """A part with 2 samples per cell and one with 1: each cell's mean is over its own records."""
    def part(context, found):
        recs = [{"context": context, "depth": 0.5, "found": {"dense": f}} for f in found]
        rrecs = [{"task": "t", "context": context, "score": {"dense": float(f)}} for f in found]
        return {"methods": ["dense"], "seconds": {}, "costs": {"context": context},
                "passkey": {"contexts": [context], "depths": [0.5], "trials": len(found), "records": recs},
                "ruler": {"contexts": [context], "tasks": ["t"], "samples": len(found), "records": rrecs}}
    merged = evals.merge_results([part(1024, [True, False]), part(2048, [True])])
    assert merged["passkey"]["accuracy"]["dense"]["cells"] == {"1024/0.5": 0.5, "2048/0.5": 1.0}
    assert merged["ruler"]["score"]["dense"] == {"t/1024": 0.5, "t/2048": 1.0}


def test_cli_checks_every_window_count_before_running(smollm2_dir, tmp_path, capsys):
    """A window count the text cannot hold is refused before the first evaluation runs, not after the earlier
    contexts' results (which would be lost with the run)."""
    code = evals.main(["--checkpoint", str(smollm2_dir), "--evals", "ppl", "--methods", "dense", "--ppl_contexts",
                       "64", "8192", "--ppl_windows", "1", "16", "--ppl_tokens", "16", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "too few for 16 windows of 8192 (at most 13)" in err, err
    assert "ppl pride_and_prejudice (held out) 64:" not in err and not list(tmp_path.iterdir())
