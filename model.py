"""Llama-family decoder (Llama-2, Llama-3/3.1/3.2, Mistral, SmolLM2) for fast inference.

Built from the model's own Hugging Face `config.json`. The attention layer computes q, k, v before
RoPE and hands them to its cache object, which owns positions, RoPE and the attention itself: the
dense `KVCache` below, or the SALS cache of `sals_attention.py`. Memory is linear in the context:
no S x S mask is ever built.
"""
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.bias import causal_lower_right

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # --dtype choices


def default_dtype(device) -> torch.dtype:
    """bfloat16 on a GPU; float32 on the CPU, where bfloat16 matmuls are slow."""
    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16


class UnsupportedModelError(ValueError):
    pass


@dataclass
class ModelArgs:
    vocab_size: int
    dim: int
    n_layer: int
    n_head: int
    n_kv_head: int
    head_dim: int
    intermediate_size: int
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    rope_scaling: dict | None = None  # the llama3 scaling parameters, or None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)

    @classmethod
    def from_config(cls, cfg: dict) -> "ModelArgs":
        """Reads a Hugging Face config.json dict; refuses what this engine does not implement."""
        model_type = cfg.get("model_type")
        problems = []
        if model_type not in SUPPORTED_MODEL_TYPES:
            problems.append(f"model_type {model_type!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        if cfg.get("attention_bias") or cfg.get("qkv_bias"):
            problems.append("attention biases (attention_bias=true)")
        if cfg.get("mlp_bias"):
            problems.append("MLP biases (mlp_bias=true)")
        if cfg.get("num_local_experts") or cfg.get("num_experts"):
            problems.append("mixture of experts")
        if cfg.get("hidden_act", "silu") != "silu":
            problems.append(f"activation {cfg.get('hidden_act')!r} (only silu)")
        # transformers >= 5 writes rope_parameters; older configs write rope_theta and rope_scaling.
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            problems.append(f"RoPE scaling {rope_type!r} (supported: none, llama3)")
        if cfg.get("partial_rotary_factor", 1.0) != 1.0:
            problems.append("partial rotary embeddings")
        if problems:
            raise UnsupportedModelError("unsupported architecture: " + "; ".join(problems) + ".")

        n_head = cfg["num_attention_heads"]
        dim = cfg["hidden_size"]
        eos = cfg.get("eos_token_id")
        return cls(
            vocab_size=cfg["vocab_size"],
            dim=dim,
            n_layer=cfg["num_hidden_layers"],
            n_head=n_head,
            n_kv_head=cfg.get("num_key_value_heads") or n_head,
            head_dim=cfg.get("head_dim") or dim // n_head,
            intermediate_size=cfg["intermediate_size"],
            norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_base=rope.get("rope_theta", cfg.get("rope_theta", 10000.0)),
            rope_scaling=rope if rope_type == "llama3" else None,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            sliding_window=cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None,
            model_type=model_type,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
        )

    def check_context(self, max_seq_length: int):
        """Sliding-window attention is refused only where it would actually be active."""
        if self.sliding_window is not None and max_seq_length > self.sliding_window:
            raise UnsupportedModelError(
                f"unsupported architecture: sliding-window attention ({self.sliding_window} tokens) "
                f"would be active at the requested context of {max_seq_length} tokens; "
                f"use a context of at most {self.sliding_window} tokens.")


def load_config(checkpoint_dir: Path) -> ModelArgs:
    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a checkpoint folder needs the model's config.json "
                                f"(convert_hf_checkpoint.py writes it).")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); re-run convert_hf_checkpoint.py.") from None
    return ModelArgs.from_config(cfg)


# ---------------------------------------------------------------------------------------------
# RoPE, in the Hugging Face "rotate half" layout: dimension i pairs with i + head_dim/2.

