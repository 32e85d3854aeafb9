"""The pruning engine's unit: a group of coupled channels, removed together.

A *channel group* is a set of channels that must be removed together: the output channels
of a conv, the matching BN features, the input channels of every consumer, and, through
residual adds, depthwise convs or concatenations, the channels of other layers coupled to
them. :func:`leanconv.graph.groups.channel_groups` builds them from a dependency graph;
criteria (:mod:`leanconv.importance`) score them; :mod:`leanconv.width` removes them.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Member", "ChannelGroup"]


@dataclass(frozen=True)
class Member:
    """One layer's share of a group.

    ``module`` is the module path (``model.get_submodule(module)``); ``kind`` is ``"out"``
    when the group removes that module's output channels (conv filters, BN features, linear
    rows) and ``"in"`` when it removes its input channels (conv ``W[:, j]``, linear columns);
    ``idxs[k]`` is the channel index in that module that corresponds to group channel ``k``.
    """

    module: str
    kind: str
    idxs: tuple[int, ...]


@dataclass(frozen=True)
class ChannelGroup:
    """Coupled channels, removed together. ``root`` names the layer whose output channels
    define the group (its ``"out"`` member); ``size`` is the number of group channels."""

    root: str
    size: int
    members: tuple[Member, ...]

    def out_members(self) -> tuple[Member, ...]:
        return tuple(m for m in self.members if m.kind == "out")
