"""generate.py and the dense decode path, on the real SmolLM2 and on small random models."""
import json
import math
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
import generate as generate_module
from generate import Streamer, decode_one_token, filter_logits, generate, prefill, sample
from model import ModelArgs, Transformer, load_model
from sals_attention import SALSConfig
from tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def smol(smollm2_dir):
    return load_model(smollm2_dir, "cpu", torch.float32), load_tokenizer(smollm2_dir)


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / "generate.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def random_model(n_kv_head=2, seed=0):
    torch.manual_seed(seed)
    args = ModelArgs.from_config(dict(model_type="llama", hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                      num_key_value_heads=n_kv_head, intermediate_size=128, vocab_size=97,
                                      max_position_embeddings=512))
    model = Transformer(args)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.eval()


@torch.no_grad()
def assert_incremental_equals_full(model, ids, n_prompt, tol):
    """Prefill n_prompt tokens, then one token per step: the logits equal one full forward pass."""
    B, T = ids.shape
    pos = torch.arange(T).expand(B, T)
    model.setup_caches(B, T + 8)
    full = model(ids, pos)
    model.setup_caches(B, T + 8)
    steps = [model(ids[:, :n_prompt], pos[:, :n_prompt])]
    steps += [model(ids[:, t:t + 1], pos[:, t:t + 1]) for t in range(n_prompt, T)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=tol, atol=tol)


@pytest.mark.parametrize("n_kv_head", [1, 2, 4])
def test_incremental_decode_equals_full_forward_random(n_kv_head):
    assert_incremental_equals_full(random_model(n_kv_head), torch.randint(0, 97, (2, 90)), 50, 1e-5)


def test_incremental_decode_equals_full_forward_smollm2(smol, novel):
    model, tok = smol
    ids = torch.tensor(tok.encode(novel[5000:6000])[:120])[None]
    assert_incremental_equals_full(model, ids, 80, 1e-4)


@torch.no_grad()
def test_chunked_prefill_equals_one_pass(monkeypatch):
    model = random_model()
    prompt = torch.randint(0, 97, (300,)).tolist()
    model.setup_caches(1, 400)
    whole = prefill(model, torch.tensor([prompt]))
    monkeypatch.setattr("generate.PREFILL_CHUNK", 64)
    model.setup_caches(1, 400)
    torch.testing.assert_close(prefill(model, torch.tensor([prompt])), whole, rtol=1e-5, atol=1e-5)


def test_batch_of_different_lengths_equals_each_alone(smol):
    model, tok = smol
    texts = ["The capital of France is", "Once upon a time, in a small village by the sea, there lived",
             "def fibonacci(n):"]
    prompts = [tok.encode_prompt(t) for t in texts]
    assert len({len(p) for p in prompts}) == 3
    batch, _ = generate(model, prompts, 24, temperature=0)
    for prompt, out in zip(prompts, batch):
        alone, _ = generate(model, [prompt], 24, temperature=0)
        assert out == alone[0]


def test_each_sequence_stops_at_its_own_stop_token(smol):
    model, tok = smol
    prompts = [tok.encode_prompt("The capital of France is"), tok.encode_prompt("One, two, three,")]
    free, _ = generate(model, prompts, 16, temperature=0)
    # Pretend the first token of row 0 that row 1 never produces ends a sequence.
    i = next(i for i, t in enumerate(free[0]) if i > 0 and t not in free[1])
    stopped, _ = generate(model, prompts, 16, temperature=0, stop_ids={free[0][i]})
    assert stopped[0] == free[0][:i + 1]
    assert stopped[1] == free[1]


def test_streamed_text_equals_final_text(smol, capsys):
    model, tok = smol
    stream = Streamer(tok)
    out, _ = generate(model, [tok.encode_prompt("Café, naïve, 東京 and 🙂 are", chat=True)], 30,
                      temperature=0, stop_ids=tok.stop_ids, on_token=stream)
    stream.flush()
    assert capsys.readouterr().out == tok.decode([t for t in out[0] if t not in tok.stop_ids])


