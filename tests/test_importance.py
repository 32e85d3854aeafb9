"""Importance criteria: hand-computed values on toy models, group aggregation, registry."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import leanconv.importance.base as base
from leanconv.errors import LeanconvError
from leanconv.graph import ChannelGroup, Member
from leanconv.importance import (
    Criterion,
    ScoringData,
    check_scores,
    create_criterion,
    criterion_names,
    hessian,
    register_criterion,
)
from leanconv.importance.scoring import channel_entries


# ---------------------------------------------------------------- toy models and their groups


class ResToy(nn.Module):
    """stem -> bn0 -> [conv1 -> bn1 -> conv2 -> bn2] + skip -> head: one residual coupling."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        h = torch.relu(self.bn0(self.stem(x)))
        r = torch.relu(self.bn1(self.conv1(h)))
        h = torch.relu(self.bn2(self.conv2(r)) + h)
        return self.head(h.mean((2, 3)))


def res_groups() -> list[ChannelGroup]:
    ids = (0, 1, 2, 3)
    residual = ChannelGroup("stem", 4, (
        Member("stem", "out", ids), Member("bn0", "out", ids), Member("conv1", "in", ids),
        Member("conv2", "out", ids), Member("bn2", "out", ids), Member("head", "in", ids),
    ))
    inner = ChannelGroup("conv1", 4, (Member("conv1", "out", ids), Member("bn1", "out", ids), Member("conv2", "in", ids)))
    return [residual, inner]


class DwToy(nn.Module):
    """MobileNet-style: pointwise -> depthwise -> pointwise, the depthwise couples its in and out."""

    def __init__(self):
        super().__init__()
        self.pw1, self.bn1 = nn.Conv2d(3, 6, 1, bias=False), nn.BatchNorm2d(6)
        self.dw, self.bn2 = nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False), nn.BatchNorm2d(6)
        self.pw2, self.bn3 = nn.Conv2d(6, 4, 1, bias=False), nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        h = torch.relu(self.bn1(self.pw1(x)))
        h = torch.relu(self.bn2(self.dw(h)))
        h = torch.relu(self.bn3(self.pw2(h)))
        return self.head(h.mean((2, 3)))


def dw_groups() -> list[ChannelGroup]:
    six, four = tuple(range(6)), tuple(range(4))
    g1 = ChannelGroup("pw1", 6, (
        Member("pw1", "out", six), Member("bn1", "out", six), Member("dw", "out", six),
        Member("dw", "in", six), Member("bn2", "out", six), Member("pw2", "in", six),
    ))
    g2 = ChannelGroup("pw2", 4, (Member("pw2", "out", four), Member("bn3", "out", four), Member("head", "in", four)))
    return [g1, g2]


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.weight.data = torch.randn(n, generator=gen)
            m.bias.data = torch.randn(n, generator=gen)
            m.running_mean = torch.randn(n, generator=gen)
            m.running_var = torch.rand(n, generator=gen) + 0.5
    return model


def batches(n=2, size=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, 8, 8, generator=gen), torch.randint(0, 5, (size,), generator=gen)) for _ in range(n)]


def filter_norms(w: torch.Tensor, p: int) -> torch.Tensor:
    return w.detach().reshape(w.shape[0], -1).norm(p=p, dim=1)


# ---------------------------------------------------------------- registry


def test_unknown_name_raises():
    with pytest.raises(LeanconvError, match="unknown pruning method 'nope'"):
        create_criterion("nope")


def test_builtin_names_and_data_needs():
    assert {"hap", "l1", "l2", "bn", "taylor", "random", "synflow"} <= set(criterion_names())
    needs = {n: create_criterion(n).needs_data for n in ("hap", "l1", "l2", "bn", "taylor", "random", "synflow")}
    assert needs == {"hap": True, "taylor": True, "l1": False, "l2": False, "bn": False, "random": False, "synflow": False}


