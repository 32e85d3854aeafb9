"""Parameters and multiply-accumulates (MACs) of a model, layer by layer.

Units: one MAC is one multiply-accumulate ``acc += w * x``. FLOPs are reported as
``2 * MACs`` (the multiply and the add); nothing in leanconv calls a MAC a FLOP.

The counter runs one real forward pass on ONE image (batch 1) and counts with forward
hooks, so it counts what the model actually executes: a module called twice counts twice,
a module never called counts no MACs. Rules, per call:

* ``Conv1d/2d/3d``: ``out_elems * C_in / groups * prod(kernel)``. Bias adds are not
  counted (one add per output element, conventionally left out of MAC counts).
* ``ConvTranspose1d/2d/3d``: ``in_elems * C_out / groups * prod(kernel)``.
* ``Linear``: ``out_elems * in_features`` (bias not counted).
* ``BatchNorm``: 0, because at inference it folds into the preceding conv or linear
  layer; it is still listed so the reader sees it.
* ``LayerNorm``, ``GroupNorm``, ``InstanceNorm`` with affine weights, ``PReLU``:
  ``out_elems`` (one scale per element; normalisation statistics are not counted).
* Any module defining ``count_macs(self, input, output) -> int`` is counted by that method
  (MACs of the whole call, whole batch) and its children are not visited.
* Modules without parameters of their own (activations, pooling, containers) and tensor
  operations written in ``forward`` (residual adds) count 0 and are not listed.
* A module that owns parameters directly and matches none of the above raises
  :class:`~leanconv.errors.LeanconvError` when it is called: it is never counted as zero.

``params`` is every parameter tensor of the model counted once (shared tensors once),
whether or not its layer runs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from leanconv.util.model_io import check_shape, example_input, run_forward
from leanconv.errors import LeanconvError
from leanconv.util.modes import eval_mode

__all__ = ["LayerCost", "CostReport", "count"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerCost:
    """One counted module. ``macs`` sums all of its calls (multiply-accumulates, one image);
    ``params`` are its own parameters (the whole subtree for a ``count_macs`` module);
    ``output_shape`` is the output of its last call without the batch dimension, ``None``
    if it was never called."""

    name: str
    type: str
    params: int
    macs: int
    output_shape: tuple[int, ...] | None
    calls: int = 1

    def to_dict(self) -> dict[str, Any]:
        shape = list(self.output_shape) if self.output_shape is not None else None
        return {"name": self.name, "type": self.type, "params": self.params, "macs": self.macs,
                "output_shape": shape, "calls": self.calls}


@dataclass(frozen=True)
class CostReport:
    """Totals for one image: ``params`` (count), ``macs`` (multiply-accumulates); ``flops`` is
    ``2 * macs``. ``layers`` lists counted modules in the order they first ran."""

    params: int
    macs: int
    layers: list[LayerCost] = field(default_factory=list)
    input_shape: tuple[int, ...] = ()

    @property
    def flops(self) -> int:
        """Floating-point operations: 2 per MAC (one multiply, one add)."""
        return 2 * self.macs

    def to_dict(self) -> dict[str, Any]:
        return {"params": self.params, "macs": self.macs, "flops": self.flops,
                "input_shape": list(self.input_shape), "layers": [row.to_dict() for row in self.layers]}


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        for item in value:
            found = _first_tensor(item)
            if found is not None:
                return found
    if isinstance(value, dict):
        return _first_tensor(list(value.values()))
    return None


def _conv_macs(m: nn.modules.conv._ConvNd, x: torch.Tensor, y: torch.Tensor) -> int:
    kernel = math.prod(m.kernel_size)
    if m.transposed:
        return x.numel() * (m.out_channels // m.groups) * kernel
    return y.numel() * (m.in_channels // m.groups) * kernel


def _elementwise_macs(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    return y.numel() if any(True for _ in m.parameters(recurse=False)) else 0


# (module class, MACs of one call); first isinstance match wins.
_RULES: list[tuple[type, Callable[[Any, torch.Tensor, torch.Tensor], int]]] = [
    (nn.modules.conv._ConvNd, _conv_macs),
    (nn.Linear, lambda m, x, y: y.numel() * m.in_features),
    (nn.modules.batchnorm._BatchNorm, lambda m, x, y: 0),
    (nn.LayerNorm, _elementwise_macs),
    (nn.GroupNorm, _elementwise_macs),
    (nn.modules.instancenorm._InstanceNorm, _elementwise_macs),
    (nn.PReLU, _elementwise_macs),
]


def _rule_for(module: nn.Module) -> Callable[[Any, torch.Tensor, torch.Tensor], int] | None:
    for cls, rule in _RULES:
        if isinstance(module, cls):
            return rule
    return None


def _own_counter(module: nn.Module) -> bool:
    return callable(getattr(module, "count_macs", None))


def _owns_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False))


def _display(path: str) -> str:
    return path or "<model>"


def _layer_macs(module: nn.Module, path: str, inputs: Any, output: Any) -> int:
    """MACs of one call of ``module`` (at ``path``) given its inputs and output.

    Raises :class:`LeanconvError` for a module that owns parameters but has no rule."""
    if _own_counter(module):
        return int(module.count_macs(_first_tensor(inputs), output))
    rule = _rule_for(module)
    if rule is not None:
        x, y = _first_tensor(inputs), _first_tensor(output)
        if x is None or y is None:
            raise LeanconvError(f"layer {_display(path)} ({type(module).__name__}) was called without tensors; "
                                "leanconv cannot count it")
        return int(rule(module, x, y))
    if _owns_params(module):
        raise LeanconvError(
            f"leanconv cannot count layer {_display(path)} of type {type(module).__name__}: it owns parameters "
            "but is not a known layer; give it a count_macs(self, input, output) -> int method"
        )
    return 0


def _modules_to_count(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules that get a hook, in definition order; no descent below a ``count_macs`` module;
    a module reachable at several paths is hooked once (under its first path)."""
    found: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()

    def visit(path: str, module: nn.Module) -> None:
        if id(module) in seen:
            return
        seen.add(id(module))
        if _own_counter(module) or _rule_for(module) is not None or _owns_params(module):
            found.append((path, module))
        if _own_counter(module):
            return
        for name, child in module.named_children():
            visit(f"{path}.{name}" if path else name, child)

    visit("", model)
    return found


