"""Latency-aware ranking: weigh each channel group by what its channels cost in time.

A MAC budget treats every multiply-accumulate alike, but on a CPU they are not: a narrow
conv at high resolution (16 channels at 28x28) spends more time per MAC than a wide one at
low resolution (64 channels at 7x7), and its BatchNorm moves more activation bytes per MAC.
A cut that lands on the MAC target by removing cheap MACs gives a smaller speedup than its
MAC reduction promises. (Channel counts off the CPU's 16-channel output block are a larger
effect that these linear weights cannot see: ``leanconv.cost.hardware``, ``--round-to auto``.)

With ``latency_aware=True`` the budget search (:func:`leanconv.width.prune_to_budget`)
divides each group's scores by :func:`latency_weights`: the group's measured milliseconds
per MAC saved, relative to the whole network's. Channels that are slow for their MACs sort
earlier, so the same MAC budget buys more speed. The budget itself stays in counted MACs.

Every resized conv, linear and BatchNorm layer is timed alone on this machine (one thread,
its recorded input shape at ``batch_size``, channels_last for 4-D inputs, the median of a
few calls of the thread's CPU time); removing one group channel saves ``counts/C`` of each
member layer's time and MACs (a BatchNorm only time).
"""

from __future__ import annotations

import statistics
from typing import Callable, Sequence

import torch
from torch import nn

from leanconv.cost import count, measure_latency
from leanconv.layers.implant import ImplantConv2d
from leanconv.util.modes import eval_mode
from leanconv.graph.groups import TracedGroup

__all__ = ["latency_weights", "time_layer"]

MAX_WEIGHT = 4.0
_TIMED = (nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, ImplantConv2d)


def time_layer(module: nn.Module, input_shape: Sequence[int], repeats: int = 5) -> float:
    """Median milliseconds (thread CPU time, one thread) of ``module`` on a random input of
    ``input_shape`` (batch included), in eval mode and channels_last for 4-D inputs."""
    return measure_latency(module, input_shape[1:], input_shape[0], warmup=0, repeats=repeats, clock="cpu").median_ms


def _input_shapes(model: nn.Module, names: set[str], example_input: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """The input shape (batch 1) of each named module's first call."""
    shapes: dict[str, tuple[int, ...]] = {}

    def record(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple) -> None:
            shapes.setdefault(name, tuple(args[0].shape))
        return hook

    hooks = [module.register_forward_pre_hook(record(name)) for name, module in model.named_modules() if name in names]
    try:
        with eval_mode(model), torch.no_grad():
            model(example_input[:1])
    finally:
        for h in hooks:
            h.remove()
    return shapes


def _width(module: nn.Module, kind: str) -> int:
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return module.num_features
    if isinstance(module, nn.Linear):
        return module.out_features if kind == "out" else module.in_features
    return module.out_channels if kind == "out" else module.in_channels


def latency_weights(model: nn.Module, traced: Sequence[TracedGroup], example_input: torch.Tensor,
                    input_shape: Sequence[int], *, batch_size: int = 64, repeats: int = 5,
                    timer: Callable[[nn.Module, Sequence[int]], float] | None = None) -> list[float]:
    """One weight per group: (ms saved / MACs saved per removed channel) over the network's
    (timed ms / counted MACs). 1 where a group saves no MACs or no timed layer. ``timer``
    (module, input shape) -> ms replaces the measurement (tests)."""
    timer = timer or (lambda m, s: time_layer(m, s, repeats))
    modules = dict(model.named_modules())
    names = {s.module for t in traced for s in t.shares if isinstance(modules.get(s.module), _TIMED)}
    shapes = _input_shapes(model, names, example_input)
    macs = {row.name: row.macs for row in count(model, input_shape).layers}
    ms = {n: timer(modules[n], (batch_size, *shapes[n][1:])) / batch_size for n in names if n in shapes}
    rate = sum(ms.values()) / max(1, sum(macs.get(n, 0) for n in ms))
    weights = []
    for t in traced:
        saved_ms = saved_macs = 0.0
        for share in t.shares:
            if share.module not in ms:
                continue
            fraction = statistics.mean(share.counts) / _width(modules[share.module], share.kind)
            saved_ms += ms[share.module] * fraction
            saved_macs += macs.get(share.module, 0) * fraction
        w = saved_ms / saved_macs / rate if saved_macs > 0 and rate > 0 and saved_ms > 0 else 1.0
        weights.append(min(MAX_WEIGHT, max(1 / MAX_WEIGHT, w)))  # one odd timing must not decide a layer alone
    return weights
