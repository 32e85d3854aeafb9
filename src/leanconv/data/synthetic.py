"""A small deterministic image dataset for tests and smoke runs; needs no files.

Class ``k`` is a sinusoidal grating: horizontal stripes for even ``k``, vertical for odd ``k``,
with ``1 + k // 2`` cycles across the image. Every image gets a random phase, a random
contrast, a class-and-channel dependent tint and Gaussian pixel noise, so a tiny CNN must
learn orientation and frequency, not memorise pixels. Random crops shift the phase and
horizontal flips keep orientation and frequency, so the standard augmentation keeps labels
(``flip_ok`` is true).

Options (keyword arguments, or the name form ``"synthetic:n=512,c=3,s=16,k=4"``):
``n`` training-file images (train + val; val is a tenth), ``n_test`` test images (default
``n // 4``), ``c`` channels, ``s`` side in pixels, ``k`` classes (at most ``2 * (s // 4)`` so
the finest grating stays well below the Nyquist frequency), ``seed`` the data seed.
"""

from __future__ import annotations

import numpy as np

from leanconv.data.splits import DatasetSplits, make_splits
from leanconv.errors import LeanconvError

__all__ = ["make_synthetic", "load_synthetic"]


def _check(label: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise LeanconvError(f"synthetic option {label} must be an integer >= {low}, got {value!r}")
    return value


def make_synthetic(count: int, c: int, s: int, k: int, rng: np.random.RandomState
                   ) -> tuple[np.ndarray, np.ndarray]:
    """``count`` balanced grating images uint8 ``[count, c, s, s]`` and their int64 labels."""
    labels = rng.permutation(np.arange(count) % k).astype(np.int64)
    cycles = 1 + labels // 2
    phase = rng.uniform(0.0, 2.0 * np.pi, count)
    contrast = rng.uniform(0.6, 1.0, count)
    coord = np.arange(s) / s
    wave = np.sin(2.0 * np.pi * cycles[:, None] * coord[None, :] + phase[:, None])  # [count, s]
    vertical = (labels % 2 == 1)[:, None, None]
    pattern = np.where(vertical, wave[:, None, :], wave[:, :, None])            # [count, s, s]
    channel = np.arange(c)[None, :]
    tint = 0.7 + 0.3 * np.cos(2.0 * np.pi * (channel / max(c, 1) + labels[:, None] / k))
    images = 128.0 + 90.0 * (contrast[:, None] * tint)[:, :, None, None] * pattern[:, None]
    images += rng.normal(0.0, 16.0, images.shape)
    return np.clip(np.rint(images), 0, 255).astype(np.uint8), labels


def load_synthetic(data_dir: object = None, *, n: int = 512, n_test: int | None = None,
                   c: int = 3, s: int = 16, k: int = 4, seed: int = 0,
                   val_size: int | None = None, flip_ok: bool = True) -> DatasetSplits:
    """The synthetic grating dataset as :class:`DatasetSplits` (``data_dir`` is ignored)."""
    _check("n", n, 10)
    n_test = max(1, n // 4) if n_test is None else _check("n_test", n_test, 1)
    _check("c", c, 1)
    _check("s", s, 8)
    _check("k", k, 2)
    _check("seed", seed, 0)
    if k > 2 * (s // 4):
        raise LeanconvError(f"synthetic: k={k} classes need s >= {4 * ((k + 1) // 2)} pixels; "
                            "raise s or lower k")
    rng = np.random.RandomState(seed)
    train_x, train_y = make_synthetic(n, c, s, k, rng)
    test_x, test_y = make_synthetic(n_test, c, s, k, rng)
    classes = tuple(f"{'vertical' if i % 2 else 'horizontal'}-{1 + i // 2}" for i in range(k))
    return make_splits("synthetic", train_x, train_y, test_x, test_y, classes=classes,
                       flip_ok=flip_ok, val_size=val_size)
