"""Budgeted 3-D optimum: budget respected, known optimum found, discrete ratios, re-solving."""

import numpy as np
import pytest

from leanconv.errors import LeanconvError
from leanconv.prune3d import (
    AnalyticCost,
    CalibratedCost,
    FullPolynomial,
    analytic_macs,
    discrete_ratios,
    maximise,
    resolve,
)

MACS0 = 4.0e7
# F = -a (1-d)^2 - b (1-w)^2 - c (1-r)^2 under d w^2 r^2 <= T. In log ratios the budget is a
# half-space and F is concave where every ratio >= 1/2, so the KKT point is the maximum:
# 2a(1-d)d = lam, 2b(1-w)w = 2 lam, 2c(1-r)r = 2 lam. With lam = 1 at (0.7, 0.75, 0.8):
OPT = (0.7, 0.75, 0.8)
A, B, C = 1 / (2 * 0.7 * 0.3), 1 / (0.75 * 0.25), 1 / (0.8 * 0.2)
T = 0.7 * 0.75**2 * 0.8**2
BOUNDS = ((0.55, 1.0), (0.55, 1.0), (0.55, 1.0))


class Concave:
    def predict(self, X):
        d, w, r = np.asarray(X).T
        return 80 - A * (1 - d) ** 2 - B * (1 - w) ** 2 - C * (1 - r) ** 2


def test_analytic_macs_is_the_paper_proxy():
    assert analytic_macs(0.5, 0.5, 0.5, 1000.0) == pytest.approx(1000 / 32)
    cost = AnalyticCost(MACS0)
    r = cost.max_r(0.5, 0.8, 0.2 * MACS0)
    assert cost(0.5, 0.8, r) == pytest.approx(0.2 * MACS0, rel=1e-12)


def test_maximise_finds_the_analytic_optimum_within_budget():
    choice = maximise(Concave(), AnalyticCost(MACS0), T * MACS0, bounds=BOUNDS, grid=401)
    step = 0.45 / 400
    assert abs(choice.d - OPT[0]) <= step
    assert abs(choice.w - OPT[1]) <= step
    assert abs(choice.r - OPT[2]) <= 2 * step
    assert choice.predicted_macs <= T * MACS0
    assert choice.predicted_macs >= (1 - 1e-6) * T * MACS0  # the budget is active
    best = Concave().predict(np.array([OPT]))[0]
    assert best - 1e-4 <= choice.predicted_accuracy <= best
    assert choice.predicted_accuracy == Concave().predict(np.array([[choice.d, choice.w, choice.r]]))[0]


def test_bisection_agrees_with_the_closed_form():
    cost = AnalyticCost(MACS0)
    closed = maximise(Concave(), cost, 0.3 * MACS0, bounds=BOUNDS, grid=101)
    bisected = maximise(Concave(), lambda d, w, r: cost(d, w, r), 0.3 * MACS0, bounds=BOUNDS, grid=101)
    assert (closed.d, closed.w) == (bisected.d, bisected.w)
    assert closed.r == pytest.approx(bisected.r, abs=1e-9)


def test_calibrated_cost_recovers_the_parts_that_do_not_scale():
    pts = np.random.default_rng(0).uniform(0.3, 1.0, (12, 3))
    d, w, r = pts.T
    macs = 1000 * d * w**2 * r**2 + 300 * w**2 * r**2 + 50 * w * r**2 + 5 * w
    cost = CalibratedCost.fit(pts, macs)
    for term, value in {"d*w^2*r^2": 1000, "w^2*r^2": 300, "w*r^2": 50, "w": 5}.items():
        assert cost.coef[term] == pytest.approx(value, rel=1e-8)
    assert cost.max_rel_error < 1e-10
    # its closed-form r agrees with bisection on the same cost
    closed = maximise(Concave(), cost, 400.0, bounds=BOUNDS, grid=51)
    bisected = maximise(Concave(), lambda d, w, r: cost(d, w, r), 400.0, bounds=BOUNDS, grid=51)
    assert closed.r == pytest.approx(bisected.r, abs=1e-9) and closed.predicted_macs <= 400.0


