"""Resolution pruning: the recorded input side, its cost, its storage and the data it gets."""

import pytest
import torch
from torch import nn

from leanconv import checkpoint
from leanconv.cli.common import resolution_of
from leanconv.cost import count
from leanconv.errors import LeanconvError
from leanconv.models import create
from leanconv.prune3d.resolution import resolution_ratio_to_side, set_resolution
from leanconv.train import evaluate


def test_macs_scale_with_the_square_of_the_side():
    model = create("resnet20")
    full = count(model, model.leanconv_meta["input_shape"]).macs
    assert set_resolution(model, 16) is model
    assert model.leanconv_meta["input_shape"] == [3, 16, 16]
    half = count(model, model.leanconv_meta["input_shape"]).macs
    # convs scale by exactly 4; the 64x10 classifier after pooling does not
    assert full - 4 * half == -3 * 64 * 10
    assert 3.99 < full / half < 4.0


def test_side_is_validated():
    model = create("resnet20")
    for bad in (7, 0, 16.0, True, "16"):
        with pytest.raises(LeanconvError):
            set_resolution(model, bad)
    assert model.leanconv_meta["input_shape"] == [3, 32, 32]


def test_a_model_that_does_not_run_at_the_side_is_refused():
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Flatten(), nn.Linear(2 * 28 * 28, 10))
    model.leanconv_meta = {"input_shape": [1, 28, 28]}
    with pytest.raises(LeanconvError, match="does not run at input side 14"):
        set_resolution(model, 14)
    assert model.leanconv_meta["input_shape"] == [1, 28, 28]
    model.train()
    set_resolution(model, 28)
    assert model.training


def test_channels_come_from_meta_or_argument():
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.AdaptiveAvgPool2d(1))
    with pytest.raises(LeanconvError, match="pass in_channels"):
        set_resolution(model, 12)
    set_resolution(model, 12, in_channels=2)
    assert model.leanconv_meta == {"input_shape": [2, 12, 12]}


def test_ratio_to_side_rounds_to_nearest_and_never_below_eight():
    assert resolution_ratio_to_side(0.5, 32) == 16
    assert resolution_ratio_to_side(0.3, 32) == 10  # 9.6
    assert resolution_ratio_to_side(0.515625, 32) == 17  # 16.5: halves go up
    assert resolution_ratio_to_side(0.1, 32) == 8  # 3.2, floored at 8
    assert resolution_ratio_to_side(1.0, 28) == 28
    for bad_r in (0, -0.5, float("nan"), True):
        with pytest.raises(LeanconvError):
            resolution_ratio_to_side(bad_r, 32)
    with pytest.raises(LeanconvError):
        resolution_ratio_to_side(0.5, 4)


def test_resolution_survives_checkpoint_and_resizes_eval_data(tmp_path, tiny_data):
    model = create("resnet20", num_classes=4, input_size=16)
    assert resolution_of(model, tiny_data) is None  # synthetic images are 16x16
    set_resolution(model, 12)
    checkpoint.save(model, tmp_path / "m.safetensors")
    loaded = checkpoint.load(tmp_path / "m.safetensors")
    assert loaded.leanconv_meta["input_shape"] == [3, 12, 12]
    side = resolution_of(loaded, tiny_data)
    assert side == 12
    loader = tiny_data.loader("val", 64, resolution=side)
    x, _ = next(iter(loader.epoch(0)))
    assert tuple(x.shape[1:]) == (3, 12, 12)
    got = evaluate(loaded, loader)
    assert got["n"] == len(tiny_data.val)
    assert got == evaluate(model, loader)
    assert torch.isfinite(torch.tensor(got["loss"]))
