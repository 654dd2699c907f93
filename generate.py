"""Text generation: a CLI and an importable API (`generate`).

    python generate.py --chat --prompt "What is the capital of France?" --temperature 0

Prompts of different lengths share one batch: each is prefilled into its own cache row, then all
rows decode together, each at its own position, each stopping at its own end-of-sequence token.
Started by torchrun, each process holds one slice of the model (tensor parallelism, tp.py) and only rank 0 prints:

    torchrun --standalone --nproc_per_node 2 generate.py --prompt "The capital of France is" --tp 2
"""
import argparse
import re
import resource
import sys
import time
from pathlib import Path

DTYPE_NAMES = ("float32", "bfloat16", "float16")  # --dtype choices: model.DTYPES, named before torch is imported
# sals_attention's RANKINGS and SELECTIONS, named before torch is imported
SALS_RANKINGS = ("pre-rope", "bucket-rope")
SALS_SELECTIONS = ("layer", "kv-head")


# ---------------------------------------------------------------------------------------------
# Command line, parsed before torch is imported: a bad flag is refused in a fraction of a second.

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="converted checkpoint folder (default: SmolLM2-135M-Instruct, converted once into checkpoints/)")
    p.add_argument("--prompt", action="append", default=None,
                   help="text, @file, or an integer N for a synthetic prompt of N tokens; repeat for a batch of different prompts")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat format")
    p.add_argument("--max_new_tokens", type=int, default=200)
    p.add_argument("--batch_size", type=int, default=None, help="default: the number of prompts (prompts are cycled to fill it)")
    p.add_argument("--num_samples", type=int, default=1, help="generate this many times (the first warms up --compile)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 means greedy")
    p.add_argument("--top_k", type=int, default=200)
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--compile", action="store_true",
                   help="compile the decoder blocks (torch.compile) and replay each decode step from a CUDA graph")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if there is a GPU)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default=None,
                   help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--tp", type=int, default=None,
                   help="tensor-parallel ranks, checked against torchrun's process count (tp.py; default: that count)")
    s = p.add_argument_group("SALS compressed KV cache (see docs/sals.md)")
    s.add_argument("--sals", type=float, choices=[0.25, 0.125], default=None,
                   help="preset: latent rank D/4 with 4-bit values, or D/8 with 2-bit values; sparsity 1/8 with at "
                        "least 512 tokens attended, 16 sinks, 64-token window, three layers dense (the calibration's "
                        "lowest overlaps); one selection per KV head, ranked with RoPE's mean rotation per distance "
                        "bucket (EVAL.md)")
    s.add_argument("--sals_paper", action="store_true", default=None,
                   help="the paper's selection instead: one pre-RoPE ranking per layer, no minimum budget, "
                        "layers 0, 1 and last dense")
    s.add_argument("--sals_sparsity", type=float, help="attended share of the context, sinks and window included")
    s.add_argument("--sals_rank", type=int, help="latent rank r (overrides the preset's fraction)")
    s.add_argument("--sals_score_dims", type=int, help="latent coordinates used to rank tokens (default r/2)")
    s.add_argument("--sals_value_bits", type=int, help="2, 4, or 16 (unquantized)")
    s.add_argument("--sals_sink", type=int, help="first tokens always attended at full precision")
    s.add_argument("--sals_window", type=int, help="most recent tokens always attended at full precision")
    s.add_argument("--sals_dense_layers", type=str, help="comma-separated layer ids that keep a dense cache")
    s.add_argument("--sals_ranking", choices=SALS_RANKINGS,
                   help="how tokens are ranked: by the RoPE-free q.k (the paper), or with q rotated by RoPE's mean "
                        "rotation per distance bucket [64 2^i, 64 2^(i+1)) (default)")
    s.add_argument("--sals_selection", choices=SALS_SELECTIONS,
                   help="one top-k per layer, shared by its heads (the paper), or one per KV head, each ranking with "
                        "its own query heads (default)")
    s.add_argument("--sals_calib", type=Path, help="calibration file (default: <checkpoint>/sals_calib.pt)")
    s.add_argument("--sals_always", action="store_true", default=None,
                   help="use SALS even where a dense cache would allocate no more memory, or, on a GPU, where the "
                        "dense cache fits and SALS was not measured faster than it (by default the engine then stays "
                        "dense and says why; see sals_on_gpu)")
    args = p.parse_args(argv)
    problems = []
    if args.max_new_tokens < 1:
        problems.append("--max_new_tokens must be at least 1")
    if args.batch_size is not None and args.batch_size < 1:
        problems.append("--batch_size must be at least 1")
    if args.num_samples < 1:
        problems.append("--num_samples must be at least 1")
    if args.tp is not None and args.tp < 1:
        problems.append("--tp must be at least 1")
    if args.temperature < 0:
        problems.append("--temperature must be >= 0 (0 means greedy)")
    if args.top_k is not None and args.top_k < 1:
        problems.append("--top_k must be at least 1")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        problems.append("--top_p must be in (0, 1]")
    if args.device is not None and not re.fullmatch(r"cpu|cuda(:\d+)?", args.device):
        problems.append(f"--device {args.device!r} is not a device (try cpu or cuda)")
    overrides = [k for k, v in vars(args).items() if k.startswith("sals_") and v is not None]
    if overrides and args.sals is None:
        problems.append(f"--{overrides[0]} needs --sals 0.25 or --sals 0.125")
    if args.sals_dense_layers is not None:
        try:
            args.sals_dense_layers = tuple(int(x) for x in args.sals_dense_layers.split(",") if x.strip())
        except ValueError:
            problems.append(f"--sals_dense_layers {args.sals_dense_layers!r} is not a comma-separated list of layer ids")
    if problems:
        p.error("; ".join(problems))
    return args




