"""Conversion to DW + sliding-channel convs (DSXplore) and to periodic sparse convs (pSConv)."""

import pytest
import torch
from torch import nn

from leanconv import checkpoint
from leanconv.cli import main as cli_main
from leanconv.convs.convert import ConversionSpec, conversion_targets, convert
from leanconv.cost import count
from leanconv.data import load_dataset
from leanconv.errors import LeanconvError
from leanconv.layers import PeriodicSparseConv2d, SlidingChannelConv2d
from leanconv.models import create
from leanconv.train import evaluate

SHAPE = (3, 16, 16)


def _blocks(model):
    return [b for stage in (model.layer1, model.layer2, model.layer3) for b in stage]


def _layer_macs(report):
    return {row.name: row.macs for row in report.layers}


@pytest.fixture
def cli(monkeypatch):
    """``leanconv.cli.main.main`` with this feature's subcommands registered."""
    extra = [name for name in ("convert", "explore") if name not in cli_main.SUBCOMMANDS]
    monkeypatch.setattr(cli_main, "SUBCOMMANDS", [*cli_main.SUBCOMMANDS, *extra])
    return cli_main.main


def test_resnet20_scc_replaces_every_conv2_by_depthwise_and_scc():
    model = create("resnet20", input_size=16)
    before = count(model, SHAPE)
    convert(model, "scc", groups=2, overlap=0.5)
    for block in _blocks(model):
        dw, scc = block.conv2
        c = block.bn2.num_features
        assert isinstance(dw, nn.Conv2d) and dw.groups == c == dw.in_channels == dw.out_channels
        assert dw.kernel_size == (3, 3) and dw.padding == (1, 1) and dw.bias is None
        assert isinstance(scc, SlidingChannelConv2d) and (scc.in_channels, scc.out_channels) == (c, c)
        assert scc.groups == 2 and scc.overlap == 0.5 and scc.window == c // 2
        assert type(block.conv1) is nn.Conv2d  # conv1 stays dense
    assert type(model.conv1) is nn.Conv2d
    after = count(model, SHAPE)
    macs = _layer_macs(after)
    assert macs["layer1.0.conv2.0"] == 16 * 16 * 16 * 9          # depthwise: C * H * W * 3 * 3
    assert macs["layer1.0.conv2.1"] == 16 * 16 * 16 * 8          # SCC: C_out * H * W * C_in / g
    assert macs["layer3.2.conv2.1"] == 64 * 4 * 4 * 32
    saved = sum(3 * (c * s * s * c * 9 - c * s * s * 9 - c * s * s * c // 2) for c, s in ((16, 16), (32, 8), (64, 4)))
    assert after.macs == before.macs - saved and after.macs < 0.55 * before.macs
    saved_params = sum(3 * (c * c * 9 - c * 9 - c * c // 2) for c in (16, 32, 64))
    assert after.params == before.params - saved_params
    assert model.leanconv_meta["conversions"][0]["layers"][0] == "layer1.0.conv2"


def test_converted_checkpoint_reloads_to_identical_logits(tmp_path):
    model = create("resnet20", input_size=16)
    convert(model, "scc", groups=4, overlap=0.25)
    model.eval()
    header = checkpoint.save(model, tmp_path / "m.safetensors")
    replaced = {e["path"] for e in header["edits"] if e["op"] == "replace"}
    assert replaced == {f"layer{s}.{b}.conv2" for s in (1, 2, 3) for b in range(3)}
    again = checkpoint.load(tmp_path / "m.safetensors")
    x = torch.randn(3, *SHAPE)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))
    assert isinstance(again.layer2[1].conv2[1], SlidingChannelConv2d)


def test_vgg16_keeps_its_first_conv_and_converts_the_other_twelve():
    model = create("vgg16", input_size=16)
    first = model.features[0].weight.clone()
    convert(model, "scc", groups=2, overlap=0.5)
    assert type(model.features[0]) is nn.Conv2d and torch.equal(model.features[0].weight, first)
    converted = [m for m in model.features if isinstance(m, nn.Sequential)]
    assert len(converted) == 12
    assert all(isinstance(m[1], SlidingChannelConv2d) and m[0].groups == m[0].in_channels for m in converted)


def test_mobilenetv2_pointwise_convs_become_scc_and_depthwise_stay():
    model = create("mobilenetv2", input_size=16)
    before = count(model, SHAPE)
    convert(model, "scc", groups=2, overlap=0.5)
    scc, depthwise = 0, 0
    for block in model.features:
        for layer in block.conv:
            if isinstance(layer, SlidingChannelConv2d):
                scc += 1
            elif isinstance(layer, nn.Conv2d):
                assert layer.groups == layer.in_channels and layer.kernel_size == (3, 3)
                depthwise += 1
    assert depthwise == 17 and scc == 2 * 17 - 1  # the first block (t = 1) has no expand conv
    assert type(model.head[0]) is nn.Conv2d and type(model.stem[0]) is nn.Conv2d
    after = count(model, SHAPE)
    assert after.macs < before.macs and after.params < before.params


def test_psconv_replaces_every_3x3_but_the_stem_and_counts_nonzero_macs():
    model = create("resnet20", input_size=16)
    convert(model, "psconv", pattern="psd4_p8")
    sparse = {p: m for p, m in model.named_modules() if isinstance(m, PeriodicSparseConv2d)}
    assert len(sparse) == 18 and "conv1" not in sparse
    assert sparse["layer2.0.conv1"].stride == 2 and sparse["layer2.0.conv1"].pattern == "psd4_p8"
    assert all(m.kernel_size == (1, 1) for p, m in model.named_modules() if type(m) is nn.Conv2d and p != "conv1")
    report = count(model, SHAPE)
    rows = {r.name: r for r in report.layers}
    for path, layer in sparse.items():
        nonzero = int((layer.dense_weight() != 0).sum())
        _, h, w = rows[path].output_shape
        assert rows[path].macs == nonzero * h * w
    layer = sparse["layer1.0.conv2"]
    assert layer.weight_nz.numel() == round(16 * 16 * 9 * (7 * 4 + 9) / (9 * 8))  # density ((P-1) n + 9) / 9P


def test_bad_groups_name_the_layer_and_leave_the_model_unchanged():
    model = create("resnet20", input_size=16)
    with pytest.raises(LeanconvError, match=r"layer1\.0\.conv2.*not divisible by groups=3"):
        convert(model, "scc", groups=3, overlap=0.5)
    assert all(type(b.conv2) is nn.Conv2d for b in _blocks(model))
    with pytest.raises(LeanconvError, match="overlap"):
        convert(model, "scc", groups=2, overlap=1.0)
    with pytest.raises(LeanconvError, match="pattern"):
        convert(model, "psconv", pattern="psd9_p3")


def test_unsupported_cases_raise_clear_errors():
    with pytest.raises(LeanconvError, match="nothing to convert to psconv"):
        convert(create("mobilenetv2", input_size=16), "psconv")
    model = convert(create("resnet20", input_size=16), "scc", groups=2)
    with pytest.raises(LeanconvError, match=r"layer1\.0\.conv2 is a Sequential"):
        convert(model, "scc", groups=2)
    with pytest.raises(LeanconvError, match="unknown conversion"):
        conversion_targets(model, "winograd")
    assert ConversionSpec("scc", 2, 0.33).name == "scc_g2_o0.33"


class _UserNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                                  nn.Conv2d(8, 16, 1), nn.Conv2d(16, 16, 5, stride=2, padding=2))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 2))

    def forward(self, x):
        return self.head(self.body(self.stem(x)))


