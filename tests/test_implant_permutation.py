"""Folding implant channel orders into the coupled layers: same function, no run-time re-ordering."""

import logging

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from leanconv import checkpoint
from leanconv.importance import create_criterion
from leanconv.layers.implant import ImplantConv2d
from leanconv.models import create
from leanconv.graph import channel_groups
from leanconv.width import can_implant, implant_channels, prune_to_budget
from leanconv.width import permute
from leanconv.width.permute import fold_channel_orders
from prune_toys import CatToy, DepthwiseToy, FlattenToy, GroupedToy, ResToy, cbr, randomize_bn


X = torch.randn(2, 3, 8, 8)
X16 = torch.randn(2, 3, 16, 16)


def _assert_same_function(got, want):
    """Renumbering channels reorders the sums of every layer downstream, so the outputs differ
    by float32 rounding (CPU-dependent through oneDNN's blocking) of a few ulps of the largest
    output per layer: the absolute tolerance scales with that magnitude (1e-5 of it, as
    fold_channel_orders' own self-check does), never below the float32 default."""
    assert_close(got, want, rtol=1.3e-6, atol=1e-5 * max(1.0, float(want.abs().max())))


class DwToy(nn.Module):
    """3x3 conv -> BN -> 3x3 depthwise (with bias) -> BN -> 1x1 -> pool -> fc."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(*cbr(3, 8))
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.dw_bn = nn.BatchNorm2d(8)
        self.pw = nn.Conv2d(8, 6, 1)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(6, 2)

    def forward(self, x):
        y = self.pw(torch.relu(self.dw_bn(self.dw(self.conv(x)))))
        return self.fc(self.pool(y).flatten(1))


class LoopToy(nn.Module):
    """x + BN(conv(x)): the 3x3 conv reads and writes the same channel group."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(*cbr(3, 8))
        self.conv, self.bn = nn.Conv2d(8, 8, 3, padding=1, bias=True), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.bn(self.conv(x))
        return self.fc(x.mean((2, 3)))


def _implants(model: nn.Module) -> dict[str, ImplantConv2d]:
    return {n: m for n, m in model.named_modules() if isinstance(m, ImplantConv2d)}


def _implant(model: nn.Module, x: torch.Tensor, plan: dict[str, list[int]]) -> nn.Module:
    """Implant group channels by group root, then give the implants nonzero weights."""
    groups = {g.root: g for g in channel_groups(model, x)}
    for root, channels in plan.items():
        implant_channels(model, groups[root], channels)
    torch.manual_seed(5)
    for m in _implants(model).values():
        nn.init.normal_(m.implant.weight, std=0.3)
    return model.eval()


@pytest.mark.parametrize(
    "toy, plan, n_implants",
    [
        (ResToy, {"stem.0": [1, 5]}, 2),  # residual add: stem and conv_b implanted alike
        (ResToy, {"conv_a": [0, 3, 7], "conv_c": [2]}, 2),
        (DepthwiseToy, {"stem.0": [2, 3]}, 1),  # 1x1 producer (project) in the group
        (CatToy, {"a": [1], "b": [0, 4]}, 2),  # slices of a shared BN and of the 1x1 consumer
        (FlattenToy, {"conv.0": [1]}, 1),  # 4 linear columns per channel after the flatten
        (LoopToy, {"stem.0": [2, 5]}, 2),  # an implant that consumes its own group
    ],
)
def test_fold_keeps_outputs_and_drops_every_order(toy, plan, n_implants):
    torch.manual_seed(0)
    model = _implant(randomize_bn(toy()), X, plan)
    implants = _implants(model)
    assert len(implants) == n_implants and all(m.channel_order is not None for m in implants.values())
    before = model(X)
    assert fold_channel_orders(model, X) == {}
    assert all(m.channel_order is None for m in implants.values())
    _assert_same_function(model(X), before)
    assert fold_channel_orders(model, X) == {}  # nothing left to do


def test_depthwise_consumer_and_its_bn_follow():
    """can_implant refuses groups with a depthwise conv, so the implant is made by hand."""
    torch.manual_seed(0)
    model = randomize_bn(DwToy())
    model.conv[0] = ImplantConv2d.from_conv(model.conv[0], [0, 6])
    nn.init.normal_(model.conv[0].implant.weight)
    before = model(X)
    assert fold_channel_orders(model, X) == {}
    assert model.conv[0].channel_order is None
    _assert_same_function(model(X), before)


