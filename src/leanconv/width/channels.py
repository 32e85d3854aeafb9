"""Physical channel removal: smaller ``Conv2d``/``BatchNorm``/``Linear`` layers, not masks.

:func:`remove_channels` cuts the given channels of each group out of every coupled layer
with torch-pruning's pruning functions, in place, and then checks the result: every member
layer has exactly the channel count the groups imply, and the model still maps the example
input to an output of the same shape. :func:`implant_channels` turns chosen filters of a
group's kxk convs into HAP Neural Implants (:class:`~leanconv.layers.implant.ImplantConv2d`).

Both edit the model in place and leave only registered layer types behind, so
``leanconv.checkpoint.save`` records the new shapes as edits.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from leanconv.errors import LeanconvError
from leanconv.graph.types import ChannelGroup, Member
from leanconv.layers.implant import ImplantConv2d
from leanconv.util.modes import eval_mode
from leanconv.graph.groups import build_graph, channel_units

__all__ = ["remove_channels", "implant_channels", "can_implant", "channel_counts"]


def channel_counts(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``{path: (in_channels, out_channels)}`` of every conv, linear, BatchNorm and implant layer."""
    counts: dict[str, tuple[int, int]] = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, ImplantConv2d)):
            counts[name] = (m.in_channels, m.out_channels)
        elif isinstance(m, nn.Linear):
            counts[name] = (m.in_features, m.out_features)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            counts[name] = (m.num_features, m.num_features)
    return counts


def _output_shape(model: nn.Module, x: torch.Tensor) -> tuple[int, ...]:
    with eval_mode(model), torch.no_grad():
        y = model(x)
    y = y[0] if isinstance(y, (tuple, list)) else y
    return tuple(y.shape)


def _check_removal(model: nn.Module, group: ChannelGroup, idxs: Sequence[int]) -> list[int]:
    """Validate one group's removal: in range, whole units, at least one unit left."""
    idxs = sorted({int(i) for i in idxs})
    if idxs and (idxs[0] < 0 or idxs[-1] >= group.size):
        raise LeanconvError(f"group {group.root}: channel index outside 0..{group.size - 1}")
    removed = set(idxs)
    units = [set(u) for u in channel_units(model, group)]
    if any(removed & u and not u <= removed for u in units):
        raise LeanconvError(f"group {group.root}: remove whole units of its grouped conv, not parts of them")
    if all(u <= removed for u in units):
        raise LeanconvError(f"group {group.root}: cannot remove all {group.size} channels; keep at least one")
    return idxs


