"""The latency-budget solver (leanconv.width.latency_budget) on a synthetic staircase, and
``prune --target-latency`` / ``compare --target-latency`` end to end.

The solver tests use a table whose times are a made-up staircase in blocks of channels, so
what they check (counts on the staircase, the goal met, refusals before scoring) never
depends on this machine's timing or float rounding.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

from leanconv import checkpoint
from leanconv.cli.main import main
from leanconv.cost.latency_table import LatencyModel, LatencyTable, layer_configs, table_key
from leanconv.errors import LeanconvError
from leanconv.importance import ScoringData
from leanconv.layers.implant import ImplantConv2d
from leanconv.models import create
from leanconv.width.channels import channel_counts
from leanconv.width.latency_budget import (LatencyPruner, check_latency_reachable, measured_damage, prune_to_latency,
                                           solver_configs)

SHAPE = (3, 16, 16)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def _stair_ms(config, block: int = 8) -> float:
    """The made-up staircase: a conv costs its output positions times the channel blocks of its
    input and output, plus a fixed call cost."""
    if config.kind == "call":
        return 0.01
    blocks = math.ceil(config.cin / config.groups / block) * math.ceil(config.cout / block)
    return 0.01 + 1e-5 * config.h * config.w * config.kh * config.kw * blocks * block ** 2


class StairTable(LatencyTable):
    """A table that 'measures' a staircase: a conv costs its output positions times the
    channel blocks of its input and output (blocks of ``block``), plus a fixed call cost."""

    def __init__(self, block: int = 8, step: int = 8):
        super().__init__({**table_key("onnxruntime", 1, 1), "step": step})
        self.block, self.measured = block, 0

    def ensure(self, configs, progress=None) -> int:
        todo = self.missing(configs)
        for c in todo:
            self.entries[c.key()] = _stair_ms(c, self.block)
        self.measured += len(todo)
        return len(todo)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return create("resnet20", num_classes=4, input_size=16).eval()


def _latency(model: nn.Module, table: LatencyTable | None = None) -> LatencyModel:
    table = table or StairTable()
    raw = LatencyModel(table, SHAPE, 1.0, 1.0, table.step)
    return LatencyModel.calibrate(table, model, SHAPE, raw.predict(model))  # "measured" = the table's own sum


def _scores(model):
    from leanconv.graph.groups import channel_groups

    gen = torch.Generator().manual_seed(1)
    return [torch.rand(g.size, generator=gen) + 0.1 for g in channel_groups(model, torch.zeros(1, *SHAPE))]


def _data(n: int = 2):
    gen = torch.Generator().manual_seed(2)
    return ScoringData([(torch.randn(8, *SHAPE, generator=gen), torch.randint(0, 4, (8,), generator=gen))
                        for _ in range(n)])


def _allowed(size: int, step: int) -> set[int]:
    fine = max(1, step // 4)
    return {size, *range(step, size, step), *range(fine, min(step, size), fine)}


def test_solver_keeps_counts_on_the_staircase_and_meets_the_goal():
    model = _model()
    latency = _latency(model)
    pruner = LatencyPruner(model, _scores(model), torch.zeros(1, *SHAPE), latency=latency, input_shape=SHAPE,
                           price="importance")
    plan = pruner.solve(0.5)
    assert plan.predicted_ms <= 0.5 * latency.reference_ms + 1e-9
    solver = pruner.solver
    for g, (t, k) in enumerate(zip(pruner.traced, plan.kept)):
        assert k in _allowed(t.group.size, 8), (t.group.root, k)
        if k < t.group.size:  # a cut count must be faster than the next larger allowed count
            larger = min(o for o in solver.options[g] if o > k)
            up = list(plan.kept)
            up[g] = larger
            assert solver.predict(up) > solver.predict(plan.kept), (t.group.root, k, larger)
    assert plan.kept != [t.group.size for t in pruner.traced]


def test_realised_model_has_the_planned_channels_and_the_original_is_untouched():
    model = _model()
    before = copy.deepcopy(model.state_dict())
    latency = _latency(model)
    pruner = LatencyPruner(model, _scores(model), torch.zeros(1, *SHAPE), latency=latency, input_shape=SHAPE,
                           price="importance")
    plan = pruner.solve(0.5)
    pruned, result = pruner.realise(plan, 0.5)
    counts = channel_counts(pruned)
    for t, k in zip(pruner.traced, plan.kept):
        assert counts[t.group.root][1] == k
    assert result.kind == "latency" and result.macs_after < result.macs_before
    assert result.achieved == pytest.approx(latency.predict(pruned) / latency.reference_ms)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)


def test_prune_to_latency_prunes_in_place_within_the_goal():
    model = _model()
    latency = _latency(model)
    result = prune_to_latency(model, _scores(model), torch.zeros(1, *SHAPE), target=0.6, latency=latency,
                              input_shape=SHAPE, price="importance")
    assert result.achieved <= 0.6 + 1e-9
    assert latency.predict(model) / latency.reference_ms == pytest.approx(result.achieved)
    with torch.no_grad():
        assert model(torch.zeros(2, *SHAPE)).shape == (2, 4)


def test_unreachable_target_is_refused_before_scoring():
    model = _model()
    latency = _latency(model)

    def criterion(*_):
        raise AssertionError("scored before the target was checked")

    fastest = check_latency_reachable(model, torch.zeros(1, *SHAPE), target=0.9, latency=latency, input_shape=SHAPE)
    assert 0 < fastest < 0.9
    unreachable = "latency target 0.001 is unreachable.*raise the target.*prune3d --target-latency"
    with pytest.raises(LeanconvError, match=unreachable):
        prune_to_latency(model, criterion, torch.zeros(1, *SHAPE), target=0.001, latency=latency, input_shape=SHAPE)


def test_a_table_with_another_cpu_block_plans_on_that_block():
    model = _model()
    latency = _latency(model, StairTable(block=16, step=16))
    pruner = LatencyPruner(model, _scores(model), torch.zeros(1, *SHAPE), latency=latency, input_shape=SHAPE,
                           price="importance")
    assert all(set(opts) <= _allowed(t.group.size, 16) for t, opts in zip(pruner.traced, pruner.solver.options))
    assert any(4 in opts for opts in pruner.solver.options)  # a quarter block below the first block


def test_solver_configs_cover_every_plan_the_solver_can_make():
    model = _model()
    table = StairTable()
    wanted = solver_configs(model, torch.zeros(1, *SHAPE), input_shape=SHAPE, step=table.step)  # the device block
    table.ensure(wanted)
    latency = _latency(model, table)
    table.measured = 0
    pruner = LatencyPruner(model, _scores(model), torch.zeros(1, *SHAPE), latency=latency, input_shape=SHAPE,
                           price="importance")
    for target in (0.8, 0.5, 0.3):
        pruned, _ = pruner.realise(pruner.solve(target), target)
        assert set(layer_configs(pruned, SHAPE).values()) <= set(wanted)
    assert table.measured == 0  # nothing beyond what solver_configs named


class _Clock:
    """A stand-in for the side-by-side timing: the pruned model measures ``factor`` times the
    table's prediction (a runtime faster or slower than the table says)."""

    def __init__(self, latency: LatencyModel, factor: float):
        self.latency, self.factor, self.calls = latency, factor, 0

    def measure(self, models, shape):
        self.calls += 1
        value = self.factor * self.latency.predict(models["pruned"]) / self.latency.reference_ms
        ratio = {"median": value, "low": value, "high": value}
        return type("Timed", (), {"ratio": {"pruned": ratio},
                                  "latency_ms": {"unpruned": {"median_ms": self.latency.reference_ms}}})()


