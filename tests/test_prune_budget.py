"""Budgeted pruning: lands within 2% of the target, respects floor and round_to, fails early."""

import copy
import logging

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from leanconv.cost import count
from leanconv.errors import LeanconvError
from leanconv.layers.implant import ImplantConv2d
from leanconv.models import create
from leanconv.graph import channel_groups
from leanconv.width import iterative_prune, prune_to_budget
from leanconv.width.channels import WAKE
from leanconv.width.cost_model import CostModel
from leanconv.graph.groups import trace_groups
from prune_toys import ResToy, l1_scores, randomize_bn, silence


X16 = torch.randn(2, 3, 16, 16)


def _resnet20():
    torch.manual_seed(0)
    return create("resnet20", input_size=16)


@pytest.mark.parametrize("kind, target", [("macs", 0.5), ("macs", 0.3), ("macs", 0.7), ("params", 0.5),
                                          ("params", 0.25)])
def test_budget_lands_within_two_percent(kind, target):
    model = _resnet20()
    before = count(model, (3, 16, 16))
    result = prune_to_budget(model, l1_scores, X16, target=target, kind=kind)
    after = count(model, (3, 16, 16))
    goal = target * getattr(before, kind)
    assert abs(getattr(after, kind) - goal) <= 0.02 * goal
    assert result.achieved == pytest.approx(getattr(after, kind) / getattr(before, kind))
    assert (result.macs_after, result.params_after) == (after.macs, after.params)
    assert model(X16).shape == (2, 10)


def test_resnet20_half_macs_at_cifar_resolution():
    model = create("resnet20")
    x = torch.randn(1, 3, 32, 32)
    result = prune_to_budget(model, l1_scores, x, target=0.5)
    assert abs(count(model, (3, 32, 32)).macs / result.macs_before - 0.5) <= 0.01
    assert result.layers["layer1.0.conv1"][0] == 16 and result.layers["fc"] == (10, 10)
    assert sum(len(v) for v in result.removed.values()) > 0


def test_mobilenetv2_prunes_to_budget():
    model = create("mobilenetv2", input_size=16)
    result = prune_to_budget(model, l1_scores, X16, target=0.6, round_to=8)
    assert abs(result.achieved - 0.6) <= 0.012
    assert model(X16).shape == (2, 10)


def test_round_to_keeps_multiples():
    model = create("vgg16", input_size=16)
    before = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    result = prune_to_budget(model, l1_scores, X16, target=0.4, round_to=8)
    assert abs(result.achieved - 0.4) <= 0.008
    for name, c in before.items():
        after = model.get_submodule(name).out_channels
        assert after == c or (after % 8 == 0 and after >= 8), (name, after)
    assert any(model.get_submodule(n).out_channels < c for n, c in before.items())


def test_floor_survives_a_layer_with_the_lowest_scores():
    model = _resnet20()
    groups = channel_groups(model, X16)
    scores = l1_scores(model, groups)
    victim = next(i for i, g in enumerate(groups) if g.root == "layer3.0.conv1")
    scores[victim] = torch.full((groups[victim].size,), 1e-9)  # every channel the least important
    prune_to_budget(model, scores, X16, target=0.5, floor=0.25, normalize="none")
    assert model.layer3[0].conv1.out_channels == 16  # 25% of 64, not 0
    model = _resnet20()
    prune_to_budget(model, scores, X16, target=0.5, normalize="none")
    assert model.layer3[0].conv1.out_channels >= 1


@pytest.mark.parametrize("target", [0.0, 1.0, 1.5, -0.2])
def test_target_must_be_a_fraction(target):
    with pytest.raises(LeanconvError, match="target must lie strictly between 0 and 1"):
        prune_to_budget(ResToy(), l1_scores, torch.randn(1, 3, 8, 8), target=target)


def test_impossible_target_raises_before_scoring_or_editing():
    model = _resnet20()
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def never(*args):
        raise AssertionError("the criterion must not run for an impossible target")

    with pytest.raises(LeanconvError, match="smallest model keeps 0.0"):
        prune_to_budget(model, never, X16, target=0.01, floor=4)
    with pytest.raises(LeanconvError, match="unreachable"):
        prune_to_budget(model, never, X16, target=0.2, floor=0.5)  # floor alone keeps ~0.25
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_cost_model_matches_the_counter():
    for model in (_resnet20(), create("mobilenetv2", input_size=16)):
        traced = trace_groups(model, X16)
        costs = CostModel(model, traced, (3, 16, 16))
        assert (costs.base.params, costs.base.macs) == (count(model, (3, 16, 16)).params,
                                                         count(model, (3, 16, 16)).macs)
        removed = [list(range(0, t.group.size, 3)) for t in traced]
        estimate = costs.estimate(removed, {})
        from leanconv.width import remove_channels

        remove_channels(model, [t.group for t in traced], dict(enumerate(removed)), X16)
        real = count(model, (3, 16, 16))
        assert (estimate.params, estimate.macs) == (real.params, real.macs)


def test_search_falls_back_to_counting_when_the_estimate_is_off(monkeypatch, caplog):
    original = CostModel.estimate

    def skewed(self, removed, implanted):
        c = original(self, removed, implanted)
        return type(c)(int(c.params * 1.1), int(c.macs * 1.1))

    monkeypatch.setattr(CostModel, "estimate", skewed)
    model = _resnet20()
    with caplog.at_level(logging.WARNING, logger="leanconv.width.budget"):
        result = prune_to_budget(model, l1_scores, X16, target=0.5)
    assert "searching on counted models" in caplog.text
    assert abs(result.achieved - 0.5) <= 0.01


