"""``leanconv latency-table``: a table for a tiny model, extended not rebuilt, used by prune, and refusals."""

import json

import pytest
import torch

from leanconv import checkpoint
from leanconv.cli.main import main
from leanconv.cost import runtimes
from leanconv.cost.latency_table import LatencyTable, table_key
from leanconv.util.model_io import example_input
from leanconv.runs.latency import final_attempt
from leanconv.width.latency_budget import solver_configs
from prune_toys import ResToy, RollToy

SHAPE = (3, 16, 16)  # the synthetic dataset's images; ResToy predicts its 4 classes
TOY = "prune_toys:ResToy"


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """Every test has a latency cache of its own (prune keeps one; this command must not need it)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def toy_ckpt(tmp_path_factory):
    """An untrained ResToy (width 32: its convs, not the runtime's per-call cost, dominate its latency)."""
    torch.manual_seed(0)
    model = ResToy(width=32)
    model.leanconv_meta = {"input_shape": list(SHAPE), "num_classes": 4,
                           "dataset": {"name": "synthetic", "data_dir": None}}
    path = tmp_path_factory.mktemp("toy") / "toy.safetensors"
    checkpoint.save(model, path, constructor=TOY, constructor_kwargs={"width": 32})
    return path


def _table(ckpt, out, *extra: str) -> list[str]:
    return ["latency-table", str(ckpt), "--constructor", TOY, "--out", str(out), "--no-progress", *extra]


def _summary(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert captured.out == "" and len(lines) == 1 and lines[0].startswith("leanconv: error:"), captured.err
    return lines[0]


def test_table_holds_every_solver_config_then_is_kept_and_used_by_prune(toy_ckpt, tmp_path, capsys):
    out = tmp_path / "table.json"
    assert main(_table(toy_ckpt, out, "--batch", "1", "--threads", "1")) == 0
    first = _summary(capsys)
    key = table_key("onnxruntime", 1, 1)
    table = LatencyTable.load(out, key, strict=True)
    assert table.here
    model = checkpoint.load(toy_ckpt, constructor=TOY)
    needed = solver_configs(model, example_input(model, SHAPE), input_shape=SHAPE)
    assert len(needed) > 10 and not table.missing(needed)
    assert first["measured"] == first["entries"] == len(table.entries) == len(needed)
    assert {k: first[k] for k in ("runtime", "version", "threads", "batch", "cpu")} == \
        {k: key[k] for k in ("runtime", "version", "threads", "batch", "cpu")}
    assert first["out"] == str(out) and first["seconds"] > 0

    before = out.read_bytes()
    assert main(_table(toy_ckpt, out)) == 0  # the defaults: onnxruntime, 1 thread, batch 1
    again = _summary(capsys)
    assert again["measured"] == 0 and again["entries"] == first["entries"]
    assert out.read_bytes() == before  # nothing to add: the file is not rewritten

    budget = _prune_with(toy_ckpt, out, tmp_path / "pruned")
    assert budget["measured_here"] and budget["table_entries"] == len(table.entries)


def test_a_table_from_the_deployment_device_plans_prune_here(toy_ckpt, tmp_path, capsys):
    out = tmp_path / "table.json"
    assert main(_table(toy_ckpt, out)) == 0
    device = {**json.loads(out.read_text()), "cpu": "The deployment device's CPU (4 logical cores)"}
    out.write_text(json.dumps(device))  # as if built there: nothing in it can be re-measured here
    budget = _prune_with(toy_ckpt, out, tmp_path / "pruned")
    assert not budget["measured_here"] and budget["cpu"] == device["cpu"]
    assert budget["attempts"][-1]["measured"] is None


def _prune_with(ckpt, table, out) -> dict:
    """``prune --target-latency 0.7 --latency-table table`` (small and quick); the record's latency budget."""
    assert main(["prune", str(ckpt), "--constructor", TOY, "--method", "l1", "--target-latency", "0.7",
                 "--latency-table", str(table), "--data", "synthetic:n=256", "--score-images", "32",
                 "--finetune-epochs", "0", "--repeats", "2", "--out", str(out), "--no-progress"]) == 0
    record = json.loads((out / "record.json").read_text())
    assert record["after"]["macs"] < record["before"]["macs"]
    final = final_attempt(record["latency_budget"]["attempts"])  # the kept one: its goal may be loosened
    assert final["predicted"] <= final["goal"] + 1e-9  # the solver met its goal (what was measured is timing)
    assert not (out.parent / "cache" / "leanconv").exists()  # prune used the file, not this machine's cache
    return record["latency_budget"]


def test_existing_table_grows_by_the_missing_entries_only(toy_ckpt, tmp_path, capsys):
    out = tmp_path / "table.json"
    assert main(_table(toy_ckpt, out)) == 0
    full = json.loads(out.read_text())
    kept, dropped = dict(list(full["entries"].items())[::2]), list(full["entries"])[1::2]
    out.write_text(json.dumps({**full, "entries": kept}))
    capsys.readouterr()
    assert main(_table(toy_ckpt, out)) == 0
    summary = _summary(capsys)
    grown = json.loads(out.read_text())["entries"]
    assert summary["measured"] == len(dropped) and summary["entries"] == len(full["entries"]) == len(grown)
    assert all(grown[k] == v for k, v in kept.items())  # kept entries are not re-measured


def test_an_interrupted_run_keeps_what_it_measured(toy_ckpt, tmp_path, capsys, monkeypatch):
    from leanconv.cost import latency_table

    measure, calls = latency_table.measure_layer, []

    def interrupted(*args, **kwargs):
        calls.append(args)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return measure(*args, **kwargs)

    monkeypatch.setattr(latency_table, "measure_layer", interrupted)
    out = tmp_path / "table.json"
    assert main(_table(toy_ckpt, out)) == 130
    assert len(LatencyTable.load(out, table_key("onnxruntime", 1, 1)).entries) == 4
    monkeypatch.setattr(latency_table, "measure_layer", measure)
    capsys.readouterr()
    assert main(_table(toy_ckpt, out)) == 0
    summary = _summary(capsys)
    assert summary["measured"] == summary["entries"] - 4


def test_keep_unprunable_builds_the_table_prune_keep_unprunable_needs(tmp_path, capsys):
    model = RollToy()  # torch.roll moves conv1's channels: they cannot be pruned
    model.leanconv_meta = {"input_shape": list(SHAPE), "num_classes": 2}
    ckpt = tmp_path / "roll.safetensors"
    checkpoint.save(model, ckpt, constructor="prune_toys:RollToy")
    out = tmp_path / "table.json"
    argv = ["latency-table", str(ckpt), "--constructor", "prune_toys:RollToy", "--out", str(out), "--no-progress"]
    assert main(argv) == 2
    _one_error_line(capsys)
    assert not out.exists()
    assert main([*argv, "--keep-unprunable"]) == 0
    needed = solver_configs(model, example_input(model, SHAPE), input_shape=SHAPE, strict=False)
    assert not LatencyTable.load(out, table_key("onnxruntime", 1, 1)).missing(needed)
    assert _summary(capsys)["entries"] == len(needed)


@pytest.mark.parametrize("change", ["batch", "cpu", "corrupt", "checkpoint"])
def test_a_foreign_file_is_refused_and_left_untouched(toy_ckpt, tmp_path, capsys, change):
    out = tmp_path / "table.json"
    if change == "checkpoint":
        out.write_bytes(toy_ckpt.read_bytes())
    else:
        assert main(_table(toy_ckpt, out, "--batch", "2")) == 0
        capsys.readouterr()
        if change == "cpu":
            out.write_text(json.dumps({**json.loads(out.read_text()), "batch": 1, "cpu": "Another CPU (64 cores)"}))
        elif change == "corrupt":
            out.write_text(out.read_text()[:-20])
    before = out.read_bytes()
    assert main(_table(toy_ckpt, out, "--batch", "1")) == 2
    line = _one_error_line(capsys)
    assert "left untouched" in line and str(out) in line
    if change == "batch":
        assert "batch 2 (not 1)" in line
    if change == "cpu":
        assert "Another CPU" in line
    assert out.read_bytes() == before


@pytest.mark.parametrize("argv,match", [
    (["--runtime", "tensorrt"], "invalid choice: 'tensorrt'"),
    (["--threads", "0"], "--threads"),
    (["--batch", "-1"], "--batch"),
    (["--batch", "99999999999"], "--batch"),
])
def test_bad_arguments_are_one_line_and_write_nothing(toy_ckpt, tmp_path, capsys, argv, match):
    out = tmp_path / "table.json"
    with pytest.raises(SystemExit) as exc:  # argparse
        main(_table(toy_ckpt, out, *argv))
    assert exc.value.code == 2
    assert match in _one_error_line(capsys)
    assert not out.exists()


def test_a_runtime_not_installed_names_its_install(toy_ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(runtimes._PACKAGES, "openvino", "leanconv-no-such-package")  # as if it were not installed
    out = tmp_path / "table.json"
    assert main(_table(toy_ckpt, out, "--runtime", "openvino")) == 2
    assert "pip install" in _one_error_line(capsys)
    assert not out.exists()


@pytest.mark.parametrize("target", ["fifo", "folder", "device"])
def test_an_output_that_is_no_regular_file_is_refused(toy_ckpt, tmp_path, capsys, target):
    import os

    out = {"fifo": tmp_path / "fifo", "folder": tmp_path, "device": "/dev/null"}[target]
    if target == "fifo":
        os.mkfifo(out)
    assert main(_table(toy_ckpt, out)) == 2
    assert str(out) in _one_error_line(capsys)