if __name__ == "__main__":
    parse_args()  # exits on a bad flag before the heavy imports below

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from model import DTYPES, ModelArgs, Transformer, default_dtype, load_model  # noqa: E402
from sals_attention import SALSConfig  # noqa: E402
from tp import init_distributed, load_sharded, rank_zero_first  # noqa: E402

PREFILL_CHUNK = 2048  # long prompts are prefilled in chunks: attention memory stays linear


def filter_logits(logits: Tensor, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """logits (B, V) with -inf outside each row's top_k most likely tokens and outside the smallest set of most
    likely tokens whose probability reaches top_p (both when both are given, top_k first)."""
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        p = sorted_logits.softmax(-1)
        drop = p.cumsum(-1) - p >= top_p  # the mass before a token already reaches top_p: it is not needed
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, -float("inf")))
    return logits


def sample(logits: Tensor, temperature: float = 0.0, top_k: int | None = None,
           top_p: float | None = None) -> Tensor:
    """logits: (B, V) float32 -> next tokens (B,). temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
    # Exponential race instead of torch.multinomial: same distribution, no host sync.
    return (probs / torch.empty_like(probs).exponential_(1)).argmax(dim=-1)


def prefill(model: Transformer, ids: Tensor, rows: Tensor | None = None) -> Tensor:
    """Runs prompts of equal length ids (b, T) through cache rows `rows` (None: all rows), in chunks.
    Returns the last logits (b, V)."""
    T = ids.shape[1]
    for start in range(0, T, PREFILL_CHUNK):
        chunk = ids[:, start:start + PREFILL_CHUNK]
        pos = torch.arange(start, start + chunk.shape[1], device=ids.device).expand_as(chunk)
        if start + PREFILL_CHUNK < T:
            model.hidden(chunk, pos, rows)  # only the caches are wanted from all but the last chunk
        else:
            return model(chunk, pos, rows, last_only=True)[:, -1]


def decode_one_token(model: Transformer, tokens: Tensor, input_pos: Tensor, temperature: float,
                     top_k: int | None, top_p: float | None, blocks=None) -> Tensor:
    """tokens, input_pos: (B, 1) -> next tokens (B, 1); blocks: model.forward's."""
    logits = model(tokens, input_pos, blocks=blocks)  # (B, 1, V)
    return sample(logits[:, -1], temperature, top_k, top_p)[:, None]


