"""Tensor parallelism (tp.py) on the CPU with gloo: two processes hold one half of a random model each and must
compute what the whole model computes, dense and SALS; the sizes and calibrations that do not fit are refused."""
import math
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

import calibrate
from conftest import ROOT
from generate import generate
from model import ModelArgs, Transformer, apply_rope, load_model, rope_table
from sals_attention import SALSConfig, setup_sals
from tokenizer import load_tokenizer
from tp import init_distributed, shard_model

WORLD = 2
SALS = dict(sink=4, window=8, sparsity=0.25, value_bits=4, dense_layers=(0,))  # a budget at ~100 tokens
PROMPTS = [100, 70]  # prompt lengths of the two rows
STEPS, NEW_TOKENS, CONTEXT = 6, 8, 120


def random_model(n_kv_head: int, n_head: int, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    args = ModelArgs(vocab_size=97, dim=64, n_layer=3, n_head=n_head, n_kv_head=n_kv_head, head_dim=32,
                     intermediate_size=96, max_position_embeddings=512)
    model = Transformer(args)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.eval()


def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, 97, (n,), generator=gen).tolist() for n in PROMPTS]


@torch.no_grad()
def run(model: Transformer, setup) -> dict:
    """Logits of each row's prefill (rows of different lengths), then of STEPS greedy decode steps of both rows,
    and generate()'s greedy tokens."""
    setup(len(PROMPTS), CONTEXT)
    ids = prompts()
    prefill = [model(torch.tensor([p]), torch.arange(len(p))[None], torch.tensor([i])) for i, p in enumerate(ids)]
    tokens = torch.stack([logits[0, -1].argmax() for logits in prefill])[:, None]  # (B, 1)
    pos = torch.tensor(PROMPTS)[:, None]
    decode = []
    for _ in range(STEPS):
        decode.append(model(tokens, pos))
        tokens, pos = decode[-1][:, -1].argmax(-1, keepdim=True), pos + 1
    generated, _ = generate(model, ids, NEW_TOKENS, setup_caches=setup)
    return {"prefill": prefill, "decode": torch.cat(decode, 1), "generated": generated}


def dense_model() -> Transformer:
    return random_model(n_kv_head=4, n_head=8)  # two KV heads (and four query heads) per rank


def sals_model() -> Transformer:
    return random_model(n_kv_head=2, n_head=4)  # one KV head per rank


def per_rank_calibration(path):
    """A real per-rank calibration (calibrate.py --tp 2) of sals_model, saved to path."""
    model = sals_model()
    tokens = torch.randint(0, 97, (4, 128), generator=torch.Generator().manual_seed(2))
    result = calibrate.calibrate(model, tokens, torch.zeros(0, 64, dtype=torch.long), verbose=False, tp=WORLD)
    torch.save(calibrate.calibration_file(model, result, {"text_sha256": "", "n_seqs": 4, "seq_len": 128,
                                                          "n_tokens": 512, "source": "random"}), path)


def worker(rank: int, port: int, calib_path: str, out_path: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    init_distributed(torch.device("cpu"), WORLD)
    dense = shard_model(dense_model(), rank, WORLD)
    sals = shard_model(sals_model(), rank, WORLD)
    calib = calibrate.load_calibration(calib_path, sals)  # this rank's bases
    cfg = SALSConfig.preset(0.25, **SALS)
    out = {"dense": run(dense, dense.setup_caches),
           "sals": run(sals, lambda B, S: setup_sals(sals, B, S, cfg, calib)),
           "sals_rank": sals.layers[1].attention.kv_cache.U.shape[1], "kv_heads": dense.args.n_kv_head}
    if rank == 0:
        torch.save(out, out_path)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """What rank 0 of two gloo processes computed, and the per-rank calibration file they used."""
    tmp = tmp_path_factory.mktemp("tp")
    per_rank_calibration(tmp / "calib_tp2.pt")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # forked, not spawned: no second import of torch and of this module (seconds each on a busy CPU)
    mp.start_processes(worker, args=(port, str(tmp / "calib_tp2.pt"), str(tmp / "out.pt")), nprocs=WORLD,
                       start_method="fork")
    return torch.load(tmp / "out.pt", weights_only=False), tmp / "calib_tp2.pt"


def assert_same_run(got: dict, want: dict):
    for g, w in zip(got["prefill"], want["prefill"]):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["decode"], want["decode"], rtol=1e-5, atol=1e-5)
    assert got["generated"] == want["generated"]


def test_dense_sharded_equals_whole_model(sharded):
    out, _ = sharded
    assert out["kv_heads"] == 2  # each rank's cache holds half of the 4 KV heads
    model = dense_model()
    assert_same_run(out["dense"], run(model, model.setup_caches))


def joint_basis(blocks: list[torch.Tensor], rank: int, score_dims: int) -> torch.Tensor:
    """The whole model's U (D, WORLD * rank) equivalent to the ranks' own: block-diagonal, with every rank's score
    columns first (the ranking prefix), then every rank's other columns."""
    score = torch.block_diag(*[b[:, :score_dims] for b in blocks])
    rest = torch.block_diag(*[b[:, score_dims:rank] for b in blocks])
    return torch.cat([score, rest], 1)


