"""Choosing a MAC or params budget's allocation among candidates by validation loss right
after the cut (``prune_to_budget(candidates=N)``, EagleEye's adaptive-BN evaluation), and
``leanconv prune --candidates N --target-flops R`` end to end."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import leanconv.width.candidates as candidates_module
from leanconv.cli.main import main
from leanconv.cost import count
from leanconv.errors import LeanconvError
from leanconv.importance import ScoringData
from leanconv.models import create
from leanconv.width import iterative_prune, prune_to_budget
from leanconv.width.candidates import SHIFT, adaptive_bn_loss, shifted_scores
from leanconv.width.channels import channel_counts
from prune_toys import l1_scores

SHAPE = (3, 16, 16)
X = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(3))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return create("resnet20", num_classes=4, input_size=16).eval()


def _data(n: int = 2) -> ScoringData:
    gen = torch.Generator().manual_seed(2)
    return ScoringData([(torch.randn(16, *SHAPE, generator=gen), torch.randint(0, 4, (16,), generator=gen))
                        for _ in range(n)])


@pytest.fixture
def judged(monkeypatch):
    """Every model the choice judges: (counted cost, output channels per layer, loss)."""
    seen = []
    original = candidates_module.adaptive_bn_loss

    def spy(model, batches, loss_fn):
        cost, channels = count(model, SHAPE), channel_counts(model)
        loss = original(model, batches, loss_fn)
        seen.append((cost, channels, loss))
        return loss

    monkeypatch.setattr(candidates_module, "adaptive_bn_loss", spy)
    return seen


@pytest.mark.parametrize("kind, options", [
    ("macs", {}), ("params", {}), ("macs", {"round_to": 4}), ("macs", {"latency_aware": True}),
    ("macs", {"implant": 0.3, "implant_init": "fit"}), ("macs", {"implant": 0.3}),
])
def test_the_chosen_allocation_has_the_lowest_loss_and_every_candidate_meets_the_budget(judged, kind, options):
    model, data = _model(), _data()
    before = getattr(count(model, SHAPE), kind)
    result = prune_to_budget(model, l1_scores, X, target=0.5, kind=kind, data=data, candidates=4, seed=0,
                             **options)
    chosen = result.candidates
    assert 2 <= chosen["candidates"] <= 4 and len(chosen["losses"]) == chosen["candidates"] == len(judged)
    losses = chosen["losses"]
    assert losses[chosen["chosen"]] == min(losses) <= losses[0]  # never worse than the plain allocation
    for cost, _, _ in judged:  # every candidate meets the same budget, within 2%
        assert abs(getattr(cost, kind) / before - 0.5) <= 0.02 * 0.5
    allocations = [tuple(sorted(channels.items())) for _, channels, _ in judged]
    assert len(set(allocations)) == len(allocations) or options.get("implant")  # duplicates were dropped
    # the model pruned in place is the chosen candidate: same channels, same loss after adaptive BN
    assert channel_counts(model) == judged[chosen["chosen"]][1]
    assert abs(getattr(count(model, SHAPE), kind) / before - 0.5) <= 0.02 * 0.5
    again = adaptive_bn_loss(copy.deepcopy(model), data.batches, nn.functional.cross_entropy)  # the original
    assert_close(torch.tensor(again), torch.tensor(judged[chosen["chosen"]][2]), rtol=1e-5, atol=1e-6)


def test_a_draw_shifts_each_group_by_a_multiple_of_its_own_spread():
    scores = [torch.tensor([1.0, 2.0, 4.0]), torch.tensor([0.9, 1.0, 1.1, 1.0]) * 1e-3, torch.tensor([5.0])]
    drawn = shifted_scores(scores, torch.Generator().manual_seed(4))
    z = torch.randn(3, generator=torch.Generator().manual_seed(4))
    for s, d, zi in zip(scores, drawn, z):
        spread = float(s.std()) if len(s) > 1 else 0.0
        assert_close(d - s, torch.full_like(s, SHIFT * float(zi) * spread))  # order within a group kept
    assert shifted_scores(scores, torch.Generator().manual_seed(4))[1].tolist() == drawn[1].tolist()


def test_the_plain_allocation_is_candidate_zero():
    data = _data()
    plain, chosen = _model(), _model()
    prune_to_budget(plain, l1_scores, X, target=0.5, data=data)
    result = prune_to_budget(chosen, l1_scores, X, target=0.5, data=data, candidates=3)
    loss = adaptive_bn_loss(copy.deepcopy(plain), data.batches, nn.functional.cross_entropy)
    assert result.candidates["losses"][0] == pytest.approx(loss, abs=2e-6)
    assert (result.candidates["chosen"] == 0) == (channel_counts(chosen) == channel_counts(plain))


def test_the_same_seed_gives_the_same_choice():
    data = _data()
    runs = []
    for _ in range(2):
        model = _model()
        result = prune_to_budget(model, l1_scores, X, target=0.4, data=data, candidates=5, seed=7)
        runs.append((result.candidates["chosen"], result.candidates["candidates"], result.removed,
                     channel_counts(model)))
    assert runs[0] == runs[1]


def test_one_candidate_keeps_todays_allocation():
    data = _data()
    plain, one = _model(), _model()
    prune_to_budget(plain, l1_scores, X, target=0.5)
    result = prune_to_budget(one, l1_scores, X, target=0.5, data=data, candidates=1, seed=3)
    assert result.candidates is None and channel_counts(one) == channel_counts(plain)


@pytest.mark.parametrize("options, match", [
    ({"candidates": 3}, "choosing among candidates measures each on validation batches"),
    ({"candidates": 3, "data": ScoringData([])}, "choosing among candidates measures each on validation batches"),
    ({"candidates": 0, "data": _data(1)}, "candidates must be a whole number from 1 to 1000"),
    ({"candidates": 2.5, "data": _data(1)}, "candidates must be a whole number"),
    ({"candidates": 2, "seed": -1, "data": _data(1)}, "seed must be a whole number"),
])
def test_bad_candidate_options_are_one_line_and_leave_the_model(options, match):
    model = _model()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(LeanconvError, match=match) as info:
        prune_to_budget(model, l1_scores, X, target=0.5, **options)
    assert "\n" not in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(LeanconvError, match=match):
        iterative_prune(_model(), l1_scores, X, None, target=0.5, steps=2, **options)


def test_iterative_prune_chooses_in_every_round():
    model = _model()
    results = iterative_prune(model, l1_scores, X, None, target=0.4, steps=2, data=_data(), candidates=3)
    assert len(results) == 2 and all(r.candidates["candidates"] >= 2 for r in results)
    assert abs(count(model, SHAPE).macs / results[0].macs_before - 0.4) <= 0.02 * 0.4 * 2


# ---------------------------------------------------------------- the command line, end to end


def test_prune_candidates_target_flops_records_the_choice(trained_ckpt, tmp_path, capsys):
    out = tmp_path / "c3"
    code = main(["prune", str(trained_ckpt), "--method", "l1", "--target-flops", "0.5", "--candidates", "3",
                 "--score-images", "32", "--finetune-epochs", "0", "--repeats", "1", "--out", str(out),
                 "--reconstruct-images", "32", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    record = json.loads((out / "record.json").read_text())
    chosen = record["rounds"][0]["candidates"]
    assert record["config"]["candidates"] == 3 and "--candidates 3" in record["command"]
    assert 2 <= chosen["candidates"] <= 3 and len(chosen["losses"]) == chosen["candidates"]
    assert chosen["losses"][chosen["chosen"]] == min(chosen["losses"]) <= chosen["losses"][0]
    assert abs(record["achieved"]["macs"] - 0.5) <= 0.02 * 0.5


def test_prune_target_flops_judges_one_allocation_by_default(trained_ckpt, tmp_path, capsys):
    out = tmp_path / "c1"
    assert main(["prune", str(trained_ckpt), "--method", "l1", "--target-flops", "0.5", "--score-images", "32",
                 "--finetune-epochs", "0", "--repeats", "1", "--reconstruct-images", "32", "--out", str(out),
                 "--no-progress"]) == 0
    record = json.loads((out / "record.json").read_text())
    assert record["config"]["candidates"] is None and record["rounds"][0]["candidates"] is None
    assert "--candidates" not in record["command"]
