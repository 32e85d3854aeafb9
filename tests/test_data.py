"""Tests for leanconv.data: file formats, datasets, the fixed val split and the loader."""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from leanconv.data import (DatasetSplits, ImageSplit, TensorLoader, carve_validation, clear_cache,
                           dataset_names, load_array_pickle, load_dataset, read_idx, write_idx)
from leanconv.data.fashion_mnist import DEFAULT_DIR, FILES
from leanconv.data.transforms import crop_flip, resize
from leanconv.errors import LeanconvError

# ---------------------------------------------------------------- IDX


@pytest.mark.parametrize("suffix", [".gz", ""])
@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.float32])
def test_idx_round_trip(tmp_path: Path, suffix: str, dtype: type) -> None:
    array = (np.arange(2 * 3 * 5) * 7 % 251).reshape(2, 3, 5).astype(dtype)
    path = tmp_path / f"x-idx3{suffix}"
    write_idx(path, array)
    back = read_idx(path)
    assert back.dtype == np.dtype(dtype) and back.shape == (2, 3, 5)
    np.testing.assert_array_equal(back, array)


def test_idx_truncated_gzip_fails_naming_file(tmp_path: Path) -> None:
    path = tmp_path / "imgs-idx3-ubyte.gz"
    write_idx(path, np.ones((50, 28, 28), np.uint8))
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(LeanconvError, match="imgs-idx3-ubyte.gz"):
        read_idx(path)


