"""Where the new convs go (--where all | auto | paths), fitted starts in the run, BatchNorm folding into pSConv."""

import json

import pytest
import torch
from torch import nn

from leanconv import checkpoint
from leanconv.cli import main as cli_main
from leanconv.convs import placement
from leanconv.convs.convert import conversion_spec, conversion_targets, convert, replacements
from leanconv.deploy.fold import fold
from leanconv.errors import LeanconvError
from leanconv.layers import PeriodicSparseConv2d, SlidingChannelConv2d
from leanconv.models import create
from leanconv.runs import convert as run_convert_module

SHAPE = (3, 16, 16)


@pytest.fixture
def cli(monkeypatch):
    extra = [name for name in ("convert",) if name not in cli_main.SUBCOMMANDS]
    monkeypatch.setattr(cli_main, "SUBCOMMANDS", [*cli_main.SUBCOMMANDS, *extra])
    return cli_main.main


def test_layers_restrict_the_conversion_and_an_unknown_path_changes_nothing():
    model = create("resnet20", input_size=16)
    convert(model, "psconv", layers=["layer2.1.conv1", "layer3.0.conv2"])
    kinds = {p: type(m) for p, m in model.named_modules() if isinstance(m, (nn.Conv2d, PeriodicSparseConv2d))}
    assert [p for p, k in kinds.items() if k is PeriodicSparseConv2d] == ["layer2.1.conv1", "layer3.0.conv2"]
    assert model.leanconv_meta["conversions"][-1]["layers"] == ["layer2.1.conv1", "layer3.0.conv2"]
    fresh = create("resnet20", input_size=16)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    for bad, match in ((["conv1"], "'conv1' cannot be converted to psconv"), ([], "no layer named"),
                       (["layer1.0.conv2", "nope"], "'nope' cannot be converted")):
        with pytest.raises(LeanconvError, match=match):
            convert(fresh, "psconv", layers=bad)
    after = fresh.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)


def test_replacements_do_not_touch_the_model_and_match_what_convert_builds():
    model = create("resnet20", input_size=16)
    spec = conversion_spec("scc", groups=2)
    new = replacements(model, spec)
    assert list(new) == conversion_targets(model, "scc")
    assert all(type(m) is nn.Conv2d for p, m in model.named_modules() if p.endswith("conv2"))
    assert isinstance(new["layer1.0.conv2"][1], SlidingChannelConv2d)


def _timing(path, ratio, form="reference"):
    return placement.LayerTiming(path, (16, 8, 8), 1.0, ratio, {"median": ratio, "low": ratio, "high": ratio}, form,
                                 {form: ratio})


def test_choose_keeps_the_layers_faster_by_the_margin():
    timings = [_timing("a", 0.5), _timing("b", 0.95), _timing("c", 0.951), _timing("d", 1.3)]
    assert placement.choose(timings, 0.05) == ["a", "b"]
    untimed = placement.LayerTiming("e", (16, 8, 8), None, None, {"median": 0.1, "low": 0.1, "high": 0.1}, "x", {})
    assert placement.choose([untimed], 0.05) == []  # no form could beat dense: never chosen
    assert placement.choose(timings, 0.0) == ["a", "b", "c"]
    with pytest.raises(LeanconvError):
        placement.choose(timings, 1.0)


def test_measure_layers_times_every_candidate_at_its_own_input_shape():
    model = create("resnet20", input_size=16)
    new = replacements(model, conversion_spec("psconv"), ["layer1.0.conv1", "layer2.0.conv1", "layer3.2.conv2"])
    timings = placement.measure_layers(model, new, SHAPE, runtime="torch", rounds=1, repeats=1)
    assert [t.path for t in timings] == list(new)
    assert [t.input_shape for t in timings] == [(16, 16, 16), (16, 16, 16), (64, 4, 4)]
    for t in timings:
        assert t.dense_ms > 0 and t.new_ms > 0 and t.ratio["low"] <= t.ratio["median"] <= t.ratio["high"]
        assert set(t.forms) == set(placement.forms(new[t.path], "torch")) and t.forms[t.form] == min(t.forms.values())


