"""SALS calibration, offline and once per model: the low-rank basis of each layer's pre-RoPE keys.

    python calibrate.py                        # the default SmolLM2 on data/calibration.txt
    python calibrate.py --checkpoint DIR --text corpus/ more.jsonl --n_seqs 64 --seq_len 4096

Runs the model over calibration text and accumulates, per layer, the uncentred second moment
C = sum_t k_t k_t^T (float64) of the pre-RoPE keys of all KV heads concatenated, k_t of width
D = n_kv_head * head_dim, without ever storing the keys; saves its eigenvectors sorted by eigenvalue
(descending) to <checkpoint>/sals_calib.pt (format: calibration_file below; read by load_calibration).
It also reports per layer how much key energy the 25% and 12.5% ranks keep and how well latent
top-k ranks tokens (overlap_score), measured on held-out sequences that do not enter C.

With --tp N (tensor parallelism, tp.py) each rank compresses only its own KV heads' keys: the basis is then
block-diagonal, one block per rank, the eigenvectors of C's diagonal block of that rank's heads
(<checkpoint>/sals_calib_tpN.pt), and the overlap is measured with each rank selecting its own tokens.

Default corpus: data/calibration.txt, the first part of Pride and Prejudice (public domain); the rest of the
novel, data/heldout.txt, is never calibrated on (data/README.md).
"""
import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
from torch import Tensor

from kernels.ranking import bucket_rotations
from model import DTYPES, KVCache, Transformer, apply_rope, default_dtype, load_model, rope_frequencies
from sals_attention import SALSConfig, distance_bucket, n_buckets
from tp import check_tp_size, local_args

ROOT = Path(__file__).resolve().parent
DEFAULT_TEXT = ROOT / "data" / "calibration.txt"
FORMAT = "sals-calib/1"
# Overlap is measured at the SALS defaults (SALSConfig in sals_attention.py): budget = 1/8 of the
# context, 16 sinks and a 64-token window included; ranking with r* = r/2 of the 25% rank.
DEFAULTS = SALSConfig()  # the sparsity, sinks and window the overlap is measured at
SPARSITY, SINK, WINDOW = DEFAULTS.sparsity, DEFAULTS.sink, DEFAULTS.window
# the rankings the overlap report compares: the product's, and expected-rope (one bucket over all the distances)
OVERLAP_RANKINGS = ("pre-rope", "expected-rope", "bucket-rope")
POOR_OVERLAP = 0.9  # the paper's bar: layers that rank worse are candidates for staying dense
MIN_EVAL_LEN = 1024  # shorter contexts leave (almost) no budget beyond sinks and window


# ---------------------------------------------------------------------------------------------
# Text.

