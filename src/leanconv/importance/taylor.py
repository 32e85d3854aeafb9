"""First-order Taylor importance (``taylor``).

Molchanov et al., "Importance Estimation for Neural Network Pruning", CVPR 2019. Removing a
set of parameters ``S`` (setting them to zero) changes the loss, to first order, by
``sum_{s in S} w_s * dL/dw_s`` (their Eq. 3 and 8, group contribution). leanconv scores
group channel ``k`` by, for each of the group's ``"out"`` members, the magnitude of that
first-order change over the member's share of the channel,

    T_member(k) = | sum over the member's channel-k parameters of  w * dL/dw |,

summed over the members, and averaged over the given validation batches (one gradient per
batch; the absolute value is taken per batch, as the paper averages per-minibatch scores).
A member's channel-``k`` parameters are: for a conv/linear layer its filter/row
``W[idxs[k]]`` and bias entry; for a BatchNorm its ``gamma`` and ``beta`` entries. The BN
terms are kept on purpose: ``gamma * dL/dgamma + beta * dL/dbeta`` is exactly the first-order
change from zeroing the channel's BN output, i.e. from removing the channel (the paper's
best "FO on BN" variant), while the conv term measures zeroing the pre-BN activation.

The gradient is taken with the model in eval mode (BN running statistics, no dropout) by
``torch.autograd.grad``, so ``.grad`` fields are never touched; train/eval modes and
``requires_grad`` flags are restored afterwards.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from leanconv.graph.types import ChannelGroup, Member
from leanconv.importance.base import Criterion, ScoringData, register_criterion
from leanconv.importance.scoring import (channel_entries, is_norm_layer, is_weight_layer, member_module,
                                         require_batches, sum_over_members, to_scores)
from leanconv.util.model_io import to_model
from leanconv.util.modes import eval_mode

__all__ = ["Taylor", "taylor", "eval_with_grads"]


@contextmanager
def eval_with_grads(model: nn.Module, params: Sequence[Tensor]) -> Iterator[None]:
    """Eval mode and ``requires_grad`` on ``params`` for the block; both restored after."""
    flags = [p.requires_grad for p in params]
    with eval_mode(model):
        try:
            for p in params:
                p.requires_grad_(True)
            with torch.enable_grad():
                yield
        finally:
            for p, flag in zip(params, flags):
                p.requires_grad_(flag)


def _scored_params(model: nn.Module, groups: Sequence[ChannelGroup]) -> dict[tuple[str, str], Tensor]:
    """``(module path, "weight"|"bias") -> parameter`` for every out member Taylor can score."""
    out = {}
    for g in groups:
        for member in g.out_members():
            module = member_module(model, member, g)
            if not (is_weight_layer(module) or is_norm_layer(module)):
                continue
            for pname in ("weight", "bias"):
                p = getattr(module, pname, None)
                if isinstance(p, nn.Parameter):
                    out[(member.module, pname)] = p
    return out


class Taylor(Criterion):
    """``|sum w * dL/dw|`` per member and channel, summed over members, averaged over batches."""

    name = "taylor"
    needs_data = True

    def __call__(self, model: nn.Module, groups: Sequence[ChannelGroup], data: ScoringData | None) -> list[Tensor]:
        batches = require_batches(data, self.name)
        params = _scored_params(model, groups)
        keys, tensors = list(params), list(params.values())
        totals = [torch.zeros(g.size, dtype=torch.float64) for g in groups]
        with eval_with_grads(model, tensors):
            for x, y in batches:
                loss = data.loss_fn(model(to_model(x, model)), to_model(y, model))
                grads = torch.autograd.grad(loss, tensors, allow_unused=True)
                prods = {
                    k: p.detach() * g if g is not None else torch.zeros_like(p)
                    for k, p, g in zip(keys, tensors, grads)
                }
                for t, g in zip(totals, groups):
                    t += sum_over_members(model, g, _member_term(prods), ("out",), self.name)
        return to_scores([t / len(batches) for t in totals], groups, self.name)


def _member_term(prods: dict[tuple[str, str], Tensor]):
    """Per-member scorer: ``|sum of w * dL/dw|`` over the member's channel-k parameters."""

    def score(module: nn.Module, member: Member) -> Tensor | None:
        w, b = prods.get((member.module, "weight")), prods.get((member.module, "bias"))
        if w is None and b is None:
            return None
        idx = torch.as_tensor(member.idxs, dtype=torch.long, device=(w if w is not None else b).device)
        total = torch.zeros(len(idx), dtype=torch.float64, device=idx.device)
        if w is not None:
            entries = channel_entries(module, member, w) if w.dim() >= 2 else w.index_select(0, idx)[:, None]
            total += entries.double().sum(1)
        if b is not None:
            total += b.index_select(0, idx).double()
        return total.abs()

    return score


@register_criterion("taylor")
def taylor() -> Taylor:
    """First-order Taylor expansion of the loss (Molchanov et al. 2019)."""
    return Taylor()