def rope_frequencies(args: ModelArgs) -> Tensor:
    """Inverse frequencies (head_dim/2,), float64, with Llama-3.1 scaling when configured."""
    d = args.head_dim
    inv_freq = 1.0 / (args.rope_base ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    s = args.rope_scaling
    if s is None:
        return inv_freq
    factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are slowed by `factor`, short ones kept, and the band between interpolated.
    smooth = ((old_len / wavelen) - lo) / (hi - lo)
    interpolated = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
    mid = (wavelen <= old_len / lo) & (wavelen >= old_len / hi)
    return torch.where(mid, interpolated, out)


def rope_table(args: ModelArgs, max_seq_length: int) -> Tensor:
    """(S, head_dim/2, 2) float32 table of (cos, sin) per position and frequency."""
    angles = torch.outer(torch.arange(max_seq_length, dtype=torch.float64), rope_frequencies(args))
    return torch.stack([angles.cos(), angles.sin()], dim=-1).float()


def apply_rope(x: Tensor, rope: Tensor) -> Tensor:
    """x: (B, H, T, D); rope: (B, T, D/2, 2) rows of the table at each token's position, shared by the heads, or
    (B, H, T, D/2, 2) one per head (SALS's per-KV-head selection rotates each head's own tokens)."""
    rope = rope if rope.dim() == 5 else rope[:, None]
    cos, sin = rope[..., 0], rope[..., 1]  # (B, 1 or H, T, D/2)
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).type_as(x)


# ---------------------------------------------------------------------------------------------
# Dense KV cache and attention.

def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """GQA attention without repeating K/V heads.

    q: (B, H, T, D); k, v: (B, Hkv, S, D); mask: (B, T, S) bool, True where attended, shared by the heads, or
    (B, Hkv, T, S) one per KV head (SALS's per-KV-head selection: each head attends its own tokens).
    The G = H / Hkv query heads sharing a KV head are folded into the query-length axis, so every
    KV head is read once and SDPA sees plain multi-head attention.
    """
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = H // Hkv
    q = q.reshape(B, Hkv, G * T, D)  # head h = kv_head * G + g (the Hugging Face grouping)
    mask = mask if mask.dim() == 4 else mask[:, None]  # (B, 1 or Hkv, T, S)
    mask = mask[:, :, None].expand(B, mask.shape[1], G, T, S).reshape(B, mask.shape[1], G * T, S)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return y.reshape(B, H, T, D)  # CUDA SDPA may return a non-contiguous output


def attend_prefix(q: Tensor, k: Tensor, v: Tensor, start: int) -> Tensor:
    """Causal attention of a chunk q (b, H, T, D) at positions start .. start+T-1 over the first start + T slots of
    k, v (b, Hkv, >= start+T, D) (views of a cache: nothing is copied). Lower-right causal alignment: query i attends
    keys 0 .. start + i. GQA without repeating K/V heads (head h reads KV head h // G, the Hugging Face grouping)."""
    T = q.shape[2]
    L = start + T
    # SDPA turns the lower-right bias into flash attention's causal flag on CUDA (16-bit dtypes; flash accepts GQA),
    # and into plain causal attention where T == L; elsewhere (the CPU, float32 on CUDA) it builds a (T, L) boolean
    # mask, linear in the context for a chunk of fixed length.
    return F.scaled_dot_product_attention(q, k[:, :, :L], v[:, :, :L], attn_mask=causal_lower_right(T, L),
                                          enable_gqa=True)


