"""Prune channels until the model's MACs or parameters meet a budget.

``prune_to_budget(model, importance, x, target=0.5)`` removes the least important
channels of the whole network (global ranking, as in HAP: Yu et al., WACV 2022) until the
counted cost of the *realised* model is within ``tol`` (default 2%) of ``target`` times the
original cost. How it decides:

1. **Groups and units.** Channels are removed in coupled groups (:mod:`.groups`); a unit is
   a group channel, or several tied by a grouped conv.
2. **Scores.** The criterion gives one score per group channel (higher = keep). With
   ``normalize="mean"`` (default) each group's scores are divided by their mean absolute
   value, so layers whose weights are simply larger are not favoured; use
   ``normalize="none"`` for scores that are already comparable across layers, such as HAP's
   estimated loss change. A unit scores the mean of its channels. With
   ``latency_aware=True`` each group's scores are then divided by its measured time per MAC
   relative to the network's (:mod:`.latency_weights`), so the MAC budget buys more speed.
3. **Per-layer constraints.** However low its scores, a group keeps at least ``floor``
   channels (an int, or a fraction of its channels) and at least one unit: a global ranking
   never empties a layer. With ``round_to=N``, a pruned group keeps a multiple of ``N``
   channels (at least ``N``); a group with fewer than ``N`` channels is left alone.
4. **Search.** The units of all groups are sorted by score; removing the first ``n`` of them
   (clipped by step 3) gives a plan. The cost falls monotonically with ``n``, so a binary
   search finds the plan closest to the budget using an exact per-layer cost model
   (:mod:`.cost_model`); the realised model is then counted with :func:`leanconv.cost.count`.
   The minimal cost (every group at its floor) is computed first: an unreachable target
   raises :class:`~leanconv.errors.LeanconvError` before any scoring or pruning.
5. **Neural Implant** (``implant=F``): in groups produced by plain kxk convs, the most
   important fraction ``F`` of the units the plan would remove are implanted instead
   (:class:`~leanconv.layers.implant.ImplantConv2d`); the search counts their 1x1 cost. The
   channels of each implanted group are then renumbered so that implants need no re-ordering
   at run time (:func:`~leanconv.width.permute.fold_channel_orders`). Implants start at zero
   (HAP), or with ``implant_init="fit"`` as the least-squares stand-in for the filters they
   replace, fitted on ``data``'s batches (:mod:`.implant_fit`).
6. **Candidates** (``candidates=N``, with ``data``): the allocation of step 4 is one guess;
   ``N - 1`` more are drawn by shifting each group's scores by a seeded random multiple of
   their standard deviation (one per group; ``seed``) and searched the same way, each meeting
   the same budget. Each distinct one is realised on a copy (implants fitted), its BatchNorm
   statistics re-estimated on ``data``'s batches and its loss on them measured; the lowest
   wins (EagleEye's adaptive-BN evaluation, :mod:`.candidates`), and the result records every
   loss and the choice.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from leanconv.errors import LeanconvError
from leanconv.graph.types import ChannelGroup
from leanconv.util import checks
from leanconv.importance.base import ScoringData, check_batches
from leanconv.layers.implant import ImplantConv2d
from leanconv.width.candidates import check_candidates, choose, shifted_scores
from leanconv.width.implant_fit import IMPLANT_INITS, fit_implants
from leanconv.width.cost_model import Cost, CostModel
from leanconv.graph.groups import trace_groups
from leanconv.width.latency_weights import latency_weights
from leanconv.width.permute import fold_channel_orders
from leanconv.width.planner import (Plan, Planner, checked_scores, counted_cost, cut_copy, fits, layer_changes,
                                    normalized, plan_parts, search)
from leanconv.util.model_io import to_model
from leanconv.util.progress import Progress

__all__ = ["PruneResult", "prune_to_budget", "iterative_prune", "check_reachable"]

log = logging.getLogger(__name__)

Importance = Callable[[nn.Module, Sequence[ChannelGroup], "ScoringData | None"], Sequence[Tensor]]


@dataclass(frozen=True)
class PruneResult:
    """What :func:`prune_to_budget` did. Costs are for one image: ``params`` (count) and
    ``macs`` (multiply-accumulates, counted on the realised model). ``achieved`` is the
    realised cost of ``kind`` over the original. ``layers`` maps each conv/linear path to its
    output channels (before, after; implanted channels count as kept). ``removed`` and
    ``implanted`` list group channels (indices into the root layer's original outputs) by
    group root. ``implant_fit`` (``implant_init="fit"`` only) gives, per implanted conv, the
    share of its replaced filters' output (sum of squares) the fitted implant leaves
    unexplained: 0 = exact, 1 = no better than a zero implant. ``candidates`` (``candidates`` >
    1 only): ``{"candidates": n, "losses": [...], "chosen": i}``, the validation loss of each
    allocation judged (the plain one first) and the index of the one applied."""

    kind: str
    target: float
    achieved: float
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    layers: dict[str, tuple[int, int]] = field(default_factory=dict)
    removed: dict[str, list[int]] = field(default_factory=dict)
    implanted: dict[str, list[int]] = field(default_factory=dict)
    implant_fit: dict[str, float] = field(default_factory=dict)
    candidates: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["layers"] = {k: list(v) for k, v in self.layers.items()}
        return d


def _check_options(target: float, kind: str, round_to: int | None, floor: float, implant: float, tol: float,
                   normalize: str) -> None:
    if kind not in ("macs", "params"):
        raise LeanconvError(f"budget kind must be 'macs' or 'params', got {kind!r}")
    for name, value in (("target", target), ("floor", floor), ("implant", implant), ("tol", tol),
                        ("round_to", round_to)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)
                                  or not math.isfinite(value)):
            raise LeanconvError(f"{name} must be a finite number, got {value!r}")
    checks.fraction(target, "target", of=f"original {kind}")
    if round_to is not None and (int(round_to) != round_to or round_to < 1):
        raise LeanconvError(f"round_to must be a positive integer such as 8, got {round_to}")
    if not floor > 0:
        raise LeanconvError(f"floor must be a channel count >= 1 or a fraction in (0, 1), got {floor}")
    if not 0 <= implant < 1:
        raise LeanconvError(f"implant must be a fraction in [0, 1), got {implant}")
    if not 0 < tol < 1:
        raise LeanconvError(f"tol must be in (0, 1), got {tol}")
    if normalize not in ("mean", "none"):
        raise LeanconvError(f"normalize must be 'mean' or 'none', got {normalize!r}")


def _reachable_plan(model, example_input, shape, *, target, kind, round_to, floor, implant, implant_init, tol,
                    ignored, strict):
    """The traced groups, cost model and planner of a prune; raises when the target is
    unreachable (every group at its floor keeps more than ``target``), before any scoring."""
    traced = trace_groups(model, example_input, ignored=ignored, strict=strict)
    if not traced:
        if any(isinstance(m, ImplantConv2d) for m in model.modules()):
            raise LeanconvError("the model has no prunable channels: every group left holds Neural Implant "
                                "channels, which are not pruned again; prune the model before implanting")
        raise LeanconvError("the model has no prunable channels (every layer is an output or excluded)")
    costs = CostModel(model, traced, shape)
    planner = Planner(model, traced, floor=floor, round_to=round_to, implant=implant, implant_init=implant_init)
    lowest = costs.estimate(*plan_parts(planner.plan(planner.candidates(planner.total)))).of(kind)
    if lowest > target * costs.base.of(kind) * (1 + tol):
        rule = (f"at least {floor} channel(s) per layer" if floor >= 1
                else f"at least {floor:g} of each layer's channels")
        rule += f" in multiples of {round_to} (--round-to)" if round_to else ""
        rule += f" and implanting {implant:g} of the channels removed from kxk convs (--implant)" if implant else ""
        raise LeanconvError(f"target {target:g} of the original {kind} is unreachable: keeping {rule}, the smallest "
                            f"model keeps {lowest / costs.base.of(kind):.3f}; raise the target")
    return traced, costs, planner


def check_reachable(model: nn.Module, example_input: Tensor, *, target: float, kind: str = "macs",
                    input_shape: Sequence[int] | None = None, round_to: int | None = None, floor: float = 1,
                    tol: float = 0.02, ignored: Sequence[str] = (), strict: bool = True,
                    implant: float = 0.0) -> None:
    """Raise :class:`LeanconvError` when :func:`prune_to_budget` with the same options could not
    reach ``target`` (checked without scoring, so a run can refuse it before any work; implanted
    channels count, since they raise the smallest reachable cost). The model is unchanged."""
    _check_options(target, kind, round_to, floor, implant, tol, "mean")
    shape = tuple(input_shape) if input_shape is not None else tuple(example_input.shape[1:])
    _reachable_plan(model, to_model(example_input, model), shape, target=target, kind=kind, round_to=round_to,
                    floor=floor, implant=implant, implant_init="zero", tol=tol, ignored=ignored, strict=strict)


def prune_to_budget(
    model: nn.Module,
    importance: Importance | Sequence[Tensor],
    example_input: Tensor,
    *,
    target: float,
    kind: str = "macs",
    input_shape: Sequence[int] | None = None,
    data: ScoringData | None = None,
    round_to: int | None = None,
    floor: float = 1,
    implant: float = 0.0,
    implant_init: str = "zero",
    normalize: str = "mean",
    latency_aware: bool = False,
    candidates: int = 1,
    seed: int = 0,
    tol: float = 0.02,
    ignored: Sequence[str] = (),
    strict: bool = True,
    progress: Progress | None = None,
) -> PruneResult:
    """Remove channels of ``model`` in place until its ``kind`` ("macs" or "params", one image
    of ``input_shape``, default ``example_input.shape[1:]``) is within ``tol`` of ``target``
    times the original (module docstring). ``importance`` is a criterion called as
    ``importance(model, groups, data)`` or precomputed scores for
    ``channel_groups(model, example_input, ignored=ignored, strict=strict)``; with
    ``strict=False`` channels that pass through layers leanconv cannot resize are kept
    instead of raising. ``candidates > 1`` (needs ``data``) chooses the allocation among that
    many by validation loss after the cut (module docstring, step 6; ``seed`` draws them).
    Raises :class:`LeanconvError` (model untouched) for bad options or an unreachable target."""
    _check_options(target, kind, round_to, floor, implant, tol, normalize)
    check_candidates(candidates, seed, data is not None and bool(data.batches))
    if implant_init not in IMPLANT_INITS:
        raise LeanconvError(f"implant_init must be one of {', '.join(IMPLANT_INITS)}, got {implant_init!r}")
    if implant and implant_init == "fit" and (data is None or not data.batches):
        raise LeanconvError("implant_init='fit' fits the implants on data: pass scoring batches (data=...)")
    report = progress or (lambda done, total, info: None)
    shape = tuple(input_shape) if input_shape is not None else tuple(example_input.shape[1:])
    example_input = to_model(example_input, model)  # a float64 model traces in float64
    traced, costs, planner = _reachable_plan(model, example_input, shape, target=target, kind=kind, round_to=round_to,
                                             floor=floor, implant=implant, implant_init=implant_init, tol=tol,
                                             ignored=ignored, strict=strict)
    report(1, 4, {"stage": "groups", "groups": len(traced)})
    if implant and not any(planner.implant_paths):
        log.info("no channel group is produced by a plain kxk conv; nothing will be implanted")
    goal = target * costs.base.of(kind)
    if data is not None and data.batches:
        check_batches(model, data.batches, data.loss_fn)
    scores = normalized(checked_scores(importance, model, [t.group for t in traced], data), normalize)
    if latency_aware:
        weights = latency_weights(model, traced, example_input, shape)
        scores = [s / w for s, w in zip(scores, weights)]
    planner.rank(scores)
    report(2, 4, {"stage": "scores"})
    realise = functools.partial(_realise, model, traced, planner, costs, goal, kind, tol, example_input, shape)
    fit = functools.partial(_fit, model, traced, planner, data if implant_init == "fit" else None)
    cut, chosen = _Cut(*realise()), None
    if candidates > 1:
        cut, chosen = _best_cut(cut, realise, fit, planner, scores, data, candidates, seed, progress)
    trial, plan, cost = fit(cut).trial, cut.plan, cut.cost
    fold_channel_orders(trial, example_input)  # implants output [kept..., implanted...]: no re-ordering
    report(3, 4, {"stage": "search", "ratio": cost.of(kind) / costs.base.of(kind)})
    layers = layer_changes(model, trial)
    for name, child in list(trial.named_children()):
        setattr(model, name, child)  # adopt the pruned layers; the model object stays the same
    report(4, 4, {"stage": "prune"})
    b = costs.base
    return PruneResult(
        kind=kind, target=target, achieved=cost.of(kind) / b.of(kind), params_before=b.params,
        params_after=cost.params, macs_before=b.macs, macs_after=cost.macs, layers=layers,
        removed={t.group.root: r for t, r in zip(traced, plan.removed) if r},
        implanted={t.group.root: i for t, i in zip(traced, plan.implanted) if i}, implant_fit=cut.fitted,
        candidates=chosen,
    )


def _realise(model, traced, planner: Planner, costs: CostModel, goal: float, kind: str, tol: float, x, shape):
    """Search a plan on the cost model, prune a copy, count it; if the count disagrees with the
    model (a layer the cost model cannot see), search again on counted copies."""
    estimate = lambda c: costs.estimate(*plan_parts(planner.plan(c))).of(kind)  # noqa: E731
    chosen = search(estimate, planner, goal, tol)
    trial, cost = cut_copy(model, traced, planner.plan(chosen), x, shape)
    if cost.of(kind) != estimate(chosen):
        log.warning("cost model missed the counted %s (%d vs %d); searching on counted models", kind,
                    estimate(chosen), cost.of(kind))
        counted = lambda c: cut_copy(model, traced, planner.plan(c), x, shape)[1].of(kind)  # noqa: E731
        chosen = search(counted, planner, goal, tol)
        trial, cost = cut_copy(model, traced, planner.plan(chosen), x, shape)
    if not fits(cost.of(kind), goal, tol):
        coarse = (f"round_to={planner.round_to} (--round-to) makes the channel steps too coarse; lower it"
                  if planner.round_to else "this model's channel groups are too coarse for that target")
        raise LeanconvError(f"cannot land within {tol:.0%} of the target: the nearest plan keeps "
                            f"{cost.of(kind) / costs.base.of(kind):.3f} of the {kind}; {coarse}, or choose a "
                            "target near that")
    return trial, planner.plan(chosen), cost


@dataclass
class _Cut:
    """A realised plan: the pruned copy, its plan, its counted cost and its implants' fit
    (None until :func:`_fit` ran)."""

    trial: nn.Module
    plan: Plan
    cost: Cost
    fitted: dict[str, float] | None = None


def _fit(model: nn.Module, traced, planner: Planner, data: ScoringData | None, cut: _Cut) -> _Cut:
    """Fit ``cut``'s implants on ``data``'s batches (None: zero implants, nothing to fit), once."""
    if cut.fitted is None:
        cut.fitted = {}
        if data is not None and any(cut.plan.implanted):
            cut.fitted = fit_implants(cut.trial, model, _implant_targets(traced, planner, cut.plan), data.batches)
    return cut


def _best_cut(plain: _Cut, realise: Callable[[], tuple], fit: Callable[[_Cut], _Cut], planner: Planner,
              scores: Sequence[Tensor], data: ScoringData, candidates: int, seed: int,
              progress: Progress | None) -> tuple[_Cut, dict[str, Any]]:
    """Step 6 of the module docstring: the cut with the lowest validation loss after the cut
    among ``plain`` and up to ``candidates - 1`` distinct cuts of randomly shifted ``scores``,
    and the record of the choice. Leaves ``planner`` ranked by the last draw."""
    def draw(generator: torch.Generator) -> _Cut | None:
        planner.rank(shifted_scores(scores, generator))
        try:
            return _Cut(*realise())
        except LeanconvError:  # no plan of this ranking lands within tol of the budget
            return None

    def judged(cut: _Cut) -> nn.Module:  # a copy: the cut kept has the statistics the plain one would have
        return copy.deepcopy(fit(cut).trial)

    def key(cut: _Cut) -> tuple:
        return tuple(map(tuple, cut.plan.removed)), tuple(map(tuple, cut.plan.implanted))

    return choose(plain, draw, key=key, realise=judged, candidates=candidates, seed=seed, data=data, progress=progress)


def _implant_targets(traced, planner: Planner, plan: Plan) -> dict[str, list[int]]:
    """Per implanted conv path: the original output channels its implant stands in for."""
    return {member.module: sorted(member.idxs[k] for k in plan.implanted[g])
            for g, t in enumerate(traced) if plan.implanted[g]
            for member in t.group.out_members() if member.module in planner.implant_paths[g]}


def iterative_prune(
    model: nn.Module,
    importance: Importance,
    example_input: Tensor,
    finetune_fn: Callable[[nn.Module, int], None] | None,
    *,
    target: float,
    steps: int = 3,
    kind: str = "macs",
    implant: float = 0.0,
    progress: Progress | None = None,
    after_cut: Callable[[nn.Module, nn.Module, PruneResult], None] | None = None,
    **options: Any,
) -> list[PruneResult]:
    """Prune in ``steps`` rounds along a geometric schedule: after round ``s`` (1-based) the
    model keeps ``target ** (s / steps)`` of its original ``kind``; scores are recomputed on
    the current model each round and ``finetune_fn(model, s)`` (the caller's training, may be
    None) runs after each round, after ``after_cut(model_before_round, model, result)`` (e.g. a
    reconstruction, :mod:`leanconv.width.reconstruct`) when given. Neural Implant (``implant``)
    is applied in the last round only, because implanted outputs are not pruned again.
    ``options`` go to :func:`prune_to_budget` (``data``, ``round_to``, ``floor``, ``normalize``,
    ``latency_aware``, ``candidates`` and ``seed``: the same draws each round, ``tol``,
    ``input_shape``, ``ignored``).
    Returns one :class:`PruneResult` per round (ratios relative to that round's input)."""
    if int(steps) != steps or steps < 1:
        raise LeanconvError(f"steps must be a positive integer, got {steps}")
    _check_options(target, kind, options.get("round_to"), options.get("floor", 1), implant,
                   options.get("tol", 0.02), options.get("normalize", "mean"))
    data = options.get("data")
    check_candidates(options.get("candidates", 1), options.get("seed", 0), data is not None and bool(data.batches))
    shape = options.get("input_shape") or tuple(example_input.shape[1:])
    original = counted_cost(model, shape).of(kind)
    results = []
    for s in range(1, steps + 1):
        step_target = target ** (s / steps) * original / counted_cost(model, shape).of(kind)
        if step_target >= 1:
            raise LeanconvError(f"round {s}: the model already meets the round's budget; use fewer steps")
        before = copy.deepcopy(model) if after_cut is not None else None
        results.append(prune_to_budget(model, importance, example_input, target=step_target, kind=kind,
                                       implant=implant if s == steps else 0.0, **options))
        if after_cut is not None:
            after_cut(before, model, results[-1])
        if progress is not None:
            progress(s, steps, {"stage": "round", "ratio": counted_cost(model, shape).of(kind) / original})
        if finetune_fn is not None:
            finetune_fn(model, s)
    return results