def test_custom_criterion_needs_no_engine_change():
    @register_criterion("test_channel_index")
    class ChannelIndex(Criterion):
        name = "test_channel_index"

        def __call__(self, model, groups, data):
            return [torch.arange(g.size, dtype=torch.float32) for g in groups]

    try:
        crit = create_criterion("test_channel_index")
        groups = res_groups()
        scores = crit(ResToy(), groups, None)
        check_scores(groups, scores, crit.name)  # what the engine runs on any criterion
        assert "test_channel_index" in criterion_names()
        assert scores[0].tolist() == [0.0, 1.0, 2.0, 3.0]
    finally:
        base._CRITERIA.pop("test_channel_index")


# ---------------------------------------------------------------- every criterion: shapes


SMALL = {"hap": {"min_probes": 2, "max_probes": 4, "probes_per_step": 2}}


@pytest.mark.parametrize("name", criterion_names())
@pytest.mark.parametrize("toy", ["res", "dw"])
def test_every_criterion_scores_every_group(name, toy):
    torch.manual_seed(0)
    model, groups = (ResToy(), res_groups()) if toy == "res" else (DwToy(), dw_groups())
    randomize_bn(model)
    crit = create_criterion(name, **SMALL.get(name, {}))
    scores = crit(model, groups, ScoringData(batches(1)))
    check_scores(groups, scores, name)
    assert [s.dtype for s in scores] == [torch.float32] * len(groups)
    assert [tuple(s.shape) for s in scores] == [(g.size,) for g in groups]


@pytest.mark.parametrize("name", ["taylor", "hap"])
def test_data_criteria_refuse_no_data(name):
    with pytest.raises(LeanconvError, match="needs data"):
        create_criterion(name)(ResToy(), res_groups(), None)


def test_member_with_wrong_index_count_raises():
    bad = [ChannelGroup("stem", 4, (Member("stem", "out", (0, 1, 2)),))]
    with pytest.raises(LeanconvError, match="3 indices for 4 channels"):
        create_criterion("l1")(ResToy(), bad, None)


# ---------------------------------------------------------------- magnitude


def test_l1_l2_hand_computed_on_toy_conv():
    conv = nn.Conv2d(2, 3, 3)
    signs = torch.tensor([1.0, -1.0]).repeat(9)  # 18 weights per filter, alternating sign
    with torch.no_grad():
        for k in range(3):
            conv.weight[k] = (k + 1) * signs.reshape(2, 3, 3)
    model = nn.Sequential(conv)
    groups = [ChannelGroup("0", 3, (Member("0", "out", (2, 0, 1)),))]  # channel k -> filter idxs[k]
    (l1,) = create_criterion("l1")(model, groups, None)
    (l2,) = create_criterion("l2")(model, groups, None)
    torch.testing.assert_close(l1, torch.tensor([54.0, 18.0, 36.0]))
    torch.testing.assert_close(l2, torch.tensor([3.0, 1.0, 2.0]) * math.sqrt(18))


def test_coupled_residual_group_sums_out_members():
    torch.manual_seed(1)
    model, groups = ResToy(), res_groups()
    l1, inner = create_criterion("l1")(model, groups, None)
    torch.testing.assert_close(l1, filter_norms(model.stem.weight, 1) + filter_norms(model.conv2.weight, 1))
    torch.testing.assert_close(inner, filter_norms(model.conv1.weight, 1))
    l1_all, _ = create_criterion("l1", include_inputs=True)(model, groups, None)
    cols = filter_norms(model.conv1.weight.transpose(0, 1), 1) + model.head.weight.detach().abs().sum(0)
    torch.testing.assert_close(l1_all, l1 + cols)


def test_depthwise_group_and_grouped_conv_inputs():
    torch.manual_seed(2)
    model, groups = DwToy(), dw_groups()
    l2, _ = create_criterion("l2")(model, groups, None)
    torch.testing.assert_close(l2, filter_norms(model.pw1.weight, 2) + filter_norms(model.dw.weight, 2))
    l2_all, _ = create_criterion("l2", include_inputs=True)(model, groups, None)
    # a depthwise conv's input j is read by filter j only; pw2 reads it through column j
    extra = filter_norms(model.dw.weight, 2) + filter_norms(model.pw2.weight.transpose(0, 1), 2)
    torch.testing.assert_close(l2_all, l2 + extra)
    grouped = nn.Conv2d(4, 6, 1, groups=2)  # W [6, 2, 1, 1]: input 3 = group 1, column 1
    rows = channel_entries(grouped, Member("g", "in", (3, 0)))
    torch.testing.assert_close(rows[0], grouped.weight[3:6, 1].reshape(-1))
    torch.testing.assert_close(rows[1], grouped.weight[0:3, 0].reshape(-1))


