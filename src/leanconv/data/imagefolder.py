"""A user's own images: a folder per class of PNG/JPEG files (``--data imagefolder:PATH``).

Layout: ``PATH/<class>/*.png`` (any of .png .jpg .jpeg .bmp .gif .webp .tif .tiff), or
``PATH/train/<class>/...`` and ``PATH/test/<class>/...`` (and optionally ``PATH/val/...``).
Classes are the sorted folder names of the training part; a test or validation folder may
hold only some of them. Without split folders a fixed tenth of every class (seeded, never
changing) is the test split; the validation split is carved from the training images as for
every dataset (:func:`leanconv.data.splits.carve_validation`) unless ``val/`` exists.

Images are read with Pillow, cropped to a centred square, resized to ``size`` (default: the
model's input side when a checkpoint records one, else the images' own side, which must then
be the same for all) and converted to ``channels`` (1: grayscale, 3: RGB; default: the
model's, else RGB unless every image is grayscale). A file Pillow cannot open, or one over its
pixel limit (a decompression bomb), is skipped and counted (a warning names the first); a folder with no readable image, or one class, is an
error naming it. A set larger than ``max_memory_mb`` once decoded is not held in memory: its
batches are decoded from disk as they are drawn (every epoch).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch

from leanconv.data.splits import (DatasetSplits, ImageSplit, carve_test, carve_validation, channel_stats,
                                  default_val_size, user_data_options)
from leanconv.errors import LeanconvError
from leanconv.util.inputs import input_folder

__all__ = ["load_imagefolder", "FileImages", "EXTENSIONS"]

log = logging.getLogger(__name__)

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
TEST_SEED = 20261206  # fixed forever: the test tenth of a folder without split folders
SAMPLE_FOR_STATS = 2000  # images whose pixels give the channel mean and std of a streamed set
MAX_SIDE = 1024


def _image_module():
    from PIL import Image  # Pillow comes with matplotlib; imported only when images are read

    return Image


def _decode(path: Path, channels: int, size: int) -> np.ndarray:
    """One image as uint8 ``[channels, size, size]``: centred square crop, then resized."""
    Image = _image_module()
    try:
        with Image.open(path) as img:
            img = img.convert("L" if channels == 1 else "RGB")
            w, h = img.size
            side = min(w, h)
            left, top = (w - side) // 2, (h - side) // 2
            img = img.crop((left, top, left + side, top + side))
            if side != size:
                img = img.resize((size, size), Image.BILINEAR)
            array = np.asarray(img, dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise LeanconvError(f"cannot read image {path}: {exc}") from None
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


class FileImages:
    """Images decoded from files when indexed: the array-like a streamed split holds.

    ``shape`` is ``(N, C, size, size)`` and ``images[idx]`` (an index array) decodes those
    files into a uint8 numpy batch, so :class:`~leanconv.data.loader.TensorLoader` draws from
    it as from an in-memory tensor."""

    dtype = torch.uint8
    lazy_images = True  # ImageSplit and TensorLoader take it in place of a tensor

    def __init__(self, paths: list[Path], channels: int, size: int):
        self.paths, self.channels, self.size = list(paths), channels, size
        self.shape = (len(self.paths), channels, size, size)

    def __len__(self) -> int:
        return len(self.paths)

    def dim(self) -> int:
        return 4

    def numpy(self) -> "FileImages":
        return self

    def __getitem__(self, index) -> np.ndarray:
        picked = np.arange(len(self.paths))[index]
        if np.ndim(picked) == 0:
            return _decode(self.paths[int(picked)], self.channels, self.size)
        out = np.empty((len(picked), self.channels, self.size, self.size), dtype=np.uint8)
        for i, j in enumerate(picked):
            out[i] = _decode(self.paths[int(j)], self.channels, self.size)
        return out


def _class_folders(root: Path) -> dict[str, list[Path]]:
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    found = {}
    for folder in folders:
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file())
        if files:
            found[folder.name] = files
    return found


def _probe(files: dict[str, list[Path]]) -> tuple[list[Path], list[int], list[tuple[int, int, str]], list[Path]]:
    """Open every file's header: (readable paths, their class index, (w, h, mode), unreadable)."""
    Image = _image_module()
    paths, labels, info, bad = [], [], [], []
    for k, name in enumerate(files):
        for path in files[name]:
            try:
                with warnings.catch_warnings():  # an image over Pillow's pixel limit counts as unreadable
                    warnings.simplefilter("error", Image.DecompressionBombWarning)
                    with Image.open(path) as img:
                        info.append((img.size[0], img.size[1], img.mode))
            except (OSError, ValueError, Image.DecompressionBombWarning, Image.DecompressionBombError):
                bad.append(path)
                continue
            paths.append(path)
            labels.append(k)
    return paths, labels, info, bad


def _split_parts(root: Path) -> dict[str, dict[str, list[Path]]]:
    """{"train": {class: files}, "val": ..., "test": ...}; val/test absent when not given."""
    if (root / "train").is_dir():
        parts = {"train": _class_folders(root / "train")}
        for name in ("val", "test"):
            if (root / name).is_dir():
                parts[name] = _class_folders(root / name)
        return parts
    return {"train": _class_folders(root)}


