"""Fine-tuning a compressed model, and re-estimating its BatchNorm statistics.

Every compression path (width pruning, 3-D samples and the chosen model, converted layers)
fine-tunes through :func:`finetune`: the shared loop (:func:`leanconv.train.loop.fit`),
then BatchNorm statistics re-estimated on un-augmented training images
(:func:`recalibrate_on_training_data`), which is also how a cut is judged right after it is
made.
"""

from __future__ import annotations

import torch
from torch import nn

from leanconv.train.loop import Loader, Loss, TrainConfig, fit
from leanconv.util.batchnorm import reestimate_batchnorm
from leanconv.util.progress import Progress

__all__ = ["recalibrate_bn", "recalibrate_on_training_data", "finetune"]


@torch.no_grad()
def recalibrate_bn(model: nn.Module, loader: Loader, max_batches: int = 50, channels_last: bool = True) -> int:
    """Re-estimate BatchNorm running statistics on ``loader`` (cumulative average over at most
    ``max_batches`` batches, weights untouched). Returns the number of BN layers reset."""
    images = (x.contiguous(memory_format=torch.channels_last) if channels_last else x for x, _ in loader.epoch(0))
    return reestimate_batchnorm(model, images, max_batches=max_batches)


def recalibrate_on_training_data(model: nn.Module, data, resolution: int | None = None, batch_size: int = 128) -> None:
    """Re-estimate BatchNorm statistics on up to 6,400 un-augmented training images of ``data``
    (a ``DatasetSplits``): what every fine-tuning ends with."""
    recalibrate_bn(model, data.loader("train", batch_size, resolution=resolution, subset=min(6400, len(data.train))))


def finetune(model: nn.Module, data, *, epochs: int, lr: float, seed: int = 0, batch_size: int = 128,
             resolution: int | None = None, images: int | None = None, progress: Progress | None = None,
             loss: Loss | None = None) -> None:
    """Fine-tune ``model`` in place on the training split of ``data`` (a ``DatasetSplits``):
    ``epochs`` of the shared loop (augmented, cosine from ``lr``) on the first ``images``
    training images (all when None), then re-estimate BatchNorm statistics on up to 6,400
    un-augmented training images. Leaves plain NCHW weights, which the pruning engine's
    dependency graph traces. Every compression path (pruning, 3-D samples, converted layers)
    fine-tunes through here. ``loss`` replaces cross-entropy (``leanconv.train.loop.Loss``:
    distillation, a group-lasso penalty)."""
    if epochs <= 0:
        return
    n = len(data.train) if images is None else min(int(images), len(data.train))
    train = data.loader("train", min(batch_size, n), shuffle=True, augment=True, resolution=resolution, seed=seed,
                        drop_last=True, subset=None if images is None else n)
    try:
        fit(model, train, TrainConfig(epochs=epochs, lr=lr, seed=seed), progress=progress, loss=loss)
        recalibrate_on_training_data(model, data, resolution, batch_size)
    finally:  # plain NCHW weights again, also when a batch was refused half-way
        model.to(memory_format=torch.contiguous_format)
