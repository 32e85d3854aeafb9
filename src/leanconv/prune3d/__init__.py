"""Three-dimensional pruning: depth x width x input resolution under a MACs budget.

Wang et al., "Accelerate CNNs from Three Dimensions: A Comprehensive Pruning Framework",
ICML 2021 (methods.md, Sec. 1). The pieces, in the order a run uses them:

* :mod:`.blocks`, :mod:`.block_importance`: depth: find residual blocks, rank them, bypass
  the least important; :mod:`.resolution`: record a smaller input side on a model;
* :mod:`.realise`: build a point ``(d, w, r)`` from the trained model (width through
  :func:`leanconv.width.prune_to_budget`);
* :mod:`.samples` (run on :mod:`.executors`): samples ``(d, w, r, validation accuracy)``;
* :mod:`.predictor`, :mod:`.selection`: the polynomial accuracy predictor, its form chosen
  by cross-validation;
* :mod:`.optimum`: the predictor maximised under the budget, re-solved until the realised
  model's counted MACs meet it; :mod:`.search`: the search box and the choice of the point.

The run itself (config, record) is :mod:`leanconv.runs.prune3d`::

    sel = select_predictor(X, y)                      # CV over full / low-rank, K, R
    cost = AnalyticCost(macs0)                        # or CalibratedCost.fit(points, macs)
    res = resolve(sel.model, cost, 0.5 * macs0, realise, allowed_r=discrete_ratios(32, 8))
"""

from leanconv.prune3d.block_importance import block_importance, bypass_loss_curve, rank_correlation
from leanconv.prune3d.blocks import BlockInfo, bypassed, depth_ratio, find_residual_blocks, prune_blocks
from leanconv.prune3d.executors import EXECUTORS, LocalExecutor, RayExecutor, create_executor
from leanconv.prune3d.optimum import (COST_TERMS, AnalyticCost, CalibratedCost, Choice, Resolution, analytic_macs,
                                      discrete_ratios, maximise, resolve)
from leanconv.prune3d.predictor import (FullPolynomial, LowRankPolynomial, Predictor, is_monotone, monotone_violation,
                                        predictor_from_dict)
from leanconv.prune3d.realise import Realised, StepSettings, realise
from leanconv.prune3d.resolution import resolution_ratio_to_side, set_resolution
from leanconv.prune3d.samples import SampleStore, collect_samples, plan_tasks
from leanconv.prune3d.selection import HoldoutComparison, Selection, compare_on_holdout, select_predictor

__all__ = [
    # depth and resolution
    "find_residual_blocks", "block_importance", "prune_blocks", "bypassed", "depth_ratio", "bypass_loss_curve",
    "rank_correlation", "BlockInfo", "set_resolution", "resolution_ratio_to_side",
    # realising points and collecting samples
    "realise", "Realised", "StepSettings", "SampleStore", "collect_samples", "plan_tasks", "EXECUTORS",
    "LocalExecutor", "RayExecutor", "create_executor",
    # accuracy predictors
    "Predictor", "FullPolynomial", "LowRankPolynomial", "predictor_from_dict", "is_monotone", "monotone_violation",
    "Selection", "select_predictor", "HoldoutComparison", "compare_on_holdout",
    # cost models (MACs) and the optimum
    "analytic_macs", "AnalyticCost", "CalibratedCost", "COST_TERMS", "discrete_ratios", "Choice", "maximise",
    "Resolution", "resolve",
]
