"""Timing and rooflines for the kernels' micro-benchmarks and for bench/ (GPU only).

    us = graph_us(lambda: kernel(...))        # median us of CUDA-graph replays, L2 flushed before each
    floor_us = bytes_read / copy_ceiling() * 1e6

The ceilings are measured in the same process as the times they are compared with, never taken from a
table: clocks and memory differ between cards of the same name.
"""
import functools

import torch


FLUSH_BYTES = 256 << 20  # the buffer that evicts L2 before each timed call (several times any current L2)


def graph_us(fn, warmup: int = 50, rep: int = 300, flush: str = "read") -> float:
    """Median microseconds of fn replayed from a CUDA graph (no launch costs Python time), the L2 cache flushed
    before every replay so that no input is read from it; warmup and rep in milliseconds, as triton's do_bench.
    flush "read" reads a FLUSH_BYTES buffer, which leaves L2 full of clean lines, as a decode step's attention finds
    it (the projections before it only read weights); "zero" writes it, as do_bench does: the L2-sized remainder of
    dirty lines is then written back to memory inside the timed call, a fixed cost on every kernel
    (bench/NOTES.md 12-07e/3: 7-15 us on an H100)."""
    if flush not in ("read", "zero"):
        raise ValueError(f"flush is 'read' or 'zero', not {flush!r}")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and allocate outside the capture
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    buf = torch.ones(FLUSH_BYTES // 4, dtype=torch.float32, device="cuda")
    clear = buf.zero_ if flush == "zero" else buf.sum

    def timed(n: int) -> list[float]:
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for start, end in events:
            clear()
            start.record()
            graph.replay()
            end.record()
        torch.cuda.synchronize()
        return [start.elapsed_time(end) for start, end in events]

    first, last = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    first.record()
    timed(5)
    last.record()
    torch.cuda.synchronize()
    estimate = max(first.elapsed_time(last) / 5, 1e-3)  # ms per flush and replay, as do_bench counts them
    timed(max(1, int(warmup / estimate)))
    times = sorted(timed(max(5, int(rep / estimate))))
    return times[len(times) // 2] * 1e3


@functools.cache
def copy_ceiling() -> float:
    """Bytes/s (read + written) of a 2 GiB device-to-device copy: the bandwidth ceiling of a decode step."""
    from triton.testing import do_bench
    x = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    t = do_bench(lambda: y.copy_(x), return_mode="median") * 1e-3
    return 2 * x.numel() / t


@functools.cache
def matmul_rate() -> float:
    """bf16 FLOP/s of an 8192^3 matrix product (cuBLAS): the ceiling of compute-bound steps."""
    from triton.testing import do_bench
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t = do_bench(lambda: a @ b, return_mode="median") * 1e-3
    return 2 * 8192 ** 3 / t
