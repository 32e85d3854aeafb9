"""Physical removal: smaller layers, same outputs when the removed channels were silent."""

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from leanconv.errors import LeanconvError
from leanconv.graph import channel_groups
from leanconv.width import channel_counts, implant_channels, remove_channels
from leanconv.layers.implant import ImplantConv2d
from leanconv.width.channels import WAKE
from leanconv.width.permute import fold_channel_orders
from prune_toys import CatToy, DepthwiseToy, FlattenToy, GroupedToy, ResToy, randomize_bn, silence


X = torch.randn(2, 3, 8, 8)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "toy, removal",
    [
        (ResToy, {"stem.0": [1, 6], "conv_a": [0, 2, 3], "conv_c": [5]}),
        (DepthwiseToy, {"expand.0": [0, 7, 8, 15], "stem.0": [3]}),
        (CatToy, {"a": [2], "b": [0, 5], "c": [1]}),
        (GroupedToy, {"conv1.0": [1, 5], "gconv.0": [1, 3, 5, 7, 9, 11]}),
    ],
)
def test_removing_silent_channels_keeps_outputs(toy, removal):
    model = randomize_bn(toy())
    groups = channel_groups(model, X)
    index = {g.root: i for i, g in enumerate(groups)}
    for root, channels in removal.items():
        silence(model, groups[index[root]], channels)
    before, ref = channel_counts(model), model(X)
    remove_channels(model, groups, {index[r]: c for r, c in removal.items()}, X)
    assert_close(model(X), ref)
    lost: dict[str, int] = {}  # a BN after a concat serves two groups
    for root, channels in removal.items():
        for m in groups[index[root]].out_members():
            lost[m.module] = lost.get(m.module, 0) + len(channels)
    after = channel_counts(model)
    assert {n: before[n][1] - after[n][1] for n in lost} == lost
    assert all(type(m) in (nn.Conv2d, nn.BatchNorm2d, nn.Linear) for m in model.modules() if not list(m.children())
               and any(True for _ in m.parameters()))


def test_concat_consumer_loses_the_right_columns():
    model = randomize_bn(CatToy())
    groups = channel_groups(model, X)
    w = model.c.weight.detach().clone()
    remove_channels(model, groups, {0: [1, 3], 1: [0, 4]}, X)  # a: 1, 3; b: 0, 4 -> c inputs 1, 3, 4, 8
    keep = [0, 2, 5, 6, 7, 9]
    assert model.c.in_channels == 6 and model.bn.num_features == 6
    assert_close(model.c.weight, w[:, keep])


def test_flatten_consumer_drops_all_positions_of_a_channel():
    model = randomize_bn(FlattenToy())
    groups = channel_groups(model, X)
    with torch.no_grad():
        model.fc.weight[:, 4:8] = 0  # channel 1 owns inputs 4..7 of fc
    ref = model(X)
    remove_channels(model, groups, {0: [1]}, X)
    assert model.fc.in_features == 12
    assert_close(model(X), ref)


def test_zoo_resnet20_exact_parameter_drop_and_same_output_shape():
    from leanconv.models import create

    model = create("resnet20", input_size=16)
    x = torch.randn(2, 3, 16, 16)
    groups = channel_groups(model, x)
    gi = next(i for i, g in enumerate(groups) if g.root == "layer1.0.conv1")
    n0 = _params(model)
    remove_channels(model, groups, {gi: [0, 5, 9]}, x)
    # conv1 loses 3 filters (16*9 each), bn1 3*2, conv2 loses 3 input columns (16*9 each)
    assert n0 - _params(model) == 3 * 16 * 9 + 3 * 2 + 3 * 16 * 9
    groups = channel_groups(model, x)
    remove_channels(model, groups, {i: list(range(0, g.size, 2)) for i, g in enumerate(groups)}, x)
    assert model(x).shape == (2, 10)
    assert model.fc.in_features == 32 and model.layer3[2].conv1.out_channels == 32


def test_zoo_mobilenetv2_removal_runs():
    from leanconv.models import create

    model = create("mobilenetv2", input_size=16)
    x = torch.randn(2, 3, 16, 16)
    groups = channel_groups(model, x)
    n0 = _params(model)
    remove_channels(model, groups, {i: list(range(1, g.size, 4)) for i, g in enumerate(groups)}, x)
    assert model(x).shape == (2, 10)
    assert _params(model) < 0.8 * n0


def test_removal_keeps_modes_and_frozen_flags():
    model = ResToy().train()
    model.conv_a.weight.requires_grad_(False)
    groups = channel_groups(model, X)
    remove_channels(model, groups, {1: [0]}, X)
    assert model.training and model.bn_a.training
    assert not model.conv_a.weight.requires_grad and model.conv_b.weight.requires_grad


@pytest.mark.parametrize(
    "removal, message",
    [({0: list(range(8))}, "keep at least one"), ({0: [8]}, "outside"), ({0: [-1]}, "outside")],
)
def test_bad_removals_raise_before_editing(removal, message):
    model = ResToy()
    groups = channel_groups(model, X)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LeanconvError, match=message):
        remove_channels(model, groups, removal, X)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_grouped_conv_unit_cannot_be_split():
    model = GroupedToy()
    groups = channel_groups(model, X)
    with pytest.raises(LeanconvError, match="whole units"):
        remove_channels(model, groups, {0: [1]}, X)


