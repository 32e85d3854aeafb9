"""Design-space exploration: every variant trained once, recorded, resumable; Pareto table."""

import json

import pytest

from leanconv import checkpoint
from leanconv.convs import explore as explore_mod
from leanconv.util.files import JsonlStore
from leanconv.cli import main as cli_main
from leanconv.cost import count
from leanconv.errors import LeanconvError
from leanconv.convs.explore import (ExploreConfig, load_results, markdown_table, pareto_front, run_explore, variants,
                              write_summary)
from leanconv.models import create
from leanconv.train import TrainConfig


def _config(**overrides):
    base = dict(model="resnet20", dataset="synthetic", scc_groups=(2,), scc_overlaps=(0.5,),
                psconv_patterns=("psd1_p16",), train=TrainConfig(epochs=1, lr=0.05), batch_size=32, subset=64,
                latency_batches=(1, 4), latency_repeats=1, runtimes=("torch",), timing_rounds=1)
    base.update(overrides)
    return ExploreConfig(**base)


def test_variant_grid_names_and_order():
    config = _config(scc_groups=(1, 4), scc_overlaps=(0.25, 0.33), psconv_patterns=("psd4_p8",), include_dense=True)
    assert [v.name for v in variants(config)] == ["dense", "scc_g1_o0.25", "scc_g1_o0.33", "scc_g4_o0.25",
                                                  "scc_g4_o0.33", "psconv_psd4_p8"]
    with pytest.raises(LeanconvError, match="nothing to explore"):
        _config(scc_groups=(), psconv_patterns=())
    with pytest.raises(LeanconvError, match="zoo model"):
        _config(model="my_net")


def test_explore_trains_each_variant_once_and_resumes(tmp_path):
    config = _config()
    calls = []
    records = run_explore(config, tmp_path, progress=lambda d, t, info: calls.append(info["variant"]))
    assert [r["variant"] for r in records] == ["scc_g2_o0.5", "psconv_psd1_p16"]
    assert set(calls) == {"scc_g2_o0.5", "psconv_psd1_p16"}  # 2 steps each (64 images, batch 32)
    assert len(calls) == 4
    for record in records:
        model = checkpoint.load(tmp_path / record["checkpoint"])
        cost = count(model, (3, 16, 16))
        assert (record["macs"], record["params"]) == (cost.macs, cost.params)
        assert record["test_accuracy"] == model.leanconv_meta["test"]["accuracy"]
        assert set(record["latency_ms"]) == {"batch1", "batch4"} and record["latency_ms"]["batch4"] > 0
    dense_macs = count(create("resnet20", input_size=16, num_classes=4), (3, 16, 16)).macs
    assert records[0]["macs"] < 0.6 * dense_macs and records[1]["macs"] < 0.25 * dense_macs
    lines = (tmp_path / "results.jsonl").read_bytes()
    ckpt_time = (tmp_path / records[0]["checkpoint"]).stat().st_mtime_ns

    calls.clear()
    again = run_explore(config, tmp_path, progress=lambda d, t, info: calls.append(info["variant"]))
    assert calls == [] and again == records
    assert (tmp_path / "results.jsonl").read_bytes() == lines
    assert (tmp_path / records[0]["checkpoint"]).stat().st_mtime_ns == ckpt_time

    summary = write_summary(tmp_path, config)
    assert (tmp_path / "explore.json").exists() and (tmp_path / "table.md").exists()
    assert summary["pareto"][0] == "psconv_psd1_p16" and len(summary["records"]) == 2
    assert json.loads((tmp_path / "explore.json").read_text())["config"]["scc_groups"] == [2]

    with pytest.raises(LeanconvError, match="another model, dataset or training budget"):
        run_explore(_config(train=TrainConfig(epochs=2, lr=0.05)), tmp_path)


def test_a_variant_interrupted_after_training_is_not_retrained(tmp_path, monkeypatch):
    config = _config(psconv_patterns=())
    real = explore_mod._measure

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(explore_mod, "_measure", crash)
    with pytest.raises(KeyboardInterrupt):
        run_explore(config, tmp_path)
    assert load_results(tmp_path / "results.jsonl") == []
    monkeypatch.setattr(explore_mod, "_measure", real)
    calls = []
    (record,) = run_explore(config, tmp_path, progress=lambda *a: calls.append(a))
    assert calls == [] and record["resumed"] is True  # the finished epoch came back from train_state
    assert len(load_results(tmp_path / "results.jsonl")) == 1


def test_pareto_front_table_and_torn_lines(tmp_path):
    def rec(name, kind, macs, acc):
        return {"variant": name, "kind": kind, "macs": macs, "params": macs // 10, "test_accuracy": acc,
                "latency_ms": {"batch1": 1.0, "batch64": 20.0}}

    records = [rec("dense", "dense", 100, 90.0), rec("a", "scc", 50, 85.0), rec("b", "scc", 60, 80.0),
               rec("c", "psconv", 30, 85.0), rec("d", "psconv", 30, 70.0)]
    assert pareto_front(records) == ["c", "dense"]
    table = markdown_table(records).splitlines()
    assert table[2].startswith("| c | 85.00 ") and table[2].endswith("| * |")
    assert "| dense | 90.00 | 10 | 0.00 | 1.000 | 1.00 | 20.00 | * |" in table
    assert "| a | 85.00 | 5 | 0.00 | 0.500 |" in table[4]
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps(records[0]) + "\n" + '{"variant": "torn')
    assert load_results(path) == [records[0]]
    JsonlStore(path).append([records[1]])  # the store explore appends with
    assert load_results(path) == records[:2]


def test_cli_explore_writes_every_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli_main, "SUBCOMMANDS", [*cli_main.SUBCOMMANDS, "explore"]
                        if "explore" not in cli_main.SUBCOMMANDS else cli_main.SUBCOMMANDS)
    argv = ["explore", "--model", "resnet20", "--data", "synthetic", "--scc-groups", "4", "--scc-overlap", "0.25",
            "--include-dense", "--epochs", "1", "--subset", "32", "--batch-size", "32", "--repeats", "1",
            "--runtimes", "torch,onnxruntime", "--rounds", "1", "--out", str(tmp_path), "--no-progress"]
    assert cli_main.main(argv) == 0
    out = capsys.readouterr().out
    assert "| dense |" in out and "| scc_g4_o0.25 |" in out and "speedup onnxruntime b64" in out
    speed = json.loads((tmp_path / "explore.json").read_text())["speed"]
    for runtime in ("torch", "onnxruntime"):
        for batch in ("batch1", "batch64"):
            timed = speed[runtime][batch]["speedup"]
            assert timed["dense"]["median"] == 1.0 and timed["scc_g4_o0.25"]["median"] > 0
    for name in ("results.jsonl", "explore.json", "table.md", "pareto.png", "variants/dense/model.safetensors",
                 "variants/scc_g4_o0.25/model.safetensors"):
        assert (tmp_path / name).exists(), name
    assert (tmp_path / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert cli_main.main(argv) == 0  # the second run finds both variants done
    assert len(load_results(tmp_path / "results.jsonl")) == 2
