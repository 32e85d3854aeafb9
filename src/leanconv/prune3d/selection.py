"""Choosing the accuracy predictor for three-dimensional pruning by cross-validation.

Wang et al., "Accelerate CNNs from Three Dimensions: A Comprehensive Pruning Framework",
ICML 2021: methods.md (Sec. 1, step 4) asks for the predictor's form, degree K and rank R
to be picked by cross-validated error. :func:`select_predictor` does that over the two
forms of :mod:`leanconv.prune3d.predictor` (full and low-rank polynomial);
:func:`compare_on_holdout` checks the two forms against each other on held-out samples.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from leanconv.errors import LeanconvError
from leanconv.prune3d.predictor import FullPolynomial, LowRankPolynomial, _as_samples, _unit_scale, is_monotone

logger = logging.getLogger(__name__)

__all__ = ["Selection", "select_predictor", "HoldoutComparison", "compare_on_holdout"]


@dataclass(frozen=True)
class Selection:
    """The cross-validated choice of accuracy predictor (``select_predictor``).

    ``model`` is the chosen candidate refitted on all samples. ``table`` has one row per
    candidate: kind, degree, rank (None for the full form), n_params, cv_rmse, and
    ``monotone`` where it was checked. ``cv_rmse`` and ``cv_r2`` are the held-out RMSE and
    R^2 of the chosen candidate from the pooled cross-validation predictions
    ``cv_predictions`` (each sample predicted by a fit that never saw it); R^2 is NaN when
    all accuracies are equal.
    """

    model: FullPolynomial | LowRankPolynomial
    table: tuple[dict, ...]
    cv_rmse: float
    cv_r2: float
    folds: int
    cv_predictions: tuple[float, ...]

    def to_dict(self) -> dict:
        return {"model": self.model.to_dict(), "table": list(self.table), "cv_rmse": self.cv_rmse,
                "cv_r2": self.cv_r2, "folds": self.folds, "cv_predictions": list(self.cv_predictions)}


def _candidates(kinds, degrees, ranks, seed) -> list:
    out: list = []
    for kind in kinds:
        if kind == FullPolynomial.kind:
            out += [FullPolynomial(k) for k in degrees]
        elif kind == LowRankPolynomial.kind:
            out += [LowRankPolynomial(k, r, seed=seed) for k in degrees for r in ranks]
        else:
            raise LeanconvError(f"unknown predictor kind {kind!r}; expected 'full' or 'lowrank'")
    if not out:
        raise LeanconvError("no candidate predictors: give at least one kind, degree and rank")
    return out


def _fold_ids(n: int, folds: int | None, seed: int) -> tuple[int, np.ndarray]:
    """Seeded fold of each sample; default leave-one-out up to 10 samples, else 5 folds."""
    if n < 3:
        raise LeanconvError(f"need at least 3 samples to cross-validate a predictor, got {n}")
    folds = (n if n <= 10 else 5) if folds is None else int(folds)
    if not 2 <= folds <= n:
        raise LeanconvError(f"folds must be between 2 and {n} for {n} samples, got {folds}")
    ids = np.empty(n, dtype=int)
    ids[np.random.default_rng(seed).permutation(n)] = np.arange(n) % folds
    return folds, ids


def _cv_predictions(template, X, y, ids, folds) -> np.ndarray:
    out = np.empty_like(y)
    for f in range(folds):
        test = ids == f
        model = type(template).from_dict(template.to_dict())
        out[test] = model.fit(X[~test], y[~test]).predict(X[test])
    return out


def _r2(y: np.ndarray, pred: np.ndarray) -> float:
    total = float(np.sum((y - y.mean()) ** 2))
    return 1.0 - float(np.sum((y - pred) ** 2)) / total if total > 0 else float("nan")


def select_predictor(X: Any, y: Any, kinds: Sequence[str] = ("full", "lowrank"),
                     degrees: Sequence[int] = (1, 2, 3), ranks: Sequence[int] = (1, 2, 3),
                     folds: int | None = None, seed: int = 0, monotone: bool = False) -> Selection:
    """Pick the predictor form, K and R by cross-validated RMSE (methods.md Sec. 1, step 4).

    ``folds=None`` means leave-one-out for up to 10 samples and 5 seeded folds above.
    Candidates are ranked by CV RMSE (6 significant digits, errors below 1e-9 of the RMS
    accuracy count as 0) and ties go to fewer numbers. With ``monotone=True`` a candidate
    whose all-sample fit decreases along d, w or r on the samples' box (``is_monotone``) is
    skipped: a filter on the ranking, not a constraint inside the fit (our choice).
    """
    X, y = _as_samples(X, y)
    folds, ids = _fold_ids(len(y), folds, seed)
    templates = _candidates(kinds, degrees, ranks, seed)
    preds = [_cv_predictions(t, X, y, ids, folds) for t in templates]
    errors = [float(np.sqrt(np.mean((y - p) ** 2))) for p in preds]
    table = [{"kind": t.kind, "degree": t.degree, "rank": getattr(t, "rank", None),
              "n_params": t.n_params, "cv_rmse": e} for t, e in zip(templates, errors)]
    floor = 1e-9 * _unit_scale(y)
    order = sorted(range(len(templates)),
                   key=lambda i: (float(f"{max(errors[i], floor):.6g}"), templates[i].n_params))
    for i in order:
        model = templates[i].fit(X, y)
        if monotone:
            table[i]["monotone"] = is_monotone(model)
            if not table[i]["monotone"]:
                continue
        logger.debug("predictor selection: %s", table)
        return Selection(model, tuple(table), errors[i], _r2(y, preds[i]), folds,
                         tuple(preds[i].tolist()))
    raise LeanconvError("no candidate predictor is monotone in d, w and r over the samples; "
                        "add samples or pass monotone=False")


@dataclass(frozen=True)
class HoldoutComparison:
    """Held-out RMSE of the full and the low-rank form trained on the same samples."""

    n_train: int
    n_test: int
    full_rmse: float
    lowrank_rmse: float
    full: Selection
    lowrank: Selection


def compare_on_holdout(X: Any, y: Any, n_train: int, seed: int = 0,
                       **select_options: Any) -> HoldoutComparison:
    """Train both forms on ``n_train`` seeded-random samples, score them on the rest.

    Each form picks its own K (and R) by cross-validation on the training samples only
    (``select_predictor(kinds=(form,), ...)``), so the held-out samples never influence a
    choice. Backs the check "with <= 10 samples the specialised predictor's held-out error
    is no worse than the full polynomial's".
    """
    X, y = _as_samples(X, y)
    if not 3 <= n_train < len(y):
        raise LeanconvError(f"n_train must be between 3 and {len(y) - 1} for {len(y)} samples, got {n_train}")
    perm = np.random.default_rng(seed).permutation(len(y))
    train, test = perm[:n_train], perm[n_train:]
    chosen = {kind: select_predictor(X[train], y[train], kinds=(kind,), seed=seed, **select_options)
              for kind in ("full", "lowrank")}
    rmse = {kind: float(np.sqrt(np.mean((s.model.predict(X[test]) - y[test]) ** 2)))
            for kind, s in chosen.items()}
    return HoldoutComparison(n_train, len(test), rmse["full"], rmse["lowrank"],
                             chosen["full"], chosen["lowrank"])
