"""The run shape: configs that check themselves once and turn back into their command, sources,
records, and the public API."""

from __future__ import annotations

import dataclasses
import json
import shlex

import pytest
import torch

import leanconv
from leanconv import checkpoint
from leanconv.cli.common import build_config
from leanconv.cli.main import build_parser
from leanconv.cost import count
from leanconv.errors import LeanconvError
from leanconv.models import create
from leanconv.runs import (CompareConfig, ConvertConfig, Prune3dConfig, PruneConfig, SensitivityConfig, Source,
                           command_line, run_prune)

CONFIGS = [
    PruneConfig(),
    PruneConfig(method="l1", target=0.4, kind="params", implant=0.1, implant_init="fit", normalize="none",
                shrink=True, latency_aware=True, round_to=8, strict=False, steps=2, finetune_epochs=3,
                finetune_lr=0.003, train_subset=500, score_images=64, probes=12, seed=3, batch_size=32,
                latency_repeats=4),
    PruneConfig(method="taylor", target=0.33, kind="latency", runtime="torch", threads=2, latency_batch=16,
                latency_table="t.json", candidates=3),
    Prune3dConfig(),
    Prune3dConfig(target=0.25, samples=9, mixed=2, method="taylor", normalize="none", sample_epochs=0,
                  sample_images=100, finetune_epochs=1, finetune_lr=0.02, train_subset=300, batch_size=64,
                  score_images=32, probes=4, w_min=0.3, r_min=0.6, min_blocks_per_stage=2, clip_box=False, seed=5,
                  latency_repeats=3),
    Prune3dConfig(target=0.4, kind="latency", runtime="torch", runtime_threads=2, latency_batch=8, samples=6),
    ConvertConfig(to="scc", groups=4, runtime="torch", threads=2),
    ConvertConfig(to="scc", groups=2, overlap=0.25, seed=7, finetune_epochs=2, finetune_lr=0.1, train_subset=64),
    ConvertConfig(to="psconv", pattern="psd1_p16", batch_size=16),
    SensitivityConfig(),
    SensitivityConfig(probes=16, min_probes=4, rel_stderr=0.1, probe_groups="layer", score_images=128, seed=2,
                      batch_size=64),
    CompareConfig(),
    CompareConfig(targets=(0.5, 0.33), budget="latency", runtime="torch", threads=2, latency_batch=8,
                  methods=("l1", "3d")),
    CompareConfig(targets=(0.5, 0.33), methods=("l1", "3d", "scc"), finetune_epochs=0, finetune_lr=0.02,
                  probes=8, score_images=100, train_subset=256, samples=5, latency_repeats=2, onnx=False,
                  onnx_opset=17, quick=True, seed=1, scc_groups=4, scc_overlap=0.25, psconv_pattern="ps4_p4"),
]


@pytest.fixture(scope="module")
def source(trained_ckpt):
    return Source.from_checkpoint(trained_ckpt)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{type(c).__name__}")
def test_a_config_turns_into_the_command_that_rebuilds_it(config, source, tmp_path):
    """The reproducing command, parsed by the CLI, builds the same config (the CLI's options
    and the config's fields cannot drift apart)."""
    words = shlex.split(command_line(config, source, tmp_path / "out"))
    assert words[:2] == ["leanconv", config.command]
    args = build_parser().parse_args(words[1:])
    if isinstance(config, (PruneConfig, Prune3dConfig, CompareConfig)):  # the budget option carries the kind
        from leanconv.cli import compare as compare_cli, prune as prune_cli, prune3d as prune3d_cli

        cli = {PruneConfig: prune_cli, Prune3dConfig: prune3d_cli, CompareConfig: compare_cli}[type(config)]
        assert cli.config_from_args(args) == config
    else:
        assert build_config(type(config), args) == config
    assert args.data == source.data.name and args.out == str(tmp_path / "out")


@pytest.mark.parametrize("config_type", [PruneConfig, Prune3dConfig, SensitivityConfig, CompareConfig])
def test_the_probe_count_is_checked_alike_everywhere(config_type):
    with pytest.raises(LeanconvError, match=r"^--probes must be at least 2 \(a standard error needs two\), got 1$"):
        config_type(probes=1)


@pytest.mark.parametrize("bad", [0.0, 1.0, float("nan"), -0.5, "0.5", True])
def test_the_target_is_checked_alike_everywhere(bad):
    for make in (lambda: PruneConfig(target=bad), lambda: Prune3dConfig(target=bad),
                 lambda: CompareConfig(targets=(0.5, bad))):
        with pytest.raises(LeanconvError, match="--target-flops must lie strictly between 0 and 1"):
            make()
    with pytest.raises(LeanconvError, match="--target-params must lie strictly between 0 and 1"):
        PruneConfig(target=bad, kind="params")


