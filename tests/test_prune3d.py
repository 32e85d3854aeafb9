"""Three-dimensional pruning: realising (d, w, r), the calibrated cost, and ``leanconv prune3d`` end to end."""

import json

import numpy as np
import pytest
import torch
from torch import nn

import leanconv.cli.main as cli_main
from leanconv import checkpoint
from leanconv.cost import count
from leanconv.errors import LeanconvError
from leanconv.prune3d.optimum import CalibratedCost, discrete_ratios, resolve
from leanconv.prune3d.predictor import FullPolynomial
from leanconv.prune3d.realise import Origin, StepSettings, load_origin, realise
from leanconv.prune3d.search import fill_budget, sampling_floors
from leanconv.runs.prune3d import Prune3dConfig


@pytest.fixture(scope="module")
def origin(trained_ckpt):
    return load_origin(str(trained_ckpt), StepSettings(data="synthetic", method="l1", epochs=0, score_images=64))


def _main(argv):
    """``leanconv`` with the prune3d subcommand, whether or not main.py lists it yet."""
    if "prune3d" not in cli_main.SUBCOMMANDS:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(cli_main, "SUBCOMMANDS", [*cli_main.SUBCOMMANDS, "prune3d"])
            return cli_main.main(argv)
    return cli_main.main(argv)


def _logits(model, shape):
    torch.manual_seed(0)
    with torch.no_grad():
        return model.eval()(torch.randn(4, *shape))


def test_realise_applies_depth_then_width_then_resolution(origin):
    model, point = realise(origin, 4 / 7, 0.6, 0.75)
    identities = [b.path for b in origin.blocks if isinstance(model.get_submodule(b.path), nn.Identity)]
    assert point.keep == 4 and len(identities) == 3 and point.d == pytest.approx(4 / 7)
    assert point.side == 12 and model.leanconv_meta["input_shape"] == [3, 12, 12]
    assert abs(point.w - 0.6) <= 0.6 * 0.02  # w^2 of the post-depth MACs, within prune_to_budget's 2%
    assert point.macs == count(model, (3, 12, 12)).macs < 0.25 * origin.macs
    assert count(origin.model, origin.shape).macs == origin.macs  # the trained model is untouched


def test_a_width_step_refits_the_layers_after_the_cut(origin):
    """With reconstruct_images the width step's cut is the same, the stem (no input lost) is
    untouched and the layers that lost input channels are refitted, at the point's side too."""
    from dataclasses import replace

    refitting = Origin(**{**origin.__dict__, "settings": replace(origin.settings, reconstruct_images=64),
                          "_batches": {}})
    for d, w, r in ((1.0, 0.6, 1.0), (4 / 7, 0.7, 0.75)):
        plain, _ = realise(origin, d, w, r)
        fitted, point = realise(refitting, d, w, r)
        shapes = {n: p.shape for n, p in plain.named_parameters()}
        assert {n: p.shape for n, p in fitted.named_parameters()} == shapes and point.side == round(16 * r)
        changed = {n for n, p in fitted.named_parameters() if not torch.equal(p, plain.get_parameter(n))}
        assert changed and all(n.endswith(("weight", "bias")) for n in changed)
        stem = next(n for n, m in plain.named_modules() if isinstance(m, nn.Conv2d))
        assert f"{stem}.weight" not in changed


class _Linear:
    def __init__(self, slope):
        self.slope = slope

    def predict(self, X):
        return self.slope * X[:, 1]


def test_fill_spends_the_unused_budget_on_width(origin):
    model, point = realise(origin, 1.0, 0.6, 1.0)
    budget = 1.15 * point.macs
    built = {"model": model, "point": point}
    fill = fill_budget(origin, _Linear(1.0), built, budget, 1.0, 0.6, 1.0)
    assert fill is not None and fill["w_filled"] > 0.6
    assert point.macs < built["point"].macs == fill["macs_after"] <= budget
    assert built["point"].macs == count(built["model"], origin.shape).macs
    # a predictor that prefers narrower models, or a choice already at the budget: nothing changes
    built = {"model": model, "point": point}
    assert fill_budget(origin, _Linear(-1.0), built, budget, 1.0, 0.6, 1.0) is None and built["point"] is point
    assert fill_budget(origin, _Linear(1.0), built, point.macs * 1.005, 1.0, 0.6, 1.0) is None


