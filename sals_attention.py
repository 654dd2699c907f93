"""SALS: sparse attention in latent space (docs/sals.md), the compressed KV cache of one layer.

Keys are kept only as low-rank latents of the pre-RoPE keys (all KV heads concatenated, projected on
the calibrated basis U); values are quantized per token in groups of 32. A decode step ranks every
compressed token with a latent dot product (RoPE-free as in the paper, or with RoPE's mean rotation per
distance bucket: `ranking`), keeps the top ones within the budget (one set per layer, or per KV head:
`selection`), rebuilds only those keys, rotates them at their original positions and attends over
sinks + window + selected. A row shorter than the minimum budget attends every token with its key at full rank, held
in the latent rows it has not reached yet (latent_rows), so short prompts lose nothing to the key compression. This
file is the PyTorch reference, which runs anywhere; on CUDA the same step runs in the Triton kernels of kernels/
(fused_decode). Static shapes, no host sync.

    cfg = setup_sals(model, batch_size, max_seq_length, SALSConfig.preset(0.125),
                     calibrate.load_calibration(path, model))
"""
import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
from torch import Tensor

from kernels.ranking import bucket_rotations, select_top_reference
from model import KVCache, ModelArgs, apply_rope, attend, rope_frequencies, rope_table

GROUP = 32  # value channels sharing one scale and zero

# How a decode step ranks the compressed tokens: "pre-rope" by the RoPE-free q.k (the paper); "bucket-rope" by q.k
# with q rotated by RoPE's rotation averaged over the candidates' distances in each distance bucket [W 2^i, W 2^(i+1))
# (W the window), each token ranked by its bucket's query: the RoPE-free score misses where attention goes, and a
# narrower range of distances damps fewer RoPE frequencies than one average over all of them (EVAL.md). The rankings
# that lost, and the exact ranking that bounds them, are evaluation-only: eval_variants.py.
RANKINGS = ("pre-rope", "bucket-rope")
# Who chooses the attended tokens: "layer" one ranking per layer, shared by its heads (the paper); "kv-head" each KV
# head by its own latent query (its G query heads), because on SmolLM2 one shared set loses the few retrieval heads'
# tokens (EVAL.md).
SELECTIONS = ("layer", "kv-head")
# The proportional budget alone attends only the sinks and the window below (sink + window) / sparsity tokens (640 at
# the defaults): a streaming cache on short prompts, which then miss what dense attention finds (EVAL.md).
MIN_TOKENS = 512
# Layers kept dense: the paper keeps 0, 1 and the last; the project's presets keep as many, but the ones where the
# calibration's held-out overlap (the share of the true attention mass the ranking's top tokens hold) is lowest,
# since there selection loses most (on SmolLM2: 0, 1 and 20; perplexity resolved better than with 0, 1, 29, retrieval
# the same within noise; EVAL.md).
N_DENSE = 3
PAPER_DENSE = (0, 1, -1)  # the paper's dense layers, and the rule without a calibration report


