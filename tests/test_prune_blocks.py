"""Depth pruning: which blocks are removable, their importance, bypassing and storing them."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from leanconv import checkpoint
from leanconv.cost import count
from leanconv.errors import LeanconvError
from leanconv.models import create
from leanconv.prune3d.block_importance import block_importance, bypass_loss_curve, rank_correlation
from leanconv.prune3d.blocks import adds_input, bypassed, depth_ratio, find_residual_blocks, prune_blocks

RESNET20_BLOCKS = ["layer1.0", "layer1.1", "layer1.2", "layer2.1", "layer2.2", "layer3.1", "layer3.2"]


def _x(side=16, n=2, c=3):
    return torch.randn(n, c, side, side, generator=torch.Generator().manual_seed(3))


def _randomise_bn(model):
    gen = torch.Generator().manual_seed(5)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=gen) * 0.2 - 0.1)


def _zero_branch(block):
    """Make a BasicBlock's residual branch output exactly zero (BN scale and shift 0)."""
    block.bn2.weight.data.zero_()
    block.bn2.bias.data.zero_()


# ---------------------------------------------------------------- user-defined blocks


class Residual(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())

    def forward(self, x):
        return x + self.body(x)


class InplaceResidual(Residual):
    def __init__(self, c):
        super().__init__(c)
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        out = self.body(x)
        out += x
        return torch.relu(out)


class IdentityShortcut(Residual):
    def __init__(self, c):
        super().__init__(c)
        self.skip = nn.Identity()

    def forward(self, x):
        return torch.add(self.body(x), self.skip(x))


class Plain(Residual):
    """Same shape, no residual add."""

    def forward(self, x):
        return self.body(x)


class Projection(Residual):
    """Same shape, but the add takes a projection of the input, not the input."""

    def __init__(self, c):
        super().__init__(c)
        self.proj = nn.Conv2d(c, c, 1, bias=False)

    def forward(self, x):
        return self.proj(x) + self.body(x)


class DeadAdd(Residual):
    """Adds the input, but the sum never reaches the output."""

    def forward(self, x):
        _ = x + 1.0
        return self.body(x)


class Untraceable(Residual):
    """Residual, but data-dependent control flow defeats torch.fx."""

    def forward(self, x):
        if float(x.detach().sum()) > 1e30:
            return x
        return x + self.body(x)


class UserNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(
            Residual(8), Plain(8), InplaceResidual(8), Projection(8), IdentityShortcut(8), DeadAdd(8),
            Untraceable(8), nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU()), Residual(16),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


# ---------------------------------------------------------------- detection


def test_resnet20_has_seven_removable_blocks():
    model = create("resnet20")
    blocks = find_residual_blocks(model, _x(32))
    assert [b.path for b in blocks] == RESNET20_BLOCKS
    assert [b.stage for b in blocks] == ["layer1"] * 3 + ["layer2"] * 2 + ["layer3"] * 2
    assert [b.index for b in blocks] == [0, 1, 2, 1, 2, 1, 2]
    assert blocks[0].input_shape == blocks[0].output_shape == (16, 32, 32)
    assert blocks[-1].input_shape == (64, 8, 8)
    # two 3x3 convs 16->16 on 32x32: 2 * 32*32 * 16*16*9 MACs; BN counts 0
    assert blocks[0].macs == 2 * 32 * 32 * 16 * 16 * 9
    assert blocks[0].params == 2 * 16 * 16 * 9 + 2 * 2 * 16


def test_preact_resnet20_has_seven_removable_blocks():
    blocks = find_residual_blocks(create("preact_resnet20"), _x(16))
    assert [b.path for b in blocks] == RESNET20_BLOCKS
    assert {b.type for b in blocks} == {"PreActBlock"}


def test_mobilenetv2_lists_only_inverted_residuals_with_skip():
    model = create("mobilenetv2")
    blocks = find_residual_blocks(model, _x(16, n=1))
    assert [b.path for b in blocks] == [f"features.{i}" for i in (2, 4, 5, 7, 8, 9, 11, 12, 14, 15)]
    assert all(model.get_submodule(b.path).use_residual for b in blocks)
    assert sum(m.use_residual for m in model.features) == len(blocks)


