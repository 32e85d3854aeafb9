"""Build a model on PyTorch's ``meta`` device first, to learn its size before allocating it.

Tensors on the meta device have shapes and dtypes but no storage, so a model described by
untrusted numbers (a checkpoint header, ``--arg`` values) can be built there for free and
compared with what it may be. While :func:`meta_build` runs, global registration hooks count
every module, parameter and buffer registered: past ``max_elements`` tensor elements or
``max_modules`` modules the build stops at once (the count includes modules built and then
replaced), so neither a huge layer nor a loop that builds millions of layers gets far.

:func:`meta_run` then runs such a model on one meta image: it learns, again for free,
whether the layers chain at that input shape and how large each layer's output would be.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence, TypeVar

import torch
from torch.nn.modules import module as _module

__all__ = ["meta_build", "meta_run", "BuildLimit", "MAX_MODULES"]

MAX_MODULES = 100_000  # modules one build may register (ResNet-110: about 500)
T = TypeVar("T")


class BuildLimit(BaseException):
    """A meta build went past its limits. A ``BaseException`` so that a constructor's own
    ``except Exception`` cannot swallow it; the caller of :func:`meta_build` catches it."""

    def __init__(self, what: str, count: int, limit: int):
        super().__init__(f"{count:,} {what} (limit {limit:,})")
        self.what, self.count, self.limit = what, count, limit


class _Counter:
    def __init__(self, max_elements: int, max_modules: int):
        self.elements = self.modules = 0
        self.max_elements, self.max_modules = max_elements, max_modules

    def tensor(self, module, name, tensor):
        if tensor is not None:
            self.elements += math.prod(tensor.shape)
            if self.elements > self.max_elements:
                raise BuildLimit("tensor elements", self.elements, self.max_elements)

    def module(self, parent, name, child):
        self.modules += 1
        if self.modules > self.max_modules:
            raise BuildLimit("modules", self.modules, self.max_modules)


def meta_build(build: Callable[[], T], *, max_elements: int, max_modules: int = MAX_MODULES) -> tuple[T, int]:
    """Run ``build()`` with the meta device as default and return (its result, the tensor
    elements it registered). Raises :class:`BuildLimit` past a limit; any other exception of
    ``build`` propagates."""
    counter = _Counter(max_elements, max_modules)
    handles = [_module.register_module_parameter_registration_hook(counter.tensor),
               _module.register_module_buffer_registration_hook(counter.tensor),
               _module.register_module_module_registration_hook(counter.module)]
    try:
        with torch.device("meta"):
            return build(), counter.elements
    finally:
        for handle in handles:
            handle.remove()


def meta_run(model: torch.nn.Module, input_shape: Sequence[int], *, max_values: int) -> torch.Tensor:
    """Run ``model`` (built on the meta device, in eval mode) on one meta image of
    ``input_shape`` and return its (meta) output. Raises :class:`BuildLimit` when one module
    outputs more than ``max_values`` values for that image; any other exception of the forward
    pass (layers that do not chain) propagates."""
    def count(module, inputs, output):
        if isinstance(output, torch.Tensor) and output.numel() > max_values:
            raise BuildLimit(f"values from {type(module).__name__}", output.numel(), max_values)

    parameter = next(iter(model.parameters()), None)
    dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32
    handle = _module.register_module_forward_hook(count)
    try:
        with torch.no_grad():
            return model.eval()(torch.empty(1, *input_shape, device="meta", dtype=dtype))
    finally:
        handle.remove()