def compiled_decode(model: Transformer):
    """The decode step with every decoder block compiled (torch.compile, fullgraph) and, on a GPU, the whole step
    replayed from one CUDA graph. Regional compilation: blocks share their compiled code (their parameters and
    caches are graph inputs), so compiling costs one block per kind of cache (dense, SALS) whatever the depth.
    Prefill stays eager: its chunk lengths vary and it reads positions on the host. Returns make() -> decode_fn;
    make a new one after every setup_caches (a graph holds the caches' addresses)."""
    torch._inductor.config.coordinate_descent_tuning = True
    torch._inductor.config.fx_graph_cache = True
    blocks = [torch.compile(layer, fullgraph=True) for layer in model.layers]

    def step(model, tokens, input_pos, temperature, top_k, top_p):
        return decode_one_token(model, tokens, input_pos, temperature, top_k, top_p, blocks)
    return (lambda: cuda_graph(step)) if model.output.weight.is_cuda else (lambda: step)


def cuda_graph(step):
    """step(model, tokens, input_pos, temperature, top_k, top_p) captured in a CUDA graph on its first call and
    replayed after: the kernels without their launch overhead. Inputs are copied into the graph's own."""
    graph, io = torch.cuda.CUDAGraph(), {}

    def replay(model, tokens, input_pos, temperature, top_k, top_p):
        if not io:
            io["in"] = tokens.clone(), input_pos.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # outside the capture: compilation, cuBLAS workspaces
                for _ in range(2):
                    step(model, *io["in"], temperature, top_k, top_p)
            stream = torch.cuda.current_stream()
            stream.wait_stream(side)
            try:  # torch.cuda.graph frees the cached memory first: its private pool may take all that is free
                with torch.cuda.graph(graph):
                    io["out"] = step(model, *io["in"], temperature, top_k, top_p)
            finally:  # a capture aborted (out of memory) can leave torch.cuda.graph's capture stream current
                torch.cuda.set_stream(stream)
        io["in"][0].copy_(tokens)
        io["in"][1].copy_(input_pos)
        graph.replay()
        return io["out"]
    return replay


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, *,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             stop_ids=(), on_token=None, decode_fn=decode_one_token, prefill_fn=prefill, setup_caches=None):
    """Generates up to max_new_tokens for each prompt (one cache row each).

    Returns (outputs, stats): outputs[i] is the list of new tokens of prompt i, up to and including
    its stop token; stats holds timings. on_token(row, token) is called as tokens are produced.
    setup_caches(B, S) allocates the caches (default: dense, model.setup_caches; SALS: see main).
    """
    device = model.output.weight.device
    B = len(prompts)
    max_len = max(len(p) for p in prompts)
    if min(len(p) for p in prompts) == 0:
        raise ValueError("empty prompt: give at least one token.")
    context = model.args.max_position_embeddings
    if max_len + max_new_tokens > context:
        raise ValueError(f"prompt of {max_len} tokens + {max_new_tokens} new tokens exceeds the model's "
                         f"context of {context} tokens; shorten the prompt or lower --max_new_tokens.")
    (setup_caches or model.setup_caches)(B, max_len + max_new_tokens)

    t0 = time.perf_counter()
    first = torch.cat([sample(prefill_fn(model, torch.tensor([p], device=device), torch.tensor([i], device=device)),
                              temperature, top_k, top_p) for i, p in enumerate(prompts)])  # (B,)
    synchronize(device)
    ttft = time.perf_counter() - t0

    stop = torch.tensor(sorted(stop_ids), device=device, dtype=torch.long)
    tokens = first[:, None]  # (B, 1)
    pos = torch.tensor([len(p) for p in prompts], device=device)[:, None]  # (B, 1)
    done = torch.isin(tokens[:, 0], stop)
    n_new = torch.ones(B, dtype=torch.long, device=device)  # tokens kept per row
    history = [tokens]
    if on_token:
        for i, t in enumerate(tokens[:, 0].tolist()):
            on_token(i, t)
    t1 = time.perf_counter()
    steps = 0
    for step in range(1, max_new_tokens):
        if on_token or step % 16 == 0:  # a host sync only when someone looks
            if bool(done.all()):
                break
        tokens = decode_fn(model, tokens, pos, temperature, top_k, top_p).clone()
        pos = pos + 1
        steps += 1
        n_new += ~done
        history.append(tokens)
        if on_token:
            for i, (t, d) in enumerate(zip(tokens[:, 0].tolist(), done.tolist())):
                if not d:
                    on_token(i, t)
        done = done | torch.isin(tokens[:, 0], stop)
    synchronize(device)
    decode_time = time.perf_counter() - t1

    all_tokens = torch.cat(history, dim=1).tolist()  # (B, steps + 1)
    outputs = [row[:n] for row, n in zip(all_tokens, n_new.tolist())]
    stats = {"ttft_s": ttft, "decode_s": decode_time, "decode_steps": steps,
             "new_tokens": sum(len(o) for o in outputs), "batch_size": B}
    return outputs, stats


