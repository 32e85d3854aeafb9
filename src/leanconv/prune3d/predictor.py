"""Accuracy predictors over (depth, width, resolution) for three-dimensional pruning.

Wang et al., "Accelerate CNNs from Three Dimensions: A Comprehensive Pruning Framework",
ICML 2021 (the accuracy model). The validation accuracy of a network pruned to depth ratio
``d`` (kept residual blocks / original), width multiplier ``w`` and resolution ratio ``r``
(input side / original side), all in (0, 1], is modelled by the polynomial

    F(d, w, r) = sum_{i, j, k <= K} l_ijk d^i w^j r^k                        (full form)

with ``(K + 1)^3`` coefficients fitted by least squares. The paper's "specialised" polynomial
replaces the coefficient tensor ``l`` by a low-rank one. The rank-R CP form

    F(d, w, r) = sum_{l < R} (sum_i a_li d^i)(sum_j b_lj w^j)(sum_k c_lk r^k)   (low-rank form)

with ``3 R (K + 1)`` numbers is OUR reading (unverified: the paper has no public code),
fitted by alternating least squares. ``select_predictor`` (:mod:`leanconv.prune3d.selection`)
picks the form, K and R by cross-validated error, as methods.md (Sec. 1, step 4) asks.

Scale: ``y`` is in the caller's unit (percent or fraction). Both fits divide ``y`` by its RMS
before fitting and multiply the coefficients back, so ``ridge`` is relative to a unit-RMS
target and the fits are scale-equivariant.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence

import numpy as np

from leanconv.errors import LeanconvError

__all__ = [
    # the two forms
    "Predictor",
    "FullPolynomial",
    "LowRankPolynomial",
    "predictor_from_dict",
    # checks
    "monotone_violation",
    "is_monotone",
]


class Predictor(Protocol):
    """What the optimum needs: accuracy predictions for rows ``(d, w, r)``."""

    def predict(self, X: np.ndarray) -> np.ndarray: ...


def _as_samples(X: Any, y: Any = None):
    """Validate samples: ``X`` [n, 3] rows ``(d, w, r)``, ``y`` [n]; float64 arrays."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[1] != 3:
        raise LeanconvError(f"samples must have shape [n, 3] (d, w, r), got {list(X.shape)}")
    if not np.all(np.isfinite(X)):
        raise LeanconvError("samples (d, w, r) contain NaN or inf; drop those rows")
    if y is None:
        return X
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    if y.shape[0] != X.shape[0] or X.shape[0] == 0:
        raise LeanconvError(f"got {X.shape[0]} samples (d, w, r) but {y.shape[0]} accuracies")
    if not np.all(np.isfinite(y)):
        raise LeanconvError("accuracies contain NaN or inf; drop those samples")
    return X, y


def _powers(x: np.ndarray, degree: int) -> np.ndarray:
    """Vandermonde rows ``[1, x, x^2, ..., x^K]`` for each entry of ``x``: [n, K+1]."""
    return x[:, None] ** np.arange(degree + 1)


def _unit_scale(y: np.ndarray) -> float:
    s = float(np.sqrt(np.mean(y * y)))
    return s if s > 0 else 1.0


def _domain(X: np.ndarray) -> list[list[float]]:
    return [[float(X[:, c].min()), float(X[:, c].max())] for c in range(3)]


def _check_degree(degree: int, ridge: float) -> None:
    if int(degree) != degree or degree < 0:
        raise ValueError(f"degree must be a non-negative integer, got {degree}")
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")


class FullPolynomial:
    """Full tensor polynomial ``F = sum_{i,j,k<=K} l_ijk d^i w^j r^k`` (Wang et al. 2021).

    Fitted by ``numpy.linalg.lstsq``. With fewer samples than ``(K+1)^3`` coefficients the
    system is underdetermined: ``ridge=0`` returns the minimum-norm solution (the limit of
    ridge regression), and ``ridge > 0`` minimises ``|A l - y/s|^2 + ridge |l|^2`` (``s`` the
    RMS of ``y``), which makes the solution unique and stable. ``coef[i, j, k] = l_ijk``.
    """

    kind = "full"

    def __init__(self, degree: int = 2, ridge: float = 0.0):
        _check_degree(degree, ridge)
        self.degree, self.ridge = int(degree), float(ridge)
        self.coef: np.ndarray | None = None
        self.domain: list[list[float]] | None = None

    @property
    def n_params(self) -> int:
        return (self.degree + 1) ** 3

    def _design(self, X: np.ndarray) -> np.ndarray:
        p = [_powers(X[:, c], self.degree) for c in range(3)]
        return np.einsum("ni,nj,nk->nijk", *p).reshape(len(X), -1)

    def fit(self, X: Any, y: Any) -> "FullPolynomial":
        X, y = _as_samples(X, y)
        s = _unit_scale(y)
        a, b = self._design(X), y / s
        if self.ridge > 0:
            a = np.vstack([a, np.sqrt(self.ridge) * np.eye(self.n_params)])
            b = np.concatenate([b, np.zeros(self.n_params)])
        coef, *_ = np.linalg.lstsq(a, b, rcond=None)
        self.coef = (coef * s).reshape((self.degree + 1,) * 3)
        self.domain = _domain(X)
        return self

    def predict(self, X: Any) -> np.ndarray:
        if self.coef is None:
            raise LeanconvError("the predictor is not fitted; call fit(X, y) first")
        return self._design(_as_samples(X)) @ self.coef.reshape(-1)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "degree": self.degree, "ridge": self.ridge,
                "coef": None if self.coef is None else self.coef.tolist(), "domain": self.domain}

    @classmethod
    def from_dict(cls, data: dict) -> "FullPolynomial":
        model = cls(data["degree"], data.get("ridge", 0.0))
        if data.get("coef") is not None:
            model.coef = np.asarray(data["coef"], dtype=np.float64)
        model.domain = data.get("domain")
        return model


