"""The dense cache: model.KVCache's prefill (SDPA over a view of the row's prefix) against float64 brute force, and the
split-KV decode kernel (kernels/decode_attention.py) against float64 PyTorch under Triton's CPU interpreter.

The kernel checks (check_*) run in a child pytest with TRITON_INTERPRET=1 (conftest.run_interpreted), so the parent
never imports Triton. Kernel outputs and partials are poisoned with NaN before each launch. float32 is compared at
1e-5 relative (the kernel and the reference differ in summation order only); float16 at 2e-3 (two half-precision
units: the kernel rounds the probabilities to 16 bits for the second product, as flash kernels do, and rounds its
output). bfloat16 is not run here: Triton's interpreter holds it as raw integers; the GPU micro-benchmark
(python -m kernels.decode_attention) checks it against SDPA flash.
"""
import math
import os

import pytest
import torch

from conftest import run_interpreted
from model import KVCache, ModelArgs, Transformer, apply_rope, rope_table

CHILD = os.environ.get("SALS_KERNEL_TESTS") == "child"


def test_decode_kernel_in_triton_interpreter():
    """Runs the check_* functions below (collected as tests in the child) under TRITON_INTERPRET=1."""
    run_interpreted(__file__, N_CHILD_TESTS)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: a second thread only adds synchronisation
    yield
    torch.set_num_threads(n)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


# ---------------------------------------------------------------------------------------------
# Prefill (parent process, no Triton).