@pytest.mark.parametrize("factor", [0.7, 1.4])
def test_a_measured_latency_far_from_the_target_moves_the_goal_toward_it(factor):
    from leanconv.importance import create_criterion
    from leanconv.runs.latency import MAX_ATTEMPTS, SLACK, final_attempt, prune_to_measured_latency

    model = _model()
    latency = _latency(model)
    latency.refit = lambda model, ms: None  # the stand-in clock keeps the table's scale
    clock = _Clock(latency, factor)
    results, attempts = prune_to_measured_latency(model, create_criterion("l1"), torch.zeros(1, *SHAPE), latency,
                                                  clock, target=0.5, shape=SHAPE, data=_data())
    first = attempts[0]
    assert first["goal"] == 0.5 and 2 <= len(attempts) <= MAX_ATTEMPTS and clock.calls == len(attempts)
    assert (attempts[1]["goal"] > 0.5) == (factor < 1)  # faster than asked: loosened; slower: tightened
    final = final_attempt(attempts)
    assert final["measured"]["median"] <= 0.5 + SLACK  # what is kept meets the target
    within = [a for a in attempts if a["measured"]["median"] <= 0.5 + SLACK]
    assert final["goal"] == max(a["goal"] for a in within)  # the loosest goal that met it
    assert sum(bool(a.get("final")) for a in attempts) == 1
    assert final["measured"]["median"] == pytest.approx(factor * latency.predict(model) / latency.reference_ms)
    assert results[0].achieved == pytest.approx(latency.predict(model) / latency.reference_ms)  # adopted: the final


