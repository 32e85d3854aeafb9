"""Channel groups: residual, depthwise, concat, grouped, flatten couplings; refusals."""

import pytest
import torch
from torch import nn

from leanconv.errors import LeanconvError
from leanconv.graph import channel_groups, channel_units
from leanconv.graph.groups import trace_groups
from prune_toys import CatToy, DepthwiseToy, FlattenToy, GroupedToy, ResToy, RollToy, ScaleToy


X = torch.randn(2, 3, 8, 8)


def _by_root(model):
    return {g.root: g for g in channel_groups(model, X)}


def _members(group):
    return {(m.module, m.kind) for m in group.members}


def test_residual_add_couples_the_convs_it_sums():
    groups = _by_root(ResToy())
    assert sorted(groups) == ["conv_a", "conv_c", "stem.0"]  # never the classifier fc
    assert _members(groups["stem.0"]) == {
        ("stem.0", "out"), ("stem.1", "out"), ("conv_b", "out"), ("bn_b", "out"), ("conv_a", "in"), ("conv_c", "in"),
    }
    assert _members(groups["conv_a"]) == {("conv_a", "out"), ("bn_a", "out"), ("conv_b", "in")}
    assert _members(groups["conv_c"]) == {("conv_c", "out"), ("bn_c", "out"), ("fc", "in")}
    assert all(m.idxs == tuple(range(8)) for m in groups["stem.0"].members)


def test_depthwise_conv_is_coupled_to_its_producer():
    groups = _by_root(DepthwiseToy())
    assert _members(groups["expand.0"]) == {
        ("expand.0", "out"), ("expand.1", "out"), ("dw.0", "out"), ("dw.1", "out"), ("project.0", "in"),
    }
    assert groups["expand.0"].size == 16
    assert ("project.0", "out") in _members(groups["stem.0"])  # residual add


def test_concatenation_offsets():
    groups = _by_root(CatToy())
    a, b = groups["a"], groups["b"]
    assert {m.module: m.idxs for m in a.members} == {"a": (0, 1, 2, 3), "bn": (0, 1, 2, 3), "c": (0, 1, 2, 3)}
    assert {m.module: m.idxs for m in b.members} == {"b": tuple(range(6)), "bn": (4, 5, 6, 7, 8, 9),
                                                     "c": (4, 5, 6, 7, 8, 9)}


def test_grouped_conv_ties_channels_across_conv_groups():
    model = GroupedToy()
    groups = _by_root(model)
    # gconv has 2 groups of 4 inputs: channel k and k + 4 must go together
    assert channel_units(model, groups["conv1.0"]) == ((0, 4), (1, 5), (2, 6), (3, 7))
    # gconv's 12 outputs (2 groups of 6) feed g1x1 (3 groups of 4): offsets agree mod gcd(6, 4) = 2
    assert channel_units(model, groups["gconv.0"]) == ((0, 2, 4, 6, 8, 10), (1, 3, 5, 7, 9, 11))


def test_depthwise_multiplier_conv_keeps_its_inputs():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 8, 3, padding=1, groups=4),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    groups = {g.root: g for g in channel_groups(model, X)}
    assert channel_units(model, groups["0"]) == ((0, 1, 2, 3),)  # one unit: never removed
    assert channel_units(model, groups["1"]) == ((0, 2, 4, 6), (1, 3, 5, 7))


def test_flatten_consumer_is_resized_but_not_a_scored_member():
    (traced,) = trace_groups(FlattenToy(), X)
    assert _members(traced.group) == {("conv.0", "out"), ("conv.1", "out")}
    shares = {(s.module, s.kind): s.counts for s in traced.shares}
    assert shares[("fc", "in")] == (4, 4, 4, 4)  # 2x2 positions per channel


def test_ignored_layers_keep_their_outputs():
    groups = channel_groups(ResToy(), X, ignored=["conv_a"])
    assert sorted(g.root for g in groups) == ["conv_c", "stem.0"]


def test_parameter_used_in_forward_is_refused_by_name():
    with pytest.raises(LeanconvError, match="layer scale"):
        channel_groups(ScaleToy(), X)
    assert [g.root for g in channel_groups(ScaleToy(), X, strict=False)] == ["conv2.0"]


def test_operation_that_moves_channels_is_refused():
    with pytest.raises(LeanconvError, match="RollBackward"):
        channel_groups(RollToy(), X)


def test_tracing_leaves_modes_and_flags_alone():
    model = ResToy().train()
    model.conv_a.weight.requires_grad_(False)
    channel_groups(model, X)
    assert all(m.training for m in model.modules())
    assert not model.conv_a.weight.requires_grad and model.conv_b.weight.requires_grad


def test_zoo_resnet20_groups():
    from leanconv.models import create

    model = create("resnet20", input_size=16)
    groups = {g.root: g for g in channel_groups(model, torch.randn(1, 3, 16, 16))}
    assert len(groups) == 12  # 3 residual stages + 9 inner convs
    stage2 = next(g for g in groups.values() if ("layer2.0.shortcut.0", "out") in _members(g))
    outs = {m.module for m in stage2.out_members() if m.module.endswith(("conv2", "shortcut.0"))}
    assert outs == {"layer2.0.conv2", "layer2.1.conv2", "layer2.2.conv2", "layer2.0.shortcut.0"}
    assert "fc" not in groups


def test_zoo_mobilenetv2_couples_depthwise_convs():
    from leanconv.models import create

    model = create("mobilenetv2", input_size=16)
    groups = channel_groups(model, torch.randn(1, 3, 16, 16))
    dw = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1}
    covered = {m.module for g in groups for m in g.out_members()}
    assert dw <= covered
    for g in groups:  # a depthwise conv always shares a group with the conv that feeds it
        if any(m.module in dw for m in g.out_members()):
            assert any(m.module not in dw and isinstance(model.get_submodule(m.module), nn.Conv2d)
                       for m in g.out_members())
