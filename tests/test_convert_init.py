"""Converted layers started from the trained convs they replace (leanconv.convs.init_fit)."""

import copy

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from leanconv.convs.convert import conversion_targets, convert
from leanconv.convs.init_fit import factorise_dw_scc, fit_layers, measure_unexplained
from leanconv.errors import LeanconvError
from leanconv.layers import PeriodicSparseConv2d, SlidingChannelConv2d
from leanconv.layers.periodic_sparse import pattern_mask
from leanconv.models import build

EXACT = 1e-8  # unexplained share left by float32 round-off when the structure fits exactly


def _images(n=24, channels=3, side=12, seed=1):
    return torch.randn(n, channels, side, side, generator=torch.Generator().manual_seed(seed))


def _net(c_mid=8, c_out=16, bias=True):
    """A stem (never converted), then two 3x3 convs: the second with stride 2 and a bias."""
    return nn.Sequential(nn.Conv2d(3, c_mid, 3, padding=1), nn.BatchNorm2d(c_mid), nn.ReLU(),
                         nn.Conv2d(c_mid, c_mid, 3, padding=1, bias=False), nn.ReLU(),
                         nn.Conv2d(c_mid, c_out, 3, stride=2, padding=1, bias=bias)).eval()


def _dw_scc_weight(scc, depth_shape, seed=2):
    """A random ``[out, in, kh, kw]`` weight of the form ``S[o, i] * D[i]`` on ``scc``'s windows."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.zeros(scc.out_channels, scc.in_channels).scatter(
        1, scc.window_index, torch.randn(scc.out_channels, scc.window, generator=gen))
    depth = torch.randn(scc.in_channels, *depth_shape, generator=gen)
    return scale[:, :, None, None] * depth[None]


def _one_by_one(stride=2):
    """A stem, then a 1x1 conv (with stride) and the same model with an SCC in its place."""
    original = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 12, 1, stride=stride, bias=False))
    converted = copy.deepcopy(original)
    converted[2] = SlidingChannelConv2d(8, 12, groups=2, overlap=0.5, stride=stride)
    return original.eval(), converted


def test_a_conv_on_the_pattern_is_fitted_exactly_and_the_models_agree():
    original = _net()
    for i in (3, 5):
        original[i].weight.data *= pattern_mask(*original[i].weight.shape[:2], "psd4_p8")
    converted = convert(copy.deepcopy(original), "psconv").train()
    before = {k: v.clone() for k, v in original.state_dict().items()}
    x = _images()
    result = fit_layers(original, converted, ["3", "5"], x)
    assert list(result) == ["3", "5"]
    for path, entry in result.items():
        assert entry["kind"] == "psconv"
        assert 0 <= entry["unexplained"] < EXACT and 0 <= entry["unexplained_start"] < EXACT
        assert_close(converted.get_submodule(path).dense_weight(), original.get_submodule(path).weight)
    assert_close(converted[5].bias, original[5].bias)
    assert converted.training and all(m.training for m in converted.modules())  # modes restored
    assert not original.training
    for key, value in original.state_dict().items():
        assert torch.equal(value, before[key]), key
    with torch.no_grad():
        assert_close(converted.eval()(x), original(x), rtol=1e-5, atol=1e-5)


def test_a_depthwise_times_scc_conv_is_recovered_exactly():
    original = _net(c_mid=8, c_out=12, bias=False)
    converted = convert(copy.deepcopy(original), "scc", groups=2, overlap=0.5)
    for i in (3, 5):
        original[i].weight.data = _dw_scc_weight(converted[i][1], (3, 3), seed=i)
    scale, depth = factorise_dw_scc(original[5].weight, converted[5][1].window_index)
    assert_close((scale[:, :, None] * depth[None]).view_as(original[5].weight).float(), original[5].weight)
    assert_close(scale.norm(dim=0), depth.norm(dim=1))  # balanced
    x = _images()
    result = fit_layers(original, converted, ["3", "5"], x)
    assert all(e["kind"] == "dw_scc" and 0 <= e["unexplained"] < EXACT for e in result.values())
    with torch.no_grad():
        assert_close(converted(x), original(x), rtol=1e-5, atol=1e-5)


def test_a_1x1_conv_on_the_windows_is_fitted_exactly_by_its_scc():
    original, converted = _one_by_one(stride=2)
    scc = converted[2]
    original[2].weight.data = _dw_scc_weight(scc, (1, 1))
    result = fit_layers(original, converted, ["2"], _images())
    assert result["2"]["kind"] == "scc" and 0 <= result["2"]["unexplained"] < EXACT
    assert_close(scc.dense_weight(), original[2].weight)


def _random_case(kind):
    """(original, converted, paths, the new layer's fitted parameters) for a random conv."""
    if kind == "scc":
        original, converted = _one_by_one(stride=1)
        return original, converted, ["2"], lambda: [converted[2].weight]
    original = _net(bias=kind == "psconv")  # SCC has no bias to fit
    converted = convert(copy.deepcopy(original), "psconv") if kind == "psconv" else \
        convert(copy.deepcopy(original), "scc", groups=2, overlap=0.5)
    last = converted[5]
    params = (lambda: [last.weight_nz, last.bias]) if kind == "psconv" else (lambda: [last[1].weight])
    return original, converted, ["3", "5"], params


@pytest.mark.parametrize("kind", ["psconv", "dw_scc", "scc"])
def test_the_fit_beats_its_start_and_cannot_be_improved_by_a_perturbation(kind):
    original, converted, paths, params = _random_case(kind)
    x = _images(n=32)
    result = fit_layers(original, converted, paths, x)
    for entry in result.values():
        assert entry["kind"] == kind
        assert 0 <= entry["unexplained"] <= entry["unexplained_start"] + 1e-9
    measured = measure_unexplained(original, converted, paths, x)
    assert_close(measured, {p: e["unexplained"] for p, e in result.items()}, rtol=1e-4, atol=1e-6)
    fitted = measured[paths[-1]]
    gen = torch.Generator().manual_seed(3)
    for _ in range(4):
        saved = [p.detach().clone() for p in params()]
        with torch.no_grad():
            for p in params():
                p.add_(0.05 * p.pow(2).mean().sqrt() * torch.randn(p.shape, generator=gen))
        assert measure_unexplained(original, converted, paths[-1:], x)[paths[-1]] > fitted + 1e-5
        with torch.no_grad():
            for p, value in zip(params(), saved):
                p.copy_(value)


def test_alternating_steps_on_data_never_lose_to_the_fit_of_s_alone():
    original = _net(bias=False)
    converted = convert(copy.deepcopy(original), "scc", groups=2, overlap=0.5)
    x = _images(n=32)
    alone = fit_layers(original, copy.deepcopy(converted), ["3", "5"], x, als_steps=0)
    alternated = fit_layers(original, converted, ["3", "5"], x, als_steps=4)
    assert alternated["3"]["unexplained_start"] == alone["3"]["unexplained_start"]
    assert alternated["3"]["unexplained"] <= alone["3"]["unexplained"] + 1e-9
    assert alternated["5"]["unexplained"] <= alone["5"]["unexplained"] + 0.05  # its inputs differ a little


@pytest.mark.parametrize("to,options", [("psconv", {}), ("scc", {"groups": 2})])
def test_progressive_fit_of_resnet20_brings_the_logits_closer(to, options):
    original = build("resnet20", num_classes=10, in_channels=1, input_size=28).eval()
    paths = conversion_targets(original, to)
    fresh = convert(copy.deepcopy(original), to, **options).eval()
    fitted = copy.deepcopy(fresh)
    seen = []
    result = fit_layers(original, fitted, paths, _images(n=16, channels=1, side=28), batch_size=8,
                        progress=lambda done, total, info: seen.append((done, total, info["layer"])))
    assert set(result) == set(paths) and seen[-1][:2] == (len(paths), len(paths))
    assert all(0 <= e["unexplained"] <= 1 + 1e-6 for e in result.values())
    x = _images(n=8, channels=1, side=28, seed=5)
    with torch.no_grad():
        want = original(x)
        assert (fitted(x) - want).norm() < 0.5 * (fresh(x) - want).norm()


def test_a_layer_of_an_unknown_kind_is_named():
    original = _net()
    with pytest.raises(LeanconvError, match="layer 5 .*Conv2d"):
        fit_layers(original, copy.deepcopy(original), ["5"], _images(n=2))
    converted = convert(copy.deepcopy(original), "psconv")
    assert isinstance(converted[5], PeriodicSparseConv2d)
    with pytest.raises(LeanconvError, match="images"):
        fit_layers(original, converted, ["5"], [])