def test_user_models_follow_the_generic_rules():
    assert conversion_targets(_UserNet(), "scc") == ["body.0", "body.4"]
    assert conversion_targets(_UserNet(), "psconv") == ["body.0"]
    net = convert(_UserNet(), "scc", groups=4, overlap=0.5)
    assert net.body[4][0].stride == (2, 2) and net.body[4][0].kernel_size == (5, 5)
    assert net(torch.randn(2, *SHAPE)).shape == (2, 2)
    net = convert(_UserNet(), "psconv", pattern="psd2_p8")
    assert isinstance(net.body[0], PeriodicSparseConv2d) and net.body[0].bias is not None


def test_cli_convert_then_train_from_the_checkpoint(cli, tmp_path, capsys):
    conv_dir, run_dir = tmp_path / "conv", tmp_path / "run"
    assert cli(["convert", "resnet20", "--to", "scc", "--groups", "2", "--overlap", "0.5", "--data", "synthetic",
                "--out", str(conv_dir)]) == 0
    printed = capsys.readouterr().out
    assert "before" in printed and "after" in printed and "converted 9 layers" in printed
    header = checkpoint.read_header(conv_dir / "model.safetensors")
    assert header["meta"]["input_shape"] == [3, 16, 16] and header["meta"]["dataset"]["name"].startswith("synthetic")
    converted = checkpoint.load(conv_dir / "model.safetensors")
    assert cli(["train", "--from", str(conv_dir / "model.safetensors"), "--data", "synthetic", "--epochs", "1",
                "--subset", "64", "--batch-size", "32", "--out", str(run_dir), "--no-progress"]) == 0
    trained = checkpoint.load(run_dir / "model.safetensors")
    assert isinstance(trained.layer1[0].conv2[1], SlidingChannelConv2d)
    assert not torch.equal(trained.layer1[0].conv2[1].weight, converted.layer1[0].conv2[1].weight)  # it trained
    test = load_dataset("synthetic").loader("test", 256)
    # train scored its in-memory model, whose weights training left channels_last; after the
    # NCHW output of a sliding-channel conv the next conv's kernel follows its weight's layout
    # (other rounding, so an argmax tie could flip): score the saved model in that layout
    as_trained = checkpoint.load(run_dir / "model.safetensors").to(memory_format=torch.channels_last)
    assert evaluate(as_trained, test)["accuracy"] == trained.leanconv_meta["test"]["accuracy"]
    x = torch.randn(4, *SHAPE)
    with torch.no_grad():
        assert torch.equal(trained(x), checkpoint.load(run_dir / "model.safetensors")(x))