def model_bytes_per_step(model: Transformer) -> int:
    """Weight bytes one decode step reads: every matrix, but only B rows of an untied embedding."""
    params = {id(p): p for p in model.parameters()}
    total = sum(p.numel() * p.element_size() for p in params.values())
    if not model.args.tie_word_embeddings:
        total -= model.tok_embeddings.weight.numel() * model.tok_embeddings.weight.element_size()
    return total


def kv_bytes_per_step(model: Transformer) -> int:
    return sum(layer.attention.kv_cache.bytes_read_per_step() for layer in model.layers)


def report(stats: dict, model: Transformer, device) -> str:
    steps, dt = stats["decode_steps"], stats["decode_s"]
    B = stats["batch_size"]
    lines = [f"time to first token: {stats['ttft_s'] * 1000:.1f} ms (prefill of {B} prompt(s))"]
    if steps > 0 and dt > 0:
        step_s = dt / steps
        bytes_step = model_bytes_per_step(model) + kv_bytes_per_step(model)
        lines += [f"decode: {steps} steps, {step_s * 1000:.2f} ms/step, {1 / step_s:.1f} tokens/s per "
                  f"sequence, {B / step_s:.1f} tokens/s total",
                  f"effective bandwidth: {bytes_step / step_s / 1e9:.1f} GB/s (weights "
                  f"{model_bytes_per_step(model) / 1e9:.2f} GB + KV cache read {kv_bytes_per_step(model) / 1e9:.3f} GB per step)"]
    a = model.args
    dense = 2 * a.n_layer * B * a.n_kv_head * model.max_seq_length * a.head_dim * model.output.weight.element_size()
    lines.append(f"KV cache allocated: {model.kv_cache_bytes() / 2**20:.1f} MiB, {model.kv_cache_bytes() / dense:.3f} "
                 f"of a dense cache at the same batch ({B}) and length ({model.max_seq_length})")
    if model.tp is not None:
        lines.append(f"tensor parallel over {model.tp.world} ranks: weights, KV cache, bandwidth and memory are one "
                     f"rank's")
    if torch.device(device).type == "cuda":
        lines.append(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 1e9:.2f} GB")
    else:
        lines.append(f"peak process memory (RSS): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GB")
    return "\n".join(lines)


