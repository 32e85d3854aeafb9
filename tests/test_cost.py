"""Tests for leanconv.cost: hand-computed MAC counts, activation memory, measured latency."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from torch import nn

from leanconv.cost import (
    CostReport,
    activation_memory,
    count,
    format_profile,
    measure_latency,
    measure_onnx_latency,
    profile,
)
from leanconv.errors import LeanconvError

try:
    import leanconv.models as zoo
    ZOO_NAMES = zoo.names()
except ImportError:  # the zoo package is written in parallel; its tests skip until it lands
    zoo, ZOO_NAMES = None, []


def _macs(module: nn.Module, shape: tuple[int, ...]) -> int:
    return count(module, shape).macs


# --- counting rules ------------------------------------------------------------------------

def test_conv2d_macs_and_params_match_hand_count():
    conv = nn.Conv2d(3, 8, 3, padding=1)
    report = count(conv, (3, 10, 10))
    assert report.macs == 8 * 10 * 10 * 3 * 3 * 3  # out elems x C_in x kH x kW = 21600
    assert report.params == 8 * 3 * 9 + 8
    assert report.layers[0].output_shape == (8, 10, 10)
    assert _macs(nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), (3, 10, 10)) == 8 * 5 * 5 * 27


def test_grouped_and_depthwise_conv_divide_by_groups():
    assert _macs(nn.Conv2d(8, 16, 3, padding=1, groups=4), (8, 6, 6)) == 16 * 36 * 2 * 9  # 10368
    depthwise = count(nn.Conv2d(8, 8, 3, padding=1, groups=8), (8, 6, 6))
    assert depthwise.macs == 8 * 36 * 9
    assert depthwise.params == 8 * 9 + 8


def test_linear_and_conv_transpose():
    assert _macs(nn.Sequential(nn.Flatten(), nn.Linear(12, 5)), (3, 2, 2)) == 60
    up = count(nn.ConvTranspose2d(4, 2, 2, stride=2), (4, 5, 5))
    assert up.macs == 4 * 5 * 5 * 2 * 4  # in elems x C_out x kH x kW
    assert up.layers[0].output_shape == (2, 10, 10)


def test_batchnorm_listed_with_zero_macs_and_flops_are_twice_macs():
    model = nn.Sequential(nn.Conv2d(1, 2, 1, bias=False), nn.BatchNorm2d(2), nn.ReLU())
    report = count(model, (1, 4, 4))
    assert [(r.name, r.type, r.macs, r.params) for r in report.layers] == [
        ("0", "Conv2d", 32, 2), ("1", "BatchNorm2d", 0, 4)]
    assert report.flops == 2 * report.macs == 64
    record = json.loads(json.dumps(report.to_dict()))
    assert record["flops"] == 64 and record["macs"] == 32 and record["layers"][1]["output_shape"] == [2, 4, 4]


class _Counted(nn.Module):
    """A block that reports its own cost; its Conv2d child must not be counted again."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x):
        return self.conv(x)

    def count_macs(self, input, output):
        assert isinstance(input, torch.Tensor) and input.shape == (1, 2, 4, 4)
        return 1234


def test_count_macs_is_used_and_children_are_not_descended():
    model = nn.Sequential(_Counted(), nn.Conv2d(2, 1, 1, bias=False))
    report = count(model, (2, 4, 4))
    assert report.macs == 1234 + 16 * 2
    assert [r.name for r in report.layers] == ["0", "1"]
    assert report.layers[0].params == 2 * 2 * 9 + 2  # the whole subtree is one row


class _Scale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return x * self.weight


def test_unknown_parametric_layer_raises_with_its_path():
    model = nn.Sequential(nn.Conv2d(1, 1, 1), nn.Sequential(nn.ReLU(), _Scale()))
    with pytest.raises(LeanconvError, match=r"1\.1.*_Scale.*count_macs"):
        count(model, (1, 4, 4))


class _Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(self.lin(x.flatten(1)))


def test_module_called_twice_counts_twice_and_shared_params_once():
    report = count(_Twice(), (4,))
    assert report.macs == 2 * 16
    assert report.layers[0].calls == 2
    tied = nn.Sequential(nn.Linear(3, 3, bias=False), nn.Linear(3, 3, bias=False))
    tied[1].weight = tied[0].weight
    assert count(tied, (3,)).params == 9


class _Unused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(2, 3)
        self.spare = nn.Linear(2, 7)

    def forward(self, x):
        return self.used(x)


def test_never_called_layer_keeps_its_params():
    report = count(_Unused(), (2,))
    assert report.params == 9 + 21 and report.macs == 6
    spare = [r for r in report.layers if r.name == "spare"][0]
    assert (spare.calls, spare.macs, spare.params, spare.output_shape) == (0, 0, 21, None)


def test_modes_restored_and_running_stats_untouched():
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2), nn.Dropout())
    model.train()
    model[1].eval()  # a mixed-mode model must come back mixed
    before = model[1].running_mean.clone()
    count(model, (1, 3, 3))
    activation_memory(model, (1, 3, 3))
    assert model.training and model[2].training and not model[1].training
    assert torch.equal(model[1].running_mean, before)


def test_wrong_input_shape_is_a_user_error():
    with pytest.raises(LeanconvError, match="input of shape"):
        count(nn.Conv2d(3, 4, 3), (4, 8, 8))
    with pytest.raises(LeanconvError, match="positive"):
        count(nn.Conv2d(3, 4, 3), (3, 0, 8))


