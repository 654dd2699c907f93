"""Decode throughput of the whole model with random weights of a named shape: dense and SALS caches.

    python bench/decode_bench.py --shape llama-2-7b --prompt 4096 --batch 1 16 --compile
    python bench/decode_bench.py --shape mistral-7b --prompt 4096 32768 --batch 8 --method dense sals-12.5 --graph
    python bench/decode_bench.py --shape llama-2-7b --prompt 32768 --method dense sals-12.5 --max_batch --graph

Decode only, as gpt-fast's numbers are measured: every cache buffer is filled with random values as if a prompt of the
given length had been prefilled (the cost of a step does not depend on what the cache holds, but zeros
can run faster than real data), then `--steps` tokens are decoded and timed. SALS caches get a random
orthonormal basis per layer instead of a calibration and a full window ring, so that each step attends
its whole budget. `--graph` captures the eager step in one CUDA graph (seconds to set up; `--compile`
takes minutes per shape and batch on a 7B model). `--max_batch` finds, for each prompt and method,
the largest batch whose weights, caches and decode step fit on the GPU, and times that batch.

Started by torchrun, each process holds one tensor-parallel slice of the model (tp.py; the shape cell then reads
"mistral-7b (tp 4)", and memory, KV and bandwidth columns are one rank's); only rank 0 prints (bench/gpu_tp.sh).
"""
import argparse
import gc
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from generate import compiled_decode, cuda_graph, decode_one_token, kv_bytes_per_step, model_bytes_per_step  # noqa: E402
from kernels.timing import copy_ceiling  # noqa: E402
from model import KVCache, ModelArgs, Transformer  # noqa: E402
from sals_attention import SALSCache, SALSConfig, setup_sals  # noqa: E402
from tp import init_distributed, shard_model  # noqa: E402

SHAPES = {  # Hugging Face config.json fields of each model
    "llama-2-7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                       intermediate_size=11008, vocab_size=32000, rope_theta=10000.0),
    "mistral-7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       intermediate_size=14336, vocab_size=32000, rope_theta=1000000.0),
    "llama-3-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       intermediate_size=14336, vocab_size=128256, rope_theta=500000.0),
    "tiny": dict(hidden_size=128, num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=256, vocab_size=1000, rope_theta=10000.0),  # CPU smoke tests; SALS in layers 2, 3
}
WARMUP = 3  # untimed steps before the timed runs (the first compiles or captures)
# name -> SALSConfig.preset fraction; dense: the split-KV kernel on a GPU, dense-masked: the masked SDPA path (the
# engine's CPU path and its GPU path before the kernel), timed so that the ratio is to the faster of the two
METHODS = {"dense": None, "dense-masked": None, "sals-25": 0.25, "sals-12.5": 0.125}


def random_model(shape: str, device, dtype, rank: int = 0, world: int = 1) -> Transformer:
    """Random weights of a named shape; world > 1: only rank's tensor-parallel slice is ever allocated."""
    cfg = dict(SHAPES[shape], model_type="llama", max_position_embeddings=1 << 20)
    with torch.device("meta"):
        model = Transformer(ModelArgs.from_config(cfg))
    if world > 1:
        shard_model(model, rank, world)
    model = model.to_empty(device=device).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Caches: allocation and a synthetic prefill.

def synthetic_calibration(model: Transformer, cfg: SALSConfig) -> dict:
    """What setup_sals reads of a calibration: per layer an orthonormal (D, rank) basis, random (which
    basis it is does not change the cost of a step), in the model's dtype on its device."""
    a, w = model.args, model.output.weight
    D = a.n_kv_head * a.head_dim
    r = cfg.resolve(a, D).rank
    return {"eigvecs": [torch.linalg.qr(torch.randn(D, r, device=w.device))[0].to(w.dtype) for _ in range(a.n_layer)]}


def cache_setup(model: Transformer, method: str):
    """setup(B, S) that allocates `method`'s caches: dense, or SALS with a synthetic calibration (built once)."""
    if method == "dense-masked":
        a = model.args
        return lambda B, S: model.setup_caches(B, S, lambda i, args, B, S, dtype: KVCache(
            B, S, a.n_kv_head, a.head_dim, dtype, fused=False))
    if METHODS[method] is None:
        return model.setup_caches
    cfg = SALSConfig.preset(METHODS[method])
    calib = synthetic_calibration(model, cfg)
    return lambda B, S: setup_sals(model, B, S, cfg, calib)