def sals_setup(args, model: Transformer, default_model: bool):
    """setup_caches(B, S) for --sals: SALS caches built from the checkpoint's calibration."""
    from calibrate import default_path, load_calibration
    from sals_attention import cache_bytes, setup_sals
    names = ("sparsity", "rank", "score_dims", "value_bits", "sink", "window", "dense_layers", "ranking", "selection")
    overrides = {n: getattr(args, "sals_" + n) for n in names if getattr(args, "sals_" + n) is not None}
    cfg = SALSConfig.preset(args.sals, paper=bool(args.sals_paper), **overrides)
    world = 1 if model.tp is None else model.tp.world
    path = args.sals_calib or default_path(args.checkpoint, world)
    with rank_zero_first():  # under tensor parallelism, rank 0 calibrates and the others read its file
        if not path.exists() and default_model and args.sals_calib is None:
            import calibrate
            print(f"no calibration at {path}: calibrating the default model once (a few minutes on CPU)",
                  file=sys.stderr)
            tp = ["--tp", str(world)] if world > 1 else []
            if calibrate.main(["--checkpoint", str(args.checkpoint), "--device", str(model.output.weight.device)] + tp):
                raise ValueError("calibration of the default model failed (see above).")
    calib = load_calibration(path, model)
    resolved = setup_sals(model, 1, 1, cfg, calib)  # validates the config now, before any prompt runs
    print(f"SALS: rank {resolved.rank}, score dims {resolved.score_dims}, {resolved.value_bits}-bit values, "
          f"sparsity {resolved.sparsity:g}, {resolved.sink} sinks, window {resolved.window}, dense layers "
          f"{list(resolved.dense_layers)}, {resolved.ranking} ranking, {resolved.selection} selection",
          file=sys.stderr)
    on_gpu = torch.device(args.device).type == "cuda"

    def setup(B: int, S: int):
        dtype = model.output.weight.dtype
        sals, dense = cache_bytes(model.args, B, S, resolved, dtype), cache_bytes(model.args, B, S, None, dtype)
        if sals >= dense and not args.sals_always:
            print(f"SALS: staying dense: at {S} tokens a SALS cache would allocate {sals / 2**20:.1f} MiB and a dense "
                  f"one {dense / 2**20:.1f} MiB (below the minimum budget, {resolved.min_tokens} tokens, every token is "
                  f"attended with its key at full rank); --sals_always to use SALS anyway", file=sys.stderr)
            return model.setup_caches(B, S)
        if on_gpu and not args.sals_always:
            free = torch.cuda.mem_get_info(model.output.weight.device)[0]
            use, why = sals_on_gpu(model.args, resolved, B, S, free, model.output.weight.element_size())
            print(f"SALS: {why}" if use else f"SALS: staying dense: {why}; --sals_always to use SALS anyway",
                  file=sys.stderr)
            if not use:
                return model.setup_caches(B, S)
        return setup_sals(model, B, S, cfg, calib)
    return setup


# Where SALS's decode step was measured faster end to end than the engine's dense split-KV kernel (BENCHMARKS.md): a
# cache of rank <= D/8 with 2-bit values (SALS-12.5%) from this many tokens, at batch >= SALS_FASTER_BATCH.
SALS_FASTER_FROM, SALS_FASTER_BATCH = 32768, 8


def sals_on_gpu(a: ModelArgs, cfg: SALSConfig, B: int, S: int, free: int, elem_bytes: int = 2) -> tuple[bool, str]:
    """Whether SALS caches (resolved config cfg) should replace dense ones on a GPU with `free` bytes free, for B
    sequences of S tokens (dense elements of elem_bytes), and why: where SALS was measured faster than the dense kernel
    (SALS_FASTER_FROM), or when the dense cache would not fit in free GPU memory."""
    dense = 2 * a.n_layer * B * S * a.n_kv_head * a.head_dim * elem_bytes
    if dense > 0.9 * free:
        return True, f"a dense cache ({dense / 1e9:.1f} GB) would not fit in free GPU memory ({free / 1e9:.1f} GB)"
    if cfg.value_bits == 2 and 8 * cfg.rank <= a.n_kv_head * a.head_dim and S >= SALS_FASTER_FROM \
            and B >= SALS_FASTER_BATCH:
        return True, (f"SALS-12.5%'s decode step was measured faster than the dense kernel from {SALS_FASTER_FROM} "
                      f"tokens at batch >= {SALS_FASTER_BATCH} (BENCHMARKS.md)")
    return False, (f"the dense cache ({dense / 1e9:.1f} GB) fits, and SALS's decode step was measured faster than the "
                   f"dense kernel only with rank <= D/8 and 2-bit values from {SALS_FASTER_FROM} tokens at batch >= "
                   f"{SALS_FASTER_BATCH} (BENCHMARKS.md)")