class KVCache(nn.Module):
    """Static dense cache of post-RoPE keys and values, written at each sequence's own positions.
    fused: decode steps (one token for every row) with the Triton split-KV kernel of kernels/decode_attention.py,
    which reads only each row's own tokens (None: on CUDA tensors; True also runs it in Triton's CPU interpreter;
    False keeps the reference, SDPA masked over every slot)."""

    def __init__(self, batch_size: int, max_seq_length: int, n_kv_head: int, head_dim: int, dtype,
                 fused: bool | None = None):
        super().__init__()
        shape = (batch_size, n_kv_head, max_seq_length, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype), persistent=False)
        self.fused = fused

    def forward(self, q: Tensor, k: Tensor, v: Tensor, input_pos: Tensor, rope: Tensor,
                rows: Tensor | None = None) -> Tensor:
        """q: (b, H, T, D), k, v: (b, Hkv, T, D) pre-RoPE; input_pos: (b, T); rows: (b,) the cache
        rows of these sequences, None for all rows in order (decode). Returns (b, H, T, D)."""
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        self.write(torch.arange(q.shape[0], device=q.device) if rows is None else rows, k, v, input_pos)
        if q.shape[2] > 1:
            return self.prefill(q, input_pos, rows)
        if rows is None and (q.is_cuda if self.fused is None else self.fused):
            # imported here, so that importing this module never initializes Triton (whose interpreter mode is fixed
            # when a kernel is defined)
            from kernels.decode_attention import decode_attention
            return decode_attention(q[:, :, 0], self.k_cache, self.v_cache, input_pos)[:, :, None]
        return self.attend_masked(q, input_pos, rows)

    def attend_masked(self, q: Tensor, input_pos: Tensor, rows: Tensor | None) -> Tensor:
        """The reference: every query over every slot of its row (rows: None for all), masked to positions up to
        its own."""
        k_all, v_all = (self.k_cache, self.v_cache) if rows is None else (self.k_cache[rows], self.v_cache[rows])
        mask = torch.arange(k_all.shape[2], device=q.device) <= input_pos[..., None]  # (b, T, S)
        return attend(q, k_all, v_all, mask)

    def prefill(self, q: Tensor, input_pos: Tensor, rows: Tensor | None) -> Tensor:
        """A chunk q (b, H, T, D), already written, at consecutive positions p .. p+T-1 of each row attends to its
        row's first p + T slots (attend_prefix on a view of the cache): no mask over the whole cache, no work past
        the chunk. Rows at one start that are consecutive in the cache (generate.prefill's single row) take one call;
        other rows one call each. Chunks whose positions are not consecutive fall back to attend_masked.
        Host syncs (the positions and rows are read): prefill only."""
        b, T = input_pos.shape
        start = input_pos[:, :1]  # (b, 1)
        if not torch.equal(input_pos, start + torch.arange(T, device=input_pos.device)):
            return self.attend_masked(q, input_pos, rows)
        starts = start[:, 0].tolist()
        idx = list(range(b)) if rows is None else rows.tolist()
        if len(set(starts)) == 1 and idx == list(range(idx[0], idx[0] + b)):
            r = slice(idx[0], idx[0] + b)
            return attend_prefix(q, self.k_cache[r], self.v_cache[r], starts[0])
        return torch.cat([attend_prefix(q[i:i + 1], self.k_cache[r:r + 1], self.v_cache[r:r + 1], p)
                          for i, (r, p) in enumerate(zip(idx, starts))])

    def write(self, b: Tensor, k: Tensor, v: Tensor, input_pos: Tensor):
        """Stores post-RoPE k and v (b, Hkv, T, D) of cache rows b (b,) at positions input_pos (b, T)."""
        self.k_cache[b[:, None], :, input_pos] = k.transpose(1, 2)  # indexed view is (b, T, Hkv, D)
        self.v_cache[b[:, None], :, input_pos] = v.transpose(1, 2)

    def bytes_allocated(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k_cache, self.v_cache))

    def bytes_read_per_step(self) -> int:
        """The whole cache: what the reference decode step reads (every slot, masked); the kernel reads each row's
        own tokens, so this is its bound, reached when every row is full."""
        return self.bytes_allocated()


