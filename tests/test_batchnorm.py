"""BatchNorm re-estimation (leanconv.util.batchnorm) equals the two copies it replaced:
``train.finetune.recalibrate_bn``'s loop and the latency solver's adaptive-BN loss."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.testing import assert_close

from leanconv.models import create
from leanconv.train import recalibrate_bn
from leanconv.util.batchnorm import reestimate_batchnorm
from leanconv.util.model_io import to_model
from leanconv.width.candidates import adaptive_bn_loss


def _norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _stats(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if "running_" in k or "num_batches" in k}


@torch.no_grad()
def _old_recalibrate(model, batches, max_batches, channels_last=True) -> int:
    """``recalibrate_bn``'s body before the move, verbatim but for the loader."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    saved_momentum = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    was_training = model.training
    model.train()
    for i, (x, _) in enumerate(batches):
        if i >= max_batches:
            break
        model(to_model(x.contiguous(memory_format=torch.channels_last) if channels_last else x, model))
    for m, mom in zip(bns, saved_momentum):
        m.momentum = mom
    model.train(was_training)
    return len(bns)


def _old_loss(model, batches, loss_fn) -> float:
    """The latency solver's ``_loss`` before the move, verbatim."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    with torch.no_grad():
        if norms:
            momenta = [m.momentum for m in norms]
            for m in norms:
                m.reset_running_stats()
                m.momentum = None
            model.train()
            for x, _ in batches:
                model(to_model(x, model))
            for m, momentum in zip(norms, momenta):
                m.momentum = momentum
        model.eval()
        total = sum(float(loss_fn(model(to_model(x, model)), y)) * len(y) for x, y in batches)
    return total / sum(len(y) for _, y in batches)


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = create("resnet20", num_classes=4, input_size=16)
    for m in _norms(model):  # statistics far from what the batches give
        m.running_mean.fill_(3.0)
        m.running_var.fill_(7.0)
        m.momentum = 0.3
    return model.eval()


def _batches(n: int = 3):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 3, 16, 16, generator=gen), torch.randint(0, 4, (8,), generator=gen)) for _ in range(n)]


class _Loader:
    def __init__(self, batches):
        self.batches = batches

    def epoch(self, index: int):
        return iter(self.batches)


def test_recalibrate_bn_equals_its_old_body():
    batches = _batches(3)
    new, old = _model(), _model()
    layers = len(_norms(new))
    assert recalibrate_bn(new, _Loader(batches), max_batches=2) == _old_recalibrate(old, batches, 2) == layers > 0
    assert_close(_stats(new), _stats(old))
    assert new.bn1.num_batches_tracked.item() == 2
    assert not new.training and [m.momentum for m in _norms(new)] == [0.3] * layers  # mode and momenta restored
    assert float(new.bn1.running_mean.abs().max()) < 3.0  # really re-estimated


def test_inputs_as_tensors_or_batches_give_the_same_statistics():
    batches = _batches(3)
    as_pairs, as_tensors = _model(), _model()
    reestimate_batchnorm(as_pairs, batches)
    reestimate_batchnorm(as_tensors, [x for x, _ in batches])
    assert_close(_stats(as_pairs), _stats(as_tensors))
    assert as_pairs.bn1.num_batches_tracked.item() == 3
    few = _model()
    reestimate_batchnorm(few, batches, max_batches=1)
    assert few.bn1.num_batches_tracked.item() == 1


def test_a_model_without_batchnorm_is_left_alone():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    before = copy.deepcopy(model.state_dict())
    assert reestimate_batchnorm(model, _batches(1)) == 0
    assert not model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_adaptive_bn_loss_equals_the_latency_solvers_old_loss():
    batches = _batches(2)
    new, old = _model(), _model()
    loss_new = adaptive_bn_loss(new, batches, nn.functional.cross_entropy)
    loss_old = _old_loss(old, batches, nn.functional.cross_entropy)
    assert_close(torch.tensor(loss_new), torch.tensor(loss_old))
    assert_close(_stats(new), _stats(old))
