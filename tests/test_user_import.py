"""A user's class in a file of their own + a state dict -> leanconv import -> prune -> export,
from the CLI alone, on a folder of PNG files; and the one-call Python API on a DataLoader."""

from __future__ import annotations

import json
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from leanconv import checkpoint
from leanconv.cli.main import main

USER_MODULE = '''
import torch
from torch import nn


class MyNet(nn.Module):
    def __init__(self, classes=3, width=16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                                   nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, classes))

    def forward(self, x):
        x = self.stem(x)
        return self.head(torch.relu(x + self.block(x)))
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "mynet_models.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(folder))
    sys.modules.pop("mynet_models", None)
    import mynet_models

    return mynet_models


def _pngs(root: Path, classes=("a", "b", "c"), per_class=20) -> Path:
    rng = np.random.RandomState(0)
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.clip(rng.normal(60 + 60 * k, 30, (18, 18, 3)), 0, 255).astype(np.uint8)).save(
                root / name / f"{i}.png")
    return root


def _one_line(capsys, code, match):
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("leanconv: error:") and match in err[0], err


def test_import_prune_export_from_the_cli_on_png_files(user_module, tmp_path, capsys):
    torch.manual_seed(0)
    trained = user_module.MyNet()
    torch.save(trained.state_dict(), tmp_path / "weights.pt")
    pngs = _pngs(tmp_path / "pets")
    ctor = "mynet_models:MyNet"
    ckpt = tmp_path / "mynet.safetensors"
    assert main(["import", "--constructor", ctor, "--weights", str(tmp_path / "weights.pt"), "--input-shape", "3,16,16",
                 "--data", f"imagefolder:{pngs}", "--out", str(ckpt)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["num_classes"] == 3 and summary["tensors"] == len(trained.state_dict())
    imported = checkpoint.load(ckpt, constructor=ctor)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(imported.eval()(x), trained.eval()(x), rtol=0, atol=0)  # the same weights
    assert main(["prune", str(ckpt), "--constructor", ctor, "--method", "l1", "--target-flops", "0.5",
                 "--finetune-epochs", "1", "--score-images", "16", "--repeats", "1", "--out", str(tmp_path / "p"),
                 "--no-progress"]) == 0
    record = json.loads((tmp_path / "p" / "record.json").read_text())
    assert abs(record["achieved"]["macs"] - 0.5) <= 0.01 and record["before"]["test_accuracy"] >= 0
    assert main(["export", str(tmp_path / "p" / "model.safetensors"), "--constructor", ctor,
                 "--onnx", str(tmp_path / "p.onnx"), "--no-latency"]) == 0
    assert (tmp_path / "p.onnx").stat().st_size > 1000


def test_import_takes_safetensors_and_unwraps_training_checkpoints(user_module, tmp_path, capsys):
    torch.manual_seed(1)
    net = user_module.MyNet(classes=5, width=8)
    save_file(net.state_dict(), str(tmp_path / "w.safetensors"))
    wrapped = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}
    torch.save(wrapped, tmp_path / "w.pth")
    for weights in ("w.safetensors", "w.pth"):
        out = tmp_path / f"{weights}.safetensors"
        assert main(["import", "--constructor", "mynet_models:MyNet", "--arg", "classes=5", "--arg", "width=8",
                     "--weights", str(tmp_path / weights), "--input-shape", "3,12,12", "--out", str(out)]) == 0
        capsys.readouterr()
        header = checkpoint.read_header(out)
        assert header["base"] == {"constructor": "mynet_models:MyNet", "kwargs": {"classes": 5, "width": 8}}
        assert header["meta"]["num_classes"] == 5 and header["meta"]["input_shape"] == [3, 12, 12]


class _Payload:
    def __reduce__(self):
        return (print, ("a pickle ran code",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("setup, argv, match", [
    (lambda d, m: torch.save({"w": _Payload()}, d / "x.pt"), ["--weights", "x.pt"], "a full pickle"),
    (lambda d, m: (d / "x.pt").write_bytes(pickle.dumps({"a": 1})), ["--weights", "x.pt"], "a full pickle"),
    (lambda d, m: torch.save(m.MyNet(width=8).state_dict(), d / "x.pt"), ["--weights", "x.pt"],
     "do not fit the model: shape of stem.0.weight [8, 3, 3, 3] in the file, [16, 3, 3, 3] in the model"),
    (lambda d, m: torch.save({"stem.0.weight": torch.zeros(1)}, d / "x.pt"), ["--weights", "x.pt"], "missing"),
    (lambda d, m: (d / "x.pt").write_bytes(b"garbage"), ["--weights", "x.pt"], "is not a PyTorch weights file"),
    (lambda d, m: None, ["--weights", "nothing.pt"], "does not exist"),
    (lambda d, m: torch.save(m.MyNet().state_dict(), d / "x.pt"), ["--weights", "x.pt", "--num-classes", "7"],
     "--num-classes 7 disagrees with the model, which outputs 3"),
])
def test_bad_imports_are_one_line_and_write_nothing(user_module, tmp_path, capsys, setup, argv, match):
    setup(tmp_path, user_module)
    argv = [a if not a.endswith(".pt") else str(tmp_path / a) for a in argv]
    code = main(["import", "--constructor", "mynet_models:MyNet", *argv, "--input-shape", "3,16,16",
                 "--out", str(tmp_path / "out.safetensors")])
    _one_line(capsys, code, match)
    assert not (tmp_path / "out.safetensors").exists()


def test_a_constructor_works_where_a_zoo_name_does(user_module, tmp_path, capsys):
    assert main(["train", "--model", "mynet_models:MyNet", "--data", "synthetic:k=3", "--epochs", "1",
                 "--out", str(tmp_path / "t"), "--no-progress"]) == 0
    assert checkpoint.read_header(tmp_path / "t" / "model.safetensors")["base"]["constructor"] == "mynet_models:MyNet"
    capsys.readouterr()
    assert main(["profile", "mynet_models:MyNet", "--input-shape", "3,16,16", "--no-latency", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["macs"] > 0


def test_input_shape_for_a_checkpoint_that_records_none(user_module, tmp_path, capsys):
    model = user_module.MyNet(classes=4)
    model.leanconv_meta = {"dataset": {"name": "synthetic"}}
    checkpoint.save(model, tmp_path / "bare.safetensors", constructor="mynet_models:MyNet",
                    constructor_kwargs={"classes": 4})
    argv = ["prune", str(tmp_path / "bare.safetensors"), "--constructor", "mynet_models:MyNet", "--method", "l1",
            "--target-flops", "0.5", "--repeats", "1", "--no-progress"]
    _one_line(capsys, main([*argv, "--out", str(tmp_path / "a")]), "records no input shape; pass --input-shape")
    assert main([*argv, "--input-shape", "3,16,16", "--out", str(tmp_path / "b")]) == 0
    record = json.loads((tmp_path / "b" / "record.json").read_text())
    assert "--input-shape 3,16,16" in record["command"]


README_EXAMPLE = re.compile(r"## Python API\n.*?```python\n(.*?)```", re.S)


def test_the_readme_python_example_runs_as_written(tmp_path):
    """The README's complete example, pasted into a file and run as a script in a fresh process."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = README_EXAMPLE.search(readme).group(1)
    (tmp_path / "example.py").write_text(code)
    done = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "MACs" in done.stdout and (tmp_path / "tiny_pruned.safetensors").is_file()


def _loader(n=96, side=16, classes=3, seed=0):
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(torch.randn(n, 3, side, side, generator=g), torch.randint(0, classes, (n,), generator=g)),
                      batch_size=32)


def test_the_one_call_api_on_a_plain_module_and_a_dataloader(user_module):
    import leanconv

    model, example = user_module.MyNet(), torch.randn(1, 3, 16, 16)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    small = leanconv.prune(model, example, method="l1", target_macs=0.5)  # data-free: no data needed
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # the model given is unchanged
    assert abs(small.leanconv_record["achieved"]["macs"] - 0.5) <= 0.02 * 0.5
    tested = leanconv.prune(model, example, data=_loader(), test_data=_loader(seed=1), method="taylor",
                            target_macs=0.5, finetune_epochs=1, score_images=32)
    assert tested.leanconv_record["after"]["test_accuracy"] >= 0 and tested.leanconv_record["speedup_batch64"] > 0
    converted = leanconv.convert(model, example, to="psconv", data=_loader(), finetune_epochs=1)
    assert leanconv.profile(converted, example, latency=False)["macs"] < leanconv.profile(model, (3, 16, 16),
                                                                                            latency=False)["macs"]
    before = small.head[-1].weight.clone()
    assert leanconv.finetune(small, _loader(), epochs=1, lr=0.05) is small
    assert not torch.equal(small.head[-1].weight, before)


@pytest.mark.parametrize("call, match", [
    (lambda lc, m, x: lc.prune(m, x, method="hap", target_macs=0.5), "method hap needs data"),
    (lambda lc, m, x: lc.prune(m, x, method="l1"), "give one budget"),
    (lambda lc, m, x: lc.prune(m, x, method="l1", target_macs=0.5, probes=1), "--probes must be at least 2"),
    (lambda lc, m, x: lc.prune(m, x, method="l1", target_macs=0.5, speed="max"), "has no setting speed"),
    (lambda lc, m, x: lc.prune(m, torch.randn(3, 16, 16), method="l1", target_macs=0.5), "example_input must be"),
    (lambda lc, m, x: lc.prune(m, x, data=[(torch.randn(4, 3, 16, 16), torch.rand(4))], method="taylor",
                               target_macs=0.5), "of one integer class index per image"),
    (lambda lc, m, x: lc.convert(m, x, to="scc"), "--to scc needs --groups"),
])
def test_bad_python_calls_are_one_clear_error(user_module, call, match):
    import leanconv

    with pytest.raises(leanconv.LeanconvError, match=match):
        call(leanconv, user_module.MyNet(), torch.randn(1, 3, 16, 16))


def test_a_constructor_that_does_not_build_is_one_line(user_module, tmp_path, capsys):
    torch.save(user_module.MyNet().state_dict(), tmp_path / "w.pt")
    for ctor, match in (("mynet_models:Nope", "Nope"), ("no_such_module_x:Net", "no_such_module_x")):
        code = main(["import", "--constructor", ctor, "--weights", str(tmp_path / "w.pt"), "--input-shape", "3,16,16",
                     "--out", str(tmp_path / "o.safetensors")])
        _one_line(capsys, code, match)
    code = main(["import", "--constructor", "mynet_models:MyNet", "--arg", "classes=-3", "--weights",
                 str(tmp_path / "w.pt"), "--input-shape", "3,16,16", "--out", str(tmp_path / "o.safetensors")])
    _one_line(capsys, code, "failed with {'classes': -3}")
    assert not (tmp_path / "o.safetensors").exists()


def test_explore_takes_your_own_model(user_module, tmp_path, capsys):
    assert main(["explore", "--model", "mynet_models:MyNet", "--data", "synthetic:k=3", "--psconv-patterns", "psd4_p8",
                 "--include-dense", "--epochs", "1", "--train-subset", "64", "--batch-size", "32", "--repeats", "1",
                 "--out", str(tmp_path / "e"), "--no-progress"]) == 0
    summary = json.loads((tmp_path / "e" / "explore.json").read_text())
    assert {r["variant"] for r in summary["records"]} == {"dense", "psconv_psd4_p8"}


class _Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        for _ in range(64):
            yield torch.randn(3, 16, 16, generator=g), int(torch.randint(0, 3, (1,), generator=g))


def test_python_data_edge_cases(user_module, tmp_path):
    import leanconv
    from torch.utils.data import DataLoader

    model, x = user_module.MyNet(), torch.randn(1, 3, 16, 16)
    assert leanconv.finetune(model, DataLoader(_Stream(), batch_size=16), epochs=1) is model  # no len()
    bad = [(torch.randn(8, 3, 16, 16), torch.full((8,), 5))]
    with pytest.raises(leanconv.LeanconvError, match=r"labels must lie in \[0, 3\) for the model's 3 outputs"):
        leanconv.finetune(model, bad, epochs=1)
    with pytest.raises(leanconv.LeanconvError, match=r"test_data: labels must lie in \[0, 3\)"):
        leanconv.prune(model, x, method="l1", target_macs=0.5, data=_loader(), test_data=bad)
    with pytest.raises(leanconv.LeanconvError, match="a generator or iterator can be read only once"):
        leanconv.prune(model, x, method="taylor", target_macs=0.5, data=(b for b in _loader()))
    with pytest.raises(leanconv.LeanconvError, match="give one budget"):
        leanconv.prune(model, x, method="l1", target_macs=0.5, kind="params")
    with pytest.raises(leanconv.LeanconvError, match="is a folder"):
        leanconv.save(model, tmp_path)
    wide = user_module.MyNet().double()
    small = leanconv.prune(wide, x.double(), method="l1", target_macs=0.5)  # float64 end to end
    assert next(small.parameters()).dtype == torch.float64


def test_a_checkpoint_source_takes_the_constructor_itself(user_module, tmp_path):
    import leanconv

    model = user_module.MyNet()
    model.leanconv_meta = {"input_shape": [3, 16, 16], "num_classes": 3, "dataset": {"name": "synthetic:k=3"}}
    leanconv.save(model, tmp_path / "m.safetensors")  # its own class, no arguments
    with pytest.raises(leanconv.LeanconvError, match="was built from the user constructor 'mynet_models:MyNet'"):
        leanconv.Source.from_checkpoint(tmp_path / "m.safetensors")
    source = leanconv.Source.from_checkpoint(tmp_path / "m.safetensors", constructor=user_module.MyNet)
    result = leanconv.PruneConfig(method="l1", target=0.5, latency_repeats=1).run(source, out=tmp_path / "p")
    assert "--constructor mynet_models:MyNet" in result.record.command
    result.save(tmp_path / "p")
    with pytest.raises(leanconv.LeanconvError, match="the constructor given .* does not build the model"):
        leanconv.load(tmp_path / "p" / "model.safetensors", constructor=lambda: nn.Sequential(nn.Conv2d(3, 4, 3)))


def test_constructor_arguments_and_classes_from_the_cli(user_module, tmp_path, capsys):
    assert main(["profile", "mynet_models:MyNet", "--arg", "width=8", "--input-shape", "3,16,16", "--no-latency",
                 "--json"]) == 0
    layers = json.loads(capsys.readouterr().out)["layers"]
    assert layers[-1]["output_shape"] == [3]  # the class's own 3 classes, not a default of 10
    (tmp_path / "few").mkdir()
    code = main(["train", "--model", "mynet_models:MyNet", "--data", "synthetic:n=20,k=3", "--batch-size", "64",
                 "--epochs", "1", "--out", str(tmp_path / "few" / "run")])
    _one_line(capsys, code, "less than one full batch")
    assert not (tmp_path / "few" / "run").exists()  # a refused run writes nothing
