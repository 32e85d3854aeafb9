"""The reconstruction after a cut (``--reconstruct-images``): layers that lost input channels
are refitted by least squares to the unpruned model's outputs. Checked against exact answers
(a removed channel that duplicates a kept one is absorbed without error; patches equal
``F.unfold``), on every coupling the engine cuts, and end to end through ``leanconv prune``."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from leanconv.cli.main import main
from leanconv.graph.groups import channel_groups
from leanconv.models import create
from leanconv.runs import PruneConfig, Source, run_prune
from leanconv.width.channels import remove_channels
from leanconv.width import reconstruct as reconstruct_module
from leanconv.width.reconstruct import _patches, kept_channels, reconstruct

from prune_toys import CatToy, DepthwiseToy, ResToy


class Chain(nn.Module):
    """conv (3 -> 4) -> ReLU -> conv (4 -> 5, stride 2, dilation 2, bias) -> pool -> fc."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.b = nn.Conv2d(4, 5, 3, stride=2, padding=2, dilation=2)
        self.fc = nn.Linear(5, 2)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.b(torch.relu(self.a(x))), 1).flatten(1))


def _cut(model, x, remove):
    """A pruned copy of ``model``: ``remove`` maps group roots to channels to drop."""
    x = x.to(next(model.parameters()).dtype)
    groups = channel_groups(model, x)
    pruned = copy.deepcopy(model)
    index = {g.root: i for i, g in enumerate(groups)}
    remove_channels(pruned, groups, {index[r]: c for r, c in remove.items()}, x)
    return groups, pruned


def _output(model, name, x):
    x, seen = x.to(next(model.parameters()).dtype), {}
    hook = model.get_submodule(name).register_forward_hook(lambda m, i, o: seen.setdefault("y", o.detach()))
    with torch.no_grad():
        model(x)
    hook.remove()
    return seen["y"]


