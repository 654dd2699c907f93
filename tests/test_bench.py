"""bench/decode_bench.py on the CPU: the command line and its table, the synthetic SALS prefill, and the
largest-batch search."""
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import decode_bench as db  # noqa: E402
from sals_attention import MIN_TOKENS, SALSCache  # noqa: E402

SINK, WINDOW, SPARSITY = 16, 64, 1 / 8  # the SALS presets' settings (docs/sals.md), restated as the reference


def run_bench(*flags) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")  # tiny tensors: threads on a shared CPU only contend
    return subprocess.run([sys.executable, str(ROOT / "bench" / "decode_bench.py"), "--device", "cpu",
                           "--dtype", "float32", *flags], capture_output=True, text=True, timeout=120, env=env)


def table(r: subprocess.CompletedProcess) -> list[list[str]]:
    """The cells of the final markdown table's rows."""
    assert r.returncode == 0, f"exit status {r.returncode}: {r.stderr[-3000:]}"
    lines = r.stdout.splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("| ---"))
    return [[c.strip() for c in line.split("|")[1:-1]] for line in lines[start + 1:] if line.startswith("| ")]


def test_decode_bench_smoke():
    rows = table(run_bench("--shape", "tiny", "--prompt", "32", "--batch", "2", "--steps", "4"))
    assert [row[:4] for row in rows] == [["tiny", "32", "dense", "2"]]
    assert float(rows[0][4]) > 0  # ms / step


def dense_bytes(B: int, S: int, L: int = 5, Hkv: int = 2, Dh: int = 32, size: int = 4) -> int:
    return 2 * L * B * Hkv * S * Dh * size


