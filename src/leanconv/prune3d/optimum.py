"""The budgeted optimum over (depth, width, resolution), and the MACs model it obeys.

Wang et al., "Accelerate CNNs from Three Dimensions: A Comprehensive Pruning Framework",
ICML 2021: maximise the accuracy predictor ``F(d, w, r)`` subject to the cost budget
``FLOPs(d, w, r) <= T * FLOPs_0`` and box bounds, with the paper's cost proxy
``FLOPs(d, w, r) ~ d * w^2 * r^2 * FLOPs_0``. The paper solves it with Lagrange multipliers
(KKT). Here, as methods.md (Sec. 1, step 5) prescribes, the budget is taken as active and
eliminates ``r``: ``r = sqrt(T / (d w^2))`` for the proxy (for any cost increasing in ``r``:
the largest feasible ``r``), and a fine grid over ``(d, w)`` finds the best point. This is
exact when ``F`` does not fall as ``r`` grows (check with ``predictor.is_monotone``).

Units: everything here is MACs (multiply-accumulates; FLOPs = 2 x MACs, so budget
fractions are the same). The proxy ignores that the stem conv and classifier do not scale
with ``w`` and that blocks which change shape cannot be removed; ``CalibratedCost`` fits
those parts from counted models, and ``resolve`` re-solves until the realised model's
counted MACs meet the budget.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from leanconv.errors import LeanconvError
from leanconv.prune3d.predictor import Predictor

__all__ = [
    # cost models (MACs)
    "analytic_macs",
    "AnalyticCost",
    "CalibratedCost",
    "COST_TERMS",
    # the optimum
    "discrete_ratios",
    "Choice",
    "maximise",
    "Resolution",
    "resolve",
]

CostFn = Callable[[Any, Any, Any], Any]


def analytic_macs(d: Any, w: Any, r: Any, macs0: float) -> Any:
    """The paper's proxy ``MACs(d, w, r) = d * w^2 * r^2 * MACs_0`` (broadcasts over arrays)."""
    return d * w * w * r * r * macs0


class AnalyticCost:
    """``analytic_macs`` as a cost function, with the closed-form largest ``r`` in budget."""

    def __init__(self, macs0: float):
        if not macs0 > 0:
            raise LeanconvError(f"the full model's MACs must be positive, got {macs0}")
        self.macs0 = float(macs0)

    def __call__(self, d: Any, w: Any, r: Any) -> Any:
        return analytic_macs(d, w, r, self.macs0)

    def max_r(self, d: Any, w: Any, budget: float) -> Any:
        """``r = sqrt(T / (d w^2))`` with ``T = budget / MACs_0``: the active budget."""
        return np.sqrt(budget / (self.macs0 * d * w * w))


# name -> (scales with r^2, the factor in d and w)
COST_TERMS: dict[str, tuple[bool, Callable[[Any, Any], Any]]] = {
    "d*w^2*r^2": (True, lambda d, w: d * w * w),  # removable residual blocks
    "w^2*r^2": (True, lambda d, w: w * w),  # convs outside removable blocks
    "w*r^2": (True, lambda d, w: w),  # the stem conv (fixed input channels)
    "r^2": (True, lambda d, w: 1.0),  # layers whose channels do not scale
    "w": (False, lambda d, w: w),  # the classifier after global pooling
    "w^2": (False, lambda d, w: w * w),  # latency: the runtime's call cost, inside the width step's share
    "d": (False, lambda d, w: d),  # latency: the fixed cost of each removable block's ops (no r, no w)
    "1": (False, lambda d, w: 1.0),  # anything fixed
}


