"""eval_variants.py: the evaluation-only SALS caches against the float64 brute force of tests/test_sals_attention.py,
and how the variants' configs are checked and kept out of the product cache."""
import pytest
import torch

from eval_variants import (ExpectedRopeCache, HybridCache, OracleCache, VariantConfig, setup_variant,
                           variant_cache)
from model import Transformer
from sals_attention import SALSCache, SALSConfig, setup_sals
from test_sals_attention import (BruteForce, best, check_fused_path, check_mean_post_rope_logit,
                                 check_one_kv_head_is_the_layer, check_selection, feed_layer, orthonormal, rope64,
                                 small_args)
from test_sals_attention import one_thread  # noqa: F401  (autouse: these tensors are tiny too)


def feed_variant(cfg: VariantConfig, *args, **kwargs):
    """feed_layer through the cache class of cfg's variant."""
    cache_class, product = variant_cache(cfg)
    return feed_layer(product, *args, cache_class=cache_class, **kwargs)


def brute_variant_selection(cfg: VariantConfig, q, pos: int, hist, U) -> set[int]:
    """The positions a variant should select for one row, by definition (BruteForce): the oracle by the true
    post-RoPE logit summed over heads; expected-rope by the latent view's post-RoPE logit averaged over every
    candidate position; hybrid the top half of the budget by pre-rope, the rest by bucket-rope among the other
    candidates."""
    row = BruteForce(cfg, q, pos, hist, U)
    if cfg.selector == "oracle":
        true_logit = lambda j: sum(float(row.q_rope[h] @ rope64(hist[j][0][h // row.G], j))  # noqa: E731
                                   for h in range(row.H))
        return set(best(row.cands, true_logit, row.n))
    if cfg.ranking == "expected-rope":
        return set(best(row.cands, lambda j: row.mean_logit(j, row.cands), row.n))
    assert cfg.ranking == "hybrid"
    first = best(row.cands, row.pre_rope, row.n // 2)
    return set(first) | set(best(set(row.cands) - set(first), row.bucket_rope, row.n - row.n // 2))


@pytest.mark.parametrize("selector,ranking", [("oracle", "pre-rope"), ("latent", "expected-rope"),
                                              ("latent", "hybrid")])
@pytest.mark.parametrize("heads", [(6, 2), (3, 3)])  # GQA with G = 3, and MHA
def test_selection_equals_brute_force(selector, ranking, heads):
    check_selection(heads, brute_variant_selection, feed_variant, VariantConfig, selector=selector, ranking=ranking)


@pytest.mark.parametrize("heads", [(6, 2), (3, 3)])
def test_expected_rope_query_is_the_mean_post_rope_logit(heads):
    check_mean_post_rope_logit(heads, True, feed_variant, VariantConfig, ranking="expected-rope")


def test_hybrid_with_one_kv_head_is_the_layer_selection():
    check_one_kv_head_is_the_layer(feed_variant, VariantConfig, ranking="hybrid")


@pytest.mark.parametrize("override,refused", [
    (dict(ranking="expected-rope"), None), (dict(selection="kv-head", ranking="expected-rope"), None),
    (dict(ranking="hybrid"), "hybrid ranking has no GPU kernel"), (dict(selector="oracle"), "oracle selector")])
def test_the_fused_path_runs_expected_rope_and_refuses_the_rest(monkeypatch, override, refused):
    """expected-rope is bucket-rope with one bucket, which the fused step runs; the variants without a kernel are
    refused with a message rather than run through the slow reference."""
    check_fused_path(monkeypatch, refused, feed_variant, VariantConfig, **override)


def test_variant_caches_and_their_product_configs():
    """Each variant runs in its own cache class over a product config: the rankings on bucket-rope's buckets
    (expected-rope with one), the oracle on full keys of its own (k_full: allocated, and read every step)."""
    args = small_args(n_head=4, n_kv_head=2, head_dim=64)  # D = 128
    B, S, Hkv, Dh, D = 3, 50, 2, 64, 128
    caches = {}
    for name, kw in [("latent", {}), ("bucket", dict(ranking="bucket-rope")),
                     ("expected", dict(ranking="expected-rope")), ("hybrid", dict(ranking="hybrid")),
                     ("oracle", dict(selector="oracle", ranking="bucket-rope"))]:
        cfg = VariantConfig(rank=40, value_bits=4, sink=5, window=7, **kw).resolve(args, D)
        cache_class, product = variant_cache(cfg)
        assert type(product) is SALSConfig and product.rank == 40
        caches[name] = cache_class(product, args, B, S, torch.zeros(D, 40, dtype=torch.bfloat16))
    assert [type(c) for c in caches.values()] == [SALSCache, SALSCache, ExpectedRopeCache, HybridCache, OracleCache]
    assert [c.n_buckets for c in caches.values()] == [0, 3, 1, 3, 0]  # 50 positions, window 7: 7, 14, 28 and on
    k_full = B * S * Hkv * Dh * 2
    assert caches["oracle"].bytes_allocated() == caches["latent"].bytes_allocated() + k_full
    assert caches["oracle"].bytes_allocated() == sum(t.untyped_storage().nbytes() for t in caches["oracle"].buffers())
    assert caches["oracle"].bytes_read_per_step() == caches["latent"].bytes_read_per_step() + k_full
    assert {caches[n].bytes_allocated() for n in ("latent", "bucket", "expected", "hybrid")} == {
        caches["latent"].bytes_allocated()}


def test_setup_variant_builds_the_variant_caches():
    torch.manual_seed(0)
    args = small_args(n_layer=5, head_dim=32)
    model = Transformer(args)
    gen = torch.Generator().manual_seed(2)
    calib = {"eigvecs": [orthonormal(64, gen).float() for _ in range(5)]}
    cfg = setup_variant(model, 2, 40, VariantConfig.preset(0.125, ranking="hybrid"), calib)
    assert type(cfg) is VariantConfig and (cfg.ranking, cfg.selection, cfg.rank, cfg.dense_layers) == (
        "hybrid", "kv-head", 8, (0, 1, 4))
    assert [type(layer.attention.kv_cache).__name__ for layer in model.layers] == [
        "KVCache", "KVCache", "HybridCache", "HybridCache", "KVCache"]


@pytest.mark.parametrize("kw,match", [
    (dict(selector="random"), "selector 'random'"), (dict(ranking="post-rope"), "ranking 'post-rope'"),
    (dict(selector="oracle", selection="kv-head"), "oracle-head"),
    (dict(rank=17, ranking="hybrid"), "rank 17 is outside 1..16"),  # the product's checks too
])
def test_invalid_variant_configs(kw, match):
    args = small_args(n_head=4, n_kv_head=2, head_dim=8)  # D = 16, 4 layers
    with pytest.raises(ValueError, match=match):
        VariantConfig(**{"value_bits": 16, **kw}).resolve(args, 16)


@pytest.mark.parametrize("kw", [dict(ranking="hybrid"), dict(selector="oracle", selection="layer")])
def test_the_product_cache_refuses_a_variant(kw):
    """A variant's config handed to the product's setup_sals resolves, but SALSCache refuses it, saying where it
    runs; a variant ranking in the product's own config is refused when it resolves."""
    args = small_args(n_layer=4, head_dim=32)
    calib = {"eigvecs": [torch.eye(64)] * 4}
    with pytest.raises(ValueError, match=r"SALSCache runs a SALSConfig, not a VariantConfig: .* evals.py"):
        setup_sals(Transformer(args), 1, 8, VariantConfig.preset(0.25, **kw), calib)
    if "ranking" in kw:
        with pytest.raises(ValueError, match="evaluation variants run in evals.py"):
            setup_sals(Transformer(args), 1, 8, SALSConfig.preset(0.25, **kw), calib)


@pytest.mark.parametrize("bits", [2, 4])
def test_quantized_keys_are_the_latents_within_half_a_step_and_counted_packed(bits):
    """key_bits: the stored latents are the 16-bit cache's, each within half its group's quantization step (the
    step from the group's own range, computed here), and the caches' byte counts differ by exactly the packed
    store's arithmetic: per token r * bits / 8 bytes of codes and a 16-bit scale and zero per 32 channels, instead of
    2 r bytes."""
    args = small_args(n_head=4, n_kv_head=2, head_dim=64)  # D = 128
    B, S, D, r = 2, 40, 128, 96
    cfg = VariantConfig(rank=r, score_dims=32, value_bits=4, sink=4, window=8, min_tokens=0, key_bits=bits
                        ).resolve(args, D)
    U = orthonormal(D, torch.Generator().manual_seed(3))[:, :r].to(torch.bfloat16)
    cache_class, product = variant_cache(cfg)
    quant, plain = cache_class(product, args, B, S, U), SALSCache(product, args, B, S, U)
    gen = torch.Generator().manual_seed(4)
    k, v = (torch.randn(B, 2, S, 64, generator=gen).to(torch.bfloat16) for _ in range(2))
    pos = torch.arange(S).expand(B, S)
    for c in (quant, plain):
        c.write(torch.arange(B), k, k, v, pos)
    lat = torch.cat([plain.k_lat_score, plain.k_lat_rest], -1).float()  # (B, S, r)
    got = torch.cat([quant.k_lat_score, quant.k_lat_rest], -1).float()
    g = lat.unflatten(-1, (-1, 32))
    big = g.abs().amax(-1, keepdim=True)  # (B, S, r / 32, 1)
    # the group's range over its levels, widened by the 16-bit rounding of zero (down) and scale (up) ...
    half_step = (g.amax(-1, keepdim=True) - g.amin(-1, keepdim=True) + big / 2 ** 8) / (2 ** bits - 1) / 2 * (1 + 2 ** -7)
    err = (got - lat).abs().unflatten(-1, (-1, 32))
    assert (err <= half_step + big / 2 ** 8).all()  # ... plus the 16-bit rounding of the dequantized latent
    assert err.max() > 0  # quantized, not copied
    assert torch.equal(quant.v_q, plain.v_q) and torch.equal(quant.win_k, plain.win_k)
    per_token = 2 * r - (r * bits // 8 + (r // 32) * 2 * 2)
    assert plain.bytes_allocated() - quant.bytes_allocated() == B * S * per_token
    prefix = 2 * 32 - (32 * bits // 8 + 2 * 2)  # the score prefix of every slot
    selected = B * quant.k_max * per_token  # layer selection: one latent per selected token
    assert plain.bytes_read_per_step() - quant.bytes_read_per_step() == B * S * prefix + selected


@pytest.mark.parametrize("kw,match", [
    (dict(key_bits=3), "key_bits 3 is not one of 2, 4, 16"),
    (dict(key_bits=4, rank=48, score_dims=24), "multiples of 32"),
    (dict(key_bits=4, ranking="hybrid", rank=64, score_dims=32), "product's rankings"),
])
def test_invalid_quantized_key_configs(kw, match):
    args = small_args(n_head=4, n_kv_head=2, head_dim=64)  # D = 128
    with pytest.raises(ValueError, match=match):
        VariantConfig(**kw).resolve(args, 128)