def _in_equals_out(module: nn.Module) -> bool:
    """Layers whose input and output channels are the same channels (norms, depthwise convs)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return True
    return isinstance(module, nn.Conv2d) and 1 < module.groups == module.in_channels == module.out_channels


def _expected_counts(model: nn.Module, groups: Sequence[ChannelGroup], remove: Mapping[int, list[int]]):
    """Channel counts every member layer must have after the removal."""
    current = channel_counts(model)
    expected: dict[str, list[int]] = {}
    for gi, idxs in remove.items():
        for member in groups[gi].members:
            counts = expected.setdefault(member.module, list(current[member.module]))
            both = _in_equals_out(model.get_submodule(member.module))
            if member.kind == "in" or both:
                counts[0] -= len(idxs)
            if member.kind == "out" or both:
                counts[1] -= len(idxs)
    return {k: tuple(v) for k, v in expected.items()}


def remove_channels(
    model: nn.Module,
    groups: Sequence[ChannelGroup],
    remove: Mapping[int, Sequence[int]],
    example_input: torch.Tensor,
) -> nn.Module:
    """Remove channels in place: ``remove[i]`` lists channels of ``groups[i]`` (indices into
    its root layer's outputs) to cut from every layer of that group. Returns ``model``.

    ``groups`` must describe ``model`` as it is now (:func:`~leanconv.width.channel_groups`
    on the same model). Raises :class:`LeanconvError` for an index out of range, a group
    left empty, a grouped-conv unit split, or groups that do not match the model."""
    remove = {int(g): _check_removal(model, groups[int(g)], ix) for g, ix in remove.items() if len(ix)}
    if not remove:
        return model
    expected = _expected_counts(model, groups, remove)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    dg = build_graph(model, example_input)
    for gi, idxs in remove.items():
        root = dict(model.named_modules()).get(groups[gi].root)
        pruner = dg.get_pruner_of_module(root) if root in dg.module2node else None
        if pruner is None or pruner.get_out_channels(root) != groups[gi].size:
            raise LeanconvError(f"group {groups[gi].root} does not match the model; recompute the channel groups")
        dg.get_pruning_group(root, pruner.prune_out_channels, idxs).prune(record_history=False)
    for name, p in model.named_parameters():
        p.requires_grad_(flags.get(name, True))
    actual = channel_counts(model)
    wrong = sorted(n for n, c in expected.items() if actual.get(n) != c)
    if wrong:  # the dependency graph resized a layer more than the groups say (it reads some channels twice)
        raise LeanconvError(f"leanconv cannot prune this model: removing channels left {wrong[0]} with "
                            f"{actual.get(wrong[0])} channels (in, out) where the channel groups account for "
                            f"{expected[wrong[0]]}; a layer that reads the same channels twice (e.g. a ghost "
                            "module's concatenation of a tensor with a function of itself) is not supported")
    try:
        shape = _output_shape(model, example_input)
    except (RuntimeError, ValueError) as exc:  # e.g. a per-channel buffer or constant the graph cannot see
        roots = ", ".join(groups[gi].root for gi in remove)
        raise LeanconvError(f"after removing channels of {roots} the model no longer runs "
                            f"({str(exc).strip().splitlines()[0]}); a tensor on that channel path that is not a "
                            "layer's parameter (a buffer or constant with one entry per channel) cannot be resized: "
                            "make it a parameter of a layer, or exclude that layer (ignored=[...])") from exc
    if shape != dg.leanconv_output_shape:
        raise RuntimeError("leanconv bug: pruning changed the model's output shape")
    return model


def _implantable_conv(module: nn.Module) -> bool:
    return (isinstance(module, nn.Conv2d) and module.groups == 1 and not isinstance(module.padding, str)
            and all(k % 2 == 1 for k in module.kernel_size))


def can_implant(model: nn.Module, group: ChannelGroup) -> bool:
    """True when the layers that produce ``group``'s channels include a plain kxk conv (k > 1,
    groups=1, odd sides), which gets the implant, and otherwise only plain 1x1 convs (kept)."""
    kxk = False
    for member in group.out_members():
        module = model.get_submodule(member.module)
        if isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and not _implantable_conv(module)):
            return False
        kxk = kxk or (isinstance(module, nn.Conv2d) and max(module.kernel_size) > 1)
    return kxk


def implant_channels(
    model: nn.Module, group: ChannelGroup, channels: Sequence[int], removed: Sequence[int] = (), *,
    restart_norms: bool = True,
) -> list[str]:
    """Replace the filters of group ``channels`` in every kxk conv of ``group`` by zero 1x1
    implants (HAP Neural Implant); 1x1 convs, norms and consumers keep the channels as they are.

    ``group`` may describe the model before ``removed`` group channels were cut out (by
    :func:`remove_channels`); ``channels`` and ``removed`` use its numbering. Returns the
    paths of the new :class:`ImplantConv2d` layers. They keep every channel in place (a
    ``channel_order``); :func:`leanconv.width.permute.fold_channel_orders` then renumbers the
    coupled layers instead, as :func:`~leanconv.width.prune_to_budget` does. ``restart_norms``
    re-initialises the implanted channels' BatchNorm entries for a zero start (see
    :func:`_restart_norms`); pass False when the implants will be fitted
    (:mod:`leanconv.width.implant_fit`)."""
    if not channels:
        return []
    if not can_implant(model, group):
        raise LeanconvError(f"group {group.root} has no plain kxk conv to implant into")
    if set(channels) & set(removed):
        raise LeanconvError(f"group {group.root}: a channel cannot be both removed and implanted")
    paths = []
    for member in group.out_members():
        conv = model.get_submodule(member.module)
        if not isinstance(conv, nn.Conv2d) or max(conv.kernel_size) == 1:
            continue
        new_idx = _after_removal(member, channels, removed)
        parent, _, leaf = member.module.rpartition(".")
        with torch.random.fork_rng(devices=[]):  # the new layer's initial draw must not move the caller's stream
            implant = ImplantConv2d.from_conv(conv, new_idx)
        setattr(model.get_submodule(parent) if parent else model, leaf, implant)
        paths.append(member.module)
    if restart_norms:
        _restart_norms(model, group, channels, removed)
    return paths


def _after_removal(member: Member, channels: Sequence[int], removed: Sequence[int]) -> list[int]:
    """``member``'s indices of group ``channels`` once group channels ``removed`` are cut out."""
    gone = sorted(member.idxs[k] for k in removed)
    return [member.idxs[k] - sum(1 for j in gone if j < member.idxs[k]) for k in channels]


WAKE = 0.01  # smallest BN shift of an implanted channel, so a ReLU after it passes gradient


@torch.no_grad()
def _restart_norms(model: nn.Module, group: ChannelGroup, channels: Sequence[int], removed: Sequence[int]) -> None:
    """Re-initialise the BatchNorm entries of freshly implanted channels.

    An implant starts at zero, so its BatchNorm sees a constant 0: its statistics are reset
    (mean 0, variance 1, so it outputs its shift ``beta``, the channel's mean output before),
    and a shift at or below zero is raised to ``WAKE``. Otherwise a conv -> BN -> ReLU whose
    shift is negative feeds the ReLU a constant negative value: no gradient ever reaches the
    zero 1x1 weights and the implanted channel stays dead through fine-tuning, costing MACs."""
    for member in group.out_members():
        norm = model.get_submodule(member.module)
        if not isinstance(norm, nn.modules.batchnorm._BatchNorm) or norm.running_mean is None:
            continue
        idx = torch.tensor(_after_removal(member, channels, removed))
        norm.running_mean[idx] = 0.0
        norm.running_var[idx] = 1.0 - norm.eps
        if norm.affine:
            norm.bias[idx] = norm.bias[idx].clamp_min(WAKE)