def test_cli_convert_psconv_json_and_one_line_errors(cli, tmp_path, capsys):
    import json

    assert cli(["convert", "resnet20", "--to", "psconv", "--pattern", "psd1_p16", "--input-shape", "1,28,28",
                "--out", str(tmp_path / "p"), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["after"]["macs"] < 0.3 * record["before"]["macs"] and len(record["layers"]) == 18
    for argv, match in ((["--to", "scc"], "needs --groups"), (["--to", "scc", "--groups", "3"], "layer1.0.conv2"),
                        (["--to", "psconv", "--groups", "2"], "apply to --to scc only")):
        assert cli(["convert", "resnet20", *argv, "--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("leanconv: error:") and match in err[0]
    assert not (tmp_path / "bad").exists()
    assert cli(["convert", str(tmp_path / "p" / "model.safetensors"), "--to", "scc", "--groups", "2",
                "--input-shape", "1,28,28", "--out", str(tmp_path / "bad")]) == 2
    assert "zoo model names only" in capsys.readouterr().err
    assert cli(["convert", str(tmp_path / "p" / "model.safetensors"), "--to", "scc", "--groups", "2",
                "--data", "synthetic", "--out", str(tmp_path / "bad")]) == 2  # data to fine-tune on must fit
    assert "takes 1 input channels but synthetic" in capsys.readouterr().err


def test_results_of_the_unconverted_model_move_into_the_conversion_record():
    model = create("resnet20", input_size=16)
    model.leanconv_meta["test"] = {"accuracy": 91.5}
    convert(model, "psconv", pattern="ps4_p4")
    assert "test" not in model.leanconv_meta
    assert model.leanconv_meta["conversions"][-1]["before"] == {"test": {"accuracy": 91.5}}


def test_converting_a_zoo_name_records_the_command_that_repeats_it(cli, tmp_path, capsys):
    import json
    import shlex

    argv = ["convert", "resnet20", "--to", "scc", "--groups", "2", "--data", "synthetic", "--seed", "3"]
    assert cli([*argv, "--out", str(tmp_path / "a")]) == 0
    record = json.loads((tmp_path / "a" / "convert.json").read_text())
    assert record["source"] == "resnet20" and record["config"]["overlap"] == 0.5
    again = shlex.split(record["command"].replace(str(tmp_path / "a"), str(tmp_path / "b")))
    assert again[:3] == ["leanconv", "convert", "resnet20"] and cli(again[1:]) == 0
    a, b = (checkpoint.load(tmp_path / d / "model.safetensors").state_dict() for d in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)
