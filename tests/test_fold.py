"""BatchNorm folding (the deployment form): same function, fewer layers, only safe pairs fold."""

import json

import pytest
import torch
from torch import nn

from leanconv import checkpoint
from leanconv.cost import count, measure_latency
from leanconv.errors import LeanconvError
from leanconv.deploy.fold import fold, fold_batchnorm, foldable_pairs
from leanconv.models import create, names


def _randomise_bn(model: nn.Module) -> nn.Module:
    """Non-trivial running statistics and affine terms, so a wrong fold cannot pass."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            if m.affine:  # negative scales too: a fold that takes |gamma| must fail
                m.weight.data.uniform_(-1.5, 1.5)
                m.bias.data.uniform_(-1, 1)
    return model.eval()


def _bns(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


@pytest.mark.parametrize("name", names())
def test_every_zoo_model_folds_to_the_same_function(name):
    model = _randomise_bn(create(name, num_classes=10, in_channels=3))
    x = torch.randn(2, 3, 32, 32)
    folded = fold_batchnorm(model, x)
    with torch.no_grad():
        y, z = model(x), folded(x)
    torch.testing.assert_close(z, y, rtol=1e-4, atol=1e-4 * float(y.abs().max()))
    assert _bns(model) > _bns(folded)  # something folded, and the original was left alone
    if not name.startswith("preact"):  # pre-activation nets put BN before the conv: nothing to fold into
        assert _bns(folded) == 0
    before, after = count(model, (3, 32, 32)), count(folded, (3, 32, 32))
    assert after.macs == before.macs and after.params < before.params  # 2C BN params -> C conv biases


class Reuse(nn.Module):
    """A conv output read twice (residual taken before the BN), a conv run twice, and a plain pair."""

    def __init__(self):
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.shared, self.bn_s = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)
        self.c, self.bn_c = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)

    def forward(self, x):
        t = self.a(x)
        x = self.bn_a(t) + t
        x = self.bn_s(self.shared(self.shared(x)))
        return self.bn_c(self.c(x))


def test_only_exclusive_pairs_fold():
    model = _randomise_bn(Reuse())
    x = torch.randn(2, 3, 8, 8)
    assert foldable_pairs(model, x) == [("c", "bn_c")]
    folded = fold_batchnorm(model, x)
    assert isinstance(folded.bn_c, nn.Identity) and folded.c.bias is not None
    assert isinstance(folded.bn_a, nn.BatchNorm2d) and isinstance(folded.bn_s, nn.BatchNorm2d)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
    assert model.training is False and folded.training is False


def test_fold_keeps_the_caller_model_and_its_training_mode():
    model = _randomise_bn(create("resnet20", num_classes=10, in_channels=1)).train()
    folded = fold_batchnorm(model, torch.randn(1, 1, 28, 28))
    assert model.training and _bns(model) == 21 and _bns(folded) == 0 and not folded.training


class Tricky(nn.Module):
    """Ways a conv output can be read besides its BatchNorm; none of these pairs may fold."""

    def __init__(self, case: str):
        super().__init__()
        self.case = case
        self.conv, self.bn = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6, affine=case != "no_affine")
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        t = self.conv(x)
        if self.case == "inplace_relu_between":
            return self.bn(self.relu(t))
        if self.case == "inplace_add_before":
            t += x.mean(1, keepdim=True)
            return self.bn(t)
        if self.case == "inplace_after":
            y = self.bn(t)
            t.relu_()
            return y + t
        if self.case == "comparison_gate":
            return self.bn(t) * (t > 0)
        if self.case == "also_an_output":
            return self.bn(t), t
        return {"logits": self.bn(t)}  # no_affine, dict output: this one folds


@pytest.mark.parametrize("case", ["inplace_relu_between", "inplace_add_before", "inplace_after", "comparison_gate",
                                  "also_an_output", "no_affine"])
def test_hidden_reads_block_the_fold_and_outputs_never_change(case):
    model = _randomise_bn(Tricky(case))
    x = torch.randn(2, 3, 8, 8)
    result = fold(model, x)
    assert result.pairs == ([("conv", "bn")] if case == "no_affine" else [])
    with torch.no_grad():
        for a, b in zip(_flat(model(x)), _flat(result.model(x))):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def _flat(value):
    return list(value.values()) if isinstance(value, dict) else list(value) if isinstance(value, tuple) else [value]


def test_a_user_hook_on_the_conv_blocks_the_fold():
    model = _randomise_bn(Tricky("plain"))
    mask = torch.tensor([1.0, 0, 1, 0, 1, 0]).view(1, -1, 1, 1)
    model.conv.register_forward_hook(lambda m, i, o: o * mask)
    x = torch.randn(2, 3, 8, 8)
    assert foldable_pairs(model, x) == []
    with torch.no_grad():
        torch.testing.assert_close(fold_batchnorm(model, x)(x)["logits"], model(x)["logits"])


def test_folds_under_a_callers_inference_mode():
    model = _randomise_bn(create("resnet20", num_classes=10, in_channels=1))
    with torch.inference_mode():
        x = torch.randn(2, 1, 28, 28)
        folded = fold_batchnorm(model, x)
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-4)
    assert _bns(folded) == 0


def test_a_wrong_fold_is_refused(monkeypatch):
    import leanconv.deploy.fold as fold_module

    real = fold_module._fold_into
    monkeypatch.setattr(fold_module, "_fold_into", lambda conv, norm: (real(conv, norm), conv.bias.data.add_(1.0)))
    with pytest.raises(LeanconvError, match="changed the model's outputs"):
        fold_batchnorm(_randomise_bn(create("resnet20", num_classes=10, in_channels=1)), torch.randn(2, 1, 28, 28))


def test_folded_model_saves_and_reloads_identically(tmp_path):
    model = _randomise_bn(create("resnet20", num_classes=10, in_channels=1))
    model.leanconv_meta = {"input_shape": [1, 28, 28]}
    folded = fold_batchnorm(model, torch.randn(1, 1, 28, 28))
    checkpoint.save(folded, tmp_path / "folded.safetensors")
    again = checkpoint.load(tmp_path / "folded.safetensors")
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x), folded(x), rtol=0, atol=0)


def test_latency_of_the_folded_form(monkeypatch):
    import leanconv.cost.latency as latency

    timed = []
    monkeypatch.setattr(latency, "fold_batchnorm", lambda m, x: timed.append(fold_batchnorm(m, x)) or timed[-1])
    model = create("resnet20", num_classes=10, in_channels=1)
    stats = measure_latency(model, (1, 28, 28), 2, warmup=1, repeats=2, fold_bn=True)
    assert stats.bn_folded and stats.median_ms > 0
    assert len(timed) == 1 and _bns(timed[0]) == 0  # the folded form is what was timed
    assert _bns(model) == 21  # timing never touches the caller's model
    with pytest.raises(LeanconvError):
        measure_latency(model, (3, 28, 28), 2, warmup=0, repeats=1, fold_bn=True)


def test_rejects_a_non_module():
    with pytest.raises(LeanconvError, match="nn.Module"):
        fold_batchnorm("resnet20", torch.randn(1, 1, 28, 28))


def test_fold_cli_writes_a_checked_checkpoint(trained_ckpt, tmp_path, capsys):
    from leanconv.cli.main import main

    out = tmp_path / "folded.safetensors"
    assert main(["fold", str(trained_ckpt), "--out", str(out), "--repeats", "2"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    original, folded = checkpoint.load(trained_ckpt).eval(), checkpoint.load(out).eval()
    assert _bns(folded) == 0 and len(result["folded"]) == _bns(original) == 21
    assert result["params"][1] < result["params"][0] and result["macs"][0] == result["macs"][1]
    x = torch.randn(4, *original.leanconv_meta["input_shape"])
    with torch.no_grad():
        torch.testing.assert_close(folded(x), original(x), rtol=1e-4, atol=1e-4)
    assert result["speedup_b64"] > 0


def test_fold_cli_errors_are_one_line(trained_ckpt, tmp_path, capsys):
    from leanconv.cli.main import main

    assert main(["fold", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "f.safetensors")]) == 2
    assert main(["fold", str(trained_ckpt), "--out", str(trained_ckpt), "--no-latency"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("leanconv: error:") for line in err)
    assert "overwrite" in err[1] and not (tmp_path / "f.safetensors").exists()


def test_fold_cli_writes_nothing_when_the_check_fails(trained_ckpt, tmp_path, capsys, monkeypatch):
    import leanconv.deploy.fold as fold_module
    from leanconv.cli.main import main

    real = fold_module._fold_into
    monkeypatch.setattr(fold_module, "_fold_into", lambda conv, norm: (real(conv, norm), conv.bias.data.mul_(3.0)))
    out = tmp_path / "bad.safetensors"
    assert main(["fold", str(trained_ckpt), "--out", str(out), "--no-latency"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "changed the model's outputs" in err[0] and not out.exists()
