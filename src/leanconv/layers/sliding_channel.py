"""Sliding-channel convolution (SCC).

Paper: Wang et al., "DSXplore: Optimizing Convolutional Neural Networks via Sliding-Channel
Convolutions", IPDPS 2021 (code: YukeWang96/DSXplore).

SCC is a 1x1 convolution in which output channel ``c`` reads only a cyclic window of
``cw = in_channels / groups`` consecutive input channels:

    start(c) = floor(c * (1 - overlap) * cw) mod in_channels
    y[c]     = sum_{k < cw} weight[c, k] * x[(start(c) + k) mod in_channels]

so it has ``out_channels * cw`` weights and ``out_channels * cw * H_out * W_out`` MACs per
image: ``groups`` times fewer than a pointwise conv. ``overlap`` sets how far neighbouring
windows overlap and changes which channels mix, not the cost. ``start`` is evaluated in exact
decimal arithmetic (``overlap=0.9`` means 9/10), so float round-off never moves a window.

Unlike the original CUDA kernel, every implementation here is exact for every overlap in
[0, 1), including non-integer window strides and overlaps above 0.5 (tested by gradcheck).

Implementations (``impl``): ``"kernel"`` runs compiled C kernels (``_kernels/``) that execute
only the nonzero MACs in forward and backward; ``"grouped"`` is pure PyTorch: gather each
distinct window once, one grouped 1x1 conv, reorder; ``"reference"`` is the dense 1x1 conv
with the masked weight (also used for ONNX export); ``"gather"`` gathers every output's
window and runs a ``groups=out_channels`` conv (the naive formulation, a benchmark
baseline). ``"auto"`` picks ``kernel`` when it can run, else ``reference`` (on CPU the dense
1x1 conv beats ``grouped`` in time although it does ``groups`` times more MACs). The
reference path keeps the masked dense weight between calls while no gradient can reach
``weight`` and it is unchanged (``DenseWeightCache``; saved 10-15 of 26-35 us per call for
16 -> 16 on 8x8, batch 1). An export or trace writes the reference form for ``"kernel"``
and ``"auto"`` (the same function), and ``"grouped"`` or ``"gather"`` as they are. Which
form is fastest depends on the runtime and the layer's shape; ``leanconv.convs.placement``
measures it and sets ``impl``, which is saved with the layer when it is not ``"auto"``.

Speed of ``kernel``: output channels with the same window share every input load, so it is
fastest when the window stride ``(1 - overlap) * cw`` is an integer (windows repeat every
``in_channels / stride`` channels). A non-integer stride such as ``overlap=0.33`` leaves most
channels with a window of their own; the result is as exact but runs about 1.8x slower.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from leanconv.errors import LeanconvError
from leanconv.layers._kernels import SparseConvPlan, in_layout_of, kernels_usable, sparse_conv
from leanconv.layers._kernels.sparse_conv import writing_graph
from leanconv.layers._kernels.plan import TapPattern
from leanconv.layers._kernels.sparse_conv import DenseWeightCache
from leanconv.layers.spec import register_layer

__all__ = ["SlidingChannelConv2d", "window_starts"]

IMPLS = ("auto", "kernel", "grouped", "reference", "gather")


def window_starts(in_channels: int, out_channels: int, groups: int, overlap: float) -> list[int]:
    """``start(c) = floor(c * (1 - overlap) * cw) mod in_channels`` for every output channel,
    with ``overlap`` read as the decimal number it prints as."""
    cw = in_channels // groups
    step = (1 - Fraction(repr(float(overlap)))) * cw
    return [math.floor(c * step) % in_channels for c in range(out_channels)]


def _check(in_channels: int, out_channels: int, groups: int, overlap: float, stride: int, impl: str) -> None:
    for name, value in (("in_channels", in_channels), ("out_channels", out_channels),
                        ("groups", groups), ("stride", stride)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise LeanconvError(f"SlidingChannelConv2d: {name} must be a positive integer, got {value!r}")
    if in_channels % groups:
        raise LeanconvError(f"SlidingChannelConv2d: in_channels={in_channels} is not divisible by "
                            f"groups={groups}; choose groups that divide it")
    if not isinstance(overlap, (int, float)) or not 0 <= overlap < 1:
        raise LeanconvError(f"SlidingChannelConv2d: overlap must be in [0, 1), got {overlap!r}")
    if impl not in IMPLS:
        raise LeanconvError(f"SlidingChannelConv2d: impl={impl!r} is unknown; use one of {', '.join(IMPLS)}")


@register_layer
class SlidingChannelConv2d(nn.Module):
    """1x1 sliding-channel convolution (DSXplore SCC).

    Args:
        in_channels, out_channels: channel counts.
        groups: window length is ``cw = in_channels // groups`` (must divide).
        overlap: fraction in [0, 1) by which neighbouring output windows overlap.
        stride: spatial stride of the 1x1 conv.
        impl: ``"auto"`` (default), ``"kernel"``, ``"grouped"``, ``"reference"`` or ``"gather"``.
        bias: add a learnt per-channel bias (default False; folding a BatchNorm in adds one).

    Parameter ``weight`` is ``[out_channels, cw]``; ``weight[c, k]`` multiplies input channel
    ``(start(c) + k) mod in_channels``.
    """

    def __init__(self, in_channels: int, out_channels: int, groups: int, overlap: float,
                 stride: int = 1, impl: str = "auto", bias: bool = False):
        super().__init__()
        _check(in_channels, out_channels, groups, overlap, stride, impl)
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.overlap, self.stride, self.impl = float(overlap), stride, impl
        self.window = cw = in_channels // groups
        self.weight = nn.Parameter(torch.empty(out_channels, cw))
        nn.init.uniform_(self.weight, -1 / math.sqrt(cw), 1 / math.sqrt(cw))  # Conv2d's default bound
        starts = torch.tensor(window_starts(in_channels, out_channels, groups, overlap), dtype=torch.int64)
        index = (starts[:, None] + torch.arange(cw)) % in_channels  # [out, cw] input channel of weight[c, k]
        self.register_buffer("window_index", index, persistent=False)
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self._plan: SparseConvPlan | None = None
        self._grouped: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None = None
        self._dense_cache = DenseWeightCache()

    def spec_kwargs(self) -> dict:
        return {"in_channels": self.in_channels, "out_channels": self.out_channels, "groups": self.groups,
                "overlap": self.overlap, "stride": self.stride,
                **({"impl": self.impl} if self.impl != "auto" else {}),
                **({"bias": True} if self.bias is not None else {})}

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, groups={self.groups}, overlap={self.overlap}, "
                f"stride={self.stride}, impl={self.impl!r}")

    def dense_weight(self) -> torch.Tensor:
        """The equivalent dense ``[out_channels, in_channels, 1, 1]`` weight (differentiable)."""
        dense = self.weight.new_zeros(self.out_channels, self.in_channels)
        return dense.scatter(1, self.window_index, self.weight)[:, :, None, None]

    def count_macs(self, input: torch.Tensor, output: torch.Tensor) -> int:
        """Nonzero multiply-adds of this call: ``out_channels * cw * H_out * W_out * N``."""
        return int(output.numel()) * self.window

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._forward(x)
        return y if self.bias is None else y + self.bias[:, None, None]

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        impl = self._resolve_impl(x)
        if impl == "reference":
            return F.conv2d(x, self._dense_cache.get(self.weight, self.dense_weight), stride=self.stride)
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if impl == "kernel":
            return in_layout_of(x, sparse_conv(x, self.weight, self._kernel_plan()))
        if impl == "gather":
            gathered = x.index_select(1, self.window_index.reshape(-1))
            return F.conv2d(gathered, self.weight[:, :, None, None], groups=self.out_channels)
        return self._forward_grouped(x)

    def _resolve_impl(self, x: torch.Tensor) -> str:
        exporting = writing_graph()
        if self.impl == "auto":
            if exporting:
                return "reference"
            return "kernel" if kernels_usable(x, self.weight) else "reference"
        if x.is_meta or self.weight.is_meta:
            return "reference"  # a dry run on meta tensors (leanconv.util.meta_build): shapes only
        if self.impl == "kernel" and exporting:
            return "reference"  # an exported or traced graph holds the reference form: the same function
        if self.impl == "kernel" and not kernels_usable(x, self.weight):
            raise LeanconvError("SlidingChannelConv2d: impl='kernel' cannot run here (needs CPU float32/64 "
                                "tensors, a C compiler, no export or tracing); use impl='auto'")
        return self.impl

    def _kernel_plan(self) -> SparseConvPlan:
        if self._plan is None:
            rows = np.repeat(np.arange(self.out_channels), self.window)
            cols = self.window_index.cpu().numpy().reshape(-1)
            zeros = np.zeros_like(rows)
            taps = TapPattern(rows, cols, zeros, zeros, np.arange(rows.size), self.out_channels, self.in_channels, 1)
            self._plan = SparseConvPlan(taps, 0, self._reference_stride1)
        return self._plan

    def _reference_stride1(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        dense = weight.new_zeros(self.out_channels, self.in_channels).scatter(1, self.window_index, weight)
        return F.conv2d(x, dense[:, :, None, None])

    def _grouped_indices(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """Distinct windows (one per distinct start) and where each output lands after the
        grouped conv: (input gather index, weight gather index, output index, number of windows).
        Built in plain Python, one tensor each: under an ONNX export or a trace every tensor op
        here would be recorded (thousands on a wide layer, minutes of constant folding)."""
        if self._grouped is None:
            windows = self.window_index.tolist()
            starts = [w[0] for w in windows]
            distinct = sorted(set(starts))
            members = {s: [c for c, sc in enumerate(starts) if sc == s] for s in distinct}
            slots = max(len(m) for m in members.values())
            zero_slot = self.out_channels * self.window  # points at an appended zero weight
            w_index = [[[zero_slot] * self.window for _ in range(slots)] for _ in distinct]
            out_index = [0] * self.out_channels
            for g, s in enumerate(distinct):
                for r, c in enumerate(members[s]):
                    w_index[g][r] = list(range(c * self.window, (c + 1) * self.window))
                    out_index[c] = g * slots + r
            in_index = [i for s in distinct for i in windows[members[s][0]]]
            self._grouped = (torch.tensor(in_index, dtype=torch.int64),
                             torch.tensor(w_index, dtype=torch.int64).reshape(-1),
                             torch.tensor(out_index, dtype=torch.int64), len(distinct))
        return self._grouped

    def _forward_grouped(self, x: torch.Tensor) -> torch.Tensor:
        in_index, w_index, out_index, n_windows = self._grouped_indices()
        dev = x.device
        flat = torch.cat([self.weight.reshape(-1), self.weight.new_zeros(1)])
        w = flat[w_index.to(dev)].view(-1, self.window, 1, 1)
        y = F.conv2d(x.index_select(1, in_index.to(dev)), w, groups=n_windows)
        return y.index_select(1, out_index.to(dev))