class CalibratedCost:
    """A MACs model fitted to counted models: ``MACs = sum_t c_t * term_t(d, w, r)``.

    Default terms ``d w^2 r^2`` (removable residual blocks: the paper's proxy),
    ``w^2 r^2`` (convs in blocks that cannot be removed, e.g. stride or shape changes,
    and shortcut projections), ``w r^2`` (the stem: its input channels are fixed) and ``w``
    (the classifier after global pooling: no ``r``). Fitted by least squares on relative
    errors (rows weighted by ``1 / MACs``); a MAC count has no negative parts, so a term
    that fits negative is dropped and the rest refitted. ``max_rel_error`` is the largest
    ``|model - counted| / counted`` over the fitting points. Every term is ``r^2 g(d, w)``
    or ``h(d, w)``, so the largest ``r`` in budget has a closed form (``max_r``).
    """

    def __init__(self, coef: dict[str, float]):
        unknown = sorted(set(coef) - set(COST_TERMS))
        if unknown:
            raise LeanconvError(f"unknown cost terms {unknown}; known: {sorted(COST_TERMS)}")
        self.coef = {t: float(c) for t, c in coef.items()}
        self.max_rel_error: float | None = None

    @classmethod
    def fit(cls, points: Any, macs: Any,
            terms: Sequence[str] = ("d*w^2*r^2", "w^2*r^2", "w*r^2", "w")) -> "CalibratedCost":
        """Fit from counted models: ``points`` [n, 3] rows ``(d, w, r)``, ``macs`` [n]."""
        points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        macs = np.asarray(macs, dtype=np.float64).reshape(-1)
        if len(points) != len(macs) or len(macs) < len(terms) or not np.all(macs > 0):
            raise LeanconvError(f"need at least {len(terms)} points with positive counted MACs "
                                f"to fit {len(terms)} cost terms, got {len(macs)}")
        d, w, r = points.T
        active = list(terms)
        while active:
            cols = np.stack([np.broadcast_to(cls({t: 1.0})(d, w, r), d.shape) for t in active], axis=1)
            coef, *_ = np.linalg.lstsq(cols / macs[:, None], np.ones(len(macs)), rcond=None)
            if np.all(coef >= 0):
                break
            active.pop(int(np.argmin(coef)))
        model = cls(dict(zip(active, coef)))
        model.max_rel_error = float(np.max(np.abs(model(d, w, r) / macs - 1.0)))
        return model

    def _parts(self, d: Any, w: Any) -> tuple[Any, Any]:
        """``(g, h)`` with ``MACs = r^2 g(d, w) + h(d, w)``."""
        g = h = 0.0
        for term, c in self.coef.items():
            scaled, factor = COST_TERMS[term]
            if scaled:
                g = g + c * factor(d, w)
            else:
                h = h + c * factor(d, w)
        return g, h

    def __call__(self, d: Any, w: Any, r: Any) -> Any:
        g, h = self._parts(d, w)
        return r * r * g + h

    def max_r(self, d: Any, w: Any, budget: float) -> Any:
        """Largest ``r`` with ``r^2 g + h <= budget``; NaN where even ``r = 0`` is over."""
        g, h = self._parts(np.asarray(d, dtype=np.float64), np.asarray(w, dtype=np.float64))
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.sqrt((budget - h) / g)
        return np.where(budget >= h, np.where(g > 0, r, np.inf), np.nan)

    def to_dict(self) -> dict:
        return {"coef": dict(self.coef), "max_rel_error": self.max_rel_error}

    @classmethod
    def from_dict(cls, data: dict) -> "CalibratedCost":
        model = cls(data["coef"])
        model.max_rel_error = data.get("max_rel_error")
        return model


def discrete_ratios(total: int, minimum: int = 1) -> tuple[float, ...]:
    """``k / total`` for ``k = minimum .. total``: kept blocks / blocks, or side / side.

    E.g. ``allowed_r=discrete_ratios(32, 8)`` for integer input sides of at least 8 pixels
    on a 32-pixel dataset, ``allowed_d=discrete_ratios(n_blocks, n_fixed)`` for depth.
    """
    if not 1 <= minimum <= total:
        raise LeanconvError(f"need 1 <= minimum <= total, got minimum={minimum}, total={total}")
    return tuple(k / total for k in range(minimum, total + 1))


@dataclass(frozen=True)
class Choice:
    """The solver's pick: ratios ``(d, w, r)``, the predictor's accuracy there, the cost
    model's MACs there, and the MACs budget the solver was given."""

    d: float
    w: float
    r: float
    predicted_accuracy: float
    predicted_macs: float
    budget_macs: float

    def to_dict(self) -> dict:
        return asdict(self)


def _bounds(bounds: Any, predictor: Any) -> np.ndarray:
    bounds = bounds if bounds is not None else getattr(predictor, "domain", None)
    if bounds is None:
        raise LeanconvError("give bounds=((dmin, 1), (wmin, 1), (rmin, 1)): "
                            "the predictor has no sample domain")
    b = np.asarray(bounds, dtype=np.float64)
    if b.shape != (3, 2) or np.any(b[:, 0] <= 0) or np.any(b[:, 1] > 1) or np.any(b[:, 0] > b[:, 1]):
        raise LeanconvError(f"bounds must be ((dmin, dmax), (wmin, wmax), (rmin, rmax)) "
                            f"with 0 < min <= max <= 1, got {bounds}")
    return b


