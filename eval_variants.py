"""The SALS variants that evals.py measures but users do not run: rankings that lost to the product's (EVAL.md) and
the exact per-layer oracle, SALS's ceiling. Each is a SALSCache subclass over a product config; VariantConfig
names them with the fields evals.py's command line and saved results use (ranking, selector).

  ranking "expected-rope"  q rotated by RoPE's rotation averaged over all the candidates' distances (bucket-rope with
                           one bucket): one average over so wide a range damps more RoPE frequencies than bucket-rope's
  ranking "hybrid"         half of the budget by pre-rope (what a token says, at any distance: retrieval), the other
                           half by bucket-rope among the tokens left (where attention goes: perplexity); on SmolLM2
                           each wins one of the two
  selector "oracle"        the top tokens by their true post-RoPE logits summed over the layer's heads, from
                           full-precision keys kept for it
"""
import math
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

from kernels.ranking import select_top_reference
from model import ModelArgs, apply_rope
from sals_attention import RANKINGS as PRODUCT_RANKINGS, SALSCache, SALSConfig, setup_sals

VARIANT_RANKINGS = ("expected-rope", "hybrid")
RANKINGS = PRODUCT_RANKINGS + VARIANT_RANKINGS
SELECTORS = ("latent", "oracle")


@dataclass(frozen=True)
class VariantConfig(SALSConfig):
    """SALSConfig with the variants' rankings and the selector; variant_cache maps it to a cache class and the product
    config that class runs."""
    selector: str = "latent"  # "oracle": exact top-k by the true post-RoPE logits

    def resolve(self, args: ModelArgs, r_max: int) -> "VariantConfig":
        """SALSConfig.resolve, with the ranking and the selector checked here."""
        for ok, msg in [
                (self.ranking in RANKINGS, f"ranking {self.ranking!r} is not one of {', '.join(RANKINGS)}."),
                (self.selector in SELECTORS, f"selector {self.selector!r} is not one of {', '.join(SELECTORS)}."),
                (self.selection == "layer" or self.selector == "latent",
                 "the oracle selects per layer; per-KV-head oracle selection is evals.py's method oracle-head.")]:
            if not ok:
                raise ValueError(f"invalid SALS config: {msg}")
        # every other field as the product checks it, under a ranking it runs
        return replace(SALSConfig.resolve(replace(self, ranking="pre-rope"), args, r_max), ranking=self.ranking)


def variant_cache(cfg: VariantConfig) -> tuple[type[SALSCache], SALSConfig]:
    """The cache class that runs cfg, and the product config it takes (the variant rankings build on bucket-rope;
    the oracle ranks by the true logits whatever the ranking)."""
    product = {f.name: getattr(cfg, f.name) for f in fields(SALSConfig)}
    if cfg.selector == "oracle":
        return OracleCache, SALSConfig(**{**product, "ranking": "pre-rope"})
    if cfg.ranking in VARIANT_RANKINGS:
        cache_class = ExpectedRopeCache if cfg.ranking == "expected-rope" else HybridCache
        return cache_class, SALSConfig(**{**product, "ranking": "bucket-rope"})
    return SALSCache, SALSConfig(**product)


def setup_variant(model, batch_size: int, max_seq_length: int, cfg: VariantConfig, calib: dict) -> VariantConfig:
    """setup_sals with cfg's cache class in the SALS layers. Returns cfg resolved."""
    cache_class, product = variant_cache(cfg)
    setup_sals(model, batch_size, max_seq_length, product, calib, cache_class=cache_class)
    return cfg.resolve(model.args, calib["eigvecs"][0].shape[1])


def no_kernel(what: str) -> str:
    return (f"the {what} has no GPU kernel: it is an evaluation variant; run it on CPU, or build the cache with "
            f"fused=False.")