# --- the zoo -------------------------------------------------------------------------------

@pytest.mark.parametrize("name, params, macs", [("resnet20", 0.27e6, 40.8e6), ("resnet56", 0.85e6, 125.5e6)])
def test_cifar_resnets_match_published_cost(name, params, macs):
    if name not in ZOO_NAMES:
        pytest.skip(f"leanconv.models has no {name!r} yet")
    report = count(zoo.create(name), (3, 32, 32))
    assert report.params == pytest.approx(params, rel=0.02)
    assert report.macs == pytest.approx(macs, rel=0.02)


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_every_zoo_model_counts(name):
    model = zoo.create(name)
    report = count(model, (3, 32, 32))
    assert isinstance(report, CostReport)
    assert report.params == sum(p.numel() for p in model.parameters())
    assert report.macs > report.params  # every zoo net reuses its conv weights over many pixels
    assert sum(r.macs for r in report.layers) == report.macs


# --- activation memory ---------------------------------------------------------------------

def test_activation_memory_tracks_live_tensors():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3, padding=1))
    mem = activation_memory(model, (3, 8, 8))
    image, hidden, out = 3 * 64 * 4, 4 * 64 * 4, 2 * 64 * 4  # bytes of float32 tensors
    assert mem == {"input": image, "total": image + 2 * hidden + out, "peak": image + 2 * hidden}
    inplace = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(4, 2, 3, padding=1))
    assert activation_memory(inplace, (3, 8, 8))["total"] == image + hidden + out


# --- latency -------------------------------------------------------------------------------

def _tiny() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 2))


def test_measure_latency_stats_and_restores_state():
    model = _tiny().train()
    threads_before = torch.get_num_threads()
    stats = measure_latency(model, (3, 8, 8), 2, warmup=1, repeats=5, threads=1)
    assert math.isfinite(stats.median_ms) and stats.median_ms > 0
    assert stats.min_ms <= stats.p10_ms <= stats.median_ms <= stats.p90_ms
    assert (stats.repeats, stats.threads, stats.batch_size, stats.memory_format) == (5, 1, 2, "channels_last")
    assert torch.get_num_threads() == threads_before and model.training
    assert model[0].weight.is_contiguous()  # the caller's model was not converted to NHWC
    nchw = measure_latency(model, (3, 8, 8), 1, warmup=0, repeats=2, channels_last=False)
    assert nchw.memory_format == "contiguous" and nchw.median_ms > 0
    with pytest.raises(LeanconvError):
        measure_latency(model, (3, 8, 8), 0)


def _export(model: nn.Module, path, dynamic: bool) -> None:
    # the TorchScript exporter takes 0.1 s here, the dynamo one about 2 s; both work
    axes = {"x": {0: "batch"}} if dynamic else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.randn(1, 3, 8, 8),), str(path), dynamo=False,
                          input_names=["x"], dynamic_axes=axes)


def test_onnx_latency_on_exported_model(tmp_path):
    path = tmp_path / "tiny.onnx"
    _export(_tiny(), path, dynamic=True)
    stats = measure_onnx_latency(path, (3, 8, 8), 3, warmup=1, repeats=4, threads=1)
    assert math.isfinite(stats.median_ms) and stats.median_ms > 0
    assert (stats.backend, stats.threads, stats.batch_size, stats.repeats) == ("onnxruntime", 1, 3, 4)
    fixed = tmp_path / "fixed.onnx"
    _export(_tiny(), fixed, dynamic=False)
    with pytest.raises(LeanconvError, match="fixed batch of 1"):
        measure_onnx_latency(fixed, (3, 8, 8), 2)
    with pytest.raises(LeanconvError, match="does not exist"):
        measure_onnx_latency(tmp_path / "missing.onnx", (3, 8, 8), 1)


# --- profile -------------------------------------------------------------------------------

def test_profile_record_and_table():
    record = profile(_tiny(), (3, 8, 8), batch_sizes=(1, 2), repeats=2, warmup=0, threads=1)
    json.dumps(record)
    conv_macs = 4 * 64 * 27
    assert record["macs"] == conv_macs + 8 and record["flops"] == 2 * record["macs"]
    assert record["params"] == 4 * 27 + 4 + 10 and record["input_shape"] == [3, 8, 8]
    assert set(record["latency_ms"]) == {"batch1", "batch2"} and record["threads"] == 1
    assert record["activation_memory_bytes"]["peak"] <= record["activation_memory_bytes"]["total"]
    assert "multiply" in record["units"]["macs"]
    table = format_profile(record)
    assert "MACs" in table and "FLOPs" in table and "1 threads" in table and "Linear" in table
    assert "99.9" in table  # the conv's share of MACs: 6912 / 6920 = 99.88 %
    quiet = profile(_tiny(), (3, 8, 8), latency=False)
    assert quiet["latency_ms"] == {} and quiet["macs"] == record["macs"]


def test_measure_fastest_layout_picks_one_of_the_two_layouts():
    from leanconv.cost import measure_fastest_layout

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    stats = measure_fastest_layout(model, (3, 8, 8), 2, repeats=2, warmup=0)
    assert stats.memory_format in ("channels_last", "contiguous") and stats.median_ms > 0
    cpu = measure_fastest_layout(model, (3, 8, 8), 2, repeats=2, warmup=0, clock="cpu")
    assert cpu.clock == "cpu" and cpu.threads == 1