def brute_force_keep(logits_row: torch.Tensor, top_k, top_p) -> set[int]:
    """The tokens top-k then top-p sampling may draw, from their definitions, one token at a time in float64."""
    order = sorted(range(len(logits_row)), key=lambda t: -logits_row[t].item())
    keep = order[:top_k] if top_k is not None else order
    if top_p is not None and top_p < 1:
        z = sum(math.exp(logits_row[t].item()) for t in keep)
        chosen, mass = [], 0.0
        for t in keep:  # the smallest set of most likely tokens whose mass reaches top_p
            chosen.append(t)
            mass += math.exp(logits_row[t].item()) / z
            if mass >= top_p:
                break
        keep = chosen
    return set(keep)


@pytest.mark.parametrize("top_k,top_p", [(5, None), (1, None), (None, 0.5), (None, 0.9), (7, 0.6), (50, 0.999)])
def test_filter_logits_is_exactly_top_k_and_top_p(top_k, top_p):
    """The tokens left finite are exactly the brute-force set per row, with their logits unchanged."""
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(top_k or 3)) * 2
    out = filter_logits(logits, top_k, top_p)
    for b in range(6):
        keep = brute_force_keep(logits[b], top_k, top_p)
        assert set(out[b].isfinite().nonzero().flatten().tolist()) == keep
        assert torch.equal(out[b, sorted(keep)], logits[b, sorted(keep)])


def test_sample_draws_from_the_whole_filtered_set():
    """Sampling with top_k = 5 draws every one of the 5 tokens (so a sampler made greedy fails) and no other."""
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 1.9, 1.8, 1.7, 1.6, 0.0, -1.0, 1.5]])
    draws = {sample(logits, 1.0, top_k=5).item() for _ in range(400)}
    assert draws == {0, 1, 2, 3, 4}
    assert torch.equal(sample(logits, 0.0), logits.argmax(-1))


def test_cli_dtype_and_sals_choices_are_the_libraries():
    """generate.py names its --dtype, --sals_ranking and --sals_selection choices before importing torch: they
    must be those model.py and sals_attention.py accept."""
    import model
    import sals_attention
    assert set(generate_module.DTYPE_NAMES) == set(model.DTYPES)
    assert generate_module.SALS_RANKINGS == sals_attention.RANKINGS
    assert generate_module.SALS_SELECTIONS == sals_attention.SELECTIONS
    default = sals_attention.SALSConfig.preset(0.25)
    assert default.ranking in generate_module.SALS_RANKINGS and default.selection in generate_module.SALS_SELECTIONS


def test_cli_refuses_a_bad_flag_before_importing_torch():
    code = ("import runpy, sys\nsys.argv = ['generate.py', '--temperature', '-1']\n"
            "try:\n    runpy.run_path('generate.py', run_name='__main__')\nexcept SystemExit as e:\n"
            "    print('exit', e.code, 'torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "exit 2 False", (r.stdout, r.stderr)
    assert "--temperature" in r.stderr


def test_sampling_is_reproducible_and_matches_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    torch.manual_seed(1)
    draws = torch.stack([sample(logits, 1.0) for _ in range(4000)]).flatten()
    freq = torch.bincount(draws, minlength=3).float() / len(draws)
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.2]), atol=0.03, rtol=0)


def test_cli_answers_paris(smollm2_dir):
    r = run_cli("--chat", "--prompt", "What is the capital of France?", "--temperature", "0", "--device", "cpu",
                "--max_new_tokens", "40")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    for metric in ("time to first token", "tokens/s per sequence", "tokens/s total", "effective bandwidth",
                   "KV cache", "peak"):
        assert metric in r.stderr


