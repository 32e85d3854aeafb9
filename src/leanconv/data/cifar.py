"""CIFAR-10 and CIFAR-100 (Krizhevsky, 2009): 32x32 colour images, 50,000 train + 10,000 test.

Read from a user's directory holding the "python version" batches: CIFAR-10's
``data_batch_1`` .. ``data_batch_5``, ``test_batch`` and ``batches.meta``
(folder ``cifar-10-batches-py``); CIFAR-100's ``train``, ``test`` and ``meta`` (folder
``cifar-100-python``). ``data_dir`` may be that folder or its parent. Each batch is a
pickled dict with bytes keys: ``b'data'`` uint8 ``[N, 3072]`` (R, G, B planes of 32x32),
``b'labels'`` (CIFAR-10) or ``b'fine_labels'`` (CIFAR-100), ``b'batch_label'``,
``b'filenames'``. Batches are parsed with :mod:`leanconv.data.safe_pickle`, never plain
``pickle.load``, and their structure is checked before use. Train splits into
45,000 train + 5,000 val (fixed split); horizontal flips keep the label.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from leanconv.data.safe_pickle import load_array_pickle
from leanconv.data.splits import DatasetSplits, make_splits
from leanconv.errors import LeanconvError

__all__ = ["CIFAR10_CLASSES", "read_cifar_batch", "read_cifar", "load_cifar10", "load_cifar100"]

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")

# name -> (folder, train files, test file, meta file, label key, meta names key, classes)
_LAYOUT: dict[str, tuple[str, tuple[str, ...], str, str, bytes, bytes, int]] = {
    "cifar10": ("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)),
                "test_batch", "batches.meta", b"labels", b"label_names", 10),
    "cifar100": ("cifar-100-python", ("train",), "test", "meta", b"fine_labels",
                 b"fine_label_names", 100),
}


def read_cifar_batch(path: str | Path, label_key: bytes, num_classes: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Parse one batch file into images uint8 ``[N, 3, 32, 32]`` and labels int64 ``[N]``."""
    batch = load_array_pickle(path)
    if not isinstance(batch, dict):
        raise LeanconvError(f"{path} is not a CIFAR batch (a {type(batch).__name__}, not a dict)")
    data, labels = batch.get(b"data"), batch.get(label_key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3072:
        got = (f"{data.dtype} {list(data.shape)}" if isinstance(data, np.ndarray)
               else type(data).__name__)
        raise LeanconvError(f"{path}: b'data' must be a uint8 array [N, 3072], got {got}")
    if not len(data):  # a real batch holds 10,000 images: an empty one is a broken or cut file
        raise LeanconvError(f"{path} holds no images (b'data' has 0 rows); extract the CIFAR archive again")
    if not isinstance(labels, (list, np.ndarray)) or len(labels) != len(data):
        raise LeanconvError(f"{path}: {label_key!r} must list {len(data)} labels")
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise LeanconvError(f"{path}: {label_key!r} must hold integers")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise LeanconvError(f"{path}: labels fall outside [0, {num_classes - 1}]")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _find_dir(name: str, data_dir: str | Path | None) -> Path:
    folder, train_files = _LAYOUT[name][0], _LAYOUT[name][1]
    if data_dir is None:
        raise LeanconvError(f"{name} needs --data-dir pointing at the extracted {folder} folder "
                            "(the 'python version' batches)")
    root = Path(data_dir)
    for candidate in (root, root / folder):
        if (candidate / train_files[0]).is_file():
            return candidate
    raise LeanconvError(f"{name} file {train_files[0]} is missing from {root} and {root / folder}; "
                        f"pass --data-dir pointing at the extracted {folder} folder")


def _class_names(directory: Path, meta_file: str, names_key: bytes, count: int) -> tuple[str, ...]:
    """Class names from the meta file when it is present and well formed, else defaults."""
    path = directory / meta_file
    names: Any = None
    if path.is_file():
        meta = load_array_pickle(path)
        names = meta.get(names_key) if isinstance(meta, dict) else None
    if isinstance(names, list) and len(names) == count and all(isinstance(n, bytes) for n in names):
        return tuple(n.decode("utf-8", "replace") for n in names)
    if count == len(CIFAR10_CLASSES):
        return CIFAR10_CLASSES
    return tuple(f"class_{i}" for i in range(count))


def read_cifar(name: str, data_dir: str | Path | None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple[str, ...]]:
    """Parse ``name`` ("cifar10" or "cifar100") into (train_images, train_labels, test_images,
    test_labels, class names)."""
    folder, train_files, test_file, meta_file, label_key, names_key, count = _LAYOUT[name]
    directory = _find_dir(name, data_dir)
    parts = []
    for filename in (*train_files, test_file):
        path = directory / filename
        if not path.is_file():
            raise LeanconvError(f"{name} file {filename} is missing from {directory}; "
                                f"extract the complete {folder} archive there")
        parts.append(read_cifar_batch(path, label_key, count))
    train_x = np.concatenate([p[0] for p in parts[:-1]])
    train_y = np.concatenate([p[1] for p in parts[:-1]])
    classes = _class_names(directory, meta_file, names_key, count)
    return train_x, train_y, parts[-1][0], parts[-1][1], classes


def _load(name: str, data_dir: str | Path | None, val_size: int | None,
          flip_ok: bool) -> DatasetSplits:
    train_x, train_y, test_x, test_y, classes = read_cifar(name, data_dir)
    return make_splits(name, train_x, train_y, test_x, test_y, classes=classes, flip_ok=flip_ok,
                       val_size=val_size)


def load_cifar10(data_dir: str | Path | None = None, *, val_size: int | None = None,
                 flip_ok: bool = True) -> DatasetSplits:
    """CIFAR-10 as :class:`DatasetSplits` (45,000 / 5,000 / 10,000, 3 channels, 32 px)."""
    return _load("cifar10", data_dir, val_size, flip_ok)


def load_cifar100(data_dir: str | Path | None = None, *, val_size: int | None = None,
                  flip_ok: bool = True) -> DatasetSplits:
    """CIFAR-100 (fine labels) as :class:`DatasetSplits` (45,000 / 5,000 / 10,000)."""
    return _load("cifar100", data_dir, val_size, flip_ok)
