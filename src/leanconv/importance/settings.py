"""A run's settings as a criterion: the one place a method name, a probe count and a seed
become a configured criterion (``prune``, the width steps of 3-D pruning, ``compare``)."""

from __future__ import annotations

from typing import Any

from leanconv.importance.base import Criterion, create_criterion
from leanconv.importance.hessian.hap import HAP_ESTIMATOR, probe_settings
from leanconv.util.progress import Progress

__all__ = ["run_criterion"]


def run_criterion(method: str, *, probes: int, seed: int = 0, progress: Progress | None = None,
                  shrink: bool = False, estimator: str = HAP_ESTIMATOR, form: str | None = None) -> Criterion:
    """Criterion ``method``: ``hap`` with :func:`probe_settings` (``probes``, ``seed``), progress
    after every step of probes, ``shrink``, the curvature ``estimator`` and the score ``form``
    (:class:`~leanconv.importance.hessian.hap.HAP`; None = the block form with the
    Gauss-Newton estimator, the trace form with the others); ``random`` seeded by ``seed``; the others
    as they are (they take no settings). An unknown name or a bad combination raises before
    any work."""
    kwargs: dict[str, Any] = {}
    if method == "hap":
        kwargs = {**probe_settings(probes, seed), "progress": progress, "shrink": shrink, "estimator": estimator,
                  "form": form}
    elif method == "random":
        kwargs = {"seed": seed}
    return create_criterion(method, **kwargs)
