"""Re-estimating BatchNorm running statistics on a few batches ("adaptive BN").

After channels are cut, the running mean and variance a BatchNorm layer learned on the
unpruned network no longer describe its inputs. Re-estimating them, weights untouched, is
what fine-tuning ends with (:mod:`leanconv.train.finetune`) and what judges a cut right after
it is made: EagleEye's adaptive-BN evaluation (Li et al., ECCV 2020, Sec. 3.2) re-estimates
them on a few training batches before a candidate's validation accuracy is measured.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from leanconv.util.model_io import to_model

__all__ = ["reestimate_batchnorm", "reestimating"]


@contextmanager
def reestimating(model: nn.Module) -> Iterator[list[nn.Module]]:
    """Within the block, every BatchNorm layer of ``model`` that tracks running statistics has
    them reset and accumulates a cumulative average (momentum None) over what ``model`` runs,
    in training mode; each layer's momentum and the model's train/eval mode are restored after.
    Yields those layers (none: nothing is changed)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        yield norms
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: every batch counts the same
    was_training = model.training
    model.train()
    try:
        yield norms
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, inputs: Iterable[Tensor | tuple[Tensor, Tensor]], *,
                         max_batches: int | None = None) -> int:
    """Reset the running statistics of every BatchNorm layer of ``model`` that tracks them and
    re-estimate them as the cumulative average (momentum None) over ``inputs``: image tensors
    or ``(images, labels)`` batches, at most ``max_batches`` of them (all when None). Weights
    are untouched; each layer's momentum and the model's train/eval mode are restored. Returns
    the number of layers reset (0: nothing was run)."""
    with reestimating(model) as norms:
        if norms:
            for batch in itertools.islice(inputs, None if max_batches is None else max(0, max_batches)):
                x = batch if torch.is_tensor(batch) else batch[0]
                model(to_model(x, model))
    return len(norms)
