"""A user's own data: a folder per class of image files, and arrays in a .npz file."""

from __future__ import annotations

import json
import logging
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from leanconv import checkpoint
from leanconv.cli.main import main
from leanconv.data import clear_cache, load_dataset
from leanconv.errors import LeanconvError


def _png_folder(root, classes=("cat", "dog", "eel"), per_class=24, size=(20, 24), mode="RGB", seed=0):
    rng = np.random.RandomState(seed)
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
            pixels = np.clip(rng.normal(60 + 60 * k, 30, shape), 0, 255).astype(np.uint8)  # classes differ in brightness
            Image.fromarray(pixels, mode).save(root / name / f"{i:03d}.png")
    return root


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_cache()
    yield
    clear_cache()


def test_an_image_folder_is_read_cropped_and_split(tmp_path, caplog):
    root = _png_folder(tmp_path / "pets")
    (root / "cat" / "broken.png").write_bytes(b"not an image")
    with caplog.at_level(logging.WARNING):
        data = load_dataset(f"imagefolder:{root}")
    assert "skipped 1 image file(s)" in caplog.text and "broken.png" in caplog.text
    assert data.classes == ("cat", "dog", "eel") and data.num_classes == 3
    assert (data.in_channels, data.image_size) == (3, 20)  # a centred 20x20 square of the 20x24 images
    assert len(data.train) + len(data.val) + len(data.test) == 72 and len(data.test) == 6  # a tenth of each class
    assert sorted(data.test.labels.tolist()) == [0, 0, 1, 1, 2, 2]
    assert data.name == f"imagefolder:{root.resolve()}"
    again = load_dataset(data.name)  # the recorded name loads the same data
    assert torch.equal(again.test.images, data.test.images) and torch.equal(again.test.labels, data.test.labels)


def test_images_over_the_pixel_limit_are_skipped_not_decoded(tmp_path, caplog, monkeypatch):
    """A decompression bomb: Pillow's limit lowered to 1,000 pixels stands for its real 89 M."""
    root = _png_folder(tmp_path / "pets", per_class=12, size=(20, 24))  # 480 pixels each
    Image.new("RGB", (40, 40)).save(root / "cat" / "warns.png")  # 1,600: over the limit
    Image.new("RGB", (60, 60)).save(root / "dog" / "bomb.png")  # 3,600: over twice the limit
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with caplog.at_level(logging.WARNING):
        data = load_dataset(f"imagefolder:{root}")
    assert "skipped 2 image file(s)" in caplog.text
    assert len(data.train) + len(data.val) + len(data.test) == 36


def test_streamed_batches_equal_the_in_memory_ones(tmp_path):
    root = _png_folder(tmp_path / "pets")
    held = load_dataset(f"imagefolder:{root},size=16,channels=1")
    streamed = load_dataset(f"imagefolder:{root},size=16,channels=1,max_memory_mb=0")
    assert isinstance(held.train.images, torch.Tensor) and not isinstance(streamed.train.images, torch.Tensor)
    assert held.mean == pytest.approx(streamed.mean, rel=1e-9) and held.std == pytest.approx(streamed.std, rel=1e-9)
    for a, b in zip(held.loader("train", 16, shuffle=True, augment=True).epoch(1),
                    streamed.loader("train", 16, shuffle=True, augment=True).epoch(1)):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_split_folders_are_used_as_given(tmp_path):
    _png_folder(tmp_path / "d" / "train", per_class=12)
    _png_folder(tmp_path / "d" / "test", classes=("cat", "eel"), per_class=3, seed=1)
    data = load_dataset("imagefolder", tmp_path / "d")  # --data imagefolder --data-dir PATH works too
    assert len(data.test) == 6 and set(data.test.labels.tolist()) == {0, 2}
    assert len(data.train) + len(data.val) == 36


@pytest.mark.parametrize("make, match", [
    (lambda root: _png_folder(root, classes=("only",)), "at least two"),
    (lambda root: root.mkdir(), "at least two"),
    (lambda root: (_png_folder(root / "a", classes=("x",), size=(16, 16)), _png_folder(root / "b", classes=("y",))),
     "different sizes"),
    (lambda root: [(root / c).mkdir(parents=True) or (root / c / "1.png").write_bytes(b"junk") for c in "ab"],
     "no readable image"),
])
def test_bad_image_folders_are_one_clear_line(tmp_path, make, match):
    root = tmp_path / "bad"
    make(root)
    if match == "different sizes":  # two classes of different image sizes, no size given
        for sub in ("a", "b"):
            for cls in (root / sub).iterdir():
                cls.rename(root / cls.name)
            (root / sub).rmdir()
    with pytest.raises(LeanconvError, match=match):
        load_dataset(f"imagefolder:{root}")


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_npz_arrays_in_every_layout(tmp_path):
    rng = np.random.RandomState(0)
    y = np.arange(60) % 3
    nhw = (rng.rand(60, 12, 12) * 255).astype(np.uint8)
    for name, x in [("nhw", nhw), ("nhwc", nhw[..., None].repeat(3, -1)), ("nchw", nhw[:, None]),
                    ("float", nhw / 255.0)]:
        data = load_dataset(f"npz:{_npz(tmp_path / f'{name}.npz', x=x, y=y)}")
        assert data.num_classes == 3 and data.image_size == 12 and len(data.test) == 6
        assert data.in_channels == (3 if name == "nhwc" else 1)
    resized = load_dataset(f"npz:{tmp_path / 'nhw.npz'},size=16,channels=3")
    assert (resized.in_channels, resized.image_size) == (3, 16)
    given = load_dataset(f"npz:{_npz(tmp_path / 't.npz', x=nhw, y=y, x_test=nhw[:5], y_test=y[:5])}")
    assert len(given.test) == 5


