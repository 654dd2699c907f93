"""Prefill of one long prompt through the whole model with random weights of a named shape, chunked as generate.py
prefills it: time, its compute roofline, and the memory it takes beyond the weights and the cache.

    python bench/prefill_bench.py --shape llama-3-8b --prompt 8192 32768 131072
    python bench/prefill_bench.py --shape tiny --prompt 512 4096 --device cpu --dtype float32   # a smoke test

Each chunk of generate.PREFILL_CHUNK tokens attends causally to itself and to its row's cached prefix only (no mask
over the whole cache), so the memory a prefill needs beyond its cache should not grow with the prompt: the
"transient" column (peak allocated during the prefill minus what weights and cache hold) is that claim, measured.
The roofline is compute: the matmul FLOPs (2 x parameters x tokens, the vocabulary projection of the last token
only) plus causal attention (4 x layers x heads x head_dim x T(T+1)/2) over the bf16 matmul rate measured in the same
run. SALS caches (synthetic calibration, as bench/decode_bench.py builds them) can be timed too: their chunks read
the older tokens through the compressed cache.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.decode_bench import METHODS, SHAPES, cache_setup, is_oom, random_model, release_memory  # noqa: E402
from generate import PREFILL_CHUNK, prefill  # noqa: E402
from kernels.timing import matmul_rate  # noqa: E402

HEADER = ("| shape | method | prompt | prefill s | tokens/s | TFLOP/s | compute floor s (of the matmul rate) | "
          "KV cache | transient memory |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |")


def prefill_flops(model, T: int) -> float:
    """Matmul FLOPs of a T-token prefill: the blocks' weights for every token, the vocabulary projection for the
    last one (generate.prefill asks for no other logits), and causal attention, QK^T and PV."""
    a = model.args
    block = sum(p.numel() for n, p in model.layers.named_parameters() if p.dim() == 2)
    return 2 * block * T + 2 * model.output.weight.numel() + 4 * a.n_layer * a.n_head * a.head_dim * T * (T + 1) / 2


def attention_kernels(model, ids) -> list[str]:
    """The GPU kernels whose names say attention (flash, fmha, cudnn, ...) in a two-chunk prefill: which SDPA backend
    the chunks actually ran."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        prefill(model, ids[:, :2 * PREFILL_CHUNK])
        torch.cuda.synchronize()
    words = ("flash", "fmha", "attention", "cudnn", "sdpa", "efficient")
    return sorted({e.key[:80] for e in prof.key_averages() if any(w in e.key.lower() for w in words)})


@torch.no_grad()
def time_prefill(model, setup, T: int) -> dict | None:
    """One prompt of T random tokens, prefilled after a two-chunk warm-up; None when it does not fit."""
    device = model.output.weight.device
    cuda = device.type == "cuda"
    try:
        setup(1, T + 1)
        ids = torch.randint(0, model.args.vocab_size, (1, T), device=device)
        prefill(model, ids[:, :2 * PREFILL_CHUNK])  # warm-up: cuBLAS and attention kernels chosen, workspaces allocated
        if cuda:
            print(f"  prompt {T}: attention kernels {attention_kernels(model, ids)}", file=sys.stderr, flush=True)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        held = torch.cuda.memory_allocated() if cuda else None
        t = time.perf_counter()
        logits = prefill(model, ids)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t
        assert torch.isfinite(logits).all(), "the prefill's logits are not finite"
        result = dict(seconds=seconds, kv=model.kv_cache_bytes(),
                      transient=torch.cuda.max_memory_allocated() - held if cuda else None)
    except Exception as e:
        if not is_oom(e):
            raise
        result = None
    model.setup_caches(1, 1)
    release_memory()
    return result


def format_row(shape: str, method: str, T: int, r: dict | None, flops: float, rate: float | None) -> str:
    head = f"| {shape} | {method} | {T} |"
    if r is None:
        return head + " out of memory |" + " |" * 5
    floor = f"{flops / rate:.2f} ({flops / rate / r['seconds']:.0%})" if rate else "no rate on cpu"
    transient = "n/a (cpu)" if r["transient"] is None else f"{r['transient'] / 2 ** 30:.2f} GiB"
    return (head + f" {r['seconds']:.2f} | {T / r['seconds']:.0f} | {flops / r['seconds'] / 1e12:.1f} | {floor} | "
            f"{r['kv'] / 2 ** 30:.2f} GiB | {transient} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", nargs="+", default=["llama-3-8b"], choices=sorted(SHAPES))
    p.add_argument("--prompt", nargs="+", type=int, default=[8192, 32768, 131072])
    p.add_argument("--method", nargs="+", default=["dense"], choices=[m for m in METHODS if m != "dense-masked"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    rate = matmul_rate() if device.type == "cuda" else None  # measured here, in the same process
    release_memory()
    torch.manual_seed(0)
    rows = []
    for shape in args.shape:
        model = random_model(shape, device, dtype)
        release_memory()
        for method in args.method:
            setup = cache_setup(model, method)
            for T in args.prompt:
                rows.append(format_row(shape, method, T, time_prefill(model, setup, T), prefill_flops(model, T), rate))
                print(rows[-1], flush=True)
        del model
        release_memory()
    print(f"\n{torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}, batch 1, "
          f"chunks of {PREFILL_CHUNK} tokens" + (f", bf16 matmul rate {rate / 1e12:.0f} TFLOP/s (measured)" if rate else ""))
    print(HEADER)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
