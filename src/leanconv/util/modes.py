"""Module train/eval modes: run a model in eval mode and put every module's own mode back.

The lowest layer of leanconv (imports only ``torch``), so that cost counting, importance
criteria, pruning and search can all share it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

__all__ = ["eval_mode"]


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode; restore each module's own ``training`` flag on exit (a model
    may mix modes, e.g. frozen BatchNorm inside a training model). Yields ``model``."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training
