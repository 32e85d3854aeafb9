"""Batched Hessian-vector products: every method gives the same ``H u`` for a stack of vectors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from leanconv.importance.hessian import channel_traces, default_params
from leanconv.importance.hessian.hvp import HVP_METHODS, _LeanOps, hvp, rademacher_probes


def net() -> nn.Module:
    """Stride, padding, dilation, groups, bias, eval batch norm, a residual add and a Linear."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(2, 4, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(4)
            self.down = nn.Conv2d(4, 4, 3, stride=2, padding=1, dilation=1, groups=2)
            self.dil = nn.Conv2d(4, 4, 3, padding=2, dilation=2, bias=True)
            self.short = nn.Conv2d(4, 4, 1, stride=2, bias=False)
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            h = torch.relu(self.bn(self.stem(x)))
            h = torch.tanh(self.dil(self.down(h))) + self.short(h)  # tanh: a nonzero second derivative
            return self.fc(h.mean((2, 3)))

    m = Net().eval()
    with torch.no_grad():
        m.bn.running_mean.normal_()
        m.bn.running_var.uniform_(0.5, 2.0)
        m.bn.weight.uniform_(0.5, 1.5)
        m.bn.bias.normal_()
    return m


def batches(dtype=torch.float32) -> list:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(n, 2, 7, 7, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)) for n in (5, 3)]


def weights(m: nn.Module) -> tuple[dict, dict]:
    sel = {n: p.detach() for n, p in default_params(m).items()}
    return sel, {n: p.detach() for n, p in m.named_parameters() if n not in sel}


@pytest.mark.parametrize("method", [m for m in HVP_METHODS if m != "double_backward"])
@pytest.mark.parametrize("chunk", [1, 3])
def test_batched_hvp_matches_one_vector_double_backward_float64(method, chunk):
    m = net().double()
    sel, fixed = weights(m)
    us = rademacher_probes(torch.Generator().manual_seed(2), sel, 4)
    data = batches(torch.float64)
    one = [hvp(m, sel, fixed, data, {n: u[i : i + 1] for n, u in us.items()}, method="double_backward")
           for i in range(4)]
    got = hvp(m, sel, fixed, data, us, method=method, chunk=chunk)
    for n in sel:
        torch.testing.assert_close(got[n], torch.cat([o[n] for o in one]), rtol=1e-10, atol=1e-12)


def test_lean_ops_keep_forward_values_and_gradients():
    m, (x, y) = net(), batches()[0]
    x.requires_grad_(True)
    ref = nn.functional.cross_entropy(m(x), y)
    ref_g = torch.autograd.grad(ref, [x, *m.parameters()])
    with _LeanOps():
        out = nn.functional.cross_entropy(m(x), y)
        g = torch.autograd.grad(out, [x, *m.parameters()])
    torch.testing.assert_close(out, ref)
    for a, b in zip(g, ref_g):
        torch.testing.assert_close(a, b)


def test_lean_ops_leave_training_batch_norm_alone():
    m, (x, _) = net().train(), batches()[0]
    ref = m(x)  # updates the running statistics once; the same update must happen again
    m2 = net().train()
    m2(x)
    with _LeanOps():
        torch.testing.assert_close(m2(x), m(x))
    torch.testing.assert_close(m2.bn.running_mean, m.bn.running_mean)
    assert ref.shape == (5, 3)


def test_channel_traces_lean_method_agrees_with_double_backward():
    kw = dict(min_probes=6, max_probes=6, probes_per_step=3, seed=3)
    a = channel_traces(net(), batches(), method="lean_double_backward", **kw)
    b = channel_traces(net(), batches(), method="double_backward", **kw)
    assert a.method == "lean_double_backward"
    for n in a.traces:
        torch.testing.assert_close(a.traces[n], b.traces[n], rtol=1e-4, atol=1e-6)


def test_auto_falls_back_from_lean_to_plain_double_backward(monkeypatch):
    from leanconv.importance.hessian import hvp as hessian_hvp

    def broken(*a, **kw):
        raise RuntimeError("no rule")

    monkeypatch.setitem(hessian_hvp._HVP, "vmap", broken)
    monkeypatch.setitem(hessian_hvp._HVP, "lean_double_backward", broken)
    r = channel_traces(net(), batches(), min_probes=4, max_probes=4, probes_per_step=2, method="auto")
    assert r.method == "double_backward" and torch.isfinite(torch.cat(list(r.traces.values()))).all()