class Shadow:
    """A KVCache under test and, beside it, the float64 truth: every token's post-RoPE key and value written so far,
    and the output of brute-force attention for any query (all slots up to its position, nothing else)."""

    def __init__(self, B: int, S: int, H: int, Hkv: int, D: int, seed: int):
        self.args = ModelArgs(vocab_size=8, dim=H * D, n_layer=1, n_head=H, n_kv_head=Hkv, head_dim=D,
                              intermediate_size=8, rope_base=500.0, max_position_embeddings=S)
        self.rope = rope_table(self.args, S)
        self.cache = KVCache(B, S, Hkv, D, torch.float32, fused=False)
        self.k = torch.zeros(B, Hkv, S, D, dtype=torch.float64)
        self.v = torch.zeros_like(self.k)
        self.gen = torch.Generator().manual_seed(seed)
        self.H, self.Hkv, self.D = H, Hkv, D

    def step(self, input_pos: torch.Tensor, rows: torch.Tensor | None = None, poison_past: bool = True):
        """One call of the cache with random q, k, v at input_pos (b, T) of rows (b,); returns (output, float64
        brute force). poison_past: the slots past the chunk are NaN during the call (a prefill must not read them)."""
        b, T = input_pos.shape
        q = torch.randn(b, self.H, T, self.D, generator=self.gen)
        k = torch.randn(b, self.Hkv, T, self.D, generator=self.gen)
        v = torch.randn(b, self.Hkv, T, self.D, generator=self.gen)
        rope = self.rope[input_pos]
        r = torch.arange(b) if rows is None else rows
        saved = self.cache.k_cache.clone(), self.cache.v_cache.clone()
        if poison_past:
            end = int(input_pos.max()) + 1
            self.cache.k_cache[r, :, end:] = math.nan
            self.cache.v_cache[r, :, end:] = math.nan
        out = self.cache(q, k, v, input_pos, rope, rows)
        if poison_past:  # the poison gone again, the new tokens kept
            written = torch.zeros(self.cache.k_cache.shape[0], self.cache.k_cache.shape[2], dtype=torch.bool)
            written[r[:, None], input_pos] = True
            keep = ~written[:, None, :, None]
            self.cache.k_cache.copy_(torch.where(keep, saved[0], self.cache.k_cache))
            self.cache.v_cache.copy_(torch.where(keep, saved[1], self.cache.v_cache))
        self.k[r[:, None], :, input_pos] = apply_rope(k, rope).double().transpose(1, 2)
        self.v[r[:, None], :, input_pos] = v.double().transpose(1, 2)
        return out, self.brute_force(apply_rope(q, rope).double(), input_pos, r)

    def brute_force(self, q: torch.Tensor, input_pos: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """(b, H, T, D) float64: query t of row r[i] over the true keys and values 0 .. input_pos[i, t]."""
        G = self.H // self.Hkv
        k, v = self.k[r].repeat_interleave(G, 1), self.v[r].repeat_interleave(G, 1)  # (b, H, S, D)
        s = q @ k.transpose(-1, -2) / math.sqrt(self.D)  # (b, H, T, S)
        s = s.masked_fill(torch.arange(k.shape[2]) > input_pos[:, None, :, None], -math.inf)
        return s.softmax(-1) @ v


def positions(start: int, T: int, b: int = 1) -> torch.Tensor:
    return torch.arange(start, start + T).expand(b, T)


@pytest.mark.parametrize("H,Hkv,D", [(9, 3, 64), (8, 2, 128), (4, 4, 64)])
@pytest.mark.parametrize("chunks", [[96], [40, 56], [1, 63, 32], [17, 17, 17, 45]])
def test_chunked_prefill_equals_brute_force(H, Hkv, D, chunks):
    """One row prefilled in chunks (a chunk of one token is a decode step, on the masked reference path) gives, chunk
    by chunk, float64 brute-force causal attention over everything written before (1e-5), whatever the chunk
    boundaries; the slots past each chunk are NaN during its call, so a prefill that read them would fail."""
    c = Shadow(2, 128, H, Hkv, D, seed=H * D + len(chunks))
    start = 0
    for T in chunks:
        out, ref = c.step(positions(start, T), rows=torch.tensor([1]), poison_past=T > 1)
        assert rel_err(out, ref) < 1e-5, (start, T)
        start += T


def test_prefill_of_several_rows():
    """Several rows in one call: consecutive rows at one start (one SDPA call), rows in another order, rows at
    different starts (one call each), all rows (rows=None), and a chunk whose positions are not consecutive (the
    masked fallback); each equals float64 brute force (1e-5)."""
    c = Shadow(4, 96, 6, 2, 64, seed=7)
    for args in [(positions(0, 20, 2), torch.tensor([1, 2])),  # rows 1, 2 at 0..19
                 (positions(0, 33), torch.tensor([3])),  # row 3 at 0..32
                 (positions(0, 5, 4), None),  # every row at 0..4 (rows 1-3 restart)
                 (positions(5, 12, 2), torch.tensor([2, 0])),  # two rows at one start, not in cache order
                 (torch.stack([torch.arange(17, 30), torch.arange(5, 18)]), torch.tensor([2, 3])),  # two starts
                 (torch.tensor([[30, 33, 31, 32]]), torch.tensor([2]))]:  # not consecutive: the masked path
        out, ref = c.step(*args, poison_past=False)
        assert out.shape == ref.shape and rel_err(out, ref) < 1e-5, args


def test_prefill_never_reads_past_its_chunk():
    """Rows at different starts, every slot past each call's last position NaN: the outputs stay finite (and right);
    the reference path, which masks every slot of the row, would turn them NaN."""
    c = Shadow(3, 80, 8, 2, 64, seed=3)
    c.step(positions(0, 30), torch.tensor([0]))
    c.step(positions(0, 9), torch.tensor([2]))
    out, ref = c.step(torch.stack([torch.arange(30, 50), torch.arange(9, 29)]), torch.tensor([0, 2]))
    assert out.isfinite().all() and rel_err(out, ref) < 1e-5
    c.cache.k_cache[0, :, 60:] = math.nan
    with torch.no_grad():
        masked = c.cache.attend_masked(torch.randn(1, 8, 2, 64), positions(50, 2), torch.tensor([0]))
    assert masked.isnan().all()  # the test can tell the two apart


def tiny_model(seed: int) -> Transformer:
    torch.manual_seed(seed)
    args = ModelArgs(vocab_size=97, dim=576, n_layer=2, n_head=9, n_kv_head=3, head_dim=64, intermediate_size=96,
                     max_position_embeddings=256, rope_base=100.0)
    return Transformer(args).eval()


def test_model_prefill_equals_the_masked_path(monkeypatch):
    """A small random model prefilled in chunks through generate.prefill (rows of different lengths, one at a time),
    then decoded: its logits equal those of the same model whose cache attends every chunk over the whole row with
    the mask (the path before this one)."""
    import generate
    model = tiny_model(0)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 97, (n,), generator=gen) for n in (70, 41, 9)]
    steps = torch.randint(0, 97, (3, 4), generator=gen)
    monkeypatch.setattr(generate, "PREFILL_CHUNK", 16)  # several chunks per prompt

    def run():
        model.setup_caches(3, 96)
        first = torch.cat([generate.prefill(model, p[None], torch.tensor([i])) for i, p in enumerate(prompts)])
        pos = torch.tensor([[len(p)] for p in prompts])
        return torch.cat([first[:, None]] + [model(steps[:, t:t + 1], pos + t) for t in range(steps.shape[1])], 1)

    with torch.no_grad():
        out = run()
        monkeypatch.setattr(KVCache, "prefill", lambda self, q, input_pos, rows: self.attend_masked(q, input_pos, rows))
        ref = run()
    assert ref.std() > 0.1
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# The decode kernel (child process, TRITON_INTERPRET=1).