def read_texts(paths) -> list[str]:
    """Documents from text files, folders (every *.txt inside, sorted) and JSON lines files
    (*.jsonl, one object with a "text" field per line)."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.glob("*.txt"))
            if not found:
                raise FileNotFoundError(f"folder {p} holds no *.txt files; pass text files, a folder of "
                                        f"*.txt files or *.jsonl files to --text.")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"--text {p} does not exist.")
    docs = []
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{f} is not UTF-8 text ({e}); pass plain text or JSON lines files.") from None
        if f.suffix != ".jsonl":
            docs.append(text)
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{f}:{n} is not valid JSON ({e}).") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f"{f}:{n} has no string field \"text\"; each JSON line needs one.")
            docs.append(record["text"])
    return docs


def plan_sequences(n_tokens: int, n_seqs: int, seq_len: int, n_eval: int, max_len: int):
    """How many calibration sequences of seq_len and held-out overlap sequences of eval_len the text
    allows. A short text keeps one held-out sequence if it can, then fills calibration sequences, then
    further held-out ones. Returns (n_seqs, seq_len, n_eval, eval_len, notes)."""
    if seq_len > max_len:
        raise ValueError(f"--seq_len {seq_len} exceeds the model's context ({max_len} tokens).")
    if n_tokens == 0:
        raise ValueError("the calibration text is empty.")
    notes = []
    if n_tokens < seq_len:
        notes.append(f"the text has only {n_tokens} tokens: calibrating on one sequence of {n_tokens} "
                     f"(asked for {n_seqs} x {seq_len})")
        seq_len = n_tokens
    eval_len = min(max(seq_len, MIN_EVAL_LEN), max_len)
    reserve = eval_len if n_eval > 0 and n_tokens - eval_len >= seq_len else 0
    fit_seqs = min(n_seqs, (n_tokens - reserve) // seq_len)
    fit_eval = min(n_eval, (n_tokens - fit_seqs * seq_len) // eval_len)
    if fit_eval < n_eval:
        notes.append(f"text too short for {n_eval} held-out sequences of {eval_len} tokens: measuring "
                     f"the overlap on {fit_eval}" + (" (none: overlap not measured)" if fit_eval == 0 else ""))
    if fit_seqs < n_seqs and n_tokens >= seq_len:
        notes.append(f"the text ({n_tokens} tokens) fits {fit_seqs} of the {n_seqs} calibration sequences "
                     f"of {seq_len} tokens asked for")
    return fit_seqs, seq_len, fit_eval, eval_len, notes


def cut_sequences(tokens: Tensor, start: int, n: int, length: int, bos: list[int]) -> Tensor:
    """(n, length) consecutive, non-overlapping sequences of tokens[start:], each led by `bos`."""
    body = tokens[start:start + n * (length - len(bos))].view(n, length - len(bos))
    return torch.cat([torch.tensor(bos, dtype=torch.long).expand(n, len(bos)), body], dim=1)


# ---------------------------------------------------------------------------------------------
# Statistics of the keys, gathered inside the model's attention via a cache wrapper.

class KeyStats(nn.Module):
    """A dense KVCache that also looks at the pre-RoPE q and k passing through it: it accumulates
    the keys' second moment while `basis` is None, and scores latent top-k (overlap_score, every ranking
    of OVERLAP_RANKINGS) with `basis` (D, r*) once set. Each call must hold whole sequences starting at position 0."""

    def __init__(self, cache: KVCache, width: int, inv_freq: Tensor):
        super().__init__()
        self.cache, self.inv_freq = cache, inv_freq
        self.register_buffer("second_moment", torch.zeros(width, width, dtype=torch.float64), persistent=False)
        self.n_tokens = 0
        self.basis: Tensor | None = None
        self.overlaps: dict[str, list[float]] = {r: [] for r in OVERLAP_RANKINGS}

    def forward(self, q, k, v, input_pos, rope, rows=None):
        if self.basis is None:
            keys = k.transpose(1, 2).flatten(2).flatten(0, 1).double()  # (B*T, D): heads concatenated
            self.second_moment.addmm_(keys.T, keys)
            self.n_tokens += keys.shape[0]
        else:
            for r, scores in self.overlaps.items():
                scores += [overlap_score(q[b], k[b], rope[b], self.basis, ranking=r, inv_freq=self.inv_freq)
                           for b in range(q.shape[0])]
        return self.cache(q, k, v, input_pos, rope, rows)


def overlap_score(q: Tensor, k: Tensor, rope: Tensor, basis: Tensor, sparsity: float = SPARSITY,
                  sink: int = SINK, window: int = WINDOW, query_chunk: int = 256, ranking: str = "pre-rope",
                  inv_freq: Tensor | None = None) -> float:
    """How much true attention latent top-k keeps, relative to the best possible choice.

    q: (H, T, Dh) and k: (Hkv, T, Dh) pre-RoPE, one whole sequence; rope: (T, Dh/2, 2); basis: (D, r*), or
    (N, D/N, r*) for N tensor-parallel ranks, each holding Hkv/N KV heads and ranking them with its own block.
    For each query position t in the last quarter of the sequence (context t+1 tokens):
      - true attention a_j: post-RoPE causal softmax(q.k / sqrt(Dh)) over j <= t, averaged over the
        H query heads (the SALS selection is shared by all heads of a layer);
      - budget n = floor(sparsity * (t+1)) - sink - window middle tokens, chosen among the
        candidates sink <= j <= t - window (the first `sink` and last `window` tokens are always kept);
      - latent choice: top n by s_j = q_lat . k_lat_j with q_lat = (each KV group's query heads
        summed, concatenated to width D) @ basis and k_lat_j = (k_j, heads concatenated) @ basis,
        both pre-RoPE, exactly as the SALS decode step ranks (ranking "pre-rope"; with "expected-rope",
        q_lat's head sums are first rotated by kernels.ranking.bucket_rotations' one bucket at t, from inv_freq;
        with "bucket-rope" by each distance bucket's rotation, key j scored by its bucket's q_lat);
      - oracle choice: top n candidates by a_j;
      - ratio = a(sinks + window + latent choice) / a(sinks + window + oracle choice), <= 1 (N = 1).
    With N ranks, each rank's latent choice is its own (its heads' query and keys on its block) and its heads
    attend to it: the latent mass is averaged over all heads, each head on its rank's choice. The oracle stays the
    layer's one shared choice, so that the ratios compare with N = 1; per-rank choices may exceed it (ratio > 1).
    Returns the mean ratio over positions with n > 0 (nan if none). 1.0 means latent ranking loses
    nothing against the oracle at this budget; the paper reports > 0.9 for most layers."""
    H, T, Dh = q.shape
    Hkv = k.shape[0]
    basis = (basis if basis.dim() == 3 else basis[None]).float()  # (N, D/N, r*)
    N = basis.shape[0]
    q, k = q.float(), k.float()
    q_rope = apply_rope(q[None], rope[None])[0].reshape(Hkv, H // Hkv, T, Dh)  # (Hkv, G, T, Dh)
    k_rope = apply_rope(k[None], rope[None])[0]  # (Hkv, T, Dh)
    q_sum = q.reshape(Hkv, H // Hkv, T, Dh).sum(1)  # (Hkv, T, Dh)
    if ranking not in OVERLAP_RANKINGS:
        raise ValueError(f"overlap_score: unknown ranking {ranking!r} (one of {', '.join(OVERLAP_RANKINGS)}).")
    n_b = 1 if ranking == "expected-rope" else n_buckets(ranking, window, T)
    q_sum = q_sum.transpose(0, 1)[:, None]  # (T, 1, Hkv, Dh)
    if n_b:
        if inv_freq is None:
            raise ValueError(f"overlap_score with ranking {ranking!r} needs inv_freq (model.rope_frequencies).")
        pos, inv_freq = torch.arange(T, device=q.device)[:, None], inv_freq.to(q.device)
        rot = bucket_rotations(inv_freq, pos, sink, window, n_b)  # (T, n_b, Dh/2, 2)
        q_sum = apply_rope(q_sum, rot[:, :, None])  # (T, n_b, Hkv, Dh)
    # one latent query per distance bucket and rank, each rank's from its own KV heads
    q_lat = torch.einsum("tbnd,ndr->tbnr", q_sum.unflatten(-2, (N, -1)).flatten(-2), basis)  # (T, max(n_b, 1), N, r*)
    k_lat = torch.einsum("tnd,ndr->tnr", k.transpose(0, 1).reshape(T, N, -1), basis)  # (T, N, r*)
    j = torch.arange(T, device=q.device)
    ratios = []
    for t in torch.arange(T - T // 4, T, device=q.device).split(query_chunk):  # (n,) query positions
        logits = torch.einsum("kgnd,ksd->kgns", q_rope[:, :, t], k_rope) / math.sqrt(Dh)  # (Hkv, G, n, T)
        logits = logits.masked_fill(j > t[:, None], float("-inf"))
        attn_rank = logits.softmax(-1).unflatten(0, (N, -1)).mean((1, 2)).transpose(0, 1)  # (n, N, T) per rank
        attn = attn_rank.mean(1)  # (n, T)
        budget = (sparsity * (t + 1)).floor().long() - sink - window  # (n,)
        middle = (j >= sink) & (j <= t[:, None] - window)  # (n, T)
        always = attn.masked_fill(middle, 0).sum(-1)  # sinks + window (+ the future, which is 0)
        k_max = max(int(budget.max()), 0)
        ranks_ok = torch.arange(k_max, device=q.device) < budget[:, None]  # (n, k_max)

        def kept(score: Tensor, mass: Tensor) -> Tensor:  # mass (n, N', T) on the top-`budget` middle tokens by score
            idx = score.masked_fill(~middle[:, None], float("-inf")).topk(k_max, dim=-1).indices  # (n, N', k_max)
            return (mass.gather(-1, idx) * ranks_ok[:, None]).sum(-1).mean(-1)
        bucket = distance_bucket(t[:, None] - j, window, max(n_b, 1))  # (n, T)
        latent = torch.einsum("mbnr,snr->mnbs", q_lat[t], k_lat)  # (n, N, max(n_b, 1), T)
        latent = latent.gather(2, bucket[:, None, None].expand(-1, N, 1, -1))[:, :, 0]  # each key by its bucket's query
        ratio = (always + kept(latent, attn_rank)) / (always + kept(attn[:, None], attn[:, None]))
        ratios.append(ratio[budget > 0])
    ratios = torch.cat(ratios)
    return ratios.mean().item() if ratios.numel() else float("nan")


# ---------------------------------------------------------------------------------------------
# Calibration.

def k_weight_norms(model: Transformer, tp: int = 1) -> list:
    """Frobenius norm (float64) of each layer's K projection rows of wqkv: a fingerprint that tells
    apart models of the same shape. tp > 1: per layer, one norm per rank's block of KV heads (the rows
    a sharded model of that rank holds, whose own k_weight_norms are these)."""
    a = model.args
    q_size, kv_size = a.n_head * a.head_dim, a.n_kv_head * a.head_dim
    norms = [layer.attention.wqkv.weight[q_size:q_size + kv_size].double().unflatten(0, (tp, -1)).flatten(1)
             .norm(dim=1).tolist() for layer in model.layers]
    return [n[0] for n in norms] if tp == 1 else norms


def energy(eigvals: Tensor, rank: int) -> Tensor:
    """Share of the second moment's trace kept by the top `rank` eigenvalues; eigvals (L, D) descending, or
    (L, N, D/N): the top `rank` of each of N blocks."""
    return eigvals[..., :rank].flatten(1).sum(-1) / eigvals.flatten(1).sum(-1)


def block_eigh(C: Tensor, tp: int) -> tuple[Tensor, Tensor]:
    """Eigenvalues (tp, D/tp) and eigenvectors (tp, D/tp, D/tp) of the tp diagonal blocks of C (D, D) (a tensor-
    parallel rank's KV heads each), sorted descending."""
    d = C.shape[0] // tp
    vals, vecs = torch.linalg.eigh(torch.stack([C[i * d:(i + 1) * d, i * d:(i + 1) * d] for i in range(tp)]))
    # C is positive semi-definite: negative eigenvalues are round-off (of order 1e-16 * trace)
    return vals.flip(-1).clamp(min=0), vecs.flip(-1)


def progress(label: str, i: int, n: int, t0: float, width: int = 30):
    """One line on stderr, redrawn: a bar, the count, the time spent and the time left at the rate so far."""
    spent = time.perf_counter() - t0
    bar = "#" * round(width * i / n) + "-" * (width - round(width * i / n))
    left = f", ~{spent / i * (n - i):.0f} s left" if 0 < i < n else ""
    print(f"\r{label} [{bar}] {i}/{n} sequences, {spent:.0f} s{left}  ", end="\n" if i == n else "",
          file=sys.stderr, flush=True)


@torch.inference_mode()
def calibrate(model: Transformer, calib_seqs: Tensor, eval_seqs: Tensor, verbose: bool = True, tp: int = 1) -> dict:
    """calib_seqs: (N, S) token ids whose keys make the second moments; eval_seqs: (M, S') held-out
    ids on which overlap_score is measured (M may be 0). Returns eigvals (L, D) float64 and eigvecs
    [(D, D)] float64, both sorted descending, n_tokens, tp and the per-layer report. tp > 1: one basis per
    tensor-parallel rank, eigvals (L, tp, D/tp) and eigvecs [(tp, D/tp, D/tp)] (block_eigh)."""
    a = model.args
    check_tp_size(a, tp)
    D = a.n_kv_head * a.head_dim
    device = model.output.weight.device
    S_max = max(calib_seqs.shape[1], eval_seqs.shape[1])
    model.setup_caches(1, S_max, lambda i, args, B, S, dtype: KeyStats(
        KVCache(B, S, args.n_kv_head, args.head_dim, dtype), D, rope_frequencies(args)))
    stats = [layer.attention.kv_cache for layer in model.layers]

    def run(seqs: Tensor, label: str):
        t0 = time.perf_counter()
        if verbose:
            progress(label, 0, len(seqs), t0)
        for i, seq in enumerate(seqs):
            model.hidden(seq[None].to(device), torch.arange(len(seq), device=device)[None])
            if verbose:
                progress(label, i + 1, len(seqs), t0)

    run(calib_seqs, "calibration")
    blocks = [block_eigh(s.second_moment.cpu(), tp) for s in stats]
    # one rank keeps the one-basis layout: eigvals (L, D), eigvecs [(D, D)]
    eigvals = torch.stack([vals if tp > 1 else vals[0] for vals, _ in blocks])
    eigvecs = [vecs if tp > 1 else vecs[0] for _, vecs in blocks]

    # ranks as SALS resolves them, on each rank's D/tp-wide keys
    at = lambda f: SALSConfig(rank_fraction=f, value_bits=16).resolve(local_args(a, tp), D // tp)  # noqa: E731
    r25, r125, score_dims = at(0.25).rank, at(0.125).rank, at(0.25).score_dims
    for s, vecs in zip(stats, eigvecs):
        s.basis = vecs[..., :score_dims].to(device)
    run(eval_seqs, "overlap (held-out)")
    overlap = {r: [sum(s.overlaps[r]) / len(s.overlaps[r]) if s.overlaps[r] else float("nan") for s in stats]
               for r in OVERLAP_RANKINGS}
    model.setup_caches(1, S_max)  # drop the wrappers: the model is left with plain dense caches
    report = {"energy_25": energy(eigvals, r25).tolist(), "energy_125": energy(eigvals, r125).tolist(),
              "overlap": overlap["pre-rope"], "overlap_expected_rope": overlap["expected-rope"],
              "overlap_bucket_rope": overlap["bucket-rope"],
              "rank_25": r25, "rank_125": r125, "score_dims": score_dims, "tp": tp,
              "sparsity": SPARSITY, "sink": SINK, "window": WINDOW,
              "eval_seqs": eval_seqs.shape[0], "eval_len": eval_seqs.shape[1],
              "poor_layers": [i for i, o in enumerate(overlap["pre-rope"]) if o < POOR_OVERLAP]}
    return {"eigvals": eigvals, "eigvecs": eigvecs, "n_tokens": stats[0].n_tokens, "tp": tp, "report": report}


def format_report(report: dict) -> str:
    r = report
    lines = [f"layer  energy@r={r['rank_25']} (25%)  energy@r={r['rank_125']} (12.5%)  "
             f"overlap (r*={r['score_dims']}, sparsity {r['sparsity']:.3g}): pre-rope  expected-rope  bucket-rope"]
    for i, (e25, e125, o, oe, ob) in enumerate(zip(r["energy_25"], r["energy_125"], r["overlap"],
                                                   r["overlap_expected_rope"], r["overlap_bucket_rope"])):
        flag = "  <- poor" if i in r["poor_layers"] else ""
        lines.append(f"{i:5d}  {e25:19.4f}  {e125:21.4f}  {o:42.4f}  {oe:13.4f}  {ob:11.4f}{flag}")
    if r["eval_seqs"] == 0:
        lines.append("overlap not measured: no held-out sequence fitted in the text.")
    elif r["poor_layers"]:
        lines.append(f"layers ranking below {POOR_OVERLAP} (candidates for dense layers): {r['poor_layers']}")
    else:
        lines.append(f"every layer ranks at or above {POOR_OVERLAP}.")
    lines.append(f"overlap: share of the true attention mass (post-RoPE, averaged over query heads) on "
                 f"{r['sink']} sinks + {r['window']} window + the latent top-k, relative to the oracle top-k "
                 f"by true attention, over the last quarter of {r['eval_seqs']} held-out sequences of "
                 f"{r['eval_len']} tokens.")
    if r.get("tp", 1) > 1:
        lines.append(f"tensor parallel over {r['tp']} ranks: ranks per rank (of its D/{r['tp']}-wide keys), energy "
                     f"kept of the whole keys by the {r['tp']} blocks together; overlap with each rank choosing its "
                     f"own tokens, relative to the layer's one oracle choice (can exceed 1).")
    return "\n".join(lines)


def model_fingerprint(model: Transformer, tp: int = 1) -> dict:
    """Shapes and K projection norms (k_weight_norms(model, tp)); a sharded model (tp.shard_model) gives the
    whole model's shapes and the norms of its own rank's rows."""
    a = model.args if model.tp is None else model.tp.args
    return {"n_layer": a.n_layer, "n_kv_head": a.n_kv_head, "head_dim": a.head_dim, "dim": a.dim,
            "vocab_size": a.vocab_size, "k_weight_norms": k_weight_norms(model, tp)}


def max_rank(D: int) -> int:
    """How many eigenvectors of D-wide keys a file keeps."""
    return D if D <= 1024 else D // 2


def default_path(checkpoint_dir, tp: int = 1) -> Path:
    return Path(checkpoint_dir) / ("sals_calib.pt" if tp == 1 else f"sals_calib_tp{tp}.pt")


def calibration_file(model: Transformer, result: dict, calibration: dict) -> dict:
    """The saved dict: "format"; "model": the fingerprint load_calibration checks (shapes and the norm
    of each layer's K projection, so a same-shaped but different model is refused); "calibration":
    text hash, sequence count and length; "tp": the number of tensor-parallel ranks it was made for; "eigvecs":
    per layer (D, r_max) float32, columns sorted by eigenvalue, descending (r_max = max_rank(D)), or with tp > 1
    (tp, D/tp, r_max) (r_max = max_rank(D/tp)), rank i's basis of its KV heads' keys; "eigvals": (L, D) float64,
    or (L, tp, D/tp); "report"."""
    tp = result["tp"]
    r_max = max_rank(model.args.n_kv_head * model.args.head_dim // tp)
    return {"format": FORMAT, "model": model_fingerprint(model, tp), "calibration": calibration, "tp": tp,
            "eigvecs": [v[..., :r_max].float().contiguous() for v in result["eigvecs"]],
            "eigvals": result["eigvals"], "report": result["report"]}


def recalibrate_hint(path: Path, tp: int = 1) -> str:
    cmd = f"python calibrate.py --checkpoint {path.parent}" + (f" --tp {tp}" if tp > 1 else "")
    return cmd if path.name == default_path(path.parent, tp).name else f"{cmd} --output {path}"


def load_calibration(path, model: Transformer) -> dict:
    """Reads a calibration file and checks that it was made for this model (shapes and the K
    projection weights) and for as many tensor-parallel ranks as the model is sharded over; raises
    FileNotFoundError / ValueError saying what differs and how to fix it. For a sharded model, the
    returned "eigvecs" and "eigvals" are its own rank's: [(D/N, r_max)] and (L, D/N)."""
    path = Path(path)
    rank, world = (0, 1) if model.tp is None else (model.tp.rank, model.tp.world)
    hint = recalibrate_hint(path, world)
    if not path.is_file():
        raise FileNotFoundError(f"no SALS calibration file at {path}: calibrate the model once with `{hint}` "
                                f"(a few minutes on CPU for SmolLM2).")
    try:
        calib = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and torch each raise their own types
        raise ValueError(f"{path} is not a SALS calibration file (unreadable: {type(e).__name__}: "
                         f"{str(e)[:200]}); recreate it with `{hint}`.") from None
    if not isinstance(calib, dict) or calib.get("format") != FORMAT:
        found = calib.get("format") if isinstance(calib, dict) else type(calib).__name__
        raise ValueError(f"{path} is not a SALS calibration file (format {found!r}, expected {FORMAT!r}); "
                         f"recreate it with `{hint}`.")
    if calib.get("tp", 1) != world:
        raise ValueError(f"{path} was made for tensor parallelism over {calib.get('tp', 1)} rank(s), but the model "
                         f"runs over {world}: each rank needs a basis of its own KV heads; make one with `{hint}`.")
    ours, theirs = model_fingerprint(model), calib.get("model", {})
    diffs = [f"{k} {theirs.get(k)} in the file, {ours[k]} in the model"
             for k in ("n_layer", "n_kv_head", "head_dim", "dim", "vocab_size") if theirs.get(k) != ours[k]]
    if not diffs:
        norms = theirs.get("k_weight_norms") or []
        if world > 1:  # one norm per rank and layer: this rank's are those of the rows it holds
            norms = [n[rank] for n in norms if isinstance(n, list) and len(n) == world]
        off = [i for i, (x, y) in enumerate(zip(norms, ours["k_weight_norms"])) if abs(x - y) > 1e-2 * abs(y)]
        if len(norms) != len(ours["k_weight_norms"]) or off:
            diffs.append(f"K projection weights differ (layers {off[:8]}...)" if off else
                         "K projection weight norms missing")
    if diffs:
        raise ValueError(f"{path} was made for another model: {'; '.join(diffs)}. Recalibrate with `{hint}`.")
    L, D = ours["n_layer"], ours["n_kv_head"] * ours["head_dim"]
    r_max = max_rank(D // world)
    vec_shape, val_shape = ((D, r_max), (L, D)) if world == 1 else ((world, D // world, r_max), (L, world, D // world))
    vecs, vals = calib.get("eigvecs"), calib.get("eigvals")
    if not (isinstance(vecs, list) and len(vecs) == L and all(isinstance(v, Tensor) and v.shape == vec_shape
                                                               for v in vecs)
            and isinstance(vals, Tensor) and vals.shape == val_shape):
        raise ValueError(f"{path} is corrupt: expected {L} eigenvector tensors of shape {vec_shape} and "
                         f"eigenvalues of shape {val_shape}; recreate it with `{hint}`.")
    return calib if world == 1 else dict(calib, eigvecs=[v[rank] for v in vecs], eigvals=vals[:, rank])


# ---------------------------------------------------------------------------------------------
# Command line.

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="SALS calibration: per-layer low-rank basis of pre-RoPE keys.")
    p.add_argument("--checkpoint", type=Path, help="checkpoint folder (default: SmolLM2-135M-Instruct)")
    p.add_argument("--text", type=Path, nargs="+", default=[DEFAULT_TEXT],
                   help="text files, folders of *.txt, or *.jsonl files with a \"text\" field")
    p.add_argument("--n_seqs", type=int, default=16, help="calibration sequences")
    p.add_argument("--seq_len", type=int, default=2048, help="tokens per calibration sequence")
    p.add_argument("--n_eval_seqs", type=int, default=2,
                   help=f"held-out sequences (of max(seq_len, {MIN_EVAL_LEN}) tokens) for the overlap score")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=DTYPES, help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--tp", type=int, default=1,
                   help="tensor-parallel ranks the bases are for (tp.py): one basis per rank's KV heads")
    p.add_argument("--output", type=Path, help="default: <checkpoint>/sals_calib.pt, or sals_calib_tpN.pt with --tp N")
    a = p.parse_args(argv)
    if a.n_seqs < 1 or a.seq_len < 1 or a.n_eval_seqs < 0 or a.tp < 1:
        p.error("--n_seqs, --seq_len and --tp must be positive, --n_eval_seqs non-negative.")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        if a.checkpoint is None:
            from convert_hf_checkpoint import ensure_default_checkpoint
            a.checkpoint = ensure_default_checkpoint()
        from tokenizer import load_tokenizer
        output = a.output or default_path(a.checkpoint, a.tp)
        if a.output and not output.parent.is_dir():
            raise FileNotFoundError(f"--output {output}: folder {output.parent} does not exist.")
        t0 = time.perf_counter()
        dtype = DTYPES[a.dtype] if a.dtype else default_dtype(a.device)
        docs = read_texts(a.text)
        model = load_model(a.checkpoint, a.device, dtype)
        check_tp_size(model.args, a.tp)
        text = "\n\n".join(docs)
        tokenizer = load_tokenizer(a.checkpoint)
        tokens = torch.tensor(tokenizer.encode(text), dtype=torch.long)
        n_seqs, seq_len, n_eval, eval_len, notes = plan_sequences(
            len(tokens), a.n_seqs, a.seq_len, a.n_eval_seqs, model.args.max_position_embeddings)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    # Each sequence starts as the model's prompts do (with BOS where the tokenizer adds one): the
    # first keys of a sequence are atypical (attention sinks) and should be seen as at inference.
    bos = [tokenizer.bos_id] if tokenizer.add_bos else []
    calib_seqs = cut_sequences(tokens, 0, n_seqs, seq_len, bos)
    eval_seqs = cut_sequences(tokens, n_seqs * (seq_len - len(bos)), n_eval, eval_len, bos)
    print(f"calibrating {a.checkpoint} on {n_seqs} x {seq_len} tokens ({len(tokens)} in {len(docs)} "
          f"document(s)), overlap on {n_eval} x {eval_len} held-out tokens, {a.device} {dtype}"
          + (f", one basis per rank of {a.tp}" if a.tp > 1 else ""), file=sys.stderr)
    result = calibrate(model, calib_seqs, eval_seqs, tp=a.tp)
    result["report"]["seconds"] = time.perf_counter() - t0
    result["report"]["table"] = format_report(result["report"])
    calibration = {"text_sha256": hashlib.sha256(text.encode()).hexdigest(), "n_seqs": n_seqs,
                   "seq_len": seq_len, "n_tokens": result["n_tokens"],
                   "source": ", ".join(str(p) for p in a.text)}
    torch.save(calibration_file(model, result, calibration), output)
    print(result["report"]["table"])
    print(f"wrote {output} in {result['report']['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
