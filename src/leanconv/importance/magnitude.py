"""Magnitude criteria: the L1 and L2 norm of a channel's weights.

L1: Li et al., "Pruning Filters for Efficient ConvNets", ICLR 2017 (Sec. 3.1: the sum of
absolute kernel weights of filter ``i``, ``s_i = sum |F_i|``). L2: the Euclidean norm of the
same weights, ``||F_i||_2`` (e.g. He et al., "Soft Filter Pruning", IJCAI 2018, Eq. 3).

Group channel ``k`` scores the sum over the group's conv/linear ``"out"`` members of the
norm of that member's filter ``W[idxs[k]]`` (biases excluded, as in the papers). By default
``"in"`` members are left out, matching the classic filter criteria; with
``include_inputs=True`` the norms of the consumers' input columns ``W[:, idxs[k]]`` are added
as well (the weights that also disappear when the channel goes). Normalisation layers are
ignored here; ``bn`` scores them. Weights are read, never modified.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from leanconv.graph.types import ChannelGroup, Member
from leanconv.importance.base import Criterion, ScoringData, register_criterion
from leanconv.importance.scoring import channel_entries, is_weight_layer, sum_over_members, to_scores

__all__ = ["Magnitude", "l1", "l2"]


class Magnitude(Criterion):
    """``p``-norm (``p`` = 1 or 2) of each channel's filter, summed over the group's members."""

    needs_data = False

    def __init__(self, p: int, include_inputs: bool = False):
        if p not in (1, 2):
            raise ValueError(f"p must be 1 or 2, got {p}")
        self.p = p
        self.name = f"l{p}"
        self.include_inputs = include_inputs

    def __call__(
        self, model: nn.Module, groups: Sequence[ChannelGroup], data: ScoringData | None = None
    ) -> list[Tensor]:
        kinds = ("out", "in") if self.include_inputs else ("out",)
        with torch.no_grad():
            totals = [sum_over_members(model, g, self._member_norm, kinds, self.name) for g in groups]
        return to_scores(totals, groups, self.name)

    def _member_norm(self, module: nn.Module, member: Member) -> Tensor | None:
        if not is_weight_layer(module):
            return None
        w = channel_entries(module, member).double()
        return w.abs().sum(1) if self.p == 1 else w.pow(2).sum(1).sqrt()


@register_criterion("l1")
def l1(include_inputs: bool = False) -> Magnitude:
    """L1 norm of each filter (Li et al. 2017)."""
    return Magnitude(1, include_inputs)


@register_criterion("l2")
def l2(include_inputs: bool = False) -> Magnitude:
    """L2 norm of each filter."""
    return Magnitude(2, include_inputs)
