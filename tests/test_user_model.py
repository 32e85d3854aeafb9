"""A user's own model, defined outside leanconv, through the whole pruning path.

The model mixes a residual add, a depthwise conv and a channel concatenation; it is built
from ``package.module:function``, pruned with every criterion to half its MACs, saved as
edits on that constructor and reloaded to identical logits.
"""

import pytest
import torch
from torch import nn

from leanconv import checkpoint
from leanconv.cost import count
from leanconv.data import load_dataset
from leanconv.importance import ScoringData, create_criterion, criterion_names
from leanconv.models import from_constructor
from leanconv.width import prune_to_budget


class UserNet(nn.Module):
    def __init__(self, width: int = 12, num_classes: int = 4):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                                  nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width))
        self.dw = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, groups=width, bias=False), nn.BatchNorm2d(width),
                                nn.ReLU(), nn.Conv2d(width, 2 * width, 1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU())
        self.side = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.head = nn.Sequential(nn.Conv2d(3 * width, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.body(x))  # residual add couples stem and body outputs
        x = torch.cat([self.dw(x), self.side(x)], dim=1)  # depthwise branch and concat
        return self.head(x)


def user_net(width: int = 12, num_classes: int = 4) -> nn.Module:
    return UserNet(width, num_classes)


TARGET = f"{__name__}:user_net"


@pytest.mark.parametrize("method", criterion_names())
def test_user_model_prunes_and_reloads(method, tmp_path):
    torch.manual_seed(0)
    data = load_dataset("synthetic")
    model = from_constructor(TARGET, width=12, num_classes=data.num_classes)
    shape = (3, 16, 16)
    batches = list(data.loader("val", 32, subset=32).epoch(0))
    kwargs = {"max_probes": 4, "min_probes": 4} if method == "hap" else {}
    before = count(model, shape)
    prune_to_budget(model, create_criterion(method, **kwargs), torch.randn(1, *shape), target=0.5,
                    input_shape=shape, data=ScoringData(batches, extra={"input_shape": shape}),
                    implant=0.2 if method == "hap" else 0.0)
    after = count(model, shape)
    assert abs(after.macs / before.macs - 0.5) <= 0.02 * 0.5
    assert after.params < before.params
    path = tmp_path / "user.safetensors"
    checkpoint.save(model, path, constructor=TARGET)
    loaded = checkpoint.load(path, constructor=TARGET)
    x = torch.randn(3, *shape)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), model.eval()(x), rtol=0, atol=0)


def test_user_model_trains_from_the_cli(tmp_path):
    """``leanconv train --from CKPT --constructor ...`` writes its checkpoints without asking
    for the constructor again (the function named on the command line is remembered)."""
    from leanconv.cli.main import main

    start = tmp_path / "init.safetensors"
    checkpoint.save(from_constructor(TARGET), start)
    out = tmp_path / "trained"
    code = main(["train", "--from", str(start), "--constructor", TARGET, "--data", "synthetic:n=64,c=3,s=16,k=4",
                 "--epochs", "1", "--batch-size", "32", "--out", str(out), "--no-progress"])
    assert code == 0
    trained = checkpoint.load(out / "model.safetensors", constructor=TARGET)
    before = checkpoint.load(start, constructor=TARGET)
    assert not torch.equal(trained.head[-1].weight, before.head[-1].weight)  # it did train


def test_user_model_prunes_in_three_dimensions_from_the_cli(tmp_path, capsys):
    """``prune3d --constructor`` loads the user model (the sample tasks import it by name) and
    saves its result on the constructor; the record's command repeats the run to the bit."""
    import json
    import shlex

    from leanconv.cli.main import main

    start = tmp_path / "init.safetensors"
    model = from_constructor(TARGET)
    model.leanconv_meta = {"input_shape": [3, 16, 16], "num_classes": 4, "dataset": {"name": "synthetic"}}
    checkpoint.save(model, start)
    argv = ["prune3d", str(start), "--constructor", TARGET, "--target-flops", "0.5", "--samples", "4",
            "--sample-images", "64", "--sample-epochs", "0", "--finetune-epochs", "0", "--method", "l1",
            "--score-images", "32", "--workers", "0", "--repeats", "1", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0, capsys.readouterr().err
    record = json.loads((tmp_path / "a" / "record.json").read_text())
    assert record["achieved"]["macs"] <= 0.5 and "--constructor" in record["command"]
    again = record["command"].replace(str(tmp_path / "a"), str(tmp_path / "b"))
    assert main([*shlex.split(again)[1:], "--no-progress"]) == 0
    a = checkpoint.load(tmp_path / "a" / "model.safetensors", constructor=TARGET).state_dict()
    b = checkpoint.load(tmp_path / "b" / "model.safetensors", constructor=TARGET).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
