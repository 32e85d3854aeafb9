"""Activation memory of one image during inference, measured by watching tensors live and die.

Approach: the model runs once (batch 1, eval mode, no gradients) under a
``TorchDispatchMode`` that sees every ATen operation. Each new tensor storage an operation
returns is recorded with a weak reference; before every operation the storages that Python
has already freed are dropped. ``peak`` is the largest sum of live activation storages seen
right after an operation (its inputs, its output and everything still referenced), which is
what eager PyTorch really holds at that moment. ``total`` is the sum of every activation
storage allocated during the pass, i.e. the memory needed if nothing were ever freed.

Counted: the input image and every operation's output storage (a view or an in-place result
shares its base's storage and is counted once). Not counted: parameters and buffers, and
scratch memory that kernels allocate internally (e.g. im2col workspaces). Units: bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from leanconv.util.model_io import example_input, run_forward
from leanconv.util.modes import eval_mode

__all__ = ["activation_memory"]


class _LiveStorages(TorchDispatchMode):
    """Tracks bytes of live activation storages across ATen calls."""

    def __init__(self, ignore: set[int]) -> None:
        super().__init__()
        self.ignore = ignore  # data pointers of parameter and buffer storages
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = 0
        self.peak = 0
        self.total = 0

    def track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key, nbytes = storage.data_ptr(), storage.nbytes()
        if nbytes == 0 or key in self.ignore:
            return
        known = self.live.get(key)
        if known is not None and not known[0].expired():
            return  # a view of, or an in-place write to, a storage already counted
        if known is not None:
            self.current -= known[1]
        self.live[key] = (StorageWeakRef(storage), nbytes)
        self.current += nbytes
        self.total += nbytes
        self.peak = max(self.peak, self.current)

    def sweep(self) -> None:
        for key, (ref, nbytes) in list(self.live.items()):
            if ref.expired():
                del self.live[key]
                self.current -= nbytes

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.sweep()
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.track(leaf)
        return out


def activation_memory(model: nn.Module, input_shape: Sequence[int]) -> dict[str, int]:
    """Activation memory of ``model`` for ONE image of shape ``input_shape`` (C, H, W), in bytes.

    Returns ``{"peak": ..., "total": ..., "input": ...}``: the most activation bytes alive at
    once, the bytes of all activations allocated in the pass, and the input image's bytes
    (included in both). Model modes are restored afterwards."""
    x = example_input(model, input_shape)
    ignore = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    tracker = _LiveStorages(ignore)
    with eval_mode(model), torch.no_grad():
        with tracker:
            tracker.track(x)
            output = run_forward(model, x)
        del output
    return {"peak": tracker.peak, "total": tracker.total, "input": x.untyped_storage().nbytes()}
