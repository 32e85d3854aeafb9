"""Structural pruning: remove channels physically, under a MACs or parameter budget.

* :mod:`~leanconv.prune.groups`: ``channel_groups(model, x)``, coupled channels from
  torch-pruning's dependency graph, and ``channel_units`` (grouped-conv ties).
* :mod:`~leanconv.prune.channels`: ``remove_channels`` (smaller layers, in place) and
  ``implant_channels`` (HAP Neural Implant).
* :mod:`~leanconv.prune.budget`: ``prune_to_budget`` (global ranking, per-layer floor,
  ``round_to``, budget search on counted MACs/params) and ``iterative_prune``.
* :mod:`~leanconv.prune.cost_model`: the per-layer cost estimate behind the search.
"""

from leanconv.prune.budget import PruneResult, iterative_prune, prune_to_budget
from leanconv.prune.channels import can_implant, channel_counts, implant_channels, remove_channels
from leanconv.prune.groups import channel_groups, channel_units

__all__ = [
    # groups
    "channel_groups",
    "channel_units",
    # physical edits
    "remove_channels",
    "implant_channels",
    "can_implant",
    "channel_counts",
    # budgeted pruning
    "prune_to_budget",
    "iterative_prune",
    "PruneResult",
]
