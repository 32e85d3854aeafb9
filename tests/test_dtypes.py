"""float64 and float16 checkpoints written by leanconv itself (issue 18, item 4).

A float64 model reloads as float64 and stays float64 through ``eval``, ``fold``, ``prune``,
``train --from``, ``profile`` and the library's ``prune``: the data loaders' float32 batches
follow the model's dtype. ``export`` writes a float32 ONNX file checked against the model.
A float16 model is evaluated, profiled, folded (in float32, stored back as float16) and
exported; training, scoring and pruning refuse it in one line (exit status 2) and write nothing.

Tolerances: a float64 result recomputed in float64 agrees to ~1e-15 relative, so ``1e-10``
tells float64 work from float32 work (~1e-7) with a wide margin either way.
"""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch import nn

import leanconv
from leanconv import checkpoint
from leanconv.cli.main import main
from leanconv.cost import count
from leanconv.data import load_dataset
from leanconv.errors import LeanconvError

DATA = "synthetic:n=96,n_test=32,s=16,k=4"
SHAPE = (3, 16, 16)
FAST = ["--batch-size", "16", "--no-progress"]


def _model(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    model = leanconv.create_model("resnet20", num_classes=4, input_size=16)
    with torch.no_grad():  # BatchNorm statistics that are not the identity, so a fold has work to do
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    model = model.to(dtype)
    model.leanconv_meta = {"input_shape": list(SHAPE), "num_classes": 4, "dataset": {"name": DATA, "data_dir": None}}
    return model


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dtypes")
    paths = {}
    for dtype in (torch.float64, torch.float16):
        paths[dtype] = folder / f"{str(dtype).removeprefix('torch.')}.safetensors"
        checkpoint.save(_model(dtype), paths[dtype])
    return paths


def _file_dtypes(path) -> set[str]:
    """The dtypes of the floating-point tensors stored in a safetensors file."""
    with safe_open(str(path), "pt") as f:
        names = f.keys()  # a safetensors handle has keys() but cannot be iterated
        return {str(f.get_slice(k).get_dtype()) for k in names} - {"I64", "I32", "BOOL", "U8"}


def _float_dtypes(model: nn.Module) -> set[torch.dtype]:
    return {t.dtype for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()}


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x.to(next(model.parameters()).dtype))


def _one_line_refusal(capsys, code: int, *words: str) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and err[0].startswith("leanconv: error:"), (code, err)
    assert "Traceback" not in err[0] and all(w in err[0] for w in words), err
    return err[0]


# ---------------------------------------------------------------- float64, end to end


def test_float64_checkpoint_reloads_as_float64(ckpts):
    model = checkpoint.load(ckpts[torch.float64])
    assert _float_dtypes(model) == {torch.float64}
    x = torch.randn(2, *SHAPE, dtype=torch.float64)
    torch.testing.assert_close(_logits(model, x), _logits(_model(torch.float64), x), rtol=0, atol=0)


