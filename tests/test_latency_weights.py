"""Latency-aware ranking: the weights' arithmetic, a real measurement, and its effect on a cut."""

import math

import pytest
import torch
from torch import nn

from leanconv.cost import count
from leanconv.importance import create_criterion
from leanconv.width import latency_weights as lw
from leanconv.width import prune_to_budget
from leanconv.graph.groups import trace_groups


class TwoStage(nn.Module):
    """A narrow conv pair at 16x16, then a wide pair at 4x4: about the same MACs per stage."""

    def __init__(self):
        super().__init__()
        self.a1, self.a2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.down = nn.Conv2d(8, 32, 3, stride=4, padding=1)
        self.b1, self.b2 = nn.Conv2d(32, 32, 3, padding=1), nn.Conv2d(32, 32, 3, padding=1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.a2(torch.relu(self.a1(x)))
        x = self.b2(torch.relu(self.b1(torch.relu(self.down(x)))))
        return self.fc(x.mean((2, 3)))


def _activation_timer(module, shape):
    """Time = input elements: a purely memory-bound machine (batch included)."""
    return float(math.prod(shape)) * 1e-6


def _groups(model):
    x = torch.randn(1, 3, 16, 16)
    return x, trace_groups(model, x)


def test_weights_follow_time_per_mac():
    torch.manual_seed(0)
    model = TwoStage()
    x, traced = _groups(model)
    weights = lw.latency_weights(model, traced, x, (3, 16, 16), batch_size=4, timer=_activation_timer)
    by_root = dict(zip([t.group.root for t in traced], weights))
    # a1's channels feed a2 at 16x16 (many input elements per MAC); b1's feed b2 at 4x4
    assert by_root["a1"] > 1 > by_root["b1"]
    # the arithmetic, by hand, for group a1 (out of a1, in of a2): ms saved / MACs saved, over the net's rate
    macs = {r.name: r.macs for r in count(model, (3, 16, 16)).layers}
    timed = {"a1": 3 * 16 * 16, "a2": 8 * 16 * 16, "down": 8 * 16 * 16, "b1": 32 * 16, "b2": 32 * 16,
             "fc": 32}
    rate = sum(t * 1e-6 for t in timed.values()) / sum(macs[n] for n in timed)
    expected = (timed["a1"] / 8 + timed["a2"] / 8) * 1e-6 / ((macs["a1"] + macs["a2"]) / 8) / rate
    assert by_root["a1"] == pytest.approx(min(lw.MAX_WEIGHT, expected), rel=1e-6)
    assert all(1 / lw.MAX_WEIGHT <= w <= lw.MAX_WEIGHT for w in weights)


def test_measured_weights_are_finite_and_one_per_group():
    torch.manual_seed(0)
    model = TwoStage()
    x, traced = _groups(model)
    weights = lw.latency_weights(model, traced, x, (3, 16, 16), batch_size=2, repeats=2)
    assert len(weights) == len(traced) and all(math.isfinite(w) and w > 0 for w in weights)
    assert lw.time_layer(model.a1, (2, 3, 16, 16), repeats=2) >= 0


def test_latency_aware_cut_moves_to_the_slow_stage(monkeypatch):
    monkeypatch.setattr(lw, "time_layer", lambda module, shape, repeats=5: _activation_timer(module, shape))
    kept = {}
    for aware in (False, True):
        torch.manual_seed(0)
        model = TwoStage()
        prune_to_budget(model, create_criterion("l1"), torch.randn(1, 3, 16, 16), target=0.6, latency_aware=aware)
        kept[aware] = (model.a1.out_channels + model.a2.out_channels, model.b1.out_channels + model.b2.out_channels)
        assert count(model, (3, 16, 16)).macs <= 0.6 * 1.02 * count(TwoStage(), (3, 16, 16)).macs
    assert kept[True][0] < kept[False][0]  # the slow high-resolution stage loses more channels
    assert kept[True][1] > kept[False][1]
