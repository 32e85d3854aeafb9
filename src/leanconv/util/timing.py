"""Timing a call: warm-up runs, then timed runs, and their median with the spread.

Used by every latency measurement (eager PyTorch in :mod:`leanconv.cost.latency`, ONNX
Runtime in :mod:`leanconv.deploy.onnx`). Units: milliseconds per call.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from leanconv.errors import LeanconvError

__all__ = ["LatencyStats", "CLOCKS", "check_counts", "time_calls", "summarise"]


@dataclass(frozen=True)
class LatencyStats:
    """Wall-clock time of one forward pass of a whole batch, in milliseconds.

    ``threads`` is the intra-op thread count used; ``memory_format`` is ``channels_last`` or
    ``contiguous`` (NCHW); ``backend`` is ``torch`` or ``onnxruntime``."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    min_ms: float
    repeats: int
    threads: int
    batch_size: int
    memory_format: str
    backend: str = "torch"
    clock: str = "wall"  # "wall" (perf_counter) or "cpu" (this thread's CPU time; 1 thread only)
    bn_folded: bool = False  # timed the deployment form: BatchNorm folded into its conv (leanconv.deploy.fold)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_counts(batch_size: int, warmup: int, repeats: int, threads: int | None) -> None:
    if batch_size < 1:
        raise LeanconvError(f"batch size must be at least 1, got {batch_size}")
    if warmup < 0 or repeats < 1:
        raise LeanconvError(f"need warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")
    if threads is not None and threads < 1:
        raise LeanconvError(f"threads must be at least 1, got {threads}")


CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


def time_calls(call: Callable[[], object], warmup: int, repeats: int, clock: str = "wall") -> np.ndarray:
    now = CLOCKS[clock]
    for _ in range(warmup):
        call()
    times = np.empty(repeats)
    for i in range(repeats):
        start = now()
        call()
        times[i] = (now() - start) * 1e3
    return times


def summarise(times: np.ndarray, threads: int, batch_size: int, memory_format: str, backend: str) -> LatencyStats:
    p10, median, p90 = np.percentile(times, [10, 50, 90])
    return LatencyStats(median_ms=float(median), p10_ms=float(p10), p90_ms=float(p90), min_ms=float(times.min()),
                        repeats=len(times), threads=threads, batch_size=batch_size, memory_format=memory_format,
                        backend=backend)