def test_implant_keeps_channels_as_cheap_1x1_filters(caplog):
    model = _resnet20()
    with caplog.at_level(logging.WARNING, logger="leanconv.width.budget"):
        result = prune_to_budget(model, l1_scores, X16, target=0.5, implant=0.2)
    assert "cost model missed" not in caplog.text
    assert abs(result.achieved - 0.5) <= 0.01
    implants = {n: m for n, m in model.named_modules() if isinstance(m, ImplantConv2d)}
    assert implants and result.implanted
    n_implanted = sum(m.implant.out_channels for m in implants.values())
    assert n_implanted >= sum(len(v) for v in result.implanted.values())
    for name, m in implants.items():
        assert torch.count_nonzero(m.implant.weight) == 0
        assert result.layers[name][1] == m.out_channels
    assert model(X16).shape == (2, 10)


def test_implanted_model_equals_silenced_and_zeroed_original():
    """Before fine-tuning, the pruned + implanted model computes what the original computes
    when the removed channels are silenced, the implanted kxk filters are zeroed and their
    BatchNorm entries restarted (mean 0, variance 1, shift >= WAKE)."""
    model = randomize_bn(_resnet20())
    reference = copy.deepcopy(model)
    result = prune_to_budget(model, l1_scores, X16, target=0.6, implant=0.3)
    assert result.implanted
    groups = {g.root: g for g in channel_groups(reference, X16)}
    for root, channels in result.removed.items():
        silence(reference, groups[root], channels)
    with torch.no_grad():
        for root, channels in result.implanted.items():
            for m in groups[root].out_members():
                conv = reference.get_submodule(m.module)
                idx = [m.idxs[k] for k in channels]
                if isinstance(conv, nn.Conv2d) and conv.kernel_size != (1, 1):
                    conv.weight[idx] = 0
                elif isinstance(conv, nn.BatchNorm2d):
                    conv.running_mean[idx], conv.running_var[idx] = 0.0, 1.0 - conv.eps
                    conv.bias[idx] = conv.bias[idx].clamp_min(WAKE)
    assert_close(model(X16), reference(X16))


def test_progress_and_precomputed_scores():
    model = _resnet20()
    scores = l1_scores(model, channel_groups(model, X16))
    calls = []
    prune_to_budget(model, scores, X16, target=0.6, progress=lambda d, t, info: calls.append((d, t, info["stage"])))
    assert calls[0] == (1, 4, "groups") and calls[-1] == (4, 4, "prune")


def test_iterative_schedule_reaches_the_final_target():
    model = _resnet20()
    base = count(model, (3, 16, 16)).macs
    rounds = []
    results = iterative_prune(model, l1_scores, X16, lambda m, s: rounds.append(s), target=0.4, steps=2,
                              implant=0.1)
    assert rounds == [1, 2] and len(results) == 2
    assert abs(count(model, (3, 16, 16)).macs / base - 0.4) <= 0.4 * 0.02
    assert not results[0].implanted and results[1].implanted


def test_pruned_and_implanted_model_round_trips_through_a_checkpoint(tmp_path):
    from leanconv import checkpoint

    model = _resnet20().eval()
    prune_to_budget(model, l1_scores, X16, target=0.5, implant=0.2, round_to=4)
    for m in model.modules():
        if isinstance(m, ImplantConv2d):
            nn.init.normal_(m.implant.weight)
    checkpoint.save(model, tmp_path / "pruned.safetensors")
    loaded = checkpoint.load(tmp_path / "pruned.safetensors").eval()
    assert_close(loaded(X16), model(X16), rtol=0, atol=0)


def test_an_implanted_model_can_be_pruned_again():
    model = _resnet20()
    prune_to_budget(model, l1_scores, X16, target=0.6, implant=0.1)
    first = count(model, (3, 16, 16)).macs
    result = prune_to_budget(model, l1_scores, X16, target=0.9)
    assert result.macs_before == first
    assert abs(result.achieved - 0.9) <= 0.9 * 0.02
    assert model(X16).shape == (2, 10)


def test_given_scores_must_fit_the_groups():
    model = ResToy()
    with pytest.raises(LeanconvError, match="do not fit"):
        prune_to_budget(model, [torch.ones(3)], torch.randn(1, 3, 8, 8), target=0.5)
    with pytest.raises(LeanconvError, match="not in the model"):
        prune_to_budget(model, l1_scores, torch.randn(1, 3, 8, 8), target=0.5, ignored=["nope"])


@pytest.mark.parametrize("options,match", [
    ({"target": "0.5"}, "target must be a finite number"),
    ({"target": 0.5, "floor": float("inf")}, "floor must be a finite number"),
    ({"target": 0.5, "round_to": float("nan")}, "round_to must be a finite number"),
])
def test_nonsense_options_are_clear_errors(options, match):
    from leanconv.importance import create_criterion
    from leanconv.models import create
    from leanconv.width import prune_to_budget

    with pytest.raises(LeanconvError, match=match):
        prune_to_budget(create("resnet20", num_classes=4, input_size=16), create_criterion("l1"),
                        torch.randn(1, 3, 16, 16), **options)


def test_nonsense_sizes_and_criterion_options_are_clear_errors():
    from leanconv.cost import count, measure_latency
    from leanconv.importance import create_criterion
    from leanconv.models import create

    model = create("resnet20", num_classes=4, input_size=16)
    for shape in ((3, 16.5, 16), (3.7, 16, 16)):
        with pytest.raises(LeanconvError, match="sequence of integers"):
            count(model, shape)
    with pytest.raises(LeanconvError, match="batch size"):
        measure_latency(model, (3, 16, 16), 2.5)
    with pytest.raises(LeanconvError, match="cannot create criterion 'l1'"):
        create_criterion("l1", foo=1)
