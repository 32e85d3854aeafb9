"""Channels renumbered so that a pSConv pattern keeps most of the trained kernels (leanconv.convs.pattern_order)."""

import copy
import itertools
import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.testing import assert_close

from leanconv.cli import main as cli_main
from leanconv.convs.convert import conversion_targets, convert
from leanconv.convs.init_fit import fit_layers
from leanconv.convs.pattern_order import balanced_assignment, kept_share, order_for_pattern
from leanconv.layers.periodic_sparse import pattern_mask
from leanconv.models import build


def _brute_force(cost, capacity):
    labels = [c for c, n in enumerate(capacity) for _ in range(n)]
    return min(sum(cost[i, c] for i, c in enumerate(p)) for p in set(itertools.permutations(labels)))


@pytest.mark.parametrize("capacity", [(2, 2, 2), (1, 2, 3), (0, 4, 3), (3, 1, 1, 2)])
def test_balanced_assignment_is_optimal_and_fills_every_class(capacity):
    rng = np.random.default_rng(sum(capacity) * 31 + len(capacity))
    for _ in range(5):
        cost = rng.normal(size=(sum(capacity), len(capacity)))
        where = balanced_assignment(cost, capacity)
        assert np.bincount(where, minlength=len(capacity)).tolist() == list(capacity)
        assert cost[np.arange(len(where)), where].sum() == pytest.approx(_brute_force(cost, capacity), abs=1e-9)


def test_balanced_assignment_refuses_capacities_that_do_not_add_up():
    with pytest.raises(ValueError, match="capacities"):
        balanced_assignment(np.zeros((4, 2)), (2, 1))


def _random_weights(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1, generator=gen)
                m.running_var.uniform_(0.5, 1.5, generator=gen)
                m.weight.uniform_(0.5, 1.5, generator=gen)
            if isinstance(m, nn.Conv2d):  # taps of unequal size, so the numbering matters
                m.weight.mul_(torch.rand(m.weight.shape, generator=gen) * 3)
    return model.eval()


@pytest.mark.parametrize("name, shape", [("resnet20", (1, 16, 16)), ("vgg16", (3, 32, 32))])
def test_renumbering_keeps_the_function_and_raises_the_kept_energy(name, shape):
    # float64: renumbering changes the order of each conv's sums, which float32 rounds differently per CPU
    model = _random_weights(build(name, in_channels=shape[0], input_size=shape[1], num_classes=10)).double()
    x = torch.randn(6, *shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        before = model(x)
    paths = conversion_targets(model, "psconv")
    report = order_for_pattern(model, x[:2], paths, "psd4_p8")
    with torch.no_grad():
        assert_close(model(x), before, rtol=1e-4, atol=1e-4)
    assert report["renumbered"] > 0 and not report["left"]
    for path in paths:
        entry = report["kept"][path]
        assert entry["after"] == pytest.approx(kept_share(model.get_submodule(path).weight, "psd4_p8"))
    assert report["kept_mean"]["after"] > report["kept_mean"]["before"] + 0.01


def test_a_grouped_conv_whose_groups_would_mix_is_left_with_its_reason():
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(16, 16, 3, padding=1, groups=2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(16, 10))
    net = _random_weights(net)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        before = net(x)
    report = order_for_pattern(net, x, ["2"], "psd4_p8")
    assert any("grouped conv" in why for why in report["left"].values())
    with torch.no_grad():
        assert_close(net(x), before)


def test_a_pattern_kept_whole_by_the_numbering_is_not_moved():
    """Weights already on the pattern keep all their energy: nothing better exists."""
    model = _random_weights(build("resnet20", in_channels=1, input_size=16, num_classes=10))
    paths = conversion_targets(model, "psconv")
    with torch.no_grad():
        for p in paths:
            w = model.get_submodule(p).weight
            w.mul_(pattern_mask(*w.shape[:2], "psd4_p8"))
    report = order_for_pattern(model, torch.randn(2, 1, 16, 16), paths, "psd4_p8")
    assert all(e["after"] == pytest.approx(1.0) for e in report["kept"].values())


@pytest.fixture
def cli(monkeypatch):
    extra = [name for name in ("convert",) if name not in cli_main.SUBCOMMANDS]
    monkeypatch.setattr(cli_main, "SUBCOMMANDS", [*cli_main.SUBCOMMANDS, *extra])
    return cli_main.main


def test_convert_records_the_renumbering_and_refuses_it_where_it_does_not_apply(cli, tmp_path, capsys):
    assert cli(["convert", "resnet20", "--to", "psconv", "--data", "synthetic", "--fit-images", "32",
                "--out", str(tmp_path / "p"), "--json", "--no-progress"]) == 0
    record = json.loads(capsys.readouterr().out)
    order = record["reorder"]
    assert order["renumbered"] > 0 and set(order["kept"]) == set(record["layers"])
    assert all(e["after"] >= e["before"] - 1e-9 for e in order["kept"].values())
    assert cli(["convert", "resnet20", "--to", "psconv", "--data", "synthetic", "--fit-images", "32",
                "--reorder", "none", "--out", str(tmp_path / "n"), "--json", "--no-progress"]) == 0
    assert "reorder" not in json.loads(capsys.readouterr().out)
    for argv in (["--to", "scc", "--groups", "2", "--reorder", "pattern"],
                 ["--to", "psconv", "--init", "random", "--reorder", "pattern"]):
        assert cli(["convert", "resnet20", *argv, "--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--reorder pattern applies to --to psconv" in err[0]
    assert not (tmp_path / "bad").exists()


def test_a_renumbered_fitted_start_explains_the_trained_layers_at_least_as_well():
    """The converted model starts from the renumbered dense model, whose outputs are the original's."""
    x = torch.randn(32, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    paths = conversion_targets(build("resnet20", in_channels=1, input_size=16, num_classes=10), "psconv")
    starts = {}
    for reorder in (False, True):
        dense = _random_weights(build("resnet20", in_channels=1, input_size=16, num_classes=10))
        if reorder:
            order_for_pattern(dense, x[:2], paths, "psd4_p8")
        converted = convert(copy.deepcopy(dense), "psconv")
        fits = fit_layers(dense, converted, paths, x)
        starts[reorder] = np.mean([f["unexplained_start"] for f in fits.values()])
    assert starts[True] < starts[False]


def test_a_renumbering_that_changed_the_output_is_undone(monkeypatch, caplog):
    """Should a renumbering ever change what the model computes, the weights come back as they were."""
    import leanconv.convs.pattern_order as pattern_order

    def broken(model, group, moved_to):
        with torch.no_grad():
            model.get_submodule(group.members[0].module).weight.mul_(2)

    monkeypatch.setattr(pattern_order, "_renumber", broken)
    model = _random_weights(build("resnet20", in_channels=1, input_size=16, num_classes=10))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    paths = conversion_targets(model, "psconv")
    report = pattern_order.order_for_pattern(model, torch.randn(2, 1, 16, 16), paths, "psd4_p8")
    assert report["renumbered"] == 0 and "changed the model's output" in report["left"]["*"]
    assert report["kept_mean"]["after"] == report["kept_mean"]["before"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert "order is kept" in caplog.text