INTERPRETER_CONFIG = dict(block_n=16, num_warps=1, num_stages=1)  # small blocks: several per row at small sizes


def decode_case(B: int, H: int, Hkv: int, S: int, D: int, dtype, lens: list[int], seed: int):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, D, generator=gen).to(dtype)
    k = torch.randn(B, Hkv, S, D, generator=gen).to(dtype)
    v = torch.randn(B, Hkv, S, D, generator=gen).to(dtype)
    return q, k, v, torch.tensor(lens)[:, None] - 1


def launch_poisoned(q, k, v, input_pos, n_split: int, cfg: dict = INTERPRETER_CONFIG):
    """The two kernels (or, with cfg's merge, the split kernel alone, merging into out with a zero lock that it must
    leave zero) with every output NaN (span -7) beforehand; returns (out, m, l, acc, span)."""
    from kernels.decode_attention import launch_combine, launch_decode, resolve_config
    B, H, D = q.shape
    P = B * n_split
    m, l, acc = torch.full((P, H), math.nan), torch.full((P, H), math.nan), torch.full((P, H, D), math.nan)
    span = torch.full((B, 2), -7, dtype=torch.int32)
    out = torch.full((B, H, D), math.nan, dtype=q.dtype)
    cfg = resolve_config(cfg)
    lock = torch.zeros(B, k.shape[1], dtype=torch.int32)
    launch_decode(q, k, v, input_pos, m, l, acc, span, cfg, out, lock)
    if cfg["merge"]:
        assert not lock.any(), "the merging programs must leave the lock zero"
    else:
        launch_combine(span, m, l, acc, out)
    return out, m, l, acc, span


MODES = {"dot": dict(INTERPRETER_CONFIG), "registers": dict(INTERPRETER_CONFIG, dot=False),
         "merge": dict(INTERPRETER_CONFIG, merge=True)}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("H,Hkv,D", [(4, 4, 64), (9, 3, 64), (8, 2, 128), (8, 1, 64)])
def check_decode_kernel(H, Hkv, D, dtype, mode):
    """Rows of length 1, partial and full S (S not a multiple of the block), GQA groups 1, 3, 4 and 8, head_dim 64
    and 128, one split per row and splits far finer than the short rows' blocks, on the tensor cores, in registers
    and with the merge in the split kernel: the output against float64."""
    from kernels.decode_attention import decode_attention_reference
    S = 100
    q, k, v, pos = decode_case(3, H, Hkv, S, D, dtype, [1, 37, S], seed=H + Hkv + D)
    ref = decode_attention_reference(q, k, v, pos)
    for n_split in (1, 2, 8):
        out = launch_poisoned(q, k, v, pos, n_split, MODES[mode])[0]
        assert out.dtype == dtype and rel_err(out, ref) < (1e-5 if dtype == torch.float32 else 2e-3), n_split


