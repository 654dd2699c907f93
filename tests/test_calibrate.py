"""calibrate.py: second moments and eigenbases of pre-RoPE keys, the overlap score, the file checks."""
import hashlib
import json
import math

import pytest
import torch

import calibrate
from calibrate import calibrate as run_calibration
from calibrate import calibration_file, k_weight_norms, load_calibration, overlap_score
from model import ModelArgs, Transformer, load_model, rope_table

NO_EVAL = torch.zeros(0, 64, dtype=torch.long)


def tiny_model(seed: int, **overrides) -> Transformer:
    """Random 2-layer GQA model: 4 query heads, 2 KV heads of 16 dims, so D = 32."""
    args = dict(vocab_size=128, dim=64, n_layer=2, n_head=4, n_kv_head=2, head_dim=16,
                intermediate_size=96, max_position_embeddings=2048)
    torch.manual_seed(seed)
    return Transformer(ModelArgs(**(args | overrides))).eval()


def k_rows(model: Transformer) -> slice:
    a = model.args
    return slice(a.n_head * a.head_dim, (a.n_head + a.n_kv_head) * a.head_dim)


def random_tokens(n: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# The basis.

def test_recovers_planted_low_rank_subspace():
    model = tiny_model(1)
    D, r = 32, 8  # r = D/4: the 25% rank
    gen = torch.Generator().manual_seed(0)
    planted = []
    for layer in model.layers:
        A = torch.linalg.qr(torch.randn(D, r, generator=gen, dtype=torch.float64)).Q  # (D, r) orthonormal
        B = torch.randn(r, 64, generator=gen, dtype=torch.float64) / 8
        noise = 1e-6 * torch.randn(D, 64, generator=gen, dtype=torch.float64)
        layer.attention.wqkv.weight.data[k_rows(model)] = (A @ B + noise).float()  # keys ~ in span(A)
        planted.append(A)
    result = run_calibration(model, random_tokens(4, 128, 1), NO_EVAL, verbose=False)
    for A, U, vals in zip(planted, result["eigvecs"], result["eigvals"]):
        top = U[:, :r]  # (D, r)
        cosines = torch.linalg.svdvals(A.T @ top)  # cosines of the principal angles
        assert cosines.min() > 1 - 1e-8
        assert (top @ top.T - A @ A.T).norm() < 1e-4
        assert vals[r - 1] > 1e6 * vals[r]  # the planted rank is exactly r: a gap right after it
    assert min(result["report"]["energy_25"]) > 1 - 1e-9
    assert max(result["report"]["energy_125"]) < 0.999  # half the planted rank loses energy


def test_second_moment_matches_brute_force_over_hooked_keys():
    model = tiny_model(2)
    keys = [[] for _ in model.layers]  # per layer, the K part of every wqkv output, in call order
    hooks = [layer.attention.wqkv.register_forward_hook(
        lambda mod, inp, out, i=i: keys[i].append(out[0, :, k_rows(model)].double()))
        for i, layer in enumerate(model.layers)]
    calib, held_out = random_tokens(3, 96, 2), random_tokens(1, 1024, 3)
    try:
        result = run_calibration(model, calib, held_out, verbose=False)
    finally:
        for h in hooks:
            h.remove()
    assert result["n_tokens"] == 3 * 96
    for layer_keys, vals, vecs in zip(keys, result["eigvals"], result["eigvecs"]):
        assert len(layer_keys) == 4  # 3 calibration sequences + 1 held-out
        K = torch.cat(layer_keys[:3])  # (3*96, D): the held-out keys must not count
        C = K.T @ K
        ref_vals = torch.linalg.eigvalsh(C).flip(0)
        assert torch.allclose(vals, ref_vals.clamp(min=0), rtol=1e-9, atol=1e-10 * ref_vals[0])
        assert torch.all(vals[:-1] >= vals[1:])
        assert torch.allclose(vecs.T @ vecs, torch.eye(32, dtype=torch.float64), atol=1e-10)
        assert torch.allclose(vecs @ torch.diag(vals) @ vecs.T, C, atol=1e-9 * C.norm())
    assert all(0 < o <= 1 for o in result["report"]["overlap"])  # measured on the held-out sequence


# ---------------------------------------------------------------------------------------------
# The overlap score.

def reference_overlap(q, k, rope_base, basis, sparsity, sink, window) -> float:
    """Per query position, in float64, with RoPE written out from its definition."""
    H, T, Dh = q.shape
    Hkv, G = k.shape[0], q.shape[0] // k.shape[0]
    q, k, basis = q.double(), k.double(), basis.double()
    angles = torch.arange(T, dtype=torch.float64)[:, None] * rope_base ** (
        -torch.arange(0, Dh, 2, dtype=torch.float64) / Dh)  # (T, Dh/2)
    cos, sin = angles.cos(), angles.sin()

    def rotate(x):  # dimension i turns with i + Dh/2
        x1, x2 = x[..., :Dh // 2], x[..., Dh // 2:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)
    q_rot, k_rot = rotate(q), rotate(k)
    k_lat = torch.stack([torch.cat([k[h, j] for h in range(Hkv)]) for j in range(T)]) @ basis  # (T, r*)
    ratios = []
    for t in range(T - T // 4, T):
        n = math.floor(sparsity * (t + 1)) - sink - window
        if n <= 0:
            continue
        attn = torch.zeros(T, dtype=torch.float64)
        for h in range(H):
            attn[:t + 1] += torch.softmax(k_rot[h // G, :t + 1] @ q_rot[h, t] / math.sqrt(Dh), 0) / H
        q_lat = torch.cat([q[g * G:(g + 1) * G, t].sum(0) for g in range(Hkv)]) @ basis
        candidates = list(range(sink, t - window + 1))
        latent = sorted(candidates, key=lambda j: -float(k_lat[j] @ q_lat))[:n]
        oracle = sorted(candidates, key=lambda j: -float(attn[j]))[:n]
        fixed = attn[:sink].sum() + attn[t - window + 1:t + 1].sum()
        ratios.append(float((fixed + attn[latent].sum()) / (fixed + attn[oracle].sum())))
    return sum(ratios) / len(ratios)


def qk(T, H, Hkv, Dh, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(H, T, Dh, generator=gen), torch.randn(Hkv, T, Dh, generator=gen))


def rope_rows(T, Dh, base=10000.0):
    args = ModelArgs(vocab_size=1, dim=Dh, n_layer=1, n_head=1, n_kv_head=1, head_dim=Dh,
                     intermediate_size=1, rope_base=base)
    return rope_table(args, T)  # (T, Dh/2, 2)


def test_overlap_matches_per_query_reference():
    T, H, Hkv, Dh = 768, 4, 2, 16
    q, k = qk(T, H, Hkv, Dh, seed=4, scale=2.0)
    basis = torch.linalg.qr(torch.randn(Hkv * Dh, 6, generator=torch.Generator().manual_seed(5))).Q
    got = overlap_score(q, k, rope_rows(T, Dh), basis)
    want = reference_overlap(q, k, 10000.0, basis, 1 / 8, 16, 64)
    assert 0.3 < want < 0.99  # a case where the choice matters
    assert got == pytest.approx(want, abs=1e-5)


def test_overlap_is_one_for_exact_ranking_or_full_budget_and_low_for_a_bad_basis():
    T, Dh = 1024, 32
    gen = torch.Generator().manual_seed(6)
    span = torch.linalg.qr(torch.randn(Dh, Dh, generator=gen)).Q
    good, bad = span[:, :8], span[:, 8:]  # keys live in span(good); bad is its complement
    k = (torch.randn(1, T, 8, generator=gen) @ good.T)  # (1, T, Dh)
    q = 3 * torch.randn(1, T, Dh, generator=gen)  # one head: peaked attention
    no_rotation = torch.stack([torch.ones(T, Dh // 2), torch.zeros(T, Dh // 2)], -1)  # RoPE at position 0
    # exact latent scores rank exactly as the true attention (one head, no rotation)
    assert overlap_score(q, k, no_rotation, good) == pytest.approx(1.0, abs=1e-6)
    assert overlap_score(q, k, no_rotation, span) == pytest.approx(1.0, abs=1e-6)
    # a budget covering every token keeps everything, whatever the basis
    assert overlap_score(q, k, rope_rows(T, Dh), bad, sparsity=1.0) == pytest.approx(1.0, abs=1e-6)
    # the complement sees nothing of the keys: its choice is arbitrary
    assert overlap_score(q, k, no_rotation, bad) < 0.8


# ---------------------------------------------------------------------------------------------
# The calibration file.

@pytest.fixture(scope="module")
def tiny_calib(tmp_path_factory):
    model = tiny_model(7)
    result = run_calibration(model, random_tokens(2, 64, 8), NO_EVAL, verbose=False)
    path = tmp_path_factory.mktemp("calib") / "sals_calib.pt"
    torch.save(calibration_file(model, result, {"text_sha256": "", "n_seqs": 2, "seq_len": 64,
                                                "n_tokens": 128, "source": "random"}), path)
    return model, path


def test_file_loads_for_its_model_in_any_dtype(tiny_calib):
    model, path = tiny_calib
    calib = load_calibration(path, model)
    assert calib["model"]["k_weight_norms"] == k_weight_norms(model)
    assert len(calib["eigvecs"]) == 2 and calib["eigvecs"][0].shape == (32, 32)
    assert calib["eigvals"].shape == (2, 32) and calib["eigvals"].dtype == torch.float64
    load_calibration(path, tiny_model(7).to(torch.bfloat16))  # same weights, rounded: accepted


def test_file_from_another_model_is_refused(tiny_calib):
    _, path = tiny_calib
    with pytest.raises(ValueError, match=r"another model: n_kv_head 2 in the file, 1 in the model.*"
                                         r"python calibrate.py --checkpoint"):
        load_calibration(path, tiny_model(7, n_kv_head=1))
    with pytest.raises(ValueError, match="another model: K projection weights differ"):
        load_calibration(path, tiny_model(8))  # same shape, other weights


def test_foreign_corrupt_or_missing_file_is_refused(tiny_calib, tmp_path):
    model, path = tiny_calib
    with pytest.raises(FileNotFoundError, match=r"python calibrate.py --checkpoint .* --output"):
        load_calibration(tmp_path / "none.pt", model)
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="not a SALS calibration file"):
        load_calibration(tmp_path / "garbage.pt", model)
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not a SALS calibration file.*format None"):
        load_calibration(tmp_path / "foreign.pt", model)
    calib = torch.load(path, weights_only=True)
    calib["eigvecs"] = [v[:, :4] for v in calib["eigvecs"]]
    torch.save(calib, tmp_path / "truncated.pt")
    with pytest.raises(ValueError, match="corrupt"):
        load_calibration(tmp_path / "truncated.pt", model)


# ---------------------------------------------------------------------------------------------
# Text and sequence planning.

def test_read_texts_from_files_folders_and_jsonl(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "b.txt").write_text("second")
    (tmp_path / "d" / "a.txt").write_text("first")
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "third"}) + "\n\n" + json.dumps({"text": "4th"}) + "\n")
    assert calibrate.read_texts([tmp_path / "d", tmp_path / "c.jsonl"]) == ["first", "second", "third", "4th"]
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2 has no string field \"text\""):
        calibrate.read_texts([tmp_path / "bad.jsonl"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        calibrate.read_texts([tmp_path / "missing.txt"])


def test_plan_uses_what_the_text_has_and_says_so():
    assert calibrate.plan_sequences(100_000, 16, 2048, 2, 8192)[:4] == (16, 2048, 2, 2048)
    n, length, n_eval, eval_len, notes = calibrate.plan_sequences(10_000, 16, 2048, 2, 8192)
    assert (n, length, n_eval, eval_len) == (3, 2048, 1, 2048) and len(notes) == 2
    assert calibrate.plan_sequences(1500, 4, 256, 1, 8192)[:4] == (1, 256, 1, 1024)  # eval >= 1024
    n, length, n_eval, _, notes = calibrate.plan_sequences(500, 4, 2048, 1, 8192)
    assert (n, length, n_eval) == (1, 500, 0) and "only 500 tokens" in notes[0]
    with pytest.raises(ValueError, match="exceeds the model's context"):
        calibrate.plan_sequences(100_000, 1, 4096, 0, 2048)


# ---------------------------------------------------------------------------------------------
# The real model.

def test_real_smollm2_run(smollm2_dir, tmp_path, capsys):
    text = calibrate.DEFAULT_TEXT.read_text(encoding="utf-8")[:15_000]
    (tmp_path / "text.txt").write_text(text, encoding="utf-8")
    out = tmp_path / "calib.pt"
    rc = calibrate.main(["--checkpoint", str(smollm2_dir), "--text", str(tmp_path / "text.txt"),
                         "--n_seqs", "2", "--seq_len", "256", "--n_eval_seqs", "1", "--output", str(out)])
    assert rc == 0
    stdout = capsys.readouterr().out
    model = load_model(smollm2_dir, "cpu", torch.float32)
    calib = load_calibration(out, model)
    load_calibration(out, load_model(smollm2_dir, "cpu", torch.bfloat16))
    assert calib["calibration"]["n_tokens"] == 512
    assert calib["calibration"]["text_sha256"] == hashlib.sha256(text.encode()).hexdigest()
    vals = calib["eigvals"]  # (30, 192)
    assert vals.shape == (30, 192) and torch.all(vals >= 0) and torch.all(vals[:, :-1] >= vals[:, 1:])
    for v in calib["eigvecs"]:
        assert torch.allclose(v.T @ v, torch.eye(192), atol=1e-5)
    report = calib["report"]
    assert report["rank_25"] == 48 and report["rank_125"] == 24 and report["eval_len"] == 1024
    assert len(report["energy_25"]) == len(report["overlap"]) == 30
    assert all(1 >= e25 >= e125 > 0.125 for e25, e125 in zip(report["energy_25"], report["energy_125"]))
    assert all(0 < o <= 1 for o in report["overlap"])
    rows = [line.split() for line in stdout.splitlines() if line.split() and line.split()[0].isdigit()]
    assert [int(r[0]) for r in rows] == list(range(30))
    assert [float(r[1]) for r in rows] == pytest.approx(report["energy_25"], abs=1e-4)
    assert report["table"] in stdout


def test_cli_error_is_one_line(smollm2_dir, tmp_path, capsys):
    rc = calibrate.main(["--checkpoint", str(smollm2_dir), "--text", str(tmp_path / "absent.txt")])
    assert rc == 2
    assert "error: --text" in capsys.readouterr().err
