"""Shared machinery of the criteria: how a group member's channels map to parameter entries.

A :class:`~leanconv.graph.types.Member` names a module and, for every group channel
``k``, the channel ``idxs[k]`` of that module. Which *parameter entries* belong to that
channel depends on the layer and the member's kind:

- ``"out"`` member of a conv or linear layer: the whole filter/row ``W[idxs[k]]`` (and the
  bias entry ``b[idxs[k]]``);
- ``"in"`` member: every weight that reads input channel ``j = idxs[k]``. For a plain conv
  or linear layer that is the column ``W[:, j]``; for a grouped conv with ``g`` groups
  (``W`` of shape ``[C_out, C_in / g, kh, kw]``) it is ``W[rows of group j // (C_in/g),
  j % (C_in/g)]``, which for a depthwise conv is the single filter ``W[j]``;
- ``"out"`` member of a normalisation layer (BatchNorm, GroupNorm, ...): its per-channel
  affine entries ``gamma[idxs[k]]``, ``beta[idxs[k]]``.

A criterion scores each member with a small function and :func:`sum_over_members` adds the
members up (the group score of channel ``k`` is the sum over its members), raising if no
member of the group could be scored at all: a group is never skipped silently.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from leanconv.errors import LeanconvError
from leanconv.graph.types import ChannelGroup, Member
from leanconv.importance.base import ScoringData

__all__ = [
    "is_weight_layer",
    "is_norm_layer",
    "member_module",
    "channel_entries",
    "sum_over_members",
    "to_scores",
    "require_batches",
]

MemberScore = Callable[[nn.Module, Member], "Tensor | None"]

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm)


def is_norm_layer(module: nn.Module) -> bool:
    """BatchNorm / InstanceNorm / GroupNorm: per-channel affine parameters, no filters."""
    return isinstance(module, _NORMS)


def is_weight_layer(module: nn.Module) -> bool:
    """A conv or linear-like layer: a ``weight`` tensor of rank >= 2 with output channels first.

    Transposed convolutions (output channels on dim 1) are refused rather than misread."""
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        raise LeanconvError(f"transposed convolution {type(module).__name__} cannot be scored; leanconv prunes Conv/Linear")
    w = getattr(module, "weight", None)
    return isinstance(w, Tensor) and w.dim() >= 2 and not is_norm_layer(module)


def member_module(model: nn.Module, member: Member, group: ChannelGroup) -> nn.Module:
    """The member's module, after checking that it has one index per group channel."""
    try:
        module = model.get_submodule(member.module)
    except AttributeError:
        raise LeanconvError(f"group {group.root}: the model has no module {member.module!r}") from None
    if member.kind not in ("out", "in"):
        raise LeanconvError(f"group {group.root}: member {member.module} has kind {member.kind!r}; use 'out' or 'in'")
    if len(member.idxs) != group.size:
        raise LeanconvError(
            f"group {group.root}: member {member.module} has {len(member.idxs)} indices for {group.size} channels"
        )
    return module


def channel_entries(module: nn.Module, member: Member, tensor: Tensor | None = None) -> Tensor:
    """``[k, n]``: the entries of ``tensor`` (shaped like ``module.weight``; default the weight
    itself) that belong to each of the member's ``k`` channels, flattened (module docstring)."""
    t = module.weight if tensor is None else tensor
    idx = torch.as_tensor(member.idxs, dtype=torch.long, device=t.device)
    if member.kind == "out":
        _check_range(member, idx, t.shape[0])
        return t.index_select(0, idx).reshape(len(idx), -1)
    groups = int(getattr(module, "groups", 1))
    per_group_in, per_group_out = t.shape[1], t.shape[0] // groups
    _check_range(member, idx, groups * per_group_in)
    view = t.reshape(groups, per_group_out, per_group_in, -1)
    return view[idx // per_group_in, :, idx % per_group_in].reshape(len(idx), -1)


def _check_range(member: Member, idx: Tensor, n: int) -> None:
    if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise LeanconvError(f"member {member.module} ({member.kind}) has a channel index outside 0..{n - 1}")


def sum_over_members(
    model: nn.Module,
    group: ChannelGroup,
    score_member: MemberScore,
    kinds: Sequence[str] = ("out",),
    criterion: str = "criterion",
) -> Tensor:
    """Group score (float64, length ``group.size``): the sum of ``score_member(module, member)``
    over the members of the given kinds. ``score_member`` returns ``None`` for a member it does
    not apply to (e.g. a BatchNorm for a magnitude criterion); if it applies to none, raise."""
    total = torch.zeros(group.size, dtype=torch.float64)
    used = 0
    for member in group.members:
        if member.kind not in kinds:
            continue
        s = score_member(member_module(model, member, group), member)
        if s is not None:
            total += s.detach().to("cpu", torch.float64)
            used += 1
    if used == 0:
        kinds_txt = "/".join(kinds)
        raise LeanconvError(
            f"criterion {criterion}: group {group.root} has no {kinds_txt} member it can score; choose another criterion"
        )
    return total


def to_scores(totals: Sequence[Tensor], groups: Sequence[ChannelGroup], criterion: str) -> list[Tensor]:
    """Cast group scores to float32 and refuse non-finite ones (NaN loss, overflow)."""
    out = []
    for t, g in zip(totals, groups):
        s = t.to(torch.float32)
        if not torch.isfinite(s).all():
            raise LeanconvError(
                f"criterion {criterion}: non-finite scores for group {g.root}; check the model's weights and data"
            )
        out.append(s)
    return out


def require_batches(data: ScoringData | None, criterion: str) -> list[tuple[Tensor, Tensor]]:
    """The validation batches of ``data``; raise if there are none."""
    batches = list(data.batches) if data is not None else []
    if not batches:
        raise LeanconvError(f"criterion {criterion} needs data: pass at least one validation batch")
    return batches
