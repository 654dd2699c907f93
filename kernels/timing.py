"""Timing and rooflines for the kernels' micro-benchmarks and for bench/ (GPU only).

    us = graph_us(lambda: kernel(...))        # median us of CUDA-graph replays, L2 cleared before each
    floor_us = bytes_read / copy_ceiling() * 1e6

The ceilings are measured in the same process as the times they are compared with, never taken from a
table: clocks and memory differ between cards of the same name.
"""
import functools

import torch


def graph_us(fn, warmup: int = 50, rep: int = 300) -> float:
    """Median microseconds of fn replayed from a CUDA graph, the L2 cache cleared before every replay
    (triton's do_bench), so no input is read from L2 and no launch costs Python time."""
    from triton.testing import do_bench
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and allocate outside the capture
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return do_bench(graph.replay, warmup=warmup, rep=rep, return_mode="median") * 1e3


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