class LowRankPolynomial:
    """Rank-R CP polynomial ``F = sum_l A_l(d) B_l(w) C_l(r)``, each factor of degree K.

    Our reading (unverified) of the "specialised" polynomial of Wang et al. (ICML 2021):
    the coefficient tensor is ``l_ijk = sum_l a_li b_lj c_lk``, ``3 R (K+1)`` numbers.
    Fitted by alternating least squares on ``|F - y/s|^2 + ridge (|a|^2 + |b|^2 + |c|^2)``:
    with two factor sets fixed ``F`` is linear in the third, so each step is one small ridge
    regression; after each sweep the three factors of every term are rescaled to equal
    norms (same ``F``, least penalty). ``ridge > 0`` is required: a factor is defined only up
    to scale. The default 1e-4 biases an exact rank-1 fit by about 3e-4 relative and, on
    8 noisy samples, gave lower held-out error than 1e-6 (tests/test_search_predictor.py).
    ``restarts`` starts (the first near ``F = 1``, the others random, all from ``seed``) run
    together and the lowest objective wins, so a fit is deterministic. ``factors`` holds
    ``a``, ``b``, ``c`` as [R, K+1] arrays with the RMS scale folded into ``a``.
    """

    kind = "lowrank"

    def __init__(self, degree: int = 2, rank: int = 1, ridge: float = 1e-4, restarts: int = 4,
                 max_iter: int = 200, tol: float = 1e-9, seed: int = 0):
        _check_degree(degree, ridge)
        if int(rank) != rank or rank < 1 or ridge <= 0 or restarts < 1 or max_iter < 1:
            raise ValueError("need rank >= 1, ridge > 0, restarts >= 1 and max_iter >= 1")
        self.degree, self.rank, self.ridge = int(degree), int(rank), float(ridge)
        self.restarts, self.max_iter, self.tol, self.seed = int(restarts), int(max_iter), tol, seed
        self.factors: list[np.ndarray] | None = None
        self.domain: list[list[float]] | None = None
        self.objective: float | None = None

    @property
    def n_params(self) -> int:
        return 3 * self.rank * (self.degree + 1)

    def fit(self, X: Any, y: Any) -> "LowRankPolynomial":
        X, y = _as_samples(X, y)
        s = _unit_scale(y)
        vs = [_powers(X[:, c], self.degree) for c in range(3)]
        init = _initial_factors(self.seed, self.restarts, self.rank, self.degree)
        factors, objective = _als(vs, y / s, init, self.ridge, self.max_iter, self.tol)
        best = int(np.argmin(objective))  # the first of equals: deterministic
        self.objective = float(objective[best])
        self.factors = [factors[0][best] * s, factors[1][best], factors[2][best]]
        self.domain = _domain(X)
        return self

    def predict(self, X: Any) -> np.ndarray:
        if self.factors is None:
            raise LeanconvError("the predictor is not fitted; call fit(X, y) first")
        X = _as_samples(X)
        parts = [_powers(X[:, c], self.degree) @ f.T for c, f in enumerate(self.factors)]
        return np.sum(parts[0] * parts[1] * parts[2], axis=1)

    def to_dict(self) -> dict:
        factors = None if self.factors is None else [f.tolist() for f in self.factors]
        return {"kind": self.kind, "degree": self.degree, "rank": self.rank, "ridge": self.ridge,
                "restarts": self.restarts, "max_iter": self.max_iter, "tol": self.tol,
                "seed": self.seed, "factors": factors, "domain": self.domain}

    @classmethod
    def from_dict(cls, data: dict) -> "LowRankPolynomial":
        keys = ("ridge", "restarts", "max_iter", "tol", "seed")
        model = cls(data["degree"], data["rank"], **{k: data[k] for k in keys if k in data})
        if data.get("factors") is not None:
            model.factors = [np.asarray(f, dtype=np.float64) for f in data["factors"]]
        model.domain = data.get("domain")
        return model


def _initial_factors(seed: int, restarts: int, rank: int, degree: int) -> list[np.ndarray]:
    """Three [S, R, K+1] factor sets, one slice per restart: ``F = 1`` plus a small kick for
    the first, standard normal for the others."""
    rng = np.random.default_rng(seed)
    factors = [rng.standard_normal((restarts, rank, degree + 1)) for _ in range(3)]
    for f in factors:
        f[0] *= 0.1
        f[0, :, 0] += rank ** (-1.0 / 3.0)
    return factors


