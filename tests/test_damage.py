"""Measured damage of each cut (leanconv.width.damage): the frontier shortcut gives the numbers
the whole model gives, the counts measured are capped and the rest interpolated, and models
torch.fx cannot follow are evaluated whole."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn

from leanconv.errors import LeanconvError
from leanconv.importance import ScoringData, create_criterion
from leanconv.width import damage as damage_module
from leanconv.width.candidates import adaptive_bn_loss
from leanconv.width.damage import interpolated, measured_damage, priced_counts
from leanconv.width.latency_budget import _prepare
from leanconv.width.planner import Planner, apply_plan, checked_scores, normalized

SHAPE = (3, 12, 12)


class Net(nn.Module):
    """Stem, a residual block and a plain conv: a residual group and two inner groups."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16))
        self.c = nn.Sequential(nn.Conv2d(16, 24, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(24), nn.ReLU())
        self.head = nn.Linear(24, 4)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.b(self.a(x)))
        return self.head(self.c(x).mean((2, 3)))


class Branchy(Net):
    """Control flow on the input's values: torch.fx cannot trace it."""

    def forward(self, x):
        if float(x.detach().sum()) > 1e9:
            x = x * 0
        return super().forward(x)


class InPlace(Net):
    """Adds in place to a value the cuts of ``a`` start from: the frontier must not change."""

    def forward(self, x):
        x = self.stem(x)
        x.add_(self.b(self.a(x)))
        return self.head(self.c(torch.relu(x)).mean((2, 3)))


class StdConv(nn.Conv2d):
    """A conv subclass with its own forward (weight standardisation): torch.fx traces through it,
    so the graph never calls it as a layer."""

    def forward(self, x):
        w = self.weight - self.weight.mean((1, 2, 3), keepdim=True)
        return nn.functional.conv2d(x, w, self.bias, self.stride, self.padding)


class Standardised(Net):
    def __init__(self) -> None:
        super().__init__()
        self.a[0] = StdConv(16, 16, 3, padding=1, bias=False)


class Constant(Net):
    """A tensor made in forward: tracing stores it on the traced copy, not on the cut model."""

    def forward(self, x):
        return super().forward(x) * torch.tensor([1.0, 2.0, 3.0, 4.0])


class Defaulted(Net):
    """An input with a default value."""

    def forward(self, x, scale: float = 2.0):
        return super().forward(x * scale)


class SharedNorm(Net):
    """One BatchNorm called before the cut of ``a`` and after it: its statistics see both."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(16)

    def forward(self, x):
        x = self.norm(self.stem(x))
        x = torch.relu(self.norm(x + self.b(self.a(x))))
        return self.head(self.c(x).mean((2, 3)))


class TrainingBranch(Net):
    """A branch on ``self.training`` that tracing fixes at its mode then (eval): the traced
    graph's loss differs from the model's, so it must not be used."""

    def forward(self, x):
        x = self.stem(x)
        if self.training:
            x = x * 1.5
        x = torch.relu(x + self.b(self.a(x)))
        return self.head(self.c(x).mean((2, 3)))


def _setup(model: nn.Module):
    torch.manual_seed(0)
    model.eval()
    gen = torch.Generator().manual_seed(3)
    data = ScoringData([(torch.randn(6, *SHAPE, generator=gen), torch.randint(0, 4, (6,), generator=gen))
                        for _ in range(3)])
    traced, _, solver = _prepare(model, torch.zeros(1, *SHAPE), SHAPE, None, 1, 4, (), True)
    planner = Planner(model, traced, floor=1, round_to=None, implant=0.0)
    planner.rank(normalized(checked_scores(create_criterion("l1"), model, [t.group for t in traced], data), "mean"))
    return traced, planner, solver.options, data


def _damage(model, counts=None, whole=False, monkeypatch=None):
    traced, planner, options, data = _setup(model)
    calls = []
    with monkeypatch.context() if whole else contextlib.nullcontext() as patch:
        if whole:  # every cut on the whole model, as before the frontier
            patch.setattr(damage_module._Graph, "trace", classmethod(lambda cls, *args: None))
        out = measured_damage(model, traced, planner, options, torch.zeros(1, *SHAPE), data,
                              progress=lambda done, total: calls.append((done, total)), counts=counts)
    return out, options, calls


def _fast_and_whole(cls, monkeypatch):
    """The damage of a fresh ``cls()`` priced with the frontier and on the whole model."""
    torch.manual_seed(1)
    fast, options, _ = _damage(cls())
    torch.manual_seed(1)
    slow, _, _ = _damage(cls(), whole=True, monkeypatch=monkeypatch)
    return fast, slow, options


def _graph(model: nn.Module, data):
    batches = list(data.batches)
    base = adaptive_bn_loss(copy.deepcopy(model), batches, data.loss_fn)
    return damage_module._Graph.trace(model, batches, data.loss_fn, base)


def _close(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    keys = sorted(a)
    torch.testing.assert_close(torch.tensor([a[k] for k in keys]), torch.tensor([b[k] for k in keys]),
                               rtol=1e-5, atol=1e-6)


def test_the_frontier_gives_the_whole_models_damage(monkeypatch):
    fast, slow, options = _fast_and_whole(Net, monkeypatch)
    assert len(options) == 3 and set(fast) == {(g, k) for g, opts in enumerate(options) for k in opts[1:]}
    _close(fast, slow)
    assert any(abs(v) > 1e-3 for v in fast.values())  # the cuts do change the loss


@pytest.mark.parametrize("cls", [InPlace, Standardised, Constant, Defaulted, SharedNorm])
def test_models_torch_fx_follows_partly_give_the_whole_models_damage(cls, monkeypatch):
    """An in-place op after the cut (each cut gets its own copy of the frontier), a layer fx
    traces through and a BatchNorm shared across the cut (those groups run whole), a constant
    made in forward and an input's default value (the graph runs them)."""
    fast, slow, _ = _fast_and_whole(cls, monkeypatch)
    _close(fast, slow)