class ExpectedRopeCache(SALSCache):
    """Ranking "expected-rope": one distance bucket, window..pos - sink (bucket_rotations with n = 1). The fused step
    runs it as it runs bucket-rope."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.n_buckets = 1


class HybridCache(SALSCache):
    """Ranking "hybrid": the first half of each row's budget by the pre-RoPE scores, the rest by the bucket-rope ones
    among the tokens not taken."""

    def latent_query(self, q: Tensor, input_pos: Tensor) -> Tensor:
        """The bucket-rope queries, then the pre-RoPE one: (b, n_buckets + 1, [Hkv,] r*)."""
        q_sum = q[:, :, 0].unflatten(1, (self.n_kv_head, self.G)).sum(2)  # (b, Hkv, Dh)
        return self.project(torch.cat([self.rotate(q_sum, input_pos), q_sum[:, None]], 1))

    def scores(self, q: Tensor, input_pos: Tensor, rows: Tensor | None) -> Tensor:
        """(b, 2, [Hkv,] S): the pre-rope scores, then the bucket-rope ones."""
        s = self.latent_scores(self.latent_query(q, input_pos), rows)  # (b, n_buckets + 1, [Hkv,] S)
        return torch.stack([s[:, -1], self.by_bucket(s[:, :-1], input_pos)], 1)

    def top(self, s: Tensor, input_pos: Tensor) -> tuple[Tensor, Tensor]:
        """From s (b, 2, [Hkv,] S): the top half of each row's budget by s[:, 0], then the rest by s[:, 1] among the
        tokens not taken; (b, [Hkv,] k_max) positions and which are attended, as SALSCache.top."""
        s_pre, s_rope = s[:, 0], s[:, 1]
        n_b = self.n_attend[input_pos[:, 0]]  # (b,)
        k1 = self.k_max // 2  # n_b // 2 <= k1 and n_b - n_b // 2 <= k_max - k1
        idx1, keep1 = select_top_reference(s_pre, n_b // 2, k1)
        taken = torch.zeros_like(s_rope, dtype=torch.long).scatter_add_(-1, idx1, keep1.long()) > 0
        idx2, keep2 = select_top_reference(s_rope.masked_fill(taken, -math.inf), n_b - n_b // 2, self.k_max - k1)
        return torch.cat([idx1, idx2], -1), torch.cat([keep1, keep2], -1)

    def check_fused(self, rows: Tensor | None):
        raise ValueError(no_kernel("hybrid ranking"))


class OracleCache(SALSCache):
    """Selector "oracle": each row's budget of top tokens by the sum over the layer's heads of the true post-RoPE
    q.k, from exact post-RoPE keys kept for every position (k_full); with full rank and 16-bit values, SALS's
    ceiling at its budget."""

    def __init__(self, cfg: SALSConfig, args: ModelArgs, batch_size: int, max_seq_length: int, U: Tensor,
                 rope: Tensor | None = None, fused: bool | None = None):
        super().__init__(cfg, args, batch_size, max_seq_length, U, rope, fused)
        k_full = torch.zeros(batch_size, max_seq_length, args.n_kv_head, args.head_dim, dtype=U.dtype)
        self.register_buffer("k_full", k_full, persistent=False)  # (B, S, Hkv, Dh)

    def bytes_read_per_step(self) -> int:
        return super().bytes_read_per_step() + self.k_full.numel() * self.k_full.element_size()

    def write(self, b: Tensor, k: Tensor, k_rope: Tensor, v: Tensor, input_pos: Tensor):
        super().write(b, k, k_rope, v, input_pos)
        self.k_full[b[:, None].expand_as(input_pos), input_pos] = k_rope.transpose(1, 2)

    def scores(self, q: Tensor, input_pos: Tensor, rows: Tensor | None) -> Tensor:
        """(b, S): the sum over heads of the true post-RoPE q.k (q rotated with the model's table, self.rope)."""
        k_full = self.k_full if rows is None else self.k_full[rows]  # (b, S, Hkv, Dh)
        q_rope = apply_rope(q, self.rope[input_pos])
        q_sum = q_rope[:, :, 0].unflatten(1, (self.n_kv_head, self.G)).sum(2)  # (b, Hkv, Dh)
        return torch.einsum("bshd,bhd->bs", k_full, q_sum)

    def check_fused(self, rows: Tensor | None):
        raise ValueError(no_kernel("oracle selector"))
