"""Issue 18, item 7: a CIFAR batch with zero rows, an unreachable prune target refused before
any work, and an ONNX check whose tolerance scales with the outputs.

(The non-UTF-8 checkpoint name, FIFOs and link loops of the same item are in
``test_hostile_headers.py``.)
"""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import leanconv
import leanconv.runs.prune as run_prune_module
from leanconv import checkpoint
from leanconv.cli.main import main
from leanconv.data import load_dataset
from leanconv.data.safe_pickle import load_array_pickle
from leanconv.deploy.onnx import export_onnx
from leanconv.errors import LeanconvError
from leanconv.width.budget import check_reachable

# ---------------------------------------------------------------- a CIFAR batch with zero rows


def _batch(rows: int, first_label: int) -> dict:
    data = (np.arange(rows * 3072, dtype=np.int64).reshape(rows, 3072) % 251).astype(np.uint8)
    return {b"batch_label": b"test", b"data": data, b"labels": [(first_label + i) % 10 for i in range(rows)],
            b"filenames": [b"x.png"] * rows}


def _cifar10(folder: Path, protocol: int, empty: str) -> Path:
    """A 5 + 1 batch CIFAR-10 folder of 8 images a batch, ``empty`` holding none."""
    folder.mkdir()
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        with open(folder / name, "wb") as handle:
            pickle.dump(_batch(0 if name == empty else 8, len(name)), handle, protocol=protocol)
    return folder


@pytest.mark.parametrize("protocol", [2, 4])  # 2: how the real files are written (empty bytes = bytes())
@pytest.mark.parametrize("empty", ["data_batch_3", "test_batch"])
def test_a_cifar_batch_with_zero_rows_holds_no_images(tmp_path, protocol, empty):
    folder = _cifar10(tmp_path / "cifar-10-batches-py", protocol, empty)
    with pytest.raises(LeanconvError) as err:
        load_dataset("cifar10", data_dir=folder)
    text = str(err.value)
    assert f"{folder / empty} holds no images" in text and "\n" not in text
    assert "refused" not in text and "untrusted" not in text  # an empty batch is not an attack


def test_the_cifar_folder_loads_when_no_batch_is_empty(tmp_path):
    data = load_dataset("cifar10", data_dir=_cifar10(tmp_path / "c", 2, empty="none"))
    assert len(data.train) + len(data.val) == 40 and len(data.test) == 8


def test_bytes_with_an_argument_is_still_refused(tmp_path):
    """Empty bytes are allowed; ``bytes(10**9)`` would allocate a gigabyte and is refused."""
    path = tmp_path / "big"
    path.write_bytes(b"\x80\x02c__builtin__\nbytes\nJ\x00\xca\x9a;\x85R.")  # bytes(1_000_000_000)
    with pytest.raises(LeanconvError, match="refused: the pickle asks for bytes"):
        load_array_pickle(path)
    path.write_bytes(b"\x80\x02c__builtin__\nbytes\n)R.")  # bytes()
    assert load_array_pickle(path) == b""


# ---------------------------------------------------------------- unreachable targets: before any work

SHAPE = (3, 16, 16)


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory):
    model = leanconv.create_model("resnet20", num_classes=4, input_size=16)
    model.leanconv_meta = {"input_shape": list(SHAPE), "num_classes": 4,
                           "dataset": {"name": "synthetic:n=64,n_test=16,s=16,k=4", "data_dir": None}}
    path = tmp_path_factory.mktemp("small") / "model.safetensors"
    checkpoint.save(model, path)
    return path


@pytest.fixture
def no_work(monkeypatch):
    """Make every piece of work a prune does after its checks fail the test: scoring (the
    criterion is built, but never called), measuring, evaluating and fine-tuning."""
    called = []

    def forbidden(name):
        def fail(*args, **kwargs):
            called.append(name)
            raise AssertionError(f"{name} ran before the target was refused")
        return fail

    make_criterion = run_prune_module.run_criterion
    monkeypatch.setattr(run_prune_module, "run_criterion",
                        lambda *args, **kwargs: _Never(make_criterion(*args, **kwargs), forbidden("the criterion")))
    for name in ("measure", "counted", "one_shot", "finetune"):
        monkeypatch.setattr(run_prune_module, name, forbidden(name))
    return called


class _Never:
    """A criterion that fails when asked for scores, and otherwise looks like ``real``."""

    def __init__(self, real, fail):
        self._real, self._fail = real, fail

    def __call__(self, *args, **kwargs):
        return self._fail()

    def __getattr__(self, name):
        return getattr(self._real, name)


