"""``TensorLoader``: fast, reproducible batches from an in-memory uint8 split.

Why not ``torch.utils.data.DataLoader``: the datasets here fit in memory, and per-image
Python transforms would dominate the cost of a small CNN. This loader gathers a batch with
one index, augments it with one batched gather and normalises it in place
(:mod:`leanconv.data.transforms`, single-threaded numpy so that the model keeps the cores).

Reproducibility: epoch ``e`` draws its shuffle order from a ``torch.Generator`` seeded from
``(seed, e)`` and its augmentation from one seeded from ``(seed, e, rank)``; all of an
epoch's random numbers are drawn up front. So any epoch, and any batch within it
(``start_batch``), can be regenerated on its own, which exact training resume needs.

Sharding (for DDP) follows ``torch.utils.data.DistributedSampler``: every rank computes the
same order, pads it by wrapping around (or truncates it with ``drop_last``) to a multiple of
``world_size`` and keeps every ``world_size``-th index starting at ``rank``.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from leanconv.data.transforms import crop_flip, default_pad, draw_crop_flip, normalize, resize
from leanconv.errors import LeanconvError

__all__ = ["TensorLoader", "epoch_generator", "SUBSET_SEED"]

SUBSET_SEED = 314159  # fixed: ``subset=n`` always picks the same n images


def epoch_generator(*key: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded by mixing the integers ``key`` (e.g. seed, epoch)."""
    state = np.random.SeedSequence([int(k) for k in key]).generate_state(1, dtype=np.uint64)[0]
    generator = torch.Generator()
    generator.manual_seed(int(state))
    return generator


def _check_int(label: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise LeanconvError(f"{label} must be an integer >= {low}, got {value!r}")
    return value


class TensorLoader:
    """Iterate normalised, optionally augmented and resized batches of a split.

    Args:
        data: a split with ``images`` uint8 ``[N, C, H, W]`` and ``labels`` int64 ``[N]``.
        batch_size: images per batch.
        mean, std: per-channel statistics in [0, 1] units (``DatasetSplits.mean``/``.std``).
        shuffle: new order every epoch (from ``seed`` and the epoch number).
        augment: random crop with zero padding ``pad`` (default ~side/8) and, when ``flip``,
            random horizontal mirroring.
        flip: allow the horizontal flip during augmentation (``DatasetSplits.flip_ok``).
        resolution: resize batches to this square side after augmentation; None keeps it.
        seed: the run's seed; together with the epoch it fixes order and augmentation.
        channels_last: return ``x`` in ``torch.channels_last`` memory format.
        drop_last: drop the last incomplete batch (and truncate, rather than pad, shards).
        subset: use only the first ``subset`` images of a fixed permutation (quick runs).
        rank, world_size: shard the data for distributed training.
        pad: random-crop padding in pixels; None picks ``default_pad(side)``.
    """

    def __init__(self, data: Any, batch_size: int, *, mean: Sequence[float], std: Sequence[float],
                 shuffle: bool = False, augment: bool = False, flip: bool = True,
                 resolution: int | None = None, seed: int = 0, channels_last: bool = False,
                 drop_last: bool = False, subset: int | None = None, rank: int = 0,
                 world_size: int = 1, pad: int | None = None) -> None:
        self.images, self.labels = data.images, data.labels
        if not hasattr(self.images, "numpy") or self.images.dtype != torch.uint8 \
                or self.images.dim() != 4 or len(self.images) != len(self.labels):
            raise LeanconvError("TensorLoader needs a split with uint8 images [N, C, H, W] and "
                                "one label per image; build it with leanconv.data.ImageSplit")
        self._images_np = self.images.numpy()  # shares memory; batches are built with numpy
        self.batch_size = _check_int("batch_size", batch_size, 1)
        channels, side = self.images.shape[1], self.images.shape[-1]
        if len(mean) != channels or len(std) != channels:
            raise LeanconvError(f"mean and std need {channels} values (one per channel), "
                                f"got {len(mean)} and {len(std)}")
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.shuffle, self.augment, self.flip = bool(shuffle), bool(augment), bool(flip)
        self.resolution = None if resolution is None else _check_int("resolution", resolution, 1)
        self.seed = int(seed)
        self.channels_last, self.drop_last = bool(channels_last), bool(drop_last)
        self.world_size = _check_int("world_size", world_size, 1)
        self.rank = _check_int("rank", rank, 0)
        if self.rank >= self.world_size:
            raise LeanconvError(f"rank {rank} must be below world_size {world_size}")
        self.pad = default_pad(side) if pad is None else _check_int("pad", pad, 0)
        self.indices = self._subset_indices(len(self.labels), subset)
        self._epoch = 0

    @staticmethod
    def _subset_indices(n: int, subset: int | None) -> torch.Tensor:
        if subset is None:
            return torch.arange(n)
        if isinstance(subset, bool) or not isinstance(subset, int) or not 1 <= subset <= n:
            raise LeanconvError(f"subset must be an integer in [1, {n}], got {subset!r}")
        perm = np.random.RandomState(SUBSET_SEED).permutation(n)[:subset]
        return torch.from_numpy(np.sort(perm))

    @property
    def num_samples(self) -> int:
        """Images this rank sees per epoch (before ``drop_last`` of a partial batch)."""
        total = len(self.indices)
        if self.drop_last:
            return total // self.world_size
        return math.ceil(total / self.world_size)

    def __len__(self) -> int:
        """Number of batches per epoch on this rank."""
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def order(self, epoch: int) -> torch.Tensor:
        """The indices into ``data`` that this rank visits in ``epoch``, in order."""
        order = self.indices
        if self.shuffle:
            generator = epoch_generator(self.seed, epoch, 0)
            order = order[torch.randperm(len(order), generator=generator)]
        if self.world_size > 1:
            needed = self.num_samples * self.world_size
            if needed > len(order):  # wrap around, as DistributedSampler does
                repeats = math.ceil(needed / len(order))
                order = order.repeat(repeats)
            order = order[:needed][self.rank::self.world_size]
        return order

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch that plain iteration (``for x, y in loader``) produces."""
        self._epoch = int(epoch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.epoch(self._epoch)

    def epoch(self, epoch: int, start_batch: int = 0
              ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(x float32 [B, C, R, R], y int64 [B])`` for ``epoch``, batches
        ``start_batch`` onwards (to resume inside an epoch)."""
        _check_int("start_batch", start_batch, 0)
        order = self.order(epoch)
        offsets = flips = None
        if self.augment:
            generator = epoch_generator(self.seed, epoch, 1, self.rank)
            offsets, flips = draw_crop_flip(len(order), self.pad, self.flip, generator)
        order_np = order.numpy()
        for b in range(start_batch, len(self)):
            part = slice(b * self.batch_size, (b + 1) * self.batch_size)
            images = self._images_np[order_np[part]]
            if offsets is not None:
                images = crop_flip(images, offsets[part], None if flips is None else flips[part],
                                   self.pad)
            yield self._finish(images), self.labels[order[part]]

    def _finish(self, images: np.ndarray) -> torch.Tensor:
        """uint8 numpy batch -> normalised float tensor in the requested size and layout."""
        x = images if self.resolution is None else resize(images, self.resolution)
        if self.channels_last:  # build NHWC memory directly; the permuted view is channels_last
            nhwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
            return torch.from_numpy(normalize(nhwc, self.mean, self.std, channel_axis=3)
                                    ).permute(0, 3, 1, 2)
        return torch.from_numpy(normalize(x, self.mean, self.std))