def test_idx_size_mismatch_and_bad_magic_fail(tmp_path: Path) -> None:
    short = tmp_path / "short-idx1-ubyte.gz"
    with gzip.open(short, "wb") as handle:  # header says 10 labels, body holds 9
        handle.write(bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big") + bytes(9))
    with pytest.raises(LeanconvError, match="short-idx1-ubyte.gz.*truncated or corrupt"):
        read_idx(short)
    bad = tmp_path / "bad-idx1-ubyte"
    bad.write_bytes(bytes([1, 0, 8, 1]) + (1).to_bytes(4, "big") + bytes(1))
    with pytest.raises(LeanconvError, match="bad magic"):
        read_idx(bad)

# ---------------------------------------------------------------- Fashion-MNIST


@pytest.mark.skipif(not DEFAULT_DIR.is_dir(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist_splits() -> None:
    data = load_dataset("fashion-mnist")
    assert (len(data.train), len(data.val), len(data.test)) == (55000, 5000, 10000)
    assert data.num_classes == 10 and data.in_channels == 1 and data.image_size == 28
    assert tuple(data.train.images.shape) == (55000, 1, 28, 28)
    assert data.train.images.dtype == torch.uint8 and data.test.labels.dtype == torch.int64
    assert torch.bincount(data.test.labels).tolist() == [1000] * 10
    assert data.mean[0] == pytest.approx(0.286, abs=0.002)
    assert data.std[0] == pytest.approx(0.353, abs=0.002)
    assert data.flip_ok and data.classes[0] == "T-shirt/top"
    assert load_dataset("Fashion_MNIST") is data  # cached, name normalised


def _write_fashion(directory: Path, n_train: int, n_test: int) -> None:
    rng = np.random.RandomState(1)
    for prefix, n in (("train", n_train), ("test", n_test)):
        images_name = FILES[f"{prefix}_images"]
        write_idx(directory / images_name, rng.randint(0, 256, (n, 28, 28)).astype(np.uint8))
        write_idx(directory / FILES[f"{prefix}_labels"], (np.arange(n) % 10).astype(np.uint8))


def test_fashion_mnist_from_data_dir(tmp_path: Path) -> None:
    _write_fashion(tmp_path, n_train=120, n_test=30)
    data = load_dataset("fashion-mnist", data_dir=tmp_path)
    assert (len(data.train), len(data.val), len(data.test)) == (108, 12, 30)
    assert data.test.labels[:12].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]


def test_fashion_mnist_missing_file_named(tmp_path: Path) -> None:
    _write_fashion(tmp_path, n_train=20, n_test=10)
    (tmp_path / FILES["test_labels"]).unlink()
    with pytest.raises(LeanconvError, match="t10k-labels-idx1-ubyte.gz is missing.*apt-get"):
        load_dataset("fashion-mnist", data_dir=tmp_path)
    with pytest.raises(LeanconvError, match="does not exist.*--data-dir"):
        load_dataset("fashion-mnist", data_dir=tmp_path / "nowhere")

# ---------------------------------------------------------------- CIFAR


def _cifar_batch(n: int, label_key: bytes, num_classes: int, offset: int) -> dict:
    data = ((np.arange(n * 3072).reshape(n, 3072) + offset) % 256).astype(np.uint8)
    labels = [(offset + i) % num_classes for i in range(n)]
    return {b"batch_label": b"fixture batch", label_key: labels, b"data": data,
            b"filenames": [f"img_{offset + i}.png".encode() for i in range(n)]}


def _dump(path: Path, obj: object) -> None:
    with open(path, "wb") as handle:
        pickle.dump(obj, handle, protocol=2)


def _write_cifar10(directory: Path, per_batch: int = 12) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(1, 6):
        _dump(directory / f"data_batch_{i}", _cifar_batch(per_batch, b"labels", 10, 100 * i))
    _dump(directory / "test_batch", _cifar_batch(10, b"labels", 10, 7))
    names = [n.encode() for n in ("plane", "car", "bird", "cat", "deer", "dog", "frog", "horse",
                                  "ship", "truck")]
    _dump(directory / "batches.meta", {b"label_names": names, b"num_cases_per_batch": per_batch,
                                       b"num_vis": 3072})


def test_cifar10_fixture_loads(tmp_path: Path) -> None:
    _write_cifar10(tmp_path / "cifar-10-batches-py")
    data = load_dataset("cifar10", data_dir=tmp_path)  # the parent folder works too
    assert (len(data.train), len(data.val), len(data.test)) == (54, 6, 10)
    assert tuple(data.test.images.shape) == (10, 3, 32, 32) and data.in_channels == 3
    assert data.test.labels.tolist() == [7, 8, 9, 0, 1, 2, 3, 4, 5, 6]
    expected = ((np.arange(3072) + 7) % 256).astype(np.uint8).reshape(3, 32, 32)
    np.testing.assert_array_equal(data.test.images[0].numpy(), expected)  # R, G, B planes
    assert data.classes[1] == "car" and data.num_classes == 10 and data.image_size == 32


def test_cifar100_fixture_loads(tmp_path: Path) -> None:
    train = _cifar_batch(40, b"fine_labels", 100, 95)
    train[b"coarse_labels"] = [0] * 40
    _dump(tmp_path / "train", train)
    _dump(tmp_path / "test", _cifar_batch(8, b"fine_labels", 100, 50))
    _dump(tmp_path / "meta", {b"fine_label_names": [f"f{i}".encode() for i in range(100)],
                              b"coarse_label_names": [f"c{i}".encode() for i in range(20)]})
    data = load_dataset("cifar-100", data_dir=tmp_path)
    assert (len(data.train), len(data.val), len(data.test)) == (36, 4, 8)
    assert data.num_classes == 100 and data.classes[99] == "f99"
    assert data.test.labels.tolist() == list(range(50, 58))
    assert sorted(data.train.labels.tolist() + data.val.labels.tolist()) == \
        sorted((95 + i) % 100 for i in range(40))


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_refused_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    directory = tmp_path / "cifar"
    _write_cifar10(directory, per_batch=4)
    payload = _cifar_batch(4, b"labels", 10, 0)
    payload[b"data"] = _Evil(marker)
    _dump(directory / "data_batch_3", payload)
    assert b"system" in (directory / "data_batch_3").read_bytes()  # the payload is real
    with pytest.raises(LeanconvError, match="data_batch_3 refused.*system"):
        load_dataset("cifar10", data_dir=directory)
    assert not marker.exists()


@pytest.mark.parametrize("bad, message", [
    ([1, 2, 3], "not a dict"),
    ({b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4}, r"uint8 array \[N, 3072\]"),
    ({b"data": np.zeros((4, 3072), np.float32), b"labels": [0] * 4}, r"uint8 array \[N, 3072\]"),
    ({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0] * 3}, "must list 4 labels"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, "outside"),
    ({b"data": np.array([None, 1], dtype=object), b"labels": [0] * 2}, "object dtype"),
])
def test_malformed_cifar_batch_refused(tmp_path: Path, bad: object, message: str) -> None:
    _write_cifar10(tmp_path, per_batch=4)
    _dump(tmp_path / "test_batch", bad)
    with pytest.raises(LeanconvError, match=message):
        load_dataset("cifar10", data_dir=tmp_path)


def _py2_pickle(raw: bytes) -> bytes:
    """A Python-2-style protocol-2 stream (str opcodes), as the original CIFAR files are."""
    def text(b: bytes) -> bytes:
        return b"U" + bytes([len(b)]) + b
    dtype = b"cnumpy\ndtype\n" + text(b"u1") + b"K\x00K\x01\x87R(K\x03" + text(b"|") + \
        b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
    array = b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + text(b"b") + \
        b"\x87R(K\x01K\x02K\x03\x86" + dtype + b"\x89" + text(raw) + b"tb"
    return b"\x80\x02}(" + text(b"data") + array + text(b"labels") + b"]K\x01au."


def test_python2_style_pickle_parses(tmp_path: Path) -> None:
    path = tmp_path / "py2"
    path.write_bytes(_py2_pickle(bytes(range(6))))
    loaded = load_array_pickle(path)
    assert loaded[b"labels"] == [1]
    np.testing.assert_array_equal(loaded[b"data"], np.arange(6, dtype=np.uint8).reshape(2, 3))

# ---------------------------------------------------------------- registry and val split


def test_unknown_dataset_and_option() -> None:
    names = ", ".join(dataset_names())
    with pytest.raises(LeanconvError, match="unknown dataset 'mnist'.*" + names):
        load_dataset("mnist")
    with pytest.raises(LeanconvError, match="no option q"):
        load_dataset("synthetic:q=1")


def test_synthetic_name_options_and_cache() -> None:
    data = load_dataset("synthetic:n=200,c=1,s=12,k=6", n_test=40)
    assert data.name == "synthetic:c=1,k=6,n=200,n_test=40,s=12"
    assert (len(data.train), len(data.val), len(data.test)) == (180, 20, 40)
    assert tuple(data.train.images.shape[1:]) == (1, 12, 12) and data.num_classes == 6
    counts = torch.bincount(torch.cat([data.train.labels, data.val.labels])).tolist()
    assert counts == [34, 34] + [33] * 4
    assert load_dataset(data.name) is data


def test_val_split_fixed_and_disjoint() -> None:
    train_idx, val_idx = carve_validation(1000, 100)
    assert len(np.intersect1d(train_idx, val_idx)) == 0
    assert len(np.union1d(train_idx, val_idx)) == 1000
    torch.manual_seed(1)
    first = load_dataset("synthetic", n=300)
    clear_cache()
    torch.manual_seed(2)
    np.random.seed(2)
    second = load_dataset("synthetic", n=300)
    assert first is not second
    assert torch.equal(first.val.images, second.val.images)
    assert torch.equal(first.val.labels, second.val.labels)
    train_rows = {bytes(img.numpy().tobytes()) for img in first.train.images}
    assert not any(bytes(img.numpy().tobytes()) in train_rows for img in first.val.images)
    # the loader's training seed does not reach the val split either
    batches = [next(iter(first.loader("val", 30, seed=s).epoch(0)))[0] for s in (0, 99)]
    assert torch.equal(batches[0], batches[1])

# ---------------------------------------------------------------- loader


@pytest.fixture(scope="module")
def synthetic() -> DatasetSplits:
    return load_dataset("synthetic", n=256, c=3, s=16)


def _epoch(loader: TensorLoader, epoch: int, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*loader.epoch(epoch, start_batch=start))
    return torch.cat(xs), torch.cat(ys)


def test_loader_reproducible_per_epoch(synthetic: DatasetSplits) -> None:
    def make(seed: int) -> TensorLoader:
        return synthetic.loader("train", 32, shuffle=True, augment=True, seed=seed)
    x1, y1 = _epoch(make(5), 3)
    x2, y2 = _epoch(make(5), 3)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    x3, y3 = _epoch(make(5), 4)
    assert not torch.equal(y1, y3) and not torch.equal(x1, x3)
    assert not torch.equal(_epoch(make(6), 3)[1], y1)
    tail_x, tail_y = _epoch(make(5), 3, start=2)  # resume in the middle of an epoch
    assert torch.equal(tail_x, x1[64:]) and torch.equal(tail_y, y1[64:])
    assert sorted(y1.tolist()) == sorted(synthetic.train.labels.tolist())


def test_loader_resolution_and_layout(synthetic: DatasetSplits) -> None:
    loader = synthetic.loader("test", 20, resolution=8, augment=True, channels_last=True)
    x, y = next(iter(loader))
    assert tuple(x.shape) == (20, 3, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert len(loader) == 4  # 64 test images in batches of 20
    assert len(synthetic.loader("test", 20, drop_last=True)) == 3
    # fashion-sized input: 28 px resized to 16 keeps the overall brightness
    images = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    split = ImageSplit(images, torch.zeros(4, dtype=torch.long))
    x16, _ = next(iter(TensorLoader(split, 4, mean=(0.5,), std=(0.5,), resolution=16)))
    assert tuple(x16.shape) == (4, 1, 16, 16)
    native = images.float().div(127.5).sub(1).mean().item()
    assert x16.mean().item() == pytest.approx(native, abs=0.02)


@pytest.mark.parametrize("size_in, size_out", [(28, 16), (32, 20), (16, 24)])
def test_resize_matches_torch_interpolate(size_in: int, size_out: int) -> None:
    x = torch.rand(3, 2, size_in, size_in) * 255
    expected = torch.nn.functional.interpolate(x, size=(size_out, size_out), mode="bilinear",
                                               align_corners=False, antialias=size_out < size_in)
    torch.testing.assert_close(torch.from_numpy(resize(x.numpy(), size_out)), expected,
                               rtol=1e-5, atol=1e-3)


def test_loader_normalises_to_zero_mean_unit_std(synthetic: DatasetSplits) -> None:
    x, _ = _epoch(synthetic.loader("train", 64), 0)
    assert x.mean(dim=(0, 2, 3)).abs().max().item() < 1e-4
    assert x.std(dim=(0, 2, 3)).sub(1).abs().max().item() < 1e-3


def test_crop_flip_matches_per_image_reference() -> None:
    images = np.random.RandomState(0).randint(0, 256, (6, 2, 5, 5)).astype(np.uint8)
    offsets = np.array([[0, 0], [2, 2], [4, 1], [1, 3], [4, 4], [0, 4]])
    flips = np.array([False, True, False, True, True, False])
    out = crop_flip(images, offsets, flips, pad=2)
    assert out.dtype == np.uint8 and out.shape == images.shape
    padded = np.pad(images, ((0, 0), (0, 0), (2, 2), (2, 2)))
    for i in range(6):
        r, c = offsets[i]
        ref = padded[i, :, r:r + 5, c:c + 5]
        np.testing.assert_array_equal(out[i], ref[:, :, ::-1] if flips[i] else ref)
    np.testing.assert_array_equal(crop_flip(images, np.full((6, 2), 2), None, pad=2), images)


def test_channels_last_matches_default_layout(synthetic: DatasetSplits) -> None:
    kwargs = dict(shuffle=True, augment=True, seed=4)
    for resolution in (None, 12):
        plain = _epoch(synthetic.loader("val", 16, resolution=resolution, **kwargs), 1)[0]
        nhwc = _epoch(synthetic.loader("val", 16, resolution=resolution, channels_last=True,
                                       **kwargs), 1)[0]
        torch.testing.assert_close(plain, nhwc, rtol=1e-5, atol=1e-5)


def test_loader_shards_and_subset(synthetic: DatasetSplits) -> None:
    shards = [synthetic.loader("val", 4, shuffle=True, seed=3, rank=r, world_size=3)
              for r in range(3)]
    orders = [s.order(7) for s in shards]
    assert [len(s) for s in shards] == [3, 3, 3] and [len(o) for o in orders] == [9, 9, 9]
    covered = torch.cat(orders)
    assert sorted(set(covered.tolist())) == list(range(len(synthetic.val)))  # 25 images, 2 padded
    assert len(covered) == 27
    sub = synthetic.loader("train", 8, subset=50)
    assert sub.num_samples == 50 and len(sub) == 7
    assert torch.equal(sub.indices, synthetic.loader("train", 8, subset=50, seed=9).indices)
    with pytest.raises(LeanconvError, match="subset must be"):
        synthetic.loader("train", 8, subset=10**6)
