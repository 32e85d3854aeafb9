"""Hutchinson channel traces (HAP) against the exact Hessian of a tiny network."""

from __future__ import annotations

import functools
import json
import logging
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from leanconv.errors import LeanconvError
from leanconv.importance import hessian
from leanconv.importance.hessian import cache as hessian_cache
from leanconv.importance.hessian import TraceResult, channel_traces, default_params, layer_traces
from leanconv.importance.hessian.cache import cached_channel_traces


def tiny_net() -> nn.Module:
    """conv(2->3, 3x3) + BN + ReLU + conv(3->2, 3x3) + avgpool + linear(2->3): 120 weights."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
        nn.Conv2d(3, 2, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 3),
    )
    with torch.no_grad():
        net[1].running_mean.normal_()
        net[1].running_var.uniform_(0.5, 2.0)
    return net


def tiny_batches() -> list:
    g = torch.Generator().manual_seed(1)
    sizes = (8, 8, 5)  # unequal sizes: the loss weights batches by n_b / N
    return [(torch.randn(n, 2, 6, 6, generator=g), torch.randint(0, 3, (n,), generator=g)) for n in sizes]


@functools.lru_cache(maxsize=None)
def exact_hessian() -> tuple[torch.Tensor, list, list]:
    """Exact Hessian of the size-weighted mean loss over the flattened default weights."""
    net, batches = tiny_net().eval(), tiny_batches()
    sel = default_params(net)
    names, shapes = list(sel), [p.shape for p in sel.values()]
    sizes = [p.numel() for p in sel.values()]
    fixed = {n: p.detach() for n, p in net.named_parameters() if n not in sel}
    total = sum(x.shape[0] for x, _ in batches)

    def loss(flat):
        p = {n: t.reshape(s) for n, t, s in zip(names, flat.split(sizes), shapes)}
        out = [nn.functional.cross_entropy(functional_call(net, {**fixed, **p}, (x,)), y) for x, y in batches]
        return sum(x.shape[0] / total * o for (x, _), o in zip(batches, out))

    flat = torch.cat([p.detach().reshape(-1) for p in sel.values()]).double()
    net.double()
    fixed = {n: t.double() for n, t in fixed.items()}
    batches = [(x.double(), y) for x, y in batches]
    h = torch.func.hessian(loss)(flat)
    return h, names, shapes


def channel_blocks(shapes) -> list[torch.Tensor]:
    """Index sets of every channel block, in the flattened order, with their layer index."""
    blocks, off = [], 0
    for layer, s in enumerate(shapes):
        per = s[1:].numel()
        blocks += [(layer, torch.arange(off + p * per, off + (p + 1) * per)) for p in range(s[0])]
        off += s.numel()
    return blocks


def exact_traces_and_variance(grouped: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact Tr(H_pp) and the exact variance of one Rademacher sample v_p.(H v_g)_p:
    2 (||H_pp||_F^2 - ||diag H_pp||^2) + ||H_{p, rest of the probe's support}||_F^2."""
    h, _, shapes = exact_hessian()
    blocks = channel_blocks(shapes)
    traces, var = [], []
    for layer, idx in blocks:
        support = torch.zeros(h.shape[0], dtype=torch.bool)
        for other_layer, other in blocks:
            if not grouped or other_layer == layer:
                support[other] = True
        support[idx] = False
        hpp = h[idx][:, idx]
        traces.append(hpp.trace())
        var.append(2 * (hpp.pow(2).sum() - hpp.diagonal().pow(2).sum()) + h[idx][:, support].pow(2).sum())
    return torch.stack(traces), torch.stack(var)


def flat(d: dict) -> torch.Tensor:
    return torch.cat([t.double() for t in d.values()])


def test_plain_hutchinson_is_unbiased_with_the_exact_standard_error():
    probes = 2000
    r = channel_traces(tiny_net(), tiny_batches(), min_probes=probes, max_probes=probes, probes_per_step=1000,
                       method="vmap")
    exact, var = exact_traces_and_variance(grouped=False)
    sigma = (var / probes).sqrt()
    assert r.probes == probes and list(r.traces) == ["0.weight", "3.weight", "6.weight"]
    z = (flat(r.traces) - exact) / sigma
    assert z.abs().max() < 4.0, z
    ratio = flat(r.stderr) / sigma  # the reported stderr estimates the true one
    assert ratio.min() > 0.8 and ratio.max() < 1.25, ratio


def test_layer_grouped_hutchinson_within_five_percent_of_exact():
    """Acceptance: median relative error <= 5% against torch.func.hessian."""
    r = channel_traces(tiny_net(), tiny_batches(), min_probes=2000, max_probes=2000, probes_per_step=1000,
                       probe_groups="layer", method="vmap")
    exact, var = exact_traces_and_variance(grouped=True)
    rel = (flat(r.traces) - exact).abs() / exact.abs()
    assert rel.median() <= 0.05, rel
    z = (flat(r.traces) - exact) / (var / r.probes).sqrt()
    assert z.abs().max() < 4.0, z


