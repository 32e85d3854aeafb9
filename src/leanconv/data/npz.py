"""A user's own arrays in a NumPy ``.npz`` file (``--data npz:PATH``).

The file holds ``x`` (images) and ``y`` (integer labels ``0..K-1``), and optionally
``x_test``/``y_test`` and ``x_val``/``y_val``. Images are ``[N, H, W]`` (grayscale),
``[N, H, W, C]`` or ``[N, C, H, W]`` with ``C`` 1 or 3, uint8 or floats in [0, 1] (cropped
to a centred square). Without test arrays a fixed tenth of every class is the test split; without validation arrays the
validation split is carved from the training images as for every dataset. ``size`` and
``channels`` resize and convert (default: the model's when a checkpoint records them, else
the arrays' own). The file is read with ``allow_pickle=False``: an object array is refused,
never unpickled.
"""

from __future__ import annotations

import math
import zipfile
from pathlib import Path

import numpy as np
import torch

from leanconv.data.splits import (DatasetSplits, ImageSplit, carve_test, carve_validation, channel_stats,
                                  default_val_size, user_data_options)
from leanconv.data.transforms import resize
from leanconv.errors import LeanconvError
from leanconv.util.inputs import input_file
from leanconv.util.limits import MAX_ARRAY_BYTES

__all__ = ["load_npz"]

TEST_SEED = 20261206  # fixed forever: the test tenth of a file without test arrays
MAX_SIDE = 1024


def _check_sizes(path: Path) -> None:
    """Refuse, before NumPy allocates anything, an array whose header claims more bytes than
    its member of the archive holds, or more than :data:`~leanconv.util.limits.MAX_ARRAY_BYTES`."""
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if not info.filename.endswith(".npy"):
                continue
            with archive.open(info) as fp:
                version = np.lib.format.read_magic(fp)
                read_header = np.lib.format.read_array_header_2_0 if version >= (2, 0) else \
                    np.lib.format.read_array_header_1_0
                shape, _, dtype = read_header(fp)
            claimed = math.prod(shape) * dtype.itemsize
            if claimed > min(info.file_size, MAX_ARRAY_BYTES):
                raise LeanconvError(f"{path}: array {info.filename[:-4]!r} claims shape {list(shape)} of {dtype} "
                                    f"({claimed:,} bytes) but holds {info.file_size:,} bytes (at most "
                                    f"{MAX_ARRAY_BYTES:,} are read); the file is corrupt")


def _read(path: Path) -> dict[str, np.ndarray]:
    try:
        _check_sizes(path)
        with np.load(path, allow_pickle=False) as arrays:
            return {k: arrays[k] for k in arrays.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise LeanconvError(f"{path} is not a readable .npz file of arrays: {str(exc).splitlines()[0]}") from None


def _nchw(x: np.ndarray, key: str, path: Path) -> np.ndarray:
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise LeanconvError(f"{path}: {key} must be images [N, H, W], [N, H, W, C] or [N, C, H, W] with 1 or 3 "
                            f"channels, got shape {list(x.shape)}")
    if x.shape[2] != x.shape[3]:  # a centred square, as for image folders
        side = min(x.shape[2], x.shape[3])
        top, left = (x.shape[2] - side) // 2, (x.shape[3] - side) // 2
        x = x[:, :, top:top + side, left:left + side]
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x)
    if not np.issubdtype(x.dtype, np.floating) or not np.isfinite(x).all() or x.min() < 0 or x.max() > 1:
        raise LeanconvError(f"{path}: {key} must be uint8 or floats in [0, 1], got {x.dtype}")
    return np.rint(x * 255).astype(np.uint8)


def _labels(y: np.ndarray, key: str, path: Path, n: int) -> np.ndarray:
    if y.ndim != 1 or len(y) != n or not np.issubdtype(y.dtype, np.integer):
        raise LeanconvError(f"{path}: {key} must be {n} integer labels, got {y.dtype} {list(y.shape)}")
    return y.astype(np.int64)