def _axis(name: str, lo: float, hi: float, grid: int, allowed: Sequence[float] | None) -> np.ndarray:
    """Candidate values of one ratio: ``grid`` even steps, or the allowed ones in bounds."""
    if allowed is None:
        return np.linspace(lo, hi, grid) if hi > lo else np.array([lo])
    values = np.unique(np.asarray(allowed, dtype=np.float64))
    values = values[(values >= lo - 1e-12) & (values <= hi + 1e-12)]
    if len(values) == 0:
        raise LeanconvError(f"no allowed {name} value lies within the bounds [{lo:g}, {hi:g}]")
    return values


def _r_values(lo: float, hi: float, allowed: Sequence[float] | None, step: float | None):
    """The discrete resolutions (allowed ones, or multiples of ``step``), or None: continuous."""
    if allowed is not None and step is not None:
        raise LeanconvError("give allowed_r or r_step, not both")
    if step is None:
        return None if allowed is None else _axis("r", lo, hi, 0, allowed)
    if not step > 0:
        raise LeanconvError(f"r_step must be positive, got {step}")
    ks = np.arange(np.ceil(lo / step - 1e-9), np.floor(hi / step + 1e-9) + 1)
    return _axis("r", lo, hi, 0, ks * step)


def _largest_r(cost_fn: CostFn, D, W, budget: float, lo: float, hi: float, r_values) -> np.ndarray:
    """The largest feasible ``r`` of each ``(d, w)`` cell (the active budget); NaN where none."""
    if r_values is not None:
        ok = cost_fn(D[..., None], W[..., None], r_values) <= budget  # [nd, nw, nr]
        last = len(r_values) - 1 - np.argmax(ok[..., ::-1], axis=-1)
        return np.where(ok.any(axis=-1), r_values[last], np.nan)
    if hasattr(cost_fn, "max_r"):
        r = np.broadcast_to(np.asarray(cost_fn.max_r(D, W, budget), dtype=np.float64), D.shape)
    else:
        r = _bisect_r(cost_fn, D, W, budget, lo, hi)
    r = np.where(cost_fn(D, W, lo) <= budget, np.clip(np.nan_to_num(r, nan=lo), lo, hi), np.nan)
    over = cost_fn(D, W, r) > budget  # closed forms may overshoot by a rounding error
    r = np.where(over, np.maximum(r * (1 - 1e-9), lo), r)
    return np.where(cost_fn(D, W, r) <= budget, r, np.nan)


def _bisect_r(cost_fn: CostFn, D, W, budget: float, lo: float, hi: float, steps: int = 60):
    """Largest ``r`` in ``[lo, hi]`` within budget for a cost increasing in ``r`` (bisection)."""
    low, high = np.full(D.shape, lo), np.full(D.shape, hi)
    for _ in range(steps):
        mid = 0.5 * (low + high)
        ok = cost_fn(D, W, mid) <= budget
        low, high = np.where(ok, mid, low), np.where(ok, high, mid)
    return np.where(cost_fn(D, W, hi) <= budget, hi, low)


def _check_feasible(cost_fn: CostFn, budget: float, d: float, w: float, rs: Sequence[float]) -> None:
    """Refuse a budget that the smallest ``d`` and ``w`` miss at every resolution of ``rs`` (a
    measured cost need not grow with ``r``: a runtime may run one input side slower than a larger one)."""
    rs = np.atleast_1d(np.asarray(rs, dtype=np.float64))
    costs = np.broadcast_to(np.asarray(cost_fn(d, w, rs), dtype=np.float64), rs.shape)
    cheapest = int(np.argmin(costs))
    least, r, full = float(costs[cheapest]), float(rs[cheapest]), float(cost_fn(1.0, 1.0, 1.0))
    if least > budget:
        raise LeanconvError(
            f"impossible budget: {budget:.4g} MACs is {budget / full:.4f} of the full model, but the "
            f"smallest choice within bounds (d={d:.3g}, w={w:.3g}, r={r:.3g}) costs {least / full:.4f}; "
            "raise the budget or lower the bounds")