def test_sals_sharded_equals_whole_model_selecting_per_rank(sharded):
    """One KV head per rank, each rank selecting with its own head: the whole model with per-KV-head selection
    (another code path) and the block-diagonal basis made of the ranks' own must give the same logits and tokens."""
    out, calib_path = sharded
    r = out["sals_rank"]
    assert r == round(0.25 * 32)  # the 25% rank of one rank's 32-wide keys
    calib = torch.load(calib_path, weights_only=True)
    joint = {"eigvecs": [joint_basis(list(v), r, r // 2) for v in calib["eigvecs"]]}
    model = sals_model()
    cfg = SALSConfig(rank=WORLD * r, score_dims=WORLD * (r // 2), selection="kv-head", **SALS)
    assert_same_run(out["sals"], run(model, lambda B, S: setup_sals(model, B, S, cfg, joint)))


# ---------------------------------------------------------------------------------------------
# Per-rank calibration.

def test_per_rank_bases_are_the_eigenvectors_of_the_diagonal_blocks():
    model = sals_model()
    tokens = torch.randint(0, 97, (2, 96), generator=torch.Generator().manual_seed(3))
    no_eval = torch.zeros(0, 64, dtype=torch.long)
    whole = calibrate.calibrate(model, tokens, no_eval, verbose=False)
    split = calibrate.calibrate(model, tokens, no_eval, verbose=False, tp=WORLD)
    V, vals = [v for v in whole["eigvecs"]], whole["eigvals"]  # full rank: C = V diag(vals) V^T
    assert split["eigvals"].shape == (3, WORLD, 32)
    for i in range(3):
        C = V[i] @ torch.diag(vals[i]) @ V[i].T
        for rank in range(WORLD):
            block = C[rank * 32:(rank + 1) * 32, rank * 32:(rank + 1) * 32]
            U, lam = split["eigvecs"][i][rank], split["eigvals"][i, rank]
            torch.testing.assert_close(lam, torch.linalg.eigvalsh(block).flip(0), rtol=1e-9, atol=1e-9 * lam[0])
            torch.testing.assert_close(U @ torch.diag(lam) @ U.T, block, rtol=1e-9, atol=1e-9 * lam[0])
    kept = split["eigvals"][..., :8].sum((1, 2)) / split["eigvals"].sum((1, 2))
    torch.testing.assert_close(torch.tensor(split["report"]["energy_25"], dtype=torch.float64), kept)


def reference_group_overlap(q, k, basis, sparsity, sink, window) -> float:
    """Per query position, one rank after the other: each rank's latent top-n by its own heads' query; every head's
    true attention on sinks + window + its rank's choice, averaged over heads, over the layer's shared oracle."""
    H, T, Dh = q.shape
    N, Hkv = basis.shape[0], k.shape[0]
    G, per = H // Hkv, Hkv // N
    rope = rope_table(ModelArgs(vocab_size=1, dim=Dh, n_layer=1, n_head=1, n_kv_head=1, head_dim=Dh,
                                intermediate_size=1), T)
    q_rot, k_rot = apply_rope(q[None], rope[None])[0].double(), apply_rope(k[None], rope[None])[0].double()
    ratios = []
    for t in range(T - T // 4, T):
        n = math.floor(sparsity * (t + 1)) - sink - window
        if n <= 0:
            continue
        head_attn = torch.stack([torch.softmax(k_rot[h // G, :t + 1] @ q_rot[h, t] / math.sqrt(Dh), 0)
                                 for h in range(H)])  # (H, t+1)
        candidates = list(range(sink, t - window + 1))
        fixed = [j for j in range(t + 1) if j not in candidates]
        mean = head_attn.mean(0)
        oracle = sorted(candidates, key=lambda j: -float(mean[j]))[:n]
        kept = 0.0
        for g in range(N):
            heads = range(g * per, (g + 1) * per)
            q_lat = torch.cat([q[h * G:(h + 1) * G, t].sum(0) for h in heads]) @ basis[g]
            k_lat = [torch.cat([k[h, j] for h in heads]) @ basis[g] for j in range(T)]
            latent = sorted(candidates, key=lambda j: -float(k_lat[j] @ q_lat))[:n]
            kept += float(head_attn[g * per * G:(g + 1) * per * G][:, fixed + latent].sum(1).sum()) / H
        ratios.append(kept / float(mean[fixed + oracle].sum()))
    return sum(ratios) / len(ratios)


def test_overlap_with_per_rank_selection_matches_reference():
    T, H, Hkv, Dh = 400, 8, 4, 16
    gen = torch.Generator().manual_seed(4)
    q, k = 2 * torch.randn(H, T, Dh, generator=gen), torch.randn(Hkv, T, Dh, generator=gen)
    basis = torch.linalg.qr(torch.randn(WORLD, Hkv * Dh // WORLD, 6, generator=gen)).Q  # (N, D/N, r*)
    rope = rope_table(ModelArgs(vocab_size=1, dim=Dh, n_layer=1, n_head=1, n_kv_head=1, head_dim=Dh,
                                intermediate_size=1), T)
    got = calibrate.overlap_score(q, k, rope, basis, sparsity=0.25, sink=4, window=16)
    assert got == pytest.approx(reference_group_overlap(q, k, basis, 0.25, 4, 16), abs=1e-5)


# ---------------------------------------------------------------------------------------------
# What does not fit is refused.

def test_size_not_dividing_the_kv_heads_is_refused(monkeypatch):
    model = random_model(n_kv_head=3, n_head=6)
    with pytest.raises(ValueError, match=r"2 to divide n_kv_head \(3\).*Valid sizes for this model: 1, 3\."):
        shard_model(model, 0, 2)
    with pytest.raises(ValueError, match="Valid sizes for this model: 1, 3"):
        calibrate.calibrate(model, torch.zeros(1, 8, dtype=torch.long), torch.zeros(0, 8, dtype=torch.long), tp=2)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match=r"--tp 2 runs as 2 processes, but this run has 1: .*torchrun --standalone "
                                         r"--nproc_per_node 2"):
        init_distributed(torch.device("cpu"), 2)


def test_calibration_for_another_size_is_refused(tmp_path):
    per_rank_calibration(tmp_path / "calib_tp2.pt")
    whole = sals_model()
    result = calibrate.calibrate(whole, torch.randint(0, 97, (2, 64)), torch.zeros(0, 64, dtype=torch.long),
                                 verbose=False)
    torch.save(calibrate.calibration_file(whole, result, {}), tmp_path / "sals_calib.pt")
    with pytest.raises(ValueError, match=r"over 2 rank\(s\), but the model runs over 1.*"
                                         r"`python calibrate.py --checkpoint \S+ --output \S+calib_tp2.pt`"):
        calibrate.load_calibration(tmp_path / "calib_tp2.pt", whole)
    half = shard_model(sals_model(), 1, WORLD)  # rank 1's half (no process group needed until it runs)
    with pytest.raises(ValueError, match=r"over 1 rank\(s\), but the model runs over 2.*"
                                         r"`python calibrate.py --checkpoint \S+ --tp 2 --output \S+sals_calib.pt`"):
        calibrate.load_calibration(tmp_path / "sals_calib.pt", half)
    with pytest.raises(ValueError, match="another model: K projection weights differ"):
        calibrate.load_calibration(tmp_path / "calib_tp2.pt", shard_model(random_model(2, 4, seed=9), 1, WORLD))
    own = calibrate.load_calibration(tmp_path / "calib_tp2.pt", half)  # the right file: rank 1's blocks
    stored = torch.load(tmp_path / "calib_tp2.pt", weights_only=True)
    assert all(torch.equal(v, s[1]) and v.shape == (32, 32) for v, s in zip(own["eigvecs"], stored["eigvecs"]))
    assert calibrate.default_path(tmp_path, WORLD).name == "sals_calib_tp2.pt"


# ---------------------------------------------------------------------------------------------
# The command lines under torchrun.

def torchrun(n: int, *cmd) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
                           *map(str, cmd)], capture_output=True, text=True, timeout=180, env=env, cwd=ROOT)


def test_decode_bench_smoke_under_torchrun():
    r = torchrun(2, ROOT / "bench" / "decode_bench.py", "--device", "cpu", "--dtype", "float32", "--shape", "tiny",
                 "--method", "dense", "sals-25", "--prompt", "300", "--batch", "2", "--steps", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in r.stdout.splitlines()[-2:]]
    assert [row[:4] for row in rows] == [["tiny (tp 2)", "300", m, "2"] for m in ("dense", "sals-25")]
    assert all(float(row[4]) > 0 for row in rows)
    assert r.stdout.count("| tiny (tp 2) | 300 | dense |") == 2  # once as it runs, once in the table: rank 0 only


def test_generate_cli_under_torchrun_matches_one_process(smollm2_dir):
    """SmolLM2 (3 KV heads) over 3 gloo processes: the greedy text of the whole model in this process, printed once."""
    prompt = "The capital of France is"
    three = torchrun(3, ROOT / "generate.py", "--checkpoint", smollm2_dir, "--prompt", prompt, "--temperature", "0",
                     "--max_new_tokens", "8", "--device", "cpu", "--tp", "3")
    assert three.returncode == 0, three.stderr[-3000:]
    tok = load_tokenizer(smollm2_dir)
    (out,), _ = generate(load_model(smollm2_dir, "cpu", torch.float32), [tok.encode_prompt(prompt, chat=False)], 8,
                         stop_ids=tok.stop_ids)
    assert three.stdout == tok.decode([t for t in out if t not in tok.stop_ids]) + "\n"
    assert three.stderr.count("tensor parallel over 3 ranks") == 1