def sals_bytes(B: int, S: int, rank: int, bits: int, Hkv: int = 2, Dh: int = 32) -> int:
    """Every buffer of the tiny shape's caches (float32): 3 dense layers and 2 SALS layers, from docs/sals.md's layout.
    The latent rows also hold the full-rank keys of the first min(512, S) positions (halves of Hkv * Dh / 2 in each
    rank / 2-wide part) past row min(512, S): more rows than S where S is too short for them."""
    m = min(512, S)
    rows = max(S, m + math.ceil(m * Hkv * Dh / 2 / (rank // 2)))
    per_layer = (Hkv * Dh * rank * 4 + Dh // 2 * 8  # U, RoPE frequencies (float64)
                 + B * rows * rank * 4  # latents
                 + B * S * (Hkv * Dh * bits // 8 + 2 * Hkv * Dh // 32 * 2)  # values, scale+zero
                 + 2 * B * (SINK + WINDOW) * Hkv * Dh * 4 + B * WINDOW * 4  # sinks and window (K, V), window_pos
                 + S * 4)  # the budget of every position (int32)
    return dense_bytes(B, S, L=3) + 2 * per_layer


def test_methods_table():
    """One row per method and prompt, positive timings, the speed-up column the ratio to the faster of the two dense
    rows (and naming it), tokens/s consistent with the step times, and the KV-cache column counting every buffer
    of the caches allocated (prompt + steps long)."""
    rows = table(run_bench("--shape", "tiny", "--method", "dense", "dense-masked", "sals-25", "sals-12.5", "--prompt",
                           "300", "1024", "--batch", "2", "--steps", "4", "--graph"))
    methods = ("dense", "dense-masked", "sals-25", "sals-12.5")
    assert [row[1:4] for row in rows] == [[p, m, "2"] for p in ("300", "1024") for m in methods]
    for prompt in (300, 1024):
        dense, masked, *sals = [row for row in rows if row[1] == str(prompt)]
        expected = [dense_bytes(2, prompt + 4), dense_bytes(2, prompt + 4), sals_bytes(2, prompt + 4, 16, 4),
                    sals_bytes(2, prompt + 4, 8, 2)]
        e = 0.005  # times are printed with two decimals
        fastest = min(float(dense[4]), float(masked[4]))
        # The bench picks the faster unrounded time, so two dense rows printed equal may both be the baseline.
        baselines = {f"({row[2]})": float(row[4]) for row in (dense, masked) if float(row[4]) <= fastest + 2 * e}
        for row, kv in zip([dense, masked, *sals], expected):
            ms = float(row[4])
            assert ms > 0 and 2e3 / (ms + e) - 0.05 <= float(row[5]) <= 2e3 / (ms - e) + 0.05  # tokens/s
            ratio, name = row[6].split("x ")
            assert name in baselines, (name, baselines)
            d = baselines[name]
            assert (d - e) / (ms + e) - e <= float(ratio) <= (d + e) / (ms - e) + e
            assert float(row[8].removesuffix(" GB")) == pytest.approx(kv / 1e9, rel=1e-2)


def test_max_batch_table():
    """--max_batch on the CPU (nothing runs out of memory) stops at the limit and times that batch."""
    rows = table(run_bench("--shape", "tiny", "--method", "sals-12.5", "dense", "--prompt", "200", "--max_batch",
                           "--max_batch_limit", "3", "--steps", "2"))
    assert [row[2:4] for row in rows] == [["dense", "3 (largest)"], ["sals-12.5", "3 (largest)"]]
    assert all(float(row[4]) > 0 for row in rows)
    assert rows[0][7] == "1.00x (dense: batch 3)" and rows[0][6] == "1.00x (dense)"


@pytest.mark.parametrize("flags, words", [
    (["--max_batch", "--batch", "4"], ["leave out --batch"]),
    (["--steps", "0"], ["--steps must be at least 1"]),
    (["--method", "sals-50"], ["--method", "invalid choice"]),
])
def test_bad_flags(flags, words):
    r = run_bench(*flags)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert all(w in r.stderr for w in words), r.stderr


@pytest.mark.parametrize("method", ["sals-25", "sals-12.5"])
def test_synthetic_prefill_attends_the_whole_budget(method):
    torch.manual_seed(0)
    B, P = 3, 1001
    model = db.random_model("tiny", "cpu", torch.float32)
    db.cache_setup(model, method)(B, P + 4)
    db.fill_caches(model, P)
    caches = [layer.attention.kv_cache for layer in model.layers]
    sals = [c for c in caches if isinstance(c, SALSCache)]
    assert len(sals) == 2
    for c in caches:  # every buffer written (U, the frequencies and window_pos checked below; budgets are set once)
        for name, t in c.named_buffers():
            if name not in ("U", "inv_freq", "window_pos", "n_attend"):
                assert (t != 0).float().mean() > 0.9, name
    for c in sals:
        assert torch.allclose(c.U.double().T @ c.U.double(), torch.eye(c.U.shape[1], dtype=torch.float64), atol=1e-5)
        assert (c.v_scale > 0).all() and (c.v_zero > 0).all()
        ring = [-1] * WINDOW
        for p in range(P - WINDOW, P):  # positions P-W..P-1, each in its slot (SALSCache.write's rule)
            ring[(p - SINK) % WINDOW] = p
        assert c.window_pos.tolist() == [ring] * B

    kept = []
    for c in sals:
        select = c.select
        c.select = lambda *a, select=select: kept.append(select(*a)) or kept[-1]
    with torch.no_grad():
        logits = model(torch.randint(0, 1000, (B, 1)), torch.full((B, 1), P))
    assert torch.isfinite(logits).all()
    budget = max(math.floor(SPARSITY * (P + 1)), min(MIN_TOKENS, P + 1)) - SINK - WINDOW  # sals_attention.budget
    assert len(kept) == 2 and budget > 0
    for idx, keep in kept:
        assert keep.shape[:2] == (B, sals[0].n_kv_head) and (keep.sum(-1) == budget).all()  # each KV head its budget
        assert ((idx[keep] >= SINK) & (idx[keep] <= P - WINDOW)).all()  # compressed tokens only
    for c in sals:  # after the step the window holds P-W+1..P: sinks + window + budget all attended
        assert sorted(c.window_pos[0].tolist()) == list(range(P - WINDOW + 1, P + 1))


@pytest.mark.parametrize("limit", [1, 2, 7, 16, 70])
def test_largest_batch_matches_brute_force(limit):
    for threshold in range(limit + 3):  # fits(b) iff b <= threshold; 0: nothing fits
        expected = max([b for b in range(1, limit + 1) if b <= threshold], default=0)
        for guess in range(0, limit + 3):  # out-of-range guesses are clamped to 1..limit
            calls = []

            def fits(b):
                calls.append(b)
                return b <= threshold
            assert db.largest_batch(fits, limit, guess) == expected, (threshold, guess)
            assert all(1 <= b <= limit for b in calls) and len(set(calls)) == len(calls), calls
            distance = abs(expected - min(max(guess, 1), limit))
            assert len(calls) <= 2 * math.floor(math.log2(distance + 1)) + 2, (threshold, guess, calls)
        assert db.largest_batch(lambda b: b <= threshold, limit) == expected  # default: doubling from 1


def test_kernel_report_compiles_every_sweep_variant_for_sm90(tmp_path):
    """bench/kernel_report.py (no GPU): each launch-setting variant of the fused kernel, and the select and combine
    kernels, compile for sm_90 and ptxas reports their registers; the TTGIR it writes holds the rebuild's
    tensor-core dots."""
    from bench.attention_bench import SWEEP
    from bench.kernel_report import OTHERS
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "kernel_report.py"), "--ttgir", str(tmp_path / "k.mlir")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [line for line in r.stdout.splitlines() if "registers" in line]
    assert len(rows) == sum(len(v) for v in SWEEP.values()) + len(OTHERS), r.stdout
    assert "warp_group_dot" in (tmp_path / "k.mlir").read_text()


def test_prefill_flops_match_torchs_flop_counter(monkeypatch):
    """bench/prefill_bench.py's compute roofline against torch's own count of the prefill's matmuls (FlopCounterMode,
    which counts each SDPA call as the full chunk x prefix rectangle: the masked upper triangle of each chunk is
    taken off to compare with the causal count). The counter neither traces SDPA's causal-bias tensor subclass nor
    counts SDPA's CPU kernel, so attend_prefix runs as explicit matrix products, masked."""
    import prefill_bench as pb
    from torch.utils.flop_counter import FlopCounterMode
    import model as model_module
    from generate import PREFILL_CHUNK, prefill

    def attend_prefix(q, k, v, start):
        T, G = q.shape[2], q.shape[1] // k.shape[1]
        k, v = (x[:, :, :start + T].repeat_interleave(G, 1) for x in (k, v))  # (b, H, L, D)
        s = (q @ k.transpose(2, 3)) * q.shape[-1] ** -0.5
        s = s.masked_fill(~torch.ones(T, start + T, dtype=torch.bool).tril(start), float("-inf"))
        return s.softmax(-1) @ v
    monkeypatch.setattr(model_module, "attend_prefix", attend_prefix)
    model = db.random_model("tiny", torch.device("cpu"), torch.float32)
    a, T = model.args, PREFILL_CHUNK + 300  # two chunks, the second reading the first's cache
    model.setup_caches(1, T)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        prefill(model, torch.randint(0, a.vocab_size, (1, T)))
    counted = counter.get_total_flops()
    masked = sum(4 * a.n_layer * a.n_head * a.head_dim * t * (t - 1) // 2 for t in (PREFILL_CHUNK, 300))
    assert pb.prefill_flops(model, T) == counted - masked


def test_prefill_bench_table():
    """A prompt of two chunks and one of a single chunk, dense and SALS: a row each, finite positive times."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "prefill_bench.py"), "--shape", "tiny", "--prompt", "300",
                        "2500", "--method", "dense", "sals-25", "--device", "cpu", "--dtype", "float32"],
                       capture_output=True, text=True, timeout=120, env=env)
    rows = table(r)
    assert [row[:3] for row in rows] == [["tiny", m, t] for m in ("dense", "sals-25") for t in ("300", "2500")]
    assert all(float(row[3]) > 0 and float(row[4]) > 0 for row in rows)  # seconds, tokens/s