def test_forms_follow_the_runtime_and_the_channels():
    from leanconv.layers._kernels import kernels_available

    kernel = ["kernel"] if kernels_available() else []
    ps = PeriodicSparseConv2d(16, 32, pattern="psd4_p8")
    assert sorted(placement.forms(ps, "torch")) == sorted(["grouped", *kernel])  # reference = the dense conv
    assert placement.forms(ps, "onnxruntime") == ["grouped"]
    assert placement.forms(PeriodicSparseConv2d(12, 16, pattern="psd4_p8"), "onnxruntime") == []
    block = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16), SlidingChannelConv2d(16, 32, 2, 0.5))
    assert sorted(placement.forms(block, "onnxruntime")) == ["grouped", "reference"]
    placement.set_form(block, "grouped")
    assert block[1].impl == "grouped"
    with pytest.raises(LeanconvError, match="expected one new layer"):
        placement.forms(nn.Conv2d(3, 3, 1), "torch")


def test_batchnorm_folds_into_periodic_sparse_and_sliding_channel_convs():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                        PeriodicSparseConv2d(16, 24, pattern="psd4_p8"), nn.BatchNorm2d(24), nn.ReLU(),
                        SlidingChannelConv2d(24, 32, groups=4, overlap=0.5), nn.BatchNorm2d(32))
    with torch.no_grad():
        for bn in (net[1], net[4], net[7]):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    x = torch.randn(4, *SHAPE, dtype=torch.float64)
    net = net.double().eval()
    result = fold(net, x)
    assert result.pairs == [("0", "1"), ("3", "4"), ("6", "7")]
    assert isinstance(result.model[4], nn.Identity) and result.model[3].bias is not None
    assert isinstance(result.model[7], nn.Identity) and result.model[6].bias is not None
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), net(x), rtol=1e-9, atol=1e-9)