def test_starting_after_the_first_cut_layer(monkeypatch):
    """The group of ``c`` starts deep in the graph: its frontier is the block's output."""
    torch.manual_seed(1)
    model = Net()
    traced, _, _, data = _setup(model)
    batches = list(data.batches)
    graph = _graph(model, data) or pytest.fail("no graph")
    deep = next(t for t in traced if t.group.root == "c.0")
    frontier = graph.frontier(damage_module._members(deep))
    assert [n.name for n in frontier.read] == ["relu"]  # the residual block's output only
    assert len(frontier.values[True]) == len(frontier.values[False]) == len(batches)


@pytest.mark.parametrize("cls", [Branchy, TrainingBranch])
def test_a_model_fx_cannot_follow_is_evaluated_whole(cls, monkeypatch):
    torch.manual_seed(1)
    model = cls()
    assert _graph(model, _setup(model)[3]) is None
    fast, slow, _ = _fast_and_whole(cls, monkeypatch)
    _close(fast, slow)


def test_a_frontier_over_the_memory_cap_is_evaluated_whole(monkeypatch):
    torch.manual_seed(1)
    slow, _, _ = _damage(Net(), whole=True, monkeypatch=monkeypatch)
    monkeypatch.setattr(damage_module, "FRONTIER_BYTES", 0)
    torch.manual_seed(1)
    model = Net()
    traced, _, _, data = _setup(model)
    graph = _graph(model, data) or pytest.fail("no graph")
    assert all(graph.frontier(damage_module._members(t)) is None for t in traced)
    torch.manual_seed(1)
    capped, _, _ = _damage(Net())
    _close(capped, slow)


def test_counts_caps_the_cuts_measured_and_interpolates_the_rest():
    torch.manual_seed(1)
    full, options, calls_full = _damage(Net())
    torch.manual_seed(1)
    few, _, calls = _damage(Net(), counts=2)
    assert calls_full[-1][1] == sum(len(o) - 1 for o in options)
    assert calls[-1][1] == sum(min(2, len(o) - 1) for o in options) < calls_full[-1][1]
    for g, opts in enumerate(options):
        measured = priced_counts(opts, 2)
        expected = interpolated(opts, {k: full[(g, k)] for k in measured})  # measured ones as they are
        for k in opts[1:]:
            assert few[(g, k)] == pytest.approx(expected[k], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("options, counts, expected", [
    ([64, 56, 48, 40, 32, 24, 16, 8, 6, 4, 2], 6, [56, 40, 24, 16, 6, 2]),
    ([64, 56, 48, 40, 32, 24, 16, 8, 6, 4, 2], 2, [56, 2]),
    ([64, 56, 48, 40, 32, 24, 16, 8, 6, 4, 2], 1, [2]),
    ([16, 8, 4], 6, [8, 4]),
    ([16, 8, 4], None, [8, 4]),
    ([16], 3, []),
    ([16, 8], 1, [8]),
])
def test_priced_counts_spread_over_the_staircase_with_both_ends(options, counts, expected):
    assert priced_counts(options, counts) == expected


@pytest.mark.parametrize("counts", [0, -1, 2.5, True])
def test_a_bad_count_of_cuts_is_refused(counts):
    with pytest.raises(LeanconvError, match="counts must be a whole number >= 1"):
        priced_counts([16, 8, 4], counts)


def test_interpolated_is_linear_between_measured_counts_and_zero_at_full_width():
    out = interpolated([64, 48, 32, 16, 8], {32: 1.0, 8: 3.0})
    assert out == pytest.approx({48: 0.5, 32: 1.0, 16: 1.0 + 2.0 * 16 / 24, 8: 3.0})


@pytest.mark.parametrize("cls, shortcut", [(Net, True), (Constant, True), (Defaulted, True), (InPlace, True),
                                           (Standardised, False), (SharedNorm, False)])
def test_which_groups_take_the_frontier(cls, shortcut):
    torch.manual_seed(1)
    model = cls()
    traced, planner, _, data = _setup(model)
    graph = _graph(model, data) or pytest.fail("no graph")
    inner = next(t for t in traced if t.group.root == "a.0")
    frontier = graph.frontier(damage_module._members(inner))
    assert (frontier is not None) == shortcut
    if frontier is not None:  # and the cut model runs from it
        trial = copy.deepcopy(model)
        drop = [0] * len(traced)
        drop[traced.index(inner)] = 1
        apply_plan(trial, traced, planner.plan(drop), torch.zeros(1, *SHAPE))
        assert frontier.loss(trial) == pytest.approx(adaptive_bn_loss(trial, list(data.batches), data.loss_fn),
                                                     rel=1e-5, abs=1e-6)