def test_user_model_residual_rule():
    model = UserNet()
    paths = [b.path for b in find_residual_blocks(model, _x(16))]
    # Residual, InplaceResidual, IdentityShortcut, and the 16-channel Residual; not Plain,
    # Projection, DeadAdd, Untraceable (not a zoo type), nor the shape-changing Sequential.
    assert paths == ["blocks.0", "blocks.2", "blocks.4", "blocks.8"]
    assert adds_input(model.blocks[6]) is None
    assert adds_input(model.blocks[1]) is False


def test_zoo_fallback_when_tracing_fails(monkeypatch):
    import leanconv.prune3d.blocks as blocks_mod

    monkeypatch.setattr(blocks_mod, "adds_input", lambda block: None)
    assert [b.path for b in find_residual_blocks(create("resnet20"), _x(16))] == RESNET20_BLOCKS


def test_bypassing_removes_exactly_the_block_macs():
    for name, side in (("resnet20", 32), ("mobilenetv2", 16)):
        model = create(name)
        blocks = find_residual_blocks(model, _x(side, n=1))
        before = count(model, (3, side, side)).macs
        victims = [blocks[1], blocks[-1]]
        with bypassed(model, [b.path for b in victims]):
            during = count(model, (3, side, side)).macs
        assert before - during == sum(b.macs for b in victims) > 0
        assert count(model, (3, side, side)).macs == before  # restored


def test_bypassed_block_survives_checkpoint_round_trip(tmp_path):
    model = create("resnet20")
    _randomise_bn(model)
    blocks = find_residual_blocks(model, _x(16))
    imp = {b.path: float(i) for i, b in enumerate(blocks)}
    assert prune_blocks(model, blocks, imp, keep=5) == ["layer1.0", "layer1.1"]
    assert isinstance(model.layer1[0], nn.Identity)
    header = checkpoint.save(model, tmp_path / "m.safetensors")
    assert [(e["op"], e["path"]) for e in header["edits"]] == [("identity", "layer1.0"), ("identity", "layer1.1")]
    loaded = checkpoint.load(tmp_path / "m.safetensors")
    model.eval(), loaded.eval()
    x = _x(16)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert [b.path for b in find_residual_blocks(loaded, x)] == ["layer1.2"] + RESNET20_BLOCKS[3:]


# ---------------------------------------------------------------- importance


def _self_distillation_batches(model, n_batches=2):
    """Batches whose targets are the model's own logits: any change to it raises the MSE."""
    model.eval()
    with torch.no_grad():
        return [(x, model(x)) for x in (_x(16, n=4) + i for i in range(n_batches))]


def test_loss_importance_of_a_dead_block_is_zero_and_it_goes_first():
    model = create("resnet20")
    _randomise_bn(model)
    _zero_branch(model.layer2[1])
    blocks = find_residual_blocks(model, _x(16))
    batches = _self_distillation_batches(model)
    calls = []
    imp = block_importance(model, blocks, batches, "loss", loss_fn=F.mse_loss,
                           progress=lambda d, t, info: calls.append((d, t)))
    assert calls[-1] == (7, 7)
    assert abs(imp["layer2.1"]) < 1e-9
    assert min(v for k, v in imp.items() if k != "layer2.1") > 1e-4
    assert prune_blocks(model, blocks, imp, keep=6) == ["layer2.1"]
    # with cross-entropy on labels, the dead block still costs nothing to remove
    ce = block_importance(model, blocks[:3], [(x, y.argmax(1)) for x, y in batches])
    assert set(ce) == {"layer1.0", "layer1.1", "layer1.2"}


def test_loss_importance_leaves_model_and_modes_unchanged():
    model = create("resnet20")
    model.train()
    blocks = find_residual_blocks(model, _x(16))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    block_importance(model, blocks, [(_x(16), torch.tensor([0, 1]))])
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(not isinstance(model.get_submodule(b.path), nn.Identity) for b in blocks)


def test_hessian_importance_is_zero_for_a_dead_block():
    model = UserNet()
    _randomise_bn(model)
    blocks = find_residual_blocks(model, _x(8))
    model.blocks[2].body[1].weight.data.zero_()  # InplaceResidual: branch output is BN bias only
    model.blocks[2].body[1].bias.data.zero_()
    batches = [(_x(8, n=4), torch.tensor([0, 1, 2, 3]))]
    imp = block_importance(model, blocks, batches, "hessian",
                           hessian_options=dict(min_probes=4, max_probes=4, method="double_backward"))
    assert set(imp) == {"blocks.0", "blocks.2", "blocks.4", "blocks.8"}
    assert imp["blocks.2"] == 0.0
    assert all(math.isfinite(v) and v != 0.0 for k, v in imp.items() if k != "blocks.2")