def test_calibrated_cost_drops_negative_terms_and_reports_its_error():
    pts = np.random.default_rng(1).uniform(0.3, 1.0, (10, 3))
    d, w, r = pts.T
    macs = 1000 * d * w**2 * r**2 - 20  # least squares would want a negative constant
    cost = CalibratedCost.fit(pts, macs, terms=("d*w^2*r^2", "1"))
    assert set(cost.coef) == {"d*w^2*r^2"} and cost.coef["d*w^2*r^2"] > 0
    expected = np.max(np.abs(cost(d, w, r) / macs - 1))
    assert cost.max_rel_error == pytest.approx(expected) and cost.max_rel_error > 0.01
    assert CalibratedCost.from_dict(cost.to_dict()).coef == cost.coef


def test_discrete_depth_and_resolution_are_honoured():
    cost = AnalyticCost(MACS0)
    budget = 0.25 * MACS0
    choice = maximise(Concave(), cost, budget, bounds=((0.2, 1), (0.5, 1), (0.25, 1)),
                      allowed_d=discrete_ratios(9, 2), allowed_r=discrete_ratios(32, 8))
    assert choice.d * 9 == pytest.approx(round(choice.d * 9))
    assert choice.r * 32 == pytest.approx(round(choice.r * 32)) and choice.r * 32 >= 8
    assert choice.predicted_macs <= budget
    assert cost(choice.d, choice.w, choice.r + 1 / 32) > budget  # the largest side in budget
    stepped = maximise(Concave(), cost, budget, bounds=BOUNDS, r_step=1 / 16)
    assert stepped.r * 16 == pytest.approx(round(stepped.r * 16))


def test_impossible_budget_names_the_smallest_fraction():
    bounds = ((0.5, 1), (0.5, 1), (0.4, 1))  # smallest corner: 0.5 * 0.25 * 0.16 = 0.02
    with pytest.raises(LeanconvError, match=r"impossible budget.*costs 0\.0200"):
        maximise(Concave(), AnalyticCost(MACS0), 0.01 * MACS0, bounds=bounds)
    with pytest.raises(LeanconvError, match="no allowed d"):
        maximise(Concave(), AnalyticCost(MACS0), MACS0, bounds=BOUNDS, allowed_d=[0.1, 0.2])


def test_bounds_default_to_the_predictors_sample_box():
    X = np.random.default_rng(2).uniform(0.5, 1.0, (30, 3))
    model = FullPolynomial(2).fit(X, Concave().predict(X))
    choice = maximise(model, AnalyticCost(MACS0), 0.4 * MACS0, grid=51)
    for value, (lo, hi) in zip((choice.d, choice.w, choice.r), model.domain):
        assert lo <= value <= hi


def test_resolve_shrinks_the_budget_when_the_proxy_undercounts():
    cost = AnalyticCost(MACS0)
    budget = 0.3 * MACS0
    res = resolve(Concave(), cost, budget, lambda d, w, r: 1.05 * cost(d, w, r), bounds=BOUNDS)
    first, second = res.trail
    assert not first["within_budget"] and first["counted_macs"] > budget
    assert second["solver_budget"] == pytest.approx(budget / 1.05, rel=1e-6)
    assert second["within_budget"] and res.counted_macs <= budget
    assert res.choice.predicted_macs <= budget / 1.05


def test_resolve_fails_loudly_when_the_budget_is_never_met():
    cost = AnalyticCost(MACS0)
    with pytest.raises(LeanconvError):
        resolve(Concave(), cost, 0.3 * MACS0, lambda d, w, r: 10 * MACS0, bounds=BOUNDS, max_rounds=3)


def test_a_budget_only_a_larger_cheaper_side_meets_is_not_refused():
    """A measured cost need not grow with the side (a runtime can run side 21 slower than 24):
    the feasibility check looks at every allowed side, not only the smallest."""
    sides = np.array([0.5, 0.75, 1.0])

    def cost(d, w, r):
        slow_small = np.where(np.isclose(r, 0.5), 3.0, 1.0)  # the smallest side is the slowest
        return np.asarray(d * w * w * r * r * slow_small * MACS0)

    budget = 0.5 * 0.5**2 * 0.75**2 * MACS0 * 1.01  # only side 0.75 at the smallest d, w fits
    choice = maximise(Concave(), cost, budget, bounds=((0.5, 1), (0.5, 1), (0.5, 1)), allowed_r=sides)
    assert choice.r == pytest.approx(0.75) and choice.predicted_macs <= budget
    with pytest.raises(LeanconvError, match=r"impossible budget.*r=0\.75"):  # names the cheapest side
        maximise(Concave(), cost, budget / 2, bounds=((0.5, 1), (0.5, 1), (0.5, 1)), allowed_r=sides)
