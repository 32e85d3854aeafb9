"""Resolution pruning: run a model on smaller square inputs.

Paper: Wang, Li, Zhang et al., "Accelerate CNNs from Three Dimensions: A Comprehensive
Pruning Framework" (ICML 2021), the resolution dimension ``r`` = input side / original side
(methods.md, section 1). Conv MACs scale with ``r^2``; the classifier after global pooling
does not, so a model's MACs fall by a little less than ``r^2``.

Nothing in the weights changes: the new side is recorded in ``model.leanconv_meta
["input_shape"]`` (``[C, side, side]``), which checkpoints keep and which ``leanconv train``,
``eval`` and ``profile`` read to resize the data (``leanconv.cli.common.resolution_of``) and
to count costs. The zoo's models pool adaptively, so any side >= 8 runs.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from leanconv.errors import LeanconvError
from leanconv.util.modes import eval_mode

__all__ = ["MIN_SIDE", "set_resolution", "resolution_ratio_to_side"]

MIN_SIDE = 8  # the smallest side leanconv accepts (docs/design.md, "Models")


def _check_side(side: object, label: str) -> int:
    if isinstance(side, bool) or not isinstance(side, int):
        raise LeanconvError(f"{label} must be a whole number of pixels, got {side!r}")
    if side < MIN_SIDE:
        raise LeanconvError(f"{label} must be at least {MIN_SIDE} pixels, got {side}")
    return side


def resolution_ratio_to_side(r: float, original_side: int) -> int:
    """The input side for resolution ratio ``r`` (> 0) of ``original_side``: ``r *
    original_side`` rounded to the nearest integer (halves up), never below 8."""
    original_side = _check_side(original_side, "the original input side")
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or r <= 0:
        raise LeanconvError(f"resolution ratio must be a positive number, got {r!r}")
    return max(MIN_SIDE, math.floor(r * original_side + 0.5))


def _channels(model: nn.Module, in_channels: int | None) -> int:
    shape = getattr(model, "leanconv_meta", {}).get("input_shape")
    if shape is not None:
        return int(shape[0])
    if in_channels is None:
        raise LeanconvError("the model records no input shape; pass in_channels to set its resolution")
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise LeanconvError(f"in_channels must be a positive whole number, got {in_channels!r}")
    return in_channels


def _check_runs(model: nn.Module, shape: list[int]) -> None:
    """One forward pass of a zero image of ``shape`` in eval mode; modes restored."""
    ref = next(iter(model.parameters()), None)
    x = torch.zeros((1, *shape)) if ref is None else torch.zeros((1, *shape), device=ref.device, dtype=ref.dtype)
    with eval_mode(model), torch.no_grad():
        try:
            model(x)
        except (RuntimeError, ValueError, TypeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise LeanconvError(f"the model does not run at input side {shape[-1]} ({first}); "
                                "choose a larger side") from exc


def set_resolution(model: nn.Module, side: int, *, in_channels: int | None = None) -> nn.Module:
    """Make ``model`` expect square inputs of ``side`` pixels; returns ``model``.

    Checks ``side >= 8`` and that the model runs at that side, then records
    ``[C, side, side]`` in ``model.leanconv_meta["input_shape"]`` (``C`` from the recorded
    shape, else ``in_channels``). The weights are untouched; fine-tune at the new side.
    """
    side = _check_side(side, "input side")
    shape = [_channels(model, in_channels), side, side]
    _check_runs(model, shape)
    meta = dict(getattr(model, "leanconv_meta", None) or {})
    meta["input_shape"] = shape
    model.leanconv_meta = meta
    return model