def test_eval_float64_computes_in_float64(ckpts, capsys):
    assert main(["eval", str(ckpts[torch.float64]), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    model = checkpoint.load(ckpts[torch.float64]).eval()
    losses, correct, n = [], 0, 0
    with torch.no_grad():  # the same test split, in float64 from the float32 batches
        for x, y in load_dataset(DATA).loader("test", 128).epoch(0):
            out = model(x.double())
            assert out.dtype == torch.float64
            losses.append(nn.functional.cross_entropy(out, y, reduction="sum"))
            correct, n = correct + int((out.argmax(1) == y).sum()), n + len(y)
    assert got["n"] == n and got["accuracy"] == pytest.approx(100 * correct / n, abs=1e-9)
    assert got["loss"] == pytest.approx(float(sum(losses)) / n, rel=1e-10)


def test_fold_float64_writes_float64_that_matches(ckpts, tmp_path, capsys):
    out = tmp_path / "folded.safetensors"
    assert main(["fold", str(ckpts[torch.float64]), "--out", str(out), "--no-latency"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["folded"] and summary["max_rel_diff"] <= 1e-10  # checked in float64, not float32
    assert _file_dtypes(out) == {"F64"}
    folded, original = checkpoint.load(out), checkpoint.load(ckpts[torch.float64])
    assert _float_dtypes(folded) == {torch.float64}
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(4, *SHAPE, dtype=torch.float64)
    want = _logits(original, x)
    assert float((_logits(folded, x) - want).abs().max() / want.abs().max()) <= 1e-10


@pytest.mark.parametrize("method", ["l1", "hap"])
def test_prune_float64_writes_a_smaller_float64_model(ckpts, tmp_path, capsys, method):
    out = tmp_path / method
    extra = ["--probes", "4", "--score-images", "32"] if method == "hap" else []
    assert main(["prune", str(ckpts[torch.float64]), "--method", method, "--target-flops", "0.5",
                 "--finetune-epochs", "1", "--repeats", "1", "--out", str(out), *FAST, *extra]) == 0
    capsys.readouterr()
    assert _file_dtypes(out / "model.safetensors") == {"F64"}
    base, pruned = checkpoint.load(ckpts[torch.float64]), checkpoint.load(out / "model.safetensors")
    assert _float_dtypes(pruned) == {torch.float64}
    assert abs(count(pruned, SHAPE).macs / count(base, SHAPE).macs - 0.5) <= 0.02 * 0.5
    record = json.loads((out / "record.json").read_text())
    assert 0 <= record["after"]["test_accuracy"] <= 100
    assert torch.isfinite(_logits(pruned, torch.randn(2, *SHAPE))).all()


def test_train_from_float64_trains_in_float64(ckpts, tmp_path, capsys):
    out = tmp_path / "train"
    assert main(["train", "--from", str(ckpts[torch.float64]), "--epochs", "1", "--lr", "0.01",
                 "--out", str(out), *FAST]) == 0
    capsys.readouterr()
    assert _file_dtypes(out / "model.safetensors") == {"F64"}
    trained, start = checkpoint.load(out / "model.safetensors"), checkpoint.load(ckpts[torch.float64])
    assert _float_dtypes(trained) == {torch.float64}
    moved = [float((a - b).detach().abs().max()) for a, b in zip(trained.parameters(), start.parameters())]
    assert max(moved) > 0 and all(np.isfinite(moved))  # one epoch of SGD changed the weights


@pytest.mark.parametrize("dtype,bytes_per_value", [(torch.float64, 8), (torch.float16, 2)])
def test_profile_counts_the_same_and_sizes_memory_by_dtype(ckpts, capsys, dtype, bytes_per_value):
    assert main(["profile", str(ckpts[dtype]), "--no-latency", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    reference = count(_model(torch.float32), SHAPE)
    assert (got["params"], got["macs"]) == (reference.params, reference.macs)
    assert got["activation_memory_bytes"]["input"] == bytes_per_value * int(np.prod(SHAPE))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_export_writes_a_checked_float32_onnx(ckpts, tmp_path, capsys, dtype):
    import onnxruntime as ort

    out = tmp_path / "model.onnx"
    assert main(["export", str(ckpts[dtype]), "--onnx", str(out), "--no-latency", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["max_abs_diff"] <= 1e-4 * max(1.0, result["output_scale"])
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = torch.randn(3, *SHAPE)
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert got.dtype == np.float32
    # against the model in float64: only float32's rounding (and float16's own, whose weights
    # convert to float32 exactly) separates them
    want = _logits(checkpoint.load(ckpts[dtype]).double(), x.double()).numpy()
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())


def test_library_prune_keeps_float64():
    model = _model(torch.float64)
    x = torch.randn(1, *SHAPE, dtype=torch.float64)
    batches = [(images, labels) for images, labels in load_dataset(DATA).loader("val", 16).epoch(0)]
    for method, data in (("l1", None), ("hap", batches)):
        pruned = leanconv.prune(model, x, data=data, method=method, target_macs=0.5, probes=4, score_images=32)
        assert _float_dtypes(pruned) == {torch.float64}
        assert abs(count(pruned, SHAPE).macs / count(model, SHAPE).macs - 0.5) <= 0.02 * 0.5
        assert _logits(pruned, x).dtype == torch.float64
    assert _float_dtypes(model) == {torch.float64}  # the caller's model is untouched


# ---------------------------------------------------------------- float16


def test_eval_and_fold_float16(ckpts, tmp_path, capsys):
    assert main(["eval", str(ckpts[torch.float16]), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["n"] == 32 and np.isfinite(got["loss"])
    out = tmp_path / "folded16.safetensors"
    assert main(["fold", str(ckpts[torch.float16]), "--out", str(out), "--no-latency"]) == 0
    capsys.readouterr()
    assert _file_dtypes(out) == {"F16"}
    folded = checkpoint.load(out)
    assert _float_dtypes(folded) == {torch.float16}
    x = torch.randn(4, *SHAPE)
    want = _logits(checkpoint.load(ckpts[torch.float16]).float(), x)
    # storing the folded weights in float16 rounds them by up to 2**-11 relative each
    assert float((_logits(folded.float(), x) - want).abs().max() / want.abs().max()) <= 2e-2


@pytest.mark.parametrize("argv", [
    ["train", "--from", "{ckpt}", "--epochs", "1", "--out", "{out}", *FAST],
    ["prune", "{ckpt}", "--method", "l1", "--target-flops", "0.5", "--out", "{out}", *FAST],
    ["prune", "{ckpt}", "--method", "hap", "--target-flops", "0.5", "--probes", "4", "--out", "{out}", *FAST],
    ["sensitivity", "{ckpt}", "--probes", "4", "--images", "32", "--out", "{out}", "--no-progress"],
], ids=["train", "prune-l1", "prune-hap", "sensitivity"])
def test_float16_is_refused_for_training_and_scoring(ckpts, tmp_path, capsys, argv):
    out = tmp_path / "out"
    code = main([a.format(ckpt=ckpts[torch.float16], out=out) for a in argv])
    _one_line_refusal(capsys, code, "float16", str(ckpts[torch.float16]))
    assert not out.exists() or not any(out.iterdir())


def test_library_refuses_float16_for_pruning_and_finetuning():
    model = _model(torch.float16)
    x = torch.randn(1, *SHAPE)
    with pytest.raises(LeanconvError, match="float16") as err:
        leanconv.prune(model, x, method="l1", target_macs=0.5)
    assert "\n" not in str(err.value)
    batches = [(torch.randn(8, *SHAPE), torch.randint(0, 4, (8,)))]
    with pytest.raises(LeanconvError, match="float16"):
        leanconv.finetune(model, batches, epochs=1)
