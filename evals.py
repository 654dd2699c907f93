"""Accuracy of the SALS cache against dense attention on a real model: perplexity, pass-key retrieval, a RULER-style
retrieval suite, and the per-layer error of the attention output; every table with paired 95% bootstrap intervals
against dense. Results: EVAL.md and eval_results/.

    python evals.py --evals ppl passkey ruler --methods dense sals-25 sals-12.5 --tag full     # the full run
    python evals.py --evals ppl --methods dense sals-25 --ppl_contexts 2048 --ppl_windows 2 --tag quick
    python evals.py --methods dense sals-25 sals-25-kvhead --ranking bucket-rope        # a flag for every SALS method
    python evals.py --define kv48 sals-25 '{"selection": "kv-head", "score_dims": 48}' --methods dense kv48
    python evals.py --tables eval_results/full.json                                      # print a run's tables again

Methods (a method = a name, a base and SALSConfig overrides; the non-dense ones share sparsity, sinks, window and
dense layers unless a method overrides them, so they attend the same budget):
  dense       model.KVCache in every layer
  sals-25     SALSConfig.preset(0.25): latent rank D/4, 4-bit values (the default: kv-head selection, bucket-rope)
  sals-12.5   SALSConfig.preset(0.125): latent rank D/8, 2-bit values
  oracle      exact top-k by the true post-RoPE logits, full-rank keys, 16-bit values (SALS's ceiling;
              eval_variants.OracleCache)
  oracle-head the same, but each KV head its own top-k (the ceiling of per-head selection)
  streaming   StreamingLLM: the sinks plus a recent window filling the whole budget, nothing selected
  CANDIDATES below (issue 14's configurations), and any --define NAME BASE JSON.
The command line's SALS flags (--ranking, --window, ...) apply to every non-dense method; a method's own overrides
come after them. Besides the product's rankings, --ranking and --define take the evaluation variants of
eval_variants.py: rankings expected-rope and hybrid, selector oracle.

Every method runs in the same model pass: each layer's cache is a MethodCaches holding one cache per method. A
batch of prompts of the same length is prefilled ONCE, densely (exact causal attention, one chunk), and every
method's cache is written from the same k, v; then the batch's rows continue through each method's own cache
(method-major rows: method i holds rows i*B .. i*B + B - 1). Only decode steps see the compressed caches. (The
engine's own chunked prefill, generate.prefill, lets chunks after the first PREFILL_CHUNK tokens read older tokens
through the compressed cache; --prefill engine measures that instead, one prefill per method.)
"""
import argparse
import datetime
import json
import math
import os
import platform
import random
import re
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from eval_variants import RANKINGS, VariantConfig, setup_variant, variant_cache
from generate import prefill
from model import DTYPES, KVCache, ModelArgs, Transformer, apply_rope, default_dtype
from kernels.ranking import select_top_reference
from sals_attention import SELECTIONS, SALSCache, SALSConfig, budget, calibrated, top_k_width

ROOT = Path(__file__).resolve().parent
HELD_OUT = ROOT / "data" / "heldout.txt"  # the part of Pride and Prejudice that calibration never sees (data/README.md)
HELD_OUT_START = "“Oh, yes! of that kind of love"
BASES = ("dense", "sals-25", "sals-12.5", "oracle", "oracle-head", "streaming")
PRESETS = {"sals-25": 0.25, "sals-12.5": 0.125}
# the overrides every non-dense method takes (the SALS ones take all SALSConfig fields)
SHARED_FIELDS = ("sparsity", "sink", "window", "dense_layers", "min_tokens", "budget_tokens")
# issue 14's candidate configurations: name -> (base, SALSConfig overrides). "paper": the paper's method as
# SALSConfig.preset(paper=True) sets it (one pre-RoPE ranking per layer, the proportional budget alone, layers 0, 1
# and the last dense). "hybrid" is an evaluation variant (eval_variants.py).
PAPER = {f: getattr(SALSConfig.preset(0.25, paper=True), f) for f in ("min_tokens", "selection", "ranking",
                                                                          "dense_layers")}
CANDIDATES = {
    f"sals-{p}-{name}": (f"sals-{p}", o) for p in ("25", "12.5") for name, o in [
        ("paper", PAPER),
        ("kvhead", {"selection": "kv-head", "ranking": "pre-rope"}),
        ("bucket", {"selection": "layer", "ranking": "bucket-rope"}),
        ("kvbucket", {"selection": "kv-head", "ranking": "bucket-rope"}),
        ("hybrid", {"selection": "layer", "ranking": "hybrid"}),
        ("kvhybrid", {"selection": "kv-head", "ranking": "hybrid"}),
    ]}


# ---------------------------------------------------------------------------------------------
# Methods.

@dataclass
class Method:
    name: str
    base: str  # one of BASES
    overrides: dict = field(default_factory=dict)  # SALSConfig fields, applied after the command line's


def method_named(name: str, defined: dict[str, Method] | None = None) -> Method:
    """A method by name: a base, a CANDIDATES entry or one of `defined` (--define)."""
    if defined and name in defined:
        return defined[name]
    if name in BASES:
        return Method(name, name)
    if name in CANDIDATES:
        base, o = CANDIDATES[name]
        return Method(name, base, dict(o))
    raise ValueError(f"unknown method {name!r}; choose from {', '.join(BASES + tuple(CANDIDATES))} or define one "
                     f"with --define NAME BASE JSON.")


def method_config(method: Method, context: int, overrides: dict | None = None,
                  calib: dict | None = None) -> VariantConfig | None:
    """The config of a method at a cache length of `context` tokens (None: dense). overrides (the command line's)
    then the method's own: the SALS presets take every VariantConfig field, their dense layers by default from
    calib's overlap report as setup_sals chooses them (sals_attention.calibrated); oracle and streaming take only
    SHARED_FIELDS, dense layers 0, 1 and the last unless given (streaming's window is the budget at the last position
    minus the sinks)."""
    o = {**(overrides or {}), **method.overrides}
    shared = {k: o[k] for k in SHARED_FIELDS if k in o}
    if method.base == "dense":
        return None
    if method.base in PRESETS:
        return calibrated(VariantConfig.preset(PRESETS[method.base], **o), calib)
    if method.base in ("oracle", "oracle-head"):  # oracle-head: HeadTopKCache reads only the shared fields
        return VariantConfig(rank_fraction=1.0, value_bits=16, selector="oracle", **shared)
    if method.base == "streaming":
        base = VariantConfig(rank_fraction=1.0, value_bits=16, **shared)
        n_total = int(budget(torch.tensor(context - 1), base)) + base.sink + base.window  # at the last position
        if n_total - base.sink < 1:
            raise ValueError(f"streaming at context {context}: the budget of {n_total} tokens leaves no room for a "
                             f"window after {base.sink} sinks; use a longer context or a larger budget.")
        return replace(base, window=n_total - base.sink)
    raise ValueError(f"method {method.name!r} has an unknown base {method.base!r}; choose from {', '.join(BASES)}.")


