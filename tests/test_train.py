"""Training loop: resume equals an uninterrupted run, divergence is caught, BN recalibration."""

import json
import math

import pytest
import torch

from leanconv import checkpoint
from leanconv.errors import LeanconvError
from leanconv.models import create
from leanconv.train import TrainConfig, evaluate, fit, learning_rate, recalibrate_bn


def _setup(tiny_data, seed=0, init_seed=None):
    torch.manual_seed(seed if init_seed is None else init_seed)
    model = create("resnet20", num_classes=tiny_data.num_classes, in_channels=tiny_data.in_channels,
                   input_size=tiny_data.image_size)
    train = tiny_data.loader("train", 64, shuffle=True, augment=True, seed=seed, drop_last=True)
    val = tiny_data.loader("val", 128)
    return model, train, val


def test_training_learns(tiny_data):
    model, train, val = _setup(tiny_data)
    before = evaluate(model, val)["accuracy"]
    fit(model, train, TrainConfig(epochs=3, lr=0.05), val_loader=val)
    after = evaluate(model, val)["accuracy"]
    assert after > before + 20


def test_resume_equals_uninterrupted(tiny_data, tmp_path):
    config = TrainConfig(epochs=3, lr=0.05, seed=3)
    model_a, train, val = _setup(tiny_data, seed=3)
    fit(model_a, train, config, val_loader=val, out_dir=tmp_path / "a")

    model_b, train, val = _setup(tiny_data, seed=3)

    def interrupt(done, total, info):
        if info["epoch"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(model_b, train, config, val_loader=val, out_dir=tmp_path / "b", progress=interrupt)
    assert len((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()) == 2

    model_c, train, val = _setup(tiny_data, seed=3, init_seed=99)  # different init: resume must overwrite it
    result = fit(model_c, train, config, val_loader=val, out_dir=tmp_path / "b", resume=True)
    assert result.epochs_run == 1
    for (name, a), c in zip(model_a.state_dict().items(), model_c.state_dict().values()):
        torch.testing.assert_close(c, a, rtol=0, atol=0, msg=name)
    rows_a = [json.loads(l) for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(l) for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_accuracy"] for r in rows_a] == [r["val_accuracy"] for r in rows_b]


def test_resume_refuses_a_different_config(tiny_data, tmp_path):
    model, train, val = _setup(tiny_data)
    fit(model, train, TrainConfig(epochs=1, lr=0.05), out_dir=tmp_path)
    with pytest.raises(LeanconvError, match="different training config"):
        fit(model, train, TrainConfig(epochs=1, lr=0.01), out_dir=tmp_path, resume=True)


def test_divergence_stops_and_keeps_last_good_checkpoint(tiny_data, tmp_path):
    model, train, val = _setup(tiny_data)
    fit(model, train, TrainConfig(epochs=1, lr=0.05), out_dir=tmp_path)
    good = (tmp_path / "model.safetensors").read_bytes()
    with torch.no_grad():
        model.fc.weight.fill_(float("nan"))
    with pytest.raises(LeanconvError, match="diverged"):
        fit(model, train, TrainConfig(epochs=2, lr=0.05), out_dir=tmp_path, resume=False)
    assert (tmp_path / "model.safetensors").read_bytes() == good
    assert math.isfinite(checkpoint.load(tmp_path / "model.safetensors").fc.weight.sum().item())


def test_schedules():
    cos = TrainConfig(epochs=1, lr=0.1)
    assert learning_rate(cos, 0, 100) == pytest.approx(0.1)
    assert learning_rate(cos, 50, 100) == pytest.approx(0.05)
    step = TrainConfig(epochs=1, lr=0.1, schedule="step")
    assert [round(learning_rate(step, s, 100), 6) for s in (0, 49, 50, 75)] == [0.1, 0.1, 0.01, 0.001]
    with pytest.raises(LeanconvError):
        TrainConfig(epochs=0)


def test_recalibrate_bn_resets_statistics(tiny_data):
    model, train, val = _setup(tiny_data)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.fill_(100.0)
    assert evaluate(model, val)["accuracy"] < 60
    n = recalibrate_bn(model, train, max_batches=4)
    assert n > 0
    assert model.bn1.running_mean.abs().max() < 50


def test_finetune_trains_recalibrates_and_leaves_nchw(tiny_data):
    from leanconv.train import finetune

    model, _, _ = _setup(tiny_data)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    finetune(model, tiny_data, epochs=0, lr=0.05)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    finetune(model, tiny_data, epochs=1, lr=0.05, images=100)
    assert not torch.equal(before["conv1.weight"], model.conv1.weight)
    assert not torch.equal(before["bn1.running_mean"], model.bn1.running_mean)
    assert model.conv1.weight.is_contiguous()


def test_weights_broken_by_the_last_update_are_caught_before_writing(tiny_data, tmp_path):
    """Every loss is finite (it is computed before each update), but an infinite weight decay
    makes the one update non-finite: the epoch must not be written."""
    model, _, _ = _setup(tiny_data)
    one_batch = tiny_data.loader("train", 64, subset=64, drop_last=True)
    assert len(one_batch) == 1
    with pytest.raises(LeanconvError, match="--weight-decay must be a finite number"):
        TrainConfig(epochs=1, lr=0.05, weight_decay=float("inf"))  # refused by its range first
    config = TrainConfig(epochs=1, lr=0.05)
    object.__setattr__(config, "weight_decay", float("inf"))  # past the range check, to reach the guard
    with pytest.raises(LeanconvError, match="weights or the validation loss are no longer finite"):
        fit(model, one_batch, config, out_dir=tmp_path)
    assert not (tmp_path / "model.safetensors").exists()


def test_a_strided_1x1_conv_with_few_input_channels_trains_in_nchw(tiny_data):
    """Torch 2.13's oneDNN crashes in the backward of a 1x1 stride-2 conv with 2-7 input channels
    in channels_last (a pruned ResNet shortcut); fit detects it and trains in NCHW instead."""
    from torch import nn

    from leanconv.train.loop import channels_last_crashes

    shortcut = nn.Conv2d(4, 32, 1, stride=2, bias=False)
    assert channels_last_crashes(nn.Sequential(shortcut))
    for safe in (nn.Conv2d(8, 32, 1, stride=2), nn.Conv2d(1, 32, 1, stride=2), nn.Conv2d(4, 32, 1),
                 nn.Conv2d(4, 32, 3, stride=2), nn.Conv2d(16, 32, 1, stride=2, groups=2)):
        assert not channels_last_crashes(nn.Sequential(safe))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 32, 1, stride=2, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, tiny_data.num_classes))
    before = model[3].weight.detach().clone()
    result = fit(model, tiny_data.loader("train", 64, shuffle=True), TrainConfig(epochs=1, lr=0.05))
    assert math.isfinite(result.history[-1]["train_loss"])  # in channels_last this aborted the process
    assert not torch.equal(model[3].weight, before)