# ---------------------------------------------------------------- bn


def test_bn_uses_gamma_of_all_bn_members():
    model = randomize_bn(ResToy())
    with torch.no_grad():
        model.bn0.weight.copy_(torch.tensor([1.0, -2.0, 0.0, 0.5]))
        model.bn2.weight.copy_(torch.tensor([-0.25, 1.0, 3.0, 0.0]))
    residual, inner = create_criterion("bn")(model, res_groups(), None)
    torch.testing.assert_close(residual, torch.tensor([1.25, 3.0, 3.0, 0.5]))
    torch.testing.assert_close(inner, model.bn1.weight.detach().abs())


def test_bn_refuses_group_without_batchnorm():
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
    groups = [ChannelGroup("0", 2, (Member("0", "out", (0, 1)), Member("1", "in", (0, 1))))]
    with pytest.raises(LeanconvError, match="group 0 has no out member"):
        create_criterion("bn")(model, groups, None)


# ---------------------------------------------------------------- taylor


def test_taylor_equals_hand_computation():
    fc1, fc2 = nn.Linear(3, 2, bias=False), nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        fc1.weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.2, -1.0]]))
        fc2.weight.copy_(torch.tensor([[2.0, -1.5]]))
    model = nn.Sequential(fc1, fc2)
    x = torch.tensor([[1.0, 0.0, 2.0], [-1.0, 1.0, 1.0]])
    y = torch.tensor([[0.5], [-2.0]])
    mse = lambda out, t: (out - t).pow(2).mean()  # noqa: E731
    groups = [ChannelGroup("0", 2, (Member("0", "out", (0, 1)), Member("1", "in", (0, 1))))]
    (scores,) = create_criterion("taylor")(model, groups, ScoringData([(x, y)], loss_fn=mse))
    # h = W1 x, out = w2 . h; dL/dW1[i, j] = mean_b 2 (out_b - y_b) w2_i x_bj,
    # so sum_j W1[i, j] dL/dW1[i, j] = mean_b 2 (out_b - y_b) w2_i h_bi.
    h = x @ fc1.weight.detach().T
    err = h @ fc2.weight.detach().T - y
    hand = (2 * err * fc2.weight.detach() * h).mean(0).abs()
    torch.testing.assert_close(scores, hand.float())
    assert scores[0] > scores[1]


def test_taylor_includes_bn_terms_and_restores_state():
    torch.manual_seed(3)
    model = randomize_bn(ResToy()).train()
    model.bn1.weight.requires_grad_(False)
    old_grad = torch.full_like(model.stem.weight, 7.0)
    model.stem.weight.grad = old_grad.clone()
    data = ScoringData(batches(1))
    residual, _ = create_criterion("taylor")(model, res_groups(), data)
    # reference: one eval-mode backward, member terms |sum w * g| per channel
    ref = ResToy()
    ref.load_state_dict(model.state_dict())
    ref.eval()
    x, y = data.batches[0]
    nn.functional.cross_entropy(ref(x), y).backward()
    term = lambda p: (p.detach() * p.grad).reshape(p.shape[0], -1).sum(1)  # noqa: E731
    hand = (term(ref.stem.weight).abs() + (term(ref.bn0.weight) + term(ref.bn0.bias)).abs()
            + term(ref.conv2.weight).abs() + (term(ref.bn2.weight) + term(ref.bn2.bias)).abs())
    torch.testing.assert_close(residual, hand)
    assert model.training and model.bn0.training
    assert not model.bn1.weight.requires_grad and model.stem.weight.requires_grad
    torch.testing.assert_close(model.stem.weight.grad, old_grad)
    assert model.conv2.weight.grad is None


# ---------------------------------------------------------------- random


