"""Group-lasso training before the cut (``--regularize-epochs``): the penalty equals a hand
computation and its dense reference, its gradient shrinks every group, and a prune run
regularises, records it and refuses what would do nothing."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from leanconv.cli.main import main
from leanconv.errors import LeanconvError
from leanconv.graph import channel_groups
from leanconv.models import create
from leanconv.runs import PruneConfig, Source, run_prune
from leanconv.train.regularize import GroupLasso, regularize
from prune_toys import CatToy, DepthwiseToy, FlattenToy, GroupedToy, ResToy, RollToy, randomize_bn

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


class Tiny(nn.Module):
    """conv1 (+bias) -> bn1 -> relu -> conv2 -> bn2 -> relu -> pool -> fc: two channel groups."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5)
        self.fc = nn.Linear(5, 2)

    def forward(self, x):
        x = torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))
        return self.fc(x.mean((2, 3)))


def test_the_penalty_equals_a_hand_computation():
    torch.manual_seed(0)
    m = randomize_bn(Tiny())
    lasso = GroupLasso(m, channel_groups(m, X), strength=0.1)
    c1, b1, c2, b2, fc = m.conv1, m.bn1, m.conv2, m.bn2, m.fc
    first = [torch.cat([c1.weight[k].flatten(), c1.bias[k:k + 1], b1.weight[k:k + 1], b1.bias[k:k + 1],
                        c2.weight[:, k].flatten()]).norm() for k in range(4)]
    second = [torch.cat([c2.weight[k].flatten(), b2.weight[k:k + 1], b2.bias[k:k + 1], fc.weight[:, k]]).norm()
              for k in range(5)]
    norms = lasso.channel_norms()
    assert [n.shape for n in norms] == [(4,), (5,)]
    torch.testing.assert_close(norms[0], torch.stack(first))
    torch.testing.assert_close(norms[1], torch.stack(second))
    torch.testing.assert_close(lasso.penalty(), torch.stack(first + second).sum())
    out, y = m(X), torch.tensor([0, 1])
    torch.testing.assert_close(lasso(out, X, y), nn.functional.cross_entropy(out, y) + 0.1 * lasso.penalty())
    assert lasso.describe() == {"group_lasso": {"strength": 0.1, "groups": 2, "channels": 9}}


def _slice(model: nn.Module, member, k: int) -> list[torch.Tensor]:
    """Group channel ``k``'s parameters in ``member``, gathered one by one (the dense reference)."""
    module, j = model.get_submodule(member.module), member.idxs[k]
    if isinstance(module, nn.BatchNorm2d):
        return [module.weight[j:j + 1], module.bias[j:j + 1]]
    if member.kind == "out":
        return [module.weight[j].flatten()] + ([module.bias[j:j + 1]] if module.bias is not None else [])
    if isinstance(module, nn.Linear):
        return [module.weight[:, j]]
    width, rows = module.in_channels // module.groups, module.out_channels // module.groups
    block = j // width  # the conv group that reads input channel j: its rows, column j % width
    return [module.weight[block * rows:(block + 1) * rows, j % width].flatten()]


@pytest.mark.parametrize("toy", [ResToy, DepthwiseToy, CatToy, GroupedToy, FlattenToy])
def test_the_penalty_equals_its_dense_reference_on_every_coupling(toy):
    """Residual adds, depthwise and grouped convs, concatenations, a flatten: the vectorised
    norms equal the norms of each channel's concatenated slices (gathered channel by channel)."""
    torch.manual_seed(0)
    model = randomize_bn(toy())
    groups = channel_groups(model, X)
    lasso = GroupLasso(model, groups)
    for group, norms in zip(groups, lasso.channel_norms()):
        dense = [torch.cat([t for m in group.members for t in _slice(model, m, k)]).norm() for k in range(group.size)]
        torch.testing.assert_close(norms, torch.stack(dense), msg=group.root)


def test_the_gradient_pushes_every_group_toward_zero():
    torch.manual_seed(0)
    model = randomize_bn(ResToy())
    lasso = GroupLasso(model, channel_groups(model, X), strength=1.0)
    before = [n.detach().clone() for n in lasso.channel_norms()]
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(5):
        opt.zero_grad()
        lasso.penalty().backward()
        opt.step()
    after = lasso.channel_norms()
    for b, a in zip(before, after):
        assert bool((a < b).all()), (b, a)


def test_a_channel_at_zero_gets_a_zero_gradient_not_nan():
    model = Tiny()
    with torch.no_grad():
        for t in (model.conv1.weight, model.conv1.bias, model.bn1.weight, model.bn1.bias):
            t[0] = 0
        model.conv2.weight[:, 0] = 0
    lasso = GroupLasso(model, channel_groups(model, X))
    lasso.penalty().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert float(model.conv1.weight.grad[0].abs().sum()) == 0


