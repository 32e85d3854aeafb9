"""Measured inference latency: eager PyTorch on CPU and ONNX Runtime's CPU provider.

A MAC ratio is not a speedup (pruned models can get slower, e.g. with channel counts that
are not multiples of 8), so leanconv times the real thing. Each measurement runs ``warmup``
untimed forward passes, then ``repeats`` timed ones with ``time.perf_counter``, and reports
the median with the 10th/90th percentiles as the spread. Units: milliseconds per batch.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from leanconv.cost._model_io import check_shape, example_input, run_forward
from leanconv.errors import LeanconvError
from leanconv.fold import fold_batchnorm
from leanconv.modes import eval_mode

__all__ = ["LatencyStats", "measure_latency", "measure_fastest_layout", "measure_onnx_latency"]


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
    bn_folded: bool = False  # timed the deployment form: BatchNorm folded into its conv (leanconv.fold)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_counts(batch_size: int, warmup: int, repeats: int, threads: int | None) -> None:
    if batch_size < 1:
        raise LeanconvError(f"batch size must be at least 1, got {batch_size}")
    if warmup < 0 or repeats < 1:
        raise LeanconvError(f"need warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")
    if threads is not None and threads < 1:
        raise LeanconvError(f"threads must be at least 1, got {threads}")


CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


def _time_calls(call: Callable[[], object], warmup: int, repeats: int, clock: str = "wall") -> np.ndarray:
    now = CLOCKS[clock]
    for _ in range(warmup):
        call()
    times = np.empty(repeats)
    for i in range(repeats):
        start = now()
        call()
        times[i] = (now() - start) * 1e3
    return times


def _stats(times: np.ndarray, threads: int, batch_size: int, memory_format: str, backend: str) -> LatencyStats:
    p10, median, p90 = np.percentile(times, [10, 50, 90])
    return LatencyStats(median_ms=float(median), p10_ms=float(p10), p90_ms=float(p90), min_ms=float(times.min()),
                        repeats=len(times), threads=threads, batch_size=batch_size, memory_format=memory_format,
                        backend=backend)


def measure_latency(model: nn.Module, input_shape: Sequence[int], batch_size: int, *, warmup: int = 5,
                    repeats: int = 20, threads: int | None = None, channels_last: bool = True,
                    clock: str = "wall", fold_bn: bool = False) -> LatencyStats:
    """Time ``model`` on a random batch ``[batch_size, *input_shape]`` under ``torch.inference_mode``.

    ``threads`` sets ``torch.set_num_threads`` for the measurement (default: the current
    count) and is restored afterwards, as is every module's train/eval mode. With
    ``channels_last`` (4-D inputs only) a copy of the model is converted to NHWC, which is
    usually faster for convolutions on CPU; the caller's model is never converted.

    ``clock="cpu"`` times the CPU time of the calling thread instead of wall time: with one
    thread (it forces ``threads=1``) all the work runs on that thread, so the figure is immune
    to other processes competing for the cores (used for side-by-side ratios on a busy box).

    ``fold_bn`` times the deployment form instead: a copy with every Conv2d -> BatchNorm2d pair
    folded into one conv (:func:`leanconv.fold.fold_batchnorm`), as ONNX Runtime or a frozen
    TorchScript model would run it."""
    shape = check_shape(input_shape)
    if clock not in CLOCKS:
        raise LeanconvError(f"clock must be one of {', '.join(CLOCKS)}, got {clock!r}")
    if clock == "cpu":
        threads = 1
    _check_counts(batch_size, warmup, repeats, threads)
    use_nhwc = channels_last and len(shape) == 3
    previous = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        used = torch.get_num_threads()
        x = example_input(model, shape, batch_size)
        net = model
        if fold_bn:
            with eval_mode(model), torch.inference_mode():
                run_forward(model, x[:1])  # a shape error surfaces as LeanconvError, not inside the trace
            net = fold_batchnorm(model, x[:1])
        if use_nhwc:
            net = (net if fold_bn else copy.deepcopy(model)).to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        with eval_mode(net), torch.inference_mode():
            run_forward(net, x)  # surfaces a shape error as LeanconvError before timing
            times = _time_calls(lambda: net(x), warmup, repeats, clock)
    finally:
        torch.set_num_threads(previous)
    stats = _stats(times, used, batch_size, "channels_last" if use_nhwc else "contiguous", "torch")
    return LatencyStats(**{**stats.to_dict(), "clock": clock, "bn_folded": fold_bn})


def measure_fastest_layout(model: nn.Module, input_shape: Sequence[int], batch_size: int, **kwargs: Any) -> LatencyStats:
    """:func:`measure_latency` in NCHW and in channels_last; the faster of the two (by median).
    A dense conv is usually faster in channels_last on CPU, leanconv's sparse kernels in NCHW,
    so a fair comparison times each model in its better layout."""
    runs = [measure_latency(model, input_shape, batch_size, channels_last=nhwc, **kwargs) for nhwc in (True, False)]
    return min(runs, key=lambda stats: stats.median_ms)


def _onnx_session(onnx_path: Path, threads: int) -> Any:
    import onnxruntime as ort  # heavy import, only needed here

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        return ort.InferenceSession(str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for bad files
        raise LeanconvError(f"onnxruntime cannot load {onnx_path}: {str(exc).strip().splitlines()[0]}") from exc


def measure_onnx_latency(onnx_path: str | Path, input_shape: Sequence[int], batch_size: int, *, warmup: int = 5,
                         repeats: int = 20, threads: int | None = None) -> LatencyStats:
    """Time an ONNX model with onnxruntime's CPU provider on a random float32 batch
    ``[batch_size, *input_shape]`` (NCHW). ``threads`` (default: ``torch.get_num_threads()``,
    so both backends compare on equal terms) becomes ``intra_op_num_threads``."""
    shape = check_shape(input_shape)
    _check_counts(batch_size, warmup, repeats, threads)
    path = Path(onnx_path)
    if not path.is_file():
        raise LeanconvError(f"ONNX file {path} does not exist")
    used = threads if threads is not None else torch.get_num_threads()
    session = _onnx_session(path, used)
    first = session.get_inputs()[0]
    fixed_batch = first.shape[0] if first.shape else None
    if isinstance(fixed_batch, int) and fixed_batch != batch_size:
        raise LeanconvError(f"{path} was exported with a fixed batch of {fixed_batch}, not {batch_size}; "
                            "export it with a dynamic batch axis")
    x = np.random.default_rng(0).standard_normal((batch_size, *shape), dtype=np.float32)
    feed = {first.name: x}
    try:
        session.run(None, feed)
    except Exception as exc:
        raise LeanconvError(f"onnxruntime failed on input {tuple(x.shape)}: {str(exc).strip().splitlines()[0]}") from exc
    times = _time_calls(lambda: session.run(None, feed), warmup, repeats)
    return _stats(times, used, batch_size, "contiguous", "onnxruntime")