def test_random_is_seeded():
    groups = res_groups()
    a = create_criterion("random", seed=5)(ResToy(), groups, None)
    b = create_criterion("random", seed=5)(ResToy(), groups, None)
    c = create_criterion("random", seed=6)(ResToy(), groups, None)
    assert all(torch.equal(s, t) for s, t in zip(a, b))
    assert not torch.equal(a[0], c[0])


# ---------------------------------------------------------------- synflow


def test_synflow_hand_computation_two_linear_layers():
    fc1, fc2 = nn.Linear(3, 2, bias=False), nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        fc1.weight.copy_(torch.tensor([[1.0, -2.0, 3.0], [-0.5, 0.5, 1.0]]))
        fc2.weight.copy_(torch.tensor([[2.0, -3.0]]))
    data = ScoringData([], extra={"input_shape": [3]})
    # R = sum_i |w2_i| sum_j |W1_ij| = 2 * 6 + 3 * 2 = 18; score_i = |w2_i| rowsum_i / R.
    # A ReLU6 between the layers would saturate at the row sum 6 (zero gradient): the
    # linearised copy replaces it by the identity, so the score is the same.
    for mid in ([], [nn.ReLU6()]):
        model = nn.Sequential(fc1, *mid, fc2)
        groups = [ChannelGroup("0", 2, (Member("0", "out", (0, 1)), Member(str(1 + len(mid)), "in", (0, 1))))]
        (scores,) = create_criterion("synflow")(model, groups, data)
        torch.testing.assert_close(scores, torch.tensor([12 / 18, 6 / 18]))
    assert fc1.weight[0, 1] == -2.0 and isinstance(model[1], nn.ReLU6)  # the model itself is untouched


def test_synflow_folds_batchnorm_to_abs_affine():
    fc1, bn, fc2 = nn.Linear(2, 2, bias=False), nn.BatchNorm1d(2), nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        fc1.weight.copy_(torch.tensor([[1.0, -1.0], [2.0, 0.5]]))
        bn.weight.copy_(torch.tensor([-2.0, 1.0]))
        bn.bias.copy_(torch.tensor([0.5, -1.0]))
        bn.running_mean.copy_(torch.tensor([3.0, 1.0]))
        bn.running_var.copy_(torch.tensor([4.0, 0.25]))
        fc2.weight.copy_(torch.tensor([[1.0, -2.0]]))
    model = nn.Sequential(fc1, bn, fc2).train()
    groups = [ChannelGroup("0", 2, (Member("0", "out", (0, 1)), Member("1", "out", (0, 1)), Member("2", "in", (0, 1))))]
    (scores,) = create_criterion("synflow")(model, groups, ScoringData([], extra={"input_shape": [2]}))
    a = bn.weight / (bn.running_var + bn.eps).sqrt()
    b = bn.bias - a * bn.running_mean
    w2, rows = fc2.weight[0].abs(), fc1.weight.abs().sum(1)
    flow = (w2 * (a.abs() * rows + b.abs())).sum()
    torch.testing.assert_close(scores, (w2 * a.abs() * rows / flow).detach())
    assert model.training and bn.running_mean[0] == 3.0