@pytest.mark.parametrize("groups", [1, 2])
def test_vmap_and_double_backward_agree_for_the_same_probes(groups):
    kw = dict(min_probes=8, max_probes=8, probes_per_step=4, seed=3, probe_groups=groups)
    a = channel_traces(tiny_net(), tiny_batches(), method="vmap", **kw)
    b = channel_traces(tiny_net(), tiny_batches(), method="double_backward", **kw)
    assert (a.method, b.method) == ("vmap", "double_backward")
    torch.testing.assert_close(a.traces, b.traces, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(a.stderr, b.stderr, rtol=1e-4, atol=1e-7)


def test_probe_i_does_not_depend_on_the_step_size():
    kw = dict(min_probes=12, max_probes=12, method="double_backward")
    a = channel_traces(tiny_net(), tiny_batches(), probes_per_step=3, **kw)
    b = channel_traces(tiny_net(), tiny_batches(), probes_per_step=12, **kw)
    torch.testing.assert_close(a.traces, b.traces, rtol=1e-5, atol=1e-8)


def test_stopping_rule_stops_earlier_when_loose():
    kw = dict(min_probes=8, max_probes=64, probes_per_step=4, probe_groups="layer", method="vmap")
    loose = channel_traces(tiny_net(), tiny_batches(), rel_stderr=1.0, **kw)
    tight = channel_traces(tiny_net(), tiny_batches(), rel_stderr=1e-4, **kw)
    assert loose.converged and loose.achieved_rel_stderr <= 1.0
    assert loose.probes == 8  # the first check is at min_probes
    assert not tight.converged and tight.probes == 64
    assert tight.achieved_rel_stderr > 1e-4


def test_stderr_shrinks_like_one_over_sqrt_probes():
    kw = dict(method="vmap", probes_per_step=512)
    few = channel_traces(tiny_net(), tiny_batches(), min_probes=32, max_probes=32, **kw)
    many = channel_traces(tiny_net(), tiny_batches(), min_probes=512, max_probes=512, **kw)
    ratio = (flat(few.stderr) / flat(many.stderr)).median()  # sqrt(512 / 32) = 4
    assert 2.5 < ratio < 6.0


def test_model_mode_and_state_restored():
    net = tiny_net().train()
    net[1].eval()  # a mixed-mode model comes back mixed
    before = {k: v.clone() for k, v in net.state_dict().items()}
    channel_traces(net, tiny_batches(), min_probes=4, max_probes=4)
    assert net.training and net[0].training and not net[1].training
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k  # BN statistics not updated, weights untouched
    assert all(p.grad is None for p in net.parameters())


def test_params_subset_scores_only_those_weights():
    net = tiny_net()
    sub = {"3.weight": net[3].weight}
    r = channel_traces(net, tiny_batches(), sub, min_probes=4, max_probes=4)
    assert list(r.traces) == ["3.weight"] and r.traces["3.weight"].shape == (2,)
    assert r.numel_per_channel == {"3.weight": 27}


def test_hap_sensitivity_and_layer_traces_by_hand():
    net = tiny_net()
    r = channel_traces(net, tiny_batches(), min_probes=8, max_probes=8)
    sens = r.hap_sensitivity(dict(net.named_parameters()))
    for name, w in default_params(net).items():
        for p in range(w.shape[0]):
            want = float(r.traces[name][p]) / w[p].numel() * float((w[p].detach() ** 2).sum())
            assert float(sens[name][p]) == pytest.approx(want, rel=1e-5)
        # the exact sum of the float32 channel traces: their own float32 sum is off by an ulp of
        # the channel values, and channel traces of both signs cancel to far less than that
        assert layer_traces(r)[name] == pytest.approx(math.fsum(r.traces[name].tolist()), rel=1e-12, abs=1e-15)
    assert r.relative_traces()["0.weight"][1] == pytest.approx(float(r.traces["0.weight"][1]) / 18)
    torch.testing.assert_close(r.hap_sensitivity(net), sens)


def _result(traces, stderr):
    t = {"w": torch.tensor(traces, dtype=torch.float64)}
    return TraceResult(traces=t, stderr={"w": torch.tensor(stderr, dtype=torch.float64)},
                       numel_per_channel={"w": 9}, probes=8, converged=False, method="fake", seconds=0.0)


def test_shrunk_traces_pull_noisy_estimates_to_the_mean():
    t = [1.0, 2.0, 3.0, 6.0]
    # no noise: the raw estimates; noise that explains all the spread: the mean everywhere
    torch.testing.assert_close(_result(t, [0.0] * 4).shrunk_traces()["w"], torch.tensor(t, dtype=torch.float64))
    torch.testing.assert_close(_result(t, [5.0] * 4).shrunk_traces()["w"], torch.full((4,), 3.0, dtype=torch.float64))
    # in between, by hand: mean 3, spread 3.5, mean s^2 1.5625, so tau^2 = 1.9375
    got = _result(t, [1.0, 1.0, 0.5, 2.0]).shrunk_traces()["w"]
    want = [3 + 1.9375 / (1.9375 + s2) * (v - 3) for v, s2 in zip(t, [1.0, 1.0, 0.25, 4.0])]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))
    assert float(_result([4.0], [9.0]).shrunk_traces()["w"][0]) == 4.0  # one channel: nothing to pool
    r = _result(t, [5.0] * 4)
    assert r.relative_traces(shrink=True)["w"][0] == pytest.approx(3.0 / 9)


