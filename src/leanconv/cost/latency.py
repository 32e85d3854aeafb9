"""Measured inference latency: eager PyTorch on CPU (and, from :mod:`leanconv.deploy.onnx`, ONNX Runtime's CPU provider).

A MAC ratio is not a speedup (pruned models can get slower, e.g. with channel counts that
are not multiples of 8), so leanconv times the real thing. Each measurement runs ``warmup``
untimed forward passes, then ``repeats`` timed ones with ``time.perf_counter``, and reports
the median with the 10th/90th percentiles as the spread. Units: milliseconds per batch.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from leanconv.util.model_io import check_shape, example_input, run_forward
from leanconv.errors import LeanconvError
from leanconv.deploy.fold import fold_batchnorm
from leanconv.deploy.onnx import measure_onnx_latency
from leanconv.util.modes import eval_mode
from leanconv.util.timing import CLOCKS, LatencyStats, check_counts, summarise, time_calls

__all__ = ["LatencyStats", "measure_latency", "measure_fastest_layout", "measure_onnx_latency"]



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
    folded into one conv (:func:`leanconv.deploy.fold.fold_batchnorm`), as ONNX Runtime or a frozen
    TorchScript model would run it."""
    shape = check_shape(input_shape)
    if clock not in CLOCKS:
        raise LeanconvError(f"clock must be one of {', '.join(CLOCKS)}, got {clock!r}")
    if clock == "cpu":
        threads = 1
    check_counts(batch_size, warmup, repeats, threads)
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
            times = time_calls(lambda: net(x), warmup, repeats, clock)
    finally:
        torch.set_num_threads(previous)
    stats = summarise(times, used, batch_size, "channels_last" if use_nhwc else "contiguous", "torch")
    return LatencyStats(**{**stats.to_dict(), "clock": clock, "bn_folded": fold_bn})


def measure_fastest_layout(model: nn.Module, input_shape: Sequence[int], batch_size: int, **kwargs: Any) -> LatencyStats:
    """:func:`measure_latency` in NCHW and in channels_last; the faster of the two (by median).
    A dense conv is usually faster in channels_last on CPU, leanconv's sparse kernels in NCHW,
    so a fair comparison times each model in its better layout."""
    runs = [measure_latency(model, input_shape, batch_size, channels_last=nhwc, **kwargs) for nhwc in (True, False)]
    return min(runs, key=lambda stats: stats.median_ms)
