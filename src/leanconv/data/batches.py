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


def _describe(value: Any) -> str:
    kind = "tensor" if torch.is_tensor(value) else type(value).__name__
    return f"{kind} {getattr(value, 'dtype', '')} {list(getattr(value, 'shape', []))}".replace("  ", " ")


def _pair(batch: Any, where: str, classes: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
        raise LeanconvError(f"{where}: every batch must be a pair (images, labels), got {type(batch).__name__}")
    x, y = batch[0], batch[1]
    if not (torch.is_tensor(x) and x.is_floating_point() and x.dim() == 4):
        raise LeanconvError(f"{where}: images must be a float torch tensor [N, C, H, W], got {_describe(x)}")
    if not (torch.is_tensor(y) and not y.is_floating_point() and y.dim() == 1 and len(y) == len(x)):
        raise LeanconvError(f"{where}: labels must be a torch tensor of one integer class index per image, got "
                            f"{_describe(y)}")
    if classes is not None and len(y) and (int(y.min()) < 0 or int(y.max()) >= classes):
        raise LeanconvError(f"{where}: labels must lie in [0, {classes}) for the model's {classes} outputs, got "
                            f"{int(y.min())}..{int(y.max())}")
    return x, y.long()


def _reiterable(source: Iterable | None, where: str) -> Iterable | None:
    """``source`` if it can be iterated more than once (a list, a DataLoader, ...)."""
    if source is not None and iter(source) is source:
        raise LeanconvError(f"{where}: a generator or iterator can be read only once; pass something that can be "
                            "iterated again, such as a list of batches or a DataLoader")
    return source


class Batches:
    """The loader view of one of the user's iterables: ``epoch(e)`` iterates it once more
    (a DataLoader reshuffles itself), stopping after ``limit`` images when given."""

    def __init__(self, source: Iterable, where: str, limit: int | None = None, classes: int | None = None):
        self.source, self.where, self.limit, self.classes = source, where, limit, classes

    def epoch(self, epoch: int = 0, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        seen = 0
        for batch in itertools.islice(iter(self.source), start_batch, None):
            if self.limit is not None and seen >= self.limit:
                return
            x, y = _pair(batch, self.where, self.classes)
            if self.limit is not None and seen + len(y) > self.limit:
                x, y = x[: self.limit - seen], y[: self.limit - seen]
            seen += len(y)
            yield x, y

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.epoch(0)

    def __len__(self) -> int:
        if self.limit is None:
            try:
                return len(self.source)  # type: ignore[arg-type]
            except TypeError:  # e.g. a DataLoader over an IterableDataset
                pass
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
                 test: Iterable | None = None, name: str = "user data", classes: int | None = None):
        if train is None and val is None:
            raise LeanconvError("no data: pass data=<an iterable of (images, labels) batches>, e.g. a DataLoader")
        self.name = name
        self.in_channels = None if example is None else int(example.shape[1])
        self.image_size = None if example is None else int(example.shape[-1])
        self.num_classes = classes  # labels are checked against it
        self._sources = {"train": _reiterable(train, "data"), "val": _reiterable(val, "val_data"),
                         "test": _reiterable(test, "test_data")}
        self._names = {"train": "data", "val": "val_data" if val is not None else "data", "test": "test_data"}
        if val is None:
            self._sources["val"] = self._sources["train"]
        self.train, self.val, self.test = (_Split(self._sources[s], self._names[s]) for s in ("train", "val", "test"))

    def has(self, which: str) -> bool:
        return self._sources[which] is not None

    def loader(self, which: str, batch_size: int, *, subset: int | None = None, **ignored: Any) -> Batches:
        """The batches of split ``which`` as given (``batch_size``, augmentation and resizing
        are the user pipeline's); ``subset`` caps the images per epoch."""
        if self._sources[which] is None:
            raise LeanconvError(f"this needs {self._names[which]}=<(images, labels) batches>")
        return Batches(self._sources[which], self._names[which], limit=subset, classes=self.num_classes)

    def scoring_batches(self, images: int, batch_size: int, resolution: int | None = None) -> list:
        """The first ``images`` of the validation batches (else the training batches)."""
        return list(self.loader("val", batch_size, subset=images).epoch(0))