def test_the_next_goal_moves_toward_the_target_and_stays_inside_the_bracket():
    from leanconv.runs.latency import _next_goal

    assert _next_goal(0.5, 0.51, 0.5, None, None, 0.1) is None  # within +- SLACK: done
    assert _next_goal(0.5, 0.625, 0.5, None, None, 0.1) == pytest.approx(0.4)  # over: tighter by R / measured
    assert _next_goal(0.5, 0.4, 0.5, None, None, 0.1) == pytest.approx(0.625)  # well under: looser the same way
    assert _next_goal(0.5, 1.0, 0.5, None, None, 0.3) is None  # tighter than the fastest plan: stop
    assert _next_goal(0.6, 0.2, 0.5, None, None, 0.1) == pytest.approx(0.8)  # never a goal of 1 or more
    assert _next_goal(0.6, 0.7, 0.5, 0.5, None, 0.1) == pytest.approx(0.55)  # over, 0.5 was within: halfway
    assert _next_goal(0.4, 0.3, 0.5, None, 0.5, 0.1) == pytest.approx(0.45)  # under, 0.5 was over: halfway
    assert _next_goal(0.5, 0.46, 0.5, None, 0.5004, 0.1) is None  # no room left between the two


def test_a_model_already_timed_over_the_target_is_not_timed_again(monkeypatch):
    from leanconv.importance import create_criterion
    from leanconv.runs.latency import final_attempt, prune_to_measured_latency

    solve = LatencyPruner.solve  # a coarse staircase: every goal above 0.42 gives the plan of 0.5
    monkeypatch.setattr(LatencyPruner, "solve", lambda self, goal: solve(self, 0.5 if goal > 0.42 else goal))
    model = _model()
    latency = _latency(model)
    latency.refit = lambda model, ms: None
    clock = _Clock(latency, 1.1)  # 10% over the table: the plan of 0.5 measures over the target
    _, attempts = prune_to_measured_latency(model, create_criterion("l1"), torch.zeros(1, *SHAPE), latency, clock,
                                            target=0.5, shape=SHAPE, data=_data())
    plans = [tuple(a["kept"]) for a in attempts]
    assert len(plans) == len(set(plans)) == clock.calls == 2  # the repeated plan was not timed again
    assert attempts[0]["measured"]["median"] > 0.53 and attempts[1]["goal"] < 0.42  # it aimed below that plan
    final = final_attempt(attempts)
    assert final is attempts[1] and final["measured"]["median"] <= 0.53


