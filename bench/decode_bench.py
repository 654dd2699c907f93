"""Decode throughput of the whole model with random weights of a named shape.

    python bench/decode_bench.py --shape llama-2-7b --prompt 4096 --batch 1 16 --compile

Decode only, as in ANCHORS.md: the cache is filled with random values as if a prompt of the given
length had been prefilled (the cost of a decode step does not depend on what the cache holds, but
zeros can run faster than real data), then `--steps` tokens are decoded and timed.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from generate import compiled_decode, decode_one_token, kv_bytes_per_step, model_bytes_per_step  # noqa: E402
import model as model_module  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402

SHAPES = {  # Hugging Face config.json fields of each model
    "llama-2-7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                       intermediate_size=11008, vocab_size=32000, rope_theta=10000.0),
    "mistral-7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       intermediate_size=14336, vocab_size=32000, rope_theta=1000000.0),
    "llama-3-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       intermediate_size=14336, vocab_size=128256, rope_theta=500000.0),
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=256, vocab_size=1000, rope_theta=10000.0),  # a smoke test on CPU
}


def random_model(shape: str, device, dtype) -> Transformer:
    cfg = dict(SHAPES[shape], model_type="llama", max_position_embeddings=1 << 20)
    with torch.device("meta"):
        model = Transformer(ModelArgs.from_config(cfg))
    model = model.to_empty(device=device).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model.eval()


def attend_matmul(q, k, v, mask):
    """Experiment: model.attend as two batched matmuls and a softmax, for inductor to fuse."""
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    q = q.reshape(B, Hkv, H // Hkv * T, D)
    s = (q @ k.transpose(-1, -2)).float() * D ** -0.5  # (B, Hkv, G*T, S)
    s = s.view(B, Hkv, H // Hkv, T, S).masked_fill(~mask[:, None, None], -float("inf"))
    p = s.softmax(-1).to(v.dtype).view(B, Hkv, H // Hkv * T, S)
    return (p @ v).view(B, H, T, D)


def fill_caches(model: Transformer):
    with torch.no_grad():
        for buf in model.buffers():
            if buf.is_floating_point() and buf.dim() == 4:  # the (B, Hkv, S, D) caches
                buf.normal_()


@torch.no_grad()
def time_decode(model, batch: int, prompt: int, steps: int, decode_fn) -> float:
    """Seconds per decode step, median of three timed runs of `steps` steps."""
    device = model.output.weight.device
    model.setup_caches(batch, prompt + steps)
    fill_caches(model)
    tokens = torch.randint(0, model.args.vocab_size, (batch, 1), device=device)
    times = []
    for run in range(4):  # run 0 warms up (compilation, CUDA graph capture)
        pos = torch.full((batch, 1), prompt, device=device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(steps if run else 3):
            tokens = decode_fn(model, tokens, pos, 0.0, None, None).clone()
            pos = pos + 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        if run:
            times.append((time.perf_counter() - t) / steps)
        else:
            print(f"  batch {batch}, prompt {prompt}: warm-up (compile, graph capture) {time.perf_counter() - t:.1f} s",
                  file=sys.stderr, flush=True)
    return sorted(times)[1]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), nargs="+", default=["llama-2-7b"])
    p.add_argument("--prompt", type=int, nargs="+", default=[4096])
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--steps", type=int, default=127)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--attn", choices=["sdpa", "matmul"], default="sdpa",
                   help="dense decode attention: model.attend (torch SDPA), or the matmul experiment")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16")
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.attn == "matmul":
        model_module.attend = attend_matmul
    decode_fn = decode_one_token
    if args.compile:
        decode_fn = compiled_decode()

    rows = []
    for shape in args.shape:
        model = random_model(shape, device, dtype)
        for prompt in args.prompt:
            for batch in args.batch:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                try:
                    step = time_decode(model, batch, prompt, args.steps, decode_fn)
                except torch.OutOfMemoryError:
                    rows.append(f"| {shape} | {prompt} | {batch} | out of memory | | | |")
                    model.setup_caches(1, 1)
                    continue
                gbytes = (model_bytes_per_step(model) + kv_bytes_per_step(model)) / 1e9
                mem = torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else float("nan")
                rows.append(f"| {shape} | {prompt} | {batch} | {step * 1e3:.2f} | {batch / step:.1f} | "
                            f"{gbytes / step / 1e3:.2f} TB/s | {mem:.1f} GB |")
                print(rows[-1], flush=True)
        del model
    print(f"\n{torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}, "
          f"compile={args.compile}, attention={args.attn}, {args.steps} steps")
    print("| shape | prompt | batch | ms / step | tokens/s (all sequences) | effective bandwidth | peak memory |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
