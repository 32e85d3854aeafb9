"""ONNX export: every kind of leanconv model matches PyTorch within 1e-4 in onnxruntime,
with a dynamic batch axis; a mismatch is refused and leaves no file."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from leanconv import layers
from leanconv.cli import main as cli_main
from leanconv.cost import count
from leanconv.errors import LeanconvError
from leanconv.deploy.onnx import export_onnx
from leanconv.importance import create_criterion
from leanconv.layers.implant import ImplantConv2d
from leanconv.models import create
from leanconv.width import prune_to_budget

SHAPE = (3, 16, 16)


def _ort_vs_torch(path, model, batch=5):
    """Independent re-check: run the file at another batch size and compare with PyTorch."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(batch, *SHAPE)
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.inference_mode():
        want = model.eval()(x).numpy()
    assert got.shape == want.shape
    return float(np.abs(got - want).max())


def _onnx_weight_count(path):
    return sum(int(np.prod(t.dims)) for t in onnx.load(str(path)).graph.initializer)


def _randomize_bn(model):
    """Non-trivial BN statistics so that a wrong export shows up as a large difference."""
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model


def test_pruned_resnet20_exports_smaller_and_matches(tmp_path):
    model = _randomize_bn(create("resnet20", input_size=16))
    params_before = count(model, SHAPE).params
    prune_to_budget(model, create_criterion("l1"), torch.randn(2, *SHAPE), target=0.5)
    model.train()
    result = export_onnx(model, SHAPE, tmp_path / "pruned.onnx", latency=False)
    assert model.training  # the caller's model is left as it was
    assert result["max_abs_diff"] <= 1e-4 and result["check_batch"] == 3
    assert result["exporter"] == "dynamo" and result["opset"] >= 18 and result["latency_ms"] == {}
    assert _ort_vs_torch(tmp_path / "pruned.onnx", model) <= 1e-4
    assert _onnx_weight_count(tmp_path / "pruned.onnx") < 0.75 * params_before  # physically smaller


def test_implanted_model_exports_and_matches(tmp_path):
    model = _randomize_bn(create("resnet20", input_size=16))
    prune_to_budget(model, create_criterion("l1"), torch.randn(2, *SHAPE), target=0.5, implant=0.2)
    implants = [m for m in model.modules() if isinstance(m, ImplantConv2d)]
    assert implants
    with torch.no_grad():  # implants start at zero; give them weights so that the check sees them
        for m in implants:
            m.implant.weight.normal_(0, 0.1)
    result = export_onnx(model, SHAPE, tmp_path / "implant.onnx", latency=False)
    assert result["max_abs_diff"] <= 1e-4
    assert _ort_vs_torch(tmp_path / "implant.onnx", model) <= 1e-4


def _new_layer_net():
    """Conv stem, two SCC layers (stride 1 and 2) and two pSConv layers (stride 1 and 2)."""
    scc, psconv = layers.SlidingChannelConv2d, layers.PeriodicSparseConv2d
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        scc(16, 32, groups=4, overlap=0.75), nn.ReLU(), scc(32, 32, groups=2, overlap=0.5, stride=2), nn.ReLU(),
        psconv(32, 24, pattern="psd4_p8", padding=1), nn.ReLU(),
        psconv(24, 24, pattern="psd1_p16", stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 10))


def test_sliding_channel_and_periodic_sparse_layers_export(tmp_path):
    if not (hasattr(layers, "SlidingChannelConv2d") and hasattr(layers, "PeriodicSparseConv2d")):
        pytest.skip("leanconv.layers lacks SlidingChannelConv2d or PeriodicSparseConv2d")
    model = _new_layer_net()
    with torch.inference_mode():  # the eager model really runs the compiled sparse kernels
        eager = model.eval()(torch.randn(2, *SHAPE))
    assert eager.shape == (2, 10)
    result = export_onnx(model, SHAPE, tmp_path / "layers.onnx", latency=True, batch_sizes=(1, 4), repeats=2,
                         warmup=1)
    assert result["max_abs_diff"] <= 1e-4
    assert _ort_vs_torch(tmp_path / "layers.onnx", model) <= 1e-4
    assert set(result["latency_ms"]) == {"batch1", "batch4"}  # one file serves both batch sizes
    assert result["latency_ms"]["batch4"]["backend"] == "onnxruntime"
    assert all(s["median_ms"] > 0 for s in result["latency_ms"].values())


def test_old_opset_uses_torchscript_exporter(tmp_path):
    model = _randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)))
    result = export_onnx(model, SHAPE, tmp_path / "old.onnx", opset=17, latency=False)
    assert (result["opset"], result["exporter"]) == (17, "torchscript")
    assert result["max_abs_diff"] <= 1e-4
    dim = onnx.load(str(tmp_path / "old.onnx")).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim.dim_param and not dim.dim_value  # symbolic batch axis


class _ExportDrifts(nn.Module):
    """Adds 1e-3 only while being exported: the check must catch it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        if torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling():
            y = y + 1e-3
        return y


def test_mismatch_is_refused_and_leaves_the_old_file(tmp_path):
    path = tmp_path / "drift.onnx"
    path.write_bytes(b"previous")
    with pytest.raises(LeanconvError, match=r"differs from PyTorch by 0\.001 \(max abs\) > 0\.0001") as info:
        export_onnx(_ExportDrifts(), SHAPE, path, latency=False)
    assert "\n" not in str(info.value)
    assert path.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["drift.onnx"]  # no temporary left behind


def test_bad_arguments_are_one_line_errors(tmp_path):
    model = nn.Conv2d(3, 4, 3)
    with pytest.raises(LeanconvError, match="opset 3 is out of range"):
        export_onnx(model, SHAPE, tmp_path / "x.onnx", opset=3)
    with pytest.raises(LeanconvError, match="must be positive integers"):
        export_onnx(model, (3, 0, 16), tmp_path / "x.onnx")
    with pytest.raises(LeanconvError, match=r"failed on an input of shape \(5, 16, 16\).*check the input shape"):
        export_onnx(model, (5, 16, 16), tmp_path / "x.onnx")  # wrong channel count: caught before exporting
    assert not (tmp_path / "x.onnx").exists()


def test_cli_export_trained_zoo_model(trained_ckpt, tmp_path, capsys, monkeypatch):
    if "export" not in cli_main.SUBCOMMANDS:
        monkeypatch.setattr(cli_main, "SUBCOMMANDS", [*cli_main.SUBCOMMANDS, "export"])
    out = tmp_path / "model.onnx"
    assert cli_main.main(["export", str(trained_ckpt), "--onnx", str(out), "--repeats", "2"]) == 0
    text = capsys.readouterr().out
    diff = float(text.split("max abs diff vs PyTorch: ")[1].split()[0])
    assert 0 <= diff <= 1e-4
    assert "ONNX Runtime latency batch 1:" in text and "ONNX Runtime latency batch 64:" in text
    from leanconv import checkpoint
    assert _ort_vs_torch(out, checkpoint.load(trained_ckpt), batch=2) <= 1e-4
    assert cli_main.main(["export", str(trained_ckpt), "--onnx", str(out), "--opset", "99"]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