def test_measured_damage_prices_every_allowed_cut():
    model = _model()
    latency = _latency(model)
    pruner = LatencyPruner(model, _scores(model), torch.zeros(1, *SHAPE), latency=latency, input_shape=SHAPE,
                           price="importance")
    damage = measured_damage(model, pruner.traced, pruner.planner, pruner.solver.options, pruner.example, _data())
    assert set(damage) == {(g, k) for g, opts in enumerate(pruner.solver.options) for k in opts[1:]}
    assert all(math.isfinite(v) for v in damage.values())


def test_candidates_choose_the_lowest_validation_loss_and_repeat_with_the_seed():
    model = _model()
    latency = _latency(model)

    def pruner(seed):
        return LatencyPruner(model, _scores(model), torch.zeros(1, *SHAPE), latency=latency, input_shape=SHAPE,
                             data=_data(), candidates=4, seed=seed)

    first = pruner(0)
    assert first.price == "damage"  # validation data given: cuts are priced by measured damage
    plan = first.solve(0.5)
    chosen = first.chosen
    assert 1 <= chosen["candidates"] <= 4 and len(chosen["losses"]) == chosen["candidates"]
    assert chosen["losses"][chosen["chosen"]] == min(chosen["losses"])
    assert plan.predicted_ms <= 0.5 * latency.reference_ms + 1e-9
    assert pruner(0).solve(0.5).kept == plan.kept


@pytest.mark.parametrize("options, match", [
    ({"price": "nope"}, "price must be one of damage, importance"),
    ({"price": "damage"}, "price 'damage' measures each cut on validation batches"),
    ({"candidates": 0}, "candidates must be a whole number"),
    ({"candidates": 3, "price": "importance"}, "choosing among candidates measures each on validation batches"),
    ({"floor": 0}, "floor must be"),
    ({"normalize": "max"}, "normalize must be"),
])
def test_bad_solver_options_are_one_line(options, match):
    model = _model()
    with pytest.raises(LeanconvError, match=match):
        LatencyPruner(model, _scores(model), torch.zeros(1, *SHAPE), latency=_latency(model), input_shape=SHAPE,
                      **options)


def test_a_model_with_implants_is_refused():
    model = _model()
    model.layer3[0].conv2 = ImplantConv2d(64, 60, 4, 3, padding=1)
    with pytest.raises(LeanconvError, match="does not prune models with Neural Implant layers"):
        solver_configs(model, torch.zeros(1, *SHAPE), input_shape=SHAPE)


# ---------------------------------------------------------------- the command line, end to end


