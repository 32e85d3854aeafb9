"""Random channel scores (``random``): the baseline every criterion must beat.

Uniform ``[0, 1)`` scores from a generator seeded with ``seed``, drawn group by group in the
order given, so the same seed and groups always give the same ranking. Liu et al.,
"Rethinking the Value of Network Pruning", ICLR 2019, show random structured pruning is a
strong baseline after fine-tuning, which is why it is offered.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from leanconv.graph.types import ChannelGroup
from leanconv.importance.base import Criterion, ScoringData, register_criterion

__all__ = ["RandomScores", "random"]


class RandomScores(Criterion):
    """Seeded uniform scores; ignores the model's weights and the data."""

    name = "random"
    needs_data = False

    def __init__(self, seed: int = 0):
        self.seed = int(seed)

    def __call__(
        self, model: nn.Module, groups: Sequence[ChannelGroup], data: ScoringData | None = None
    ) -> list[Tensor]:
        gen = torch.Generator().manual_seed(self.seed)
        return [torch.rand(g.size, generator=gen, dtype=torch.float32) for g in groups]


@register_criterion("random")
def random(seed: int = 0) -> RandomScores:
    """Seeded random scores (baseline)."""
    return RandomScores(seed)