def test_shared_settings_have_one_name_and_one_check():
    """A setting that several runs have is the same field (name, option, check) in each."""
    shared = {}
    for config_type in (PruneConfig, Prune3dConfig, ConvertConfig, SensitivityConfig, CompareConfig):
        for f in dataclasses.fields(config_type):
            if f.metadata.get("flag") and not callable(f.metadata["flag"]):
                shared.setdefault(f.metadata["flag"], set()).add(f.name)
    assert "--target-flops" not in shared  # every run's budget option depends on the budget kind
    assert all(len(names) == 1 for names in shared.values()), shared
    assert shared["--finetune-lr"] == {"finetune_lr"} and shared["--train-subset"] == {"train_subset"}
    assert shared["--score-images"] == {"score_images"}
    with pytest.raises(LeanconvError, match="--finetune-lr must be a finite number above 0"):
        Prune3dConfig(finetune_lr=0)
    with pytest.raises(LeanconvError, match="--train-subset must be at least 1"):
        ConvertConfig(groups=2, train_subset=0)


def test_a_setting_without_an_option_cannot_be_written_as_a_command():
    assert "--samples" in Prune3dConfig(samples=8).argv()
    with pytest.raises(LeanconvError, match="grid=51 has no command-line option"):
        Prune3dConfig(grid=51).argv()


def test_convert_options_are_checked_together():
    with pytest.raises(LeanconvError, match="--to scc needs --groups"):
        ConvertConfig(to="scc")
    with pytest.raises(LeanconvError, match="apply to --to scc only"):
        ConvertConfig(to="psconv", overlap=0.5)
    with pytest.raises(LeanconvError, match="--overlap must be a finite number >= 0 and below 1"):
        ConvertConfig(to="scc", groups=2, overlap=float("nan"))
    assert ConvertConfig(to="psconv").spec().name == "psconv_psd4_p8"
    assert ConvertConfig(to="scc", groups=2).overlap == 0.5 and ConvertConfig(to="psconv").pattern == "psd4_p8"


@pytest.mark.parametrize("bad", [-1, 2**32, True, 1.5])
def test_seeds_are_checked_alike_everywhere(bad):
    for config_type in (PruneConfig, Prune3dConfig, SensitivityConfig, CompareConfig):
        with pytest.raises(LeanconvError, match="^--seed must be"):
            config_type(seed=bad)


def test_python_values_are_taken_as_the_command_line_takes_them():
    assert CompareConfig(targets=0.5, methods="l1,scc") == CompareConfig(targets=(0.5,), methods=("l1", "scc"))
    assert SensitivityConfig(probe_groups=2) == SensitivityConfig(probe_groups="2")
    with pytest.raises(LeanconvError, match="--target-flops takes a list of budgets"):
        CompareConfig(targets="0.5")
    with pytest.raises(LeanconvError, match="--onnx-opset must be one of"):
        CompareConfig(onnx_opset=99)
    with pytest.raises(LeanconvError, match=r"--mixed must be at most --samples - 1 \(3\)"):
        Prune3dConfig(samples=4, mixed=10)


def test_a_run_from_a_model_in_memory_leaves_the_model_alone(tiny_data):
    torch.manual_seed(0)
    model = create("resnet20", in_channels=3, input_size=16, num_classes=4)
    model.leanconv_meta = {"input_shape": [3, 16, 16], "num_classes": 4}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    source = Source(tiny_data, model=model)
    result = run_prune(PruneConfig(method="l1", target=0.5, score_images=32, latency_repeats=1, reconstruct_images=32), source,
                       measured=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched
    assert count(result.model, (3, 16, 16)).macs < 0.52 * count(model, (3, 16, 16)).macs
    record = result.record.to_dict()
    assert record["kind"] == "prune" and record["command"] is None and record["source"] == "<model in memory>"
    assert abs(record["achieved"]["macs"] - 0.5) <= 0.01 and record["speedup_batch64"] is None
    with pytest.raises(LeanconvError, match="cannot be written as a command"):
        source.argv()


def test_a_result_saves_as_a_set_and_reloads_identically(source, tmp_path):
    config = PruneConfig(method="l2", target=0.5, score_images=32, latency_repeats=1, reconstruct_images=32)
    result = config.run(source, out=tmp_path / "r", measured=False)
    result.save(tmp_path / "r")
    record = json.loads((tmp_path / "r" / "record.json").read_text())
    assert record["command"] == command_line(config, source, tmp_path / "r")
    assert record["config"] == config.to_dict() and record["source"] == str(source.checkpoint)
    again = checkpoint.load(tmp_path / "r" / "model.safetensors")
    x = torch.randn(2, *source.shape)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x), result.model.eval()(x), rtol=0, atol=0)
    assert again.leanconv_meta["prune"]["config"] == config.to_dict()


def test_the_public_api_is_small_and_loads_lazily():
    assert set(leanconv.__all__) >= {"create_model", "list_models", "list_criteria", "load", "save", "profile",
                                     "Source", "PruneConfig", "run_prune", "Prune3dConfig", "run_prune3d",
                                     "ConvertConfig", "run_convert", "CompareConfig", "run_compare"}
    assert all(getattr(leanconv, name) is not None for name in leanconv.__all__)
    assert leanconv.run_prune is run_prune and "hap" in leanconv.list_criteria()
    assert "resnet20" in leanconv.list_models() and leanconv.create_model("resnet20").leanconv_base["zoo"] == "resnet20"
    with pytest.raises(AttributeError):
        leanconv.no_such_thing  # noqa: B018
