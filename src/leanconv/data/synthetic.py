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

from leanconv.data.splits import DatasetSplits, make_splits, user_data_options
from leanconv.errors import LeanconvError
from leanconv.util.checks import brief
from leanconv.util.limits import (MAX_CLASSES, MAX_INPUT_CHANNELS, MAX_SIDE, MAX_SYNTHETIC_IMAGES,
                                  MAX_SYNTHETIC_VALUES, SEED_MAX)

__all__ = ["make_synthetic", "load_synthetic", "check_synthetic_options"]


def _check(label: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise LeanconvError(f"synthetic option {label} must be a whole number in [{low}, {high}], got {brief(value)}")
    return value


CHUNK_VALUES = 2**20  # pixels computed at once: the float64 work space stays at ~25 MB for any set size


def make_synthetic(count: int, c: int, s: int, k: int, rng: np.random.RandomState
                   ) -> tuple[np.ndarray, np.ndarray]:
    """``count`` balanced grating images uint8 ``[count, c, s, s]`` and their int64 labels."""
    labels = rng.permutation(np.arange(count) % k).astype(np.int64)
    cycles = 1 + labels // 2
    phase = rng.uniform(0.0, 2.0 * np.pi, count)
    contrast = rng.uniform(0.6, 1.0, count)
    coord = np.arange(s) / s
    channel = np.arange(c)[None, :]
    tint = 0.7 + 0.3 * np.cos(2.0 * np.pi * (channel / max(c, 1) + labels[:, None] / k))
    out = np.empty((count, c, s, s), dtype=np.uint8)
    step = max(1, CHUNK_VALUES // (c * s * s))
    for a in range(0, count, step):  # the noise is drawn in order, so any chunking gives the same images
        b = min(count, a + step)
        wave = np.sin(2.0 * np.pi * cycles[a:b, None] * coord[None, :] + phase[a:b, None])  # [n, s]
        vertical = (labels[a:b] % 2 == 1)[:, None, None]
        pattern = np.where(vertical, wave[:, None, :], wave[:, :, None])                    # [n, s, s]
        images = 128.0 + 90.0 * (contrast[a:b, None] * tint[a:b])[:, :, None, None] * pattern[:, None]
        images += rng.normal(0.0, 16.0, images.shape)
        out[a:b] = np.clip(np.rint(images), 0, 255).astype(np.uint8)
    return out, labels


def check_synthetic_options(*, n: int = 512, n_test: int | None = None, c: int = 3, s: int = 16, k: int = 4,
                            seed: int = 0, val_size: int | None = None, flip_ok: bool = True) -> int:
    """Check the options of :func:`load_synthetic` (its ranges) without making any image;
    returns ``n_test`` (its default filled in)."""
    _check("n", n, 10, MAX_SYNTHETIC_IMAGES)
    n_test = max(1, n // 4) if n_test is None else _check("n_test", n_test, 1, MAX_SYNTHETIC_IMAGES)
    _check("c", c, 1, MAX_INPUT_CHANNELS)
    _check("s", s, 8, MAX_SIDE)
    _check("k", k, 2, MAX_CLASSES)
    _check("seed", seed, 0, SEED_MAX)
    user_data_options("synthetic", size=None, channels=None, val_size=val_size, flip_ok=flip_ok, max_side=MAX_SIDE)
    if k > 2 * (s // 4):
        raise LeanconvError(f"synthetic: k={k} classes need s >= {4 * ((k + 1) // 2)} pixels; "
                            "raise s or lower k")
    if (n + n_test) * c * s * s > MAX_SYNTHETIC_VALUES:
        raise LeanconvError(f"synthetic: (n + n_test) * c * s * s = {(n + n_test) * c * s * s:,} pixels exceeds "
                            f"{MAX_SYNTHETIC_VALUES:,} (256 MiB); lower n, c or s")
    if val_size is not None and val_size >= n:
        raise LeanconvError(f"synthetic option val_size must be below n ({n}), got {val_size}")
    return n_test


def load_synthetic(data_dir: object = None, *, n: int = 512, n_test: int | None = None,
                   c: int = 3, s: int = 16, k: int = 4, seed: int = 0,
                   val_size: int | None = None, flip_ok: bool = True) -> DatasetSplits:
    """The synthetic grating dataset as :class:`DatasetSplits` (``data_dir`` is ignored).
    Ranges (:mod:`leanconv.util.limits`): ``n`` 10..10**7, ``n_test`` 1..10**7, ``c`` 1..256,
    ``s`` 8..1024, ``k`` 2..2*(s//4), ``seed`` 0..2**32-1, ``val_size`` 0..n-1, and
    ``(n + n_test) * c * s * s`` at most 2**28 pixels (256 MiB)."""
    n_test = check_synthetic_options(n=n, n_test=n_test, c=c, s=s, k=k, seed=seed, val_size=val_size, flip_ok=flip_ok)
    rng = np.random.RandomState(seed)
    train_x, train_y = make_synthetic(n, c, s, k, rng)
    test_x, test_y = make_synthetic(n_test, c, s, k, rng)
    classes = tuple(f"{'vertical' if i % 2 else 'horizontal'}-{1 + i // 2}" for i in range(k))
    return make_splits("synthetic", train_x, train_y, test_x, test_y, classes=classes,
                       flip_ok=flip_ok, val_size=val_size)
