"""The in-memory dataset record: ``DatasetSplits`` with ``train``, ``val`` and ``test`` splits.

Images are kept as uint8 tensors ``[N, C, H, W]`` and labels as int64 ``[N]``; the loader
turns them into normalised float batches. The validation split is carved from the training
file by a permutation with a FIXED seed (``VAL_SEED``), independent of any training seed and
of torch's global RNG, so every run of every experiment validates on the same images and
the test set is never touched. The size rule is ``min(5000, len(train_file) // 10)``: 5000
for Fashion-MNIST and CIFAR, a tenth for small data such as the synthetic set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from leanconv.data.loader import TensorLoader
from leanconv.errors import LeanconvError
from leanconv.util.checks import brief
from leanconv.util.limits import MAX_IMAGES

__all__ = [
    "ImageSplit",
    "DatasetSplits",
    "VAL_SEED",
    "default_val_size",
    "carve_validation",
    "channel_stats",
    "make_splits",
    "carve_test",
    "user_data_options",
]

VAL_SEED = 20240607  # fixed forever: changing it changes every validation number ever reported


@dataclass(frozen=True, eq=False)
class ImageSplit:
    """One split: ``images`` uint8 ``[N, C, H, W]`` and ``labels`` int64 ``[N]``.

    Tensors are shared with the in-process cache of :func:`leanconv.data.load_dataset`:
    treat them as read-only.
    """

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        images, labels = self.images, self.labels
        lazy = getattr(images, "lazy_images", False)  # decoded from files when indexed (data.imagefolder)
        if not (isinstance(images, torch.Tensor) or lazy) or images.dtype != torch.uint8 or images.dim() != 4:
            raise LeanconvError("split images must be a uint8 tensor [N, C, H, W]; "
                                "convert them first")
        if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64 or labels.dim() != 1:
            raise LeanconvError("split labels must be an int64 tensor [N]; convert them first")
        if images.shape[0] != labels.shape[0]:
            raise LeanconvError(f"split has {images.shape[0]} images but {labels.shape[0]} labels")

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True, eq=False)
class DatasetSplits:
    """A dataset ready for training: three splits plus what a model and loader need to know.

    ``mean`` and ``std`` are per-channel statistics of the ``train`` split in [0, 1] pixel
    units; ``flip_ok`` says whether a horizontal flip keeps the label (true for natural
    images and clothes, false for digits or text).
    """

    name: str
    train: ImageSplit
    val: ImageSplit
    test: ImageSplit
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]
    flip_ok: bool

    def split(self, which: str) -> ImageSplit:
        """The split called ``which`` ("train", "val" or "test")."""
        if which not in ("train", "val", "test"):
            raise LeanconvError(f"unknown split {which!r}; choose train, val or test")
        return getattr(self, which)

    def loader(self, which: str, batch_size: int, **kwargs: Any) -> TensorLoader:
        """A :class:`TensorLoader` over split ``which`` with this dataset's ``mean``, ``std``
        and ``flip_ok`` filled in; other keyword arguments go to ``TensorLoader``."""
        kwargs.setdefault("mean", self.mean)
        kwargs.setdefault("std", self.std)
        kwargs.setdefault("flip", self.flip_ok)
        return TensorLoader(self.split(which), batch_size, **kwargs)

    def scoring_batches(self, images: int, batch_size: int, resolution: int | None = None) -> list:
        """The first ``images`` of the validation split as a list of batches: the fixed data
        every pruning decision is scored on (never the test split)."""
        loader = self.loader("val", batch_size, resolution=resolution, subset=min(images, len(self.val)))
        return list(loader.epoch(0))


def carve_test(labels: np.ndarray, seed: int, share: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (rest, test) index arrays: a fixed ``share`` of every class (at least one image of
    each class with two or more), so the test split has every class in proportion."""
    rng = np.random.RandomState(seed)
    test = []
    for k in np.unique(labels):
        members = np.flatnonzero(labels == k)
        take = int(round(share * len(members))) if len(members) >= 2 else 0
        test.append(members[rng.permutation(len(members))[:max(take, 1 if len(members) >= 2 else 0)]])
    test_idx = np.sort(np.concatenate(test)) if test else np.array([], dtype=np.int64)
    return np.setdiff1d(np.arange(len(labels)), test_idx), test_idx


