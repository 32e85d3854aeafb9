"""Fold the channel orders of Neural Implants into the surrounding layers' weights.

An :class:`~leanconv.layers.implant.ImplantConv2d` made by
:meth:`~leanconv.layers.implant.ImplantConv2d.from_conv` keeps every output channel where the
original conv had it, so that no other layer changes; its split execution then has to
interleave the kept and implanted outputs at run time. Channels of a network can be renumbered
without changing what it computes, as long as every layer that touches them is renumbered
alike. :func:`fold_channel_orders` does that for each implant's channel group (the same
coupled layers that channel pruning resizes, from torch-pruning's dependency graph): after
it, the implanted conv outputs the plain ``[kept..., implanted...]`` concatenation
(``channel_order`` None) and the group's other layers follow:

* producers ("out"): rows of conv and linear weights and biases, other implants' orders;
* consumers ("in"): input columns of convs (within each conv group) and linear layers, also
  the ``H*W`` columns per channel of a linear layer after a flatten;
* layers whose inputs are their outputs (BatchNorm, depthwise convs): every per-channel
  tensor, once.

A group is left as it is (the implant keeps its order; logged, and returned with the reason)
when renumbering it would change the function or is not supported: the channels reach the
network's output, an operation on the path moves channels, a grouped conv would have to
move a channel into another conv group, or another implant in the group has a different
order. The folded model's output on the example input is checked against the original.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Sequence

import torch
from torch import Tensor, nn

from leanconv.layers.implant import ImplantConv2d
from leanconv.util.modes import eval_mode
from leanconv.width.channels import _in_equals_out
from leanconv.graph.groups import _problem, build_graph

__all__ = ["fold_channel_orders"]

log = logging.getLogger(__name__)

_Key = tuple[nn.Module, str]  # (module, axis): axis "out", "in" or "both" (norms, depthwise convs)


def fold_channel_orders(model: nn.Module, example_input: Tensor) -> dict[str, str]:
    """Renumber channels in place so that every :class:`ImplantConv2d` of ``model`` outputs
    ``[kept..., implanted...]`` in plain order (``channel_order`` None), moving the weights
    of the layers coupled to it instead (module docstring). ``example_input`` is a batch the
    model accepts (for tracing and for the self-check).

    Returns ``{path: reason}`` for the implants that keep a channel order (empty when all
    were folded). Raises ``RuntimeError`` if the folded model computes something else (a
    leanconv bug)."""
    names = {m: n for n, m in model.named_modules()}
    pending = [m for m in names if isinstance(m, ImplantConv2d) and m.channel_order is not None]
    if not pending:
        return {}
    before = _logits(model, example_input)
    dg = build_graph(model, example_input)
    reasons: dict[str, str] = {}
    seen: set[nn.Module] = set()
    for layer in pending:
        if layer in seen or layer.channel_order is None:
            continue
        group = dg.get_pruning_group(layer, dg.get_pruner_of_module(layer).prune_out_channels,
                                     list(range(layer.out_channels)))
        members = _members(dg, group)
        seen |= {m for m, axis in members if isinstance(m, ImplantConv2d) and axis == "out"}
        reason = _group_problem(dg, group)
        index = None if reason else _indices(members, layer.channel_order)
        reason = reason or (index if isinstance(index, str) else None)
        if reason:
            reasons[names[layer]] = reason
            continue
        for (module, axis), idx in index.items():
            _renumber(module, axis, idx)
    _check(model, example_input, before)
    for layer in pending:
        if layer.channel_order is not None:
            reasons.setdefault(names[layer], "another implant of its channel group has a different channel order")
    for path, reason in reasons.items():
        log.info("implant %s keeps its channel order: %s", path, reason)
    return reasons


def _logits(model: nn.Module, x: Tensor) -> Tensor:
    with eval_mode(model), torch.no_grad():
        y = model(x)
    return (y[0] if isinstance(y, (tuple, list)) else y).detach().clone()


def _check(model: nn.Module, x: Tensor, before: Tensor) -> None:
    after = _logits(model, x)
    scale = float(before.abs().max()) if before.numel() else 0.0
    if after.shape != before.shape or not torch.allclose(after, before, rtol=1e-4, atol=1e-5 * max(scale, 1.0)):
        raise RuntimeError("leanconv bug: folding implant channel orders changed the model's output")


def _group_problem(dg, group) -> str | None:
    """Why the group's channels cannot be renumbered (an op that moves them, an unsupported
    layer, the network output), or None; implanted outputs themselves are expected."""
    problems = {p for p in (_problem(dg, item) for item in group) if p and p != "implant"}
    if "output" in problems:
        return "its channels reach the network's output"
    return "; ".join(sorted(problems)) or None


def _members(dg, group) -> dict[_Key, dict[int, list[int]]]:
    """Per (module, axis): group channel -> that module's channels along the axis (several
    for a linear layer after a flatten)."""
    members: dict[_Key, dict[int, set[int]]] = defaultdict(lambda: defaultdict(set))
    for item in group:
        module = item.dep.target.module
        if module not in dg._module2name:
            continue  # an operation without parameters; _group_problem vetted it
        axis = "both" if _in_equals_out(module) else ("out" if dg.is_out_channel_pruning_fn(item.dep.handler)
                                                       else "in")
        for idx, root in zip(item.idxs, item.root_idxs):
            members[module, axis][int(root)].add(int(idx))
    return {key: {k: sorted(v) for k, v in by_root.items()} for key, by_root in members.items()}


def _indices(members: dict[_Key, dict[int, list[int]]], order: Sequence[int]) -> dict[_Key, Tensor] | str:
    """Per (module, axis) the gather index ``new[j] = old[index[j]]`` that moves group channel
    ``k`` to position ``order[k]``, or why that cannot be done."""
    out: dict[_Key, Tensor] = {}
    for (module, axis), by_root in members.items():
        index = torch.arange(_size(module, axis))
        for k, channels in by_root.items():
            target = by_root.get(order[k])
            if target is None or len(target) != len(channels):
                return f"{type(module).__name__} does not carry every channel of the group one to one"
            index[target] = torch.tensor(channels)
        if sorted(index.tolist()) != list(range(len(index))):
            return f"{type(module).__name__} maps group channels onto shared channels"
        if not _within_conv_groups(module, axis, index):
            return "a grouped conv would have to move a channel into another conv group"
        out[module, axis] = index
    return out


def _size(module: nn.Module, axis: str) -> int:
    if isinstance(module, nn.Linear):
        return module.in_features if axis == "in" else module.out_features
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return module.num_features
    return module.in_channels if axis == "in" else module.out_channels


def _within_conv_groups(module: nn.Module, axis: str, index: Tensor) -> bool:
    """A grouped conv's channels may only move inside their conv group."""
    if not isinstance(module, nn.Conv2d) or module.groups == 1 or axis == "both":
        return True
    width = (module.in_channels if axis == "in" else module.out_channels) // module.groups
    positions = torch.arange(len(index))
    return bool(torch.equal(index // width, positions // width))


@torch.no_grad()
def _renumber(module: nn.Module, axis: str, index: Tensor) -> None:
    """Apply ``new[j] = old[index[j]]`` to every tensor of ``module`` indexed by ``axis``."""
    if isinstance(module, ImplantConv2d):
        if axis == "out":
            old = module.channel_order or list(range(module.out_channels))
            module.set_channel_order([old[i] for i in index.tolist()])
        else:
            for conv in (module.conv, module.implant):
                _take(conv.weight, 1, index)
        return
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        for t in (module.weight, module.bias, module.running_mean, module.running_var):
            if t is not None:
                _take(t, 0, index)
        return
    if axis == "in" and isinstance(module, nn.Conv2d) and module.groups > 1:
        _take_grouped_inputs(module, index)
        return
    _take(module.weight, 1 if axis == "in" else 0, index)
    if axis != "in" and module.bias is not None:
        _take(module.bias, 0, index)


def _take(t: Tensor, dim: int, index: Tensor) -> None:
    t.copy_(t.index_select(dim, index.to(t.device)))


def _take_grouped_inputs(conv: nn.Conv2d, index: Tensor) -> None:
    """Input columns of a grouped conv: conv group ``g``'s filters read only its own inputs."""
    width, per_group = conv.in_channels // conv.groups, conv.out_channels // conv.groups
    w = conv.weight
    for g in range(conv.groups):
        local = index[g * width:(g + 1) * width] - g * width
        rows = w[g * per_group:(g + 1) * per_group]
        rows.copy_(rows.index_select(1, local.to(w.device)))