def fill_sals(cache: SALSCache, prompt: int):
    """Every buffer of a SALS cache as if positions 0..prompt-1 had been written: random latents, full-precision
    sinks and window, packed values (random bytes) with small positive scales and zeros, and the window ring
    holding positions prompt-W..prompt-1 in their slots (pos - sink) % W, as SALSCache.write leaves them."""
    for name, t in cache.named_buffers():
        if name in ("U", "inv_freq", "n_attend"):  # the basis, RoPE frequencies and budgets are set at allocation
            continue
        if name == "window_pos":
            pos = torch.arange(max(cache.n_sink, prompt - cache.window), prompt, device=t.device)
            t.fill_(-1)
            t[:, (pos - cache.n_sink) % cache.window] = pos.to(t.dtype)
        elif name in ("v_scale", "v_zero"):
            t.uniform_(0.01, 0.1)
        elif t.dtype == torch.uint8:
            t.random_(0, 256)
        else:
            t.normal_()


@torch.no_grad()
def fill_caches(model: Transformer, prompt: int):
    for layer in model.layers:
        cache = layer.attention.kv_cache
        if isinstance(cache, SALSCache):
            fill_sals(cache, prompt)
        else:
            cache.k_cache.normal_()
            cache.v_cache.normal_()


def release_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def is_oom(e: BaseException) -> bool:
    """An out-of-memory error, also when it surfaces as another error (a CUDA graph capture it aborted, a cuBLAS
    workspace it denied)."""
    while e is not None:
        if isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower() or "ALLOC_FAILED" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


# ---------------------------------------------------------------------------------------------
# Timing.