class HeadTopKCache(nn.Module):
    """Method "oracle-head" (evaluation only): a dense, full-precision cache whose decode steps attend the budget
    of SALS (the sinks, the recent window and budget() more tokens), but with the top tokens chosen by each KV head
    for itself, by its exact post-RoPE logits summed over its G query heads. SALS (and "oracle") choose one set
    per layer; this measures what per-head selection could gain."""

    def __init__(self, cfg: SALSConfig, batch_size: int, max_seq_length: int, n_kv_head: int, head_dim: int,
                 dtype):
        super().__init__()
        self.cache, self.cfg = KVCache(batch_size, max_seq_length, n_kv_head, head_dim, dtype), cfg
        self.k_max = top_k_width(cfg, max_seq_length)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, input_pos: Tensor, rope: Tensor,
                rows: Tensor | None = None) -> Tensor:
        if q.shape[2] > 1:  # prefill stays dense
            return self.cache(q, k, v, input_pos, rope, rows)
        self.cache.write(torch.arange(q.shape[0], device=q.device) if rows is None else rows, apply_rope(k, rope), v,
                         input_pos)
        kc, vc = (self.cache.k_cache, self.cache.v_cache) if rows is None else \
            (self.cache.k_cache[rows], self.cache.v_cache[rows])  # (b, Hkv, S, Dh), post-RoPE
        c = self.cfg
        b, H, _, Dh = q.shape
        Hkv, S = kc.shape[1], kc.shape[2]
        q_rope = apply_rope(q, rope)[:, :, 0].unflatten(1, (Hkv, H // Hkv))  # (b, Hkv, G, Dh)
        logits = torch.einsum("bhgd,bhsd->bhs", q_rope.float(), kc.float())  # (b, Hkv, S) summed over G
        j = torch.arange(S, device=q.device)
        cand = (j >= c.sink) & (j <= input_pos - c.window)  # (b, S)
        idx, keep = select_top_reference(logits.masked_fill(~cand[:, None], -math.inf), budget(input_pos, c)[:, 0],
                                         self.k_max)  # (b, Hkv, k_max)
        fixed = (j <= input_pos) & ((j < c.sink) | (j > input_pos - c.window))  # (b, S) sinks and window
        fixed = fixed[:, None].expand(b, Hkv, S)
        mask = fixed.scatter(-1, idx, keep | fixed.gather(-1, idx))  # past the candidates, topk's -inf picks any slot
        out = F.scaled_dot_product_attention(q_rope, kc, vc, attn_mask=mask[:, :, None])  # (b, Hkv, G, Dh)
        return out.reshape(b, H, 1, Dh)


def store(cache: nn.Module, b: Tensor, k: Tensor, k_rope: Tensor, v: Tensor, input_pos: Tensor):
    """Writes a prompt's keys and values (b, Hkv, T, Dh) into a method's cache without attending."""
    if isinstance(cache, SALSCache):
        cache.write(b, k, k_rope, v, input_pos)
    elif isinstance(cache, HeadTopKCache):
        cache.cache.write(b, k_rope, v, input_pos)
    else:
        cache.write(b, k_rope, v, input_pos)


class MethodCaches(nn.Module):
    """One layer's caches of several methods (batch B each) plus a dense reference, behind the cache interface.

    route False: every cache gets the same q, k, v (B rows) and the reference's output goes on, so the residual
    stream stays dense. A prompt (T > 1, positions 0..T-1) is attended exactly (causal SDPA) and only stored in
    each cache; at decode steps (T == 1) each cache's relative error ||y - y_dense|| / ||y_dense|| over all heads
    is appended to errors[i].
    route True: the M * B rows are method-major, rows i*B .. i*B + B - 1 go through cache i only."""

    def __init__(self, ref: nn.Module, caches: list[nn.Module], batch: int):
        super().__init__()
        self.ref, self.caches, self.batch = ref, nn.ModuleList(caches), batch  # ref may be one of caches
        self.route = False
        self.errors: list[list[float]] = [[] for _ in caches]

    def forward(self, q: Tensor, k: Tensor, v: Tensor, input_pos: Tensor, rope: Tensor,
                rows: Tensor | None = None) -> Tensor:
        B = self.batch
        if self.route:
            assert rows is None and q.shape[0] == len(self.caches) * B, "route: B rows per method, method-major"
            return torch.cat([c(q[i * B:(i + 1) * B], k[i * B:(i + 1) * B], v[i * B:(i + 1) * B],
                                input_pos[i * B:(i + 1) * B], rope[i * B:(i + 1) * B])
                              for i, c in enumerate(self.caches)])
        assert rows is None and q.shape[0] == B, "shared: the same B rows for every method"
        if q.shape[2] > 1:
            return self.prefill(q, k, v, input_pos, rope)
        y = self.ref(q, k, v, input_pos, rope)  # (B, H, 1, Dh)
        for c, err in zip(self.caches, self.errors):
            y_c = y if c is self.ref else c(q, k, v, input_pos, rope)
            err.append(((y_c.float() - y.float()).norm() / y.float().norm()).item())
        return y

    def prefill(self, q: Tensor, k: Tensor, v: Tensor, input_pos: Tensor, rope: Tensor) -> Tensor:
        """Whole prompts (positions 0..T-1 in every row): causal attention, then every cache stores k, v."""
        if int(input_pos[:, 0].abs().max()) != 0:  # host sync: prefill only
            raise ValueError("the shared prefill takes whole prompts from position 0 in one chunk.")
        k_rope = apply_rope(k, rope)
        y = F.scaled_dot_product_attention(apply_rope(q, rope), k_rope, v, is_causal=True, enable_gqa=True)
        b = torch.arange(q.shape[0], device=q.device)
        for c in {id(c): c for c in [self.ref, *self.caches]}.values():
            store(c, b, k, k_rope, v, input_pos)
        return y


def setup_methods(model: Transformer, methods: list[Method], context: int, calib: dict | None,
                  overrides: dict | None = None, batch: int = 1) -> dict[str, VariantConfig | None]:
    """Gives every layer a MethodCaches (`batch` rows per method, `context` tokens). Returns the resolved configs."""
    per_method, resolved = [], {}
    for m in methods:
        cfg = method_config(m, context, overrides, calib)
        if cfg is None:
            model.setup_caches(batch, context)
        elif m.base == "oracle-head":
            cfg = cfg.resolve(model.args, model.args.n_kv_head * model.args.head_dim)
            model.setup_caches(batch, context, lambda i, a, B, S, dtype: KVCache(B, S, a.n_kv_head, a.head_dim, dtype)
                               if i in cfg.dense_layers else HeadTopKCache(cfg, B, S, a.n_kv_head, a.head_dim, dtype))
        else:
            cfg = setup_variant(model, batch, context, cfg, calib)
        resolved[m.name] = cfg
        per_method.append([layer.attention.kv_cache for layer in model.layers])
    dense = [i for i, m in enumerate(methods) if m.base == "dense"]
    if dense:  # the dense method is the reference; else a reference of its own
        refs = per_method[dense[0]]
    else:
        model.setup_caches(batch, context)
        refs = [layer.attention.kv_cache for layer in model.layers]
    for i, layer in enumerate(model.layers):
        layer.attention.kv_cache = MethodCaches(refs[i], [caches[i] for caches in per_method], batch)
    return resolved


def set_route(model: Transformer, route: bool):
    for layer in model.layers:
        layer.attention.kv_cache.route = route


@contextmanager
def last_position_logits(model: Transformer):
    """The model returns logits of the last position only: a prefill needs no others, and the output layer over
    every position would cost T x vocab floats per row."""
    hook = model.norm.register_forward_pre_hook(lambda module, args: (args[0][:, -1:],))
    try:
        yield
    finally:
        hook.remove()


def prefill_methods(model: Transformer, ids: Tensor, n_methods: int, mode: str) -> Tensor:
    """Prefills every method's cache with prompts ids (B, T). mode "dense": once, exact causal attention, every
    cache written from the same k, v; "engine": each method's rows through its own cache, in chunks as
    generate.prefill does (a SALS chunk after the first reads older tokens through the compressed cache).
    Returns the last logits (n_methods * B, V), method-major."""
    with last_position_logits(model):
        if mode == "dense":
            set_route(model, False)
            pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
            return model(ids, pos)[:, -1].repeat(n_methods, 1)
        set_route(model, True)
        return prefill(model, ids.repeat(n_methods, 1))


def decode_step(model: Transformer, tokens: Tensor, pos: int) -> Tensor:
    """tokens (M * B,): one routed decode step, every row at position pos. Returns logits (M * B, V)."""
    set_route(model, True)
    input_pos = torch.full((len(tokens), 1), pos, device=tokens.device)
    return model(tokens[:, None], input_pos)[:, 0]


@torch.inference_mode()
def generate_batch(model: Transformer, calib: dict | None, methods: list[Method], prompts: list[list[int]],
                   context: int, n_question: int, new_tokens: int, overrides: dict | None = None,
                   prefill_mode: str = "dense") -> Tensor:
    """Greedy answers (M, B, new_tokens) of every method to B prompts of the same length: all but the last
    n_question tokens are prefilled, those (the question) go through decode steps, so the retrieval itself attends
    through the method's cache; context = cache length >= prompt length + new_tokens - 1."""
    length, M, B = len(prompts[0]), len(methods), len(prompts)
    if any(len(p) != length for p in prompts) or not 1 <= n_question < length or length + new_tokens - 1 > context:
        raise ValueError(f"a batch needs prompts of one length, 1 <= question tokens ({n_question}) < length "
                         f"({length}) and length + new tokens ({new_tokens}) - 1 <= context ({context}).")
    device = model.output.weight.device
    setup_methods(model, methods, context, calib, overrides, B)
    ids = torch.tensor(prompts, device=device)  # (B, length)
    prefill_methods(model, ids[:, :length - n_question], M, prefill_mode)
    for t in range(length - n_question, length):
        logits = decode_step(model, ids[:, t].repeat(M), t)
    out = [logits.argmax(-1)]
    for t in range(length, length + new_tokens - 1):
        out.append(decode_step(model, out[-1], t).argmax(-1))
    return torch.stack(out, 1).view(M, B, new_tokens).cpu()


def batches(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


# ---------------------------------------------------------------------------------------------
# 1. Perplexity.

def held_out_tokens(tokenizer, path: Path | None = None) -> list[int]:
    """Token ids of the perplexity text: by default data/heldout.txt, which calibration never sees; else the
    whole file at path."""
    path = HELD_OUT if path is None else Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--ppl_text {path} does not exist.")
    return tokenizer.encode(path.read_text(encoding="utf-8"))


def check_windows(n_text: int, context: int, n_windows: int, n_tokens: int):
    """Raises ValueError unless a text of n_text tokens holds n_windows windows of context tokens, n_tokens scored."""
    if not 1 <= n_tokens < context:
        raise ValueError(f"perplexity needs 1 <= tokens scored ({n_tokens}) < context ({context}).")
    if n_windows * context > n_text:
        raise ValueError(f"the text has {n_text} tokens: too few for {n_windows} windows of {context} (at most "
                         f"{n_text // context}); lower --ppl_windows or the context.")


@torch.inference_mode()
def perplexity(model: Transformer, calib: dict | None, tokens: list[int], methods: list[Method], context: int,
               n_windows: int, n_tokens: int, overrides: dict | None = None, prefill_mode: str = "dense",
               batch: int = 8) -> dict:
    """Perplexity of the last n_tokens of each of n_windows consecutive windows of `context` tokens: the first
    context - n_tokens - 1 tokens are prefilled, the next n_tokens fed one by one through decode steps
    (teacher forcing), so every scored token is predicted under the method's cache; `batch` windows at a time.
    Returns per method the pooled perplexity exp(mean NLL) and each window's mean NLL."""
    check_windows(len(tokens), context, n_windows, n_tokens)
    device, M = model.output.weight.device, len(methods)
    nll = torch.zeros(n_windows, M, dtype=torch.float64)
    start = context - n_tokens - 1
    for w0 in range(0, n_windows, batch):
        B = min(batch, n_windows - w0)
        ids = torch.tensor(tokens[w0 * context:(w0 + B) * context], device=device).view(B, context)
        setup_methods(model, methods, context, calib, overrides, B)
        prefill_methods(model, ids[:, :start], M, prefill_mode)
        for t in range(start, context - 1):
            logp = F.log_softmax(decode_step(model, ids[:, t].repeat(M), t).double(), -1)  # (M * B, V)
            nll[w0:w0 + B] -= logp.gather(-1, ids[:, t + 1].repeat(M)[:, None]).view(M, B).T.cpu()
    nll /= n_tokens
    return {m.name: {"ppl": math.exp(nll[:, i].mean().item()), "window_nll": nll[:, i].tolist()}
            for i, m in enumerate(methods)}


# ---------------------------------------------------------------------------------------------
# 2. Pass-key retrieval, and the haystack prompts the RULER suite shares with it.

INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. Find it and "
         "memorize it. I will quiz you about the important information there.\n\n")
NEEDLE = "\n\nThe pass key is {key}. Remember it. {key} is the pass key.\n\n"
QUESTION = "\n\nWhat is the pass key? The pass key is"
SNAP = 64  # a needle moves back up to this many tokens to start after a sentence


def haystack_tokens(tokenizer, path: Path = HELD_OUT) -> list[int]:
    """The haystack: real text the calibration never saw (data/heldout.txt by default)."""
    return held_out_tokens(tokenizer, path)


def haystack_prompt(tokenizer, haystack: list[int], length: int, intro: list[int], needles: list[list[int]],
                    depths: list[float], question: list[int], offset: int) -> tuple[list[int], list[int]]:
    """A prompt of exactly `length` tokens: intro, haystack[offset:...] with needle i inserted at depths[i] (0
    first, 1 last) of the haystack part, each moved back to a sentence end if one is near, then question.
    Needles at equal depths keep their order. Returns (ids, index of each needle's first token)."""
    n = length - len(intro) - sum(map(len, needles)) - len(question)
    if n < 1 or offset + n > len(haystack):
        raise ValueError(f"a prompt of {length} tokens needs {n} haystack tokens from offset {offset}; "
                         f"the haystack has {len(haystack)}.")
    if len(depths) != len(needles) or not all(0 <= d <= 1 for d in depths):
        raise ValueError(f"depths {depths} must be one per needle, each in [0, 1].")
    hay = haystack[offset:offset + n]
    cuts = []
    for depth in depths:
        d = round(depth * n)
        for j in range(d, max(d - SNAP, 0) - 1, -1):
            if j == 0 or tokenizer.decode([hay[j - 1]]).rstrip().endswith("."):
                d = j
                break
        cuts.append(d)
    ids, at, prev = list(intro), [0] * len(needles), 0
    for i in sorted(range(len(needles)), key=lambda i: (cuts[i], i)):
        ids += hay[prev:cuts[i]]
        at[i], prev = len(ids), cuts[i]
        ids += needles[i]
    return ids + hay[prev:] + question, at


def passkey_prompt(tokenizer, haystack: list[int], length: int, depth: float, key: str,
                   offset: int) -> tuple[list[int], int]:
    """A pass-key prompt of exactly `length` tokens: INTRO, the haystack with NEEDLE at `depth`, QUESTION.
    Returns (ids, index of the needle's first token)."""
    intro, needle, question = (tokenizer.encode(s) for s in (INTRO, NEEDLE.format(key=key), QUESTION))
    ids, at = haystack_prompt(tokenizer, haystack, length, intro, [needle], [depth], question, offset)
    return ids, at[0]


def passkey_found(text: str, key: str) -> bool:
    """The key as a whole number in the generated text (so 123456 does not count for 12345)."""
    return re.search(rf"(?<!\d){key}(?!\d)", text) is not None


def passkey(model: Transformer, calib: dict | None, tokenizer, haystack: list[int], methods: list[Method],
            contexts: list[int], depths: list[float], trials: int, overrides: dict | None = None, seed: int = 0,
            question_tokens: int = 32, new_tokens: int = 10, prefill_mode: str = "dense", batch: int = 8) -> dict:
    """Pass-key retrieval. context = cache length: a prompt of context - new_tokens tokens, of which the last
    max(question_tokens, len(QUESTION)) go through decode steps (generate_batch), then new_tokens greedy tokens;
    success when the key appears as a whole number. Each trial draws its own key (5 or 6 digits) and haystack
    offset; the trials of a context run `batch` at a time. Returns the records and the accuracy per method, per
    (context, depth) and overall."""
    n_q = max(question_tokens, len(tokenizer.encode(QUESTION)))
    records = []
    for context in contexts:
        length, trials_here = context - new_tokens, []
        for depth in depths:
            for trial in range(trials):
                rng = random.Random(f"{seed}/{context}/{depth}/{trial}")
                key = str(rng.randrange(10 ** 4, 10 ** 5) if rng.random() < 0.5 else rng.randrange(10 ** 5, 10 ** 6))
                prompt, at = passkey_prompt(tokenizer, haystack, length, depth, key,
                                            rng.randrange(0, len(haystack) - length))
                trials_here.append(({"context": context, "depth": depth, "trial": trial, "key": key,
                                     "needle_at": at / length}, prompt))
        for chunk in batches(trials_here, batch):
            out = generate_batch(model, calib, methods, [p for _, p in chunk], context, n_q, new_tokens, overrides,
                                 prefill_mode)  # (M, B, new_tokens)
            for b, (rec, _) in enumerate(chunk):
                texts = {m.name: tokenizer.decode(out[i, b].tolist()) for i, m in enumerate(methods)}
                records.append({**rec, "answers": texts,
                                "found": {m: passkey_found(s, rec["key"]) for m, s in texts.items()}})
    accuracy = passkey_accuracy(records, [m.name for m in methods], contexts, depths, trials)
    return {"contexts": contexts, "depths": depths, "trials": trials, "accuracy": accuracy, "records": records}


def passkey_accuracy(records: list[dict], methods: list[str], contexts: list[int], depths: list[float],
                     trials: int) -> dict:
    """Per method: the share of keys found overall and per "context/depth" cell (over the cell's records, so
    merged runs with different trials per cell count right; an empty cell is 0)."""
    cell = lambda m, c, d: [r["found"][m] for r in records if (r["context"], r["depth"]) == (c, d)]  # noqa: E731
    return {m: {"overall": sum(r["found"][m] for r in records) / len(records),
                "cells": {f"{c}/{d}": sum(cell(m, c, d)) / max(1, len(cell(m, c, d)))
                          for c in contexts for d in depths}} for m in methods}


# ---------------------------------------------------------------------------------------------
# 3. RULER-style retrieval (Hsieh et al. 2024, "RULER: What's the real context size of your long-context language
# models?"): needles in a real-text haystack, scored as RULER's string_match_all. Prompts keep RULER's wording, but
# the answer prefix repeats the needle's own words up to its colon (RULER's "... mentioned in the provided text is"
# made SmolLM2-135M answer ":" and go on with the template); keys are adjective-noun pairs with no word shared
# between the keys of a sample (shared words made multikey a guess), values 7-digit numbers or words.

ADJECTIVES = ("amber", "bitter", "brave", "calm", "clever", "crimson", "curious", "eager", "fancy", "gentle", "golden",
              "humble", "jolly", "lively", "lucky", "mighty", "noisy", "polite", "proud", "quiet", "rapid", "silent",
              "silver", "sleepy", "swift")
NOUNS = ("anchor", "badger", "beacon", "cactus", "comet", "dolphin", "falcon", "glacier", "harbor", "island",
         "jaguar", "lantern", "mongoose", "nebula", "otter", "pebble", "pelican", "quartz", "rocket", "saddle",
         "tiger", "tornado", "tulip", "walrus", "zebra")
VALUE_WORDS = ("apple", "laptop", "candle", "tractor", "engine", "forest", "guitar", "hammer", "igloo", "jacket",
               "kettle", "ladder", "magnet", "bicycle", "orchard", "pillow", "rabbit", "sandal", "teapot", "umbrella",
               "violin", "wagon", "camera", "yacht", "zipper")  # none of them in data/heldout.txt
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
# task -> greedy tokens generated (a 7-digit number is 8 tokens: a space and one per digit)
RULER_TASKS = {"niah-number": 12, "niah-word": 8, "multikey": 12, "multivalue": 40, "multiquery": 40,
               "vartrack": 24}
RULER_NEEDLES = 4  # needles of multivalue and multiquery
MULTIKEY_NEEDLES = 4  # multikey: one asked, the others distractors
RULER_HOPS = 2  # vartrack: X1 = value, X2 = X1, ..., RULER_HOPS assignments after the first


def _magic(kind: str) -> tuple[str, str]:
    """The needle and question wording of a value kind: ("numbers", "number") or ("words", "word")."""
    return ("numbers", "number") if kind == "number" else ("words", "word")


def ruler_sample(task: str, rng: random.Random) -> tuple[str, list[str], str, list[str]]:
    """One sample's text: (intro, needles, question, expected strings). The answer is correct when every
    expected string appears in the greedy answer (RULER's string_match_all, case-insensitive)."""
    n_keys = max(RULER_NEEDLES, MULTIKEY_NEEDLES)
    keys = [f"{a}-{n}" for a, n in zip(rng.sample(ADJECTIVES, n_keys), rng.sample(NOUNS, n_keys))]
    number = lambda: str(rng.randrange(10 ** 6, 10 ** 7))  # noqa: E731
    kind = "word" if task == "niah-word" else "number"
    plural, singular = _magic(kind)
    intro = (f"Some special magic {plural} are hidden within the following text. Make sure to memorize it. I will "
             f"quiz you about the {plural} afterwards.\n\n")
    needle = "\n\nOne of the special magic {p} for {k} is: {v}.\n\n".format
    if task in ("niah-number", "niah-word", "multikey"):
        values = rng.sample(VALUE_WORDS, len(keys)) if kind == "word" else [number() for _ in keys]
        n = 1 if task != "multikey" else MULTIKEY_NEEDLES
        needles = [needle(p=plural, k=k, v=v) for k, v in zip(keys[:n], values[:n])]
        q = (f"\n\nWhat is the special magic {singular} for {keys[0]} mentioned in the provided text? Answer: One of "
             f"the special magic {plural} for {keys[0]} is:")
        return intro, needles, q, [values[0]]
    if task == "multivalue":
        values = [number() for _ in range(RULER_NEEDLES)]
        needles = [needle(p=plural, k=keys[0], v=v) for v in values]
        q = (f"\n\nWhat are all the special magic numbers for {keys[0]} mentioned in the provided text? Answer: The "
             f"special magic numbers for {keys[0]} are:")
        return intro, needles, q, values
    if task == "multiquery":
        values = [number() for _ in range(RULER_NEEDLES)]
        needles = [needle(p=plural, k=k, v=v) for k, v in zip(keys, values)]
        asked = ", ".join(keys[:RULER_NEEDLES - 1]) + f" and {keys[RULER_NEEDLES - 1]}"
        q = (f"\n\nWhat are all the special magic numbers for {asked} mentioned in the provided text? Answer: The "
             f"special magic numbers for {asked} are:")
        return intro, needles, q, values
    if task == "vartrack":
        names = ["".join(rng.sample(LETTERS, 5)) for _ in range(RULER_HOPS + 1)]
        value = str(rng.randrange(10 ** 4, 10 ** 5))
        needles = [f"\n\nVAR {names[0]} = {value}\n\n"] + [f"\n\nVAR {b} = VAR {a}\n\n"
                                                          for a, b in zip(names, names[1:])]
        intro = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
        q = (f"\n\nQuestion: Find all variables that are assigned the value {value} in the text above. Answer: "
             f"According to the chain(s) of variables assignment in the text above, {len(names)} variables are "
             f"assigned the value {value}, they are:")
        return intro, needles, q, names
    raise ValueError(f"unknown RULER task {task!r}; choose from {', '.join(RULER_TASKS)}.")


def ruler_score(answer: str, expected: list[str]) -> float:
    """RULER's string_match_all for one sample: the share of the expected strings found in the answer."""
    return sum(e.lower() in answer.lower() for e in expected) / len(expected)


def ruler_prompt(tokenizer, haystack: list[int], task: str, length: int, rng: random.Random) -> tuple[list[int], dict]:
    """A RULER prompt of exactly `length` tokens (needles at random depths, in order) and its record."""
    intro, needles, question, expected = ruler_sample(task, rng)
    depths = sorted(rng.random() for _ in needles)
    n_fixed = sum(len(tokenizer.encode(s)) for s in (intro, question, *needles))
    offset = rng.randrange(0, len(haystack) - (length - n_fixed))
    ids, at = haystack_prompt(tokenizer, haystack, length, tokenizer.encode(intro),
                              [tokenizer.encode(s) for s in needles], depths, tokenizer.encode(question), offset)
    return ids, {"expected": expected, "needles_at": [a / length for a in at],
                 "question_tokens": len(tokenizer.encode(question))}


def ruler(model: Transformer, calib: dict | None, tokenizer, haystack: list[int], methods: list[Method],
          contexts: list[int], tasks: list[str], samples: int, overrides: dict | None = None, seed: int = 0,
          prefill_mode: str = "dense", batch: int = 8) -> dict:
    """The RULER-style suite: `samples` prompts per task and context (cache length = context, prompt length =
    context - the task's answer tokens), `batch` at a time; each question goes through decode steps. Returns the
    records (each method's answer and score) and the mean score per method, task, context."""
    records = []
    for context in contexts:
        for task in tasks:
            new_tokens = RULER_TASKS[task]
            made = [ruler_prompt(tokenizer, haystack, task, context - new_tokens,
                                 random.Random(f"{seed}/{task}/{context}/{s}")) for s in range(samples)]
            for s0, chunk in zip(range(0, samples, batch), batches(made, batch)):
                n_q = max(rec["question_tokens"] for _, rec in chunk)
                out = generate_batch(model, calib, methods, [p for p, _ in chunk], context, n_q, new_tokens,
                                     overrides, prefill_mode)
                for b, (_, rec) in enumerate(chunk):
                    texts = {m.name: tokenizer.decode(out[i, b].tolist()) for i, m in enumerate(methods)}
                    records.append({"task": task, "context": context, "sample": s0 + b, **rec, "answers": texts,
                                    "score": {m: ruler_score(s, rec["expected"]) for m, s in texts.items()}})
    score = ruler_scores(records, [m.name for m in methods], tasks, contexts, samples)
    return {"contexts": contexts, "tasks": tasks, "samples": samples, "score": score, "records": records}


def ruler_scores(records: list[dict], methods: list[str], tasks: list[str], contexts: list[int], samples: int) -> dict:
    """Per method: the mean score per "task/context" cell (over the cell's records, so merged runs with different
    samples per cell count right; an empty cell is 0)."""
    cell = lambda m, t, c: [r["score"][m] for r in records if (r["task"], r["context"]) == (t, c)]  # noqa: E731
    return {m: {f"{t}/{c}": sum(cell(m, t, c)) / max(1, len(cell(m, t, c))) for t in tasks for c in contexts}
            for m in methods}


# ---------------------------------------------------------------------------------------------
# 4. Per-layer error of the attention output.

@torch.inference_mode()
def attention_error(model: Transformer, calib: dict | None, tokens: list[int], methods: list[Method],
                    context: int, n_tokens: int, overrides: dict | None = None) -> dict:
    """Relative error ||y_method - y_dense|| / ||y_dense|| of every layer's attention output (all heads of the
    token), at each of the last n_tokens decode steps of tokens[:context] (teacher forcing), every method fed
    the dense model's own q, k, v (no error carries over between layers or steps). Returns per method the
    per-layer mean and max over steps."""
    if not 1 <= n_tokens < context <= len(tokens):
        raise ValueError(f"attention error needs 1 <= tokens ({n_tokens}) < context ({context}) <= text "
                         f"length ({len(tokens)}).")
    device = model.output.weight.device
    setup_methods(model, methods, context, calib, overrides)
    start = context - n_tokens
    prefill_methods(model, torch.tensor([tokens[:start]], device=device), len(methods), "dense")
    set_route(model, False)
    for t in range(start, context):
        model(torch.tensor([[tokens[t]]], device=device), torch.tensor([[t]], device=device))
    errors = torch.tensor([layer.attention.kv_cache.errors for layer in model.layers])  # (L, M, n_tokens)
    return {m.name: {"mean": errors[:, i].mean(-1).tolist(), "max": errors[:, i].amax(-1).tolist()}
            for i, m in enumerate(methods)}


# ---------------------------------------------------------------------------------------------
# Statistics, memory and decode cost.

def paired_interval(diff: list[float], n_boot: int = 10000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of per-trial paired differences (method minus dense on the same trial or window) and its 95% percentile
    bootstrap interval: trials resampled with replacement, the same resample for both methods."""
    d = torch.tensor(diff, dtype=torch.float64)
    idx = torch.randint(0, len(d), (n_boot, len(d)), generator=torch.Generator().manual_seed(seed))
    lo, hi = torch.quantile(d[idx].mean(1), torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return d.mean().item(), lo, hi


def decode_cost(args: ModelArgs, cfg: VariantConfig | None, context: int, r_max: int) -> dict:
    """Memory (every byte every layer's cache allocates, 16-bit as on a GPU, batch 1, `context` tokens: as
    bench/kv_memory.py counts), bytes a decode step reads at the last position (cache.bytes_read_per_step) and its
    attention FLOPs (projections and MLP, the same for every method, left out): for a SALS layer, compressing the
    new key, the latent queries, one score per candidate (per KV head with kv-head selection; bucket-rope: each
    token with its own bucket's query, which the reference path computes for every bucket; hybrid: two), rebuilding the
    selected keys (none below n_exact), and attention over sinks + window + selected; for a dense layer, attention
    over the context."""
    L, H, Hkv, Dh = args.n_layer, args.n_head, args.n_kv_head, args.head_dim
    D = Hkv * Dh
    attend = lambda n: 4 * H * Dh * n  # noqa: E731  q.k and p.v over n tokens
    with torch.device("meta"):
        dense = KVCache(1, context, Hkv, Dh, torch.bfloat16)
        if cfg is None:
            return {"bytes": L * dense.bytes_allocated(), "bytes_read": L * dense.bytes_read_per_step(),
                    "flops": L * attend(context)}
        cfg = cfg.resolve(args, r_max)
        cache_class, product = variant_cache(cfg)
        sals = cache_class(product, args, 1, context, torch.empty(D, cfg.rank, dtype=torch.bfloat16))
    k, n_cand, r, rs = sals.k_max, max(0, context - cfg.sink - cfg.window), cfg.rank, cfg.score_dims
    per_head, hybrid = Hkv if cfg.selection == "kv-head" else 1, cfg.ranking == "hybrid"
    n_queries = max(1, sals.n_buckets) + hybrid
    rebuild = 0 if sals.n_exact == context else 2 * r * D * k  # below n_exact the keys are read at full rank
    flops = (2 * D * r + n_queries * 2 * D * rs + (1 + hybrid) * per_head * 2 * rs * n_cand + rebuild
             + attend(cfg.sink + cfg.window + k))
    n_dense = len(cfg.dense_layers)
    return {"bytes": n_dense * dense.bytes_allocated() + (L - n_dense) * sals.bytes_allocated(),
            "bytes_read": n_dense * dense.bytes_read_per_step() + (L - n_dense) * sals.bytes_read_per_step(),
            "flops": n_dense * attend(context) + (L - n_dense) * flops}


# ---------------------------------------------------------------------------------------------
# Reporting.

def _diff_cell(diff: list[float], scale: float = 100) -> str:
    mean, lo, hi = paired_interval(diff)
    return f"{mean * scale:+.1f} [{lo * scale:+.1f}, {hi * scale:+.1f}]"


def _ratio_cell(diff: list[float]) -> str:
    mean, lo, hi = paired_interval(diff)
    return f"{(math.exp(mean) - 1) * 100:+.2f}% [{(math.exp(lo) - 1) * 100:+.2f}, {(math.exp(hi) - 1) * 100:+.2f}]"


def tables(results: dict) -> str:
    """Markdown tables of a results dict as saved (JSON: string keys), methods as rows; against dense: accuracy
    differences in points and perplexity ratios with their paired 95% bootstrap intervals."""
    out, methods = [], results["methods"]
    ref = "dense" if "dense" in methods else None
    for name, ppl in results.get("ppl", {}).items():
        ctxs = sorted(ppl["contexts"], key=int)  # merged parts: in order of context
        out += [f"Perplexity, {name} (last {ppl['tokens']} tokens of each window through decode steps; prefill "
                f"{ppl['prefill']}); change vs dense [95% interval, paired bootstrap over windows]", "",
                "| method | " + " | ".join(f"{c} ({ppl['windows'][c]} win.)" for c in ctxs) + " |",
                "|---" * (len(ctxs) + 1) + "|"]
        for m in methods:
            cells = []
            for c in ctxs:
                r = ppl["contexts"][c]
                d = [a - b for a, b in zip(r[m]["window_nll"], r[ref]["window_nll"])] if ref and m != ref else None
                cells.append(f"{r[m]['ppl']:.3f}" + (f" ({_ratio_cell(d)})" if d else ""))
            out.append(f"| {m} | " + " | ".join(cells) + " |")
        out.append("")
    if "passkey" in results:
        pk = results["passkey"]
        recs, ctxs = pk["records"], pk["contexts"]
        out += [f"Pass-key accuracy (%; {pk['trials']} trials per context x depth cell, depths "
                f"{', '.join(f'{d:.0%}' for d in pk['depths'])}); in brackets: points vs dense [95% interval]", "",
                "| method | " + " | ".join(str(c) for c in ctxs) + " | overall |", "|---" * (len(ctxs) + 2) + "|"]
        for m in methods:
            cells = []
            for c in ctxs + [None]:
                sel = [r for r in recs if c is None or r["context"] == c]
                acc = 100 * sum(r["found"][m] for r in sel) / len(sel)
                d = [r["found"][m] - r["found"][ref] for r in sel] if ref and m != ref else None
                cells.append(f"{acc:.1f}" + (f" ({_diff_cell(d)})" if d else ""))
            out.append(f"| {m} | " + " | ".join(cells) + " |")
        out.append("")
    if "ruler" in results:
        ru = results["ruler"]
        recs, tasks, ctxs = ru["records"], ru["tasks"], ru["contexts"]
        for title, groups in [("per task, all contexts", [(t, lambda r, t=t: r["task"] == t) for t in tasks]
                               + [("all tasks", lambda r: True)]),
                              ("per context, all tasks", [(str(c), lambda r, c=c: r["context"] == c) for c in ctxs])]:
            out += [f"RULER-style retrieval, {title} (score %, string_match_all; {ru['samples']} samples per task "
                    f"and context); in brackets: points vs dense [95% interval]", "",
                    "| method | " + " | ".join(g for g, _ in groups) + " |", "|---" * (len(groups) + 1) + "|"]
            for m in methods:
                cells = []
                for _, keep in groups:
                    sel = [r for r in recs if keep(r)]
                    d = [r["score"][m] - r["score"][ref] for r in sel] if ref and m != ref else None
                    cells.append(f"{100 * sum(r['score'][m] for r in sel) / len(sel):.1f}"
                                 + (f" ({_diff_cell(d)})" if d else ""))
                out.append(f"| {m} | " + " | ".join(cells) + " |")
            out.append("")
    if "costs" in results:
        co = results["costs"]
        dense = co["methods"].get("dense")
        out += [f"Memory and decode cost at {co['context']} tokens, batch 1, 16-bit (every byte allocated, all "
                f"layers; a decode step's reads and attention FLOPs at the last position)", "",
                "| method | cache MiB | vs dense | read per step MiB | attention MFLOP per step |", "|---" * 5 + "|"]
        for m in (m for m in methods if m in co["methods"]):  # not the evaluation-only methods
            c = co["methods"][m]
            out.append(f"| {m} | {c['bytes'] / 2 ** 20:.2f} | "
                       + (f"{c['bytes'] / dense['bytes']:.3f}" if dense else "-")
                       + f" | {c['bytes_read'] / 2 ** 20:.2f} | {c['flops'] / 1e6:.1f} |")
        out.append("")
    if "error" in results:
        err = results["error"]
        shown = [m for m in methods if m != "dense"]
        out += [f"Relative error of the attention output per layer (mean over {err['tokens']} decode steps at "
                f"context {err['context']})", "",
                "| layer | " + " | ".join(shown) + " |", "|---" * (len(shown) + 1) + "|"]
        for i in range(len(err["methods"][methods[0]]["mean"])):
            out.append(f"| {i} | " + " | ".join(f"{err['methods'][m]['mean'][i]:.4f}" for m in shown) + " |")
        out.append("| mean | " + " | ".join(
            f"{sum(err['methods'][m]['mean']) / len(err['methods'][m]['mean']):.4f}" for m in shown) + " |")
        out.append("")
    out.append("Run time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in results["seconds"].items()))
    return "\n".join(out)


def _rename_keys(x, names: dict):
    """x (parsed JSON) with every dict key in names renamed (method-keyed dicts; values are left alone)."""
    if isinstance(x, dict):
        return {names.get(k, k): _rename_keys(v, names) for k, v in x.items()}
    return [_rename_keys(v, names) for v in x] if isinstance(x, list) else x


def merge_results(parts: list[dict]) -> dict:
    """Saved results of the same methods from several runs (say, one process per evaluation, context or RULER task)
    as one: perplexity contexts side by side, pass-key and RULER records pooled, run times per part. Methods are
    matched in order; a name may differ between parts where the resolved configs are the same (a candidate that
    became the default under a new name): the merged result takes the last part's names."""
    last = parts[-1]
    renamed = []
    for i, r in enumerate(parts):
        same = len(r["methods"]) == len(last["methods"]) and all(
            a == b or r["configs_at_max_context"][a] == last["configs_at_max_context"][b]
            for a, b in zip(r["methods"], last["methods"]))
        if not same:
            raise ValueError(f"part {i + 1} has methods {r['methods']}, the last {last['methods']}: merge runs of "
                             f"the same methods (in the same order, or under other names with the same configs).")
        names = {a: b for a, b in zip(r["methods"], last["methods"]) if a != b}
        renamed.append(dict(_rename_keys({k: v for k, v in r.items() if k != "methods"}, names),
                            methods=list(last["methods"])))
    parts = renamed
    out = dict(json.loads(json.dumps(parts[0])), seconds={})  # a copy: the parts stay as they are
    for i, r in enumerate(parts):
        out["seconds"].update({f"{k} (part {i + 1})": v for k, v in r["seconds"].items()})
        if r["costs"]["context"] > out["costs"]["context"]:
            out["costs"] = r["costs"]
        if i == 0:
            continue
        for name, ppl in r.get("ppl", {}).items():
            mine = out.setdefault("ppl", {}).setdefault(name, dict(ppl, contexts={}, windows={}))
            mine["contexts"] = {**mine["contexts"], **ppl["contexts"]}
            mine["windows"] = {**mine["windows"], **{c: ppl["windows"][c] for c in ppl["contexts"]}}
        for key in ("passkey", "ruler"):
            if key in r:
                mine = out.get(key, dict(r[key], records=[], contexts=[]))
                new = [c for c in r[key]["contexts"] if c not in mine["contexts"]]
                out[key] = dict(mine, records=mine["records"] + r[key]["records"], contexts=mine["contexts"] + new)
                if key == "ruler":  # runs split by task: every part's tasks
                    out[key]["tasks"] = mine["tasks"] + [t for t in r[key]["tasks"] if t not in mine["tasks"]]
    if "passkey" in out:
        pk = out["passkey"]
        pk["accuracy"] = passkey_accuracy(pk["records"], out["methods"], pk["contexts"], pk["depths"], pk["trials"])
    if "ruler" in out:
        ru = out["ruler"]
        ru["score"] = ruler_scores(ru["records"], out["methods"], ru["tasks"], ru["contexts"], ru["samples"])
    return out


def plot_grid(values: list[list[float]], rows: list[str], cols: list[str], xlabel: str, ylabel: str, title: str,
              path: Path):
    """Heatmap PNG of scores in [0, 1], rows x cols. Needs matplotlib."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * len(cols), 0.6 + 0.45 * len(rows)), dpi=100)
    ax.imshow(values, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    for i, row in enumerate(values):
        for j, a in enumerate(row):
            ax.text(j, i, f"{a:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(cols)), cols, fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_results(results: dict, out: Path, tag: str):
    """Per method: pass key (context x depth) and RULER (task x context) heatmaps."""
    for m in results["methods"]:
        if "passkey" in results:
            pk = results["passkey"]
            cells = pk["accuracy"][m]["cells"]
            plot_grid([[cells[f"{c}/{d}"] for d in pk["depths"]] for c in pk["contexts"]],
                      [str(c) for c in pk["contexts"]], [f"{d:.0%}" for d in pk["depths"]], "needle depth", "context",
                      f"{m}: pass key, {pk['accuracy'][m]['overall']:.0%} ({pk['trials']}/cell)",
                      out / f"passkey_{tag}_{m}.png")
        if "ruler" in results:
            ru = results["ruler"]
            plot_grid([[ru["score"][m][f"{t}/{c}"] for c in ru["contexts"]] for t in ru["tasks"]], ru["tasks"],
                      [str(c) for c in ru["contexts"]], "context", "task",
                      f"{m}: RULER-style ({ru['samples']}/cell)", out / f"ruler_{tag}_{m}.png")


# ---------------------------------------------------------------------------------------------
# Command line.

SALS_FLAGS = ("dense_layers", "sparsity", "sink", "window", "min_tokens", "budget_tokens", "rank", "rank_fraction",
              "score_dims", "value_bits", "ranking", "selection")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, help="converted checkpoint folder (default: SmolLM2-135M-Instruct)")
    p.add_argument("--calib", type=Path, help="SALS calibration file (default: <checkpoint>/sals_calib.pt)")
    p.add_argument("--evals", nargs="+", choices=["ppl", "passkey", "ruler", "error"],
                   default=["ppl", "passkey", "ruler"])
    p.add_argument("--methods", nargs="+", default=["dense", "sals-25", "sals-12.5"],
                   help=f"from {', '.join(BASES + tuple(CANDIDATES))} and --define")
    p.add_argument("--define", nargs=3, action="append", default=[], metavar=("NAME", "BASE", "JSON"),
                   help="a method: a base and SALSConfig overrides as a JSON object, e.g. "
                        "--define kv48 sals-25 '{\"selection\": \"kv-head\", \"score_dims\": 48}'")
    p.add_argument("--tables", type=Path, nargs="+", help="print the tables of saved results and exit")
    p.add_argument("--merge", action="store_true", help="with --tables: the saved results as one run's")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=DTYPES, help="default: float32 on CPU, bfloat16 on GPU")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (on a busy machine one thread per process is fastest: decode steps are "
                        "many small operations; run evaluations in parallel processes, then --tables --merge)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=8, help="prompts (or windows) per batch, for every method")
    p.add_argument("--prefill", choices=["dense", "engine"], default="dense",
                   help="dense: one shared dense prefill; engine: each method's own chunked prefill")
    p.add_argument("--out", type=Path, default=ROOT / "eval_results", help="folder for the JSON and PNGs")
    p.add_argument("--tag", default="main", help="names the outputs: <out>/<tag>.json, <out>/*_<tag>_*.png")
    e = p.add_argument_group("evaluations")
    e.add_argument("--ppl_text", type=Path, nargs="+", default=[None],
                   help="texts for perplexity (default: data/heldout.txt, never calibrated on)")
    e.add_argument("--ppl_contexts", type=int, nargs="+", default=[2048, 4096, 8192])
    e.add_argument("--ppl_windows", type=int, nargs="+", default=[8],
                   help="windows per context: one number, or one per --ppl_contexts")
    e.add_argument("--ppl_tokens", type=int, default=256, help="scored tokens per window, fed by decode steps")
    e.add_argument("--passkey_contexts", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    e.add_argument("--passkey_depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    e.add_argument("--passkey_trials", type=int, default=6, help="trials per context x depth cell")
    e.add_argument("--passkey_question_tokens", type=int, default=32,
                   help="last prompt tokens fed through decode steps (at least the question)")
    e.add_argument("--ruler_contexts", type=int, nargs="+", default=[2048, 4096, 8192])
    e.add_argument("--ruler_tasks", nargs="+", choices=list(RULER_TASKS), default=list(RULER_TASKS))
    e.add_argument("--ruler_samples", type=int, default=40, help="samples per task and context")
    e.add_argument("--error_context", type=int, default=4096)
    e.add_argument("--error_tokens", type=int, default=128)
    s = p.add_argument_group("SALS overrides, for every non-dense method (oracle and streaming: the shared ones)")
    s.add_argument("--dense_layers", type=str, help="comma-separated layer ids (shared)")
    s.add_argument("--sparsity", type=float, help="attended share of the context (shared)")
    s.add_argument("--sink", type=int, help="sink tokens (shared)")
    s.add_argument("--window", type=int, help="recent window (shared except streaming, whose window fills the budget)")
    s.add_argument("--min_tokens", type=int, help="below this many tokens every one is attended (shared)")
    s.add_argument("--budget_tokens", type=int, help="a fixed number of attended tokens instead of sparsity (shared)")
    s.add_argument("--rank", type=int)
    s.add_argument("--rank_fraction", type=float)
    s.add_argument("--score_dims", type=int)
    s.add_argument("--value_bits", type=int)
    s.add_argument("--ranking", choices=RANKINGS, help="how the latent query ranks tokens (default: the preset's)")
    s.add_argument("--selection", choices=SELECTIONS,
                   help="one top-k per layer (the paper) or one per KV head (default: the preset's)")
    a = p.parse_args(argv)
    if a.tables:
        return a
    if len(a.ppl_windows) not in (1, len(a.ppl_contexts)):
        p.error(f"--ppl_windows takes one number or one per context ({len(a.ppl_contexts)}).")
    a.ppl_windows = dict(zip(a.ppl_contexts, a.ppl_windows * len(a.ppl_contexts) if len(a.ppl_windows) == 1
                             else a.ppl_windows))
    if min(*a.ppl_windows.values(), a.ppl_tokens, a.passkey_trials, a.error_tokens, a.passkey_question_tokens,
           a.ruler_samples, a.batch, a.threads) < 1:
        p.error("--ppl_windows, --ppl_tokens, --passkey_trials, --passkey_question_tokens, --ruler_samples, "
                "--error_tokens, --batch and --threads must be positive.")
    if a.dense_layers is not None:
        try:
            a.dense_layers = tuple(int(x) for x in a.dense_layers.split(",") if x.strip())
        except ValueError:
            p.error(f"--dense_layers {a.dense_layers!r} is not a comma-separated list of layer ids.")
    defined = {}
    for name, base, spec in a.define:
        try:
            o = json.loads(spec)
        except json.JSONDecodeError as e:
            p.error(f"--define {name}: {spec!r} is not a JSON object ({e}).")
        unknown = set(o) - set(VariantConfig.__dataclass_fields__) if isinstance(o, dict) else {spec}
        if unknown or base not in BASES:
            p.error(f"--define {name}: the base must be one of {', '.join(BASES)} and the JSON an object of "
                    f"VariantConfig fields ({', '.join(VariantConfig.__dataclass_fields__)}); got {base!r}, "
                    f"{spec!r}.")
        if "dense_layers" in o:
            o["dense_layers"] = tuple(o["dense_layers"])
        defined[name] = Method(name, base, o)
    try:
        a.methods = [method_named(n, defined) for n in dict.fromkeys(a.methods)]
    except ValueError as e:
        p.error(str(e))
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda asked for, but no CUDA GPU is available; use --device cpu.")
    a.dtype = DTYPES[a.dtype] if a.dtype else default_dtype(a.device)
    return a


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "load_average": os.getloadavg()}


def run(a) -> dict:
    from calibrate import load_calibration
    from model import load_model
    from tokenizer import load_tokenizer
    if a.checkpoint is None:
        from convert_hf_checkpoint import ensure_default_checkpoint
        a.checkpoint = ensure_default_checkpoint()
    model = load_model(a.checkpoint, a.device, a.dtype)
    tokenizer = load_tokenizer(a.checkpoint)
    needs_calib = any(m.base != "dense" for m in a.methods)
    calib = load_calibration(a.calib or Path(a.checkpoint) / "sals_calib.pt", model) if needs_calib else None
    overrides = {n: getattr(a, n) for n in SALS_FLAGS if getattr(a, n) is not None}
    limit = model.args.max_position_embeddings
    contexts = ((a.ppl_contexts if "ppl" in a.evals else []) + (a.passkey_contexts if "passkey" in a.evals else [])
                + (a.ruler_contexts if "ruler" in a.evals else []) + ([a.error_context] if "error" in a.evals else []))
    if max(contexts) > limit:
        raise ValueError(f"contexts {sorted(set(contexts))} must stay within the model's {limit} tokens.")
    r_max = calib["eigvecs"][0].shape[1] if calib else 0
    configs = {}
    for m in a.methods:  # validate every method's config before any long run
        cfg = method_config(m, max(contexts), overrides, calib)
        configs[m.name] = None if cfg is None else asdict(cfg.resolve(model.args, r_max))
    names = [m.name for m in a.methods]
    costs = {m.name: decode_cost(model.args, method_config(m, max(contexts), overrides, calib), max(contexts), r_max)
             for m in a.methods if m.base not in ("oracle", "oracle-head", "streaming")}
    results = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "command": sys.argv,
               "machine": machine(), "device": a.device, "dtype": str(a.dtype).removeprefix("torch."),
               "checkpoint": str(a.checkpoint), "methods": names, "overrides": overrides,
               "method_overrides": {m.name: {"base": m.base, **m.overrides} for m in a.methods},
               "configs_at_max_context": configs, "batch": a.batch, "seconds": {},
               "costs": {"context": max(contexts), "methods": costs}}
    print(f"{a.checkpoint.name}: {', '.join(names)}; overrides {overrides or 'none'}", file=sys.stderr)
    texts = {path: held_out_tokens(tokenizer, path) for path in a.ppl_text} if "ppl" in a.evals else {}
    for tokens in texts.values():  # every window count checked before the first evaluation runs
        for c in a.ppl_contexts:
            check_windows(len(tokens), c, a.ppl_windows[c], a.ppl_tokens)
    t_run = time.perf_counter()
    if "ppl" in a.evals:
        results["ppl"] = {}
        for path, tokens in texts.items():
            t0 = time.perf_counter()
            name = "pride_and_prejudice (held out)" if path is None else Path(path).name
            per_ctx = {}
            for c in a.ppl_contexts:
                per_ctx[c] = perplexity(model, calib, tokens, a.methods, c, a.ppl_windows[c], a.ppl_tokens,
                                        overrides, a.prefill, a.batch)
                print(f"ppl {name} {c}: " + ", ".join(f"{m} {r['ppl']:.3f}" for m, r in per_ctx[c].items())
                      + f" ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
            results["ppl"][name] = {"contexts": per_ctx, "windows": a.ppl_windows, "tokens": a.ppl_tokens,
                                    "prefill": a.prefill}
            results["seconds"][f"ppl {name}"] = time.perf_counter() - t0
    hay = haystack_tokens(tokenizer)
    if "passkey" in a.evals:
        t0 = time.perf_counter()
        results["passkey"] = passkey(model, calib, tokenizer, hay, a.methods, a.passkey_contexts, a.passkey_depths,
                                     a.passkey_trials, overrides, a.seed, a.passkey_question_tokens,
                                     prefill_mode=a.prefill, batch=a.batch)
        results["seconds"]["passkey"] = time.perf_counter() - t0
        print("passkey: " + ", ".join(f"{m} {r['overall']:.3f}" for m, r in results["passkey"]["accuracy"].items())
              + f" ({results['seconds']['passkey']:.0f} s)", file=sys.stderr)
    if "ruler" in a.evals:
        t0 = time.perf_counter()
        results["ruler"] = ruler(model, calib, tokenizer, hay, a.methods, a.ruler_contexts, a.ruler_tasks,
                                 a.ruler_samples, overrides, a.seed, a.prefill, a.batch)
        results["seconds"]["ruler"] = time.perf_counter() - t0
        print(f"ruler ({results['seconds']['ruler']:.0f} s)", file=sys.stderr)
    if "error" in a.evals:
        t0 = time.perf_counter()
        err = attention_error(model, calib, held_out_tokens(tokenizer), a.methods, a.error_context,
                              a.error_tokens, overrides)
        results["error"] = {"context": a.error_context, "tokens": a.error_tokens, "methods": err}
        results["seconds"]["error"] = time.perf_counter() - t0
    results["seconds"]["total"] = time.perf_counter() - t_run
    return results


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.tables:
        parts = [json.loads(Path(path).read_text()) for path in a.tables]
        for path, r in [(" + ".join(map(str, a.tables)), merge_results(parts))] if a.merge else zip(a.tables, parts):
            print(f"## {path}\n\n{tables(r)}\n")
        return 0
    torch.manual_seed(a.seed)
    torch.set_num_threads(a.threads)
    try:
        a.out.mkdir(parents=True, exist_ok=True)
        results = run(a)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    (a.out / f"{a.tag}.json").write_text(json.dumps(results, indent=1, ensure_ascii=False))
    results = json.loads(json.dumps(results))  # as saved: string keys
    try:
        plot_results(results, a.out, a.tag)
    except ImportError:
        print("matplotlib is not installed: no heatmaps (pip install matplotlib)", file=sys.stderr)
    print(tables(results))
    print(f"wrote {a.out / (a.tag + '.json')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