def test_calibrated_cost_tracks_counted_macs_and_resolve_meets_budget(origin):
    design = [(1, 1, 1), (3 / 7, 1, 1), (1, 0.5, 1), (1, 1, 0.5), (5 / 7, 0.7, 0.75), (4 / 7, 0.8, 0.625)]
    counted = [realise(origin, *p)[1] for p in design]
    points = [(p.d, p.w, p.r) for p in counted]
    cost = CalibratedCost.fit(points, [p.macs for p in counted])
    assert cost.max_rel_error < 0.10
    _, unseen = realise(origin, 6 / 7, 0.6, 0.875)
    assert abs(cost(unseen.d, unseen.w, unseen.r) / unseen.macs - 1) < 0.10
    # a monotone stand-in predictor; resolve realises, counts and re-solves until within budget
    X = np.random.default_rng(0).uniform(0.3, 1, (20, 3))
    predictor = FullPolynomial(1).fit(X, X.sum(1))
    budget = 0.3 * origin.macs
    realised = {}

    def realise_fn(d, w, r):
        realised["point"] = realise(origin, d, w, r)[1]
        return realised["point"].macs

    result = resolve(predictor, cost, budget, realise_fn, bounds=((3 / 7, 1), (0.4, 1), (0.5, 1)),
                     allowed_d=discrete_ratios(7, 3), allowed_r=discrete_ratios(16, 8), grid=31)
    assert result.counted_macs == realised["point"].macs <= budget
    assert abs(result.choice.predicted_macs / result.counted_macs - 1) < 0.15


def test_prune3d_cli_end_to_end(trained_ckpt, tmp_path, capsys):
    out = tmp_path / "p3d"
    code = _main(["prune3d", str(trained_ckpt), "--target-flops", "0.4", "--samples", "8", "--workers", "0",
                  "--sample-images", "128", "--finetune-epochs", "1", "--score-images", "64", "--probes", "8",
                  "--repeats", "2", "--reconstruct-images", "32", "--out", str(out), "--no-progress"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    record = json.loads((out / "record.json").read_text())
    base = checkpoint.load(trained_ckpt)
    macs0 = count(base, (3, 16, 16)).macs
    pruned = checkpoint.load(out / "model.safetensors")
    side = record["choice"]["realised"]["side"]
    shape = (3, side, side)
    assert tuple(pruned.leanconv_meta["input_shape"]) == shape
    macs = count(pruned, shape).macs
    assert macs <= 0.4 * macs0 and macs == record["after"]["macs"] == record["choice"]["counted_macs"]
    assert summary["macs"] == [macs0, macs] and record["choice"]["within_budget"]
    torch.testing.assert_close(_logits(checkpoint.load(out / "model.safetensors"), shape), _logits(pruned, shape),
                               rtol=0, atol=0)
    samples = [json.loads(l) for l in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == len(record["samples"]) == 8
    assert {s["kind"] for s in samples} >= {"base", "depth", "width", "resolution"}
    box = record["search_box"]  # clipped by default: no width sample far below sqrt(target)
    assert box["w_sampled_min"] == pytest.approx(0.9 * 0.4 ** 0.5, abs=1e-4) and box["w_sampled_min"] > box["w_min"]
    assert min(s["w"] for s in samples) >= box["w_sampled_min"] - 0.03
    assert all(s["accuracy"] == pytest.approx(s["accuracy"]) for s in samples)
    holdout = record["holdout"]
    assert holdout["n_train"] == 6 and holdout["full_rmse"] >= 0 and holdout["lowrank_rmse"] >= 0
    assert len(record["predictor"]["table"]) == 12 and record["predictor"]["cv_rmse"] >= 0
    assert record["cost_model"]["calibrated"]["max_rel_error"] < 0.2
    assert {"predicted_val", "measured_val_protocol", "test_after"} <= set(record["accuracy"])
    assert record["resolve_trail"][-1]["within_budget"] and record["budget_curve"]
    assert record["fill"] is None or record["fill"]["macs_after"] == macs
    assert record["after"]["latency_ms"]["batch64"]["median_ms"] > 0
    for name in ("surface.png", "budget.png"):
        assert (out / name).stat().st_size > 5000


def test_sampling_floors_clip_to_the_budget_inside_the_box():
    box = {"w_min": 0.4, "side_min": 14}
    assert sampling_floors(box, 28, 0.33, clip=False) == (0.4, 14)
    w, side = sampling_floors(box, 28, 0.33, clip=True)
    assert w == pytest.approx(0.9 * 0.33 ** 0.5, abs=1e-4) and side == 14  # 0.517 * 28 = 14.5 -> 14
    assert sampling_floors(box, 28, 0.8, clip=True) == (pytest.approx(0.805, abs=1e-3), 22)
    assert sampling_floors({"w_min": 0.7, "side_min": 20}, 28, 0.1, clip=True) == (0.7, 20)  # never outside the box
    assert sampling_floors(box, 28, 0.999, clip=True)[1] <= 27  # a chain always has a level


def test_impossible_target_fails_before_work(trained_ckpt, tmp_path, capsys):
    out = tmp_path / "nope"
    code = _main(["prune3d", str(trained_ckpt), "--target-flops", "0.01", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "impossible budget" in err[0]
    assert not out.exists()


def test_config_errors_are_one_line(trained_ckpt, tmp_path, capsys):
    with pytest.raises(LeanconvError):
        Prune3dConfig(samples=3)
    code = _main(["prune3d", str(trained_ckpt), "--target-flops", "0.4", "--ray-address", "localhost:1",
                  "--out", str(tmp_path / "x"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "ray" in err[0]