def test_cli_where_auto_converts_only_the_layers_measured_faster(cli, trained_ckpt, tmp_path, capsys, monkeypatch):
    fast = {"layer1.0.conv2", "layer3.1.conv2"}

    def fake(model, new, shape, **kwargs):
        return [_timing(p, 0.6, "grouped") if p in fast else _timing(p, 1.1) for p in new]
    monkeypatch.setattr(run_convert_module, "measure_layers", fake)
    monkeypatch.setattr(run_convert_module, "confirm", lambda model, spec, timings, chosen, shape, **kw: (
        list(chosen), [{"layers": list(chosen), "ratio": {"median": 0.8, "low": 0.8, "high": 0.8}}]))
    out = tmp_path / "auto"
    assert cli(["convert", str(trained_ckpt), "--to", "scc", "--groups", "2", "--where", "auto", "--runtime", "torch",
                "--fit-images", "64", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "2 of 9 layers measured faster" in printed
    record = json.loads((out / "convert.json").read_text())
    assert sorted(record["layers"]) == sorted(fast) and len(record["layer_timings"]) == 9
    assert sorted(t["path"] for t in record["layer_timings"] if t["converted"]) == sorted(fast)
    assert record["whole_model_checks"][0]["ratio"]["median"] == 0.8
    model = checkpoint.load(out / "model.safetensors")
    assert isinstance(model.layer1[0].conv2, nn.Sequential) and type(model.layer1[1].conv2) is nn.Conv2d
    assert model.layer1[0].conv2[1].impl == model.layer3[1].conv2[1].impl == "grouped"  # the fastest form, saved

    monkeypatch.setattr(run_convert_module, "measure_layers", lambda model, new, shape, **kw: [_timing(p, 1.2)
                                                                                                for p in new])
    assert cli(["convert", str(trained_ckpt), "--to", "scc", "--groups", "2", "--where", "auto", "--runtime", "torch",
                "--out", str(tmp_path / "none"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no layer runs faster" in err[0] and not (tmp_path / "none").exists()


def test_cli_where_paths_and_bad_paths(cli, trained_ckpt, tmp_path, capsys):
    out = tmp_path / "two"
    assert cli(["convert", str(trained_ckpt), "--to", "psconv", "--where", "layer2.0.conv2, layer3.0.conv2",
                "--init", "random", "--out", str(out), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["layers"] == ["layer2.0.conv2", "layer3.0.conv2"] and record["init"] == "random"
    for where, match in (("conv1", "'conv1' cannot be converted"), ("layer1.0.conv2,,", "--where takes all, auto")):
        assert cli(["convert", str(trained_ckpt), "--to", "psconv", "--where", where,
                    "--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and match in err[0]
    assert not (tmp_path / "bad").exists()


def test_fitted_start_is_recorded_and_judged_right_away(cli, trained_ckpt, tmp_path, capsys):
    out = tmp_path / "fit"
    assert cli(["convert", str(trained_ckpt), "--to", "psconv", "--fit-images", "128", "--out", str(out),
                "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["init"] == "fit" and record["finetune_lr"] == 0.01
    assert set(record["fit"]) == set(record["layers"])
    for entry in record["fit"].values():
        assert 0 <= entry["unexplained"] <= 1.0 + 1e-6
    right = record["converted"]
    assert right["bn"] == "kept from the trained model" and 0 <= right["test_accuracy"] <= 100
    assert 0 <= right["test_accuracy_bn_reestimated"] <= 100
    with pytest.raises(LeanconvError, match="--init fit needs training images"):
        run_convert_module.run_convert(run_convert_module.ConvertConfig(to="psconv", init="fit"),
                                       run_convert_module.Source(None, model=create("resnet20", input_size=16)))


def test_fine_tuning_a_converted_model_can_distil_from_the_original(cli, trained_ckpt, tmp_path, capsys):
    out = tmp_path / "kd"
    assert cli(["convert", str(trained_ckpt), "--to", "psconv", "--where", "layer3.2.conv2", "--fit-images", "64",
                "--finetune-epochs", "1", "--train-subset", "64", "--distill", "--repeats", "1",
                "--runtime", "torch", "--out", str(out), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["distillation"]["teacher"] == "the unconverted model" and record["finetune_lr"] == 0.01
    assert "after" in record and record["timing"]["runtime"] == "torch"
    assert cli(["convert", str(trained_ckpt), "--to", "psconv", "--distill", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--distill acts while fine-tuning" in err[0] and not (tmp_path / "bad").exists()


def test_confirm_drops_the_half_that_gained_least_until_the_whole_model_is_faster(monkeypatch):
    from types import SimpleNamespace

    model = create("resnet20", input_size=16)
    timings = [_timing(p, r) for p, r in (("layer1.0.conv2", 0.5), ("layer1.1.conv2", 0.6), ("layer2.0.conv2", 0.7),
                                          ("layer3.0.conv2", 0.9))]
    seen = []

    def fake_time(models, shape, **kwargs):
        layers = models["converted"].leanconv_meta["conversions"][-1]["layers"]
        seen.append(layers)
        ratio = 1.1 if len(layers) > 1 else 0.9  # only one converted layer makes the model faster
        return SimpleNamespace(ratio={"converted": {"median": ratio, "low": ratio, "high": ratio}})
    monkeypatch.setattr(placement, "time_side_by_side", fake_time)
    spec = conversion_spec("scc", groups=2)
    kept, checks = placement.confirm(model, spec, timings, [t.path for t in timings], SHAPE, runtime="torch")
    assert kept == ["layer1.0.conv2"] and [len(c["layers"]) for c in checks] == [4, 2, 1]
    assert seen[1] == ["layer1.0.conv2", "layer1.1.conv2"]  # the half that gained most alone stays
    monkeypatch.setattr(placement, "time_side_by_side", lambda models, shape, **kw: SimpleNamespace(
        ratio={"converted": {"median": 1.2, "low": 1.2, "high": 1.2}}))
    assert placement.confirm(model, spec, timings, ["layer1.0.conv2"], SHAPE, runtime="torch")[0] == []
    assert all(type(m) is nn.Conv2d for p, m in model.named_modules() if p.endswith("conv2"))  # untouched