def read_prompt(spec: str, tokenizer, chat: bool, vocab_size: int, gen: torch.Generator) -> list[int]:
    if spec.isdigit():  # a synthetic prompt of that many random tokens, for throughput runs
        return torch.randint(0, vocab_size, (int(spec),), generator=gen).tolist()
    if spec.startswith("@"):
        path = Path(spec[1:])
        if not path.is_file():
            raise FileNotFoundError(f"prompt file {path} not found")
        spec = path.read_text()
    return tokenizer.encode_prompt(spec, chat=chat)


class Streamer:
    """Prints the text of one sequence as its tokens arrive, holding back incomplete characters."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.printed = tokenizer, [], 0

    def __call__(self, row: int, token: int):
        if token in self.tokenizer.stop_ids:
            return
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if not text.endswith("\ufffd"):
            self.flush(text)

    def flush(self, text: str | None = None):
        """Prints what is not printed yet; at the end, a cut-off character too (as U+FFFD)."""
        text = self.tokenizer.decode(self.ids) if text is None else text
        print(text[self.printed:], end="", flush=True)
        self.printed = len(text)


def resolve_device(args):
    """args.device made concrete: the GPU if there is one; a GPU asked for where there is none is refused."""
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but no CUDA GPU is available; use --device cpu")


def main(argv=None):
    args = parse_args(argv)
    resolve_device(args)
    from tokenizer import load_tokenizer
    rank, world, device = init_distributed(torch.device(args.device), args.tp)
    default_model = args.checkpoint is None
    if default_model:
        from convert_hf_checkpoint import ensure_default_checkpoint
        with rank_zero_first():  # one download and conversion under torchrun
            args.checkpoint = ensure_default_checkpoint()
    torch.manual_seed(args.seed)
    t = time.perf_counter()
    dtype = DTYPES[args.dtype] if args.dtype else default_dtype(device)
    model = load_model(args.checkpoint, device, dtype) if world == 1 else load_sharded(args.checkpoint, rank, world,
                                                                                      device, dtype)
    tokenizer = load_tokenizer(args.checkpoint)
    print(f"loaded {args.checkpoint} in {time.perf_counter() - t:.1f} s", file=sys.stderr)

    setup_caches = sals_setup(args, model, default_model) if args.sals else None

    gen = torch.Generator().manual_seed(args.seed)
    specs = args.prompt or ["Hello, my name is"]
    prompts = [read_prompt(s, tokenizer, args.chat, model.args.vocab_size, gen) for s in specs]
    B = args.batch_size or len(prompts)
    prompts = [prompts[i % len(prompts)] for i in range(B)]

    make_decode = compiled_decode(model) if args.compile else (lambda: decode_one_token)
    for i in range(args.num_samples):
        stream = Streamer(tokenizer) if B == 1 else None
        outputs, stats = generate(model, prompts, args.max_new_tokens, temperature=args.temperature,
                                  top_k=args.top_k, top_p=args.top_p, stop_ids=tokenizer.stop_ids,
                                  on_token=stream, decode_fn=make_decode(), setup_caches=setup_caches)
        if stream is not None:
            stream.flush()
            print()
        else:
            for row, out in enumerate(outputs):
                text = tokenizer.decode([t for t in out if t not in tokenizer.stop_ids])
                print(f"--- sequence {row} ({len(out)} tokens) ---\n{text}")
        print(f"\n--- sample {i + 1}/{args.num_samples}" + (" (includes compilation)" if args.compile and i == 0 else ""),
              file=sys.stderr)
        print(report(stats, model, device), file=sys.stderr)


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and "out of memory" not in str(e).lower():
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