def _convert(x: np.ndarray, size: int, channels: int) -> np.ndarray:
    """uint8 ``[N, C, H, H]`` to ``channels`` (gray: ITU-R 601 luma) and ``size`` (bilinear, antialiased)."""
    if x.shape[1] != channels:
        if channels == 3:
            x = np.repeat(x, 3, axis=1)
        else:
            x = np.rint(0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).astype(np.uint8)[:, None]
    if x.shape[-1] == size:
        return x
    return np.clip(np.rint(resize(x, size)), 0, 255).astype(np.uint8)


def load_npz(data_dir: object = None, *, path: str | None = None, size: int | None = None,
             channels: int | None = None, val_size: int | None = None, flip_ok: bool = True) -> DatasetSplits:
    """The arrays of the ``.npz`` file at ``path`` (or ``data_dir``) as :class:`DatasetSplits`."""
    where = path if path is not None else data_dir
    if where is None:
        raise LeanconvError("npz needs a file: --data npz:PATH (or --data-dir PATH)")
    user_data_options("npz", size=size, channels=channels, val_size=val_size, flip_ok=flip_ok, max_side=MAX_SIDE)
    file = input_file(Path(str(where)).expanduser(), "npz file")
    arrays = _read(file)
    if "x" not in arrays or "y" not in arrays:
        raise LeanconvError(f"{file} needs arrays 'x' (images) and 'y' (labels); it has {sorted(arrays) or 'none'}")
    parts = {"train": ("x", "y"), "val": ("x_val", "y_val"), "test": ("x_test", "y_test")}
    data = {}
    for part, (xk, yk) in parts.items():
        if (xk in arrays) != (yk in arrays):
            raise LeanconvError(f"{file} has {xk if xk in arrays else yk} without {yk if xk in arrays else xk}")
        if xk in arrays:
            x = _nchw(arrays[xk], xk, file)
            data[part] = (x, _labels(arrays[yk], yk, file, len(x)))
    x, y = data["train"]
    classes = int(y.max()) + 1 if len(y) else 0
    if classes < 2 or len(np.unique(y)) < 2:
        raise LeanconvError(f"{file}: 'y' needs at least two classes, got {len(np.unique(y))}")
    for part, (_, labels) in data.items():
        if labels.min() < 0 or labels.max() >= classes:
            raise LeanconvError(f"{file}: labels of the {part} split must lie in [0, {classes - 1}] (the classes "
                                f"of 'y'), got {labels.min()}..{labels.max()}")
    size = x.shape[-1] if size is None else size
    channels = x.shape[1] if channels is None else channels
    if not 8 <= size <= MAX_SIDE or channels not in (1, 3):
        raise LeanconvError(f"npz size must lie in [8, {MAX_SIDE}] and channels be 1 or 3, got {size} and {channels}")
    data = {k: (_convert(xs, size, channels), ys) for k, (xs, ys) in data.items()}
    x, y = data["train"]
    if "test" not in data:  # a fixed tenth of every class
        keep, test_idx = carve_test(y, TEST_SEED)
        data["test"] = (x[test_idx], y[test_idx])
        x, y = x[keep], y[keep]
    if "val" not in data:
        keep, val = carve_validation(len(y), default_val_size(len(y)) if val_size is None else val_size)
        data["val"] = (x[val], y[val])
        x, y = x[keep], y[keep]
    data["train"] = (x, y)
    splits = {k: ImageSplit(torch.from_numpy(np.ascontiguousarray(xs)), torch.from_numpy(ys))
              for k, (xs, ys) in data.items()}
    if min(len(s) for s in splits.values()) == 0:
        raise LeanconvError(f"{file} has too few images for train, validation and test splits")
    mean, std = channel_stats(splits["train"].images)
    return DatasetSplits(name="npz", train=splits["train"], val=splits["val"], test=splits["test"],
                         num_classes=classes, in_channels=channels, image_size=size, mean=mean, std=std,
                         classes=tuple(str(k) for k in range(classes)), flip_ok=bool(flip_ok))