def test_importance_rejects_bad_arguments():
    model = create("resnet20")
    blocks = find_residual_blocks(model, _x(16))
    batch = [(_x(16), torch.tensor([0, 1]))]
    with pytest.raises(LeanconvError, match="unknown block importance"):
        block_importance(model, blocks, batch, "taylor")
    with pytest.raises(LeanconvError, match="no data batches"):
        block_importance(model, blocks, [])
    with pytest.raises(LeanconvError, match="only to method='hessian'"):
        block_importance(model, blocks, batch, "loss", hessian_options={"max_probes": 4})


def test_bypass_loss_curve_prefers_the_better_ranking():
    model = create("resnet20")
    _randomise_bn(model)
    _zero_branch(model.layer1[1])
    _zero_branch(model.layer3[2])
    blocks = find_residual_blocks(model, _x(16))
    batches = _self_distillation_batches(model)
    good = block_importance(model, blocks, batches, loss_fn=F.mse_loss)
    bad = {k: -v for k, v in good.items()}
    good_curve = bypass_loss_curve(model, blocks, good, batches, loss_fn=F.mse_loss)
    bad_curve = bypass_loss_curve(model, blocks, bad, batches, ks=[0, 2, 7], loss_fn=F.mse_loss)
    assert len(good_curve) == 8
    assert good_curve[0] == bad_curve[0] == pytest.approx(0.0, abs=1e-12)
    assert good_curve[2] < 1e-9 < bad_curve[1]  # two dead blocks cost nothing
    assert good_curve[7] == pytest.approx(bad_curve[2])  # all bypassed either way
    assert rank_correlation(good, good) == pytest.approx(1.0)
    assert rank_correlation(good, bad) == pytest.approx(-1.0)
    with pytest.raises(LeanconvError, match="cannot bypass 8"):
        bypass_loss_curve(model, blocks, good, batches, ks=[8])


# ---------------------------------------------------------------- pruning


def test_min_per_stage_and_depth_ratio():
    model = create("resnet20")
    blocks = find_residual_blocks(model, _x(16))
    imp = {b.path: float(i) for i, b in enumerate(blocks)}  # layer1 least important
    assert prune_blocks(model, blocks, imp, keep=0.5) == ["layer1.0", "layer1.1", "layer2.1"]  # 3.5 -> 4 kept
    assert depth_ratio(model, blocks) == pytest.approx(4 / 7)
    removed = prune_blocks(model, blocks, imp, keep=3, min_per_stage=1)
    assert removed == ["layer3.1"]
    assert [b.path for b in blocks if not isinstance(model.get_submodule(b.path), nn.Identity)] == [
        "layer1.2", "layer2.2", "layer3.2"]
    assert prune_blocks(model, blocks, imp, keep=5) == []  # already below: nothing to undo
    with pytest.raises(LeanconvError, match="min_per_stage=1"):
        prune_blocks(model, blocks, imp, keep=2)
    assert prune_blocks(model, blocks, imp, keep=0, min_per_stage=0) == ["layer1.2", "layer2.2", "layer3.2"]
    assert depth_ratio(model, blocks) == 0.0
    x = _x(16)
    assert model(x).shape == (2, 10)


def test_min_per_stage_two_keeps_two_in_each_stage():
    model = create("resnet20")
    blocks = find_residual_blocks(model, _x(16))
    imp = {b.path: float(-i) for i, b in enumerate(blocks)}  # deeper blocks least important
    removed = prune_blocks(model, blocks, imp, keep=6, min_per_stage=2)
    assert removed == ["layer1.2"]  # layer3 and layer2 have only 2 each, so they stay whole


def test_prune_blocks_rejects_bad_keep_and_missing_scores():
    model = create("resnet20")
    blocks = find_residual_blocks(model, _x(16))
    imp = {b.path: 1.0 for b in blocks}
    for bad in (8, -1, 1.5, True, "all"):
        with pytest.raises(LeanconvError):
            prune_blocks(model, blocks, imp, keep=bad)
    with pytest.raises(LeanconvError, match="no importance for block"):
        prune_blocks(model, blocks, {"layer1.0": 0.0}, keep=3)
    assert all(not isinstance(model.get_submodule(b.path), nn.Identity) for b in blocks)
