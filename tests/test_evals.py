"""evals.py: each evaluation computes what it claims, checked against independent references (a single full
forward pass, float64 brute-force attention, the prompt's own tokens)."""
import math

import pytest
import torch
import torch.nn.functional as F

import evals
from calibrate import load_calibration
from model import ModelArgs, Transformer, load_model, rope_frequencies
from tokenizer import load_tokenizer

EXACT = {"rank_fraction": 1.0, "value_bits": 16, "sparsity": 1.0}  # a SALS cache that loses nothing


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
    res = evals.perplexity(model, calib, tokens, ["dense", "sals-25"], context, 1, n, EXACT)
    assert res["dense"]["ppl"] == pytest.approx(ref, rel=1e-5)
    assert res["sals-25"]["ppl"] == pytest.approx(ref, rel=1e-4)
    # a lossy method next to dense: dense's row is unaffected, the other row really goes through its cache
    res = evals.perplexity(model, calib, tokens, ["sals-12.5", "dense"], context, 1, n)
    assert res["dense"]["ppl"] == pytest.approx(ref, rel=1e-5)
    assert abs(res["sals-12.5"]["ppl"] / ref - 1) > 1e-3


def test_perplexity_pools_the_windows(real):
    model, _, calib, tokens = real
    res = evals.perplexity(model, calib, tokens, ["dense"], 128, 2, 16)["dense"]
    second = full_forward_ppl(model, tokens[128:], 128, 16)
    assert res["window_ppl"][1] == pytest.approx(second, rel=1e-5)
    assert res["ppl"] == pytest.approx(math.sqrt(res["window_ppl"][0] * res["window_ppl"][1]), rel=1e-9)
    with pytest.raises(ValueError, match="too few"):
        evals.perplexity(model, calib, tokens[:300], ["dense"], 200, 2, 16)


# ---------------------------------------------------------------------------------------------
# 3. Per-layer error of the attention output.

def test_attention_error_zero_when_exact_positive_for_sals_125(real):
    model, _, calib, tokens = real
    dense_layers = (0, 1, model.args.n_layer - 1)
    exact = evals.attention_error(model, calib, tokens, ["sals-25"], 1024, 6, EXACT)["sals-25"]["max"]
    assert all(exact[i] == 0 for i in dense_layers)  # model.KVCache on both sides
    # elsewhere only float32 round-off: the cache rebuilds keys through U U^T = I (U stored in float32)
    assert max(exact) < 1e-5
    lossy = evals.attention_error(model, calib, tokens, ["dense", "sals-12.5"], 1024, 6)
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
    overrides = {"sparsity": 0.25, "sink": sink, "dense_layers": (0,)}
    cfg = evals.setup_methods(model, ["streaming"], S, calib, overrides)["streaming"]
    assert cfg.sink == sink and cfg.window == S // 4 - sink and cfg.dense_layers == (0,)
    for layer in model.layers:
        layer.attention.kv_cache = Recorder(layer.attention.kv_cache)
    ids = torch.randint(0, 97, (S,))
    with torch.inference_mode():
        evals.prefill_methods(model, ids[:prompt_len].tolist(), 1, "dense")
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
    for context in (1024, 2048, 4096, 8192):
        sals = {m: evals.method_config(m, context).resolve(model.args, r_max)
                for m in ("sals-25", "sals-12.5", "oracle")}
        stream = evals.method_config("streaming", context).resolve(model.args, r_max)
        assert stream.sink == 16 and stream.sink + stream.window == context // 8  # sparsity 1/8 of the context
        for cfg in sals.values():
            assert (cfg.sparsity, cfg.sink, cfg.window, cfg.dense_layers) == (1 / 8, 16, 64, (0, 1, 29))
            assert stream.sparsity == cfg.sparsity and stream.dense_layers == cfg.dense_layers
            # what a SALS step attends at the full context: sinks + window + its top-k share
            assert math.floor(cfg.sparsity * context) == stream.sink + stream.window
    assert sals["oracle"].selector == "oracle" and sals["oracle"].rank == 192 and sals["oracle"].value_bits == 16
    shared = {"sparsity": 0.25, "sink": 8, "dense_layers": (0, 5), "window": 32, "score_dims": 12}
    stream = evals.method_config("streaming", 4096, shared)
    assert (stream.sink, stream.window, stream.dense_layers) == (8, 1024 - 8, (0, 5))
    oracle = evals.method_config("oracle", 4096, shared)
    assert (oracle.window, oracle.score_dims, oracle.dense_layers) == (32, None, (0, 5))
    assert evals.method_config("sals-25", 4096, shared).score_dims == 12
    with pytest.raises(ValueError, match="no room for a window"):
        evals.method_config("streaming", 64)
    with pytest.raises(ValueError, match="unknown method"):
        evals.method_config("h2o", 1024)


