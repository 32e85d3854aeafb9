"""The plans of a width prune: which channels each group loses, found by a global threshold.

What :func:`~leanconv.width.budget.prune_to_budget` (MACs, params) and
:mod:`~leanconv.width.latency_budget` (measured latency) share. A :class:`Planner` turns
"remove the first ``n`` units of the network's global order" into a :class:`Plan` (per group:
removed and implanted channels), honouring each group's floor, ``round_to`` and the Neural
Implant share; :func:`search` finds the ``n`` whose plan costs closest to a goal (binary search,
then a walk down the order when ``round_to`` makes the steps coarse). Scores are checked
against the groups (:func:`checked_scores`) and optionally mean-normalised (:func:`normalized`)
before the ranking; :func:`apply_plan` / :func:`cut_copy` cut a model (or a copy) to a plan.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from leanconv.cost import count
from leanconv.errors import LeanconvError
from leanconv.graph.groups import TracedGroup
from leanconv.graph.types import ChannelGroup
from leanconv.importance.base import check_scores
from leanconv.layers.implant import ImplantConv2d
from leanconv.width.channels import can_implant, channel_counts, implant_channels, remove_channels
from leanconv.width.cost_model import Cost

__all__ = ["Plan", "Planner", "floor_channels", "normalized", "search", "fits", "apply_plan", "counted_cost",
           "cut_copy", "checked_scores", "plan_parts", "layer_changes"]


@dataclass
class Plan:
    """Per group: removed and implanted group channels, and implants per conv path."""

    removed: list[list[int]]
    implanted: list[list[int]]
    implant_convs: dict[int, dict[str, int]]
    restart_norms: bool = True  # zero implants: restart their BatchNorm entries


class Planner:
    """Turns "remove the first n units of the global order" into a plan (steps 3 and 5 of
    :mod:`leanconv.width.budget`)."""

    def __init__(self, model: nn.Module, traced: Sequence[TracedGroup], *, floor: float, round_to: int | None,
                 implant: float, implant_init: str = "zero") -> None:
        self.traced, self.round_to, self.implant = list(traced), round_to, implant
        self.implant_init = implant_init
        self.unit_size = [t.group.size // len(t.units) for t in traced]
        self.min_kept = [max(1, math.ceil(floor_channels(floor, t.group.size) / u)) for t, u in
                         zip(traced, self.unit_size)]
        self.implant_paths = [self._kxk_convs(model, t.group) if implant > 0 else [] for t in traced]
        self.order: list[list[int]] = [list(range(len(t.units))) for t in traced]
        self.sequence: list[int] = [g for g, t in enumerate(traced) for _ in t.units]

    @staticmethod
    def _kxk_convs(model: nn.Module, group: ChannelGroup) -> list[str]:
        if not can_implant(model, group):
            return []
        return [m.module for m in group.out_members()
                if isinstance(model.get_submodule(m.module), nn.Conv2d)
                and max(model.get_submodule(m.module).kernel_size) > 1]

    def rank(self, scores: Sequence[Tensor]) -> None:
        """Sort units within each group and across groups by ascending score."""
        entries = []
        for g, (t, s) in enumerate(zip(self.traced, scores)):
            unit_scores = [float(s[list(u)].mean()) for u in t.units]
            self.order[g] = sorted(range(len(t.units)), key=lambda i: (unit_scores[i], i))
            entries += [(unit_scores[i], g, r) for r, i in enumerate(self.order[g])]
        self.sequence = [g for _, g, _ in sorted(entries)]

    @property
    def total(self) -> int:
        return len(self.sequence)

    def removable(self, g: int, candidates: int) -> tuple[int, int]:
        """(removed, implanted) units of group ``g`` when ``candidates`` units fall below the threshold."""
        units, u = len(self.traced[g].units), self.unit_size[g]
        r = max(0, min(candidates, units - self.min_kept[g]))
        if self.round_to and r:
            step = self.round_to // math.gcd(self.round_to, u)
            kept = math.ceil((units - r) / step) * step
            r = 0 if kept >= units else units - kept
        if not self.implant_paths[g] or not r:
            return r, 0
        m = int(self.implant * r + 0.5)
        while self.round_to and m and (m * u) % self.round_to:
            m -= 1
        return r, m

    def candidates(self, n: int) -> list[int]:
        """Units per group among the ``n`` lowest-scored units of the network."""
        counts = [0] * len(self.traced)
        for g in self.sequence[:n]:
            counts[g] += 1
        return counts

    def plan(self, candidates: Sequence[int]) -> Plan:
        plan = Plan([], [], {}, restart_norms=self.implant_init == "zero")
        for g, t in enumerate(self.traced):
            r, m = self.removable(g, candidates[g])
            chosen = [t.units[i] for i in self.order[g][:r]]
            plan.removed.append(sorted(c for unit in chosen[: r - m] for c in unit))
            plan.implanted.append(sorted(c for unit in chosen[r - m:] for c in unit))
            if m:
                plan.implant_convs[g] = {p: m * self.unit_size[g] for p in self.implant_paths[g]}
        return plan


def floor_channels(floor: float, size: int) -> int:
    return int(floor) if floor >= 1 else math.ceil(floor * size)


def normalized(scores: Sequence[Tensor], normalize: str) -> list[Tensor]:
    out = []
    for s in scores:
        s = s.detach().to("cpu", torch.float64)
        scale = s.abs().mean()
        out.append(s / scale if normalize == "mean" and scale > 0 else s)
    return out


def search(cost_of: Callable[[list[int]], int], planner: Planner, goal: float, tol: float) -> list[int]:
    """Units to drop per group (candidates) whose plan costs closest to ``goal``.

    Binary search over the global threshold (cost falls as more units drop). If the nearest
    threshold misses ``goal`` by more than ``tol`` (``round_to`` makes steps coarse), continue
    down the global order from the threshold and skip, for good, any group whose next step
    would overshoot the budget."""
    lo, hi = 0, planner.total  # cost(lo) > goal >= cost(hi), when reachable
    if cost_of(planner.candidates(hi)) > goal:
        return planner.candidates(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if cost_of(planner.candidates(mid)) <= goal else (mid, hi)
    best = min((planner.candidates(lo), planner.candidates(hi)), key=lambda c: abs(cost_of(c) - goal))
    if fits(cost_of(best), goal, tol):
        return best
    return _refine(cost_of, planner, lo, goal, tol) or best


def _refine(cost_of, planner: Planner, start: int, goal: float, tol: float) -> list[int] | None:
    counts, frozen = planner.candidates(start), set()
    cost = cost_of(counts)
    for g in planner.sequence[start:]:
        if g in frozen:
            continue
        before = planner.removable(g, counts[g])
        counts[g] += 1
        if planner.removable(g, counts[g]) == before:
            continue
        new = cost_of(counts)
        if new < goal * (1 - tol):
            counts[g] -= 1
            frozen.add(g)
            continue
        cost = new
        if fits(cost, goal, tol):
            return counts
    return None


def apply_plan(model: nn.Module, traced: Sequence[TracedGroup], plan: Plan, x: Tensor) -> None:
    groups = [t.group for t in traced]
    remove_channels(model, groups, {g: r for g, r in enumerate(plan.removed) if r}, x)
    for g, channels in enumerate(plan.implanted):
        if channels:
            implant_channels(model, groups[g], channels, removed=plan.removed[g], restart_norms=plan.restart_norms)


def counted_cost(model: nn.Module, input_shape) -> Cost:
    c = count(model, input_shape)
    return Cost(c.params, c.macs)


def cut_copy(model: nn.Module, traced, plan: Plan, x: Tensor, input_shape) -> tuple[nn.Module, Cost]:
    """A pruned copy of ``model`` and its counted cost; ``model`` itself is not touched."""
    trial = copy.deepcopy(model)
    apply_plan(trial, traced, plan, x)
    return trial, counted_cost(trial, input_shape)


def checked_scores(importance, model, groups, data) -> list[Tensor]:
    """Scores from a criterion (a wrong shape is a criterion bug) or given by the caller."""
    if callable(importance):
        scores = list(importance(model, groups, data))
        name = getattr(importance, "name", None) or getattr(importance, "__name__", type(importance).__name__)
        check_scores(groups, scores, name)
        return scores
    scores = [torch.as_tensor(s) for s in importance]
    sizes = [g.size for g in groups]
    if [tuple(s.shape) for s in scores] != [(n,) for n in sizes] or not all(torch.isfinite(s).all() for s in scores):
        raise LeanconvError(f"given scores do not fit the model's {len(groups)} channel groups (sizes {sizes}); "
                            "compute them on channel_groups(model, example_input)")
    return scores


def fits(cost: int, goal: float, tol: float) -> bool:
    return abs(cost - goal) <= tol * goal


def plan_parts(plan: Plan) -> tuple[list[list[int]], dict[int, dict[str, int]]]:
    return plan.removed, plan.implant_convs


def layer_changes(model: nn.Module, pruned: nn.Module) -> dict[str, tuple[int, int]]:
    """Output channels (before, after) of every conv/linear/implant path of ``model``."""
    after = channel_counts(pruned)
    return {n: (c[1], after[n][1]) for n, c in channel_counts(model).items()
            if n in after and isinstance(model.get_submodule(n), (nn.Conv2d, nn.Linear, ImplantConv2d))}