def test_synflow_deep_net_finite_in_float64():
    depth = 56
    torch.manual_seed(4)
    layers = []
    for _ in range(depth):
        conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        nn.init.uniform_(conv.weight, -0.2, 0.2)
        layers += [conv, nn.ReLU()]
    model = nn.Sequential(*layers)
    with torch.no_grad():  # the same flow in float32 overflows: the test is meaningful
        ones = torch.ones(1, 8, 8, 8)
        assert not torch.isfinite(torch.func.functional_call(
            model, {n: p.abs() for n, p in model.named_parameters()}, (ones,)).sum())
    ids = tuple(range(8))
    groups = [
        ChannelGroup(str(2 * i), 8, (Member(str(2 * i), "out", ids), Member(str(2 * i + 2), "in", ids)))
        for i in range(depth - 1)
    ]
    scores = create_criterion("synflow")(model, groups, ScoringData(batches(1, size=1), extra={"input_shape": [8, 8, 8]}))
    check_scores(groups, scores, "synflow")
    assert all((s > 0).all() for s in scores)
    # conservation (Tanaka et al., Thm. 2): each bias-free layer carries the whole flow R
    torch.testing.assert_close(torch.stack([s.sum() for s in scores]), torch.ones(depth - 1), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- hap


def fake_traces(model, names, value_of):
    """A TraceResult with chosen traces (what channel_traces would return)."""
    w = {n: model.get_parameter(n) for n in names}
    return hessian.TraceResult(
        traces={n: value_of(n, p.shape[0]) for n, p in w.items()},
        stderr={n: torch.zeros(p.shape[0], dtype=torch.float64) for n, p in w.items()},
        numel_per_channel={n: p[0].numel() for n, p in w.items()},
        probes=8, converged=True, method="fake", seconds=0.0,
    )


def test_hap_equals_trace_over_numel_times_norm(monkeypatch):
    torch.manual_seed(5)
    model = randomize_bn(ResToy())
    with torch.no_grad():
        model.stem.weight[2] = 0.0
        model.conv2.weight[2] = 0.0
    calls = {}
    traces = {"stem.weight": [1.0, 2.0, 3.0, 4.0], "conv2.weight": [0.5, 0.25, 8.0, 1.0], "conv1.weight": [1.0] * 4}

    def fake(m, b, params=None, **kw):
        calls.update(params=params, **kw)
        return fake_traces(m, params, lambda n, c: torch.tensor(traces[n], dtype=torch.float64))

    monkeypatch.setattr(hessian.traces, "channel_traces", fake)
    crit = create_criterion("hap", min_probes=4, seed=3)
    data = ScoringData(batches(1))
    residual, inner = crit(model, res_groups(), data)
    assert set(calls["params"]) == {"stem.weight", "conv1.weight", "conv2.weight"}
    assert calls["min_probes"] == 4 and calls["seed"] == 3 and calls["loss_fn"] is data.loss_fn
    sq = lambda w: w.detach().reshape(4, -1).double().pow(2).sum(1)  # noqa: E731
    hand = (torch.tensor(traces["stem.weight"], dtype=torch.float64) / 27 * sq(model.stem.weight)
            + torch.tensor(traces["conv2.weight"], dtype=torch.float64) / 36 * sq(model.conv2.weight))
    torch.testing.assert_close(residual, hand.float())
    assert int(residual.argmin()) == 2 and residual[2] == 0.0
    assert crit.last_traces.method == "fake"


def test_hap_uses_cache_when_given_a_dir(monkeypatch, tmp_path):
    model, groups = ResToy(), res_groups()
    seen = {}

    def fake_cached(m, b, cache_dir, params=None, **kw):
        seen.update(cache_dir=cache_dir, progress=kw["progress"])
        return fake_traces(m, params, lambda n, c: torch.ones(c, dtype=torch.float64))

    monkeypatch.setattr(hessian.cache, "cached_channel_traces", fake_cached)
    monkeypatch.setattr(hessian.traces, "channel_traces", lambda *a, **k: pytest.fail("cache bypassed"))
    report = lambda done, total, info: None  # noqa: E731
    residual, _ = create_criterion("hap", cache_dir=tmp_path, progress=report)(model, groups, ScoringData(batches(1)))
    assert seen == {"cache_dir": tmp_path, "progress": report}
    sq = lambda w: w.detach().reshape(4, -1).double().pow(2).sum(1)  # noqa: E731
    torch.testing.assert_close(residual, (sq(model.stem.weight) / 27 + sq(model.conv2.weight) / 36).float())


def test_hap_shrinks_noisy_traces_toward_the_layer_mean(monkeypatch):
    """With ``shrink=True`` and standard errors that explain all the spread, every channel of
    a layer gets the layer's mean trace: a noisy negative estimate no longer puts a channel
    first, and the layer ranks by ||W_p||^2. By default hap ranks by the raw estimates."""
    torch.manual_seed(8)
    model = randomize_bn(ResToy())
    raw = {"stem.weight": [1.0, -2.0, 3.0, 2.0], "conv2.weight": [1.0] * 4, "conv1.weight": [0.5, -1.0, 2.5, 1.0]}

    def fake(m, b, params=None, **kw):
        r = fake_traces(m, params, lambda n, c: torch.tensor(raw[n], dtype=torch.float64))
        r.stderr = {n: torch.full((4,), 10.0, dtype=torch.float64) for n in r.traces}
        return r

    monkeypatch.setattr(hessian.traces, "channel_traces", fake)
    sq = lambda w: w.detach().reshape(4, -1).double().pow(2).sum(1)  # noqa: E731
    _, inner = create_criterion("hap", shrink=True)(model, res_groups(), ScoringData(batches(1)))
    torch.testing.assert_close(inner, (0.75 / 36 * sq(model.conv1.weight)).float())
    _, inner_raw = create_criterion("hap")(model, res_groups(), ScoringData(batches(1)))
    assert int(inner_raw.argmin()) == 1 and inner_raw[1] < 0


def test_hap_rejects_unknown_setting():
    with pytest.raises(LeanconvError, match="unknown setting"):
        create_criterion("hap", probes=3)


def test_hap_real_traces_match_last_traces():
    torch.manual_seed(6)
    model = randomize_bn(ResToy())
    with torch.no_grad():
        model.conv1.weight[1] = 0.0
    crit = create_criterion("hap", min_probes=4, max_probes=4, probes_per_step=4)
    residual, inner = crit(model, res_groups(), ScoringData(batches(1)))
    res = crit.last_traces
    assert res.probes == 4 and set(res.traces) == {"stem.weight", "conv1.weight", "conv2.weight"}
    sens = res.hap_sensitivity(model)
    torch.testing.assert_close(inner, sens["conv1.weight"].float())
    torch.testing.assert_close(residual, (sens["stem.weight"] + sens["conv2.weight"]).float())
    assert inner[1] == 0.0 and (inner != 0).sum() == 3


def test_hap_real_traces_rank_zeroed_channel_lowest():
    # logits are linear in the conv weights, so the loss is convex in them: every block trace
    # is positive and the channel with zero weights must rank lowest
    torch.manual_seed(7)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))
    with torch.no_grad():
        model[0].weight[3] = 0.0
    groups = [ChannelGroup("0", 4, (Member("0", "out", (0, 1, 2, 3)), Member("3", "in", (0, 1, 2, 3))))]
    crit = create_criterion("hap", min_probes=8, max_probes=8)
    (scores,) = crit(model, groups, ScoringData(batches(2)))
    assert (crit.last_traces.traces["0.weight"] > 0).all()
    assert scores[3] == 0.0 and (scores[:3] > 0).all()
    assert int(scores.argmin()) == 3


@pytest.mark.parametrize("bad,match", [
    (lambda x, y: (x[:, :1], y), "failed on an input"),
    (lambda x, y: (x, y + 8), "labels must lie in"),
    (lambda x, y: (x, y[:-1]), "one integer label per image"),
    (lambda x, y: ((x * 100).to(torch.uint8), y), "floating-point"),
    (lambda x, y: (x * float("nan"), y), "NaN or infinite"),
])
def test_scoring_batches_that_do_not_fit_are_clear_errors(bad, match):
    """Checked once, up front, for every criterion and for the Hessian traces."""
    from leanconv.importance.hessian import channel_traces
    from leanconv.models import create
    from leanconv.width import prune_to_budget

    torch.manual_seed(0)
    model = create("resnet20", num_classes=4, in_channels=3, input_size=16)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 4, (8,))
    batches = [bad(x, y)]
    with pytest.raises(LeanconvError, match=match):
        channel_traces(model, batches, min_probes=2, max_probes=2)
    with pytest.raises(LeanconvError, match=match):
        prune_to_budget(model, create_criterion("taylor"), x[:1], target=0.5, data=ScoringData(batches))


@pytest.mark.parametrize("bad", [lambda n: [0.0] * n, lambda n: torch.ones(n + 1), lambda n: torch.full((n,), float("nan"))])
def test_a_user_criterion_returning_bad_scores_is_named(bad):
    from leanconv.models import create
    from leanconv.width import prune_to_budget

    def mine(model, groups, data=None):
        return [bad(g.size) for g in groups]

    with pytest.raises(LeanconvError, match="criterion mine returned bad scores for group"):
        prune_to_budget(create("resnet20", num_classes=4, input_size=16), mine, torch.randn(1, 3, 16, 16), target=0.5)