class _Tally:
    """Per-module accumulator filled by the forward hooks."""

    def __init__(self) -> None:
        self.macs: dict[str, int] = {}
        self.calls: dict[str, int] = {}
        self.shapes: dict[str, tuple[int, ...] | None] = {}
        self.order: list[str] = []

    def hook(self, path: str) -> Callable[..., None]:
        def on_forward(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            macs = _layer_macs(module, path, (args, kwargs), output)
            if path not in self.calls:
                self.order.append(path)
            self.macs[path] = self.macs.get(path, 0) + macs
            self.calls[path] = self.calls.get(path, 0) + 1
            out = _first_tensor(output)
            self.shapes[path] = tuple(out.shape[1:]) if out is not None and out.dim() > 0 else None
        return on_forward


def _row_params(module: nn.Module) -> int:
    recurse = _own_counter(module)
    return sum(p.numel() for p in module.parameters(recurse=recurse))


def count(model: nn.Module, input_shape: Sequence[int]) -> CostReport:
    """Count parameters and MACs of ``model`` for ONE image of shape ``input_shape`` (C, H, W).

    The model runs once, in eval mode and without gradients; every module's mode is restored
    afterwards. Returns a :class:`CostReport` (``macs`` = multiply-accumulates,
    ``flops`` = 2 x MACs)."""
    shape = check_shape(input_shape)
    targets = _modules_to_count(model)
    tally = _Tally()
    handles = [m.register_forward_hook(tally.hook(path), with_kwargs=True) for path, m in targets]
    try:
        with eval_mode(model), torch.no_grad():
            run_forward(model, example_input(model, shape))
    finally:
        for handle in handles:
            handle.remove()
    by_path = dict(targets)
    rows = [LayerCost(_display(p), type(by_path[p]).__name__, _row_params(by_path[p]), tally.macs[p],
                      tally.shapes[p], tally.calls[p]) for p in tally.order]
    for path, module in targets:
        if path not in tally.calls and _row_params(module) > 0:
            log.warning("layer %s owns parameters but never ran; it counts 0 MACs", _display(path))
            rows.append(LayerCost(_display(path), type(module).__name__, _row_params(module), 0, None, 0))
    params = sum(p.numel() for p in model.parameters())
    return CostReport(params=params, macs=sum(r.macs for r in rows), layers=rows, input_shape=shape)