@pytest.mark.parametrize("extra", [
    ["--method", "hap", "--target-flops", "1e-9"],
    ["--method", "hap", "--target-params", "1e-9", "--steps", "3"],
    ["--method", "taylor", "--target-flops", "1e-9", "--round-to", "8"],
    # reachable without implants (checked below), not with half the removed channels implanted
    ["--method", "hap", "--target-flops", "0.01", "--implant", "0.5"],
], ids=["flops", "params-steps", "taylor-round", "implant"])
def test_an_unreachable_target_is_refused_before_scoring(small_ckpt, tmp_path, capsys, no_work, extra):
    out = tmp_path / "out"
    code = main(["prune", str(small_ckpt), *extra, "--probes", "4", "--out", str(out), "--no-progress"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and "unreachable" in err[0] and "Traceback" not in err[0], err
    assert no_work == []  # nothing scored, measured, evaluated or fine-tuned
    assert not out.exists() or not any(out.iterdir())
    if "--implant" in extra:
        assert "--implant" in err[0]


def test_implants_raise_the_smallest_reachable_model(small_ckpt):
    """The implant case above is unreachable because of the implants alone."""
    model, x = checkpoint.load(small_ckpt), torch.randn(1, *SHAPE)
    check_reachable(model, x, target=0.01)
    with pytest.raises(LeanconvError, match="unreachable.*--implant"):
        check_reachable(model, x, target=0.01, implant=0.5)


def test_a_reachable_implant_target_still_prunes(small_ckpt, tmp_path, capsys):
    out = tmp_path / "ok"
    assert main(["prune", str(small_ckpt), "--method", "l1", "--target-flops", "0.5", "--implant", "0.5",
                 "--repeats", "1", "--out", str(out), "--no-progress", "--batch-size", "16"]) == 0
    capsys.readouterr()
    assert abs(json.loads((out / "record.json").read_text())["achieved"]["macs"] - 0.5) <= 0.02 * 0.5


# ---------------------------------------------------------------- ONNX check relative to the outputs


class _Net(nn.Module):
    """Conv, BatchNorm, ReLU, pool and a linear head whose logits are ``scale`` times larger
    than usual; with ``drift`` the exported graph multiplies them by ``1 + drift``."""

    def __init__(self, scale: float, drift: float = 0.0) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                      nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                      nn.Flatten())
        self.fc = nn.Linear(32, 10)
        with torch.no_grad():
            self.fc.weight.mul_(scale)
            self.fc.bias.mul_(scale)
        self.drift = drift

    def forward(self, x):
        y = self.fc(self.features(x))
        if self.drift and (torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()):
            y = y * (1 + self.drift)
        return y


def _largest_logit(model: nn.Module) -> float:
    with torch.no_grad():
        return float(model.eval()(torch.randn(3, *SHAPE)).abs().max())


@pytest.mark.parametrize("scale", [1e5, 1e7])
def test_a_correct_export_of_large_logits_is_accepted(tmp_path, scale):
    import onnxruntime as ort

    torch.manual_seed(0)
    model = _Net(scale)
    assert _largest_logit(model) >= 1e4
    path = tmp_path / "big.onnx"
    result = export_onnx(model, SHAPE, path, latency=False)
    assert result["output_scale"] >= 1e4 and result["limit"] == pytest.approx(1e-4 * result["output_scale"])
    assert result["max_abs_diff"] <= result["limit"]
    # independently: the file agrees with the model in float64 to what float32 allows
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(5, *SHAPE)
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0].astype(np.float64)
    with torch.no_grad():
        want = model.double().eval()(x.double()).numpy()
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


@pytest.mark.parametrize("scale", [10.0, 1e5])
def test_an_export_wrong_by_a_thousandth_is_refused_at_any_scale(tmp_path, scale):
    torch.manual_seed(0)
    path = tmp_path / "wrong.onnx"
    path.write_bytes(b"previous")
    with pytest.raises(LeanconvError, match=r"differs from PyTorch by .* \(max abs\) > 0\.0001 x") as err:
        export_onnx(_Net(scale, drift=1e-3), SHAPE, path, latency=False)
    assert "\n" not in str(err.value) and "was not written" in str(err.value)
    assert path.read_bytes() == b"previous"


def test_a_runtime_that_returns_garbage_is_refused(tmp_path, monkeypatch):
    """ONNX Runtime's outputs replaced by the right ones plus 1% of their largest value."""
    import onnxruntime as ort

    run = ort.InferenceSession.run

    def wrong(self, names, feed, *args, **kwargs):
        outputs = run(self, names, feed, *args, **kwargs)
        return [o + 0.01 * np.abs(o).max() for o in outputs]

    monkeypatch.setattr(ort.InferenceSession, "run", wrong)
    torch.manual_seed(0)
    with pytest.raises(LeanconvError, match="differs from PyTorch"):
        export_onnx(_Net(1e5), SHAPE, tmp_path / "x.onnx", latency=False)
    assert not (tmp_path / "x.onnx").exists()