@pytest.mark.filterwarnings("ignore:invalid value encountered in divide")  # the empty row's 0 / 0
@pytest.mark.parametrize("merge", [False, True])
@pytest.mark.parametrize("lens,n_split", [([400, 1, 13, 200], 6), ([96] * 4, 6), ([400, 0, 1, 3], 1)])
def check_work_is_shared_by_length(lens, n_split, merge):
    """The plan (span): each row's programs are consecutive, their number is cdiv(length, chunk) for one chunk (a
    multiple of the block) no longer than the batch's tokens over P - B (P = B * n_split programs per KV head, or the
    longest row when P == B): a long row takes many programs, a short one one, none past P, and rows of equal
    lengths use every program. Exactly the planned programs write partials (the idle ones leave their NaN, which the
    combine never reads: the output is finite and right; a row of length 0 comes out NaN), with either merge."""
    from kernels.decode_attention import decode_attention_reference
    B, P = len(lens), len(lens) * n_split
    q, k, v, pos = decode_case(B, 4, 2, 400, 64, torch.float32, lens, seed=11)
    out, m, l, acc, span = launch_poisoned(q, k, v, pos, n_split, dict(INTERPRETER_CONFIG, merge=merge))
    start, count = span[:, 0].tolist(), span[:, 1].tolist()
    assert start == [sum(count[:b]) for b in range(B)] and sum(count) <= P
    bound = math.ceil(sum(lens) / (P - B)) if P > B else max(lens)
    chunks = [c for c in range(16, 416, 16) if [math.ceil(n / c) for n in lens] == count]
    assert chunks and chunks[0] <= 16 * math.ceil(bound / 16), (count, bound)
    if len(set(lens)) == 1:
        assert sum(count) == P
    written = m.isfinite().all(1)
    assert written.tolist() == [j < sum(count) for j in range(P)] and not m[~written].isfinite().any()
    live = torch.tensor(lens) > 0
    assert rel_err(out[live], decode_attention_reference(q, k, v, pos)[live]) < 1e-5 and out[~live].isnan().all()


@pytest.mark.filterwarnings("ignore:invalid value encountered in divide")  # the negative position's 0 / 0
@pytest.mark.parametrize("merge", [False, True])
def check_positions_outside_the_cache(merge):
    """A position past the cache is read as its last slot (the whole row, nothing beyond: the memory after the cache
    is NaN here); a negative one leaves its row NaN and the other rows right, with either merge."""
    from kernels.decode_attention import decode_attention_reference
    q, k, v, pos = decode_case(3, 8, 2, 50, 64, torch.float32, [50, 20, 9], seed=2)
    k, v = (torch.cat([t.flatten(), torch.full((4096,), math.nan)])[:t.numel()].view(t.shape) for t in (k, v))
    pos_out = torch.tensor([[50 + 30], [-1], [8]])
    out = launch_poisoned(q, k, v, pos_out, 4, dict(INTERPRETER_CONFIG, merge=merge))[0]
    ref = decode_attention_reference(q, k, v, pos)
    assert rel_err(out[[0, 2]], ref[[0, 2]]) < 1e-5 and out[1].isnan().all()


@pytest.mark.parametrize("n", [1, 5, 37])
def check_combine_with_empty_partials(n):
    """The combine kernel alone against float64: rows of 1 partial, fewer and more than its 16-partial block, at
    offsets given by span; empty partials (max -inf, sum 0) anywhere in a row, a row's first block included, weigh
    nothing; the partials of other rows (NaN here) are never read."""
    from kernels.decode_attention import launch_combine
    gen = torch.Generator().manual_seed(n)
    B, H, D = 3, 4, 64
    counts = [n, 1, n + 17]
    starts = [2, 2 + n + 3, 2 + n + 3 + 1 + 2]
    P = starts[-1] + counts[-1] + 4
    m, l, acc = torch.full((P, H), math.nan), torch.full((P, H), math.nan), torch.full((P, H, D), math.nan)
    for s, c in zip(starts, counts):
        m[s:s + c] = torch.randn(c, H, generator=gen) * 4
        l[s:s + c] = torch.rand(c, H, generator=gen) * 10 + 1
        acc[s:s + c] = torch.randn(c, H, D, generator=gen)
    m[starts[2]:starts[2] + 17] = -math.inf  # the third row's whole first block is empty
    m[starts[0] + 1:starts[0] + n:2] = -math.inf
    l[m == -math.inf] = 0
    span = torch.tensor([starts, counts], dtype=torch.int32).T.contiguous()
    out = torch.full((B, H, D), math.nan, dtype=torch.float16)
    launch_combine(span, m, l, acc, out)
    for b, (s, c) in enumerate(zip(starts, counts)):
        mb, lb, ab = m[s:s + c].double(), l[s:s + c].double(), acc[s:s + c].double()
        w = torch.exp2(mb - mb.amax(0))  # (c, H)
        ref = (ab * w[..., None]).sum(0) / (lb * w).sum(0)[..., None]
        assert rel_err(out[b], ref) < 1e-3, b  # float16 rounding of the output (2^-11)


