"""Timing: ``triton.testing.do_bench`` (median) on GPU, ``torch.utils.benchmark`` on CPU."""

import statistics
import time
from typing import Callable, Optional, Sequence

import torch


def time_cuda(fn: Callable[[], object], grad_to_none: Optional[Sequence[torch.Tensor]] = None,
              warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """Median milliseconds of ``fn`` on the current CUDA device (L2 flushed between runs by do_bench)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none, return_mode="median"))


def time_cpu(fn: Callable[[], object], min_run_time: float = 1.0, max_measurements: int = 100,
             warm_seconds: Optional[float] = None) -> float:
    """Median milliseconds of ``fn`` on CPU with all intra-op threads, after a warm-up call.

    A call that takes more than a quarter of ``min_run_time`` is measured with
    ``Timer.blocked_autorange(min_run_time)``. Faster calls are measured one call per
    measurement (``Timer.timeit(1)``, up to ``max_measurements`` or about ``min_run_time``
    seconds), so that a call slowed down by a descheduled thread moves the median little.
    ``warm_seconds``: the caller has just run ``fn`` (e.g. to check its result) and measured it;
    that call then serves as the warm-up.
    """
    from torch.utils.benchmark import Timer

    if warm_seconds is None:
        start = time.perf_counter()
        fn()  # warm-up: first-call allocations, lazy initialisation
        warm_seconds = time.perf_counter() - start
    first = warm_seconds
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    if first > min_run_time / 4:
        return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3
    # timeit(1) runs two warm-up calls before the measured one: about 3 calls per measurement
    count = int(min(max_measurements, max(5, min_run_time / (3 * max(first, 1e-6)))))
    return statistics.median(timer.timeit(1).median for _ in range(count)) * 1e3


def time_fn(fn: Callable[[], object], device: torch.device, grad_to_none=None, min_run_time: float = 1.0,
            warm_seconds: Optional[float] = None) -> float:
    """Median milliseconds of ``fn`` on ``device`` (do_bench on CUDA, torch.utils.benchmark on CPU)."""
    if device.type == "cuda":
        return time_cuda(fn, grad_to_none=grad_to_none)
    return time_cpu(fn, min_run_time=min_run_time, warm_seconds=warm_seconds)