@dataclass(frozen=True)
class SALSConfig:
    rank_fraction: float = 0.25  # r = round(D * rank_fraction), D = n_kv_head * head_dim
    rank: int | None = None  # r itself, overrides rank_fraction
    score_dims: int | None = None  # r*, latent coordinates used for ranking; default r // 2
    value_bits: int = 4  # 2, 4, or 16 (values stored unquantized in the model dtype)
    sparsity: float = 1 / 8  # attended share of the context, sinks and window included
    min_tokens: int = MIN_TOKENS  # below this many cached tokens every one is attended (see budget)
    budget_tokens: int | None = None  # N_c: a fixed number of attended tokens instead of sparsity * context
    sink: int = 16
    window: int = 64
    # layers keeping a dense KVCache (negative ids count from the last, as in Python); None: the calibration's
    # N_DENSE lowest overlaps (calibrated), or PAPER_DENSE without an overlap report
    dense_layers: tuple[int, ...] | None = None
    ranking: str = "pre-rope"  # how the latent query ranks tokens, one of RANKINGS; "pre-rope" is the paper's
    selection: str = "layer"  # one of SELECTIONS; "layer" is the paper's

    @classmethod
    def preset(cls, fraction: float, paper: bool = False, **overrides) -> "SALSConfig":
        """SALS-25% (latent rank D/4, 4-bit values) and SALS-12.5% (D/8, 2-bit values) at sparsity 1/8. The
        project's default selects per KV head and ranks by RoPE's mean rotation per distance bucket, the most
        accurate configuration at the same memory (EVAL.md); paper=True is the paper's method: one pre-RoPE ranking
        per layer, the proportional budget alone (no minimum) and layers 0, 1 and the last dense."""
        bits = {0.25: 4, 0.125: 2}.get(fraction)
        if bits is None:
            raise ValueError(f"no SALS preset {fraction!r}: the presets are 0.25 and 0.125; build "
                             f"SALSConfig(rank_fraction=..., value_bits=...) for other settings.")
        choice = dict(min_tokens=0, dense_layers=PAPER_DENSE) if paper else dict(ranking="bucket-rope",
                                                                                  selection="kv-head")
        return replace(cls(rank_fraction=fraction, value_bits=bits), **{**choice, **overrides})

    def resolve(self, args: ModelArgs, r_max: int) -> "SALSConfig":
        """A copy with rank, score_dims and dense_layers made concrete for this model; r_max: how many
        eigenvectors the calibration keeps. Raises ValueError naming what is wrong."""
        D, L = args.n_kv_head * args.head_dim, args.n_layer

        def check(ok: bool, msg: str):
            if not ok:
                raise ValueError(f"invalid SALS config: {msg}")
        if self.rank is None:
            check(0 < self.rank_fraction <= 1, f"rank_fraction {self.rank_fraction} is not in (0, 1].")
        r = self.rank if self.rank is not None else max(1, round(D * self.rank_fraction))
        check(1 <= r <= r_max, f"rank {r} is outside 1..{r_max} (the calibration keeps {r_max} eigenvectors "
                               f"of the {D}-wide keys); choose a smaller rank or rank_fraction.")
        rs = self.score_dims if self.score_dims is not None else max(1, r // 2)
        check(1 <= rs <= r, f"score_dims {rs} is outside 1..rank ({r}).")
        check(self.value_bits in (2, 4, 16), f"value_bits {self.value_bits} is not one of 2, 4, 16.")
        check(self.value_bits == 16 or args.head_dim % GROUP == 0,
              f"{self.value_bits}-bit values are quantized in groups of {GROUP} channels, but head_dim "
              f"{args.head_dim} is not a multiple of {GROUP}; use value_bits=16.")
        check(0 < self.sparsity <= 1, f"sparsity {self.sparsity} is not in (0, 1].")
        check(self.min_tokens >= 0, f"min_tokens {self.min_tokens} is negative (0 turns the minimum off).")
        check(self.budget_tokens is None or self.budget_tokens >= self.sink + self.window,
              f"budget_tokens {self.budget_tokens} is below sinks + window ({self.sink} + {self.window}), which are "
              f"always attended; raise it or use the proportional budget (budget_tokens=None).")
        check(self.sink >= 0 and self.window >= 1, f"need sink >= 0 and window >= 1 (got sink {self.sink}, "
                                                   f"window {self.window}).")
        dense = self.dense_layers if self.dense_layers is not None else PAPER_DENSE[:L]
        check(all(-L <= i < L for i in dense), f"dense_layers {sorted(dense)} must be layer ids in {-L}..{L - 1}.")
        dense = {i % L for i in dense}
        check(self.ranking in RANKINGS, f"ranking {self.ranking!r} is not one of {', '.join(RANKINGS)} (the "
                                        f"evaluation variants run in evals.py).")
        check(self.selection in SELECTIONS, f"selection {self.selection!r} is not one of {', '.join(SELECTIONS)}.")
        return replace(self, rank=r, score_dims=rs, dense_layers=tuple(sorted(set(dense))))


def n_buckets(ranking: str, window: int, max_seq_length: int) -> int:
    """How many distance buckets [window 2^i, window 2^(i+1)) a ranking averages RoPE's rotation over in a cache of
    max_seq_length positions: 0 for "pre-rope" (no rotation)."""
    if ranking == "pre-rope":
        return 0
    return max(1, math.ceil(math.log2(max(max_seq_length, 2 * window) / window)))


def distance_bucket(d: Tensor, window: int, n: int) -> Tensor:
    """Bucket index of distances d (integer tensor), min(floor(log2(d / window)), n - 1), 0 below window."""
    edges = window * 2 ** torch.arange(1, n, device=d.device)  # (n - 1,)
    return (d[..., None] >= edges).sum(-1)


# ---------------------------------------------------------------------------------------------
# Value quantization: asymmetric, round to nearest, groups of 32 channels, bit-packed into uint8.

def scale_dtype(dtype: torch.dtype) -> torch.dtype:
    """The 16-bit type of scales and zeros: the model's own, else bfloat16 (whose range fits float32's)."""
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.bfloat16


def _round_toward(x: Tensor, dtype: torch.dtype, direction: float) -> Tensor:
    """float32 x in a 16-bit dtype, rounded toward direction (-inf or +inf) instead of to nearest."""
    y = x.to(dtype)
    off = y.float() > x if direction < 0 else y.float() < x
    return torch.where(off, torch.nextafter(y, torch.full_like(y, direction)), y)


def quantize_values(v: Tensor, bits: int) -> tuple[Tensor, Tensor, Tensor]:
    """v (..., Dh) -> packed (..., Dh*bits/8) uint8, scale and zero (..., Dh/32) 16-bit, with
    v ~ q * scale + zero, q in [0, 2^bits - 1] (element i of a byte's 8/bits lives at bit bits*i).
    zero is rounded down and scale up to 16 bits before q is chosen, so each group's grid covers all of
    its values and |v - dequantize_values(...)| <= scale / 2 per element (up to float32 rounding)."""
    if bits not in (2, 4):
        raise ValueError(f"values are quantized to 2 or 4 bits, not {bits}.")
    if v.shape[-1] % GROUP:
        raise ValueError(f"the last dimension ({v.shape[-1]}) must be a multiple of {GROUP}.")
    levels, sdt = 2 ** bits - 1, scale_dtype(v.dtype)
    g = v.float().unflatten(-1, (-1, GROUP))  # (..., Dh/32, 32)
    zero = _round_toward(g.amin(-1), sdt, -math.inf)
    # float64 then float32: the correctly rounded float32 quotient on every device (PyTorch's CUDA kernels divide by a
    # Python number as a multiplication by its reciprocal, which the compression kernel's division would not match)
    span = ((g.amax(-1) - zero.float()).double() / levels).float()
    scale = _round_toward(span.clamp(min=torch.finfo(sdt).tiny), sdt, math.inf)
    q = ((g - zero.float()[..., None]) / scale.float()[..., None]).round().clamp(0, levels).to(torch.uint8)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=v.device)
    packed = (q.flatten(-2).unflatten(-1, (-1, 8 // bits)) << shifts).sum(-1, dtype=torch.uint8)
    return packed, scale, zero


def dequantize_values(packed: Tensor, scale: Tensor, zero: Tensor, bits: int, dtype=torch.float32) -> Tensor:
    """Inverse of quantize_values: (..., Dh*bits/8) uint8 + (..., Dh/32) scale, zero -> (..., Dh) dtype."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    q = ((packed[..., None] >> shifts) & (2 ** bits - 1)).flatten(-2).unflatten(-1, (-1, GROUP))
    return (q.float() * scale.float()[..., None] + zero.float()[..., None]).flatten(-2).to(dtype)


def budget(input_pos: Tensor, cfg: SALSConfig) -> Tensor:
    """How many compressed tokens a step at input_pos (any shape, int) attends, same shape (<= 0: none):
    n_total(pos) - sink - window, where n_total, the tokens attended in all (sinks + window + selected), is
    max(floor(sparsity * (pos+1)), min(min_tokens, pos+1)), or with budget_tokens = N_c, max(min(N_c, pos+1),
    min(min_tokens, pos+1)). Below min_tokens every cached token is attended (the selection takes all candidates,
    from the compressed cache). Nondecreasing in pos, so the last position of a cache has the largest budget.
    The one definition of the budget: the reference step and the GPU kernels read it through SALSCache.n_attend."""
    n = input_pos.long() + 1
    base = (torch.floor(n.double() * cfg.sparsity).long() if cfg.budget_tokens is None
            else torch.full_like(n, cfg.budget_tokens))
    return torch.minimum(base.clamp(min=cfg.min_tokens), n) - cfg.sink - cfg.window


def latent_rows(n_exact: int, max_seq_length: int, score_dims: int, rank: int, width: int) -> int:
    """Rows of the latent buffers: max_seq_length, or more where it is too short to hold, in its rows [n_exact, S),
    the full-rank pre-RoPE keys of positions < n_exact (width = n_kv_head * head_dim channels each, their heads'
    first and second halves in k_lat_score and k_lat_rest). A row that has written no position >= n_exact has not
    reached those rows, so they hold its keys for free from about (1 + width / rank) * n_exact tokens (5x at rank
    D/4, 9x at D/8); a shorter cache pays for them, as much as a key buffer of n_exact tokens would cost."""
    a = min(score_dims, rank - score_dims)
    return max(max_seq_length, n_exact + -(-n_exact * (width // 2) // a)) if n_exact else max_seq_length


def top_k_width(cfg: SALSConfig, max_seq_length: int) -> int:
    """k_max, the static top-k width: the largest budget of any position of a cache of max_seq_length tokens."""
    return max(0, int(budget(torch.tensor(max_seq_length - 1, device="cpu"), cfg)))


# ---------------------------------------------------------------------------------------------
# The cache.

def _put(buf: Tensor, b: Tensor, idx: Tensor, val: Tensor, ok: Tensor):
    """buf[b, idx] = val where ok; b, idx, ok (n, T), val (n, T, ...). One token per row (decode) keeps
    static shapes and no host sync; a chunk drops the masked tokens instead (they may share a slot)."""
    if idx.shape[1] == 1:
        ok = ok.view(ok.shape + (1,) * (val.dim() - 2))
        buf[b, idx] = torch.where(ok, val, buf[b, idx])
    else:
        buf[b[ok], idx[ok]] = val[ok]


class SALSCache(nn.Module):
    """One layer's SALS cache; same interface as model.KVCache. Buffers are token-major (B, S, ...):
    every token at position >= sink is compressed when it arrives (latent key + quantized value), and
    also kept at full precision, post-RoPE, while in the window ring (slot (pos - sink) % window); the first n_exact
    (= min_tokens) positions also keep their pre-RoPE keys at full rank, read while the row is no longer than that
    (exact_keys: in latent rows the row has not reached).
    rope: the model's (cos, sin) table (S, Dh/2, 2) float32 (model.rope_table), read by the fused kernel and held
    by reference, not as a buffer: setup_sals hands every layer the one table of the model; None builds one
    (standalone caches). It must be on the device the step runs on; both paths rotate the selected keys with it.
    fused: decode with the Triton kernels of kernels/ (None: on CUDA tensors; True also runs them in Triton's CPU
    interpreter; False keeps the PyTorch reference)."""

    def __init__(self, cfg: SALSConfig, args: ModelArgs, batch_size: int, max_seq_length: int, U: Tensor,
                 rope: Tensor | None = None, fused: bool | None = None):
        super().__init__()
        if cfg.rank is None:
            raise ValueError("SALSCache needs a resolved config: cfg.resolve(args, r_max).")
        if type(cfg) is not SALSConfig:  # fields of a subclass would be ignored here
            raise ValueError(f"SALSCache runs a SALSConfig, not a {type(cfg).__name__}: an evaluation variant's cache "
                             f"is built by evals.py (eval_variants.setup_variant).")
        B, S, Hkv, Dh = batch_size, max_seq_length, args.n_kv_head, args.head_dim
        r, rs = cfg.rank, cfg.score_dims
        if tuple(U.shape) != (Hkv * Dh, r):
            raise ValueError(f"U has shape {tuple(U.shape)}, expected (n_kv_head * head_dim, rank) = "
                             f"({Hkv * Dh}, {r}).")
        self.n_kv_head, self.head_dim, self.G, self.rs = Hkv, Dh, args.n_head // Hkv, rs
        self.n_sink, self.window, self.bits, self.sparsity = cfg.sink, cfg.window, cfg.value_bits, cfg.sparsity
        self.per_head = cfg.selection == "kv-head"
        self.fused = fused
        self.n_buckets = n_buckets(cfg.ranking, cfg.window, S)  # distance buckets of RoPE's mean rotation
        self.rope = rope_table(args, S) if rope is None else rope
        if self.rope.shape[0] < S or self.rope.shape[1:] != (Dh // 2, 2) or self.rope.dtype != torch.float32:
            raise ValueError(f"rope has shape {tuple(self.rope.shape)} {self.rope.dtype}, expected the model's table "
                             f"({S} or more, {Dh // 2}, 2) float32 (model.rope_table).")
        self.k_max = top_k_width(cfg, S)
        # Rows shorter than the minimum budget attend every token; rank-r keys then lose retrieval where dense
        # attention has it (EVAL.md), so such rows attend their keys at full rank (exact_keys).
        self.n_exact = min(cfg.min_tokens, S) if 0 < rs < r else 0
        S_lat = latent_rows(self.n_exact, S, rs, r, Hkv * Dh)
        dt, sdt = U.dtype, scale_dtype(U.dtype)
        q_width = Dh if cfg.value_bits == 16 else Dh * cfg.value_bits // 8
        full = lambda n: torch.zeros(B, n, Hkv, Dh, dtype=dt)  # noqa: E731
        buffers = {
            "U": U.contiguous(),  # (D, r) row-major: the fused kernel loads tiles of U's rows
            "inv_freq": rope_frequencies(args),  # (Dh/2,) float64: for the rankings' mean rotations
            "k_lat_score": torch.zeros(B, S_lat, rs, dtype=dt),  # latent prefix read by the ranking
            "k_lat_rest": torch.zeros(B, S_lat, r - rs, dtype=dt),
            "v_q": torch.zeros(B, S, Hkv, q_width, dtype=dt if cfg.value_bits == 16 else torch.uint8),
            "v_scale": None if cfg.value_bits == 16 else torch.zeros(B, S, Hkv, Dh // GROUP, dtype=sdt),
            "v_zero": None if cfg.value_bits == 16 else torch.zeros(B, S, Hkv, Dh // GROUP, dtype=sdt),
            "sink_k": full(cfg.sink), "sink_v": full(cfg.sink),  # post-RoPE, positions < sink
            "win_k": full(cfg.window), "win_v": full(cfg.window),  # post-RoPE ring
            "window_pos": torch.full((B, cfg.window), -1, dtype=torch.int32),  # position in each slot, -1 empty
            # budget() of every position, looked up by the fused step: one gather instead of ~7 tiny float64 kernels
            "n_attend": budget(torch.arange(S), cfg).int(),
        }
        for name, t in buffers.items():
            self.register_buffer(name, t, persistent=False)

    def bytes_allocated(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers())

    def bytes_read_per_step(self) -> int:
        """What a decode step at the cache's last position reads: the ranking prefix of every slot, the selected
        tokens' latents (once per KV head with kv-head selection; their full-rank keys where that position is below
        n_exact) and values, sinks, window and U."""
        B, S = self.v_q.shape[:2]
        per_token = lambda *ts: sum(t[0, 0].numel() * t.element_size() for t in ts if t is not None)  # noqa: E731
        n_lat = self.n_kv_head if self.per_head else 1
        key = (self.n_kv_head * self.head_dim * self.U.element_size() if self.n_exact == S  # full rank (exact_keys)
               else n_lat * per_token(self.k_lat_score, self.k_lat_rest))
        selected = B * self.k_max * (key + per_token(self.v_q, self.v_scale, self.v_zero))
        score_prefix = self.k_lat_score[:, :S]  # latent rows past the cache's length are not scored
        whole = (score_prefix, self.sink_k, self.sink_v, self.win_k, self.win_v, self.window_pos, self.U)
        return sum(t.numel() * t.element_size() for t in whole) + selected

    def exact_keys(self) -> tuple[Tensor, Tensor]:
        """Views (B, n_exact, Hkv, Dh/2) of the full-rank pre-RoPE keys of positions < n_exact, first and second halves
        of each head's channels, in k_lat_score's and k_lat_rest's rows from n_exact on: valid while a row has written
        no position >= n_exact (latent_rows)."""
        B, c, Hkv, half = self.k_lat_score.shape[0], self.n_exact, self.n_kv_head, self.head_dim // 2
        return tuple(t.view(B, -1)[:, c * t.shape[2]:c * t.shape[2] + c * Hkv * half].view(B, c, Hkv, half)
                     for t in (self.k_lat_score, self.k_lat_rest))

    def forward(self, q: Tensor, k: Tensor, v: Tensor, input_pos: Tensor, rope: Tensor,
                rows: Tensor | None = None) -> Tensor:
        """q (b, H, T, Dh), k, v (b, Hkv, T, Dh) pre-RoPE; input_pos (b, T); rows (b,) or None (all rows).
        Returns (b, H, T, Dh). T > 1 is a prefill chunk; T == 1 is the SALS decode step below: fused Triton kernels
        for all rows on CUDA (fused=None) or wherever fused=True, else this PyTorch reference.
        With kv-head selection, idx and keep are (b, Hkv, k_max) and each KV head attends its own tokens."""
        b = torch.arange(q.shape[0], device=q.device) if rows is None else rows
        k_rope = apply_rope(k, rope)
        if q.shape[2] > 1:
            y = self.prefill(apply_rope(q, rope), k_rope, v, input_pos, b)
            self.write(b, k, k_rope, v, input_pos)
            return y
        if q.is_cuda if self.fused is None else self.fused:
            self.check_fused(rows)
            return self.fused_decode(q, k, k_rope, v, input_pos)  # 1-6 in Triton kernels
        q_rope = apply_rope(q, rope)
        self.write(b, k, k_rope, v, input_pos)  # 1. store the new token
        idx, keep = self.select(q, input_pos, rows)  # 2-4. rank, top-k within the budget; (b, [Hkv,] k)
        return self.attend_selected(q_rope, b, input_pos, idx, keep)  # 5-6.

    def attend_selected(self, q_rope: Tensor, b: Tensor, input_pos: Tensor, idx: Tensor, keep: Tensor) -> Tensor:
        """Steps 5-6: q_rope (b, H, 1, Dh) attends the sinks, the window and the selected positions idx (b, [Hkv,] k)
        where keep, their keys rebuilt (or, in rows shorter than n_exact, read at full rank) and rotated, their values
        dequantized. Returns (b, H, 1, Dh)."""
        exact = input_pos[:, 0] < self.n_exact  # (b,) rows that have written no position >= n_exact
        K = torch.cat([self.sink_k[b], self.win_k[b], self.keys(b, idx, exact)], 1)  # (b, n, Hkv, Dh)
        V = torch.cat([self.sink_v[b], self.win_v[b], self.values(b, idx)], 1)
        sink_ok = torch.arange(self.n_sink, device=q_rope.device) <= input_pos  # (b, n_sink)
        fixed = torch.cat([sink_ok, self.window_pos[b] >= 0], 1)  # (b, n_sink + window): every head attends them
        fixed = fixed.view(len(b), *(1,) * (keep.dim() - 2), -1).expand(*keep.shape[:-1], -1)
        mask = torch.cat([fixed, keep], -1)  # (b, [Hkv,] n)
        return attend(q_rope, K.transpose(1, 2), V.transpose(1, 2), mask.unsqueeze(-2))

    def fused_decode(self, q: Tensor, k: Tensor, k_rope: Tensor, v: Tensor, input_pos: Tensor) -> Tensor:
        """Steps 1-6 in Triton kernels (all B rows): compress and store the new token; score every candidate and
        select each ranking row's budget (the rule of kernels/ranking.py, as self.top); rebuild, rotate and attend
        the selected keys without writing them to memory (the kernel rotates q itself). Imported here so that
        importing this module never initializes Triton (its interpreter mode is fixed when a kernel is defined)."""
        from kernels.compress import compress_step
        from kernels.sals_decode import decode_attention
        from kernels.topk import select_top
        self.check_rope(q.device)
        compress_step(k, k_rope, v, input_pos, self.U, self.k_lat_score, self.k_lat_rest, self.v_q, self.v_scale,
                      self.v_zero, self.sink_k, self.sink_v, self.win_k, self.win_v, self.window_pos, self.bits,
                      self.n_exact)
        q_lat = self.fused_latent_query(q, input_pos)  # (B, NB, NQ, r*)
        idx, keep = select_top(self.k_lat_score, q_lat, input_pos, self.n_attend[input_pos[:, 0]], self.n_sink,
                               self.window, self.k_max)  # (B, NQ, k_max)
        y = decode_attention(q[:, :, 0], self.sink_k, self.sink_v, self.win_k, self.win_v, self.window_pos, input_pos,
                             idx, keep, self.k_lat_score, self.k_lat_rest, self.U, self.rope, self.v_q, self.v_scale,
                             self.v_zero, self.bits, self.n_exact)  # (B, H, Dh)
        return y[:, :, None]

    def check_fused(self, rows: Tensor | None):
        """The Triton step runs all rows at once; a subset is refused rather than run slowly."""
        if rows is not None:
            raise ValueError("the fused decode step runs all rows of the cache at once; decode a subset of rows on "
                             "CPU, or build the cache with fused=False.")

    def check_rope(self, device: torch.device):
        if self.rope.device != device:
            raise ValueError(f"the RoPE table is on {self.rope.device} but the step runs on {device}: build the "
                             f"cache with rope=<the model's table on that device> (setup_sals does).")

    def latent_query(self, q: Tensor, input_pos: Tensor) -> Tensor:
        """(b, r*): each KV group's G query heads summed (pre-RoPE), concatenated to width D, @ U[:, :r*];
        "bucket-rope" ranking rotates the sums by each distance bucket's mean rotation first (the same map for every
        head, so rotating the sum equals summing the rotated heads), one query per bucket: (b, n_buckets, r*), or
        (b, r*) with one bucket. q (b, H, 1, Dh), input_pos (b, 1). kv-head selection: (b, [n_buckets,] Hkv, r*)."""
        q_sum = q[:, :, 0].unflatten(1, (self.n_kv_head, self.G)).sum(2)  # (b, Hkv, Dh)
        if self.n_buckets:
            q_rot = self.rotate(q_sum, input_pos)  # (b, n_buckets, Hkv, Dh)
            q_sum = q_rot if self.n_buckets > 1 else q_rot[:, 0]
        return self.project(q_sum)

    def fused_latent_query(self, q: Tensor, input_pos: Tensor) -> Tensor:
        """latent_query as the fused step computes it, (B, NB, NQ, r*): the bucket rotations in one Triton kernel
        (kernels/bucket_query.py) rather than some twenty small ones."""
        from kernels.bucket_query import bucket_queries
        if self.n_buckets:
            q_lat = self.project(bucket_queries(q[:, :, 0], input_pos, self.inv_freq, self.n_kv_head, self.n_sink,
                                                self.window, self.n_buckets))
        else:
            q_lat = self.latent_query(q, input_pos)
        return q_lat.reshape(len(q), max(1, self.n_buckets), -1, self.rs)

    def rotate(self, q_sum: Tensor, input_pos: Tensor) -> Tensor:
        """Head sums (b, Hkv, Dh) rotated by each distance bucket's mean rotation (bucket_rotations):
        (b, n_buckets, Hkv, Dh)."""
        rot = bucket_rotations(self.inv_freq, input_pos, self.n_sink, self.window, self.n_buckets)
        return apply_rope(q_sum[:, None], rot[:, :, None])

    def project(self, q_sum: Tensor) -> Tensor:
        """Head sums (..., Hkv, Dh) -> latent queries (..., r*): concatenated, @ U[:, :r*]. kv-head selection:
        (..., Hkv, r*), KV head h's sum alone, placed in its rows, q_sum_h @ U[h*Dh:(h+1)*Dh, :r*] (the layer's query
        is the sum of these over h)."""
        if self.per_head:
            U_h = self.U[:, :self.rs].unflatten(0, (self.n_kv_head, self.head_dim))  # (Hkv, Dh, r*)
            # one bmm batched over heads: q_sum[..., None, :] @ U_h would broadcast U_h to every row and bucket
            return torch.einsum("...hd,hdr->...hr", q_sum, U_h)
        return q_sum.flatten(-2) @ self.U[:, :self.rs]

    def scores(self, q: Tensor, input_pos: Tensor, rows: Tensor | None) -> Tensor:
        """Steps 2-3: the ranking score (b, S) of every cache position (unwritten ones are garbage), (b, Hkv, S)
        with kv-head selection: q_lat . k_lat_j, with "pre-rope" ranking exactly the sum over heads of the pre-RoPE
        q.k when r* = D, with "bucket-rope" the mean of the post-RoPE one over the candidates' distances in j's
        distance bucket."""
        s = self.latent_scores(self.latent_query(q, input_pos), rows)  # (b, [n_buckets,] [Hkv,] S)
        return self.by_bucket(s, input_pos) if self.n_buckets > 1 else s

    def latent_scores(self, q_lat: Tensor, rows: Tensor | None) -> Tensor:
        """q_lat (b, ..., r*) . k_lat_j of every cache position: (b, ..., S)."""
        k_lat = self.k_lat_score if rows is None else self.k_lat_score[rows]  # (b, S, r*)
        # at least float32, as the scoring kernel: 16-bit scores tie often, and ties rank in no defined order
        wide = torch.promote_types(k_lat.dtype, torch.float32)
        q_all = q_lat.to(wide).reshape(len(k_lat), -1, self.rs)  # (b, n, r*)
        return (q_all @ k_lat.to(wide).transpose(1, 2)).view(*q_lat.shape[:-1], -1)  # k_lat read once for all queries

    def by_bucket(self, s: Tensor, input_pos: Tensor) -> Tensor:
        """Scores (b, n_buckets, [Hkv,] S), one per bucket's query -> (b, [Hkv,] S): each position scored by the query
        of its distance's bucket."""
        bucket = distance_bucket(input_pos - torch.arange(s.shape[-1], device=s.device), self.window,
                                 self.n_buckets)  # (b, S)
        return s.gather(1, bucket.view(len(s), 1, *(1,) * (s.dim() - 3), -1).expand(len(s), 1, *s.shape[2:]))[:, 0]

    def select(self, q: Tensor, input_pos: Tensor, rows: Tensor | None) -> tuple[Tensor, Tensor]:
        """Step 4: positions (b, k_max) of the top compressed tokens sink <= j <= pos - window, and which of
        them are attended (b, k_max): the first budget() of each row.
        kv-head selection: (b, Hkv, k_max), each KV head's own top tokens within the same budget."""
        s = self.scores(q, input_pos, rows)  # (b, [Hkv,] S)
        j = torch.arange(s.shape[-1], device=s.device)
        pos = input_pos.view(len(s), *(1,) * (s.dim() - 1))  # (b, [1,] 1)
        return self.top(s.masked_fill((j < self.n_sink) | (j > pos - self.window), -math.inf), input_pos)

    def top(self, s: Tensor, input_pos: Tensor) -> tuple[Tensor, Tensor]:
        """Top k_max of scores s (b, [Hkv,] S) (-inf outside the candidates) and which are within each row's budget
        (the n_attend table, as the fused step)."""
        return select_top_reference(s, self.n_attend[input_pos[:, 0]], self.k_max)

    def keys(self, b: Tensor, idx: Tensor, exact: Tensor) -> Tensor:
        """Post-RoPE keys (n, k, Hkv, Dh) of positions idx (n, k) of rows b, rebuilt from their latents (in the rows
        where exact (n,), read at full rank from exact_keys) and rotated at their ORIGINAL positions. idx (n, Hkv, k):
        each KV head's own positions. Each head rebuilds only its own slice of D (lat @ U[h rows]^T), so per-head
        positions cost the rebuild no extra FLOPs."""
        idx = idx if idx.dim() == 3 else idx[:, None]  # (n, 1 or Hkv, k)
        bi = b[:, None, None]
        lat = torch.cat([self.k_lat_score[bi, idx], self.k_lat_rest[bi, idx]], -1)  # (n, 1 or Hkv, k, r)
        k = lat @ self.U.unflatten(0, (self.n_kv_head, self.head_dim)).transpose(1, 2)  # (n, Hkv, k, Dh)
        if self.n_exact:
            at = (bi, idx.clamp(max=self.n_exact - 1), torch.arange(self.n_kv_head, device=idx.device)[:, None])
            full = torch.cat([half[at] for half in self.exact_keys()], -1)  # (n, Hkv, k, Dh); unkept slots: garbage
            k = torch.where(exact.view(-1, 1, 1, 1), full, k)
        self.check_rope(idx.device)
        return apply_rope(k, self.rope[idx]).transpose(1, 2)  # the table's rows: (n, 1 or Hkv, k, Dh/2, 2)

    def values(self, b: Tensor, idx: Tensor) -> Tensor:
        """Values (n, k, Hkv, Dh) of positions idx (n, k) of rows b; idx (n, Hkv, k): head h's values of its own."""
        idx = idx if idx.dim() == 3 else idx[:, None]  # (n, 1 or Hkv, k)
        at = (b[:, None, None], idx, torch.arange(self.n_kv_head, device=idx.device)[:, None])  # -> (n, Hkv, k, ...)
        v = self.v_q[at]
        if self.bits != 16:
            v = dequantize_values(v, self.v_scale[at], self.v_zero[at], self.bits, self.U.dtype)
        return v.transpose(1, 2)

    def write(self, b: Tensor, k: Tensor, k_rope: Tensor, v: Tensor, input_pos: Tensor):
        """Stores tokens (b, T): latent key and quantized value of all; full-precision post-RoPE copies in
        the sinks (pos < sink) and in the window ring (the last `window` tokens at pos >= sink)."""
        bt = b[:, None].expand_as(input_pos)  # (b, T)
        wp = self.window_pos[b]  # slots at positions >= this call's first one hold an earlier sequence of the row
        self.window_pos[b] = torch.where(wp >= input_pos[:, :1], -1, wp)
        if self.n_exact:  # before the latents: a chunk reaching past n_exact overwrites these rows, as it must
            half, early = self.head_dim // 2, input_pos < self.n_exact
            j = input_pos.clamp(max=self.n_exact - 1)
            for buf, part in zip(self.exact_keys(), k.transpose(1, 2).split(half, -1)):  # (b, T, Hkv, Dh/2) each
                _put(buf, bt, j, part, early)
        lat = k.transpose(1, 2).flatten(2) @ self.U  # (b, T, r): KV heads concatenated, pre-RoPE
        self.k_lat_score[bt, input_pos], self.k_lat_rest[bt, input_pos] = lat[..., :self.rs], lat[..., self.rs:]
        kt, vt = k_rope.transpose(1, 2), v.transpose(1, 2)  # (b, T, Hkv, Dh)
        if self.bits == 16:
            self.v_q[bt, input_pos] = vt
        else:
            packed, scale, zero = quantize_values(vt, self.bits)
            self.v_q[bt, input_pos], self.v_scale[bt, input_pos], self.v_zero[bt, input_pos] = packed, scale, zero
        if self.n_sink:
            sink, ok = input_pos.clamp(max=self.n_sink - 1), input_pos < self.n_sink
            _put(self.sink_k, bt, sink, kt, ok)
            _put(self.sink_v, bt, sink, vt, ok)
        slot = (input_pos - self.n_sink) % self.window
        ok = (input_pos >= self.n_sink) & (input_pos > input_pos[:, -1:] - self.window)
        _put(self.win_k, bt, slot, kt, ok)
        _put(self.win_v, bt, slot, vt, ok)
        _put(self.window_pos, bt, slot, input_pos.int(), ok)

    def prefill(self, q_rope: Tensor, k_rope: Tensor, v: Tensor, input_pos: Tensor, b: Tensor) -> Tensor:
        """Dense causal attention of a chunk over its past and itself, before the chunk is written: sinks
        and window at full precision, older tokens rebuilt from the compressed cache, the chunk exact."""
        p0 = input_pos[:, :1]  # (b, 1) each row's first position in this chunk
        n_old = max(0, int(p0.max()) - self.window)  # host sync: prefill only
        old = torch.arange(n_old, device=p0.device).expand(len(b), n_old)  # (b, n_old)
        exact = p0[:, 0] <= self.n_exact  # (b,) nothing written at or past n_exact yet
        K = torch.cat([self.sink_k[b], self.win_k[b], self.keys(b, old, exact), k_rope.transpose(1, 2)], 1)
        V = torch.cat([self.sink_v[b], self.win_v[b], self.values(b, old), v.transpose(1, 2)], 1)
        wp = self.window_pos[b]
        past = torch.cat([torch.arange(self.n_sink, device=p0.device) < p0, (wp >= 0) & (wp < p0),
                          (old >= self.n_sink) & (old < p0 - self.window)], 1)  # (b, n_past)
        causal = input_pos[:, None, :] <= input_pos[:, :, None]  # (b, T, T)
        mask = torch.cat([past[:, None].expand(-1, input_pos.shape[1], -1), causal], -1)
        return attend(q_rope, K.transpose(1, 2), V.transpose(1, 2), mask)