def test_stale_groups_are_refused():
    model = ResToy()
    groups = channel_groups(model, X)
    remove_channels(model, groups, {0: [0]}, X)
    with pytest.raises(LeanconvError, match="recompute"):
        remove_channels(model, groups, {0: [1]}, X)


def test_implant_after_removal_matches_zeroed_filters():
    model = randomize_bn(ResToy())
    groups = channel_groups(model, X)
    gi = next(i for i, g in enumerate(groups) if g.root == "conv_a")
    reference = randomize_bn(ResToy())
    reference.load_state_dict(model.state_dict())
    silence(reference, groups[gi], [2])
    silence(model, groups[gi], [2])
    with torch.no_grad():  # an implant starts at zero: same as zeroing the implanted filters,
        reference.conv_a.weight[[4, 6]] = 0  # with their BN restarted (mean 0, variance 1, shift >= WAKE)
        reference.bn_a.running_mean[[4, 6]] = 0
        reference.bn_a.running_var[[4, 6]] = 1 - reference.bn_a.eps
        reference.bn_a.bias[[4, 6]] = reference.bn_a.bias[[4, 6]].clamp_min(WAKE)
    remove_channels(model, groups, {gi: [2]}, X)
    assert implant_channels(model, groups[gi], [4, 6], removed=[2]) == ["conv_a"]
    assert isinstance(model.conv_a, ImplantConv2d) and model.conv_a.out_channels == 7
    assert_close(model(X), reference(X))


def test_an_implant_behind_a_negative_shift_and_relu_still_learns():
    """conv -> BN -> ReLU with a negative BN shift: a zero implant would feed the ReLU a
    constant negative value and never get a gradient; the restarted BN lets it learn."""
    model = randomize_bn(ResToy())
    with torch.no_grad():
        model.bn_a.bias[[1, 5]] = -0.5
    groups = channel_groups(model, X)
    gi = next(i for i, g in enumerate(groups) if g.root == "conv_a")
    implant_channels(model, groups[gi], [1, 5])
    assert torch.equal(model.bn_a.running_mean[[1, 5]], torch.zeros(2))
    assert (model.bn_a.bias[[1, 5]] >= WAKE).all()
    model.train()
    nn.functional.cross_entropy(model(X), torch.tensor([0, 1])).backward()
    assert model.conv_a.implant.weight.grad.abs().sum() > 0


def test_implanted_layer_inputs_stay_prunable_and_its_outputs_are_frozen():
    model = randomize_bn(ResToy())
    groups = channel_groups(model, X)
    gi = next(i for i, g in enumerate(groups) if g.root == "conv_a")
    implant_channels(model, groups[gi], [1, 5])
    with torch.no_grad():
        nn.init.normal_(model.conv_a.implant.weight)
    groups = {g.root: g for g in channel_groups(model, X)}
    assert "conv_a" not in groups and "conv_a.conv" not in groups  # implanted outputs are not pruned again
    stem = groups["stem.0"]
    assert {("conv_a.conv", "in"), ("conv_a.implant", "in")} <= {(m.module, m.kind) for m in stem.members}
    silence(model, stem, [0, 3])
    ref = model(X)
    index = list(groups).index("stem.0")
    remove_channels(model, list(groups.values()), {index: [0, 3]}, X)
    assert model.conv_a.in_channels == 6 and model.conv_a.implant.in_channels == 6
    assert_close(model(X), ref)


def test_implants_after_removal_in_both_concat_groups_fold_to_plain_order():
    """Removal in group a shifts group b's channels in the shared BN and the consumer; implants
    made with the pre-removal numbering still fold, and the model computes the same."""
    model = randomize_bn(CatToy())
    groups = channel_groups(model, X)
    silence(model, groups[0], [1])
    silence(model, groups[1], [2])
    remove_channels(model, groups, {0: [1], 1: [2]}, X)
    implant_channels(model, groups[0], [0], removed=[1])
    implant_channels(model, groups[1], [0, 4], removed=[2])
    for layer in (model.a, model.b):
        nn.init.normal_(layer.implant.weight)
    assert model.a.channel_order is not None and model.b.channel_order is not None
    ref = model(X)
    assert fold_channel_orders(model, X) == {}
    assert model.a.channel_order is None and model.b.channel_order is None
    assert (model.bn.num_features, model.c.in_channels) == (8, 8)
    assert_close(model(X), ref)


class _BufferScaled(nn.Module):
    """A per-channel scale held in a buffer between two convs: invisible to the dependency graph."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 4)
        self.register_buffer("scale", torch.linspace(0.5, 2, 8).view(1, 8, 1, 1))

    def forward(self, x):
        return self.fc(torch.relu(self.c2(torch.relu(self.c1(x)) * self.scale)).mean((2, 3)))


def test_a_per_channel_buffer_is_a_clear_error_and_the_model_is_untouched():
    from leanconv.importance import create_criterion
    from leanconv.width import prune_to_budget

    model = _BufferScaled()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LeanconvError, match="no longer runs.*buffer or constant"):
        prune_to_budget(model, create_criterion("l1"), torch.randn(2, 3, 8, 8), target=0.6)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
