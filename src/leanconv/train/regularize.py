"""Sparsity-regularised training before a cut: a group lasso on the engine's channel groups.

The group lasso (Yuan and Lin 2006) used for structured sparsity in CNNs (Wen et al.,
"Learning Structured Sparsity in Deep Neural Networks", NeurIPS 2016; Torch-Pruning's "group
norm with sparse learning"): before a criterion scores, the model trains a few epochs of the
shared loop on

    CE + L * sum_g sum_k ||theta_{g,k}||_2

where ``g`` runs over the channel groups the pruning engine cuts (the caller traces them with
:func:`leanconv.graph.groups.channel_groups`, with the run's ``strict`` setting: the graph
package sits above this one) and
``theta_{g,k}`` concatenates every member's slice for group channel ``k``: the filter (weight
row) and bias entry of each conv or linear layer whose output it is, the input column of each
layer that reads it (for a grouped conv, the column in the rows of its conv group) and the
BatchNorm scale and shift entries. A member that maps several channels to one group channel
(a linear layer after a flatten) is left out, as it is of scoring. Taking the norm, not its
square, pulls every channel toward zero with the same force ``L`` whatever its size, so the
channels the data does not need shrink together across layers and a magnitude criterion
then finds them. The penalty is a number with no unit (a sum of weight norms); ``L`` scales it
against the mean cross-entropy in nats.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from leanconv.errors import LeanconvError
from leanconv.train.finetune import finetune
from leanconv.util import checks
from leanconv.util.progress import Progress

__all__ = ["GroupLasso", "Regularized", "regularize", "DEFAULT_STRENGTH"]

# Chosen by measurement (README, "Sparsity-regularised training"). Each SGD step moves every
# channel's norm toward zero by about lr * L (times ~10 with momentum 0.9), so the effect grows
# with the number of steps. On the trained ResNet-20 / Fashion-MNIST (penalty 618), 78 steps at
# lr 0.01 helped at L = 0.05 and hurt the fine-tuned accuracy at L = 0.2; 5e-3 gives one to three
# full epochs of Fashion-MNIST or CIFAR (390-470 steps each) about that helpful pull.
DEFAULT_STRENGTH = 5e-3


@dataclass(frozen=True)
class _Part:
    """One member's share of a group: ``idxs[k]`` is group channel ``k``'s index in ``module``."""

    name: str
    module: nn.Module
    kind: str  # "out" (its output channels) or "in" (its input channels)
    idxs: torch.Tensor


def _squares(part: _Part) -> torch.Tensor:
    """Sum of squares of the member's slice for every group channel (``[group size]``)."""
    module = part.module
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):  # affine (parts without parameters are dropped)
        sq = sum(p.pow(2) for p in (weight, bias) if p is not None)
    elif isinstance(module, (nn.Conv2d, nn.Linear)) and part.kind == "out":
        sq = weight.pow(2).flatten(1).sum(1) + (bias.pow(2) if bias is not None else 0)
    elif isinstance(module, (nn.Conv2d, nn.Linear)):  # input channel j: column j % w of its conv group's rows
        per = weight.pow(2).flatten(2).sum(2) if weight.dim() > 2 else weight.pow(2)  # [out, in / groups]
        blocks = getattr(module, "groups", 1)
        sq = per.reshape(blocks, per.shape[0] // blocks, per.shape[1]).sum(1).reshape(-1)  # [in]
    else:
        raise LeanconvError(f"the group lasso cannot take channels of layer {part.name} ({type(module).__name__})")
    return sq.index_select(0, part.idxs.to(sq.device))


def _has_parameters(module: nn.Module) -> bool:
    return any(isinstance(getattr(module, n, None), torch.Tensor) for n in ("weight", "bias"))


class GroupLasso:
    """``CE + strength * penalty`` (module docstring) for the shared loop (a
    :class:`~leanconv.train.loop.Loss`), over ``groups`` of ``model``: the
    :class:`~leanconv.graph.types.ChannelGroup` list of
    :func:`~leanconv.graph.groups.channel_groups` (module paths, kinds, channel indices)."""

    def __init__(self, model: nn.Module, groups: Sequence[Any], strength: float = DEFAULT_STRENGTH) -> None:
        if not groups:
            raise LeanconvError("regularisation needs channel groups to cut, and this model has none (every layer "
                                "is an output or excluded); drop --regularize-epochs")
        self.strength = checks.number(strength, "--regularize-strength", above=0)
        self.groups = [[_Part(m.module, model.get_submodule(m.module), m.kind, torch.tensor(m.idxs))
                        for m in g.members if _has_parameters(model.get_submodule(m.module))] for g in groups]
        self.channels = sum(g.size for g in groups)

    def channel_norms(self) -> list[torch.Tensor]:
        """``||theta_{g,k}||_2`` for every group ``g`` (one tensor of its channels each). The
        square root starts at the smallest positive float, so a channel at exactly zero gets a
        zero gradient, not NaN."""
        out = []
        for parts in self.groups:
            sq = sum(_squares(p) for p in parts)
            out.append(sq.clamp_min(torch.finfo(sq.dtype).tiny).sqrt())
        return out

    def penalty(self) -> torch.Tensor:
        """``sum_g sum_k ||theta_{g,k}||_2``, unscaled."""
        return torch.stack([n.sum() for n in self.channel_norms()]).sum()

    def describe(self) -> dict[str, Any]:
        return {"group_lasso": {"strength": self.strength, "groups": len(self.groups), "channels": self.channels}}

    def __call__(self, out: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out, y) + self.strength * self.penalty()


@dataclass(frozen=True)
class Regularized:
    """What a regularisation did: its settings, time, and the penalty (unscaled) before and after."""

    epochs: int
    strength: float
    groups: int
    channels: int
    seconds: float
    penalty_before: float
    penalty_after: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def regularize(model: nn.Module, data, groups: Sequence[Any], *, epochs: int, strength: float = DEFAULT_STRENGTH,
               lr: float, seed: int = 0, batch_size: int = 128, resolution: int | None = None,
               images: int | None = None, progress: Progress | None = None) -> Regularized:
    """Train ``model`` in place for ``epochs`` epochs of the shared loop on the group-lasso
    objective over ``groups`` (the channel groups the engine would cut:
    ``channel_groups(model, example, strict=...)``), on the first ``images`` training images of
    ``data`` (all when None), cosine from ``lr``; then BatchNorm statistics are re-estimated, as
    after any fine-tuning (:func:`~leanconv.train.finetune.finetune`). Raises
    :class:`LeanconvError` when there are no groups."""
    checks.whole(epochs, "--regularize-epochs", at_least=1)
    lasso = GroupLasso(model, groups, strength)
    with torch.no_grad():
        before = float(lasso.penalty())
    t0 = time.perf_counter()
    finetune(model, data, epochs=epochs, lr=lr, seed=seed, batch_size=batch_size, resolution=resolution,
             images=images, progress=progress, loss=lasso)
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        after = float(lasso.penalty())
    return Regularized(epochs, lasso.strength, len(lasso.groups), lasso.channels, seconds, before, after)