def _als(vs, y, factors, ridge, max_iter, tol):
    """Alternating least squares for all restarts at once; returns (factors, objective [S])."""
    factors = [f.copy() for f in factors]
    values = [np.einsum("np,srp->snr", v, f) for v, f in zip(vs, factors)]  # [S, n, R]
    previous = np.full(len(factors[0]), np.inf)
    for _ in range(max_iter):
        for m in range(3):
            others = values[(m + 1) % 3] * values[(m + 2) % 3]
            factors[m] = _ridge_step(vs[m], others, y, ridge)
            values[m] = np.einsum("np,srp->snr", vs[m], factors[m])
        factors, values = _balance(factors, values)
        residual = y - np.sum(values[0] * values[1] * values[2], axis=2)
        objective = np.sum(residual**2, axis=1) + ridge * sum(np.sum(f * f, axis=(1, 2)) for f in factors)
        if np.all(np.isfinite(previous)) and np.all(previous - objective <= tol * previous):
            break
        previous = objective
    return factors, objective


def _balance(factors, values):
    """Give the three factors of each rank-one term equal norms (same F, least penalty).

    ``F`` does not change under ``a_l -> t a_l, b_l -> b_l / t``; the ridge penalty is
    smallest when the three norms are equal (AM-GM), which ALS alone approaches slowly.
    """
    norms = np.stack([np.sqrt(np.sum(f * f, axis=2)) for f in factors])  # [3, S, R]
    if np.any(norms == 0):
        return factors, values
    scale = np.cbrt(np.prod(norms, axis=0)) / norms
    return ([f * c[:, :, None] for f, c in zip(factors, scale)],
            [v * c[:, None, :] for v, c in zip(values, scale)])


def _ridge_step(v: np.ndarray, others: np.ndarray, y: np.ndarray, ridge: float) -> np.ndarray:
    """Best factor set given the other two: ``F_n = sum_{l,i} others_nl v_ni a_li``, per restart."""
    restarts, n, rank = others.shape
    p = v.shape[1]
    m = (others[:, :, :, None] * v[None, :, None, :]).reshape(restarts, n, rank * p)
    lhs = np.einsum("snp,snq->spq", m, m) + ridge * np.eye(rank * p)
    rhs = np.einsum("snp,n->sp", m, y)
    return np.linalg.solve(lhs, rhs[:, :, None]).reshape(restarts, rank, p)


def predictor_from_dict(data: dict) -> FullPolynomial | LowRankPolynomial:
    """Rebuild a fitted predictor from its ``to_dict()`` record (JSON-able)."""
    kinds = {FullPolynomial.kind: FullPolynomial, LowRankPolynomial.kind: LowRankPolynomial}
    if data.get("kind") not in kinds:
        raise LeanconvError(f"unknown predictor kind {data.get('kind')!r}; expected one of {sorted(kinds)}")
    return kinds[data["kind"]].from_dict(data)


def _grid_values(predictor: Predictor, bounds, points: int) -> np.ndarray:
    """``F`` on a ``points^3`` grid over ``bounds`` (default: the predictor's sample box)."""
    bounds = bounds if bounds is not None else getattr(predictor, "domain", None)
    if bounds is None:
        raise LeanconvError("give bounds ((dmin, dmax), (wmin, wmax), (rmin, rmax)) "
                            "for an unfitted predictor")
    axes = [np.linspace(lo, hi, points) for lo, hi in bounds]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
    return np.asarray(predictor.predict(grid.reshape(-1, 3))).reshape(grid.shape[:3])


def _largest_drop(f: np.ndarray) -> float:
    """Largest decrease of ``f`` between neighbours along any of its three axes (0 if none)."""
    return max(np.max(-np.diff(f, axis=a), initial=0.0) for a in range(3))


def monotone_violation(predictor: Predictor, bounds: Sequence[Sequence[float]] | None = None,
                       points: int = 9) -> float:
    """Largest decrease of ``F`` between grid neighbours when ``d``, ``w`` or ``r`` grows.

    Evaluated on a ``points^3`` grid over ``bounds`` (default: the box the predictor's
    training samples span, since a polynomial is not trusted outside it). 0 means that
    accuracy never falls as the network gets deeper, wider or sees larger inputs.
    """
    return float(_largest_drop(_grid_values(predictor, bounds, points)))


def is_monotone(predictor: Predictor, bounds: Sequence[Sequence[float]] | None = None,
                points: int = 9, tol: float = 1e-9) -> bool:
    """True when ``F`` is non-decreasing in d, w and r on the grid of ``monotone_violation``.

    ``tol`` is relative to the largest ``|F|`` on the grid (fits are exact only to rounding).
    A diagnostic, not a fitting constraint: ``select_predictor(monotone=True)`` uses it to
    drop non-monotone candidates, and the optimum (which puts ``r`` on the budget boundary)
    is only right for predictors that pass it.
    """
    f = _grid_values(predictor, bounds, points)
    return bool(_largest_drop(f) <= tol * max(float(np.max(np.abs(f))), 1.0))
