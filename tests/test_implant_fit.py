"""Fitted Neural Implants (``implant_init="fit"``): exact where a 1x1 map suffices, closer
to the original than zero implants otherwise, wired through ``prune_to_budget``."""

import copy

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from leanconv.errors import LeanconvError
from leanconv.importance import ScoringData
from leanconv.layers.implant import ImplantConv2d
from leanconv.models import create
from leanconv.width import prune_to_budget
from leanconv.width.implant_fit import fit_implants
from prune_toys import l1_scores, randomize_bn


def _batches(n=3, size=8, channels=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, channels, size, size, generator=g), torch.zeros(4, dtype=torch.long)) for _ in range(n)]


def _implanted(conv: nn.Conv2d, channels):
    return nn.Sequential(ImplantConv2d.from_conv(conv, channels))


@pytest.mark.parametrize("stride, padding, dilation", [(1, 1, 1), (2, 1, 1), (1, 2, 2), (2, 0, 1)])
def test_a_centre_only_filter_is_recovered_exactly(stride, padding, dilation):
    torch.manual_seed(0)
    original = nn.Sequential(nn.Conv2d(4, 6, 3, stride, padding, dilation, bias=True))
    with torch.no_grad():
        original[0].weight[[1, 4]] = 0
        original[0].weight[[1, 4], :, 1, 1] = torch.randn(2, 4)
    pruned = _implanted(original[0], [1, 4])
    unexplained = fit_implants(pruned, original, {"0": [1, 4]}, _batches(), ridge=0.0)
    assert unexplained["0"] < 1e-6
    assert_close(pruned[0].implant.weight[:, :, 0, 0], original[0].weight[[1, 4], :, 1, 1], rtol=1e-4, atol=1e-5)
    x = _batches(1, seed=1)[0][0]
    assert_close(pruned(x), original(x), rtol=1e-4, atol=1e-5)


def test_a_full_filter_is_approximated_better_than_by_zero():
    torch.manual_seed(0)
    original = nn.Sequential(nn.Conv2d(4, 6, 3, 1, 1, bias=False))
    zero = _implanted(original[0], [0, 2, 5])
    fitted = copy.deepcopy(zero)
    unexplained = fit_implants(fitted, original, {"0": [0, 2, 5]}, _batches(size=12))
    assert 0 < unexplained["0"] < 1
    x = _batches(1, size=12, seed=3)[0][0]  # held-out images
    err = lambda m: (m(x) - original(x)).pow(2).mean()  # noqa: E731
    with torch.no_grad():
        assert err(fitted) < 0.95 * err(zero)
    assert original[0].weight.requires_grad and fitted[0].implant.weight.requires_grad


def test_prune_to_budget_fits_implants_on_the_scoring_batches():
    torch.manual_seed(0)
    base = randomize_bn(create("resnet20", input_size=16)).eval()
    x = torch.randn(2, 3, 16, 16)
    data = ScoringData([(torch.randn(16, 3, 16, 16), torch.zeros(16, dtype=torch.long)) for _ in range(2)])
    held_out = torch.randn(8, 3, 16, 16)
    models, results = {}, {}
    for init in ("zero", "fit"):
        models[init] = copy.deepcopy(base)
        results[init] = prune_to_budget(models[init], l1_scores, x, target=0.6, implant=0.3, data=data,
                                        implant_init=init)
    assert results["fit"].implanted == results["zero"].implanted and results["fit"].implanted
    assert not results["zero"].implant_fit
    assert results["fit"].implant_fit and all(0 <= v <= 1 for v in results["fit"].implant_fit.values())
    implants = [m for m in models["fit"].modules() if isinstance(m, ImplantConv2d)]
    assert implants and all(torch.count_nonzero(m.implant.weight) > 0 for m in implants)
    with torch.no_grad():
        ref = base(held_out)
        err = {k: (m.eval()(held_out) - ref).pow(2).mean() for k, m in models.items()}
    assert err["fit"] < err["zero"]


def test_fit_without_data_is_a_clear_error():
    model = create("resnet20", input_size=16)
    with pytest.raises(LeanconvError, match="fits the implants on data"):
        prune_to_budget(model, l1_scores, torch.randn(2, 3, 16, 16), target=0.6, implant=0.2, implant_init="fit")
    with pytest.raises(LeanconvError, match="implant_init must be one of"):
        prune_to_budget(model, l1_scores, torch.randn(2, 3, 16, 16), target=0.6, implant_init="ones")


class _Twice(nn.Module):
    def __init__(self, conv):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        return self.conv(self.conv(x))


def test_a_layer_that_runs_twice_cannot_be_fitted():
    conv = nn.Conv2d(4, 4, 3, padding=1)
    pruned = _Twice(ImplantConv2d.from_conv(conv, [1]))
    with pytest.raises(LeanconvError, match="ran 2 times; use --implant-init zero"):
        fit_implants(pruned, _Twice(conv), {"conv": [1]}, _batches())
