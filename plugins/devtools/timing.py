"""Wall-clock timing for the op-level benchmarks."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_seconds(fn: Callable[[], object], repeats: int, *, warmup: bool = True) -> float:
    """Median wall time of ``repeats`` calls of ``fn``, after one untimed call when ``warmup``."""
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def gpu_milliseconds(fn: Callable[[], object], repeats: int, flush=None, *, warmup: int = 3) -> float:
    """Median GPU time in ms of ``repeats`` calls of ``fn``, CUDA events around each, after ``warmup`` calls
    (compilation, autotuning, allocator). ``flush``: a large device buffer zeroed before each call, so the
    inputs come from device memory rather than L2 (a model's layers do not share L2)."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if flush is not None:
            flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def device_milliseconds(fn: Callable[[], object], repeats: int, device: str, flush=None) -> float:
    """``gpu_milliseconds`` on CUDA; elsewhere the host clock's median ms after three warm-ups (the GPU
    benchmarks' CPU smoke runs: numbers not meaningful)."""
    if device == "cuda":
        return gpu_milliseconds(fn, repeats, flush)
    for _ in range(3):
        fn()
    return median_seconds(fn, repeats, warmup=False) * 1e3


def cuda_graph(fn: Callable[[], object]) -> Callable[[], None]:
    """``fn`` captured as a CUDA graph (after one warm-up call on a side stream, as torch asks); returns its
    replay. ``fn`` must not sync with the host; its outputs live in the graph's pool, overwritten per replay."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay
