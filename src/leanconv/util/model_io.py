"""Helpers shared by the cost measurements: check an input shape, build an example batch,
run a model and turn its shape errors into one-line messages (eval mode:
:func:`leanconv.util.modes.eval_mode`).

Inputs follow the model: every batch or example input leanconv feeds a model goes through
:func:`to_model` or :func:`example_input`, which put it on the model's device and in its
floating dtype (:func:`model_dtype`), so a float64 or float16 model takes the float32 batches
of the data loaders as they are."""

from __future__ import annotations

import itertools
import numbers
import operator
from collections.abc import Sequence

import torch
from torch import nn

from leanconv.errors import LeanconvError

__all__ = ["check_shape", "example_input", "run_forward", "model_device", "model_dtype", "to_model", "output_classes",
           "check_classes", "LOW_PRECISION", "check_trainable"]

LOW_PRECISION = (torch.float16, torch.bfloat16)  # evaluated, profiled, folded, exported; never trained here


def check_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    """Return ``input_shape`` (one image, normally ``(C, H, W)``) as a tuple of positive ints."""
    try:
        shape = tuple(operator.index(s) for s in input_shape)  # whole numbers only: 16.5 is not truncated
    except TypeError:
        raise LeanconvError(f"input shape {input_shape!r} must be a sequence of integers such as (3, 32, 32)") from None
    if not shape or any(s < 1 for s in shape):
        raise LeanconvError(f"input shape {input_shape!r} must be positive integers such as (3, 32, 32)")
    return shape


def example_input(model: nn.Module, input_shape: Sequence[int], batch_size: int = 1) -> torch.Tensor:
    """A reproducible random batch ``[batch_size, *input_shape]`` on the model's device, in the
    dtype of its first floating-point parameter (float32 for a parameter-free model)."""
    shape = check_shape(input_shape)
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise LeanconvError(f"batch size must be at least 1, got {batch_size}")
    gen = torch.Generator().manual_seed(0)
    try:
        return to_model(torch.randn((batch_size, *shape), generator=gen), model)
    except RuntimeError as exc:  # e.g. the allocator refuses
        raise LeanconvError(f"cannot make an input batch of shape {(batch_size, *shape)} "
                            f"({str(exc).strip().splitlines()[0]}); check the input shape") from exc


def run_forward(model: nn.Module, x: torch.Tensor) -> object:
    """Call ``model(x)``; a shape or dtype mismatch becomes a one-line :class:`LeanconvError`."""
    try:
        return model(x)
    except LeanconvError:
        raise
    except (RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LeanconvError(
            f"the model failed on an input of shape {tuple(x.shape[1:])}: {first}; check the input shape"
        ) from exc


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    ref = next(iter(model.parameters()), None)
    return ref.device if ref is not None else torch.device("cpu")


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (else buffer; float32 for a
    model with neither): the dtype its inputs must have."""
    for t in itertools.chain(model.parameters(), model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def to_model(x: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """``x`` on ``model``'s device; a floating-point ``x`` (images) also in the model's dtype
    (:func:`model_dtype`), keeping its memory format. Integer tensors (labels) keep their dtype."""
    if x.is_floating_point():
        return x.to(device=model_device(model), dtype=model_dtype(model))
    return x.to(model_device(model))


def output_classes(model: nn.Module, input_shape: Sequence[int]) -> int | None:
    """The number of logits ``model`` gives one input of ``input_shape`` (None when its output
    is not ``[N, K]``)."""
    with torch.no_grad():
        was = model.training
        out = run_forward(model.eval(), example_input(model, input_shape))
        model.train(was)
    return int(out.shape[-1]) if torch.is_tensor(out) and out.dim() == 2 else None


def check_classes(model: nn.Module, input_shape: Sequence[int], classes: int) -> None:
    """Raise :class:`LeanconvError` unless ``model`` maps one input of ``input_shape`` to
    ``classes`` logits (a user's constructor may not take ``num_classes``)."""
    got = output_classes(model, input_shape)
    if got != classes:
        raise LeanconvError(f"the model outputs {got if got is not None else 'no [batch, classes]'} logits but "
                            f"the data has {classes}; build it for {classes} classes (a constructor argument "
                            "num_classes is passed when it takes one)")


def check_trainable(model: nn.Module, what: str) -> None:
    """Refuse a float16 or bfloat16 model (``what`` names it) for work that trains it or takes
    its gradients: with an 11-bit (8-bit) mantissa an SGD step below ~1/2048 of a weight is
    rounded away, and Hessian-vector products lose their digits (measured on a CPU, ResNet-20:
    4% relative error in eval mode, NaN in train mode). Evaluating, profiling, folding and
    exporting such a model need none of that and are allowed."""
    dtype = model_dtype(model) if isinstance(model, nn.Module) else None
    if dtype in LOW_PRECISION:
        name = str(dtype).removeprefix("torch.")
        raise LeanconvError(f"{what} holds {name} weights, which leanconv evaluates, profiles, folds and exports but "
                            f"does not train, score or prune ({name} loses small updates); convert it first: "
                            f"leanconv.save(leanconv.load(PATH).float(), NEW_PATH)")
