"""Accuracy of the SALS cache against dense attention on a real model: perplexity, pass-key retrieval, and
the per-layer error of the attention output. Results: EVAL.md and eval_results/.

    python evals.py                                    # all three evaluations, all five methods, CPU
    python evals.py --evals ppl --methods dense sals-25 --ppl_contexts 2048 --ppl_windows 1
    python evals.py --methods dense sals-25 --score_dims 48 --tag sd48
    python evals.py --methods dense sals-25 sals-12.5 --ranking expected-rope --tag expected
    python evals.py --methods dense sals-25 --selection kv-head --tag kvhead

Methods (the non-dense ones share sparsity, sinks and dense layers, so they attend the same budget):
  dense       model.KVCache in every layer
  sals-25     SALSConfig.preset(0.25): latent rank D/4, 4-bit values
  sals-12.5   SALSConfig.preset(0.125): latent rank D/8, 2-bit values
  oracle      exact top-k by the true post-RoPE logits, full-rank keys, 16-bit values (SALS's ceiling)
  oracle-head the same, but each KV head its own top-k (the ceiling of per-head selection, which SALS is not)
  streaming   StreamingLLM: the sinks plus a recent window filling the whole budget, nothing selected

Every method runs in the same model pass: each layer's cache is a MethodCaches holding one cache per
method and a dense reference. The prompt is prefilled ONCE and densely: its hidden states come from the
dense reference, and every method's cache is written from the same q, k, v. Only decode steps see the
compressed caches, batch row i continuing through method i. (The engine's own chunked prefill,
generate.prefill, lets chunks after the first PREFILL_CHUNK tokens read older tokens through the
compressed cache; --prefill engine measures that instead, at one prefill per method.)
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
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from generate import prefill
from model import DTYPES, KVCache, Transformer, apply_rope, default_dtype
from sals_attention import RANKINGS, SELECTIONS, SALSConfig, setup_sals, top_within_budget

ROOT = Path(__file__).resolve().parent
HELD_OUT = ROOT / "data" / "heldout.txt"  # the part of Pride and Prejudice that calibration never sees (data/README.md)
HELD_OUT_START = "“Oh, yes! of that kind of love"
METHODS = ("dense", "sals-25", "sals-12.5", "oracle", "oracle-head", "streaming")
PRESETS = {"sals-25": 0.25, "sals-12.5": 0.125}
SHARED_FIELDS = ("sparsity", "sink", "window", "dense_layers")  # the overrides every non-dense method takes


# ---------------------------------------------------------------------------------------------
# Methods.

def method_config(name: str, context: int, overrides: dict | None = None) -> SALSConfig | None:
    """The SALSConfig of a method at a cache length of `context` tokens (None: dense). overrides: SALSConfig
    fields; the SALS presets take them all, oracle and streaming only SHARED_FIELDS (streaming's window is
    the budget minus the sinks, whatever --window says)."""
    o = dict(overrides or {})
    shared = {k: o[k] for k in SHARED_FIELDS if k in o}
    if name == "dense":
        return None
    if name in PRESETS:
        return SALSConfig.preset(PRESETS[name], **o)
    if name in ("oracle", "oracle-head"):  # oracle-head: HeadTopKCache reads only the shared fields
        return SALSConfig(rank_fraction=1.0, value_bits=16, selector="oracle", **shared)
    if name == "streaming":
        base = SALSConfig(rank_fraction=1.0, value_bits=16, **shared)
        budget = math.ceil(base.sparsity * context)  # what the SALS cache's top-k is sized for, at full length
        if budget - base.sink < 1:
            raise ValueError(f"streaming at context {context}: the budget of {budget} tokens (sparsity "
                             f"{base.sparsity:g}) leaves no room for a window after {base.sink} sinks; "
                             f"use a longer context or a higher --sparsity.")
        return replace(base, window=budget - base.sink)
    raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}.")


class MethodCaches(nn.Module):
    """One layer's caches of several methods plus a dense reference, behind the model's cache interface.

    route False: every cache gets the same q, k, v (a batch of one sequence) and the reference's output goes
    on, so the residual stream stays dense; at decode steps (T == 1) each cache's relative error
    ||y - y_dense|| / ||y_dense|| over all heads is appended to errors[i].
    route True: batch row i goes through cache i only (each method continues its own sequence)."""

    def __init__(self, ref: nn.Module, caches: list[nn.Module]):
        super().__init__()
        self.ref, self.caches = ref, nn.ModuleList(caches)  # ref may be one of caches (the dense method's)
        self.route = False
        self.errors: list[list[float]] = [[] for _ in caches]

    def forward(self, q: Tensor, k: Tensor, v: Tensor, input_pos: Tensor, rope: Tensor,
                rows: Tensor | None = None) -> Tensor:
        if self.route:
            assert rows is None and q.shape[0] == len(self.caches), "route: one batch row per method"
            return torch.cat([c(q[i:i + 1], k[i:i + 1], v[i:i + 1], input_pos[i:i + 1], rope[i:i + 1])
                              for i, c in enumerate(self.caches)])
        y = self.ref(q, k, v, input_pos, rope, rows)  # (1, H, T, Dh)
        for c, err in zip(self.caches, self.errors):
            y_c = y if c is self.ref else c(q, k, v, input_pos, rope, rows)
            if q.shape[2] == 1:
                err.append(((y_c.float() - y.float()).norm() / y.float().norm()).item())
        return y


class HeadTopKCache(nn.Module):
    """Method "oracle-head" (evaluation only): a dense, full-precision cache whose decode steps attend the budget
    of SALS (the sinks, the recent window and floor(sparsity * (pos+1)) - sink - window more tokens), but with
    the top tokens chosen by each KV head for itself, by its exact post-RoPE logits summed over its G query
    heads. SALS (and "oracle") choose one set per layer; this measures what per-head selection could gain."""

    def __init__(self, cfg: SALSConfig, batch_size: int, max_seq_length: int, n_kv_head: int, head_dim: int,
                 dtype):
        super().__init__()
        self.cache, self.cfg = KVCache(batch_size, max_seq_length, n_kv_head, head_dim, dtype), cfg

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
        k_max = max(0, min(math.ceil(c.sparsity * S) - c.sink - c.window, S))
        idx, keep = top_within_budget(logits.masked_fill(~cand[:, None], -math.inf), input_pos, k_max, c.sparsity,
                                      c.sink, c.window)  # (b, Hkv, k_max)
        fixed = (j <= input_pos) & ((j < c.sink) | (j > input_pos - c.window))  # (b, S) sinks and window
        mask = fixed[:, None].expand(b, Hkv, S).scatter(-1, idx, keep)  # idx are candidates: never fixed
        out = F.scaled_dot_product_attention(q_rope, kc, vc, attn_mask=mask[:, :, None])  # (b, Hkv, G, Dh)
        return out.reshape(b, H, 1, Dh)


def setup_methods(model: Transformer, methods: list[str], context: int, calib: dict | None,
                  overrides: dict | None = None) -> dict[str, SALSConfig | None]:
    """Gives every layer a MethodCaches (batch 1 per method, `context` tokens). Returns the resolved configs."""
    per_method, resolved = [], {}
    for name in methods:
        cfg = method_config(name, context, overrides)
        if cfg is None:
            model.setup_caches(1, context)
        elif name == "oracle-head":
            cfg = cfg.resolve(model.args, model.args.n_kv_head * model.args.head_dim)
            model.setup_caches(1, context, lambda i, a, B, S, dtype: KVCache(B, S, a.n_kv_head, a.head_dim, dtype)
                               if i in cfg.dense_layers else HeadTopKCache(cfg, B, S, a.n_kv_head, a.head_dim, dtype))
        else:
            cfg = setup_sals(model, 1, context, cfg, calib)
        resolved[name] = cfg
        per_method.append([layer.attention.kv_cache for layer in model.layers])
    if "dense" in methods:  # the dense method is the reference; else a reference of its own
        refs = per_method[methods.index("dense")]
    else:
        model.setup_caches(1, context)
        refs = [layer.attention.kv_cache for layer in model.layers]
    for i, layer in enumerate(model.layers):
        layer.attention.kv_cache = MethodCaches(refs[i], [caches[i] for caches in per_method])
    return resolved


def set_route(model: Transformer, route: bool):
    for layer in model.layers:
        layer.attention.kv_cache.route = route


def prefill_methods(model: Transformer, prompt: list[int], n_methods: int, mode: str) -> Tensor:
    """Prefills every method's cache with prompt. mode "dense": once, with the dense reference's hidden
    states; "engine": row i through method i's cache, in chunks as generate.prefill does (a SALS chunk after
    the first reads older tokens through the compressed cache). Returns the last logits (n_methods, V)."""
    ids = torch.tensor(prompt, device=model.output.weight.device)[None]  # (1, T)
    if mode == "dense":
        set_route(model, False)
        return prefill(model, ids)[0].expand(n_methods, -1)
    set_route(model, True)
    return prefill(model, ids.expand(n_methods, -1))


def decode_step(model: Transformer, tokens: Tensor, pos: int) -> Tensor:
    """tokens (M,): one routed decode step, every row at position pos. Returns logits (M, V)."""
    set_route(model, True)
    input_pos = torch.full((len(tokens), 1), pos, device=tokens.device)
    return model(tokens[:, None], input_pos)[:, 0]


# ---------------------------------------------------------------------------------------------
# 1. Perplexity.

def held_out_tokens(tokenizer, path: Path | None = None) -> list[int]:
    """Token ids of the perplexity text: by default data/heldout.txt, which calibration never sees; else the
    whole file at path."""
    path = HELD_OUT if path is None else Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--ppl_text {path} does not exist.")
    return tokenizer.encode(path.read_text(encoding="utf-8"))


@torch.inference_mode()
def perplexity(model: Transformer, calib: dict | None, tokens: list[int], methods: list[str], context: int,
               n_windows: int, n_tokens: int, overrides: dict | None = None, prefill_mode: str = "dense") -> dict:
    """Perplexity of the last n_tokens of each of n_windows consecutive windows of `context` tokens: the first
    context - n_tokens - 1 tokens are prefilled, the next n_tokens fed one by one through decode steps
    (teacher forcing), so every scored token is predicted under the method's cache. Returns per method the
    pooled perplexity exp(mean NLL) and the per-window ones."""
    if not 1 <= n_tokens < context:
        raise ValueError(f"perplexity needs 1 <= tokens scored ({n_tokens}) < context ({context}).")
    if n_windows * context > len(tokens):
        raise ValueError(f"the text has {len(tokens)} tokens: too few for {n_windows} windows of {context}; "
                         f"lower --ppl_windows or the context.")
    device = model.output.weight.device
    nll = torch.zeros(n_windows, len(methods), dtype=torch.float64)
    for w in range(n_windows):
        window = tokens[w * context:(w + 1) * context]
        setup_methods(model, methods, context, calib, overrides)
        start = context - n_tokens - 1
        prefill_methods(model, window[:start], len(methods), prefill_mode)
        ids = torch.tensor(window, device=device)
        for t in range(start, context - 1):
            logits = decode_step(model, ids[t].expand(len(methods)), t)  # (M, V)
            nll[w] -= F.log_softmax(logits.double(), -1)[:, ids[t + 1]].cpu()
    nll /= n_tokens
    return {m: {"ppl": math.exp(nll[:, i].mean().item()), "window_ppl": nll[:, i].exp().tolist()}
            for i, m in enumerate(methods)}


# ---------------------------------------------------------------------------------------------
# 2. Pass-key retrieval.

INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. Find it and "
         "memorize it. I will quiz you about the important information there.\n\n")
NEEDLE = "\n\nThe pass key is {key}. Remember it. {key} is the pass key.\n\n"
QUESTION = "\n\nWhat is the pass key? The pass key is"
SNAP = 64  # the needle moves back up to this many tokens to start after a sentence


def haystack_tokens(tokenizer, path: Path = HELD_OUT) -> list[int]:
    """The pass-key haystack: real text the calibration never saw (data/heldout.txt by default)."""
    return held_out_tokens(tokenizer, path)


def passkey_prompt(tokenizer, haystack: list[int], length: int, depth: float, key: str,
                   offset: int) -> tuple[list[int], int]:
    """A prompt of exactly `length` tokens: INTRO, haystack[offset:...] with the NEEDLE inserted at `depth`
    (0 first, 1 last) of the haystack part, moved back to a sentence end if one is near, then QUESTION.
    Returns (ids, index of the needle's first token)."""
    intro, needle, question = (tokenizer.encode(s) for s in (INTRO, NEEDLE.format(key=key), QUESTION))
    n = length - len(intro) - len(needle) - len(question)
    if n < 1 or offset + n > len(haystack):
        raise ValueError(f"a pass-key prompt of {length} tokens needs {n} haystack tokens from offset {offset}; "
                         f"the haystack has {len(haystack)}.")
    if not 0 <= depth <= 1:
        raise ValueError(f"depth {depth} is not in [0, 1].")
    hay = haystack[offset:offset + n]
    d = round(depth * n)
    for j in range(d, max(d - SNAP, 0) - 1, -1):
        if j == 0 or tokenizer.decode([hay[j - 1]]).rstrip().endswith("."):
            d = j
            break
    return intro + hay[:d] + needle + hay[d:] + question, len(intro) + d


def passkey_found(text: str, key: str) -> bool:
    """The key as a whole number in the generated text (so 123456 does not count for 12345)."""
    return re.search(rf"(?<!\d){key}(?!\d)", text) is not None


@torch.inference_mode()
def passkey(model: Transformer, calib: dict | None, tokenizer, haystack: list[int], methods: list[str],
            contexts: list[int], depths: list[float], trials: int, overrides: dict | None = None, seed: int = 0,
            question_tokens: int = 32, new_tokens: int = 10, prefill_mode: str = "dense") -> dict:
    """Pass-key retrieval. context = cache length: a prompt of context - new_tokens tokens, of which all but the
    last max(question_tokens, len(QUESTION)) are prefilled; those last ones (the question) go through decode
    steps, so the retrieval itself attends through the method's cache. Then new_tokens greedy tokens; success
    when the key's digits appear. Each trial draws its own key (5 or 6 digits) and haystack offset.
    Returns the per-trial records and the accuracy per method, per (context, depth) and overall."""
    device = model.output.weight.device
    n_q = max(question_tokens, len(tokenizer.encode(QUESTION)))
    records = []
    for context in contexts:
        for depth in depths:
            for trial in range(trials):
                rng = random.Random(f"{seed}/{context}/{depth}/{trial}")
                key = str(rng.randrange(10 ** 4, 10 ** 5) if rng.random() < 0.5 else rng.randrange(10 ** 5, 10 ** 6))
                length = context - new_tokens
                offset = rng.randrange(0, len(haystack) - length)
                prompt, at = passkey_prompt(tokenizer, haystack, length, depth, key, offset)
                setup_methods(model, methods, context, calib, overrides)
                prefill_methods(model, prompt[:-n_q], len(methods), prefill_mode)
                ids = torch.tensor(prompt, device=device)
                for t in range(length - n_q, length):
                    logits = decode_step(model, ids[t].expand(len(methods)), t)
                out = [logits.argmax(-1)]
                for t in range(length, context - 1):
                    out.append(decode_step(model, out[-1], t).argmax(-1))
                texts = [tokenizer.decode(row) for row in torch.stack(out, 1).tolist()]
                records.append({"context": context, "depth": depth, "trial": trial, "key": key,
                                "needle_at": at / length, "answers": dict(zip(methods, texts)),
                                "found": {m: passkey_found(s, key) for m, s in zip(methods, texts)}})
    accuracy = {}
    for m in methods:
        cells = {f"{c}/{d}": sum(r["found"][m] for r in records if (r["context"], r["depth"]) == (c, d)) / trials
                 for c in contexts for d in depths}
        accuracy[m] = {"overall": sum(r["found"][m] for r in records) / len(records), "cells": cells}
    return {"contexts": contexts, "depths": depths, "trials": trials, "accuracy": accuracy, "records": records}


def plot_passkey(result: dict, method: str, path: Path):
    """Heatmap PNG of one method's accuracy, context (rows) x depth (columns). Needs matplotlib."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    contexts, depths, cells = result["contexts"], result["depths"], result["accuracy"][method]["cells"]
    acc = [[cells[f"{c}/{d}"] for d in depths] for c in contexts]
    fig, ax = plt.subplots(figsize=(4.2, 0.5 + 0.45 * len(contexts)), dpi=100)
    ax.imshow(acc, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    for i, row in enumerate(acc):
        for j, a in enumerate(row):
            ax.text(j, i, f"{a:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_yticks(range(len(contexts)), [str(c) for c in contexts])
    ax.set_xlabel("needle depth")
    ax.set_ylabel("context")
    ax.set_title(f"{method}: pass key, {result['accuracy'][method]['overall']:.0%} "
                 f"({result['trials']}/cell)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# 3. Per-layer error of the attention output.

@torch.inference_mode()
def attention_error(model: Transformer, calib: dict | None, tokens: list[int], methods: list[str],
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
    prefill_methods(model, tokens[:start], len(methods), "dense")
    set_route(model, False)
    for t in range(start, context):
        model(torch.tensor([[tokens[t]]], device=device), torch.tensor([[t]], device=device))
    errors = torch.tensor([layer.attention.kv_cache.errors for layer in model.layers])  # (L, M, n_tokens)
    return {m: {"mean": errors[:, i].mean(-1).tolist(), "max": errors[:, i].amax(-1).tolist()}
            for i, m in enumerate(methods)}


# ---------------------------------------------------------------------------------------------
# Reporting.

def tables(results: dict) -> str:
    """Markdown tables of a results dict (methods as rows)."""
    out = []
    methods = results["methods"]
    for name, ppl in results.get("ppl", {}).items():
        ctxs = list(ppl["contexts"])
        out += [f"Perplexity, {name} (last {ppl['tokens']} tokens of each window through decode steps; prefill "
                f"{ppl['prefill']}); in brackets: change vs dense", "",
                "| method | " + " | ".join(f"{c} ({ppl['windows'][c]} win.)" for c in ctxs) + " |",
                "|---" * (len(ctxs) + 1) + "|"]
        for m in methods:
            cells = []
            for c in ctxs:
                p, d = ppl["contexts"][c][m]["ppl"], ppl["contexts"][c].get("dense", {}).get("ppl")
                cells.append(f"{p:.3f}" + (f" ({(p / d - 1) * 100:+.2f}%)" if d and m != "dense" else ""))
            out.append(f"| {m} | " + " | ".join(cells) + " |")
        out.append("")
    if "passkey" in results:
        pk = results["passkey"]
        cols = [f"{c}" for c in pk["contexts"]]
        out += [f"Pass-key accuracy ({pk['trials']} trials per context x depth cell, depths "
                f"{', '.join(f'{d:.0%}' for d in pk['depths'])}): per context, then overall", "",
                "| method | " + " | ".join(cols) + " | overall |", "|---" * (len(cols) + 2) + "|"]
        for m in methods:
            cells = pk["accuracy"][m]["cells"]
            per_ctx = [sum(cells[f"{c}/{d}"] for d in pk["depths"]) / len(pk["depths"]) for c in pk["contexts"]]
            out.append(f"| {m} | " + " | ".join(f"{a:.2f}" for a in per_ctx)
                       + f" | {pk['accuracy'][m]['overall']:.3f} |")
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


# ---------------------------------------------------------------------------------------------
# Command line.

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, help="converted checkpoint folder (default: SmolLM2-135M-Instruct)")
    p.add_argument("--calib", type=Path, help="SALS calibration file (default: <checkpoint>/sals_calib.pt)")
    p.add_argument("--evals", nargs="+", choices=["ppl", "passkey", "error"], default=["ppl", "passkey", "error"])
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=DTYPES, help="default: float32 on CPU, bfloat16 on GPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prefill", choices=["dense", "engine"], default="dense",
                   help="dense: one shared dense prefill; engine: each method's own chunked prefill")
    p.add_argument("--out", type=Path, default=ROOT / "eval_results", help="folder for the JSON and PNGs")
    p.add_argument("--tag", default="main", help="names the outputs: <out>/<tag>.json, <out>/passkey_<tag>_*.png")
    e = p.add_argument_group("evaluations")
    e.add_argument("--ppl_text", type=Path, nargs="+", default=[None],
                   help="texts for perplexity (default: data/heldout.txt, never calibrated on)")
    e.add_argument("--ppl_contexts", type=int, nargs="+", default=[2048, 4096, 8192])
    e.add_argument("--ppl_windows", type=int, nargs="+", default=[2],
                   help="windows per context: one number, or one per --ppl_contexts")
    e.add_argument("--ppl_tokens", type=int, default=256, help="scored tokens per window, fed by decode steps")
    e.add_argument("--passkey_contexts", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    e.add_argument("--passkey_depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    e.add_argument("--passkey_trials", type=int, default=3)
    e.add_argument("--passkey_question_tokens", type=int, default=32,
                   help="last prompt tokens fed through decode steps (at least the question)")
    e.add_argument("--error_context", type=int, default=4096)
    e.add_argument("--error_tokens", type=int, default=128)
    s = p.add_argument_group("SALS overrides (sals-25/sals-12.5 take all; oracle and streaming the shared ones)")
    s.add_argument("--dense_layers", type=str, help="comma-separated layer ids (shared)")
    s.add_argument("--sparsity", type=float, help="attended share of the context (shared)")
    s.add_argument("--sink", type=int, help="sink tokens (shared)")
    s.add_argument("--window", type=int, help="recent window (shared except streaming, whose window fills the budget)")
    s.add_argument("--rank", type=int)
    s.add_argument("--rank_fraction", type=float)
    s.add_argument("--score_dims", type=int)
    s.add_argument("--value_bits", type=int)
    s.add_argument("--ranking", choices=RANKINGS, help="how the latent query ranks tokens (default: the preset's)")
    s.add_argument("--selection", choices=SELECTIONS,
                   help="one top-k per layer (the paper) or one per KV head (default: the preset's)")
    a = p.parse_args(argv)
    if len(a.ppl_windows) not in (1, len(a.ppl_contexts)):
        p.error(f"--ppl_windows takes one number or one per context ({len(a.ppl_contexts)}).")
    a.ppl_windows = dict(zip(a.ppl_contexts, a.ppl_windows * len(a.ppl_contexts) if len(a.ppl_windows) == 1
                             else a.ppl_windows))
    if min(*a.ppl_windows.values(), a.ppl_tokens, a.passkey_trials, a.error_tokens, a.passkey_question_tokens) < 1:
        p.error("--ppl_windows, --ppl_tokens, --passkey_trials, --passkey_question_tokens and --error_tokens "
                "must be positive.")
    if a.dense_layers is not None:
        try:
            a.dense_layers = tuple(int(x) for x in a.dense_layers.split(",") if x.strip())
        except ValueError:
            p.error(f"--dense_layers {a.dense_layers!r} is not a comma-separated list of layer ids.")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda asked for, but no CUDA GPU is available; use --device cpu.")
    a.dtype = DTYPES[a.dtype] if a.dtype else default_dtype(a.device)
    a.methods = list(dict.fromkeys(a.methods))
    return a


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version()}


def run(a) -> dict:
    from calibrate import load_calibration
    from model import load_model
    from tokenizer import load_tokenizer
    if a.checkpoint is None:
        from convert_hf_checkpoint import ensure_default_checkpoint
        a.checkpoint = ensure_default_checkpoint()
    model = load_model(a.checkpoint, a.device, a.dtype)
    tokenizer = load_tokenizer(a.checkpoint)
    needs_calib = any(m != "dense" for m in a.methods)
    calib = load_calibration(a.calib or Path(a.checkpoint) / "sals_calib.pt", model) if needs_calib else None
    names = ("dense_layers", "sparsity", "sink", "window", "rank", "rank_fraction", "score_dims", "value_bits",
             "ranking", "selection")
    overrides = {n: getattr(a, n) for n in names if getattr(a, n) is not None}
    limit = model.args.max_position_embeddings
    contexts = ((a.ppl_contexts if "ppl" in a.evals else []) + (a.passkey_contexts if "passkey" in a.evals else [])
                + ([a.error_context] if "error" in a.evals else []))
    if max(contexts) > limit:
        raise ValueError(f"contexts {sorted(set(contexts))} must stay within the model's {limit} tokens.")
    r_max = calib["eigvecs"][0].shape[1] if calib else 0
    configs = {}
    for m in a.methods:  # validate every method's config before any long run
        cfg = method_config(m, max(contexts), overrides)
        configs[m] = None if cfg is None else asdict(cfg.resolve(model.args, r_max))

    results = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "command": sys.argv,
               "machine": machine(), "device": a.device, "dtype": str(a.dtype).removeprefix("torch."),
               "checkpoint": str(a.checkpoint), "methods": a.methods, "overrides": overrides,
               "configs_at_max_context": configs, "seconds": {}}
    print(f"{a.checkpoint.name}: {', '.join(a.methods)}; overrides {overrides or 'none'}", file=sys.stderr)
    if "ppl" in a.evals:
        results["ppl"] = {}
        for path in a.ppl_text:
            t0 = time.perf_counter()
            tokens = held_out_tokens(tokenizer, path)
            name = "pride_and_prejudice (held out)" if path is None else Path(path).name
            per_ctx = {}
            for c in a.ppl_contexts:
                per_ctx[c] = perplexity(model, calib, tokens, a.methods, c, a.ppl_windows[c], a.ppl_tokens,
                                        overrides, a.prefill)
                print(f"ppl {name} {c}: " + ", ".join(f"{m} {r['ppl']:.3f}" for m, r in per_ctx[c].items())
                      + f" ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
            results["ppl"][name] = {"contexts": per_ctx, "windows": a.ppl_windows, "tokens": a.ppl_tokens,
                                    "prefill": a.prefill}
            results["seconds"][f"ppl {name}"] = time.perf_counter() - t0
    if "passkey" in a.evals:
        t0 = time.perf_counter()
        results["passkey"] = passkey(model, calib, tokenizer, haystack_tokens(tokenizer), a.methods,
                                     a.passkey_contexts, a.passkey_depths, a.passkey_trials, overrides, a.seed,
                                     a.passkey_question_tokens, prefill_mode=a.prefill)
        results["seconds"]["passkey"] = time.perf_counter() - t0
        print("passkey: " + ", ".join(f"{m} {r['overall']:.3f}" for m, r in results["passkey"]["accuracy"].items())
              + f" ({results['seconds']['passkey']:.0f} s)", file=sys.stderr)
    if "error" in a.evals:
        t0 = time.perf_counter()
        err = attention_error(model, calib, held_out_tokens(tokenizer), a.methods, a.error_context,
                              a.error_tokens, overrides)
        results["error"] = {"context": a.error_context, "tokens": a.error_tokens, "methods": err}
        results["seconds"]["error"] = time.perf_counter() - t0
    return results


def main(argv=None) -> int:
    a = parse_args(argv)
    torch.manual_seed(a.seed)
    try:
        a.out.mkdir(parents=True, exist_ok=True)
        results = run(a)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    (a.out / f"{a.tag}.json").write_text(json.dumps(results, indent=1, ensure_ascii=False))
    if "passkey" in results:
        try:
            for m in a.methods:
                plot_passkey(results["passkey"], m, a.out / f"passkey_{a.tag}_{m}.png")
        except ImportError:
            print("matplotlib is not installed: no heatmaps (pip install matplotlib)", file=sys.stderr)
    print(tables(results))
    print(f"wrote {a.out / (a.tag + '.json')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
