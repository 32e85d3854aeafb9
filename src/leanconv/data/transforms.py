"""Batched image transforms used by :class:`leanconv.data.TensorLoader`.

Everything works on a whole batch at once (no Python loop over images):

* :func:`crop_flip` - the standard CIFAR augmentation (He et al., 2016, "Deep Residual
  Learning", sec. 4.2): zero-pad by ``pad`` pixels, take a random ``H x W`` crop and
  optionally mirror it horizontally; done as ONE gather on the uint8 batch with per-image
  row/column index grids (a flip is just the column grid reversed).
* :func:`normalize` - uint8 -> float32 ``(x / 255 - mean) / std`` per channel.
* :func:`resize` - bilinear resize to a square ``resolution``, antialiased when shrinking,
  as two matrix products with torch's own resampling weights (:func:`resize_matrix`).

All of them run on numpy arrays on purpose: numpy runs these small ops on one thread, while
torch splits each across its intra-op thread pool; on a busy machine the pool's
synchronisation made a Fashion-MNIST epoch of batch preparation 10-50x slower (seconds
instead of ~0.2 s) and competed with the model for cores. The results are shared with
torch without copying (``torch.from_numpy``).
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["default_pad", "draw_crop_flip", "crop_flip", "normalize", "resize_matrix", "resize"]


def default_pad(side: int) -> int:
    """Padding of the random crop: about an eighth of the side (4 for 32 px, 3 for 28 px)."""
    return max(1, side // 8)


def draw_crop_flip(n: int, pad: int, flip: bool,
                   generator: torch.Generator) -> tuple[np.ndarray, np.ndarray | None]:
    """Draw random crop offsets ``[n, 2]`` in ``[0, 2 * pad]`` and flip flags ``[n]`` (or None)
    from a seeded torch ``generator``."""
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator).numpy()
    flips = (torch.rand(n, generator=generator) < 0.5).numpy() if flip else None
    return offsets, flips


def crop_flip(images: np.ndarray, offsets: np.ndarray, flips: np.ndarray | None,
              pad: int) -> np.ndarray:
    """Zero-pad ``images`` ``[B, C, H, W]`` by ``pad``, crop ``H x W`` at per-image ``offsets``
    (row, column) and mirror the images whose ``flips`` flag is set. Keeps the dtype."""
    batch, channels, height, width = images.shape
    padded = np.pad(images, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    rows = offsets[:, :1] + np.arange(height)              # [B, H]
    cols = offsets[:, 1:] + np.arange(width)               # [B, W]
    if flips is not None:
        cols = np.where(flips[:, None], cols[:, ::-1], cols)
    padded_w = width + 2 * pad
    plane = (height + 2 * pad) * padded_w
    within = (rows[:, :, None] * padded_w + cols[:, None, :])[:, None]       # [B, 1, H, W]
    planes = (np.arange(batch)[:, None] * channels + np.arange(channels)[None]) * plane
    return padded.reshape(-1)[within + planes[:, :, None, None]]


def normalize(images: np.ndarray, mean: Sequence[float], std: Sequence[float],
              channel_axis: int = 1) -> np.ndarray:
    """uint8 (or float) pixel values in [0, 255] -> float32 ``(x / 255 - mean[c]) / std[c]``,
    channels on ``channel_axis``; always a new array."""
    shape = [1] * images.ndim
    shape[channel_axis] = len(mean)
    shift = (np.asarray(mean, dtype=np.float32) * 255.0).reshape(shape)
    scale = (1.0 / (255.0 * np.asarray(std, dtype=np.float32))).reshape(shape)
    x = images.astype(np.float32)
    x -= shift
    x *= scale
    return x


@functools.lru_cache(maxsize=64)
def resize_matrix(size_in: int, size_out: int) -> np.ndarray:
    """The ``[size_out, size_in]`` float32 matrix of torch's 1-D bilinear resampling
    (``align_corners=False``, antialiased when shrinking), read off by resizing an identity image.

    Bilinear resizing is separable and linear, so ``A_h @ image @ A_w.T`` equals
    ``F.interpolate(image, mode="bilinear", antialias=...)`` up to float rounding.
    """
    identity = torch.eye(size_in).reshape(1, 1, size_in, size_in)
    rows = F.interpolate(identity, size=(size_out, size_in), mode="bilinear",
                         align_corners=False, antialias=size_out < size_in)
    matrix = rows[0, 0].numpy().copy()
    matrix.setflags(write=False)
    return matrix


def resize(images: np.ndarray, resolution: int) -> np.ndarray:
    """Bilinear resize of ``[B, C, H, W]`` images to float32 ``[B, C, R, R]``, antialiased when
    shrinking so that downsampling does not alias; two small matrix products per batch."""
    height, width = images.shape[-2:]
    x = images.astype(np.float32, copy=False)
    if height == resolution and width == resolution:
        return x
    rows, cols = resize_matrix(height, resolution), resize_matrix(width, resolution)
    return np.matmul(np.matmul(rows, x), cols.T)