@torch.no_grad()
def time_decode(model, batch: int, prompt: int, steps: int, decode_fn, setup=None, runs: int = 3) -> float | None:
    """Seconds per decode step at positions prompt.., median of `runs` timed runs of `steps` steps after a
    warm-up (compilation, graph capture); runs=0 only allocates and warms up (does it fit?) and returns None.
    setup(B, S) allocates the caches (default: dense)."""
    device = model.output.weight.device
    (setup or model.setup_caches)(batch, prompt + max(steps, WARMUP))
    fill_caches(model, prompt)
    tokens = torch.randint(0, model.args.vocab_size, (batch, 1), device=device)
    times = []
    for run in range(runs + 1):
        pos = torch.full((batch, 1), prompt, device=device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(steps if run else WARMUP):
            tokens = decode_fn(model, tokens, pos, 0.0, None, None).clone()
            pos = pos + 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        if run:
            times.append((time.perf_counter() - t) / steps)
        else:
            print(f"  batch {batch}, prompt {prompt}: warm-up (compile, graph capture) {time.perf_counter() - t:.1f} s",
                  file=sys.stderr, flush=True)
    return sorted(times)[len(times) // 2] if times else None


def largest_batch(fits, limit: int, guess: int = 1) -> int:
    """The largest batch in 1..limit with fits(batch), for a fits that holds up to some batch and not above it
    (0 when fits(1) is false). From guess, steps of 1, 2, 4, ... up while it fits (down while it does not), then
    bisection: from guess 1, doubling; 2 log2(distance to the answer) + 2 calls, none outside 1..limit."""
    lo = hi = min(max(guess, 1), limit)  # fits(lo) holds (0 trivially), fits(hi) does not (limit + 1: unknown)
    step = 1
    if fits(lo):
        while lo + step <= limit and fits(lo + step):
            lo, step = lo + step, 2 * step
        hi = min(lo + step, limit + 1)
    else:
        while hi - step >= 1 and not fits(hi - step):
            hi, step = hi - step, 2 * step
        lo = max(hi - step, 0)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def measure(model, setup, batch: int, prompt: int, steps: int, make_decode, runs: int = 3) -> dict | None:
    """Times one batch (runs=0: allocates and warms up only). Returns step time and memory, None when it does not
    fit on the GPU; frees the caches either way."""
    cuda = model.output.weight.is_cuda
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        step = time_decode(model, batch, prompt, steps, make_decode(), setup, runs)
        result = dict(step=step, kv=model.kv_cache_bytes(), read=model_bytes_per_step(model) + kv_bytes_per_step(model),
                      peak=torch.cuda.max_memory_allocated() if cuda else None)
    except Exception as e:
        if not is_oom(e):
            raise
        result = None
    model.setup_caches(1, 1)  # frees the caches
    release_memory()
    return result


def search_batch(model, setup, prompt: int, args, make_decode) -> int:
    """The largest batch (up to args.max_batch_limit) whose caches and warmed-up step fit. The search starts
    from free memory / one sequence's cache, a little high (the step's activations): each try compiles new
    kernel variants, so a start close to the answer saves most of the time."""
    fits = lambda b: measure(model, setup, b, prompt, args.steps, make_decode, runs=0)  # noqa: E731
    one = fits(1)
    guess = int(torch.cuda.mem_get_info()[0] // one["kv"]) if one and model.output.weight.is_cuda else 1
    batch = largest_batch(lambda b: fits(b) is not None, args.max_batch_limit, guess)
    print(f"  prompt {prompt}: largest batch {batch} (first guess {guess})", file=sys.stderr, flush=True)
    return batch


# ---------------------------------------------------------------------------------------------
# The table.

HEADER = ("| shape | prompt | method | batch | ms / step | tokens/s (all sequences) | speed-up vs fastest dense, same batch | "
          "tokens/s vs best dense at its largest batch | KV cache allocated | effective bandwidth (of the copy ceiling) | "
          "peak GPU memory |\n"
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")


def vs_dense(r: dict, results: list[dict]) -> tuple[str, str]:
    """Row r against the fastest dense row of the same run (the kernel or the masked path): step-time ratio at the
    same batch, and (largest-batch rows) tokens/s ratio to the best dense tokens/s at dense's own largest batch."""
    dense = [d for d in results if METHODS[d["method"]] is None and (d["shape"], d["prompt"]) == (r["shape"], r["prompt"])]
    same = [d for d in dense if d["batch"] == r["batch"] and d["step"]]
    dense_max = [d for d in dense if d["largest"] and d["step"]]
    if same:
        best = min(same, key=lambda d: d["step"])
        speedup = f"{best['step'] / r['step']:.2f}x ({best['method']})"
    elif dense:
        speedup = "n/a (dense OOM)"
    else:
        speedup = "n/a (no dense run)"
    if not r["largest"]:
        return speedup, ""
    if not dense_max:
        return speedup, "n/a (no dense run or dense OOM)"
    d = max(dense_max, key=lambda d: d["batch"] / d["step"])
    return speedup, f"{r['batch'] / r['step'] / (d['batch'] / d['step']):.2f}x ({d['method']}: batch {d['batch']})"


def format_row(r: dict, results: list[dict], ceiling: float | None) -> str:
    """One table row; ceiling: the copy ceiling in bytes/s measured in this run (None on the CPU). The bytes a step
    reads (weights and KV cache) over the step time is its effective bandwidth; over the ceiling, its roofline
    fraction."""
    batch = (f"{r['batch']} (largest)" if r["batch"] else "none fits") if r["largest"] else str(r["batch"])
    head = f"| {r['shape']} | {r['prompt']} | {r['method']} | {batch} |"
    if r["step"] is None:
        return head + " out of memory |" + " |" * 6
    speedup, vs_max = vs_dense(r, results)
    peak = "n/a (cpu)" if r["peak"] is None else f"{r['peak'] / 1e9:.1f} GB"
    rate = r["read"] / r["step"]
    roof = f"{rate / ceiling:.0%}" if ceiling else "no ceiling on cpu"
    return (head + f" {r['step'] * 1e3:.2f} | {r['batch'] / r['step']:.1f} | {speedup} | {vs_max} | "
            f"{r['kv'] / 1e9:.3g} GB | {rate / 1e12:.3g} TB/s ({roof}) | {peak} |")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), nargs="+", default=["llama-2-7b"])
    p.add_argument("--prompt", type=int, nargs="+", default=[4096])
    p.add_argument("--batch", type=int, nargs="+", default=None, help="default 1; not with --max_batch")
    p.add_argument("--method", choices=list(METHODS), nargs="+", default=["dense"],
                   help="dense bf16 cache (through the split-KV kernel on a GPU, or the masked SDPA path), or SALS-25%% / "
                        "SALS-12.5%% (sals_attention.py presets: the default selection)")
    p.add_argument("--max_batch", action="store_true",
                   help="for each shape, prompt and method, time the largest batch that fits on the GPU (run one "
                        "method per process: a capture that fails near the memory limit can stall the next one)")
    p.add_argument("--max_batch_limit", type=int, default=1024, help="the largest batch --max_batch tries")
    p.add_argument("--steps", type=int, default=127)
    how = p.add_mutually_exclusive_group()
    how.add_argument("--compile", action="store_true", help="torch.compile the step (minutes per shape and batch)")
    how.add_argument("--graph", action="store_true", help="capture the eager step in a CUDA graph (GPU only)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    args = p.parse_args(argv)
    given = dict(prompt=args.prompt, batch=args.batch or [1], steps=[args.steps],
                 max_batch_limit=[args.max_batch_limit])
    problems = [f"--{name} must be at least 1 (got {min(v)})" for name, v in given.items() if min(v) < 1]
    if args.max_batch and args.batch:
        problems.append("--max_batch searches the batch itself: leave out --batch")
    if args.max_batch and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        problems.append("--max_batch is single-GPU only: under torchrun a rank out of memory alone would leave the "
                        "others waiting in an all-reduce; time fixed --batch sizes")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        problems.append(f"--device {args.device}: no CUDA GPU is available; use --device cpu")
    if problems:
        p.error("; ".join(problems))
    args.batch = args.batch or [1]
    args.method = sorted(set(args.method), key=list(METHODS).index)  # dense first: the other rows compare to it
    return args


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = init_distributed(torch.device(args.device))
    dtype = getattr(torch, args.dtype)
    make_decode, mode = (lambda: decode_one_token), "eager"  # make_decode() -> a decode_fn for one cache allocation
    if args.compile:
        make_decode, mode = None, "compiled blocks + CUDA graph"  # compiled_decode(model), per model below
    elif args.graph and device.type == "cuda":
        make_decode, mode = (lambda: cuda_graph(decode_one_token)), "CUDA graph"
    elif args.graph:
        print("note: --graph needs a GPU; timing the eager step", file=sys.stderr)

    ceiling = copy_ceiling() if device.type == "cuda" else None  # measured here, before any model is allocated
    release_memory()  # the copy's 4 GiB, which the batch search would otherwise count as taken
    torch.manual_seed(0)
    results = []
    labels = [shape if world == 1 else f"{shape} (tp {world})" for shape in args.shape]
    for shape, label in zip(args.shape, labels):
        model = random_model(shape, device, dtype, rank, world)
        release_memory()  # the float32 copies of the weights that random_model cast
        make = compiled_decode(model) if args.compile else make_decode
        for method in args.method:
            setup = cache_setup(model, method)
            for prompt in args.prompt:
                batches = [search_batch(model, setup, prompt, args, make)] if args.max_batch else args.batch
                for batch in batches:
                    m = measure(model, setup, batch, prompt, args.steps, make) if batch else None
                    results.append(dict(shape=label, prompt=prompt, method=method, batch=batch,
                                        largest=args.max_batch, **(m or dict(step=None))))
                    print(format_row(results[-1], results, ceiling), flush=True)
            del setup
        del model
        release_memory()
    order = lambda r: (labels.index(r["shape"]), r["prompt"], 0 if r["largest"] else r["batch"],  # noqa: E731
                       args.method.index(r["method"]))
    print(f"\n{torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}, "
          f"{mode}, {args.steps} steps, median of 3 runs"
          + (f", copy ceiling {ceiling / 1e12:.2f} TB/s (measured)" if ceiling else "")
          + (f", tensor parallel over {world} ranks (KV, bandwidth, memory: one rank's)" if world > 1 else ""))
    print(HEADER)
    print("\n".join(format_row(r, results, ceiling) for r in sorted(results, key=order)))


if __name__ == "__main__":
    main()