def test_grouped_consumer_keeps_the_order(caplog):
    """conv1's implanted channels would have to cross the grouped conv's groups: refused."""
    model = _implant(randomize_bn(GroupedToy()), X, {"conv1.0": [1, 5]})
    order = list(model.conv1[0].channel_order)
    before = model(X)
    with caplog.at_level(logging.INFO, logger="leanconv.width.permute"):
        left = fold_channel_orders(model, X)
    assert list(left) == ["conv1.0"] and "conv group" in left["conv1.0"]
    assert "conv1.0" in caplog.text
    assert model.conv1[0].channel_order == order
    assert_close(model(X), before, rtol=0, atol=0)


def test_grouped_consumer_folds_when_channels_stay_in_their_conv_group():
    model = randomize_bn(GroupedToy())
    conv = model.conv1[0]
    model.conv1[0] = ImplantConv2d.from_conv(conv, [7])  # implanted channel already last
    model.conv1[0].set_channel_order([0, 1, 2, 3, 4, 6, 5, 7])  # swap two channels of conv group 1
    nn.init.normal_(model.conv1[0].implant.weight)
    before = model(X)
    assert fold_channel_orders(model, X) == {}
    assert model.conv1[0].channel_order is None
    _assert_same_function(model(X), before)


def test_network_output_channels_are_never_renumbered():
    torch.manual_seed(0)
    head = ImplantConv2d.from_conv(nn.Conv2d(4, 5, 3, padding=1), [1, 2])
    nn.init.normal_(head.implant.weight)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), head).eval()
    before = model(X)
    left = fold_channel_orders(model, X)
    assert list(left) == ["2"] and "output" in left["2"]
    assert head.channel_order is not None
    assert_close(model(X), before, rtol=0, atol=0)


def test_a_wrong_renumbering_is_caught(monkeypatch):
    """The self-check: skipping the BatchNorm of the group must raise, not pass silently."""
    model = _implant(randomize_bn(ResToy()), X, {"conv_a": [0, 3]})
    real = permute._renumber
    monkeypatch.setattr(permute, "_renumber",
                        lambda m, axis, idx: None if isinstance(m, nn.BatchNorm2d) else real(m, axis, idx))
    with pytest.raises(RuntimeError, match="leanconv bug"):
        fold_channel_orders(model, X)


def _reload(model: nn.Module, tmp_path) -> nn.Module:
    checkpoint.save(model, tmp_path / "m.safetensors")
    return checkpoint.load(tmp_path / "m.safetensors").eval()


def test_resnet20_every_implantable_group_folds_and_reloads(tmp_path):
    torch.manual_seed(0)
    model = randomize_bn(create("resnet20", input_size=16))
    plans = {g.root: [1, g.size - 2] for g in channel_groups(model, X16) if can_implant(model, g)}
    model = _implant(model, X16, plans)
    assert len(plans) >= 10 and len(_implants(model)) >= len(plans)
    before = model(X16)
    assert fold_channel_orders(model, X16) == {}
    assert all(m.channel_order is None for m in _implants(model).values())
    _assert_same_function(model(X16), before)
    assert_close(_reload(model, tmp_path)(X16), model(X16), rtol=0, atol=0)


def test_mobilenetv2_stem_implant_folds_through_the_depthwise_conv(tmp_path):
    torch.manual_seed(0)
    model = randomize_bn(create("mobilenetv2", input_size=16))
    model.stem[0] = ImplantConv2d.from_conv(model.stem[0], [0, 9, 30])
    nn.init.normal_(model.stem[0].implant.weight, std=0.3)
    dw = model.features[0].conv[0].weight.detach().clone()
    before = model(X16)
    assert fold_channel_orders(model, X16) == {}
    assert model.stem[0].channel_order is None
    assert not torch.equal(model.features[0].conv[0].weight, dw)  # the depthwise filters moved
    _assert_same_function(model(X16), before)
    assert_close(_reload(model, tmp_path)(X16), model(X16), rtol=0, atol=0)


def test_prune_to_budget_leaves_no_reordered_implant(tmp_path):
    torch.manual_seed(0)
    model = randomize_bn(create("resnet20", input_size=16))
    result = prune_to_budget(model, create_criterion("l1"), X16, target=0.5, implant=0.2)
    implants = _implants(model)
    assert result.implanted and implants
    assert all(m.channel_order is None for m in implants.values())
    for m in implants.values():
        nn.init.normal_(m.implant.weight, std=0.3)
    assert_close(_reload(model, tmp_path)(X16), model.eval()(X16), rtol=0, atol=0)
