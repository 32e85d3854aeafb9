"""A fast, exact-by-construction estimate of params and MACs after a channel removal.

The budget search (:mod:`leanconv.width.budget`) tries dozens of removal plans; pruning a
copy of the model and counting it each time would dominate the run. Instead we count the
model once with :func:`leanconv.cost.count` and, for each plan, recompute only the layers
the plan resizes, with the same rules the counter uses (one image; MACs =
multiply-accumulates; BatchNorm 0 MACs; biases count as parameters, not MACs):

* ``Conv2d``: ``H_out*W_out * C_out * C_in/groups * kh*kw`` MACs (a depthwise conv keeps
  ``groups == C_out``); with ``m`` implanted channels, ``m`` of the filters are 1x1 and
  cost ``H_out*W_out * m * C_in`` (HAP Neural Implant);
* ``ImplantConv2d``: its kept kxk filters plus its 1x1 filters, as above;
* ``Linear``: ``positions * C_out * C_in``; ``BatchNorm``: ``2*C`` parameters if affine.

Every other layer keeps its counted cost. The estimate therefore equals the real count
whenever torch-pruning resizes exactly the layers the groups name; the engine still counts
the realised model and falls back to counting every plan if the two ever disagree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from torch import nn

from leanconv.cost import count
from leanconv.layers.implant import ImplantConv2d
from leanconv.graph.groups import TracedGroup

__all__ = ["Cost", "CostModel"]


@dataclass(frozen=True)
class Cost:
    """Parameters and MACs (multiply-accumulates) for one image."""

    params: int
    macs: int

    def of(self, kind: str) -> int:
        return self.macs if kind == "macs" else self.params


@dataclass
class _Layer:
    module: nn.Module
    positions: int  # output positions per image: H_out*W_out (conv) or rows (linear)


def _positions(report, names: set[str]) -> dict[str, int]:
    """Output positions per image (H_out*W_out, or rows of a linear layer) of the named layers."""
    found = {}
    for row in report.layers:
        if row.name in names and row.output_shape:
            shape = row.output_shape
            per_call = math.prod(shape[:-1]) if row.type == "Linear" else math.prod(shape[1:])
            found[row.name] = per_call * row.calls
    return found


def _layer_cost(layer: _Layer, d_in: int, d_out: int, implanted: int) -> Cost:
    """Cost of a layer that lost ``d_in`` input and ``d_out`` output channels, with
    ``implanted`` of its remaining outputs turned into 1x1 implants."""
    m = layer.module
    if isinstance(m, ImplantConv2d):
        cin = m.in_channels - d_in
        kh, kw = m.conv.kernel_size
        weights = m.conv.out_channels * cin * kh * kw + m.implant.out_channels * cin
        bias = m.out_channels if m.conv.bias is not None else 0
        return Cost(weights + bias, weights * layer.positions)
    if isinstance(m, nn.Conv2d):
        cout = m.out_channels - d_out
        depthwise = 1 < m.groups == m.in_channels == m.out_channels
        cin = cout if depthwise else m.in_channels - d_in
        per_filter = (1 if depthwise else cin // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        weights = (cout - implanted) * per_filter + implanted * cin
        bias = cout if m.bias is not None else 0
        return Cost(weights + bias, weights * layer.positions)
    if isinstance(m, nn.Linear):
        cout, cin = m.out_features - d_out, m.in_features - d_in
        weights = cout * cin
        return Cost(weights + (cout if m.bias is not None else 0), weights * layer.positions)
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return Cost(2 * (m.num_features - d_out) if m.affine else 0, 0)
    raise TypeError(f"no cost rule for {type(m).__name__}")


class CostModel:
    """Estimated cost of removal plans on one model (see the module docstring)."""

    def __init__(self, model: nn.Module, traced: Sequence[TracedGroup], input_shape: Sequence[int]) -> None:
        self.traced = list(traced)
        base = count(model, input_shape)
        self.base = Cost(base.params, base.macs)
        names = {s.module for t in self.traced for s in t.shares}
        modules = dict(model.named_modules())
        positions = _positions(base, names)
        self.layers = {n: _Layer(modules[n], positions.get(n, 0)) for n in names}
        self._base_layers = {n: _layer_cost(layer, 0, 0, 0) for n, layer in self.layers.items()}

    def estimate(self, removed: Sequence[Sequence[int]], implanted: dict[int, dict[str, int]]) -> Cost:
        """Cost after removing ``removed[g]`` (channels of group ``g``) and implanting
        ``implanted[g][conv path]`` channels in kxk convs."""
        d_in = dict.fromkeys(self.layers, 0)
        d_out = dict.fromkeys(self.layers, 0)
        for t, gone in zip(self.traced, removed):
            if not gone:
                continue
            for share in t.shares:
                lost = sum(share.counts[k] for k in gone)
                both = isinstance(self.layers[share.module].module, nn.modules.batchnorm._BatchNorm)
                if share.kind == "in" and not both:
                    d_in[share.module] += lost
                else:
                    d_out[share.module] += lost
        extra: dict[str, int] = {}
        for per_conv in implanted.values():
            for path, n in per_conv.items():
                extra[path] = extra.get(path, 0) + n
        params, macs = self.base.params, self.base.macs
        for name, layer in self.layers.items():
            if d_in[name] or d_out[name] or extra.get(name):
                new = _layer_cost(layer, d_in[name], d_out[name], extra.get(name, 0))
                params += new.params - self._base_layers[name].params
                macs += new.macs - self._base_layers[name].macs
        return Cost(params, macs)