def cache_bytes(args: ModelArgs, batch_size: int, max_seq_length: int, cfg: SALSConfig | None,
                dtype=torch.bfloat16) -> int:
    """Bytes every layer's cache allocates under setup_sals (dense everywhere when cfg is None), from meta tensors:
    nothing is allocated."""
    D = args.n_kv_head * args.head_dim
    with torch.device("meta"):
        dense = KVCache(batch_size, max_seq_length, args.n_kv_head, args.head_dim, dtype).bytes_allocated()
        if cfg is None:
            return args.n_layer * dense
        cfg = cfg.resolve(args, D)
        sals = SALSCache(cfg, args, batch_size, max_seq_length, torch.empty(D, cfg.rank, dtype=dtype)).bytes_allocated()
    n_dense = len(cfg.dense_layers)
    return n_dense * dense + (args.n_layer - n_dense) * sals


def calibrated(cfg: SALSConfig, calib: dict | None) -> SALSConfig:
    """cfg with dense_layers None made the calibration's N_DENSE layers of lowest overlap under cfg's ranking
    (calibrate.py's report: the pre-RoPE one for "pre-rope", the bucket-rope one for rankings with RoPE); unchanged
    where the calibration has no such report (resolve's PAPER_DENSE then)."""
    key = "overlap" if cfg.ranking == "pre-rope" else "overlap_bucket_rope"
    overlap = ((calib or {}).get("report") or {}).get(key)
    if cfg.dense_layers is not None or not overlap or any(math.isnan(o) for o in overlap):
        return cfg
    return replace(cfg, dense_layers=tuple(sorted(sorted(range(len(overlap)), key=overlap.__getitem__)[:N_DENSE])))


