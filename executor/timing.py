"""GPU time of a callable: warm-up, then CUDA-graph replays timed by CUDA events, median.

Each timed window holds INNER replays queued behind a GPU sleep, so that the host's launch
latency (several us a replay) never shows as idle GPU time between them.

A decode step's kernels run under CUDA graphs in serving engines, so launch gaps are not part
of what we compare with the model; a graph per (callable, input set) is captured once and
replayed. On the CPU (Triton interpreter) the wall clock is reported instead, flagged: it checks
the plumbing, it is no measurement of speed.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

INNER = 8  # calls per timed window: a short graph's replay would otherwise wait on the host's launch
SLEEP_CYCLES = 2_000_000  # ~1 ms of GPU sleep while the host queues the window


def median_time_s(fns: list[Callable[[], object]], repeats: int, warmup: int, device: str,
                  use_graphs: bool = True) -> float:
    """Median seconds of one call, rotating through `fns` (each bound to its own weights and
    inputs, so that caches cannot carry one repeat's data to the next)."""
    if repeats < 1:
        raise ValueError(f"executor.repeats: expected >= 1, found {repeats}")
    if device != "cuda":
        times = []
        for i in range(warmup + repeats):
            t = time.perf_counter()
            fns[i % len(fns)]()
            if i >= warmup:
                times.append(time.perf_counter() - t)
        return statistics.median(times)
    import torch

    runs = [_graph(f) if use_graphs else f for f in fns]
    for i in range(max(warmup, 1)):
        runs[i % len(runs)]()
    torch.cuda.synchronize()
    times = []
    for i in range(repeats):  # INNER calls back to back, queued behind a sleep kernel: no launch gaps
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(SLEEP_CYCLES)
        start.record()
        for j in range(INNER):
            runs[(i * INNER + j) % len(runs)]()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / INNER)
    return statistics.median(times) / 1e3


def _graph(fn: Callable[[], object]) -> Callable[[], None]:
    """Capture `fn` (static shapes, no host synchronisation inside) into a CUDA graph."""
    import torch

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up on a side stream, as graph capture requires
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay
