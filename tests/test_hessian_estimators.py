"""The other curvature estimators behind HAP: Hutch++ and the exact Gauss-Newton blocks,
checked against exact matrices of a tiny network (float64), and their refusals."""

from __future__ import annotations

import json
import pytest
import torch
from torch import nn
from torch.func import functional_call

from leanconv.cli.main import main
from leanconv.errors import LeanconvError
from leanconv.importance import create_criterion, run_criterion
from leanconv.importance.base import ScoringData
from leanconv.importance.hessian import ESTIMATORS, TraceResult, channel_traces, default_params
from leanconv.importance.hessian.cache import cache_key
from leanconv.importance.hessian.gauss_newton import gauss_newton_traces
from leanconv.importance.hessian.hutchpp import split_budget
from test_hessian import channel_blocks, exact_hessian, tiny_batches, tiny_net


def double_net() -> tuple[nn.Module, list]:
    return tiny_net().double().eval(), [(x.double(), y) for x, y in tiny_batches()]


def exact_gauss_newton() -> tuple[torch.Tensor, torch.Tensor]:
    """Exact G = (1/N) sum_n J_n^T (diag p - p p^T) J_n over the flattened default weights,
    and the flat weights, from full per-image Jacobians."""
    net, batches = double_net()
    sel = default_params(net)
    names, shapes, sizes = list(sel), [p.shape for p in sel.values()], [p.numel() for p in sel.values()]
    fixed = {n: p.detach() for n, p in net.named_parameters() if n not in sel}
    flat = torch.cat([p.detach().reshape(-1) for p in sel.values()])

    def logits(w, x):
        p = {n: t.reshape(s) for n, t, s in zip(names, w.split(sizes), shapes)}
        return functional_call(net, {**fixed, **p}, (x[None],))[0]

    g, n = torch.zeros(flat.numel(), flat.numel(), dtype=torch.float64), 0
    for x, _ in batches:
        for xi in x:
            j = torch.func.jacrev(logits)(flat, xi)
            p = torch.softmax(logits(flat, xi), -1).detach()
            g += j.T @ (torch.diag(p) - p[:, None] * p[None]) @ j
            n += 1
    return g / n, flat


def per_channel(matrix_fn) -> torch.Tensor:
    _, _, shapes = exact_hessian()
    return torch.stack([matrix_fn(idx) for _, idx in channel_blocks(shapes)])


def flat(d: dict) -> torch.Tensor:
    return torch.cat([t.double().reshape(-1) for t in d.values()])


def test_gauss_newton_block_traces_and_quadratic_forms_are_exact():
    g, w = exact_gauss_newton()
    net, batches = double_net()
    r = gauss_newton_traces(net, batches, chunk=3)  # chunks that split the batches unevenly
    torch.testing.assert_close(flat(r.traces), per_channel(lambda i: g[i][:, i].trace()))
    torch.testing.assert_close(flat(r.quadratic), per_channel(lambda i: w[i] @ g[i][:, i] @ w[i]))
    assert (flat(r.traces) >= 0).all() and r.probes == 0 and r.method == "gauss-newton"
    assert 0 < r.achieved_rel_stderr < float("inf")  # the images' sampling error: JSON has no NaN


def test_gauss_newton_blocks_equal_the_hessian_blocks_of_a_piecewise_linear_net():
    """Within one layer the logits of a ReLU net are piecewise linear in that layer's weights,
    so the residual term of H vanishes on every channel block: the Gauss-Newton block traces
    are the exact Hessian block traces (module docstring of gauss_newton)."""
    h, _, shapes = exact_hessian()
    g, _ = exact_gauss_newton()
    blocks = channel_blocks(shapes)
    torch.testing.assert_close(per_channel(lambda i: g[i][:, i].trace()), per_channel(lambda i: h[i][:, i].trace()))
    cross = [(a, b) for a, b in zip(blocks, blocks[1:]) if a[0] != b[0]][0]  # two channels in different layers
    assert not torch.allclose(g[cross[0][1]][:, cross[1][1]], h[cross[0][1]][:, cross[1][1]])


def test_gauss_newton_differs_from_the_hessian_with_a_curved_activation():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 2, 3, padding=1),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 3)).double().eval()
    batches = [(x.double(), y) for x, y in tiny_batches()]
    gn = gauss_newton_traces(net, batches)
    hutch = channel_traces(net, batches, estimator="hutch++", max_probes=3 * 120 + 2, method="vmap")  # exact
    assert not torch.allclose(flat(gn.traces), flat(hutch.traces), rtol=1e-3, atol=1e-8)
    assert (flat(gn.traces) >= 0).all() and (flat(hutch.traces) < 0).any()  # G is PSD, this H is not


def test_hutchpp_with_a_sketch_as_large_as_the_weights_is_exact():
    h, _, shapes = exact_hessian()
    net, batches = double_net()
    size = sum(s.numel() for s in shapes)
    r = channel_traces(net, batches, estimator="hutch++", max_probes=3 * size + 2, min_probes=2, method="vmap")
    assert split_budget(3 * size + 2, size) == (size, size + 2)
    torch.testing.assert_close(flat(r.traces), per_channel(lambda i: h[i][:, i].trace()), atol=1e-8, rtol=1e-6)
    assert r.probes == 3 * size + 2 and r.method == "hutch++"
    assert r.achieved_rel_stderr >= 0


def test_hutchpp_same_seed_same_estimate_and_agrees_with_the_exact_trace_on_average():
    h, _, shapes = exact_hessian()
    net, batches = double_net()
    exact = per_channel(lambda i: h[i][:, i].trace())
    runs = [channel_traces(net, batches, estimator="hutch++", max_probes=60, seed=s) for s in range(8)]
    again = channel_traces(net, batches, estimator="hutch++", max_probes=60, seed=0)
    torch.testing.assert_close(flat(again.traces), flat(runs[0].traces))
    mean = torch.stack([flat(r.traces) for r in runs]).mean(0)
    # the sketched part is exact and the residual part unbiased: 8 seeds land far closer to the
    # exact traces than their spread (generous bound; the total trace is checked tightly)
    spread = torch.stack([flat(r.traces) for r in runs]).std(0)
    assert ((mean - exact).abs() <= 4 * spread / 8 ** 0.5 + 1e-9).float().mean() >= 0.9
    torch.testing.assert_close(mean.sum(), exact.sum(), rtol=0.1, atol=0.05)


def test_trace_result_round_trips_the_quadratic_forms():
    net, batches = double_net()
    r = gauss_newton_traces(net, batches)
    back = TraceResult.from_dict(json.loads(json.dumps(r.to_dict())))
    torch.testing.assert_close(flat(back.quadratic), flat(r.quadratic), rtol=0, atol=0)
    assert TraceResult.from_dict({**r.to_dict(), "quadratic": None}).quadratic is None


def test_the_estimator_is_part_of_the_cache_key():
    net, batches = tiny_net(), tiny_batches()
    keys = {cache_key(net, batches, estimator=e) for e in ESTIMATORS}
    assert len(keys) == len(ESTIMATORS)


def test_hap_block_form_ranks_by_the_quadratic_form():
    net, batches = tiny_net().eval(), tiny_batches()
    from leanconv.graph.groups import channel_groups

    groups = channel_groups(net, batches[0][0][:1])
    crit = create_criterion("hap", estimator="gauss-newton", form="block")
    scores = crit(net, groups, ScoringData(batches))
    quad = crit.last_traces.quadratic
    first = groups[0].out_members()[0]
    torch.testing.assert_close(scores[0], quad[f"{first.module}.weight"][list(first.idxs)].float(),
                               check_dtype=False)


@pytest.mark.parametrize("kw, words", [
    ({"estimator": "exact"}, "unknown Hessian estimator"),
    ({"estimator": "hutchinson", "form": "block"}, "needs the exact Gauss-Newton"),
    ({"form": "diagonal"}, "unknown form"),
])
def test_bad_estimator_settings_are_refused_before_any_work(kw, words):
    with pytest.raises(LeanconvError, match=words):
        crit = run_criterion("hap", probes=8, **kw)
        net, batches = tiny_net(), tiny_batches()  # an unknown estimator is only seen when it runs
        crit(net, __import__("leanconv.graph.groups", fromlist=["x"]).channel_groups(net, batches[0][0][:1]),
             ScoringData(batches))


def test_gauss_newton_refuses_another_loss_and_outputs_that_are_not_logits():
    net, batches = tiny_net(), tiny_batches()
    with pytest.raises(LeanconvError, match="only for the cross-entropy loss.*hutchinson"):
        gauss_newton_traces(net, batches, loss_fn=lambda z, y: z.pow(2).mean())
    flat_out = nn.Sequential(net, nn.Flatten(0))
    with pytest.raises(LeanconvError, match=r"logits \[N, classes\]"):
        gauss_newton_traces(flat_out, [(x, y) for x, y in batches], loss_fn=nn.functional.cross_entropy)


def test_cli_refuses_the_block_form_without_gauss_newton(trained_ckpt, tmp_path, capsys):
    out = tmp_path / "o"
    code = main(["prune", str(trained_ckpt), "--method", "hap", "--hessian", "hutchinson", "--hap-form", "block",
                 "--target-flops", "0.5", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "--hessian gauss-newton" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_defaults_are_the_gauss_newton_block_form_and_the_paper_stays_available():
    assert create_criterion("hap").form == "trace"  # the bare criterion is the paper's
    assert run_criterion("hap", probes=8).form == "block"  # a run's default (README: measured)
    assert run_criterion("hap", probes=8, estimator="hutchinson").form == "trace"
    assert run_criterion("hap", probes=8, estimator="hutchinson").trace_settings["estimator"] == "hutchinson"


@pytest.mark.parametrize("extra, method, probes", [([], "gauss-newton", 0),
                                                  (["--hessian", "hutchinson", "--probes", "8"], "", 8)])
def test_cli_prunes_with_the_default_and_with_the_papers_estimator(trained_ckpt, tmp_path, extra, method, probes):
    out = tmp_path / "gn"
    code = main(["prune", str(trained_ckpt), "--method", "hap", "--target-flops", "0.5", "--score-images", "32",
                 "--repeats", "2", "--reconstruct-images", "32", "--out", str(out), "--no-progress", *extra])
    record = json.loads((out / "record.json").read_text())
    assert code == 0 and record["config"]["hessian"] == (extra[1] if extra else "gauss-newton")
    assert record["hessian"]["probes"] == probes
    assert record["hessian"]["method"] == method or (not method and record["hessian"]["method"] != "gauss-newton")
    assert abs(record["achieved"]["macs"] - 0.5) <= 0.01


def test_gauss_newton_takes_jacobians_image_by_image_where_vmap_cannot():
    from test_hessian import _Square

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), _Square(), nn.Linear(4, 3)).double()
    data = [(torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 3, (6,)))]
    r = gauss_newton_traces(net, data)
    assert r.method == "gauss-newton (image by image)"
    w = {n: p.detach() for n, p in net.named_parameters()}
    sizes = [w["0.weight"].numel(), w["2.weight"].numel()]

    def logits(flat_w, x):
        a, b = flat_w.split(sizes)
        h = (x @ a.reshape(4, 3).T + w["0.bias"]) ** 2
        return h @ b.reshape(3, 4).T + w["2.bias"]

    flat_w = torch.cat([w["0.weight"].reshape(-1), w["2.weight"].reshape(-1)])
    g = torch.zeros(sum(sizes), sum(sizes), dtype=torch.float64)
    for x in data[0][0]:
        j = torch.func.jacrev(logits)(flat_w, x)
        p = torch.softmax(logits(flat_w, x), -1)
        g += j.T @ (torch.diag(p) - p[:, None] * p[None]) @ j / 6
    d = g.diagonal()
    torch.testing.assert_close(r.traces["0.weight"], d[:12].reshape(4, 3).sum(1))
    torch.testing.assert_close(r.traces["2.weight"], d[12:].reshape(3, 4).sum(1))
