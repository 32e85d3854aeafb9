"""Which channels of a network must go together: the pruning engine's groups.

* :mod:`.types`: ``Member`` and ``ChannelGroup``, the unit every criterion scores and the
  engine removes;
* :mod:`.groups`: ``channel_groups(model, x)``, built from torch-pruning's dependency graph
  (residual adds, concatenations, depthwise and grouped convs), and ``channel_units``.
"""

from leanconv.graph.groups import channel_groups, channel_units
from leanconv.graph.types import ChannelGroup, Member

__all__ = ["Member", "ChannelGroup", "channel_groups", "channel_units"]
