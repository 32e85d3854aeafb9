"""Renumber a dense model's channels so that a pSConv pattern keeps most of its trained kernels.

A pSConv keeps, of the 3x3 kernel ``W[i, j]`` (filter ``i``, input channel ``j``), only the
taps of pattern ``t = (i + j + 1) mod P`` (:mod:`leanconv.layers.periodic_sparse`). Which taps
survive therefore depends on where each channel sits modulo ``P``. Channels can be renumbered
without changing what the network computes, as long as every layer that touches them is
renumbered alike (the channel groups of :mod:`leanconv.graph.groups`: a conv's filters, its
BatchNorm, its consumers' input columns, the convs summed with it by a residual add). So
before a trained model is converted, :func:`order_for_pattern` renumbers each such group to
maximise the share of weight energy ``||W ⊙ mask||^2 / ||W||^2`` the pattern keeps, summed over
the convs that will be converted (each conv counts alike, whatever its weights' scale).

One group at a time, with every other group's numbering fixed, the kept energy is a sum over
the group's channels of a term that depends only on the channel and the *class* of the
position it moves to (its residue mod ``P`` in each converted conv that it touches). Putting
channels into classes of fixed sizes at the least cost is a transportation problem, solved
exactly by :func:`balanced_assignment` (successive shortest paths). Sweeping the groups
in turn never lowers the kept energy; ``sweeps`` rounds are made. The renumbered model's
output is checked against the original on the example input; a group that cannot be
renumbered exactly (a grouped conv whose conv groups would mix, a flatten into a linear
layer) is left as it is, with the reason in the report.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from leanconv.graph.groups import channel_groups
from leanconv.graph.types import ChannelGroup
from leanconv.layers.periodic_sparse import PATTERNS, pattern_mask
from leanconv.util.modes import eval_mode

__all__ = ["balanced_assignment", "kept_share", "order_for_pattern"]

log = logging.getLogger(__name__)

_MAX_CLASSES = 64  # beyond this, a group's positions do not repeat the period (not worth solving)


def balanced_assignment(cost: np.ndarray, capacity: Sequence[int]) -> np.ndarray:
    """The class of each item (row of ``cost [items, classes]``) that minimises the summed
    cost when class ``c`` takes exactly ``capacity[c]`` items (``sum(capacity) == items``).

    Successive shortest paths: items enter one at a time; each enters along the cheapest chain
    of moves (the new item into a class, one item of that class into another, ... ending in a
    class with room), found by Bellman-Ford over the classes. Every partial assignment stays
    optimal for the items placed, so the final one is optimal."""
    cost = np.asarray(cost, dtype=np.float64)
    capacity = np.asarray(capacity, dtype=np.int64)
    items, classes = cost.shape
    if len(capacity) != classes or int(capacity.sum()) != items or (capacity < 0).any():
        raise ValueError("capacities must be one per class, non-negative, and sum to the number of items")
    where = np.full(items, -1)
    load = np.zeros(classes, dtype=np.int64)
    for item in range(items):
        # cheapest move of one placed item from class a to class b, and which item
        step = np.full((classes, classes), np.inf)
        mover = np.full((classes, classes), -1)
        for a in range(classes):
            inside = np.flatnonzero(where == a)
            if len(inside):
                delta = cost[inside] - cost[inside, a][:, None]
                best = delta.argmin(0)
                step[a] = delta[best, np.arange(classes)]
                mover[a] = inside[best]
        dist, prev = cost[item].copy(), np.full(classes, -1)
        for _ in range(classes - 1):
            through = dist[:, None] + step
            a = through.argmin(0)
            better = through[a, np.arange(classes)] < dist - 1e-12
            if not better.any():
                break
            dist[better], prev[better] = through[a, np.arange(classes)][better], a[better]
        room = np.flatnonzero(load < capacity)
        end = room[dist[room].argmin()]
        load[end] += 1
        b = end
        while prev[b] != -1:
            a = prev[b]
            where[mover[a, b]] = b
            b = a
        where[item] = b
    return where


def kept_share(weight: Tensor, pattern: str) -> float:
    """Share of a ``[out, in, 3, 3]`` weight's energy on ``pattern``'s support."""
    w = weight.detach().double()
    total = float(w.pow(2).sum())
    if total == 0:
        return 1.0
    return float((w * pattern_mask(w.shape[0], w.shape[1], pattern)).pow(2).sum()) / total


def _energy_by_residue(weight: Tensor, kind: str, idxs: Sequence[int], pattern: str) -> Tensor:
    """``[channels, P]``: the (normalised) energy the pattern keeps of each group channel's row
    (``kind`` "out") or column ("in") of ``weight`` if it sat at each residue mod P."""
    w = weight.detach().double()
    period = len(PATTERNS[pattern])
    total = float(w.pow(2).sum()) or 1.0
    out = torch.zeros(len(idxs), period, dtype=torch.float64)
    if kind == "out":
        rows = w[list(idxs)].pow(2)  # [k, in, 3, 3]
        masks = pattern_mask(period, w.shape[1], pattern)  # row r's mask over the inputs
        for r in range(period):
            out[:, r] = (rows * masks[r]).sum((1, 2, 3))
    else:
        cols = w[:, list(idxs)].pow(2)  # [out, k, 3, 3]
        masks = pattern_mask(w.shape[0], period, pattern)  # column r's mask over the outputs
        for r in range(period):
            out[:, r] = (cols * masks[:, r, None]).sum((0, 2, 3))
    return out / total


def _problem(model: nn.Module, group: ChannelGroup) -> str | None:
    """Why renumbering ``group`` by moving whole rows and columns would not be exact, or None."""
    for member in group.members:
        module = model.get_submodule(member.module)
        if len(set(member.idxs)) != len(member.idxs):
            return f"{member.module} maps several group channels onto one channel"
        if isinstance(module, nn.Conv2d) and 1 < module.groups and not (
                module.groups == module.in_channels == module.out_channels):
            return f"{member.module} is a grouped conv whose conv groups would mix"
        if isinstance(module, nn.Linear) and member.kind == "in" and module.in_features != group.size:
            return f"{member.module} reads the channels through a flatten"
        if not isinstance(module, (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm)):
            return f"{member.module} is a {type(module).__name__}, which cannot be renumbered here"
    return None


@torch.no_grad()
def _renumber(model: nn.Module, group: ChannelGroup, moved_to: Sequence[int]) -> None:
    """Move group channel ``k`` to group position ``moved_to[k]`` in every member layer."""
    done: set[int] = set()
    for member in group.members:
        module = model.get_submodule(member.module)
        per_channel = isinstance(module, nn.modules.batchnorm._BatchNorm) or (
            isinstance(module, nn.Conv2d) and module.groups > 1)
        if per_channel and id(module) in done:
            continue  # a norm or depthwise conv: its inputs are its outputs, moved once
        done.add(id(module))
        dim = 1 if member.kind == "in" and not per_channel else 0
        size = module.weight.shape[dim] if module.weight is not None else module.num_features
        index = torch.arange(size)
        for k, target in enumerate(moved_to):
            index[member.idxs[target]] = member.idxs[k]
        tensors = [module.weight] if dim == 1 else [module.weight, getattr(module, "bias", None)]
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            tensors += [module.running_mean, module.running_var]
        for t in tensors:
            if t is not None:
                t.copy_(t.index_select(dim, index))


def _logits(model: nn.Module, x: Tensor) -> Tensor:
    with eval_mode(model), torch.no_grad():
        y = model(x)
    return (y[0] if isinstance(y, (tuple, list)) else y).detach().clone()


def order_for_pattern(model: nn.Module, example_input: Tensor, paths: Sequence[str], pattern: str,
                      *, sweeps: int = 2) -> dict[str, Any]:
    """Renumber the channels of the dense ``model`` in place so that ``pattern`` keeps the most
    weight energy of the convs at ``paths`` (module docstring); what ``model`` computes is
    unchanged. Returns a report: per path the kept share before and after, the groups
    renumbered, those left as they are with the reason, and the seconds taken."""
    t0 = time.perf_counter()
    period = len(PATTERNS[pattern])
    targets = {p: model.get_submodule(p) for p in paths}
    before = {p: kept_share(m.weight, pattern) for p, m in targets.items()}
    reference = _logits(model, example_input)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    groups, left = [], {}
    for group in channel_groups(model, example_input, strict=False):
        touching = [m for m in group.members if m.module in targets]
        if not touching:
            continue
        # a position's class: its residue in every converted conv it touches
        keys = [tuple(m.idxs[q] % period for m in touching) for q in range(group.size)]
        problem = _problem(model, group) or (
            "its positions do not repeat the pattern's period" if len(set(keys)) > _MAX_CLASSES else None)
        if problem:
            left[group.root] = problem
        else:
            groups.append((group, touching, keys))
    for _ in range(sweeps if groups else 0):
        for group, touching, keys in groups:
            classes = sorted(set(keys))
            column = {c: i for i, c in enumerate(classes)}
            cost = np.zeros((group.size, len(classes)))
            for n, m in enumerate(touching):
                energy = _energy_by_residue(targets[m.module].weight, m.kind, m.idxs, pattern).numpy()
                for c, i in column.items():
                    cost[:, i] -= energy[:, c[n]]
            capacity = np.bincount([column[k] for k in keys], minlength=len(classes))
            where = balanced_assignment(cost, capacity)
            free = {i: [q for q in range(group.size) if column[keys[q]] == i] for i in range(len(classes))}
            _renumber(model, group, [free[c].pop(0) for c in where])  # stable within a class
    after_logits = _logits(model, example_input)
    scale = max(float(reference.abs().max()) if reference.numel() else 0.0, 1.0)
    if not torch.allclose(after_logits, reference, rtol=1e-4, atol=1e-5 * scale):
        model.load_state_dict(state)
        log.warning("renumbering channels for the pattern changed the model's output; the order is kept")
        return _report(0, {"*": "renumbering changed the model's output"}, before, before, t0)
    return _report(len(groups), left, before, {p: kept_share(m.weight, pattern) for p, m in targets.items()}, t0)


def _report(renumbered: int, left: dict[str, str], before: dict[str, float], after: dict[str, float],
            t0: float) -> dict[str, Any]:
    def mean(shares: dict[str, float]) -> float:
        return float(np.mean(list(shares.values()))) if shares else 1.0

    return {"renumbered": renumbered, "left": left,
            "kept": {p: {"before": before[p], "after": after[p]} for p in before},
            "kept_mean": {"before": mean(before), "after": mean(after)}, "seconds": time.perf_counter() - t0}