def test_regularize_trains_with_the_penalty(tiny_data):
    """Same seed and data: the stronger penalty ends lower, and the record says what was done."""
    def run(strength: float):
        torch.manual_seed(0)
        model = create("resnet20", in_channels=3, input_size=16, num_classes=4)
        groups = channel_groups(model, torch.randn(1, 3, 16, 16))
        return model, regularize(model, tiny_data, groups, epochs=1, strength=strength, lr=0.05, batch_size=32,
                                 images=128)

    weak_model, weak = run(1e-6)
    strong_model, strong = run(0.05)
    assert weak.penalty_before == strong.penalty_before and strong.groups == weak.groups > 0
    assert strong.penalty_after < weak.penalty_after and strong.penalty_after < strong.penalty_before
    assert strong.epochs == 1 and strong.strength == 0.05 and strong.seconds > 0 and strong.channels > 0
    assert not strong_model.training  # BatchNorm statistics re-estimated, back in eval mode as after fine-tuning


def test_a_model_without_prunable_groups_is_one_line():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))
    with pytest.raises(LeanconvError, match="needs channel groups to cut, and this model has none") as info:
        regularize(model, None, channel_groups(model, X), epochs=1, lr=0.01)
    assert "\n" not in str(info.value)


def test_a_run_honours_strict():
    """A layer leanconv cannot resize: the run refuses it as the engine does, or with strict=False
    penalises only the groups the engine may cut (here the 5 channels after the roll)."""
    import leanconv

    torch.manual_seed(0)
    batches = [(torch.randn(16, 3, 8, 8), torch.randint(0, 2, (16,))) for _ in range(2)]
    with pytest.raises(LeanconvError, match="Roll"):
        leanconv.prune(RollToy(), X[:1], data=batches, method="l1", target_macs=0.75, regularize_epochs=1)
    small = leanconv.prune(RollToy(), X[:1], data=batches, method="l1", target_macs=0.75, regularize_epochs=1,
                           strict=False, batch_size=16)
    reg = small.leanconv_record["regularization"]
    assert reg["channels"] == 5 and reg["groups"] == 1 and reg["channels"] == sum(
        g.size for g in channel_groups(RollToy(), X, strict=False))


def test_a_prune_run_regularises_before_the_cut_and_records_it(tiny_data):
    torch.manual_seed(0)
    model = create("resnet20", in_channels=3, input_size=16, num_classes=4)
    model.leanconv_meta = {"input_shape": [3, 16, 16], "num_classes": 4}
    config = PruneConfig(method="l1", target=0.5, score_images=32, latency_repeats=1, regularize_epochs=1,
                         regularize_strength=0.01, train_subset=128, batch_size=32, reconstruct_images=32)
    result = run_prune(config, Source(tiny_data, model=model), measured=False)
    record = result.record.to_dict()
    reg = record["regularization"]
    assert reg["epochs"] == 1 and reg["strength"] == 0.01 and reg["seconds"] > 0 and reg["groups"] > 0
    assert reg["penalty_after"] < reg["penalty_before"]
    assert abs(record["achieved"]["macs"] - 0.5) <= 0.01 and record["distillation"] is None
    assert record["config"]["regularize_epochs"] == 1
    plain = run_prune(PruneConfig(method="l1", target=0.5, score_images=32, latency_repeats=1), Source(
        tiny_data, model=model), measured=False).record.to_dict()
    assert plain["regularization"] is None


def test_the_python_api_needs_training_batches_to_regularise():
    import leanconv

    with pytest.raises(LeanconvError, match="regularize_epochs trains before the cut and needs training batches"):
        leanconv.prune(ResToy(), torch.randn(1, 3, 8, 8), method="l1", target_macs=0.5, regularize_epochs=1)


@pytest.mark.parametrize("extra,match", [
    (["--regularize-strength", "0.001"], "--regularize-strength sets the penalty of --regularize-epochs"),
    (["--regularize-epochs", "-1"], "--regularize-epochs must be at least 0"),
    (["--regularize-epochs", "1", "--regularize-strength", "0"],
     "--regularize-strength must be a finite number above 0"),
    (["--regularize-epochs", "1", "--regularize-strength", "nan"], "--regularize-strength must be a finite number"),
    (["--regularize-epochs", "1", "--regularize-strength", "1e9"], "--regularize-strength must be a finite number"),
])
def test_bad_regularisation_options_are_one_line(untrained_ckpt, tmp_path, capsys, extra, match):
    out = tmp_path / "out"
    code = main(["prune", str(untrained_ckpt), "--target-flops", "0.5", "--out", str(out), "--no-progress", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("leanconv: error:") and match in err[0], err
    assert "Traceback" not in err[0] and not out.exists()


def test_the_options_round_trip_through_the_reproducing_command(untrained_ckpt, tmp_path):
    from leanconv.cli import prune as prune_cli
    from leanconv.cli.main import build_parser
    from leanconv.runs import command_line
    import shlex

    config = PruneConfig(method="l1", regularize_epochs=2, regularize_strength=3e-4, seed=1)
    words = shlex.split(command_line(config, Source.from_checkpoint(untrained_ckpt), tmp_path / "o"))
    assert "--regularize-epochs" in words and "--regularize-strength" in words
    assert prune_cli.config_from_args(build_parser().parse_args(words[1:])) == config
    assert json.loads(json.dumps(config.to_dict()))["regularize_strength"] == 3e-4