@pytest.mark.parametrize("ranking", ["pre-rope", "expected-rope", "bucket-rope"])
def test_ranking_override_reaches_the_sals_caches(real, ranking):
    model, _, calib, _ = real
    a = evals.parse_args(["--methods", "sals-25", "oracle", "--ranking", ranking])
    assert a.ranking == ranking
    evals.setup_methods(model, a.methods, 1024, calib, {"ranking": a.ranking})
    sals, oracle = model.layers[5].attention.kv_cache.caches
    assert sals.ranking == ranking and oracle.oracle  # the oracle ranks by true logits whatever --ranking says
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
    res = evals.perplexity(model, calib, tokens, ["sals-25"], context, 1, n, {**EXACT, "selection": "kv-head"})
    assert res["sals-25"]["ppl"] == pytest.approx(ref, rel=1e-4)
    lossy = {m: evals.perplexity(model, calib, tokens, ["sals-25"], context, 1, n, {"selection": m, "sink": 4,
                                                                                      "window": 8})["sals-25"]["ppl"]
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
    res = evals.passkey(model, calib, tokenizer, haystack, ["dense", "sals-25"], [1024], [0.5], 1, EXACT)
    rec = res["records"][0]
    assert rec["found"]["dense"], rec
    assert rec["answers"]["sals-25"] == rec["answers"]["dense"]
    assert res["accuracy"]["dense"] == {"overall": 1.0, "cells": {"1024/0.5": 1.0}}


def test_head_topk_cache_attends_each_heads_own_top_tokens():
    """oracle-head's decode step against float64 brute force: for each KV head, softmax over the sinks, the window
    and that head's own top-n_b candidates by its post-RoPE logits summed over its query heads; two rows at
    different positions, heads that choose different tokens."""
    from model import apply_rope, rope_table
    from sals_attention import SALSConfig
    torch.manual_seed(0)
    B, H, Hkv, Dh, S = 2, 6, 3, 16, 200
    cfg = SALSConfig(rank_fraction=1.0, value_bits=16, selector="oracle", sink=4, window=8, sparsity=0.25,
                     dense_layers=())
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
        n_b = math.floor((p + 1) * cfg.sparsity) - cfg.sink - cfg.window
        for h in range(Hkv):
            qs = q_rope[b, h * 2:(h + 1) * 2]  # (G, Dh)
            summed = {j: float(qs.sum(0) @ kc[b, h, j]) for j in range(cfg.sink, p - cfg.window + 1)}
            top = sorted(summed, key=summed.get, reverse=True)[:n_b]
            chosen.append(set(top))
            keys = list(range(cfg.sink)) + list(range(p - cfg.window + 1, p + 1)) + top
            for g in range(2):
                w = torch.softmax(kc[b, h, keys] @ q_rope[b, h * 2 + g] / math.sqrt(Dh), 0)
                ref = w @ vc[b, h, keys]
                assert torch.allclose(out[b, h * 2 + g, 0].double(), ref, atol=1e-5), (b, h, g)
    assert chosen[0] != chosen[1] and chosen[1] != chosen[2]  # the heads really choose differently
