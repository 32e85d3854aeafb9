"""Fashion-MNIST (Xiao, Rasul and Vollgraf, 2017): 70,000 28x28 grey images of 10 clothes.

Read from the four gzipped IDX files in ``DEFAULT_DIR`` (installed by the Debian package
``dataset-fashion-mnist``) or in a user's ``data_dir``. The training file's 60,000 images
become 55,000 train + 5,000 val (fixed split); the 10,000 test images stay untouched.
Horizontal flips keep the label (a mirrored shirt is a shirt), so ``flip_ok`` is true.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from leanconv.data.idx import read_idx
from leanconv.data.splits import DatasetSplits, make_splits, user_data_options
from leanconv.errors import LeanconvError
from leanconv.util.inputs import input_file, input_folder, path_kind

__all__ = ["DEFAULT_DIR", "FILES", "CLASSES", "read_fashion_mnist", "load_fashion_mnist"]

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
_FIX = ("install it with `apt-get install dataset-fashion-mnist` "
        "or pass --data-dir DIR holding the four IDX files")
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def _locate(directory: Path, filename: str) -> Path:
    """The file in ``directory``, gzipped or already unpacked; a clear error when absent."""
    for candidate in (directory / filename, directory / filename.removesuffix(".gz")):
        if path_kind(candidate) != "missing":  # a FIFO or a link loop is named as such, not "missing"
            return input_file(candidate, "Fashion-MNIST file")
    raise LeanconvError(f"Fashion-MNIST file {filename} is missing from {directory}; {_FIX}")


def _read_pair(directory: Path, images_key: str, labels_key: str) -> tuple[np.ndarray, np.ndarray]:
    images_path = _locate(directory, FILES[images_key])
    labels_path = _locate(directory, FILES[labels_key])
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise LeanconvError(f"{images_path} should hold uint8 images [N, 28, 28], "
                            f"got {images.dtype} {list(images.shape)}; download it again")
    if labels.dtype != np.uint8 or labels.ndim != 1 or len(labels) != len(images):
        raise LeanconvError(f"{labels_path} should hold {len(images)} uint8 labels, "
                            f"got {labels.dtype} {list(labels.shape)}; download it again")
    return images[:, None], labels.astype(np.int64)


def read_fashion_mnist(data_dir: str | Path | None = None
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Parse the four files into (train_images [N,1,28,28] uint8, train_labels int64,
    test_images, test_labels)."""
    directory = Path(data_dir) if data_dir is not None else DEFAULT_DIR
    if path_kind(directory) == "missing":
        raise LeanconvError(f"Fashion-MNIST directory {directory} does not exist; {_FIX}")
    input_folder(directory, "Fashion-MNIST directory")
    train = _read_pair(directory, "train_images", "train_labels")
    test = _read_pair(directory, "test_images", "test_labels")
    return train[0], train[1], test[0], test[1]


def load_fashion_mnist(data_dir: str | Path | None = None, *, val_size: int | None = None,
                       flip_ok: bool = True) -> DatasetSplits:
    """Fashion-MNIST as :class:`DatasetSplits` (55,000 / 5,000 / 10,000, 1 channel, 28 px)."""
    user_data_options("fashion-mnist", size=None, channels=None, val_size=val_size, flip_ok=flip_ok, max_side=0)
    train_x, train_y, test_x, test_y = read_fashion_mnist(data_dir)
    return make_splits("fashion-mnist", train_x, train_y, test_x, test_y, classes=CLASSES,
                       flip_ok=flip_ok, val_size=val_size)
