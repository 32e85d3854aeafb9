"""The 3-D search itself: the search box, the fitted predictor, and the chosen point.

Wang et al., "Accelerate CNNs from Three Dimensions" (ICML 2021), methods.md Sec. 1, steps
2-6. :func:`check_budget` refuses a budget the search box cannot reach (before any work);
:func:`sampling_floors` clips the sampling chains to where the optimum can lie;
:func:`fit_samples` fits the accuracy predictor (form, K, R by cross-validation) and the MACs
model on the samples; :func:`choose` maximises the predicted accuracy under the budget over
whole block counts and integer sides, realises the choice and re-solves with a tighter
budget while the counted MACs miss it. MACs are multiply-accumulates for one image (FLOPs =
2 x MACs: the same ratios).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
from torch import nn

from leanconv.cost import count
from leanconv.errors import LeanconvError
from leanconv.prune3d.blocks import shallowest
from leanconv.prune3d.latency import LATENCY_TERMS
from leanconv.prune3d.optimum import AnalyticCost, CalibratedCost, discrete_ratios, resolve
from leanconv.prune3d.predictor import is_monotone
from leanconv.prune3d.realise import Origin, Realised, min_side, realise
from leanconv.prune3d.resolution import resolution_ratio_to_side
from leanconv.prune3d.selection import compare_on_holdout, select_predictor

__all__ = ["check_budget", "sampling_floors", "fit_samples", "budget_curve", "fill_budget", "choose", "alternatives",
           "predicted_accuracy", "CLIP_MARGIN", "FILL_AIMS"]

log = logging.getLogger(__name__)


def check_budget(origin: Origin, target: float, *, w_min: float, r_min: float, min_per_stage: int) -> dict:
    """Raise ``LeanconvError`` (one line) unless the smallest model of the search box meets the
    budget; returns the box. The smallest model bypasses the costliest removable blocks down
    to the stage floors, runs at the smallest side, and keeps ``w_min^2`` of its MACs."""
    model = shallowest(origin.model, origin.blocks, origin.min_keep, min_per_stage=min_per_stage)
    side = min_side(origin, r_min)
    smallest = w_min ** 2 * count(model, (origin.shape[0], side, side)).macs / origin.macs
    box = {"d_min": origin.min_keep / len(origin.blocks) if origin.blocks else 1.0, "w_min": w_min,
           "side_min": side, "r_min": side / origin.side, "smallest_macs_ratio": smallest}
    if smallest > target:
        raise LeanconvError(
            f"impossible budget: target {target:g} of the MACs, but the smallest model in the search box "
            f"(d={box['d_min']:.3g}, w={w_min:g}, side {side}) keeps {smallest:.3f}; "
            "raise --target-flops or lower --w-min/--r-min")
    return box


CLIP_MARGIN = 0.9  # sample this far below the single-dimension budget level, to bracket it


def sampling_floors(box: dict, side: int, target: float, clip: bool) -> tuple[float, int]:
    """The width and side the sampling chains go down to. MACs fall about as ``w^2`` and
    ``r^2``, and depth or resolution cuts only raise the width a budgeted point can keep,
    so every point under the budget has ``w >= sqrt(target)`` (likewise ``r``); clipped, the
    chains stop at ``CLIP_MARGIN`` of that, inside the search box."""
    if not clip:
        return box["w_min"], box["side_min"]
    level = CLIP_MARGIN * target ** 0.5
    return max(box["w_min"], round(level, 4)), max(box["side_min"], min(side - 1, int(level * side)))


def _select(X: np.ndarray, y: np.ndarray, monotone: bool, seed: int):
    """``select_predictor``, preferring monotone candidates when asked (falls back if none)."""
    if monotone:
        try:
            return select_predictor(X, y, seed=seed, monotone=True), True
        except LeanconvError as err:
            log.info("no monotone predictor (%s); choosing among all", err)
    return select_predictor(X, y, seed=seed), False


def fit_samples(samples: list[dict], macs0: float, *, monotone: bool = True, seed: int = 0,
                holdout_train: int = 10, latency: bool = False) -> dict:
    """Fit the accuracy predictor and the cost model on ``samples``; returns JSON-able parts
    and the fitted objects (``"selection"``, ``"cost"``). The cost is counted MACs, or with
    ``latency`` each sample's predicted latency ratio (``macs0`` is then 1: the unpruned
    model), fitted on :data:`~leanconv.prune3d.latency.LATENCY_TERMS`."""
    X = np.array([[s["d"], s["w"], s["r"]] for s in samples], dtype=np.float64)
    y = np.array([s["accuracy"] for s in samples], dtype=np.float64)
    macs = np.array([s["latency" if latency else "macs"] for s in samples], dtype=np.float64)
    selection, filtered = _select(X, y, monotone, seed)
    holdout = None
    n_train = min(holdout_train, len(y) - 2)
    if n_train >= 3:
        h = compare_on_holdout(X, y, n_train, seed=seed)
        holdout = {"n_train": h.n_train, "n_test": h.n_test, "full_rmse": h.full_rmse, "lowrank_rmse": h.lowrank_rmse,
                   "lowrank_no_worse": h.lowrank_rmse <= h.full_rmse,
                   "full_model": h.full.model.to_dict(), "lowrank_model": h.lowrank.model.to_dict()}
    analytic = AnalyticCost(macs0)
    terms = LATENCY_TERMS if latency else ("d*w^2*r^2", "w^2*r^2", "w*r^2", "w")
    cost = CalibratedCost.fit(X, macs, terms) if len(y) >= len(terms) else analytic
    fitted = selection.model.predict(X)
    return {
        "selection": selection, "cost": cost,
        "predictor": {**selection.to_dict(), "monotone_filter": filtered, "monotone": is_monotone(selection.model),
                      "train_rmse": float(np.sqrt(np.mean((fitted - y) ** 2)))},
        "holdout": holdout,
        "cost_model": {"calibrated": cost.to_dict() if isinstance(cost, CalibratedCost) else None,
                       "analytic_max_rel_error": float(np.max(np.abs(analytic(*X.T) / macs - 1.0)))},
    }


def budget_curve(predictor, cost, budget: float, bounds, d_values, r_values, points: int = 41) -> list[dict]:
    """Predicted accuracy along the budget boundary: for each allowed ``d`` and ``points``
    widths in ``bounds``, the largest allowed ``r`` within budget (rows with none are left out)."""
    (w_lo, w_hi), (r_lo, r_hi) = bounds[1], bounds[2]
    rs = np.array([r for r in r_values if r_lo - 1e-12 <= r <= r_hi + 1e-12])
    rows = []
    for d in d_values:
        for w in np.linspace(w_lo, w_hi, points):
            ok = rs[np.asarray(cost(d, w, rs)) <= budget]
            if len(ok):
                r = float(ok.max())
                acc = float(predictor.predict(np.array([[d, w, r]]))[0])
                rows.append({"d": float(d), "w": float(w), "r": r, "predicted_accuracy": acc,
                             "predicted_macs": float(cost(d, w, r))})
    return rows


# of the budget, tried in turn: the width engine lands within 2% of what it is asked, either side
FILL_AIMS = (0.995, 0.99, 0.985, 0.98, 0.975, 0.97)


def fill_budget(origin: Origin, predictor: Any, built: dict, budget: float, d: float, w: float,
                 r: float) -> dict | None:
    """Spend the budget that whole block counts and integer sides leave unused on width.

    A choice under ``FILL_AIMS[0]`` of the budget is realised again with a wider ``w`` aimed
    just under the budget (MACs scale as ``w^2``), kept when its counted MACs fit and the
    predictor rates it no worse; ``built`` then holds the wider model. Returns what was done."""
    macs = built["point"].macs
    if macs >= FILL_AIMS[0] * budget or macs > budget or w >= 1:
        return None
    base = float(predictor.predict(np.array([[d, w, r]]))[0])
    for aim in FILL_AIMS:
        wider = min(1.0, w * math.sqrt(aim * budget / macs))
        if float(predictor.predict(np.array([[d, wider, r]]))[0]) < base:
            return None
        model, point = realise(origin, d, wider, r)
        if macs < point.macs <= budget:
            built["model"], built["point"] = model, point
            return {"w_solver": w, "w_filled": wider, "macs_before": macs, "macs_after": point.macs}
    return None


def choose(origin: Origin, fit: dict, budget: float, *, r_min: float,
           grid: int = 101) -> tuple[Any, nn.Module, Any, dict]:
    """Maximise the fitted predictor under ``budget`` MACs, realise the choice, count it and
    re-solve until the counted MACs meet the budget (``resolve``); a choice well under the
    budget is widened to just under it (:func:`fill_budget`). Returns the resolution, the
    realised model and point, and the predicted accuracy along the budget boundary."""
    predictor, cost = fit["selection"].model, fit["cost"]
    n = len(origin.blocks)
    d_values = discrete_ratios(n, max(1, origin.min_keep)) if n else (1.0,)
    r_values = discrete_ratios(origin.side, min_side(origin, r_min))
    built: dict[str, Any] = {}

    def realise_fn(d: float, w: float, r: float) -> float:
        built["model"], built["point"] = realise(origin, d, w, r)
        # a latency budget's width solver already lands just under its goal on the staircase
        built["fill"] = None if origin.latency is not None else fill_budget(origin, predictor, built, budget, d, w, r)
        return built["point"].cost

    options = {"allowed_d": d_values, "allowed_r": r_values, "grid": grid}
    result = resolve(predictor, cost, budget, realise_fn, **options)
    bounds = predictor.domain
    solver_budget = result.trail[-1]["solver_budget"]
    curve = budget_curve(predictor, cost, solver_budget, bounds, [d for d in d_values if d >= bounds[0][0] - 1e-12],
                         r_values)
    return result, built["model"], built["point"], {"curve": curve, "solver_budget": solver_budget,
                                                   "fill": built["fill"]}


def predicted_accuracy(fit: dict, point: Realised) -> float:
    """The fitted predictor's validation accuracy at a realised point."""
    return float(fit["selection"].model.predict(np.array([[point.d, point.w, point.r]]))[0])


def alternatives(origin: Origin, fit: dict, rows: list[dict], taken: set[tuple[int, int]],
                 k: int) -> list[tuple[nn.Module, Realised]]:
    """Up to ``k`` candidates beside the solver's choice, for a check by measurement: the point
    the predictor rates most accurate at each other (block count, side) of the budget boundary
    ``rows`` (:func:`budget_curve`), best first, realised. ``taken`` holds the (block count,
    side) pairs already in hand. A latency budget times them side by side with the choice: the
    table's prediction of a whole model is off by up to tens of percent at some sides, and
    which of several near-equal points measures within the target is a question for the clock."""
    n = len(origin.blocks)
    best: dict[tuple[int, int], dict] = {}
    for row in rows:
        at = (math.floor(row["d"] * n + 0.5) if n else 0, resolution_ratio_to_side(row["r"], origin.side))
        if at not in taken and (at not in best or row["predicted_accuracy"] > best[at]["predicted_accuracy"]):
            best[at] = row
    ranked = sorted(best.values(), key=lambda row: -row["predicted_accuracy"])[:max(0, k)]
    return [realise(origin, row["d"], row["w"], row["r"]) for row in ranked]
