"""Accuracy predictors for 3-D pruning: exact recovery, CV choice, held-out error, records."""

import json

import numpy as np
import pytest

from leanconv.errors import LeanconvError
from leanconv.prune3d import (
    FullPolynomial,
    LowRankPolynomial,
    compare_on_holdout,
    is_monotone,
    monotone_violation,
    predictor_from_dict,
    select_predictor,
)


def box(n, seed, lo=0.2):
    return np.random.default_rng(seed).uniform(lo, 1.0, (n, 3))


def quadratic(X):
    d, w, r = X.T
    return 70 + 10 * d + 12 * w * r - 6 * d * d + 4 * d * w - 5 * r * r + 3 * d * w * r


def separable(X):
    """Rank one, degree two in each ratio."""
    d, w, r = X.T
    return 30 * (1 + 2 * d - d * d) * (0.5 + w) * (2 - r + r * r)


def accuracy_like(X):
    """Smooth, saturating at the full model: an additive (CP rank <= 3) accuracy surface."""
    d, w, r = X.T
    return 90 - 5 * (1 - d) ** 2 - 20 * (1 - w) ** 2 - 10 * (1 - r) ** 2


def test_full_polynomial_recovers_an_exact_polynomial():
    coef = np.random.default_rng(0).normal(size=(3, 3, 3))
    X, Xt = box(60, 1), box(50, 2, lo=0.0)

    def truth(X):
        p = [X[:, c, None] ** np.arange(3) for c in range(3)]
        return np.einsum("ni,nj,nk,ijk->n", *p, coef)

    model = FullPolynomial(2).fit(X, truth(X))
    assert model.n_params == 27
    np.testing.assert_allclose(model.coef, coef, atol=1e-8)
    assert np.max(np.abs(model.predict(Xt) - truth(Xt))) < 1e-8


def test_full_polynomial_with_fewer_samples_than_coefficients():
    X = box(10, 3)
    y = accuracy_like(X)
    for ridge in (0.0, 1e-6):  # minimum-norm least squares, or ridge: both solvable
        model = FullPolynomial(3, ridge=ridge).fit(X, y)
        assert np.all(np.isfinite(model.coef))
        assert np.sqrt(np.mean((model.predict(X) - y) ** 2)) < 0.01


def test_lowrank_recovers_a_rank_one_separable_function():
    X, Xt = box(30, 4), box(100, 5)
    model = LowRankPolynomial(2, 1, ridge=1e-10).fit(X, separable(X))
    assert model.n_params == 9
    rel = np.max(np.abs(model.predict(Xt) - separable(Xt))) / np.max(np.abs(separable(Xt)))
    assert rel < 1e-6
    again = LowRankPolynomial(2, 1, ridge=1e-10).fit(X, separable(X))
    np.testing.assert_array_equal(again.predict(Xt), model.predict(Xt))  # deterministic by seed


def test_cross_validation_picks_degree_two_for_quadratic_data():
    X = box(80, 6)
    y = quadratic(X) + np.random.default_rng(7).normal(0, 0.05, 80)
    sel = select_predictor(X, y, kinds=("full",))
    errors = {row["degree"]: row["cv_rmse"] for row in sel.table}
    assert sel.model.degree == 2
    assert errors[2] < 0.5 * errors[1] and errors[2] < errors[3]
    assert sel.folds == 5


def test_selection_is_exact_on_noise_free_data():
    X = box(40, 8)
    sel = select_predictor(X, quadratic(X), kinds=("full",), degrees=(1, 2))
    assert sel.cv_r2 > 1 - 1e-12
    assert sel.cv_rmse < 1e-8
    assert len(sel.cv_predictions) == 40


def test_lowrank_is_no_worse_than_full_with_eight_samples():
    # Over data seeds 0..19 the low-rank form won 18 times (median RMSE 0.84 vs 2.14).
    rng = np.random.default_rng(2)
    X = rng.uniform(0.3, 1.0, (108, 3))
    y = accuracy_like(X) + rng.normal(0, 0.3, 108)
    cmp = compare_on_holdout(X, y, n_train=8, seed=0)
    print(f"held-out RMSE on {cmp.n_test} samples: full {cmp.full_rmse:.3f} "
          f"(K={cmp.full.model.degree}), low-rank {cmp.lowrank_rmse:.3f} "
          f"(K={cmp.lowrank.model.degree}, R={cmp.lowrank.model.rank})")
    assert cmp.n_train == 8 and cmp.n_test == 100
    assert cmp.full.folds == 8  # leave-one-out on 8 samples
    assert cmp.lowrank_rmse <= cmp.full_rmse
    assert cmp.lowrank_rmse < 1.5  # the accuracy spans about 15 points here


@pytest.mark.parametrize("model", [FullPolynomial(2, ridge=1e-7), LowRankPolynomial(2, 2)])
def test_record_round_trip_gives_identical_predictions(model):
    X = box(20, 9)
    model.fit(X, accuracy_like(X))
    record = json.loads(json.dumps(model.to_dict()))
    again = predictor_from_dict(record)
    Xt = box(30, 10)
    np.testing.assert_array_equal(again.predict(Xt), model.predict(Xt))
    assert again.n_params == model.n_params and again.domain == model.domain


def test_monotonicity_diagnostic():
    X = box(30, 11)
    up = FullPolynomial(2).fit(X, accuracy_like(X))
    assert is_monotone(up) and monotone_violation(up) == 0.0
    down = FullPolynomial(1).fit(X, X[:, 0] - X[:, 1])  # falls as w grows
    step = (down.domain[1][1] - down.domain[1][0]) / 8
    assert not is_monotone(down)
    assert monotone_violation(down) == pytest.approx(step, rel=1e-9)


def test_monotone_selection_skips_or_fails_loudly():
    X = box(30, 12)
    sel = select_predictor(X, accuracy_like(X), kinds=("full",), monotone=True)
    chosen = [row for row in sel.table if row["degree"] == sel.model.degree]
    assert is_monotone(sel.model) and chosen[0]["monotone"] is True
    with pytest.raises(LeanconvError, match="monotone"):
        select_predictor(X, -accuracy_like(X), kinds=("full",), monotone=True)


def test_user_errors_are_one_line():
    with pytest.raises(LeanconvError, match=r"shape \[n, 3\]"):
        FullPolynomial(1).fit(np.ones((4, 2)), np.ones(4))
    with pytest.raises(LeanconvError, match="not fitted"):
        LowRankPolynomial(1).predict(np.ones((1, 3)))
    with pytest.raises(LeanconvError, match="at least 3 samples"):
        select_predictor(np.ones((2, 3)), np.ones(2))
    with pytest.raises(LeanconvError, match="n_train"):
        compare_on_holdout(box(10, 0), np.ones(10), n_train=10)
    with pytest.raises(LeanconvError, match="unknown predictor kind"):
        predictor_from_dict({"kind": "spline"})
