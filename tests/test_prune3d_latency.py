"""Three-dimensional pruning to a latency target (``prune3d --target-latency``).

The unit tests use a made-up staircase table (as ``test_latency_budget``), so what they check
(width cut on the staircase after the resolution step, the predicted cost, refusals before
work, the cost model's terms) never depends on this machine's timing. The end-to-end tests
time real models, so they check what a run records, not how fast it came out.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch
from torch import nn

from leanconv import checkpoint
from leanconv.cli.main import main
from leanconv.cost.latency_table import LatencyModel, LatencyTable, table_key
from leanconv.errors import LeanconvError
from leanconv.prune3d.latency import (LATENCY_TERMS, SideCorrected, check_latency_box, latency_ratio,
                                      side_profile)
from leanconv.prune3d.optimum import CalibratedCost, discrete_ratios, maximise
from leanconv.prune3d.realise import StepSettings, load_origin, realise
from leanconv.prune3d.samples import settings_hash
from leanconv.prune3d.search import alternatives, fit_samples
from leanconv.runs.latency import MAX_ATTEMPTS, LatencyBudget
from leanconv.runs.prune3d import SHORTLIST, Prune3dConfig, _choose_measured
from leanconv.width.channels import channel_counts


class StairTable(LatencyTable):
    """A conv costs its output positions times its channel blocks (of 8), plus a call cost."""

    def __init__(self):
        super().__init__({**table_key("onnxruntime", 1, 1), "step": 8})

    def ensure(self, configs, progress=None) -> int:
        todo = self.missing(configs)
        for c in todo:
            blocks = 0 if c.kind == "call" else math.ceil(c.cin / c.groups / 8) * math.ceil(c.cout / 8)
            self.entries[c.key()] = 0.01 + 1e-5 * c.h * c.w * c.kh * c.kw * blocks * 64
        return len(todo)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def _stair_origin(ckpt):
    origin = load_origin(str(ckpt), StepSettings(data="synthetic", method="l1", epochs=0, score_images=32))
    table = StairTable()
    raw = LatencyModel(table, origin.shape, 1.0, 1.0, table.step)
    origin.latency = LatencyModel.calibrate(table, origin.model, origin.shape, raw.predict(origin.model))
    return origin


@pytest.fixture()
def origin(trained_ckpt):
    return _stair_origin(trained_ckpt)


@pytest.fixture(scope="module")
def fitted(trained_ckpt):
    """An origin on the made-up table and the predictor and cost model fitted on points
    realised from it, with an accuracy that falls in every dimension (fitted once: the
    predictor's selection takes seconds)."""
    origin = _stair_origin(trained_ckpt)
    samples = []
    for d, w, r in [(1, 1, 1), (5 / 7, 1, 1), (3 / 7, 1, 1), (1, 0.8, 1), (1, 0.6, 1), (1, 1, 0.75), (1, 1, 0.5),
                    (5 / 7, 0.8, 0.75), (3 / 7, 0.7, 0.5), (5 / 7, 0.6, 1)]:
        point = realise(origin, d, w, r)[1]
        samples.append({"d": point.d, "w": point.w, "r": point.r, "latency": point.latency, "macs": point.macs,
                        "accuracy": 90 - 6 * (1 - point.d) - 15 * (1 - point.w) - 25 * (1 - point.r)})
    return origin, fit_samples(samples, 1.0, latency=True)


def _on_staircase(count: int, full: int, step: int = 8) -> bool:
    return count == full or count % step == 0 or (count < step and count % max(1, step // 4) == 0)


def test_latency_point_sets_the_side_before_cutting_width_on_the_staircase(origin):
    before = {k: v.clone() for k, v in origin.model.state_dict().items()}
    model, point = realise(origin, 5 / 7, 0.8, 0.75)
    assert point.side == 12 and model.leanconv_meta["input_shape"] == [3, 12, 12] and point.keep == 5
    assert point.latency == pytest.approx(latency_ratio(origin.latency, model))
    depth_and_side = copy.deepcopy(origin.model)
    for b in origin.blocks:  # the same blocks bypassed, full width: the width step's starting point
        if isinstance(model.get_submodule(b.path), nn.Identity):
            depth_and_side.set_submodule(b.path, nn.Identity())
    depth_and_side.leanconv_meta = {**depth_and_side.leanconv_meta, "input_shape": [3, 12, 12]}
    start = latency_ratio(origin.latency, depth_and_side)
    assert point.latency <= 0.8 ** 2 * start + 1e-9  # the width step kept at most w^2 of that latency
    assert point.w == pytest.approx(math.sqrt(point.latency / start))
    full, kept = channel_counts(origin.model), channel_counts(model)
    cut = [n for n in kept if kept[n][1] < full[n][1]]
    assert cut and all(_on_staircase(kept[n][1], full[n][1]) for n in cut)
    for k, v in origin.model.state_dict().items():  # the trained model is untouched
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_the_search_box_is_refused_before_work_below_its_smallest_point(origin):
    side = 8
    box = check_latency_box(origin, 0.99, w_min=0.4, side=side)
    smallest = box["smallest_latency_ratio"]
    assert 0 < smallest < 1 and box["side_min"] == side and box["width_fastest_share"] <= 1
    with pytest.raises(LeanconvError, match=r"latency target .* is unreachable on onnxruntime.*raise --target-latency"):
        check_latency_box(origin, 0.9 * smallest, w_min=0.4, side=side)


def test_latency_cost_terms_fit_a_model_made_of_them():
    rng = np.random.default_rng(0)
    X = np.column_stack([rng.uniform(0.4, 1, 12), rng.uniform(0.4, 1, 12), rng.uniform(0.5, 1, 12)])
    d, w, r = X.T
    y = 0.6 * d * w ** 2 * r ** 2 + 0.25 * w ** 2 * r ** 2 + 0.15 * w ** 2
    y = y + 0.04 * d + 0.02  # each block's op overheads and a fixed cost: what timed points show
    cost = CalibratedCost.fit(X, y, LATENCY_TERMS)
    assert cost.coef == pytest.approx({"d*w^2*r^2": 0.6, "w^2*r^2": 0.25, "w^2": 0.15, "d": 0.04, "1": 0.02},
                                      abs=1e-9)
    assert cost.max_r(0.5, 0.8, float(cost(0.5, 0.8, 0.7))) == pytest.approx(0.7)


class _Sum:
    """A predictor that rises in every dimension (so the solver takes the largest side in budget)."""

    domain = ((0.5, 1.0), (0.5, 1.0), (0.5, 1.0))

    def predict(self, X):
        return np.asarray(X).sum(axis=1)


def test_side_correction_follows_the_measured_profile_and_steers_the_solver_off_slow_sides():
    smooth = CalibratedCost({"w^2*r^2": 1.0})  # latency r^2 w^2: smooth in the side
    profile = {s: (s / 28) ** 2 for s in range(14, 29)}
    profile.update({s: 0.9 for s in range(19, 23)})  # sides where the runtime is slow
    corrected = SideCorrected(smooth, 28, profile)
    for side, measured in profile.items():  # exact for the unpruned model at every profiled side
        assert corrected(1.0, 1.0, side / 28) == pytest.approx(measured, rel=1e-12)
    assert corrected(1.0, 0.5, 21 / 28) == pytest.approx(0.25 * 0.9)  # the side's surprise scales the point
    assert corrected(1.0, 1.0, 10 / 28) == pytest.approx((10 / 28) ** 2)  # no profile there: as fitted
    grid = corrected(np.array([[1.0]]), np.array([[1.0]]), np.array([14 / 28, 21 / 28]))
    assert grid.shape == (1, 2) and grid[0, 1] == pytest.approx(0.9)
    options = {"allowed_d": (1.0,), "allowed_w": (1.0,), "allowed_r": discrete_ratios(28, 14)}
    assert round(maximise(_Sum(), smooth, 0.6, **options).r * 28) == 21  # the smooth fit takes a slow side
    chosen = maximise(_Sum(), corrected, 0.6, **options)
    assert round(chosen.r * 28) == 18 and chosen.predicted_macs == pytest.approx((18 / 28) ** 2)
    assert set(corrected.to_dict()["side_profile"]) == {str(s) for s in range(14, 29)}


def test_side_profile_times_the_unpruned_model_once_at_every_side(origin):
    seen = {}

    def measure(models, shapes):
        seen.update(models=models, shapes=shapes)
        ratio = {name: {"median": 1.0 if name == "unpruned" else int(name[4:]) / 100} for name in models}
        return type("Timed", (), {"ratio": ratio})()

    before = copy.deepcopy(origin.model.leanconv_meta)
    profile = side_profile(origin.model, origin.shape, range(8, 17), measure)
    assert profile == {**{s: s / 100 for s in range(8, 16)}, 16: 1.0}
    assert seen["models"]["unpruned"] is origin.model and origin.model.leanconv_meta == before
    for side in range(8, 16):
        assert seen["shapes"][f"side{side}"] == (3, side, side)
        assert seen["models"][f"side{side}"].leanconv_meta["input_shape"] == [3, side, side]


def test_samples_of_a_latency_budget_are_kept_apart_and_resume_across_measurements(trained_ckpt):
    plain = StepSettings(data="synthetic")
    spec = {"runtime": "onnxruntime", "threads": 1, "batch": 1}
    timed = replace(plain, latency={**spec, "reference_ms": 0.3})
    # samples made before the hessian and reconstruction settings existed keep their keys: their
    # defaults (HAP's estimator, no reconstruction) are left out
    fields = {k: v for k, v in asdict(plain).items()
              if v is not None and k not in ("data_dir", "hessian", "reconstruct_images")}
    import hashlib

    h = hashlib.sha256(trained_ckpt.read_bytes())
    h.update(json.dumps(fields, sort_keys=True).encode())
    assert settings_hash(trained_ckpt, plain) == h.hexdigest()[:12]  # a MACs run's samples keep their keys
    assert settings_hash(trained_ckpt, timed) != settings_hash(trained_ckpt, plain)
    assert settings_hash(trained_ckpt, timed) == settings_hash(trained_ckpt, replace(timed, latency={**spec,
                                                                                           "reference_ms": 0.5}))
    other = replace(plain, latency={**spec, "batch": 8, "reference_ms": 0.3})
    assert settings_hash(trained_ckpt, other) != settings_hash(trained_ckpt, timed)
    assert settings_hash(trained_ckpt, replace(plain, hessian="hutchinson")) != settings_hash(trained_ckpt, plain)
    assert settings_hash(trained_ckpt, replace(plain, reconstruct_images=64)) != settings_hash(trained_ckpt, plain)


def test_alternatives_are_the_best_point_of_each_other_block_count_and_side(fitted):
    origin, fit = fitted
    rows = [{"d": 1.0, "w": 0.9, "r": 0.75, "predicted_accuracy": 80.0},
            {"d": 1.0, "w": 0.8, "r": 0.75, "predicted_accuracy": 79.0},  # same (blocks, side) as above, worse
            {"d": 5 / 7, "w": 1.0, "r": 0.75, "predicted_accuracy": 81.0},
            {"d": 1.0, "w": 0.7, "r": 1.0, "predicted_accuracy": 85.0},  # taken: the solver's own
            {"d": 3 / 7, "w": 1.0, "r": 1.0, "predicted_accuracy": 78.0}]
    found = alternatives(origin, fit, rows, {(7, 16)}, 2)
    assert [(p.keep, p.side) for _, p in found] == [(5, 12), (7, 12)]  # best first, one per pair, k of them
    assert all(m.leanconv_meta["input_shape"] == [3, p.side, p.side] for m, p in found)
    assert alternatives(origin, fit, rows, set(), 0) == []


class FakeTiming:
    """Side-by-side ratios made up from the table's predictions: the solver's choice (``c0``)
    measures ``choice_factor`` times its prediction, the alternatives ``factor`` times theirs."""

    def __init__(self, origin, choice_factor, factor):
        self.origin, self.choice_factor, self.factor = origin, choice_factor, factor

    def __call__(self, models, shapes):
        ratio = {}
        for name, model in models.items():
            f = 1.0 if name == "unpruned" else self.choice_factor if name == "c0" else self.factor
            value = f * latency_ratio(self.origin.latency, model) / latency_ratio(self.origin.latency,
                                                                                 self.origin.model)
            ratio[name] = {"median": value, "low": 0.9 * value, "high": 1.1 * value}
        return type("Timed", (), {"ratio": ratio, "latency_ms": {"unpruned": {"median_ms": 1.0}}})()


def test_a_measured_latency_keeps_the_most_accurate_candidate_within_the_target(fitted, monkeypatch):
    (origin, fit), config = fitted, Prune3dConfig(target=0.5, kind="latency", r_min=0.5)
    fake = FakeTiming(origin, 2.0, 1.0)  # the choice misses, the rest fit
    monkeypatch.setattr(LatencyBudget, "measure", lambda self, models, shapes: fake(models, shapes))
    result, model, point, _, attempts = _choose_measured(origin, fit, config, lambda _: None)
    (attempt,) = attempts
    rows = attempt["candidates"]
    assert len(rows) == SHORTLIST and rows[0]["measured"]["median"] > 0.5 + 0.03
    best = max(range(1, len(rows)), key=lambda i: rows[i]["predicted_accuracy"])
    assert attempt["kept"] == best and attempt["measured"] == rows[best]["measured"]
    assert (point.side, point.keep) == (rows[best]["choice"]["side"], round(rows[best]["choice"]["d"] * 7))
    assert result.choice.predicted_accuracy == rows[best]["predicted_accuracy"] and result.choice.d == point.d
    assert model.leanconv_meta["input_shape"] == [3, point.side, point.side]


def test_a_measured_latency_tightens_when_no_candidate_is_within_the_target(fitted, monkeypatch):
    (origin, fit), config = fitted, Prune3dConfig(target=0.5, kind="latency", r_min=0.5)
    fake = FakeTiming(origin, 1.5, 1.5)
    monkeypatch.setattr(LatencyBudget, "measure", lambda self, models, shapes: fake(models, shapes))
    attempts = _choose_measured(origin, fit, config, lambda _: None)[4]
    assert 2 <= len(attempts) <= MAX_ATTEMPTS
    for earlier, later in zip(attempts, attempts[1:]):
        assert earlier["kept"] == 0  # none within: the solver's choice stands for the attempt
        assert later["goal"] == pytest.approx(earlier["goal"] * 0.5 / earlier["candidates"][0]["measured"]["median"])


def _logits(model, shape):
    torch.manual_seed(0)
    with torch.no_grad():
        return model.eval()(torch.randn(4, *shape))


def test_prune3d_target_latency_end_to_end(trained_ckpt, tmp_path, capsys):
    out = tmp_path / "p3"
    code = main(["prune3d", str(trained_ckpt), "--target-latency", "0.6", "--runtime", "onnxruntime", "--batch", "8",
                 "--samples", "6", "--workers", "0", "--sample-images", "64", "--finetune-epochs", "0",
                 "--method", "l1", "--score-images", "32", "--repeats", "2", "--out", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    record = json.loads((out / "record.json").read_text())
    budget = record["latency_budget"]
    assert record["config"]["kind"] == "latency" and record["budget"]["kind"] == "latency"
    assert budget["runtime"] == "onnxruntime" and budget["batch"] == 8 and budget["threads"] == 1
    assert budget["measured_here"] and budget["width_price"] == "importance"
    assert budget["point_latency"] == "timed side by side"  # --workers 0: nothing runs beside a task
    for attempt in budget["attempts"]:
        m = attempt["measured"]
        assert m["low"] <= m["median"] <= m["high"] and attempt["unpruned_ms"] > 0
        first = attempt["candidates"][0]
        assert first["solver_cost"] <= attempt["goal"] + 1e-9  # the solver's choice, as its point was timed
        assert 1 <= len(attempt["candidates"]) <= SHORTLIST and attempt["candidates"][attempt["kept"]]["measured"] == m
    for later, earlier in zip(budget["attempts"][1:], budget["attempts"]):
        assert later["goal"] < earlier["goal"]  # a missed target tightens the goal
    assert summary["latency_ratio"] == [round(budget["attempts"][-1]["measured"][k], 3)
                                        for k in ("median", "low", "high")]
    samples = record["samples"]
    assert len(samples) == 6 and all(s["latency"] > 0 and s["latency_table"] > 0 for s in samples)
    assert [s["latency"] for s in samples if s["kind"] == "base"] == [pytest.approx(1.0)]
    assert set(record["cost_model"]["calibrated"]["coef"]) <= set(LATENCY_TERMS)
    profile = record["cost_model"]["side_correction"]["side_profile"]  # the unpruned model timed at every side
    assert set(profile) == {str(s) for s in range(record["search_box"]["side_min"], 17)} and profile["16"] == 1.0
    assert "budget_latency" in record["choice"] and "predicted_latency" in record["resolve_trail"][-1]
    assert record["after_prune_before_finetune"]["bn"] == "re-estimated on training images"
    assert record["timing"]["runtime"] == "onnxruntime" and {"batch1", "batch8", "batch64"} <= set(record["timing"])
    side = record["choice"]["realised"]["side"]
    pruned = checkpoint.load(out / "model.safetensors")
    assert pruned.leanconv_meta["input_shape"] == [3, side, side]
    full, kept = channel_counts(checkpoint.load(trained_ckpt)), channel_counts(pruned)
    assert all(_on_staircase(kept[n][1], full[n][1], budget["step"]) for n in kept)  # the runtime's own block
    reloaded = checkpoint.load(out / "model.safetensors")
    torch.testing.assert_close(_logits(reloaded, (3, side, side)), _logits(pruned, (3, side, side)), rtol=0, atol=0)
    assert "--target-latency 0.6" in record["command"] and "--runtime onnxruntime" in record["command"]
    assert "--batch 8" in record["command"]
    assert (out / "budget.png").stat().st_size > 5000


@pytest.mark.parametrize("argv, match", [
    (["--target-latency", "0.01"], "latency target 0.01 is unreachable"),
    (["--target-latency", "0.5", "--runtime-threads", "0"], "--runtime-threads must be at least 1, got 0"),
    (["--target-latency", "0.5", "--batch", "0"], "--batch must be at least 1, got 0"),
    (["--target-latency", "1.5"], "--target-latency must lie strictly between 0 and 1"),
    (["--target-latency", "0.5", "--target-flops", "0.5"], "not allowed with argument"),
    (["--target-latency", "0.5", "--runtime", "nope"], "argument --runtime: invalid choice"),
])
def test_prune3d_bad_latency_input_is_one_line_and_writes_nothing(trained_ckpt, tmp_path, run_cli, argv, match):
    out = tmp_path / "p3"
    code, _, err = run_cli(["prune3d", str(trained_ckpt), *argv, "--method", "l1", "--score-images", "16",
                            "--workers", "0", "--out", str(out), "--no-progress"])
    assert code == 2 and len(err) == 1 and match in err[0], err
    assert not out.exists()


def test_compare_places_3d_at_the_latency_target(trained_ckpt, tmp_path, capsys):
    out = tmp_path / "c"
    code = main(["compare", str(trained_ckpt), "--target-latency", "0.6", "--methods", "3d", "--runtime",
                 "onnxruntime", "--batch", "8", "--no-onnx", "--samples", "5", "--finetune-epochs", "0",
                 "--score-images", "32", "--repeats", "2", "--reconstruct-images", "32", "--out", str(out),
                 "--no-progress"])
    assert code == 0, capsys.readouterr().err
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]
    entry = lines[-1]
    assert entry["key"] == "3d@0.6" and entry["budget"] == "latency"
    assert "solved for onnxruntime latency x0.6 (batch 8)" in entry["notes"] and "measured x" in entry["notes"]
