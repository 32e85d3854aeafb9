"""Three-dimensional pruning search: accuracy predictor and budgeted optimum.

Wang et al., "Accelerate CNNs from Three Dimensions: A Comprehensive Pruning Framework",
ICML 2021 (methods.md, Sec. 1). Samples ``(d, w, r, accuracy)`` (depth, width and
resolution ratios) fit a polynomial accuracy predictor (``predictor``, its form chosen by
cross-validation in ``selection``); the predictor is maximised under a MACs budget
(``optimum``), and ``resolve`` re-solves until the realised model's counted MACs meet the
budget::

    sel = select_predictor(X, y)                      # CV over full / low-rank, K, R
    cost = AnalyticCost(macs0)                        # or CalibratedCost.fit(points, macs)
    res = resolve(sel.model, cost, 0.5 * macs0, realise, allowed_r=discrete_ratios(32, 8))
"""

from leanconv.search.optimum import (
    COST_TERMS,
    AnalyticCost,
    CalibratedCost,
    Choice,
    Resolution,
    analytic_macs,
    discrete_ratios,
    maximise,
    resolve,
)
from leanconv.search.predictor import (
    FullPolynomial,
    LowRankPolynomial,
    Predictor,
    is_monotone,
    monotone_violation,
    predictor_from_dict,
)
from leanconv.search.selection import HoldoutComparison, Selection, compare_on_holdout, select_predictor

from leanconv.search.executors import EXECUTORS, LocalExecutor, RayExecutor, create_executor
from leanconv.search.realise import Realised, StepSettings, realise
from leanconv.search.samples import SampleStore, collect_samples, plan_tasks
from leanconv.search.three_d import Prune3dConfig, Prune3dResult, run_prune3d

__all__ = [
    # accuracy predictors
    "Predictor",
    "FullPolynomial",
    "LowRankPolynomial",
    "predictor_from_dict",
    "is_monotone",
    "monotone_violation",
    "Selection",
    "select_predictor",
    "HoldoutComparison",
    "compare_on_holdout",
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
    # the 3-D pruning run
    "Prune3dConfig",
    "Prune3dResult",
    "run_prune3d",
    "realise",
    "Realised",
    "StepSettings",
    "SampleStore",
    "collect_samples",
    "plan_tasks",
    "EXECUTORS",
    "LocalExecutor",
    "RayExecutor",
    "create_executor",
]