def test_patches_are_the_rows_of_unfold():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(2, 1))
    x = torch.randn(2, 3, 9, 7)
    full = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    rows = full.transpose(1, 2).reshape(-1, full.shape[1])
    picks = torch.tensor([0, 3, 17, len(rows) - 1])
    assert_close(_patches(conv, x, picks), rows[picks], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_removed_channel_that_copies_a_kept_one_is_absorbed_exactly(dtype):
    """Channel 3 of ``a`` equals channel 0, so after removing 3 the refitted ``b`` (weights and
    bias) reproduces the unpruned outputs, where the cut alone does not; a float64 model is fed
    float64 images (the batches are float32)."""
    torch.manual_seed(0)
    model = Chain().eval().to(dtype)
    with torch.no_grad():
        model.a.weight[3] = model.a.weight[0]
    x = torch.randn(16, 3, 12, 12)
    groups, pruned = _cut(model, x[:1], {"a": [3]})
    cut = _output(pruned, "b", x)
    assert (cut - _output(model, "b", x)).abs().max() > 0.05
    done = reconstruct(model, pruned, groups, {"a": [3]}, [(x[:8],), (x[8:],)], ridge=1e-9)
    assert set(done.layers) == {"b"} and done.layers["b"][1] < 1e-8 < done.layers["b"][0]
    assert_close(_output(pruned, "b", x), _output(model, "b", x), rtol=1e-4, atol=1e-4)
    assert_close(pruned(x.to(dtype)), model(x.to(dtype)), rtol=1e-4, atol=1e-4)


def test_kept_channels_follow_concatenation_offsets():
    """Removing channels 1 and 4 of branch ``b`` of a concatenation after 4 channels of ``a``
    removes inputs 5 and 8 of ``c``."""
    groups = channel_groups(CatToy(), torch.randn(1, 3, 8, 8))
    gone = kept_channels(groups, {"b": [1, 4]})
    assert gone["c"] == ({5, 8}, set()) and gone["b"] == (set(), {1, 4}) and gone["bn"] == (set(), {5, 8})


@pytest.mark.parametrize("window", ["all layers", "one layer"])
@pytest.mark.parametrize("toy,remove,refitted", [
    (ResToy, {"stem.0": [0, 5], "conv_a": [1, 2, 3]}, {"conv_a", "conv_b", "conv_c"}),
    (CatToy, {"b": [1, 4]}, {"c"}),
])
def test_refitted_layers_reproduce_the_unpruned_outputs_better_than_the_cut(toy, remove, refitted, window,
                                                                             monkeypatch):
    """Also when the unpruned targets are kept for one layer at a time (a large model)."""
    if window == "one layer":
        monkeypatch.setattr(reconstruct_module, "TARGET_BYTES", 1)
    torch.manual_seed(1)
    model = toy().eval()
    x = torch.randn(64, 3, 10, 10)
    groups, pruned = _cut(model, x[:1], remove)
    cut = copy.deepcopy(pruned)
    done = reconstruct(model, pruned, groups, remove, [(x[:32],), (x[32:],)])
    assert set(done.layers) == refitted and not done.skipped
    for name in refitted:
        before, after = done.layers[name]
        assert after < before
        want = _output(model, name, x)
        keep = [o for o in range(want.shape[1]) if o not in kept_channels(groups, remove).get(name, ((), ()))[1]]
        error = {m: (_output(net, name, x) - want[:, keep]).pow(2).sum() for m, net in (("fit", pruned), ("cut", cut))}
        assert error["fit"] < error["cut"]


def test_depthwise_convs_and_changed_weights_are_left_as_cut():
    torch.manual_seed(0)
    model = DepthwiseToy().eval()
    x = torch.randn(32, 3, 8, 8)
    groups, pruned = _cut(model, x[:1], {"expand.0": [0, 1, 2, 3]})
    dw = pruned.dw[0].weight.detach().clone()
    done = reconstruct(model, pruned, groups, {"expand.0": [0, 1, 2, 3]}, [(x,)])
    assert set(done.layers) == {"project.0"} and not done.skipped  # the depthwise conv loses whole channels
    assert torch.equal(pruned.dw[0].weight, dw)
    groups, pruned = _cut(model, x[:1], {"expand.0": [0, 1, 2, 3]})
    with torch.no_grad():
        pruned.project[0].weight.add_(0.1)  # as if fine-tuned after the cut: no longer a slice
    done = reconstruct(model, pruned, groups, {"expand.0": [0, 1, 2, 3]}, [(x,)])
    assert "project.0" in done.skipped and not done.layers


def _resnet():
    torch.manual_seed(0)
    model = create("resnet20", in_channels=3, input_size=16, num_classes=4)
    model.leanconv_meta = {"input_shape": [3, 16, 16], "num_classes": 4}
    return model


def test_a_prune_run_reconstructs_and_records_it(tiny_data):
    config = dict(method="l1", target=0.5, score_images=32, latency_repeats=1, batch_size=32)
    record = run_prune(PruneConfig(**config, reconstruct_images=64), Source(tiny_data, model=_resnet()),
                       measured=False).record.to_dict()
    rec = record["reconstruction"]
    assert rec["images"] == 64 and rec["layers"] and all(after < before for before, after in rec["layers"].values())
    assert record["config"]["reconstruct_images"] == 64
    plain = run_prune(PruneConfig(**config, reconstruct_images=0), Source(tiny_data, model=_resnet()),
                      measured=False).record.to_dict()
    assert plain["reconstruction"] is None and plain["layers"] == record["layers"]
    rounds = run_prune(PruneConfig(**config, reconstruct_images=64, steps=2), Source(tiny_data, model=_resnet()),
                       measured=False).record.to_dict()
    assert len(rounds["reconstruction"]) == 2 and all(r["layers"] for r in rounds["reconstruction"])


def test_the_option_is_checked_and_round_trips(untrained_ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["prune", str(untrained_ckpt), "--target-flops", "0.5", "--out", str(out), "--no-progress",
                 "--reconstruct-images", "-1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--reconstruct-images must be at least 0" in err[0] and not out.exists()
    from leanconv.runs import command_line

    line = command_line(PruneConfig(method="l1", reconstruct_images=100), Source.from_checkpoint(untrained_ckpt),
                        tmp_path / "o")
    assert "--reconstruct-images 100" in line
