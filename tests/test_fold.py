"""BatchNorm folding (the deployment form): same function, fewer layers, only safe pairs fold."""

import json

import pytest
import torch
from torch import nn

from leanconv import checkpoint
from leanconv.cost import count, measure_latency
from leanconv.errors import LeanconvError
from leanconv.fold import fold_batchnorm, foldable_pairs
from leanconv.models import create, names


def _randomise_bn(model: nn.Module) -> nn.Module:
    """Non-trivial running statistics and affine terms, so a wrong fold cannot pass."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
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


def test_fold_keeps_caller_training_mode_and_inplace_option():
    model = _randomise_bn(create("resnet20", num_classes=10, in_channels=1)).train()
    x = torch.randn(1, 1, 28, 28)
    fold_batchnorm(model, x)
    assert model.training and _bns(model) == 21  # the copy was folded, not the model
    fold_batchnorm(model, x, inplace=True)
    assert _bns(model) == 0


def test_folded_model_saves_and_reloads_identically(tmp_path):
    model = _randomise_bn(create("resnet20", num_classes=10, in_channels=1))
    model.leanconv_meta = {"input_shape": [1, 28, 28]}
    folded = fold_batchnorm(model, torch.randn(1, 1, 28, 28))
    checkpoint.save(folded, tmp_path / "folded.safetensors")
    again = checkpoint.load(tmp_path / "folded.safetensors")
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x), folded(x), rtol=0, atol=0)


def test_latency_of_the_folded_form():
    model = create("resnet20", num_classes=10, in_channels=1)
    stats = measure_latency(model, (1, 28, 28), 2, warmup=1, repeats=2, fold_bn=True)
    assert stats.bn_folded and stats.median_ms > 0
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
