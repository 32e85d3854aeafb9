"""Width (channel) pruning: remove channels physically, under a MACs or parameter budget.

Channel groups (which channels go together) come from :mod:`leanconv.graph`; the criteria
that rank them from :mod:`leanconv.importance`. Depth and resolution, the other two
dimensions of 3-D pruning, are in :mod:`leanconv.prune3d`.

* :mod:`~leanconv.width.channels`: ``remove_channels`` (smaller layers, in place) and
  ``implant_channels`` (HAP Neural Implant).
* :mod:`~leanconv.width.budget`: ``prune_to_budget`` (global ranking, per-layer floor,
  ``round_to``, budget search on counted MACs/params) and ``iterative_prune``.
* :mod:`~leanconv.width.cost_model`: the per-layer cost estimate behind the search.
* :mod:`~leanconv.width.latency_weights`: measured time per MAC of resized layers (``--latency-aware``).
* :mod:`~leanconv.width.permute`: channel orders for implants.
"""

from leanconv.width.budget import PruneResult, check_reachable, iterative_prune, prune_to_budget
from leanconv.width.channels import can_implant, channel_counts, implant_channels, remove_channels
from leanconv.width.permute import fold_channel_orders

__all__ = [
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
    "check_reachable",
]
