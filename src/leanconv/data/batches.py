"""A user's own batches (a ``torch.utils.data.DataLoader``, or any iterable of ``(images,
labels)`` pairs) standing in for a :class:`~leanconv.data.splits.DatasetSplits`.

The Python API (``leanconv.prune(model, example_input, data=loader)``) takes the user's
loaders as they are: their batches are used as given (already normalised, augmented and
sized by the user's pipeline; leanconv's own augmentation and resizing do not apply), the
training loader for fine-tuning and BatchNorm re-estimation, the validation loader (else the
training one) for scoring, the test loader (when given) for accuracy. Images must be float
tensors ``[N, C, H, W]`` and labels integer class indices ``[N]``.
"""

from __future__ import annotations

import itertools
from typing import Any, Iterable, Iterator

import torch

from leanconv.errors import LeanconvError

__all__ = ["BatchData", "Batches"]


def _pair(batch: Any, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
        raise LeanconvError(f"{where}: every batch must be a pair (images, labels), got {type(batch).__name__}")
    x, y = batch[0], batch[1]
    if not (torch.is_tensor(x) and x.is_floating_point() and x.dim() == 4):
        raise LeanconvError(f"{where}: images must be a float tensor [N, C, H, W], got "
                            f"{getattr(x, 'dtype', type(x).__name__)} {list(getattr(x, 'shape', []))}")
    if not (torch.is_tensor(y) and not y.is_floating_point() and y.dim() == 1 and len(y) == len(x)):
        raise LeanconvError(f"{where}: labels must be one integer class index per image, got "
                            f"{getattr(y, 'dtype', type(y).__name__)} {list(getattr(y, 'shape', []))}")
    return x, y.long()


class Batches:
    """The loader view of one of the user's iterables: ``epoch(e)`` iterates it once more
    (a DataLoader reshuffles itself), stopping after ``limit`` images when given."""

    def __init__(self, source: Iterable, where: str, limit: int | None = None):
        self.source, self.where, self.limit = source, where, limit

    def epoch(self, epoch: int = 0, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        seen = 0
        for batch in itertools.islice(iter(self.source), start_batch, None):
            if self.limit is not None and seen >= self.limit:
                return
            x, y = _pair(batch, self.where)
            if self.limit is not None and seen + len(y) > self.limit:
                x, y = x[: self.limit - seen], y[: self.limit - seen]
            seen += len(y)
            yield x, y

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.epoch(0)

    def __len__(self) -> int:
        if self.limit is None and hasattr(self.source, "__len__"):
            return len(self.source)
        return sum(1 for _ in self.epoch(0))


class _Split:
    """What ``len(data.train)`` asks of a split: its number of images."""

    def __init__(self, source: Iterable | None, where: str):
        self.source, self.where = source, where
        self._n: int | None = None

    def __len__(self) -> int:
        if self.source is None:
            return 0
        if self._n is None:
            dataset = getattr(self.source, "dataset", None)
            try:
                self._n = len(dataset)  # type: ignore[arg-type]
            except TypeError:
                self._n = sum(len(y) for _, y in Batches(self.source, self.where).epoch(0))
        return self._n


class BatchData:
    """The user's loaders as the runs see a dataset (module docstring). ``example`` is one
    input batch (its shape fixes the model's input shape)."""

    def __init__(self, train: Iterable | None, example: torch.Tensor | None = None, *, val: Iterable | None = None,
                 test: Iterable | None = None, name: str = "user data"):
        if train is None and val is None:
            raise LeanconvError("no data: pass data=<an iterable of (images, labels) batches>, e.g. a DataLoader")
        self.name = name
        self.in_channels = None if example is None else int(example.shape[1])
        self.image_size = None if example is None else int(example.shape[-1])
        self.num_classes = None
        self._sources = {"train": train, "val": val if val is not None else train, "test": test}
        self.train, self.val, self.test = (_Split(self._sources[s], f"{s} data") for s in ("train", "val", "test"))

    def has(self, which: str) -> bool:
        return self._sources[which] is not None

    def loader(self, which: str, batch_size: int, *, subset: int | None = None, **ignored: Any) -> Batches:
        """The batches of split ``which`` as given (``batch_size``, augmentation and resizing
        are the user pipeline's); ``subset`` caps the images per epoch."""
        if self._sources[which] is None:
            raise LeanconvError(f"this needs {which} data: pass {which}_data=<batches> (or data= for training)")
        return Batches(self._sources[which], f"{which} data", limit=subset)

    def scoring_batches(self, images: int, batch_size: int, resolution: int | None = None) -> list:
        """The first ``images`` of the validation batches (else the training batches)."""
        return list(self.loader("val", batch_size, subset=images).epoch(0))