@pytest.mark.parametrize("arrays, match", [
    ({"x": np.zeros((10, 8, 8), np.uint8), "y": np.zeros(10, np.int64)}, "at least two classes"),
    ({"x": np.zeros((10, 8, 8), np.uint8), "y": np.arange(10) % 2, "x_test": np.zeros((2, 8, 8), np.uint8),
      "y_test": np.array([0, 5])}, "labels of the test split must lie in \\[0, 1\\]"),
    ({"x": np.zeros((10, 8, 8), np.uint8)}, "needs arrays 'x' \\(images\\) and 'y'"),
    ({"x": np.zeros((10, 2, 8, 8), np.uint8), "y": np.arange(10) % 2}, "with 1 or 3 channels"),
    ({"x": np.full((10, 8, 8), 2.0), "y": np.arange(10) % 2}, "uint8 or floats in \\[0, 1\\]"),
    ({"x": np.array([None] * 10, dtype=object), "y": np.arange(10) % 2}, "not a readable .npz"),
])
def test_bad_npz_files_are_one_clear_line(tmp_path, arrays, match):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(LeanconvError, match=match):
        load_dataset(f"npz:{path}")


@pytest.mark.parametrize("shape", [(10**6, 3, 1000, 1000), (10, 8, 8)])
def test_an_npz_array_that_claims_more_than_it_holds_is_refused_before_allocation(tmp_path, shape):
    """A hostile header: a 12-TB shape (NumPy would try to allocate it) or a small one
    over too few bytes. Written by hand: the .npy header, then 64 bytes of data."""
    header = f"{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}"
    header += " " * (118 - len(header)) + "\n"
    npy = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode() + bytes(64)
    path = tmp_path / "huge.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x.npy", npy)
        archive.writestr("y.npy", npy)
    with pytest.raises(LeanconvError, match=r"array 'x' claims shape .* but holds 193 bytes"):
        load_dataset(f"npz:{path}")


def test_train_and_prune_on_a_folder_of_png_files(tmp_path, capsys):
    """From the CLI alone: train on the folder, then prune; the pruned run reads the folder at
    the model's input side and channels."""
    root = _png_folder(tmp_path / "pets", per_class=40)
    assert main(["train", "--model", "resnet20", "--data", f"imagefolder:{root},size=16", "--epochs", "1",
                 "--batch-size", "32", "--out", str(tmp_path / "t"), "--no-progress"]) == 0
    meta = checkpoint.read_header(tmp_path / "t" / "model.safetensors")["meta"]
    assert meta["input_shape"] == [3, 16, 16] and meta["dataset"]["name"].startswith("imagefolder:")
    capsys.readouterr()
    assert main(["prune", str(tmp_path / "t" / "model.safetensors"), "--method", "l1", "--target-flops", "0.5",
                 "--score-images", "16", "--repeats", "1", "--out", str(tmp_path / "p"), "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert abs(summary["macs"][1] / summary["macs"][0] - 0.5) <= 0.01


@pytest.mark.parametrize("options, match", [
    ("size=abc", "option size must be a whole number in \\[8, 1024\\]"),
    ("size=16.5", "option size must be a whole number"),
    ("val_size=2.5", "option val_size must be a whole number"),
    ("channels=2", "option channels must be"),
    ("flip_ok=maybe", "option flip_ok must be true or false"),
    ("max_memory_mb=abc", "option max_memory_mb must be a whole number"),
])
def test_bad_dataset_options_are_one_clear_line(tmp_path, options, match):
    root = _png_folder(tmp_path / "pets", per_class=4)
    with pytest.raises(LeanconvError, match=match):
        load_dataset(f"imagefolder:{root},{options}")


def test_every_class_is_in_the_test_split_and_npz_images_are_cropped(tmp_path):
    root = _png_folder(tmp_path / "pets", per_class=12)
    data = load_dataset(f"imagefolder:{root}")
    assert sorted(set(data.test.labels.tolist())) == [0, 1, 2]  # a tenth of every class, not of the whole
    x = (np.random.RandomState(0).rand(40, 10, 14) * 255).astype(np.uint8)
    arrays = load_dataset(f"npz:{_npz(tmp_path / 'wide.npz', x=x, y=np.arange(40) % 2)}")
    assert arrays.image_size == 10 and sorted(set(arrays.test.labels.tolist())) == [0, 1]


def test_a_relative_data_folder_is_recorded_absolute(tmp_path, monkeypatch, capsys):
    root = _png_folder(tmp_path / "pets", per_class=24)
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--model", "resnet20", "--data", "imagefolder", "--data-dir", "pets", "--epochs", "1",
                 "--batch-size", "32", "--out", "t", "--no-progress"]) == 0
    assert checkpoint.read_header(tmp_path / "t" / "model.safetensors")["meta"]["dataset"]["data_dir"] == str(root)