def check_op_takes_strided_queries_and_any_integer_positions():
    """decode_attention (the custom op, its own split count and buffers): q a strided view (heads and batch not
    contiguous), positions (B,) int32 and (B, 1) int64, the default settings and each of VARIANTS (block_n 64/128
    on a row of 300 tokens: several blocks)."""
    from kernels.decode_attention import VARIANTS, decode_attention, decode_attention_reference
    q, k, v, pos = decode_case(2, 8, 2, 300, 64, torch.float32, [300, 129], seed=5)
    q = torch.cat([q, q.flip(1)], -1).transpose(0, 1).contiguous().transpose(0, 1)[..., :64]  # strides (128, 256, 1)
    assert not q.is_contiguous()
    ref = decode_attention_reference(q, k, v, pos)
    assert rel_err(decode_attention(q, k, v, pos[:, 0].int()), ref) < 1e-5
    for cfg in VARIANTS:
        assert rel_err(decode_attention(q, k, v, pos, dict(cfg, num_warps=1, num_stages=1)), ref) < 1e-5, cfg
    lock = torch.zeros(2, 2, dtype=torch.int32)  # the merge with a caller's lock, which it leaves zero
    assert rel_err(decode_attention(q, k, v, pos, dict(merge=True), lock), ref) < 1e-5 and not lock.any()


def check_bad_inputs_are_refused():
    from kernels.decode_attention import decode_attention
    q, k, v, pos = decode_case(2, 8, 2, 64, 64, torch.float32, [64, 9], seed=1)
    for args, words in [((q[:, :5], k, v, pos), "divisible"),
                        ((q, k, v.half(), pos), "share a dtype"),
                        ((q, k[:1], v[:1], pos), "same batch"),
                        ((q[..., :48], k[..., :48], v[..., :48], pos), "head_dim 48"),
                        ((q, k.transpose(2, 3).contiguous().transpose(2, 3), v, pos), "contiguous"),
                        ((q, k, v, pos.float()), "integer position"),
                        ((q, k, v, pos[:1]), "integer position")]:
        with pytest.raises(ValueError, match=words):
            decode_attention(*args)
    with pytest.raises(ValueError, match="unknown decode_attention settings"):
        decode_attention(q, k, v, pos, dict(block=32))
    with pytest.raises(ValueError, match="power of two"):
        decode_attention(q, k, v, pos, dict(block_n=48))
    with pytest.raises(ValueError, match=r"lock must be contiguous \(B, Hkv\) = \(2, 2\) int32"):
        decode_attention(q, k, v, pos, dict(merge=True), torch.zeros(2, 8, dtype=torch.int32))


def check_model_decode_through_the_kernel_equals_the_reference():
    """A small random model (float32, 9 heads on 3 KV heads as SmolLM2): prefill rows of different lengths one at a
    time, then decode steps of all rows; logits with KVCache(fused=True) (the kernel, in the interpreter) equal those
    with fused=False (masked SDPA), and the kernel ran in every layer of every step."""
    from kernels import decode_attention as module
    model = tiny_model(0)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 97, (n,), generator=gen) for n in (70, 41, 9)]
    steps = torch.randint(0, 97, (3, 4), generator=gen)
    calls = []
    kernel = module.decode_attention

    def counting(*a):
        calls.append(1)
        return kernel(*a)

    def run(fused: bool):
        model.setup_caches(3, 96, lambda i, a, B, S, dt: KVCache(B, S, a.n_kv_head, a.head_dim, dt, fused=fused))
        for i, p in enumerate(prompts):
            model(p[None], torch.arange(len(p))[None], rows=torch.tensor([i]))
        pos = torch.tensor([[len(p)] for p in prompts])
        return torch.cat([model(steps[:, t:t + 1], pos + t) for t in range(steps.shape[1])], 1)

    with torch.no_grad():
        ref = run(False)
        module.decode_attention = counting
        try:
            out = run(True)
        finally:
            module.decode_attention = kernel
    assert len(calls) == 2 * steps.shape[1]  # two layers, one call per decode step
    assert ref.std() > 0.1
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


N_CHILD_TESTS = 3 * 2 * 4 + 3 * 2 + 2 + 3 + 1 + 1 + 1
if CHILD:  # the child collects the checks as tests, and not the parent's tests
    assert os.environ.get("TRITON_INTERPRET") == "1"
    for _name in [n for n in globals() if n.startswith("test_")]:
        del globals()[_name]
    for _name in [n for n in globals() if n.startswith("check_")]:
        globals()["test_" + _name[len("check_"):]] = globals()[_name]
