"""Triton kernels of the decode step: each file a kernel, its PyTorch reference and its micro-benchmark.

A regular package (not a namespace one), so that a `kernels` distribution installed beside transformers
cannot shadow it."""
