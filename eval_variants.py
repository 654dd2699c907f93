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
  key_bits 2 or 4          the latent keys quantized as the values are (per token, groups of 32 latent channels,
                           16-bit scale and zero): a higher rank at the bytes of a 16-bit latent (rank D at 4 bits
                           costs what rank D/4 at 16 costs, plus the scales)
"""
import math
from functools import partial
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

from kernels.ranking import select_top_reference
from model import ModelArgs, apply_rope
from sals_attention import (GROUP, RANKINGS as PRODUCT_RANKINGS, SALSCache, SALSConfig, dequantize_values,
                            quantize_values, scale_dtype, setup_sals)

VARIANT_RANKINGS = ("expected-rope", "hybrid")
RANKINGS = PRODUCT_RANKINGS + VARIANT_RANKINGS
SELECTORS = ("latent", "oracle")


@dataclass(frozen=True)
class VariantConfig(SALSConfig):
    """SALSConfig with the variants' rankings and the selector; variant_cache maps it to a cache class and the product
    config that class runs."""
    selector: str = "latent"  # "oracle": exact top-k by the true post-RoPE logits
    key_bits: int = 16  # 2 or 4: latent keys quantized (QuantKeyCache)

    def resolve(self, args: ModelArgs, r_max: int) -> "VariantConfig":
        """SALSConfig.resolve, with the ranking and the selector checked here."""
        for ok, msg in [
                (self.ranking in RANKINGS, f"ranking {self.ranking!r} is not one of {', '.join(RANKINGS)}."),
                (self.selector in SELECTORS, f"selector {self.selector!r} is not one of {', '.join(SELECTORS)}."),
                (self.selection == "layer" or self.selector == "latent",
                 "the oracle selects per layer; per-KV-head oracle selection is evals.py's method oracle-head."),
                (self.key_bits in (2, 4, 16), f"key_bits {self.key_bits} is not one of 2, 4, 16."),
                (self.key_bits == 16 or (self.ranking in PRODUCT_RANKINGS and self.selector == "latent"),
                 "quantized keys run with the product's rankings and the latent selector only.")]:
            if not ok:
                raise ValueError(f"invalid SALS config: {msg}")
        # every other field as the product checks it, under a ranking it runs
        cfg = replace(SALSConfig.resolve(replace(self, ranking="pre-rope"), args, r_max), ranking=self.ranking)
        if cfg.key_bits != 16 and (cfg.score_dims % GROUP or cfg.rank % GROUP):
            raise ValueError(f"invalid SALS config: {cfg.key_bits}-bit keys are quantized in groups of {GROUP} latent "
                             f"channels, so rank ({cfg.rank}) and score_dims ({cfg.score_dims}) must be multiples of "
                             f"{GROUP}.")
        return cfg


def variant_cache(cfg: VariantConfig) -> tuple[type[SALSCache], SALSConfig]:
    """The cache class that runs cfg, and the product config it takes (the variant rankings build on bucket-rope;
    the oracle ranks by the true logits whatever the ranking)."""
    product = {f.name: getattr(cfg, f.name) for f in fields(SALSConfig)}
    if cfg.key_bits != 16:
        return partial(QuantKeyCache, key_bits=cfg.key_bits), SALSConfig(**product)
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


class QuantKeyCache(SALSCache):
    """key_bits 2 or 4: each token's latent key (score prefix and rest, each in groups of GROUP channels) quantized
    with quantize_values and kept dequantized, so every step reads exactly what a packed store would give back; the
    byte counts are those of the packed store (codes + 16-bit scale and zero per group). The exact full-rank keys of
    short rows (exact_keys) stay 16-bit, as in the product."""

    def __init__(self, *args, key_bits: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.key_bits = key_bits

    def write(self, b: Tensor, k: Tensor, k_rope: Tensor, v: Tensor, input_pos: Tensor):
        super().write(b, k, k_rope, v, input_pos)
        bt = b[:, None].expand_as(input_pos)
        lat = k.transpose(1, 2).flatten(2) @ self.U  # (b, T, r), as SALSCache.write
        lat = dequantize_values(*quantize_values(lat, self.key_bits), self.key_bits, lat.dtype)
        self.k_lat_score[bt, input_pos], self.k_lat_rest[bt, input_pos] = lat[..., :self.rs], lat[..., self.rs:]

    def token_bytes(self, n: int, bits: int) -> int:
        """Bytes of n latent channels of one token: 16-bit, or codes with a 16-bit scale and zero per group."""
        if bits == 16:
            return n * self.U.element_size()
        return n * bits // 8 + 2 * (n // GROUP) * torch.finfo(scale_dtype(self.U.dtype)).bits // 8

    def latent_saving(self, n_tokens: int) -> int:
        """Bytes a 16-bit latent of n_tokens tokens holds beyond the packed one."""
        widths = (self.rs, self.k_lat_rest.shape[-1])
        return n_tokens * sum(self.token_bytes(n, 16) - self.token_bytes(n, self.key_bits) for n in widths)

    def bytes_allocated(self) -> int:
        """A packed store's bytes: the latents of max_seq_length tokens packed, and the short rows' exact keys in a
        16-bit buffer of their own (packed latent rows are too narrow to hold them, as exact_keys does)."""
        B, S_lat = self.k_lat_score.shape[:2]
        widths = (self.rs, self.k_lat_rest.shape[-1])
        lat16 = B * S_lat * sum(self.token_bytes(n, 16) for n in widths)
        packed = B * self.v_q.shape[1] * sum(self.token_bytes(n, self.key_bits) for n in widths)
        exact = B * self.n_exact * self.token_bytes(self.n_kv_head * self.head_dim, 16)
        return super().bytes_allocated() - lat16 + packed + exact

    def bytes_read_per_step(self) -> int:
        """SALSCache's count with the latents packed: the score prefix of every slot, the selected tokens' latents."""
        B, S = self.v_q.shape[:2]
        prefix = B * S * (self.token_bytes(self.rs, 16) - self.token_bytes(self.rs, self.key_bits))
        n_lat = self.n_kv_head if self.per_head else 1
        selected = 0 if self.n_exact == S else self.latent_saving(B * self.k_max * n_lat)
        return super().bytes_read_per_step() - prefix - selected

    def check_fused(self, rows: Tensor | None):
        raise ValueError(no_kernel("quantized-key cache"))