def test_cli_batch_of_prompts(smollm2_dir):
    r = run_cli("--checkpoint", str(smollm2_dir), "--prompt", "The capital of France is", "--prompt", "2 + 2 =",
                "--batch_size", "3", "--temperature", "0", "--max_new_tokens", "8", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("--- sequence") == 3


def assert_clean_error(r, *words):
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in r.stderr, r.stderr


def test_cli_missing_checkpoint(tmp_path):
    assert_clean_error(run_cli("--checkpoint", str(tmp_path / "nope"), "--device", "cpu"), "does not exist")


def test_cli_corrupt_weights(smollm2_dir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in smollm2_dir.iterdir():
        if f.name != "model.pth":
            (bad / f.name).write_bytes(f.read_bytes())
    (bad / "model.pth").write_bytes((smollm2_dir / "model.pth").read_bytes()[:1_000_000])  # truncated
    assert_clean_error(run_cli("--checkpoint", str(bad), "--device", "cpu"), "corrupt", "convert_hf_checkpoint")


def test_cli_unsupported_architecture(smollm2_dir, tmp_path):
    bad = tmp_path / "bias"
    bad.mkdir()
    cfg = json.loads((smollm2_dir / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(dict(cfg, attention_bias=True)))
    assert_clean_error(run_cli("--checkpoint", str(bad), "--device", "cpu"), "attention biases")


def test_cli_prompt_longer_than_context(smollm2_dir):
    assert_clean_error(run_cli("--prompt", "8200", "--max_new_tokens", "4", "--device", "cpu"),
                       "exceeds the model's context of 8192")


@pytest.mark.parametrize("flags,words", [
    (["--temperature", "-1"], ["--temperature"]),
    (["--top_p", "1.5"], ["--top_p"]),
    (["--max_new_tokens", "0"], ["--max_new_tokens"]),
    (["--device", "cuda"], ["no CUDA GPU"]),
    (["--dtype", "int3"], ["--dtype"]),
    (["--bogus"], ["unrecognized arguments"]),
])
def test_cli_nonsense_flags(flags, words):
    assert_clean_error(run_cli(*flags, timeout=60), *words)


def test_compiled_decode_compiles_one_block_per_kind_of_cache(monkeypatch):
    """generate.compiled_decode compiles each decoder block, but the blocks share their compiled code: one graph for
    the dense blocks and one for the SALS ones, whatever the depth (regional compilation); the compiled step
    decodes the same tokens as the eager one. (backend aot_eager: dynamo and autograd tracing without inductor's
    C++ compile, which would take minutes on a CPU.)"""
    import torch._dynamo
    from sals_attention import setup_sals
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_(fn, backend="aot_eager", **kw))
    n = 6
    torch.manual_seed(0)
    model = Transformer(ModelArgs.from_config(dict(model_type="llama", hidden_size=64, num_hidden_layers=n,
                                                   num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                                                   vocab_size=97, max_position_embeddings=512)))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    model.eval()
    gen = torch.Generator().manual_seed(0)
    calib = {"eigvecs": [torch.linalg.qr(torch.randn(32, 32, generator=gen))[0] for _ in range(n)]}
    cfg = SALSConfig(rank_fraction=0.5, value_bits=16, sparsity=0.5, sink=2, window=4, dense_layers=(0, n - 1))
    prompts = [torch.randint(0, 97, (40,), generator=gen).tolist(), torch.randint(0, 97, (25,), generator=gen).tolist()]

    def setup(B, S):
        setup_sals(model, B, S, cfg, calib)
    eager, _ = generate(model, prompts, 12, setup_caches=setup)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    make = generate_module.compiled_decode(model)
    compiled, _ = generate(model, prompts, 12, setup_caches=setup, decode_fn=make())
    assert compiled == eager
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2  # a dense block and a SALS block


def test_decode_step_without_host_sync_compiles_fullgraph():
    model = random_model()
    model.setup_caches(2, 64)
    tokens, pos = torch.randint(0, 97, (2, 1)), torch.tensor([[3], [7]])
    explanation = torch._dynamo.explain(decode_one_token)(model, tokens, pos, 0.0, None, None)
    assert explanation.graph_break_count == 0, explanation.break_reasons


# ---------------------------------------------------------------------------------------------
# --sals on the command line.

@pytest.fixture(scope="module")
def long_question(novel, tmp_path_factory):
    """~1500 tokens of a novel, then a question: the answer is decoded while SALS compresses and
    selects (budget 1/8 of ~1500 tokens = 16 sinks + 64 window + ~106 selected)."""
    passage = novel[300000:306000]
    path = tmp_path_factory.mktemp("prompt") / "question.txt"
    path.write_text(f"Here is a passage from a novel:\n\n{passage}\n\nNow answer this question: "
                    f"What is the capital of France?")
    return path


@pytest.mark.parametrize("preset,paper", [("0.25", False), ("0.125", False), ("0.25", True)])
def test_cli_sals_answers_paris_over_long_context(smollm2_dir, quick_calib, long_question, preset, paper):
    r = run_cli("--checkpoint", str(smollm2_dir), "--chat", "--prompt", f"@{long_question}", "--temperature", "0",
                "--device", "cpu", "--max_new_tokens", "12", "--sals", preset, "--sals_calib", str(quick_calib),
                *(["--sals_paper"] if paper else []))
    assert r.returncode == 0, r.stderr
    expect = "pre-rope ranking, layer selection" if paper else "bucket-rope ranking, kv-head selection"
    assert expect in r.stderr  # the default is the project's, --sals_paper the paper's
    if preset == "0.25":
        assert "Paris" in r.stdout
    else:  # SALS-12.5% need not answer right, but the CLI must run the same SALS as the library does
        from calibrate import load_calibration
        from sals_attention import setup_sals
        model, tok = load_model(smollm2_dir, "cpu", torch.float32), load_tokenizer(smollm2_dir)
        calib, cfg = load_calibration(quick_calib, model), SALSConfig.preset(0.125)
        prompt = tok.encode_prompt(long_question.read_text(), chat=True)
        out, _ = generate(model, [prompt], 12, temperature=0, stop_ids=tok.stop_ids,
                          setup_caches=lambda B, S: setup_sals(model, B, S, cfg, calib))
        assert r.stdout == tok.decode([t for t in out[0] if t not in tok.stop_ids]) + "\n"
    ratio = float(r.stderr.split("KV cache allocated: ")[1].split(", ")[1].split(" of a dense")[0])
    assert ratio < 0.5, r.stderr  # the cache really is the compressed one
    assert "SALS: rank" in r.stderr


def test_cli_sals_stays_dense_where_it_would_not_save_memory(smollm2_dir, quick_calib):
    """A short chat (prompt + new tokens under the minimum budget): SALS would attend every token with its key at full
    rank, in more memory than a dense cache, so the engine stays dense and says why; --sals_always uses SALS anyway,
    and its cache then really is larger than dense."""
    flags = ("--checkpoint", str(smollm2_dir), "--chat", "--prompt", "What is the capital of France?", "--temperature",
             "0", "--device", "cpu", "--max_new_tokens", "8", "--sals", "0.25", "--sals_calib", str(quick_calib))
    ratio = lambda r: float(r.stderr.split("KV cache allocated: ")[1].split(", ")[1].split(" of a dense")[0])  # noqa
    r, forced = run_cli(*flags), run_cli(*flags, "--sals_always")
    assert r.returncode == forced.returncode == 0, r.stderr + forced.stderr
    assert "SALS: staying dense: at " in r.stderr and "--sals_always" in r.stderr and ratio(r) == 1.0, r.stderr
    assert "staying dense" not in forced.stderr and ratio(forced) > 1.0, forced.stderr
    assert "Paris" in r.stdout and "Paris" in forced.stdout


def test_cli_sals_without_calibration_says_how_to_make_one(smollm2_dir, tmp_path):
    ckpt = tmp_path / "smol"
    ckpt.mkdir()
    for f in ("config.json", "model.pth", "tokenizer.json", "tokenizer_config.json"):
        (ckpt / f).symlink_to(smollm2_dir / f)
    assert_clean_error(run_cli("--checkpoint", str(ckpt), "--sals", "0.25", "--device", "cpu"), "python calibrate.py")


def test_cli_sals_refuses_calibration_of_another_model(smollm2_dir, quick_calib, tmp_path):
    other = torch.load(quick_calib, weights_only=False)
    other["model"]["k_weight_norms"] = [2 * x for x in other["model"]["k_weight_norms"]]
    torch.save(other, tmp_path / "other.pt")
    assert_clean_error(run_cli("--checkpoint", str(smollm2_dir), "--sals", "0.25", "--device", "cpu",
                               "--sals_calib", str(tmp_path / "other.pt")), "another model", "calibrate.py")


@pytest.mark.parametrize("flags,words", [
    (["--sals_rank", "8"], ["needs --sals"]),
    (["--sals", "0.3"], ["--sals"]),
    (["--sals", "0.25", "--sals_value_bits", "3"], ["value_bits 3"]),
    (["--sals", "0.25", "--sals_dense_layers", "0,x"], ["--sals_dense_layers"]),
    (["--sals", "0.25", "--sals_dense_layers", "0,99"], ["dense_layers"]),
    (["--sals", "0.25", "--sals_selection", "query-head"], ["--sals_selection"]),
    (["--sals_selection", "kv-head"], ["needs --sals"]),
])
def test_cli_sals_bad_flags(smollm2_dir, quick_calib, flags, words):
    assert_clean_error(run_cli("--checkpoint", str(smollm2_dir), "--sals_calib", str(quick_calib), "--device", "cpu",
                               *flags, timeout=120), *words)


def test_cache_memory_is_linear_in_context():
    """No S x S buffer: everything setup_caches allocates doubles when the context doubles."""
    cfg = dict(model_type="llama", hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=512, vocab_size=100, max_position_embeddings=1 << 17)
    with torch.device("meta"):
        model = Transformer(ModelArgs.from_config(cfg))

    def buffer_bytes(S):
        model.setup_caches(1, S)
        return sum(b.numel() * b.element_size() for b in model.buffers())
    assert buffer_bytes(1 << 17) == 2 * buffer_bytes(1 << 16)


def test_sals_on_gpu_follows_the_measured_rule():
    """SALS replaces the dense cache on a GPU where it was measured faster (SALS-12.5%'s rank and value bits, from 32K
    tokens at batch >= 8: BENCHMARKS.md) or where the dense cache would not fit in free memory; the bytes it compares
    are the dense cache's, computed here, at both shapes."""
    from generate import sals_on_gpu
    shape = dict(vocab_size=32000, dim=4096, n_layer=32, n_head=32, head_dim=128, intermediate_size=11008,
                 max_position_embeddings=32768)
    llama2, mistral = ModelArgs(n_kv_head=32, **shape), ModelArgs(n_kv_head=8, **shape)
    gb, big = 10 ** 9, 10 ** 15
    for a, kv_heads in ((llama2, 32), (mistral, 8)):
        D = kv_heads * 128
        c25, c12 = (SALSConfig.preset(f).resolve(a, D) for f in (0.25, 0.125))
        dense = 2 * 32 * 8 * 16384 * kv_heads * 128 * 2  # K and V, 32 layers, batch 8, 16K tokens, bf16
        for cfg in (c25, c12):
            use, why = sals_on_gpu(a, cfg, 8, 16384, int(dense / 0.9) + 1)
            assert not use and f"{dense / gb:.1f} GB" in why and "fits" in why
            use, why = sals_on_gpu(a, cfg, 8, 16384, int(dense / 0.9) - 1)
            assert use and "would not fit" in why
        assert sals_on_gpu(a, c12, 8, 32768, big)[0] and "measured faster" in sals_on_gpu(a, c12, 8, 32768, big)[1]
        assert not sals_on_gpu(a, c12, 7, 32768, big)[0] and not sals_on_gpu(a, c12, 8, 32767, big)[0]
        assert not sals_on_gpu(a, c25, 16, 32768, big)[0]  # SALS-25% was not measured faster end to end
