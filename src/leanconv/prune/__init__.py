"""Structural pruning: remove channels physically, under a MACs or parameter budget.

* :mod:`~leanconv.prune.groups`: ``channel_groups(model, x)``, coupled channels from
  torch-pruning's dependency graph, and ``channel_units`` (grouped-conv ties).
* :mod:`~leanconv.prune.channels`: ``remove_channels`` (smaller layers, in place) and
  ``implant_channels`` (HAP Neural Implant).
* :mod:`~leanconv.prune.budget`: ``prune_to_budget`` (global ranking, per-layer floor,
  ``round_to``, budget search on counted MACs/params) and ``iterative_prune``.
* :mod:`~leanconv.prune.cost_model`: the per-layer cost estimate behind the search.
* :mod:`~leanconv.prune.blocks`: depth pruning: find residual blocks, bypass them.
* :mod:`~leanconv.prune.block_importance`: rank residual blocks (loss or Hessian), check a ranking.
* :mod:`~leanconv.prune.resolution`: record a new input resolution on a model.
* :mod:`~leanconv.prune.pipeline`: one pruning run end to end (score, prune, fine-tune, measure).
"""

from leanconv.prune.budget import PruneResult, iterative_prune, prune_to_budget
from leanconv.prune.channels import can_implant, channel_counts, implant_channels, remove_channels
from leanconv.prune.block_importance import block_importance, bypass_loss_curve, rank_correlation
from leanconv.prune.blocks import BlockInfo, bypassed, depth_ratio, find_residual_blocks, prune_blocks
from leanconv.prune.groups import channel_groups, channel_units
from leanconv.prune.permute import fold_channel_orders
from leanconv.prune.resolution import resolution_ratio_to_side, set_resolution

__all__ = [
    # groups
    "channel_groups",
    "channel_units",
    # physical edits
    "remove_channels",
    "implant_channels",
    "can_implant",
    "fold_channel_orders",
    "channel_counts",
    # budgeted pruning
    "prune_to_budget",
    "iterative_prune",
    "PruneResult",
    # depth
    "find_residual_blocks",
    "block_importance",
    "prune_blocks",
    "bypassed",
    "depth_ratio",
    "bypass_loss_curve",
    "rank_correlation",
    "BlockInfo",
    # resolution
    "set_resolution",
    "resolution_ratio_to_side",
]