def maximise(predictor: Predictor, cost_fn: CostFn, budget_macs: float, *,
             bounds: Sequence[Sequence[float]] | None = None, grid: int = 201,
             allowed_d: Sequence[float] | None = None, allowed_w: Sequence[float] | None = None,
             allowed_r: Sequence[float] | None = None, r_step: float | None = None) -> Choice:
    """Maximise ``F(d, w, r)`` s.t. ``cost_fn(d, w, r) <= budget_macs`` and box bounds.

    Wang et al. (ICML 2021), solved as methods.md Sec. 1 step 5: for each ``(d, w)`` of a
    ``grid x grid`` mesh (or the ``allowed_d`` / ``allowed_w`` values: depth is discrete,
    kept blocks / blocks), ``r`` is the largest feasible resolution, in closed form where
    ``cost_fn`` has ``max_r(d, w, budget)`` (``AnalyticCost``, ``CalibratedCost``), else by
    bisection; with ``allowed_r`` (e.g. ``discrete_ratios(side, 8)``: integer sides >= 8) or
    ``r_step``, the largest allowed value in budget. ``cost_fn`` takes broadcasting numpy
    arrays and must increase with ``r``. ``bounds`` default to the box the predictor's
    samples span (``predictor.domain``): a polynomial is not trusted outside it. Raises
    ``LeanconvError`` when even the smallest corner of the box is over budget.
    """
    b = _bounds(bounds, predictor)
    if not budget_macs > 0:
        raise LeanconvError(f"the MACs budget must be positive, got {budget_macs}")
    ds, ws = _axis("d", *b[0], grid, allowed_d), _axis("w", *b[1], grid, allowed_w)
    r_values = _r_values(*b[2], allowed_r, r_step)
    _check_feasible(cost_fn, budget_macs, ds[0], ws[0], [b[2][0]] if r_values is None else r_values)
    D, W = np.meshgrid(ds, ws, indexing="ij")
    R = _largest_r(cost_fn, D, W, budget_macs, *b[2], r_values)
    cells = np.isfinite(R)
    X = np.stack([D[cells], W[cells], R[cells]], axis=1)
    accuracy = np.asarray(predictor.predict(X), dtype=np.float64)
    best = int(np.argmax(accuracy))
    d, w, r = (float(v) for v in X[best])
    return Choice(d, w, r, float(accuracy[best]), float(cost_fn(d, w, r)), float(budget_macs))


@dataclass(frozen=True)
class Resolution:
    """``resolve``'s result: the final choice, its counted MACs, and one trail row per round."""

    choice: Choice
    counted_macs: float
    trail: tuple[dict, ...] = field(default=())


def resolve(predictor: Predictor, cost_fn: CostFn, budget_macs: float,
            realise: Callable[[float, float, float], float], *, max_rounds: int = 5,
            **options: Any) -> Resolution:
    """Solve, realise, count, and re-solve until the counted MACs meet the budget.

    methods.md Sec. 1 step 2: the cost model is a proxy, so each choice is checked with
    ``realise(d, w, r) -> counted MACs`` (build the pruned model and count it). When the
    count exceeds ``budget_macs``, the solver's budget shrinks by the observed ratio,
    ``budget * predicted / counted`` (and at least by ``budget / counted``, so a round never
    repeats a choice), and the problem is solved again. A model under budget is accepted
    as is. ``options`` go to ``maximise``. Raises ``LeanconvError`` when ``max_rounds``
    rounds do not meet the budget.
    """
    solver_budget, trail, counted = float(budget_macs), [], float("nan")
    for round_ in range(1, max_rounds + 1):
        try:
            choice = maximise(predictor, cost_fn, solver_budget, **options)
        except LeanconvError as err:
            if round_ == 1:
                raise
            raise LeanconvError(f"after correcting the cost model with counted MACs: {err}") from err
        counted = float(realise(choice.d, choice.w, choice.r))
        trail.append({"round": round_, "solver_budget": solver_budget, "d": choice.d, "w": choice.w,
                      "r": choice.r, "predicted_accuracy": choice.predicted_accuracy,
                      "predicted_macs": choice.predicted_macs, "counted_macs": counted,
                      "within_budget": counted <= budget_macs})
        if counted <= budget_macs:
            return Resolution(choice, counted, tuple(trail))
        solver_budget = min(budget_macs * choice.predicted_macs / counted,
                            solver_budget * budget_macs / counted)
    raise LeanconvError(f"the realised model misses the budget after {max_rounds} rounds "
                        f"({counted:.4g} counted MACs > {budget_macs:.4g}); raise max_rounds "
                        "or calibrate the cost model")
