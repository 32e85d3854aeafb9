"""BatchNorm scaling factors as channel importance (``bn``).

Liu et al., "Learning Efficient Convolutional Networks through Network Slimming", ICCV 2017:
the BN layer after a conv computes ``y = gamma * x_hat + beta`` per channel, and a channel
whose ``|gamma|`` is small contributes little; Eq. (1) trains with an L1 penalty on
``gamma`` so that these factors become a pruning signal.

Group channel ``k`` scores the sum of ``|gamma[idxs[k]]|`` over the group's BatchNorm
``"out"`` members (two in a residual group whose channels meet at an add). A group with no
affine BatchNorm member raises: there is nothing to rank it by.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from leanconv.graph.types import ChannelGroup, Member
from leanconv.importance.base import Criterion, ScoringData, register_criterion
from leanconv.importance.scoring import sum_over_members, to_scores

__all__ = ["BatchNormScale", "bn"]


class BatchNormScale(Criterion):
    """``|gamma|`` of the group's BatchNorm layers, summed over them (Network Slimming)."""

    name = "bn"
    needs_data = False

    def __call__(
        self, model: nn.Module, groups: Sequence[ChannelGroup], data: ScoringData | None = None
    ) -> list[Tensor]:
        with torch.no_grad():
            totals = [sum_over_members(model, g, _gamma, ("out",), self.name) for g in groups]
        return to_scores(totals, groups, self.name)


def _gamma(module: nn.Module, member: Member) -> Tensor | None:
    if not isinstance(module, nn.modules.batchnorm._BatchNorm) or module.weight is None:
        return None
    idx = torch.as_tensor(member.idxs, dtype=torch.long, device=module.weight.device)
    return module.weight.detach().index_select(0, idx).abs()


@register_criterion("bn")
def bn() -> BatchNormScale:
    """|gamma| of BatchNorm (Liu et al. 2017)."""
    return BatchNormScale()