def test_to_dict_round_trips_through_json():
    r = channel_traces(tiny_net(), tiny_batches(), min_probes=4, max_probes=4)
    back = TraceResult.from_dict(json.loads(json.dumps(r.to_dict())))
    assert back.traces["6.weight"].dtype == torch.float32
    torch.testing.assert_close(back.traces, r.traces, rtol=0, atol=0)
    assert (back.probes, back.converged, back.method) == (r.probes, r.converged, r.method)


def test_progress_reports_probes_done():
    calls = []
    channel_traces(tiny_net(), tiny_batches(), min_probes=8, max_probes=10, probes_per_step=4,
                   rel_stderr=1e-6, progress=lambda d, t, info: calls.append((d, t, info["method"])))
    assert [(d, t) for d, t, _ in calls] == [(4, 10), (8, 10), (10, 10)]


class _SquareFn(torch.autograd.Function):
    """An old-style autograd Function: no forward-mode AD and no vmap rule."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g


class _Square(nn.Module):
    def forward(self, x):
        return _SquareFn.apply(x)


def test_auto_falls_back_to_double_backward():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), _Square(), nn.Linear(4, 2))
    data = [(torch.randn(6, 3), torch.randint(0, 2, (6,)))]
    r = channel_traces(net, data, min_probes=4, max_probes=4, method="auto")
    assert r.method == "double_backward" and torch.isfinite(flat(r.traces)).all()
    with pytest.raises(RuntimeError):
        channel_traces(net, data, min_probes=4, max_probes=4, method="vmap")


@pytest.mark.parametrize(
    "kw",
    [dict(method="newton"), dict(min_probes=1), dict(min_probes=9, max_probes=8), dict(rel_stderr=0),
     dict(probe_groups=0), dict(stop_quantile=1.5)],
)
def test_bad_arguments_raise_user_errors(kw):
    with pytest.raises(LeanconvError):
        channel_traces(tiny_net(), tiny_batches(), **kw)


def test_foreign_parameter_and_empty_data_raise():
    with pytest.raises(LeanconvError, match="not a parameter"):
        channel_traces(tiny_net(), tiny_batches(), {"0.weight": nn.Parameter(torch.zeros(3, 2, 3, 3))})
    with pytest.raises(LeanconvError, match="no data"):
        channel_traces(tiny_net(), [])


def test_cache_hits_only_for_same_model_data_and_settings(tmp_path, monkeypatch, caplog):
    calls = []
    real = hessian.traces.channel_traces

    def counting(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(hessian.traces, "channel_traces", counting)
    net, data = tiny_net(), tiny_batches()
    kw = dict(min_probes=4, max_probes=4)
    first = cached_channel_traces(net, data, tmp_path, **kw)
    with caplog.at_level(logging.INFO, logger=hessian_cache.__name__):
        second = cached_channel_traces(net, data, tmp_path, **kw, method="double_backward")
    assert len(calls) == 1 and "using cached Hessian traces" in caplog.text
    torch.testing.assert_close(second.traces, first.traces, rtol=0, atol=0)
    cached_channel_traces(net, data, tmp_path, min_probes=4)  # max_probes differs
    assert len(calls) == 2
    with torch.no_grad():
        net[3].weight[0, 0, 0, 0] += 1e-3
    cached_channel_traces(net, data, tmp_path, **kw)
    assert len(calls) == 3
    with torch.no_grad():
        net[1].running_var[0] += 1e-3  # buffers count too
    cached_channel_traces(net, data, tmp_path, **kw)
    data[2][0][0, 0, 0, 0] += 1e-3
    cached_channel_traces(net, data, tmp_path, **kw)
    cached_channel_traces(net, data, tmp_path, **kw, seed=1)
    cached_channel_traces(net, data, tmp_path, **kw, loss_fn=nn.CrossEntropyLoss(label_smoothing=0.1))
    cached_channel_traces(net, data, tmp_path, **kw, loss_fn=nn.CrossEntropyLoss(label_smoothing=0.2))
    assert len(calls) == 8
    assert len(list(tmp_path.glob("hessian-*.json"))) == 8


def test_cache_ignores_a_corrupt_entry(tmp_path):
    net, data = tiny_net(), tiny_batches()
    key = hessian_cache.cache_key(net, data, min_probes=4, max_probes=4)
    (tmp_path / f"hessian-{key}.json").write_text("{not json")
    r = cached_channel_traces(net, data, tmp_path, min_probes=4, max_probes=4)
    assert r.probes == 4
    assert json.loads((tmp_path / f"hessian-{key}.json").read_text())["key"] == key