# ---------------------------------------------------------------------------------------------
# The transformer.

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = args.n_head, args.n_kv_head, args.head_dim
        # One fused projection: a single weight read per step for q, k and v.
        self.wqkv = nn.Linear(args.dim, (args.n_head + 2 * args.n_kv_head) * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_head * args.head_dim, args.dim, bias=False)
        self.kv_cache: nn.Module | None = None

    def forward(self, x: Tensor, input_pos: Tensor, rope: Tensor, rows: Tensor | None) -> Tensor:
        B, T, _ = x.shape
        q_size, kv_size = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        q, k, v = self.wqkv(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        y = self.kv_cache(q, k, v, input_pos, rope, rows)  # (B, H, T, D)
        return self.wo(y.transpose(1, 2).reshape(B, T, q_size))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w13 = nn.Linear(args.dim, 2 * args.intermediate_size, bias=False)  # gate and up, fused
        self.w2 = nn.Linear(args.intermediate_size, args.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args)

    def forward(self, x: Tensor, input_pos: Tensor, rope: Tensor, rows: Tensor | None) -> Tensor:
        h = x + self.attention(self.attention_norm(x), input_pos, rope, rows)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layer))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.max_batch_size = self.max_seq_length = -1
        self.tp = None  # tp.TPInfo once tp.shard_model keeps one rank's slice; args are then that rank's

    def setup_caches(self, max_batch_size: int, max_seq_length: int, make_cache=None):
        """Allocates the static caches. make_cache(layer_id, args, B, S, dtype) -> cache module;
        the default is the dense KVCache (SALS passes its own)."""
        self.args.check_context(max_seq_length)
        if max_seq_length > self.args.max_position_embeddings:
            raise ValueError(f"context of {max_seq_length} tokens exceeds the model's "
                             f"max_position_embeddings ({self.args.max_position_embeddings}).")
        dtype, device = self.output.weight.dtype, self.output.weight.device
        # Built before the caches, so that a cache may share it (SALS rotates selected keys with it).
        self.register_buffer("rope", rope_table(self.args, max_seq_length).to(device), persistent=False)
        for i, layer in enumerate(self.layers):
            layer.attention.kv_cache = None  # free the old cache before allocating the new one
            if make_cache is None:
                cache = KVCache(max_batch_size, max_seq_length, self.args.n_kv_head, self.args.head_dim, dtype)
            else:
                cache = make_cache(i, self.args, max_batch_size, max_seq_length, dtype)
            layer.attention.kv_cache = cache.to(device)
        self.max_batch_size, self.max_seq_length = max_batch_size, max_seq_length

    def forward(self, idx: Tensor, input_pos: Tensor, rows: Tensor | None = None, blocks=None,
                last_only: bool = False) -> Tensor:
        """idx: (b, T) token ids; input_pos: (b, T) each token's position in its own sequence;
        rows: (b,) which cache rows these sequences use (None: all B rows, in order). Prompts of
        different lengths are prefilled one row at a time, so no padding token ever enters a cache.
        blocks: the decoder blocks to run, default self.layers (generate.compiled_decode passes compiled ones).
        Returns logits (b, T, vocab) in float32, or (b, 1, vocab) of the last token with last_only (a prefill
        needs no more: a 2K-token chunk's float32 logits of a 128K vocabulary would be 1 GiB)."""
        h = self.hidden(idx, input_pos, rows, blocks)  # (b, T, dim)
        return self.output(self.norm(h[:, -1:] if last_only else h)).float()

    def hidden(self, idx: Tensor, input_pos: Tensor, rows: Tensor | None = None, blocks=None) -> Tensor:
        """The last block's output (b, T, dim), before the final norm: what forward turns into logits (calibration
        needs only the layers' keys, not the vocabulary-wide logits)."""
        rope = self.rope[input_pos]  # (b, T, D/2, 2)
        x = self.tok_embeddings(idx)
        for layer in self.layers if blocks is None else blocks:
            x = layer(x, input_pos, rope, rows)
        return x

    def kv_cache_bytes(self) -> int:
        return sum(layer.attention.kv_cache.bytes_allocated() for layer in self.layers)


def load_model(checkpoint_dir, device="cpu", dtype=torch.bfloat16) -> Transformer:
    """Builds the model from checkpoint_dir/config.json and loads checkpoint_dir/model.pth."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise FileNotFoundError(f"checkpoint folder {checkpoint_dir} does not exist; convert a model "
                                f"with convert_hf_checkpoint.py, or omit --checkpoint for the default model.")
    args = load_config(checkpoint_dir)
    path = checkpoint_dir / "model.pth"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; re-run convert_hf_checkpoint.py for this model.")
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise ValueError(f"{path} is unreadable or corrupt ({type(e).__name__}: {str(e)[:200]}); "
                         f"re-run convert_hf_checkpoint.py.") from None
    with torch.device("meta"):
        model = Transformer(args)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if args.tie_word_embeddings:
        expected.pop("output.weight")
    missing = sorted(set(expected) - set(state))
    wrong = sorted(k for k in expected if k in state and state[k].shape != expected[k])
    if missing or wrong:
        raise ValueError(f"{path} does not match {checkpoint_dir / 'config.json'}: "
                         f"missing {missing[:5]}, wrong shape {wrong[:5]}; re-run convert_hf_checkpoint.py.")
    model.load_state_dict(state, assign=True, strict=False)
    if args.tie_word_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model.to(device=device, dtype=dtype).eval()
