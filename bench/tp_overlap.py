"""SALS under tensor parallelism: the joint latent basis against per-rank bases, and two ways to select (CPU).

    python bench/tp_overlap.py --tp 3    # SmolLM2-135M: 3 KV heads, so 3 is its only size above 1

With N ranks each holding Hkv/N KV heads, a rank can compress only its own heads' keys: its basis is the
eigenvectors of its diagonal block of the keys' second moment (calibrate.py --tp N). This prints, per layer, the key
energy kept at the 25% and 12.5% ranks (the joint basis of rank r against N blocks of rank r/N) and calibrate.py's
overlap score for three selections, all at r* = r/2 score dimensions in total:
  joint     one basis over all KV heads, one selection per layer (a single GPU);
  per-rank  each rank ranks its tokens with its own heads' latent query and its own block, and its heads attend to
            its own choice: no communication (what the engine does);
  reduced   the per-rank scores summed over the ranks (an all-reduce of B x S floats per layer and step), one
            selection shared by all ranks: the joint ranking with the block-diagonal basis.
Calibration and held-out text as calibrate.py's defaults.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import calibrate as cal  # noqa: E402
from model import KVCache, load_model, rope_frequencies  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402


@torch.inference_mode()
def shared_overlap(model, eval_seqs, bases) -> dict[str, list[float]]:
    """calibrate.py's overlap per ranking and layer, each layer ranking with bases[layer] (D, r*)."""
    D = model.args.n_kv_head * model.args.head_dim
    model.setup_caches(1, eval_seqs.shape[1], lambda i, args, B, S, dtype: cal.KeyStats(
        KVCache(B, S, args.n_kv_head, args.head_dim, dtype), D, rope_frequencies(args)))
    stats = [layer.attention.kv_cache for layer in model.layers]
    for s, basis in zip(stats, bases):
        s.basis = basis
    for seq in eval_seqs:
        model(seq[None], torch.arange(len(seq))[None])
    return {r: [sum(s.overlaps[r]) / len(s.overlaps[r]) for s in stats] for r in cal.OVERLAP_RANKINGS}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=None, help="default: SmolLM2-135M-Instruct")
    p.add_argument("--tp", type=int, default=3)
    p.add_argument("--n_seqs", type=int, default=16)
    p.add_argument("--seq_len", type=int, default=2048)
    p.add_argument("--n_eval_seqs", type=int, default=2)
    a = p.parse_args(argv)
    if a.checkpoint is None:
        from convert_hf_checkpoint import ensure_default_checkpoint
        a.checkpoint = ensure_default_checkpoint()
    model = load_model(a.checkpoint, "cpu", torch.float32)
    tokenizer = load_tokenizer(a.checkpoint)
    tokens = torch.tensor(tokenizer.encode("\n\n".join(cal.read_texts([cal.DEFAULT_TEXT]))), dtype=torch.long)
    n_seqs, seq_len, n_eval, eval_len, _ = cal.plan_sequences(len(tokens), a.n_seqs, a.seq_len, a.n_eval_seqs,
                                                              model.args.max_position_embeddings)
    bos = [tokenizer.bos_id] if tokenizer.add_bos else []
    calib_seqs = cal.cut_sequences(tokens, 0, n_seqs, seq_len, bos)
    eval_seqs = cal.cut_sequences(tokens, n_seqs * (seq_len - len(bos)), n_eval, eval_len, bos)

    joint = cal.calibrate(model, calib_seqs, eval_seqs)["report"]
    per_rank = cal.calibrate(model, calib_seqs, eval_seqs, tp=a.tp)
    rs = per_rank["report"]["score_dims"]
    reduced = shared_overlap(model, eval_seqs, [torch.block_diag(*v[..., :rs]) for v in per_rank["eigvecs"]])
    per_rank = per_rank["report"]

    names = {"pre-rope": "overlap", "expected-rope": "overlap_expected_rope", "bucket-rope": "overlap_bucket_rope"}
    print(f"{a.checkpoint.name}, tp {a.tp}: joint rank {joint['rank_25']} / {joint['rank_125']} "
          f"(r* {joint['score_dims']}), per rank {per_rank['rank_25']} / {per_rank['rank_125']} "
          f"(r* {per_rank['score_dims']}); {n_seqs} x {seq_len} calibration tokens, overlap on {n_eval} x {eval_len} "
          f"held-out tokens\n")
    head = ["layer", "energy 25% joint", "per-rank", "energy 12.5% joint", "per-rank"]
    for r in cal.OVERLAP_RANKINGS:
        head += [f"overlap {r} joint", "per-rank", "reduced"]
    rows = []
    for i in range(model.args.n_layer):
        row = [joint["energy_25"][i], per_rank["energy_25"][i], joint["energy_125"][i], per_rank["energy_125"][i]]
        for r in cal.OVERLAP_RANKINGS:
            row += [joint[names[r]][i], per_rank[names[r]][i], reduced[r][i]]
        rows.append(row)
    print("| " + " | ".join(head) + " |\n|" + " --- |" * len(head))
    for i, row in enumerate(rows):
        print(f"| {i} | " + " | ".join(f"{x:.4f}" for x in row) + " |")
    for label, sel in (("mean, all layers", rows), (f"mean, SALS layers 2-{len(rows) - 2}", rows[2:-1])):
        print(f"| {label} | " + " | ".join(f"{sum(c) / len(c):.4f}" for c in zip(*sel)) + " |")


if __name__ == "__main__":
    main()