def _choose_shape(info: list[tuple[int, int, str]], size: int | None, channels: int | None,
                  root: Path) -> tuple[int, int]:
    if size is None:
        sides = {min(w, h) for w, h, _ in info}
        if len(sides) > 1:
            raise LeanconvError(f"the images in {root} have different sizes (sides {sorted(sides)[:4]}); pass the "
                                "side to resize them to, e.g. --data imagefolder:PATH,size=32")
        size = sides.pop()
    if not 8 <= size <= MAX_SIDE:
        raise LeanconvError(f"imagefolder size must lie in [8, {MAX_SIDE}], got {size}")
    if channels is None:
        channels = 1 if all(mode in ("1", "L", "I", "I;16", "F") for _, _, mode in info) else 3
    if channels not in (1, 3):
        raise LeanconvError(f"imagefolder channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    return size, channels


def _labels_of(part: dict[str, list[Path]], classes: list[str], where: str) -> dict[str, list[Path]]:
    unknown = sorted(set(part) - set(classes))
    if unknown:
        raise LeanconvError(f"{where} has classes the training folder lacks: {', '.join(unknown[:5])}")
    return {name: part.get(name, []) for name in classes}


def _images(paths: list[Path], channels: int, size: int, stream: bool):
    files = FileImages(paths, channels, size)
    return files if stream else torch.from_numpy(files[np.arange(len(paths))])


def load_imagefolder(data_dir: object = None, *, path: str | None = None, size: int | None = None,
                     channels: int | None = None, val_size: int | None = None, flip_ok: bool = True,
                     max_memory_mb: int = 2048) -> DatasetSplits:
    """The image folder at ``path`` (or ``data_dir``) as :class:`DatasetSplits` (module docstring)."""
    where = path if path is not None else data_dir
    if where is None:
        raise LeanconvError("imagefolder needs a folder: --data imagefolder:PATH (or --data-dir PATH)")
    user_data_options("imagefolder", size=size, channels=channels, val_size=val_size, flip_ok=flip_ok,
                      max_side=MAX_SIDE)
    if isinstance(max_memory_mb, bool) or not isinstance(max_memory_mb, int) or not 0 <= max_memory_mb <= 2**20:
        raise LeanconvError(f"imagefolder option max_memory_mb must be a whole number in [0, {2**20}] (up to 1 TiB), "
                            f"got {repr(max_memory_mb)[:60]}")
    root = input_folder(Path(str(where)).expanduser(), "image folder")
    parts = _split_parts(root)
    classes = sorted(parts["train"])
    if len(classes) < 2:
        raise LeanconvError(f"{root} needs a subfolder of images per class, at least two; found "
                            f"{len(classes)} ({', '.join(classes) or 'none'})")
    probed = {name: _probe(_labels_of(files, classes, str(root / name))) for name, files in parts.items()}
    bad = [p for _, _, _, b in probed.values() for p in b]
    if bad:
        log.warning("skipped %d image file(s) Pillow cannot open, e.g. %s", len(bad), bad[0])
    paths, labels, info, _ = probed["train"]
    if not paths:
        raise LeanconvError(f"no readable image in {root}" + (f" (e.g. {bad[0]})" if bad else ""))
    size, channels = _choose_shape([x for _, _, part_info, _ in probed.values() for x in part_info], size, channels,
                                   root)
    stream = len(paths) * channels * size * size > max_memory_mb * 2**20
    by_part = {name: (p, lab) for name, (p, lab, _, _) in probed.items()}
    if "test" not in by_part:  # a fixed tenth of every class is the test split
        keep, test_idx = carve_test(np.asarray(labels), TEST_SEED)
        by_part["test"] = ([paths[i] for i in test_idx], [labels[i] for i in test_idx])
        paths, labels = [paths[i] for i in keep], [labels[i] for i in keep]
    if "val" not in by_part:
        n_val = default_val_size(len(paths)) if val_size is None else val_size
        train_idx, val_idx = carve_validation(len(paths), n_val)
        by_part["val"] = ([paths[i] for i in val_idx], [labels[i] for i in val_idx])
        paths, labels = [paths[i] for i in train_idx], [labels[i] for i in train_idx]
    by_part["train"] = (paths, labels)
    splits = {name: ImageSplit(_images(p, channels, size, stream), torch.tensor(lab, dtype=torch.int64))
              for name, (p, lab) in by_part.items()}
    if min(len(s) for s in splits.values()) == 0:
        raise LeanconvError(f"{root} has too few readable images for train, validation and test splits")
    mean, std = _stats(splits["train"].images)
    return DatasetSplits(name="imagefolder", train=splits["train"], val=splits["val"], test=splits["test"],
                         num_classes=len(classes), in_channels=channels, image_size=size, mean=mean, std=std,
                         classes=tuple(classes), flip_ok=bool(flip_ok))


def _stats(images) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if isinstance(images, torch.Tensor):
        return channel_stats(images)
    picked = np.random.RandomState(TEST_SEED).permutation(len(images))[:SAMPLE_FOR_STATS]
    return channel_stats(torch.from_numpy(images[np.sort(picked)]))