def user_data_options(where: str, *, size: object, channels: object, val_size: object, flip_ok: object,
                      max_side: int) -> None:
    """One line for an option of a user's dataset spec that is not of its kind or range."""
    for name, value, low, high in (("size", size, 8, max_side), ("channels", channels, 1, 3),
                                   ("val_size", val_size, 0, MAX_IMAGES)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < low or (high and value > high):
            span = f"[{low}, {high}]" if high else f">= {low}"
            raise LeanconvError(f"{where} option {name} must be a whole number in {span}, got {brief(value)}")
    if channels not in (None, 1, 3):
        raise LeanconvError(f"{where} option channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
    if not isinstance(flip_ok, bool):
        raise LeanconvError(f"{where} option flip_ok must be true or false, got {brief(flip_ok)}")


def default_val_size(n_train_file: int) -> int:
    """5000 images, or a tenth of the training file when that is smaller."""
    return min(5000, n_train_file // 10)


def carve_validation(n: int, val_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Split ``range(n)`` into sorted (train, val) index arrays with ``len(val) == val_size``.

    Uses numpy's legacy ``RandomState(VAL_SEED)``, whose stream numpy keeps stable across
    versions, so the split never changes.
    """
    if not 0 <= val_size < n:
        raise LeanconvError(f"val_size must be in [0, {n - 1}] for {n} training images, "
                            f"got {val_size}")
    perm = np.random.RandomState(VAL_SEED).permutation(n)
    return np.sort(perm[val_size:]), np.sort(perm[:val_size])


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and (population) std of uint8 ``images`` in [0, 1] units.

    Computed from a 256-bin histogram per channel, so no float copy of the data is made.
    """
    values = torch.arange(256, dtype=torch.float64)
    means, stds = [], []
    for c in range(images.shape[1]):
        hist = torch.bincount(images[:, c].reshape(-1), minlength=256).to(torch.float64)
        total = hist.sum()
        mean = (hist * values).sum() / total
        var = (hist * (values - mean) ** 2).sum() / total
        means.append(float(mean / 255.0))
        stds.append(max(float(var.sqrt() / 255.0), 1e-6))
    return tuple(means), tuple(stds)


def _as_split(images: np.ndarray, labels: np.ndarray) -> ImageSplit:
    return ImageSplit(torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8)),
                      torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)))


def make_splits(name: str, train_images: np.ndarray, train_labels: np.ndarray,
                test_images: np.ndarray, test_labels: np.ndarray, *, classes: tuple[str, ...],
                flip_ok: bool, val_size: int | None = None) -> DatasetSplits:
    """Carve the validation split from the training file and assemble a :class:`DatasetSplits`.

    Images are uint8 numpy arrays ``[N, C, H, W]`` with square ``H == W``; labels are integer
    arrays with values in ``[0, len(classes))``.
    """
    user_data_options(name, size=None, channels=None, val_size=val_size, flip_ok=flip_ok, max_side=0)
    for part, labels in (("train", train_labels), ("test", test_labels)):
        if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
            raise LeanconvError(f"{name}: {part} labels fall outside [0, {len(classes) - 1}]; "
                                "the data files are corrupt or of another dataset")
    if val_size is None:
        val_size = default_val_size(len(train_labels))
    train_idx, val_idx = carve_validation(len(train_labels), val_size)
    train = _as_split(train_images[train_idx], train_labels[train_idx])
    val = _as_split(train_images[val_idx], train_labels[val_idx])
    test = _as_split(test_images, test_labels)
    mean, std = channel_stats(train.images)
    _, channels, height, width = train.images.shape
    if height != width:
        raise LeanconvError(f"{name}: images must be square, got {height}x{width}")
    return DatasetSplits(name=name, train=train, val=val, test=test, num_classes=len(classes),
                         in_channels=channels, image_size=height, mean=mean, std=std,
                         classes=tuple(classes), flip_ok=bool(flip_ok))