def setup_sals(model, batch_size: int, max_seq_length: int, cfg: SALSConfig, calib: dict,
               fused: bool | None = None, cache_class: type[SALSCache] = SALSCache) -> SALSConfig:
    """Allocates the model's caches: model.KVCache in cfg's dense layers, cache_class (SALSCache, or an evaluation
    variant's subclass) in the others with U = the layer's top-r calibrated eigenvectors (calib: the dict of
    calibrate.load_calibration); fused as in SALSCache and KVCache (both kinds of layer alike). Returns the resolved
    config."""
    a = model.args
    D, vecs = a.n_kv_head * a.head_dim, calib["eigvecs"]
    if len(vecs) != a.n_layer or any(vec.ndim != 2 or vec.shape[0] != D for vec in vecs):
        raise ValueError(f"the calibration holds {len(vecs)} bases, the model needs {a.n_layer} of {D} rows; "
                         f"recalibrate with `python calibrate.py --checkpoint DIR`.")
    cfg = calibrated(cfg, calib).resolve(a, vecs[0].shape[1])

    def make_cache(i, args, B, S, dtype):
        if i in cfg.dense_layers:
            return KVCache(B, S, args.n_kv_head, args.head_dim, dtype, fused)
        return cache_class(cfg, args, B, S, vecs[i][:, :cfg.rank].to(dtype), model.rope, fused)  # one shared table
    model.setup_caches(batch_size, max_seq_length, make_cache)
    return cfg