def test_prune_target_latency_records_the_budget_and_times_side_by_side(trained_ckpt, tmp_path, capsys):
    out = tmp_path / "p"
    code = main(["prune", str(trained_ckpt), "--method", "l1", "--target-latency", "0.7", "--runtime", "onnxruntime",
                 "--score-images", "32", "--candidates", "2", "--repeats", "2", "--finetune-epochs", "0",
                 "--out", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    record = json.loads((out / "record.json").read_text())
    budget = record["latency_budget"]
    assert record["config"]["kind"] == "latency" and record["config"]["runtime"] == "onnxruntime"
    assert budget["runtime"] == "onnxruntime" and budget["batch"] == 1 and budget["threads"] == 1 and budget["measured_here"]
    attempt = budget["attempts"][0]
    assert attempt["goal"] == 0.7 and attempt["price"] == "damage" and attempt["candidates"]["candidates"] >= 1
    assert attempt["measured"]["low"] <= attempt["measured"]["median"] <= attempt["measured"]["high"]
    for later, earlier in zip(budget["attempts"][1:], budget["attempts"]):  # over tightens, well under loosens
        assert (later["goal"] < earlier["goal"]) == (earlier["measured"]["median"] > 0.7 + 0.03)
    assert sum(bool(a.get("final")) for a in budget["attempts"]) == 1
    assert record["rounds"][0]["macs_after"] < record["rounds"][0]["macs_before"]
    assert record["after_prune_before_finetune"]["bn"] == "re-estimated on training images"
    assert summary["runtime"].startswith("onnxruntime ") and record["timing"]["runtime"] == "onnxruntime"
    pruned = checkpoint.load(out / "model.safetensors")
    kept, full = channel_counts(pruned), channel_counts(checkpoint.load(trained_ckpt))
    assert any(kept[name][1] < full[name][1] for name in full)  # which layers lose channels depends on the timings
    assert record["command"] and "--target-latency 0.7" in record["command"]
    assert "--runtime onnxruntime" in record["command"]


@pytest.mark.parametrize("argv, match", [
    (["--target-latency", "0.001"], "latency target 0.001 is unreachable"),
    (["--target-latency", "0.5", "--implant", "0.1"], "--implant does not apply to --target-latency"),
    (["--target-latency", "0.5", "--round-to", "8"], "--round-to does not apply to --target-latency"),
    (["--target-flops", "0.5", "--latency-table", "t.json"], "--latency-table is for --target-latency"),
    (["--target-latency", "0.5", "--runtime", "nope"], "argument --runtime: invalid choice"),
    (["--target-latency", "0.5", "--threads", "0"], "--threads must be at least 1, got 0"),
    (["--target-latency", "0.5", "--batch", "0"], "--batch must be at least 1, got 0"),
    (["--target-latency", "0.5", "--latency-table", "missing.json"], "latency table 'missing.json'"),
    (["--target-latency", "1.5"], "--target-latency must lie strictly between 0 and 1"),
])
def test_prune_bad_latency_input_is_one_line_and_writes_nothing(trained_ckpt, tmp_path, run_cli, monkeypatch, argv,
                                                                 match):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "p"
    code, _, err = run_cli(["prune", str(trained_ckpt), "--method", "l1", *argv, "--score-images", "16", "--out",
                            str(out), "--no-progress"])
    assert code == 2 and len(err) == 1 and match in err[0], err
    assert not out.exists()


def test_prune_refuses_a_table_made_for_another_batch(trained_ckpt, tmp_path, capsys):
    table = LatencyTable(table_key("torch", 1, 64))
    table.save(tmp_path / "t.json")
    out = tmp_path / "p"
    code = main(["prune", str(trained_ckpt), "--method", "l1", "--target-latency", "0.5", "--runtime", "torch",
                 "--latency-table", str(tmp_path / "t.json"), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "made for batch 64 (not 1)" in err[0], err
    assert not out.exists()


def _stair_clock(monkeypatch) -> None:
    """Every latency of a budget from the made-up staircase instead of this machine's clock (a
    busy machine made the tiny test model's timings too noisy to reach a target)."""
    from types import SimpleNamespace

    from leanconv.cost import latency_table
    from leanconv.runs.latency import LatencyBudget

    def measure(self, models, shape):
        ms = {n: 0.01 + sum(map(_stair_ms, layer_configs(m, shape).values())) for n, m in models.items()}
        ratio = {n: dict.fromkeys(("median", "low", "high"), v / ms["unpruned"]) for n, v in ms.items()}
        return SimpleNamespace(latency_ms={n: {"median_ms": v} for n, v in ms.items()}, ratio=ratio)

    monkeypatch.setattr(latency_table, "measure_layer", lambda config, *args: _stair_ms(config))
    monkeypatch.setattr(LatencyBudget, "measure", measure)


def test_compare_target_latency_places_width_entries_at_the_latency(trained_ckpt, tmp_path, capsys, monkeypatch):
    _stair_clock(monkeypatch)
    out = tmp_path / "c"
    code = main(["compare", str(trained_ckpt), "--target-latency", "0.7", "--methods", "l1", "--runtime", "onnxruntime",
                 "--no-onnx", "--finetune-epochs", "0", "--score-images", "32", "--repeats", "2",
                 "--out", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]
    run, base, entry = lines[0], lines[1], lines[-1]
    assert run["identity"]["budget"] == "latency" and run["identity"]["runtime"] == "onnxruntime"
    assert base["timing"]["runtime"] == "onnxruntime" and base["timing"]["budget"] == "latency"
    assert entry["key"] == "l1@0.7" and entry["budget"] == "latency"
    for runtime in ("torch", "onnx"):  # --no-onnx leaves ONNX Runtime in: it is the budget's runtime
        s = entry["speedup"][runtime]["batch1"]
        assert s["low"] <= s["median"] <= s["high"]
    assert "solved for onnxruntime latency x0.7" in entry["notes"]
    report = (out / "report.md").read_text()
    assert "Latency budget 70% of the baseline on onnxruntime, batch 1" in report
    assert "measured latency on onnxruntime, batch 1" in report


def test_compare_refuses_implants_under_a_latency_budget(trained_ckpt, tmp_path, capsys):
    out = tmp_path / "c"
    code = main(["compare", str(trained_ckpt), "--target-latency", "0.5", "--methods", "hap+implant",
                 "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "hap+implant has no latency budget" in err[0], err
    assert not out.exists()


def test_python_api_prunes_your_model_to_a_latency():
    import leanconv
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 4))
    data = DataLoader(TensorDataset(torch.randn(64, *SHAPE), torch.randint(0, 4, (64,))), batch_size=16)
    small = leanconv.prune(model, torch.randn(1, *SHAPE), data=data, method="l1", target_latency=0.8,
                           runtime="onnxruntime", latency_batch=8, score_images=16, candidates=2)
    record = small.leanconv_record
    assert record["config"]["kind"] == "latency" and record["latency_budget"]["attempts"]
    assert record["achieved"]["macs"] < 1 and model[0].out_channels == 32  # the model given is unchanged
    with pytest.raises(LeanconvError, match="give one budget"):
        leanconv.prune(model, torch.randn(1, *SHAPE), data=data, method="l1", target_latency=0.5, target_macs=0.5)


def test_half_width_keeps_the_staircase_count_nearest_half_of_every_group():
    from leanconv.graph.groups import trace_groups
    from leanconv.width.latency_budget import half_width

    torch.manual_seed(0)
    model = create("resnet20", in_channels=3, input_size=16, num_classes=4).eval()
    thin = half_width(model, torch.randn(1, *SHAPE), input_shape=SHAPE, step=8)
    before, after = channel_counts(model), channel_counts(thin)
    assert after["layer1.0.conv1"][1] == 8 and after["layer2.0.conv1"][1] == 16 and after["layer3.0.conv1"][1] == 32
    assert after["conv1"][1] == 8 and after["fc"][1] == before["fc"][1] == 4  # the stream halves, the output stays
    assert len(trace_groups(model, torch.randn(1, *SHAPE))) == len(trace_groups(thin, torch.randn(1, *SHAPE)))
    assert thin(torch.randn(2, *SHAPE)).shape == (2, 4) and model.conv1.out_channels == 16  # original untouched


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime"])
def test_the_check_times_a_thin_copy_beside_the_unpruned_model_on_eager_pytorch_only(runtime):
    from leanconv.runs.latency import LatencyBudget, describe

    torch.manual_seed(0)
    model = create("resnet20", in_channels=3, input_size=16, num_classes=4).eval()
    latency = LatencyBudget(runtime, 1, 2, repeats=2).check(model, torch.randn(1, *SHAPE), SHAPE, target=0.95)
    record = describe(latency)
    if runtime == "torch":
        assert latency.thin is not None and 0 < latency.thin[1] < 1.5  # a ratio measured side by side
        assert latency.thin[0]["layer1.0.conv1"].cout == 8 and record["thin_ratio"] == latency.thin[1]
        assert record["element_ms"] == latency.element_ms >= 0 and "offset_ms" in record
        assert latency.predict(model) == pytest.approx(latency.reference_ms, rel=1e-9)
    else:
        assert latency.thin is None and latency.element_ms == 0 and "element_ms" not in record
